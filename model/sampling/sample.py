"""Filtering (top-k, top-p, min-p) and drawing one token per stream (see :mod:`model.sampling`)."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from model.sampling.batch import SamplingBatch
from model.sampling.philox import stream_uniform

logger = logging.getLogger(__name__)

MIN_CANDIDATES = 64  # first candidate pool for top-p or min-p rows without top-k
FULL_SORT_FRACTION = 4  # K >= V / 4: a full sort is cheaper than topk


@dataclass
class _Cut:
    """Per row: keep the tokens whose tempered logit is ``>= threshold``."""

    rowmax: Tensor  # (B, 1) largest tempered logit
    threshold: Tensor  # (B, 1)
    limited: Tensor  # (B,) bool: top-k, top-p or min-p bounds the row's kept set
    n_limited: int  # limited.sum()
    # (values (B, W) tempered and descending, token ids (B, W)): every kept token of every
    # limited row is among them; None when no row is limited.
    candidates: tuple[Tensor, Tensor] | None


def _check(logits: Tensor, batch: SamplingBatch) -> None:
    if logits.dim() != 2:
        raise ValueError(f"logits must be (batch, vocab), got shape {tuple(logits.shape)}")
    if logits.shape[0] != len(batch):
        raise ValueError(f"logits have {logits.shape[0]} rows but the SamplingBatch has {len(batch)}")
    if logits.device != batch.temperature.device:
        raise ValueError(f"logits are on {logits.device} but the SamplingBatch is on "
                         f"{batch.temperature.device}")
    if not logits.is_floating_point():
        raise ValueError(f"logits must be floating point, got {logits.dtype}")


def _largest(logits: Tensor, width: int) -> tuple[Tensor, Tensor]:
    """The ``width`` largest logits of each row, descending, and their token ids."""
    if width * FULL_SORT_FRACTION >= logits.shape[1]:
        values, ids = torch.sort(logits, dim=1, descending=True)
        return values[:, :width], ids[:, :width]
    return torch.topk(logits, width, dim=1, sorted=True)


def _cut(logits: Tensor, batch: SamplingBatch) -> _Cut:
    """Thresholds of every row (``logits``: float32, unscaled). See the module docstring."""
    rows, vocab = logits.shape
    temperature = batch.temperature.unsqueeze(1)
    log_min_p = torch.log(batch.min_p).unsqueeze(1)  # log(0) = -inf: min-p off
    k = torch.where(batch.top_k >= vocab, 0, batch.top_k)  # 0 = off
    wants_p = batch.top_p < 1
    ranked = (k > 0) | wants_p  # rows cut at a rank: top-k, top-p
    limited = ranked | (batch.min_p > 0)  # rows whose kept set can be found among candidates
    open_nucleus = wants_p & (k == 0)  # top-p over the whole row
    counts = [k.max(), (limited & (k == 0)).sum(), open_nucleus.sum(), limited.sum()]
    max_k, n_unranked, n_nucleus, n_limited = torch.stack(counts).tolist()  # one host sync
    if n_limited == 0:
        rowmax = logits.amax(dim=1, keepdim=True) / temperature  # division is monotone
        return _Cut(rowmax, rowmax + log_min_p, limited, 0, None)

    # One candidate more than the largest k, so a tie with the k-th token is seen.
    width = min(vocab, max(max_k + 1, MIN_CANDIDATES if n_unranked else 1))
    row_mass = None
    raw, ids = _largest(logits, width)
    while True:
        values = raw / temperature  # the tempered logits of the candidates, descending
        rowmax = values[:, :1]
        cum = torch.exp(values - rowmax).cumsum(dim=1, dtype=torch.float64)
        # top-p's reference mass: the top-k tokens', or the whole row's where top-k is off
        mass = cum.gather(1, (k.clamp(1, width) - 1).unsqueeze(1)).squeeze(1)
        if n_nucleus:
            if row_mass is None:
                row_mass = _row_mass(logits, temperature, rowmax, open_nucleus)
            mass = torch.where(open_nucleus, row_mass, mass)
        # top-p keeps sorted position j while the mass before j is below the goal (j = 0 always)
        before = F.pad(cum[:, :-1], (1, 0))
        goal = (batch.top_p.double() * mass).unsqueeze(1)
        n_keep = torch.where(wants_p, (before < goal).sum(dim=1), width)
        n_keep = torch.where(k > 0, torch.minimum(n_keep, k), n_keep).clamp_(min=1)  # the top token stays
        last_kept = values.gather(1, (n_keep - 1).unsqueeze(1))
        threshold = torch.maximum(rowmax + log_min_p,
                                  torch.where(ranked.unsqueeze(1), last_kept, -math.inf))
        if width == vocab:
            break
        # Every kept token must be a candidate: each limited row must drop its last candidate
        # (ties, and nuclei or min-p sets larger than the pool, fail this), unless it is -inf.
        last = values[:, -1]
        spill = limited & (last >= threshold.squeeze(1)) & (last > -math.inf)
        spilled = spill.nonzero().squeeze(1)  # host sync
        if spilled.numel() == 0:
            break
        # Widen the pool of the spilled rows only; the others are padded with -inf, which
        # changes none of their sums or thresholds (padding ids are 0, never drawn).
        grown = min(vocab, width * 4)
        logger.debug("widening the candidate pool of %d rows to %d of %d tokens",
                     spilled.numel(), grown, vocab)
        wide_raw, wide_ids = _largest(logits.index_select(0, spilled), grown)
        pad = (0, grown - width)
        raw = F.pad(raw, pad, value=-math.inf).index_copy_(0, spilled, wide_raw)
        ids = F.pad(ids, pad, value=0).index_copy_(0, spilled, wide_ids)
        width = grown
    return _Cut(rowmax, threshold, limited, n_limited, (values, ids))


def _row_mass(logits: Tensor, temperature: Tensor, rowmax: Tensor, where: Tensor) -> Tensor:
    """``sum(exp(x - rowmax))`` over the whole vocabulary for the rows in ``where``, else 0."""
    index = where.nonzero().squeeze(1)
    x = logits.index_select(0, index) / temperature.index_select(0, index)
    mass = torch.exp(x - rowmax.index_select(0, index)).sum(dim=1, dtype=torch.float64)
    return torch.zeros(where.shape, dtype=mass.dtype, device=mass.device).index_copy_(0, index, mass)


def filter_logits(logits: Tensor, batch: SamplingBatch) -> Tensor:
    """``(B, V)`` logits -> ``(B, V)`` float32 ``logits / temperature``, ``-inf`` where excluded.

    ``softmax`` of the result is the distribution :func:`sample` draws from.
    """
    _check(logits, batch)
    logits = logits.float()
    if len(batch) == 0:
        return logits.clone()
    cut = _cut(logits, batch)
    x = logits / batch.temperature.unsqueeze(1)
    return x.masked_fill(x < cut.threshold, -math.inf)


def sample(logits: Tensor, batch: SamplingBatch, salt: int = 0) -> Tensor:
    """Draw one token per stream: ``(B, V)`` logits (any float dtype) -> ``(B,)`` int64 ids.

    Row i uses ``batch``'s row i settings and the uniform ``stream_uniform(seed, step, salt)``;
    ``salt`` separates further draws at the same step (e.g. another head's).
    """
    _check(logits, batch)
    if len(batch) == 0:
        return torch.empty(0, dtype=torch.int64, device=logits.device)
    logits = logits.float()
    cut = _cut(logits, batch)
    u = stream_uniform(batch.seed, batch.step, salt)
    if cut.n_limited == 0:
        return _draw_from_vocabulary(logits, batch.temperature, cut.rowmax, cut.threshold, u)
    tokens = _draw_from_candidates(cut, u)
    if cut.n_limited == len(batch):
        return tokens
    # Rows without top-k or top-p draw from the whole vocabulary, and only they, so a row takes
    # the same path whatever the rest of the batch is.
    index = (~cut.limited).nonzero().squeeze(1)
    rows = (t.index_select(0, index) for t in (logits, batch.temperature, cut.rowmax, cut.threshold, u))
    return tokens.index_copy_(0, index, _draw_from_vocabulary(*rows))


def _draw_from_candidates(cut: _Cut, u: Tensor) -> Tensor:
    """Inverse-CDF over each row's candidates, walked in token-id order (valid on limited rows)."""
    values, ids = cut.candidates
    ids, order = ids.sort(dim=1)
    values = values.gather(1, order)
    weights = torch.exp(values - cut.rowmax).masked_fill_(values < cut.threshold, 0.0)
    return ids.gather(1, _inverse_cdf(weights, u).unsqueeze(1)).squeeze(1)


def _draw_from_vocabulary(logits: Tensor, temperature: Tensor, rowmax: Tensor, threshold: Tensor,
                          u: Tensor) -> Tensor:
    """Inverse-CDF over the whole vocabulary of each row."""
    x = logits / temperature.unsqueeze(1)
    weights = torch.exp(x - rowmax).masked_fill_(x < threshold, 0.0)
    return _inverse_cdf(weights, u)


def _inverse_cdf(weights: Tensor, u: Tensor) -> Tensor:
    """Per row, the first column whose running sum of ``weights`` (B, N) exceeds ``u * total``."""
    cdf = weights.cumsum(dim=1, dtype=torch.float64)
    total = cdf[:, -1:]
    target = u.unsqueeze(1) * total
    # u < 1, but rounding could lift the target to the total; keep it strictly below, so the
    # first column with cdf > target always has a positive weight.
    target = torch.minimum(target, torch.nextafter(total, torch.zeros_like(total)))
    return torch.searchsorted(cdf, target, right=True).squeeze(1).clamp_(max=weights.shape[1] - 1)
