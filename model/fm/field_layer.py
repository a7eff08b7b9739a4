"""One residual field layer of the deep Field Machine (``ModelConfig.field_layers`` > 0).

::

    w_t     = Linear(width, F)(norm(x_t))
    u_t     = (w_t + sum_j c_j * w_{t-j}) * pos(t)       (what the layer writes; with ``conv`` = k,
                                                          j = 1..k-1, c_j learned per channel)
    field_t = lam * field_{t-1} + u_t                    (its own field, F floats per stream;
                                                          lam learned per layer with learn_decays)
    x_t    += Linear(F, width)(demod(field_t))           (what it reads back; with ``gated``,
              * SiLU(Linear(width, width)(norm(x_t)))     times a gate from the layer's input)
    x_t    += MLP(norm(x_t))

Each layer keeps its own field; a later layer's field sums what the earlier layers *read*, so the
stack can hold "the alto's last note" apart from the bass line in a way one sum of token vectors
cannot. Training is one cumulative sum per layer; a generation step is one multiply-add per
channel per layer. With ``conv`` a layer also keeps its last k-1 writes (k-1 x F floats) beside
its field: exact access to the last few tokens, which a decayed sum only blurs.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model.fm.field import FieldCode


class FieldLayer(nn.Module):
    def __init__(self, width: int, floats: int, hidden: int, dropout: float, depth: int,
                 learn_decays: bool = False, gated: bool = False, conv: int = 0) -> None:
        super().__init__()
        self.floats = floats
        # ``ModelConfig.conv``: weights of the k-1 previous writes, per channel (row j-1: j tokens
        # back). Zero at first, so a layer given a convolution (model.train --init_from) starts as it was.
        self.conv = nn.Parameter(torch.zeros(conv - 1, floats)) if conv > 1 else None
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

    def normed(self, x: Tensor) -> Tensor:
        """The layer's view of its input, which it writes from and (``gated``) gates its read by."""
        return self.write_norm(x.to(self.write_norm.weight.dtype))

    def convolve(self, written: Tensor, previous: Tensor | None, last: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """(B, T, F) writes -> each plus its weighted k-1 predecessors, reading ``previous`` (B, k-1, F)
        (the writes before the first, oldest first; zeros at a stream's start), and the last k-1
        writes at the end of each row (at position ``last`` (B,) where given). Without ``conv``:
        the writes as they are and None."""
        if self.conv is None:
            return written, None
        back = len(self.conv)
        batch, length, _ = written.shape
        if previous is None:
            previous = written.new_zeros(batch, back, self.floats)
        full = torch.cat((previous.to(written.dtype), written), dim=1)  # (B, k-1+T, F)
        mixed = written
        for j in range(1, back + 1):
            mixed = mixed + self.conv[j - 1].float() * full[:, back - j:back - j + length]
        if last is None:
            end = full[:, -back:]
        else:  # the writes at positions last-k+2 .. last, i.e. full[last+1 .. last+k-1]
            index = (last.view(-1, 1) + 1 + torch.arange(back, device=full.device)).view(-1, back, 1)
            end = full.gather(1, index.expand(-1, -1, self.floats))
        return mixed, end

    def split_state(self, state: Tensor | None) -> tuple[Tensor | None, Tensor | None]:
        """This layer's state (B, ModelConfig.layer_state_floats) -> its field (B, F) and its last writes (B, k-1, F)."""
        if state is None:
            return None, None
        if self.conv is None:
            return state, None
        return state[:, :self.floats], state[:, self.floats:].reshape(len(state), len(self.conv), self.floats)

    @staticmethod
    def join_state(field: Tensor, previous: Tensor | None) -> Tensor:
        return field if previous is None else torch.cat((field, previous.flatten(1)), dim=-1)

    def decay_tables(self, code: FieldCode, device: torch.device) -> tuple[Tensor, Tensor]:
        """This layer's decays (:meth:`FieldCode.decay_tables`), built once per pass or step."""
        return code.decay_tables(device, self.decay_shift)

    def update(self, x: Tensor, normed: Tensor, field: Tensor, positions: Tensor, sin_cos: tuple[Tensor, Tensor],
               code: FieldCode, tables: tuple[Tensor, Tensor]) -> Tensor:
        """The residual stream after reading ``field`` (the layer's field at each position);
        ``normed``: :meth:`normed` of ``x``."""
        read = self.read(code.demodulate(field, positions, sin_cos, tables).to(self.read.weight.dtype))
        if self.gate is not None:
            read = read * F.silu(self.gate(normed))
        x = x + self.drop(read)
        return x + self.drop(self.mlp(self.mlp_norm(x.to(self.mlp_norm.weight.dtype))))

    def forward(self, x: Tensor, positions: Tensor, sin_cos: tuple[Tensor, Tensor], code: FieldCode,
                start: Tensor | None, last: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Parallel pass over (B, T, width) from ``start`` (B, layer_state_floats) or an empty state;
        returns the new stream and the layer's state after the last position (B, layer_state_floats):
        position ``last`` (B,) of each row where given (right-padded rows)."""
        tables = self.decay_tables(code, x.device)
        begin, previous = self.split_state(start)
        normed = self.normed(x)
        written, previous = self.convolve(self.write(normed).float(), previous, last)
        field = code.accumulate(written * code.position_code(positions, sin_cos), begin, tables)
        end = field[:, -1] if last is None else field[torch.arange(field.shape[0], device=field.device), last]
        return self.update(x, normed, field, positions, sin_cos, code, tables), self.join_state(end, previous)

    def step(self, x: Tensor, position: Tensor, sin_cos: tuple[Tensor, Tensor], code: FieldCode,
             state: Tensor) -> tuple[Tensor, Tensor]:
        """One token per stream: (B, width) at positions (B,), state (B, layer_state_floats) -> new stream, state."""
        tables = self.decay_tables(code, x.device)
        field, previous = self.split_state(state)
        normed = self.normed(x)
        written, previous = self.convolve(self.write(normed).float().unsqueeze(1), previous)
        field = code.advance(written[:, 0] * code.position_code(position, sin_cos), field, tables)
        return self.update(x, normed, field, position, sin_cos, code, tables), self.join_state(field, previous)
