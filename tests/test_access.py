"""Who may use a server: the API key, the Origin of a browser page and the Host header, checked
against a real server for HTTP and WebSocket alike; and no start on the network without a key."""

from __future__ import annotations

import json
import socket
import subprocess
import sys

import httpx
import pytest
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import connect

from server.config import ServerConfig, is_loopback
from tests.server_harness import receive, running_server, start_session

KEY = "s3cret-key"


@pytest.fixture(scope="module")
def keyed(served_checkpoint):
    config = ServerConfig(checkpoint=str(served_checkpoint), api_key=KEY, allowed_origins="https://app.example")
    with running_server(config) as server:
        yield server


@pytest.fixture(scope="module")
def local(served_checkpoint):
    with running_server(ServerConfig(checkpoint=str(served_checkpoint))) as server:
        yield server


def refused(url: str, code: str, **kwargs) -> dict:
    """Connect, expect one error frame with ``code`` and close code 1008."""
    with connect(url, open_timeout=30, **kwargs) as ws:
        error = receive(ws)
        assert error["type"] == "error" and error["code"] == code, error
        with pytest.raises(ConnectionClosed) as closed:
            ws.recv(timeout=10)
    assert closed.value.rcvd.code == 1008
    return error


def test_without_the_key_nothing_but_health_and_the_page(keyed):
    url = keyed.http_url
    assert httpx.get(f"{url}/health", timeout=30).status_code == 200
    assert httpx.get(f"{url}/", timeout=30).status_code == 200
    response = httpx.post(f"{url}/generate", json={"tokens": 8}, timeout=30)
    assert response.status_code == 401 and response.json()["code"] == "unauthorized"
    assert httpx.get(f"{url}/metrics", timeout=30).status_code == 401
    wrong = httpx.post(f"{url}/generate", json={"tokens": 8}, headers={"X-API-Key": "guess"}, timeout=30)
    assert wrong.status_code == 401
    error = refused(keyed.ws_url, "unauthorized")
    assert "API key" in error["message"]
    refused(keyed.ws_url + "?api_key=guess", "unauthorized")


@pytest.mark.parametrize("how", ["bearer", "x-api-key", "query"])
def test_with_the_key_everything_works(keyed, how):
    headers = {"bearer": {"Authorization": f"Bearer {KEY}"}, "x-api-key": {"X-API-Key": KEY}, "query": {}}[how]
    url = keyed.ws_url + (f"?api_key={KEY}" if how == "query" else "")
    with connect(url, open_timeout=30, additional_headers=headers) as ws:
        session, _ = start_session(ws, seed=1)
        assert session["resume_token"]
    query = {"api_key": KEY} if how == "query" else None
    response = httpx.post(f"{keyed.http_url}/generate", json={"tokens": 16}, headers=headers, params=query, timeout=120)
    assert response.status_code == 200 and response.headers["content-type"] == "audio/midi"


def test_a_page_from_another_site_cannot_open_a_session(local):
    for origin in ("http://evil.example", "null", f"http://127.0.0.1:{local.port + 1}"):
        refused(local.ws_url, "forbidden", origin=origin)
    response = httpx.post(f"{local.http_url}/generate", json={"tokens": 8}, headers={"Origin": "http://evil.example"},
                          timeout=30)
    assert response.status_code == 403 and response.json()["code"] == "forbidden"
    # the server's own page, and clients that are not browsers (no Origin), are served
    with connect(local.ws_url, open_timeout=30, origin=f"http://127.0.0.1:{local.port}") as ws:
        assert start_session(ws, seed=2)[0]["id"]
    with connect(local.ws_url, open_timeout=30) as ws:
        assert start_session(ws, seed=3)[0]["id"]


def test_allowed_origins_are_served(keyed):
    url = keyed.ws_url + f"?api_key={KEY}"
    with connect(url, open_timeout=30, origin="https://app.example") as ws:
        assert start_session(ws, seed=4)[0]["id"]
    refused(url, "forbidden", origin="https://other.example")


def test_a_host_header_the_server_does_not_answer_to_is_refused(local):
    response = httpx.get(f"{local.http_url}/health", headers={"Host": "rebind.evil.example"}, timeout=30)
    assert response.status_code == 403 and response.json()["code"] == "forbidden"
    assert "--allowed-hosts" in response.json()["detail"]
    sock = socket.create_connection(("127.0.0.1", local.port))  # a name the attacker's DNS points here
    refused(f"ws://rebind.evil.example:{local.port}/ws", "forbidden", sock=sock)
    assert httpx.get(f"{local.http_url}/health", headers={"Host": f"localhost:{local.port}"},
                     timeout=30).status_code == 200


def test_a_server_on_the_network_needs_a_key_or_the_insecure_flag(served_checkpoint):
    with pytest.raises(ValueError, match="--api-key"):
        ServerConfig(checkpoint=str(served_checkpoint), host="0.0.0.0")
    with pytest.raises(ValueError, match="--api-key"):
        ServerConfig(checkpoint=str(served_checkpoint), exposed_host="192.168.1.20")
    assert ServerConfig(host="0.0.0.0", api_key=KEY).host_names is None  # the key protects it
    assert ServerConfig(host="0.0.0.0", insecure_no_auth=True)
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("example.org")
    result = subprocess.run([sys.executable, "-m", "server", "--host", "0.0.0.0", "--checkpoint", str(served_checkpoint)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "--api-key" in result.stderr and "--insecure-no-auth" in result.stderr


def test_resume_tokens_are_long_and_only_resume_their_session(local):
    with connect(local.ws_url, open_timeout=30) as ws:
        session, _ = start_session(ws, seed=8)
    assert len(session["resume_token"]) >= 32
    with connect(local.ws_url, open_timeout=30) as ws:
        ws.send(json.dumps({"type": "start", "resume_token": session["resume_token"][:-2] + "xx"}))
        assert receive(ws)["code"] == "unknown_resume_token"


def test_a_refused_handshake_is_not_an_http_error_page(local):
    with pytest.raises((ConnectionClosed, InvalidStatus, AssertionError)):
        with connect(local.ws_url, open_timeout=30, origin="http://evil.example") as ws:
            ws.send(json.dumps({"type": "start"}))
            assert receive(ws)["type"] != "error"
