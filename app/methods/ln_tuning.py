"""LayerNorm tuning: only the normalisation layers' scales train, on peft's per-architecture choice of norms."""
from __future__ import annotations

from app.methods.base import Footprint, MethodSpec, NoArgs, peft_mapping
from app.methods.inventory import Inventory, matches
from app.methods.precision import Dtypes


def _targets(model_type: str) -> list[str]:
    return peft_mapping("TRANSFORMERS_MODELS_TO_LNTUNING_TARGET_MODULES_MAPPING", model_type, "LayerNorm tuning")


def apply(model, args: NoArgs, total_steps):
    from peft import LNTuningConfig, get_peft_model

    return get_peft_model(model, LNTuningConfig(target_modules=_targets(model.config.model_type), task_type="CAUSAL_LM"))


def count(inv: Inventory, args: NoArgs) -> int:
    keys = _targets(inv.model_type)
    return sum(n for name, n in inv.norms if any(matches(name, k) for k in keys))


def footprint(inv: Inventory, args: NoArgs, dt: Dtypes) -> Footprint:
    n = count(inv, args)
    trained = [name for name, _ in inv.norms if any(matches(name, k) for k in _targets(inv.model_type))]
    return Footprint(trainable=n, added=n, base_trainable=0, grad_layers=inv.layers,
                     layer_weights_train=False, norms_train=True, final_norm_trains=inv.norms[-1][0] in trained,
                     output_trains=False, embeddings_train=False)


SPECS = (
    MethodSpec("lntuning", "LayerNorm tuning", "Trains only the normalisation layers' scales: tiny, and surprisingly "
               "useful.",
               NoArgs, apply, count, footprint),
)
