"""Does the model follow its prompt? Continuation metrics on held-out files.

Take N held-out pieces, use the first ``prompt_tokens`` tokens of each as a prompt, generate
``tokens`` tokens with the given sampling settings, and compare with the pieces' real next
``tokens`` tokens:

* ``distinctness``: mean pairwise Jensen-Shannon distance (base 2, in [0, 1]) between the
  pitch-class histograms of the N generated continuations, divided by the same for the N real
  continuations. 1.0: as varied as the music itself; a model that plays one song whatever the
  prompt is near 0.
* ``prompt_fidelity``: share of prompts whose continuation's histogram is closer (JS distance)
  to its own prompt's than to any other prompt's.
* ``seed_spread``: each prompt is continued again with seed + 1; share of token positions where
  the two continuations differ, averaged over prompts.
* rhythm sanity, for the generated and (``real_*``) the real continuations: ``on_grid``, the
  share of notes whose onset lies on the sixteenth-note grid; ``notes_per_second`` at 120 beats
  per minute, from the first note's onset to the last note's end; ``longest_repeat``, the longest run of one
  token repeated back to back (the longest of the N).

Every stream samples with the same settings and seed, so the continuations differ only through
their prompts (a model that ignores its prompt, e.g. an untrained one with flat logits, scores
near 0 on distinctness even though its samples look random). Works with any
:class:`model.generation.generator.BatchGenerator` (the Field Machine's, or the transformer
reference's), all N streams stepped together in one batch.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import replace

import numpy as np
import torch
from tqdm import tqdm

from model.generation.generator import BatchGenerator, decoder_for, with_bos
from model.generation.key_pull import heard_counts, note_pitch_classes
from model.sampling.config import SamplingConfig
from model.timebase import seconds_from_beats
from model.tokenizer.sequences import TokenSequence
from model.tokenizer.tokenizer import Tokenizer

BPM = 120.0  # tokens carry no tempo: notes per second are counted at 120 beats a minute


def pitch_class_histogram(ids: np.ndarray, tokenizer: Tokenizer) -> np.ndarray:
    """(12,) share of NOTE tokens per pitch class; uniform when there are no notes."""
    counts = heard_counts(ids, note_pitch_classes(tokenizer)).astype(np.float64)
    return counts / counts.sum() if counts.sum() else np.full(12, 1 / 12)


def js_distance(p: np.ndarray, q: np.ndarray) -> float:
    """Jensen-Shannon distance (square root of the divergence, base 2) between two histograms."""
    m = (p + q) / 2

    def kl(a: np.ndarray) -> float:
        nz = a > 0
        return float(np.sum(a[nz] * np.log2(a[nz] / m[nz])))

    return float(np.sqrt(max(0.0, (kl(p) + kl(q)) / 2)))


def mean_pairwise_distance(histograms: list[np.ndarray]) -> float:
    pairs = list(itertools.combinations(histograms, 2))
    return float(np.mean([js_distance(a, b) for a, b in pairs])) if pairs else 0.0


def distinctness(generated: list[np.ndarray], real: list[np.ndarray]) -> float:
    """Mean pairwise JS distance of the generated histograms over that of the real ones."""
    return mean_pairwise_distance(generated) / max(mean_pairwise_distance(real), 1e-12)


def prompt_fidelity(generated: list[np.ndarray], prompts: list[np.ndarray]) -> float:
    """Share of continuations closer to their own prompt than to every other prompt."""
    hits = 0
    for i, g in enumerate(generated):
        distances = [js_distance(g, p) for p in prompts]
        own = distances.pop(i)
        hits += own < min(distances)
    return hits / len(generated)


def seed_spread(first: list[np.ndarray], second: list[np.ndarray]) -> float:
    """Mean share of positions where two continuations of the same prompt differ."""
    return float(np.mean([np.mean(a[:len(b)] != b[:len(a)]) for a, b in zip(first, second)]))


def longest_repeat(ids: np.ndarray) -> int:
    """Longest run of one token repeated back to back."""
    best = run = 0
    previous = None
    for t in np.asarray(ids).tolist():
        run = run + 1 if t == previous else 1
        best, previous = max(best, run), t
    return best


def rhythm(prompt: TokenSequence, ids: np.ndarray, tokenizer: Tokenizer) -> tuple[int, int, float]:
    """(notes, notes on the sixteenth grid, beats from the first onset to the last note's end) of
    ``ids`` played after ``prompt``."""
    decoder = decoder_for(tokenizer, with_bos(prompt))
    sixteenth = max(1, tokenizer.config.grid_per_beat // 4)
    notes = on_grid = 0
    first, last = math.inf, -math.inf
    for t in np.asarray(ids).tolist():
        note = decoder.push(int(t))
        if note is not None:
            notes += 1
            on_grid += note.position % sixteenth == 0
            first, last = min(first, note.onset), max(last, note.onset + note.duration)
    return notes, on_grid, tokenizer.timebase.beats_from_steps(last - first) if notes else 0.0


def generate_batch(generator: BatchGenerator, prompts: list[TokenSequence], tokens: int,
                   sampling: SamplingConfig, progress: bool = True) -> list[np.ndarray]:
    """Continue every prompt by ``tokens`` tokens, all streams in one batch; ids per stream."""
    state, out, decoders = generator.prime_many(prompts)
    heard = torch.from_numpy(np.stack([generator.heard(p.ids) for p in prompts]))
    configs = [sampling] * len(prompts)
    rows = []
    for step in tqdm(range(tokens), desc=f"generating (seed {sampling.seed})", unit="token",
                     leave=False, disable=None if progress else True):
        results, state, out = generator.advance(state, out, decoders, configs, [step] * len(prompts), heard)
        rows.append([r.token for r in results])
    return list(np.array(rows, dtype=np.int64).T)


def continuation_metrics(generator: BatchGenerator, sequences: list[TokenSequence], n: int, *,
                         prompt_tokens: int = 64, tokens: int = 256,
                         sampling: SamplingConfig = SamplingConfig(), progress: bool = True) -> dict:
    """The metrics above on the first ``n`` of ``sequences`` long enough for prompt + continuation."""
    tok = generator.tokenizer
    long_enough = [s for s in sequences if len(s) >= prompt_tokens + tokens]
    if n < 2 or len(long_enough) < n:
        raise ValueError(f"continuation metrics need n >= 2 pieces of at least {prompt_tokens + tokens} "
                         f"tokens; {len(long_enough)} of {len(sequences)} are long enough, n = {n}")
    chosen = long_enough[:n]
    prompts = [TokenSequence(s.ids[:prompt_tokens], s.velocity[:prompt_tokens], s.voice[:prompt_tokens])
               for s in chosen]
    real = [s.ids[prompt_tokens:prompt_tokens + tokens] for s in chosen]
    generated = generate_batch(generator, prompts, tokens, sampling, progress)
    reseeded = generate_batch(generator, prompts, tokens, replace(sampling, seed=sampling.seed + 1), progress)

    hist = lambda ids: pitch_class_histogram(ids, tok)
    gen_h, real_h, prompt_h = [hist(g) for g in generated], [hist(r) for r in real], [hist(p.ids) for p in prompts]

    def rhythm_summary(rows: list[np.ndarray]) -> dict:
        counts = np.array([rhythm(p, ids, tok) for p, ids in zip(prompts, rows)])
        notes, on_grid, beats = counts.sum(axis=0)
        return {"on_grid": float(on_grid / max(notes, 1)),
                "notes_per_second": float(notes / max(seconds_from_beats(beats, BPM), 1e-9)),
                "longest_repeat": int(max(longest_repeat(ids) for ids in rows))}

    gen_rhythm, real_rhythm = rhythm_summary(generated), rhythm_summary(real)
    return {
        "n": n, "prompt_tokens": prompt_tokens, "continuation_tokens": tokens,
        "sampling": {"temperature": sampling.temperature, "top_k": sampling.top_k,
                     "top_p": sampling.top_p, "min_p": sampling.min_p, "seed": sampling.seed,
                     "key_pull": sampling.key_pull},
        "distinctness": distinctness(gen_h, real_h),
        "prompt_fidelity": prompt_fidelity(gen_h, prompt_h),
        "real_prompt_fidelity": prompt_fidelity(real_h, prompt_h),
        "seed_spread": seed_spread(generated, reseeded),
        **gen_rhythm, **{f"real_{k}": v for k, v in real_rhythm.items()},
    }


def format_metrics(m: dict) -> str:
    rows = [f"continuations: {m['n']} held-out prompts of {m['prompt_tokens']} tokens, "
            f"{m['continuation_tokens']} tokens each (temperature {m['sampling']['temperature']}, "
            f"top_k {m['sampling']['top_k']}, top_p {m['sampling']['top_p']}, "
            f"key_pull {m['sampling']['key_pull']})",
            f"{'':<18}{'generated':>12}{'real':>12}",
            f"{'distinctness':<18}{m['distinctness']:>12.3f}{1.0:>12.3f}",
            f"{'prompt_fidelity':<18}{m['prompt_fidelity']:>12.3f}{m['real_prompt_fidelity']:>12.3f}",
            f"{'seed_spread':<18}{m['seed_spread']:>12.3f}{'':>12}"]
    for key in ("on_grid", "notes_per_second", "longest_repeat"):
        rows.append(f"{key:<18}{m[key]:>12.3f}{m['real_' + key]:>12.3f}")
    return "\n".join(rows)
