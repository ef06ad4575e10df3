"""Attention for packed rows: causal attention inside each row of a padding-free sequence, registered with
transformers under the name VARLEN, and the test of whether a model and method can be trained packed."""
from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F

VARLEN = "varlen_sdpa"


def varlen_sdpa(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, cu_seq_lens_q=None, **kwargs):
    """Causal attention inside each packed row only (no cross-row mask to build, no pad positions to compute).

    On a GPU in half precision one flash-attention call covers every row (`torch.nn.attention.varlen`); elsewhere
    each row gets its own sdpa call. Without row boundaries (generation, unpacked batches) it is the stock sdpa.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if cu_seq_lens_q is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    gqa = key.shape[1] != query.shape[1]
    p = dropout if module.training else 0.0
    if p == 0.0 and _FLASH.usable(query):
        out = _FLASH(query, key, value, cu_seq_lens_q, kwargs.get("max_length_q"), scaling)
        if out is not None:
            return out, None
    bounds = cu_seq_lens_q.tolist()
    parts = [
        F.scaled_dot_product_attention(
            query[:, :, s:e], key[:, :, s:e], value[:, :, s:e], is_causal=True, scale=scaling, dropout_p=p,
            enable_gqa=gqa,
        )
        for s, e in zip(bounds[:-1], bounds[1:])
    ]
    return torch.cat(parts, dim=2).transpose(1, 2).contiguous(), None


class _FlashVarlen:
    """torch's varlen flash attention for packed rows on a GPU: one kernel per layer instead of one per row, which
    matters on a GPU, where small kernels cost their launch. Its signature moved between torch releases (causal as
    `is_causal` or as `window_size`; GQA built in or not), so that is read once; any failure on the first call turns
    it off for the process and the per-row path takes over."""

    def __init__(self):
        self.enabled: bool | None = None  # None: not tried yet
        self._bounds: tuple[torch.Tensor | None, torch.Tensor | None] = (None, None)
        self._attn: tuple[Callable, frozenset[str]] | None = None  # varlen_attn and its parameter names

    def _function(self) -> tuple[Callable, frozenset[str]]:
        if self._attn is None:
            import inspect

            from torch.nn.attention.varlen import varlen_attn

            self._attn = varlen_attn, frozenset(inspect.signature(varlen_attn).parameters)
        return self._attn

    def usable(self, query: torch.Tensor) -> bool:
        return self.enabled is not False and query.is_cuda and query.dtype in (torch.float16, torch.bfloat16)

    def _on_device(self, bounds: torch.Tensor, device: torch.device) -> torch.Tensor:
        # every layer of one forward gets the same CPU tensor: copy it to the GPU once
        if self._bounds[0] is not bounds:
            self._bounds = (bounds, bounds.to(device=device, dtype=torch.int32, non_blocking=True))
        return self._bounds[1]

    def __call__(self, query, key, value, bounds: torch.Tensor, max_len: int | None, scaling) -> torch.Tensor | None:
        try:
            varlen_attn, params = self._function()
            cu = self._on_device(bounds, query.device)
            if max_len is None:
                max_len = int((bounds[1:] - bounds[:-1]).max())
            q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # (tokens, heads, head_dim)
            extra: dict[str, Any] = {"scale": scaling}
            if k.shape[1] != q.shape[1]:
                if "enable_gqa" in params:
                    extra["enable_gqa"] = True
                else:
                    groups = q.shape[1] // k.shape[1]
                    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
            if "is_causal" in params:
                extra["is_causal"] = True
            else:
                extra["window_size"] = (-1, 0)
            out = varlen_attn(q, k, v, cu, cu, max_len, max_len, **extra)
        except (ImportError, TypeError, RuntimeError, NotImplementedError, ValueError):
            if self.enabled:  # it worked before: a real error, not a missing feature
                raise
            self.enabled = False
            return None
        self.enabled = True
        return out.unsqueeze(0)


_FLASH = _FlashVarlen()


def _varlen_mask(*args, **kwargs):
    # Packed rows need no mask (varlen_sdpa slices by row); a padded batch still gets the usual sdpa mask.
    from transformers.masking_utils import sdpa_mask

    return None if kwargs.get("attention_mask") is None else sdpa_mask(*args, **kwargs)


def register_varlen_attention() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(VARLEN, varlen_sdpa)
    AttentionMaskInterface.register(VARLEN, _varlen_mask)


def can_pack(model, cutoff_len: int) -> bool:
    """Packing needs an attention that goes through transformers' interface and a method that does not add
    virtual tokens (prompt/prefix tuning) or its own loss term (AdaLoRA's orthogonality penalty)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if not getattr(base, "_supports_attention_backend", False):
        return False
    window = getattr(base.config.get_text_config(), "sliding_window", None)
    if window and window < cutoff_len:  # varlen_sdpa attends over the whole row
        return False
    peft_config = getattr(model, "peft_config", {}).get(getattr(model, "active_adapter", "default"))
    return peft_config is None or not (peft_config.is_prompt_learning or peft_config.peft_type == "ADALORA")
