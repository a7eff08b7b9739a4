"""python -m client.loadgen against a real server."""

from __future__ import annotations

import json

from tests.conftest import run_module


def test_loadgen_reports_sessions_notes_and_headroom(live_server):
    result = run_module("client.loadgen", "--url", live_server.ws_url, "--sessions", "3", "--seconds", "3",
                        "--bpm", "300", "--json", timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(result.stdout)
    assert report["held"] == 3 and report["errors"] == {}
    assert report["notes"] > 0 and report["notes_per_second"] > 0
    assert report["headroom_p50"] is not None and report["headroom_p1"] <= report["headroom_p50"]
    assert report["server_tokens_per_second"] > 0 and report["server_state_bytes"] > 0


def test_loadgen_counts_sessions_it_could_not_hold():
    result = run_module("client.loadgen", "--url", "ws://127.0.0.1:9/ws", "--sessions", "2", "--seconds", "1",
                        "--json", timeout=60)
    assert result.returncode == 1
    report = json.loads(result.stdout)
    assert report["held"] == 0 and sum(report["errors"].values()) == 2
