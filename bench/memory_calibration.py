"""Sets the memory estimate beside the real peak of a few training steps, cell by cell (model x method x length).

CPU: peak resident memory (VmHWM) of a fresh process that loads the model the way training does and runs a few
AdamW steps. CUDA (when a GPU is present): torch.cuda.max_memory_reserved over the same steps, which leaves out the
CUDA context, so it is compared with the estimate minus that term. Models are random-init from bundled configs
(some with fewer layers, to keep the CPU matrix to minutes), saved once as bf16 safetensors like real checkpoints.

    nice -n 10 .venv/bin/python bench/memory_calibration.py            # CPU matrix here, CUDA matrix on a GPU
    .venv/bin/python bench/memory_calibration.py --device cpu --quick  # one cell, to try it
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# (bundled config, overrides, sequence lengths): scaled down on CPU so that full fine-tuning fits and each cell takes
# seconds to a minute; Llama-3.2-1B keeps its 128k vocabulary and 2048 width, so it gets shorter rows.
CPU_MODELS = [("smollm2-135m", {}, (64, 256)), ("qwen2.5-0.5b", {"num_hidden_layers": 6}, (64, 256)),
              ("llama-3.2-1b", {"num_hidden_layers": 2}, (32, 128))]
CUDA_MODELS = [("smollm2-360m", {}, (256, 1024)), ("qwen2.5-1.5b", {}, (256, 1024)), ("llama-3.2-1b", {}, (256, 1024))]
METHODS = [("full", {}), ("lora", {"r": 8, "targets": "all-linear"}), ("qlora", {"r": 8, "targets": "all-linear"})]
BATCH = 2
STEPS = 2  # the second step is the first with optimizer state, the first the first with an update: both peaks


def build_model(name: str, overrides: dict, dest: Path) -> Path:
    """Random weights for a bundled config, saved as bf16 safetensors (how published checkpoints ship)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from app.models import bundled_configs

    data = json.loads(bundled_configs()[name].read_text(encoding="utf-8"))
    # overrides go in at construction: configs derive fields (Qwen2's per-layer attention types) from them
    config = AutoConfig.for_model(data.pop("model_type"), **{**data, **overrides})
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(dest, safe_serialization=True)
    return dest


def vm_hwm() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def run_cell(folder: str, method: str, method_args: dict, batch: int, seq: int, device: str, checkpointing: bool) -> dict:
    """In a fresh process: load as training does, run STEPS AdamW steps on padded random batches, report the peak."""
    import contextlib

    import torch

    from app.spec import RunConfig
    from app.training.loading import load_for_training

    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    else:
        torch.set_num_threads(1)  # speed only: on a shared 2-core machine two threads mostly wait on each other
    config = RunConfig(method=method, method_args=method_args, precision="auto", grad_checkpointing=checkpointing)
    model, plan = load_for_training(Path(folder), config, device=device)
    loaded = torch.cuda.max_memory_reserved() if device == "cuda" else vm_hwm()
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    vocab = model.config.get_text_config().vocab_size
    generator = torch.Generator().manual_seed(0)
    autocast = (torch.autocast(device, dtype=getattr(torch, plan.autocast_dtype)) if plan.autocast_dtype
                else contextlib.nullcontext())
    started = time.perf_counter()
    for _ in range(STEPS):
        ids = torch.randint(0, vocab, (batch, seq), generator=generator)
        mask = torch.ones_like(ids)
        mask[1:, -max(1, seq // 8):] = 0  # later rows padded, as in a real batch
        labels = ids.masked_fill(mask == 0, -100)
        with autocast:
            loss = model(input_ids=ids.to(device), attention_mask=mask.to(device), labels=labels.to(device)).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    peak = torch.cuda.max_memory_reserved() if device == "cuda" else vm_hwm()
    return {"peak": peak, "after_load": loaded, "seconds": time.perf_counter() - started, "precision": plan.name}


def estimate(folder: Path, method: str, method_args: dict, seq: int, device: str, checkpointing: bool) -> int:
    from app.memory.estimate import EstimateInputs, estimate_memory

    inputs = EstimateInputs(model=str(folder), method=method, method_args=method_args, batch_size=BATCH, seq_len=seq,
                            precision="auto", grad_checkpointing=checkpointing)
    return estimate_memory(inputs).comparable_peak(device)


def measure(folder: Path, method: str, method_args: dict, seq: int, device: str, checkpointing: bool) -> dict:
    cell = json.dumps({"folder": str(folder), "method": method, "method_args": method_args, "batch": BATCH, "seq": seq,
                       "device": device, "checkpointing": checkpointing})
    done = subprocess.run([sys.executable, __file__, "--cell", cell], capture_output=True, text=True, cwd=ROOT)
    lines = [l for l in done.stdout.splitlines() if l.startswith("{")]
    if done.returncode != 0 or not lines:
        return {"error": (done.stderr.strip().splitlines() or ["no output"])[-1]}
    return json.loads(lines[-1])


def gib(n: int) -> str:
    return f"{n / 1024**3:6.2f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda when present, else cpu")
    parser.add_argument("--quick", action="store_true", help="one model, LoRA only, the shorter length")
    parser.add_argument("--cell", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.cell:
        c = json.loads(args.cell)
        print(json.dumps(run_cell(c["folder"], c["method"], c["method_args"], c["batch"], c["seq"], c["device"],
                                  c["checkpointing"])))
        return 0
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    models = CUDA_MODELS if device == "cuda" else CPU_MODELS
    cells = [(m, meth, seq, False) for m in models for meth in METHODS for seq in m[2]]
    cells += [(m, METHODS[1], m[2][-1], True) for m in models]  # LoRA with gradient checkpointing, the longer rows
    if args.quick:
        cells = [(models[0], METHODS[1], models[0][2][0], False)]
    machine = torch.cuda.get_device_name(0) if device == "cuda" else f"{os.cpu_count()}-core CPU"
    print(f"# memory calibration on {machine}: batch {BATCH}, {STEPS} AdamW steps, precision auto; GiB\n")
    print("| model | method | seq | estimate | measured | error | after load | step s |")  # GiB, except seconds
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    errors = []
    with tempfile.TemporaryDirectory(prefix="memcal-") as tmp:
        folders: dict[str, Path] = {}
        for (name, overrides, _), (method, margs), seq, checkpointing in cells:
            label = name + ("".join(f", {v} {k.split('_')[-1]}" for k, v in overrides.items()))
            if label not in folders:
                folders[label] = build_model(name, overrides, Path(tmp) / label.replace(" ", "_").replace(",", ""))
            shown = method + (" + checkpointing" if checkpointing else "")
            result = measure(folders[label], method, margs, seq, device, checkpointing)
            if "error" in result:
                print(f"| {label} | {shown} | {seq} | | | failed: {result['error'][:80]} | | |")
                continue
            est = estimate(folders[label], method, margs, seq, device, checkpointing)
            err = (est - result["peak"]) / result["peak"]
            errors.append(abs(err))
            print(f"| {label} | {shown} | {seq} | {gib(est)} | {gib(result['peak'])} | {err:+.1%} | "
                  f"{gib(result['after_load'])} | {result['seconds'] / STEPS:.1f} |", flush=True)
    if errors:
        target = 0.10 if device == "cuda" else 0.15
        print(f"\nlargest error {max(errors):.1%} over {len(errors)} cells (target: at most {target:.0%})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
