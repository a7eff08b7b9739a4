"""Unigram and bigram next-token baselines, fitted on a checkpoint's own training split.

Held-out NLL is only meaningful next to these: a model that does not beat the bigram baseline
has learned little more than which token tends to follow which. Smoothing: the unigram is
add-one over the vocabulary; the bigram interpolates with the unigram,
``p(b | a) = (c(a, b) + k * p_uni(b)) / (c(a) + k)``, with ``k = BIGRAM_PRIOR``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

BIGRAM_PRIOR = 1.0


@dataclass
class Baselines:
    unigram: np.ndarray  # (V,) counts
    bigram_pairs: np.ndarray  # (N, 2) distinct (previous, next) pairs
    bigram_counts: np.ndarray  # (N,)

    @classmethod
    def fit(cls, sequences: list[np.ndarray], vocab_size: int) -> "Baselines":
        """Count next-token events of every sequence (the targets a model is scored on)."""
        unigram = np.zeros(vocab_size, dtype=np.float64)
        pair_keys = []
        for ids in sequences:
            unigram += np.bincount(ids[1:], minlength=vocab_size)
            pair_keys.append(ids[:-1].astype(np.int64) * vocab_size + ids[1:])
        keys, counts = np.unique(np.concatenate(pair_keys) if pair_keys else np.zeros(0, np.int64),
                                 return_counts=True)
        pairs = np.stack((keys // vocab_size, keys % vocab_size), axis=1)
        return cls(unigram, pairs, counts.astype(np.float64))

    def to_tensors(self) -> dict[str, torch.Tensor]:
        return {"baseline_unigram": torch.from_numpy(self.unigram),
                "baseline_bigram_pairs": torch.from_numpy(self.bigram_pairs),
                "baseline_bigram_counts": torch.from_numpy(self.bigram_counts)}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor]) -> "Baselines":
        return cls(tensors["baseline_unigram"].numpy(), tensors["baseline_bigram_pairs"].numpy(),
                   tensors["baseline_bigram_counts"].numpy())

    def unigram_probability(self) -> np.ndarray:
        return (self.unigram + 1) / (self.unigram.sum() + len(self.unigram))

    def nll(self, sequences: list[np.ndarray]) -> tuple[float, float, int]:
        """(unigram, bigram) total NLL in nats over every next-token target, and the count."""
        vocab = len(self.unigram)
        p_uni = self.unigram_probability()
        table = dict(zip((self.bigram_pairs[:, 0] * vocab + self.bigram_pairs[:, 1]).tolist(),
                         self.bigram_counts.tolist()))
        prev_totals = np.bincount(self.bigram_pairs[:, 0], weights=self.bigram_counts,
                                  minlength=vocab)
        uni = bi = 0.0
        count = 0
        for ids in sequences:
            prev, nxt = ids[:-1], ids[1:]
            uni -= float(np.log(p_uni[nxt]).sum())
            pair = np.array([table.get(k, 0.0) for k in (prev.astype(np.int64) * vocab + nxt).tolist()])
            p_bi = (pair + BIGRAM_PRIOR * p_uni[nxt]) / (prev_totals[prev] + BIGRAM_PRIOR)
            bi -= float(np.log(p_bi).sum())
            count += len(nxt)
        return uni, bi, count
