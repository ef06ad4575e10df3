"""The METHODS registry: each fine-tuning method as one entry (its knobs, how to apply, count, save and load it)."""
from __future__ import annotations

import json
import re
import warnings
from dataclasses import asdict, dataclass, field, fields
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable

import yaml

ATTENTION_OUTPUTS = ("o_proj", "out_proj", "dense", "c_proj")  # linear layers that read the attention output
PRESETS_DIR = Path(__file__).resolve().parents[2] / "presets"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


class MethodError(ValueError):
    """A method argument that cannot work; the message names the field and the value."""


def knob(default, label: str, info: str, **widget) -> Any:
    """A method setting plus what the UI needs to draw it (label, a plain `info` line, range or choices).

    widget keys: minimum, maximum, step (numbers), choices (a list), custom (True: free text beside the choices).
    """
    return field(default=default, metadata={"label": label, "info": info, **widget})


# --- the knobs of each method -------------------------------------------------------------------------------
# Fields with the same name in several methods mean the same thing and share one control in the UI.
def _check_range(obj, name: str, low: float, high: float | None = None, *, below: bool = False) -> None:
    value = getattr(obj, name)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise MethodError(f"{name}={value!r}: must be a number")
    too_high = high is not None and (value >= high if below else value > high)
    if value < low or too_high:
        upper = "" if high is None else (f" and below {high}" if below else f" and at most {high}")
        raise MethodError(f"{name}={value!r}: must be at least {low}{upper}")


def _check_positive(obj, name: str) -> None:
    value = getattr(obj, name)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise MethodError(f"{name}={value!r}: must be a positive number")


def _check_choice(obj, name: str, choices) -> None:
    if getattr(obj, name) not in choices:
        raise MethodError(f"{name}={getattr(obj, name)!r}: choose one of {', '.join(map(str, choices))}")


def _check_int(obj, name: str, low: int, high: int | None = None) -> None:
    value = getattr(obj, name)
    if isinstance(value, bool) or not isinstance(value, int):
        if isinstance(value, float) and value.is_integer():
            setattr(obj, name, int(value))  # a UI slider sends 8.0 for 8
        else:
            raise MethodError(f"{name}={value!r}: must be a whole number")
    _check_range(obj, name, low, high)


@dataclass
class NoArgs:
    pass


@dataclass
class FreezeArgs:
    top_layers: int = knob(2, "Layers to train", "How many of the last layers learn; all the layers below stay frozen.",
                           minimum=1, maximum=128, step=1)

    def __post_init__(self) -> None:
        _check_int(self, "top_layers", 1)


TARGET_INFO = ("Which layers get an update: attention (q, k, v, o projections), all linear layers (learns more, "
               "costs more), or type module names separated by commas.")


@dataclass
class LoraArgs:
    r: int = knob(8, "Rank r", "Size of the learned update: higher learns more and needs more memory. 8 or 16 is typical.",
                  minimum=1, maximum=256, step=1)
    alpha: int = knob(16, "Alpha", "Scales the update by alpha / r. About twice r is a good start.",
                      minimum=1, maximum=512, step=1)
    dropout: float = knob(0.05, "Dropout", "Randomly hides part of the input to the update while training; a little "
                          "(0.05) helps against over-fitting on small data.", minimum=0.0, maximum=0.5, step=0.01)
    targets: str = knob("attention", "Target layers", TARGET_INFO, choices=["attention", "all-linear"], custom=True)
    dora: bool = knob(False, "DoRA", "Also learns the length of each weight column on its own (weight-decomposed LoRA): "
                      "often a little better, a little slower.")
    rslora: bool = knob(False, "rsLoRA", "Scale by alpha/√r instead of alpha/r, so high ranks learn as fast as low ones.")

    def __post_init__(self) -> None:
        _check_int(self, "r", 1)
        _check_positive(self, "alpha")
        _check_range(self, "dropout", 0, 1, below=True)
        target_names(self.targets)


@dataclass
class QLoraArgs(LoraArgs):
    bits: int = knob(4, "Base model bits", "How the frozen model is stored: 4-bit NF4 (about 4x smaller than bf16) or "
                     "8-bit (about 2x smaller, a little more exact).", choices=[4, 8])
    double_quant: bool = knob(True, "Double quantization", "Also compresses the 4-bit scaling constants: about 0.4 bits "
                              "less per weight, at no cost in quality.")
    compute_dtype: str = knob("auto", "Compute precision", "Precision the stored weights are expanded to for each "
                              "multiplication. auto = bf16 on a GPU that has it, else fp32.",
                              choices=["auto", "bf16", "fp16", "fp32"])

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_choice(self, "bits", (4, 8))
        _check_choice(self, "compute_dtype", ("auto", *DTYPES))


@dataclass
class AdaLoraArgs:
    r: int = knob(12, "Rank r", "Starting rank of each update; AdaLoRA then moves rank to the layers that need it most.",
                  minimum=1, maximum=256, step=1)
    target_r: int = knob(8, "Final average rank", "Average rank AdaLoRA ends with after redistributing it.",
                         minimum=1, maximum=256, step=1)
    alpha: int = knob(16, "Alpha", "Scales the update by alpha / r. About twice r is a good start.",
                      minimum=1, maximum=512, step=1)
    dropout: float = knob(0.05, "Dropout", "Randomly hides part of the input to the update while training; a little "
                          "(0.05) helps against over-fitting on small data.", minimum=0.0, maximum=0.5, step=0.01)
    targets: str = knob("attention", "Target layers", TARGET_INFO, choices=["attention", "all-linear"], custom=True)

    def __post_init__(self) -> None:
        _check_int(self, "r", 1)
        _check_int(self, "target_r", 1)
        if self.target_r > self.r:
            raise MethodError(f"target_r={self.target_r!r}: must not exceed the starting rank r={self.r}")
        _check_positive(self, "alpha")
        _check_range(self, "dropout", 0, 1, below=True)
        target_names(self.targets)


@dataclass
class VirtualTokenArgs:
    virtual_tokens: int = knob(20, "Virtual tokens", "How many learned vectors are put in front of every input: more "
                               "can learn more, and every step gets a little longer.", minimum=1, maximum=200, step=1)

    def __post_init__(self) -> None:
        _check_int(self, "virtual_tokens", 1, 1000)


@dataclass
class AdapterArgs:
    bottleneck: int = knob(64, "Bottleneck width", "Width of the adapter's middle layer: wider learns more.",
                           minimum=1, maximum=1024, step=1)
    placement: str = knob("sequential", "Placement", "After each MLP block (sequential), or beside it (parallel: "
                          "adds no extra step in series).", choices=["sequential", "parallel"])

    def __post_init__(self) -> None:
        _check_int(self, "bottleneck", 1)
        _check_choice(self, "placement", ("sequential", "parallel"))


def target_names(targets: str) -> list[str]:
    """The module-name list a `targets` value stands for (attention / all-linear resolve against the model)."""
    if targets in ("attention", "all-linear"):
        return [targets]
    if not isinstance(targets, str):
        raise MethodError(f"targets={targets!r}: choose attention, all-linear or a comma list of module names")
    names = [t.strip() for t in targets.split(",") if t.strip()]
    if not names:
        raise MethodError(f"targets={targets!r}: name at least one module, or choose attention / all-linear")
    bad = [n for n in names if not re.fullmatch(r"[A-Za-z0-9_.]+", n)]
    if bad:
        raise MethodError(f"targets={targets!r}: {bad[0]!r} is not a module name (letters, digits, _ and . only)")
    return names


# --- what a model is made of (from the meta device: exact shapes, no memory) ---------------------------------
@dataclass(frozen=True)
class LinearInfo:
    name: str  # module path, e.g. "model.layers.3.self_attn.q_proj"
    in_features: int
    out_features: int
    layer: int | None  # decoder layer index; None outside the layer stack (e.g. lm_head)


@dataclass(frozen=True)
class Inventory:
    """Everything the counts and the memory estimate need to know about an architecture."""
    model_type: str
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    total: int  # parameters, tied weights counted once
    embed_params: int
    tied_embeddings: bool  # the output layer reuses the input embedding matrix
    linears: tuple[LinearInfo, ...]
    output_name: str  # the lm_head path: never quantized, left out of "all-linear"
    norms: tuple[tuple[str, int], ...]  # (module path, parameter count) of every norm layer
    layer_params: tuple[int, ...]  # parameters of each decoder layer
    bias_params: int  # parameters named *.bias (what BitFit trains)
    norms_per_layer: int
    prefix_width: int  # per-layer width of prefix tuning's keys (peft: kv heads x head dim with GQA)
    final_softcap: bool  # logits go through tanh soft-capping (Gemma 2)
    checkpoint_dtype_bytes: int  # bytes per weight in the saved checkpoint (config's dtype; bf16 when unsaid)
    gated_mlp: bool  # gate and up projections (SwiGLU/GeGLU) rather than one up projection
    norm_readers: int  # linear layers per decoder layer that read a norm's output (q, k, v, gate, up)

    @property
    def q_dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    @property
    def layer_linears(self) -> tuple[LinearInfo, ...]:
        return tuple(l for l in self.linears if l.name != self.output_name)


def decoder_layers(model) -> tuple[str, Any]:
    """(path, ModuleList) of the decoder layer stack: the ModuleList as long as the config's layer count."""
    import torch.nn as nn

    from app.models import text_config

    n = text_config(model.config).num_hidden_layers
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == n:
            return name, module
    raise MethodError(f"could not find the {n} decoder layers of this {model.config.model_type} model")


def _layer_of(name: str, prefix: str) -> int | None:
    if not name.startswith(prefix + "."):
        return None
    return int(name[len(prefix) + 1:].split(".", 1)[0])


def linear_modules(model) -> tuple[LinearInfo, ...]:
    """Every linear layer (4/8-bit ones included: they subclass nn.Linear) with its shape and layer index."""
    import torch.nn as nn

    prefix, _ = decoder_layers(model)
    found = []
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear):
            found.append(LinearInfo(name, m.in_features, m.out_features, _layer_of(name, prefix)))
    return tuple(found)


def build_inventory(config) -> Inventory:
    """The inventory of `config`'s architecture, built on the meta device (no weights, well under a second)."""
    from app.models import meta_model, text_config

    model = meta_model(config)
    tc = text_config(config)
    prefix, layers = decoder_layers(model)
    output = model.get_output_embeddings()
    output_name = next((n for n, m in model.named_modules() if m is output), "")
    norms = tuple(
        (n, sum(p.numel() for p in m.parameters(recurse=False)))
        for n, m in model.named_modules()
        if "norm" in type(m).__name__.lower() and any(True for _ in m.parameters(recurse=False))
    )
    heads = tc.num_attention_heads
    head_dim = getattr(tc, "head_dim", None) or tc.hidden_size // heads
    has_kv = getattr(tc, "num_key_value_heads", None) is not None
    kv_heads = tc.num_key_value_heads if has_kv else heads
    layer_norms = [n for n, _ in norms if _layer_of(n, prefix) == 0]
    intermediate = getattr(tc, "intermediate_size", None) or 4 * tc.hidden_size
    linears = linear_modules(model)
    return Inventory(
        model_type=tc.model_type,
        layers=len(layers),
        hidden=tc.hidden_size,
        heads=heads,
        kv_heads=kv_heads,
        head_dim=head_dim,
        intermediate=intermediate,
        vocab=tc.vocab_size,
        total=sum(p.numel() for p in model.parameters()),
        embed_params=model.get_input_embeddings().weight.numel(),
        tied_embeddings=output is not None and output.weight is model.get_input_embeddings().weight,
        linears=linears,
        output_name=output_name,
        norms=norms,
        layer_params=tuple(sum(p.numel() for p in layer.parameters()) for layer in layers),
        bias_params=sum(p.numel() for n, p in model.named_parameters() if n.endswith(".bias")),
        norms_per_layer=len(layer_norms),
        prefix_width=head_dim * kv_heads if has_kv else tc.hidden_size,
        final_softcap=bool(getattr(tc, "final_logit_softcapping", None)),
        checkpoint_dtype_bytes=4 if "float32" in str(getattr(config, "dtype", None) or "") else 2,
        gated_mlp=sum(1 for l in linears if l.layer == 0 and l.out_features == intermediate) >= 2,
        norm_readers=sum(1 for l in linears if l.layer == 0 and l.in_features == tc.hidden_size
                         and not l.name.endswith(ATTENTION_OUTPUTS)),
    )


@lru_cache(maxsize=32)
def cached_inventory(ref: str, models_dir: str) -> Inventory:
    """build_inventory for a model reference, memoised: the live estimate asks again on every slider move."""
    from app.models import cached_config

    return build_inventory(cached_config(ref, models_dir))


def _matches(name: str, key: str) -> bool:
    """peft's rule: a target key matches a module whose path is the key or ends with '.key'."""
    return name == key or name.endswith("." + key)


def resolve_targets(linears: tuple[LinearInfo, ...], output_name: str, targets: str) -> list[LinearInfo]:
    """The linear layers a `targets` value selects, with the same matching rule peft applies."""
    names = target_names(targets)
    inside = [l for l in linears if l.name != output_name]
    if names == ["attention"]:
        chosen = [l for l in inside if l.layer is not None and re.search(r"attn|attention", l.name)]
        if not chosen:
            raise MethodError("targets='attention': this model has no layer named like attention; use all-linear")
        return chosen
    if names == ["all-linear"]:
        return inside
    chosen, known = [], sorted({l.name.rsplit(".", 1)[-1] for l in linears})
    for key in names:
        hits = [l for l in linears if _matches(l.name, key)]
        if not hits:
            raise MethodError(f"targets={targets!r}: this model has no linear layer named {key!r}; it has {', '.join(known)}")
        chosen += [l for l in hits if l not in chosen]
    return chosen


def peft_target_list(chosen: list[LinearInfo]) -> list[str]:
    """Short names that select exactly `chosen` (so the count and peft agree on what is adapted)."""
    return sorted({l.name.rsplit(".", 1)[-1] for l in chosen})


# --- precision ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PrecisionPlan:
    """How a RunConfig.precision value is carried out (as app.training.worker's precision_dtypes does); the estimate assumes it."""
    name: str  # fp32 | bf16 | fp16 | bf16-mixed (auto resolved)
    load_dtype: str  # torch dtype name the model's own weights are loaded and trained in
    autocast_dtype: str | None  # compute dtype under torch.autocast; None = no autocast

    @property
    def compute_dtype(self) -> str:
        return self.autocast_dtype or self.load_dtype


def precision_plan(precision: str, device: str = "cpu", bf16_supported: bool = True,
                   trains_base: bool = False) -> PrecisionPlan:
    """auto: bf16 on a GPU that has it, else fp32.

    bf16: weights in bf16, computing under bf16 autocast. bf16-mixed: weights in fp32 (the master copy) computing under
    bf16 autocast; an adapter method's frozen linears are then stored in bf16 (store_frozen_linears_in). fp16: fp16 autocast, with trained base weights (trains_base: full, freeze, BitFit) in fp32 and a
    frozen base in fp16. Adapters a method adds (LoRA, prompts, ...) are fp32 in every plan, as peft keeps them.
    """
    if precision == "auto":
        precision = "bf16" if device == "cuda" and bf16_supported else "fp32"
    if precision == "fp32":
        return PrecisionPlan("fp32", "float32", None)
    if precision == "bf16":
        return PrecisionPlan("bf16", "bfloat16", "bfloat16")
    if precision == "bf16-mixed":
        return PrecisionPlan("bf16-mixed", "float32", "bfloat16")
    if precision == "fp16":
        return PrecisionPlan("fp16", "float32" if trains_base else "float16", "float16")
    raise MethodError(f"precision={precision!r}: choose one of auto, fp32, bf16, fp16, bf16-mixed")


def plan_for(method: str, precision: str, device: str = "cpu", bf16_supported: bool = True) -> PrecisionPlan:
    return precision_plan(precision, device, bf16_supported, trains_base=not get_method(method).saves_adapter)


# --- what a method does to memory ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Footprint:
    """What a method changes about memory, read by app.memory.estimate (which never names a method)."""
    trainable: int  # exact trainable parameters
    added: int  # parameters the method adds (adapters, prompts), kept in fp32; 0 if it trains existing ones
    base_trainable: int  # of the model's own parameters, how many train (in the load dtype)
    grad_layers: int  # top decoder layers whose activations are kept for backward (all but freeze, adapter)
    layer_weights_train: bool  # the base linears of those layers train, so they keep their inputs
    norms_train: bool  # the layers' norm weights train, so they keep their normalised input
    final_norm_trains: bool
    output_trains: bool  # the lm_head (or the tied embedding) trains, so it keeps its input
    embeddings_train: bool  # the residual stream is then in the trainable dtype
    first_input_grad: bool = False  # the first kept layer's input needs a gradient (its first norm keeps it)
    quant_bits: int | None = None
    double_quant: bool = False
    extra_tokens: int = 0  # virtual tokens prepended to every sequence (prompt tuning, P-tuning)
    extra_kv_tokens: int = 0  # virtual keys/values in every layer (prefix tuning)
    extra_layer_bytes: int = 0  # per token and layer: what the method's own modules keep for backward
    extra_step_bytes: int = 0  # once per step, whatever the batch (P-tuning's prompt encoder)
    base_read_params: int = 0  # frozen base linear weights the method's layers read as matrices (DoRA's norms)
    first_layer_saving: int = 0  # per token: what the first layer's adapters need not keep (their input has no gradient)


@dataclass(frozen=True)
class Dtypes:
    """Byte sizes the activation rules need, from a PrecisionPlan and the device."""
    compute: int
    load: int
    autocast: bool
    mask: int  # a dropout mask per element: CUDA's fused dropout keeps bytes, CPU multiplies by an fp32 mask

    @classmethod
    def of(cls, plan: PrecisionPlan, device: str = "cuda") -> "Dtypes":
        return cls(DTYPE_BYTES[plan.compute_dtype], DTYPE_BYTES[plan.load_dtype], plan.autocast_dtype is not None,
                   1 if device == "cuda" else 4)


def _frozen(inv: Inventory, added: int, **extra) -> Footprint:
    """Footprint of a method that freezes every base weight and adds `added` fp32 parameters."""
    return Footprint(trainable=added, added=added, base_trainable=0,
                     grad_layers=extra.pop("grad_layers", inv.layers), layer_weights_train=False, norms_train=False,
                     final_norm_trains=False, output_trains=False, embeddings_train=False, **extra)


def _adapter_input_bytes(chosen: list[LinearInfo], layers: int, dropout: float, r: int, dt: Dtypes,
                         out_copies: int = 0, grouped: bool = False) -> int:
    """Per token and layer: what LoRA-style updates keep for backward.

    peft keeps adapter weights in fp32 and casts the layer input to fp32 first. With dropout each adapted layer keeps a
    mask and the dropped input; without, its cast input; under autocast, the half copy A computes with. Only in plain
    fp32 without dropout does A keep the layer's own input tensor, which q, k and v (or gate and up) share, and which
    attention already keeps for the output projection. `out_copies`: output-sized tensors the variant keeps per layer
    it adapts (DoRA rescales two, AdaLoRA divides one by the rank). `grouped`: app.training.lora_groups computes the layers
    instead (plain LoRA under autocast): with dropout each keeps its dropped input and a one-byte mask; without, a
    group of layers reading one input keeps one half copy of it.
    """
    per_layer = [l for l in chosen if l.layer is not None]
    a = dt.compute if dt.autocast else 4  # bytes per element of the adapter's own math
    if grouped and dropout == 0:
        groups = {(l.layer, l.name.rsplit(".", 2)[-2], l.in_features, l.name.endswith(ATTENTION_OUTPUTS))
                  for l in per_layer}
        kept = a * sum(g[2] for g in groups)
    elif grouped:
        kept = (a + 1) * sum(l.in_features for l in per_layer)
    elif not dt.autocast and dt.compute == 4 and dropout == 0:
        groups = {(l.layer, l.name.rsplit(".", 2)[-2], l.in_features) for l in per_layer
                  if not l.name.endswith(ATTENTION_OUTPUTS)}
        kept = 4 * sum(width for _, _, width in groups)
    else:
        kept = sum((a + (dt.mask if dropout > 0 else 0)) * l.in_features for l in per_layer)
    kept += a * r * len(per_layer)  # lora_B keeps A's output
    kept += out_copies * a * sum(l.out_features for l in per_layer)
    return kept // max(layers, 1)


def _first_layer_masks(chosen: list[LinearInfo], dropout: float, dt: Dtypes, grouped: bool = False) -> int:
    """Dropout on the first layer's attention input (no gradient there yet) keeps no mask."""
    if dropout == 0:
        return 0
    return sum((1 if grouped else dt.mask) * l.in_features for l in chosen
               if l.layer == 0 and re.search(r"attn|attention", l.name) and not l.name.endswith(ATTENTION_OUTPUTS))


# full
def _full_apply(model, args, total_steps):
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def _full_count(inv: Inventory, args) -> int:
    return inv.total


def _full_footprint(inv: Inventory, args, dt: Dtypes) -> Footprint:
    return Footprint(trainable=inv.total, added=0, base_trainable=inv.total,
                     grad_layers=inv.layers, layer_weights_train=True, norms_train=True, final_norm_trains=True,
                     output_trains=True, embeddings_train=True, first_input_grad=True)


# freeze tuning
def _check_top_layers(args: FreezeArgs, layers: int) -> None:
    if args.top_layers > layers:
        raise MethodError(f"top_layers={args.top_layers}: this model has only {layers} layers")


def _freeze_apply(model, args: FreezeArgs, total_steps):
    _, layers = decoder_layers(model)
    _check_top_layers(args, len(layers))
    for layer in list(layers)[len(layers) - args.top_layers:]:
        for p in layer.parameters():
            p.requires_grad_(True)
    return model


def _freeze_count(inv: Inventory, args: FreezeArgs) -> int:
    _check_top_layers(args, inv.layers)
    return sum(inv.layer_params[inv.layers - args.top_layers:])


def _freeze_footprint(inv: Inventory, args: FreezeArgs, dt: Dtypes) -> Footprint:
    n = _freeze_count(inv, args)
    return Footprint(trainable=n, added=0, base_trainable=n,
                     grad_layers=args.top_layers, layer_weights_train=True, norms_train=True, final_norm_trains=False,
                     output_trains=False, embeddings_train=False)


# LoRA and QLoRA
def _lora_config(model, args: LoraArgs):
    from peft import LoraConfig

    chosen = resolve_targets(linear_modules(model), _output_name(model), args.targets)
    return LoraConfig(r=args.r, lora_alpha=args.alpha, lora_dropout=args.dropout, use_dora=args.dora,
                      use_rslora=args.rslora, target_modules=peft_target_list(chosen), task_type="CAUSAL_LM")


def _output_name(model) -> str:
    output = model.get_output_embeddings()
    return next((n for n, m in model.named_modules() if m is output), "")


def _lora_apply(model, args: LoraArgs, total_steps):
    from peft import get_peft_model

    return get_peft_model(model, _lora_config(model, args))


def _qlora_apply(model, args: QLoraArgs, total_steps):
    # bitsandbytes' 8-bit matmul warns on every CPU call that it casts to fp16; once is enough to know
    warnings.filterwarnings("once", message="MatMul8bitLt: inputs will be cast")
    return _lora_apply(model, args, total_steps)


def _lora_count(inv: Inventory, args: LoraArgs) -> int:
    chosen = resolve_targets(inv.linears, inv.output_name, args.targets)
    n = sum(args.r * (l.in_features + l.out_features) for l in chosen)
    return n + (sum(l.out_features for l in chosen) if args.dora else 0)  # DoRA: one magnitude per output


def _lora_footprint(inv: Inventory, args: LoraArgs, dt: Dtypes) -> Footprint:
    chosen = resolve_targets(inv.linears, inv.output_name, args.targets)
    # DoRA rescales both the base output and the LoRA output by the learned magnitude, and keeps both; on a half
    # precision base it also keeps a half copy of each adapted weight, made from the fp32 one it computes with
    bits = getattr(args, "bits", None)
    grouped = dt.autocast and not args.dora and not bits  # app.training.lora_groups takes these layers
    extra = _adapter_input_bytes(chosen, inv.layers, args.dropout, args.r, dt, out_copies=2 if args.dora else 0,
                                 grouped=grouped)
    half_base = dt.autocast and dt.load == dt.compute
    weight_copies = dt.compute * sum(l.in_features * l.out_features for l in chosen) if args.dora and half_base else 0
    n = _lora_count(inv, args)
    read = sum(l.in_features * l.out_features for l in chosen) if args.dora and not bits else 0
    return _frozen(inv, n, quant_bits=bits, double_quant=bool(getattr(args, "double_quant", False)) and bits == 4,
                   extra_layer_bytes=extra, extra_step_bytes=weight_copies, base_read_params=read,
                   first_layer_saving=_first_layer_masks(chosen, args.dropout, dt, grouped))


def _resolve_compute_dtype(name: str):
    import torch

    if name == "auto":
        cuda = torch.cuda.is_available()
        return torch.bfloat16 if cuda and torch.cuda.is_bf16_supported() else (torch.float16 if cuda else torch.float32)
    return getattr(torch, DTYPES[name])


def _qlora_load_kwargs(args: QLoraArgs) -> dict:
    from transformers import BitsAndBytesConfig

    if args.bits == 8:
        return {"quantization_config": BitsAndBytesConfig(load_in_8bit=True)}
    return {"quantization_config": BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=args.double_quant,
        bnb_4bit_compute_dtype=_resolve_compute_dtype(args.compute_dtype),
    )}


# AdaLoRA
def _adalora_apply(model, args: AdaLoraArgs, total_steps):
    from peft import AdaLoraConfig, get_peft_model

    if not total_steps or total_steps < 2:
        raise MethodError(f"AdaLoRA needs the number of training steps to plan its rank budget (got {total_steps!r})")
    chosen = resolve_targets(linear_modules(model), _output_name(model), args.targets)
    config = AdaLoraConfig(
        init_r=args.r, target_r=args.target_r, lora_alpha=args.alpha, lora_dropout=args.dropout,
        target_modules=peft_target_list(chosen), total_step=total_steps,
        # keep the full rank for the first tenth, settle the final ranks for the last fifth
        tinit=total_steps // 10, tfinal=total_steps // 5, task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)


def _adalora_after_backward(model, step: int) -> None:
    model.base_model.update_and_allocate(step)  # needs this step's gradients: call before zero_grad


def _adalora_count(inv: Inventory, args: AdaLoraArgs) -> int:
    chosen = resolve_targets(inv.linears, inv.output_name, args.targets)
    return sum(args.r * (l.in_features + l.out_features + 1) for l in chosen)  # A, B and the singular values E


def _adalora_footprint(inv: Inventory, args: AdaLoraArgs, dt: Dtypes) -> Footprint:
    chosen = resolve_targets(inv.linears, inv.output_name, args.targets)
    return _frozen(inv, _adalora_count(inv, args), first_layer_saving=_first_layer_masks(chosen, args.dropout, dt),
                   # on a half-precision base, dividing by the rank keeps the update's output as well
                   extra_layer_bytes=_adapter_input_bytes(chosen, inv.layers, args.dropout, args.r, dt,
                                                          out_copies=1 if dt.load == 2 else 0))


# IA3 and LayerNorm tuning use peft's per-architecture choice of layers
def _peft_mapping(name: str, model_type: str, method: str) -> list[str]:
    from peft.utils import constants

    mapping = getattr(constants, name)
    if model_type not in mapping:
        raise MethodError(f"{method} has no default layers for the {model_type!r} architecture; pick LoRA instead")
    return list(mapping[model_type])


def _ia3_modules(model_type: str) -> tuple[list[str], list[str]]:
    targets = _peft_mapping("TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING", model_type, "IA3")
    feedforward = _peft_mapping("TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING", model_type, "IA3")
    return targets, feedforward


def _ia3_apply(model, args, total_steps):
    from peft import IA3Config, get_peft_model

    targets, feedforward = _ia3_modules(model.config.model_type)
    return get_peft_model(model, IA3Config(target_modules=targets, feedforward_modules=feedforward, task_type="CAUSAL_LM"))


def _ia3_scaled(inv: Inventory) -> list[tuple[LinearInfo, bool]]:
    targets, feedforward = _ia3_modules(inv.model_type)
    return [(l, any(_matches(l.name, k) for k in feedforward))
            for l in inv.linears if any(_matches(l.name, k) for k in targets)]


def _ia3_count(inv: Inventory, args) -> int:
    # a vector over the inputs of feed-forward layers, over the outputs of the others
    return sum(l.in_features if ff else l.out_features for l, ff in _ia3_scaled(inv))


def _ia3_footprint(inv: Inventory, args, dt: Dtypes) -> Footprint:
    # the rescaled tensor is kept for the vector's gradient: a feed-forward input after peft casts it to fp32,
    # or another layer's output in the compute dtype
    extra = sum(4 * l.in_features if ff else dt.compute * l.out_features for l, ff in _ia3_scaled(inv)) // inv.layers
    return _frozen(inv, _ia3_count(inv, args), extra_layer_bytes=extra)


def _ln_targets(model_type: str) -> list[str]:
    return _peft_mapping("TRANSFORMERS_MODELS_TO_LNTUNING_TARGET_MODULES_MAPPING", model_type, "LayerNorm tuning")


def _ln_apply(model, args, total_steps):
    from peft import LNTuningConfig, get_peft_model

    return get_peft_model(model, LNTuningConfig(target_modules=_ln_targets(model.config.model_type), task_type="CAUSAL_LM"))


def _ln_count(inv: Inventory, args) -> int:
    keys = _ln_targets(inv.model_type)
    return sum(n for name, n in inv.norms if any(_matches(name, k) for k in keys))


def _ln_footprint(inv: Inventory, args, dt: Dtypes) -> Footprint:
    n = _ln_count(inv, args)
    trained = [name for name, _ in inv.norms if any(_matches(name, k) for k in _ln_targets(inv.model_type))]
    return Footprint(trainable=n, added=n, base_trainable=0, grad_layers=inv.layers,
                     layer_weights_train=False, norms_train=True, final_norm_trains=inv.norms[-1][0] in trained,
                     output_trains=False, embeddings_train=False)


# prompt methods: learned vectors in front of the input (prompt, P-tuning) or of every layer's keys/values (prefix)
def _prefix_apply(model, args: VirtualTokenArgs, total_steps):
    from peft import PrefixTuningConfig, get_peft_model

    return get_peft_model(model, PrefixTuningConfig(num_virtual_tokens=args.virtual_tokens, task_type="CAUSAL_LM"))


def _prefix_count(inv: Inventory, args: VirtualTokenArgs) -> int:
    return args.virtual_tokens * inv.layers * 2 * inv.prefix_width


def _prefix_footprint(inv: Inventory, args: VirtualTokenArgs, dt: Dtypes) -> Footprint:
    return _frozen(inv, _prefix_count(inv, args), extra_kv_tokens=args.virtual_tokens)


def _prompt_apply(model, args: VirtualTokenArgs, total_steps):
    from peft import PromptTuningConfig, get_peft_model

    return get_peft_model(model, PromptTuningConfig(num_virtual_tokens=args.virtual_tokens, task_type="CAUSAL_LM"))


def _prompt_count(inv: Inventory, args: VirtualTokenArgs) -> int:
    return args.virtual_tokens * inv.hidden


def _prompt_footprint(inv: Inventory, args: VirtualTokenArgs, dt: Dtypes) -> Footprint:
    return _frozen(inv, _prompt_count(inv, args), extra_tokens=args.virtual_tokens, first_input_grad=True)


def _ptuning_apply(model, args: VirtualTokenArgs, total_steps):
    from peft import PromptEncoderConfig, get_peft_model

    return get_peft_model(model, PromptEncoderConfig(num_virtual_tokens=args.virtual_tokens, task_type="CAUSAL_LM"))


def _ptuning_count(inv: Inventory, args: VirtualTokenArgs) -> int:
    h = inv.hidden  # peft's prompt encoder: the embedding, then a 3-layer MLP of the model's width
    return args.virtual_tokens * h + 3 * (h * h + h)


def _ptuning_footprint(inv: Inventory, args: VirtualTokenArgs, dt: Dtypes) -> Footprint:
    # the encoder runs once per step on the virtual tokens and keeps three of its (tokens x hidden) tensors
    return _frozen(inv, _ptuning_count(inv, args), extra_tokens=args.virtual_tokens, first_input_grad=True,
                   extra_step_bytes=3 * 4 * args.virtual_tokens * inv.hidden)


# BitFit
def _bitfit_apply(model, args, total_steps):
    for name, p in model.named_parameters():
        if name.endswith(".bias"):
            p.requires_grad_(True)
    return model


def _bitfit_count(inv: Inventory, args) -> int:
    return inv.bias_params


def _bitfit_footprint(inv: Inventory, args, dt: Dtypes) -> Footprint:
    return Footprint(trainable=inv.bias_params, added=0, base_trainable=inv.bias_params,
                     grad_layers=inv.layers, layer_weights_train=False, norms_train=False, final_norm_trains=False,
                     output_trains=False, embeddings_train=False)


# the bottleneck adapter (ours: small enough to read in one screen)
def _bottleneck_module(hidden: int, width: int):
    import torch.nn as nn

    class Bottleneck(nn.Module):
        """Down-project, SiLU, up-project; up starts at zero so training starts exactly at the base model."""

        def __init__(self):
            super().__init__()
            self.down = nn.Linear(hidden, width)
            self.up = nn.Linear(width, hidden)
            nn.init.zeros_(self.up.weight)
            nn.init.zeros_(self.up.bias)

        def forward(self, x):
            return self.up(nn.functional.silu(self.down(x.to(self.down.weight.dtype)))).to(x.dtype)

    return Bottleneck()


def _attach_bottlenecks(model, args: AdapterArgs):
    """Add a bottleneck beside (parallel) or after (sequential) every layer's MLP, as child `bottleneck` of the MLP,
    so the base weights keep their names and the adapter's weights are the keys containing '.bottleneck.'."""
    _, layers = decoder_layers(model)
    hidden = model.config.get_text_config().hidden_size
    parallel = args.placement == "parallel"
    for layer in layers:
        mlp = getattr(layer, "mlp", None)
        if mlp is None:
            raise MethodError(f"the bottleneck adapter needs an `mlp` block in each layer; {model.config.model_type} has none")
        device = next(mlp.parameters()).device
        mlp.add_module("bottleneck", _bottleneck_module(hidden, args.bottleneck).to(device))

        def add_adapter(module, inputs, output, parallel=parallel):
            return output + module.bottleneck(inputs[0] if parallel else output)

        mlp.register_forward_hook(add_adapter)
    model.config.bottleneck_adapter = asdict(args)
    return model


def _adapter_apply(model, args: AdapterArgs, total_steps):
    model = _attach_bottlenecks(model, args)
    for name, p in model.named_parameters():
        p.requires_grad_(".bottleneck." in name)
    return model


def _adapter_count(inv: Inventory, args: AdapterArgs) -> int:
    return inv.layers * (2 * inv.hidden * args.bottleneck + args.bottleneck + inv.hidden)


def _adapter_footprint(inv: Inventory, args: AdapterArgs, dt: Dtypes) -> Footprint:
    a = dt.compute if dt.autocast else 4  # the fp32 adapter computes in fp32, or in half under autocast
    # down keeps its (cast) input, SiLU its input and up its input; nothing below the first adapter (the first
    # layer's attention and MLP) needs a gradient, so one layer fewer keeps its activations
    return _frozen(inv, _adapter_count(inv, args), extra_layer_bytes=a * (inv.hidden + 2 * args.bottleneck),
                   grad_layers=inv.layers - 1, first_input_grad=True)


def _adapter_save(model, out_dir: Path) -> None:
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    weights = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items() if ".bottleneck." in k}
    save_file(weights, out_dir / ADAPTER_WEIGHTS)
    config = {"method": "adapter", **model.config.bottleneck_adapter,
              "base_model": str(getattr(model.config, "_name_or_path", ""))}
    (out_dir / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")


def _adapter_load(base_model, final_dir: Path, adapter_name: str):
    from safetensors.torch import load_file

    final_dir = Path(final_dir)
    try:
        config = json.loads((final_dir / ADAPTER_CONFIG).read_text(encoding="utf-8"))
        weights = load_file(final_dir / ADAPTER_WEIGHTS)
    except (OSError, ValueError) as e:
        raise MethodError(f"{final_dir} does not hold a bottleneck adapter ({type(e).__name__}: {e})") from None
    args = AdapterArgs(bottleneck=config["bottleneck"], placement=config["placement"])
    model = _attach_bottlenecks(base_model, args)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items() if ".bottleneck." in k}
    if {k: tuple(v.shape) for k, v in weights.items()} != expected:
        raise MethodError(f"{final_dir}: the adapter was trained on a model with another layout (its weights differ)")
    dtype = next(base_model.parameters()).dtype
    model.load_state_dict({k: v.to(dtype) for k, v in weights.items()}, strict=False)
    return model


# saving and loading, by kind of result
def _save_pretrained(model, out_dir: Path) -> None:
    model.save_pretrained(out_dir, safe_serialization=True)


def _load_peft(base_model, final_dir: Path, adapter_name: str):
    from peft import PeftModel

    return PeftModel.from_pretrained(base_model, final_dir, adapter_name=adapter_name)


def _load_full(base_model, final_dir: Path, adapter_name: str):
    from app.models import load_causal_lm

    return load_causal_lm(Path(final_dir))


@dataclass(frozen=True)
class MethodSpec:
    name: str
    label: str
    description: str  # one plain sentence for the UI
    args: type  # dataclass of knobs; its defaults are the method's defaults
    apply: Callable[[Any, Any, int | None], Any]  # (model, args, total_steps) -> model with the right parameters trainable
    count: Callable[[Inventory, Any], int]  # exact trainable parameters, from the inventory alone
    footprint: Callable[[Inventory, Any, Dtypes], Footprint]  # what the method does to memory
    saves_adapter: bool = True  # final/ holds an adapter (else a full model)
    mixed_batch: bool = False  # LoRA family: several adapters on one base in one batch (Compare tab)
    load_kwargs: Callable[[Any], dict] = field(default=lambda args: {})  # extra from_pretrained kwargs (quantization)
    save: Callable[[Any, Path], None] = _save_pretrained
    load: Callable[[Any, Path, str], Any] = _load_peft
    after_backward: Callable[[Any, int], None] | None = None  # per-step hook, after backward and before zero_grad

    def make_args(self, values: dict[str, Any] | None = None):
        values = dict(values or {})
        known = {f.name for f in fields(self.args)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise MethodError(f"{self.name} has no setting(s) {', '.join(unknown)}; it takes: {', '.join(sorted(known)) or 'none'}")
        return self.args(**values)

    def knobs(self) -> list[str]:
        return [f.name for f in fields(self.args)]


METHODS: dict[str, MethodSpec] = {
    "full": MethodSpec(
        "full", "Full fine-tune", "Updates every weight: the highest ceiling, and the most memory.",
        NoArgs, _full_apply, _full_count, _full_footprint, saves_adapter=False, load=_load_full,
    ),
    "freeze": MethodSpec(
        "freeze", "Freeze tuning", "Trains only the last few layers and freezes the rest: cheaper than full, "
        "and often enough to change format and style.",
        FreezeArgs, _freeze_apply, _freeze_count, _freeze_footprint, saves_adapter=False, load=_load_full,
    ),
    "lora": MethodSpec(
        "lora", "LoRA", "Freezes the model and learns a small low-rank update B·A beside chosen layers.",
        LoraArgs, _lora_apply, _lora_count, _lora_footprint, mixed_batch=True,
    ),
    "qlora": MethodSpec(
        "qlora", "QLoRA", "LoRA on a copy of the model squeezed to 4 (or 8) bits: about 4x less memory for the "
        "weights, a little slower.",
        QLoraArgs, _qlora_apply, _lora_count, _lora_footprint, mixed_batch=True, load_kwargs=_qlora_load_kwargs,
    ),
    "adalora": MethodSpec(
        "adalora", "AdaLoRA", "LoRA whose rank moves during training to the layers that need it most.",
        AdaLoraArgs, _adalora_apply, _adalora_count, _adalora_footprint, after_backward=_adalora_after_backward,
    ),
    "ia3": MethodSpec(
        "ia3", "IA3", "Learns one scaling vector for the keys, values and MLP activations: very few numbers to train.",
        NoArgs, _ia3_apply, _ia3_count, _ia3_footprint,
    ),
    "prefix": MethodSpec(
        "prefix", "Prefix tuning", "Learns vectors put in front of every layer's keys and values; the model stays frozen.",
        VirtualTokenArgs, _prefix_apply, _prefix_count, _prefix_footprint,
    ),
    "prompt": MethodSpec(
        "prompt", "Prompt tuning", "Learns a few soft prompt vectors put in front of the input; the model stays frozen.",
        VirtualTokenArgs, _prompt_apply, _prompt_count, _prompt_footprint,
    ),
    "ptuning": MethodSpec(
        "ptuning", "P-tuning", "Learns soft prompt vectors through a small network that makes them; the model stays frozen.",
        VirtualTokenArgs, _ptuning_apply, _ptuning_count, _ptuning_footprint,
    ),
    "lntuning": MethodSpec(
        "lntuning", "LayerNorm tuning", "Trains only the normalisation layers' scales: tiny, and surprisingly useful.",
        NoArgs, _ln_apply, _ln_count, _ln_footprint,
    ),
    "bitfit": MethodSpec(
        "bitfit", "BitFit", "Trains only the bias terms: tiny and cheap, with a low ceiling; some models have no biases.",
        NoArgs, _bitfit_apply, _bitfit_count, _bitfit_footprint, saves_adapter=False, load=_load_full,
    ),
    "adapter": MethodSpec(
        "adapter", "Bottleneck adapter", "Adds a small down-project, non-linearity, up-project block after (or beside) "
        "each MLP and trains only that.",
        AdapterArgs, _adapter_apply, _adapter_count, _adapter_footprint, save=_adapter_save, load=_adapter_load,
    ),
}


def get_method(name: str) -> MethodSpec:
    if name not in METHODS:
        raise MethodError(f"unknown method {name!r}; choose one of {', '.join(METHODS)}")
    return METHODS[name]


def method_footprint(inv: Inventory, method: str, method_args: dict[str, Any] | None, plan: PrecisionPlan,
                     device: str = "cuda") -> Footprint:
    spec = get_method(method)
    return spec.footprint(inv, spec.make_args(method_args), Dtypes.of(plan, device))


def count_trainable(inv: Inventory, method: str, method_args: dict[str, Any] | None = None) -> tuple[int, int]:
    """(trainable, total) for `method` on the architecture `inv`; total includes what the method adds."""
    spec = get_method(method)
    n = spec.count(inv, spec.make_args(method_args))
    return n, inv.total + (n if spec.saves_adapter else 0)


def supports_mixed_batch(method: str, method_args: dict[str, Any] | None = None) -> bool:
    """Whether adapters of this run can share one batch with others (peft refuses DoRA there)."""
    spec = get_method(method)
    return spec.mixed_batch and not getattr(spec.make_args(method_args), "dora", False)


def prepare_model(model, method: str, method_args: dict[str, Any] | None = None, *, total_steps: int | None = None):
    """Apply `method` to a loaded model; returns the model to train (a PeftModel for peft methods).

    total_steps: the run's optimizer steps (AdaLoRA plans its rank budget with it, and refuses to start without).
    Raises MethodError when nothing would train (BitFit on a model without biases).
    """
    spec = get_method(method)
    args = spec.make_args(method_args)
    for p in model.parameters():
        p.requires_grad_(False)
    model = spec.apply(model, args, total_steps)
    trainable = [p for p in model.parameters() if p.requires_grad]
    if not trainable:
        raise MethodError(f"{spec.label} finds nothing to train in this {model.config.model_type} model "
                          f"(0 trainable parameters); choose another method")
    return model


def after_backward(model, method: str, step: int) -> None:
    """Call after each backward (before zero_grad): AdaLoRA moves rank here; the other methods do nothing."""
    hook = get_method(method).after_backward
    if hook is not None:
        hook(model, step)


def load_for_training(folder: Path, method: str, method_args: dict[str, Any] | None = None, *, precision: str = "auto",
                      total_steps: int | None = None, grad_checkpointing: bool = False, device: str | None = None,
                      half_frozen: bool = True):
    """Load a model folder the way the memory estimate assumes, apply the method; returns (model, plan).

    half_frozen: under mixed precision, an adapter method's frozen linear weights are stored in the compute dtype
    (store_frozen_linears_in); the weights it saves are its own, so the base's stored dtype never reaches a file."""
    import torch

    from app.models import load_causal_lm

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    plan = plan_for(method, precision, device, device != "cuda" or torch.cuda.is_bf16_supported())
    spec = get_method(method)
    args = spec.make_args(method_args)
    kwargs = spec.load_kwargs(args)
    quantized = kwargs.get("quantization_config") is not None
    if quantized and device == "cuda":
        # bitsandbytes quantizes while loading onto the GPU; .to() is refused after. The current device is this
        # process's GPU (app.training.dist sets it to LOCAL_RANK under a multi-GPU launch; 0 otherwise).
        kwargs["device_map"] = {"": torch.cuda.current_device()}
    model = load_causal_lm(Path(folder), dtype=getattr(torch, plan.load_dtype), **kwargs)
    half = half_frozen and spec.saves_adapter and plan.autocast_dtype is not None and plan.load_dtype == "float32"
    if not quantized and device != "cpu" and not half:
        model.to(device)
    if grad_checkpointing:  # non-reentrant: frozen inputs need no enable_input_require_grads
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = prepare_model(model, method, method_args, total_steps=total_steps)
    if half:  # converted where it was loaded, before the move: the GPU never holds the fp32 copies
        store_frozen_linears_in(model, getattr(torch, plan.autocast_dtype))
        if not quantized and device != "cpu":
            model.to(device)
    if device == "cpu":  # same math, cheaper dropout masks and rank-r products (app.training.fast_lora)
        from app.training.fast_lora import speed_up_lora

        speed_up_lora(model)
    if plan.autocast_dtype:  # LoRA layers sharing an input computed together, with fewer operations
        from app.training.lora_groups import group_lora_layers

        group_lora_layers(model, getattr(torch, plan.autocast_dtype))
    return model, plan


def store_frozen_linears_in(model, dtype) -> int:
    """Under mixed precision (fp32 weights, half-precision compute), autocast casts a frozen fp32 linear weight to
    `dtype` in every forward and keeps that copy for backward. Such a weight is only ever read by those matmuls, so
    storing it in `dtype` once gives the same products bit for bit, one copy in memory instead of two, and no cast
    per step. Left in fp32: trained weights, the weights of adapter layers that read the base weight as a matrix
    (DoRA's column norms) or do anything but add to its output, and an output layer tied to the input embedding
    (the lookup is not a matmul: its fp32 rows carry the residual stream). Returns how many parameters changed."""
    import torch
    import torch.nn as nn

    from peft.tuners.ia3.layer import IA3Layer
    from peft.tuners.lora.layer import LoraLayer
    from peft.tuners.tuners_utils import BaseTunerLayer

    def reads_base_only_by_matmul(layer) -> bool:
        if isinstance(layer, LoraLayer):
            return not getattr(layer, "lora_variant", {}) and not any(getattr(layer, "use_dora", {}).values())
        return isinstance(layer, IA3Layer)

    embedding = model.get_input_embeddings().weight
    skip = {id(layer.get_base_layer()) for layer in model.modules()
            if isinstance(layer, BaseTunerLayer) and not reads_base_only_by_matmul(layer)}
    changed = 0
    for module in model.modules():
        w = getattr(module, "weight", None)
        if (type(module) is not nn.Linear or id(module) in skip or w is None or w.requires_grad
                or w.dtype != torch.float32 or w is embedding):
            continue
        w.data = w.data.to(dtype)  # the same Parameter object: nothing that holds it is left pointing at fp32
        changed += w.numel()
    return changed


def save_trained(model, method: str, out_dir: Path) -> None:
    """Adapter methods save the adapter alone; the others save the whole model (safetensors)."""
    get_method(method).save(model, Path(out_dir))


def load_trained(base_model, method: str, final_dir: Path, adapter_name: str = "default"):
    """The base model with a run's trained weights attached (or the run's full model, for full-model methods)."""
    return get_method(method).load(base_model, Path(final_dir), adapter_name)


def count_parameters(model) -> tuple[int, int]:
    """(trainable, total) with tied weights counted once."""
    trainable = total = 0
    for p in model.parameters():
        total += p.numel()
        if p.requires_grad:
            trainable += p.numel()
    return trainable, total


# --- presets ------------------------------------------------------------------------------------------------
def preset_path(method: str) -> Path:
    return PRESETS_DIR / f"{get_method(method).name}.yaml"


def load_preset(method: str) -> dict[str, Any]:
    """presets/<method>.yaml: a partial RunConfig (only what differs from the defaults), checked against the method."""
    path = preset_path(method)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as e:
        raise MethodError(f"{path}: cannot read the preset ({type(e).__name__}: {e})") from None
    if not isinstance(data, dict) or data.get("method") != method:
        raise MethodError(f"{path}: a preset must be a mapping with method: {method}")
    get_method(method).make_args(data.get("method_args"))
    return data
