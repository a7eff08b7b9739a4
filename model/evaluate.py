"""Held-out NLL next to baselines: ``python -m model.evaluate --checkpoint DIR --midi_dir DIR``.

Every file of ``--midi_dir`` is tokenized with the checkpoint's tokenizer and scored whole (in
chunks that carry the field over, which gives exactly the one-pass result). The unigram and
bigram baselines were fitted on the checkpoint's own training split and stored in it. NLL is
reported in nats per token and in bits per note (total bits over the files' notes).

With ``--continuations N`` it also continues the first 64 tokens of N of the scored files and
reports how varied, prompt-faithful and seed-dependent the continuations are, and what a listener
would notice in them beside the real continuations: voices, melodic moves, chords, velocities,
key and voice crossing (:mod:`model.evaluation.continuation`, :mod:`model.evaluation.music`).
``--plots DIR`` also draws each prompt's generated and real continuations as a piano roll,
``DIR/<position>_<file stem>.png`` (:mod:`model.evaluation.piano_roll`), and ``--per_piece``
prints each piece's figures (``--json`` always holds them, under ``pieces``): the averages hide
which pieces fail.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from pathlib import Path

from tqdm import tqdm

from model.checkpoint.files import CheckpointError
from model.checkpoint.format import load_model
from model.evaluation.baselines import Baselines
from model.evaluation.continuation import continue_pieces, format_metrics, format_pieces, piece_figures, summarize
from model.evaluation.nll import sequence_nll
from model.evaluation.piano_roll import write_piano_rolls
from model.generation.generator import BatchGenerator
from model.runtime.device import resolve_device
from model.runtime.flags import add_dataclass_arguments, dataclass_from_args
from model.sampling.config import SamplingConfig
from model.training.corpus import load_corpus

logger = logging.getLogger(__name__)


def evaluate(checkpoint: str, midi_dir: str, *, device: str = "auto",
             cache_dir: str | None = None, split: str = "all", continuations: int = 0,
             prompt_tokens: int = 64, continuation_tokens: int = 256,
             sampling: SamplingConfig = SamplingConfig(), plots_dir: str | None = None) -> dict:
    """Score ``midi_dir`` with ``checkpoint`` (see the module docstring); with ``continuations``,
    the continuation metrics too, and with ``plots_dir`` their piano rolls (paths under ``plots``)."""
    dev = resolve_device(device)
    model, tokenizer, loaded = load_model(checkpoint, device=dev)
    model.float()
    if "baseline_unigram" not in loaded.extras:
        raise CheckpointError(f"{loaded.path}: the checkpoint holds no baselines")
    baselines = Baselines.from_tensors(loaded.extras)
    corpus = load_corpus(midi_dir, tokenizer.config, cache_dir=cache_dir)
    if split != "all":
        if not loaded.train_config:
            raise CheckpointError(f"{loaded.path}: no training settings stored, so no split")
        train_files, val_files = corpus.split(loaded.train_config["val_fraction"])
        corpus.files = val_files if split == "val" else train_files
    sequences = [tokenizer.encode_events(f.events) for f in corpus.files]
    model_nats = 0.0
    for seq in tqdm(sequences, desc="scoring", unit="file", disable=None, leave=False):
        model_nats += sequence_nll(model, tokenizer, seq, dev)
    uni_nats, bi_nats, count = baselines.nll([s.ids for s in sequences])
    notes = sum(f.events.note_count for f in corpus.files)
    unknown = sum(s.unknown for s in sequences)
    approximated = sum(s.approximated for s in sequences)
    per_token = lambda nats: nats / max(count, 1)
    bits_note = lambda nats: nats / math.log(2) / max(notes, 1)
    extra = {}
    if continuations:
        run = continue_pieces(BatchGenerator(model, tokenizer), sequences, continuations,
                              prompt_tokens=prompt_tokens, tokens=continuation_tokens, sampling=sampling)
        extra = summarize(run, tokenizer)
        names = [Path(corpus.files[piece.index].path).stem for piece in run.pieces]
        extra = {"continuations": extra.pop("n"), **extra,
                 "pieces": [{"name": name, **figures} for name, figures in zip(names, piece_figures(run))]}
        if plots_dir:
            written = write_piano_rolls(run, names, plots_dir, tokenizer.timebase.resolution)
            extra["plots"] = [str(path) for path in written]
    return {
        "checkpoint": str(loaded.path), "midi_dir": midi_dir,
        "model_nll": per_token(model_nats), "unigram_nll": per_token(uni_nats),
        "bigram_nll": per_token(bi_nats),
        "model_bits_per_note": bits_note(model_nats), "unigram_bits_per_note": bits_note(uni_nats),
        "bigram_bits_per_note": bits_note(bi_nats),
        "split": split, "tokens": count, "notes": notes, "files": len(corpus.files),
        "recovered": len(corpus.recovered),
        "skipped": [{"path": p, "reason": r} for p, r in corpus.skipped],
        "unknown_share": unknown / max(notes, 1), "nearest_duration_share": approximated / max(notes, 1),
        **extra,
    }


def format_table(r: dict, per_piece: bool = False) -> str:
    rows = [
        f"checkpoint  {r['checkpoint']}",
        f"files       {r['files']} read ({r['recovered']} recovered), {len(r['skipped'])} skipped",
        f"tokens      {r['tokens']} next-token targets, {r['notes']} notes; outside the vocabulary: "
        f"{100 * r['unknown_share']:.2f}% UNK, {100 * r['nearest_duration_share']:.2f}% nearest duration",
        "",
        f"{'model':<10}{'nats/token':>12}{'bits/note':>12}",
        f"{'FM':<10}{r['model_nll']:>12.4f}{r['model_bits_per_note']:>12.3f}",
        f"{'unigram':<10}{r['unigram_nll']:>12.4f}{r['unigram_bits_per_note']:>12.3f}",
        f"{'bigram':<10}{r['bigram_nll']:>12.4f}{r['bigram_bits_per_note']:>12.3f}",
    ]
    rows += [f"skipped {s['path']}: {s['reason']}" for s in r["skipped"]]
    if r.get("continuations"):
        rows += ["", format_metrics({**r, "n": r["continuations"]})]
    if per_piece and r.get("pieces"):
        rows += ["", format_pieces([p["name"] for p in r["pieces"]], r["pieces"])]
    if r.get("plots"):
        rows.append(f"piano rolls: {len(r['plots'])} written to {Path(r['plots'][0]).parent}")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m model.evaluate", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="checkpoint directory (e.g. runs/fm/best)")
    parser.add_argument("--midi_dir", required=True, help="folder of MIDI files to score")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="where to run")
    parser.add_argument("--cache_dir", default=None, help="token cache folder (default: model.training.corpus's)")
    parser.add_argument("--split", default="all", choices=("all", "val", "train"),
                        help="score every file, or only the checkpoint's validation or training "
                             "files (the trainer's deterministic split of the same folder)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--continuations", type=int, default=0,
                        help="continue the first --prompt_tokens of N of the scored files (those long "
                             "enough, in path order) and report the continuation metrics and music "
                             "figures beside the real continuations (0 = off)")
    parser.add_argument("--prompt_tokens", type=int, default=64, help="prompt length for --continuations")
    parser.add_argument("--continuation_tokens", type=int, default=256,
                        help="tokens generated per prompt for --continuations")
    parser.add_argument("--plots", default=None, metavar="DIR",
                        help="with --continuations: write one piano roll per prompt, generated above "
                             "real, to DIR/<position>_<file stem>.png")
    parser.add_argument("--per_piece", action="store_true",
                        help="with --continuations: also print each piece's figures, generated / real "
                             "(--json always has them, under pieces)")
    add_dataclass_arguments(parser, SamplingConfig)
    args = parser.parse_args(argv)
    if args.plots and not args.continuations:
        parser.error("--plots draws the continuations: give --continuations N too")
    if args.per_piece and not args.continuations:
        parser.error("--per_piece prints the continuations' figures: give --continuations N too")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    try:
        result = evaluate(args.checkpoint, args.midi_dir, device=args.device,
                          cache_dir=args.cache_dir, split=args.split, continuations=args.continuations,
                          prompt_tokens=args.prompt_tokens, continuation_tokens=args.continuation_tokens,
                          sampling=dataclass_from_args(SamplingConfig, args), plots_dir=args.plots)
    except (CheckpointError, FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(result) if args.json else format_table(result, per_piece=args.per_piece))
    return 0


if __name__ == "__main__":
    sys.exit(main())
