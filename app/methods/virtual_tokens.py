"""The prompt methods: learned vectors in front of the input (prompt tuning, P-tuning) or of every layer's keys and
values (prefix tuning); the model stays frozen."""
from __future__ import annotations

from dataclasses import dataclass

from app.methods.base import Footprint, MethodSpec, check_int, frozen_footprint, knob
from app.methods.inventory import Inventory
from app.methods.precision import Dtypes


@dataclass
class VirtualTokenArgs:
    virtual_tokens: int = knob(20, "Virtual tokens", "How many learned vectors are put in front of every input: more "
                               "can learn more, and every step gets a little longer.", minimum=1, maximum=200, step=1)

    def __post_init__(self) -> None:
        check_int(self, "virtual_tokens", 1, 1000)


# prefix tuning
def prefix_apply(model, args: VirtualTokenArgs, total_steps):
    from peft import PrefixTuningConfig, get_peft_model

    return get_peft_model(model, PrefixTuningConfig(num_virtual_tokens=args.virtual_tokens, task_type="CAUSAL_LM"))


def prefix_count(inv: Inventory, args: VirtualTokenArgs) -> int:
    return args.virtual_tokens * inv.layers * 2 * inv.prefix_width


def prefix_footprint(inv: Inventory, args: VirtualTokenArgs, dt: Dtypes) -> Footprint:
    return frozen_footprint(inv, prefix_count(inv, args), extra_kv_tokens=args.virtual_tokens)


# prompt tuning
def prompt_apply(model, args: VirtualTokenArgs, total_steps):
    from peft import PromptTuningConfig, get_peft_model

    return get_peft_model(model, PromptTuningConfig(num_virtual_tokens=args.virtual_tokens, task_type="CAUSAL_LM"))


def prompt_count(inv: Inventory, args: VirtualTokenArgs) -> int:
    return args.virtual_tokens * inv.hidden


def prompt_footprint(inv: Inventory, args: VirtualTokenArgs, dt: Dtypes) -> Footprint:
    return frozen_footprint(inv, prompt_count(inv, args), extra_tokens=args.virtual_tokens, first_input_grad=True)


# P-tuning
def ptuning_apply(model, args: VirtualTokenArgs, total_steps):
    from peft import PromptEncoderConfig, get_peft_model

    return get_peft_model(model, PromptEncoderConfig(num_virtual_tokens=args.virtual_tokens, task_type="CAUSAL_LM"))


def ptuning_count(inv: Inventory, args: VirtualTokenArgs) -> int:
    h = inv.hidden  # peft's prompt encoder: the embedding, then a 3-layer MLP of the model's width
    return args.virtual_tokens * h + 3 * (h * h + h)


def ptuning_footprint(inv: Inventory, args: VirtualTokenArgs, dt: Dtypes) -> Footprint:
    # the encoder runs once per step on the virtual tokens and keeps three of its (tokens x hidden) tensors
    return frozen_footprint(inv, ptuning_count(inv, args), extra_tokens=args.virtual_tokens, first_input_grad=True,
                            extra_step_bytes=3 * 4 * args.virtual_tokens * inv.hidden)


SPECS = (
    MethodSpec("prefix", "Prefix tuning", "Learns vectors put in front of every layer's keys and values; the model "
               "stays frozen.",
               VirtualTokenArgs, prefix_apply, prefix_count, prefix_footprint),
    MethodSpec("prompt", "Prompt tuning", "Learns a few soft prompt vectors put in front of the input; the model "
               "stays frozen.",
               VirtualTokenArgs, prompt_apply, prompt_count, prompt_footprint),
    MethodSpec("ptuning", "P-tuning", "Learns soft prompt vectors through a small network that makes them; the "
               "model stays frozen.",
               VirtualTokenArgs, ptuning_apply, ptuning_count, ptuning_footprint),
)
