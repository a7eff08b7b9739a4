"""MIDI beat clock: following a DAW's (:class:`ClockTracker`) and leading one (:class:`ClockSender`).

The clock is 24 Timing Clock messages (0xF8) a quarter note. Start (0xFA) sets the song position
to 0, Continue (0xFB) goes on from the last Song Position Pointer (0xF2, in sixteenths, 6 clocks
each), Stop (0xFC) halts; the first clock after Start or Continue marks the position the transport
starts from. The tracker is pure logic, fed (message, arrival time) pairs, so it is tested without
a MIDI system; the bridge feeds it from its input thread.
"""

from __future__ import annotations

import statistics
import threading
import time
from collections import deque

CLOCK, START, CONTINUE, STOP, SONG_POSITION = 0xF8, 0xFA, 0xFB, 0xFC, 0xF2
CLOCKS_PER_BEAT = 24
CLOCKS_PER_SIXTEENTH = 6
TEMPO_WINDOW = 24          # the tempo is read from the last this many clock intervals (a beat)
MIN_INTERVALS = 6          # intervals needed before the tracker names a tempo
OUTLIER_SECONDS = 0.002   # a clock this far off the line may be an outlier (more than a JACK period)
MAX_TICK_SECONDS = 60.0 / (10 * CLOCKS_PER_BEAT)  # a longer gap (below 10 bpm) is a halt, not a tempo


def is_clock_message(message: list[int]) -> bool:
    """Whether ``message`` is one of the clock's messages (the rest of an input is notes)."""
    return bool(message) and message[0] in (CLOCK, START, CONTINUE, STOP, SONG_POSITION)


def _fit(points: list[tuple[int, float]]) -> tuple[float, float]:
    """Least squares ``time = intercept + slope * count`` through (count, time) points."""
    n = len(points)
    mean_count = sum(c for c, _ in points) / n
    mean_time = sum(t for _, t in points) / n
    slope = (sum((c - mean_count) * (t - mean_time) for c, t in points)
             / sum((c - mean_count) ** 2 for c, _ in points))
    return slope, mean_time - slope * mean_count


class ClockTracker:
    """A DAW's transport as its clock tells it: running or not, song position and tempo.

    The tempo and the clocks' times come from a least-squares line through the last beat's clocks
    (their count against their arrival): a MIDI system hands messages on once a period (JACK: every
    2.7 ms at 128 frames), so single intervals are quantised (a median of them would be off by
    several percent) and jittered, but the line through 25 of them is not. Positions are in clock
    ticks from the song's start (24 a beat). ``feed`` returns what happened:
    ``"start"``, ``"continue"``, ``"stop"``, ``"position"`` (a Song Position Pointer), ``"tick"``, or
    ``None`` for a message it does not know. After Start or Continue the transport counts as
    :attr:`anchored` from its first clock on, when the tick's time is known.
    """

    def __init__(self, window: int = TEMPO_WINDOW) -> None:
        self.running = False
        self.next_tick = 0                    # the position the next clock marks
        self.last_tick: int | None = None     # the position of the last clock since (re)starting
        self.last_time = 0.0                  # and when it came
        self.start_tick = 0                   # the position the transport last started from
        self._clocks: deque[tuple[int, float]] = deque(maxlen=window + 1)  # (clock count, arrival)
        self._count = 0

    def feed(self, message: list[int], at: float) -> str | None:
        status = message[0] if message else None
        if status == CLOCK:
            if self._clocks and not 0 < at - self._clocks[-1][1] <= MAX_TICK_SECONDS:
                self._after_halt(at)
            self._count += 1
            self._clocks.append((self._count, at))
            if self.running:
                self.last_tick, self.last_time = self.next_tick, at
                self.next_tick += 1
            return "tick"
        if status == START:
            self._begin(0)
            return "start"
        if status == CONTINUE:
            self._begin(self.next_tick)
            return "continue"
        if status == STOP:
            self.running = False
            self.last_tick = None
            return "stop"
        if status == SONG_POSITION and len(message) == 3:
            if not self.running:  # the spec allows it only while stopped
                self.next_tick = (message[1] | message[2] << 7) * CLOCKS_PER_SIXTEENTH
            return "position"
        return None

    def _after_halt(self, at: float) -> None:
        """The clock stopped for a while (DAWs that send it only while playing): the clocks before the
        halt keep their tempo, moved to end one clock before this one."""
        line = self._line()
        if line is None:
            self._clocks.clear()
            return
        tick, last_time = line
        shift = at - tick - last_time
        self._clocks = deque(((c, t + shift) for c, t in self._clocks), maxlen=self._clocks.maxlen)

    def _begin(self, tick: int) -> None:
        self.running = True
        self.next_tick = self.start_tick = tick
        self.last_tick = None

    @property
    def anchored(self) -> bool:
        """Running, and its first clock since starting has come (so beats have times)."""
        return self.running and self.last_tick is not None

    def _line(self) -> tuple[float, float] | None:
        """(seconds a clock, the fitted time of the last clock), or None with too few clocks. Clocks
        far off the first line (a busy machine woke the MIDI thread late) are left out of a second."""
        if len(self._clocks) <= MIN_INTERVALS:
            return None
        points = list(self._clocks)
        slope, intercept = _fit(points)
        residuals = [abs(t - intercept - slope * c) for c, t in points]
        limit = max(OUTLIER_SECONDS, 3 * statistics.median(residuals))
        kept = [p for p, r in zip(points, residuals) if r <= limit]
        if len(kept) > MIN_INTERVALS and len(kept) < len(points):
            slope, intercept = _fit(kept)
        return slope, intercept + slope * points[-1][0]

    @property
    def tick_seconds(self) -> float | None:
        line = self._line()
        return None if line is None else line[0]

    @property
    def bpm(self) -> float | None:
        """The tempo of the last beat's clocks, in beats a minute."""
        tick = self.tick_seconds
        return None if tick is None else 60.0 / (CLOCKS_PER_BEAT * tick)

    @property
    def start_beat(self) -> float:
        return self.start_tick / CLOCKS_PER_BEAT

    def time_of(self, beat: float) -> float | None:
        """When the DAW reaches ``beat`` (from the last clock at the current tempo), if anchored."""
        line = self._line()
        if not self.anchored or line is None:
            return None
        tick, last_time = line
        return last_time + (beat * CLOCKS_PER_BEAT - self.last_tick) * tick

    def beat_at(self, at: float) -> float | None:
        """The DAW's position at unix time ``at``, if anchored."""
        line = self._line()
        if not self.anchored or line is None:
            return None
        tick, last_time = line
        return (self.last_tick + (at - last_time) / tick) / CLOCKS_PER_BEAT


class ClockSender:
    """Sends the session's tempo as MIDI clock (``--clock out``), from one thread.

    :meth:`follow` gives it the session's timeline (a beat, its unix time, the tempo), again at
    every change. The first time, it picks the first bar line (a multiple of ``bar_beats``) still
    ahead as the DAW's song start, sends Start just before it and then a clock every 1/24 beat,
    each at its unix time on the latest timeline; :meth:`close` sends Stop. If the timeline moves
    later (a pause, a reconnection) the clock waits for it, so the DAW's grid stays on the session's.
    """

    SPIN_SECONDS = 0.001

    def __init__(self, send, bar_beats: int = 4) -> None:
        self._send = send
        self._bar_beats = bar_beats
        self._cv = threading.Condition()
        self._timeline: tuple[float, float, float] | None = None   # (beat, unix time, bpm)
        self._first_beat: float | None = None
        self._tick = 0
        self._closed = False
        self.ticks_sent = 0
        self._thread = threading.Thread(target=self._run, name="midi-clock-out", daemon=True)
        self._thread.start()

    def follow(self, beat: float, at: float, bpm: float) -> None:
        with self._cv:
            self._timeline = (beat, at, bpm)
            if self._first_beat is None:
                ahead = beat + (time.time() - at) * bpm / 60.0  # the session's position now
                bars = -(-max(ahead, 0.0) // self._bar_beats)
                self._first_beat = bars * self._bar_beats
            self._cv.notify()

    def _due(self) -> float | None:
        """Unix time of the next clock, or None before the first timeline."""
        if self._timeline is None:
            return None
        beat, at, bpm = self._timeline
        return at + (self._first_beat + self._tick / CLOCKS_PER_BEAT - beat) * 60.0 / bpm

    def _run(self) -> None:
        with self._cv:
            while not self._closed:
                due = self._due()
                if due is None:
                    self._cv.wait()
                    continue
                wait = due - time.time()
                if wait > self.SPIN_SECONDS:
                    self._cv.wait(min(wait - self.SPIN_SECONDS, 0.05))
                    continue
                while time.time() < due:
                    pass
                if self._tick == 0:
                    self._send([START])
                self._send([CLOCK])
                self._tick += 1
                self.ticks_sent += 1

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify()
        self._thread.join(timeout=2)
        if self.ticks_sent:
            self._send([STOP])
