"""Grouped LoRA layers under autocast (app.training.lora_groups): the gradients are the forward's, the model computes what
peft's layers compute, with fewer operations, and everything that is not the plain case goes through peft."""
from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from app.runs.store import RunStore
from app.spec import RunConfig
from app.training.loading import load_for_training
from app.training.lora_groups import _GroupedLora, group_lora_layers
from tests.test_train import new_run, write_rows

F64 = torch.float64


@pytest.mark.parametrize("p, scales, outs, biased", [
    (0.0, (2.0, 2.0, 2.0), (4, 3, 3), (True, False, True)),  # q/k/v-like, no dropout, one scaling
    (0.3, (2.0, 0.5, 1.0), (4, 3, 3), (True, False, True)),  # dropout, a scaling per layer
    (0.2, (1.5,), (5,), (False,)),  # a group of one (o_proj, down_proj)
    (0.1, (2.0, 2.0), (6, 6), (False, False)),  # gate/up-like
])
def test_gradients_are_those_of_the_forward(p, scales, outs, biased):
    """gradcheck in float64, the dropout masks drawn alike on every call (seeded): input, A and B gradients."""
    torch.manual_seed(0)
    n, tokens, width, r = len(outs), 5, 6, 2
    x = torch.randn(1, tokens, width, dtype=F64, requires_grad=True)
    weights = [torch.randn(o, width, dtype=F64) for o in outs]
    biases = [torch.randn(o, dtype=F64) if b else None for o, b in zip(outs, biased)]
    a = [torch.randn(r, width, dtype=F64, requires_grad=True) for _ in outs]
    b = [torch.randn(o, r, dtype=F64, requires_grad=True) for o in outs]

    def f(x, *ab):
        torch.manual_seed(1)
        return _GroupedLora.apply(x, F64, p, scales, n, *weights, *biases, *ab)

    assert torch.autograd.gradcheck(f, (x, *a, *b))
    if p == 0:  # and the forward is the formula
        for y, w, bias, a_i, b_i, s in zip(f(x, *a, *b), weights, biases, a, b, scales):
            want = x @ w.T + (0 if bias is None else bias) + s * (x @ a_i.T) @ b_i.T
            torch.testing.assert_close(y, want)


def test_dropout_drops_p_of_each_layers_input_independently():
    torch.manual_seed(0)
    n, tokens, width, r, p = 3, 400, 50, 1, 0.25
    x = torch.ones(1, tokens, width, dtype=F64)
    ys = _GroupedLora.apply(x, F64, p, (1.0,) * n, n, *[torch.zeros(1, width, dtype=F64)] * n, *[None] * n,
                            *[torch.eye(1, width, dtype=F64)] * n, *[torch.ones(1, r, dtype=F64)] * n)
    # each output is the first input column, dropped or scaled by 1/(1-p): the masks per layer
    kept = [(y[0, :, 0] != 0) for y in ys]
    for k in kept:
        assert k.double().mean().item() == pytest.approx(1 - p, abs=0.06)
    assert not torch.equal(kept[0], kept[1])  # a mask of its own per layer


class Ops(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.n += not func.is_view
        return func(*args, **(kwargs or {}))


@pytest.fixture(scope="module")
def arch_dirs(tmp_path_factory, embedded_model_dir, tiny_model_dir):
    """Tiny models of the architectures the table below needs, with SmolLM2's tokenizer."""
    from transformers import AutoTokenizer, OlmoConfig, OlmoForCausalLM, Qwen2Config, Qwen2ForCausalLM

    shape = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=49152, pad_token_id=2)
    dirs = {"llama": tiny_model_dir}
    for name, model_class, config in [
        ("qwen2", Qwen2ForCausalLM, Qwen2Config(**shape)),  # biases on q, k and v
        ("olmo", OlmoForCausalLM, OlmoConfig(clip_qkv=8.0, **shape)),  # clamps q, k, v in place (clamp_)
    ]:
        torch.manual_seed(0)
        dirs[name] = tmp_path_factory.mktemp(name)
        model_class(config).save_pretrained(dirs[name])
        AutoTokenizer.from_pretrained(embedded_model_dir).save_pretrained(dirs[name])
    return dirs


def lora_model(tiny_model_dir, grouped: bool, dropout: float = 0.0, **extra):
    torch.manual_seed(0)
    config = RunConfig(method="lora", method_args={"targets": "all-linear", "dropout": dropout, **extra},
                       precision="bf16-mixed")
    model, _ = load_for_training(tiny_model_dir, config, device="cpu", half_frozen=False)
    if not grouped:  # peft's own forward back on every layer
        for m in model.modules():
            m.__dict__.pop("forward", None)
    g = torch.Generator().manual_seed(2)
    for name, p in model.named_parameters():
        if "lora_B" in name:  # not peft's zeros: lora_A's gradients then flow through B
            p.data = 0.1 * torch.randn(p.shape, generator=g)
    return model.train()


def step(model, ids):
    ops = Ops()
    with ops, torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(input_ids=ids, labels=ids).loss
    with ops:
        loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return loss.item(), grads, ops.n


@pytest.mark.parametrize("arch", ["llama", "qwen2", "olmo"])
def test_a_grouped_model_computes_what_peft_does_with_fewer_operations(arch_dirs, arch):
    ids = torch.randint(0, 1000, (2, 24), generator=torch.Generator().manual_seed(0))
    loss, grads, ops = step(lora_model(arch_dirs[arch], grouped=True), ids)
    peft_loss, peft_grads, peft_ops = step(lora_model(arch_dirs[arch], grouped=False), ids)
    assert loss == pytest.approx(peft_loss, rel=1e-3)  # bf16 products rounded in another order
    assert grads.keys() == peft_grads.keys()
    for name, g in grads.items():
        assert (g - peft_grads[name]).norm() <= 0.05 * peft_grads[name].norm(), name  # bf16: 2.4% at most seen
    assert ops < 0.85 * peft_ops, (ops, peft_ops)  # 0.77-0.8 with two layers; the saving grows with depth


def test_groups_are_the_layers_that_read_one_input(tiny_model_dir):
    model, _ = load_for_training(tiny_model_dir, RunConfig(method_args={"targets": "all-linear"}, precision="bf16-mixed"),
                                 device="cpu")
    groups = group_lora_layers(model, torch.bfloat16)
    short = sorted(tuple(n.rsplit(".", 1)[-1] for n in g) for g in groups)
    layers = model.config.num_hidden_layers
    assert short == sorted([("q_proj", "k_proj", "v_proj")] * layers + [("gate_proj", "up_proj")] * layers)


@pytest.mark.parametrize("case", ["eval", "no autocast", "adapter disabled", "dora"])
def test_everything_but_plain_training_under_autocast_is_peft_own(tiny_model_dir, case):
    ids = torch.randint(0, 1000, (1, 12), generator=torch.Generator().manual_seed(1))
    extra = {"dora": True} if case == "dora" else {}
    grouped, plain = lora_model(tiny_model_dir, True, **extra), lora_model(tiny_model_dir, False, **extra)
    outs = []
    for model in (grouped, plain):
        if case == "eval":
            model.eval()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=case != "no autocast"):
            if case == "adapter disabled":
                with model.disable_adapter():
                    outs.append(model(input_ids=ids).logits)
            else:
                outs.append(model(input_ids=ids).logits)
    assert torch.equal(outs[0], outs[1])


@pytest.mark.slow
@pytest.mark.parametrize("overrides", [
    {},  # dropout: other random draws than peft's, the same learning
    {"grad_checkpointing": True},  # recomputed forwards group alike
], ids=str)
def test_a_grouped_run_learns_like_peft(workspace, tiny_model_dir, tmp_path, monkeypatch, overrides):
    rows = write_rows(tmp_path / "rows.jsonl")
    curves = []
    for grouped in (True, False):
        if not grouped:
            monkeypatch.setattr("app.training.lora_groups.group_lora_layers", lambda model, dtype: [])
        store, run_id = new_run(workspace, tiny_model_dir, rows, method_args={"targets": "all-linear"},
                                precision="bf16-mixed", max_steps=8, save_every=0, eval_every=8, **overrides)
        from app.training.worker import run_training

        assert run_training(store.config_path(run_id)) == 0
        curves.append([r["loss"] for r in RunStore(workspace.runs).metrics(run_id) if "loss" in r])
    ours, peft = curves
    assert ours == pytest.approx(peft, rel=1e-3)  # seen: 2e-4 apart (bf16 rounding, other dropout draws)
    assert ours[0] - ours[-1] == pytest.approx(peft[0] - peft[-1], rel=0.05)  # and as much learnt (seen: 1.4%)


def test_a_model_the_learning_forward_does_not_suit_keeps_peft_layers(tiny_model_dir, monkeypatch):
    model = lora_model(tiny_model_dir, grouped=False)
    layers = [m for m in model.modules() if hasattr(m, "lora_A")]
    inner = model.get_base_model()

    def refuse(*args, **kwargs):
        raise ValueError("this model needs pixel values")

    monkeypatch.setattr(inner, "forward", refuse)
    assert group_lora_layers(model, torch.bfloat16) == []
    assert all("forward" not in m.__dict__ and not hasattr(m, "_lora_group") for m in layers)


def test_an_output_left_pending_is_never_handed_to_a_later_forward(tiny_model_dir):
    """q alone leaves k and v pending; a later forward of the model that does not reach that layer, a weight update,
    then k with that same tensor: it must compute afresh, not hand out the output made before the update."""
    model = lora_model(tiny_model_dir, grouped=True)
    layers = model.get_base_model().model.layers
    attn = layers[0].self_attn
    x = torch.randn(1, 5, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        attn.q_proj(x)
        stale = attn.k_proj._lora_group._pending[id(attn.k_proj)]
        model.get_base_model().model.layers = torch.nn.ModuleList(list(layers)[1:])  # layer 0 not run
        model(input_ids=torch.randint(0, 1000, (1, 6)))
        with torch.no_grad():
            attn.k_proj.lora_B["default"].weight.add_(1.0)  # as an optimizer step would
        k = attn.k_proj(x)
    assert k is not stale and not torch.equal(k, stale)


def test_a_layer_with_a_hook_on_its_parts_keeps_peft_forward(tiny_model_dir):
    model, _ = load_for_training(tiny_model_dir, RunConfig(method_args={"targets": "all-linear"}, precision="bf16-mixed"),
                                 device="cpu")
    q_proj = model.get_base_model().model.layers[0].self_attn.q_proj
    q_proj.base_layer.register_forward_hook(lambda module, args, out: None)
    groups = group_lora_layers(model, torch.bfloat16)
    assert not any(name.endswith("layers.0.self_attn.q_proj") for g in groups for name in g)
    assert any(name.endswith("layers.0.self_attn.k_proj") for g in groups for name in g)  # k and v still grouped
