"""Which examples each optimizer step trains on, batched the way the run's objective builds a batch."""
from __future__ import annotations

import math
from typing import Any, Callable

import torch

from app.spec import RunConfig


def batches_of(examples: list, batch_size: int, make_batch: Callable[[list], Any]) -> list:
    return [make_batch(examples[i:i + batch_size]) for i in range(0, len(examples), batch_size)]


class DataPlan:
    """Which rows each optimizer step trains on; derived from the step alone, so a resumed run needs only the step."""

    def __init__(self, examples: list, config: RunConfig, make_batch: Callable[[list], Any]):
        self.examples, self.batch_size, self.seed = examples, config.batch_size, config.seed
        self.make_batch = make_batch
        self.grad_accum = config.grad_accum
        self.per_epoch = math.ceil(len(examples) / config.batch_size)
        micro = config.max_steps * config.grad_accum if config.max_steps > 0 else math.ceil(config.epochs * self.per_epoch)
        self.total_micro = max(1, micro)
        self.total_steps = math.ceil(self.total_micro / self.grad_accum)
        self._epoch_batches: dict[int, list] = {}

    def epoch_batches(self, epoch: int) -> list:
        if epoch not in self._epoch_batches:
            self._epoch_batches = {}  # one epoch at a time in memory
            gen = torch.Generator().manual_seed(self.seed + epoch)
            order = torch.randperm(len(self.examples), generator=gen).tolist()
            self._epoch_batches[epoch] = batches_of([self.examples[i] for i in order], self.batch_size, self.make_batch)
        return self._epoch_batches[epoch]

    def step_batches(self, step: int) -> tuple[list, float]:
        """The micro-batches of optimizer step `step` (1-based) and the epoch reached after it."""
        first, last = (step - 1) * self.grad_accum, min(step * self.grad_accum, self.total_micro)
        batches = [self.epoch_batches(m // self.per_epoch)[m % self.per_epoch] for m in range(first, last)]
        return batches, last / self.per_epoch
