"""One WebSocket connection's own rules: a client that stops reading is dropped, JSON limits.

The slow reader is a stand-in WebSocket whose send never completes: a real client that stops
reading makes the server's send block only once megabytes fill the loopback TCP buffers, more
than a session sends in a test's time. Everything else about connections is tested against a
real server (test_session.py, test_hostile.py)."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest
from starlette.websockets import WebSocketDisconnect

from server.config import ServerConfig
from server.connection import Connection, TokenBucket
from server.metrics import Metrics
from server.protocol import RequestError, StoppedReply


class NeverReads:
    """A socket whose peer reads nothing: every send waits forever."""

    async def send_text(self, text: str) -> None:
        await asyncio.Event().wait()


def test_a_send_the_client_never_reads_drops_the_connection():
    async def main():
        metrics = Metrics()
        registry = SimpleNamespace(config=ServerConfig(send_timeout=0.2), metrics=metrics)
        connection = Connection(NeverReads(), registry)
        connection.task = asyncio.create_task(asyncio.sleep(60))  # stands for the receive loop
        with pytest.raises(WebSocketDisconnect):
            await connection.send(StoppedReply(notes_sent=0))
        await asyncio.sleep(0)
        assert connection.dropped and connection.task.cancelled()
        assert metrics.slow_clients._value.get() == 1
    asyncio.run(main())


def test_the_message_rate_is_bounded():
    bucket = TokenBucket(rate=10, burst=20)
    taken = sum(bucket.take() for _ in range(100))
    assert 20 <= taken <= 22  # the burst, and what refilled while counting


@pytest.mark.parametrize("text, code", [
    ("[" * 100_000, "invalid_json"), ('{"type": "set", "seed": ' + "1" * 6000 + "}", "invalid_json"),
    ('{"type": "set", "bpm": -Infinity}', "invalid_json"), ("nope", "invalid_json"),
], ids=["deep", "huge-int", "infinity", "not-json"])
def test_frames_json_cannot_hold_are_refused_by_code(text: str, code: str):
    connection = Connection(NeverReads(), SimpleNamespace(config=ServerConfig(), metrics=Metrics()))
    with pytest.raises(RequestError) as refused:
        asyncio.run(connection.handle({"text": text}))
    assert refused.value.code.value == code
