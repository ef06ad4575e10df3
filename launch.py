"""Entry point: the web UI by default, and headless subcommands that share the same app/ code."""
from __future__ import annotations

import argparse
import json
import os
import sys

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def cmd_ui(args: argparse.Namespace) -> int:
    from app.security import UnsafeServe, check_serving, parse_credentials
    from app.workspace import Workspace

    try:
        credentials = parse_credentials(args.auth, args.auth_file)
        check_serving(args.host, args.share, credentials)
    except UnsafeServe as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    workspace = Workspace.open(args.workspace)
    from components.ui import build_ui

    demo = build_ui(workspace)
    demo.queue(default_concurrency_limit=4).launch(
        server_name=args.host,
        server_port=args.port,
        share=args.share,
        auth=credentials or None,
        show_error=True,
        max_file_size=args.max_upload,
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
    print(json.dumps({"error": "the estimate lands with the Method & Memory issue"}))
    return 1


def cmd_train(args: argparse.Namespace) -> int:
    print("error: training lands with the Training issue", file=sys.stderr)
    return 1


def cmd_data_check(args: argparse.Namespace) -> int:
    print("error: data check lands with the Data issue", file=sys.stderr)
    return 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="launch.py",
        description="Fine-tuning workbench. With no subcommand, serves the web UI.",
    )
    parser.add_argument("--workspace", help="folder for models, datasets and runs (default: $WORKBENCH_WORKSPACE or ./workspace)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--auth", help="user:password required to open the page (needed for a non-loopback --host or --share)")
    parser.add_argument("--auth-file", help="file with one user:password per line")
    parser.add_argument("--share", action="store_true", help="also publish a public link (requires --auth)")
    parser.add_argument("--max-upload", default="200mb", help="largest dataset upload accepted (default 200mb)")
    parser.set_defaults(func=cmd_ui)
    sub = parser.add_subparsers(title="subcommands", metavar="{estimate,train,data,provision}")

    p = sub.add_parser("provision", help="convert the embedded SmolLM2 model into the workspace (once)")
    p.set_defaults(func=cmd_provision)

    # --- estimate (Method & Memory issue) ---
    p = sub.add_parser("estimate", help="print the memory estimate and trainable parameters as JSON")
    p.set_defaults(func=cmd_estimate)
    # --- end estimate ---

    # --- train (Training issue) ---
    p = sub.add_parser("train", help="run one training job headless (the UI launches exactly this)")
    p.add_argument("run_yaml", nargs="?", help="a run.yaml written by the UI or by hand")
    p.set_defaults(func=cmd_train)
    # --- end train ---

    # --- data (Data issue) ---
    p = sub.add_parser("data", help="dataset tools")
    data_sub = p.add_subparsers(title="data subcommands", metavar="{check}")
    c = data_sub.add_parser("check", help="validate a dataset file and print the report")
    c.add_argument("file")
    c.add_argument("--json", action="store_true", help="print the report as JSON")
    c.set_defaults(func=cmd_data_check)
    # --- end data ---
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    # subcommands define their own --workspace where they need it; the global one is the fallback
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
