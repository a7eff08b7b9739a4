"""The token grammar, kept while sampling.

Sampling keeps to the token grammar every training sequence obeys: a BAR comes before any NOTE or
REST; inside a bar, NOTE and REST positions never go back and never reach the bar's end (a new
bar needs a BAR token); at most ``max_voices`` notes (16; the Bach corpus's largest chord has 13)
start together. Tokens that would
break it are masked per stream before sampling, from the stream's decoder (its position in the
bar, the bar's length, the notes already at that position). Without the mask a stream can fall
into stacking notes on one position or past the bar's end, where time stops: the shipped model
did so for some seeds (up to 113 notes per beat), and a live stream would ask for tokens forever.

One rule more, which the music nearly always keeps: a pitch starts at most :data:`MAX_UNISON`
times at one onset. In the Bach corpus 91 % of the pitches that start at an onset start there
once and 6 % twice (two parts in unison); more only where orchestral parts double. Unmasked, the
shipped model stacked copies of one note (up to 15 at one onset, one pitch heard once), on
continuations of 20 held-out pieces.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import torch

from model.tokenizer.stream import StreamDecoder
from model.tokenizer.tokenizer import Tokenizer
from model.tokenizer.vocabulary import BAR, NOTE, REST

MAX_ORDER_ROWS = 4096  # cached grammar-mask rows (16 KB each for a 16k vocabulary)
MAX_UNISON = 2  # times one pitch may start at one onset


class GrammarMask:
    """Per stream, the tokens that would break the grammar where the stream stands."""

    def __init__(self, tokenizer: Tokenizer, device: torch.device) -> None:
        self.max_voices = tokenizer.config.max_voices
        ids = np.arange(tokenizer.vocab_size)
        kinds = tokenizer.kinds(ids)
        timed = np.isin(kinds, (NOTE, REST))
        positions = np.array([tokenizer.vocab[t].c for t in ids.tolist()], dtype=np.int64)
        self.token_position = torch.from_numpy(np.where(timed, positions, -1)).to(device)
        pitches = np.array([tokenizer.vocab[t].a for t in ids.tolist()], dtype=np.int64)
        self.token_pitch = torch.from_numpy(np.where(kinds == NOTE, pitches, -1)).to(device)
        self.is_note = torch.from_numpy(kinds == NOTE).to(device)
        self.is_bar = torch.from_numpy(kinds == BAR).to(device)
        self.is_rest = torch.from_numpy(kinds == REST).to(device)
        self._rows: dict[tuple[int, int, bool], torch.Tensor] = {}

    def __call__(self, decoders: list[StreamDecoder]) -> torch.Tensor:
        """``(B, V)`` True where a NOTE or REST would go back in its bar or past the bar's end, or a
        NOTE would join a chord of ``max_voices`` notes or start a pitch a :data:`MAX_UNISON` + 1st
        time at one onset. Streams share few distinct situations, so each situation's ``(V,)`` row
        is built once and kept; the few streams with a full unison get it added."""
        rows = []
        unisons = []
        for d in decoders:
            # before the first BAR no NOTE or REST (every sequence opens with a bar): "now" is the bar's end
            key = (d.cursor - d.bar_start if d.bar >= 0 else d.bar_length, d.bar_length,
                   d.notes_at_cursor >= self.max_voices)
            row = self._rows.get(key)
            if row is None:
                if len(self._rows) >= MAX_ORDER_ROWS:
                    self._rows.clear()
                row = self._rows[key] = self._row(*key)
            rows.append(row)
            if d.notes_at_cursor >= MAX_UNISON:
                full = [p for p, n in Counter(d.pitches_at_cursor).items() if n >= MAX_UNISON]
                if full:
                    unisons.append((len(rows) - 1, key[0], full))
        mask = torch.stack(rows)
        for i, now, full in unisons:
            pitches = torch.tensor(full, dtype=self.token_pitch.dtype, device=self.token_pitch.device)
            mask[i] |= (self.token_position == now) & torch.isin(self.token_pitch, pitches)
        return mask

    def answer(self, decoders: list[StreamDecoder], until: list[int | None]) -> torch.Tensor | None:
        """``(B, V)`` True for every token but a NOTE starting by ``until`` (a grid step on its
        decoder's timeline; None: no limit): the next token is the answer to played notes, a note
        that starts by then. Streams whose limit no note can meet (the cursor is past it) are left
        alone. None when no stream has a limit."""
        if all(u is None for u in until):
            return None
        position = self.token_position
        masks = []
        for d, limit in zip(decoders, until):
            row = torch.zeros_like(self.is_note)
            if limit is not None and d.bar >= 0 and d.cursor <= limit:
                room = limit - d.bar_start  # positions in this bar the answer may take
                row = (position > room) | self.is_bar | self.is_rest  # a note, by then
            masks.append(row)
        return torch.stack(masks)

    def _row(self, now: int, bar_length: int, chord_full: bool) -> torch.Tensor:
        position = self.token_position
        late = (position < now) | (position >= bar_length)
        if chord_full:
            late |= self.is_note & (position == now)
        return (position >= 0) & late
