"""AdaLoRA: LoRA whose rank moves during training to the layers that need it most (re-allocated after each backward)."""
from __future__ import annotations

from dataclasses import dataclass

from app.methods.base import (Footprint, MethodError, MethodSpec, check_int, check_positive, check_range,
                              frozen_footprint, knob)
from app.methods.inventory import (Inventory, linear_modules, output_name, peft_target_list, resolve_targets,
                                   target_names)
from app.methods.lora import TARGET_INFO, adapter_input_bytes, first_layer_masks
from app.methods.precision import Dtypes


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
        check_int(self, "r", 1)
        check_int(self, "target_r", 1)
        if self.target_r > self.r:
            raise MethodError(f"target_r={self.target_r!r}: must not exceed the starting rank r={self.r}")
        check_positive(self, "alpha")
        check_range(self, "dropout", 0, 1, below=True)
        target_names(self.targets)


def apply(model, args: AdaLoraArgs, total_steps):
    from peft import AdaLoraConfig, get_peft_model

    if not total_steps or total_steps < 2:
        raise MethodError(f"AdaLoRA needs the number of training steps to plan its rank budget (got {total_steps!r})")
    chosen = resolve_targets(linear_modules(model), output_name(model), args.targets)
    config = AdaLoraConfig(
        init_r=args.r, target_r=args.target_r, lora_alpha=args.alpha, lora_dropout=args.dropout,
        target_modules=peft_target_list(chosen), total_step=total_steps,
        # keep the full rank for the first tenth, settle the final ranks for the last fifth
        tinit=total_steps // 10, tfinal=total_steps // 5, task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)


def after_backward(model, step: int) -> None:
    model.base_model.update_and_allocate(step)  # needs this step's gradients: call before zero_grad


def count(inv: Inventory, args: AdaLoraArgs) -> int:
    chosen = resolve_targets(inv.linears, inv.output_name, args.targets)
    return sum(args.r * (l.in_features + l.out_features + 1) for l in chosen)  # A, B and the singular values E


def footprint(inv: Inventory, args: AdaLoraArgs, dt: Dtypes) -> Footprint:
    chosen = resolve_targets(inv.linears, inv.output_name, args.targets)
    return frozen_footprint(inv, count(inv, args), first_layer_saving=first_layer_masks(chosen, args.dropout, dt),
                            # on a half-precision base, dividing by the rank keeps the update's output as well
                            extra_layer_bytes=adapter_input_bytes(chosen, inv.layers, args.dropout, args.r, dt,
                                                                  out_copies=1 if dt.load == 2 else 0))


SPECS = (
    MethodSpec("adalora", "AdaLoRA", "LoRA whose rank moves during training to the layers that need it most.",
               AdaLoraArgs, apply, count, footprint, after_backward=after_backward),
)
