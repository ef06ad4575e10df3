"""The run store: one folder per run holding its config, status, metrics, log, checkpoints and final weights.

runs/<run-id>/
    run.yaml          the fully resolved RunConfig (what `launch.py train` reads)
    status.json       RunStatus, rewritten atomically (in place when the disk is too full for a temporary file)
    worker.lock       held by the one process that trains the run (its pid and start time inside)
    metrics.jsonl     one JSON object per logged step: {"step", "loss", "lr", "tokens", ...}; eval lines have "eval_loss"
    train.log         the worker's stdout and stderr
    checkpoints/step-N/   resumable state (weights of the trainable part, optimizer, scheduler, rng, data position)
    final/            the adapter (PEFT format) or full model, with the tokenizer
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import shutil
import time
from dataclasses import asdict, dataclass, field, fields, replace
from datetime import datetime
from pathlib import Path
from typing import Any

from app.spec import ConfigError, RunConfig
from app.workspace import atomic_write_text

QUEUED, RUNNING, COMPLETED, STOPPED, FAILED, INTERRUPTED = (
    "queued", "running", "completed", "stopped", "failed", "interrupted",
)
FINAL_STATES = (COMPLETED, STOPPED, FAILED, INTERRUPTED)
RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
CHECKPOINT_DONE = "COMPLETE"  # written last into checkpoints/step-N/: a folder without it was cut short
CHECKPOINT_WEIGHTS = "trainable.safetensors"  # a checkpoint's trainable weights (the chat opens them as an adapter)
WORKER_LOCK = "worker.lock"
LOW_SPACE_BYTES = 1 << 20  # less free than this and a status, a metrics line or a log line may no longer fit


def checkpoint_step(folder: Path) -> int | None:
    """N for a checkpoints/step-N folder; None for a folder not named so."""
    m = re.fullmatch(r"step-([0-9]+)", Path(folder).name)
    return int(m[1]) if m else None


def complete_checkpoints(root: Path) -> list[Path]:
    """The finished step-N folders under `root`, oldest first; a folder without its completion marker is ignored.

    The one definition: the worker resumes from (and prunes) these, the UI offers these to resume and to chat with."""
    if not root.is_dir():
        return []
    done = [d for d in root.glob("step-*") if checkpoint_step(d) is not None and (d / CHECKPOINT_DONE).is_file()]
    return sorted(done, key=checkpoint_step)


@dataclass
class RunStatus:
    state: str = QUEUED
    reason: str = ""  # plain words for a failure or a stop
    failure: str = ""  # oom | nan | data | disk | killed | error, when state is failed
    step: int = 0
    total_steps: int = 0
    pid: int | None = None
    created: float = field(default_factory=time.time)
    started: float | None = None
    finished: float | None = None
    updated: float = field(default_factory=time.time)
    peak_memory_bytes: int | None = None  # measured: CUDA max reserved, or CPU peak RSS
    stop_requested: bool = False
    queued_at: float | None = None  # when it (re)joined the queue; a resume waits behind runs queued before it
    device: str = ""  # "cuda" or "cpu", written by the worker: which estimate the measured peak compares with

    @classmethod
    def from_dict(cls, data: Any) -> "RunStatus":
        if not isinstance(data, dict):
            return cls(state=FAILED, failure="error", reason="status.json was unreadable")
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


# --- full disks ------------------------------------------------------------------------------------------------
DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
# How writers that raise no OSError say it. The OS's own words travel inside other errors (safetensors: "I/O error:
# No space left on device (os error 28)"); torch's zip writer (caffe2/serialize/inline_container.cc) loses the errno
# and reports the short write: "unexpected pos N vs M", "PytorchStreamWriter failed writing file ...", or, from the
# stream under it, "basic_ios::clear: iostream error".
DISK_FULL_WORDS = ("no space left on device", "disk quota exceeded", "(os error 28)", "(os error 122)")
TORCH_SHORT_WRITE = ("unexpected pos ", "pytorchstreamwriter failed writing", "basic_ios::clear: iostream error")


def is_disk_full(error: BaseException) -> bool:
    """True when `error`, or an error it was raised from, means the disk (or the user's quota) is full."""
    seen: set[int] = set()
    e: BaseException | None = error
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        text = str(e).lower()
        if (isinstance(e, OSError) and e.errno in DISK_FULL_ERRNOS) or any(w in text for w in DISK_FULL_WORDS):
            return True
        if isinstance(e, RuntimeError) and any(w in text for w in TORCH_SHORT_WRITE):
            return True
        e = e.__cause__ or e.__context__
    return False


def free_bytes(path: str | os.PathLike) -> int | None:
    """The space this user may still write on the disk that holds `path`, or None when it cannot be told."""
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return None


def write_in_place(path: Path, text: str) -> None:
    """Overwrite an existing small file inside the blocks it already has: the last resort on a full disk, where the
    temporary file of an atomic write finds no room. Padded with spaces (still valid JSON) to at least the old
    length, so no byte of the old text survives, in one write that needs no new block; refused (the OSError of a
    full disk) when the text would need one."""
    data = text.encode("utf-8")
    fd = os.open(path, os.O_WRONLY)
    try:
        st = os.fstat(fd)
        if len(data) > max(st.st_size, st.st_blocks * 512):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        os.pwrite(fd, data.ljust(st.st_size, b" "), 0)
    finally:
        os.close(fd)


# --- the process that trains a run -----------------------------------------------------------------------------
HAVE_PROC = Path("/proc/self/stat").exists()


def process_start_time(pid: int) -> float | None:
    """When a live process started (seconds since the epoch, to about 1 s), or None if it is gone or a zombie."""
    try:
        fields = Path(f"/proc/{int(pid)}/stat").read_text().rsplit(")", 1)[1].split()
        boot = next(int(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                    if line.startswith("btime "))
    except (OSError, IndexError, ValueError, StopIteration):
        return None
    if fields[0] in ("Z", "X"):  # finished, not yet reaped by its parent
        return None
    return boot + int(fields[19]) / os.sysconf("SC_CLK_TCK")


def _pid_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def recorded_pid_alive(status: RunStatus, run_id: str) -> bool:
    """True if the pid in `status` is a live process training `run_id`; a pid alone may have been reused since.

    Ours if its command line names the run (what the supervisor and a hand-typed `launch.py train` run), or if it
    started before the status was last written (a headless `--preset` run, whose command line names no run): a
    process that took over a dead worker's pid can only have started after the worker's last word."""
    pid = status.pid
    if not isinstance(pid, int) or pid <= 0:
        return False
    if not HAVE_PROC:
        return _pid_exists(pid)  # no /proc on this system: the pid alone is the best we have
    started = process_start_time(pid)
    if started is None:
        return False
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return f"/{run_id}/".encode() in cmdline or started <= (status.updated or 0) + 1.0  # 1 s: boot time is whole s


@dataclass(frozen=True)
class Owner:
    """The process that holds a run's lock, as the lock file records it."""
    pid: int
    started: float  # when it started (seconds since the epoch): a process that reused the pid since has another

    @classmethod
    def me(cls) -> "Owner":
        return cls(os.getpid(), process_start_time(os.getpid()) or time.time())

    def alive(self) -> bool:
        if not HAVE_PROC:
            return _pid_exists(self.pid)
        started = process_start_time(self.pid)
        return started is not None and abs(started - self.started) <= 1.0  # 1 s: /proc's boot time is whole seconds

    def words(self) -> str:
        return f"process {self.pid} (running since {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(self.started))})"


def read_owner(path: Path) -> Owner | None:
    """The owner a lock file records, alive or not; None for no file, or one cut short or garbled."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        return Owner(int(data["pid"]), float(data["started"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None


EXIT_BUSY = 3  # the exit code of `launch.py train` refused because another worker holds the run


class RunBusy(RuntimeError):
    """Another live process trains the run: a second writer is refused."""

    def __init__(self, run_dir: Path, owner: Owner | None):
        self.owner = owner
        who = owner.words() if owner else "another process"
        stop = (f"stop it (Stop in the Train tab, or `kill {owner.pid}`, which saves a checkpoint first)" if owner
                else "stop it (Stop in the Train tab)")
        super().__init__(f"run {run_dir.name} is already being trained by {who}. A run has one writer: wait for it "
                         f"to end, or {stop}, then resume it.")


class RunLock:
    """runs/<id>/worker.lock, held by the one process that writes the run from its start to its exit.

    An flock: the kernel drops it when its process ends, however it ends, so the lock a killed worker leaves behind
    (its pid gone, or reused by another process since) is stale by construction and the next worker takes it over.
    The owner's pid and start time are written inside for readers (`RunStore.owner`) and for the refusal."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._fd: int | None = None

    def acquire(self) -> "RunLock":
        """Take the lock, or raise RunBusy naming the process that holds it."""
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise RunBusy(self.path.parent, read_owner(self.path)) from None
            try:
                if os.fstat(fd).st_ino == os.stat(self.path).st_ino:
                    break
            except FileNotFoundError:
                pass
            os.close(fd)  # its owner released it, removing the file, between our open and our lock: again
        self._fd = fd
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(asdict(Owner.me())).encode(), 0)
        except OSError as e:
            if not is_disk_full(e):
                self.release()
                raise
            # no room for the record: the flock alone keeps other writers out, and readers go by status.json's pid
        return self

    def release(self) -> None:
        """Remove the file, then let go (in that order: a worker that opened the old file meanwhile sees that the
        path names another file, or none, and tries again)."""
        if self._fd is None:
            return
        self.path.unlink(missing_ok=True)
        os.close(self._fd)
        self._fd = None


class RunNotFound(KeyError):
    pass


class RunStore:
    def __init__(self, runs_dir: str | os.PathLike):
        self.root = Path(runs_dir)
        self.root.mkdir(parents=True, exist_ok=True)

    # --- paths ---------------------------------------------------------------------------------------------
    def dir(self, run_id: str) -> Path:
        if not RUN_ID.match(run_id or ""):
            raise RunNotFound(f"not a run id: {run_id!r}")
        return self.root / run_id

    def config_path(self, run_id: str) -> Path:
        return self.dir(run_id) / "run.yaml"

    def metrics_path(self, run_id: str) -> Path:
        return self.dir(run_id) / "metrics.jsonl"

    def log_path(self, run_id: str) -> Path:
        return self.dir(run_id) / "train.log"

    def final_dir(self, run_id: str) -> Path:
        return self.dir(run_id) / "final"

    def checkpoints_dir(self, run_id: str) -> Path:
        return self.dir(run_id) / "checkpoints"

    def lock_path(self, run_id: str) -> Path:
        return self.dir(run_id) / WORKER_LOCK

    # --- create / read / write -----------------------------------------------------------------------------
    def new_id(self, config: RunConfig) -> str:
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        base = re.sub(r"[^A-Za-z0-9._-]+", "-", f"{stamp}-{config.method}")
        run_id, n = base, 1
        while (self.root / run_id).exists():
            n += 1
            run_id = f"{base}-{n}"
        return run_id

    def create(self, config: RunConfig) -> str:
        run_id = config.run_id or self.new_id(config)
        config.run_id = run_id
        self.dir(run_id).mkdir(parents=True, exist_ok=False)
        atomic_write_text(self.config_path(run_id), config.to_yaml())
        self.write_status(run_id, RunStatus())
        return run_id

    def exists(self, run_id: str) -> bool:
        try:
            return self.config_path(run_id).is_file()
        except RunNotFound:
            return False

    def config(self, run_id: str) -> RunConfig:
        path = self.config_path(run_id)
        if not path.is_file():
            raise RunNotFound(run_id)
        return RunConfig.from_yaml(path)

    def status(self, run_id: str) -> RunStatus:
        """The run's status as every reader should take it (`seen`): a run recorded as training whose worker is
        gone reads as failed."""
        return self.seen(run_id, self.recorded_status(run_id))

    def recorded_status(self, run_id: str) -> RunStatus:
        """status.json as it was last written."""
        path = self.dir(run_id) / "status.json"
        try:
            return RunStatus.from_dict(json.loads(path.read_text(encoding="utf-8")))
        except FileNotFoundError:
            raise RunNotFound(run_id) from None
        except (json.JSONDecodeError, UnicodeDecodeError, TypeError):
            return RunStatus.from_dict(None)

    def seen(self, run_id: str, status: RunStatus) -> RunStatus:
        """A recorded `status` as readers should take it. A run recorded as training whose worker is gone failed:
        killed, or on a disk so full that it found no room for its last word. The supervisor records that in words
        that say how the process ended; every reader (the page, the CLI, the chat) sees it at once, app or none."""
        # no pid yet: the supervisor marks a run running just before it starts the worker, then writes the pid
        if status.state != RUNNING or status.pid is None or self.worker_alive(run_id, status):
            return status
        gone = f"The training process (pid {status.pid}) is gone"
        free = free_bytes(self.dir(run_id))
        if free is not None and free < LOW_SPACE_BYTES:
            return replace(status, state=FAILED, failure="disk", reason=(
                f"{gone}, and the disk that holds {self.dir(run_id)} is full ({free:,} bytes free): it could not "
                f"record how it ended. Free space on that disk, then resume the run."))
        return replace(status, state=FAILED, failure="killed", reason=f"{gone} without recording how it ended.")

    def owner(self, run_id: str) -> Owner | None:
        """The live process that holds the run's lock; None when none does (no lock, or its process is gone)."""
        owner = read_owner(self.lock_path(run_id))
        return owner if owner is not None and owner.alive() else None

    def worker_alive(self, run_id: str, status: RunStatus) -> bool:
        """True while a process trains the run: the lock's owner, or the pid in the status (the worker takes the
        lock only once its imports are done, and accelerate's launcher never does)."""
        return self.owner(run_id) is not None or recorded_pid_alive(status, run_id)

    def write_status(self, run_id: str, status: RunStatus) -> None:
        status.updated = time.time()
        path = self.dir(run_id) / "status.json"
        text = json.dumps(asdict(status), indent=2, sort_keys=True, default=str) + "\n"
        try:
            atomic_write_text(path, text)
        except OSError as e:  # a full disk: a failed worker's last word must still reach its readers
            if not is_disk_full(e) or not path.is_file():
                raise
            write_in_place(path, text)

    def update_status(self, run_id: str, **changes: Any) -> RunStatus:
        status = self.recorded_status(run_id)
        for key, value in changes.items():
            setattr(status, key, value)
        self.write_status(run_id, status)
        return status

    def append_metric(self, run_id: str, record: dict[str, Any]) -> None:
        with open(self.metrics_path(run_id), "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")

    def metrics(self, run_id: str) -> list[dict[str, Any]]:
        """Every readable line; a truncated or garbled line (a crash mid-write) is skipped."""
        path = self.metrics_path(run_id)
        if not path.is_file():
            return []
        records = []
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if isinstance(record, dict):
                    records.append(record)
        return records

    def log_tail(self, run_id: str, lines: int = 40) -> str:
        path = self.log_path(run_id)
        if not path.is_file():
            return ""
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 64_000))
            return "\n".join(f.read().decode("utf-8", "replace").splitlines()[-lines:])

    def list_ids(self) -> list[str]:
        """Run ids, newest first."""
        ids = [d.name for d in self.root.iterdir() if d.is_dir() and (d / "run.yaml").is_file()]
        return sorted(ids, key=lambda i: (self.root / i / "run.yaml").stat().st_mtime, reverse=True)

    def checkpoints(self, run_id: str) -> list[Path]:
        """Finished checkpoints, oldest first."""
        return complete_checkpoints(self.checkpoints_dir(run_id))

    def delete(self, run_id: str) -> None:
        shutil.rmtree(self.dir(run_id))

    def safe_config(self, run_id: str) -> RunConfig | None:
        """The config, or None when run.yaml is missing or garbled (listed as broken rather than crashing)."""
        try:
            return self.config(run_id)
        except (RunNotFound, ConfigError, OSError):
            return None
