"""The DPO family's losses (DPO, IPO, SimPO, KTO) computed from per-sequence log-probabilities, value for value the
ones TRL 1.16 trains with (tests/test_preference_losses.py runs TRL's own code on the same numbers).

Every function takes the answer log-probabilities summed over the answer's tokens, one value per sequence (shape
[pairs], or [rows] for KTO), so the batching, packing and reference forward stay with the caller. Reference values
are detached here: whichever way the caller obtained them (a frozen copy, the adapter switched off, precomputed), the
gradient reaches the policy only."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class PreferenceLoss:
    """One micro-batch's losses and the implicit rewards the live view plots (TRL's rewards/* and logps/* metrics).

    For KTO the rows are unpaired: `chosen_*` hold the desirable rows and `rejected_*` the undesirable ones, of any
    two sizes, and the reward accuracy is not defined (TRL does not log one either)."""
    losses: torch.Tensor  # per pair (per row for KTO); carries the gradient
    chosen_rewards: torch.Tensor  # detached implicit rewards, beta * (policy - reference) for DPO, IPO and KTO
    rejected_rewards: torch.Tensor
    chosen_logps: torch.Tensor  # detached policy log-probabilities as the loss reads them (per-token means for SimPO)
    rejected_logps: torch.Tensor
    paired: bool = True  # chosen_rewards[i] and rejected_rewards[i] belong to the same prompt
    kl: torch.Tensor | None = None  # KTO: the clamped KL estimate the losses used (TRL logs it as "kl")

    @property
    def loss(self) -> torch.Tensor:
        """What the optimiser steps on: the mean over the micro-batch, as TRL's trainers take it (KTO's desirable and
        undesirable weights scale rows, they do not change the denominator)."""
        return self.losses.mean()

    @property
    def reward_accuracy(self) -> float | None:
        """Share of pairs whose chosen reward is strictly above the rejected one. A tie counts as wrong, as in TRL:
        at the first step, with the policy still equal to its reference, every reward is 0 and the accuracy is 0,
        not 0.5."""
        if not self.paired or not len(self.chosen_rewards):
            return None
        return (self.chosen_rewards > self.rejected_rewards).float().mean().item()

    @property
    def reward_margin(self) -> float | None:
        """Mean chosen reward minus mean rejected reward: for pairs, the mean per-pair margin; for KTO's unpaired
        rows, TRL's definition (the difference of the two means)."""
        chosen, rejected = self.chosen_reward_mean, self.rejected_reward_mean
        return None if chosen is None or rejected is None else chosen - rejected

    @property
    def chosen_reward_mean(self) -> float | None:
        return _mean(self.chosen_rewards)

    @property
    def rejected_reward_mean(self) -> float | None:
        return _mean(self.rejected_rewards)

    @property
    def chosen_logps_mean(self) -> float | None:
        return _mean(self.chosen_logps)

    @property
    def rejected_logps_mean(self) -> float | None:
        return _mean(self.rejected_logps)


def _mean(values: torch.Tensor) -> float | None:
    """None for an empty side (a KTO micro-batch with only desirable rows): TRL then logs nothing for it."""
    return values.mean().item() if len(values) else None


def dpo(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
        ref_rejected: torch.Tensor, beta: float) -> PreferenceLoss:
    """DPO's sigmoid loss, -log sigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r))), on summed log-probabilities
    (TRL DPOTrainer, loss_type="sigmoid"; beta is the strength of the pull towards the reference)."""
    _check_beta(beta)
    _check_shapes(policy_chosen=policy_chosen, policy_rejected=policy_rejected, ref_chosen=ref_chosen,
                  ref_rejected=ref_rejected)
    chosen_ratio = policy_chosen - ref_chosen.detach()
    rejected_ratio = policy_rejected - ref_rejected.detach()
    losses = -F.logsigmoid(beta * (chosen_ratio - rejected_ratio))
    return _paired(losses, beta * chosen_ratio, beta * rejected_ratio, policy_chosen, policy_rejected)


def ipo(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
        ref_rejected: torch.Tensor, chosen_tokens: torch.Tensor, rejected_tokens: torch.Tensor,
        beta: float) -> PreferenceLoss:
    """IPO's squared loss as TRL DPOTrainer computes it (loss_type="ipo"): each side's log-ratio is divided by its
    answer's token count before the difference, ((r_c / n_c - r_r / n_r) - 1 / (2 * beta)) ** 2. The paper writes
    sequence-level ratios; TRL averages per token so that one beta suits answers of any length (its comment says the
    IPO authors confirmed this form), so the same beta means a much weaker margin target than on summed ratios.

    The token counts are the answer tokens whose log-probabilities were summed, clamped at 1 as TRL does (TRL counts
    the completion mask's ones, the same number whenever the prompt is not empty). The rewards stay on summed
    ratios, beta * (policy - reference), as TRL logs them for every DPO loss type."""
    _check_beta(beta)
    _check_shapes(policy_chosen=policy_chosen, policy_rejected=policy_rejected, ref_chosen=ref_chosen,
                  ref_rejected=ref_rejected, chosen_tokens=chosen_tokens, rejected_tokens=rejected_tokens)
    chosen_ratio = policy_chosen - ref_chosen.detach()
    rejected_ratio = policy_rejected - ref_rejected.detach()
    per_token_chosen = chosen_ratio / _counts(chosen_tokens, chosen_ratio)
    per_token_rejected = rejected_ratio / _counts(rejected_tokens, rejected_ratio)
    delta = per_token_chosen - per_token_rejected
    losses = (delta - 1 / (2 * beta)) ** 2
    return _paired(losses, beta * chosen_ratio, beta * rejected_ratio, policy_chosen, policy_rejected)


def simpo(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, chosen_tokens: torch.Tensor,
          rejected_tokens: torch.Tensor, beta: float, gamma: float) -> PreferenceLoss:
    """SimPO: no reference model; the reward is beta times the answer's mean per-token log-probability, and the
    loss is -log sigmoid(beta * (m_c - m_r) - gamma), gamma being the target reward margin (TRL's experimental
    CPOTrainer, loss_type="simpo", simpo_gamma=gamma, label_smoothing=0 and cpo_alpha=0: CPOConfig's default
    cpo_alpha=1.0 would add a supervised term on the chosen answers that plain SimPO does not have).

    The SimPO paper's betas are large (about 2 to 10) next to DPO's 0.1, because the rewards are per-token means;
    TRL's CPOConfig defaults (beta=0.1, simpo_gamma=0.5) give a margin target of 5 nats per token."""
    _check_beta(beta)
    _check_shapes(policy_chosen=policy_chosen, policy_rejected=policy_rejected, chosen_tokens=chosen_tokens,
                  rejected_tokens=rejected_tokens)
    chosen_mean = policy_chosen / _counts(chosen_tokens, policy_chosen)
    rejected_mean = policy_rejected / _counts(rejected_tokens, policy_rejected)
    losses = -F.logsigmoid(beta * (chosen_mean - rejected_mean) - gamma)
    return _paired(losses, beta * chosen_mean, beta * rejected_mean, chosen_mean, rejected_mean)


def kto(policy_logps: torch.Tensor, ref_logps: torch.Tensor, desirable: torch.Tensor,
        kl_estimate: torch.Tensor | float, beta: float, desirable_weight: float = 1.0,
        undesirable_weight: float = 1.0) -> PreferenceLoss:
    """KTO on unpaired rows (TRL KTOTrainer, loss_type="kto"): with r = policy - reference and z the KL estimate,
    a desirable row's loss is desirable_weight * (1 - sigmoid(beta * (r - z))) and an undesirable row's
    undesirable_weight * (1 - sigmoid(beta * (z - r))).

    `kl_estimate` comes from `kto_kl_estimate` on the same micro-batch's mismatched pairs; it is detached and clamped
    at 0 here, after any averaging across processes, which is the order TRL uses. Losses stay in row order (TRL
    concatenates desirable then undesirable rows; the mean is the same)."""
    _check_beta(beta)
    _check_shapes(policy_logps=policy_logps, ref_logps=ref_logps, desirable=desirable)
    if desirable.dtype != torch.bool:
        raise ValueError(f"desirable: a bool tensor, got dtype {desirable.dtype}")
    kl = torch.as_tensor(kl_estimate, dtype=policy_logps.dtype, device=policy_logps.device).detach().clamp(min=0)
    ratio = policy_logps - ref_logps.detach()
    losses = torch.where(desirable,
                         desirable_weight * torch.sigmoid(-beta * (ratio - kl)),  # 1 - sigmoid(x) = sigmoid(-x)
                         undesirable_weight * torch.sigmoid(-beta * (kl - ratio)))
    rewards = beta * ratio.detach()
    logps = policy_logps.detach()
    return PreferenceLoss(losses, rewards[desirable], rewards[~desirable], logps[desirable], logps[~desirable],
                          paired=False, kl=kl)


def kto_kl_estimate(policy_mismatched: torch.Tensor, ref_mismatched: torch.Tensor) -> torch.Tensor:
    """KTO's reference point: the mean of policy - reference summed log-probabilities over the micro-batch's
    mismatched (prompt, answer) pairs (see `mismatched_answers`), detached. It is left unclamped so that processes
    can average it first; `kto` clamps it. The policy side needs no graph: TRL computes it under torch.no_grad()."""
    _check_shapes(policy_mismatched=policy_mismatched, ref_mismatched=ref_mismatched)
    return (policy_mismatched.detach() - ref_mismatched.detach()).mean()


def mismatched_answers(rows: int) -> list[int]:
    """For each row of a KTO micro-batch, the row whose answer it is paired with to estimate the KL term: TRL shifts
    the answers by one within each batch, so row i gets the answer of row i-1 and row 0 the last one. One row alone
    would be paired with its own answer, making the estimate equal the reward; TRL refuses batches of 1."""
    if rows < 2:
        raise ValueError(f"rows={rows}: KTO's KL estimate needs at least 2 rows per micro-batch")
    return [rows - 1, *range(rows - 1)]


def _paired(losses: torch.Tensor, chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor,
            chosen_logps: torch.Tensor, rejected_logps: torch.Tensor) -> PreferenceLoss:
    return PreferenceLoss(losses, chosen_rewards.detach(), rejected_rewards.detach(), chosen_logps.detach(),
                          rejected_logps.detach())


def _counts(tokens: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Token counts as the log-probabilities' dtype, at least 1: an empty answer divides by 1 rather than 0 (TRL's
    DPO clamps the same way; its CPO would give NaN, which only an empty answer can reach)."""
    return tokens.to(device=like.device, dtype=like.dtype).clamp(min=1)


def _check_beta(beta: float) -> None:
    # beta = 0 turns DPO into a constant (log 2, no gradient) and IPO into a division by zero: refuse it early
    if not beta > 0:  # also refuses NaN
        raise ValueError(f"beta={beta!r}: must be greater than 0")


def _check_shapes(**tensors: torch.Tensor) -> None:
    """All one-dimensional and of one length: a [pairs, 1] tensor against a [pairs] one would broadcast silently."""
    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    if len(set(shapes.values())) != 1 or len(next(iter(shapes.values()))) != 1:
        raise ValueError("expected tensors of one shape [n]: " + ", ".join(f"{k}={v}" for k, v in shapes.items()))
