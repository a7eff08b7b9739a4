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
    """What predicts a stream's next token: its logits, and the decoder state the note head reads
    (with the token once it is chosen) for that note's voice and velocity."""

    logits: Tensor  # (..., V) next token
    hidden: Tensor  # (..., width) the decoder's state, for the model's ``note_logits``

    def last(self, lengths: Tensor | None = None) -> "FMOutput":
        """The outputs at the last position of ``(B, T, ...)`` outputs: ``(B, ...)`` (at position
        ``lengths - 1`` of each row where given)."""
        if lengths is None:
            return FMOutput(self.logits[:, -1], self.hidden[:, -1])
        rows = torch.arange(len(lengths), device=self.logits.device)
        return FMOutput(self.logits[rows, lengths - 1], self.hidden[rows, lengths - 1])


def stack_states(states: list[FieldState]) -> FieldState:
    return FieldState(torch.cat([s.field for s in states]), torch.cat([s.position for s in states]))


def stack_outputs(outputs: list[FMOutput]) -> FMOutput:
    return FMOutput(torch.cat([o.logits for o in outputs]), torch.cat([o.hidden for o in outputs]))
