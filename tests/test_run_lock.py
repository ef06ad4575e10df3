"""One writer per run: the lock in the run folder and its stale cases, and every reader noticing a worker is gone."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import pytest

from app.runs import store as run_store
from app.runs.store import (FAILED, RUNNING, STOPPED, WORKER_LOCK, RunBusy, RunLock, RunStatus, RunStore,
                            process_start_time, read_owner)
from app.spec import RunConfig
from app.workspace import atomic_write_json

ROOT = Path(__file__).resolve().parent.parent


def lock_holder(path: Path) -> subprocess.Popen:
    """Another process that holds the lock at `path`, as a worker training that run does."""
    code = ("import sys, time; from app.runs.store import RunLock; RunLock(sys.argv[1]).acquire(); "
            "print('held', flush=True); time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(path)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


@pytest.fixture
def processes():
    """Processes a test starts, killed at its end."""
    started: list[subprocess.Popen] = []
    yield started
    for proc in started:
        proc.kill()
        proc.wait()


def write_record(path: Path, record: str) -> None:
    """A lock file as a worker that is gone may have left it."""
    me = process_start_time(os.getpid())
    text = {
        "dead": json.dumps({"pid": dead_pid(), "started": time.time() - 60}),  # killed: its file stays behind
        "reused": json.dumps({"pid": os.getpid(), "started": me - 3600}),  # a live pid, but another process now
        "garbled": '{"pid": 12',  # cut short
        "empty": "",
    }.get(record)
    if text is not None:
        path.write_text(text)


@pytest.mark.parametrize("record", ["none", "dead", "reused", "garbled", "empty"])
def test_a_stale_lock_is_taken_over(tmp_path, record):
    path = tmp_path / WORKER_LOCK
    write_record(path, record)
    assert read_owner(path) is None or not read_owner(path).alive()
    lock = RunLock(path).acquire()
    owner = read_owner(path)
    assert owner.pid == os.getpid() and owner.alive()
    with pytest.raises(RunBusy, match=f"process {os.getpid()} "):  # a second writer, even in the same process
        RunLock(path).acquire()
    lock.release()
    assert not path.exists()
    RunLock(path).acquire().release()  # free again


def test_a_live_lock_is_refused_with_its_owner_named(tmp_path, processes):
    path = tmp_path / "r1" / WORKER_LOCK
    path.parent.mkdir()
    processes.append(holder := lock_holder(path))
    since = time.strftime("%Y-%m-%d %H:%M", time.localtime(process_start_time(holder.pid)))
    with pytest.raises(RunBusy) as refused:
        RunLock(path).acquire()
    assert f"run r1 is already being trained by process {holder.pid} (running since {since}" in str(refused.value)
    assert f"kill {holder.pid}" in str(refused.value)
    assert read_owner(path).pid == holder.pid  # untouched
    holder.kill()
    holder.wait()  # killed: its file stays, its flock goes with it
    assert read_owner(path).pid == holder.pid and not read_owner(path).alive()
    RunLock(path).acquire().release()


# --- readers ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("worker, free, state, failure", [
    ("holds the lock", 10 ** 9, RUNNING, ""),  # the status names a refused worker's pid; the lock's owner trains
    ("none yet", 10 ** 9, RUNNING, ""),  # no pid: the supervisor is starting it
    ("killed", 10 ** 9, FAILED, "killed"),  # its lock file left behind, its pid gone
    ("reused", 10 ** 9, FAILED, "killed"),  # its pid taken by a process that started after the status was written
    ("killed", 0, FAILED, "disk"),  # a full disk left it no room for its last word
])
def test_every_reader_sees_a_run_whose_worker_is_gone_as_failed(workspace, processes, monkeypatch, worker, free, state,
                                                                  failure):
    store = RunStore(workspace.runs)
    run_id = store.create(RunConfig(dataset="x.jsonl"))
    pid = {"holds the lock": dead_pid, "none yet": lambda: None, "killed": dead_pid}.get(worker, os.getpid)()
    if worker == "holds the lock":
        processes.append(lock_holder(store.lock_path(run_id)))
    if worker == "killed":
        store.lock_path(run_id).write_text(json.dumps({"pid": pid, "started": time.time() - 60}))
    status = asdict(RunStatus(state=RUNNING, pid=pid))
    status["updated"] = time.time() - (3600 if worker == "reused" else 0)  # written before that process began
    atomic_write_json(store.dir(run_id) / "status.json", status)
    monkeypatch.setattr(run_store, "free_bytes", lambda path: free)

    seen = store.status(run_id)
    assert (seen.state, seen.failure) == (state, failure)
    assert store.recorded_status(run_id).state == RUNNING  # seen, not written: the supervisor records how it ended
    if failure == "disk":
        assert "is full" in seen.reason and "Free space" in seen.reason and str(store.dir(run_id)) in seen.reason
    elif failure:
        assert f"pid {pid}) is gone" in seen.reason


def test_a_status_write_on_a_full_disk_rewrites_status_json_in_place(workspace, monkeypatch):
    import errno
    import tempfile

    store = RunStore(workspace.runs)
    run_id = store.create(RunConfig(dataset="x.jsonl"))
    store.update_status(run_id, state=RUNNING, pid=os.getpid(), reason="x" * 300)
    inode = (store.dir(run_id) / "status.json").stat().st_ino

    def no_room(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(tempfile, "mkstemp", no_room)  # no room for the temporary file of an atomic write
    store.update_status(run_id, state=FAILED, failure="disk", reason="full")  # shorter than what it replaces
    assert (store.dir(run_id) / "status.json").stat().st_ino == inode
    status = store.recorded_status(run_id)
    assert (status.state, status.failure, status.reason) == (FAILED, "disk", "full")
    with pytest.raises(OSError, match="No space left"):  # more than its blocks hold: refused, the file intact
        store.update_status(run_id, reason="y" * 10_000)
    assert store.recorded_status(run_id).reason == "full"


# --- the Train tab ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("state", [RUNNING, STOPPED])
def test_the_train_tab_says_when_its_headless_command_would_be_refused(workspace, processes, state):
    from components import train_tab

    store = RunStore(workspace.runs)
    run_id = store.create(RunConfig(dataset="x.jsonl"))
    if state == RUNNING:
        processes.append(holder := lock_holder(store.lock_path(run_id)))
        store.update_status(run_id, state=RUNNING, pid=holder.pid)
    else:
        store.update_status(run_id, state=STOPPED)
    command = train_tab.live_view(store, {run_id: store.status(run_id)}, run_id)[4]
    if state == RUNNING:
        assert command.startswith(f"# Training now (process {holder.pid}): a second worker on this run is refused")
    else:
        assert "refused" not in command
    assert "launch.py train" in command.splitlines()[-1]


def test_the_runs_list_redraws_when_a_running_runs_worker_dies_without_writing(workspace):
    """On a full disk a dying worker writes nothing: the All runs table must still stop saying "running"."""
    from app.runs import history

    store = RunStore(workspace.runs)
    run_id = store.create(RunConfig(dataset="x.jsonl"))
    worker = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        atomic_write_json(store.dir(run_id) / "status.json", asdict(RunStatus(state=RUNNING, pid=worker.pid)))
        alive = history.store_signature(store)
        assert history.store_signature(store) == alive, "nothing changed: no redraw"
    finally:
        worker.kill()
        worker.wait()
    assert store.status(run_id).state == FAILED
    assert history.store_signature(store) != alive, "no file changed, but what the table shows did"
