"""Training speed: this project's worker against TRL's SFTTrainer + PEFT on the same rows, model, method and settings.

Both sides train the embedded SmolLM2-135M with LoRA r=8 on all linear layers, batch 4, cutoff 256, one epoch of
the same 32 Alpaca-style rows in the same order (TRL reads them pre-tokenized with a completion mask, so the tokens
and the labelled positions are identical), gradient checkpointing off on both. The two alternate in one process
(ours, TRL, TRL, ours, ...) so that other load on a shared machine hits both alike. Both are timed over their
training loop (model loading excluded), in wall time and in CPU time of the process: on a shared machine the CPU
seconds a run used are the steadier figure. Printed: real (non-padding) tokens per second of each run, validation
loss on 8 held-out rows after the epoch (one function scores both, and the untrained model), and last, the ratio.
On the CPU our worker draws its LoRA dropout masks with app.training.fast_lora (same drop probability, other random draws
than peft's nn.Dropout), so the two validation losses agree closely rather than to the last digit.

    HF_HUB_OFFLINE=1 nice -n 5 .venv/bin/python bench/train_throughput.py [--rounds 2] [--threads N] [--warmup-rows N]
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path
from statistics import median

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

TOPICS = ["photosynthesis", "the water cycle", "compound interest", "binary search", "the French Revolution",
          "volcanoes", "vaccines", "black holes", "recycling", "the stock market", "machine learning",
          "the human heart", "climate change", "the printing press", "electric cars", "honey bees"]
ASKS = ["Explain {t} in simple terms.", "Summarize what is known about {t}.", "Give three facts about {t}.",
        "Write a short paragraph on {t} for a school newsletter.", "Why does {t} matter?",
        "Describe {t} to someone who has never heard of it."]
SENTENCES = [
    "{T} matters because it shapes how people live, work and plan for the future.",
    "A simple way to picture {t} is to follow one small step at a time and ask what changes.",
    "Experts often point out that {t} has both clear benefits and real costs that are easy to miss.",
    "Many students first meet {t} in school, but the idea stays useful long after the exam.",
    "The history of {t} shows how ideas change when new evidence appears and old guesses fail.",
    "One common mistake is to think that {t} only matters to specialists working in a lab.",
    "If you remember one thing about {t}, remember that small details add up over time.",
    "Scientists still debate parts of {t}, which is a sign that the field is alive and growing.",
    "A good example of {t} can be found in everyday life, often in places we do not expect.",
    "Learning about {t} takes patience, but each new fact makes the next one easier to grasp.",
]


def alpaca_rows(n: int, seed: int) -> list[dict]:
    """Instruction rows averaging about 170 tokens in SmolLM2's chat format (no data set download needed). Answer
    lengths spread like Alpaca's (log-normal: many short answers, a few long ones cut at the cutoff), because
    how much a padded batch wastes depends on that spread."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        t = rng.choice(TOPICS)
        sentences = max(1, round(rng.lognormvariate(1.85, 0.75)))
        answer = " ".join(rng.choice(SENTENCES).format(t=t, T=t[0].upper() + t[1:]) for _ in range(sentences))
        extra = f"The reader is {rng.choice(['a beginner', 'a teenager', 'an engineer', 'a busy manager'])}." if i % 3 == 0 else ""
        rows.append({"instruction": rng.choice(ASKS).format(t=t), "input": extra, "output": answer})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def run_ours(model_dir: Path, train_file: Path, val_file: Path, settings: dict, work: Path) -> dict:
    """Through the real worker (`launch.py train` in-process), timed from its "training" line to its last step line,
    as TRL is timed from on_train_begin to on_train_end."""
    from app.runs.store import RunStore
    from app.spec import RunConfig
    from app.training.worker import run_training
    from app.workspace import Workspace

    store = RunStore(Workspace.open(work / f"ws-{time.time_ns()}").runs)
    config = RunConfig(model=str(model_dir), dataset=str(train_file), val_dataset=str(val_file), method="lora",
                       method_args={"r": 8, "alpha": 16, "dropout": 0.05, "targets": "all-linear"},
                       save_every=0, eval_every=0, **settings)
    run_id = store.create(config)
    marks = []
    code = run_training(store.config_path(run_id), echo=lambda line: marks.append((line, Clock.now())))
    if code != 0:
        raise SystemExit(f"our trainer failed: {store.status(run_id).reason}")
    start = next(t for line, t in marks if line.startswith("training "))
    end = [t for line, t in marks if line.startswith("step ")][-1]
    records = store.metrics(run_id)
    return {"tokens": [r for r in records if "loss" in r][-1]["tokens"], "clock": Clock.between(start, end),
            "eval_loss": [r for r in records if "eval_loss" in r][-1]["eval_loss"]}


class Clock:
    """Wall time, and CPU time of this process: on a shared machine the CPU seconds a run needed are steadier
    than its wall time (with one thread they are what it would take alone)."""

    @staticmethod
    def now() -> tuple[float, float]:
        return time.perf_counter(), time.process_time()

    @staticmethod
    def between(start: tuple[float, float], end: tuple[float, float]) -> tuple[float, float]:
        return end[0] - start[0], end[1] - start[1]


def run_trl(model_dir: Path, examples, val_batches, settings: dict, work: Path, pad_id: int) -> dict:
    """TRL's SFTTrainer with PEFT, its defaults except: same rows and order, same hyper-parameters, no checkpointing."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from app.objectives import get_objective
    from app.training.worker import evaluate

    class Timer(TrainerCallback):
        def on_train_begin(self, *a, **k):
            self.start = Clock.now()

        def on_train_end(self, *a, **k):
            self.clock = Clock.between(self.start, Clock.now())

    data = Dataset.from_list([
        {"input_ids": e.input_ids, "completion_mask": [0] + [int(t != -100) for t in e.targets[:-1]]} for e in examples
    ])
    cuda = torch.cuda.is_available()
    args = SFTConfig(
        output_dir=str(work / f"trl-{time.time_ns()}"), per_device_train_batch_size=settings["batch_size"],
        num_train_epochs=settings["epochs"], learning_rate=settings["learning_rate"], lr_scheduler_type="cosine",
        warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0, max_length=settings["cutoff_len"], seed=settings["seed"],
        gradient_checkpointing=False, completion_only_loss=True, train_sampling_strategy="sequential",
        save_strategy="no", report_to="none", use_cpu=not cuda, bf16=cuda, disable_tqdm=True,
    )
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa")
    timer = Timer()
    trainer = SFTTrainer(
        model=model, args=args, train_dataset=data, processing_class=AutoTokenizer.from_pretrained(model_dir),
        peft_config=LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, target_modules="all-linear", task_type="CAUSAL_LM"),
        callbacks=[timer],
    )
    trainer.train()
    device = next(trainer.model.parameters()).device
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else None
    tokens = sum(len(e.input_ids) for e in examples)
    return {"tokens": tokens, "clock": timer.clock,
            "eval_loss": evaluate(trainer.model, val_batches, get_objective("sft"), packed=False, device=device, pad_id=pad_id, autocast=autocast)}


def base_validation_loss(model_dir: Path, val_batches, pad_id: int) -> float:
    """The untrained model's score on the same rows: both trained models must move away from it."""
    import torch
    from transformers import AutoModelForCausalLM

    from app.objectives import get_objective
    from app.training.worker import evaluate

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return evaluate(model.to(device), val_batches, get_objective("sft"), packed=False, device=device, pad_id=pad_id)


def main() -> None:
    from app.training.hardware import cpu_threads

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2, help="pairs of runs (each side trains once per round)")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads for both sides (0: the idle cores now)")
    parser.add_argument("--rows", type=int, default=32)
    parser.add_argument("--warmup-rows", type=int, default=-1,
                        help="rows both sides train once, untimed, before the rounds (default: 16 on a GPU, 0 on CPU)")
    args = parser.parse_args()

    threads = args.threads or cpu_threads()
    os.environ["OMP_NUM_THREADS"] = str(threads)  # before torch loads; our worker then leaves the count alone
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    from app.models import EMBEDDED, resolve_model
    from app.objectives.batches import pack
    from app.objectives.sft import tokenize_rows
    from app.training.plan import DataPlan, batches_of
    from app.spec import RunConfig
    from app.workspace import Workspace

    torch.set_num_threads(threads)
    hf_logging.set_verbosity_error()
    if args.warmup_rows < 0:
        args.warmup_rows = 16 if torch.cuda.is_available() else 0
    model_dir = resolve_model(EMBEDDED, Workspace.open().models)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    settings = dict(batch_size=4, cutoff_len=256, learning_rate=2e-4, epochs=1.0, seed=42, precision="auto",
                    scheduler="cosine", optimizer="adamw", grad_checkpointing=False)
    if torch.cuda.is_available():
        settings["precision"] = "bf16-mixed"  # TRL's bf16=True: fp32 weights, bf16 autocast

    work = Path(tempfile.mkdtemp(prefix="train-bench-"))
    train_rows, val_rows = alpaca_rows(args.rows, seed=1), alpaca_rows(8, seed=2)
    train_file, val_file = write_jsonl(work / "train.jsonl", train_rows), write_jsonl(work / "val.jsonl", val_rows)
    examples = tokenize_rows(tokenizer, train_rows, settings["cutoff_len"], False)
    # TRL gets the rows in the exact order our worker draws them for epoch 0
    plan = DataPlan(examples, RunConfig(dataset="x", **settings), pack)
    ordered = [e for b in plan.epoch_batches(0) for e in b.examples]
    val_batches = batches_of(tokenize_rows(tokenizer, val_rows, settings["cutoff_len"], False), settings["batch_size"], pack)
    n_tokens = sum(len(e.input_ids) for e in examples)
    base_loss = base_validation_loss(model_dir, val_batches, tokenizer.pad_token_id)
    lengths = sorted(len(e.input_ids) for e in examples)
    print(f"{len(examples)} rows, {n_tokens} tokens ({sum(e.n_targets for e in examples)} in responses; rows of "
          f"{lengths[0]}-{lengths[-1]} tokens, median {lengths[len(lengths) // 2]}); "
          f"batch {settings['batch_size']}, cutoff {settings['cutoff_len']}, LoRA r=8 all-linear; "
          f"device {'cuda' if torch.cuda.is_available() else 'cpu'}, {threads} CPU threads, load {os.getloadavg()[0]:.2f}",
          flush=True)

    cuda = torch.cuda.is_available()
    if args.warmup_rows:  # one-off costs (CUDA context, kernel loading, autotuning) paid before any timing
        warm_rows = alpaca_rows(args.warmup_rows, seed=3)
        warm_file = write_jsonl(work / "warmup.jsonl", warm_rows)
        warm = tokenize_rows(tokenizer, warm_rows, settings["cutoff_len"], False)
        run_ours(model_dir, warm_file, val_file, settings, work)
        run_trl(model_dir, warm, val_batches, settings, work, tokenizer.pad_token_id)
        print(f"warm-up: both sides trained {args.warmup_rows} other rows once, untimed", flush=True)
    results = {"ours": [], "trl": []}
    for r in range(args.rounds):
        for side in (["ours", "trl"] if r % 2 == 0 else ["trl", "ours"]):
            if cuda:  # each side's own peak: the other side's model is gone by now
                gc.collect()
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            if side == "ours":
                res = run_ours(model_dir, train_file, val_file, settings, work)
            else:
                res = run_trl(model_dir, ordered, val_batches, settings, work, tokenizer.pad_token_id)
            wall, cpu = res["clock"]
            res["tokens_per_s"], res["tokens_per_cpu_s"] = res["tokens"] / wall, res["tokens"] / cpu
            res["peak"] = torch.cuda.max_memory_allocated() if cuda else 0
            results[side].append(res)
            memory = f", peak CUDA memory {res['peak'] / 2**30:.2f} GiB" if cuda else ""
            print(f"round {r + 1} {side:4s}: {res['tokens_per_s']:6.1f} real tokens/s ({res['tokens_per_cpu_s']:6.1f} per "
                  f"CPU-second), validation loss {res['eval_loss']:.4f} after {res['tokens']} training tokens"
                  f"{memory} (load {os.getloadavg()[0]:.2f})", flush=True)

    def med(side: str, key: str) -> float:
        return median(x[key] for x in results[side])

    print(f"validation loss before training: {base_loss:.4f}")
    print(f"median validation loss: ours {med('ours', 'eval_loss'):.4f}, TRL {med('trl', 'eval_loss'):.4f} "
          f"(difference {abs(med('ours', 'eval_loss') / med('trl', 'eval_loss') - 1):.2%}; target within 3%)")
    cpu_ratios = [o["tokens_per_cpu_s"] / t["tokens_per_cpu_s"] for o, t in zip(results["ours"], results["trl"])]
    wall_ratios = [o["tokens_per_s"] / t["tokens_per_s"] for o, t in zip(results["ours"], results["trl"])]
    print(f"per-round ratios, wall clock: {', '.join(f'{x:.2f}x' for x in wall_ratios)}; "
          f"CPU time: {', '.join(f'{x:.2f}x' for x in cpu_ratios)}")
    print(f"median real tokens/s: ours {med('ours', 'tokens_per_s'):.1f}, TRL {med('trl', 'tokens_per_s'):.1f}; "
          f"per CPU-second: ours {med('ours', 'tokens_per_cpu_s'):.1f}, TRL {med('trl', 'tokens_per_cpu_s'):.1f}")
    if cuda:
        print(f"peak CUDA memory allocated (largest round): ours {max(x['peak'] for x in results['ours']) / 2**30:.2f} GiB, "
              f"TRL {max(x['peak'] for x in results['trl']) / 2**30:.2f} GiB (target: ours no more)")
        print(f"speed-up over TRL on {torch.cuda.get_device_name(0)} (median real tokens/s): "
              f"{med('ours', 'tokens_per_s') / med('trl', 'tokens_per_s'):.2f}x wall clock (target >= 1.5x)")
        return
    print(f"speed-up over TRL (median real tokens/s): {med('ours', 'tokens_per_s') / med('trl', 'tokens_per_s'):.2f}x "
          f"wall clock, {med('ours', 'tokens_per_cpu_s') / med('trl', 'tokens_per_cpu_s'):.2f}x CPU time (target >= 1.9x)")


if __name__ == "__main__":
    main()
