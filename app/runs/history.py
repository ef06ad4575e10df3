"""Runs as plain data for the UI: their curves, progress, one-line summaries, status in words, settings diffs, and
signatures that tell the UI when a run's files changed."""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

from app.runs.store import (COMPLETED, FAILED, INTERRUPTED, QUEUED, RUNNING, STOPPED, RunNotFound, RunStatus, RunStore,
                            checkpoint_step)
from app.spec import RunConfig

UNREADABLE_STATUS = RunStatus.from_dict(None).reason  # what RunStore.status says for a garbled status.json
BROKEN = "broken"  # shown instead of a state when a run folder cannot be read


def number(value: Any) -> float | None:
    """A finite number from a metrics field, else None (metrics lines come from another process and may be odd)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        value = float(value)
    except OverflowError:  # an integer with hundreds of digits
        return None
    return value if math.isfinite(value) else None


# --- curves ----------------------------------------------------------------------------------------------------
@dataclass
class Curves:
    train: list[tuple[int, float | None]] = field(default_factory=list)  # (step, loss); None where the loss was NaN
    eval: list[tuple[int, float]] = field(default_factory=list)
    lr: list[tuple[int, float]] = field(default_factory=list)
    last: dict[str, Any] = field(default_factory=dict)  # the newest training record (tokens_per_s, mem_bytes, ...)
    elapsed: list[tuple[int, float]] = field(default_factory=list)  # (step, seconds) for the ETA
    extra: dict[str, list[tuple[int, float]]] = field(default_factory=dict)  # an objective's other metrics, by key


def curves(records: list[dict[str, Any]], extra: Sequence[str] = ()) -> Curves:
    """Training and validation curves from metrics.jsonl records, one point per step; `extra` names the other metrics
    the run's objective records (app.objectives.Objective.extra_metrics), each collected where a record has it.

    A resumed run logs again the steps after its last checkpoint: the later record wins, so the curve continues
    where the checkpoint left it instead of doubling back."""
    train: dict[int, dict[str, Any]] = {}
    evals: dict[int, float] = {}
    extras: dict[str, dict[int, float]] = {key: {} for key in extra}
    for record in records:
        step = number(record.get("step"))
        if step is None or step < 0 or step != int(step):
            continue
        step = int(step)
        for key in extra:
            if key in record and (value := number(record[key])) is not None:
                extras[key][step] = value
        if "eval_loss" in record:
            value = number(record["eval_loss"])
            if value is not None:
                evals[step] = value
        elif "loss" in record:
            train.pop(step, None)  # re-insert so the newest record is also the last one
            train[step] = record
    out = Curves(eval=sorted(evals.items()), extra={key: sorted(points.items()) for key, points in extras.items() if points})
    for step in sorted(train):
        record = train[step]
        out.train.append((step, number(record.get("loss"))))
        if (lr := number(record.get("lr"))) is not None:
            out.lr.append((step, lr))
        if (elapsed := number(record.get("elapsed"))) is not None:
            out.elapsed.append((step, elapsed))
    if train:
        out.last = train[max(train)]
    return out


def final_train_loss(c: Curves, last_n: int = 5) -> float | None:
    """Mean of the last few logged losses: one step's loss is too noisy to compare runs by."""
    values = [v for _, v in c.train[-last_n:] if v is not None]
    return sum(values) / len(values) if values else None


def estimated_bytes(estimate: dict[str, Any] | None, device: str = "") -> float | None:
    """The memory estimate recorded in run.yaml (RunConfig.estimate, a MemoryEstimate.to_dict()), if any: the figure
    comparable with a peak measured on `device` (CUDA's reserved memory, or a CPU process's resident memory)."""
    if not isinstance(estimate, dict):
        return None
    comparable = estimate.get("comparable_peak_bytes")
    if device and isinstance(comparable, dict) and (value := number(comparable.get(device))) is not None:
        return value
    return number(estimate.get("total_bytes"))


def estimated_trainable(estimate: dict[str, Any] | None) -> float | None:
    return number(estimate.get("trainable")) if isinstance(estimate, dict) else None


# --- progress --------------------------------------------------------------------------------------------------
@dataclass
class Progress:
    step: int
    total: int
    elapsed_s: float | None
    eta_s: float | None
    tokens_per_s: float | None
    mem_bytes: float | None

    @property
    def fraction(self) -> float:
        return min(1.0, self.step / self.total) if self.total > 0 else 0.0


def seconds_per_step(c: Curves, window: int = 20) -> float | None:
    """From the recent records only; a resume restarts the worker's clock, so stop at the last time it went back."""
    recent = c.elapsed[-window:]
    start = 0
    for i in range(1, len(recent)):
        if recent[i][1] < recent[i - 1][1]:
            start = i
    recent = recent[start:]
    if len(recent) < 2 or recent[-1][0] <= recent[0][0]:
        return None
    return (recent[-1][1] - recent[0][1]) / (recent[-1][0] - recent[0][0])


def training_seconds(status: RunStatus, c: Curves, now: float | None = None) -> float | None:
    """Time spent training: the worker's own clock, summed over its sessions when a resume restarted it."""
    if c.elapsed:
        total, previous = 0.0, 0.0
        for _, elapsed in c.elapsed:
            if elapsed < previous:
                total += previous
            previous = elapsed
        return total + previous
    if status.started:
        return (status.finished or now or time.time()) - status.started
    return None


def progress(status: RunStatus, c: Curves, now: float | None = None) -> Progress:
    step = max(int(status.step or 0), c.train[-1][0] if c.train else 0)
    total = int(status.total_steps or 0)
    elapsed = training_seconds(status, c, now)
    eta = None
    rate = seconds_per_step(c)
    if status.state == RUNNING and rate is not None and total > step:
        eta = rate * (total - step)
    return Progress(step, total, elapsed, eta, number(c.last.get("tokens_per_s")), number(c.last.get("mem_bytes")))


def fmt_duration(seconds: float | None) -> str:
    if seconds is None:
        return "–"
    s = int(round(seconds))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {s % 3600 // 60:02d} min"


def fmt_bytes(n: float | None) -> str:
    if n is None:
        return "–"
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


def progress_text(p: Progress) -> str:
    parts = [f"step {p.step} of {p.total}" if p.total else f"step {p.step}"]
    if p.total:
        parts[0] += f" ({p.fraction:.0%})"
    parts.append(f"elapsed {fmt_duration(p.elapsed_s)}")
    if p.eta_s is not None:
        parts.append(f"about {fmt_duration(p.eta_s)} left")
    if p.tokens_per_s is not None:
        parts.append(f"{p.tokens_per_s:,.0f} tokens/s")
    if p.mem_bytes is not None:
        parts.append(f"memory {fmt_bytes(p.mem_bytes)}")
    return " · ".join(parts)


# --- status in words -------------------------------------------------------------------------------------------
FAILURE_WORDS = {
    "oom": "It ran out of memory.",
    "nan": "The loss became NaN or exploded.",
    "data": "There is a problem with the data.",
    "disk": "The disk is full.",
    "killed": "The training process died.",
    "error": "Training stopped on an error.",
}


def describe(status: RunStatus, position: int | None = None, queue_length: int = 0,
             last_checkpoint: int | None = None) -> str:
    """The run's state as one or two plain sentences."""
    resume_hint = (f" Resume continues from the checkpoint at step {last_checkpoint}." if last_checkpoint is not None
                   else " No checkpoint was saved yet, so Resume starts it again from the beginning.")
    reason = f" {status.reason}" if status.reason else ""
    if status.state == QUEUED:
        where = f" (position {position} of {queue_length})" if position else ""
        return f"Waiting in the queue{where}. It starts when the runs ahead of it finish."
    if status.state == RUNNING:
        return "Training. Closing or reloading the page does not stop it."
    if status.state == COMPLETED:
        return "Finished." + reason
    if status.state == STOPPED:
        return f"Stopped at step {status.step}.{reason}{resume_hint}"
    if status.state == INTERRUPTED:
        return f"Interrupted.{reason}{resume_hint}"
    if status.state == FAILED:
        return f"Failed. {FAILURE_WORDS.get(status.failure, FAILURE_WORDS['error'])}{reason}{resume_hint}"
    return f"Unknown state {status.state!r}.{reason}"


def last_checkpoint(store: RunStore, run_id: str) -> int | None:
    """The step of the run's newest finished checkpoint (what Resume continues from), or None."""
    checkpoints = store.checkpoints(run_id)
    return checkpoint_step(checkpoints[-1]) if checkpoints else None


# --- when to redraw --------------------------------------------------------------------------------------------
LIVE_FILES = ("status.json", "metrics.jsonl", "train.log")  # what the live view of one run shows
LISTED_FILES = ("run.yaml", "status.json", "metrics.jsonl")  # what the runs list shows


def run_signature(store: RunStore, run_id: str) -> tuple:
    """Changes whenever a file the live view of the run shows changes (None for a file that is not there)."""
    files = []
    for name in LIVE_FILES:
        try:
            st = (store.root / run_id / name).stat()
            files.append((st.st_mtime_ns, st.st_size))
        except OSError:
            files.append(None)
    return tuple(files)


def store_signature(store: RunStore) -> tuple:
    """Changes whenever a run is added or removed, or writes its config, status or metrics, and when a run recorded
    as running is seen to have lost its worker (which then could not write anything, e.g. on a full disk)."""
    try:
        names = sorted(d.name for d in store.root.iterdir() if d.is_dir())
    except OSError:
        return ()
    signature = []
    for name in names:
        for file in LISTED_FILES:
            try:
                st = (store.root / name / file).stat()
            except OSError:
                continue
            signature.append((name, file, st.st_mtime_ns, st.st_size))
        try:
            recorded = store.recorded_status(name)
        except RunNotFound:
            continue
        if recorded.state == RUNNING:
            signature.append((name, "seen", store.seen(name, recorded).state))
    return tuple(signature)


# --- summaries -------------------------------------------------------------------------------------------------
def model_label(ref: str) -> str:
    return Path(ref).name if "/" in ref and Path(ref).is_absolute() else ref


def method_args(config: RunConfig) -> dict[str, Any]:
    """The method's arguments with its defaults filled in (run.yaml keeps only what differs from them)."""
    return asdict(config.method_settings)


def key_settings(config: RunConfig) -> str:
    """The settings that tell runs apart at a glance (the diff shows all of them)."""
    args = ", ".join(f"{k}={v}" for k, v in method_args(config).items())
    length = f"{config.max_steps} steps" if config.max_steps > 0 else f"{config.epochs:g} epoch(s)"
    parts = [args] if args else []
    parts += [f"lr {config.learning_rate:g}", f"batch {config.batch_size}×{config.grad_accum}", length,
              f"cutoff {config.cutoff_len}"]
    return " · ".join(parts)


@dataclass
class RunSummary:
    run_id: str
    state: str  # a RunStatus state, or BROKEN
    model: str = ""
    method: str = ""
    settings: str = ""
    step: int = 0
    total_steps: int = 0
    train_loss: float | None = None
    eval_loss: float | None = None
    created: float = 0.0
    sweep: str | None = None
    problem: str = ""  # why a broken run cannot be read


def summarize(store: RunStore, run_id: str) -> RunSummary:
    """Never raises for a damaged folder: a garbled run.yaml or status.json makes a BROKEN row that says what is wrong."""
    try:
        status = store.status(run_id)
    except RunNotFound:
        return RunSummary(run_id, BROKEN, problem="status.json is missing")
    except OSError as e:
        return RunSummary(run_id, BROKEN, problem=f"status.json cannot be read ({e.strerror})")
    config = store.safe_config(run_id)
    if config is None:
        return RunSummary(run_id, BROKEN, created=status.created, problem="run.yaml is missing or garbled")
    if status.reason == UNREADABLE_STATUS:
        return RunSummary(run_id, BROKEN, model=model_label(config.model), method=config.method,
                          created=status.created, problem=UNREADABLE_STATUS)
    try:
        c = curves(store.metrics(run_id))
    except OSError:
        c = Curves()
    return RunSummary(
        run_id, status.state, model_label(config.model), config.method, key_settings(config),
        max(int(status.step or 0), c.train[-1][0] if c.train else 0), int(status.total_steps or 0),
        final_train_loss(c), c.eval[-1][1] if c.eval else None, status.created, config.sweep,
    )


def list_runs(store: RunStore) -> list[RunSummary]:
    """Every run folder, newest first; folders removed while listing are skipped."""
    try:
        ids = [d.name for d in store.root.iterdir() if d.is_dir() and (d / "run.yaml").exists()]
    except OSError:
        return []
    summaries = []
    for run_id in ids:
        try:
            summaries.append(summarize(store, run_id))
        except RunNotFound:  # an odd folder name that is not a run id
            continue
    return sorted(summaries, key=lambda s: (s.created, s.run_id), reverse=True)


# --- settings diff ---------------------------------------------------------------------------------------------
NOT_SETTINGS = ("run_id", "estimate")  # filled in by the app, different for every run


def flat_settings(config: RunConfig) -> dict[str, Any]:
    """The config as one level of `name: value`, method arguments as `method_args.r`."""
    flat: dict[str, Any] = {}
    for key, value in config.to_dict().items():
        if key in NOT_SETTINGS:
            continue
        if key == "method_args":
            value = method_args(config)
        if isinstance(value, dict):
            flat.update({f"{key}.{k}": v for k, v in value.items()})
        else:
            flat[key] = value
    return flat


def settings_diff(a: RunConfig, b: RunConfig) -> list[tuple[str, Any, Any]]:
    """(setting, value in a, value in b) for each setting that differs; a setting one side lacks shows as None."""
    fa, fb = flat_settings(a), flat_settings(b)
    return [(k, fa.get(k), fb.get(k)) for k in sorted(set(fa) | set(fb)) if fa.get(k) != fb.get(k)]
