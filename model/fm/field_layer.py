"""One residual field layer of the deep Field Machine (``ModelConfig.field_layers`` > 0).

::

    u_t     = Linear(width, F)(norm(x_t)) * pos(t)       (what the layer writes)
    field_t = lam * field_{t-1} + u_t                    (its own field, F floats per stream;
                                                          lam learned per layer with learn_decays)
    x_t    += Linear(F, width)(demod(field_t))           (what it reads back; with ``gated``,
              * SiLU(Linear(width, width)(norm(x_t)))     times a gate from the layer's input)
    x_t    += MLP(norm(x_t))

Each layer keeps its own field; a later layer's field sums what the earlier layers *read*, so the
stack can hold "the alto's last note" apart from the bass line in a way one sum of token vectors
cannot. Training is one cumulative sum per layer; a generation step is one multiply-add per
channel per layer.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model.fm.field import FieldCode


class FieldLayer(nn.Module):
    def __init__(self, width: int, floats: int, hidden: int, dropout: float, depth: int,
                 learn_decays: bool = False, gated: bool = False) -> None:
        super().__init__()
        # ``ModelConfig.learn_decays``: this layer's offsets of the log decay time constants, one per
        # channel pair (FieldCode.decay_tables). Zero is the configured decays, so weight decay
        # pulls toward them and a checkpoint trained without them starts as it was.
        self.decay_shift = nn.Parameter(torch.zeros(floats // 2)) if learn_decays else None
        self.write_norm = nn.RMSNorm(width)
        self.write = nn.Linear(width, floats)
        self.read = nn.Linear(floats, width)
        # ``ModelConfig.gated``: the token's own view decides how much of what the field holds
        # passes, channel by channel (the output gate of gated linear recurrences).
        self.gate = nn.Linear(width, width) if gated else None
        self.mlp_norm = nn.RMSNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width))
        self.drop = nn.Dropout(dropout)
        # Residual branches scaled down with depth, so the stack starts near the identity.
        for out in (self.read, self.mlp[2]):
            nn.init.normal_(out.weight, std=0.02 / math.sqrt(2 * depth))
            nn.init.zeros_(out.bias)

    def coded(self, x: Tensor, position_code: Tensor) -> Tensor:
        """What the layer adds to its field: (…, F) float32."""
        return self.write(self.write_norm(x.to(self.write_norm.weight.dtype))).float() * position_code

    def decay_tables(self, code: FieldCode, device: torch.device) -> tuple[Tensor, Tensor]:
        """This layer's decays (:meth:`FieldCode.decay_tables`), built once per pass or step."""
        return code.decay_tables(device, self.decay_shift)

    def update(self, x: Tensor, field: Tensor, positions: Tensor, sin_cos: tuple[Tensor, Tensor],
               code: FieldCode, tables: tuple[Tensor, Tensor]) -> Tensor:
        """The residual stream after reading ``field`` (the layer's field at each position)."""
        read = self.read(code.demodulate(field, positions, sin_cos, tables).to(self.read.weight.dtype))
        if self.gate is not None:
            read = read * F.silu(self.gate(self.write_norm(x.to(self.write_norm.weight.dtype))))
        x = x + self.drop(read)
        return x + self.drop(self.mlp(self.mlp_norm(x.to(self.mlp_norm.weight.dtype))))

    def forward(self, x: Tensor, positions: Tensor, sin_cos: tuple[Tensor, Tensor], code: FieldCode,
                start: Tensor | None, last: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Parallel pass over (B, T, width); returns the new stream and the field after the last
        position (B, F): position ``last`` (B,) of each row where given (right-padded rows)."""
        tables = self.decay_tables(code, x.device)
        field = code.accumulate(self.coded(x, code.position_code(positions, sin_cos)), start, tables)
        end = field[:, -1] if last is None else field[torch.arange(field.shape[0], device=field.device), last]
        return self.update(x, field, positions, sin_cos, code, tables), end

    def step(self, x: Tensor, position: Tensor, sin_cos: tuple[Tensor, Tensor], code: FieldCode,
             field: Tensor) -> tuple[Tensor, Tensor]:
        """One token per stream: (B, width) at positions (B,), field (B, F) -> new stream, field."""
        tables = self.decay_tables(code, x.device)
        field = code.advance(self.coded(x, code.position_code(position, sin_cos)), field, tables)
        return self.update(x, field, position, sin_cos, code, tables), field
