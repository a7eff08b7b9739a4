"""Held-out next-token NLL of whole sequences, read in chunks that carry the field over (which gives
exactly the one-pass result, at any length)."""

from __future__ import annotations

import torch

from model.fm.machine import FieldMachine
from model.fm.state import FieldState
from model.tokenizer.sequences import TokenSequence
from model.tokenizer.tokenizer import Tokenizer

CHUNK = 4096  # tokens per parallel pass


@torch.no_grad()
def sequence_nll(model: FieldMachine, tokenizer: Tokenizer, sequence: TokenSequence,
                 device: torch.device, chunk: int = CHUNK) -> float:
    """Total next-token NLL (nats) of one sequence."""
    floats, slots = tokenizer.dna(sequence)
    dna = torch.from_numpy(floats).to(device)[None]
    slot = torch.from_numpy(slots).to(device)[None]
    targets = torch.from_numpy(sequence.ids[1:]).to(device)
    state: FieldState | None = None
    total = 0.0
    for a in range(0, len(sequence) - 1, chunk):
        b = min(a + chunk, len(sequence) - 1)
        out, state = model(dna[:, a:b], slot[:, a:b], start=state, return_state=True)
        total += torch.nn.functional.cross_entropy(out.logits[0].float(), targets[a:b],
                                                   reduction="sum").item()
    return total
