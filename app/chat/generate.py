"""Decoding for side-by-side chat: the sampling settings, the loop that streams every pane's answer token by token
(the rows that share a model in one forward pass, each with its own KV cache row and random generator), and the
chat histories the UI keeps."""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Iterator

from app.chat.cache import Loaded, LoadedModel
from app.chat.panes import ChatError


# --- sampling and the streaming loop -----------------------------------------------------------------------
@dataclass(frozen=True)
class Sampling:
    max_new_tokens: int = 256  # answers stop here if the model has not finished
    temperature: float = 0.7  # 0 = always the most likely token (greedy); higher = more varied
    top_p: float = 0.9  # sample only from the most likely tokens that together hold this share
    repetition_penalty: float = 1.0  # above 1 discourages tokens already in the chat
    seed: int = 0  # every pane draws from its own generator seeded with this, so reruns repeat

    def __post_init__(self) -> None:
        def bad(name: str, why: str) -> ChatError:
            return ChatError(f"{name}={getattr(self, name)!r}: {why}")

        if not 1 <= int(self.max_new_tokens) <= 8192:
            raise bad("max_new_tokens", "must be between 1 and 8192")
        if not 0 <= float(self.temperature) <= 10:
            raise bad("temperature", "must be between 0 (greedy) and 10")
        if not 0 < float(self.top_p) <= 1:
            raise bad("top_p", "must be above 0 and at most 1")
        if not 0 < float(self.repetition_penalty) <= 10:
            raise bad("repetition_penalty", "must be above 0 (1 = off)")


@dataclass
class RowOutput:
    """One row's answer so far."""
    text: str = ""
    tokens: int = 0
    done: bool = False
    first_token_s: float | None = None  # from the start of the call to this row's first token
    seconds: float = 0.0  # from the start of the call to this row's latest token

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


def stop_token_ids(tokenizer, model_config=None) -> set[int]:
    ids = {tokenizer.eos_token_id}
    end_of_turn = tokenizer.convert_tokens_to_ids("<|im_end|>") if "<|im_end|>" in tokenizer.get_vocab() else None
    ids.add(end_of_turn)
    configured = getattr(model_config, "eos_token_id", None)
    ids.update(configured if isinstance(configured, list) else [configured])
    return {i for i in ids if i is not None}


def pick_tokens(logits, sampling: Sampling, seen, generators) -> list[int]:
    """One token per row: repetition penalty, then greedy, or temperature + top-p with each row's own generator."""
    import torch

    if sampling.repetition_penalty != 1.0:
        penalised = torch.where(logits > 0, logits / sampling.repetition_penalty, logits * sampling.repetition_penalty)
        logits = torch.where(seen, penalised, logits)
    if sampling.temperature == 0:
        return logits.argmax(-1).tolist()
    probs = torch.softmax(logits / sampling.temperature, dim=-1)
    order = None
    if sampling.top_p < 1:
        probs, order = probs.sort(dim=-1, descending=True)
        # Keep the smallest set of most likely tokens whose mass reaches top_p (always the first one).
        probs[(probs.cumsum(-1) - probs) > sampling.top_p] = 0
    # Inverse-CDF draw: one uniform number per row from the row's own generator, so a row's draws do not depend
    # on the other rows of the batch (and it is much cheaper than torch.multinomial over a whole vocabulary).
    cdf = probs.cumsum(-1)
    picks = []
    for i, generator in enumerate(generators):
        u = torch.rand(1, generator=generator, device=cdf.device) * cdf[i, -1]
        j = min(int(torch.searchsorted(cdf[i], u, right=True)), cdf.shape[-1] - 1)
        picks.append(int(order[i, j]) if order is not None else j)
    return picks


class _Decoder:
    """The KV-cache decode state of the rows that run through one model: left-padded, compacted as rows finish."""

    def __init__(self, model: LoadedModel, rows: list[int], names: list[str], prompts: list[list[int]], pad_id: int,
                 sampling: Sampling, device):
        import torch

        self.model, self.rows, self.names, self.sampling = model, list(rows), list(names), sampling
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
        self.mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, width - len(p):] = torch.tensor(p, dtype=torch.long)
            self.mask[i, width - len(p):] = 1
        positions = (self.mask.cumsum(-1) - 1).clamp(min=0)
        self.next_pos = positions[:, -1] + 1
        self.pending = (ids.to(device), positions.to(device))
        self.mask = self.mask.to(device)
        self.prompts = prompts
        self.seen = None  # rows x vocab: tokens already in each row, for the repetition penalty
        self.cache = None
        self.generators = [torch.Generator(device=device).manual_seed(int(sampling.seed)) for _ in rows]

    def pick(self) -> list[int]:
        import torch

        ids, positions = self.pending
        logits, self.cache = self.model.logits(self.names, ids, self.mask, positions, self.cache)
        if self.seen is None:
            self.seen = torch.zeros(logits.shape, dtype=torch.bool, device=logits.device)
            for i, p in enumerate(self.prompts):
                self.seen[i, torch.tensor(p, device=logits.device)] = True
        return pick_tokens(logits, self.sampling, self.seen, self.generators)

    def advance(self, tokens: list[int], keep: list[int]) -> None:
        """Feed the picked tokens back; rows not in `keep` (positions in this batch) have finished."""
        import torch

        device = self.mask.device
        new = torch.tensor(tokens, dtype=torch.long, device=device)
        self.seen[torch.arange(len(tokens), device=device), new] = True
        if len(keep) < len(self.rows):
            index = torch.tensor(keep, dtype=torch.long, device=device)
            self.cache.batch_select_indices(index)
            self.mask, self.seen, self.next_pos, new = self.mask[index], self.seen[index], self.next_pos[index], new[index]
            self.rows = [self.rows[i] for i in keep]
            self.names = [self.names[i] for i in keep]
            self.generators = [self.generators[i] for i in keep]
        self.mask = torch.cat([self.mask, torch.ones((len(keep), 1), dtype=torch.long, device=device)], dim=1)
        self.pending = (new[:, None], self.next_pos[:, None].to(device))
        self.next_pos = self.next_pos + 1


def generate(loaded: Loaded, rows: list[tuple[str, str]], sampling: Sampling) -> Iterator[list[RowOutput]]:
    """Answer each (pane key, prompt text) row; yields every row's answer so far after each token.

    All rows advance together: the rows that share a model run in one forward pass, the models run one after
    the other within a step, and the caller sees every pane grow at once. Stop by no longer iterating.
    """
    import torch

    tokenizer = loaded.tokenizer
    outputs = [RowOutput() for _ in rows]
    token_ids: list[list[int]] = [[] for _ in rows]
    grouped: dict[int, tuple[LoadedModel, list[int], list[str]]] = {}
    for i, (key, _) in enumerate(rows):
        if key not in loaded.routes:
            raise ChatError(f"{key!r} is not loaded; choose the runs again.")
        model, name = loaded.routes[key]
        grouped.setdefault(id(model), (model, [], []))
        grouped[id(model)][1].append(i)
        grouped[id(model)][2].append(name)
    prompts = [tokenizer(text, add_special_tokens=False)["input_ids"] for _, text in rows]
    for model, indices, _ in grouped.values():
        longest = max(len(prompts[i]) for i in indices)
        if longest + sampling.max_new_tokens > model.max_positions:
            raise ChatError(
                f"The chat is {longest} tokens long and this model reads at most {model.max_positions}: press Clear "
                f"to start a new chat, or lower the maximum new tokens."
            )
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    stops = stop_token_ids(tokenizer, getattr(next(iter(grouped.values()))[0].model, "config", None))
    start = time.perf_counter()
    with torch.inference_mode():
        decoders = [
            _Decoder(model, indices, names, [prompts[i] for i in indices], pad_id, sampling, _model_device(model))
            for model, indices, names in grouped.values()
        ]
    while decoders:
        for decoder in decoders:
            # inference_mode is entered per step, never across a yield: the consumer may resume us on another thread.
            with torch.inference_mode():
                picked = decoder.pick()
                now = time.perf_counter() - start
                keep = []
                for j, (row, token) in enumerate(zip(decoder.rows, picked)):
                    out = outputs[row]
                    if out.first_token_s is None:
                        out.first_token_s = now
                    out.seconds = now
                    if token in stops:
                        out.done = True
                    else:
                        token_ids[row].append(token)
                        out.tokens += 1
                        out.done = out.tokens >= sampling.max_new_tokens
                    text = tokenizer.decode(token_ids[row], skip_special_tokens=True)
                    # A character split over several tokens shows as U+FFFD until its last byte arrives.
                    if out.done or not text.endswith("\ufffd"):
                        out.text = text
                    if not out.done:
                        keep.append(j)
                if keep:
                    decoder.advance(picked, keep)
        decoders = [d for d in decoders if any(not outputs[r].done for r in d.rows)]
        yield [RowOutput(**asdict(o)) for o in outputs]


def _model_device(model: LoadedModel):
    import torch

    params = getattr(model.model, "parameters", None)
    return next(params()).device if params else torch.device("cpu")


# --- chat histories (the messages format the UI keeps per pane) ------------------------------------------------
def message_text(content) -> str:
    """The text of a message's content: a string, or a list of content blocks ({"type": "text", "text": ...})."""
    if isinstance(content, str):
        return content
    if isinstance(content, dict):
        return str(content.get("text") or "")
    if isinstance(content, list):
        return "".join(message_text(part) for part in content)
    return ""


def chat_turns(history: list[dict] | None) -> list[tuple[str, str | None]]:
    """(user, assistant) pairs from a messages-format history; None for a question not answered yet."""
    turns: list[tuple[str, str | None]] = []
    for message in history or []:
        if not isinstance(message, dict):
            continue
        role, text = message.get("role"), message_text(message.get("content"))
        if role == "user":
            turns.append((text, None))
        elif role == "assistant" and turns and turns[-1][1] is None:
            turns[-1] = (turns[-1][0], text)
    return turns
