"""The ground every tab stands on: workspace, run config, run store, model resolution, the CLI."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from app import models
from app.methods import build_inventory
from app.runs.store import FAILED, QUEUED, RunNotFound, RunStore
from app.spec import ConfigError, RunConfig
from app.workspace import Workspace, atomic_write_text

ROOT = Path(__file__).resolve().parent.parent


def test_workspace_creates_its_folders(tmp_path, monkeypatch):
    monkeypatch.delenv("WORKBENCH_MODELS_DIR", raising=False)
    ws = Workspace.open(tmp_path / "ws")
    assert [p.is_dir() for p in (ws.root, ws.models, ws.datasets, ws.runs)] == [True] * 4
    assert ws.models == ws.root / "models"


def test_workspace_from_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("WORKBENCH_WORKSPACE", str(tmp_path / "from-env"))
    assert Workspace.open().root == (tmp_path / "from-env").resolve()


def test_atomic_write_leaves_no_temp_files(tmp_path):
    target = tmp_path / "a" / "file.txt"
    atomic_write_text(target, "one")
    atomic_write_text(target, "two")
    assert target.read_text() == "two"
    assert [p.name for p in target.parent.iterdir()] == ["file.txt"]


def test_run_config_round_trips_through_yaml(tmp_path):
    config = RunConfig(dataset="d.jsonl", method="lora", method_args={"r": 16}, max_steps=5)
    path = tmp_path / "run.yaml"
    path.write_text(config.to_yaml())
    assert RunConfig.from_yaml(path) == config


@pytest.mark.parametrize(
    "field, value",
    [
        ("precision", "fp8"),
        ("optimizer", "adam"),
        ("scheduler", "step"),
        ("val_split", 1.0),
        ("val_split", -0.1),
        ("learning_rate", 0),
        ("batch_size", 0),
        ("cutoff_len", 0),
        ("grad_accum", -1),
        ("save_every", -5),
        ("method_args", [1, 2]),
    ],
)
def test_run_config_rejects_bad_values_naming_the_field(field, value):
    with pytest.raises(ConfigError, match=field):
        RunConfig(**{field: value})


@pytest.mark.parametrize(
    "text, message",
    [
        ("batch_sise: 4\n", "unknown field"),
        ("- a list\n", "mapping"),
        ("model: [unclosed\n", "not valid YAML"),
    ],
)
def test_run_config_from_bad_yaml(tmp_path, text, message):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        RunConfig.from_yaml(path)


def test_run_store_lists_runs_after_a_restart(workspace):
    store = RunStore(workspace.runs)
    first = store.create(RunConfig(dataset="a.jsonl"))
    second = store.create(RunConfig(dataset="b.jsonl", method="full"))
    reopened = RunStore(Workspace.open(workspace.root).runs)
    assert set(reopened.list_ids()) == {first, second}
    assert reopened.status(first).state == QUEUED
    assert reopened.config(second).method == "full"


def test_run_store_skips_garbled_metric_lines(workspace):
    store = RunStore(workspace.runs)
    run_id = store.create(RunConfig(dataset="a.jsonl"))
    store.append_metric(run_id, {"step": 1, "loss": 2.0})
    with open(store.metrics_path(run_id), "a") as f:
        f.write('{"step": 2, "lo\n\x00\x01garbage\n[1, 2]\n')
    store.append_metric(run_id, {"step": 3, "loss": 1.5})
    assert [m["step"] for m in store.metrics(run_id)] == [1, 3]


def test_run_store_reports_a_garbled_status_instead_of_crashing(workspace):
    store = RunStore(workspace.runs)
    run_id = store.create(RunConfig(dataset="a.jsonl"))
    (store.dir(run_id) / "status.json").write_text('{"state": "runn')
    assert store.status(run_id).state == FAILED
    (store.dir(run_id) / "run.yaml").write_text("::: not yaml [")
    assert store.safe_config(run_id) is None


@pytest.mark.parametrize("bad_id", ["", "../etc", "a/b", ".hidden", "x" * 200])
def test_run_store_refuses_ids_that_escape_the_store(workspace, bad_id):
    with pytest.raises(RunNotFound):
        RunStore(workspace.runs).dir(bad_id)


def test_embedded_model_is_provisioned_once(embedded_model_dir, models_dir):
    assert models.is_provisioned(embedded_model_dir)
    before = (embedded_model_dir / "model.safetensors").stat().st_mtime
    assert models.resolve_model("embedded", models_dir) == embedded_model_dir
    assert (embedded_model_dir / "model.safetensors").stat().st_mtime == before
    config = json.loads((embedded_model_dir / "config.json").read_text())
    assert "quantization_config" not in config


def test_embedded_model_answers(embedded_model_dir):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(embedded_model_dir)
    model = AutoModelForCausalLM.from_pretrained(embedded_model_dir)
    batch = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True, return_tensors="pt", return_dict=True,
    )
    with torch.inference_mode():
        out = model.generate(**batch, max_new_tokens=12, do_sample=False)
    answer = tokenizer.decode(out[0, batch["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer


def test_arch_facts_match_the_loaded_model(embedded_model_dir, models_dir):
    facts = build_inventory(models.load_config("embedded", models_dir))
    assert (facts.layers, facts.hidden, facts.heads, facts.kv_heads, facts.vocab) == (30, 576, 9, 3, 49152)
    assert facts.tied_embeddings
    from transformers import AutoModelForCausalLM

    real = AutoModelForCausalLM.from_pretrained(embedded_model_dir)
    assert facts.total == sum(p.numel() for p in real.parameters()) == 134_515_008


def test_arch_facts_from_a_local_folder(tiny_model_dir, models_dir):
    facts = build_inventory(models.load_config(str(tiny_model_dir), models_dir))
    assert (facts.layers, facts.hidden, facts.kv_heads, facts.head_dim) == (2, 64, 2, 16)


@pytest.mark.parametrize(
    "ref, message",
    [
        ("someone/some-model", "local folder"),  # a hub id while offline
        ("/no/such/folder", "neither a model folder"),
        ("not a model", "neither a model folder"),
        ("config:llama-3.1-8b", "architecture only"),
    ],
)
def test_unusable_model_references_get_plain_advice(ref, message, models_dir):
    with pytest.raises(models.ModelError, match=message):
        models.resolve_model(ref, models_dir)


def test_a_folder_without_config_is_refused(tmp_path, models_dir):
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(models.ModelError, match="no config.json"):
        models.resolve_model(str(tmp_path), models_dir)
    with pytest.raises(models.ModelError, match="no config.json"):
        models.load_config(str(tmp_path), models_dir)


def test_hub_config_offline_names_the_alternatives(models_dir):
    with pytest.raises(models.ModelError, match="local model folder"):
        models.load_config("someone/some-model", models_dir)


def test_model_choices_start_with_the_embedded_model(models_dir):
    labels_refs = models.model_choices(models_dir)
    assert labels_refs[0][1] == models.EMBEDDED


def run_cli(*args, env=None):
    return subprocess.run(
        [sys.executable, str(ROOT / "launch.py"), *args],
        capture_output=True, text=True, timeout=120, cwd=ROOT, env={**os.environ, **(env or {})},
    )


def test_cli_help_lists_the_subcommands():
    out = run_cli("--help")
    assert out.returncode == 0
    for name in ("estimate", "train", "data", "provision"):
        assert name in out.stdout


@pytest.mark.parametrize("sub", [["estimate"], ["train"], ["data", "check"], ["provision"]])
def test_each_subcommand_has_help(sub):
    out = run_cli(*sub, "--help")
    assert out.returncode == 0, out.stderr
    assert "usage:" in out.stdout


def test_pickle_checkpoints_are_refused(tmp_path, tiny_model_dir):
    folder = tmp_path / "pickled"
    folder.mkdir()
    (folder / "config.json").write_text((tiny_model_dir / "config.json").read_text())
    (folder / "pytorch_model.bin").write_bytes(b"not even a pickle")
    with pytest.raises(models.ModelError, match="safetensors only"):
        models.load_causal_lm(folder)


@pytest.mark.parametrize(
    "words, rest",
    [(["provision"], []), (["estimate"], []), (["train"], ["--preset", "quick-demo"]), (["data", "check"], ["d.jsonl"]),
     (["export-run"], ["RUN_ID", "DEST"])],
)
@pytest.mark.parametrize("order", ["before", "after"])
def test_workspace_goes_before_or_after_the_subcommand(words, rest, order):
    import launch

    given = ["--workspace", "/elsewhere/ws"]
    argv = given + words + rest if order == "before" else words + given + rest
    assert launch.build_parser().parse_args(argv).workspace == "/elsewhere/ws"
    assert launch.build_parser().parse_args(words + rest).workspace is None  # then $WORKBENCH_WORKSPACE or ./workspace


@pytest.mark.parametrize("order", ["before", "after"])
def test_data_check_takes_the_workspace_in_either_place(order, tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text('{"instruction": "Say hi", "output": "Hi"}\n')
    where = ["--workspace", str(tmp_path / "ws")]
    # --cutoff 0: no tokenizer to load, so the check takes a second; the table above shows where the value lands
    argv = where + ["data", "check"] if order == "before" else ["data", "check"] + where
    out = run_cli(*argv, str(data), "--cutoff", "0")
    assert out.returncode == 0, out.stderr
