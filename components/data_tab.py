"""The Data tab: pick or upload a dataset, confirm its columns, see every problem by row, the exact text the model is
trained on, token lengths against the cutoff, and the validation split."""
from __future__ import annotations

import html
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import gradio as gr
from gradio.utils import get_upload_folder

from app.data import dataset as data
from app.data import store as data_store
from app.data.template import ALPACA_PROMPT, PLAIN_CALL, PLAIN_HEADERS, PLAIN_TOOL_RESULT, PLAIN_TOOLS, TemplateError
from app.data.tokens import length_histogram, steps_per_epoch, token_stats, turn_cuts
from app.workspace import Workspace
from components.shared import Shared

FORMAT_HELP = (
    "**Accepted files:** a JSON array, JSON lines (one object per line), CSV/TSV with a header, or Parquet. "
    "The expected columns are the Alpaca ones: `instruction` (the task), `input` (optional extra context) and "
    "`output` (the answer the model should learn). Other common names (prompt/completion, question/answer, "
    "instruction/context/response) and whole conversations (`conversations` with `from`/`value` as in ShareGPT, or "
    "`messages` with `role`/`content`, a system prompt and tool calls included; each conversation is one example) "
    "are proposed below for you to confirm. Text files should be UTF-8; UTF-16 (as Excel and Windows tools often "
    "save) is read too."
)
POLICY_CHOICES = [
    ("Leave them out", "drop"),
    ("Fix them: numbers, lists and text parts become text, nested objects their JSON text, bad bytes become �", "fix"),
]
TEMPLATE_HELP = (
    "The text above is built with the chosen model's own chat template, exactly as training builds it: a "
    "conversation is rendered turn by turn, so each turn's text is what the template writes for it. Only the "
    "assistants' answers (with the template's end-of-turn marker) are learned; the system prompt, the user's and "
    "the tools' turns are only read. A conversation longer than the cutoff loses whole turns from its end. (The "
    "Train tab can instead learn only each conversation's last answer, or the prompt too.)\n\n"
    "Models without a chat template (base models) get this Alpaca template for instruction rows, with the "
    "`### Input:` block only when the row has an input, followed by the answer and the end-of-text token:\n\n"
    "```text\n"
    + ALPACA_PROMPT.format(with_input=", paired with an input that provides further context",
                           instruction="{instruction}", input_block="### Input:\n{input}\n\n")
    + "{output}<eos>\n```\n\nand conversations get one block per turn (tools offered and tool calls as JSON):"
    "\n\n```text\n" + PLAIN_HEADERS["system"] + "{system}\n\n" + PLAIN_TOOLS + "{tools}\n\n"
    + PLAIN_HEADERS["user"] + "{user}\n\n" + PLAIN_HEADERS["assistant"] + "{answer}"
    + PLAIN_CALL.format(call="{call}") + "<eos>\n\n" + PLAIN_TOOL_RESULT.format(name=" ({tool})") + "{result}\n```"
)
SYSTEM_INFO = ("For rows and conversations without a system prompt of their own. Training and the Compare tab use "
               "this same prompt, so chat after training sees what the model was trained with. Empty: none (the "
               "model's template may add its own default).")
# How the view of one row marks its text: green is learned, grey only read, red lost to the cutoff.
SPAN_COLOURS = {data_store.LEARNED: "#9be3a8", data_store.READ_ONLY: "#e5e7eb", data_store.CUT: "#f4a6a6",
                data_store.LEFT_OUT: "#fde68a"}
TURN_COLUMNS = "| turn | role | tokens | learned | after the cutoff |\n|---|---|---:|---|---|"
FINDING_COLUMNS = ["severity", "where", "field", "problem", "what to do", "outcome"]
VAL_SHARE, VAL_FILE = "share", "file"
NO_CHOICE = ""  # the mapping dropdowns' "not used"
UPLOAD_GONE = ("⚠️ This upload is no longer in the upload cache (the app was restarted since): upload the file again "
               "to check it with another policy or column mapping.")
MAPPED = ("instruction", "input", "output", "conversations")  # what the mapping dropdowns fill, in their order
UPLOAD_TYPES = [".json", ".jsonl", ".csv", ".tsv", ".parquet"]  # what the upload box accepts


# --- handlers: each turns widget values into one app.data.dataset call and formats the result --------------------------
def dataset_choices(workspace: Workspace) -> list[tuple[str, str]]:
    return [(e.label, str(e.path)) for e in data_store.list_datasets(workspace)]


def describe_dataset(path: str) -> str:
    """The card of a demo dataset, or the stored summary of an uploaded one."""
    if not path:
        return "Pick a dataset above (the **Pirate persona** demo is a good first run), or add your own below."
    card = next((c for c in data.demo_datasets() if str(c.path) == path), None)
    if card is not None:
        prompts = "\n".join(f"- {p}" for p in card.held_out_prompts)
        unit = "conversation" if data_store.holds_conversations(card.path) else "row"
        return (f"**{card.title}** · {data.plural(card.rows, unit)} · demo written for this workbench\n\n"
                f"{card.teaches}\n\n"
                f"Prompts that are *not* in the data, to try in the Compare tab after training:\n{prompts}")
    meta = data_store.dataset_meta(path)
    if not meta:
        return f"`{path}`"
    counts = ", ".join(f"{data.FINDING_TITLES.get(k, k)}: {v}" for k, v in meta.get("findings", {}).items()) or "none"
    rows = data.plural(meta.get("rows", 0), data_store.meta_unit(meta))
    return (f"**{meta.get('name')}** · {rows} · from `{meta.get('source')}` "
            f"({meta.get('format')}, invalid rows: {meta.get('policy')})\n\nFindings when it was saved: {counts}")


def findings_rows(report: data.DataReport) -> list[list[str]]:
    return [[f.severity, f.location, f.field or ("(whole row)" if f.row else ""), f.message, f.advice, f.outcome]
            for f in report.findings]


def report_markdown(report: data.DataReport, saved: str = "") -> str:
    lines = report.summary_lines()
    verdict, details = lines[0], [l for l in lines[1:] if not l.startswith(("ERROR", "WARNING", "INFO", "FATAL"))]
    icon = "✅" if report.usable else "⛔"
    text = f"{icon} **{html.escape(verdict, quote=False)}**\n\n" + "\n".join(f"- {html.escape(l, quote=False)}" for l in details)
    if saved:
        text += f"\n\n{saved}"
    elif report.mapping.needs_confirmation and report.usable:
        text += "\n\n**Check the column mapping above**, then press *Save and use this dataset*."
    return text


def analyse(source: str, policy: str, mapping: data.ColumnMapping | None = None):
    """Check an uploaded file (or hub:name) and propose a mapping; Alpaca files are saved at once by the caller."""
    report = data.check_file(source, mapping=mapping, policy=policy)
    choices = [("(not used)", NO_CHOICE)] + [(c, c) for c in report.columns]
    m = report.mapping
    dropdowns = [gr.Dropdown(choices=choices, value=getattr(m, t) or NO_CHOICE) for t in MAPPED]
    return report, dropdowns


def save(workspace: Workspace, source: str, report: data.DataReport) -> tuple[str, str]:
    """(path of the stored train.jsonl, message) for a usable report."""
    try:
        entry = data_store.save_dataset(workspace, report, source)
    except (OSError, data.DataError) as e:
        gr.Warning(f"Could not save the dataset: {e}")
        return "", f"⛔ Could not save the dataset: {e}"
    rows = data.plural(entry.rows, report.example_word)
    return str(entry.path), f"Saved as **{entry.name}** ({rows}); it stays in the list after a restart."


UPLOADS = data_store.UploadsUnderReview()  # every session of this page process


def discard_cached_upload(path: str | None) -> None:
    """Gradio keeps every upload in its cache folder until the server stops: the one under review goes when the next
    upload replaces it or when the page's session ends (its rows are in the workspace by then, if they were saved),
    unless another session has the same file under review."""
    if path:
        UPLOADS.release(path, get_upload_folder())


def upload_gone(path_or_ref: str) -> bool:
    """An upload no longer in Gradio's cache (the server was restarted, the cache cleaned): checking it again
    needs the file again."""
    return bool(path_or_ref) and not path_or_ref.startswith(data.HUB_PREFIX) and not Path(path_or_ref).exists()


def preview_table(path: str, model_ref: str, workspace: Workspace) -> tuple[data_store.PreviewTable, str]:
    """(table, note): the first rows, shaped as instruction rows or as conversations."""
    if not path:
        return data_store.PreviewTable(data_store.ALPACA_PREVIEW, []), ""
    view = data_store.open_dataset(path, model_ref, workspace.models)
    report = view.report
    table = data_store.preview_rows(report.rows, report.row_numbers, conversations=bool(report.mapping.conversations))
    return table, model_note(view)


def model_note(view: data_store.DatasetView) -> str:
    """What keeps this model from showing or training the dataset, if anything (say a template without tools)."""
    if view.tokenizer is None:
        return f"⚠️ No token counts or templated text for this model: {view.note}"
    report = view.report
    if report.usable:
        cannot = [f for f in report.findings if f.code == "template_cannot"]
        if not cannot:
            return ""
        count = report.counts["template_cannot"]
        rows = len({f.row for f in cannot})
        return (f"⚠️ This model's chat template cannot write part of {rows if count <= len(cannot) else 'some'} "
                f"{report.example_word}s (tools or tool calls): training with this model skips them. First: {cannot[0]}")
    problem = next((f for f in report.findings if f.severity == "error"), None)  # the fatal one is the verdict
    head = (f"⛔ Nothing of this dataset can be trained with this model ({data.plural(report.records, 'record')} read)."
            if report.records and not report.kept else f"⛔ {report.verdict()}")
    return head + (f"\n\nFirst problem: {problem}" if problem else "")


def selected_line(row_value) -> int:
    """The line number of a clicked preview row (its first column)."""
    try:
        return int(row_value[0])
    except (TypeError, ValueError, IndexError):
        return 1


def turn_table(view: data_store.RowView) -> str:
    """Tokens per turn as a markdown table: how long each turn is, what of it is learned, what the cutoff leaves."""
    lines = [TURN_COLUMNS]
    for t in view.turns:
        if t.kept == t.tokens:
            after = "kept"
        elif t.kept == 0:
            after = "cut" if view.tokens > view.kept and t.turn is not None else "left out"
        else:
            after = f"cut after {t.kept}"
        learned = f"yes, {t.learned}" if t.learned else "no"
        lines.append(f"| {'–' if t.turn is None else t.turn + 1} | {t.role} | {t.tokens} | {learned} | {after} |")
    return "\n".join(lines)


def row_note(line: int, view: data_store.RowView, cutoff: int) -> str:
    text = f"Line {line}: {view.tokens} tokens once templated"
    if view.tokens > cutoff:
        text += f"; the cutoff of {cutoff} keeps {view.kept}"
        if view.answers > 1 or view.answers_cut:
            text += (f" and cuts {view.answers_cut} of its {data.plural(view.answers, 'assistant turn')}"
                     " (whole turns go from the end)")
    elif view.kept < view.tokens:
        text += f"; the {view.tokens - view.kept} after the last answer teach nothing and are left out"
    text += "."
    if not any(t.learned for t in view.turns):
        text += " ⚠️ No answer token is left inside the cutoff: training skips this one."
    return text


def rendered_row(path: str, model_ref: str, line: float | None, cutoff: float, system: str | None,
                 workspace: Workspace):
    """(marked text, tokens per turn, plain text, note) for the row at `line`, built with the model's template as
    training builds it, with the dataset-level system prompt where the row has none."""
    if not path:
        return [], "", "", ""
    view = data_store.open_dataset(path, model_ref, workspace.models)
    rows, numbers = view.report.rows, view.report.row_numbers
    if view.tokenizer is None or not rows:
        return [], "", "", view.note
    index = next((i for i, n in enumerate(numbers) if n == int(line or 1)), 0)
    try:
        shown = data_store.row_view(view.tokenizer, rows[index], int(cutoff), (system or "").strip())
    except TemplateError as e:
        return [], "", "", f"Line {numbers[index]}: ⛔ {e}."
    return shown.pieces, turn_table(shown), shown.text, row_note(numbers[index], shown, int(cutoff))


def length_summary(path: str, model_ref: str, cutoff: float, batch_size: float, grad_accum: float, val_share: float,
                   val_mode: str, val_path: str | None, system: str | None, workspace: Workspace):
    """(markdown, histogram) of templated lengths (the dataset-level system prompt included) against the cutoff, and
    the split and steps this means."""
    if not path:
        return "Pick a dataset to see its token lengths.", None
    view = data_store.open_dataset(path, model_ref, workspace.models)
    report, word = view.report, view.report.example_word
    rows = report.kept
    if val_mode == VAL_FILE and val_path:
        train_rows, val_rows, split = rows, data_store.open_dataset(val_path, model_ref, workspace.models).report.kept, "from the separate dataset"
    else:
        val_rows = data.validation_count(rows, float(val_share or 0))
        train_rows, split = rows - val_rows, f"held out at random ({float(val_share or 0):.0%}, seeded by the run's seed)"
    accum = int(grad_accum or 1)
    steps = steps_per_epoch(train_rows, int(batch_size), accum)
    text = (f"**{data.plural(train_rows, 'training ' + word)}**, {data.plural(val_rows, 'validation ' + word)} {split}. "
            f"At batch size {int(batch_size)}" + (f" × {accum} accumulation" if accum > 1 else "")
            + f": **{steps:,} steps per epoch**.")
    if view.tokenizer is None:
        return text + f"\n\n⚠️ {view.note}", None
    counted = data_store.lengths_with_system(view, (system or "").strip())
    stats = token_stats(counted.lengths, int(cutoff))
    text += (f"\n\n**{stats.total:,} tokens** once templated ({stats.mean:.0f} per {word} on average, {stats.p95} at the "
             f"95th percentile, {stats.longest} at most). **{data.plural(stats.truncated, word)} "
             f"({stats.truncated_share:.1%})** {'is' if stats.truncated == 1 else 'are'} longer than the cutoff of "
             f"{stats.cutoff} and will be truncated")
    if report.mapping.conversations:
        cuts = turn_cuts(counted.answer_ends, counted.lengths, int(cutoff), counted.answer_starts)
        if cuts.conversations_cut:
            text += f": they lose **{data.plural(cuts.turns_cut, 'assistant turn')}** (whole turns go from the end)"
        if cuts.nothing_left:
            text += (f"; **{cuts.nothing_left:,}** {'has' if cuts.nothing_left == 1 else 'have'} no answer left "
                     f"inside the cutoff, so training skips {'it' if cuts.nothing_left == 1 else 'them'}")
    text += ": raise the cutoff or shorten them." if stats.truncated else "."
    figure = length_histogram(counted.lengths, int(cutoff))
    if word != "row":
        figure.update_layout(xaxis_title=f"tokens per {word} once templated", yaxis_title=f"{word}s")
        figure.update_traces(hovertemplate=f"%{{y}} {word}s around %{{x:.0f}} tokens<extra></extra>")
    return text, figure


def mapping_of(columns) -> data.ColumnMapping:
    """The mapping chosen in the four dropdowns (instruction, input, output, conversation list)."""
    return data.ColumnMapping.from_dict(dict(zip(MAPPED, columns)))


# --- event handlers: the workspace comes first (bound by build), then the widgets' values -------------------------
def on_show(ws: Workspace, path, model_ref, cutoff, batch_size, grad_accum, val_share, val_mode, val_path, system):
    """Everything about the chosen dataset: card, preview, first row as the model sees it, lengths and split."""
    table, note = preview_table(path, model_ref, ws)
    first = table.rows[0][0] if table.rows else 1
    return (path or "", describe_dataset(path), gr.Dataframe(value=table.rows, headers=table.headers), note, first,
            *rendered_row(path, model_ref, first, cutoff, system, ws),
            *length_summary(path, model_ref, cutoff, batch_size, grad_accum, val_share, val_mode, val_path, system, ws))


def on_row(ws: Workspace, path, model_ref, line, cutoff, system):
    return rendered_row(path, model_ref, line, cutoff, system, ws)


def on_stats(ws: Workspace, path, model_ref, cutoff, batch_size, grad_accum, val_share, val_mode, val_path, system):
    return length_summary(path, model_ref, cutoff, batch_size, grad_accum, val_share, val_mode, val_path, system, ws)


def on_select(evt: gr.SelectData):
    return selected_line(evt.row_value)


def on_analyse(ws: Workspace, path_or_ref, policy):
    """Check an upload (or hub:name); an Alpaca file is saved and picked at once, others wait for the mapping."""
    if not path_or_ref:
        return "", "", [], *(gr.Dropdown() for _ in range(len(MAPPED))), gr.Dropdown()
    if upload_gone(path_or_ref):  # the policy changed after the upload left the cache
        return gr.skip(), UPLOAD_GONE, *(gr.skip() for _ in range(len(MAPPED) + 2))
    report, boxes = analyse(path_or_ref, policy)
    picked, message = gr.Dropdown(), ""
    if report.usable and not report.mapping.needs_confirmation:
        path, message = save(ws, path_or_ref, report)
        picked = gr.Dropdown(choices=dataset_choices(ws), value=path or None)
    return path_or_ref, report_markdown(report, message), findings_rows(report), *boxes, picked


def on_upload(ws: Workspace, path, previous, policy):
    """A new upload replaces the one under review, whose copy in Gradio's cache goes."""
    if path and path != previous:
        UPLOADS.claim(path)
        if previous:
            discard_cached_upload(previous)
    return on_analyse(ws, path, policy)


def on_hub_load(ws: Workspace, name, policy):
    return on_analyse(ws, data.HUB_PREFIX + name.strip() if name and name.strip() else "", policy)


def on_save(ws: Workspace, path_or_ref, policy, *columns):
    if not path_or_ref:
        gr.Warning("Upload a file or load a hub dataset first.")
        return gr.Markdown(), [], gr.Dropdown()
    if upload_gone(path_or_ref):
        return UPLOAD_GONE, gr.skip(), gr.skip()
    report, _ = analyse(path_or_ref, policy, mapping_of(columns))
    if not report.usable:
        gr.Warning("This mapping gives no usable rows; see the findings.")
        return report_markdown(report), findings_rows(report), gr.Dropdown()
    path, message = save(ws, path_or_ref, report)
    return report_markdown(report, message), findings_rows(report), gr.Dropdown(choices=dataset_choices(ws), value=path)


def on_remap(path_or_ref, policy, *columns):
    if not path_or_ref:
        return "", []
    if upload_gone(path_or_ref):
        return UPLOAD_GONE, gr.skip()
    report, _ = analyse(path_or_ref, policy, mapping_of(columns))
    return report_markdown(report), findings_rows(report)


def fresh_lists(ws: Workspace):
    return (gr.Dropdown(choices=dataset_choices(ws)),) * 2


def on_val_mode(ws: Workspace, mode):
    return gr.Dropdown(visible=mode == VAL_FILE, choices=dataset_choices(ws))


def val_dataset_of(mode, path):
    """The separate validation file the Train tab uses, or None to hold out a share."""
    return (path or None) if mode == VAL_FILE else None


# --- layout: one function per section, returning its widgets ----------------------------------------------------
@dataclass
class Upload:
    file: gr.File
    hub_name: gr.Textbox
    hub_load: gr.Button
    policy: gr.Radio
    map_boxes: list[gr.Dropdown]  # in MAPPED order
    save: gr.Button
    report: gr.Markdown
    findings: gr.Dataframe
    source: gr.State  # the uploaded file or hub:name under review


@dataclass
class Preview:
    model_note: gr.Markdown
    table: gr.Dataframe
    line: gr.Number
    row_note: gr.Markdown
    marked: gr.HighlightedText  # the whole templated row, learned / read-only / cut text in colour
    turns: gr.Markdown  # tokens per turn
    text: gr.Textbox  # the same text, plain, to copy

    def row_outputs(self) -> list:
        """What rendered_row fills, in its order."""
        return [self.marked, self.turns, self.text, self.row_note]


@dataclass
class Lengths:
    histogram: gr.Plot
    val_mode: gr.Radio
    val_picker: gr.Dropdown
    stats: gr.Markdown


def choose_section(ws: Workspace) -> tuple[gr.Dropdown, gr.Button, gr.Markdown]:
    gr.Markdown("### 1. Choose the data\nEach row teaches the model to answer an *instruction* with an *output*; each "
                "conversation, to write its assistant's turns after the turns before them.")
    with gr.Row():
        picker = gr.Dropdown(choices=dataset_choices(ws), value=None, label="Dataset", scale=4,
                             info="Demo datasets and the ones you saved. The chosen one is what the Train tab trains on.")
        refresh = gr.Button("Refresh list", scale=1)
    card = gr.Markdown(describe_dataset(""))
    return picker, refresh, card


def upload_section() -> Upload:
    with gr.Accordion("Add your own dataset", open=False):
        gr.Markdown(FORMAT_HELP)
        with gr.Row():
            file = gr.File(label="Upload a file", file_types=UPLOAD_TYPES)
            with gr.Column():
                hub_name = gr.Textbox(label="…or a dataset on the Hugging Face hub", placeholder="owner/name or owner/name:split",
                                      info="Needs internet access; this machine may be offline.")
                hub_load = gr.Button("Load from the hub")
        policy = gr.Radio(POLICY_CHOICES, value="drop", label="Rows with a repairable problem",
                          info="Rows with an empty or missing instruction or answer, broken lines and duplicates are always left out.")
        gr.Markdown("**Column mapping:** which column holds each part. Alpaca files are mapped already.")
        with gr.Row():
            map_boxes = [
                gr.Dropdown(label="instruction ←", choices=[], info="The task or question."),
                gr.Dropdown(label="input ←", choices=[], info="Optional extra context."),
                gr.Dropdown(label="output ←", choices=[], info="The answer to learn."),
                gr.Dropdown(label="conversation list ←", choices=[], info="A chat list; replaces the three others."),
            ]
        save_button = gr.Button("Save and use this dataset", variant="primary")
        report = gr.Markdown()
        findings = gr.Dataframe(headers=FINDING_COLUMNS, value=[], label="Findings (first 100 of each kind)",
                                interactive=False, wrap=True, max_height=360)
    return Upload(file, hub_name, hub_load, policy, map_boxes, save_button, report, findings,
                  gr.State("", delete_callback=discard_cached_upload))


def preview_section(shared: Shared) -> Preview:
    gr.Markdown("### 2. What the model sees")
    shared.system_prompt.render()
    model_note = gr.Markdown()
    table = gr.Dataframe(headers=data_store.ALPACA_PREVIEW, value=[], interactive=False, wrap=True, max_height=300,
                         label="Rows (first 500; click one to see it templated below)")
    line = gr.Number(value=1, precision=0, minimum=1, label="Line to show",
                     info="Which row to show as the model sees it: its line in the dataset file.")
    row_note = gr.Markdown()
    marked = gr.HighlightedText(
        label="The row as the model reads it: green is learned (the assistant's answers), grey is only read, red is "
              "cut by the cutoff", color_map=SPAN_COLOURS, show_legend=True, show_inline_category=False,
        elem_id="data-marked-row")
    turns = gr.Markdown()
    with gr.Accordion("The same text, plain (to copy)", open=False):
        text = gr.Textbox(show_label=False, lines=8, interactive=False, buttons=["copy"])
    with gr.Accordion("How this text is built", open=False):
        gr.Markdown(TEMPLATE_HELP)
    return Preview(model_note, table, line, row_note, marked, turns, text)


def lengths_section(shared: Shared) -> Lengths:
    gr.Markdown("### 3. Length and validation split")
    shared.cutoff_len.render()
    histogram = gr.Plot(label="Token lengths once templated")
    shared.val_split.render()
    with gr.Row():
        val_mode = gr.Radio([("Hold out a share of the rows", VAL_SHARE), ("Use a separate dataset", VAL_FILE)], value=VAL_SHARE,
                            label="Validation rows", info="Validation loss is measured on rows the model never trains on.")
        val_picker = gr.Dropdown(choices=dataset_choices(shared.workspace), value=None, label="Validation dataset",
                                 visible=False, info="Upload it above first, then pick it here.")
    stats = gr.Markdown()
    return Lengths(histogram, val_mode, val_picker, stats)


# --- the tab -------------------------------------------------------------------------------------------------
def build(shared: Shared) -> gr.Dropdown:
    """Lays out the tab and wires it; returns the dataset picker (the quick demo sets it)."""
    ws = shared.workspace
    picker, refresh, card = choose_section(ws)
    upload = upload_section()
    preview = preview_section(shared)
    lengths = lengths_section(shared)
    model, cutoff, system = shared.model, shared.cutoff_len, shared.system_prompt

    # what the lengths and split depend on, in on_stats' order (on_show takes the same)
    stats_inputs = [picker, model, cutoff, shared.batch_size, shared.grad_accum, shared.val_split, lengths.val_mode,
                    lengths.val_picker, system]
    row_inputs = [picker, model, preview.line, cutoff, system]
    row_outputs = preview.row_outputs()
    show_outputs = [shared.dataset, card, preview.table, preview.model_note, preview.line, *row_outputs,
                    lengths.stats, lengths.histogram]
    show = dict(fn=partial(on_show, ws), inputs=stats_inputs, outputs=show_outputs)
    stats = dict(fn=partial(on_stats, ws), inputs=stats_inputs, outputs=[lengths.stats, lengths.histogram])

    # checking, mapping and saving an upload; a saved dataset is shown at once
    analysed = [upload.source, upload.report, upload.findings, *upload.map_boxes, picker]
    upload.file.upload(partial(on_upload, ws), [upload.file, upload.source, upload.policy], analysed).then(**show)
    upload.hub_load.click(partial(on_hub_load, ws), [upload.hub_name, upload.policy], analysed).then(**show)
    upload.policy.input(partial(on_analyse, ws), [upload.source, upload.policy], analysed).then(**show)
    for box in upload.map_boxes:
        box.input(on_remap, [upload.source, upload.policy, *upload.map_boxes], [upload.report, upload.findings])
    upload.save.click(partial(on_save, ws), [upload.source, upload.policy, *upload.map_boxes],
                      [upload.report, upload.findings, picker]).then(**show)
    refresh.click(partial(fresh_lists, ws), None, [picker, lengths.val_picker])

    # the chosen dataset, and the row shown as the model sees it
    picker.input(**show)
    model.change(**show)
    preview.line.input(partial(on_row, ws), row_inputs, row_outputs)
    preview.table.select(on_select, None, [preview.line]).then(partial(on_row, ws), row_inputs, row_outputs)
    gr.on([cutoff.change, system.change], partial(on_row, ws), row_inputs, row_outputs)

    # lengths, split and steps per epoch follow every control they depend on
    for control in (cutoff, system, shared.batch_size, shared.grad_accum, shared.val_split, lengths.val_picker):
        control.change(**stats)
    lengths.val_mode.change(partial(on_val_mode, ws), lengths.val_mode, lengths.val_picker).then(**stats)
    gr.on([lengths.val_mode.change, lengths.val_picker.change], val_dataset_of, [lengths.val_mode, lengths.val_picker],
          shared.val_dataset)
    return picker
