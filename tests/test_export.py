"""Exporting a run: the adapter zip and the merged model load back and answer exactly as the run does; pushes to the
hub refuse offline, without a token or with a bad name, in plain words."""
from __future__ import annotations

import zipfile
from pathlib import Path

import pytest

from app.runs import export
from app.runs.store import FAILED, RUNNING, RunStore
from app.spec import RunConfig
from app.workspace import Workspace
from lora_runs import save_full_run, save_lora_run




pytestmark = pytest.mark.usefixtures("one_thread")

@pytest.fixture(scope="module")
def ws(tmp_path_factory, tiny_model_dir) -> Workspace:
    workspace = Workspace.open(tmp_path_factory.mktemp("export") / "workspace")
    store = RunStore(workspace.runs)
    ref = str(tiny_model_dir)
    save_lora_run(store, tiny_model_dir, ref, "lora", r=4, seed=1)
    save_full_run(store, tiny_model_dir, ref, "full", seed=2)
    save_lora_run(store, tiny_model_dir, ref, "crashed", r=4, seed=3, state=FAILED)
    store.create(RunConfig(model=ref, method="lora", run_id="training"))
    store.update_status("training", state=RUNNING)
    return workspace


def greedy_ids(model, tokenizer) -> list[int]:
    import torch

    ids = tokenizer("Tell me about the sea.", return_tensors="pt")
    with torch.inference_mode():
        out = model.generate(**ids, max_new_tokens=10, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return out[0, ids["input_ids"].shape[1]:].tolist()


@pytest.fixture(scope="module")
def run_answer(ws, tiny_model_dir) -> list[int]:
    """The run's own greedy answer: the base with the run's final/ adapter, as peft loads it."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    plain = greedy_ids(base, AutoTokenizer.from_pretrained(tiny_model_dir))
    model = PeftModel.from_pretrained(base, RunStore(ws.runs).final_dir("lora")).eval()
    answer = greedy_ids(model, AutoTokenizer.from_pretrained(tiny_model_dir))
    assert answer != plain  # the adapter changes the answer, so a lost adapter would show
    return answer


def test_adapter_zip_loads_back_with_peft_and_answers_the_same(ws, tiny_model_dir, run_answer, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = export.adapter_zip(ws, "lora")
    assert path == ws.root / "exports" / "lora-adapter.zip"
    with zipfile.ZipFile(path) as zf:
        assert {"adapter_config.json", "adapter_model.safetensors"} <= set(zf.namelist())
        zf.extractall(tmp_path / "unzipped")
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), tmp_path / "unzipped")
    assert greedy_ids(model.eval(), AutoTokenizer.from_pretrained(tiny_model_dir)) == run_answer
    assert not list(path.parent.glob(".*.tmp"))  # no half-written zip left behind


def test_merged_model_loads_without_peft_and_answers_the_same(ws, run_answer):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = export.merge_adapter(ws, "lora")
    assert folder == ws.root / "exports" / "lora-merged"
    assert (folder / "model.safetensors").is_file() and (folder / "tokenizer_config.json").is_file()
    assert not (folder / "adapter_config.json").exists()
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    assert not any("lora" in name for name, _ in model.named_parameters())
    assert greedy_ids(model, AutoTokenizer.from_pretrained(folder)) == run_answer
    assert export.merge_adapter(ws, "lora") == folder  # a second merge replaces the first


@pytest.mark.parametrize("action", [export.adapter_zip, export.merge_adapter])
@pytest.mark.parametrize("run_id, words", [
    (None, "Choose a run"),
    ("", "Choose a run"),
    ("crashed", "failed"),
    ("training", "not saved its final weights"),
    ("nowhere", "not in this workspace"),
    ("../../etc", "not in this workspace"),
])
def test_runs_that_cannot_be_exported_say_why(ws, action, run_id, words):
    with pytest.raises(export.ExportError, match=words):
        action(ws, run_id)


@pytest.mark.parametrize("action, words", [
    (export.adapter_zip, "trained the whole model"),
    (export.merge_adapter, "Only LoRA-family runs"),
])
def test_a_full_fine_tune_has_no_adapter_to_zip_or_merge(ws, action, words):
    with pytest.raises(export.ExportError, match=words):
        action(ws, "full")


# --- pushing to the hub ---------------------------------------------------------------------------------------
class FakeHub:
    """Stands in for huggingface_hub.HfApi: records what would be uploaded, or fails like the network does."""
    calls: list = []
    fail: Exception | None = None

    def __init__(self, token=None):
        self.token = token

    def create_repo(self, repo_id, private, exist_ok):
        if FakeHub.fail:
            raise FakeHub.fail
        FakeHub.calls.append(("create", repo_id, private, self.token))

    def upload_folder(self, folder_path, repo_id, commit_message):
        FakeHub.calls.append(("upload", Path(folder_path).name, repo_id))
        return type("Info", (), {"commit_url": f"https://huggingface.co/{repo_id}/commit/1"})()


@pytest.fixture
def online(monkeypatch):
    import huggingface_hub

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeHub)
    FakeHub.calls, FakeHub.fail = [], None
    return FakeHub


def test_push_uploads_the_folder_privately(ws, online):
    final = RunStore(ws.runs).final_dir("lora")
    assert export.push_to_hub(final, "me/tiny-lora", " hf_token ") == "https://huggingface.co/me/tiny-lora/commit/1"
    assert online.calls == [("create", "me/tiny-lora", True, "hf_token"), ("upload", "final", "me/tiny-lora")]


@pytest.mark.parametrize("repo, token, offline, words", [
    ("me/tiny-lora", "hf_x", "1", "runs offline"),
    ("me/tiny-lora", "hf_x", "true", "runs offline"),
    ("me/tiny-lora", "", "0", "Paste a hub access token"),
    ("me/tiny-lora", None, "0", "Paste a hub access token"),
    ("tiny-lora", "hf_x", "0", "not a hub repository name"),
    ("", "hf_x", "0", "not a hub repository name"),
    ("/abs/path", "hf_x", "0", "not a hub repository name"),
])
def test_push_refusals_say_what_to_do(ws, online, monkeypatch, repo, token, offline, words):
    monkeypatch.setenv("HF_HUB_OFFLINE", offline)
    with pytest.raises(export.ExportError, match=words):
        export.push_to_hub(RunStore(ws.runs).final_dir("lora"), repo, token)
    assert online.calls == []


def test_push_failure_is_plain_and_keeps_the_files(ws, online):
    online.fail = ConnectionError("Name or service not known")
    with pytest.raises(export.ExportError, match="Could not push.*ConnectionError.*files stay in"):
        export.push_to_hub(RunStore(ws.runs).final_dir("lora"), "me/tiny-lora", "hf_x")


def test_push_before_export_says_export_first(ws, online):
    with pytest.raises(export.ExportError, match="Export the adapter or merge"):
        export.push_to_hub(ws.root / "exports" / "never-made", "me/x", "hf_x")
