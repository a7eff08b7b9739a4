"""Learning the key pull on the model's own continuations (``python -m model.train --init_from
CKPT --learn_key_pull 2``).

A model trained only on Bach has only ever read Bach: left alone, it drifts out of its prompt's
key, and it never saw its own drift, so nothing taught it to come back. The key pull
(:mod:`model.generation.key_pull`) corrects that at sampling time. This module teaches the
network itself to do it:

1. every step, a few prompts are cut from the training files (half at a file's start, half at a
   random place) and continued by the model being trained, alone (``key_pull`` 0, the other
   sampling settings at their defaults, a fresh seed per step), exactly as generation does;
2. the **teacher**, a frozen copy of the ``--init_from`` checkpoint, reads prompt + continuation,
   and its next-token distribution at every continuation position is pulled toward the prompt's
   pitch classes with strength ``learn_key_pull`` (:func:`pull_toward_heard`);
3. the loss is the KL divergence from that target to the model's own distribution at those
   positions (mean nats per position).

The teacher never moves, so the model converges to "the starting model with the key pull" on
the continuations it writes itself, not to an ever stronger pull; and the target comes from the
model's own contexts, drifted ones included, which teacher-forced Bach never shows. The trainer's
usual next-token loss on Bach windows runs beside it (their sum is what is minimised), so the
model keeps what it learned.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from model.evaluation.continuation import generate_batch
from model.fm.machine import FieldMachine
from model.generation.generator import BatchGenerator, with_bos
from model.generation.key_pull import pull_toward_heard
from model.sampling.config import SamplingConfig
from model.tokenizer.sequences import TokenSequence
from model.tokenizer.tokenizer import Tokenizer
from model.training.batches import collate, make_example

FROM_FILE_START = 0.5  # share of prompts cut at a file's start (the rest at a random place)


@dataclass(frozen=True)
class KeyTeacherSettings:
    """What one step of :class:`KeyTeacher` does (the trainer's ``--learn_key_pull`` and
    ``--rollout_*`` flags)."""

    strength: float  # the key pull the teacher's targets carry
    streams: int  # prompts continued per step
    prompt_tokens: int
    tokens: int  # continuation length


def continuation_spans(prompt_lengths: list[int], total_lengths: list[int], width: int) -> Tensor:
    """``(B, width)`` bool: the input positions whose outputs predict a continuation token, in
    rows of ``prompt_length`` prompt tokens (BOS included) followed by the continuation
    (``total_length`` tokens in all; the last token predicts nothing)."""
    position = torch.arange(width)
    first = torch.tensor(prompt_lengths).unsqueeze(1) - 1
    last = torch.tensor(total_lengths).unsqueeze(1) - 1
    return (position >= first) & (position < last)


def pulled_targets(teacher_logits: Tensor, heard: Tensor, strength: float, pitch_classes: Tensor) -> Tensor:
    """``(N, V)`` teacher logits at ``N`` positions, each row's stream ``heard`` ``(N, 12)`` -> the
    target distribution: the teacher's, pulled toward the heard pitch classes."""
    pulled = pull_toward_heard(teacher_logits, heard,
                               torch.full((len(heard),), float(strength), device=heard.device), pitch_classes)
    return torch.softmax(pulled, dim=-1)


def kl_to_targets(targets: Tensor, logits: Tensor) -> Tensor:
    """Mean over rows of KL(targets || softmax(logits)), nats; the gradient flows into ``logits``."""
    log_model = torch.log_softmax(logits.float(), dim=-1)
    log_targets = torch.log(targets.clamp_min(torch.finfo(torch.float32).tiny))
    return (targets * (log_targets - log_model)).sum(dim=-1).mean()


class KeyTeacher:
    """Continues training prompts with ``model`` (the model being trained) and scores them against
    the frozen ``teacher``'s key-pulled choices (:meth:`loss`)."""

    def __init__(self, model: FieldMachine, teacher: FieldMachine, tokenizer: Tokenizer,
                 sequences: list[TokenSequence], settings: KeyTeacherSettings, rng: np.random.Generator) -> None:
        if settings.strength <= 0:
            raise ValueError("--learn_key_pull must be above 0 to learn anything (0 is off)")
        if settings.streams < 1 or settings.prompt_tokens < 1 or settings.tokens < 1:
            raise ValueError("--rollout_streams, --rollout_prompt_tokens and --rollout_tokens must be at least 1")
        self.sequences = [s for s in sequences if len(s) >= settings.prompt_tokens]
        if len(self.sequences) < settings.streams:
            raise ValueError(f"--learn_key_pull needs {settings.streams} training files of at least "
                             f"{settings.prompt_tokens} tokens (--rollout_streams, --rollout_prompt_tokens); "
                             f"there are {len(self.sequences)}")
        self.model = model
        self.teacher = teacher.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.settings = settings
        self.rng = rng
        self.device = next(teacher.parameters()).device
        was_training = model.training
        self.generator = BatchGenerator(model, tokenizer)  # (puts the model in eval mode)
        model.train(was_training)

    def prompts(self) -> list[TokenSequence]:
        """``streams`` prompts of ``prompt_tokens`` tokens from different training files."""
        size = self.settings.prompt_tokens
        prompts = []
        for i in self.rng.choice(len(self.sequences), self.settings.streams, replace=False):
            s = self.sequences[int(i)]
            start = 0 if self.rng.random() < FROM_FILE_START else int(self.rng.integers(0, len(s) - size + 1))
            prompts.append(TokenSequence(s.ids[start:start + size], s.velocity[start:start + size],
                                         s.voice[start:start + size]))
        return prompts

    def continue_alone(self, prompts: list[TokenSequence]) -> list[TokenSequence]:
        """Each prompt, BOS first, followed by the model's own continuation (``key_pull`` 0, in
        eval mode, as generation runs it)."""
        was_training = self.model.training
        self.model.eval()
        sampling = SamplingConfig(key_pull=0.0, seed=int(self.rng.integers(2**62)))
        try:
            continuations = generate_batch(self.generator, prompts, self.settings.tokens, sampling, progress=False)
        finally:
            self.model.train(was_training)
        return [with_bos(TokenSequence(*(np.concatenate([getattr(p, k), getattr(c, k)])
                                         for k in ("ids", "velocity", "voice"))))
                for p, c in zip(prompts, continuations)]

    def loss(self, autocast) -> Tensor:
        """One step's loss: KL from the teacher's key-pulled targets to the model's distribution at
        every position of fresh continuations the model wrote alone. ``autocast``: a context
        factory for the two forward passes (the trainer's mixed precision)."""
        model = self.model
        prompts = self.prompts()
        rows = self.continue_alone(prompts)
        examples = [make_example(r, self.tokenizer) for r in rows]
        batch = collate(examples, [(k, 0, len(e.ids)) for k, e in enumerate(examples)], self.device)
        where = continuation_spans([len(with_bos(p)) for p in prompts], [len(r) for r in rows],
                                   batch["dna"].shape[1]).to(self.device)
        heard = torch.from_numpy(np.stack([self.generator.heard(p.ids) for p in prompts])).to(self.device)
        per_position = heard.unsqueeze(1).expand(-1, where.shape[1], -1)[where]
        with torch.no_grad(), autocast():
            teacher_logits = self.teacher(batch["dna"], batch["slots"]).logits[where]
        targets = pulled_targets(teacher_logits, per_position, self.settings.strength,
                                 self.generator.pitch_class_rows)
        with autocast():
            logits = model(batch["dna"], batch["slots"]).logits[where]
        return kl_to_targets(targets, logits)
