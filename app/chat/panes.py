"""Side-by-side chat: the base model and trained runs answer the same prompt in one batch that streams token by token.

One copy of the base weights serves the base pane and every LoRA-family adapter trained on it: each row of the
batch says which adapter it uses. A full fine-tune, or an adapter that cannot share a batch (DoRA, prefix tuning,
IA3...), gets a model of its own, stepped in the same loop so that every pane still streams at once.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from functools import lru_cache, partial
from pathlib import Path
from typing import Iterator

from app import methods
from app.models import ModelError, load_causal_lm, load_config, meta_model, resolve_model
from app.runs.store import COMPLETED, FAILED, RUNNING, STOPPED, RunNotFound, RunStore
from app.spec import ConfigError, RunConfig
from app.workspace import Workspace, replace_dir

BASE = "__base__"  # the pane key (and peft's adapter name) of the base model without any adapter
CHECKPOINT_WEIGHTS = "trainable.safetensors"  # what the trainer's checkpoints hold (app/train.py, Checkpointer)
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


def parse_key(key: str) -> tuple[str, str | None]:
    """("run id", "step-N" or None) from a pane key."""
    run_id, _, step = key.partition("/")
    return run_id, step or None


def adapter_folder(folder: Path) -> Path | None:
    """The folder holding a PEFT adapter: `folder` itself or one level down (checkpoint layouts differ)."""
    if (folder / "adapter_config.json").is_file():
        return folder
    if folder.is_dir():
        for sub in sorted(folder.iterdir()):
            if sub.is_dir() and (sub / "adapter_config.json").is_file():
                return sub
    return None


def checkpoint_adapter(workspace: Workspace, config: RunConfig, checkpoint: Path) -> Path:
    """A PEFT adapter folder made from a training checkpoint's trainable weights (written once, under
    workspace/compare-cache/<run>/step-N, since the trainer prunes old checkpoints while it runs)."""
    source = checkpoint / CHECKPOINT_WEIGHTS
    dest = Path(workspace.root) / CHECKPOINT_CACHE / config.run_id / checkpoint.name
    weights_file = dest / "adapter_model.safetensors"
    if weights_file.is_file() and weights_file.stat().st_mtime_ns >= source.stat().st_mtime_ns:
        return dest
    from safetensors.torch import load_file, save_file

    # The method applied to a weightless copy of the base gives the exact adapter config the run trained with.
    peft_model = methods.prepare_model(meta_model(load_config(config.model, workspace.models)), config.method,
                                       config.method_args)
    if not hasattr(peft_model, "peft_config"):
        raise ChatError(f"Checkpoints of {config.method} runs cannot be opened for chat; wait for the run's final weights.")
    # The trainer names parameters with the adapter's name ("lora_A.default.weight"); peft files leave it out.
    adapter = {k.replace(".default.", "."): v for k, v in load_file(str(source)).items()}
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}."))
    try:
        peft_model.peft_config["default"].save_pretrained(tmp)
        save_file(adapter, str(tmp / "adapter_model.safetensors"))
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
    panes = [Pane(BASE, f"Base model ({base_ref or 'embedded'})", "base")]
    for key in keys:
        panes.append(_run_pane(store, workspace, base_ref, key))
    return panes


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
        return Pane(key, label, "separate", config.method, folder)
    adapter = adapter_folder(folder)
    if adapter is None:
        raise ChatError(f"Run {run_id}'s weights in {folder} have no adapter_config.json; the run did not finish saving.")
    try:
        batchable = methods.supports_mixed_batch(config.method, config.method_args) and _batchable(adapter)
    except methods.MethodError:  # settings this version no longer accepts: load it on its own model
        batchable = False
    return Pane(key, label, "lora" if batchable else "separate", config.method, adapter)


def _batchable(adapter_dir: Path) -> bool:
    """Plain LoRA adapters share one batch; DoRA (which peft's mixed batches refuse) and other types do not."""
    try:
        config = json.loads((adapter_dir / "adapter_config.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return False
    return config.get("peft_type") == "LORA" and not config.get("use_dora")


# --- all adapters' LoRA of a layer in one shot ------------------------------------------------------------
class StackedLora:
    """Every adapter's LoRA update of a layer in one shot: h = x @ A_all^T, keep each row's own rank slots, h @ B_all^T.

    peft's mixed-adapter batch loops over the adapters in every layer with index-selects, which on a CPU costs
    more than the small products themselves. Here each peft LoRA layer is switched to its base path and a
    forward hook adds the stacked update, with each adapter's scaling folded into B once.
    """

    def __init__(self, peft_model):
        import torch
        from peft.tuners.lora.layer import Linear as LoraLinear

        self._hooks = []
        self._masks: dict[tuple, torch.Tensor] = {}
        self._rows: tuple[str, ...] | None = None
        self._layouts: set[tuple[tuple[str, int], ...]] = set()
        for module in peft_model.modules():
            if not isinstance(module, LoraLinear) or not module.lora_A:
                continue
            names = list(module.lora_A.keys())
            layout = tuple((n, module.r[n]) for n in names)
            dtype = module.get_base_layer().weight.dtype  # peft may keep adapters in fp32 beside a bf16 base
            with torch.no_grad():
                a_all = torch.cat([module.lora_A[n].weight for n in names]).to(dtype).contiguous()
                b_all_t = torch.cat([module.lora_B[n].weight * module.scaling[n] for n in names], dim=1)
                b_all_t = b_all_t.t().to(dtype).contiguous()
            self._dtype, self._device = a_all.dtype, a_all.device
            self._layouts.add(layout)
            module.enable_adapters(False)  # the layer now computes the base output only; the hook adds the rest
            self._hooks.append((module, module.register_forward_hook(self._hook(layout, a_all, b_all_t))))

    @staticmethod
    def supports(peft_model) -> bool:
        """Plain LoRA on nn.Linear only; variants (DoRA...), a bias on B, Conv1D layouts and quantized layers use peft."""
        from peft.tuners.lora.layer import Linear as LoraLinear
        from peft.tuners.lora.layer import LoraLayer

        for module in peft_model.modules():
            if isinstance(module, LoraLayer):
                if type(module) is not LoraLinear or module.lora_variant or module.fan_in_fan_out or module.merged:
                    return False
                if any(module.lora_bias.values()):
                    return False
        return True

    def _hook(self, layout, a_all, b_all_t):
        import torch.nn.functional as F

        def add_lora(module, args, output):
            h = F.linear(args[0], a_all)
            h.mul_(self._masks[layout])  # zero the rank slots of the adapters a row does not use
            output.view(-1, output.shape[-1]).addmm_(h.view(-1, h.shape[-1]), b_all_t)
            return output

        return add_lora

    def select(self, rows: list[str]) -> None:
        """Which adapter each batch row uses (BASE for none), for the forward passes that follow."""
        import torch

        rows = tuple(rows)
        if rows == self._rows:
            return
        masks = {}
        for layout in self._layouts:
            mask = torch.zeros(len(rows), 1, sum(r for _, r in layout), dtype=self._dtype)
            start = 0
            for name, r in layout:
                for i, row in enumerate(rows):
                    if row == name:
                        mask[i, 0, start:start + r] = 1
                start += r
            masks[layout] = mask.to(self._device)
        self._masks, self._rows = masks, rows

    def remove(self) -> None:
        """Back to peft's own forward (before adapters are added or removed)."""
        for module, handle in self._hooks:
            handle.remove()
            module.enable_adapters(True)
        self._hooks = []


# --- pre-packed weights for CPU decoding -------------------------------------------------------------------
@lru_cache(maxsize=1)
def can_pack_weights() -> bool:
    """Whether this torch build has oneDNN's linear-weight packing (the ops torch.compile uses on CPUs), and it works."""
    import torch

    try:
        weight, x = torch.randn(8, 4), torch.randn(3, 4)
        packed = torch.ops.mkldnn._reorder_linear_weight(weight, None)
        got = torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")
        return bool(torch.allclose(got, x @ weight.t(), atol=1e-5))
    except (AttributeError, RuntimeError, NotImplementedError):
        return False


def pack_linear_weights(model) -> int:
    """Re-lay every fp32 nn.Linear weight of `model` in oneDNN's blocked format for CPU inference; returns how many.

    With MKL's kernels a batch of 3 rows costs about 2.5x one row (3.5x for the 49,152-word output layer), so the
    panes' shared batch saved little; on packed weights 3 rows cost about what one does (bench/RESULTS.md, Compare section).
    The plain weight is swapped for an empty placeholder that keeps dtype and device for peft; a weight tied to
    another module (the input embeddings) stays where that module needs it.
    """
    import torch

    if not can_pack_weights():
        return 0
    count = 0
    for module in list(model.modules()):
        weight = getattr(module, "weight", None)
        if type(module) is not torch.nn.Linear or weight.dtype != torch.float32 or weight.device.type != "cpu":
            continue
        packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), None)
        bias = None if module.bias is None else module.bias.detach()
        module.forward = partial(_packed_linear, packed, bias, module.out_features)
        module.weight = torch.nn.Parameter(weight.new_empty(0), requires_grad=False)
        count += 1
    return count


def _packed_linear(packed, bias, out_features: int, x):
    import torch

    y = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, x.shape[-1]), packed, bias, "none", [], "")
    return y.view(*x.shape[:-1], out_features)


# --- loaded models, shared by every browser -----------------------------------------------------------------
def _memory_error(e: BaseException) -> bool:
    import torch

    if isinstance(e, (MemoryError, torch.OutOfMemoryError)):
        return True
    text = str(e).lower()
    words = ("out of memory", "can't allocate", "not enough memory")
    return isinstance(e, RuntimeError) and any(w in text for w in words)


TOO_BIG = (
    "The models do not fit in this machine's memory. Compare fewer runs at once, close other programs, or choose "
    "a smaller model. (The app keeps running.)"
)


@dataclass
class LoadedModel:
    """One model in memory and the lock that lets one forward pass at a time run on it."""
    model: object  # what a forward pass calls
    max_positions: int
    stacked: StackedLora | None = None  # set when adapters share this model through the one-shot path
    peft_rows: bool = False  # adapters share it through peft's mixed batch (adapter_names=...)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def logits(self, names: list[str], ids, mask, positions, cache):
        """Next-token logits (rows x vocab, fp32) and the grown KV cache."""
        kwargs = {}
        with self.lock:
            if self.stacked is not None:
                self.stacked.select(names)
            elif self.peft_rows:
                kwargs["adapter_names"] = list(names)
            try:
                out = self.model(
                    input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache,
                    use_cache=True, logits_to_keep=1, **kwargs,
                )
            except (RuntimeError, MemoryError) as e:
                if _memory_error(e):
                    raise ChatError(TOO_BIG) from None
                raise
        return out.logits[:, -1].float(), out.past_key_values


@dataclass
class Loaded:
    """What a generation needs: the tokenizer, the panes, and which model and adapter serve each pane."""
    tokenizer: object
    panes: list[Pane]
    routes: dict[str, tuple[LoadedModel, str]]  # pane key -> (model, adapter name or BASE)


def cpu_threads() -> int:
    """Half the CPU cores, at least one. Decode steps are small: a second thread mostly waits for a core that a
    training run (or another browser) keeps busy, and then every step gets slower, not faster (see
    bench/RESULTS.md, Compare section)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 2)
    return max(1, cores // 2)


def default_device():
    import torch

    if torch.cuda.is_available():
        return torch.device("cuda"), (torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16)
    return torch.device("cpu"), torch.float32


class ModelCache:
    """The models in memory, shared by every browser: one base with all its adapters, plus separate models.

    Loading is slow and the weights are large, so there is one cache per process, guarded by a lock; what
    each browser chats about stays in its own gr.State.
    """

    def __init__(self, device=None, dtype=None, fast_lora: bool = True, threads: int | None = None,
                 pack_weights: bool = True):
        self._lock = threading.Lock()
        self.pack_weights = pack_weights  # False: plain weights (kept to measure what packing gains)
        self.threads = threads or cpu_threads()  # torch threads of this process while it chats on the CPU
        self.fast_lora = fast_lora  # False: peft's own mixed-adapter batch (kept to check the fast path against)
        self.device, self.dtype = (device, dtype) if device is not None else default_device()
        self._base_dir: Path | None = None
        self._tokenizer = None
        self._base: LoadedModel | None = None
        self._peft = None  # the PeftModel around the base once an adapter is loaded
        self._adapters: dict[str, tuple[str, str]] = {}  # adapter folder -> (weights stamp, adapter name)
        self._separate: dict[str, LoadedModel] = {}  # weights stamp -> model

    def load(self, workspace: Workspace, base_ref: str, panes: list[Pane]) -> Loaded:
        with self._lock:
            try:
                return self._load(workspace, base_ref, panes)
            except ModelError as e:
                raise ChatError(str(e)) from None
            except (RuntimeError, MemoryError) as e:
                if _memory_error(e):
                    self.clear()
                    raise ChatError(TOO_BIG) from None
                raise

    def clear(self) -> None:
        self._base_dir = self._tokenizer = self._base = self._peft = None
        self._adapters, self._separate = {}, {}

    def _load(self, workspace: Workspace, base_ref: str, panes: list[Pane]) -> Loaded:
        import torch

        if self.device.type == "cpu":
            torch.set_num_threads(self.threads)  # process-wide: the process that chats is the UI's
        base_dir = resolve_model(base_ref, workspace.models)
        if base_dir != self._base_dir:
            from transformers import AutoTokenizer

            self.clear()
            self._tokenizer = AutoTokenizer.from_pretrained(base_dir)
            self._base = self._plain_model(self._load_base(base_dir))
            self._base_dir = base_dir
        routes: dict[str, tuple[LoadedModel, str]] = {}
        for pane in panes:
            if pane.kind == "base":
                routes[pane.key] = (self._base, BASE)
            elif pane.kind == "lora":
                routes[pane.key] = (self._base, self._adapter(pane))
        keep = {}
        for pane in panes:
            if pane.kind == "separate":
                stamp = weights_stamp(pane.weights)
                keep[stamp] = self._separate.get(stamp) or self._load_separate(base_dir, pane)
                routes[pane.key] = (keep[stamp], BASE)
        self._separate = keep  # models no pane needs any more give their memory back
        return Loaded(self._tokenizer, list(panes), routes)

    def _load_base(self, folder: Path):
        return load_causal_lm(folder, dtype=self.dtype).to(self.device).eval()

    def _plain_model(self, model, pack: bool = True) -> LoadedModel:
        """A model ready to decode. Weights are packed before any adapter wraps the layers; a model that already has
        adapter layers (DoRA reads its base weight, IA3 scales it) keeps plain weights."""
        if pack and self.pack_weights:
            pack_linear_weights(model)
        return LoadedModel(model, int(getattr(model.config, "max_position_embeddings", 0) or 1 << 30))

    def _load_separate(self, base_dir: Path, pane: Pane) -> LoadedModel:
        spec = methods.get_method(pane.method)
        base = self._load_base(base_dir) if spec.saves_adapter else None
        if base is not None:
            check_adapter_fits(base, pane.weights, pane.key)
        try:
            model = methods.load_trained(base, pane.method, pane.weights)
        except (ValueError, KeyError, RuntimeError) as e:  # MethodError is a ValueError
            if _memory_error(e):
                raise
            raise ChatError(f"Run {pane.key}'s weights could not be loaded on this base model: {e}") from None
        return self._plain_model(model.to(self.device, self.dtype).eval(), pack=not spec.saves_adapter)

    def _adapter(self, pane: Pane) -> str:
        """Load a pane's adapter into the shared base (once) and return its adapter name."""
        folder, stamp = str(pane.weights), weights_stamp(pane.weights)
        known = self._adapters.get(folder)
        if known and known[0] == stamp:
            return known[1]
        base = self._base
        with base.lock:  # no forward pass of another browser may run while layers change
            check_adapter_fits(self._peft or base.model, pane.weights, pane.key)
            if base.stacked is not None:
                base.stacked.remove()
            name = f"a{len(self._adapters)}_{abs(hash(stamp)) % 10**8}"
            try:
                if self._peft is None:
                    self._peft = methods.load_trained(base.model, pane.method, pane.weights, adapter_name=name)
                else:
                    self._peft.load_adapter(str(pane.weights), adapter_name=name)
                    if known:  # the run saved new weights since: drop the old ones
                        self._peft.delete_adapter(known[1])
                self._adapters[folder] = (stamp, name)
            except (ValueError, KeyError, RuntimeError) as e:
                if _memory_error(e):
                    raise
                raise ChatError(f"Run {pane.key}'s adapter could not be loaded on this base model: {e}") from None
            finally:
                self._route_adapters()
        return name

    def _route_adapters(self) -> None:
        """Point the shared model at the one-shot LoRA path when every adapter allows it, else at peft's."""
        base, peft_model = self._base, self._peft
        if peft_model is None:
            return
        peft_model.to(self.device).eval()
        if self.fast_lora and StackedLora.supports(peft_model):
            base.stacked, base.peft_rows = StackedLora(peft_model), False
            base.model = peft_model.base_model.model  # the transformers model, LoRA layers inside
        else:
            base.stacked, base.peft_rows, base.model = None, True, peft_model


def weights_stamp(folder: Path) -> str:
    """Folder plus the newest file time: a run that saved new weights since is loaded again."""
    newest = max((p.stat().st_mtime_ns for p in Path(folder).iterdir() if p.is_file()), default=0)
    return f"{folder}@{newest}"


def check_adapter_fits(model, adapter_dir: Path, run_key: str) -> None:
    """Compare each LoRA matrix's shape with the layer it attaches to, so a wrong base is named in plain words."""
    from safetensors import safe_open

    path = Path(adapter_dir) / "adapter_model.safetensors"
    if not path.is_file():
        return  # older .bin adapters: peft's own loading checks them
    inner = model.base_model.model if hasattr(model, "peft_config") else model
    with safe_open(str(path), "pt") as f:
        for key in f.keys():
            for part, dim, what in ((".lora_A.", 1, "inputs"), (".lora_B.", 0, "outputs")):
                if part not in key:
                    continue
                module_path = key.split(part)[0].removeprefix("base_model.model.")
                try:
                    layer = inner.get_submodule(module_path)
                except AttributeError:
                    raise ChatError(
                        f"Run {run_key}'s adapter expects a layer {module_path} that this base model does not have: "
                        f"it was trained on another model. Choose the model it was trained on."
                    ) from None
                linear = getattr(layer, "base_layer", layer)  # in/out features: packed weights have no plain shape
                got = f.get_slice(key).get_shape()[dim]
                want = getattr(linear, "in_features" if dim else "out_features", got)
                if got != want:
                    raise ChatError(
                        f"Run {run_key}'s adapter does not fit this base model: layer {module_path} has {want} {what} "
                        f"here, the adapter was trained for {got}. It was trained on another model; choose that one."
                    )


# --- sampling and the streaming loop -----------------------------------------------------------------------
@dataclass(frozen=True)
class Sampling:
    max_new_tokens: int = 256  # answers stop here if the model has not finished
    temperature: float = 0.7  # 0 = always the most likely token (greedy); higher = more varied
    top_p: float = 0.9  # sample only from the most likely tokens that together hold this share
    repetition_penalty: float = 1.0  # above 1 discourages tokens already in the chat
    seed: int = 0  # every pane draws from its own generator seeded with this, so reruns repeat

    def __post_init__(self) -> None:
        def bad(name: str, why: str) -> ChatError:
            return ChatError(f"{name}={getattr(self, name)!r}: {why}")

        if not 1 <= int(self.max_new_tokens) <= 8192:
            raise bad("max_new_tokens", "must be between 1 and 8192")
        if not 0 <= float(self.temperature) <= 10:
            raise bad("temperature", "must be between 0 (greedy) and 10")
        if not 0 < float(self.top_p) <= 1:
            raise bad("top_p", "must be above 0 and at most 1")
        if not 0 < float(self.repetition_penalty) <= 10:
            raise bad("repetition_penalty", "must be above 0 (1 = off)")


@dataclass
class RowOutput:
    """One row's answer so far."""
    text: str = ""
    tokens: int = 0
    done: bool = False
    first_token_s: float | None = None  # from the start of the call to this row's first token
    seconds: float = 0.0  # from the start of the call to this row's latest token

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


def stop_token_ids(tokenizer, model_config=None) -> set[int]:
    ids = {tokenizer.eos_token_id}
    end_of_turn = tokenizer.convert_tokens_to_ids("<|im_end|>") if "<|im_end|>" in tokenizer.get_vocab() else None
    ids.add(end_of_turn)
    configured = getattr(model_config, "eos_token_id", None)
    ids.update(configured if isinstance(configured, list) else [configured])
    return {i for i in ids if i is not None}


def pick_tokens(logits, sampling: Sampling, seen, generators) -> list[int]:
    """One token per row: repetition penalty, then greedy, or temperature + top-p with each row's own generator."""
    import torch

    if sampling.repetition_penalty != 1.0:
        penalised = torch.where(logits > 0, logits / sampling.repetition_penalty, logits * sampling.repetition_penalty)
        logits = torch.where(seen, penalised, logits)
    if sampling.temperature == 0:
        return logits.argmax(-1).tolist()
    probs = torch.softmax(logits / sampling.temperature, dim=-1)
    order = None
    if sampling.top_p < 1:
        probs, order = probs.sort(dim=-1, descending=True)
        # Keep the smallest set of most likely tokens whose mass reaches top_p (always the first one).
        probs[(probs.cumsum(-1) - probs) > sampling.top_p] = 0
    # Inverse-CDF draw: one uniform number per row from the row's own generator, so a row's draws do not depend
    # on the other rows of the batch (and it is much cheaper than torch.multinomial over a whole vocabulary).
    cdf = probs.cumsum(-1)
    picks = []
    for i, generator in enumerate(generators):
        u = torch.rand(1, generator=generator, device=cdf.device) * cdf[i, -1]
        j = min(int(torch.searchsorted(cdf[i], u, right=True)), cdf.shape[-1] - 1)
        picks.append(int(order[i, j]) if order is not None else j)
    return picks


class _Decoder:
    """The KV-cache decode state of the rows that run through one model: left-padded, compacted as rows finish."""

    def __init__(self, model: LoadedModel, rows: list[int], names: list[str], prompts: list[list[int]], pad_id: int,
                 sampling: Sampling, device):
        import torch

        self.model, self.rows, self.names, self.sampling = model, list(rows), list(names), sampling
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
        self.mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, width - len(p):] = torch.tensor(p, dtype=torch.long)
            self.mask[i, width - len(p):] = 1
        positions = (self.mask.cumsum(-1) - 1).clamp(min=0)
        self.next_pos = positions[:, -1] + 1
        self.pending = (ids.to(device), positions.to(device))
        self.mask = self.mask.to(device)
        self.prompts = prompts
        self.seen = None  # rows x vocab: tokens already in each row, for the repetition penalty
        self.cache = None
        self.generators = [torch.Generator(device=device).manual_seed(int(sampling.seed)) for _ in rows]

    def pick(self) -> list[int]:
        import torch

        ids, positions = self.pending
        logits, self.cache = self.model.logits(self.names, ids, self.mask, positions, self.cache)
        if self.seen is None:
            self.seen = torch.zeros(logits.shape, dtype=torch.bool, device=logits.device)
            for i, p in enumerate(self.prompts):
                self.seen[i, torch.tensor(p, device=logits.device)] = True
        return pick_tokens(logits, self.sampling, self.seen, self.generators)

    def advance(self, tokens: list[int], keep: list[int]) -> None:
        """Feed the picked tokens back; rows not in `keep` (positions in this batch) have finished."""
        import torch

        device = self.mask.device
        new = torch.tensor(tokens, dtype=torch.long, device=device)
        self.seen[torch.arange(len(tokens), device=device), new] = True
        if len(keep) < len(self.rows):
            index = torch.tensor(keep, dtype=torch.long, device=device)
            self.cache.batch_select_indices(index)
            self.mask, self.seen, self.next_pos, new = self.mask[index], self.seen[index], self.next_pos[index], new[index]
            self.rows = [self.rows[i] for i in keep]
            self.names = [self.names[i] for i in keep]
            self.generators = [self.generators[i] for i in keep]
        self.mask = torch.cat([self.mask, torch.ones((len(keep), 1), dtype=torch.long, device=device)], dim=1)
        self.pending = (new[:, None], self.next_pos[:, None].to(device))
        self.next_pos = self.next_pos + 1


def generate(loaded: Loaded, rows: list[tuple[str, str]], sampling: Sampling) -> Iterator[list[RowOutput]]:
    """Answer each (pane key, prompt text) row; yields every row's answer so far after each token.

    All rows advance together: the rows that share a model run in one forward pass, the models run one after
    the other within a step, and the caller sees every pane grow at once. Stop by no longer iterating.
    """
    import torch

    tokenizer = loaded.tokenizer
    outputs = [RowOutput() for _ in rows]
    token_ids: list[list[int]] = [[] for _ in rows]
    grouped: dict[int, tuple[LoadedModel, list[int], list[str]]] = {}
    for i, (key, _) in enumerate(rows):
        if key not in loaded.routes:
            raise ChatError(f"{key!r} is not loaded; choose the runs again.")
        model, name = loaded.routes[key]
        grouped.setdefault(id(model), (model, [], []))
        grouped[id(model)][1].append(i)
        grouped[id(model)][2].append(name)
    prompts = [tokenizer(text, add_special_tokens=False)["input_ids"] for _, text in rows]
    for model, indices, _ in grouped.values():
        longest = max(len(prompts[i]) for i in indices)
        if longest + sampling.max_new_tokens > model.max_positions:
            raise ChatError(
                f"The chat is {longest} tokens long and this model reads at most {model.max_positions}: press Clear "
                f"to start a new chat, or lower the maximum new tokens."
            )
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    stops = stop_token_ids(tokenizer, getattr(next(iter(grouped.values()))[0].model, "config", None))
    start = time.perf_counter()
    with torch.inference_mode():
        decoders = [
            _Decoder(model, indices, names, [prompts[i] for i in indices], pad_id, sampling, _model_device(model))
            for model, indices, names in grouped.values()
        ]
    while decoders:
        for decoder in decoders:
            # inference_mode is entered per step, never across a yield: the consumer may resume us on another thread.
            with torch.inference_mode():
                picked = decoder.pick()
                now = time.perf_counter() - start
                keep = []
                for j, (row, token) in enumerate(zip(decoder.rows, picked)):
                    out = outputs[row]
                    if out.first_token_s is None:
                        out.first_token_s = now
                    out.seconds = now
                    if token in stops:
                        out.done = True
                    else:
                        token_ids[row].append(token)
                        out.tokens += 1
                        out.done = out.tokens >= sampling.max_new_tokens
                    text = tokenizer.decode(token_ids[row], skip_special_tokens=True)
                    # A character split over several tokens shows as U+FFFD until its last byte arrives.
                    if out.done or not text.endswith("\ufffd"):
                        out.text = text
                    if not out.done:
                        keep.append(j)
                if keep:
                    decoder.advance(picked, keep)
        decoders = [d for d in decoders if any(not outputs[r].done for r in d.rows)]
        yield [RowOutput(**asdict(o)) for o in outputs]


def _model_device(model: LoadedModel):
    import torch

    params = getattr(model.model, "parameters", None)
    return next(params()).device if params else torch.device("cpu")


# --- chat histories (the messages format the UI keeps per pane) ------------------------------------------------
def message_text(content) -> str:
    """The text of a message's content: a string, or a list of content blocks ({"type": "text", "text": ...})."""
    if isinstance(content, str):
        return content
    if isinstance(content, dict):
        return str(content.get("text") or "")
    if isinstance(content, list):
        return "".join(message_text(part) for part in content)
    return ""


def chat_turns(history: list[dict] | None) -> list[tuple[str, str | None]]:
    """(user, assistant) pairs from a messages-format history; None for a question not answered yet."""
    turns: list[tuple[str, str | None]] = []
    for message in history or []:
        if not isinstance(message, dict):
            continue
        role, text = message.get("role"), message_text(message.get("content"))
        if role == "user":
            turns.append((text, None))
        elif role == "assistant" and turns and turns[-1][1] is None:
            turns[-1] = (turns[-1][0], text)
    return turns
