"""``python -m model.tokenizer roundtrip IN OUT`` and ``python -m model.tokenizer stats DIR``: what the
tokenizer keeps of MIDI files (the measurements live in :mod:`model.evaluation.fidelity`)."""

from __future__ import annotations

import argparse
import logging
import sys

from model.evaluation import fidelity
from model.tokenizer.vocabulary import TokenizerError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m model.tokenizer",
        description="Inspect what the tokenizer keeps of MIDI files.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    rt = sub.add_parser("roundtrip", help="write the MIDI file that IN's tokens decode to",
                        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    rt.add_argument("input", help="MIDI file to tokenize")
    rt.add_argument("output", help="MIDI file to write")
    rt.add_argument("--tokenizer", default=None,
                    help="tokenizer.json to use (default: a vocabulary fitted on IN itself)")
    st = sub.add_parser("stats", help="print the round-trip fidelity table of a MIDI folder",
                        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    st.add_argument("midi_dir", help="folder of MIDI files (searched recursively)")
    st.add_argument("--tokenizer", default=None,
                    help="tokenizer.json to use (default: a vocabulary fitted on the folder)")
    st.add_argument("--cache_dir", default=None, help="token cache (default: see model.training.corpus)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")

    try:
        if args.command == "roundtrip":
            print(fidelity.roundtrip_file(args.input, args.output, args.tokenizer))
        else:
            print(fidelity.folder_table(args.midi_dir, args.tokenizer, args.cache_dir))
    except (TokenizerError, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())