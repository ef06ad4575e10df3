"""The OBJECTIVES registry: what a run learns (supervised answers today; preferences, rewards, embeddings next).

Adding an objective is one module beside this one that defines `OBJECTIVE`, and one line below."""
from __future__ import annotations

from app.objectives import preference, sft
from app.objectives.base import Metric, Objective, ObjectiveError

OBJECTIVES: dict[str, Objective] = {o.name: o for o in (
    sft.OBJECTIVE,
    *preference.OBJECTIVES,
)}
DEFAULT = "sft"

__all__ = ["DEFAULT", "OBJECTIVES", "Metric", "Objective", "ObjectiveError", "get_objective", "optional_controls"]


def get_objective(name: str) -> Objective:
    try:
        return OBJECTIVES[name]
    except KeyError:
        raise ObjectiveError(f"objective={name!r}: choose one of {', '.join(OBJECTIVES)}") from None


def optional_controls() -> list[str]:
    """The RunConfig fields that some objective lists in its controls: a tab shows each only while the chosen
    objective uses it (the others, such as the learning rate, apply to every objective)."""
    return sorted({c for o in OBJECTIVES.values() for c in o.controls})
