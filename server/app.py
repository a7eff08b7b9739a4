"""The FastAPI application: ``/ws`` sessions, ``POST /generate``, ``/health``, ``/metrics`` and the page.

Endpoints stay thin: ``/ws`` hands the socket to :class:`server.session.Connection`;
``/generate`` runs a job through the same :class:`server.engine.Engine` as the live sessions.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import os
import time
from pathlib import Path

import torch
from fastapi import FastAPI, Request, WebSocket
from fastapi.responses import JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from pydantic import ValidationError

from model import checkpoint as ckpt
from model.device import resolve_device, resolve_precision
from model.midi_io import Note, Score, TempoChange, TimeSignature, score_to_midifile
from model.sampling import SamplingConfig
from server.config import ServerConfig
from server.engine import Engine, EngineClosed, EngineFull, GeneratedNote
from server.metrics import CONTENT_TYPE_LATEST, Metrics
from server.prompts import RequestError, decode_base64_midi, prompt_from_midi, prompt_from_notes
from server.protocol import MAX_GENERATE_TOKENS, ErrorCode, GenerateRequest
from server.session import DEFAULT_BPM, Connection, SessionRegistry, format_validation_error, sampling_with
from server.timeline import Timeline

logger = logging.getLogger(__name__)

WEB_DIR = Path(__file__).resolve().parent.parent / "client" / "web"
MAX_GENERATE_JOBS = 16
OUTPUT_TICKS_PER_BEAT = 480
HTTP_STATUS = {ErrorCode.TOO_LARGE: 413, ErrorCode.SERVER_FULL: 503, ErrorCode.GENERATION_FAILED: 500,
               ErrorCode.INVALID_MESSAGE: 422}


class ServedModel:
    """The checkpoint the server loaded, on its device and in its precision."""

    def __init__(self, config: ServerConfig) -> None:
        self.device = resolve_device(config.device)
        if self.device.type == "cpu":
            # The engine thread's model step and the event loop (WebSockets) share the CPU; on 2
            # cores a 1-thread model under 128 sessions had 266 late notes where 2 threads had 1,043.
            torch.set_num_threads(config.threads or max(1, (os.cpu_count() or 2) - 1))
        self.threads = torch.get_num_threads()
        self.dtype = resolve_precision(config.dtype, self.device)
        self.path = Path(config.checkpoint)
        model, self.tokenizer, self.checkpoint = ckpt.load_model(self.path, device=self.device)
        self.model = model.to(self.dtype) if self.dtype != torch.float32 else model
        self.parameters = sum(p.numel() for p in self.model.parameters())


def create_app(config: ServerConfig, served: ServedModel | None = None) -> FastAPI:
    """Build the app; loads the checkpoint now (raises :class:`model.checkpoint.CheckpointError`)."""
    served = served or ServedModel(config)
    metrics = Metrics()
    started = time.time()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        engine = Engine(served.model, served.tokenizer, capacity=config.max_sessions + MAX_GENERATE_JOBS,
                        max_batch=config.max_batch, lookahead=config.lookahead,
                        generate_ahead=config.generate_ahead, metrics=metrics)
        engine.start()
        app.state.engine = engine
        app.state.registry = SessionRegistry(config, engine, served.tokenizer, metrics)
        app.state.jobs = 0
        logger.info("serving %s (%s parameters) on %s in %s", served.path, f"{served.parameters:,}",
                    served.device, str(served.dtype).removeprefix("torch."))
        try:
            yield
        finally:
            engine.close()

    app = FastAPI(title="FM Server", version="0.1.0", lifespan=lifespan,
                  description="Real-time MIDI generation with the Field Machine. WebSocket protocol: "
                              "see the README, section 'WebSocket protocol'.")

    @app.get("/health", summary="Is the model loaded and the engine running?")
    async def health(request: Request) -> JSONResponse:
        engine: Engine = request.app.state.engine
        body = {"status": "ok" if engine.running else "engine stopped",
                "checkpoint": str(served.path), "device": str(served.device),
                "dtype": str(served.dtype).removeprefix("torch."), "threads": served.threads,
                "parameters": served.parameters,
                "vocab_size": served.tokenizer.vocab_size, "state_bytes_per_session": engine.state_bytes,
                "sessions": len(request.app.state.registry.sessions), "max_sessions": config.max_sessions,
                "lookahead": config.lookahead, "uptime_seconds": round(time.time() - started, 1)}
        return JSONResponse(body, status_code=200 if engine.running else 503)

    @app.get("/metrics", summary="Prometheus metrics", response_class=Response)
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.post("/generate", summary="Generate a MIDI file", response_class=Response,
              responses={200: {"content": {"audio/midi": {}}, "description": "the generated .mid"}},
              openapi_extra={"requestBody": {"required": False, "content": {
                  "application/json": {"schema": GenerateRequest.model_json_schema()},
                  "multipart/form-data": {"schema": {"type": "object", "properties": {
                      "prompt": {"type": "string", "format": "binary", "description": "a .mid prompt"},
                      **{name: {"type": "string", "description": f.description or name}
                         for name, f in GenerateRequest.model_fields.items()
                         if name not in ("prompt_midi", "prompt_notes")}}}}}}})
    async def generate(request: Request) -> Response:
        """Continue a prompt (or start from nothing) for ``tokens`` tokens and return a .mid.

        JSON body: the fields of ``GenerateRequest`` (all optional). Multipart: a ``prompt`` file
        part plus the same fields as form fields. At most ``MAX_GENERATE_TOKENS`` tokens.
        """
        try:
            req, upload = await _read_generate_request(request, config)
            return await _generate(request.app, req, upload)
        except RequestError as exc:
            metrics.errors.labels(code=exc.code.value).inc()
            return JSONResponse({"code": exc.code.value, "detail": exc.message},
                                status_code=HTTP_STATUS.get(exc.code, 400))

    async def _generate(app: FastAPI, req: GenerateRequest, upload: bytes | None) -> Response:
        engine: Engine = app.state.engine
        tokenizer = served.tokenizer
        if upload is not None:
            prompt = await asyncio.to_thread(prompt_from_midi, upload, tokenizer, config.max_upload_bytes)
        elif req.prompt_midi is not None:
            data = decode_base64_midi(req.prompt_midi, config.max_upload_bytes)
            prompt = await asyncio.to_thread(prompt_from_midi, data, tokenizer, config.max_upload_bytes)
        else:
            prompt = prompt_from_notes(req.prompt_notes or [], tokenizer, req.bpm or DEFAULT_BPM)
        bpm = req.bpm or (prompt.bpm if prompt.bpm and 20 <= prompt.bpm <= 400 else None) or DEFAULT_BPM
        sampling = sampling_with(SamplingConfig(), req)
        if app.state.jobs >= MAX_GENERATE_JOBS:
            raise RequestError(ErrorCode.SERVER_FULL, f"{MAX_GENERATE_JOBS} generate requests are running; "
                               "try again later")
        notes: list[GeneratedNote] = []
        done = asyncio.get_running_loop().create_future()

        def finish(error: str | None = None) -> None:
            if not done.done():
                done.set_exception(RuntimeError(error)) if error else done.set_result(None)

        app.state.jobs += 1
        metrics.jobs.set(app.state.jobs)
        stream = None
        try:
            stream = await engine.open(prompt.tokens, sampling=sampling, timeline=Timeline(bpm), realtime=False,
                                       tokens=req.tokens, sink=notes.extend, on_error=finish, on_done=finish)
            await done
        except EngineFull as exc:
            raise RequestError(ErrorCode.SERVER_FULL, str(exc)) from exc
        except (EngineClosed, RuntimeError) as exc:
            raise RequestError(ErrorCode.GENERATION_FAILED, f"generation failed: {exc}") from exc
        finally:
            app.state.jobs -= 1
            metrics.jobs.set(app.state.jobs)
            if stream is not None and not stream.closed:
                with contextlib.suppress(EngineClosed):
                    await engine.release(stream)
        data = _midi_bytes(notes, stream, prompt.tokens if req.include_prompt else None, tokenizer, bpm)
        name = f"fm-seed{sampling.seed}-{req.tokens}tok.mid"
        return Response(data, media_type="audio/midi", headers={
            "Content-Disposition": f'attachment; filename="{name}"',
            "X-FM-Notes": str(len(notes)), "X-FM-Tokens": str(req.tokens), "X-FM-Seed": str(sampling.seed)})

    @app.websocket("/ws")
    async def websocket(ws: WebSocket) -> None:
        await Connection(ws, ws.app.state.registry).run()

    if WEB_DIR.is_dir():
        app.mount("/", StaticFiles(directory=WEB_DIR, html=True), name="page")
    return app


async def _read_generate_request(request: Request, config: ServerConfig) -> tuple[GenerateRequest, bytes | None]:
    """Parse a JSON or multipart body into a request and an uploaded prompt (if any)."""
    limit = config.max_upload_bytes
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > 2 * limit:
        raise RequestError(ErrorCode.TOO_LARGE, f"the request body is larger than {2 * limit} bytes")
    content_type = request.headers.get("content-type", "")
    upload = None
    try:
        if content_type.startswith("multipart/form-data"):
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


def _midi_bytes(notes: list[GeneratedNote], stream, prompt, tokenizer, bpm: float) -> bytes:
    """The continuation (after the prompt's notes if asked) as a type 1 MIDI file at ``bpm``."""
    tpb = OUTPUT_TICKS_PER_BEAT
    resolution = tokenizer.config.resolution
    shift = stream.offset if prompt is not None else 0.0  # beats: where the continuation begins
    out: list[Note] = []
    if prompt is not None:
        out += tokenizer.decode(prompt, ticks_per_beat=tpb).notes
    for n in notes:
        onset = max(n.beat + shift, 0.0)
        out.append(Note(pitch=n.pitch, velocity=n.velocity, onset_tick=round(onset * tpb),
                        duration_tick=max(1, round(n.duration * tpb)), onset_beat=onset, duration_beat=n.duration,
                        channel=0, track=0, voice=n.voice))
    signatures: list[TimeSignature] = []
    for start, num, den in stream.decoder.signatures:
        beat = max(start / resolution - stream.offset + shift, 0.0)
        tick = round(beat * tpb)
        if signatures and signatures[-1].tick == tick:
            signatures[-1] = TimeSignature(tick, num, den)
        else:
            signatures.append(TimeSignature(tick, num, den))
    score = Score(ticks_per_beat=tpb, notes=out, tempos=[TempoChange(0, round(60_000_000 / bpm))],
                  time_signatures=signatures or [TimeSignature(0, 4, 4)], source="generated")
    buffer = io.BytesIO()
    score_to_midifile(score).save(file=buffer)
    return buffer.getvalue()
