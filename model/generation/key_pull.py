"""Key pull: lean a stream's notes toward what it has heard from its player, and its key.

Left alone, a model trained on Bach drifts: a prompt in B minor is continued in A or D major
within a few bars. A musician who plays in a key wants the answer in that key. So each stream
keeps what it has *heard*: the count of every pitch class among the notes of its prompt and the
notes played into it (12 floats, a fixed size whatever the length of the session; the model's own
notes are not counted, so the pull cannot feed on itself and lock onto one note). When a stream
samples, every NOTE token's logit moves by

    key_pull * log(share[pitch class]),
    leaning = (1 - KEY_SHARE) * heard + KEY_SHARE * key(heard)
    share = (leaning + PRIOR_NOTES / 12) / (notes heard + PRIOR_NOTES)

``key(heard)``: the Krumhansl-Kessler profile of the key the heard notes imply (Krumhansl-Schmuckler
key finding, :mod:`model.keys`), scaled to as many notes as were heard. Half the pull goes to the
key, not to the exact pitches: a short prompt holds only a few of its key's notes (a bar of G and
D), and a pull toward those alone crowded the music onto them (the shipped checkpoint's
``goldberg`` and ``sar2`` continuations barely moved: mean move 0.9 and 1.0 semitones against
Bach's 2.4 and 3.1; with half the pull on the key, 2.8 and 3.6). ``PRIOR_NOTES`` pseudo-notes are spread evenly over the 12 pitch classes, so a few notes
played into an empty session pull gently; after a 64-token prompt of ~60 notes the leaning
dominates. Then all NOTE logits move by one common shift so that the total probability of NOTE
tokens is what the model gave it: the pull re-weights pitch classes among notes and leaves bars
and rests, i.e. the rhythm, alone. A stream that has heard nothing (no prompt) gets a constant
shift, which the renormalisation cancels: no pull. ``key_pull = 0`` is off.

Measured figures are in ``checkpoints/README.md`` (*Held-out results*).
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch
from torch import Tensor

from model.keys import key_profiles_of
from model.tokenizer.tokenizer import Tokenizer
from model.tokenizer.vocabulary import NOTE

PRIOR_NOTES = 12.0  # pseudo-notes spread evenly over the 12 pitch classes before anything is heard
PITCH_CLASSES = 12
KEY_SHARE = 0.5  # share of the pull that leans toward the heard notes' key rather than the notes themselves


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


def toward_key(heard: Tensor) -> Tensor:
    """``(B, 12)`` pitch-class counts -> what the pull leans toward (module docstring): the counts
    mixed with the Krumhansl-Kessler profile of their key, scaled to the same number of notes.
    Rows of zeros stay zero."""
    heard = heard.float()
    key = key_profiles_of(heard)
    scaled = key * (heard.sum(dim=1, keepdim=True) / key.sum(dim=1, keepdim=True))
    return (1 - KEY_SHARE) * heard + KEY_SHARE * scaled


def pull_toward_heard(logits: Tensor, heard: Tensor, strength: Tensor, classes: Tensor) -> Tensor:
    """``(B, V)`` float logits -> pulled float32 logits (see the module docstring).

    ``heard``: ``(B, 12)`` pitch-class counts; ``strength``: ``(B,)`` key_pull per stream;
    ``classes``: ``(V, 12)`` from :func:`pitch_class_matrix`. ``-inf`` logits stay ``-inf``.
    Two ``(B, V) x (V, 12)`` products instead of per-token gathers: the note mass of each pitch
    class, and the per-class shift spread back over the tokens.
    """
    logits = logits.float()
    counts = toward_key(heard) + PRIOR_NOTES / PITCH_CLASSES
    per_class = strength.float().unsqueeze(1) * torch.log(counts / counts.sum(dim=1, keepdim=True))
    rowmax = logits.amax(dim=1, keepdim=True).clamp_min(torch.finfo(torch.float32).min)
    mass = torch.exp(logits - rowmax) @ classes  # (B, 12): probability mass of each pitch class
    before = mass.sum(dim=1, keepdim=True)
    after = (mass * torch.exp(per_class)).sum(dim=1, keepdim=True)
    # notes keep their total mass; rows that give notes no mass at all are left alone
    shift = torch.where(after > 0, torch.log(before / after.clamp_min(1e-30)), 0.0)
    return logits + (per_class + shift) @ classes.T
