"""One field: the position code a token is multiplied by, the (decayed) sum that keeps it, and
the readout that turns the sum back into something a network can read.

:class:`FieldCode` holds no weights. The one-field machine has one field of ``dim`` channels;
a deep machine (``ModelConfig.field_layers``) has one per layer, all of the same width, so one
:class:`FieldCode` serves every layer.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

DECAY_CHUNK = 32  # positions per chunk of the decayed cumulative sum; exp(32 / tau) for tau >= 1


class FieldCode:
    """Position code, accumulation and readout of a field of ``floats`` channels (an even number:
    (sin, cos) pairs). ``decays``: time constants in tokens dealt to the pairs in turn (0 or none:
    no decay)."""

    def __init__(self, floats: int, position_base: float, decays: tuple[float, ...]) -> None:
        if floats % 2:
            raise ValueError("a field's width must be even (the position code pairs sin and cos)")
        self.floats = floats
        self.position_base = position_base
        # Not buffers: module.to(dtype) would cast them, and the angle must stay float64.
        self._frequencies: dict[torch.device, Tensor] = {}
        taus = decays or (0.0,)
        pair_tau = torch.tensor([taus[k % len(taus)] for k in range(floats // 2)], dtype=torch.float64)
        tau = torch.where(pair_tau > 0, pair_tau, torch.inf).repeat_interleave(2)
        self.decayed = bool((pair_tau > 0).any())
        self.longest = float(pair_tau.max()) if self.decayed else math.inf
        # Per channel: time constant (inf = no decay) and log of the decay factor (0 = none).
        self._decay_tables: dict[torch.device, tuple[Tensor, Tensor]] = {
            torch.device("cpu"): (tau.float(), torch.where(tau.isinf(), 0.0, -1 / tau).float())}

    # ----------------------------------------------------------------- the position code
    def angles(self, positions: Tensor) -> Tensor:
        """Angles (…, F/2) in float64, reduced modulo 2*pi, for integer positions (…)."""
        frequencies = self._frequencies.get(positions.device)
        if frequencies is None:
            half = torch.arange(0, self.floats, 2, dtype=torch.float64, device=positions.device)
            frequencies = self.position_base ** (-half / self.floats)  # (F/2,)
            self._frequencies[positions.device] = frequencies
        return torch.remainder(positions.to(torch.float64).unsqueeze(-1) * frequencies, 2 * math.pi)

    def sin_cos(self, positions: Tensor) -> tuple[Tensor, Tensor]:
        """(sin, cos) of :meth:`angles`, each (…, F/2) float32: computed once per pass or step and
        shared by the position code and the readout of every layer."""
        a = self.angles(positions)
        return torch.sin(a).to(torch.float32), torch.cos(a).to(torch.float32)

    def position_code(self, positions: Tensor, sin_cos: tuple[Tensor, Tensor] | None = None) -> Tensor:
        """(…, F) float32: sin at even, cos at odd indices."""
        sin, cos = sin_cos if sin_cos is not None else self.sin_cos(positions)
        return torch.stack((sin, cos), dim=-1).flatten(-2)

    def decay_tables(self, device: torch.device, shift: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Per channel (F,) float32: time constant (inf = no decay) and log of the decay factor.

        ``shift`` (F/2,): a layer's learned offsets of the log time constant per channel pair
        (``ModelConfig.learn_decays``); each decayed pair's constant becomes ``tau * exp(shift)``,
        kept within [1, the longest of the starting constants]; undecayed pairs stay undecayed."""
        tables = self._decay_tables.get(device)
        if tables is None:
            cpu = self._decay_tables[torch.device("cpu")]
            tables = self._decay_tables[device] = (cpu[0].to(device), cpu[1].to(device))
        if shift is None:
            return tables
        fixed = tables[0]
        decayed = fixed.isfinite()
        # A finite stand-in where there is no decay: inf * exp(shift) would send NaN gradients back.
        base = torch.where(decayed, fixed, torch.ones_like(fixed))
        moved = (base * shift.float().repeat_interleave(2).exp()).clamp(1.0, self.longest)
        tau = torch.where(decayed, moved, fixed)
        return tau, torch.where(decayed, -1 / moved, torch.zeros_like(moved))

    # ----------------------------------------------------------------- the sum
    def accumulate(self, coded: Tensor, start: Tensor | None, tables: tuple[Tensor, Tensor] | None = None) -> Tensor:
        """The field after every position of ``coded`` (B, T, F) float32, from ``start`` (B, F);
        ``tables``: a layer's :meth:`decay_tables` (default: the configured decays)."""
        if self.decayed:
            return self.decayed_cumsum(coded, start, (tables or self.decay_tables(coded.device))[1])
        field = torch.cumsum(coded, dim=1)
        return field if start is None else field + start.unsqueeze(1)

    def advance(self, coded: Tensor, field: Tensor, tables: tuple[Tensor, Tensor] | None = None) -> Tensor:
        """One position: the field (B, F) after adding ``coded`` (B, F). O(1)."""
        if self.decayed:
            return coded + field * (tables or self.decay_tables(coded.device))[1].exp()
        return coded + field

    def decayed_cumsum(self, x: Tensor, start: Tensor | None, log_decay: Tensor) -> Tensor:
        """``y_t = lam * y_{t-1} + x_t`` per channel over (B, T, F) float32, from ``start`` (B, F);
        ``log_decay`` (F,): ``log(lam)`` per channel (:meth:`decay_tables`).

        Inside a chunk of C positions ``y_j = lam**j * cumsum_i(lam**-i * x_i) + lam**(j+1) * carry``;
        the carry (the previous chunk's last ``y``) is the only sequential part: T / C small steps.
        """
        batch, length, width = x.shape
        chunk = DECAY_CHUNK
        pad = (-length) % chunk
        if pad:
            x = F.pad(x, (0, 0, 0, pad))
        x = x.view(batch, -1, chunk, width)
        steps = torch.arange(chunk, dtype=torch.float32, device=x.device).unsqueeze(-1)
        local = torch.cumsum(x * torch.exp(-steps * log_decay), dim=2) * torch.exp(steps * log_decay)
        carry_gain = torch.exp((steps + 1) * log_decay)  # (C, F)
        carry = start if start is not None else x.new_zeros(batch, width)
        carries = []
        for n in range(x.shape[1]):
            carries.append(carry)
            carry = local[:, n, -1] + carry_gain[-1] * carry
        field = local + carry_gain * torch.stack(carries, dim=1).unsqueeze(2)
        return field.view(batch, -1, width)[:, :length]

    # ----------------------------------------------------------------- the readout
    def demodulate(self, field: Tensor, positions: Tensor, sin_cos: tuple[Tensor, Tensor],
                   tables: tuple[Tensor, Tensor] | None = None) -> Tensor:
        """Each (sin, cos) pair of ``field`` (…, F) rotated back by the current position's angle
        (history relative to *now*) and scaled by 1/sqrt of the positions it holds (``t + 1``, at
        most ``tau`` in a decayed group)."""
        sin, cos = (t.to(field.dtype) for t in sin_cos)
        f_sin, f_cos = field[..., 0::2], field[..., 1::2]
        # (f_cos + i f_sin) * exp(-i angle)
        real = f_cos * cos + f_sin * sin
        imag = f_sin * cos - f_cos * sin
        field = torch.stack((imag, real), dim=-1).flatten(-2)
        count = positions.to(field.dtype).unsqueeze(-1) + 1
        if self.decayed:
            count = torch.minimum(count, (tables or self.decay_tables(field.device))[0].to(field.dtype))
        return field * torch.rsqrt(count)
