"""The exact text a model is trained on: a row through the model's chat template, cut into spans that say which
turn each piece of text belongs to and whether it is learned (an assistant's answer) or only read."""
from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache

from app.data.conversation import Conversation, from_row, is_conversation_row, user_message

IGNORE_INDEX = -100  # label value that the loss skips

# For models without a chat template (base models). Documented in the Data tab.
ALPACA_PROMPT = (
    "Below is an instruction that describes a task{with_input}. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n{input_block}### Response:\n"
)
# Conversations for models without a chat template: one block per turn, the answer followed by the end-of-text
# token. Tools offered and tool calls are written as JSON. Documented in the Data tab.
PLAIN_HEADERS = {"system": "### System:\n", "user": "### User:\n", "assistant": "### Assistant:\n"}
PLAIN_TOOLS = "### Tools:\n"
PLAIN_TOOL_RESULT = "### Tool result{name}:\n"
PLAIN_CALL = "<tool_call>{call}</tool_call>"
TURN_GAP = "\n\n"

__all__ = ["ALPACA_PROMPT", "IGNORE_INDEX", "Encoded", "Rendered", "Span", "TemplateError", "TemplateSupport",
           "chat_prompt", "encode", "render", "render_spans", "template_support", "tokenize", "user_message"]


class TemplateError(ValueError):
    """A conversation the chat template cannot render turn by turn, in words for the Data tab."""

    def __init__(self, message: str, advice: str = "") -> None:
        super().__init__(message)
        self.advice = advice or ("choose a model whose chat template writes it (e.g. one with tool support), or "
                                 "remove that part from the file; the conversation is left out")


@dataclass(frozen=True)
class Rendered:
    prompt: str  # masked out of the loss unless train_on_prompt
    response: str  # what the model learns to write, end-of-turn marker included


@dataclass(frozen=True)
class Span:
    text: str
    role: str  # "system" | "user" | "assistant" | "tool"
    turn: int | None  # index into the conversation's turns; None for the system prompt and tools
    learn: bool  # an assistant's answer (with its end-of-turn marker): what the loss is taken on


def render(tokenizer, row: dict, system: str | None = None) -> Rendered:
    """Prompt and response text for one {instruction, input, output} row."""
    output = str(row.get("output") or "")
    if getattr(tokenizer, "chat_template", None):
        messages = ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": user_message(row)}
        ]
        prompt = _apply(tokenizer, messages, None, True)
        full = _apply(tokenizer, messages + [{"role": "assistant", "content": output}], None, False)
        if full.startswith(prompt):
            return Rendered(prompt, full[len(prompt):])
        # Templates that rewrite earlier turns (rare): fall back to the generation prompt plus the raw answer.
        return Rendered(prompt, output + (tokenizer.eos_token or ""))
    extra = str(row.get("input") or "").strip()
    prompt = ALPACA_PROMPT.format(
        with_input=", paired with an input that provides further context" if extra else "",
        instruction=str(row.get("instruction") or "").strip(),
        input_block=f"### Input:\n{extra}\n\n" if extra else "",
    )
    return Rendered((f"{system.strip()}\n\n" if system else "") + prompt, output + (tokenizer.eos_token or ""))


def render_spans(tokenizer, row: dict, system: str = "") -> list[Span]:
    """The row's text as the model reads it, in spans. An Alpaca row gives its prompt and its response; a conversation
    is rendered prefix by prefix with the model's chat template (its own system prompt, else `system`), so each turn's
    text is exactly what the template adds for it; raises TemplateError where that cannot be told apart."""
    if not is_conversation_row(row):
        r = render(tokenizer, row, system or None)
        return [Span(r.prompt, "user", 0, False), Span(r.response, "assistant", 1, True)]
    conversation = from_row(row)
    if not getattr(tokenizer, "chat_template", None):
        return _plain_spans(tokenizer, conversation, system)
    _check_support(template_support(tokenizer), conversation)
    return _template_spans(tokenizer, conversation, system)


def _check_support(support: "TemplateSupport", conversation: Conversation) -> None:
    """Refuse what the template would silently leave out of the text (say a tool call on a template without tools)."""
    if conversation.tools and not support.tools:
        raise TemplateError("the model's chat template does not write the tools offered ('tools'): the model would "
                            "learn to call tools it was never shown")
    for i, turn in enumerate(conversation.turns):
        if turn.tool_calls and not support.tool_calls:
            raise TemplateError(f"turn {i + 1} is an assistant's tool call ({turn.tool_calls[0].name}), which the model's "
                                f"chat template does not write: the call would vanish from the text")
        if turn.role == "tool" and not support.tool_results:
            raise TemplateError(f"turn {i + 1} is a tool result, which the model's chat template does not write")


def _apply(tokenizer, messages: list[dict], tools, generation: bool) -> str:
    if not messages:
        return ""
    try:
        return tokenizer.apply_chat_template(messages, tools=tools, add_generation_prompt=generation, tokenize=False)
    except Exception as e:  # noqa: BLE001 - a template raises whatever its author wrote (jinja's TemplateError mostly)
        raise TemplateError(f"the model's chat template refuses this conversation ({type(e).__name__}: {e})") from None


def _template_spans(tokenizer, conversation: Conversation, system: str) -> list[Span]:
    messages = conversation.messages(system)
    tools = list(conversation.tools) or None
    first_turn = len(messages) - len(conversation.turns)  # 1 when a system message leads

    def turn_of(i: int) -> int | None:
        return i - first_turn if i >= first_turn else None

    spans: list[Span] = []
    before = ""  # the text so far, at a point every longer prefix starts with
    i = 0
    while i < len(messages):
        if messages[i]["role"] == "assistant":
            turn = turn_of(i)
            after = _apply(tokenizer, messages[: i + 1], tools, False)
            head = _apply(tokenizer, messages[:i], tools, True) if i else _opening_head(after, messages[0])
            learn = conversation.turns[turn].learn
            if not (head.startswith(before) and after.startswith(head)):
                raise TemplateError(f"the chat template's prompt for the assistant's turn {turn} is not the start of "
                                    f"that turn, so the answer's tokens cannot be told apart",
                                    "choose a model whose template renders conversations turn by turn, or learn only "
                                    "the last turn of shorter conversations; the conversation is left out")
            spans += [Span(head[len(before):], "assistant", turn, False), Span(after[len(head):], "assistant", turn, learn)]
            before, i = after, i + 1
            continue
        # A run of messages that are not the assistant's (a user turn; parallel tool results): one span each where
        # every prefix is the start of the next, else one span for the run (templates such as Qwen's close a run of
        # tool results only after its last one).
        j = next((k for k in range(i, len(messages)) if messages[k]["role"] == "assistant"), len(messages))
        pieces, prev = [], before
        for k in range(i, j):
            try:
                after = _apply(tokenizer, messages[: k + 1], tools, False)
            except TemplateError:  # some templates refuse a conversation that stops there (tools in the first user turn)
                pieces = None
                break
            if not after.startswith(prev):
                pieces = None
                break
            pieces.append(Span(after[len(prev):], messages[k]["role"], turn_of(k), False))
            prev = after
        if pieces is None:
            prev = _apply(tokenizer, messages[:j], tools, False)
            if not prev.startswith(before):
                raise TemplateError(f"the chat template writes the conversation before turn {turn_of(i)} differently "
                                    f"once more turns follow, so the turns' tokens cannot be told apart")
            roles = {m["role"] for m in messages[i:j]}
            pieces = [Span(prev[len(before):], roles.pop() if len(roles) == 1 else "user", turn_of(i), False)]
        spans += pieces
        before, i = prev, j
    return [s for s in spans if s.text]


def _opening_head(rendered: str, message: dict) -> str:
    """The template's text before the answer of a conversation that opens with the assistant (a greeting): there is
    no earlier turn to ask the template for its assistant prompt, so the answer's text is found in the rendering."""
    content = str(message.get("content") or "")
    at = rendered.rfind(content) if content else -1
    if at < 0:
        raise TemplateError("the conversation opens with an assistant turn whose text cannot be found in the chat "
                            "template's rendering, so its tokens cannot be told apart",
                            "start the conversation with the user's turn (or a system prompt); the conversation is left out")
    return rendered[:at]


def _plain_spans(tokenizer, conversation: Conversation, system: str) -> list[Span]:
    """The documented plain format. Each block after the first starts with the blank line that separates it from
    the one before, so that no span ends in whitespace: spans tokenized apart then give the whole text's tokens."""
    eos = tokenizer.eos_token or ""
    spans: list[Span] = []

    def gap() -> str:
        return TURN_GAP if spans else ""

    if conversation.system or system:
        spans.append(Span(PLAIN_HEADERS["system"] + (conversation.system or system), "system", None, False))
    if conversation.tools:
        spans.append(Span(gap() + PLAIN_TOOLS + json.dumps(list(conversation.tools), ensure_ascii=False), "system", None, False))
    for i, turn in enumerate(conversation.turns):
        if turn.role == "assistant":
            calls = "".join(PLAIN_CALL.format(call=json.dumps({"name": c.name, "arguments": c.arguments}, ensure_ascii=False))
                            for c in turn.tool_calls)
            spans.append(Span(gap() + PLAIN_HEADERS["assistant"], "assistant", i, False))
            spans.append(Span(turn.content + calls + eos, "assistant", i, turn.learn))
        elif turn.role == "tool":
            header = PLAIN_TOOL_RESULT.format(name=f" ({turn.name})" if turn.name else "")
            spans.append(Span(gap() + header + turn.content, "tool", i, False))
        else:
            spans.append(Span(gap() + PLAIN_HEADERS["user"] + turn.content, "user", i, False))
    return spans


class SpanRenderer:
    """render_spans for many rows, ~50x faster for conversations without tools: the spans of each conversation shape
    (system prompt or not, then the roles in order) are rendered once with probe texts, and each conversation of that
    shape fills in its own texts. A shape is filled only where that gives exactly render_spans' spans, checked on
    awkward texts (spaces a template may trim, braces, newlines) and on the shape's first real row."""

    def __init__(self, tokenizer, system: str = "") -> None:
        self.tokenizer, self.system = tokenizer, system
        self.shapes: dict[tuple, list[tuple[Span, int | None]] | None] = {}

    def spans(self, row: dict) -> list[Span]:
        if not (is_conversation_row(row) and getattr(self.tokenizer, "chat_template", None)):
            return render_spans(self.tokenizer, row, self.system)
        conversation = from_row(row)
        if conversation.uses_tools:
            return render_spans(self.tokenizer, row, self.system)
        system = conversation.system or self.system
        texts = ([system] if system else []) + [t.content for t in conversation.turns]
        shape = (bool(system), tuple(t.role for t in conversation.turns), tuple(t.learn for t in conversation.turns))
        if shape not in self.shapes:
            spans = render_spans(self.tokenizer, row, self.system)
            self.shapes[shape] = self._probe(shape, texts, spans)
            return spans
        parts = self.shapes[shape]
        if parts is None:
            return render_spans(self.tokenizer, row, self.system)
        return [Span(span.text if k is None else span.text.replace(_probe(k), texts[k]), span.role, span.turn, span.learn)
                for span, k in parts]

    def _probe(self, shape: tuple, texts: list[str], real: list[Span]) -> list[tuple[Span, int | None]] | None:
        has_system, roles, learns = shape
        n = len(texts)
        try:
            probed = render_spans(self.tokenizer, _row(has_system, roles, learns, [_probe(k) for k in range(n)]))
        except TemplateError:
            return None
        parts = []
        for span in probed:
            found = [k for k in range(n) if _probe(k) in span.text]
            if len(found) > 1 or any(span.text.count(_probe(k)) > 1 for k in found):
                return None  # a text written twice, or two in one span: fill only what is simple
            parts.append((span, found[0] if found else None))
        if len({k for _, k in parts if k is not None}) != n:
            return None  # a text the template does not write as it is
        awkward = [f"  {{{{ x }}}} {k}\n\n with 'quotes' <b>  " for k in range(n)]
        for sample, spans in ((awkward, None), (texts, real)):
            try:
                expected = spans or render_spans(self.tokenizer, _row(has_system, roles, learns, sample))
            except TemplateError:
                return None
            filled = [Span(s.text if k is None else s.text.replace(_probe(k), sample[k]), s.role, s.turn, s.learn) for s, k in parts]
            if filled != expected:
                return None
        return parts


def _probe(k: int) -> str:
    return f"\ue000{k}\ue001"  # private-use characters: no real text holds them


def _row(has_system: bool, roles: tuple[str, ...], learns: tuple[bool, ...], texts: list[str]) -> dict:
    row: dict = {"system": texts[0]} if has_system else {}
    row["messages"] = [{"role": role, "content": text} | ({} if learn else {"weight": 0})
                       for role, learn, text in zip(roles, learns, texts[1:] if has_system else texts)]
    return row


@dataclass(frozen=True)
class TemplateSupport:
    """What a chat template can write, found by rendering probe texts: where one is missing from the text, the
    template drops that part of a conversation (say tool calls on a template without tool support)."""
    tools: bool  # the tool schemas offered
    tool_calls: bool  # an assistant turn's calls
    tool_results: bool  # a tool turn's content

    def missing(self) -> list[str]:
        return [name for name, ok in (("tools", self.tools), ("tool calls", self.tool_calls),
                                      ("tool results", self.tool_results)) if not ok]


_PROBE = "zq"  # made-up names no template writes by itself


def template_support(tokenizer) -> TemplateSupport:
    if not getattr(tokenizer, "chat_template", None):
        return TemplateSupport(True, True, True)  # the plain format writes all three
    return _support(tokenizer, tokenizer.chat_template)


@lru_cache(maxsize=16)
def _support(tokenizer, chat_template: str) -> TemplateSupport:
    tool = {"type": "function", "function": {"name": f"{_PROBE}_schema", "description": "probe",
                                             "parameters": {"type": "object", "properties": {}}}}
    # ids of 9 letters and digits: Mistral's templates refuse any other kind
    call = {"id": "zq0000001", "type": "function", "function": {"name": f"{_PROBE}_call", "arguments": {"a": 1}}}
    user = {"role": "user", "content": "hi"}

    def writes(probe: str, messages: list[dict], tools=None) -> bool:
        try:
            return probe in tokenizer.apply_chat_template(messages, tools=tools, tokenize=False)
        except Exception:  # noqa: BLE001 - a template that raises on the part cannot write it
            return False

    return TemplateSupport(
        tools=writes(f"{_PROBE}_schema", [user, {"role": "assistant", "content": "ok"}], [tool]),
        tool_calls=writes(f"{_PROBE}_call", [user, {"role": "assistant", "content": "", "tool_calls": [call]}]),
        tool_results=writes(f"{_PROBE}_result", [user, {"role": "assistant", "content": "", "tool_calls": [call]},
                                                 {"role": "tool", "name": f"{_PROBE}_call", "tool_call_id": "zq0000001",
                                                  "content": f"{_PROBE}_result"},
                                                 {"role": "assistant", "content": "done"}]),
    )


def chat_prompt(tokenizer, turns: list[tuple[str, str | None]], system: str | None = None, tools: list | None = None,
                conversations: bool = False) -> str:
    """Generation prompt for a multi-turn chat: turns are (user, assistant-or-None-for-the-pending-one). Without a
    chat template, a first question gets the Alpaca prompt (what Alpaca rows train on) unless `conversations` (the
    model was trained on conversations, in the plain format)."""
    if getattr(tokenizer, "chat_template", None):
        messages = [{"role": "system", "content": system}] if system else []
        for user, assistant in turns:
            messages.append({"role": "user", "content": user})
            if assistant is not None:
                messages.append({"role": "assistant", "content": assistant})
        return tokenizer.apply_chat_template(messages, tools=tools or None, add_generation_prompt=True, tokenize=False)
    if len(turns) == 1 and not tools and not conversations:  # what an Alpaca row trains on
        return render(tokenizer, {"instruction": turns[0][0]}, system).prompt
    row = {"messages": [m for user, assistant in turns for m in
                        ([{"role": "user", "content": user}] + ([{"role": "assistant", "content": assistant}] if assistant is not None else []))]}
    if tools:
        row["tools"] = tools
    text = "".join(s.text for s in _plain_spans(tokenizer, from_row(row), system or ""))
    return text + (TURN_GAP if text else "") + PLAIN_HEADERS["assistant"]


# --- tokens and labels ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Encoded:
    input_ids: list[int]
    labels: list[int]  # the token itself where it is learned, IGNORE_INDEX elsewhere
    turns: int  # assistant turns in the conversation
    turns_cut: int  # assistant turns (wholly or partly) lost to the cutoff


def encode_texts(tokenizer, texts: list[str]) -> list:
    """Each text's encoding without special tokens, in one batch call: the Rust tokenizer's own encodings where
    there is one (no offsets or masks built, several times faster), else lists of ids. Both have len() and, as
    `.ids` or themselves, the ids."""
    if not texts:
        return []
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and hasattr(backend, "encode_batch_fast"):
        return backend.encode_batch_fast(texts, add_special_tokens=False)
    return [list(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]


def span_token_ids(tokenizer, spans: list[Span]) -> list[list[int]]:
    """Token ids of each span, tokenized apart. Spans meet at a turn's special tokens (chat templates) or where no
    whitespace ends a span (the plain format), where tokenizers split anyway: the concatenation is the whole text's
    tokens, as inference tokenizes a prompt (tests check it per template)."""
    return [getattr(e, "ids", e) for e in encode_texts(tokenizer, [s.text for s in spans])]


def encode(spans: list[Span], span_ids: list[list[int]], cutoff_len: int, train_on_prompt: bool = False,
           last_turn_only: bool = False) -> Encoded:
    """input_ids and labels for spans already tokenized. A conversation longer than the cutoff loses whole trailing
    turns: it ends after the last assistant answer that fits; when even the first answer does not fit, it is cut at
    the cutoff (that answer's start is still learned). Tokens after the last kept answer teach nothing and are left
    out (unless the prompt is trained on too). `last_turn_only` learns only the last answer kept."""
    ids: list[int] = []
    learned: list[tuple[int, int]] = []  # token ranges of the answers
    for span, span_tokens in zip(spans, span_ids):
        if span.learn:
            learned.append((len(ids), len(ids) + len(span_tokens)))
        ids += span_tokens
    end = len(ids)
    if end > cutoff_len:
        fitting = [stop for _, stop in learned if stop <= cutoff_len]
        end = fitting[-1] if fitting else cutoff_len
    elif learned and not train_on_prompt:
        end = learned[-1][1]
    kept = [(a, min(b, end)) for a, b in learned if a < end]
    if last_turn_only:
        # the conversation's last answer, whole; cut inside only when it is the only one (as any first answer is)
        a, b = learned[-1] if learned else (end, end)
        kept = [(a, min(b, end))] if a < end and (b <= end or len(learned) == 1) else []
    ids = ids[:end]
    if train_on_prompt:
        labels = list(ids)
    else:
        labels = [IGNORE_INDEX] * len(ids)
        for a, b in kept:
            labels[a:b] = ids[a:b]
    whole = sum(1 for a, b in learned if b <= end)
    return Encoded(ids, labels, len(learned), len(learned) - whole)


def tokenize(tokenizer, row: dict, cutoff_len: int, train_on_prompt: bool = False, system: str = "",
             last_turn_only: bool = False) -> dict[str, list[int]]:
    """input_ids and labels (IGNORE_INDEX where nothing is learned) of one row, cut at cutoff_len (see `encode`)."""
    spans = render_spans(tokenizer, row, system)
    enc = encode(spans, span_token_ids(tokenizer, spans), cutoff_len, train_on_prompt, last_turn_only)
    return {"input_ids": enc.input_ids, "labels": enc.labels}
