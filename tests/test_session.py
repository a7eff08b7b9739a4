"""The /ws protocol against a real uvicorn server with real WebSocket clients."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import time
import urllib.request
from types import SimpleNamespace

import pytest
from websockets.exceptions import ConnectionClosed

from model.timebase import Timeline
from server import session as session_module
from server.config import ServerConfig
from server.connection import Connection
from server.engine import StreamNote
from server.protocol import ErrorCode, RequestError
from server.session import SEND_WINDOW, Session
from tests.midi_builders import build_midi
from tests.server_harness import collect_notes, receive, receive_until, running_server, start_session
from tests.timing import spread


def melody(notes: list[dict]) -> list[tuple]:
    return [(n["pitch"], round(n["beat"], 3), n["voice"]) for n in notes]


FAST = 400  # bpm: the tests hear the stream at the fastest tempo allowed


@contextlib.contextmanager
def resumed_session(server, token: str, timeout: float = 30.0):
    """A new connection holding the session of ``token``, and the server's ``session`` reply.

    The server refuses the token while the session's old connection is still attached, and lets
    that go only when it has handled the close, which a busy machine can delay past our reconnect:
    a refusal is tried again until ``timeout``.
    """
    deadline = time.monotonic() + timeout
    while True:
        with server.connect() as ws:
            ws.send(json.dumps({"type": "start", "resume_token": token}))
            reply = receive(ws)
            while reply["type"] not in ("session", "error"):
                reply = receive(ws)
            if reply["type"] == "session":
                yield ws, reply
                return
        assert reply["code"] == "unknown_resume_token", reply
        assert time.monotonic() < deadline, f"the server still refuses the resume token after {timeout:g} s: {reply}"
        time.sleep(0.05)


def stream_of(server, count: int, **start) -> list[dict]:
    with server.connect() as ws:
        start_session(ws, **{"bpm": FAST, **start})
        return collect_notes(ws, count)


def test_a_session_streams_timed_notes(live_server, timing_report):
    with live_server.connect() as ws:
        asked = time.time()
        session, state = start_session(ws, bpm=FAST, seed=3)
        answered = time.time()
        assert session["id"] and session["resume_token"] and not session["resumed"]
        # The clock is a unix time: session second 0 lies at most a lookahead after the answer.
        assert asked <= session["clock"] <= answered + session["lookahead"], (asked, session, answered)
        assert state["state"] == "playing" and state["bpm"] == FAST and state["seed"] == 3
        arrivals = []
        while len(arrivals) < 30:
            message = receive(ws)
            if message["type"] == "notes":
                arrivals += [(time.time(), n) for n in message["notes"]]
    headroom = [session["clock"] + note["start"] - arrived for arrived, note in arrivals]
    for _, note in arrivals:
        assert 0 <= note["pitch"] <= 127 and 1 <= note["velocity"] <= 127 and note["duration"] > 0
    # A note never leaves the server more than a lookahead (and the few ms it groups notes by) before
    # its start. A busy machine can only make it arrive later, which the headroom figures show and
    # test_notes_leave_a_lookahead_before_their_start pins down on a fake clock.
    assert max(headroom) <= session["lookahead"] + SEND_WINDOW + 0.001, "a note left the server too early"
    starts = [n["start"] for _, n in arrivals]
    assert starts == sorted(starts)
    assert starts[-1] > starts[0]
    figures = {key: round(value, 4) for key, value in spread(headroom).items()}
    timing_report("session_headroom",
                  f"session headroom over {len(headroom)} notes at {FAST} bpm (lookahead {session['lookahead']} s): "
                  f"min {min(headroom) * 1000:.0f} ms, p50 {figures['p50'] * 1000:.0f} ms, "
                  f"{sum(h < 0 for h in headroom)} late",
                  notes=len(headroom), bpm=FAST, lookahead_s=session["lookahead"], headroom_s={
                      "min": round(min(headroom), 4), "p50": figures["p50"], "max": figures["max"]},
                  late_notes=sum(h < 0 for h in headroom), headroom_each_s=[round(h, 4) for h in headroom])


def test_notes_leave_a_lookahead_before_their_start(monkeypatch):
    """On a fake clock: each note leaves the server a lookahead before its start (notes due within
    SEND_WINDOW of each other in one frame), and a note whose time has passed still leaves."""
    now = [1000.0]
    monkeypatch.setattr(session_module, "time", SimpleNamespace(time=lambda: now[0]))
    registry = SimpleNamespace(config=SimpleNamespace(lookahead=0.5))
    session = Session(registry)
    session.stream = SimpleNamespace(timeline=Timeline(120), clock=now[0] + 0.5, frontier=0.0, paused=False, sent_step=-1)
    session.on_generated([StreamNote(beat, 0.5, 60 + i, 80, 0) for i, beat in enumerate((0, 1, 2, 2.005, 6))])

    def leave(start: float) -> float:  # the unix time a note starting at ``start`` is due to leave
        return session.stream.clock + start - 0.5

    def due() -> tuple[list[float], float | None]:
        notes, wait = session.due_notes()
        return [n.start for n in notes], wait

    notes, wait = due()
    assert notes == [0.0] and wait == pytest.approx(0.5)
    now[0] = leave(0.5) - 2 * SEND_WINDOW
    notes, wait = due()
    assert notes == [] and wait == pytest.approx(2 * SEND_WINDOW)
    now[0] = leave(0.5)
    assert due() == ([0.5], pytest.approx(0.5))
    now[0] = leave(1.0)
    assert due()[0] == [1.0, 1.0025]  # 2.5 ms apart: one frame
    now[0] = leave(3.0) + 2.0  # the server fell two seconds behind: the note still leaves
    assert due() == ([3.0], None)


def test_seeds_differ_and_the_same_seed_reproduces(live_server):
    first = stream_of(live_server, 40, seed=11)
    again = stream_of(live_server, 40, seed=11)
    other = stream_of(live_server, 40, seed=12)
    assert melody(first) == melody(again)
    assert melody(first) != melody(other)


def test_set_changes_the_next_notes(live_server):
    reference = stream_of(live_server, 80, seed=21)
    with live_server.connect() as ws:
        start_session(ws, seed=21, bpm=FAST)
        before = collect_notes(ws, 10)
        ws.send(json.dumps({"type": "set", "temperature": 3.0, "top_k": 0, "top_p": 1.0, "seed": 999, "bpm": 240,
                            "key_pull": 0.5}))
        notes, state = [], None
        while state is None or len(notes) < 70:
            message = receive(ws)
            if message["type"] == "state":
                state = message
            elif message["type"] == "notes":
                notes += message["notes"]
    assert state["temperature"] == 3.0 and state["seed"] == 999 and state["bpm"] == 240
    assert state["key_pull"] == 0.5
    assert melody(before) == melody(reference[:10])
    assert melody(notes[:70]) != melody(reference[10:80])
    # The tempo change holds for notes generated after it: one beat now lasts a quarter second.
    late = notes[-20:]
    span_beats = late[-1]["beat"] - late[0]["beat"]
    if span_beats > 0:
        assert (late[-1]["start"] - late[0]["start"]) / span_beats == pytest.approx(0.25, rel=0.01)


def test_programs_are_kept_and_echoed_in_the_state(live_server):
    with live_server.connect() as ws:
        _, state = start_session(ws, seed=4, bpm=FAST, programs=[0, None, 41])
        assert state["programs"] == [0, None, 41]
        ws.send(json.dumps({"type": "set", "temperature": 1.2}))  # other settings leave them alone
        assert receive_until(ws, "state")["programs"] == [0, None, 41]
        ws.send(json.dumps({"type": "set", "programs": [73, 73]}))
        assert receive_until(ws, "state")["programs"] == [73, 73]
        ws.send(json.dumps({"type": "set", "programs": [0, 128]}))
        error = receive_until(ws, "error")
        assert error["code"] == "invalid_message" and "programs.1" in error["message"]
        ws.send(json.dumps({"type": "pause"}))
        assert receive_until(ws, "state")["programs"] == [73, 73]  # the bad set changed nothing
    with live_server.connect() as ws:
        _, state = start_session(ws, seed=4, bpm=FAST)
        assert state["programs"] is None


def test_played_notes_change_the_continuation(live_server):
    reference = stream_of(live_server, 60, seed=31)
    with live_server.connect() as ws:
        session, _ = start_session(ws, seed=31, bpm=FAST)
        now = time.time() - session["clock"]
        # pitches the tiny test model knows, on eighth notes
        played = [{"pitch": p, "velocity": 100, "start": max(0.0, now) + i * 0.075, "duration": 0.075, "voice": 0}
                  for i, p in enumerate((69, 67, 64, 62, 69, 67, 64, 62))]
        ws.send(json.dumps({"type": "notes", "notes": played}))
        answered, errors = [], []
        while len(answered) < 60:
            message = receive(ws)
            answered += message.get("notes", [])
            errors += [message["code"]] if message["type"] == "error" else []
    # The tiny model knows few pitch-and-position pairs; some played notes may be left out (and said so).
    assert set(errors) <= {"unreadable_notes"}
    assert melody(answered[:60]) != melody(reference)


def test_a_played_note_is_answered_within_the_lookahead_and_the_answers_say_so(live_server, timing_report):
    """Notes sent before the played note heard nothing; the notes after it say ``heard_until`` =
    its start, and the first of them starts no sooner than the session's lookahead after it was
    read (the answer latency, from sending it to that start, is reported, not asserted)."""
    with live_server.connect() as ws:
        session, _ = start_session(ws, seed=32, bpm=120, lookahead=0.05)
        assert session["lookahead"] == 0.05
        before = collect_notes(ws, 3)
        assert all(n["heard_until"] is None for n in before)
        sent_at = time.time()
        start = round(sent_at - session["clock"], 6)
        ws.send(json.dumps({"type": "notes", "notes": [{"pitch": p, "start": start, "duration": 0.25}
                                                       for p in (55, 59, 62, 67)]}))
        arrivals = []
        while not any(n["heard_until"] is not None for _, n in arrivals):
            message = receive(ws, 30)
            assert message["type"] != "error", message
            arrivals += [(time.time(), n) for n in message.get("notes", [])]
    answer = next(n for _, n in arrivals if n["heard_until"] is not None)
    assert answer["heard_until"] == pytest.approx(start)
    assert answer["start"] >= start + 0.05
    headroom = [session["clock"] + n["start"] - at for at, n in arrivals]
    assert max(headroom) <= 0.05 + SEND_WINDOW + 0.001, "a note left more than the session's lookahead early"
    latency = session["clock"] + answer["start"] - sent_at
    timing_report("answer_latency_one", f"one played note at 120 bpm, lookahead 0.05 s: answered "
                  f"{latency * 1000:.0f} ms after it was sent", latency_s=round(latency, 4))


def test_accompaniment_is_echoed_and_the_model_keeps_off_the_played_voice(live_server):
    with live_server.connect() as ws:
        _, state = start_session(ws, seed=33, bpm=FAST, accompany={"voices": [1]})
        assert state["accompany"] == {"voices": [1]}
        assert all(n["voice"] != 1 for n in collect_notes(ws, 40))
        ws.send(json.dumps({"type": "set", "accompany": {"voices": []}}))
        assert receive_until(ws, "state")["accompany"] is None


def test_accompanying_every_voice_of_the_model_is_refused():
    """Only a model with fewer than 16 voices can be asked for all of them (the protocol takes 15)."""
    engine = SimpleNamespace(model=SimpleNamespace(config=SimpleNamespace(max_voices=2)))
    connection = Connection(SimpleNamespace(), SimpleNamespace(engine=engine, metrics=None,
                                                               config=ServerConfig()))
    message = SimpleNamespace(accompany=SimpleNamespace(voices=[1, 0]))
    with pytest.raises(RequestError, match="every voice this model plays") as refused:
        connection.accompanied_voices(message)
    assert refused.value.code == ErrorCode.INVALID_MESSAGE
    assert connection.accompanied_voices(SimpleNamespace(accompany=SimpleNamespace(voices=[1]))) == [1]


def test_pause_stops_the_stream_and_resume_continues_it(live_server):
    with live_server.connect() as ws:
        start_session(ws, seed=41, bpm=FAST)
        collect_notes(ws, 5)
        ws.send(json.dumps({"type": "pause"}))
        assert receive_until(ws, "state")["state"] == "paused"
        with pytest.raises(TimeoutError):  # nothing arrives while paused
            while True:
                if receive(ws, timeout=1.5)["type"] == "notes":
                    break
        ws.send(json.dumps({"type": "resume"}))
        assert receive_until(ws, "state")["state"] == "playing"
        after = collect_notes(ws, 5)
        assert after


def test_a_dropped_session_resumes_without_losing_notes(live_server):
    reference = stream_of(live_server, 60, seed=51)
    with live_server.connect() as ws:
        session, _ = start_session(ws, seed=51, bpm=FAST)
        before = collect_notes(ws, 20)
        ws.send(json.dumps({"type": "pause"}))  # every frame sent before the state reply is read
        while True:
            message = receive(ws)
            if message["type"] == "notes":
                before += message["notes"]
            elif message["type"] == "state":
                break
    # the connection is gone; the session waits for its token
    with resumed_session(live_server, session["resume_token"]) as (ws, again):
        assert again["resumed"] and again["id"] == session["id"] and again["clock"] == session["clock"]
        assert receive_until(ws, "state")["state"] == "paused"
        ws.send(json.dumps({"type": "resume"}))
        after = collect_notes(ws, 60 - len(before))
    assert melody(before + after) == melody(reference)
    assert after[0]["start"] > before[-1]["start"]


def test_an_abruptly_dropped_session_resumes_the_same_stream(live_server):
    with live_server.connect() as ws:
        session, _ = start_session(ws, seed=61, bpm=FAST)
        before = collect_notes(ws, 15)
    with resumed_session(live_server, session["resume_token"]) as (ws, again):
        assert again["resumed"] and again["id"] == session["id"]
        assert receive_until(ws, "state")["state"] == "playing"
        after = collect_notes(ws, 15)
    assert after[0]["beat"] >= before[-1]["beat"]
    assert after[0]["start"] > before[-1]["start"]
    # The token is single-use while connected and unknown tokens are refused.
    with live_server.connect() as ws:
        ws.send(json.dumps({"type": "start", "resume_token": "not-a-token"}))
        assert receive_until(ws, "error")["code"] == "unknown_resume_token"


def test_stop_ends_the_session(live_server):
    with live_server.connect() as ws:
        session, _ = start_session(ws, seed=71, bpm=FAST)
        collect_notes(ws, 3)
        ws.send(json.dumps({"type": "stop"}))
        stopped = receive_until(ws, "stopped")
        assert stopped["notes_sent"] >= 3
        with pytest.raises(ConnectionClosed) as closed:
            while True:
                receive(ws)
        assert closed.value.rcvd.code == 1000
    with live_server.connect() as ws:  # a stopped session cannot be resumed
        ws.send(json.dumps({"type": "start", "resume_token": session["resume_token"]}))
        assert receive_until(ws, "error")["code"] == "unknown_resume_token"


def test_a_prompt_file_starts_the_session(live_server):
    midi = build_midi([(i * 0.5, 0.5, 60 + (i % 5), 80, 0) for i in range(16)])
    with live_server.connect() as ws:
        start_session(ws, prompt_midi=base64.b64encode(midi).decode(), seed=1, bpm=FAST)
        assert collect_notes(ws, 5)
    with live_server.connect() as ws:
        notes = [{"pitch": 60 + i, "start": i * 0.5, "duration": 0.5} for i in range(8)]
        start_session(ws, prompt_notes=notes, seed=1, bpm=FAST)
        assert collect_notes(ws, 5)


def test_a_sender_cancelled_as_it_is_woken_still_ends():
    """The connection's note sender, cancelled (the socket closed) in the turn a pause wakes it,
    ends. If it went on waiting, the closed connection would never let its session go, and the
    session could not be resumed (seen as test_a_dropped_session_resumes_without_losing_notes
    timing out)."""
    async def main() -> bool:
        registry = SimpleNamespace(config=ServerConfig(lookahead=0.5), metrics=SimpleNamespace())
        session = Session(registry)
        session.stream = SimpleNamespace(timeline=Timeline(120), clock=time.time(), frontier=0.0, paused=False, sent_step=-1)
        session.on_generated([StreamNote(100.0, 1.0, 60, 80, 0)])  # due to leave in ~50 s
        connection = Connection(SimpleNamespace(), registry)
        connection.session = session
        sender = asyncio.create_task(connection.send_notes())
        await asyncio.sleep(0.01)  # the sender waits for that note's time
        session.set_running(False)  # a pause wakes it...
        await asyncio.sleep(0)
        sender.cancel()  # ...and the socket closes before it has run
        done, _ = await asyncio.wait({sender}, timeout=5)
        return bool(done)

    assert asyncio.run(main()), "the cancelled sender is still waiting"


BAD_FRAMES = [
    ("not json{", "invalid_json"),
    ("[1, 2]", "invalid_json"),
    (json.dumps({"type": "dance"}), "unknown_type"),
    (json.dumps({"notes": []}), "unknown_type"),
    (json.dumps({"type": "start", "temperature": 0}), "invalid_message"),
    (json.dumps({"type": "start", "temperature": -1}), "invalid_message"),
    (json.dumps({"type": "start", "top_p": 0}), "invalid_message"),
    (json.dumps({"type": "start", "top_p": 1.5}), "invalid_message"),
    (json.dumps({"type": "start", "bpm": 10}), "invalid_message"),
    (json.dumps({"type": "start", "bpm": 401}), "invalid_message"),
    (json.dumps({"type": "start", "top_k": -3}), "invalid_message"),
    (json.dumps({"type": "start", "key_pull": -1}), "invalid_message"),
    (json.dumps({"type": "start", "key_pull": 11}), "invalid_message"),
    (json.dumps({"type": "start", "bogus": 1}), "invalid_message"),
    (json.dumps({"type": "start", "programs": [0, 128]}), "invalid_message"),
    (json.dumps({"type": "start", "programs": [-1]}), "invalid_message"),
    (json.dumps({"type": "start", "programs": ["piano"]}), "invalid_message"),
    (json.dumps({"type": "start", "programs": [0] * 17}), "invalid_message"),
    (json.dumps({"type": "start", "programs": 40}), "invalid_message"),
    (json.dumps({"type": "start", "lookahead": 0.01}), "invalid_message"),
    (json.dumps({"type": "start", "lookahead": 31}), "invalid_message"),
    (json.dumps({"type": "start", "accompany": {"voices": [16]}}), "invalid_message"),
    (json.dumps({"type": "start", "accompany": {"voices": [-1]}}), "invalid_message"),
    (json.dumps({"type": "start", "accompany": {"voices": [0, 0]}}), "invalid_message"),
    (json.dumps({"type": "start", "accompany": {"voices": list(range(16))}}), "invalid_message"),
    (json.dumps({"type": "start", "accompany": [0]}), "invalid_message"),
    (json.dumps({"type": "start", "accompany": {"voice": [0]}}), "invalid_message"),
    (json.dumps({"type": "start", "prompt_midi": "bm90IGEgbWlkaSBmaWxl"}), "invalid_prompt"),
    (json.dumps({"type": "start", "prompt_midi": "%%% not base64"}), "invalid_prompt"),
    (json.dumps({"type": "notes", "notes": [{"pitch": 60, "start": 0}]}), "not_started"),
    (json.dumps({"type": "set", "temperature": 1.0}), "not_started"),
    (json.dumps({"type": "pause"}), "not_started"),
]


@pytest.mark.parametrize("frame,code", BAD_FRAMES, ids=[c + ":" + f[:30] for f, c in BAD_FRAMES])
def test_bad_frames_get_an_error_and_the_connection_carries_on(live_server, frame, code):
    with live_server.connect() as ws:
        ws.send(frame)
        error = receive_until(ws, "error")
        assert error["code"] == code and error["message"]
        start_session(ws, seed=2, bpm=FAST)  # the same connection still works
        assert collect_notes(ws, 2)


BAD_IN_SESSION = [
    ({"type": "notes", "notes": [{"pitch": 5, "start": 0}]}, "unreadable_notes"),
    ({"type": "notes", "notes": [{"pitch": 128, "start": 0}]}, "invalid_message"),
    ({"type": "notes", "notes": [{"pitch": 60, "velocity": 0, "start": 0}]}, "invalid_message"),
    ({"type": "notes", "notes": [{"pitch": 60, "velocity": 200, "start": 0}]}, "invalid_message"),
    ({"type": "notes", "notes": [{"pitch": 60, "start": -1}]}, "invalid_message"),
    ({"type": "set", "temperature": 0}, "invalid_message"),
    ({"type": "set", "top_p": 2}, "invalid_message"),
    ({"type": "set", "bpm": 500}, "invalid_message"),
    ({"type": "set", "key_pull": "strong"}, "invalid_message"),
    ({"type": "set", "prompt_midi": "AAAA"}, "invalid_message"),
    ({"type": "set", "programs": [0, 200]}, "invalid_message"),
    ({"type": "set", "accompany": {"voices": [1, 1]}}, "invalid_message"),
    ({"type": "set", "accompany": {"voices": ["melody"]}}, "invalid_message"),
    ({"type": "set", "lookahead": 0.1}, "invalid_message"),  # a session's lookahead is set at start
    ({"type": "start"}, "already_started"),
]


@pytest.mark.parametrize("message,code", BAD_IN_SESSION, ids=[c + ":" + json.dumps(m)[:40] for m, c in BAD_IN_SESSION])
def test_bad_messages_in_a_session_get_an_error_and_the_stream_goes_on(live_server, message, code):
    with live_server.connect() as ws:
        start_session(ws, seed=3, bpm=FAST)
        ws.send(json.dumps(message))
        assert receive_until(ws, "error")["code"] == code
        assert collect_notes(ws, 3)


def test_binary_frames_are_refused(live_server):
    with live_server.connect() as ws:
        ws.send(b"\x00\x01")
        assert receive_until(ws, "error")["code"] == "binary_frame"


def test_limits_full_server_and_oversized_frames(served_checkpoint):
    config = ServerConfig(checkpoint=str(served_checkpoint), max_sessions=2, max_frame_bytes=64 * 1024)
    with running_server(config) as server:
        with server.connect() as a, server.connect() as b, server.connect() as c:
            start_session(a, seed=1, bpm=FAST)
            start_session(b, seed=2, bpm=FAST)
            c.send(json.dumps({"type": "start"}))
            assert receive_until(c, "error")["code"] == "server_full"
            with pytest.raises(ConnectionClosed) as closed:
                while True:
                    receive(c)
            assert closed.value.rcvd.code == 1013 and "full" in closed.value.rcvd.reason
            assert collect_notes(a, 3) and collect_notes(b, 3)  # the others carry on
            a.send(json.dumps({"type": "stop"}))
            receive_until(a, "stopped")
        with server.connect() as big:
            big.send(json.dumps({"type": "start", "prompt_midi": "A" * (128 * 1024)}))
            with pytest.raises(ConnectionClosed) as closed:
                while True:
                    receive(big)
            assert closed.value.rcvd.code == 1009  # message too big
        with server.connect() as ws:  # the server still serves a new session
            start_session(ws, seed=5, bpm=FAST)
            assert collect_notes(ws, 3)


def test_metrics_show_batches_above_one_while_sessions_stream(live_server):
    with contextlib.ExitStack() as stack:
        sockets = [stack.enter_context(live_server.connect()) for _ in range(6)]
        for i, ws in enumerate(sockets):
            ws.send(json.dumps({"type": "start", "seed": 100 + i, "bpm": FAST}))
        for ws in sockets:
            collect_notes(ws, 20)
        with urllib.request.urlopen(live_server.http_url + "/metrics") as response:
            text = response.read().decode()
    values = {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
              for line in text.splitlines() if line and not line.startswith("#")}
    assert values["fm_sessions"] >= 6
    assert values['fm_batch_size_bucket{le="1.0"}'] < values["fm_batch_size_count"]
    assert values["fm_session_state_bytes"] > 0 and values["fm_tokens_total"] > 0
    assert "fm_step_seconds_bucket" in text and "fm_late_notes_total" in text
