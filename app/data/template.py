"""The exact text a model is trained on: an Alpaca row through the model's chat template, prompt and response apart."""
from __future__ import annotations

from dataclasses import dataclass

IGNORE_INDEX = -100  # label value that the loss skips

# For models without a chat template (base models). Documented in the Data tab.
ALPACA_PROMPT = (
    "Below is an instruction that describes a task{with_input}. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n{input_block}### Response:\n"
)


@dataclass(frozen=True)
class Rendered:
    prompt: str  # masked out of the loss unless train_on_prompt
    response: str  # what the model learns to write, end-of-turn marker included


def user_message(row: dict) -> str:
    instruction = str(row.get("instruction") or "").strip()
    extra = str(row.get("input") or "").strip()
    return f"{instruction}\n\n{extra}" if extra else instruction


def render(tokenizer, row: dict, system: str | None = None) -> Rendered:
    """Prompt and response text for one {instruction, input, output} row."""
    output = str(row.get("output") or "")
    if getattr(tokenizer, "chat_template", None):
        messages = ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": user_message(row)}
        ]
        prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        full = tokenizer.apply_chat_template(
            messages + [{"role": "assistant", "content": output}], tokenize=False
        )
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
    return Rendered(prompt, output + (tokenizer.eos_token or ""))


def chat_prompt(tokenizer, turns: list[tuple[str, str | None]], system: str | None = None) -> str:
    """Generation prompt for a multi-turn chat: turns are (user, assistant-or-None-for-the-pending-one)."""
    if getattr(tokenizer, "chat_template", None):
        messages = [{"role": "system", "content": system}] if system else []
        for user, assistant in turns:
            messages.append({"role": "user", "content": user})
            if assistant is not None:
                messages.append({"role": "assistant", "content": assistant})
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    text = ""
    for user, assistant in turns:
        text += render(tokenizer, {"instruction": user}).prompt
        if assistant is not None:
            text += assistant + "\n\n"
    return text


def tokenize(tokenizer, row: dict, cutoff_len: int, train_on_prompt: bool = False) -> dict[str, list[int]]:
    """input_ids and labels (prompt positions = IGNORE_INDEX unless train_on_prompt), cut at cutoff_len."""
    rendered = render(tokenizer, row)
    prompt_ids = tokenizer(rendered.prompt, add_special_tokens=False)["input_ids"]
    response_ids = tokenizer(rendered.response, add_special_tokens=False)["input_ids"]
    input_ids = (prompt_ids + response_ids)[:cutoff_len]
    prompt_labels = list(prompt_ids) if train_on_prompt else [IGNORE_INDEX] * len(prompt_ids)
    labels = (prompt_labels + list(response_ids))[:cutoff_len]
    return {"input_ids": input_ids, "labels": labels}
