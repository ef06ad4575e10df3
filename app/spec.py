"""RunConfig: the one fully resolved description of a training run, shared by the UI, run.yaml and the CLI."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

PRECISIONS = ("auto", "fp32", "bf16", "fp16", "bf16-mixed")  # bf16-mixed: fp32 master weights, bf16 compute
OPTIMIZERS = ("adamw", "adamw8bit", "sgd")
ASSISTANT_TURNS = ("all", "last")  # which assistant turns of a conversation are learned
SCHEDULERS = ("cosine", "linear", "constant")
STRATEGIES = ("ddp", "fsdp")  # ddp: a full replica per GPU; fsdp: weights, gradients and optimizer state sharded


class ConfigError(ValueError):
    """A run configuration value that cannot work; the message names the field and the value."""


def check_training_choice(choice: Any, error: type[ValueError]) -> Any:
    """The checks a RunConfig and the memory estimate's inputs share: objective, precision, optimizer, strategy and
    the method's settings, each refused as `error` naming the field and the value. Returns the method's parsed
    settings (app.methods' MethodError names a bad one)."""
    def bad(name: str, why: str) -> ValueError:
        return error(f"{name}={getattr(choice, name)!r}: {why}")

    # imported here: the registries sit above this module (they read RunConfig fields); neither loads torch
    from app.methods import get_method
    from app.objectives import ObjectiveError, get_objective

    try:
        get_objective(choice.objective)
    except ObjectiveError as e:
        raise error(str(e)) from None
    for name, choices in (("precision", PRECISIONS), ("optimizer", OPTIMIZERS), ("strategy", STRATEGIES)):
        if getattr(choice, name) not in choices:
            raise bad(name, f"choose one of {', '.join(choices)}")
    if not isinstance(choice.method_args, dict):
        raise bad("method_args", "must be a mapping")
    return get_method(choice.method).make_args(choice.method_args)


@dataclass
class RunConfig:
    # what to train
    objective: str = "sft"  # what the run learns: a name in app.objectives.OBJECTIVES (sft: supervised answers)
    model: str = "embedded"  # "embedded" (SmolLM2-135M-Instruct), a local model folder, or a hub id
    dataset: str = ""  # path to a dataset file (normalised JSONL in the workspace, or any file `data check` accepts)
    val_dataset: str | None = None  # a second file for validation; else `val_split` of `dataset`
    val_split: float = 0.1  # share of rows held out for validation loss (seeded)
    method: str = "lora"  # a name in app.methods.METHODS
    method_args: dict[str, Any] = field(default_factory=dict)  # only what differs from the method's defaults
    # how to train
    precision: str = "auto"  # auto: bf16 on a GPU that has it, else fp32
    optimizer: str = "adamw"  # adamw8bit halves optimizer memory on CUDA
    learning_rate: float = 2e-4  # LoRA likes 1e-4..3e-4; full fine-tuning 1e-5..5e-5
    epochs: float = 1.0
    max_steps: int = -1  # > 0 overrides epochs
    batch_size: int = 4  # higher is faster per token but needs more memory
    grad_accum: int = 1  # effective batch = batch_size * grad_accum, at no extra memory
    cutoff_len: int = 256  # longer rows are truncated; memory grows with it
    warmup_steps: int = 0
    scheduler: str = "cosine"
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    seed: int = 42
    eval_every: int = 0  # steps between validation losses; 0 = only at the end
    save_every: int = 50  # steps between checkpoints; 0 = only at the end
    keep_last: int = 2  # checkpoints kept on disk
    log_every: int = 1
    train_on_prompt: bool = False  # False: loss only on the response tokens
    assistant_turns: str = "all"  # "all": learn every assistant turn of a conversation; "last": only its last one
    system_prompt: str = ""  # the dataset-level system prompt: for rows without their own; Compare uses it too
    beta: float = 0.1  # preference objectives: how far from the reference (DPO, IPO) or the reward scale (SimPO)
    simpo_gamma: float = 0.5  # SimPO: the target reward margin
    grad_checkpointing: bool = False  # saves activation memory at about 30% more compute
    # where to train: more than one GPU launches through `accelerate launch --num_processes gpus`
    gpus: int = 1
    strategy: str = "ddp"  # with gpus > 1: "ddp" or "fsdp"
    # filled in by the app when the run is created
    run_id: str = ""
    estimate: dict[str, Any] | None = None  # the memory estimate shown when the run was started
    sweep: str | None = None  # name of the rank sweep this run belongs to

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        def bad(name: str, why: str) -> ConfigError:
            return ConfigError(f"{name}={getattr(self, name)!r}: {why}")

        if self.scheduler not in SCHEDULERS:
            raise bad("scheduler", f"choose one of {', '.join(SCHEDULERS)}")
        if not 0 <= self.val_split < 1:
            raise bad("val_split", "must be at least 0 and below 1")
        if not self.learning_rate > 0:
            raise bad("learning_rate", "must be positive")
        for name in ("batch_size", "grad_accum", "cutoff_len", "keep_last", "log_every"):
            if int(getattr(self, name)) < 1:
                raise bad(name, "must be at least 1")
        if self.max_steps <= 0 and not self.epochs > 0:
            raise bad("epochs", "must be positive when max_steps is not set")
        for name in ("warmup_steps", "eval_every", "save_every"):
            if int(getattr(self, name)) < 0:
                raise bad(name, "must not be negative")
        if int(self.gpus) < 1:
            raise bad("gpus", "must be at least 1")
        if not self.beta > 0:
            raise bad("beta", "must be positive")
        if self.assistant_turns not in ASSISTANT_TURNS:
            raise bad("assistant_turns", f"choose one of {', '.join(ASSISTANT_TURNS)}")
        # The method's settings are parsed once, here, by its registry entry; its messages name the setting and the
        # value ("r=0: must be at least 1").
        from app.methods import MethodError

        try:
            self._method_settings = check_training_choice(self, ConfigError)
        except MethodError as e:
            raise ConfigError(str(e)) from None

    @property
    def method_settings(self) -> Any:
        """The method's settings: its args dataclass with the defaults filled in, parsed and checked when the config
        was built (run.yaml keeps method_args, only what differs from the defaults)."""
        return self._method_settings

    # --- YAML round trip -------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "RunConfig":
        if not isinstance(data, dict):
            raise ConfigError(f"a run config must be a mapping, got {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown field(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        try:
            return cls(**data)
        except TypeError as e:
            raise ConfigError(str(e)) from e

    @classmethod
    def from_yaml(cls, path: str | Path) -> "RunConfig":
        try:
            data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML ({e})") from e
        return cls.from_dict(data or {})
