"""Datasets kept in the workspace (normalised train.jsonl + meta.json, listed again after a restart) and what the
Data tab shows for a chosen one: rows, templated token lengths, a preview table."""
from __future__ import annotations

import hashlib
import json
import os
import re
import threading
from collections import Counter
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from app.data.dataset import HUB_PREFIX, DataError, DataReport, check_file, demo_datasets, unreadable_report
from app.workspace import Workspace, atomic_write_json, atomic_write_text


@dataclass(frozen=True)
class DatasetEntry:
    name: str
    path: Path  # the normalised train.jsonl (a demo's own file)
    title: str
    rows: int
    kind: str  # "demo" | "uploaded" | "hub"

    @property
    def label(self) -> str:
        return f"{self.title} · {self.rows:,} rows ({self.kind})"


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-.")[:60] or "dataset"


def _fingerprint(source: str) -> str:
    if source.startswith(HUB_PREFIX):
        return source
    digest = hashlib.sha256()
    with open(source, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def save_dataset(workspace: Workspace, report: DataReport, source: str | Path, name: str | None = None) -> DatasetEntry:
    """Store the report's valid rows as datasets/<name>/train.jsonl plus meta.json; the same source file
    saved again (say with another policy) replaces its earlier copy."""
    if not report.usable:
        raise DataError(report.verdict())
    source = str(source)
    hub = source.startswith(HUB_PREFIX)
    kind = "hub" if hub else "uploaded"
    fingerprint = _fingerprint(source)
    base = _slug(name or (source[len(HUB_PREFIX):].replace("/", "-") if hub else Path(report.file).stem))
    folder, n = workspace.datasets / base, 1
    while (folder / "meta.json").is_file() and _read_meta(folder).get("fingerprint") != fingerprint:
        n += 1
        folder = workspace.datasets / f"{base}-{n}"
    train = folder / "train.jsonl"
    atomic_write_text(train, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in report.rows))
    atomic_write_json(folder / "meta.json", {
        "name": folder.name,
        "source": source if hub else report.file,
        "kind": kind,
        "fingerprint": fingerprint,
        "format": report.format,
        "mapping": report.mapping.to_dict(),
        "policy": report.policy,
        "records": report.records,
        "rows": report.kept,
        "dropped": report.dropped,
        "fixed": report.fixed,
        "findings": dict(report.counts),
        "verdict": report.verdict(),
    })
    return DatasetEntry(folder.name, train, folder.name, report.kept, kind)


def discard_upload(source: str | Path, upload_dir: str | Path) -> bool:
    """Delete an uploaded file once its rows are saved in the workspace: Gradio keeps every upload in its cache
    folder until the server stops. Only a file inside `upload_dir` goes (with the folder Gradio made for it, when
    left empty), never a path anywhere else such as a user's own file. True when the file was deleted."""
    path, cache = Path(os.path.abspath(source)), Path(os.path.abspath(upload_dir))
    # Both as written and with links resolved: a link into the cache, or out of it, is left alone.
    if cache not in path.parents or cache.resolve() not in path.resolve().parents or not path.is_file():
        return False
    try:
        path.unlink()
    except OSError:  # already gone, or not ours to delete after all: the saved dataset is what matters
        return False
    if path.parent != cache:
        try:
            path.parent.rmdir()
        except OSError:  # another upload shares the folder
            pass
    return True


class UploadsUnderReview:
    """The uploads the page's sessions have under review. Gradio stores an upload at <cache>/<hash of its content>/
    <name>, so two sessions (two users, or a reloaded page) that upload the same file share one path: it leaves the
    cache only when the last session that has it lets it go."""

    def __init__(self) -> None:
        self._holders: Counter[str] = Counter()
        self._lock = threading.Lock()  # Gradio runs handlers in worker threads

    def claim(self, path: str) -> None:
        with self._lock:
            self._holders[path] += 1

    def release(self, path: str, upload_dir: str | Path) -> bool:
        """Let go of `path`; True when that deleted it (no session holds it any more, and it is in the cache)."""
        with self._lock:
            self._holders[path] -= 1
            if self._holders[path] > 0:
                return False
            del self._holders[path]
        return discard_upload(path, upload_dir)


def _read_meta(folder: Path) -> dict:
    try:
        meta = json.loads((folder / "meta.json").read_text(encoding="utf-8"))
        return meta if isinstance(meta, dict) else {}
    except (OSError, ValueError):
        return {}


def dataset_meta(path: str | Path) -> dict:
    """meta.json next to a stored train.jsonl ({} for other files, e.g. demos)."""
    return _read_meta(Path(path).parent)


def list_datasets(workspace: Workspace) -> list[DatasetEntry]:
    """Demo datasets first, then the stored ones by name: what the Data tab's picker offers after a restart."""
    entries = [DatasetEntry(c.name, c.path, c.title, c.rows, "demo") for c in demo_datasets()]
    if workspace.datasets.is_dir():
        for folder in sorted(workspace.datasets.iterdir()):
            meta = _read_meta(folder)
            if meta and (folder / "train.jsonl").is_file():
                entries.append(DatasetEntry(folder.name, folder / "train.jsonl", folder.name, int(meta.get("rows", 0)),
                                            meta.get("kind", "uploaded")))
    return entries


# --- what the Data tab shows for a chosen dataset ----------------------------------------------------------------
@dataclass(frozen=True)
class DatasetView:
    report: DataReport  # rows and templated token lengths of a stored dataset (callers must not change it)
    tokenizer: Any  # None when the chosen model has no tokenizer here
    note: str  # why there are no token counts, when tokenizer is None


def open_dataset(path: str | Path, model_ref: str, models_dir: str | Path) -> DatasetView:
    """Rows and token lengths of a dataset for a model; cached, so moving the cutoff slider re-tokenizes nothing."""
    if not Path(path).is_file():
        return DatasetView(unreadable_report(Path(path).name, "no such file"), None,
                           f"{path} no longer exists: pick another dataset or upload it again")
    stat = Path(path).stat()
    return _open_dataset(str(path), stat.st_mtime_ns, stat.st_size, model_ref or "embedded", str(models_dir))


@lru_cache(maxsize=4)
def _open_dataset(path: str, mtime_ns: int, size: int, model_ref: str, models_dir: str) -> DatasetView:
    from app.data.tokens import load_tokenizer
    from app.models import ModelError

    try:
        tokenizer, note = load_tokenizer(model_ref, models_dir), ""
    except ModelError as e:
        tokenizer, note = None, str(e)
    except (OSError, ValueError) as e:
        tokenizer, note = None, f"could not load the tokenizer of {model_ref!r} ({type(e).__name__}: {e})"
    # No real cutoff here: the lengths are kept and the tab applies the slider's cutoff to them.
    report = check_file(path, tokenizer=tokenizer, cutoff=UNLIMITED if tokenizer is not None else None)
    return DatasetView(report, tokenizer, note)


UNLIMITED = 1 << 30
PREVIEW_CHARS = 300  # per cell in the preview table; the full text is in the rendered view


def preview_rows(rows: list[dict], row_numbers: list[int], limit: int = 500) -> list[list]:
    """[row, instruction, input, output] for the first `limit` rows, long cells shortened."""
    def cut(text: str) -> str:
        return text if len(text) <= PREVIEW_CHARS else text[: PREVIEW_CHARS - 1] + "…"

    return [[n, cut(r["instruction"]), cut(r["input"]), cut(r["output"])] for n, r in zip(row_numbers[:limit], rows[:limit])]
