"""The voice register: where each voice of a stream stands now, as the model reads it beside each token.

One field sums every voice, so "the alto's last note" is not kept apart anywhere in it. The
register keeps it apart, in a few integers per voice that the stream decoder
(:class:`model.tokenizer.stream.StreamDecoder`) updates with every note it reads or generates:

==========  ====================================================================================
per voice   value
==========  ====================================================================================
pitch       the top note of the voice's latest onset (MIDI pitch; -1 before its first note)
previous    the top note of the onset before that (its melodic move is ``pitch - previous``)
onset       the latest onset (internal steps)
end         where the voice's latest notes end (internal steps)
==========  ====================================================================================

Its features (:meth:`VoiceRegister.features`) describe each voice at the stream's cursor, the onset
of its latest token, in :data:`VOICE_FEATURES` floats:

=====  =========  ==============================================================================
col    feature    value
=====  =========  ==============================================================================
0      seen       1 once the voice has played
1      held       how long its note still sounds after the cursor: log2(1 + beats) / 3, at most 1
2      resting    how long it has been silent at the cursor: log2(1 + beats) / 4, at most 1
3      pitch      (pitch - 60) / 24
4      motion     (pitch - previous) / 12, clipped to [-1, 1]
=====  =========  ==============================================================================

The first :data:`REGISTER_VOICES` voices have their own rows (higher voices share the last one).
After them come :data:`KEY_FLOATS` columns for the key the notes imply: every note adds one to its
pitch class and all twelve decay by :data:`KEY_DECAY` per note (a memory of about 64 notes); the
columns are the shares, times 2 (zero before the first note). A model that sees only its field
drifts out of its prompt's key; this keeps the recent pitch classes in view.
The register is a function of the tokens alone, so it is built the same way in training (one pass
over a file) and in generation (one note at a time), and it is part of a stream's fixed-size state:
4 integers per voice and 12 floats, whatever the length of the music.
"""

from __future__ import annotations

import numpy as np

import math

REGISTER_VOICES = 16
VOICE_FEATURES = 5
VOICE_FLOATS = REGISTER_VOICES * VOICE_FEATURES
KEY_FLOATS = 12
KEY_DECAY = math.exp(-1 / 64)
REGISTER_FLOATS = VOICE_FLOATS + KEY_FLOATS
FIELDS = ("pitch", "previous", "onset", "end", "recent")
CENTRE_PITCH = 60


class VoiceRegister:
    """Each voice's latest top note, the one before, its onset and end (internal steps); the
    decayed pitch-class weights of recent notes."""

    __slots__ = FIELDS

    def __init__(self) -> None:
        self.pitch = np.full(REGISTER_VOICES, -1, dtype=np.int64)
        self.previous = np.full(REGISTER_VOICES, -1, dtype=np.int64)
        self.onset = np.full(REGISTER_VOICES, -1, dtype=np.int64)
        self.end = np.zeros(REGISTER_VOICES, dtype=np.int64)
        self.recent = np.zeros(KEY_FLOATS, dtype=np.float64)

    def copy(self) -> "VoiceRegister":
        twin = VoiceRegister.__new__(VoiceRegister)
        for name in FIELDS:
            setattr(twin, name, getattr(self, name).copy())
        return twin

    def note(self, voice: int, pitch: int, onset: int, end: int) -> None:
        """A note of ``voice`` at ``onset`` until ``end`` (internal steps)."""
        v = min(max(voice, 0), REGISTER_VOICES - 1)
        self.recent *= KEY_DECAY
        self.recent[pitch % 12] += 1
        if self.onset[v] == onset:  # another note of the same chord: the top note stays the line's
            self.pitch[v] = max(self.pitch[v], pitch)
            self.end[v] = max(self.end[v], end)
            return
        self.previous[v] = self.pitch[v] if self.pitch[v] >= 0 else pitch
        self.pitch[v], self.onset[v], self.end[v] = pitch, onset, end

    def state(self) -> dict:
        """JSON-ready lists (:meth:`from_state` reads them back)."""
        return {name: getattr(self, name).tolist() for name in FIELDS}

    @classmethod
    def from_state(cls, state: dict) -> "VoiceRegister":
        """The register :meth:`state` described (``ValueError`` / ``KeyError`` / ``TypeError`` on a
        malformed one)."""
        register = cls()
        for name in FIELDS:
            want = getattr(register, name)
            values = np.asarray(state[name], dtype=want.dtype)
            if values.shape != want.shape or not np.isfinite(values).all():
                raise ValueError(f"register {name} must hold {len(want)} numbers")
            setattr(register, name, values)
        return register

    def features(self, cursor: int, resolution: int) -> np.ndarray:
        """``(REGISTER_FLOATS,)`` float32: every voice at the internal step ``cursor``."""
        return register_features(self.pitch[None], self.previous[None], self.end[None], self.recent[None],
                                 np.array([cursor]), resolution)[0]


def register_features(pitch: np.ndarray, previous: np.ndarray, end: np.ndarray, recent: np.ndarray,
                      cursor: np.ndarray, resolution: int) -> np.ndarray:
    """Features of many registers at once: ``(N, REGISTER_VOICES)`` arrays, ``(N, KEY_FLOATS)``
    pitch-class weights and cursors ``(N,)`` -> ``(N, REGISTER_FLOATS)`` float32 (the columns of
    the module docstring: voice by voice, then the key)."""
    seen = pitch >= 0
    gap = (end - cursor[:, None]) / resolution  # beats: > 0 still sounding, < 0 silent
    out = np.zeros(pitch.shape + (VOICE_FEATURES,), dtype=np.float32)
    out[..., 0] = seen
    out[..., 1] = np.where(seen, np.minimum(np.log2(1 + np.maximum(gap, 0)) / 3, 1), 0)
    out[..., 2] = np.where(seen, np.minimum(np.log2(1 + np.maximum(-gap, 0)) / 4, 1), 0)
    out[..., 3] = np.where(seen, (pitch - CENTRE_PITCH) / 24, 0)
    out[..., 4] = np.where(seen, np.clip((pitch - previous) / 12, -1, 1), 0)
    total = recent.sum(axis=1, keepdims=True)
    key = 2 * recent / np.where(total > 0, total, 1)
    return np.concatenate([out.reshape(len(pitch), VOICE_FLOATS), key.astype(np.float32)], axis=1)


def chord_voices(onsets: np.ndarray, onset: np.ndarray) -> np.ndarray:
    """``(N, REGISTER_VOICES)`` float32: 1 where a voice's latest note starts at ``onset`` (``(N,)``
    internal steps, one per stream; -2 where the next token is no note), that is, where the voice
    already plays in the chord the next note joins. ``onsets``: the registers' ``onset`` rows
    ``(N, REGISTER_VOICES)``. The note head reads it (:class:`model.fm.note_head.ChordBias`): a
    voice rarely strikes two notes at once in a piece written in parts."""
    return (onsets == np.asarray(onset)[:, None]).astype(np.float32)


def stacked_features(registers: list[VoiceRegister], cursors: np.ndarray, resolution: int) -> np.ndarray:
    """:func:`register_features` of several registers (one per stream) at their cursors."""
    if not registers:
        return np.zeros((0, REGISTER_FLOATS), dtype=np.float32)
    stack = lambda name: np.stack([getattr(r, name) for r in registers])
    return register_features(stack("pitch"), stack("previous"), stack("end"), stack("recent"),
                             np.asarray(cursors), resolution)
