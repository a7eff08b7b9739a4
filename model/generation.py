"""Batched generation: many streams, each one field, advanced together one token at a time.

Used by ``python -m model.generate`` and by the server's engine. Per stream the host keeps a
:class:`model.tokenizer.StreamDecoder` (bar position, for timing and for the beat angle of the
next token's DNA); the device keeps the :class:`model.fm.FieldState` rows. A generated token's
DNA is built with :meth:`Tokenizer.token_dna` from the token, the velocity and voice the model's
heads chose, and the bar length in force, exactly as :meth:`Tokenizer.dna` builds it for training.

Sampling keeps to the token grammar every training sequence obeys: a BAR comes before any NOTE or
REST; inside a bar, NOTE and REST positions never go back and never reach the bar's end (a new
bar needs a BAR token); at most ``max_voices`` notes (16; the Bach corpus's largest chord has 13)
start together. Tokens that would
break it are masked per stream before sampling, from the stream's decoder (its position in the
bar, the bar's length, the notes already at that position). Without the mask a stream can fall
into stacking notes on one position or past the bar's end, where time stops: the shipped model
did so for some seeds (up to 113 notes per beat), and a live stream would ask for tokens forever.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from model.fm import FieldMachine, FieldState, FMOutput
from model.key_pull import heard_counts, note_pitch_classes, pitch_class_matrix, pull_toward_heard
from model.sampling import SamplingBatch, SamplingConfig, sample
from model.tokenizer import (BOS, EOS, NOTE, PAD, REST, UNK, DecodedNote, StreamDecoder, Tokenizer,
                             TokenSequence)

NEVER_SAMPLED = (PAD, BOS, UNK)
MAX_ORDER_ROWS = 4096  # cached grammar-mask rows (16 KB each for a 16k vocabulary)


@dataclass
class StreamStep:
    """What one stream produced in one step."""

    token: int
    velocity: int  # level index
    voice: int
    note: DecodedNote | None


class BatchGenerator:
    """Primes and advances a batch of streams. Not thread-safe: one owner calls it."""

    def __init__(self, model: FieldMachine, tokenizer: Tokenizer, *, allow_eos: bool = False) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.device = next(model.parameters()).device
        self.banned = torch.tensor(NEVER_SAMPLED + (() if allow_eos else (EOS,)), device=self.device)
        self._pitch_classes = note_pitch_classes(tokenizer)
        self.pitch_class_rows = pitch_class_matrix(self._pitch_classes).to(self.device)
        ids = np.arange(tokenizer.vocab_size)
        timed = np.isin(tokenizer.kinds(ids), (NOTE, REST))
        positions = np.array([tokenizer.vocab[t].c for t in ids.tolist()], dtype=np.int64)
        self.token_position = torch.from_numpy(np.where(timed, positions, -1)).to(self.device)
        self.is_note = torch.from_numpy(tokenizer.kinds(ids) == NOTE).to(self.device)
        self._order_rows: dict[tuple[int, int, bool], torch.Tensor] = {}

    def heard(self, ids: np.ndarray) -> np.ndarray:
        """``(12,)`` pitch-class counts of the notes in ``ids`` (a prompt, notes played in): what
        :meth:`advance`'s ``heard`` adds up. See :mod:`model.key_pull`."""
        return heard_counts(ids, self._pitch_classes)

    def out_of_order(self, decoders: list[StreamDecoder]) -> torch.Tensor:
        """``(B, V)`` True where a NOTE or REST would go back in its bar or past the bar's end, or a
        NOTE would join a chord of ``max_voices`` notes. Streams share few distinct situations, so
        each situation's ``(V,)`` row is built once and kept."""
        full = self.tokenizer.config.max_voices
        rows = []
        for d in decoders:
            # before the first BAR no NOTE or REST (every sequence opens with a bar): "now" is the bar's end
            key = (d.cursor - d.bar_start if d.bar >= 0 else d.bar_length, d.bar_length, d.notes_at_cursor >= full)
            row = self._order_rows.get(key)
            if row is None:
                if len(self._order_rows) >= MAX_ORDER_ROWS:
                    self._order_rows.clear()
                row = self._order_rows[key] = self._out_of_order_row(*key)
            rows.append(row)
        return torch.stack(rows)

    def _out_of_order_row(self, now: int, bar_length: int, chord_full: bool) -> torch.Tensor:
        position = self.token_position
        late = (position < now) | (position >= bar_length)
        if chord_full:
            late |= self.is_note & (position == now)
        return (position >= 0) & late

    def _tensors(self, floats: np.ndarray, slots: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        return (torch.from_numpy(floats).to(self.device), torch.from_numpy(slots).to(self.device))

    def with_bos(self, prompt: TokenSequence | None) -> TokenSequence:
        """The prompt as the model reads it: BOS first (added if missing), no trailing EOS."""
        if prompt is None or len(prompt) == 0:
            return TokenSequence(np.array([BOS]), np.zeros(1, np.int64), np.zeros(1, np.int64))
        ids, vel, voice = prompt.ids, prompt.velocity, prompt.voice
        if ids[-1] == EOS:
            ids, vel, voice = ids[:-1], vel[:-1], voice[:-1]
        if ids[0] != BOS:
            zero = np.zeros(1, np.int64)
            ids, vel, voice = (np.concatenate([[BOS], ids]), np.concatenate([zero, vel]),
                               np.concatenate([zero, voice]))
        return TokenSequence(ids.astype(np.int64), vel.astype(np.int64), voice.astype(np.int64))

    def decoder_for(self, sequence: TokenSequence) -> StreamDecoder:
        """A stream decoder that has read ``sequence`` (its cursor sits after the last token)."""
        decoder = StreamDecoder(self.tokenizer)
        for t, v, s in zip(sequence.ids.tolist(), sequence.velocity.tolist(), sequence.voice.tolist()):
            decoder.push(t, v, s)
        return decoder

    @torch.no_grad()
    def prime(self, prompt: TokenSequence | None) -> tuple[FieldState, FMOutput, StreamDecoder]:
        """Read a prompt (BOS is added if missing; EOS dropped) in one parallel pass.

        Returns the stream's state, the output predicting its next token, and its decoder.
        """
        sequence = self.with_bos(prompt)
        decoder = self.decoder_for(sequence)
        floats, slots = self.tokenizer.dna(sequence)
        dna, slot = self._tensors(floats[None], slots[None])
        out, state = self.model(dna, slot, return_state=True)
        last = FMOutput(out.logits[:, -1], out.velocity[:, -1], out.voice[:, -1])
        return state, last, decoder

    def prime_many(self, prompts: list[TokenSequence | None]) -> tuple[FieldState, FMOutput, list[StreamDecoder]]:
        """:meth:`prime` for several streams, stacked into one batch."""
        primed = [self.prime(p) for p in prompts]
        return (stack_states([p[0] for p in primed]), stack_outputs([p[1] for p in primed]),
                [p[2] for p in primed])

    def _step(self, state: FieldState, tokens: torch.Tensor, dna: torch.Tensor,
              slots: torch.Tensor) -> tuple[FMOutput, FieldState]:
        return self.model.step(state, dna, slots)

    @torch.no_grad()
    def advance(self, state: FieldState, out: FMOutput, decoders: list[StreamDecoder],
                sampling: list[SamplingConfig], steps: list[int],
                heard: torch.Tensor | None = None) -> tuple[list[StreamStep], FieldState, FMOutput]:
        """Sample every stream's next token from ``out`` and feed it back: one batched step.

        ``steps`` are the per-stream counters that, with each stream's seed, fix its randomness.
        ``heard``: ``(B, 12)`` pitch-class counts of what each stream heard (:meth:`heard`), which
        its ``key_pull`` leans toward; ``None``: nothing heard, no pull.
        """
        batch = SamplingBatch.from_configs(sampling, steps, device=self.device)
        logits = out.logits.float()
        if heard is not None:  # only streams that pull and heard something: for the rest it is a no-op
            heard = heard.to(self.device)
            rows = ((batch.key_pull > 0) & (heard.sum(dim=1) > 0)).nonzero().squeeze(1)
            if rows.numel() == len(sampling):
                logits = pull_toward_heard(logits, heard, batch.key_pull, self.pitch_class_rows)
            elif rows.numel():
                logits[rows] = pull_toward_heard(logits[rows], heard[rows], batch.key_pull[rows], self.pitch_class_rows)
        logits[:, self.banned] = float("-inf")
        logits.masked_fill_(self.out_of_order(decoders), float("-inf"))
        tokens = sample(logits, batch)
        velocity = out.velocity.argmax(-1)
        voice = out.voice.argmax(-1)
        tokens_np, velocity_np, voice_np = (t.cpu().numpy() for t in (tokens, velocity, voice))
        results = []
        bar_lengths = np.empty(len(decoders), dtype=np.float64)
        for i, decoder in enumerate(decoders):
            note = decoder.push(int(tokens_np[i]), int(velocity_np[i]), int(voice_np[i]))
            bar_lengths[i] = decoder.bar_length
            results.append(StreamStep(int(tokens_np[i]), int(velocity_np[i]), int(voice_np[i]), note))
        floats, slots = self.tokenizer.token_dna(tokens_np, velocity_np, voice_np, bar_lengths)
        dna, slot = self._tensors(floats, slots)
        new_out, new_state = self._step(state, tokens, dna, slot)
        return results, new_state, new_out


def stack_states(states: list[FieldState]) -> FieldState:
    return FieldState(torch.cat([s.field for s in states]), torch.cat([s.position for s in states]))


def stack_outputs(outputs: list[FMOutput]) -> FMOutput:
    return FMOutput(torch.cat([o.logits for o in outputs]), torch.cat([o.velocity for o in outputs]),
                    torch.cat([o.voice for o in outputs]))
