"""The MIDI bridge against a real server and a real JACK server (dummy backend).

Set-up: a JACK server of our own (``jackd -S -n fm-test-<pid> -d dummy``, selected for every JACK
client through ``JACK_DEFAULT_SERVER``, so a JACK server already running is left alone), the live
test server, and a recording WebSocket proxy between the bridge and the server: it keeps every
frame (what the server really sent) and can drop the connection like a network failure.
A ``MidiIn`` connected to the bridge's port records what a DAW would.

The tests assert what a DAW would notice: every note the server sent arrives, in order, on its
channel and with its velocity, each note-on with its note-off, and nothing sounds after a stop or
across a dropped connection. How late the notes arrive depends on the machine and its load, so it is
measured and reported (``tests/artifacts/midi_bridge_timing.json`` and the run's "timing figures"
section), never asserted.

Timing: rtmidi writes each message at the start of the next JACK period, so the period bounds what
any client can do: 128 frames at 48 kHz (2.7 ms) here, as a low-latency studio set-up would use.
Arrival times are the JACK-side timestamps rtmidi gives each message (taken in the JACK thread,
before Python sees it), anchored to the wall clock by the earliest callback.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from websockets.asyncio.client import connect
from websockets.asyncio.server import serve
from websockets.exceptions import ConnectionClosed

from tests.timing import ARTIFACTS, spread
from tests.waiting import wait_for

JACK_RATE, JACK_PERIOD = 48000, 128
NOTE_ON, NOTE_OFF, CONTROL, PROGRAM, SUSTAIN, ALL_NOTES_OFF = 0x90, 0x80, 0xB0, 0xC0, 64, 123
# Notes due this long before the bridge was told to stop must all have sounded; the ones due after
# that may or may not, depending on how fast the bridge acts on the stop.
STOP_MARGIN_SECONDS = 0.25
# How long after a key's message the bridge's input thread may stamp it, however busy the machine.
INPUT_SLACK_SECONDS = 0.1
# How soon the bridge must notice a dropped connection (it reads a closed socket at once; waiting
# for a ping timeout instead would take 20 s and more).
NOTICE_DROP_SECONDS = 5.0


# ----------------------------------------------------------------------------- JACK
@dataclass
class JackServer:
    name: str
    log: Path

    def xruns(self) -> int:
        """Cycles the server has reported overrun so far (a client, or the server, finished late)."""
        return self.log.read_text(errors="replace").count("XRun")


@pytest.fixture(scope="session")
def jack(tmp_path_factory):
    """A JACK server with the dummy backend for this test session; JACK clients here use it."""
    jackd, jack_wait = shutil.which("jackd"), shutil.which("jack_wait")
    if not jackd or not jack_wait:
        pytest.fail("jackd / jack_wait not found: run `make test-deps` (installs Debian's jackd2)")
    name = f"fm-test-{os.getpid()}"
    log = tmp_path_factory.mktemp("jack") / "jackd.log"
    with open(log, "w") as out:
        # -S: synchronous mode, where the server waits for every client to finish its cycle. In the
        # default (asynchronous) mode a client that a busy machine makes late ("was not finished",
        # many times a run under load) may miss that cycle's MIDI: the machine's fault, not the
        # bridge's. Late cycles then only make notes late, which is reported, not asserted.
        proc = subprocess.Popen([jackd, "-S", "-n", name, "-d", "dummy", "-r", str(JACK_RATE),
                                 "-p", str(JACK_PERIOD)], stdout=out, stderr=subprocess.STDOUT)
    saved = {k: os.environ.get(k) for k in ("JACK_DEFAULT_SERVER", "JACK_NO_START_SERVER")}
    os.environ["JACK_DEFAULT_SERVER"] = name
    os.environ["JACK_NO_START_SERVER"] = "1"
    try:
        ready = subprocess.run([jack_wait, "-s", name, "-w", "-t", "15"], capture_output=True, text=True,
                               timeout=20)
        if ready.returncode != 0 or proc.poll() is not None:
            pytest.fail(f"jackd did not start: {ready.stdout}{ready.stderr}{log.read_text()[-2000:]}")
        yield JackServer(name, log)
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class Recorder:
    """A JACK MIDI input connected to a port; keeps (wall time, JACK time, message) per message.

    It polls rtmidi's queue from a thread instead of taking a callback, which would run Python (and
    wait for the GIL) inside JACK's process cycle and make the cycle overrun.
    """

    POLL_SECONDS = 0.0005

    def __init__(self, port_part: str, timeout: float = 15.0) -> None:
        import rtmidi

        self.events: list[tuple[float, float, list[int]]] = []
        self._jack_time = 0.0  # seconds: the sum of rtmidi's deltas so far
        self.midi_in = rtmidi.MidiIn(rtmidi.API_UNIX_JACK, "fm test recorder", queue_size_limit=8192)
        deadline = time.monotonic() + timeout
        while True:
            ports = self.midi_in.get_ports()
            matches = [i for i, p in enumerate(ports) if port_part in p]
            if matches:
                break
            assert time.monotonic() < deadline, f"no JACK port with '{port_part}' in {ports}"
            time.sleep(0.05)
        self.midi_in.open_port(matches[0])
        self.midi_in.ignore_types(sysex=True, timing=False, active_sense=True)  # keep MIDI clock (--clock out)
        self._running = True
        self._thread = threading.Thread(target=self._poll, name="midi-recorder", daemon=True)
        self._thread.start()

    def _poll(self) -> None:
        while self._running:
            if not self._take():
                time.sleep(self.POLL_SECONDS)

    def _take(self) -> bool:
        item = self.midi_in.get_message()
        if item is None:
            return False
        message, delta = item
        self._jack_time += delta
        self.events.append((time.time(), self._jack_time, message))
        return True

    def arrivals(self) -> list[tuple[float, list[int]]]:
        """(wall-clock arrival, message): JACK times shifted by the smallest polling delay seen."""
        events = list(self.events)  # the polling thread may be appending
        if not events:
            return []
        anchor = min(wall - jack for wall, jack, _ in events)
        return [(anchor + jack, message) for _, jack, message in events]

    def messages(self) -> list[list[int]]:
        return [message for _, _, message in list(self.events)]

    def close(self) -> None:
        """Stops polling, keeping what rtmidi has queued (the caller waits for what it expects)."""
        self._running = False
        self._thread.join(timeout=5)
        while self._take():
            pass
        self.midi_in.close_port()
        del self.midi_in


# ----------------------------------------------------------------------------- the proxy
@dataclass
class Frame:
    direction: str  # "up" (bridge -> server) or "down"
    time: float
    connection: int
    message: dict


class RecordingProxy:
    """A WebSocket proxy that records every frame and can drop the live connection."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream
        self.frames: list[Frame] = []
        self.connections = 0
        self._links: list[tuple] = []
        self._loop = asyncio.new_event_loop()
        started = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(started,), name="ws-proxy", daemon=True)
        self._thread.start()
        assert started.wait(10), "the proxy did not start"

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    def _run(self, started: threading.Event) -> None:
        asyncio.set_event_loop(self._loop)

        async def open_server():
            return await serve(self._handle, "127.0.0.1", 0, max_size=None)

        self._server = self._loop.run_until_complete(open_server())
        self.port = self._server.sockets[0].getsockname()[1]
        started.set()
        self._loop.run_forever()

    async def _handle(self, client) -> None:
        index = self.connections
        self.connections += 1
        async with connect(self.upstream, max_size=None, open_timeout=30) as server:
            self._links.append((client, server))

            async def pump(src, dst, direction: str) -> None:
                try:
                    async for raw in src:
                        self.frames.append(Frame(direction, time.time(), index, json.loads(raw)))
                        await dst.send(raw)
                except ConnectionClosed:
                    pass
                # Pass a clean close on with its code (1000 after "stopped", 1013 when full).
                if src.close_code is not None and src.close_code != 1006:
                    await dst.close(src.close_code)

            tasks = [asyncio.create_task(pump(client, server, "up")), asyncio.create_task(pump(server, client, "down"))]
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            await asyncio.wait(tasks, timeout=3)

    def drop(self) -> None:
        """Cuts the live connection on both sides without a closing handshake."""
        def cut() -> None:
            client, server = self._links[-1]
            client.transport.abort()
            server.transport.abort()
        self._loop.call_soon_threadsafe(cut)

    def received(self, kind: str, connection: int | None = None) -> list[Frame]:
        return [f for f in list(self.frames) if f.direction == "down" and f.message.get("type") == kind
                and (connection is None or f.connection == connection)]

    def sent(self, kind: str) -> list[Frame]:
        return [f for f in list(self.frames) if f.direction == "up" and f.message.get("type") == kind]

    def server_notes(self, before: float | None = None) -> list[tuple[float, dict]]:
        """(unix time of the note, note) for every note the server sent (in frames passed on before
        unix time ``before``, if given)."""
        clock = None
        notes = []
        for f in list(self.frames):
            if before is not None and f.time >= before:
                break
            if f.direction == "down" and f.message["type"] == "session":
                clock = f.message["clock"]
            elif f.direction == "down" and f.message["type"] == "notes":
                notes += [(clock + n["start"], n) for n in f.message["notes"]]
        return notes

    def close(self) -> None:
        async def shut() -> None:
            self._server.close()
            await self._server.wait_closed()

        asyncio.run_coroutine_threadsafe(shut(), self._loop).result(timeout=15)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()


@pytest.fixture
def proxy(live_server):
    p = RecordingProxy(live_server.ws_url)
    yield p
    p.close()


@pytest.fixture
def run_bridge(jack, proxy, request):
    """Starts ``python -m client.midi_bridge`` through the proxy; stops it (SIGINT) at the end."""
    procs = []
    ARTIFACTS.mkdir(exist_ok=True)
    log = ARTIFACTS / f"midi_bridge_{request.node.name}.log"

    def start(port_name: str, *extra: str, url: str | None = None) -> subprocess.Popen:
        out = open(log, "w")
        proc = subprocess.Popen([sys.executable, "-m", "client.midi_bridge", "--url", url or proxy.url, "--api", "jack",
                                 "--port-name", port_name, *extra], stdout=out, stderr=subprocess.STDOUT)
        out.close()
        procs.append(proc)
        return proc

    start.log = log
    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def stop_bridge(proc: subprocess.Popen, log: Path) -> str:
    proc.send_signal(signal.SIGINT)
    try:
        code = proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise AssertionError(f"the bridge did not stop on SIGINT:\n{log.read_text()[-3000:]}")
    text = log.read_text()
    assert code == 0, f"exit status {code}:\n{text[-3000:]}"
    return text


def is_note_on(message: list[int]) -> bool:
    return len(message) == 3 and message[0] & 0xF0 == NOTE_ON and message[2] > 0


def is_all_notes_off(message: list[int]) -> bool:
    return len(message) == 3 and message[0] & 0xF0 == CONTROL and message[1] == ALL_NOTES_OFF


def key_events(arrivals) -> dict[tuple[int, int], list[tuple[float, str]]]:
    """Per (channel, pitch): the note-ons and note-offs in order (velocity 0 counts as off)."""
    keys: dict[tuple[int, int], list[tuple[float, str]]] = {}
    for t, (status, *data) in [(t, m) for t, m in arrivals if len(m) == 3]:
        kind, channel = status & 0xF0, status & 0x0F
        if kind == NOTE_ON and data[1] > 0:
            keys.setdefault((channel, data[0]), []).append((t, "on"))
        elif kind == NOTE_OFF or kind == NOTE_ON:
            keys.setdefault((channel, data[0]), []).append((t, "off"))
    return keys


def unpaired_keys(arrivals) -> dict[tuple[int, int], list[str]]:
    """Keys whose events are not note-on, note-off, note-on, ..., note-off (the last few shown)."""
    bad = {}
    for key, events in key_events(arrivals).items():
        kinds = [e for _, e in events]
        if kinds != ["on", "off"] * (len(kinds) // 2) or len(kinds) % 2:
            bad[key] = kinds[-4:]
    return bad


def due_before(proxy: RecordingProxy, moment: float) -> list[dict]:
    """The server's notes that were due, and had reached the bridge, before ``moment``."""
    return [n for due, n in proxy.server_notes(before=moment) if due < moment]


# Voice v plays on channel CHANNEL_OF_VOICE[v] (1-16): channel 10, General MIDI's drums, is left out.
CHANNEL_OF_VOICE = [1, 2, 3, 4, 5, 6, 7, 8, 9, 11, 12, 13, 14, 15, 16, 1]


def message_of(note: dict) -> list[int]:
    """The note-on the bridge plays for a server note, on its voice's channel."""
    return [NOTE_ON | CHANNEL_OF_VOICE[note["voice"]] - 1, note["pitch"], note["velocity"]]


def unsilenced_channels(arrivals, after: float) -> set[int]:
    """Channels (0-15) with a note-on that got no All Notes Off and sustain off (CC 64 = 0) after ``after``."""
    used = {m[0] & 0x0F for _, m in arrivals if is_note_on(m)}
    controls = {(m[0] & 0x0F, m[1]) for t, m in arrivals if t > after and len(m) == 3 and m[0] & 0xF0 == CONTROL
                and m[2] == 0}
    return {c for c in used if (c, ALL_NOTES_OFF) not in controls or (c, SUSTAIN) not in controls}


# ----------------------------------------------------------------------------- tests
def test_notes_arrive_on_the_port_in_order_with_their_note_offs(jack, proxy, run_bridge, timing_report):
    port = f"FM Bridge Timing {os.getpid()}"
    bridge = run_bridge(port, "--bpm", "300", "--seed", "5", "--temperature", "0.9")
    recorder = Recorder(port)
    xruns = jack.xruns()
    try:
        wait_for(lambda: len(due_before(proxy, time.time() - STOP_MARGIN_SECONDS)) >= 120, 90,
                 "120 notes from the server to fall due")
        stopped_at = time.time()
        log = stop_bridge(bridge, run_bridge.log)
        # The bridge has exited: wait until its last messages (note-offs, then All Notes Off) are in.
        wait_for(lambda: any(is_all_notes_off(m) and w > stopped_at for w, _, m in list(recorder.events))
                 and not unpaired_keys(recorder.arrivals()), 15,
                 lambda: f"All Notes Off and every key released at the stop; keys not released or not paired "
                         f"(last events): {unpaired_keys(recorder.arrivals())}; the last messages: "
                         f"{[(round(w - stopped_at, 3), m) for w, _, m in recorder.events[-8:]]}; "
                         f"{jack.xruns() - xruns} JACK xruns meanwhile")
    finally:
        recorder.close()
    arrivals = recorder.arrivals()
    overruns = f"{jack.xruns() - xruns} JACK xruns meanwhile"
    sent = sorted(proxy.server_notes(), key=lambda x: x[0])  # by start; a chord keeps the order it came in
    ons = [(t, m) for t, m in arrivals if is_note_on(m)]

    # The port plays the server's notes, in order, each on its voice's channel with its velocity...
    for i, ((t, played), (due, note)) in enumerate(zip(ons, sent)):
        assert played == message_of(note), (
            f"note-on {i} is {played}, the server's note {i} (due {due - stopped_at:+.3f} s from the stop) is "
            f"{note}: next expected {[message_of(n) for _, n in sent[i:i + 4]]}, played {[m for _, m in ons[i:i + 4]]}; "
            f"{overruns}")
    assert len(ons) <= len(sent), f"note-ons the server never sent: {[m for _, m in ons[len(sent):]][:5]}"
    # ...and none is lost: every note due (and received) a while before the stop sounded.
    due_before_stop = due_before(proxy, stopped_at - STOP_MARGIN_SECONDS)
    assert len(due_before_stop) >= 120
    played_notes = {id(n) for _, n in sent[:len(ons)]}
    missing = [n for n in due_before_stop if id(n) not in played_notes]
    assert not missing, (f"{len(missing)} of the {len(due_before_stop)} notes due before the stop never sounded; "
                         f"the first: {missing[0]}; {overruns}")

    # Every note-on has its note-off, every channel used gets All Notes Off and sustain off, and
    # nothing sounds after the stop's All Notes Off.
    assert not unpaired_keys(arrivals), overruns
    assert not unsilenced_channels(arrivals, stopped_at)
    silenced_at = min(t for t, m in arrivals if is_all_notes_off(m) and t > stopped_at)
    assert not [m for t, m in ons if t > silenced_at], "notes started after the bridge stopped"

    errors = [(t - due_at) * 1000 for (t, _), (due_at, _) in zip(ons, sent)]
    figures = {key: round(value, 3) for key, value in spread([abs(e) for e in errors]).items()}
    bridge_line = log.strip().splitlines()[-1] if log.strip() else ""
    summary = (f"bridge timing over {len(errors)} note-ons (JACK dummy, {JACK_PERIOD} frames at {JACK_RATE} Hz = "
               f"{1000 * JACK_PERIOD / JACK_RATE:.2f} ms period): |error| p50 {figures['p50']:.2f} ms, "
               f"p99 {figures['p99']:.2f} ms, max {figures['max']:.2f} ms; signed mean {statistics.fmean(errors):+.2f} ms")
    timing_report("midi_bridge_timing", summary, notes=len(errors),
                  jack={"rate_hz": JACK_RATE, "period_frames": JACK_PERIOD,
                        "period_ms": round(1000 * JACK_PERIOD / JACK_RATE, 3), "xruns": jack.xruns() - xruns},
                  abs_error_ms=figures, signed_mean_error_ms=round(statistics.fmean(errors), 3),
                  bridge_scheduler=bridge_line.split(" INFO ", 1)[-1],
                  error_ms=[round(e, 3) for e in errors])


def test_notes_played_on_the_input_reach_the_session(jack, proxy, run_bridge):
    import rtmidi

    keyboard_name = f"fm test keyboard {os.getpid()}"
    keyboard = rtmidi.MidiOut(rtmidi.API_UNIX_JACK, keyboard_name)
    keyboard.open_virtual_port("out")
    try:
        port = f"FM Bridge Input {os.getpid()}"
        bridge = run_bridge(port, "--input", keyboard_name, "--seed", "2")
        wait_for(lambda: proxy.received("session"), 60, "the session")
        wait_for(lambda: "MIDI input:" in run_bridge.log.read_text(), 15, "the bridge to open the keyboard")
        clock = proxy.received("session")[0].message["clock"]
        wait_for(lambda: time.time() > clock + 0.1, 5, "session time 0")  # play along with the stream
        played = []
        for pitch, velocity, hold in ((67, 100, 0.4), (55, 64, 0.1)):
            before_on = time.time()
            keyboard.send_message([0x90, pitch, velocity])
            after_on = time.time()
            time.sleep(hold)  # holding the key: the note's length
            before_off = time.time()
            keyboard.send_message([0x80, pitch, 0])
            after_off = time.time()
            played.append((pitch, velocity, (before_on, after_on, before_off, after_off)))
            time.sleep(0.05)  # the gap before the next key
        wait_for(lambda: sum(len(f.message["notes"]) for f in proxy.sent("notes")) >= 2, 10, "played notes")
        stop_bridge(bridge, run_bridge.log)
    finally:
        keyboard.close_port()
        del keyboard
    sent = [n for f in proxy.sent("notes") for n in f.message["notes"]]
    assert [(n["pitch"], n["velocity"], n["voice"]) for n in sent] == [(p, v, 0) for p, v, _ in played]
    # The bridge stamps each message when its input thread reads it: never before the message was
    # sent, and at most INPUT_SLACK_SECONDS after (a thread waking up on a busy machine). So the
    # note starts between its note-on's send and that plus the slack, and lasts from the time
    # between the messages less the slack to the time around both plus the slack.
    for note, (_, _, (before_on, after_on, before_off, after_off)) in zip(sent, played):
        start, duration = note["start"] + clock, note["duration"]
        assert before_on - 0.001 <= start <= after_on + INPUT_SLACK_SECONDS, (note, start - before_on)
        assert before_off - after_on - INPUT_SLACK_SECONDS <= duration <= after_off - before_on + INPUT_SLACK_SECONDS, (
            note, before_off - after_on)
    # The server takes them as valid messages; the test model's small vocabulary may still leave one
    # out (with an "unreadable_notes" error), which is the server's choice, not the bridge's.
    assert all(f.message["code"] == "unreadable_notes" for f in proxy.received("error")), proxy.received("error")


def test_a_dropped_connection_silences_and_resumes(jack, proxy, run_bridge):
    port = f"FM Bridge Resume {os.getpid()}"
    bridge = run_bridge(port, "--bpm", "240", "--seed", "9")
    recorder = Recorder(port)
    try:
        wait_for(lambda: len(proxy.server_notes()) >= 20, 60, "notes before the drop")
        wait_for(lambda: any(is_note_on(m) for m in recorder.messages()), 30, "notes playing before the drop")
        dropped_at = time.time()
        proxy.drop()
        wait_for(lambda: proxy.received("session", connection=1), 30, "the resumed session")
        resumed = proxy.received("session", connection=1)[0]
        wait_for(lambda: len(proxy.received("notes", connection=1)) >= 3, 30, "notes after resuming")
        wait_for(lambda: any(is_note_on(m) and t > resumed.time for t, m in recorder.arrivals()), 30,
                 "the resumed stream to play")
        stop_bridge(bridge, run_bridge.log)
    finally:
        recorder.close()
    first = proxy.received("session", connection=0)[0].message
    start_again = [f.message for f in proxy.sent("start") if f.connection == 1]
    assert start_again == [{"type": "start", "resume_token": first["resume_token"],
                            "last_beat": start_again[0].get("last_beat")}]
    assert resumed.message["resumed"] is True and resumed.message["clock"] == first["clock"]
    assert_resumed_after_last_beat(proxy, start_again[0]["last_beat"])

    arrivals = recorder.arrivals()
    # Between the drop and the first note of the resumed stream, every key goes (and stays) off.
    resumed_ons = [t for t, m in arrivals if t > resumed.time and is_note_on(m)]
    assert resumed_ons, "no notes played after resuming"
    gap = [(t, m) for t, m in arrivals if t < resumed_ons[0]]
    for key, events in key_events(gap).items():
        assert events[-1][1] == "off", f"{key} left sounding across the drop: {events[-3:]}"
    # The bridge silences everything as soon as it sees the connection go, before it asks to resume.
    asked_again = min(f.time for f in proxy.sent("start") if f.connection == 1)
    all_off = [t for t, m in gap if is_all_notes_off(m) and t > dropped_at]
    assert all_off and min(all_off) < asked_again, "no All Notes Off between the drop and the reconnection"
    assert not unsilenced_channels(gap, dropped_at), "a channel was not silenced at the drop"
    assert min(all_off) - dropped_at < NOTICE_DROP_SECONDS, f"the drop was noticed {min(all_off) - dropped_at:.1f} s late"


def note_beats(proxy: RecordingProxy, connection: int) -> list[float]:
    return [n["beat"] for f in proxy.received("notes", connection=connection) for n in f.message["notes"]]


def assert_resumed_after_last_beat(proxy: RecordingProxy, last_beat: float) -> None:
    """The resume's last_beat is a beat of the dropped connection's notes (the drop may have lost
    the last few on their way), and the resumed connection sends nothing at or before it."""
    assert last_beat in note_beats(proxy, 0)
    again = note_beats(proxy, 1)
    assert again and min(again) > last_beat, (last_beat, again[:5])


def test_a_session_resumed_on_another_checkpoint_is_logged_and_goes_on_after_last_beat(
        jack, run_bridge, served_checkpoint, later_checkpoint):
    """A rolling restart: the replica that held the session goes, and one on a new checkpoint, sharing
    the store, resumes it from its last saved snapshot (older than what the bridge has heard)."""
    import redis

    from server.config import ServerConfig
    from tests.cluster_harness import redis_server
    from tests.server_harness import running_server

    port = f"FM Bridge Reread {os.getpid()}"
    with redis_server() as store, \
            running_server(ServerConfig(checkpoint=str(served_checkpoint), store=store)) as old, \
            running_server(ServerConfig(checkpoint=str(later_checkpoint), store=store)) as new:
        relay = RecordingProxy(old.ws_url)
        try:
            bridge = run_bridge(port, "--bpm", "240", "--seed", "9", url=relay.url)
            first = wait_for(lambda: relay.received("session", connection=0), 60, "the session")[0].message
            saved = redis.Redis.from_url(store)
            wait_for(lambda: saved.exists(f"fm:session:{first['resume_token']}"), 30, "the session in the store")
            wait_for(lambda: len(note_beats(relay, 0)) >= 20, 60, "notes before the drop")
            relay.upstream = new.ws_url  # the next connection reaches the new replica
            relay.drop()
            resumed = wait_for(lambda: relay.received("session", connection=1), 30, "the resumed session")[0].message
            wait_for(lambda: len(relay.received("notes", connection=1)) >= 3, 30, "notes after resuming")
            log = stop_bridge(bridge, run_bridge.log)
        finally:
            relay.close()
    assert resumed["resumed"] and resumed["reread"] and resumed["id"] == first["id"]
    assert resumed["clock"] == first["clock"]
    assert f"session {first['id']} continued on a new model" in log
    start_again = [f.message for f in relay.sent("start") if f.connection == 1]
    assert [m.keys() for m in start_again] == [{"type", "resume_token", "last_beat"}]
    assert_resumed_after_last_beat(relay, start_again[0]["last_beat"])


def test_output_into_an_existing_port(jack, proxy, run_bridge):
    """--output plays into a port someone else made (an IAC bus, a loopMIDI port, a synth)."""
    import rtmidi

    synth_name = f"fm test synth {os.getpid()}"
    synth = rtmidi.MidiIn(rtmidi.API_UNIX_JACK, synth_name, queue_size_limit=4096)
    synth.open_virtual_port("in")
    try:
        bridge = run_bridge(f"unused {os.getpid()}", "--output", synth_name, "--seed", "4")
        wait_for(lambda: len(proxy.server_notes()) >= 8, 60, "notes from the server")
        received = []
        deadline = time.monotonic() + 10
        while sum(1 for m in received if m[0] & 0xF0 == 0x90 and m[2]) < 5:
            assert time.monotonic() < deadline, f"only {received} arrived at {synth_name}"
            item = synth.get_message()
            if item is None:
                time.sleep(0.005)
            else:
                received.append(item[0])
        stop_bridge(bridge, run_bridge.log)
    finally:
        synth.close_port()
        del synth
    sent = {n["pitch"] for _, n in proxy.server_notes()}
    assert {m[1] for m in received if m[0] & 0xF0 == 0x90} <= sent


# ----------------------------------------------------------------------------- without JACK
def test_scheduler_restrikes_repeated_keys_and_silences_everything():
    from client.midi_bridge import MidiScheduler

    sent: list[list[int]] = []
    scheduler = MidiScheduler(sent.append)
    now = time.time()
    scheduler.note(now + 0.02, 0.20, 0, 60, 90)   # held...
    scheduler.note(now + 0.06, 0.05, 0, 60, 70)   # ...struck again while it sounds
    scheduler.note(now + 0.03, 5.00, 1, 48, 80)   # still sounding at the all-notes-off
    scheduler.note(now + 9.00, 0.50, 2, 72, 80)   # never due
    wait_for(lambda: len(sent) >= 5, 5, "the first events")
    time.sleep(0.25)
    scheduler.all_notes_off()
    scheduler.close()
    assert sent[:5] == [[0x90, 60, 90], [0x91, 48, 80], [0x80, 60, 0], [0x90, 60, 70], [0x80, 60, 0]]
    # The restruck key sounds until the last of its note-offs (the first strike's, at +0.22 s).
    assert sent[5:] == [[0x81, 48, 0], [0xB0, 123, 0], [0xB0, 64, 0], [0xB1, 123, 0], [0xB1, 64, 0]]
    assert scheduler.sent_notes == 3 and scheduler.pending() == 0


def test_start_parameters_come_from_the_protocol_settings(tmp_path):
    from client.midi_bridge import build_parser, start_message
    from server.protocol import Settings

    parser = build_parser()
    for name in Settings.model_fields:
        assert f"--{name}" in parser.format_help()
    prompt = tmp_path / "p.mid"
    prompt.write_bytes(b"MThd")
    args = parser.parse_args(["--top-k", "20", "--temperature", "0.7", "--prompt-midi", str(prompt)])
    assert start_message(args) == {"temperature": 0.7, "top_k": 20, "prompt_midi": "TVRoZA=="}
    with pytest.raises(ValueError):
        start_message(parser.parse_args(["--top_p", "1.5"]))


def test_accompany_and_lookahead_go_in_the_start_message(capsys):
    from client.midi_bridge import build_parser, start_message

    parser = build_parser()
    args = parser.parse_args(["--accompany", "0,2", "--lookahead", "0.05"])
    assert start_message(args) == {"accompany": {"voices": [0, 2]}, "lookahead": 0.05}
    for bad in ("0,0", "16", "x"):
        with pytest.raises(SystemExit):
            parser.parse_args(["--accompany", bad])
        assert "voices 0-15" in capsys.readouterr().err


# ----------------------------------------------------------------------------- a DAW's clock
class DawClock:
    """What a DAW sends when it leads: a JACK MIDI output with 24 clocks a beat from a thread, and
    Start, Stop, Song Position and Continue when the test asks (just before the next clock, which
    marks the position the transport starts from). It keeps where the transport was at each clock,
    so :meth:`beat_at` tells the DAW's position at any time while it runs."""

    def __init__(self, name: str, bpm: float) -> None:
        import rtmidi

        self.out = rtmidi.MidiOut(rtmidi.API_UNIX_JACK, name)
        self.out.open_virtual_port("clock")
        self.bpm = bpm
        self.running = False
        self.song_tick = 0
        self.clocks: list[tuple[float, int | None, float]] = []  # (time, song position or None, bpm)
        self._queued: list[list[int]] = []
        self._lock = threading.Lock()
        self._alive = True
        self._thread = threading.Thread(target=self._run, name="daw-clock", daemon=True)
        self._thread.start()

    def send(self, *messages: list[int]) -> None:
        with self._lock:
            self._queued += messages

    def _run(self) -> None:
        due = time.perf_counter()
        while self._alive:
            while time.perf_counter() < due - 0.002:
                time.sleep(0.001)
            while time.perf_counter() < due:
                pass
            with self._lock:
                for message in self._queued:
                    self.out.send_message(message)
                    if message == [0xFA]:
                        self.running, self.song_tick = True, 0
                    elif message == [0xFB]:
                        self.running = True
                    elif message == [0xFC]:
                        self.running = False
                    elif message[0] == 0xF2:
                        self.song_tick = (message[1] | message[2] << 7) * 6
                self._queued = []
                self.out.send_message([0xF8])
                self.clocks.append((time.time(), self.song_tick if self.running else None, self.bpm))
                if self.running:
                    self.song_tick += 1
                due += 60.0 / (24 * self.bpm)

    def beat_at(self, at: float) -> float | None:
        """The DAW's position (beats) at unix time ``at``, or None while stopped."""
        before = [c for c in list(self.clocks) if c[0] <= at]
        if not before or before[-1][1] is None:
            return None
        sent, tick, bpm = before[-1]
        return (tick + (at - sent) * 24 * bpm / 60.0) / 24

    def close(self) -> None:
        self._alive = False
        self._thread.join(timeout=5)
        self.out.close_port()
        del self.out


@pytest.fixture
def daw_clock():
    clocks = []

    def start(bpm: float) -> tuple[DawClock, str]:
        name = f"fm test daw {os.getpid()} {len(clocks)}"
        clocks.append(DawClock(name, bpm))
        return clocks[-1], name

    yield start
    for clock in clocks:
        clock.close()


GRID = 12  # the model's onset grid: twelve steps a beat


def grid_places(arrivals, daw: DawClock, proxy: RecordingProxy, after_beat: float = -1.0) -> list:
    """For every note-on while the DAW ran: (its DAW beat, the session beat of the server's note it
    plays). The first note-on plays the earliest server note of its pitch and channel past session
    beat ``after_beat``; that fixes the offset between the two timelines, and every later note-on is
    the note of its pitch and channel nearest to its DAW beat plus that offset."""
    sent = [n for _, n in proxy.server_notes()]
    placed, offset = [], None
    for t, m in arrivals:
        beat = daw.beat_at(t)
        if not is_note_on(m) or beat is None:
            continue
        same = [n for n in sent if message_of(n) == m]
        assert same, f"a note-on the server never sent: {m}"
        if offset is None:
            first = min((n for n in same if n["beat"] > after_beat), key=lambda n: n["beat"])
            offset = round((first["beat"] - beat) * GRID) / GRID
        note = min(same, key=lambda n: abs(n["beat"] - offset - beat))
        placed.append((beat, note["beat"]))
    return placed


def asked_tempi(proxy: RecordingProxy) -> list[float]:
    """Every tempo the bridge asked for, in start and set."""
    return [f.message["bpm"] for f in proxy.sent("start") + proxy.sent("set") if f.message.get("bpm") is not None]


def test_the_session_follows_the_daws_tempo(jack, proxy, run_bridge, daw_clock, timing_report):
    daw, name = daw_clock(100.0)
    daw.send([0xFA])
    bridge = run_bridge(f"FM Bridge Tempo {os.getpid()}", "--clock", "in", "--clock-port", name, "--seed", "3")
    wait_for(lambda: proxy.received("session"), 60, "the session")
    wait_for(lambda: any(abs(b / 100 - 1) < 0.01 for b in asked_tempi(proxy)), 20,
             lambda: f"the bridge to ask for 100 bpm; it asked {asked_tempi(proxy)}")
    changed_at = time.time()
    daw.bpm = 140.0
    wait_for(lambda: time.time() > changed_at + 2 * 60 / 140, 5, "two beats at 140 bpm")
    asked = proxy.sent("set")
    after = [f for f in asked if f.time <= changed_at + 2 * 60 / 140]
    assert after and after[-1].message["bpm"] == pytest.approx(140, rel=0.01), [f.message for f in asked]
    wait_for(lambda: any(f.message["bpm"] == pytest.approx(140, rel=0.01) for f in proxy.received("state")), 10,
             "the server to take the tempo")
    stop_bridge(bridge, run_bridge.log)
    within = min(f.time for f in asked if f.message["bpm"] == pytest.approx(140, rel=0.01)) - changed_at
    error = abs(after[-1].message["bpm"] / 140 - 1) * 100
    timing_report("midi_clock_tempo", f"tempo follow 100 -> 140 bpm: within 1 % after {within * 1000:.0f} ms, "
                  f"off by {error:.2f} % two beats after the change ({len(asked)} set messages)",
                  within_one_percent_ms=round(within * 1000, 1), error_percent_after_two_beats=round(error, 3),
                  set_bpm=[f.message["bpm"] for f in asked])


def test_notes_fall_on_the_daws_grid_and_stop_continue_land_on_the_beat(jack, proxy, run_bridge, daw_clock,
                                                                        timing_report):
    bpm = 120.0
    daw, name = daw_clock(bpm)
    port = f"FM Bridge Grid {os.getpid()}"
    bridge = run_bridge(port, "--clock", "in", "--clock-port", name, "--seed", "5", "--bpm", "120")
    recorder = Recorder(port)
    try:
        wait_for(lambda: proxy.received("session"), 60, "the session")
        wait_for(lambda: proxy.sent("pause"), 10, "the bridge to pause the session while the DAW is stopped")
        time.sleep(0.5)
        assert not [m for m in recorder.messages() if is_note_on(m)], "notes played before the DAW started"
        daw.send([0xFA])
        wait_for(lambda: len([m for m in recorder.messages() if is_note_on(m)]) >= 30, 60, "30 notes on the DAW's grid")
        stopped_at = time.time()
        daw.send([0xFC])
        wait_for(lambda: not unsilenced_channels(recorder.arrivals(), stopped_at) and not unpaired_keys(
            recorder.arrivals()), 10, lambda: f"every channel silenced at the stop: {unpaired_keys(recorder.arrivals())}")
        stop_arrivals = recorder.arrivals()
        time.sleep(1.0)  # stopped: nothing may play
        quiet = [m for t, m in recorder.arrivals() if t > stopped_at + 0.1 and is_note_on(m)]
        daw.send([0xF2, 64, 0], [0xFB])  # song position: sixteenth 64 = beat 16 (bar 5), and Continue
        continued_at = time.time()
        wait_for(lambda: len([1 for t, m in recorder.arrivals() if t > continued_at and is_note_on(m)]) >= 10, 60,
                 "notes after Continue")
        log = stop_bridge(bridge, run_bridge.log)
    finally:
        recorder.close()
    assert not quiet, f"notes played while the DAW was stopped: {quiet[:5]}"
    assert not unpaired_keys(stop_arrivals), "a key left sounding at the stop"
    assert not unsilenced_channels(stop_arrivals, stopped_at), "a channel without CC 123 / CC 64 = 0 at the stop"
    assert [f.message for f in proxy.sent("resume")], "the bridge did not resume the session on Start"

    arrivals = recorder.arrivals()
    before = [(t, m) for t, m in arrivals if t < stopped_at]
    after = [(t, m) for t, m in arrivals if t > continued_at]
    errors, last_beat = [], -1.0
    for part, label in ((before, "after Start"), (after, "after Continue")):
        placed = grid_places(part, daw, proxy, after_beat=last_beat)
        # Each note sounds on its beat and subdivision: the nearest step of the grid to where it
        # sounded is its own place in the bar, so the session's bar lines are the DAW's.
        for beat, session_beat in placed:
            assert round(beat * GRID) % (4 * GRID) == round(session_beat * GRID) % (4 * GRID), (
                f"{label}: the note of session beat {session_beat} sounded at DAW beat {beat:.3f}; "
                f"{[(round(b, 3), s) for b, s in placed[:8]]}")
            errors.append((beat - round(beat * GRID) / GRID) * 60 / bpm * 1000)
        last_beat = max(s for _, s in placed)
        first = min(beat for beat, _ in placed)
        start = 0 if label == "after Start" else 16
        assert start - 0.5 / GRID <= first < start + 4, f"{label} at beat {start}: the first note at {first:.3f}"
    figures = {key: round(value, 3) for key, value in spread([abs(e) for e in errors]).items()}
    timing_report("midi_clock_grid", f"notes on the DAW's clock grid ({len(errors)} note-ons at {bpm:g} bpm, "
                  f"JACK dummy): |error| p50 {figures['p50']:.2f} ms, p99 {figures['p99']:.2f} ms, max "
                  f"{figures['max']:.2f} ms; signed mean {statistics.fmean(errors):+.2f} ms",
                  abs_error_ms=figures, signed_mean_error_ms=round(statistics.fmean(errors), 3),
                  bridge_scheduler=log.strip().splitlines()[-1].split(" INFO ", 1)[-1])


def test_clock_out_sends_24_clocks_a_beat_from_a_bar_line(jack, proxy, run_bridge):
    bpm = 150.0
    port = f"FM Bridge Lead {os.getpid()}"
    bridge = run_bridge(port, "--clock", "out", "--bpm", str(bpm), "--seed", "6")
    recorder = Recorder(port)
    try:
        wait_for(lambda: proxy.received("session"), 60, "the session")
        clock = proxy.received("session")[0].message["clock"]
        wait_for(lambda: time.time() > clock + 10 * 60 / bpm, 30, "ten beats of the session")
        stopped_at = time.time()
        stop_bridge(bridge, run_bridge.log)
        wait_for(lambda: [0xFC] in recorder.messages(), 10, "Stop after the bridge stopped")
    finally:
        recorder.close()
    arrivals = recorder.arrivals()
    clocks = [t for t, m in arrivals if m == [0xF8]]
    starts = [t for t, m in arrivals if m == [0xFA]]
    assert len(starts) == 1 and starts[0] <= clocks[0], "Start before the first clock, once"
    beat = 60 / bpm
    # The DAW's beat 0 (the first clock) is a bar line of the session: a multiple of 4 beats.
    first_beat = (clocks[0] - clock) / beat
    assert abs(first_beat - 4 * round(first_beat / 4)) < 0.5 / 24, f"the clock started at session beat {first_beat:.3f}"
    # Counted over each whole beat up to the stop (the window's edges half a clock off the clocks).
    b = round(first_beat)
    counts = []
    while clock + (b + 1) * beat < stopped_at - beat:
        low, high = clock + (b - 0.5 / 24) * beat, clock + (b + 1 - 0.5 / 24) * beat
        counts.append(sum(1 for t in clocks if low <= t < high))
        b += 1
    assert len(counts) >= 4 and set(counts) == {24}, counts


def test_each_voice_has_its_channel_and_program_and_sigterm_silences(jack, proxy, run_bridge):
    port = f"FM Bridge Programs {os.getpid()}"
    programs = [5, 40, 41, 42]
    bridge = run_bridge(port, "--programs", ",".join(map(str, programs)), "--bpm", "300", "--seed", "5")
    recorder = Recorder(port)
    try:
        wait_for(lambda: len([m for m in recorder.messages() if is_note_on(m)]) >= 30, 60, "30 notes")
        stopped_at = time.time()
        bridge.send_signal(signal.SIGTERM)
        assert bridge.wait(timeout=15) == 0, run_bridge.log.read_text()[-3000:]
        wait_for(lambda: not unsilenced_channels(recorder.arrivals(), stopped_at), 10, "every channel silenced")
    finally:
        recorder.close()
    assert [f.message["programs"] for f in proxy.sent("start")] == [programs]
    messages = recorder.messages()
    voices = {n["voice"] for _, n in proxy.server_notes()}
    for channel in {m[0] & 0x0F for m in messages if is_note_on(m)}:
        on_channel = [m for m in messages if m[0] & 0x0F == channel and m[0] & 0xF0 in (NOTE_ON, PROGRAM)]
        voice = CHANNEL_OF_VOICE.index(channel + 1)
        assert voice in voices, f"notes on channel {channel + 1}, which no voice plays on"
        expected = [[PROGRAM | channel, programs[voice]]] if voice < len(programs) else []
        assert [m for m in on_channel if m[0] & 0xF0 == PROGRAM] == expected, f"channel {channel + 1}"
        assert on_channel[0][0] & 0xF0 == (PROGRAM if expected else NOTE_ON), "a note before its program"
    ons = [m for m in messages if is_note_on(m)]
    sent = [message_of(n) for _, n in sorted(proxy.server_notes(), key=lambda x: x[0])]
    assert ons == sent[:len(ons)], "a note on the wrong channel"
    assert not unpaired_keys(recorder.arrivals()), "a key left sounding after SIGTERM"


@pytest.mark.parametrize("flags, problem", [
    (("--programs", "0,128"), "program 128 is outside 0-127"),
    (("--programs", "piano"), "'piano' is not a program number"),
    (("--drums-channel", "17"), "not a channel 1-16"),
], ids=["program-too-high", "program-name", "drums-channel"])
def test_bad_flags_exit_2_with_a_message(flags, problem):
    result = subprocess.run([sys.executable, "-m", "client.midi_bridge", *flags], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 2 and problem in result.stderr, result.stderr


def test_a_clock_port_that_does_not_exist_exits_2(jack, proxy, run_bridge):
    bridge = run_bridge(f"FM Bridge No Clock {os.getpid()}", "--clock", "in", "--clock-port", "no such port at all")
    assert bridge.wait(timeout=30) == 2
    assert "no MIDI input matches 'no such port at all'" in run_bridge.log.read_text()
    assert not proxy.sent("start"), "the bridge started a session without its clock"


def test_direct_play_puts_each_voice_on_its_channel_latency_early():
    from client.midi_bridge import DirectPlayer
    from client.midi_channels import ChannelMap

    class Scheduler:
        def __init__(self):
            self.notes = []

        def note(self, at, duration, channel, pitch, velocity):
            self.notes.append((round(at, 6), duration, channel + 1, pitch, velocity))

    scheduler = Scheduler()
    player = DirectPlayer(scheduler, ChannelMap().channel, latency=0.025)
    player.play([{"start": 1.0, "duration": 0.5, "pitch": 60, "velocity": 90, "voice": 0, "beat": 2.0},
                 {"start": 1.5, "duration": 0.25, "pitch": 48, "velocity": 70, "voice": 9, "beat": 3.0}], clock=100.0)
    assert scheduler.notes == [(100.975, 0.5, 1, 60, 90), (101.475, 0.25, 11, 48, 70)]
