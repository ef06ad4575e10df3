"""BitFit: only the bias terms train, and final/ holds the whole model."""
from __future__ import annotations

from app.methods.base import Footprint, MethodSpec, NoArgs, load_full
from app.methods.inventory import Inventory
from app.methods.precision import Dtypes


def apply(model, args: NoArgs, total_steps):
    for name, p in model.named_parameters():
        if name.endswith(".bias"):
            p.requires_grad_(True)
    return model


def count(inv: Inventory, args: NoArgs) -> int:
    return inv.bias_params


def footprint(inv: Inventory, args: NoArgs, dt: Dtypes) -> Footprint:
    return Footprint(trainable=inv.bias_params, added=0, base_trainable=inv.bias_params,
                     grad_layers=inv.layers, layer_weights_train=False, norms_train=False, final_norm_trains=False,
                     output_trains=False, embeddings_train=False)


SPECS = (
    MethodSpec("bitfit", "BitFit", "Trains only the bias terms: tiny and cheap, with a low ceiling; some models have "
               "no biases.",
               NoArgs, apply, count, footprint, saves_adapter=False, load=load_full),
)
