"""A request's prompt, for ``/ws`` and ``POST /generate`` alike: a base64 ``.mid``, uploaded bytes, or
a list of notes, read into tokens, with the tempo the stream plays at.

``.mid`` prompts are read off the event loop (:func:`read_prompt` awaits a thread), so a large
file never holds up the other sessions.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
from dataclasses import dataclass

from model.midi.read import read_midi
from model.midi.score import MidiReadError, Note, Score, TempoChange, TimeSignature
from model.timebase import TICKS_PER_BEAT, beats_from_seconds, microseconds_per_beat, ticks_from_beats
from model.tokenizer.sequences import TokenSequence
from model.tokenizer.tokenizer import Tokenizer
from model.tokenizer.vocabulary import TokenizerError
from server.protocol import (DEFAULT_BPM, ErrorCode, PlayedNote, PromptFields, RequestError, Settings,
                             usable_bpm)


@dataclass
class Prompt:
    """A prompt read into tokens (``None``: no prompt), the tempo to play at, and its note count."""

    tokens: TokenSequence | None
    bpm: float
    notes: int


async def read_prompt(request: PromptFields, settings: Settings, tokenizer: Tokenizer, max_bytes: int,
                      upload: bytes | None = None) -> Prompt:
    """The prompt of a ``start`` message or a ``/generate`` request (``upload``: a file part).

    The tempo is the request's ``bpm``, else the prompt file's first tempo when it is one the
    server plays at, else :data:`DEFAULT_BPM`.
    """
    if upload is None and request.prompt_midi is not None:
        upload = decode_base64_midi(request.prompt_midi, max_bytes)
    if upload is not None:
        tokens, file_bpm, notes = await asyncio.to_thread(tokens_from_midi, upload, tokenizer, max_bytes)
        return Prompt(tokens, settings.bpm or usable_bpm(file_bpm) or DEFAULT_BPM, notes)
    bpm = settings.bpm or DEFAULT_BPM
    return Prompt(tokens_from_notes(request.prompt_notes or [], tokenizer, bpm), bpm,
                  len(request.prompt_notes or []))


def decode_base64_midi(text: str, max_bytes: int) -> bytes:
    if len(text) > (max_bytes * 4) // 3 + 4:
        raise RequestError(ErrorCode.TOO_LARGE, f"prompt_midi is larger than {max_bytes} bytes")
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise RequestError(ErrorCode.INVALID_PROMPT, f"prompt_midi is not base64: {exc}") from exc


def tokens_from_midi(data: bytes, tokenizer: Tokenizer, max_bytes: int) -> tuple[TokenSequence, float | None, int]:
    """Read a .mid prompt (malformed files are repaired where they can be): its tokens, its first
    tempo (bpm) and its note count."""
    if len(data) > max_bytes:
        raise RequestError(ErrorCode.TOO_LARGE, f"the prompt file is larger than {max_bytes} bytes")
    try:
        score = read_midi(data, name="prompt")
        tokens = tokenizer.encode(score)
    except (MidiReadError, TokenizerError) as exc:
        raise RequestError(ErrorCode.INVALID_PROMPT, f"the prompt is not a usable MIDI file: {exc}") from exc
    bpm = score.tempos[0].bpm if score.tempos else None
    return tokens, bpm, len(score.notes)


def tokens_from_notes(notes: list[PlayedNote], tokenizer: Tokenizer, bpm: float) -> TokenSequence | None:
    """Notes timed in seconds from the prompt's beginning, read at ``bpm``."""
    if not notes:
        return None
    tpb = TICKS_PER_BEAT
    score = Score(
        ticks_per_beat=tpb,
        notes=[Note(pitch=n.pitch, velocity=n.velocity,
                    onset_tick=ticks_from_beats(beats_from_seconds(n.start, bpm), tpb),
                    duration_tick=max(1, ticks_from_beats(beats_from_seconds(n.duration, bpm), tpb)),
                    onset_beat=beats_from_seconds(n.start, bpm), duration_beat=beats_from_seconds(n.duration, bpm),
                    channel=n.voice, track=0, voice=n.voice)
               for n in sorted(notes, key=lambda n: (n.start, n.pitch))],
        tempos=[TempoChange(0, microseconds_per_beat(bpm))],
        time_signatures=[TimeSignature(0, 4, 4)],
        source="prompt_notes")
    try:
        return tokenizer.encode(score)
    except TokenizerError as exc:
        raise RequestError(ErrorCode.INVALID_PROMPT, f"prompt_notes cannot be read: {exc}") from exc
