"""A request's prompt, for ``/ws`` and ``POST /generate`` alike: a base64 ``.mid``, uploaded bytes, or
a list of notes, read into tokens, with the tempo the stream plays at.

Prompts are read in worker processes (:class:`PromptReader`, ``--prompt-workers``), never on the
event loop or in the engine thread, under the server's :class:`model.midi.limits.ReadLimits`
(``--prompt-max-*``, ``--prompt-seconds``): a hostile file is refused with ``invalid_prompt``
before it costs much, and one being read holds up no other session. Every failure is a
:class:`server.protocol.RequestError`.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass

from model.midi.limits import ReadLimits
from model.midi.read import read_midi
from model.midi.score import MidiReadError, Note, Score, TempoChange, TimeSignature
from model.timebase import TICKS_PER_BEAT, beats_from_seconds, microseconds_per_beat, ticks_from_beats
from model.tokenizer.sequences import TokenSequence
from model.tokenizer.tokenizer import Tokenizer
from model.tokenizer.vocabulary import TokenizerError
from server.protocol import DEFAULT_BPM, ErrorCode, PromptFields, RequestError, Settings, usable_bpm

logger = logging.getLogger(__name__)

MAX_WAITING = 64  # prompts queued for the workers at most; more are refused (server_full)
HARD_TIMEOUT_MARGIN = 5.0  # seconds past --prompt-seconds before a stuck worker is replaced


@dataclass
class Prompt:
    """A prompt read into tokens (``None``: no prompt), the tempo to play at, and its note count."""

    tokens: TokenSequence | None
    bpm: float
    notes: int


class PromptReader:
    """Reads prompts in ``workers`` processes of their own, started on the first prompt."""

    def __init__(self, tokenizer: Tokenizer, limits: ReadLimits, workers: int = 1) -> None:
        self.tokenizer_data = tokenizer.to_dict()
        self.limits = limits
        self.workers = workers
        self.waiting = 0
        self._pool: ProcessPoolExecutor | None = None

    def _executor(self) -> ProcessPoolExecutor:
        if self._pool is None:
            # spawn: a fresh interpreter with only the tokenizer (no torch, no threads to inherit)
            self._pool = ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("spawn"),
                                             initializer=_start_worker,
                                             initargs=(self.tokenizer_data, asdict(self.limits)))
        return self._pool

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None

    async def read(self, request: PromptFields, settings: Settings, max_bytes: int,
                   upload: bytes | None = None) -> Prompt:
        """The prompt of a ``start`` message or a ``/generate`` request (``upload``: a file part).

        The tempo is the request's ``bpm``, else the prompt file's first tempo when it is one the
        server plays at, else :data:`DEFAULT_BPM`.
        """
        if upload is None and request.prompt_midi is not None:
            upload = decode_base64_midi(request.prompt_midi, max_bytes)
        if upload is not None:
            if len(upload) > max_bytes:
                raise RequestError(ErrorCode.TOO_LARGE, f"the prompt file is larger than {max_bytes} bytes")
            tokens, file_bpm, notes = await self._run(_read_midi_prompt, upload)
            return Prompt(tokens, settings.bpm or usable_bpm(file_bpm) or DEFAULT_BPM, notes)
        bpm = settings.bpm or DEFAULT_BPM
        played = request.prompt_notes or []
        if not played:
            return Prompt(None, bpm, 0)
        rows = [(n.pitch, n.velocity, n.start, n.duration, n.voice) for n in played]
        tokens, _, notes = await self._run(_read_note_prompt, rows, bpm)
        return Prompt(tokens, bpm, notes)

    async def _run(self, fn, *args):
        if self.waiting >= MAX_WAITING:
            raise RequestError(ErrorCode.SERVER_FULL, f"{MAX_WAITING} prompts are waiting to be read; try again later")
        self.waiting += 1
        try:
            future = asyncio.get_running_loop().run_in_executor(self._executor(), fn, *args)
            outcome = await asyncio.wait_for(future, self.limits.seconds + HARD_TIMEOUT_MARGIN)
        except asyncio.TimeoutError:
            logger.error("a prompt worker did not answer within %.0f s; starting new workers",
                         self.limits.seconds + HARD_TIMEOUT_MARGIN)
            self._replace_pool()
            raise RequestError(ErrorCode.INVALID_PROMPT,
                               f"reading the prompt took longer than {self.limits.seconds:g} s") from None
        except BrokenProcessPool:
            logger.error("a prompt worker died; starting new workers")
            self._replace_pool()
            raise RequestError(ErrorCode.INVALID_PROMPT, "the prompt could not be read (its reader died)") from None
        finally:
            self.waiting -= 1
        if outcome[0] == "error":
            raise RequestError(ErrorCode(outcome[1]), outcome[2])
        _, (ids, velocity, voice), bpm, notes = outcome
        return TokenSequence(ids, velocity, voice), bpm, notes

    def _replace_pool(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            for process in list(getattr(pool, "_processes", {}).values()):  # stuck: kill, do not wait
                process.kill()
            pool.shutdown(wait=False, cancel_futures=True)


def decode_base64_midi(text: str, max_bytes: int) -> bytes:
    if len(text) > (max_bytes * 4) // 3 + 4:
        raise RequestError(ErrorCode.TOO_LARGE, f"prompt_midi is larger than {max_bytes} bytes")
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise RequestError(ErrorCode.INVALID_PROMPT, f"prompt_midi is not base64: {exc}") from exc


# ----------------------------------------------------------------------------- in the workers
_WORKER: dict = {}


def _start_worker(tokenizer_data: dict, limits: dict) -> None:
    _WORKER["tokenizer"] = Tokenizer.from_dict(tokenizer_data)
    _WORKER["limits"] = ReadLimits(**limits)


def _answer(tokens: TokenSequence, bpm: float | None, notes: int):
    return "ok", (tokens.ids, tokens.velocity, tokens.voice), bpm, notes


def _read_midi_prompt(data: bytes):
    """``("ok", arrays, bpm, notes)`` or ``("error", code, message)`` (plain values: they cross processes)."""
    tokenizer, limits = _WORKER["tokenizer"], _WORKER["limits"]
    try:
        score = read_midi(data, name="the prompt", limits=limits)
        tokens = tokenizer.encode(score, limits)
    except (MidiReadError, TokenizerError) as exc:
        return "error", ErrorCode.INVALID_PROMPT.value, f"the prompt is not a usable MIDI file: {exc}"
    except Exception as exc:  # never a 500: whatever broke, the client hears it was the prompt
        logger.exception("reading a prompt failed")
        return "error", ErrorCode.INVALID_PROMPT.value, f"the prompt could not be read ({type(exc).__name__}: {exc})"
    return _answer(tokens, score.tempos[0].bpm if score.tempos else None, len(score.notes))


def _read_note_prompt(rows: list[tuple[int, int, float, float, int]], bpm: float):
    """Notes (pitch, velocity, start s, duration s, voice) from the prompt's beginning, read at ``bpm``."""
    tokenizer, limits = _WORKER["tokenizer"], _WORKER["limits"]
    beats = lambda seconds: beats_from_seconds(seconds, bpm)
    score = Score(
        ticks_per_beat=TICKS_PER_BEAT,
        notes=[Note(pitch=pitch, velocity=velocity, onset_tick=ticks_from_beats(beats(start)),
                    duration_tick=max(1, ticks_from_beats(beats(duration))), onset_beat=beats(start),
                    duration_beat=beats(duration), channel=voice, track=0, voice=voice)
               for pitch, velocity, start, duration, voice in sorted(rows, key=lambda r: (r[2], r[0]))],
        tempos=[TempoChange(0, microseconds_per_beat(bpm))],
        time_signatures=[TimeSignature(0, 4, 4)],
        source="prompt_notes")
    try:
        tokens = tokenizer.encode(score, limits)
    except TokenizerError as exc:
        return "error", ErrorCode.INVALID_PROMPT.value, f"prompt_notes cannot be read: {exc}"
    return _answer(tokens, None, len(rows))

