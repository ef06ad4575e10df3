"""Reading dataset files (JSON array, JSONL, CSV/TSV, Parquet) and hub datasets into numbered raw records, streaming.

Local files are parsed here rather than with `datasets.load_dataset`: its loaders stop at the first malformed
line without saying which, and cast mixed types to one column type, which would hide exactly the row-level
problems the Data tab reports. Hub datasets do go through `datasets`.

Text files are UTF-8, or UTF-16/UTF-32 recognised by a byte-order mark or by UTF-16's NUL bytes. Bytes of a UTF-8
file that are not valid UTF-8 are kept as lone surrogates (`surrogateescape`) so that the row holding them can be
named; the checks in `dataset` drop or repair every such value and column name before anything shows it.
"""
from __future__ import annotations

import codecs
import csv
import io
import json
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

SUFFIXES = {
    ".json": "json",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".csv": "csv",
    ".tsv": "tsv",
    ".parquet": "parquet",
    ".pq": "parquet",
}
FORMAT_NAMES = {"json": "JSON array", "jsonl": "JSONL", "csv": "CSV", "tsv": "TSV", "parquet": "Parquet", "hub": "hub dataset"}
PARQUET_MAGIC = b"PAR1"
# Lone surrogates are how `surrogateescape` decoding keeps the bytes that are not valid UTF-8; a JSON escape
# such as "\ud800" without its pair gives one too. Either cannot be written out as UTF-8.
_SURROGATE = re.compile("[\ud800-\udfff]")
_ESCAPED_SURROGATE = re.compile(r"\\u[dD][89a-fA-F]")
_BATCH = 4096  # Parquet rows per batch: bounded memory on huge files
# What json raises besides JSONDecodeError: RecursionError for lists or objects nested about a thousand deep,
# ValueError for an integer of more than 4300 digits.
PARSE_LIMITS = (RecursionError, ValueError)

csv.field_size_limit(sys.maxsize)  # long answers are legitimate; the default 128 KiB limit would reject them


@dataclass(frozen=True)
class TextEncoding:
    codec: str  # the Python codec that reads the file, its byte-order mark included
    name: str  # what the user is told, e.g. "UTF-16 LE"
    evidence: str = ""  # how it was recognised, for messages about a damaged file


UTF8 = TextEncoding("utf-8", "UTF-8")  # read as bytes, line by line, so a bad byte is found in its own row
_MARK = "it starts with a byte-order mark"
_BOMS = (  # UTF-32 first: its little-endian mark begins with UTF-16's
    (codecs.BOM_UTF32_LE, TextEncoding("utf-32", "UTF-32 LE", _MARK)),
    (codecs.BOM_UTF32_BE, TextEncoding("utf-32", "UTF-32 BE", _MARK)),
    (codecs.BOM_UTF8, UTF8),  # the UTF-8 readers skip the mark themselves
    (codecs.BOM_UTF16_LE, TextEncoding("utf-16", "UTF-16 LE", _MARK)),
    (codecs.BOM_UTF16_BE, TextEncoding("utf-16", "UTF-16 BE", _MARK)),
)
_NULS = "a NUL byte beside each ASCII character"
UTF16_LE = TextEncoding("utf-16-le", "UTF-16 LE", _NULS)
UTF16_BE = TextEncoding("utf-16-be", "UTF-16 BE", _NULS)


class DataFileError(Exception):
    """A file that cannot be read at all (missing, unknown format, broken structure): `data check` exits 2."""


@dataclass
class RawRecord:
    row: int  # 1-based number the user counts by; in a JSONL file it is the line number
    line: int | None  # line in the file where the record starts, when the format has lines
    data: Any  # the parsed record (normally a dict); None when it could not be parsed
    problem: str = ""  # "bad_json" | "bad_csv_row" when the record is broken, else ""
    detail: str = ""  # the parser's own words about the problem
    bad_utf8: bool = False  # some bytes were not valid UTF-8; they are kept as lone surrogates in the strings


def _limit_words(e: Exception) -> str:
    return "lists or objects nested too deeply to read" if isinstance(e, RecursionError) else str(e)


def has_bad_utf8(text: str) -> bool:
    return _SURROGATE.search(text) is not None


def replace_bad_utf8(text: str) -> str:
    """Each byte that was not valid UTF-8 (and each unpaired surrogate escape) becomes the replacement character �."""
    return _SURROGATE.sub("\ufffd", text)


def _may_hold_bad(text: str) -> bool:
    """Whether parsing `text` may give lone surrogates: bad bytes, or \\uD800-style escapes JSON turns into them."""
    return has_bad_utf8(text) or ("\\u" in text and _ESCAPED_SURROGATE.search(text) is not None)


def _damaged(encoding: TextEncoding, e: UnicodeDecodeError) -> DataFileError:
    return DataFileError(
        f"the file reads as {encoding.name} ({encoding.evidence}) but part of it is not valid {encoding.name} "
        f"({e.reason}); save it again as UTF-8 and load it again"
    )


def _decode(raw: bytes, encoding: TextEncoding = UTF8) -> tuple[str, bool]:
    """The text, and whether it may hold lone surrogates."""
    if encoding != UTF8:
        try:
            text = raw.decode(encoding.codec)
        except UnicodeDecodeError as e:
            raise _damaged(encoding, e) from None
        return text, _may_hold_bad(text)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("utf-8", "surrogateescape"), True
    return text, _may_hold_bad(text)


def _head(path: Path) -> bytes:
    with open(path, "rb") as f:
        return f.read(4096)


MIN_UTF16_NULS = 8  # a dataset's first line alone has more ASCII characters than this, each beside a NUL in UTF-16


def detect_encoding(head: bytes) -> TextEncoding:
    """A text file's encoding from its first bytes: a byte-order mark, else the NUL bytes UTF-16 puts beside every
    ASCII character (and every dataset has brackets, quotes, commas and column names), else UTF-8."""
    for bom, encoding in _BOMS:
        if head.startswith(bom):
            return encoding
    pairs = len(head) // 2
    even, odd = head[0:pairs * 2:2].count(0), head[1:pairs * 2:2].count(0)
    # at least MIN_UTF16_NULS as well as a share: one stray NUL in a tiny UTF-8 file is not a UTF-16 file
    if odd >= max(pairs / 4, MIN_UTF16_NULS) and even * 10 <= odd:
        return UTF16_LE
    if even >= max(pairs / 4, MIN_UTF16_NULS) and odd * 10 <= even:
        return UTF16_BE
    return UTF8


def file_encoding(path: Path) -> TextEncoding:
    return detect_encoding(_head(path))


@dataclass(frozen=True)
class BadByte:
    offset: int  # 0-based, from the start of the file
    line: int
    value: int


def first_bad_utf8_byte(path: Path) -> BadByte | None:
    """The first byte of the file that is not valid UTF-8, read in blocks (a dataset can be large)."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    read = lines = 0
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            read += len(block)
            try:
                decoder.decode(block)
            except UnicodeDecodeError as e:
                return _bad_byte(e, read, lines)
            lines += block.count(b"\n")
        try:
            decoder.decode(b"", final=True)
        except UnicodeDecodeError as e:
            return _bad_byte(e, read, lines)
    return None


def _bad_byte(e: UnicodeDecodeError, end: int, lines: int) -> BadByte:
    # e.object is the bytes the decoder still held (part of a character, never a newline) and then the block, which
    # ends at byte `end` of the file.
    return BadByte(end - len(e.object) + e.start, lines + e.object.count(b"\n", 0, e.start) + 1, e.object[e.start])


def detect_format(path: Path) -> str:
    """The format by file suffix, else by the first bytes (so `data.txt` holding JSONL still works)."""
    fmt = SUFFIXES.get(path.suffix.lower())
    if fmt:
        return fmt
    head = _head(path)
    if head.startswith(PARQUET_MAGIC):
        return "parquet"
    text = head.decode(detect_encoding(head).codec, "ignore")  # "ignore": the head may end inside a character
    first = text.lstrip("\ufeff \t\r\n")[:1]
    if first == "[":
        return "json"
    if first == "{":
        return "jsonl"
    if path.suffix.lower() == ".txt" and "," in text:
        return "csv"
    raise DataFileError(
        f"unknown file type {path.suffix or '(no suffix)'}; use a JSON array (.json), JSON lines "
        f"(.jsonl), CSV (.csv), TSV (.tsv) or Parquet (.parquet) file"
    )


def read_records(path: Path, fmt: str, encoding: TextEncoding = UTF8) -> Iterator[RawRecord]:
    """Records of a local file, one at a time; raises DataFileError when the file cannot be read at all."""
    if fmt == "parquet":
        return _read_parquet(path)
    if fmt == "tsv":
        return _read_csv(path, encoding, delimiter="\t")
    return {"json": _read_json, "jsonl": _read_jsonl, "csv": _read_csv}[fmt](path, encoding)


def _text_lines(path: Path, encoding: TextEncoding) -> Iterator[str]:
    """The file's lines with their line endings; UTF-8 keeps bad bytes as lone surrogates, other encodings are strict."""
    codec, errors = ("utf-8-sig", "surrogateescape") if encoding == UTF8 else (encoding.codec, "strict")
    with open(path, encoding=codec, errors=errors, newline="") as f:
        try:
            yield from f
        except UnicodeDecodeError as e:
            raise _damaged(encoding, e) from None


# --- JSON lines ------------------------------------------------------------------------------------------
def _read_jsonl(path: Path, encoding: TextEncoding) -> Iterator[RawRecord]:
    if encoding != UTF8:
        yield from _jsonl_records(_text_lines(path, encoding))
        return
    with open(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            if number == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]  # a byte-order mark left by some editors
            if raw.strip():
                yield _jsonl_record(number, *_decode(raw))


# --- a JSON array ----------------------------------------------------------------------------------------
def _read_json(path: Path, encoding: TextEncoding) -> Iterator[RawRecord]:
    # An array is read whole (its rows are only known once parsed); JSON lines are the format that streams.
    text, bad = _decode(path.read_bytes(), encoding)
    text = text.lstrip("\ufeff")
    start = _skip_ws(text, 0)
    if start == len(text):
        return
    if text[start] == "{":
        yield from _read_json_object(path, text, bad)
        return
    if text[start] != "[":
        raise DataFileError(f"a JSON dataset must start with '[' (a list of rows); it starts with {text[start]!r}")
    yield from _array_elements(path, text, start + 1, bad)


def _skip_ws(text: str, i: int) -> int:
    n = len(text)
    while i < n and text[i] in " \t\r\n":
        i += 1
    return i


def _array_elements(path: Path, text: str, i: int, bad: bool) -> Iterator[RawRecord]:
    """Elements one by one with raw_decode, so each row knows its line and a syntax error names its row."""
    decode = json.JSONDecoder().raw_decode
    line, counted_to, row = 1, 0, 0
    while True:
        i = _skip_ws(text, i)
        if i < len(text) and text[i] == "]":
            return
        row += 1
        line += text.count("\n", counted_to, i)
        counted_to = i
        try:
            obj, end = decode(text, i)
        except json.JSONDecodeError as e:
            where = f"line {e.lineno} column {e.colno}"
            if row == 1:
                raise DataFileError(f"not valid JSON at {where}: {e.msg}") from None
            yield RawRecord(row, line, None, "bad_json", f"{e.msg} at {where}; the rest of the file could not be read", bad)
            return
        except PARSE_LIMITS as e:
            if row == 1:
                raise DataFileError(f"not valid JSON at line {line}: {_limit_words(e)}") from None
            yield RawRecord(row, line, None, "bad_json", f"{_limit_words(e)}; the rest of the file could not be read", bad)
            return
        yield RawRecord(row, line, obj, bad_utf8=bad and _has_bad_value(obj))
        i = _skip_ws(text, end)
        if i < len(text) and text[i] == ",":
            i += 1
        elif i >= len(text) or text[i] != "]":
            line += text.count("\n", counted_to, i)
            counted_to = i
            yield RawRecord(row + 1, line, None, "bad_json", "expected ',' or ']' after the previous row; the rest of the file could not be read", bad)
            return


def _read_json_object(path: Path, text: str, bad: bool) -> Iterator[RawRecord]:
    """A single JSON object: either JSON lines saved as .json, or {"train": [...]}-style wrappers."""
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        if e.msg == "Extra data":  # several objects one after another: that is JSON lines
            # Lines end at "\n", "\r\n" or "\r", as in a .jsonl file (str.splitlines would also cut at U+2028, which
            # JSON allows inside a string).
            yield from _jsonl_records(io.StringIO(text, newline=None))
            return
        raise DataFileError(f"not valid JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
    except PARSE_LIMITS as e:
        raise DataFileError(f"not valid JSON: {_limit_words(e)}") from None
    lists = [k for k, v in obj.items() if isinstance(v, list) and v and all(isinstance(x, dict) for x in v[:10])]
    if len(lists) == 1:
        for row, rec in enumerate(obj[lists[0]], 1):
            yield RawRecord(row, None, rec, bad_utf8=bad and _has_bad_value(rec))
        return
    # One object with the row's own fields: a one-row dataset.
    yield RawRecord(1, 1, obj, bad_utf8=bad)


def _jsonl_records(lines: Iterable[str]) -> Iterator[RawRecord]:
    """JSON lines already decoded (UTF-16 files, JSON lines saved as .json)."""
    for number, line in enumerate(lines, 1):
        if line.strip():
            yield _jsonl_record(number, line, _may_hold_bad(line))


def _jsonl_record(number: int, text: str, bad: bool) -> RawRecord:
    """One line of a JSON lines file, parsed (or the reason it could not be)."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        return RawRecord(number, number, None, "bad_json", f"{e.msg} at column {e.colno}", bad)
    except PARSE_LIMITS as e:
        return RawRecord(number, number, None, "bad_json", _limit_words(e), bad)
    return RawRecord(number, number, data, bad_utf8=bad)


def _has_bad_value(obj: Any) -> bool:
    """Whether a parsed value holds a lone surrogate, in a string or in an object's key."""
    if isinstance(obj, str):
        return has_bad_utf8(obj)
    if isinstance(obj, dict):
        return any(has_bad_utf8(k) or _has_bad_value(v) for k, v in obj.items())
    if isinstance(obj, list):
        return any(_has_bad_value(v) for v in obj)
    return False


# --- CSV / TSV ---------------------------------------------------------------------------------------------
def _read_csv(path: Path, encoding: TextEncoding, delimiter: str = ",") -> Iterator[RawRecord]:
    reader = csv.reader(_text_lines(path, encoding), delimiter=delimiter)
    try:
        header = next(reader, None)
    except csv.Error as e:
        raise DataFileError(f"the header line is not valid CSV ({e})") from None
    if header is None:
        return
    header = [h.strip() for h in header]
    bad_header = has_bad_utf8("\x00".join(header))  # every row's column names then need repair
    row, previous_end = 0, reader.line_num
    while True:
        start = previous_end + 1
        try:
            fields = next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            yield RawRecord(row + 1, start, None, "bad_csv_row", f"{e}; the rest of the file could not be read")
            return
        previous_end = reader.line_num
        if not any(f.strip() for f in fields):
            continue
        row += 1
        bad = bad_header or has_bad_utf8("\x00".join(fields))
        if len(fields) > len(header):
            detail = f"it has {len(fields)} fields but the header has {len(header)}"
            yield RawRecord(row, start, None, "bad_csv_row", detail, bad)
            continue
        yield RawRecord(row, start, dict(zip(header, fields)), bad_utf8=bad)


# --- Parquet -----------------------------------------------------------------------------------------------
def _read_parquet(path: Path) -> Iterator[RawRecord]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        batches = pq.ParquetFile(path).iter_batches(batch_size=_BATCH)
    except (pa.ArrowException, OSError) as e:
        raise DataFileError(f"not a readable Parquet file ({e})") from None
    row = 0
    try:
        for batch in batches:
            for rec in batch.to_pylist():
                row += 1
                yield RawRecord(row, None, rec)
    except (pa.ArrowException, OSError) as e:
        raise DataFileError(f"the Parquet file is damaged after row {row} ({e})") from None


# --- hub datasets --------------------------------------------------------------------------------------------
def hub_offline() -> bool:
    # The environment is read too: huggingface_hub reads it only once, when first imported.
    from huggingface_hub import constants

    return os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE") or bool(constants.HF_HUB_OFFLINE)


def read_hub_records(name: str, split: str = "train") -> Iterator[RawRecord]:
    """Rows of a dataset on the Hugging Face hub (e.g. 'tatsu-lab/alpaca'), through the datasets library."""
    if hub_offline():
        raise DataFileError(
            f"cannot load {name!r}: this machine is offline (HF_HUB_OFFLINE is set). Download the dataset on a "
            f"machine with internet access, save it as JSON lines, CSV or Parquet, and upload that file here"
        )
    try:
        from datasets import load_dataset

        dataset = load_dataset(name, split=split)
    except Exception as e:  # noqa: BLE001 - network, auth, unknown name, bad split: all get the same advice
        raise DataFileError(
            f"could not load {name!r} (split {split!r}) from the hub: {type(e).__name__}: {e}. Check the name "
            f"(owner/dataset) and the split, or download it elsewhere and upload the file"
        ) from None
    for row, rec in enumerate(dataset, 1):
        yield RawRecord(row, None, rec)
