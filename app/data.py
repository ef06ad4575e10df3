"""Instruction datasets: load, map columns to instruction/input/output, validate row by row, split."""
from __future__ import annotations

import json
from pathlib import Path


def load_training_rows(path: str | Path) -> list[dict[str, str]]:
    """Alpaca rows {instruction, input, output} from a JSON array or JSONL file (the Data issue widens this)."""
    text = Path(path).read_text(encoding="utf-8")
    stripped = text.lstrip()
    rows = json.loads(text) if stripped.startswith("[") else [json.loads(l) for l in text.splitlines() if l.strip()]
    return [
        {"instruction": str(r.get("instruction", "")), "input": str(r.get("input", "") or ""), "output": str(r.get("output", ""))}
        for r in rows
    ]
