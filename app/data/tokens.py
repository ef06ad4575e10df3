"""Token lengths of templated rows, fast enough for 50,000 rows: batch templating and batch tokenizing, stats, histogram."""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Sequence

from app.data import template

# Probe texts that no real row contains: rendering them once shows where the template puts the user text and the answer.
_USER_PROBE = "\ue000user-probe\ue001"
_OUTPUT_PROBE = "\ue002output-probe\ue003"
# Rows with awkward content: a template that trims, escapes or branches on content fails these and gets the slow path.
_CHECK_ROWS = (
    {"instruction": "  Say {{ hi }}  ", "input": "  with <b>tags</b> and 'quotes'\n", "output": "  Sure:\n\n {hi}  "},
    {"instruction": "x", "input": "", "output": ""},
)


@lru_cache(maxsize=4)
def load_tokenizer(ref: str, models_dir: str):
    """The tokenizer of a model reference ("embedded", a folder, a hub id); raises app.models.ModelError."""
    from transformers import AutoTokenizer

    from app.models import resolve_model

    return AutoTokenizer.from_pretrained(resolve_model(ref, Path(models_dir)))


class Templater:
    """template.render for many rows: the template is rendered once with probe texts and then filled by string
    concatenation, which is ~50x faster than one Jinja call per row. Templates where this would not give
    exactly template.render's text (checked on awkward rows and on the first rows of every batch) use render."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self._parts = self._probe()
        self.head, self.head_length = self._shared_head()

    def _shared_head(self) -> tuple[str, int]:
        """The start all prompts share, up to its last special token, and its token count. Special tokens split the
        text before tokenizing, so this part (a system prompt, say) can be counted once instead of in every row."""
        if not self._parts:
            return "", 0
        p0 = self._parts[0]
        ends = [p0.rfind(t) + len(t) for t in getattr(self.tokenizer, "all_special_tokens", []) if t and t in p0]
        if not ends:
            return "", 0
        head = p0[: max(ends)]
        return head, encode_lengths(self.tokenizer, [head])[0]

    def _probe(self) -> tuple[str, str, str, str] | None:
        if not getattr(self.tokenizer, "chat_template", None):
            return None  # the Alpaca fallback is plain str.format in render(), already fast
        r = template.render(self.tokenizer, {"instruction": _USER_PROBE, "input": "", "output": _OUTPUT_PROBE})
        if r.prompt.count(_USER_PROBE) != 1 or r.response.count(_OUTPUT_PROBE) != 1:
            return None
        p0, p1 = r.prompt.split(_USER_PROBE)
        r0, r1 = r.response.split(_OUTPUT_PROBE)
        self._parts = (p0, p1, r0, r1)
        return self._parts if self._matches(_CHECK_ROWS) else None

    def _fast(self, row: dict) -> template.Rendered:
        p0, p1, r0, r1 = self._parts
        return template.Rendered(p0 + template.user_message(row) + p1, r0 + str(row.get("output") or "") + r1)

    def _matches(self, rows: Sequence[dict]) -> bool:
        return all(self._fast(row) == template.render(self.tokenizer, row) for row in rows)

    def render(self, rows: Sequence[dict]) -> tuple[list[str], list[str]]:
        """(prompts, responses) for the rows, exactly as template.render gives them."""
        if self._parts and not self._matches(rows[:2]):
            self._parts = None
        if self._parts:
            p0, p1, r0, r1 = self._parts
            user = template.user_message
            return [p0 + user(r) + p1 for r in rows], [r0 + str(r.get("output") or "") + r1 for r in rows]
        rendered = [template.render(self.tokenizer, r) for r in rows]
        return [r.prompt for r in rendered], [r.response for r in rendered]

    def prompt_lengths(self, prompts: list[str]) -> list[int]:
        """Token counts of rendered prompts, the shared head counted once (checked against whole prompts)."""
        cut = len(self.head)
        if cut and all(p.startswith(self.head) for p in prompts):
            lengths = [self.head_length + n for n in encode_lengths(self.tokenizer, [p[cut:] for p in prompts])]
            if lengths[:2] == encode_lengths(self.tokenizer, prompts[:2]):
                return lengths
            self.head = ""  # this tokenizer does not split the text there after all: count whole prompts from now on
        return encode_lengths(self.tokenizer, prompts)


def encode_lengths(tokenizer, texts: list[str]) -> list[int]:
    """Token count of each text, without special tokens (as template.tokenize counts them), in one batch call."""
    return [len(e) for e in template.encode_texts(tokenizer, texts)]


def templated_lengths(templater: Templater, rows: Sequence[dict]) -> tuple[list[int], list[int]]:
    """(prompt lengths, full lengths) in tokens of the rows once templated."""
    prompts, responses = templater.render(rows)
    prompt_lengths = templater.prompt_lengths(prompts)
    response_lengths = encode_lengths(templater.tokenizer, responses)
    return prompt_lengths, [p + r for p, r in zip(prompt_lengths, response_lengths)]


@dataclass(frozen=True)
class TokenStats:
    rows: int
    total: int  # tokens in all rows once templated, before the cutoff
    trained: int  # tokens that survive the cutoff
    mean: float
    median: int
    p95: int
    longest: int
    cutoff: int
    truncated: int  # rows longer than the cutoff

    @property
    def truncated_share(self) -> float:
        return self.truncated / self.rows if self.rows else 0.0


def token_stats(lengths: Sequence[int], cutoff: int) -> TokenStats:
    ordered = sorted(lengths)
    n = len(ordered)
    if n == 0:
        return TokenStats(0, 0, 0, 0.0, 0, 0, 0, cutoff, 0)
    total = sum(ordered)
    return TokenStats(
        rows=n,
        total=total,
        trained=sum(min(x, cutoff) for x in ordered),
        mean=total / n,
        median=ordered[n // 2],
        p95=ordered[min(n - 1, math.ceil(0.95 * n) - 1)],
        longest=ordered[-1],
        cutoff=cutoff,
        truncated=sum(1 for x in ordered if x > cutoff),
    )


@dataclass(frozen=True)
class TurnCuts:
    """What a cutoff does to a dataset's conversations (whole trailing turns go: template.encode)."""
    conversations_cut: int  # conversations longer than the cutoff
    turns_cut: int  # assistant turns they lose (a first answer cut inside counts as lost)
    nothing_left: int  # conversations whose first answer starts beyond the cutoff: training skips them


def turn_cuts(answer_ends: Sequence[Sequence[int]], lengths: Sequence[int], cutoff: int,
              answer_starts: Sequence[int] | None = None) -> TurnCuts:
    """From DataReport.answer_ends / lengths / answer_starts (counted once; this is cheap for every slider move)."""
    cut = [i for i, n in enumerate(lengths) if n > cutoff]
    return TurnCuts(
        conversations_cut=len(cut),
        turns_cut=sum(sum(1 for end in answer_ends[i] if end > cutoff) for i in cut) if answer_ends else 0,
        nothing_left=sum(1 for i in cut if answer_starts[i] >= cutoff) if answer_starts is not None and len(answer_starts) else 0,
    )


def steps_per_epoch(train_rows: int, batch_size: int, grad_accum: int = 1) -> int:
    """Optimizer steps in one pass over the training rows (a last partial batch still makes a step)."""
    return math.ceil(train_rows / max(1, batch_size * max(1, grad_accum))) if train_rows else 0


def length_histogram(lengths: Sequence[int], cutoff: int, bins: int = 40):
    """A plotly bar chart of templated lengths with the cutoff marked; binned here so 1M rows stay light."""
    import numpy as np
    import plotly.graph_objects as go

    fig = go.Figure()
    if len(lengths):
        values = np.asarray(lengths)
        counts, edges = np.histogram(values, bins=min(bins, max(1, int(values.max() - values.min()) + 1)))
        centres = (edges[:-1] + edges[1:]) / 2
        fig.add_bar(
            x=centres, y=counts, width=(edges[1] - edges[0]) * 0.95, marker_color="#4c78a8", name="rows",
            hovertemplate="%{y} rows around %{x:.0f} tokens<extra></extra>",
        )
        fig.add_vline(x=cutoff, line_dash="dash", line_color="#e45756",
                      annotation_text=f"cutoff {cutoff}", annotation_position="top right")
    fig.update_layout(
        xaxis_title="tokens per row once templated (prompt + response)", yaxis_title="rows",
        height=300, margin=dict(l=50, r=20, t=30, b=50), showlegend=False,
    )
    return fig
