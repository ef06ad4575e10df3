"""The served app under several users at once (gradio_client on loopback): per-session state, one shared queue, and
concurrent polling and chatting while a tiny run trains, with no errors and no lost run."""
from __future__ import annotations

import threading
import urllib.request
from pathlib import Path

import gradio_client
import pytest

from app.chat.panes import run_choices
from app.runs.store import COMPLETED, FINAL_STATES, QUEUED, RUNNING, STOPPED, RunStore
from tests.browser import served_app
from tests.conftest import build_tiny_model
from tests.helpers import wait_for

ROOT = Path(__file__).resolve().parent.parent
PIRATE = str(ROOT / "assets" / "datasets" / "pirate-persona.jsonl")
LOAD_SECONDS = 25  # the concurrent phase: long enough for the tiny run to train and checkpoint
CLIENTS = 4
pytestmark = pytest.mark.slow  # a served app and a training run


@pytest.fixture(scope="module")
def served(tmp_path_factory, embedded_model_dir):
    """(url, workspace folder, tiny model folder) of one app process shared by the tests here."""
    root = tmp_path_factory.mktemp("load")
    tiny = build_tiny_model(root / "tiny-llama", embedded_model_dir)
    with served_app(root / "workspace") as url:
        yield url, root / "workspace", str(tiny)


# --- finding endpoints by the widgets that trigger them -------------------------------------------------------------
# The components set no api_name, so Gradio numbers handlers by function name (/lambda_4 ...), which shifts whenever
# a tab adds an event. The button or output a user sees is the stable handle.
def _component(config: dict, **props) -> int:
    found = [c["id"] for c in config["components"] if all(c.get("props", {}).get(k) == v for k, v in props.items())]
    assert len(found) == 1, f"{props}: {len(found)} components"
    return found[0]


def endpoint(client, event: str = "click", output: dict | None = None, **trigger) -> str:
    """The api_name of the handler of `event` on the component with props `trigger` (or the one that writes the
    component with props `output`)."""
    config = client.config
    if output:
        target = _component(config, **output)
        deps = [d for d in config["dependencies"] if target in d["outputs"]]
    else:
        target = _component(config, **trigger)
        deps = [d for d in config["dependencies"] if [target, event] in [list(t) for t in d["targets"]]]
    assert deps and deps[0].get("api_name"), (trigger, output, event)
    return "/" + deps[0]["api_name"]


class User:
    """One browser session: its own gradio_client.Client, so its own gr.State values."""

    def __init__(self, url: str, tiny: str) -> None:
        self.client = gradio_client.Client(url, verbose=False)
        self.tiny = tiny
        c = self.client
        self.api = dict(
            pick=endpoint(c, "input", label="Dataset"),
            start=endpoint(c, value="Start"),
            cancel=endpoint(c, value="Cancel queued"),
            live=endpoint(c, "input", label="Run shown"),
            runs=endpoint(c, value="Refresh"),
            datasets=endpoint(c, value="Refresh list"),
            estimate=endpoint(c, output={"label": "Memory for these settings"}),
            chat_runs=endpoint(c, value="Refresh runs"),
            send=endpoint(c, value="Send to all panes"),
            tie=endpoint(c, value="They are equally good"),
        )

    def call(self, name: str, *args):
        return self.client.predict(*args, api_name=self.api[name])

    def pick_dataset(self, path: str = PIRATE):
        # path, model, cutoff, batch, gradient accumulation, validation share, validation mode, validation dataset
        return self.call("pick", path, self.tiny, 128, 2, 1, 0.1, "share", None)

    def start(self, steps: int = 30) -> str:
        # Start takes its inputs as a set, which gradio orders as the widgets were created: ui.py's shared model,
        # cutoff, batch, gradient accumulation, validation share and system prompt, then the Train tab's own controls
        # (learning rate, epochs, max steps, warm-up, schedule, seed, train on prompt, assistant turns, beta, gamma,
        # validation every, checkpoint every, kept). Ten checkpoints kept, so none a chat has just listed is rotated
        # away under it.
        message, _follow = self.call("start", self.tiny, 128, 2, 1, 0.1, "", 1e-3, 1, steps, 0, "constant", 7, False,
                                     "all", 0.1, 0.5, 0, max(10, steps // 5), 10)
        return message

    def live(self, run_id: str | None):
        """[follow, run dropdown, queue, status, progress, figure, log, command] for one run."""
        return self.call("live", run_id)

    def estimate(self) -> str:
        from components.method_tab import knob_fields, method_values

        lora = method_values("lora")["args"]  # every knob widget as a fresh page sets it
        knobs = [lora.get(name, f.default) for name, f in knob_fields().items()]
        args = [self.tiny, "sft", "lora", "auto", "adamw", False, 2, 128, 1, *knobs]  # ..., batch, cutoff, grad accum
        summary, verdict = self.call("estimate", *args)[:2]
        return f"{summary}\n{verdict}"

    def chat(self, message: str, keys: list[str]) -> str:
        self.call("chat_runs", [])  # fills this session's run list, so the checkpoint becomes a valid choice
        outputs = self.call("send", self.tiny, keys, False, message, "", 8, 0.0, 1.0, 1.0, 0, *[[]] * 5)
        return outputs[0]  # the status line


def newest_run(store: RunStore, exclude: set[str] = frozenset()) -> str | None:
    if not store.root.is_dir():
        return None
    ids = [p.name for p in sorted(store.root.iterdir(), key=lambda p: p.stat().st_mtime) if p.is_dir()]
    ids = [i for i in ids if i not in exclude and (p := store.root / i / "status.json").is_file()]
    return ids[-1] if ids else None


def test_two_sessions_share_runs_and_queue_but_not_state(served):
    url, workspace, tiny = served
    store = RunStore(workspace / "runs")
    ann, bob = User(url, tiny), User(url, tiny)

    ann.pick_dataset()
    assert "No dataset chosen" in bob.start()  # Ann's dataset choice is hers alone
    assert newest_run(store) is None

    said = ann.start()
    assert "Starting" in said or "Queued" in said, said
    first = newest_run(store)
    wait_for(lambda: store.status(first).state == RUNNING, 30, 0.5, message=lambda: store.status(first))

    bob.pick_dataset()
    queued = bob.start()
    assert "Queued" in queued, queued  # a second Start waits its turn instead of failing
    second = newest_run(store, {first})
    assert store.status(second).state == QUEUED

    views = [user.live(None) for user in (ann, bob)]
    assert views[0][2] == views[1][2], "two sessions see different queues"
    assert first in views[0][2] and second in views[0][2]

    assert "Cancelled" in ann.call("cancel", second)  # Ann can act on Bob's queued run: one shared queue
    assert store.status(second).state == STOPPED
    assert store.status(first).state in (RUNNING, COMPLETED)

    # Chat sessions: Bob never sent a message, so his vote is refused even after Ann chatted and voted.
    keys = wait_for(lambda: [k for _, k in run_choices(store) if k.startswith(first)][:1], 60, 0.5,
                    message=f"no checkpoint of {first} to chat with")
    assert ann.chat("Ahoy?", keys).startswith("Done"), "Ann's chat did not answer"
    assert ann.call("tie")[0].startswith("Vote saved")
    assert bob.call("tie")[0] == "Send a message first."


def test_concurrent_clients_while_a_run_trains(served):
    url, workspace, tiny = served
    store = RunStore(workspace / "runs")
    starter = User(url, tiny)
    starter.pick_dataset()
    assert "Starting" in (said := starter.start(steps=150)) or "Queued" in said, said
    run_id = newest_run(store)

    errors: list[str] = []
    calls = {"live": 0, "runs": 0, "datasets": 0, "estimate": 0, "chat": 0}
    stop = threading.Event()

    def poller(user: User, i: int) -> None:
        user.live(None)  # as a fresh page does: fills this session's run list, so the run is a valid pick
        while not stop.is_set():
            try:
                view = user.live(run_id)
                assert run_id in view[3], f"live view lost {run_id}: {view[3][:200]}"
                calls["live"] += 1
                user.call("runs", None)  # no sweep shown
                calls["runs"] += 1
                if i % 2:
                    user.call("datasets")
                    calls["datasets"] += 1
                else:
                    assert "GiB" in user.estimate()
                    calls["estimate"] += 1
            except Exception as e:  # noqa: BLE001 - every failure is collected and reported below
                errors.append(f"client {i}: {type(e).__name__}: {e}")
                return

    def current_keys() -> list[str]:
        return [k for _, k in run_choices(store) if k.startswith(run_id)][:1]

    def chatter(user: User) -> None:
        while not stop.is_set():
            # Picked afresh each time: a checkpoint's key ("run/step-N") stops being a choice once the run finishes
            # and only the run's own key is listed.
            keys = wait_for(lambda: stop.is_set() or current_keys(), LOAD_SECONDS, 0.5, fail=False)
            if not isinstance(keys, list):
                return
            try:
                status = user.chat("Where be the treasure?", keys)
                assert status.startswith("Done"), status
                calls["chat"] += 1
            except Exception as e:  # noqa: BLE001
                if "not in the list of choices" in str(e) and keys != current_keys():
                    continue  # the run finished between picking the key and sending: pick again
                errors.append(f"chat: {type(e).__name__}: {e}")
                return

    users = [User(url, tiny) for _ in range(CLIENTS)]
    threads = [threading.Thread(target=poller, args=(u, i)) for i, u in enumerate(users[:-1])]
    threads.append(threading.Thread(target=chatter, args=(users[-1],)))
    for t in threads:
        t.start()
    # the concurrent phase: until the run ends, a client fails, or LOAD_SECONDS pass
    wait_for(lambda: store.status(run_id).state in FINAL_STATES or errors, LOAD_SECONDS, 0.5, fail=False)
    stop.set()
    for t in threads:
        t.join(120)
    assert not errors, errors
    assert all(not t.is_alive() for t in threads)
    # the run's status too: a run that ended before the clients got going reads differently from a slow server
    assert calls["live"] >= CLIENTS and calls["estimate"] and calls["datasets"], (calls, store.status(run_id))

    # The run was not lost: it finished, or keeps training towards its last step.
    final = wait_for(lambda: store.status(run_id).state in FINAL_STATES and store.status(run_id), 90, 0.5,
                     message=lambda: store.status(run_id))
    assert final.state == COMPLETED, final
    assert store.metrics(run_id), "no metrics recorded"
    assert urllib.request.urlopen(url, timeout=10).status == 200
