"""Where a stream's beats fall on its session clock."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Timeline:
    """A straight line from beats to session seconds: ``anchor_beat`` sounds at ``anchor_time``,
    then ``bpm`` beats a minute. A tempo change, a pause or a reconnection re-anchors it at the first
    beat not yet sent, so notes already sent keep their times. Immutable: a session swaps in a new
    one, which the engine thread reads without a lock.
    """

    bpm: float
    anchor_beat: float = 0.0
    anchor_time: float = 0.0

    def seconds(self, beat: float) -> float:
        return self.anchor_time + (beat - self.anchor_beat) * 60.0 / self.bpm

    def beat_at(self, seconds: float) -> float:
        return self.anchor_beat + (seconds - self.anchor_time) * self.bpm / 60.0

    def anchored(self, beat: float, time: float, bpm: float | None = None) -> "Timeline":
        return Timeline(self.bpm if bpm is None else bpm, beat, time)
