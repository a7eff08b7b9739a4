"""model.training.key_teacher and ``python -m model.train --learn_key_pull``: the model learns the
key pull on its own continuations."""

from __future__ import annotations

import copy
import csv

import numpy as np
import pytest
import torch

from model.checkpoint.format import load_checkpoint, load_model
from model.generation.generator import with_bos
from model.generation.key_pull import note_pitch_classes, pitch_class_matrix
from model.tokenizer.sequences import TokenSequence
from model.training.corpus import load_corpus
from model.training.key_teacher import (KeyTeacher, KeyTeacherSettings, continuation_spans, kl_to_targets,
                                        pulled_targets)
from model.training.trainer import autocast
from tests.conftest import run_module


def test_continuation_spans_mark_the_outputs_that_predict_the_continuation():
    # row 0: 3 prompt tokens then 4 continuation tokens (7 in all, 6 inputs); row 1: 2 + 2
    spans = continuation_spans([3, 2], [7, 4], 6)
    assert spans.tolist() == [[False, False, True, True, True, True],
                              [False, True, True, False, False, False]]


def test_the_target_leans_toward_the_heard_pitch_classes_and_the_kl_is_zero_at_the_target(bar_tokenizer):
    classes = note_pitch_classes(bar_tokenizer)
    rows = pitch_class_matrix(classes)
    logits = torch.zeros(1, bar_tokenizer.vocab_size)
    heard = torch.zeros(1, 12)
    heard[0, 7] = 20.0  # a prompt of G's
    target = pulled_targets(logits, heard, 2.0, rows)[0]
    on_g, on_a = target[torch.from_numpy(classes == 7)], target[torch.from_numpy(classes == 9)]
    assert on_g.sum() > 5 * on_a.sum()
    notes = torch.from_numpy(classes >= 0)
    assert torch.isclose(target[notes].sum(), torch.softmax(logits, -1)[0, notes].sum())  # notes keep their mass
    assert kl_to_targets(target[None], torch.log(target)[None]).item() == pytest.approx(0.0, abs=1e-5)
    assert kl_to_targets(target[None], logits).item() > 0.1
    same = pulled_targets(logits, heard, 1e-9, rows)[0]
    assert torch.allclose(same, torch.softmax(logits[0], -1), atol=1e-6)


def key_teacher(served_checkpoint, tmp_path, strength: float, seed: int) -> KeyTeacher:
    model, tokenizer, loaded = load_model(served_checkpoint)
    teacher = copy.deepcopy(model)
    corpus = load_corpus(loaded.train_config["midi_dir"], tokenizer.config, cache_dir=str(tmp_path / "cache"))
    sequences = [tokenizer.encode_events(f.events) for f in corpus.files]
    settings = KeyTeacherSettings(strength=strength, streams=4, prompt_tokens=12, tokens=24)
    return KeyTeacher(model.train(), teacher, tokenizer, sequences, settings, np.random.default_rng(seed))


def mean_loss(teacher: KeyTeacher, calls: int = 6) -> float:
    teacher.rng = np.random.default_rng(1234)  # the same prompts and seeds before and after
    with torch.no_grad():
        return float(np.mean([teacher.loss(lambda: autocast(torch.device("cpu"), torch.float32)).item()
                              for _ in range(calls)]))


def test_training_on_the_key_loss_brings_the_model_alone_toward_the_pulled_teacher(served_checkpoint, tmp_path):
    """A few optimizer steps on the loss alone: the KL to the teacher's key-pulled choices, on the
    model's own fresh continuations, falls; the teacher's weights never move."""
    teacher = key_teacher(served_checkpoint, tmp_path, strength=3.0, seed=0)
    before = mean_loss(teacher)
    frozen = {k: v.clone() for k, v in teacher.teacher.state_dict().items()}
    optimizer = torch.optim.AdamW(teacher.model.parameters(), lr=3e-3, weight_decay=0.0)
    for _ in range(40):
        loss = teacher.loss(lambda: autocast(torch.device("cpu"), torch.float32))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = mean_loss(teacher)
    assert before > 0.05 and after < 0.6 * before, (before, after)
    assert all(torch.equal(frozen[k], v) for k, v in teacher.teacher.state_dict().items())
    assert teacher.model.training  # the rollouts ran in eval mode and gave the model back as it was


def test_the_rollouts_continue_the_prompts_with_the_model_alone(served_checkpoint, tmp_path):
    teacher = key_teacher(served_checkpoint, tmp_path, strength=2.0, seed=3)
    prompts = teacher.prompts()
    assert len(prompts) == 4 and all(len(p) == 12 for p in prompts)
    rows = teacher.continue_alone(prompts)
    for prompt, row in zip(prompts, rows):
        read = with_bos(prompt)  # a prompt cut at a file's start holds its BOS already
        assert isinstance(row, TokenSequence) and len(row) == len(read) + 24
        assert row.ids[:len(read)].tolist() == read.ids.tolist()
    assert teacher.generator.heard(prompts[0].ids).sum() > 0


def test_learn_key_pull_trains_and_logs_the_key_loss(served_checkpoint, tmp_path):
    loaded = load_checkpoint(served_checkpoint)
    out = tmp_path / "keyed"
    result = run_module("model.train", "--midi_dir", loaded.train_config["midi_dir"], "--out_dir", str(out),
                        "--init_from", str(served_checkpoint), "--learn_key_pull", "2", "--rollout_streams", "2",
                        "--rollout_prompt_tokens", "8", "--rollout_tokens", "16", "--epochs", "1",
                        "--max_seq_len", "64", "--batch_size", "4", "--print_steps", "1",
                        "--cache_dir", str(tmp_path / "cache"))
    assert result.returncode == 0, result.stderr[-3000:]
    rows = list(csv.DictReader((out / "training_log.csv").open()))
    assert rows and all(float(r["key_loss"]) >= 0 for r in rows)
    saved = load_checkpoint(out / "latest")
    assert saved.train_config["learn_key_pull"] == 2.0
    assert any(not torch.equal(saved.state_dict[k], v) for k, v in loaded.state_dict.items())


@pytest.mark.parametrize("flags, message", [
    (["--learn_key_pull", "2"], "needs --init_from"),
    (["--learn_key_pull", "-1", "--init_from", "CKPT"], "must be 0 (off) or above"),
    (["--learn_key_pull", "2", "--init_from", "CKPT", "--rollout_streams", "0"], "must be at least 1"),
    (["--learn_key_pull", "2", "--init_from", "CKPT", "--rollout_streams", "500"], "needs 500 training files"),
])
def test_learn_key_pull_settings_that_cannot_work_are_clear_errors(served_checkpoint, tmp_path, flags, message):
    loaded = load_checkpoint(served_checkpoint)
    flags = [str(served_checkpoint) if f == "CKPT" else f for f in flags]
    result = run_module("model.train", "--midi_dir", loaded.train_config["midi_dir"],
                        "--out_dir", str(tmp_path / "run"), "--epochs", "1", "--max_seq_len", "64",
                        "--cache_dir", str(tmp_path / "cache"), *flags)
    assert result.returncode == 2 and message in result.stderr, result.stderr[-2000:]
    assert not (tmp_path / "run" / "latest").exists()
