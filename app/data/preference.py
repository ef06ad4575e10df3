"""Preference data (the DPO family and KTO): the file shapes public preference datasets use, detected and read into
two stored forms, with a finding for every row that cannot give a fair comparison.

Stored forms (what DataReport.rows holds and a saved train.jsonl keeps; "system" and "tools" only when present):
    a pair:        {"system": str, "messages": [prompt turns], "chosen": str, "rejected": str, "tools": [...]}
    a rated answer (unpaired, for KTO):
                   {"system": str, "messages": [prompt turns], "completion": str, "label": bool, "tools": [...]}
The prompt turns are the stored conversation shape of app.data.conversation and end with a user turn (or a tool
result): the replies answer it.

Shapes read (ColumnMapping fields in brackets):
1. prompt text with chosen and rejected texts [prompt, input, chosen, rejected]: TRL's standard form, LLaMA-Factory's
   Alpaca form (instruction/input), and renamings such as question/response_j/response_k (StackExchange pairs).
2. a conversation as the prompt (a list of role/content or ShareGPT from/value messages) with chosen and rejected
   replies, each a text, one assistant message, or a list holding it [prompt, chosen, rejected].
3. whole chosen and rejected conversations [chosen, rejected, no prompt]: the prompt is what the two share. Rule: each
   conversation's last message must be the assistant's reply, and everything before it (system prompt included) must
   be the same in both; a pair compares final replies only, so conversations that differ earlier are a finding, not
   a guess. Anthropic HH-style text transcripts ("\\n\\nHuman: ...\\n\\nAssistant: ...") are read as conversations.
   With a prompt column as well (UltraFeedback's binarized form), a conversation's part before its reply must be
   that prompt.
4. several rated responses to one prompt [prompt, responses, scores]: a list of objects each holding its text and its
   rating ({"response"/"text", "score"/"rating"/"overall_score"}), or a list of texts beside a list of ratings. Rule
   (pick_pair): ONE pair per prompt, the highest-rated response as chosen and the lowest-rated as rejected, the first
   in file order among equally rated ones; the responses in between are not used. All rated the same: no pair (a
   finding). A response with no usable text or a rating that is not a number is skipped (a finding) and the pair is
   made from the others.
5. unpaired rated answers for KTO [prompt, completion, label]: the label true/false, 1/0, or the text "true"/"false"
   (any case); anything else is a finding. Detected from TRL's completion/label names or LLaMA-Factory's kto_tag, when
   some label in the first rows reads as true/false (a supervised file's "label" class stays supervised).
Lengths (dataset._LengthCounter): a pair counts as its prompt with the longer of its two replies, each side rendered
as a conversation whose last assistant turn is that reply (side_rows); a rated answer as its prompt with its answer.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import Any, Iterable

from app.data.conversation import Turn
from app.data.dataset import (
    CONVERSATION_COLUMNS,
    TOOL_COLUMNS,
    ColumnMapping,
    RawRecord,
    _describe,
    _json_text,
    _short,
    plural,
)

# Column names, best first, matched ignoring case.
CHOSEN_COLUMNS = ("chosen", "response_j", "chosen_response", "preferred", "preferred_response", "better_response")
REJECTED_COLUMNS = ("rejected", "response_k", "rejected_response", "dispreferred", "dispreferred_response", "worse_response")
# The prompt: text, or a conversation; "input" last because in Alpaca-style files it is the context beside it.
PROMPT_COLUMNS = ("prompt", "instruction", "question", "query", *CONVERSATION_COLUMNS, "history", "input")
RESPONSE_COLUMNS = ("completions", "responses", "candidates", "generations", "outputs", "answers")
SCORE_COLUMNS = ("scores", "ratings", "rewards", "score", "rating")
COMPLETION_COLUMNS = ("completion", "response", "output", "answer")
LABEL_COLUMNS = ("label", "kto_tag", "desirable")  # label: TRL's (with "completion"); kto_tag: LLaMA-Factory's
# Inside one rated response object: its text and its rating.
RESPONSE_TEXT_KEYS = ("response", "text", "completion", "content", "output", "answer")
RESPONSE_SCORE_KEYS = ("score", "rating", "overall_score", "fine-grained_score", "reward")
LABELS = {"true": True, "false": False, "1": True, "0": False}
# Anthropic HH-RLHF writes a whole conversation as one text: "\n\nHuman: ...\n\nAssistant: ..."
TRANSCRIPT_TURN = re.compile(r"\n\n(Human|Assistant):[ ]?")
PAIR_RULE = ("each prompt gives one pair: its highest-rated response as chosen and its lowest-rated as rejected (the "
             "first in file order among equally rated ones); the responses rated in between are not used")


def is_pair_row(row: dict) -> bool:
    return "chosen" in row


def is_unpaired_row(row: dict) -> bool:
    return "label" in row and "completion" in row


def is_preference_row(row: dict) -> bool:
    return is_pair_row(row) or is_unpaired_row(row)


def side_rows(row: dict) -> list[tuple[str, dict]]:
    """(stored key, conversation row) for each side of a stored preference row: its prompt followed by that reply as
    the last assistant turn, the one learned turn (answers inside the prompt are marked read-only), as
    template.render_spans reads it."""
    prompt = [m | {"weight": 0} if m.get("role") == "assistant" else m for m in row["messages"]]
    head = {"system": row["system"]} if row.get("system") else {}
    tail = {"tools": row["tools"]} if row.get("tools") else {}

    def replied(text: str) -> dict:
        return head | {"messages": prompt + [{"role": "assistant", "content": text}]} | tail

    keys = ("chosen", "rejected") if is_pair_row(row) else ("completion",)
    return [(k, replied(row[k])) for k in keys]


# --- rules --------------------------------------------------------------------------------------------------------
def parse_label(value: Any) -> bool | None:
    """A KTO label as a bool: true/false, 1/0, or their text in any case; None for anything else."""
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    if isinstance(value, str):
        return LABELS.get(value.strip().lower())
    return None


def parse_rating(value: Any) -> float | None:
    """A rating as a number (numbers written as text too, as CSV files hold them); None when it is not one."""
    if isinstance(value, bool):
        return None
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            return None
    if isinstance(value, (int, float)) and math.isfinite(value):
        return float(value)
    return None


def pick_pair(ratings: list[float]) -> tuple[int, int] | None:
    """(chosen, rejected): the index of the highest rating and of the lowest, the first in file order among equal
    ones; None when all ratings are the same (no response is better than another)."""
    top, bottom = max(ratings), min(ratings)
    if top == bottom:
        return None
    return ratings.index(top), ratings.index(bottom)


def transcript_messages(text: str) -> list[dict] | None:
    """An HH-style text transcript as messages; None when the text is not one."""
    parts = TRANSCRIPT_TURN.split("\n\n" + text.lstrip("\n"))
    if len(parts) < 3 or parts[0].strip() or "Human" not in parts[1::2]:
        return None
    return [{"role": "user" if who == "Human" else "assistant", "content": body.strip()}
            for who, body in zip(parts[1::2], parts[2::2])]


# --- detection ----------------------------------------------------------------------------------------------------
def _first(by_lower: dict[str, str], names: Iterable[str], exclude: Iterable[str | None] = ()) -> str | None:
    skip = set(exclude)
    return next((by_lower[n] for n in names if n in by_lower and by_lower[n] not in skip), None)


def _rated_responses(by_lower: dict[str, str], scores: str | None, sample: list[dict]) -> str | None:
    """The column holding several rated responses: lists in the sample whose items carry a rating, or beside a
    column of rating lists; with no sample the names alone ("completions" holds its ratings, others need scores)."""
    for name in RESPONSE_COLUMNS:
        column = by_lower.get(name)
        if not column:
            continue
        if not sample:
            if scores or name == "completions":
                return column
            continue
        lists = [v for v in (_json_text(r.get(column)) for r in sample) if isinstance(v, list) and v]
        if not lists:
            continue
        if scores and any(isinstance(_json_text(r.get(scores)), list) for r in sample):
            return column
        if any(isinstance(item, dict) and any(k in item for k in RESPONSE_SCORE_KEYS) for v in lists for item in v):
            return column
    return None


def _labels(sample: list[dict], column: str) -> bool:
    """Some of the sample's values in `column` read as a true/false label: a supervised file's category column (say
    "label": "sports") stays a supervised file, while a KTO file with some bad labels is still KTO data, its bad
    labels findings."""
    values = [r[column] for r in sample if column in r]
    return not values or any(parse_label(v) is not None for v in values)


def detect_preference(by_lower: dict[str, str], sample: list[dict]) -> dict[str, str | None] | None:
    """ColumnMapping fields for preference data, or None when the columns are not preference data. chosen/rejected
    columns always make a preference mapping (with one of them missing it is not usable, and says so)."""
    chosen, rejected = _first(by_lower, CHOSEN_COLUMNS), _first(by_lower, REJECTED_COLUMNS)
    prompt = _first(by_lower, PROMPT_COLUMNS, exclude=(chosen, rejected))
    extra = by_lower.get("input") if prompt and prompt.lower() in ("prompt", "instruction", "question", "query") else None
    if chosen or rejected:
        return dict(prompt=prompt, input=extra, chosen=chosen, rejected=rejected)
    scores = _first(by_lower, SCORE_COLUMNS)
    responses = _rated_responses(by_lower, scores, sample)
    if responses:
        rated_in_column = scores and (not sample or any(isinstance(_json_text(r.get(scores)), list) for r in sample))
        prompt = _first(by_lower, PROMPT_COLUMNS, exclude=(responses,))
        return dict(prompt=prompt, input=extra, responses=responses, scores=scores if rated_in_column else None)
    label = _first(by_lower, LABEL_COLUMNS)
    completion = _first(by_lower, COMPLETION_COLUMNS, exclude=(prompt,))
    # "label" beside an "output" may be a supervised file's class (sentiment 0/1): only TRL's completion/label pair
    # and the KTO-only names (kto_tag, desirable) say KTO
    kto_names = label and (label.lower() != "label" or (completion or "").lower() == "completion")
    if label and completion and prompt and kto_names and _labels(sample, label):
        return dict(prompt=prompt, input=extra, completion=completion, label=label)
    return None


def missing_parts(mapping: ColumnMapping) -> str:
    """What an unusable preference mapping lacks, in words."""
    kind = mapping.kind
    wanted = {"pair": (("chosen", "the chosen replies"), ("rejected", "the rejected replies")),
              "rated": (("prompt", "the prompt"), ("responses", "the rated responses")),
              "unpaired": (("prompt", "the prompt"), ("completion", "the rated answers"), ("label", "the true/false labels"))}[kind]
    missing = [words for f, words in wanted if not getattr(mapping, f)]
    return "no column holds " + " or ".join(missing)


# --- reading rows ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Reply:
    text: str
    before: tuple[Turn, ...]  # the conversation before the reply, when the file gives the side as a whole one
    system: str  # that conversation's own system prompt
    field: str  # where the reply is, as findings name it


def _is_message(value: Any) -> bool:
    return isinstance(value, dict) and ("role" in value or "from" in value)


def _is_messages(value: Any) -> bool:
    return isinstance(value, list) and any(_is_message(m) for m in value)


def _messages_json(value: Any) -> Any:
    """Messages given as JSON text (CSV and Parquet files) parsed; any other text stays text, even text that is
    JSON (a reply may be a JSON answer)."""
    parsed = _json_text(value)
    return parsed if _is_messages(parsed) or _is_message(parsed) else value


def _same_turn(a: Turn, b: Turn) -> bool:
    """The same turn in two conversations (spaces around the text aside, and whether it is learned)."""
    return (a.role, a.content.strip(), a.tool_calls, a.name) == (b.role, b.content.strip(), b.tool_calls, b.name)


def _first_difference(a: tuple[Turn, ...], b: tuple[Turn, ...]) -> int | None:
    """The index of the first turn where two conversations differ (one ending early counts), or None."""
    k = next((i for i, (x, y) in enumerate(zip(a, b)) if not _same_turn(x, y)), min(len(a), len(b)))
    return None if k == len(a) == len(b) else k


class PreferenceReader:
    """The row checker's reader for preference mappings: one record gives one stored pair or rated answer, or
    nothing with findings naming the row and the column (in the checker's pending list)."""

    def __init__(self, checker) -> None:
        self.checker = checker  # dataset._RowChecker: its readers for text, messages, system prompts and tools
        self.mapping: ColumnMapping = checker.mapping
        self.fix = checker.fix
        if self.mapping.kind == "rated":
            checker.report.file_finding("rated_pairs", "info", f"rated responses are made into pairs: {PAIR_RULE}",
                                        "nothing to do; to train on other pairs from the same responses, write them "
                                        "as chosen/rejected rows")

    def _failed(self, pending: list, since: int) -> bool:
        return any(not fixable or not self.fix for *_, fixable in pending[since:])  # repaired findings keep the row

    def read(self, rec: RawRecord, pending: list) -> tuple[dict | None, str, list[tuple[str, str]]]:
        """(stored row or None, duplicate key, answers to check for placeholders with their fields)."""
        c, mapping, kind = self.checker, self.mapping, self.mapping.kind
        before = len(pending)
        skipped: list[tuple] = []  # rated responses left out of an otherwise usable row
        system = c._row_system(rec, pending)
        tools = c._row_tools(rec, pending)
        if tools:
            tools_column = next(col for col in TOOL_COLUMNS if col in rec.data)
            c._template_writes("tools", tools_column, f"'{tools_column}' offers tools", pending)
        prompt = self._prompt(rec, pending, system)
        label = None
        if kind == "pair":
            replies = [self._reply(rec, mapping.chosen, "chosen reply", pending),
                       self._reply(rec, mapping.rejected, "rejected reply", pending)]
        elif kind == "rated":
            replies = self._rated(rec, pending, skipped)
        else:
            replies = [self._reply(rec, mapping.completion, "completion", pending)]
            label = self._label(rec, pending)
        if self._failed(pending, before) or replies is None or None in replies:
            pending += skipped
            return None, "", []
        shared = self._shared_prompt(rec, prompt, replies, system, pending)
        if shared is not None and kind != "unpaired" and replies[0].text.strip() == replies[1].text.strip():
            where = mapping.rejected or replies[1].field
            pending.append(("same_answers", where, "the chosen and the rejected reply are the same text: the pair "
                            "teaches nothing", "give a worse rejected reply or delete the row; the row is left out", False))
            shared = None
        pending += skipped
        if shared is None:
            return None, "", []
        turns, system = shared
        row: dict[str, Any] = {"system": system} if system else {}
        row["messages"] = [Turn(t.role, t.content, t.tool_calls, t.name, t.call_id).to_message() for t in turns]
        if kind == "unpaired":
            row |= {"completion": replies[0].text, "label": label}
            answers = [(replies[0].text, replies[0].field)] if label else []  # a bad answer may hold anything
        else:
            row |= {"chosen": replies[0].text, "rejected": replies[1].text}
            answers = [(replies[0].text, replies[0].field)]
        if tools:
            row["tools"] = list(tools)
        return row, json.dumps(row, ensure_ascii=False, sort_keys=True, default=str), answers

    def _prompt(self, rec: RawRecord, pending: list, system: str) -> tuple[tuple[Turn, ...], str] | None:
        """The prompt column's turns and system prompt: text is one user turn (with the input column's text, as in
        Alpaca), a list is a conversation. None without a prompt column, or when it cannot be read (a finding)."""
        c, column = self.checker, self.mapping.prompt
        if column is None:
            return None
        if column not in rec.data:
            pending.append(("missing_field", column, f"has no '{column}'", "add the prompt; the row is left out", False))
            return None
        value = _messages_json(rec.data[column])
        if _is_message(value):
            value = [value]
        if _is_messages(value):
            turns, system, _ = c._read_messages(rec, column, value, pending, system)
            return tuple(turns), system
        text = c._value_text(rec, "prompt", column, value, pending)
        if text is None:
            return None
        extra = c._text(rec, "input", self.mapping.input, rec.data, pending) if self.mapping.input else ""
        return (Turn("user", f"{text}\n\n{extra}" if extra and extra.strip() else text),), system

    def _reply(self, rec: RawRecord, column: str, what: str, pending: list) -> Reply | None:
        """One side: text, one assistant message, or a conversation ending with the reply (its earlier turns kept to
        check against the prompt). None with a finding when it is missing or is not a reply."""
        c = self.checker
        if column not in rec.data:
            pending.append(("missing_field", column, f"has no '{column}'",
                            f"add the {what}; the row is left out", False))
            return None
        value = _messages_json(rec.data[column])
        if isinstance(value, str) and self.mapping.prompt is None:
            value = transcript_messages(value) or value
        if _is_message(value):
            value = [value]
        if not _is_messages(value):
            text = c._value_text(rec, what, column, value, pending)
            return None if text is None else Reply(text, (), "", column)
        before = len(pending)
        turns, system, _ = c._read_messages(rec, column, value, pending)
        if self._failed(pending, before):
            return None
        last = turns[-1] if turns else None
        if last is None or last.role != "assistant":
            said = "holds no message" if last is None else f"ends with a {last.role} turn"
            pending.append(("bad_side", column, f"'{column}' {said}, not the assistant's reply",
                            f"end the {what} with the assistant's message; the row is left out", False))
            return None
        if last.tool_calls:
            pending.append(("bad_side", column, f"'{column}' ends with a tool call ({last.tool_calls[0].name}), not a "
                            f"reply written as text", "pairs compare text replies; the row is left out", False))
            return None
        return Reply(last.content, tuple(turns[:-1]), system, f"{column}[{len(value) - 1}]")

    def _shared_prompt(self, rec: RawRecord, prompt, replies: list[Reply], system: str,
                       pending: list) -> tuple[tuple[Turn, ...], str] | None:
        """The prompt the replies answer: the prompt column's, which a side given as a whole conversation must repeat;
        or, without one, what the sides' conversations share before their replies (all of it: see the module's
        docstring). None with a finding when there is none or they disagree."""
        mapping = self.mapping
        if prompt is not None:
            turns, system = prompt
            for r in replies:
                k = _first_difference(r.before, turns) if r.before else None
                if k is not None or (r.before and r.system and r.system.strip() != system.strip()):
                    where = f"turn {k + 1}" if k is not None else "the system prompt"
                    pending.append(("prompt_mismatch", r.field.partition("[")[0],
                                    f"the conversation in '{r.field.partition('[')[0]}' is not the prompt in "
                                    f"'{mapping.prompt}' (they differ at {where})",
                                    "make the conversation before the reply the prompt itself, or give the reply alone; "
                                    "the row is left out", False))
                    return None
        else:
            bare = next((r for r in replies if not r.before), None)
            if bare is not None:
                pending.append(("bad_prompt", bare.field.partition("[")[0],
                                f"'{bare.field}' holds only a reply and no column holds the prompt",
                                "map the prompt's column (CLI: --map prompt=COLUMN), or give whole conversations "
                                "ending with the reply; the row is left out", False))
                return None
            first = replies[0]
            for other in replies[1:]:
                k = _first_difference(first.before, other.before)
                if k is not None or first.system.strip() != other.system.strip():
                    where = f"turn {k + 1}" if k is not None else "their system prompts"
                    pending.append(("prompt_mismatch", other.field.partition("[")[0],
                                    f"the chosen and rejected conversations differ at {where}, before their last "
                                    f"reply: a pair must share everything but the final reply",
                                    "make both conversations the same up to the last assistant turn; the row is left "
                                    "out", False))
                    return None
            turns, system = first.before, first.system or system
        where = mapping.prompt or replies[0].field.partition("[")[0]
        if not turns:
            pending.append(("bad_prompt", where, "the prompt holds no message", "write the prompt; the row is left out", False))
            return None
        if turns[-1].role == "assistant":
            pending.append(("bad_prompt", where, "the prompt ends with an assistant reply, not the user's turn the "
                            "replies answer", "end the prompt with the user's message (the reply goes in its own "
                            "column); the row is left out", False))
            return None
        return turns, system

    def _rated(self, rec: RawRecord, pending: list, skipped: list) -> list[Reply] | None:
        """The pair a row of rated responses gives (pick_pair's rule), or None with a finding."""
        c, column, scores = self.checker, self.mapping.responses, self.mapping.scores
        for col in (column, scores):
            if col and col not in rec.data:
                pending.append(("missing_field", col, f"has no '{col}'", "add the rated responses; the row is left out", False))
                return None
        value = _json_text(rec.data[column])
        if not isinstance(value, list):
            pending.append(("wrong_type", column, f"'{column}' is {_describe(value)}, not a list of responses",
                            "write the responses as a list; the row is left out", False))
            return None
        if scores:
            ratings = _json_text(rec.data[scores])
            if not isinstance(ratings, list) or len(ratings) != len(value):
                said = (f"{plural(len(ratings), 'rating')} for {plural(len(value), 'response')}" if isinstance(ratings, list)
                        else f"{_describe(ratings)} ({_short(ratings)}), not a list of ratings")
                pending.append(("bad_rating", scores, f"'{scores}' holds {said}",
                                f"give one number per response in '{column}', in the same order; the row is left out", False))
                return None
            items = [(v, r, f"{column}[{i}]", f"{scores}[{i}]") for i, (v, r) in enumerate(zip(value, ratings))]
        else:
            items = []
            for i, item in enumerate(value):
                where = f"{column}[{i}]"
                if not isinstance(item, dict):
                    skipped.append(("wrong_type", where, f"response {i} is {_describe(item)}, not an object with its "
                                    f"text and rating", "write each response as {\"response\": ..., \"score\": ...}; "
                                    "the response is not used", False))
                    continue
                text_key = next((k for k in RESPONSE_TEXT_KEYS if k in item), None)
                score_key = next((k for k in RESPONSE_SCORE_KEYS if k in item), None)
                if text_key is None or score_key is None:
                    keys = ", ".join(RESPONSE_TEXT_KEYS if text_key is None else RESPONSE_SCORE_KEYS)
                    skipped.append(("missing_field", where, f"response {i} has no {'text' if text_key is None else 'rating'} "
                                    f"(none of {keys})", "add it; the response is not used", False))
                    continue
                items.append((item[text_key], item[score_key], f"{where}.{text_key}", f"{where}.{score_key}"))
        rated: list[tuple[str, float, str]] = []
        for text_value, rating_value, text_field, rating_field in items:
            local: list[tuple] = []
            text = c._value_text(rec, "response", text_field, text_value, local)
            rating = parse_rating(rating_value)
            if rating is None:
                local.append(("bad_rating", rating_field, f"'{rating_field}' is {_short(rating_value)}, not a number",
                              "write the rating as a number; the response is not used", False))
            if self._failed(local, 0):
                skipped += local
                continue
            pending += local  # repairs (the "fix" policy) of a response that is used
            rated.append((text, rating, text_field))
        if len(rated) < 2:
            pending.append(("too_few_responses", column, f"has {plural(len(rated), 'usable rated response')}: a pair "
                            f"needs two", "add rated responses or delete the row; the row is left out", False))
            return None
        pick = pick_pair([r for _, r, _ in rated])
        if pick is None:
            pending.append(("tied_ratings", scores or column, f"all {len(rated)} responses are rated {rated[0][1]:g}: with "
                            f"the highest-rated as chosen and the lowest-rated as rejected, equal ratings give no pair",
                            "nothing to do if they are equally good; the prompt is left out", False))
            return None
        return [Reply(rated[i][0], (), "", rated[i][2]) for i in pick]

    def _label(self, rec: RawRecord, pending: list) -> bool | None:
        column = self.mapping.label
        if column not in rec.data:
            pending.append(("missing_field", column, f"has no '{column}'",
                            "add the label: true for a good answer, false for a bad one; the row is left out", False))
            return None
        label = parse_label(rec.data[column])
        if label is None:
            pending.append(("bad_label", column, f"'{column}' is {_short(rec.data[column])}, not true or false",
                            "write true or false (or 1 / 0): true marks a good answer; the row is left out", False))
        return label
