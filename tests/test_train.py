"""The training worker on a tiny model: status, metrics, checkpoints, stop, resume, kills and every failure kind."""
from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError

import launch
from app.runs.store import RunStore
from app.spec import RunConfig
from app.presets import PRESETS_DIR, config_from_preset, load_preset
from app.objectives.batches import Example, pack
from app.training.checkpoints import Checkpointer
from app.training.worker import run_training
from tests.helpers import wait_for

ROOT = Path(__file__).resolve().parent.parent
METRIC_KEYS = {"step", "epoch", "loss", "lr", "tokens", "tokens_per_s", "elapsed", "mem_bytes"}


def write_rows(path: Path, n: int = 24) -> Path:
    topics = ["tides", "bread", "maps", "stars", "rope", "sails"]
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            t = topics[i % len(topics)]
            f.write(json.dumps({"instruction": f"Tell me about {t} ({i}).", "input": "",
                                "output": f"Arr, {t} be fine things, matey, number {i} of them. " * (1 + i % 3)}) + "\n")
    return path


@pytest.fixture
def rows_file(tmp_path: Path) -> Path:
    return write_rows(tmp_path / "rows.jsonl")


def new_run(workspace, tiny_model_dir, dataset, **overrides) -> tuple[RunStore, str]:
    settings = dict(model=str(tiny_model_dir), dataset=str(dataset), batch_size=4, cutoff_len=64, max_steps=6,
                    save_every=2, keep_last=2, eval_every=3, learning_rate=1e-3, val_split=0.2)
    store = RunStore(workspace.runs)
    return store, store.create(RunConfig(**{**settings, **overrides}))


class StopAfter:
    """A stop flag that turns on after `n` checks (the loop checks once per step): a deterministic Stop."""

    def __init__(self, n: int):
        self.n = n

    @property
    def requested(self) -> bool:
        self.n -= 1
        return self.n < 0


def train_losses(store: RunStore, run_id: str) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in store.metrics(run_id) if "loss" in r}


@pytest.fixture
def worker():
    """Start `launch.py train RUN.yaml` as the UI does; a worker a failing test left running is killed."""
    started = []

    def start(store: RunStore, run_id: str, *args: str) -> subprocess.Popen:
        with open(store.log_path(run_id), "a") as log:
            proc = subprocess.Popen([sys.executable, "launch.py", "train", str(store.config_path(run_id)), *args],
                                    cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        started.append(proc)
        return proc

    yield start
    for proc in started:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_run_completes_with_status_metrics_checkpoints_and_final(workspace, tiny_model_dir, rows_file):
    store, run_id = new_run(workspace, tiny_model_dir, rows_file)
    assert run_training(store.config_path(run_id)) == 0
    status = store.status(run_id)
    assert (status.state, status.step, status.total_steps, status.failure) == ("completed", 6, 6, "")
    assert status.pid == os.getpid() and status.started and status.finished and status.peak_memory_bytes > 0
    records = store.metrics(run_id)
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4, 5, 6] and all(METRIC_KEYS <= r.keys() for r in steps)
    assert all(b["tokens"] > a["tokens"] for a, b in zip(steps, steps[1:]))
    assert [r["step"] for r in records if "eval_loss" in r] == [3, 6]
    assert [p.name for p in store.checkpoints(run_id)] == ["step-4", "step-6"]  # keep_last=2
    final = store.final_dir(run_id)
    assert (final / "adapter_model.safetensors").is_file() and (final / "tokenizer_config.json").is_file()


def test_tokens_counted_are_real_tokens_and_packing_has_no_padding():
    batch = pack([Example([5, 6, 7], [6, 7, -100]), Example([8, 9], [-100, -100]), Example([1, 2, 3, 4], [-100, 3, 4, -100])])
    assert batch.input_ids.tolist() == [[5, 6, 7, 8, 9, 1, 2, 3, 4]]
    assert batch.position_ids.tolist() == [[0, 1, 2, 0, 1, 0, 1, 2, 3]]
    assert batch.cu_seqlens.tolist() == [0, 3, 5, 9]
    assert (batch.n_tokens, batch.n_targets, batch.keep.tolist(), batch.kept_targets.tolist()) == (9, 4, [0, 1, 6, 7], [6, 7, 3, 4])


@pytest.mark.parametrize("method, packs", [
    ("lora", True), ("ia3", True), ("adapter", True), ("full", True),
    ("prefix", False), ("prompt", False), ("adalora", False),  # virtual tokens / an extra loss term: padded batches
])
def test_packed_loss_equals_padded_loss(tiny_model_dir, rows_file, method, packs):
    """Packing and lm_head-only-at-labels change the speed, not the loss; methods that cannot pack are detected."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from app.data.dataset import load_training_rows
    from app.methods import get_method, prepare_model
    from app.training.attention import can_pack, register_varlen_attention
    from app.objectives.batches import pack
    from app.objectives.sft import loss_sum, tokenize_rows
    from app.training.plan import batches_of

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    batch = batches_of(tokenize_rows(tok, load_training_rows(rows_file)[:4], 64, False), 4, pack)[0]
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="sdpa")
    model = prepare_model(base, method, get_method(method).args(), total_steps=10).eval()
    assert can_pack(model, 64) == packs
    if not packs:
        return
    torch.manual_seed(0)
    with torch.no_grad():  # adapters start as a no-op (LoRA's B = 0): give them weights so their path counts
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.02)
    padded = loss_sum(model, batch, packed=False, device=torch.device("cpu"), pad_id=tok.pad_token_id)
    register_varlen_attention()
    base.set_attn_implementation("varlen_sdpa")
    packed = loss_sum(model, batch, packed=True, device=torch.device("cpu"), pad_id=tok.pad_token_id)
    assert torch.allclose(packed, padded, rtol=1e-5)


def _attention_inputs(device: str, dtype, kv_heads: int):
    torch.manual_seed(0)
    lengths = [5, 17, 9]
    q = torch.randn(1, 4, sum(lengths), 32, device=device, dtype=dtype, requires_grad=True)
    k, v = (torch.randn(1, kv_heads, sum(lengths), 32, device=device, dtype=dtype, requires_grad=True) for _ in "kv")
    bounds = torch.tensor([0, 5, 22, 31], dtype=torch.int32)
    return q, k, v, bounds


class _Layer(torch.nn.Module):
    pass


def test_flash_varlen_falls_back_to_per_row_attention_where_it_cannot_run():
    """On a CPU (or in fp32) varlen_sdpa takes the per-row path; a failing flash call turns flash off, once."""
    from app.training.attention import _FlashVarlen, varlen_sdpa

    q, k, v, bounds = _attention_inputs("cpu", torch.float32, 2)
    flash = _FlashVarlen()
    assert not flash.usable(q)
    assert flash(q.bfloat16(), k.bfloat16(), v.bfloat16(), bounds, None, None) is None  # no CPU kernel
    assert flash.enabled is False and not flash.usable(q.bfloat16())
    out, _ = varlen_sdpa(_Layer(), q, k, v, None, cu_seq_lens_q=bounds)
    row = torch.nn.functional.scaled_dot_product_attention(q[:, :, 5:22], k[:, :, 5:22], v[:, :, 5:22], is_causal=True,
                                                           enable_gqa=True)
    assert torch.allclose(out[:, 5:22], row.transpose(1, 2), atol=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("kv_heads", [4, 2])  # plain and grouped-query attention
def test_flash_varlen_matches_per_row_attention_on_gpu(kv_heads, monkeypatch):
    from app.training import attention
    from app.training.attention import _FlashVarlen, varlen_sdpa

    q, k, v, bounds = _attention_inputs("cuda", torch.bfloat16, kv_heads)
    flash = _FlashVarlen()
    fast = flash(q, k, v, bounds, None, 32 ** -0.5)
    assert fast is not None and flash.enabled, "torch's varlen flash attention did not run on this GPU"
    q2, k2, v2 = (t.detach().clone().requires_grad_() for t in (q, k, v))
    monkeypatch.setattr(attention._FLASH, "enabled", False)  # the per-row path, for reference
    slow, _ = varlen_sdpa(_Layer(), q2, k2, v2, None, scaling=32 ** -0.5, cu_seq_lens_q=bounds)
    assert torch.allclose(fast.float(), slow.float(), atol=2e-2)
    grad = torch.randn_like(slow)
    fast.backward(grad)
    slow.backward(grad)
    for a, b in ((q, q2), (k, k2), (v, v2)):
        assert torch.allclose(a.grad.float(), b.grad.float(), atol=5e-2)


def test_resume_reaches_the_same_loss_curve(workspace, tiny_model_dir, rows_file):
    store, straight = new_run(workspace, tiny_model_dir, rows_file, run_id="straight")
    assert run_training(store.config_path(straight)) == 0
    _, split = new_run(workspace, tiny_model_dir, rows_file, run_id="split")
    assert run_training(store.config_path(split), stop=StopAfter(3)) == 0  # stops after step 3 (saves step-3)
    assert store.status(split).state == "stopped" and [p.name for p in store.checkpoints(split)][-1] == "step-3"
    # a line past the checkpoint (as a killed worker leaves) must not survive the resume
    store.append_metric(split, {"step": 4, "loss": 99.0})
    assert run_training(store.config_path(split), resume=True) == 0
    assert store.status(split).state == "completed"
    assert [r["step"] for r in store.metrics(split) if "loss" in r] == [1, 2, 3, 4, 5, 6]
    assert train_losses(store, split) == pytest.approx(train_losses(store, straight), rel=1e-5)


@pytest.mark.slow
def test_sigterm_stops_with_a_checkpoint_and_final(workspace, tiny_model_dir, rows_file, worker):
    store, run_id = new_run(workspace, tiny_model_dir, rows_file, max_steps=100_000, save_every=1000)
    proc = worker(store, run_id)
    wait_for(lambda: store.status(run_id).step >= 2, timeout=120, every=0.1)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 0
    status = store.status(run_id)
    assert status.state == "stopped" and status.step >= 2
    assert store.checkpoints(run_id)[-1].name == f"step-{status.step}"
    assert (store.final_dir(run_id) / "adapter_model.safetensors").is_file()


@pytest.mark.slow
def test_sigkill_leaves_last_checkpoint_usable_and_resume_finishes(workspace, tiny_model_dir, rows_file, worker):
    store, run_id = new_run(workspace, tiny_model_dir, rows_file, max_steps=400, save_every=2, eval_every=0)
    proc = worker(store, run_id)
    wait_for(lambda: len(store.checkpoints(run_id)) >= 2, timeout=120, every=0.1)
    proc.kill()
    proc.wait(timeout=30)
    last = store.checkpoints(run_id)[-1]
    weights, state = Checkpointer.load(last)  # whole, despite the kill
    assert state["step"] == int(last.name.split("-")[1]) and weights
    assert store.recorded_status(run_id).state == "running"  # the UI's watcher, not the dead worker, records it
    assert (store.status(run_id).state, store.status(run_id).failure) == ("failed", "killed")  # every reader sees it
    killed_at = max(train_losses(store, run_id))
    config = store.config(run_id)
    config.max_steps = killed_at + 3  # keep the test short: finish soon after the kill
    (store.config_path(run_id)).write_text(config.to_yaml())
    assert run_training(store.config_path(run_id), resume=True) == 0
    steps = [r["step"] for r in store.metrics(run_id) if "loss" in r]
    assert steps == list(range(1, killed_at + 4))  # continued from the checkpoint, no duplicates
    assert store.status(run_id).state == "completed"


MISSING = object()


@pytest.mark.parametrize("dataset_text, overrides, kind, words", [
    (None, dict(learning_rate=1e9, optimizer="sgd", max_grad_norm=0), "nan", "diverged"),
    ("", {}, "data", ""),
    (MISSING, {}, "data", "does not exist"),
    ("{not json at all\n", {}, "data", ""),
    ('{"instruction": "hi", "input": "", "output": ""}\n' * 3, {}, "data", ""),
    (None, dict(cutoff_len=8), "data", "cutoff length"),
    (None, dict(model="/nonexistent/model"), "error", "neither a model folder"),
])
def test_failures_end_as_failed_with_kind_and_reason(workspace, tiny_model_dir, rows_file, tmp_path, dataset_text,
                                                     overrides, kind, words):
    dataset = rows_file if dataset_text is None else tmp_path / "bad.jsonl"
    if isinstance(dataset_text, str):
        dataset.write_text(dataset_text)
    store, run_id = new_run(workspace, tiny_model_dir, dataset, **overrides)
    assert run_training(store.config_path(run_id)) == 1
    status = store.status(run_id)
    assert (status.state, status.failure) == ("failed", kind), status.reason
    assert words in status.reason and status.finished


def test_out_of_memory_names_estimate_and_measured_peak(workspace, tiny_model_dir, rows_file, monkeypatch):
    from dataclasses import replace

    from app.objectives import OBJECTIVES

    def oom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setitem(OBJECTIVES, "sft", replace(OBJECTIVES["sft"], loss_sum=oom))
    store, run_id = new_run(workspace, tiny_model_dir, rows_file, estimate={"total_bytes": 3 * 1024 ** 3})
    assert run_training(store.config_path(run_id)) == 1
    status = store.status(run_id)
    assert status.failure == "oom" and "estimate before the run: 3.0 GiB" in status.reason and "Measured peak" in status.reason


# --- one writer per run ----------------------------------------------------------------------------------------
@pytest.mark.slow
def test_a_second_worker_is_refused_and_a_killed_workers_lock_taken_over(workspace, tiny_model_dir, rows_file, worker):
    """Two real `launch.py train` processes on one run: the second (the Train tab's --resume command, typed while
    the first trains) is refused, naming the first, and touches nothing; once the first is killed its lock is
    stale, every reader sees the run failed, and the next worker takes the lock over and finishes the run."""
    store, run_id = new_run(workspace, tiny_model_dir, rows_file, max_steps=100_000, save_every=2, eval_every=0)
    first = worker(store, run_id)
    wait_for(lambda: len(store.checkpoints(run_id)) >= 1, timeout=120, every=0.1)
    second = worker(store, run_id, "--resume")
    assert second.wait(timeout=60) == 3
    assert f"is already being trained by process {first.pid} (running since " in store.log_tail(run_id)
    status = store.status(run_id)
    assert (status.state, status.pid, first.poll()) == ("running", first.pid, None)
    first.kill()
    first.wait(timeout=30)
    steps = [r["step"] for r in store.metrics(run_id) if "loss" in r]
    assert steps == list(range(1, len(steps) + 1))  # one writer: no step twice
    assert store.lock_path(run_id).is_file() and store.status(run_id).state == "failed"

    config = store.config(run_id)
    config.max_steps = int(store.checkpoints(run_id)[-1].name.split("-")[1]) + 2  # finish soon
    store.config_path(run_id).write_text(config.to_yaml())
    assert run_training(store.config_path(run_id), resume=True) == 0
    assert store.status(run_id).state == "completed" and not store.lock_path(run_id).exists()
    assert [r["step"] for r in store.metrics(run_id) if "loss" in r] == list(range(1, config.max_steps + 1))


# --- a full disk ---------------------------------------------------------------------------------------------------
TORCH_SHORT_WRITE = "[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598"  # torch.save, a full tmpfs


def raised_from(error: Exception, cause: Exception) -> Exception:
    error.__cause__ = cause
    return error


@pytest.mark.parametrize("error, full", [
    (OSError(errno.ENOSPC, "No space left on device"), True),
    (OSError(errno.EDQUOT, "Disk quota exceeded"), True),
    (RuntimeError(TORCH_SHORT_WRITE), True),
    (RuntimeError("basic_ios::clear: iostream error"), True),  # torch.save of a small object on a full disk
    (RuntimeError("[enforce fail at inline_container.cc:597] . PytorchStreamWriter failed writing file data/0: file "
                  "write failed"), True),
    (SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)"), True),
    (raised_from(RuntimeError("saving failed"), OSError(errno.ENOSPC, "No space left on device")), True),
    (OSError(errno.EACCES, "Permission denied"), False),
    (RuntimeError("unexpected position in the stream"), False),
    (ValueError("unexpected pos 3"), False),  # torch's words, but not from torch's writer
    (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), False),
])
def test_a_full_disk_is_recognised_whichever_writer_says_it(error, full):
    from app.runs.store import is_disk_full

    assert is_disk_full(error) == full


@pytest.mark.parametrize("writer, error", [
    ("torch.save", OSError(errno.ENOSPC, "No space left on device")),
    ("torch.save", RuntimeError(TORCH_SHORT_WRITE)),
    ("torch.save", RuntimeError("basic_ios::clear: iostream error")),
    ("save_file", SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")),
], ids=["oserror", "torch-pos", "torch-ios", "safetensors"])
def test_full_disk_while_saving_keeps_the_previous_checkpoint(workspace, tiny_model_dir, rows_file, monkeypatch,
                                                              writer, error):
    import safetensors.torch

    import app.training.checkpoints

    module, name = {"torch.save": (app.training.checkpoints.torch, "save"), "save_file": (safetensors.torch, "save_file")}[writer]
    real_save, calls = getattr(module, name), []

    def save_until_disk_full(obj, path, *a, **k):
        calls.append(path)
        if len(calls) == 2:
            raise error
        return real_save(obj, path, *a, **k)

    monkeypatch.setattr(module, name, save_until_disk_full)
    store, run_id = new_run(workspace, tiny_model_dir, rows_file)
    assert run_training(store.config_path(run_id)) == 1
    status = store.status(run_id)
    assert status.failure == "disk", status.reason
    assert "Could not save the checkpoint at step 4: the disk is full" in status.reason
    assert "(step-2) is intact" in status.reason and "Free space" in status.reason
    assert str(store.checkpoints_dir(run_id)) in status.reason
    assert [p.name for p in store.checkpoints(run_id)] == ["step-2"]
    assert not list(store.checkpoints_dir(run_id).glob(".step-*"))  # the half-written folder is gone


def test_a_checkpoint_the_disk_cannot_hold_is_refused_before_writing(workspace, tiny_model_dir, rows_file, monkeypatch):
    import app.training.checkpoints

    writes = []
    monkeypatch.setattr(app.training.checkpoints, "free_bytes", lambda path: 5_000_000)
    monkeypatch.setattr(app.training.checkpoints.torch, "save", lambda *a, **k: writes.append(a))
    store, run_id = new_run(workspace, tiny_model_dir, rows_file)
    assert run_training(store.config_path(run_id)) == 1
    status = store.status(run_id)
    assert status.failure == "disk" and "MB, 5 MB are free" in status.reason and "Free space" in status.reason
    assert writes == [] and list(store.checkpoints_dir(run_id).glob("*")) == []


def test_a_finished_run_keeps_its_final_weights_when_no_last_checkpoint_fits(workspace, tiny_model_dir, rows_file,
                                                                             monkeypatch, capsys):
    """The end-of-run checkpoint (weights and optimizer state) is for resuming; final/ is what the run is for."""
    import app.training.checkpoints

    monkeypatch.setattr(app.training.checkpoints, "free_bytes", lambda path: 5_000_000)
    store, run_id = new_run(workspace, tiny_model_dir, rows_file, save_every=0, eval_every=0, max_steps=2)
    assert run_training(store.config_path(run_id)) == 0
    assert store.status(run_id).state == "completed" and store.checkpoints(run_id) == []
    assert any(store.final_dir(run_id).iterdir())
    assert "no room for a last checkpoint at step 2; saving the final weights without it" in capsys.readouterr().out


def test_a_killed_workers_half_checkpoint_does_not_count_against_the_space(tmp_path, monkeypatch):
    import app.training.checkpoints as checkpoints

    root = tmp_path / "checkpoints"
    stale = root / ".step-4.tmp-999999"
    stale.mkdir(parents=True)
    (stale / "adapter.safetensors").write_bytes(b"x" * 3_000_000)

    def free(path):  # a 1 MB checkpoint needs about 18 MB with the headroom: 20 MB free, 17 MB with the stale one
        return 20_000_000 - (3_000_000 if stale.exists() else 0)

    monkeypatch.setattr(checkpoints, "free_bytes", free)
    saved = checkpoints.Checkpointer(root, keep_last=2).save(6, {"w": torch.zeros(250_000)}, {"step": 6})
    assert saved.name == "step-6" and not stale.exists()


@pytest.mark.parametrize("in_place", [True, False])
def test_a_disk_that_fills_mid_run_is_recorded_as_disk_full(workspace, tiny_model_dir, rows_file, monkeypatch, capsys,
                                                            in_place):
    """At step 3 the disk fills: a metrics line finds no room, and neither does the temporary file of an atomic
    status write. The failure is still recorded, in place; where even that fails the worker exits 1, saying so."""
    import tempfile

    from app.runs import store as run_store

    full = []
    real_mkstemp, real_append = tempfile.mkstemp, RunStore.append_metric

    def no_room(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    def mkstemp(*args, **kwargs):
        return no_room() if full else real_mkstemp(*args, **kwargs)

    def append_metric(self, run_id, record):
        if record.get("step", 0) >= 3:
            full.append(True)
            raise OSError(errno.ENOSPC, "No space left on device")
        real_append(self, run_id, record)

    monkeypatch.setattr(tempfile, "mkstemp", mkstemp)
    monkeypatch.setattr(RunStore, "append_metric", append_metric)
    if not in_place:
        monkeypatch.setattr(run_store, "write_in_place", no_room)
    store, run_id = new_run(workspace, tiny_model_dir, rows_file)
    assert run_training(store.config_path(run_id)) == 1
    status = store.recorded_status(run_id)
    if in_place:
        assert (status.state, status.failure) == ("failed", "disk")
        assert "Training stopped: the disk is full (No space left on device)" in status.reason
        assert "(step-2) is intact" in status.reason
    else:
        assert status.state == "running"  # left for its readers to see the worker gone (test_run_lock)
        assert "could not record the failure in status.json" in capsys.readouterr().err


@pytest.mark.parametrize("text, words", [
    ("model: [unclosed", "not valid YAML"),
    ("dataset: x.jsonl\nbogus_field: 1\n", "bogus_field"),
    ("dataset: x.jsonl\nprecision: fp8\n", "precision='fp8'"),
    ("dataset: x.jsonl\nmethod: nonsense\n", "unknown method"),
    ("dataset: x.jsonl\nmethod: lora\nmethod_args: {r: 0}\n", "r=0"),
])
def test_bad_run_yaml_exits_2_with_a_clear_message(tmp_path, capsys, text, words):
    run_dir = tmp_path / "ws" / "runs" / "bad"
    run_dir.mkdir(parents=True)
    (run_dir / "run.yaml").write_text(text)
    assert launch.main(["train", str(run_dir / "run.yaml")]) == 2
    assert words in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["train"], ["train", "x.yaml", "--preset", "quick-demo"], ["train", "--preset", "no-such-preset"]])
def test_train_usage_errors_exit_2(argv, capsys):
    assert launch.main(argv) == 2
    assert "error:" in capsys.readouterr().err


def test_quick_demo_preset_headless_with_overrides(tmp_path, tiny_model_dir, capsys):
    code = launch.main(["train", "--preset", "quick-demo", "--workspace", str(tmp_path / "ws"),
                        "--model", str(tiny_model_dir), "--max-steps", "2"])
    assert code == 0
    out = capsys.readouterr().out
    assert "step 2/2" in out and "completed" in out
    store = RunStore(tmp_path / "ws" / "runs")
    (run_id,) = store.list_ids()
    config = store.config(run_id)
    assert (config.model, config.max_steps, config.method) == (str(tiny_model_dir), 2, "lora")
    assert Path(config.dataset).is_file() and store.status(run_id).state == "completed"
    assert "step 2/2" in store.log_path(run_id).read_text()


@pytest.mark.parametrize("preset", sorted(p.stem for p in PRESETS_DIR.glob("*.yaml")))
def test_every_shipped_preset_gives_a_valid_run_config(preset, tmp_path):
    """`--preset NAME` takes any file in presets/ (the method presets name no dataset: --dataset fills it in)."""
    values = load_preset(preset)
    assert values and set(values) <= set(RunConfig.__dataclass_fields__), f"{preset}: unknown fields"
    config = config_from_preset(preset, {"dataset": values.get("dataset") or str(write_rows(tmp_path / "d.jsonl", 2))})
    assert Path(config.dataset).is_file()


def test_quick_demo_preset_is_the_demo_path_and_only_differences_commented():
    values = load_preset("quick-demo")
    assert values.get("model", "embedded") == "embedded" and values.get("method", "lora") == "lora"
    assert values["dataset"] == "assets/datasets/pirate-persona.jsonl"
    assert values.get("method_args", {}).get("r", 8) == 8
    defaults = RunConfig().to_dict()
    assert not [k for k in values if values[k] == defaults[k]], "the preset repeats a default"
    settings = [line for line in (PRESETS_DIR / "quick-demo.yaml").read_text().splitlines() if line and line[0] not in "# "]
    assert len(settings) == len(values) and all("  # " in line for line in settings), "a setting without its comment"


@pytest.mark.slow
@pytest.mark.parametrize("method, method_args", [
    ("lora", {"targets": "all-linear"}), ("lora", {"dora": True}), ("ia3", {}), ("adapter", {}),
], ids=str)
def test_half_stored_frozen_linears_train_bit_for_bit_as_fp32_ones(workspace, tiny_model_dir, rows_file, monkeypatch,
                                                                    method, method_args):
    """Under bf16-mixed an adapter run stores its frozen linears in bf16 (autocast would cast them for every matmul
    anyway): the losses must be identical to the last bit to keeping them in fp32."""
    from app.training import loading

    curves = []
    for convert in (True, False):
        if not convert:
            monkeypatch.setattr(loading, "store_frozen_linears_in", lambda model, dtype: 0)
        store, run_id = new_run(workspace, tiny_model_dir, rows_file, method=method, method_args=method_args,
                                precision="bf16-mixed", max_steps=3, save_every=0)
        assert run_training(store.config_path(run_id)) == 0
        curves.append([(r.get("loss"), r.get("eval_loss")) for r in store.metrics(run_id)])
    assert curves[0] == curves[1]


def test_a_lock_that_cannot_be_written_is_said_plainly(workspace, tiny_model_dir, rows_file, monkeypatch, capsys):
    from app.runs.store import RunLock

    def no_room(self):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(RunLock, "acquire", no_room)
    store, run_id = new_run(workspace, tiny_model_dir, rows_file)
    assert run_training(store.config_path(run_id)) == 1
    err = capsys.readouterr().err
    assert "cannot take the run's lock" in err and "the disk is full" in err and "Traceback" not in err
