"""The job queue and supervisor, driven with a fake worker that keeps the real worker's contract in milliseconds."""
from __future__ import annotations

import errno
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import asdict
from pathlib import Path

import pytest

from app.runs import history
from app.runs import jobs
from app.runs.jobs import JobError, Supervisor
from app.runs import store as run_store
from app.runs.store import (COMPLETED, FAILED, INTERRUPTED, QUEUED, RUNNING, STOPPED, RunStatus, RunStore,
                            process_start_time)
from app.spec import RunConfig
from app.workspace import atomic_write_json
from tests.helpers import needs_gloo, wait_for
from tests.test_run_lock import lock_holder

FAKE = Path(__file__).resolve().parent / "fake_worker.py"


def fake(**options):
    """A Supervisor command that runs the fake worker with these options."""
    extra = [x for k, v in options.items() for x in (f"--{k.replace('_', '-')}", str(v))]
    return lambda run_yaml, resume: [sys.executable, str(FAKE), str(run_yaml), *extra] + (["--resume"] if resume else [])


@pytest.fixture
def store(workspace) -> RunStore:
    return RunStore(workspace.runs)


@pytest.fixture
def supervisors():
    """Supervisors made by a test, closed (and their workers killed) at its end."""
    made: list[Supervisor] = []

    def make(store, **kw) -> Supervisor:
        kw.setdefault("poll_s", 0.2)
        sup = Supervisor(store, **kw)
        made.append(sup)
        return sup

    yield make
    for sup in made:
        sup.close()
        for proc in sup._children.values():
            proc.kill()
            proc.wait()


def config(**kw) -> RunConfig:
    return RunConfig(dataset="/nonexistent.jsonl", **kw)


def state(store, run_id) -> str:
    return store.status(run_id).state


def recorded(store, run_id) -> str:
    """The state the supervisor wrote, with how the worker ended (a reader sees a dead worker's run failed first)."""
    return store.recorded_status(run_id).state


# --- the queue -----------------------------------------------------------------------------------------------
def test_queue_order_and_positions(store, supervisors):
    sup = supervisors(store, command=fake(steps=200, sleep=0.05))
    ids = sup.submit([config(seed=i) for i in range(3)])
    assert sup.queue() == ids
    sup.tick()
    assert state(store, ids[0]) == RUNNING and sup.active() == ids[0]
    assert sup.queue() == ids[1:]
    sup.cancel(ids[1])
    assert sup.queue() == [ids[2]]
    assert store.status(ids[1]).reason == "Cancelled before it started."


@pytest.mark.parametrize("queued_at, expected", [
    ((3.0, 1.0, 2.0), ["b", "c", "a"]),
    ((None, None, 1.0), ["c", "a", "b"]),  # no queued_at: ordered by creation time (a=10, b=20)
])
def test_queue_order_uses_queued_time_then_creation(queued_at, expected):
    statuses = {name: RunStatus(created=created, queued_at=at)
                for name, created, at in zip("abc", (10.0, 20.0, 30.0), queued_at)}
    statuses["d"] = RunStatus(state=RUNNING, created=0.0)
    assert jobs.queue_order(statuses) == expected


@pytest.mark.parametrize("start_state, action, error", [
    (QUEUED, Supervisor.cancel, None),
    (COMPLETED, Supervisor.cancel, "not waiting in the queue"),
    (RUNNING, Supervisor.cancel, "not waiting in the queue"),
    (STOPPED, Supervisor.resume, None),
    (FAILED, Supervisor.resume, None),
    (INTERRUPTED, Supervisor.resume, None),
    (COMPLETED, Supervisor.resume, "only a stopped, failed or interrupted run"),
    (QUEUED, Supervisor.resume, "only a stopped, failed or interrupted run"),
    (COMPLETED, Supervisor.stop, "it is not running"),
    (QUEUED, Supervisor.stop, None),  # stopping a queued run cancels it
    (RUNNING, Supervisor.delete, "stop it first"),
    (COMPLETED, Supervisor.delete, None),
    (QUEUED, Supervisor.delete, None),
])
def test_actions_by_state(store, supervisors, start_state, action, error):
    sup = supervisors(store)
    run_id = store.create(config())
    store.update_status(run_id, state=start_state)
    if error:
        with pytest.raises(JobError, match=error):
            action(sup, run_id)
        assert state(store, run_id) == start_state
    else:
        action(sup, run_id)
        if action is not Supervisor.delete:
            expected = QUEUED if action is Supervisor.resume else STOPPED
            assert state(store, run_id) == expected
        else:
            assert not store.exists(run_id)


def test_one_at_a_time_in_order_across_two_supervisors(store, supervisors):
    """Two UI processes on one workspace: every run starts exactly once, never two at a time, in queue order."""
    first = supervisors(store, command=fake(steps=3, sleep=0.02))
    ids = first.submit([config(seed=i) for i in range(3)])
    second = supervisors(store, command=fake(steps=3, sleep=0.02))
    first.start(), second.start()
    running_at_once = []

    def all_completed() -> bool:
        states = [state(store, i) for i in ids]
        running_at_once.append(states.count(RUNNING))
        return states == [COMPLETED] * 3

    wait_for(all_completed, 20, every=0.01, message=lambda: [state(store, i) for i in ids])
    assert max(running_at_once) == 1
    assert [store.log_path(i).read_text().count("fake worker argv") for i in ids] == [1, 1, 1]
    started = [store.status(i).started for i in ids]
    finished = [store.status(i).finished for i in ids]
    assert started == sorted(started) and all(f <= s for f, s in zip(finished, started[1:]))


def test_start_supervisor_is_one_per_workspace(workspace):
    a = jobs.start_supervisor(workspace)  # a fresh workspace: nothing queued, so no worker starts
    try:
        assert jobs.start_supervisor(workspace) is a
        threads = [t for t in threading.enumerate() if t.name == "run-supervisor" and t is a._thread]
        assert len(threads) == 1 and threads[0].is_alive()
    finally:
        a.close()
        jobs._supervisors.pop(workspace.runs.resolve(), None)


# --- dying and stopping workers ------------------------------------------------------------------------------
def test_sigkilled_worker_is_marked_failed_within_5s_and_resumes_from_its_checkpoint(store, supervisors):
    sup = supervisors(store, command=fake(steps=400, sleep=0.02, save_every=5)).start()
    (run_id,) = sup.submit([config()])
    wait_for(lambda: len(store.checkpoints(run_id)) >= 2)
    pid = store.status(run_id).pid
    os.kill(pid, signal.SIGKILL)
    killed_at = time.time()
    wait_for(lambda: recorded(store, run_id) == FAILED, timeout=5)
    assert time.time() - killed_at < 5
    status = store.status(run_id)
    assert status.failure == "killed" and "SIGKILL" in status.reason and "Resume continues" in status.reason
    last = store.checkpoints(run_id)[-1]
    assert (last / "COMPLETE").is_file()
    checkpoint_step = int(last.name.split("-")[1])

    sup.command = fake(steps=checkpoint_step + 5, sleep=0.01)
    sup.resume(run_id)
    wait_for(lambda: state(store, run_id) == COMPLETED)
    assert "--resume" in store.log_tail(run_id, 3)
    c = history.curves(store.metrics(run_id))
    assert [s for s, _ in c.train] == list(range(1, checkpoint_step + 6))  # the curve continues, no step twice


@pytest.mark.parametrize("options, end_state, failure, words", [
    (dict(crash_at=2), FAILED, "error", "exit code 3"),
    (dict(steps=3), COMPLETED, "", ""),
])
def test_worker_exit_is_recorded(store, supervisors, options, end_state, failure, words):
    sup = supervisors(store, command=fake(**options))
    (run_id,) = sup.submit([config()])
    sup.tick()
    sup._children[run_id].wait(timeout=10)
    sup.tick()
    status = store.status(run_id)
    assert (status.state, status.failure) == (end_state, failure)
    assert words in status.reason


def test_stop_saves_and_marks_stopped(store, supervisors):
    sup = supervisors(store, command=fake(steps=1000, sleep=0.02)).start()
    (run_id,) = sup.submit([config()])
    wait_for(lambda: store.status(run_id).step >= 3)
    sup.stop(run_id)
    wait_for(lambda: state(store, run_id) == STOPPED)
    assert store.checkpoints(run_id)[-1].name == f"step-{store.status(run_id).step}"


def test_sigterm_before_the_worker_listens_counts_as_a_stop(store, supervisors):
    sup = supervisors(store, command=lambda run_yaml, resume: [sys.executable, "-c", "import time; time.sleep(30)",
                                                                str(run_yaml)])
    (run_id,) = sup.submit([config()])
    sup.tick()
    sup.stop(run_id)
    sup._children[run_id].wait(timeout=10)
    sup.tick()
    status = store.status(run_id)
    assert status.state == STOPPED and "before the training process could save" in status.reason


# --- restarts --------------------------------------------------------------------------------------------------
def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def sleeper(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)", *args])


@pytest.mark.parametrize("process, end_state", [
    ("worker", RUNNING),  # alive and its command line names this run: re-attached, no second worker
    ("headless", RUNNING),  # a `--preset` run names no run, but it was alive when the status was written
    ("reused", INTERRUPTED),  # a live process that took the pid after the status was written is not our worker
    ("dead", INTERRUPTED),
    ("none", INTERRUPTED),
])
def test_restart_adopts_a_live_worker_and_marks_a_dead_one_interrupted(store, supervisors, process, end_state):
    (run_id,) = supervisors(store).submit([config()])
    worker = {"worker": lambda: sleeper(str(store.config_path(run_id))), "headless": sleeper,
              "reused": sleeper}.get(process, lambda: None)()
    pid = worker.pid if worker else dead_pid() if process == "dead" else None
    wait_for(lambda: worker is None or process_start_time(worker.pid))
    status = store.status(run_id)
    status.state, status.pid = RUNNING, pid
    status = asdict(status)
    status["updated"] = time.time() - (10 if process == "reused" else 0)  # written before the pid's owner began
    atomic_write_json(store.dir(run_id) / "status.json", status)
    sup = supervisors(store, command=fake())  # a fresh UI process
    try:
        sup.tick()
        status = store.status(run_id)
        assert status.state == end_state
        assert sup._children == {}  # never a second worker for the same run
        if end_state == INTERRUPTED:
            assert "restarted" in status.reason
        else:  # the adopted worker dies later: marked failed, and the zombie is not taken for alive
            worker.kill()
            wait_for(lambda: not store.worker_alive(run_id, store.recorded_status(run_id)))  # unreaped: a zombie
            sup.tick()
            assert (store.status(run_id).state, store.status(run_id).failure) == (FAILED, "killed")
    finally:
        if worker:
            worker.kill()
            worker.wait()


def test_a_refused_worker_leaves_the_run_to_the_one_that_holds_it(store, supervisors):
    """A worker started by hand took the run while it waited in the queue: the queue's own worker is refused (exit 3)
    and the run is neither marked failed nor started twice; Stop reaches the worker that trains it."""
    (run_id,) = supervisors(store).submit([config()])
    holder = lock_holder(store.lock_path(run_id))
    sup = supervisors(store, command=lambda run_yaml, resume: [sys.executable, "-c", "raise SystemExit(3)",
                                                                str(run_yaml)])
    try:
        sup.tick()  # starts the queued run; its worker is refused
        assert sup._children[run_id].wait(timeout=10) == 3
        sup.tick()
        sup.tick()
        assert state(store, run_id) == RUNNING and sup._children == {}
        sup.stop(run_id)  # the pid in the status is the refused worker's: the lock names the one to stop
        assert holder.wait(timeout=10) == -signal.SIGTERM
        sup.tick()
        assert (state(store, run_id), store.status(run_id).failure) == (FAILED, "killed")
    finally:
        holder.kill()
        holder.wait()


def test_a_dead_worker_on_a_full_disk_is_not_shown_as_training(store, supervisors, monkeypatch):
    """The worker died and nothing can write its status (the disk is full): status.json keeps saying running, but
    the supervisor, the page and every other reader see the run failed, and the failing round is logged once."""
    from components import train_tab

    (run_id,) = supervisors(store).submit([config()])
    store.update_status(run_id, state=RUNNING, pid=dead_pid())

    def no_room(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(RunStore, "write_status", no_room)
    monkeypatch.setattr(run_store, "free_bytes", lambda path: 0)
    sup = supervisors(store, command=fake())
    with pytest.raises(OSError):
        sup.tick()  # it cannot record the end
    assert store.recorded_status(run_id).state == RUNNING
    for seen in (sup.statuses()[run_id], store.status(run_id)):
        assert (seen.state, seen.failure) == (FAILED, "disk") and "Free space" in seen.reason
    assert sup.active() is None and "Training now" not in train_tab.queue_text(sup.statuses())


def test_a_failing_round_is_logged_once_not_twice_a_second(store, supervisors, monkeypatch, caplog):
    sup = supervisors(store, poll_s=0.01)
    rounds = []

    def failing_tick():
        rounds.append(1)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(sup, "tick", failing_tick)
    with caplog.at_level(logging.INFO, logger=jobs.log.name):
        sup.start()
        wait_for(lambda: len(rounds) >= 20)
        monkeypatch.setattr(sup, "tick", lambda: None)  # space was freed
        wait_for(lambda: any("working again" in r.getMessage() for r in caplog.records))
        sup.close()
    assert [r.getMessage() for r in caplog.records if "tick failed" in r.getMessage()] == [
        "run supervisor: tick failed; trying again (the same error again is not logged)"]


def test_worker_outlives_its_supervisor(store, supervisors):
    """Closing the UI's supervisor leaves the training process running; the next one re-attaches and sees it end."""
    first = supervisors(store, command=fake(steps=30, sleep=0.05))
    (run_id,) = first.submit([config()])
    first.tick()
    first.close()
    second = supervisors(store, command=fake())
    second.tick()
    assert state(store, run_id) == RUNNING and second._children == {}
    first._children[run_id].wait(timeout=20)  # (it is this test process's child: reap it)
    wait_for(lambda: state(store, run_id) == COMPLETED)


def test_fresh_restart_of_a_run_without_checkpoint_clears_its_old_curve(store, supervisors):
    sup = supervisors(store, command=fake(steps=2, sleep=0.01))
    (run_id,) = sup.submit([config()])
    store.append_metric(run_id, {"step": 7, "loss": 9.0})
    sup.tick()
    sup._children[run_id].wait(timeout=10)
    sup.tick()
    assert [r["step"] for r in store.metrics(run_id)] == [1, 2, 2]  # two steps and the final eval


# --- metrics lines and run folders that are damaged -------------------------------------------------------------
@pytest.mark.parametrize("lines, train, evals", [
    (['{"step": 1, "loss": 2.0}', '{"step": 2, "lo', '{"step": 3, "loss": 1.0}'], [(1, 2.0), (3, 1.0)], []),
    (['[1, 2]', '"text"', 'null', '{"step": "2", "loss": 1}', '{"step": true, "loss": 1}', '{"step": 1.5, "loss": 1}'],
     [], []),
    (['{"step": 1, "loss": NaN}', '{"step": 2, "loss": "x"}', '{"step": 2, "eval_loss": 1.5}'],
     [(1, None), (2, None)], [(2, 1.5)]),
    (['{"step": 1, "loss": 3.0}', '{"step": 2, "loss": 2.0}', '{"step": 2, "loss": 2.5}'], [(1, 3.0), (2, 2.5)], []),
    (['\x00\x00\x00', '{"step": -1, "loss": 1}', '', '{"step": 4, "eval_loss": Infinity}'], [], []),
    (['{"step": ' + "9" * 400 + ', "loss": 1}', '{"step": 2, "loss": 1e999, "lr": -1e999}'], [(2, None)], []),
])
def test_garbled_metrics_lines_are_skipped(store, lines, train, evals):
    run_id = store.create(config())
    store.metrics_path(run_id).write_text("\n".join(lines) + "\n")
    c = history.curves(store.metrics(run_id))
    assert c.train == train and c.eval == evals


@pytest.mark.parametrize("damage, problem", [
    (lambda d: (d / "run.yaml").write_text("model: [unclosed"), "run.yaml is missing or garbled"),
    (lambda d: (d / "run.yaml").write_text("no_such_field: 1\n"), "run.yaml is missing or garbled"),
    (lambda d: (d / "status.json").write_text('{"state": "runn'), "status.json was unreadable"),
    (lambda d: (d / "status.json").unlink(), "status.json is missing"),
])
def test_damaged_run_folders_are_listed_as_broken(store, supervisors, damage, problem):
    good = store.create(config())
    bad = store.create(config(seed=1))
    damage(store.dir(bad))
    summaries = {s.run_id: s for s in history.list_runs(store)}
    assert summaries[good].state == QUEUED
    assert summaries[bad].state == history.BROKEN and summaries[bad].problem == problem
    supervisors(store, command=fake()).tick()  # the supervisor steps over it too
    supervisors(store).delete(bad)
    assert not store.dir(bad).exists()


# --- the real worker -----------------------------------------------------------------------------------------
@pytest.mark.slow
def test_real_worker_through_the_queue_killed_then_resumed(store, supervisors, tiny_model_dir, tmp_path):
    """The contract end to end: `launch.py train` started by the supervisor, SIGKILLed, marked, resumed, finished."""
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps({"instruction": f"Name a colour ({i}).", "input": "",
                                        "output": f"Colour number {i} is blue, like the sea. " * 2}) + "\n"
                            for i in range(24)))
    sup = supervisors(store, poll_s=0.5).start()  # the real command: launch.py train RUN.yaml [--resume]
    settings = dict(model=str(tiny_model_dir), dataset=str(rows), batch_size=4, cutoff_len=64, max_steps=2000,
                    save_every=2, keep_last=2, learning_rate=1e-3, val_split=0.2)
    (run_id,) = sup.submit([RunConfig(**settings)])
    wait_for(lambda: len(store.checkpoints(run_id)) >= 2, timeout=120)
    os.kill(store.status(run_id).pid, signal.SIGKILL)
    killed_at = time.time()
    wait_for(lambda: recorded(store, run_id) == FAILED, timeout=5)
    assert time.time() - killed_at < 5 and store.status(run_id).failure == "killed"
    checkpoint_step = int(store.checkpoints(run_id)[-1].name.split("-")[1])

    config = store.config(run_id)
    config.max_steps = checkpoint_step + 2  # finish soon after resuming
    store.config_path(run_id).write_text(config.to_yaml())
    sup.resume(run_id)
    wait_for(lambda: state(store, run_id) == COMPLETED, timeout=120)
    steps = [s for s, _ in history.curves(store.metrics(run_id)).train]
    assert steps == list(range(1, checkpoint_step + 3))
    assert "--resume" in store.log_path(run_id).read_text()


# --- several processes under accelerate's launcher ------------------------------------------------------------
@pytest.mark.parametrize("gpus, resume, launcher", [
    (1, False, []),
    (1, True, []),
    (2, False, ["-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]),
    (8, True, ["-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "8"]),
])
def test_train_command_launches_one_worker_per_gpu(tmp_path, gpus, resume, launcher):
    run_yaml = tmp_path / "runs" / "r1" / "run.yaml"
    run_yaml.parent.mkdir(parents=True)
    run_yaml.write_text(config(gpus=gpus, strategy="fsdp" if gpus > 2 else "ddp").to_yaml())
    cmd = jobs.train_command(run_yaml, resume)
    worker = [str(jobs.LAUNCH), "train", str(run_yaml.resolve())] + (["--resume"] if resume else [])
    assert cmd[0] == sys.executable and cmd[1:len(launcher) + 1] == launcher
    assert cmd[-len(worker):] == worker  # the worker reads the strategy from run.yaml: the launcher needs none
    if gpus > 1:
        port = int(cmd[cmd.index("--main_process_port") + 1])
        assert 1024 <= port < 65536 and cmd == jobs.train_command(run_yaml, resume)  # shown = run, while free
    assert jobs.train_command(run_yaml, resume, config(gpus=1)) == [sys.executable, *worker]  # given config wins


@pytest.mark.parametrize("content", ["gpus: [", "gpus: 0\n", None])
def test_an_unreadable_run_yaml_runs_in_one_process_and_the_worker_says_why(tmp_path, content):
    run_yaml = tmp_path / "run.yaml"
    if content is not None:
        run_yaml.write_text(content)
    assert jobs.train_command(run_yaml) == [sys.executable, str(jobs.LAUNCH), "train", str(run_yaml.resolve())]


def test_a_taken_port_is_not_used(tmp_path):
    run_yaml = tmp_path / "run.yaml"
    first = jobs.launcher_port(run_yaml)
    with socket.socket() as s:
        s.bind(("", first))
        assert jobs.launcher_port(run_yaml) != first


@needs_gloo
@pytest.mark.slow
def test_two_process_run_through_the_queue_stopped_then_resumed(store, supervisors, tiny_model_dir, tmp_path):
    """gpus=2: the supervisor starts accelerate's launcher, two gloo workers train; Stop reaches both, the run ends
    stopped with a checkpoint; Resume finishes it, and rank 0 alone wrote one metrics line per step."""
    from tests.test_train import write_rows

    rows = write_rows(tmp_path / "rows.jsonl", n=20)
    sup = supervisors(store, poll_s=0.3).start()
    settings = dict(model=str(tiny_model_dir), dataset=str(rows), batch_size=4, cutoff_len=64, max_steps=5000,
                    save_every=0, keep_last=2, learning_rate=1e-3, val_split=0.2, gpus=2)
    (run_id,) = sup.submit([RunConfig(**settings)])
    wait_for(lambda: store.status(run_id).step >= 2, timeout=120)
    sup.stop(run_id)
    wait_for(lambda: state(store, run_id) not in (RUNNING, QUEUED), timeout=60)
    status = store.status(run_id)
    assert status.state == STOPPED, (status, store.log_tail(run_id, 30))
    assert store.checkpoints(run_id)[-1].name == f"step-{status.step}"
    assert "accelerate.commands.launch" in store.log_path(run_id).read_text()
    stopped_at = status.step

    config_ = store.config(run_id)
    config_.max_steps = stopped_at + 2
    store.config_path(run_id).write_text(config_.to_yaml())
    sup.resume(run_id)
    wait_for(lambda: state(store, run_id) not in (RUNNING, QUEUED), timeout=120)
    assert state(store, run_id) == COMPLETED, store.log_tail(run_id, 30)
    steps = [r["step"] for r in store.metrics(run_id) if "loss" in r]
    assert steps == list(range(1, stopped_at + 3))  # one writer: no step twice, none missing
    assert "[rank 1]" not in store.log_path(run_id).read_text()


@needs_gloo
@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/cmdline").exists(), reason="finds the workers through /proc")
@pytest.mark.parametrize("rank", [0, 1])
def test_a_worker_killed_under_the_launcher_is_named_as_killed(store, supervisors, tiny_model_dir, tmp_path, rank):
    """SIGKILL one of two workers mid-run: the run fails as killed, naming the process and the signal, whether
    rank 0 (which writes the status) died or survived to record the broken connection as an error."""
    from tests.test_train import write_rows

    rows = write_rows(tmp_path / "rows.jsonl", n=20)
    sup = supervisors(store, poll_s=0.3).start()
    (run_id,) = sup.submit([RunConfig(model=str(tiny_model_dir), dataset=str(rows), batch_size=4, cutoff_len=64,
                                      max_steps=5000, save_every=0, learning_rate=1e-3, val_split=0.2, gpus=2)])
    wait_for(lambda: store.status(run_id).step >= 2, timeout=120)
    (victim,) = [pid for pid in processes_naming(run_id)
                 if f"RANK={rank}".encode() in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")]
    os.kill(victim, signal.SIGKILL)
    wait_for(lambda: recorded(store, run_id) not in (RUNNING, QUEUED), timeout=90)
    wait_for(lambda: run_id not in sup._children, timeout=30)  # the launcher reaped: its report is in the log
    with sup._locked():  # and the round that reaped it has recorded what it says
        status = store.status(run_id)
    assert (status.state, status.failure) == (FAILED, "killed"), (status, store.log_tail(run_id, 30))
    assert f"Training process {rank} " in status.reason and "SIGKILL" in status.reason


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/cmdline").exists(), reason="finds the workers through /proc")
def test_a_stop_before_the_workers_load_reaches_them_through_the_launcher(store, supervisors):
    """Until rank 0 writes its own pid, Stop signals accelerate's launcher, which ends its workers and exits with 1."""
    sup = supervisors(store)
    (run_id,) = sup.submit([config(gpus=2)])
    sup.tick()
    wait_for(lambda: len(processes_naming(run_id)) == 3, timeout=30)  # the launcher and its two workers
    assert store.status(run_id).pid == sup._children[run_id].pid  # no worker has loaded: the pid is the launcher's
    sup.stop(run_id)
    assert sup._children[run_id].wait(timeout=30) == 1
    sup.tick()
    status = store.status(run_id)
    assert status.state == STOPPED and "before the training process could save" in status.reason
    wait_for(lambda: not processes_naming(run_id), timeout=10)  # no worker left behind


def processes_naming(text: str) -> list[int]:
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if text.encode() in Path(f"/proc/{pid}/cmdline").read_bytes():
                found.append(int(pid))
        except OSError:
            continue
    return found
