"""Datasets: load any supported file, map its columns (instruction/input/output, a conversation list, or preference
data: app.data.preference), validate row by row (every finding names the file, row and field), count templated
tokens, split, and keep normalised copies."""
from __future__ import annotations

import hashlib
import json
import math
import random
import re
from array import array
from collections import Counter
from dataclasses import asdict, dataclass, field, replace
from itertools import chain, islice
from pathlib import Path
from typing import Any, Iterable, Iterator

import yaml

from app.data.conversation import is_conversation_row
from app.data.formats import (
    FORMAT_NAMES,
    UTF8,
    BadByte,
    DataFileError,
    RawRecord,
    detect_format,
    file_encoding,
    first_bad_utf8_byte,
    has_bad_utf8,
    replace_bad_utf8,
    read_hub_records,
    read_records,
)

TARGETS = ("instruction", "input", "output")
POLICIES = ("drop", "fix")  # what happens to rows with a problem that has an obvious repair
HUB_PREFIX = "hub:"  # "hub:owner/name" or "hub:owner/name:split" names a hub dataset instead of a file
MAX_EXAMPLES = 100  # findings kept per kind; the counts stay complete, so a million bad rows cost no memory
HEAD_ROWS = 200  # records read up front to see the columns
TOKEN_BATCH = 1024  # rows templated and tokenized per batch call
DEMO_DIR = Path(__file__).resolve().parents[2] / "assets" / "datasets"

# Column names used by public instruction datasets, best first, matched ignoring case. "input" is last for the
# instruction because in Alpaca it is the optional context, but {input, output} files use it as the question.
CANDIDATES = {
    "instruction": ("instruction", "prompt", "question", "query", "instruct", "user", "human", "input"),
    "input": ("input", "context"),
    "output": ("output", "response", "completion", "answer", "target", "assistant", "gpt"),
}
CONVERSATION_COLUMNS = ("conversations", "messages", "conversation", "dialogue", "chat")
# Message roles as files write them (OpenAI/Hugging Face `role`, ShareGPT `from`), lower-cased -> the turn they are.
# "call" is ShareGPT's function_call turn: an assistant turn holding a tool call as JSON text.
ROLE_NAMES = {
    **dict.fromkeys(("user", "human", "prompter"), "user"),
    **dict.fromkeys(("assistant", "gpt", "bot", "model", "chatgpt"), "assistant"),
    **dict.fromkeys(("system", "developer"), "system"),  # OpenAI's newer name for the system prompt
    **dict.fromkeys(("function_call", "tool_call", "tool_calls"), "call"),
    **dict.fromkeys(("tool", "observation", "function", "ipython", "tool_response", "function_response"), "tool"),
}
TOOL_COLUMNS = ("tools", "functions")  # the row's tool schemas, beside its conversation
TEXT_PARTS = {"text", "input_text", "output_text"}  # the "type" of a text part in a list of typed content parts
# An unfilled Jinja/Handlebars-style slot such as {{name}} or {{ user.first_name }}; code (``` blocks and `spans`)
# is not searched, where such text is usually a template being shown on purpose.
PLACEHOLDER = re.compile(r"\{\{\s*[A-Za-z_][\w.-]*\s*\}\}")
CODE = re.compile(r"```.*?```|`[^`\n]*`", re.DOTALL)


class DataError(ValueError):
    """A dataset that cannot be used for training, in words a user can act on."""


# --- findings ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Finding:
    code: str  # e.g. "empty_field"; FINDING_TITLES has the plain name
    severity: str  # "fatal": the file cannot be used | "error": the row is left out unless fixed | "warning" | "info"
    file: str
    row: int | None  # 1-based row; in a JSONL file the line number. None: the whole file
    line: int | None  # line in the file where the row starts, when the format has lines
    field: str | None  # the column as named in the file; None: the whole row
    message: str  # what is wrong
    advice: str  # what to do about it
    fixable: bool = False  # the "fix" policy repairs it (how is in `advice`)
    # "dropped" | "fixed" | "skipped" (one chat message) | "truncated" | "kept" (a warning) | "" for file-level findings
    outcome: str = ""
    unit: str = "row"  # "line" in JSONL files, where a row is a line

    @property
    def location(self) -> str:
        if self.row is None:
            return self.file
        where = f"{self.file} {self.unit} {self.row}"
        return where + (f" (line {self.line})" if self.line and self.unit != "line" else "")

    def __str__(self) -> str:
        where = self.location + (f", field '{self.field}'" if self.field else "")
        advice = f" {self.advice[:1].upper()}{self.advice[1:]}." if self.advice else ""
        return f"{where}: {self.message}.{advice}"

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "text": str(self)}


FINDING_TITLES = {
    "unreadable": "file cannot be read",
    "empty_file": "empty file",
    "no_usable_column": "no instruction/output columns",
    "no_valid_rows": "no usable rows",
    "unused_columns": "columns not used",
    "bad_json": "malformed JSON",
    "bad_csv_row": "malformed CSV row",
    "not_object": "row is not an object",
    "missing_field": "missing field",
    "empty_field": "empty field",
    "wrong_type": "not text",
    "invalid_utf8": "invalid UTF-8",
    "not_utf8": "file is not UTF-8",
    "unsupported_part": "image, audio or other non-text part",
    "placeholder": "unfilled template placeholder",
    "bad_message": "bad conversation message",
    "no_assistant": "conversation without an assistant turn",
    "misplaced_system": "system prompt not first",
    "tool_without_call": "tool result without a call",
    "bad_tool_call": "malformed tool call",
    "bad_tools": "malformed tool list",
    "template_cannot": "the chat template cannot write it",
    "no_learnable": "nothing left to learn after the cutoff",
    # preference data (app.data.preference)
    "same_answers": "chosen and rejected are the same",
    "prompt_mismatch": "the two sides answer different prompts",
    "bad_prompt": "no prompt the replies answer",
    "bad_side": "chosen or rejected is not a reply",
    "bad_rating": "rating not a number",
    "tied_ratings": "all responses rated the same",
    "too_few_responses": "fewer than two rated responses",
    "bad_label": "label not true or false",
    "rated_pairs": "rated responses made into pairs",
    "duplicate": "duplicate row",
    "too_long": "longer than the cutoff",
}


# --- column mapping ------------------------------------------------------------------------------------------
# Every field a mapping can fill, in the order the Data tab lists them: the supervised ones, then the preference ones
# (app.data.preference reads those: a prompt with chosen/rejected replies, rated responses, or KTO's rated answers).
MAPPING_FIELDS = ("instruction", "input", "output", "conversations",
                  "prompt", "chosen", "rejected", "responses", "scores", "completion", "label")
PREFERENCE_KINDS = ("pair", "rated", "unpaired")


@dataclass(frozen=True)
class ColumnMapping:
    """Which file column feeds each field. Supervised data: instruction/input/output (Alpaca), or `conversations` (a
    ShareGPT/messages list) instead of all three. Preference data (any of chosen, rejected, responses, label set):
    `prompt` (text, or a list of messages) with `chosen` and `rejected` replies; or `responses` rated in `scores` (or
    rated inside each response) and turned into one pair per prompt; or `completion` with a true/false `label` (KTO).
    `input`, when set, adds its text to a text prompt as in Alpaca."""

    instruction: str | None = None
    input: str | None = None
    output: str | None = None
    conversations: str | None = None
    prompt: str | None = None  # preference data: None for whole chosen/rejected conversations (the shared part)
    chosen: str | None = None
    rejected: str | None = None
    responses: str | None = None  # several responses to one prompt, each rated
    scores: str | None = None  # their ratings, one per response; None: each response object holds its own
    completion: str | None = None  # KTO: one answer to the prompt...
    label: str | None = None  # ...and whether it is a good one

    @property
    def preference(self) -> bool:
        return self.kind in PREFERENCE_KINDS

    @property
    def usable(self) -> bool:
        kind = self._preference_kind()
        if kind == "pair":
            return bool(self.chosen and self.rejected)  # no prompt: the part the two conversations share
        if kind == "rated":
            return bool(self.prompt and self.responses)
        if kind == "unpaired":
            return bool(self.prompt and self.completion and self.label)
        return bool(self.conversations) or bool(self.instruction and self.output)

    def _preference_kind(self) -> str | None:
        if self.chosen or self.rejected:
            return "pair"
        if self.responses or self.scores:
            return "rated"
        if self.label or self.completion:
            return "unpaired"
        return None

    @property
    def kind(self) -> str:
        """"alpaca", "renamed", "conversations", "pair", "rated" (rated responses made into pairs), "unpaired"
        (KTO) or "none". A preference mapping missing a part keeps its kind: it is still preference data."""
        preference = self._preference_kind()
        if preference:
            return preference
        if self.conversations:
            return "conversations"
        if not self.usable:
            return "none"
        if (self.instruction, self.input or "input", self.output) == ("instruction", "input", "output"):
            return "alpaca"
        return "renamed"

    @property
    def needs_confirmation(self) -> bool:
        """Alpaca columns are used as they are; anything guessed is shown to the user first."""
        return self.kind not in ("alpaca", "none")

    def describe(self) -> str:
        kind = self.kind
        if kind in PREFERENCE_KINDS:
            def source(f: str) -> str:
                return f"{f} ← '{getattr(self, f)}'" if getattr(self, f) else f"{f} ← (none)"

            prompt = source("prompt") + (f" with input ← '{self.input}'" if self.input and self.prompt else "")
            if kind == "pair":
                if not self.prompt:
                    prompt = "prompt ← what the chosen and rejected conversations share before their last reply"
                return f"preference pairs: {prompt}, {source('chosen')}, {source('rejected')}"
            if kind == "rated":
                scores = f"ratings ← '{self.scores}'" if self.scores else "ratings ← inside each response"
                return (f"rated responses made into pairs: {prompt}, {source('responses')}, {scores}; each prompt "
                        f"gives one pair, its highest-rated response as chosen and its lowest-rated as rejected")
            return (f"rated answers (unpaired, for KTO): {prompt}, {source('completion')}, {source('label')} "
                    f"(true: a good answer, false: a bad one)")
        if self.conversations:
            return f"conversations from '{self.conversations}' (each whole conversation is one example, its system prompt and tools included)"
        if not self.usable:
            return "no mapping"
        return ", ".join(f"{t} ← '{getattr(self, t)}'" if getattr(self, t) else f"{t} ← (none)" for t in TARGETS)

    def columns(self) -> list[str]:
        """The file columns this mapping reads, in field order."""
        return [c for c in (getattr(self, f) for f in MAPPING_FIELDS) if c]

    def to_dict(self) -> dict[str, str | None]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict | None) -> "ColumnMapping":
        data = data or {}
        return cls(**{k: (data.get(k) or None) for k in MAPPING_FIELDS})

    @classmethod
    def parse(cls, text: str) -> "ColumnMapping":
        """'instruction=question,output=answer' or 'prompt=question,chosen=good,rejected=bad' (the CLI's --map)."""
        values: dict[str, str] = {}
        for part in filter(None, (p.strip() for p in text.split(","))):
            target, _, column = part.partition("=")
            if target.strip() not in MAPPING_FIELDS or not column.strip():
                raise DataError(f"--map {part!r}: write TARGET=COLUMN with TARGET one of {', '.join(MAPPING_FIELDS)}")
            values[target.strip()] = column.strip()
        return cls(**values)


def detect_mapping(columns: Iterable[str], sample: Iterable[dict] = ()) -> ColumnMapping:
    """The mapping to propose for these columns: preference data first (a file with chosen/rejected columns is never
    read as supervised data), then Alpaca names, then common renamings, then chat lists."""
    from app.data.preference import detect_preference

    by_lower: dict[str, str] = {}
    for c in columns:
        by_lower.setdefault(str(c).lower(), c)
    sample = [r for r in sample if isinstance(r, dict)]
    preference = detect_preference(by_lower, sample)
    if preference:
        return ColumnMapping(**preference)
    chosen: dict[str, str | None] = {}
    used: set[str] = set()
    for target in ("instruction", "output", "input"):  # input last: it must not take the instruction's column
        chosen[target] = next((by_lower[n] for n in CANDIDATES[target] if n in by_lower and by_lower[n] not in used), None)
        if chosen[target]:
            used.add(chosen[target])
    if chosen["instruction"] and chosen["output"]:
        return ColumnMapping(**chosen)
    for name in CONVERSATION_COLUMNS:
        column = by_lower.get(name)
        # A list, or JSON text of one (CSV, Parquet); no sample (columns only) trusts the name.
        if column and (not sample or any(isinstance(r.get(column), (list, str)) for r in sample)):
            return ColumnMapping(conversations=column)
    return ColumnMapping()


# --- turning values into text ---------------------------------------------------------------------------------
def _describe(value: Any) -> str:
    if isinstance(value, bool):
        return "a true/false value"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, (list, tuple)):
        return "a list"
    if isinstance(value, dict):
        return "a nested object"
    if isinstance(value, bytes):
        return "raw bytes"
    return f"a {type(value).__name__}"


def _is_text_part(part: Any) -> bool:
    return isinstance(part, dict) and part.get("type", "text") in TEXT_PARTS and isinstance(part.get("text"), str)


def _is_text_parts(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(_is_text_part(p) and "type" in p for p in value)


def non_text_parts(value: Any) -> list[tuple[int, str]]:
    """(index, type) of each part that is not text, when `value` is a list of typed content parts such as
    [{"type": "text", "text": ...}, {"type": "image_url", ...}]; [] for anything else."""
    if not (isinstance(value, list) and value and all(isinstance(p, dict) and "type" in p for p in value)):
        return []
    return [(i, str(p["type"])) for i, p in enumerate(value) if not _is_text_part(p)]


def as_text(value: Any) -> str:
    """The repair the "fix" policy applies to a non-text value: numbers as written in JSON, lists of strings and
    lists of text parts one item per line, objects (and mixed lists) as their JSON text, bytes decoded with � for
    bad bytes. (Lists holding images or audio are never repaired: see non_text_parts.)"""
    if isinstance(value, (bool, int, float)):
        return json.dumps(value)
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, (list, tuple)):
        if all(isinstance(v, str) for v in value):
            return "\n".join(value)
        if all(_is_text_part(v) for v in value):  # [{"type": "text", "text": ...}]
            return "\n".join(v["text"] for v in value)
    return json.dumps(value, ensure_ascii=False, default=str)


def _short(value: Any, limit: int = 40) -> str:
    """A value as compact JSON for a message, shortened: newlines and quotes stay visible (bad bytes as �)."""
    text = replace_bad_utf8(json.dumps(value, ensure_ascii=False, default=str))
    return text if len(text) <= limit else text[: limit - 3] + "..."


def placeholders(answer: str) -> list[str]:
    """The unfilled {{name}} slots of an answer outside code, each once, in order."""
    if "{{" not in answer:
        return []
    return list(dict.fromkeys(PLACEHOLDER.findall(CODE.sub("", answer))))


def _is_null(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


# --- the report ----------------------------------------------------------------------------------------------
@dataclass
class DataReport:
    file: str
    format: str  # a key of FORMAT_NAMES, or "" when the file could not be read
    mapping: ColumnMapping = field(default_factory=ColumnMapping)
    columns: list[str] = field(default_factory=list)
    policy: str = "drop"
    encoding: str = ""  # how a text file was decoded, e.g. "UTF-16 LE" ("" for Parquet and hub datasets)
    cutoff: int | None = None  # the length check ran with this cutoff (None: not run)
    records: int = 0  # records read (a conversation counts once even if it gives several rows)
    kept: int = 0  # valid rows (after fixing, when the policy is "fix")
    dropped: int = 0  # rows left out
    fixed: int = 0  # rows kept thanks to a repair
    truncated: int = 0  # kept rows longer than the cutoff once templated
    rows: list[dict[str, str]] = field(default_factory=list)  # the valid rows, when kept
    row_numbers: list[int] = field(default_factory=list)  # where each kept row came from (its `row`)
    lengths: array = field(default_factory=lambda: array("I"))  # templated tokens per kept row, when counted
    # conversations only, when counted: per kept row, the token position where each assistant answer ends, and
    # where its first answer starts (what the cutoff leaves of each conversation: tokens.turn_cuts)
    answer_ends: list[array] = field(default_factory=list)
    answer_starts: array = field(default_factory=lambda: array("I"))
    turns: int = 0  # assistant turns in the kept conversations
    turns_cut: int = 0  # assistant turns lost to the cutoff, in the kept conversations
    nothing_left: int = 0  # kept rows with no answer token inside the cutoff: training skips them
    desirable: int = 0  # unpaired (KTO) data: kept answers labelled good (the rest are labelled bad)
    findings: list[Finding] = field(default_factory=list)  # up to MAX_EXAMPLES per code
    counts: Counter = field(default_factory=Counter)  # every finding by code

    @property
    def fatal(self) -> Finding | None:
        return next((f for f in self.findings if f.severity == "fatal"), None)

    @property
    def usable(self) -> bool:
        return self.fatal is None and self.kept > 0

    @property
    def exit_code(self) -> int:
        """For `data check`: 0 usable, 1 not usable, 2 the file could not be read at all."""
        fatal = self.fatal
        if fatal is not None and fatal.code == "unreadable":
            return 2
        return 0 if self.usable else 1

    @property
    def truncated_share(self) -> float:
        return self.truncated / self.kept if self.kept else 0.0

    def add(self, finding: Finding, first: bool = False) -> None:
        """Count the finding and keep it as an example; `first` lists it before the others (a file-level cause)."""
        self.counts[finding.code] += 1
        if self.counts[finding.code] <= MAX_EXAMPLES:
            if first:
                self.findings.insert(0, finding)
            else:
                self.findings.append(finding)

    def file_finding(self, code: str, severity: str, message: str, advice: str) -> None:
        self.add(Finding(code, severity, self.file, None, None, None, message, advice))

    @property
    def example_word(self) -> str:
        """What one kept row is, for messages: a whole conversation, an instruction row, a preference pair (rated
        responses become pairs too), or a rated answer (unpaired data, for KTO)."""
        kind = self.mapping.kind
        if kind in ("pair", "rated"):
            return "pair"
        if kind == "unpaired":
            return "rated answer"
        return "conversation" if self.mapping.conversations else "row"

    def verdict(self) -> str:
        if self.fatal is not None:
            return f"Not usable: {self.fatal}"
        return (
            f"Usable: {plural(self.kept, self.example_word)} kept"
            + (f", {self.dropped:,} left out" if self.dropped else "")
            + (f", {self.fixed:,} fixed" if self.fixed else "")
        )

    def summary_lines(self) -> list[str]:
        """The plain-text report: what was read, the mapping, the length check, then the findings."""
        lines = [self.verdict()]
        if self.format:
            encoding = f" in {self.encoding}" if self.encoding not in ("", UTF8.name) else ""
            lines.append(f"{self.file}: {FORMAT_NAMES.get(self.format, self.format)}{encoding}, {plural(self.records, 'record')} read")
        if self.mapping.usable:
            lines.append(f"Columns: {self.mapping.describe()}")
        if self.mapping.conversations and self.kept and not self.mapping.preference:
            lines.append(f"Conversations: {self.kept:,} with {plural(self.turns, 'assistant turn')} to learn from")
        if self.mapping.kind == "unpaired" and self.kept:
            lines.append(f"Rated answers: {self.desirable:,} labelled good, {self.kept - self.desirable:,} labelled bad")
        stats = self.token_stats()
        if stats:
            # a pair is counted as its prompt with the longer of its two replies: what one side of training reads at most
            counted = " (its prompt with the longer reply)" if self.mapping.kind in ("pair", "rated") else ""
            lines.append(f"Tokens once templated: {stats.total:,} in all, {stats.mean:.0f} per {self.example_word}{counted} "
                         f"on average, {stats.p95} at the 95th percentile, {stats.longest} at most")
        if self.cutoff is not None and self.kept:
            lines.append(
                f"Length: {self.truncated:,} of {plural(self.kept, self.example_word)} ({self.truncated_share:.1%}) are "
                f"longer than the cutoff of {self.cutoff} tokens once templated and will be truncated"
                + (f"; they lose {plural(self.turns_cut, 'assistant turn')} of {self.turns:,} (whole turns from the end)"
                   if self.mapping.conversations and self.truncated else "")
                + (f"; {plural(self.nothing_left, self.example_word)} with no answer token inside the cutoff "
                   f"{'is' if self.nothing_left == 1 else 'are'} skipped in training"
                   if self.nothing_left else "")
            )
        for code, count in self.counts.items():
            if count > MAX_EXAMPLES:
                lines.append(f"{FINDING_TITLES.get(code, code)}: {count:,} in all, the first {MAX_EXAMPLES} are listed")
        fatal = self.fatal  # already the verdict
        lines += [f"{f.severity.upper():7} {f}" + (f" [{f.outcome}]" if f.outcome else "") for f in self.findings if f is not fatal]
        return lines

    def token_stats(self):
        """TokenStats of the kept rows, or None when the length check did not run."""
        from app.data.tokens import token_stats

        return token_stats(self.lengths, self.cutoff or 0) if len(self.lengths) else None

    def to_dict(self) -> dict[str, Any]:
        stats = self.token_stats()
        return {
            "file": self.file,
            "format": self.format,
            "encoding": self.encoding,
            "usable": self.usable,
            "exit_code": self.exit_code,
            "verdict": self.verdict(),
            "columns": self.columns,
            "mapping": self.mapping.to_dict(),
            "mapping_kind": self.mapping.kind,
            "examples": self.example_word,
            "policy": self.policy,
            "records": self.records,
            "kept": self.kept,
            "dropped": self.dropped,
            "fixed": self.fixed,
            "cutoff": self.cutoff,
            "truncated": self.truncated,
            "truncated_share": round(self.truncated_share, 4),
            "turns": self.turns,
            "turns_cut": self.turns_cut,
            "nothing_left": self.nothing_left,
            "desirable": self.desirable,
            "tokens": asdict(stats) if stats else None,
            "counts": dict(self.counts),
            "findings": [f.to_dict() for f in self.findings],
        }


# --- checking rows -------------------------------------------------------------------------------------------
class _RowChecker:
    """Turns raw records into valid stored rows, recording a finding for every problem on the way."""

    def __init__(self, report: DataReport, support=None) -> None:
        self.report = report
        self.support = support  # template.TemplateSupport of the model's chat template, when the check has a tokenizer
        self.mapping = report.mapping
        self.fix = report.policy == "fix"
        self.seen: dict[bytes, int] = {}  # row digest -> first row number, for duplicates
        self.unit = row_unit(report.format)
        self.preference = None  # a preference.PreferenceReader, for preference mappings
        if self.mapping.preference:
            from app.data.preference import PreferenceReader

            self.preference = PreferenceReader(self)

    def rows(self, rec: RawRecord) -> Iterator[dict]:
        """The record's row (an Alpaca row, a whole conversation, or a preference pair or rated answer, in the stored
        form), or nothing."""
        pending: list[tuple] = []  # this record's findings, given their outcome once the row's fate is known
        if rec.problem:
            self._emit(rec, [(rec.problem, None, *_record_problem(rec), False)], dropped=True)
            return
        if not isinstance(rec.data, dict):
            msg = f"holds {_describe(rec.data)} instead of an object with named fields"
            self._emit(rec, [("not_object", None, msg, "write each row as {\"instruction\": ..., \"output\": ...}; the row is left out", False)], dropped=True)
            return
        if self.preference is not None:
            row, key, answers = self.preference.read(rec, pending)
        elif self.mapping.conversations:
            row, key, answers = self._conversation(rec, pending)
        else:
            row = {t: self._text(rec, t, getattr(self.mapping, t), rec.data, pending) for t in TARGETS}
            if None in row.values():
                row = None
            else:
                key, answers = "\x1f".join((row["instruction"], row["input"], row["output"])), [(row["output"], self.mapping.output)]
        self._emit(rec, pending, dropped=row is None)
        if row is None:
            return
        digest = hashlib.blake2b(key.encode("utf-8", "surrogatepass"), digest_size=16).digest()  # 16 bytes a row
        first = self.seen.get(digest)
        if first is not None:
            what = self.report.example_word
            said = {"row": "the whole row", "conversation": "the whole conversation",
                    "pair": "the whole pair: prompt, chosen and rejected",
                    "rated answer": "prompt, completion and label"}.get(what, f"the whole {what}")
            self._emit(rec, [("duplicate", None, f"repeats {row_unit(self.report.format)} {first} exactly ({said})",
                              "the copy is left out so the example does not count twice", False)], dropped=True)
            return
        self.seen[digest] = rec.row
        if self.preference is not None:
            self.report.desirable += row.get("label") is True
        elif self.mapping.conversations:
            self.report.turns += sum(1 for m in row["messages"] if m["role"] == "assistant")
        for answer, column in answers:
            self._check_placeholders(rec, answer, column)
        yield row

    def _check_placeholders(self, rec: RawRecord, answer: str, column: str) -> None:
        found = placeholders(answer)
        if found:
            shown = ", ".join(found[:3]) + (f" and {len(found) - 3} more" if len(found) > 3 else "")
            self.report.add(Finding(
                "placeholder", "warning", self.report.file, rec.row, rec.line, column,
                f"'{column}' holds {shown}: a template placeholder never filled in, which the model would learn to write",
                "put the real text in its place, or ignore this if the answer shows template code on purpose",
                False, "kept", self.unit,
            ))

    def _emit(self, rec: RawRecord, pending: list[tuple], dropped: bool) -> None:
        if dropped:
            self.report.dropped += 1
        elif self.fix and any(p[4] for p in pending):
            self.report.fixed += 1
        for code, column, message, advice, fixable in pending:
            # A kept row's unfixable finding is a skipped conversation message.
            outcome = "dropped" if dropped else ("fixed" if fixable and self.fix else "skipped")
            self.report.add(Finding(code, "error", self.report.file, rec.row, rec.line, column, message, advice, fixable,
                                    outcome, self.unit))

    def _text(self, rec: RawRecord, target: str, column: str | None, data: dict, pending: list) -> str | None:
        """The text for one field, or None when the row cannot be used (findings go to `pending`)."""
        if column is None:
            return ""  # only input may be unmapped
        if column not in data:
            if target == "input":
                return ""
            pending.append(("missing_field", column, f"has no '{column}'", f"add the {target} text; the row is left out", False))
            return None
        return self._value_text(rec, target, column, data[column], pending)

    def _value_text(self, rec: RawRecord, target: str, column: str, value: Any, pending: list) -> str | None:
        optional = target == "input"
        if _is_null(value):
            if optional:
                return ""
            pending.append(("wrong_type", column, f"'{column}' is null, not text", f"write the {target} text; the row is left out", False))
            return None
        if _is_text_parts(value):  # [{"type": "text", "text": ...}, ...]: content as chat APIs write it
            value = "\n".join(part["text"] for part in value)
        if not isinstance(value, str):
            media = non_text_parts(value)
            if media:
                index, kind = media[0]
                what = f"a {kind!r} part without its 'text' string" if kind in TEXT_PARTS else f"{kind!r}, not text"
                others = f" (and {plural(len(media) - 1, 'other part')} like it)" if len(media) > 1 else ""
                pending.append(("unsupported_part", f"{column}[{index}]", f"part {index} of '{column}' is {what}{others}",
                                "the models trained here read text only: remove the part from the file if the text makes sense without it", False))
                return None
            fixed = as_text(value)
            pending.append((
                "wrong_type", column, f"'{column}' is {_describe(value)} ({_short(value)}), not text",
                f"put it in quotes in the file, or choose 'fix' to use it as the text {_short(fixed)}", True,
            ))
            if not self.fix:
                return None
            value = fixed
        if rec.bad_utf8 and has_bad_utf8(value):
            pending.append(("invalid_utf8", column, f"'{column}' contains bytes (or \\u escapes) that are not valid UTF-8",
                            "re-save the file as UTF-8, or choose 'fix' to replace the bad bytes with �", True))
            if not self.fix:
                return None
            value = replace_bad_utf8(value)
        if not optional and not value.strip():
            pending.append(("empty_field", column, f"'{column}' is empty", f"write the {target} text or delete the row; the row is left out", False))
            return None
        return value

    def _conversation(self, rec: RawRecord, pending: list) -> tuple[dict | None, str, list[tuple[str, str]]]:
        """The record's whole conversation in the stored form (None when it cannot be used, with findings naming the
        turn), its duplicate key, and its answers with their fields (for the placeholder check)."""
        from app.data.conversation import Conversation

        column = self.mapping.conversations
        if column not in rec.data:
            pending.append(("missing_field", column, f"has no '{column}'", "add the conversation; the row is left out", False))
            return None, "", []
        value = _json_text(rec.data.get(column))
        if not isinstance(value, list):
            pending.append(("wrong_type", column, f"'{column}' is {_describe(value) if not isinstance(value, str) else 'text'}, not a list of messages",
                            "write it as a list like [{\"role\": \"user\", \"content\": ...}, {\"role\": \"assistant\", ...}]; the row is left out", False))
            return None, "", []
        before = len(pending)
        system = self._row_system(rec, pending)
        tools = self._row_tools(rec, pending)
        if tools:
            tools_column = next(c for c in TOOL_COLUMNS if c in rec.data)
            self._template_writes("tools", tools_column, f"'{tools_column}' offers tools", pending)
        turns, system, answers = self._read_messages(rec, column, value, pending, system)
        if any(not fixable or not self.fix for *_, fixable in pending[before:]):  # repaired findings keep the row
            return None, "", []
        if not any(t.role == "assistant" for t in turns):
            pending.append(("no_assistant", column, "has no assistant turn: there is no answer to learn",
                            "add the assistant's reply; the conversation is left out", False))
            return None, "", []
        conversation = Conversation(tuple(turns), system, tools)
        return conversation.to_row(), conversation.key(), answers

    def _read_messages(self, rec: RawRecord, column: str, value: list, pending: list,
                       system: str = "") -> tuple[list, str, list[tuple[str, str]]]:
        """The turns of a list of messages found in `column` (findings naming each message go to `pending`), the
        system prompt (a leading system message, else `system`), and the assistant's answers with their fields."""
        from app.data.conversation import Turn

        turns: list[Turn] = []
        answers: list[tuple[str, str]] = []
        # the tool calls not yet answered by a tool turn, as (call id, name); a malformed call leaves ("", "") so
        # that its result is not reported as a second problem
        open_calls: list[tuple[str, str]] = []
        for i, message in enumerate(value):
            where = f"{column}[{i}]"
            if not isinstance(message, dict):
                pending.append(("bad_message", where, f"message {i} is {_describe(message)}, not an object with role and content",
                                "write each message as {\"role\": ..., \"content\": ...}; the conversation is left out", False))
                continue
            raw_role = str(message.get("role", message.get("from", ""))).strip()
            role = ROLE_NAMES.get(raw_role.lower())
            content_key = next((k for k in ("content", "value", "text") if k in message), "content")
            field_ = f"{where}.{content_key}"
            if role is None:
                pending.append(("bad_message", where, f"message {i} has role {raw_role or '(none)'!r}",
                                "use role user / assistant / system / tool (ShareGPT: from human / gpt / system / "
                                "function_call / observation); the conversation is left out", False))
                continue
            if role == "system":
                if _is_null(message.get(content_key)) or message.get(content_key) == "":
                    continue  # an empty system message (common in public files) is no system prompt
                text = self._value_text(rec, "system", field_, message.get(content_key), pending)
                if turns or system:
                    pending.append(("misplaced_system", where, f"message {i} is a second system prompt or comes after the conversation started",
                                    "put one system message first (or the row's 'system' key); the conversation is left out", False))
                elif text is not None:
                    system = text
                continue
            if role == "call":  # ShareGPT's function_call turn: the assistant calling a tool, the call as JSON text
                calls = self._calls(rec, field_, message.get(content_key), pending, sharegpt=True)
                if calls is None:
                    open_calls.append(("", ""))
                    continue
                self._template_writes("tool_calls", where, f"message {i} is an assistant's tool call ({calls[0].name})", pending)
                if turns and turns[-1].role == "assistant" and not turns[-1].tool_calls:
                    turns[-1] = Turn("assistant", turns[-1].content, calls)  # the text the assistant wrote before calling
                else:
                    turns.append(Turn("assistant", "", calls))
                open_calls += [(c.id, c.name) for c in calls]
                continue
            if role == "assistant":
                calls = ()
                raw_calls = message.get("tool_calls") or ([message["function_call"]] if message.get("function_call") else None)
                if raw_calls:
                    calls = self._calls(rec, f"{where}.tool_calls", raw_calls, pending)
                    if calls is None:
                        open_calls.append(("", ""))
                        continue
                    self._template_writes("tool_calls", where, f"message {i} is an assistant's tool call ({calls[0].name})", pending)
                content = message.get(content_key)
                text = self._value_text(rec, "input" if calls else "answer", field_, "" if content is None and calls else content, pending)
                if text is None:
                    continue
                # OpenAI's fine-tuning files mark an assistant turn "weight": 0 to keep it as history only
                learn = message.get("weight", 1) not in (0, "0", False)
                turns.append(Turn("assistant", text, calls, learn=learn))
                if learn:
                    answers.append((text, field_))
                open_calls += [(c.id, c.name) for c in calls]
                continue
            text = self._value_text(rec, "tool result" if role == "tool" else "message", field_, message.get(content_key), pending)
            if text is None:
                continue
            if role == "tool":
                if not open_calls:
                    pending.append(("tool_without_call", where, f"message {i} is a tool result with no tool call before it",
                                    "put the assistant's call (role assistant with tool_calls, or ShareGPT's function_call) "
                                    "before the result; the conversation is left out", False))
                    continue
                self._template_writes("tool_results", where, f"message {i} is a tool result", pending)
                call_id, name = str(message.get("tool_call_id") or ""), str(message.get("name") or "")
                # the call it answers: by id, else by name, else the oldest one still open
                k = next((j for j, (i_, n_) in enumerate(open_calls) if call_id and i_ == call_id), None)
                if k is None:
                    k = next((j for j, (_, n_) in enumerate(open_calls) if name and n_ == name), 0)
                answered_id, answered_name = open_calls.pop(k)
                turns.append(Turn("tool", text, name=name or answered_name, call_id=call_id or answered_id))
            else:
                turns.append(Turn("user", text))
        return turns, system, answers

    def _template_writes(self, part: str, where: str, what: str, pending: list) -> None:
        """A finding when the model's chat template (known when the check has a tokenizer) cannot write `part`."""
        if self.support is None or getattr(self.support, part):
            return
        said = {"tools": "the tools offered", "tool_calls": "tool calls", "tool_results": "tool results"}[part]
        pending.append(("template_cannot", where, f"{what}, and the model's chat template does not write {said}: "
                        f"the model would be trained on a conversation missing it",
                        "choose a model whose chat template supports tools, or remove the tool turns; the "
                        "conversation is left out", False))

    def _row_system(self, rec: RawRecord, pending: list) -> str:
        """A row-level system prompt (ShareGPT files put it beside the conversation)."""
        value = rec.data.get("system")
        if _is_null(value) or value == "":
            return ""
        text = self._value_text(rec, "system", "system", value, pending)
        return text or ""

    def _row_tools(self, rec: RawRecord, pending: list) -> tuple[dict, ...]:
        """The tool schemas offered: a list of objects, or JSON text of one (ShareGPT files keep it as text)."""
        column = next((c for c in TOOL_COLUMNS if c in rec.data), None)
        value = None if column is None else rec.data[column]
        if _is_null(value) or value in ("", []):
            return ()
        parsed = _json_text(value)
        if isinstance(parsed, dict):
            parsed = [parsed]
        if not (isinstance(parsed, list) and all(isinstance(t, dict) for t in parsed)):
            pending.append(("bad_tools", column, f"'{column}' is not a list of tool schemas ({_short(value)})",
                            "write the tools as a JSON list of objects with name, description and parameters; the row is left out", False))
            return ()
        # OpenAI's {"type": "function", "function": {...}}; a bare {"name": ...} schema is wrapped the same way
        return tuple(t if "function" in t else {"type": "function", "function": t} for t in parsed)

    def _calls(self, rec: RawRecord, where: str, value: Any, pending: list, sharegpt: bool = False):
        """Tool calls as ToolCall, their arguments parsed; None (with a finding) when a call is malformed."""
        from app.data.conversation import ToolCall

        value = _json_text(value)
        if isinstance(value, str):
            pending.append(("bad_tool_call", where, f"the tool call is not JSON ({_short(value)})",
                            'write the call as JSON: {"name": ..., "arguments": {...}}; the conversation is left out', False))
            return None
        items = value if isinstance(value, list) else [value]
        calls = []
        for j, item in enumerate(items):
            spot = where if sharegpt and not isinstance(value, list) else f"{where}[{j}]"
            call = item.get("function", item) if isinstance(item, dict) else None
            name = call.get("name") if isinstance(call, dict) else None
            if not isinstance(name, str) or not name.strip():
                pending.append(("bad_tool_call", spot, f"tool call {_short(item)} has no function name",
                                'write each call as {"name": ..., "arguments": {...}}; the conversation is left out', False))
                return None
            arguments = call.get("arguments", call.get("parameters", {}))
            if isinstance(arguments, str):
                try:
                    arguments = json.loads(arguments) if arguments.strip() else {}
                except (ValueError, RecursionError):
                    pending.append(("bad_tool_call", spot, f"the arguments of the call to {name!r} are not valid JSON ({_short(arguments)})",
                                    "write the arguments as a JSON object; the conversation is left out", False))
                    return None
            if not isinstance(arguments, dict):  # (stored as an object, so reading the stored row again gives the same)
                pending.append(("bad_tool_call", spot, f"the arguments of the call to {name!r} are {_describe(arguments)}, not an object ({_short(arguments)})",
                                'write the arguments as a JSON object such as {"city": "Oslo"}; the conversation is left out', False))
                return None
            calls.append(ToolCall(name.strip(), arguments, str(item.get("id") or "") if isinstance(item, dict) else ""))
        return tuple(calls)


def _json_text(value: Any) -> Any:
    """A list or object given as JSON text (CSV and Parquet files often hold them so) parsed; anything else as it is."""
    if isinstance(value, str) and value.lstrip()[:1] in ("[", "{"):
        try:
            return json.loads(value)
        except (ValueError, RecursionError):  # JSONDecodeError, or too deep / too long a number
            return value
    return value


def row_unit(fmt: str) -> str:
    return "line" if fmt == "jsonl" else "row"


def plural(count: int, word: str) -> str:
    return f"{count:,} {word}" + ("" if count == 1 else "s")


def _record_problem(rec: RawRecord) -> tuple[str, str]:
    if rec.problem == "bad_json":
        return (f"is not valid JSON ({rec.detail})",
                "fix the quotes, commas or braces on that line (a missing one is typical); the row is left out")
    return (f"is not a valid CSV row ({rec.detail})",
            "put text that contains commas, quotes or line breaks in double quotes; the row is left out")


def _columns(records: list[RawRecord]) -> list[str]:
    seen: dict[str, None] = {}
    for rec in records:
        if isinstance(rec.data, dict):
            seen.update(dict.fromkeys(str(k) for k in rec.data))
    return list(seen)


def _clean_columns(rec: RawRecord) -> RawRecord:
    """The record with � for the bad bytes of its column names: the page shows and offers column names, and takes
    only valid text, so the names it sends back must be the names the rows are read with."""
    if rec.bad_utf8 and isinstance(rec.data, dict) and any(has_bad_utf8(str(k)) for k in rec.data):
        return replace(rec, data={replace_bad_utf8(str(k)): v for k, v in rec.data.items()})
    return rec


def _bad_column_names(report: DataReport, head: list[RawRecord]) -> None:
    for column in _columns(head):
        if has_bad_utf8(column):
            report.add(Finding("invalid_utf8", "warning", report.file, None, None, replace_bad_utf8(column),
                               "the column name holds bytes (or \\u escapes) that are not valid UTF-8, shown here as �",
                               "re-save the file as UTF-8 and load it again"))


def not_utf8_finding(file: str, bad: BadByte) -> Finding:
    """The file-level finding for a UTF-8 file with bad bytes: where the first one is, and how to convert the file."""
    stem, dot, suffix = file.rpartition(".")
    converted = f"{stem}-utf8.{suffix}" if dot else f"{file}-utf8"
    return Finding(
        "not_utf8", "warning", file, None, bad.line, None,
        f"the file is not UTF-8: byte 0x{bad.value:02X} at byte offset {bad.offset:,} (line {bad.line}) is the first "
        f"that is not valid UTF-8 (the other findings name each row and column name holding such bytes)",
        f"save the file as UTF-8 and load it again, e.g. iconv -f latin1 -t utf-8 '{file}' > '{converted}' (latin1 "
        f"fits most Western European text; use cp1252 for files from Windows programs such as Excel), or choose UTF-8 "
        f"when saving it from the program that wrote it; 'fix' keeps the rows with � for each bad byte instead",
    )


def check_records(
    records: Iterable[RawRecord],
    *,
    file: str,
    fmt: str,
    mapping: ColumnMapping | None = None,
    policy: str = "drop",
    tokenizer=None,
    cutoff: int | None = None,
    keep_rows: bool = True,
) -> DataReport:
    """Validate records one at a time (memory stays flat for huge files when keep_rows is False)."""
    if policy not in POLICIES:
        raise DataError(f"policy {policy!r}: choose one of {', '.join(POLICIES)}")
    records = iter(records)
    head = list(islice(records, HEAD_ROWS))
    report = DataReport(file=file, format=fmt, policy=policy)
    if not head:
        report.file_finding("empty_file", "fatal", "the file holds no rows",
                            'add rows such as {"instruction": "...", "input": "", "output": "..."} (one per line in a .jsonl file)')
        return report
    _bad_column_names(report, head)
    head = [_clean_columns(r) for r in head]
    records = map(_clean_columns, records)
    report.columns = _columns(head)
    report.mapping = mapping if mapping is not None else detect_mapping(report.columns, [r.data for r in head])
    if not report.columns:
        report.mapping = ColumnMapping("instruction", "input", "output")  # nothing parsed yet: report each row
    elif not _mapping_fits(report):
        return report
    support = None
    if tokenizer is not None and (report.mapping.conversations or report.mapping.preference):
        from app.data.template import template_support

        support = template_support(tokenizer)
    checker = _RowChecker(report, support)
    counter = _LengthCounter(report, tokenizer, cutoff, keep_rows) if tokenizer is not None and cutoff else None
    for rec in chain(head, records):
        report.records += 1
        for row in checker.rows(rec):
            report.kept += 1
            if counter is not None:
                counter.add(rec, row)
            elif keep_rows:
                report.rows.append(row)
                report.row_numbers.append(rec.row)
    if counter is not None:
        counter.flush()
    if report.kept == 0:
        report.file_finding("no_valid_rows", "fatal", f"none of the {plural(report.records, 'record')} gives a usable row",
                            "fix the rows listed here (or choose 'fix' where it is offered) and load the file again")
    elif report.nothing_left >= report.kept:  # every row kept, yet training would find no answer token to learn
        report.file_finding("no_valid_rows", "fatal", f"none of the {plural(report.kept, report.example_word)} has an "
                            f"answer token inside the cutoff of {report.cutoff} tokens: training would learn nothing",
                            "raise the cutoff length (the lengths are listed above) or shorten what comes before the answers")
    return report


def _mapping_fits(report: DataReport) -> bool:
    mapping, columns = report.mapping, report.columns
    listed = ", ".join(f"'{c}'" for c in columns)
    if mapping.preference and not mapping.usable:
        from app.data.preference import missing_parts

        report.file_finding("no_usable_column", "fatal", f"preference data, but {missing_parts(mapping)} (columns: {listed})",
                            "choose the missing column in the Data tab's mapping (CLI: --map, e.g. "
                            "--map prompt=question,chosen=good,rejected=bad); the file is not read as supervised data")
        return False
    if not mapping.usable:
        report.file_finding(
            "no_usable_column", "fatal", f"no column holds the instruction and the output (columns: {listed})",
            "name the columns instruction / input / output (the Alpaca format), or choose them in the Data tab's "
            "mapping (CLI: --map instruction=COLUMN,output=COLUMN)",
        )
        return False
    named = mapping.columns()
    unknown = [c for c in named if c not in columns]
    if unknown:
        report.file_finding("no_usable_column", "fatal", f"column(s) {', '.join(map(repr, unknown))} are not in the file (columns: {listed})",
                            "choose columns that exist")
        return False
    if mapping.conversations or mapping.preference:  # the row's own system prompt and tools are read beside it
        named += [c for c in ("system", *TOOL_COLUMNS) if c in columns]
    unused = [c for c in columns if c not in named]
    if unused:
        parts = "the prompt or a reply" if mapping.preference else "the instruction, input or output"
        report.file_finding("unused_columns", "info", f"column(s) {', '.join(map(repr, unused))} are not used",
                            f"nothing to do unless one of them holds {parts}")
    return True


class _LengthCounter:
    """Templates and tokenizes kept rows in batches, recording lengths and the rows the cutoff will cut."""

    def __init__(self, report: DataReport, tokenizer, cutoff: int, keep_rows: bool) -> None:
        from app.data.tokens import Templater

        self.report, self.cutoff, self.keep_rows = report, int(cutoff), keep_rows
        self.templater = Templater(tokenizer)
        self.renderer = None  # a template.SpanRenderer, made at the first conversation
        self.pending: list[tuple[RawRecord, dict]] = []
        report.cutoff = self.cutoff

    def add(self, rec: RawRecord, row: dict) -> None:
        self.pending.append((RawRecord(rec.row, rec.line, None), row))  # drop the raw data: memory stays flat
        if len(self.pending) >= TOKEN_BATCH:
            self.flush()

    def flush(self) -> None:
        from app.data.preference import is_preference_row
        from app.data.tokens import templated_lengths

        if not self.pending:
            return
        preference = [(rec, row) for rec, row in self.pending if is_preference_row(row)]
        if preference:
            self._flush_preference(preference)
        alpaca = [(rec, row) for rec, row in self.pending if not is_conversation_row(row)]
        if alpaca:
            self._flush_rows(alpaca, *templated_lengths(self.templater, [row for _, row in alpaca]))
        chats = [(rec, row) for rec, row in self.pending if is_conversation_row(row) and not is_preference_row(row)]
        if chats:
            self._flush_conversations(chats)
        self.pending = []

    def _keep(self, rec: RawRecord, row: dict, total: int) -> None:
        self.report.lengths.append(total)
        if self.keep_rows:
            self.report.rows.append(row)
            self.report.row_numbers.append(rec.row)

    def _warn(self, code: str, rec: RawRecord, field_: str, message: str, advice: str, outcome: str) -> None:
        self.report.add(Finding(code, "warning", self.report.file, rec.row, rec.line, field_, message, advice, False,
                                outcome, row_unit(self.report.format)))

    def _flush_rows(self, pending: list[tuple[RawRecord, dict]], prompt_lengths: list[int], lengths: list[int]) -> None:
        report, cutoff = self.report, self.cutoff
        for (rec, row), prompt, total in zip(pending, prompt_lengths, lengths):
            self._keep(rec, row, total)
            if total <= cutoff:
                continue
            report.truncated += 1
            if prompt >= cutoff:
                report.nothing_left += 1
                field_, message = "instruction", f"the prompt alone is {prompt} tokens once templated, at least the cutoff of {cutoff}: no answer token is trained on"
            else:
                field_, message = "output", f"is {total} tokens once templated; the cutoff of {cutoff} cuts the last {total - cutoff} tokens of the answer"
            self._warn("too_long", rec, field_, message, "raise the cutoff length or shorten the row; the row is kept, truncated",
                       "truncated")

    def _flush_preference(self, pending: list[tuple[RawRecord, dict]]) -> None:
        """A pair is counted as its prompt with each reply, rendered as a conversation whose last assistant turn is
        that reply (what training reads for each side); the longer side is the pair's length, its reply the answer
        whose start and end are recorded. A rated answer (KTO) is its prompt with its completion. A prompt the
        template cannot write leaves the row out, as for conversations."""
        from app.data.preference import side_rows
        from app.data.template import SpanRenderer, TemplateError
        from app.data.tokens import encode_lengths

        report, cutoff, tokenizer, m = self.report, self.cutoff, self.templater.tokenizer, self.report.mapping
        column = m.prompt or m.chosen or "prompt"
        fields = {"chosen": m.chosen or m.responses, "rejected": m.rejected or m.responses, "completion": m.completion}
        if self.renderer is None:
            self.renderer = SpanRenderer(tokenizer)
        rendered = []  # (rec, row, [(side, file column, spans) per side])
        for rec, row in pending:
            try:
                rendered.append((rec, row, [(k, fields[k] or k, self.renderer.spans(side)) for k, side in side_rows(row)]))
            except TemplateError as e:
                report.kept -= 1
                report.dropped += 1
                report.desirable -= row.get("label") is True
                report.add(Finding("template_cannot", "error", report.file, rec.row, rec.line, column,
                                   str(e), e.advice.replace("the conversation is left out", f"the {report.example_word} is left out"),
                                   False, "dropped", row_unit(report.format)))
        texts = [span.text for _, _, sides in rendered for *_, spans in sides for span in spans]
        counts = iter(encode_lengths(tokenizer, texts))
        for rec, row, sides in rendered:
            measured = []  # (total, answer start, answer end, side, field) per side
            for key, field_, spans in sides:
                position, start, end = 0, 0, 0
                for span in spans:  # the reply is the one learned span (side_rows marks the prompt's answers read-only)
                    n = next(counts)
                    if span.learn:
                        start, end = position, position + n
                    position += n
                measured.append((position, start, end, key, field_))
            total, start, end, key, field_ = max(measured, key=lambda m: m[0])
            self._keep(rec, row, total)
            report.answer_ends.append(array("I", [end]))
            report.answer_starts.append(start)
            if total <= cutoff:
                continue
            report.truncated += 1
            side = f"with the {key} reply " if len(sides) > 1 else ""
            if start >= cutoff:
                report.nothing_left += 1
                self._warn("no_learnable", rec, field_,
                           f"is {total} tokens once templated {side}and the reply starts at token {start}, beyond the "
                           f"cutoff of {cutoff}: nothing of the reply is left, training skips it",
                           "raise the cutoff length or shorten the prompt", "skipped")
                continue
            self._warn("too_long", rec, field_,
                       f"is {total} tokens once templated {side}(the reply starts at token {start}); the cutoff of "
                       f"{cutoff} cuts the last {total - cutoff} tokens of the reply",
                       f"raise the cutoff length or shorten the reply; the {report.example_word} is kept, truncated", "truncated")

    def _flush_conversations(self, pending: list[tuple[RawRecord, dict]]) -> None:
        """Render each conversation turn by turn with the model's template (a conversation it cannot write is left
        out, naming the turn), count its tokens per span in one batch call, and see what the cutoff leaves."""
        from app.data.template import SpanRenderer, TemplateError
        from app.data.tokens import encode_lengths

        report, cutoff, tokenizer = self.report, self.cutoff, self.templater.tokenizer
        column = report.mapping.conversations or "messages"
        if self.renderer is None:
            self.renderer = SpanRenderer(tokenizer)
        rendered = []
        for rec, row in pending:
            try:
                rendered.append((rec, row, self.renderer.spans(row)))
            except TemplateError as e:
                report.kept -= 1
                report.dropped += 1
                report.turns -= sum(1 for m in row["messages"] if m["role"] == "assistant")
                report.add(Finding("template_cannot", "error", report.file, rec.row, rec.line, column,
                                   str(e), e.advice, False, "dropped", row_unit(report.format)))
        texts = [span.text for _, _, spans in rendered for span in spans]
        counts = iter(encode_lengths(tokenizer, texts))
        for rec, row, spans in rendered:
            position, starts, ends = 0, [], []
            for span in spans:
                n = next(counts)
                if span.learn:
                    starts.append(position)
                    ends.append(position + n)
                position += n
            self._keep(rec, row, position)
            report.answer_ends.append(array("I", ends))
            report.answer_starts.append(starts[0] if starts else position)
            if position <= cutoff:
                continue
            report.truncated += 1
            cut = sum(1 for end in ends if end > cutoff)
            report.turns_cut += cut
            if not starts or starts[0] >= cutoff:
                report.nothing_left += 1
                self._warn("no_learnable", rec, column,
                           f"is {position} tokens once templated and its first answer starts at token {starts[0] if starts else position}, "
                           f"beyond the cutoff of {cutoff}: nothing is left to learn, training skips it",
                           "raise the cutoff length or shorten the turns before the first answer", "skipped")
                continue
            kept = len(ends) - cut
            said = (f"the cutoff of {cutoff} keeps its first {plural(kept, 'answer')} whole and drops the last "
                    f"{plural(cut, 'assistant turn')} with what follows") if kept else (
                    f"even its first answer ends beyond the cutoff of {cutoff}: that answer is cut at the cutoff"
                    + (f" and the other {plural(cut - 1, 'assistant turn')} are dropped" if cut > 1 else ""))
            self._warn("too_long", rec, column, f"is {position} tokens once templated; {said}",
                       "raise the cutoff length or split the conversation; the conversation is kept, truncated", "truncated")


def check_file(
    source: str | Path,
    *,
    mapping: ColumnMapping | None = None,
    policy: str = "drop",
    tokenizer=None,
    cutoff: int | None = None,
    keep_rows: bool = True,
    name: str | None = None,
) -> DataReport:
    """The full report for a file (or "hub:owner/name[:split]"); never raises for bad data: an unreadable file
    gives a report with an "unreadable" finding (exit code 2). `name` is the file name shown in findings."""
    source_text = str(source)
    hub = source_text.startswith(HUB_PREFIX)
    # A path given on the command line can hold bytes that are not UTF-8 (as lone surrogates): not in a message.
    file = replace_bad_utf8(name or (source_text if hub else Path(source_text).name))
    try:
        if hub:
            hub_name, _, split = source_text[len(HUB_PREFIX):].partition(":")
            return check_records(read_hub_records(hub_name, split or "train"), file=file, fmt="hub", mapping=mapping,
                                 policy=policy, tokenizer=tokenizer, cutoff=cutoff, keep_rows=keep_rows)
        path = Path(source)
        if not path.exists():
            raise DataFileError("no such file")
        if path.is_dir():
            raise DataFileError("this is a folder: choose a file inside it")
        fmt = detect_format(path)
        encoding = None if fmt == "parquet" else file_encoding(path)
        report = check_records(read_records(path, fmt, encoding or UTF8), file=file, fmt=fmt, mapping=mapping,
                               policy=policy, tokenizer=tokenizer, cutoff=cutoff, keep_rows=keep_rows)
        if encoding is not None:
            report.encoding = encoding.name
        if encoding == UTF8 and report.counts["invalid_utf8"]:
            bad = first_bad_utf8_byte(path)
            if bad is not None:  # else the bad text came from \uD800-style escapes, named row by row
                report.add(not_utf8_finding(file, bad), first=True)
        return report
    except DataFileError as e:
        return unreadable_report(file, str(e), "" if hub else READ_ADVICE)
    except (OSError, MemoryError) as e:
        return unreadable_report(file, f"{type(e).__name__}: {e}", READ_ADVICE)
    except RecursionError:  # a value parsed just under json's depth limit, too deep for the checks that follow
        return unreadable_report(file, "lists or objects nested too deeply to check", READ_ADVICE)


READ_ADVICE = "check the path and the format (JSON array, JSONL, CSV, TSV or Parquet)"


def unreadable_report(file: str, message: str, advice: str = READ_ADVICE) -> DataReport:
    report = DataReport(file=file, format="")
    report.file_finding("unreadable", "fatal", message, advice)
    return report


def load_training_rows(path: str | Path) -> list[dict[str, str]]:
    """Valid {instruction, input, output} rows from any supported file, invalid rows dropped; raises DataError
    (with the report's first fatal finding) when nothing usable is left."""
    report = check_file(path)
    if not report.usable:
        raise DataError(report.verdict())
    return report.rows


def validation_count(rows: int, share: float) -> int:
    """Rows held out for `share`: any share above 0 holds out at least one row and leaves at least one to train on."""
    if not 0 <= share < 1:
        raise DataError(f"validation share {share!r}: must be at least 0 and below 1")
    return 0 if share == 0 or rows < 2 else min(rows - 1, max(1, round(rows * share)))


def split_rows(rows: list[dict], share: float, seed: int = 42) -> tuple[list[dict], list[dict]]:
    """(train, val): a seeded random `share` of the rows held out, both in file order."""
    held = set(random.Random(seed).sample(range(len(rows)), validation_count(len(rows), share)))
    return [r for i, r in enumerate(rows) if i not in held], [r for i, r in enumerate(rows) if i in held]


# --- the demo datasets ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DemoCard:
    name: str  # file stem, e.g. "pirate-persona"
    path: Path  # the JSONL file
    title: str
    teaches: str
    rows: int
    held_out_prompts: tuple[str, ...]  # prompts not in the data that show the difference after training


def demo_datasets(folder: Path = DEMO_DIR) -> list[DemoCard]:
    cards = []
    for card_path in sorted(folder.glob("*.card.yaml")):
        card = yaml.safe_load(card_path.read_text(encoding="utf-8"))
        name = card_path.name[: -len(".card.yaml")]
        cards.append(DemoCard(name, folder / f"{name}.jsonl", card["title"], card["teaches"], int(card["rows"]),
                              tuple(card["held_out_prompts"])))
    return cards
