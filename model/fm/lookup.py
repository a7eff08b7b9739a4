"""Learned rows for the discrete values the DNA floats encode (``ModelConfig.dna_lookup``)."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


class DNALookup(nn.Module):
    """Sum of learned rows (…, D) for the discrete values the DNA floats (…, 7) encode.

    Reads the layout of :mod:`model.tokenizer.dna`: pitch class as (sin, cos),
    octave / 10, log duration scaled to 0..1, beat angle as (sin, cos), velocity / 127.
    """

    SIZES = {"pitch": 132, "pitch_class": 12, "octave": 11, "duration": 65, "beat": 144, "velocity": 9}

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.tables = nn.ModuleDict({k: nn.Embedding(n, dim) for k, n in self.SIZES.items()})
        for table in self.tables.values():
            nn.init.normal_(table.weight, std=0.02)

    def indices(self, dna: Tensor) -> dict[str, Tensor]:
        dna = dna.float()
        turn = lambda s, c: torch.remainder(torch.atan2(s, c) / (2 * math.pi), 1.0)
        pitch_class = torch.round(turn(dna[..., 0], dna[..., 1]) * 12).long() % 12
        octave = torch.round(dna[..., 2] * 10).long().clamp(0, 10)
        n = self.SIZES
        return {"pitch": (octave * 12 + pitch_class).clamp(0, n["pitch"] - 1),
                "pitch_class": pitch_class, "octave": octave,
                "duration": torch.round(dna[..., 3] * 64).long().clamp(0, 64),
                "beat": torch.round(turn(dna[..., 4], dna[..., 5]) * 144).long() % 144,
                "velocity": torch.round(dna[..., 6] * 8).long().clamp(0, 8)}

    def forward(self, dna: Tensor) -> Tensor:
        return sum(self.tables[k](i) for k, i in self.indices(dna).items())

