"""The chat's model cache: the models in memory, shared by every browser of the process.

One copy of the base weights serves the base pane and every LoRA-family adapter trained on it: each row of the
batch says which adapter it uses, and `StackedLora` applies every adapter of a layer in one shot. A full fine-tune,
or an adapter that cannot share a batch (DoRA, prefix tuning, IA3...), gets a model of its own. On a CPU the plain
weights are pre-packed for oneDNN, so that a batch of panes costs about what one row does.
"""
from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field
from functools import lru_cache, partial
from pathlib import Path

from app import methods
from app.chat.panes import BASE, ChatError, Pane
from app.memory.device import is_oom
from app.models import ModelError, load_causal_lm, resolve_model
from app.workspace import Workspace


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
                if is_oom(e):
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
                if is_oom(e):
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
            if is_oom(e):
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
                if is_oom(e):
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

    path = Path(adapter_dir) / methods.ADAPTER_WEIGHTS
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
