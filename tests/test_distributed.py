"""Data-parallel training: two CPU processes (gloo) under `accelerate launch` train the run a single process trains."""
from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest

from app.dist import Dist
from app.runs import RunStore
from app.spec import RunConfig
from app.train import Example, pack, run_training, shard
from tests.test_train import write_rows

ROOT = Path(__file__).resolve().parent.parent


def gloo_available() -> bool:
    import torch.distributed as td

    return td.is_available() and td.is_gloo_available()


needs_gloo = pytest.mark.skipif(not gloo_available(), reason="torch.distributed with the gloo backend is not available")


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
    got = [shard(batch, FakeRank(r, world)) for r in range(world)]
    assert [[ex.input_ids[0] for ex in part.examples] for part, _ in got] == shares
    assert [w for _, w in got] == weights
    assert sum(part.n_targets * w for part, w in got) == batch.n_targets


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_run(workspace, tiny_model_dir, dataset: Path, run_id: str) -> tuple[RunStore, str]:
    # 16 training rows in batches of 5: step 4 is a batch of one row, so one rank trains at weight 0.
    # No dropout: its random masks would differ between one process and two.
    config = RunConfig(model=str(tiny_model_dir), dataset=str(dataset), val_split=0.2, batch_size=5, cutoff_len=64,
                       max_steps=4, save_every=2, keep_last=5, eval_every=2, learning_rate=1e-3,
                       method_args={"dropout": 0.0}, run_id=run_id)
    store = RunStore(workspace.runs)
    return store, store.create(config)


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

    def losses(run_id: str, key: str) -> list[float]:
        return [r[key] for r in store.metrics(run_id) if key in r]

    assert losses(double, "loss") == pytest.approx(losses(single, "loss"), rel=1e-4)
    assert losses(double, "eval_loss") == pytest.approx(losses(single, "eval_loss"), rel=1e-4)
    tokens = [r["tokens"] for r in records if "loss" in r]
    assert tokens == [r["tokens"] for r in store.metrics(single) if "loss" in r]  # the same rows, counted once
