"""The Compare tab: the base model and trained runs answer side by side, streaming together; blind votes, an answer
of your own kept as the one you wanted, and the votes turned into a preference dataset; prompt sets; export of a run's
adapter or merged model."""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace
from functools import partial

import gradio as gr

from app.chat import panes as chat
from app.chat.cache import ModelCache
from app.chat.generate import RowOutput, Sampling, chat_turns, generate
from app.chat.prompting import with_typed
from app.runs import export
from app.chat import prompt_sets
from app.chat import votes
from app.data import store as data_store
from app.runs.store import RunStore
from app.data.template import chat_prompt, template_support
from app.workspace import Workspace
from components.shared import Shared

MAX_RUNS = 4  # base + 4 runs: a rank sweep of r = 4, 8, 16, 32 fits in one row of panes
MAX_PANES = MAX_RUNS + 1
LETTERS = "ABCDE"
TALLY_HEADERS = ["Model", "Preferred", "Shown in", "Ties", "Preferred share"]
SOURCES = ["Held-out prompts of a demo dataset", "Validation rows of a run", "My own list"]
log = logging.getLogger(__name__)


# --- per-browser session (votes.CompareSession; None while no comparison can be made) ----------------------------
def new_session(workspace: Workspace, base_ref: str, keys: list[str], blind: bool) -> votes.CompareSession:
    """The panes to show (base first, or shuffled when blind); raises chat.ChatError when one cannot be compared."""
    return votes.CompareSession.start(chat.resolve_panes(workspace, base_ref, keys), base_ref, keys, blind)


def pane_title(session: votes.CompareSession, i: int) -> str:
    if not session.blind:
        return session.labels[i]
    if not session.revealed:
        return f"Model {LETTERS[i]}"
    return f"{LETTERS[i]}: {session.labels[i]}"


HIDDEN_TOLD = "System prompt and tools: shown after you vote (they would tell the models apart)."


def told_lines(session: votes.CompareSession | None) -> list[str]:
    """The line under each pane saying which system prompt and tools it gets; while blind, only when they are the
    same for every pane."""
    if session is None:
        return []
    lines = [p.describe() for p in session.told()]
    if session.blind and not session.revealed and len(set(lines)) > 1:
        return [HIDDEN_TOLD] * len(lines)
    return lines


def told_updates(session: votes.CompareSession | None) -> list:
    lines = told_lines(session)
    return [gr.update(value=lines[i] if i < len(lines) else "") for i in range(MAX_PANES)]


def pane_updates(session: votes.CompareSession | None, histories: list, speeds: list[str] | None = None,
                 new_panes: bool = False) -> list:
    """Updates for every pane's column, chatbot, speed line and system-prompt line, then each vote button, the tie
    and the reveal button, then the pane picker of "Write the answer you wanted". speeds=None leaves the speed lines
    as they are (a vote or a reveal does not change them); new_panes clears the picked pane (it may be gone)."""
    n = len(session.keys) if session else 0
    columns = [gr.update(visible=i < n) for i in range(MAX_PANES)]
    chats = [
        gr.update(value=histories[i] if i < n else [], label=pane_title(session, i) if i < n else "")
        for i in range(MAX_PANES)
    ]
    speed = [gr.update() if speeds is None else gr.update(value=speeds[i] if i < n else "") for i in range(MAX_PANES)]
    blind_open = session is not None and session.blind
    buttons = [gr.update(visible=blind_open and i < n) for i in range(MAX_PANES)]
    picker = gr.update(choices=[(pane_title(session, i), LETTERS[i]) for i in range(n)])
    if new_panes:
        picker["value"] = None
    return columns + chats + speed + told_updates(session) + buttons + [gr.update(visible=blind_open)] * 2 + [picker]


def with_notes(status: str, session: votes.CompareSession | None) -> str:
    """The status line, then what it must say about the panes' system prompts and tools."""
    notes = chat.prompting_notes(session.keys, session.told()) if session else ""
    return f"{status} {notes}".strip()


def speed_line(out: RowOutput) -> str:
    if out.tokens == 0:
        return "" if out.first_token_s is None else "no answer (the model ended at once)"
    return f"{out.tokens} tokens · {out.tokens_per_s:.1f} tokens/s · first token after {out.first_token_s:.2f} s"


def sampling_from(max_new, temperature, top_p, repetition_penalty, seed) -> Sampling:
    return Sampling(int(max_new), float(temperature), float(top_p), float(repetition_penalty), int(seed or 0))


def tally_rows(workspace: Workspace) -> list[list]:
    return [[r.label, r.wins, r.shown, r.ties, f"{r.win_share:.0%}"] for r in votes.VoteBook(workspace).tally()]


# --- handlers ---------------------------------------------------------------------------------------------------
def prepare(workspace: Workspace, base_ref, keys, blind, system=""):
    """Runs or blind mode changed: show the panes (empty), or say why a run cannot be compared."""
    try:
        session = replace(new_session(workspace, base_ref, keys or [], blind), system=(system or "").strip())
        status = with_notes("Type a message: every pane answers it at the same time.", session)
    except chat.ChatError as e:
        session, status = None, str(e)
    return [session, status, *pane_updates(session, [[] for _ in range(MAX_PANES)], [""] * MAX_PANES, new_panes=True)]


def retell(session, system):
    """The system prompt box changed: say again what each pane will be told (the chats stay)."""
    if session is None:
        return [session, gr.update(), *told_updates(session)]
    session = replace(session, system=(system or "").strip())
    return [session, with_notes("The next message goes with these system prompts.", session), *told_updates(session)]


def send(workspace: Workspace, cache: ModelCache, base_ref, keys, blind, session, message, system, max_new,
         temperature, top_p, repetition_penalty, seed, *histories):
    """Send one message to every pane and stream all the answers together."""
    histories = [list(h or []) for h in histories]
    message = (message or "").strip()
    try:
        if not message:
            raise chat.ChatError("Type a message first.")
        sampling = sampling_from(max_new, temperature, top_p, repetition_penalty, seed)
        new_panes = session is None or not session.same_choice(base_ref, keys or [], blind)
        if new_panes:
            session, histories = new_session(workspace, base_ref, keys or [], blind), [[] for _ in range(MAX_PANES)]
        by_key = {p.key: p for p in chat.resolve_panes(workspace, base_ref, list(session.runs))}
        panes = [by_key[k] for k in session.keys]
        # What each pane is told comes from the runs as they are now, and the system prompt box as it is now.
        session = replace(session, trained=tuple(p.prompting for p in panes), system=(system or "").strip())
        waiting = pane_updates(session, histories, [""] * MAX_PANES, new_panes)
        yield [session, "Loading the models (the first time takes a few seconds)...", "", *waiting]
        loaded = cache.load(workspace, base_ref, panes)
        told = session.told()
        rows = []
        for i, pane in enumerate(panes):
            turns = chat_turns(histories[i]) + [(message, None)]
            text = chat_prompt(loaded.tokenizer, turns, told[i].system or None, list(told[i].tools) or None,
                               conversations=told[i].conversations)
            rows.append((pane.key, text))
            histories[i] += [{"role": "user", "content": message}, {"role": "assistant", "content": ""}]
        writes_tools = template_support(loaded.tokenizer).tools
        session = replace(session, prompt=message, tools_written=writes_tools)
        unseen = ""
        if any(t.tools for t in told) and not writes_tools:
            unseen = " This model's chat template does not write tool schemas, so no pane sees the tools."
        for outputs in generate(loaded, rows, sampling):
            for i, out in enumerate(outputs):
                histories[i][-1] = {"role": "assistant", "content": out.text}
            speeds = [speed_line(o) for o in outputs]
            yield [session, "Answering..." + unseen, "", *pane_updates(session, histories, speeds)]
        done = "Done." + (" Which answer is best? Vote below, then see which model wrote it." if session.blind else "")
        yield [session, with_notes(done + unseen, session), "", *pane_updates(session, histories, speeds)]
    except chat.ChatError as e:
        gr.Warning(str(e))
        yield [session, str(e), message, *pane_updates(session, histories)]
    except Exception as e:  # noqa: BLE001 - one failed answer must not take the page down
        log.exception("compare: answering failed")
        said = f"Something went wrong while answering ({type(e).__name__}: {e}). The app keeps running; try again."
        gr.Warning(said)
        yield [session, said, message, *pane_updates(session, histories)]


def vote(workspace: Workspace, index: int, session, *histories):
    """Record that pane `index` (or nobody, for -1: a tie) gave the best answer, then reveal the names."""
    histories = list(histories)
    if session is None or not session.prompt:
        gr.Warning("Send a message first, then vote for the best answer.")
        return [session, "Send a message first.", gr.update(), *pane_updates(session, histories)]
    if session.voted_prompt == session.prompt:
        gr.Warning("You already voted on this answer. Send another message to vote again.")
        return [session, "Already voted on this answer.", gr.update(), *pane_updates(session, histories)]
    votes.VoteBook(workspace).add(session.vote_for(index, histories))
    session = session.voted()
    said = "a tie" if index < 0 else f"{LETTERS[index]}: {session.labels[index]}"
    return [session, f"Vote saved ({said}).", tally_rows(workspace), *pane_updates(session, histories)]


def picked_index(picked) -> int:
    """The position of the pane picked by its letter; -1 for none."""
    return LETTERS.index(picked) if isinstance(picked, str) and len(picked) == 1 and picked in LETTERS else -1


def start_from(picked, session, *histories) -> str | dict:
    """A pane picked in "Write the answer you wanted": its last answer goes into the box, to be edited."""
    index = picked_index(picked)
    if session is None or not 0 <= index < len(session.keys):
        return gr.update()
    found = session.answered(histories).get(session.keys[index])
    return found.answer if found else gr.update()


def keep_mine(workspace: Workspace, picked, text, session, *histories) -> str:
    """Keep the answer typed in the box as the one wanted: a vote for it over every pane's answer, which answered the
    chat of the pane picked (A when none is)."""
    text = (text or "").strip()
    if session is None or not session.prompt:
        gr.Warning("Send a message first, then write the answer you wanted.")
        return "Send a message first."
    if not text:
        gr.Warning("Write the answer you wanted in the box first.")
        return "Write the answer you wanted in the box first."
    index = picked_index(picked)
    index = index if 0 <= index < len(session.keys) else 0
    try:
        vote = session.edited_vote(text, index, histories)
    except ValueError as e:
        gr.Warning(str(e))
        return f"Nothing kept: {e}."
    votes.VoteBook(workspace).add(vote)
    others = len(vote.shown)
    return (f"Kept your answer as the one you wanted, over the {others} pane {'answer' if others == 1 else 'answers'} "
            f"(it follows the chat of pane {LETTERS[index]}). It becomes {others} preference "
            f"{'pair' if others == 1 else 'pairs'} when you turn your votes into a dataset.")


def votes_dataset(workspace: Workspace) -> str:
    """Turn every vote in the workspace into preference pairs and save them as a dataset, saying what was left out."""
    rows, summary = votes.votes_to_pairs(votes.VoteBook(workspace).load())
    if not rows:
        if not summary.votes:
            return ("No votes yet. Send a message, then vote for the best answer (blind mode) or keep an answer of "
                    "your own below: each vote becomes preference pairs.")
        return (f"No usable votes yet, so no dataset was saved: {summary.describe()} Vote for one answer, or keep an "
                f"answer of your own, then try again.")
    entry = data_store.save_rows(workspace, rows, time.strftime("votes-%Y%m%d-%H%M"), "votes",
                                 f"your votes in the Compare tab ({summary.votes} read)",
                                 left_out={"ties": summary.ties, "votes without answers": summary.unrecorded,
                                           "pairs with an answer missing": summary.missing,
                                           "pairs with an empty answer": summary.empty,
                                           "pairs with the same answer twice": summary.same,
                                           "duplicate pairs": summary.duplicates})
    return (f"Saved the dataset **{entry.name}**: {summary.describe()}\n\nIt is now in the Data tab's dataset list "
            f"(press Refresh list there if the tab was open): pick it there, then choose DPO, IPO or SimPO under "
            f"\"What the model learns\" in the Method & Memory tab to train on your votes.")


def reveal(session, *histories):
    if session is not None:
        session = replace(session, revealed=True)
    return [session, *pane_updates(session, list(histories))]


def run_set(workspace: Workspace, cache: ModelCache, base_ref, keys, source, demo_title, val_run, typed, system,
            max_new, temperature, top_p, repetition_penalty, seed):
    """Answer a whole list of prompts on every pane into one table, then offer it as CSV and Markdown."""
    try:
        sampling = sampling_from(max_new, temperature, top_p, repetition_penalty, seed)
        panes = chat.resolve_panes(workspace, base_ref, keys or [])
        if source == SOURCES[0]:
            prompts = prompt_sets.demo_sets().get(demo_title) or []
            if not prompts:
                raise prompt_sets.PromptSetError("Choose a demo dataset.")
        elif source == SOURCES[1]:
            prompts = prompt_sets.validation_prompts(workspace, val_run)
        else:
            prompts = prompt_sets.typed_prompts(typed)
        yield gr.update(), None, f"Loading the models, then {len(prompts)} prompts on {len(panes)} panes..."
        loaded = cache.load(workspace, base_ref, panes)
        table = None
        for table in prompt_sets.run_prompt_set(loaded, prompts, sampling, system):
            yield {"headers": table.headers, "data": table.rows}, None, "Answering..."
        csv_path, md_path = prompt_sets.save_table(table, workspace)
        files = [str(csv_path), str(md_path)]
        told = [with_typed(p.prompting, system) for p in panes]
        notes = chat.prompting_notes([p.key for p in panes], told)
        yield {"headers": table.headers, "data": table.rows}, files, f"Done: download the table below. {notes}".strip()
    except (chat.ChatError, prompt_sets.PromptSetError) as e:
        gr.Warning(str(e))
        yield gr.update(), None, str(e)
    except Exception as e:  # noqa: BLE001 - one failed prompt set must not take the page down
        log.exception("compare: prompt set failed")
        said = f"Something went wrong while answering ({type(e).__name__}: {e}). The app keeps running; try again."
        gr.Warning(said)
        yield gr.update(), None, said


def export_zip(workspace: Workspace, run_id):
    try:
        path = export.adapter_zip(workspace, run_id)
    except export.ExportError as e:
        gr.Warning(str(e))
        return None, str(e)
    return str(path), f"Adapter saved as {path}. Unzip it and load it with `PeftModel.from_pretrained(base, folder)`."


def export_merge(workspace: Workspace, run_id):
    try:
        path = export.merge_adapter(workspace, run_id)
    except export.ExportError as e:
        gr.Warning(str(e))
        return str(e)
    return (f"Merged model saved in `{path}` (safetensors and tokenizer): it loads with "
            f"`AutoModelForCausalLM.from_pretrained`.")


def export_push(workspace: Workspace, run_id, what, repo_id, token):
    try:
        run = export.finished_run(workspace, run_id)
        if what == "merged model":
            folder = export.exports_dir(workspace) / f"{run.run_id}-merged"
        else:
            folder = run.final
        url = export.push_to_hub(folder, repo_id, token)
    except export.ExportError as e:
        gr.Warning(str(e))
        return str(e)
    return f"Pushed to {url}"


def run_dropdowns(workspace: Workspace, current):
    """Fresh run lists; an empty selection picks the newest run so that a first comparison needs no clicks here."""
    choices = chat.run_choices(RunStore(workspace.runs))
    keys = {k for _, k in choices}
    chosen = [k for k in (current or []) if k in keys] or [k for _, k in choices[:1]]
    finished = chat.final_choices(choices)
    return gr.update(choices=choices, value=chosen), gr.update(choices=finished), gr.update(choices=finished)


def run_list(workspace: Workspace):
    """Fresh choices only: changing the value here would clear the chats (it counts as choosing other runs)."""
    return gr.update(choices=chat.run_choices(RunStore(workspace.runs)))


# --- layout: one function per section, returning its widgets ----------------------------------------------------
STOPPED = "Stopped: the answers so far stay; send again to go on."


@dataclass
class Chat:
    runs: gr.Dropdown
    blind: gr.Checkbox
    refresh: gr.Button
    settings: list  # system prompt and sampling controls, in the order the handlers take them
    status: gr.Markdown
    columns: list[gr.Column]
    chatbots: list[gr.Chatbot]
    speeds: list[gr.Markdown]
    told: list[gr.Markdown]  # under each pane: the system prompt and tools it gets
    message: gr.Textbox
    send: gr.Button
    stop: gr.Button
    clear: gr.Button
    vote_buttons: list[gr.Button]
    tie: gr.Button
    reveal: gr.Button
    tally: gr.Dataframe
    session: gr.State  # votes.CompareSession, or None
    picker: gr.Radio  # "Write the answer you wanted": the pane whose answer (and chat) it starts from
    own: gr.Textbox
    keep: gr.Button
    own_status: gr.Markdown
    to_dataset: gr.Button
    dataset_status: gr.Markdown

    def pane_outputs(self) -> list:
        """What pane_updates fills, in its order."""
        return [*self.columns, *self.chatbots, *self.speeds, *self.told, *self.vote_buttons, self.tie, self.reveal,
                self.picker]


@dataclass
class PromptSet:
    source: gr.Radio
    demo: gr.Dropdown
    val_run: gr.Dropdown
    typed: gr.Textbox
    go: gr.Button
    status: gr.Markdown
    table: gr.Dataframe
    files: gr.File


@dataclass
class Export:
    run: gr.Dropdown
    zip: gr.Button
    merge: gr.Button
    file: gr.File
    what: gr.Radio
    repo: gr.Textbox
    token: gr.Textbox
    push: gr.Button
    status: gr.Markdown


def settings_section() -> list:
    """System prompt and sampling controls, in the order the handlers take them."""
    system = gr.Textbox(label="System prompt", lines=2, elem_id="compare-system",
                        info="Instructions every pane gets before the chat, e.g. 'Answer in one sentence.' Leave empty "
                             "to give each run the system prompt it was trained with (and the base model the one "
                             "the runs share).")
    with gr.Row():
        max_new = gr.Slider(1, 1024, value=200, step=1, label="Maximum new tokens",
                            info="Answers stop here if the model has not finished. About 3/4 of a word per token.")
        temperature = gr.Slider(0, 2, value=0.7, step=0.05, label="Temperature",
                                info="0 = always the most likely word, so answers repeat exactly. Higher = more varied.")
        top_p = gr.Slider(0.05, 1, value=0.9, step=0.05, label="Top-p",
                          info="Pick only among the most likely words that together make up this share. 1 = any word.")
    with gr.Row():
        repetition = gr.Slider(1, 2, value=1.1, step=0.05, label="Repetition penalty",
                               info="Above 1 makes the model less likely to repeat itself. 1 = off.")
        seed = gr.Number(0, precision=0, label="Seed",
                         info="Same seed and settings = the same answers again. Every pane uses the same seed.")
    return [system, max_new, temperature, top_p, repetition, seed]


def panes_section(first: votes.CompareSession | None) -> tuple[list, list, list, list]:
    """MAX_PANES columns of chatbot, system-prompt line and speed line; the handlers show as many as there are panes."""
    columns, chatbots, speeds, told = [], [], [], []
    lines = told_lines(first)
    with gr.Row(equal_height=True):
        for i in range(MAX_PANES):
            shown = i < len(first.keys) if first else i < 2
            with gr.Column(min_width=240, visible=shown) as column:
                columns.append(column)
                chatbots.append(gr.Chatbot(
                    label=pane_title(first, i) if first and shown else f"Pane {i + 1}", height=420,
                    elem_id=f"compare-pane-{i}", feedback_options=None, buttons=["copy"],
                ))
                # Under the chat, so that a long system prompt wrapping onto two lines does not push one pane down.
                told.append(gr.Markdown(lines[i] if i < len(lines) else "", elem_id=f"compare-told-{i}"))
                speeds.append(gr.Markdown(elem_id=f"compare-speed-{i}"))
    return columns, chatbots, speeds, told


def chat_section(workspace: Workspace, choices: list[tuple[str, str]], first: votes.CompareSession | None) -> Chat:
    gr.Markdown("Ask the base model and your trained runs the same question: every pane answers at the same time.")
    with gr.Row():
        runs = gr.Dropdown(
            choices=choices, value=[k for _, k in choices[:1]], multiselect=True,
            max_choices=MAX_RUNS, scale=4, elem_id="compare-runs", label="Trained runs to compare with the base model",
            info="Pick up to four finished runs (or a checkpoint of one still training). The base model is the one "
                 "chosen at the top.",
        )
        blind = gr.Checkbox(
            False, label="Blind mode", scale=1, elem_id="compare-blind",
            info="Hide which model wrote which answer (shown as A, B, C in a shuffled order) until you vote.",
        )
        refresh = gr.Button("Refresh runs", size="sm", scale=0)
    with gr.Accordion("Generation settings", open=False):
        settings = settings_section()
    status = gr.Markdown(elem_id="compare-status")
    columns, chatbots, speeds, told = panes_section(first)
    message = gr.Textbox(label="Your message", placeholder="Ask something, then press Enter", elem_id="compare-prompt")
    with gr.Row():
        send_btn = gr.Button("Send to all panes", variant="primary", elem_id="compare-send")
        stop_btn = gr.Button("Stop", variant="stop", elem_id="compare-stop")
        clear_btn = gr.Button("Clear", elem_id="compare-clear")
    with gr.Row():
        vote_btns = [gr.Button(f"{LETTERS[i]} is best", visible=False, size="sm", elem_id=f"compare-vote-{i}")
                     for i in range(MAX_PANES)]
        tie_btn = gr.Button("They are equally good", visible=False, size="sm", elem_id="compare-vote-tie")
        reveal_btn = gr.Button("Reveal names", visible=False, size="sm", elem_id="compare-reveal")
    with gr.Accordion("Write the answer you wanted", open=False):
        n = len(first.keys) if first else 0
        picker = gr.Radio([(pane_title(first, i), LETTERS[i]) for i in range(n)], value=None, label="Start from",
                          elem_id="compare-own-from", info="Pick a pane: its answer comes into the box to be edited "
                                                           "(none picked: your answer follows pane A's chat).")
        own = gr.Textbox(lines=4, label="Your answer", elem_id="compare-own",
                         info="Write or edit the answer you wanted to the last message. It is kept as better than "
                              "every pane's answer: a preference pair against each.")
        keep = gr.Button("Keep mine as chosen", size="sm", elem_id="compare-own-keep")
        own_status = gr.Markdown(elem_id="compare-own-status")
    with gr.Accordion("Blind votes so far", open=False):
        tally = gr.Dataframe(value=tally_rows(workspace), headers=TALLY_HEADERS, show_label=False, interactive=False)
        to_dataset = gr.Button("Turn my votes into a preference dataset", size="sm", elem_id="compare-votes-dataset")
        dataset_status = gr.Markdown(elem_id="compare-votes-dataset-status")
    return Chat(runs, blind, refresh, settings, status, columns, chatbots, speeds, told, message, send_btn, stop_btn,
                clear_btn, vote_btns, tie_btn, reveal_btn, tally, gr.State(first), picker=picker, own=own, keep=keep,
                own_status=own_status, to_dataset=to_dataset, dataset_status=dataset_status)


def prompt_set_section(finished: list[tuple[str, str]]) -> PromptSet:
    with gr.Accordion("Prompt sets: many prompts, every pane, one table", open=False):
        with gr.Row():
            source = gr.Radio(SOURCES, value=SOURCES[0], label="Prompts from", elem_id="compare-set-source",
                              info="Held-out prompts were not in the training data, so they show what the model "
                                   "learned rather than what it memorised. The table names the models.")
            demo = gr.Dropdown(choices=list(prompt_sets.demo_sets()), label="Demo dataset", elem_id="compare-set-demo",
                               info="Its held-out prompts.")
            val_run = gr.Dropdown(choices=finished, label="Run", elem_id="compare-set-run",
                                  info="The rows this run kept aside for validation.")
        typed = gr.Textbox(lines=4, label="My own prompts", elem_id="compare-set-typed", info="One prompt per line.")
        go = gr.Button("Run on every pane", elem_id="compare-set-go")
        status = gr.Markdown(elem_id="compare-set-status")
        table = gr.Dataframe(label="Answers", wrap=True, interactive=False, elem_id="compare-set-table")
        files = gr.File(label="Download the table (CSV and Markdown)", file_count="multiple", interactive=False,
                        elem_id="compare-set-files")
    return PromptSet(source, demo, val_run, typed, go, status, table, files)


def export_section(finished: list[tuple[str, str]]) -> Export:
    with gr.Accordion("Export a run", open=False):
        run = gr.Dropdown(choices=finished, label="Run", elem_id="compare-export-run",
                          info="A finished run to take out of the workbench.")
        with gr.Row():
            zip_btn = gr.Button("Download adapter (.zip)", elem_id="compare-export-zip")
            merge_btn = gr.Button("Merge into a full model", elem_id="compare-export-merge")
        file = gr.File(label="Adapter", interactive=False, elem_id="compare-export-file")
        with gr.Row():
            what = gr.Radio(["adapter", "merged model"], value="adapter", label="Push",
                            info="The adapter is small; the merged model runs without peft.")
            repo = gr.Textbox(label="Hub repository", placeholder="your-name/model-name",
                              info="Created as private if it does not exist.")
            token = gr.Textbox(label="Hub token", type="password",
                               info="A write token from huggingface.co/settings/tokens. It is used once and never saved.")
        push_btn = gr.Button("Push to the hub", elem_id="compare-export-push")
        status = gr.Markdown(elem_id="compare-export-status")
    return Export(run, zip_btn, merge_btn, file, what, repo, token, push_btn, status)


# --- the tab -------------------------------------------------------------------------------------------------
def first_session(workspace: Workspace, base_ref: str, choices: list[tuple[str, str]]) -> votes.CompareSession | None:
    """A fresh page compares the base with the newest run, when there is one that can be compared."""
    try:
        return new_session(workspace, base_ref, [k for _, k in choices[:1]], False)
    except chat.ChatError:
        return None


def build(shared: Shared, tab: gr.Tab) -> gr.Textbox:
    """Lays out the tab and wires it; returns the message box (the quick demo fills it)."""
    workspace = shared.workspace
    cache = ModelCache()  # shared by every browser: the weights are loaded once
    choices = chat.run_choices(RunStore(workspace.runs))
    finished = chat.final_choices(choices)
    talk = chat_section(workspace, choices, first_session(workspace, shared.model.value, choices))
    sets = prompt_set_section(finished)
    exports = export_section(finished)

    lists = [talk.runs, sets.val_run, exports.run]
    talk.refresh.click(partial(run_dropdowns, workspace), talk.runs, lists)
    talk.runs.focus(partial(run_list, workspace), None, talk.runs, show_progress="hidden")
    # Opening the tab refreshes the lists and, with nothing chosen yet, picks the newest run: no clicks needed here.
    tab.select(partial(run_dropdowns, workspace), talk.runs, lists)
    working = wire_chat(workspace, cache, shared.model, talk)
    working.append(sets.go.click(
        partial(run_set, workspace, cache),
        [shared.model, talk.runs, sets.source, sets.demo, sets.val_run, sets.typed, *talk.settings],
        [sets.table, sets.files, sets.status],
    ))
    talk.stop.click(lambda: STOPPED, None, talk.status, cancels=working)
    wire_exports(workspace, exports)
    return talk.message


def wire_chat(workspace: Workspace, cache: ModelCache, model: gr.Dropdown, talk: Chat) -> list:
    """Choosing panes, sending, voting and revealing; returns the answering events (Stop cancels them)."""
    panes = talk.pane_outputs()
    system = talk.settings[0]
    choose = dict(fn=partial(prepare, workspace), inputs=[model, talk.runs, talk.blind, system],
                  outputs=[talk.session, talk.status, *panes])
    for event in (talk.runs.change, talk.blind.change, model.change, talk.clear.click):
        event(**choose)
    system.change(retell, [talk.session, system], [talk.session, talk.status, *talk.told], show_progress="hidden",
                  trigger_mode="always_last")
    answer = dict(
        fn=partial(send, workspace, cache),
        inputs=[model, talk.runs, talk.blind, talk.session, talk.message, *talk.settings, *talk.chatbots],
        outputs=[talk.session, talk.status, talk.message, *panes],
    )
    working = [talk.send.click(**answer), talk.message.submit(**answer)]
    voted = [talk.session, talk.status, talk.tally, *panes]
    for i, button in enumerate(talk.vote_buttons):
        button.click(partial(vote, workspace, i), [talk.session, *talk.chatbots], voted)
    talk.tie.click(partial(vote, workspace, -1), [talk.session, *talk.chatbots], voted)
    talk.reveal.click(reveal, [talk.session, *talk.chatbots], [talk.session, *panes])
    talk.picker.input(start_from, [talk.picker, talk.session, *talk.chatbots], talk.own)
    talk.keep.click(partial(keep_mine, workspace), [talk.picker, talk.own, talk.session, *talk.chatbots],
                    talk.own_status)
    talk.to_dataset.click(partial(votes_dataset, workspace), None, talk.dataset_status)
    return working


def wire_exports(workspace: Workspace, exports: Export) -> None:
    exports.zip.click(partial(export_zip, workspace), exports.run, [exports.file, exports.status])
    exports.merge.click(partial(export_merge, workspace), exports.run, exports.status)
    exports.push.click(partial(export_push, workspace), [exports.run, exports.what, exports.repo, exports.token],
                       exports.status)
