"""Taking a trained run out of the workbench: its adapter as a zip, a LoRA adapter merged into a full model, a hub push."""
from __future__ import annotations

import os
import shutil
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from app import methods
from app.models import ModelError, load_causal_lm, looks_like_hub_id, resolve_model
from app.runs.store import FAILED, RunNotFound, RunStore
from app.spec import ConfigError, RunConfig
from app.workspace import Workspace, replace_dir

OFFLINE_VALUES = ("1", "true", "yes", "on")


class ExportError(RuntimeError):
    """An export that cannot be done, in words a user can act on."""


@dataclass(frozen=True)
class Finished:
    run_id: str
    config: RunConfig
    final: Path  # the run's final/ folder: a PEFT adapter, or a full model


def exports_dir(workspace: Workspace) -> Path:
    return Path(workspace.root) / "exports"


def finished_run(workspace: Workspace, run_id: str | None) -> Finished:
    if not run_id:
        raise ExportError("Choose a run to export.")
    store = RunStore(workspace.runs)
    try:
        config = store.config(run_id)
        status = store.status(run_id)
    except (RunNotFound, ConfigError, OSError):
        raise ExportError(f"Run {run_id!r} is not in this workspace any more (or its run.yaml is unreadable).") from None
    if status.state == FAILED:
        why = f": {status.reason}" if status.reason else ""
        raise ExportError(f"Run {run_id} failed{why}. It has no trained weights to export.")
    final = store.final_dir(run_id)
    if not final.is_dir() or not any(final.iterdir()):
        raise ExportError(f"Run {run_id} has not saved its final weights yet ({status.state}); wait for it to finish "
                          f"or stop it.")
    return Finished(run_id, config, final)


def adapter_zip(workspace: Workspace, run_id: str | None) -> Path:
    """workspace/exports/<run>-adapter.zip: the PEFT folder, loadable with PeftModel.from_pretrained once unzipped."""
    run = finished_run(workspace, run_id)
    if not (run.final / methods.ADAPTER_CONFIG).is_file():
        raise ExportError(
            f"Run {run.run_id} trained the whole model ({run.config.method}), so it has no adapter: its full model is "
            f"in {run.final}, ready for from_pretrained."
        )
    target = exports_dir(workspace) / f"{run.run_id}-adapter.zip"
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    os.close(fd)
    try:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as zf:
            for path in sorted(run.final.rglob("*")):
                if path.is_file():
                    zf.write(path, path.relative_to(run.final).as_posix())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target


def merge_adapter(workspace: Workspace, run_id: str | None) -> Path:
    """workspace/exports/<run>-merged: the base with the LoRA update folded into its weights (W + B·A·scale),
    saved as safetensors with the tokenizer, so it loads and runs like any model at no extra cost."""
    run = finished_run(workspace, run_id)
    spec = methods.get_method(run.config.method)
    if not spec.mixed_batch:
        raise ExportError(f"Only LoRA-family runs can be merged into the model; {spec.label} runs cannot be.")
    try:
        base_dir = resolve_model(run.config.model, workspace.models)
    except ModelError as e:
        raise ExportError(f"The base model of run {run.run_id} is not available: {e}") from None
    target = exports_dir(workspace) / f"{run.run_id}-merged"
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
    try:
        import torch
        from transformers import AutoTokenizer

        try:
            # Merge in fp32 on the CPU: a QLoRA run trained on 4-bit weights merges into the full-precision base.
            base = load_causal_lm(base_dir, dtype=torch.float32)
            merged = methods.load_trained(base, run.config.method, run.final).merge_and_unload()
            merged.save_pretrained(tmp, safe_serialization=True)
        except (MemoryError, torch.OutOfMemoryError):
            raise ExportError("The model does not fit in this machine's memory to merge; merge on a larger "
                              "machine.") from None
        AutoTokenizer.from_pretrained(base_dir).save_pretrained(tmp)
        replace_dir(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def push_to_hub(folder: Path | str, repo_id: str, token: str | None, private: bool = True) -> str:
    """Upload an exported folder (adapter or merged model) to the model hub; returns the repository's address."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ExportError("Export the adapter or merge the model first: there is nothing to push yet.")
    repo_id = (repo_id or "").strip()
    if not looks_like_hub_id(repo_id):
        raise ExportError(f"{repo_id!r} is not a hub repository name: write it as your-name/model-name.")
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in OFFLINE_VALUES:
        raise ExportError(
            f"This app runs offline (HF_HUB_OFFLINE is set), so it cannot reach the model hub. The files are in "
            f"{folder}: copy them to a machine with internet and run `huggingface-cli upload {repo_id} {folder.name}`."
        )
    if not (token or "").strip():
        raise ExportError("Paste a hub access token with write permission (huggingface.co/settings/tokens).")
    try:
        from huggingface_hub import HfApi

        api = HfApi(token=token.strip())
        api.create_repo(repo_id, private=private, exist_ok=True)
        info = api.upload_folder(folder_path=str(folder), repo_id=repo_id,
                                 commit_message="Upload from the fine-tuning workbench")
    except Exception as e:  # noqa: BLE001 - network, permission and name errors all get the same plain advice
        raise ExportError(
            f"Could not push to {repo_id} ({type(e).__name__}: {str(e)[:200]}). Check the token has write permission "
            f"and that this machine can reach huggingface.co; the files stay in {folder}."
        ) from None
    return str(getattr(info, "commit_url", None) or f"https://huggingface.co/{repo_id}")
