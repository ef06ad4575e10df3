"""The Data tab's handlers, called directly (no browser): upload, mapping, save, preview, rendered row, lengths, split."""
from __future__ import annotations

import asyncio
import json
from pathlib import Path

import gradio as gr
import orjson
import pytest

from app.data import dataset as data
from app.data import store as data_store
from app.data.template import render
from components import data_tab


@pytest.fixture
def model_ref(embedded_model_dir) -> str:
    return str(embedded_model_dir)  # a folder reference: only its tokenizer is loaded


def write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def test_picker_lists_demos_and_describes_them(workspace):
    choices = data_tab.dataset_choices(workspace)
    assert [label.split(" · ")[0] for label, _ in choices] == ["Brambleway Bikes help desk", "Always answer in JSON", "Pirate persona"]
    pirate = next(path for label, path in choices if label.startswith("Pirate"))
    text = data_tab.describe_dataset(pirate)
    assert "300 rows" in text and "Why do cats purr?" in text
    assert "Pick a dataset" in data_tab.describe_dataset("")


def test_alpaca_upload_is_saved_and_previewed(tmp_path, workspace, model_ref):
    upload = write_jsonl(tmp_path / "mine.jsonl", [
        {"instruction": "Greet me", "input": "", "output": "Hello!"},
        {"instruction": "Count", "input": "to three", "output": 123},
        {"instruction": "Say bye", "input": "", "output": "Bye!"},
    ])
    report, boxes = data_tab.analyse(upload, "fix")
    assert not report.mapping.needs_confirmation and report.kept == 3 and report.fixed == 1
    assert [b.value for b in boxes] == ["instruction", "input", "output", data_tab.NO_CHOICE]
    assert data_tab.findings_rows(report) == [[
        "error", "mine.jsonl line 2", "output", "'output' is a number (123), not text",
        "put it in quotes in the file, or choose 'fix' to use it as the text \"123\"", "fixed",
    ]]
    path, message = data_tab.save(workspace, upload, report)
    assert "Saved as **mine**" in message and (path in [p for _, p in data_tab.dataset_choices(workspace)])
    assert "mine" in data_tab.describe_dataset(path) and "not text: 1" in data_tab.describe_dataset(path)

    rows, note = data_tab.preview_table(path, model_ref, workspace)
    assert note == "" and rows[1] == [2, "Count", "to three", "123"]
    prompt, response, row_note = data_tab.rendered_row(path, model_ref, 2, 256, workspace)
    view = data_store.open_dataset(path, model_ref, workspace.models)
    expected = render(view.tokenizer, {"instruction": "Count", "input": "to three", "output": "123"})
    assert (prompt, response) == (expected.prompt, expected.response)
    assert "Count\n\nto three" in prompt and response.startswith("123")
    assert row_note == f"Line 2: {view.report.lengths[1]} tokens once templated."


def test_renamed_columns_wait_for_confirmation(tmp_path, workspace):
    upload = write_jsonl(tmp_path / "qa.jsonl", [{"question": "q", "answer": "a", "id": 1}])
    report, boxes = data_tab.analyse(upload, "drop")
    assert report.mapping.needs_confirmation and [b.value for b in boxes] == ["question", "", "answer", ""]
    assert "Check the column mapping" in data_tab.report_markdown(report)
    assert [c[1] for c in boxes[0].choices] == ["", "question", "answer", "id"]
    # The user fixes the mapping: the id column as the answer.
    chosen = data_tab.mapping_of(["question", "", "id", ""])
    fixed, _ = data_tab.analyse(upload, "fix", chosen)
    assert fixed.rows == [{"instruction": "q", "input": "", "output": "1"}]


def test_unusable_upload_says_why(tmp_path):
    upload = tmp_path / "bad.csv"
    upload.write_text("text\nhello\n")
    report, _ = data_tab.analyse(str(upload), "drop")
    text = data_tab.report_markdown(report)
    assert text.startswith("⛔") and "no column holds the instruction and the output" in text and "'text'" in text


def test_lengths_split_and_steps(tmp_path, workspace, model_ref):
    pirate = str(data.DEMO_DIR / "pirate-persona.jsonl")
    text, fig = data_tab.length_summary(pirate, model_ref, 256, 4, 1, 0.1, data_tab.VAL_SHARE, None, workspace)
    assert "**270 training rows**, 30 validation rows" in text and "**68 steps per epoch**" in text
    assert "accumulation" not in text
    assert "**0 rows (0.0%)**" in text and sum(fig.data[0].y) == 300
    text, _ = data_tab.length_summary(pirate, model_ref, 32, 8, 2, 0.1, data_tab.VAL_SHARE, None, workspace)
    assert "× 2 accumulation: **17 steps per epoch**" in text and "**300 rows (100.0%)**" in text
    helpdesk = str(data.DEMO_DIR / "helpdesk.jsonl")
    text, _ = data_tab.length_summary(pirate, model_ref, 256, 4, 1, 0.1, data_tab.VAL_FILE, helpdesk, workspace)
    assert "**300 training rows**, 264 validation rows from the separate dataset" in text


def test_steps_per_epoch_follow_the_gradient_accumulation_set_in_the_train_tab(monkeypatch, workspace, model_ref):
    """Through the real page: the event that writes the Data tab's steps per epoch reads the Train tab's gradient
    accumulation slider, fires when it moves, and its figure changes with it."""
    from app.runs.jobs import Supervisor
    from app.runs.store import RunStore
    from components import train_tab, ui

    monkeypatch.setattr(ui, "model_summary", lambda ref, ws: "")  # the embedded model's config is slow to read
    monkeypatch.setattr(train_tab, "start_supervisor", lambda ws: Supervisor(RunStore(ws.runs)))
    page = ui.build_ui(workspace)
    blocks = list(page.blocks.values())
    histogram = next(b for b in blocks if isinstance(b, gr.Plot) and b.label == "Tokens per row once templated")
    accum = next(b for b in blocks if isinstance(b, gr.Slider) and b.label == "Gradient accumulation")
    picker = next(b for b in blocks if isinstance(b, gr.Dropdown) and b.label == "Dataset")
    model = next(b for b in blocks if isinstance(b, gr.Dropdown) and b.label == "Model")
    # the steps per epoch are written with the histogram, by one event per control they depend on
    redraws = [fn for fn in page.fns.values() if histogram in fn.outputs and (accum._id, "change") in fn.targets]
    assert len(redraws) == 1, "moving the gradient accumulation slider does not redraw the steps per epoch"
    (redraw,) = redraws
    assert accum in redraw.inputs

    def steps_text(accum_value: int) -> str:
        chosen = {picker: str(data.DEMO_DIR / "pirate-persona.jsonl"), model: model_ref, accum: accum_value}
        text, _ = redraw.fn(*[chosen.get(c, c.value) for c in redraw.inputs])  # the other controls as the page starts
        return text

    assert "**68 steps per epoch**" in steps_text(1)
    assert "× 2 accumulation: **34 steps per epoch**" in steps_text(2)


@pytest.mark.parametrize("problem", ["model without a tokenizer", "missing dataset"])
def test_problems_give_a_message_not_a_traceback(tmp_path, workspace, model_ref, problem):
    path, ref = str(data.DEMO_DIR / "json-answers.jsonl"), model_ref
    if problem == "model without a tokenizer":
        (tmp_path / "empty-model").mkdir()
        ref = str(tmp_path / "empty-model")
    else:
        path = str(tmp_path / "gone.jsonl")
    rows, note = data_tab.preview_table(path, ref, workspace)
    assert "⚠️" in note or problem == "missing dataset"
    prompt, response, row_note = data_tab.rendered_row(path, ref, 1, 256, workspace)
    assert (prompt, response) == ("", "") and row_note
    text, fig = data_tab.length_summary(path, ref, 256, 4, 1, 0.1, data_tab.VAL_SHARE, None, workspace)
    assert fig is None and "⚠️" in text


@pytest.mark.parametrize("row_value,line", [([7, "q", "", "a"], 7), (None, 1), ([], 1), (["x"], 1)])
def test_clicked_preview_row(row_value, line):
    assert data_tab.selected_line(row_value) == line


def data_tab_alone(workspace):
    """The Data tab built inside a page with the shared controls the rest of the page would make."""
    from app.handoff import MethodChoice
    from components.shared import Shared

    shared = Shared(
        workspace=workspace, model=gr.Dropdown(["embedded"], value="embedded"),
        cutoff_len=gr.Slider(32, 4096, value=256, render=False), batch_size=gr.Slider(1, 64, value=4),
        grad_accum=gr.Slider(1, 64, value=1), dataset=gr.State(""), val_dataset=gr.State(None),
        val_split=gr.Slider(0, 0.5, value=0.1, render=False), method_choice=gr.State(MethodChoice()),
    )
    data_tab.build(shared)
    return shared


def test_tab_builds_inside_the_page(workspace):
    with gr.Blocks():
        shared = data_tab_alone(workspace)
    assert shared.cutoff_len.is_rendered and shared.val_split.is_rendered


# --- the upload event of the real page, and what happens to Gradio's copy of the file ------------------------------
@pytest.fixture
def upload_cache(tmp_path, monkeypatch) -> Path:
    """Gradio's upload folder for this test: GRADIO_TEMP_DIR is read when a page is built and when an upload is saved."""
    cache = tmp_path / "gradio-uploads"
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(cache))
    return cache


def in_upload_cache(cache: Path, name: str, content: bytes) -> Path:
    path = cache / "5e1f0c" / name  # Gradio keeps each upload in a folder of its own inside its cache
    path.parent.mkdir(parents=True)
    path.write_bytes(content)
    return path


def upload_through_page(workspace, cache: Path, name: str, content: bytes, policy: str = "drop") -> dict:
    """Upload a file as the browser does: the Data tab's own upload event, with Gradio's preprocessing of the file and
    its encoding of the response, which is where text with lone surrogates failed (red badges, no message)."""
    from gradio.data_classes import FileData
    from gradio.state_holder import SessionState

    path = in_upload_cache(cache, name, content)
    with gr.Blocks() as page:
        data_tab_alone(workspace)
    file = next(b for b in page.blocks.values() if isinstance(b, gr.File))
    (event,) = [fn for fn in page.fns.values() if (file._id, "upload") in fn.targets]
    payload = FileData(path=str(path), orig_name=name).model_dump()
    sent = asyncio.run(page.process_api(block_fn=event, inputs=[payload, "", policy], state=SessionState(page)))
    orjson.dumps(sent, default=str)  # as Gradio's queue sends it to the browser
    return sent


GOOD_ROWS = [{"instruction": "Greet me", "input": "", "output": "Hello!"}, {"instruction": "Say bye", "input": "", "output": "Bye!"}]
RENAMED_ROWS = [{"question": "Greet me", "answer": "Hello!"}]
UPLOAD_CASES = [
    # (id, rows, the file is Gradio's upload (else the user's own path), saved at once, deleted when replaced)
    ("an Alpaca upload, saved at once", GOOD_ROWS, True, True, True),
    ("renamed columns wait for the mapping", RENAMED_ROWS, True, False, True),
    ("the user's own file, not an upload", GOOD_ROWS, False, True, False),
]


@pytest.mark.parametrize("case", UPLOAD_CASES, ids=[c[0] for c in UPLOAD_CASES])
def test_an_upload_stays_under_review_and_leaves_gradios_cache_when_replaced(tmp_path, workspace, upload_cache, case):
    """Gradio keeps every upload until the server stops: ours go when the next upload replaces them (or the session
    ends), not before, so the policy and the mapping can still be changed after the rows were saved."""
    _, rows, uploaded, saved, deleted = case
    content = "".join(json.dumps(r) + "\n" for r in rows).encode()
    if uploaded:
        path = in_upload_cache(upload_cache, "mine.jsonl", content)
    else:
        path = tmp_path / "mine.jsonl"
        path.write_bytes(content)
    source, text, *_ = data_tab.on_upload(workspace, str(path), "", "drop")
    assert ("Saved as **mine** (2 rows)" in text) == saved, text
    assert path.exists(), "the upload under review stays"
    if not saved:  # the user confirms the mapping: saved, still under review
        text, _, picked = data_tab.on_save(workspace, source, "drop", "question", "", "answer", "")
        assert "Saved as **mine** (1 row)" in text and picked.value.endswith("train.jsonl") and path.exists()
    second = upload_cache / "beef00" / "next.jsonl"
    second.parent.mkdir(parents=True)
    second.write_bytes("".join(json.dumps(r) + "\n" for r in GOOD_ROWS).encode())
    data_tab.on_upload(workspace, str(second), source, "drop")
    assert path.exists() != deleted and path.parent.exists() != deleted  # Gradio's folder for the upload goes too
    assert second.exists()


def test_the_session_end_takes_the_upload_under_review(workspace, upload_cache):
    with gr.Blocks():
        upload = data_tab.upload_section()
    assert upload.source.delete_callback is data_tab.discard_cached_upload  # Gradio calls it when the session ends
    path = in_upload_cache(upload_cache, "mine.jsonl", "".join(json.dumps(r) + "\n" for r in GOOD_ROWS).encode())
    data_tab.discard_cached_upload(str(path))
    assert not path.exists()
    data_tab.discard_cached_upload("")  # a session that uploaded nothing


def test_a_saved_upload_can_be_checked_again_until_it_leaves_the_cache(workspace, upload_cache):
    path = in_upload_cache(upload_cache, "mine.jsonl", "".join(json.dumps(r) + "\n" for r in GOOD_ROWS).encode())
    source, text, *_ = data_tab.on_upload(workspace, str(path), "", "drop")
    assert "Saved as **mine**" in text
    again = data_tab.on_analyse(workspace, source, "fix")  # the policy changed after the rows were saved
    assert "Saved as **mine" in again[1]
    path.unlink()  # the app was restarted: Gradio's cache is gone
    again = data_tab.on_analyse(workspace, source, "fix")
    assert again[1] == data_tab.UPLOAD_GONE and [v for i, v in enumerate(again) if i != 1] == [gr.skip()] * 7
    assert data_tab.on_remap(source, "fix", "instruction", "", "output", "")[0] == data_tab.UPLOAD_GONE
    assert data_tab.on_save(workspace, source, "fix", "instruction", "", "output", "")[0] == data_tab.UPLOAD_GONE
    assert "upload the file again" in data_tab.UPLOAD_GONE


@pytest.mark.parametrize("where, deleted", [
    ("inside the cache", True),
    ("outside the cache", False),
    ("a link inside the cache to a file outside", False),
    ("a link outside the cache to a file inside", False),
    ("the cache folder itself", False),
    ("a hub name", False),
])
def test_only_files_inside_the_upload_cache_are_deleted(tmp_path, where, deleted):
    cache, outside = tmp_path / "cache", tmp_path / "mine"
    (cache / "f00d").mkdir(parents=True)
    outside.mkdir()
    inside_file, own_file = cache / "f00d" / "a.jsonl", outside / "a.jsonl"
    inside_file.write_text("{}")
    own_file.write_text("{}")
    source = {
        "inside the cache": inside_file,
        "outside the cache": own_file,
        "a link inside the cache to a file outside": cache / "f00d" / "link.jsonl",
        "a link outside the cache to a file inside": outside / "link.jsonl",
        "the cache folder itself": cache,
        "a hub name": data.HUB_PREFIX + "owner/name",
    }[where]
    if "link inside" in where:
        source.symlink_to(own_file)
    elif "link outside" in where:
        source.symlink_to(inside_file)
    assert data_store.discard_upload(source, cache) == deleted
    assert own_file.read_text() == "{}" and inside_file.exists() != deleted


def test_a_file_two_sessions_uploaded_stays_until_both_let_it_go(workspace, upload_cache):
    """Gradio names an upload by its content's hash: the same file from two sessions is one path in its cache."""
    shared = in_upload_cache(upload_cache, "same.jsonl", "".join(json.dumps(r) + "\n" for r in GOOD_ROWS).encode())
    other = upload_cache / "beef00" / "other.jsonl"
    other.parent.mkdir(parents=True)
    other.write_bytes(shared.read_bytes())
    a, *_ = data_tab.on_upload(workspace, str(shared), "", "drop")  # session A
    b, *_ = data_tab.on_upload(workspace, str(shared), "", "drop")  # session B, the same file
    data_tab.on_upload(workspace, str(other), a, "drop")  # A moves on to another file
    assert shared.exists(), "B still has it under review"
    data_tab.on_analyse(workspace, b, "fix")  # so B can still change the policy
    data_tab.discard_cached_upload(b)  # B's session ends
    assert not shared.exists() and other.exists()
    data_tab.discard_cached_upload(str(other))
    assert not other.exists()
