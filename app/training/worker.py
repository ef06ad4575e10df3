"""The training worker: reads one run.yaml, trains, and records status, metrics, checkpoints and the final weights.

`python launch.py train runs/<id>/run.yaml [--resume]` runs `run_training`; the UI starts that command in its own
process and only reads what this module writes. The loop in `train_run` reads top to bottom (set-up, steps,
checkpoints, end); the rest lives beside it: what is learnt, i.e. how rows become examples and batches and their
loss (the run's objective, `app.objectives`), which batches each step trains on (`app.training.plan`), attention
inside packed rows (`app.training.attention`), the side concerns `Recorder` (status.json + metrics.jsonl),
`StopSignal` (SIGTERM = save and stop) and `Checkpointer` (atomic step-N folders) in `app.training.checkpoints`,
and the device, threads and memory probes (`app.training.hardware`).

Where the speed comes from, without changing what is learned (same rows per step, loss = mean over the targets of
the optimizer step):
- the rows of a batch are packed into one padding-free sequence, with position ids restarting per row and an
  attention function (`varlen_sdpa`) that attends within each row only, so no pad token is ever computed;
- the vocabulary projection runs only at positions that carry a label (`logits_to_keep`), so the prompt's
  positions never pay for the 49k-wide lm_head and its softmax;
- no activation recomputation unless the run asks for gradient checkpointing, and no per-step metrics over the
  vocabulary;
- on a CPU, one thread per idle core (`cpu_threads`): on a shared machine a thread on a busy core stalls the rest.

Under `accelerate launch --multi_gpu --num_processes N` (or torchrun) the same command trains data-parallel
(`app.training.dist`): every micro-batch is split between the ranks, so the rows per optimizer step, the loss and the
learning rate schedule are those of the single-process run; the logged loss is the all-reduced mean, and only
rank 0 writes status, metrics, checkpoints and final/ (other ranks get a `NullRecorder` and a `ReadOnlyCheckpointer`).
With `strategy: ddp` every rank holds the whole model and gradients are averaged across ranks before the optimizer
step; with `strategy: fsdp` the model is sharded by FSDP2 (weights, gradients and optimizer state split between
the ranks, gradients averaged in the backward), and checkpoints and final/ are gathered whole on every rank and
written by rank 0 in the single-process format, so either strategy resumes them and the Compare tab loads them.
Every rank runs the same number of forward passes (FSDP gathers each layer's weights in each one). Each process
still loads the whole model before sharding it. QLoRA (4-bit weights are not plain tensors FSDP can split) and
AdaLoRA (its rank update reads whole matrices between forwards) are refused under fsdp.
"""
from __future__ import annotations

import math
import os
import random
import sys
import time
import traceback
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from app.memory.device import is_oom
from app.presets import config_from_preset
from app.runs.store import (COMPLETED, EXIT_BUSY, FAILED, STOPPED, WORKER_LOCK, RunBusy, RunLock, RunStatus, RunStore,
                            complete_checkpoints, is_disk_full)
from app.spec import ConfigError, RunConfig
from app.training.attention import VARLEN, can_pack, register_varlen_attention
from app.objectives import Objective, ObjectiveError, get_objective
from app.objectives.batches import Batch
from app.training.plan import DataPlan, batches_of
from app.training.checkpoints import Checkpointer, NullRecorder, ReadOnlyCheckpointer, Recorder, StopSignal, save_final
from app.training.dist import Dist, from_environment, strategy_for
from app.training.hardware import cpu_threads, current_memory_bytes, oom_reason, pick_device
from app.workspace import Workspace


EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


class TrainFailure(Exception):
    """A run that cannot go on; `kind` is the status failure (oom, nan, data, disk, error), `reason` plain words."""

    def __init__(self, kind: str, reason: str):
        super().__init__(reason)
        self.kind, self.reason = kind, reason


# --- validation -----------------------------------------------------------------------------------------------
@torch.no_grad()
def evaluate(model, batches: list[Batch], objective: Objective, packed: bool, device: torch.device, pad_id: int,
             autocast=None, dist: Dist = Dist()) -> float:
    """The objective's mean loss over every target of the validation rows (dropout off); under several
    processes each evaluates every world_size-th batch and the sums are added up."""
    was_training = model.training
    model.eval()
    total, count, sums = 0.0, 0, {}
    rounds = math.ceil(len(batches) / dist.world_size)
    for i in range(dist.rank, rounds * dist.world_size, dist.world_size):
        # a rank past the last batch runs the first one unrecorded: under FSDP every forward is a collective
        batch, weight = (batches[i], 1) if i < len(batches) else (batches[0], 0)
        with autocast or nullcontext():
            loss, metrics = loss_and_metrics(objective.loss_sum(model, batch, packed, device, pad_id))
        total += weight * float(loss)
        for key, value in metrics.items():
            sums[key] = sums.get(key, 0.0) + weight * value
        count += weight * batch.n_targets
    model.train(was_training)
    keys = sorted(sums)
    total, count, *values = dist.all_reduce_sum([total, count, *(sums[k] for k in keys)])
    return total / max(count, 1), {f"eval_{k}": v / max(count, 1) for k, v in zip(keys, values)}


def loss_and_metrics(out) -> tuple[Any, dict[str, float]]:
    """An objective's loss_sum result as (summed loss, summed metrics): a bare loss records no metrics."""
    return out if isinstance(out, tuple) else (out, {})


# --- set-up ----------------------------------------------------------------------------------------------------
@dataclass
class Setup:
    objective: Objective  # what is learnt: its examples, batches and loss
    model: Any
    tokenizer: Any
    plan: DataPlan
    val_batches: list[Batch]
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: Any
    device: torch.device
    autocast: Any
    packed: bool
    pad_id: int
    method: str
    explode_above: float  # a loss above this is a diverged run, not a slow one
    dist: Dist = Dist()  # the other processes of a data-parallel run, or none
    step_metrics: dict[str, float] = field(default_factory=dict)  # the objective's own metrics of the last step


def load_examples(config: RunConfig, objective: Objective, tokenizer) -> tuple[list, list, int]:
    """(training examples, validation examples, training rows that gave no example)."""
    from app.data.dataset import load_training_rows, split_rows

    def rows_of(path: str | None) -> list[dict]:
        if not path or not Path(path).is_file():
            raise TrainFailure("data", f"the dataset file {path!r} does not exist")
        try:
            rows = load_training_rows(path)
        except (ValueError, KeyError, TypeError, OSError) as e:  # the Data tab's checks report these row by row
            raise TrainFailure("data", f"could not read {Path(path).name}: {e}") from e
        if not rows:
            raise TrainFailure("data", f"{Path(path).name} has no rows")
        return rows

    rows = rows_of(config.dataset)
    if config.val_dataset:
        train_rows, val_rows = rows, rows_of(config.val_dataset)
    else:
        train_rows, val_rows = split_rows(rows, config.val_split, config.seed)
    try:
        train = objective.make_examples(tokenizer, train_rows, config)
        val = objective.make_examples(tokenizer, val_rows, config)
    except ObjectiveError as e:  # rows of another kind (say supervised rows for a preference objective)
        raise TrainFailure("data", str(e)) from e
    if not train:
        raise TrainFailure(
            "data", f"none of the {len(train_rows)} training rows has an answer to learn from: empty outputs, prompts "
            f"longer than the cutoff length {config.cutoff_len}, or conversations the model's chat template cannot "
            f"write (tool calls on a template without tools). The Data tab names each one",
        )
    return train, val, max(0, len(train_rows) - len(train))


def make_optimizer(config: RunConfig, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    if config.optimizer == "adamw8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(params, lr=config.learning_rate, weight_decay=config.weight_decay)
    if config.optimizer == "sgd":
        return torch.optim.SGD(params, lr=config.learning_rate, momentum=0.9, weight_decay=config.weight_decay)
    # fused: one operation for all parameters (TRL's default too) instead of about seven per parameter; same update
    fused = bool(params) and all(p.device.type in ("cuda", "cpu") and p.dtype in (torch.float32, torch.float16, torch.bfloat16)
                                 for p in params)
    return torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=config.weight_decay, fused=fused or None)


def setup(config: RunConfig, workspace: Workspace, echo: Callable[[str], None], dist: Dist = Dist()) -> Setup:
    from transformers import AutoTokenizer, get_scheduler

    from app.methods import MethodError, get_method
    from app.models import resolve_model
    from app.training.loading import load_for_training

    device = pick_device()
    if device.type == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(cpu_threads())
    echo(f"device: {device}" + (f" ({torch.get_num_threads()} threads)" if device.type == "cpu" else "")
         + (f", {dist.world_size} processes" if dist.world_size > 1 else ""))
    random.seed(config.seed)
    torch.manual_seed(config.seed)

    model_dir = resolve_model(config.model, workspace.models)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    objective = get_objective(config.objective)
    train, val, skipped = load_examples(config, objective, tokenizer)
    if skipped:
        echo(f"note: {skipped} training rows are skipped: nothing of their answers fits the cutoff of {config.cutoff_len} "
             f"tokens, or the model's chat template cannot write them (the Data tab and `data check` name each one)")
    plan = DataPlan(train, config, objective.make_batch)
    echo(f"data: {len(train)} training rows ({sum(len(e.input_ids) for e in train)} tokens), {len(val)} validation rows")

    spec, strategy = get_method(config.method), strategy_for(config.strategy)
    if dist.world_size > 1 and strategy == "fsdp":
        quantized = spec.load_kwargs(config.method_settings).get("quantization_config") is not None
        why = ("its base model is loaded quantized (4-bit), and FSDP splits only plain weights" if quantized else
               "it re-allocates its ranks from whole weight matrices after every step" if spec.after_backward else "")
        if why:
            raise TrainFailure("error", f"{spec.label} cannot be sharded with FSDP: {why}. Set the strategy to ddp "
                                        f"(every GPU holds the whole model), or pick LoRA to keep fsdp.")
    try:  # loaded as the memory estimate assumes (dtype per precision, quantization), the method applied
        model, precision = load_for_training(model_dir, config, total_steps=plan.total_steps, device=device.type)
    except MethodError as e:  # e.g. BitFit on a model without biases: nothing to train
        raise TrainFailure("error", str(e)) from e
    model.config.use_cache = False
    packed = can_pack(model, config.cutoff_len)
    if packed:
        register_varlen_attention()
        (model.get_base_model() if hasattr(model, "get_base_model") else model).set_attn_implementation(VARLEN)
    model.train()
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    autocast_dtype = getattr(torch, precision.autocast_dtype) if precision.autocast_dtype else None
    autocast = torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype is not None else None
    if objective.prepare is not None:  # before a resumed run's checkpoint is loaded: the weights as training starts
        t = time.monotonic()
        objective.prepare(model, train + val, packed, device, pad_id, autocast)
        echo(f"reference log-probabilities of {len(train) + len(val)} examples: {time.monotonic() - t:.1f} s")
    dist.broadcast_parameters([p for p in model.parameters() if p.requires_grad])
    dist.shard(model, strategy)  # before the optimizer: under fsdp it must hold the shards
    if dist.sharded:
        echo(f"fsdp: weights, gradients and optimizer state split between {dist.world_size} processes")

    optimizer = make_optimizer(config, [p for p in model.parameters() if p.requires_grad])
    scheduler = get_scheduler(
        "constant_with_warmup" if config.scheduler == "constant" else config.scheduler, optimizer,
        num_warmup_steps=config.warmup_steps, num_training_steps=plan.total_steps,
    )
    scaler = dist.grad_scaler(device.type) if autocast_dtype == torch.float16 else None
    vocab = getattr(model.config.get_text_config(), "vocab_size", None) or 50_000
    return Setup(
        objective, model, tokenizer, plan, batches_of(val, config.batch_size, objective.make_batch), optimizer, scheduler,
        scaler, device, autocast,
        packed, pad_id, config.method, explode_above=3 * math.log(vocab), dist=dist,
    )


# --- the run ---------------------------------------------------------------------------------------------------
def trainable_weights(model, dist: Dist = Dist()) -> dict[str, torch.Tensor]:
    """Whole CPU copies (gathered under FSDP: every rank calls it, rank 0 gets them)."""
    return dist.trainable_weights(model)


def training_state(s: Setup, step: int, tokens: int, elapsed: float) -> dict[str, Any]:
    return {
        "step": step, "tokens": tokens, "elapsed": elapsed,
        "data_position": {"micro_batch": min(step * s.plan.grad_accum, s.plan.total_micro), "per_epoch": s.plan.per_epoch},
        "optimizer": s.dist.optimizer_state(s.model, s.optimizer), "scheduler": s.scheduler.state_dict(),
        "scaler": s.scaler.state_dict() if s.scaler else None,
        "rng": {
            "python": random.getstate(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        },
    }


def restore(s: Setup, folder: Path) -> tuple[int, int, float]:
    """Load a checkpoint into the set-up; returns (step, tokens, elapsed) to continue from."""
    weights, state = Checkpointer.load(folder)
    if state["data_position"]["per_epoch"] != s.plan.per_epoch:
        raise TrainFailure("data", f"the dataset changed since {folder.name} was saved ({state['data_position']['per_epoch']} "
                                   f"batches per epoch then, {s.plan.per_epoch} now): start a new run instead of resuming")
    params = dict(s.model.named_parameters())
    missing = [n for n in weights if n not in params]
    if missing:
        raise TrainFailure("error", f"checkpoint {folder.name} does not match this model/method (e.g. {missing[0]})")
    s.dist.load_weights(params, weights)
    s.dist.load_optimizer_state(s.model, s.optimizer, state["optimizer"])
    s.scheduler.load_state_dict(state["scheduler"])
    if s.scaler and state.get("scaler"):
        s.scaler.load_state_dict(state["scaler"])
    random.setstate(state["rng"]["python"])
    torch.set_rng_state(state["rng"]["torch"])
    if state["rng"].get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng"]["cuda"])
    return int(state["step"]), int(state["tokens"]), float(state["elapsed"])


def format_progress(step: int, total: int, loss: float, lr: float, tok_s: float, elapsed: float) -> str:
    eta = elapsed / step * (total - step) if step else 0
    clock = lambda s: time.strftime("%H:%M:%S", time.gmtime(s))  # noqa: E731
    return f"step {step}/{total} | loss {loss:.4f} | lr {lr:.2e} | {tok_s:.0f} tok/s | {clock(elapsed)} elapsed, ETA {clock(eta)}"


def shard(batch: Batch, dist: Dist, make_batch: Callable[[list], Batch]) -> tuple[Batch, float]:
    """This rank's rows of a micro-batch and their weight. A rank left without a row (a batch smaller than the
    world) runs one row at weight 0, so that it still takes part in every gradient all-reduce."""
    if dist.world_size == 1:
        return batch, 1.0
    rows = batch.examples[dist.rank::dist.world_size]
    return (make_batch(rows), 1.0) if rows else (make_batch(batch.examples[:1]), 0.0)


def forward_backward(s: Setup, batches: list[Batch]) -> float:
    """Gradients of one optimizer step; the loss is the mean over all labelled positions of its micro-batches.

    Each rank divides its share's summed loss by the whole step's label count times world_size: once
    `average_gradients` divides the sum over ranks by world_size, gradient and mean loss are the single-process ones."""
    n_targets = sum(b.n_targets for b in batches)
    step_loss, sums = 0.0, {}
    for batch in batches:
        part, weight = shard(batch, s.dist, s.objective.make_batch)
        with s.autocast or nullcontext():
            loss, metrics = loss_and_metrics(s.objective.loss_sum(s.model, part, s.packed, s.device, s.pad_id))
            loss = loss * (weight * s.dist.world_size / n_targets)
        (s.scaler.scale(loss) if s.scaler else loss).backward()
        step_loss += float(loss.detach())
        for key, value in metrics.items():
            sums[key] = sums.get(key, 0.0) + weight * value
    s.step_metrics = {}
    if sums:  # the objective's own metrics, as means over the step's targets
        keys = sorted(sums)
        values = s.dist.all_reduce_sum([sums[k] for k in keys])
        s.step_metrics = {k: v / n_targets for k, v in zip(keys, values)}
    return s.dist.all_reduce_mean(step_loss)


def check_loss(loss: float, step: int, config: RunConfig, explode_above: float) -> None:
    if math.isfinite(loss) and loss <= explode_above:
        return
    what = "NaN or infinite" if not math.isfinite(loss) else f"{loss:.3g}"
    raise TrainFailure("nan", (
        f"the loss became {what} at step {step}: training diverged. Lower the learning rate (now "
        f"{config.learning_rate:g}), add warm-up steps, or keep gradient clipping on (max_grad_norm, now "
        f"{config.max_grad_norm:g})."
    ))


def optimizer_step(s: Setup, config: RunConfig, step: int) -> float:
    """Clip, step, schedule; returns the learning rate this step used."""
    from app.methods import after_backward

    s.dist.average_gradients(p for g in s.optimizer.param_groups for p in g["params"])
    if s.scaler:
        s.scaler.unscale_(s.optimizer)
    if config.max_grad_norm > 0:
        torch.nn.utils.clip_grad_norm_([p for g in s.optimizer.param_groups for p in g["params"]], config.max_grad_norm)
    lr = s.scheduler.get_last_lr()[0]
    if s.scaler:
        s.scaler.step(s.optimizer)
        s.scaler.update()
    else:
        s.optimizer.step()
    s.scheduler.step()
    after_backward(s.model, s.method, step)  # AdaLoRA re-distributes its ranks here, with this step's gradients
    s.optimizer.zero_grad(set_to_none=True)
    return lr


def train_run(config: RunConfig, store: RunStore, run_id: str, workspace: Workspace, resume: bool,
              echo: Callable[[str], None], recorder: Recorder, stop: StopSignal, dist: Dist = Dist()) -> str:
    """Train one run to its end; returns the final state (completed or stopped), raises TrainFailure."""
    s = setup(config, workspace, echo, dist)
    model, plan = s.model, s.plan
    checkpointer = (Checkpointer if dist.is_main else ReadOnlyCheckpointer)(store.checkpoints_dir(run_id), config.keep_last)

    step, tokens, elapsed_before = 0, 0, 0.0
    if resume:
        done = checkpointer.complete()
        if done:
            step, tokens, elapsed_before = restore(s, done[-1])
            echo(f"resuming from {done[-1].name}")
        else:
            echo("no complete checkpoint: starting from the beginning")
        recorder.drop_metrics_after(step)
    recorder.start(plan.total_steps, step)
    echo(f"training {plan.total_steps} steps ({'packed rows' if s.packed else 'padded batches'})")

    t0, train_seconds, session_tokens = time.monotonic(), 0.0, 0
    saved_step = first_step = step
    while step < plan.total_steps and not dist.any(stop.requested):
        step += 1
        t_step = time.monotonic()
        batches, epoch = plan.step_batches(step)
        step_loss = forward_backward(s, batches)
        check_loss(step_loss, step, config, s.explode_above)
        lr = optimizer_step(s, config, step)

        step_tokens = sum(b.n_tokens for b in batches)
        tokens += step_tokens
        session_tokens += step_tokens
        train_seconds += time.monotonic() - t_step
        elapsed = elapsed_before + time.monotonic() - t0
        if step % config.log_every == 0 or step == plan.total_steps:
            tok_s = session_tokens / max(train_seconds, 1e-9)
            recorder.metric({
                "step": step, "epoch": round(epoch, 4), "loss": step_loss, "lr": lr, "tokens": tokens,
                "tokens_per_s": round(tok_s, 2), "elapsed": round(elapsed, 3), "mem_bytes": current_memory_bytes(s.device),
                **s.step_metrics,
            })
            echo(format_progress(step, plan.total_steps, step_loss, lr, tok_s, elapsed))
        recorder.step(step)
        if s.val_batches and config.eval_every and step % config.eval_every == 0 and step < plan.total_steps:
            eval_loss, eval_metrics = evaluate(model, s.val_batches, s.objective, s.packed, s.device, s.pad_id, s.autocast, dist)
            recorder.metric({"step": step, "eval_loss": eval_loss, **eval_metrics})
            echo(f"step {step}: validation loss {eval_loss:.4f}")
        if config.save_every and step % config.save_every == 0 and step < plan.total_steps:
            save_checkpoint(checkpointer, s, step, tokens, elapsed_before + time.monotonic() - t0)
            saved_step = step

    final_state = COMPLETED if step >= plan.total_steps else STOPPED
    if final_state == COMPLETED and s.val_batches and step > first_step:
        eval_loss, eval_metrics = evaluate(model, s.val_batches, s.objective, s.packed, s.device, s.pad_id, s.autocast, dist)
        recorder.metric({"step": step, "eval_loss": eval_loss, **eval_metrics})
        echo(f"validation loss {eval_loss:.4f}")
    if saved_step != step:
        try:
            save_checkpoint(checkpointer, s, step, tokens, elapsed_before + time.monotonic() - t0)
        except TrainFailure as f:
            if f.kind != "disk" or final_state != COMPLETED:
                raise
            # a finished run needs final/ (the weights it trained), not a checkpoint to resume from (which also
            # holds the optimizer's state, often several times larger): the final weights get the space there is
            echo(f"no room for a last checkpoint at step {step}; saving the final weights without it")
    _release_varlen(model, s.packed)
    save_final(model, s.tokenizer, config.method, store.final_dir(run_id), dist)
    recorder.finish(final_state, step=step, reason="stopped by request" if final_state == STOPPED else "")
    echo(f"{final_state} at step {step}/{plan.total_steps}; final weights in {store.final_dir(run_id)}")
    return final_state


def save_checkpoint(checkpointer: Checkpointer, s: Setup, step: int, tokens: int, elapsed: float) -> None:
    try:
        checkpointer.save(step, trainable_weights(s.model, s.dist), training_state(s, step, tokens, elapsed))
    except Exception as e:  # torch's writer says a full disk with a RuntimeError, not an OSError
        if is_disk_full(e):
            raise TrainFailure("disk", disk_full_reason(f"Could not save the checkpoint at step {step}", e,
                                                        checkpointer.root)) from e
        if not isinstance(e, OSError):
            raise
        previous = checkpointer.complete()
        keep = f"the last complete checkpoint ({previous[-1].name}) is intact" if previous else "no earlier checkpoint exists"
        raise TrainFailure("error", f"could not save the checkpoint at step {step}: {e.strerror or e}; {keep}.") from e


def _release_varlen(model, packed: bool) -> None:
    # final/ holds the model's own config: reset the attention so nothing saved names this process's function
    if packed:
        (model.get_base_model() if hasattr(model, "get_base_model") else model).set_attn_implementation("sdpa")


# --- entry points ----------------------------------------------------------------------------------------------
def run_training(run_yaml: str | Path, resume: bool = False, echo: Callable[[str], None] | None = None,
                 stop: StopSignal | None = None) -> int:
    """`launch.py train RUN.yaml`: the exit code is 0 completed/stopped, 1 failed, 2 unusable run.yaml, 3 refused
    because another process trains this run (which is left untouched).

    A run has one writer: rank 0 (the only process that writes, under `accelerate launch`) holds the run's lock
    from before its first write to its exit. `stop` replaces the signal handlers with a caller's own flag (anything
    with a `requested` attribute)."""
    run_yaml = Path(run_yaml).resolve()
    rank0 = int(os.environ.get("RANK", "0")) == 0
    lock = RunLock(run_yaml.parent / WORKER_LOCK)
    if rank0:
        try:
            lock.acquire()
        except RunBusy as e:
            print(f"error: {e}", file=sys.stderr, flush=True)
            return EXIT_BUSY
        except FileNotFoundError:
            pass  # no such run folder: reading run.yaml below says so
        except OSError as e:  # a read-only or full disk: no lock file, and so no run that could record anything
            what = "the disk is full" if is_disk_full(e) else (e.strerror or str(e))
            print(f"error: cannot take the run's lock {lock.path}: {what}. Free space or check the folder's "
                  f"permissions, then start it again.", file=sys.stderr, flush=True)
            return EXIT_FAILED
    try:
        return _train_holding_the_lock(run_yaml, rank0, resume, echo, stop)
    finally:
        lock.release()


def _train_holding_the_lock(run_yaml: Path, rank0: bool, resume: bool, echo: Callable[[str], None] | None,
                            stop: StopSignal | None) -> int:
    echo = echo or (lambda line: print(line, flush=True))
    run_dir = run_yaml.parent
    store = RunStore(run_dir.parent)
    if not rank0:  # one copy of the progress lines in the terminal and train.log; failures still print, tagged
        echo = _tagged_failures(int(os.environ["RANK"]))
    has_status = (run_dir / "status.json").is_file()
    try:
        config = near_run_yaml(RunConfig.from_yaml(run_yaml), run_dir)  # the method's settings checked there too
    except (ConfigError, OSError) as e:
        message = f"{run_yaml}: {e}"
        print(f"error: {message}", file=sys.stderr, flush=True)
        if has_status and rank0:
            store.update_status(run_dir.name, state=FAILED, failure="error", reason=f"unusable run.yaml: {e}", finished=time.time())
        return EXIT_USAGE
    if not has_status and rank0:
        store.write_status(run_dir.name, RunStatus())
    # runs/<id>/run.yaml lives in WORKSPACE/runs
    workspace = Workspace(run_dir.parent.parent)
    recorder = Recorder(store, run_dir.name) if rank0 else NullRecorder()
    dist: Dist = Dist()
    try:
        dist = from_environment()
        with StopSignal() as signals:
            train_run(config, store, run_dir.name, workspace, resume, echo, recorder, stop or signals, dist)
        dist.close()
        return EXIT_OK
    except TrainFailure as f:
        kind, reason = f.kind, f.reason
    except Exception as e:  # noqa: BLE001 - every failure ends as a status the UI can show
        _quietly(traceback.print_exc)  # the log may be on a full disk
        kind, reason = failure_of(e, config, store, run_dir.name)
    except KeyboardInterrupt:
        kind, reason = "error", "interrupted twice: stopped without saving"
    record_failure(recorder, echo, kind, reason)
    return EXIT_FAILED


def failure_of(e: Exception, config: RunConfig, store: RunStore, run_id: str) -> tuple[str, str]:
    """(status failure kind, plain words) for an error the loop did not name itself."""
    if is_oom(e):
        return "oom", oom_reason(config, store.status(run_id).step)
    if is_disk_full(e):  # from any writer: the metrics, the log, final/, a status on a disk that just filled
        return "disk", disk_full_reason("Training stopped", e, store.checkpoints_dir(run_id))
    return "error", _short_error(e)


def disk_full_reason(what: str, e: BaseException, checkpoints: Path) -> str:
    done = complete_checkpoints(checkpoints)
    keep = f"the last complete checkpoint ({done[-1].name}) is intact" if done else "no checkpoint was saved before"
    detail = e.strerror if isinstance(e, OSError) and e.strerror else _short_error(e)
    return (f"{what}: the disk is full ({detail}); {keep}. Free space on the disk that holds {checkpoints} (this "
            f"run's checkpoints; other runs' are beside it in {checkpoints.parent.parent}), then resume the run.")


def record_failure(recorder: Recorder, echo: Callable[[str], None], kind: str, reason: str) -> None:
    """The worker's last word: status.json first (on a full disk `RunStore.write_status` rewrites it in place),
    then the log, which may be on that full disk too. Should status.json stay unwritten all the same, its readers
    still see the worker gone (`RunStore.seen`)."""
    try:
        recorder.finish(FAILED, failure=kind, reason=reason)
    except OSError as e:
        unrecorded = f"could not record the failure in status.json: {e}"
        _quietly(lambda: print(unrecorded, file=sys.stderr, flush=True))
    _quietly(lambda: echo(f"failed ({kind}): {reason}"))


def _quietly(write: Callable[[], Any]) -> None:
    try:
        write()
    except OSError:  # no room left for a log line: the status says what happened
        pass


def near_run_yaml(config: RunConfig, run_dir: Path) -> RunConfig:
    """A relative model or dataset path that exists next to run.yaml means that file (an exported run folder
    moved to another machine); otherwise it keeps its usual meaning (the working directory, a hub id)."""
    for name in ("model", "dataset", "val_dataset"):
        value = getattr(config, name)
        if value and not Path(value).is_absolute() and (run_dir / value).exists():
            setattr(config, name, str(run_dir / value))
    return config


def _tagged_failures(rank: int) -> Callable[[str], None]:
    def echo(line: str) -> None:
        if line.startswith("failed"):
            print(f"[rank {rank}] {line}", file=sys.stderr, flush=True)
    return echo


def _short_error(e: BaseException) -> str:
    from app.models import ModelError

    if isinstance(e, ModelError):
        return str(e)
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {text[:300]}" if text else type(e).__name__


# --- presets: headless runs ------------------------------------------------------------------------------------
def run_preset(name: str, workspace_dir: str | None, overrides: dict[str, Any]) -> int:
    """`launch.py train --preset NAME --workspace DIR`: create the run in DIR/runs and train it here."""
    try:
        config = config_from_preset(name, overrides)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    workspace = Workspace.open(workspace_dir)
    store = RunStore(workspace.runs)
    run_id = store.create(config)
    log = store.log_path(run_id)
    print(f"run {run_id} in {store.dir(run_id)}", flush=True)

    def echo(line: str) -> None:  # the terminal and train.log see the same lines
        print(line, flush=True)
        with open(log, "a", encoding="utf-8") as f:
            f.write(line + "\n")

    return run_training(store.config_path(run_id), echo=echo)
