"""Shared fixtures: an offline environment, the embedded model, a tiny random model and a fresh workspace."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# Tests never reach a model hub; the converted embedded model is shared with `make run`'s workspace.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("WORKBENCH_MODELS_DIR", str(ROOT / "workspace" / "models"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def models_dir() -> Path:
    return Path(os.environ["WORKBENCH_MODELS_DIR"])


@pytest.fixture(scope="session")
def embedded_model_dir(models_dir: Path) -> Path:
    from app.models import provision_embedded

    return provision_embedded(models_dir)


TINY_CONFIG = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=49152,  # SmolLM2's tokenizer, so chat templates and token counts are real
    max_position_embeddings=2048,
    tie_word_embeddings=True,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=2,
)


def build_tiny_model(dest: Path, tokenizer_from: Path, **overrides) -> Path:
    """A random-init Llama with SmolLM2's tokenizer: real templates and shapes, trains in a second."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**{**TINY_CONFIG, **overrides}))
    model.save_pretrained(dest, safe_serialization=True)
    AutoTokenizer.from_pretrained(tokenizer_from).save_pretrained(dest)
    return dest


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, embedded_model_dir: Path) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama"), embedded_model_dir)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run many small ops; on a shared 2-core machine a second thread mostly waits for the first.
    The thread count is process-wide (the Compare tab's ModelCache sets it too), so it is put back afterwards."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def workspace(tmp_path: Path):
    from app.workspace import Workspace

    return Workspace.open(tmp_path / "workspace")


def copy_model(src: Path, dest: Path) -> Path:
    shutil.copytree(src, dest)
    return dest
