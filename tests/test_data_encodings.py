"""Files that are not plain UTF-8 (issue 22): UTF-16 and UTF-32 are read, a UTF-8 file with bad bytes names the first
one and how to convert the file, and no text with lone surrogates reaches a report, the CLI or the page."""
from __future__ import annotations

import codecs
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from app.data.dataset import check_file
from components import data_tab
from tests.test_data_tab import upload_cache, upload_through_page  # noqa: F401 - upload_cache is a fixture

ROOT = Path(__file__).resolve().parent.parent
CSV = "instruction,output\nSay hi,Hi!\nCafé?,Olé\n"
JSONL = '{"instruction": "Say hi", "output": "Hi!"}\n{"instruction": "Café?", "output": "Olé"}\n'
ROWS = [{"instruction": "Say hi", "input": "", "output": "Hi!"}, {"instruction": "Café?", "input": "", "output": "Olé"}]
SAY_HI = ROWS[:1]
LATIN1_VALUE = '{"instruction": "Say hi", "output": "Hi!"}\n{"instruction": "Café?", "output": "Oui"}\n'.encode("latin-1")
ICONV = "iconv -f latin1 -t utf-8"

ENCODED = [
    # (id, file name, bytes, exit code of `data check`, rows kept, words the report must hold,
    #  findings that must name their place: (code, row or None for the whole file, field))
    ("UTF-16 LE CSV with BOM", "excel.csv", codecs.BOM_UTF16_LE + CSV.encode("utf-16-le"), 0, ROWS, ["CSV in UTF-16 LE"], []),
    ("UTF-16 BE CSV with BOM", "be.csv", codecs.BOM_UTF16_BE + CSV.encode("utf-16-be"), 0, ROWS, ["CSV in UTF-16 BE"], []),
    ("UTF-16 LE CSV without BOM", "nobom.csv", CSV.encode("utf-16-le"), 0, ROWS, ["CSV in UTF-16 LE"], []),
    ("UTF-16 BE JSONL without BOM", "nobom.jsonl", JSONL.encode("utf-16-be"), 0, ROWS, ["JSONL in UTF-16 BE"], []),
    ("UTF-16 TSV with BOM", "t.tsv", codecs.BOM_UTF16_LE + CSV.replace(",", "\t").encode("utf-16-le"), 0, ROWS,
     ["TSV in UTF-16 LE"], []),
    ("UTF-16 JSON array, unknown suffix", "rows.txt", codecs.BOM_UTF16_LE + json.dumps(ROWS, ensure_ascii=False).encode("utf-16-le"),
     0, ROWS, ["JSON array in UTF-16 LE"], []),
    ("UTF-32 JSONL with BOM", "u32.jsonl", codecs.BOM_UTF32_LE + JSONL.encode("utf-32-le"), 0, ROWS, ["JSONL in UTF-32 LE"], []),
    ("UTF-8 JSONL with BOM", "bom.jsonl", codecs.BOM_UTF8 + JSONL.encode(), 0, ROWS, ["JSONL, 2 records read"], []),
    ("Latin-1 byte in a value", "latin.jsonl", LATIN1_VALUE, 0, SAY_HI,
     ["the file is not UTF-8: byte 0xE9 at byte offset 63 (line 2)", ICONV], [("not_utf8", None, None), ("invalid_utf8", 2, "instruction")]),
    ("Latin-1 byte in an unused column name", "extra.jsonl",
     '{"instruction": "Say hi", "output": "Hi!", "catégorie": "x"}\n'.encode("latin-1"), 0, SAY_HI,
     ["byte 0xE9 at byte offset 47 (line 1)", ICONV, "column(s) 'cat\ufffdgorie' are not used"],
     [("invalid_utf8", None, "cat\ufffdgorie")]),
    ("Latin-1 byte in the answer's column name", "answer.jsonl",
     '{"instruction": "Say hi", "réponse": "Salut"}\n'.encode("latin-1"), 1, [],
     ["no column holds the instruction and the output (columns: 'instruction', 'r\ufffdponse')", ICONV],
     [("invalid_utf8", None, "r\ufffdponse")]),
    ("Latin-1 byte in a CSV header", "header.csv", "instruction,output,catégorie\nSay hi,Hi!,x\n".encode("latin-1"), 0,
     SAY_HI, ["byte 0xE9 at byte offset 22 (line 1)", ICONV], [("invalid_utf8", None, "cat\ufffdgorie")]),
    ("damaged UTF-16", "cut.csv", codecs.BOM_UTF16_LE + CSV.encode("utf-16-le") + b"\x3d\xd8", 2, [],
     ["reads as UTF-16 LE (it starts with a byte-order mark) but part of it is not valid UTF-16 LE", "save it again as UTF-8"],
     []),
]
IDS = [c[0] for c in ENCODED]


def no_lone_surrogates(text: str) -> str:
    text.encode("utf-8")  # what the page's JSON encoder and a UTF-8 terminal refuse: "surrogates not allowed"
    return text


def write(tmp_path: Path, name: str, content: bytes) -> Path:
    (tmp_path / name).write_bytes(content)
    return tmp_path / name


@pytest.mark.parametrize("case", ENCODED, ids=IDS)
def test_encodings_are_read_or_named(tmp_path, case):
    _, name, content, exit_code, rows, words, named = case
    path = write(tmp_path, name, content)
    for policy in ("drop", "fix"):
        report = check_file(path, policy=policy)
        text = no_lone_surrogates("\n".join(report.summary_lines()))
        no_lone_surrogates(json.dumps(report.to_dict(), ensure_ascii=False))
        assert report.exit_code == exit_code, text
        assert all(w in text for w in words), text
        assert set(named) <= {(f.code, f.row, f.field) for f in report.findings}, text
        assert all(f.file == name for f in report.findings)
    assert check_file(path).rows == rows
    if rows == SAY_HI and "value" in case[0]:  # 'fix' keeps the row, with � for the bad byte
        assert report.rows[-1]["instruction"] == "Caf\ufffd?"


@pytest.mark.parametrize("case", ENCODED, ids=IDS)
def test_data_check_cli_reads_or_names_the_encoding(tmp_path, case):
    _, name, content, exit_code, rows, words, _ = case
    done = subprocess.run([sys.executable, str(ROOT / "launch.py"), "data", "check", str(write(tmp_path, name, content)),
                           "--cutoff", "0"], capture_output=True, cwd=ROOT, timeout=120,
                          env={**os.environ, "PYTHONIOENCODING": "utf-8"})  # strict UTF-8, as a terminal reads it
    out = no_lone_surrogates(done.stdout.decode("utf-8"))
    assert done.returncode == exit_code, (out, done.stderr[-2000:])
    assert all(w in out for w in words), out
    assert "Traceback" not in done.stderr.decode("utf-8", "replace")


UPLOADABLE = [c for c in ENCODED if Path(c[1]).suffix in data_tab.UPLOAD_TYPES]  # the page takes no .txt


@pytest.mark.parametrize("case", UPLOADABLE, ids=[c[0] for c in UPLOADABLE])
def test_upload_of_any_encoding_reaches_the_page(workspace, upload_cache, case):
    """Through the page's own upload event and Gradio's encoding of its response, which refused lone surrogates
    ("str is not valid UTF-8: surrogates not allowed") and left red badges, no message and a stuck dataset picker."""
    _, name, content, exit_code, rows, words, _ = case
    sent = upload_through_page(workspace, upload_cache, name, content)["data"]
    report_text, findings, picker = sent[1], sent[2]["data"], sent[-1]
    shown = report_text + "\n" + "\n".join(" ".join(cells) for cells in findings)
    assert all(w in shown for w in words), shown
    if exit_code == 0:
        assert report_text.startswith("✅") and f"({len(rows)} row" in report_text
        assert picker["value"].endswith("train.jsonl")  # the picker moves to the saved dataset
    else:
        assert report_text.startswith("⛔")


@pytest.mark.parametrize("head, name", [
    (b'a,b\n1,\x002\n', "UTF-8"),  # one stray NUL in a tiny UTF-8 file is not UTF-16
    (b'{"q": "x\x00y"}\n' * 3, "UTF-8"),  # a NUL per line of a UTF-8 JSONL file
    ("instruction,output\nhi,there\n".encode("utf-16-le"), "UTF-16 LE"),
    ("instruction,output\nhi,there\n".encode("utf-16-be"), "UTF-16 BE"),
    (b"", "UTF-8"),
])
def test_utf16_without_a_mark_needs_a_nul_beside_many_characters(head, name):
    from app.data.formats import detect_encoding

    assert detect_encoding(head).name == name
