"""Where session snapshots are kept: in this process, or in Redis shared by every replica.

Two kinds of entry, each a snapshot's bytes (:mod:`server.snapshot`) under its own key:

* ``fm:session:<resume token>``: a live session, saved every ``--snapshot-seconds``, when its
  connection drops and when the server shuts down; it expires ``--resume-seconds`` after its last
  save, and a ``stop`` deletes it. Any replica that shares the store can resume it.
* ``fm:bookmark:<id>``: a moment a client asked to keep (``{"type":"snapshot"}``), kept
  ``--bookmark-seconds``, whichever session or replica asks for it.

Without ``--store`` the server keeps bookmarks in a :class:`MemoryStore` (at most
:data:`MEMORY_ENTRIES`, the oldest dropped first) and live sessions in memory only, as before.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from urllib.parse import urlparse

SESSION_PREFIX = "fm:session:"
BOOKMARK_PREFIX = "fm:bookmark:"
MEMORY_ENTRIES = 10_000


class StoreError(RuntimeError):
    """The store could not be reached or refused an operation."""


class SessionStore:
    """Bytes under keys, each with an expiry (seconds)."""

    url = "memory"

    @property
    def shown_url(self) -> str:
        """The URL without its password."""
        return _shown(self.url)

    async def put(self, key: str, data: bytes, ttl: float) -> None:
        await self.put_many([(key, data)], ttl)

    async def put_many(self, items: list[tuple[str, bytes]], ttl: float) -> None:
        raise NotImplementedError

    async def get(self, key: str) -> bytes | None:
        raise NotImplementedError

    async def delete(self, key: str) -> None:
        raise NotImplementedError

    async def ping(self) -> None:
        """Raise :class:`StoreError` unless the store answers."""

    async def close(self) -> None:
        pass


class MemoryStore(SessionStore):
    """A bounded dict in this process (the oldest entries go first past ``limit``)."""

    def __init__(self, limit: int = MEMORY_ENTRIES) -> None:
        self.limit = limit
        self.clock = time.monotonic  # what expiry is measured on
        self._entries: OrderedDict[str, tuple[float, bytes]] = OrderedDict()

    async def put_many(self, items: list[tuple[str, bytes]], ttl: float) -> None:
        expires = self.clock() + ttl
        for key, data in items:
            self._entries.pop(key, None)
            self._entries[key] = (expires, data)
        while len(self._entries) > self.limit:
            self._entries.popitem(last=False)

    async def get(self, key: str) -> bytes | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        if entry[0] < self.clock():
            del self._entries[key]
            return None
        return entry[1]

    async def delete(self, key: str) -> None:
        self._entries.pop(key, None)


class RedisStore(SessionStore):
    """A Redis database (``redis://HOST:PORT/DB``; ``rediss://`` for TLS, a password as in
    ``redis://:PASSWORD@HOST:PORT/DB``). Every call gives up after ``timeout`` seconds."""

    def __init__(self, url: str, timeout: float = 5.0) -> None:
        import redis.asyncio as redis  # only servers started with --store need it

        self.url = url
        self._errors = (redis.RedisError, OSError, asyncio.TimeoutError)
        self._redis = redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout)

    async def _run(self, what: str, call):
        try:
            return await call
        except self._errors as exc:
            raise StoreError(f"the session store ({_shown(self.url)}) failed to {what}: {exc}") from exc

    async def put_many(self, items: list[tuple[str, bytes]], ttl: float) -> None:
        if not items:
            return
        pipe = self._redis.pipeline(transaction=False)
        for key, data in items:
            pipe.set(key, data, px=max(1, int(ttl * 1000)))
        await self._run("save", pipe.execute())

    async def get(self, key: str) -> bytes | None:
        return await self._run("read", self._redis.get(key))

    async def delete(self, key: str) -> None:
        await self._run("delete", self._redis.delete(key))

    async def ping(self) -> None:
        await self._run("answer", self._redis.ping())

    async def close(self) -> None:
        await self._redis.aclose()


def check_store_url(url: str) -> None:
    """Raise ValueError unless ``url`` is empty or a Redis URL with a host."""
    if not url:
        return
    parsed = urlparse(url)
    if parsed.scheme not in ("redis", "rediss") or not parsed.hostname:
        raise ValueError(f"--store must look like redis://HOST:PORT/DB, not {_shown(url)!r}")


def open_store(url: str) -> SessionStore | None:
    """The shared store ``url`` names (None: no shared store)."""
    check_store_url(url)
    return RedisStore(url) if url else None


def _shown(url: str) -> str:
    """``url`` without its password."""
    parsed = urlparse(url)
    if parsed.password:
        return url.replace(f":{parsed.password}@", ":***@")
    return url
