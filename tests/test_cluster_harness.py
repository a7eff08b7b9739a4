"""The scale-out deployment for real: two ``python -m server`` processes behind HAProxy running the shipped
``deploy/haproxy.cfg``, and a Redis server, each started by the test (tests/cluster_harness.py)."""

from __future__ import annotations

import json

import pytest
from websockets.sync.client import connect

from tests.cluster_harness import free_port, haproxy, http_get, redis_answers, redis_server, server_process
from tests.server_harness import collect_notes, receive_until
from tests.waiting import wait_for

REPLICA_ARGS = ["--threads", "1"]  # the shipped checkpoint; one thread each on a small machine
CHECK_SECONDS = 30.0  # generous: HAProxy checks every 500 ms, and this machine may be busy


@pytest.fixture(scope="module")
def replicas():
    """Two servers, loading their models at the same time."""
    with server_process(REPLICA_ARGS, wait=False) as first, server_process(REPLICA_ARGS, wait=False) as second:
        first.wait_healthy()
        second.wait_healthy()
        yield [first, second]


@pytest.fixture(scope="module")
def proxy(replicas):
    with haproxy([r.address for r in replicas]) as running:
        wait_for(lambda: all(running.states()[r.address] == "UP" for r in replicas), CHECK_SECONDS,
                 lambda: f"both replicas checked UP; HAProxy says {running.states()}")
        yield running


def through_proxy_health(proxy, times: int) -> list[int]:
    return [http_get(proxy.port, "/health")[0] for _ in range(times)]


def session_notes(url: str, count: int = 3) -> list[dict]:
    """Start a session at ``url`` and read frames until ``count`` generated notes have come."""
    with connect(url, open_timeout=30, max_size=None) as ws:
        ws.send(json.dumps({"type": "start", "seed": 3}))
        session = receive_until(ws, "session", timeout=60)
        assert session["resumed"] is False and session["resume_token"]
        return collect_notes(ws, count, timeout=60)


def test_redis_server_answers_and_goes_away_on_exit():
    import redis

    with redis_server() as url:
        assert url.startswith("redis://127.0.0.1:") and url.endswith("/0")
        client = redis.Redis.from_url(url)
        client.set("fm:test", b"kept")
        assert client.get("fm:test") == b"kept"
        port = client.connection_pool.connection_kwargs["port"]
    assert not redis_answers(port)


def test_health_answers_through_the_proxy(proxy):
    assert through_proxy_health(proxy, 6) == [200] * 6
    assert proxy.healthy()


def test_a_websocket_session_through_the_proxy_gets_notes(proxy):
    notes = session_notes(proxy.ws_url)
    assert len(notes) == 3
    assert all(0 <= note["pitch"] <= 127 and note["duration"] > 0 for note in notes)


def test_the_proxy_carries_on_after_a_replica_is_killed(replicas, proxy):
    dead, alive = replicas
    dead.kill()
    # Before HAProxy has noticed, a request that meets the dead replica is retried on the other.
    assert through_proxy_health(proxy, 6) == [200] * 6
    wait_for(lambda: proxy.states()[dead.address].startswith("DOWN"), CHECK_SECONDS,
             lambda: f"HAProxy to take the killed replica out; it says {proxy.states()}")
    assert proxy.up() == [alive.address]
    assert through_proxy_health(proxy, 6) == [200] * 6
    assert len(session_notes(proxy.ws_url)) == 3
    assert proxy.healthy()


def test_a_proxy_without_a_live_replica_says_so():
    nothing = f"127.0.0.1:{free_port()}"  # nothing listens there
    with haproxy([nothing]) as lonely:
        wait_for(lambda: lonely.states()[nothing].startswith("DOWN"), CHECK_SECONDS,
                 lambda: f"the replica checked DOWN; HAProxy says {lonely.states()}")
        assert not lonely.healthy()
        assert http_get(lonely.port, "/health")[0] == 503

