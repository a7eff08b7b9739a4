"""Sessions saved as snapshots, and sessions brought back from them.

:class:`SavedSessions` is the registry's link to the stores (:mod:`server.store`):

* with ``--store``, every live session is saved every ``--snapshot-seconds`` (those that sent
  notes since, or whose entry would soon expire), when its connection drops, and at shutdown;
  a ``start`` with a resume token this process does not hold is looked up there
  (:meth:`SavedSessions.resume`), so a session goes on on any replica;
* ``{"type":"snapshot"}`` keeps a bookmark (:meth:`SavedSessions.bookmark`) and ``start`` with
  ``snapshot`` continues from it in a new session (:meth:`SavedSessions.from_bookmark`);
* ``{"type":"fork"}`` makes a second session from this moment, waiting for its resume token
  (:meth:`SavedSessions.fork`).

A snapshot holds the stream at the latest note its client was sent; a session brought back from it
sends nothing at or before that note's beat (nor before the beat the client says it received last).
A snapshot written by another checkpoint is re-read from its last tokens (``reread``).
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from dataclasses import replace
from typing import TYPE_CHECKING

import numpy as np

from server.engine import EngineClosed, EngineFull, StreamNote
from server.protocol import ErrorCode, ForkedReply, RequestError, SnapshotReply
from server.snapshot import NOTE_COLUMNS, SessionSnapshot, SnapshotError
from server.store import BOOKMARK_PREFIX, SESSION_PREFIX, MemoryStore, SessionStore, StoreError, open_store

if TYPE_CHECKING:
    from server.session import Session, SessionRegistry

logger = logging.getLogger(__name__)


class SavedSessions:
    def __init__(self, registry: "SessionRegistry", digest: str, store: SessionStore | None = None) -> None:
        self.registry = registry
        self.config = registry.config
        self.metrics = registry.metrics
        self.digest = digest  # of the checkpoint this server runs
        self.store = store if store is not None else open_store(self.config.store)
        self.bookmarks: SessionStore = self.store or MemoryStore()
        self._restoring: set[str] = set()
        self._task: asyncio.Task | None = None

    @property
    def store_name(self) -> str:
        return self.store.shown_url if self.store is not None else "memory"

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        """Start saving live sessions every ``--snapshot-seconds`` (with a store)."""
        if self.store is not None:
            self._task = asyncio.get_running_loop().create_task(self._save_periodically(), name="snapshots")

    async def close(self) -> None:
        """Save every session (with a store) and let go of the store."""
        if self._task is not None:
            self._task.cancel()
        if self.store is not None:
            sessions = [s for s in self.registry.sessions.values() if not s.ended]
            try:
                saved = await self.save(sessions)
                logger.info("saved %d of %d sessions to %s before stopping", saved, len(sessions), self.store.url)
            except StoreError as exc:
                logger.error("could not save the sessions before stopping: %s", exc)
            await self.store.close()

    async def _save_periodically(self) -> None:
        refresh = self.config.resume_seconds / 2
        while True:
            await asyncio.sleep(self.config.snapshot_seconds)
            now = time.monotonic()
            due = [s for s in self.registry.sessions.values()
                   if s.connection is not None and not s.ended and s.stream is not None
                   and (s.sent != s.saved_sent or now - s.saved_at > refresh)]
            try:
                await self.save(due)
            except StoreError as exc:
                self.metrics.store_errors.inc()
                logger.warning("saving %d sessions failed: %s", len(due), exc)
            except Exception:  # never let the saver die
                logger.exception("saving sessions failed")

    # ------------------------------------------------------------------ saving
    async def capture(self, session: "Session") -> SessionSnapshot:
        """The session now, at the latest note it sent (raises :class:`SnapshotError` before its
        prompt has been read, :class:`EngineClosed` once the engine stopped)."""
        stream = session.stream
        if stream is None:
            raise SnapshotError("the session has no stream yet")
        captured = await self.registry.engine.capture(stream)
        # the notes generated before the capture and not sent (later ones may have arrived meanwhile)
        unsent = [note for _, _, note in sorted(session.pending)  # in the order they would leave
                  if note.step < captured.live.steps and note.epoch >= session.epoch]
        return SessionSnapshot(pending=notes_array(unsent), checkpoint=self.digest, session_id=session.id, saved_at=time.time(),
                               sampling=stream.sampling, timeline=stream.timeline, stream=captured,
                               last_beat=session.last_beat, sent=session.sent, paused=session.paused,
                               lookahead=session.requested_lookahead, programs=session.programs,
                               accompany=list(session.accompany))

    async def save(self, sessions: list["Session"]) -> int:
        """Save ``sessions`` to the store (one round trip); returns how many were saved."""
        if self.store is None or not sessions:
            return 0
        began = time.perf_counter()
        captured = await asyncio.gather(*(self.capture(s) for s in sessions), return_exceptions=True)
        ready = [(s, c) for s, c in zip(sessions, captured) if isinstance(c, SessionSnapshot)]
        for error in (c for c in captured if isinstance(c, BaseException) and not isinstance(c, (SnapshotError,
                                                                                                  EngineClosed))):
            logger.warning("a session could not be captured: %r", error)
        data = await asyncio.to_thread(lambda: [c.to_bytes() for _, c in ready])
        ttl = self.config.resume_seconds + 2 * self.config.snapshot_seconds
        await self.store.put_many([(SESSION_PREFIX + s.resume_token, d) for (s, _), d in zip(ready, data)], ttl)
        now = time.monotonic()
        for (session, snap), _ in zip(ready, data):
            session.saved_sent, session.saved_at = snap.sent, now
        self.metrics.snapshots_saved.inc(len(ready))
        self.metrics.snapshot_bytes.inc(sum(len(d) for d in data))
        self.metrics.save_seconds.observe(time.perf_counter() - began)
        return len(ready)

    def saved_in_background(self, session: "Session") -> None:
        """Save one session without waiting (its connection dropped)."""
        if self.store is not None and session.stream is not None:
            asyncio.get_running_loop().create_task(self._save_quietly(session))

    async def _save_quietly(self, session: "Session") -> None:
        try:
            await self.save([session])
        except StoreError as exc:
            self.metrics.store_errors.inc()
            logger.warning("saving session %s failed: %s", session.id, exc)

    def forget(self, session: "Session") -> None:
        """The session stopped: its store entry goes (without waiting)."""
        if self.store is not None:
            asyncio.get_running_loop().create_task(self._delete_quietly(SESSION_PREFIX + session.resume_token))

    async def _delete_quietly(self, key: str) -> None:
        try:
            await self.store.delete(key)
        except StoreError as exc:
            logger.warning("%s", exc)

    # ------------------------------------------------------------------ bringing back
    async def resume(self, token: str, client: str) -> "Session | None":
        """The session ``token`` names, from the store (None: not there)."""
        if self.store is None or token in self._restoring:
            return None
        self._restoring.add(token)
        try:
            try:
                data = await self.store.get(SESSION_PREFIX + token)
            except StoreError as exc:
                raise RequestError(ErrorCode.STORE_FAILED, str(exc)) from exc
            if data is None:
                return None
            snap = _read(data)
            if self.registry.full:
                raise RequestError(ErrorCode.SERVER_FULL, f"the server is full ({self.config.max_sessions} "
                                   "sessions); try again later")
            session = await self.restore(snap, client=client, resume_token=token)
            if self.registry.by_token.get(token) is not None:  # resumed here meanwhile
                await self.registry.engine.release(session.stream)
                return None
            self.registry.add(session)
            self.metrics.restored.labels(source="store").inc()
            logger.info("session %s restored from the store%s", session.id, " (re-read)" if session.reread else "")
            return session
        finally:
            self._restoring.discard(token)

    async def restore(self, snap: SessionSnapshot, *, client: str, resume_token: str | None = None,
                      sampling=None) -> "Session":
        """A paused session from ``snap``: the same one (``resume_token``) or a new one."""
        session = self.registry.new_session(client)
        if resume_token is not None:
            session.id, session.resume_token = snap.session_id, resume_token
            session.paused, session.sent = snap.paused, snap.sent
        session.requested_lookahead = snap.lookahead
        session.programs, session.accompany = snap.programs, list(snap.accompany)
        session.last_beat = snap.last_beat
        session.queue(notes_from_array(snap.pending))
        same_model = snap.checkpoint == self.digest
        session.reread = not same_model
        try:
            session.stream = await self.registry.engine.restore(
                snap.stream, same_model=same_model, sampling=sampling or snap.sampling, timeline=snap.timeline,
                sink=session.on_generated, on_error=session.on_error, lookahead=session.lookahead,
                banned_voices=tuple(session.accompany))
        except SnapshotError as exc:
            raise RequestError(ErrorCode.BAD_SNAPSHOT, f"the snapshot cannot be continued: {exc}") from exc
        except EngineFull:
            raise RequestError(ErrorCode.SERVER_FULL, "the server is full; try again later") from None
        except (EngineClosed, RuntimeError) as exc:
            raise RequestError(ErrorCode.GENERATION_FAILED, f"the session could not be restored: {exc}") from exc
        if snap.last_beat is not None:
            session.received_through(snap.last_beat)
        if session.reread:
            self.metrics.reread.inc()
        return session

    # ------------------------------------------------------------------ bookmarks and forks
    async def bookmark(self, session: "Session") -> SnapshotReply:
        """Keep this moment; the reply names it."""
        self._check_bookmark_limit(session)
        snap = await self._capture_for_client(session)
        data = await asyncio.to_thread(snap.to_bytes)
        bookmark = secrets.token_urlsafe(12)
        try:
            await self.bookmarks.put(BOOKMARK_PREFIX + bookmark, data, self.config.bookmark_seconds)
        except StoreError as exc:
            raise RequestError(ErrorCode.STORE_FAILED, str(exc)) from exc
        session.bookmarks += 1
        return SnapshotReply(id=bookmark, beat=snap.last_beat or 0.0, bytes=len(data),
                             expires_in=self.config.bookmark_seconds)

    async def load_bookmark(self, bookmark: str) -> SessionSnapshot:
        try:
            data = await self.bookmarks.get(BOOKMARK_PREFIX + bookmark)
        except StoreError as exc:
            raise RequestError(ErrorCode.STORE_FAILED, str(exc)) from exc
        if data is None:
            raise RequestError(ErrorCode.UNKNOWN_SNAPSHOT, f"no snapshot {bookmark!r}: unknown, or older than "
                               f"--bookmark-seconds ({self.config.bookmark_seconds:g} s)")
        return _read(data)

    async def fork(self, session: "Session", seed: int | None) -> ForkedReply:
        """A second session from this moment (same settings; ``seed`` its own), waiting for its
        first connection like a dropped one."""
        self._check_bookmark_limit(session)
        if self.registry.full or self.registry.full_for(session.client):
            raise RequestError(ErrorCode.SERVER_FULL, "no room for another session; stop one or try again later")
        snap = await self._capture_for_client(session)
        sampling = snap.sampling if seed is None else replace(snap.sampling, seed=seed)
        twin = await self.restore(snap, client=session.client, sampling=sampling)
        session.bookmarks += 1
        self.registry.add(twin)
        self.registry.detach(twin)
        self.metrics.restored.labels(source="fork").inc()
        return ForkedReply(id=twin.id, resume_token=twin.resume_token, seed=sampling.seed,
                           beat=snap.last_beat or 0.0, expires_in=self.config.resume_seconds)

    def _check_bookmark_limit(self, session: "Session") -> None:
        limit = self.config.max_bookmarks_per_session
        if session.bookmarks >= limit:
            raise RequestError(ErrorCode.BOOKMARK_LIMIT, f"this session made {limit} snapshots and forks, the "
                               "limit (--max-bookmarks-per-session)")

    async def _capture_for_client(self, session: "Session") -> SessionSnapshot:
        try:
            return await self.capture(session)
        except SnapshotError as exc:
            raise RequestError(ErrorCode.INVALID_MESSAGE, f"nothing to keep yet: {exc}") from exc
        except EngineClosed as exc:
            raise RequestError(ErrorCode.GENERATION_FAILED, str(exc)) from exc


def notes_array(notes: list[StreamNote]) -> np.ndarray:
    """Generated notes as snapshot rows (:data:`server.snapshot.NOTE_COLUMNS`)."""
    rows = [(n.beat, n.duration, n.pitch, n.velocity, n.voice, n.step,
             np.nan if n.heard_until is None else n.heard_until) for n in notes]
    return np.asarray(rows, dtype=np.float64).reshape(-1, NOTE_COLUMNS)


def notes_from_array(rows: np.ndarray) -> list[StreamNote]:
    return [StreamNote(beat=float(beat), duration=float(duration), pitch=int(pitch), velocity=int(velocity),
                       voice=int(voice), step=int(step), heard_until=None if np.isnan(heard) else float(heard))
            for beat, duration, pitch, velocity, voice, step, heard in rows.tolist()]


def _read(data: bytes) -> SessionSnapshot:
    try:
        return SessionSnapshot.from_bytes(data)
    except SnapshotError as exc:
        raise RequestError(ErrorCode.BAD_SNAPSHOT, f"the stored snapshot cannot be read: {exc}") from exc
