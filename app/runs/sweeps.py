"""Rank sweeps: one queued run per LoRA rank with everything else equal, and the table that compares them."""
from __future__ import annotations

import json
import re
import struct
from dataclasses import dataclass, fields
from math import prod
from pathlib import Path

from app.runs import history
from app.methods import get_method
from app.runs.store import RunNotFound, RunStore
from app.spec import ConfigError, RunConfig

RANKS = (4, 8, 16, 32, 64)
SWEEP_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9 ._-]{0,63}$")


def has_rank(method: str) -> bool:
    """Whether the method has a rank `r` to sweep (the LoRA family)."""
    return "r" in {f.name for f in fields(get_method(method).args)}


def sweep_configs(base: RunConfig, ranks: list[int], name: str) -> list[RunConfig]:
    """One config per rank; only `method_args.r` and the sweep name differ from `base`."""
    if not has_rank(base.method):
        raise ConfigError(f"method={base.method!r}: it has no rank r to sweep; choose LoRA or another method with r")
    ranks = sorted({int(r) for r in ranks})
    if len(ranks) < 2:
        raise ConfigError(f"ranks={ranks}: pick at least two values of r to compare")
    if ranks[0] < 1:
        raise ConfigError(f"ranks={ranks}: every r must be at least 1")
    name = (name or "").strip()
    if not SWEEP_NAME.match(name):
        raise ConfigError(f"sweep name {name!r}: use letters, digits, spaces, dots, dashes or underscores (up to 64)")
    data = base.to_dict()
    return [RunConfig.from_dict({**data, "method_args": {**base.method_args, "r": r}, "sweep": name, "run_id": ""})
            for r in ranks]


def sweep_names(store: RunStore) -> list[str]:
    """Names of the sweeps in the store, newest first."""
    names: dict[str, float] = {}
    for summary in history.list_runs(store):
        if summary.sweep:
            names[summary.sweep] = max(names.get(summary.sweep, 0.0), summary.created)
    return sorted(names, key=names.get, reverse=True)


def weights_facts(folder: Path) -> tuple[int | None, int | None]:
    """(numbers stored, bytes on disk) of the weight files in a final/ folder, read from safetensors headers only."""
    files = sorted(Path(folder).glob("*.safetensors"))
    if not files:
        return None, None
    numbers = 0
    for path in files:
        try:
            with open(path, "rb") as f:
                (size,) = struct.unpack("<Q", f.read(8))
                header = json.loads(f.read(size))
        except (OSError, struct.error, ValueError):
            return None, None
        numbers += sum(prod(t.get("shape", [])) for k, t in header.items() if k != "__metadata__")
    return numbers, sum(p.stat().st_size for p in files)


@dataclass
class SweepRow:
    run_id: str
    r: int | None
    state: str
    train_loss: float | None
    eval_loss: float | None
    trainable: float | None  # counted in the saved adapter, else the estimate's figure
    adapter_bytes: int | None
    wall_s: float | None
    estimated_bytes: float | None
    peak_bytes: float | None


def sweep_rows(store: RunStore, name: str) -> list[SweepRow]:
    """The sweep's runs by rank; a run that cannot be read is left out (the runs list shows it as broken)."""
    rows = []
    for summary in history.list_runs(store):
        if summary.sweep != name or summary.state == history.BROKEN:
            continue
        try:
            config, status = store.config(summary.run_id), store.status(summary.run_id)
        except (RunNotFound, ConfigError, OSError):
            continue
        c = history.curves(store.metrics(summary.run_id))
        trainable, size = weights_facts(store.final_dir(summary.run_id))
        rows.append(SweepRow(
            summary.run_id, history.method_args(config).get("r"), status.state, history.final_train_loss(c),
            c.eval[-1][1] if c.eval else None, trainable or history.estimated_trainable(config.estimate), size,
            history.training_seconds(status, c), history.estimated_bytes(config.estimate, status.device),
            history.number(status.peak_memory_bytes),
        ))
    return sorted(rows, key=lambda row: (row.r is None, row.r or 0))
