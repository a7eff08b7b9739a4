"""Tokens in terms no vocabulary owns: what a stream read, so that another checkpoint can read it too.

A token id means something only to the vocabulary that issued it, and a duration index or a grid
position only to its tokenizer's settings. A **portable token** says it in musical units instead:
one row of :data:`PORTABLE_COLUMNS` floats, ``kind`` (BAR, REST or NOTE), ``a`` (the pitch of a note,
the numerator of a bar), ``b`` (a duration in beats; a bar's denominator), ``c`` (the onset in beats
from the bar start), the MIDI velocity and the voice. :func:`to_portable` writes them,
:func:`from_portable` reads them into any tokenizer's ids (the nearest duration where the exact one
is missing, like :meth:`Tokenizer.lookup`), leaving out what that vocabulary cannot hold.
"""

from __future__ import annotations

import numpy as np

from model.tokenizer.sequences import TokenSequence
from model.tokenizer.tokenizer import Tokenizer
from model.tokenizer.vocabulary import BAR, NOTE, REST, UNK, TokenKey

PORTABLE_COLUMNS = 6  # kind, a, b, c, velocity, voice
PORTABLE_KINDS = (BAR, REST, NOTE)


def to_portable(tokenizer: Tokenizer, ids: np.ndarray, velocity: np.ndarray, voice: np.ndarray) -> np.ndarray:
    """``(N, 6)`` float32 rows for the BAR, REST and NOTE tokens among ``ids`` (specials are left out)."""
    timebase, levels = tokenizer.timebase, tokenizer.config.velocity_levels
    rows = []
    for token, level, part in zip(ids.tolist(), velocity.tolist(), voice.tolist()):
        key = tokenizer.vocab[token]
        if key.kind == BAR:
            rows.append((BAR, key.a, key.b, 0.0, 0, 0))
        elif key.kind in (REST, NOTE):
            beats = timebase.beats_from_steps(tokenizer.duration_steps(key.b))
            rows.append((key.kind, key.a, beats, timebase.beats_from_grid(key.c),
                         levels[min(max(level, 0), len(levels) - 1)], part))
    return np.asarray(rows, dtype=np.float32).reshape(-1, PORTABLE_COLUMNS)


def from_portable(tokenizer: Tokenizer, rows: np.ndarray) -> TokenSequence:
    """The ids ``tokenizer`` gives portable ``rows``; rows it has no token for are counted in
    ``unknown`` and left out (a bar it cannot hold leaves out the bar line, not its notes)."""
    ids: list[int] = []
    velocities: list[int] = []
    voices: list[int] = []
    unknown = 0
    timebase, max_voice = tokenizer.timebase, tokenizer.config.max_voices - 1
    for kind, a, b, c, velocity, voice in np.asarray(rows, dtype=np.float64).reshape(-1, PORTABLE_COLUMNS):
        kind = int(kind)
        if kind == BAR:
            key = TokenKey(BAR, int(a), int(b), 0)
        elif kind in (REST, NOTE):
            key = TokenKey(kind, int(a), tokenizer.snap_duration(float(b)), timebase.grid_from_beats(float(c)))
        else:
            unknown += 1
            continue
        token = tokenizer.lookup(key)
        if token == UNK:
            unknown += 1
            continue
        ids.append(token)
        velocities.append(tokenizer.velocity_level(int(velocity)) if kind != BAR else 0)
        voices.append(min(max(int(voice), 0), max_voice) if kind == NOTE else 0)
    as_array = lambda values: np.asarray(values, dtype=np.int64)
    return TokenSequence(as_array(ids), as_array(velocities), as_array(voices), unknown=unknown)


def from_first_bar(rows: np.ndarray) -> np.ndarray:
    """``rows`` from their first bar line on (empty when there is none)."""
    bars = np.flatnonzero(rows[:, 0] == BAR) if len(rows) else np.empty(0, dtype=np.int64)
    return rows[bars[0]:] if len(bars) else rows[:0]
