"""python -m client.loadgen against a real server, directly and through a TCP relay that cuts its
connections (a network failure, or a proxy losing its backend)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import struct
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

from client.loadgen import LastBeat, LoadSession, Reconnect
from server.config import ServerConfig
from tests.conftest import run_module
from tests.server_harness import running_server
from tests.waiting import wait_for


class FrameCounter:
    """Counts the WebSocket frames a server sends, from its bytes (after the HTTP upgrade; a server's
    frames are not masked). Their payloads may be compressed, so frames are counted, not read."""

    def __init__(self) -> None:
        self.pending = b""
        self.upgraded = False
        self.frames = 0

    def feed(self, data: bytes) -> None:
        self.pending += data
        if not self.upgraded:
            _, upgraded, rest = self.pending.partition(b"\r\n\r\n")
            if not upgraded:
                return
            self.upgraded, self.pending = True, rest
        while len(self.pending) >= 2:
            length, at = self.pending[1] & 0x7F, 2
            if length >= 126:
                at = 4 if length == 126 else 10
                length = int.from_bytes(self.pending[2:at], "big")
            if len(self.pending) < at + length:
                return
            self.pending = self.pending[at + length:]
            self.frames += 1


@dataclass
class Link:
    """One relayed connection: the client's side, the server's, and the server's frames so far."""

    client: asyncio.StreamWriter
    server: asyncio.StreamWriter
    frames: FrameCounter = field(default_factory=FrameCounter)

    @property
    def notes(self) -> bool:
        """Whether notes reached the client: a frame after ``session`` and ``state``."""
        return self.frames.frames >= 3


class Relay:
    """A TCP relay on a free loopback port to ``target`` (a port), piping bytes both ways, in a
    thread of its own. :meth:`cut` resets every connection it relays at once and it goes on
    accepting, to the same ``target`` or, like a proxy's next backend, another."""

    def __init__(self, target: int) -> None:
        self.target = target
        self.links: list[Link] = []
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="relay", daemon=True)

    def __enter__(self) -> "Relay":
        self.thread.start()
        self.listener = self.call(lambda: asyncio.start_server(self.relay, "127.0.0.1", 0))
        self.port = self.listener.sockets[0].getsockname()[1]
        return self

    def __exit__(self, *exc) -> None:
        self.cut()
        self.call(lambda: self.stop_listening())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)

    def call(self, fn: Callable):
        """``fn()`` on the relay's loop (awaited if it returns a coroutine); its result."""
        async def run():
            value = fn()
            return await value if asyncio.iscoroutine(value) else value
        return asyncio.run_coroutine_threadsafe(run(), self.loop).result(timeout=10)

    async def stop_listening(self) -> None:
        self.listener.close()
        await self.listener.wait_closed()

    def streaming(self) -> int:
        """How many connections it relays now have carried notes to the client."""
        return self.call(lambda: sum(link.notes for link in self.links))

    def cut(self, then_target: int | None = None) -> int:
        """Reset (RST) both sides of every connection now relayed; how many there were."""
        def cut_all() -> int:
            links, self.links = self.links, []
            for link in links:
                for writer in (link.client, link.server):
                    writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                                              struct.pack("ii", 1, 0))
                    writer.transport.abort()
            if then_target is not None:
                self.target = then_target
            return len(links)
        return self.call(cut_all)

    async def relay(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        try:
            server_reader, server_writer = await asyncio.open_connection("127.0.0.1", self.target)
        except OSError:
            client_writer.transport.abort()
            return
        link = Link(client_writer, server_writer)
        self.links.append(link)
        await asyncio.gather(self.pipe(client_reader, server_writer), self.pipe(server_reader, client_writer, link))
        if link in self.links:
            self.links.remove(link)

    @staticmethod
    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, link: Link | None = None) -> None:
        """Copy ``reader`` to ``writer`` until either side ends, then close ``writer``."""
        try:
            while data := await reader.read(65536):
                if link is not None:
                    link.frames.feed(data)
                writer.write(data)
                await writer.drain()
        except OSError:
            pass
        finally:
            writer.close()


@contextlib.contextmanager
def loadgen(*args: str) -> Iterator[subprocess.Popen]:
    """``python -m client.loadgen ARGS --json`` running in the background (killed if left running)."""
    process = subprocess.Popen([sys.executable, "-m", "client.loadgen", *args, "--json"], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    try:
        yield process
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()


def finished(process: subprocess.Popen, timeout: float = 120) -> dict:
    out, err = process.communicate(timeout=timeout)
    try:
        return json.loads(out)
    except json.JSONDecodeError:
        raise AssertionError(f"loadgen exited {process.returncode} without a report: {out}{err}") from None


def test_loadgen_reports_sessions_notes_and_headroom(live_server, timing_report):
    result = run_module("client.loadgen", "--url", live_server.ws_url, "--sessions", "3", "--seconds", "3",
                        "--bpm", "300", "--json", timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(result.stdout)
    assert report["held"] == 3 and report["errors"] == {}
    assert report["notes"] > 0 and report["notes_per_second"] > 0
    assert report["drops"] == report["resumes"] == report["duplicates"] == report["backwards"] == 0
    assert report["headroom_p50"] is not None and report["headroom_p1"] <= report["headroom_p50"]
    assert report["server_tokens_per_second"] > 0 and report["server_state_bytes"] > 0
    # How much headroom the sessions kept depends on the machine: reported, not asserted.
    p50, p1, low = (report[k] * 1000 for k in ("headroom_p50", "headroom_p1", "headroom_min"))
    timing_report("loadgen_headroom",
                  f"loadgen, {report['sessions']} sessions at 300 bpm for {report['seconds']} s: headroom p50 "
                  f"{p50:.0f} ms, p1 {p1:.0f} ms, min {low:.0f} ms; {report['late_notes']} late of {report['notes']} notes",
                  bpm=300, report=report)


def test_loadgen_counts_sessions_it_could_not_hold():
    result = run_module("client.loadgen", "--url", "ws://127.0.0.1:9/ws", "--sessions", "2", "--seconds", "1",
                        "--json", timeout=60)
    assert result.returncode == 1
    report = json.loads(result.stdout)
    assert report["held"] == 0 and sum(report["errors"].values()) == 2


def test_loadgen_plays_notes_and_reports_the_answer_latency(live_server, timing_report):
    result = run_module("client.loadgen", "--url", live_server.ws_url, "--sessions", "2", "--seconds", "5",
                        "--play-rate", "1", "--lookahead", "0.1", "--json", timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(result.stdout)
    assert report["held"] == 2 and report["played"] >= 4
    assert 0 < report["answered"] <= report["played"]
    p50, p99, worst = (report[k] for k in ("answer_latency_p50", "answer_latency_p99", "answer_latency_max"))
    assert None not in (p50, p99, worst)  # reported (the figures are printed below, never asserted)
    timing_report("loadgen_answer_latency",
                  f"loadgen, 2 sessions playing a note a second, lookahead 0.1 s: answer latency p50 "
                  f"{p50 * 1000:.0f} ms, p99 {p99 * 1000:.0f} ms, max {worst * 1000:.0f} ms; "
                  f"{report['late_notes']} late of {report['notes']} notes", report=report)


def test_loadgen_resumes_every_session_when_the_relay_cuts_its_connections(live_server, timing_report):
    with Relay(live_server.port) as relay, loadgen("--url", f"ws://127.0.0.1:{relay.port}/ws", "--sessions", "3",
                                                   "--seconds", "6", "--bpm", "300") as process:
        wait_for(lambda: relay.streaming() == 3, 60, lambda: f"notes on 3 connections, not {relay.streaming()}")
        assert relay.cut() == 3
        wait_for(lambda: relay.streaming() == 3, 60,
                 lambda: f"notes on 3 resumed connections, not {relay.streaming()}")
        report = finished(process)
    assert process.returncode == 0, report
    assert report["held"] == 3 and report["errors"] == {} and report["sessions_ended"] == 0
    assert report["drops"] == 3 and report["resumes"] >= 3
    assert all(s["held"] and s["resumes"] >= 1 for s in report["per_session"]), report["per_session"]
    assert report["duplicates"] == 0 and report["backwards"] == 0 and report["notes"] > 0
    p50, p99, worst = (report[k] for k in ("resume_p50", "resume_p99", "resume_max"))
    assert None not in (p50, p99, worst, report["gap_p50"], report["gap_p99"])  # reported, not asserted
    timing_report("loadgen_resume",
                  f"loadgen, 3 sessions at 300 bpm, every connection cut once by a relay: {report['resumes']} "
                  f"resumes in p50 {p50 * 1000:.0f} ms, p99 {p99 * 1000:.0f} ms, max {worst * 1000:.0f} ms; "
                  f"first note after the drop p50 {report['gap_p50'] * 1000:.0f} ms, p99 "
                  f"{report['gap_p99'] * 1000:.0f} ms; {report['late_notes']} late of {report['notes']} notes; "
                  f"last_beat {'refused by this server' if report['last_beat_refused'] else 'taken'}",
                  report=report)


def cut_to(live_server, target: int, *args: str) -> dict:
    """A loadgen run of 2 sessions through a relay whose connections are cut, once notes flow, and
    sent on to ``target``; its report."""
    with Relay(live_server.port) as relay, loadgen("--url", f"ws://127.0.0.1:{relay.port}/ws", "--sessions", "2",
                                                   "--seconds", "4", *args) as process:
        wait_for(lambda: relay.streaming() == 2, 60, lambda: f"notes on 2 connections, not {relay.streaming()}")
        assert relay.cut(then_target=target) == 2
        report = finished(process)
    assert process.returncode == 1, report
    assert report["held"] == 0 and report["drops"] == 2 and report["resumes"] == 0
    assert report["sessions_ended"] == 2 and all(s["ended"] for s in report["per_session"])
    return report


def test_loadgen_counts_a_session_whose_resume_token_is_refused_as_not_held(live_server, served_checkpoint):
    with running_server(ServerConfig(checkpoint=str(served_checkpoint))) as fresh:  # never heard of the tokens
        report = cut_to(live_server, fresh.port)
    assert report["errors"] == {"resume failed: unknown_resume_token": 2}


def test_loadgen_gives_up_a_resume_after_resume_timeout(live_server):
    with socket.socket() as nothing:  # bound, never listening: every connection to it is refused
        nothing.bind(("127.0.0.1", 0))
        report = cut_to(live_server, nothing.getsockname()[1], "--resume-timeout", "1")
    [(reason, count)] = report["errors"].items()
    assert count == 2 and reason.startswith("resume failed: none within 1 s"), report["errors"]


def test_loadgen_counts_notes_received_again_after_a_resume_and_notes_that_go_back():
    session = LoadSession("ws://127.0.0.1:9/ws", 0, {}, stop_at=0.0, headers=None, play_every=0.0,
                          reconnect=Reconnect(), last_beat=LastBeat())
    now = time.time()
    session.connection = 1
    session.on_message({"type": "session", "clock": now, "resume_token": "t", "resumed": False}, now)

    def notes(*notes: tuple[float, int, int]) -> None:
        session.on_message({"type": "notes", "notes": [{"pitch": pitch, "velocity": 80, "voice": voice,
                                                        "start": beat / 2, "duration": 0.25, "beat": beat}
                                                       for beat, pitch, voice in notes]}, now)

    notes((0, 60, 0), (0, 60, 0), (0, 60, 1), (1, 62, 0))  # the model's own double on beat 0: not received twice
    assert (session.result.duplicates, session.result.backwards, session.last_beat) == (0, 0, 1)
    session.connection = 2  # resumed: a new connection (as LoadSession.resume counts them)
    notes((1, 62, 0), (0.5, 64, 0), (2, 65, 0))  # beat 1 sent again; beat 0.5 starts before beat 1
    assert (session.result.duplicates, session.result.backwards, session.last_beat) == (1, 1, 2)
    assert session.result.notes == 7
