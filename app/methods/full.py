"""Full fine-tuning: every weight trains, and final/ holds the whole model."""
from __future__ import annotations

from app.methods.base import Footprint, MethodSpec, NoArgs, load_full
from app.methods.inventory import Inventory
from app.methods.precision import Dtypes


def apply(model, args: NoArgs, total_steps):
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def count(inv: Inventory, args: NoArgs) -> int:
    return inv.total


def footprint(inv: Inventory, args: NoArgs, dt: Dtypes) -> Footprint:
    return Footprint(trainable=inv.total, added=0, base_trainable=inv.total,
                     grad_layers=inv.layers, layer_weights_train=True, norms_train=True, final_norm_trains=True,
                     output_trains=True, embeddings_train=True, first_input_grad=True)


SPECS = (
    MethodSpec("full", "Full fine-tune", "Updates every weight: the highest ceiling, and the most memory.",
               NoArgs, apply, count, footprint, saves_adapter=False, load=load_full),
)
