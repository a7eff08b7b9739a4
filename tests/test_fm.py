"""The Field Machine: the O(1) batched step computes exactly what the parallel pass computes."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from torch import nn

from model.fm.config import ModelConfig
from model.fm.loss import sequence_loss
from model.fm.machine import FieldMachine
from model.fm.state import FieldState
from model.tokenizer.dna import DNA_FLOATS
from model.tokenizer.voice_register import REGISTER_VOICES
from tests.model_shapes import token_shape

# One field read by the MLP decoder (field_layers 0) and deep machines of 1 to 8 field layers.
VARIANTS = {
    "field": dict(readout="field", direct=False),
    "demod": dict(readout="demod", direct=False),
    "demod+direct": dict(readout="demod", direct=True),
    "field+direct": dict(readout="field", direct=True),
    "demod+direct+decays": dict(readout="demod", direct=True, decays="0,512,16,1"),
    "field+direct+decays": dict(readout="field", direct=True, decays="0,4"),
    "1 layer": dict(field_layers=1),
    "2 layers+decays": dict(field_layers=2, decays="0,512,16,1"),
    "4 layers+decays": dict(field_layers=4, decays="0,512,64,8,2"),
    "8 layers": dict(field_layers=8),
    "4 layers+learned decays": dict(field_layers=4, decays="0,512,64,8,2", learn_decays=True),
    "2 layers+gated": dict(field_layers=2, decays="0,512,16,1", gated=True),
    "4 layers+conv 4": dict(field_layers=4, decays="0,512,64,8,2", conv=4, gated=True),
}
LAYER_COUNTS = {"one field": {}, **{k: v for k, v in VARIANTS.items() if "layer" in k}}


def make_model(variant: dict | str = "demod+direct", dim: int = 64, seed: int = 0) -> FieldMachine:
    """A small model of ``variant`` (a name in :data:`VARIANTS` or its settings)."""
    torch.manual_seed(seed)
    settings = VARIANTS[variant] if isinstance(variant, str) else variant
    settings = {"field_layers": 0, "width": 24, **settings}
    config = ModelConfig(**token_shape(50), dim=dim, decoder_hidden=48, decoder_layers=3,
                         dropout=0.0, **settings)
    model = FieldMachine(config)
    if config.learn_decays:  # learned decays away from where they start, so the tests see them
        for layer in model.layers:
            nn.init.normal_(layer.decay_shift, std=0.7)
    if config.conv > 1:  # the convolution away from zero, where it starts
        for layer in model.layers:
            nn.init.normal_(layer.conv, std=0.5)
    return model.eval().double().float()


def random_tokens(batch: int, length: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    dna = torch.rand(batch, length, DNA_FLOATS, generator=g) * 2 - 1
    slots = torch.randint(0, 22, (batch, length), generator=g)
    return dna, slots


def step_through(model: FieldMachine, dna: torch.Tensor, slots: torch.Tensor,
                 state: FieldState | None = None) -> torch.Tensor:
    batch, length = slots.shape
    state = state or FieldState.empty(batch, model.config.state_floats)
    logits = []
    for t in range(length):
        out, state = model.step(state, dna[:, t], slots[:, t])
        logits.append(out.logits)
    return torch.stack(logits, dim=1)


def close(a: torch.Tensor, b: torch.Tensor) -> None:
    scale = b.abs().max().item()
    assert (a - b).abs().max().item() <= 1e-4 * max(scale, 1.0), ((a - b).abs().max(), scale)


@pytest.mark.parametrize("variant", VARIANTS)
def test_step_reproduces_parallel_logits_over_2048_tokens(variant):
    model = make_model(variant)
    dna, slots = random_tokens(1, 2048)
    with torch.no_grad():
        parallel = model(dna, slots).logits
    close(step_through(model, dna, slots), parallel)


@pytest.mark.parametrize("variant", VARIANTS)
def test_step_matches_parallel_past_position_20000(variant):
    model = make_model(variant, dim=64 if "layers" in variant else 32)
    dna, slots = random_tokens(1, 20_064)
    with torch.no_grad():
        parallel = model(dna, slots).logits
        _, state = model(dna[:, :20_000], slots[:, :20_000], return_state=True)
    assert state.position.item() == 20_000
    close(step_through(model, dna[:, 20_000:], slots[:, 20_000:], state), parallel[:, 20_000:])


@pytest.mark.parametrize("variant", VARIANTS)
def test_streams_stepped_together_equal_streams_stepped_alone(variant):
    model = make_model(variant)
    dna, slots = random_tokens(4, 40)
    # Streams at different positions: stream i has already taken 10 * i tokens.
    states = []
    for i in range(4):
        s = FieldState.empty(1, model.config.state_floats)
        for t in range(10 * i):
            _, s = model.step(s, dna[i:i + 1, t], slots[i:i + 1, t])
        states.append(s)
    together = FieldState(torch.cat([s.field for s in states]), torch.cat([s.position for s in states]))
    out, after = model.step(together, dna[:, -1], slots[:, -1])
    for i in range(4):
        alone, alone_state = model.step(states[i], dna[i:i + 1, -1], slots[i:i + 1, -1])
        torch.testing.assert_close(out.logits[i:i + 1], alone.logits, rtol=1e-5, atol=1e-5)
        assert after.position[i].item() == alone_state.position.item() == 10 * i + 1


@pytest.mark.parametrize("variant", ["demod+direct", "demod+direct+decays", "1 layer", "2 layers+decays",
                                     "4 layers+decays", "8 layers", "4 layers+learned decays",
                                     "4 layers+conv 4"])
def test_state_size_does_not_grow(variant):
    """One field of 64 floats, or 64 floats split over the layers' fields, whatever the depth; with
    a convolution of 4 taps each layer keeps its last 3 writes beside its field (4 x 64 floats)."""
    model = make_model(variant)
    dna, slots = random_tokens(3, 1)
    state = FieldState.empty(3, model.config.state_floats)
    sizes = {}
    for t in range(10_000):
        _, state = model.step(state, dna[:, 0], slots[:, 0])
        if t + 1 in (10, 10_000):
            sizes[t + 1] = state.nbytes()
    floats = 64 * max(1, model.config.conv)
    assert model.config.state_floats == floats
    assert sizes[10] == sizes[10_000] == 3 * (floats * 4 + 8)


@pytest.mark.parametrize("variant", LAYER_COUNTS)
def test_padding_on_the_right_does_not_change_real_positions(variant):
    model = make_model({"direct": True, **LAYER_COUNTS[variant]})
    dna, slots = random_tokens(2, 30)
    with torch.no_grad():
        short = model(dna[:1, :17], slots[:1, :17]).logits
        padded = model(dna, slots).logits  # row 0 "padded" with 13 extra tokens
    torch.testing.assert_close(padded[0, :17], short[0], rtol=1e-5, atol=1e-5)


def test_position_code_is_exact_at_30000():
    model = make_model("field", dim=4096).to(torch.bfloat16)  # weights' dtype must not matter
    code = model.position_code(torch.tensor([30_000]))
    i = torch.arange(0, 4096, 2, dtype=torch.float64)
    exact = 30_000 * 32768.0 ** (-i / 4096)
    torch.testing.assert_close(code[0, 0::2].double(), torch.sin(exact), atol=1e-6, rtol=0)
    torch.testing.assert_close(code[0, 1::2].double(), torch.cos(exact), atol=1e-6, rtol=0)


@pytest.mark.parametrize("variant", LAYER_COUNTS)
def test_loss_and_heads_train(variant):
    model = make_model({"direct": True, **LAYER_COUNTS[variant]})
    model.train()
    dna, slots = random_tokens(2, 12)
    targets = torch.randint(0, 50, (2, 12))
    mask = torch.ones(2, 12, dtype=torch.bool)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(60):
        out = model(dna, slots)
        loss = sequence_loss(model, out, targets, torch.zeros_like(targets), torch.ones_like(targets),
                             mask, torch.ones_like(mask), dna, torch.zeros(2, 12, REGISTER_VOICES))
        opt.zero_grad()
        loss["total"].backward()
        opt.step()
        losses.append(loss["token"].item())
    assert losses[-1] < 0.5 * losses[0]


def test_bad_config_is_a_clear_error():
    with pytest.raises(ValueError, match="readout must be one of"):
        ModelConfig(**token_shape(50), readout="attention")
    with pytest.raises(ValueError, match="decay time constant"):
        ModelConfig(**token_shape(50), decays="0,0.5")
    with pytest.raises(ValueError, match="field_layers must be >= 0 and split dim"):
        ModelConfig(**token_shape(50), dim=64, field_layers=3)
    with pytest.raises(ValueError, match="readout 'demod'"):
        ModelConfig(**token_shape(50), field_layers=2, readout="field")
    with pytest.raises(ValueError, match="learn_decays needs field layers"):
        ModelConfig(**token_shape(50), field_layers=0, decays="0,64", learn_decays=True)  # one field
    with pytest.raises(ValueError, match="learn_decays needs field layers"):
        ModelConfig(**token_shape(50), dim=64, field_layers=2, decays="0", learn_decays=True)
    with pytest.raises(ValueError, match="conv needs field layers"):
        ModelConfig(**token_shape(50), field_layers=0, conv=4)
    with pytest.raises(ValueError, match="conv needs field layers and must be >= 0"):
        ModelConfig(**token_shape(50), field_layers=2, conv=-1)
    with pytest.raises(ValueError, match="gated needs field layers"):
        ModelConfig(**token_shape(50), field_layers=0, gated=True)


def test_learned_decays_train_per_layer_and_stay_in_range():
    """Each layer moves its own time constants; undecayed pairs stay undecayed; every constant stays
    within [1, the longest configured one] however far training pushes it."""
    model = make_model({"field_layers": 2, "decays": "0,64,4", "learn_decays": True}).train()
    for layer in model.layers:
        nn.init.zeros_(layer.decay_shift)
    dna, slots = random_tokens(2, 80)
    model(dna, slots).logits.square().mean().backward()
    for layer in model.layers:
        grad = layer.decay_shift.grad
        assert torch.equal(grad[0::3], torch.zeros_like(grad[0::3]))  # the undecayed group (0)
        assert grad[1::3].abs().sum() > 0 and grad[2::3].abs().sum() > 0
    assert not torch.equal(model.layers[0].decay_shift.grad, model.layers[1].decay_shift.grad)
    with torch.no_grad():
        model.layers[0].decay_shift.copy_(torch.linspace(-20, 20, model.config.field_floats // 2))
    tau, log_decay = model.code.decay_tables(torch.device("cpu"), model.layers[0].decay_shift)
    decayed = tau.isfinite()
    pairs = model.config.field_floats // 2
    assert decayed.sum() == 2 * sum(k % 3 != 0 for k in range(pairs))  # groups 64 and 4, dealt pair by pair
    assert tau[decayed].min() == 1.0 and tau[decayed].max() == 64.0
    assert torch.equal(log_decay[~decayed], torch.zeros_like(log_decay[~decayed]))


def test_learned_decays_start_as_the_configured_ones():
    """A model given learned decays (e.g. ``model.train --init_from CKPT --learn_decays``) computes,
    before training, exactly what the same weights computed without them."""
    fixed = make_model("4 layers+decays")
    learned = FieldMachine(replace(fixed.config, learn_decays=True)).eval()
    missing, unexpected = learned.load_state_dict(fixed.state_dict(), strict=False)
    assert unexpected == [] and sorted(missing) == [f"layers.{i}.decay_shift" for i in range(4)]
    dna, slots = random_tokens(2, 100)
    with torch.no_grad():
        torch.testing.assert_close(learned(dna, slots).logits, fixed(dna, slots).logits)


def test_a_convolution_starts_as_the_layer_without_it_and_reaches_only_its_taps():
    """A model given a convolution (``model.train --init_from CKPT --conv 4``) computes, before
    training, what the same weights computed without it; once trained, a token reaches the next
    layer's writes only through its field or, exactly, through the k-1 taps after it."""
    plain = make_model("4 layers+decays")
    conv = FieldMachine(replace(plain.config, conv=4)).eval()
    missing, unexpected = conv.load_state_dict(plain.state_dict(), strict=False)
    assert unexpected == [] and sorted(missing) == [f"layers.{i}.conv" for i in range(4)]
    dna, slots = random_tokens(2, 50)
    with torch.no_grad():
        torch.testing.assert_close(conv(dna, slots).logits, plain(dna, slots).logits)
    layer = conv.layers[0]
    nn.init.normal_(layer.conv, std=0.5)
    writes = torch.randn(1, 10, layer.floats)
    mixed, last = layer.convolve(writes, None)
    torch.testing.assert_close(mixed[:, 0], writes[:, 0])  # nothing before the first token
    expected = writes[:, 5] + sum(layer.conv[j - 1] * writes[:, 5 - j] for j in (1, 2, 3))
    torch.testing.assert_close(mixed[:, 5], expected)
    torch.testing.assert_close(last, writes[:, -3:])  # what the next chunk or step reads


def test_decayed_field_forgets_at_its_rate():
    """One token, then silence (zero DNA): a channel with tau = 4 keeps exp(-t/4) of it."""
    model = make_model({"readout": "field", "direct": True, "decays": "4"})
    dna, slots = random_tokens(1, 1)
    state = FieldState.empty(1, model.config.state_floats)
    _, state = model.step(state, dna[:, 0], slots[:, 0])
    first = state.field.clone()
    quiet = model.embed(torch.zeros(1, DNA_FLOATS), slots[:, 0])
    for _ in range(8):  # feed tokens whose projection is only the bias, then take it out again
        state = FieldState(state.field, state.position)
        _, state = model.step(state, torch.zeros(1, DNA_FLOATS), slots[:, 0])
    # Remove what the 8 bias-only tokens added: sum of lam**k * quiet * code(position).
    lam = torch.exp(torch.tensor(-1 / 4))
    added = sum(lam ** (8 - p) * quiet.float() * model.position_code(torch.tensor([p])) for p in range(1, 9))
    torch.testing.assert_close(state.field - added, first * lam ** 8, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("variant", VARIANTS)
def test_chunked_forward_equals_one_pass(variant):
    model = make_model(variant)
    dna, slots = random_tokens(2, 300)
    with torch.no_grad():
        whole = model(dna, slots).logits
        first, state = model(dna[:, :120], slots[:, :120], return_state=True)
        second = model(dna[:, 120:], slots[:, 120:], start=state).logits
    close(torch.cat([first.logits, second], dim=1), whole)


def test_factored_head_shares_rows_and_keeps_the_step_exact():
    from model.tokenizer.vocabulary import NOTE, REST, SPECIAL_KINDS, TokenKey, special_key

    vocab = [special_key(k) for k in SPECIAL_KINDS] + [
        TokenKey(NOTE, 60, 8, 0), TokenKey(NOTE, 60, 3, 12), TokenKey(NOTE, 72, 8, 0), TokenKey(REST, -1, 8, 0)]
    torch.manual_seed(0)
    model = FieldMachine(ModelConfig(**token_shape(len(vocab)), dim=32, decoder_hidden=16, dropout=0.0,
                                     decays="0,8", head="factored", field_layers=2, width=16)).eval()
    model.set_vocabulary(vocab)
    parts = model.token_parts
    assert parts[4, 0] == parts[5, 0] != parts[6, 0]  # same pitch, same pitch row
    assert parts[4, 1] == parts[6, 1] and parts[4, 2] == parts[6, 2]  # same duration and position
    assert "token_parts" in model.state_dict()  # saved with the weights
    dna, slots = random_tokens(2, 50)
    with torch.no_grad():
        parallel = model(dna, slots).logits
    close(step_through(model, dna, slots), parallel)


@pytest.mark.parametrize("variant", list(LAYER_COUNTS.values()), ids=list(LAYER_COUNTS))
def test_rows_of_different_lengths_read_together_end_where_each_ends(variant):
    """``lengths``: right-padded rows read in one pass give each row's own state and last output
    (how the server reads several streams' played notes at once)."""
    model = make_model(variant).eval()
    dna, slots = random_tokens(3, 12)
    with torch.no_grad():
        start_out, start = model(dna[:, :5], slots[:, :5], return_state=True)
        lengths = torch.tensor([7, 2, 4])
        out, state = model(dna[:, 5:], slots[:, 5:], start=start, return_state=True, lengths=lengths)
        last = out.last(lengths)
        for row, length in enumerate(lengths.tolist()):
            alone = FieldState(start.field[row:row + 1], start.position[row:row + 1])
            own_out, own = model(dna[row:row + 1, 5:5 + length], slots[row:row + 1, 5:5 + length], start=alone,
                                 return_state=True)
            assert int(state.position[row]) == 5 + length
            torch.testing.assert_close(state.field[row], own.field[0], rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(last.logits[row], own_out.last().logits[0], rtol=1e-4, atol=1e-5)
