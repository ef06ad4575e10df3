"""The bottleneck adapter (method name "adapter"; ours, small enough to read in one screen): a down-project, SiLU,
up-project block after (or beside) each MLP, saved as its own safetensors file and JSON config."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from app.methods.base import (ADAPTER_CONFIG, ADAPTER_WEIGHTS, Footprint, MethodError, MethodSpec, check_choice,
                              check_int, frozen_footprint, knob)
from app.methods.inventory import Inventory, decoder_layers
from app.methods.precision import Dtypes


@dataclass
class AdapterArgs:
    bottleneck: int = knob(64, "Bottleneck width", "Width of the adapter's middle layer: wider learns more.",
                           minimum=1, maximum=1024, step=1)
    placement: str = knob("sequential", "Placement", "After each MLP block (sequential), or beside it (parallel: "
                          "adds no extra step in series).", choices=["sequential", "parallel"])

    def __post_init__(self) -> None:
        check_int(self, "bottleneck", 1)
        check_choice(self, "placement", ("sequential", "parallel"))


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


def apply(model, args: AdapterArgs, total_steps):
    model = _attach_bottlenecks(model, args)
    for name, p in model.named_parameters():
        p.requires_grad_(".bottleneck." in name)
    return model


def count(inv: Inventory, args: AdapterArgs) -> int:
    return inv.layers * (2 * inv.hidden * args.bottleneck + args.bottleneck + inv.hidden)


def footprint(inv: Inventory, args: AdapterArgs, dt: Dtypes) -> Footprint:
    a = dt.compute if dt.autocast else 4  # the fp32 adapter computes in fp32, or in half under autocast
    # down keeps its (cast) input, SiLU its input and up its input; nothing below the first adapter (the first
    # layer's attention and MLP) needs a gradient, so one layer fewer keeps its activations
    return frozen_footprint(inv, count(inv, args), extra_layer_bytes=a * (inv.hidden + 2 * args.bottleneck),
                            grad_layers=inv.layers - 1, first_input_grad=True)


def save(model, out_dir: Path) -> None:
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    weights = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items() if ".bottleneck." in k}
    save_file(weights, out_dir / ADAPTER_WEIGHTS)
    config = {"method": "adapter", **model.config.bottleneck_adapter,
              "base_model": str(getattr(model.config, "_name_or_path", ""))}
    (out_dir / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")


def load(base_model, final_dir: Path, adapter_name: str):
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


SPECS = (
    MethodSpec("adapter", "Bottleneck adapter", "Adds a small down-project, non-linearity, up-project block after (or "
               "beside) each MLP and trains only that.",
               AdapterArgs, apply, count, footprint, save=save, load=load),
)
