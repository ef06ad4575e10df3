"""Demo datasets and token counting: the demos load clean and short, and the fast templating is exactly template.render."""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

from app.data import dataset as data
from app.data import template
from app.data.tokens import Templater, length_histogram, load_tokenizer, steps_per_epoch, templated_lengths, token_stats

ROOT = Path(__file__).resolve().parent.parent
DEMOS = ("pirate-persona", "json-answers", "helpdesk")  # Alpaca rows
CONVERSATION_DEMOS = ("support-chat", "tool-calls")  # whole conversations; tool-calls needs a template with tools
AWKWARD = [
    {"instruction": "  padded  ", "input": "", "output": "  spaced answer  "},
    {"instruction": "with input", "input": "  some context\n", "output": "x"},
    {"instruction": "Jinja-looking {{ text }} {% if %}", "input": "", "output": "{{ braces }}"},
    {"instruction": "unicode ünïcödé 你好 🙂", "input": "", "output": "émoji 🙂"},
    {"instruction": "q", "input": "", "output": ""},
]


@pytest.fixture(scope="module")
def tokenizer(embedded_model_dir):
    return load_tokenizer(str(embedded_model_dir), str(embedded_model_dir.parent))


@pytest.fixture(scope="module")
def alpaca_tokenizer(embedded_model_dir):
    """The same tokenizer with no chat template, as a base model has: render() falls back to the Alpaca prompt."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(embedded_model_dir)
    tok.chat_template = None
    return tok


def test_demo_cards_match_their_files():
    from app.data.conversation import first_prompt

    cards = {c.name: c for c in data.demo_datasets()}
    assert sorted(cards) == sorted(DEMOS + CONVERSATION_DEMOS)
    for name in DEMOS + CONVERSATION_DEMOS:
        card = cards[name]
        rows = [json.loads(line) for line in card.path.read_text(encoding="utf-8").splitlines()]
        assert (150 if name in DEMOS else 8) <= card.rows == len(rows) <= 400
        assert card.title and card.teaches and len(card.held_out_prompts) == 5
        prompts = {first_prompt(r) for r in rows}
        assert not prompts & set(card.held_out_prompts), "held-out prompts must not be training rows"


def test_conversation_demos_are_whole_multi_turn_conversations(tokenizer):
    chat = data.check_file(data.DEMO_DIR / "support-chat.jsonl", tokenizer=tokenizer, cutoff=512)
    assert chat.usable and chat.findings == [] and chat.kept == chat.records
    assert chat.turns >= 2 * chat.kept and all(r.get("system") for r in chat.rows)
    # every tool conversation is readable, and SmolLM2's template (no tool support) is said to be unable to write it
    tools = data.check_file(data.DEMO_DIR / "tool-calls.jsonl")
    assert tools.usable and tools.findings == [] and tools.kept == tools.records
    on_smollm = data.check_file(data.DEMO_DIR / "tool-calls.jsonl", tokenizer=tokenizer, cutoff=512)
    assert on_smollm.kept == 0 and {f.row for f in on_smollm.findings if f.code == "template_cannot"} == set(range(1, tools.records + 1))


@pytest.mark.parametrize("name", DEMOS)
def test_demo_datasets_load_with_zero_findings_and_short_answers(name, tokenizer):
    report = data.check_file(data.DEMO_DIR / f"{name}.jsonl", tokenizer=tokenizer, cutoff=256)
    assert report.usable and report.findings == [] and report.kept == report.records
    answers = [len(ids) for ids in tokenizer([r["output"] for r in report.rows], add_special_tokens=False)["input_ids"]]
    assert 20 <= min(answers) and max(answers) <= 60, (min(answers), max(answers))


def test_demo_generator_reproduces_the_committed_files():
    sys.path.insert(0, str(ROOT / "assets"))
    try:
        import make_demo_datasets as gen
    finally:
        sys.path.pop(0)
    for name in DEMOS + CONVERSATION_DEMOS:
        assert gen.jsonl(gen.build(name)) == (data.DEMO_DIR / f"{name}.jsonl").read_text(encoding="utf-8"), name
        assert gen.card(name, len(gen.build(name))) == (data.DEMO_DIR / f"{name}.card.yaml").read_text(encoding="utf-8")


@pytest.mark.parametrize("which", ["chat template", "alpaca fallback"])
def test_templater_equals_render_and_lengths_equal_tokenize(which, tokenizer, alpaca_tokenizer):
    tok = tokenizer if which == "chat template" else alpaca_tokenizer
    rows = AWKWARD + [json.loads(l) for l in (data.DEMO_DIR / "helpdesk.jsonl").read_text().splitlines()[:20]]
    templater = Templater(tok)
    # SmolLM2's chat template is a plain substitution, so the probe-and-fill path must be the one taken.
    assert (templater._parts is not None) == (which == "chat template")
    # The system prompt up to '<|im_start|>' before 'user' is counted once; the Alpaca prompt has no special token.
    assert templater.head.endswith("<|im_start|>") if which == "chat template" else templater.head == ""
    prompts, responses = templater.render(rows)
    assert [template.Rendered(p, r) for p, r in zip(prompts, responses)] == [template.render(tok, r) for r in rows]
    prompt_lengths, lengths = templated_lengths(templater, rows)
    for row, p, n in zip(rows, prompt_lengths, lengths):
        ids = template.tokenize(tok, row, cutoff_len=10**6)
        assert n == len(ids["input_ids"]) and p == ids["labels"].count(template.IGNORE_INDEX)


def test_templater_falls_back_for_templates_that_change_the_text(tokenizer):
    """A template that trims content is not a plain substitution: per-row render keeps the text exact."""
    from copy import deepcopy

    tok = deepcopy(tokenizer)
    tok.chat_template = tok.chat_template.replace("message['content']", "message['content'] | trim")
    templater = Templater(tok)
    assert templater._parts is None
    prompts, _ = templater.render(AWKWARD[:1])
    assert prompts[0] == template.render(tok, AWKWARD[0]).prompt and "\npadded<|im_end|>" in prompts[0]


@pytest.mark.parametrize("lengths,cutoff,expected", [
    ([], 256, dict(rows=0, total=0, truncated=0)),
    ([10, 20, 30, 300], 256, dict(rows=4, total=360, trained=316, longest=300, truncated=1, median=30)),
    ([5] * 100, 4, dict(rows=100, truncated=100, p95=5, trained=400)),
])
def test_token_stats(lengths, cutoff, expected):
    stats = token_stats(lengths, cutoff)
    assert {k: getattr(stats, k) for k in expected} == expected
    assert stats.truncated_share == (expected["truncated"] / len(lengths) if lengths else 0)


@pytest.mark.parametrize("rows,batch,accum,steps", [(0, 4, 1, 0), (1, 4, 1, 1), (8, 4, 1, 2), (9, 4, 1, 3), (9, 4, 2, 2), (100, 1, 1, 100)])
def test_steps_per_epoch(rows, batch, accum, steps):
    assert steps_per_epoch(rows, batch, accum) == steps == (math.ceil(rows / (batch * accum)) if rows else 0)


def test_histogram_marks_the_cutoff_and_counts_every_row():
    fig = length_histogram([10, 20, 20, 300, 500], cutoff=256)
    assert sum(fig.data[0].y) == 5
    assert any(s.x0 == 256 for s in fig.layout.shapes)
    assert length_histogram([], 256).data == ()


def test_a_wrong_shared_head_count_is_caught(tokenizer):
    from app.data.tokens import encode_lengths

    templater = Templater(tokenizer)
    templater.head_length += 1  # as if the tokenizer merged across the special token after all
    prompts, _ = templater.render(AWKWARD)
    assert templater.prompt_lengths(prompts) == encode_lengths(tokenizer, prompts) and templater.head == ""
