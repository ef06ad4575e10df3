"""The training process's hardware: which device it trains on, how many CPU threads it can use, the memory it holds,
and the words for a run that ran out of it."""
from __future__ import annotations

import os
import resource
import time

import torch

from app.spec import RunConfig


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
