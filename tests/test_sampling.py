"""Batched per-stream sampling: reproducible per stream, faithful to softmax, filters as documented."""

from __future__ import annotations

import math

import pytest
import torch

from model.sampling.batch import SamplingBatch
from model.sampling.config import MIN_TOP_P, SamplingConfig
from model.sampling.philox import philox4x32_10, stream_uniform
from model.sampling.sample import filter_logits, sample

# --------------------------------------------------------------------------- helpers

CONFIGS = {
    "default": SamplingConfig(),
    "plain-T1": SamplingConfig(temperature=1.0, top_k=0, top_p=1.0),
    "top-k-5": SamplingConfig(top_k=5, top_p=1.0),
    "nucleus-only": SamplingConfig(top_k=0, top_p=0.9),
    "min-p-only": SamplingConfig(top_k=0, top_p=1.0, min_p=0.05),
    "hot-all-filters": SamplingConfig(temperature=1.7, top_k=20, top_p=0.8, min_p=0.01),
}
CONFIG_IDS = list(CONFIGS)


def batch_of(configs: list[SamplingConfig], steps: list[int] | int = 0) -> SamplingBatch:
    if isinstance(steps, int):
        steps = [steps] * len(configs)
    return SamplingBatch.from_configs(configs, steps)


def with_seed(config: SamplingConfig, seed: int) -> SamplingConfig:
    return SamplingConfig(config.temperature, config.top_k, config.top_p, config.min_p, seed)


def random_logits(rows: int, vocab: int, seed: int, scale: float = 3.0) -> torch.Tensor:
    return torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed)) * scale


def kept(logits: torch.Tensor, config: SamplingConfig) -> set[int]:
    """Token ids that survive filtering for a single row."""
    row = filter_logits(logits.reshape(1, -1), batch_of([config]))[0]
    return set(torch.isfinite(row).nonzero().flatten().tolist())


def logits_from_probs(probs: list[float], order: list[int]) -> torch.Tensor:
    """Logits whose softmax puts probs[i] on token order[i]."""
    logits = torch.full((len(probs),), 0.0)
    logits[order] = torch.tensor(probs).log()
    return logits


def draws(logits: torch.Tensor, config: SamplingConfig, n_seeds: int, n_steps: int) -> torch.Tensor:
    """Tokens drawn from one logits row by n_seeds x n_steps (seed, step) pairs, in one batch."""
    configs = [with_seed(config, s) for s in range(n_seeds) for _ in range(n_steps)]
    steps = [t for _ in range(n_seeds) for t in range(n_steps)]
    rows = logits.reshape(1, -1).expand(len(configs), -1)
    return sample(rows, SamplingBatch.from_configs(configs, steps))


def chi_square(tokens: torch.Tensor, probs: torch.Tensor, support: list[int] | None = None) -> float:
    """Pearson's statistic of the token counts against probs (over the tokens in support)."""
    counts = torch.bincount(tokens, minlength=probs.numel()).double()
    expected = probs.double() * tokens.numel()
    if support is not None:
        counts, expected = counts[support], expected[support]
    return float(((counts - expected) ** 2 / expected).sum())


def reference_keep(row: torch.Tensor, config: SamplingConfig) -> torch.Tensor:
    """A plain one-row implementation of the documented rules, with a full sort in float64."""
    x = row.float() / config.temperature
    vocab = x.numel()
    values = torch.sort(x, descending=True).values.double()
    probs = torch.softmax(values, 0)
    threshold = values[0] + math.log(config.min_p) if config.min_p > 0 else -math.inf
    k = config.top_k if 0 < config.top_k < vocab else vocab
    if k < vocab:
        threshold = max(threshold, values[k - 1].item())
    if config.top_p < 1:
        top = probs[:k] / probs[:k].sum()
        before = torch.cumsum(top, 0) - top
        n = int((before < config.top_p).sum())
        threshold = max(threshold, values[n - 1].item())
    return x.double() >= threshold


# --------------------------------------------------------------------------- random numbers

KNOWN_ANSWERS = {  # Random123 kat_vectors for Philox4x32-10
    "zeros": ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    "ones": ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    "pi": ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
           (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
}


@pytest.mark.parametrize("counter, key, expected", KNOWN_ANSWERS.values(), ids=list(KNOWN_ANSWERS))
def test_philox_matches_random123_known_answers(counter, key, expected):
    words = philox4x32_10([torch.tensor([c]) for c in counter], [torch.tensor([k]) for k in key])
    assert tuple(int(w) for w in words) == expected


def test_stream_uniform_is_uniform_on_0_1():
    seed = torch.arange(1000).repeat_interleave(100)
    step = torch.arange(100).repeat(1000)
    u = stream_uniform(seed, step)
    assert u.dtype == torch.float64 and u.shape == (100_000,)
    assert 0 <= u.min() and u.max() < 1
    counts = torch.histc(u, bins=20, min=0, max=1)
    chi2 = float(((counts - 5000) ** 2 / 5000).sum())
    assert chi2 < 43.8, chi2  # 19 degrees of freedom, p = 0.001
    consecutive = torch.corrcoef(torch.stack([u[:-1], u[1:]]))[0, 1]
    assert abs(consecutive) < 0.02


def test_stream_uniform_depends_on_seed_step_and_salt_only():
    seed, step = torch.tensor([7, 7, 8, 7]), torch.tensor([3, 4, 3, 3])
    u = stream_uniform(seed, step).tolist()
    assert len(set(u[:3])) == 3  # another step, another seed: another number
    assert u[0] == u[3]
    assert stream_uniform(seed, step, salt=1)[0] != u[0]
    torch.manual_seed(123)
    torch.rand(10)
    assert stream_uniform(seed.flip(0), step.flip(0)).flip(0).tolist() == u


# --------------------------------------------------------------------------- reproducibility

@pytest.mark.parametrize("config", CONFIGS.values(), ids=CONFIG_IDS)
def test_same_seed_step_and_logits_give_the_same_token(config):
    logits = random_logits(16, 500, seed=1)
    batch = batch_of([with_seed(config, 11 + i) for i in range(16)], steps=[5 + i for i in range(16)])
    torch.manual_seed(0)
    first = sample(logits, batch)
    torch.manual_seed(999)
    torch.rand(1000)  # global RNG state must not matter
    assert torch.equal(sample(logits, batch), first)
    assert first.dtype == torch.int64 and first.shape == (16,)


@pytest.mark.parametrize("config", CONFIGS.values(), ids=CONFIG_IDS)
def test_a_stream_draws_the_same_tokens_alone_or_among_64_others_in_any_order(config):
    vocab, steps = 700, 40
    me = with_seed(config, 4242)
    choices = list(CONFIGS.values())
    gen = torch.Generator().manual_seed(5)
    for step in range(steps):
        mine = random_logits(1, vocab, seed=1000 + step)
        alone = sample(mine, batch_of([me], steps=step))
        # 64 other streams with their own settings, seeds, steps and logits, shuffled around us
        others = [with_seed(choices[(step + i) % len(choices)], i) for i in range(64)]
        configs = [me] + others
        step_list = [step] + torch.randint(0, 10_000, (64,), generator=gen).tolist()
        logits = torch.cat([mine, random_logits(64, vocab, seed=step)])
        order = torch.randperm(65, generator=gen)
        batch = batch_of([configs[i] for i in order], [step_list[i] for i in order])
        tokens = sample(logits[order], batch)
        assert tokens[(order == 0).nonzero().item()] == alone[0], f"step {step}"


def test_different_seeds_draw_different_sequences():
    logits = torch.tensor([0.3, 0.1, 0.0, -0.1, 0.2, 0.0, 0.1, -0.2])
    config = SamplingConfig(temperature=1.0, top_k=0, top_p=1.0)
    sequences = draws(logits, config, n_seeds=16, n_steps=50).reshape(16, 50)
    assert len({tuple(s) for s in sequences.tolist()}) == 16
    assert all(len(set(s)) > 4 for s in sequences.tolist())  # a stream does not repeat one token


# --------------------------------------------------------------------------- faithfulness

LOGITS_8 = torch.tensor([2.0, 1.0, 0.5, 0.0, -0.5, -1.0, 1.5, -2.0])


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0], ids=["T0.5", "T1", "T2"])
def test_draws_follow_softmax_of_logits_over_temperature(temperature):
    config = SamplingConfig(temperature=temperature, top_k=0, top_p=1.0)
    tokens = draws(LOGITS_8, config, n_seeds=200, n_steps=100)
    assert chi_square(tokens, torch.softmax(LOGITS_8 / temperature, 0)) < 24.3  # 7 dof, p = 0.001
    # the same test rejects a distribution at another temperature, so it can fail
    assert chi_square(tokens, torch.softmax(LOGITS_8 / (temperature * 1.3), 0)) > 100


def test_draws_after_top_k_follow_the_renormalised_top_k():
    config = SamplingConfig(temperature=1.0, top_k=3, top_p=1.0)
    tokens = draws(LOGITS_8, config, n_seeds=100, n_steps=100)
    probs = torch.softmax(LOGITS_8.masked_fill(LOGITS_8 < 1.0, -math.inf), 0)
    assert set(tokens.tolist()) == {0, 1, 6}
    assert chi_square(tokens, probs, support=[0, 1, 6]) < 13.8  # 2 dof, p = 0.001


# --------------------------------------------------------------------------- filters

def test_top_k_1_is_argmax():
    logits = random_logits(64, 1000, seed=3)
    configs = [SamplingConfig(temperature=t, top_k=1, top_p=1.0, seed=i)
               for i, t in enumerate([0.2, 0.85, 3.0, 10.0] * 16)]
    assert torch.equal(sample(logits, batch_of(configs, steps=9)), logits.argmax(1))


@pytest.mark.parametrize("k, expected", [(1, 1), (2, 2), (17, 17), (999, 999), (1000, 1000), (5000, 1000)],
                         ids=["k1", "k2", "k17", "k999", "k=V", "k>V"])
def test_top_k_keeps_exactly_the_k_largest(k, expected):
    logits = random_logits(4, 1000, seed=4)
    out = filter_logits(logits, batch_of([SamplingConfig(top_k=k, top_p=1.0)] * 4))
    assert (torch.isfinite(out).sum(1) == expected).all()
    top = torch.topk(logits, expected, dim=1).indices
    assert torch.isfinite(out.gather(1, top)).all()


def test_top_k_keeps_tokens_tied_with_the_kth():
    logits = torch.tensor([5.0, 4.0, 3.0, 3.0, 3.0, 1.0])
    assert kept(logits, SamplingConfig(top_k=3, top_p=1.0)) == {0, 1, 2, 3, 4}
    assert kept(logits, SamplingConfig(top_k=2, top_p=1.0)) == {0, 1}


# probabilities 0.5, 0.25, 0.15, 0.10 placed on tokens 3, 0, 5, 1 of six (tokens 2, 4 ~ 0)
NUCLEUS = logits_from_probs([0.5, 0.25, 0.15, 0.0999, 1e-5, 1e-5], [3, 0, 5, 1, 2, 4])


@pytest.mark.parametrize("top_k, top_p, expected", [
    (0, 0.3, {3}),
    (0, 0.6, {3, 0}),
    (0, 0.8, {3, 0, 5}),
    (0, 0.95, {3, 0, 5, 1}),
    (0, 1.0, {0, 1, 2, 3, 4, 5}),
    (3, 0.8, {3, 0}),  # top-p after top-k: 0.8 of the top-3 mass 0.9 is 0.72, reached by two
    (3, 0.85, {3, 0, 5}),
], ids=["p0.3", "p0.6", "p0.8", "p0.95", "p1-off", "k3-p0.8-renormalised", "k3-p0.85"])
def test_top_p_keeps_the_smallest_prefix_reaching_p(top_k, top_p, expected):
    config = SamplingConfig(temperature=1.0, top_k=top_k, top_p=top_p)
    assert kept(NUCLEUS, config) == expected
    drawn = set(draws(NUCLEUS, config, n_seeds=40, n_steps=50).tolist())
    assert expected - {2, 4} <= drawn <= expected  # tokens 2 and 4 are too rare to be seen


# probabilities 0.4, 0.3, 0.2, 0.06, 0.04 on tokens 4, 2, 0, 1, 3
MIN_P = logits_from_probs([0.4, 0.3, 0.2, 0.06, 0.04], [4, 2, 0, 1, 3])


@pytest.mark.parametrize("min_p, expected", [
    (0.0, {0, 1, 2, 3, 4}),
    (0.05, {0, 1, 2, 3, 4}),  # keeps p >= 0.02
    (0.2, {4, 2, 0}),  # keeps p >= 0.08
    (0.6, {4, 2}),  # keeps p >= 0.24
    (0.9, {4}),  # keeps p >= 0.36
], ids=["off", "0.05", "0.2", "0.6", "0.9"])
def test_min_p_drops_tokens_below_min_p_times_the_top(min_p, expected):
    config = SamplingConfig(temperature=1.0, top_k=0, top_p=1.0, min_p=min_p)
    assert kept(MIN_P, config) == expected
    assert set(draws(MIN_P, config, n_seeds=40, n_steps=50).tolist()) == expected


@pytest.mark.parametrize("config", [
    SamplingConfig(top_k=0, top_p=MIN_TOP_P),
    SamplingConfig(top_k=0, top_p=1.0, min_p=0.999),
    SamplingConfig(top_k=1, top_p=MIN_TOP_P, min_p=0.999),
], ids=["tiny-top-p", "huge-min-p", "all-strict"])
def test_the_top_token_is_always_kept(config):
    logits = random_logits(8, 300, seed=6)
    out = filter_logits(logits, batch_of([config] * 8))
    assert torch.equal(torch.isfinite(out), torch.nn.functional.one_hot(logits.argmax(1), 300).bool())


def test_temperature_sharpens_and_flattens():
    logits = random_logits(1, 50, seed=7, scale=1.0)
    entropies, top_shares = [], []
    for temperature in [0.25, 0.5, 1.0, 2.0, 4.0]:
        config = SamplingConfig(temperature=temperature, top_k=0, top_p=1.0)
        out = filter_logits(logits, batch_of([config]))
        assert torch.equal(out, logits / temperature)
        probs = torch.softmax(out[0], 0)
        entropies.append(float(-(probs * probs.log()).sum()))
        tokens = draws(logits, config, n_seeds=20, n_steps=100)
        top_shares.append(float((tokens == logits.argmax()).double().mean()))
    assert entropies == sorted(entropies)
    assert top_shares == sorted(top_shares, reverse=True) and top_shares[0] > 2 * top_shares[-1]


def test_each_row_keeps_its_own_settings():
    settings = {
        "top-k-1": (SamplingConfig(temperature=1.0, top_k=1, top_p=1.0), {3}),
        "top-k-3": (SamplingConfig(temperature=1.0, top_k=3, top_p=1.0), {3, 0, 5}),
        "top-p-0.6": (SamplingConfig(temperature=1.0, top_k=0, top_p=0.6), {3, 0}),
        "min-p-0.25": (SamplingConfig(temperature=1.0, top_k=0, top_p=1.0, min_p=0.25), {3, 0, 5}),
        "off": (SamplingConfig(temperature=1.0, top_k=0, top_p=1.0), {0, 1, 2, 3, 4, 5}),
    }
    configs = [c for c, _ in settings.values()]
    out = filter_logits(NUCLEUS.expand(len(configs), -1), batch_of(configs))
    for row, (name, (_, expected)) in zip(out, settings.items()):
        assert set(torch.isfinite(row).nonzero().flatten().tolist()) == expected, name
    # sampling the mixed batch over 300 steps respects each row's own set too
    seen = [set() for _ in configs]
    for step in range(300):
        tokens = sample(NUCLEUS.expand(len(configs), -1), batch_of(configs, steps=step))
        for row, token in enumerate(tokens.tolist()):
            seen[row].add(token)
    for row, (name, (_, expected)) in zip(seen, settings.items()):
        assert expected - {2, 4} <= row <= expected, name  # tokens 2 and 4 are too rare to be seen


@pytest.mark.parametrize("dtype, vocab, top_ks", [
    (torch.float32, 300, [0, 1, 5, 50, 299, 300, 400]),
    (torch.bfloat16, 300, [0, 1, 5, 50, 299, 300, 400]),
    (torch.bfloat16, 3000, [0, 1, 5, 50]),
], ids=["float32", "bfloat16", "bfloat16-ties-past-k"])
def test_filters_match_a_plain_one_row_reference(dtype, vocab, top_ks):
    """Random per-row settings; bf16 logits have many ties, and wide nuclei widen the pool."""
    rows = 240
    logits = random_logits(rows, vocab, seed=8, scale=2.0).to(dtype)
    gen = torch.Generator().manual_seed(9)

    def pick(options):
        return options[torch.randint(len(options), (1,), generator=gen).item()]

    configs = [SamplingConfig(temperature=pick([0.3, 0.85, 1.5, 4.0]), top_k=pick(top_ks),
                              top_p=pick([1.0, 0.5, 0.9, 0.99]), min_p=pick([0.0, 0.01, 0.2]), seed=i)
               for i in range(rows)]
    batch = batch_of(configs, steps=3)
    out = filter_logits(logits, batch)
    for i, config in enumerate(configs):
        assert torch.equal(torch.isfinite(out[i]), reference_keep(logits[i], config)), (i, config)
    tokens = sample(logits, batch)
    assert torch.isfinite(out.gather(1, tokens.unsqueeze(1))).all()


def test_a_wide_nucleus_is_found_exactly():
    logits = torch.linspace(0.0, 1.0, 5000).flip(0).unsqueeze(0)  # nucleus of thousands of tokens
    config = SamplingConfig(temperature=1.0, top_k=0, top_p=0.9)
    out = filter_logits(logits, batch_of([config]))
    assert torch.equal(torch.isfinite(out[0]), reference_keep(logits[0], config))
    assert 4000 < torch.isfinite(out).sum() < 5000


def test_masked_tokens_are_never_drawn():
    logits = random_logits(32, 400, seed=10)
    logits[:, 10:] = -math.inf  # only 10 tokens allowed, fewer than top_k
    configs = [with_seed(c, i) for i, c in enumerate(list(CONFIGS.values()) * 6)][:32]
    for step in range(20):
        tokens = sample(logits, batch_of(configs, steps=step))
        assert (tokens < 10).all()


# --------------------------------------------------------------------------- dtypes and devices

def test_bfloat16_logits_are_sampled_like_their_float32_values():
    logits = random_logits(64, 2000, seed=11).bfloat16()
    batch = batch_of([with_seed(SamplingConfig(), i) for i in range(64)], steps=2)
    tokens = sample(logits, batch)
    assert tokens.dtype == torch.int64 and ((0 <= tokens) & (tokens < 2000)).all()
    assert torch.equal(tokens, sample(logits.float(), batch))
    assert filter_logits(logits, batch).dtype == torch.float32


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_draws_the_same_tokens_as_cpu_and_alone_as_in_a_batch():
    logits = random_logits(256, 5000, seed=12)
    configs = [with_seed(c, i) for i, c in enumerate(list(CONFIGS.values()) * 43)][:256]
    batch = batch_of(configs, steps=17)
    on_cpu = sample(logits, batch)
    on_cuda = sample(logits.cuda(), batch.to("cuda"))
    assert on_cuda.device.type == "cuda"
    assert (on_cuda.cpu() == on_cpu).float().mean() > 0.99  # equal up to last-bit float differences
    assert torch.equal(stream_uniform(batch.seed.cuda(), batch.step.cuda()).cpu(),
                       stream_uniform(batch.seed, batch.step))
    for i in range(0, 256, 3):
        alone = sample(logits[i:i + 1].cuda(), batch_of([configs[i]], steps=17).to("cuda"))
        assert alone.item() == on_cuda[i].item(), (i, configs[i])


# --------------------------------------------------------------------------- configuration

@pytest.mark.parametrize("kwargs, field", [
    ({"temperature": 0.0}, "temperature"),
    ({"temperature": -1.0}, "temperature"),
    ({"temperature": math.nan}, "temperature"),
    ({"top_k": -1}, "top_k"),
    ({"top_k": 2.5}, "top_k"),
    ({"top_p": 0.0}, "top_p"),
    ({"top_p": 1.01}, "top_p"),
    ({"min_p": -0.1}, "min_p"),
    ({"min_p": 1.0}, "min_p"),
    ({"seed": -1}, "seed"),
    ({"seed": 2**63}, "seed"),
    ({"key_pull": -0.5}, "key_pull"),
    ({"key_pull": 10.5}, "key_pull"),
    ({"key_pull": math.nan}, "key_pull"),
    ({"temperature": 1e-300}, "temperature"),
    ({"temperature": 10.5}, "temperature"),
    ({"top_p": 1e-300}, "top_p"),
    ({"top_k": 10**6}, "top_k"),
], ids=["T=0", "T<0", "T=nan", "top_k<0", "top_k-float", "top_p=0", "top_p>1", "min_p<0", "min_p=1",
        "seed<0", "seed-too-big", "pull<0", "pull>10", "pull=nan", "T-tiny", "T-huge", "top_p-tiny", "top_k-huge"])
def test_invalid_configs_raise_naming_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SamplingConfig(**kwargs)


def test_batch_columns_have_the_documented_types_and_checks():
    batch = batch_of([SamplingConfig(), SamplingConfig(top_k=0, seed=5)], steps=[3, 4])
    assert len(batch) == 2
    assert batch.top_k.tolist() == [50, 0] and batch.seed.tolist() == [0, 5] and batch.step.tolist() == [3, 4]
    assert batch.temperature.dtype == torch.float32 and batch.step.dtype == torch.int64
    with pytest.raises(ValueError, match="steps"):
        SamplingBatch.from_configs([SamplingConfig()], [1, 2])
    with pytest.raises(ValueError, match="rows"):
        sample(torch.zeros(3, 10), batch)


def test_an_empty_batch_draws_nothing():
    batch = batch_of([])
    assert sample(torch.zeros(0, 10), batch).shape == (0,)
    assert filter_logits(torch.zeros(0, 10), batch).shape == (0, 10)
