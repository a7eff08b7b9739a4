"""The Field Machine (see :mod:`model.fm` for the architecture): a parallel ``forward`` for
training and a batched O(1) ``step`` for generation."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model.fm.config import ModelConfig, parse_decays
from model.fm.factored_head import FactoredHead
from model.fm.lookup import DNALookup
from model.fm.state import FieldState, FMOutput

DECAY_CHUNK = 32  # positions per chunk of the decayed cumulative sum; exp(32 / tau) for tau >= 1


class FieldMachine(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        c = config
        self.voice_embedding = nn.Embedding(c.voice_slots, c.voice_embedding)
        self.project = nn.Linear(c.dna_width, c.dim)
        self.lookup = DNALookup(c.dim) if c.dna_lookup else None
        width = c.dim * (2 if c.direct else 1)
        layers: list[nn.Module] = []
        for _ in range(c.decoder_layers):
            layers += [nn.Linear(width, c.decoder_hidden), nn.GELU(), nn.Dropout(c.dropout)]
            width = c.decoder_hidden
        self.decoder = nn.Sequential(*layers)
        self.token_head = (FactoredHead(c.vocab_size, width) if c.head == "factored"
                           else nn.Linear(width, c.vocab_size))
        self.velocity_head = nn.Linear(width, c.velocity_levels)
        self.voice_head = nn.Linear(width, c.max_voices)
        self.field_dropout = nn.Dropout(c.field_dropout)
        # Not a buffer: module.to(dtype) would cast it, and the angle must stay float64.
        self._frequencies: dict[torch.device, Tensor] = {}
        # Per channel: time constant (inf = no decay) and log of the decay factor (0 = none).
        taus = parse_decays(c.decays) or (0.0,)
        pair_tau = torch.tensor([taus[k % len(taus)] for k in range(c.dim // 2)], dtype=torch.float64)
        tau = torch.where(pair_tau > 0, pair_tau, torch.inf).repeat_interleave(2)
        self._decayed = bool((pair_tau > 0).any())
        # Plain float32 tensors, not buffers, for the same reason as the frequencies.
        self._decay_tables: dict[torch.device, tuple[Tensor, Tensor]] = {
            torch.device("cpu"): (tau.float(), torch.where(tau.isinf(), 0.0, -1 / tau).float())}

    # ----------------------------------------------------------------- pieces
    def angles(self, positions: Tensor) -> Tensor:
        """Angles (…, D/2) in float64, reduced modulo 2*pi, for integer positions (…)."""
        frequencies = self._frequencies.get(positions.device)
        if frequencies is None:
            half = torch.arange(0, self.config.dim, 2, dtype=torch.float64, device=positions.device)
            frequencies = self.config.position_base ** (-half / self.config.dim)  # (D/2,)
            self._frequencies[positions.device] = frequencies
        return torch.remainder(positions.to(torch.float64).unsqueeze(-1) * frequencies, 2 * math.pi)

    def sin_cos(self, positions: Tensor) -> tuple[Tensor, Tensor]:
        """(sin, cos) of :meth:`angles`, each (…, D/2) float32: computed once per pass or step and
        shared by the position code and the ``demod`` readout."""
        a = self.angles(positions)
        return torch.sin(a).to(torch.float32), torch.cos(a).to(torch.float32)

    def position_code(self, positions: Tensor, sin_cos: tuple[Tensor, Tensor] | None = None) -> Tensor:
        """(…, D) float32: sin at even, cos at odd indices."""
        sin, cos = sin_cos if sin_cos is not None else self.sin_cos(positions)
        return torch.stack((sin, cos), dim=-1).flatten(-2)

    def decay_tables(self, device: torch.device) -> tuple[Tensor, Tensor]:
        """Per channel (D,) float32: time constant (inf = no decay) and log of the decay factor."""
        tables = self._decay_tables.get(device)
        if tables is None:
            cpu = self._decay_tables[torch.device("cpu")]
            tables = self._decay_tables[device] = (cpu[0].to(device), cpu[1].to(device))
        return tables

    def embed(self, dna: Tensor, voice_slots: Tensor) -> Tensor:
        """Project DNA (…, 7) and voice slots (…) to (…, D)."""
        features = torch.cat((dna.to(self.project.weight.dtype),
                              self.voice_embedding(voice_slots)), dim=-1)
        x = self.project(features)
        return x if self.lookup is None else x + self.lookup(dna).to(x.dtype)

    def readout(self, field: Tensor, positions: Tensor, current: Tensor,
                sin_cos: tuple[Tensor, Tensor] | None = None) -> Tensor:
        """Decoder input from the field (…, D) float32 at integer positions (…) or (T,)."""
        if self.config.readout == "demod":
            sin, cos = sin_cos if sin_cos is not None else self.sin_cos(positions)
            sin, cos = sin.to(field.dtype), cos.to(field.dtype)
            f_sin, f_cos = field[..., 0::2], field[..., 1::2]
            # (f_cos + i f_sin) * exp(-i angle)
            real = f_cos * cos + f_sin * sin
            imag = f_sin * cos - f_cos * sin
            field = torch.stack((imag, real), dim=-1).flatten(-2)
            count = positions.to(field.dtype).unsqueeze(-1) + 1
            if self._decayed:
                count = torch.minimum(count, self.decay_tables(field.device)[0].to(field.dtype))
            field = field * torch.rsqrt(count)
        x = self.field_dropout(field.to(self.project.weight.dtype))
        if self.config.direct:
            x = torch.cat((x, current.to(x.dtype)), dim=-1)
        return x

    def decode(self, x: Tensor) -> FMOutput:
        h = self.decoder(x)
        return FMOutput(self.token_head(h), self.velocity_head(h), self.voice_head(h))

    # ----------------------------------------------------------------- training
    def forward(self, dna: Tensor, voice_slots: Tensor, *, start: FieldState | None = None,
                return_state: bool = False) -> FMOutput | tuple[FMOutput, FieldState]:
        """Parallel pass over (B, T) sequences.

        ``dna`` (B, T, 7), ``voice_slots`` (B, T). Each row starts at position 0 with an empty
        field, or continues from ``start`` (its field and positions), so a long sequence can be
        processed in chunks with the same result. Sequences of different lengths are padded on
        the right: padding only adds to the field after a sequence's last real token, so it never
        reaches a real position (mask it out of the loss). Output at t predicts token t+1.
        With ``return_state``, also the :class:`FieldState` after the last position of each row.
        """
        batch, length = voice_slots.shape
        current = self.embed(dna, voice_slots)  # (B, T, D)
        positions = torch.arange(length, device=voice_slots.device)  # (T,), broadcast over B
        if start is not None:
            positions = start.position.unsqueeze(1) + positions  # (B, T)
        sin_cos = self.sin_cos(positions)
        coded = current.float() * self.position_code(positions, sin_cos)
        if self._decayed:
            field = self.decayed_cumsum(coded, None if start is None else start.field)
        else:
            field = torch.cumsum(coded, dim=1)
            if start is not None:
                field = field + start.field.unsqueeze(1)
        out = self.decode(self.readout(field, positions, current, sin_cos))
        if not return_state:
            return out
        end = start.position + length if start is not None else torch.full(
            (batch,), length, dtype=torch.int64, device=field.device)
        return out, FieldState(field[:, -1].contiguous(), end)

    # ----------------------------------------------------------------- generation
    @torch.no_grad()
    def step(self, state: FieldState, dna: Tensor, voice_slots: Tensor) -> tuple[FMOutput, FieldState]:
        """Advance B streams by one token each, in O(1).

        ``state``: field (B, D) and position (B,) — streams may be at different positions.
        ``dna`` (B, 7) and ``voice_slots`` (B,) describe each stream's new token, which takes
        position ``state.position``. Returns the outputs (B, V) predicting each stream's next token
        and the new state (the input state is not modified).
        """
        current = self.embed(dna, voice_slots)  # (B, D)
        sin_cos = self.sin_cos(state.position)
        field = current.float() * self.position_code(state.position, sin_cos)
        if self._decayed:
            field = field + state.field * self.decay_tables(field.device)[1].exp()
        else:
            field = field + state.field
        out = self.decode(self.readout(field, state.position, current, sin_cos))
        return out, FieldState(field, state.position + 1)

    def decayed_cumsum(self, x: Tensor, start: Tensor | None) -> Tensor:
        """``y_t = lam * y_{t-1} + x_t`` per channel over (B, T, D) float32, from ``start`` (B, D).

        Inside a chunk of C positions ``y_j = lam**j * cumsum_i(lam**-i * x_i) + lam**(j+1) * carry``;
        the carry (the previous chunk's last ``y``) is the only sequential part: T / C small steps.
        """
        batch, length, dim = x.shape
        chunk = DECAY_CHUNK
        pad = (-length) % chunk
        if pad:
            x = F.pad(x, (0, 0, 0, pad))
        x = x.view(batch, -1, chunk, dim)
        steps = torch.arange(chunk, dtype=torch.float32, device=x.device).unsqueeze(-1)
        log_decay = self.decay_tables(x.device)[1]
        local = torch.cumsum(x * torch.exp(-steps * log_decay), dim=2) * torch.exp(steps * log_decay)
        carry_gain = torch.exp((steps + 1) * log_decay)  # (C, D)
        carry = start if start is not None else x.new_zeros(batch, dim)
        carries = []
        for n in range(x.shape[1]):
            carries.append(carry)
            carry = local[:, n, -1] + carry_gain[-1] * carry
        field = local + carry_gain * torch.stack(carries, dim=1).unsqueeze(2)
        return field.view(batch, -1, dim)[:, :length]

    def parameter_count(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def set_vocabulary(self, vocab) -> None:
        """Give a factored head its token -> parts table (a no-op for the free head)."""
        if isinstance(self.token_head, FactoredHead):
            self.token_head.set_vocabulary(vocab)

