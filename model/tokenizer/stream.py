"""The stream decoder: tokens to timed notes one at a time, and played notes to tokens.

A live stream (a server session, a generated file) keeps one :class:`StreamDecoder`: it knows the
current bar (its start, length and signature), the onset of the latest token, the size of the
chord there and each voice's latest note (its :class:`~model.tokenizer.voice_register.VoiceRegister`),
so each generated token becomes a timed note, the next token's DNA gets its bar length and the
voice register, and the grammar mask (:mod:`model.generation.grammar`) knows what may come next.
"""

from __future__ import annotations

import copy
import math
from typing import TYPE_CHECKING, Iterable, NamedTuple

import numpy as np

from model.tokenizer.sequences import TokenSequence
from model.tokenizer.vocabulary import BAR, NOTE, REST, UNK, TokenizerError, TokenKey
from model.tokenizer.voice_register import (REGISTER_VOICES, VoiceRegister, chord_voices, register_features,
                                            stacked_features)

if TYPE_CHECKING:
    from model.tokenizer.tokenizer import Tokenizer

CHORD_HABIT_DECAY = math.exp(-1 / 30)  # per chord note: the habit follows the latest ~30 of them
CHORD_HABIT_MIN_NOTES = 2.0  # chord notes (decayed) before the habit says anything


class DecodedNote(NamedTuple):
    onset: int  # internal steps (``TokenizerConfig.resolution`` per quarter note)
    duration: int
    pitch: int
    velocity: int
    voice: int
    bar: int
    position: int  # grid steps from the bar start


def register_rows(decoders: list["StreamDecoder"]) -> np.ndarray:
    """``(B, REGISTER_FLOATS)``: each decoder's :meth:`StreamDecoder.register_features`, in one pass."""
    if not decoders:
        return stacked_features([], np.zeros(0, np.int64), 1)
    timebase = decoders[0].tokenizer.timebase
    cursors = np.array([timebase.steps_from_grid(d.cursor) for d in decoders], dtype=np.int64)
    return stacked_features([d.register for d in decoders], cursors, decoders[0].tokenizer.config.resolution)


def chord_rows(decoders: list["StreamDecoder"], tokens: list[int]) -> np.ndarray:
    """``(B, REGISTER_VOICES)``: per decoder, the voices already playing at the onset where its
    next token (``tokens``) would start (:func:`~model.tokenizer.voice_register.chord_voices`)."""
    onsets = np.array([d.note_onset(t) for d, t in zip(decoders, tokens)], dtype=np.int64)
    rows = [d.register.onset for d in decoders]
    return chord_voices(np.stack(rows) if rows else np.zeros((0, REGISTER_VOICES), np.int64), onsets)


class StreamReading(NamedTuple):
    """What reading a stream from its start gives per token (:meth:`StreamDecoder.contexts`)."""

    bar_lengths: np.ndarray  # (T,) grid steps of the bar in force after each token
    register: np.ndarray  # (T, REGISTER_FLOATS) the voice register's features after each token
    chords: np.ndarray  # (T, REGISTER_VOICES) the voices already playing where each token starts


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
        self.pitches_at_cursor: tuple[int, ...] = ()  # pitches of the NOTE tokens so far at the cursor's onset
        self.register = VoiceRegister()  # each voice's latest note
        # Notes that joined a chord, and those of them that joined a voice already striking there,
        # each count decayed by CHORD_HABIT_DECAY per chord note (:attr:`chords_in_one_voice`).
        self.chord_notes = 0.0
        self.chord_notes_in_one_voice = 0.0

    def copy(self) -> "StreamDecoder":
        """An independent decoder in the same place (the tokenizer is shared)."""
        twin = copy.copy(self)
        twin.signatures = list(self.signatures)
        twin.register = self.register.copy()
        return twin

    def restore(self, saved: "StreamDecoder") -> None:
        """Go back to the place of ``saved`` (a :meth:`copy`)."""
        self.__dict__.update(saved.copy().__dict__)

    def state(self) -> dict:
        """Where this decoder stands, as JSON-ready values (:meth:`from_state` reads them back)."""
        return {"bar": self.bar, "bar_start": self.bar_start, "bar_length": self.bar_length,
                "signature": list(self.signature), "signatures": [list(s) for s in self.signatures],
                "cursor": self.cursor, "notes_at_cursor": self.notes_at_cursor,  # for readers before pitches_at_cursor
                "pitches_at_cursor": list(self.pitches_at_cursor), "register": self.register.state(),
                "chord_habit": [self.chord_notes, self.chord_notes_in_one_voice]}

    @classmethod
    def from_state(cls, tokenizer: Tokenizer, state: dict) -> "StreamDecoder":
        """A decoder standing where :meth:`state` said (raises ``TokenizerError`` on a malformed one)."""
        decoder = cls(tokenizer)
        try:
            decoder.bar, decoder.bar_start, decoder.bar_length = (int(state[k]) for k in ("bar", "bar_start",
                                                                                              "bar_length"))
            num, den = (int(v) for v in state["signature"])
            decoder.signature = (num, den)
            decoder.signatures = [(int(a), int(b), int(c)) for a, b, c in state["signatures"]]
            decoder.cursor = int(state["cursor"])
            decoder.register = VoiceRegister.from_state(state["register"])
            # absent from states saved before it existed (they kept only the count): no chord yet
            decoder.pitches_at_cursor = tuple(int(p) for p in state.get("pitches_at_cursor", ()))
            if not all(0 <= p <= 127 for p in decoder.pitches_at_cursor):
                raise ValueError("pitches_at_cursor must be MIDI pitches")
            # absent from states saved before it existed: no chord seen yet
            chords, in_one_voice = (float(v) for v in state.get("chord_habit", (0.0, 0.0)))
            if not (0 <= in_one_voice <= chords < math.inf):
                raise ValueError("chord_habit must be two counts, the second at most the first")
            decoder.chord_notes, decoder.chord_notes_in_one_voice = chords, in_one_voice
        except (KeyError, TypeError, ValueError) as exc:
            raise TokenizerError(f"a malformed stream decoder state: {exc}") from exc
        if decoder.bar_length < 1:
            raise TokenizerError("a malformed stream decoder state: bar_length must be at least 1")
        return decoder

    @property
    def notes_at_cursor(self) -> int:
        """NOTE tokens so far at the cursor's onset (the chord's size)."""
        return len(self.pitches_at_cursor)

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
                self.signatures.append((tok.timebase.steps_from_grid(self.bar_start), key.a, key.b))
            self.signature = (key.a, key.b)
            self.cursor = self.bar_start
            self.pitches_at_cursor = ()
            return None
        if key.kind == REST:
            if self.bar_start + key.c != self.cursor:
                self.pitches_at_cursor = ()
            self.cursor = self.bar_start + key.c
        if key.kind != NOTE:
            return None
        onset = self.bar_start + key.c
        self.pitches_at_cursor = (self.pitches_at_cursor if onset == self.cursor else ()) + (key.a,)
        self.cursor = onset
        levels = tok.config.velocity_levels
        note = DecodedNote(
            onset=tok.timebase.steps_from_grid(self.bar_start + key.c),
            duration=tok.duration_steps(key.b),
            pitch=key.a,
            velocity=levels[min(max(velocity, 0), len(levels) - 1)],
            voice=voice,
            bar=max(self.bar, 0),
            position=key.c,
        )
        if self.notes_at_cursor > 1:  # joins a chord
            voice_struck = self.register.onset[min(max(voice, 0), REGISTER_VOICES - 1)] == note.onset
            self.chord_notes = self.chord_notes * CHORD_HABIT_DECAY + 1
            self.chord_notes_in_one_voice = self.chord_notes_in_one_voice * CHORD_HABIT_DECAY + voice_struck
        self.register.note(voice, note.pitch, note.onset, note.onset + note.duration)
        return note

    @property
    def chords_in_one_voice(self) -> float | None:
        """Of the notes that joined a chord in this stream lately (a memory of about 30), the share
        that joined a voice already striking there: near 1 for music that writes a hand's chords as
        one voice, near 0 for music in parts. None before :data:`CHORD_HABIT_MIN_NOTES` such notes."""
        if self.chord_notes < CHORD_HABIT_MIN_NOTES:
            return None
        return self.chord_notes_in_one_voice / self.chord_notes

    def note_onset(self, token: int) -> int:
        """Internal step where ``token`` would start if it came next (-2 when it is no note)."""
        key = self.tokenizer.vocab[token]
        if key.kind != NOTE:
            return -2
        return self.tokenizer.timebase.steps_from_grid(self.bar_start + key.c)

    def register_features(self) -> np.ndarray:
        """The voice register's features at the cursor (:mod:`model.tokenizer.voice_register`)."""
        return self.register.features(self.tokenizer.timebase.steps_from_grid(self.cursor),
                                      self.tokenizer.config.resolution)

    def contexts(self, sequence: TokenSequence) -> StreamReading:
        """Push ``sequence`` into this decoder; per token, what its DNA needs from the stream after
        it (the bar length in force and the voice register's features) and, for the note head, the
        voices already playing where it starts (:class:`StreamReading`)."""
        steps, lengths = np.empty(len(sequence), dtype=np.int64), np.empty(len(sequence), dtype=np.float64)
        first_onsets = self.register.onset.copy()
        rows = {name: np.empty((len(sequence),) + getattr(self.register, name).shape,
                               dtype=getattr(self.register, name).dtype)
                for name in ("pitch", "previous", "end", "recent", "onset")}
        timebase = self.tokenizer.timebase
        for i, (token, velocity, voice) in enumerate(zip(sequence.ids.tolist(), sequence.velocity.tolist(),
                                                         sequence.voice.tolist())):
            self.push(token, velocity, voice)
            lengths[i], steps[i] = self.bar_length, timebase.steps_from_grid(self.cursor)
            for name, row in rows.items():
                row[i] = getattr(self.register, name)
        features = register_features(rows["pitch"], rows["previous"], rows["end"], rows["recent"], steps,
                                     self.tokenizer.config.resolution)
        # A note's onset is the cursor once it is pushed; the voices' onsets before it, the row after
        # the token before.
        starts = np.where(self.tokenizer.kinds(sequence.ids) == NOTE, steps, -2)
        before = np.concatenate([first_onsets[None], rows["onset"]])[:len(sequence)]
        return StreamReading(lengths, features, chord_voices(before, starts))

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
