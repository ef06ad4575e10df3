"""Data-parallel training: two CPU processes (gloo) under `accelerate launch` or torchrun train the run a single
process trains, with the model whole on every rank (ddp) or sharded by FSDP2 (fsdp)."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from app.training.dist import Dist, strategy_for
from app.runs.store import RunStore
from app.spec import RunConfig
from app.objectives.batches import Example, pack
from app.training.worker import TrainFailure, run_training, setup, shard
from tests.helpers import free_port, needs_gloo
from tests.test_train import write_rows

ROOT = Path(__file__).resolve().parent.parent


class FakeRank(Dist):
    def __init__(self, rank: int, world_size: int):
        self.rank, self.world_size = rank, world_size


def rows_of(n: int) -> list[Example]:
    return [Example([i, i + 1], [i + 1, -100]) for i in range(n)]


@pytest.mark.parametrize("rows, world, shares, weights", [
    (4, 1, [[0, 1, 2, 3]], [1.0]),
    (4, 2, [[0, 2], [1, 3]], [1.0, 1.0]),
    (5, 2, [[0, 2, 4], [1, 3]], [1.0, 1.0]),
    (1, 2, [[0], [0]], [1.0, 0.0]),  # rank 1 has no row: it runs rank 0's at weight 0 to join the all-reduce
    (2, 3, [[0], [1], [0]], [1.0, 1.0, 0.0]),
])
def test_every_row_of_a_batch_is_trained_once_across_ranks(rows, world, shares, weights):
    batch = pack(rows_of(rows))
    got = [shard(batch, FakeRank(r, world), pack) for r in range(world)]
    assert [[ex.input_ids[0] for ex in part.examples] for part, _ in got] == shares
    assert [w for _, w in got] == weights
    assert sum(part.n_targets * w for part, w in got) == batch.n_targets


def make_run(workspace, tiny_model_dir, dataset: Path, run_id: str, **overrides) -> tuple[RunStore, str]:
    # 16 training rows in batches of 5: step 4 is a batch of one row, so one rank trains at weight 0.
    # No dropout: its random masks would differ between one process and two.
    # 4 validation rows in batches of 5: one batch, so under fsdp rank 1 joins the forward unrecorded.
    settings = dict(model=str(tiny_model_dir), dataset=str(dataset), val_split=0.2, batch_size=5, cutoff_len=64,
                    max_steps=4, save_every=2, keep_last=5, eval_every=2, learning_rate=1e-3,
                    method_args={"dropout": 0.0}, run_id=run_id)
    config = RunConfig(**{**settings, **overrides})
    store = RunStore(workspace.runs)
    return store, store.create(config)


@pytest.mark.slow
@needs_gloo
def test_two_processes_train_like_one_and_only_rank_0_writes(workspace, tiny_model_dir, tmp_path):
    dataset = write_rows(tmp_path / "rows.jsonl", n=20)
    store, single = make_run(workspace, tiny_model_dir, dataset, "single")
    assert run_training(store.config_path(single)) == 0
    _, double = make_run(workspace, tiny_model_dir, dataset, "double")

    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                "--main_process_port", str(free_port())]
    proc = subprocess.run([*launcher, "launch.py", "train", str(store.config_path(double))], cwd=ROOT,
                          capture_output=True, text=True, timeout=180)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-3000:]  # the launcher exits 0 only when every rank did
    assert "2 processes" in output and "[rank 1]" not in output
    assert output.count("step 4/4 |") == 1  # rank 1 prints no progress lines

    status = store.status(double)
    assert (status.state, status.step, status.failure) == ("completed", 4, "")
    records = store.metrics(double)
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4]  # one writer: no duplicate lines
    assert [r["step"] for r in records if "eval_loss" in r] == [2, 4]
    assert [p.name for p in store.checkpoints(double)] == ["step-2", "step-4"]
    run_dir = store.dir(double)
    assert (store.final_dir(double) / "adapter_model.safetensors").is_file()
    assert not [p.name for p in run_dir.iterdir() if p.name.startswith(".")]  # no second writer's temp folders

    assert losses(store, double) == pytest.approx(losses(store, single), rel=1e-4)
    assert losses(store, double, "eval_loss") == pytest.approx(losses(store, single, "eval_loss"), rel=1e-4)
    tokens = [r["tokens"] for r in records if "loss" in r]
    assert tokens == [r["tokens"] for r in store.metrics(single) if "loss" in r]  # the same rows, counted once


def torchrun(run_yaml: Path, *extra: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
               str(free_port()), "launch.py", "train", str(run_yaml), *extra]
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=180)


def losses(store: RunStore, run_id: str, key: str = "loss") -> list[float]:
    return [r[key] for r in store.metrics(run_id) if key in r]


def tensors(folder: Path) -> dict:
    from safetensors.torch import load_file

    return {f"{f.name}:{k}": v for f in sorted(folder.glob("*.safetensors")) for k, v in load_file(f).items()}


def assert_same_weights(got: dict, want: dict, tol: float = 1e-4) -> None:
    assert {k: tuple(v.shape) for k, v in got.items()} == {k: tuple(v.shape) for k, v in want.items()}
    assert {k: v.dtype for k, v in got.items()} == {k: v.dtype for k, v in want.items()}
    for k in want:  # fp32 sums taken in another order: ~1e-6 apart after 4 steps; a wrong reduction moves 1e-3
        assert (got[k] - want[k]).abs().max() < tol, k


def config_files(folder: Path) -> dict:
    # PEFT writes target_modules from a set: its order changes from process to process
    def normal(text: str) -> dict:
        data = json.loads(text)
        return {k: sorted(v) if k == "target_modules" and isinstance(v, list) else v for k, v in data.items()}
    return {f.name: normal(f.read_text()) for f in sorted(folder.glob("*.json")) if f.name != "tokenizer.json"}


# The tolerance: one process and two add the same fp32 numbers in another order (per-rank sums, reduce-scatter),
# which moves a loss near 10.8 by ~1e-6 after 4 steps; a lost rank's rows, a gradient summed instead of
# averaged or a skipped shard moves it by more than 1e-3. rel=1e-4 sits between the two.
@pytest.mark.slow
@needs_gloo
@pytest.mark.parametrize("method, overrides, resume, tol", [
    # frozen and trainable weights in one FSDP unit; every file written by the sharded run
    ("lora", {"method_args": {"dropout": 0.0}}, False, 1e-4),
    # bf16-mixed: frozen linears stored in bf16 beside fp32 norms and embeddings in one FSDP unit. bf16 products
    # of other row splits round apart, which can flip a tiny gradient's sign: an Adam step (lr 1e-3) apart, no more
    ("lora", {"method_args": {"dropout": 0.0}, "precision": "bf16-mixed"}, False, 3e-3),
    # the tied embedding sharded at the root, gradients accumulated over 2 micro-batches, and the single-process
    # run's step-2 checkpoint resumed by two processes: weights and Adam state go into the shards (step 4's loss
    # follows step 3's update, which a fresh Adam state would change), step 4 and final/ are written sharded
    ("full", {"method_args": {}, "grad_accum": 2}, True, 1e-4),
])
def test_fsdp_two_processes_shard_train_like_one_and_save_whole_weights(workspace, tiny_model_dir, tmp_path,
                                                                        method, overrides, resume, tol):
    dataset = write_rows(tmp_path / "rows.jsonl", n=20)
    # strategy fsdp in one process: nothing to shard, it trains as ddp does
    store, single = make_run(workspace, tiny_model_dir, dataset, "single", method=method, strategy="fsdp", **overrides)
    assert run_training(store.config_path(single)) == 0
    if resume:  # the same run stopped after its step-2 checkpoint
        double = "double"
        shutil.copytree(store.dir(single), store.dir(double))
        shutil.rmtree(store.checkpoints_dir(double) / "step-4")
        shutil.rmtree(store.final_dir(double))
        proc = torchrun(store.config_path(double), "--resume")
    else:
        _, double = make_run(workspace, tiny_model_dir, dataset, "double", method=method, strategy="fsdp", **overrides)
        proc = torchrun(store.config_path(double))
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-3000:]  # torchrun exits 0 only when every rank did
    assert "fsdp: weights, gradients and optimizer state split between 2 processes" in output
    assert output.count("step 4/4 |") == 1 and "[rank 1]" not in output
    assert ("resuming from step-2" in output) == resume

    status = store.status(double)
    assert (status.state, status.step, status.failure) == ("completed", 4, "")
    assert [r["step"] for r in store.metrics(double) if "loss" in r] == [1, 2, 3, 4]  # rank 0 alone writes
    assert [p.name for p in store.checkpoints(double)] == ["step-2", "step-4"]
    assert not [p.name for p in store.dir(double).iterdir() if p.name.startswith(".")]
    assert losses(store, double) == pytest.approx(losses(store, single), rel=tol)
    assert losses(store, double, "eval_loss") == pytest.approx(losses(store, single, "eval_loss"), rel=tol)

    # checkpoints and final/ hold whole weights in the single-process format: same files, keys, shapes, values
    for step in ("step-2", "step-4"):
        assert_same_weights(tensors(store.checkpoints_dir(double) / step), tensors(store.checkpoints_dir(single) / step),
                            tol)
    final, final_single = store.final_dir(double), store.final_dir(single)
    assert sorted(p.name for p in final.iterdir()) == sorted(p.name for p in final_single.iterdir())
    assert config_files(final) == config_files(final_single)
    assert_same_weights(tensors(final), tensors(final_single), tol)

    from app.methods import load_trained
    from app.models import load_causal_lm

    model = load_trained(load_causal_lm(tiny_model_dir), method, final)  # as the Compare tab loads it
    assert sum(p.numel() for p in model.parameters()) > 0


@pytest.mark.parametrize("method, strategy, refused", [
    ("qlora", "fsdp", True),  # 4-bit weights are not plain tensors FSDP can split
    ("adalora", "fsdp", True),  # its rank update reads whole matrices between FSDP's forwards
    ("lora", "fsdp", False),
    ("adalora", "ddp", False),
])
def test_methods_fsdp_cannot_shard_are_refused_before_loading(workspace, tiny_model_dir, tmp_path, method, strategy,
                                                              refused):
    dataset = write_rows(tmp_path / "rows.jsonl", n=8)
    config = RunConfig(model=str(tiny_model_dir), dataset=str(dataset), method=method, strategy=strategy,
                       max_steps=10, cutoff_len=64)  # setup only plans the steps (AdaLoRA needs a few)
    # the refusal comes before any collective, so a rank of a pretend 2-process run shows it
    if refused:
        with pytest.raises(TrainFailure) as e:
            setup(config, workspace, lambda line: None, FakeRank(0, 2))
        assert e.value.kind == "error" and "cannot be sharded with FSDP" in e.value.reason
        assert "strategy to ddp" in e.value.reason
    else:
        assert setup(config, workspace, lambda line: None, FakeRank(0, 2)).model is not None


@pytest.mark.parametrize("configured, accelerate_use_fsdp, strategy", [
    ("ddp", None, "ddp"),
    ("fsdp", None, "fsdp"),
    ("ddp", "true", "fsdp"),  # `accelerate launch --use_fsdp` (or an FSDP accelerate config) shards the run
    ("ddp", "false", "ddp"),
    ("fsdp", "false", "fsdp"),  # run.yaml asked for fsdp: a launcher without it does not undo that
])
def test_the_launcher_can_ask_for_fsdp(monkeypatch, configured, accelerate_use_fsdp, strategy):
    if accelerate_use_fsdp is None:
        monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)
    else:
        monkeypatch.setenv("ACCELERATE_USE_FSDP", accelerate_use_fsdp)
    assert strategy_for(configured) == strategy
