"""Training-only speed-ups for peft's LoRA layers on the CPU, same math: cheaper dropout masks, faster rank-r products."""
from __future__ import annotations

import types

import torch
import torch.nn as nn

# Each random 64-bit draw gives four 16-bit values: a quarter of the generator calls of one float per element, and
# the CPU generator (mt19937) is what dominates a dropout mask there. A 16-bit value is dropped when it falls below
# round(p * 2**16), so the drop probability is p to within 2**-17 (7.6e-6).
_LEVELS = 1 << 16


def _uniform16(shape: torch.Size, device=None, generator: torch.Generator | None = None) -> torch.Tensor:
    """int16 values uniform over -32768..32767 in `shape`, four from each random 64-bit draw."""
    n = shape.numel()
    draws = torch.empty((n + 3) // 4, dtype=torch.int64, device=device)
    draws.random_(-(1 << 63), None, generator=generator)  # the full 64-bit range: four uniform 16-bit values each
    return draws.view(torch.int16)[:n].view(shape)


def _threshold(p: float) -> int:
    """_uniform16's values below this one drop: round(p * 2**16) of the 2**16 levels."""
    return -(_LEVELS // 2) + round(p * _LEVELS)


def keep_scale(shape: torch.Size, p: float, device=None, generator: torch.Generator | None = None) -> torch.Tensor:
    """An fp32 tensor of `shape` holding 0 with probability p and 1/(1-p) otherwise, each element independent."""
    return scale_of(_uniform16(shape, device, generator), p)


def keep_mask(shape: torch.Size, p: float, device=None) -> torch.Tensor:
    """A bool tensor of `shape`, False with probability p (to within 2**-17), each element independent: keep_scale's
    draws as a mask (one byte per element)."""
    return _uniform16(shape, device) >= _threshold(p)


def scale_of(values: torch.Tensor, p: float) -> torch.Tensor:
    """keep_scale's mask from int16 values uniform over -32768..32767: the lowest round(p * 2**16) of them drop."""
    # int16 -> fp32 is exact; on whole numbers, clamp(v - threshold + 1, 0, 1) is 1 for v >= threshold and 0 below:
    # one cheap float pass instead of a bool mask, whose element-wise ops are slow on the CPU
    return values.to(torch.float32).sub_(_threshold(p) - 1).clamp_(0, 1).mul_(1 / (1 - p))


class FastDropout(nn.Module):
    """Drop-in for nn.Dropout(p) in training (identity in eval): x times a keep_scale mask. Autograd keeps the fp32
    mask for backward, as the CPU's own dropout does, so memory use is unchanged. It has no weights, so nothing it
    does reaches a saved adapter."""

    def __init__(self, p: float):
        super().__init__()
        if not 0 <= p < 1:
            raise ValueError(f"dropout p={p!r}: must be at least 0 and below 1")
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        return x * keep_scale(x.shape, self.p, x.device).to(x.dtype)

    def extra_repr(self) -> str:
        return f"p={self.p}"


class _ThinMatmul(torch.autograd.Function):
    """x @ w.T for a weight with few rows (lora_A: r x in) or few columns (lora_B: out x r), every product taken
    in the orientation where the rank is the first factor's row count: with r = 8, MKL on one core runs
    (T x out) @ (out x r) three to five times slower than the same product as (r x out) @ (out x T), transposed."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, w)
        x2 = x.reshape(-1, x.shape[-1])
        if w.shape[0] <= w.shape[1]:  # r x in: (r x in) @ (in x T), as T x r
            y = (w @ x2.t()).t().contiguous()
        else:  # out x r: T x r times a contiguous r x out
            y = x2 @ w.t().contiguous()
        return y.view(*x.shape[:-1], w.shape[0])

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, w = ctx.saved_tensors
        g2 = grad.reshape(-1, grad.shape[-1])
        x2 = x.reshape(-1, x.shape[-1])
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            if w.shape[0] <= w.shape[1]:
                grad_x = g2 @ w
            else:
                grad_x = (w.t() @ g2.t()).t()
            grad_x = grad_x.reshape(x.shape)
        if ctx.needs_input_grad[1]:
            if w.shape[0] <= w.shape[1]:
                grad_w = g2.t() @ x2
            else:
                grad_w = (x2.t() @ g2).t()
        return grad_x, grad_w


class ThinLinear(nn.Linear):
    """A bias-free nn.Linear of rank-sized width whose products run in the fast orientation (see _ThinMatmul);
    plain F.linear where that does not apply (autocast, mixed dtypes)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        if x.dtype != w.dtype or torch.is_autocast_enabled(x.device.type):
            return nn.functional.linear(x, w)
        return _ThinMatmul.apply(x, w)


class _LoraLinear(torch.autograd.Function):
    """A frozen linear plus its LoRA update in one step: y = x W^T + b + s * (m * x) A^T B^T, m the dropout mask
    (None: no dropout). The same products as peft's module-by-module path (in ThinLinear's orientation), with the
    scaling applied to the rank-r tensor instead of the output, the update added into the base output in its
    product, and the input gradient's two halves summed in one pass: element-wise passes over whole activations
    are what this saves. It keeps what peft's path keeps: the dropped input, A's output, the mask."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, mask, scaling: float):
        x2 = x.reshape(-1, x.shape[-1])
        dropped = x2 * mask.view_as(x2) if mask is not None else x2
        h = (lora_a @ dropped.t()).mul_(scaling).t().contiguous()  # T x r, already scaled
        y = nn.functional.linear(x2, weight, bias)
        y.addmm_(h, lora_b.t().contiguous())
        keep_mask = mask if (mask is not None and ctx.needs_input_grad[0]) else None
        ctx.save_for_backward(dropped, h, weight, lora_a, lora_b, keep_mask)
        ctx.scaling, ctx.x_shape = scaling, x.shape
        return y.view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, grad):
        dropped, h, weight, lora_a, lora_b, mask = ctx.saved_tensors
        g2 = grad.reshape(-1, grad.shape[-1])
        grad_a = grad_b = grad_x = None
        grad_h = (lora_b.t() @ g2.t()).t().mul_(ctx.scaling)  # T x r, d loss / d (dropped A^T)
        if ctx.needs_input_grad[4]:
            grad_b = (h.t() @ g2).t()
        if ctx.needs_input_grad[3]:
            grad_a = grad_h.t() @ dropped
        if ctx.needs_input_grad[0]:
            grad_dropped = grad_h @ lora_a
            if mask is None:
                grad_x = torch.addmm(grad_dropped, g2, weight)
            else:
                grad_x = (g2 @ weight).addcmul_(grad_dropped, mask.view_as(grad_dropped))
            grad_x = grad_x.view(ctx.x_shape)
        return grad_x, None, None, grad_a, grad_b, None, None


def plain_adapter(layer) -> str | None:
    """The active adapter of a peft lora.Linear that is the plain case: one active adapter, no variant (DoRA ...),
    unmerged and enabled, a frozen nn.Linear base, no bias on lora_B, a dropout of known rate. None otherwise."""
    if len(layer.active_adapters) != 1 or layer.disable_adapters or layer.merged:
        return None
    adapter = layer.active_adapters[0]
    base = layer.base_layer
    if (adapter not in layer.lora_A or adapter in getattr(layer, "lora_variant", {}) or type(base) is not nn.Linear
            or base.weight.requires_grad or (base.bias is not None and base.bias.requires_grad)
            or getattr(layer.lora_B[adapter], "bias", None) is not None
            or dropout_p(layer.lora_dropout[adapter]) is None):
        return None
    return adapter


def dropout_p(module: nn.Module) -> float | None:
    """The drop rate of a LoRA layer's dropout (nn.Identity: 0); None for a module of another kind."""
    if isinstance(module, nn.Identity):
        return 0.0
    return float(module.p) if isinstance(module, (FastDropout, nn.Dropout)) else None


def _fused_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """forward of a peft lora.Linear in training: _LoraLinear where the layer is the plain case (plain_adapter, an
    fp32 base and adapter, no mixed-adapter batch, no autocast); peft's own forward for everything else."""
    adapter = plain_adapter(self)
    plain = (adapter is not None and self.training and not args and not kwargs
             and x.dtype == self.base_layer.weight.dtype == self.lora_A[adapter].weight.dtype == torch.float32
             and not torch.is_autocast_enabled(x.device.type))
    if not plain:
        return type(self).forward(self, x, *args, **kwargs)
    base = self.base_layer
    p = dropout_p(self.lora_dropout[adapter])
    mask = keep_scale(x.shape, p, x.device) if p > 0 else None
    return _LoraLinear.apply(x, base.weight, base.bias, self.lora_A[adapter].weight, self.lora_B[adapter].weight,
                             mask, self.scaling[adapter])


def speed_up_lora(model) -> int:
    """In every peft LoRA layer: swap the dropout (nn.Dropout) for FastDropout with the same p, the rank-r lora_A /
    lora_B linears for ThinLinear holding the same weight Parameter (so the state dict, the optimizer and a saved
    adapter see no difference), and give plain lora.Linear layers the fused training forward. Returns how many
    modules changed. For CPU training: on CUDA, nn.Dropout is one fused kernel already, and products' speeds differ."""
    from peft.tuners.lora.layer import Linear as LoraLinear

    changed = 0
    for module in model.modules():
        if type(module) is LoraLinear:
            module.forward = types.MethodType(_fused_forward, module)
            changed += 1
        for attr in ("lora_dropout", "lora_A", "lora_B"):
            modules = getattr(module, attr, None)
            if not isinstance(modules, nn.ModuleDict):
                continue
            for name, old in list(modules.items()):
                new = _fast_twin(old)
                if new is not None:
                    modules[name] = new.train(old.training)
                    changed += 1
    return changed


def _fast_twin(module: nn.Module) -> nn.Module | None:
    if type(module) is nn.Dropout:
        return FastDropout(module.p)
    # lora_A / lora_B: bias-free, one side the rank (up to 64 here: the slow orientation is a rank-r shape)
    if type(module) is nn.Linear and module.bias is None and min(module.weight.shape) <= 64:
        twin = ThinLinear(module.in_features, module.out_features, bias=False, device="meta")
        twin.weight = module.weight
        return twin
    return None
