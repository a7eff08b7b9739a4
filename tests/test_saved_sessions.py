"""Bookmarks and forks over a real WebSocket (the server keeps them in memory without --store), and
the bad requests around them."""

from __future__ import annotations

import json

import pytest

from server.store import BOOKMARK_PREFIX
from tests.server_harness import collect_notes, receive_until, start_session

FAST = 400  # bpm
COMPARED = 16  # notes compared after a snapshot or fork point


def music(notes: list[dict]) -> list[tuple]:
    """What a listener hears of notes, apart from when the session was started."""
    return [(round(n["beat"], 4), n["pitch"], n["voice"], n["velocity"], round(n["duration"], 4)) for n in notes]


def notes_after(ws, beat: float, count: int, timeout: float = 60.0, seen: list[dict] = ()) -> list[dict]:
    """The next notes after ``beat`` (earlier ones are skipped), ``count`` of them, counting those of
    the messages ``seen`` already (the notes a session sent while the client waited for a reply:
    they may lie after the reply's beat, since the session keeps sending while it is captured)."""
    found = [n for m in seen if m["type"] == "notes" for n in m["notes"] if n["beat"] > beat]
    while len(found) < count:
        message = receive_until(ws, "notes", timeout)
        found += [n for n in message["notes"] if n["beat"] > beat]
    return found[:count]


def test_a_bookmark_starts_a_new_session_that_plays_on_from_it(live_server):
    with live_server.connect() as ws:
        start_session(ws, seed=71, bpm=FAST)
        collect_notes(ws, 10)
        ws.send(json.dumps({"type": "snapshot"}))
        mark = receive_until(ws, "snapshot", skipped=(seen := []))
        assert mark["id"] and mark["bytes"] > 0 and mark["expires_in"] > 600 and mark["beat"] > 0
        parent = notes_after(ws, mark["beat"], COMPARED, seen=seen)
        ws.send(json.dumps({"type": "stop"}))
    with live_server.connect() as ws:  # the parent has ended: the bookmark still holds its moment
        session, state = start_session(ws, snapshot=mark["id"])
        assert session["snapshot"] == mark["id"] and not session["resumed"] and not session["reread"]
        assert state["seed"] == 71 and state["bpm"] == FAST
        again = collect_notes(ws, COMPARED)
    assert min(n["beat"] for n in again) > mark["beat"]  # nothing at or before the bookmark
    assert music(again) == music(parent)


def test_a_bookmark_can_start_with_other_settings(live_server):
    with live_server.connect() as ws:
        start_session(ws, seed=72, bpm=FAST)
        collect_notes(ws, 6)
        ws.send(json.dumps({"type": "snapshot"}))
        mark = receive_until(ws, "snapshot")
    with live_server.connect() as ws:
        _, state = start_session(ws, snapshot=mark["id"], seed=5, temperature=1.2, bpm=200)
        assert (state["seed"], state["temperature"], state["bpm"]) == (5, 1.2, 200)
        assert collect_notes(ws, 4)


def test_a_fork_with_the_same_seed_plays_what_its_parent_plays_and_another_seed_differs(live_server):
    with live_server.connect() as ws:
        start_session(ws, seed=73, bpm=FAST)
        collect_notes(ws, 10)
        ws.send(json.dumps({"type": "fork"}))
        seen: list[dict] = []  # notes sent while the forks were made may lie after their beats
        same = receive_until(ws, "forked", skipped=seen)
        ws.send(json.dumps({"type": "fork", "seed": 999}))
        other = receive_until(ws, "forked", skipped=seen)
        assert same["seed"] == 73 and other["seed"] == 999 and same["resume_token"] != other["resume_token"]
        parent = notes_after(ws, max(same["beat"], other["beat"]), COMPARED, seen=seen)
    assert same["beat"] <= other["beat"]
    heard = {}
    for fork in (same, other):
        with live_server.connect() as ws:
            ws.send(json.dumps({"type": "start", "resume_token": fork["resume_token"]}))
            session = receive_until(ws, "session", 60)
            assert session["resumed"] and session["id"] == fork["id"]
            heard[fork["seed"]] = notes_after(ws, max(same["beat"], other["beat"]), COMPARED)
    assert music(heard[73]) == music(parent)
    assert music(heard[999]) != music(parent)


@pytest.mark.parametrize("start, code", [
    ({"snapshot": "no-such-bookmark"}, "unknown_snapshot"),
    ({"snapshot": "x" * 65}, "invalid_message"),
    ({"snapshot": "abc", "prompt_notes": [{"pitch": 60, "start": 0}]}, "invalid_message"),
    ({"snapshot": "abc", "resume_token": "t"}, "invalid_message"),
    ({"last_beat": 4.0}, "invalid_message"),
], ids=["unknown", "too-long", "with-a-prompt", "with-a-token", "last-beat-alone"])
def test_bad_snapshot_starts_get_an_error_frame(live_server, start, code):
    with live_server.connect() as ws:
        ws.send(json.dumps({"type": "start", **start}))
        error = receive_until(ws, "error")
        assert error["code"] == code and error["message"]
        start_session(ws, seed=1)  # the connection carries on: a good start still works


def stored_bookmark(live_server, seed: int):
    """A bookmark of a short session: its id, the server's bookmark store and the stored bytes."""
    import asyncio

    with live_server.connect() as ws:
        start_session(ws, seed=seed, bpm=FAST)
        collect_notes(ws, 4)
        ws.send(json.dumps({"type": "snapshot"}))
        mark = receive_until(ws, "snapshot")
    store = live_server.server.config.app.state.registry.saved.bookmarks
    return mark["id"], store, asyncio.run(store.get(BOOKMARK_PREFIX + mark["id"]))


def test_a_damaged_bookmark_gets_a_clear_error(live_server):
    """Bytes under a bookmark's key that are not a snapshot (a damaged store) are refused by name."""
    import asyncio

    bookmark, store, data = stored_bookmark(live_server, 74)
    asyncio.run(store.put(BOOKMARK_PREFIX + bookmark, data[: len(data) // 3], 60))
    with live_server.connect() as ws:
        ws.send(json.dumps({"type": "start", "snapshot": bookmark}))
        error = receive_until(ws, "error")
        assert error["code"] == "bad_snapshot" and "cannot be read" in error["message"]


def test_snapshot_and_fork_need_a_session_and_respect_the_limit(served_checkpoint):
    from server.config import ServerConfig
    from tests.server_harness import running_server

    with running_server(ServerConfig(checkpoint=str(served_checkpoint), max_bookmarks_per_session=2)) as server:
        with server.connect() as ws:
            ws.send(json.dumps({"type": "snapshot"}))
            assert receive_until(ws, "error")["code"] == "not_started"
            ws.send(json.dumps({"type": "fork", "seed": -1}))
            assert receive_until(ws, "error")["code"] == "invalid_message"
            start_session(ws, seed=3, bpm=FAST)
            collect_notes(ws, 3)
            ws.send(json.dumps({"type": "snapshot"}))
            receive_until(ws, "snapshot")
            ws.send(json.dumps({"type": "fork"}))
            receive_until(ws, "forked")
            ws.send(json.dumps({"type": "snapshot"}))
            error = receive_until(ws, "error")
            assert error["code"] == "bookmark_limit" and "2" in error["message"]
            assert collect_notes(ws, 3)  # and the session plays on


def test_a_session_resumes_on_another_server_sharing_the_store_and_stops_there(served_checkpoint):
    """Two servers, one Redis: a session dropped on the first goes on on the second from the beat its
    client names, and a stop there deletes it from the store."""
    import redis

    from server.config import ServerConfig
    from tests.cluster_harness import redis_server
    from tests.server_harness import receive, running_server

    with redis_server() as url:
        config = ServerConfig(checkpoint=str(served_checkpoint), store=url, snapshot_seconds=0.5)
        with running_server(config) as first, running_server(config) as second:
            with first.connect() as ws:
                session, _ = start_session(ws, seed=75, bpm=FAST)
                before = collect_notes(ws, 12)
                ws.send(json.dumps({"type": "snapshot"}))
                mark = receive_until(ws, "snapshot")
            last = max(n["beat"] for n in before)
            keys = redis.Redis.from_url(url)
            token_key = f"fm:session:{session['resume_token']}"
            from tests.waiting import wait_for
            wait_for(lambda: keys.exists(token_key), 30, "the dropped session saved to Redis")
            assert keys.pttl(f"{BOOKMARK_PREFIX}{mark['id']}") > 600_000  # a bookmark outlives ten minutes
            with second.connect() as ws:
                ws.send(json.dumps({"type": "start", "resume_token": session["resume_token"], "last_beat": last}))
                again = receive_until(ws, "session", 60)
                assert again["resumed"] and again["id"] == session["id"] and again["clock"] == session["clock"]
                assert not again["reread"]
                after = collect_notes(ws, 12)
                ws.send(json.dumps({"type": "stop"}))
                assert receive_until(ws, "stopped")["notes_sent"] >= len(before)
                with pytest.raises(Exception):
                    while True:
                        receive(ws, timeout=5)
            assert min(n["beat"] for n in after) > last  # nothing the client had is sent again
            assert min(n["start"] for n in after) > max(n["start"] for n in before)  # and time only moves on
            wait_for(lambda: not keys.exists(token_key), 30, "the stopped session deleted from Redis")
            metrics = urllib_get(second.http_url + "/metrics")
            assert 'fm_sessions_restored_total{source="store"} 1.0' in metrics


def urllib_get(url: str) -> str:
    import urllib.request

    with urllib.request.urlopen(url, timeout=10) as response:
        return response.read().decode()


def test_a_store_url_that_is_not_redis_is_refused_at_start():
    from tests.conftest import run_module

    result = run_module("server", "--store", "http://127.0.0.1:6379", timeout=120)
    assert result.returncode == 2 and "--store must look like redis://HOST:PORT/DB" in result.stderr


def test_an_unreachable_store_gives_a_clear_error_and_the_server_carries_on(served_checkpoint):
    from server.config import ServerConfig
    from tests.cluster_harness import free_port
    from tests.server_harness import running_server

    config = ServerConfig(checkpoint=str(served_checkpoint), store=f"redis://127.0.0.1:{free_port()}/0")
    with running_server(config) as server, server.connect() as ws:
        ws.send(json.dumps({"type": "start", "resume_token": "held-by-a-replica-that-died", "last_beat": 3.0}))
        error = receive_until(ws, "error", 30)
        assert error["code"] == "store_failed" and "session store" in error["message"]
        start_session(ws, seed=2, bpm=FAST)  # a new session still starts
        ws.send(json.dumps({"type": "snapshot"}))
        assert receive_until(ws, "error", 30)["code"] == "store_failed"
        assert collect_notes(ws, 3)


def test_a_bookmark_restored_ten_minutes_later_continues_from_the_same_state(live_server):
    """The store's clock moved on by ten minutes (a test cannot wait that long), then past the expiry."""
    import time

    with live_server.connect() as ws:
        start_session(ws, seed=76, bpm=FAST)
        collect_notes(ws, 8)
        ws.send(json.dumps({"type": "snapshot"}))
        mark = receive_until(ws, "snapshot", skipped=(seen := []))
        parent = notes_after(ws, mark["beat"], COMPARED, seen=seen)
        ws.send(json.dumps({"type": "stop"}))
    store = live_server.server.config.app.state.registry.saved.bookmarks
    try:
        store.clock = lambda: time.monotonic() + 600
        with live_server.connect() as ws:
            start_session(ws, snapshot=mark["id"])
            assert music(collect_notes(ws, COMPARED)) == music(parent)
        store.clock = lambda: time.monotonic() + mark["expires_in"] + 1
        with live_server.connect() as ws:
            ws.send(json.dumps({"type": "start", "snapshot": mark["id"]}))
            error = receive_until(ws, "error")
            assert error["code"] == "unknown_snapshot" and "--bookmark-seconds" in error["message"]
    finally:
        store.clock = time.monotonic


def test_a_snapshot_of_a_format_this_server_does_not_read_gets_a_clear_error(live_server):
    import asyncio

    from tests.snapshot_bytes import set_key, with_metadata

    _, store, data = stored_bookmark(live_server, 77)
    asyncio.run(store.put(BOOKMARK_PREFIX + "from-the-future", with_metadata(data, set_key("format", 99)), 60))
    with live_server.connect() as ws:
        ws.send(json.dumps({"type": "start", "snapshot": "from-the-future"}))
        error = receive_until(ws, "error")
        assert error["code"] == "bad_snapshot" and "snapshot format 99: this server reads format 1" in error["message"]
