"""Limits on reading one MIDI file: sizes a real file never reaches and a hostile one always does.

A file that passes a limit is refused with :class:`model.midi.score.MidiReadError` (or, for the
tokens it would become, :class:`model.tokenizer.vocabulary.TokenizerError`) naming the file, what
was over and the limit, before the expensive work is done: a 37-byte file can hold one note a
million beats away, and every bar in between is a token. The largest file of the Bach corpus has
15 tracks, 50,340 events, 25,151 notes, 4,206 beats and 25,718 tokens; the defaults are 30-60
times that. The server passes stricter ones for prompts (``python -m server --help``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field


@dataclass(frozen=True)
class ReadLimits:
    """The most one MIDI file may hold, and the longest it may take to read and tokenize."""

    max_tracks: int = field(default=1024, metadata={"help": "track chunks"})
    max_events: int = field(default=2_000_000, metadata={"help": "MIDI events, all tracks together"})
    max_notes: int = field(default=500_000, metadata={"help": "notes"})
    max_beats: float = field(default=100_000.0, metadata={"help": "beats from the start to the last event (every bar, empty ones too, becomes a token)"})
    max_tokens: int = field(default=1_000_000, metadata={"help": "tokens the file becomes"})
    seconds: float = field(default=60.0, metadata={"help": "seconds to read and tokenize it"})

    def __post_init__(self) -> None:
        for name in ("max_tracks", "max_events", "max_notes", "max_beats", "max_tokens", "seconds"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, not {getattr(self, name)!r}")

    def check(self, what: str, count: float, limit_name: str, source: str, error: type[Exception]) -> None:
        """Raise ``error`` naming ``source`` when ``count`` is over the limit ``limit_name``."""
        limit = getattr(self, limit_name)
        if count > limit:
            raise error(f"{source}: {what} {count:,.0f} is over the limit of {limit:,.0f} ({limit_name})")


class Deadline:
    """The moment reading a file must be done by (:attr:`ReadLimits.seconds` from its start)."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.at = time.monotonic() + seconds

    def passed(self) -> bool:
        return time.monotonic() > self.at
