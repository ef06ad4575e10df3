"""Export run: the exported folder alone (data and model copied, original files gone) reproduces the run."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

import launch
from app.runs.export import ExportError
from app.runs.export_run import export_run
from app.runs.store import RunNotFound, RunStore
from app.spec import RunConfig
from tests.test_train import write_rows


@pytest.fixture
def trained_run(workspace, tiny_model_dir, tmp_path):
    """A completed tiny run whose dataset and model live outside the workspace, as a user's uploads do."""
    (tmp_path / "source").mkdir()
    dataset = write_rows(tmp_path / "source" / "rows.jsonl", n=12)
    model = shutil.copytree(tiny_model_dir, tmp_path / "source" / "tiny")
    store = RunStore(workspace.runs)
    run_id = store.create(RunConfig(model=str(model), dataset=str(dataset), batch_size=4, cutoff_len=64, max_steps=3,
                                    save_every=0, learning_rate=1e-3, method_args={"dropout": 0.0}, run_id="orig"))
    assert launch.main(["train", str(store.config_path(run_id))]) == 0
    return store, run_id, tmp_path / "source"


def final_loss(metrics: list[dict]) -> float:
    return [r["loss"] for r in metrics if "loss" in r][-1]


def test_exported_folder_reproduces_the_run_with_the_originals_gone(trained_run, tmp_path, capsys):
    store, run_id, source = trained_run
    dest = tmp_path / "elsewhere" / "exported"
    assert launch.main(["export-run", run_id, str(dest), "--workspace", str(store.root.parent)]) == 0
    assert str(dest) in capsys.readouterr().out
    assert sorted(p.name for p in dest.iterdir()) == ["README.md", "data", "model", "run.yaml"]
    written = yaml.safe_load((dest / "run.yaml").read_text())
    assert (written["dataset"], written["model"]) == ("data/rows.jsonl", "model")
    readme = (dest / "README.md").read_text()
    for command in ("python launch.py train $RUN/run.yaml", "accelerate launch --multi_gpu --num_processes 4",
                    "--num_machines 2 --machine_rank 0", "--main_process_ip", "--main_process_port"):
        assert command in readme

    shutil.rmtree(source)  # a fresh machine has only the exported folder
    moved = shutil.move(dest, tmp_path / "moved")  # and it may sit at another path there
    assert launch.main(["train", str(Path(moved) / "run.yaml")]) == 0
    again = RunStore(Path(moved).parent)
    assert again.status("moved").state == "completed"
    assert final_loss(again.metrics("moved")) == pytest.approx(final_loss(store.metrics(run_id)), rel=1e-5)
    assert (Path(moved) / "final" / "adapter_model.safetensors").is_file()


@pytest.mark.parametrize("case, error, words", [
    ("no-such-run", RunNotFound, ""),
    ("dest-not-empty", ExportError, "not an empty folder"),
    ("dest-is-a-file", ExportError, "not an empty folder"),
    ("dataset-gone", ExportError, "is gone"),
])
def test_export_refuses_what_it_cannot_do_and_leaves_nothing(workspace, tmp_path, case, error, words):
    dataset = write_rows(tmp_path / "rows.jsonl", n=2)
    store = RunStore(workspace.runs)
    run_id = store.create(RunConfig(dataset=str(dataset), run_id="r1"))
    dest = tmp_path / "out"
    if case == "dest-not-empty":
        dest.mkdir()
        (dest / "keep.txt").write_text("mine")
    elif case == "dest-is-a-file":
        dest.write_text("mine")
    elif case == "dataset-gone":
        dataset.unlink()
    with pytest.raises(error, match=words or None):
        export_run(store, "nope" if case == "no-such-run" else run_id, dest)
    assert not dest.exists() or case in ("dest-not-empty", "dest-is-a-file")
    assert case != "dest-not-empty" or [p.name for p in dest.iterdir()] == ["keep.txt"]


@pytest.mark.parametrize("gpus, strategy, present, absent", [
    (1, "ddp", ["--num_processes 4 launch.py", "(DDP, data parallel)", "--num_processes 8 \\", "2 machines x 4 GPUs"],
     ["FSDP, sharded", "ran this run on"]),
    (2, "fsdp", ["--num_processes 2 launch.py", "## Several GPUs on one machine (FSDP, sharded)", "`strategy: fsdp`",
                 "--num_processes 4 \\", "ran this run on 2 GPUs", "same as above (FSDP, sharded)"],
     ["--num_processes 8", "DDP, data parallel"]),
    (8, "ddp", ["--num_processes 8 launch.py", "--nproc_per_node 8 ", "--num_processes 16 \\", "ran this run on 8 GPUs"],
     ["FSDP, sharded", "--num_processes 4"]),
])
def test_readme_commands_follow_the_runs_gpus_and_strategy(workspace, tmp_path, gpus, strategy, present, absent):
    store = RunStore(workspace.runs)
    dataset = write_rows(tmp_path / "rows.jsonl", n=2)
    run_id = store.create(RunConfig(dataset=str(dataset), run_id="r1", gpus=gpus, strategy=strategy))
    dest = export_run(store, run_id, tmp_path / "out")
    written = RunConfig.from_yaml(dest / "run.yaml")
    assert (written.gpus, written.strategy) == (gpus, strategy)
    readme = (dest / "README.md").read_text()
    assert "python launch.py train $RUN/run.yaml\n" in readme  # the one-process command stays plain
    assert [p for p in present if p not in readme] == [] and [a for a in absent if a in readme] == []


@pytest.mark.parametrize("argv, code, words", [
    (["export-run", "nope", "OUT"], 2, "no run 'nope'"),
    (["export-run", "r1", "FILE"], 1, "not an empty folder"),
])
def test_export_run_command_exit_codes(workspace, tmp_path, capsys, argv, code, words):
    store = RunStore(workspace.runs)
    store.create(RunConfig(dataset=str(write_rows(tmp_path / "rows.jsonl", n=2)), run_id="r1"))
    (tmp_path / "FILE").write_text("x")
    argv = [str(tmp_path / a) if a in ("OUT", "FILE") else a for a in argv]
    assert launch.main([*argv, "--workspace", str(workspace.root)]) == code
    assert words in capsys.readouterr().err
