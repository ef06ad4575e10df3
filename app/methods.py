"""The METHODS registry: each fine-tuning method as one entry (its knobs, how to apply, save and load it)."""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable

ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]


class MethodError(ValueError):
    """A method argument that cannot work; the message names the field and the value."""


@dataclass
class FullArgs:
    pass


@dataclass
class LoraArgs:
    r: int = 8  # rank: higher = more capacity and more memory; 8 or 16 in practice
    alpha: int = 16  # scales the update by alpha / r
    dropout: float = 0.05
    targets: str = "attention"  # "attention" (q,k,v,o), "all-linear", or a comma list of module names

    def __post_init__(self) -> None:
        if int(self.r) < 1:
            raise MethodError(f"r={self.r!r}: the rank must be at least 1")
        if not 0 <= float(self.dropout) < 1:
            raise MethodError(f"dropout={self.dropout!r}: must be at least 0 and below 1")


def target_modules(targets: str) -> list[str] | str:
    if targets == "attention":
        return list(ATTENTION)
    if targets == "all-linear":
        return "all-linear"
    names = [t.strip() for t in str(targets).split(",") if t.strip()]
    if not names:
        raise MethodError(f"targets={targets!r}: name at least one module, or choose attention / all-linear")
    return names


def _lora(model, args: LoraArgs):
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=args.r, lora_alpha=args.alpha, lora_dropout=args.dropout,
        target_modules=target_modules(args.targets), task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)


def _full(model, args: FullArgs):
    for p in model.parameters():
        p.requires_grad_(True)
    return model


@dataclass(frozen=True)
class MethodSpec:
    name: str
    label: str
    description: str  # one plain sentence for the UI
    args: type  # dataclass of knobs; its defaults are the method's defaults
    apply: Callable[[Any, Any], Any]  # (model, args) -> model with only the right parameters trainable
    saves_adapter: bool = True  # final/ holds a PEFT adapter (else a full model)
    mixed_batch: bool = False  # LoRA family: several adapters on one base in one batch (Compare tab)
    load_kwargs: Callable[[Any], dict] = field(default=lambda args: {})  # extra from_pretrained kwargs (quantization)

    def make_args(self, values: dict[str, Any] | None = None):
        values = dict(values or {})
        known = {f.name for f in fields(self.args)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise MethodError(f"{self.name} has no setting(s) {', '.join(unknown)}; it takes: {', '.join(sorted(known)) or 'none'}")
        return self.args(**values)


METHODS: dict[str, MethodSpec] = {
    "full": MethodSpec(
        "full", "Full fine-tune", "Updates every weight: the highest ceiling, and the most memory.",
        FullArgs, _full, saves_adapter=False,
    ),
    "lora": MethodSpec(
        "lora", "LoRA", "Freezes the model and learns a small low-rank update B·A beside chosen layers.",
        LoraArgs, _lora, mixed_batch=True,
    ),
}


def get_method(name: str) -> MethodSpec:
    if name not in METHODS:
        raise MethodError(f"unknown method {name!r}; choose one of {', '.join(METHODS)}")
    return METHODS[name]


def prepare_model(model, method: str, method_args: dict[str, Any] | None = None):
    """Apply `method` to a loaded model; returns the model to train (a PeftModel for adapter methods)."""
    spec = get_method(method)
    args = spec.make_args(method_args)
    if spec.saves_adapter:
        for p in model.parameters():
            p.requires_grad_(False)
    return spec.apply(model, args)


def save_trained(model, method: str, out_dir: Path) -> None:
    """Adapter methods save the adapter alone (PEFT format); the others save the whole model."""
    model.save_pretrained(out_dir, safe_serialization=True)


def load_trained(base_model, method: str, final_dir: Path, adapter_name: str = "default"):
    """The base model with a run's trained weights attached (or the run's full model, for full fine-tunes)."""
    spec = get_method(method)
    if spec.saves_adapter:
        from peft import PeftModel

        return PeftModel.from_pretrained(base_model, final_dir, adapter_name=adapter_name)
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(final_dir)


def count_parameters(model) -> tuple[int, int]:
    """(trainable, total) with tied weights counted once."""
    trainable = total = 0
    for p in model.parameters():
        total += p.numel()
        if p.requires_grad:
            trainable += p.numel()
    return trainable, total
