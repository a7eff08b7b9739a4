"""Batched, per-stream sampling from ``(B, V)`` logits: temperature, top-k, top-p, min-p.

The server steps up to thousands of live streams in one forward pass; each stream has its own
:class:`SamplingConfig` and its own step counter. This module turns that pass's logits into one
token per stream in a single vectorised call (no Python loop over streams). It knows nothing of
the model: it works on whatever ``(B, V)`` logits a batched ``step`` produced.

Usage::

    batch = SamplingBatch.from_configs(configs, steps, device=logits.device)
    tokens = sample(logits, batch)            # (B,) int64
    kept = filter_logits(logits, batch)       # (B, V) float32, -inf where excluded

Filtering (:func:`filter_logits`), per row, on the tempered logits ``x = logits.float() / T``:

* **top-k** keeps tokens whose logit is at least the k-th largest (``top_k = 0`` or ``>= V``:
  off): nanoGPT's ``logits[logits < v[:, [-1]]] = -inf`` with a per-row k.
* **top-p** keeps the smallest prefix of the top-k tokens, sorted by probability, whose mass
  reaches ``top_p`` of the top-k mass (top-p after top-k, on the renormalised distribution, as
  Hugging Face and vLLM order them); ``top_p = 1``: off.
* **min-p** keeps tokens whose probability is at least ``min_p`` times the top token's, i.e.
  ``x >= max(x) + log(min_p)``; ``min_p = 0``: off.

Each rule gives the row a logit threshold and the row keeps ``x >= max(thresholds)``, so the top
token is always kept. Thresholds are values, not positions: tokens tied with the last kept one are
kept too (as in nanoGPT), so on distinct logits top-k keeps exactly k tokens, and a row's kept set
never depends on how a sort happened to order ties.

Top-k and top-p need each row's largest logits in descending order, then one cumsum of their
probabilities and masks. A full sort of ``V`` is over 10x slower on CPU than ``torch.topk`` of the
``K = max(top_k) + 1`` largest, so only those candidates are taken; rows with top-p or min-p but
no top-k start from 64 candidates. Where a row's kept set may run past its candidates (a wide
nucleus or min-p set, or a tie past the k-th token, which the extra candidate shows), that row's
pool alone widens x4, the others being padded with -inf, until every kept set fits.

Sampling (:func:`sample`) is inverse-CDF in token-id order over the kept tokens: weights
``w = exp(x - max x)``, zero where excluded, ``cdf = cumsum(w)``, and the token is the first with
``cdf > u * cdf[-1]`` (``searchsorted``). Filtered rows walk their candidates re-sorted by id;
rows with no filter at all walk the whole vocabulary (only those rows, so a row's path never
depends on the others). Walking in id order, not probability order, keeps
tied tokens in a fixed order. Weights are float32 whatever the logits' dtype (bfloat16 and
float16 included); their sums are accumulated in float64, so a different summation order (pool
width, batch shape, device) moves them by ~1e-16 only; the normaliser cancels, so no softmax.

Randomness is counter-based, not stateful: ``u = stream_uniform(seed, step)`` hashes each
stream's ``(seed, step)`` with Philox4x32-10 (Salmon et al., 2011; the generator behind
``curand``), written with int64 torch ops whose intermediates stay below 2**49 so nothing
overflows, on CPU and CUDA alike. The token a stream draws therefore depends only on its logits,
its settings, its seed and its step, never on the other streams in the batch, their order, or the
global torch RNG; replaying a stream with the same seed replays its tokens. Caveat: ``u`` is exact
but float32 ``exp`` may differ in the last bit between CPU code paths or devices, which can move
a token only when ``u`` falls within such a rounding of a CDF boundary (~1e-7 per draw).

Host syncs: choosing ``K`` reads ``max(top_k)`` on the host, and checking that every kept token is
a candidate reads the rows that spill: two small device-to-host copies per call, one more per
widening.

Every row needs at least one finite logit; ``-inf`` logits (masked tokens) are never drawn.

Modules: :mod:`.config` (``SamplingConfig``: a stream's settings and their ranges, the one
validation of them), :mod:`.batch` (``SamplingBatch``: the settings of a batch as tensors),
:mod:`.philox` (counter-based random numbers), :mod:`.sample` (filtering and drawing).
"""
