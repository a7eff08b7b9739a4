"""A fuzzer for the MIDI reader and the tokenizer: ``python -m tests.fuzz_midi --fuzz 100000``.

Inputs are made by mutating small valid files (bit flips, truncations, inserted and deleted
bytes, huge delta times, tempos, time signatures, key signatures and track counts) and from raw
random event streams, deterministically from ``--seed``. Each is read with
:func:`model.midi.read.read_midi` and tokenized (``Tokenizer.events``), and classified:

* ``read``: a score and its events came back;
* ``refused``: :class:`MidiReadError` or :class:`TokenizerError`, the clean refusals;
* ``other``: any other exception (a bug);
* ``slow``: took longer than ``--seconds`` (a bug: the limits must stop it first).

It prints the counts and the peak memory of the worker processes, writes every input of the last
two kinds to ``--save`` (default ``tests/artifacts/fuzz``) and exits 1 if there were any. The
test suite runs the same generator through hypothesis for a bounded number of examples
(``tests/test_fuzz_midi.py``) and keeps inputs that once failed in ``tests/fixtures/hostile``.
"""

from __future__ import annotations

import argparse
import multiprocessing
import random
import resource
import struct
import sys
import time
from collections import Counter
from pathlib import Path

from model.midi.limits import ReadLimits
from model.midi.read import read_midi
from model.midi.score import MidiReadError
from model.tokenizer.tokenizer import Tokenizer
from model.tokenizer.vocabulary import TokenizerError
from tests.midi_builders import build_midi

HOSTILE = Path(__file__).resolve().parent / "fixtures" / "hostile"
SEEDS = [
    build_midi([(0, 1, 60), (1, 1, 62, 90, 1), (2, 2, 64, 70, 2)]),
    build_midi([(i * 0.5, 0.5, 48 + i % 24, 60 + i, i % 3) for i in range(40)], time_signatures=((0, 3, 4),)),
    build_midi([(0, 4, 60), (0, 4, 64), (4, 1, 67)], midi_type=0, ticks_per_beat=96),
]


def vlq(value: int) -> bytes:
    out = [value & 0x7F]
    value >>= 7
    while value:
        out.append(0x80 | (value & 0x7F))
        value >>= 7
    return bytes(reversed(out))


def smf(tracks: list[bytes], *, fmt: int = 1, division: int = 480, ntracks: int | None = None) -> bytes:
    """A Standard MIDI File from raw track bodies (each without its MTrk header)."""
    head = b"MThd" + struct.pack(">LHHH", 6, fmt, len(tracks) if ntracks is None else ntracks, division)
    return head + b"".join(b"MTrk" + struct.pack(">L", len(t)) + t for t in tracks)


EOT = b"\x00\xff\x2f\x00"


def random_events(rng: random.Random) -> bytes:
    """A track body of random (mostly well-framed) events."""
    body = bytearray()
    for _ in range(rng.randrange(1, 40)):
        delta = rng.choice([0, 0, 1, 96, 480, rng.randrange(1 << 28)])
        body += vlq(delta)
        kind = rng.random()
        if kind < 0.5:
            body += bytes([0x90 | rng.randrange(16), rng.randrange(128), rng.randrange(128)])
        elif kind < 0.7:
            body += bytes([0x80 | rng.randrange(16), rng.randrange(128), rng.randrange(128)])
        elif kind < 0.8:
            body += b"\xff\x51\x03" + rng.randrange(1 << 24).to_bytes(3, "big")  # tempo, 0 included
        elif kind < 0.88:
            body += b"\xff\x58\x04" + bytes([rng.randrange(256), rng.randrange(256), 24, 8])  # meter
        elif kind < 0.94:
            body += b"\xff\x59\x02" + bytes([rng.randrange(256), rng.randrange(256)])  # key signature
        else:
            body += bytes(rng.randrange(256) for _ in range(rng.randrange(1, 6)))  # garbage
    return bytes(body) + EOT


def mutate(data: bytes, rng: random.Random) -> bytes:
    data = bytearray(data)
    for _ in range(rng.randrange(1, 5)):
        choice = rng.random()
        if not data:
            break
        at = rng.randrange(len(data))
        if choice < 0.3:
            data[at] ^= 1 << rng.randrange(8)
        elif choice < 0.45:
            del data[at:at + rng.randrange(1, 16)]
        elif choice < 0.6:
            data[at:at] = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 8)))
        elif choice < 0.7:
            data = data[:at]
        elif choice < 0.8:  # a huge delta time before some event
            data[at:at] = b"\x8f\xff\xff\x7f"
        elif choice < 0.9 and len(data) > 12:  # another track count or division in the header
            data[10:14] = struct.pack(">HH", rng.choice([0, 1, 65535, rng.randrange(65536)]),
                                      rng.choice([0, 1, 480, 0x7FFF, 0xE728, rng.randrange(65536)]))
        else:
            data[at:at + 1] = rng.choice([b"\xff\x51\x03\x00\x00\x00", b"\xff\x58\x04\x04\xff\x18\x08",
                                          b"\xff\x59\x02\x14\x05", b"\xff\x58\x04\x00\x02\x18\x08"])
    return bytes(data)


def make_input(index: int, seed: int = 0) -> bytes:
    """The ``index``-th input of the stream for ``seed`` (deterministic)."""
    rng = random.Random(seed * 1_000_003 + index)
    kind = rng.random()
    if kind < 0.55:
        return mutate(rng.choice(SEEDS), rng)
    if kind < 0.9:
        tracks = [random_events(rng) for _ in range(rng.randrange(1, 4))]
        return smf(tracks, fmt=rng.choice([0, 1, 1, 2]), division=rng.choice([1, 96, 480, 0x7FFF]),
                   ntracks=rng.choice([None, None, 0, 65535]))
    return bytes(rng.randrange(256) for _ in range(rng.randrange(0, 200)))


TOKENIZER = Tokenizer()
LIMITS = ReadLimits()


def classify(data: bytes) -> tuple[str, str]:
    """(outcome, detail) of reading and tokenizing ``data``; see the module docstring."""
    try:
        score = read_midi(data, name="fuzz", limits=LIMITS)
        TOKENIZER.events(score, LIMITS)
    except (MidiReadError, TokenizerError) as exc:
        return "refused", str(exc)[:200]
    except Exception as exc:  # what the fuzzer looks for
        return "other", f"{type(exc).__name__}: {exc}"[:200]
    return "read", ""


def _run(args: tuple[int, int, float]) -> tuple[int, str, str, float]:
    index, seed, limit = args
    data = make_input(index, seed)
    began = time.perf_counter()
    outcome, detail = classify(data)
    seconds = time.perf_counter() - began
    return index, ("slow" if seconds > limit else outcome), detail, seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.fuzz_midi", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--fuzz", type=int, default=10_000, help="inputs to try")
    parser.add_argument("--seed", type=int, default=0, help="seed of the input stream")
    parser.add_argument("--seconds", type=float, default=5.0, help="an input taking longer counts as slow")
    parser.add_argument("--workers", type=int, default=max(1, multiprocessing.cpu_count()), help="processes")
    parser.add_argument("--save", default="tests/artifacts/fuzz", help="folder for the inputs that failed")
    args = parser.parse_args(argv)
    counts: Counter[str] = Counter()
    failures = []
    slowest = 0.0
    started = time.perf_counter()
    with multiprocessing.Pool(args.workers) as pool:
        jobs = ((i, args.seed, args.seconds) for i in range(args.fuzz))
        for done, (index, outcome, detail, seconds) in enumerate(pool.imap_unordered(_run, jobs, chunksize=64), 1):
            counts[outcome] += 1
            slowest = max(slowest, seconds)
            if outcome in ("other", "slow"):
                failures.append((index, outcome, detail))
            if done % 10_000 == 0:
                print(f"  {done:,} inputs, {dict(counts)}", file=sys.stderr, flush=True)
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    print(f"inputs {args.fuzz:,} (seed {args.seed}) in {time.perf_counter() - started:.0f} s on {args.workers} "
          f"processes: read {counts['read']:,}, clean refusals {counts['refused']:,}, other exceptions "
          f"{counts['other']:,}, over {args.seconds:g} s {counts['slow']:,}; slowest {slowest:.2f} s; "
          f"peak memory of a worker {peak:.0f} MiB")
    if failures:
        out = Path(args.save)
        out.mkdir(parents=True, exist_ok=True)
        for index, outcome, detail in failures[:200]:
            (out / f"{outcome}-{args.seed}-{index}.mid").write_bytes(make_input(index, args.seed))
            print(f"{outcome} #{index}: {detail}")
        print(f"{len(failures)} failing inputs written to {out}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
