"""The run store: one folder per run holding its config, status, metrics, log, checkpoints and final weights.

runs/<run-id>/
    run.yaml          the fully resolved RunConfig (what `launch.py train` reads)
    status.json       RunStatus, rewritten atomically
    metrics.jsonl     one JSON object per logged step: {"step", "loss", "lr", "tokens", ...}; eval lines have "eval_loss"
    train.log         the worker's stdout and stderr
    checkpoints/step-N/   resumable state (weights of the trainable part, optimizer, scheduler, rng, data position)
    final/            the adapter (PEFT format) or full model, with the tokenizer
"""
from __future__ import annotations

import json
import os
import re
import shutil
import time
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime
from pathlib import Path
from typing import Any

from app.spec import ConfigError, RunConfig
from app.workspace import atomic_write_json, atomic_write_text

QUEUED, RUNNING, COMPLETED, STOPPED, FAILED, INTERRUPTED = (
    "queued", "running", "completed", "stopped", "failed", "interrupted",
)
FINAL_STATES = (COMPLETED, STOPPED, FAILED, INTERRUPTED)
RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
CHECKPOINT_DONE = "COMPLETE"  # written last into checkpoints/step-N/: a folder without it was cut short
CHECKPOINT_WEIGHTS = "trainable.safetensors"  # a checkpoint's trainable weights (the chat opens them as an adapter)


def checkpoint_step(folder: Path) -> int | None:
    """N for a checkpoints/step-N folder; None for a folder not named so."""
    m = re.fullmatch(r"step-([0-9]+)", Path(folder).name)
    return int(m[1]) if m else None


def complete_checkpoints(root: Path) -> list[Path]:
    """The finished step-N folders under `root`, oldest first; a folder without its completion marker is ignored.

    The one definition: the worker resumes from (and prunes) these, the UI offers these to resume and to chat with."""
    if not root.is_dir():
        return []
    done = [d for d in root.glob("step-*") if checkpoint_step(d) is not None and (d / CHECKPOINT_DONE).is_file()]
    return sorted(done, key=checkpoint_step)


@dataclass
class RunStatus:
    state: str = QUEUED
    reason: str = ""  # plain words for a failure or a stop
    failure: str = ""  # oom | nan | data | killed | error, when state is failed
    step: int = 0
    total_steps: int = 0
    pid: int | None = None
    created: float = field(default_factory=time.time)
    started: float | None = None
    finished: float | None = None
    updated: float = field(default_factory=time.time)
    peak_memory_bytes: int | None = None  # measured: CUDA max reserved, or CPU peak RSS
    stop_requested: bool = False
    queued_at: float | None = None  # when it (re)joined the queue; a resume waits behind runs queued before it
    device: str = ""  # "cuda" or "cpu", written by the worker: which estimate the measured peak compares with

    @classmethod
    def from_dict(cls, data: Any) -> "RunStatus":
        if not isinstance(data, dict):
            return cls(state=FAILED, failure="error", reason="status.json was unreadable")
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


class RunNotFound(KeyError):
    pass


class RunStore:
    def __init__(self, runs_dir: str | os.PathLike):
        self.root = Path(runs_dir)
        self.root.mkdir(parents=True, exist_ok=True)

    # --- paths ---------------------------------------------------------------------------------------------
    def dir(self, run_id: str) -> Path:
        if not RUN_ID.match(run_id or ""):
            raise RunNotFound(f"not a run id: {run_id!r}")
        return self.root / run_id

    def config_path(self, run_id: str) -> Path:
        return self.dir(run_id) / "run.yaml"

    def metrics_path(self, run_id: str) -> Path:
        return self.dir(run_id) / "metrics.jsonl"

    def log_path(self, run_id: str) -> Path:
        return self.dir(run_id) / "train.log"

    def final_dir(self, run_id: str) -> Path:
        return self.dir(run_id) / "final"

    def checkpoints_dir(self, run_id: str) -> Path:
        return self.dir(run_id) / "checkpoints"

    # --- create / read / write -----------------------------------------------------------------------------
    def new_id(self, config: RunConfig) -> str:
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        base = re.sub(r"[^A-Za-z0-9._-]+", "-", f"{stamp}-{config.method}")
        run_id, n = base, 1
        while (self.root / run_id).exists():
            n += 1
            run_id = f"{base}-{n}"
        return run_id

    def create(self, config: RunConfig) -> str:
        run_id = config.run_id or self.new_id(config)
        config.run_id = run_id
        self.dir(run_id).mkdir(parents=True, exist_ok=False)
        atomic_write_text(self.config_path(run_id), config.to_yaml())
        self.write_status(run_id, RunStatus())
        return run_id

    def exists(self, run_id: str) -> bool:
        try:
            return self.config_path(run_id).is_file()
        except RunNotFound:
            return False

    def config(self, run_id: str) -> RunConfig:
        path = self.config_path(run_id)
        if not path.is_file():
            raise RunNotFound(run_id)
        return RunConfig.from_yaml(path)

    def status(self, run_id: str) -> RunStatus:
        path = self.dir(run_id) / "status.json"
        try:
            return RunStatus.from_dict(json.loads(path.read_text(encoding="utf-8")))
        except FileNotFoundError:
            raise RunNotFound(run_id) from None
        except (json.JSONDecodeError, UnicodeDecodeError, TypeError):
            return RunStatus.from_dict(None)

    def write_status(self, run_id: str, status: RunStatus) -> None:
        status.updated = time.time()
        atomic_write_json(self.dir(run_id) / "status.json", asdict(status))

    def update_status(self, run_id: str, **changes: Any) -> RunStatus:
        status = self.status(run_id)
        for key, value in changes.items():
            setattr(status, key, value)
        self.write_status(run_id, status)
        return status

    def append_metric(self, run_id: str, record: dict[str, Any]) -> None:
        with open(self.metrics_path(run_id), "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")

    def metrics(self, run_id: str) -> list[dict[str, Any]]:
        """Every readable line; a truncated or garbled line (a crash mid-write) is skipped."""
        path = self.metrics_path(run_id)
        if not path.is_file():
            return []
        records = []
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if isinstance(record, dict):
                    records.append(record)
        return records

    def log_tail(self, run_id: str, lines: int = 40) -> str:
        path = self.log_path(run_id)
        if not path.is_file():
            return ""
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 64_000))
            return "\n".join(f.read().decode("utf-8", "replace").splitlines()[-lines:])

    def list_ids(self) -> list[str]:
        """Run ids, newest first."""
        ids = [d.name for d in self.root.iterdir() if d.is_dir() and (d / "run.yaml").is_file()]
        return sorted(ids, key=lambda i: (self.root / i / "run.yaml").stat().st_mtime, reverse=True)

    def checkpoints(self, run_id: str) -> list[Path]:
        """Finished checkpoints, oldest first."""
        return complete_checkpoints(self.checkpoints_dir(run_id))

    def delete(self, run_id: str) -> None:
        shutil.rmtree(self.dir(run_id))

    def safe_config(self, run_id: str) -> RunConfig | None:
        """The config, or None when run.yaml is missing or garbled (listed as broken rather than crashing)."""
        try:
            return self.config(run_id)
        except (RunNotFound, ConfigError, OSError):
            return None
