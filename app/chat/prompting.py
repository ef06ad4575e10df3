"""What each Compare pane is told before the chat: the system prompt and the tools its run was trained with, what the
base model is told beside them, and a typed system prompt that overrides them all.

A run was trained with its rows' own system prompts, else the run's dataset-level one (RunConfig.system_prompt), and
with the tool schemas its conversations offer: the same template, system prompt and tools in the chat make the
comparison one of what the run learned, not of a setting it never saw.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, replace
from functools import lru_cache
from typing import Iterable, Sequence

from app.data import dataset as data

SYSTEMS_KEPT = 3  # distinct row-level system prompts worth keeping: with 3, at least 2 stay apart whatever the default
SHOWN_CHARS = 80  # a long system prompt is cut to this in the line under a pane


@dataclass(frozen=True)
class DataPrompting:
    """What a training file's rows put before each conversation."""
    systems: tuple[str, ...] = ()  # the distinct row-level system prompts ("" for rows without one), at most SYSTEMS_KEPT
    tools: tuple[dict, ...] = ()  # the tool list shared by every row that offers tools
    tools_differ: bool = False  # rows offer different tool lists (then `tools` is empty)
    conversations: bool = False  # the rows are conversations (a model without a chat template read them in the plain format)
    unreadable: str = ""  # why the file could not be read (then nothing else is known)


def _tools_key(tools: Sequence[dict]) -> str:
    return json.dumps(list(tools), ensure_ascii=False, sort_keys=True, default=str)


def data_prompting(rows: Iterable[dict]) -> DataPrompting:
    """The system prompts and the tool list of stored rows (conversations, or Alpaca rows: no system, no tools).
    A row without tools does not count against the shared list: a conversation that needs no tool leaves them out."""
    systems: list[str] = []
    tool_lists: dict[str, tuple[dict, ...]] = {}
    conversations = False
    for row in rows:
        conversations = conversations or "messages" in row
        system = str(row.get("system") or "")
        if system not in systems and len(systems) < SYSTEMS_KEPT:
            systems.append(system)
        tools = row.get("tools")
        if tools:
            tool_lists.setdefault(_tools_key(tools), tuple(tools))
    shared = next(iter(tool_lists.values())) if len(tool_lists) == 1 else ()
    return DataPrompting(tuple(sorted(systems)), shared, len(tool_lists) > 1, conversations)


def dataset_prompting(path: str) -> DataPrompting:
    """data_prompting of a training file, read again only when the file changes (its modification time or size)."""
    if not path:
        return DataPrompting()
    try:
        stat = os.stat(path)
    except OSError:
        return DataPrompting(unreadable="the file is not there any more")
    return _scan(str(path), stat.st_mtime_ns, stat.st_size)


@lru_cache(maxsize=32)
def _scan(path: str, mtime_ns: int, size: int) -> DataPrompting:
    try:
        return data_prompting(data.load_training_rows(path))
    except (OSError, data.DataError) as e:
        return DataPrompting(unreadable=str(e))


# --- what a pane is told -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Prompting:
    """What one pane is told before the chat, and why where something was left out."""
    system: str = ""
    tools: tuple[dict, ...] = ()
    typed: bool = False  # the system prompt is the one typed in the Compare tab, not the run's
    conversations: bool = False  # trained on conversations: a model without a chat template gets the plain format
    system_note: str = ""  # why the system prompt is not the obvious one, in words
    tools_note: str = ""  # why no tools are passed although the training data had some

    def notes(self) -> list[str]:
        return [n for n in (self.system_note, self.tools_note) if n]

    def describe(self) -> str:
        """One line for under the pane: 'System prompt (the run's): “Be brief.” · tools: get_weather'."""
        if self.system:
            text = self.system if len(self.system) <= SHOWN_CHARS else self.system[:SHOWN_CHARS - 1] + "…"
            said = f"System prompt ({'yours' if self.typed else 'trained with'}): “{' '.join(text.split())}”"
        else:
            said = "No system prompt"
        names = tool_names(self.tools)
        return said + (f" · tools: {', '.join(names)}" if names else "")


def tool_names(tools: Sequence[dict]) -> list[str]:
    """The names of tool schemas ({"type": "function", "function": {"name": ...}}, or a bare {"name": ...})."""
    names = []
    for tool in tools:
        spec = tool.get("function") if isinstance(tool.get("function"), dict) else tool
        names.append(str(spec.get("name") or "?"))
    return names


def run_prompting(config_system: str, found: DataPrompting) -> Prompting:
    """What a run's pane is told: the system prompt every training conversation had (each row's own, else the run's
    dataset-level `config_system`) when they all had the same; else the run's dataset-level one. The tools: the list
    its conversations share."""
    config_system = (config_system or "").strip()
    if found.unreadable:
        return Prompting(config_system, system_note=f"its training data cannot be read ({found.unreadable}), so only "
                                                    f"the run's own system prompt is used and no tools")
    seen = {s or config_system for s in found.systems}
    system, system_note = config_system, ""
    if len(seen) == 1:
        system = seen.pop()
    elif len(seen) > 1:
        fallback = "the run's dataset-level one" if config_system else "none"
        system_note = f"its conversations had different system prompts, so this pane gets {fallback}"
    tools_note = "its conversations offer different tool lists, so no tools are passed" if found.tools_differ else ""
    return Prompting(system, found.tools, system_note=system_note, tools_note=tools_note,
                     conversations=found.conversations)


def base_prompting(runs: Sequence[Prompting]) -> Prompting:
    """What the base model is told: what every run was told when they agree, so the base answers the same prompt;
    nothing where they differ (there is no one setting to give it)."""
    if not runs:
        return Prompting()
    systems = {p.system for p in runs}
    tool_lists = {_tools_key(p.tools): p.tools for p in runs}
    system, system_note = (systems.pop(), "") if len(systems) == 1 else (
        "", "the runs were trained with different system prompts, so it gets none")
    tools, tools_note = (next(iter(tool_lists.values())), "") if len(tool_lists) == 1 else (
        (), "the runs were trained with different tools, so it gets none")
    return Prompting(system, tools, system_note=system_note, tools_note=tools_note,
                     conversations=all(p.conversations for p in runs))


def with_typed(prompting: Prompting, typed: str | None) -> Prompting:
    """A system prompt typed in the Compare tab goes to every pane instead of the trained one; tools stay."""
    typed = (typed or "").strip()
    if not typed:
        return prompting
    return replace(prompting, system=typed, typed=True, system_note="")
