"""The FastAPI application: ``/ws`` sessions, ``POST /generate``, ``/health``, ``/metrics`` and the page.

Endpoints stay thin: ``/ws`` hands the socket to :class:`server.connection.Connection`;
``/generate`` hands the request to :class:`server.generate_job.GenerateJobs`, which runs it through
the same :class:`server.engine.Engine` as the live sessions.
"""

from __future__ import annotations

import contextlib
import logging
import time
from pathlib import Path

from fastapi import FastAPI, Request, WebSocket
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException as StarletteHTTPException

from server.access import AccessGuard
from server.config import ServerConfig
from server.connection import Connection
from server.engine import Engine
from server.generate_job import MAX_GENERATE_JOBS, GenerateJobs
from server.metrics import Metrics
from server.prompts import PromptReader
from server.openapi import (GENERATE_RESPONSES, HEALTH_RESPONSES, METRICS_RESPONSES, generate_operation,
                            install)
from server.protocol import ErrorCode, HealthReply, error_response
from server.served_model import ServedModel
from server.session import SessionRegistry

logger = logging.getLogger(__name__)

WEB_DIR = Path(__file__).resolve().parent.parent / "client" / "web"


def create_app(config: ServerConfig, served: ServedModel | None = None) -> FastAPI:
    """Build the app; loads the checkpoint now (raises :class:`model.checkpoint.files.CheckpointError`)."""
    served = served or ServedModel(config)
    metrics = Metrics()
    started = time.time()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        engine = Engine(served.model, served.tokenizer, capacity=config.max_sessions + MAX_GENERATE_JOBS,
                        max_batch=config.max_batch, lookahead=config.lookahead,
                        generate_ahead=config.generate_ahead, metrics=metrics,
                        rollback=not config.answer_after_generated, recent_states=config.recent_states)
        engine.start()
        app.state.engine = engine
        prompts = PromptReader(served.tokenizer, config.read_limits, config.prompt_workers)
        app.state.registry = registry = SessionRegistry(config, engine, prompts, metrics, served.digest)
        registry.saved.start()
        app.state.jobs = GenerateJobs(config, engine, served.tokenizer, prompts, metrics)
        logger.info("serving %s (%s parameters) on %s in %s", served.path, f"{served.parameters:,}",
                    served.device, str(served.dtype).removeprefix("torch."))
        try:
            yield
        finally:
            await registry.saved.close()  # with --store: every session saved before the engine stops
            engine.close()
            prompts.close()

    app = FastAPI(title="FM Server", version="0.1.0", lifespan=lifespan,
                  description="Real-time MIDI generation with the Field Machine. WebSocket protocol: "
                              "see the README, section 'WebSocket protocol'.")
    app.add_middleware(AccessGuard, config=config)
    install(app)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: ErrorCode.NOT_FOUND, 405: ErrorCode.INVALID_MESSAGE}.get(exc.status_code, ErrorCode.INVALID_MESSAGE)
        return error_response(exc.status_code, code, str(exc.detail), getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(422, ErrorCode.INVALID_MESSAGE, str(exc.errors()[:5]))

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("%s %s failed", request.method, request.url.path)
        metrics.errors.labels(code=ErrorCode.INTERNAL_ERROR.value).inc()
        return error_response(500, ErrorCode.INTERNAL_ERROR, f"the server failed: {exc}")

    @app.get("/health", summary="Is the model loaded and the engine running?", responses=HEALTH_RESPONSES)
    async def health(request: Request) -> JSONResponse:
        engine: Engine = request.app.state.engine
        body = HealthReply(status="ok" if engine.running else "engine stopped",
                           checkpoint=str(served.path), device=str(served.device),
                           dtype=str(served.dtype).removeprefix("torch."), threads=served.threads,
                           parameters=served.parameters, vocab_size=served.tokenizer.vocab_size,
                           state_bytes_per_session=engine.state_bytes,
                           rollback_bytes_per_session=engine.rollback_bytes,
                           sessions=len(request.app.state.registry.sessions), max_sessions=config.max_sessions,
                           lookahead=config.lookahead, uptime_seconds=round(time.time() - started, 1),
                           checkpoint_digest=served.digest, store=request.app.state.registry.saved.store_name)
        return JSONResponse(body.model_dump(), status_code=200 if engine.running else 503)

    @app.get("/metrics", summary="Prometheus metrics", response_class=Response, responses=METRICS_RESPONSES)
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.post("/generate", summary="Generate a MIDI file", response_class=Response, responses=GENERATE_RESPONSES,
              openapi_extra=generate_operation())
    async def generate(request: Request) -> Response:
        """Continue a prompt (or start from nothing) for ``tokens`` tokens and return a .mid.

        JSON body: the fields of ``GenerateRequest`` (all optional). Multipart: a ``prompt`` file
        part plus the same fields as form fields. At most ``MAX_GENERATE_TOKENS`` tokens.
        """
        return await request.app.state.jobs.respond(request)

    @app.websocket("/ws")
    async def websocket(ws: WebSocket) -> None:
        await Connection(ws, ws.app.state.registry).run()

    if WEB_DIR.is_dir():
        app.mount("/", StaticFiles(directory=WEB_DIR, html=True), name="page")
    return app
