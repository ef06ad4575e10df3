"""Data parallelism for the training worker: which process this is, and the few collectives the loop needs.

`from_environment()` returns `Dist` (one process: every collective gives back its input) unless the launcher
(`accelerate launch --multi_gpu`, `torchrun`) set WORLD_SIZE > 1; then `ProcessGroupDist` joins the group, NCCL on
GPUs (each process on `cuda:LOCAL_RANK`) or gloo on CPUs.

strategy "ddp": every rank holds the whole model, and gradients are averaged by hand after the step's backward
passes instead of wrapping the model in DistributedDataParallel: the arithmetic is the same, and the model stays the
plain (PEFT) model, so parameter names in checkpoints, `get_base_model()`, AdaLoRA's rank update, gradient
checkpointing and saving need no `.module` special case. The price is no overlap of communication with the backward
pass, which matters only for full fine-tuning of large models over many GPUs.

strategy "fsdp": `shard` hands the model to torch's FSDP2 (`fully_shard` on each decoder layer, then on the whole
model): each rank keeps 1/world_size of every weight, gradient and optimizer state as DTensors, a layer's weights are
gathered for its forward and backward only, and the gradients arrive already averaged (reduce-scatter), so
`average_gradients` has nothing left to do. FSDP2 keeps the parameter names, so checkpoints and final/ are written
by rank 0 from whole tensors gathered on every rank (`full_weights`, `optimizer_state`, `full_state`) in exactly
the single-process format, and are read back the same way (`load_weights`, `load_optimizer_state`).
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from datetime import timedelta
from typing import Any, Iterable, Iterator

import torch

from app.memory.estimate import BUCKET_ELEMENTS


class Dist:
    """A single process: rank 0 of 1."""

    rank, local_rank, world_size = 0, 0, 1
    sharded = False  # set by `shard`: weights are DTensor shards and FSDP averages the gradients itself

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

    def grad_scaler(self, device_type: str):
        """fp16's loss scaler; every rank sees the same averaged gradients, so all skip an overflowing step."""
        return torch.amp.GradScaler(device_type)

    def shard(self, model, strategy: str) -> None:
        """One process keeps the whole model whatever the strategy: fsdp trains as ddp does."""

    def trainable_weights(self, model) -> dict[str, torch.Tensor]:
        """Whole CPU copies of the trainable weights for rank 0 to write (every rank calls it: shards are gathered)."""
        return {name: p.detach().to("cpu").contiguous() for name, p in model.named_parameters() if p.requires_grad}

    def load_weights(self, params: dict[str, torch.nn.Parameter], weights: dict[str, torch.Tensor]) -> None:
        """Whole tensors (a checkpoint every rank read) into the parameters of the same names."""
        with torch.no_grad():
            for name, tensor in weights.items():
                params[name].copy_(tensor)

    def optimizer_state(self, model, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        """The optimizer's state_dict as one process has it (rank 0's to write; every rank calls it)."""
        return optimizer.state_dict()

    def load_optimizer_state(self, model, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
        optimizer.load_state_dict(state)

    @contextmanager
    def full_state(self, model, whole: bool) -> Iterator[None]:
        """While open, rank 0's `model.state_dict()` holds whole tensors, for a `save_pretrained` to write;
        whole=False (an adapter method's save) gathers only the adapter's entries. One process: nothing to do."""
        yield

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
        if self.sharded:  # FSDP's reduce-scatter averaged its shards; a weight it leaves whole is averaged here
            from torch.distributed.tensor import DTensor

            params = [p for p in params if not isinstance(p, DTensor)]
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

    def shard(self, model, strategy: str) -> None:
        """strategy fsdp: FSDP2 on each decoder layer (its weights gathered for its own forward and backward
        only), then on the whole model, which takes the remaining weights (embeddings, tied head, final norm). A
        unit may mix frozen and trainable weights (a LoRA layer): FSDP2 shards each parameter on its own and
        reduces gradients only for those that have one. Weights a PEFT model keeps outside its base model (a
        prompt encoder: small, and run by PEFT outside any FSDP forward, e.g. when it saves the prompt) stay whole
        on every rank, averaged by `average_gradients` as under ddp. Call before the optimizer is built: it must
        hold the shards."""
        if strategy != "fsdp":
            return
        from torch.distributed.fsdp import fully_shard

        from app.methods import decoder_layers

        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        in_base = {id(p) for p in base.parameters()}
        outside = {p for p in model.parameters() if id(p) not in in_base}
        _, layers = decoder_layers(model)
        for layer in layers:
            fully_shard(layer)
        fully_shard(model, ignored_params=outside or None)
        self.sharded = True

    def grad_scaler(self, device_type: str):
        if not self.sharded:
            return super().grad_scaler(device_type)
        return _AgreeingGradScaler(device_type)

    def trainable_weights(self, model) -> dict[str, torch.Tensor]:
        if not self.sharded:
            return super().trainable_weights(model)
        _reshard(model)
        return self._gather((n, p) for n, p in model.named_parameters() if p.requires_grad)

    def _gather(self, named: Iterable[tuple[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        from torch.distributed.tensor import DTensor

        out: dict[str, torch.Tensor] = {}
        gathered: dict[int, torch.Tensor | None] = {}
        for name, t in named:
            if id(t) not in gathered:  # a tied weight is gathered once and stays one tensor, as in one process
                whole = t.full_tensor() if isinstance(t, DTensor) else t  # all ranks take part; rank 0 keeps it
                gathered[id(t)] = whole.detach().to("cpu").contiguous() if self.is_main else None
            if self.is_main:
                out[name] = gathered[id(t)]
        return out

    def load_weights(self, params: dict[str, torch.nn.Parameter], weights: dict[str, torch.Tensor]) -> None:
        if not self.sharded:
            return super().load_weights(params, weights)
        from torch.distributed.tensor import DTensor, distribute_tensor

        with torch.no_grad():
            for name, tensor in weights.items():
                p = params[name]
                if isinstance(p, DTensor):  # every rank cuts its own shard from the same file: no communication
                    tensor = distribute_tensor(tensor.to(p.device_mesh.device_type), p.device_mesh, p.placements,
                                               src_data_rank=None)
                p.copy_(tensor)

    def optimizer_state(self, model, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        if not self.sharded:
            return super().optimizer_state(model, optimizer)
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        _reshard(model)
        by_name = get_optimizer_state_dict(model, optimizer,
                                           options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if not self.is_main:  # cpu_offload gives the whole state to rank 0 only
            return {}
        index = {name: i for i, name in enumerate(_optimizer_names(model, optimizer))}
        return _rename_optimizer_state(by_name, index)

    def load_optimizer_state(self, model, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
        if not self.sharded:
            return super().load_optimizer_state(model, optimizer, state)
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        names = dict(enumerate(_optimizer_names(model, optimizer)))
        set_optimizer_state_dict(model, optimizer, _rename_optimizer_state(state, names),
                                 options=StateDictOptions(full_state_dict=True))

    @contextmanager
    def full_state(self, model, whole: bool) -> Iterator[None]:
        if not self.sharded:
            yield
            return
        _reshard(model)
        # state_dict() names tied weights twice; the parameters behind them say which are one tensor
        params = dict(model.named_parameters(remove_duplicate=False))
        trainable = {name for name, p in params.items() if p.requires_grad}
        adapters = tuple(getattr(model, "peft_config", {}))

        def kept(name: str) -> bool:  # frozen entries an adapter saves with it are named after the adapter
            return whole or name in trainable or any(f".{a}." in f"{name}." for a in adapters)

        full = self._gather((k, params.get(k, v)) for k, v in model.state_dict().items() if kept(k))
        if self.is_main:
            # save_pretrained (transformers, peft) and the adapter method's save all read model.state_dict()
            model.state_dict = lambda *args, **kwargs: dict(full)
        try:
            yield
        finally:
            model.__dict__.pop("state_dict", None)

    def barrier(self) -> None:
        self.td.barrier()

    def close(self) -> None:
        if self.td.is_initialized():
            self.td.destroy_process_group()


class _AgreeingGradScaler(torch.amp.GradScaler):
    """Under FSDP an overflow may land in one rank's gradient shard only: after unscaling, every rank takes the
    others' found-inf flags, so all skip the step together. (torch's ShardedGradScaler does the same, but its
    flags have a shape the fused AdamW used on GPUs refuses.)"""

    def unscale_(self, optimizer: torch.optim.Optimizer) -> None:
        import torch.distributed as td

        super().unscale_(optimizer)
        for found_inf in self._per_optimizer_states[id(optimizer)]["found_inf_per_device"].values():
            td.all_reduce(found_inf, op=td.ReduceOp.MAX)


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


def _reshard(model) -> None:
    """Back to the shards everywhere: a forward without backward (validation) leaves the root's weights gathered,
    and the optimizer and the state-dict API know the shards only."""
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def _optimizer_names(model, optimizer: torch.optim.Optimizer) -> list[str]:
    """The parameter name of each optimizer slot, in the order of optimizer.state_dict()'s integer keys."""
    name_of = {id(p): name for name, p in model.named_parameters()}
    return [name_of[id(p)] for group in optimizer.param_groups for p in group["params"]]


def _rename_optimizer_state(state: dict[str, Any], new_key: dict) -> dict[str, Any]:
    """An optimizer state_dict with its parameter keys mapped: slot index <-> parameter name (the distributed
    checkpoint API speaks names; checkpoints keep the single-process indices, so either strategy resumes them)."""
    return {
        "state": {new_key[k]: v for k, v in state["state"].items()},
        "param_groups": [{**g, "params": [new_key[k] for k in g["params"]]} for g in state["param_groups"]],
    }


def strategy_for(configured: str) -> str:
    """run.yaml's strategy, unless the launcher was told to shard (`accelerate launch --use_fsdp` or an accelerate
    config with FSDP sets ACCELERATE_USE_FSDP): a run launched for FSDP is never silently replicated. accelerate's
    other fsdp_* options are not read: the worker shards one way (`ProcessGroupDist.shard`)."""
    return "fsdp" if os.environ.get("ACCELERATE_USE_FSDP", "").lower() in ("1", "true") else configured


def from_environment() -> Dist:
    """The launcher's process group when it started several processes, else the single-process no-op."""
    return ProcessGroupDist() if int(os.environ.get("WORLD_SIZE", "1")) > 1 else Dist()
