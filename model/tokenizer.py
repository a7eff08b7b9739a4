"""The FM tokenizer: MIDI notes to Field Machine tokens and back, one implementation for all.

Token stream
------------
A piece is a stream of events in time order, bar by bar::

    BOS  BAR(4/4)  NOTE(67,d=1,p=0)  NOTE(60,d=2,p=0)  NOTE(69,d=1,p=12) ...  BAR(4/4) ... EOS

* ``BAR(n/d)`` opens every bar, empty bars included, and carries the bar's time signature. Onsets
  are therefore never ambiguous: a note's onset is the start of the current bar plus its position.
  Chords are notes with the same position; a note held for several bars is followed by BAR tokens
  and no notes; pickups and meter changes are bars of their own signature.
* ``NOTE(pitch, duration, position)``: the token identity of the seed FM, with position = onset in
  the bar in grid steps (``grid_per_beat`` steps per quarter note) and duration snapped (in log
  space) to the nearest value of ``durations``.
* ``REST(duration, position)`` marks real silence: a stretch where no note sounds, cut at bar lines.
* ``BOS``, ``EOS``, ``PAD``, ``UNK``: sequence start and end, batch padding, and a note whose
  (pitch, duration, position) is outside the vocabulary (after trying the nearest duration).

Velocity and voice are not part of the token key. Every event carries a velocity level (index
into ``velocity_levels``) and a voice (0 to ``max_voices - 1``) beside its token id, and both
enter the token's DNA.

DNA
---
:meth:`Tokenizer.dna` gives every event its 7 continuous DNA values plus a voice slot for the
model's 16-dim learned voice embedding (7 + 16 = the seed's 23 dims):

=====  ==============  ===========================================================
col    field           value
=====  ==============  ===========================================================
0, 1   pitch class     sin, cos of 2*pi*(pitch % 12)/12; (0, 0) for non-notes
2      octave          (pitch // 12) / 10; 0 for non-notes
3      duration        log2 duration (beats) scaled so the grid spans 0..1; BAR: bar length
4, 5   beat position   sin, cos of 2*pi*position/bar length; BAR: (0, 1); specials: (0, 0)
6      velocity        level / 127; 0 for non-notes
slot   voice           the note's voice; REST, BAR, BOS, EOS, UNK and PAD have slots of their own
=====  ==============  ===========================================================

The bar length in a note's beat angle comes from the latest ``BAR`` token in the stream, so DNA
depends only on the stream itself and is built the same way when training and when generating.
"""

from __future__ import annotations

import argparse
import bisect
import json
import logging
import math
import sys
from collections import Counter
from dataclasses import asdict, dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Iterable, NamedTuple

import numpy as np

from model.midi_io import Note, Score, TempoChange, TimeSignature, read_midi, write_midi

logger = logging.getLogger(__name__)

TOKENIZER_FORMAT = 1  # bump when the meaning of events or keys changes (invalidates caches)

# Token kinds.
PAD, BOS, EOS, UNK, BAR, REST, NOTE = range(7)
KIND_NAMES = ("PAD", "BOS", "EOS", "UNK", "BAR", "REST", "NOTE")
SPECIAL_KINDS = (PAD, BOS, EOS, UNK)

DNA_FLOATS = 7


class TokenizerError(ValueError):
    """A tokenizer input or file that cannot be used; the message says why."""


@dataclass(frozen=True)
class TokenizerConfig:
    """Every tokenizer setting. Saved inside ``tokenizer.json``.

    The defaults were chosen by measuring the Bach corpus (see README, "Tokenizer grid").
    """

    grid_per_beat: int = 12
    """Onset grid steps per quarter note: 12 holds sixteenths and eighth/sixteenth triplets."""
    durations: tuple[str, ...] = (
        "1/8", "1/6", "1/4", "1/3", "3/8", "1/2", "2/3", "3/4", "1", "3/2", "2", "3", "4", "6", "8")
    """Duration grid in quarter notes; note and rest durations snap to the nearest in log2."""
    velocity_levels: tuple[int, ...] = (16, 32, 48, 64, 80, 96, 112, 127)
    """MIDI velocities kept: ppp pp p mp mf f ff fff. A note keeps the nearest level."""
    max_voices: int = 16
    """Voices kept apart; voices above this share the last one."""
    min_count: int = 1
    """A NOTE/REST key seen fewer times than this in the fitting corpus stays out of the vocabulary."""

    def __post_init__(self) -> None:
        if self.grid_per_beat < 1:
            raise TokenizerError("grid_per_beat must be at least 1")
        if not self.durations or any(Fraction(d) <= 0 for d in self.durations):
            raise TokenizerError("durations must be positive fractions of a quarter note")
        if list(self.durations) != sorted(self.durations, key=Fraction):
            raise TokenizerError("durations must be in increasing order")
        if not self.velocity_levels or any(not 1 <= v <= 127 for v in self.velocity_levels):
            raise TokenizerError("velocity levels must lie in 1..127")
        if not 1 <= self.max_voices <= 64:
            raise TokenizerError("max_voices must lie in 1..64")

    @property
    def duration_beats(self) -> list[Fraction]:
        return [Fraction(d) for d in self.durations]

    @property
    def resolution(self) -> int:
        """Time steps per quarter note of the internal timeline: holds the grid and every duration."""
        res = self.grid_per_beat
        for d in self.duration_beats:
            res = math.lcm(res, d.denominator)
        return res

    @property
    def voice_slots(self) -> int:
        """Size of the voice-embedding table: note voices, then REST, BAR, BOS, EOS, UNK, PAD."""
        return self.max_voices + 6

    @classmethod
    def from_dict(cls, data: dict) -> "TokenizerConfig":
        known = set(cls.__dataclass_fields__)
        unknown = set(data) - known
        if unknown:
            raise TokenizerError(f"unknown tokenizer settings: {sorted(unknown)}")
        data = dict(data)
        for name in ("durations", "velocity_levels"):
            if name in data:
                data[name] = tuple(data[name])
        return cls(**data)


class TokenKey(NamedTuple):
    """Token identity. NOTE: (NOTE, pitch, duration index, position); REST: (REST, -1, duration
    index, position); BAR: (BAR, numerator, denominator, 0); specials: (kind, -1, -1, -1)."""

    kind: int
    a: int
    b: int
    c: int

    def __str__(self) -> str:
        if self.kind == NOTE:
            return f"NOTE_{self.a}_d{self.b}_p{self.c}"
        if self.kind == REST:
            return f"REST_d{self.b}_p{self.c}"
        if self.kind == BAR:
            return f"BAR_{self.a}/{self.b}"
        return f"<{KIND_NAMES[self.kind]}>"

    @classmethod
    def parse(cls, text: str) -> "TokenKey":
        try:
            if text.startswith("<") and text.endswith(">"):
                return special_key(KIND_NAMES.index(text[1:-1]))
            head, *parts = text.split("_")
            if head == "NOTE":
                return cls(NOTE, int(parts[0]), int(parts[1][1:]), int(parts[2][1:]))
            if head == "REST":
                return cls(REST, -1, int(parts[0][1:]), int(parts[1][1:]))
            if head == "BAR":
                num, den = parts[0].split("/")
                return cls(BAR, int(num), int(den), 0)
        except (ValueError, IndexError):
            pass
        raise TokenizerError(f"not a token: {text!r}")


def special_key(kind: int) -> TokenKey:
    return TokenKey(kind, -1, -1, -1)


@dataclass
class Events:
    """A piece on the tokenizer's grid, before vocabulary lookup (what the corpus cache stores).

    One row per event: ``kind, a, b, c`` form its :class:`TokenKey`; ``velocity`` is a level
    index and ``voice`` a voice index (0 for non-notes).
    """

    kind: np.ndarray
    a: np.ndarray
    b: np.ndarray
    c: np.ndarray
    velocity: np.ndarray
    voice: np.ndarray
    problems: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.kind)

    def keys(self) -> Iterable[TokenKey]:
        return map(TokenKey, self.kind.tolist(), self.a.tolist(), self.b.tolist(), self.c.tolist())

    def arrays(self) -> dict[str, np.ndarray]:
        return {name: getattr(self, name) for name in ("kind", "a", "b", "c", "velocity", "voice")}

    @property
    def note_count(self) -> int:
        return int(np.count_nonzero(self.kind == NOTE))

    def transposed(self, semitones: int) -> "Events | None":
        """The same piece with every note moved by ``semitones``; None if a note would leave 0-127."""
        notes = self.kind == NOTE
        pitches = self.a[notes] + semitones
        if pitches.size and (pitches.min() < 0 or pitches.max() > 127):
            return None
        a = self.a.copy()
        a[notes] = pitches
        return Events(self.kind, a, self.b, self.c, self.velocity, self.voice, list(self.problems))

    def transpositions(self, semitones: int) -> list["Events"]:
        """This piece first, then each transposition by -semitones..+semitones that stays in 0-127."""
        shifts = [s for s in range(-semitones, semitones + 1) if s != 0]
        return [self] + [t for t in (self.transposed(s) for s in shifts) if t is not None]


@dataclass
class TokenSequence:
    """Token ids with each event's velocity level and voice, as the model reads them."""

    ids: np.ndarray
    velocity: np.ndarray
    voice: np.ndarray
    unknown: int = 0
    """Notes that fell outside the vocabulary and became UNK."""
    approximated: int = 0
    """Notes whose duration was moved to the nearest one in the vocabulary."""

    def __len__(self) -> int:
        return len(self.ids)


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
        self._log_range = (float(self._log_durations[0]),
                           float(self._log_durations[-1] - self._log_durations[0]) or 1.0)
        self._res = self.config.resolution
        self._step = self._res // self.config.grid_per_beat  # internal steps per grid step
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
        self._dna_static = self._build_dna_static()
        self._kinds = np.array([k.kind for k in self.vocab], dtype=np.int64)
        self._positions = np.array([max(k.c, 0) for k in self.vocab], dtype=np.float64)
        self._bar_lengths = np.array([self.bar_length(t) or 0 for t in range(len(self.vocab))],
                                     dtype=np.float64)

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

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
    def events(self, score: Score) -> Events:
        """Place a score on the grid: BAR, REST and NOTE events in stream order (no BOS/EOS)."""
        if not score.notes:
            raise TokenizerError(f"{score.source}: the score holds no notes")
        cfg = self.config
        tpb = score.ticks_per_beat
        grid = cfg.grid_per_beat
        problems: Counter[str] = Counter()

        onsets = [_round_div(n.onset_tick * grid, tpb) for n in score.notes]
        dur_index = [self.snap_duration(n.duration_beat) for n in score.notes]
        # Silence is judged on the notes' real ends (on the internal grid), not snapped durations.
        res = self._res
        ends = [max(_round_div((n.onset_tick + n.duration_tick) * res, tpb), on * self._step + 1)
                for n, on in zip(score.notes, onsets)]
        bars = self._bars(score, max(onsets), problems)
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

    def encode(self, score: Score) -> TokenSequence:
        return self.encode_events(self.events(score))

    def from_midi(self, source: str | Path | bytes) -> TokenSequence:
        return self.encode(read_midi(source))

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

    def _bars(self, score: Score, last_onset: int, problems: Counter[str]) -> list[_Bar]:
        """Bar lines in grid steps from the time-signature map, up to the bar holding last_onset.

        A signature change that falls inside a bar takes effect at the next bar line.
        """
        grid = self.config.grid_per_beat
        changes = [(_round_div(ts.tick * grid, score.ticks_per_beat), ts.numerator, ts.denominator)
                   for ts in score.time_signatures]
        bars: list[_Bar] = []
        start = 0
        num, den = changes[0][1:] if changes and changes[0][0] == 0 else (4, 4)
        pending = [c for c in changes if c[0] > 0]
        while start <= last_onset:
            while pending and pending[0][0] <= start:
                if pending[0][0] < start:
                    problems["time signatures inside a bar moved to the next bar line"] += 1
                num, den = pending.pop(0)[1:]
            length = Fraction(4 * grid * num, den)
            if length.denominator != 1 or length <= 0:
                problems[f"bars of {num}/{den} rounded to the grid"] += 1
                length = max(1, math.ceil(length))
            bars.append(_Bar(start, int(length), num, den))
            start += int(length)
        return bars

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
            grid_pos = _round_div(start, step)
            bar = bars[bisect.bisect_right(bar_starts, grid_pos) - 1]
            stop = min(end, (bar.start + bar.length) * step)
            d = self.snap_duration((stop - start) / self._res)
            yield (grid_pos * step, 1, REST, -1, d, grid_pos - bar.start, 0, 0)
            start = stop

    # ----------------------------------------------------------------- decoding
    def decode(self, sequence: TokenSequence | Iterable[int], *, ticks_per_beat: int = 480,
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
        scale = Fraction(ticks_per_beat, self._res)
        if scale.denominator != 1:
            raise TokenizerError(
                f"ticks_per_beat {ticks_per_beat} must be a multiple of {self._res}")
        k = int(scale)
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
    def _build_dna_static(self) -> np.ndarray:
        """Per vocabulary entry: pitch-class sin/cos, octave, log-duration, and the kind."""
        table = np.zeros((len(self.vocab), 4), dtype=np.float32)
        for i, key in enumerate(self.vocab):
            if key.kind == NOTE:
                angle = 2 * math.pi * (key.a % 12) / 12
                table[i, 0:3] = math.sin(angle), math.cos(angle), (key.a // 12) / 10
            if key.kind in (NOTE, REST):
                table[i, 3] = self._scaled_log_duration(float(self._durations[key.b]))
            elif key.kind == BAR:
                table[i, 3] = self._scaled_log_duration(4 * key.a / key.b)
        return table

    def _scaled_log_duration(self, beats: float) -> float:
        low, span = self._log_range
        return (math.log2(beats) - low) / span

    def bar_length(self, token: int) -> int | None:
        """Grid steps of the bar a BAR token opens (None for other tokens)."""
        key = self.vocab[token]
        if key.kind != BAR:
            return None
        return max(1, math.ceil(Fraction(4 * self.config.grid_per_beat * key.a, key.b)))

    def kinds(self, ids: np.ndarray) -> np.ndarray:
        """Token kind (PAD, BOS, EOS, UNK, BAR, REST, NOTE) of every id."""
        return self._kinds[ids]

    def dna(self, sequence: TokenSequence) -> tuple[np.ndarray, np.ndarray]:
        """DNA of every event of a stream: ``(floats (T, 7) float32, voice slots (T,) int64)``."""
        ids = np.asarray(sequence.ids)
        # Bar length in force at each event: forward-fill the lengths of BAR tokens (4/4 before any).
        at_bar = np.where(self._kinds[ids] == BAR, np.arange(len(ids)), -1)
        last_bar = np.maximum.accumulate(at_bar) if len(ids) else at_bar
        bar_len = np.where(last_bar >= 0, self._bar_lengths[ids[np.maximum(last_bar, 0)]],
                           self.default_bar_length)
        return self.token_dna(ids, sequence.velocity, sequence.voice, bar_len)

    @property
    def default_bar_length(self) -> int:
        """Grid steps of the 4/4 bar assumed before any BAR token."""
        return 4 * self.config.grid_per_beat

    def token_dna(self, ids: np.ndarray, velocity: np.ndarray, voice: np.ndarray,
                  bar_length: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """DNA of tokens given the bar length in force for each (the generation-time entry point;
        :meth:`dna` computes the bar lengths of a whole stream and calls this)."""
        ids = np.asarray(ids)
        kinds = self._kinds[ids]
        floats = np.zeros((len(ids), DNA_FLOATS), dtype=np.float32)
        floats[:, :4] = self._dna_static[ids]
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


class DecodedNote(NamedTuple):
    onset: int  # internal steps (``TokenizerConfig.resolution`` per quarter note)
    duration: int
    pitch: int
    velocity: int
    voice: int
    bar: int
    position: int  # grid steps from the bar start


class StreamDecoder:
    """Turns tokens into timed notes one at a time (used by :meth:`Tokenizer.decode` and streams).

    Tracks the current bar, so the server can place each generated note and build its DNA.
    Tokens before the first BAR are placed in a 4/4 bar starting at 0.
    """

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self.bar = -1
        self.bar_start = 0  # grid steps
        self.bar_length = 4 * tokenizer.config.grid_per_beat
        self.signature = (4, 4)
        self.signatures: list[tuple[int, int, int]] = []  # (start in internal steps, num, den)
        self.cursor = 0  # grid steps: onset of the latest BAR, NOTE or REST
        self.notes_at_cursor = 0  # NOTE tokens so far at the cursor's onset (the chord's size)

    @property
    def bar_end(self) -> int:
        """Grid step where the current bar ends."""
        return self.bar_start + self.bar_length if self.bar >= 0 else self.bar_length

    def push(self, token: int, velocity: int = 0, voice: int = 0) -> DecodedNote | None:
        tok = self.tokenizer
        if not 0 <= token < tok.vocab_size:
            raise TokenizerError(f"token id {token} outside the vocabulary (size {tok.vocab_size})")
        key = tok.vocab[token]
        if key.kind == BAR:
            if self.bar >= 0:
                self.bar_start += self.bar_length
            self.bar += 1
            self.bar_length = tok.bar_length(token)
            if not self.signatures or self.signatures[-1][1:] != (key.a, key.b):
                self.signatures.append((self.bar_start * tok._step, key.a, key.b))
            self.signature = (key.a, key.b)
            self.cursor = self.bar_start
            self.notes_at_cursor = 0
            return None
        if key.kind == REST:
            if self.bar_start + key.c != self.cursor:
                self.notes_at_cursor = 0
            self.cursor = self.bar_start + key.c
        if key.kind != NOTE:
            return None
        onset = self.bar_start + key.c
        self.notes_at_cursor = self.notes_at_cursor + 1 if onset == self.cursor else 1
        self.cursor = onset
        levels = tok.config.velocity_levels
        return DecodedNote(
            onset=(self.bar_start + key.c) * tok._step,
            duration=tok._duration_steps[key.b],
            pitch=key.a,
            velocity=levels[min(max(velocity, 0), len(levels) - 1)],
            voice=voice,
            bar=max(self.bar, 0),
            position=key.c,
        )


    def encode_notes(self, notes: Iterable[tuple[int, int, float, int, int]]) -> TokenSequence:
        """Append notes to the stream: ``(onset in grid steps, pitch, duration in beats, MIDI
        velocity, voice)`` on this stream's timeline, in any order.

        Onsets before :attr:`cursor` are moved up to it (a stream only moves forward); an onset the
        vocabulary has no token for (for that pitch) moves to the next 16th, 8th or beat, or a beat
        later, inside its bar; BAR tokens
        of the current signature are emitted where the notes cross bar lines. The tokens are pushed
        into this decoder and returned (ids, velocity levels, voices) for the model to read;
        notes with no vocabulary entry are left out and counted in ``unknown``.
        """
        tok = self.tokenizer
        ids: list[int] = []
        velocities: list[int] = []
        voices: list[int] = []
        unknown = 0
        grid = tok.config.grid_per_beat
        snaps = sorted({1, max(1, grid // 4), max(1, grid // 2), grid})
        bar_token = tok.lookup(TokenKey(BAR, *self.signature, 0))
        for onset, pitch, beats, velocity, voice in sorted(notes, key=lambda n: (n[0], n[4], -n[1])):
            onset = max(int(onset), self.cursor)
            while self.bar < 0 or onset >= self.bar_end:
                if bar_token == UNK:
                    raise TokenizerError(f"the vocabulary has no BAR_{self.signature[0]}/{self.signature[1]}")
                self.push(bar_token)
                ids.append(bar_token), velocities.append(0), voices.append(0)
            voice = min(max(int(voice), 0), tok.config.max_voices - 1)
            level = tok.velocity_level(velocity)
            token = UNK
            # the exact onset, then the next 16th, 8th and beat, then a beat later (within the bar)
            candidates = sorted({onset, onset + grid} | {(onset // step + 1) * step for step in snaps[1:]})
            for at in candidates:
                if at >= self.bar_end:
                    break
                token = tok.lookup(TokenKey(NOTE, int(pitch), tok.snap_duration(beats), at - self.bar_start))
                if token != UNK:
                    break
            if token == UNK:  # a pitch (or a position) the vocabulary never saw: counted, not read
                unknown += 1
                continue
            self.push(token, level, voice)
            ids.append(token), velocities.append(level), voices.append(voice)
        as_array = lambda values: np.asarray(values, dtype=np.int64)
        return TokenSequence(as_array(ids), as_array(velocities), as_array(voices), unknown=unknown)


def _round_div(numerator: int, denominator: int) -> int:
    """numerator / denominator rounded half up (the same way for every file)."""
    return (2 * numerator + denominator) // (2 * denominator)


# --------------------------------------------------------------------------- command line
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m model.tokenizer",
        description="Inspect what the tokenizer keeps of MIDI files.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    rt = sub.add_parser("roundtrip", help="write the MIDI file that IN's tokens decode to",
                        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    rt.add_argument("input", help="MIDI file to tokenize")
    rt.add_argument("output", help="MIDI file to write")
    rt.add_argument("--tokenizer", default=None,
                    help="tokenizer.json to use (default: a vocabulary fitted on IN itself)")
    st = sub.add_parser("stats", help="print the round-trip fidelity table of a MIDI folder",
                        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    st.add_argument("midi_dir", help="folder of MIDI files (searched recursively)")
    st.add_argument("--tokenizer", default=None,
                    help="tokenizer.json to use (default: a vocabulary fitted on the folder)")
    st.add_argument("--cache_dir", default=None, help="token cache (default: see model.data)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")

    from model import fidelity  # the report needs the corpus reader, which needs this module

    try:
        if args.command == "roundtrip":
            print(fidelity.roundtrip_file(args.input, args.output, args.tokenizer))
        else:
            print(fidelity.folder_table(args.midi_dir, args.tokenizer, args.cache_dir))
    except (TokenizerError, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
