"""Time units: grid steps, internal steps, beats, ticks and seconds, and re-anchoring a timeline."""

import pytest

from model.timebase import (TimeBase, Timeline, grid_from_ticks, microseconds_per_beat,
                            round_half_up, ticks_from_beats)


def test_beats_and_seconds_round_trip():
    line = Timeline(bpm=120)
    assert line.seconds(4) == 2.0
    assert line.beat_at(2.0) == 4.0
    assert line.duration_seconds(1.5) == 0.75 and line.duration_beats(0.75) == 1.5


def test_reanchoring_keeps_earlier_beats_and_changes_the_rate_after():
    line = Timeline(bpm=120).anchored(8, 4.0, bpm=60)
    assert line.seconds(8) == 4.0
    assert line.seconds(9) == 5.0
    assert line.beat_at(6.0) == 10.0


def test_grid_steps_beats_and_ticks():
    base = TimeBase(grid_per_beat=12, resolution=24)
    assert base.steps_per_grid == 2 and base.steps_from_grid(6) == 12
    assert base.beats_from_steps(36) == 1.5 and base.beats_from_grid(6) == 0.5
    assert base.grid_from_beats(0.26) == 3
    assert base.ticks_from_steps(3) == 60  # 480 ticks a beat
    assert ticks_from_beats(0.25) == 120 and microseconds_per_beat(120) == 500_000
    assert grid_from_ticks(20, 480, 12) == 1 and grid_from_ticks(19, 480, 12) == 0  # half up
    assert round_half_up(5, 2) == 3 and round_half_up(-5, 2) == -2


def test_a_file_resolution_that_does_not_hold_the_steps_is_refused():
    with pytest.raises(ValueError, match="multiple of 24"):
        TimeBase(grid_per_beat=12, resolution=24).ticks_per_step(100)
    with pytest.raises(ValueError, match="multiple of the grid"):
        TimeBase(grid_per_beat=12, resolution=20)
