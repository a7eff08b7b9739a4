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
* what a listener hears, for the generated and (``real_*``) the real continuations: voices,
  melodic moves, notes per onset, velocities, key and voice crossing (:mod:`.music`).

Both continuations are decoded into notes the same way (:func:`decode_after`: each token with its
velocity level and voice, after the prompt), so every note figure compares like with like.
:func:`continue_pieces` keeps the prompts, continuations and notes per piece
(:class:`Continuations`) for :func:`summarize` and for drawing (:mod:`.piano_roll`);
:func:`continuation_metrics` does both steps.

Every stream samples with the same settings and seed, so the continuations differ only through
their prompts (a model that ignores its prompt, e.g. an untrained one with flat logits, scores
near 0 on distinctness even though its samples look random). Works with any
:class:`model.generation.generator.BatchGenerator` (the Field Machine's, or the transformer
reference's), all N streams stepped together in one batch.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, replace

import numpy as np
import torch
from tqdm import tqdm

from model.evaluation.music import ONSET_SIZES, music_figures
from model.generation.generator import BatchGenerator, decoder_for, with_bos
from model.generation.key_pull import heard_counts, note_pitch_classes
from model.sampling.config import SamplingConfig
from model.timebase import seconds_from_beats
from model.tokenizer.sequences import TokenSequence
from model.tokenizer.stream import DecodedNote
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


def decode_after(tokenizer: Tokenizer, prompt: TokenSequence | None,
                 continuation: TokenSequence) -> list[DecodedNote]:
    """The notes of ``continuation`` (each token with its velocity level and voice) played after
    ``prompt`` (``None``: from the start), timed on the prompt's timeline."""
    decoder = decoder_for(tokenizer, with_bos(prompt))
    pushed = map(decoder.push, continuation.ids.tolist(), continuation.velocity.tolist(),
                 continuation.voice.tolist())
    return [note for note in pushed if note is not None]


def rhythm(notes: list[DecodedNote], tokenizer: Tokenizer) -> tuple[int, int, float]:
    """(notes, notes on the sixteenth grid, beats from the first onset to the last note's end)."""
    if not notes:
        return 0, 0, 0.0
    sixteenth = max(1, tokenizer.config.grid_per_beat // 4)
    on_grid = sum(note.position % sixteenth == 0 for note in notes)
    first = min(note.onset for note in notes)
    last = max(note.onset + note.duration for note in notes)
    return len(notes), on_grid, tokenizer.timebase.beats_from_steps(last - first)


def generate_batch(generator: BatchGenerator, prompts: list[TokenSequence], tokens: int,
                   sampling: SamplingConfig, progress: bool = True) -> list[TokenSequence]:
    """Continue every prompt by ``tokens`` tokens, all streams in one batch: per stream the
    tokens with the velocity level and voice the generator chose for each."""
    state, out, decoders = generator.prime_many(prompts)
    heard = torch.from_numpy(np.stack([generator.heard(p.ids) for p in prompts]))
    configs = [sampling] * len(prompts)
    rows = []
    for step in tqdm(range(tokens), desc=f"generating (seed {sampling.seed})", unit="token",
                     leave=False, disable=None if progress else True):
        results, state, out = generator.advance(state, out, decoders, configs, [step] * len(prompts), heard)
        rows.append([(r.token, r.velocity, r.voice) for r in results])
    streams = np.array(rows, dtype=np.int64).reshape(tokens, len(prompts), 3).transpose(1, 2, 0)
    return [TokenSequence(*np.ascontiguousarray(stream)) for stream in streams]


def sampling_settings(sampling: SamplingConfig) -> dict:
    """The sampling settings a report names (JSON-ready)."""
    return {"temperature": sampling.temperature, "top_k": sampling.top_k, "top_p": sampling.top_p,
            "min_p": sampling.min_p, "seed": sampling.seed, "key_pull": sampling.key_pull}


def describe_sampling(settings: dict) -> str:
    """:func:`sampling_settings` as one line: ``temperature 0.9, top_k 50, ...``."""
    return ", ".join(f"{name} {value}" for name, value in settings.items())


@dataclass
class ContinuedPiece:
    """One held-out piece, continued: its place in the input list, its prompt, both continuations
    (tokens with velocity levels and voices) and their notes (:func:`decode_after`)."""

    index: int
    """Position of the piece in the ``sequences`` given to :func:`continue_pieces`."""
    prompt: TokenSequence
    generated: TokenSequence
    reseeded: TokenSequence
    """The generated continuation again, with seed + 1."""
    real: TokenSequence
    prompt_notes: list[DecodedNote]
    generated_notes: list[DecodedNote]
    real_notes: list[DecodedNote]


@dataclass
class Continuations:
    """What :func:`continue_pieces` produced, with the settings it used."""

    prompt_tokens: int
    tokens: int
    sampling: SamplingConfig
    pieces: list[ContinuedPiece]


def continue_pieces(generator: BatchGenerator, sequences: list[TokenSequence], n: int, *,
                    prompt_tokens: int = 64, tokens: int = 256,
                    sampling: SamplingConfig = SamplingConfig(), progress: bool = True) -> Continuations:
    """Continue the first ``prompt_tokens`` of the first ``n`` of ``sequences`` long enough for
    prompt + continuation, twice (seed and seed + 1), beside their real next ``tokens``."""
    tok = generator.tokenizer
    long_enough = [i for i, s in enumerate(sequences) if len(s) >= prompt_tokens + tokens]
    if n < 2 or len(long_enough) < n:
        raise ValueError(f"continuation metrics need n >= 2 pieces of at least {prompt_tokens + tokens} "
                         f"tokens; {len(long_enough)} of {len(sequences)} are long enough, n = {n}")
    chosen = long_enough[:n]
    span = lambda s, a, b: TokenSequence(s.ids[a:b], s.velocity[a:b], s.voice[a:b])
    prompts = [span(sequences[i], 0, prompt_tokens) for i in chosen]
    real = [span(sequences[i], prompt_tokens, prompt_tokens + tokens) for i in chosen]
    generated = generate_batch(generator, prompts, tokens, sampling, progress)
    reseeded = generate_batch(generator, prompts, tokens, replace(sampling, seed=sampling.seed + 1), progress)
    pieces = [ContinuedPiece(i, p, g, again, r, decode_after(tok, None, p), decode_after(tok, p, g),
                             decode_after(tok, p, r))
              for i, p, g, again, r in zip(chosen, prompts, generated, reseeded, real)]
    return Continuations(prompt_tokens, tokens, sampling, pieces)


def summarize(run: Continuations, tokenizer: Tokenizer) -> dict:
    """The metrics of the module docstring for the continuations of ``run``."""
    pieces = run.pieces
    hist = lambda seq: pitch_class_histogram(seq.ids, tokenizer)
    gen_h, real_h = [hist(p.generated) for p in pieces], [hist(p.real) for p in pieces]
    prompt_h = [hist(p.prompt) for p in pieces]
    prompt_notes = [p.prompt_notes for p in pieces]

    def figures(rows: list[TokenSequence], notes: list[list[DecodedNote]]) -> dict:
        """Rhythm and music figures of one set of continuations (generated or real)."""
        played, on_grid, beats = np.array([rhythm(piece, tokenizer) for piece in notes]).sum(axis=0)
        return {"on_grid": float(on_grid / max(played, 1)),
                "notes_per_second": float(played / max(seconds_from_beats(beats, BPM), 1e-9)),
                "longest_repeat": int(max(longest_repeat(seq.ids) for seq in rows)),
                **music_figures(prompt_notes, notes)}

    generated = figures([p.generated for p in pieces], [p.generated_notes for p in pieces])
    real = figures([p.real for p in pieces], [p.real_notes for p in pieces])
    return {
        "n": len(pieces), "prompt_tokens": run.prompt_tokens, "continuation_tokens": run.tokens,
        "sampling": sampling_settings(run.sampling),
        "distinctness": distinctness(gen_h, real_h),
        "prompt_fidelity": prompt_fidelity(gen_h, prompt_h),
        "real_prompt_fidelity": prompt_fidelity(real_h, prompt_h),
        "seed_spread": seed_spread([p.generated.ids for p in pieces], [p.reseeded.ids for p in pieces]),
        **generated, **{f"real_{k}": v for k, v in real.items()},
    }


PIECE_FIGURES = ("voices_used", "busiest_voice_share", "chords_in_one_voice", "mean_melodic_move", "step_share",
                 "notes_per_onset", "key_correlation", "voice_crossing", "longest_repeat")
"""The figures :func:`piece_figures` gives each piece, generated and real."""


def piece_figures(run: Continuations) -> list[dict]:
    """Per piece of ``run``, the figures of :data:`PIECE_FIGURES` of its generated and its real
    continuation (``{"generated": {...}, "real": {...}}``): the averages of :func:`summarize`
    hide which pieces fail, and a listener hears pieces."""
    def figures(prompt: list[DecodedNote], notes: list[DecodedNote], ids: np.ndarray) -> dict:
        every = {**music_figures([prompt], [notes]), "longest_repeat": longest_repeat(ids)}
        return {key: every[key] for key in PIECE_FIGURES}

    return [{"generated": figures(p.prompt_notes, p.generated_notes, p.generated.ids),
             "real": figures(p.prompt_notes, p.real_notes, p.real.ids)} for p in run.pieces]


def format_pieces(names: list[str], pieces: list[dict]) -> str:
    """:func:`piece_figures` as a table, a row per piece: each figure generated / real."""
    short = {"voices_used": "voices", "busiest_voice_share": "busiest", "chords_in_one_voice": "in one voice",
             "mean_melodic_move": "move", "step_share": "steps", "notes_per_onset": "per onset",
             "key_correlation": "key", "voice_crossing": "crossing", "longest_repeat": "repeat"}
    width = max([len(n) for n in names] + [len("piece")]) + 2
    cell = lambda key, value: f"{value:.0f}" if key == "longest_repeat" else f"{value:.2f}"
    rows = ["per piece, generated / real",
            f"{'piece':<{width}}" + "".join(f"{short[k]:>14}" for k in PIECE_FIGURES)]
    for name, piece in zip(names, pieces):
        rows.append(f"{name:<{width}}" + "".join(
            f"{cell(k, piece['generated'][k]) + ' / ' + cell(k, piece['real'][k]):>14}" for k in PIECE_FIGURES))
    return "\n".join(rows)


def continuation_metrics(generator: BatchGenerator, sequences: list[TokenSequence], n: int,
                         **options) -> dict:
    """:func:`summarize` of :func:`continue_pieces` (``options`` are its keyword arguments)."""
    return summarize(continue_pieces(generator, sequences, n, **options), generator.tokenizer)


GENERATED_AND_REAL = ("on_grid", "notes_per_second", "longest_repeat", "voices_used",
                      "busiest_voice_share", "mean_melodic_move", "step_share", "notes_per_onset",
                      "velocities_used", "key_correlation", "voice_crossing", "chords_in_one_voice")
"""The figures :func:`format_metrics` prints with a generated and a real column."""


def onset_sizes_line(distribution: dict[str, float]) -> str:
    """``notes_per_onset_distribution`` as ``1:0.40 2:0.30 3:0.20 4:0.10 5+:0.00``."""
    return " ".join(f"{size}:{distribution[size]:.2f}" for size in ONSET_SIZES)


def format_metrics(m: dict) -> str:
    """The metrics as a table: one row per figure, generated and real side by side."""
    rows = [f"continuations: {m['n']} held-out prompts of {m['prompt_tokens']} tokens, "
            f"{m['continuation_tokens']} tokens each ({describe_sampling(m['sampling'])})",
            f"{'':<22}{'generated':>12}{'real':>12}",
            f"{'distinctness':<22}{m['distinctness']:>12.3f}{1.0:>12.3f}",
            f"{'prompt_fidelity':<22}{m['prompt_fidelity']:>12.3f}{m['real_prompt_fidelity']:>12.3f}",
            f"{'seed_spread':<22}{m['seed_spread']:>12.3f}{'':>12}"]
    rows += [f"{key:<22}{m[key]:>12.3f}{m['real_' + key]:>12.3f}" for key in GENERATED_AND_REAL]
    rows += [f"{'notes per onset':<22}generated {onset_sizes_line(m['notes_per_onset_distribution'])}",
             f"{'':<22}real      {onset_sizes_line(m['real_notes_per_onset_distribution'])}"]
    return "\n".join(rows)
