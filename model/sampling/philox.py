"""Counter-based random numbers: Philox4x32-10 on int64 torch tensors, one uniform per stream step
(see :mod:`model.sampling` for why)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from model.sampling.config import is_int

SALT_LIMIT = 2**32  # the salt is one 32-bit word of the Philox counter

_MASK32 = 0xFFFFFFFF
_PHILOX_M0, _PHILOX_M1 = 0xD2511F53, 0xCD9E8D57  # multipliers
_PHILOX_W0, _PHILOX_W1 = 0x9E3779B9, 0xBB67AE85  # Weyl key increments
_PHILOX_ROUNDS = 10


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
    if not is_int(salt) or not 0 <= salt < SALT_LIMIT:
        raise ValueError(f"salt must be an integer in [0, 2**32), got {salt!r}")
    seed, step = torch.broadcast_tensors(seed, step)
    zero = torch.zeros_like(step)
    counter = (step & _MASK32, (step >> 32) & _MASK32, zero + salt, zero)
    w0, w1, _, _ = philox4x32_10(counter, (seed & _MASK32, (seed >> 32) & _MASK32))
    bits53 = ((w0 >> 5) << 26) | (w1 >> 6)
    return bits53.to(torch.float64) * 2.0**-53

