"""The Train tab's handlers (no browser), the run views they format, rank sweeps and the plot functions."""
from __future__ import annotations

import json
import shlex
import struct
import sys
from dataclasses import asdict, replace
from pathlib import Path

import gradio as gr
import pytest
import yaml

from app.handoff import MethodChoice, TrainInputs
from app.runs import history
from app.runs import jobs
from app.memory import estimate as memory
from app.memory.device import DeviceInfo
from app.runs import plots
from app.runs import sweeps
from app.runs.jobs import Supervisor, attach_estimate
from app.methods import get_method
from app.runs.store import (COMPLETED, FAILED, INTERRUPTED, QUEUED, RUNNING, STOPPED, RunStatus, RunStore,
                            checkpoint_step)
from app.spec import RunConfig
from components import train_tab as tab

FAKE = Path(__file__).resolve().parent / "fake_worker.py"
REAL_ESTIMATE = memory.estimate_for_config  # before quick_estimate replaces it


@pytest.fixture
def store(workspace) -> RunStore:
    return RunStore(workspace.runs)


@pytest.fixture
def sup(store):
    sup = Supervisor(store, command=lambda run_yaml, resume: [sys.executable, str(FAKE), str(run_yaml), "--steps", "3"])
    yield sup
    for proc in sup._children.values():
        proc.kill()
        proc.wait()


class FakeEstimate:
    """What the Train tab reads of a MemoryEstimate: its to_dict()."""

    def __init__(self, total_bytes: float):
        self.total_bytes = total_bytes

    def to_dict(self) -> dict:
        return {"total_bytes": self.total_bytes}


@pytest.fixture(autouse=True)
def quick_estimate(monkeypatch):
    """The estimator's own tests live with it; here it answers at once, with a figure that depends on r, and counts
    its calls."""
    calls = []

    def estimate(config, models_dir):
        calls.append(config)
        return FakeEstimate(1e6 * config.method_args.get("r", 8))

    monkeypatch.setattr(memory, "estimate_for_config", estimate)
    return calls


@pytest.fixture
def dataset(tmp_path) -> str:
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps({"instruction": "Say hi", "input": "", "output": "hi"}) + "\n")
    return str(path)


def inputs(dataset_path: str, **changes) -> TrainInputs:
    """What the tab's controls hold by default, with a dataset chosen (and an estimate made for other settings)."""
    values = dict(
        model="embedded", dataset=dataset_path, val_dataset=None, val_split=0.1, cutoff_len=256, batch_size=4,
        grad_accum=1, choice=MethodChoice(method_args={"r": 8}, estimate={"total_bytes": 1.5e9, "trainable": 460800}),
        learning_rate=2e-4, epochs=1, max_steps=0, warmup_steps=0, scheduler="cosine", seed=42,
        eval_every=0, save_every=50, keep_last=2, train_on_prompt=False,
    )
    values.update(changes)
    return TrainInputs(**values)


# --- building a run ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("changes, expected", [
    ({}, dict(max_steps=-1, epochs=1.0, method="lora", method_args={"r": 8})),
    (dict(max_steps=30), dict(max_steps=30)),
    (dict(train_on_prompt=True, grad_accum=4, scheduler="linear"), dict(train_on_prompt=True, grad_accum=4, scheduler="linear")),
    (dict(choice=MethodChoice()), dict(method="lora", method_args={}, precision="auto")),
    (dict(choice=MethodChoice(method="full", precision="bf16", grad_checkpointing=True)),
     dict(method="full", precision="bf16", grad_checkpointing=True)),
    (dict(dataset=None), dict(dataset="")),
    (dict(model=None, val_dataset=""), dict(model="embedded", val_dataset=None)),
    ({}, dict(gpus=1, strategy="ddp")),  # one GPU or none: the controls are hidden and say nothing
    (dict(gpus=4.0, strategy="fsdp"), dict(gpus=4, strategy="fsdp")),
    (dict(gpus=None, strategy=None), dict(gpus=1, strategy="ddp")),
    ({}, dict(assistant_turns="all", system_prompt="")),  # the control is hidden for instruction rows
    (dict(assistant_turns="last", system_prompt="  Be brief.\n"), dict(assistant_turns="last", system_prompt="Be brief.")),
])
def test_train_inputs_make_a_run_config(dataset, changes, expected):
    config = inputs(dataset, **changes).to_config()
    assert {k: getattr(config, k) for k in expected} == expected


@pytest.mark.parametrize("changes, words", [
    (dict(dataset=""), "No dataset chosen"),
    (dict(dataset=None), "No dataset chosen"),
    (dict(dataset="/nowhere/rows.jsonl"), "is gone"),
    (dict(learning_rate=None), "learning_rate: fill in a value"),
    (dict(learning_rate=0), "learning_rate=0.0: must be positive"),
    (dict(epochs=0), "epochs=0.0"),
    (dict(scheduler="step"), "scheduler='step'"),
    (dict(choice=MethodChoice(precision="int3")), "precision='int3'"),
    (dict(save_every=-1), "save_every=-1"),
    (dict(choice=MethodChoice(method="magic")), "unknown method 'magic'"),
    (dict(choice=MethodChoice(method_args={"r": 0})), "r=0"),
    (dict(choice=MethodChoice(method_args={"rank": 8})), "no setting(s) rank"),
    (dict(grad_accum=None), "grad_accum: fill in a value"),
    (dict(grad_accum=0), "grad_accum=0: must be at least 1"),
    (dict(gpus=-1), "gpus=-1: must be at least 1"),
    (dict(gpus=2, strategy="zero"), "strategy='zero': choose one of ddp, fsdp"),
    (dict(assistant_turns="first"), "assistant_turns='first': choose one of all, last"),
])
def test_bad_inputs_give_a_message_and_create_nothing(sup, store, dataset, changes, words):
    values = inputs(dataset, **changes)
    message, run_id = tab.start_run(sup, Path("/models"), values)
    assert run_id is None and message.startswith("**Not started.**") and words in message
    assert history.list_runs(store) == []
    assert words in tab.preview(values, store.root)


def test_start_records_estimate_and_a_second_start_queues(sup, store, dataset):
    message, first = tab.start_run(sup, Path("/models"), inputs(dataset))
    assert message == f"Starting **{first}**."
    assert store.config(first).estimate == {"total_bytes": 8e6}
    sup.tick()
    message, second = tab.start_run(sup, Path("/models"), inputs(dataset, seed=7))
    assert "queued" in message.lower() and "1 run(s) ahead" in message
    assert store.status(second).state == QUEUED


@pytest.mark.parametrize("action, start_state, words", [
    (Supervisor.stop, COMPLETED, "**Not done.**"),
    (Supervisor.resume, RUNNING, "**Not done.**"),
    (Supervisor.cancel, QUEUED, "Cancelled"),
    (Supervisor.delete, RUNNING, "stop it first"),
])
def test_actions_report_in_words(sup, store, action, start_state, words):
    run_id = store.create(RunConfig(dataset="x"))
    store.update_status(run_id, state=start_state)
    assert words in tab.act(action, sup, run_id, "Cancelled **{run_id}**.")
    assert tab.act(action, sup, None, "") == "Choose a run first."
    assert "**Not done.**" in tab.act(action, sup, "no-such-run", "")


BASE = RunConfig(dataset="x", method_args={"r": 8})


def shown(**settings) -> dict:
    """An estimate as the Method tab hands it over (MemoryEstimate.to_dict): the inputs it was made from, then its
    figures; made for BASE changed by `settings`."""
    made = asdict(memory.inputs_for_config(replace(BASE, **settings), Path("/models")))
    del made["models_dir"]
    return {**made, "total_bytes": 1.0, "shape": (1, 2)}


@pytest.mark.parametrize("given, broken, expected, computed", [
    (shown(), False, 1.0, 0),  # made for these very settings: recorded as shown, not computed again
    (shown(), True, 1.0, 0),
    (shown(grad_accum=2), False, 8e6, 1),  # made for other settings: this run's own is computed
    (shown(method_args={"r": 16}), False, 8e6, 1),
    (shown(gpus=2, strategy="fsdp"), False, 8e6, 1),
    ({"total_bytes": 1.0}, False, 8e6, 1),  # says nothing of the settings it was made for
    (None, False, 8e6, 1),  # nothing handed over: the quick demo
    ("garbage", False, 8e6, 1),
    (shown(grad_accum=2), True, None, 1),  # another run's figure is never recorded as this one's
    (None, True, None, 1),  # a failed estimate leaves the run without one; it still starts
])
def test_attach_estimate_keeps_the_one_shown_for_the_same_settings(monkeypatch, quick_estimate, given, broken,
                                                                    expected, computed):
    if broken:
        def broken_estimator(config, models_dir):
            quick_estimate.append(config)
            raise RuntimeError("no config for this model")

        monkeypatch.setattr(memory, "estimate_for_config", broken_estimator)
    config = replace(BASE)
    attach_estimate(config, Path("/models"), given)
    assert len(quick_estimate) == computed
    assert (config.estimate or {}).get("total_bytes") == expected
    if computed == 0:
        assert config.estimate["shape"] == [1, 2]  # through JSON: safe YAML has no tuples
    assert RunConfig.from_dict(yaml.safe_load(config.to_yaml())).estimate == config.estimate


def test_the_method_tabs_estimate_is_the_one_the_run_keeps(quick_estimate, sup, store, models_dir, dataset):
    from components import method_tab

    *_, choice = method_tab.estimate_view(str(models_dir), "config:smollm2-135m", "sft", "lora", "auto", "adamw", False, 4, 256,
                                          2, {"r": 16})
    assert choice.estimate["grad_accum"] == 2 and choice.method_args == {"r": 16}
    values = inputs(dataset, model="config:smollm2-135m", grad_accum=2, choice=choice)
    _, run_id = tab.start_run(sup, models_dir, values)
    assert store.config(run_id).estimate == json.loads(json.dumps(choice.estimate)) and quick_estimate == []
    # the Train tab changed a setting the estimate depends on: the run's own estimate is computed
    _, other = tab.start_run(sup, models_dir, replace(values, grad_accum=4))
    assert store.config(other).estimate == {"total_bytes": 16e6} and len(quick_estimate) == 1


@pytest.mark.parametrize("estimate, device, expected", [
    ({"total_bytes": 3e9, "comparable_peak_bytes": {"cuda": 2.5e9, "cpu": 1e9}}, "cpu", 1e9),
    ({"total_bytes": 3e9, "comparable_peak_bytes": {"cuda": 2.5e9, "cpu": 1e9}}, "cuda", 2.5e9),
    ({"total_bytes": 3e9, "comparable_peak_bytes": {"cuda": 2.5e9, "cpu": 1e9}}, "", 3e9),
    ({"total_bytes": 3e9, "comparable_peak_bytes": "odd"}, "cpu", 3e9),
    ({"total_bytes": "3 GB"}, "", None),
    (None, "cpu", None),
    ("garbage", "", None),
])
def test_estimate_figure_matches_the_measured_device(estimate, device, expected):
    assert history.estimated_bytes(estimate, device) == expected


@pytest.mark.parametrize("gpus, strategy, launcher", [
    (1, "ddp", f"{sys.executable} "),
    (2, "ddp", f"{sys.executable} -m accelerate.commands.launch --multi_gpu --num_processes 2 "),
    (4, "fsdp", f"{sys.executable} -m accelerate.commands.launch --multi_gpu --num_processes 4 "),
])
def test_preview_shows_the_yaml_and_the_command(store, dataset, gpus, strategy, launcher):
    text = tab.preview(inputs(dataset, gpus=gpus, strategy=strategy), store.root)
    assert f"launch.py train {store.root}/RUN_ID/run.yaml" in text
    command = next(line for line in text.splitlines() if "launch.py train" in line)
    assert f"&& {launcher}" in command and ("--main_process_port" in command) == (gpus > 1)
    config = RunConfig.from_dict(yaml.safe_load(text))
    assert (config.dataset, config.gpus, config.strategy) == (dataset, gpus, strategy)


def test_live_view_shows_the_command_the_supervisor_runs(store):
    run_id = store.create(RunConfig(dataset="x", gpus=2))
    store.update_status(run_id, state=RUNNING)
    command = tab.live_view(store, {run_id: store.status(run_id)}, run_id)[4]
    assert command.endswith(shlex.join(jobs.train_command(store.config_path(run_id))))
    assert "--num_processes 2" in command


@pytest.mark.parametrize("gpus, strategy, words", [
    (2, "ddp", "with 2 GPUs under DDP: each GPU holds a full copy"),
    (4, "fsdp", "with 4 GPUs under FSDP: the weights, gradients and optimizer state are split 4 ways"),
])
def test_per_gpu_memory_text(monkeypatch, models_dir, dataset, gpus, strategy, words):
    monkeypatch.setattr(memory, "estimate_for_config", REAL_ESTIMATE)
    monkeypatch.setattr(tab, "detect_device", lambda: DeviceInfo("cuda", "Test GPU", 80 * 2**30, 80 * 2**30))
    values = inputs("", model="config:llama-3.1-8b", gpus=gpus, strategy=strategy,
                    choice=MethodChoice(method="full", precision="bf16"))
    text = tab.per_gpu_text(values, models_dir)
    per_gpu = REAL_ESTIMATE(values.to_config(), models_dir).gpu.total_bytes
    assert text.startswith(f"**Memory per GPU: {memory.gib(per_gpu)}.**") and words in text and "Test GPU" in text
    bad = tab.per_gpu_text(replace(values, choice=MethodChoice(method_args={"r": 0})), models_dir)
    assert "cannot be estimated" in bad and "r=0" in bad


def test_start_records_the_per_gpu_estimate(monkeypatch, sup, store, models_dir, dataset):
    monkeypatch.setattr(memory, "estimate_for_config", REAL_ESTIMATE)
    _, run_id = tab.start_run(sup, models_dir, inputs(dataset, model="config:smollm2-135m", gpus=2, strategy="fsdp"))
    config = store.config(run_id)
    assert (config.gpus, config.strategy) == (2, "fsdp")
    assert (config.estimate["gpu"]["gpus"], config.estimate["gpu"]["strategy"]) == (2, "fsdp")


@pytest.mark.parametrize("detected, visible, maximum", [(0, False, 2), (1, False, 2), (2, True, 2), (8, True, 8)])
def test_gpu_controls_only_with_more_than_one_gpu(monkeypatch, workspace, detected, visible, maximum):
    from components.shared import Shared

    monkeypatch.setattr(tab, "gpu_count", lambda: detected)
    monkeypatch.setattr(tab, "start_supervisor", lambda ws: Supervisor(RunStore(ws.runs)))
    with gr.Blocks() as page:
        shared = Shared(workspace=workspace, model=gr.Dropdown(["embedded"], value="embedded"),
                        cutoff_len=gr.Slider(32, 4096, value=256), batch_size=gr.Slider(1, 64, value=4),
                        grad_accum=gr.Slider(1, 64, value=1, render=False), dataset=gr.State(""),
                        val_dataset=gr.State(None), val_split=gr.Slider(0, 0.5, value=0.1),
                        method_choice=gr.State(MethodChoice()), system_prompt=gr.Textbox())
        tab.build(shared)
    sliders = [c for c in page.blocks.values() if isinstance(c, gr.Slider) and c.label == "GPUs"]
    radios = [c for c in page.blocks.values() if isinstance(c, gr.Radio) and c.label == "Strategy"]
    group = [c for c in page.blocks.values() if isinstance(c, gr.Accordion) and c.label.startswith("GPUs")]
    assert len(sliders) == len(radios) == len(group) == 1
    assert group[0].visible is visible and sliders[0].maximum == maximum
    assert sliders[0].value == (detected if visible else 1) and radios[0].value == "ddp"
    assert [v for _, v in radios[0].choices] == ["ddp", "fsdp"]


CONVERSATION = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]}


@pytest.mark.parametrize("control, data, visible", [
    ("train_on_prompt", "instruction rows", True),
    ("train_on_prompt", "conversations", True),
    ("assistant_turns", "instruction rows", False),  # one answer a row: nothing to choose
    ("assistant_turns", "conversations", True),
    ("assistant_turns", "none chosen", True),  # shown until the data says otherwise
    ("assistant_turns", "a file that is gone", False),
])
def test_optional_controls_show_for_the_objective_and_the_data(tmp_path, dataset, control, data, visible):
    path = {"instruction rows": dataset, "none chosen": None, "a file that is gone": str(tmp_path / "gone.jsonl"),
            "conversations": str(tmp_path / "chats.jsonl")}[data]
    (tmp_path / "chats.jsonl").write_text(json.dumps(CONVERSATION) + "\n")
    assert tab.on_objective(control, MethodChoice(), path)["visible"] is visible


# --- the live view -------------------------------------------------------------------------------------------
def make_run(store, state, **status):
    run_id = store.create(RunConfig(dataset="x", estimate={"total_bytes": 2e9}))
    store.update_status(run_id, state=state, **status)
    return run_id


@pytest.mark.parametrize("state, status, words", [
    (QUEUED, {}, "Waiting in the queue (position 1 of 1)"),
    (RUNNING, dict(step=5, total_steps=10), "Closing or reloading the page does not stop it"),
    (COMPLETED, dict(peak_memory_bytes=1e9, device="cpu"), "measured peak 1.00 GB (50% of the estimate)"),
    (COMPLETED, dict(peak_memory_bytes=1e9), "estimated 2.00 GB before the run, measured peak 1.00 GB."),
    (FAILED, dict(failure="oom", reason="CUDA out of memory at step 3.", peak_memory_bytes=3e9),
     "It ran out of memory. CUDA out of memory at step 3."),
    (FAILED, dict(failure="oom"), "lower the batch size"),
    (FAILED, dict(failure="killed", reason="Killed by SIGKILL."), "The training process died. Killed by SIGKILL."),
    (INTERRUPTED, {}, "No checkpoint was saved yet, so Resume starts it again"),
    (STOPPED, dict(step=4), "Stopped at step 4."),
])
def test_live_view_says_what_happened(store, state, status, words):
    run_id = make_run(store, state, **status)
    store.log_path(run_id).write_text("line 1\nTraceback: boom\n")
    store.append_metric(run_id, {"step": 1, "loss": 2.0, "lr": 1e-4, "elapsed": 1.0, "tokens_per_s": 50.0})
    text, progress, figure, log, command = tab.live_view(store, {run_id: store.status(run_id)}, run_id)
    assert words in text
    assert "Traceback: boom" in log
    assert "launch.py train" in command and run_id in command
    assert "50 tokens/s" in progress
    assert [t.name for t in figure.data] == ["train loss", "train loss (smoothed)", "learning rate"]


def test_live_view_of_a_broken_or_missing_run(store):
    run_id = make_run(store, COMPLETED)
    store.config_path(run_id).write_text(": : :")
    text, *_ = tab.live_view(store, {}, run_id)
    assert "damaged" in text and "run.yaml" in text
    assert tab.live_view(store, {}, None)[0] == tab.NO_RUN


@pytest.mark.parametrize("states, selected, follow, expected", [
    ({"a": COMPLETED, "b": RUNNING, "c": QUEUED}, "a", True, "b"),
    ({"a": COMPLETED, "b": QUEUED, "c": QUEUED}, None, True, "b"),
    ({"a": COMPLETED, "b": STOPPED}, None, True, "b"),  # nothing active: the newest
    ({"a": COMPLETED, "b": RUNNING}, "a", False, "a"),  # a pick by hand stays
    ({"a": COMPLETED, "b": RUNNING}, "gone", False, "b"),
    ({}, "gone", True, None),
])
def test_the_view_follows_the_active_run(states, selected, follow, expected):
    statuses = {name: RunStatus(state=s, created=i, queued_at=i) for i, (name, s) in enumerate(states.items())}
    assert tab.choose_run(statuses, selected, follow) == expected


def test_timer_redraws_only_when_something_changed(sup, store):
    run_id = make_run(store, RUNNING, total_steps=4)
    first = tab.refresh_live(sup, None, True, None)
    assert first[0]["value"] == run_id and "Training now:** " + run_id in first[1]
    again = tab.refresh_live(sup, None, True, first[-1])
    assert all(isinstance(x, type(gr.skip())) for x in again)
    store.append_metric(run_id, {"step": 1, "loss": 1.0})
    changed = tab.refresh_live(sup, None, True, first[-1])
    assert isinstance(changed[0], type(gr.skip()))  # same runs, same pick: the dropdown is left alone
    assert [t.name for t in changed[4].data][:1] == ["train loss"]


@pytest.mark.parametrize("name, step", [
    ("step-12", 12), ("step-0", 0), ("step-007", 7),
    ("step-", None), ("step-x", None), ("step-1-2", None), ("steps-3", None), ("step-\u00b2", None), ("12", None),
    ("", None),
])
def test_checkpoint_step(name, step):
    assert checkpoint_step(Path("runs/r/checkpoints") / name) == step


@pytest.mark.parametrize("folders, last", [
    ({}, None),
    ({"step-2": True, "step-10": True}, 10),  # by number, not by name
    ({"step-2": True, "step-10": False}, 2),  # cut short: no completion marker
    ({"step-2": True, "step-x": True}, 2),  # not a checkpoint's name
])
def test_last_checkpoint(store, folders, last):
    run_id = make_run(store, STOPPED)
    for name, complete in folders.items():
        folder = store.checkpoints_dir(run_id) / name
        folder.mkdir(parents=True)
        if complete:
            (folder / "COMPLETE").write_text("")
    assert history.last_checkpoint(store, run_id) == last


@pytest.mark.parametrize("change, redraw", [
    (lambda store, run_id: None, False),
    (lambda store, run_id: store.append_metric(run_id, {"step": 1, "loss": 1.0}), True),
    (lambda store, run_id: store.update_status(run_id, step=1), True),
    (lambda store, run_id: store.log_path(run_id).write_text("line"), True),
    (lambda store, run_id: (store.checkpoints_dir(run_id) / "step-1").mkdir(parents=True), False),  # not shown
])
def test_run_signature_changes_with_what_the_live_view_shows(store, change, redraw):
    run_id = make_run(store, RUNNING)
    before = history.run_signature(store, run_id)
    assert before[1:] == (None, None)  # no metrics or log yet
    change(store, run_id)
    assert (history.run_signature(store, run_id) != before) == redraw


def test_store_signature_changes_when_a_run_is_added_written_or_removed(store):
    empty = history.store_signature(store)
    assert empty == ()
    run_id = make_run(store, QUEUED)
    added = history.store_signature(store)
    assert added != empty and history.store_signature(store) == added
    store.append_metric(run_id, {"step": 1, "loss": 1.0})
    assert history.store_signature(store) != added
    store.delete(run_id)
    assert history.store_signature(store) == empty


def test_start_on_the_real_page_reads_every_control(monkeypatch, workspace, dataset):
    from components import ui

    monkeypatch.setattr(ui, "model_summary", lambda ref, ws: "")  # the embedded model's config is slow to read
    monkeypatch.setattr(tab, "start_supervisor", lambda ws: Supervisor(RunStore(ws.runs)))
    page = ui.build_ui(workspace)
    start = next(b for b in page.blocks.values() if isinstance(b, gr.Button) and b.value == "Start")
    (event,) = [fn for fn in page.fns.values() if (start._id, "click") in fn.targets]
    labelled = {getattr(c, "label", None): c for c in event.inputs}
    chosen = {labelled["Gradient accumulation"]: 3, labelled["Learning rate"]: 1e-5,
              labelled["System prompt"]: "Be brief.", labelled["Assistant turns learned"]: "last"}
    for c in event.inputs:  # the two states a page fills in: the Data tab's dataset, the Method tab's choice
        if isinstance(c.value, MethodChoice):
            chosen[c] = MethodChoice(method="full", precision="fp32")
        elif isinstance(c, gr.State) and c.value == "":
            chosen[c] = dataset
    message, follow = event.fn({c: chosen.get(c, c.value) for c in event.inputs})
    assert message.startswith("Starting") and follow is True
    (run_id,) = RunStore(workspace.runs).list_ids()
    config = RunStore(workspace.runs).config(run_id)
    assert (config.dataset, config.grad_accum, config.learning_rate, config.method, config.precision) == (
        dataset, 3, 1e-5, "full", "fp32")
    assert (config.batch_size, config.cutoff_len, config.val_split, config.gpus) == (4, 256, 0.1, 1)
    assert (config.system_prompt, config.assistant_turns) == ("Be brief.", "last")


# --- runs list and diff --------------------------------------------------------------------------------------
@pytest.mark.parametrize("a, b, expected", [
    (dict(), dict(), []),
    (dict(learning_rate=1e-4), dict(learning_rate=3e-4), [("learning_rate", 1e-4, 3e-4)]),
    (dict(method_args={"r": 16}), dict(), [("method_args.r", 16, 8)]),  # a default counts as its value
    (dict(method_args={"r": 8}), dict(), []),
    (dict(seed=1, train_on_prompt=True), dict(seed=2), [("seed", 1, 2), ("train_on_prompt", True, False)]),
    (dict(method="full"), dict(), [("method", "full", "lora")] + [  # full has no arguments; LoRA's defaults show
        (f"method_args.{k}", None, v) for k, v in sorted(asdict(get_method("lora").make_args({})).items())]),
    (dict(estimate={"total_bytes": 1}, run_id="x"), dict(run_id="y"), []),  # not settings
])
def test_settings_diff_lists_only_what_differs(a, b, expected):
    assert history.settings_diff(RunConfig(**a), RunConfig(**b)) == expected


def test_diff_table_and_runs_table(store):
    a = store.create(RunConfig(dataset="x", learning_rate=1e-4))
    b = store.create(RunConfig(dataset="x", learning_rate=3e-4))
    broken = store.create(RunConfig(dataset="x"))
    store.config_path(broken).write_text("[[[")
    message, table = tab.diff_table(store, a, b)
    assert message == "1 setting(s) differ." and table.values.tolist() == [["learning_rate", "0.0001", "0.0003"]]
    assert "garbled" in tab.diff_table(store, a, broken)[0]
    assert tab.diff_table(store, a, a)[0] == "These two runs have the same settings."
    runs = tab.runs_table(history.list_runs(store))
    assert set(runs["run"]) == {a, b, broken}
    assert runs.set_index("run").loc[broken, "state"].startswith("broken")
    assert len(tab.overlay_runs(store, [a, b, "gone"]).data) == 0  # no steps logged yet: an empty chart


# --- sweeps --------------------------------------------------------------------------------------------------
def test_sweep_queues_one_run_per_rank_with_everything_else_equal(sup, store, dataset):
    message, name = tab.start_sweep(sup, Path("/models"), inputs(dataset), [16, 4, 8], "ranks")
    assert name == "ranks" and "3 runs (r = 4, 8, 16)" in message
    configs = [store.config(i) for i in store.list_ids()]
    assert sorted(c.method_args["r"] for c in configs) == [4, 8, 16]
    assert all(c.sweep == "ranks" for c in configs)
    for other in configs[1:]:
        assert [d[0] for d in history.settings_diff(configs[0], other)] == ["method_args.r"]
    assert sorted(c.estimate["total_bytes"] for c in configs) == [4e6, 8e6, 16e6]  # each r its own estimate
    assert "exists already" in tab.start_sweep(sup, Path("/models"), inputs(dataset), [4, 8], "ranks")[0]


@pytest.mark.parametrize("settings, ranks, name, words", [
    ({"method": "full"}, [4, 8], "s", "has no rank r to sweep"),
    ({"method": "lora"}, [8], "s", "at least two"),
    ({"method": "lora"}, [8, 8], "s", "at least two"),
    ({"method": "lora"}, [], "s", "at least two"),
    ({"method": "lora"}, [0, 8], "s", "at least 1"),
    ({"method": "lora"}, [4, 8], "../etc", "sweep name"),
])
def test_bad_sweeps_create_nothing(sup, store, dataset, settings, ranks, name, words):
    values = inputs(dataset, choice=MethodChoice(**settings))
    message, result = tab.start_sweep(sup, Path("/models"), values, ranks, name)
    assert result is None and words in message and store.list_ids() == []


def write_adapter(folder: Path, shapes: dict[str, list[int]]) -> int:
    header = json.dumps({k: {"dtype": "F32", "shape": s, "data_offsets": [0, 0]} for k, s in shapes.items()}).encode()
    folder.mkdir(parents=True)
    (folder / "adapter_model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 64)
    (folder / "tokenizer.json").write_text("{}" * 1000)  # not counted as adapter size
    return 8 + len(header) + 64


def test_sweep_table(store):
    ids = []
    for r, loss in ((4, 2.0), (8, 1.5)):
        run_id = store.create(RunConfig(dataset="x", method_args={"r": r}, sweep="s", estimate={"total_bytes": 1e9}))
        store.update_status(run_id, state=COMPLETED, started=100.0, finished=160.0, peak_memory_bytes=8e8)
        store.append_metric(run_id, {"step": 1, "loss": loss, "elapsed": 10.0})
        store.append_metric(run_id, {"step": 1, "eval_loss": loss + 0.1})
        ids.append(run_id)
    size = write_adapter(store.final_dir(ids[1]), {"a": [8, 64], "b": [64, 8]})
    store.create(RunConfig(dataset="x", sweep="other"))
    figure, table = tab.sweep_view(store, "s")
    assert [t.name for t in figure.data] == ["r=4 train", "r=4 validation", "r=8 train", "r=8 validation"]
    rows = table.set_index("r")
    assert rows.loc[8, "trainable params"] == "1,024" and rows.loc[4, "trainable params"] == "–"
    assert rows.loc[8, "adapter size"] == history.fmt_bytes(size)
    assert rows.loc[4, "val loss"] == "2.1000" and rows.loc[8, "train loss"] == "1.5000"
    assert rows.loc[4, "training time"] == "10 s"
    assert (rows.loc[4, "memory estimated"], rows.loc[4, "memory measured"]) == ("1.00 GB", "800.00 MB")
    assert sweeps.sweep_names(store) == ["other", "s"]


@pytest.mark.parametrize("content", [b"", b"\x05\x00", struct.pack("<Q", 10) + b"{not json}", struct.pack("<Q", 99)])
def test_damaged_adapter_file_is_not_a_crash(tmp_path, content):
    (tmp_path / "adapter_model.safetensors").write_bytes(content)
    assert sweeps.weights_facts(tmp_path) == (None, None)


# --- progress, status words and plots ------------------------------------------------------------------------
@pytest.mark.parametrize("elapsed, state, total, eta", [
    ([(1, 1.0), (2, 2.0), (3, 3.0)], RUNNING, 10, 7.0),
    ([(1, 1.0), (2, 2.0), (3, 0.5), (4, 2.5)], RUNNING, 10, 12.0),  # a resume restarted the clock: 2 s/step since
    ([(1, 1.0), (2, 2.0)], COMPLETED, 10, None),
    ([(1, 1.0)], RUNNING, 10, None),
])
def test_eta_from_recent_steps(elapsed, state, total, eta):
    c = history.curves([{"step": s, "loss": 1.0, "elapsed": e} for s, e in elapsed])
    assert history.progress(RunStatus(state=state, total_steps=total), c).eta_s == eta


@pytest.mark.parametrize("elapsed, expected", [
    ([10.0, 20.0, 30.0], 30.0), ([10.0, 20.0, 5.0, 15.0], 35.0), ([], 60.0),
])
def test_training_seconds_add_up_over_resumes(elapsed, expected):
    c = history.curves([{"step": i + 1, "loss": 1.0, "elapsed": e} for i, e in enumerate(elapsed)])
    assert history.training_seconds(RunStatus(started=100.0, finished=160.0), c) == expected


@pytest.mark.parametrize("seconds, text", [(None, "–"), (5.4, "5 s"), (125, "2 min 05 s"), (3 * 3600 + 60, "3 h 01 min")])
def test_fmt_duration(seconds, text):
    assert history.fmt_duration(seconds) == text


@pytest.mark.parametrize("values, weight, expected", [
    ([2.0, 2.0, 2.0], 0.9, [2.0, 2.0, 2.0]),  # de-biased: a flat curve stays flat from the first point
    ([1.0, None, 3.0], 0.5, [1.0, None, pytest.approx(7 / 3)]),
    ([1.0, float("nan"), 1.0], 0.5, [1.0, None, 1.0]),
    ([4.0, 0.0], 0.0, [4.0, 0.0]),
    ([], None, []),
])
def test_smooth(values, weight, expected):
    assert plots.smooth(values, weight) == expected


@pytest.mark.parametrize("weight", [1.0, -0.1])
def test_smooth_refuses_a_weight_outside_0_1(weight):
    with pytest.raises(ValueError, match="weight"):
        plots.smooth([1.0], weight)


@pytest.mark.parametrize("train, evals, lr, names", [
    ([(1, 2.0), (2, 1.0)], [], [], ["train loss", "train loss (smoothed)"]),
    ([(1, 2.0)], [(1, 2.5)], [(1, 1e-4)], ["train loss", "train loss (smoothed)", "validation loss", "learning rate"]),
    ([], [(5, 1.0)], [], ["validation loss"]),
    ([], [], [(1, 1e-4)], []),  # a learning rate alone is not a curve yet
])
def test_loss_figure(train, evals, lr, names):
    figure = plots.loss_figure(train, evals, lr)
    assert [t.name for t in figure.data] == names
    if lr and names:
        assert figure.data[-1].yaxis == "y2"
    if not names:
        assert "Waiting" in figure.layout.annotations[0].text


def test_overlay_figure_gives_each_run_one_colour():
    figure = plots.overlay_figure({"a": ([(1, 2.0)], [(1, 2.2)]), "b": ([(1, 1.0)], []), "c": ([], [])})
    assert [t.name for t in figure.data] == ["a train", "a validation", "b train"]
    assert figure.data[0].line.color == figure.data[1].line.color != figure.data[2].line.color
    assert plots.overlay_figure({"c": ([], [])}).layout.annotations


@pytest.mark.parametrize("last_step, dtick", [(4, 1), (12, 1), (13, None), (500, None)])
def test_short_runs_get_whole_step_ticks(last_step, dtick):
    train = [(s, 1.0) for s in range(1, last_step + 1)]
    assert plots.loss_figure(train).layout.xaxis.dtick == dtick
    assert plots.overlay_figure({"a": (train, [])}).layout.xaxis.dtick == dtick


@pytest.mark.parametrize("knobs, started", [({"r": 16}, True), ({"r": 0}, False), ({"r": None}, False)])
def test_start_refuses_settings_the_method_tab_said_cannot_work(sup, store, models_dir, dataset, knobs, started):
    """Before, a refused setting left the method's defaults in the choice, and Start trained with those."""
    from components import method_tab

    view = method_tab.estimate_view(str(models_dir), "config:smollm2-135m", "sft", "lora", "auto", "adamw", False, 4,
                                    256, 1, knobs)
    message, run_id = tab.start_run(sup, models_dir, inputs(dataset, choice=view[5]))
    assert (run_id is not None) == started, message
    if not started:
        assert message.startswith("**Not started.** The Method & Memory tab says these settings cannot work: r=")
        assert store.list_ids() == []
