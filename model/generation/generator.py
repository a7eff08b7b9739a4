"""Batched generation: many streams, each one field, advanced together one token at a time.

Used by ``python -m model.generate`` and by the server's engine. Per stream the host keeps a
:class:`model.tokenizer.stream.StreamDecoder` (bar position, for timing and for the beat angle of the
next token's DNA); the device keeps the :class:`model.fm.state.FieldState` rows. A generated token's
DNA is built with :meth:`model.tokenizer.dna.TokenDNA.of_tokens` from the token, the velocity and voice the model's
heads chose, the bar length in force and the voice register, exactly as :meth:`Tokenizer.dna` builds
it for training.

One batched advance reads as: key pull (:mod:`.key_pull`) -> grammar mask (:mod:`.grammar`) ->
sample the token (:mod:`model.sampling`) -> sample the note's voice and velocity from the note
head given *that* token (:mod:`model.fm.note_head`), a chord's notes in voices of their own
(:mod:`.parts`), with the stream's own random numbers (other salts of the same step) and
temperature -> feed the tokens back.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from model.fm.machine import FieldMachine
from model.fm.state import FieldState, FMOutput, stack_outputs, stack_states
from model.generation.grammar import GrammarMask
from model.generation.parts import free_voices, keep_to_parts
from model.generation.key_pull import heard_counts, note_pitch_classes, pitch_class_matrix, pull_toward_heard
from model.sampling.batch import SamplingBatch
from model.sampling.config import SamplingConfig
from model.sampling.sample import sample
from model.tokenizer.sequences import TokenSequence
from model.tokenizer.stream import DecodedNote, StreamDecoder, chord_rows, register_rows
from model.tokenizer.tokenizer import Tokenizer
from model.tokenizer.vocabulary import BOS, EOS, PAD, UNK

NEVER_SAMPLED = (PAD, BOS, UNK)
VOICE_SALT, VELOCITY_SALT = 1, 2  # the token's draw uses salt 0 of the same (seed, step)


@dataclass
class StreamStep:
    """What one stream produced in one step."""

    token: int
    velocity: int  # level index
    voice: int
    note: DecodedNote | None


def with_bos(prompt: TokenSequence | None) -> TokenSequence:
    """A prompt as the model reads it: BOS first (added if missing), no trailing EOS."""
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


def decoder_for(tokenizer: Tokenizer, sequence: TokenSequence) -> StreamDecoder:
    """A stream decoder that has read ``sequence`` (its cursor sits after the last token)."""
    decoder = StreamDecoder(tokenizer)
    for t, v, s in zip(sequence.ids.tolist(), sequence.velocity.tolist(), sequence.voice.tolist()):
        decoder.push(t, v, s)
    return decoder


class BatchGenerator:
    """Primes and advances a batch of streams. Not thread-safe: one owner calls it."""

    def __init__(self, model: FieldMachine, tokenizer: Tokenizer, *, allow_eos: bool = False) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.device = next(model.parameters()).device
        self.banned = torch.tensor(NEVER_SAMPLED + (() if allow_eos else (EOS,)), device=self.device)
        self._pitch_classes = note_pitch_classes(tokenizer)
        self.pitch_class_rows = pitch_class_matrix(self._pitch_classes).to(self.device)
        self.grammar = GrammarMask(tokenizer, self.device)

    def heard(self, ids: np.ndarray) -> np.ndarray:
        """``(12,)`` pitch-class counts of the notes in ``ids`` (a prompt, notes played in): what
        :meth:`advance`'s ``heard`` adds up. See :mod:`model.generation.key_pull`."""
        return heard_counts(ids, self._pitch_classes)

    def tensors(self, floats: np.ndarray, slots: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """DNA floats and voice slots (numpy) as tensors on the model's device."""
        return (torch.from_numpy(np.ascontiguousarray(floats)).to(self.device),
                torch.from_numpy(np.ascontiguousarray(slots)).to(self.device))

    @torch.no_grad()
    def read(self, state: FieldState | None, floats: np.ndarray, slots: np.ndarray
             ) -> tuple[FieldState, FMOutput]:
        """Read tokens' DNA ``(B, T, DNA_FLOATS)`` and slots ``(B, T)`` in one parallel pass, from ``state``
        (``None``: empty streams). Returns the new state and the output after the last token."""
        dna, slot = self.tensors(floats, slots)
        out, new_state = self.model(dna, slot, start=state, return_state=True)
        return new_state, out.last()

    @torch.no_grad()
    def read_many(self, state: FieldState, chunks: list[tuple[np.ndarray, np.ndarray]]
                  ) -> tuple[FieldState, FMOutput]:
        """Read one chunk of tokens per stream, of different lengths, in one parallel pass: each
        ``(T_i, DNA_FLOATS)`` DNA with ``(T_i,)`` slots, right-padded; the states and outputs after each
        stream's own last token."""
        lengths = np.array([len(slots) for _, slots in chunks])
        floats = np.zeros((len(chunks), lengths.max(), chunks[0][0].shape[-1]), dtype=chunks[0][0].dtype)
        slots = np.zeros((len(chunks), lengths.max()), dtype=chunks[0][1].dtype)
        for i, (f, s) in enumerate(chunks):
            floats[i, : len(s)], slots[i, : len(s)] = f, s
        dna, slot = self.tensors(floats, slots)
        read = torch.from_numpy(lengths).to(self.device)
        out, new_state = self.model(dna, slot, start=state, return_state=True, lengths=read)
        return new_state, out.last(read)

    @torch.no_grad()
    def prime(self, prompt: TokenSequence | None) -> tuple[FieldState, FMOutput, StreamDecoder]:
        """Read a prompt (BOS is added if missing; EOS dropped) in one parallel pass.

        Returns the stream's state, the output predicting its next token, and its decoder.
        """
        sequence = with_bos(prompt)
        floats, slots = self.tokenizer.dna(sequence)
        state, last = self.read(None, floats[None], slots[None])
        return state, last, decoder_for(self.tokenizer, sequence)

    def prime_many(self, prompts: list[TokenSequence | None]) -> tuple[FieldState, FMOutput, list[StreamDecoder]]:
        """:meth:`prime` for several streams, stacked into one batch."""
        primed = [self.prime(p) for p in prompts]
        return (stack_states([p[0] for p in primed]), stack_outputs([p[1] for p in primed]),
                [p[2] for p in primed])

    # ------------------------------------------------------------------ one batched step
    @torch.no_grad()
    def advance(self, state: FieldState, out: FMOutput, decoders: list[StreamDecoder],
                sampling: list[SamplingConfig], steps: list[int],
                heard: torch.Tensor | None = None, banned_voices: torch.Tensor | None = None,
                answer_by: list[int | None] | None = None) -> tuple[list[StreamStep], FieldState, FMOutput]:
        """Sample every stream's next token from ``out`` and feed it back: one batched step
        (:meth:`choose`, then :meth:`feed`; the arguments are :meth:`choose`'s)."""
        results = self.choose(out, decoders, sampling, steps, heard, banned_voices, answer_by)
        new_out, new_state = self.feed(state, results, decoders)
        return results, new_state, new_out

    @torch.no_grad()
    def choose(self, out: FMOutput, decoders: list[StreamDecoder], sampling: list[SamplingConfig],
               steps: list[int], heard: torch.Tensor | None = None, banned_voices: torch.Tensor | None = None,
               answer_by: list[int | None] | None = None) -> list[StreamStep]:
        """Sample every stream's next token, voice and velocity from ``out`` and push them into its
        decoder; the model has not read them yet (:meth:`feed` does), so a server can hand the notes
        over before it pays for that step.

        ``steps`` are the per-stream counters that, with each stream's seed, fix its randomness.
        ``heard``: ``(B, 12)`` pitch-class counts of what each stream heard (:meth:`heard`), which
        its ``key_pull`` leans toward; ``None``: nothing heard, no pull. ``banned_voices``:
        ``(B, max_voices)`` bool, True where a stream never plays a voice; ``None``: none banned.
        ``answer_by``: per stream, the grid step its next note must start by (an answer to played
        notes, :meth:`GrammarMask.answer`), or None.
        """
        batch = SamplingBatch.from_configs(sampling, steps, device=self.device)
        logits = self.allowed_logits(out, decoders, batch, heard)
        if answer_by is not None:
            logits = self.answer_logits(logits, decoders, answer_by)
        tokens = sample(logits, batch)
        return self.push(tokens, *self.note_parts(tokens, out, decoders, batch, banned_voices), decoders)

    def allowed_logits(self, out: FMOutput, decoders: list[StreamDecoder], batch: SamplingBatch,
                       heard: torch.Tensor | None) -> torch.Tensor:
        """``(B, V)`` float32 logits after the key pull, ``-inf`` where the grammar forbids."""
        logits = out.logits.float()
        if heard is not None:  # only streams that pull and heard something: for the rest it is a no-op
            heard = heard.to(self.device)
            rows = ((batch.key_pull > 0) & (heard.sum(dim=1) > 0)).nonzero().squeeze(1)
            if rows.numel() == len(batch):
                logits = pull_toward_heard(logits, heard, batch.key_pull, self.pitch_class_rows)
            elif rows.numel():
                logits[rows] = pull_toward_heard(logits[rows], heard[rows], batch.key_pull[rows],
                                                 self.pitch_class_rows)
        logits[:, self.banned] = float("-inf")
        return logits.masked_fill_(self.grammar(decoders), float("-inf"))

    def answer_logits(self, logits: torch.Tensor, decoders: list[StreamDecoder], answer_by: list[int | None]
                      ) -> torch.Tensor:
        """``logits`` with the tokens that would answer later than ``answer_by`` masked, in the
        streams where some allowed token remains (elsewhere the answer cannot be hurried)."""
        late = self.grammar.answer(decoders, answer_by)
        if late is None:
            return logits
        hurried = logits.masked_fill(late, float("-inf"))
        feasible = torch.isfinite(hurried).any(dim=1, keepdim=True)
        return torch.where(feasible, hurried, logits)

    def note_parts(self, tokens: torch.Tensor, out: FMOutput, decoders: list[StreamDecoder], batch: SamplingBatch,
                   banned_voices: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The voice and velocity level of each stream's chosen token (B,), drawn from the note
        head given that token, the voice register the stream's decoder holds before it and the
        voices already playing where the token starts, with the stream's temperature and random
        numbers; never a voice ``banned_voices`` (B, max_voices) marks for its stream, and in music
        written in parts never a voice that already strikes there (:mod:`.parts`)."""
        register = torch.from_numpy(register_rows(decoders)).to(self.device)
        chords = torch.from_numpy(chord_rows(decoders, tokens.tolist())).to(self.device)
        voice_logits, velocity_logits = self.model.note_logits(out.hidden, tokens, register, chords)
        banned = None if banned_voices is None else banned_voices.cpu().numpy()
        masked = keep_to_parts(banned, free_voices(decoders, tokens.tolist(), voice_logits.shape[-1]))
        if masked is not None:
            masked = torch.from_numpy(masked).to(voice_logits.device)
            voice_logits = voice_logits.float().masked_fill(masked, float("-inf"))
        return (sample(voice_logits, batch, salt=VOICE_SALT),
                sample(velocity_logits, batch, salt=VELOCITY_SALT))

    def push(self, tokens: torch.Tensor, voice: torch.Tensor, velocity: torch.Tensor,
             decoders: list[StreamDecoder]) -> list[StreamStep]:
        """Push each stream's token, with its voice and velocity, into its stream's decoder."""
        tokens_np, velocity_np, voice_np = (t.cpu().numpy() for t in (tokens, velocity, voice))
        results = []
        for i, decoder in enumerate(decoders):
            token, level, v = int(tokens_np[i]), int(velocity_np[i]), int(voice_np[i])
            results.append(StreamStep(token, level, v, decoder.push(token, level, v)))
        return results

    def step_inputs(self, results: list[StreamStep], decoders: list[StreamDecoder]
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Each stream's new token as the model reads it: ids (B,), DNA floats (B, DNA_FLOATS) and
        voice slots (B,), the DNA with the bar length and voice register the stream's decoder now knows."""
        ids = np.array([r.token for r in results], dtype=np.int64)
        velocity = np.array([r.velocity for r in results], dtype=np.int64)
        voice = np.array([r.voice for r in results], dtype=np.int64)
        bar_lengths = np.array([d.bar_length for d in decoders], dtype=np.float64)
        floats, slots = self.tokenizer.token_dna.of_tokens(ids, velocity, voice, bar_lengths,
                                                           register_rows(decoders))
        return ids, floats, slots

    def feed(self, state: FieldState, results: list[StreamStep], decoders: list[StreamDecoder]
             ) -> tuple[FMOutput, FieldState]:
        """Read each stream's new token in one O(1) step; returns the outputs for the next token
        and the new state."""
        _, floats, slots = self.step_inputs(results, decoders)
        dna, slot = self.tensors(floats, slots)
        return self.model.step(state, dna, slot)
