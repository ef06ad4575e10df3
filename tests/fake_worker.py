"""A stand-in for `launch.py train` that keeps the worker's contract (status, metrics, checkpoints, SIGTERM) in ms.

Usage: fake_worker.py RUN_YAML [--resume] [--steps N] [--sleep S] [--save-every K] [--crash-at STEP]
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from app.runs.store import COMPLETED, RUNNING, STOPPED, WORKER_LOCK, RunLock, RunStore  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("run_yaml")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--sleep", type=float, default=0.02)
    parser.add_argument("--save-every", type=int, default=2)
    parser.add_argument("--crash-at", type=int, default=0, help="exit with code 3 at this step, recording nothing")
    args = parser.parse_args()
    print("fake worker argv:", " ".join(sys.argv[1:]), flush=True)

    run_yaml = Path(args.run_yaml)
    RunLock(run_yaml.parent / WORKER_LOCK).acquire()  # one writer per run; the kernel lets go when this process ends
    store, run_id = RunStore(run_yaml.parent.parent), run_yaml.parent.name
    checkpoints = store.checkpoints(run_id)
    start = int(checkpoints[-1].name.split("-")[1]) if args.resume and checkpoints else 0
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(True))
    store.update_status(run_id, state=RUNNING, pid=os.getpid(), step=start, total_steps=args.steps)
    began = time.time()

    def save(step: int) -> None:
        folder = store.checkpoints_dir(run_id) / f"step-{step}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "COMPLETE").write_text("")

    for step in range(start + 1, args.steps + 1):
        time.sleep(args.sleep)
        if step == args.crash_at:
            return 3
        store.append_metric(run_id, {"step": step, "loss": 3.0 / step, "lr": 1e-4, "tokens": 100 * step,
                                     "tokens_per_s": 1000.0, "elapsed": time.time() - began, "mem_bytes": 1_000_000})
        if step % args.save_every == 0:
            save(step)
        store.update_status(run_id, step=step)
        if stop:
            save(step)
            store.update_status(run_id, state=STOPPED, reason="Stopped by the user.", finished=time.time())
            return 0
    store.append_metric(run_id, {"step": args.steps, "eval_loss": 2.5})
    store.update_status(run_id, state=COMPLETED, finished=time.time(), peak_memory_bytes=2_000_000)
    return 0


if __name__ == "__main__":
    sys.exit(main())
