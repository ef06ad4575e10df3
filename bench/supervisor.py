"""How fast the job queue reacts: start latency, SIGKILL-to-failed latency, and the cost of one supervisor round and
one live-view refresh as the number of runs in the store grows. Uses the fake worker, so no model is loaded.

    .venv/bin/python bench/supervisor.py
"""
from __future__ import annotations

import logging
import os
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from app.runs.jobs import Supervisor  # noqa: E402
from app.runs.store import COMPLETED, FAILED, RunStore  # noqa: E402
from app.spec import RunConfig  # noqa: E402
from components import train_tab  # noqa: E402

FAKE = ROOT / "tests" / "fake_worker.py"


def command(steps: int, sleep: float):
    return lambda run_yaml, resume: [sys.executable, str(FAKE), str(run_yaml), "--steps", str(steps),
                                     "--sleep", str(sleep)] + (["--resume"] if resume else [])


def wait(predicate, timeout=30.0):
    deadline = time.time() + timeout
    while not predicate():
        if time.time() > deadline:
            raise TimeoutError
        time.sleep(0.005)


def latencies(poll_s: float, repeats: int = 5) -> tuple[list[float], list[float]]:
    """Seconds from submit to the worker's first own status write, and from SIGKILL to the run marked failed."""
    starts, detects = [], []
    with tempfile.TemporaryDirectory() as tmp:
        store = RunStore(Path(tmp) / "runs")
        sup = Supervisor(store, command(10_000, 0.01), poll_s=poll_s).start()
        try:
            for _ in range(repeats):
                t0 = time.time()
                (run_id,) = sup.submit([RunConfig(dataset="x")])
                wait(lambda: store.status(run_id).step >= 1)
                starts.append(time.time() - t0)
                os.kill(store.status(run_id).pid, signal.SIGKILL)
                t1 = time.time()
                wait(lambda: store.status(run_id).state == FAILED)
                detects.append(time.time() - t1)
        finally:
            sup.close()
    return starts, detects


def round_costs(n_runs: int, metrics_lines: int = 200) -> tuple[float, float]:
    """Milliseconds for one supervisor round and one live-view refresh with `n_runs` finished runs in the store."""
    with tempfile.TemporaryDirectory() as tmp:
        store = RunStore(Path(tmp) / "runs")
        sup = Supervisor(store, command(1, 0.0))
        lines = "".join(f'{{"step": {i}, "loss": 1.0, "lr": 0.0001, "elapsed": {i}}}\n' for i in range(1, metrics_lines))
        for i in range(n_runs):
            run_id = store.create(RunConfig(dataset="x", seed=i))
            store.update_status(run_id, state=COMPLETED)
            store.metrics_path(run_id).write_text(lines)
        ticks, views = [], []
        for _ in range(10):
            t0 = time.perf_counter()
            sup.tick()
            ticks.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            train_tab.refresh_live(sup, None, True, None)
            views.append(time.perf_counter() - t0)
        return statistics.median(ticks) * 1e3, statistics.median(views) * 1e3


def main() -> None:
    logging.getLogger("app.runs.jobs").setLevel(logging.ERROR)  # each killed run logs a warning; not wanted here
    for poll_s in (0.5, 0.2):
        starts, detects = latencies(poll_s)
        print(f"poll {poll_s} s: submit -> worker's first step median {statistics.median(starts):.2f} s "
              f"(max {max(starts):.2f}); SIGKILL -> marked failed median {statistics.median(detects):.2f} s "
              f"(max {max(detects):.2f})")
    for n in (10, 100, 500):
        tick_ms, view_ms = round_costs(n)
        print(f"{n:4d} runs in the store: supervisor round {tick_ms:.1f} ms, live-view refresh {view_ms:.1f} ms")


if __name__ == "__main__":
    main()
