"""Export run: a self-contained folder (run.yaml, its data, the commands) that trains the same run on other hardware.

The folder is itself a run folder: `python launch.py train FOLDER/run.yaml` from a workbench checkout trains it and
writes status, metrics, checkpoints and final/ next to run.yaml. Paths inside run.yaml are relative to the folder
(`app.training.worker.near_run_yaml` resolves them), so it can be copied anywhere, or to every machine of a multi-node run.
"""
from __future__ import annotations

import shutil
from pathlib import Path

from app.runs.export import ExportError
from app.runs.store import RunStore
from app.spec import RunConfig
from app.workspace import atomic_write_text

DATA_DIR, MODEL_DIR = "data", "model"


def export_run(store: RunStore, run_id: str, dest: str | Path) -> Path:
    """Write the run's folder at `dest` (new or empty) and return it. A local model folder is copied along
    (another machine has no copy of it); the embedded model and hub ids travel as their names."""
    config = store.config(run_id)
    dest = Path(dest).expanduser().resolve()
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise ExportError(f"{dest} already exists and is not an empty folder: choose a new destination")
    sources = {name: getattr(config, name) for name in ("dataset", "val_dataset") if getattr(config, name)}
    for name, path in sources.items():
        if not Path(path).is_file():
            raise ExportError(f"the run's {name} file {path} is gone: nothing to copy into the export")

    dest.mkdir(parents=True, exist_ok=True)
    try:
        for name, path in sources.items():
            copy = Path(DATA_DIR) / f"{'val-' if name == 'val_dataset' else ''}{Path(path).name}"
            (dest / copy).parent.mkdir(exist_ok=True)
            shutil.copy2(path, dest / copy)
            setattr(config, name, copy.as_posix())
        if Path(config.model).expanduser().is_dir():
            shutil.copytree(Path(config.model).expanduser(), dest / MODEL_DIR)
            config.model = MODEL_DIR
        atomic_write_text(dest / "run.yaml", config.to_yaml())
        atomic_write_text(dest / "README.md", readme(run_id, config, dest))
    except BaseException:
        shutil.rmtree(dest, ignore_errors=True)  # no half-written export is left to be mistaken for a whole one
        raise
    return dest


def readme(run_id: str, config: RunConfig, dest: Path) -> str:
    model = config.model
    model_note = {
        MODEL_DIR: "The model is in `model/` (copied from the original machine).",
        "embedded": "The model is the workbench's embedded SmolLM2-135M-Instruct (`python launch.py provision` "
                    "prepares it once).",
    }.get(model, f"The model is `{model}`: a hub id, fetched on first use (or pre-downloaded where offline).")
    # the run's own GPU count where it had several; else 4, an example to change
    gpus = config.gpus if config.gpus > 1 else 4
    if config.strategy == "fsdp":
        strategy_name = "FSDP, sharded"
        strategy_note = ("The run uses FSDP (`strategy: fsdp` in `run.yaml`): the weights, gradients and optimizer "
                         "state are split between the GPUs, for a model that does not fit on one. Set `strategy: ddp` "
                         "for a full copy on each GPU, which is faster when the model fits.")
    else:
        strategy_name = "DDP, data parallel"
        strategy_note = ("The run uses DDP (`strategy: ddp` in `run.yaml`): each GPU holds a full copy of the model. "
                         "Set `strategy: fsdp` to split the weights, gradients and optimizer state between the GPUs "
                         "when the model does not fit on one.")
    if config.gpus > 1:
        strategy_note = f"The workbench ran this run on {config.gpus} GPUs. " + strategy_note
    return f"""# Run {run_id}, exported

`run.yaml` is the complete run (method, settings, seed); the data is in `data/`. {model_note}
Run the commands from a checkout of the workbench (with its requirements installed), with `RUN` set to this
folder. Status, metrics, checkpoints and the final weights are written here, next to `run.yaml`, by the first
process only.

```bash
RUN={dest}
```

## One GPU (or the CPU)

```bash
python launch.py train $RUN/run.yaml
```

This is one process, whatever `gpus` says in `run.yaml` (the number of GPUs the workbench launched it on): the
launcher's process count below is what decides.

## Several GPUs on one machine ({strategy_name})

```bash
accelerate launch --multi_gpu --num_processes {gpus} launch.py train $RUN/run.yaml
```

{strategy_note}
`--num_processes` is the number of GPUs. Each step trains the same rows as on one GPU (`batch_size` rows per
micro-batch, split between the GPUs), so the loss curve and the result match the single-GPU run, only sooner.
To train on more rows per step, raise `batch_size` in `run.yaml`. `torchrun --nproc_per_node {gpus} launch.py train
$RUN/run.yaml` does the same.

## Several machines

Copy this folder to the same path on every machine (or put it on a shared disk: resuming needs the
checkpoints, which only the first machine writes). Then on each machine, with its own `--machine_rank`
(0 on the main machine, whose address every machine can reach):

```bash
accelerate launch --multi_gpu --num_machines 2 --machine_rank 0 --num_processes {2 * gpus} \\
    --main_process_ip 10.0.0.1 --main_process_port 29500 launch.py train $RUN/run.yaml
```

`--num_processes` is the total number of GPUs over all machines (here 2 machines x {gpus} GPUs); run the same line
with `--machine_rank 1` on the second machine. The strategy is the same as above ({strategy_name}).

## Resume after a stop or a crash

Add `--resume` to any of the commands above: training continues from the last complete checkpoint in
`checkpoints/`.
"""
