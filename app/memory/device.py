"""The machine's devices and their memory: the GPU (or the CPU's RAM) a run would train on, how many GPUs it can
use, and whether an error means that memory ran out. Nothing here imports torch until it is called."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class DeviceInfo:
    kind: str  # cuda | cpu
    name: str
    total_bytes: int
    free_bytes: int


def detect_device() -> DeviceInfo:
    """The first NVIDIA GPU via NVML (name, total, free); without one, this machine's RAM."""
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            handle = pynvml.nvmlDeviceGetHandleByIndex(0)
            name = pynvml.nvmlDeviceGetName(handle)
            mem = pynvml.nvmlDeviceGetMemoryInfo(handle)
            return DeviceInfo("cuda", name.decode() if isinstance(name, bytes) else str(name), int(mem.total), int(mem.free))
        finally:
            pynvml.nvmlShutdown()
    except Exception:  # noqa: BLE001 - no driver, no GPU, no library: all mean "train on the CPU"
        total, free = system_memory()
        return DeviceInfo("cpu", f"CPU ({os.cpu_count()} cores), no GPU found", total, free)


def gpu_count() -> int:
    """How many CUDA GPUs a training run here can use (0 on a CPU-only machine), as torch counts them, which honours
    CUDA_VISIBLE_DEVICES. Where torch cannot say (not importable, or its CUDA runtime fails to start), NVML's count,
    which needs only the driver and leaves CUDA uninitialised."""
    try:
        import torch

        return int(torch.cuda.device_count())
    except Exception:  # noqa: BLE001 - a broken CUDA install must not break the page
        return nvml_gpu_count()


def nvml_gpu_count() -> int:
    """NVIDIA GPUs the driver reports, limited to CUDA_VISIBLE_DEVICES when that is set; 0 without a driver."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            found = int(pynvml.nvmlDeviceGetCount())
        finally:
            pynvml.nvmlShutdown()
    except Exception:  # noqa: BLE001 - no driver, no GPU, no library
        return 0
    if visible is None:
        return found
    listed = [d for d in visible.split(",") if d.strip()]
    return min(found, len(listed))


def system_memory(meminfo: str | Path = "/proc/meminfo") -> tuple[int, int]:
    """(total, available) RAM in bytes."""
    values = {}
    try:
        for line in Path(meminfo).read_text().splitlines():
            key, _, rest = line.partition(":")
            values[key] = int(rest.split()[0]) * 1024
    except (OSError, ValueError, IndexError):
        import psutil

        vm = psutil.virtual_memory()
        return int(vm.total), int(vm.available)
    return values.get("MemTotal", 0), values.get("MemAvailable", values.get("MemFree", 0))


def is_oom(error: BaseException) -> bool:
    """Whether an exception means the device ran out of memory: torch's or Python's own error, or a RuntimeError
    whose message says so (CUDA's "out of memory", the CPU allocator's "can't allocate memory" or "not enough
    memory"). The one test, for the training worker (a failure of kind oom) and the chat's model cache (a message
    the user can act on, not a crash)."""
    import torch

    if isinstance(error, (MemoryError, torch.OutOfMemoryError)):
        return True
    text = str(error).lower()
    words = ("out of memory", "can't allocate", "not enough memory")
    return isinstance(error, RuntimeError) and any(w in text for w in words)
