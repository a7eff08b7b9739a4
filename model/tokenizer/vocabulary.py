"""What a token is: its kinds, its key, the tokenizer's settings, and the JSON format version.

Token stream
------------
A piece is a stream of events in time order, bar by bar::

    BOS  BAR(4/4)  NOTE(67,d=1,p=0)  NOTE(60,d=2,p=0)  NOTE(69,d=1,p=12) ...  BAR(4/4) ... EOS

* ``BAR(n/d)`` opens every bar, empty bars included, and carries the bar's time signature. Onsets
  are therefore never ambiguous: a note's onset is the start of the current bar plus its position.
  Chords are notes with the same position; a note held for several bars is followed by BAR tokens
  and no notes; pickups and meter changes are bars of their own signature.
* ``NOTE(pitch, duration, position)``: the token identity of the seed FM, with position = onset in
  the bar in grid steps (``grid_per_beat`` steps per quarter note) and duration snapped (in log
  space) to the nearest value of ``durations``.
* ``REST(duration, position)`` marks real silence: a stretch where no note sounds, cut at bar lines.
* ``BOS``, ``EOS``, ``PAD``, ``UNK``: sequence start and end, batch padding, and a note whose
  (pitch, duration, position) is outside the vocabulary (after trying the nearest duration).

Velocity and voice are not part of the token key. Every event carries a velocity level (index
into ``velocity_levels``) and a voice (0 to ``max_voices - 1``) beside its token id, and both
enter the token's DNA.

"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction
from typing import NamedTuple

from model.timebase import TimeBase

TOKENIZER_FORMAT = 1  # bump when the meaning of events or keys changes (invalidates caches)

# Token kinds.
PAD, BOS, EOS, UNK, BAR, REST, NOTE = range(7)
KIND_NAMES = ("PAD", "BOS", "EOS", "UNK", "BAR", "REST", "NOTE")
SPECIAL_KINDS = (PAD, BOS, EOS, UNK)


class TokenizerError(ValueError):
    """A tokenizer input or file that cannot be used; the message says why."""


@dataclass(frozen=True)
class TokenizerConfig:
    """Every tokenizer setting. Saved inside ``tokenizer.json``.

    The defaults were chosen by measuring the Bach corpus (see README, "Tokenizer grid").
    """

    grid_per_beat: int = 12
    """Onset grid steps per quarter note: 12 holds sixteenths and eighth/sixteenth triplets."""
    durations: tuple[str, ...] = (
        "1/8", "1/6", "1/4", "1/3", "3/8", "1/2", "2/3", "3/4", "1", "3/2", "2", "3", "4", "6", "8")
    """Duration grid in quarter notes; note and rest durations snap to the nearest in log2."""
    velocity_levels: tuple[int, ...] = (16, 32, 48, 64, 80, 96, 112, 127)
    """MIDI velocities kept: ppp pp p mp mf f ff fff. A note keeps the nearest level."""
    max_voices: int = 16
    """Voices kept apart; voices above this share the last one."""
    min_count: int = 1
    """A NOTE/REST key seen fewer times than this in the fitting corpus stays out of the vocabulary."""

    def __post_init__(self) -> None:
        if self.grid_per_beat < 1:
            raise TokenizerError("grid_per_beat must be at least 1")
        if not self.durations or any(Fraction(d) <= 0 for d in self.durations):
            raise TokenizerError("durations must be positive fractions of a quarter note")
        if list(self.durations) != sorted(self.durations, key=Fraction):
            raise TokenizerError("durations must be in increasing order")
        if not self.velocity_levels or any(not 1 <= v <= 127 for v in self.velocity_levels):
            raise TokenizerError("velocity levels must lie in 1..127")
        if not 1 <= self.max_voices <= 64:
            raise TokenizerError("max_voices must lie in 1..64")

    @property
    def duration_beats(self) -> list[Fraction]:
        return [Fraction(d) for d in self.durations]

    @property
    def resolution(self) -> int:
        """Time steps per quarter note of the internal timeline: holds the grid and every duration."""
        res = self.grid_per_beat
        for d in self.duration_beats:
            res = math.lcm(res, d.denominator)
        return res

    @property
    def timebase(self) -> TimeBase:
        """The onset grid and the internal timeline (see :mod:`model.timebase`)."""
        return TimeBase(self.grid_per_beat, self.resolution)

    @property
    def voice_slots(self) -> int:
        """Size of the voice-embedding table: note voices, then REST, BAR, BOS, EOS, UNK, PAD."""
        return self.max_voices + 6

    @classmethod
    def from_dict(cls, data: dict) -> "TokenizerConfig":
        known = set(cls.__dataclass_fields__)
        unknown = set(data) - known
        if unknown:
            raise TokenizerError(f"unknown tokenizer settings: {sorted(unknown)}")
        data = dict(data)
        for name in ("durations", "velocity_levels"):
            if name in data:
                data[name] = tuple(data[name])
        return cls(**data)


class TokenKey(NamedTuple):
    """Token identity. NOTE: (NOTE, pitch, duration index, position); REST: (REST, -1, duration
    index, position); BAR: (BAR, numerator, denominator, 0); specials: (kind, -1, -1, -1)."""

    kind: int
    a: int
    b: int
    c: int

    def __str__(self) -> str:
        if self.kind == NOTE:
            return f"NOTE_{self.a}_d{self.b}_p{self.c}"
        if self.kind == REST:
            return f"REST_d{self.b}_p{self.c}"
        if self.kind == BAR:
            return f"BAR_{self.a}/{self.b}"
        return f"<{KIND_NAMES[self.kind]}>"

    @classmethod
    def parse(cls, text: str) -> "TokenKey":
        try:
            if text.startswith("<") and text.endswith(">"):
                return special_key(KIND_NAMES.index(text[1:-1]))
            head, *parts = text.split("_")
            if head == "NOTE":
                return cls(NOTE, int(parts[0]), int(parts[1][1:]), int(parts[2][1:]))
            if head == "REST":
                return cls(REST, -1, int(parts[0][1:]), int(parts[1][1:]))
            if head == "BAR":
                num, den = parts[0].split("/")
                return cls(BAR, int(num), int(den), 0)
        except (ValueError, IndexError):
            pass
        raise TokenizerError(f"not a token: {text!r}")


def special_key(kind: int) -> TokenKey:
    return TokenKey(kind, -1, -1, -1)


@dataclass(frozen=True)
class TokenShape:
    """What a model must know of its tokenizer: the sizes of its embedding tables and heads.

    The one source of the data-derived model settings: ``ModelConfig(**asdict(tokenizer.shape), ...)``.
    """

    vocab_size: int
    voice_slots: int
    max_voices: int
    velocity_levels: int
