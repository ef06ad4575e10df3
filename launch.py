"""Entry point: the web UI by default, and headless subcommands that share the same app/ code."""
from __future__ import annotations

import argparse
import json
import os
import sys

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def cmd_ui(args: argparse.Namespace) -> int:
    from app.security import ServeError, check_port, check_serving, parse_credentials, parse_host
    from app.workspace import Workspace

    try:
        address = parse_host(args.host)
        credentials = parse_credentials(args.auth, args.auth_file)
        check_serving(address.bind, args.share, credentials)
        check_port(address, args.port)
    except ServeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    workspace = Workspace.open(args.workspace)
    from components import login_gate
    from components.ui import build_ui

    demo = build_ui(workspace)
    demo.queue(default_concurrency_limit=4).launch(
        server_name=address.url_host,
        server_port=args.port,
        share=args.share,
        auth=credentials or None,
        show_error=True,
        max_file_size=args.max_upload,
        app_kwargs=login_gate.app_kwargs() if credentials else None,
    )
    return 0


def cmd_provision(args: argparse.Namespace) -> int:
    from app.models import ModelError, provision_embedded
    from app.workspace import Workspace

    workspace = Workspace.open(args.workspace)
    try:
        path = provision_embedded(workspace.models, lambda f, m: print(f"[{f:4.0%}] {m}", flush=True))
    except ModelError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(path)
    return 0


def cmd_estimate(args: argparse.Namespace) -> int:
    import yaml

    from app.memory.estimate import EstimateError, EstimateInputs, estimate_memory, format_table
    from app.methods import MethodError
    from app.models import ModelError
    from app.workspace import Workspace

    method_args = {key: value for key, value in (("r", args.r), ("targets", args.targets)) if value is not None}
    for item in args.arg or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            print(f"error: --arg {item!r}: write it as KEY=VALUE, e.g. --arg bits=8", file=sys.stderr)
            return 2
        method_args[key.strip()] = yaml.safe_load(value)  # 8 -> int, true -> bool, nf4 -> str
    try:
        inputs = EstimateInputs(
            model=args.model, method=args.method, method_args=method_args, batch_size=args.batch, seq_len=args.seq,
            precision=args.precision, optimizer=args.optimizer, grad_checkpointing=args.grad_checkpointing,
            grad_accum=args.grad_accum, attention=args.attention, models_dir=str(Workspace.open(args.workspace).models),
            gpus=args.gpus, strategy=args.strategy,
        )
        estimate = estimate_memory(inputs)
    except (EstimateError, MethodError, ModelError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(estimate.to_dict(), indent=2) if args.json else format_table(estimate))
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from app.training.worker import EXIT_USAGE, run_preset, run_training

    if args.preset:
        if args.run_yaml or args.resume:
            print("error: give either RUN.yaml [--resume] or --preset NAME, not both", file=sys.stderr)
            return EXIT_USAGE
        overrides = {"model": args.model, "dataset": args.dataset, "max_steps": args.max_steps}
        return run_preset(args.preset, args.workspace, overrides)
    if not args.run_yaml:
        print("error: give a run.yaml (python launch.py train runs/ID/run.yaml) or --preset NAME", file=sys.stderr)
        return EXIT_USAGE
    if args.model or args.dataset or args.max_steps is not None:
        print("error: --model/--dataset/--max-steps go with --preset; edit the run.yaml instead", file=sys.stderr)
        return EXIT_USAGE
    return run_training(args.run_yaml, resume=args.resume)


def cmd_data_check(args: argparse.Namespace) -> int:
    from app.data.dataset import ColumnMapping, DataError, check_file

    try:
        mapping = ColumnMapping.parse(args.map) if args.map else None
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    tokenizer = None
    if args.cutoff > 0:
        from app.data.tokens import load_tokenizer
        from app.models import ModelError
        from app.workspace import Workspace

        try:
            tokenizer = load_tokenizer(args.model, str(Workspace.open(args.workspace).models))
        except (ModelError, OSError, ValueError) as e:
            print(f"note: no length check, the tokenizer of {args.model!r} is not available ({e})", file=sys.stderr)
    # keep_rows=False: the check streams, so a file of millions of rows needs little memory
    report = check_file(args.file, mapping=mapping, policy=args.policy, tokenizer=tokenizer,
                        cutoff=args.cutoff or None, keep_rows=False)
    print(json.dumps(report.to_dict(), indent=2, ensure_ascii=False) if args.json else "\n".join(report.summary_lines()))
    return report.exit_code


def cmd_export_run(args: argparse.Namespace) -> int:
    from app.runs.export import ExportError
    from app.runs.export_run import export_run
    from app.runs.store import RunNotFound, RunStore
    from app.workspace import Workspace

    store = RunStore(Workspace.open(args.workspace).runs)
    try:
        folder = export_run(store, args.run_id, args.dest)
    except (ExportError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except RunNotFound:
        print(f"error: no run {args.run_id!r} in {store.root}", file=sys.stderr)
        return 2
    print(f"exported to {folder}; the commands are in {folder / 'README.md'}")
    return 0


def add_workspace_option(parser: argparse.ArgumentParser, help_text: str) -> None:
    """--workspace after a subcommand too (`data check --workspace X FILE`). SUPPRESS leaves the global value (given
    before the subcommand) in place when it is not repeated here."""
    parser.add_argument("--workspace", default=argparse.SUPPRESS, help=help_text)


def build_parser() -> argparse.ArgumentParser:
    from app.methods import METHODS  # the registry alone: no torch, so --help stays fast

    parser = argparse.ArgumentParser(
        prog="launch.py",
        description="Fine-tuning workbench. With no subcommand, serves the web UI.",
    )
    parser.add_argument("--workspace", help="folder for models, datasets and runs (default: $WORKBENCH_WORKSPACE or ./workspace)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to bind (default 127.0.0.1: this machine only; ::1 or [::1] for IPv6)")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--auth", help="user:password required to open the page (needed for a non-loopback --host or --share)")
    parser.add_argument("--auth-file", help="file with one user:password per line")
    parser.add_argument("--share", action="store_true", help="also publish a public link (requires --auth)")
    parser.add_argument("--max-upload", default="200mb", help="largest dataset upload accepted (default 200mb)")
    parser.add_argument("--allow-pickle", action="store_true", help="also load .bin/.pt checkpoints (can run code: trusted models only)")
    parser.add_argument("--trust-remote-code", action="store_true", help="run Python code shipped with a model (trusted models only)")
    parser.set_defaults(func=cmd_ui)
    sub = parser.add_subparsers(title="subcommands", metavar="{estimate,train,data,export-run,provision}")

    p = sub.add_parser("provision", help="convert the embedded SmolLM2 model into the workspace (once)")
    add_workspace_option(p, "the workspace to put the model in")
    p.set_defaults(func=cmd_provision)

    # --- estimate (Method & Memory issue) ---
    p = sub.add_parser(
        "estimate", help="print the memory estimate (GPU and CPU RAM) and the trainable parameters",
        description="Exit status: 0 printed, 2 the inputs cannot work (the message says which and why).",
    )
    p.add_argument("--model", default="embedded", help="embedded, a local model folder, a hub id, or config:NAME "
                   "for a bundled architecture (e.g. config:llama-3.1-8b)")
    p.add_argument("--method", default="lora", help=", ".join(METHODS))
    p.add_argument("--r", type=int, help="LoRA-family rank")
    p.add_argument("--targets", help="attention, all-linear, or a comma list of module names")
    p.add_argument("--arg", action="append", metavar="KEY=VALUE", help="any other method setting, e.g. bits=8 (repeatable)")
    p.add_argument("--batch", type=int, default=4, help="rows per step (default 4)")
    p.add_argument("--seq", type=int, default=256, help="cutoff length in tokens (default 256)")
    p.add_argument("--precision", default="auto", help="auto, fp32, bf16, bf16-mixed or fp16")
    p.add_argument("--optimizer", default="adamw", help="adamw, adamw8bit or sgd")
    p.add_argument("--grad-checkpointing", action="store_true", help="recompute activations in backward")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step (default 1)")
    p.add_argument("--attention", default="sdpa", help="sdpa (default) or eager")
    p.add_argument("--gpus", type=int, default=1, help="GPUs of a data-parallel run: the GPU figure is then per GPU")
    p.add_argument("--strategy", default="ddp", help="with --gpus above 1: ddp (a full copy per GPU, default) or "
                   "fsdp (weights, gradients and optimizer state split between the GPUs)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    add_workspace_option(p, "where local models live")
    p.set_defaults(func=cmd_estimate)
    # --- end estimate ---

    # --- train (Training issue) ---
    p = sub.add_parser("train", help="run one training job headless (the UI launches exactly this)")
    p.add_argument("run_yaml", nargs="?", help="a run.yaml written by the UI or by hand")
    p.add_argument("--resume", action="store_true", help="continue from the run's last complete checkpoint")
    p.add_argument("--preset", help="a preset name in presets/ (e.g. quick-demo) or a preset YAML path")
    add_workspace_option(p, "with --preset: the workspace to create the run in")
    p.add_argument("--model", help="with --preset: the model (embedded, a local folder or a hub id)")
    p.add_argument("--dataset", help="with --preset: the dataset file")
    p.add_argument("--max-steps", type=int, help="with --preset: stop after this many optimizer steps")
    p.set_defaults(func=cmd_train)
    # --- end train ---

    # --- data (Data issue) ---
    p = sub.add_parser("data", help="dataset tools")
    data_sub = p.add_subparsers(title="data subcommands", metavar="{check}", required=True)
    c = data_sub.add_parser(
        "check", help="validate a dataset file and print the report",
        description="Exit status: 0 the data is usable, 1 it is not (no usable rows or columns), 2 the file cannot be read.",
    )
    c.add_argument("file", help="JSON array, JSONL, CSV, TSV or Parquet file, or hub:owner/name[:split] when online")
    c.add_argument("--json", action="store_true", help="print the report as JSON")
    c.add_argument("--cutoff", type=int, default=256, help="cutoff length in tokens for the length check (0 skips it)")
    c.add_argument("--model", default="embedded", help="model whose tokenizer and chat template count the tokens")
    c.add_argument("--policy", choices=("drop", "fix"), default="drop",
                   help="rows with a repairable problem (a number instead of text, bad UTF-8): drop or fix them")
    c.add_argument("--map", help="column mapping, e.g. instruction=question,output=answer (default: detected)")
    add_workspace_option(c, "where the --model's tokenizer is found")
    c.set_defaults(func=cmd_data_check)
    # --- end data ---

    # --- export-run (Multi-GPU issue) ---
    p = sub.add_parser(
        "export-run", help="write a run as a ready folder (run.yaml, data, README with 1-GPU/multi-GPU/multi-node commands)",
        description="Exit status: 0 exported, 1 cannot export (the message says why), 2 no such run.",
    )
    p.add_argument("run_id", help="the run's id (its folder name in WORKSPACE/runs)")
    p.add_argument("dest", help="a new or empty folder to write")
    add_workspace_option(p, "the workspace holding the run")
    p.set_defaults(func=cmd_export_run)
    # --- end export-run ---
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from app.security import apply_opt_ins

    for warning in apply_opt_ins(args.allow_pickle, args.trust_remote_code):
        print(f"warning: {warning}", file=sys.stderr)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
