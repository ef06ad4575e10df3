"""Freeze tuning: only the last few decoder layers train, and final/ holds the whole model."""
from __future__ import annotations

from dataclasses import dataclass

from app.methods.base import Footprint, MethodError, MethodSpec, check_int, knob, load_full
from app.methods.inventory import Inventory, decoder_layers
from app.methods.precision import Dtypes


@dataclass
class FreezeArgs:
    top_layers: int = knob(2, "Layers to train", "How many of the last layers learn; all the layers below stay frozen.",
                           minimum=1, maximum=128, step=1)

    def __post_init__(self) -> None:
        check_int(self, "top_layers", 1)


def _check_top_layers(args: FreezeArgs, layers: int) -> None:
    if args.top_layers > layers:
        raise MethodError(f"top_layers={args.top_layers}: this model has only {layers} layers")


def apply(model, args: FreezeArgs, total_steps):
    _, layers = decoder_layers(model)
    _check_top_layers(args, len(layers))
    for layer in list(layers)[len(layers) - args.top_layers:]:
        for p in layer.parameters():
            p.requires_grad_(True)
    return model


def count(inv: Inventory, args: FreezeArgs) -> int:
    _check_top_layers(args, inv.layers)
    return sum(inv.layer_params[inv.layers - args.top_layers:])


def footprint(inv: Inventory, args: FreezeArgs, dt: Dtypes) -> Footprint:
    n = count(inv, args)
    return Footprint(trainable=n, added=0, base_trainable=n,
                     grad_layers=args.top_layers, layer_weights_train=True, norms_train=True, final_norm_trains=False,
                     output_trains=False, embeddings_train=False)


SPECS = (
    MethodSpec("freeze", "Freeze tuning", "Trains only the last few layers and freezes the rest: cheaper than full, "
               "and often enough to change format and style.",
               FreezeArgs, apply, count, footprint, saves_adapter=False, load=load_full),
)
