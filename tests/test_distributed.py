"""Training under torchrun (model.training.distributed): two CPU processes (gloo) train as one does.

The runs are real ``torchrun --standalone`` subprocesses (a free loopback port, nothing else), on a
tiny corpus and model so each takes seconds.
"""

from __future__ import annotations

import csv
import json
import math
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from model.checkpoint.format import load_checkpoint
from model.training.batches import collate
from model.training.distributed import Ranks, ranks_from_environment
from tests.conftest import REPO, tiny_corpus, wait_for_training_steps

# Per-step losses and gradient norms of two processes against one, in fp32: the same sums, added in
# another order (they agree to the log's 5 and 4 decimals).
LOSS_RTOL = 1e-4


def ranks(rank: int, world: int) -> Ranks:
    return Ranks(rank=rank, world_size=world, local_rank=rank, device=torch.device("cpu"))


@pytest.mark.parametrize("items, world", [(10, 2), (5, 2), (7, 3), (1, 2), (0, 2), (4, 1)],
                         ids=["even", "odd", "three-ranks", "fewer-items-than-ranks", "empty", "one-process"])
def test_shards_are_disjoint_ordered_and_balanced(items, world):
    shards = [ranks(r, world).shard(list(range(items))) for r in range(world)]
    assert [i for shard in shards for i in shard] == list(range(items))
    assert max(map(len, shards)) - min(map(len, shards)) <= 1


def test_an_empty_share_still_gives_every_parameter_a_gradient():
    """A rank whose share of a short global batch is empty scores nothing, yet reaches every
    parameter (zero gradients), as DDP needs from every rank in every step."""
    from model.fm.config import ModelConfig
    from model.fm.machine import FieldMachine
    from model.training.trainer import BatchLoss
    from tests.model_shapes import token_shape

    batch = collate([], [], torch.device("cpu"))
    assert batch["dna"].shape[0] == 1 and not batch["mask"].any()
    model = FieldMachine(ModelConfig(**token_shape(50), dim=16, width=16, decoder_hidden=16, field_layers=2))
    sums = BatchLoss(model)(batch)
    assert [float(sums[k].detach()) for k in ("token", "velocity", "voice", "tokens", "notes")] == [0.0] * 5
    (sums["token"] + sums["velocity"] + sums["voice"]).backward()
    assert all(p.grad is not None and not p.grad.any() for p in model.parameters())


def test_without_torchrun_it_is_one_process():
    alone = ranks_from_environment("cpu", {})
    assert (alone.rank, alone.world_size, alone.distributed, alone.is_main) == (0, 1, False, True)
    second = ranks_from_environment("cpu", {"WORLD_SIZE": "4", "RANK": "1", "LOCAL_RANK": "1"})
    assert (second.rank, second.world_size, second.is_main, second.device.type) == (1, 4, False, "cpu")


def _collectives(rank: int, store: str, out: str) -> None:
    """One of two gloo processes (:func:`torch.multiprocessing.spawn`): what the helpers answer."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    me = ranks(rank, 2)
    seen = {"sum": me.sum(torch.tensor([rank + 1.0])).tolist(), "floats": me.sum_floats(1.5, rank),
            "same": me.same(7, 8), "differ": me.same(7, rank), "elapsed": me.agree(10.0 + rank)}
    if rank == 1:
        me.stop_requested.set()  # what a signal to this rank does
    try:
        me.agree(0.0)
        seen["stopped"] = False
    except KeyboardInterrupt:
        seen["stopped"] = True
    dist.destroy_process_group()
    Path(out, f"rank{rank}.json").write_text(json.dumps(seen))


def test_collectives_give_every_rank_the_same_answer(tmp_path):
    torch.multiprocessing.spawn(_collectives, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=2)
    answers = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert answers[0] == answers[1] == {
        "sum": [3.0], "floats": [3.0, 1.0], "same": True, "differ": False,
        "elapsed": 10.0,  # rank 0's clock
        "stopped": True}  # a stop asked of rank 1 stops rank 0 at the same step


def train_args(corpus: Path, out: Path, cache: Path, *extra: str) -> list[str]:
    """A tiny fp32 run without dropout (so one and two processes draw no random masks), every
    step logged. ``--batch_size 5`` over two ranks gives shares of 3 and 2 windows of different
    token counts, and this corpus's 11-window epochs end on a one-window batch: the second rank's
    share is then empty."""
    return ["-m", "model.train", "--midi_dir", str(corpus), "--out_dir", str(out), "--cache_dir", str(cache),
            "--dim", "16", "--width", "16", "--decoder_hidden", "16", "--max_seq_len", "64",
            "--batch_size", "5", "--print_steps", "1", "--precision", "fp32", "--dropout", "0",
            "--val_fraction", "0.2", *extra]


def torchrun(processes: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)]


def run(command: list[str], log: Path) -> subprocess.CompletedProcess:
    """Run ``command`` to its end; its whole stderr goes to ``log`` (torchrun's summary of a failed
    rank, which ends it, leaves out what the rank said)."""
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=REPO)
    log.write_text(result.stderr)
    assert result.returncode == 0, f"{result.stderr[-3000:]}\n(all of it in {log})"
    return result


def log_rows(out: Path) -> list[dict[str, str]]:
    return list(csv.DictReader((out / "training_log.csv").open()))


def test_two_processes_train_as_one_and_resume(tmp_path):
    corpus, cache = tiny_corpus(tmp_path / "midi", files=6), tmp_path / "cache"
    one, two = tmp_path / "one", tmp_path / "two"
    for out, launcher in ((one, [sys.executable]), (two, torchrun(2))):
        run(launcher + train_args(corpus, out, cache, "--epochs", "2"), tmp_path / f"{out.name}.log")
        resumed = run(launcher + train_args(corpus, out, cache, "--epochs", "3"), tmp_path / f"{out.name}-resumed.log")
        assert "resumed from" in resumed.stderr

    # Rank 0 alone wrote: the same checkpoint set, one log row per step, nothing half-written.
    assert sorted(p.name for p in two.iterdir()) == sorted(p.name for p in one.iterdir()) == [
        "best", "epoch_001", "epoch_002", "epoch_003", "latest", "run_stats.json", "training_log.csv"]
    assert json.loads((two / "run_stats.json").read_text())["processes"] == 2
    rows_one, rows_two = log_rows(one), log_rows(two)
    steps = [str(s) for s in range(1, len(rows_one) + 1)]
    assert [r["step"] for r in rows_two] == [r["step"] for r in rows_one] == steps
    # The resumed run went on from the second epoch's last step to the third's.
    assert load_checkpoint(two / "epoch_002").step < load_checkpoint(two / "latest").step == len(rows_one)
    assert load_checkpoint(two / "latest").epoch == 3

    for a, b in zip(rows_one, rows_two):
        for column in ("loss", "velocity_loss", "voice_loss", "val_loss", "grad_norm"):
            if a[column] or b[column]:
                assert math.isclose(float(a[column]), float(b[column]), rel_tol=LOSS_RTOL), (a["step"], column, a, b)
    # ... so the trained weights agree too.
    weights_one = load_file(str(one / "latest" / "model.safetensors"))
    weights_two = load_file(str(two / "latest" / "model.safetensors"))
    for name, tensor in weights_one.items():
        torch.testing.assert_close(weights_two[name], tensor, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_a_signal_to_torchrun_saves_latest_and_stops_every_rank(tmp_path, sig):
    corpus, out = tiny_corpus(tmp_path / "midi", files=6), tmp_path / "run"
    proc = subprocess.Popen(torchrun(2) + train_args(corpus, out, tmp_path / "cache", "--epochs", "100000"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
    log = out / "training_log.csv"
    wait_for_training_steps(proc, log)  # a header and three logged steps
    assert proc.poll() is None, f"training ended before the signal: {proc.communicate()[1][-2000:]}"
    proc.send_signal(sig)  # torchrun passes it on to both ranks
    _, err = proc.communicate(timeout=120)
    # torchrun itself reports the signal (its own traceback); the ranks stop without one.
    assert f'File "{REPO / "model"}' not in err and "KeyboardInterrupt" not in err, err[-3000:]
    assert err.count("interrupted: saving") == 1 and "[rank 1]" not in err
    latest = load_checkpoint(out / "latest")
    assert latest.step >= 3 and json.loads((out / "run_stats.json").read_text())["interrupted"] is True
    assert len(log_rows(out)) == latest.step
