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

CUT, LEARNED, LEFT_OUT, READ = data_store.CUT, data_store.LEARNED, data_store.LEFT_OUT, data_store.READ_ONLY


@pytest.fixture
def model_ref(embedded_model_dir) -> str:
    return str(embedded_model_dir)  # a folder reference: only its tokenizer is loaded


def write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def test_picker_lists_demos_and_describes_them(workspace):
    choices = data_tab.dataset_choices(workspace)
    assert [label.split(" (demo)")[0] for label, _ in choices] == [
        "Brambleway Bikes help desk · 264 rows", "Always answer in JSON · 224 rows", "Pirate persona · 300 rows",
        "Brambleway Bikes workshop chat (multi-turn) · 40 conversations", "Brambleway Bikes assistant with tools · 8 conversations"]
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

    table, note = data_tab.preview_table(path, model_ref, workspace)
    assert note == "" and table.headers == ["line", "instruction", "input", "output"]
    assert table.rows[1] == [2, "Count", "to three", "123"]
    marked, turns, text, row_note = data_tab.rendered_row(path, model_ref, 2, 256, "", workspace)
    view = data_store.open_dataset(path, model_ref, workspace.models)
    expected = render(view.tokenizer, {"instruction": "Count", "input": "to three", "output": "123"})
    # an instruction row is the one-turn case: its prompt only read, its answer learned
    assert marked == [(expected.prompt, READ), (expected.response, LEARNED)]
    assert text == expected.prompt + expected.response and "Count\n\nto three" in text
    assert row_note == f"Line 2: {view.report.lengths[1]} tokens once templated."
    answer = len(view.tokenizer(expected.response, add_special_tokens=False)["input_ids"])
    assert turns.splitlines()[2:] == [f"| 1 | user | {view.report.lengths[1] - answer} | no | kept |",
                                      f"| 2 | assistant | {answer} | yes, {answer} | kept |"]


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
    text, fig = data_tab.length_summary(pirate, model_ref, 256, 4, 1, 0.1, data_tab.VAL_SHARE, None, "", workspace)
    assert "**270 training rows**, 30 validation rows" in text and "**68 steps per epoch**" in text
    assert "accumulation" not in text
    assert "**0 rows (0.0%)**" in text and sum(fig.data[0].y) == 300
    text, _ = data_tab.length_summary(pirate, model_ref, 32, 8, 2, 0.1, data_tab.VAL_SHARE, None, "", workspace)
    assert "× 2 accumulation: **17 steps per epoch**" in text and "**300 rows (100.0%)**" in text
    helpdesk = str(data.DEMO_DIR / "helpdesk.jsonl")
    text, _ = data_tab.length_summary(pirate, model_ref, 256, 4, 1, 0.1, data_tab.VAL_FILE, helpdesk, "", workspace)
    assert "**300 training rows**, 264 validation rows from the separate dataset" in text


# --- conversations: the preview, the marked row, the system prompt, the cuts by turn --------------------------------
BIKE_SYSTEM = "You are a bike shop assistant."
CHAIN = [  # line 1: its own system prompt, two exchanges
    {"role": "user", "content": "My chain squeaks. What should I do?"},
    {"role": "assistant", "content": "Clean it with a rag, then put a drop of chain oil on each link."},
    {"role": "user", "content": "How often?"},
    {"role": "assistant", "content": "Every 300 km, or after riding in the rain."},
]
HELMETS = [{"role": "user", "content": "Do you sell helmets?"}, {"role": "assistant", "content": "Yes, from 40 euros."}]


@pytest.fixture
def conversations(tmp_path, workspace) -> str:
    """A saved conversation dataset: line 1 with its own system prompt and two answers, line 2 with one and none."""
    upload = write_jsonl(tmp_path / "chats.jsonl", [{"system": BIKE_SYSTEM, "messages": CHAIN}, {"messages": HELMETS}])
    report, _ = data_tab.analyse(upload, "drop")
    path, message = data_tab.save(workspace, upload, report)
    assert "(2 conversations)" in message
    return path


def marks(marked) -> list[str]:
    return [mark for _, mark in marked]


def test_conversations_are_previewed_one_per_line(conversations, workspace, model_ref):
    table, _ = data_tab.preview_table(conversations, model_ref, workspace)
    assert table.headers == ["line", "first user message", "turns", "last answer", "system prompt"]
    assert table.rows == [[1, CHAIN[0]["content"], 4, CHAIN[3]["content"], BIKE_SYSTEM],
                          [2, HELMETS[0]["content"], 2, HELMETS[1]["content"], ""]]
    assert "2 conversations" in data_tab.describe_dataset(conversations)


CALL = {"type": "function", "function": {"name": "weather", "arguments": {}}}


@pytest.mark.parametrize("rows, expected", [
    ([{"instruction": "i", "input": "x", "output": "o"}], [[1, "i", "x", "o"]]),
    ([{"instruction": "i" * 400, "input": "", "output": "o"}], [[1, "i" * 299 + "…", "", "o"]]),
    ([{"messages": [{"role": "user", "content": "Weather?"}, {"role": "assistant", "content": "", "tool_calls": [CALL]},
                    {"role": "tool", "name": "weather", "content": "sunny"}, {"role": "assistant", "content": "Sunny."}]}],
     [[1, "Weather?", 4, "Sunny.", ""]]),
    ([{"system": "Be brief.", "messages": [{"role": "user", "content": "Weather?"},
                                           {"role": "assistant", "content": "Let me look.", "tool_calls": [CALL]}]}],
     [[1, "Weather?", 2, "Let me look. [calls weather(…)]", "Be brief."]]),
])
def test_preview_rows(rows, expected):
    assert data_store.preview_rows(rows, [1]).rows == expected


def chain_positions(tokenizer) -> list[int]:
    """Where each span of line 1 ends, in tokens: system, user, assistant header, answer, user, header, answer."""
    from app.data.template import render_spans, span_token_ids

    ids = span_token_ids(tokenizer, render_spans(tokenizer, {"system": BIKE_SYSTEM, "messages": CHAIN}))
    return [sum(map(len, ids[: i + 1])) for i in range(len(ids))]


@pytest.mark.parametrize("cut_at, expected, words", [
    ("nowhere", [READ, READ, READ, LEARNED, READ, READ, LEARNED], "tokens once templated."),
    ("after the first answer", [READ, READ, READ, LEARNED, CUT, CUT, CUT], "cuts 1 of its 2 assistant turns"),
    ("inside the first answer", [READ, READ, READ, LEARNED, CUT, CUT, CUT, CUT], "cuts 2 of its 2 assistant turns"),
    ("inside the first question", [READ, READ, CUT, CUT, CUT, CUT, CUT, CUT], "training skips this one"),
])
def test_the_marked_row_shows_what_is_learned_and_what_the_cutoff_takes(conversations, workspace, model_ref, cut_at,
                                                                      expected, words):
    view = data_store.open_dataset(conversations, model_ref, workspace.models)
    ends = chain_positions(view.tokenizer)
    cutoff = {"nowhere": 4096, "after the first answer": ends[3] + 2, "inside the first answer": ends[3] - 2,
              "inside the first question": ends[1] - 2}[cut_at]
    marked, turns, text, note = data_tab.rendered_row(conversations, model_ref, 1, cutoff, "", workspace)
    assert marks(marked) == expected and "".join(t for t, _ in marked) == text and words in note
    assert text.count(BIKE_SYSTEM) == 1 and text.endswith(CHAIN[3]["content"] + "<|im_end|>\n")
    learned = "".join(t for t, mark in marked if mark == LEARNED)
    if cut_at == "nowhere":  # exactly the two answers, each with the template's end of turn, and nothing else
        assert learned == CHAIN[1]["content"] + "<|im_end|>\n" + CHAIN[3]["content"] + "<|im_end|>\n"
    table = turns.splitlines()
    assert table[2].startswith(f"| – | system | {ends[0]} | no | kept")
    assert [row.split(" | ")[1] for row in table[3:]] == ["user", "assistant", "user", "assistant"]
    assert (table[-1].endswith("| cut |")) == (cut_at != "nowhere")


def test_the_dataset_system_prompt_is_used_where_a_row_has_none(conversations, workspace, model_ref):
    pirate = "Answer as a pirate would."
    _, _, own, _ = data_tab.rendered_row(conversations, model_ref, 1, 256, pirate, workspace)
    _, _, plain, _ = data_tab.rendered_row(conversations, model_ref, 2, 256, "", workspace)
    _, _, given, _ = data_tab.rendered_row(conversations, model_ref, 2, 256, pirate, workspace)
    assert BIKE_SYSTEM in own and pirate not in own
    assert pirate not in plain and given.count(pirate) == 1 and "SmolLM" in plain and "SmolLM" not in given
    # the lengths count it too: only line 2 has no system prompt of its own
    view = data_store.open_dataset(conversations, model_ref, workspace.models)
    shift = len(view.tokenizer(given)["input_ids"]) - len(view.tokenizer(plain)["input_ids"])
    counted = data_store.lengths_with_system(view, pirate)
    assert list(counted.lengths) == [view.report.lengths[0], view.report.lengths[1] + shift] and shift
    assert list(counted.answer_ends[1]) == [e + shift for e in view.report.answer_ends[1]]


def test_the_length_summary_counts_conversations_and_the_turns_cut(conversations, workspace, model_ref):
    view = data_store.open_dataset(conversations, model_ref, workspace.models)
    ends = chain_positions(view.tokenizer)
    text, fig = data_tab.length_summary(conversations, model_ref, ends[3] + 2, 4, 1, 0, data_tab.VAL_SHARE, None, "",
                                        workspace)
    assert "**2 training conversations**, 0 validation conversations" in text
    assert "**1 conversation (50.0%)** is longer than the cutoff" in text
    assert "they lose **1 assistant turn** (whole turns go from the end)" in text and "skips" not in text
    assert fig.layout.xaxis.title.text == "tokens per conversation once templated"
    text, _ = data_tab.length_summary(conversations, model_ref, ends[1] - 2, 4, 1, 0, data_tab.VAL_SHARE, None, "",
                                      workspace)
    # both conversations now end before their first answer (line 2 with the template's default system prompt)
    assert "**2 conversations (100.0%)** are longer" in text and "they lose **3 assistant turns**" in text
    assert "**2** have no answer left inside the cutoff, so training skips them" in text


def test_a_row_the_template_cannot_write_says_why(tmp_path, workspace, conversations, embedded_model_dir):
    """A template that refuses a system prompt (as some do): the view says so instead of failing."""
    model = tmp_path / "no-system"
    model.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (model / name).write_bytes((embedded_model_dir / name).read_bytes())
    (model / "chat_template.jinja").write_text(
        "{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
        + (embedded_model_dir / "chat_template.jinja").read_text())
    marked, turns, text, note = data_tab.rendered_row(conversations, str(model), 2, 256, "Be brief.", workspace)
    assert (marked, turns, text) == ([], "", "") and "Line 2: ⛔" in note and "System role not supported" in note
    summary, fig = data_tab.length_summary(conversations, str(model), 256, 4, 1, 0, data_tab.VAL_SHARE, None,
                                           "Be brief.", workspace)
    assert fig is not None and "1 training conversation" in summary  # line 1 (its own system prompt) is left out


def test_a_dataset_this_model_cannot_train_says_why(tmp_path, workspace, model_ref):
    """SmolLM2's template does not write the tools offered: every conversation that offers some is left out."""
    tool = {"type": "function", "function": {"name": "weather", "description": "today's weather", "parameters": {}}}
    path = write_jsonl(tmp_path / "tools.jsonl", [{"messages": HELMETS, "tools": [tool]}])
    table, note = data_tab.preview_table(path, model_ref, workspace)
    assert (table.headers, table.rows) == (data_store.CONVERSATION_PREVIEW, [])
    assert note.startswith("⛔ Nothing of this dataset can be trained with this model (1 record read).")
    assert "First problem: tools.jsonl line 1" in note and "does not write the tools offered" in note


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
    histogram = next(b for b in blocks if isinstance(b, gr.Plot) and b.label == "Token lengths once templated")
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
    table, note = data_tab.preview_table(path, ref, workspace)
    assert "⚠️" in note or problem == "missing dataset"
    marked, turns, text, row_note = data_tab.rendered_row(path, ref, 1, 256, "", workspace)
    assert (marked, turns, text) == ([], "", "") and row_note
    text, fig = data_tab.length_summary(path, ref, 256, 4, 1, 0.1, data_tab.VAL_SHARE, None, "", workspace)
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
        system_prompt=gr.Textbox(render=False),
    )
    data_tab.build(shared)
    return shared


def test_tab_builds_inside_the_page(workspace):
    with gr.Blocks():
        shared = data_tab_alone(workspace)
    assert shared.cutoff_len.is_rendered and shared.val_split.is_rendered and shared.system_prompt.is_rendered


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
