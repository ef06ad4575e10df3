"""IA3: one learned scaling vector for the keys, values and MLP activations, on peft's per-architecture layers."""
from __future__ import annotations

from app.methods.base import Footprint, MethodSpec, NoArgs, frozen_footprint, peft_mapping
from app.methods.inventory import Inventory, LinearInfo, matches
from app.methods.precision import Dtypes


def _modules(model_type: str) -> tuple[list[str], list[str]]:
    targets = peft_mapping("TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING", model_type, "IA3")
    feedforward = peft_mapping("TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING", model_type, "IA3")
    return targets, feedforward


def apply(model, args: NoArgs, total_steps):
    from peft import IA3Config, get_peft_model

    targets, feedforward = _modules(model.config.model_type)
    return get_peft_model(model, IA3Config(target_modules=targets, feedforward_modules=feedforward, task_type="CAUSAL_LM"))


def _scaled(inv: Inventory) -> list[tuple[LinearInfo, bool]]:
    targets, feedforward = _modules(inv.model_type)
    return [(l, any(matches(l.name, k) for k in feedforward))
            for l in inv.linears if any(matches(l.name, k) for k in targets)]


def count(inv: Inventory, args: NoArgs) -> int:
    # a vector over the inputs of feed-forward layers, over the outputs of the others
    return sum(l.in_features if ff else l.out_features for l, ff in _scaled(inv))


def footprint(inv: Inventory, args: NoArgs, dt: Dtypes) -> Footprint:
    # the rescaled tensor is kept for the vector's gradient: a feed-forward input after peft casts it to fp32,
    # or another layer's output in the compute dtype
    extra = sum(4 * l.in_features if ff else dt.compute * l.out_features for l, ff in _scaled(inv)) // inv.layers
    return frozen_footprint(inv, count(inv, args), extra_layer_bytes=extra)


SPECS = (
    MethodSpec("ia3", "IA3", "Learns one scaling vector for the keys, values and MLP activations: very few numbers "
               "to train.",
               NoArgs, apply, count, footprint),
)
