"""The workspace folder: where models, datasets and runs live, and how files in it are written safely."""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

DEFAULT_WORKSPACE = "workspace"
WORKSPACE_ENV = "WORKBENCH_WORKSPACE"
# A converted model is large and identical for every workspace, so tests and several workspaces may share one store.
MODELS_ENV = "WORKBENCH_MODELS_DIR"


@dataclass(frozen=True)
class Workspace:
    root: Path

    @classmethod
    def open(cls, root: str | os.PathLike | None = None) -> "Workspace":
        """The workspace at `root`, else $WORKBENCH_WORKSPACE, else ./workspace; created if missing."""
        chosen = Path(root or os.environ.get(WORKSPACE_ENV) or DEFAULT_WORKSPACE).expanduser().resolve()
        ws = cls(chosen)
        for d in (ws.root, ws.models, ws.datasets, ws.runs):
            d.mkdir(parents=True, exist_ok=True)
        return ws

    @property
    def models(self) -> Path:
        shared = os.environ.get(MODELS_ENV)
        return Path(shared).expanduser().resolve() if shared else self.root / "models"

    @property
    def datasets(self) -> Path:
        return self.root / "datasets"

    @property
    def runs(self) -> Path:
        return self.root / "runs"


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write `text` so that a reader sees the old file or the new one, never half of either (crash, full disk)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: str | os.PathLike, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def replace_dir(tmp: str | os.PathLike, target: str | os.PathLike) -> None:
    """Move a finished temporary folder into place, replacing an older `target` (written last, so a crash before
    this leaves the old folder whole)."""
    target = Path(target)
    if target.exists():
        shutil.rmtree(target)
    os.replace(tmp, target)
