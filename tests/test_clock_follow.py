"""The session's notes on a DAW's transport, with a stand-in scheduler and a clock fed by hand."""

from __future__ import annotations

import pytest

from client.clock_follow import ClockFollower
from client.midi_clock import CLOCK, CONTINUE, SONG_POSITION, START, STOP

BPM = 120.0
TICK = 60.0 / (24 * BPM)


class Scheduler:
    """Keeps what the follower hands it: (unix time, channel, pitch); counts the silences."""

    def __init__(self) -> None:
        self.notes: list[tuple[float, int, int]] = []
        self.silenced = 0

    def note(self, at: float, duration: float, channel: int, pitch: int, velocity: int) -> None:
        self.notes.append((at, channel, pitch))

    def all_notes_off(self) -> None:
        self.silenced += 1


class Daw:
    """A transport at 120 bpm whose clock the test advances; ``now`` is its time."""

    def __init__(self, latency: float = 0.0) -> None:
        self.now = 5000.0
        self.tempi: list[float] = []
        self.transport: list[bool] = []
        self.scheduler = Scheduler()
        self.follower = ClockFollower(self.scheduler, lambda voice: voice, latency=latency, now=lambda: self.now,
                                      on_tempo=self.tempi.append, on_transport=self.transport.append)
        self.ticks(30)  # the clock runs before the transport does, as DAWs send it

    def send(self, *message: int) -> None:
        self.follower.on_clock(list(message), self.now)

    def ticks(self, count: int) -> None:
        for _ in range(count):
            self.send(CLOCK)
            self.now += TICK

    def beat_of(self, at: float, start_time: float, start_beat: float = 0.0) -> float:
        return round(start_beat + (at - start_time) * BPM / 60.0, 4)


def notes(*beats: float, voice: int = 0) -> list[dict]:
    return [{"beat": b, "start": 0.0, "duration": 0.1, "pitch": 60 + i, "velocity": 90, "voice": voice}
            for i, b in enumerate(beats)]


def test_nothing_plays_until_start_and_the_session_bar_lands_on_the_downbeat():
    daw = Daw()
    daw.follower.play(notes(8.0, 8.5, 9.25, 12.0), clock=0.0)  # the session is at bar 3 (beat 8)
    daw.ticks(48)
    assert daw.scheduler.notes == [] and daw.tempi == [pytest.approx(BPM)]
    daw.send(START)
    started = daw.now
    daw.ticks(24 * 5)
    assert daw.transport == [True]
    beats = [daw.beat_of(at, started) for at, _, _ in daw.scheduler.notes]
    assert beats == [0.0, 0.5, 1.25, 4.0]  # beat and subdivision kept, bar on bar


def test_a_note_in_the_middle_of_a_bar_keeps_its_place_in_the_bar():
    daw = Daw()
    daw.send(START)
    started = daw.now
    daw.ticks(24 * 2 + 5)  # the transport is past beat 2 when the first note comes
    daw.follower.play(notes(13.5, 14.0), clock=0.0)
    daw.ticks(24 * 6)
    assert [daw.beat_of(at, started) for at, _, _ in daw.scheduler.notes] == [5.5, 6.0]


def test_stop_silences_and_holds_back_continue_after_a_song_position_resumes_there():
    daw = Daw()
    daw.send(START)
    started = daw.now
    daw.follower.play(notes(0.0, 1.0, 2.0, 3.0, 4.0, 5.0), clock=0.0)
    daw.ticks(24 + 12)  # beat 1.5
    played = len(daw.scheduler.notes)
    daw.send(STOP)
    assert daw.scheduler.silenced == 1 and daw.transport == [True, False]
    daw.follower.play(notes(6.0), clock=0.0)  # arrives while stopped
    daw.ticks(48)
    assert len(daw.scheduler.notes) == played, "a note was scheduled while the transport was stopped"
    daw.send(SONG_POSITION, 32, 0)  # sixteenth 32 = beat 8
    daw.send(CONTINUE)
    continued = daw.now
    daw.ticks(24 * 8)
    resumed = [daw.beat_of(at, continued, 8.0) for at, _, _ in daw.scheduler.notes[played:]]
    # The held notes go on from the song position, in the same place in the bar (beat 2 of the
    # session, the first not played, lands on the DAW's beat 10, 2 past the bar line at 8).
    assert resumed == [10.0, 11.0, 12.0, 13.0, 14.0]
    assert [daw.beat_of(at, started) for at, _, _ in daw.scheduler.notes[:played]] == [0.0, 1.0]


def test_notes_whose_time_has_passed_are_skipped_and_latency_sends_early():
    daw = Daw(latency=0.02)
    daw.follower.play(notes(0.0), clock=0.0)
    daw.send(START)
    started = daw.now
    daw.ticks(24 * 5)
    daw.follower.play(notes(4.0, 5.5, 8.0), clock=0.0)  # arriving late: beat 4 has passed
    daw.ticks(24 * 4)
    assert daw.follower.skipped == 1
    # Each is due 20 ms early; the downbeat, known only when its clock comes, is handed over due
    # already (the scheduler plays it at once) instead of being skipped.
    assert [daw.beat_of(at + 0.02, started) for at, _, _ in daw.scheduler.notes] == [0.0, 5.5, 8.0]


def test_the_tempo_is_reported_when_it_changes():
    daw = Daw()
    assert daw.tempi == [pytest.approx(BPM)]
    daw.ticks(48)
    assert len(daw.tempi) == 1  # a steady clock is reported once
    for _ in range(48):  # 140 bpm
        daw.send(CLOCK)
        daw.now += 60.0 / (24 * 140)
    assert daw.tempi[-1] == pytest.approx(140, rel=0.01)


class PacedServer:
    """The server's pacing: a timeline (beat, time, bpm) re-anchored at the first unsent note when
    the tempo changes (``server/session.py``'s ``retime``), each note sent a lookahead before its time."""

    LOOKAHEAD = 0.5

    def __init__(self, bpm: float, clock: dict) -> None:
        self.bpm, self.clock = bpm, clock
        self.beat, self.time = 0.0, None
        self.next_beat = 0.0

    def time_of(self, beat: float) -> float:
        return self.time + (beat - self.beat) * 60.0 / self.bpm

    def resume(self) -> None:
        self.beat, self.time = self.next_beat, self.clock["now"] + self.LOOKAHEAD

    def set_bpm(self, bpm: float) -> None:
        if self.time is not None:
            self.beat, self.time = self.next_beat, max(self.time_of(self.next_beat), self.clock["now"])
        self.bpm = bpm

    def due(self) -> bool:
        return self.time is not None and self.time_of(self.next_beat) - self.LOOKAHEAD <= self.clock["now"]


@pytest.mark.parametrize("off", [-0.004, 0.004], ids=["slow", "fast"])
def test_a_server_drifting_off_the_daw_is_nudged_back_and_no_note_is_skipped(off):
    """Closed loop for five minutes, a note every half beat: the server starts 0.4 % off the DAW's
    tempo (inside the 0.5 % the tempo is left alone) and takes every tempo the follower reports.
    Left alone it would drift 1.2 s, past its 0.5 s lookahead (slow: its notes skipped as late);
    the follower's nudges keep the headroom near where it started."""
    clock = {"now": 0.0}
    server = PacedServer(BPM * (1 + off), clock)
    scheduler = Scheduler()
    follower = ClockFollower(scheduler, lambda voice: voice, now=lambda: clock["now"], on_tempo=server.set_bpm)

    def send() -> float:
        """The server's next note, handed to the follower; its headroom."""
        beat = server.next_beat
        follower.play([{"beat": beat, "start": 0.0, "duration": 0.1, "pitch": 60, "velocity": 90, "voice": 0}], 0.0)
        server.next_beat += 0.5
        time_of = follower.tracker.time_of(beat)
        return None if time_of is None else time_of - clock["now"]

    def tick() -> None:
        follower.on_clock([CLOCK], clock["now"])
        clock["now"] += TICK

    for _ in range(30):  # the DAW's clock runs before the transport does
        tick()
    send(), send()  # the session's opening notes, held for the downbeat
    follower.on_clock([START], clock["now"])
    server.resume()
    server.set_bpm(BPM * (1 + off))  # the tempo the follower reported before the start, a little off
    headrooms = []
    for _ in range(int(300 / TICK)):
        while server.due():
            headroom = send()
            if headroom is not None:  # the DAW's first clock after the start has come
                headrooms.append(headroom)
        tick()
    assert follower.skipped == 0, f"{follower.skipped} notes skipped; headroom down to {min(headrooms):.3f} s"
    assert len(scheduler.notes) >= server.next_beat / 0.5 - 3  # every note but the last few sounded
    assert 0.3 < min(headrooms[100:]) and max(headrooms[100:]) < 0.7, (min(headrooms), max(headrooms))
