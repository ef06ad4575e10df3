"""Grouped LoRA (app.training.lora_groups) against peft's layers, side by side: time of one training forward + backward.

The same model loaded twice by app.training.loading.load_for_training (LoRA r=8 all-linear, dropout 0.05,
bf16-mixed), one with peft's own forward put back on every layer. The two alternate, on one packed batch of 4 Alpaca-style rows
(the throughput bench's), on a GPU when there is one. Printed: per-step wall and CPU seconds of each and the
median ratio. On a GPU this is the direct check of what bench/step_ops.py predicts from operation counts.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/lora_groups_speed.py [--steps 6] [--precision bf16-mixed]
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from statistics import median

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6, help="timed steps per side (after one untimed)")
    parser.add_argument("--precision", default="bf16-mixed")
    args = parser.parse_args()

    import torch
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    from app.spec import RunConfig
    from app.training.loading import load_for_training
    from app.training.attention import VARLEN, register_varlen_attention
    from app.objectives.batches import pack
    from app.objectives.sft import loss_sum, tokenize_rows
    from app.training.hardware import pick_device
    from app.models import EMBEDDED, resolve_model
    from app.workspace import Workspace
    from train_throughput import alpaca_rows

    hf_logging.set_verbosity_error()
    device = pick_device()
    folder = resolve_model(EMBEDDED, Workspace.open().models)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    batch = pack(tokenize_rows(tokenizer, alpaca_rows(4, seed=1), 256, False))
    register_varlen_attention()
    models = {}
    for side in ("grouped", "peft"):
        config = RunConfig(method="lora", method_args={"r": 8, "alpha": 16, "dropout": 0.05, "targets": "all-linear"},
                           precision=args.precision)
        model, plan = load_for_training(folder, config, device=device.type)
        if side == "peft":
            for module in model.modules():
                module.__dict__.pop("forward", None)
        model.get_base_model().set_attn_implementation(VARLEN)
        models[side] = model.train()
    autocast = torch.autocast(device.type, dtype=getattr(torch, plan.autocast_dtype))

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    times: dict[str, list[tuple[float, float]]] = {"grouped": [], "peft": []}
    for step in range(args.steps + 1):
        for side in (("grouped", "peft") if step % 2 == 0 else ("peft", "grouped")):
            model = models[side]
            sync()
            wall, cpu = time.perf_counter(), time.process_time()
            with autocast:
                loss = loss_sum(model, batch, True, device, tokenizer.pad_token_id)
            loss.backward()
            sync()
            if step:  # the first step of each pays one-off costs
                times[side].append((time.perf_counter() - wall, time.process_time() - cpu))
            model.zero_grad(set_to_none=True)
    print(f"device {device}, precision {plan.name}, one packed batch of {batch.n_tokens} tokens, {args.steps} steps each")
    for side, values in times.items():
        print(f"{side:8s}: wall {', '.join(f'{w:.3f}' for w, _ in values)} s (median {median(w for w, _ in values):.3f}); "
              f"CPU {', '.join(f'{c:.2f}' for _, c in values)} s (median {median(c for _, c in values):.2f})")
    ratio = median(w for w, _ in times["peft"]) / median(w for w, _ in times["grouped"])
    print(f"peft's layers / grouped, median wall time per step: {ratio:.2f}x")


if __name__ == "__main__":
    main()
