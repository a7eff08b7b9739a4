"""What the session store costs: ``python -m server.store_benchmark --store redis://HOST:PORT/DB``.

Runs ``--sessions`` live sessions on one engine (the served checkpoint, the server's own code: engine,
sessions, snapshots) twice, side by side in one run: first without a store, then saving every session
to the store every ``--snapshot-seconds``. Each phase lasts ``--seconds``; the sessions' notes are
"sent" as the server's senders would (every 20 ms, each note ``lookahead`` before its start). Prints,
for each phase, the engine's tokens/s (its throughput: where the sessions outrun it, as 1,000 of the shipped
model do on a small CPU, every step takes all of them and its time follows the batch) and step time
(mean, and the p99 bucket of its histogram), and for the
store phase the snapshots written per second, the bytes per second and per snapshot, and how long
one round of saving took (capture on the engine thread, encoding, one pipelined write). The machine
line (CPU, vector extensions, threads) comes first: figures from different machines do not compare.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from dataclasses import replace

import torch

from model.runtime import machine
from model.sampling.config import SamplingConfig
from model.timebase import Timeline
from server.config import ServerConfig
from server.engine import Engine
from server.metrics import Metrics
from server.served_model import ServedModel
from server.session import Session, SessionRegistry
from server.store import open_store

SEND_EVERY = 0.02  # seconds between the stand-in senders' rounds


def histogram(metric) -> tuple[float, float]:
    """(count, sum) of a prometheus Histogram."""
    count = total = 0.0
    for sample in metric.collect()[0].samples:
        if sample.name.endswith("_count"):
            count = sample.value
        elif sample.name.endswith("_sum"):
            total = sample.value
    return count, total


def p99(metric) -> float:
    """The upper bound of the bucket holding the 99th percentile."""
    buckets = [(float(s.labels["le"]), s.value) for s in metric.collect()[0].samples if s.name.endswith("_bucket")]
    total = buckets[-1][1] if buckets else 0
    for i, (bound, count) in enumerate(buckets):
        if count >= 0.99 * total:
            return bound if bound != float("inf") else -buckets[i - 1][0]  # negative: above the largest bucket
    return float("nan")


async def phase(served: ServedModel, config: ServerConfig, sessions: int, seconds: float, warmup: float,
                with_store: bool) -> dict:
    metrics = Metrics()
    engine = Engine(served.model, served.tokenizer, capacity=sessions, max_batch=config.max_batch,
                    lookahead=config.lookahead, generate_ahead=config.generate_ahead, metrics=metrics)
    engine.start()
    config = config if with_store else replace(config, store="")
    registry = SessionRegistry(config, engine, None, metrics, served.digest, open_store(config.store))
    try:
        live = [Session(registry) for _ in range(sessions)]
        streams = await asyncio.gather(*(engine.open(None, sampling=replace(SamplingConfig(), seed=i + 1),
                                                     timeline=Timeline(120), realtime=True, sink=session.on_generated,
                                                     on_error=print) for i, session in enumerate(live)))
        for session, stream in zip(live, streams):
            session.stream = stream
            session.connection = object()  # counted as connected by the saver
            registry.add(session)
        registry.saved.start()

        async def send_for(duration: float) -> None:
            until = time.perf_counter() + duration
            while time.perf_counter() < until:
                for session in live:
                    notes, _ = session.due_notes()
                    session.sent += len(notes)
                await asyncio.sleep(SEND_EVERY)

        await send_for(warmup)  # every stream primed and stepping before anything is counted
        began, tokens0 = time.perf_counter(), metrics.tokens._value.get()
        steps0, saves0 = histogram(metrics.step_seconds), histogram(metrics.save_seconds)
        written0, data0 = metrics.snapshots_saved._value.get(), metrics.snapshot_bytes._value.get()
        await send_for(seconds)
        elapsed = time.perf_counter() - began
        count, total = (a - b for a, b in zip(histogram(metrics.step_seconds), steps0))
        saves, save_seconds = (a - b for a, b in zip(histogram(metrics.save_seconds), saves0))
        written = metrics.snapshots_saved._value.get() - written0
        data = metrics.snapshot_bytes._value.get() - data0
        return {"tokens_per_second": (metrics.tokens._value.get() - tokens0) / elapsed,
                "step_ms_mean": 1000 * total / count if count else float("nan"),
                "step_ms_p99": 1000 * p99(metrics.step_seconds), "snapshots_per_second": written / elapsed,
                "bytes_per_second": data / elapsed, "bytes_per_snapshot": data / written if written else 0,
                "save_round_ms": 1000 * save_seconds / saves if saves else 0.0, "rounds": int(saves)}
    finally:
        await registry.saved.close()
        engine.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m server.store_benchmark", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--store", required=True, help="the Redis to write to, redis://HOST:PORT/DB")
    parser.add_argument("--checkpoint", default=ServerConfig.checkpoint, help="checkpoint to serve")
    parser.add_argument("--sessions", type=int, default=1000, help="live sessions")
    parser.add_argument("--seconds", type=float, default=20.0, help="length of each phase")
    parser.add_argument("--warmup", type=float, default=10.0, help="seconds each phase runs before it is measured")
    parser.add_argument("--snapshot-seconds", type=float, default=ServerConfig.snapshot_seconds,
                        help="how often each session is saved in the store phase")
    parser.add_argument("--threads", type=int, default=0, help="model threads (0: the server's default)")
    args = parser.parse_args(argv)
    try:
        config = ServerConfig(checkpoint=args.checkpoint, store=args.store, snapshot_seconds=args.snapshot_seconds,
                              max_sessions=args.sessions, threads=args.threads)
    except ValueError as exc:
        parser.error(str(exc))
    served = ServedModel(config)
    print(f"machine     {machine.line()}; torch {torch.__version__}, capability "
          f"{torch.backends.cpu.get_cpu_capability()}, {torch.get_num_threads()} threads")
    print(f"checkpoint  {served.path} ({served.parameters:,} parameters, {str(served.dtype).removeprefix('torch.')}); "
          f"{args.sessions} sessions, {args.seconds:g} s a phase, snapshots every {args.snapshot_seconds:g} s")
    rows = {}
    for name, with_store in (("no store", False), ("store", True)):
        print(f"running: {name} ...", file=sys.stderr, flush=True)
        rows[name] = asyncio.run(phase(served, config, args.sessions, args.seconds, args.warmup, with_store))
    print(f"{'':12}{'tokens/s':>10}{'step ms':>9}{'p99 ms':>8}{'writes/s':>10}{'MB/s':>7}{'KB/write':>9}"
          f"{'round ms':>9}")
    for name, r in rows.items():
        p99_ms = f"{r['step_ms_p99']:.0f}" if r["step_ms_p99"] >= 0 else f">{-r['step_ms_p99']:.0f}"
        print(f"{name:12}{r['tokens_per_second']:10.0f}{r['step_ms_mean']:9.1f}{p99_ms:>8}"
              f"{r['snapshots_per_second']:10.0f}{r['bytes_per_second'] / 1e6:7.2f}{r['bytes_per_snapshot'] / 1e3:9.1f}"
              f"{r['save_round_ms']:9.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
