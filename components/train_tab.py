"""The Train tab: hyper-parameters, Start / Stop / Resume / Cancel, a live view of a run, rank sweeps and all runs."""
from __future__ import annotations

import shlex
import time
from dataclasses import dataclass, fields
from functools import partial
from pathlib import Path
from typing import Any

import gradio as gr
import pandas as pd

from app.data.store import holds_conversations
from app.handoff import MethodChoice, TrainInputs
from app.memory import estimate as memory
from app.memory.device import detect_device, gpu_count
from app.methods import MethodError
from app.models import ModelError
from app.objectives import get_objective, optional_controls
from app.runs import history, plots, sweeps
from app.runs.jobs import ROOT, JobError, Supervisor, attach_estimate, queue_order, start_supervisor, train_command
from app.runs.store import FAILED, QUEUED, RUNNING, RunNotFound, RunStatus, RunStore
from app.spec import SCHEDULERS, ConfigError, RunConfig
from components.shared import Shared

NO_RUN = "No runs yet. Choose a dataset, then press **Start**."
OOM_ADVICE = ("To fit, lower the batch size (raise gradient accumulation to keep the effective batch), shorten the "
              "cutoff length, turn on gradient checkpointing, or use QLoRA.")
RUN_COLUMNS = ["run", "state", "model", "method", "settings", "step", "train loss", "val loss", "sweep", "created"]
SWEEP_COLUMNS = ["r", "run", "state", "train loss", "val loss", "trainable params", "adapter size", "training time",
                 "memory estimated", "memory measured"]
STRATEGY_CHOICES = [("DDP: a full copy on each GPU", "ddp"), ("FSDP: split across the GPUs", "fsdp")]
ASSISTANT_TURN_CHOICES = [("Learn every assistant turn", "all"), ("Only the last assistant turn", "last")]
# Controls that only some data uses, beside the objective's say: the choice of assistant turns needs conversations
# (an instruction row has one answer either way).
DATA_CONTROLS = {"assistant_turns": holds_conversations}


# --- building a run ------------------------------------------------------------------------------------------
def start_run(sup: Supervisor, models_dir: Path, inputs: TrainInputs) -> tuple[str, str | None]:
    """(message, run id): queue one run; it starts at once when nothing else is training."""
    try:
        config = inputs.checked_config()
    except ConfigError as e:
        return f"**Not started.** {e}", None
    attach_estimate(config, models_dir, inputs.choice.estimate)
    (run_id,) = sup.submit([config])
    ahead = len(sup.queue()) - 1 + (sup.active() is not None)
    if ahead:
        return f"Queued **{run_id}**: it starts after the {ahead} run(s) ahead of it.", run_id
    return f"Starting **{run_id}**.", run_id


def start_sweep(sup: Supervisor, models_dir: Path, inputs: TrainInputs, ranks: list, name: str) -> tuple[str, str | None]:
    """(message, sweep name): one queued run per rank, everything else equal."""
    name = (name or "").strip() or time.strftime("r-sweep-%Y%m%d-%H%M%S")
    try:
        base = inputs.checked_config()
        if name in sweeps.sweep_names(sup.store):
            raise ConfigError(f"A sweep named {name!r} exists already; choose another name.")
        configs = sweeps.sweep_configs(base, [int(r) for r in ranks or []], name)
    except ConfigError as e:
        return f"**Sweep not started.** {e}", None
    for config in configs:  # the Method tab's estimate is kept by the run with its own r; the others get theirs
        attach_estimate(config, models_dir, inputs.choice.estimate)
    ids = sup.submit(configs)
    return f"Queued sweep **{name}**: {len(ids)} runs (r = {', '.join(str(c.method_args['r']) for c in configs)}).", name


def act(action, sup: Supervisor, run_id: str | None, done: str) -> str:
    """Stop / Resume / Cancel / Delete on the chosen run, with the reason in words when it cannot be done."""
    if not run_id:
        return "Choose a run first."
    try:
        action(sup, run_id)
    except (JobError, RunNotFound, OSError) as e:
        return f"**Not done.** {e}"
    return done.format(run_id=run_id)


def preview(inputs: TrainInputs, runs_dir: Path) -> str:
    """run.yaml as Start would write it, and the command that runs it headless."""
    try:
        config = inputs.checked_config()
    except ConfigError as e:
        return f"# {e}"
    command = shlex.join(train_command(runs_dir / "RUN_ID" / "run.yaml", config=config))
    return (f"# Start writes this to {runs_dir}/RUN_ID/run.yaml and runs:\n"
            f"#   cd {shlex.quote(str(ROOT))} && {command}\n{config.to_yaml()}")


def per_gpu_text(inputs: TrainInputs, models_dir: Path) -> str:
    """The memory each GPU needs for these settings, and whether it fits on this machine's first GPU."""
    try:
        estimate = memory.estimate_for_config(inputs.to_config(), models_dir)
    except (ConfigError, MethodError, memory.EstimateError, ModelError, ValueError) as e:
        return f"**Memory per GPU:** these settings cannot be estimated ({e})."
    fits = memory.verdict(estimate, detect_device()).text
    return f"**Memory per GPU: {memory.gib(estimate.gpu.total_bytes)}.** {fits} {memory.parallel_words(estimate.inputs)}"


# --- the live view -------------------------------------------------------------------------------------------
def newest_first(statuses: dict[str, RunStatus]) -> list[str]:
    return sorted(statuses, key=lambda run_id: (statuses[run_id].created or 0, run_id), reverse=True)


def active_run(statuses: dict[str, RunStatus]) -> str | None:
    return next((run_id for run_id, s in statuses.items() if s.state == RUNNING), None)


def choose_run(statuses: dict[str, RunStatus], selected: str | None, follow: bool) -> str | None:
    """Following: the run training now, else the next in the queue, else the newest. Otherwise the user's pick."""
    ids = newest_first(statuses)
    if follow:
        queue = queue_order(statuses)
        return active_run(statuses) or (queue[0] if queue else None) or (ids[0] if ids else None)
    return selected if selected in statuses else (ids[0] if ids else None)


def run_choices(statuses: dict[str, RunStatus]) -> list[tuple[str, str]]:
    return [(f"{run_id} · {statuses[run_id].state}", run_id) for run_id in newest_first(statuses)]


def queue_text(statuses: dict[str, RunStatus]) -> str:
    active, queue = active_run(statuses), queue_order(statuses)
    if not active and not queue:
        return "**Queue:** empty. Start queues a run; it begins at once when nothing else is training."
    lines = [f"**Training now:** {active or 'nothing'}"]
    lines += [f"{i}. {run_id} (waiting)" for i, run_id in enumerate(queue, 1)]
    return "\n".join(lines)


def memory_line(config: RunConfig, status: RunStatus) -> str:
    """The estimate made before the run beside the peak measured during it. They are compared only when the worker
    recorded its device: a CPU process's resident memory and a GPU's reserved memory are estimated differently."""
    estimated = history.estimated_bytes(config.estimate, status.device)
    measured = history.number(status.peak_memory_bytes)
    if estimated is None and measured is None:
        return ""
    where = {"cuda": " (GPU)", "cpu": " (CPU memory)"}.get(status.device, "")
    line = f"**Memory{where}:** estimated {history.fmt_bytes(estimated)} before the run"
    if status.state not in (QUEUED, RUNNING):
        line += f", measured peak {history.fmt_bytes(measured)}"
        if estimated and measured and status.device:
            line += f" ({measured / estimated:.0%} of the estimate)"
    line += "."
    if status.state == FAILED and status.failure == "oom":
        line += " " + OOM_ADVICE
    return line


def live_view(store: RunStore, statuses: dict[str, RunStatus], run_id: str | None) -> tuple[str, str, Any, str, str]:
    """(status, progress, loss figure, log tail, headless command) for one run."""
    if not run_id:
        return NO_RUN, "", plots.empty_figure("No run chosen."), "", ""
    summary = history.summarize(store, run_id)
    if summary.state == history.BROKEN:
        return (f"### {run_id}\n**This run folder is damaged:** {summary.problem}. You can delete it under All runs.",
                "", plots.empty_figure("Damaged run."), store.log_tail(run_id), "")
    status, config = store.status(run_id), store.config(run_id)
    extra = get_objective(config.objective).extra_metrics
    c = history.curves(store.metrics(run_id), [m.key for m in extra])
    queue = queue_order(statuses)
    checkpoint = history.last_checkpoint(store, run_id)
    words = history.describe(status, queue.index(run_id) + 1 if run_id in queue else None, len(queue), checkpoint)
    text = f"### {run_id}\n{words}\n\n{memory_line(config, status)}".rstrip()
    figure = plots.loss_figure(c.train, c.eval, c.lr, title=f"{config.method} on {history.model_label(config.model)}",
                               extra={m.label: c.extra.get(m.key, []) for m in extra})
    resume = checkpoint is not None
    command = f"cd {shlex.quote(str(ROOT))} && {shlex.join(train_command(store.config_path(run_id), resume))}"
    if status.state == RUNNING:  # a run has one writer: typed now, this command is only refused
        owner = store.owner(run_id)
        who = f" (process {owner.pid})" if owner else ""
        command = f"# Training now{who}: a second worker on this run is refused until it ends.\n{command}"
    return text, history.progress_text(history.progress(status, c)), figure, store.log_tail(run_id), command


def view_signature(store: RunStore, statuses: dict[str, RunStatus], run_id: str | None) -> tuple:
    """Changes whenever anything the live view shows changes; the timer redraws only then."""
    files = history.run_signature(store, run_id) if run_id else ()
    return run_id, files, tuple(run_choices(statuses)), tuple(queue_order(statuses))


def refresh_live(sup: Supervisor, selected: str | None, follow: bool, last: tuple | None) -> list:
    """What the timer sends: [run dropdown, queue, status, progress, figure, log, command, signature]."""
    statuses = sup.statuses()
    run_id = choose_run(statuses, selected, follow)
    signature = view_signature(sup.store, statuses, run_id)
    if signature == last:
        return [gr.skip()] * 8
    try:
        view = live_view(sup.store, statuses, run_id)
    except (RunNotFound, ConfigError, OSError) as e:  # deleted or damaged between two reads
        view = (f"### {run_id}\nThis run cannot be read right now ({e}).", "", plots.empty_figure(""), "", "")
    # re-sending an unchanged dropdown would close it under the user's pointer at every step
    same_pick = last is not None and (last[0], last[2]) == (signature[0], signature[2])
    pick = gr.skip() if same_pick else gr.update(choices=run_choices(statuses), value=run_id)
    return [pick, queue_text(statuses), *view, signature]


# --- sweeps and the runs list --------------------------------------------------------------------------------
def _fmt(value: float | None, pattern: str = "{:.4f}") -> str:
    return "–" if value is None else pattern.format(value)


def sweep_view(store: RunStore, name: str | None) -> tuple[Any, pd.DataFrame]:
    if not name:
        return plots.empty_figure("Choose a sweep."), pd.DataFrame(columns=SWEEP_COLUMNS)
    rows = sweeps.sweep_rows(store, name)
    curves = {f"r={row.r}": history.curves(store.metrics(row.run_id)) for row in rows}
    figure = plots.overlay_figure({k: (c.train, c.eval) for k, c in curves.items()}, title=f"Sweep {name}")
    table = [[row.r, row.run_id, row.state, _fmt(row.train_loss), _fmt(row.eval_loss), _fmt(row.trainable, "{:,.0f}"),
              history.fmt_bytes(row.adapter_bytes), history.fmt_duration(row.wall_s),
              history.fmt_bytes(row.estimated_bytes), history.fmt_bytes(row.peak_bytes)] for row in rows]
    return figure, pd.DataFrame(table, columns=SWEEP_COLUMNS)


def runs_table(summaries: list[history.RunSummary]) -> pd.DataFrame:
    rows = [[r.run_id, r.state if r.state != history.BROKEN else f"broken: {r.problem}", r.model, r.method, r.settings,
             f"{r.step}/{r.total_steps}" if r.total_steps else str(r.step), _fmt(r.train_loss), _fmt(r.eval_loss),
             r.sweep or "", time.strftime("%Y-%m-%d %H:%M", time.localtime(r.created)) if r.created else ""]
            for r in summaries]
    return pd.DataFrame(rows, columns=RUN_COLUMNS)


def overlay_runs(store: RunStore, run_ids: list[str] | None) -> Any:
    if not run_ids:
        return plots.empty_figure("Tick the runs to overlay.")
    curves = {}
    for run_id in run_ids:
        c = history.curves(store.metrics(run_id)) if store.exists(run_id) else history.Curves()
        curves[run_id] = (c.train, c.eval)
    return plots.overlay_figure(curves)


def diff_table(store: RunStore, a: str | None, b: str | None) -> tuple[str, pd.DataFrame]:
    empty = pd.DataFrame(columns=["setting", "A", "B"])
    if not a or not b:
        return "Choose two runs to compare their settings.", empty
    ca, cb = store.safe_config(a), store.safe_config(b)
    if ca is None or cb is None:
        return f"**Cannot compare:** the run.yaml of {a if ca is None else b} is missing or garbled.", empty
    diff = history.settings_diff(ca, cb)
    if not diff:
        return "These two runs have the same settings.", empty
    rows = [[name, repr(va) if va is not None else "–", repr(vb) if vb is not None else "–"] for name, va, vb in diff]
    return f"{len(diff)} setting(s) differ.", pd.DataFrame(rows, columns=["setting", "A", "B"])


def refresh_runs(store: RunStore, sweep: str | None, last: tuple | None) -> list:
    """[runs table, overlay / diff A / diff B / delete choices, sweep choices, sweep plot, sweep table, signature]."""
    signature = history.store_signature(store)
    if signature == last:
        return [gr.skip()] * 9
    summaries = history.list_runs(store)
    ids = [r.run_id for r in summaries]
    sweep_outputs = sweep_view(store, sweep) if sweep else (gr.skip(), gr.skip())
    return [runs_table(summaries), *[gr.update(choices=ids)] * 4, gr.update(choices=sweeps.sweep_names(store)),
            *sweep_outputs, signature]


# --- the tab's widgets, one section each ---------------------------------------------------------------------
@dataclass
class Hyper:
    """This tab's hyper-parameter controls, each named as the RunConfig field it sets."""
    learning_rate: gr.Number
    epochs: gr.Number
    max_steps: gr.Number
    warmup_steps: gr.Number
    scheduler: gr.Dropdown
    seed: gr.Number
    train_on_prompt: gr.Checkbox
    assistant_turns: gr.Radio
    beta: gr.Number
    simpo_gamma: gr.Number
    eval_every: gr.Number
    save_every: gr.Number
    keep_last: gr.Slider

    def by_field(self) -> dict[str, gr.components.Component]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass
class Parallel:
    """The multi-GPU controls, shown only on a machine with more than one GPU."""
    gpus: gr.Slider
    strategy: gr.Radio
    per_gpu: gr.Markdown
    detected: int


@dataclass
class RunControls:
    """Every widget a run is built from: the shared ones, the Method tab's choice, this tab's own."""
    shared: Shared
    hyper: Hyper
    parallel: Parallel

    def widgets(self) -> set:
        """The event inputs: as a set, gradio hands the handler one dict of values keyed by widget."""
        s, h, p = self.shared, self.hyper, self.parallel
        return {s.model, s.dataset, s.val_dataset, s.val_split, s.cutoff_len, s.batch_size, s.grad_accum,
                s.method_choice, s.system_prompt, *h.by_field().values(), p.gpus, p.strategy}

    def read(self, values: dict) -> TrainInputs:
        s, h, p = self.shared, self.hyper, self.parallel
        return TrainInputs(
            model=values[s.model], dataset=values[s.dataset], val_dataset=values[s.val_dataset],
            val_split=values[s.val_split], cutoff_len=values[s.cutoff_len], batch_size=values[s.batch_size],
            grad_accum=values[s.grad_accum], choice=values[s.method_choice],
            learning_rate=values[h.learning_rate], epochs=values[h.epochs], max_steps=values[h.max_steps],
            warmup_steps=values[h.warmup_steps], scheduler=values[h.scheduler], seed=values[h.seed],
            eval_every=values[h.eval_every], save_every=values[h.save_every], keep_last=values[h.keep_last],
            train_on_prompt=values[h.train_on_prompt], gpus=values[p.gpus], strategy=values[p.strategy],
            assistant_turns=values[h.assistant_turns], system_prompt=values[s.system_prompt],
            beta=values[h.beta], simpo_gamma=values[h.simpo_gamma],
        )


@dataclass
class Live:
    start: gr.Button
    stop: gr.Button
    resume: gr.Button
    cancel: gr.Button
    message: gr.Markdown
    run: gr.Dropdown
    follow: gr.Checkbox
    queue: gr.Markdown
    status: gr.Markdown
    progress: gr.Markdown
    figure: gr.Plot
    command: gr.Code
    log: gr.Textbox
    preview_button: gr.Button
    preview: gr.Code
    signature: gr.State  # of what the view shows, so the timer redraws only on a change

    def outputs(self) -> list:
        """What refresh_live fills, in its order."""
        return [self.run, self.queue, self.status, self.progress, self.figure, self.log, self.command, self.signature]


@dataclass
class Sweep:
    ranks: gr.CheckboxGroup
    name: gr.Textbox
    start: gr.Button
    message: gr.Markdown
    pick: gr.Dropdown
    plot: gr.Plot
    table: gr.Dataframe


@dataclass
class RunsList:
    refresh: gr.Button
    table: gr.Dataframe
    overlay_pick: gr.CheckboxGroup
    overlay_plot: gr.Plot
    diff_a: gr.Dropdown
    diff_b: gr.Dropdown
    diff_message: gr.Markdown
    diff: gr.Dataframe
    delete_pick: gr.Dropdown
    delete: gr.Button
    delete_message: gr.Markdown
    signature: gr.State


def hyper_section(shared: Shared) -> Hyper:
    with gr.Accordion("Hyper-parameters", open=True):
        with gr.Row():
            learning_rate = gr.Number(2e-4, label="Learning rate", minimum=0, elem_id="train-learning-rate",
                                      info="How big each update is. LoRA: 1e-4 to 3e-4. Full fine-tuning: 1e-5 to 5e-5.")
            epochs = gr.Number(1, label="Epochs", minimum=0,
                               info="Passes over the training rows. Ignored when max steps is above 0.")
            max_steps = gr.Number(0, label="Max steps", precision=0, minimum=0, elem_id="train-max-steps",
                                  info="Stop after this many steps. 0 = train for the epochs above.")
            shared.grad_accum.render()
        with gr.Row():
            warmup_steps = gr.Number(0, label="Warm-up steps", precision=0, minimum=0,
                                     info="Steps over which the learning rate rises from 0, to avoid an early jolt.")
            scheduler = gr.Dropdown(list(SCHEDULERS), value="cosine", label="Learning-rate schedule",
                                    info="cosine and linear lower the rate towards the end; constant keeps it.")
            seed = gr.Number(42, label="Seed", precision=0,
                             info="Same seed and settings give the same run; change it to see the run-to-run noise.")
            train_on_prompt = gr.Checkbox(False, label="Train on the prompt too",
                                          info="Off: the loss counts only the answer tokens (usually better).")
        assistant_turns = gr.Radio(
            ASSISTANT_TURN_CHOICES, value="all", label="Assistant turns learned",
            info="For conversations: every answer, each after the turns before it (usually best), or only the "
                 "last one, when the earlier answers are not ones the model should imitate.")
        with gr.Row():  # preference objectives only (shown by the objective's controls)
            beta = gr.Number(0.1, label="Beta", minimum=0.0001, visible=False,
                             info="DPO / IPO: how close the model stays to where it started (0.1 is usual; lower moves "
                                  "further). SimPO: the reward scale (2 to 10 is usual).")
            simpo_gamma = gr.Number(0.5, label="Target margin (gamma)", minimum=0, visible=False,
                                    info="SimPO: by how much the chosen answer's reward should beat the rejected one's.")
        with gr.Row():
            eval_every = gr.Number(0, label="Validation every N steps", precision=0, minimum=0,
                                   info="How often to measure loss on held-out rows. 0 = only at the end.")
            save_every = gr.Number(50, label="Checkpoint every N steps", precision=0, minimum=0,
                                   info="Stop and Resume continue from the last checkpoint. 0 = only at the end.")
            keep_last = gr.Slider(1, 10, value=2, step=1, label="Checkpoints kept",
                                  info="Older checkpoints are deleted to save disk space.")
    return Hyper(learning_rate, epochs, max_steps, warmup_steps, scheduler, seed, train_on_prompt, assistant_turns,
                 beta, simpo_gamma, eval_every, save_every, keep_last)


def parallel_section() -> Parallel:
    detected = gpu_count()
    with gr.Accordion(f"GPUs ({detected} found)", open=True, visible=detected > 1):
        with gr.Row():
            gpus = gr.Slider(1, max(detected, 2), value=detected if detected > 1 else 1, step=1, label="GPUs",
                             info="How many GPUs train this run, one process each. Each step trains the same "
                                  "rows as on one GPU, shared out between them.")
            strategy = gr.Radio(STRATEGY_CHOICES, value="ddp", label="Strategy", info=(
                "DDP: each GPU holds a full copy of the model; fastest when the model fits on one GPU. "
                "FSDP: splits the weights, gradients and optimizer state across the GPUs, for models that do "
                "not fit on one."))
        per_gpu = gr.Markdown()
    return Parallel(gpus, strategy, per_gpu, detected)


def live_section() -> Live:
    with gr.Row():
        start = gr.Button("Start", variant="primary")
        stop = gr.Button("Stop (saves a checkpoint)")
        resume = gr.Button("Resume")
        cancel = gr.Button("Cancel queued")
    message = gr.Markdown()
    with gr.Row():
        run = gr.Dropdown([], value=None, label="Run shown", scale=3,
                          info="Stop, Resume and Cancel act on this run.")
        follow = gr.Checkbox(True, label="Follow the active run",
                             info="Show whichever run is training now. Picking a run by hand turns this off.")
    queue = gr.Markdown()
    status = gr.Markdown()
    progress = gr.Markdown()
    figure = gr.Plot(label="Loss and learning rate")
    command = gr.Code(label="Headless command (runs the same training without the UI)", language="shell", lines=1)
    log = gr.Textbox(label="Log (last lines)", lines=8, max_lines=20, autoscroll=True)
    with gr.Accordion("Preview run.yaml", open=False):
        preview_button = gr.Button("Show the run.yaml Start would write")
        preview_code = gr.Code(language="yaml", label="run.yaml")
    return Live(start, stop, resume, cancel, message, run, follow, queue, status, progress, figure, command, log,
                preview_button, preview_code, gr.State(None))


def sweep_section(store: RunStore) -> Sweep:
    with gr.Accordion("Rank sweep (LoRA family)", open=False):
        gr.Markdown("One run per rank r, everything else equal, queued one after another. Higher r = more "
                    "trainable parameters and memory; the curves show whether it buys a lower loss.")
        with gr.Row():
            ranks = gr.CheckboxGroup(list(sweeps.RANKS), value=[4, 8, 16, 32], label="Ranks r",
                                     info="Pick at least two.")
            name = gr.Textbox(label="Sweep name", placeholder="empty = r-sweep-<date>-<time>",
                              info="Names the group of runs in the runs list.")
            start = gr.Button("Queue sweep", variant="primary")
        message = gr.Markdown()
        pick = gr.Dropdown(sweeps.sweep_names(store), value=None, label="Sweep shown",
                           info="Its runs' loss curves overlaid, and the table below.")
        plot = gr.Plot(label="Sweep: loss by rank")
        table = gr.Dataframe(headers=SWEEP_COLUMNS, interactive=False, label="Sweep results")
    return Sweep(ranks, name, start, message, pick, plot, table)


def runs_section() -> RunsList:
    with gr.Accordion("All runs", open=False):
        refresh = gr.Button("Refresh")
        table = gr.Dataframe(headers=RUN_COLUMNS, interactive=False, label="Runs (newest first)", wrap=True)
        overlay_pick = gr.CheckboxGroup([], label="Overlay these runs", info="Their loss curves on one chart.")
        overlay_plot = gr.Plot(label="Overlay")
        with gr.Row():
            diff_a = gr.Dropdown([], label="Run A", info="Compare the settings of two runs.")
            diff_b = gr.Dropdown([], label="Run B", info="Only the settings that differ are listed.")
        diff_message = gr.Markdown()
        diff = gr.Dataframe(headers=["setting", "A", "B"], interactive=False)
        with gr.Row():
            delete_pick = gr.Dropdown([], label="Run to delete", info="Removes its folder, checkpoints and weights.")
            delete = gr.Button("Delete run", variant="stop")
        delete_message = gr.Markdown()
    return RunsList(refresh, table, overlay_pick, overlay_plot, diff_a, diff_b, diff_message, diff, delete_pick,
                    delete, delete_message, gr.State(None))


# --- event handlers: what build binds (the supervisor, the widgets) comes first, then the event's values ---------
def on_start(sup: Supervisor, models_dir: Path, controls: RunControls, values: dict):
    text, _ = start_run(sup, models_dir, controls.read(values))
    return text, True  # follow the new run (it shows once it trains or heads the queue)


def on_preview(controls: RunControls, runs_dir: Path, values: dict) -> str:
    return preview(controls.read(values), runs_dir)


def on_per_gpu(controls: RunControls, models_dir: Path, values: dict) -> str:
    return per_gpu_text(controls.read(values), models_dir)


def on_sweep(sup: Supervisor, models_dir: Path, controls: RunControls, sweep: Sweep, values: dict):
    text, name = start_sweep(sup, models_dir, controls.read(values), values[sweep.ranks], values[sweep.name])
    names = sweeps.sweep_names(sup.store)
    return text, gr.update(choices=names, value=name) if name else gr.update(choices=names)


def on_objective(control: str, choice: MethodChoice, dataset: str | None = None) -> dict:
    """A control only some objectives use is shown while the chosen one does; one only some data uses is hidden
    once the chosen dataset lacks it (its value is left as it is)."""
    used = control in get_objective(choice.objective).controls
    data_needed = DATA_CONTROLS.get(control)
    return gr.update(visible=used and (data_needed is None or not dataset or data_needed(dataset)))


def on_pick(sup: Supervisor, run_id: str | None) -> list:
    """Picking a run by hand stops following the active one, and shows the pick at once."""
    return [False, *refresh_live(sup, run_id, False, None)]


# --- the tab -------------------------------------------------------------------------------------------------
def build(shared: Shared) -> dict[str, gr.components.Component]:
    """Lays out the tab and wires it; returns the hyper-parameter controls by RunConfig field name (the quick demo
    fills them in)."""
    sup = start_supervisor(shared.workspace)
    gr.Markdown("Each run trains in its own process: closing or reloading this page never stops it, and one run "
                "trains at a time while the others wait in the queue.")
    controls = RunControls(shared, hyper_section(shared), parallel_section())
    live = live_section()
    sweep = sweep_section(sup.store)
    runs = runs_section()
    wire_live(sup, controls, live)
    wire_sweep(sup, controls, sweep)
    wire_runs(sup, runs, sweep)
    return controls.hyper.by_field()


def wire_live(sup: Supervisor, controls: RunControls, live: Live) -> None:
    models_dir = controls.shared.workspace.models
    gr.Timer(1.5).tick(partial(refresh_live, sup), [live.run, live.follow, live.signature], live.outputs(),
                       concurrency_limit=None)
    live.run.input(partial(on_pick, sup), live.run, [live.follow, *live.outputs()])
    live.start.click(partial(on_start, sup, models_dir, controls), controls.widgets(), [live.message, live.follow])
    live.stop.click(partial(act, Supervisor.stop, sup, done="Stopping **{run_id}**: it saves a checkpoint first."),
                    live.run, live.message)
    live.resume.click(partial(act, Supervisor.resume, sup, done="**{run_id}** is queued to resume from its last "
                                                                "checkpoint."), live.run, live.message)
    live.cancel.click(partial(act, Supervisor.cancel, sup, done="Cancelled **{run_id}**."), live.run, live.message)
    live.preview_button.click(partial(on_preview, controls, sup.store.root), controls.widgets(), live.preview)
    shared, parallel = controls.shared, controls.parallel
    for name in optional_controls():  # one event each: a lone output would take a returned list as its value
        gr.on([shared.method_choice.change, shared.dataset.change], partial(on_objective, name),
              [shared.method_choice, shared.dataset], getattr(controls.hyper, name), show_progress="hidden")
    if parallel.detected > 1:  # the per-GPU figure follows every setting it depends on
        gr.on([parallel.gpus.change, parallel.strategy.change, shared.method_choice.change, shared.batch_size.change,
               shared.cutoff_len.change, shared.grad_accum.change, shared.model.change],
              partial(on_per_gpu, controls, models_dir), controls.widgets(), parallel.per_gpu,
              trigger_mode="always_last", show_progress="hidden")


def wire_sweep(sup: Supervisor, controls: RunControls, sweep: Sweep) -> None:
    models_dir = controls.shared.workspace.models
    sweep.start.click(partial(on_sweep, sup, models_dir, controls, sweep),
                      controls.widgets() | {sweep.ranks, sweep.name}, [sweep.message, sweep.pick])
    sweep.pick.change(partial(sweep_view, sup.store), sweep.pick, [sweep.plot, sweep.table])


def wire_runs(sup: Supervisor, runs: RunsList, sweep: Sweep) -> None:
    store = sup.store
    outputs = [runs.table, runs.overlay_pick, runs.diff_a, runs.diff_b, runs.delete_pick, sweep.pick, sweep.plot,
               sweep.table, runs.signature]
    gr.Timer(5).tick(partial(refresh_runs, store), [sweep.pick, runs.signature], outputs, concurrency_limit=None)
    runs.refresh.click(partial(refresh_runs, store, last=None), sweep.pick, outputs)
    runs.overlay_pick.change(partial(overlay_runs, store), runs.overlay_pick, runs.overlay_plot)
    gr.on([runs.diff_a.change, runs.diff_b.change], partial(diff_table, store), [runs.diff_a, runs.diff_b],
          [runs.diff_message, runs.diff])
    runs.delete.click(partial(act, Supervisor.delete, sup, done="Deleted **{run_id}**."), runs.delete_pick,
                      runs.delete_message).then(partial(refresh_runs, store, last=None), sweep.pick, outputs)
