"""How a RunConfig.precision value is carried out: the dtype weights are loaded in, the autocast dtype, and the byte
sizes the memory estimate's rules read from them."""
from __future__ import annotations

from dataclasses import dataclass

from app.methods.base import MethodError

DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass(frozen=True)
class PrecisionPlan:
    """How a RunConfig.precision value is carried out (app.training.loading loads by it); the estimate assumes it."""
    name: str  # fp32 | bf16 | fp16 | bf16-mixed (auto resolved)
    load_dtype: str  # torch dtype name the model's own weights are loaded and trained in
    autocast_dtype: str | None  # compute dtype under torch.autocast; None = no autocast

    @property
    def compute_dtype(self) -> str:
        return self.autocast_dtype or self.load_dtype


def precision_plan(precision: str, device: str = "cpu", bf16_supported: bool = True,
                   trains_base: bool = False) -> PrecisionPlan:
    """auto: bf16 on a GPU that has it, else fp32.

    bf16: weights in bf16, computing under bf16 autocast. bf16-mixed: weights in fp32 (the master copy) computing under
    bf16 autocast; an adapter method's frozen linears are then stored in bf16 (store_frozen_linears_in). fp16: fp16
    autocast, with trained base weights (trains_base: full, freeze, BitFit) in fp32 and a frozen base in fp16.
    Adapters a method adds (LoRA, prompts, ...) are fp32 in every plan, as peft keeps them.
    """
    if precision == "auto":
        precision = "bf16" if device == "cuda" and bf16_supported else "fp32"
    if precision == "fp32":
        return PrecisionPlan("fp32", "float32", None)
    if precision == "bf16":
        return PrecisionPlan("bf16", "bfloat16", "bfloat16")
    if precision == "bf16-mixed":
        return PrecisionPlan("bf16-mixed", "float32", "bfloat16")
    if precision == "fp16":
        return PrecisionPlan("fp16", "float32" if trains_base else "float16", "float16")
    raise MethodError(f"precision={precision!r}: choose one of auto, fp32, bf16, fp16, bf16-mixed")


@dataclass(frozen=True)
class Dtypes:
    """Byte sizes the activation rules need, from a PrecisionPlan and the device."""
    compute: int
    load: int
    autocast: bool
    mask: int  # a dropout mask per element: CUDA's fused dropout keeps bytes, CPU multiplies by an fp32 mask

    @classmethod
    def of(cls, plan: PrecisionPlan, device: str = "cuda") -> "Dtypes":
        return cls(DTYPE_BYTES[plan.compute_dtype], DTYPE_BYTES[plan.load_dtype], plan.autocast_dtype is not None,
                   1 if device == "cuda" else 4)
