"""A real uvicorn server on a free loopback port, in a background thread, for the tests."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from dataclasses import dataclass, replace
from typing import Iterator

import uvicorn
from websockets.sync.client import ClientConnection, connect

from server.app import create_app
from server.config import ServerConfig


@dataclass
class RunningServer:
    config: ServerConfig
    port: int
    server: uvicorn.Server

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    def connect(self, **kwargs) -> ClientConnection:
        return connect(self.ws_url, open_timeout=30, max_size=None, **kwargs)


@contextlib.contextmanager
def running_server(config: ServerConfig, startup_timeout: float = 120.0) -> Iterator[RunningServer]:
    """Start ``python -m server``'s app on 127.0.0.1:<free port>; stop it on exit."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = replace(config, host="127.0.0.1", port=port)
    app = create_app(config)
    server = uvicorn.Server(uvicorn.Config(app, ws_max_size=config.max_frame_bytes, log_level="warning",
                                           timeout_graceful_shutdown=2))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + startup_timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    try:
        yield RunningServer(config, port, server)
    finally:
        server.should_exit = True
        thread.join(timeout=15)
        sock.close()


def receive(ws: ClientConnection, timeout: float = 10.0) -> dict:
    return json.loads(ws.recv(timeout=timeout))


def receive_until(ws: ClientConnection, kind: str, timeout: float = 10.0, skipped: list[dict] | None = None) -> dict:
    """The next message of type ``kind`` (others are skipped, and appended to ``skipped`` if given)."""
    deadline = time.monotonic() + timeout
    while True:
        message = receive(ws, max(0.01, deadline - time.monotonic()))
        if message["type"] == kind:
            return message
        if skipped is not None:
            skipped.append(message)


def collect_notes(ws: ClientConnection, count: int, timeout: float = 30.0) -> list[dict]:
    """Read frames until ``count`` notes have arrived; returns them (other frames are skipped)."""
    notes: list[dict] = []
    deadline = time.monotonic() + timeout
    while len(notes) < count:
        message = receive(ws, max(0.01, deadline - time.monotonic()))
        if message["type"] == "notes":
            notes.extend(message["notes"])
        elif message["type"] == "error":
            raise AssertionError(f"server error: {message}")
    return notes[:count]


def start_session(ws: ClientConnection, **start) -> tuple[dict, dict]:
    """Send start; returns the session and state replies."""
    ws.send(json.dumps({"type": "start", **start}))
    session = receive_until(ws, "session", timeout=60)
    state = receive_until(ws, "state")
    return session, state
