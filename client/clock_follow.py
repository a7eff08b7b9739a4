"""Playing a session on a DAW's transport (``--clock in``): :class:`ClockFollower`.

The server has no seek: a session only goes forward, beat after beat. So the follower maps the
session's beats onto the DAW's with an offset, ``DAW beat = session beat - offset``, a whole number
of bars (``bar_beats``, 4), chosen each time the transport starts:

1. Start (song position 0) or Continue (from the last Song Position Pointer, in sixteenths): at
   the first clock after it, the session's next note goes to the first DAW position at or after the
   transport's that lies the same distance past a bar line as the note does past the session's. So
   the session's bar lines fall on the DAW's (its beat 0 on the DAW's downbeat, after a Start) and
   every note keeps its beat and subdivision. Notes whose time has passed (more than
   :data:`LATE_SECONDS`) are skipped, never played late.
2. While it runs, each clock hands the scheduler the notes due before the clock after next, timed
   from the last clock at the tempo of the last beat's clocks; ``latency`` (seconds) sends them
   that much earlier (where the clock is already past that, as at the first clock after a start,
   at once).
3. Stop silences (a note-off for every sounding note, then CC 123 and CC 64 = 0 on every channel
   used) and holds every note not yet played; notes arriving while stopped are held too. The
   bridge pauses the session meanwhile (``on_transport``), so little arrives.
4. The tempo of the clock goes to ``on_tempo`` when it has moved more than :data:`TEMPO_CHANGE`
   from the last one reported, at most every :data:`TEMPO_INTERVAL_SECONDS` (the bridge sends it
   as ``set``).
5. The server paces its notes by its own timeline, a lookahead before their time there. A tempo a
   little off (the clock's estimate, the rounding of ``set``) would let the two timelines drift
   apart until notes came after their DAW time and were skipped. So the follower keeps the
   *headroom* of each notes frame (DAW time of its first note less its arrival), and when it falls
   (or rises) more than :data:`DRIFT_DEADBAND_SECONDS` from what it was after the start, it reports a
   tempo up to :data:`MAX_NUDGE` faster (or slower) than the clock's, closing the gap over about
   :data:`CATCH_UP_SECONDS`.

``play`` and ``silence`` run on the bridge's event loop, ``on_clock`` on its input thread; a lock
keeps them apart.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import math
import threading
import time
from typing import Callable

from client.midi_clock import ClockTracker

logger = logging.getLogger(__name__)

LATE_SECONDS = 0.01            # a note this late still plays (at once); later ones are skipped
HORIZON_TICKS = 2              # each clock schedules the notes due before the clock after next
TEMPO_CHANGE = 0.005           # report the tempo when it moved by more than this fraction...
TEMPO_INTERVAL_SECONDS = 0.25  # ...and at most this often
DRIFT_DEADBAND_SECONDS = 0.05  # headroom this far from its start leaves the tempo alone
CATCH_UP_SECONDS = 4.0         # a headroom gap is closed over about this long...
MAX_NUDGE = 0.02               # ...by a tempo at most 2 % off the clock's
HEADROOM_SMOOTHING = 0.2       # weight of each frame in the running headroom


class ClockFollower:
    """Holds a session's notes by beat and hands them to a :class:`~client.midi_bridge.MidiScheduler`
    at the times the DAW's clock gives them (see the module docstring)."""

    def __init__(self, scheduler, channel_of: Callable[[int], int], *, latency: float = 0.0,
                 bar_beats: int = 4, on_tempo: Callable[[float], None] = lambda bpm: None,
                 on_transport: Callable[[bool], None] = lambda running: None,
                 tracker: ClockTracker | None = None, now: Callable[[], float] = time.time) -> None:
        self.scheduler = scheduler
        self.channel_of = channel_of
        self.latency = latency
        self.bar_beats = bar_beats
        self.on_tempo = on_tempo
        self.on_transport = on_transport
        self.tracker = tracker or ClockTracker()
        self._now = now  # the unix time (a stand-in in tests)
        self._lock = threading.Lock()
        self._held: list[tuple[float, int, dict]] = []       # heap of (session beat, order, note)
        self._order = itertools.count()
        self._handed: list[tuple[float, float, int, dict]] = []  # (unix time, session beat, order, note)
        self.offset: float | None = None                      # session beat - DAW beat, while running
        self.skipped = 0
        self._tempo_reported: float | None = None
        self._tempo_at = -math.inf
        self._headroom_target: float | None = None            # the headroom after the transport started
        self._headroom: float | None = None                   # running (smoothed) headroom since

    # ---- from the server (event loop)
    def play(self, notes: list[dict], clock: float) -> None:
        with self._lock:
            for note in notes:
                heapq.heappush(self._held, (float(note["beat"]), next(self._order), note))
            now = self._now()
            if notes:
                self._measure_headroom(min(float(n["beat"]) for n in notes), now)
            self._hand_over(now)

    def silence(self) -> None:
        """Everything off now; notes not yet played wait for the transport (a dropped connection)."""
        with self._lock:
            self._hold_back(self._now())

    # ---- from the clock (input thread)
    def on_clock(self, message: list[int], at: float) -> None:
        with self._lock:
            event = self.tracker.feed(message, at)
            if event in ("start", "continue"):
                self.offset = None  # chosen at the first clock, when the start has a time
                self._headroom_target = self._headroom = None
                logger.info("transport %s at beat %g", event, self.tracker.start_beat)
                self.on_transport(True)
            elif event == "stop":
                self._hold_back(at)
                self.offset = None
                logger.info("transport stopped")
                self.on_transport(False)
            elif event == "tick":
                self._report_tempo(at)
                self._hand_over(at)

    # ---- inside the lock
    def _measure_headroom(self, beat: float, now: float) -> None:
        if self.offset is None or not self.tracker.anchored:
            return
        headroom = self.tracker.time_of(beat - self.offset) - now
        if self._headroom_target is None:
            self._headroom_target = self._headroom = headroom
        else:
            self._headroom += HEADROOM_SMOOTHING * (headroom - self._headroom)

    def nudge(self) -> float:
        """The fraction by which the tempo reported is off the clock's, to undo a drift (item 5)."""
        if self._headroom is None:
            return 0.0
        gap = self._headroom_target - self._headroom
        if abs(gap) <= DRIFT_DEADBAND_SECONDS:
            return 0.0
        return max(-MAX_NUDGE, min(MAX_NUDGE, gap / CATCH_UP_SECONDS))

    def _report_tempo(self, at: float) -> None:
        bpm = self.tracker.bpm
        if bpm is None or at - self._tempo_at < TEMPO_INTERVAL_SECONDS:
            return
        bpm *= 1 + self.nudge()
        if self._tempo_reported is None or abs(bpm / self._tempo_reported - 1) > TEMPO_CHANGE:
            self._tempo_reported, self._tempo_at = bpm, at
            self.on_tempo(bpm)

    def _choose_offset(self, session_beat: float, now: float) -> None:
        """The offset (whole bars) putting ``session_beat`` at the first DAW position from the
        transport's start (and from now, less the late margin) with the same place in its bar."""
        tracker = self.tracker
        earliest = max(tracker.start_beat, tracker.beat_at(now - LATE_SECONDS))
        bars = math.floor((session_beat - earliest) / self.bar_beats)
        self.offset = bars * self.bar_beats

    def _hand_over(self, now: float) -> None:
        tracker = self.tracker
        if not tracker.anchored or tracker.tick_seconds is None or not self._held:
            return
        if self.offset is None:
            self._choose_offset(self._held[0][0], now)
        horizon = now + HORIZON_TICKS * tracker.tick_seconds
        while self._held:
            beat, order, note = self._held[0]
            at = tracker.time_of(beat - self.offset) - self.latency
            if at > horizon:
                return
            heapq.heappop(self._held)
            if at + self.latency < now - LATE_SECONDS:  # early sending is owed, not the note itself
                self.skipped += 1
                logger.debug("skipped a note of beat %.3f, %.0f ms late", beat, (now - at) * 1000)
                continue
            self.scheduler.note(at, float(note["duration"]), self.channel_of(int(note.get("voice", 0))),
                                int(note["pitch"]), int(note["velocity"]))
            self._handed.append((at, beat, order, note))
        self._handed = [h for h in self._handed if h[0] >= now - 1.0]  # keep what may still be pending

    def _hold_back(self, now: float) -> None:
        """Silence, and take back the notes handed to the scheduler that have not sounded yet."""
        self.scheduler.all_notes_off()
        for at, beat, order, note in self._handed:
            if at > now:
                heapq.heappush(self._held, (beat, order, note))
        self._handed = []
