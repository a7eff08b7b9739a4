"""Sessions that outlive their replica, for real: a Redis server, ``python -m server`` replicas sharing it
(``--store``) behind HAProxy running the shipped ``deploy/haproxy.cfg``, and ``client.loadgen`` streaming
through the proxy, each started by the test (tests/cluster_harness.py).

* A replica killed with SIGKILL mid-stream: every one of its sessions resumes on another replica from
  the store, with no note received twice and no start going backwards.
* A rolling restart onto another checkpoint (SIGTERM saves every session first): no session ends, and
  the sessions that land on the new checkpoint are re-read there.
"""

from __future__ import annotations

import contextlib
import json
import re
import subprocess
import sys

import pytest

from tests.cluster_harness import free_port, haproxy, http_get, redis_server, server_process
from tests.conftest import REPO
from tests.waiting import wait_for

SNAPSHOT_SECONDS = "1"
CHECK_SECONDS = 60.0  # HAProxy checks every 500 ms; the machine may be busy
SHIPPED = str(REPO / "checkpoints" / "default")


def metric(server, name: str) -> float:
    """The sum of a metric's samples on ``server`` (0 when it has none yet)."""
    status, body = http_get(server.port, "/metrics")
    assert status == 200
    pattern = re.compile(rf"^{re.escape(name)}(\{{[^}}]*\}})? ([0-9.e+-]+)$", re.M)
    return sum(float(value) for _, value in pattern.findall(body.decode()))


def replica_args(checkpoint, store: str) -> list[str]:
    return ["--checkpoint", str(checkpoint), "--store", store, "--snapshot-seconds", SNAPSHOT_SECONDS,
            "--threads", "1", "--resume-seconds", "120"]


def start_loadgen(proxy, sessions: int, seconds: float) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "client.loadgen", "--url", proxy.ws_url, "--sessions", str(sessions),
                             "--seconds", str(seconds), "--bpm", "240", "--json", "--resume-timeout", "60"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)


def finished(loadgen: subprocess.Popen, timeout: float = 300) -> dict:
    out, err = loadgen.communicate(timeout=timeout)
    assert out.strip(), f"loadgen printed nothing; stderr:\n{err[-3000:]}"
    return json.loads(out)


def streaming_everywhere(servers, sessions: int) -> bool:
    """Every session connected, and each saved at least twice."""
    connected = sum(metric(s, "fm_sessions") for s in servers)
    saved = sum(metric(s, "fm_snapshots_saved_total") for s in servers)
    return connected == sessions and saved >= 2 * sessions


def what_streams(servers, loadgen: subprocess.Popen) -> str:
    """What there was instead of every session streaming: each replica's sessions and saves, and the
    load generator's end when it has ended."""
    seen = [f"{s.address}: {metric(s, 'fm_sessions'):.0f} sessions, {metric(s, 'fm_snapshots_saved_total'):.0f} saved"
            for s in servers]
    if loadgen.poll() is not None:
        out, err = loadgen.communicate()
        seen.append(f"loadgen exited {loadgen.returncode}: {out[-1500:]} {err[-1500:]}")
    return "every session streaming and saved twice; " + "; ".join(seen)


def assert_nothing_lost(report: dict, sessions: int) -> None:
    assert report["held"] == sessions and report["sessions_ended"] == 0, report
    assert report["duplicates"] == 0 and report["backwards"] == 0, report
    assert not report["last_beat_refused"]
    assert report["notes"] > 0


def test_a_killed_replica_s_sessions_go_on_on_another_from_the_store(served_checkpoint, timing_report):
    sessions = 6
    with redis_server() as store, \
            server_process(replica_args(served_checkpoint, store), wait=False) as first, \
            server_process(replica_args(served_checkpoint, store), wait=False) as second:
        first.wait_healthy(), second.wait_healthy()
        replicas = [first, second]
        with haproxy([r.address for r in replicas]) as proxy:
            wait_for(lambda: len(proxy.up()) == 2, CHECK_SECONDS, lambda: f"both replicas UP: {proxy.states()}")
            loadgen = start_loadgen(proxy, sessions, 16)
            wait_for(lambda: streaming_everywhere(replicas, sessions), 120, lambda: what_streams(replicas, loadgen))
            victim = max(replicas, key=lambda r: metric(r, "fm_sessions"))
            survivor = first if victim is second else second
            moved = int(metric(victim, "fm_sessions"))
            assert moved >= 1
            victim.kill()
            report = finished(loadgen)
            restored = metric(survivor, "fm_sessions_restored_total")
    assert_nothing_lost(report, sessions)
    assert report["resumes"] >= moved
    assert restored >= moved  # the survivor's /metrics counts the sessions it took over
    ms = lambda key: f"{report[key] * 1000:.0f} ms"
    timing_report("failover_resume",
                  f"SIGKILL of a replica holding {moved} of {sessions} sessions: {report['resumes']} resumed on the other "
                  f"from Redis, resume p50 {ms('resume_p50')}, p99 {ms('resume_p99')}; first note after the drop p50 "
                  f"{ms('gap_p50')}, p99 {ms('gap_p99')}; {report['duplicates']} duplicates, {report['backwards']} "
                  f"backwards, {report['late_notes']} late of {report['notes']} notes", report=report)


def test_a_rolling_restart_onto_another_checkpoint_ends_no_session(served_checkpoint, timing_report):
    """Old replicas serve the tiny test checkpoint, new ones the shipped one (another vocabulary too)."""
    sessions = 4
    later = [free_port(), free_port()]
    with redis_server() as store, contextlib.ExitStack() as started, \
            server_process(replica_args(served_checkpoint, store), wait=False) as old_a, \
            server_process(replica_args(served_checkpoint, store), wait=False) as old_b:
        old_a.wait_healthy(), old_b.wait_healthy()
        backends = [old_a.address, old_b.address] + [f"127.0.0.1:{port}" for port in later]
        with haproxy(backends) as proxy:
            # Every slot checked first: until its first failed check HAProxy counts a successor's empty
            # slot as up, and leastconn sends a new connection there and its retry to the other empty one.
            checked = lambda states: [states[b].split()[0] for b in backends] == ["UP", "UP", "DOWN", "DOWN"]
            wait_for(lambda: checked(proxy.states()), CHECK_SECONDS,
                     lambda: f"the old replicas UP and the empty slots DOWN: {proxy.states()}")
            loadgen = start_loadgen(proxy, sessions, 40)
            wait_for(lambda: streaming_everywhere([old_a, old_b], sessions), 120,
                     lambda: what_streams([old_a, old_b], loadgen))
            new = []
            for old, port in zip((old_a, old_b), later):
                new.append(started.enter_context(server_process(replica_args(SHIPPED, store), port=port)))
                wait_for(lambda: f"127.0.0.1:{port}" in proxy.up(), CHECK_SECONDS,
                         lambda: f"the new replica UP: {proxy.states()}")
                assert old.terminate() in (0, -15)  # SIGTERM: saves every session, then exits
                assert "sessions to redis://" in old.log()
                live = [r for r in (old_a, old_b, *new) if r.alive()]
                wait_for(lambda: sum(metric(r, "fm_sessions") for r in live) == sessions, 120,
                         lambda: f"every session connected again: {[metric(r, 'fm_sessions') for r in live]}")
            report = finished(loadgen)
            reread = sum(metric(r, "fm_sessions_reread_total") for r in new)
    assert_nothing_lost(report, sessions)
    assert report["resumes"] >= sessions  # every session moved at least once
    assert reread >= 1  # and the ones on the new checkpoint were re-read there
    timing_report("rolling_restart",
                  f"rolling restart of 2 replicas onto another checkpoint under {sessions} sessions: "
                  f"{report['resumes']} resumes, resume p99 {report['resume_p99'] * 1000:.0f} ms, {int(reread)} re-read, "
                  f"{report['duplicates']} duplicates, {report['late_notes']} late of {report['notes']} notes",
                  report=report)
