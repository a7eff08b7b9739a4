"""Keys: the Krumhansl-Kessler key profiles and Krumhansl-Schmuckler key finding.

One place for what the key pull (:mod:`model.generation.key_pull`) leans toward and what the
music figures (:mod:`model.evaluation.music`) measure a continuation's key against:
:func:`estimate_key` for one profile, :func:`key_profiles_of` for a batch of them as tensors (the
key pull's, on the model's device, every sampling step).
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch
from torch import Tensor

# Krumhansl-Kessler probe-tone ratings, tonic first (Krumhansl 1990, "Cognitive Foundations of
# Musical Pitch", table 2.1).
MAJOR_PROFILE = np.array([6.35, 2.23, 3.48, 2.33, 4.38, 4.09, 2.52, 5.19, 2.39, 3.66, 2.29, 2.88])
MINOR_PROFILE = np.array([6.33, 2.68, 3.52, 5.38, 2.60, 3.53, 2.54, 4.75, 3.98, 2.69, 3.34, 3.17])


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson correlation of two profiles; 0 when either is flat (no variance, e.g. no notes)."""
    a, b = a - a.mean(), b - b.mean()
    norm = np.sqrt((a * a).sum() * (b * b).sum())
    return float((a * b).sum() / norm) if norm > 1e-12 else 0.0


@lru_cache(maxsize=1)
def _profiles() -> np.ndarray:
    table = np.stack([np.roll(profile, tonic) for profile in (MAJOR_PROFILE, MINOR_PROFILE)
                      for tonic in range(12)])
    table.flags.writeable = False
    return table


def key_profiles() -> np.ndarray:
    """``(24, 12)`` Krumhansl-Kessler profiles of the 24 keys: rows 0-11 C..B major, 12-23 C..B
    minor, each rotated so its tonic sits on its pitch class (read-only)."""
    return _profiles()


def estimate_key(profile: np.ndarray) -> int:
    """Krumhansl-Schmuckler key finding: the row of :func:`key_profiles` whose profile correlates
    best (Pearson) with a pitch-class ``profile`` (0, C major, when ``profile`` is flat)."""
    return int(np.argmax([pearson(key, profile) for key in key_profiles()]))


@lru_cache(maxsize=8)
def _profile_tensors(device: torch.device) -> tuple[Tensor, Tensor]:
    """:func:`key_profiles` on ``device``, and the same centred to unit length (built once per
    device; read-only by convention)."""
    profiles = torch.tensor(key_profiles(), dtype=torch.float32, device=device)
    centred = profiles - profiles.mean(dim=1, keepdim=True)
    return profiles, centred / centred.norm(dim=1, keepdim=True)


def key_profiles_of(counts: Tensor) -> Tensor:
    """``(B, 12)`` pitch-class counts -> ``(B, 12)`` float32: the Krumhansl-Kessler profile of each
    row's key, as :func:`estimate_key` finds it (C major for a flat row), on ``counts``' device."""
    profiles, unit = _profile_tensors(counts.device)
    centred = counts.float() - counts.float().mean(dim=1, keepdim=True)
    correlation = (centred @ unit.T) / centred.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return profiles[correlation.argmax(dim=1)]
