"""Batched generation: many streams stepped together keep to the grammar and reproduce per seed."""

from __future__ import annotations

import numpy as np
import torch

from model.fm.config import ModelConfig
from model.fm.machine import FieldMachine
from model.generation.generator import BatchGenerator
from model.sampling.config import SamplingConfig
from tests.model_shapes import token_shape

def test_generated_streams_move_forward_through_their_bars(bar_tokenizer):
    """An untrained model draws tokens almost at random; the grammar still holds in every stream."""
    torch.manual_seed(0)
    model = FieldMachine(ModelConfig(**token_shape(bar_tokenizer.vocab_size), dim=32, decoder_hidden=32, dropout=0.0))
    generator = BatchGenerator(model, bar_tokenizer)
    state, out, decoders = generator.prime_many([None] * 4)
    configs = [SamplingConfig(temperature=2.0, top_k=0, top_p=1.0, seed=s) for s in range(4)]
    onsets = [[] for _ in range(4)]
    for step in range(300):
        results, state, out = generator.advance(state, out, decoders, configs, [step] * 4)
        for i, r in enumerate(results):
            if r.note is not None:
                onsets[i].append((r.note.onset, r.note.bar, r.note.position))
    for stream in onsets:
        assert stream and [o for o, _, _ in stream] == sorted(o for o, _, _ in stream)
        chord_sizes = np.unique([o for o, _, _ in stream], return_counts=True)[1]
        assert chord_sizes.max() <= bar_tokenizer.config.max_voices
    assert max(d.bar for d in decoders) >= 3  # bars end and new ones begin
