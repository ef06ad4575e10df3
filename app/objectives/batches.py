"""What the model reads in one micro-batch: tokenized examples packed into one padding-free sequence, the shape
every objective's loss starts from (supervised rows now; chosen and rejected answers, sampled answers next)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from app.data.template import IGNORE_INDEX


@dataclass
class Example:
    input_ids: list[int]
    targets: list[int]  # next-token label per position (IGNORE_INDEX where no loss is taken)

    @property
    def n_targets(self) -> int:
        return sum(t != IGNORE_INDEX for t in self.targets)


@dataclass
class Batch:
    """Several rows packed into one sequence of real tokens: (1, n_tokens), no padding."""
    input_ids: torch.Tensor
    position_ids: torch.Tensor
    keep: torch.Tensor  # positions that carry a label
    kept_targets: torch.Tensor  # the labels at those positions
    cu_seqlens: torch.Tensor  # row boundaries (int32, on the CPU: the attention slices by them)
    max_len: int
    n_tokens: int
    n_targets: int
    examples: list[Example]


def pack(examples: list[Example]) -> Batch:
    ids, pos, targets, bounds = [], [], [], [0]
    for ex in examples:
        ids += ex.input_ids
        pos += range(len(ex.input_ids))
        targets += ex.targets
        bounds.append(len(ids))
    targets_t = torch.tensor(targets)
    keep = (targets_t != IGNORE_INDEX).nonzero().squeeze(1)
    return Batch(
        input_ids=torch.tensor([ids]), position_ids=torch.tensor([pos]), keep=keep, kept_targets=targets_t[keep],
        cu_seqlens=torch.tensor(bounds, dtype=torch.int32), max_len=max(len(e.input_ids) for e in examples),
        n_tokens=len(ids), n_targets=int(keep.numel()), examples=examples,
    )
