"""``POST /generate``: one job through the same engine as the live sessions, answered with a ``.mid``.

A :class:`GenerateJobs` handles every request, step by step:

1. Read the body: JSON (the fields of :class:`server.protocol.GenerateRequest`), or
   ``multipart/form-data`` with the prompt as a file part named ``prompt`` and the same fields as
   form fields. Bodies over twice ``--max-upload-bytes`` are refused (413).
2. Read the prompt (:class:`server.prompts.PromptReader`, the same path as ``/ws``).
3. Refuse the job when :data:`MAX_GENERATE_JOBS` are running (503).
4. Open a non-real-time engine stream for ``tokens`` tokens and wait until it is done.
5. Write the continuation (after the prompt's own notes with ``include_prompt``) as a type 1 MIDI
   file at the stream's tempo.

Errors come back as ``{"code": ..., "detail": ...}`` with the status of :data:`HTTP_STATUS`.
"""

from __future__ import annotations

import asyncio
import contextlib

from fastapi import Request
from fastapi.responses import Response
from pydantic import ValidationError

from model.midi.score import Note, Score, TempoChange, TimeSignature
from model.midi.write import midi_bytes
from model.sampling.config import SamplingConfig
from model.timebase import TICKS_PER_BEAT, Timeline, microseconds_per_beat, ticks_from_beats
from model.tokenizer.sequences import TokenSequence
from model.tokenizer.tokenizer import Tokenizer
from server.config import ServerConfig
from server.engine import Engine, EngineClosed, EngineFull, Stream, StreamNote
from server.metrics import Metrics
from server.prompts import PromptReader
from server.protocol import (MAX_GENERATE_TOKENS, ErrorCode, GenerateRequest, RequestError, client_address,
                             error_response, format_validation_error)

MAX_GENERATE_JOBS = 16
HTTP_STATUS = {ErrorCode.TOO_LARGE: 413, ErrorCode.SERVER_FULL: 503, ErrorCode.GENERATION_FAILED: 500,
               ErrorCode.INVALID_MESSAGE: 422, ErrorCode.UNSUPPORTED_MEDIA_TYPE: 415,
               ErrorCode.RATE_LIMITED: 429}  # every other code: 400


class GenerateJobs:
    """Every ``POST /generate`` of one server (see the module docstring)."""

    def __init__(self, config: ServerConfig, engine: Engine, tokenizer: Tokenizer, prompts: PromptReader,
                 metrics: Metrics) -> None:
        self.config = config
        self.engine = engine
        self.tokenizer = tokenizer
        self.prompts = prompts
        self.metrics = metrics
        self.running = 0
        self.by_client: dict[str, int] = {}

    async def respond(self, request: Request) -> Response:
        try:
            req, upload = await read_request(request, self.config.max_upload_bytes)
            prompt = await self.prompts.read(req, req, self.config.max_upload_bytes, upload)
            sampling = req.applied_to(SamplingConfig())
            notes, stream = await self.run(prompt.tokens, sampling, prompt.bpm, req.tokens, client_address(request))
        except RequestError as exc:
            self.metrics.errors.labels(code=exc.code.value).inc()
            return error_response(HTTP_STATUS.get(exc.code, 400), exc.code, exc.message)
        data = continuation_midi(notes, stream, prompt.tokens if req.include_prompt else None, self.tokenizer,
                                 prompt.bpm)
        name = f"fm-seed{sampling.seed}-{req.tokens}tok.mid"
        return Response(data, media_type="audio/midi", headers={
            "Content-Disposition": f'attachment; filename="{name}"',
            "X-FM-Notes": str(len(notes)), "X-FM-Tokens": str(req.tokens), "X-FM-Seed": str(sampling.seed)})

    async def run(self, prompt: TokenSequence | None, sampling: SamplingConfig, bpm: float,
                  tokens: int, client: str = "") -> tuple[list[StreamNote], Stream]:
        """Generate ``tokens`` tokens after ``prompt``: the notes and the finished stream."""
        if self.running >= MAX_GENERATE_JOBS:
            raise RequestError(ErrorCode.SERVER_FULL, f"{MAX_GENERATE_JOBS} generate requests are running; "
                               "try again later")
        limit = self.config.max_jobs_per_client
        if self.by_client.get(client, 0) >= limit:
            raise RequestError(ErrorCode.RATE_LIMITED, f"this client already has {limit} generate requests "
                               "running (--max-jobs-per-client)")
        notes: list[StreamNote] = []
        done = asyncio.get_running_loop().create_future()

        def finish(error: str | None = None) -> None:
            if not done.done():
                done.set_exception(RuntimeError(error)) if error else done.set_result(None)

        self.running += 1
        self.by_client[client] = self.by_client.get(client, 0) + 1
        self.metrics.jobs.set(self.running)
        stream = None
        try:
            stream = await self.engine.open(prompt, sampling=sampling, timeline=Timeline(bpm), realtime=False,
                                            tokens=tokens, sink=notes.extend, on_error=finish, on_done=finish)
            await done
        except EngineFull as exc:
            raise RequestError(ErrorCode.SERVER_FULL, str(exc)) from exc
        except (EngineClosed, RuntimeError) as exc:
            raise RequestError(ErrorCode.GENERATION_FAILED, f"generation failed: {exc}") from exc
        finally:
            self.running -= 1
            self.by_client[client] -= 1
            if not self.by_client[client]:
                del self.by_client[client]
            self.metrics.jobs.set(self.running)
            if stream is not None and not stream.closed:
                with contextlib.suppress(EngineClosed):
                    await self.engine.release(stream)
        return notes, stream


async def read_request(request: Request, limit: int) -> tuple[GenerateRequest, bytes | None]:
    """Parse a JSON or multipart body into a request and an uploaded prompt (if any)."""
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > 2 * limit:
        raise RequestError(ErrorCode.TOO_LARGE, f"the request body is larger than {2 * limit} bytes")
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type not in ("", "application/json", "multipart/form-data"):
        raise RequestError(ErrorCode.UNSUPPORTED_MEDIA_TYPE, f"the body must be application/json or "
                           f"multipart/form-data, not {content_type}")
    upload = None
    try:
        if content_type == "multipart/form-data":
            form = await request.form(max_files=1, max_fields=20, max_part_size=limit)
            fields = {k: v for k, v in form.items() if isinstance(v, str)}
            file = form.get("prompt")
            if file is not None and not isinstance(file, str):
                upload = await file.read(limit + 1)
                if len(upload) > limit:
                    raise RequestError(ErrorCode.TOO_LARGE, f"the prompt file is larger than {limit} bytes")
            req = GenerateRequest.model_validate({k: v for k, v in fields.items() if v != ""},
                                                 strict=False)
        else:
            body = await request.body()
            if body and content_type != "application/json":
                raise RequestError(ErrorCode.UNSUPPORTED_MEDIA_TYPE, "a body needs content-type application/json "
                                   "or multipart/form-data")
            if len(body) > 2 * limit:
                raise RequestError(ErrorCode.TOO_LARGE, f"the request body is larger than {2 * limit} bytes")
            req = GenerateRequest.model_validate_json(body or b"{}")
    except ValidationError as exc:
        raise RequestError(ErrorCode.INVALID_MESSAGE, format_validation_error(exc)
                           + (f" (tokens: at most {MAX_GENERATE_TOKENS})" if "tokens" in str(exc) else "")) from exc
    except RequestError:
        raise
    except Exception as exc:  # the multipart parser's errors (too many parts, a part too large)
        raise RequestError(ErrorCode.INVALID_MESSAGE, f"cannot read the request: {exc}") from exc
    return req, upload


def continuation_midi(notes: list[StreamNote], stream: Stream, prompt: TokenSequence | None,
                      tokenizer: Tokenizer, bpm: float) -> bytes:
    """The continuation (after the prompt's notes if ``prompt`` is given) as a type 1 MIDI file at
    ``bpm``; time signatures from the stream's BAR tokens."""
    timebase = tokenizer.timebase
    shift = stream.offset if prompt is not None else 0.0  # beats: where the continuation begins
    out: list[Note] = []
    if prompt is not None:
        out += tokenizer.decode(prompt, ticks_per_beat=TICKS_PER_BEAT).notes
    for n in notes:
        onset = max(n.beat + shift, 0.0)
        out.append(Note(pitch=n.pitch, velocity=n.velocity, onset_tick=ticks_from_beats(onset),
                        duration_tick=max(1, ticks_from_beats(n.duration)), onset_beat=onset,
                        duration_beat=n.duration, channel=0, track=0, voice=n.voice))
    signatures: list[TimeSignature] = []
    for start, num, den in stream.decoder.signatures:
        tick = ticks_from_beats(max(timebase.beats_from_steps(start) - stream.offset + shift, 0.0))
        if signatures and signatures[-1].tick == tick:
            signatures[-1] = TimeSignature(tick, num, den)
        else:
            signatures.append(TimeSignature(tick, num, den))
    score = Score(ticks_per_beat=TICKS_PER_BEAT, notes=out, tempos=[TempoChange(0, microseconds_per_beat(bpm))],
                  time_signatures=signatures or [TimeSignature(0, 4, 4)], source="generated")
    return midi_bytes(score)
