"""WebSocket sessions: one engine stream each, and the notes generated for it but not yet sent.

When a person plays, the engine goes back to the latest note this session handed to its client
(``stream.sent_step``, raised as notes leave) and the notes generated after it are void: the
session holds its sending while the engine does that (:meth:`Session.held`) and then drops them
(:meth:`Session.drop_unsent`).

A :class:`Session` outlives its connection (:mod:`server.connection`): when the socket drops it
waits ``resume_seconds`` for its resume token, with generation paused and every note not yet sent
kept. The :class:`SessionRegistry` holds every session of the server, connected or waiting.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import secrets
import time
from typing import TYPE_CHECKING

from server.config import ServerConfig
from server.engine import Engine, EngineClosed, Stream, StreamNote
from server.metrics import Metrics
from server.prompts import PromptReader
from server.saved_sessions import SavedSessions
from server.store import SessionStore
from server.protocol import ErrorCode, OutNote, StateReply

if TYPE_CHECKING:
    from server.connection import Connection

SEND_WINDOW = 0.005  # notes due within this many seconds of each other leave in one frame


class Session:
    """One stream and the notes generated for it but not yet sent."""

    def __init__(self, registry: "SessionRegistry", client: str = "") -> None:
        self.registry = registry
        self.client = client  # the address it was started from (per-client limits)
        self.id = secrets.token_hex(8)
        self.resume_token = secrets.token_urlsafe(24)
        self.stream: Stream | None = None
        self.paused = False  # asked for by the client (a detached session is paused too)
        self.programs: list[int | None] | None = None  # a GM program per voice, kept for the client
        self.accompany: list[int] = []  # the voices the person plays (the model never does)
        self.requested_lookahead: float | None = None  # the start message's lookahead
        self.epoch = 0  # the stream's rollback epoch as the session knows it
        self.holding = 0  # > 0: played notes are being read, send nothing
        self._in_flight: list[StreamNote] = []  # the notes of the latest due_notes, for put_back
        self.connection: Connection | None = None
        self.pending: list[tuple[float, int, StreamNote]] = []  # heap by beat
        self._order = itertools.count()
        self.sent = 0
        self.wake = asyncio.Event()
        self.expiry: asyncio.TimerHandle | None = None
        self.ended = False
        self.last_beat: float | None = None  # beat of the latest note sent
        self.skip_through: float | None = None  # notes at or before this beat were received already
        self.saved_sent = -1  # notes sent when it was last saved to the store
        self.saved_at = 0.0  # time.monotonic() of that save
        self.reread = False  # restored from another checkpoint's snapshot
        self.bookmarks = 0  # snapshots and forks made

    def queue(self, notes: list[StreamNote]) -> None:
        """Queue generated notes for sending (a snapshot's unsent ones: they belong to this epoch)."""
        for note in notes:
            heapq.heappush(self.pending, (note.beat, next(self._order), note))

    # --- called by the engine (on the event loop)
    def on_generated(self, notes: list[StreamNote]) -> None:
        for note in notes:
            if note.epoch < self.epoch:
                continue  # generated before a rollback: void
            if self.skip_through is not None and note.beat <= self.skip_through:
                self.stream.sent_step = max(self.stream.sent_step, note.step)  # the client has it already
                continue
            heapq.heappush(self.pending, (note.beat, next(self._order), note))
        self.wake.set()

    def on_error(self, message: str) -> None:
        if self.connection is not None:
            self.connection.fail(ErrorCode.GENERATION_FAILED, message)
        else:
            self.registry.end(self)

    # --- timing
    @property
    def lookahead(self) -> float:
        """Seconds a note leaves before its start: the session's own, else the server's."""
        if self.requested_lookahead is not None:
            return self.requested_lookahead
        return self.registry.config.lookahead

    def now(self) -> float:
        """Seconds on the session clock."""
        return time.time() - self.stream.clock

    def first_unsent_beat(self) -> float:
        beat = self.pending[0][0] if self.pending else self.stream.frontier
        return beat if self.skip_through is None else max(beat, self.skip_through)

    def received_through(self, beat: float) -> None:
        """The client has every note up to ``beat`` (a resume's ``last_beat``): none of them is sent
        again, whether queued here or generated again from an older snapshot."""
        self.skip_through = beat if self.skip_through is None else max(self.skip_through, beat)
        kept = [item for item in self.pending if item[0] > beat]
        if len(kept) != len(self.pending):
            self.pending = kept
            heapq.heapify(self.pending)

    def retime(self, *, at_time: float | None = None, bpm: float | None = None) -> None:
        """Re-anchor the timeline at the first unsent beat (notes already sent keep their times)."""
        stream = self.stream
        beat = self.first_unsent_beat()
        time_ = at_time if at_time is not None else max(stream.timeline.seconds(beat), self.now())
        stream.timeline = stream.timeline.anchored(beat, time_, bpm)

    def set_running(self, running: bool) -> None:
        """Resume (re-timed to start ``lookahead`` from now) or pause generation and sending."""
        if running and self.stream.paused:
            self.retime(at_time=self.now() + self.lookahead)
        self.stream.paused = not running
        self.wake.set()

    def state_reply(self) -> StateReply:
        return StateReply.of("paused" if self.paused else "playing", self.stream.timeline.bpm, self.stream.sampling,
                             self.programs, self.accompany)

    @contextlib.contextmanager
    def held(self):
        """Send no notes inside this block (while the engine reads played notes and goes back to
        the latest sent note, which must not move meanwhile)."""
        self.holding += 1
        try:
            yield
        finally:
            self.holding -= 1
            self.wake.set()

    def drop_unsent(self, epoch: int) -> int:
        """The stream went back to its latest sent note (rollback ``epoch``): drop the notes of older
        epochs generated after it. Returns how many were dropped."""
        self.epoch = max(self.epoch, epoch)
        sent = self.stream.sent_step
        kept = [item for item in self.pending if item[2].epoch >= self.epoch or item[2].step <= sent]
        dropped = len(self.pending) - len(kept)
        heapq.heapify(kept)
        self.pending = kept
        return dropped

    def due_notes(self) -> tuple[list[OutNote], float | None]:
        """Pop the notes due to leave now; also the seconds until the next one is due."""
        stream = self.stream
        timeline, clock = stream.timeline, stream.clock
        now = time.time()
        out: list[OutNote] = []
        self._in_flight = []
        if self.holding:
            return out, None
        while self.pending:
            beat, _, note = self.pending[0]
            start = timeline.seconds(beat)
            leave_at = clock + start - self.lookahead
            if leave_at > now + SEND_WINDOW:
                return out, leave_at - now
            heapq.heappop(self.pending)
            self._in_flight.append(note)
            self.last_beat = beat if self.last_beat is None else max(self.last_beat, beat)
            stream.sent_step = max(stream.sent_step, note.step)  # handed over: a rollback keeps it
            out.append(OutNote(pitch=note.pitch, velocity=note.velocity, voice=note.voice, start=round(start, 6),
                               duration=round(timeline.duration_seconds(note.duration), 6), beat=round(note.beat, 6),
                               heard_until=None if note.heard_until is None else round(note.heard_until, 6)))
        return out, None

    def put_back(self, notes: list[OutNote]) -> None:
        """Notes whose frame could not be sent go back to the queue (a dropped connection): the
        notes of the latest :meth:`due_notes` (``notes`` is what it returned)."""
        for note in self._in_flight:
            heapq.heappush(self.pending, (note.beat, next(self._order), note))
        self._in_flight = []


class SessionRegistry:
    """Every session of the server, connected or waiting for its resume token."""

    def __init__(self, config: ServerConfig, engine: Engine, prompts: PromptReader, metrics: Metrics,
                 digest: str = "", store: SessionStore | None = None) -> None:
        self.config = config
        self.engine = engine
        self.prompts = prompts
        self.metrics = metrics
        self.sessions: dict[str, Session] = {}
        self.by_token: dict[str, Session] = {}
        self.saved = SavedSessions(self, digest, store)  # snapshots: the store, bookmarks, forks

    def new_session(self, client: str = "") -> Session:
        return Session(self, client)

    @property
    def full(self) -> bool:
        return len(self.sessions) >= self.config.max_sessions

    def full_for(self, client: str) -> bool:
        """Whether ``client`` holds ``--max-sessions-per-client`` sessions already."""
        held = sum(1 for s in self.sessions.values() if s.client == client)
        return held >= self.config.max_sessions_per_client

    def add(self, session: Session) -> None:
        self.sessions[session.id] = session
        self.by_token[session.resume_token] = session
        self._count()

    def attach(self, session: Session, connection: "Connection") -> None:
        if session.expiry is not None:
            session.expiry.cancel()
            session.expiry = None
        session.connection = connection
        self._count()

    def detach(self, session: Session) -> None:
        """The socket dropped: pause and wait ``resume_seconds`` for the token."""
        session.connection = None
        if session.ended:
            return
        if session.stream is not None:
            session.stream.paused = True
        loop = asyncio.get_running_loop()
        session.expiry = loop.call_later(self.config.resume_seconds, self.end, session)
        self.saved.saved_in_background(session)
        self._count()

    def end(self, session: Session, stopped: bool = False) -> None:
        """The session is over (``stopped``: by its client, so its store entry goes too; an expired
        one stays there until its own expiry, for a replica that may hold it now)."""
        if session.ended:
            return
        session.ended = True
        if stopped:
            self.saved.forget(session)
        if session.expiry is not None:
            session.expiry.cancel()
        self.sessions.pop(session.id, None)
        self.by_token.pop(session.resume_token, None)
        if session.stream is not None:
            asyncio.get_running_loop().create_task(self._release(session.stream))
        self._count()

    async def _release(self, stream: Stream) -> None:
        with contextlib.suppress(EngineClosed):
            await self.engine.release(stream)

    def _count(self) -> None:
        attached = sum(1 for s in self.sessions.values() if s.connection is not None)
        self.metrics.sessions.set(attached)
        self.metrics.detached.set(len(self.sessions) - attached)
