"""The job queue and its supervisor: one training process at a time, started, watched and recovered via the run store.

The queue is the run store itself (runs whose status is `queued`, oldest first), so it survives a restart of the
UI and every browser session and every UI process on the workspace sees the same one. Each decision that changes
a status (start the next run, cancel, resume, mark a dead worker) is taken under a lock file in the runs folder,
so two UI processes never start the same run or two runs at once.
"""
from __future__ import annotations

import fcntl
import json
import logging
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

from app.memory import estimate as memory
from app.runs.store import (FAILED, INTERRUPTED, QUEUED, RUNNING, STOPPED, RunNotFound, RunStatus, RunStore,
                            checkpoint_step)
from app.spec import ConfigError, RunConfig
from app.workspace import Workspace

ROOT = Path(__file__).resolve().parents[2]
LAUNCH = ROOT / "launch.py"
LOCK_NAME = ".queue.lock"
log = logging.getLogger(__name__)

Command = Callable[[Path, bool], list[str]]  # (run.yaml, resume) -> argv


class JobError(ValueError):
    """An action the queue cannot take on a run in its current state; the message says why in plain words."""


def train_command(run_yaml: Path, resume: bool = False, config: RunConfig | None = None) -> list[str]:
    """The exact command the supervisor runs (and the Train tab shows for running it headless): the worker itself, or
    with `gpus` above 1 accelerate's launcher starting one worker per GPU. `config` is the run's (read from `run_yaml`
    when not given; one that cannot be read runs in one process, whose worker then says what is wrong with it)."""
    run_yaml = Path(run_yaml).resolve()
    if config is None:
        try:
            config = RunConfig.from_yaml(run_yaml)
        except (ConfigError, OSError):
            config = RunConfig()
    worker = [str(LAUNCH), "train", str(run_yaml)] + (["--resume"] if resume else [])
    if config.gpus <= 1:
        return [sys.executable, *worker]
    # --multi_gpu is accelerate's data-parallel launcher (torchrun's), which also runs on CPUs with gloo; the worker
    # reads the strategy (DDP or FSDP) and the precision from run.yaml, so accelerate must not set either itself
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(config.gpus),
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
            "--main_process_port", str(launcher_port(run_yaml)), *worker]


def launcher_port(run_yaml: Path) -> int:
    """The port a multi-GPU run's processes meet on: the same for the same run while it is free (so the command the
    Train tab shows is the one that ran), else any free one (two runs, or another job, on 29500)."""
    preferred = 29500 + zlib.crc32(str(run_yaml).encode()) % 1000
    with socket.socket() as s:
        try:
            s.bind(("", preferred))
        except OSError:
            s.bind(("", 0))
        return s.getsockname()[1]


def queue_order(statuses: dict[str, RunStatus]) -> list[str]:
    """Queued run ids, the next to start first: by when they joined the queue."""
    queued = [(s.queued_at or s.created or 0.0, run_id) for run_id, s in statuses.items() if s.state == QUEUED]
    return [run_id for _, run_id in sorted(queued)]


def _checkpoint_words(store: RunStore, run_id: str) -> str:
    checkpoints = store.checkpoints(run_id)
    if checkpoints:
        return f"Its last checkpoint (step {checkpoint_step(checkpoints[-1])}) is intact: Resume continues from it."
    return "It had not saved a checkpoint yet: Resume starts it again from the beginning."


def exit_words(code: int, rank: int | None = None) -> str:
    who = "The training process" if rank is None else f"Training process {rank} (of the run's several)"
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        why = " (the system may have run out of memory, or someone ended it)" if name == "SIGKILL" else ""
        return f"{who} was killed by {name}{why}."
    return f"{who} ended with exit code {code} without recording a result; the log below says why."


def launcher_root_cause(log_text: str) -> tuple[int, int] | None:
    """(rank, exit code) of the first worker that failed under accelerate's launcher (torch elastic reports it as
    the "Root Cause" in the log), or None."""
    m = re.search(r"Root Cause.*?rank\s*:\s*(\d+).*?exitcode\s*:\s*(-?\d+)", log_text, re.S)
    return (int(m[1]), int(m[2])) if m else None


def estimate_made_for(estimate: dict | None, config: RunConfig, models_dir: Path) -> bool:
    """True when `estimate` (a MemoryEstimate.to_dict(), which carries the inputs it was computed from) is the
    estimate of exactly this run's settings."""
    if not isinstance(estimate, dict):
        return False
    wanted = asdict(memory.inputs_for_config(config, models_dir))
    del wanted["models_dir"]  # a place on this machine, not a setting; to_dict leaves it out
    return all(key in estimate and estimate[key] == value for key, value in wanted.items())


def attach_estimate(config: RunConfig, models_dir: Path, shown: dict | None = None) -> None:
    """Record in the run the memory estimate for its exact settings, to set beside the measured peak afterwards.

    `shown` is the estimate the Method tab showed: recorded as it is when it was made for these very settings, so the
    figure the user saw is the one the run keeps. Otherwise (other settings, such as another rank of a sweep or
    several GPUs, or nothing handed over: the quick demo) it is computed here. A run whose estimate fails still
    starts, without one."""
    if estimate_made_for(shown, config, models_dir):
        estimate = shown
    else:
        try:
            estimate = memory.estimate_for_config(config, models_dir).to_dict()
        except Exception as e:  # noqa: BLE001 - a failed estimate must not keep a run from starting
            log.warning("memory estimate failed for %s: %s", config.model, e)
            estimate = None
    # through JSON: run.yaml is safe YAML, which has no tuples or numpy numbers
    config.estimate = json.loads(json.dumps(estimate, default=str)) if estimate is not None else None


class Supervisor:
    """Starts queued runs one at a time and notices when a training process dies. One per UI process."""

    def __init__(self, store: RunStore, command: Command = train_command, poll_s: float = 0.5):
        self.store = store
        self.command = command
        self.poll_s = poll_s
        self.lock_path = store.root / LOCK_NAME
        self._children: dict[str, subprocess.Popen] = {}  # workers this process started; others are watched by pid
        self._stopping: set[str] = set()  # runs of _children that Stop was pressed for
        self._mutex = threading.Lock()  # the supervisor thread and UI handlers share _children
        self._halt = threading.Event()
        self._thread: threading.Thread | None = None
        self._recovered = False
        self._status_cache: dict[str, tuple[tuple, RunStatus]] = {}

    # --- the background thread -------------------------------------------------------------------------------
    def start(self) -> "Supervisor":
        """Start supervising in a daemon thread; calling it again does nothing."""
        with self._mutex:
            if self._thread is None or not self._thread.is_alive():
                self._halt.clear()
                self._thread = threading.Thread(target=self._loop, name="run-supervisor", daemon=True)
                self._thread.start()
        return self

    def close(self) -> None:
        """Stop supervising; training processes keep running (a later supervisor re-attaches to them)."""
        self._halt.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _loop(self) -> None:
        failing = ""  # the error the last rounds failed with: logged once, not twice a second (a full disk lasts)
        while True:
            try:
                self.tick()
                if failing:
                    log.warning("run supervisor: working again")
                failing = ""
            except Exception as e:  # noqa: BLE001 - a full disk or a damaged run folder must not end supervision
                if f"{type(e).__name__}: {e}" != failing:
                    log.exception("run supervisor: tick failed; trying again (the same error again is not logged)")
                failing = f"{type(e).__name__}: {e}"
            if self._halt.wait(self.poll_s):
                return

    @contextmanager
    def _locked(self) -> Iterator[None]:
        with self._mutex, open(self.lock_path, "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            yield  # closing the file releases the lock

    # --- one round -------------------------------------------------------------------------------------------
    def tick(self) -> None:
        """Reap finished workers, mark dead ones, and start the next queued run if none is running."""
        with self._locked():
            self._reap_children()
            self._check_others(startup=not self._recovered)
            self._recovered = True
            self._start_next()

    def statuses(self) -> dict[str, RunStatus]:
        """Every run's status as readers take it (`RunStore.seen`): a run whose worker is gone is not shown as
        training, even while its end cannot be recorded (a full disk). Shared objects: read them, do not change them."""
        return {run_id: self.store.seen(run_id, status) for run_id, status in self._recorded().items()}

    def _recorded(self) -> dict[str, RunStatus]:
        """Every run's status.json as written. Each is re-read only when its file changed, so with hundreds of
        finished runs a round costs one stat per run, not a parse of every file."""
        out, cache = {}, {}
        try:
            folders = [e.name for e in os.scandir(self.store.root) if e.is_dir()]
        except OSError:
            return out
        root = str(self.store.root)
        for run_id in folders:
            try:
                st = os.stat(f"{root}/{run_id}/status.json")
                key = (st.st_ino, st.st_mtime_ns, st.st_size)
                cached = self._status_cache.get(run_id)
                status = cached[1] if cached and cached[0] == key else self.store.recorded_status(run_id)
            except (RunNotFound, OSError):  # being created or deleted right now, or not a run folder
                continue
            cache[run_id] = (key, status)
            out[run_id] = status
        self._status_cache = cache
        return out

    def _reap_children(self) -> None:
        for run_id, proc in list(self._children.items()):
            code = proc.poll()
            if code is None:
                continue
            del self._children[run_id]
            stopped = run_id in self._stopping
            self._stopping.discard(run_id)
            try:
                status = self.store.recorded_status(run_id)
            except RunNotFound:
                continue
            # several processes: when one was killed, the others fail on the broken connection, and rank 0 may
            # record that as an error; the launcher's report names the one that died first, and how
            cause = launcher_root_cause(self.store.log_tail(run_id, 80)) if code > 0 else None
            killed = cause is not None and cause[1] < 0 and cause[1] != -signal.SIGTERM and not stopped
            killed_words = f"{exit_words(cause[1], cause[0])} {_checkpoint_words(self.store, run_id)}" if killed else ""
            if status.state != RUNNING:
                # the worker recorded how it ended; queued again already when Resume came while the process was
                # still exiting (accelerate's launcher notices its workers' exit only at its next check)
                if killed and status.state == FAILED and status.failure == "error":
                    self._finish(run_id, FAILED, "killed", killed_words)
                continue
            owner = self.store.owner(run_id)
            if owner is not None and owner.pid != proc.pid:  # this one was refused: another worker trains the run
                log.warning("run %s: its worker was refused; %s trains it", run_id, owner.words())
                continue
            # A Stop that arrived before the worker could record it: the worker died of the SIGTERM, or accelerate's
            # launcher (the pid until rank 0 has loaded and written its own) passed it on and exited with 1.
            if code == -signal.SIGTERM or stopped:
                self._finish(run_id, STOPPED, "", "Stopped before the training process could save. "
                             + _checkpoint_words(self.store, run_id))
            elif killed:
                self._finish(run_id, FAILED, "killed", killed_words)
            else:
                self._finish(run_id, FAILED, "killed" if code < 0 else "error",
                             f"{exit_words(code)} {_checkpoint_words(self.store, run_id)}")

    def _check_others(self, startup: bool) -> None:
        """Runs marked running that this process did not start: re-attach if their worker lives, else record it."""
        for run_id, status in self._recorded().items():
            if status.state != RUNNING or run_id in self._children or self.store.worker_alive(run_id, status):
                continue
            if self.store.recorded_status(run_id).state != RUNNING:  # it finished between the two reads
                continue
            if startup:
                self._finish(run_id, INTERRUPTED, "", "The app was restarted and the training process was gone. "
                             + _checkpoint_words(self.store, run_id))
            else:
                self._finish(run_id, FAILED, "killed", f"The training process (pid {status.pid}) is gone. "
                             + _checkpoint_words(self.store, run_id))

    def _finish(self, run_id: str, state: str, failure: str, reason: str) -> None:
        log.warning("run %s: %s (%s)", run_id, state, reason)
        self.store.update_status(run_id, state=state, failure=failure, reason=reason, finished=time.time())

    def _start_next(self) -> None:
        if any(p.poll() is None for p in self._children.values()):
            return  # still exiting: let it free its memory first
        statuses = self.statuses()
        if any(s.state == RUNNING for s in statuses.values()):
            return
        queue = queue_order(statuses)
        if queue:
            self._launch(queue[0], statuses[queue[0]])

    def _launch(self, run_id: str, status: RunStatus) -> None:
        resume = bool(self.store.checkpoints(run_id))
        if not resume:  # a fresh start draws a fresh curve, not one on top of a previous attempt's
            self.store.metrics_path(run_id).unlink(missing_ok=True)
        cmd = self.command(self.store.config_path(run_id).resolve(), resume)
        # Marked running before the process exists, under the lock: no other supervisor can start it too.
        self.store.update_status(run_id, state=RUNNING, pid=None, failure="", reason="", finished=None,
                                 started=status.started or time.time())
        try:
            with open(self.store.log_path(run_id), "ab") as out:
                out.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} {shlex.join(cmd)}\n".encode())
                out.flush()
                proc = subprocess.Popen(
                    cmd, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                    start_new_session=True,  # its own session: it outlives a restart of the UI and ignores its Ctrl-C
                    env={**os.environ, "PYTHONUNBUFFERED": "1"},
                )
        except OSError as e:
            self._finish(run_id, FAILED, "error", f"Could not start the training process: {e}")
            return
        self._children[run_id] = proc
        # The worker rewrites its status once it has loaded; this write lands long before (imports take seconds).
        self.store.update_status(run_id, pid=proc.pid)
        log.info("run %s: started pid %d%s", run_id, proc.pid, " (resume)" if resume else "")

    # --- actions for the UI ----------------------------------------------------------------------------------
    def submit(self, configs: list[RunConfig]) -> list[str]:
        """Queue runs (a second Start while one trains simply waits its turn); returns their ids."""
        with self._locked():
            ids = []
            for config in configs:
                run_id = self.store.create(config)
                self.store.update_status(run_id, queued_at=time.time())
                ids.append(run_id)
        return ids

    def queue(self) -> list[str]:
        return queue_order(self.statuses())

    def active(self) -> str | None:
        """The run that is training now, if any."""
        return next((run_id for run_id, s in self.statuses().items() if s.state == RUNNING), None)

    def cancel(self, run_id: str) -> None:
        with self._locked():
            status = self.store.status(run_id)
            if status.state != QUEUED:
                raise JobError(f"{run_id} is {status.state}, not waiting in the queue: nothing to cancel.")
            resumed = bool(self.store.checkpoints(run_id))
            self._finish(run_id, STOPPED, "", "Resume was cancelled; the checkpoints are kept." if resumed
                         else "Cancelled before it started.")

    def stop(self, run_id: str) -> None:
        """Ask a running worker to save a checkpoint and stop (SIGTERM); a queued run is simply cancelled."""
        with self._locked():
            status = self.store.status(run_id)
            if status.state == RUNNING:
                # The lock's owner (rank 0 of several: it passes the stop on to the others at the next step), else
                # the pid in the status: a worker still importing, or accelerate's launcher, which passes it on.
                owner = self.store.owner(run_id)
                try:
                    os.kill(owner.pid if owner else int(status.pid), signal.SIGTERM)
                except (ProcessLookupError, TypeError):  # it ended just now, or its pid is not written yet
                    raise JobError(f"The training process of {run_id} is not there; its status updates in a "
                                   f"moment.") from None
                self._stopping.add(run_id)
                return
            if status.state != QUEUED:
                raise JobError(f"{run_id} is {status.state}: it is not running.")
        self.cancel(run_id)

    def resume(self, run_id: str) -> None:
        """Queue a stopped, failed or interrupted run again; it continues from its last checkpoint."""
        with self._locked():
            status = self.store.status(run_id)
            if status.state not in (STOPPED, FAILED, INTERRUPTED):
                raise JobError(f"{run_id} is {status.state}: only a stopped, failed or interrupted run can resume.")
            self.store.update_status(run_id, state=QUEUED, queued_at=time.time(), failure="", reason="", finished=None)

    def delete(self, run_id: str) -> None:
        with self._locked():
            try:
                running = self.store.status(run_id).state == RUNNING
            except RunNotFound:  # a broken folder without a status can always go
                running = False
            if running:
                raise JobError(f"{run_id} is training: stop it first, then delete it.")
            self.store.delete(run_id)


_supervisors: dict[Path, Supervisor] = {}
_registry_lock = threading.Lock()


def start_supervisor(workspace: Workspace) -> Supervisor:
    """The one supervisor of this process for `workspace`, started on first use (the UI calls this at start-up)."""
    key = workspace.runs.resolve()
    with _registry_lock:
        if key not in _supervisors:
            _supervisors[key] = Supervisor(RunStore(key))
        return _supervisors[key].start()
