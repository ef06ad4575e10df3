"""The Compare tab's session and its blind votes: panes shuffled when blind, which pane a person preferred, kept in one
workspace file, tallied per run, and turned into preference pairs (votes_to_pairs) to train on."""
from __future__ import annotations

import json
import os
import random
import threading
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Sequence

from app.chat.generate import chat_turns
from app.chat.panes import Pane
from app.chat.prompting import Prompting, with_typed
from app.data.dataset import plural
from app.workspace import Workspace, atomic_write_json

VOTES_FILE = "votes.json"
TIE = "tie"  # a vote for no pane in particular: "they are equally good"
EDITED = "edited"  # the winner of a vote whose chosen answer the person wrote: better than every pane's

_write_lock = threading.Lock()  # several browsers may vote at once; each vote is a read-modify-write


@dataclass
class Vote:
    winner: str  # a pane key (app.chat.panes.BASE, a run id, "<run id>/step-N"), TIE or EDITED
    shown: list[str]  # every pane key the voter saw
    base: str = ""  # the base model reference
    prompt: str = ""  # the last prompt, so a surprising vote can be looked at again
    labels: dict[str, str] = field(default_factory=dict)  # pane key -> label at voting time
    time: float = field(default_factory=time.time)
    # What votes_to_pairs needs, per pane key (EDITED too, for a written answer); empty in votes from before.
    answers: dict[str, str] = field(default_factory=dict)  # the last answer
    conversations: dict[str, list[dict]] = field(default_factory=dict)  # the chat it answered: user/assistant
    #   messages ending with the last user message (each pane's earlier answers are its own)
    systems: dict[str, str] = field(default_factory=dict)  # the system prompt it was told ("" for none)
    tools: dict[str, list[dict]] = field(default_factory=dict)  # the tool schemas its prompt held, when any

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
            answers=_texts(data.get("answers")), systems=_texts(data.get("systems")),
            conversations=_lists(data.get("conversations")), tools=_lists(data.get("tools")),
        )


def _texts(value) -> dict[str, str]:
    """A {key: text} mapping read back from the file; entries of another type (hand edits) are dropped."""
    if not isinstance(value, dict):
        return {}
    return {str(k): v for k, v in value.items() if isinstance(v, str)}


def _lists(value) -> dict[str, list[dict]]:
    """A {key: list of objects} mapping read back from the file; entries of another type are dropped."""
    if not isinstance(value, dict):
        return {}
    return {str(k): v for k, v in value.items() if isinstance(v, list) and all(isinstance(m, dict) for m in v)}


@dataclass(frozen=True)
class Answered:
    """What one pane answered: the chat before its last answer, what it was told, and that answer."""
    conversation: list[dict]  # user/assistant messages ending with the last user message
    system: str
    tools: list[dict]
    answer: str


def answered(history, system: str, tools) -> Answered | None:
    """A pane's chat (its chatbot's messages) as the prompt it answered and its last answer; None for a chat that has
    no question yet."""
    turns = chat_turns(history)
    if not turns:
        return None
    conversation = []
    for user, assistant in turns[:-1]:
        conversation += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant or ""}]
    conversation.append({"role": "user", "content": turns[-1][0]})
    return Answered(conversation, system, [dict(t) for t in tools], turns[-1][1] or "")


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
    tools_written: bool = True  # the chat template wrote the tool schemas into the prompts (else no pane saw them)

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

    def answered(self, histories: Sequence | None) -> dict[str, Answered]:
        """What each pane answered (pane key -> Answered), from the panes' chats in the order shown; the system prompt
        and the tools are those it was told, the tools only when the template wrote them into its prompt."""
        told = self.told()
        found = {}
        for key, history, prompting in zip(self.keys, histories or (), told):
            tools = prompting.tools if self.tools_written else ()
            done = answered(history, prompting.system, tools)
            if done is not None:
                found[key] = done
        return found

    def vote_for(self, index: int, histories: Sequence | None = None) -> Vote:
        """The vote for the pane shown at `index`, or a tie for a negative index; with the panes' chats (in the order
        shown), it keeps what each pane answered, for votes_to_pairs."""
        vote = Vote(winner=TIE if index < 0 else self.keys[index], shown=list(self.keys), base=self.base,
                    prompt=self.prompt, labels=dict(zip(self.keys, self.labels)))
        return _with_answers(vote, self.answered(histories))

    def edited_vote(self, text: str, index: int, histories: Sequence) -> Vote:
        """A vote for an answer the person wrote (EDITED) over every pane's. It answers the chat of the pane shown at
        `index` (the one it was edited from: the panes' earlier answers may differ), with what that pane was told."""
        found = self.answered(histories)
        start = found.get(self.keys[index]) if 0 <= index < len(self.keys) else None
        if start is None:
            raise ValueError("there is no answer to edit yet: send a message first")
        found[EDITED] = replace(start, answer=text)
        vote = Vote(winner=EDITED, shown=list(self.keys), base=self.base, prompt=self.prompt,
                    labels=dict(zip(self.keys, self.labels)) | {EDITED: "your answer"})
        return _with_answers(vote, found)

    def voted(self) -> CompareSession:
        """After a vote: the names are revealed and this answer cannot be voted on again."""
        return replace(self, revealed=True, voted_prompt=self.prompt)


def _with_answers(vote: Vote, found: dict[str, Answered]) -> Vote:
    return replace(vote, answers={k: a.answer for k, a in found.items()},
                   conversations={k: a.conversation for k, a in found.items()},
                   systems={k: a.system for k, a in found.items()},
                   tools={k: a.tools for k, a in found.items() if a.tools})


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
        if vote.winner == EDITED and EDITED not in vote.answers:
            raise ValueError("a vote for your own answer needs that answer")
        if vote.winner not in (TIE, EDITED) and vote.winner not in vote.shown:
            raise ValueError(f"winner {vote.winner!r} was not one of the panes shown ({', '.join(vote.shown)})")
        with _write_lock:
            votes = self.load()
            votes.append(vote)
            atomic_write_json(self.path, {"votes": [asdict(v) for v in votes]})

    def tally(self) -> list[TallyRow]:
        """One row per pane key ever voted on, most wins first. A written answer is not a choice between the panes,
        so those votes are not counted here (they are pairs for votes_to_pairs)."""
        wins: dict[str, int] = {}
        shown: dict[str, int] = {}
        ties: dict[str, int] = {}
        labels: dict[str, str] = {}
        for vote in self.load():
            if vote.winner == EDITED:
                continue
            for key in vote.shown:
                shown[key] = shown.get(key, 0) + 1
                labels[key] = vote.labels.get(key) or labels.get(key) or key
                if vote.winner == TIE:
                    ties[key] = ties.get(key, 0) + 1
            if vote.winner != TIE:
                wins[vote.winner] = wins.get(vote.winner, 0) + 1
        rows = [TallyRow(k, labels[k], wins.get(k, 0), n, ties.get(k, 0)) for k, n in shown.items()]
        return sorted(rows, key=lambda r: (-r.wins, -r.win_share, r.key))


# --- votes as preference pairs ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PairSummary:
    """What votes_to_pairs made of the votes, and what it left out and why."""
    votes: int  # votes read
    pairs: int  # pairs made
    ties: int = 0  # votes for no answer in particular
    unrecorded: int = 0  # votes from before the answers were kept with the vote (or whose winner's answer is missing)
    missing: int = 0  # pairs whose other answer was not kept (that pane had not answered)
    empty: int = 0  # pairs with an empty answer on one side
    same: int = 0  # pairs whose two answers are the same text
    duplicates: int = 0  # pairs already made from an earlier vote
    other_chat: int = 0  # pairs kept whose rejected answer followed other earlier answers than the chosen one's

    @property
    def votes_left_out(self) -> int:
        return self.ties + self.unrecorded

    @property
    def pairs_left_out(self) -> int:
        return self.missing + self.empty + self.same + self.duplicates

    def left_out(self) -> list[str]:
        """Each reason something was left out, in words with its count."""
        reasons = [
            (self.ties, "tie", "no answer was better"),
            (self.unrecorded, "vote", "made before the answers were kept with each vote"),
            (self.missing, "pair", "the other pane had no answer"),
            (self.empty, "pair", "one of the two answers was empty"),
            (self.same, "pair", "both answers were the same text, so the pair teaches nothing"),
            (self.duplicates, "pair", "the same pair came from an earlier vote"),
        ]
        return [f"{plural(n, word)} ({why})" for n, word, why in reasons if n]

    def describe(self) -> str:
        made = f"{plural(self.pairs, 'preference pair')} from {plural(self.votes, 'vote')}"
        out = self.left_out()
        said = f"{made}; left out: {'; '.join(out)}." if out else f"{made}; nothing was left out."
        if self.other_chat:
            said += (f" In {self.other_chat} of the pairs the chat had gone on with different earlier answers in the "
                     f"two panes: those pairs use the chat the chosen answer followed.")
        return said


def votes_to_pairs(votes: Sequence[Vote]) -> tuple[list[dict], PairSummary]:
    """Preference pairs in app.data.preference's stored form ({"system"?, "messages", "chosen", "rejected", "tools"?})
    from Compare votes, in the votes' order.

    The rule: a vote for one answer gives one pair per other answer shown, the winner's answer as chosen and that
    answer as rejected; a vote for the person's own answer (EDITED) gives one pair per pane's answer, the own answer as
    chosen. The prompt is the chat the chosen answer followed (its user and assistant turns up to the last user
    message) with the system prompt and tools that pane was told: the panes usually agree on them (every pane gets
    the typed system prompt, and the base model the one the runs share), and where they differ the chosen answer was
    written under the winner's. Left out, and counted in the summary: ties; votes kept before answers were (they
    hold no answers); pairs with an empty answer, pairs whose two answers are the same text (spaces around them
    aside), and pairs that repeat an earlier one exactly.
    """
    rows: list[dict] = []
    seen: set[str] = set()
    counts = dict(ties=0, unrecorded=0, missing=0, empty=0, same=0, duplicates=0, other_chat=0)
    for vote in votes:
        if vote.winner == TIE:
            counts["ties"] += 1
            continue
        prompt = vote.conversations.get(vote.winner) or []
        if vote.winner not in vote.answers or not prompt or prompt[-1].get("role") != "user":
            counts["unrecorded"] += 1
            continue
        chosen = vote.answers[vote.winner]
        head = {"system": vote.systems[vote.winner]} if vote.systems.get(vote.winner) else {}
        tail = {"tools": vote.tools[vote.winner]} if vote.tools.get(vote.winner) else {}
        for loser in (k for k in vote.shown if k != vote.winner):
            rejected = vote.answers.get(loser)
            if rejected is None:
                counts["missing"] += 1
                continue
            if not chosen.strip() or not rejected.strip():
                counts["empty"] += 1
                continue
            if chosen.strip() == rejected.strip():
                counts["same"] += 1
                continue
            row = head | {"messages": prompt, "chosen": chosen, "rejected": rejected} | tail
            key = json.dumps(row, ensure_ascii=False, sort_keys=True, default=str)
            if key in seen:
                counts["duplicates"] += 1
                continue
            seen.add(key)
            rows.append(row)
            if vote.conversations.get(loser, prompt) != prompt:
                counts["other_chat"] += 1
    return rows, PairSummary(len(votes), len(rows), **counts)
