"""What a model is made of, read from the meta device (exact shapes, no memory): the facts the counts and the memory
estimate need, and which linear layers a `targets` value selects."""
from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from app.methods.base import MethodError

ATTENTION_OUTPUTS = ("o_proj", "out_proj", "dense", "c_proj")  # linear layers that read the attention output


def target_names(targets: str) -> list[str]:
    """The module-name list a `targets` value stands for (attention / all-linear resolve against the model)."""
    if targets in ("attention", "all-linear"):
        return [targets]
    if not isinstance(targets, str):
        raise MethodError(f"targets={targets!r}: choose attention, all-linear or a comma list of module names")
    names = [t.strip() for t in targets.split(",") if t.strip()]
    if not names:
        raise MethodError(f"targets={targets!r}: name at least one module, or choose attention / all-linear")
    bad = [n for n in names if not re.fullmatch(r"[A-Za-z0-9_.]+", n)]
    if bad:
        raise MethodError(f"targets={targets!r}: {bad[0]!r} is not a module name (letters, digits, _ and . only)")
    return names


@dataclass(frozen=True)
class LinearInfo:
    name: str  # module path, e.g. "model.layers.3.self_attn.q_proj"
    in_features: int
    out_features: int
    layer: int | None  # decoder layer index; None outside the layer stack (e.g. lm_head)


@dataclass(frozen=True)
class Inventory:
    """Everything the counts and the memory estimate need to know about an architecture."""
    model_type: str
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    total: int  # parameters, tied weights counted once
    embed_params: int
    tied_embeddings: bool  # the output layer reuses the input embedding matrix
    linears: tuple[LinearInfo, ...]
    output_name: str  # the lm_head path: never quantized, left out of "all-linear"
    norms: tuple[tuple[str, int], ...]  # (module path, parameter count) of every norm layer
    layer_params: tuple[int, ...]  # parameters of each decoder layer
    bias_params: int  # parameters named *.bias (what BitFit trains)
    norms_per_layer: int
    prefix_width: int  # per-layer width of prefix tuning's keys (peft: kv heads x head dim with GQA)
    final_softcap: bool  # logits go through tanh soft-capping (Gemma 2)
    checkpoint_dtype_bytes: int  # bytes per weight in the saved checkpoint (config's dtype; bf16 when unsaid)
    gated_mlp: bool  # gate and up projections (SwiGLU/GeGLU) rather than one up projection
    norm_readers: int  # linear layers per decoder layer that read a norm's output (q, k, v, gate, up)

    @property
    def q_dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    @property
    def layer_linears(self) -> tuple[LinearInfo, ...]:
        return tuple(l for l in self.linears if l.name != self.output_name)


def decoder_layers(model) -> tuple[str, Any]:
    """(path, ModuleList) of the decoder layer stack: the ModuleList as long as the config's layer count."""
    import torch.nn as nn

    from app.models import text_config

    n = text_config(model.config).num_hidden_layers
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == n:
            return name, module
    raise MethodError(f"could not find the {n} decoder layers of this {model.config.model_type} model")


def _layer_of(name: str, prefix: str) -> int | None:
    if not name.startswith(prefix + "."):
        return None
    return int(name[len(prefix) + 1:].split(".", 1)[0])


def linear_modules(model) -> tuple[LinearInfo, ...]:
    """Every linear layer (4/8-bit ones included: they subclass nn.Linear) with its shape and layer index."""
    import torch.nn as nn

    prefix, _ = decoder_layers(model)
    found = []
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear):
            found.append(LinearInfo(name, m.in_features, m.out_features, _layer_of(name, prefix)))
    return tuple(found)


def build_inventory(config) -> Inventory:
    """The inventory of `config`'s architecture, built on the meta device (no weights, well under a second)."""
    from app.models import meta_model, text_config

    model = meta_model(config)
    tc = text_config(config)
    prefix, layers = decoder_layers(model)
    output = model.get_output_embeddings()
    norms = tuple(
        (n, sum(p.numel() for p in m.parameters(recurse=False)))
        for n, m in model.named_modules()
        if "norm" in type(m).__name__.lower() and any(True for _ in m.parameters(recurse=False))
    )
    heads = tc.num_attention_heads
    head_dim = getattr(tc, "head_dim", None) or tc.hidden_size // heads
    has_kv = getattr(tc, "num_key_value_heads", None) is not None
    kv_heads = tc.num_key_value_heads if has_kv else heads
    layer_norms = [n for n, _ in norms if _layer_of(n, prefix) == 0]
    intermediate = getattr(tc, "intermediate_size", None) or 4 * tc.hidden_size
    linears = linear_modules(model)
    return Inventory(
        model_type=tc.model_type,
        layers=len(layers),
        hidden=tc.hidden_size,
        heads=heads,
        kv_heads=kv_heads,
        head_dim=head_dim,
        intermediate=intermediate,
        vocab=tc.vocab_size,
        total=sum(p.numel() for p in model.parameters()),
        embed_params=model.get_input_embeddings().weight.numel(),
        tied_embeddings=output is not None and output.weight is model.get_input_embeddings().weight,
        linears=linears,
        output_name=output_name(model),
        norms=norms,
        layer_params=tuple(sum(p.numel() for p in layer.parameters()) for layer in layers),
        bias_params=sum(p.numel() for n, p in model.named_parameters() if n.endswith(".bias")),
        norms_per_layer=len(layer_norms),
        prefix_width=head_dim * kv_heads if has_kv else tc.hidden_size,
        final_softcap=bool(getattr(tc, "final_logit_softcapping", None)),
        checkpoint_dtype_bytes=4 if "float32" in str(getattr(config, "dtype", None) or "") else 2,
        gated_mlp=sum(1 for l in linears if l.layer == 0 and l.out_features == intermediate) >= 2,
        norm_readers=sum(1 for l in linears if l.layer == 0 and l.in_features == tc.hidden_size
                         and not l.name.endswith(ATTENTION_OUTPUTS)),
    )


@lru_cache(maxsize=32)
def cached_inventory(ref: str, models_dir: str) -> Inventory:
    """build_inventory for a model reference, memoised: the live estimate asks again on every slider move."""
    from app.models import cached_config

    return build_inventory(cached_config(ref, models_dir))


def matches(name: str, key: str) -> bool:
    """peft's rule: a target key matches a module whose path is the key or ends with '.key'."""
    return name == key or name.endswith("." + key)


def resolve_targets(linears: tuple[LinearInfo, ...], output_name: str, targets: str) -> list[LinearInfo]:
    """The linear layers a `targets` value selects, with the same matching rule peft applies."""
    names = target_names(targets)
    inside = [l for l in linears if l.name != output_name]
    if names == ["attention"]:
        chosen = [l for l in inside if l.layer is not None and re.search(r"attn|attention", l.name)]
        if not chosen:
            raise MethodError("targets='attention': this model has no layer named like attention; use all-linear")
        return chosen
    if names == ["all-linear"]:
        return inside
    chosen, known = [], sorted({l.name.rsplit(".", 1)[-1] for l in linears})
    for key in names:
        hits = [l for l in linears if matches(l.name, key)]
        if not hits:
            raise MethodError(f"targets={targets!r}: this model has no linear layer named {key!r}; it has {', '.join(known)}")
        chosen += [l for l in hits if l not in chosen]
    return chosen


def peft_target_list(chosen: list[LinearInfo]) -> list[str]:
    """Short names that select exactly `chosen` (so the count and peft agree on what is adapted)."""
    return sorted({l.name.rsplit(".", 1)[-1] for l in chosen})


def output_name(model) -> str:
    """The output layer's (lm_head's) module path in a loaded model."""
    output = model.get_output_embeddings()
    return next((n for n, m in model.named_modules() if m is output), "")
