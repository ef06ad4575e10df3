"""The memory estimate: each term against hand-computed values, the activation rules against what autograd really
keeps on a tiny model, the verdict in words, bad inputs, the CLI and the Method tab's handler."""
from __future__ import annotations

import contextlib
import json
import time
from dataclasses import replace

import pytest
import torch

import launch
from app.memory import estimate as memory
from app.memory import device as devices
from app.memory import figures
from app import methods
from app.training.lora_groups import group_lora_layers
from app.memory.estimate import EstimateError, EstimateInputs, estimate_memory
from app.methods import Footprint, MethodError, plan_for, precision_plan
from app.models import ModelError, load_config
from app.spec import RunConfig

GIB = 1024**3




pytestmark = pytest.mark.usefixtures("one_thread")

@pytest.fixture(scope="module")
def llama8b(models_dir):
    return methods.build_inventory(load_config("config:llama-3.1-8b", models_dir))


def footprint(**changes) -> Footprint:
    base = dict(trainable=1000, added=0, base_trainable=1000, grad_layers=2, layer_weights_train=True, norms_train=True,
                final_norm_trains=True, output_trains=True, embeddings_train=True)
    return Footprint(**{**base, **changes})


# --- the terms, against hand-computed values ---------------------------------------------------------------------
@pytest.mark.parametrize("params,double_quant,expected", [
    (64, False, 32 + 4),  # 64 weights: 32 bytes of nibbles + one fp32 absmax
    (64, True, 32 + 1 + 4),  # the absmax in 8 bits, plus one fp32 scale for its block of 256
    (64 * 256, False, 8192 + 256 * 4),
    (64 * 256, True, 8192 + 256 + 4),
    (65, False, 33 + 8),  # a partial block still has its constant
])
def test_nf4_bytes(params, double_quant, expected):
    assert memory.nf4_bytes(params, double_quant) == expected


@pytest.mark.parametrize("double_quant,bits_per_weight", [(False, 4.5), (True, 4.127)])
def test_nf4_costs_the_published_bits_per_weight(double_quant, bits_per_weight):
    n = 10**9
    assert 8 * memory.nf4_bytes(n, double_quant) / n == pytest.approx(bits_per_weight, abs=0.001)


def test_int8_bytes_are_one_per_weight_plus_a_scale_per_row():
    assert memory.int8_bytes(1000, 10) == 1040


@pytest.mark.parametrize("precision,trains_base,grads,adam,sgd,master", [
    ("fp32", True, 4, 8, 4, 0),
    ("bf16", True, 2, 4, 2, 0),  # pure bf16: gradients and moments in bf16 too
    ("bf16-mixed", True, 4, 8, 4, 4),  # fp32 master weights while computing in bf16
    ("fp16", True, 4, 8, 4, 4),
    ("fp16", False, 2, 4, 2, 0),  # a frozen base in fp16 ... whose own weights here train in fp16
])
def test_bytes_per_trained_weight(precision, trains_base, grads, adam, sgd, master):
    plan = precision_plan(precision, "cuda", trains_base=trains_base)
    fp = footprint()
    assert memory.gradient_bytes(fp, plan) == grads * 1000
    assert memory.optimizer_bytes(fp, plan, "adamw") == adam * 1000
    assert memory.optimizer_bytes(fp, plan, "sgd") == sgd * 1000
    assert memory.master_weight_bytes(fp, plan) == master * 1000


def test_adapters_stay_fp32_whatever_the_precision():
    fp = footprint(added=500, base_trainable=0, trainable=500)
    for precision in ("fp32", "bf16", "bf16-mixed"):
        plan = precision_plan(precision, "cuda")
        assert memory.gradient_bytes(fp, plan) == 4 * 500
        assert memory.optimizer_bytes(fp, plan, "adamw") == 8 * 500


def test_8bit_adam_keeps_about_two_bytes_per_weight():
    fp = footprint(trainable=256 * 1000)
    assert memory.optimizer_bytes(fp, precision_plan("fp32"), "adamw8bit") == 2 * (256_000 + 4 * 1000)


@pytest.mark.parametrize("precision,device,name", [
    ("auto", "cuda", "bf16"), ("auto", "cpu", "fp32"), ("bf16-mixed", "cuda", "bf16-mixed"), ("fp32", "cuda", "fp32"),
])
def test_auto_precision_follows_the_device(precision, device, name):
    assert precision_plan(precision, device).name == name


@pytest.mark.parametrize("method,precision,bytes_per_param", [
    ("full", "fp32", 4), ("full", "bf16", 2), ("lora", "bf16", 2), ("lora", "fp32", 4),
])
def test_weights_of_an_unquantized_8b_model(llama8b, method, precision, bytes_per_param):
    plan = plan_for(method, precision, "cuda")
    fp = methods.method_footprint(llama8b, method, {}, plan)
    weights, _ = memory.weight_bytes(llama8b, fp, plan)
    # fp32 adapters, and under autocast their bf16 copies (the fp32 ones count as master weights there)
    adapters = fp.added * (4 + (2 if plan.autocast_dtype else 0)) - memory.master_weight_bytes(fp, plan)
    assert weights - adapters == bytes_per_param * llama8b.total


def test_mixed_precision_full_fine_tuning_of_8b(llama8b):
    """fp32 master weights (4 B), bf16 copies of every matmul weight (2 B), gradients (4 B), Adam (8 B)."""
    plan = plan_for("full", "bf16-mixed", "cuda")
    fp = methods.method_footprint(llama8b, "full", {}, plan)
    linear = sum(l.in_features * l.out_features for l in llama8b.linears)
    weights, _ = memory.weight_bytes(llama8b, fp, plan)
    assert memory.master_weight_bytes(fp, plan) == 4 * llama8b.total
    assert weights == 2 * linear
    assert memory.optimizer_bytes(fp, plan, "adamw") == 8 * llama8b.total


@pytest.mark.parametrize("method_args,fp32_linears", [
    ({}, 0),
    ({"targets": "all-linear", "dora": True}, "layers"),  # DoRA reads its targets' weights: fp32, copied for matmuls
])
def test_mixed_precision_lora_of_8b_stores_frozen_linears_in_bf16(llama8b, method_args, fp32_linears):
    """bf16-mixed LoRA: the frozen linears in bf16 (2 B, no copy per step), embeddings and norms in fp32 (4 B)."""
    plan = plan_for("lora", "bf16-mixed", "cuda")
    fp = methods.method_footprint(llama8b, "lora", method_args, plan)
    linear = sum(l.in_features * l.out_features for l in llama8b.linears)
    kept = sum(l.in_features * l.out_features for l in llama8b.layer_linears) if fp32_linears else 0
    weights, note = memory.weight_bytes(llama8b, fp, plan)
    adapters = fp.added * (4 + 2) - memory.master_weight_bytes(fp, plan)
    assert weights - adapters == 2 * (linear - kept) + 4 * (llama8b.total - linear + kept) + 2 * kept
    assert "frozen linear weights × 2 B" in note
    bf16 = memory.weight_bytes(llama8b, fp, plan_for("lora", "bf16", "cuda"))[0]
    # only what stays fp32 costs more than bf16: 2 B more, and 4 B more for a weight that also needs its bf16 copy
    assert weights - bf16 == 2 * (llama8b.total - linear) + 4 * kept


def test_qlora_packs_the_layers_and_keeps_embeddings_and_head(llama8b):
    plan = plan_for("qlora", "bf16", "cuda")
    fp = methods.method_footprint(llama8b, "qlora", {"double_quant": True}, plan)
    packed = sum(l.in_features * l.out_features for l in llama8b.layer_linears)
    rest = llama8b.total - packed  # embeddings, lm_head, norms: bf16
    weights, note = memory.weight_bytes(llama8b, fp, plan)
    adapters = fp.added * (4 + 2) - memory.master_weight_bytes(fp, plan)
    assert weights - adapters == memory.nf4_bytes(packed, True) + 2 * rest
    assert "4 bits" in note
    eight = methods.method_footprint(llama8b, "qlora", {"bits": 8}, plan)
    assert memory.weight_bytes(llama8b, eight, plan)[0] > weights


@pytest.mark.parametrize("model,precision,bytes_per_logit", [
    ("config:llama-3.1-8b", "fp32", 12), ("config:llama-3.1-8b", "bf16", 12), ("config:gemma-2-2b", "bf16", 14),
])
def test_logits_cost_the_vocabulary_times_tokens(model, precision, bytes_per_logit, models_dir):
    """fp32 log-probabilities kept for backward and the two fp32 gradients made from them (12 bytes a logit); Gemma 2's
    soft-cap keeps one more bf16 copy."""
    inv = methods.build_inventory(load_config(model, models_dir))
    plan = plan_for("lora", precision, "cuda")
    fp = methods.method_footprint(inv, "lora", {}, plan)
    assert memory.logits_bytes(inv, fp, plan, 2, 100) == bytes_per_logit * 2 * 100 * inv.vocab


@pytest.mark.parametrize("checkpoint_bytes,precision,method,file_counted", [
    (2, "fp32", "lora", True),  # a bf16 file converted to fp32: file pages and weights together
    (4, "fp32", "lora", False),  # an fp32 file loaded as fp32 is used in place
    (2, "bf16", "lora", False),
    (2, "fp32", "qlora", True),  # every tensor is read and packed
])
def test_loading_counts_the_file_only_when_it_is_converted(llama8b, checkpoint_bytes, precision, method, file_counted):
    inv = replace(llama8b, checkpoint_dtype_bytes=checkpoint_bytes)
    plan = plan_for(method, precision, "cpu")
    fp = methods.method_footprint(inv, method, {}, plan, "cpu")
    load = 4 if plan.load_dtype == "float32" else 2
    packed = sum(l.in_features * l.out_features for l in inv.layer_linears) if fp.quant_bits else 0
    weights = (inv.total - packed) * load + (memory.nf4_bytes(packed, True) if packed else 0)
    expected = memory.CPU_IMPORTS_BYTES + weights + (inv.total * checkpoint_bytes if file_counted else 0)
    assert memory.loading_bytes(inv, fp, plan) == expected


def test_a_small_lora_run_on_a_converted_checkpoint_peaks_while_loading(llama8b):
    estimate = estimate_memory(EstimateInputs(model="config:llama-3.1-8b", batch_size=1, seq_len=16, precision="fp32"),
                               llama8b)
    assert estimate.cpu.peak == "loading" and estimate.cpu.term("loading") > 0
    assert estimate.cpu.total_bytes == memory.loading_bytes(
        llama8b, methods.method_footprint(llama8b, "lora", {}, plan_for("lora", "fp32", "cpu"), "cpu"),
        plan_for("lora", "fp32", "cpu"))


@pytest.mark.parametrize("device,key,absent", [("cuda", "cuda_context", "process"), ("cpu", "process", "cuda_context")])
def test_each_device_has_its_own_fixed_costs(device, key, absent):
    estimate = estimate_memory(EstimateInputs(model="config:smollm2-135m"))
    breakdown = estimate.gpu if device == "cuda" else estimate.cpu
    assert breakdown.term(key) > 0 and absent not in {t.key for t in breakdown.terms}
    assert breakdown.total_bytes == sum(t.bytes for t in breakdown.terms)


@pytest.mark.parametrize("method,grad_accum,peak", [("full", 1, "update"), ("lora", 1, "backward"),
                                                    ("full", 4, "update"), ("lora", 4, "backward")])
def test_the_peak_is_either_backward_or_the_update(method, grad_accum, peak):
    """Gradients are freed after each update, so full fine-tuning peaks in the optimizer's step (gradients, states
    and its buffers) and LoRA at the start of backward (activations and logits); accumulation keeps gradients around."""
    inputs = EstimateInputs(model="config:llama-3.1-8b", method=method, batch_size=1, seq_len=512, grad_accum=grad_accum)
    estimate = estimate_memory(inputs)
    gpu = estimate.gpu
    assert gpu.peak == peak
    plan = plan_for(method, "auto", "cuda")
    inv = methods.cached_inventory("config:llama-3.1-8b", "")
    grads = memory.gradient_bytes(methods.method_footprint(inv, method, {}, plan), plan)
    if peak == "update":
        assert gpu.term("activations") == gpu.term("logits") == 0 and gpu.term("gradients") == grads
        assert "freed before" in next(t.note for t in gpu.terms if t.key == "activations")
    else:
        assert gpu.term("activations") > 0 and gpu.term("gradients") == (grads if grad_accum > 1 else 0)


def test_a_measured_cuda_peak_is_compared_without_the_context():
    estimate = estimate_memory(EstimateInputs(model="config:smollm2-135m"))
    assert estimate.comparable_peak("cuda") == estimate.gpu.total_bytes - memory.CUDA_CONTEXT_BYTES
    assert estimate.comparable_peak("cpu") == estimate.cpu.total_bytes


# --- the activation rules against what autograd really keeps -----------------------------------------------------------
def kept_for_backward(loss, params, autocast_all: bool, autocast: bool) -> int:
    """Bytes of the distinct tensors the graph behind `loss` keeps, less the parameters and the half copies autocast
    makes of them (the estimate counts those with the weights)."""
    pids = {p.untyped_storage().data_ptr() for p in params}
    copied = [p for p in params if autocast_all or (p.requires_grad and p.dtype == torch.float32)] if autocast else []
    shapes = {tuple(p.shape) for p in copied} | {tuple(p.shape[::-1]) for p in copied}
    kept, stack, visited = {}, [loss.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or node in visited:
            continue
        visited.add(node)
        # built-in nodes name each saved tensor _saved_*; a custom autograd Function's node holds saved_tensors
        for name in (n for n in dir(node) if n.startswith("_saved_") or n == "saved_tensors"):
            try:
                value = getattr(node, name)
            except RuntimeError:
                continue
            for t in value if isinstance(value, (tuple, list)) else [value]:
                if not isinstance(t, torch.Tensor):
                    continue
                ptr = t.untyped_storage().data_ptr()
                # half copies of weights: one per matrix, or one flat buffer per group (app.training.lora_groups)
                if ptr in pids or (t.dim() == 2 and tuple(t.shape) in shapes and t.dtype != torch.float32) or (
                        autocast and t.dim() == 1 and t.dtype != torch.float32):
                    continue
                kept[ptr] = max(kept.get(ptr, 0), t.untyped_storage().nbytes())
        stack += [n for n, _ in node.next_functions]
    return sum(kept.values())


ACTIVATION_CASES = [
    ("full", {}, "fp32", "sdpa"), ("full", {}, "bf16-mixed", "eager"), ("freeze", {"top_layers": 1}, "bf16", "sdpa"),
    ("lora", {}, "fp32", "sdpa"), ("lora", {"targets": "all-linear", "dropout": 0.0}, "bf16-mixed", "sdpa"),
    ("lora", {"targets": "all-linear"}, "bf16", "sdpa"),  # grouped under autocast, with dropout
    ("lora", {"dora": True}, "bf16", "eager"), ("adalora", {}, "bf16", "sdpa"), ("ia3", {}, "bf16-mixed", "sdpa"),
    ("prefix", {}, "fp32", "eager"), ("ptuning", {}, "bf16", "sdpa"), ("lntuning", {}, "fp32", "sdpa"),
    ("adapter", {"placement": "parallel"}, "bf16-mixed", "eager"),
]


@pytest.mark.parametrize("method,method_args,precision,attention", ACTIVATION_CASES, ids=str)
def test_activation_rules_match_what_autograd_keeps(method, method_args, precision, attention):
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=1000, tie_word_embeddings=True)
    plan = plan_for(method, precision, "cpu")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, plan.load_dtype), attn_implementation=attention)
    model = methods.prepare_model(model, method, methods.get_method(method).make_args(method_args), total_steps=10)
    if plan.autocast_dtype:  # as the worker loads it: plain LoRA layers grouped (app.training.lora_groups)
        group_lora_layers(model, getattr(torch, plan.autocast_dtype))
    batch, seq = 2, 37
    ids = torch.randint(0, 1000, (batch, seq))
    mask = torch.ones_like(ids)
    mask[1, -5:] = 0  # a padded row, as the estimate assumes for batches
    autocast = torch.autocast("cpu", dtype=getattr(torch, plan.autocast_dtype)) if plan.autocast_dtype \
        else contextlib.nullcontext()
    with autocast:
        loss = model(input_ids=ids, attention_mask=mask, labels=ids).loss
    measured = kept_for_backward(loss, list(model.parameters()), plan.load_dtype == "float32", bool(plan.autocast_dtype))
    inv = methods.build_inventory(config)
    fp = methods.method_footprint(inv, method, method_args, plan, "cpu")
    estimated = memory.saved_for_backward_bytes(inv, fp, plan, batch, seq, attention, device="cpu")
    assert estimated == pytest.approx(measured, rel=0.05)


def test_checkpointing_keeps_one_input_per_layer_plus_one_layer(llama8b):
    plan = plan_for("lora", "bf16", "cuda")
    fp = methods.method_footprint(llama8b, "lora", {}, plan)
    full = memory.activation_bytes(llama8b, fp, plan, 1, 2048, "sdpa", False)
    checkpointed = memory.activation_bytes(llama8b, fp, plan, 1, 2048, "sdpa", True)
    assert checkpointed < full / 8
    assert checkpointed > 32 * 2 * 4096 * 2048  # at least the 32 layer inputs in bf16


def test_eager_attention_grows_with_the_square_of_the_length(llama8b):
    plan = plan_for("lora", "bf16", "cuda")
    fp = methods.method_footprint(llama8b, "lora", {}, plan)
    growth = {a: memory.activation_bytes(llama8b, fp, plan, 1, 4096, a, False)
              / memory.activation_bytes(llama8b, fp, plan, 1, 2048, a, False) for a in ("sdpa", "eager")}
    assert growth["sdpa"] == pytest.approx(2, rel=0.01)
    assert growth["eager"] > 2.5


# --- the estimate as a whole ----------------------------------------------------------------------------------------
def test_every_method_is_estimated_and_the_usual_order_holds(models_dir):
    results = {e.inputs.method: e for e in memory.every_method(EstimateInputs(model="config:llama-3.1-8b", batch_size=1,
                                                                               seq_len=512))}
    assert set(results) == set(methods.METHODS)
    gpu = {m: e.gpu.total_bytes for m, e in results.items()}
    assert gpu["qlora"] < gpu["lora"] < gpu["full"] and gpu["freeze"] < gpu["full"]
    assert results["bitfit"].trainable == 0  # Llama has no biases
    assert results["full"].trainable == results["full"].total_params


def test_estimate_for_a_run_config_is_the_estimate_of_its_settings(models_dir):
    config = RunConfig(model="config:qwen2.5-0.5b", method="qlora", method_args={"r": 4}, batch_size=2, cutoff_len=128,
                       precision="bf16", optimizer="adamw8bit", grad_checkpointing=True)
    recorded = memory.estimate_for_config(config, models_dir).to_dict()
    direct = estimate_memory(EstimateInputs(model="config:qwen2.5-0.5b", method="qlora", method_args={"r": 4},
                                            batch_size=2, seq_len=128, precision="bf16", optimizer="adamw8bit",
                                            grad_checkpointing=True, models_dir=str(models_dir)))
    assert recorded == direct.to_dict()
    assert json.loads(json.dumps(recorded)) == recorded  # goes into run.yaml as plain data
    assert recorded["comparable_peak_bytes"]["cpu"] == recorded["cpu"]["total_bytes"]


# --- several GPUs ---------------------------------------------------------------------------------------------------
FULL_8B = EstimateInputs(model="config:llama-3.1-8b", method="full", precision="bf16", batch_size=8, seq_len=512)


@pytest.mark.parametrize("inputs", [
    FULL_8B,
    replace(FULL_8B, method="lora", method_args={"r": 16}, precision="auto"),
    replace(FULL_8B, method="lora", optimizer="adamw8bit", grad_checkpointing=True),
    replace(FULL_8B, grad_accum=4, optimizer="sgd"),
])
def test_fsdp_splits_the_states_and_each_gpu_needs_less_with_more_gpus(llama8b, inputs):
    one = estimate_memory(inputs, llama8b)
    by_gpus = {n: estimate_memory(replace(inputs, gpus=n, strategy="fsdp"), llama8b) for n in (2, 4, 8)}
    totals = [one.gpu.total_bytes] + [e.gpu.total_bytes for e in by_gpus.values()]
    peaks = [one.gpu.peak] + [e.gpu.peak for e in by_gpus.values()]
    assert totals == sorted(totals, reverse=True)
    # falls with every GPU added until loading the whole model (which each GPU does first) is the peak
    assert all(a > b or p == q == "loading" for a, b, p, q in zip(totals, totals[1:], peaks, peaks[1:]))
    for n, e in by_gpus.items():
        assert (e.gpu.gpus, e.gpu.strategy, e.gpu.title) == (n, "fsdp", f"per GPU of {n} (FSDP)")
        for key in ("weights", "optimizer", "master_weights"):
            assert e.gpu.term(key) == -(-one.gpu.term(key) // n), key
        assert e.gpu.term("allreduce") == 0
        assert e.cpu == one.cpu  # the CPU column stays a one-process CPU run
        assert f"split {n} ways" in " ".join(e.notes)
        assert "÷" in next(t.note for t in e.gpu.terms if t.key == "weights")
    if inputs is FULL_8B:  # 16 GB of bf16 weights, 32 GB of Adam state: 8 GPUs bring it under a 24 GB card
        assert one.gpu.total_bytes > 60 * GIB and by_gpus[8].gpu.total_bytes < 24 * GIB


def test_fsdp_gathers_two_layers_and_the_outer_weights_during_backward(llama8b):
    e = estimate_memory(replace(FULL_8B, method="lora", gpus=4, strategy="fsdp", precision="bf16"), llama8b)
    assert e.gpu.peak == "backward"
    embeddings_and_head = 2 * 128256 * 4096 + 4096  # untied in Llama 3.1 8B, plus the final norm
    assert e.gpu.term("gathered") == (embeddings_and_head + 2 * max(llama8b.layer_params)) * 2  # bf16


@pytest.mark.parametrize("gpus, loading_is_peak", [(2, False), (8, True)])
def test_fsdp_counts_the_whole_model_each_gpu_loads_before_sharding(llama8b, gpus, loading_is_peak):
    """The worker loads all the weights onto every GPU, then shards them: no per-GPU total may be below that."""
    e = estimate_memory(replace(FULL_8B, gpus=gpus, strategy="fsdp"), llama8b)
    whole = llama8b.total * 2  # bf16
    assert e.gpu.total_bytes >= whole + 512 * 2**20
    assert (e.gpu.peak == "loading") == loading_is_peak
    assert (e.gpu.term("loading") > 0) == loading_is_peak
    if loading_is_peak:
        assert e.gpu.total_bytes == whole + 512 * 2**20


@pytest.mark.parametrize("method", ["qlora", "qlora-8bit"])
def test_fsdp_refuses_a_quantized_base_model_as_the_worker_does(llama8b, method):
    inputs = replace(FULL_8B, method="qlora", method_args={"bits": 8} if method == "qlora-8bit" else {}, gpus=2)
    assert estimate_memory(inputs, llama8b).gpu.strategy == "ddp"
    with pytest.raises(EstimateError, match="strategy='fsdp': QLoRA loads the base model in [48] bits"):
        estimate_memory(replace(inputs, strategy="fsdp"), llama8b)


@pytest.mark.parametrize("inputs, gpus, rows", [
    (FULL_8B, 2, 4),
    (replace(FULL_8B, method="lora", precision="auto"), 4, 2),
    (replace(FULL_8B, method="lora", batch_size=5), 2, 3),  # rows shared out as app.training.worker.shard does: 3 and 2
    (replace(FULL_8B, method="qlora", batch_size=1), 8, 1),  # a GPU without a row still runs one, at weight 0
])
def test_ddp_holds_everything_per_gpu_for_its_rows_plus_the_all_reduce_chunks(llama8b, inputs, gpus, rows):
    ddp = estimate_memory(replace(inputs, gpus=gpus, strategy="ddp"), llama8b)
    alone = estimate_memory(replace(inputs, batch_size=rows), llama8b)  # one GPU training this GPU's share
    chunks = ddp.gpu.term("allreduce")
    grads = memory.gradient_bytes(methods.method_footprint(llama8b, inputs.method, inputs.method_args,
                                                           plan_for(inputs.method, inputs.precision)),
                                  plan_for(inputs.method, inputs.precision))
    assert 0 < chunks <= min(grads, 2 * memory.BUCKET_ELEMENTS * 4)
    assert ddp.gpu.total_bytes == alone.gpu.total_bytes + chunks
    assert ddp.gpu.title == f"per GPU of {gpus} (DDP)" and "full copy" in " ".join(ddp.notes)


def test_one_gpu_is_the_plain_estimate_whatever_the_strategy(llama8b):
    plain = estimate_memory(FULL_8B, llama8b)
    assert estimate_memory(replace(FULL_8B, strategy="fsdp"), llama8b).gpu == plain.gpu
    assert plain.gpu.title == "GPU" and plain.gpu.to_dict()["gpus"] == 1


def test_a_run_config_estimate_is_per_gpu(models_dir):
    config = RunConfig(model="config:llama-3.1-8b", method="full", gpus=4, strategy="fsdp")
    recorded = memory.estimate_for_config(config, models_dir).to_dict()
    assert (recorded["gpus"], recorded["strategy"], recorded["gpu"]["gpus"]) == (4, "fsdp", 4)
    assert recorded["total_bytes"] == recorded["gpu"]["total_bytes"] < memory.estimate_for_config(
        RunConfig(model="config:llama-3.1-8b", method="full"), models_dir).total_bytes / 3


def test_suggestions_offer_fsdp_to_a_ddp_run_that_does_not_fit(llama8b):
    e = estimate_memory(replace(FULL_8B, gpus=4), llama8b)
    device = devices.DeviceInfo("cuda", "Test GPU", 80 * GIB, 40 * GIB)
    assert "FSDP over the 4 GPUs" in memory.verdict(e, device, llama8b).text


@pytest.mark.parametrize("torch_count, nvml, visible, expected", [
    (2, None, None, 2),
    (0, None, None, 0),
    (RuntimeError("CUDA driver failed"), 4, None, 4),
    (RuntimeError("CUDA driver failed"), 4, "1,3", 2),
    (RuntimeError("CUDA driver failed"), 4, "", 0),
    (RuntimeError("CUDA driver failed"), ImportError("no pynvml"), None, 0),
])
def test_gpu_count(monkeypatch, torch_count, nvml, visible, expected):
    import sys
    import types

    def answer(value):
        def call(*args):
            if isinstance(value, Exception):
                raise value
            return value
        return call

    monkeypatch.setattr(torch.cuda, "device_count", answer(torch_count))
    fake_nvml = types.SimpleNamespace(nvmlInit=answer(nvml if isinstance(nvml, Exception) else None),
                                      nvmlDeviceGetCount=answer(nvml), nvmlShutdown=answer(None))
    monkeypatch.setitem(sys.modules, "pynvml", fake_nvml)
    if visible is None:
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    else:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    assert devices.gpu_count() == expected


def test_an_update_takes_well_under_50_ms_once_the_config_is_cached():
    inputs = EstimateInputs(model="config:llama-3.1-8b", method="lora", method_args={"r": 16})
    memory.every_method(inputs)
    started = time.perf_counter()
    for r in (4, 8, 32):
        memory.every_method(replace(inputs, method_args={"r": r}))
    assert (time.perf_counter() - started) / 3 < 0.05


@pytest.mark.parametrize("changes,message", [
    ({"batch_size": 0}, "batch_size=0"),
    ({"batch_size": -2}, "batch_size=-2"),
    ({"batch_size": 1.5}, "batch_size=1.5"),
    ({"batch_size": True}, "batch_size=True"),
    ({"seq_len": 0}, "seq_len=0"),
    ({"precision": "fp8"}, "precision='fp8'"),
    ({"optimizer": "adam"}, "optimizer='adam'"),
    ({"attention": "flash"}, "attention='flash'"),
    ({"method_args": [8]}, "method_args=[8]"),
    ({"gpus": 0}, "gpus=0: must be a whole number from 1 to 1024"),
    ({"gpus": 2.0}, "gpus=2.0"),
    ({"gpus": True}, "gpus=True"),
    ({"gpus": 2048}, "gpus=2048"),
    ({"gpus": 2, "strategy": "zero3"}, "strategy='zero3': choose one of ddp, fsdp"),
    ({"strategy": "FSDP"}, "strategy='FSDP'"),  # refused even with one GPU: run.yaml would refuse it too
])
def test_bad_inputs_name_the_field(changes, message):
    with pytest.raises(EstimateError, match=message.replace("[", r"\[").replace("]", r"\]")):
        estimate_memory(replace(EstimateInputs(model="config:smollm2-135m"), **changes))


@pytest.mark.parametrize("changes,error", [
    ({"method": "sft"}, MethodError), ({"method_args": {"r": 0}}, MethodError), ({"model": "config:gpt-5"}, ModelError),
])
def test_bad_methods_and_models_are_refused(changes, error):
    with pytest.raises(error):
        estimate_memory(replace(EstimateInputs(model="config:smollm2-135m"), **changes))


# --- the verdict ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("free_gib,fits,words", [
    (80, True, "Fits on Test GPU with "),
    (4, False, "more than is free on Test GPU"),
])
def test_verdict_in_plain_words(free_gib, fits, words):
    estimate = estimate_memory(EstimateInputs(model="config:llama-3.1-8b", method="lora", batch_size=4, seq_len=512))
    device = devices.DeviceInfo("cuda", "Test GPU", 80 * GIB, free_gib * GIB)
    verdict = memory.verdict(estimate, device)
    assert verdict.fits is fits and words in verdict.text
    spare = (device.free_bytes - estimate.gpu.total_bytes) / GIB
    assert f"{abs(spare):.1f} GiB" in verdict.text
    if not fits:
        assert "try " in verdict.text and "QLoRA" in verdict.text


def test_suggestions_only_name_changes_that_help():
    estimate = estimate_memory(EstimateInputs(model="config:llama-3.1-8b", method="qlora", batch_size=1, seq_len=256,
                                              grad_checkpointing=True))
    tips = memory.suggestions(estimate, devices.DeviceInfo("cuda", "Tiny GPU", GIB, GIB // 2))
    assert "QLoRA" not in tips and "gradient checkpointing" not in tips and not any(t.startswith("batch") for t in tips)
    assert tips == ["cutoff length 128"]


def test_without_a_gpu_the_cpu_estimate_is_set_against_ram(tmp_path, monkeypatch):
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       24684084 kB\nMemFree:  1000 kB\nMemAvailable:   20000000 kB\n")
    assert devices.system_memory(meminfo) == (24684084 * 1024, 20000000 * 1024)
    monkeypatch.setitem(__import__("sys").modules, "pynvml", None)  # no NVML library at all
    device = devices.detect_device()
    assert device.kind == "cpu" and "no GPU" in device.name
    estimate = estimate_memory(EstimateInputs(model="config:smollm2-135m"))
    assert "CPU training" in memory.verdict(estimate, device).text


@pytest.mark.parametrize("error, oom", [
    (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), True),
    (MemoryError(), True),
    (RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory: you tried ..."), True),
    (RuntimeError("DefaultCPUAllocator: not enough memory: you tried to allocate 8 GB."), True),
    (RuntimeError("CUDA error: Out Of Memory"), True),
    (RuntimeError("mat1 and mat2 shapes cannot be multiplied"), False),
    (ValueError("out of memory"), False),  # only a RuntimeError's message is read
])
def test_one_out_of_memory_test_for_the_worker_and_the_chat(error, oom):
    assert devices.is_oom(error) is oom


# --- figures, the CLI, the tab ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("gpus, strategy, column", [(1, "ddp", "GPU"), (2, "fsdp", "per GPU of 2 (FSDP)")])
def test_figures_stack_every_term(gpus, strategy, column):
    inputs = EstimateInputs(model="config:qwen2.5-1.5b", gpus=gpus, strategy=strategy)
    estimate = estimate_memory(inputs)
    figure = figures.breakdown_figure(estimate)
    assert sum(trace.y[0] for trace in figure.data) == pytest.approx(estimate.gpu.total_bytes / GIB)
    assert list(figure.data[0].x) == [column, "CPU RAM"]
    every = memory.every_method(inputs)
    assert len(figures.methods_figure(every, "lora").data[0].x) == len(every)
    assert ("qlora" in {e.inputs.method for e in every}) == (strategy == "ddp")  # FSDP cannot split 4-bit weights


def test_cli_prints_json(capsys):
    code = launch.main(["estimate", "--model", "config:llama-3.1-8b", "--method", "qlora", "--r", "16", "--batch", "1",
                        "--seq", "2048", "--grad-checkpointing", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert code == 0 and out["trainable"] == 16 * 32 * (2 * (4096 + 4096) + 2 * (4096 + 1024))
    assert out["gpu"]["total_bytes"] == out["total_bytes"] > out["gpu"]["terms"]["weights"] > 4 * GIB


@pytest.mark.parametrize("gpus, strategy, column", [(1, "ddp", "GPU (bf16)"), (4, "ddp", "per GPU of 4 (DDP) (bf16)"),
                                                    (4, "fsdp", "per GPU of 4 (FSDP) (bf16)")])
def test_cli_prints_the_per_gpu_figure(capsys, gpus, strategy, column):
    argv = ["estimate", "--model", "config:llama-3.1-8b", "--method", "full", "--precision", "bf16",
            "--gpus", str(gpus), "--strategy", strategy]
    assert launch.main(argv + ["--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert (out["gpus"], out["strategy"], out["gpu"]["gpus"]) == (gpus, strategy, gpus)
    assert launch.main(argv) == 0
    table = capsys.readouterr().out
    total = next(line for line in table.splitlines() if line.startswith("Total"))
    assert column in table and total.split()[1:3] == memory.gib(out["total_bytes"]).split()
    assert (f"{gpus} GPUs ({strategy.upper()})" in table) == (gpus > 1)


def test_cli_prints_a_table(capsys):
    assert launch.main(["estimate", "--model", "config:smollm2-135m", "--method", "full"]) == 0
    out = capsys.readouterr().out
    assert "Total" in out and "Optimizer state" in out and "trainable  134,515,008" in out


@pytest.mark.parametrize("argv,message", [
    (["--r", "0"], "r=0"), (["--method", "sft"], "unknown method"), (["--batch", "-1"], "batch_size=-1"),
    (["--model", "config:nope"], "no bundled config"), (["--method", "full", "--r", "8"], "has no setting"),
    (["--arg", "bits"], "KEY=VALUE"), (["--method", "qlora", "--arg", "bits=3"], "bits=3"),
    (["--precision", "fp8"], "precision='fp8'"),
    (["--gpus", "0"], "gpus=0: must be a whole number"), (["--gpus", "2", "--strategy", "zero"], "strategy='zero'"),
])
def test_cli_bad_inputs_exit_2_with_the_reason(argv, message, capsys):
    assert launch.main(["estimate", "--model", "config:smollm2-135m", *argv]) == 2
    assert message in capsys.readouterr().err


def test_method_tab_handler(models_dir):
    from components import method_tab

    good = method_tab.estimate_view(str(models_dir), "config:smollm2-135m", "sft", "lora", "auto", "adamw", False, 4, 256, 2,
                                    {"r": 16.0, "alpha": 16, "targets": "attention", "bottleneck": 3})
    summary, _, figure, every, table, choice = good
    assert "trainable parameters" in summary and figure is not None and every is not None and "Total" in table
    assert choice.method_args == {"r": 16} and choice.estimate["method_args"] == {"r": 16}
    assert choice.estimate["grad_accum"] == 2  # the Train tab's gradient accumulation counts in the figure shown
    bad = method_tab.estimate_view(str(models_dir), "config:smollm2-135m", "sft", "lora", "auto", "adamw", False, 4, 256, 1,
                                   {"r": 0})
    assert "cannot work" in bad[0] and "r=0" in bad[0] and bad[5].estimate is None
    nothing = method_tab.estimate_view(str(models_dir), "config:smollm2-135m", "sft", "bitfit", "auto", "adamw", False, 4, 256,
                                       1, {})
    assert "0 trainable" in nothing[0] and "Nothing to train" in nothing[0]


def test_method_tab_has_one_control_per_setting():
    from components import method_tab

    names = set(method_tab.knob_fields())
    assert names == {f for spec in methods.METHODS.values() for f in spec.knobs()}
    for name, f in method_tab.knob_fields().items():
        assert f.metadata.get("info"), f"{name} needs a plain-language info line"
