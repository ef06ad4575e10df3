"""Attention for packed rows, forward + backward, in the ways the worker could do it on this device: one sdpa call per
row (each backend), torch's varlen flash attention, one masked sdpa over the packed row, and the padded batch a
peer trainer runs. Shapes are SmolLM2-135M's (9 query heads, 3 KV heads, head dim 64) over 30 layers, with new row
lengths every step, as training sees them.

    .venv/bin/python bench/attention_variants.py [--steps 20] [--rows 4] [--cutoff 256]
"""
from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

HEADS, KV_HEADS, HEAD_DIM, LAYERS = 9, 3, 64, 30


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rows", type=int, default=4)
    parser.add_argument("--cutoff", type=int, default=256)
    args = parser.parse_args()

    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from app.training.attention import _FlashVarlen

    cuda = torch.cuda.is_available()
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    rng = random.Random(0)
    shapes = [[rng.randint(56, args.cutoff) for _ in range(args.rows)] for _ in range(args.steps + 2)]

    def per_row(q, k, v, bounds, backends=None):
        def run():
            b = bounds.tolist()
            return torch.cat([F.scaled_dot_product_attention(q[:, :, s:e], k[:, :, s:e], v[:, :, s:e], is_causal=True,
                                                             enable_gqa=True) for s, e in zip(b[:-1], b[1:])], dim=2)
        if backends is None:
            return run()
        with sdpa_kernel(backends):
            return run()

    flash = _FlashVarlen()

    def varlen(q, k, v, bounds):
        out = flash(q, k, v, bounds, None, None)
        if out is None:
            raise RuntimeError("varlen flash attention is not available here")
        return out

    masks: dict = {}

    def masked(q, k, v, bounds):
        key = tuple(bounds.tolist())
        if key not in masks:
            masks.clear()
            seg = torch.repeat_interleave(torch.arange(len(key) - 1), torch.diff(bounds.long()))
            pos = torch.arange(int(bounds[-1]))
            masks[key] = ((seg[:, None] == seg[None, :]) & (pos[:, None] >= pos[None, :])).to(q.device)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=masks[key], enable_gqa=True)

    ways = {"per row, default backends": lambda q, k, v, b: per_row(q, k, v, b),
            "per row, no cuDNN": lambda q, k, v, b: per_row(q, k, v, b, [SDPBackend.FLASH_ATTENTION,
                                                                          SDPBackend.EFFICIENT_ATTENTION,
                                                                          SDPBackend.MATH]),
            "varlen flash": varlen, "one masked sdpa": masked, "padded batch (peer)": None}

    def packed_inputs(lengths):
        total = sum(lengths)
        q = torch.randn(1, HEADS, total, HEAD_DIM, device=device, dtype=dtype, requires_grad=True)
        k, v = (torch.randn(1, KV_HEADS, total, HEAD_DIM, device=device, dtype=dtype, requires_grad=True) for _ in "kv")
        bounds = torch.tensor([0] + list(__import__("itertools").accumulate(lengths)), dtype=torch.int32)
        return q, k, v, bounds

    def padded(lengths):
        width = max(lengths)
        q = torch.randn(len(lengths), HEADS, width, HEAD_DIM, device=device, dtype=dtype, requires_grad=True)
        k, v = (torch.randn(len(lengths), KV_HEADS, width, HEAD_DIM, device=device, dtype=dtype, requires_grad=True)
                for _ in "kv")
        mask = (torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]).to(device)
        full = mask[:, None, None, :] & torch.ones(width, width, dtype=torch.bool, device=device).tril()
        return q, k, v, full

    for name, fn in ways.items():
        try:
            times = []
            for i, lengths in enumerate(shapes):
                if fn is None:
                    q, k, v, full = padded(lengths)
                else:
                    q, k, v, bounds = packed_inputs(lengths)
                if cuda:
                    torch.cuda.synchronize()
                start = time.perf_counter()
                for _ in range(LAYERS):
                    out = (F.scaled_dot_product_attention(q, k, v, attn_mask=full, enable_gqa=True) if fn is None
                           else fn(q, k, v, bounds))
                    out.float().sum().backward()
                if cuda:
                    torch.cuda.synchronize()
                if i >= 2:  # two warm-up steps
                    times.append(time.perf_counter() - start)
            print(f"{name:28s} {sum(times) / len(times) * 1000:8.1f} ms per step ({LAYERS} layers, fwd+bwd)", flush=True)
        except RuntimeError as e:
            print(f"{name:28s} failed: {str(e).splitlines()[0][:100]}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
