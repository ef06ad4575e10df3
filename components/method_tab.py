"""The Method & Memory tab: pick a method and its settings, see the trainable parameters and the memory it needs, live."""
from __future__ import annotations

from dataclasses import MISSING, asdict, fields, replace
from typing import Any

import gradio as gr

from app.memory import estimate as memory
from app.memory import figures
from app.memory.device import detect_device
from app import methods
from app.handoff import MethodChoice
from app.methods import METHODS, MethodError
from app.objectives import DEFAULT as DEFAULT_OBJECTIVE
from app.objectives import OBJECTIVES, get_objective
from app.models import ModelError
from app.presets import load_preset
from app.spec import ConfigError, RunConfig
from components.shared import Shared

RUN_DEFAULTS = {f.name: f.default for f in fields(RunConfig)}  # what a preset leaves unsaid

PRECISION_CHOICES = [
    ("auto: bf16 on a GPU that has it, else fp32", "auto"),
    ("fp32: full precision", "fp32"),
    ("bf16: weights in bf16", "bf16"),
    ("bf16-mixed: fp32 master weights, bf16 compute", "bf16-mixed"),
    ("fp16: fp16 compute, for GPUs without bf16", "fp16"),
]
OPTIMIZER_CHOICES = [
    ("AdamW: the default", "adamw"),
    ("8-bit AdamW: about a quarter of AdamW's state memory", "adamw8bit"),
    ("SGD with momentum: half of AdamW's state, learns slower", "sgd"),
]


def knob_fields() -> dict[str, Any]:
    """Every setting of every method, once per name (same name, same meaning): name -> dataclass field."""
    knobs: dict[str, Any] = {}
    for spec in METHODS.values():
        for f in fields(spec.args):
            knobs.setdefault(f.name, f)
    return knobs


def knob_widget(f, value: Any, visible: bool) -> gr.components.Component:
    """A typed control from a setting's metadata; shown only while a method that has it is chosen."""
    meta = f.metadata
    default = value if visible else (f.default if f.default is not MISSING else None)
    common = dict(label=meta.get("label", f.name), info=meta.get("info"), visible=visible)
    if isinstance(default, bool):
        return gr.Checkbox(value=default, **common)
    if "choices" in meta:
        return gr.Dropdown(choices=meta["choices"], value=default, allow_custom_value=meta.get("custom", False), **common)
    if "minimum" in meta:
        return gr.Slider(meta["minimum"], meta["maximum"], value=default, step=meta.get("step", 1), **common)
    return gr.Number(value=default, **common)


def method_values(method: str) -> dict[str, Any]:
    """The method's settings as its preset has them (over the dataclass defaults), and the preset's run settings."""
    try:
        preset = load_preset(method)
        settings = RunConfig.from_dict(preset).method_settings
    except ConfigError:  # no preset, or one that is not a valid config: the method's own defaults
        preset, settings = {}, methods.get_method(method).args()
    return {"args": asdict(settings), "preset": preset}


def changed_args(method: str, values: dict[str, Any]) -> dict[str, Any]:
    """The method's settings from the controls, checked, keeping only what differs from its defaults."""
    spec = methods.get_method(method)
    chosen = asdict(spec.make_args({k: v for k, v in values.items() if k in spec.knobs()}))
    defaults = asdict(spec.args())
    return {k: v for k, v in chosen.items() if v != defaults[k]}


def summary_text(estimate: memory.MemoryEstimate) -> str:
    spec = methods.get_method(estimate.inputs.method)
    text = (f"**{spec.label}.** {spec.description}\n\n"
            f"### {estimate.trainable:,} trainable parameters\n"
            f"{estimate.trainable_share:.3%} of {estimate.total_params:,}, counted exactly from the model's shapes.")
    if estimate.trainable == 0:
        text += (f"\n\n**Nothing to train:** {spec.label} finds no parameters it could train in this model, so a run "
                 f"would refuse to start. Choose another method or another model.")
    return text


def terms_table(estimate: memory.MemoryEstimate) -> str:
    rows = ["| term | GPU | CPU RAM | how |", "|---|---:|---:|---|"]
    keys = list(dict.fromkeys(t.key for bd in (estimate.gpu, estimate.cpu) for t in bd.terms))
    for key in keys:
        found = [next((t for t in bd.terms if t.key == key), None) for bd in (estimate.gpu, estimate.cpu)]
        cells = [memory.gib(t.bytes) if t else "–" for t in found]
        notes = list(dict.fromkeys(t.note for t in found if t))  # the CPU's own words only where they differ
        how = notes[0] if len(notes) == 1 else f"GPU: {notes[0]}; CPU: {notes[1]}"
        label = next(t.label for t in found if t)
        rows.append(f"| {label} | {cells[0]} | {cells[1]} | {how} |")
    rows.append(f"| **Total** | **{memory.gib(estimate.gpu.total_bytes)}** | **{memory.gib(estimate.cpu.total_bytes)}** | "
                f"GPU: {estimate.gpu.precision}; CPU: {estimate.cpu.precision} |")
    when = {"backward": "at the start of backward, with every activation alive",
            "update": "during the optimizer's update, after the activations are freed",
            "loading": "while the checkpoint loads, before training starts"}
    notes = f"\n\nThe GPU peak comes {when[estimate.gpu.peak]}; the CPU peak {when[estimate.cpu.peak]}."
    notes += "".join(f"\n\n*{n}*" for n in estimate.notes)
    return "\n".join(rows) + notes


def estimate_view(models_dir: str, model: str, objective: str, method: str, precision: str, optimizer: str,
                  checkpointing: bool, batch: float, cutoff: float, grad_accum: float, knob_values: dict[str, Any]):
    """(summary, verdict, this run's figure, every method's figure, terms table, the choice for the Train tab)."""
    choice = MethodChoice(objective=objective or DEFAULT_OBJECTIVE, method=method, precision=precision,
                          optimizer=optimizer, grad_checkpointing=bool(checkpointing))
    try:
        choice = replace(choice, method_args=changed_args(method, knob_values))
        inputs = memory.EstimateInputs(
            objective=choice.objective, model=model or "embedded", method=method, method_args=choice.method_args,
            batch_size=int(batch),
            seq_len=int(cutoff), precision=precision, optimizer=optimizer, grad_checkpointing=bool(checkpointing),
            grad_accum=int(grad_accum), models_dir=models_dir,
        )
        estimate = memory.estimate_memory(inputs)
        device = detect_device()
        verdict = memory.verdict(estimate, device)
        others = memory.every_method(inputs)
    except (MethodError, memory.EstimateError, ModelError, TypeError, ValueError) as e:  # TypeError: an emptied box
        # a model that cannot be read here may still load in the worker; settings that cannot work never train
        if not isinstance(e, ModelError):
            choice = replace(choice, problem=str(e))
        return f"**These settings cannot work:** {e}", "", None, None, "", choice
    choice = replace(choice, estimate=estimate.to_dict())
    where = device.name if device.kind == "cuda" else f"{device.name}; the GPU column is for when you have one"
    verdict_text = f"### {verdict.text}\n{where}: {memory.gib(device.free_bytes)} free of {memory.gib(device.total_bytes)}."
    return (summary_text(estimate), verdict_text, figures.breakdown_figure(estimate),
            figures.methods_figure(others, method, device.kind), terms_table(estimate), choice)


def build(shared: Shared) -> None:
    models_dir = str(shared.workspace.models)
    knobs = knob_fields()
    first = method_values("lora")["args"]  # a fresh page starts on LoRA, set as its preset has it
    with gr.Row():
        with gr.Column(scale=2):
            objective = gr.Dropdown(
                choices=[(o.label, name) for name, o in OBJECTIVES.items()], value=DEFAULT_OBJECTIVE,
                label="What the model learns", info=get_objective(DEFAULT_OBJECTIVE).description,
            )
            method = gr.Dropdown(
                choices=[(spec.label, name) for name, spec in METHODS.items()], value="lora", label="Method",
                info="How the model learns. LoRA is a good start; QLoRA when memory is short; full for the most change.",
            )
            controls = {name: knob_widget(f, first.get(name), name in first) for name, f in knobs.items()}
            precision = gr.Dropdown(choices=PRECISION_CHOICES, value="auto", label="Precision",
                                    info="Number format while training: half precision (bf16) halves most memory.")
            optimizer = gr.Dropdown(choices=OPTIMIZER_CHOICES, value="adamw", label="Optimizer",
                                    info="What keeps the running averages that steer each update.")
            checkpointing = gr.Checkbox(value=False, label="Gradient checkpointing",
                                        info="Recompute activations during backward: far less memory, about 30% slower.")
            shared.batch_size.render()
            gr.Markdown("The sequence length used here is the **cutoff length** set in the Data tab, and the "
                        "**gradient accumulation** the one set in the Train tab.")
        with gr.Column(scale=3):
            summary = gr.Markdown()
            verdict = gr.Markdown()
            with gr.Row():
                this_run = gr.Plot(label="Memory for these settings")
                all_methods = gr.Plot(label="Every method, same model, batch and length")
            with gr.Accordion("How each term is computed", open=False):
                table = gr.Markdown()

    names = list(controls)

    def show_method(chosen: str):
        """The chosen method's controls set as its preset has them, and its precision, optimizer and checkpointing."""
        values = method_values(chosen)
        preset = values["preset"]
        updates = [gr.update(visible=name in values["args"], **({"value": values["args"][name]}
                                                               if name in values["args"] else {})) for name in names]
        run = [gr.update(value=preset.get(k, RUN_DEFAULTS[k])) for k in ("precision", "optimizer", "grad_checkpointing")]
        return updates + run

    def refresh(model, objective_, chosen, precision_, optimizer_, checkpointing_, batch, cutoff, grad_accum, *knob_values):
        return estimate_view(models_dir, model, objective_, chosen, precision_, optimizer_, checkpointing_, batch,
                             cutoff, grad_accum, dict(zip(names, knob_values)))

    objective.input(lambda name: gr.update(info=get_objective(name).description), objective, objective)
    method.input(show_method, method, [controls[n] for n in names] + [precision, optimizer, checkpointing])
    gr.on(
        triggers=None,  # on page load and on every change of any input: the estimate is live
        fn=refresh,
        inputs=[shared.model, objective, method, precision, optimizer, checkpointing, shared.batch_size, shared.cutoff_len,
                shared.grad_accum] + [controls[n] for n in names],
        outputs=[summary, verdict, this_run, all_methods, table, shared.method_choice],
        trigger_mode="always_last", show_progress="hidden",
    )
