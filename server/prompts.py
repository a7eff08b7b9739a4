"""Turn a request's prompt (a base64 .mid, uploaded bytes, or a list of notes) into tokens."""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass

from model.midi_io import MidiReadError, Note, Score, TempoChange, TimeSignature, read_midi
from model.tokenizer import Tokenizer, TokenizerError, TokenSequence
from server.protocol import ErrorCode, PlayedNote

PROMPT_TICKS_PER_BEAT = 480


class RequestError(ValueError):
    """Bad input, with the stable code the client gets back."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass
class Prompt:
    tokens: TokenSequence | None
    bpm: float | None  # the prompt file's first tempo, if it had one
    notes: int


def decode_base64_midi(text: str, max_bytes: int) -> bytes:
    if len(text) > (max_bytes * 4) // 3 + 4:
        raise RequestError(ErrorCode.TOO_LARGE, f"prompt_midi is larger than {max_bytes} bytes")
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise RequestError(ErrorCode.INVALID_PROMPT, f"prompt_midi is not base64: {exc}") from exc


def prompt_from_midi(data: bytes, tokenizer: Tokenizer, max_bytes: int) -> Prompt:
    """Read a .mid prompt (malformed files are repaired where they can be)."""
    if len(data) > max_bytes:
        raise RequestError(ErrorCode.TOO_LARGE, f"the prompt file is larger than {max_bytes} bytes")
    try:
        score = read_midi(data, name="prompt")
        tokens = tokenizer.encode(score)
    except (MidiReadError, TokenizerError) as exc:
        raise RequestError(ErrorCode.INVALID_PROMPT, f"the prompt is not a usable MIDI file: {exc}") from exc
    bpm = score.tempos[0].bpm if score.tempos else None
    return Prompt(tokens, bpm, len(score.notes))


def prompt_from_notes(notes: list[PlayedNote], tokenizer: Tokenizer, bpm: float) -> Prompt:
    """Notes timed in seconds from the prompt's beginning, read at ``bpm``."""
    if not notes:
        return Prompt(None, None, 0)
    tpb = PROMPT_TICKS_PER_BEAT
    beats = bpm / 60.0
    score = Score(
        ticks_per_beat=tpb,
        notes=[Note(pitch=n.pitch, velocity=n.velocity, onset_tick=round(n.start * beats * tpb),
                    duration_tick=max(1, round(n.duration * beats * tpb)), onset_beat=n.start * beats,
                    duration_beat=n.duration * beats, channel=n.voice, track=0, voice=n.voice)
               for n in sorted(notes, key=lambda n: (n.start, n.pitch))],
        tempos=[TempoChange(0, round(60_000_000 / bpm))],
        time_signatures=[TimeSignature(0, 4, 4)],
        source="prompt_notes")
    try:
        tokens = tokenizer.encode(score)
    except TokenizerError as exc:
        raise RequestError(ErrorCode.INVALID_PROMPT, f"prompt_notes cannot be read: {exc}") from exc
    return Prompt(tokens, None, len(notes))
