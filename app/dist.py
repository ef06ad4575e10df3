"""Data parallelism for the training worker: which process this is, and the few collectives the loop needs.

`from_environment()` returns `Dist` (one process: every collective gives back its input) unless the launcher
(`accelerate launch --multi_gpu`, `torchrun`) set WORLD_SIZE > 1; then `ProcessGroupDist` joins the group, NCCL on
GPUs (each process on `cuda:LOCAL_RANK`) or gloo on CPUs.

Gradients are averaged by hand after the step's backward passes instead of wrapping the model in
DistributedDataParallel: the arithmetic is the same, and the model stays the plain (PEFT) model, so parameter
names in checkpoints, `get_base_model()`, AdaLoRA's rank update, gradient checkpointing and saving need no
`.module` special case. The price is no overlap of communication with the backward pass, which matters only for
full fine-tuning of large models over many GPUs.
"""
from __future__ import annotations

import os
from datetime import timedelta
from typing import Iterable

import torch

BUCKET_ELEMENTS = 32 * 1024 * 1024  # gradients are all-reduced in flat chunks of at most this many numbers


class Dist:
    """A single process: rank 0 of 1."""

    rank, local_rank, world_size = 0, 0, 1

    @property
    def is_main(self) -> bool:
        """Rank 0 alone writes status, metrics, checkpoints and final weights."""
        return self.rank == 0

    def all_reduce_mean(self, value: float) -> float:
        return value

    def all_reduce_sum(self, values: list[float]) -> list[float]:
        return values

    def any(self, flag: bool) -> bool:
        """True on every rank when it is true on one (a Stop seen by one rank stops all at the same step)."""
        return bool(flag)

    def average_gradients(self, params: Iterable[torch.nn.Parameter]) -> None:
        pass

    def broadcast_parameters(self, params: Iterable[torch.nn.Parameter]) -> None:
        pass

    def barrier(self) -> None:
        pass

    def close(self) -> None:
        pass


class ProcessGroupDist(Dist):
    """One of WORLD_SIZE processes started by a launcher that set RANK, LOCAL_RANK, MASTER_ADDR and MASTER_PORT."""

    def __init__(self, timeout_s: float = 1800):
        import torch.distributed as td

        self.td = td
        self.rank, self.world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if torch.cuda.is_available():
            # plain "cuda" (model.to, a quantized load's device map) means this process's GPU from here on
            torch.cuda.set_device(self.local_rank)
            self.device, backend = torch.device("cuda", self.local_rank), "nccl"
        else:
            self.device, backend = torch.device("cpu"), "gloo"
        if not td.is_initialized():
            td.init_process_group(backend, timeout=timedelta(seconds=timeout_s))

    def _reduce(self, values: list[float], op) -> list[float]:
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        self.td.all_reduce(t, op=op)
        return t.tolist()

    def all_reduce_mean(self, value: float) -> float:
        return self._reduce([value], self.td.ReduceOp.SUM)[0] / self.world_size

    def all_reduce_sum(self, values: list[float]) -> list[float]:
        return self._reduce(values, self.td.ReduceOp.SUM)

    def any(self, flag: bool) -> bool:
        return self._reduce([float(bool(flag))], self.td.ReduceOp.MAX)[0] > 0

    def average_gradients(self, params: Iterable[torch.nn.Parameter]) -> None:
        params = [p for p in params if p.requires_grad]
        for p in params:
            if p.grad is None:  # a parameter this rank's rows did not reach still takes part in the sum
                p.grad = torch.zeros_like(p)
        for bucket in _buckets(params):
            flat = torch.cat([p.grad.reshape(-1) for p in bucket])
            self.td.all_reduce(flat, op=self.td.ReduceOp.SUM)
            flat /= self.world_size
            for p, part in zip(bucket, flat.split([p.numel() for p in bucket])):
                p.grad.copy_(part.view_as(p.grad))

    def broadcast_parameters(self, params: Iterable[torch.nn.Parameter]) -> None:
        """Rank 0's trainable weights everywhere, so no rank starts from its own random adapter init."""
        with torch.no_grad():
            for p in params:
                self.td.broadcast(p.data, src=0)

    def barrier(self) -> None:
        self.td.barrier()

    def close(self) -> None:
        if self.td.is_initialized():
            self.td.destroy_process_group()


def _buckets(params: list[torch.nn.Parameter]) -> list[list[torch.nn.Parameter]]:
    """Consecutive parameters of one dtype, up to BUCKET_ELEMENTS numbers each (one all-reduce per bucket)."""
    buckets: list[list[torch.nn.Parameter]] = []
    size = 0
    for p in params:
        if not buckets or size + p.numel() > BUCKET_ELEMENTS or buckets[-1][0].grad.dtype != p.grad.dtype:
            buckets.append([])
            size = 0
        buckets[-1].append(p)
        size += p.numel()
    return buckets


def from_environment() -> Dist:
    """The launcher's process group when it started several processes, else the single-process no-op."""
    return ProcessGroupDist() if int(os.environ.get("WORLD_SIZE", "1")) > 1 else Dist()
