"""Supervised fine-tuning: learn to write each row's response after its prompt (cross-entropy on the response)."""
from __future__ import annotations

from app.objectives.base import Metric, Objective


TOKENIZE_BATCH = 1024  # rows whose spans are tokenized in one call


def tokenize_rows(tokenizer, rows: list[dict], cutoff_len: int, train_on_prompt: bool, system: str = "",
                  last_turn_only: bool = False) -> list:
    """Examples with at least one position to learn from; a row whose answer was cut away teaches nothing (the Data
    tab and `data check` report such rows). Rows are Alpaca rows or whole conversations (app.data.conversation)."""
    from app.data.template import IGNORE_INDEX, SpanRenderer, TemplateError, encode, span_token_ids
    from app.objectives.batches import Example

    renderer = SpanRenderer(tokenizer, system)
    examples = []
    for start in range(0, len(rows), TOKENIZE_BATCH):
        rendered = []
        for row in rows[start:start + TOKENIZE_BATCH]:
            try:
                rendered.append(renderer.spans(row))
            except TemplateError:  # the template cannot render it turn by turn: the data check names each such row
                continue
        ids = iter(span_token_ids(tokenizer, [span for spans in rendered for span in spans]))
        for spans in rendered:
            enc = encode(spans, [next(ids) for _ in spans], cutoff_len, train_on_prompt, last_turn_only)
            # the label of position t is the token at t+1 of the same row: shift inside the row, never across rows
            example = Example(enc.input_ids, enc.labels[1:] + [IGNORE_INDEX])
            if example.n_targets:
                examples.append(example)
    return examples


def make_examples(tokenizer, rows: list[dict], config) -> list:
    from app.data.preference import is_preference_row
    from app.objectives.base import ObjectiveError

    if any(is_preference_row(r) for r in rows[:1]):
        raise ObjectiveError("this dataset holds preference data (answers rated or paired as chosen and rejected), "
                             "which supervised fine-tuning does not read: choose a preference objective (DPO, IPO or "
                             "SimPO) under 'What the model learns' in the Method & Memory tab")
    return tokenize_rows(tokenizer, rows, config.cutoff_len, config.train_on_prompt, config.system_prompt,
                         config.assistant_turns == "last")


def make_batch(examples: list):
    """The rows of a micro-batch packed into one sequence without padding (see app.objectives.batches)."""
    from app.objectives.batches import pack

    return pack(examples)


def loss_sum(model, batch, packed: bool, device, pad_id: int):
    """Summed cross-entropy over the batch's labelled positions (the caller divides by the step's label count)."""
    import torch
    import torch.nn.functional as F

    from app.data.template import IGNORE_INDEX

    if packed:
        out = model(
            input_ids=batch.input_ids.to(device), position_ids=batch.position_ids.to(device),
            logits_to_keep=batch.keep.to(device), cu_seq_lens_q=batch.cu_seqlens, cu_seq_lens_k=batch.cu_seqlens,
            max_length_q=batch.max_len, max_length_k=batch.max_len, use_cache=False,
        )
        return F.cross_entropy(out.logits[0].float(), batch.kept_targets.to(device), reduction="sum")
    # Padded fallback for methods that cannot pack: the model's own loss (it knows about virtual tokens).
    width = batch.max_len
    ids = torch.full((len(batch.examples), width), pad_id)
    labels = torch.full((len(batch.examples), width), IGNORE_INDEX)
    mask = torch.zeros((len(batch.examples), width), dtype=torch.long)
    for i, ex in enumerate(batch.examples):
        n = len(ex.input_ids)
        ids[i, :n], mask[i, :n] = torch.tensor(ex.input_ids), 1
        labels[i, 1:n] = torch.tensor(ex.targets[:n - 1])  # the model shifts labels itself
    out = model(input_ids=ids.to(device), attention_mask=mask.to(device), labels=labels.to(device), use_cache=False)
    return out.loss.float() * batch.n_targets


OBJECTIVE = Objective(
    name="sft",
    label="Supervised fine-tuning",
    description="Learns to write each example's answer after its prompt: the first step of the articles' pipeline.",
    example="instruction",
    metrics=(Metric("loss", "train loss", "train"), Metric("eval_loss", "validation loss", "eval")),
    controls=("train_on_prompt", "assistant_turns"),
    make_examples=make_examples,
    make_batch=make_batch,
    loss_sum=loss_sum,
)
