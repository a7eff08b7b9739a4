"""Play an FM Server stream into a DAW through a virtual MIDI port: ``python -m client.midi_bridge``.

The bridge is one WebSocket client of ``/ws`` (see ``server/protocol.py``) and one MIDI output:

1. It opens a virtual output port (``--port-name``, default "FM Server") on JACK, ALSA or CoreMIDI
   (``--api``; on Windows, where rtmidi cannot make virtual ports, an existing loopMIDI port of
   that name), or the existing port ``--output PORT``, and with ``--input PORT`` a MIDI input.
2. It connects to ``--url`` and sends ``start`` with the settings given on the command line and
   an optional ``--prompt_midi`` file.
3. The server answers ``session`` (``clock``: the unix time of session time 0, and a resume
   token) and then ``notes``; each note is handed to :class:`MidiScheduler`, which sends its
   note-on at ``clock + start`` (less ``--latency-ms``) and its note-off ``duration`` later, from
   one thread that sleeps until just before each deadline and spins the last millisecond. Voice v
   plays on its own channel (:mod:`client.midi_channels`: channels 1-9, 11-16, leaving the drum
   channel free), after its ``--programs`` program change.
   With ``--clock in`` a :class:`~client.clock_follow.ClockFollower` places the notes on the DAW's
   clock instead and follows its transport (``pause``/``resume``) and tempo (``set``); with
   ``--clock out`` a :class:`~client.midi_clock.ClockSender` sends MIDI clock at the session's tempo.
4. Notes played on the input are sent to the session as ``notes`` (``start`` on the session
   clock) when they are released.
5. If the connection drops, every sounding note is turned off and the bridge reconnects with
   ``{"type":"start","resume_token":...,"last_beat":...}`` for as long as the server keeps the
   session (60 s); ``last_beat``, the highest beat received, tells the server (perhaps another
   replica, from an older snapshot) to send nothing at or before it again. A session that comes
   back on another checkpoint (``reread``: a rolling restart onto a new model) is logged.
6. Ctrl-C (or SIGTERM) sends ``stop``, waits briefly for ``stopped``, turns every note off (then
   All Notes Off and sustain off on every channel used; an exception takes the same ``finally``)
   and closes the ports. A SIGKILL cannot be caught.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import heapq
import itertools
import json
import logging
import os
import signal
import statistics
import sys
import threading
import time
from collections import Counter
from pathlib import Path

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake

from client.clock_follow import TEMPO_CHANGE, ClockFollower
from client.midi_channels import GM_DRUM_CHANNEL, ChannelMap, parse_programs, program_change, silence
from client.midi_clock import ClockSender, is_clock_message
from server.protocol import MAX_BPM, MAX_PLAYED_NOTES, MIN_BPM, Accompany, Settings

logger = logging.getLogger(__name__)

NOTE_OFF, NOTE_ON = 0x80, 0x90
RESUME_SECONDS = 60.0          # how long the server keeps a dropped session
BACKOFF_SECONDS = (0.25, 0.5, 1.0, 2.0, 3.0, 5.0)
STOP_WAIT_SECONDS = 2.0
EARLY_SECONDS = 2.0            # played notes this long before session time 0 still go in, at 0
APIS = ("auto", "jack", "alsa", "coremidi", "winmm")
CLOCK_MODES = ("off", "in", "out")


class PortNotFound(LookupError):
    """A MIDI port named on the command line does not exist (exit status 2)."""


# ----------------------------------------------------------------------------- MIDI ports
def _rtmidi():
    import rtmidi  # imported late so that --help works without the native library

    return rtmidi


def api_candidates(name: str) -> list[int]:
    """rtmidi API constants to try for ``--api NAME``, best first."""
    rtmidi = _rtmidi()
    named = {"jack": rtmidi.API_UNIX_JACK, "alsa": rtmidi.API_LINUX_ALSA, "coremidi": rtmidi.API_MACOSX_CORE,
             "winmm": rtmidi.API_WINDOWS_MM}
    if name != "auto":
        return [named[name]]
    compiled = rtmidi.get_compiled_api()
    # JACK first where a JACK server runs (it is what a Linux studio routes through), then ALSA.
    order = [rtmidi.API_UNIX_JACK, rtmidi.API_LINUX_ALSA, rtmidi.API_MACOSX_CORE, rtmidi.API_WINDOWS_MM]
    return [api for api in order if api in compiled]


def open_output(api_name: str, port_name: str, existing: str | None = None):
    """Opens the output the DAW records from; returns (MidiOut, API name, description).

    With ``existing`` it opens that port (an IAC bus, a loopMIDI port, a synth) instead of making one.
    """
    rtmidi = _rtmidi()
    # Never let libjack start a JACK server of its own with whatever backend it finds.
    os.environ.setdefault("JACK_NO_START_SERVER", "1")
    errors = []
    for api in api_candidates(api_name):
        label = rtmidi.get_api_name(api)
        try:
            out = rtmidi.MidiOut(api, port_name)
        except (rtmidi.SystemError, RuntimeError) as exc:  # no JACK server, no ALSA sequencer, ...
            errors.append(f"{label}: {exc}")
            continue
        if existing is not None:
            index = find_port(out.get_ports(), existing)
            if index is None:
                errors.append(f"{label}: no output matches '{existing}' (outputs: {out.get_ports() or 'none'})")
                del out
                continue
            out.open_port(index)
            return out, label, f"port '{out.get_ports()[index]}'"
        try:
            out.open_virtual_port(port_name)
            return out, label, f"virtual port '{port_name}'"
        except NotImplementedError:
            # Windows MM cannot create ports: use one made by loopMIDI (or a similar driver).
            index = find_port(out.get_ports(), port_name)
            if index is None:
                errors.append(f"{label}: cannot create virtual ports; create a port named '{port_name}' with "
                              f"loopMIDI first (ports now: {out.get_ports() or 'none'})")
                del out
                continue
            out.open_port(index)
            return out, label, f"port '{out.get_ports()[index]}'"
        except (rtmidi.SystemError, RuntimeError) as exc:
            errors.append(f"{label}: {exc}")
            del out
    raise SystemExit("cannot open a MIDI output:\n  " + "\n  ".join(errors or ["no MIDI API compiled in"]))


def find_port(ports: list[str], name: str) -> int | None:
    """Index of the port called ``name``: exact match first, then a case-insensitive substring."""
    if name in ports:
        return ports.index(name)
    matches = [i for i, port in enumerate(ports) if name.lower() in port.lower()]
    return matches[0] if matches else None


def open_input(api_label: str, port_name: str, client_name: str, clock: bool = False):
    """Opens the input matching ``port_name``; with ``clock`` it keeps the timing messages (MIDI
    clock, Start, Continue, Stop, Song Position), which rtmidi drops by default. Raises
    :class:`PortNotFound`."""
    rtmidi = _rtmidi()
    api = {rtmidi.get_api_name(a): a for a in rtmidi.get_compiled_api()}[api_label]
    inp = rtmidi.MidiIn(api, client_name)
    ports = inp.get_ports()
    index = find_port(ports, port_name)
    if index is None:
        raise PortNotFound(f"no MIDI input matches '{port_name}'; inputs: {', '.join(ports) or 'none'}")
    inp.open_port(index)
    inp.ignore_types(sysex=True, timing=not clock, active_sense=True)
    return inp, ports[index]


# ----------------------------------------------------------------------------- the scheduler
def _realtime_priority() -> None:
    """Asks for real-time scheduling for the calling thread, as JACK does for its own (best effort)."""
    if not hasattr(os, "sched_setscheduler"):
        return
    try:
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(10))
        logger.debug("scheduler thread runs with real-time priority")
    except OSError as exc:  # not permitted (no rtprio limit for this user): plain priority still works
        logger.debug("no real-time priority for the scheduler thread: %s", exc)


class MidiScheduler:
    """Sends note-ons and note-offs at unix times, from one thread.

    The thread waits on a condition until ``SPIN_SECONDS`` before the earliest deadline (a new,
    earlier note wakes it), then spins to the deadline and sends everything due. A key struck again
    while it sounds is released and struck again, and only the last of its note-offs is sent, so
    overlapping notes of one pitch never cut each other short. ``programs`` (channel -> program)
    go out once each, just before their channel's first note. :meth:`all_notes_off` drops what is
    pending and silences what sounds (:func:`client.midi_channels.silence`).
    """

    SPIN_SECONDS = 0.001

    def __init__(self, send, programs: dict[int, int] | None = None) -> None:
        self._send = send                      # callable taking a list of MIDI bytes
        self._programs = dict(programs or {})  # not sent yet
        self._heap: list[tuple[float, int, int, int, int, int]] = []
        self._order = itertools.count()
        self._cv = threading.Condition()
        self._sounding: Counter[tuple[int, int]] = Counter()
        self._channels: set[int] = set()
        self._closed = False
        self.sent_notes = 0
        self.lateness: list[float] = []        # seconds each note-on left after its deadline
        self.sync_clock()
        self._thread = threading.Thread(target=self._run, name="midi-scheduler", daemon=True)
        self._thread.start()

    def sync_clock(self) -> None:
        """Re-reads the offset between the wall clock (the session's) and the monotonic clock."""
        self._offset = time.time() - time.perf_counter()

    def note(self, at: float, duration: float, channel: int, pitch: int, velocity: int) -> None:
        """Plays ``pitch`` from unix time ``at`` for ``duration`` seconds."""
        on = at - self._offset
        with self._cv:
            if self._closed:
                return
            # At one instant note-offs go before note-ons, so a repeated note is re-struck.
            heapq.heappush(self._heap, (on, 1, next(self._order), channel, pitch, velocity))
            heapq.heappush(self._heap, (on + max(duration, 0.001), 0, next(self._order), channel, pitch, 0))
            self._cv.notify()  # the thread re-reads the earliest deadline

    def pending(self) -> int:
        with self._cv:
            return len(self._heap)

    def all_notes_off(self) -> None:
        """Drops every pending event and sends a note-off for every sounding note."""
        with self._cv:
            self._heap.clear()
            self._silence()
            self._cv.notify()

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._heap.clear()
            self._silence()
            self._cv.notify()
        self._thread.join(timeout=2)

    def _silence(self) -> None:
        for message in silence([key for key, count in self._sounding.items() if count], self._channels):
            self._send(message)
        self._sounding.clear()
        self._channels.clear()

    def _run(self) -> None:
        _realtime_priority()
        with self._cv:
            while not self._closed:
                if not self._heap:
                    self._cv.wait()
                    continue
                deadline = self._heap[0][0]
                wait = deadline - time.perf_counter()
                if wait > self.SPIN_SECONDS:
                    self._cv.wait(wait - self.SPIN_SECONDS)
                    continue
                self._cv.release()
                try:
                    while time.perf_counter() < deadline:
                        pass
                finally:
                    self._cv.acquire()
                now = time.perf_counter()
                while self._heap and self._heap[0][0] <= now:
                    self._emit(heapq.heappop(self._heap), now)

    def _emit(self, event: tuple[float, int, int, int, int, int], now: float) -> None:
        deadline, is_on, _, channel, pitch, velocity = event
        key = (channel, pitch)
        if is_on:
            if self._sounding[key]:
                self._send([NOTE_OFF | channel, pitch, 0])
            if channel in self._programs:
                self._send(program_change(channel, self._programs.pop(channel)))
            self._sounding[key] += 1
            self._channels.add(channel)
            self._send([NOTE_ON | channel, pitch, velocity])
            self.sent_notes += 1
            self.lateness.append(time.perf_counter() - deadline)
        elif self._sounding[key]:
            self._sounding[key] -= 1
            if not self._sounding[key]:
                self._send([NOTE_OFF | channel, pitch, 0])


class InputReader:
    """Polls a MIDI input from a thread and hands each message with its arrival time to ``handle``.

    Polling (every half millisecond) rather than rtmidi's callback keeps Python, and its GIL, out
    of the MIDI system's own thread (JACK's process cycle). The arrival time is the MIDI system's
    own (the sum of rtmidi's deltas, taken when the message came in) placed on the wall clock by
    the smallest delay seen between it and the poll, so a late poll does not make a clock tick late.
    """

    POLL_SECONDS = 0.0005

    def __init__(self, midi_in, handle) -> None:
        self._in = midi_in
        self._handle = handle
        self._running = True
        self._thread = threading.Thread(target=self._run, name="midi-input", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        midi_time, anchor = 0.0, None
        while self._running:
            item = self._in.get_message()
            if item is None:
                time.sleep(self.POLL_SECONDS)
                continue
            message, delta = item
            midi_time += delta
            polled = time.time() - midi_time
            anchor = polled if anchor is None else min(anchor, polled)
            self._handle(message, anchor + midi_time)

    def close(self) -> None:
        self._running = False
        self._thread.join(timeout=2)
        self._in.close_port()


# ----------------------------------------------------------------------------- the players
class DirectPlayer:
    """Plays each note at the session's time for it (``clock + start``), ``latency`` seconds early."""

    def __init__(self, scheduler: MidiScheduler, channel_of, latency: float = 0.0) -> None:
        self.scheduler = scheduler
        self.channel_of = channel_of
        self.latency = latency

    def play(self, notes: list[dict], clock: float) -> None:
        for n in notes:
            self.scheduler.note(clock + float(n["start"]) - self.latency, float(n["duration"]),
                                self.channel_of(int(n.get("voice", 0))), int(n["pitch"]), int(n["velocity"]))

    def silence(self) -> None:
        self.scheduler.all_notes_off()


# ----------------------------------------------------------------------------- the bridge
class Bridge:
    """The WebSocket side: one session, resumed across dropped connections.

    ``player`` turns the server's notes into MIDI (a :class:`DirectPlayer`, or a
    :class:`~client.clock_follow.ClockFollower` with ``--clock in``, whose transport and tempo the
    bridge passes on as ``pause``/``resume`` and ``set``); ``clock_out`` (``--clock out``) is told
    the session's timeline.
    """

    def __init__(self, url: str, start: dict, player, api_key: str = "",
                 clock_out: ClockSender | None = None) -> None:
        self.url = url
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.start = start
        self.player = player
        self.clock_out = clock_out
        self.following = isinstance(player, ClockFollower)
        self.bpm: float | None = None  # the tempo in force (the last state reply)
        self.ws: ClientConnection | None = None
        self.clock: float | None = None
        self.token: str | None = None
        self.last_beat: float | None = None  # the highest beat of the session's notes received (a resume's last_beat)
        self.live = False
        self.stopping = False
        self.stopped = False
        self.received = 0
        self.played_sent = 0
        self._held: dict[tuple[int, int], tuple[float, int]] = {}
        self._unsent: list[dict] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake = asyncio.Event()
        self._went_live = False
        self._pause_at_notes = False  # a new session waiting for its opening notes to pause (--clock in)
        self.lookahead = 0.0

    async def run(self) -> int:
        """Runs until stopped; returns the exit status."""
        self._loop = asyncio.get_running_loop()
        attempt, lost_at = 0, None
        while not self.stopping:
            first = self._resume_message() if self.token else {"type": "start", **self.start}
            if self.following and not self.token and self.player.tracker.bpm is not None:
                first["bpm"] = self._usable(self.player.tracker.bpm)  # the DAW's tempo from the first note
            self._went_live = False
            try:
                async with connect(self.url, open_timeout=10, max_size=1 << 22,
                                   additional_headers=self.headers) as ws:
                    self.ws = ws
                    if self.stopping:
                        break
                    await ws.send(json.dumps(first))
                    await self._receive(ws)
            except ConnectionClosed as exc:
                code = exc.rcvd.code if exc.rcvd else None
                if code == 1013:
                    logger.error("the server is full (close code 1013); try again later")
                    return 3
                if code == 1008:
                    logger.error("the server refused this client (%s): check --api-key", exc.rcvd.reason)
                    return 4
                if not (self.stopped or self.stopping):
                    logger.warning("connection lost (%s)", exc)
            except (OSError, InvalidHandshake, TimeoutError) as exc:
                logger.warning("cannot connect to %s: %s", self.url, exc)
            finally:
                self.ws = None
                self.live = False
                self.player.silence()  # nothing may hang while we are away
            if self.stopped or self.stopping:
                break
            if self._went_live:
                attempt, lost_at = 0, None
            lost_at = lost_at or time.monotonic()
            if time.monotonic() - lost_at > RESUME_SECONDS:
                logger.error("gave up after %.0f s without a connection", RESUME_SECONDS)
                return 1
            delay = BACKOFF_SECONDS[min(attempt, len(BACKOFF_SECONDS) - 1)]
            attempt += 1
            logger.info("reconnecting in %.2f s%s", delay, " with the resume token" if self.token else "")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), delay)
        return 0

    async def _receive(self, ws: ClientConnection) -> None:
        async for raw in ws:
            try:
                msg = json.loads(raw)
                kind = msg["type"]
            except (ValueError, KeyError, TypeError):
                logger.warning("ignoring a frame that is not a protocol message: %.80r", raw)
                continue
            if kind == "session":
                self.clock = float(msg["clock"])
                self.token = msg["resume_token"]
                self.live = self._went_live = True
                self.player.scheduler.sync_clock()
                logger.info("%s session %s (lookahead %.2f s)", "resumed" if msg.get("resumed") else "started",
                            msg["id"], msg.get("lookahead", 0))
                if msg.get("reread"):
                    logger.info("session %s continued on a new model (another checkpoint read its last notes "
                                "again: the same place, perhaps another character)", msg["id"])
                # The session runs while the DAW's transport does; a new one first sends its opening
                # lookahead of notes (held for the DAW's downbeat, so the next ones come that much
                # ahead of their DAW time), then pauses.
                self.lookahead = float(msg.get("lookahead", 0))
                self._pause_at_notes = self.following and not msg.get("resumed") and not self.player.tracker.running
                if self.following and not self._pause_at_notes:
                    await self._send({"type": "resume" if self.player.tracker.running else "pause"})
                await self._flush_played()
            elif kind == "state":
                logger.info("%s: %s", msg.get("state"),
                            ", ".join(f"{k}={v}" for k, v in msg.items() if k not in ("type", "state")))
                self.bpm = float(msg["bpm"])
                if self.clock_out is not None and self.received == 0:
                    self.clock_out.follow(0.0, self.clock, self.bpm)  # a new session's beat 0 is at its clock
                daw_bpm = self.player.tracker.bpm if self.following else None
                if daw_bpm is not None and abs(self._usable(daw_bpm) / self.bpm - 1) > TEMPO_CHANGE:
                    await self._send({"type": "set", "bpm": self._usable(daw_bpm)})
            elif kind == "notes":
                self._schedule(msg["notes"])
                opened = (max(float(n["start"]) for n in msg["notes"]) >= self.lookahead
                          or time.time() >= self.clock + self.lookahead) if msg["notes"] else False
                if self._pause_at_notes and opened:
                    self._pause_at_notes = False
                    if not self.player.tracker.running:
                        await self._send({"type": "pause"})
            elif kind == "error":
                logger.warning("server error %s: %s", msg.get("code"), msg.get("message"))
                if msg.get("code") == "unknown_resume_token":
                    # The session is gone (expired or never known): begin a new one.
                    self.token = self.last_beat = None
                    await ws.close()
            elif kind == "stopped":
                self.stopped = True
                logger.info("stopped after %s notes", msg.get("notes_sent"))

    def _resume_message(self) -> dict:
        """The ``start`` that continues the session after a drop."""
        message = {"type": "start", "resume_token": self.token}
        if self.last_beat is not None:
            message["last_beat"] = self.last_beat
        return message

    def _schedule(self, notes: list[dict]) -> None:
        for n in notes:
            beat = float(n["beat"])
            if self.last_beat is None or beat > self.last_beat:
                self.last_beat = beat
        self.player.play(notes, self.clock)
        if self.clock_out is not None and notes and self.bpm is not None:
            last = notes[-1]
            self.clock_out.follow(float(last["beat"]), self.clock + float(last["start"]), self.bpm)
        self.received += len(notes)

    async def _send(self, message: dict) -> None:
        if self.ws is not None and self.live:
            with contextlib.suppress(ConnectionClosed):
                await self.ws.send(json.dumps(message))

    @staticmethod
    def _usable(bpm: float) -> float:
        return round(min(MAX_BPM, max(MIN_BPM, bpm)), 2)

    # ---- the DAW's transport (from the MIDI input thread, with --clock in)
    def on_transport(self, running: bool) -> None:
        if self._loop is not None:
            message = {"type": "resume" if running else "pause"}
            self._loop.call_soon_threadsafe(lambda: asyncio.ensure_future(self._send(message)))

    def on_tempo(self, bpm: float) -> None:
        if self._loop is not None:
            message = {"type": "set", "bpm": self._usable(bpm)}
            self._loop.call_soon_threadsafe(lambda: asyncio.ensure_future(self._send(message)))

    async def stop(self) -> None:
        """Asks the server to stop; closes the connection if it does not answer in time."""
        if self.stopping:
            return
        self.stopping = True
        self._wake.set()
        ws = self.ws
        if ws is None:
            return
        with contextlib.suppress(ConnectionClosed):
            if self.live:
                await ws.send(json.dumps({"type": "stop"}))
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(ws.wait_closed(), STOP_WAIT_SECONDS)
            await ws.close()

    # ---- played notes (from the MIDI input thread)
    def on_midi(self, message: list[int], stamp: float) -> None:
        if self._loop is not None and len(message) == 3:
            self._loop.call_soon_threadsafe(self._played, message, stamp)

    def _played(self, message: list[int], stamp: float) -> None:
        status, pitch, velocity = message
        kind, channel = status & 0xF0, status & 0x0F
        key = (channel, pitch)
        if kind == NOTE_ON and velocity > 0:
            self._held[key] = (stamp, velocity)
        elif kind in (NOTE_OFF, NOTE_ON) and key in self._held:
            began, velocity = self._held.pop(key)
            self._unsent.append({"began": began, "pitch": pitch, "velocity": velocity,
                                 "duration": min(60.0, max(0.01, stamp - began)), "voice": channel})
            asyncio.ensure_future(self._flush_played())

    async def _flush_played(self) -> None:
        if not self.live or not self._unsent or self.ws is None:
            return
        notes = []
        for n in self._unsent:
            start = n["began"] - self.clock
            if start < -EARLY_SECONDS:  # long before the session began: nothing to fold it into
                logger.debug("dropping a note played %.1f s before the session began", -start)
                continue
            # The session clock starts a lookahead after "session": a note played in between opens it.
            notes.append({"pitch": n["pitch"], "velocity": n["velocity"], "start": round(max(0.0, start), 4),
                          "duration": round(n["duration"], 4), "voice": n["voice"]})
        self._unsent = []
        for i in range(0, len(notes), MAX_PLAYED_NOTES):
            with contextlib.suppress(ConnectionClosed):
                await self.ws.send(json.dumps({"type": "notes", "notes": notes[i:i + MAX_PLAYED_NOTES]}))
                self.played_sent += len(notes[i:i + MAX_PLAYED_NOTES])


# ----------------------------------------------------------------------------- command line
class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows defaults, except for options that are simply off unless given."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default is None or action.default is False:
            return action.help or ""
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m client.midi_bridge",
                                     description="Play an FM Server stream into a DAW through a virtual MIDI port.",
                                     formatter_class=_HelpFormatter)
    parser.add_argument("--url", default="ws://127.0.0.1:8000/ws", help="the server's WebSocket address")
    parser.add_argument("--api-key", default=os.environ.get("FM_API_KEY", ""),
                        help="the server's API key, if it has one (default: $FM_API_KEY)")
    parser.add_argument("--port-name", default="FM Server",
                        help="name of the virtual output port (on Windows: of the loopMIDI port to open)")
    parser.add_argument("--api", choices=APIS, default="auto",
                        help="MIDI system: auto picks JACK when a JACK server runs, else ALSA (Linux), "
                             "CoreMIDI (macOS) or Windows MM")
    parser.add_argument("--output", metavar="PORT", default=None,
                        help="play into this existing output port (an IAC bus, a loopMIDI port, a synth; exact "
                             "name or a part of it) instead of creating a virtual port")
    parser.add_argument("--input", metavar="PORT", default=None,
                        help="forward notes played on this MIDI input (exact name or a part of it) to the session")
    parser.add_argument("--channel", type=int, choices=range(1, 17), metavar="1-16", default=None,
                        help="send every voice on this one channel (default: a channel per voice, see "
                             "--drums-channel)")
    parser.add_argument("--drums-channel", type=_channel_or_none, metavar="1-16|none", default=GM_DRUM_CHANNEL,
                        help="the channel the voices leave free (General MIDI plays drums on 10): voices 0-8 "
                             "take channels 1-9 and voices 9-14 channels 11-16; 'none' gives voice n channel n+1")
    parser.add_argument("--programs", type=_programs, metavar="P,P,...", default=None,
                        help="a General MIDI program 0-127 per voice, in voice order ('-' or empty: leave that "
                             "voice alone), sent in start and as a program change before each channel's first note")
    parser.add_argument("--clock", choices=CLOCK_MODES, default="off",
                        help="'in': follow the MIDI clock and transport (Start, Stop, Continue, Song Position) of "
                             "--clock-port; 'out': send MIDI clock, Start and Stop at the session's tempo on the "
                             "output port")
    parser.add_argument("--clock-port", metavar="PORT", default=None,
                        help="the input the DAW sends its clock to (default: --input)")
    parser.add_argument("--latency-ms", type=float, default=0.0,
                        help="send notes this many milliseconds early (negative: late), to make up for latency "
                             "after the port")
    parser.add_argument("--list-ports", action="store_true", help="list the MIDI inputs and outputs and exit")
    parser.add_argument("--accompany", type=_voices, metavar="V,V,...", default=None,
                        help="the voices you play (0-15, comma-separated); the model plays the others. Your notes go "
                             "in as the first of them")
    parser.add_argument("--lookahead", type=float, default=None,
                        help="the session's lookahead in seconds (0.05-30; a bridge on the server's machine can take "
                             "0.05); default the server's")
    parser.add_argument("--prompt_midi", "--prompt-midi", metavar="FILE", type=Path, default=None,
                        help="a .mid file the session continues")
    start = parser.add_argument_group("start parameters (omitted ones take the server's defaults)")
    for name, field in Settings.model_fields.items():
        kind = int if field.annotation == (int | None) else float
        flags = [f"--{name}"] + ([f"--{name.replace('_', '-')}"] if "_" in name else [])
        start.add_argument(*flags, dest=name, type=kind, default=None, help=field.description)
    parser.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"),
                        help="logging level")
    return parser


def _channel_or_none(text: str) -> int | None:
    if text.lower() == "none":
        return None
    if text.isdigit() and 1 <= int(text) <= 16:
        return int(text)
    raise argparse.ArgumentTypeError(f"{text!r} is not a channel 1-16 or 'none'")


def _programs(text: str) -> list[int | None]:
    try:
        return parse_programs(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _voices(text: str) -> list[int]:
    try:
        return Accompany(voices=[int(v) for v in text.split(",") if v.strip()]).voices
    except ValueError as exc:  # a pydantic ValidationError too
        raise argparse.ArgumentTypeError(f"{text!r}: voices 0-15, comma-separated, unique, at most 15 ({exc})") from None


def start_message(args: argparse.Namespace) -> dict:
    """The ``start`` fields from the command line, checked against the protocol's ``Settings``."""
    settings = {name: getattr(args, name) for name in Settings.model_fields if getattr(args, name) is not None}
    Settings.model_validate(settings)
    if args.programs is not None:
        settings["programs"] = args.programs
    if args.accompany is not None:
        settings["accompany"] = {"voices": args.accompany}
    if args.lookahead is not None:
        settings["lookahead"] = args.lookahead
    if args.prompt_midi is not None:
        settings["prompt_midi"] = base64.b64encode(args.prompt_midi.read_bytes()).decode("ascii")
    return settings


def list_ports(api_name: str) -> None:
    rtmidi = _rtmidi()
    os.environ.setdefault("JACK_NO_START_SERVER", "1")
    for api in api_candidates(api_name):
        label = rtmidi.get_api_name(api)
        try:
            ins, outs = rtmidi.MidiIn(api).get_ports(), rtmidi.MidiOut(api).get_ports()
        except (rtmidi.SystemError, RuntimeError) as exc:
            print(f"{label}: unavailable ({exc})")
            continue
        print(f"{label} inputs:  {', '.join(ins) or 'none'}")
        print(f"{label} outputs: {', '.join(outs) or 'none'}")


def summary(scheduler: MidiScheduler) -> str:
    late = sorted(scheduler.lateness)
    if not late:
        return "no notes played"
    p50 = statistics.median(late) * 1000
    p99 = late[min(len(late) - 1, int(0.99 * len(late)))] * 1000
    return f"{scheduler.sent_notes} notes; note-on sent after its time by p50 {p50:.2f} ms, p99 {p99:.2f} ms"


class _LockedSend:
    """One MIDI output written from several threads (the scheduler, the clock sender)."""

    def __init__(self, send) -> None:
        self._send = send
        self._lock = threading.Lock()

    def __call__(self, message: list[int]) -> None:
        with self._lock:
            self._send(message)


def _open_inputs(args: argparse.Namespace, api_label: str, bridge: Bridge) -> list[InputReader]:
    """The ``--input`` (played notes) and ``--clock-port`` readers; one reader when they are one port."""
    clock_port = args.clock_port or args.input if args.clock == "in" else None
    if args.clock == "in" and clock_port is None:
        raise PortNotFound("--clock in needs --clock-port PORT (or --input PORT): the input the DAW sends "
                           "its MIDI clock to")
    readers = []
    follower = bridge.player if bridge.following else None

    def both(message: list[int], stamp: float) -> None:
        if is_clock_message(message):
            follower.on_clock(message, stamp)
        else:
            bridge.on_midi(message, stamp)

    if args.input:
        shared = clock_port == args.input
        inp, name = open_input(api_label, args.input, f"{args.port_name} input", clock=shared)
        readers.append(InputReader(inp, both if shared else bridge.on_midi))
        logger.info("MIDI input: %s%s", name, " (and its clock)" if shared else "")
    if clock_port is not None and clock_port != args.input:
        inp, name = open_input(api_label, clock_port, f"{args.port_name} clock", clock=True)
        readers.append(InputReader(inp, follower.on_clock))
        logger.info("MIDI clock input: %s", name)
    return readers


async def amain(args: argparse.Namespace) -> int:
    try:
        start = start_message(args)
    except (OSError, ValueError) as exc:
        raise SystemExit(f"bad start parameters: {exc}") from exc
    out, api_label, described = open_output(args.api, args.port_name, args.output)
    logger.info("MIDI output: %s on %s", described, api_label)
    send = _LockedSend(out.send_message)
    channels = ChannelMap(args.channel, args.drums_channel, args.programs)
    scheduler = MidiScheduler(send, channels.channel_programs())
    latency = args.latency_ms / 1000.0
    clock_out = ClockSender(send) if args.clock == "out" else None
    if args.clock == "in":
        player = ClockFollower(scheduler, channels.channel, latency=latency)
    else:
        player = DirectPlayer(scheduler, channels.channel, latency)
    bridge = Bridge(args.url, start, player, api_key=args.api_key, clock_out=clock_out)
    if args.clock == "in":
        player.on_tempo, player.on_transport = bridge.on_tempo, bridge.on_transport
    readers: list[InputReader] = []
    status = 1
    try:
        readers = _open_inputs(args, api_label, bridge)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError):  # Windows: Ctrl-C raises KeyboardInterrupt
                loop.add_signal_handler(sig, lambda: asyncio.ensure_future(bridge.stop()))
        status = await bridge.run()
    except PortNotFound as exc:
        logger.error("%s", exc)
        status = 2
    finally:  # also on an exception: nothing may keep sounding
        for reader in readers:
            reader.close()
        if clock_out is not None:
            clock_out.close()
        scheduler.close()  # every sounding note off, All Notes Off and sustain off on every channel used
        out.close_port()
        logger.info("%s", summary(scheduler))
    return status


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(message)s")
    if args.list_ports:
        list_ports(args.api)
        return 0
    try:
        return asyncio.run(amain(args))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
