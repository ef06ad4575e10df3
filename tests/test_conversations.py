"""Conversations (issue #15): every reader gives whole conversations, every checking message names the row and the
turn, the masks learn exactly the assistant's tokens under several template families, truncation keeps whole turns,
and `data check` counts honestly. The sample files in tests/data/conversations are written by the project in the
shapes public datasets use (ShareGPT, glaive/LLaMA-Factory tools, OpenAI/Hugging Face messages)."""
from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import pytest

from app.data.conversation import from_row
from app.data.dataset import ColumnMapping, check_file
from app.data.template import (
    IGNORE_INDEX,
    SpanRenderer,
    Encoded,
    TemplateSupport,
    chat_prompt,
    encode,
    render,
    render_spans,
    span_token_ids,
    template_support,
    tokenize,
)

DATA = Path(__file__).resolve().parent / "data" / "conversations"


# --- the stored form, written out ----------------------------------------------------------------------------------
def user(text: str) -> dict:
    return {"role": "user", "content": text}


def answer(text: str, *calls: dict) -> dict:
    message = {"role": "assistant", "content": text}
    return message | {"tool_calls": list(calls)} if calls else message


def call(name: str, arguments: dict, id: str = "") -> dict:
    c = {"type": "function", "function": {"name": name, "arguments": arguments}}
    return {"id": id} | c if id else c


def result(name: str, text: str, call_id: str = "") -> dict:
    return {"role": "tool", "content": text, "name": name} | ({"tool_call_id": call_id} if call_id else {})


def stored(*messages: dict, system: str = "", tools: list | None = None) -> dict:
    return ({"system": system} if system else {}) | {"messages": list(messages)} | ({"tools": tools} if tools else {})


def schema(function: dict) -> dict:
    return {"type": "function", "function": function}


CITY = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
WEATHER = {"name": "get_weather", "description": "Current weather for a city", "parameters": CITY}
CURRENCY = {"name": "convert_currency", "description": "Convert an amount between two currencies",
            "parameters": {"type": "object", "properties": {"amount": {"type": "number"}, "from": {"type": "string"},
                                                            "to": {"type": "string"}}, "required": ["amount", "from", "to"]}}
CLOCK = {"name": "get_time", "description": "Local time in a city", "parameters": CITY}
EUR_NOK = {"amount": 20, "from": "EUR", "to": "NOK"}

TUTOR = stored(user("What is 7 times 8?"), answer("7 times 8 is 56."), user("And 56 divided by 4?"),
               answer("56 divided by 4 is 14."), system="You are a patient maths tutor.")
EGGS = stored(user("How do I boil an egg?"), answer("Into the pot with it, sailor: ten minutes in boiling water."),
              user("And a soft one?"), answer("Six minutes, then straight into cold water!"),
              system="Reply like a ship's captain.")
SPELL = stored(user("Spell 'necessary'."), answer("N-E-C-E-S-S-A-R-Y."))
COLOURS = stored(user("Give me a colour."), answer("Teal."), user("Another one?"), answer("Ochre."))

# (file, column, records read, expected stored rows in file order)
READERS = [
    ("sharegpt.jsonl", "conversations", 4, [  # line 4 repeats line 1: left out
        TUTOR,
        stored(user("What is 7 times 8?"), answer("56. A way to remember it: 5, 6, 7, 8 gives 56 = 7 x 8.")),
        stored(user("Name a river in Africa."), answer("The Nile."), user("How long is it?"), answer("About 6,650 km."),
               user("Which sea does it flow into?"), answer("The Mediterranean Sea.")),
    ]),
    ("sharegpt_tools.jsonl", "conversations", 2, [
        stored(user("What's the weather in Oslo right now?"), answer("", call("get_weather", {"city": "Oslo"})),
               result("get_weather", '{"temp_c": 4, "sky": "cloudy"}'), answer("It is 4 °C and cloudy in Oslo."),
               system="You can look up the weather.", tools=[schema(WEATHER)]),
        stored(user("Hi! Can you help me with money questions?"), answer("Yes: I can convert amounts between currencies."),
               user("How much is 20 EUR in NOK?"), answer("", call("convert_currency", EUR_NOK)),
               result("convert_currency", '{"amount": 232.4}'), answer("20 EUR is about 232 NOK."),
               system="You help with travel money.", tools=[schema(CURRENCY), schema(WEATHER)]),
    ]),
    ("messages.jsonl", "messages", 3, [EGGS, SPELL, COLOURS]),
    ("messages_parts.jsonl", "messages", 2, [  # several text parts of one message are joined by a line break
        stored(user("Why is the sky blue?"), answer("Air scatters blue light more than red light."),
               system="Answer in one sentence."),
        stored(user("Translate to French:\ngood morning"), answer("Bonjour."), user("And good night?"), answer("Bonne nuit.")),
    ]),
    ("openai_tools.jsonl", "messages", 2, [
        stored(user("Is it raining in Bergen?"), answer("", call("get_weather", {"city": "Bergen"}, "call_1")),
               result("get_weather", '{"temp_c": 9, "sky": "rain"}', "call_1"), answer("Yes, it is raining in Bergen (9 °C)."),
               system="You are a travel assistant.", tools=[schema(WEATHER)]),
        stored(user("Convert 20 EUR to NOK and tell me the time in Oslo."),
               answer("Let me check both.", call("convert_currency", EUR_NOK, "call_a"), call("get_time", {"city": "Oslo"}, "call_b")),
               result("convert_currency", '{"amount": 232.4}', "call_a"), result("get_time", "14:05", "call_b"),
               answer("20 EUR is about 232 NOK, and it is 14:05 in Oslo."),
               tools=[schema(CURRENCY), schema(CLOCK)]),
    ]),
    ("messages_json.csv", "messages", 2, [  # JSON text in a CSV cell, the system prompt in its own column
        stored(user("What does CPU stand for?"), answer("Central processing unit."), system="Be brief."),
        stored(user("Say hello, then, in Spanish."), answer("Hello, then: hola."), user("And in German?"), answer("Hallo.")),
    ]),
]


def jsonl(*rows: dict) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


# --- readers --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name,column,records,expected", READERS, ids=[r[0] for r in READERS])
def test_each_file_reads_as_whole_conversations(name, column, records, expected):
    report = check_file(DATA / name)
    assert report.mapping == ColumnMapping(conversations=column)
    assert (report.records, report.kept, report.dropped) == (records, len(expected), records - len(expected))
    assert report.rows == expected, report.summary_lines()
    assert report.usable and report.exit_code == 0
    assert [f.code for f in report.findings] == (["duplicate"] if records > len(expected) else [])


@pytest.mark.parametrize("name,column,records,expected", READERS, ids=[r[0] for r in READERS])
def test_stored_rows_round_trip(name, column, records, expected):
    for row in check_file(DATA / name).rows:
        assert from_row(row).to_row() == row
        assert json.loads(json.dumps(row, ensure_ascii=False)) == row  # what train.jsonl holds reads back the same


def test_parquet_with_messages_as_json_text_or_as_nested_lists(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    csv_rows = next(r[3] for r in READERS if r[0] == "messages_json.csv")
    text_path = tmp_path / "text.parquet"
    pq.write_table(pa.table({
        "messages": [json.dumps(r["messages"]) for r in csv_rows],
        "system": [r.get("system", "") for r in csv_rows],
    }), text_path)
    assert check_file(text_path).rows == csv_rows
    # Hub datasets store messages as a list of structs: each message gets every field, absent ones null.
    native = [[{"role": "system", "content": EGGS["system"]}] + EGGS["messages"], SPELL["messages"]]
    native_path = tmp_path / "native.parquet"
    pq.write_table(pa.table({"messages": native}), native_path)
    report = check_file(native_path)
    assert (report.records, report.kept) == (2, 2)
    assert report.rows == [EGGS, SPELL]


def test_tool_results_are_matched_to_their_calls_by_id(tmp_path):
    """OpenAI files name a result's call by tool_call_id, and parallel results may come in any order."""
    calls = [{"id": "call_a", "type": "function", "function": {"name": "convert_currency", "arguments": json.dumps(EUR_NOK)}},
             {"id": "call_b", "type": "function", "function": {"name": "get_time", "arguments": '{"city": "Oslo"}'}}]
    row = {"messages": [user("Convert 20 EUR to NOK and tell me the time in Oslo."),
                        {"role": "assistant", "content": None, "tool_calls": calls},
                        {"role": "tool", "tool_call_id": "call_b", "content": "14:05"},
                        {"role": "tool", "tool_call_id": "call_a", "content": '{"amount": 232.4}'},
                        answer("It is 14:05 in Oslo, and 20 EUR is about 232 NOK.")]}
    report = check_file(write(tmp_path, "t.jsonl", jsonl(row)))
    assert report.kept == 1, report.summary_lines()
    tool_turns = [m for m in report.rows[0]["messages"] if m["role"] == "tool"]
    assert [(m["name"], m["content"]) for m in tool_turns] == [("get_time", "14:05"), ("convert_currency", '{"amount": 232.4}')]


def sharegpt(*turns: tuple[str, str], **extra) -> dict:
    """A ShareGPT record: (from, value) turns, and row keys such as system and tools."""
    return {"conversations": [{"from": f, "value": v} for f, v in turns]} | extra


def chat(*messages, **extra) -> dict:
    """A messages record as the file holds it."""
    return {"messages": list(messages)} | extra


def text_part(text: str) -> dict:
    return {"type": "text", "text": text}


# (id, rows, lines reported as duplicates): duplicates are judged on whole conversations
DUPLICATES = [
    ("same first question, different conversations", [sharegpt(("human", "Hi"), ("gpt", "Hello!")),
                                                       sharegpt(("human", "Hi"), ("gpt", "Hey."))], []),
    ("same opening, one conversation goes on", [sharegpt(("human", "Hi"), ("gpt", "Hello!")),
                                                 sharegpt(("human", "Hi"), ("gpt", "Hello!"), ("human", "Bye"), ("gpt", "Bye!"))], []),
    ("identical conversations", [sharegpt(("human", "Hi"), ("gpt", "Hello!")), sharegpt(("human", "Q"), ("gpt", "A")),
                                 sharegpt(("human", "Hi"), ("gpt", "Hello!"))], [3]),
    ("same turns, another system prompt", [chat(user("Hi"), answer("Hello!")),
                                           chat({"role": "system", "content": "Be formal."}, user("Hi"), answer("Hello!"))], []),
    ("same turns, other tools offered", [chat(user("Hi"), answer("Hello!"), tools=[schema(WEATHER)]),
                                         chat(user("Hi"), answer("Hello!"), tools=[schema(CLOCK)])], []),
    ("text parts and plain text say the same", [chat(user("Hi"), answer("Hello!")),
                                                chat({"role": "user", "content": [text_part("Hi")]}, answer("Hello!"))], [2]),
    ("row system key and system turn say the same", [sharegpt(("human", "Hi"), ("gpt", "Hello!"), system="Be kind."),
                                                      sharegpt(("system", "Be kind."), ("human", "Hi"), ("gpt", "Hello!"))], [2]),
]


@pytest.mark.parametrize("rows,duplicates", [c[1:] for c in DUPLICATES], ids=[c[0] for c in DUPLICATES])
def test_duplicates_are_whole_conversations(tmp_path, rows, duplicates):
    report = check_file(write(tmp_path, "d.jsonl", jsonl(*rows)))
    found = [f for f in report.findings if f.code == "duplicate"]
    assert [f.row for f in found] == duplicates, report.summary_lines()
    assert all(f.outcome == "dropped" and "conversation" in f.message for f in found)
    assert (report.records, report.kept, report.dropped) == (len(rows), len(rows) - len(duplicates), len(duplicates))


# --- checking messages ----------------------------------------------------------------------------------------------
def bad_call(arguments: str, name: str | None = "get_weather") -> dict:
    function = ({"name": name} if name is not None else {}) | {"arguments": arguments}
    return {"role": "assistant", "content": None, "tool_calls": [{"id": "c1", "type": "function", "function": function}]}


WEATHER_RESULT = {"role": "tool", "tool_call_id": "c1", "content": '{"temp_c": 4}'}
ASK, SAID = user("Weather in Oslo?"), answer("It is 4 °C.")
GOOD_MSG = chat(user("Say hi"), answer("Hi!"))
GOOD_SG = sharegpt(("human", "Say hi"), ("gpt", "Hi!"))
IMAGE = {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}
AUDIO = {"type": "input_audio", "input_audio": {"data": "UklGRiQAAABXQVZF", "format": "wav"}}

# (id, the bad conversation (line 2, after a good one of the same shape), code, field, a word the message must hold)
BAD_CONVERSATIONS = [
    ("empty user turn", chat(user(""), answer("Hi!")), "empty_field", "messages[0].content", "empty"),
    ("blank ShareGPT answer", sharegpt(("human", "Say hi"), ("gpt", "  \n")), "empty_field", "conversations[1].value", "empty"),
    ("unknown role", chat(user("Hi"), {"role": "robot", "content": "beep"}, answer("Hi!")), "bad_message", "messages[1]", "robot"),
    ("unknown ShareGPT sender", sharegpt(("human", "Hi"), ("bing", "Hello"), ("gpt", "Hi!")), "bad_message", "conversations[1]", "bing"),
    ("message without a role", chat(user("Hi"), {"content": "who am I?"}, answer("Hi!")), "bad_message", "messages[1]", "role"),
    ("message not an object", chat(user("Hi"), "hello", answer("Hi!")), "bad_message", "messages[1]", "object"),
    ("tool result before any call", chat(ASK, {"role": "tool", "content": "4"}, SAID), "tool_without_call", "messages[1]", "tool"),
    ("observation before any function_call", sharegpt(("human", "Weather?"), ("observation", "4"), ("gpt", "4 °C")),
     "tool_without_call", "conversations[1]", "tool"),
    ("tool-call arguments not JSON", chat(ASK, bad_call("{city: Oslo"), WEATHER_RESULT, SAID),
     "bad_tool_call", "messages[1].tool_calls[0]", "JSON"),
    ("function_call arguments not JSON", sharegpt(("human", "Weather?"), ("function_call", '{"name": "get_weather", "arguments": "{city: Oslo"}'),
                                            ("observation", "4"), ("gpt", "4 °C")), "bad_tool_call", "conversations[1].value", "JSON"),
    ("function_call not JSON at all", sharegpt(("human", "Weather?"), ("function_call", "get_weather(city='Oslo')"),
                                         ("observation", "4"), ("gpt", "4 °C")), "bad_tool_call", "conversations[1].value", "JSON"),
    ("tool call without a name", chat(ASK, bad_call('{"city": "Oslo"}', name=None), WEATHER_RESULT, SAID),
     "bad_tool_call", "messages[1].tool_calls[0]", "name"),
    ("function_call without a name", sharegpt(("human", "Weather?"), ("function_call", '{"arguments": {"city": "Oslo"}}'),
                                        ("observation", "4"), ("gpt", "4 °C")), "bad_tool_call", "conversations[1].value", "name"),
    ("tools a word", sharegpt(("human", "Hi"), ("gpt", "Hello!"), tools="get_weather"), "bad_tools", "tools", "tools"),
    ("tools a number", chat(user("Hi"), answer("Hello!"), tools=5), "bad_tools", "tools", "tools"),
    ("tools a list of names", chat(user("Hi"), answer("Hello!"), tools=["get_weather"]), "bad_tools", "tools", "tools"),
    ("tools broken JSON text", sharegpt(("human", "Hi"), ("gpt", "Hello!"), tools='[{"name": "get_weather"'), "bad_tools", "tools", "tools"),
    ("no assistant turn", chat(user("Hi"), user("Anyone?")), "no_assistant", "messages", "assistant"),
    ("ShareGPT without a gpt turn", sharegpt(("system", "Be kind."), ("human", "Hi")), "no_assistant", "conversations", "assistant"),
    ("system message in the middle", chat({"role": "system", "content": "A"}, user("Hi"), {"role": "system", "content": "B"}, answer("Hi!")),
     "misplaced_system", "messages[2]", "system"),
    ("two system messages", chat({"role": "system", "content": "A"}, {"role": "system", "content": "B"}, user("Hi"), answer("Hi!")),
     "misplaced_system", "messages[1]", "system"),
    ("system turn beside a row system key", sharegpt(("system", "B"), ("human", "Hi"), ("gpt", "Hi!"), system="A"),
     "misplaced_system", "conversations[0]", "system"),
    ("image part", chat({"role": "user", "content": [text_part("What is in this picture?"), IMAGE]}, answer("A cat.")),
     "unsupported_part", "messages[0].content[1]", "image_url"),
    ("audio part", chat({"role": "user", "content": [AUDIO]}, answer("Someone says hello.")),
     "unsupported_part", "messages[0].content[0]", "input_audio"),
    ("answer a number", chat(user("2+2?"), answer(4)), "wrong_type", "messages[1].content", "number"),
]


@pytest.mark.parametrize("bad,code,field,word", [c[1:] for c in BAD_CONVERSATIONS], ids=[c[0] for c in BAD_CONVERSATIONS])
def test_bad_conversation_is_named_by_row_and_turn_and_dropped(tmp_path, bad, code, field, word):
    good = GOOD_SG if "conversations" in bad else GOOD_MSG
    report = check_file(write(tmp_path, "c.jsonl", jsonl(good, bad)))
    # One finding for the one problem (none that only follow from it), on line 2, naming the turn.
    assert [(f.code, f.field) for f in report.findings if f.row == 2] == [(code, field)], report.summary_lines()
    f = next(f for f in report.findings if f.row == 2)
    assert (f.severity, f.outcome, f.line) == ("error", "dropped", 2)
    assert word in f.message and f.advice
    assert f"c.jsonl line 2, field '{field}'" in str(f)
    # The whole conversation is left out; the good one is kept.
    assert (report.records, report.kept, report.dropped) == (2, 1, 1)
    assert report.rows == [stored(user("Say hi"), answer("Hi!"))]
    assert report.usable and report.exit_code == 0


# --- templates ------------------------------------------------------------------------------------------------------
# Llama-3's header format (written here, the same layout as Meta's template).
LLAMA3_TEMPLATE = (
    "{{- '<|begin_of_text|>' -}}"
    "{%- for message in messages -%}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|start_header_id|>assistant<|end_header_id|>\n\n' -}}{%- endif -%}"
)
LLAMA3_TOKENS = ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]

# A Hermes/Qwen-style ChatML template with tools (written here): the schemas in the system block, calls as
# <tool_call>{json}</tool_call>, and consecutive tool results grouped in one user turn as <tool_response> blocks.
HERMES_TEMPLATE = """
{%- if tools %}
{{- '<|im_start|>system\n' }}
{%- if messages[0].role == 'system' %}{{- messages[0].content + '\n\n' }}{%- endif %}
{{- '# Tools\n\nYou may call one or more functions to assist with the user query.\n\n<tools>' }}
{%- for tool in tools %}{{- '\n' + (tool | tojson) }}{%- endfor %}
{{- '\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags.<|im_end|>\n' }}
{%- elif messages[0].role == 'system' %}
{{- '<|im_start|>system\n' + messages[0].content + '<|im_end|>\n' }}
{%- endif %}
{%- for message in messages %}
{%- if message.role == 'user' or (message.role == 'assistant' and not message.tool_calls) %}
{{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>\n' }}
{%- elif message.role == 'assistant' %}
{{- '<|im_start|>assistant' }}
{%- if message.content %}{{- '\n' + message.content }}{%- endif %}
{%- for tool_call in message.tool_calls %}
{%- set tc = tool_call.function if tool_call.function is defined else tool_call %}
{{- '\n<tool_call>\n{"name": "' + tc.name + '", "arguments": ' + (tc.arguments | tojson) + '}\n</tool_call>' }}
{%- endfor %}
{{- '<|im_end|>\n' }}
{%- elif message.role == 'tool' %}
{%- if loop.first or messages[loop.index0 - 1].role != 'tool' %}{{- '<|im_start|>user' }}{%- endif %}
{{- '\n<tool_response>\n' + message.content + '\n</tool_response>' }}
{%- if loop.last or messages[loop.index0 + 1].role != 'tool' %}{{- '<|im_end|>\n' }}{%- endif %}
{%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}
"""
HERMES_TOKENS = ["<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>"]

FAMILIES = ("chatml", "llama3", "hermes", "plain")
END_OF_TURN = {"chatml": "<|im_end|>", "llama3": "<|eot_id|>", "hermes": "<|im_end|>", "plain": "<|im_end|>"}


@pytest.fixture(scope="module")
def tokenizers(embedded_model_dir) -> dict:
    """SmolLM2's tokenizer with its own ChatML template, and copies with other templates (their special tokens added,
    as the real models have them) and with none (the plain format)."""
    from transformers import AutoTokenizer

    smol = AutoTokenizer.from_pretrained(embedded_model_dir)
    out = {"chatml": smol}
    for family, chat_template, special in (("llama3", LLAMA3_TEMPLATE, LLAMA3_TOKENS), ("hermes", HERMES_TEMPLATE, HERMES_TOKENS),
                                           ("plain", None, [])):
        tok = copy.deepcopy(smol)
        tok.chat_template = chat_template
        if special:
            tok.add_tokens(special, special_tokens=True)
        out[family] = tok
    return out


def decode(tok, ids: list[int]) -> str:
    return tok.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


def written_call(c: dict) -> str:
    return json.dumps({"name": c["function"]["name"], "arguments": c["function"]["arguments"]}, ensure_ascii=False)


def expected_answer(family: str, message: dict) -> str:
    """What an assistant turn's learned tokens say: its content (and tool calls, as the family writes them) and the
    end-of-turn marker."""
    calls = message.get("tool_calls") or []
    if family == "hermes" and calls:
        blocks = "\n".join(f"<tool_call>\n{written_call(c)}\n</tool_call>" for c in calls)
        return (message["content"] + "\n" if message["content"] else "") + blocks + END_OF_TURN[family]
    if family == "plain":
        return message["content"] + "".join(f"<tool_call>{written_call(c)}</tool_call>" for c in calls) + END_OF_TURN[family]
    return message["content"] + END_OF_TURN[family]


def labelled_runs(tok, enc: Encoded) -> list[str]:
    """The learned tokens, decoded run by run (each run one assistant turn)."""
    runs, run = [], []
    for token, label in zip(enc.input_ids, enc.labels):
        if label != IGNORE_INDEX:
            run.append(label)
        elif run:
            runs.append(run)
            run = []
    return [decode(tok, r) for r in runs + ([run] if run else [])]


def same_answer(learned: str, expected: str) -> bool:
    # A template's line break after the end-of-turn marker may be learned with it; nothing else may.
    return learned.startswith(expected) and not learned[len(expected):].strip()


THREE_ANSWERS = stored(user("Name a planet."), answer("Mars."), user("A bigger one?"), answer("Jupiter, the largest."),
                       user("And the farthest?"), answer("Neptune is the farthest planet from the Sun."),
                       system="You are an astronomy guide.")
NO_SYSTEM = stored(user("Say yes."), answer("Yes."), user("Say no."), answer("No."))
WITH_TOOLS = stored(user("What's the weather in Oslo?"), answer("", call("get_weather", {"city": "Oslo"})),
                    result("get_weather", '{"temp_c": 4}'), answer("It is 4 °C in Oslo."),
                    user("Thanks!"), answer("You're welcome."),
                    system="You can look up the weather.", tools=[schema(WEATHER)])
PARALLEL = stored(user("Convert 20 EUR to NOK and tell me the time in Oslo."),
                  answer("Let me check both.", call("convert_currency", EUR_NOK), call("get_time", {"city": "Oslo"})),
                  result("convert_currency", '{"amount": 232.4}'), result("get_time", "14:05"),
                  answer("20 EUR is about 232 NOK, and it is 14:05 in Oslo."), tools=[schema(CURRENCY), schema(CLOCK)])

# (family, conversation): templates without tool support only get conversations without tools
MASK_CASES = [
    ("chatml", "three answers", THREE_ANSWERS), ("chatml", "no system prompt", NO_SYSTEM),
    ("llama3", "three answers", THREE_ANSWERS), ("llama3", "no system prompt", NO_SYSTEM),
    ("hermes", "three answers", THREE_ANSWERS), ("hermes", "tool call", WITH_TOOLS), ("hermes", "parallel calls", PARALLEL),
    ("plain", "three answers", THREE_ANSWERS), ("plain", "tool call", WITH_TOOLS), ("plain", "parallel calls", PARALLEL),
]
MASK_IDS = [f"{family}-{name}" for family, name, _ in MASK_CASES]


def full_text(tok, row: dict) -> str | None:
    """The whole conversation as the template writes it in one call (None for the plain format)."""
    if not tok.chat_template:
        return None
    return tok.apply_chat_template(from_row(row).messages(), tools=row.get("tools"), tokenize=False)


@pytest.mark.parametrize("family,name,row", MASK_CASES, ids=MASK_IDS)
def test_masks_learn_exactly_the_assistant_turns(tokenizers, family, name, row):
    tok = tokenizers[family]
    spans = render_spans(tok, row)
    span_ids = span_token_ids(tok, spans)
    text = "".join(s.text for s in spans)
    if full_text(tok, row) is not None:
        assert text == full_text(tok, row)
    enc = encode(spans, span_ids, 10_000)
    # Everything up to the last answer is kept (what follows it, a turn gap, teaches nothing).
    last_answer = max(i for i, s in enumerate(spans) if s.learn)
    assert decode(tok, enc.input_ids) == "".join(s.text for s in spans[: last_answer + 1])
    assert not "".join(s.text for s in spans[last_answer + 1:]).strip()
    answers = [m for m in row["messages"] if m["role"] == "assistant"]
    learned = labelled_runs(tok, enc)
    assert len(learned) == len(answers), learned
    for got, message in zip(learned, answers):
        assert same_answer(got, expected_answer(family, message)), (got, expected_answer(family, message))
    # Token by token: a token is learned exactly when it belongs to an answer span, and is learned as itself.
    owner = [span for span, ids in zip(spans, span_ids) for _ in ids][: len(enc.labels)]
    assert [label != IGNORE_INDEX for label in enc.labels] == [s.learn for s in owner]
    assert all(label in (IGNORE_INDEX, token) for label, token in zip(enc.labels, enc.input_ids))
    assert {s.role for s in spans if s.learn} == {"assistant"}
    # Nothing the system, the user or a tool wrote is learned, and all of it is read.
    read = decode(tok, [t for t, label in zip(enc.input_ids, enc.labels) if label == IGNORE_INDEX])
    for m in row["messages"]:
        if m["role"] != "assistant":
            assert m["content"] in read
    if row.get("system"):
        assert row["system"] in read
    assert (enc.turns, enc.turns_cut) == (len(answers), 0)


@pytest.mark.parametrize("family,name,row", MASK_CASES, ids=MASK_IDS)
def test_last_turn_only_and_train_on_prompt(tokenizers, family, name, row):
    tok = tokenizers[family]
    spans = render_spans(tok, row)
    span_ids = span_token_ids(tok, spans)
    last = [m for m in row["messages"] if m["role"] == "assistant"][-1]
    only_last = encode(spans, span_ids, 10_000, last_turn_only=True)
    learned = labelled_runs(tok, only_last)
    assert len(learned) == 1 and same_answer(learned[0], expected_answer(family, last)), learned
    assert only_last.input_ids == encode(spans, span_ids, 10_000).input_ids  # the history is still read
    everything = encode(spans, span_ids, 10_000, train_on_prompt=True)
    assert everything.labels == everything.input_ids == [t for ids in span_ids for t in ids]


# Llama-3's own pre-tokenizer keeps "\n\n" whole wherever it stands; SmolLM2's splits it before a word, so that
# template on this tokenizer would test the pairing, not the code: it is left out here.
INFERENCE_CASES = [c for c in MASK_CASES if c[0] != "llama3"]


@pytest.mark.parametrize("family,name,row", INFERENCE_CASES, ids=[f"{f}-{n}" for f, n, _ in INFERENCE_CASES])
def test_training_reads_what_inference_reads(tokenizers, family, name, row):
    """Before each answer, the tokens trained on are the tokens of the generation prompt for that point tokenized
    whole, as a chat front end sends it: the history is read in training exactly as in use."""
    tok = tokenizers[family]
    spans = render_spans(tok, row)
    span_ids = span_token_ids(tok, spans)
    messages = from_row(row).messages()
    asked = [j for j, m in enumerate(messages) if m["role"] == "assistant"]
    answers = [k for k, s in enumerate(spans) if s.learn]
    assert len(answers) == len(asked)
    for k, j in zip(answers, asked):
        prompt = "".join(s.text for s in spans[:k])
        if tok.chat_template:
            assert prompt == tok.apply_chat_template(messages[:j], tools=row.get("tools"), add_generation_prompt=True,
                                                     tokenize=False)
        elif not row.get("tools"):
            history = from_row(row).turns[: j - (len(messages) - len(from_row(row).turns))]
            pairs = [(u.content, a.content) for u, a in zip(history[::2], history[1::2])] + [(history[-1].content, None)]
            assert prompt == chat_prompt(tok, pairs, row.get("system"), conversations=True)
        assert [t for ids in span_ids[:k] for t in ids] == tok(prompt, add_special_tokens=False)["input_ids"]


def test_dataset_system_prompt_is_read_not_learned(tokenizers):
    tok = tokenizers["chatml"]
    spans = render_spans(tok, NO_SYSTEM, system="Answer in capitals.")
    assert spans[0].text.startswith("<|im_start|>system\nAnswer in capitals.<|im_end|>")
    assert not any("Answer in capitals." in s.text for s in spans if s.learn)
    own = render_spans(tok, THREE_ANSWERS, system="Answer in capitals.")  # a conversation's own prompt comes first
    assert "You are an astronomy guide." in own[0].text and not any("capitals" in s.text for s in own)


@pytest.mark.parametrize("family,support", [
    ("chatml", TemplateSupport(False, False, True)),  # SmolLM2's template writes a tool turn's content only
    ("llama3", TemplateSupport(False, False, True)),
    ("hermes", TemplateSupport(True, True, True)),
    ("plain", TemplateSupport(True, True, True)),  # the plain format writes all three as JSON
])
def test_template_support(tokenizers, family, support):
    assert template_support(tokenizers[family]) == support


ALPACA_ROWS = [
    {"instruction": "Name a colour.", "input": "", "output": "Teal."},
    {"instruction": "Translate to French.", "input": "good morning", "output": "Bonjour, as one says in the morning."},
]


@pytest.mark.parametrize("family", ["chatml", "llama3", "plain"])
@pytest.mark.parametrize("row", ALPACA_ROWS, ids=["no input", "with input"])
@pytest.mark.parametrize("cut", ["none", "in the answer", "in the prompt"])
@pytest.mark.parametrize("train_on_prompt", [False, True], ids=["answer", "all"])
def test_alpaca_rows_tokenize_as_before(tokenizers, family, row, cut, train_on_prompt):
    """An Alpaca row is the one-turn conversation: the same ids and labels as the prompt/response split gave."""
    tok = tokenizers[family]
    r = render(tok, row)
    prompt = tok(r.prompt, add_special_tokens=False)["input_ids"]
    response = tok(r.response, add_special_tokens=False)["input_ids"]
    cutoff = {"none": 10_000, "in the answer": len(prompt) + 2, "in the prompt": len(prompt) - 3}[cut]
    expected_ids = (prompt + response)[:cutoff]
    expected_labels = ((list(prompt) if train_on_prompt else [IGNORE_INDEX] * len(prompt)) + response)[:cutoff]
    got = tokenize(tok, row, cutoff, train_on_prompt)
    assert (got["input_ids"], got["labels"]) == (expected_ids, expected_labels)


# --- truncation by turns --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def three_answers(tokenizers):
    """THREE_ANSWERS on SmolLM2: spans, their tokens, all ids, and each answer's token range."""
    tok = tokenizers["chatml"]
    spans = render_spans(tok, THREE_ANSWERS)
    span_ids = span_token_ids(tok, spans)
    ranges, at = [], 0
    for span, ids in zip(spans, span_ids):
        if span.learn:
            ranges.append((at, at + len(ids)))
        at += len(ids)
    assert len(ranges) == 3
    return spans, span_ids, [t for ids in span_ids for t in ids], ranges


def templated_tokens(tok, row: dict) -> int:
    return sum(len(ids) for ids in span_token_ids(tok, render_spans(tok, row)))


def learned_ranges(enc: Encoded) -> list[tuple[int, int]]:
    out, start = [], None
    for i, label in enumerate(enc.labels + [IGNORE_INDEX]):
        if label != IGNORE_INDEX and start is None:
            start = i
        elif label == IGNORE_INDEX and start is not None:
            out.append((start, i))
            start = None
    return out


# (id, cutoff from the answers' (start, stop) token ranges, answers kept whole, whether the first is cut inside)
TRUNCATION = [
    ("at the end of answer 3", lambda a: a[2][1], 3, False),
    ("just below the end of answer 3", lambda a: a[2][1] - 1, 2, False),
    ("at the end of answer 2", lambda a: a[1][1], 2, False),
    ("just below the end of answer 2", lambda a: a[1][1] - 1, 1, False),
    ("inside the user turn after answer 1", lambda a: a[0][1] + 3, 1, False),
    ("at the end of answer 1", lambda a: a[0][1], 1, False),
    ("just below the end of answer 1", lambda a: a[0][1] - 1, 0, True),
    ("two tokens into answer 1", lambda a: a[0][0] + 2, 0, True),
]


@pytest.mark.parametrize("cutoff_at,whole,first_cut", [c[1:] for c in TRUNCATION], ids=[c[0] for c in TRUNCATION])
def test_truncation_keeps_whole_turns(three_answers, cutoff_at, whole, first_cut):
    spans, span_ids, ids, answers = three_answers
    cutoff = cutoff_at(answers)
    enc = encode(spans, span_ids, cutoff)
    end = cutoff if first_cut else answers[whole - 1][1]  # a cut conversation ends with the last whole answer
    assert enc.input_ids == ids[:end]
    assert learned_ranges(enc) == ([(answers[0][0], cutoff)] if first_cut else answers[:whole])
    assert (enc.turns, enc.turns_cut) == (3, 3 - whole)
    # "only the last turn" learns the conversation's last answer or nothing: never an earlier one the cutoff left last
    last = encode(spans, span_ids, cutoff, last_turn_only=True)
    assert last.input_ids == enc.input_ids and learned_ranges(last) == (answers[2:] if whole == 3 else [])


def test_prompt_longer_than_the_cutoff_leaves_nothing_to_learn(three_answers):
    spans, span_ids, ids, answers = three_answers
    cutoff = answers[0][0] - 1
    enc = encode(spans, span_ids, cutoff)
    assert enc.input_ids == ids[:cutoff]
    assert set(enc.labels) == {IGNORE_INDEX}
    assert (enc.turns, enc.turns_cut) == (3, 3)


def test_check_counts_turns_cut_and_reports_conversations_with_nothing_to_learn(tmp_path, tokenizers, three_answers):
    """With a tokenizer, the check counts each conversation's templated tokens, says which are cut and how many turns
    they lose, and reports a conversation the cutoff leaves nothing to learn in (training skips it)."""
    tok = tokenizers["chatml"]
    _, _, ids, answers = three_answers
    cutoff = answers[1][1]  # THREE_ANSWERS loses its last turn
    long_prompt = stored(user("Tell me about this text: " + "words " * cutoff), answer("It repeats one word."))
    short = stored(user("Hi"), answer("Hello!"), system="Be brief.")
    path = write(tmp_path, "cut.jsonl", jsonl(short, THREE_ANSWERS, long_prompt))
    report = check_file(path, tokenizer=tok, cutoff=cutoff)
    assert (report.records, report.dropped) == (3, 0), report.summary_lines()
    assert list(report.lengths) == [templated_tokens(tok, row) for row in report.rows]
    assert report.lengths[1] == len(ids)
    assert report.lengths[0] < cutoff
    assert (report.turns, report.turns_cut) == (1 + 3 + 1, 1 + 1)  # the long prompt's only answer is lost too
    cut = [f for f in report.findings if f.code == "too_long"]
    assert [(f.row, f.field, f.outcome) for f in cut] == [(2, "messages", "truncated")]
    assert "turn" in cut[0].message and cut[0].advice
    nothing = [f for f in report.findings if f.code == "no_learnable"]
    assert [(f.row, f.field) for f in nothing] == [(3, "messages")] and nothing[0].advice
    # Left out of training, said so: either the check drops it, or it is kept and counted as skipped.
    assert nothing[0].outcome in ("dropped", "skipped")
    if nothing[0].outcome == "skipped":
        assert report.nothing_left == 1 and any("skipped" in line for line in report.summary_lines())
        assert set(tokenize(tok, long_prompt, cutoff)["labels"]) == {IGNORE_INDEX}
    else:
        assert long_prompt not in report.rows


AWKWARD = ["  padded with spaces  ", "{{ name }} and {% raw %}braces{% endraw %}", "two\n\nparagraphs\n", "x"]


@pytest.mark.parametrize("family", FAMILIES)
def test_span_renderer_gives_render_spans_spans(tokenizers, family):
    """The check's fast renderer (one probe rendering per conversation shape) must give exactly render_spans' spans,
    awkward texts included."""
    tok = tokenizers[family]
    renderer = SpanRenderer(tok)
    rows = [THREE_ANSWERS, NO_SYSTEM, SPELL, EGGS, COLOURS]
    for text in AWKWARD:  # the shapes above again, with texts a template may trim, escape or split
        rows += [stored(user(text), answer(text), user("ok"), answer(text), system=text),
                 stored(user("q"), answer(text)), stored(user(text), answer("a"), user(text), answer("b"))]
    for row in rows:
        assert renderer.spans(row) == render_spans(tok, row), row


# --- the CLI --------------------------------------------------------------------------------------------------------
def data_check(capsys, path: Path, *options: str) -> tuple[int, str]:
    import launch

    code = launch.main(["data", "check", str(path), *options])
    return code, capsys.readouterr().out


def test_cli_sharegpt_counts(capsys, embedded_model_dir, tokenizers):
    path = DATA / "sharegpt.jsonl"
    code, out = data_check(capsys, path, "--model", str(embedded_model_dir))
    assert code == 0
    assert re.search(r"\b3 (rows|conversations) kept, 1 left out\b", out), out
    assert "4 records read" in out and "line 4" in out and "repeats line 1" in out
    code, out = data_check(capsys, path, "--json", "--model", str(embedded_model_dir))
    report = json.loads(out)
    assert (code, report["records"], report["kept"], report["dropped"], report["counts"]) == (0, 4, 3, 1, {"duplicate": 1})
    tok = tokenizers["chatml"]
    expected = [templated_tokens(tok, row) for row in READERS[0][3]]
    assert (report["tokens"]["rows"], report["tokens"]["total"], report["tokens"]["longest"]) == (3, sum(expected), max(expected))


def test_cli_typed_parts(capsys, embedded_model_dir):
    code, out = data_check(capsys, DATA / "messages_parts.jsonl", "--json", "--model", str(embedded_model_dir))
    report = json.loads(out)
    assert (code, report["records"], report["kept"], report["dropped"], report["counts"]) == (0, 2, 2, 0, {})


TOOL_FILES = ["openai_tools.jsonl", "sharegpt_tools.jsonl"]


@pytest.mark.parametrize("name", TOOL_FILES)
def test_cli_tool_calls_on_a_template_without_tools(capsys, embedded_model_dir, name):
    """SmolLM2's template cannot write tools or tool calls: every tool conversation is named and left out, and the
    file is not called usable for them. Without a model to check against (--cutoff 0), all are kept."""
    code, out = data_check(capsys, DATA / name, "--json", "--model", str(embedded_model_dir))
    report = json.loads(out)
    assert (code, report["records"], report["kept"], report["dropped"], report["usable"]) == (1, 2, 0, 2, False), out
    cannot = [f for f in report["findings"] if f["code"] == "template_cannot"]
    # each part the template cannot write is named at its own turn (the tools offered, then each call)
    assert sorted({f["row"] for f in cannot}) == [1, 2]
    assert all(f["outcome"] == "dropped" and f["severity"] == "error" and f["advice"] and "tool" in f["message"] for f in cannot)
    code, out = data_check(capsys, DATA / name, "--json", "--cutoff", "0")
    report = json.loads(out)
    assert (code, report["kept"], report["dropped"], report["counts"]) == (0, 2, 0, {})


def test_cli_mixed_file_keeps_what_the_template_can_write(capsys, tmp_path, embedded_model_dir):
    rows = [json.loads(line) for line in (DATA / "openai_tools.jsonl").read_text(encoding="utf-8").splitlines()]
    path = write(tmp_path, "mixed.jsonl", jsonl(GOOD_MSG, rows[0], chat(user("Bye"), answer("Goodbye!"))))
    code, out = data_check(capsys, path, "--model", str(embedded_model_dir))
    assert code == 0
    assert re.search(r"\b2 (rows|conversations) kept, 1 left out\b", out), out
    assert re.search(r"ERROR +mixed\.jsonl line 2\b.*\[dropped\]", out), out


def without_tools(row: dict) -> dict:
    return {k: v for k, v in row.items() if k != "tools"}


# (file, keep the rows' tools?, the call turn of each row, as the file names it)
CALL_TURNS = [
    ("openai_tools.jsonl", True, ["messages[2]", "messages[1]"]),
    ("openai_tools.jsonl", False, ["messages[2]", "messages[1]"]),
    ("sharegpt_tools.jsonl", True, ["conversations[1]", "conversations[3]"]),
    ("sharegpt_tools.jsonl", False, ["conversations[1]", "conversations[3]"]),
]


@pytest.mark.parametrize("name,tools,call_turns", CALL_TURNS,
                         ids=[f"{n}-{'with' if t else 'without'} tools" for n, t, _ in CALL_TURNS])
def test_template_cannot_names_the_call_turn(tmp_path, tokenizers, name, tools, call_turns):
    """The check says per row and turn what the template cannot write: the tool-call turn, as the file numbers its
    messages (a system message included), so the user can find it."""
    rows = [json.loads(line) for line in (DATA / name).read_text(encoding="utf-8").splitlines()]
    path = write(tmp_path, name, jsonl(*(rows if tools else map(without_tools, rows))))
    report = check_file(path, tokenizer=tokenizers["chatml"], cutoff=256)
    cannot = [f for f in report.findings if f.code == "template_cannot"]
    for row, turn in enumerate(call_turns, start=1):
        assert any(f.row == row and (f.field or "").startswith(turn) for f in cannot), (row, turn, [str(f) for f in cannot])


# --- shapes public files have that are easy to get wrong (found in review) ------------------------------------------
def test_a_conversation_opening_with_the_assistant_learns_only_its_answers(tokenizers):
    tok = tokenizers["chatml"]
    row = {"messages": [answer("Hello, how can I help?"), user("hi"), answer("Hi there.")]}
    learned = [s.text for s in render_spans(tok, row) if s.learn]
    assert learned == ["Hello, how can I help?<|im_end|>\n", "Hi there.<|im_end|>\n"]


@pytest.mark.parametrize("system", [{"role": "system", "content": ""}, {"from": "system", "value": ""},
                                    {"role": "system", "content": None}])
def test_an_empty_system_message_is_no_system_prompt(tmp_path, system):
    key = "conversations" if "from" in system else "messages"
    turns = [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}] if key == "conversations" else [user("q"), answer("a")]
    report = check_file(write(tmp_path, "s.jsonl", jsonl({key: [system, *turns]})))
    assert report.kept == 1 and report.findings == [] and "system" not in report.rows[0]


def test_the_developer_role_is_the_system_prompt(tmp_path):
    report = check_file(write(tmp_path, "d.jsonl", jsonl({"messages": [{"role": "developer", "content": "Be brief."},
                                                                       user("q"), answer("a")]})))
    assert report.rows == [stored(user("q"), answer("a"), system="Be brief.")]


def test_weight_zero_turns_are_history_not_learned(tmp_path, tokenizers):
    history = answer("An answer we do not want to teach.") | {"weight": 0}
    report = check_file(write(tmp_path, "w.jsonl", jsonl({"messages": [user("q1"), history, user("q2"), answer("Good.")]})))
    (row,) = report.rows
    assert row["messages"][1]["weight"] == 0 and from_row(row).to_row() == row
    for tok in tokenizers.values():
        learned = [s.text for s in render_spans(tok, row) if s.learn]
        assert len(learned) == 1 and learned[0].startswith("Good.")


@pytest.mark.parametrize("arguments", ['"hello"', '"{\\"a\\": 1}"', "[1, 2]", "3"])
def test_tool_call_arguments_must_be_an_object(tmp_path, arguments):
    bad = {"role": "assistant", "content": None, "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "f", "arguments": arguments}}]}
    report = check_file(write(tmp_path, "t.jsonl", jsonl({"messages": [user("q"), bad, {"role": "tool", "tool_call_id": "c1",
                                                                                       "content": "x"}, answer("a")]})))
    assert [(f.code, f.field) for f in report.findings if f.row] == [("bad_tool_call", "messages[1].tool_calls[0]")]
    assert report.kept == 0 and report.dropped == 1


def test_a_stored_conversation_reads_back_the_same(tmp_path):
    """What a dataset stores is what training reads again: the check is a fixed point on its own output."""
    first = check_file(DATA / "openai_tools.jsonl")
    again = check_file(write(tmp_path, "stored.jsonl", "".join(json.dumps(r) + "\n" for r in first.rows)))
    assert again.rows == first.rows and again.findings == []


def test_a_file_whose_every_answer_starts_beyond_the_cutoff_is_not_usable(tmp_path, tokenizers):
    """Every conversation kept but none with an answer token inside the cutoff: the verdict says not usable."""
    long_question = user("Tell me everything about tides. " * 40)
    path = write(tmp_path, "long.jsonl", jsonl(chat(long_question, answer("Tides rise and fall."))))
    report = check_file(path, tokenizer=tokenizers["chatml"], cutoff=64)
    assert (report.kept, report.nothing_left, report.usable, report.exit_code) == (1, 1, False, 1)
    assert "training would learn nothing" in report.verdict()
