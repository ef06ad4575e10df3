"""A stand-in for the embedded model where its package can't be installed (a GPU machine with no registry): the same
config and tokenizer, random weights from a fixed seed. Speed and memory do not depend on weight values, so the CUDA
benchmarks run on it; loss figures from it are only comparable with each other, not with the real model's.

    python bench/stand_in_model.py --source DIR --models-dir DIR   # DIR holds config.json + tokenizer files
    python bench/stand_in_model.py --pack DEST                       # here: copy those files out of workspace/models
"""
from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SMALL_FILES = ["config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja"]


def pack(dest: Path) -> None:
    from app.models import embedded_dir
    from app.workspace import Workspace

    source = embedded_dir(Workspace.open().models)
    dest.mkdir(parents=True, exist_ok=True)
    for name in SMALL_FILES:
        if (source / name).is_file():
            shutil.copy2(source / name, dest / name)
    print(f"copied {', '.join(SMALL_FILES)} from {source} to {dest}")


def build(source: Path, models_dir: Path) -> Path:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from app.models import EMBEDDED_NAME, is_provisioned

    target = models_dir / EMBEDDED_NAME
    if is_provisioned(target):
        return target
    config = AutoConfig.from_pretrained(source)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)  # fp32, as the converted GGUF is saved
    model.save_pretrained(target, safe_serialization=True)
    for name in SMALL_FILES:
        if (source / name).is_file() and not (target / name).exists():
            shutil.copy2(source / name, target / name)
    print(f"stand-in {EMBEDDED_NAME} (random weights, seed 0) in {target}")
    return target


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pack", type=Path, help="copy the embedded model's config and tokenizer files here")
    parser.add_argument("--source", type=Path, help="folder with config.json and tokenizer files")
    parser.add_argument("--models-dir", type=Path, help="where the app looks for models (WORKBENCH_MODELS_DIR)")
    args = parser.parse_args()
    if args.pack:
        pack(args.pack)
    elif args.source and args.models_dir:
        build(args.source, args.models_dir)
    else:
        parser.error("give --pack DEST, or --source and --models-dir")
    return 0


if __name__ == "__main__":
    sys.exit(main())
