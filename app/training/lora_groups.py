"""LoRA training under autocast with fewer operations: the LoRA layers that read the same input (q/k/v, gate/up)
computed together, in the compute dtype, by one autograd Function.

Why: a small model on a GPU waits on kernel launches, not arithmetic. peft computes each LoRA layer on its own and
lets autocast cast as it goes: per layer the input is cast once for the base product and once more for lora_A,
both LoRA weights are cast, the update is scaled and added in separate steps, and backward mirrors all of it. Here
a group of layers sharing an input casts it once, draws the dropout masks of the whole group in one call, runs
the group's lora_A products as one batched product with the scaling applied to the rank-r result, and adds each
lora_B product into its base output inside the product (addmm). Backward sums the group's input gradients in
place. Same model, same parameters and saved adapters as peft's; the dropout masks are other random draws with
the same drop probability (as in app.training.fast_lora). Measured in operations per step by bench/step_ops.py.

Only in training under autocast, for plain LoRA layers (one active adapter, no DoRA, a frozen nn.Linear base, no
bias on lora_B, no hooks on its parts); everything else goes through peft's own forward.
"""
from __future__ import annotations

import types

import torch
import torch.nn as nn
import torch.nn.functional as F

from app.training.fast_lora import dropout_p, keep_mask, plain_adapter


class _GroupedLora(torch.autograd.Function):
    """y_i = x W_i^T + b_i + s_i (m_i * x) A_i^T B_i^T for the n layers of a group, computed in dtype `c`.

    Every A and B of the group is cast in one buffer (one cast, not 2n), the scalings are applied inside the
    products (alpha), and backward writes all of their gradients into one buffer cast back once. Saved for
    backward: the n dropped inputs, their masks and the scaled rank-r products (not the input itself when dropout
    is on, one copy of it rather than one per layer when it is off), the cast LoRA weights; the base weights are
    referenced."""

    @staticmethod
    def forward(ctx, x, c: torch.dtype, p: float, scales: tuple[float, ...], n: int, *tensors):
        weights, biases, a_weights, b_weights = (tensors[i * n:(i + 1) * n] for i in range(4))
        x2 = x.reshape(-1, x.shape[-1])
        with torch.autocast(x.device.type, enabled=False):
            xc = x2.to(c)
            # outputs in the input's own shape, not views: a model may change them in place (OLMo's clip_qkv clamps)
            ys = [F.linear(xc.view(x.shape), w.to(c), None if b is None else b.to(c)) for w, b in zip(weights, biases)]
            flat = torch.cat([t.reshape(-1) for t in (*a_weights, *b_weights)]).to(c)
            a_c, b_c = _lora_views(flat, a_weights, b_weights)
            if p > 0 and x.device.type == "cpu":  # the CPU's own dropout draws one float per element: slow
                mask = keep_mask(torch.Size((n, *xc.shape)), p)
                dropped = torch.ops.aten.native_dropout_backward(xc.expand(n, *xc.shape), mask, 1 / (1 - p))
            elif p > 0:
                dropped, mask = torch.native_dropout(xc.expand(n, *xc.shape), p, True)
            else:
                dropped, mask = xc.expand(n, *xc.shape), None
            h = dropped.new_empty((n, xc.shape[0], a_c.shape[1]))  # n x T x r, scaled
            _products(h, dropped, a_c.transpose(1, 2), scales)
            for y, h_i, b in zip(ys, h, b_c):
                y.view(-1, y.shape[-1]).addmm_(h_i, b.t())
        # no input gradient (the first layer's input): the masks are not needed
        ctx.save_for_backward(dropped if p > 0 else xc, mask if x.requires_grad else None, h, flat, *weights)
        ctx.c, ctx.p, ctx.scales, ctx.n, ctx.x_shape, ctx.x_dtype = c, p, scales, n, x.shape, x.dtype
        ctx.lora_dtype, ctx.shapes = a_weights[0].dtype, ([a.shape for a in a_weights], [b.shape for b in b_weights])
        return tuple(ys)

    @staticmethod
    def backward(ctx, *grads):
        n, c = ctx.n, ctx.c
        dropped, mask, h, flat, *weights = ctx.saved_tensors
        a_c, b_c = _lora_views(flat, *ctx.shapes)
        if ctx.p == 0:
            dropped = dropped.expand(n, *dropped.shape)
        with torch.autocast(dropped.device.type, enabled=False):
            tokens = h.shape[1]
            gys = [torch.zeros(tokens, b.shape[0], dtype=c, device=h.device) if g is None
                   else g.reshape(tokens, -1).to(c) for g, b in zip(grads, b_c)]
            grad_flat = torch.empty_like(flat)
            grad_a, grad_b = _lora_views(grad_flat, *ctx.shapes)
            for gy, h_i, g in zip(gys, h, grad_b):
                torch.mm(gy.t(), h_i, out=g)
            gh = torch.empty_like(h)  # d loss / d (dropped A^T), scaled
            for gy, b, g, s in zip(gys, b_c, gh, ctx.scales):
                torch.addmm(g, gy, b, beta=0, alpha=s, out=g)
            torch.bmm(gh.transpose(1, 2), dropped, out=grad_a)
            grad_x = None
            if ctx.needs_input_grad[0]:
                gd = torch.bmm(gh, a_c)  # n x T x in
                if mask is not None:
                    gd = torch.ops.aten.native_dropout_backward(gd, mask, 1 / (1 - ctx.p))
                grad_x = gd.sum(0) if n > 1 else gd[0]
                for gy, w in zip(gys, weights):
                    grad_x.addmm_(gy, w.to(c))
                grad_x = grad_x.to(ctx.x_dtype).view(ctx.x_shape)
            grad_a, grad_b = _lora_views(grad_flat.to(ctx.lora_dtype), *ctx.shapes)
        return (grad_x, None, None, None, None, *([None] * 2 * n), *grad_a.unbind(0), *grad_b)


def _lora_views(flat: torch.Tensor, a_shapes, b_shapes) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The group's A weights (n x r x in) and B weights (out_i x r) as views of one flat buffer, in that order."""
    a_shapes = [tuple(getattr(a, "shape", a)) for a in a_shapes]
    b_shapes = [tuple(getattr(b, "shape", b)) for b in b_shapes]
    n_a = sum(r * i for r, i in a_shapes)
    a = flat[:n_a].view(len(a_shapes), *a_shapes[0])
    bs, offset = [], n_a
    for o, r in b_shapes:
        bs.append(flat[offset:offset + o * r].view(o, r))
        offset += o * r
    return a, bs


def _products(out: torch.Tensor, left: torch.Tensor, right: torch.Tensor, scales: tuple[float, ...]) -> None:
    """out = scale_i * left_i @ right_i for each i, the scaling inside the product when it is one for all."""
    if len(set(scales)) == 1:
        torch.baddbmm(out, left, right, beta=0, alpha=scales[0], out=out)
    else:
        torch.bmm(left, right, out=out)
        for o, s in zip(out, scales):
            o.mul_(s)


class LoraGroup:
    """The plain LoRA layers of one parent module that read inputs of the same width with the same rank and
    dropout. Which of them read the very same tensor is learnt from one small forward when the model is set up
    (group_lora_layers): the layers called one after another with one input (as attention calls q, k, v and a
    gated MLP gate, up) form a group. In training, the first of a group to be called computes every member's
    output and the others, called next with that tensor, take theirs. A layer called with another input than its
    group's computes again, correctly, only without the saving. Learning before training, not during it, keeps
    every forward of a run alike, which activation checkpointing relies on when it recomputes one."""

    def __init__(self, members: list[nn.Module], key: tuple):
        self.members, self.key = members, key
        self._calls: list[list[nn.Module]] | None = []  # the set-up forward's calls, by input; None once learnt
        self._groups: dict[int, list[nn.Module]] = {}
        self._x: torch.Tensor | None = None
        self._pending: dict[int, torch.Tensor] = {}

    def plain(self) -> bool:
        """Still plain, and alike, now (adapters can be disabled, merged, added or switched after grouping)."""
        return all(_plain(m) == self.key for m in self.members)

    def reset(self) -> None:
        """A new forward of the model: nothing computed for the last one may be handed out."""
        self._x, self._pending = None, {}

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
    return _GroupedLora.apply(x, torch.get_autocast_dtype(x.device.type), dropout_p(group[0].lora_dropout[adapter]),
                              tuple(float(m.scaling[adapter]) for m in group), len(group), *tensors)


def _plain(layer) -> tuple | None:
    """(in_features, r, dropout p, LoRA dtype) of a LoRA layer the grouped path computes as peft would; else None."""
    adapter = plain_adapter(layer)
    if adapter is None:
        return None
    parts = (layer.base_layer, layer.lora_A[adapter], layer.lora_B[adapter], layer.lora_dropout[adapter])
    if any(m._forward_hooks or m._forward_pre_hooks or hasattr(m, "_hf_hook") for m in parts):
        return None  # the grouped path calls none of them: whatever a hook does would be skipped
    a, b = layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
    if a.dtype != b.dtype:
        return None
    return layer.base_layer.in_features, a.shape[0], dropout_p(layer.lora_dropout[adapter]), a.dtype


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
    before: dict[nn.Module, object] = {}  # each layer's own forward, put back if learning fails
    for parent in model.modules():
        by_key: dict[tuple, list[nn.Module]] = {}
        for child in parent.children():
            if type(child) is LoraLinear and (key := _plain(child)) is not None:
                by_key.setdefault(key, []).append(child)
        for key, members in by_key.items():
            pool = LoraGroup(members, key)
            for m in members:
                before[m] = m.__dict__.get("forward")
                m._lora_group = pool
                m.forward = types.MethodType(_grouped_forward, m)
            pools.append(pool)
    if not pools:
        return []
    # outputs pending from the last forward are dropped at the start of the next: never handed out stale
    def reset(module, args) -> None:
        for pool in pools:
            pool.reset()

    hook = model.register_forward_pre_hook(reset)
    device = next(model.parameters()).device
    was_training = model.training
    model.train()
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), torch.no_grad(), \
                torch.autocast(device.type, dtype=dtype):
            model(input_ids=torch.zeros((1, 2), dtype=torch.long, device=device), use_cache=False)
    except Exception:  # a model this forward does not suit: peft's layers as they were, nothing grouped
        hook.remove()
        for m, forward in before.items():
            del m.forward, m._lora_group
            if forward is not None:
                m.forward = forward
        return []
    finally:
        model.train(was_training)
    names = {id(m): n for n, m in model.named_modules()}
    return [[names[id(m)] for m in g] for pool in pools for g in pool.learnt() if len(g) > 1]
