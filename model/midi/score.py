"""The typed records every part of the project shares for a piece of music: notes, tempo and
time-signature maps, and the error a MIDI file that cannot be used raises.

Ticks are a file's own; beats are quarter notes (:mod:`model.timebase` converts between them).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from model.timebase import bpm_from_microseconds

DEFAULT_TEMPO = 500_000  # microseconds per quarter note (120 bpm), the MIDI default
DEFAULT_TIME_SIGNATURE = (4, 4)


class MidiReadError(ValueError):
    """A MIDI file that cannot be used; the message names the file and the reason."""


@dataclass(frozen=True, slots=True)
class Note:
    """One sounding note. Ticks are the file's; beats are quarter notes."""

    pitch: int
    velocity: int
    onset_tick: int
    duration_tick: int
    onset_beat: float
    duration_beat: float
    channel: int
    track: int
    voice: int


@dataclass(frozen=True, slots=True)
class TempoChange:
    tick: int
    microseconds_per_beat: int

    @property
    def bpm(self) -> float:
        return bpm_from_microseconds(self.microseconds_per_beat)


@dataclass(frozen=True, slots=True)
class TimeSignature:
    tick: int
    numerator: int
    denominator: int


@dataclass
class Score:
    """A MIDI file as notes plus its tempo and time-signature maps (both start at tick 0)."""

    ticks_per_beat: int
    notes: list[Note]
    tempos: list[TempoChange]
    time_signatures: list[TimeSignature]
    midi_type: int = 1
    source: str = "<bytes>"
    recovered: bool = False
    problems: list[str] = field(default_factory=list)

    def tempos_at(self, ticks_per_beat: int) -> list[TempoChange]:
        """The tempo map with its ticks rescaled to another resolution."""
        return [TempoChange(round(t.tick * ticks_per_beat / self.ticks_per_beat), t.microseconds_per_beat)
                for t in self.tempos]

    @property
    def end_tick(self) -> int:
        return max((n.onset_tick + n.duration_tick for n in self.notes), default=0)

