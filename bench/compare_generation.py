"""Benchmark: base + two LoRA adapters answer the same prompts (a) base alone in one batch, (b) one pane after another,
(c) the Compare tab's side-by-side path; prints medians of alternating rounds, the ratios, and time to first token.

    HF_HUB_OFFLINE=1 nice -n 10 .venv/bin/python bench/compare_generation.py [--tokens 20] [--rounds 5]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The scratch workspace shares the converted embedded model rather than converting it again.
os.environ.setdefault("WORKBENCH_MODELS_DIR", str(ROOT / "workspace" / "models"))

PROMPTS = [  # each asks for a long answer, so that every row really generates --tokens tokens
    "Write a short story about a lighthouse keeper.",
    "Explain how a bicycle works, step by step.",
    "Give me ten tips for sleeping well, with a sentence on each.",
]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=20, help="new tokens per row")
    parser.add_argument("--rounds", type=int, default=5, help="rounds; the ways alternate within each round")
    parser.add_argument("--threads", type=int, default=0, help="torch threads for every way (default: what the app uses)")
    args = parser.parse_args()

    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from app.chat import panes as chat
    from app.chat.cache import Loaded, LoadedModel, ModelCache, cpu_threads
    from app.chat.generate import Sampling, generate
    from app.models import EMBEDDED, resolve_model
    from app.runs.store import RunStore
    from app.data.template import chat_prompt
    from app.workspace import Workspace
    from lora_runs import save_lora_run

    workspace = Workspace.open(tempfile.mkdtemp(prefix="compare-bench-"))
    base_dir = resolve_model(EMBEDDED, workspace.models)
    store = RunStore(workspace.runs)
    for run_id, r, seed in (("lora-r8", 8, 1), ("lora-r16", 16, 2)):
        save_lora_run(store, base_dir, EMBEDDED, run_id, r, seed, scale=0.05)
    panes = chat.resolve_panes(workspace, EMBEDDED, ["lora-r8", "lora-r16"])

    # Each way gets its own copy of the weights so that none sees another's hooks or adapters.
    threads = args.threads or cpu_threads()
    fast = ModelCache(threads=threads).load(workspace, EMBEDDED, panes)
    peft_layers = ModelCache(fast_lora=False, threads=threads).load(workspace, EMBEDDED, panes)
    unpacked = ModelCache(threads=threads, pack_weights=False).load(workspace, EMBEDDED, panes)
    torch.set_num_threads(threads)  # the same for the transformers and peft ways
    tokenizer = fast.tokenizer
    plain = AutoModelForCausalLM.from_pretrained(base_dir).eval()
    sequential = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(base_dir), store.final_dir("lora-r8"), adapter_name="r8"
    )
    sequential.load_adapter(str(store.final_dir("lora-r16")), adapter_name="r16")
    sequential.eval()

    texts = [chat_prompt(tokenizer, [(p, None)]) for p in PROMPTS]
    tokenizer.padding_side = "left"
    batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    hf = dict(max_new_tokens=args.tokens, min_new_tokens=args.tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    batch_of_one = [tokenizer([text], return_tensors="pt", add_special_tokens=False) for text in texts]
    sampling = Sampling(max_new_tokens=args.tokens, temperature=0)
    rows = [(pane.key, text) for pane, text in zip(panes, texts)]
    results: dict[str, list[str]] = {}
    first_tokens: list[list[float]] = []

    def base_alone_generate():
        with torch.inference_mode():
            plain.generate(**batch, **hf)

    def one_after_another():
        outs = []
        with torch.inference_mode():
            for adapter, one in zip([None, "r8", "r16"], batch_of_one):
                if adapter is None:
                    with sequential.disable_adapter():
                        ids = sequential.generate(**one, **hf)
                else:
                    sequential.set_adapter(adapter)
                    ids = sequential.generate(**one, **hf)
                outs.append(tokenizer.decode(ids[0, one["input_ids"].shape[1]:], skip_special_tokens=True))
        results["one after another"] = outs

    def peft_mixed_generate():
        with torch.inference_mode():
            sequential.generate(**batch, **hf, adapter_names=["__base__", "r8", "r16"])

    def side_by_side(loaded, name):
        def run():
            for outputs in generate(loaded, rows, sampling):
                pass
            results[name] = [o.text for o in outputs]
            if name == "side by side":
                first_tokens.append([o.first_token_s for o in outputs])
            counts = {o.tokens for o in outputs}
            assert counts == {args.tokens}, f"{name}: a row stopped early ({counts}); use longer prompts"
        return run

    alone = Loaded(tokenizer, panes[:1], {chat.BASE: (LoadedModel(plain, 1 << 30), chat.BASE)})
    base_rows = [(chat.BASE, text) for text in texts]

    def base_alone_loop():
        for outputs in generate(alone, base_rows, sampling):
            pass

    ways = {
        "(a) base alone, 3 rows in one batch (HF generate)": base_alone_generate,
        "(a) base alone, 3 rows in one batch (this loop)": base_alone_loop,
        "(b) three panes one after another (HF generate)": one_after_another,
        "peft mixed-adapter batch (HF generate)": peft_mixed_generate,
        "this loop with peft's mixed-batch layers": side_by_side(peft_layers, "peft layers"),
        "this loop, one-shot LoRA, weights not pre-packed": side_by_side(unpacked, "unpacked"),
        "(c) side by side (this project)": side_by_side(fast, "side by side"),
    }
    for way in ways.values():  # warm-up, not timed: first touches of each copy's weights page them in
        way()
    first_tokens.clear()
    times: dict[str, list[float]] = {name: [] for name in ways}
    names = list(ways)
    for round_no in range(args.rounds):
        # Rotate the order each round: a neighbour's job on this shared machine then hits every way alike.
        for name in names[round_no % len(names):] + names[:round_no % len(names)]:
            start = time.perf_counter()
            ways[name]()
            times[name].append(time.perf_counter() - start)

    # Ratios are taken within each round (the ways ran back to back there), then the median over rounds.
    a = times["(a) base alone, 3 rows in one batch (HF generate)"]
    b = times["(b) three panes one after another (HF generate)"]
    print(f"{args.tokens} new tokens per row, embedded model, LoRA r=8 and r=16 on all linear layers, "
          f"{args.rounds} rounds, torch threads {torch.get_num_threads()}, {os.cpu_count()} CPUs")
    print(f"{'way':52s} {'median s':>9s} {'x (a)':>6s} {'x (b)':>6s}   all rounds (s)")
    for name, t in times.items():
        to_a = statistics.median(x / y for x, y in zip(t, a))
        to_b = statistics.median(x / y for x, y in zip(t, b))
        print(f"{name:52s} {statistics.median(t):9.2f} {to_a:6.2f} {to_b:6.2f}   " + " ".join(f"{x:.2f}" for x in t))
    ttft = [statistics.median(p[i] for p in first_tokens) for i in range(len(panes))]
    print("time to first token per pane (median s): " + ", ".join(f"{p.key} {t:.2f}" for p, t in zip(panes, ttft)))
    same = results["side by side"] == results["one after another"]
    print(f"greedy texts of (c) equal each pane generated alone: {same}")
    print(f"greedy texts with peft's layers equal the fast path: {results['peft layers'] == results['side by side']}")
    print(f"greedy texts on unpacked weights equal the fast path: {results['unpacked'] == results['side by side']}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
