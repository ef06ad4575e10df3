"""Property-based tests: random and malformed dataset files, and random estimator inputs, give a result or a clear
error of the documented kind, never an uncaught exception."""
from __future__ import annotations

import csv
import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from app import methods
from app.data.dataset import DataError, DataReport, check_file, load_training_rows
from app.memory.estimate import EstimateError, EstimateInputs, MemoryEstimate, estimate_memory, every_method, format_table
from app.methods import MethodError
from app.models import ModelError
from app.spec import OPTIMIZERS, PRECISIONS

ROOT = Path(__file__).resolve().parent.parent
SUFFIXES = [".json", ".jsonl", ".csv", ".tsv", ".parquet", ".txt", ".ndjson", ""]
# derandomize: CI sees the same examples every time; deadline=None: the shared 2-core machine is slow at times.
FUZZ = dict(derandomize=True, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                     HealthCheck.too_slow, HealthCheck.data_too_large])

# --- values that end up in dataset rows ---------------------------------------------------------------------------
scalars = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=30),
    st.sampled_from(["", " ", "\n", "\ud800", "\x00", "ü" * 3, "🦜", '"', ",", "\\u0000"]),
)
json_values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)), max_leaves=12)
keys = st.sampled_from(["instruction", "input", "output", "prompt", "response", "question", "answer",
                        "conversations", "messages", "role", "content", "Instruction", "", " x"])
messages = st.lists(st.fixed_dictionaries({}, optional={
    "role": st.sampled_from(["user", "assistant", "system", "gpt", "human", "bot?", "", 3]),
    "from": st.sampled_from(["human", "gpt"]), "content": json_values, "value": json_values}), max_size=4)
texts = st.one_of(st.text(min_size=1, max_size=20), st.text(min_size=1, max_size=20), json_values)  # mostly text
alpaca = st.fixed_dictionaries({"instruction": texts, "output": texts}, optional={"input": texts, "extra": json_values})
rows = st.one_of(
    alpaca, alpaca,  # twice: most rows look right, so valid files and broken ones both come up
    st.dictionaries(keys, st.one_of(json_values, messages), max_size=5),
    st.fixed_dictionaries({"conversations": messages}),
    json_values,  # a row that is not an object at all
)


def encode(rows_: list, fmt: str, encoding: str) -> bytes:
    """The rows written as one file in `fmt`, in `encoding`; NaN and Infinity too, as some tools write them."""
    if fmt == "jsonl":
        text = "".join(json.dumps(r, ensure_ascii=False, allow_nan=True) + "\n" for r in rows_)
    elif fmt == "json":
        text = json.dumps(rows_, ensure_ascii=False, allow_nan=True, indent=1)
    elif fmt == "wrapped":
        text = json.dumps({"train": rows_, "meta": 1}, ensure_ascii=False, allow_nan=True)
    else:
        out = io.StringIO()
        writer = csv.writer(out, delimiter="\t" if fmt == "tsv" else ",")
        columns = sorted({str(k) for r in rows_ if isinstance(r, dict) for k in r}) or ["instruction"]
        writer.writerow(columns)
        for r in rows_:
            writer.writerow([json.dumps(r.get(c), ensure_ascii=False) if isinstance(r, dict) else str(r) for c in columns])
        text = out.getvalue()
    return text.encode(encoding, "surrogatepass" if encoding.startswith("utf") else "replace")


def mutate(data: bytes, cuts: list[tuple[int, bytes]]) -> bytes:
    """Damage the file: at each (position, junk) the junk replaces a few bytes (a truncated line, a stray quote ...)."""
    for pos, junk in cuts:
        if data:
            pos %= len(data)
            data = data[:pos] + junk + data[pos + len(junk) // 2 + 1:]
    return data


def assert_report(report: DataReport) -> None:
    """A report any caller can use: an exit code of the CLI's three, and text and JSON that can be written out."""
    assert isinstance(report, DataReport)
    assert report.exit_code in (0, 1, 2)
    assert report.usable == (report.exit_code == 0)
    assert report.kept == len(report.rows)
    for row in report.rows:
        assert set(row) == {"instruction", "input", "output"} and all(isinstance(v, str) for v in row.values())
        json.dumps(row, ensure_ascii=False).encode("utf-8")  # saved rows must be writable as UTF-8
    text = "\n".join(report.summary_lines())
    assert text
    # Valid UTF-8 everywhere: the page's JSON encoder refuses lone surrogates ("surrogates not allowed"), as does a
    # UTF-8 terminal.
    text.encode("utf-8")
    json.dumps(report.to_dict(), ensure_ascii=False).encode("utf-8")


def write(tmp_path: Path, name: str, data: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


@settings(max_examples=150, **FUZZ)
@given(data=st.binary(max_size=400), suffix=st.sampled_from(SUFFIXES))
def test_random_bytes_give_a_report(tmp_path, data, suffix):
    path = write(tmp_path, f"random{suffix}", data)
    for policy in ("drop", "fix"):
        assert_report(check_file(path, policy=policy))
    try:
        loaded = load_training_rows(path)
    except DataError as e:
        assert str(e)
    else:
        assert loaded


# --- structured files, then broken ----------------------------------------------------------------------------
structured = dict(
    rows_=st.lists(rows, max_size=6),
    fmt=st.sampled_from(["jsonl", "json", "wrapped", "csv", "tsv"]),
    encoding=st.sampled_from(["utf-8", "utf-8", "utf-8-sig", "utf-16", "latin-1", "cp1252"]),
    cuts=st.lists(st.tuples(st.integers(0, 10_000), st.sampled_from([b"", b"\n", b'"', b"{", b"]", b",", b"\xff\xfe",
                                                                      b"\x00", b"\xc3", b"\\u", b"\r"])), max_size=3),
    suffix=st.sampled_from(SUFFIXES),
)


@settings(max_examples=200, **FUZZ)
@given(**structured)
def test_malformed_dataset_files_give_a_report(tmp_path, rows_, fmt, encoding, cuts, suffix):
    suffix = {"wrapped": ".json"}.get(fmt, "." + fmt) if suffix == ".parquet" else suffix  # bytes are not Parquet
    path = write(tmp_path, f"rows{suffix}", mutate(encode(rows_, fmt, encoding), cuts))
    for policy in ("drop", "fix"):
        report = check_file(path, policy=policy)
        assert_report(report)
        event(f"{policy}: exit {report.exit_code}")


def test_valid_rows_survive_the_fuzzing_harness(tmp_path):
    """The harness is not vacuous: a clean Alpaca file written by it is usable and every row is kept."""
    good = [{"instruction": f"q{i}", "input": "", "output": f"a{i}"} for i in range(3)]
    for fmt in ("jsonl", "json", "wrapped", "csv", "tsv"):
        suffix = {"wrapped": ".json"}.get(fmt, "." + fmt)
        if fmt in ("csv", "tsv"):
            data = encode([{k: v for k, v in r.items()} for r in good], fmt, "utf-8")
            data = data.replace(b'"', b"")  # plain strings, not JSON strings, in a CSV
        else:
            data = encode(good, fmt, "utf-8")
        report = check_file(write(tmp_path, f"good-{fmt}{suffix}", data))
        assert report.exit_code == 0 and report.kept == 3, (fmt, report.summary_lines())


@pytest.mark.parametrize("name, data", [
    ("deep.json", b"[" * 200_000 + b"]" * 200_000),  # nesting deeper than Python's recursion limit
    ("deep.jsonl", b'{"instruction": ' + b"[" * 200_000 + b"]" * 200_000 + b', "output": "a"}\n'),
    ("deep-object.json", b'{"x": ' + b"[" * 200_000 + b"]" * 200_000 + b"}"),
    ("huge-number.jsonl", b'{"instruction": "a", "output": ' + b"9" * 5000 + b"}\n"),
    ("huge-field.jsonl", b'{"instruction": "' + b"a" * 3_000_000 + b'", "output": "b"}\n'),
    ("nul.csv", b"instruction,output\nq\x00,a\n"),
    ("utf16.jsonl", '{"instruction": "q", "output": "a"}\n'.encode("utf-16")),
    ("lone-surrogate.jsonl", b'{"instruction": "\\ud800", "output": "a"}\n'),
    ("not-a-list.json", b'"just a string"'),
    ("scalar-lines.jsonl", b"1\nnull\n[]\n\"x\"\n"),
    ("wide.csv", b"instruction,output\n" + b"a," * 100_000 + b"\n"),
    ("parquet-magic.parquet", b"PAR1" + b"\x00" * 64 + b"PAR1"),
    ("only-bom.jsonl", b"\xef\xbb\xbf"),
])
def test_pathological_files_give_a_report(tmp_path, name, data):
    assert_report(check_file(write(tmp_path, name, data)))


@pytest.mark.parametrize("source", ["", ".", "/", "/dev/null", "no/such/file.jsonl", "hub:", "hub:x/y:z", "\x00bad"])
def test_odd_paths_give_a_report(source):
    report = check_file(source)
    assert_report(report)
    assert report.exit_code == 2


# --- the CLI ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name, data, args, codes", [
    ("bad.jsonl", b'{"instruction": "\xff\xfe", "output": 1}\n{broken\n', ["--json"], {1}),
    ("bad.jsonl", b'{"instruction": "\\ud800 x", "output": "y"}\n', ["--policy", "fix"], {0}),
    ("bad.jsonl", b'{"instruction": "\\ud800 x", "output": "y"}\n', ["--json"], {1}),
    ("random.csv", bytes(range(256)) * 3, [], {1, 2}),
    ("deep.json", b"[" * 100_000, ["--json"], {2}),
])
def test_data_check_cli_exits_with_a_code_not_a_traceback(tmp_path, name, data, args, codes):
    path = write(tmp_path, name, data)
    done = subprocess.run([sys.executable, str(ROOT / "launch.py"), "data", "check", str(path), "--cutoff", "0", *args],
                          capture_output=True, cwd=ROOT, timeout=120)
    assert "Traceback" not in done.stderr.decode("utf-8", "replace"), done.stderr.decode("utf-8", "replace")
    assert done.returncode in codes, (done.returncode, done.stdout[-500:], done.stderr[-500:])
    if "--json" in args:
        json.loads(done.stdout)


# --- the memory estimator -------------------------------------------------------------------------------------
ESTIMATE_ERRORS = (EstimateError, MethodError, ModelError)
BUNDLED = sorted(p.stem for p in (ROOT / "app" / "model_configs").glob("*.json"))
weird = st.one_of(st.none(), st.booleans(), st.floats(allow_nan=True), st.text(max_size=6), st.lists(st.integers(), max_size=2))
bad_whole = st.one_of(st.integers(-(2**63), 0), st.integers(4097, 2**63), st.floats(allow_nan=True), weird)


def mostly(valid, bad):
    """Valid seven times in eight: with several fields drawn, a good share of the inputs reach the estimate itself.
    (st.one_of would flatten `bad`'s own branches and pick among all of them alike.)"""
    return st.integers(0, 7).flatmap(lambda n: bad if n == 0 else valid)


def knob_values(method: str):
    knobs = methods.METHODS[method].knobs() if method in methods.METHODS else ["r"]
    value = st.one_of(st.integers(-2, 300), st.floats(-1, 2), bad_whole,
                      st.sampled_from(["attention", "all-linear", "q_proj,v_proj", "nope", "", "nf4", "fp4", "bf16",
                                       "after", "parallel", 4, 8, 3, True, False]))
    return st.dictionaries(st.sampled_from(knobs + ["bogus"]), value, max_size=2)


@st.composite
def estimate_inputs(draw, tiny: str):
    method = draw(mostly(st.sampled_from(list(methods.METHODS)), st.sampled_from(["LoRA", "", "nope", None, 3])))
    models = [f"config:{n}" for n in BUNDLED] + [tiny]
    return EstimateInputs(
        model=draw(mostly(st.sampled_from(models), st.sampled_from(["config:nope", "config:", "/no/such/dir", ""]))),
        method=method,
        method_args=draw(mostly(st.one_of(st.just({}), knob_values(method)), weird)),
        batch_size=draw(mostly(st.integers(1, 64), bad_whole)),
        seq_len=draw(mostly(st.integers(1, 1 << 20), bad_whole)),
        grad_accum=draw(mostly(st.integers(1, 64), bad_whole)),
        precision=draw(mostly(st.sampled_from(PRECISIONS), st.sampled_from(["fp8", "", None, 16]))),
        optimizer=draw(mostly(st.sampled_from(OPTIMIZERS), st.sampled_from(["adam", None]))),
        grad_checkpointing=draw(mostly(st.booleans(), weird)),
        attention=draw(mostly(st.sampled_from(["sdpa", "eager"]), st.sampled_from(["flash", None]))),
    )


def check_estimate(inputs: EstimateInputs) -> MemoryEstimate | None:
    try:
        estimate = estimate_memory(inputs)
    except ESTIMATE_ERRORS as e:
        assert str(e), f"{type(e).__name__} without a message for {inputs}"
        event(type(e).__name__)  # --hypothesis-show-statistics shows how often each outcome came up
        return None
    event("estimate")
    assert estimate.gpu.total_bytes > 0 and estimate.cpu.total_bytes > 0
    assert all(t.bytes >= 0 for bd in (estimate.gpu, estimate.cpu) for t in bd.terms), estimate
    assert 0 <= estimate.trainable <= estimate.total_params  # 0: BitFit on a model without biases
    assert format_table(estimate)
    json.dumps(estimate.to_dict())
    return estimate


@pytest.fixture(scope="module")
def tiny_ref(tiny_model_dir) -> str:
    return str(tiny_model_dir)


@settings(max_examples=300, **FUZZ)
@given(data=st.data())
def test_estimator_gives_a_result_or_a_clear_error(tiny_ref, models_dir, data):
    inputs = data.draw(estimate_inputs(tiny_ref))
    check_estimate(EstimateInputs(**{**inputs.__dict__, "models_dir": str(models_dir)}))


@settings(max_examples=40, **FUZZ)
@given(data=st.data())
def test_every_method_never_raises_on_valid_shapes(tiny_ref, models_dir, data):
    """The Method tab's all-methods chart: valid batch and length, any model; every method either fits or is left out."""
    model = data.draw(st.sampled_from([f"config:{n}" for n in BUNDLED] + [tiny_ref]))
    inputs = EstimateInputs(model=model, batch_size=data.draw(st.integers(1, 64)), seq_len=data.draw(st.integers(1, 8192)),
                            method_args=data.draw(st.fixed_dictionaries({}, optional={"r": st.integers(1, 256)})),
                            models_dir=str(models_dir))
    estimates = every_method(inputs)
    assert {e.inputs.method for e in estimates} >= {"full", "lora"}
