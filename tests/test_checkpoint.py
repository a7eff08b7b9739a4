"""Checkpoint directories: round trips, resuming an optimizer, broken files, atomic saves."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from model.checkpoint import atomic
from model.checkpoint import format as checkpoint
from model.checkpoint.files import CheckpointError
from model.checkpoint.format import (check_state_dict, link_or_copy, load_checkpoint, load_model, load_optimizer_state, save_checkpoint)
from model.training.run_folder import TRAINER_FILES, append_log_row
from model.fm.config import ModelConfig
from model.fm.machine import FieldMachine
from model.tokenizer.dna import DNA_FLOATS
from model.tokenizer.tokenizer import Tokenizer
from model.tokenizer.vocabulary import BAR, SPECIAL_KINDS, TokenKey, special_key
from tests.model_shapes import token_shape

REPO = Path(__file__).resolve().parents[1]
DEAD_PID = 4_194_305  # above the kernel's largest pid_max: no process can have it


@dataclass(frozen=True)
class TinyConfig:
    vocab_size: int = 4  # Tokenizer() holds the four special tokens
    dim: int = 8


@dataclass(frozen=True)
class TinyTrainConfig:
    lr: float = 1e-2
    batch_size: int = 3


def build(config: TinyConfig) -> nn.Sequential:
    """Embedding -> Linear -> GELU -> output head tied to the embedding."""
    embedding = nn.Embedding(config.vocab_size, config.dim)
    head = nn.Linear(config.dim, config.vocab_size, bias=False)
    head.weight = embedding.weight
    return nn.Sequential(embedding, nn.Linear(config.dim, config.dim), nn.GELU(), head)


INPUT = torch.tensor([[0, 1, 2, 3, 2, 1]])


def save(directory: Path, net: nn.Module, step: int = 10, **kwargs) -> Path:
    return save_checkpoint(directory, model=net, model_config=TinyConfig(), tokenizer=Tokenizer(),
                           step=step, epoch=kwargs.pop("epoch", 2), **kwargs)


@pytest.fixture
def net() -> nn.Sequential:
    torch.manual_seed(0)
    return build(TinyConfig())


@pytest.fixture
def saved(tmp_path: Path, net: nn.Sequential) -> Path:
    """A complete checkpoint with optimizer state and extras."""
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-2)
    net(INPUT).sum().backward()
    optimizer.step()
    return save(tmp_path / "latest", net, optimizer=optimizer,
                extras={"baseline_unigram": torch.arange(4, dtype=torch.float64)})


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


# ====================================================================== round trips
def test_save_load_round_trip(tmp_path: Path, net: nn.Sequential) -> None:
    directory = save(tmp_path / "run" / "latest", net, step=1234, epoch=3, val_loss=2.5,
                     train_config=TinyTrainConfig())
    assert sorted(p.name for p in directory.iterdir()) == [
        "config.json", "model.safetensors", "tokenizer.json"]

    ckpt = load_checkpoint(directory)
    assert (ckpt.path, ckpt.step, ckpt.epoch, ckpt.val_loss) == (directory, 1234, 3, 2.5)
    assert TinyConfig(**ckpt.model_config) == TinyConfig()
    assert TinyTrainConfig(**ckpt.train_config) == TinyTrainConfig()
    datetime.fromisoformat(ckpt.created)
    assert ckpt.tokenizer.to_dict() == Tokenizer().to_dict()
    assert ckpt.extras == {}
    assert not ckpt.has_optimizer and load_optimizer_state(directory) is None

    expected = net.state_dict()
    assert ckpt.state_dict.keys() == expected.keys()
    for key, tensor in expected.items():
        assert torch.equal(ckpt.state_dict[key], tensor), key

    torch.manual_seed(1)  # different initial weights, so the load has to do the work
    rebuilt = build(TinyConfig(**ckpt.model_config))
    assert not torch.equal(rebuilt(INPUT), net(INPUT))
    ckpt.load_into(rebuilt)
    assert torch.equal(rebuilt(INPUT), net(INPUT))
    assert rebuilt[3].weight is rebuilt[0].weight  # still tied after loading


def test_config_json_is_self_describing(tmp_path: Path, net: nn.Sequential) -> None:
    directory = save(tmp_path / "latest", net, step=7, epoch=1)
    config = json.loads((directory / "config.json").read_text())
    assert config["format"] == checkpoint.CHECKPOINT_FORMAT
    assert config["model"] == asdict(TinyConfig())
    assert (config["train"], config["step"], config["epoch"], config["val_loss"]) == (
        None, 7, 1, None)


def test_extras_round_trip(saved: Path) -> None:
    extras = {"baseline_unigram": torch.tensor([5.0, 1.0, 0.0, 2.0], dtype=torch.float64),
              "baseline_bigram_pairs": torch.tensor([[0, 1], [1, 2]], dtype=torch.int64),
              "baseline_bigram_counts": torch.tensor([3.0, 4.0], dtype=torch.float64)}
    torch.manual_seed(0)
    save(saved, build(TinyConfig()), extras=extras)
    loaded = load_checkpoint(saved).extras
    assert loaded.keys() == extras.keys()
    for key, tensor in extras.items():
        assert loaded[key].dtype == tensor.dtype and torch.equal(loaded[key], tensor), key


def test_loading_never_calls_torch_load(saved: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("torch.load called")

    monkeypatch.setattr(torch, "load", refuse)
    load_checkpoint(saved)
    load_optimizer_state(saved)


def test_load_model_rebuilds_the_field_machine(tmp_path: Path) -> None:
    tokenizer = Tokenizer(vocab=[special_key(k) for k in SPECIAL_KINDS] + [TokenKey(BAR, 4, 4, 0)])
    config = ModelConfig(**token_shape(tokenizer.vocab_size), dim=8, field_layers=2, width=8,
                         decoder_layers=1, decoder_hidden=8, voice_embedding=4)
    torch.manual_seed(0)
    fm = FieldMachine(config).eval()
    save_checkpoint(tmp_path / "best", model=fm, model_config=config, tokenizer=tokenizer,
                    step=5, epoch=1, val_loss=1.25)

    torch.manual_seed(1)
    loaded, loaded_tokenizer, ckpt = load_model(tmp_path / "best")
    assert not loaded.training and loaded.config == config and ckpt.val_loss == 1.25
    assert loaded_tokenizer.vocab == tokenizer.vocab
    dna, slots = torch.rand(2, 5, DNA_FLOATS), torch.randint(0, config.voice_slots, (2, 5))
    assert torch.equal(loaded(dna, slots).logits, fm(dna, slots).logits)

    config_file = tmp_path / "best" / "config.json"
    stored = json.loads(config_file.read_text())
    stored["model"]["heads"] = 3
    config_file.write_text(json.dumps(stored))
    with pytest.raises(CheckpointError, match="config.json: .*'heads'"):
        load_model(tmp_path / "best")


def test_a_format_2_checkpoint_loads_as_one_without_the_voice_register(tmp_path: Path) -> None:
    """Checkpoints written before the voice register (format 2) still load and generate."""
    tokenizer = Tokenizer(vocab=[special_key(k) for k in SPECIAL_KINDS] + [TokenKey(BAR, 4, 4, 0)])
    config = ModelConfig(**token_shape(tokenizer.vocab_size), dim=8, field_layers=2, width=8,
                         decoder_hidden=8, voice_embedding=4, voice_register=False, chord_voices=False)
    fm = FieldMachine(config).eval()
    save_checkpoint(tmp_path / "old", model=fm, model_config=config, tokenizer=tokenizer, step=5, epoch=1)
    file = tmp_path / "old" / "config.json"
    stored = json.loads(file.read_text())
    del stored["model"]["voice_register"], stored["model"]["chord_voices"]
    file.write_text(json.dumps({**stored, "format": 2}))
    loaded, _, _ = load_model(tmp_path / "old")
    assert loaded.config == config and loaded.register is None and loaded.note_head.chords is None


def test_a_format_3_checkpoint_loads_as_one_without_the_chord_term(tmp_path: Path) -> None:
    """Checkpoints written before the note head's chord term (format 3, the voice register's) load."""
    tokenizer = Tokenizer(vocab=[special_key(k) for k in SPECIAL_KINDS] + [TokenKey(BAR, 4, 4, 0)])
    config = ModelConfig(**token_shape(tokenizer.vocab_size), dim=8, field_layers=2, width=8,
                         decoder_hidden=8, voice_embedding=4, chord_voices=False)
    fm = FieldMachine(config).eval()
    save_checkpoint(tmp_path / "old", model=fm, model_config=config, tokenizer=tokenizer, step=5, epoch=1)
    file = tmp_path / "old" / "config.json"
    stored = json.loads(file.read_text())
    del stored["model"]["chord_voices"]
    file.write_text(json.dumps({**stored, "format": 3}))
    loaded, _, _ = load_model(tmp_path / "old")
    assert loaded.config == config and loaded.register is not None and loaded.note_head.chords is None
    with pytest.raises(ValueError, match="--no-chord_voices"):
        ModelConfig(**token_shape(tokenizer.vocab_size), voice_register=False)


# ====================================================================== resuming
@pytest.mark.parametrize("amsgrad", [False, True], ids=["adamw", "adamw-amsgrad"])
def test_adamw_resume_matches_uninterrupted_run(tmp_path: Path, amsgrad: bool) -> None:
    def batch(i: int) -> torch.Tensor:
        return torch.randint(0, 4, (3, 6), generator=torch.Generator().manual_seed(i))

    def train_step(net: nn.Module, optimizer: torch.optim.Optimizer, i: int) -> None:
        optimizer.zero_grad()
        logits = net(batch(i))
        loss = nn.functional.cross_entropy(logits.flatten(0, 1), batch(i + 100).flatten())
        loss.backward()
        optimizer.step()

    def make_optimizer(net: nn.Module) -> torch.optim.AdamW:
        return torch.optim.AdamW(net.parameters(), lr=3e-2, betas=(0.8, 0.95),
                                 weight_decay=0.1, amsgrad=amsgrad)

    torch.manual_seed(0)
    net = build(TinyConfig())
    optimizer = make_optimizer(net)
    for i in range(3):
        train_step(net, optimizer, i)
    save(tmp_path / "latest", net, step=3, optimizer=optimizer)
    train_step(net, optimizer, 3)  # the uninterrupted run

    torch.manual_seed(99)
    resumed = build(TinyConfig())
    ckpt = load_checkpoint(tmp_path / "latest")
    ckpt.load_into(resumed)
    resumed_optimizer = make_optimizer(resumed)
    state = load_optimizer_state(tmp_path / "latest")
    assert state["param_groups"][0]["betas"] == (0.8, 0.95)  # a tuple again, as AdamW wrote it
    resumed_optimizer.load_state_dict(state)
    train_step(resumed, resumed_optimizer, 3)

    for (key, expected), got in zip(net.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(got, expected), key


# ====================================================================== broken checkpoints
def _truncate(file: Path) -> None:
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])


def _garbage(file: Path) -> None:
    file.write_bytes(b"\x00\xffnot a safetensors file" * 40)


def _edit_config(**changes) -> Callable[[Path], None]:
    def edit(directory: Path) -> None:
        file = directory / "config.json"
        config = json.loads(file.read_text())
        config.update(changes)
        file.write_text(json.dumps(config))
    return edit


def _drop_config_field(directory: Path) -> None:
    file = directory / "config.json"
    config = json.loads(file.read_text())
    del config["step"]
    file.write_text(json.dumps(config))


def _optimizer_tensors(extra: bool):
    """Replace optimizer.safetensors by one with a stray tensor beside (or instead of) its own."""
    def edit(directory: Path) -> None:
        file = directory / "optimizer.safetensors"
        tensors = load_file(file) if extra else {}
        save_file(dict(tensors, stray=torch.zeros(2)), file)
    return edit


BROKEN = [
    # (id, how to break it, file the message must name, what it must say, loader)
    ("no-directory", lambda d: os.rename(d, d.with_name("elsewhere")), "latest",
     "no such checkpoint", load_checkpoint),
    ("no-config", lambda d: (d / "config.json").unlink(), "config.json", "missing",
     load_checkpoint),
    ("no-model", lambda d: (d / "model.safetensors").unlink(), "model.safetensors", "missing",
     load_checkpoint),
    ("no-tokenizer", lambda d: (d / "tokenizer.json").unlink(), "tokenizer.json", "missing",
     load_checkpoint),
    ("model-truncated", lambda d: _truncate(d / "model.safetensors"), "model.safetensors",
     "corrupt", load_checkpoint),
    ("model-garbage", lambda d: _garbage(d / "model.safetensors"), "model.safetensors",
     "corrupt", load_checkpoint),
    ("model-empty", lambda d: (d / "model.safetensors").write_bytes(b""), "model.safetensors",
     "corrupt", load_checkpoint),
    ("extras-truncated", lambda d: _truncate(d / "extras.safetensors"), "extras.safetensors",
     "corrupt", load_checkpoint),
    ("config-invalid-json", lambda d: (d / "config.json").write_text('{"format": 1,'),
     "config.json", "invalid JSON", load_checkpoint),
    ("config-not-object", lambda d: (d / "config.json").write_text("[1, 2]"), "config.json",
     "JSON object", load_checkpoint),
    ("config-wrong-format", _edit_config(format=99), "config.json", "format 99", load_checkpoint),
    ("config-format-1", _edit_config(format=1), "config.json", "train it again", load_checkpoint),
    ("config-no-step", _drop_config_field, "config.json", "'step'", load_checkpoint),
    ("config-bad-step", _edit_config(step="ten"), "config.json", "'step' must be an integer",
     load_checkpoint),
    ("config-vocab-mismatch", _edit_config(model={"vocab_size": 9, "dim": 8}), "tokenizer.json",
     "vocab_size 9", load_checkpoint),
    ("tokenizer-invalid-json", lambda d: (d / "tokenizer.json").write_text("{oops"),
     "tokenizer.json", "not a tokenizer JSON", load_checkpoint),
    ("optimizer-truncated", lambda d: _truncate(d / "optimizer.safetensors"),
     "optimizer.safetensors", "corrupt", load_optimizer_state),
    ("optimizer-garbage", lambda d: _garbage(d / "optimizer.safetensors"),
     "optimizer.safetensors", "corrupt", load_optimizer_state),
    ("optimizer-no-json", lambda d: (d / "optimizer.json").unlink(), "optimizer.json",
     "missing", load_optimizer_state),
    ("optimizer-no-tensors", lambda d: (d / "optimizer.safetensors").unlink(),
     "optimizer.safetensors", "missing", load_optimizer_state),
    ("optimizer-stray-tensor", _optimizer_tensors(extra=True), "optimizer.safetensors",
     "['stray'] are not referred to", load_optimizer_state),
    ("optimizer-other-tensors", _optimizer_tensors(extra=False), "optimizer.safetensors",
     "no tensor 'state.0.", load_optimizer_state),
    ("optimizer-invalid-json", lambda d: (d / "optimizer.json").write_text("nope"),
     "optimizer.json", "invalid JSON", load_optimizer_state),
]


@pytest.mark.parametrize("breaks, file, says, loader", [case[1:] for case in BROKEN],
                         ids=[case[0] for case in BROKEN])
def test_broken_checkpoint_names_the_file(saved: Path, breaks, file: str, says: str,
                                          loader) -> None:
    loader(saved)  # intact, it loads
    breaks(saved)
    with pytest.raises(CheckpointError) as error:
        loader(saved)
    message = str(error.value)
    assert str(saved / file) in message if file != "latest" else str(saved) in message
    assert says in message


def test_check_state_dict_reports_every_mismatch(saved: Path) -> None:
    ckpt = load_checkpoint(saved)
    wider = build(TinyConfig(dim=6))
    with pytest.raises(CheckpointError, match="shape mismatches") as error:
        ckpt.load_into(wider)
    assert str(saved / "model.safetensors") in str(error.value)
    assert "0.weight (4, 8) in the file, (4, 6) in the model" in str(error.value)

    other = nn.Sequential(nn.Embedding(4, 8), nn.Linear(8, 8), nn.GELU(), nn.Linear(8, 4),
                          nn.Linear(4, 4))
    state = dict(ckpt.state_dict, extra=torch.zeros(1))
    with pytest.raises(CheckpointError) as error:
        check_state_dict(other, state, "somewhere/model.safetensors")
    message = str(error.value)
    assert message.startswith("somewhere/model.safetensors: ")
    assert "missing keys: 3.bias, 4.bias, 4.weight" in message
    assert "unexpected keys: extra" in message


def test_saving_a_tokenizer_of_another_size_is_refused(tmp_path: Path, net: nn.Module) -> None:
    with pytest.raises(ValueError, match="vocab_size is 9"):
        save_checkpoint(tmp_path / "latest", model=net, model_config=TinyConfig(vocab_size=9),
                        tokenizer=Tokenizer(), step=0, epoch=0)
    assert not (tmp_path / "latest").exists() and leftovers(tmp_path) == []


# ====================================================================== atomic writes
def test_failed_save_leaves_previous_checkpoint(saved: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(self, path) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(Tokenizer, "save", fail)
    torch.manual_seed(5)
    with pytest.raises(OSError, match="disk full"):
        save(saved, build(TinyConfig()), step=99)
    assert load_checkpoint(saved).step == 10
    assert leftovers(saved.parent) == []


def test_failed_swap_rolls_back(saved: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_replace = os.replace
    calls = []

    def replace(src, dst) -> None:
        calls.append((Path(src).name, Path(dst).name))
        if len(calls) == 2:  # moving the new directory in
            raise OSError("rename failed")
        real_replace(src, dst)

    monkeypatch.setattr(atomic.os, "replace", replace)
    torch.manual_seed(5)
    with pytest.raises(OSError, match="rename failed"):
        save(saved, build(TinyConfig()), step=99)
    assert calls[:2] == [("latest", f".latest.old-{os.getpid()}"),
                         (f".latest.tmp-{os.getpid()}", "latest")]
    assert load_checkpoint(saved).step == 10
    assert leftovers(saved.parent) == []


def child_save(directory: str, kill_at: str) -> None:
    """Run in a child process: save step 20 over ``directory`` and die by SIGKILL at ``kill_at``."""
    import signal

    def die(*args, **kwargs) -> None:
        os.kill(os.getpid(), signal.SIGKILL)

    if kill_at == "writing":  # config.json is the last file written into the temp directory
        real_write = atomic.write_file
        atomic.write_file = lambda path, text: (
            die() if path.name == "config.json" else real_write(path, text))
    elif kill_at == "between-renames":
        real_replace = os.replace
        calls = []

        def replace(src, dst) -> None:
            calls.append(src)
            if len(calls) == 2:
                die()
            real_replace(src, dst)

        atomic.os.replace = replace
    elif kill_at == "before-cleanup":
        atomic.remove_tree = die
    torch.manual_seed(7)
    save(Path(directory), build(TinyConfig()), step=20)
    raise SystemExit("the save finished; it should have been killed")


@pytest.mark.parametrize("kill_at, step_after_kill", [
    ("writing", 10), ("between-renames", 10), ("before-cleanup", 20)])
def test_killed_save_never_breaks_the_checkpoint(saved: Path, kill_at: str,
                                                 step_after_kill: int) -> None:
    code = f"from tests.test_checkpoint import child_save; child_save({str(saved)!r}, {kill_at!r})"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == -9, result.stderr
    assert leftovers(saved.parent), "the kill should leave a temp or old directory behind"

    assert load_checkpoint(saved).step == step_after_kill
    assert load_optimizer_state(saved) is not None or step_after_kill == 20

    # The next save cleans up after the dead process and succeeds.
    torch.manual_seed(8)
    save(saved, build(TinyConfig()), step=30)
    assert load_checkpoint(saved).step == 30
    assert leftovers(saved.parent) == []


def test_leftovers_of_a_dead_process_are_recovered(saved: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """A process killed between the renames left the old checkpoint under its trash name."""
    old = saved.with_name(f".latest.old-{DEAD_PID}")
    os.rename(saved, old)
    partial = saved.with_name(f".latest.tmp-{DEAD_PID}")
    partial.mkdir()
    (partial / "model.safetensors").write_bytes(b"half")

    ckpt = load_checkpoint(saved)
    assert (ckpt.path, ckpt.step) == (old, 10)
    assert load_optimizer_state(saved) is not None

    # The next save puts the old checkpoint back first, so even a save that fails keeps it.
    with monkeypatch.context() as patch:
        patch.setattr(Tokenizer, "save", lambda self, path: 1 / 0)
        with pytest.raises(ZeroDivisionError):
            save(saved, build(TinyConfig()), step=11)
    ckpt = load_checkpoint(saved)
    assert (ckpt.path, ckpt.step) == (saved, 10)
    assert leftovers(saved.parent) == []

    torch.manual_seed(3)
    save(saved, build(TinyConfig()), step=11)
    assert load_checkpoint(saved).step == 11
    assert leftovers(saved.parent) == []


# ====================================================================== copies
def test_link_or_copy_makes_an_independent_copy(saved: Path) -> None:
    best = saved.with_name("best")
    append_log_row(saved, {"step": 10, "val_loss": 2.0})
    link_or_copy(saved, best)
    assert load_checkpoint(best).step == 10
    assert load_optimizer_state(best) is not None

    # Replacing latest and logging to it leave best as it was.
    append_log_row(saved, {"step": 20, "val_loss": 1.5})
    torch.manual_seed(4)
    save(saved, build(TinyConfig()), step=20, keep=TRAINER_FILES)
    assert load_checkpoint(best).step == 10
    assert [row["step"] for row in csv.DictReader((best / "training_log.csv").open())] == ["10"]
    # ... and the save carried latest's log over (keep).
    assert [row["step"] for row in csv.DictReader((saved / "training_log.csv").open())] == [
        "10", "20"]

    link_or_copy(saved, best)  # replace an existing copy
    assert load_checkpoint(best).step == 20
    assert leftovers(saved.parent) == []


def test_link_or_copy_needs_a_checkpoint(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="config.json"):
        link_or_copy(tmp_path / "empty", tmp_path / "best")
    assert not (tmp_path / "best").exists()


def test_a_save_carries_over_only_the_files_it_is_asked_to_keep(saved: Path) -> None:
    append_log_row(saved, {"step": 10})
    (saved / "notes.txt").write_text("mine")
    save(saved, build(TinyConfig()), step=11, keep=("notes.txt",))
    assert (saved / "notes.txt").read_text() == "mine" and not (saved / "training_log.csv").exists()
