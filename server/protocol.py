"""Wire messages of the WebSocket ``/ws`` protocol and of ``POST /generate``.

Every frame is one JSON object with a ``type``. Client messages are parsed with
:data:`client_message_adapter` (a discriminated union on ``type``); the server's replies are the
``*Reply`` models below, serialised with ``model_dump_json``. Errors carry a stable ``code`` from
:class:`ErrorCode`. Times are seconds on the session clock (``clock`` = the unix time of 0).
"""

from __future__ import annotations

from dataclasses import fields, replace
from enum import StrEnum
from typing import Annotated, Literal, Union

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, model_validator
from starlette.requests import HTTPConnection

from model.sampling.config import SETTING_RANGES, SamplingConfig

MAX_PROMPT_NOTES = 4096
MAX_PLAYED_NOTES = 512  # per "notes" frame
MIN_BPM, MAX_BPM = 20.0, 400.0
MIN_LOOKAHEAD, MAX_LOOKAHEAD = 0.05, 30.0  # seconds (a session's own lookahead)
DEFAULT_BPM = 120.0
VOICES = 16  # voices 0-15 (a played note's ``voice``, a program per voice)


class ErrorCode(StrEnum):
    """Stable error codes (the ``code`` of an error frame, a label of ``fm_errors_total``)."""

    INVALID_JSON = "invalid_json"            # the frame is not a JSON object
    UNKNOWN_TYPE = "unknown_type"            # "type" missing or not one of the client messages
    INVALID_MESSAGE = "invalid_message"      # a field is missing, of the wrong type or out of range
    INVALID_PROMPT = "invalid_prompt"        # prompt_midi is not a MIDI file (or holds no notes)
    NOT_STARTED = "not_started"              # a message that needs a session before "start"
    ALREADY_STARTED = "already_started"      # a second "start" on a live session
    UNKNOWN_RESUME_TOKEN = "unknown_resume_token"  # expired (60 s), unknown, or in use
    BINARY_FRAME = "binary_frame"            # frames must be JSON text
    GENERATION_FAILED = "generation_failed"  # the model step for this session failed
    SERVER_FULL = "server_full"              # too many sessions (also close code 1013)
    TOO_LARGE = "too_large"                  # an upload or a request above a documented cap
    UNREADABLE_NOTES = "unreadable_notes"    # played notes the model's vocabulary cannot hold (left out)
    RATE_LIMITED = "rate_limited"            # more messages a second than --max-messages-per-second
    UNAUTHORIZED = "unauthorized"            # no or a wrong API key (also HTTP 401, close code 1008)
    FORBIDDEN = "forbidden"                  # an Origin or Host this server does not serve (403, 1008)
    UNSUPPORTED_MEDIA_TYPE = "unsupported_media_type"  # POST /generate without JSON or multipart (415)
    NOT_FOUND = "not_found"                  # no such endpoint (404)
    INTERNAL_ERROR = "internal_error"        # a server bug (500); the log has the traceback
    UNKNOWN_SNAPSHOT = "unknown_snapshot"    # start from a bookmark id that is unknown or expired
    BAD_SNAPSHOT = "bad_snapshot"            # a stored snapshot that is damaged, foreign or of an unknown format
    BOOKMARK_LIMIT = "bookmark_limit"        # more bookmarks than --max-bookmarks-per-session
    STORE_FAILED = "store_failed"            # the session store (--store) could not be reached


class RequestError(ValueError):
    """Bad input, with the stable code the client gets back (an error frame, or an HTTP error)."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def format_validation_error(exc: ValidationError) -> str:
    """The first few problems of a pydantic error, one ``field: message`` each."""
    parts = []
    for error in exc.errors()[:5]:
        where = ".".join(str(p) for p in error["loc"] if p not in CLIENT_TYPES)
        message = error["msg"].removeprefix("Value error, ")
        parts.append(f"{where}: {message}" if where else message)
    return "; ".join(parts)


def usable_bpm(bpm: float | None) -> float | None:
    """``bpm`` if the server plays at that tempo (MIN_BPM-MAX_BPM), else None."""
    return bpm if bpm is not None and MIN_BPM <= bpm <= MAX_BPM else None


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class PlayedNote(Strict):
    """A note a person played, or a prompt note. ``start``/``duration`` in seconds."""

    pitch: int = Field(ge=0, le=127, description="MIDI pitch 0-127")
    velocity: int = Field(default=90, ge=1, le=127, description="MIDI velocity 1-127")
    start: float = Field(ge=0, le=86_400, description="seconds: on the session clock for played "
                         "notes; from the prompt's beginning for prompt notes")
    duration: float = Field(default=0.25, gt=0, le=60, description="seconds")
    voice: int = Field(default=0, ge=0, le=VOICES - 1, description=f"voice (track) 0-{VOICES - 1}")


def _sampling_field(name: str):
    """A wire field for a :class:`SamplingConfig` setting: its help and range come from there."""
    setting = next(f for f in fields(SamplingConfig) if f.name == name)
    return Field(default=None, description=setting.metadata["help"])


class Settings(Strict):
    """Generation settings; every field optional (``None`` keeps the current value). The sampling
    settings' ranges and messages are :class:`model.sampling.config.SamplingConfig`'s."""

    bpm: float | None = Field(default=None, ge=MIN_BPM, le=MAX_BPM,
                              description=f"tempo, {MIN_BPM:g}-{MAX_BPM:g} beats per minute")
    temperature: float | None = _sampling_field("temperature")
    top_k: int | None = _sampling_field("top_k")
    top_p: float | None = _sampling_field("top_p")
    min_p: float | None = _sampling_field("min_p")
    seed: int | None = _sampling_field("seed")
    key_pull: float | None = _sampling_field("key_pull")

    @model_validator(mode="after")
    def _sampling_ranges(self):
        for name, allowed in SETTING_RANGES.items():
            value = getattr(self, name)
            if value is not None:
                allowed.check(name, value)
        return self

    def applied_to(self, current: SamplingConfig) -> SamplingConfig:
        """``current`` with every setting this message gives replaced."""
        return replace(current, **{name: getattr(self, name) for name in SETTING_RANGES
                                   if getattr(self, name) is not None})


Program = Annotated[int, Field(ge=0, le=127)]


class VoiceFields(Strict):
    """How the voices sound, for clients that play them (the MIDI bridge); the server only keeps it."""

    programs: list[Program | None] | None = Field(
        default=None, max_length=VOICES,
        description=f"a General MIDI program 0-127 per voice (index = voice, at most {VOICES}); null leaves a "
                    "voice's program alone")


Voice = Annotated[int, Field(ge=0, le=VOICES - 1)]


class Accompany(Strict):
    """The voices a person plays; the model plays the others."""

    voices: list[Voice] = Field(max_length=VOICES - 1, description=f"the voices the person plays (0-{VOICES - 1}, "
                                f"unique, at most {VOICES - 1}); the model never plays them. Empty: off")

    @model_validator(mode="after")
    def _unique(self):
        if len(set(self.voices)) != len(self.voices):
            raise ValueError(f"voices must be unique, got {self.voices}")
        return self


class AccompanyFields(Strict):
    accompany: Accompany | None = Field(
        default=None, description="you play these voices, the model the rest: {\"voices\": [0]}. Played notes in "
                                  "another voice go in as the first of them; {\"voices\": []} turns it off")


class PromptFields(Strict):
    prompt_midi: str | None = Field(default=None, description="a .mid file, base64-encoded")
    prompt_notes: list[PlayedNote] | None = Field(default=None, max_length=MAX_PROMPT_NOTES)

    @model_validator(mode="after")
    def _one_prompt(self):
        if self.prompt_midi is not None and self.prompt_notes is not None:
            raise ValueError("give prompt_midi or prompt_notes, not both")
        return self


# ----------------------------------------------------------------------------- client -> server
class StartMessage(Settings, VoiceFields, AccompanyFields, PromptFields):
    type: Literal["start"]
    resume_token: str | None = Field(default=None, description="continue a dropped session (on any replica that "
                                     "shares the server's --store)")
    last_beat: float | None = Field(default=None, ge=-1e6, le=1e7, description="with resume_token: the beat of the "
                                    "latest note this client received; no note at or before it is sent again")
    snapshot: str | None = Field(default=None, max_length=64, description="start a new session from a bookmark "
                                 "(the id a snapshot message answered); the other fields change its settings")

    @model_validator(mode="after")
    def _one_source(self):
        if self.snapshot is not None and (self.prompt_midi is not None or self.prompt_notes is not None):
            raise ValueError("a session starts from a snapshot or from a prompt, not both")
        if self.snapshot is not None and self.resume_token is not None:
            raise ValueError("give resume_token or snapshot, not both")
        if self.last_beat is not None and self.resume_token is None:
            raise ValueError("last_beat goes with resume_token")
        return self
    lookahead: float | None = Field(default=None, ge=MIN_LOOKAHEAD, le=MAX_LOOKAHEAD,
                                    description=f"this session's lookahead, {MIN_LOOKAHEAD:g}-{MAX_LOOKAHEAD:g} "
                                                "seconds: notes are sent at most this long before their start, and "
                                                "an answer to played notes starts this long after they are read "
                                                "(a client on the server's machine can take 0.05). Default: "
                                                "the server's --lookahead")


class NotesMessage(Strict):
    type: Literal["notes"]
    notes: list[PlayedNote] = Field(max_length=MAX_PLAYED_NOTES)


class SetMessage(Settings, VoiceFields, AccompanyFields):
    type: Literal["set"]


class PauseMessage(Strict):
    type: Literal["pause"]


class ResumeMessage(Strict):
    type: Literal["resume"]


class StopMessage(Strict):
    type: Literal["stop"]


class SnapshotMessage(Strict):
    """Keep this moment: answered by ``snapshot`` with an id a later ``start`` can continue from."""

    type: Literal["snapshot"]


class ForkMessage(Strict):
    """Start a second session from this moment (answered by ``forked``; connect to it with its
    resume token). ``seed``: the fork's own (default: this session's, so it plays the same notes)."""

    type: Literal["fork"]
    seed: int | None = _sampling_field("seed")

    @model_validator(mode="after")
    def _seed_range(self):
        if self.seed is not None:
            SETTING_RANGES["seed"].check("seed", self.seed)
        return self


ClientMessage = Annotated[
    Union[StartMessage, NotesMessage, SetMessage, PauseMessage, ResumeMessage, StopMessage, SnapshotMessage,
          ForkMessage],
    Field(discriminator="type")]
client_message_adapter: TypeAdapter[ClientMessage] = TypeAdapter(ClientMessage)
CLIENT_TYPES = ("start", "notes", "set", "pause", "resume", "stop", "snapshot", "fork")


# ----------------------------------------------------------------------------- server -> client
class SessionReply(BaseModel):
    type: Literal["session"] = "session"
    id: str
    resume_token: str
    clock: float = Field(description="unix time (seconds) of session time 0")
    resumed: bool = False
    lookahead: float = Field(description="notes are sent at most this many seconds before their start")
    snapshot: str | None = Field(default=None, description="the bookmark this session started from")
    reread: bool = Field(default=False, description="the session came from a snapshot of another checkpoint (a "
                         "rolling restart onto a new model): its last tokens were read again by this one, so "
                         "the music goes on in the same place but may change character")


class SnapshotReply(BaseModel):
    """The answer to ``snapshot``: start a session from ``id`` with ``{"type":"start","snapshot":id}``."""

    type: Literal["snapshot"] = "snapshot"
    id: str
    beat: float = Field(description="the beat of the latest note sent: a session started from it goes on after it")
    bytes: int = Field(description="size of the snapshot")
    expires_in: float = Field(description="seconds it is kept (--bookmark-seconds)")


class ForkedReply(BaseModel):
    """The answer to ``fork``: a second session waits for ``{"type":"start","resume_token":...}``."""

    type: Literal["forked"] = "forked"
    id: str
    resume_token: str
    seed: int
    beat: float = Field(description="the beat it goes on after (the latest note this session sent)")
    expires_in: float = Field(description="seconds it waits for its first connection (--resume-seconds)")


class StateReply(BaseModel):
    """Sent after start, set, pause and resume: the settings now in force."""

    type: Literal["state"] = "state"
    state: Literal["playing", "paused"]
    bpm: float
    temperature: float
    top_k: int
    top_p: float
    min_p: float
    seed: int
    key_pull: float
    programs: list[int | None] | None = None
    accompany: Accompany | None = None

    @classmethod
    def of(cls, state: Literal["playing", "paused"], bpm: float, sampling: SamplingConfig,
           programs: list[int | None] | None = None, accompany: list[int] | None = None) -> "StateReply":
        return cls(state=state, bpm=bpm, programs=programs,
                   accompany=Accompany(voices=accompany) if accompany else None,
                   **{name: getattr(sampling, name) for name in SETTING_RANGES})


class OutNote(BaseModel):
    pitch: int
    velocity: int
    voice: int
    start: float = Field(description="seconds on the session clock")
    duration: float = Field(description="seconds")
    beat: float = Field(description="beats since the session's first generated beat")
    heard_until: float | None = Field(default=None, description="the latest start (seconds on the session clock) of "
                                      "the played notes the model had read when it chose this note; null: none")


class NotesReply(BaseModel):
    type: Literal["notes"] = "notes"
    notes: list[OutNote]


class ErrorReply(BaseModel):
    type: Literal["error"] = "error"
    code: ErrorCode
    message: str


class ErrorBody(BaseModel):
    """The body of every HTTP error."""

    code: ErrorCode
    detail: str


def error_response(status: int, code: ErrorCode, detail: str, headers: dict[str, str] | None = None) -> JSONResponse:
    """The HTTP answer for an error: ``{"code", "detail"}`` (:class:`ErrorBody`) with ``status``."""
    return JSONResponse(ErrorBody(code=code, detail=detail).model_dump(mode="json"), status_code=status,
                        headers=headers)


def client_address(connection: HTTPConnection) -> str:
    """The address a request or WebSocket came from (per-client limits); empty when unknown."""
    return connection.client.host if connection.client else ""


class HealthReply(BaseModel):
    """``GET /health``."""

    status: Literal["ok", "engine stopped"]
    checkpoint: str
    device: str
    dtype: str
    threads: int
    parameters: int
    vocab_size: int
    state_bytes_per_session: int
    rollback_bytes_per_session: int = Field(description="bytes of the checkpoint a live session goes back to when "
                                            "a person plays, which its snapshots hold (field, position, heard "
                                            "counts, the model's output there), besides a host-side log of at most "
                                            "512 tokens and its last 512 tokens")
    sessions: int
    max_sessions: int
    lookahead: float
    uptime_seconds: float
    checkpoint_digest: str = Field(default="", description="names the checkpoint in session snapshots (a snapshot "
                                   "from another one is re-read from its last tokens)")
    store: str = Field(default="memory", description="where sessions are kept: memory (this process) or the "
                       "--store URL (password hidden)")


class StoppedReply(BaseModel):
    type: Literal["stopped"] = "stopped"
    notes_sent: int


# ----------------------------------------------------------------------------- POST /generate
MAX_GENERATE_TOKENS = 4096


class GenerateRequest(Settings, PromptFields):
    tokens: int = Field(default=512, ge=1, le=MAX_GENERATE_TOKENS,
                        description=f"tokens to generate, 1-{MAX_GENERATE_TOKENS}")
    include_prompt: bool = Field(default=False, description="put the prompt's notes before the continuation")
