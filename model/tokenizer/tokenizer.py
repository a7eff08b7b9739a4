"""The tokenizer: a :class:`model.midi.score.Score` to tokens and back, one implementation for all.

:meth:`Tokenizer.events` places a score on the grid (BAR, REST and NOTE events, see
:mod:`model.tokenizer.vocabulary`), :meth:`Tokenizer.encode_events` looks them up in the vocabulary
(fitted on a corpus by :meth:`Tokenizer.fit`), :meth:`Tokenizer.decode` rebuilds a score, and
:meth:`Tokenizer.dna` gives every token its DNA (:mod:`model.tokenizer.dna`). The vocabulary and the
settings save to one ``tokenizer.json`` (:meth:`Tokenizer.save` / :meth:`Tokenizer.load`).
"""

from __future__ import annotations

import bisect
import json
import logging
import math
from collections import Counter
from dataclasses import asdict, dataclass
from fractions import Fraction
from pathlib import Path
from typing import Iterable

import numpy as np

from model.midi.limits import Deadline, ReadLimits
from model.midi.read import read_midi
from model.midi.score import Note, Score, TempoChange, TimeSignature
from model.midi.write import write_midi
from model.timebase import TICKS_PER_BEAT, grid_from_ticks, round_half_up
from model.tokenizer.dna import TokenDNA
from model.tokenizer.sequences import Events, TokenSequence
from model.tokenizer.stream import StreamDecoder
from model.tokenizer.vocabulary import (BAR, BOS, EOS, NOTE, PAD, REST, SPECIAL_KINDS, TOKENIZER_FORMAT,
                                        UNK, TokenizerConfig, TokenizerError, TokenKey, TokenShape,
                                        special_key)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Bar:
    start: int  # grid steps from the start of the piece
    length: int  # grid steps
    numerator: int
    denominator: int


class Tokenizer:
    """Turns a :class:`Score` into tokens and back. ``fit`` builds the vocabulary from a corpus."""

    def __init__(self, config: TokenizerConfig | None = None,
                 vocab: list[TokenKey] | None = None) -> None:
        self.config = config or TokenizerConfig()
        self._durations = self.config.duration_beats
        self._log_durations = np.log2(np.array([float(d) for d in self._durations]))
        self.timebase = self.config.timebase
        self._res = self.timebase.resolution
        self._step = self.timebase.steps_per_grid  # internal steps per grid step
        self._duration_steps = [int(d * self._res) for d in self._durations]
        self._velocity_levels = np.array(self.config.velocity_levels)
        self.vocab: list[TokenKey] = []
        self.index: dict[TokenKey, int] = {}
        self._set_vocab(vocab if vocab is not None else [special_key(k) for k in SPECIAL_KINDS])

    # ----------------------------------------------------------------- vocabulary
    def _set_vocab(self, vocab: list[TokenKey]) -> None:
        specials = [special_key(k) for k in SPECIAL_KINDS]
        if list(vocab[:len(specials)]) != specials:
            raise TokenizerError("a vocabulary must start with <PAD> <BOS> <EOS> <UNK>")
        if len(set(vocab)) != len(vocab):
            raise TokenizerError("the vocabulary holds a token twice")
        self.vocab = list(vocab)
        self.index = {key: i for i, key in enumerate(self.vocab)}
        # Durations available per (pitch, position), for nearest-duration fallback.
        self._durations_at: dict[tuple[int, int, int], list[int]] = {}
        for key in self.vocab:
            if key.kind in (NOTE, REST):
                self._durations_at.setdefault((key.kind, key.a, key.c), []).append(key.b)
        self._kinds = np.array([k.kind for k in self.vocab], dtype=np.int64)
        self.token_dna = TokenDNA(self.config, self.vocab)

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    @property
    def shape(self) -> TokenShape:
        """The sizes a model built for this tokenizer needs (:class:`TokenShape`)."""
        c = self.config
        return TokenShape(vocab_size=self.vocab_size, voice_slots=c.voice_slots,
                          max_voices=c.max_voices, velocity_levels=len(c.velocity_levels))

    pad_id, bos_id, eos_id, unk_id = PAD, BOS, EOS, UNK

    def fit(self, corpus: Iterable[Events]) -> "Tokenizer":
        """Build the vocabulary from a corpus of events (keys seen at least ``min_count`` times)."""
        counts: Counter[TokenKey] = Counter()
        for events in corpus:
            counts.update(events.keys())
        keep = [k for k, n in counts.items()
                if k.kind == BAR or (k.kind in (NOTE, REST) and n >= self.config.min_count)]
        keep.sort()
        self._set_vocab([special_key(k) for k in SPECIAL_KINDS] + keep)
        return self

    # ----------------------------------------------------------------- saving
    def to_dict(self) -> dict:
        return {"format": TOKENIZER_FORMAT, "config": asdict(self.config),
                "vocab": [str(k) for k in self.vocab]}

    @classmethod
    def from_dict(cls, data: dict) -> "Tokenizer":
        if data.get("format") != TOKENIZER_FORMAT:
            raise TokenizerError(
                f"tokenizer format {data.get('format')!r} is not {TOKENIZER_FORMAT}; retokenize")
        config = TokenizerConfig.from_dict(data["config"])
        return cls(config, [TokenKey.parse(t) for t in data["vocab"]])

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=1) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "Tokenizer":
        try:
            data = json.loads(Path(path).read_text())
        except FileNotFoundError as exc:
            raise TokenizerError(f"{path}: no such tokenizer file") from exc
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise TokenizerError(f"{path}: not a tokenizer JSON file ({exc})") from exc
        try:
            return cls.from_dict(data)
        except (KeyError, TypeError) as exc:
            raise TokenizerError(f"{path}: malformed tokenizer file (missing {exc})") from exc
        except TokenizerError as exc:
            raise TokenizerError(f"{path}: {exc}") from exc

    # ----------------------------------------------------------------- encoding
    def events(self, score: Score, limits: ReadLimits | None = None) -> Events:
        """Place a score on the grid: BAR, REST and NOTE events in stream order (no BOS/EOS).

        Raises :class:`TokenizerError` when the score would pass ``limits`` (default
        :class:`ReadLimits`): too many notes, beats or tokens, or too long to place."""
        if not score.notes:
            raise TokenizerError(f"{score.source}: the score holds no notes")
        limits = limits or ReadLimits()
        deadline = Deadline(limits.seconds)
        cfg = self.config
        tpb = score.ticks_per_beat
        grid = cfg.grid_per_beat
        problems: Counter[str] = Counter()
        if tpb <= 0:
            raise TokenizerError(f"{score.source}: ticks_per_beat must be > 0, not {tpb}")
        limits.check("note count", len(score.notes), "max_notes", score.source, TokenizerError)
        limits.check("length in beats", score.end_tick / tpb, "max_beats", score.source, TokenizerError)

        onsets = [grid_from_ticks(n.onset_tick, tpb, grid) for n in score.notes]
        dur_index = [self.snap_duration(n.duration_beat) for n in score.notes]
        # Silence is judged on the notes' real ends (on the internal grid), not snapped durations.
        res = self._res
        ends = [max(grid_from_ticks(n.onset_tick + n.duration_tick, tpb, res), on * self._step + 1)
                for n, on in zip(score.notes, onsets)]
        bars = self._bars(score, max(onsets), problems, limits, deadline)
        bar_starts = [b.start for b in bars]

        # rows: (time in internal steps, order, kind, a, b, c, velocity level, voice)
        rows: list[tuple[int, int, int, int, int, int, int, int]] = []
        for bar in bars:
            rows.append((bar.start * self._step, 0, BAR, bar.numerator, bar.denominator, 0, 0, 0))
        for note, on, d in zip(score.notes, onsets, dur_index):
            bar = bars[bisect.bisect_right(bar_starts, on) - 1]
            voice = note.voice
            if voice >= cfg.max_voices:
                voice = cfg.max_voices - 1
                problems[f"notes of voices above {cfg.max_voices} merged into the last voice"] += 1
            rows.append((on * self._step, 2, NOTE, note.pitch, d, on - bar.start,
                         self._velocity_level(note.velocity), voice))
        rows.extend(self._rests(sorted(zip(onsets, ends)), bars, bar_starts))
        limits.check("token count", len(rows) + 2, "max_tokens", score.source, TokenizerError)
        rows.sort(key=lambda r: (r[0], r[1], r[7], -r[3]))
        table = np.array([r[2:] for r in rows], dtype=np.int32).reshape(-1, 6)
        return Events(*(np.ascontiguousarray(table[:, i]) for i in range(6)),
                      problems=[f"{n} {what}" for what, n in problems.items()])

    def encode_events(self, events: Events) -> TokenSequence:
        """Look events up in the vocabulary and add BOS/EOS."""
        ids = np.empty(len(events) + 2, dtype=np.int64)
        ids[0], ids[-1] = BOS, EOS
        unknown = approximated = 0
        index = self.index
        for i, key in enumerate(events.keys(), start=1):
            token = index.get(key)
            if token is None:
                token = self._nearest(key)
                if token is None:
                    token = UNK
                    unknown += key.kind == NOTE
                else:
                    approximated += key.kind == NOTE
            ids[i] = token
        pad = np.zeros(1, dtype=np.int64)
        velocity = np.concatenate([pad, events.velocity, pad]).astype(np.int64)
        voice = np.concatenate([pad, events.voice, pad]).astype(np.int64)
        return TokenSequence(ids, velocity, voice, unknown=unknown, approximated=approximated)

    def encode(self, score: Score, limits: ReadLimits | None = None) -> TokenSequence:
        return self.encode_events(self.events(score, limits))

    def from_midi(self, source: str | Path | bytes, limits: ReadLimits | None = None) -> TokenSequence:
        return self.encode(read_midi(source, limits=limits), limits)

    def _nearest(self, key: TokenKey) -> int | None:
        """The same note or rest at the same position with the nearest duration in the vocabulary."""
        if key.kind not in (NOTE, REST):
            return None
        options = self._durations_at.get((key.kind, key.a, key.c))
        if not options:
            return None
        best = min(options, key=lambda b: abs(self._log_durations[b] - self._log_durations[key.b]))
        return self.index[TokenKey(key.kind, key.a, best, key.c)]

    def lookup(self, key: TokenKey) -> int:
        """Id of ``key``; for a note or rest missing from the vocabulary, the same one at the same
        position with the nearest duration; UNK when there is none (the rule :meth:`encode` uses)."""
        token = self.index.get(key)
        if token is None:
            token = self._nearest(key)
        return UNK if token is None else token

    def velocity_level(self, velocity: int) -> int:
        """Index of the velocity level nearest to a MIDI velocity."""
        return self._velocity_level(velocity)

    def snap_duration(self, beats: float) -> int:
        """Index of the grid duration nearest (in log2) to ``beats`` quarter notes."""
        if beats <= 0:
            return 0
        return int(np.argmin(np.abs(self._log_durations - math.log2(beats))))

    def duration_steps(self, index: int) -> int:
        """Length of grid duration ``index`` in internal steps (``config.resolution`` a beat)."""
        return self._duration_steps[index]

    def _velocity_level(self, velocity: int) -> int:
        return int(np.argmin(np.abs(self._velocity_levels - velocity)))

    def _bars(self, score: Score, last_onset: int, problems: Counter[str], limits: ReadLimits,
              deadline: Deadline) -> list[_Bar]:
        """Bar lines in grid steps from the time-signature map, up to the bar holding last_onset.

        A signature change that falls inside a bar takes effect at the next bar line.
        """
        grid = self.config.grid_per_beat
        changes = [(grid_from_ticks(ts.tick, score.ticks_per_beat, grid), ts.numerator, ts.denominator)
                   for ts in score.time_signatures]
        self._check_bar_count(changes, last_onset, limits, score.source)
        bars: list[_Bar] = []
        start = 0
        num, den = changes[0][1:] if changes and changes[0][0] == 0 else (4, 4)
        pending = [c for c in changes if c[0] > 0]
        while start <= last_onset:
            if len(bars) % 1024 == 1023:
                if deadline.passed():
                    raise TokenizerError(f"{score.source}: placing the notes took longer than "
                                         f"{deadline.seconds:g} s (the limit, seconds)")
            while pending and pending[0][0] <= start:
                if pending[0][0] < start:
                    problems["time signatures inside a bar moved to the next bar line"] += 1
                num, den = pending.pop(0)[1:]
            if num <= 0 or den <= 0:
                problems[f"time signatures of {num}/{den} read as 4/4"] += 1
                num, den = 4, 4
            length = Fraction(4 * grid * num, den)
            if length.denominator != 1 or length <= 0:
                problems[f"bars of {num}/{den} rounded to the grid"] += 1
                length = max(1, math.ceil(length))
            bars.append(_Bar(start, int(length), num, den))
            start += int(length)
        return bars

    def _check_bar_count(self, changes: list[tuple[int, int, int]], last_onset: int, limits: ReadLimits,
                         source: str) -> None:
        """Refuse a score whose bars alone pass ``max_tokens`` (short bars over a long span), counted
        per meter, before a bar is built."""
        grid = self.config.grid_per_beat
        edges = [c for c in changes if 0 < c[0] <= last_onset]
        meters = [(0, *(changes[0][1:] if changes and changes[0][0] == 0 else (4, 4)))] + edges
        bars = 0
        for (at, num, den), (end, _, _) in zip(meters, meters[1:] + [(last_onset + 1, 0, 0)]):
            length = max(1, math.ceil(Fraction(4 * grid * max(num, 1), max(den, 1))))
            bars += -(-(end - at) // length)
        limits.check("bar count", bars, "max_tokens", source, TokenizerError)

    def _rests(self, spans: list[tuple[int, int]], bars: list[_Bar],
               bar_starts: list[int]) -> list[tuple[int, int, int, int, int, int, int, int]]:
        """REST rows for every silence (no note sounding) of at least the shortest duration."""
        shortest = self._duration_steps[0]
        rows = []
        covered = 0  # internal steps: the piece starts at 0
        for on, end in spans:
            on_steps = on * self._step
            if on_steps - covered >= shortest:
                rows.extend(self._rest_rows(covered, on_steps, bars, bar_starts))
            covered = max(covered, end)
        return rows

    def _rest_rows(self, begin: int, end: int, bars: list[_Bar], bar_starts: list[int]):
        step = self._step
        start = begin
        while end - start >= self._duration_steps[0]:
            grid_pos = round_half_up(start, step)
            bar = bars[bisect.bisect_right(bar_starts, grid_pos) - 1]
            stop = min(end, (bar.start + bar.length) * step)
            d = self.snap_duration((stop - start) / self._res)
            yield (grid_pos * step, 1, REST, -1, d, grid_pos - bar.start, 0, 0)
            start = stop

    # ----------------------------------------------------------------- decoding
    def decode(self, sequence: TokenSequence | Iterable[int], *, ticks_per_beat: int = TICKS_PER_BEAT,
               tempos: list[TempoChange] | None = None) -> Score:
        """Rebuild a score from tokens. ``tempos`` (ticks at ``ticks_per_beat``) default to 120 bpm."""
        if not isinstance(sequence, TokenSequence):
            ids = np.asarray(list(sequence), dtype=np.int64)
            zeros = np.zeros_like(ids)
            sequence = TokenSequence(ids, zeros, zeros)
        decoder = StreamDecoder(self)
        notes = []
        for token, velocity, voice in zip(sequence.ids.tolist(), sequence.velocity.tolist(),
                                          sequence.voice.tolist()):
            note = decoder.push(token, velocity, voice)
            if note is not None:
                notes.append(note)
        try:
            k = self.timebase.ticks_per_step(ticks_per_beat)
        except ValueError as exc:
            raise TokenizerError(str(exc)) from exc
        out_notes = [
            Note(pitch=n.pitch, velocity=n.velocity, onset_tick=n.onset * k,
                 duration_tick=n.duration * k, onset_beat=n.onset / self._res,
                 duration_beat=n.duration / self._res, channel=0, track=0, voice=n.voice)
            for n in notes
        ]
        signatures = [TimeSignature(start * k, num, den) for start, num, den in decoder.signatures]
        return Score(ticks_per_beat=ticks_per_beat, notes=out_notes,
                     tempos=tempos or [TempoChange(0, 500_000)],
                     time_signatures=signatures or [TimeSignature(0, 4, 4)],
                     source="<decoded>")

    def to_midi(self, sequence: TokenSequence, path: str | Path, **kwargs) -> Score:
        score = self.decode(sequence, **kwargs)
        write_midi(score, path)
        return score

    # ----------------------------------------------------------------- DNA
    def bar_length(self, token: int) -> int | None:
        """Grid steps of the bar a BAR token opens (None for other tokens)."""
        key = self.vocab[token]
        if key.kind != BAR:
            return None
        return max(1, math.ceil(Fraction(4 * self.config.grid_per_beat * key.a, key.b)))

    @property
    def default_bar_length(self) -> int:
        """Grid steps of the 4/4 bar assumed before any BAR token."""
        return self.token_dna.default_bar_length

    def kinds(self, ids: np.ndarray) -> np.ndarray:
        """Token kind (PAD, BOS, EOS, UNK, BAR, REST, NOTE) of every id."""
        return self._kinds[ids]

    def dna(self, sequence: TokenSequence) -> tuple[np.ndarray, np.ndarray]:
        """DNA of every event of a stream read from its start (:mod:`model.tokenizer.dna`)."""
        return self.dna_and_chords(sequence)[:2]

    def dna_and_chords(self, sequence: TokenSequence) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """:meth:`dna` and, per token, the voices already playing where it starts ``(T,
        REGISTER_VOICES)`` (what the note head reads beside a note: training needs it for every token)."""
        reading = StreamDecoder(self).contexts(sequence)
        floats, slots = self.token_dna.of_tokens(sequence.ids, sequence.velocity, sequence.voice,
                                                 reading.bar_lengths, reading.register)
        return floats, slots, reading.chords
