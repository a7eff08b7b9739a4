"""HTTP endpoints of the app (POST /generate, /health, /metrics, /docs) against a real server."""

from __future__ import annotations

import base64
import io

import httpx
import mido
import pytest

from server.protocol import MAX_GENERATE_TOKENS
from tests.midi_builders import build_midi


def note_ons(data: bytes) -> list[mido.Message]:
    midi = mido.MidiFile(file=io.BytesIO(data))
    return [m for track in midi.tracks for m in track if m.type == "note_on" and m.velocity > 0]


@pytest.fixture(scope="module")
def http(live_server):
    with httpx.Client(base_url=live_server.http_url, timeout=120) as client:
        yield client


def test_health_reports_the_model(http, served_checkpoint):
    body = http.get("/health").json()
    assert body["status"] == "ok"
    assert body["checkpoint"] == str(served_checkpoint)
    assert body["state_bytes_per_session"] > 0 and body["vocab_size"] > 0


def test_generate_returns_a_midi_file_with_the_notes_asked_for(http):
    response = http.post("/generate", json={"tokens": 200, "seed": 7, "temperature": 0.9, "bpm": 90})
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "audio/midi"
    assert 'filename="fm-seed7-200tok.mid"' in response.headers["content-disposition"]
    notes = note_ons(response.content)
    assert len(notes) == int(response.headers["x-fm-notes"]) > 0
    midi = mido.MidiFile(file=io.BytesIO(response.content))
    tempos = [m.tempo for t in midi.tracks for m in t if m.type == "set_tempo"]
    assert tempos == [mido.bpm2tempo(90)]
    again = http.post("/generate", json={"tokens": 200, "seed": 7, "temperature": 0.9, "bpm": 90})
    assert again.content == response.content  # the same seed gives the same file
    other = http.post("/generate", json={"tokens": 200, "seed": 8, "temperature": 0.9, "bpm": 90})
    assert other.content != response.content


def test_generate_continues_an_uploaded_prompt(http):
    prompt = build_midi([(i * 0.5, 0.5, 57 + (0, 4, 7, 12)[i % 4], 80, 0) for i in range(16)])
    response = http.post("/generate", files={"prompt": ("prompt.mid", prompt, "audio/midi")},
                         data={"tokens": "64", "seed": "3", "include_prompt": "true"})
    assert response.status_code == 200, response.text
    notes = note_ons(response.content)
    assert len(notes) == 16 + int(response.headers["x-fm-notes"])
    as_json = http.post("/generate", json={"tokens": 64, "seed": 3,
                                           "prompt_midi": base64.b64encode(prompt).decode()})
    assert as_json.status_code == 200
    assert len(note_ons(as_json.content)) == int(as_json.headers["x-fm-notes"])


BAD_REQUESTS = [
    ({"json": {"tokens": MAX_GENERATE_TOKENS + 1}}, 422, "tokens"),
    ({"json": {"tokens": 0}}, 422, "tokens"),
    ({"json": {"temperature": 0}}, 422, "temperature"),
    ({"json": {"top_p": 1.5}}, 422, "top_p"),
    ({"json": {"bpm": 1000}}, 422, "bpm"),
    ({"json": {"surprise": True}}, 422, "surprise"),
    ({"content": b"{not json", "headers": {"content-type": "application/json"}}, 422, "JSON"),
    ({"json": {"prompt_midi": base64.b64encode(b"hello, not midi").decode()}}, 400, "MIDI"),
    ({"files": {"prompt": ("x.mid", b"MThd but not really", "audio/midi")}}, 400, "MIDI"),
    ({"files": {"prompt": ("big.mid", b"\0" * (2 << 20), "audio/midi")}}, 413, "larger"),
    ({"json": {"prompt_midi": "A" * (3 << 20)}}, 413, "larger"),
]


@pytest.mark.parametrize("request_kwargs,status,words", BAD_REQUESTS,
                         ids=[f"{s}-{w}-{i}" for i, (_, s, w) in enumerate(BAD_REQUESTS)])
def test_bad_generate_requests_get_a_clear_error(http, request_kwargs, status, words):
    response = http.post("/generate", **request_kwargs)
    assert response.status_code == status, response.text
    body = response.json()
    assert body["code"] and words.lower() in body["detail"].lower()
    assert http.post("/generate", json={"tokens": 8}).status_code == 200  # still serving


def test_metrics_and_docs(http):
    http.post("/generate", json={"tokens": 16})
    text = http.get("/metrics").text
    for name in ("fm_sessions", "fm_tokens_total", "fm_tokens_per_second", "fm_batch_size_bucket",
                 "fm_step_seconds_bucket", "fm_late_notes_total", "fm_session_state_bytes",
                 "process_resident_memory_bytes"):
        assert name in text
    assert 'fm_errors_total{code="invalid_message"}' in text
    assert http.get("/docs").status_code == 200
    schema = http.get("/openapi.json").json()
    body = schema["paths"]["/generate"]["post"]["requestBody"]["content"]
    assert {"application/json", "multipart/form-data"} <= set(body)
