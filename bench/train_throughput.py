"""Training speed: this project's worker against TRL's SFTTrainer + PEFT on the same rows, model, method and settings.

Both sides train the embedded SmolLM2-135M with LoRA r=8 on all linear layers, batch 4, one epoch of the same rows in
the same order, gradient checkpointing off on both. Two cases (--case):
- alpaca (default): 32 generated Alpaca-style rows, cutoff 256. TRL reads them pre-tokenized with a completion mask,
  so the tokens and the labelled positions are identical.
- conversations: 32 multi-turn conversations of the bundled support-chat demo (a system prompt and 2-4 exchanges
  each; the other 8 held out for validation), cutoff 512 so that none is cut. Ours reads the file through the CLI
  path (conversation rows -> the sft objective's examples, every assistant turn learned); TRL gets the same
  conversations as `messages` and tokenizes them itself with `assistant_only_loss=True`, through a copy of SmolLM2's
  chat template with `{% generation %}` markers (same text; checked). Before timing, TRL's tokens and labels are
  compared with ours position by position.
The two alternate in one process (ours, TRL, TRL, ours, ...) so that other load on a shared machine hits both alike.
Both are timed over their training loop (model loading and tokenizing excluded), in wall time and in CPU time of the
process: on a shared machine the CPU seconds a run used are the steadier figure. Printed: real (non-padding) tokens
per second of each run (and, for conversations, learned tokens per second), validation loss on 8 held-out rows after
the epoch (one function scores both, and the untrained model), and last, the ratio.
On the CPU our worker draws its LoRA dropout masks with app.training.fast_lora (same drop probability, other random draws
than peft's nn.Dropout), so the two validation losses agree closely rather than to the last digit.

    HF_HUB_OFFLINE=1 nice -n 5 .venv/bin/python bench/train_throughput.py [--case conversations] [--rounds 2]
        [--threads N] [--warmup-rows N]
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
from dataclasses import dataclass, field
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


def run_trl(model_dir: Path, case: "Case", val_batches, settings: dict, work: Path, pad_id: int) -> dict:
    """TRL's SFTTrainer with PEFT, its defaults except: same rows and order, same hyper-parameters, no checkpointing,
    and the case's way of giving TRL the rows (pre-tokenized, or conversations it tokenizes itself)."""
    import torch
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from app.objectives import get_objective
    from app.training.worker import evaluate

    class Timer(TrainerCallback):
        def on_train_begin(self, *a, **k):
            self.start = Clock.now()

        def on_train_end(self, *a, **k):
            self.clock = Clock.between(self.start, Clock.now())

    cuda = torch.cuda.is_available()
    args = SFTConfig(
        output_dir=str(work / f"trl-{time.time_ns()}"), per_device_train_batch_size=settings["batch_size"],
        num_train_epochs=settings["epochs"], learning_rate=settings["learning_rate"], lr_scheduler_type="cosine",
        warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0, max_length=settings["cutoff_len"], seed=settings["seed"],
        gradient_checkpointing=False, train_sampling_strategy="sequential",
        save_strategy="no", report_to="none", use_cpu=not cuda, bf16=cuda, disable_tqdm=True, **case.trl_args,
    )
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa")
    timer = Timer()
    trainer = SFTTrainer(
        model=model, args=args, train_dataset=case.trl_data(), processing_class=case.trl_tokenizer,
        peft_config=LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, target_modules="all-linear", task_type="CAUSAL_LM"),
        callbacks=[timer],
    )
    prepared = trainer.train_dataset  # what TRL trains on, after its own tokenizing and masking
    trained = [(list(ids), list(labels)) for ids, labels in zip(prepared["input_ids"], prepared["labels"])]
    trainer.train()
    device = next(trainer.model.parameters()).device
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else None
    return {"tokens": sum(len(ids) for ids, _ in trained), "learned": sum(trl_learned(labels) for _, labels in trained),
            "clock": timer.clock, "trained": trained,
            "eval_loss": evaluate(trainer.model, val_batches, get_objective("sft"), packed=False, device=device, pad_id=pad_id, autocast=autocast)[0]}


def trl_learned(labels: list[int]) -> int:
    """Positions TRL's loss is taken on: the model shifts the labels, so position 0's label is never used."""
    return sum(t != -100 for t in labels[1:])


def same_training(ours: list, trl: list[tuple[list[int], list[int]]]) -> list[str]:
    """Where TRL's tokens or learned positions differ from ours, row by row (empty: the same training). Ours stores the
    target of position t at t (the token t+1); TRL stores a learned token at its own position."""
    if len(ours) != len(trl):
        return [f"{len(ours)} rows ours, {len(trl)} TRL's"]
    problems = []
    for i, (example, (ids, labels)) in enumerate(zip(ours, trl)):
        if example.input_ids != ids:
            problems.append(f"row {i}: tokens differ ({len(example.input_ids)} ours, {len(ids)} TRL's)")
            continue
        our_positions = {t + 1 for t, target in enumerate(example.targets) if target != -100}
        trl_positions = {t for t, label in enumerate(labels) if label != -100 and t > 0}
        if our_positions != trl_positions:
            extra, missing = sorted(trl_positions - our_positions), sorted(our_positions - trl_positions)
            problems.append(f"row {i}: TRL learns {len(extra)} positions we do not {extra[:5]}, "
                            f"not {len(missing)} we do {missing[:5]}")
    return problems


# --- the two cases ----------------------------------------------------------------------------------------------------
@dataclass
class Case:
    """What both sides train on: our worker reads train_file; TRL gets the same rows, in our epoch-0 order, its way."""
    description: str
    train_file: Path
    val_file: Path
    settings: dict
    examples: list  # ours, as the worker builds them from train_file, in its epoch-0 order
    trl_data: object  # () -> datasets.Dataset, built fresh for each TRL run
    trl_tokenizer: object
    trl_args: dict = field(default_factory=dict)  # SFTConfig fields this case sets


def epoch_order(examples: list, settings: dict) -> list[int]:
    """Indices of `examples` in the order our worker trains them in epoch 0 (TRL then reads them sequentially)."""
    from app.objectives.batches import pack
    from app.spec import RunConfig
    from app.training.plan import DataPlan

    plan = DataPlan(examples, RunConfig(dataset="x", **settings), pack)
    index = {id(e): i for i, e in enumerate(examples)}
    return [index[id(e)] for b in plan.epoch_batches(0) for e in b.examples]


def our_examples(tokenizer, train_file: Path, settings: dict) -> list:
    """The examples our worker builds from the file: `launch.py train`'s reader and the sft objective."""
    from app.data.dataset import load_training_rows
    from app.objectives import get_objective
    from app.spec import RunConfig

    config = RunConfig(dataset=str(train_file), **settings)
    return get_objective("sft").make_examples(tokenizer, load_training_rows(train_file), config)


def alpaca_case(tokenizer, train_file: Path, val_file: Path, settings: dict) -> Case:
    """Alpaca rows, which TRL reads pre-tokenized with a completion mask: the same tokens and labels by construction."""
    from datasets import Dataset

    examples = our_examples(tokenizer, train_file, settings)
    ordered = [examples[i] for i in epoch_order(examples, settings)]
    lengths, learned = sorted(len(e.input_ids) for e in examples), sum(e.n_targets for e in examples)
    return Case(
        description=f"{len(examples)} Alpaca-style rows, {sum(lengths)} tokens ({learned} in responses; rows of "
                    f"{lengths[0]}-{lengths[-1]} tokens, median {lengths[len(lengths) // 2]})",
        train_file=train_file, val_file=val_file, settings=settings, examples=ordered, trl_tokenizer=tokenizer,
        trl_data=lambda: Dataset.from_list([  # TRL's completion mask marks tokens; ours marks the position before
            {"input_ids": e.input_ids, "completion_mask": [0] + [int(t != -100) for t in e.targets[:-1]]}
            for e in ordered
        ]),
        trl_args={"completion_only_loss": True},
    )


# SmolLM2's chat template writes every message with this one expression; TRL's assistant_only_loss needs the
# assistant's part inside {% generation %}: the same text, with the answer and its end-of-turn marker marked (what our
# template.render_spans learns: everything after "<|im_start|>assistant\n" up to the next message).
SMOLLM2_MESSAGE = "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
MARKED_MESSAGE = ("{% if message['role'] == 'assistant' %}{{ '<|im_start|>assistant\n' }}{% generation %}"
                  "{{ message['content'] + '<|im_end|>' + '\n' }}{% endgeneration %}{% else %}" + SMOLLM2_MESSAGE
                  + "{% endif %}")


def with_generation_markers(tokenizer, conversations: list[list[dict]]):
    """A copy of the tokenizer whose chat template marks the assistant's answers, checked to write the same text."""
    import copy

    if SMOLLM2_MESSAGE not in (tokenizer.chat_template or ""):
        raise SystemExit("the conversation case needs SmolLM2's chat template (the one this bench adds markers to)")
    marked = copy.deepcopy(tokenizer)
    marked.chat_template = tokenizer.chat_template.replace(SMOLLM2_MESSAGE, MARKED_MESSAGE)
    for messages in conversations:
        text = tokenizer.apply_chat_template(messages, tokenize=False)
        if marked.apply_chat_template(messages, tokenize=False) != text:
            raise SystemExit("the marked chat template writes a conversation differently from SmolLM2's own")
    return marked


def conversation_case(tokenizer, work: Path, settings: dict) -> Case:
    """The support-chat demo's conversations, which TRL tokenizes itself from `messages` with assistant_only_loss."""
    from datasets import Dataset

    from app.data.conversation import from_row
    from app.data.dataset import DEMO_DIR, load_training_rows, split_rows

    rows = load_training_rows(DEMO_DIR / "support-chat.jsonl")
    train_rows, val_rows = split_rows(rows, 0.2, seed=42)
    train_file, val_file = write_jsonl(work / "train.jsonl", train_rows), write_jsonl(work / "val.jsonl", val_rows)
    examples = our_examples(tokenizer, train_file, settings)
    if len(examples) != len(train_rows):
        raise SystemExit(f"our side kept {len(examples)} of {len(train_rows)} conversations")
    order = epoch_order(examples, settings)
    messages = [from_row(train_rows[i]).messages(settings.get("system_prompt", "")) for i in order]
    marked = with_generation_markers(tokenizer, messages)
    lengths = sorted(len(e.input_ids) for e in examples)
    turns = sum(len(from_row(r).assistant_turns) for r in train_rows)
    return Case(
        description=f"{len(examples)} conversations ({turns} assistant turns), {sum(lengths)} tokens "
                    f"({sum(e.n_targets for e in examples)} learned, every assistant turn; conversations of "
                    f"{lengths[0]}-{lengths[-1]} tokens, median {lengths[len(lengths) // 2]})",
        train_file=train_file, val_file=val_file, settings=settings, examples=[examples[i] for i in order],
        trl_tokenizer=marked, trl_data=lambda: Dataset.from_list([{"messages": m} for m in messages]),
        trl_args={"assistant_only_loss": True},
    )


def base_validation_loss(model_dir: Path, val_batches, pad_id: int) -> float:
    """The untrained model's score on the same rows: both trained models must move away from it."""
    import torch
    from transformers import AutoModelForCausalLM

    from app.objectives import get_objective
    from app.training.worker import evaluate

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return evaluate(model.to(device), val_batches, get_objective("sft"), packed=False, device=device, pad_id=pad_id)[0]


def main() -> None:
    from app.training.hardware import cpu_threads

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", choices=("alpaca", "conversations"), default="alpaca",
                        help="alpaca: 32 generated one-turn rows; conversations: 32 multi-turn chats of support-chat")
    parser.add_argument("--rounds", type=int, default=2, help="pairs of runs (each side trains once per round)")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads for both sides (0: the idle cores now)")
    parser.add_argument("--rows", type=int, default=32, help="rows of the alpaca case")
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
    from app.training.plan import batches_of
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
    if args.case == "alpaca":
        case = alpaca_case(tokenizer, write_jsonl(work / "train.jsonl", alpaca_rows(args.rows, seed=1)),
                           write_jsonl(work / "val.jsonl", alpaca_rows(8, seed=2)), settings)
    else:  # the longest support-chat conversation is under 300 tokens: nothing is cut, on either side
        case = conversation_case(tokenizer, work, settings | {"cutoff_len": 512})
    settings = case.settings
    val_batches = batches_of(our_examples(tokenizer, case.val_file, settings), settings["batch_size"], pack)
    n_tokens, n_learned = sum(len(e.input_ids) for e in case.examples), sum(e.n_targets for e in case.examples)
    base_loss = base_validation_loss(model_dir, val_batches, tokenizer.pad_token_id)
    print(f"{case.description}; batch {settings['batch_size']}, cutoff {settings['cutoff_len']}, LoRA r=8 all-linear; "
          f"device {'cuda' if torch.cuda.is_available() else 'cpu'}, {threads} CPU threads, load {os.getloadavg()[0]:.2f}",
          flush=True)

    cuda = torch.cuda.is_available()
    if args.warmup_rows:  # one-off costs (CUDA context, kernel loading, autotuning) paid before any timing
        warm = alpaca_case(tokenizer, write_jsonl(work / "warmup.jsonl", alpaca_rows(args.warmup_rows, seed=3)),
                           case.val_file, settings)
        run_ours(model_dir, warm.train_file, warm.val_file, settings, work)
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
                res = run_ours(model_dir, case.train_file, case.val_file, settings, work)
                res["learned"] = n_learned  # the worker logs tokens; what it learns is the examples' targets
                if res["tokens"] != n_tokens:
                    raise SystemExit(f"our worker trained {res['tokens']} tokens, its examples hold {n_tokens}")
            else:
                res = run_trl(model_dir, case, val_batches, settings, work, tokenizer.pad_token_id)
                if not results["trl"]:  # once: does TRL train on exactly our tokens and positions?
                    problems = same_training(case.examples, res["trained"])
                    print("TRL's training data against ours: " + ("the same tokens and learned positions in every row "
                          f"({res['tokens']} tokens, {res['learned']} learned)" if not problems else
                          f"{len(problems)} rows differ: " + "; ".join(problems[:5])), flush=True)
            wall, cpu = res["clock"]
            res["tokens_per_s"], res["tokens_per_cpu_s"] = res["tokens"] / wall, res["tokens"] / cpu
            res["learned_per_s"] = res["learned"] / wall
            res["peak"] = torch.cuda.max_memory_allocated() if cuda else 0
            results[side].append(res)
            memory = f", peak CUDA memory {res['peak'] / 2**30:.2f} GiB" if cuda else ""
            print(f"round {r + 1} {side:4s}: {res['tokens_per_s']:6.1f} real tokens/s "
                  f"({res['tokens_per_cpu_s']:6.1f} per CPU-second; {res['learned_per_s']:6.1f} learned tokens/s), "
                  f"validation loss {res['eval_loss']:.4f} after {res['tokens']} training tokens{memory} "
                  f"(load {os.getloadavg()[0]:.2f})", flush=True)

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
          f"per CPU-second: ours {med('ours', 'tokens_per_cpu_s'):.1f}, TRL {med('trl', 'tokens_per_cpu_s'):.1f}; "
          f"learned tokens/s: ours {med('ours', 'learned_per_s'):.1f}, TRL {med('trl', 'learned_per_s'):.1f}")
    if cuda:
        print(f"peak CUDA memory allocated (largest round): ours {max(x['peak'] for x in results['ours']) / 2**30:.2f} GiB, "
              f"TRL {max(x['peak'] for x in results['trl']) / 2**30:.2f} GiB (target: ours no more)")
        print(f"speed-up over TRL on {torch.cuda.get_device_name(0)} (median real tokens/s): "
              f"{med('ours', 'tokens_per_s') / med('trl', 'tokens_per_s'):.2f}x wall clock (target >= 1.5x)")
        return
    target = "target >= 1.9x" if args.case == "alpaca" else "target: no fewer real tokens per second, >= 1x"
    print(f"speed-up over TRL (median real tokens/s): {med('ours', 'tokens_per_s') / med('trl', 'tokens_per_s'):.2f}x "
          f"wall clock, {med('ours', 'tokens_per_cpu_s') / med('trl', 'tokens_per_cpu_s'):.2f}x CPU time ({target})")


if __name__ == "__main__":
    main()
