"""A session snapshot: everything needed to continue a stream, as versioned bytes.

A snapshot is a safetensors file (no pickle). Its tensors: the stream's state rows as they are
(``live.field``, ``.position``, ``.heard``, ``.logits``, ``.hidden``: the model state after its latest
token and the output predicting the next) and at its rollback checkpoint (``saved.*``), the tokens
read since that checkpoint (``log``: id, velocity level, voice, step), the notes generated but not
yet sent (``pending``) and the stream's last tokens in portable form (``history``:
:mod:`model.tokenizer.portable`, enough to re-read the stream into another checkpoint). Its string
metadata ``fm_snapshot`` holds the rest as JSON: :data:`SNAPSHOT_FORMAT`, the digest of the
checkpoint that wrote it, the decoders' places, the step counters (which, with the seed, fix the
stream's randomness), timeline, clock, sampling settings and the session's own settings. Put back
into the same checkpoint, a stream goes on exactly as it would have.

Reading one checks everything before anything uses it: bytes that are not a snapshot, a format
this server does not read, or a value out of range raise :class:`SnapshotError` with the reason.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from model.sampling.config import SamplingConfig
from model.timebase import Timeline
from model.tokenizer.portable import PORTABLE_COLUMNS

SNAPSHOT_FORMAT = 1
MAX_SNAPSHOT_BYTES = 8 << 20
ROW_NAMES = ("field", "position", "heard", "logits", "hidden")
LOG_COLUMNS = 4  # token, velocity level, voice, step (server.rollback.LoggedToken)
NOTE_COLUMNS = 7  # beat, duration, pitch, velocity, voice, step, heard_until (NaN: none)
METADATA_KEY = "fm_snapshot"


class SnapshotError(ValueError):
    """Bytes that are not a snapshot this server can continue (the message says why)."""


@dataclass
class Place:
    """Where a stream stands: its state rows, decoder, step counter and frontier (beats)."""

    rows: dict[str, torch.Tensor]
    decoder: dict
    steps: int
    frontier: float


@dataclass
class StreamSnapshot:
    """The engine's part: the stream now (``live``) and at its rollback checkpoint (``saved``), the
    ``log`` of tokens read since the checkpoint, ``sent_step`` (the latest token sent), and
    ``history``: the portable tokens it read up to now (from a bar line), whose first bar starts
    at stream beat ``history_beat``."""

    live: Place
    saved: Place
    offset: float
    clock: float
    log: np.ndarray  # (N, 4) int64
    sent_step: int
    history: np.ndarray  # (M, 6) float32
    history_beat: float
    heard_until: float | None = None


@dataclass
class SessionSnapshot:
    """A whole session: the stream, its settings, and who it was."""

    checkpoint: str  # digest of the checkpoint that wrote it
    session_id: str
    saved_at: float  # unix time
    sampling: SamplingConfig
    timeline: Timeline
    stream: StreamSnapshot
    last_beat: float | None = None  # beat of the latest note sent (None: none yet)
    sent: int = 0
    paused: bool = False
    lookahead: float | None = None  # the session's own (None: the server's)
    programs: list[int | None] | None = None
    accompany: list[int] = field(default_factory=list)
    pending: np.ndarray = field(default_factory=lambda: np.zeros((0, NOTE_COLUMNS)))  # notes not sent yet

    def to_bytes(self) -> bytes:
        s = self.stream
        tensors = {f"{where}.{name}": tensor.detach().cpu().contiguous()
                   for where, place in (("live", s.live), ("saved", s.saved)) for name, tensor in place.rows.items()}
        tensors["pending"] = torch.from_numpy(np.ascontiguousarray(self.pending, dtype=np.float64)
                                              .reshape(-1, NOTE_COLUMNS))
        tensors["log"] = torch.from_numpy(np.ascontiguousarray(s.log, dtype=np.int64).reshape(-1, LOG_COLUMNS))
        tensors["history"] = torch.from_numpy(np.ascontiguousarray(s.history, dtype=np.float32)
                                              .reshape(-1, PORTABLE_COLUMNS))
        meta = {"format": SNAPSHOT_FORMAT, "checkpoint": self.checkpoint, "session_id": self.session_id,
                "saved_at": self.saved_at, "sampling": asdict(self.sampling), "timeline": asdict(self.timeline),
                "last_beat": self.last_beat, "sent": self.sent, "paused": self.paused, "lookahead": self.lookahead,
                "programs": self.programs, "accompany": self.accompany,
                "stream": {"live": _place_meta(s.live), "saved": _place_meta(s.saved), "offset": s.offset,
                           "clock": s.clock, "sent_step": s.sent_step, "history_beat": s.history_beat,
                           "heard_until": s.heard_until}}
        return save_tensors(tensors, metadata={METADATA_KEY: json.dumps(meta)})

    @classmethod
    def from_bytes(cls, data: bytes) -> "SessionSnapshot":
        """Read a snapshot (raises :class:`SnapshotError` if it is not one this server reads)."""
        if len(data) > MAX_SNAPSHOT_BYTES:
            raise SnapshotError(f"a snapshot of {len(data):,} bytes: more than the {MAX_SNAPSHOT_BYTES:,} allowed")
        meta = _metadata(data)
        version = meta.get("format")
        if version != SNAPSHOT_FORMAT:
            raise SnapshotError(f"snapshot format {version!r}: this server reads format {SNAPSHOT_FORMAT}")
        try:
            tensors = load_tensors(data)
        except Exception as exc:  # safetensors raises its own error types for every kind of damage
            raise SnapshotError(f"the snapshot's tensors are damaged: {exc}") from exc
        try:
            return _build(meta, tensors)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise SnapshotError(f"the snapshot is malformed: {exc!r}") from exc


def _metadata(data: bytes) -> dict:
    """The JSON metadata of safetensors ``data``, checked for being a snapshot."""
    if len(data) < 8:
        raise SnapshotError("not a snapshot: too short")
    (size,) = struct.unpack("<Q", data[:8])
    if size > len(data) - 8:
        raise SnapshotError("not a snapshot: its header runs past its end")
    try:
        header = json.loads(data[8:8 + size])
        meta = json.loads(header["__metadata__"][METADATA_KEY])
    except (ValueError, KeyError, TypeError) as exc:
        raise SnapshotError(f"not a snapshot: {exc!r}") from exc
    if not isinstance(meta, dict):
        raise SnapshotError("not a snapshot: its metadata is not an object")
    return meta


def _finite(value, name: str) -> float:
    number = float(value)
    if not math.isfinite(number):
        raise ValueError(f"{name} is not finite")
    return number


def _place_meta(place: Place) -> dict:
    return {"decoder": place.decoder, "steps": place.steps, "frontier": place.frontier}


def _place(meta: dict, tensors: dict[str, torch.Tensor], where: str) -> Place:
    rows = {name: tensors[f"{where}.{name}"] for name in ROW_NAMES}
    if not all(torch.isfinite(t.float()).all() for t in rows.values()):
        raise ValueError(f"the {where} state holds values that are not finite")
    return Place(rows=rows, decoder=dict(meta["decoder"]), steps=int(meta["steps"]),
                 frontier=_finite(meta["frontier"], f"{where}.frontier"))


def _build(meta: dict, tensors: dict[str, torch.Tensor]) -> SessionSnapshot:
    s = meta["stream"]
    log = tensors["log"].numpy()
    history = tensors["history"].numpy()
    pending = tensors["pending"].numpy()
    if log.ndim != 2 or log.shape[1] != LOG_COLUMNS or history.ndim != 2 or history.shape[1] != PORTABLE_COLUMNS:
        raise ValueError("log or history has the wrong shape")
    if pending.ndim != 2 or pending.shape[1] != NOTE_COLUMNS or not np.isfinite(pending[:, :6]).all():
        raise ValueError("pending notes of the wrong shape or not finite")
    if not np.isfinite(history).all():
        raise ValueError("history holds values that are not finite")
    timeline = Timeline(**{k: _finite(v, f"timeline.{k}") for k, v in meta["timeline"].items()})
    if not timeline.bpm > 0:
        raise ValueError("timeline.bpm must be positive")
    programs = meta.get("programs")
    if programs is not None and not all(p is None or (isinstance(p, int) and 0 <= p <= 127) for p in programs):
        raise ValueError("programs must be MIDI programs 0-127 or null")
    stream = StreamSnapshot(live=_place(s["live"], tensors, "live"), saved=_place(s["saved"], tensors, "saved"),
                            offset=_finite(s["offset"], "offset"), clock=_finite(s["clock"], "clock"), log=log,
                            sent_step=int(s["sent_step"]), history=history,
                            history_beat=_finite(s["history_beat"], "history_beat"),
                            heard_until=None if s.get("heard_until") is None else _finite(s["heard_until"],
                                                                                           "heard_until"))
    last_beat = meta.get("last_beat")
    lookahead = meta.get("lookahead")
    return SessionSnapshot(checkpoint=str(meta["checkpoint"]), session_id=str(meta["session_id"]),
                           saved_at=_finite(meta["saved_at"], "saved_at"),
                           sampling=SamplingConfig(**meta["sampling"]), timeline=timeline, stream=stream,
                           last_beat=None if last_beat is None else _finite(last_beat, "last_beat"),
                           sent=int(meta.get("sent", 0)), paused=bool(meta.get("paused", False)),
                           lookahead=None if lookahead is None else _finite(lookahead, "lookahead"),
                           programs=programs, accompany=[int(v) for v in meta.get("accompany") or []],
                           pending=pending)
