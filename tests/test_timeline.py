"""Beats to session seconds, and re-anchoring on tempo changes."""

from server.timeline import Timeline


def test_beats_and_seconds_round_trip():
    line = Timeline(bpm=120)
    assert line.seconds(4) == 2.0
    assert line.beat_at(2.0) == 4.0


def test_reanchoring_keeps_earlier_beats_and_changes_the_rate_after():
    line = Timeline(bpm=120).anchored(8, 4.0, bpm=60)
    assert line.seconds(8) == 4.0
    assert line.seconds(9) == 5.0
    assert line.beat_at(6.0) == 10.0
