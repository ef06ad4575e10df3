"""Data tab speed and memory: a 52,000-row Alpaca JSON file through load, validation, preview and token count, and a
1,000,000-row JSONL file checked by `launch.py data check` in a fresh process (peak RSS).

    nice -n 10 .venv/bin/python bench/data_load.py [--big-rows 1000000] [--skip-big]
"""
from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

WORDS = (
    "the model data answer write explain list three simple ways water light energy city river history music plant "
    "garden recipe travel budget email letter story poem summary reason people small large quick careful friendly "
    "short long first second science number table chart school teacher student market price weather morning night "
    "health sleep walk coffee bread language word sentence paragraph question idea problem solution example team"
).split()


def sentence(rng: random.Random, low: int, high: int) -> str:
    words = rng.choices(WORDS, k=rng.randint(low, high))
    return " ".join(words).capitalize() + "."


def alpaca_row(rng: random.Random) -> dict[str, str]:
    """Lengths shaped like Alpaca's: a short instruction, an input in about 40% of rows, a longer answer."""
    return {
        "instruction": sentence(rng, 5, 20),
        "input": sentence(rng, 3, 25) if rng.random() < 0.4 else "",
        "output": " ".join(sentence(rng, 5, 18) for _ in range(rng.randint(1, 6))),
    }


def write_alpaca_json(path: Path, rows: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    path.write_text(json.dumps([alpaca_row(rng) for _ in range(rows)], indent=1), encoding="utf-8")


def write_big_jsonl(path: Path, rows: int, seed: int = 1) -> None:
    """Mostly valid rows plus one bad row in every 1,000 (empty output, number, bad JSON) so findings are exercised."""
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as f:
        for i in range(rows):
            row = alpaca_row(rng)
            if i % 1000 == 7:
                f.write('{"instruction": "broken line", "output": \n')
                continue
            if i % 1000 == 500:
                row["output"] = ""
            f.write(json.dumps(row) + "\n")


def bench_52k(folder: Path, rows: int) -> dict[str, float]:
    from app.data.dataset import check_file
    from app.data.tokens import Templater, encode_lengths, load_tokenizer, token_stats
    from app.data.template import render
    from app.workspace import Workspace
    from app.data.store import preview_rows

    path = folder / "alpaca-52k.json"
    write_alpaca_json(path, rows)
    models_dir = str(Workspace.open(ROOT / "workspace").models)
    tokenizer = load_tokenizer("embedded", models_dir)
    times: dict[str, float] = {"file MB": path.stat().st_size / 1e6}

    t = time.perf_counter()
    plain = check_file(path)
    times["load + validate (s)"] = time.perf_counter() - t
    assert plain.kept == rows, plain.verdict()

    t = time.perf_counter()
    report = check_file(path, tokenizer=tokenizer, cutoff=256)
    times["load + validate + token count, one pass (s)"] = time.perf_counter() - t

    t = time.perf_counter()
    preview_rows(report.rows, report.row_numbers)
    render(tokenizer, report.rows[123])
    times["preview table + one rendered row (s)"] = time.perf_counter() - t

    t = time.perf_counter()
    stats = token_stats(report.lengths, 256)
    times["token stats (s)"] = time.perf_counter() - t
    times["total: what the Data tab does on upload (s)"] = (
        times["load + validate + token count, one pass (s)"]
        + times["preview table + one rendered row (s)"]
        + times["token stats (s)"]
    )

    # Side by side: one Jinja render per row against the probe-and-fill Templater, on the same 5,000 rows.
    sample = report.rows[:5000]
    t = time.perf_counter()
    for r in sample:
        render(tokenizer, r)
    slow = time.perf_counter() - t
    t = time.perf_counter()
    Templater(tokenizer).render(sample)
    fast = time.perf_counter() - t
    times["templating 5,000 rows: render() per row (s)"] = slow
    times["templating 5,000 rows: Templater (s)"] = fast

    # Side by side: counting prompt tokens with tokenizer() per batch, the Rust batch call, and the Rust batch call
    # with the shared system-prompt head counted once (what the Data tab does).
    templater = Templater(tokenizer)
    prompts, _ = templater.render(sample)
    t = time.perf_counter()
    tokenizer(prompts, add_special_tokens=False)
    times["prompt tokens of 5,000 rows: tokenizer(list) (s)"] = time.perf_counter() - t
    t = time.perf_counter()
    encode_lengths(tokenizer, prompts)
    times["prompt tokens of 5,000 rows: encode_batch_fast (s)"] = time.perf_counter() - t
    t = time.perf_counter()
    templater.prompt_lengths(prompts)
    times["prompt tokens of 5,000 rows: encode_batch_fast, shared head once (s)"] = time.perf_counter() - t
    times["rows / tokens / truncated"] = f"{stats.rows:,} / {stats.total:,} / {stats.truncated:,}"
    return times


# Runs the check in a child of its own and reports that child's peak RSS (RUSAGE_CHILDREN covers only it).
PROBE = """
import json, resource, subprocess, sys, time
t = time.perf_counter()
done = subprocess.run(sys.argv[1:], capture_output=True, text=True)
print(json.dumps({"code": done.returncode, "report": done.stdout, "wall": time.perf_counter() - t,
                  "peak_kib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}))
"""


def check_in_fresh_process(path: Path, *options: str) -> tuple[dict, int, float, float]:
    """(report, exit code, wall seconds, peak RSS in MB) of `launch.py data check` run as its own process."""
    cmd = [sys.executable, str(ROOT / "launch.py"), "data", "check", str(path), "--json", *options]
    done = json.loads(subprocess.run([sys.executable, "-c", PROBE, *cmd], capture_output=True, text=True, cwd=ROOT).stdout)
    return json.loads(done["report"]), done["code"], done["wall"], done["peak_kib"] / 1024  # KiB on Linux


def bench_big(folder: Path, rows: int) -> dict[str, float]:
    path = folder / "big.jsonl"
    write_big_jsonl(path, rows)
    figures: dict[str, float] = {"file MB": path.stat().st_size / 1e6}
    for label, options in (("rows and fields only (--cutoff 0)", ("--cutoff", "0")), ("with the length check (cutoff 256)", ())):
        report, code, wall, peak = check_in_fresh_process(path, *options)
        figures[f"{label}: kept / left out / exit code"] = f"{report['kept']:,} / {report['dropped']:,} / {code}"
        figures[f"{label}: wall time (s)"] = wall
        figures[f"{label}: peak RSS (MB)"] = peak
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=52_000)
    parser.add_argument("--big-rows", type=int, default=1_000_000)
    parser.add_argument("--skip-big", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        print(f"## {args.rows:,}-row Alpaca JSON (cutoff 256, embedded SmolLM2 tokenizer)")
        for name, value in bench_52k(Path(tmp), args.rows).items():
            print(f"| {name} | {value:.2f} |" if isinstance(value, float) else f"| {name} | {value} |")
        if not args.skip_big:
            print(f"\n## {args.big_rows:,}-row JSONL, `launch.py data check FILE --json` in a fresh process")
            for name, value in bench_big(Path(tmp), args.big_rows).items():
                print(f"| {name} | {value:.1f} |" if isinstance(value, float) else f"| {name} | {value} |")


if __name__ == "__main__":
    main()
