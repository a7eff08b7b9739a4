"""A live stream's rollback point: where it goes back to when a person plays a note.

The engine (:mod:`server.engine`) keeps, per live stream, a **checkpoint** (its field, position and
heard counts in a second slab row, and here the decoder, the RNG step and the frontier at that
token) and the **log** of every token read since: generated tokens with the step they were sampled
at, played tokens marked :data:`PLAYED`. Going back to the latest note the client has been sent
means: keep the log up to that note (and every played token: what a person played is never
dropped), restore the checkpoint and read the kept tokens again (:func:`replay` gives their DNA and
the decoder after them). The log stays short: once :data:`FOLD_TOKENS` kept tokens have piled up
the engine reads them into the checkpoint row and drops them from the log.

Reading the kept tokens again is what an answer waits for (and what a fold costs), so the engine
also keeps the **recent states** (:class:`RecentStates`): the field, position and hidden state
after each of the stream's latest :data:`RECENT_STATES` reads, keyed by the log length they
follow. When the state after the kept tokens is among them, going back is a copy of it and only
the played notes are read; a fold is a copy too. Otherwise (an older point, a stream just
restored from a snapshot) the kept tokens are read again as above: the result is the same.

Memory per stream: the checkpoint row (as many bytes as the state), a decoder copy, at most
:data:`MAX_LOG` log entries of four integers, and at most :data:`RECENT_STATES` recent states
(``Engine.rollback_bytes`` counts the checkpoint row and the recent states).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch

from model.tokenizer.sequences import TokenSequence
from model.tokenizer.stream import StreamDecoder
from model.tokenizer.tokenizer import Tokenizer

PLAYED = -1  # the step of a played token in the log
FOLD_TOKENS = 32  # kept tokens that move the checkpoint forward
MAX_LOG = 512  # past this the oldest tokens are folded in even if not sent (a stream that sends nothing)
RECENT_STATES = 32  # states kept after the latest reads (more than a second of music is generated ahead)


class LoggedToken(NamedTuple):
    token: int
    velocity: int  # level index
    voice: int
    step: int  # the stream's step it was sampled at; PLAYED for a played token


@dataclass
class Checkpoint:
    """The host side of a stream's checkpoint (its field rows live in the engine's slab)."""

    decoder: StreamDecoder
    steps: int  # the stream's step counter there (fixes the randomness of the tokens after it)
    frontier: float  # beats


@dataclass
class Replayed:
    """The kept tokens read again from the checkpoint: the decoder after them, their DNA, the
    step counter and the frontier after them."""

    decoder: StreamDecoder
    floats: np.ndarray  # (T, DNA_FLOATS)
    slots: np.ndarray  # (T,)
    steps: int
    frontier: float


class RecentState(NamedTuple):
    """A stream's rows after it had read the first ``log_length`` tokens of its log."""

    log_length: int
    field: torch.Tensor  # (dim,)
    position: torch.Tensor  # ()
    hidden: torch.Tensor  # (width,): the model's output there is the heads of it


class RecentStates:
    """The states after a stream's latest reads (at most :data:`RECENT_STATES`, oldest dropped),
    each keyed by the length of the log it follows; the engine keeps them in step with the log."""

    def __init__(self, size: int = RECENT_STATES) -> None:
        self.states: deque[RecentState] = deque(maxlen=size)

    def __len__(self) -> int:
        return len(self.states)

    def record(self, log_length: int, field: torch.Tensor, position: torch.Tensor, hidden: torch.Tensor) -> None:
        """The state after the log's first ``log_length`` tokens (it replaces any later ones: the
        log was cut back to there)."""
        self.cut(log_length - 1)
        self.states.append(RecentState(log_length, field, position, hidden))

    def after(self, log_length: int) -> RecentState | None:
        """The state after the log's first ``log_length`` tokens, if it is still kept."""
        for state in reversed(self.states):
            if state.log_length == log_length:
                return state
            if state.log_length < log_length:
                return None
        return None

    def cut(self, log_length: int) -> None:
        """Forget the states after more than ``log_length`` tokens (the log was cut back to there)."""
        while self.states and self.states[-1].log_length > log_length:
            self.states.pop()

    def shift(self, tokens: int) -> None:
        """The log's first ``tokens`` went into the checkpoint: the keys move down with them (the
        states before the new checkpoint are dropped)."""
        kept = [s._replace(log_length=s.log_length - tokens) for s in self.states if s.log_length >= tokens]
        self.states.clear()
        self.states.extend(kept)

    def clear(self) -> None:
        self.states.clear()


def kept_prefix(log: list[LoggedToken], sent_step: int) -> list[LoggedToken]:
    """The log up to its last token that stays: a played token, or a generated one at or before
    the latest sent note (``sent_step``). Generated tokens after it were never sent and are dropped.

    Played tokens are only ever followed by tokens generated after them, so nothing played lies
    in the dropped tail."""
    for i in range(len(log) - 1, -1, -1):
        step = log[i].step
        if step == PLAYED or step <= sent_step:
            return log[: i + 1]
    return []


def replay(checkpoint: Checkpoint, tokens: list[LoggedToken], tokenizer: Tokenizer, offset: float) -> Replayed:
    """Push ``tokens`` into a copy of the checkpoint's decoder; their DNA as the model reads them
    (each with the bar length in force after it, as at generation) and where the stream then stands.
    ``offset``: the decoder time (beats) of the stream's beat 0."""
    decoder = checkpoint.decoder.copy()
    frontier, steps = checkpoint.frontier, checkpoint.steps
    as_array = lambda values: np.asarray(values, dtype=np.int64)
    sequence = TokenSequence(as_array([t.token for t in tokens]), as_array([t.velocity for t in tokens]),
                             as_array([t.voice for t in tokens]))
    lengths, register, _ = decoder.contexts(sequence)
    for entry in tokens:
        if entry.step != PLAYED:
            steps = entry.step + 1
    frontier = max(frontier, tokenizer.timebase.beats_from_grid(decoder.cursor) - offset) if tokens else frontier
    floats, slots = tokenizer.token_dna.of_tokens(sequence.ids, sequence.velocity, sequence.voice, lengths, register)
    return Replayed(decoder, floats, slots, steps, frontier)


def played_ids(tokens: list[LoggedToken]) -> np.ndarray:
    """The ids of the played tokens among ``tokens`` (for the heard counts)."""
    return np.asarray([t.token for t in tokens if t.step == PLAYED], dtype=np.int64)
