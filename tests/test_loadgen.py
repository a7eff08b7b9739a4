"""python -m client.loadgen against a real server."""

from __future__ import annotations

import json

from tests.conftest import run_module


def test_loadgen_reports_sessions_notes_and_headroom(live_server, timing_report):
    result = run_module("client.loadgen", "--url", live_server.ws_url, "--sessions", "3", "--seconds", "3",
                        "--bpm", "300", "--json", timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(result.stdout)
    assert report["held"] == 3 and report["errors"] == {}
    assert report["notes"] > 0 and report["notes_per_second"] > 0
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
    assert 0 < p50 <= p99 <= worst  # order statistics of what was measured; the figures are printed below
    timing_report("loadgen_answer_latency",
                  f"loadgen, 2 sessions playing a note a second, lookahead 0.1 s: answer latency p50 "
                  f"{p50 * 1000:.0f} ms, p99 {p99 * 1000:.0f} ms, max {worst * 1000:.0f} ms; "
                  f"{report['late_notes']} late of {report['notes']} notes", report=report)
