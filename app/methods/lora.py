"""LoRA and QLoRA: a low-rank update B·A learned beside chosen linear layers (with the DoRA and rsLoRA switches), on a
base model kept as loaded (LoRA) or quantized to 4 or 8 bits (QLoRA)."""
from __future__ import annotations

import re
import warnings
from dataclasses import dataclass

from app.methods.base import (Footprint, MethodSpec, check_choice, check_int, check_positive, check_range,
                              frozen_footprint, knob)
from app.methods.inventory import (ATTENTION_OUTPUTS, Inventory, LinearInfo, linear_modules, output_name,
                                   peft_target_list, resolve_targets, target_names)
from app.methods.precision import DTYPES, Dtypes

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
        check_int(self, "r", 1)
        check_positive(self, "alpha")
        check_range(self, "dropout", 0, 1, below=True)
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
        check_choice(self, "bits", (4, 8))
        check_choice(self, "compute_dtype", ("auto", *DTYPES))


# --- what LoRA-style updates keep for backward (AdaLoRA shares these rules) --------------------------------------
def adapter_input_bytes(chosen: list[LinearInfo], layers: int, dropout: float, r: int, dt: Dtypes,
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


def first_layer_masks(chosen: list[LinearInfo], dropout: float, dt: Dtypes, grouped: bool = False) -> int:
    """Dropout on the first layer's attention input (no gradient there yet) keeps no mask."""
    if dropout == 0:
        return 0
    return sum((1 if grouped else dt.mask) * l.in_features for l in chosen
               if l.layer == 0 and re.search(r"attn|attention", l.name) and not l.name.endswith(ATTENTION_OUTPUTS))


# --- LoRA ---------------------------------------------------------------------------------------------------------
def _lora_config(model, args: LoraArgs):
    from peft import LoraConfig

    chosen = resolve_targets(linear_modules(model), output_name(model), args.targets)
    return LoraConfig(r=args.r, lora_alpha=args.alpha, lora_dropout=args.dropout, use_dora=args.dora,
                      use_rslora=args.rslora, target_modules=peft_target_list(chosen), task_type="CAUSAL_LM")


def apply(model, args: LoraArgs, total_steps):
    from peft import get_peft_model

    return get_peft_model(model, _lora_config(model, args))


def count(inv: Inventory, args: LoraArgs) -> int:
    chosen = resolve_targets(inv.linears, inv.output_name, args.targets)
    n = sum(args.r * (l.in_features + l.out_features) for l in chosen)
    return n + (sum(l.out_features for l in chosen) if args.dora else 0)  # DoRA: one magnitude per output


def footprint(inv: Inventory, args: LoraArgs, dt: Dtypes) -> Footprint:
    chosen = resolve_targets(inv.linears, inv.output_name, args.targets)
    # DoRA rescales both the base output and the LoRA output by the learned magnitude, and keeps both; on a half
    # precision base it also keeps a half copy of each adapted weight, made from the fp32 one it computes with
    bits = getattr(args, "bits", None)
    grouped = dt.autocast and not args.dora and not bits  # app.training.lora_groups takes these layers
    extra = adapter_input_bytes(chosen, inv.layers, args.dropout, args.r, dt, out_copies=2 if args.dora else 0,
                                grouped=grouped)
    half_base = dt.autocast and dt.load == dt.compute
    weight_copies = dt.compute * sum(l.in_features * l.out_features for l in chosen) if args.dora and half_base else 0
    n = count(inv, args)
    read = sum(l.in_features * l.out_features for l in chosen) if args.dora and not bits else 0
    double_quant = bool(getattr(args, "double_quant", False)) and bits == 4
    return frozen_footprint(inv, n, quant_bits=bits, double_quant=double_quant,
                            extra_layer_bytes=extra, extra_step_bytes=weight_copies, base_read_params=read,
                            first_layer_saving=first_layer_masks(chosen, args.dropout, dt, grouped))


# --- QLoRA: the same update on a base quantized while it loads -----------------------------------------------------
def qlora_apply(model, args: QLoraArgs, total_steps):
    # bitsandbytes' 8-bit matmul warns on every CPU call that it casts to fp16; once is enough to know
    warnings.filterwarnings("once", message="MatMul8bitLt: inputs will be cast")
    return apply(model, args, total_steps)


def _resolve_compute_dtype(name: str):
    import torch

    if name == "auto":
        cuda = torch.cuda.is_available()
        return torch.bfloat16 if cuda and torch.cuda.is_bf16_supported() else (torch.float16 if cuda else torch.float32)
    return getattr(torch, DTYPES[name])


def qlora_load_kwargs(args: QLoraArgs) -> dict:
    from transformers import BitsAndBytesConfig

    if args.bits == 8:
        return {"quantization_config": BitsAndBytesConfig(load_in_8bit=True)}
    return {"quantization_config": BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=args.double_quant,
        bnb_4bit_compute_dtype=_resolve_compute_dtype(args.compute_dtype),
    )}


SPECS = (
    MethodSpec("lora", "LoRA", "Freezes the model and learns a small low-rank update B·A beside chosen layers.",
               LoraArgs, apply, count, footprint, mixed_batch=True),
    MethodSpec("qlora", "QLoRA", "LoRA on a copy of the model squeezed to 4 (or 8) bits: about 4x less memory for the "
               "weights, a little slower.",
               QLoraArgs, qlora_apply, count, footprint, mixed_batch=True, load_kwargs=qlora_load_kwargs),
)
