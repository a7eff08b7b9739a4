"""One WebSocket on ``/ws``: a :class:`Connection` speaks the protocol for one session
(:mod:`server.session`), step by step:

1. The client connects and sends ``start`` (settings, an optional prompt, or a ``resume_token``).
   Before that, any other message gets an ``not_started`` error.
2. A new session is refused with an error frame and close code 1013 when the server is full.
   Otherwise the prompt is read, the server replies ``session`` (id, resume token, ``clock``: the
   unix time of session second 0) and ``state`` (the settings in force).
3. From then on the server sends ``notes`` frames, each note at most ``lookahead`` seconds before
   its ``start``. The client may send ``notes`` (played notes: the stream goes back to the latest
   note sent, drops the ones generated after it, reads the played notes and answers; each
   generated note's ``heard_until`` names the latest played note it heard), ``set``
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
import json
import logging
import secrets
import time
from dataclasses import replace

from fastapi import WebSocket, WebSocketDisconnect
from pydantic import ValidationError

from model.sampling.config import SamplingConfig
from model.timebase import Timeline
from server.engine import EngineClosed, EngineFull, StreamNote
from server.protocol import (CLIENT_TYPES, ErrorCode, ErrorReply, ForkMessage, NotesMessage, NotesReply,
                             PauseMessage, RequestError, ResumeMessage, SessionReply, SetMessage, SnapshotMessage,
                             StartMessage, StopMessage, StoppedReply, client_address, client_message_adapter,
                             format_validation_error)
from server.session import Session, SessionRegistry

logger = logging.getLogger(__name__)

CLOSE_TRY_AGAIN_LATER = 1013
CLOSE_INTERNAL_ERROR = 1011
CLOSE_POLICY = 1008
SLOW_SEND_SECONDS = 0.25  # a send that takes longer: the client's socket is not draining


def _refuse_constant(name: str) -> None:
    raise ValueError(f"{name} is not a number JSON allows")


class TokenBucket:
    """``rate`` tokens a second, at most ``burst`` saved up."""

    def __init__(self, rate: float, burst: float) -> None:
        self.rate, self.burst = rate, burst
        self.tokens = burst
        self.at = time.monotonic()

    def take(self) -> bool:
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.at) * self.rate)
        self.at = now
        if self.tokens < 1:
            return False
        self.tokens -= 1
        return True


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
        self.task: asyncio.Task | None = None
        self.dropped = False  # closed for not reading
        rate = registry.config.max_messages_per_second
        self.rate = TokenBucket(rate, 2 * rate)
        self.flood_warned = -1.0

    async def run(self) -> None:
        self.task = asyncio.current_task()
        await self.ws.accept()
        try:
            while self.closing is None:
                message = await self.ws.receive()
                if message["type"] == "websocket.disconnect":
                    break
                if not self.rate.take():
                    await self.refuse_flood()
                    continue
                try:
                    await self.handle(message)
                except RequestError as exc:
                    await self.send_error(exc.code, exc.message)
                except (WebSocketDisconnect, asyncio.CancelledError):
                    raise
                except Exception as exc:  # a bug must cost one message its answer, never the connection
                    logger.exception("a %s message could not be handled", message.get("type"))
                    await self.send_error(ErrorCode.INVALID_MESSAGE, f"this message could not be handled: {exc}")
            if self.closing is not None:
                code, reason = self.closing
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(self.ws.close(code, reason), 1.0)
        except WebSocketDisconnect:
            pass  # the client went away
        except RuntimeError as exc:  # Starlette's word for a socket already closed
            logger.debug("connection ended: %s", exc)
        except asyncio.CancelledError:
            if not self.dropped:
                raise
        finally:
            await self.cleanup()

    # ------------------------------------------------------------------ receiving
    async def handle(self, message: dict) -> None:
        text = message.get("text")
        if text is None:
            raise RequestError(ErrorCode.BINARY_FRAME, "frames must be JSON text, not binary")
        try:
            data = json.loads(text, parse_constant=_refuse_constant)
        except json.JSONDecodeError as exc:
            raise RequestError(ErrorCode.INVALID_JSON, f"the frame is not valid JSON: {exc}") from exc
        except RecursionError:
            raise RequestError(ErrorCode.INVALID_JSON, "the frame nests JSON too deeply") from None
        except ValueError as exc:  # NaN / Infinity, or an integer of thousands of digits
            raise RequestError(ErrorCode.INVALID_JSON, f"the frame is not usable JSON: {exc}") from exc
        if not isinstance(data, dict):
            raise RequestError(ErrorCode.INVALID_JSON, "the frame must be a JSON object")
        kind = data.get("type")
        if kind not in CLIENT_TYPES:
            shown = repr(kind) if len(repr(kind)) <= 40 else repr(kind)[:37] + "..."
            raise RequestError(ErrorCode.UNKNOWN_TYPE,
                               f"unknown message type {shown}; expected one of {', '.join(CLIENT_TYPES)}")
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
        elif isinstance(msg, SnapshotMessage):
            await self.send(await self.registry.saved.bookmark(self.session))
        elif isinstance(msg, ForkMessage):
            await self.send(await self.registry.saved.fork(self.session, msg.seed))

    async def on_start(self, msg: StartMessage) -> None:
        if self.session is not None:
            raise RequestError(ErrorCode.ALREADY_STARTED, "this connection already has a session; "
                               "send set to change settings, or stop")
        if msg.resume_token is not None:
            await self.resume(msg.resume_token, msg.last_beat)
            return
        registry = self.registry
        if registry.full:
            await self.refuse_full()
            return
        client = client_address(self.ws)
        if registry.full_for(client):
            await self.refuse_full(per_client=True)
            return
        if msg.snapshot is not None:
            await self.start_from_snapshot(msg, client)
            return
        cfg = registry.config
        prompt = await registry.prompts.read(msg, msg, cfg.max_upload_bytes)
        seed = msg.seed if msg.seed is not None else secrets.randbelow(2**31)
        sampling = msg.applied_to(replace(SamplingConfig(), seed=seed))
        accompany = self.accompanied_voices(msg) or []
        session = Session(registry, client)
        session.requested_lookahead = msg.lookahead
        session.accompany = accompany
        try:
            session.stream = await registry.engine.open(
                prompt.tokens, sampling=sampling, timeline=Timeline(prompt.bpm), realtime=True,
                sink=session.on_generated, on_error=session.on_error, lookahead=session.lookahead,
                banned_voices=tuple(accompany))
        except EngineFull:
            await self.refuse_full()
            return
        except (EngineClosed, RuntimeError) as exc:
            raise RequestError(ErrorCode.GENERATION_FAILED, f"the session could not start: {exc}") from exc
        if registry.full or registry.full_for(client):  # others started while the prompt was read
            await registry.engine.release(session.stream)
            await self.refuse_full(per_client=not registry.full)
            return
        session.programs = msg.programs
        self.bind(session)
        registry.add(session)
        await self.send(SessionReply(id=session.id, resume_token=session.resume_token, clock=session.stream.clock,
                                     lookahead=session.lookahead))
        await self.send(session.state_reply())
        self.start_sending()
        logger.info("session %s started (%d prompt notes, seed %d)", session.id, prompt.notes, seed)

    async def start_from_snapshot(self, msg: StartMessage, client: str) -> None:
        """A new session from a bookmark, with the start message's settings over the bookmark's."""
        registry = self.registry
        snap = await registry.saved.load_bookmark(msg.snapshot)
        accompany = self.accompanied_voices(msg)
        session = await registry.saved.restore(snap, client=client, sampling=msg.applied_to(snap.sampling))
        if registry.full or registry.full_for(client):
            await registry.engine.release(session.stream)
            await self.refuse_full(per_client=not registry.full)
            return
        if msg.programs is not None:
            session.programs = msg.programs
        if accompany is not None:
            session.accompany = accompany
            session.stream.banned_voices = tuple(accompany)
        if msg.lookahead is not None:
            session.requested_lookahead = session.stream.lookahead = msg.lookahead
        self.bind(session)
        registry.add(session)
        session.set_running(True)
        if msg.bpm is not None:
            session.retime(bpm=msg.bpm)
        await self.send(SessionReply(id=session.id, resume_token=session.resume_token, clock=session.stream.clock,
                                     lookahead=session.lookahead, snapshot=msg.snapshot, reread=session.reread))
        await self.send(session.state_reply())
        self.start_sending()
        logger.info("session %s started from snapshot %s", session.id, msg.snapshot)

    async def resume(self, token: str, last_beat: float | None = None) -> None:
        session = self.registry.by_token.get(token)
        if session is None:  # held by another replica (or one that stopped): the shared store may have it
            session = await self.registry.saved.resume(token, client_address(self.ws))
        if session is None or session.ended or session.connection is not None:
            raise RequestError(ErrorCode.UNKNOWN_RESUME_TOKEN,
                               "this resume token is unknown, expired or in use by another connection")
        if last_beat is not None:
            session.received_through(last_beat)
        self.registry.attach(session, self)
        self.bind(session)
        await self.send(SessionReply(id=session.id, resume_token=session.resume_token, clock=session.stream.clock,
                                     resumed=True, lookahead=session.lookahead, reread=session.reread))
        if not session.paused:
            session.set_running(True)
        await self.send(session.state_reply())
        self.start_sending()
        logger.info("session %s resumed", session.id)

    def bind(self, session: Session) -> None:
        self.session = session
        session.connection = self

    def start_sending(self) -> None:
        """Start streaming notes (after the ``session`` and ``state`` replies, which come first)."""
        self.sender = asyncio.create_task(self.send_notes(), name=f"send-{self.session.id}")

    def accompanied_voices(self, msg: StartMessage | SetMessage) -> list[int] | None:
        """The voices ``msg`` gives the person (None: no change), checked against the model's."""
        if msg.accompany is None:
            return None
        voices = msg.accompany.voices
        playable = self.registry.engine.model.config.max_voices
        if voices and set(range(playable)) <= set(voices):
            raise RequestError(ErrorCode.INVALID_MESSAGE, f"accompany.voices: {voices} takes every voice this model "
                               f"plays (0-{playable - 1}); leave it at least one")
        return list(voices)

    async def on_notes(self, msg: NotesMessage) -> None:
        session = self.session
        timeline = session.stream.timeline
        accompany = session.accompany
        played = [StreamNote(beat=timeline.beat_at(n.start), duration=timeline.duration_beats(n.duration),
                             pitch=n.pitch, velocity=n.velocity,
                             voice=n.voice if not accompany or n.voice in accompany else accompany[0])
                  for n in msg.notes]
        if not played:
            return
        try:
            with session.held():
                fed = await self.registry.engine.feed(session.stream, played, max(n.start for n in msg.notes))
                if fed.epoch > session.epoch:
                    self.metrics.notes_dropped.inc(session.drop_unsent(fed.epoch))
        except EngineClosed as exc:
            raise RequestError(ErrorCode.GENERATION_FAILED, str(exc)) from exc
        unknown = fed.unknown
        if unknown:
            raise RequestError(ErrorCode.UNREADABLE_NOTES,
                               f"{unknown} of {len(played)} played notes were left out: this model's vocabulary "
                               "has no token for their pitch at that place in the bar")

    async def on_set(self, msg: SetMessage) -> None:
        session = self.session
        accompany = self.accompanied_voices(msg)  # checked before anything changes
        session.stream.sampling = msg.applied_to(session.stream.sampling)
        if msg.programs is not None:
            session.programs = msg.programs
        if accompany is not None:
            session.accompany = accompany
            session.stream.banned_voices = tuple(accompany)
        if msg.bpm is not None and msg.bpm != session.stream.timeline.bpm:
            session.retime(bpm=msg.bpm)
            session.wake.set()
        await self.send(session.state_reply())

    async def on_stop(self) -> None:
        session = self.session
        self.registry.end(session, stopped=True)
        await self.stop_sender()
        await self.send(StoppedReply(notes_sent=session.sent))
        self.closing = (1000, "stopped")

    async def refuse_full(self, per_client: bool = False) -> None:
        if per_client:
            limit = self.registry.config.max_sessions_per_client
            await self.send_error(ErrorCode.SERVER_FULL, f"this client holds {limit} sessions already "
                                  "(--max-sessions-per-client); stop one or try again later")
            self.closing = (CLOSE_TRY_AGAIN_LATER, f"{limit} sessions for this client")
            return
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
        """Send one frame; a client that has not read it within ``--send-timeout`` is dropped (1008)."""
        async with self.send_lock:
            try:
                async with asyncio.timeout(self.registry.config.send_timeout):
                    await self.ws.send_text(reply.model_dump_json())
            except TimeoutError:
                self.drop_slow_reader()
                raise WebSocketDisconnect(CLOSE_POLICY, "not reading") from None

    def drop_slow_reader(self) -> None:
        """The client stopped reading: end this connection; its session waits for a resume."""
        if self.dropped:
            return
        self.dropped = True
        self.metrics.slow_clients.inc()
        logger.warning("dropping a client that read nothing for %.0f s", self.registry.config.send_timeout)
        if self.task is not None and self.task is not asyncio.current_task():
            self.task.cancel()  # the receive loop ends; cleanup detaches the session

    async def refuse_flood(self) -> None:
        """Too many messages: one ``rate_limited`` error a second at most; the messages are dropped."""
        now = time.monotonic()
        if now - self.flood_warned >= 1.0:
            self.flood_warned = now
            rate = self.registry.config.max_messages_per_second
            await self.send_error(ErrorCode.RATE_LIMITED, f"more than {rate:g} messages a second: messages "
                                  "are dropped until the rate falls")

    async def send_error(self, code: ErrorCode, message: str) -> None:
        self.metrics.errors.labels(code=code.value).inc()
        with contextlib.suppress(Exception):
            await self.send(ErrorReply(code=code, message=message))

    async def send_notes(self) -> None:
        """Send each note ``lookahead`` seconds before its start (this connection's task).

        A note sent after its start counts as late (``fm_late_notes_total``) unless the client's
        socket was not draining (a send took over :data:`SLOW_SEND_SECONDS`): then the lateness is
        the client's (``fm_late_notes_slow_client_total``)."""
        session = self.session
        slow_client = False
        while True:
            session.wake.clear()
            wait: float | None = None
            if not session.stream.paused:
                notes, wait = session.due_notes()
                if notes:
                    began = time.time()
                    late = sum(1 for n in notes if session.stream.clock + n.start < began)
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
                        (self.metrics.late_notes_slow_client if slow_client else self.metrics.late_notes).inc(late)
                    slow_client = time.time() - began > SLOW_SEND_SECONDS
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
