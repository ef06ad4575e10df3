"""Preference data (issue #16): every public preference shape is detected as preference data (never read as supervised
data) and read into the stored pair or rated-answer form, every bad row is named by row and field, rated responses
become pairs by the documented rule, pairs are counted in templated tokens, and `data check` counts honestly. The
sample files in tests/data/preference are written by the project in the shapes public datasets use (TRL's standard
and conversational forms, Intel/orca_dpo_pairs, LLaMA-Factory's Alpaca and ShareGPT forms, StackExchange pairs,
UltraFeedback raw and binarized, Anthropic HH-RLHF)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from app.data import store as data_store
from app.data import template
from app.data.dataset import ColumnMapping, check_file, detect_mapping
from app.data.preference import parse_label, parse_rating, pick_pair, side_rows, transcript_messages

ROOT = Path(__file__).resolve().parent.parent
DATA = Path(__file__).resolve().parent / "data" / "preference"


def user(text: str) -> dict:
    return {"role": "user", "content": text}


def answer(text: str) -> dict:
    return {"role": "assistant", "content": text}


def pair(messages: list, chosen: str, rejected: str, system: str = "") -> dict:
    return ({"system": system} if system else {}) | {"messages": messages, "chosen": chosen, "rejected": rejected}


def rated(messages: list, completion: str, label: bool) -> dict:
    return {"messages": messages, "completion": completion, "label": label}


def jsonl(*rows) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def tokenizer(embedded_model_dir):
    from app.data.tokens import load_tokenizer

    return load_tokenizer(str(embedded_model_dir), str(embedded_model_dir.parent))


SKY = "What colour is the sky on a clear day?"
HASH = "A hash map stores key-value pairs and finds a value from its key in about constant time by hashing the key."
PASTA = [user("I need a pasta recipe."), answer("Sure, what do you have at home?"), user("Tomatoes and garlic.")]
TUTOR = [user("What is 7 times 8?"), answer("56."), user("And 56 divided by 4?")]

# (file, mapping kind, records read, expected stored rows in file order)
READERS = [
    # 1. prompt / chosen / rejected text
    ("trl_pairs.jsonl", "pair", 3, [  # line 3 repeats line 1: left out
        pair([user(SKY)], "Blue: air scatters blue light more than red.", "Green."),
        pair([user("Name a prime number above 10.")], "11.", "12 is prime."),
    ]),
    ("orca_pairs.jsonl", "pair", 2, [  # system / question / chosen / rejected; an empty system is none
        pair([user("How many legs does a spider have?")], "Eight.", "Spiders have six legs, like all insects.",
             system="You are a helpful assistant who answers briefly."),
        pair([user("Translate 'thank you' into German.")], "Danke.", "Merci."),
    ]),
    ("alpaca_pairs.json", "pair", 2, [  # instruction and input make the prompt, as in Alpaca
        pair([user("Summarise the text in one sentence.\n\nThe meeting moved from Monday to Tuesday because the room was booked.")],
             "The meeting is now on Tuesday since the room was taken on Monday.", "There is a meeting."),
        pair([user("Give a synonym for 'happy'.")], "Glad.", "Sad."),
    ]),
    ("stack_pairs.csv", "pair", 2, [  # question / response_j (better) / response_k (worse)
        pair([user("How do I reverse a list in Python?")], "Use `items[::-1]` for a copy, or `items.reverse()` in place.", "You can't."),
        pair([user("What does `git stash` do?")],
             "It shelves your uncommitted changes so you can reapply them later with `git stash pop`.", "It deletes your changes."),
    ]),
    # 2. a conversation plus the two replies
    ("sharegpt_pairs.jsonl", "pair", 2, [  # from/value messages, replies as single gpt messages
        pair([user("How do I boil an egg?")], "Into the pot with it, sailor: ten minutes in boiling water!", "Boil it.",
             system="Reply like a ship's captain."),
        pair([user("Give me a colour."), answer("Teal."), user("Another one?")], "Ochre.", "Teal."),
    ]),
    ("trl_conversational.jsonl", "pair", 2, [  # prompt as messages, replies as lists holding one assistant message
        pair([user("What is 7 times 8?")], "56.", "54."),
        pair([user("Say good night.")], "Bonne nuit.", "Good night.", system="Answer in French."),
    ]),
    ("messages_pairs.jsonl", "pair", 1, [  # the issue's file: once trained on as a supervised conversation
        pair([user("Hi! Can you help with maths?"), answer("Yes, ask away."), user("What is 12 squared?")], "144.", "124."),
    ]),
    # 3. whole chosen and rejected conversations: the prompt is what they share
    ("ultrafeedback_binarized.jsonl", "pair", 2, [  # a prompt column too: each conversation starts with it
        pair([user("Write a haiku about rain.")], "Soft rain on the roof\nthe garden drinks, slow and deep\nmorning smells of earth",
             "Rain is wet."),
        pair([user("What is the capital of Australia?")], "Canberra.", "Sydney."),
    ]),
    ("hh_rlhf.jsonl", "pair", 2, [  # text transcripts
        pair([user("What's a good name for a goldfish?")], "How about Bubbles or Captain Fin?", "Fish don't need names."),
        pair(PASTA, "Fry the garlic in olive oil, add the chopped tomatoes, simmer ten minutes, and toss with the pasta.",
             "Buy a jar of sauce."),
    ]),
    ("whole_conversations.jsonl", "pair", 1, [
        pair(TUTOR, "14: four fourteens make 56.", "Work it out yourself.", system="You are a patient maths tutor."),
    ]),
    # 4. rated responses: one pair per prompt, highest-rated chosen, lowest-rated rejected, the first among equals
    ("ultrafeedback_raw.jsonl", "rated", 3, [  # line 2: all rated 7.5, no pair; line 3: an "N/A" rating is skipped
        pair([user("Explain what a hash map is in one sentence.")], HASH, "A structure."),
        pair([user("Name a planet with rings.")], "Saturn.", "The Moon."),
    ]),
    ("rated_lists.jsonl", "rated", 2, [
        pair([user("Suggest a name for a bakery.")], "The Rolling Pin", "Bread."),
        pair([user("What is 2 + 2?")], "4", "5"),
    ]),
    # 5. unpaired rated answers (KTO)
    ("kto.jsonl", "unpaired", 3, [
        rated([user("What is the boiling point of water at sea level?")], "100 °C.", True),
        rated([user("What is the boiling point of water at sea level?")], "50 °C.", False),
        rated([user("Name a mammal that can fly.")], "The bat.", True),
    ]),
    ("kto.csv", "unpaired", 4, [  # labels as "True" / "false" / "1" / "0" text
        rated([user("Say hello in Spanish.")], "Hola.", True),
        rated([user("Say hello in Spanish.")], "Bonjour.", False),
        rated([user("What is 3 squared?")], "9", True),
        rated([user("What is 3 squared?")], "6", False),
    ]),
    ("kto_conversational.jsonl", "unpaired", 2, [
        rated([user("Recommend a book about space.")], "'Cosmos' by Carl Sagan.", True),
        rated([user("Recommend a book about space.")], "I don't read.", False),
    ]),
]


@pytest.mark.parametrize("name,kind,records,expected", READERS, ids=[r[0] for r in READERS])
def test_each_public_shape_becomes_the_stored_form(tmp_path, name, kind, records, expected):
    report = check_file(DATA / name)
    assert report.mapping.kind == kind and report.mapping.needs_confirmation
    assert report.rows == expected, report.summary_lines()
    assert report.records == records and report.kept == len(expected) and report.usable
    assert report.example_word == ("rated answer" if kind == "unpaired" else "pair")
    # A saved dataset is its stored rows; reading them back (the Data tab and training do) gives the same rows.
    again = check_file(write(tmp_path, "train.jsonl", jsonl(*report.rows)))
    assert again.rows == report.rows and again.findings == []
    assert again.mapping.kind == ("unpaired" if kind == "unpaired" else "pair")


def test_conversations_as_json_text_in_csv_and_as_lists_in_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    chosen, rejected = [user("Say hi"), answer("Hi!")], [user("Say hi"), answer('{"reply": "no"}')]
    expected = [pair([user("Say hi")], "Hi!", '{"reply": "no"}')]
    cell = lambda v: '"' + json.dumps(v).replace('"', '""') + '"'  # noqa: E731
    csv_path = write(tmp_path, "p.csv", f"chosen,rejected\n{cell(chosen)},{cell(rejected)}\n")
    assert check_file(csv_path).rows == expected
    # a reply that is JSON text stays text
    text_reply = write(tmp_path, "t.csv", 'prompt,chosen,rejected\nSay hi,Hi!,"{""reply"": ""no""}"\n')
    assert check_file(text_reply).rows == expected
    parquet_path = tmp_path / "p.parquet"
    pq.write_table(pa.table({"chosen": [chosen], "rejected": [rejected]}), parquet_path)
    assert check_file(parquet_path).rows == expected


WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}
TOOL_PAIR = {"system": "Be brief.",
             "messages": [user("Weather in Oslo?"),
                          {"role": "assistant", "content": "", "tool_calls": [
                              {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Oslo"}}}]},
                          {"role": "tool", "content": '{"temp_c": 4}', "name": "get_weather"}],
             "chosen": "4 °C in Oslo.", "rejected": "Sunny and 30 °C.", "tools": [WEATHER]}


def test_stored_pairs_keep_the_prompts_tools_and_tool_turns(tmp_path):
    assert check_file(write(tmp_path, "p.jsonl", jsonl(TOOL_PAIR))).rows == [TOOL_PAIR]


def test_a_pair_the_template_cannot_write_is_left_out(tmp_path, tokenizer):
    # the embedded model's template writes no tools or tool calls: left out rather than trained on without them
    report = check_file(write(tmp_path, "p.jsonl", jsonl(TOOL_PAIR, CHAT_PAIR)), tokenizer=tokenizer, cutoff=256)
    assert report.kept == 1 and report.rows == [pair([user("Say hi")], "Hi!", "Go away.")]
    assert {(f.code, f.row, f.outcome) for f in report.findings} == {("template_cannot", 1, "dropped")}


# --- detection: chosen/rejected columns always make preference data -----------------------------------------------
DETECTION = [
    # (columns, sample rows, expected fields (the others None), kind, usable)
    (["prompt", "chosen", "rejected"], [], dict(prompt="prompt", chosen="chosen", rejected="rejected"), "pair", True),
    (["Prompt", "Chosen", "Rejected"], [], dict(prompt="Prompt", chosen="Chosen", rejected="Rejected"), "pair", True),
    (["chosen", "rejected"], [], dict(chosen="chosen", rejected="rejected"), "pair", True),
    (["messages", "chosen", "rejected"], [], dict(prompt="messages", chosen="chosen", rejected="rejected"), "pair", True),
    (["conversations", "chosen", "rejected", "system"], [], dict(prompt="conversations", chosen="chosen", rejected="rejected"), "pair", True),
    (["instruction", "input", "chosen", "rejected"], [], dict(prompt="instruction", input="input", chosen="chosen", rejected="rejected"), "pair", True),
    (["question", "response_j", "response_k"], [], dict(prompt="question", chosen="response_j", rejected="response_k"), "pair", True),
    (["prompt", "chosen_response", "rejected_response"], [], dict(prompt="prompt", chosen="chosen_response", rejected="rejected_response"), "pair", True),
    (["prompt", "chosen"], [], dict(prompt="prompt", chosen="chosen"), "pair", False),  # never read as supervised data
    (["instruction", "completions"], [], dict(prompt="instruction", responses="completions"), "rated", True),
    (["prompt", "responses", "scores"], [], dict(prompt="prompt", responses="responses", scores="scores"), "rated", True),
    (["prompt", "responses", "ratings"], [{"prompt": "q", "responses": ["a", "b"], "ratings": [1, 2]}],
     dict(prompt="prompt", responses="responses", scores="ratings"), "rated", True),
    (["prompt", "completions"], [{"prompt": "q", "completions": [{"text": "a", "rating": 3}]}],
     dict(prompt="prompt", responses="completions"), "rated", True),
    (["prompt", "completion", "label"], [], dict(prompt="prompt", completion="completion", label="label"), "unpaired", True),
    (["instruction", "output", "kto_tag"], [{"instruction": "q", "output": "a", "kto_tag": False}],
     dict(prompt="instruction", completion="output", label="kto_tag"), "unpaired", True),
    (["messages", "completion", "label"], [{"messages": [], "completion": "a", "label": "1"}],
     dict(prompt="messages", completion="completion", label="label"), "unpaired", True),
    # supervised files stay supervised: a category "label", responses without ratings
    (["instruction", "output", "label"], [{"instruction": "q", "output": "a", "label": "sports"}],
     dict(instruction="instruction", output="output"), "alpaca", True),
    (["instruction", "output", "label"], [{"instruction": "Sentiment of 'great!'", "output": "positive", "label": 1}],
     dict(instruction="instruction", output="output"), "alpaca", True),
    (["prompt", "completion", "label"], [{"prompt": "q", "completion": "a", "label": "sports"}],
     dict(instruction="prompt", output="completion"), "renamed", True),
    (["prompt", "answers"], [{"prompt": "q", "answers": ["a", "b"]}], dict(), "none", False),
]


@pytest.mark.parametrize("columns,sample,fields,kind,usable", DETECTION, ids=[",".join(d[0]) for d in DETECTION])
def test_mapping_detection(columns, sample, fields, kind, usable):
    mapping = detect_mapping(columns, sample)
    assert mapping == ColumnMapping(**fields)
    assert (mapping.kind, mapping.usable, mapping.preference) == (kind, usable, kind in ("pair", "rated", "unpaired"))


def test_a_preference_file_missing_a_side_is_not_usable_and_says_why(tmp_path):
    report = check_file(write(tmp_path, "p.jsonl", jsonl({"prompt": "q", "chosen": "a"})))
    assert report.exit_code == 1 and report.fatal.code == "no_usable_column"
    assert "no column holds the rejected replies" in report.fatal.message
    assert "not read as supervised data" in report.fatal.advice and report.rows == []


def test_a_user_mapping_reads_any_columns_as_pairs(tmp_path):
    path = write(tmp_path, "m.jsonl", jsonl({"q": "Say hi", "good": "Hi!", "bad": "No."}))
    mapping = ColumnMapping.parse("prompt=q,chosen=good,rejected=bad")
    assert mapping == ColumnMapping(prompt="q", chosen="good", rejected="bad")
    assert check_file(path, mapping=mapping).rows == [pair([user("Say hi")], "Hi!", "No.")]
    assert ColumnMapping.from_dict(mapping.to_dict()) == mapping


# --- every bad row is named by row and field -----------------------------------------------------------------------
TEXT_PAIR = {"prompt": "Say hi", "chosen": "Hi!", "rejected": "Go away."}
CHAT_PAIR = {"messages": [user("Say hi")], "chosen": "Hi!", "rejected": "Go away."}
WHOLE = {"chosen": [user("Say hi"), answer("Hi!")], "rejected": [user("Say hi"), answer("Go away.")]}
BINARIZED = {"prompt": "Say hi"} | WHOLE
HH = {"chosen": "\n\nHuman: Say hi\n\nAssistant: Hi!", "rejected": "\n\nHuman: Say hi\n\nAssistant: Go away."}
RATED = {"prompt": "Say hi", "responses": ["Hi!", "Go away.", "Hello!"], "scores": [5, 1, 4]}
RATED_IN = {"prompt": "Say hi", "completions": [{"text": "Hi!", "score": 5}, {"text": "Go away.", "score": 1}]}
KTO = {"prompt": "Say hi", "completion": "Hi!", "label": True}
CALL = {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": {"name": "f", "arguments": {}}}]}

BAD_ROWS = [
    # (id, good first row, bad second row, code, field, outcome, text the "fix" policy keeps or None)
    ("identical sides", TEXT_PAIR, TEXT_PAIR | {"rejected": "Hi!"}, "same_answers", "rejected", "dropped", None),
    ("identical but for spaces", TEXT_PAIR, TEXT_PAIR | {"rejected": " Hi! \n"}, "same_answers", "rejected", "dropped", None),
    ("empty chosen", TEXT_PAIR, TEXT_PAIR | {"chosen": ""}, "empty_field", "chosen", "dropped", None),
    ("blank rejected", TEXT_PAIR, TEXT_PAIR | {"rejected": "  \n"}, "empty_field", "rejected", "dropped", None),
    ("missing rejected", TEXT_PAIR, {"prompt": "q", "chosen": "a"}, "missing_field", "rejected", "dropped", None),
    ("null chosen", TEXT_PAIR, TEXT_PAIR | {"chosen": None}, "wrong_type", "chosen", "dropped", None),
    ("number chosen", TEXT_PAIR, TEXT_PAIR | {"chosen": 42}, "wrong_type", "chosen", "dropped", "42"),
    ("empty prompt", TEXT_PAIR, TEXT_PAIR | {"prompt": ""}, "empty_field", "prompt", "dropped", None),
    ("missing prompt", TEXT_PAIR, {"chosen": "a", "rejected": "b"}, "missing_field", "prompt", "dropped", None),
    ("side ends with the user", TEXT_PAIR, TEXT_PAIR | {"chosen": [answer("Hi!"), user("and?")]}, "bad_side", "chosen", "dropped", None),
    ("side is a tool call", TEXT_PAIR, TEXT_PAIR | {"chosen": [CALL]}, "bad_side", "chosen", "dropped", None),
    ("side with an unknown role", TEXT_PAIR, TEXT_PAIR | {"rejected": [{"role": "robot", "content": "x"}]}, "bad_message", "rejected[0]", "dropped", None),
    ("prompt ends with an answer", CHAT_PAIR, CHAT_PAIR | {"messages": [user("q"), answer("a")]}, "bad_prompt", "messages", "dropped", None),
    ("empty prompt list", CHAT_PAIR, CHAT_PAIR | {"messages": [{"role": "system", "content": "s"}]}, "bad_prompt", "messages", "dropped", None),
    ("prompt message content a number", CHAT_PAIR, CHAT_PAIR | {"messages": [user(5)]}, "wrong_type", "messages[0].content", "dropped", "5"),
    ("conversations differ before the reply", WHOLE, {"chosen": [user("Say hi"), answer("Hi!")], "rejected": [user("Say bye"), answer("Bye.")]},
     "prompt_mismatch", "rejected", "dropped", None),
    ("conversations differ in length", WHOLE, {"chosen": [user("Say hi"), answer("Hi!")],
                                               "rejected": [user("Say hi"), answer("Hi!"), user("Again"), answer("No.")]},
     "prompt_mismatch", "rejected", "dropped", None),
    ("conversations differ in system prompt", WHOLE, {"chosen": [{"role": "system", "content": "Be kind."}] + WHOLE["chosen"],
                                                      "rejected": WHOLE["rejected"]}, "prompt_mismatch", "rejected", "dropped", None),
    ("conversation is not the prompt column", BINARIZED, BINARIZED | {"prompt": "Say bye"}, "prompt_mismatch", "chosen", "dropped", None),
    ("reply alone with no prompt anywhere", WHOLE, {"chosen": "Hi!", "rejected": [user("Say hi"), answer("Go away.")]},
     "bad_prompt", "chosen", "dropped", None),
    ("transcripts differ before the reply", HH, HH | {"rejected": "\n\nHuman: Say bye\n\nAssistant: Bye."}, "prompt_mismatch", "rejected", "dropped", None),
    ("duplicate pair", TEXT_PAIR, TEXT_PAIR, "duplicate", None, "dropped", None),
    ("rating not a number", RATED, RATED | {"scores": [5, "N/A", 1]}, "bad_rating", "scores[1]", "skipped", None),
    ("rating a true/false value", RATED, RATED | {"scores": [True, 1, 3]}, "bad_rating", "scores[0]", "skipped", None),
    ("ratings do not match responses", RATED, RATED | {"scores": [5, 1]}, "bad_rating", "scores", "dropped", None),
    ("all rated the same", RATED, RATED | {"scores": [3, 3, 3]}, "tied_ratings", "scores", "dropped", None),
    ("one rated response", RATED, RATED | {"responses": ["Hi!"], "scores": [3]}, "too_few_responses", "responses", "dropped", None),
    ("empty response skipped", RATED, RATED | {"responses": ["Hi!", "", "Hello!"]}, "empty_field", "responses[1]", "skipped", None),
    ("response without a rating", RATED_IN, RATED_IN | {"completions": [{"text": "a"}, {"text": "b", "score": 1}, {"text": "c", "score": 2}]},
     "missing_field", "completions[0]", "skipped", None),
    ("label not a boolean", KTO, KTO | {"label": "yes"}, "bad_label", "label", "dropped", None),
    ("label a number other than 0/1", KTO, KTO | {"label": 2}, "bad_label", "label", "dropped", None),
    ("missing label", KTO, {"prompt": "q", "completion": "a"}, "missing_field", "label", "dropped", None),
    ("empty completion", KTO, KTO | {"completion": ""}, "empty_field", "completion", "dropped", None),
]


@pytest.mark.parametrize("case", BAD_ROWS, ids=[c[0] for c in BAD_ROWS])
def test_bad_row_is_named_by_row_and_field(tmp_path, case):
    _, good, bad, code, field, outcome, fixed = case
    path = write(tmp_path, "p.jsonl", jsonl(good, bad))
    report = check_file(path)
    found = [f for f in report.findings if f.code == code]
    assert len(found) == 1, report.summary_lines()
    f = found[0]
    assert (f.row, f.line, f.field, f.outcome) == (2, 2, field, outcome)
    assert f.advice and "p.jsonl line 2" in str(f) and (field is None or f"field '{field}'" in str(f))
    assert report.usable and report.rows[0] == check_file(write(tmp_path, "g.jsonl", jsonl(good))).rows[0]
    assert report.kept == (2 if outcome == "skipped" else 1)
    if fixed is not None:
        repaired = check_file(path, policy="fix")
        assert repaired.kept == 2 and repaired.fixed == 1
        assert fixed in json.dumps(repaired.rows[1])


def test_duplicates_are_judged_on_the_whole_pair(tmp_path):
    other_rejected = TEXT_PAIR | {"rejected": "Leave me alone."}
    other_prompt = TEXT_PAIR | {"prompt": "Say hello"}
    report = check_file(write(tmp_path, "p.jsonl", jsonl(TEXT_PAIR, other_rejected, other_prompt, TEXT_PAIR)))
    assert report.kept == 3 and [(f.code, f.row) for f in report.findings] == [("duplicate", 4)]
    assert "the whole pair" in report.findings[0].message


def test_a_placeholder_is_warned_about_in_the_chosen_reply_only(tmp_path):
    row = TEXT_PAIR | {"chosen": "Hi {{name}}!", "rejected": "Bye {{name}}."}
    report = check_file(write(tmp_path, "p.jsonl", jsonl(row)))
    assert [(f.code, f.field, f.outcome) for f in report.findings] == [("placeholder", "chosen", "kept")]


# --- the rules ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("ratings,expected", [
    ([5, 1], (0, 1)),
    ([1, 4, 4], (1, 0)),  # the first of the equally top-rated
    ([2, 9, 9, 2], (1, 0)),  # the first of the equally lowest-rated too
    ([3.0, 3.5, 2.5, 3.0], (1, 2)),
    ([3, 3, 3], None),
    ([7.5], None),
])
def test_pick_pair(ratings, expected):
    assert pick_pair(ratings) == expected


@pytest.mark.parametrize("value,expected", [
    (True, True), (False, False), (1, True), (0, False), (1.0, True), ("true", True), (" False ", False), ("1", True),
    ("0", False), ("yes", None), (2, None), (None, None), ("", None), ([True], None),
])
def test_parse_label(value, expected):
    assert parse_label(value) is expected


@pytest.mark.parametrize("value,expected", [
    (4, 4.0), (7.5, 7.5), ("8", 8.0), (" 2.5 ", 2.5), ("N/A", None), (None, None), (True, None), (float("nan"), None), ([1], None),
])
def test_parse_rating(value, expected):
    assert parse_rating(value) == expected


@pytest.mark.parametrize("text,expected", [
    ("\n\nHuman: hi\n\nAssistant: hello", [user("hi"), answer("hello")]),
    ("Human: a\n\nAssistant: b\n\nHuman: c\n\nAssistant: d", [user("a"), answer("b"), user("c"), answer("d")]),
    ("\n\nHuman: a\n\nAssistant:", [user("a"), answer("")]),
    ("Just an answer.", None),
    ("Assistant: no question", None),
])
def test_transcript_messages(text, expected):
    assert transcript_messages(text) == expected


# --- templated lengths: a pair is its prompt with the longer reply ----------------------------------------------------
def side_lengths(tokenizer, row: dict) -> list[tuple[int, int]]:
    """(total tokens, where the reply starts) of each side, rendered one at a time."""
    out = []
    for _, side in side_rows(row):
        spans = template.render_spans(tokenizer, side)
        ids = template.span_token_ids(tokenizer, spans)
        reply = [i for i, s in enumerate(spans) if s.learn]
        assert len(reply) == 1  # answers inside the prompt are read, not learned
        out.append((sum(map(len, ids)), sum(map(len, ids[:reply[0]]))))
    return out


@pytest.mark.parametrize("name", ["trl_pairs.jsonl", "whole_conversations.jsonl", "sharegpt_pairs.jsonl", "kto.jsonl"])
def test_pairs_are_counted_as_the_prompt_with_the_longer_reply(tokenizer, name):
    report = check_file(DATA / name, tokenizer=tokenizer, cutoff=1024)
    assert len(report.lengths) == report.kept == len(report.rows) and report.truncated == 0
    for row, length, start, ends in zip(report.rows, report.lengths, report.answer_starts, report.answer_ends):
        longest = max(side_lengths(tokenizer, row))
        assert (length, start, list(ends)) == (longest[0], longest[1], [longest[0]])
    assert any("per pair (its prompt with the longer reply)" in line or "per rated answer" in line for line in report.summary_lines())


def test_too_long_pairs_are_named_by_the_longer_side(tokenizer, tmp_path):
    long_rejected = TEXT_PAIR | {"rejected": "no " * 200}
    long_prompt = TEXT_PAIR | {"prompt": "word " * 200, "chosen": "Hello there, my friend!"}
    path = write(tmp_path, "p.jsonl", jsonl(TEXT_PAIR, long_rejected, long_prompt))
    report = check_file(path, tokenizer=tokenizer, cutoff=64)
    found = [(f.code, f.row, f.field, f.outcome) for f in report.findings]
    assert found == [("too_long", 2, "rejected", "truncated"), ("no_learnable", 3, "chosen", "skipped")]
    assert report.truncated == 2 and report.nothing_left == 1 and report.kept == 3
    assert "with the rejected reply" in report.findings[0].message


# --- storing and the CLI --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name,examples,unit", [("trl_pairs.jsonl", "pair", "pair"), ("rated_lists.jsonl", "pair", "pair"),
                                                ("kto.jsonl", "unpaired", "rated answer")])
def test_saved_preference_datasets_say_their_kind(workspace, name, examples, unit):
    report = check_file(DATA / name)
    entry = data_store.save_dataset(workspace, report, DATA / name)
    meta = data_store.dataset_meta(entry.path)
    assert meta["examples"] == examples and entry.unit == unit and meta["rows"] == report.kept
    assert check_file(entry.path).rows == report.rows


CLI_COUNTS = [
    # (file, kept, records, dropped, examples word)
    ("trl_pairs.jsonl", 2, 3, 1, "pair"),
    ("sharegpt_pairs.jsonl", 2, 2, 0, "pair"),
    ("hh_rlhf.jsonl", 2, 2, 0, "pair"),
    ("ultrafeedback_raw.jsonl", 2, 3, 1, "pair"),
    ("kto.csv", 4, 4, 0, "rated answer"),
]


@pytest.mark.parametrize("name,kept,records,dropped,word", CLI_COUNTS, ids=[c[0] for c in CLI_COUNTS])
def test_cli_counts_each_shape_honestly(capsys, name, kept, records, dropped, word):
    import launch

    assert launch.main(["data", "check", str(DATA / name), "--json", "--cutoff", "0"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert (report["kept"], report["records"], report["dropped"], report["examples"]) == (kept, records, dropped, word)
    assert report["verdict"].startswith(f"Usable: {kept} {word}s kept")


def test_cli_length_check_of_pairs(capsys, embedded_model_dir):
    import launch

    code = launch.main(["data", "check", str(DATA / "whole_conversations.jsonl"), "--cutoff", "60", "--model", str(embedded_model_dir)])
    out = capsys.readouterr().out
    assert code == 0 and "Usable: 1 pair kept" in out and "1 of 1 pair (100.0%) are longer than the cutoff of 60" in out
    assert "per pair (its prompt with the longer reply)" in out


def test_cli_reads_the_issues_file_as_pairs_not_conversations():
    done = subprocess.run([sys.executable, str(ROOT / "launch.py"), "data", "check", str(DATA / "messages_pairs.jsonl"), "--cutoff", "0"],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "Usable: 1 pair kept" in done.stdout and "preference pairs: prompt ← 'messages'" in done.stdout
    assert "Conversations:" not in done.stdout and "Traceback" not in done.stdout + done.stderr
