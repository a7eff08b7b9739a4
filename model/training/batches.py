"""Training examples and batches: a tokenized file as the model reads it (:class:`Example`), the
windows long files are cut into, and padded batches (:func:`collate`)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from model.tokenizer.dna import DNA_FLOATS
from model.tokenizer.sequences import TokenSequence
from model.tokenizer.tokenizer import Tokenizer
from model.tokenizer.vocabulary import NOTE
from model.tokenizer.voice_register import REGISTER_VOICES


@dataclass
class Example:
    """One tokenized file as the model reads it."""

    ids: np.ndarray
    dna: np.ndarray  # (T, DNA_FLOATS)
    slots: np.ndarray
    velocity: np.ndarray
    voice: np.ndarray
    is_note: np.ndarray
    chords: np.ndarray  # (T, REGISTER_VOICES) the voices already playing where each token starts


def make_example(sequence: TokenSequence, tokenizer: Tokenizer) -> Example:
    dna, slots, chords = tokenizer.dna_and_chords(sequence)
    return Example(sequence.ids, dna, slots, sequence.velocity,
                   np.minimum(sequence.voice, tokenizer.config.max_voices - 1),
                   tokenizer.kinds(sequence.ids) == NOTE, chords)


def windows(examples: list[Example], max_len: int, rng: np.random.Generator | None) -> list[tuple[int, int, int]]:
    """(example, start, stop) windows of at most ``max_len + 1`` tokens (inputs plus one target).

    With ``rng`` the window grid gets a random offset per file (a new cut every epoch).
    """
    out = []
    for i, ex in enumerate(examples):
        n = len(ex.ids)
        offset = int(rng.integers(0, max_len)) if rng is not None and n > max_len + 1 else 0
        starts = [0] + list(range(offset or max_len, n - 1, max_len))
        for a, b in zip(starts, starts[1:] + [n - 1]):
            if b > a:
                out.append((i, a, min(b, a + max_len) + 1))
    return out


def collate(examples: list[Example], batch: list[tuple[int, int, int]], device: torch.device) -> dict[str, torch.Tensor]:
    """Pad windows on the right into tensors: the inputs' ``dna`` (B, T, DNA_FLOATS) and ``slots``,
    the shifted ``targets``, ``velocity``, ``voice`` and ``is_note`` (B, T) and the voices already
    playing where each target starts, ``chords`` (B, T, REGISTER_VOICES); ``mask`` marks real targets.

    An empty ``batch`` gives one row of padding with nothing to score: a rank whose share of a
    short global batch is empty still runs the model, as every rank of a DDP step must.
    """
    length = max((b - a for _, a, b in batch), default=2) - 1
    size = max(len(batch), 1)
    dna = np.zeros((size, length, DNA_FLOATS), np.float32)
    slots = np.zeros((size, length), np.int64)
    targets = np.zeros((size, length), np.int64)
    velocity = np.zeros((size, length), np.int64)
    voice = np.zeros((size, length), np.int64)
    is_note = np.zeros((size, length), bool)
    chords = np.zeros((size, length, REGISTER_VOICES), np.float32)
    mask = np.zeros((size, length), bool)
    for row, (i, a, b) in enumerate(batch):
        ex, n = examples[i], b - a - 1
        dna[row, :n], slots[row, :n] = ex.dna[a:b - 1], ex.slots[a:b - 1]
        targets[row, :n], velocity[row, :n] = ex.ids[a + 1:b], ex.velocity[a + 1:b]
        voice[row, :n], is_note[row, :n] = ex.voice[a + 1:b], ex.is_note[a + 1:b]
        chords[row, :n] = ex.chords[a + 1:b]
        mask[row, :n] = True
    arrays = dict(dna=dna, slots=slots, targets=targets, velocity=velocity, voice=voice,
                  is_note=is_note, chords=chords, mask=mask)
    return {k: torch.from_numpy(v).to(device) for k, v in arrays.items()}
