"""The DPO family's losses (app.objectives.preference_losses) against TRL 1.16's own code on the same numbers.

TRL computes DPO, IPO and KTO inside its trainers' `_compute_loss` and SimPO in `CPOTrainer.cpo_loss`. The tests call
those methods unbound, with a stand-in `self` that holds only the attributes they read and a stand-in model that
returns per-token log-probabilities we chose, so what is compared is TRL's arithmetic, not a restatement of it. The
sequences are laid out as TRL's collators lay them out (a completion mask over prompt + answer, log-probabilities at
the shifted positions), which also checks that our token counts are the ones TRL divides by."""
from __future__ import annotations

import math
import types
from collections import defaultdict
from dataclasses import dataclass
from types import SimpleNamespace

import pytest
import torch
from torch.testing import assert_close

from app.objectives.preference_losses import (
    PreferenceLoss, dpo, ipo, kto, kto_kl_estimate, mismatched_answers, simpo,
)

PAIRS = 6
DTYPE = torch.float64  # TRL's arithmetic in float64, so any difference is a different formula, not rounding


@pytest.fixture(scope="module")
def trl():
    import trl as trl_package
    from trl import DPOTrainer, KTOTrainer
    from trl.experimental.cpo import CPOTrainer

    # the stand-ins below hold exactly the attributes 1.16's methods read; another version needs them re-read
    assert trl_package.__version__ == "1.16.0", trl_package.__version__
    return SimpleNamespace(DPOTrainer=DPOTrainer, KTOTrainer=KTOTrainer, CPOTrainer=CPOTrainer)


@dataclass
class Sequences:
    """Rows of prompt + answer as TRL's collators build them. `per_token[i, t]` is log p(token t+1), zero outside the
    answer, as the fused LM head returns it for labels masked with -100."""
    input_ids: torch.Tensor
    completion_mask: torch.Tensor
    per_token: torch.Tensor  # a leaf that TRL's loss backpropagates into

    @property
    def sums(self) -> torch.Tensor:
        return self.per_token.detach().sum(1)

    @property
    def tokens(self) -> torch.Tensor:
        return self.completion_mask[:, 1:].sum(1)

    def rows(self, index: list[int]) -> Sequences:
        return Sequences(self.input_ids[index], self.completion_mask[index], self.per_token.detach()[index])


def make_sequences(rows: int, gen: torch.Generator, first_id: int = 0) -> Sequences:
    prompt = torch.randint(1, 5, (rows,), generator=gen)
    answer = torch.randint(1, 9, (rows,), generator=gen)
    length = int((prompt + answer).max())
    mask = torch.zeros(rows, length, dtype=torch.int64)
    for i, (p, a) in enumerate(zip(prompt.tolist(), answer.tolist())):
        mask[i, p:p + a] = 1
    # distinct ids per batch: the stand-in model tells the KL sequences from the answers by them
    input_ids = torch.arange(first_id, first_id + rows * length).view(rows, length)
    per_token = -4 * torch.rand(rows, length - 1, generator=gen, dtype=DTYPE) * mask[:, 1:]
    return Sequences(input_ids, mask, per_token.requires_grad_())


class StandInModel:
    """What TRL's trainers call with `fused_lm_head=True`: the per-token log-probabilities of the matching input."""
    training = True

    def __init__(self, *sequences: Sequences):
        self.sequences = sequences

    def __call__(self, input_ids, labels, fused_lm_head, **_):
        seq = next(s for s in self.sequences
                   if s.input_ids.shape == input_ids.shape and torch.equal(s.input_ids, input_ids))
        assert fused_lm_head and torch.equal(labels != -100, seq.completion_mask.bool()), "TRL masks what we think"
        zeros = torch.zeros_like(seq.per_token, requires_grad=False)
        return SimpleNamespace(log_probs=seq.per_token, entropy=zeros, mean_logits=zeros, is_top1=zeros.bool())


class OneProcess:
    """The accelerator of a single process: gathering returns what it is given."""
    device = torch.device("cpu")

    def gather(self, tensor):
        return tensor

    gather_for_metrics = gather


def metrics_of(trainer) -> dict[str, float]:
    """The last value of each metric TRL recorded; a metric it skipped (an empty side) is absent."""
    return {key: values[-1] for key, values in trainer._metrics["train"].items() if values}


def trl_dpo(trl, loss_type: str, beta: float, seqs: Sequences, ref_chosen, ref_rejected):
    """TRL's DPOTrainer._compute_loss (trl/trainer/dpo_trainer.py:1285) with precomputed reference log-probs."""
    model = StandInModel(seqs)
    trainer = SimpleNamespace(
        model=model, accelerator=OneProcess(), beta=beta, loss_types=[loss_type], loss_weights=[1.0],
        label_smoothing=0.0, f_divergence_type="reverse_kl", ld_alpha=None, use_weighting=False,
        precompute_ref_logps=True, aux_loss_enabled=False, _metrics=defaultdict(lambda: defaultdict(list)),
        _total_train_tokens=0, _tp_size=1,
    )
    inputs = {"input_ids": seqs.input_ids, "attention_mask": torch.ones_like(seqs.input_ids),
              "completion_mask": seqs.completion_mask,
              "ref_chosen_logps": ref_chosen, "ref_rejected_logps": ref_rejected}
    loss = trl.DPOTrainer._compute_loss(trainer, model, inputs, return_outputs=False)
    return loss, metrics_of(trainer)


def trl_kto(trl, beta: float, weights: tuple[float, float], seqs: Sequences, kl_seqs: Sequences, desirable,
            ref_logps, ref_kl_logps):
    """TRL's KTOTrainer._compute_loss (trl/trainer/kto_trainer.py:1370) with precomputed reference log-probs; the KL
    sequences go through its own `_compute_kl_logps` (same file, line 1337)."""
    model = StandInModel(seqs, kl_seqs)
    trainer = SimpleNamespace(
        model=model, accelerator=OneProcess(), beta=beta, loss_type="kto", desirable_weight=weights[0],
        undesirable_weight=weights[1], calculate_KL=True, precompute_ref_logps=True, aux_loss_enabled=False,
        _metrics=defaultdict(lambda: defaultdict(list)), _total_train_tokens=0, _tp_size=1,
    )
    trainer._compute_kl_logps = types.MethodType(trl.KTOTrainer._compute_kl_logps, trainer)
    batch = {"input_ids": seqs.input_ids, "attention_mask": torch.ones_like(seqs.input_ids),
             "completion_mask": seqs.completion_mask, "label": desirable,
             "KL_input_ids": kl_seqs.input_ids, "KL_attention_mask": torch.ones_like(kl_seqs.input_ids),
             "KL_completion_mask": kl_seqs.completion_mask, "ref_logps": ref_logps, "ref_KL_logps": ref_kl_logps}
    loss = trl.KTOTrainer._compute_loss(trainer, model, batch, return_outputs=False)
    return loss, metrics_of(trainer)


def assert_metrics_match(ours: PreferenceLoss, theirs: dict[str, float]) -> None:
    """Our helpers give the live view what TRL logs under these names (None where TRL logs nothing)."""
    pairs = {"rewards/chosen": ours.chosen_reward_mean, "rewards/rejected": ours.rejected_reward_mean,
             "rewards/margins": ours.reward_margin, "logps/chosen": ours.chosen_logps_mean,
             "logps/rejected": ours.rejected_logps_mean}
    if ours.paired:
        pairs["rewards/accuracies"] = ours.reward_accuracy
    for key, value in pairs.items():
        assert value == (None if key not in theirs else pytest.approx(theirs[key], rel=1e-9, abs=1e-12)), key


# --- DPO and IPO: TRL's DPOTrainer ---------------------------------------------------------------------------------
@pytest.mark.parametrize("loss_type,beta,seed", [
    ("sigmoid", 0.1, 0),  # DPOConfig's default beta
    ("sigmoid", 0.5, 1),
    ("sigmoid", 1e-3, 2),  # nearly no pull: every loss near log 2
    ("sigmoid", 50.0, 3),  # saturated: log-sigmoid of large negatives must stay exact
    ("ipo", 0.1, 4),
    ("ipo", 0.5, 5),
    ("ipo", 1e-2, 6),  # margin target 50 per token: large squares
    ("ipo", 50.0, 7),
])
def test_dpo_and_ipo_equal_trls_dpo_trainer(trl, loss_type, beta, seed):
    gen = torch.Generator().manual_seed(seed)
    seqs = make_sequences(2 * PAIRS, gen)  # TRL's batch: the chosen rows, then the rejected rows
    ref = seqs.sums + 3 * torch.randn(2 * PAIRS, generator=gen, dtype=DTYPE)
    trl_loss, trl_metrics = trl_dpo(trl, loss_type, beta, seqs, ref[:PAIRS], ref[PAIRS:])
    trl_loss.backward()

    policy = seqs.sums.requires_grad_()
    ref_leaf = ref.clone().requires_grad_()
    if loss_type == "sigmoid":
        ours = dpo(policy[:PAIRS], policy[PAIRS:], ref_leaf[:PAIRS], ref_leaf[PAIRS:], beta)
    else:
        ours = ipo(policy[:PAIRS], policy[PAIRS:], ref_leaf[:PAIRS], ref_leaf[PAIRS:],
                   seqs.tokens[:PAIRS], seqs.tokens[PAIRS:], beta)
    assert_close(ours.loss, trl_loss.detach())
    assert_metrics_match(ours, trl_metrics)

    # the gradient each sequence's summed log-prob receives is TRL's, and none reaches the reference
    ours.loss.backward()
    assert_close(seqs.per_token.grad, policy.grad[:, None].expand_as(seqs.per_token))
    assert ref_leaf.grad is None

    # pair by pair: TRL on a batch of that pair alone
    for i in range(PAIRS):
        one = seqs.rows([i, PAIRS + i])
        pair_loss, _ = trl_dpo(trl, loss_type, beta, one, ref[i:i + 1], ref[PAIRS + i:PAIRS + i + 1])
        assert_close(ours.losses[i], pair_loss.detach())


# --- SimPO: TRL's experimental CPOTrainer ----------------------------------------------------------------------------
@pytest.mark.parametrize("beta,gamma,seed", [
    (2.0, 1.0, 0),  # the SimPO paper's range
    (0.1, 0.5, 1),  # CPOConfig's defaults
    (10.0, 0.0, 2),  # no margin target
    (1e-3, 0.5, 3),
])
def test_simpo_equals_trls_cpo_loss(trl, beta, gamma, seed):
    gen = torch.Generator().manual_seed(seed)
    seqs = make_sequences(2 * PAIRS, gen)
    vocab = 11
    logits = torch.randn(*seqs.input_ids.shape, vocab, generator=gen, dtype=DTYPE)
    labels = torch.randint(0, vocab, seqs.input_ids.shape, generator=gen).masked_fill(seqs.completion_mask == 0, -100)
    # TRL's own per-sequence log-probs: CPOTrainer.get_batch_logps averages them for "simpo" (cpo_trainer.py:850)
    means = trl.CPOTrainer.get_batch_logps(logits, labels, average_log_prob=True).requires_grad_()
    sums = trl.CPOTrainer.get_batch_logps(logits, labels, average_log_prob=False).requires_grad_()
    tokens = (labels[:, 1:] != -100).sum(-1)
    assert torch.equal(tokens, seqs.tokens)

    trainer = SimpleNamespace(alpha=0.0, beta=beta, simpo_gamma=gamma, loss_type="simpo", label_smoothing=0.0,
                              accelerator=OneProcess())
    trl_losses, trl_chosen, trl_rejected = trl.CPOTrainer.cpo_loss(trainer, means[:PAIRS], means[PAIRS:])
    ours = simpo(sums[:PAIRS], sums[PAIRS:], tokens[:PAIRS], tokens[PAIRS:], beta, gamma)

    assert_close(ours.losses, trl_losses.detach())
    assert_close(ours.chosen_rewards, trl_chosen)
    assert_close(ours.rejected_rewards, trl_rejected)
    assert_close(ours.chosen_logps, means[:PAIRS].detach())  # what CPOTrainer logs as logps/chosen
    assert ours.reward_accuracy == pytest.approx((trl_chosen > trl_rejected).float().mean().item())

    trl_losses.mean().backward()
    ours.loss.backward()
    assert_close(sums.grad * tokens, means.grad)  # d/d(sum) = d/d(mean) / tokens


# --- KTO: TRL's KTOTrainer -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("labels,beta,weights,kl_shift,seed", [
    ("+-+--+", 0.1, (1.0, 1.0), -2.0, 0),  # KTOConfig's defaults, a positive KL estimate
    ("++-+-+", 0.5, (1.33, 1.0), -2.0, 1),  # more desirable rows weighted up, within TRL's advised range
    ("+-+--+", 0.1, (1.0, 1.0), 20.0, 2),  # the estimate is negative: clamped at 0
    ("++++++", 0.1, (1.0, 1.0), -2.0, 3),  # only desirable rows: no rejected metrics, no margin
    ("------", 0.1, (1.0, 0.75), -2.0, 4),  # only undesirable rows
    ("+--+-+", 50.0, (1.0, 1.0), -2.0, 5),  # saturated sigmoids
])
def test_kto_equals_trls_kto_trainer(trl, labels, beta, weights, kl_shift, seed):
    gen = torch.Generator().manual_seed(seed)
    rows = len(labels)
    desirable = torch.tensor([c == "+" for c in labels])
    seqs = make_sequences(rows, gen)
    kl_seqs = make_sequences(rows, gen, first_id=10_000)  # the mismatched (prompt, answer) pairs
    ref = seqs.sums + 3 * torch.randn(rows, generator=gen, dtype=DTYPE)
    ref_kl = kl_seqs.sums + torch.randn(rows, generator=gen, dtype=DTYPE) + kl_shift
    trl_loss, trl_metrics = trl_kto(trl, beta, weights, seqs, kl_seqs, desirable, ref, ref_kl)
    trl_loss.backward()

    policy = seqs.sums.requires_grad_()
    policy_kl = kl_seqs.sums.requires_grad_()
    ref_leaf = ref.clone().requires_grad_()
    estimate = kto_kl_estimate(policy_kl, ref_kl)
    assert not estimate.requires_grad  # no graph kept alive while processes average it
    ours = kto(policy, ref_leaf, desirable, estimate, beta, *weights)
    assert_close(ours.loss, trl_loss.detach())
    assert ours.kl.item() == pytest.approx(trl_metrics["kl"], rel=1e-12, abs=0)
    assert (ours.kl.item() == 0) == (kl_shift > 0)
    assert ours.reward_accuracy is None
    assert_metrics_match(ours, trl_metrics)

    ours.loss.backward()
    assert_close(seqs.per_token.grad, policy.grad[:, None].expand_as(seqs.per_token))
    assert ref_leaf.grad is None and policy_kl.grad is None  # TRL runs the KL sequences under no_grad
    assert kl_seqs.per_token.grad is None

    # row by row: TRL on that row alone, with the same KL sequences (hence the same estimate)
    for i in range(rows):
        row_loss, _ = trl_kto(trl, beta, weights, seqs.rows([i]), kl_seqs.rows(list(range(rows))), desirable[i:i + 1],
                              ref[i:i + 1], ref_kl)
        assert_close(ours.losses[i], row_loss.detach())


def test_mismatched_answers_shift_by_one_as_trl_does():
    # TRL builds the KL answers in KTOTrainer._prepare_dataset (trl/trainer/kto_trainer.py:1150), a nested function
    # that cannot be called alone: KL_completion_ids = [completion_ids[-1]] + completion_ids[:-1], per batch
    answers = ["a", "b", "c", "d"]
    assert [answers[j] for j in mismatched_answers(4)] == [answers[-1]] + answers[:-1]
    assert all(j != i for i, j in enumerate(mismatched_answers(2)))
    with pytest.raises(ValueError, match="rows=1"):
        mismatched_answers(1)


# --- the live view's helpers --------------------------------------------------------------------------------------
@pytest.mark.parametrize("chosen,rejected,paired,accuracy,margin", [
    ([1.0, 0.0, 2.0], [0.0, 0.0, 3.0], True, 1 / 3, 0.0),  # a tie counts as wrong, as in TRL
    ([0.5, 0.5], [-0.5, -1.5], True, 1.0, 1.5),
    ([0.0, 0.0], [0.0, 0.0], True, 0.0, 0.0),  # the first step: policy == reference, accuracy 0 (not 0.5)
    ([1.0, 2.0], [0.0], False, None, 1.5),  # KTO rows: no pairs, the margin of the two means
    ([1.0, 2.0], [], False, None, None),  # a KTO micro-batch with desirable rows only
])
def test_reward_accuracy_and_margin(chosen, rejected, paired, accuracy, margin):
    c, r = torch.tensor(chosen), torch.tensor(rejected)
    result = PreferenceLoss(torch.zeros(len(chosen)), c, r, c, r, paired=paired)
    assert result.reward_accuracy == (None if accuracy is None else pytest.approx(accuracy))
    assert result.reward_margin == (None if margin is None else pytest.approx(margin))
    assert result.chosen_reward_mean == pytest.approx(sum(chosen) / len(chosen))
    assert result.rejected_reward_mean == (pytest.approx(sum(rejected) / len(rejected)) if rejected else None)


def test_a_policy_equal_to_its_reference_starts_from_each_losss_known_value():
    """At the first step of a LoRA run the policy is its reference: rewards 0, and each loss at its textbook start."""
    logps = torch.tensor([-12.0, -30.0, -7.5])
    tokens = torch.tensor([4, 10, 3])
    beta = 0.1
    assert_close(dpo(logps, logps, logps, logps, beta).losses, torch.full((3,), math.log(2)))
    assert_close(ipo(logps, logps, logps, logps, tokens, tokens, beta).losses, torch.full((3,), (1 / (2 * beta)) ** 2))
    start = kto(logps, logps, torch.tensor([True, False, True]), 0.0, beta, desirable_weight=2.0)
    assert_close(start.losses, torch.tensor([1.0, 0.5, 1.0]))  # weight * (1 - sigmoid(0))
    assert dpo(logps, logps, logps, logps, beta).reward_accuracy == 0.0


# --- beta and shapes -----------------------------------------------------------------------------------------------
def every_loss(beta: float, policy_c, policy_r, ref_c, ref_r, tokens) -> list[PreferenceLoss]:
    both = torch.cat([policy_c, policy_r])
    return [
        dpo(policy_c, policy_r, ref_c, ref_r, beta),
        ipo(policy_c, policy_r, ref_c, ref_r, tokens, tokens, beta),
        simpo(policy_c, policy_r, tokens, tokens, beta, gamma=0.5),
        kto(both, torch.cat([ref_c, ref_r]), torch.arange(len(both)) % 2 == 0, 1.5, beta),
    ]


@pytest.mark.parametrize("beta", [0.0, -0.1, float("nan")])
def test_beta_must_be_positive(beta):
    x = torch.tensor([-3.0, -4.0])
    with pytest.raises(ValueError, match="beta="):
        every_loss(beta, x, x, x, x, torch.tensor([2, 2]))
    for call in (lambda: dpo(x, x, x, x, beta), lambda: ipo(x, x, x, x, x, x, beta),
                 lambda: simpo(x, x, x, x, beta, 0.5), lambda: kto(x, x, x > -3.5, 0.0, beta)):
        with pytest.raises(ValueError, match="beta="):
            call()


@pytest.mark.parametrize("beta", [1e-6, 1e4])
def test_extreme_betas_keep_losses_and_gradients_finite(beta):
    """float32, as training computes them: wide margins at a huge beta, a huge IPO target at a tiny one."""
    gen = torch.Generator().manual_seed(0)
    policy_c = (-200 * torch.rand(PAIRS, generator=gen)).requires_grad_()
    policy_r = (-200 * torch.rand(PAIRS, generator=gen)).requires_grad_()
    ref_c, ref_r = -200 * torch.rand(PAIRS, generator=gen), -200 * torch.rand(PAIRS, generator=gen)
    tokens = torch.randint(1, 50, (PAIRS,), generator=gen)
    for result in every_loss(beta, policy_c, policy_r, ref_c, ref_r, tokens):
        policy_c.grad = policy_r.grad = None
        result.loss.backward()
        assert torch.isfinite(result.losses).all()
        assert torch.isfinite(policy_c.grad).all() and torch.isfinite(policy_r.grad).all()


@pytest.mark.parametrize("call", [
    lambda: dpo(torch.zeros(3), torch.zeros(3), torch.zeros(3, 1), torch.zeros(3), 0.1),  # would broadcast to 3x3
    lambda: dpo(torch.zeros(3), torch.zeros(2), torch.zeros(3), torch.zeros(3), 0.1),
    lambda: ipo(*[torch.zeros(3)] * 4, torch.ones(2), torch.ones(3), 0.1),
    lambda: simpo(torch.zeros(3), torch.zeros(3), torch.ones(3), torch.ones(4), 2.0, 0.5),
    lambda: kto(torch.zeros(3), torch.zeros(3), torch.ones(3), 0.0, 0.1),  # desirable must be bool
    lambda: kto_kl_estimate(torch.zeros(3), torch.zeros(2)),
])
def test_mismatched_inputs_are_refused(call):
    with pytest.raises(ValueError):
        call()
