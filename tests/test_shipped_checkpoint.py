"""The shipped default checkpoint loads on CPU, has the shipped size, generates music, and is what
the server serves when no checkpoint is named."""

from __future__ import annotations

from pathlib import Path

import httpx
import numpy as np

from model.checkpoint.format import load_model
from model.generation.generator import BatchGenerator
from model.sampling.config import SamplingConfig
from model.tokenizer.vocabulary import BAR, NOTE
from server.config import ServerConfig
from tests.server_harness import collect_notes, running_server, start_session

DEFAULT = Path(__file__).resolve().parents[1] / "checkpoints" / "default"


def test_only_what_inference_needs_under_100_mb():
    names = {p.name for p in DEFAULT.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= names
    assert not any(n.startswith("optimizer") for n in names)
    assert sum(p.stat().st_size for p in DEFAULT.iterdir()) < 100 * 2**20


def test_loads_on_cpu_and_generates_notes_in_bars():
    model, tokenizer, loaded = load_model(DEFAULT, device="cpu")
    assert model.config.dim == 4096 and loaded.val_loss is not None
    generator = BatchGenerator(model, tokenizer)
    state, out, decoders = generator.prime_many([None, None])
    configs = [SamplingConfig(seed=1), SamplingConfig(seed=2)]
    tokens, notes = [], []
    for step in range(96):
        results, state, out = generator.advance(state, out, decoders, configs, [step, step])
        tokens.append([r.token for r in results])
        notes += [r.note for r in results if r.note is not None]
    kinds = tokenizer.kinds(np.array(tokens))
    assert (kinds == NOTE).mean() > 0.5 and (kinds == BAR).any()
    assert all(21 <= n.pitch <= 108 for n in notes)
    assert (np.array(tokens)[:, 0] != np.array(tokens)[:, 1]).mean() > 0.3  # the seeds differ
    assert state.position.tolist() == [97, 97] and state.field.shape == (2, model.config.state_floats)


def test_server_serves_it_by_default():
    config = ServerConfig()
    assert Path(config.checkpoint).resolve() == DEFAULT.resolve()
    with running_server(config) as server:
        health = httpx.get(f"{server.http_url}/health", timeout=30).json()
        assert Path(health["checkpoint"]).resolve() == DEFAULT.resolve()
        assert health["state_bytes_per_session"] >= 4096 * 4  # one float32 field of dim 4096
        answers = {}
        for pull in (0.0, 1.5):
            with server.connect() as ws:
                start_session(ws, seed=3, key_pull=pull, prompt_notes=[
                    {"pitch": p, "velocity": 80, "start": i * 0.5, "duration": 0.5, "voice": 0}
                    for i, p in enumerate((60, 64, 67, 72, 67, 64, 60, 55))])
                answers[pull] = collect_notes(ws, 48, timeout=60)
    for notes in answers.values():
        assert all(21 <= n["pitch"] <= 108 and n["duration"] > 0 for n in notes)
        assert len({n["pitch"] for n in notes}) > 2  # music, not one repeated note
    # The key pull keeps the answer near the C major the prompt played.
    in_triad = {pull: np.mean([n["pitch"] % 12 in (0, 4, 7) for n in notes]) for pull, notes in answers.items()}
    assert in_triad[1.5] > max(0.5, in_triad[0.0])


CHORALE = ((72, 72, 74, 76, 74, 72, 71, 72), (67, 69, 67, 67, 67, 65, 67, 64),
           (64, 65, 62, 60, 59, 60, 62, 60), (48, 53, 55, 48, 55, 53, 55, 48))  # soprano .. bass


def test_a_four_voice_prompt_continues_in_four_voices_each_in_its_range():
    """Two bars of a four-part chorale (voice 0 soprano .. 3 bass) as the prompt: the answer keeps
    four parts, none taking most of the notes, and the soprano above the alto above the tenor
    above the bass, as a listener hears a chorale (not one voice jumping around middle C)."""
    prompt = [{"pitch": p, "velocity": 80, "start": i * 1.0, "duration": 1.0, "voice": v}
              for v, line in enumerate(CHORALE) for i, p in enumerate(line)]
    with running_server(ServerConfig()) as server, server.connect() as ws:
        start_session(ws, seed=5, key_pull=0.0, prompt_notes=prompt)
        notes = collect_notes(ws, 96, timeout=120)
    by_voice = {v: [n["pitch"] for n in notes if n["voice"] == v] for v in range(4)}
    counts = {v: len(p) for v, p in by_voice.items()}
    assert all(c >= 6 for c in counts.values()), counts
    assert max(counts.values()) <= 0.5 * len(notes), counts
    means = [np.mean(by_voice[v]) for v in range(4)]
    assert means == sorted(means, reverse=True), means
