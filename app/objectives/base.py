"""What a training objective is: the examples it reads, how it turns them into batches, its loss, the metrics it
records, what it adds to the memory estimate and which of the tabs' controls apply to it."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable


class ObjectiveError(ValueError):
    """An objective name that is not registered; the message lists the ones that are."""


LOSS_KEYS = ("loss", "eval_loss")


@dataclass(frozen=True)
class Metric:
    key: str  # the field of a metrics.jsonl record
    label: str  # how charts and tables name it
    split: str  # "train" (logged every log_every steps) or "eval" (at each validation point)


@dataclass(frozen=True)
class ExtraMemory:
    """One term an objective adds to the memory estimate, beside the method's weights, activations and optimizer."""
    key: str
    label: str
    bytes: int
    note: str  # how it was computed, in words


def no_extra_memory(inventory, dtypes, batch: int, seq: int) -> list[ExtraMemory]:
    return []


@dataclass(frozen=True)
class Objective:
    name: str  # what run.yaml says: `objective: sft`
    label: str  # what the page says
    description: str  # one plain sentence for the page
    example: str  # the example type it reads (a name in app.data: "instruction" = Alpaca rows)
    metrics: tuple[Metric, ...]  # recorded by the worker and plotted by the Train tab: its loss first, then the rest
    controls: tuple[str, ...]  # RunConfig fields of the tabs that only some objectives use: shown when chosen
    # rows of the example type -> the objective's examples (tokenized; what one training row becomes)
    make_examples: Callable[[Any, list[dict], Any], list[Any]]
    # the examples of one micro-batch -> what loss_sum reads (rows packed without padding, for sft)
    make_batch: Callable[[list[Any]], Any]
    # (model, batch, packed, device, pad_id) -> the loss summed over the batch's targets (batch.n_targets of them), or
    # (that loss, {metric key: value summed over the targets}) for objectives that record more than their loss
    loss_sum: Callable[..., Any]
    # the estimate: how many sequences one example puts through the model per step (2 for chosen + rejected)
    sequences_per_example: int = 1
    # the estimate: terms only this objective needs (a reference model, a reward model, sampled answers)
    extra_memory: Callable[[Any, Any, int, int], list[ExtraMemory]] = no_extra_memory
    # (model, examples, packed, device, pad_id, autocast) -> None: run once on the loaded model before the first step
    # (and before a checkpoint is restored), e.g. to compute reference log-probabilities
    prepare: Callable[..., None] | None = None

    @property
    def extra_metrics(self) -> tuple[Metric, ...]:
        """What it records beside the loss ("loss" every logged step, "eval_loss" at each validation point, which
        every objective records, its own loss being the one optimised)."""
        return tuple(m for m in self.metrics if m.key not in LOSS_KEYS)
