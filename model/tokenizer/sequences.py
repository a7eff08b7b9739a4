"""A piece as the tokenizer's events (before vocabulary lookup) and as the token ids a model reads."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable

import numpy as np

from model.tokenizer.vocabulary import NOTE, TokenKey


@dataclass
class Events:
    """A piece on the tokenizer's grid, before vocabulary lookup (what the corpus cache stores).

    One row per event: ``kind, a, b, c`` form its :class:`TokenKey`; ``velocity`` is a level
    index and ``voice`` a voice index (0 for non-notes).
    """

    kind: np.ndarray
    a: np.ndarray
    b: np.ndarray
    c: np.ndarray
    velocity: np.ndarray
    voice: np.ndarray
    problems: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.kind)

    def keys(self) -> Iterable[TokenKey]:
        return map(TokenKey, self.kind.tolist(), self.a.tolist(), self.b.tolist(), self.c.tolist())

    def arrays(self) -> dict[str, np.ndarray]:
        return {name: getattr(self, name) for name in ("kind", "a", "b", "c", "velocity", "voice")}

    @property
    def note_count(self) -> int:
        return int(np.count_nonzero(self.kind == NOTE))

    def transposed(self, semitones: int) -> "Events | None":
        """The same piece with every note moved by ``semitones``; None if a note would leave 0-127."""
        notes = self.kind == NOTE
        pitches = self.a[notes] + semitones
        if pitches.size and (pitches.min() < 0 or pitches.max() > 127):
            return None
        a = self.a.copy()
        a[notes] = pitches
        return Events(self.kind, a, self.b, self.c, self.velocity, self.voice, list(self.problems))

    def transpositions(self, semitones: int) -> list["Events"]:
        """This piece first, then each transposition by -semitones..+semitones that stays in 0-127."""
        shifts = [s for s in range(-semitones, semitones + 1) if s != 0]
        return [self] + [t for t in (self.transposed(s) for s in shifts) if t is not None]


@dataclass
class TokenSequence:
    """Token ids with each event's velocity level and voice, as the model reads them."""

    ids: np.ndarray
    velocity: np.ndarray
    voice: np.ndarray
    unknown: int = 0
    """Notes that fell outside the vocabulary and became UNK."""
    approximated: int = 0
    """Notes whose duration was moved to the nearest one in the vocabulary."""

    def __len__(self) -> int:
        return len(self.ids)

