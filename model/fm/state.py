"""What a stream is to the model: its :class:`FieldState`, and the outputs (:class:`FMOutput`) that
predict its next token."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class FieldState:
    """Per-stream generation state: ``field`` (B, D) float32 and ``position`` (B,) int64.

    ``position`` is the position the next token will take. Its size never grows with length.
    """

    field: Tensor
    position: Tensor

    @classmethod
    def empty(cls, batch: int, dim: int, device: torch.device | str = "cpu") -> "FieldState":
        return cls(torch.zeros(batch, dim, dtype=torch.float32, device=device),
                   torch.zeros(batch, dtype=torch.int64, device=device))

    def nbytes(self) -> int:
        return self.field.numel() * self.field.element_size() + self.position.numel() * 8

    def index(self, rows: Tensor | list[int]) -> "FieldState":
        return FieldState(self.field[rows], self.position[rows])


@dataclass
class FMOutput:
    logits: Tensor  # (..., V) next token
    velocity: Tensor  # (..., velocity_levels) velocity level of the next token
    voice: Tensor  # (..., max_voices) voice of the next token


    def last(self) -> "FMOutput":
        """The outputs at the last position of ``(B, T, ...)`` outputs: ``(B, ...)``."""
        return FMOutput(self.logits[:, -1], self.velocity[:, -1], self.voice[:, -1])


def stack_states(states: list[FieldState]) -> FieldState:
    return FieldState(torch.cat([s.field for s in states]), torch.cat([s.position for s in states]))


def stack_outputs(outputs: list[FMOutput]) -> FMOutput:
    return FMOutput(torch.cat([o.logits for o in outputs]), torch.cat([o.velocity for o in outputs]),
                    torch.cat([o.voice for o in outputs]))
