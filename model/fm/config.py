"""Every hyper-parameter of the Field Machine (:class:`ModelConfig`), stored in each checkpoint."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from model.tokenizer.dna import TOKEN_FLOATS

READOUTS = ("field", "demod")
HEADS = ("free", "factored")


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

    # From the tokenizer (:class:`model.tokenizer.vocabulary.TokenShape`), never set by hand:
    # ``ModelConfig(**asdict(tokenizer.shape), dim=...)``.
    vocab_size: int = field(metadata={"help": 'Token vocabulary size (from the tokenizer).'})
    voice_slots: int = field(metadata={"help": 'Rows of the voice embedding: note voices plus one slot per non-note kind (tokenizer).'})
    max_voices: int = field(metadata={"help": 'Outputs of the voice head (tokenizer).'})
    velocity_levels: int = field(metadata={"help": 'Outputs of the velocity head (tokenizer).'})
    dim: int = field(default=4096, metadata={"help": "Floats of field per stream: the one field's width, or with field layers all their fields together (split evenly)."})
    field_layers: int = field(default=4, metadata={"help": "Residual field layers, each with its own field of dim / field_layers floats (0 = one field read by the MLP decoder)."})
    width: int = field(default=512, metadata={"help": "Width of the residual stream between field layers (field layers only)."})
    decoder_layers: int = field(default=3, metadata={"help": "Hidden layers of the MLP decoder (one-field machine only)."})
    decoder_hidden: int = field(default=2048, metadata={"help": "Width of the decoder's hidden layers; with field layers, of each layer's MLP."})
    dropout: float = field(default=0.1, metadata={"help": 'Dropout in the decoder.'})
    voice_embedding: int = field(default=16, metadata={"help": 'Width of the learned voice embedding in the DNA.'})
    position_base: float = field(default=32768.0, metadata={"help": 'Base of the sinusoidal position code.'})
    readout: str = field(default="demod", metadata={"help": "How the decoder reads the field: 'field' (the seed's) or 'demod'.", "choices": READOUTS})
    direct: bool = field(default=True, metadata={"help": "Concatenate the current token's projection to the decoder input."})
    decays: str = field(default="", metadata={"help": "Comma-separated decay time constants in tokens for groups of field channels, dealt pair by pair (0 = no decay; empty = one undecayed field, the seed's)."})
    learn_decays: bool = field(default=False, metadata={"help": "Field layers only: each layer learns its own decay time constants, one per channel pair, starting from --decays and kept between 1 token and the longest of them (undecayed groups, 0, stay undecayed)."})
    gated: bool = field(default=False, metadata={"help": "Field layers only: what each layer reads back is gated by its input (read * SiLU(Linear(norm(x))), as gated linear recurrences do); no state beyond the fields."})
    conv: int = field(default=0, metadata={"help": "Field layers only: each layer writes each token's vector plus learned multiples of the previous conv-1 tokens' (a short causal convolution per channel); it keeps those conv-1 vectors as state beside its field. 0 or 1 = off."})
    head: str = field(default="free", metadata={"help": "Next-token head: 'free' (one learned row per token) or 'factored' (rows summed from the token's pitch, duration and position parts).", "choices": HEADS})
    dna_lookup: bool = field(default=False, metadata={"help": "Add learned rows for the DNA's discrete values (pitch, pitch class, octave, duration, beat position, velocity) to its projection."})
    field_dropout: float = field(default=0.0, metadata={"help": "Dropout on the decoder's view of the field (training only)."})
    voice_register: bool = field(default=True, metadata={"help": "Read the voice register beside each token (each voice's latest note: model.tokenizer.voice_register) and give the note head each voice's distance to the chosen note."})
    chord_voices: bool = field(default=True, metadata={"help": "Give the note head, per voice, whether that voice already plays at the chosen note's onset (a voice of a piece in parts rarely strikes two notes at once); needs voice_register."})

    def __post_init__(self) -> None:
        if self.chord_voices and not self.voice_register:
            raise ValueError("chord_voices needs voice_register (the note head reads both together): "
                             "with --no-voice_register pass --no-chord_voices too")
        if self.readout not in READOUTS:
            raise ValueError(f"readout must be one of {READOUTS}, not {self.readout!r}")
        if self.head not in HEADS:
            raise ValueError(f"head must be one of {HEADS}, not {self.head!r}")
        if self.dim % 2:
            raise ValueError("dim must be even (the position code pairs sin and cos)")
        if self.field_layers < 0 or self.dim % (2 * max(1, self.field_layers)):
            raise ValueError(f"field_layers must be >= 0 and split dim ({self.dim}) into fields of "
                             f"an even width, not {self.field_layers}")
        if self.field_layers and (self.width < 1 or self.readout != "demod"):
            raise ValueError("field layers need width >= 1 and readout 'demod'")
        if self.vocab_size < 5 or self.decoder_layers < 1 or self.decoder_hidden < 1:
            raise ValueError("vocab_size >= 5, decoder_layers >= 1 and decoder_hidden >= 1 are required")
        if not 0 <= self.dropout < 1 or not 0 <= self.field_dropout < 1:
            raise ValueError("dropout and field_dropout must lie in [0, 1)")
        if self.learn_decays and (not self.field_layers or not any(parse_decays(self.decays))):
            raise ValueError("learn_decays needs field layers and --decays with a decayed group (a time "
                             "constant >= 1) to start from")
        if self.conv < 0 or (self.conv > 1 and not self.field_layers):
            raise ValueError(f"conv needs field layers and must be >= 0, not {self.conv}")
        if self.gated and not self.field_layers:
            raise ValueError("gated needs field layers (--field_layers > 0)")
        if len(parse_decays(self.decays)) > self.field_floats // 2:
            raise ValueError("decays: more groups than channel pairs")

    @property
    def dna_width(self) -> int:
        return TOKEN_FLOATS + self.voice_embedding

    @property
    def field_floats(self) -> int:
        """Width of each field: ``dim``, or ``dim / field_layers`` with field layers."""
        return self.dim // max(1, self.field_layers)

    @property
    def hidden_width(self) -> int:
        """Width of the state the heads read."""
        return self.width if self.field_layers else self.decoder_hidden

    @property
    def layer_state_floats(self) -> int:
        """Floats of state per field layer: its field and (``conv``) its last conv-1 writes."""
        return self.field_floats * max(1, self.conv)

    @property
    def state_floats(self) -> int:
        """Floats of state per stream: the field(s), and with ``conv`` each layer's last writes
        (the position is one integer more)."""
        return self.dim if not self.field_layers else self.field_layers * self.layer_state_floats

