"""The Train tab: hyper-parameters, Start / Stop / Resume / Cancel, a live view of a run, rank sweeps and all runs."""
from __future__ import annotations

import shlex
import time
from pathlib import Path
from typing import Any

import gradio as gr
import pandas as pd

from app.runs import history
from app.memory import estimate as memory
from app.runs import plots
from app.runs import sweeps
from app.runs.jobs import ROOT, JobError, Supervisor, attach_estimate, queue_order, start_supervisor, train_command
from app.methods import MethodError, get_method
from app.models import ModelError
from app.runs.store import FAILED, QUEUED, RUNNING, RunNotFound, RunStatus, RunStore
from app.spec import SCHEDULERS, ConfigError, RunConfig
from components.shared import Shared

NO_DATASET = "**No dataset chosen.** Upload or pick one in the Data tab first, then come back and press Start."
NO_RUN = "No runs yet. Choose a dataset, then press **Start**."
OOM_ADVICE = ("To fit, lower the batch size (raise gradient accumulation to keep the effective batch), shorten the "
              "cutoff length, turn on gradient checkpointing, or use QLoRA.")
RUN_COLUMNS = ["run", "state", "model", "method", "settings", "step", "train loss", "val loss", "sweep", "created"]
SWEEP_COLUMNS = ["r", "run", "state", "train loss", "val loss", "trainable params", "adapter size", "training time",
                 "memory estimated", "memory measured"]
# This tab's controls, named as RunConfig fields, in the order the handlers receive them.
HYPER = ("learning_rate", "epochs", "max_steps", "grad_accum", "warmup_steps", "scheduler", "seed", "eval_every",
         "save_every", "keep_last", "train_on_prompt")
SHARED = ("model", "dataset", "val_dataset", "val_split", "cutoff_len", "batch_size", "method_settings")
PARALLEL = ("gpus", "strategy")  # shown only on a machine with more than one GPU
STRATEGY_CHOICES = [("DDP: a full copy on each GPU", "ddp"), ("FSDP: split across the GPUs", "fsdp")]


# --- building a run ------------------------------------------------------------------------------------------
def config_from_inputs(values: dict[str, Any]) -> RunConfig:
    """The RunConfig for the shared controls, the Method tab's settings and this tab's hyper-parameters."""
    empty = [name for name in HYPER + ("cutoff_len", "batch_size") if values.get(name) is None]
    if empty:
        raise ConfigError(f"{', '.join(empty)}: fill in a value")
    settings = values.get("method_settings") or {}
    return RunConfig(
        model=values.get("model") or "embedded",
        dataset=values["dataset"],
        val_dataset=values.get("val_dataset") or None,
        val_split=float(values.get("val_split") or 0),
        cutoff_len=int(values["cutoff_len"]),
        batch_size=int(values["batch_size"]),
        method=settings.get("method", "lora"),
        method_args=dict(settings.get("method_args") or {}),
        precision=settings.get("precision", "auto"),
        optimizer=settings.get("optimizer", "adamw"),
        grad_checkpointing=bool(settings.get("grad_checkpointing", False)),
        learning_rate=float(values["learning_rate"]),
        epochs=float(values["epochs"]),
        max_steps=int(values["max_steps"]) if values["max_steps"] > 0 else -1,
        grad_accum=int(values["grad_accum"]),
        warmup_steps=int(values["warmup_steps"]),
        scheduler=values["scheduler"],
        seed=int(values["seed"]),
        eval_every=int(values["eval_every"]),
        save_every=int(values["save_every"]),
        keep_last=int(values["keep_last"]),
        train_on_prompt=bool(values["train_on_prompt"]),
        gpus=int(values.get("gpus") or 1),
        strategy=values.get("strategy") or "ddp",
    )


def checked_config(values: dict[str, Any]) -> RunConfig:
    """As config_from_inputs, but also refuses a missing dataset file with a message the user can act on."""
    dataset = values.get("dataset")
    if not dataset:
        raise ConfigError(NO_DATASET)
    if not Path(dataset).is_file():
        raise ConfigError(f"The dataset file {dataset} is gone. Pick the dataset again in the Data tab.")
    config = config_from_inputs(values)
    try:
        get_method(config.method).make_args(config.method_args)
    except MethodError as e:
        raise ConfigError(str(e)) from e
    return config


def start_run(sup: Supervisor, models_dir: Path, values: dict[str, Any]) -> tuple[str, str | None]:
    """(message, run id): queue one run; it starts at once when nothing else is training."""
    try:
        config = checked_config(values)
    except ConfigError as e:
        return f"**Not started.** {e}", None
    attach_estimate(config, models_dir, (values.get("method_settings") or {}).get("estimate"))
    (run_id,) = sup.submit([config])
    ahead = len(sup.queue()) - 1 + (sup.active() is not None)
    if ahead:
        return f"Queued **{run_id}**: it starts after the {ahead} run(s) ahead of it.", run_id
    return f"Starting **{run_id}**.", run_id


def start_sweep(sup: Supervisor, models_dir: Path, values: dict[str, Any], ranks: list, name: str) -> tuple[str, str | None]:
    """(message, sweep name): one queued run per rank, everything else equal."""
    name = (name or "").strip() or time.strftime("r-sweep-%Y%m%d-%H%M%S")
    try:
        base = checked_config(values)
        if name in sweeps.sweep_names(sup.store):
            raise ConfigError(f"A sweep named {name!r} exists already; choose another name.")
        configs = sweeps.sweep_configs(base, [int(r) for r in ranks or []], name)
    except ConfigError as e:
        return f"**Sweep not started.** {e}", None
    settings = values.get("method_settings") or {}
    for config in configs:  # the Method tab's estimate was for its own r, so only that run may borrow it
        same_r = config.method_args == dict(settings.get("method_args") or {})
        attach_estimate(config, models_dir, settings.get("estimate") if same_r else None)
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


def preview(values: dict[str, Any], runs_dir: Path) -> str:
    """run.yaml as Start would write it, and the command that runs it headless."""
    try:
        config = checked_config(values)
    except ConfigError as e:
        return f"# {e}"
    command = shlex.join(train_command(runs_dir / "RUN_ID" / "run.yaml", config=config))
    return (f"# Start writes this to {runs_dir}/RUN_ID/run.yaml and runs:\n"
            f"#   cd {shlex.quote(str(ROOT))} && {command}\n{config.to_yaml()}")


def per_gpu_text(values: dict[str, Any], models_dir: Path) -> str:
    """The memory each GPU needs for these settings, and whether it fits on this machine's first GPU."""
    try:
        config = config_from_inputs({**values, "dataset": values.get("dataset") or ""})
        estimate = memory.estimate_for_config(config, models_dir)
    except (ConfigError, MethodError, memory.EstimateError, ModelError, ValueError) as e:
        return f"**Memory per GPU:** these settings cannot be estimated ({e})."
    fits = memory.verdict(estimate, memory.detect_device()).text
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
    c = history.curves(store.metrics(run_id))
    queue = queue_order(statuses)
    checkpoints = store.checkpoints(run_id)
    words = history.describe(status, queue.index(run_id) + 1 if run_id in queue else None, len(queue),
                             int(checkpoints[-1].name.split("-")[1]) if checkpoints else None)
    text = f"### {run_id}\n{words}\n\n{memory_line(config, status)}".rstrip()
    figure = plots.loss_figure(c.train, c.eval, c.lr, title=f"{config.method} on {history.model_label(config.model)}")
    command = f"cd {shlex.quote(str(ROOT))} && {shlex.join(train_command(store.config_path(run_id), bool(checkpoints)))}"
    return text, history.progress_text(history.progress(status, c)), figure, store.log_tail(run_id), command


def view_signature(store: RunStore, statuses: dict[str, RunStatus], run_id: str | None) -> tuple:
    """Changes whenever anything the live view shows changes; the timer redraws only then."""
    files = []
    for name in ("status.json", "metrics.jsonl", "train.log") if run_id else ():
        try:
            st = (store.root / run_id / name).stat()
            files.append((st.st_mtime_ns, st.st_size))
        except OSError:
            files.append(None)
    return run_id, tuple(files), tuple(run_choices(statuses)), tuple(queue_order(statuses))


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


def store_signature(store: RunStore) -> tuple:
    """Changes whenever a run is added, removed or writes its status or metrics: the runs list redraws only then."""
    signature = []
    try:
        names = sorted(d.name for d in store.root.iterdir() if d.is_dir())
    except OSError:
        return ()
    for name in names:
        for file in ("run.yaml", "status.json", "metrics.jsonl"):
            try:
                st = (store.root / name / file).stat()
                signature.append((name, file, st.st_mtime_ns, st.st_size))
            except OSError:
                continue
    return tuple(signature)


def refresh_runs(store: RunStore, sweep: str | None, last: tuple | None) -> list:
    """[runs table, overlay / diff A / diff B / delete choices, sweep choices, sweep plot, sweep table, signature]."""
    signature = store_signature(store)
    if signature == last:
        return [gr.skip()] * 9
    summaries = history.list_runs(store)
    ids = [r.run_id for r in summaries]
    sweep_outputs = sweep_view(store, sweep) if sweep else (gr.skip(), gr.skip())
    return [runs_table(summaries), *[gr.update(choices=ids)] * 4, gr.update(choices=sweeps.sweep_names(store)),
            *sweep_outputs, signature]


# --- the tab -------------------------------------------------------------------------------------------------
def build(shared: Shared) -> dict[str, gr.components.Component]:
    """Returns the hyper-parameter controls by RunConfig field name (the quick demo fills them in)."""
    sup = start_supervisor(shared.workspace)
    store, models_dir = sup.store, shared.workspace.models

    gr.Markdown("Each run trains in its own process: closing or reloading this page never stops it, and one run "
                "trains at a time while the others wait in the queue.")
    with gr.Accordion("Hyper-parameters", open=True):
        with gr.Row():
            learning_rate = gr.Number(2e-4, label="Learning rate", minimum=0, elem_id="train-learning-rate",
                                      info="How big each update is. LoRA: 1e-4 to 3e-4. Full fine-tuning: 1e-5 to 5e-5.")
            epochs = gr.Number(1, label="Epochs", minimum=0,
                               info="Passes over the training rows. Ignored when max steps is above 0.")
            max_steps = gr.Number(0, label="Max steps", precision=0, minimum=0, elem_id="train-max-steps",
                                  info="Stop after this many steps. 0 = train for the epochs above.")
            grad_accum = gr.Slider(1, 64, value=1, step=1, label="Gradient accumulation",
                                   info="Steps added up before one update: a bigger effective batch with no extra memory.")
        with gr.Row():
            warmup_steps = gr.Number(0, label="Warm-up steps", precision=0, minimum=0,
                                     info="Steps over which the learning rate rises from 0, to avoid an early jolt.")
            scheduler = gr.Dropdown(list(SCHEDULERS), value="cosine", label="Learning-rate schedule",
                                    info="cosine and linear lower the rate towards the end; constant keeps it.")
            seed = gr.Number(42, label="Seed", precision=0,
                             info="Same seed and settings give the same run; change it to see the run-to-run noise.")
            train_on_prompt = gr.Checkbox(False, label="Train on the prompt too",
                                          info="Off: the loss counts only the answer tokens (usually better).")
        with gr.Row():
            eval_every = gr.Number(0, label="Validation every N steps", precision=0, minimum=0,
                                   info="How often to measure loss on held-out rows. 0 = only at the end.")
            save_every = gr.Number(50, label="Checkpoint every N steps", precision=0, minimum=0,
                                   info="Stop and Resume continue from the last checkpoint. 0 = only at the end.")
            keep_last = gr.Slider(1, 10, value=2, step=1, label="Checkpoints kept",
                                  info="Older checkpoints are deleted to save disk space.")
    hyper = dict(learning_rate=learning_rate, epochs=epochs, max_steps=max_steps, grad_accum=grad_accum,
                 warmup_steps=warmup_steps, scheduler=scheduler, seed=seed, eval_every=eval_every,
                 save_every=save_every, keep_last=keep_last, train_on_prompt=train_on_prompt)
    detected = memory.gpu_count()
    with gr.Accordion(f"GPUs ({detected} found)", open=True, visible=detected > 1):
        with gr.Row():
            parallel = dict(
                gpus=gr.Slider(1, max(detected, 2), value=detected if detected > 1 else 1, step=1, label="GPUs",
                               info="How many GPUs train this run, one process each. Each step trains the same "
                                    "rows as on one GPU, shared out between them."),
                strategy=gr.Radio(STRATEGY_CHOICES, value="ddp", label="Strategy", info=(
                    "DDP: each GPU holds a full copy of the model; fastest when the model fits on one GPU. "
                    "FSDP: splits the weights, gradients and optimizer state across the GPUs, for models that do "
                    "not fit on one.")),
            )
        per_gpu = gr.Markdown()
    inputs = [getattr(shared, name) for name in SHARED] + [hyper[name] for name in HYPER] + [
        parallel[name] for name in PARALLEL]

    def values(*args) -> dict[str, Any]:
        return dict(zip(SHARED + HYPER + PARALLEL, args))

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

    with gr.Accordion("Rank sweep (LoRA family)", open=False):
        gr.Markdown("One run per rank r, everything else equal, queued one after another. Higher r = more "
                    "trainable parameters and memory; the curves show whether it buys a lower loss.")
        with gr.Row():
            ranks = gr.CheckboxGroup(list(sweeps.RANKS), value=[4, 8, 16, 32], label="Ranks r",
                                     info="Pick at least two.")
            sweep_name = gr.Textbox(label="Sweep name", placeholder="empty = r-sweep-<date>-<time>",
                                    info="Names the group of runs in the runs list.")
            sweep_start = gr.Button("Queue sweep", variant="primary")
        sweep_message = gr.Markdown()
        sweep_pick = gr.Dropdown(sweeps.sweep_names(store), value=None, label="Sweep shown",
                                 info="Its runs' loss curves overlaid, and the table below.")
        sweep_plot = gr.Plot(label="Sweep: loss by rank")
        sweep_table = gr.Dataframe(headers=SWEEP_COLUMNS, interactive=False, label="Sweep results")

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
    signature = gr.State(None)

    live_outputs = [run, queue, status, progress, figure, log, command, signature]
    gr.Timer(1.5).tick(lambda r, f, last: refresh_live(sup, r, f, last), [run, follow, signature], live_outputs,
                       concurrency_limit=None)
    # picking a run by hand stops following the active one, and shows the pick at once
    run.input(lambda r: [False, *refresh_live(sup, r, False, None)], run, [follow, *live_outputs])

    def on_start(*args):
        text, _ = start_run(sup, models_dir, values(*args))
        return text, True  # follow the new run (it shows once it trains or heads the queue)

    start.click(on_start, inputs, [message, follow])
    stop.click(lambda r: act(Supervisor.stop, sup, r, "Stopping **{run_id}**: it saves a checkpoint first."),
               run, message)
    resume.click(lambda r: act(Supervisor.resume, sup, r, "**{run_id}** is queued to resume from its last checkpoint."),
                 run, message)
    cancel.click(lambda r: act(Supervisor.cancel, sup, r, "Cancelled **{run_id}**."), run, message)
    preview_button.click(lambda *args: preview(values(*args), store.root), inputs, preview_code)
    if detected > 1:  # the per-GPU figure follows every setting it depends on
        gr.on([parallel["gpus"].change, parallel["strategy"].change, shared.method_settings.change,
               shared.batch_size.change, shared.cutoff_len.change, grad_accum.change, shared.model.change],
              lambda *args: per_gpu_text(values(*args), models_dir), inputs, per_gpu,
              trigger_mode="always_last", show_progress="hidden")

    def on_sweep(*args):
        text, name = start_sweep(sup, models_dir, values(*args[:-2]), args[-2], args[-1])
        names = sweeps.sweep_names(store)
        return text, gr.update(choices=names, value=name) if name else gr.update(choices=names)

    sweep_start.click(on_sweep, inputs + [ranks, sweep_name], [sweep_message, sweep_pick])
    sweep_pick.change(lambda name: sweep_view(store, name), sweep_pick, [sweep_plot, sweep_table])

    runs_state = gr.State(None)
    runs_outputs = [table, overlay_pick, diff_a, diff_b, delete_pick, sweep_pick, sweep_plot, sweep_table, runs_state]
    gr.Timer(5).tick(lambda name, last: refresh_runs(store, name, last), [sweep_pick, runs_state], runs_outputs,
                     concurrency_limit=None)
    refresh.click(lambda name: refresh_runs(store, name, None), sweep_pick, runs_outputs)
    overlay_pick.change(lambda ids: overlay_runs(store, ids), overlay_pick, overlay_plot)
    gr.on([diff_a.change, diff_b.change], lambda a, b: diff_table(store, a, b), [diff_a, diff_b], [diff_message, diff])
    delete.click(lambda r: act(Supervisor.delete, sup, r, "Deleted **{run_id}**."), delete_pick, delete_message
                 ).then(lambda name: refresh_runs(store, name, None), sweep_pick, runs_outputs)
    return hyper
