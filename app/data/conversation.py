"""The example every supervised dataset becomes: a conversation (an optional system prompt, user / assistant / tool
turns, assistant turns that may call tools, and the tool schemas offered). An Alpaca row is its one-turn case.

Stored datasets keep conversations in the Hugging Face `messages` shape, the one chat templates read:
    {"system": "...", "messages": [{"role": "user", "content": "..."},
                                   {"role": "assistant", "content": "", "tool_calls": [{"type": "function",
                                       "function": {"name": "f", "arguments": {...}}}]},
                                   {"role": "tool", "name": "f", "content": "..."}, ...],
     "tools": [{"type": "function", "function": {...}}]}
("system" and "tools" only when present). Alpaca rows are stored as {instruction, input, output} as before.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

ROLES = ("user", "assistant", "tool")


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: Any  # the parsed JSON arguments (normally an object)
    id: str = ""

    def to_message(self) -> dict:
        call = {"type": "function", "function": {"name": self.name, "arguments": self.arguments}}
        return ({"id": self.id} | call) if self.id else call


@dataclass(frozen=True)
class Turn:
    role: str  # one of ROLES
    content: str
    tool_calls: tuple[ToolCall, ...] = ()  # assistant turns only
    name: str = ""  # tool turns: the tool whose result this is
    call_id: str = ""  # tool turns: the id of the call it answers, when the file gives ids (some templates write it)
    learn: bool = True  # assistant turns: False for OpenAI's "weight": 0 (read as history, not learned)

    def to_message(self) -> dict:
        message: dict[str, Any] = {"role": self.role, "content": self.content}
        if self.tool_calls:
            message["tool_calls"] = [c.to_message() for c in self.tool_calls]
        if self.name:
            message["name"] = self.name
        if self.call_id:
            message["tool_call_id"] = self.call_id
        if not self.learn:
            message["weight"] = 0
        return message


@dataclass(frozen=True)
class Conversation:
    turns: tuple[Turn, ...]
    system: str = ""
    tools: tuple[dict, ...] = field(default_factory=tuple)

    @property
    def assistant_turns(self) -> list[int]:
        return [i for i, t in enumerate(self.turns) if t.role == "assistant"]

    @property
    def uses_tools(self) -> bool:
        return bool(self.tools) or any(t.role == "tool" or t.tool_calls for t in self.turns)

    def messages(self, default_system: str = "") -> list[dict]:
        """The messages a chat template reads, the system prompt first (this one's, else `default_system`)."""
        system = self.system or default_system
        return ([{"role": "system", "content": system}] if system else []) + [t.to_message() for t in self.turns]

    def to_row(self) -> dict:
        """The stored form (see the module's docstring)."""
        row: dict[str, Any] = {}
        if self.system:
            row["system"] = self.system
        row["messages"] = [t.to_message() for t in self.turns]
        if self.tools:
            row["tools"] = list(self.tools)
        return row

    def key(self) -> str:
        """A canonical text of the whole conversation: what duplicates are judged on."""
        return json.dumps(self.to_row(), ensure_ascii=False, sort_keys=True, default=str)


def is_conversation_row(row: dict) -> bool:
    return "messages" in row


def user_message(row: dict) -> str:
    instruction = str(row.get("instruction") or "").strip()
    extra = str(row.get("input") or "").strip()
    return f"{instruction}\n\n{extra}" if extra else instruction


def from_row(row: dict) -> Conversation:
    """A stored row as a conversation: a stored conversation as it is, an Alpaca row as its one-turn case."""
    if not is_conversation_row(row):
        return Conversation((Turn("user", user_message(row)), Turn("assistant", str(row.get("output") or ""))))
    turns = []
    for m in row["messages"]:
        calls = tuple(ToolCall(c["function"]["name"], c["function"].get("arguments"), c.get("id", ""))
                      for c in m.get("tool_calls") or ())
        turns.append(Turn(m["role"], m.get("content") or "", calls, m.get("name") or "", m.get("tool_call_id") or "",
                          m.get("weight", 1) != 0))
    return Conversation(tuple(turns), row.get("system") or "", tuple(row.get("tools") or ()))


def first_prompt(row: dict) -> str:
    """The first user message of a stored row: what a prompt set takes from it."""
    if not is_conversation_row(row):
        return user_message(row)
    return next((str(m.get("content") or "") for m in row["messages"] if m.get("role") == "user"), "")
