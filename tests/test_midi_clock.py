"""MIDI clock without a MIDI system: the tracker fed (message, time) pairs, the sender's output."""

from __future__ import annotations

import math
import time

import pytest

from client.midi_clock import CLOCK, CONTINUE, SONG_POSITION, START, STOP, ClockSender, ClockTracker, is_clock_message
from tests.waiting import wait_for


def ticks(tracker: ClockTracker, bpm: float, count: int, at: float, jitter: float = 0.0) -> float:
    """Feeds ``count`` clocks at ``bpm`` from ``at`` (each ``jitter`` seconds late, every other one);
    returns the time of the next."""
    step = 60.0 / (24 * bpm)
    for i in range(count):
        tracker.feed([CLOCK], at + i * step + (jitter if i % 2 else 0.0))
    return at + count * step


@pytest.mark.parametrize("bpm", [60.0, 100.0, 140.0, 300.0], ids=lambda b: f"{b:g}bpm")
def test_the_tempo_is_read_from_the_clock(bpm):
    tracker = ClockTracker()
    assert tracker.bpm is None
    ticks(tracker, bpm, 25, 1000.0, jitter=0.0005)  # half a millisecond of jitter on every other clock
    assert tracker.bpm == pytest.approx(bpm, rel=0.01)


def test_clocks_handed_on_once_a_period_still_give_the_tempo():
    """JACK passes MIDI on at period starts: 25 ms intervals arrive as 24.0 or 26.7 ms (2.67 ms periods)."""
    tracker = ClockTracker()
    period = 128 / 48000
    for i in range(60):
        tracker.feed([CLOCK], math.ceil(i * 0.025 / period) * period)
    assert tracker.bpm == pytest.approx(100.0, rel=0.005)


def test_a_clock_a_busy_machine_delayed_does_not_move_the_tempo():
    tracker = ClockTracker()
    step = 60.0 / (24 * 140)
    for i in range(30):
        tracker.feed([CLOCK], i * step + (0.03 if i == 28 else 0.0))  # one clock 30 ms late
    assert tracker.bpm == pytest.approx(140.0, rel=0.002)


def test_a_tempo_change_is_followed_within_a_beat():
    tracker = ClockTracker()
    at = ticks(tracker, 100.0, 48, 0.0)
    ticks(tracker, 140.0, 24, at)
    assert tracker.bpm == pytest.approx(140.0, rel=0.01)


def test_a_halt_in_the_clock_is_not_a_tempo():
    tracker = ClockTracker()
    at = ticks(tracker, 120.0, 30, 0.0)
    ticks(tracker, 120.0, 3, at + 5.0)  # five seconds without a clock
    assert tracker.bpm == pytest.approx(120.0)


def test_start_stop_position_and_continue_set_the_song_position():
    tracker = ClockTracker()
    assert tracker.feed([START], 0.0) == "start" and tracker.running and not tracker.anchored
    at = ticks(tracker, 120.0, 49, 0.0)  # beats 0 and 1, and the first clock of beat 2
    assert tracker.anchored and tracker.last_tick == 48
    assert tracker.beat_at(at) == pytest.approx(2 + 1 / 24)
    assert tracker.time_of(3.0) == pytest.approx(1.5)
    assert tracker.feed([STOP], at) == "stop" and not tracker.running and tracker.time_of(3.0) is None
    assert tracker.feed([SONG_POSITION, 0x10, 0x01], at) == "position"  # sixteenth 0x90 = 144 = beat 36
    assert tracker.feed([CONTINUE], at + 1) == "continue" and tracker.start_beat == 36.0
    tracker.feed([CLOCK], at + 1.01)
    assert tracker.last_tick == 36 * 24 and tracker.beat_at(at + 1.01) == pytest.approx(36.0)
    assert tracker.feed([START], at + 2) == "start" and tracker.start_beat == 0.0
    assert tracker.feed([0x90, 60, 100], at + 3) is None


def test_only_clock_messages_go_to_the_clock():
    assert all(is_clock_message(m) for m in ([CLOCK], [START], [CONTINUE], [STOP], [SONG_POSITION, 0, 0]))
    assert not any(is_clock_message(m) for m in ([0x90, 60, 1], [0x80, 60, 0], [0xB0, 64, 0], []))


def test_the_sender_starts_on_a_bar_line_and_sends_24_clocks_a_beat():
    sent: list[tuple[float, list[int]]] = []
    sender = ClockSender(lambda m: sent.append((time.time(), m)))
    beat = 0.25  # 240 bpm: a clock every 10.4 ms
    now = time.time()
    sender.follow(-1.0, now + 0.05, 60 / beat)  # beat -1 at now + 50 ms: beat 0 (a bar line) one beat later
    wait_for(lambda: len(sent) > 24 * 4, 10, "four beats of clock")
    sender.close()
    assert sent[0][1] == [START] and sent[1][1] == [CLOCK] and sent[-1][1] == [STOP]
    clocks = [t for t, m in sent if m == [CLOCK]]
    beat0 = now + 0.05 + beat
    # Counted over whole beats, with the window's edges half a clock off the clocks' times.
    for first in range(3):
        low, high = beat0 + (first - 0.5 / 24) * beat, beat0 + (first + 1 - 0.5 / 24) * beat
        inside = [t for t in clocks if low <= t < high]
        assert len(inside) == 24, (first, [round((t - beat0) / beat * 24, 2) for t in clocks[:30]])
