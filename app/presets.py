"""Presets: the YAML files in presets/ (one per method, plus quick-demo), each a partial RunConfig holding only what
differs from the defaults; read by the Method tab and by `launch.py train --preset`."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from app.spec import ConfigError, RunConfig

REPO_ROOT = Path(__file__).resolve().parents[1]
PRESETS_DIR = REPO_ROOT / "presets"


def load_preset(name: str) -> dict[str, Any]:
    """A preset by name (presets/NAME.yaml) or path; holds only the RunConfig fields that differ from defaults."""
    path = Path(name)
    if not path.is_file():
        path = PRESETS_DIR / f"{name}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))
        raise ConfigError(f"no preset {name!r}; choose one of {', '.join(known) or '(none yet)'} or give a YAML path")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({e})") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a preset must be a mapping of run settings")
    return data


def config_from_preset(name: str, overrides: dict[str, Any]) -> RunConfig:
    """The preset as a full RunConfig, with the non-None `overrides` (the command line's --model, --dataset ...)."""
    values = {**load_preset(name), **{k: v for k, v in overrides.items() if v is not None}}
    dataset = values.get("dataset")
    if not dataset:
        raise ConfigError(f"the preset {name!r} names no dataset: pass --dataset FILE")
    for key in ("dataset", "val_dataset"):  # preset paths are relative to the repository
        if values.get(key) and not Path(values[key]).is_absolute() and not Path(values[key]).exists():
            values[key] = str(REPO_ROOT / values[key])
        if values.get(key):
            values[key] = str(Path(values[key]).resolve())
    return RunConfig.from_dict(values)
