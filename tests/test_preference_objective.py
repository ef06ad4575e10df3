"""Preference objectives (DPO, IPO, SimPO) end to end on a tiny model: pairs packed without padding, reference
log-probabilities computed once with the adapter off, the loss and its metrics recorded, a resumed run the same."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from app.objectives import OBJECTIVES, get_objective
from app.objectives import preference
from app.runs.store import RunStore
from app.spec import ConfigError, RunConfig
from app.training.worker import run_training

STYLES = ["tides", "bread", "maps", "stars", "rope", "sails"]


def pair(i: int) -> dict:
    topic = STYLES[i % len(STYLES)]
    return {"system": "Answer briefly.", "messages": [{"role": "user", "content": f"Tell me about {topic} ({i})."}],
            "chosen": f"{topic.capitalize()} are fine. Short answer {i}.",
            "rejected": f"Well, let me tell you at great length about {topic}, which is a long story {i} " * 2}


@pytest.fixture
def pairs_file(tmp_path: Path) -> Path:
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(pair(i)) + "\n" for i in range(16)), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def tokenizer(embedded_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(embedded_model_dir)


def test_each_preference_objective_is_registered_with_its_controls():
    assert {"dpo", "ipo", "simpo"} <= set(OBJECTIVES)
    assert get_objective("dpo").sequences_per_example == 2 and get_objective("dpo").prepare is not None
    assert get_objective("simpo").prepare is None and "simpo_gamma" in get_objective("simpo").controls


def test_a_pair_learns_only_its_two_answers(tokenizer):
    (example,) = preference.pair_examples(tokenizer, [pair(0)], RunConfig(dataset="x", objective="dpo", cutoff_len=256))
    learned = [tokenizer.decode([t for t in side.targets if t != -100]) for side in (example.chosen, example.rejected)]
    assert learned[0] == "Tides are fine. Short answer 0.<|im_end|>\n"
    assert learned[1].startswith("Well, let me tell you") and learned[1].endswith("<|im_end|>\n")
    # both sides share the prompt token for token
    prompt = len(example.chosen.input_ids) - sum(t != -100 for t in example.chosen.targets)
    assert example.chosen.input_ids[:prompt - 1] == example.rejected.input_ids[:prompt - 1]


def test_supervised_rows_are_refused_plainly(tokenizer):
    with pytest.raises(ValueError, match="preference pairs"):
        preference.pair_examples(tokenizer, [{"instruction": "q", "input": "", "output": "a"}],
                                 RunConfig(dataset="x", objective="dpo"))


@pytest.mark.parametrize("beta", [0, -1])
def test_beta_must_be_positive(beta):
    with pytest.raises(ConfigError, match="beta"):
        RunConfig(dataset="x", objective="dpo", beta=beta)


def test_packed_and_padded_pair_log_probabilities_agree(tiny_model_dir, tokenizer):
    import torch
    from transformers import AutoModelForCausalLM

    from app.training.attention import VARLEN, register_varlen_attention

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    examples = preference.pair_examples(tokenizer, [pair(i) for i in range(3)], RunConfig(dataset="x", objective="dpo"))
    batch = preference.make_batch(examples)
    with torch.no_grad():
        padded, counts = preference.sequence_logps(model, batch, False, torch.device("cpu"), 0)
        register_varlen_attention()
        model.set_attn_implementation(VARLEN)
        packed, packed_counts = preference.sequence_logps(model, batch, True, torch.device("cpu"), 0)
    assert torch.allclose(packed, padded, atol=1e-3) and torch.equal(counts, packed_counts)
    assert counts.tolist() == [float(sum(t != -100 for t in e.targets)) for p in examples for e in (p.chosen, p.rejected)]


@pytest.mark.parametrize("objective", ["dpo", "ipo", "simpo"])
def test_a_preference_run_trains_and_records_its_metrics(workspace, tiny_model_dir, pairs_file, objective):
    store = RunStore(workspace.runs)
    run_id = store.create(RunConfig(model=str(tiny_model_dir), dataset=str(pairs_file), objective=objective,
                                    batch_size=4, cutoff_len=128, max_steps=3, eval_every=3, learning_rate=1e-3,
                                    val_split=0.25, beta=2.0 if objective == "simpo" else 0.1))
    assert run_training(store.config_path(run_id)) == 0
    assert store.status(run_id).state == "completed"
    records = store.metrics(run_id)
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3]
    assert all({"reward_accuracy", "reward_margin", "chosen_reward", "rejected_reward"} <= r.keys() for r in steps)
    assert all(0 <= r["reward_accuracy"] <= 1 for r in steps)
    if objective == "dpo":  # LoRA starts as the reference: every reward 0, the loss log 2
        assert steps[0]["loss"] == pytest.approx(math.log(2), abs=1e-4) and steps[0]["reward_margin"] == pytest.approx(0, abs=1e-4)
    evals = [r for r in records if "eval_loss" in r]
    assert evals and "eval_reward_accuracy" in evals[-1]


def test_a_supervised_dataset_fails_a_preference_run_with_words(workspace, tiny_model_dir, tmp_path):
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps({"instruction": f"q{i}", "input": "", "output": "a"}) + "\n" for i in range(4)))
    store = RunStore(workspace.runs)
    run_id = store.create(RunConfig(model=str(tiny_model_dir), dataset=str(rows), objective="dpo", max_steps=1))
    assert run_training(store.config_path(run_id)) != 0
    status = store.status(run_id)
    assert (status.state, status.failure) == ("failed", "data") and "preference pairs" in status.reason


def test_preference_data_is_never_trained_as_supervised_rows(tokenizer):
    from app.objectives import sft

    with pytest.raises(ValueError, match="preference objective"):
        sft.make_examples(tokenizer, [pair(0)], RunConfig(dataset="x"))


@pytest.mark.slow
def test_headless_dpo_on_a_public_shaped_pairs_file(workspace, tiny_model_dir, tmp_path):
    """`launch.py train` on a run.yaml naming a prompt/chosen/rejected file as TRL's examples write it."""
    import subprocess
    import sys

    source = Path(__file__).parent / "data" / "preference" / "trl_pairs.jsonl"
    store = RunStore(workspace.runs)
    run_id = store.create(RunConfig(model=str(tiny_model_dir), dataset=str(source), objective="dpo", batch_size=2,
                                    cutoff_len=128, max_steps=2, learning_rate=1e-3, val_split=0.25))
    done = subprocess.run([sys.executable, "launch.py", "train", str(store.config_path(run_id))],
                          cwd=Path(__file__).resolve().parent.parent, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "reference log-probabilities" in done.stdout
    steps = [r for r in store.metrics(run_id) if "loss" in r]
    assert len(steps) == 2 and all("reward_accuracy" in r for r in steps)


@pytest.mark.parametrize("examples,objective,words", [
    ("pair", "sft", "preference objective"),
    ("row", "dpo", "learns from preference pairs"),
    ("conversation", "simpo", "learns from preference pairs"),
    ("unpaired", "dpo", "not trained yet"),
    ("pair", "dpo", ""),
    ("conversation", "sft", ""),
    (None, "dpo", ""),  # a file that is not a stored dataset: the worker reads it and says it
])
def test_start_refuses_an_objective_that_cannot_read_the_dataset(tmp_path, examples, objective, words):
    from app.handoff import data_mismatch

    train = tmp_path / "ds" / "train.jsonl"
    train.parent.mkdir()
    train.write_text("{}\n")
    if examples:
        (train.parent / "meta.json").write_text(json.dumps({"examples": examples}))
    said = data_mismatch(str(train), objective)
    assert (words in said) if words else said == ""
