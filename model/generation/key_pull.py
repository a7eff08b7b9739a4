"""Key pull: lean a stream's notes toward the pitch classes it has heard from its player.

Left alone, a model trained on Bach drifts: a prompt in B minor is continued in A or D major
within a few bars (the shipped checkpoint's continuations sit closer to another prompt than to
their own 4 times in 5; real continuations 1 time in 2). A musician who plays in a key wants the
answer in that key. So each stream keeps what it has *heard*: the count of every pitch class among
the notes of its prompt and the notes played into it (12 floats, a fixed size whatever the length
of the session; the model's own notes are not counted, so the pull cannot feed on itself and lock
onto one note). When a stream samples, every NOTE token's logit moves by

    key_pull * log(share[pitch class]),  share = (heard + PRIOR_NOTES / 12) / (notes heard + PRIOR_NOTES)

(``share``: the heard histogram with ``PRIOR_NOTES`` pseudo-notes spread evenly over the 12
pitch classes, so a few notes played into an empty session pull gently: after one C, C is
(2/13 : 1/13)^1.5 ~ 2.8 times as likely as before relative to the other pitch classes; after a
64-token prompt of ~60 notes the histogram dominates), and then all NOTE logits move by
one common shift so that the total probability of NOTE tokens is what the model gave it: the
pull re-weights pitch classes among notes and leaves bars and rests, i.e. the rhythm, alone.
A stream that has heard nothing (no prompt) gets a constant shift, which the renormalisation
cancels: no pull. ``key_pull = 0`` is off.

Measured on the shipped checkpoint, 20 held-out prompts, seeds 0 / 2 / 4 (``checkpoints/README.md``):
``prompt_fidelity`` 0.20 / 0.10 / 0.15 with no pull, 0.70 / 0.75 / 0.80 at 1, 0.80 / 0.75 / 0.75
at 1.5 (the default) and 0.75 / 0.70 / 0.80 at 2: stronger pulls crowd onto fewer notes (longer
runs of one repeated token) without following the prompt better.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch
from torch import Tensor

from model.tokenizer.tokenizer import Tokenizer
from model.tokenizer.vocabulary import NOTE

PRIOR_NOTES = 12.0  # pseudo-notes spread evenly over the 12 pitch classes before anything is heard
PITCH_CLASSES = 12


@lru_cache(maxsize=8)
def note_pitch_classes(tokenizer: Tokenizer) -> np.ndarray:
    """``(V,)`` int64: each NOTE token's pitch class, -1 for every other token (built once per
    tokenizer; read-only)."""
    ids = np.arange(tokenizer.vocab_size)
    classes = np.full(tokenizer.vocab_size, -1, dtype=np.int64)
    for t in ids[tokenizer.kinds(ids) == NOTE].tolist():
        classes[t] = tokenizer.vocab[t].a % PITCH_CLASSES
    classes.flags.writeable = False
    return classes


def heard_counts(ids: np.ndarray, pitch_classes: np.ndarray) -> np.ndarray:
    """``(12,)`` float32: how many NOTE tokens of each pitch class ``ids`` holds."""
    classes = pitch_classes[np.asarray(ids, dtype=np.int64)]
    return np.bincount(classes[classes >= 0], minlength=PITCH_CLASSES).astype(np.float32)


def pitch_class_matrix(pitch_classes: np.ndarray) -> Tensor:
    """``(V, 12)`` float32 one-hot of each NOTE token's pitch class (zero rows for other tokens)."""
    matrix = torch.zeros(len(pitch_classes), PITCH_CLASSES)
    notes = torch.from_numpy(np.nonzero(pitch_classes >= 0)[0])
    matrix[notes, torch.from_numpy(pitch_classes[pitch_classes >= 0])] = 1.0
    return matrix


def pull_toward_heard(logits: Tensor, heard: Tensor, strength: Tensor, classes: Tensor) -> Tensor:
    """``(B, V)`` float logits -> pulled float32 logits (see the module docstring).

    ``heard``: ``(B, 12)`` pitch-class counts; ``strength``: ``(B,)`` key_pull per stream;
    ``classes``: ``(V, 12)`` from :func:`pitch_class_matrix`. ``-inf`` logits stay ``-inf``.
    Two ``(B, V) x (V, 12)`` products instead of per-token gathers: the note mass of each pitch
    class, and the per-class shift spread back over the tokens.
    """
    logits = logits.float()
    counts = heard.float() + PRIOR_NOTES / PITCH_CLASSES
    per_class = strength.float().unsqueeze(1) * torch.log(counts / counts.sum(dim=1, keepdim=True))
    rowmax = logits.amax(dim=1, keepdim=True).clamp_min(torch.finfo(torch.float32).min)
    mass = torch.exp(logits - rowmax) @ classes  # (B, 12): probability mass of each pitch class
    before = mass.sum(dim=1, keepdim=True)
    after = (mass * torch.exp(per_class)).sum(dim=1, keepdim=True)
    # notes keep their total mass; rows that give notes no mass at all are left alone
    shift = torch.where(after > 0, torch.log(before / after.clamp_min(1e-30)), 0.0)
    return logits + (per_class + shift) @ classes.T
