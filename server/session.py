"""WebSocket sessions: one engine stream each, streamed to the client ahead of time.

A :class:`Session` outlives its connection: when the socket drops it waits ``resume_seconds`` for
its resume token, with generation paused and every note not yet sent kept. A :class:`Connection`
is one WebSocket on ``/ws`` and speaks the protocol:

1. The client connects and sends ``start`` (settings, an optional prompt, or a ``resume_token``).
   Before that, any other message gets an ``not_started`` error.
2. A new session is refused with an error frame and close code 1013 when the server is full.
   Otherwise the prompt is read, the server replies ``session`` (id, resume token, ``clock``: the
   unix time of session second 0) and ``state`` (the settings in force).
3. From then on the server sends ``notes`` frames, each note at most ``lookahead`` seconds before
   its ``start``. The client may send ``notes`` (played notes, folded into the stream), ``set``
   (new settings from the next token; a tempo change keeps the times of notes already sent),
   ``pause``/``resume`` (each answered by ``state``) and ``stop`` (answered by ``stopped``, then
   close code 1000).
4. A bad frame gets an ``error`` frame with a stable ``code`` and the session carries on; a failed
   model step ends the session with a ``generation_failed`` error and close code 1011.
5. If the socket drops, the session is resumable for ``resume_seconds`` with
   ``{"type":"start","resume_token":...}`` on a new connection; it answers ``session`` with
   ``resumed: true`` and continues the same stream (the clock does not change; the next notes are
   re-timed to start ``lookahead`` seconds after the reconnection).
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import json
import logging
import secrets
import time
from dataclasses import fields, replace

from fastapi import WebSocket, WebSocketDisconnect
from pydantic import ValidationError

from model.sampling import SamplingConfig
from model.tokenizer import Tokenizer
from server.config import ServerConfig
from server.engine import Engine, EngineClosed, EngineFull, GeneratedNote, PlayedInput, Stream
from server.metrics import Metrics
from server.prompts import Prompt, RequestError, decode_base64_midi, prompt_from_midi, prompt_from_notes
from server.protocol import (CLIENT_TYPES, ErrorCode, ErrorReply, NotesMessage, NotesReply, OutNote,
                             PauseMessage, ResumeMessage, SessionReply, SetMessage, Settings, StartMessage,
                             StateReply, StopMessage, StoppedReply, client_message_adapter)
from server.timeline import Timeline

logger = logging.getLogger(__name__)

DEFAULT_BPM = 120.0
SEND_WINDOW = 0.005  # notes due within this many seconds of each other leave in one frame
CLOSE_TRY_AGAIN_LATER = 1013
CLOSE_INTERNAL_ERROR = 1011


def format_validation_error(exc: ValidationError) -> str:
    parts = []
    for error in exc.errors()[:5]:
        where = ".".join(str(p) for p in error["loc"] if p not in CLIENT_TYPES) or "message"
        parts.append(f"{where}: {error['msg']}")
    return "; ".join(parts)


def sampling_with(current: SamplingConfig, settings: Settings) -> SamplingConfig:
    changes = {f.name: getattr(settings, f.name) for f in fields(SamplingConfig)
               if getattr(settings, f.name) is not None}
    return replace(current, **changes)


class Session:
    """One stream and the notes generated for it but not yet sent."""

    def __init__(self, registry: "SessionRegistry") -> None:
        self.registry = registry
        self.id = secrets.token_hex(8)
        self.resume_token = secrets.token_urlsafe(24)
        self.stream: Stream | None = None
        self.paused = False  # asked for by the client (a detached session is paused too)
        self.connection: Connection | None = None
        self.pending: list[tuple[float, int, GeneratedNote]] = []  # heap by beat
        self._order = itertools.count()
        self.sent = 0
        self.wake = asyncio.Event()
        self.expiry: asyncio.TimerHandle | None = None
        self.ended = False

    # --- called by the engine (on the event loop)
    def on_generated(self, notes: list[GeneratedNote]) -> None:
        for note in notes:
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
        return self.registry.config.lookahead

    def now(self) -> float:
        """Seconds on the session clock."""
        return time.time() - self.stream.clock

    def first_unsent_beat(self) -> float:
        return self.pending[0][0] if self.pending else self.stream.frontier

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
        s = self.stream.sampling
        return StateReply(state="paused" if self.paused else "playing", bpm=self.stream.timeline.bpm,
                          temperature=s.temperature, top_k=s.top_k, top_p=s.top_p, min_p=s.min_p, seed=s.seed,
                          key_pull=s.key_pull)

    def due_notes(self) -> tuple[list[OutNote], float | None]:
        """Pop the notes due to leave now; also the seconds until the next one is due."""
        stream = self.stream
        timeline, clock = stream.timeline, stream.clock
        now = time.time()
        out: list[OutNote] = []
        seconds_per_beat = 60.0 / timeline.bpm
        while self.pending:
            beat, _, note = self.pending[0]
            start = timeline.seconds(beat)
            leave_at = clock + start - self.lookahead
            if leave_at > now + SEND_WINDOW:
                return out, leave_at - now
            heapq.heappop(self.pending)
            out.append(OutNote(pitch=note.pitch, velocity=note.velocity, voice=note.voice, start=round(start, 6),
                               duration=round(note.duration * seconds_per_beat, 6), beat=round(note.beat, 6)))
        return out, None

    def put_back(self, notes: list[OutNote]) -> None:
        """Notes whose frame could not be sent go back to the queue (a dropped connection)."""
        for n in notes:
            bpm = self.stream.timeline.bpm
            heapq.heappush(self.pending, (n.beat, next(self._order),
                                          GeneratedNote(n.beat, n.duration * bpm / 60.0, n.pitch, n.velocity, n.voice)))


class SessionRegistry:
    """Every session of the server, connected or waiting for its resume token."""

    def __init__(self, config: ServerConfig, engine: Engine, tokenizer: Tokenizer, metrics: Metrics) -> None:
        self.config = config
        self.engine = engine
        self.tokenizer = tokenizer
        self.metrics = metrics
        self.sessions: dict[str, Session] = {}
        self.by_token: dict[str, Session] = {}

    @property
    def full(self) -> bool:
        return len(self.sessions) >= self.config.max_sessions

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
        self._count()

    def end(self, session: Session) -> None:
        if session.ended:
            return
        session.ended = True
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


class Connection:
    """One WebSocket on ``/ws`` (see the module docstring for the protocol)."""

    def __init__(self, websocket: WebSocket, registry: SessionRegistry) -> None:
        self.ws = websocket
        self.registry = registry
        self.metrics = registry.metrics
        self.session: Session | None = None
        self.sender: asyncio.Task | None = None
        self.closing: tuple[int, str] | None = None
        self.send_lock = asyncio.Lock()

    async def run(self) -> None:
        await self.ws.accept()
        try:
            while self.closing is None:
                message = await self.ws.receive()
                if message["type"] == "websocket.disconnect":
                    break
                try:
                    await self.handle(message)
                except RequestError as exc:
                    await self.send_error(exc.code, exc.message)
            if self.closing is not None:
                code, reason = self.closing
                with contextlib.suppress(Exception):
                    await self.ws.close(code, reason)
        except (WebSocketDisconnect, RuntimeError):
            pass  # the client went away
        finally:
            await self.cleanup()

    # ------------------------------------------------------------------ receiving
    async def handle(self, message: dict) -> None:
        text = message.get("text")
        if text is None:
            raise RequestError(ErrorCode.BINARY_FRAME, "frames must be JSON text, not binary")
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise RequestError(ErrorCode.INVALID_JSON, f"the frame is not valid JSON: {exc}") from exc
        if not isinstance(data, dict):
            raise RequestError(ErrorCode.INVALID_JSON, "the frame must be a JSON object")
        kind = data.get("type")
        if kind not in CLIENT_TYPES:
            raise RequestError(ErrorCode.UNKNOWN_TYPE,
                               f"unknown message type {kind!r}; expected one of {', '.join(CLIENT_TYPES)}")
        try:
            msg = client_message_adapter.validate_python(data)
        except ValidationError as exc:
            raise RequestError(ErrorCode.INVALID_MESSAGE, f"{kind}: {format_validation_error(exc)}") from exc
        if isinstance(msg, StartMessage):
            await self.on_start(msg)
            return
        if self.session is None:
            raise RequestError(ErrorCode.NOT_STARTED, f"send a start message before {kind!r}")
        if isinstance(msg, NotesMessage):
            await self.on_notes(msg)
        elif isinstance(msg, SetMessage):
            await self.on_set(msg)
        elif isinstance(msg, PauseMessage):
            self.session.paused = True
            self.session.set_running(False)
            await self.send(self.session.state_reply())
        elif isinstance(msg, ResumeMessage):
            self.session.paused = False
            self.session.set_running(True)
            await self.send(self.session.state_reply())
        elif isinstance(msg, StopMessage):
            await self.on_stop()

    async def on_start(self, msg: StartMessage) -> None:
        if self.session is not None:
            raise RequestError(ErrorCode.ALREADY_STARTED, "this connection already has a session; "
                               "send set to change settings, or stop")
        if msg.resume_token is not None:
            await self.resume(msg.resume_token)
            return
        registry = self.registry
        if registry.full:
            await self.refuse_full()
            return
        prompt = await self.read_prompt(msg)
        bpm = msg.bpm or (prompt.bpm if prompt.bpm and 20 <= prompt.bpm <= 400 else None) or DEFAULT_BPM
        seed = msg.seed if msg.seed is not None else secrets.randbelow(2**31)
        sampling = sampling_with(replace(SamplingConfig(), seed=seed), msg)
        session = Session(registry)
        try:
            session.stream = await registry.engine.open(
                prompt.tokens, sampling=sampling, timeline=Timeline(bpm), realtime=True,
                sink=session.on_generated, on_error=session.on_error)
        except EngineFull:
            await self.refuse_full()
            return
        except (EngineClosed, RuntimeError) as exc:
            raise RequestError(ErrorCode.GENERATION_FAILED, f"the session could not start: {exc}") from exc
        if registry.full:  # others started while the prompt was read
            await registry.engine.release(session.stream)
            await self.refuse_full()
            return
        self.bind(session)
        registry.add(session)
        await self.send(SessionReply(id=session.id, resume_token=session.resume_token, clock=session.stream.clock,
                                     lookahead=session.lookahead))
        await self.send(session.state_reply())
        logger.info("session %s started (%d prompt notes, seed %d)", session.id, prompt.notes, seed)

    async def read_prompt(self, msg: StartMessage) -> Prompt:
        cfg = self.registry.config
        tokenizer = self.registry.tokenizer
        if msg.prompt_midi is not None:
            data = decode_base64_midi(msg.prompt_midi, cfg.max_upload_bytes)
            return await asyncio.to_thread(prompt_from_midi, data, tokenizer, cfg.max_upload_bytes)
        return prompt_from_notes(msg.prompt_notes or [], tokenizer, msg.bpm or DEFAULT_BPM)

    async def resume(self, token: str) -> None:
        session = self.registry.by_token.get(token)
        if session is None or session.ended or session.connection is not None:
            raise RequestError(ErrorCode.UNKNOWN_RESUME_TOKEN,
                               "this resume token is unknown, expired or in use by another connection")
        self.registry.attach(session, self)
        self.bind(session)
        await self.send(SessionReply(id=session.id, resume_token=session.resume_token, clock=session.stream.clock,
                                     resumed=True, lookahead=session.lookahead))
        if not session.paused:
            session.set_running(True)
        await self.send(session.state_reply())
        logger.info("session %s resumed", session.id)

    def bind(self, session: Session) -> None:
        self.session = session
        session.connection = self
        self.sender = asyncio.create_task(self.send_notes(), name=f"send-{session.id}")

    async def on_notes(self, msg: NotesMessage) -> None:
        session = self.session
        timeline = session.stream.timeline
        played = [PlayedInput(beat=timeline.beat_at(n.start), duration=n.duration * timeline.bpm / 60.0,
                              pitch=n.pitch, velocity=n.velocity, voice=n.voice) for n in msg.notes]
        if not played:
            return
        try:
            _, unknown = await self.registry.engine.feed(session.stream, played)
        except EngineClosed as exc:
            raise RequestError(ErrorCode.GENERATION_FAILED, str(exc)) from exc
        if unknown:
            raise RequestError(ErrorCode.UNREADABLE_NOTES,
                               f"{unknown} of {len(played)} played notes were left out: this model's vocabulary "
                               "has no token for their pitch at that place in the bar")

    async def on_set(self, msg: SetMessage) -> None:
        session = self.session
        session.stream.sampling = sampling_with(session.stream.sampling, msg)
        if msg.bpm is not None and msg.bpm != session.stream.timeline.bpm:
            session.retime(bpm=msg.bpm)
            session.wake.set()
        await self.send(session.state_reply())

    async def on_stop(self) -> None:
        session = self.session
        self.registry.end(session)
        await self.stop_sender()
        await self.send(StoppedReply(notes_sent=session.sent))
        self.closing = (1000, "stopped")

    async def refuse_full(self) -> None:
        limit = self.registry.config.max_sessions
        await self.send_error(ErrorCode.SERVER_FULL, f"the server is full ({limit} sessions); try again later")
        self.closing = (CLOSE_TRY_AGAIN_LATER, f"server full: {limit} sessions")

    def fail(self, code: ErrorCode, message: str) -> None:
        """The stream failed: tell the client, end the session, close with 1011."""
        async def _fail() -> None:
            await self.send_error(code, message)
            if self.session is not None:
                self.registry.end(self.session)
            with contextlib.suppress(Exception):
                await self.ws.close(CLOSE_INTERNAL_ERROR, "generation failed")
        asyncio.get_running_loop().create_task(_fail())

    # ------------------------------------------------------------------ sending
    async def send(self, reply) -> None:
        async with self.send_lock:
            await self.ws.send_text(reply.model_dump_json())

    async def send_error(self, code: ErrorCode, message: str) -> None:
        self.metrics.errors.labels(code=code.value).inc()
        with contextlib.suppress(Exception):
            await self.send(ErrorReply(code=code, message=message))

    async def send_notes(self) -> None:
        """Send each note ``lookahead`` seconds before its start (this connection's task)."""
        session = self.session
        while True:
            session.wake.clear()
            wait: float | None = None
            if not session.stream.paused:
                notes, wait = session.due_notes()
                if notes:
                    late = sum(1 for n in notes if session.stream.clock + n.start < time.time())
                    try:
                        await self.send(NotesReply(notes=notes))
                    except BaseException as exc:  # dropped or cancelled: keep the notes for a resume
                        session.put_back(notes)
                        if isinstance(exc, asyncio.CancelledError):
                            raise
                        return
                    session.sent += len(notes)
                    self.metrics.notes_sent.inc(len(notes))
                    if late:
                        self.metrics.late_notes.inc(late)
                    continue
            # asyncio.timeout, not wait_for: on Python 3.11 wait_for returns normally when it is
            # cancelled in the same turn as the event is set, and this task would then never end.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait):
                    await session.wake.wait()

    async def stop_sender(self) -> None:
        if self.sender is not None:
            self.sender.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self.sender
            self.sender = None

    async def cleanup(self) -> None:
        await self.stop_sender()
        session = self.session
        if session is not None and session.connection is self:
            self.registry.detach(session)
