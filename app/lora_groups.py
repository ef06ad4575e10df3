"""LoRA training under autocast with fewer operations: the LoRA layers that read the same input (q/k/v, gate/up)
computed together, in the compute dtype, by one autograd Function.

Why: a small model on a GPU waits on kernel launches, not arithmetic. peft computes each LoRA layer on its own and
lets autocast cast as it goes: per layer the input is cast once for the base product and once more for lora_A,
both LoRA weights are cast, the update is scaled and added in separate steps, and backward mirrors all of it. Here
a group of layers sharing an input casts it once, draws the dropout masks of the whole group in one call, runs
the group's lora_A products as one batched product with the scaling applied to the rank-r result, and adds each
lora_B product into its base output inside the product (addmm). Backward sums the group's input gradients in
place. Same model, same parameters and saved adapters as peft's; the dropout masks are other random draws with
the same drop probability (as in app.fast_lora). Measured in operations per step by bench/step_ops.py.

Only in training under autocast, for plain LoRA layers (one active adapter, no DoRA, a frozen nn.Linear base, no
bias on lora_B); everything else goes through peft's own forward.
"""
from __future__ import annotations

import types

import torch
import torch.nn as nn
import torch.nn.functional as F


class _GroupedLora(torch.autograd.Function):
    """y_i = x W_i^T + b_i + s_i (m_i * x) A_i^T B_i^T for the n layers of a group, computed in dtype `c`.

    Saved for backward: the n dropped inputs, their masks and the scaled rank-r products (not the input itself
    when dropout is on, and one copy of it rather than one per layer when it is off); the weights are referenced."""

    @staticmethod
    def forward(ctx, x, c: torch.dtype, p: float, scales: tuple[float, ...], n: int, *tensors):
        weights, biases, a_weights, b_weights = (tensors[i * n:(i + 1) * n] for i in range(4))
        x2 = x.reshape(-1, x.shape[-1])
        with torch.autocast(x.device.type, enabled=False):
            xc = x2.to(c)
            ys = [F.linear(xc, w.to(c), None if b is None else b.to(c)) for w, b in zip(weights, biases)]
            a_c = torch.stack(a_weights).to(c)  # n x r x in
            b_c = [b.to(c) for b in b_weights]
            if p > 0:
                dropped, mask = torch.native_dropout(xc.expand(n, *xc.shape), p, True)
            else:
                dropped, mask = xc.expand(n, *xc.shape), None
            h = torch.bmm(dropped, a_c.transpose(1, 2))  # n x T x r
            _scale(h, scales)
            for y, h_i, b in zip(ys, h, b_c):
                y.addmm_(h_i, b.t())
        # no input gradient (the first layer's input): the masks are not needed
        ctx.save_for_backward(dropped if p > 0 else xc, mask if x.requires_grad else None, h, a_c, *b_c, *weights)
        ctx.c, ctx.p, ctx.scales, ctx.n, ctx.x_shape, ctx.x_dtype = c, p, scales, n, x.shape, x.dtype
        ctx.a_dtypes, ctx.b_dtypes = [a.dtype for a in a_weights], [b.dtype for b in b_weights]
        lead = x.shape[:-1]
        return tuple(y.view(*lead, y.shape[-1]) for y in ys)

    @staticmethod
    def backward(ctx, *grads):
        n, c = ctx.n, ctx.c
        dropped, mask, h, a_c, *rest = ctx.saved_tensors
        b_c, weights = rest[:n], rest[n:]
        if ctx.p == 0:
            dropped = dropped.expand(n, *dropped.shape)
        with torch.autocast(dropped.device.type, enabled=False):
            tokens = h.shape[1]
            gys = [torch.zeros(tokens, b.shape[0], dtype=c, device=h.device) if g is None
                   else g.reshape(tokens, -1).to(c) for g, b in zip(grads, b_c)]
            needs = ctx.needs_input_grad
            grad_b = [None] * n
            for i, (gy, h_i) in enumerate(zip(gys, h)):
                if needs[5 + 3 * n + i]:
                    grad_b[i] = (gy.t() @ h_i).to(ctx.b_dtypes[i])
            gh = torch.empty_like(h)  # d loss / d (dropped A^T), before the scaling
            for i, (gy, b) in enumerate(zip(gys, b_c)):
                torch.mm(gy, b, out=gh[i])
            _scale(gh, ctx.scales)
            grad_a = [None] * n
            if any(needs[5 + 2 * n:5 + 3 * n]):
                stacked = torch.bmm(gh.transpose(1, 2), dropped)  # n x r x in
                if len(set(ctx.a_dtypes)) == 1:  # one cast for the group
                    grad_a = list(stacked.to(ctx.a_dtypes[0]).unbind(0))
                else:
                    grad_a = [g.to(dtype) for g, dtype in zip(stacked, ctx.a_dtypes)]
            grad_x = None
            if needs[0]:
                gd = torch.bmm(gh, a_c)  # n x T x in
                if mask is not None:
                    gd = torch.ops.aten.native_dropout_backward(gd, mask, 1 / (1 - ctx.p))
                grad_x = gd.sum(0) if n > 1 else gd[0]
                for gy, w in zip(gys, weights):
                    grad_x.addmm_(gy, w.to(c))
                grad_x = grad_x.to(ctx.x_dtype).view(ctx.x_shape)
        return (grad_x, None, None, None, None, *([None] * 2 * n), *grad_a, *grad_b)


def _scale(t: torch.Tensor, scales: tuple[float, ...]) -> None:
    if len(set(scales)) == 1:
        t.mul_(scales[0])
    else:
        for t_i, s in zip(t, scales):
            t_i.mul_(s)


def _dropout_p(module: nn.Module) -> float | None:
    if isinstance(module, nn.Identity):
        return 0.0
    p = getattr(module, "p", None)  # nn.Dropout, app.fast_lora.FastDropout
    return float(p) if isinstance(p, float) else None


class LoraGroup:
    """The plain LoRA layers of one parent module that read inputs of the same width with the same rank and
    dropout. Which of them read the very same tensor is learnt from one small forward when the model is set up
    (group_lora_layers): the layers called one after another with one input (as attention calls q, k, v and a
    gated MLP gate, up) form a group. In training, the first of a group to be called computes every member's
    output and the others, called next with that tensor, take theirs. A layer called with another input than its
    group's computes again, correctly, only without the saving. Learning before training, not during it, keeps
    every forward of a run alike, which activation checkpointing relies on when it recomputes one."""

    def __init__(self, members: list[nn.Module]):
        self.members = members
        self._calls: list[list[nn.Module]] | None = []  # the set-up forward's calls, by input; None once learnt
        self._groups: dict[int, list[nn.Module]] = {}
        self._x: torch.Tensor | None = None
        self._pending: dict[int, torch.Tensor] = {}

    def plain(self) -> bool:
        """Still plain now (adapters can be disabled, merged or switched after grouping)."""
        return all(_plain(m) is not None for m in self.members)

    def output(self, member: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if self._calls is not None:  # the set-up forward: note who reads which tensor
            if self._x is x:
                self._calls[-1].append(member)
            else:
                self._calls.append([member])
                self._x = x
            return _compute([member], x)[0]
        if self._x is x and id(member) in self._pending:
            out = self._pending.pop(id(member))
            if not self._pending:
                self._x = None
            return out
        group = self._groups.get(id(member), [member])
        outs = _compute(group, x)
        self._pending = {id(m): o for m, o in zip(group, outs) if m is not member}
        self._x = x if self._pending else None
        return outs[group.index(member)]

    def learnt(self) -> list[list[nn.Module]]:
        """End learning: each run of calls with one input is a group (a layer called twice keeps its first)."""
        groups: list[list[nn.Module]] = []
        for called in self._calls or []:
            group = [m for m in dict.fromkeys(called) if not any(m in g for g in groups)]
            if group:
                groups.append(group)
        self._groups = {id(m): g for g in groups for m in g}
        self._calls, self._x = None, None
        return groups


def _compute(group: list[nn.Module], x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    adapter = group[0].active_adapters[0]
    tensors = ([m.base_layer.weight for m in group] + [m.base_layer.bias for m in group]
               + [m.lora_A[adapter].weight for m in group] + [m.lora_B[adapter].weight for m in group])
    return _GroupedLora.apply(x, torch.get_autocast_dtype(x.device.type), _dropout_p(group[0].lora_dropout[adapter]),
                              tuple(float(m.scaling[adapter]) for m in group), len(group), *tensors)


def _plain(layer) -> tuple | None:
    """(in_features, r, dropout p) of a LoRA layer the grouped path computes exactly as peft would; else None."""
    if len(layer.active_adapters) != 1 or layer.disable_adapters or layer.merged:
        return None
    adapter = layer.active_adapters[0]
    base = layer.base_layer
    if (adapter not in layer.lora_A or adapter in getattr(layer, "lora_variant", {}) or type(base) is not nn.Linear
            or base.weight.requires_grad or (base.bias is not None and base.bias.requires_grad)
            or getattr(layer.lora_B[adapter], "bias", None) is not None):
        return None
    p = _dropout_p(layer.lora_dropout[adapter])
    if p is None:
        return None
    return base.in_features, layer.lora_A[adapter].weight.shape[0], p


def _grouped_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    if (args or kwargs or not self.training or not torch.is_autocast_enabled(x.device.type)
            or not self._lora_group.plain()):
        return type(self).forward(self, x, *args, **kwargs)
    return self._lora_group.output(self, x)


def group_lora_layers(model: nn.Module, dtype: torch.dtype) -> list[list[str]]:
    """Give every plain peft lora.Linear the grouped training forward (see the module doc), learning the groups
    from one forward of two tokens under autocast to `dtype` (no gradients; the random state is put back after).
    Returns the groups of more than one layer, by module name."""
    from peft.tuners.lora.layer import Linear as LoraLinear

    pools: list[LoraGroup] = []
    for parent in model.modules():
        by_key: dict[tuple, list[nn.Module]] = {}
        for child in parent.children():
            if type(child) is LoraLinear and (key := _plain(child)) is not None:
                by_key.setdefault(key, []).append(child)
        for members in by_key.values():
            pool = LoraGroup(members)
            for m in members:
                m._lora_group = pool
                m.forward = types.MethodType(_grouped_forward, m)
            pools.append(pool)
    if not pools:
        return []
    device = next(model.parameters()).device
    was_training = model.training
    model.train()
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), torch.no_grad(), \
                torch.autocast(device.type, dtype=dtype):
            model(input_ids=torch.zeros((1, 2), dtype=torch.long, device=device), use_cache=False)
    finally:
        model.train(was_training)
    names = {id(m): n for n, m in model.named_modules()}
    return [[names[id(m)] for m in g] for pool in pools for g in pool.learnt() if len(g) > 1]
