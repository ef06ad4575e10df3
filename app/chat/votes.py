"""The Compare tab's session and its blind votes: panes shuffled when blind, which pane a person preferred, kept in one
workspace file and tallied per run."""
from __future__ import annotations

import json
import os
import random
import threading
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Sequence

from app.chat.panes import Pane
from app.chat.prompting import Prompting, with_typed
from app.workspace import Workspace, atomic_write_json

VOTES_FILE = "votes.json"
TIE = "tie"  # a vote for no pane in particular: "they are equally good"

_write_lock = threading.Lock()  # several browsers may vote at once; each vote is a read-modify-write


@dataclass
class Vote:
    winner: str  # a pane key (app.chat.panes.BASE, a run id, "<run id>/step-N") or TIE
    shown: list[str]  # every pane key the voter saw
    base: str = ""  # the base model reference
    prompt: str = ""  # the last prompt, so a surprising vote can be looked at again
    labels: dict[str, str] = field(default_factory=dict)  # pane key -> label at voting time
    time: float = field(default_factory=time.time)

    @classmethod
    def from_dict(cls, data) -> "Vote | None":
        """A vote read back from the file, or None for an entry that is not one (hand edits, old formats)."""
        if not isinstance(data, dict) or not isinstance(data.get("winner"), str):
            return None
        shown = data.get("shown")
        if not isinstance(shown, list) or not all(isinstance(k, str) for k in shown):
            return None
        labels = data.get("labels") if isinstance(data.get("labels"), dict) else {}
        when = data.get("time")
        return cls(
            winner=data["winner"], shown=shown, base=str(data.get("base") or ""), prompt=str(data.get("prompt") or ""),
            labels={str(k): str(v) for k, v in labels.items()},
            time=float(when) if isinstance(when, (int, float)) else 0.0,
        )


@dataclass(frozen=True)
class CompareSession:
    """One browser's comparison: the panes in the order shown, whether their names are hidden, the last prompt."""
    base: str  # the base model reference
    runs: tuple[str, ...]  # the run keys chosen, in the order chosen
    blind: bool
    keys: tuple[str, ...]  # the pane keys in the order shown: shuffled when blind
    labels: tuple[str, ...]  # the panes' labels, in the same order
    revealed: bool  # names shown: always when not blind, else after a vote or a reveal
    prompt: str = ""  # the last message every pane answered
    voted_prompt: str | None = None  # the message last voted on: one vote per answer
    trained: tuple[Prompting, ...] = ()  # what each pane was trained with (system prompt, tools), in the same order
    system: str = ""  # the system prompt typed for every pane; "" leaves each pane the one it was trained with

    @classmethod
    def start(cls, panes: Sequence[Pane], base: str, runs: Sequence[str], blind: bool,
              rng: random.Random | None = None) -> CompareSession:
        """A session over `panes` (the base first); blind, they are shuffled so that a position says nothing."""
        panes = list(panes)
        if blind:
            (rng or random).shuffle(panes)
        return cls(base, tuple(runs), bool(blind), tuple(p.key for p in panes), tuple(p.label for p in panes),
                   revealed=not blind, trained=tuple(p.prompting for p in panes))

    def told(self) -> list[Prompting]:
        """What each pane, in the order shown, is told before the chat."""
        return [with_typed(p, self.system) for p in self.trained]

    def same_choice(self, base: str, runs: Sequence[str], blind: bool) -> bool:
        """True when these are the base, runs and mode the session was started with (its chats can go on)."""
        return (self.base, self.runs, self.blind) == (base, tuple(runs), bool(blind))

    def vote_for(self, index: int) -> Vote:
        """The vote for the pane shown at `index`, or a tie for a negative index."""
        return Vote(winner=TIE if index < 0 else self.keys[index], shown=list(self.keys), base=self.base,
                    prompt=self.prompt, labels=dict(zip(self.keys, self.labels)))

    def voted(self) -> CompareSession:
        """After a vote: the names are revealed and this answer cannot be voted on again."""
        return replace(self, revealed=True, voted_prompt=self.prompt)


@dataclass(frozen=True)
class TallyRow:
    key: str
    label: str
    wins: int  # votes where this pane was preferred
    shown: int  # votes where this pane was one of the choices
    ties: int

    @property
    def win_share(self) -> float:
        return self.wins / self.shown if self.shown else 0.0


class VoteBook:
    def __init__(self, workspace: Workspace):
        self.path = Path(workspace.root) / VOTES_FILE

    def load(self) -> list[Vote]:
        """Every readable vote; a garbled file is set aside (votes.json.unreadable-<time>) rather than lost."""
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return []
        except (json.JSONDecodeError, UnicodeDecodeError, OSError):
            self._set_aside()
            return []
        entries = data.get("votes") if isinstance(data, dict) else None
        if not isinstance(entries, list):
            self._set_aside()
            return []
        return [v for v in (Vote.from_dict(e) for e in entries) if v is not None]

    def _set_aside(self) -> None:
        try:
            os.replace(self.path, self.path.with_name(f"{self.path.name}.unreadable-{int(time.time())}"))
        except OSError:
            pass

    def add(self, vote: Vote) -> None:
        if vote.winner != TIE and vote.winner not in vote.shown:
            raise ValueError(f"winner {vote.winner!r} was not one of the panes shown ({', '.join(vote.shown)})")
        with _write_lock:
            votes = self.load()
            votes.append(vote)
            atomic_write_json(self.path, {"votes": [asdict(v) for v in votes]})

    def tally(self) -> list[TallyRow]:
        """One row per pane key ever voted on, most wins first."""
        wins: dict[str, int] = {}
        shown: dict[str, int] = {}
        ties: dict[str, int] = {}
        labels: dict[str, str] = {}
        for vote in self.load():
            for key in vote.shown:
                shown[key] = shown.get(key, 0) + 1
                labels[key] = vote.labels.get(key) or labels.get(key) or key
                if vote.winner == TIE:
                    ties[key] = ties.get(key, 0) + 1
            if vote.winner != TIE:
                wins[vote.winner] = wins.get(vote.winner, 0) + 1
        rows = [TallyRow(k, labels[k], wins.get(k, 0), n, ties.get(k, 0)) for k, n in shown.items()]
        return sorted(rows, key=lambda r: (-r.wins, -r.win_share, r.key))
