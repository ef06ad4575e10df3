"""Conversations train end to end: whole multi-turn examples with their system prompt, every assistant turn learned
(or only the last), in-process and through the headless CLI."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from app.data.template import IGNORE_INDEX
from app.objectives import sft
from app.runs.store import RunStore
from app.spec import RunConfig
from app.training.worker import run_training

ROOT = Path(__file__).resolve().parent.parent
TOPICS = ["a puncture", "the brakes", "a loose chain", "the gears", "a wobbly wheel", "the saddle"]


def conversation(i: int) -> dict:
    topic = TOPICS[i % len(TOPICS)]
    return {
        "system": "You are the bike shop's helper. Keep answers short.",
        "messages": [
            {"role": "user", "content": f"My bike has {topic} ({i})."},
            {"role": "assistant", "content": f"Sorry to hear about {topic}. Which bike is it?"},
            {"role": "user", "content": "A city bike."},
            {"role": "assistant", "content": f"For a city bike, {topic} takes about {10 + i} minutes to fix."},
        ],
    }


@pytest.fixture
def chats_file(tmp_path: Path) -> Path:
    path = tmp_path / "chats.jsonl"
    path.write_text("".join(json.dumps(conversation(i)) + "\n" for i in range(12)), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def tokenizer(embedded_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(embedded_model_dir)


def learned_text(tokenizer, example) -> str:
    # targets are shifted by one: the label at position t is the token at t + 1
    return tokenizer.decode([t for t in example.targets if t != IGNORE_INDEX])


@pytest.mark.parametrize("turns,expected", [
    ("all", ["Sorry to hear about a puncture. Which bike is it?<|im_end|>\n",
             "For a city bike, a puncture takes about 10 minutes to fix.<|im_end|>\n"]),
    ("last", ["For a city bike, a puncture takes about 10 minutes to fix.<|im_end|>\n"]),
])
def test_examples_learn_exactly_the_assistant_turns(tokenizer, turns, expected):
    config = RunConfig(dataset="x.jsonl", cutoff_len=512, assistant_turns=turns)
    (example,) = sft.make_examples(tokenizer, [conversation(0)], config)
    assert learned_text(tokenizer, example) == "".join(expected)
    text = tokenizer.decode(example.input_ids)
    assert text.startswith("<|im_start|>system\nYou are the bike shop's helper.") and "A city bike." in text


def test_the_dataset_system_prompt_fills_in_only_where_a_row_has_none(tokenizer):
    config = RunConfig(dataset="x.jsonl", cutoff_len=512, system_prompt="Talk like a pirate.")
    own, none = conversation(0), {"messages": conversation(1)["messages"]}
    texts = [tokenizer.decode(e.input_ids) for e in sft.make_examples(tokenizer, [own, none], config)]
    assert "bike shop's helper" in texts[0] and "pirate" not in texts[0]
    assert texts[1].startswith("<|im_start|>system\nTalk like a pirate.<|im_end|>")


def test_a_cutoff_drops_whole_trailing_turns(tokenizer):
    row = conversation(0)
    full = sft.make_examples(tokenizer, [row], RunConfig(dataset="x.jsonl", cutoff_len=512))[0]
    cutoff = len(full.input_ids) - 3  # the last answer no longer fits whole
    (cut,) = sft.make_examples(tokenizer, [row], RunConfig(dataset="x.jsonl", cutoff_len=cutoff))
    assert learned_text(tokenizer, cut) == "Sorry to hear about a puncture. Which bike is it?<|im_end|>\n"
    assert tokenizer.decode(cut.input_ids).endswith("Which bike is it?<|im_end|>\n")


def test_a_multi_turn_run_trains_end_to_end(workspace, tiny_model_dir, chats_file):
    store = RunStore(workspace.runs)
    run_id = store.create(RunConfig(model=str(tiny_model_dir), dataset=str(chats_file), batch_size=4, cutoff_len=256,
                                    max_steps=3, eval_every=3, learning_rate=1e-3, val_split=0.25,
                                    system_prompt="Be kind.", assistant_turns="all"))
    assert run_training(store.config_path(run_id)) == 0
    assert store.status(run_id).state == "completed"
    records = store.metrics(run_id)
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3] and any("eval_loss" in r for r in records)


@pytest.mark.slow
def test_headless_cli_trains_a_sharegpt_file(workspace, tiny_model_dir, tmp_path):
    """`data check` then `train` from the command line, on a ShareGPT file as public datasets write it."""
    path = tmp_path / "sharegpt.jsonl"
    with open(path, "w", encoding="utf-8") as f:
        for i in range(8):
            turns = conversation(i)["messages"]
            f.write(json.dumps({"system": "Be brief.", "conversations": [
                {"from": "human" if m["role"] == "user" else "gpt", "value": m["content"]} for m in turns]}) + "\n")
    check = subprocess.run([sys.executable, "launch.py", "data", "check", str(path), "--model", str(tiny_model_dir)],
                           cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert check.returncode == 0, check.stderr
    assert "Usable: 8 conversations kept" in check.stdout
    store = RunStore(workspace.runs)
    run_id = store.create(RunConfig(model=str(tiny_model_dir), dataset=str(path), batch_size=2, cutoff_len=256,
                                    max_steps=2, learning_rate=1e-3, val_split=0.25))
    train = subprocess.run([sys.executable, "launch.py", "train", str(store.config_path(run_id))],
                           cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert train.returncode == 0, train.stdout + train.stderr
    assert store.status(run_id).state == "completed"
