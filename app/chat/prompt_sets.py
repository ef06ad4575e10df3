"""Prompt sets for the Compare tab: a list of prompts answered by every pane into one side-by-side table, and its export."""
from __future__ import annotations

import csv
import io
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from app.chat.cache import Loaded
from app.chat.generate import Sampling, generate
from app.chat.prompting import with_typed
from app.data import dataset as data
from app.data.conversation import first_prompt
from app.runs.store import RunNotFound, RunStore
from app.spec import ConfigError
from app.data.template import chat_prompt
from app.workspace import Workspace, atomic_write_text

MAX_PROMPTS = 200  # a set runs on every pane; beyond this a demo turns into a benchmark
ROWS_PER_BATCH = 16  # prompt x pane rows generated together; more is faster per row but holds more KV cache


class PromptSetError(ValueError):
    """A prompt set that cannot be built, in plain words."""


def demo_sets() -> dict[str, list[str]]:
    """Title -> held-out prompts of each bundled demo dataset (prompts it was not trained on); none when a card
    cannot be read, so that a broken card costs this list rather than the page."""
    import yaml

    try:
        return {card.title: list(card.held_out_prompts) for card in data.demo_datasets()}
    except (OSError, KeyError, TypeError, ValueError, yaml.YAMLError):
        return {}


def typed_prompts(text: str) -> list[str]:
    prompts = [line.strip() for line in (text or "").splitlines() if line.strip()]
    if not prompts:
        raise PromptSetError("Type at least one prompt, one per line.")
    return _capped(prompts)


def validation_prompts(workspace: Workspace, run_id: str) -> list[str]:
    """The prompts of the rows a run held out for validation (its val_dataset, else its seeded split): an Alpaca row's
    instruction and input, a conversation's first user message."""
    store = RunStore(workspace.runs)
    try:
        config = store.config(run_id)
    except (RunNotFound, ConfigError, OSError):
        raise PromptSetError("Choose a run: its validation rows are the prompts.") from None
    try:
        if config.val_dataset:
            rows = data.load_training_rows(config.val_dataset)
        else:
            _, rows = data.split_rows(data.load_training_rows(config.dataset), config.val_split, config.seed)
    except (OSError, data.DataError) as e:
        raise PromptSetError(f"Run {run_id}'s dataset cannot be read any more ({e}).") from None
    prompts = [p for p in (first_prompt(row).strip() for row in rows) if p]
    if not prompts:
        raise PromptSetError(f"Run {run_id} held out no validation rows (its validation share is 0).")
    return _capped(prompts)


def _capped(prompts: list[str]) -> list[str]:
    return list(dict.fromkeys(prompts))[:MAX_PROMPTS]


@dataclass
class PromptTable:
    """Prompts down, panes across: what every model answered."""
    headers: list[str]  # "Prompt", then one label per pane
    rows: list[list[str]]

    def to_csv(self) -> str:
        out = io.StringIO()
        writer = csv.writer(out)
        writer.writerow(self.headers)
        writer.writerows(self.rows)
        return out.getvalue()

    def to_markdown(self) -> str:
        def cell(text: str) -> str:
            return (text or "").replace("|", "\\|").replace("\r", "").replace("\n", "<br>")

        lines = ["| " + " | ".join(cell(h) for h in self.headers) + " |", "|" + "---|" * len(self.headers)]
        lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in self.rows]
        return "\n".join(lines) + "\n"


def run_prompt_set(loaded: Loaded, prompts: list[str], sampling: Sampling,
                   system: str | None = None) -> Iterator[PromptTable]:
    """Answer each prompt on every pane (single turn), each pane with the system prompt and tools it was trained with
    (or `system`, typed for all); yields the table as it fills, a batch of rows at a time."""
    panes = loaded.panes
    table = PromptTable(["Prompt", *[p.label for p in panes]], [[p] + [""] * len(panes) for p in prompts])
    cells = [(i, j) for i in range(len(prompts)) for j in range(len(panes))]
    told = [with_typed(p.prompting, system) for p in panes]

    def text(i: int, j: int) -> str:
        return chat_prompt(loaded.tokenizer, [(prompts[i], None)], told[j].system or None, list(told[j].tools) or None,
                           conversations=told[j].conversations)

    for start in range(0, len(cells), ROWS_PER_BATCH):
        batch = cells[start:start + ROWS_PER_BATCH]
        rows = [(panes[j].key, text(i, j)) for i, j in batch]
        for outputs in generate(loaded, rows, sampling):
            for (i, j), out in zip(batch, outputs):
                table.rows[i][j + 1] = out.text
            yield table


def save_table(table: PromptTable, workspace: Workspace, name: str = "prompt-set") -> tuple[Path, Path]:
    """Write the table as CSV and Markdown under workspace/exports/; returns both paths."""
    stem = f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"
    folder = Path(workspace.root) / "exports"
    csv_path, md_path = folder / f"{stem}.csv", folder / f"{stem}.md"
    atomic_write_text(csv_path, table.to_csv())
    atomic_write_text(md_path, table.to_markdown())
    return csv_path, md_path
