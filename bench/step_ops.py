"""Operations per training step, ours against TRL's SFTTrainer: a stand-in, measurable without a GPU, for a step's
time on a GPU that waits on kernel launches.

On the H100 VM of bench/RESULTS.md both trainers ran this small model at 2-3 steps per second: each step was
thousands of small kernels, each paying its launch and Python's dispatch, so time per step followed the number of
operations, not the arithmetic. This script counts, per optimizer step, the aten operations that are not views
(on a GPU each launches at least one kernel) for the throughput bench's set-up (embedded SmolLM2-135M, LoRA r=8
all-linear, dropout 0.05, batch 4, cutoff 256, bf16 autocast over fp32 weights), on the CPU, through:
  - our worker's own step (app.training.worker: forward_backward + optimizer_step), loaded as on a GPU (without
    app.training.fast_lora, which only the CPU path uses);
  - TRL's trainer, between its on_step_begin and on_step_end (forward, backward, clipping, AdamW, schedule, its
    per-step metrics).
Dropout is counted as one fused operation on both sides, as CUDA runs it (the CPU would split it into four).
Attention: ours calls varlen flash attention once per layer on a GPU; here one sdpa call per layer stands in for it
(OneCallAttention). Printed: operations per step of each, the ratio, and ours by kind.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/step_ops.py [--steps 3] [--without groups,half]
"""
from __future__ import annotations

import argparse
import collections
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def op_counter():
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    # no kernel behind these: a view by another name, allocations, autograd bookkeeping
    skip = {torch.ops.aten.detach.default, torch.ops.aten.lift_fresh.default, torch.ops.aten._unsafe_view.default,
            torch.ops.aten.empty.memory_format, torch.ops.aten.empty_strided.default, torch.ops.aten.empty_like.default,
            torch.ops.aten.new_empty.default}

    class OpCounter(TorchDispatchMode):
        """Counts aten calls that launch work (not views, not bare allocations) while it is entered."""

        def __init__(self):
            super().__init__()
            self.ops: collections.Counter = collections.Counter()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if not func.is_view and func not in skip:
                self.ops[func.overloadpacket.__name__] += 1
            return func(*args, **(kwargs or {}))

    return OpCounter()


def fused_dropout() -> None:
    """F.dropout as CUDA runs it: one native_dropout call (the CPU's own path is bernoulli_, div_, mul)."""
    import torch
    import torch.nn.functional as F

    plain = F.dropout

    def dropout(x, p=0.5, training=True, inplace=False):
        if training and 0 < p < 1 and x.numel():
            return torch.native_dropout(x, p, True)[0]
        return plain(x, p, training, inplace)

    F.dropout = dropout


class OneCallAttention:
    """Stands in for varlen flash attention, which needs a GPU: one sdpa call over the packed row per layer, the
    same number of operations (it lets rows see each other: fine for counting, not for training)."""

    def usable(self, query) -> bool:
        return True

    def __call__(self, query, key, value, bounds, max_len, scaling):
        import torch.nn.functional as F

        out = F.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scaling,
                                             enable_gqa=key.shape[1] != query.shape[1])
        return out.transpose(1, 2)


def ours(data: Path, steps: int, without: set[str]) -> collections.Counter:
    from app.training import attention
    from app.training import fast_lora
    from app.training import lora_groups
    from app.training import loading
    from app.training import worker as train
    from app.spec import RunConfig
    from app.workspace import Workspace

    fast_lora.speed_up_lora = lambda model: 0  # the GPU path: peft's own LoRA layers
    attention._FLASH = OneCallAttention()
    if "groups" in without:  # peft's layer-by-layer LoRA
        lora_groups.group_lora_layers = lambda model, dtype: []
    if "half" in without:  # frozen linears left in fp32, cast by autocast in every forward
        loading.store_frozen_linears_in = lambda model, dtype: 0
    config = RunConfig(model="embedded", dataset=str(data), method="lora", precision="bf16-mixed",
                       method_args={"r": 8, "alpha": 16, "dropout": 0.05, "targets": "all-linear"},
                       batch_size=4, cutoff_len=256, epochs=1.0, save_every=0, eval_every=0, val_split=0.0)
    s = train.setup(config, Workspace.open(), lambda line: None)
    total = collections.Counter()
    for step in range(1, steps + 2):
        batches, _ = s.plan.step_batches(step)
        counter = op_counter()
        with counter:
            train.forward_backward(s, batches)
            train.optimizer_step(s, config, step)
        if step > 1:  # the first step makes the optimizer's state
            total.update(counter.ops)
    return total


def trl(data: Path, steps: int) -> collections.Counter:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from app.models import EMBEDDED, resolve_model
    from app.objectives.batches import pack
    from app.objectives.sft import tokenize_rows
    from app.training.plan import DataPlan
    from app.spec import RunConfig
    from app.workspace import Workspace
    from train_throughput import alpaca_rows

    model_dir = resolve_model(EMBEDDED, Workspace.open().models)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    examples = tokenize_rows(tokenizer, alpaca_rows(4 * (steps + 1), seed=1), 256, False)
    plan = DataPlan(examples, RunConfig(dataset="x", batch_size=4, cutoff_len=256, seed=42), pack)
    ordered = [e for b in plan.epoch_batches(0) for e in b.examples]
    rows = Dataset.from_list([{"input_ids": e.input_ids, "completion_mask": [0] + [int(t != -100) for t in e.targets[:-1]]}
                              for e in ordered])

    class Count(TrainerCallback):
        def __init__(self):
            self.total, self.counter, self.step = collections.Counter(), None, 0

        def on_step_begin(self, *a, **k):
            self.step += 1
            if self.step > 1:
                self.counter = op_counter()
                self.counter.__enter__()

        def on_step_end(self, *a, **k):
            if self.counter is not None:
                self.counter.__exit__(None, None, None)
                self.total.update(self.counter.ops)
                self.counter = None

    args = SFTConfig(output_dir=tempfile.mkdtemp(prefix="step-ops-trl-"), per_device_train_batch_size=4,
                     max_steps=steps + 1, learning_rate=2e-4, lr_scheduler_type="cosine", max_grad_norm=1.0,
                     max_length=256, seed=42, gradient_checkpointing=False, completion_only_loss=True,
                     train_sampling_strategy="sequential", save_strategy="no", report_to="none", use_cpu=True,
                     bf16=True, disable_tqdm=True, logging_steps=1)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa")
    count = Count()
    SFTTrainer(model=model, args=args, train_dataset=rows, processing_class=tokenizer, callbacks=[count],
               peft_config=LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, target_modules="all-linear",
                                      task_type="CAUSAL_LM")).train()
    return count.total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3, help="steps counted (after one uncounted step)")
    parser.add_argument("--kinds", type=int, default=12, help="operation kinds listed per side")
    parser.add_argument("--without", default="", help="ours without: groups (app.training.lora_groups), half (frozen "
                                                      "linears in bf16), comma-separated")
    args = parser.parse_args()

    import torch
    from transformers.utils import logging as hf_logging

    from train_throughput import alpaca_rows, write_jsonl

    hf_logging.set_verbosity_error()
    torch.set_num_threads(max(1, (os.cpu_count() or 1)))
    fused_dropout()
    work = Path(tempfile.mkdtemp(prefix="step-ops-"))
    data = write_jsonl(work / "train.jsonl", alpaca_rows(4 * (args.steps + 1), seed=1))
    start = time.perf_counter()
    without = set(args.without.split(",")) - {""}
    counts = {"ours": ours(data, args.steps, without), "trl": trl(data, args.steps)}
    per_step = {side: sum(c.values()) / args.steps for side, c in counts.items()}
    print(f"set-up: embedded SmolLM2-135M, LoRA r=8 all-linear, dropout 0.05, batch 4, cutoff 256, bf16 autocast "
          f"over fp32 weights; {args.steps} steps counted per side ({time.perf_counter() - start:.0f} s)"
          + (f"; ours without {', '.join(sorted(without))}" if without else ""))
    for side, c in counts.items():
        top = ", ".join(f"{name} {n / args.steps:.0f}" for name, n in c.most_common(args.kinds))
        print(f"{side:4s}: {per_step[side]:7.0f} operations per step; by kind: {top}")
    print(f"operations per step, TRL / ours: {per_step['trl'] / per_step['ours']:.2f}x "
          f"(a launch-bound GPU step's speed-up, if each operation costs the same)")


if __name__ == "__main__":
    main()
