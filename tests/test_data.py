"""The Data issue: every bad input names its file, row and field; column mapping; split; storage; the CLI's exit codes."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from app.data import dataset as data
from app.data import store as data_store
from app.data.dataset import ColumnMapping, DataError, check_file, detect_mapping, split_rows
ROOT = Path(__file__).resolve().parent.parent

GOOD = {"instruction": "Say hi", "input": "", "output": "Hi!"}
CHAT = {"messages": [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "Hi!"}]}


def jsonl(*rows) -> bytes:
    """JSONL bytes; a bytes row is written as it is (for broken lines)."""
    return b"".join((r if isinstance(r, bytes) else json.dumps(r).encode()) + b"\n" for r in rows)


def write(tmp_path: Path, name: str, content: bytes | str) -> Path:
    path = tmp_path / name
    path.write_bytes(content.encode() if isinstance(content, str) else content)
    return path


def parquet(tmp_path: Path, name: str, columns: dict) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / name
    pq.write_table(pa.table(columns), path)
    return path


# --- each bad row is named by file, row (line) and field, with advice -------------------------------------------
BAD_ROWS = [
    # (id, file name, content, code, row, line, field, fixed output under the "fix" policy or None = still dropped)
    ("empty instruction", "a.jsonl", jsonl(GOOD, {"instruction": "", "output": "x"}), "empty_field", 2, 2, "instruction", None),
    ("blank output", "a.jsonl", jsonl(GOOD, {"instruction": "q", "output": "   \n"}), "empty_field", 2, 2, "output", None),
    ("missing output", "a.jsonl", jsonl({"instruction": "q"}, GOOD), "missing_field", 1, 1, "output", None),
    ("null output", "a.jsonl", jsonl(GOOD, {"instruction": "q", "output": None}), "wrong_type", 2, 2, "output", None),
    ("number output", "a.jsonl", jsonl(GOOD, {"instruction": "q", "output": 42}), "wrong_type", 2, 2, "output", "42"),
    ("float output", "a.jsonl", jsonl(GOOD, {"instruction": "q", "output": 2.5}), "wrong_type", 2, 2, "output", "2.5"),
    ("bool output", "a.jsonl", jsonl(GOOD, {"instruction": "q", "output": True}), "wrong_type", 2, 2, "output", "true"),
    ("list output", "a.jsonl", jsonl(GOOD, {"instruction": "q", "output": ["a", "b"]}), "wrong_type", 2, 2, "output", "a\nb"),
    ("nested object", "a.jsonl", jsonl(GOOD, {"instruction": "q", "output": {"k": 1}}), "wrong_type", 2, 2, "output", '{"k": 1}'),
    ("number input", "a.jsonl", jsonl(GOOD, {"instruction": "q", "input": 7, "output": "o"}), "wrong_type", 2, 2, "input", "7"),
    ("invalid UTF-8", "a.jsonl", jsonl(GOOD, b'{"instruction": "q", "output": "caf\xe9"}'), "invalid_utf8", 2, 2, "output", "caf\ufffd"),
    ("lone surrogate escape", "a.jsonl", jsonl(GOOD, b'{"instruction": "q", "output": "x\\ud800y"}'), "invalid_utf8", 2, 2, "output", "x\ufffdy"),
    ("invalid UTF-8 in a JSON array", "a.json", b'[{"instruction": "a", "output": "b"},\n {"instruction": "c\xff", "output": "d"}]',
     "invalid_utf8", 2, 2, "instruction", "c\ufffd"),
    ("invalid UTF-8 in CSV", "a.csv", b"instruction,output\nq,a\nq2,caf\xe9\n", "invalid_utf8", 2, 3, "output", "caf\ufffd"),
    ("malformed JSON line", "a.jsonl", jsonl(GOOD, GOOD | {"output": "2"}, b'{"instruction": "q", "output": '), "bad_json", 3, 3, None, None),
    ("line holding a list", "a.jsonl", jsonl(GOOD, b'["q", "a"]'), "not_object", 2, 2, None, None),
    ("duplicate row", "a.jsonl", jsonl(GOOD, GOOD | {"output": "2"}, GOOD), "duplicate", 3, 3, None, None),
    ("blank lines keep line numbers", "a.jsonl", jsonl(GOOD) + b"\n\n" + jsonl({"instruction": "", "output": "x"}), "empty_field", 4, 4, "instruction", None),
    ("JSON array element", "a.json", '[\n {"instruction": "a", "output": "b"},\n {"instruction": "c",\n  "output": 5}\n]',
     "wrong_type", 2, 3, "output", "5"),
    ("JSON array syntax error", "a.json", '[\n {"instruction": "a", "output": "b"},\n {"instruction": "c" "output": "d"}\n]',
     "bad_json", 2, 3, None, None),
    ("CSV empty cell", "a.csv", 'instruction,output\nq,a\n"two\nlines",\n', "empty_field", 2, 3, "output", None),
    ("CSV extra field", "a.csv", "instruction,output\nq,a\nq2,a,b\n", "bad_csv_row", 2, 3, None, None),
    ("TSV missing field", "a.tsv", "instruction\toutput\nq\ta\nq2\n", "missing_field", 2, 3, "output", None),
    ("renamed columns", "a.jsonl", jsonl({"question": "q", "answer": "a"}, {"question": "q2", "answer": ""}), "empty_field", 2, 2, "answer", None),
    ("chat message not an object", "a.jsonl", jsonl(CHAT, {"messages": CHAT["messages"] + ["x"]}), "bad_message", 2, 2, "messages[2]", None),
    ("chat with an unknown role", "a.jsonl", jsonl(CHAT, {"messages": [{"role": "robot", "content": "q"}, {"role": "user", "content": "q2"}, {"role": "assistant", "content": "a2"}]}),
     "bad_message", 2, 2, "messages[0]", None),
    ("chat without a reply", "a.jsonl", jsonl(CHAT, {"messages": [{"role": "user", "content": "q"}]}), "no_assistant", 2, 2, "messages", None),
    ("chat content a number", "a.jsonl", jsonl(CHAT, {"messages": [{"role": "user", "content": "q2"}, {"role": "assistant", "content": 5}]}),
     "wrong_type", 2, 2, "messages[1].content", "5"),
]


@pytest.mark.parametrize("case", BAD_ROWS, ids=[c[0] for c in BAD_ROWS])
def test_bad_row_is_named_by_file_row_and_field(tmp_path, case):
    _, name, content, code, row, line, field, fixed = case
    path = write(tmp_path, name, content)
    mapping = ColumnMapping(conversations="messages") if "chat" in case[0] else None
    report = check_file(path, mapping=mapping)
    found = [f for f in report.findings if f.code == code]
    assert len(found) == 1, report.summary_lines()
    f = found[0]
    assert (f.row, f.line, f.field) == (row, line, field)
    text = str(f)
    assert name in text
    assert (f"line {row}" if name.endswith(".jsonl") else f"row {row} (line {line})") in text
    if field:
        assert f"field '{field}'" in text
    # Any problem leaves the row out: a conversation with a bad message is left out whole, never trained on in part.
    assert f.advice and f.outcome == "dropped"
    assert report.usable and report.exit_code == 0  # the good rows are kept
    if fixed is not None:
        repaired = check_file(path, mapping=mapping, policy="fix")
        assert repaired.kept == report.kept + 1 and repaired.fixed == 1
        last = repaired.rows[-1]
        assert fixed in ([m["content"] for m in last["messages"]] if "messages" in last else last.values())
        assert [x.outcome for x in repaired.findings if x.code == code] == ["fixed"]


def test_parquet_types_are_checked_by_row(tmp_path):
    path = parquet(tmp_path, "p.parquet", {"instruction": ["a", "b", "c"], "output": [1, 2, 3]})
    report = check_file(path)
    rows = [(f.code, f.row, f.field) for f in report.findings if f.row]
    assert rows == [("wrong_type", n, "output") for n in (1, 2, 3)]
    assert "p.parquet row 2, field 'output'" in str(report.findings[1])
    assert report.exit_code == 1
    assert check_file(path, policy="fix").rows[2] == {"instruction": "c", "input": "", "output": "3"}


def test_parquet_nulls_in_the_optional_input_are_fine(tmp_path):
    path = parquet(tmp_path, "p.parquet", {"instruction": ["a", "b"], "input": [None, "x"], "output": ["o", None]})
    report = check_file(path)
    assert report.rows == [{"instruction": "a", "input": "", "output": "o"}]
    assert [(f.code, f.row, f.field) for f in report.findings] == [("wrong_type", 2, "output")]


def test_too_long_rows_are_counted_and_named(tmp_path, embedded_model_dir):
    from app.data.tokens import load_tokenizer

    tokenizer = load_tokenizer(str(embedded_model_dir), str(embedded_model_dir.parent))
    long = {"instruction": "q", "output": "word " * 300}
    huge_prompt = {"instruction": "word " * 300, "output": "a"}
    path = write(tmp_path, "a.jsonl", jsonl(GOOD, long, GOOD | {"output": "2"}, huge_prompt))
    report = check_file(path, tokenizer=tokenizer, cutoff=128)
    found = [(f.code, f.row, f.field, f.outcome) for f in report.findings]
    assert found == [("too_long", 2, "output", "truncated"), ("too_long", 4, "instruction", "truncated")]
    assert report.truncated == 2 and report.truncated_share == 0.5 and report.kept == 4
    assert f"is {report.lengths[1]} tokens" in report.findings[0].message and "cutoff of 128" in report.findings[0].message
    assert "no answer token is trained on" in report.findings[1].message
    assert any("2 of 4 rows (50.0%)" in line for line in report.summary_lines())


# --- content given as a list of typed parts (OpenAI style) -----------------------------------------------------------
def user_says(content) -> dict:
    return {"messages": [{"role": "user", "content": content}, {"role": "assistant", "content": "A cat."}]}


TEXT_PART = {"type": "text", "text": "What is in this picture?"}
IMAGE_PART = {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}
AUDIO_PART = {"type": "input_audio", "input_audio": {"data": "UklGRg==", "format": "wav"}}
@pytest.mark.parametrize("content", [[TEXT_PART, {"type": "text", "text": "Be brief."}],
                                     [TEXT_PART, {"type": "input_text", "text": "Be brief."}]])
def test_text_parts_are_read_as_text_without_a_finding(tmp_path, content):
    report = check_file(write(tmp_path, "parts.jsonl", jsonl(CHAT, user_says(content))))
    assert report.findings == [] and report.kept == 2
    assert report.rows[1]["messages"][0]["content"] == "What is in this picture?\nBe brief."


PARTS = [
    # (id, row, mapping, finding (code, field), the text 'fix' trains on, or None: no row under either policy)
    ("an image part", user_says([TEXT_PART, IMAGE_PART]), "messages", ("unsupported_part", "messages[0].content[1]"), None),
    ("an audio part in a reply", {"messages": [{"role": "user", "content": "Say it"}, {"role": "assistant", "content": [AUDIO_PART]}]},
     "messages", ("unsupported_part", "messages[1].content[0]"), None),
    ("an image part in an Alpaca output", {"instruction": "Draw a cat", "output": [TEXT_PART, IMAGE_PART]}, None,
     ("unsupported_part", "output[1]"), None),
    ("a text part without its text", user_says([{"type": "text", "content": "hi"}]), "messages",
     ("unsupported_part", "messages[0].content[0]"), None),
]


@pytest.mark.parametrize("case", PARTS, ids=[c[0] for c in PARTS])
def test_typed_content_parts_are_joined_or_reported_never_trained_as_json(tmp_path, case):
    _, record, conversations, (code, field), fixed = case
    path = write(tmp_path, "parts.jsonl", jsonl(GOOD if conversations is None else CHAT, record))
    mapping = ColumnMapping(conversations=conversations) if conversations else None
    for policy in ("drop", "fix"):
        report = check_file(path, mapping=mapping, policy=policy)
        found = [f for f in report.findings if f.code == code]
        assert [(f.row, f.field) for f in found] == [(2, field)], report.summary_lines()
        assert str(found[0]).startswith(f"parts.jsonl line 2, field '{field}'")
        trained = [r for r, n in zip(report.rows, report.row_numbers) if n == 2]
        assert not any('"type\\"' in json.dumps(r) for r in report.rows)  # never the list's JSON text
        if policy == "fix" and fixed is not None:
            assert [r["instruction"] for r in trained] == [fixed] and found[0].outcome == "fixed"
        else:
            assert trained == [] and found[0].outcome == "dropped"
    assert data.FINDING_TITLES[code]


# --- template placeholders left in answers ---------------------------------------------------------------------------
PLACEHOLDERS = [
    # (id, row, the placeholders named, or [] when nothing is flagged)
    ("handlebars", {"instruction": "Write to Ann", "output": "Dear {{name}}, thank you."}, ["{{name}}"]),
    ("jinja with spaces and a dot", {"instruction": "Greet", "output": "Hi {{ user.first_name }}! {{name}} {{name}}"},
     ["{{ user.first_name }}", "{{name}}"]),
    ("in a chat reply", {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello {{customer}}"}]},
     ["{{customer}}"]),
    ("in a code block", {"instruction": "A Jinja greeting", "output": "```jinja\nHello {{ name }}\n```"}, []),
    ("in inline code", {"instruction": "Jinja?", "output": "Write `{{ name }}` to print it."}, []),
    ("single braces", {"instruction": "Format", "output": "f'{name}' and {\"a\": 1}"}, []),
    ("only in the instruction", {"instruction": "Dear {{name}}", "output": "That is a template."}, []),
]


@pytest.mark.parametrize("case", PLACEHOLDERS, ids=[c[0] for c in PLACEHOLDERS])
def test_unfilled_placeholders_in_answers_are_warned_about_and_kept(tmp_path, case):
    _, record, named = case
    report = check_file(write(tmp_path, "p.jsonl", jsonl(CHAT if "messages" in record else GOOD, record)))
    assert report.kept == 2 and report.dropped == 0  # a warning, never a drop
    found = [f for f in report.findings if f.code == "placeholder"]
    if not named:
        assert found == [], report.summary_lines()
        return
    (f,) = found
    field = "messages[1].content" if "messages" in record else "output"
    assert (f.severity, f.row, f.field, f.outcome) == ("warning", 2, field, "kept")
    assert str(f).startswith(f"p.jsonl line 2, field '{field}': '{field}' holds {', '.join(named)}")
    assert data.FINDING_TITLES["placeholder"]


# --- file-level problems and the exit codes they give -------------------------------------------------------------
FILE_CASES = [
    # (id, name, content or None for a missing file, code, exit code, words the message must contain)
    ("empty file", "e.jsonl", "", "empty_file", 1, "no rows"),
    ("only blank lines", "e.jsonl", "\n \n", "empty_file", 1, "no rows"),
    ("empty JSON array", "e.json", "[]", "empty_file", 1, "no rows"),
    ("CSV header only", "e.csv", "instruction,output\n", "empty_file", 1, "no rows"),
    ("no usable column", "t.jsonl", jsonl({"text": "a"}, {"text": "b"}), "no_usable_column", 1, "'text'"),
    ("every row bad", "b.jsonl", jsonl({"instruction": "", "output": "x"}, b"{oops"), "no_valid_rows", 1, "2 records"),
    ("missing file", "nope.jsonl", None, "unreadable", 2, "no such file"),
    ("unknown format", "x.bin", b"\x00\x01\x02binary", "unreadable", 2, "unknown file type"),
    ("JSON that does not parse", "x.json", '[{"instruction": "a" "output": "b"}]', "unreadable", 2, "line 1 column 22"),
    ("JSON scalar", "x.json", '"just a string"', "unreadable", 2, "must start with '['"),
    ("broken Parquet", "x.parquet", b"PAR1 not really", "unreadable", 2, "Parquet"),
]


@pytest.mark.parametrize("case", FILE_CASES, ids=[c[0] for c in FILE_CASES])
def test_file_level_problems(tmp_path, case):
    _, name, content, code, exit_code, words = case
    path = tmp_path / name if content is None else write(tmp_path, name, content)
    report = check_file(path)
    assert report.fatal is not None and report.fatal.code == code, report.summary_lines()
    assert report.exit_code == exit_code and not report.usable
    assert name in str(report.fatal) and words in str(report.fatal)
    assert report.verdict().startswith("Not usable")


def test_a_folder_is_unreadable(tmp_path):
    assert check_file(tmp_path).exit_code == 2


def test_hub_dataset_offline_says_so(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    report = check_file("hub:someone/some-data")
    assert report.exit_code == 2 and "offline" in report.fatal.message and "upload" in report.fatal.message


def test_json_lines_saved_as_json_and_wrapped_arrays_are_read(tmp_path):
    assert check_file(write(tmp_path, "l.json", jsonl(GOOD, GOOD | {"output": "2"}))).kept == 2
    assert check_file(write(tmp_path, "w.json", json.dumps({"train": [GOOD]}))).kept == 1
    assert check_file(write(tmp_path, "noext", jsonl(GOOD))).kept == 1


def test_huge_values_in_csv_are_accepted(tmp_path):
    path = write(tmp_path, "big.csv", "instruction,output\nq," + "x" * 200_000 + "\n")
    assert check_file(path).kept == 1


def test_findings_are_capped_but_counted(tmp_path):
    path = write(tmp_path, "many.jsonl", jsonl(GOOD, *({"instruction": "", "output": str(i)} for i in range(data.MAX_EXAMPLES + 50))))
    report = check_file(path)
    assert report.counts["empty_field"] == data.MAX_EXAMPLES + 50 and len(report.findings) == data.MAX_EXAMPLES
    assert report.dropped == data.MAX_EXAMPLES + 50
    assert any("150 in all" in line for line in report.summary_lines())


# --- column mapping -------------------------------------------------------------------------------------------------
MAPPINGS = [
    # (columns, expected (instruction, input, output, conversations), kind)
    (["instruction", "input", "output"], ("instruction", "input", "output", None), "alpaca"),
    (["instruction", "output"], ("instruction", None, "output", None), "alpaca"),
    (["output", "instruction", "input", "id"], ("instruction", "input", "output", None), "alpaca"),
    (["Instruction", "Input", "Output"], ("Instruction", "Input", "Output", None), "renamed"),
    (["instruction", "context", "response", "category"], ("instruction", "context", "response", None), "renamed"),
    (["prompt", "completion"], ("prompt", None, "completion", None), "renamed"),
    (["question", "answer"], ("question", None, "answer", None), "renamed"),
    (["query", "response"], ("query", None, "response", None), "renamed"),
    (["input", "output"], ("input", None, "output", None), "renamed"),
    (["conversations", "id"], (None, None, None, "conversations"), "conversations"),
    (["messages"], (None, None, None, "messages"), "conversations"),
    (["text"], (None, None, None, None), "none"),
    (["prompt", "chosen", "rejected"], (None, None, None, None), "pair"),  # preference data (tests/test_preference_data.py)
]


@pytest.mark.parametrize("columns,expected,kind", MAPPINGS, ids=[",".join(m[0]) for m in MAPPINGS])
def test_mapping_detection(columns, expected, kind):
    mapping = detect_mapping(columns)
    assert (mapping.instruction, mapping.input, mapping.output, mapping.conversations) == expected
    assert mapping.kind == kind
    assert mapping.needs_confirmation == (kind not in ("alpaca", "none"))


def test_user_mapping_is_applied_and_checked(tmp_path):
    path = write(tmp_path, "m.jsonl", jsonl({"q": "a", "ctx": "c", "a": "b"}))
    report = check_file(path, mapping=ColumnMapping(instruction="q", input="ctx", output="a"))
    assert report.rows == [{"instruction": "a", "input": "c", "output": "b"}]
    bad = check_file(path, mapping=ColumnMapping(instruction="q", output="nope"))
    assert bad.fatal.code == "no_usable_column" and "'nope'" in bad.fatal.message and bad.exit_code == 1


@pytest.mark.parametrize("text,expected", [
    ("instruction=question,output=answer", ColumnMapping(instruction="question", output="answer")),
    ("conversations=chat", ColumnMapping(conversations="chat")),
])
def test_mapping_parse(text, expected):
    assert ColumnMapping.parse(text) == expected


@pytest.mark.parametrize("text", ["answer", "reply=answer", "output="])
def test_mapping_parse_rejects(text):
    with pytest.raises(DataError, match="TARGET=COLUMN"):
        ColumnMapping.parse(text)


CHATS = [
    ("sharegpt", {"conversations": [{"from": "system", "value": "be nice"}, {"from": "human", "value": "q1"},
                                    {"from": "gpt", "value": "a1"}, {"from": "human", "value": "q2"}, {"from": "gpt", "value": "a2"}]}),
    ("openai", {"messages": [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "a1"},
                             {"role": "user", "content": "q2"}, {"role": "assistant", "content": "a2"}]}),
]


TURNS = [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "a1"},
         {"role": "user", "content": "q2"}, {"role": "assistant", "content": "a2"}]


@pytest.mark.parametrize("name,record", CHATS, ids=[c[0] for c in CHATS])
def test_a_conversation_is_one_example_with_its_history_and_system_prompt(tmp_path, name, record):
    report = check_file(write(tmp_path, f"{name}.jsonl", jsonl(record)))
    assert report.mapping.kind == "conversations"
    system = {"system": "be nice"} if name == "sharegpt" else {}
    assert report.rows == [system | {"messages": TURNS}]
    assert report.findings == [] and report.row_numbers == [1] and report.kept == 1


def test_the_same_first_question_in_two_conversations_is_not_a_duplicate(tmp_path):
    other = {"messages": TURNS[:3] + [{"role": "assistant", "content": "another answer"}]}
    report = check_file(write(tmp_path, "c.jsonl", jsonl({"messages": TURNS}, other, {"messages": TURNS})))
    assert report.kept == 2 and [(f.code, f.row) for f in report.findings] == [("duplicate", 3)]


def test_conversations_stored_as_json_text_in_csv(tmp_path):
    chat = json.dumps([{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]).replace('"', '""')
    report = check_file(write(tmp_path, "c.csv", f'messages\n"{chat}"\n'))
    assert report.rows == [{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}]


# --- split -----------------------------------------------------------------------------------------------------------
ROWS = [{"instruction": str(i), "input": "", "output": str(i)} for i in range(100)]


@pytest.mark.parametrize("n,share,val_count", [(100, 0.1, 10), (100, 0.0, 0), (100, 0.25, 25), (3, 0.01, 1), (1, 0.5, 0), (2, 0.9, 1), (0, 0.1, 0)])
def test_split_sizes(n, share, val_count):
    train, val = split_rows(ROWS[:n], share, seed=1)
    assert len(val) == val_count and len(train) == n - val_count
    assert sorted(train + val, key=lambda r: int(r["instruction"])) == ROWS[:n]


def test_split_is_seeded_and_keeps_file_order():
    first, again, other = split_rows(ROWS, 0.2, 7), split_rows(ROWS, 0.2, 7), split_rows(ROWS, 0.2, 8)
    assert first == again and first[1] != other[1]
    assert [int(r["instruction"]) for r in first[1]] == sorted(int(r["instruction"]) for r in first[1])


@pytest.mark.parametrize("share", [-0.1, 1.0, 1.5])
def test_split_rejects_bad_share(share):
    with pytest.raises(DataError, match="validation share"):
        split_rows(ROWS, share)


# --- the trainer's entry point and the workspace store ----------------------------------------------------------------
def test_load_training_rows_keeps_valid_rows_and_refuses_unusable_files(tmp_path):
    path = write(tmp_path, "a.csv", "prompt,completion\nq,a\n,b\n")
    assert data.load_training_rows(path) == [{"instruction": "q", "input": "", "output": "a"}]
    with pytest.raises(DataError, match="no rows"):
        data.load_training_rows(write(tmp_path, "e.jsonl", ""))


def test_saved_datasets_survive_a_restart(tmp_path, workspace):
    from app.workspace import Workspace

    source = write(tmp_path, "my data.jsonl", jsonl(GOOD, {"instruction": "q", "output": 3}))
    entry = data_store.save_dataset(workspace, check_file(source), source)
    assert entry.path == workspace.datasets / "my-data" / "train.jsonl" and entry.rows == 1
    again = data_store.save_dataset(workspace, check_file(source, policy="fix"), source)  # same file, other policy: replaced
    assert again.path == entry.path and again.rows == 2
    (tmp_path / "elsewhere").mkdir()
    other = write(tmp_path / "elsewhere", "my data.jsonl", jsonl(GOOD | {"output": "different"}))  # same name, other content
    third = data_store.save_dataset(workspace, check_file(other), other)
    assert third.name == "my-data-2"

    reopened = Workspace.open(workspace.root)
    entries = data_store.list_datasets(reopened)
    demos = len(data.demo_datasets())
    assert demos >= 3 and [e.kind for e in entries[:demos]] == ["demo"] * demos
    assert [(e.name, e.rows, e.kind) for e in entries[demos:]] == [("my-data", 2, "uploaded"), ("my-data-2", 1, "uploaded")]
    meta = data_store.dataset_meta(entry.path)
    assert meta["source"] == "my data.jsonl" and meta["mapping"]["output"] == "output" and meta["findings"] == {"wrong_type": 1}
    assert data.load_training_rows(entry.path)[1] == {"instruction": "q", "input": "", "output": "3"}


def test_unusable_reports_are_not_saved(tmp_path, workspace):
    source = write(tmp_path, "e.jsonl", "")
    with pytest.raises(DataError):
        data_store.save_dataset(workspace, check_file(source), source)


# --- the CLI ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name,content,code", [
    ("ok.jsonl", jsonl(GOOD, {"instruction": "", "output": "x"}), 0),
    ("none.jsonl", jsonl({"text": "x"}), 1),
    ("broken.json", "[{", 2),
])
def test_cli_exit_codes(tmp_path, name, content, code):
    path = write(tmp_path, name, content)
    done = subprocess.run([sys.executable, str(ROOT / "launch.py"), "data", "check", str(path), "--cutoff", "0"],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert done.returncode == code, done.stderr
    assert name in done.stdout and "Traceback" not in done.stdout + done.stderr


def test_cli_json_report_with_length_check(tmp_path, embedded_model_dir, capsys):
    import launch

    path = write(tmp_path, "a.jsonl", jsonl(GOOD, {"instruction": "q", "output": "word " * 100}, {"instruction": "q", "output": 1}))
    code = launch.main(["data", "check", str(path), "--json", "--cutoff", "64", "--model", str(embedded_model_dir), "--policy", "fix"])
    report = json.loads(capsys.readouterr().out)
    assert code == 0 and report["exit_code"] == 0
    assert (report["kept"], report["fixed"], report["truncated"], report["cutoff"]) == (3, 1, 1, 64)
    assert {f["code"] for f in report["findings"]} == {"wrong_type", "too_long"}
    assert report["tokens"]["rows"] == 3 and report["tokens"]["truncated"] == 1 and report["tokens"]["total"] > 100
    assert all(f["file"] == "a.jsonl" and f["row"] and f["text"] for f in report["findings"])


def test_cli_map_option(tmp_path, capsys):
    import launch

    path = write(tmp_path, "m.jsonl", jsonl({"q": "a", "a": "b"}))
    assert launch.main(["data", "check", str(path), "--cutoff", "0", "--map", "instruction=q,output=a"]) == 0
    assert launch.main(["data", "check", str(path), "--cutoff", "0"]) == 1
    assert launch.main(["data", "check", str(path), "--cutoff", "0", "--map", "bogus"]) == 2
    assert "TARGET=COLUMN" in capsys.readouterr().err


def test_hub_dataset_goes_through_the_same_checks(monkeypatch):
    import datasets

    from app.data import formats as data_formats

    calls = []

    def fake_load_dataset(name, split):
        calls.append((name, split))
        return [{"prompt": "q", "completion": "a"}, {"prompt": "q2", "completion": ""}]

    monkeypatch.setattr(data_formats, "hub_offline", lambda: False)
    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    report = check_file("hub:someone/qa:test")
    assert calls == [("someone/qa", "test")] and report.format == "hub"
    assert report.rows == [{"instruction": "q", "input": "", "output": "a"}]
    assert str(report.findings[0]).startswith("hub:someone/qa:test row 2, field 'completion': 'completion' is empty")
