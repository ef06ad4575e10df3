"""Preference tuning (the DPO family): learn from pairs of answers to one prompt, the chosen one over the rejected
one. DPO and IPO compare the policy with a reference (the model as training starts); SimPO needs no reference.

A pair's two sequences (prompt + chosen, prompt + rejected) are packed with the other pairs of the micro-batch into
one padding-free sequence, and only the answers' positions get logits: the supervised path's two speed-ups, applied
to both sides. The reference log-probabilities are computed once, before the first step, with the adapter switched
off (or, for full fine-tuning, with the weights as loaded): no second copy of the model, no reference forward per
step. They are recomputed the same way when a run resumes, before its checkpoint is loaded.
"""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Callable

from app.objectives.base import Metric, Objective, ObjectiveError

PAIR_KEYS = ("messages", "chosen", "rejected")
# What every preference objective records beside its loss: per pair, summed by loss_sum, averaged by the worker.
PAIR_METRICS = (
    Metric("reward_accuracy", "reward accuracy", "train"),
    Metric("reward_margin", "reward margin", "train"),
    Metric("chosen_reward", "chosen reward", "train"),
    Metric("rejected_reward", "rejected reward", "train"),
    Metric("eval_reward_accuracy", "validation reward accuracy", "eval"),
    Metric("eval_reward_margin", "validation reward margin", "eval"),
)


@dataclass
class PairExample:
    chosen: Any  # batches.Example: prompt + chosen answer, only the answer learned
    rejected: Any
    beta: float
    gamma: float = 0.0
    ref_chosen: float = float("nan")  # summed log-probabilities of the answers under the reference
    ref_rejected: float = float("nan")

    @property
    def input_ids(self) -> list[int]:  # what the worker counts as the example's tokens
        return self.chosen.input_ids + self.rejected.input_ids


@dataclass
class PairBatch:
    """The micro-batch's pairs packed as [chosen 0, rejected 0, chosen 1, rejected 1, ...] in one sequence."""
    packed: Any  # batches.Batch of all the sequences
    sequence_of: Any  # the sequence index of each position that gets a logit
    examples: list[PairExample] = field(default_factory=list)

    @property
    def n_tokens(self) -> int:
        return self.packed.n_tokens

    @property
    def n_targets(self) -> int:  # the loss is a mean over pairs
        return len(self.examples)

    @property
    def max_len(self) -> int:
        return self.packed.max_len


def _side_example(renderer, tokenizer, side: dict, cutoff: int):
    """One side of a pair (app.data.preference.side_rows: the prompt, its own answers read only, then this reply)
    as an Example whose one learned span is the reply."""
    from app.data.template import IGNORE_INDEX, encode, span_token_ids
    from app.objectives.batches import Example

    spans = renderer.spans(side)
    enc = encode(spans, span_token_ids(tokenizer, spans), cutoff)
    return Example(enc.input_ids, enc.labels[1:] + [IGNORE_INDEX])


def pair_examples(tokenizer, rows: list[dict], config) -> list[PairExample]:
    """Pairs whose both answers keep at least one token inside the cutoff; other rows are refused plainly."""
    from app.data.preference import side_rows
    from app.data.template import SpanRenderer, TemplateError

    wrong = next((r for r in rows if not all(k in r for k in PAIR_KEYS)), None)
    if wrong is not None:
        raise ObjectiveError(
            f"this objective learns from preference pairs (a prompt, a chosen and a rejected answer), but the dataset "
            f"holds rows with {', '.join(sorted(wrong))}: pick a preference dataset, or supervised fine-tuning")
    renderer = SpanRenderer(tokenizer, config.system_prompt)
    examples = []
    for row in rows:
        try:  # the same sides the data check counts
            chosen, rejected = (_side_example(renderer, tokenizer, side, config.cutoff_len) for _, side in side_rows(row))
        except TemplateError:  # the data check names each row the template cannot write
            continue
        if chosen.n_targets and rejected.n_targets:
            examples.append(PairExample(chosen, rejected, config.beta, config.simpo_gamma))
    return examples


def make_batch(examples: list[PairExample]) -> PairBatch:
    import torch

    from app.data.template import IGNORE_INDEX
    from app.objectives.batches import pack

    sequences = [e for pair in examples for e in (pair.chosen, pair.rejected)]
    packed = pack(sequences)
    owner = torch.tensor([i for i, e in enumerate(sequences) for t in e.targets if t != IGNORE_INDEX])
    return PairBatch(packed, owner, list(examples))


def sequence_logps(model, batch: PairBatch, packed: bool, device, pad_id: int):
    """(summed answer log-probabilities per sequence, answer tokens per sequence), float32, [2 * pairs] each."""
    import torch
    import torch.nn.functional as F

    from app.data.template import IGNORE_INDEX

    b = batch.packed
    n = len(b.examples)
    if packed:
        out = model(
            input_ids=b.input_ids.to(device), position_ids=b.position_ids.to(device), logits_to_keep=b.keep.to(device),
            cu_seq_lens_q=b.cu_seqlens, cu_seq_lens_k=b.cu_seqlens, max_length_q=b.max_len, max_length_k=b.max_len,
            use_cache=False,
        )
        per_token = -F.cross_entropy(out.logits[0].float(), b.kept_targets.to(device), reduction="none")
    else:  # methods that cannot pack: one padded row per sequence
        width = b.max_len
        ids = torch.full((n, width), pad_id)
        mask = torch.zeros((n, width), dtype=torch.long)
        for i, ex in enumerate(b.examples):
            ids[i, :len(ex.input_ids)], mask[i, :len(ex.input_ids)] = torch.tensor(ex.input_ids), 1
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False).logits
        logits = logits[:, -width:]  # virtual-token methods put their tokens first
        rows, cols, targets = [], [], []
        for i, ex in enumerate(b.examples):
            for t, label in enumerate(ex.targets):
                if label != IGNORE_INDEX:
                    rows.append(i), cols.append(t), targets.append(label)
        per_token = -F.cross_entropy(logits[rows, cols].float(), torch.tensor(targets, device=device), reduction="none")
    owner = batch.sequence_of.to(device)
    sums = torch.zeros(n, device=device, dtype=torch.float32).index_add(0, owner, per_token)
    counts = torch.zeros(n, device=device, dtype=torch.float32).index_add(0, owner, torch.ones_like(per_token))
    return sums, counts


def prepare_reference(model, examples: list[PairExample], packed: bool, device, pad_id: int, autocast=None,
                      batch_size: int = 8) -> None:
    """Each pair's reference log-probabilities: the model as loaded, its adapter switched off, dropout off."""
    import torch

    was_training = model.training
    model.eval()
    adapter_off = model.disable_adapter() if hasattr(model, "disable_adapter") else nullcontext()
    with torch.no_grad(), adapter_off, (autocast or nullcontext()):
        for start in range(0, len(examples), batch_size):
            chunk = examples[start:start + batch_size]
            sums, _ = sequence_logps(model, make_batch(chunk), packed, device, pad_id)
            for pair, chosen, rejected in zip(chunk, sums[0::2].tolist(), sums[1::2].tolist()):
                pair.ref_chosen, pair.ref_rejected = chosen, rejected
    model.train(was_training)


def _loss_sum(rule: Callable[..., Any]):
    def loss_sum(model, batch: PairBatch, packed: bool, device, pad_id: int):
        import torch

        sums, counts = sequence_logps(model, batch, packed, device, pad_id)
        pairs = batch.examples
        ref = torch.tensor([[p.ref_chosen, p.ref_rejected] for p in pairs], device=device, dtype=torch.float32)
        result = rule(sums[0::2], sums[1::2], ref[:, 0], ref[:, 1], counts[0::2], counts[1::2], pairs[0])
        chosen, rejected = result.chosen_rewards, result.rejected_rewards
        metrics = {"reward_accuracy": float((chosen > rejected).sum()), "reward_margin": float((chosen - rejected).sum()),
                   "chosen_reward": float(chosen.sum()), "rejected_reward": float(rejected.sum())}
        return result.losses.sum(), metrics
    return loss_sum


def _dpo(pc, pr, rc, rr, nc, nr, pair):
    from app.objectives import preference_losses as L

    return L.dpo(pc, pr, rc, rr, pair.beta)


def _ipo(pc, pr, rc, rr, nc, nr, pair):
    from app.objectives import preference_losses as L

    return L.ipo(pc, pr, rc, rr, nc, nr, pair.beta)


def _simpo(pc, pr, rc, rr, nc, nr, pair):
    from app.objectives import preference_losses as L

    return L.simpo(pc, pr, nc, nr, pair.beta, pair.gamma)


def _with_reference(model, examples, packed, device, pad_id, autocast=None) -> None:
    prepare_reference(model, examples, packed, device, pad_id, autocast)


def _objective(name: str, label: str, description: str, rule, reference: bool, controls: tuple[str, ...]) -> Objective:
    return Objective(
        name=name, label=label, description=description, example="pair",
        metrics=(Metric("loss", "train loss", "train"), Metric("eval_loss", "validation loss", "eval"), *PAIR_METRICS),
        controls=controls, make_examples=pair_examples, make_batch=make_batch, loss_sum=_loss_sum(rule),
        sequences_per_example=2, prepare=_with_reference if reference else None,
    )


DPO = _objective(
    "dpo", "Preference tuning (DPO)",
    "Learns to prefer each pair's chosen answer over the rejected one, staying close to the model it starts from "
    "(beta: how close). The second step of the articles' RLHF, without a reward model.",
    _dpo, True, ("beta",))
IPO = _objective(
    "ipo", "Preference tuning (IPO)",
    "DPO's variant that aims at a fixed margin per token instead of pushing it ever wider: steadier on small or "
    "noisy preference sets.",
    _ipo, True, ("beta",))
SIMPO = _objective(
    "simpo", "Preference tuning without a reference (SimPO)",
    "Prefers the chosen answer by its average log-probability per token, by a target margin (gamma); needs no "
    "reference. Its beta is usually 2 to 10, far above DPO's 0.1.",
    _simpo, False, ("beta", "simpo_gamma"))
OBJECTIVES = (DPO, IPO, SIMPO)
