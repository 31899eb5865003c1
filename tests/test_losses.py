"""The losses and their numerics: G-OPD theory (tabular bandit), vocab-parallel log-probs / entropy / KL (TP=1 here,
TP=2 under torchrun), the policy loss and its aggregation, and an objective's loss and metrics by hand."""

from __future__ import annotations

import math

import pytest
import torch

from megatron_gopd.algo.logprobs import full_vocab_gopd_kl, token_logprobs_and_entropy
from megatron_gopd.algo.losses import PolicyLossConfig, aggregate_loss, gopd_advantages, loss_denominator, policy_loss
from megatron_gopd.metrics import Stat, merge_metrics, reduce_metrics, response_metrics
from tests.conftest import run_torchrun

# ---------------------------------------------------------------------------------------------------------------
# Theory: a single-step bandit with K actions and a softmax policy, exact expectations.
# ---------------------------------------------------------------------------------------------------------------
K = 8
LAMBDAS = [0.5, 1.0, 1.25, 2.0]


def _bandit():
    gen = torch.Generator().manual_seed(0)
    log_teacher = torch.log_softmax(torch.randn(K, generator=gen), -1)
    log_ref = torch.log_softmax(torch.randn(K, generator=gen), -1)
    return log_teacher, log_ref


def _tv(logits: torch.Tensor, target: torch.Tensor) -> float:
    return 0.5 * (torch.softmax(logits.detach().reshape(K), -1) - target).abs().sum().item()


def _sampled_gopd_loss(theta: torch.Tensor, lam: float, log_teacher, log_ref) -> torch.Tensor:
    """The trainer's sampled-token path made exact: all K actions form a batch of K length-1 sequences, as if the
    rollout engine had sampled them uniformly (rollout log-prob log 1/K); the untruncated IS weight
    pi_old / (1/K) then turns the mean over the batch into the on-policy expectation."""
    actions = torch.arange(K).view(K, 1)
    logprobs, _ = token_logprobs_and_entropy(theta.expand(K, 1, K), actions, vocab_size=K, with_entropy=False)
    old_lp = logprobs.detach()
    # lam == 1 takes the trainer's path for a student-init reference: no reference forward at all.
    ref_lp = None if lam == 1.0 else log_ref[actions]
    advantages = gopd_advantages(log_teacher[actions], old_lp, ref_lp, lam)
    cfg = PolicyLossConfig(tis_cap=math.inf)  # paper defaults otherwise: clip 0.2, seq-mean-token-mean
    loss, _ = policy_loss(
        logprobs, old_lp, advantages, torch.ones(K, 1), cfg, rollout_lp=torch.full((K, 1), -math.log(K))
    )
    return loss


def _full_vocab_loss(theta: torch.Tensor, lam: float, log_teacher, log_ref) -> torch.Tensor:
    ref = None if lam == 1.0 else log_ref.view(1, 1, K)
    return full_vocab_gopd_kl(theta.view(1, 1, K), log_teacher.view(1, 1, K), ref, lam, vocab_size=K).sum()


@pytest.mark.parametrize("lam", LAMBDAS)
@pytest.mark.parametrize("loss_fn", [_sampled_gopd_loss, _full_vocab_loss], ids=["sampled", "full_vocab"])
def test_tabular_gopd_converges_to_geometric_mixture(lam, loss_fn):
    log_teacher, log_ref = _bandit()
    target = torch.softmax(lam * log_teacher + (1 - lam) * log_ref, -1)
    theta = torch.zeros(K, requires_grad=True)
    assert _tv(theta, target) > 0.1  # the start is far from the optimum
    opt = torch.optim.SGD([theta], lr=2.0)
    for _ in range(600):  # lam=2, the slowest, is within 1e-3 after ~300 steps
        opt.zero_grad()
        loss_fn(theta, lam, log_teacher, log_ref).backward()
        opt.step()
    assert _tv(theta, target) < 1e-3
    if lam != 1.0:  # the optimum is not the teacher (for lam > 1: beyond it)
        assert _tv(theta, log_teacher.exp()) > 0.05


@pytest.mark.parametrize("lam", LAMBDAS)
def test_sampled_and_full_vocab_gradients_coincide_on_policy(lam):
    """With exact expectations and ratio 1, -E_pi[A grad log pi] is exactly grad KL(pi || pi_lam)."""
    log_teacher, log_ref = _bandit()
    theta = torch.randn(K, generator=torch.Generator().manual_seed(1)).requires_grad_()
    (g_sampled,) = torch.autograd.grad(_sampled_gopd_loss(theta, lam, log_teacher, log_ref), theta)
    (g_full,) = torch.autograd.grad(_full_vocab_loss(theta, lam, log_teacher, log_ref), theta)
    assert g_full.abs().max() > 1e-2
    torch.testing.assert_close(g_sampled, g_full, atol=1e-6, rtol=0)


# ---------------------------------------------------------------------------------------------------------------
# Vocab-parallel numerics.
# ---------------------------------------------------------------------------------------------------------------
def test_tp2_matches_plain_log_softmax(tmp_path):
    r = run_torchrun("algo_tp.py", 2, tmp_path=tmp_path)
    for name in ("lp_v250", "lp_v100", "lp_v250_no_entropy"):
        case = r[name]
        assert case["lp"] < 1e-5 and case["grad"] < 1e-5, (name, case)
        assert case["grad_dtype"] == "torch.float32" and case["grad_padding_absmax"] == 0.0
        assert case["ranks_agree"] == 0.0
    assert r["lp_v250"]["entropy"] < 1e-5 and r["lp_v100"]["entropy"] < 1e-5
    assert r["lp_v250_no_entropy"]["entropy_is_none"]
    bf16 = r["lp_v250_bf16"]  # compute is fp32 on the bf16 values; the gradient is rounded to bf16
    assert bf16["lp"] < 1e-5 and bf16["entropy"] < 1e-5 and bf16["grad_dtype"] == "torch.bfloat16"
    assert bf16["grad_rel"] < 2.0e-3  # one bf16 rounding (relative 2^-9) and no more
    for name in ("kl_lam1.25", "kl_lam0.5_v100", "kl_lam1_noref"):
        case = r[name]
        assert case["kl"] < 1e-5 and case["grad"] < 1e-5 and case["kl_min_ref"] > 0.1, (name, case)
        assert case["grad_padding_absmax"] == 0.0 and case["ranks_agree"] == 0.0
    m = r["metrics"]
    assert m["mean_err"] < 1e-9 and m["max_err"] < 1e-9
    assert m["local_mean_gap"] > 0.5 and m["local_max_gap"] > 0.5  # without the all-reduce the test would fail


@pytest.mark.parametrize("chunk_tokens", [1, 5, None])
@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_tp1_logprobs_entropy_and_grads(chunk_tokens, temperature):
    gen = torch.Generator().manual_seed(0)
    vocab, padded = 45, 48
    # Megatron-like [seq, batch, V] transposed to [batch, seq, V]: a non-contiguous input.
    full = (torch.randn(7, 3, padded, generator=gen) * 3).transpose(0, 1)
    targets = torch.randint(0, vocab, (3, 7), generator=gen)
    g_lp, g_h = torch.randn(3, 7, generator=gen), torch.randn(3, 7, generator=gen)

    logits = full.clone().requires_grad_()
    lp, ent = token_logprobs_and_entropy(
        logits, targets, vocab_size=vocab, temperature=temperature, chunk_tokens=chunk_tokens
    )
    ((lp * g_lp).sum() + (ent * g_h).sum()).backward()

    ref_leaf = full.double().requires_grad_()
    logp = torch.log_softmax(ref_leaf[..., :vocab] / temperature, -1)
    lp_ref, ent_ref = logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1), -(logp.exp() * logp).sum(-1)
    ((lp_ref * g_lp).sum() + (ent_ref * g_h).sum()).backward()

    assert lp.dtype == ent.dtype == torch.float32 and lp.shape == ent.shape == (3, 7)
    torch.testing.assert_close(lp.double(), lp_ref.detach(), atol=1e-5, rtol=0)
    torch.testing.assert_close(ent.double(), ent_ref.detach(), atol=1e-5, rtol=0)
    torch.testing.assert_close(logits.grad.double(), ref_leaf.grad, atol=1e-5, rtol=0)
    assert logits.grad[..., vocab:].abs().max() == 0


def test_full_vocab_kl_is_zero_at_its_target():
    """lam = 1 with student == teacher: KL 0 and zero gradient; any other lam: the geometric mixture is the target."""
    gen = torch.Generator().manual_seed(0)
    teacher, ref = torch.randn(2, 3, 16, generator=gen), torch.randn(2, 3, 16, generator=gen)
    student = teacher.clone().requires_grad_()
    kl = full_vocab_gopd_kl(student, teacher, None, 1.0, vocab_size=16, temperature=0.8)
    kl.sum().backward()
    assert kl.abs().max() < 1e-6 and student.grad.abs().max() < 1e-6
    lam, temp = 1.25, 0.8
    mixture = (lam * torch.log_softmax(teacher / temp, -1) + (1 - lam) * torch.log_softmax(ref / temp, -1)) * temp
    kl = full_vocab_gopd_kl(mixture, teacher, ref, lam, vocab_size=16, temperature=temp)
    assert kl.abs().max() < 1e-5
    assert full_vocab_gopd_kl(teacher, teacher, ref, lam, vocab_size=16, temperature=temp).min() > 1e-3


def test_bad_inputs_raise_clear_errors():
    logits, targets = torch.randn(2, 3, 8), torch.zeros(2, 3, dtype=torch.long)
    with pytest.raises(ValueError, match="vocab_size=9"):
        token_logprobs_and_entropy(logits, targets, vocab_size=9)
    with pytest.raises(ValueError, match="targets must be token ids"):
        token_logprobs_and_entropy(logits, targets.fill_(-100), vocab_size=8)
    with pytest.raises(ValueError, match="temperature"):
        token_logprobs_and_entropy(logits, targets.fill_(0), vocab_size=8, temperature=0.0)
    with pytest.raises(ValueError, match="lam=1.25"):
        full_vocab_gopd_kl(logits, logits, None, 1.25, vocab_size=8)
    lp = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="ref_lp is None but lam=0.5"):
        gopd_advantages(lp, lp, None, 0.5)
    with pytest.raises(ValueError, match="share one"):
        gopd_advantages(lp, torch.zeros(2, 4), lp, 0.5)
    for field, value in [("clip_low", 1.0), ("clip_high", -0.1), ("dual_clip", 1.0), ("tis_cap", 0.0),
                         ("aggregation", "seq-sum")]:
        with pytest.raises(ValueError, match=field):
            PolicyLossConfig(**{field: value})
    with pytest.raises(ValueError, match="rollout_lp is None"):
        policy_loss(lp, lp, lp, torch.ones(2, 3), PolicyLossConfig())


# ---------------------------------------------------------------------------------------------------------------
# Hand-computed cases.
# ---------------------------------------------------------------------------------------------------------------
def test_advantages_by_hand():
    teacher, old, ref = torch.tensor([[-1.0, -2.0]]), torch.tensor([[-1.5, -0.5]]), torch.tensor([[-3.0, -1.0]])
    opd = teacher - old  # lam = 1: log pi_T - log pi_old, with or without a reference
    assert torch.equal(gopd_advantages(teacher, old, None, 1.0), opd)
    torch.testing.assert_close(gopd_advantages(teacher, old, ref, 1.0), opd)
    # lam = 0.5: 0.5*(T - R) - (O - R) -> [0.5*2 - 1.5, 0.5*(-1) - 0.5]
    torch.testing.assert_close(gopd_advantages(teacher, old, ref, 0.5), torch.tensor([[-0.5, -1.0]]))
    # lam = 1.25: [1.25*2 - 1.5, 1.25*(-1) - 0.5]
    torch.testing.assert_close(gopd_advantages(teacher, old, ref, 1.25), torch.tensor([[1.0, -1.75]]))
    assert not gopd_advantages(teacher.requires_grad_(), old, ref, 1.25).requires_grad


def _loss_and_token_grads(ratios, advantages, cfg, rollout_lp=None):
    old = torch.full((1, len(ratios)), -1.0)
    logprobs = (old + torch.tensor([ratios]).log()).requires_grad_()
    loss, metrics = policy_loss(
        logprobs, old, torch.tensor([advantages]), torch.ones(1, len(ratios)), cfg, rollout_lp=rollout_lp
    )
    loss.backward()
    return loss.item(), logprobs.grad[0] * len(ratios), reduce_metrics(metrics)


def test_ppo_clip_acts_at_its_bounds():
    ratios = [1.5, 0.5, 0.5, 1.5, 4.0, 1.1]
    adv = [1.0, 1.0, -1.0, -1.0, -1.0, 2.0]
    # per token: clipped at 1+0.3 | unclipped (pessimistic) | clipped at 1-0.2 | unclipped | dual: min(4, 3) | inside
    per_token = [-1.3, -0.5, 0.8, 1.5, 3.0, -2.2]
    grads = [0.0, -0.5, 0.0, 1.5, 0.0, -2.2]  # d(-A r)/d log pi = -A r where unclipped, else 0
    cfg = PolicyLossConfig(clip_low=0.2, clip_high=0.3, dual_clip=3.0, tis_cap=None, aggregation="token-mean")
    loss, grad, m = _loss_and_token_grads(ratios, adv, cfg)
    assert loss == pytest.approx(sum(per_token) / 6, abs=1e-6)
    torch.testing.assert_close(grad, torch.tensor(grads), atol=1e-6, rtol=0)
    assert m["actor/pg_clip_frac"] == pytest.approx(2 / 6) and m["actor/dual_clip_frac"] == pytest.approx(1 / 6)
    no_dual = PolicyLossConfig(clip_low=0.2, clip_high=0.3, tis_cap=None, aggregation="token-mean")
    loss, _, m = _loss_and_token_grads(ratios, adv, no_dual)
    assert loss == pytest.approx((sum(per_token) - 3.0 + 4.0) / 6, abs=1e-6) and "actor/dual_clip_frac" not in m


def test_truncated_importance_weight_acts_at_its_cap():
    raw = torch.tensor([10.0, 2.0, 0.5])
    rollout_lp = torch.full((1, 3), -1.0) - raw.log()  # pi_old / pi_rollout = raw
    cfg = PolicyLossConfig(tis_cap=5.0, aggregation="token-mean")
    loss, grad, m = _loss_and_token_grads([1.0, 1.0, 1.0], [1.0, 1.0, 1.0], cfg, rollout_lp=rollout_lp)
    assert loss == pytest.approx(-(5.0 + 2.0 + 0.5) / 3, abs=1e-6)
    torch.testing.assert_close(grad, -torch.tensor([5.0, 2.0, 0.5]), atol=1e-5, rtol=0)
    assert m["tis/weight_mean"] == pytest.approx(7.5 / 3)
    assert m["tis/raw_weight_max"] == pytest.approx(10.0, rel=1e-5)
    assert m["tis/clipped_frac"] == pytest.approx(1 / 3)
    off = PolicyLossConfig(tis_cap=None, aggregation="token-mean")
    assert _loss_and_token_grads([1.0] * 3, [1.0] * 3, off, rollout_lp=rollout_lp)[0] == pytest.approx(-1.0)


# Two sequences (prompt token masked in the first) and one without any loss token; masked slots hold garbage.
PER_TOKEN = torch.tensor([[9.0, 1.0, 2.0, 3.0], [4.0, 5.0, math.inf, math.nan], [7.0, 7.0, 7.0, 7.0]])
MASK = torch.tensor([[0, 1, 1, 1], [1, 1, 0, 0], [0, 0, 0, 0]])


@pytest.mark.parametrize(
    "aggregation, expected, denominator",
    [
        ("token-mean", (1 + 2 + 3 + 4 + 5) / 5, 5),
        ("seq-mean-token-mean", (2.0 + 4.5) / 2, 2),  # per-sequence means 2 and 4.5
        ("seq-mean-token-sum", (6.0 + 9.0) / 2, 2),
    ],
)
def test_aggregation_modes(aggregation, expected, denominator):
    assert loss_denominator(MASK, aggregation) == denominator
    assert aggregate_loss(PER_TOKEN, MASK, aggregation).item() == pytest.approx(expected)
    # Micro-batches with the global denominator sum to the whole-batch aggregate.
    parts = [(PER_TOKEN[:1], MASK[:1]), (PER_TOKEN[1:], MASK[1:])]
    total = sum(loss_denominator(m, aggregation) for _, m in parts)
    assert sum(aggregate_loss(t, m, aggregation, total).item() for t, m in parts) == pytest.approx(expected)


def test_policy_loss_ignores_garbage_at_masked_positions():
    logprobs = torch.tensor([[50.0, -1.0], [-1.0, math.nan]], requires_grad=True)
    old = torch.tensor([[-50.0, -1.0], [-1.0, -1.0]])
    adv = torch.tensor([[math.inf, 1.0], [2.0, math.nan]])
    mask = torch.tensor([[0, 1], [1, 0]])
    rollout_lp = old - 100 * mask.logical_not()  # an absurd IS weight, but only at the masked positions
    loss, _ = policy_loss(logprobs, old, adv, mask, PolicyLossConfig(tis_cap=5.0), rollout_lp=rollout_lp)
    loss.backward()
    assert loss.item() == pytest.approx(-(1.0 + 2.0) / 2)
    assert torch.isfinite(logprobs.grad).all() and logprobs.grad[0, 0] == 0 and logprobs.grad[1, 1] == 0


def test_gopd_objective_loss_and_metrics_by_hand():
    """G-OPD's loss of one micro-batch of two rows (math's, then code's), pi_old = the update's own forward."""
    from megatron_gopd.algo.objectives import GOPD
    from megatron_gopd.batching import Batching, assemble
    from megatron_gopd.config import AlgoConfig, RunConfig, TeacherConfig

    cfg = RunConfig(teachers=[TeacherConfig(name="math", path="m", domains=["math"]),
                              TeacherConfig(name="code", path="c", domains=["code"])],
                    algo=AlgoConfig(lam=1.25, tis_cap=None, aggregation="token-mean"))
    objective = GOPD(cfg, parts=None)
    mask = torch.tensor([[0.0, 1, 1], [1, 0, 0]])
    teacher = torch.tensor([[0.0, -1.0, -2.0], [-3.0, 0.0, 0.0]])
    old = torch.tensor([[0.0, -2.0, -1.0], [-1.0, 0.0, 0.0]])
    ref = torch.tensor([[0.0, -4.0, -4.0], [-4.0, 0.0, 0.0]])
    entropy = torch.tensor([[9.0, 1.0, 2.0], [3.0, 9.0, 9.0]])
    mb = assemble([[5, 6, 7], [8, 9, 10]], Batching(2), per_token={
        "loss_mask": list(mask), "teacher_lp": list(teacher), "ref_lp": list(ref), "rollout_lp": list(old)})
    mb["teacher_index"] = torch.tensor([0, 1])
    lp = old.clone().requires_grad_(True)
    loss, metrics = objective.loss(mb, lp, entropy, None, denominator=3.0)
    m = reduce_metrics(metrics)
    adv = gopd_advantages(teacher, old, ref, 1.25)
    assert loss.item() == pytest.approx(-adv[mask.bool()].sum().item() / 3)  # ratio 1: -A summed over 3 tokens
    loss.backward()
    assert torch.allclose(lp.grad, -adv * mask / 3)
    assert m["gopd/reward"] == pytest.approx((3 + 2 + 1) / 3)  # T - R on the 3 loss tokens
    assert m["gopd/kl_teacher"] == pytest.approx((-1 + 1 + 2) / 3)  # O - T
    assert m["gopd/kl_ref"] == pytest.approx((2 + 3 + 3) / 3)  # O - R
    assert m["gopd/advantage"] == pytest.approx(adv[mask.bool()].mean().item())
    assert m["actor/entropy"] == pytest.approx(2.0)
    assert (m["teacher/math/kl"], m["teacher/code/kl"]) == pytest.approx(((-1 + 1) / 2, 2.0))
    assert (m["teacher/math/samples"], m["teacher/code/samples"]) == (1, 1)
    assert m["mismatch/abs_max"] == 0.0


def test_response_metrics_merge_across_micro_batches_and_ranks():
    first, second = response_metrics([2, 1], ["length", "stop"]), response_metrics([3], ["stop"])
    m = reduce_metrics(first)
    assert m["rollout/response_length"] == pytest.approx(1.5) and m["rollout/response_length_max"] == 2
    assert m["rollout/truncated_frac"] == pytest.approx(0.5)
    merged = reduce_metrics(merge_metrics(first, second))
    assert merged["rollout/response_length"] == pytest.approx(2.0) and merged["rollout/response_length_max"] == 3
    assert math.isnan(reduce_metrics({"empty": Stat.masked_mean(torch.ones(2), torch.zeros(2))})["empty"])
