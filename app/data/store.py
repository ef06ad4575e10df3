"""Datasets kept in the workspace (normalised train.jsonl + meta.json, listed again after a restart) and what the
Data tab shows for a chosen one: rows, templated token lengths, a preview table, and one row marked where it is
learned."""
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
from typing import Any, Sequence

from app.data import template
from app.data.conversation import Turn, first_prompt, from_row, is_conversation_row
from app.data.preference import is_pair_row, is_preference_row, is_unpaired_row, side_rows
from app.data.dataset import HUB_PREFIX, DataError, DataReport, check_file, demo_datasets, plural, unreadable_report
from app.workspace import Workspace, atomic_write_json, atomic_write_text


@dataclass(frozen=True)
class DatasetEntry:
    name: str
    path: Path  # the normalised train.jsonl (a demo's own file)
    title: str
    rows: int
    kind: str  # "demo" | "uploaded" | "hub"
    unit: str = "row"  # what one row is: "row" (an instruction and its answer) or "conversation"

    @property
    def label(self) -> str:
        return f"{self.title} · {plural(self.rows, self.unit)} ({self.kind})"


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
        # "conversation" or "row"; preference data: "pair" (rated responses are stored as pairs too) or "unpaired"
        "examples": "unpaired" if report.mapping.kind == "unpaired" else report.example_word,
        "dropped": report.dropped,
        "fixed": report.fixed,
        "findings": dict(report.counts),
        "verdict": report.verdict(),
    })
    return DatasetEntry(folder.name, train, folder.name, report.kept, kind, report.example_word)


def save_rows(workspace: Workspace, rows: Sequence[dict], name: str, kind: str, source_note: str,
              examples: str = "pair", left_out: dict[str, int] | None = None) -> DatasetEntry:
    """Store rows made in the workbench (not read from a file, e.g. pairs from the Compare tab's votes) as
    datasets/<name>/train.jsonl plus meta.json, like save_dataset; a name already taken gets -2, -3, ... The rows
    must already be in a stored form (app.data.preference's pairs, conversations): they are written as they are.
    `left_out` counts what was not made into rows, by reason, for the Data tab's card."""
    if not rows:
        raise DataError("there are no rows to save")
    base = _slug(name)
    folder, n = workspace.datasets / base, 1
    while folder.exists():
        n += 1
        folder = workspace.datasets / f"{base}-{n}"
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    atomic_write_text(folder / "train.jsonl", text)
    atomic_write_json(folder / "meta.json", {
        "name": folder.name,
        "source": source_note,
        "kind": kind,
        "fingerprint": hashlib.sha256(text.encode("utf-8")).hexdigest(),
        "format": "jsonl",
        "policy": "drop",
        "records": len(rows),
        "rows": len(rows),
        "examples": examples,
        "dropped": 0,
        "fixed": 0,
        "findings": {},
        "left_out": dict(left_out or {}),
    })
    return DatasetEntry(folder.name, folder / "train.jsonl", folder.name, len(rows), kind, meta_unit({"examples": examples}))


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


def meta_unit(meta: dict) -> str:
    """What one row of a saved dataset is, from its meta.json (older ones say it only by their mapping)."""
    examples = {"unpaired": "rated answer"}.get(meta.get("examples"), meta.get("examples"))
    return examples or ("conversation" if (meta.get("mapping") or {}).get("conversations") else "row")


def dataset_meta(path: str | Path) -> dict:
    """meta.json next to a stored train.jsonl ({} for other files, e.g. demos)."""
    return _read_meta(Path(path).parent)


def list_datasets(workspace: Workspace) -> list[DatasetEntry]:
    """Demo datasets first, then the stored ones by name: what the Data tab's picker offers after a restart."""
    entries = [DatasetEntry(c.name, c.path, c.title, c.rows, "demo",
                            "conversation" if holds_conversations(c.path) else "row") for c in demo_datasets()]
    if workspace.datasets.is_dir():
        for folder in sorted(workspace.datasets.iterdir()):
            meta = _read_meta(folder)
            if meta and (folder / "train.jsonl").is_file():
                entries.append(DatasetEntry(folder.name, folder / "train.jsonl", folder.name, int(meta.get("rows", 0)),
                                            meta.get("kind", "uploaded"), meta_unit(meta)))
    return entries


def holds_conversations(path: str | Path) -> bool:
    """Whether a stored dataset (a demo's file or a saved train.jsonl, one row a line) holds conversations rather
    than instruction rows: the Train tab shows the choice of assistant turns only for those."""
    try:
        with open(path, encoding="utf-8") as f:
            first = next((line for line in f if line.strip()), "")
        row = json.loads(first) if first else None
    except (OSError, ValueError):
        return False
    return isinstance(row, dict) and is_conversation_row(row) and not is_preference_row(row)


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


# --- lengths with the dataset-level system prompt ----------------------------------------------------------------
@dataclass(frozen=True)
class Lengths:
    """Templated token counts per kept row, as DataReport holds them."""
    lengths: Sequence[int]
    answer_ends: Sequence[Sequence[int]]  # per row, where each assistant answer ends (empty for instruction rows)
    answer_starts: Sequence[int]  # per row, where its first answer starts


def _templated_tokens(tokenizer, row: dict, system: str) -> int:
    spans = template.render_spans(tokenizer, row, system)
    return sum(map(len, template.span_token_ids(tokenizer, spans)))


def lengths_with_system(view: DatasetView, system: str) -> Lengths:
    """The view's lengths with the dataset-level system prompt written into every row that has none of its own. The
    template writes a system prompt the same way in every row, so what it adds is measured once, on the first such
    row, instead of templating the whole dataset again at every keystroke."""
    report = view.report
    same = Lengths(report.lengths, report.answer_ends, report.answer_starts)
    plain = next((r for r in report.rows if not r.get("system")), None)
    if not system or view.tokenizer is None or plain is None:
        return same
    try:
        shift = _templated_tokens(view.tokenizer, plain, system) - _templated_tokens(view.tokenizer, plain, "")
    except template.TemplateError:  # the data check names such rows; their lengths stay as counted
        return same
    if not shift:
        return same
    moved = [0 if r.get("system") else shift for r in report.rows]
    return Lengths([n + d for n, d in zip(report.lengths, moved)],
                   [[e + d for e in ends] for ends, d in zip(report.answer_ends, moved)],
                   [n + d for n, d in zip(report.answer_starts, moved)])


# --- the preview table ---------------------------------------------------------------------------------------------
PREVIEW_CHARS = 300  # per cell in the preview table; the full text is in the rendered view
ALPACA_PREVIEW = ["line", "instruction", "input", "output"]
CONVERSATION_PREVIEW = ["line", "first user message", "turns", "last answer", "system prompt"]
PAIR_PREVIEW = ["line", "prompt (its last message)", "chosen", "rejected", "system prompt"]
UNPAIRED_PREVIEW = ["line", "prompt (its last message)", "answer", "good?", "system prompt"]


@dataclass(frozen=True)
class PreviewTable:
    headers: list[str]  # the first column is always the row's line: the tab's row selection reads it
    rows: list[list]


def _cut(text: str) -> str:
    return text if len(text) <= PREVIEW_CHARS else text[: PREVIEW_CHARS - 1] + "…"


def _answer(turn: Turn) -> str:
    calls = ", ".join(f"{c.name}(…)" for c in turn.tool_calls)
    return " ".join(part for part in (turn.content, f"[calls {calls}]" if calls else "") if part)


def _last_prompt(row: dict) -> str:
    """A preference row's prompt as the preview shows it: its last message (the question the answers reply to)."""
    messages = row.get("messages") or []
    return str(messages[-1].get("content") or "") if messages else ""


def _conversation_cells(row: dict) -> list:
    conversation = from_row(row)
    answers = [t for t in conversation.turns if t.role == "assistant"]
    return [first_prompt(row), len(conversation.turns), _answer(answers[-1]) if answers else "", conversation.system]


def preview_rows(rows: list[dict], row_numbers: list[int], limit: int = 500,
                 conversations: bool | None = None) -> PreviewTable:
    """The first `limit` rows, long cells shortened: [line, instruction, input, output] for Alpaca rows, [line, first
    user message, turns, last answer, system prompt] for conversations (None: as the rows are)."""
    head = rows[:limit]
    if head and is_pair_row(head[0]):
        return PreviewTable(PAIR_PREVIEW, [[n, _cut(_last_prompt(r)), _cut(r["chosen"]), _cut(r["rejected"]), _cut(r.get("system") or "")]
                                           for n, r in zip(row_numbers, head)])
    if head and is_unpaired_row(head[0]):
        return PreviewTable(UNPAIRED_PREVIEW, [[n, _cut(_last_prompt(r)), _cut(r["completion"]), "yes" if r["label"] else "no",
                                                _cut(r.get("system") or "")] for n, r in zip(row_numbers, head)])
    if conversations or (conversations is None and any(is_conversation_row(r) for r in head)):
        cells = [_conversation_cells(r) for r in head]
        return PreviewTable(CONVERSATION_PREVIEW, [[n, *[_cut(c) if isinstance(c, str) else c for c in row]]
                                                   for n, row in zip(row_numbers, cells)])
    return PreviewTable(ALPACA_PREVIEW, [[n, _cut(r["instruction"]), _cut(r["input"]), _cut(r["output"])]
                                        for n, r in zip(row_numbers, head)])


# --- one row as the model reads it: which text is learned, read only, or cut --------------------------------------
LEARNED, READ_ONLY, CUT, LEFT_OUT = "learned", "read only", "cut by the cutoff", "left out (after the last answer)"


@dataclass(frozen=True)
class TurnTokens:
    turn: int | None  # index into the conversation's turns; None for the system prompt and tools
    role: str
    tokens: int  # once templated, before the cutoff
    kept: int  # of those, what the cutoff leaves
    learned: int  # of those, what the loss is taken on


@dataclass(frozen=True)
class RowView:
    pieces: list[tuple[str, str]]  # the whole templated row in order: (text, LEARNED / READ_ONLY / CUT / LEFT_OUT)
    turns: list[TurnTokens]
    tokens: int  # once templated, before the cutoff
    kept: int  # what training reads of it
    answers: int  # assistant turns
    answers_cut: int  # assistant turns (wholly or partly) lost to the cutoff

    @property
    def text(self) -> str:
        return "".join(text for text, _ in self.pieces)


def _split_at(tokenizer, text: str, ids: list[int], n: int) -> int:
    """Where in `text` its first `n` tokens end."""
    try:
        offsets = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
        if len(offsets) == len(ids):
            return offsets[n - 1][1]
    except (NotImplementedError, ValueError, TypeError):  # a slow (Python) tokenizer has no offsets
        pass
    prefix = tokenizer.decode(ids[:n])
    return len(prefix) if text.startswith(prefix) else min(len(text), len(prefix))


def row_view(tokenizer, row: dict, cutoff: int, system: str = "", train_on_prompt: bool = False,
             last_turn_only: bool = False) -> RowView:
    """The row as training reads it (template.encode on template.render_spans): each span of text marked learned, read
    only, or lost to the cutoff, and the tokens per turn. Raises template.TemplateError as render_spans does. A
    preference row shows its first side (the chosen answer, or the rated one) after its prompt."""
    if is_preference_row(row):
        row = side_rows(row)[0][1]
    spans = template.render_spans(tokenizer, row, system)
    span_ids = template.span_token_ids(tokenizer, spans)
    enc = template.encode(spans, span_ids, cutoff, train_on_prompt, last_turn_only)
    total, end = sum(map(len, span_ids)), len(enc.input_ids)
    gone = CUT if total > cutoff else LEFT_OUT  # under the cutoff, encode leaves out only what follows the last answer
    pieces: list[tuple[str, str]] = []
    turns: dict[tuple[int | None, str], list[int]] = {}  # (turn, role) -> [tokens, kept, learned], in order
    start = 0
    for span, ids in zip(spans, span_ids):
        kept = max(0, min(len(ids), end - start))
        learned = sum(1 for label in enc.labels[start:start + kept] if label != template.IGNORE_INDEX)
        mark = LEARNED if learned else READ_ONLY
        if kept == len(ids):
            pieces.append((span.text, mark))
        elif kept == 0:
            pieces.append((span.text, gone))
        else:
            at = _split_at(tokenizer, span.text, ids, kept)
            pieces += [(span.text[:at], mark), (span.text[at:], gone)]
        counts = turns.setdefault((span.turn, span.role), [0, 0, 0])
        counts[0] += len(ids)
        counts[1] += kept
        counts[2] += learned
        start += len(ids)
    return RowView([p for p in pieces if p[0]], [TurnTokens(t, role, *c) for (t, role), c in turns.items()], total, end,
                   enc.turns, enc.turns_cut)
