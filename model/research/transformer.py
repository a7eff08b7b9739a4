"""A small causal transformer: the reference the Field Machine variants are measured against.

A baseline for :mod:`model.research.study`, never a server path. It reads the same tokens as the FM (the
token's id through an embedding tied to the output head, plus the token's DNA and voice slot, so
it sees everything the FM sees) and has the same heads (the token head and the note head), so :func:`model.fm.loss.sequence_loss`
and the trainer's batches serve both (plus the input ids, :func:`with_input_ids`). Pre-norm blocks, rotary position code, causal
``scaled_dot_product_attention``. Generation keeps a key/value cache: its state grows with the
stream (``2 * layers * dim`` floats per token), and each step attends over the whole history.

Shapes: B sequences, T positions, V vocabulary, D = ``dim``, H heads.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model.fm.factored_head import FactoredHead, token_part_rows
from model.fm.note_head import NoteHead
from model.fm.state import FMOutput
from model.generation.generator import BatchGenerator, StreamStep, decoder_for, with_bos
from model.tokenizer.dna import DNA_FLOATS
from model.tokenizer.sequences import TokenSequence
from model.tokenizer.stream import StreamDecoder
from model.training.batches import Example, collate


@dataclass(frozen=True)
class TransformerConfig:
    """Every hyper-parameter of the reference transformer."""

    # From the tokenizer (its TokenShape), as for the FM.
    vocab_size: int = field(metadata={"help": "Token vocabulary size (from the tokenizer)."})
    voice_slots: int = field(metadata={"help": "Rows of the voice embedding."})
    max_voices: int = field(metadata={"help": "Outputs of the voice head."})
    velocity_levels: int = field(metadata={"help": "Outputs of the velocity head."})
    dim: int = field(default=96, metadata={"help": "Model width."})
    layers: int = field(default=4, metadata={"help": "Transformer blocks."})
    heads: int = field(default=4, metadata={"help": "Attention heads (dim must divide by it)."})
    mlp_ratio: int = field(default=4, metadata={"help": "Hidden width of each block's MLP, in multiples of dim."})
    dropout: float = field(default=0.1, metadata={"help": "Dropout on attention output and MLP."})
    rope_base: float = field(default=10000.0, metadata={"help": "Base of the rotary position code."})
    head: str = field(default="tied", metadata={"help": "'tied': one learned embedding row per token, shared by input and output; 'factored': those rows built as in model.fm.factored_head.FactoredHead.", "choices": ("tied", "factored")})

    def __post_init__(self) -> None:
        if self.dim % self.heads or (self.dim // self.heads) % 2:
            raise ValueError("dim must split into heads of even width")


class KVCache:
    """Keys and values of every layer for B streams that share one position (all primed alike).

    ``keys[l]``/``values[l]``: (B, H, capacity, D/H); ``length`` positions are filled.
    """

    def __init__(self, config: TransformerConfig, batch: int, capacity: int, device, dtype) -> None:
        shape = (batch, config.heads, capacity, config.dim // config.heads)
        self.keys = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.layers)]
        self.values = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.layers)]
        self.length = 0

    def nbytes(self) -> int:
        """Bytes the filled part holds (it grows by one row per layer per token)."""
        k = self.keys[0]
        return 2 * len(self.keys) * k.shape[0] * k.shape[1] * self.length * k.shape[3] * k.element_size()


class Block(nn.Module):
    def __init__(self, c: TransformerConfig) -> None:
        super().__init__()
        self.heads = c.heads
        self.norm1 = nn.LayerNorm(c.dim)
        self.qkv = nn.Linear(c.dim, 3 * c.dim)
        self.proj = nn.Linear(c.dim, c.dim)
        self.norm2 = nn.LayerNorm(c.dim)
        self.mlp = nn.Sequential(nn.Linear(c.dim, c.mlp_ratio * c.dim), nn.GELU(),
                                 nn.Linear(c.mlp_ratio * c.dim, c.dim))
        self.drop = nn.Dropout(c.dropout)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, cache: tuple[Tensor, Tensor, int] | None) -> Tensor:
        batch, length, dim = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(batch, length, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        if cache is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            keys, values, start = cache
            keys[:, :, start:start + length] = k.to(keys.dtype)
            values[:, :, start:start + length] = v.to(values.dtype)
            end = start + length
            mask = None
            if length > 1:  # a prompt: causal inside it, everything before it visible
                mask = torch.ones(length, end, dtype=torch.bool, device=x.device).tril(start)
            y = F.scaled_dot_product_attention(q, keys[:, :, :end].to(q.dtype),
                                               values[:, :, :end].to(q.dtype), attn_mask=mask)
        x = x + self.drop(self.proj(y.transpose(1, 2).reshape(batch, length, dim)))
        return x + self.drop(self.mlp(self.norm2(x)))


def rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotary code on (B, H, T, d): pairs (even, odd) rotated by the position's angles (T, d/2)."""
    even, odd = x[..., 0::2], x[..., 1::2]
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.stack((even * cos - odd * sin, even * sin + odd * cos), dim=-1).flatten(-2)


class CausalTransformer(nn.Module):
    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        c = self.config = config
        self.token_embedding = nn.Embedding(c.vocab_size, c.dim) if c.head == "tied" else None
        self.factored = FactoredHead(c.vocab_size, c.dim) if c.head == "factored" else None
        self.voice_embedding = nn.Embedding(c.voice_slots, c.dim)
        self.dna = nn.Linear(DNA_FLOATS, c.dim)
        self.blocks = nn.ModuleList(Block(c) for _ in range(c.layers))
        self.norm = nn.LayerNorm(c.dim)
        self.note_head = NoteHead(c.dim, c.max_voices, c.velocity_levels)
        self.register_buffer("token_parts", torch.zeros(c.vocab_size, 3, dtype=torch.int64))
        if self.token_embedding is not None:
            nn.init.normal_(self.token_embedding.weight, std=0.02)

    def set_vocabulary(self, vocab) -> None:
        """The token -> parts table of the factored rows and the note head."""
        self.token_parts.copy_(token_part_rows(vocab))

    def note_logits(self, hidden: Tensor, tokens: Tensor, register: Tensor | None = None,
                    chords: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """As :meth:`model.fm.machine.FieldMachine.note_logits` (the register reaches this model
        through its DNA input only; it has no chord term)."""
        return self.note_head(hidden, self.token_parts[tokens])

    def token_rows(self) -> tuple[Tensor, Tensor | None]:
        """(V, D) token rows shared by input and output, and the output bias (or None)."""
        if self.factored is not None:
            return self.factored.weight(self.token_parts), self.factored.bias
        return self.token_embedding.weight, None

    def angles(self, start: int, length: int, device) -> tuple[Tensor, Tensor]:
        half = self.config.dim // self.config.heads // 2
        inv = self.config.rope_base ** (-torch.arange(half, dtype=torch.float64, device=device) / half)
        a = torch.arange(start, start + length, dtype=torch.float64, device=device)[:, None] * inv
        return torch.cos(a).float(), torch.sin(a).float()

    def forward(self, ids: Tensor, dna: Tensor, voice_slots: Tensor, *, cache: KVCache | None = None) -> FMOutput:
        """(B, T) ids, (B, T, 7) DNA and (B, T) voice slots -> outputs (B, T, ...) for token t+1.

        With ``cache`` the tokens continue the cached streams (and are added to the cache).
        """
        start = cache.length if cache is not None else 0
        length = ids.shape[1]
        rows, bias = self.token_rows()
        x = (F.embedding(ids, rows) + self.voice_embedding(voice_slots)
             + self.dna(dna.to(self.dna.weight.dtype)))
        cos, sin = self.angles(start, length, ids.device)
        for i, block in enumerate(self.blocks):
            x = block(x, cos, sin, None if cache is None else (cache.keys[i], cache.values[i], start))
        if cache is not None:
            cache.length += length
        h = self.norm(x)
        return FMOutput(F.linear(h, rows, bias), h)

    def parameter_count(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def state_floats_at(self, position: int) -> int:
        """Cache floats per stream after ``position`` tokens (keys and values of every layer)."""
        return 2 * self.config.layers * self.config.dim * position


class TransformerGenerator(BatchGenerator):
    """:class:`model.generation.generator.BatchGenerator` for the transformer (prompts of equal length).

    The "state" is a :class:`KVCache` of capacity ``capacity`` shared by the whole batch.
    """

    def __init__(self, model: CausalTransformer, tokenizer, *, capacity: int) -> None:
        super().__init__(model, tokenizer)
        self.capacity = capacity

    @torch.no_grad()
    def prime_many(self, prompts: list[TokenSequence]):
        sequences = [with_bos(p) for p in prompts]
        if len({len(s) for s in sequences}) != 1:
            raise ValueError("the transformer reference primes prompts of equal length only")
        decoders = [decoder_for(self.tokenizer, s) for s in sequences]
        pairs = [self.tokenizer.dna(s) for s in sequences]
        ids = torch.from_numpy(np.stack([s.ids for s in sequences])).to(self.device)
        dna, slots = self.tensors(np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs]))
        param = next(self.model.parameters())
        cache = KVCache(self.model.config, len(prompts), self.capacity, self.device, param.dtype)
        out = self.model(ids, dna, slots, cache=cache)
        return cache, out.last(), decoders

    def feed(self, state: KVCache, results: list[StreamStep], decoders: list[StreamDecoder]):
        """The core's :meth:`BatchGenerator.feed`, reading each token's id as well as its DNA."""
        ids, floats, slots = self.step_inputs(results, decoders)
        dna, slot = self.tensors(floats[:, None], slots[:, None])
        tokens = torch.from_numpy(ids).to(self.device)[:, None]
        return self.model(tokens, dna, slot, cache=state).last(), state


def with_input_ids(examples: list[Example], spans: list[tuple[int, int, int]],
                   device: torch.device) -> dict[str, Tensor]:
    """The core's training batch (:func:`model.training.batches.collate`) plus ``inputs``, the
    input token ids (B, T) the transformer embeds."""
    batch = collate(examples, spans, device)
    inputs = np.zeros(batch["slots"].shape, np.int64)
    for row, (i, a, b) in enumerate(spans):
        inputs[row, :b - a - 1] = examples[i].ids[a:b - 1]
    batch["inputs"] = torch.from_numpy(inputs).to(device)
    return batch
