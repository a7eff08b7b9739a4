"""Shared fixtures."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BACH = REPO.parent / "shared" / "data" / "bach_midi"
TIMINGS = pytest.StashKey[list]()


@pytest.fixture(scope="session")
def bach_dir() -> Path:
    """The 201-file Bach corpus, which lives in ../shared beside the checkout (never copied in).

    CI always has it there, so a missing corpus fails the tests that need it instead of hiding them.
    """
    if not BACH.is_dir():
        pytest.fail(f"corpus not found at {BACH}: the test suite needs ../shared beside the checkout")
    return BACH


def tiny_corpus(root: Path, files: int = 12) -> Path:
    """A folder of small two-voice pieces, different enough to have something to learn."""
    from tests.midi_builders import build_midi

    root.mkdir(parents=True, exist_ok=True)
    for i in range(files):
        base = 55 + 2 * (i % 2)
        notes = [(b * 0.5, 0.5, base + (0, 4, 7, 12)[b % 4], 80, 0) for b in range(64)]
        notes += [(b * 2.0, 2.0, base - 12 + (0, 5)[b % 2], 60, 1) for b in range(16)]
        meter = [(0, 3, 4)] if i % 3 == 0 else [(0, 4, 4)]
        (root / f"piece{i:02d}.mid").write_bytes(build_midi(notes, time_signatures=meter))
    return root


def run_module(module: str, *args: str, timeout: float = 600) -> "subprocess.CompletedProcess":
    import sys

    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True,
                          timeout=timeout)


def wait_for_training_steps(proc: "subprocess.Popen", log: Path, steps: int = 3) -> None:
    """Wait until a trainer started as ``proc`` has logged ``steps`` steps to ``log`` (or ended, which
    the caller's assertions report); kill it if that never comes."""
    from tests.waiting import wait_for

    try:
        wait_for(lambda: proc.poll() is not None or (log.exists() and len(log.read_text().splitlines()) > steps),
                 300, f"{steps} training steps in the log", interval=0.2)
    except AssertionError:
        proc.kill()
        proc.communicate()
        raise


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> Path:
    """A small model trained for 12 epochs on :func:`tiny_corpus`; returns the run folder."""
    base = tmp_path_factory.mktemp("tiny")
    corpus = tiny_corpus(base / "midi")
    out = base / "run"
    result = run_module("model.train", "--midi_dir", str(corpus), "--out_dir", str(out),
                        "--epochs", "12", "--dim", "64", "--field_layers", "2", "--width", "32",
                        "--decoder_hidden", "64", "--batch_size", "4",
                        "--max_seq_len", "64", "--warmup_steps", "10", "--lr", "1e-2", "--dropout", "0",
                        "--val_fraction", "0.2", "--cache_dir", str(base / "cache"))
    assert result.returncode == 0, result.stderr[-3000:]
    return out


@pytest.fixture(scope="session")
def served_checkpoint(tiny_run) -> Path:
    """The checkpoint the server tests serve (a tiny model trained in the session)."""
    return tiny_run / "best"


@pytest.fixture(scope="session")
def later_checkpoint(served_checkpoint, tmp_path_factory) -> Path:
    """The served model saved again as a later step: to a server, another checkpoint (another digest),
    as after a rolling restart onto a new model."""
    from model.checkpoint.format import load_model, save_checkpoint

    model, tokenizer, loaded = load_model(served_checkpoint)
    return save_checkpoint(tmp_path_factory.mktemp("later") / "checkpoint", model=model,
                           model_config=loaded.model_config, tokenizer=tokenizer, step=loaded.step + 1,
                           epoch=loaded.epoch, val_loss=loaded.val_loss, train_config=loaded.train_config)


@pytest.fixture(scope="session")
def live_server(served_checkpoint):
    """A real uvicorn server on a free loopback port, shared by the tests that only talk to it."""
    from server.config import ServerConfig
    from tests.server_harness import running_server

    with running_server(ServerConfig(checkpoint=str(served_checkpoint), max_sessions=128)) as server:
        yield server


BAR_POSITIONS = tuple(range(0, 48, 6))


@pytest.fixture(scope="session")
def bar_tokenizer():
    """Specials, 4/4 and 3/4 bars, rests, and eighth notes of pitches 55..79 at every eighth."""
    from model.tokenizer.tokenizer import Tokenizer
    from model.tokenizer.vocabulary import BAR, NOTE, REST, SPECIAL_KINDS, TokenKey, special_key

    notes = [TokenKey(NOTE, p, 5, c) for p in range(55, 80) for c in BAR_POSITIONS]
    rests = [TokenKey(REST, -1, 5, c) for c in BAR_POSITIONS]
    bars = [TokenKey(BAR, 4, 4, 0), TokenKey(BAR, 3, 4, 0)]
    return Tokenizer(vocab=[special_key(k) for k in SPECIAL_KINDS] + bars + rests + notes)


# ----------------------------------------------------------------------------- timing figures
def pytest_configure(config) -> None:
    config.stash[TIMINGS] = []


@pytest.fixture
def timing_report(request):
    """``timing_report(name, summary, **figures)``: records a test's timing figures, never asserted.

    They go to ``tests/artifacts/<name>.json`` with a description of the machine (see
    ``tests/timing.py``), into the test's ``user_properties`` (JUnit XML), to its captured output,
    and into the "timing figures" section at the end of the run.
    """
    from tests.timing import write_figures

    def report(name: str, summary: str, **figures) -> None:
        path = write_figures(name, request.node.nodeid, summary, figures)
        request.node.user_properties.append((name, summary))
        request.config.stash[TIMINGS].append(f"{summary} [{path.relative_to(REPO)}]")
        print(summary)

    return report


def pytest_terminal_summary(terminalreporter, config) -> None:
    lines = config.stash.get(TIMINGS, [])
    if lines:
        terminalreporter.section("timing figures (recorded, not asserted)")
        for line in lines:
            terminalreporter.write_line(line)
