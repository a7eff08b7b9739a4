"""Batched, per-stream sampling from ``(B, V)`` logits: temperature, top-k, top-p, min-p.

The server steps up to thousands of live streams in one forward pass; each stream has its own
:class:`SamplingConfig` and its own step counter. This module turns that pass's logits into one
token per stream in a single vectorised call (no Python loop over streams). It knows nothing of
the model: it works on whatever ``(B, V)`` logits a batched ``step`` produced.

Usage::

    batch = SamplingBatch.from_configs(configs, steps, device=logits.device)
    tokens = sample(logits, batch)            # (B,) int64
    kept = filter_logits(logits, batch)       # (B, V) float32, -inf where excluded

Filtering (:func:`filter_logits`), per row, on the tempered logits ``x = logits.float() / T``:

* **top-k** keeps tokens whose logit is at least the k-th largest (``top_k = 0`` or ``>= V``:
  off): nanoGPT's ``logits[logits < v[:, [-1]]] = -inf`` with a per-row k.
* **top-p** keeps the smallest prefix of the top-k tokens, sorted by probability, whose mass
  reaches ``top_p`` of the top-k mass (top-p after top-k, on the renormalised distribution, as
  Hugging Face and vLLM order them); ``top_p = 1``: off.
* **min-p** keeps tokens whose probability is at least ``min_p`` times the top token's, i.e.
  ``x >= max(x) + log(min_p)``; ``min_p = 0``: off.

Each rule gives the row a logit threshold and the row keeps ``x >= max(thresholds)``, so the top
token is always kept. Thresholds are values, not positions: tokens tied with the last kept one are
kept too (as in nanoGPT), so on distinct logits top-k keeps exactly k tokens, and a row's kept set
never depends on how a sort happened to order ties.

Top-k and top-p need each row's largest logits in descending order, then one cumsum of their
probabilities and masks. A full sort of ``V`` is over 10x slower on CPU than ``torch.topk`` of the
``K = max(top_k) + 1`` largest, so only those candidates are taken; rows with top-p or min-p but
no top-k start from 64 candidates. Where a row's kept set may run past its candidates (a wide
nucleus or min-p set, or a tie past the k-th token, which the extra candidate shows), that row's
pool alone widens x4, the others being padded with -inf, until every kept set fits.

Sampling (:func:`sample`) is inverse-CDF in token-id order over the kept tokens: weights
``w = exp(x - max x)``, zero where excluded, ``cdf = cumsum(w)``, and the token is the first with
``cdf > u * cdf[-1]`` (``searchsorted``). Filtered rows walk their candidates re-sorted by id;
rows with no filter at all walk the whole vocabulary (only those rows, so a row's path never
depends on the others). Walking in id order, not probability order, keeps
tied tokens in a fixed order. Weights are float32 whatever the logits' dtype (bfloat16 and
float16 included); their sums are accumulated in float64, so a different summation order (pool
width, batch shape, device) moves them by ~1e-16 only; the normaliser cancels, so no softmax.

Randomness is counter-based, not stateful: ``u = stream_uniform(seed, step)`` hashes each
stream's ``(seed, step)`` with Philox4x32-10 (Salmon et al., 2011; the generator behind
``curand``), written with int64 torch ops whose intermediates stay below 2**49 so nothing
overflows, on CPU and CUDA alike. The token a stream draws therefore depends only on its logits,
its settings, its seed and its step, never on the other streams in the batch, their order, or the
global torch RNG; replaying a stream with the same seed replays its tokens. Caveat: ``u`` is exact
but float32 ``exp`` may differ in the last bit between CPU code paths or devices, which can move
a token only when ``u`` falls within such a rounding of a CDF boundary (~1e-7 per draw).

Host syncs: choosing ``K`` reads ``max(top_k)`` on the host, and checking that every kept token is
a candidate reads the rows that spill: two small device-to-host copies per call, one more per
widening.

Every row needs at least one finite logit; ``-inf`` logits (masked tokens) are never drawn.
"""

from __future__ import annotations

import logging
import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

logger = logging.getLogger(__name__)

SEED_LIMIT = 2**63  # seeds live in an int64 tensor
SALT_LIMIT = 2**32  # the salt is one 32-bit word of the Philox counter
MIN_CANDIDATES = 64  # first candidate pool for top-p or min-p rows without top-k
FULL_SORT_FRACTION = 4  # K >= V / 4: a full sort is cheaper than topk
KEY_PULL_LIMIT = 10.0

_MASK32 = 0xFFFFFFFF
_PHILOX_M0, _PHILOX_M1 = 0xD2511F53, 0xCD9E8D57  # multipliers
_PHILOX_W0, _PHILOX_W1 = 0x9E3779B9, 0xBB67AE85  # Weyl key increments
_PHILOX_ROUNDS = 10


@dataclass(frozen=True)
class SamplingConfig:
    """How one stream samples. The single source of truth for the sampling defaults."""

    temperature: float = field(default=0.85, metadata={"help": "Softmax temperature (> 0); lower is sharper."})
    top_k: int = field(default=50, metadata={"help": "Keep the k most likely tokens (0 = off)."})
    top_p: float = field(default=0.95, metadata={"help": "Nucleus: keep the smallest set of top tokens with this much probability, in (0, 1] (1 = off)."})
    min_p: float = field(default=0.0, metadata={"help": "Drop tokens less likely than min_p times the top token, in [0, 1) (0 = off)."})
    seed: int = field(default=0, metadata={"help": "Seed of the stream's counter-based random numbers, in [0, 2**63)."})
    key_pull: float = field(default=1.5, metadata={"help": "How strongly notes lean toward the pitch classes of the prompt and of the notes played in, in [0, 10] (0 = off; see model/key_pull.py)."})

    def __post_init__(self) -> None:
        t, k, p, m, s, pull = self.temperature, self.top_k, self.top_p, self.min_p, self.seed, self.key_pull
        if not _is_real(t) or not (math.isfinite(t) and t > 0):
            raise ValueError(f"temperature must be a finite number > 0, got {t!r}")
        if not _is_int(k) or k < 0:
            raise ValueError(f"top_k must be an integer >= 0 (0 = off), got {k!r}")
        if not _is_real(p) or not 0 < p <= 1:
            raise ValueError(f"top_p must be in (0, 1] (1 = off), got {p!r}")
        if not _is_real(m) or not 0 <= m < 1:
            raise ValueError(f"min_p must be in [0, 1) (0 = off), got {m!r}")
        if not _is_int(s) or not 0 <= s < SEED_LIMIT:
            raise ValueError(f"seed must be an integer in [0, 2**63), got {s!r}")
        if not _is_real(pull) or not 0 <= pull <= KEY_PULL_LIMIT:
            raise ValueError(f"key_pull must be a number in [0, {KEY_PULL_LIMIT}] (0 = off), got {pull!r}")


def _is_real(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _is_int(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


@dataclass
class SamplingBatch:
    """Per-stream sampling settings as ``(B,)`` tensors on the logits' device.

    ``temperature``, ``top_p``, ``min_p``, ``key_pull``: float32; ``top_k``, ``seed``, ``step``: int64.
    ``step`` is the stream's counter (e.g. its position): the stream's random number at a step is
    a pure function of ``(seed, step)``. Build it with :meth:`from_configs`, which validates every
    value through :class:`SamplingConfig`; the constructor checks only shapes, dtypes and devices.
    """

    temperature: Tensor
    top_k: Tensor
    top_p: Tensor
    min_p: Tensor
    seed: Tensor
    step: Tensor
    key_pull: Tensor | None = None  # None: zeros (no pull)

    def __post_init__(self) -> None:
        if self.key_pull is None:
            self.key_pull = torch.zeros_like(self.temperature)
        kinds = {"temperature": torch.float32, "top_k": torch.int64, "top_p": torch.float32,
                 "min_p": torch.float32, "seed": torch.int64, "step": torch.int64, "key_pull": torch.float32}
        size, device = self.temperature.shape, self.temperature.device
        for name, dtype in kinds.items():
            value = getattr(self, name)
            if value.dtype != dtype or value.dim() != 1:
                raise ValueError(f"SamplingBatch.{name} must be a 1-D {dtype} tensor, "
                                 f"got {value.dtype} of shape {tuple(value.shape)}")
            if value.shape != size or value.device != device:
                raise ValueError(f"SamplingBatch.{name} has shape {tuple(value.shape)} on "
                                 f"{value.device}; temperature has {tuple(size)} on {device}")

    @classmethod
    def from_configs(cls, configs: Sequence[SamplingConfig], steps: Sequence[int],
                     device: torch.device | str | None = None) -> "SamplingBatch":
        """One row per stream: ``configs[i]`` at step ``steps[i]`` (an integer >= 0)."""
        if len(configs) != len(steps):
            raise ValueError(f"{len(configs)} configs but {len(steps)} steps: one of each per stream")
        for i, step in enumerate(steps):
            if not _is_int(step) or not 0 <= step < 2**63:
                raise ValueError(f"steps[{i}] must be an integer in [0, 2**63), got {step!r}")
        for i, config in enumerate(configs):
            if not isinstance(config, SamplingConfig):
                raise TypeError(f"configs[{i}] must be a SamplingConfig, got {type(config).__name__}")

        def column(name: str, dtype: torch.dtype) -> Tensor:
            return torch.tensor([getattr(c, name) for c in configs], dtype=dtype, device=device)

        return cls(temperature=column("temperature", torch.float32),
                   top_k=column("top_k", torch.int64),
                   top_p=column("top_p", torch.float32),
                   min_p=column("min_p", torch.float32),
                   seed=column("seed", torch.int64),
                   step=torch.tensor([int(s) for s in steps], dtype=torch.int64, device=device),
                   key_pull=column("key_pull", torch.float32))

    def __len__(self) -> int:
        return self.temperature.shape[0]

    def to(self, device: torch.device | str) -> "SamplingBatch":
        return SamplingBatch(**{name: getattr(self, name).to(device) for name in self.__dataclass_fields__})


# ----------------------------------------------------------------------------- random numbers

def _mulhilo32(multiplier: int, x: Tensor) -> tuple[Tensor, Tensor]:
    """``(hi, lo)`` 32-bit words of ``multiplier * x`` for 32-bit values held in int64.

    The multiplier is split in 16-bit halves so every product stays below 2**48.
    """
    t = x * (multiplier & 0xFFFF)  # < 2**48
    s = x * (multiplier >> 16)  # < 2**48; the full product is t + s * 2**16
    r = t + ((s & 0xFFFF) << 16)  # < 2**49
    return (s >> 16) + (r >> 32), r & _MASK32


def philox4x32_10(counter: Sequence[Tensor], key: Sequence[Tensor]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Philox4x32-10 (Random123) on int64 tensors holding 32-bit words in ``[0, 2**32)``.

    ``counter``: four words, ``key``: two; tensors broadcast together. Returns four words.
    A bijection of the counter for each key, so distinct counters never collide.
    """
    c0, c1, c2, c3 = counter
    k0, k1 = key
    for i in range(_PHILOX_ROUNDS):
        if i:
            k0, k1 = (k0 + _PHILOX_W0) & _MASK32, (k1 + _PHILOX_W1) & _MASK32
        hi0, lo0 = _mulhilo32(_PHILOX_M0, c0)
        hi1, lo1 = _mulhilo32(_PHILOX_M1, c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return c0, c1, c2, c3


def stream_uniform(seed: Tensor, step: Tensor, salt: int = 0) -> Tensor:
    """One uniform float64 in ``[0, 1)`` per stream (53 random bits), a pure function of its inputs.

    ``seed``, ``step``: int64 tensors of one shape (their 64 bits are used as given).
    ``salt`` (``[0, 2**32)``) gives independent numbers for other draws of the same step (e.g. a
    second head). Philox key = seed, counter = (step low, step high, salt, 0).
    """
    if seed.dtype != torch.int64 or step.dtype != torch.int64:
        raise ValueError(f"seed and step must be int64 tensors, got {seed.dtype} and {step.dtype}")
    if not _is_int(salt) or not 0 <= salt < SALT_LIMIT:
        raise ValueError(f"salt must be an integer in [0, 2**32), got {salt!r}")
    seed, step = torch.broadcast_tensors(seed, step)
    zero = torch.zeros_like(step)
    counter = (step & _MASK32, (step >> 32) & _MASK32, zero + salt, zero)
    w0, w1, _, _ = philox4x32_10(counter, (seed & _MASK32, (seed >> 32) & _MASK32))
    bits53 = ((w0 >> 5) << 26) | (w1 >> 6)
    return bits53.to(torch.float64) * 2.0**-53


# ----------------------------------------------------------------------------- filtering

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
        n_keep = torch.where(k > 0, torch.minimum(n_keep, k), n_keep)
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
