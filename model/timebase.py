"""Every time unit of the project, and the one place where they convert.

=================  ==============================================================================
unit               what
=================  ==============================================================================
internal steps     the tokenizer's timeline: ``resolution`` steps a beat, fine enough for the onset
                   grid and every grid duration (24 at the default settings)
grid steps         the onset grid: ``grid_per_beat`` steps a beat (12 at the defaults); a token's
                   position in its bar is counted in grid steps
beats              quarter notes, as floats (a stream's notes, played notes, the wire's ``beat``)
ticks              a MIDI file's: ``ticks_per_beat`` a beat (:data:`TICKS_PER_BEAT` in the files
                   the project writes)
seconds            beats at a tempo (``bpm``); a :class:`Timeline` places a stream's beats on its
                   session clock
=================  ==============================================================================
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction

TICKS_PER_BEAT = 480  # resolution of every MIDI file the project writes


def round_half_up(numerator: int, denominator: int) -> int:
    """``numerator / denominator`` rounded half up (the same way for every file)."""
    return (2 * numerator + denominator) // (2 * denominator)


def grid_from_ticks(tick: int, ticks_per_beat: int, grid_per_beat: int) -> int:
    """A file's tick on an onset grid of ``grid_per_beat`` steps a beat (rounded half up)."""
    return round_half_up(tick * grid_per_beat, ticks_per_beat)


def ticks_from_beats(beats: float, ticks_per_beat: int = TICKS_PER_BEAT) -> int:
    """Beats to the nearest tick."""
    return round(beats * ticks_per_beat)


def beats_from_seconds(seconds: float, bpm: float) -> float:
    return seconds * bpm / 60.0


def seconds_from_beats(beats: float, bpm: float) -> float:
    return beats * 60.0 / bpm


def microseconds_per_beat(bpm: float) -> int:
    """A MIDI tempo (``set_tempo``) for ``bpm``."""
    return round(60_000_000 / bpm)


def bpm_from_microseconds(microseconds_per_beat: int) -> float:
    """The tempo of a MIDI ``set_tempo``."""
    return 60_000_000 / microseconds_per_beat


@dataclass(frozen=True)
class TimeBase:
    """The tokenizer's two grids (see the table above) and their conversions."""

    grid_per_beat: int
    resolution: int

    def __post_init__(self) -> None:
        if self.grid_per_beat < 1 or self.resolution % self.grid_per_beat:
            raise ValueError(f"resolution {self.resolution} must be a multiple of the grid "
                             f"{self.grid_per_beat}")

    @property
    def steps_per_grid(self) -> int:
        """Internal steps per onset grid step."""
        return self.resolution // self.grid_per_beat

    def steps_from_grid(self, grid: int) -> int:
        return grid * self.steps_per_grid

    def beats_from_steps(self, steps: int) -> float:
        return steps / self.resolution

    def beats_from_grid(self, grid: int) -> float:
        return grid / self.grid_per_beat

    def grid_from_beats(self, beats: float) -> int:
        """Beats to the nearest onset grid step."""
        return round(beats * self.grid_per_beat)

    def ticks_per_step(self, ticks_per_beat: int = TICKS_PER_BEAT) -> int:
        """Ticks per internal step; ``ticks_per_beat`` must be a multiple of ``resolution``."""
        scale = Fraction(ticks_per_beat, self.resolution)
        if scale.denominator != 1:
            raise ValueError(f"ticks_per_beat {ticks_per_beat} must be a multiple of {self.resolution}")
        return int(scale)

    def ticks_from_steps(self, steps: int, ticks_per_beat: int = TICKS_PER_BEAT) -> int:
        return steps * self.ticks_per_step(ticks_per_beat)


@dataclass(frozen=True)
class Timeline:
    """A straight line from beats to seconds on a session clock: ``anchor_beat`` sounds at
    ``anchor_time``, then ``bpm`` beats a minute. A tempo change, a pause or a reconnection
    re-anchors it at the first beat not yet sent, so notes already sent keep their times.
    Immutable: a session swaps in a new one, which the engine thread reads without a lock.
    """

    bpm: float
    anchor_beat: float = 0.0
    anchor_time: float = 0.0

    def seconds(self, beat: float) -> float:
        return self.anchor_time + seconds_from_beats(beat - self.anchor_beat, self.bpm)

    def beat_at(self, seconds: float) -> float:
        return self.anchor_beat + beats_from_seconds(seconds - self.anchor_time, self.bpm)

    def duration_seconds(self, beats: float) -> float:
        return seconds_from_beats(beats, self.bpm)

    def duration_beats(self, seconds: float) -> float:
        return beats_from_seconds(seconds, self.bpm)

    def anchored(self, beat: float, time: float, bpm: float | None = None) -> "Timeline":
        return Timeline(self.bpm if bpm is None else bpm, beat, time)
