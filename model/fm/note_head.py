"""The note head: a note's voice and velocity, chosen *for the note that was chosen*.

The next-token head picks the note (pitch, duration, position); only then does this head, given
the decoder's state and that note's token, give the distribution of its voice and velocity:

    z        = GELU(Linear(width, E)(h) + P[pitch] + Q[duration] + R[position])
    voice    = Linear(E, max_voices)(z)
    velocity = Linear(E, velocity_levels)(z)

Trained teacher-forced on the true next token, and at generation fed the sampled one
(:meth:`model.generation.generator.BatchGenerator.advance`), which then *samples* both with the
stream's own random numbers and temperature. A head that never saw the note (the earlier design)
can only say which voice is most common; this one says which voice plays *this* pitch now: the
soprano's G, not the bass's.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from model.fm.factored_head import part_tables

NOTE_HEAD_WIDTH = 128


class NoteHead(nn.Module):
    def __init__(self, width: int, max_voices: int, velocity_levels: int,
                 embedding: int = NOTE_HEAD_WIDTH) -> None:
        super().__init__()
        self.tables = part_tables(embedding)
        self.state = nn.Linear(width, embedding)
        self.voice = nn.Linear(embedding, max_voices)
        self.velocity = nn.Linear(embedding, velocity_levels)

    def forward(self, hidden: Tensor, parts: Tensor) -> tuple[Tensor, Tensor]:
        """``hidden`` (…, width) and the token's part rows (…, 3) -> voice and velocity logits."""
        z = self.state(hidden)
        for i, table in enumerate(self.tables):
            z = z + table(parts[..., i]).to(z.dtype)
        z = F.gelu(z)
        return self.voice(z), self.velocity(z)
