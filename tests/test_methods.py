"""The method registry: every method trains on a tiny model, its exact trainable count matches peft's own, its
results save and load back, and settings that cannot work are refused with the field and value named."""
from __future__ import annotations

import dataclasses
import importlib
import math
import os
import pkgutil
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from app import methods
from app.methods import METHODS, MethodError
from app.models import load_config, meta_model
from app.presets import PRESETS_DIR, load_preset
from app.spec import ConfigError, RunConfig
from app.training.loading import load_for_training
from tests.conftest import build_tiny_model

# (method, settings): at least one row per method, plus the switches that change what trains
TRAINING_CASES = [
    ("full", {}),
    ("freeze", {"top_layers": 1}),
    ("lora", {}),
    ("lora", {"targets": "all-linear", "dora": True, "rslora": True}),
    ("qlora", {"r": 4}),
    ("qlora", {"bits": 8, "targets": "q_proj,v_proj"}),
    ("adalora", {"r": 6, "target_r": 2}),
    ("ia3", {}),
    ("prefix", {"virtual_tokens": 4}),
    ("prompt", {"virtual_tokens": 4}),
    ("ptuning", {"virtual_tokens": 4}),
    ("lntuning", {}),
    ("bitfit", {}),
    ("adapter", {"bottleneck": 8}),
    ("adapter", {"bottleneck": 8, "placement": "parallel"}),
]


pytestmark = pytest.mark.usefixtures("one_thread")


def settings(method: str, method_args: dict):
    """The parsed settings a run's RunConfig.method_settings would hold."""
    return METHODS[method].make_args(method_args)


@pytest.fixture(scope="module")
def biased_model_dir(tmp_path_factory, embedded_model_dir):
    """The tiny Llama with attention biases, so BitFit has something to train."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny-biased"), embedded_model_dir, attention_bias=True)


def model_for(method: str, tiny_model_dir, biased_model_dir):
    return biased_model_dir if method == "bitfit" else tiny_model_dir


def batch(vocab: int = 49152, rows: int = 2, length: int = 12):
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (rows, length), generator=generator)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


def load_base(folder, method: str, method_args: dict):
    """The base model as a method loads it (quantized for QLoRA), unchanged otherwise."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32,
                                                **METHODS[method].load_kwargs(settings(method, method_args)))


@pytest.mark.parametrize("method,method_args", TRAINING_CASES, ids=lambda v: str(v))
def test_every_method_trains_saves_and_loads_back(method, method_args, tiny_model_dir, biased_model_dir, tmp_path):
    folder = model_for(method, tiny_model_dir, biased_model_dir)
    torch.manual_seed(0)
    config = RunConfig(method=method, method_args=method_args, precision="fp32")
    model, plan = load_for_training(folder, config, total_steps=20, device="cpu")
    assert plan.name == "fp32"
    trainable = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad and p.is_floating_point()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for step in range(3):
        loss = model(**batch()).loss
        assert math.isfinite(loss.item())
        loss.backward()
        methods.after_backward(model, method, step)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    params = dict(model.named_parameters())
    assert any(not torch.equal(params[n], before) for n, before in trainable.items()), "nothing learned"
    assert all(torch.equal(params[n], before) for n, before in frozen.items()), "a frozen weight moved"

    methods.save_trained(model, method, tmp_path / "final")
    reloaded = methods.load_trained(load_base(folder, method, method_args), method, tmp_path / "final")
    model.eval()
    reloaded.eval()
    probe = {k: v for k, v in batch(rows=1, length=7).items() if k != "labels"}  # a loaded AdaLoRA has no loss
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**probe).logits, model(**probe).logits, rtol=1e-4, atol=1e-4)


# --- exact trainable counts ---------------------------------------------------------------------------------------
COUNT_CASES = TRAINING_CASES + [
    ("lora", {"r": 16, "targets": "gate_proj, up_proj,down_proj"}),
    ("lora", {"targets": "all-linear", "r": 3}),
    ("adalora", {"targets": "all-linear"}),
    ("freeze", {"top_layers": 2}),
]


@pytest.mark.parametrize("method,method_args", COUNT_CASES, ids=lambda v: str(v))
def test_count_from_shapes_equals_the_real_models_count(method, method_args, tiny_model_dir, biased_model_dir):
    """The count the UI shows (from the meta-device inventory) is what peft (or the model) reports once applied."""
    from transformers import AutoModelForCausalLM

    folder = model_for(method, tiny_model_dir, biased_model_dir)
    config = load_config(str(folder), folder.parent)
    counted, _ = methods.count_trainable(methods.build_inventory(config), method, settings(method, method_args))
    model = methods.prepare_model(AutoModelForCausalLM.from_config(config), method, settings(method, method_args),
                                  total_steps=20)
    if hasattr(model, "get_nb_trainable_parameters"):  # peft's own count
        real = model.get_nb_trainable_parameters()[0]
    else:
        real = methods.count_parameters(model)[0]
    assert counted == real > 0


@pytest.mark.parametrize("method,method_args", [
    ("lora", {"targets": "all-linear", "dora": True}), ("adalora", {}), ("ia3", {}), ("prefix", {}), ("ptuning", {}),
    ("lntuning", {}), ("bitfit", {}), ("adapter", {}), ("freeze", {"top_layers": 3}),
])
def test_counts_match_peft_on_a_real_architecture_on_the_meta_device(method, method_args, models_dir):
    """Qwen2.5-0.5B (grouped-query attention, attention biases, tied embeddings), built on the meta device."""
    config = load_config("config:qwen2.5-0.5b", models_dir)
    counted, _ = methods.count_trainable(methods.build_inventory(config), method, settings(method, method_args))
    with torch.device("meta"):
        model = methods.prepare_model(meta_model(config), method, settings(method, method_args), total_steps=100)
    real = model.get_nb_trainable_parameters()[0] if hasattr(model, "get_nb_trainable_parameters") \
        else methods.count_parameters(model)[0]
    assert counted == real


# Published parameter counts of the bundled architectures (tied embeddings counted once).
PUBLISHED = {
    "smollm2-135m": 0.1345e9, "smollm2-360m": 0.3618e9, "smollm2-1.7b": 1.711e9, "qwen2.5-0.5b": 0.494e9,
    "qwen2.5-1.5b": 1.544e9, "qwen2.5-7b": 7.616e9, "llama-3.2-1b": 1.236e9, "llama-3.2-3b": 3.213e9,
    "llama-3.1-8b": 8.030e9, "mistral-7b": 7.248e9, "gemma-2-2b": 2.614e9,
}


@pytest.mark.parametrize("name,params", PUBLISHED.items())
def test_bundled_configs_have_their_published_size(name, params, models_dir):
    inv = methods.build_inventory(load_config(f"config:{name}", models_dir))
    assert inv.total == pytest.approx(params, rel=0.001)


def test_inventory_of_an_8b_model_takes_well_under_a_second(models_dir):
    config = load_config("config:llama-3.1-8b", models_dir)
    methods.build_inventory(config)  # imports and first-use costs
    started = time.perf_counter()
    inv = methods.build_inventory(config)
    assert time.perf_counter() - started < 1.0
    assert methods.count_trainable(inv, "lora", settings("lora", {"r": 16, "targets": "all-linear"}))[0] == 41_943_040


def test_lora_counts_as_the_articles_say():
    """A d x k matrix with rank r trains r(d + k) numbers: 1000 x 1000 at r=8 is 16,000 (1.6%)."""
    layer = methods.LinearInfo("model.layers.0.self_attn.q_proj", 1000, 1000, 0)
    chosen = methods.resolve_targets((layer,), "lm_head", "q_proj")
    assert sum(8 * (l.in_features + l.out_features) for l in chosen) == 16_000


# --- refusals -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method,method_args,message", [
    ("lora", {"r": 0}, "r=0"),
    ("lora", {"r": -4}, "r=-4"),
    ("lora", {"r": 2.5}, "whole number"),
    ("lora", {"r": "8"}, "whole number"),
    ("lora", {"alpha": 0}, "alpha=0"),
    ("lora", {"dropout": 1.0}, "dropout=1.0"),
    ("lora", {"dropout": -0.1}, "dropout=-0.1"),
    ("lora", {"targets": ""}, "at least one module"),
    ("lora", {"targets": "q_proj; drop table"}, "not a module name"),
    ("lora", {"rank": 8}, "no setting(s) rank"),
    ("qlora", {"bits": 3}, "bits=3"),
    ("qlora", {"compute_dtype": "int4"}, "compute_dtype='int4'"),
    ("adalora", {"r": 4, "target_r": 8}, "target_r=8"),
    ("freeze", {"top_layers": 0}, "top_layers=0"),
    ("prompt", {"virtual_tokens": 0}, "virtual_tokens=0"),
    ("adapter", {"placement": "diagonal"}, "placement='diagonal'"),
    ("adapter", {"bottleneck": 0}, "bottleneck=0"),
    ("full", {"r": 8}, "full has no setting(s) r"),
    ("sft", {}, "unknown method 'sft'"),
])
def test_settings_that_cannot_work_are_refused(method, method_args, message):
    with pytest.raises(MethodError) as e:
        methods.get_method(method).make_args(method_args)
    assert message in str(e.value)


@pytest.mark.parametrize("method,method_args,message", [
    ("freeze", {"top_layers": 3}, "only 2 layers"),
    ("lora", {"targets": "c_attn"}, "no linear layer named 'c_attn'"),
    ("bitfit", {}, "finds nothing to train"),
])
def test_settings_that_do_not_fit_the_model_are_refused(method, method_args, message, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with pytest.raises(MethodError, match=message):
        methods.prepare_model(model, method, settings(method, method_args), total_steps=10)


def test_bitfit_on_a_model_without_biases_shows_zero_and_refuses_to_train(tiny_model_dir):
    inv = methods.build_inventory(load_config(str(tiny_model_dir), tiny_model_dir.parent))
    assert methods.count_trainable(inv, "bitfit", settings("bitfit", {}))[0] == 0


def test_adalora_refuses_to_start_without_the_number_of_steps(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    with pytest.raises(MethodError, match="number of training steps"):
        methods.prepare_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir), "adalora", settings("adalora", {}))


def test_a_bottleneck_adapter_refuses_weights_of_another_layout(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    model = methods.prepare_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir), "adapter",
                                  settings("adapter", {"bottleneck": 8}))
    methods.save_trained(model, "adapter", tmp_path / "final")
    config = (tmp_path / "final" / methods.ADAPTER_CONFIG)
    config.write_text(config.read_text().replace('"bottleneck": 8', '"bottleneck": 16'))
    with pytest.raises(MethodError, match="another layout"):
        methods.load_trained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), "adapter", tmp_path / "final")


@pytest.mark.parametrize("method,method_args,mixed", [
    ("lora", {}, True), ("qlora", {}, True), ("lora", {"dora": True}, False), ("adalora", {}, False),
    ("full", {}, False), ("adapter", {}, False),
])
def test_which_runs_share_a_batch_in_the_compare_tab(method, method_args, mixed):
    assert methods.supports_mixed_batch(method, settings(method, method_args)) is mixed


# --- the registry: one module per method family, one line each in app/methods/__init__.py -------------------------
METHOD_MODULES = sorted(m.name for m in pkgutil.iter_modules(methods.__path__)
                        if m.name not in ("base", "inventory", "precision"))  # what every method shares


@pytest.mark.parametrize("module_name", METHOD_MODULES)
def test_each_method_module_registers_complete_specs(module_name, models_dir):
    """A method module's SPECS are in METHODS (its registry line is there), with a name, a settings dataclass whose
    defaults parse, and apply / count / footprint functions that agree on a real architecture."""
    module = importlib.import_module(f"app.methods.{module_name}")
    assert module.SPECS, f"app.methods.{module_name} registers no method"
    inv = methods.cached_inventory("config:llama-3.2-1b", str(models_dir))
    for spec in module.SPECS:
        assert METHODS.get(spec.name) is spec, f"{spec.name} is missing from the METHODS registry"
        assert spec.label and spec.description and dataclasses.is_dataclass(spec.args)
        assert spec.make_args({}) == spec.args()
        assert all(callable(f) for f in (spec.apply, spec.count, spec.footprint, spec.save, spec.load))
        dtypes = methods.Dtypes.of(methods.plan_for(spec.name, "bf16-mixed", "cuda"))
        assert spec.footprint(inv, spec.args(), dtypes).trainable == spec.count(inv, spec.args())


def test_every_registered_method_comes_from_one_method_module():
    owners = [spec.name for name in METHOD_MODULES for spec in importlib.import_module(f"app.methods.{name}").SPECS]
    assert sorted(owners) == sorted(METHODS)


@pytest.mark.parametrize("method,method_args,message", [
    ("lora", {"r": 0}, "r=0: must be at least 1"),
    ("lora", {"rank": 8}, "lora has no setting(s) rank"),
    ("lora", {"targets": ""}, "targets=''"),
    ("qlora", {"bits": 3}, "bits=3"),
    ("adalora", {"r": 4, "target_r": 8}, "target_r=8"),
    ("freeze", {"top_layers": 0}, "top_layers=0"),
    ("prompt", {"virtual_tokens": 0}, "virtual_tokens=0"),
    ("adapter", {"placement": "diagonal"}, "placement='diagonal'"),
    ("full", {"r": 8}, "full has no setting(s) r"),
    ("sft", {}, "unknown method 'sft'"),
])
def test_a_run_config_refuses_method_settings_that_cannot_work_when_it_is_built(method, method_args, message, tmp_path):
    with pytest.raises(ConfigError) as e:
        RunConfig(method=method, method_args=method_args)
    assert message in str(e.value)
    path = tmp_path / "run.yaml"
    path.write_text(f"method: {method}\nmethod_args: {method_args}\n")
    with pytest.raises(ConfigError, match=re.escape(message)):
        RunConfig.from_yaml(path)


def test_a_run_config_holds_its_parsed_settings_and_writes_only_what_differs():
    config = RunConfig(method="lora", method_args={"r": 16, "targets": "all-linear"})
    assert config.method_settings == METHODS["lora"].args(r=16, targets="all-linear")
    assert "method_settings" not in config.to_dict()
    assert config.to_dict()["method_args"] == {"r": 16, "targets": "all-linear"}  # run.yaml: only what differs
    assert RunConfig(method="full").method_settings == METHODS["full"].args()


def test_launch_help_lists_exactly_the_registered_methods_and_imports_no_torch():
    """The method list in `launch.py estimate --help` comes from the registry; reading the registry, building a
    RunConfig and the parser load no torch (the UI and --help stay fast)."""
    script = ("import sys, launch, app.methods, app.spec; app.spec.RunConfig(method='qlora', method_args={'bits': 8}); "
              "launch.build_parser(); print('torch' in sys.modules)")
    root = Path(__file__).resolve().parents[1]
    checked = subprocess.run([sys.executable, "-c", script], cwd=root, capture_output=True, text=True, check=True)
    assert checked.stdout.strip() == "False"
    shown = subprocess.run([sys.executable, "launch.py", "estimate", "--help"], cwd=root, capture_output=True,
                           text=True, check=True, env={**os.environ, "COLUMNS": "1000"}).stdout
    line = next(line for line in shown.splitlines() if line.strip().startswith("--method"))
    assert line.split("METHOD", 1)[1].strip().split(", ") == list(METHODS)


# --- presets ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", list(METHODS))
def test_every_method_has_a_preset_that_is_a_valid_run_config(method):
    preset = load_preset(method)
    config = RunConfig.from_dict(preset)  # the method's settings are checked as it is built
    assert config.method == method
    text = (PRESETS_DIR / f"{method}.yaml").read_text(encoding="utf-8")
    assert text.startswith("# ")  # one plain sentence first
    settings = [line for line in text.splitlines() if ":" in line and not line.startswith("#")]
    assert all("#" in line for line in settings if not line.rstrip().endswith(":") and "method:" not in line), \
        "every value in a preset carries its trade-off in a comment"


# --- CPU training speed-ups (app.training.fast_lora): the same math as peft's modules ---------------------------------------
@pytest.mark.parametrize("p", [0.05, 0.1, 0.5, 0.9])
def test_fast_dropout_drops_with_probability_p_independently(p):
    """A fixed seed, so the check cannot flake; the tolerances are 6 standard deviations of a fair draw."""
    from app.training.fast_lora import keep_scale

    torch.manual_seed(0)
    n = 1 << 20
    kept = keep_scale(torch.Size([n]), p) != 0
    tolerance = 6 * math.sqrt(p * (1 - p) / n)
    assert abs((~kept).float().mean().item() - p) < tolerance
    # the four values cut from one 64-bit draw are independent: each position drops at rate p, pairs at p squared
    for position in range(4):
        assert abs((~kept[position::4]).float().mean().item() - p) < 2 * tolerance
    pairs = (~kept[0::2]) & (~kept[1::2])
    assert abs(pairs.float().mean().item() - p * p) < 6 * math.sqrt(p * p * (1 - p * p) / (n // 2))


@pytest.mark.parametrize("p", [0.0, 0.05, 0.1, 0.123456, 0.5, 0.99])
def test_fast_dropout_drop_probability_is_p_to_within_1e_4_over_every_16_bit_value(p):
    from app.training.fast_lora import scale_of

    every_value = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16)
    mask = scale_of(every_value, p)
    torch.testing.assert_close(mask[mask != 0], torch.full_like(mask[mask != 0], 1 / (1 - p)))
    assert abs((mask == 0).float().mean().item() - p) < 1e-4


@pytest.mark.parametrize("p", [0.05, 0.3])
def test_fast_dropout_scales_kept_values_and_is_identity_in_eval(p):
    from app.training.fast_lora import FastDropout

    x = torch.randn(3, 50, 64)
    dropout = FastDropout(p).train()
    out = dropout(x)
    kept = out != 0
    torch.testing.assert_close(out[kept], x[kept] * (1 / (1 - p)), rtol=1e-6, atol=0)
    assert 0 < kept.float().mean().item() < 1
    assert dropout.eval()(x) is x
    assert FastDropout(0.0).train()(x) is x


@pytest.mark.parametrize("p", [-0.1, 1.0, 1.5])
def test_fast_dropout_refuses_a_probability_outside_0_to_1(p):
    from app.training.fast_lora import FastDropout

    with pytest.raises(ValueError, match="dropout p="):
        FastDropout(p)


def test_fast_dropout_gradient_is_the_same_mask_times_the_incoming_gradient():
    from app.training.fast_lora import FastDropout, keep_scale

    x = torch.randn(2, 30, 48, requires_grad=True)
    grad = torch.randn(2, 30, 48)
    torch.manual_seed(7)
    FastDropout(0.2).train()(x).backward(grad)
    torch.manual_seed(7)
    mask = keep_scale(x.shape, 0.2)  # the same draw
    torch.testing.assert_close(x.grad, grad * mask, rtol=0, atol=0)


@pytest.mark.parametrize("shape,in_grad", [
    ((8, 64), True),    # lora_A: rank x in
    ((64, 8), True),    # lora_B: out x rank
    ((8, 64), False),   # the first layer's input needs no gradient
    ((3, 5), True),
])
def test_thin_linear_matches_nn_linear_in_value_and_gradients(shape, in_grad):
    from app.training.fast_lora import ThinLinear

    torch.manual_seed(0)
    reference = torch.nn.Linear(shape[1], shape[0], bias=False)
    thin = ThinLinear(shape[1], shape[0], bias=False)
    thin.weight = torch.nn.Parameter(reference.weight.detach().clone())
    x = torch.randn(2, 17, shape[1], requires_grad=in_grad)
    grad = torch.randn(2, 17, shape[0])
    expected = reference(x)
    expected.backward(grad)
    x_grad = x.grad.clone() if in_grad else None
    x.grad = None
    got = thin(x)
    got.backward(grad)
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(thin.weight.grad, reference.weight.grad)
    if in_grad:
        torch.testing.assert_close(x.grad, x_grad)


@pytest.mark.parametrize("dropout,swapped", [(0.1, 3 * 14), (0.0, 2 * 14)])
def test_cpu_lora_training_uses_the_fast_modules_and_saves_a_plain_peft_adapter(dropout, swapped, tiny_model_dir,
                                                                               tmp_path):
    """2 layers x 7 linears: each gets FastDropout (unless p = 0: peft then has no dropout) and two ThinLinears; the
    saved adapter has exactly the keys of an untouched peft model and loads with PeftModel.from_pretrained."""
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from app.training.fast_lora import FastDropout, ThinLinear

    method_args = {"targets": "all-linear", "dropout": dropout}
    torch.manual_seed(0)
    model, _ = load_for_training(tiny_model_dir, RunConfig(method_args=method_args, precision="fp32"), device="cpu")
    assert sum(isinstance(m, (FastDropout, ThinLinear)) for m in model.modules()) == swapped
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(3):
        model(**batch()).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    methods.save_trained(model, "lora", tmp_path / "final")

    plain = methods.prepare_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir), "lora",
                                  settings("lora", method_args))
    plain.save_pretrained(tmp_path / "plain")
    assert load_file(tmp_path / "final" / methods.ADAPTER_WEIGHTS).keys() == \
        load_file(tmp_path / "plain" / methods.ADAPTER_WEIGHTS).keys()
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    reloaded = PeftModel.from_pretrained(base, tmp_path / "final").eval()
    model.eval()
    probe = {k: v for k, v in batch(rows=1, length=7).items() if k != "labels"}
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**probe).logits, model(**probe).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bias,dropout,in_grad", [(False, 0.1, True), (True, 0.1, True), (False, 0.0, True),
                                                  (True, 0.2, False)])
def test_fused_lora_forward_matches_peft_with_the_same_dropout_mask(bias, dropout, in_grad):
    """speed_up_lora's training forward against peft's own module-by-module forward, given the same mask: the same
    output and the same gradients for the input and both LoRA matrices."""
    from peft import LoraConfig, get_peft_model

    from app.training.fast_lora import keep_scale, speed_up_lora

    def lora_model():
        torch.manual_seed(0)
        model = get_peft_model(torch.nn.Sequential(torch.nn.Linear(48, 40, bias=bias)),
                               LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules=["0"]))
        torch.nn.init.normal_(model.base_model.model[0].lora_B["default"].weight)  # peft starts B at zero
        return model.train()

    x = torch.randn(2, 9, 48, requires_grad=in_grad)
    grad = torch.randn(2, 9, 40)
    fast, reference = lora_model(), lora_model()
    assert speed_up_lora(fast) > 0
    torch.manual_seed(3)
    mask = keep_scale(x.shape, dropout) if dropout else torch.ones(x.shape)
    fixed_mask = type("FixedMask", (torch.nn.Module,), {"forward": lambda _, t: t * mask})
    reference.base_model.model[0].lora_dropout["default"] = fixed_mask()

    results = []
    for model in (fast, reference):
        torch.manual_seed(3)
        x.grad = None
        out = model(x)
        out.backward(grad)
        layer = model.base_model.model[0]
        results.append((out, x.grad, layer.lora_A["default"].weight.grad, layer.lora_B["default"].weight.grad))
    for got, expected in zip(*results):
        if expected is None:
            assert got is None
        else:
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # eval: peft's own forward (around ThinLinear), no dropout
        torch.testing.assert_close(fast.eval()(x), lora_model().eval()(x), rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def untied_model_dir(tmp_path_factory, embedded_model_dir):
    return build_tiny_model(tmp_path_factory.mktemp("tiny-untied"), embedded_model_dir, tie_word_embeddings=False)


@pytest.mark.parametrize("method,method_args,precision,tied", [
    ("lora", {"targets": "all-linear"}, "bf16-mixed", True),
    ("lora", {"targets": "all-linear"}, "bf16-mixed", False),  # an untied output layer is a frozen linear too
    ("lora", {"dora": True}, "bf16-mixed", True),  # DoRA reads its targets' weights: those stay fp32
    ("adalora", {}, "bf16-mixed", True),
    ("ia3", {}, "bf16-mixed", False),
    ("prompt", {}, "bf16-mixed", True),
    ("adapter", {}, "bf16-mixed", False),
    ("full", {}, "bf16-mixed", True),  # trained weights keep their fp32 masters
    ("freeze", {"top_layers": 1}, "bf16-mixed", False),  # it saves the whole model: no dtype of it changes
    ("lora", {}, "fp32", False),
], ids=str)
def test_frozen_linears_are_stored_in_half_exactly_as_the_estimate_counts(
        method, method_args, precision, tied, tiny_model_dir, untied_model_dir):
    from app.memory import estimate as memory

    folder = tiny_model_dir if tied else untied_model_dir
    config = RunConfig(method=method, method_args=method_args, precision=precision)
    model, plan = load_for_training(folder, config, total_steps=20, device="cpu")
    halved = {n: p.numel() for n, p in model.named_parameters() if p.dtype == torch.bfloat16}
    assert all(not model.get_parameter(n).requires_grad for n in halved)
    inv = methods.build_inventory(load_config(str(folder), folder.parent))
    fp = methods.method_footprint(inv, method, method_args, plan, "cpu")
    assert sum(halved.values()) == memory.half_stored_params(inv, fp, plan)
    assert model.get_input_embeddings().weight.dtype == torch.float32  # the residual stream stays fp32
    if method in ("lora", "adalora") and precision == "bf16-mixed" and not method_args.get("dora"):
        assert halved, "every frozen linear of a LoRA run should be in bf16"
