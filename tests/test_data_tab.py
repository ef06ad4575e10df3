"""The Data tab's handlers, called directly (no browser): upload, mapping, save, preview, rendered row, lengths, split."""
from __future__ import annotations

import json

import gradio as gr
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


def test_tab_builds_inside_the_page(workspace):
    from app.handoff import MethodChoice
    from components.shared import Shared

    with gr.Blocks():
        shared = Shared(
            workspace=workspace, model=gr.Dropdown(["embedded"], value="embedded"),
            cutoff_len=gr.Slider(32, 4096, value=256, render=False), batch_size=gr.Slider(1, 64, value=4),
            grad_accum=gr.Slider(1, 64, value=1), dataset=gr.State(""), val_dataset=gr.State(None),
            val_split=gr.Slider(0, 0.5, value=0.1, render=False), method_choice=gr.State(MethodChoice()),
        )
        data_tab.build(shared)
    assert shared.cutoff_len.is_rendered and shared.val_split.is_rendered
