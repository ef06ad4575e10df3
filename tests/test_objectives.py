"""The OBJECTIVES registry: each entry is what the worker trains, what the estimate counts and what the tabs show.

The tests register a second objective the way a new module would (one entry in OBJECTIVES) and check that the run
config, the estimate, the worker, the live view and the tabs follow it without any other change."""
from __future__ import annotations

import re

import json
from dataclasses import replace
from pathlib import Path

import pytest
import yaml

from app import objectives
from app.handoff import MethodChoice, TrainInputs
from app.memory.estimate import EstimateError, EstimateInputs, estimate_memory
from app.objectives import OBJECTIVES, Metric, ObjectiveError, get_objective
from app.objectives.base import ExtraMemory
from app.runs import history, plots
from app.runs.store import RunStore
from app.spec import ConfigError, RunConfig

SFT = OBJECTIVES["sft"]


@pytest.mark.parametrize("name", list(OBJECTIVES))
def test_every_objective_names_what_it_needs(name):
    o = get_objective(name)
    assert o.name == name and o.label and o.description.endswith(".")
    assert callable(o.make_examples) and callable(o.make_batch) and callable(o.loss_sum)
    assert o.metrics[0].key == "loss" and {m.split for m in o.metrics} <= {"train", "eval"}
    assert o.sequences_per_example >= 1
    assert set(o.controls) <= set(RunConfig.__dataclass_fields__), "controls are RunConfig fields"


@pytest.mark.parametrize("make", [
    lambda: get_objective("dpo-not-yet"),
    lambda: RunConfig(objective="dpo-not-yet"),
    lambda: RunConfig.from_dict({"objective": "dpo-not-yet"}),
    lambda: EstimateInputs(objective="dpo-not-yet").validate(),
])
def test_an_unknown_objective_is_refused_naming_the_known_ones(make):
    with pytest.raises((ObjectiveError, ConfigError, EstimateError), match=r"objective='dpo-not-yet': choose one of sft"):
        make()


def test_a_run_yaml_without_an_objective_is_supervised(tmp_path):
    """Runs written before objectives existed keep loading (and training) as what they were."""
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"dataset": "x.jsonl", "method": "lora"}))
    config = RunConfig.from_yaml(path)
    assert config.objective == "sft"
    assert yaml.safe_load(config.to_yaml())["objective"] == "sft"


# --- a second objective, registered as a new module would be ---------------------------------------------------------
def counting_objective(calls: list) -> objectives.Objective:
    def loss_sum(*args, **kwargs):
        calls.append("loss")
        return SFT.loss_sum(*args, **kwargs)

    def make_examples(tokenizer, rows, config):
        calls.append("examples")
        return SFT.make_examples(tokenizer, rows, config)

    def two_gib(inventory, dtypes, batch, seq):
        return [ExtraMemory("reference", "Reference model", 2 * 1024**3, f"{batch} sequences of {seq}")]

    return replace(SFT, name="twice", label="Twice", metrics=SFT.metrics + (Metric("accuracy", "accuracy", "eval"),),
                   make_examples=make_examples, loss_sum=loss_sum, sequences_per_example=2, extra_memory=two_gib,
                   controls=())


@pytest.fixture
def registered(monkeypatch):
    calls: list = []
    monkeypatch.setitem(OBJECTIVES, "twice", counting_objective(calls))
    return calls


def test_the_estimate_counts_an_objectives_sequences_and_its_own_terms(registered):
    inputs = EstimateInputs(model="config:smollm2-135m", batch_size=2, seq_len=128, precision="fp32")
    sft, twice = estimate_memory(inputs), estimate_memory(replace(inputs, objective="twice"))
    for device in ("gpu", "cpu"):
        a, b = getattr(sft, device), getattr(twice, device)
        assert b.term("activations") == 2 * a.term("activations"), "two sequences per row: twice the activations"
        assert b.term("reference") == 2 * 1024**3 and a.term("reference") == 0
    assert next(t for t in twice.gpu.terms if t.key == "reference").note == "4 sequences of 128"
    assert twice.to_dict()["objective"] == "twice"


def test_the_worker_trains_with_the_registered_objective(registered, workspace, tiny_model_dir, tmp_path):
    from app.training.worker import run_training

    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps({"instruction": f"Say {i}.", "output": f"{i} it is, friend."}) + "\n"
                            for i in range(10)))
    store = RunStore(workspace.runs)
    run_id = store.create(RunConfig(objective="twice", model=str(tiny_model_dir), dataset=str(rows), batch_size=4,
                                    cutoff_len=128, max_steps=2, save_every=0, val_split=0.2, learning_rate=1e-3))
    assert run_training(store.config_path(run_id)) == 0
    assert store.status(run_id).state == "completed"
    assert registered.count("examples") == 2, "training and validation rows both go through the objective"
    assert registered.count("loss") >= 2 + 1, "every step's loss and the validation loss come from the objective"
    assert store.config(run_id).objective == "twice"


def test_curves_and_the_live_figure_carry_an_objectives_other_metrics():
    records = [{"step": 1, "loss": 0.9, "lr": 1e-3}, {"step": 2, "loss": 0.7, "lr": 1e-3},
               {"step": 2, "eval_loss": 0.8, "accuracy": 0.5}, {"step": 4, "eval_loss": 0.6, "accuracy": 0.75},
               {"step": 4, "eval_loss": 0.6, "accuracy": float("nan")}]  # a later NaN is a gap, not a point
    c = history.curves(records, ["accuracy"])
    assert c.extra == {"accuracy": [(2, 0.5), (4, 0.75)]}
    assert history.curves(records).extra == {}
    fig = plots.loss_figure(c.train, c.eval, c.lr, extra={"accuracy": c.extra["accuracy"]})
    panel = [t for t in fig.data if t.name == "accuracy"]
    assert len(panel) == 1 and panel[0].yaxis == "y3" and list(panel[0].y) == [0.5, 0.75]
    assert fig.layout.yaxis3.domain == (0, 0.32)
    plain = plots.loss_figure(c.train, c.eval, c.lr, extra={"accuracy": []})
    assert "yaxis3" not in plain.layout.to_plotly_json(), "no panel for a metric with no points yet"


def test_the_live_view_plots_the_run_objectives_metrics(registered, tmp_path):
    from components import train_tab

    store = RunStore(tmp_path / "runs")
    rows = tmp_path / "rows.jsonl"
    rows.write_text("{}\n")
    run_id = store.create(RunConfig(objective="twice", dataset=str(rows)))
    store.append_metric(run_id, {"step": 1, "loss": 1.0})
    store.append_metric(run_id, {"step": 1, "eval_loss": 1.1, "accuracy": 0.6})
    figure = train_tab.live_view(store, {run_id: store.status(run_id)}, run_id)[2]
    assert [list(t.y) for t in figure.data if t.name == "accuracy"] == [[0.6]]


# --- the tabs -------------------------------------------------------------------------------------------------------
def train_inputs(choice: MethodChoice, dataset: str) -> TrainInputs:
    return TrainInputs(model="embedded", dataset=dataset, val_dataset=None, val_split=0.1, cutoff_len=128,
                       batch_size=2, grad_accum=1, choice=choice, learning_rate=1e-4, epochs=1, max_steps=0,
                       warmup_steps=0, scheduler="cosine", seed=1, eval_every=0, save_every=0, keep_last=1,
                       train_on_prompt=False)


def test_the_method_tabs_objective_reaches_the_run_and_its_estimate(registered, models_dir, tmp_path):
    from components import method_tab

    *_, choice = method_tab.estimate_view(str(models_dir), "config:smollm2-135m", "twice", "lora", "fp32", "adamw",
                                          False, 2, 128, 1, {})
    assert choice.objective == "twice" and choice.estimate["objective"] == "twice"
    data = tmp_path / "rows.jsonl"
    data.write_text("{}\n")
    assert train_inputs(choice, str(data)).to_config().objective == "twice"


@pytest.mark.parametrize("objective, shown", [("sft", {"assistant_turns", "train_on_prompt"}), ("twice", set()),
                                              ("dpo", {"beta"}), ("simpo", {"beta", "simpo_gamma"})])
def test_the_train_tab_shows_only_the_controls_the_objective_uses(registered, objective, shown):
    from components import train_tab

    assert objectives.optional_controls() == ["assistant_turns", "beta", "simpo_gamma", "train_on_prompt"]
    for control in objectives.optional_controls():
        assert train_tab.on_objective(control, MethodChoice(objective=objective)) == {"__type__": "update",
                                                                                     "visible": control in shown}


def test_an_objective_is_one_module_and_one_registry_line():
    """The registry lists each objective module: a module defining OBJECTIVE (or a family's OBJECTIVES) without its
    line is caught."""
    folder = Path(objectives.__file__).parent
    modules = sorted(p.stem for p in folder.glob("*.py") if re.search(r"\nOBJECTIVES? = ", p.read_text()))
    registered = sorted({o.make_examples.__module__.rsplit(".", 1)[-1] for o in OBJECTIVES.values()})
    assert modules == registered == ["preference", "sft"]
