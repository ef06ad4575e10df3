"""What every method shares: the MethodSpec a method registers, its knobs and their checks, its memory Footprint,
and the file names and save/load functions of the results it writes."""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:  # annotations only: inventory and precision import this module
    from app.methods.inventory import Inventory
    from app.methods.precision import Dtypes

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"


class MethodError(ValueError):
    """A method argument that cannot work; the message names the field and the value."""


def knob(default, label: str, info: str, **widget) -> Any:
    """A method setting plus what the UI needs to draw it (label, a plain `info` line, range or choices).

    widget keys: minimum, maximum, step (numbers), choices (a list), custom (True: free text beside the choices).
    Fields with the same name in several methods mean the same thing and share one control in the UI.
    """
    return field(default=default, metadata={"label": label, "info": info, **widget})


def check_range(obj, name: str, low: float, high: float | None = None, *, below: bool = False) -> None:
    value = getattr(obj, name)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise MethodError(f"{name}={value!r}: must be a number")
    too_high = high is not None and (value >= high if below else value > high)
    if value < low or too_high:
        upper = "" if high is None else (f" and below {high}" if below else f" and at most {high}")
        raise MethodError(f"{name}={value!r}: must be at least {low}{upper}")


def check_positive(obj, name: str) -> None:
    value = getattr(obj, name)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise MethodError(f"{name}={value!r}: must be a positive number")


def check_choice(obj, name: str, choices) -> None:
    if getattr(obj, name) not in choices:
        raise MethodError(f"{name}={getattr(obj, name)!r}: choose one of {', '.join(map(str, choices))}")


def check_int(obj, name: str, low: int, high: int | None = None) -> None:
    value = getattr(obj, name)
    if isinstance(value, bool) or not isinstance(value, int):
        if isinstance(value, float) and value.is_integer():
            setattr(obj, name, int(value))  # a UI slider sends 8.0 for 8
        else:
            raise MethodError(f"{name}={value!r}: must be a whole number")
    check_range(obj, name, low, high)


@dataclass
class NoArgs:
    """The settings of a method that has none."""


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


def frozen_footprint(inv: Inventory, added: int, **extra) -> Footprint:
    """Footprint of a method that freezes every base weight and adds `added` fp32 parameters."""
    return Footprint(trainable=added, added=added, base_trainable=0,
                     grad_layers=extra.pop("grad_layers", inv.layers), layer_weights_train=False, norms_train=False,
                     final_norm_trains=False, output_trains=False, embeddings_train=False, **extra)


def peft_mapping(name: str, model_type: str, method: str) -> list[str]:
    """peft's per-architecture choice of layers for a method (IA3, LayerNorm tuning): constant `name` of peft.utils."""
    from peft.utils import constants

    mapping = getattr(constants, name)
    if model_type not in mapping:
        raise MethodError(f"{method} has no default layers for the {model_type!r} architecture; pick LoRA instead")
    return list(mapping[model_type])


# saving and loading, by kind of result
def save_pretrained(model, out_dir: Path) -> None:
    model.save_pretrained(out_dir, safe_serialization=True)


def load_peft(base_model, final_dir: Path, adapter_name: str):
    from peft import PeftModel

    return PeftModel.from_pretrained(base_model, final_dir, adapter_name=adapter_name)


def load_full(base_model, final_dir: Path, adapter_name: str):
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
    save: Callable[[Any, Path], None] = save_pretrained
    load: Callable[[Any, Path, str], Any] = load_peft
    after_backward: Callable[[Any, int], None] | None = None  # per-step hook, after backward and before zero_grad

    def make_args(self, values: dict[str, Any] | None = None):
        """The method's settings from run.yaml's method_args (only what differs from the defaults), checked: the one
        place a method's knobs are parsed (RunConfig.method_settings holds the result for a run)."""
        values = dict(values or {})
        known = {f.name for f in fields(self.args)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise MethodError(f"{self.name} has no setting(s) {', '.join(unknown)}; it takes: {', '.join(sorted(known)) or 'none'}")
        return self.args(**values)

    def knobs(self) -> list[str]:
        return [f.name for f in fields(self.args)]
