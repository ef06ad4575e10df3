"""The training worker: reads one run.yaml, trains, and records status, metrics, checkpoints and the final weights.

`python launch.py train runs/<id>/run.yaml [--resume]` runs `run_training`; the UI starts that command in its own
process and only reads what this module writes. The loop in `train_run` reads top to bottom (set-up, steps,
checkpoints, end); side concerns are small helpers: `Recorder` (status.json + metrics.jsonl), `StopSignal`
(SIGTERM = save and stop), `Checkpointer` (atomic step-N folders).

Where the speed comes from, without changing what is learned (same rows per step, loss = mean over response
tokens of the optimizer step):
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
import resource
import shutil
import signal
import sys
import time
import traceback
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
import yaml

from app.training.dist import Dist, from_environment, strategy_for
from app.runs.store import COMPLETED, FAILED, RUNNING, STOPPED, RunStatus, RunStore
from app.spec import ConfigError, RunConfig
from app.data.template import IGNORE_INDEX
from app.workspace import Workspace, atomic_write_text, replace_dir

REPO_ROOT = Path(__file__).resolve().parents[2]
PRESETS_DIR = REPO_ROOT / "presets"
VARLEN = "varlen_sdpa"
STATUS_EVERY_S = 1.0  # status.json is rewritten at most this often (the UI polls it)

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


class TrainFailure(Exception):
    """A run that cannot go on; `kind` is the status failure (oom, nan, data, error), `reason` plain words."""

    def __init__(self, kind: str, reason: str):
        super().__init__(reason)
        self.kind, self.reason = kind, reason


# --- data: rows -> tokenized examples -> packed batches ---------------------------------------------------------
@dataclass
class Example:
    input_ids: list[int]
    targets: list[int]  # next-token label per position (IGNORE_INDEX where no loss is taken)

    @property
    def n_targets(self) -> int:
        return sum(t != IGNORE_INDEX for t in self.targets)


def tokenize_rows(tokenizer, rows: list[dict], cutoff_len: int, train_on_prompt: bool) -> list[Example]:
    """Examples with at least one position to learn from; a row whose answer was cut away teaches nothing."""
    from app.data.template import tokenize

    examples = []
    for row in rows:
        enc = tokenize(tokenizer, row, cutoff_len, train_on_prompt)
        # the label of position t is the token at t+1 of the same row: shift inside the row, never across rows
        example = Example(list(enc["input_ids"]), list(enc["labels"][1:]) + [IGNORE_INDEX])
        if example.n_targets:
            examples.append(example)
    return examples


@dataclass
class Batch:
    """Several rows packed into one sequence of real tokens: (1, n_tokens), no padding."""
    input_ids: torch.Tensor
    position_ids: torch.Tensor
    keep: torch.Tensor  # positions that carry a label
    kept_targets: torch.Tensor  # the labels at those positions
    cu_seqlens: torch.Tensor  # row boundaries (int32, on the CPU: the attention slices by them)
    max_len: int
    n_tokens: int
    n_targets: int
    examples: list[Example]


def pack(examples: list[Example]) -> Batch:
    ids, pos, targets, bounds = [], [], [], [0]
    for ex in examples:
        ids += ex.input_ids
        pos += range(len(ex.input_ids))
        targets += ex.targets
        bounds.append(len(ids))
    targets_t = torch.tensor(targets)
    keep = (targets_t != IGNORE_INDEX).nonzero().squeeze(1)
    return Batch(
        input_ids=torch.tensor([ids]), position_ids=torch.tensor([pos]), keep=keep, kept_targets=targets_t[keep],
        cu_seqlens=torch.tensor(bounds, dtype=torch.int32), max_len=max(len(e.input_ids) for e in examples),
        n_tokens=len(ids), n_targets=int(keep.numel()), examples=examples,
    )


def batches_of(examples: list[Example], batch_size: int) -> list[Batch]:
    return [pack(examples[i:i + batch_size]) for i in range(0, len(examples), batch_size)]


class DataPlan:
    """Which rows each optimizer step trains on; derived from the step alone, so a resumed run needs only the step."""

    def __init__(self, examples: list[Example], config: RunConfig):
        self.examples, self.batch_size, self.seed = examples, config.batch_size, config.seed
        self.grad_accum = config.grad_accum
        self.per_epoch = math.ceil(len(examples) / config.batch_size)
        micro = config.max_steps * config.grad_accum if config.max_steps > 0 else math.ceil(config.epochs * self.per_epoch)
        self.total_micro = max(1, micro)
        self.total_steps = math.ceil(self.total_micro / self.grad_accum)
        self._epoch_batches: dict[int, list[Batch]] = {}

    def epoch_batches(self, epoch: int) -> list[Batch]:
        if epoch not in self._epoch_batches:
            self._epoch_batches = {}  # one epoch at a time in memory
            gen = torch.Generator().manual_seed(self.seed + epoch)
            order = torch.randperm(len(self.examples), generator=gen).tolist()
            self._epoch_batches[epoch] = batches_of([self.examples[i] for i in order], self.batch_size)
        return self._epoch_batches[epoch]

    def step_batches(self, step: int) -> tuple[list[Batch], float]:
        """The micro-batches of optimizer step `step` (1-based) and the epoch reached after it."""
        first, last = (step - 1) * self.grad_accum, min(step * self.grad_accum, self.total_micro)
        batches = [self.epoch_batches(m // self.per_epoch)[m % self.per_epoch] for m in range(first, last)]
        return batches, last / self.per_epoch


# --- the model: packed attention and the loss -------------------------------------------------------------------
def varlen_sdpa(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, cu_seq_lens_q=None, **kwargs):
    """Causal attention inside each packed row only (no cross-row mask to build, no pad positions to compute).

    On a GPU in half precision one flash-attention call covers every row (`torch.nn.attention.varlen`); elsewhere
    each row gets its own sdpa call. Without row boundaries (generation, unpacked batches) it is the stock sdpa.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if cu_seq_lens_q is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    gqa = key.shape[1] != query.shape[1]
    p = dropout if module.training else 0.0
    if p == 0.0 and _FLASH.usable(query):
        out = _FLASH(query, key, value, cu_seq_lens_q, kwargs.get("max_length_q"), scaling)
        if out is not None:
            return out, None
    bounds = cu_seq_lens_q.tolist()
    parts = [
        F.scaled_dot_product_attention(
            query[:, :, s:e], key[:, :, s:e], value[:, :, s:e], is_causal=True, scale=scaling, dropout_p=p,
            enable_gqa=gqa,
        )
        for s, e in zip(bounds[:-1], bounds[1:])
    ]
    return torch.cat(parts, dim=2).transpose(1, 2).contiguous(), None


class _FlashVarlen:
    """torch's varlen flash attention for packed rows on a GPU: one kernel per layer instead of one per row, which
    matters on a GPU, where small kernels cost their launch. Its signature moved between torch releases (causal as
    `is_causal` or as `window_size`; GQA built in or not), so that is read once; any failure on the first call turns
    it off for the process and the per-row path takes over."""

    def __init__(self):
        self.enabled: bool | None = None  # None: not tried yet
        self._bounds: tuple[torch.Tensor | None, torch.Tensor | None] = (None, None)
        self._attn: tuple[Callable, frozenset[str]] | None = None  # varlen_attn and its parameter names

    def _function(self) -> tuple[Callable, frozenset[str]]:
        if self._attn is None:
            import inspect

            from torch.nn.attention.varlen import varlen_attn

            self._attn = varlen_attn, frozenset(inspect.signature(varlen_attn).parameters)
        return self._attn

    def usable(self, query: torch.Tensor) -> bool:
        return self.enabled is not False and query.is_cuda and query.dtype in (torch.float16, torch.bfloat16)

    def _on_device(self, bounds: torch.Tensor, device: torch.device) -> torch.Tensor:
        # every layer of one forward gets the same CPU tensor: copy it to the GPU once
        if self._bounds[0] is not bounds:
            self._bounds = (bounds, bounds.to(device=device, dtype=torch.int32, non_blocking=True))
        return self._bounds[1]

    def __call__(self, query, key, value, bounds: torch.Tensor, max_len: int | None, scaling) -> torch.Tensor | None:
        try:
            varlen_attn, params = self._function()
            cu = self._on_device(bounds, query.device)
            if max_len is None:
                max_len = int((bounds[1:] - bounds[:-1]).max())
            q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # (tokens, heads, head_dim)
            extra: dict[str, Any] = {"scale": scaling}
            if k.shape[1] != q.shape[1]:
                if "enable_gqa" in params:
                    extra["enable_gqa"] = True
                else:
                    groups = q.shape[1] // k.shape[1]
                    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
            if "is_causal" in params:
                extra["is_causal"] = True
            else:
                extra["window_size"] = (-1, 0)
            out = varlen_attn(q, k, v, cu, cu, max_len, max_len, **extra)
        except (ImportError, TypeError, RuntimeError, NotImplementedError, ValueError):
            if self.enabled:  # it worked before: a real error, not a missing feature
                raise
            self.enabled = False
            return None
        self.enabled = True
        return out.unsqueeze(0)


_FLASH = _FlashVarlen()


def _varlen_mask(*args, **kwargs):
    # Packed rows need no mask (varlen_sdpa slices by row); a padded batch still gets the usual sdpa mask.
    from transformers.masking_utils import sdpa_mask

    return None if kwargs.get("attention_mask") is None else sdpa_mask(*args, **kwargs)


def register_varlen_attention() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(VARLEN, varlen_sdpa)
    AttentionMaskInterface.register(VARLEN, _varlen_mask)


def can_pack(model, cutoff_len: int) -> bool:
    """Packing needs an attention that goes through transformers' interface and a method that does not add
    virtual tokens (prompt/prefix tuning) or its own loss term (AdaLoRA's orthogonality penalty)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if not getattr(base, "_supports_attention_backend", False):
        return False
    window = getattr(base.config.get_text_config(), "sliding_window", None)
    if window and window < cutoff_len:  # varlen_sdpa attends over the whole row
        return False
    peft_config = getattr(model, "peft_config", {}).get(getattr(model, "active_adapter", "default"))
    return peft_config is None or not (peft_config.is_prompt_learning or peft_config.peft_type == "ADALORA")


def loss_sum(model, batch: Batch, packed: bool, device: torch.device, pad_id: int) -> torch.Tensor:
    """Summed cross-entropy over the batch's labelled positions (the caller divides by the step's label count)."""
    if packed:
        out = model(
            input_ids=batch.input_ids.to(device), position_ids=batch.position_ids.to(device),
            logits_to_keep=batch.keep.to(device), cu_seq_lens_q=batch.cu_seqlens, cu_seq_lens_k=batch.cu_seqlens,
            max_length_q=batch.max_len, max_length_k=batch.max_len, use_cache=False,
        )
        return F.cross_entropy(out.logits[0].float(), batch.kept_targets.to(device), reduction="sum")
    # Padded fallback for methods that cannot pack: the model's own loss (it knows about virtual tokens).
    width = batch.max_len
    ids = torch.full((len(batch.examples), width), pad_id)
    labels = torch.full((len(batch.examples), width), IGNORE_INDEX)
    mask = torch.zeros((len(batch.examples), width), dtype=torch.long)
    for i, ex in enumerate(batch.examples):
        n = len(ex.input_ids)
        ids[i, :n], mask[i, :n] = torch.tensor(ex.input_ids), 1
        labels[i, 1:n] = torch.tensor(ex.targets[:n - 1])  # the model shifts labels itself
    out = model(input_ids=ids.to(device), attention_mask=mask.to(device), labels=labels.to(device), use_cache=False)
    return out.loss.float() * batch.n_targets


@torch.no_grad()
def evaluate(model, batches: list[Batch], packed: bool, device: torch.device, pad_id: int, autocast=None,
             dist: Dist = Dist()) -> float:
    """Mean cross-entropy over every labelled position of the validation rows (dropout off); under several
    processes each evaluates every world_size-th batch and the sums are added up."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    rounds = math.ceil(len(batches) / dist.world_size)
    for i in range(dist.rank, rounds * dist.world_size, dist.world_size):
        # a rank past the last batch runs the first one unrecorded: under FSDP every forward is a collective
        batch, weight = (batches[i], 1) if i < len(batches) else (batches[0], 0)
        with autocast or nullcontext():
            total += weight * float(loss_sum(model, batch, packed, device, pad_id))
        count += weight * batch.n_targets
    model.train(was_training)
    total, count = dist.all_reduce_sum([total, count])
    return total / max(count, 1)


# --- side concerns: status and metrics, the stop signal, checkpoints ----------------------------------------------
class Recorder:
    """The only writer of status.json and metrics.jsonl while the worker runs."""

    def __init__(self, store: RunStore, run_id: str):
        self.store, self.run_id = store, run_id
        self._last_status = 0.0

    def start(self, total_steps: int, step: int) -> None:
        self.store.update_status(
            self.run_id, state=RUNNING, pid=os.getpid(), started=time.time(), finished=None, total_steps=total_steps,
            step=step, reason="", failure="", stop_requested=False,
        )
        self._last_status = time.monotonic()

    def step(self, step: int, force: bool = False) -> None:
        if force or time.monotonic() - self._last_status >= STATUS_EVERY_S:
            self.store.update_status(self.run_id, step=step)
            self._last_status = time.monotonic()

    def metric(self, record: dict[str, Any]) -> None:
        self.store.append_metric(self.run_id, record)

    def finish(self, state: str, step: int | None = None, **fields: Any) -> None:
        changes = dict(state=state, finished=time.time(), peak_memory_bytes=peak_memory_bytes(), **fields)
        if step is not None:
            changes["step"] = step
        self.store.update_status(self.run_id, **changes)

    def drop_metrics_after(self, step: int) -> None:
        """Resume: lines past the checkpoint would be trained again, so they go (the file is rewritten atomically)."""
        import json

        kept = [r for r in self.store.metrics(self.run_id) if int(r.get("step", 0)) <= step]
        atomic_write_text(self.store.metrics_path(self.run_id), "".join(json.dumps(r) + "\n" for r in kept))


class NullRecorder(Recorder):
    """For ranks other than 0 under `accelerate launch`: the same calls, nothing written."""

    def __init__(self):
        pass

    def start(self, *a, **k): pass
    def step(self, *a, **k): pass
    def metric(self, *a, **k): pass
    def finish(self, *a, **k): pass
    def drop_metrics_after(self, *a, **k): pass


class StopSignal:
    """SIGTERM (the UI's Stop) or Ctrl-C: finish the current step, save, and end as `stopped`.

    A context manager: the previous handlers come back afterwards (a caller such as a test keeps its own)."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.requested = False
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "StopSignal":
        for sig in self.SIGNALS:
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: only a caller's own flag can stop the run
                pass
        return self

    def __exit__(self, *exc) -> bool:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        return False

    def _handle(self, signum, frame) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C means now
        self.requested = True
        print(f"stop requested ({signal.Signals(signum).name}): finishing this step, then saving", flush=True)


class Checkpointer:
    """checkpoints/step-N/: written into a hidden temp folder and renamed when whole, marker file last."""

    def __init__(self, root: Path, keep_last: int):
        self.root, self.keep_last = root, keep_last

    def save(self, step: int, weights: dict[str, torch.Tensor], state: dict[str, Any]) -> Path:
        from safetensors.torch import save_file

        self.root.mkdir(parents=True, exist_ok=True)
        final = self.root / f"step-{step}"
        tmp = self.root / f".step-{step}.tmp-{os.getpid()}"
        try:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
            save_file(weights, str(tmp / "trainable.safetensors"))
            torch.save(state, tmp / "training_state.pt")
            (tmp / "COMPLETE").write_text(f"{step}\n")
            replace_dir(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        self.prune()
        return final

    def complete(self) -> list[Path]:
        done = [d for d in self.root.glob("step-*") if (d / "COMPLETE").is_file()] if self.root.is_dir() else []
        return sorted(done, key=lambda d: int(d.name.split("-")[1]))

    def prune(self) -> None:
        for old in self.complete()[:-self.keep_last]:
            shutil.rmtree(old, ignore_errors=True)
        for stale in self.root.glob(".step-*.tmp-*"):  # left by a worker killed mid-save
            if not stale.name.endswith(f"-{os.getpid()}"):
                shutil.rmtree(stale, ignore_errors=True)

    @staticmethod
    def load(folder: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        from safetensors.torch import load_file

        return load_file(str(folder / "trainable.safetensors")), torch.load(folder / "training_state.pt", weights_only=False)


class ReadOnlyCheckpointer(Checkpointer):
    """Ranks other than 0: they resume from rank 0's checkpoints (a shared run folder) and never write one."""

    def save(self, step: int, weights: dict[str, torch.Tensor], state: dict[str, Any]) -> Path:
        return self.root / f"step-{step}"

    def prune(self) -> None:
        pass


def save_final(model, tokenizer, method: str, out_dir: Path, dist: Dist = Dist()) -> None:
    """final/ is replaced whole: a reader sees the previous final weights or the new ones. Every rank calls it
    (a sharded model is gathered first); rank 0 writes."""
    from app.methods import get_method, save_trained

    with dist.full_state(model, whole=not get_method(method).saves_adapter):
        if not dist.is_main:
            return
        tmp = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            save_trained(model, method, tmp)
            tokenizer.save_pretrained(tmp)
            old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
            if out_dir.exists():
                os.replace(out_dir, old)
            os.replace(tmp, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise


# --- hardware --------------------------------------------------------------------------------------------------
def pick_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def cpu_threads() -> int:
    """Threads for CPU math: the cores not busy right now. On a shared machine a thread whose core is taken makes
    every parallel region wait for it (measured here: 2 threads on 2 cores with one busy ran 4x slower than 1)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(cores, round(cores - busy_cores())))


def busy_cores(window_s: float = 0.3) -> float:
    """Cores in use by other processes, sampled over a short window (the 1-minute load average would still count
    the run that just finished before this one, and a queue of runs would all start with one thread)."""
    def sample() -> tuple[int, int]:
        with open("/proc/stat") as f:
            values = [int(v) for v in f.readline().split()[1:]]
        return sum(values), values[3] + values[4]  # total, idle + iowait

    try:
        total0, idle0 = sample()
        time.sleep(window_s)
        total1, idle1 = sample()
    except (OSError, ValueError, IndexError):
        return os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    cores = os.cpu_count() or 1
    return cores * (1 - (idle1 - idle0) / max(total1 - total0, 1))


def current_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.memory_reserved(device))
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def peak_memory_bytes() -> int:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return int(torch.cuda.max_memory_reserved())
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux reports KiB


def is_oom(error: BaseException) -> bool:
    if isinstance(error, (torch.OutOfMemoryError, MemoryError)):
        return True
    return isinstance(error, RuntimeError) and ("can't allocate memory" in str(error) or "out of memory" in str(error))


def oom_reason(config: RunConfig, step: int) -> str:
    gib = 1024 ** 3
    estimate = (config.estimate or {}).get("total_bytes")
    est = f"{estimate / gib:.1f} GiB" if isinstance(estimate, (int, float)) else "not recorded"
    return (
        f"Out of memory at step {step}. Measured peak: {peak_memory_bytes() / gib:.1f} GiB; the estimate before the "
        f"run: {est}. To fit, lower the batch size (now {config.batch_size}) and raise gradient accumulation to keep "
        f"the effective batch, shorten the cutoff length (now {config.cutoff_len}), turn on gradient checkpointing, "
        f"or pick QLoRA or a smaller model."
    )


# --- set-up ----------------------------------------------------------------------------------------------------
@dataclass
class Setup:
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


def load_examples(config: RunConfig, tokenizer) -> tuple[list[Example], list[Example]]:
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
    train = tokenize_rows(tokenizer, train_rows, config.cutoff_len, config.train_on_prompt)
    if not train:
        raise TrainFailure(
            "data", f"none of the {len(train_rows)} training rows has an answer to learn from (empty outputs, or "
            f"prompts longer than the cutoff length {config.cutoff_len})",
        )
    return train, tokenize_rows(tokenizer, val_rows, config.cutoff_len, config.train_on_prompt)


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

    from app.methods import MethodError, get_method, load_for_training
    from app.models import resolve_model

    device = pick_device()
    if device.type == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(cpu_threads())
    echo(f"device: {device}" + (f" ({torch.get_num_threads()} threads)" if device.type == "cpu" else "")
         + (f", {dist.world_size} processes" if dist.world_size > 1 else ""))
    random.seed(config.seed)
    torch.manual_seed(config.seed)

    model_dir = resolve_model(config.model, workspace.models)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    train, val = load_examples(config, tokenizer)
    plan = DataPlan(train, config)
    echo(f"data: {len(train)} training rows ({sum(len(e.input_ids) for e in train)} tokens), {len(val)} validation rows")

    spec, strategy = get_method(config.method), strategy_for(config.strategy)
    if dist.world_size > 1 and strategy == "fsdp":
        quantized = spec.load_kwargs(spec.make_args(config.method_args)).get("quantization_config") is not None
        why = ("its base model is loaded quantized (4-bit), and FSDP splits only plain weights" if quantized else
               "it re-allocates its ranks from whole weight matrices after every step" if spec.after_backward else "")
        if why:
            raise TrainFailure("error", f"{spec.label} cannot be sharded with FSDP: {why}. Set the strategy to ddp "
                                        f"(every GPU holds the whole model), or pick LoRA to keep fsdp.")
    try:  # loaded as the memory estimate assumes (dtype per precision, quantization), the method applied
        model, precision = load_for_training(
            model_dir, config.method, config.method_args, precision=config.precision, total_steps=plan.total_steps,
            grad_checkpointing=config.grad_checkpointing, device=device.type,
        )
    except MethodError as e:  # e.g. BitFit on a model without biases: nothing to train
        raise TrainFailure("error", str(e)) from e
    model.config.use_cache = False
    packed = can_pack(model, config.cutoff_len)
    if packed:
        register_varlen_attention()
        (model.get_base_model() if hasattr(model, "get_base_model") else model).set_attn_implementation(VARLEN)
    model.train()
    dist.broadcast_parameters([p for p in model.parameters() if p.requires_grad])
    dist.shard(model, strategy)  # before the optimizer: under fsdp it must hold the shards
    if dist.sharded:
        echo(f"fsdp: weights, gradients and optimizer state split between {dist.world_size} processes")

    optimizer = make_optimizer(config, [p for p in model.parameters() if p.requires_grad])
    scheduler = get_scheduler(
        "constant_with_warmup" if config.scheduler == "constant" else config.scheduler, optimizer,
        num_warmup_steps=config.warmup_steps, num_training_steps=plan.total_steps,
    )
    autocast_dtype = getattr(torch, precision.autocast_dtype) if precision.autocast_dtype else None
    scaler = dist.grad_scaler(device.type) if autocast_dtype == torch.float16 else None
    autocast = torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype is not None else None
    vocab = getattr(model.config.get_text_config(), "vocab_size", None) or 50_000
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    return Setup(
        model, tokenizer, plan, batches_of(val, config.batch_size), optimizer, scheduler, scaler, device, autocast,
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


def shard(batch: Batch, dist: Dist) -> tuple[Batch, float]:
    """This rank's rows of a micro-batch and their weight. A rank left without a row (a batch smaller than the
    world) runs one row at weight 0, so that it still takes part in every gradient all-reduce."""
    if dist.world_size == 1:
        return batch, 1.0
    rows = batch.examples[dist.rank::dist.world_size]
    return (pack(rows), 1.0) if rows else (pack(batch.examples[:1]), 0.0)


def forward_backward(s: Setup, batches: list[Batch]) -> float:
    """Gradients of one optimizer step; the loss is the mean over all labelled positions of its micro-batches.

    Each rank divides its share's summed loss by the whole step's label count times world_size: once
    `average_gradients` divides the sum over ranks by world_size, gradient and mean loss are the single-process ones."""
    n_targets = sum(b.n_targets for b in batches)
    step_loss = 0.0
    for batch in batches:
        part, weight = shard(batch, s.dist)
        with s.autocast or nullcontext():
            loss = loss_sum(s.model, part, s.packed, s.device, s.pad_id) * (weight * s.dist.world_size / n_targets)
        (s.scaler.scale(loss) if s.scaler else loss).backward()
        step_loss += float(loss.detach())
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
            })
            echo(format_progress(step, plan.total_steps, step_loss, lr, tok_s, elapsed))
        recorder.step(step)
        if s.val_batches and config.eval_every and step % config.eval_every == 0 and step < plan.total_steps:
            eval_loss = evaluate(model, s.val_batches, s.packed, s.device, s.pad_id, s.autocast, dist)
            recorder.metric({"step": step, "eval_loss": eval_loss})
            echo(f"step {step}: validation loss {eval_loss:.4f}")
        if config.save_every and step % config.save_every == 0 and step < plan.total_steps:
            save_checkpoint(checkpointer, s, step, tokens, elapsed_before + time.monotonic() - t0)
            saved_step = step

    final_state = COMPLETED if step >= plan.total_steps else STOPPED
    if final_state == COMPLETED and s.val_batches and step > first_step:
        eval_loss = evaluate(model, s.val_batches, s.packed, s.device, s.pad_id, s.autocast, dist)
        recorder.metric({"step": step, "eval_loss": eval_loss})
        echo(f"validation loss {eval_loss:.4f}")
    if saved_step != step:
        save_checkpoint(checkpointer, s, step, tokens, elapsed_before + time.monotonic() - t0)
    _release_varlen(model, s.packed)
    save_final(model, s.tokenizer, config.method, store.final_dir(run_id), dist)
    recorder.finish(final_state, step=step, reason="stopped by request" if final_state == STOPPED else "")
    echo(f"{final_state} at step {step}/{plan.total_steps}; final weights in {store.final_dir(run_id)}")
    return final_state


def save_checkpoint(checkpointer: Checkpointer, s: Setup, step: int, tokens: int, elapsed: float) -> None:
    try:
        checkpointer.save(step, trainable_weights(s.model, s.dist), training_state(s, step, tokens, elapsed))
    except OSError as e:
        previous = checkpointer.complete()
        keep = f"the last complete checkpoint ({previous[-1].name}) is intact" if previous else "no earlier checkpoint exists"
        raise TrainFailure("error", f"could not save the checkpoint at step {step}: {e.strerror or e}; {keep}. "
                                    f"Free disk space, then resume.") from e


def _release_varlen(model, packed: bool) -> None:
    # final/ holds the model's own config: reset the attention so nothing saved names this process's function
    if packed:
        (model.get_base_model() if hasattr(model, "get_base_model") else model).set_attn_implementation("sdpa")


# --- entry points ----------------------------------------------------------------------------------------------
def run_training(run_yaml: str | Path, resume: bool = False, echo: Callable[[str], None] | None = None,
                 stop: StopSignal | None = None) -> int:
    """`launch.py train RUN.yaml`: the exit code is 0 completed/stopped, 1 failed, 2 unusable run.yaml.

    `stop` replaces the signal handlers with a caller's own flag (anything with a `requested` attribute)."""
    echo = echo or (lambda line: print(line, flush=True))
    run_yaml = Path(run_yaml).resolve()
    run_dir = run_yaml.parent
    store = RunStore(run_dir.parent)
    rank0 = int(os.environ.get("RANK", "0")) == 0
    if not rank0:  # one copy of the progress lines in the terminal and train.log; failures still print, tagged
        echo = _tagged_failures(int(os.environ["RANK"]))
    has_status = (run_dir / "status.json").is_file()
    try:
        config = near_run_yaml(RunConfig.from_yaml(run_yaml), run_dir)
        from app.methods import MethodError, get_method

        try:
            get_method(config.method).make_args(config.method_args)
        except MethodError as e:
            raise ConfigError(str(e)) from e
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
    step_of = lambda: store.status(run_dir.name).step  # noqa: E731
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
        traceback.print_exc()
        kind, reason = ("oom", oom_reason(config, step_of())) if is_oom(e) else ("error", _short_error(e))
    except KeyboardInterrupt:
        kind, reason = "error", "interrupted twice: stopped without saving"
    echo(f"failed ({kind}): {reason}")
    recorder.finish(FAILED, failure=kind, reason=reason)
    return EXIT_FAILED


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
def load_preset(name: str) -> dict[str, Any]:
    """A preset by name (presets/NAME.yaml) or path; holds only the RunConfig fields that differ from defaults."""
    path = Path(name)
    if not path.is_file():
        path = PRESETS_DIR / f"{name}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))
        raise ConfigError(f"no preset {name!r}; choose one of {', '.join(known) or '(none yet)'} or give a YAML path")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({e})") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a preset must be a mapping of run settings")
    return data


def config_from_preset(name: str, overrides: dict[str, Any]) -> RunConfig:
    values = {**load_preset(name), **{k: v for k, v in overrides.items() if v is not None}}
    dataset = values.get("dataset")
    if not dataset:
        raise ConfigError(f"the preset {name!r} names no dataset: pass --dataset FILE")
    for key in ("dataset", "val_dataset"):  # preset paths are relative to the repository
        if values.get(key) and not Path(values[key]).is_absolute() and not Path(values[key]).exists():
            values[key] = str(REPO_ROOT / values[key])
        if values.get(key):
            values[key] = str(Path(values[key]).resolve())
    return RunConfig.from_dict(values)


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
