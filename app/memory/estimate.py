"""The memory estimate: what a training run needs on a GPU and in CPU RAM, term by term, from the model's config alone.

Each term is one small function of the architecture inventory (app.methods.Inventory), the method's Footprint and
the PrecisionPlan (how app.training.worker carries out the chosen precision). A step peaks at one of two moments: the start of
backward (every activation and the loss's fp32 tensors alive, gradients not yet made) or the optimizer's update
(all gradients and the optimizer's working buffers, activations freed). The breakdown shows the larger moment, so its
terms add up to the total. The activation rules count what PyTorch keeps for backward in Hugging Face's Llama-style
decoder layers (tests check them against autograd's own saved tensors); other architectures get the same rules as an
approximation. The CPU figures are calibrated against peak RSS by bench/memory_calibration.py.

With several GPUs the GPU column is per GPU. Each GPU trains its share of every micro-batch's rows (app.training.worker.shard),
so its activations are those of ceil(batch / GPUs) rows. DDP keeps a full copy of the weights, gradients and optimizer
state on every GPU, plus the flat buffers the gradients are summed across GPUs in (app.training.dist); FSDP splits weights,
gradients and optimizer state between the GPUs and gathers the full weights of two decoder layers at a time (the one
computing and the one prefetched) and of the outer unit (embeddings, output layer). The CPU column stays one process.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any

from app import methods
from app.memory.device import DeviceInfo
from app.methods import DTYPE_BYTES, Dtypes, Footprint, Inventory, MethodError, PrecisionPlan
from app.objectives import get_objective
from app.spec import check_training_choice

GIB = 1024**3
MIB = 1024**2
ATTENTIONS = ("sdpa", "eager")
# Outside PyTorch's allocator: the CUDA context and the kernels torch loads (about 0.5 GiB with torch 2.x, CUDA 12).
CUDA_CONTEXT_BYTES = 512 * MIB
# The caching allocator rounds blocks and fragments as activations of many sizes come and go each step. 20%: fitted
# on an H100 (SmolLM2-360M; full, LoRA, QLoRA; 256 and 1024 tokens), where 8% left every cell 2-16% under the
# measured max_memory_reserved; with 20%, five of those six cells are within 5% (bench/RESULTS.md).
GPU_ALLOCATOR_SLACK = 0.20
# A Python process with torch, transformers and peft imported (0.39 GiB here), and while training, with the tokenizer,
# the data and the autograd engine warmed up.
CPU_IMPORTS_BYTES = 400 * MIB
CPU_PROCESS_BYTES = 500 * MIB
# glibc does not give back the heap that the forward pass's short-lived tensors fragment: peak RSS grows by about this
# share of the activations (bench/memory_calibration.py: with MALLOC_MMAP_THRESHOLD_=65536 the growth vanishes, and
# steps run slower). Frozen layers free more in-between tensors than trained ones, which keep their inputs; and
# bitsandbytes expands every packed weight for each matmul.
CPU_HEAP_RETAINED = {"frozen": 0.9, "trained": 0.3, "quantized": 1.1}
# With gradient checkpointing each layer's recomputation in backward fragments the heap instead: about this share of
# the activations the run would keep without checkpointing (measured on SmolLM2-135M with LoRA).
CPU_HEAP_RETAINED_CHECKPOINTED = 0.6
NF4_BLOCK = 64  # weights per 4-bit block, each with one absmax scale
DOUBLE_QUANT_BLOCK = 256  # absmax scales per second-level block when they are themselves quantized to 8 bits
ADAM8_BLOCK = 256  # bitsandbytes' 8-bit optimizer states: one fp32 absmax per 256 values
MAX_GPUS = 1024
# DDP all-reduces the gradients in flat chunks of at most this many numbers. The worker's all-reduce
# (app.training.dist) reads it from here: one number for both, and the estimate never imports torch.
BUCKET_ELEMENTS = 32 * 1024 * 1024


class EstimateError(ValueError):
    """An estimate input that cannot work; the message names the field and the value."""


@dataclass(frozen=True)
class EstimateInputs:
    objective: str = "sft"  # what the run learns (app.objectives): some put more than one sequence per row through
    model: str = "embedded"  # any reference app.models.load_config takes ("embedded", a folder, a hub id, "config:NAME")
    method: str = "lora"
    method_args: dict[str, Any] = field(default_factory=dict)
    batch_size: int = 4
    seq_len: int = 256  # the cutoff length: the estimate assumes every row fills it (the worst step)
    precision: str = "auto"
    optimizer: str = "adamw"
    grad_checkpointing: bool = False
    grad_accum: int = 1  # above 1, the gradients of earlier micro-batches stay beside the activations
    attention: str = "sdpa"  # eager keeps the batch x heads x seq^2 attention matrix for backward
    models_dir: str = ""  # where the embedded model and local models live
    gpus: int = 1  # above 1, the GPU figure is per GPU of a data-parallel run
    strategy: str = "ddp"  # with gpus > 1: ddp (a full copy per GPU) or fsdp (weights, gradients, optimizer sharded)

    def validate(self) -> None:
        def bad(name: str, why: str) -> EstimateError:
            return EstimateError(f"{name}={getattr(self, name)!r}: {why}")

        for name, top in (("batch_size", 4096), ("seq_len", 1 << 20), ("grad_accum", 1 << 16), ("gpus", MAX_GPUS)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= top:
                raise bad(name, f"must be a whole number from 1 to {top}")
        if self.attention not in ATTENTIONS:
            raise bad("attention", f"choose one of {', '.join(ATTENTIONS)}")
        check_training_choice(self, EstimateError)  # as a RunConfig checks them; a bad method setting: MethodError


@dataclass(frozen=True)
class Term:
    key: str
    label: str
    bytes: int
    note: str  # how it was computed, in words


@dataclass(frozen=True)
class Breakdown:
    device: str  # cuda | cpu
    precision: str  # the resolved plan: fp32 | bf16 | fp16 | bf16-mixed
    terms: tuple[Term, ...]
    peak: str  # when the peak comes: "backward" (activations alive), "update" (the optimizer's step), or "loading"
    gpus: int = 1  # above 1: the figure is per GPU of this many
    strategy: str = ""  # ddp | fsdp when gpus > 1

    @property
    def total_bytes(self) -> int:
        return sum(t.bytes for t in self.terms)

    def term(self, key: str) -> int:
        return next((t.bytes for t in self.terms if t.key == key), 0)

    def to_dict(self) -> dict:
        return {"device": self.device, "precision": self.precision, "total_bytes": self.total_bytes,
                "peak": self.peak, "gpus": self.gpus, "strategy": self.strategy,
                "terms": {t.key: t.bytes for t in self.terms}}

    @property
    def title(self) -> str:
        """The column's name: "GPU", or "per GPU of 4 (FSDP)"."""
        if self.device != "cuda":
            return "CPU RAM"
        return f"per GPU of {self.gpus} ({self.strategy.upper()})" if self.gpus > 1 else "GPU"


@dataclass(frozen=True)
class MemoryEstimate:
    inputs: EstimateInputs
    trainable: int
    total_params: int
    gpu: Breakdown
    cpu: Breakdown
    notes: tuple[str, ...] = ()

    @property
    def total_bytes(self) -> int:
        """The GPU figure, context included: what must be free on the card."""
        return self.gpu.total_bytes

    @property
    def trainable_share(self) -> float:
        return self.trainable / self.total_params if self.total_params else 0.0

    def comparable_peak(self, device: str) -> int:
        """The figure to set beside a measured peak: CUDA max_memory_reserved (which leaves out the CUDA context),
        or the peak resident memory of a CPU training process."""
        if device == "cuda":
            return self.gpu.total_bytes - self.gpu.term("cuda_context")
        return self.cpu.total_bytes

    def to_dict(self) -> dict:
        inputs = {k: v for k, v in asdict(self.inputs).items() if k != "models_dir"}
        return {**inputs, "trainable": self.trainable, "total_params": self.total_params,
                "trainable_share": self.trainable_share, "total_bytes": self.total_bytes,
                "gpu": self.gpu.to_dict(), "cpu": self.cpu.to_dict(),
                "comparable_peak_bytes": {"cuda": self.comparable_peak("cuda"), "cpu": self.comparable_peak("cpu")},
                "notes": list(self.notes)}


# --- the terms ------------------------------------------------------------------------------------------------
def nf4_bytes(params: int, double_quant: bool) -> int:
    """4-bit NormalFloat: half a byte per weight, plus one absmax per 64-weight block: fp32 (0.5 bit per weight), or
    with double quantization 8-bit absmax plus one fp32 scale per 256 of them (about 0.127 bit per weight)."""
    blocks = -(-params // NF4_BLOCK)
    constants = blocks + 4 * -(-blocks // DOUBLE_QUANT_BLOCK) if double_quant else 4 * blocks
    return params // 2 + params % 2 + constants


def int8_bytes(params: int, rows: int) -> int:
    """LLM.int8: one byte per weight plus one fp32 scale per output row."""
    return params + 4 * rows


def _quantized(inv: Inventory, fp: Footprint) -> tuple[int, int]:
    """(weights, bytes) of the layers bitsandbytes packs: every linear layer but the output one."""
    if not fp.quant_bits:
        return 0, 0
    linears = inv.layer_linears
    params = sum(l.in_features * l.out_features for l in linears)
    if fp.quant_bits == 4:
        return params, nf4_bytes(params, fp.double_quant)
    return params, int8_bytes(params, sum(l.out_features for l in linears))


def master_weight_bytes(fp: Footprint, plan: PrecisionPlan) -> int:
    """Trained weights kept in fp32 while the matmuls compute in half precision (autocast): adapters always,
    the model's own weights when they are loaded in fp32 (bf16-mixed, and trained base weights under fp16)."""
    if not plan.autocast_dtype:
        return 0
    return fp.added * 4 + (fp.base_trainable * 4 if plan.load_dtype == "float32" else 0)


def half_stored_params(inv: Inventory, fp: Footprint, plan: PrecisionPlan) -> int:
    """Frozen linear weights an adapter method stores in the half compute dtype under mixed precision rather than
    in fp32 (app.training.loading.store_frozen_linears_in): every linear but packed ones, a tied output layer and those
    the method's layers read as matrices."""
    if not plan.autocast_dtype or plan.load_dtype != "float32" or fp.base_trainable:
        return 0
    quant_params, _ = _quantized(inv, fp)
    linears = sum(l.in_features * l.out_features for l in inv.linears
                  if not (inv.tied_embeddings and l.name == inv.output_name))
    return linears - quant_params - fp.base_read_params


def weight_bytes(inv: Inventory, fp: Footprint, plan: PrecisionPlan) -> tuple[int, str]:
    """The weights in memory, less the fp32 masters (their own term): the rest in the load dtype (frozen linears of
    an adapter method in the compute dtype: half_stored_params) or packed into 4/8 bits, plus the half copies
    autocast makes of the fp32 weights left in the matmuls (kept for backward, so all at once)."""
    load = DTYPE_BYTES[plan.load_dtype]
    quant_params, quant_bytes = _quantized(inv, fp)
    halved = half_stored_params(inv, fp, plan)
    half = DTYPE_BYTES[plan.autocast_dtype] if plan.autocast_dtype else load
    stored = (inv.total - quant_params - halved) * load + halved * half + quant_bytes + fp.added * 4
    copies = 0
    if plan.autocast_dtype:
        in_matmuls = sum(l.in_features * l.out_features for l in inv.linears) - quant_params - halved
        copies = half * ((in_matmuls if load != half else 0) + fp.added)
    note = f"{count(inv.total - quant_params - halved)} × {load} B"
    if halved:
        note += f" + {count(halved)} frozen linear weights × {half} B"
    if quant_params:
        note += f" + {count(quant_params)} packed in {fp.quant_bits} bits ({8 * quant_bytes / quant_params:.2f} bits each)"
    if copies:
        note += " + half-precision copies for the matmuls"
    return stored + copies - master_weight_bytes(fp, plan), note


def gradient_bytes(fp: Footprint, plan: PrecisionPlan) -> int:
    """One gradient per trained weight, in that weight's dtype (fp32 for adapters)."""
    return fp.base_trainable * DTYPE_BYTES[plan.load_dtype] + fp.added * 4


def optimizer_bytes(fp: Footprint, plan: PrecisionPlan, optimizer: str) -> int:
    """AdamW keeps two moments per trained weight in its dtype; 8-bit AdamW one byte each plus block scales;
    SGD with momentum (the trainer uses 0.9) one buffer."""
    if optimizer == "sgd":
        return gradient_bytes(fp, plan)
    if optimizer == "adamw8bit":
        return 2 * (fp.trainable + 4 * -(-fp.trainable // ADAM8_BLOCK))
    return 2 * gradient_bytes(fp, plan)


def output_gradient_bytes(inv: Inventory, fp: Footprint, plan: PrecisionPlan) -> int:
    """Backward starts at the output layer: when it trains, its vocab x hidden gradient exists from the first moment."""
    return inv.vocab * inv.hidden * DTYPE_BYTES[plan.load_dtype] if fp.output_trains else 0


def update_temporary_bytes(inv: Inventory, fp: Footprint, plan: PrecisionPlan, optimizer: str, device: str) -> int:
    """What AdamW allocates while it updates: on CUDA the multi-tensor kernel makes one state-sized buffer for all
    weights at once; on CPU it updates weight by weight, with two buffers the size of the largest one."""
    if optimizer != "adamw":
        return 0
    if device == "cuda":
        return gradient_bytes(fp, plan)
    largest = max(inv.embed_params if fp.embeddings_train else 0,
                  inv.intermediate * inv.hidden if fp.layer_weights_train else 0)
    size = DTYPE_BYTES[plan.load_dtype] if fp.base_trainable else 4
    return 2 * size * min(largest, fp.trainable)


def loading_bytes(inv: Inventory, fp: Footprint, plan: PrecisionPlan) -> int:
    """Peak RAM while from_pretrained reads the checkpoint: the finished weights plus the memory-mapped file, whose
    pages stay resident when every tensor is converted (another dtype, or packed into 4/8 bits). A file already in the
    load dtype is used in place, so it counts once, as the weights."""
    quant_params, quant_bytes = _quantized(inv, fp)
    weights = (inv.total - quant_params) * DTYPE_BYTES[plan.load_dtype] + quant_bytes
    converted = fp.quant_bits or inv.checkpoint_dtype_bytes != DTYPE_BYTES[plan.load_dtype]
    return CPU_IMPORTS_BYTES + weights + (inv.total * inv.checkpoint_dtype_bytes if converted else 0)


def dequantized_weight_bytes(inv: Inventory, fp: Footprint, dt: Dtypes) -> int:
    """bitsandbytes expands one packed weight matrix at a time to the compute dtype for its matmul."""
    if not fp.quant_bits:
        return 0
    return max(l.in_features * l.out_features for l in inv.layer_linears) * dt.compute


def layer_activation_bytes(inv: Inventory, fp: Footprint, dt: Dtypes, residual: int, attention: str, seq_kv: int,
                           repeat_kv: bool) -> int:
    """Per token: what one decoder layer keeps for backward.

    Norms keep an fp32 copy of their input, plus the normalised input when their scale trains. Attention keeps q and
    k after rotary embedding, v, its output and the softmax statistics (sdpa), or, eager, q, k and v expanded to all
    heads and the seq_kv-long attention probabilities (in fp32 too when computing in half). A gated MLP keeps the
    gate, its activation and the up projection. Linear layers whose weights train also keep their inputs.
    Batches of more than one row are assumed padded: sdpa then gets (and keeps) a mask, and k, v for every head.
    """
    h, i, e, q = inv.hidden, inv.intermediate, dt.compute, inv.q_dim
    norms = inv.norms_per_layer * (4 * h + (residual * h if fp.norms_train else 0) + 4)
    # q/k/v read one tensor and gate/up another, unless autocast casts an fp32 norm output once per reader
    per_reader = dt.autocast and residual == 4
    inputs = (inv.norm_readers if per_reader else 2) * e * h if fp.layer_weights_train else 0
    if attention == "eager":
        attn = 3 * e * q + e * inv.heads * seq_kv + (4 * inv.heads * seq_kv if e != 4 else 0)
        attn += e * q if fp.layer_weights_train else 0  # o_proj's input is a fresh contiguous copy
    else:
        kv = q if repeat_kv else inv.kv_dim  # a padding mask makes transformers expand k and v to every head
        attn = e * (2 * q + 2 * kv) + 4 * inv.heads + (e * seq_kv if repeat_kv else 0)  # + the mask itself
    mlp = (3 if inv.gated_mlp else 1) * e * i + (e * i if fp.layer_weights_train else 0)
    return norms + inputs + attn + mlp


def activation_bytes(inv: Inventory, fp: Footprint, plan: PrecisionPlan, batch: int, seq: int, attention: str,
                     grad_checkpointing: bool, device: str = "cuda") -> int:
    """Everything kept for backward except the loss's log-probabilities (see logits_bytes).

    Only the top `grad_layers` layers keep anything (freeze tuning); with gradient checkpointing each of them keeps its
    input only, and one layer at a time is recomputed in full during backward. Rotary tables, token ids and labels,
    the final norm and (if it trains) the output layer's input come on top.
    """
    dt = Dtypes.of(plan, device)
    residual = DTYPE_BYTES[plan.load_dtype]  # the embeddings' dtype carries through the residual stream
    seq_eff = seq + fp.extra_tokens
    tokens = batch * seq_eff
    base = layer_activation_bytes(inv, fp, dt, residual, attention, seq_eff + fp.extra_kv_tokens, batch > 1)
    if grad_checkpointing:
        layers = fp.grad_layers * residual * inv.hidden + base + fp.extra_layer_bytes
    else:
        layers = fp.grad_layers * base + inv.layers * fp.extra_layer_bytes
    if not fp.first_input_grad:
        layers -= 4 * inv.hidden  # the first kept layer's norm needs no copy of an input without gradient
    layers -= fp.first_layer_saving
    outside = 2 * inv.head_dim * residual + 16  # rotary cos/sin, token ids and labels (int64)
    outside += 4 * inv.hidden + 4 + (residual * inv.hidden if fp.final_norm_trains else 0)  # final norm
    outside += dt.compute * inv.hidden if fp.output_trains else 0
    prefix_kv = 2 * fp.extra_kv_tokens * (inv.q_dim if batch > 1 else inv.kv_dim) * dt.compute * fp.grad_layers
    return tokens * layers + tokens * outside + batch * prefix_kv + fp.extra_step_bytes


def logits_bytes(inv: Inventory, fp: Footprint, plan: PrecisionPlan, batch: int, seq: int) -> int:
    """The loss over the vocabulary at its peak: in forward the logits, their fp32 copy and the fp32 log-softmax kept
    for backward; at the start of backward that log-softmax and the two fp32 gradients made from it (the logits
    themselves are gone once the training loop drops the model's output). Gemma 2's soft-cap keeps one more copy."""
    n = batch * (seq + fp.extra_tokens) * inv.vocab
    e = Dtypes.of(plan).compute
    forward = e + (4 if e != 4 else 0) + 4
    return n * (max(forward, 12) + (e if inv.final_softcap else 0))


def saved_for_backward_bytes(inv: Inventory, fp: Footprint, plan: PrecisionPlan, batch: int, seq: int,
                             attention: str = "sdpa", grad_checkpointing: bool = False, device: str = "cuda") -> int:
    """What autograd holds at the end of the forward pass: the activations plus the fp32 log-probabilities."""
    n = batch * (seq + fp.extra_tokens) * inv.vocab
    return activation_bytes(inv, fp, plan, batch, seq, attention, grad_checkpointing, device) + 4 * n


def allreduce_bucket_bytes(fp: Footprint, plan: PrecisionPlan) -> int:
    """DDP: app.training.dist sums the gradients across GPUs in flat chunks of up to BUCKET_ELEMENTS numbers; the next chunk is
    concatenated while the previous one is still alive, so two at most (or all the gradients, when they are fewer)."""
    widest = 4 if fp.added else DTYPE_BYTES[plan.load_dtype]  # adapters' gradients are fp32
    return min(gradient_bytes(fp, plan), 2 * BUCKET_ELEMENTS * widest)


def gathered_bytes(inv: Inventory, plan: PrecisionPlan) -> int:
    """FSDP (app.training.dist shards each decoder layer, then the whole model): the full weights of the decoder layer
    computing and of the next one, prefetched, plus the outer unit (embeddings, output layer, final norm), which stays
    gathered from the start of forward to the end of backward."""
    outer = inv.total - sum(inv.layer_params)
    return (outer + 2 * max(inv.layer_params, default=0)) * DTYPE_BYTES[plan.load_dtype]


# --- the estimate ---------------------------------------------------------------------------------------------
def _breakdown(inv: Inventory, inputs: EstimateInputs, device: str) -> tuple[Breakdown, Footprint]:
    plan = methods.plan_for(inputs.method, inputs.precision, device)
    fp = methods.method_footprint(inv, inputs.method, inputs.method_args, plan, device)
    # several GPUs: the CPU column stays a one-process CPU run; each GPU trains its share of a micro-batch's rows
    gpus = inputs.gpus if device == "cuda" else 1
    shards = gpus if inputs.strategy == "fsdp" else 1
    split = lambda n: -(-n // shards)  # noqa: E731 - FSDP's share of a sharded state, rounded up
    by = f" ÷ {shards} GPUs" if shards > 1 else ""
    objective = get_objective(inputs.objective)
    # b: the sequences one GPU puts through the model per micro-batch (chosen and rejected are two per row)
    b, s = -(-inputs.batch_size // gpus) * objective.sequences_per_example, inputs.seq_len
    whole_weights, weights_note = weight_bytes(inv, fp, plan)
    weights, weights_note = split(whole_weights), weights_note + by
    grads = split(gradient_bytes(fp, plan))
    acts = activation_bytes(inv, fp, plan, b, s, inputs.attention, inputs.grad_checkpointing, device)
    logits = logits_bytes(inv, fp, plan, b, s)
    update = split(update_temporary_bytes(inv, fp, plan, inputs.optimizer, device))
    if shards > 1 and fp.quant_bits:
        raise EstimateError(f"strategy='fsdp': {methods.get_method(inputs.method).label} loads the base model in "
                            f"{fp.quant_bits} bits, which FSDP cannot split. Choose ddp (every GPU holds the small "
                            f"quantized model) or LoRA.")
    gathered = gathered_bytes(inv, plan) if shards > 1 else 0
    # Gradients are freed after each update (set_to_none), so at the start of backward only the output layer's exists,
    # unless earlier micro-batches of the step left theirs; by the update, activations and logits are gone.
    early = grads if inputs.grad_accum > 1 else split(output_gradient_bytes(inv, fp, plan))
    peak = "backward" if acts + logits + early + gathered >= grads + update else "update"
    rows = f"batch {b}" + (f" (its share of {inputs.batch_size} rows)" if gpus > 1 else "")
    shape = f"{fp.grad_layers} layers × {rows} × {s + fp.extra_tokens} tokens" + (
        ", checkpointed" if inputs.grad_checkpointing else "")
    if peak == "backward":
        at_peak = dict(gradients=early, activations=acts, logits=logits,
                       temporary=dequantized_weight_bytes(inv, fp, Dtypes.of(plan, device)), gathered=gathered)
        notes = dict(gradients=f"{gib(grads)} in all{by}, made during backward as activations are freed",
                     activations=shape, logits=f"batch × tokens × vocab {inv.vocab:,}, fp32 for the loss",
                     temporary="packed weights expanded for one matmul" if fp.quant_bits else "none at the peak")
    else:
        at_peak = dict(gradients=grads, activations=0, logits=0, temporary=update, gathered=0)
        notes = dict(gradients=f"{count(fp.trainable)} trained weights{by}",
                     activations=f"{gib(acts)} during backward ({shape}), freed before the update's peak",
                     logits=f"{gib(logits)} during backward, freed before the update's peak",
                     temporary=f"{inputs.optimizer}'s working buffers while it updates{by}")
    terms = [
        Term("weights", "Weights", weights, weights_note),
        Term("master_weights", "fp32 master weights", split(master_weight_bytes(fp, plan)),
             "trained weights kept in fp32 while computing in half precision" + by),
        Term("optimizer", "Optimizer state", split(optimizer_bytes(fp, plan, inputs.optimizer)), inputs.optimizer + by),
        Term("gradients", "Gradients", at_peak["gradients"], notes["gradients"]),
        Term("activations", "Activations", at_peak["activations"], notes["activations"]),
        Term("logits", "Logits and loss", at_peak["logits"], notes["logits"]),
        Term("temporary", "Temporary buffers", at_peak["temporary"], notes["temporary"]),
    ]
    if shards > 1:
        note = ("FSDP: the full weights of two decoder layers (the one computing and the next, prefetched) and of "
                "the embeddings and output layer")
        note += "" if peak == "backward" else f"; {gib(gathered)} during backward, not at the update's peak"
        terms.append(Term("gathered", "Gathered weights", at_peak["gathered"], note))
    elif gpus > 1:
        terms.append(Term("allreduce", "Gradient all-reduce", allreduce_bucket_bytes(fp, plan),
                          f"DDP: gradients summed across GPUs in chunks of up to {count(BUCKET_ELEMENTS)} numbers, "
                          "two at once"))
    for extra in objective.extra_memory(inv, Dtypes.of(plan, device), b, s):
        terms.append(Term(extra.key, extra.label, extra.bytes, extra.note))
        at_peak[extra.key] = extra.bytes
    dynamic = sum(at_peak.values())
    if device == "cuda":
        terms += [Term("allocator_slack", "Allocator slack", int(GPU_ALLOCATOR_SLACK * dynamic),
                       f"{GPU_ALLOCATOR_SLACK:.0%} of what changes each step"),
                  Term("cuda_context", "CUDA context", CUDA_CONTEXT_BYTES, "driver and kernels, outside the allocator")]
        if shards > 1:
            # the worker loads the whole model onto each GPU, then shards it: for a big model that is the peak
            extra = whole_weights + CUDA_CONTEXT_BYTES - sum(t.bytes for t in terms)
            terms.append(Term("loading", "Loading the checkpoint", max(0, extra),
                              f"FSDP: each GPU loads all {gib(whole_weights)} of weights before they are split"
                              + ("" if extra > 0 else ": not the peak here")))
            peak = "loading" if extra > 0 else peak
    else:
        terms += [cpu_heap_term(inv, fp, plan, inputs, at_peak["activations"]),
                  Term("process", "Python and libraries", CPU_PROCESS_BYTES, "torch, transformers, peft, tokenizer")]
        # a checkpoint stored in another dtype can need more RAM to load than the training steps need
        extra = loading_bytes(inv, fp, plan) - sum(t.bytes for t in terms)
        terms.append(Term("loading", "Loading the checkpoint", max(0, extra),
                          f"the {inv.checkpoint_dtype_bytes * 8}-bit file mapped while its weights are converted"
                          + ("" if extra > 0 else ": not the peak here")))
        peak = "loading" if extra > 0 else peak
    strategy = inputs.strategy if gpus > 1 else ""
    return Breakdown(device, plan.name, tuple(terms), peak, gpus, strategy), fp


def cpu_heap_term(inv: Inventory, fp: Footprint, plan: PrecisionPlan, inputs: EstimateInputs, acts: int) -> Term:
    """What glibc's heap keeps on top of the live tensors: a share of the activations at the peak (none when the peak
    is the optimizer's update), or with checkpointing, of the activations the run would keep without it."""
    if inputs.grad_checkpointing:
        without = activation_bytes(inv, fp, plan, inputs.batch_size, inputs.seq_len, inputs.attention, False, "cpu")
        share, base, what = CPU_HEAP_RETAINED_CHECKPOINTED, without if acts else 0, "of the unchecked activations"
    else:
        kind = "quantized" if fp.quant_bits else ("trained" if fp.layer_weights_train else "frozen")
        share, base, what = CPU_HEAP_RETAINED[kind], acts, "of the activations"
    return Term("allocator_slack", "Allocator slack", int(share * base),
                f"heap glibc keeps after short-lived tensors: {share:.0%} {what}")


def estimate_memory(inputs: EstimateInputs, inventory: Inventory | None = None) -> MemoryEstimate:
    """The GPU and CPU-RAM estimate for `inputs`; `inventory` skips loading the model's config (tests, benchmarks)."""
    inputs.validate()
    inv = inventory or methods.cached_inventory(inputs.model, inputs.models_dir)
    gpu, fp = _breakdown(inv, inputs, "cuda")
    cpu, _ = _breakdown(inv, inputs, "cpu")
    notes = []
    if not _llama_like(inv):
        notes.append(f"{inv.model_type}: activations use the Llama-style rules, so treat them as approximate")
    if inputs.attention == "eager":
        notes.append("eager attention keeps the full attention matrix: memory grows with the square of the length")
    if inputs.gpus > 1:
        notes.append(parallel_words(inputs) + " The CPU RAM column is for training on the CPU, in one process.")
    total = inv.total + fp.added
    return MemoryEstimate(inputs, fp.trainable, total, gpu, cpu, tuple(notes))


def parallel_words(inputs: EstimateInputs) -> str:
    """What the per-GPU figure of a multi-GPU run assumes, in plain words."""
    n, rows = inputs.gpus, -(-inputs.batch_size // inputs.gpus)
    share = f"trains {rows} of each batch's {inputs.batch_size} rows"
    if n == 1:
        return "One GPU: it holds everything."
    if inputs.strategy == "fsdp":
        return (f"Per GPU, with {n} GPUs under FSDP: the weights, gradients and optimizer state are split {n} ways; "
                f"each GPU gathers the full weights of two layers at a time and {share}.")
    return (f"Per GPU, with {n} GPUs under DDP: each GPU holds a full copy of the weights, gradients and optimizer "
            f"state, {share}, and sums the gradients with the others in chunks.")


def _llama_like(inv: Inventory) -> bool:
    names = {l.name.rsplit(".", 1)[-1] for l in inv.layer_linears}
    return {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"} <= names


def inputs_for_config(run_config, models_dir) -> EstimateInputs:
    """What the estimate of a RunConfig is computed from."""
    return EstimateInputs(
        model=run_config.model, method=run_config.method, method_args=dict(run_config.method_args),
        batch_size=int(run_config.batch_size), seq_len=int(run_config.cutoff_len), precision=run_config.precision,
        optimizer=run_config.optimizer, grad_checkpointing=bool(run_config.grad_checkpointing),
        grad_accum=int(run_config.grad_accum), models_dir=str(models_dir), gpus=int(run_config.gpus),
        strategy=run_config.strategy, objective=run_config.objective,
    )


def estimate_for_config(run_config, models_dir) -> MemoryEstimate:
    """The estimate for a RunConfig (what the Train tab records in each run)."""
    return estimate_memory(inputs_for_config(run_config, models_dir))


def carry_args(method: str, method_args: dict[str, Any]) -> dict[str, Any]:
    """The settings of `method_args` that `method` also has (r, targets ... carry over when switching method)."""
    known = set(methods.get_method(method).knobs())
    return {k: v for k, v in method_args.items() if k in known}


def every_method(inputs: EstimateInputs, inventory: Inventory | None = None) -> list[MemoryEstimate]:
    """The same model, batch and length under every method (shared settings such as r carry over)."""
    inv = inventory or methods.cached_inventory(inputs.model, inputs.models_dir)
    results = []
    for name in methods.METHODS:
        args = inputs.method_args if name == inputs.method else carry_args(name, inputs.method_args)
        try:
            results.append(estimate_memory(replace(inputs, method=name, method_args=args), inv))
        except MethodError:
            continue  # e.g. IA3 without default layers for this architecture, or too few layers to freeze
        except EstimateError:
            if name == inputs.method:
                raise
            continue  # a quantized base model under FSDP
    return results


# --- the verdict ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Verdict:
    fits: bool
    needed_bytes: int
    available_bytes: int
    text: str


def gib(n: int) -> str:
    return f"{n / GIB:.1f} GiB"


def count(n: int) -> str:
    """A parameter count in words: 8.03B, 134.5M, 16,384."""
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n:,}"


def verdict(estimate: MemoryEstimate, device: DeviceInfo, inventory: Inventory | None = None) -> Verdict:
    """Plain words: fits with X to spare, or needs X more and which changes would fit."""
    needed = estimate.gpu.total_bytes if device.kind == "cuda" else estimate.cpu.total_bytes
    where = f"on {device.name}" if device.kind == "cuda" else "in this machine's RAM (CPU training)"
    if needed <= device.free_bytes:
        return Verdict(True, needed, device.free_bytes, f"Fits {where} with {gib(device.free_bytes - needed)} to spare.")
    tips = suggestions(estimate, device, inventory)
    text = f"Needs {gib(needed - device.free_bytes)} more than is free {where} ({gib(device.free_bytes)} free)"
    text += f": try {_or_list(tips)}." if tips else "."
    return Verdict(False, needed, device.free_bytes, text)


def _or_list(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " or " + items[-1]


def suggestions(estimate: MemoryEstimate, device: DeviceInfo, inventory: Inventory | None = None) -> list[str]:
    """Single changes that would fit, in order of how much they save; else those that help most."""
    inputs = estimate.inputs
    inv = inventory or methods.cached_inventory(inputs.model, inputs.models_dir)
    options: list[tuple[str, EstimateInputs]] = []
    if not methods.method_footprint(inv, inputs.method, inputs.method_args, methods.plan_for(inputs.method, inputs.precision)).quant_bits:
        options.append(("QLoRA", replace(inputs, method="qlora", method_args=carry_args("qlora", inputs.method_args))))
    if inputs.batch_size > 1:
        options.append((f"batch {max(1, inputs.batch_size // 2)}", replace(inputs, batch_size=max(1, inputs.batch_size // 2))))
    if not inputs.grad_checkpointing:
        options.append(("gradient checkpointing", replace(inputs, grad_checkpointing=True)))
    if inputs.seq_len > 128:
        options.append((f"cutoff length {inputs.seq_len // 2}", replace(inputs, seq_len=inputs.seq_len // 2)))
    if inputs.gpus > 1 and inputs.strategy == "ddp":
        options.append((f"FSDP over the {inputs.gpus} GPUs", replace(inputs, strategy="fsdp")))
    current = estimate.gpu.total_bytes if device.kind == "cuda" else estimate.cpu.total_bytes
    scored = []
    for label, changed in options:
        other = estimate_memory(changed, inv)
        need = other.gpu.total_bytes if device.kind == "cuda" else other.cpu.total_bytes
        if need < current:
            scored.append((need > device.free_bytes, need, label))
    scored.sort()
    fitting = [label for over, _, label in scored if not over]
    return fitting or [label for _, _, label in scored[:3]]


def format_table(estimate: MemoryEstimate) -> str:
    """The estimate as a plain-text table (what `launch.py estimate` prints without --json)."""
    i = estimate.inputs
    args = ", ".join(f"{k}={v}" for k, v in i.method_args.items()) or "defaults"
    lines = [
        f"model      {i.model}",
        f"method     {methods.get_method(i.method).label} ({args})",
        f"run        batch {i.batch_size} × {i.seq_len} tokens, {i.optimizer}, attention {i.attention}"
        + (", gradient checkpointing" if i.grad_checkpointing else "")
        + (f", {i.gpus} GPUs ({i.strategy.upper()})" if i.gpus > 1 else ""),
        f"trainable  {estimate.trainable:,} of {estimate.total_params:,} parameters ({estimate.trainable_share:.3%})",
        "",
        f"{'':24}{estimate.gpu.title + ' (' + estimate.gpu.precision + ')':>28}{'CPU RAM (' + estimate.cpu.precision + ')':>22}",
    ]
    keys = list(dict.fromkeys(t.key for bd in (estimate.gpu, estimate.cpu) for t in bd.terms))
    for key in keys:
        label = next(t.label for bd in (estimate.gpu, estimate.cpu) for t in bd.terms if t.key == key)
        cells = [gib(bd.term(key)) if any(t.key == key for t in bd.terms) else "-" for bd in (estimate.gpu, estimate.cpu)]
        lines.append(f"{label:24}{cells[0]:>28}{cells[1]:>22}")
    lines.append(f"{'Total':24}{gib(estimate.gpu.total_bytes):>28}{gib(estimate.cpu.total_bytes):>22}")
    lines += [f"note: {n}" for n in estimate.notes]
    return "\n".join(lines)
