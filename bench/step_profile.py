"""Where one training step of the worker spends its time: the throughput bench's set-up (embedded model, LoRA r=8
all-linear, batch 4, cutoff 256), steps timed packed and padded, then torch.profiler's top operators.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/step_profile.py [--steps 10] [--precision auto]
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--precision", default="auto")
    args = parser.parse_args()

    import torch
    from torch.profiler import ProfilerActivity, profile

    from app.training import worker as train
    from app.spec import RunConfig
    from app.workspace import Workspace
    from train_throughput import alpaca_rows, write_jsonl

    work = Path(tempfile.mkdtemp(prefix="step-profile-"))
    data = write_jsonl(work / "train.jsonl", alpaca_rows(4 * (3 * args.steps + 14), seed=1))
    config = RunConfig(model="embedded", dataset=str(data), method="lora", precision=args.precision,
                       method_args={"r": 8, "alpha": 16, "dropout": 0.05, "targets": "all-linear"},
                       batch_size=4, cutoff_len=256, epochs=1.0, save_every=0, eval_every=0)
    s = train.setup(config, Workspace.open(os.environ.get("WORKBENCH_WORKSPACE") or work / "ws"), print)
    cuda = s.device.type == "cuda"

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    def steps(first: int, n: int, packed: bool) -> float:
        s.packed = packed
        sync()
        start = time.perf_counter()
        tokens = 0
        for step in range(first, first + n):
            batches, _ = s.plan.step_batches(step)
            train.forward_backward(s, batches)
            train.optimizer_step(s, config, step)
            tokens += sum(b.n_tokens for b in batches)
        sync()
        return tokens / (time.perf_counter() - start)

    def phases(first: int, n: int, packed: bool) -> str:
        """Seconds per step in forward, backward and the optimizer (clip + AdamW), each ended by a device sync."""
        from contextlib import nullcontext

        s.packed = packed
        spent = {"forward": 0.0, "backward": 0.0, "optimizer": 0.0}
        for step in range(first, first + n):
            batches, _ = s.plan.step_batches(step)
            n_targets = sum(b.n_targets for b in batches)
            for batch in batches:
                sync()
                t0 = time.perf_counter()
                with s.autocast or nullcontext():
                    loss = s.objective.loss_sum(s.model, batch, packed, s.device, s.pad_id) / n_targets
                sync()
                t1 = time.perf_counter()
                loss.backward()
                sync()
                t2 = time.perf_counter()
                spent["forward"] += t1 - t0
                spent["backward"] += t2 - t1
            t2 = time.perf_counter()
            train.optimizer_step(s, config, step)
            sync()
            spent["optimizer"] += time.perf_counter() - t2
        return ", ".join(f"{k} {v / n * 1000:.0f} ms" for k, v in spent.items())

    packed = s.packed
    steps(1, 3, packed)  # warm-up
    print(f"packed: {steps(4, args.steps, packed):.0f} real tokens/s")
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    print(f"padded: {steps(4 + args.steps, args.steps, False):.0f} real tokens/s"
          + (f", peak {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB" if cuda else ""))
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    print(f"packed: {steps(4 + 2 * args.steps, args.steps, packed):.0f} real tokens/s"
          + (f", peak {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB" if cuda else ""))
    print(f"per step, packed: {phases(4 + 3 * args.steps, 3, packed)}")
    print(f"per step, padded: {phases(7 + 3 * args.steps, 3, False)}")
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        steps(10 + 3 * args.steps, 2, packed)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=60))
    if cuda:
        print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=15, max_name_column_width=60))
    return 0


if __name__ == "__main__":
    sys.exit(main())
