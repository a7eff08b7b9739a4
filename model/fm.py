"""The Field Machine: token DNA -> projection x position code -> cumulative field -> MLP decoder.

::

    dna(23) = 7 floats + 16-dim voice embedding
    x_t     = Linear(23, dim)(dna_t) * pos(t)            (multiplied, not added)
    field_t = x_0 + ... + x_t                            (one cumsum for training)
    logits  = decoder(readout(field_t [, x_t]))          (next token, velocity level, voice)

Generation is O(1) per token: a stream's whole history is its field vector plus its position
(:class:`FieldState`), and :meth:`FieldMachine.step` advances a batch of streams, each at its own
position, by one token. The position code is computed from a float64 angle, reduced modulo 2*pi
before the sine, so it stays exact at position 30,000 whatever dtype the weights use; the field
itself is kept in float32.

Readouts (``ModelConfig.readout``):

* ``field``: the seed's; the decoder reads the raw cumulative field.
* ``demod``: each (sin, cos) pair of the field is rotated back by the current position's angle, so
  the decoder sees history relative to *now*, and scaled by 1/sqrt(t+1).

``ModelConfig.direct`` adds a direct path: the current token's projection (before the position
code) is concatenated to the decoder's input.

``ModelConfig.decays`` splits the field into groups of channels that forget at different rates:
a group with time constant tau keeps ``field_t = lam * field_{t-1} + x_t`` with
``lam = exp(-1/tau)`` (tau 0: no decay, the seed's plain sum). The state is still one (B, D) row
per stream, ``step`` still O(1); the parallel pass computes the decayed sums with cumulative sums
inside chunks of ``DECAY_CHUNK`` positions (rescaled by ``lam**-i``, which stays finite there)
plus one carry per chunk. With ``demod``, a decayed group is scaled by 1/sqrt(min(t+1, tau)).

``ModelConfig.head = "factored"`` builds each token's output row from shared parts instead of
one free row per token: a row for its (kind, pitch), one for its (kind, duration) and one for its
(kind, bar position), summed, plus a per-token bias. The corpus has ~20 occurrences per vocabulary
entry, so a free row learns slowly; a shared pitch row learns from every note of that pitch. The
token -> parts table comes from the tokenizer (:meth:`FieldMachine.set_vocabulary`) and is saved
with the weights.

``ModelConfig.dna_lookup`` adds learned rows for the DNA's discrete values to its linear
projection: pitch (from pitch class and octave), pitch class, octave, duration, beat position
(the bar fraction, in 1/144ths) and velocity level, each recovered from the DNA floats. A linear
map of (sin, cos, octave) cannot single out one pitch; a row per pitch can. Still DNA in, one
vector out: the field and the step are unchanged.

``ModelConfig.field_dropout`` drops channels of the decoder's view of the field while training.

Shapes: B streams or sequences, T positions, V vocabulary, D = ``dim``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

DNA_FLOATS = 7  # the tokenizer's continuous DNA values (model.tokenizer.DNA_FLOATS)
READOUTS = ("field", "demod")
HEADS = ("free", "factored")
DECAY_CHUNK = 32  # positions per chunk of the decayed cumulative sum; exp(32 / tau) for tau >= 1


def parse_decays(text: str) -> tuple[float, ...]:
    """``"0,256,16"`` -> (0.0, 256.0, 16.0); empty -> (). Time constants in tokens, 0 = no decay."""
    try:
        values = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError as exc:
        raise ValueError(f"decays must be comma-separated numbers, not {text!r}") from exc
    if any(not (v == 0 or v >= 1) or not math.isfinite(v) for v in values):
        raise ValueError(f"each decay time constant must be 0 (no decay) or >= 1 token, not {text!r}")
    return values


@dataclass(frozen=True)
class ModelConfig:
    """Every hyper-parameter of the model. Checkpoints store ``asdict(config)``."""

    vocab_size: int = field(metadata={"help": 'Token vocabulary size (from the tokenizer).'})
    voice_slots: int = field(default=22, metadata={"help": 'Rows of the voice embedding: note voices plus one slot per non-note kind (tokenizer).'})
    max_voices: int = field(default=16, metadata={"help": 'Outputs of the voice head.'})
    velocity_levels: int = field(default=8, metadata={"help": 'Outputs of the velocity head.'})
    dim: int = field(default=4096, metadata={"help": 'Width of the field.'})
    decoder_layers: int = field(default=3, metadata={"help": 'Hidden layers of the MLP decoder.'})
    decoder_hidden: int = field(default=2048, metadata={"help": "Width of the decoder's hidden layers."})
    dropout: float = field(default=0.1, metadata={"help": 'Dropout in the decoder.'})
    voice_embedding: int = field(default=16, metadata={"help": 'Width of the learned voice embedding in the DNA.'})
    position_base: float = field(default=32768.0, metadata={"help": 'Base of the sinusoidal position code.'})
    readout: str = field(default="demod", metadata={"help": "How the decoder reads the field: 'field' (the seed's) or 'demod'.", "choices": READOUTS})
    direct: bool = field(default=True, metadata={"help": "Concatenate the current token's projection to the decoder input."})
    decays: str = field(default="", metadata={"help": "Comma-separated decay time constants in tokens for groups of field channels, dealt pair by pair (0 = no decay; empty = one undecayed field, the seed's)."})
    head: str = field(default="free", metadata={"help": "Next-token head: 'free' (one learned row per token) or 'factored' (rows summed from the token's pitch, duration and position parts).", "choices": HEADS})
    dna_lookup: bool = field(default=False, metadata={"help": "Add learned rows for the DNA's discrete values (pitch, pitch class, octave, duration, beat position, velocity) to its projection."})
    field_dropout: float = field(default=0.0, metadata={"help": "Dropout on the decoder's view of the field (training only)."})

    def __post_init__(self) -> None:
        if self.readout not in READOUTS:
            raise ValueError(f"readout must be one of {READOUTS}, not {self.readout!r}")
        if self.head not in HEADS:
            raise ValueError(f"head must be one of {HEADS}, not {self.head!r}")
        if self.dim % 2:
            raise ValueError("dim must be even (the position code pairs sin and cos)")
        if self.vocab_size < 5 or self.decoder_layers < 1 or self.decoder_hidden < 1:
            raise ValueError("vocab_size >= 5, decoder_layers >= 1 and decoder_hidden >= 1 are required")
        if not 0 <= self.dropout < 1 or not 0 <= self.field_dropout < 1:
            raise ValueError("dropout and field_dropout must lie in [0, 1)")
        if len(parse_decays(self.decays)) > self.dim // 2:
            raise ValueError("decays: more groups than channel pairs")

    @property
    def dna_width(self) -> int:
        return DNA_FLOATS + self.voice_embedding

    @property
    def state_floats(self) -> int:
        """Floats of state per stream (the field; the position is one integer more)."""
        return self.dim


@dataclass
class FieldState:
    """Per-stream generation state: ``field`` (B, D) float32 and ``position`` (B,) int64.

    ``position`` is the position the next token will take. Its size never grows with length.
    """

    field: Tensor
    position: Tensor

    @classmethod
    def empty(cls, batch: int, dim: int, device: torch.device | str = "cpu") -> "FieldState":
        return cls(torch.zeros(batch, dim, dtype=torch.float32, device=device),
                   torch.zeros(batch, dtype=torch.int64, device=device))

    def nbytes(self) -> int:
        return self.field.numel() * self.field.element_size() + self.position.numel() * 8

    def index(self, rows: Tensor | list[int]) -> "FieldState":
        return FieldState(self.field[rows], self.position[rows])


@dataclass
class FMOutput:
    logits: Tensor  # (..., V) next token
    velocity: Tensor  # (..., velocity_levels) velocity level of the next token
    voice: Tensor  # (..., max_voices) voice of the next token


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


class DNALookup(nn.Module):
    """Sum of learned rows (…, D) for the discrete values the DNA floats (…, 7) encode.

    Reads the layout of :meth:`model.tokenizer.Tokenizer.token_dna`: pitch class as (sin, cos),
    octave / 10, log duration scaled to 0..1, beat angle as (sin, cos), velocity / 127.
    """

    SIZES = {"pitch": 132, "pitch_class": 12, "octave": 11, "duration": 65, "beat": 144, "velocity": 9}

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.tables = nn.ModuleDict({k: nn.Embedding(n, dim) for k, n in self.SIZES.items()})
        for table in self.tables.values():
            nn.init.normal_(table.weight, std=0.02)

    def indices(self, dna: Tensor) -> dict[str, Tensor]:
        dna = dna.float()
        turn = lambda s, c: torch.remainder(torch.atan2(s, c) / (2 * math.pi), 1.0)
        pitch_class = torch.round(turn(dna[..., 0], dna[..., 1]) * 12).long() % 12
        octave = torch.round(dna[..., 2] * 10).long().clamp(0, 10)
        n = self.SIZES
        return {"pitch": (octave * 12 + pitch_class).clamp(0, n["pitch"] - 1),
                "pitch_class": pitch_class, "octave": octave,
                "duration": torch.round(dna[..., 3] * 64).long().clamp(0, 64),
                "beat": torch.round(turn(dna[..., 4], dna[..., 5]) * 144).long() % 144,
                "velocity": torch.round(dna[..., 6] * 8).long().clamp(0, 8)}

    def forward(self, dna: Tensor) -> Tensor:
        return sum(self.tables[k](i) for k, i in self.indices(dna).items())


class FactoredHead(nn.Module):
    """Logits ``h @ W.T + b`` with ``W[token] = P[kind, a] + Q[kind, b] + R[kind, c]``.

    (a, b, c) are the token key's fields (:class:`model.tokenizer.TokenKey`: pitch, duration
    index, position for a NOTE; numerator, denominator for a BAR; -1 where unused), clamped to
    the table sizes. ``parts`` (V, 3) is a saved buffer of row indices.
    """

    SIZES = (130, 33, 257)  # a + 1, b + 1, c + 1 are clamped to [0, size)
    KINDS = 7

    def __init__(self, vocab_size: int, width: int) -> None:
        super().__init__()
        self.tables = nn.ModuleList(nn.Embedding(self.KINDS * n, width) for n in self.SIZES)
        for table in self.tables:
            nn.init.normal_(table.weight, std=width ** -0.5)
        self.bias = nn.Parameter(torch.zeros(vocab_size))
        self.register_buffer("parts", torch.zeros(vocab_size, 3, dtype=torch.int64))

    def set_vocabulary(self, vocab) -> None:
        if len(vocab) != self.parts.shape[0]:
            raise ValueError(f"vocabulary of {len(vocab)} tokens for a head of {self.parts.shape[0]}")
        rows = [[key.kind * n + min(max(value + 1, 0), n - 1)
                 for value, n in zip((key.a, key.b, key.c), self.SIZES)] for key in vocab]
        self.parts.copy_(torch.tensor(rows, dtype=torch.int64))

    def weight(self) -> Tensor:
        return sum(table(self.parts[:, i]) for i, table in enumerate(self.tables))

    def forward(self, h: Tensor) -> Tensor:
        # h @ (P + Q + R).T = h @ P.T + h @ Q.T + h @ R.T: three products with the small tables
        # (7 * 420 rows in all), then a gather to the V tokens, instead of one with V rows.
        if torch.is_grad_enabled():
            logits = self.bias.to(h.dtype)
            for i, table in enumerate(self.tables):
                logits = logits + torch.index_select(F.linear(h, table.weight), -1, self.parts[:, i])
            return logits
        # Inference: gather whole rows of the transposed products (V, N) rather than columns of
        # (N, V) -- 6x faster on CPU for a batch of 128 streams. Same sums, same order.
        flat = h.reshape(-1, h.shape[-1])
        logits_t = self.bias.to(h.dtype).unsqueeze(1)
        for i, table in enumerate(self.tables):
            logits_t = logits_t + torch.index_select(F.linear(table.weight, flat), 0, self.parts[:, i])
        return logits_t.t().contiguous().reshape(*h.shape[:-1], -1)


def sequence_loss(out: FMOutput, targets: Tensor, velocity: Tensor, voice: Tensor,
                  mask: Tensor, is_note: Tensor) -> dict[str, Tensor]:
    """Mean next-token cross-entropy over ``mask``; velocity and voice losses over next notes.

    All targets (B, T) are already shifted (target t is token t+1). Returns the token loss
    (``token``, nats per token), the head losses and their sum (``total``) for backprop.
    """
    # ignore_index rather than a boolean gather: no copy of the (B*T, V) logits.
    token = F.cross_entropy(out.logits.reshape(-1, out.logits.shape[-1]).float(),
                            targets.masked_fill(~mask, -100).reshape(-1), ignore_index=-100)
    notes = (mask & is_note).reshape(-1)
    if notes.any():
        vel = F.cross_entropy(out.velocity.reshape(-1, out.velocity.shape[-1])[notes].float(),
                              velocity.reshape(-1)[notes])
        voi = F.cross_entropy(out.voice.reshape(-1, out.voice.shape[-1])[notes].float(),
                              voice.reshape(-1)[notes])
    else:
        vel = voi = token.new_zeros(())
    return {"token": token, "velocity": vel, "voice": voi, "total": token + 0.1 * (vel + voi)}
