"""Token DNA: the vector every token enters the model as, the same in training and generation.

Every event gets 7 continuous DNA values of its own plus a voice slot for the model's 16-dim
learned voice embedding (7 + 16 = the seed's 23 dims), then the stream's voice register after it
(:mod:`model.tokenizer.voice_register`, :data:`REGISTER_FLOATS` more columns):

=====  ==============  ===========================================================
col    field           value
=====  ==============  ===========================================================
0, 1   pitch class     sin, cos of 2*pi*(pitch % 12)/12; (0, 0) for non-notes
2      octave          (pitch // 12) / 10; 0 for non-notes
3      duration        log2 duration (beats) scaled so the grid spans 0..1; BAR: bar length
4, 5   beat position   sin, cos of 2*pi*position/bar length; BAR: (0, 1); specials: (0, 0)
6      velocity        level / 127; 0 for non-notes
7..    voice register  each voice at the token's onset: seen, held, resting, pitch, motion
slot   voice           the note's voice; REST, BAR, BOS, EOS, UNK and PAD have slots of their own
=====  ==============  ===========================================================

The bar length in a note's beat angle comes from the latest ``BAR`` token in the stream, and the
register from the notes before, so DNA depends only on the stream itself. Both come from the
stream's decoder (:meth:`model.tokenizer.stream.StreamDecoder.contexts`), the same way when training
(:meth:`model.tokenizer.tokenizer.Tokenizer.dna`, a whole file) and when generating
(:meth:`TokenDNA.of_tokens`, one token per stream with what each stream's decoder knows).
"""

from __future__ import annotations

import math

import numpy as np

from model.tokenizer.vocabulary import BAR, NOTE, REST, TokenizerConfig, TokenKey
from model.tokenizer.voice_register import REGISTER_FLOATS

TOKEN_FLOATS = 7  # the token's own DNA values (columns 0-6 above)
DNA_FLOATS = TOKEN_FLOATS + REGISTER_FLOATS  # every column: the token's, then the voice register


class TokenDNA:
    """The DNA of one vocabulary's tokens (built once per vocabulary; read-only)."""

    def __init__(self, config: TokenizerConfig, vocab: list[TokenKey]) -> None:
        self.config = config
        durations = np.log2(np.array([float(d) for d in config.duration_beats]))
        self._log_low = float(durations[0])
        self._log_span = float(durations[-1] - durations[0]) or 1.0
        self._velocity_levels = np.array(config.velocity_levels)
        self._kinds = np.array([k.kind for k in vocab], dtype=np.int64)
        self._positions = np.array([max(k.c, 0) for k in vocab], dtype=np.float64)
        self._static = self._static_table(vocab)

    @property
    def default_bar_length(self) -> int:
        """Grid steps of the 4/4 bar assumed before any BAR token."""
        return 4 * self.config.grid_per_beat

    def _static_table(self, vocab: list[TokenKey]) -> np.ndarray:
        """Per vocabulary entry: pitch-class sin/cos, octave and log-duration."""
        table = np.zeros((len(vocab), 4), dtype=np.float32)
        durations = self.config.duration_beats
        for i, key in enumerate(vocab):
            if key.kind == NOTE:
                angle = 2 * math.pi * (key.a % 12) / 12
                table[i, 0:3] = math.sin(angle), math.cos(angle), (key.a // 12) / 10
            if key.kind in (NOTE, REST):
                table[i, 3] = self._scaled_log_duration(float(durations[key.b]))
            elif key.kind == BAR:
                table[i, 3] = self._scaled_log_duration(4 * key.a / key.b)
        return table

    def _scaled_log_duration(self, beats: float) -> float:
        return (math.log2(beats) - self._log_low) / self._log_span

    def of_tokens(self, ids: np.ndarray, velocity: np.ndarray, voice: np.ndarray,
                  bar_length: np.ndarray, register: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """DNA ``(N, DNA_FLOATS)`` and voice slots ``(N,)`` of tokens, given the bar length (grid
        steps) in force for each and the voice register's features after each ``(N, REGISTER_FLOATS)``."""
        ids = np.asarray(ids)
        kinds = self._kinds[ids]
        floats = np.zeros((len(ids), DNA_FLOATS), dtype=np.float32)
        floats[:, :4] = self._static[ids]
        floats[:, TOKEN_FLOATS:] = register
        timed = (kinds == NOTE) | (kinds == REST) | (kinds == BAR)
        positions = np.where(kinds == BAR, 0.0, self._positions[ids])
        angle = 2 * np.pi * positions / np.asarray(bar_length, dtype=np.float64)
        floats[:, 4] = np.where(timed, np.sin(angle), 0.0)
        floats[:, 5] = np.where(timed, np.cos(angle), 0.0)
        levels = self._velocity_levels[np.clip(velocity, 0, len(self._velocity_levels) - 1)]
        floats[:, 6] = np.where(kinds == NOTE, levels / 127.0, 0.0)
        return floats, self.voice_slots(kinds, np.asarray(voice))

    def voice_slots(self, kinds: np.ndarray, voices: np.ndarray) -> np.ndarray:
        """Voice-embedding slot per event: the voice for notes, a slot per kind otherwise."""
        m = self.config.max_voices
        by_kind = np.array([m + 5, m + 2, m + 3, m + 4, m + 1, m, 0])  # PAD BOS EOS UNK BAR REST NOTE
        return np.where(kinds == NOTE, np.clip(voices, 0, m - 1), by_kind[kinds]).astype(np.int64)
