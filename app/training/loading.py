"""Loading a model for training: the dtype and quantization the memory estimate assumes, the run's method applied,
frozen linears stored in the compute dtype, and the CPU and grouped LoRA fast paths switched on."""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from app.methods import PrecisionPlan, get_method, plan_for, prepare_model
from app.spec import RunConfig


def load_for_training(folder: Path, config: RunConfig, *, total_steps: int | None = None, device: str | None = None,
                      half_frozen: bool = True) -> tuple[nn.Module, PrecisionPlan]:
    """Load a model folder the way the memory estimate assumes, apply the config's method; returns (model, plan).

    Reads the config's method and method_settings, precision and grad_checkpointing.
    half_frozen: under mixed precision, an adapter method's frozen linear weights are stored in the compute dtype
    (store_frozen_linears_in); the weights it saves are its own, so the base's stored dtype never reaches a file."""
    from app.models import load_causal_lm

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    plan = plan_for(config.method, config.precision, device, device != "cuda" or torch.cuda.is_bf16_supported())
    spec = get_method(config.method)
    kwargs = spec.load_kwargs(config.method_settings)
    quantized = kwargs.get("quantization_config") is not None
    if quantized and device == "cuda":
        # bitsandbytes quantizes while loading onto the GPU; .to() is refused after. The current device is this
        # process's GPU (app.training.dist sets it to LOCAL_RANK under a multi-GPU launch; 0 otherwise).
        kwargs["device_map"] = {"": torch.cuda.current_device()}
    model = load_causal_lm(Path(folder), dtype=getattr(torch, plan.load_dtype), **kwargs)
    half = half_frozen and spec.saves_adapter and plan.autocast_dtype is not None and plan.load_dtype == "float32"
    if not quantized and device != "cpu" and not half:
        model.to(device)
    if config.grad_checkpointing:  # non-reentrant: frozen inputs need no enable_input_require_grads
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = prepare_model(model, config.method, config.method_settings, total_steps=total_steps)
    if half:  # converted where it was loaded, before the move: the GPU never holds the fp32 copies
        store_frozen_linears_in(model, getattr(torch, plan.autocast_dtype))
        if not quantized and device != "cpu":
            model.to(device)
    if device == "cpu":  # same math, cheaper dropout masks and rank-r products (app.training.fast_lora)
        from app.training.fast_lora import speed_up_lora

        speed_up_lora(model)
    if plan.autocast_dtype:  # LoRA layers sharing an input computed together, with fewer operations
        from app.training.lora_groups import group_lora_layers

        group_lora_layers(model, getattr(torch, plan.autocast_dtype))
    return model, plan


def store_frozen_linears_in(model, dtype) -> int:
    """Under mixed precision (fp32 weights, half-precision compute), autocast casts a frozen fp32 linear weight to
    `dtype` in every forward and keeps that copy for backward. Such a weight is only ever read by those matmuls, so
    storing it in `dtype` once gives the same products bit for bit, one copy in memory instead of two, and no cast
    per step. Left in fp32: trained weights, the weights of adapter layers that read the base weight as a matrix
    (DoRA's column norms) or do anything but add to its output, and an output layer tied to the input embedding
    (the lookup is not a matmul: its fp32 rows carry the residual stream). Returns how many parameters changed."""
    from peft.tuners.ia3.layer import IA3Layer
    from peft.tuners.lora.layer import LoraLayer
    from peft.tuners.tuners_utils import BaseTunerLayer

    def reads_base_only_by_matmul(layer) -> bool:
        if isinstance(layer, LoraLayer):
            return not getattr(layer, "lora_variant", {}) and not any(getattr(layer, "use_dora", {}).values())
        return isinstance(layer, IA3Layer)

    embedding = model.get_input_embeddings().weight
    skip = {id(layer.get_base_layer()) for layer in model.modules()
            if isinstance(layer, BaseTunerLayer) and not reads_base_only_by_matmul(layer)}
    changed = 0
    for module in model.modules():
        w = getattr(module, "weight", None)
        if (type(module) is not nn.Linear or id(module) in skip or w is None or w.requires_grad
                or w.dtype != torch.float32 or w is embedding):
            continue
        w.data = w.data.to(dtype)  # the same Parameter object: nothing that holds it is left pointing at fp32
        changed += w.numel()
    return changed
