"""Recording and checkpoints for the training loop: status.json and metrics.jsonl (`Recorder`), the stop signal
(SIGTERM = save and stop), atomic step-N checkpoint folders (`Checkpointer`) and the final weights (`save_final`)."""
from __future__ import annotations

import errno
import os
import shutil
import signal
import time
from pathlib import Path
from typing import Any

import torch

from app.runs.store import (CHECKPOINT_DONE, CHECKPOINT_WEIGHTS, RUNNING, RunStore, complete_checkpoints,
                            free_bytes)
from app.training.dist import Dist
from app.training.hardware import peak_memory_bytes
from app.workspace import atomic_write_text, replace_dir

STATUS_EVERY_S = 1.0  # status.json is rewritten at most this often (the UI polls it)
HEADROOM_BYTES = 16 << 20  # left free after a checkpoint: the status, metrics and log lines that follow it


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
        self.remove_stale()  # a killed worker's half checkpoint would otherwise count against the space check
        self.check_space(tensor_bytes(weights) + tensor_bytes(state))
        final = self.root / f"step-{step}"
        tmp = self.root / f".step-{step}.tmp-{os.getpid()}"
        try:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
            save_file(weights, str(tmp / CHECKPOINT_WEIGHTS))
            torch.save(state, tmp / "training_state.pt")
            (tmp / CHECKPOINT_DONE).write_text(f"{step}\n")
            replace_dir(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        self.prune()
        return final

    def check_space(self, size: int) -> None:
        """Refuse a checkpoint the disk cannot hold before writing any of it (older ones are pruned only after the
        new one is whole), with the OSError of a full disk: half a checkpoint would only fill the disk for the
        status and the log."""
        needed, free = int(size * 1.05) + HEADROOM_BYTES, free_bytes(self.root)  # 5%: the files' own headers
        if free is not None and free < needed:
            raise OSError(errno.ENOSPC, f"a checkpoint needs about {needed / 1e6:,.0f} MB, {free / 1e6:,.0f} MB are "
                                        f"free", str(self.root))

    def complete(self) -> list[Path]:
        return complete_checkpoints(self.root)

    def prune(self) -> None:
        for old in self.complete()[:-self.keep_last]:
            shutil.rmtree(old, ignore_errors=True)
        self.remove_stale()

    def remove_stale(self) -> None:
        for stale in self.root.glob(".step-*.tmp-*"):  # left by a worker killed mid-save
            if not stale.name.endswith(f"-{os.getpid()}"):
                shutil.rmtree(stale, ignore_errors=True)

    @staticmethod
    def load(folder: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        from safetensors.torch import load_file

        return load_file(str(folder / CHECKPOINT_WEIGHTS)), torch.load(folder / "training_state.pt", weights_only=False)


def tensor_bytes(obj: Any) -> int:
    """The bytes of every tensor in a nested checkpoint (weights, optimizer state): about its size on disk."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return 0


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
