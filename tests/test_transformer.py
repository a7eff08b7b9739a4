"""The transformer reference: shapes, causality, and a cached step equal to the parallel pass."""

from __future__ import annotations

import pytest
import torch

from model.tokenizer.vocabulary import NOTE, SPECIAL_KINDS, TokenKey, special_key
from model.research.transformer import CausalTransformer, KVCache, TransformerConfig
from model.tokenizer.dna import DNA_FLOATS
from tests.model_shapes import token_shape


HEADS = pytest.mark.parametrize("head", ["tied", "factored"])


def make(head: str = "tied", seed: int = 0) -> CausalTransformer:
    torch.manual_seed(seed)
    model = CausalTransformer(TransformerConfig(**token_shape(40), dim=32, layers=2, heads=4, dropout=0.0,
                                                head=head)).eval()
    model.set_vocabulary([special_key(k) for k in SPECIAL_KINDS]
                         + [TokenKey(NOTE, 50 + i, i % 3, 12 * (i % 4)) for i in range(36)])
    return model


def inputs(batch: int, length: int):
    g = torch.Generator().manual_seed(1)
    return (torch.randint(0, 40, (batch, length), generator=g), torch.rand(batch, length, DNA_FLOATS, generator=g),
            torch.randint(0, 22, (batch, length), generator=g))


def test_shapes():
    model = make()
    out = model(*inputs(3, 11))
    assert out.logits.shape == (3, 11, 40)
    assert out.hidden.shape == (3, 11, 32)
    voice, velocity = model.note_logits(out.hidden, torch.zeros(3, 11, dtype=torch.int64))
    assert velocity.shape == (3, 11, 8) and voice.shape == (3, 11, 16)


@HEADS
def test_a_later_token_never_changes_an_earlier_output(head):
    model = make(head)
    ids, dna, slots = inputs(1, 20)
    changed = ids.clone()
    changed[0, 12] = (ids[0, 12] + 1) % 40
    with torch.no_grad():
        a, b = model(ids, dna, slots).logits, model(changed, dna, slots).logits
    torch.testing.assert_close(a[:, :12], b[:, :12])
    assert (a[:, 12:] - b[:, 12:]).abs().max() > 1e-4


@HEADS
def test_prompt_then_cached_steps_equal_one_parallel_pass(head):
    model = make(head)
    ids, dna, slots = inputs(2, 24)
    with torch.no_grad():
        whole = model(ids, dna, slots).logits
        cache = KVCache(model.config, 2, 30, "cpu", torch.float32)
        parts = [model(ids[:, :10], dna[:, :10], slots[:, :10], cache=cache).logits]
        for t in range(10, 24):
            parts.append(model(ids[:, t:t + 1], dna[:, t:t + 1], slots[:, t:t + 1], cache=cache).logits)
    torch.testing.assert_close(torch.cat(parts, dim=1), whole, rtol=1e-4, atol=1e-5)
    assert cache.length == 24
    assert cache.nbytes() == 2 * 2 * 2 * 24 * 32 * 4  # grows with the stream, unlike the FM's field
