"""What the tabs hand each other to start a run: the Method tab's choice, the Train tab's inputs and their RunConfig."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from app.spec import ConfigError, RunConfig

NO_DATASET = "**No dataset chosen.** Upload or pick one in the Data tab first, then come back and press Start."


@dataclass(frozen=True)
class MethodChoice:
    """The Method & Memory tab's settings, and the estimate it showed for them."""
    objective: str = "sft"  # a name in app.objectives.OBJECTIVES: what the run learns
    method: str = "lora"  # a name in app.methods.METHODS
    method_args: dict[str, Any] = field(default_factory=dict)  # only what differs from the method's defaults
    precision: str = "auto"
    optimizer: str = "adamw"
    grad_checkpointing: bool = False
    estimate: dict[str, Any] | None = None  # MemoryEstimate.to_dict() as shown; None when the settings cannot work
    problem: str | None = None  # why the tab said these settings cannot work: Start refuses them rather than guess

    def __hash__(self) -> int:
        # Gradio fires a State's change event when the hash of its value changes: a hash of the content keeps the
        # same choice, recomputed on every refresh of the tab, from counting as a change
        return hash(json.dumps(asdict(self), sort_keys=True, default=str))


@dataclass
class TrainInputs:
    """The values of the controls a run is built from, as the widgets hold them (None where a box was emptied)."""
    model: str | None
    dataset: str | None  # the training file chosen in the Data tab
    val_dataset: str | None
    val_split: float | None
    cutoff_len: float | None
    batch_size: float | None
    grad_accum: float | None
    choice: MethodChoice
    learning_rate: float | None
    epochs: float | None
    max_steps: float | None  # 0: train for the epochs
    warmup_steps: float | None
    scheduler: str | None
    seed: float | None
    eval_every: float | None
    save_every: float | None
    keep_last: float | None
    train_on_prompt: bool | None
    gpus: float | None = None  # None or 1 on a machine with one GPU or none, where the controls are hidden
    strategy: str | None = None
    assistant_turns: str | None = None  # None: "all" (the control is shown for conversation data only)
    system_prompt: str | None = None  # the Data tab's dataset-level system prompt
    beta: float | None = None  # preference objectives (None: the RunConfig default)
    simpo_gamma: float | None = None

    def to_config(self) -> RunConfig:
        """The RunConfig these values make; ConfigError names an emptied box or a value that cannot work (the
        method's settings included)."""
        required = {"learning_rate": self.learning_rate, "epochs": self.epochs, "max_steps": self.max_steps,
                    "grad_accum": self.grad_accum, "warmup_steps": self.warmup_steps, "scheduler": self.scheduler,
                    "seed": self.seed, "eval_every": self.eval_every, "save_every": self.save_every,
                    "keep_last": self.keep_last, "train_on_prompt": self.train_on_prompt,
                    "cutoff_len": self.cutoff_len, "batch_size": self.batch_size}
        empty = [name for name, value in required.items() if value is None]
        if empty:
            raise ConfigError(f"{', '.join(empty)}: fill in a value")
        choice = self.choice
        if choice.problem:
            raise ConfigError(f"The Method & Memory tab says these settings cannot work: {choice.problem}. Change "
                              f"them there, then press Start again.")
        return RunConfig(
            objective=choice.objective,
            model=self.model or "embedded",
            dataset=self.dataset or "",
            val_dataset=self.val_dataset or None,
            val_split=float(self.val_split or 0),
            cutoff_len=int(self.cutoff_len),
            batch_size=int(self.batch_size),
            method=choice.method,
            method_args=dict(choice.method_args),
            precision=choice.precision,
            optimizer=choice.optimizer,
            grad_checkpointing=bool(choice.grad_checkpointing),
            learning_rate=float(self.learning_rate),
            epochs=float(self.epochs),
            max_steps=int(self.max_steps) if self.max_steps > 0 else -1,
            grad_accum=int(self.grad_accum),
            warmup_steps=int(self.warmup_steps),
            scheduler=self.scheduler,
            seed=int(self.seed),
            eval_every=int(self.eval_every),
            save_every=int(self.save_every),
            keep_last=int(self.keep_last),
            train_on_prompt=bool(self.train_on_prompt),
            gpus=int(self.gpus or 1),
            strategy=self.strategy or "ddp",
            assistant_turns=self.assistant_turns or "all",
            system_prompt=(self.system_prompt or "").strip(),
            **({"beta": float(self.beta)} if self.beta is not None else {}),
            **({"simpo_gamma": float(self.simpo_gamma)} if self.simpo_gamma is not None else {}),
        )

    def checked_config(self) -> RunConfig:
        """As to_config, and also refuses a missing dataset file with a message the user can act on: what Start runs
        before it queues anything."""
        if not self.dataset:
            raise ConfigError(NO_DATASET)
        if not Path(self.dataset).is_file():
            raise ConfigError(f"The dataset file {self.dataset} is gone. Pick the dataset again in the Data tab.")
        config = self.to_config()  # RunConfig checks the method's settings as it is built
        mismatch = data_mismatch(self.dataset, config.objective)
        if mismatch:
            raise ConfigError(mismatch)
        return config


# What the rows of a stored dataset are (its meta.json "examples") -> the example type an objective reads.
EXAMPLE_TYPES = {"row": "instruction", "conversation": "instruction", "pair": "pair", "unpaired": "unpaired"}


def data_mismatch(dataset: str, objective_name: str) -> str:
    """Why the chosen objective cannot read the chosen dataset, or "": said at Start, before a worker is queued.
    Files that are not stored datasets (no meta.json) are left to the worker, which reads them and says the same."""
    from app.data.store import dataset_meta
    from app.objectives import get_objective

    kind = EXAMPLE_TYPES.get(dataset_meta(dataset).get("examples", ""))
    objective = get_objective(objective_name)
    if kind is None or kind == objective.example:
        return ""
    if kind == "instruction":
        return (f"{objective.label} learns from preference pairs, and this dataset holds instructions or "
                f"conversations. Pick a preference dataset in the Data tab, or choose supervised fine-tuning under "
                f"'What the model learns' in the Method & Memory tab.")
    return (f"This dataset holds preference data ({'pairs' if kind == 'pair' else 'rated answers'}), which "
            f"{objective.label} does not read. Choose "
            + ("a preference objective (DPO, IPO or SimPO)" if kind == "pair" else "another dataset: rated answers "
               "(KTO) are not trained yet")
            + " under 'What the model learns' in the Method & Memory tab.")
