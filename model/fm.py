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

    def __post_init__(self) -> None:
        if self.readout not in READOUTS:
            raise ValueError(f"readout must be one of {READOUTS}, not {self.readout!r}")
        if self.dim % 2:
            raise ValueError("dim must be even (the position code pairs sin and cos)")
        if self.vocab_size < 5 or self.decoder_layers < 1 or self.decoder_hidden < 1:
            raise ValueError("vocab_size >= 5, decoder_layers >= 1 and decoder_hidden >= 1 are required")
        if not 0 <= self.dropout < 1:
            raise ValueError("dropout must lie in [0, 1)")

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
        width = c.dim * (2 if c.direct else 1)
        layers: list[nn.Module] = []
        for _ in range(c.decoder_layers):
            layers += [nn.Linear(width, c.decoder_hidden), nn.GELU(), nn.Dropout(c.dropout)]
            width = c.decoder_hidden
        self.decoder = nn.Sequential(*layers)
        self.token_head = nn.Linear(width, c.vocab_size)
        self.velocity_head = nn.Linear(width, c.velocity_levels)
        self.voice_head = nn.Linear(width, c.max_voices)
        # Not a buffer: module.to(dtype) would cast it, and the angle must stay float64.
        self._frequencies: dict[torch.device, Tensor] = {}

    # ----------------------------------------------------------------- pieces
    def angles(self, positions: Tensor) -> Tensor:
        """Angles (…, D/2) in float64, reduced modulo 2*pi, for integer positions (…)."""
        frequencies = self._frequencies.get(positions.device)
        if frequencies is None:
            half = torch.arange(0, self.config.dim, 2, dtype=torch.float64, device=positions.device)
            frequencies = self.config.position_base ** (-half / self.config.dim)  # (D/2,)
            self._frequencies[positions.device] = frequencies
        return torch.remainder(positions.to(torch.float64).unsqueeze(-1) * frequencies, 2 * math.pi)

    def position_code(self, positions: Tensor) -> Tensor:
        """(…, D) float32: sin at even, cos at odd indices."""
        a = self.angles(positions)
        return torch.stack((torch.sin(a), torch.cos(a)), dim=-1).flatten(-2).to(torch.float32)

    def embed(self, dna: Tensor, voice_slots: Tensor) -> Tensor:
        """Project DNA (…, 7) and voice slots (…) to (…, D)."""
        features = torch.cat((dna.to(self.project.weight.dtype),
                              self.voice_embedding(voice_slots)), dim=-1)
        return self.project(features)

    def readout(self, field: Tensor, positions: Tensor, current: Tensor) -> Tensor:
        """Decoder input from the field (…, D) float32 at integer positions (…) or (T,)."""
        if self.config.readout == "demod":
            a = self.angles(positions)
            cos, sin = torch.cos(a).to(field.dtype), torch.sin(a).to(field.dtype)
            f_sin, f_cos = field[..., 0::2], field[..., 1::2]
            # (f_cos + i f_sin) * exp(-i angle)
            real = f_cos * cos + f_sin * sin
            imag = f_sin * cos - f_cos * sin
            field = torch.stack((imag, real), dim=-1).flatten(-2)
            field = field * torch.rsqrt(positions.to(field.dtype) + 1).unsqueeze(-1)
        x = field.to(self.project.weight.dtype)
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
        field = torch.cumsum(current.float() * self.position_code(positions), dim=1)
        if start is not None:
            field = field + start.field.unsqueeze(1)
        out = self.decode(self.readout(field, positions, current))
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
        field = state.field + current.float() * self.position_code(state.position)
        out = self.decode(self.readout(field, state.position, current))
        return out, FieldState(field, state.position + 1)

    def parameter_count(self) -> int:
        return sum(p.numel() for p in self.parameters())


def sequence_loss(out: FMOutput, targets: Tensor, velocity: Tensor, voice: Tensor,
                  mask: Tensor, is_note: Tensor) -> dict[str, Tensor]:
    """Mean next-token cross-entropy over ``mask``; velocity and voice losses over next notes.

    All targets (B, T) are already shifted (target t is token t+1). Returns the token loss
    (``token``, nats per token), the head losses and their sum (``total``) for backprop.
    """
    flat = mask.reshape(-1)
    token = F.cross_entropy(out.logits.reshape(-1, out.logits.shape[-1])[flat].float(),
                            targets.reshape(-1)[flat])
    notes = (mask & is_note).reshape(-1)
    if notes.any():
        vel = F.cross_entropy(out.velocity.reshape(-1, out.velocity.shape[-1])[notes].float(),
                              velocity.reshape(-1)[notes])
        voi = F.cross_entropy(out.voice.reshape(-1, out.voice.shape[-1])[notes].float(),
                              voice.reshape(-1)[notes])
    else:
        vel = voi = token.new_zeros(())
    return {"token": token, "velocity": vel, "voice": voi, "total": token + 0.1 * (vel + voi)}
