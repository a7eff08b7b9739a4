"""python -m model.train: the checkpoint set, resuming, best by validation loss, Ctrl-C."""

from __future__ import annotations

import csv
import json
import signal
import subprocess
import sys

import torch

from model.checkpoint.format import load_checkpoint
from model.tokenizer.vocabulary import NOTE
from tests.conftest import run_module, tiny_corpus, wait_for_training_steps


def test_training_writes_the_checkpoint_set(tiny_run):
    names = {p.name for p in tiny_run.iterdir()}
    assert {"latest", "best", "epoch_001", "epoch_002", "epoch_012", "training_log.csv",
            "run_stats.json"} <= names
    for name in ("config.json", "model.safetensors", "tokenizer.json", "optimizer.safetensors"):
        assert (tiny_run / "latest" / name).is_file()
    stats = json.loads((tiny_run / "run_stats.json").read_text())
    assert stats["epochs"] == 12 and len(stats["val_files"]) >= 1
    rows = list(csv.DictReader((tiny_run / "training_log.csv").open()))
    assert rows and {"step", "loss", "val_loss", "tokens_per_s"} <= set(rows[0])
    # The model learned something: validation loss far below uniform guessing.
    vals = [load_checkpoint(tiny_run / f"epoch_{e:03d}").val_loss for e in range(1, 13)]
    vocab = load_checkpoint(tiny_run / "latest").tokenizer.vocab_size
    import math
    assert min(vals) < 0.8 * math.log(vocab)
    assert load_checkpoint(tiny_run / "best").val_loss == min(vals)


def test_resume_continues_from_latest(tmp_path):
    corpus = tiny_corpus(tmp_path / "midi", files=6)
    common = ["--midi_dir", str(corpus), "--out_dir", str(tmp_path / "run"), "--dim", "16", "--width", "16",
              "--decoder_hidden", "16", "--max_seq_len", "64", "--cache_dir", str(tmp_path / "c")]
    assert run_module("model.train", *common, "--epochs", "1").returncode == 0
    first = load_checkpoint(tmp_path / "run" / "latest")
    result = run_module("model.train", *common, "--epochs", "2")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "resumed from" in result.stderr
    second = load_checkpoint(tmp_path / "run" / "latest")
    assert second.epoch == 2 and second.step == 2 * first.step
    fresh = run_module("model.train", *common, "--epochs", "1", "--fresh")
    assert fresh.returncode == 0 and load_checkpoint(tmp_path / "run" / "latest").step == first.step


def test_init_from_adds_the_voice_register_to_a_trained_model(tmp_path):
    """--init_from: a new run starts from a checkpoint's weights, the register's new weights at
    zero; a checkpoint that is not there is a clear error."""
    corpus = tiny_corpus(tmp_path / "midi", files=6)
    common = ["--midi_dir", str(corpus), "--dim", "16", "--width", "16", "--decoder_hidden", "16",
              "--max_seq_len", "64", "--cache_dir", str(tmp_path / "c"), "--epochs", "1"]
    plain = run_module("model.train", *common, "--out_dir", str(tmp_path / "plain"), "--no-voice_register",
                       "--no-chord_voices")
    assert plain.returncode == 0, plain.stderr[-2000:]
    grown = run_module("model.train", *common, "--out_dir", str(tmp_path / "grown"),
                       "--init_from", str(tmp_path / "plain" / "latest"), "--voice_register", "--no-chord_voices")
    assert grown.returncode == 0, grown.stderr[-2000:]
    assert "new: key_profile.weight, note_head.lines" in grown.stderr
    start, after = load_checkpoint(tmp_path / "plain" / "latest"), load_checkpoint(tmp_path / "grown" / "latest")
    assert after.model_config["voice_register"] and not start.model_config["voice_register"]
    assert after.tokenizer.vocab == start.tokenizer.vocab and after.step == start.step  # step 0 again, one epoch
    missing = run_module("model.train", *common, "--out_dir", str(tmp_path / "none"),
                         "--init_from", str(tmp_path / "nowhere"))
    assert missing.returncode == 2 and "nowhere" in missing.stderr


def test_trainable_fits_the_note_head_and_leaves_every_other_weight_as_it_was(tmp_path):
    """--init_from a model without the chord term, --trainable note_head: the chord term is added and
    trained, every weight outside the note head stays bit for bit; an unknown prefix is exit 2."""
    corpus = tiny_corpus(tmp_path / "midi", files=6)
    common = ["--midi_dir", str(corpus), "--dim", "16", "--width", "16", "--decoder_hidden", "16",
              "--max_seq_len", "64", "--cache_dir", str(tmp_path / "c"), "--epochs", "1"]
    plain = run_module("model.train", *common, "--out_dir", str(tmp_path / "plain"), "--no-chord_voices")
    assert plain.returncode == 0, plain.stderr[-2000:]
    head = run_module("model.train", *common, "--out_dir", str(tmp_path / "head"), "--chord_voices",
                      "--init_from", str(tmp_path / "plain" / "latest"), "--trainable", "note_head", "--lr", "1e-2")
    assert head.returncode == 0, head.stderr[-2000:]
    assert "new: note_head.chords" in head.stderr
    start = load_checkpoint(tmp_path / "plain" / "latest").state_dict
    after = load_checkpoint(tmp_path / "head" / "latest").state_dict
    body = [k for k in start if not k.startswith("note_head.")]
    assert body and all(torch.equal(start[k], after[k]) for k in body)
    assert any(not torch.equal(start[k], after[k]) for k in start if k.startswith("note_head."))
    assert after["note_head.chords.net.2.weight"].abs().sum() > 0  # the new term left zero
    wrong = run_module("model.train", *common, "--out_dir", str(tmp_path / "wrong"),
                       "--init_from", str(tmp_path / "plain" / "latest"), "--trainable", "note_hed")
    assert wrong.returncode == 2 and "note_hed" in wrong.stderr and "note_head" in wrong.stderr


def test_init_from_with_learn_decays_or_conv_adds_and_trains_them(tmp_path):
    """--init_from a trained model, --learn_decays: each layer's decay offsets are added (at zero,
    the model as it was) and trained; learning decays a model has none of is exit 2. The same for
    --conv 3: each layer's weights of its 2 previous writes; a negative --conv is exit 2."""
    corpus = tiny_corpus(tmp_path / "midi", files=6)
    common = ["--midi_dir", str(corpus), "--dim", "16", "--width", "16", "--decoder_hidden", "16",
              "--max_seq_len", "64", "--cache_dir", str(tmp_path / "c"), "--epochs", "1"]
    plain = run_module("model.train", *common, "--out_dir", str(tmp_path / "plain"), "--decays", "0,8")
    assert plain.returncode == 0, plain.stderr[-2000:]
    learned = run_module("model.train", *common, "--out_dir", str(tmp_path / "learned"), "--learn_decays",
                         "--init_from", str(tmp_path / "plain" / "latest"), "--trainable", "layers", "--lr", "1e-2")
    assert learned.returncode == 0, learned.stderr[-2000:]
    assert "new: " + ", ".join(f"layers.{i}.decay_shift" for i in range(4)) in learned.stderr
    after = load_checkpoint(tmp_path / "learned" / "latest")
    assert after.model_config["learn_decays"] and after.model_config["decays"] == "0,8"
    shifts = torch.stack([after.state_dict[f"layers.{i}.decay_shift"] for i in range(4)])
    assert torch.equal(shifts[:, 0], torch.zeros(4)) and shifts[:, 1].abs().min() > 0  # pair 0: no decay
    none = run_module("model.train", *common, "--out_dir", str(tmp_path / "none"), "--learn_decays")
    assert none.returncode == 2 and "learn_decays needs field layers and --decays" in none.stderr
    conv = run_module("model.train", *common, "--out_dir", str(tmp_path / "conv"), "--conv", "3",
                      "--init_from", str(tmp_path / "plain" / "latest"), "--trainable", "layers", "--lr", "1e-2")
    assert conv.returncode == 0, conv.stderr[-2000:]
    assert "new: " + ", ".join(f"layers.{i}.conv" for i in range(4)) in conv.stderr
    after = load_checkpoint(tmp_path / "conv" / "latest")
    assert after.model_config["conv"] == 3 and after.state_dict["layers.0.conv"].shape == (2, 4)
    assert after.state_dict["layers.0.conv"].abs().min() > 0  # trained away from zero, where it starts
    bad = run_module("model.train", *common, "--out_dir", str(tmp_path / "bad"), "--conv", "-1")
    assert bad.returncode == 2 and "conv needs field layers and must be >= 0" in bad.stderr


def test_transpose_fits_the_vocabulary_on_every_shift(tmp_path):
    corpus = tiny_corpus(tmp_path / "midi", files=6)
    common = ["--midi_dir", str(corpus), "--dim", "16", "--width", "16", "--decoder_hidden", "16", "--max_seq_len", "64",
              "--cache_dir", str(tmp_path / "c"), "--epochs", "2"]
    plain = run_module("model.train", *common, "--out_dir", str(tmp_path / "plain"))
    shifted = run_module("model.train", *common, "--out_dir", str(tmp_path / "shifted"), "--transpose", "2")
    assert plain.returncode == 0 and shifted.returncode == 0, shifted.stderr[-2000:]
    assert "with transpositions" in shifted.stderr
    pitches = lambda run: {k.a for k in load_checkpoint(tmp_path / run / "latest").tokenizer.vocab if k.kind == NOTE}
    # every written pitch p brings p-2..p+2 into the vocabulary
    assert pitches("shifted") == {p + s for p in pitches("plain") for s in range(-2, 3)}
    stats = json.loads((tmp_path / "shifted" / "run_stats.json").read_text())
    assert stats["steps"] == json.loads((tmp_path / "plain" / "run_stats.json").read_text())["steps"]


def test_interrupt_saves_latest_and_exits_cleanly(tmp_path):
    corpus = tiny_corpus(tmp_path / "midi", files=6)
    proc = subprocess.Popen(
        [sys.executable, "-m", "model.train", "--midi_dir", str(corpus), "--out_dir", str(tmp_path / "run"),
         "--dim", "16", "--width", "16", "--decoder_hidden", "16", "--max_seq_len", "64", "--epochs", "100000",
         "--print_steps", "1", "--cache_dir", str(tmp_path / "c")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    log = tmp_path / "run" / "training_log.csv"
    wait_for_training_steps(proc, log)  # a header and three logged steps
    assert proc.poll() is None, f"the trainer ended before the interrupt: {proc.communicate()[1][-2000:]}"
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert "Traceback" not in err
    assert load_checkpoint(tmp_path / "run" / "latest").step >= 3


def test_bad_midi_dir_is_a_clear_error(tmp_path):
    result = run_module("model.train", "--midi_dir", str(tmp_path / "nope"), "--out_dir", str(tmp_path / "r"))
    assert result.returncode == 2 and "no such folder" in result.stderr
