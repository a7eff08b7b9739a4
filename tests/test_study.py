"""python -m model.research.study: every variant trained, measured and tabulated, on a tiny corpus."""

from __future__ import annotations

import json

import pytest

from model.research.study import deep_fm
from tests.conftest import run_module, tiny_corpus
from tests.model_shapes import token_shape


def test_study_writes_json_and_table(tmp_path):
    corpus = tiny_corpus(tmp_path / "midi")
    out = tmp_path / "study"
    result = run_module("model.research.study", "--midi_dir", str(corpus), "--out_dir", str(out),
                        "--variants", "transformer,fm_demod_direct_decays,fm_deep2_64,fm_deep2_64_learned_gated_conv3",
                        "--minutes", "0.05", "--deep_parameters", "700000", "--deep_decays", "0,16,4",
                        "--max_seq_len", "64", "--fm_dim", "64", "--fm_hidden", "32", "--tf_dim", "32",
                        "--tf_layers", "1", "--continuations", "2", "--prompt_tokens", "16",
                        "--continuation_tokens", "24", "--val_fraction", "0.25",
                        "--cache_dir", str(tmp_path / "cache"))
    assert result.returncode == 0, result.stderr[-3000:]
    study = json.loads((out / "study.json").read_text())
    rows = {r["name"]: r for r in study["variants"]}
    assert set(rows) == {"transformer", "fm_demod_direct_decays", "fm_deep2_64", "fm_deep2_64_learned_gated_conv3"}
    learned = rows["fm_deep2_64_learned_gated_conv3"]["config"]
    assert learned["learn_decays"] and not rows["fm_deep2_64"]["config"]["learn_decays"]
    assert learned["gated"] and not rows["fm_deep2_64"]["config"]["gated"]
    assert learned["conv"] == 3 and rows["fm_deep2_64_learned_gated_conv3"]["state_floats"]["10000"] == 3 * 64
    assert learned["decays"] == rows["fm_deep2_64"]["config"]["decays"] == "0,16,4"
    fm, tf, deep = rows["fm_demod_direct_decays"], rows["transformer"], rows["fm_deep2_64"]
    assert fm["state_floats"]["100"] == fm["state_floats"]["10000"] == 64  # fixed size
    assert deep["state_floats"]["10000"] == 64 and deep["config"]["field_layers"] == 2
    assert deep["parameters"] <= 700_000
    assert tf["state_floats"]["10000"] == 100 * tf["state_floats"]["100"]  # a cache that grows
    assert fm["train"]["steps"] > 0 and fm["val_nll"] < 10
    assert {"distinctness", "prompt_fidelity", "seed_spread", "busiest_voice_share", "mean_melodic_move",
            "real_step_share", "key_correlation"} <= set(fm["continuation"])
    table = (out / "study.md").read_text()
    assert "| fm_demod_direct_decays |" in table and "| fm_deep2_64 |" in table and "| bigram |" in table
    assert "| Bach (the real continuations) |" in table and "busiest voice" in table


def test_a_misnamed_deep_variant_is_a_clear_error():
    with pytest.raises(ValueError, match=r"deep variants are named fm_deep<layers>_<floats>\[_learned\]\[_gated\]\[_conv<k>\]"):
        deep_fm("fm_deep4_1024_learnt", token_shape(50), 2_450_000, 0.1)
