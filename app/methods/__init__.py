"""The METHODS registry and the methods package's public API: each fine-tuning method is one module here (its knobs,
how it is applied, counted, saved and loaded) and one line below.

Nothing here imports torch at import time (the UI reads the registry): the method modules import it, and peft,
inside the functions that need them.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from app.methods import adalora, bitfit, bottleneck, freeze, full, ia3, ln_tuning, lora, virtual_tokens
from app.methods.base import ADAPTER_CONFIG, ADAPTER_WEIGHTS, Footprint, MethodError, MethodSpec
from app.methods.inventory import (Inventory, LinearInfo, build_inventory, cached_inventory, decoder_layers,
                                   resolve_targets)
from app.methods.precision import DTYPE_BYTES, Dtypes, PrecisionPlan, precision_plan

__all__ = [
    "ADAPTER_CONFIG", "ADAPTER_WEIGHTS", "DTYPE_BYTES", "METHODS", "Dtypes", "Footprint", "Inventory", "LinearInfo",
    "MethodError", "MethodSpec", "PrecisionPlan", "after_backward", "build_inventory", "cached_inventory",
    "count_parameters", "count_trainable", "decoder_layers", "get_method", "load_trained", "method_footprint",
    "plan_for", "precision_plan", "prepare_model", "resolve_targets", "save_trained", "supports_mixed_batch",
]

# One line per method module, in the order the UI lists them; a module registers each method it holds (SPECS).
METHODS: dict[str, MethodSpec] = {spec.name: spec for specs in (
    full.SPECS,
    freeze.SPECS,
    lora.SPECS,  # lora, qlora
    adalora.SPECS,
    ia3.SPECS,
    virtual_tokens.SPECS,  # prefix, prompt, ptuning
    ln_tuning.SPECS,
    bitfit.SPECS,
    bottleneck.SPECS,  # adapter
) for spec in specs}


def get_method(name: str) -> MethodSpec:
    if name not in METHODS:
        raise MethodError(f"unknown method {name!r}; choose one of {', '.join(METHODS)}")
    return METHODS[name]


def plan_for(method: str, precision: str, device: str = "cpu", bf16_supported: bool = True) -> PrecisionPlan:
    """The precision plan of `method`: a method that trains base weights keeps them in fp32 under fp16."""
    return precision_plan(precision, device, bf16_supported, trains_base=not get_method(method).saves_adapter)


# --- from the inventory alone (the estimate): a method name and its method_args as run.yaml holds them ----------
def method_footprint(inv: Inventory, method: str, method_args: dict[str, Any] | None, plan: PrecisionPlan,
                     device: str = "cuda") -> Footprint:
    spec = get_method(method)
    return spec.footprint(inv, spec.make_args(method_args), Dtypes.of(plan, device))


# --- from parsed settings (RunConfig.method_settings, or MethodSpec.make_args) -----------------------------------
def count_trainable(inv: Inventory, method: str, settings) -> tuple[int, int]:
    """(trainable, total) for `method` on the architecture `inv`; total includes what the method adds."""
    spec = get_method(method)
    n = spec.count(inv, settings)
    return n, inv.total + (n if spec.saves_adapter else 0)


def supports_mixed_batch(method: str, settings) -> bool:
    """Whether adapters of this run can share one batch with others (peft refuses DoRA there)."""
    return get_method(method).mixed_batch and not getattr(settings, "dora", False)


def prepare_model(model, method: str, settings, *, total_steps: int | None = None):
    """Apply `method` with its parsed `settings` to a loaded model; returns the model to train (a PeftModel for peft
    methods).

    total_steps: the run's optimizer steps (AdaLoRA plans its rank budget with it, and refuses to start without).
    Raises MethodError when nothing would train (BitFit on a model without biases).
    """
    spec = get_method(method)
    for p in model.parameters():
        p.requires_grad_(False)
    model = spec.apply(model, settings, total_steps)
    trainable = [p for p in model.parameters() if p.requires_grad]
    if not trainable:
        raise MethodError(f"{spec.label} finds nothing to train in this {model.config.model_type} model "
                          f"(0 trainable parameters); choose another method")
    return model


# --- while and after training -------------------------------------------------------------------------------------
def after_backward(model, method: str, step: int) -> None:
    """Call after each backward (before zero_grad): AdaLoRA moves rank here; the other methods do nothing."""
    hook = get_method(method).after_backward
    if hook is not None:
        hook(model, step)


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
