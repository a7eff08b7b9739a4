"""Tokenize a MIDI folder and print the corpus summary: ``python -m model.corpus --midi_dir DIR``.

Reads every ``.mid``/``.midi`` file under DIR (recovering broken ones where it can) and prints
files read, recovered and skipped (with reasons), notes, tokens and vocabulary size. Events are
cached per file (see :mod:`model.training.corpus`), so a second run reads no MIDI at all.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time

from model.tokenizer.tokenizer import Tokenizer
from model.training.corpus import corpus_report, encode_corpus, load_corpus


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m model.corpus", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--midi_dir", required=True, help="folder of MIDI files (searched recursively)")
    parser.add_argument("--cache_dir", default=None,
                        help="event cache folder (default: $FM_CACHE_DIR or ~/.cache/fm-server)")
    parser.add_argument("--retokenize", action="store_true", help="ignore the cache and re-read every file")
    parser.add_argument("--save_tokenizer", default=None, metavar="PATH",
                        help="write the fitted tokenizer (settings and vocabulary) to this JSON file")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    started = time.perf_counter()
    try:
        corpus = load_corpus(args.midi_dir, cache_dir=args.cache_dir, use_cache=not args.retokenize,
                             progress=True)
    except FileNotFoundError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    tokenizer = Tokenizer().fit(f.events for f in corpus.files)
    sequences = encode_corpus(corpus.files, tokenizer)
    seconds = time.perf_counter() - started
    if args.save_tokenizer:
        tokenizer.save(args.save_tokenizer)
    if args.json:
        print(json.dumps({
            "files": len(corpus.files) + len(corpus.skipped), "read": len(corpus.files),
            "recovered": [f.path for f in corpus.recovered],
            "skipped": [{"path": p, "reason": r} for p, r in corpus.skipped],
            "notes": corpus.notes, "tokens": sum(len(s) for s in sequences),
            "vocab_size": tokenizer.vocab_size, "cache_hits": corpus.cache_hits,
            "seconds": round(seconds, 3)}))
    else:
        print(corpus_report(corpus, tokenizer, sequences, seconds))
    return 0 if corpus.files else 1


if __name__ == "__main__":
    sys.exit(main())
