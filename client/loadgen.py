"""Load generator: ``python -m client.loadgen --url ws://127.0.0.1:8000/ws --sessions N --seconds S``.

Opens N real WebSocket sessions (seeds 1..N), streams for S seconds, and measures for every note
its **headroom**: its start on the session clock minus the time it arrived (negative = late).
Prints sessions held (connected to the end without an error), notes/s, late notes, headroom
percentiles and errors; with ``--json`` one JSON object instead. When the server's ``/metrics``
is reachable beside the WebSocket URL, the server's tokens/s and batch sizes over the run are
reported too.

With ``--play-rate N`` each session also plays a note every N seconds (starting now on its session
clock) and measures its **answer latency**: from the moment it sent the played note to the
scheduled time (``clock + start``) of the first note it receives whose ``heard_until`` covers it.

A session whose connection drops (closed, reset, refused, a replica gone behind a proxy) reconnects
to the same URL with back-off and resumes with its token and ``last_beat``, for up to
``--resume-timeout`` seconds; it counts as held if it resumed and went on. The report adds the
resumes (from the drop to the resumed ``session`` reply, and to the first note after it), the notes
received twice (a beat, pitch and voice that came on an earlier connection of the session), the
notes that went back in time, and the sessions that could not resume (``sessions_ended``, the
reason in the errors).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import random
import re
import sys
import time
import urllib.error
import urllib.request
from collections import Counter
from dataclasses import asdict, dataclass, field

import websockets


CONNECTION_ERRORS = (OSError, websockets.WebSocketException, asyncio.TimeoutError)
UNKNOWN_RESUME_TOKEN = "unknown_resume_token"
INVALID_MESSAGE = "invalid_message"


@dataclass
class Reconnect:
    """How a session whose connection drops comes back: to the same ``--url`` (a proxy's, whose
    upstream may be another replica), resuming with its token."""

    timeout: float = 30.0  # give up this many seconds after the drop
    first_delay: float = 0.05  # the wait before the first attempt, doubling after each one ...
    max_delay: float = 1.0  # ... up to this; every wait is jittered by x0.5-1.5
    in_use_grace: float = 1.0  # unknown_resume_token this soon after the drop is tried again: the
    # server may not have seen the old connection go yet (it refuses a token "in use" alike)


class LastBeat:
    """Whether resumes send ``last_beat`` (the beat of the latest note received: the server sends
    none at or before it). A server from before the field answers ``invalid_message``: that resume
    is sent again without it, and so are the later ones of the run (``refused``)."""

    def __init__(self) -> None:
        self.refused = False


@dataclass
class SessionResult:
    held: bool = False
    notes: int = 0
    late: int = 0
    headroom: list[float] = field(default_factory=list)
    answer_latency: list[float] = field(default_factory=list)
    played: int = 0
    unanswered: int = 0
    errors: Counter = field(default_factory=Counter)
    drops: int = 0  # connections lost while the session streamed
    resume_seconds: list[float] = field(default_factory=list)  # from a drop to the resumed ``session`` reply
    gap_seconds: list[float] = field(default_factory=list)  # from a drop to the first note after the resume
    duplicates: int = 0  # notes received again after a resume: a (beat, pitch, voice) an earlier connection had
    backwards: int = 0  # notes starting earlier than one received before them
    ended: bool = False  # a drop it could not resume from: the stream is lost


@dataclass
class Report:
    sessions: int
    seconds: float
    held: int
    notes: int
    notes_per_second: float
    late_notes: int
    headroom_p50: float | None
    headroom_p1: float | None
    headroom_min: float | None
    errors: dict[str, int]
    played: int = 0
    answered: int = 0
    answer_latency_p50: float | None = None
    answer_latency_p99: float | None = None
    answer_latency_max: float | None = None
    drops: int = 0
    resumes: int = 0
    resume_p50: float | None = None
    resume_p99: float | None = None
    resume_max: float | None = None
    gap_p50: float | None = None
    gap_p99: float | None = None
    gap_max: float | None = None
    duplicates: int = 0
    backwards: int = 0
    sessions_ended: int = 0
    last_beat_refused: bool = False
    per_session: list[dict] = field(default_factory=list)
    server_tokens_per_second: float | None = None
    server_mean_batch: float | None = None
    server_state_bytes: float | None = None
    server_late_notes: float | None = None


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, math.ceil(q / 100 * len(ordered)) - 1))
    return ordered[index]


class Player:
    """A session's played notes: one every ``every`` seconds, and which of them were answered.

    It plays the pitch and length of the latest note it received (one the model's vocabulary holds,
    so a small model reads it too), starting now."""

    def __init__(self, every: float) -> None:
        self.every = every
        self.waiting: list[tuple[float, float]] = []  # (start on the session clock, unix time sent)
        self.count = 0
        self.heard = {"pitch": 60, "duration": 0.25}

    def note(self, clock: float) -> tuple[dict, float]:
        """The next played note (starting now on the session clock), and when to play the one after."""
        now = time.time()
        start = max(0.0, now - clock)
        self.waiting.append((start, now))
        self.count += 1
        return {**self.heard, "velocity": 90, "start": round(start, 6)}, now + self.every

    def answered(self, clock: float, note: dict) -> list[float]:
        """The answer latencies ``note`` completes: for every played note its ``heard_until`` covers."""
        self.heard = {"pitch": note["pitch"], "duration": note["duration"]}
        heard = note.get("heard_until")
        if heard is None:
            return []
        done = [(s, sent) for s, sent in self.waiting if s <= heard + 1e-6]
        self.waiting = [w for w in self.waiting if w[0] > heard + 1e-6]
        return [clock + float(note["start"]) - sent for _, sent in done]


def describe(exc: BaseException) -> str:
    """A lost or refused connection in a few words: the close code, the HTTP status, or the error's name."""
    if isinstance(exc, websockets.ConnectionClosed):
        return str(exc.rcvd.code if exc.rcvd is not None else 1006)  # 1006: closed without a close frame
    response = getattr(exc, "response", None)
    if response is not None and hasattr(response, "status_code"):
        return f"HTTP {response.status_code}"
    return type(exc).__name__


class LoadSession:
    """One session of the run: streams until ``stop_at``, measures every note, and after a dropped
    connection reconnects (:class:`Reconnect`) and resumes with its token, keeping its measures and
    its :class:`Player`.

    ``run`` is: connect and start -> :meth:`stream` -> on a drop, :meth:`resume` and stream on ->
    stop. A drop before the ``session`` reply (no token yet) cannot be resumed: it is an error."""

    def __init__(self, url: str, index: int, start: dict, stop_at: float, headers: dict[str, str] | None,
                 play_every: float, reconnect: Reconnect, last_beat: LastBeat) -> None:
        self.url, self.index, self.start, self.stop_at, self.headers = url, index, start, stop_at, headers
        self.play_every = play_every
        self.reconnect, self.last_beat_field = reconnect, last_beat
        self.result = SessionResult()
        self.player = Player(play_every) if play_every > 0 else None
        self.play_at = math.inf
        self.clock: float | None = None
        self.token: str | None = None
        self.connection = 0  # how many connections this session has had (1: the first)
        self.received: dict[tuple[float, int, int], int] = {}  # (beat, pitch, voice) -> the connection it came on
        self.latest_start = -math.inf
        self.last_beat: float | None = None
        self.dropped_at: float | None = None  # set from a drop to the first note after its resume
        self.rng = random.Random(index)  # back-off jitter

    async def run(self) -> SessionResult:
        result = self.result
        try:
            ws = await self.connect(open_timeout=60)
            self.connection = 1
            await ws.send(json.dumps({"type": "start", "seed": self.index + 1, **self.start}))
        except CONNECTION_ERRORS as exc:
            result.errors[f"connection: {describe(exc)}"] += 1
            return result
        while ws is not None:
            try:
                await self.stream(ws)
                break
            except CONNECTION_ERRORS as exc:
                dropped_at = time.time()
                await ws.close()  # already lost: this only frees it
                if self.token is None:
                    result.errors[f"connection: {describe(exc)}"] += 1
                    return result
                result.drops += 1
                ws = await self.resume(dropped_at)
        result.held = ws is not None and not result.errors and self.clock is not None
        if self.player is not None:
            result.played = self.player.count
            result.unanswered = len(self.player.waiting)
        if ws is not None:
            with contextlib.suppress(*CONNECTION_ERRORS):
                await ws.send(json.dumps({"type": "stop"}))
            await ws.close()
        return result

    async def connect(self, open_timeout: float) -> websockets.ClientConnection:
        return await websockets.connect(self.url, max_size=None, open_timeout=open_timeout,
                                        additional_headers=self.headers)

    async def stream(self, ws: websockets.ClientConnection) -> None:
        """Play and receive until ``stop_at``; a lost connection raises one of :data:`CONNECTION_ERRORS`."""
        while (remaining := self.stop_at - time.time()) > 0:
            if self.player is not None and self.clock is not None and time.time() >= self.play_at:
                note, self.play_at = self.player.note(self.clock)
                await ws.send(json.dumps({"type": "notes", "notes": [note]}))
            try:
                raw = await asyncio.wait_for(ws.recv(), timeout=max(0.001, min(remaining, self.play_at - time.time())))
            except asyncio.TimeoutError:
                continue
            self.on_message(json.loads(raw), time.time())

    def on_message(self, message: dict, arrived: float) -> None:
        kind = message.get("type")
        if kind == "session":
            self.clock, self.token = message["clock"], message["resume_token"]
            if self.player is not None:
                self.play_at = max(time.time(), self.clock) + self.play_every / 2
        elif kind == "notes" and self.clock is not None:
            for note in message["notes"]:
                self.on_note(note, arrived)
            self.result.notes += len(message["notes"])
        elif kind == "error":
            self.result.errors[message.get("code", "?")] += 1

    def on_note(self, note: dict, arrived: float) -> None:
        result = self.result
        if self.dropped_at is not None:
            result.gap_seconds.append(arrived - self.dropped_at)
            self.dropped_at = None
        headroom = self.clock + note["start"] - arrived
        result.headroom.append(headroom)
        result.late += headroom < 0
        # Received twice: on an earlier connection too. The model itself may put two equal notes on one
        # beat; they leave together, in one frame on one connection, and are not counted.
        key = (note["beat"], note["pitch"], note["voice"])
        result.duplicates += self.received.setdefault(key, self.connection) < self.connection
        result.backwards += note["start"] < self.latest_start - 1e-6
        self.latest_start = max(self.latest_start, note["start"])
        self.last_beat = note["beat"] if self.last_beat is None else max(self.last_beat, note["beat"])
        if self.player is not None:
            result.answer_latency += self.player.answered(self.clock, note)

    async def resume(self, dropped_at: float) -> websockets.ClientConnection | None:
        """Reconnect with back-off until the session resumes; the new connection, or None when it
        cannot (the reason goes to ``errors`` and the session counts as ended)."""
        cfg, result = self.reconnect, self.result
        deadline = dropped_at + cfg.timeout
        delay, last = cfg.first_delay, "no attempt"
        while (wait := min(delay * self.rng.uniform(0.5, 1.5), deadline - time.time())) > 0:
            await asyncio.sleep(wait)
            delay = min(2 * delay, cfg.max_delay)
            if (remaining := deadline - time.time()) <= 0:
                break
            try:
                ws = await self.connect(open_timeout=remaining)
            except CONNECTION_ERRORS as exc:
                last = describe(exc)
                continue
            try:
                reply = await asyncio.wait_for(self.ask_resume(ws), remaining)
            except CONNECTION_ERRORS as exc:
                await ws.close()
                last = describe(exc)
                continue
            if reply.get("type") == "session" and reply.get("resumed"):
                result.resume_seconds.append(time.time() - dropped_at)
                self.clock, self.token = reply["clock"], reply["resume_token"]
                self.dropped_at = dropped_at
                self.connection += 1
                return ws
            await ws.close()
            code = reply.get("code", "a new session, not the old one")
            if code == UNKNOWN_RESUME_TOKEN and time.time() - dropped_at < cfg.in_use_grace:
                last = code
                continue
            result.errors[f"resume failed: {code}"] += 1
            result.ended = True
            return None
        result.errors[f"resume failed: none within {cfg.timeout:g} s (last: {last})"] += 1
        result.ended = True
        return None

    async def ask_resume(self, ws: websockets.ClientConnection) -> dict:
        """Send the resume ``start``; the ``session`` reply, or the ``error`` that refused it."""
        with_beat = self.last_beat is not None and not self.last_beat_field.refused
        await ws.send(json.dumps(self.resume_start(with_beat)))
        while True:
            message = json.loads(await ws.recv())
            if message.get("type") == "session":
                return message
            if message.get("type") != "error":
                continue
            if with_beat and message.get("code") == INVALID_MESSAGE:  # a server from before last_beat
                self.last_beat_field.refused, with_beat = True, False
                await ws.send(json.dumps(self.resume_start(with_beat)))
                continue
            return message

    def resume_start(self, with_beat: bool) -> dict:
        start = {"type": "start", "resume_token": self.token}
        if with_beat:
            start["last_beat"] = self.last_beat
        return start


def metrics_url(ws_url: str) -> str:
    return re.sub(r"^ws", "http", ws_url).rsplit("/", 1)[0] + "/metrics"


def read_metrics(url: str, headers: dict[str, str] | None = None) -> dict[str, float] | None:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=10) as response:
            text = response.read().decode()
    except (urllib.error.URLError, OSError, ValueError):
        return None
    values: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("#") or not line.strip():
            continue
        name, _, value = line.rpartition(" ")
        try:
            values[name] = float(value)
        except ValueError:
            continue
    return values


async def watch(url: str, every: float, stop_at: float, headers: dict[str, str] | None = None) -> None:
    """Print the server's memory and state figures every ``every`` seconds (to stderr)."""
    began = time.time()
    while time.time() < stop_at:
        values = await asyncio.to_thread(read_metrics, url, headers) or {}
        print(f"[{time.time() - began:7.0f} s] sessions {values.get('fm_sessions', float('nan')):.0f}  "
              f"tokens {values.get('fm_tokens_total', float('nan')):.0f}  "
              f"state {values.get('fm_session_state_bytes', float('nan')):.0f} B/session  "
              f"slot {values.get('fm_session_slot_bytes', float('nan')):.0f} B/session  "
              f"server RSS {values.get('process_resident_memory_bytes', float('nan')) / 2**20:.1f} MiB",
              file=sys.stderr, flush=True)
        await asyncio.sleep(every)


async def run(url: str, sessions: int, seconds: float, start: dict, ramp: float, every: float = 0,
              headers: dict[str, str] | None = None, play_every: float = 0.0,
              reconnect: Reconnect | None = None) -> Report:
    before = read_metrics(metrics_url(url), headers)
    began = time.time()
    stop_at = began + ramp + seconds
    reconnect = reconnect or Reconnect()
    last_beat = LastBeat()
    tasks = []
    watcher = asyncio.create_task(watch(metrics_url(url), every, stop_at, headers)) if every > 0 else None
    for i in range(sessions):
        session = LoadSession(url, i, start, stop_at, headers, play_every, reconnect, last_beat)
        tasks.append(asyncio.create_task(session.run()))
        if ramp:
            await asyncio.sleep(ramp / sessions)
    results = await asyncio.gather(*tasks)
    if watcher is not None:
        watcher.cancel()
    elapsed = time.time() - began
    after = read_metrics(metrics_url(url), headers)
    headroom = [h for r in results for h in r.headroom]
    errors: Counter = Counter()
    for r in results:
        errors.update(r.errors)
    notes = sum(r.notes for r in results)
    report = Report(sessions=sessions, seconds=round(elapsed, 1), held=sum(r.held for r in results), notes=notes,
                    notes_per_second=round(notes / elapsed, 1), late_notes=sum(r.late for r in results),
                    headroom_p50=_round(percentile(headroom, 50)), headroom_p1=_round(percentile(headroom, 1)),
                    headroom_min=_round(min(headroom, default=None)), errors=dict(errors))
    latency = [a for r in results for a in r.answer_latency]
    report.played = sum(r.played for r in results)
    report.answered = len(latency)
    report.answer_latency_p50 = _round(percentile(latency, 50))
    report.answer_latency_p99 = _round(percentile(latency, 99))
    report.answer_latency_max = _round(max(latency, default=None))
    add_resumes(report, results, last_beat)
    if before and after:
        tokens = after.get("fm_tokens_total", 0) - before.get("fm_tokens_total", 0)
        batches = after.get("fm_batch_size_count", 0) - before.get("fm_batch_size_count", 0)
        batch_sum = after.get("fm_batch_size_sum", 0) - before.get("fm_batch_size_sum", 0)
        report.server_tokens_per_second = round(tokens / elapsed, 1)
        report.server_mean_batch = round(batch_sum / batches, 1) if batches else None
        report.server_state_bytes = after.get("fm_session_state_bytes")
        report.server_late_notes = after.get("fm_late_notes_total", 0) - before.get("fm_late_notes_total", 0)
    return report


def add_resumes(report: Report, results: list[SessionResult], last_beat: LastBeat) -> None:
    """The figures of dropped connections and resumes, and each session's own."""
    resumes = [s for r in results for s in r.resume_seconds]
    gaps = [g for r in results for g in r.gap_seconds]
    report.drops = sum(r.drops for r in results)
    report.resumes = len(resumes)
    report.resume_p50, report.resume_p99 = _round(percentile(resumes, 50)), _round(percentile(resumes, 99))
    report.resume_max = _round(max(resumes, default=None))
    report.gap_p50, report.gap_p99 = _round(percentile(gaps, 50)), _round(percentile(gaps, 99))
    report.gap_max = _round(max(gaps, default=None))
    report.duplicates = sum(r.duplicates for r in results)
    report.backwards = sum(r.backwards for r in results)
    report.sessions_ended = sum(r.ended for r in results)
    report.last_beat_refused = last_beat.refused
    report.per_session = [{"held": r.held, "notes": r.notes, "drops": r.drops, "resumes": len(r.resume_seconds),
                           "duplicates": r.duplicates, "backwards": r.backwards, "ended": r.ended}
                          for r in results]


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 4)


def format_report(r: Report) -> str:
    ms = lambda v: "-" if v is None else f"{v * 1000:.0f} ms"
    lines = [f"sessions held      {r.held}/{r.sessions} for {r.seconds} s",
             f"notes              {r.notes} ({r.notes_per_second}/s)"
             + "".join(f", {n} {what}" for n, what in ((r.duplicates, "duplicates"), (r.backwards, "backwards")) if n),
             f"late notes         {r.late_notes}",
             f"headroom           p50 {ms(r.headroom_p50)}, p1 {ms(r.headroom_p1)}, min {ms(r.headroom_min)}",
             *([f"answer latency     p50 {ms(r.answer_latency_p50)}, p99 {ms(r.answer_latency_p99)}, "
                f"max {ms(r.answer_latency_max)} ({r.answered} of {r.played} played notes answered)"]
               if r.played else []),
             *([f"resumes            {r.resumes} of {r.drops} dropped connections ({r.sessions_ended} sessions "
                f"ended): p50 {ms(r.resume_p50)}, p99 {ms(r.resume_p99)}, max {ms(r.resume_max)}",
                f"first note after   p50 {ms(r.gap_p50)}, p99 {ms(r.gap_p99)}, max {ms(r.gap_max)} from the drop"
                + ("; the server refused last_beat (it predates it)" if r.last_beat_refused else "")]
               if r.drops else []),
             f"errors             {sum(r.errors.values())}" + (f" {r.errors}" if r.errors else "")]
    if r.server_tokens_per_second is not None:
        lines.append(f"server tokens/s    {r.server_tokens_per_second} (mean batch {r.server_mean_batch}, "
                     f"state {r.server_state_bytes:.0f} bytes/session)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m client.loadgen", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--url", default="ws://127.0.0.1:8000/ws", help="the server's WebSocket URL")
    parser.add_argument("--sessions", type=int, default=16, help="concurrent sessions")
    parser.add_argument("--seconds", type=float, default=30.0, help="how long each session streams")
    parser.add_argument("--bpm", type=float, default=120.0, help="tempo of every session")
    parser.add_argument("--temperature", type=float, default=None, help="sampling temperature (server default if unset)")
    parser.add_argument("--ramp", type=float, default=0.0, help="seconds over which the sessions are opened")
    parser.add_argument("--watch", type=float, default=0.0,
                        help="every this many seconds, print the server's sessions, tokens, state bytes per "
                             "session and resident memory to stderr (0 = off)")
    parser.add_argument("--play-rate", type=float, default=0.0, metavar="SECONDS",
                        help="each session plays a note every this many seconds and measures the answer latency "
                             "(0 = plays nothing)")
    parser.add_argument("--lookahead", type=float, default=None,
                        help="each session's lookahead in seconds (server default if unset; at least 0.05)")
    parser.add_argument("--resume-timeout", type=float, default=Reconnect.timeout, metavar="SECONDS",
                        help="a session whose connection drops reconnects to --url and resumes with its token, "
                             "trying for this long (then it counts as not held)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--api-key", default=os.environ.get("FM_API_KEY", ""),
                        help="the server's API key, if it has one (default: $FM_API_KEY)")
    args = parser.parse_args(argv)
    if args.sessions < 1 or args.seconds <= 0 or args.play_rate < 0 or args.resume_timeout < 0:
        parser.error("--sessions must be >= 1, --seconds > 0, --play-rate >= 0 and --resume-timeout >= 0")
    start = {"bpm": args.bpm}
    if args.temperature is not None:
        start["temperature"] = args.temperature
    if args.lookahead is not None:
        start["lookahead"] = args.lookahead
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else None
    report = asyncio.run(run(args.url, args.sessions, args.seconds, start, args.ramp, args.watch, headers,
                             args.play_rate, Reconnect(timeout=args.resume_timeout)))
    print(json.dumps(asdict(report)) if args.json else format_report(report))
    return 0 if report.held == report.sessions else 1


if __name__ == "__main__":
    sys.exit(main())
