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
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import math
import re
import sys
import time
import urllib.error
import urllib.request
from collections import Counter
from dataclasses import asdict, dataclass, field

import websockets


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


async def run_session(url: str, index: int, seconds: float, start: dict, stop_at: float,
                      headers: dict[str, str] | None = None, play_every: float = 0.0) -> SessionResult:
    result = SessionResult()
    player = Player(play_every) if play_every > 0 else None
    try:
        async with websockets.connect(url, max_size=None, open_timeout=60, additional_headers=headers) as ws:
            await ws.send(json.dumps({"type": "start", "seed": index + 1, **start}))
            clock = None
            play_at = math.inf
            while True:
                remaining = stop_at - time.time()
                if remaining <= 0:
                    break
                if player is not None and clock is not None and time.time() >= play_at:
                    note, play_at = player.note(clock)
                    await ws.send(json.dumps({"type": "notes", "notes": [note]}))
                try:
                    raw = await asyncio.wait_for(ws.recv(), timeout=max(0.001, min(remaining, play_at - time.time())))
                except asyncio.TimeoutError:
                    continue
                arrived = time.time()
                message = json.loads(raw)
                kind = message.get("type")
                if kind == "session":
                    clock = message["clock"]
                    play_at = max(time.time(), clock) + play_every / 2 if player is not None else math.inf
                elif kind == "notes" and clock is not None:
                    for note in message["notes"]:
                        headroom = clock + note["start"] - arrived
                        result.headroom.append(headroom)
                        result.late += headroom < 0
                        if player is not None:
                            result.answer_latency += player.answered(clock, note)
                    result.notes += len(message["notes"])
                elif kind == "error":
                    result.errors[message.get("code", "?")] += 1
            result.held = not result.errors and clock is not None
            if player is not None:
                result.played = player.count
                result.unanswered = len(player.waiting)
            await ws.send(json.dumps({"type": "stop"}))
    except (OSError, websockets.WebSocketException, asyncio.TimeoutError) as exc:
        code = getattr(getattr(exc, "rcvd", None), "code", None)
        result.errors[f"connection: {code or type(exc).__name__}"] += 1
        result.held = False
    return result


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
              headers: dict[str, str] | None = None, play_every: float = 0.0) -> Report:
    before = read_metrics(metrics_url(url), headers)
    began = time.time()
    stop_at = began + ramp + seconds
    tasks = []
    watcher = asyncio.create_task(watch(metrics_url(url), every, stop_at, headers)) if every > 0 else None
    for i in range(sessions):
        tasks.append(asyncio.create_task(run_session(url, i, seconds, start, stop_at, headers, play_every)))
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
    if before and after:
        tokens = after.get("fm_tokens_total", 0) - before.get("fm_tokens_total", 0)
        batches = after.get("fm_batch_size_count", 0) - before.get("fm_batch_size_count", 0)
        batch_sum = after.get("fm_batch_size_sum", 0) - before.get("fm_batch_size_sum", 0)
        report.server_tokens_per_second = round(tokens / elapsed, 1)
        report.server_mean_batch = round(batch_sum / batches, 1) if batches else None
        report.server_state_bytes = after.get("fm_session_state_bytes")
        report.server_late_notes = after.get("fm_late_notes_total", 0) - before.get("fm_late_notes_total", 0)
    return report


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 4)


def format_report(r: Report) -> str:
    ms = lambda v: "-" if v is None else f"{v * 1000:.0f} ms"
    lines = [f"sessions held      {r.held}/{r.sessions} for {r.seconds} s",
             f"notes              {r.notes} ({r.notes_per_second}/s)",
             f"late notes         {r.late_notes}",
             f"headroom           p50 {ms(r.headroom_p50)}, p1 {ms(r.headroom_p1)}, min {ms(r.headroom_min)}",
             *([f"answer latency     p50 {ms(r.answer_latency_p50)}, p99 {ms(r.answer_latency_p99)}, "
                f"max {ms(r.answer_latency_max)} ({r.answered} of {r.played} played notes answered)"]
               if r.played else []),
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
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--api-key", default=os.environ.get("FM_API_KEY", ""),
                        help="the server's API key, if it has one (default: $FM_API_KEY)")
    args = parser.parse_args(argv)
    if args.sessions < 1 or args.seconds <= 0 or args.play_rate < 0:
        parser.error("--sessions must be >= 1, --seconds > 0 and --play-rate >= 0")
    start = {"bpm": args.bpm}
    if args.temperature is not None:
        start["temperature"] = args.temperature
    if args.lookahead is not None:
        start["lookahead"] = args.lookahead
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else None
    report = asyncio.run(run(args.url, args.sessions, args.seconds, start, args.ramp, args.watch, headers,
                             args.play_rate))
    print(json.dumps(asdict(report)) if args.json else format_report(report))
    return 0 if report.held == report.sessions else 1


if __name__ == "__main__":
    sys.exit(main())
