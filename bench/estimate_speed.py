"""How long one live update of the Method tab takes once the model's config is cached (target: at most 50 ms).

An update is what the tab does on every slider move: the estimate for the chosen settings, the same model under every
method, the verdict against this machine, and the two plotly figures. Each setting changes between updates (r, batch,
length), so nothing but the config and the architecture inventory is reused.

    nice -n 10 .venv/bin/python bench/estimate_speed.py
"""
from __future__ import annotations

import os
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

MODELS = ["config:smollm2-135m", "config:qwen2.5-7b", "config:llama-3.1-8b", "config:gemma-2-2b"]
UPDATES = 40


def one_update(inputs):
    from app.memory import estimate as memory
    from app.memory import figures
    from app.memory.device import detect_device

    estimate = memory.estimate_memory(inputs)
    others = memory.every_method(inputs)
    memory.verdict(estimate, detect_device())
    figures.breakdown_figure(estimate)
    figures.methods_figure(others, inputs.method)


def main() -> int:
    from app.memory import estimate as memory

    print(f"# live estimate update, {os.cpu_count()}-core CPU, {UPDATES} updates per model; milliseconds\n")
    print("| model | first (config + inventory) | estimate alone, median | full update, median | full update, p95 |")
    print("|---|---:|---:|---:|---:|")
    worst = 0.0
    for model in MODELS:
        base = memory.EstimateInputs(model=model, method="lora", models_dir=str(ROOT / "workspace" / "models"))
        started = time.perf_counter()
        one_update(base)
        first = time.perf_counter() - started
        alone, full = [], []
        for i in range(UPDATES):
            inputs = replace(base, method_args={"r": 4 + i}, batch_size=1 + i % 8, seq_len=128 + 32 * i)
            t0 = time.perf_counter()
            memory.estimate_memory(inputs)
            t1 = time.perf_counter()
            one_update(inputs)
            full.append(time.perf_counter() - t1)
            alone.append(t1 - t0)
        p95 = statistics.quantiles(full, n=20)[-1]
        worst = max(worst, p95)
        print(f"| {model} | {first * 1000:.0f} | {statistics.median(alone) * 1000:.1f} | "
              f"{statistics.median(full) * 1000:.1f} | {p95 * 1000:.1f} |")
    print(f"\nslowest p95 update: {worst * 1000:.1f} ms (target: at most 50 ms)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
