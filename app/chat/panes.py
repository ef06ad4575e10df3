"""Which models answer in side-by-side chat: the base model and the runs chosen (final weights or a checkpoint), each
a Pane that says whether it shares the base model's batch (a LoRA-family adapter) or needs a model of its own.

The model cache (app.chat.cache) loads the panes; app.chat.generate streams their answers to the same prompt.
"""
from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

from app import methods
from app.chat.prompting import Prompting, base_prompting, dataset_prompting, run_prompting
from app.models import ModelError, load_config, meta_model, resolve_model
from app.runs.store import CHECKPOINT_WEIGHTS, COMPLETED, FAILED, RUNNING, STOPPED, RunNotFound, RunStore
from app.spec import ConfigError, RunConfig
from app.workspace import Workspace, replace_dir

BASE = "__base__"  # the pane key (and peft's adapter name) of the base model without any adapter
CHECKPOINT_CACHE = "compare-cache"  # workspace folder for checkpoints turned into PEFT adapters


class ChatError(RuntimeError):
    """Something the Compare tab cannot do, in words a user can act on."""


# --- which panes: the base model and the runs chosen ------------------------------------------------------
@dataclass(frozen=True)
class Pane:
    key: str  # BASE, a run id, or "<run id>/step-N" for a checkpoint
    label: str  # method and key settings, for the pane's title
    kind: str  # "base", "lora" (shares the base weights in one batch) or "separate" (a model of its own)
    method: str = ""
    weights: Path | None = None  # the adapter folder, or the full model folder
    prompting: Prompting = Prompting()  # the system prompt and tools it was trained with (the base: what runs share)


def parse_key(key: str) -> tuple[str, str | None]:
    """("run id", "step-N" or None) from a pane key."""
    run_id, _, step = key.partition("/")
    return run_id, step or None


def adapter_folder(folder: Path) -> Path | None:
    """The folder holding a PEFT adapter: `folder` itself or one level down (checkpoint layouts differ)."""
    if (folder / methods.ADAPTER_CONFIG).is_file():
        return folder
    if folder.is_dir():
        for sub in sorted(folder.iterdir()):
            if sub.is_dir() and (sub / methods.ADAPTER_CONFIG).is_file():
                return sub
    return None


def checkpoint_adapter(workspace: Workspace, config: RunConfig, checkpoint: Path) -> Path:
    """A PEFT adapter folder made from a training checkpoint's trainable weights (written once, under
    workspace/compare-cache/<run>/step-N, since the trainer prunes old checkpoints while it runs)."""
    source = checkpoint / CHECKPOINT_WEIGHTS
    dest = Path(workspace.root) / CHECKPOINT_CACHE / config.run_id / checkpoint.name
    weights_file = dest / methods.ADAPTER_WEIGHTS
    if weights_file.is_file() and weights_file.stat().st_mtime_ns >= source.stat().st_mtime_ns:
        return dest
    from safetensors.torch import load_file, save_file

    # The method applied to a weightless copy of the base gives the exact adapter config the run trained with.
    peft_model = methods.prepare_model(meta_model(load_config(config.model, workspace.models)), config.method,
                                       config.method_settings)
    if not hasattr(peft_model, "peft_config"):
        raise ChatError(f"Checkpoints of {config.method} runs cannot be opened for chat; wait for the run's final weights.")
    # The trainer names parameters with the adapter's name ("lora_A.default.weight"); peft files leave it out.
    adapter = {k.replace(".default.", "."): v for k, v in load_file(str(source)).items()}
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}."))
    try:
        peft_model.peft_config["default"].save_pretrained(tmp)
        save_file(adapter, str(tmp / methods.ADAPTER_WEIGHTS))
        replace_dir(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest


def chat_ready(checkpoint: Path) -> bool:
    """A finished checkpoint that can be chatted with: a PEFT adapter, or the trainer's trainable weights."""
    return adapter_folder(checkpoint) is not None or (checkpoint / CHECKPOINT_WEIGHTS).is_file()


def settings_label(method: str, method_args: dict) -> str:
    """'LoRA r=8 alpha=16 targets=all-linear': the method and the settings that shape what it learned."""
    try:
        spec = methods.get_method(method)
        values = asdict(spec.make_args(method_args))
        label = spec.label
    except (methods.MethodError, TypeError):
        values, label = dict(method_args or {}), method
    # Dropout changes nothing at inference and a switch left off says nothing: both only take room in a title.
    shown = [f"{k}={v}" for k, v in values.items() if "dropout" not in k and v is not False]
    return " ".join([label, *shown])


def run_choices(store: RunStore) -> list[tuple[str, str]]:
    """(label, key) for every run with trained weights: finished runs' final weights, then adapter checkpoints
    of runs that are still going (or were cut short)."""
    choices = []
    for run_id in store.list_ids():
        config = store.safe_config(run_id)
        if config is None:
            continue
        state = store.status(run_id).state
        label = settings_label(config.method, config.method_args)
        final = store.final_dir(run_id)
        if state in (COMPLETED, STOPPED) and final.is_dir():
            choices.append((f"{label} · {run_id}", run_id))
            continue
        if not _saves_adapter(config.method):
            continue  # a full fine-tune's checkpoint is a whole model: only its final weights are offered
        for checkpoint in reversed(store.checkpoints(run_id)):
            if chat_ready(checkpoint):
                choices.append((f"{label} · {run_id} at {checkpoint.name} ({state})", f"{run_id}/{checkpoint.name}"))
    return choices


def final_choices(choices: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """The run_choices that are a run's final weights, not one of its checkpoints: what can be exported, and whose
    run kept validation rows aside."""
    return [(label, key) for label, key in choices if parse_key(key)[1] is None]


def _saves_adapter(method: str) -> bool:
    try:
        return methods.get_method(method).saves_adapter
    except methods.MethodError:
        return False


def same_base(run_model: str, chosen: str, models_dir: Path) -> bool:
    if (run_model or "embedded").strip() == (chosen or "embedded").strip():
        return True
    try:
        return resolve_model(run_model, models_dir) == resolve_model(chosen, models_dir)
    except ModelError:
        return False


def resolve_panes(workspace: Workspace, base_ref: str, keys: list[str]) -> list[Pane]:
    """The base pane, then one pane per chosen run; a run that cannot be compared raises ChatError saying why."""
    keys = [k for k in dict.fromkeys(keys or []) if k]
    if not keys:
        raise ChatError("Choose at least one trained run to compare with the base model.")
    store = RunStore(workspace.runs)
    runs = [_run_pane(store, workspace, base_ref, key) for key in keys]
    base = Pane(BASE, f"Base model ({base_ref or 'embedded'})", "base",
                prompting=base_prompting([p.prompting for p in runs]))
    return [base, *runs]


def prompting_notes(keys: Sequence[str], told: Sequence[Prompting]) -> str:
    """What the status line says about the panes' system prompts and tools (keys and what each pane is told, in the
    same order): where one was left out, and why."""
    said = []
    for key, prompting in zip(keys, told):
        who = "The base model" if key == BASE else f"Run {parse_key(key)[0]}"
        if prompting.notes():
            said.append(f"{who}: {'; '.join(prompting.notes())}.")
    return " ".join(dict.fromkeys(said))


def _run_pane(store: RunStore, workspace: Workspace, base_ref: str, key: str) -> Pane:
    run_id, step = parse_key(key)
    try:
        config = store.config(run_id)
        status = store.status(run_id)
    except (RunNotFound, ConfigError, OSError):
        raise ChatError(f"Run {run_id!r} is not in this workspace any more (or its run.yaml is unreadable).") from None
    if status.state == FAILED and step is None:
        why = f": {status.reason}" if status.reason else ""
        raise ChatError(f"Run {run_id} failed{why}. It has no trained weights to compare; start it again or pick "
                        f"another run.")
    if not same_base(config.model, base_ref, workspace.models):
        raise ChatError(
            f"Run {run_id} was trained on {config.model!r}, but the base model chosen is {base_ref!r}. An adapter only "
            f"works on the model it was trained on: choose {config.model!r} as the model at the top of the page."
        )
    try:
        spec = methods.get_method(config.method)
    except methods.MethodError:
        raise ChatError(f"Run {run_id} used the method {config.method!r}, which this version does not know.") from None
    label = f"{settings_label(config.method, config.method_args)} ({run_id}{' ' + step if step else ''})"
    prompting = run_prompting(config.system_prompt, dataset_prompting(config.dataset))
    if step is None:
        folder = store.final_dir(run_id)
        if not folder.is_dir():
            state = "is still training" if status.state == RUNNING else f"has no final weights ({status.state})"
            raise ChatError(f"Run {run_id} {state}: choose one of its checkpoints instead.")
    else:
        done = {c.name: c for c in store.checkpoints(run_id)}
        if step not in done:
            raise ChatError(f"Run {run_id} has no finished checkpoint {step}.")
        folder = adapter_folder(done[step])
        if folder is None and spec.saves_adapter and (done[step] / CHECKPOINT_WEIGHTS).is_file():
            try:
                folder = checkpoint_adapter(workspace, config, done[step])
            except (methods.MethodError, ModelError, RuntimeError, ValueError, OSError) as e:
                raise ChatError(f"Checkpoint {step} of run {run_id} cannot be opened for chat ({e}).") from None
        if folder is None:
            raise ChatError(f"Checkpoint {step} of run {run_id} holds no adapter that can be loaded for chat.")
    if not spec.saves_adapter:
        return Pane(key, label, "separate", config.method, folder, prompting)
    adapter = adapter_folder(folder)
    if adapter is None:
        raise ChatError(f"Run {run_id}'s weights in {folder} have no {methods.ADAPTER_CONFIG}; the run did not finish saving.")
    batchable = methods.supports_mixed_batch(config.method, config.method_settings) and _batchable(adapter)
    return Pane(key, label, "lora" if batchable else "separate", config.method, adapter, prompting)


def _batchable(adapter_dir: Path) -> bool:
    """Plain LoRA adapters share one batch; DoRA (which peft's mixed batches refuse) and other types do not."""
    try:
        config = json.loads((adapter_dir / methods.ADAPTER_CONFIG).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return False
    return config.get("peft_type") == "LORA" and not config.get("use_dora")
