"""G-OPD advantages, the clipped policy-gradient loss the paper trains with, loss aggregation and step metrics.

All per-token tensors are [batch, seq] (one row per sequence); `loss_mask` is 1 on response tokens that carry loss
and 0 on prompt and padding tokens. Values at masked positions are never read (they may be garbage or inf).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.distributed as dist

AGGREGATIONS = ("seq-mean-token-mean", "token-mean", "seq-mean-token-sum")


def gopd_advantages(
    teacher_lp: torch.Tensor, old_lp: torch.Tensor, ref_lp: torch.Tensor | None, lam: float
) -> torch.Tensor:
    """A_t = lam * (log pi_T - log pi_ref) - (log pi_old - log pi_ref), detached fp32 (no baseline, no whitening).

    0 < lam < 1 interpolates between reference and teacher, lam = 1 is OPD, lam > 1 extrapolates (ExOPD).
    The reference cancels at lam == 1, so `ref_lp` may be None only then (A_t = log pi_T - log pi_old), which lets
    the trainer skip the reference forward when the reference is the student's initial model.
    """
    if not math.isfinite(lam):
        raise ValueError(f"lam must be a finite number, got {lam}")
    _check_same_shape(teacher_lp=teacher_lp, old_lp=old_lp, ref_lp=ref_lp)
    advantages = lam * teacher_lp.detach().float() - old_lp.detach().float()
    if lam != 1.0:
        if ref_lp is None:
            raise ValueError(f"ref_lp is None but lam={lam}: the reference log-probs only cancel at lam == 1")
        advantages = advantages + (1.0 - lam) * ref_lp.detach().float()
    return advantages


@dataclass(frozen=True)
class PolicyLossConfig:
    """clip_low/clip_high: PPO ratio clip range [1 - clip_low, 1 + clip_high].
    dual_clip: None, or c > 1 bounding the loss of negative-advantage tokens at -c * A.
    tis_cap: truncated importance weight min(pi_old / pi_rollout, tis_cap); None turns the weight off,
        math.inf applies it untruncated.
    aggregation: one of AGGREGATIONS, see `aggregate_loss`."""

    clip_low: float = 0.2
    clip_high: float = 0.2
    dual_clip: float | None = None
    tis_cap: float | None = 5.0
    aggregation: str = "seq-mean-token-mean"

    def __post_init__(self):
        if not 0.0 <= self.clip_low < 1.0:
            raise ValueError(f"clip_low must be in [0, 1), got {self.clip_low}")
        if not self.clip_high >= 0.0:
            raise ValueError(f"clip_high must be >= 0, got {self.clip_high}")
        if self.dual_clip is not None and not self.dual_clip > 1.0:
            raise ValueError(f"dual_clip must be None or > 1, got {self.dual_clip}")
        if self.tis_cap is not None and not self.tis_cap > 0.0:
            raise ValueError(f"tis_cap must be None (off) or > 0, got {self.tis_cap}")
        if self.aggregation not in AGGREGATIONS:
            raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {self.aggregation!r}")


def loss_denominator(loss_mask: torch.Tensor, aggregation: str) -> float:
    """The local normaliser of `aggregate_loss`: the number of loss tokens for "token-mean", else the number of
    sequences (rows) with at least one loss token. Sum it over micro-batches and DP ranks for the global one."""
    _check_aggregation(aggregation)
    mask = loss_mask.bool()
    return float(mask.sum() if aggregation == "token-mean" else mask.any(-1).sum())


def aggregate_loss(
    per_token: torch.Tensor, loss_mask: torch.Tensor, aggregation: str, denominator: float | None = None
) -> torch.Tensor:
    """Reduces a [batch, seq] per-token loss to a scalar: numerator / denominator, where the numerator is

    - "token-mean": the sum of the loss over loss tokens;
    - "seq-mean-token-mean": the sum over sequences of each sequence's mean over its loss tokens (paper default);
    - "seq-mean-token-sum": the sum over sequences of each sequence's sum over its loss tokens;

    and `denominator` defaults to `loss_denominator(loss_mask, aggregation)` (tokens, resp. non-empty sequences).
    Passing the GLOBAL denominator (summed over all micro-batches and DP ranks of the step) makes the sum of the
    returned losses over micro-batches and DP ranks equal the aggregate over the whole step's batch. (A framework
    that averages over micro-batches or DP ranks must be compensated by the caller, e.g. by multiplying the loss by
    the number of micro-batches and by the DP size.)
    """
    _check_aggregation(aggregation)
    _check_same_shape(per_token=per_token, loss_mask=loss_mask)
    mask = loss_mask.bool()
    masked = torch.where(mask, per_token, 0.0)  # where, not multiply: masked positions may hold inf
    if aggregation == "seq-mean-token-mean":
        numerator = (masked.sum(-1) / mask.sum(-1).clamp(min=1)).sum()
    else:  # the two sums coincide; the modes differ in the denominator
        numerator = masked.sum()
    if denominator is None:
        denominator = max(loss_denominator(mask, aggregation), 1.0)  # an empty micro-batch contributes 0
    elif not denominator > 0:
        raise ValueError(f"denominator must be > 0, got {denominator}")
    return numerator / denominator


def policy_loss(
    logprobs: torch.Tensor,
    old_lp: torch.Tensor,
    advantages: torch.Tensor,
    loss_mask: torch.Tensor,
    cfg: PolicyLossConfig,
    rollout_lp: torch.Tensor | None = None,
    denominator: float | None = None,
) -> tuple[torch.Tensor, Metrics]:
    """PPO clipped-ratio policy-gradient loss with a truncated importance weight, aggregated per `cfg.aggregation`.

    Per token: max(-A r, -A clip(r, 1 - clip_low, 1 + clip_high)) with r = pi_theta / pi_old, bounded by -dual_clip*A
    for A < 0 when dual clip is on, times w = min(pi_old / pi_rollout, tis_cap) (detached; needs `rollout_lp`
    unless tis_cap is None). `denominator`: see `aggregate_loss`. Returns (scalar loss, local metric partials).
    """
    _check_same_shape(
        logprobs=logprobs, old_lp=old_lp, advantages=advantages, loss_mask=loss_mask, rollout_lp=rollout_lp
    )
    if cfg.tis_cap is not None and rollout_lp is None:
        raise ValueError("cfg.tis_cap is set but rollout_lp is None: pass the rollout log-probs or set tis_cap=None")
    mask = loss_mask.bool()
    # Zero out masked positions before any exp or product, so that garbage there cannot turn into inf/nan
    # in the forward or (through 0 * inf) in the backward.
    log_ratio = torch.where(mask, logprobs.float() - old_lp.detach().float(), 0.0)
    adv = torch.where(mask, advantages.detach().float(), 0.0)
    ratio = log_ratio.exp()
    unclipped = -adv * ratio
    clipped = -adv * ratio.clamp(1.0 - cfg.clip_low, 1.0 + cfg.clip_high)
    per_token = torch.maximum(unclipped, clipped)
    metrics = {"actor/pg_clip_frac": Stat.masked_mean(clipped > unclipped, mask)}
    if cfg.dual_clip is not None:
        bound = -adv * cfg.dual_clip
        dual_active = (adv < 0) & (per_token > bound)
        per_token = torch.where(dual_active, bound, per_token)
        metrics["actor/dual_clip_frac"] = Stat.masked_mean(dual_active, mask)
    if cfg.tis_cap is not None:
        raw = torch.where(mask, old_lp.detach().float() - rollout_lp.detach().float(), 0.0).exp()
        weight = raw.clamp(max=cfg.tis_cap)
        per_token = per_token * weight
        metrics["tis/weight_mean"] = Stat.masked_mean(weight, mask)
        metrics["tis/raw_weight_max"] = Stat.masked_max(raw, mask)
        metrics["tis/clipped_frac"] = Stat.masked_mean(raw > cfg.tis_cap, mask)
    return aggregate_loss(per_token, mask, cfg.aggregation, denominator), metrics


@dataclass(frozen=True)
class Stat:
    """A metric's local partial: for op "mean", `total` is a sum over `count` items; for op "max", `total` is a
    maximum; for op "sum", `total` is a sum (a count, or a loss share) reported as is. `count` is unused by the
    last two. Partials merge across micro-batches and reduce exactly across ranks."""

    total: torch.Tensor
    count: torch.Tensor
    op: Literal["mean", "max", "sum"] = "mean"

    @staticmethod
    def total_of(value: torch.Tensor | float) -> Stat:
        value = torch.as_tensor(value).detach().double()
        return Stat(value, torch.ones((), dtype=torch.float64, device=value.device), "sum")

    @staticmethod
    def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> Stat:
        mask = mask.bool()
        values = values.detach().double()
        return Stat(torch.where(mask, values, 0.0).sum(), mask.sum().double())

    @staticmethod
    def masked_max(values: torch.Tensor, mask: torch.Tensor) -> Stat:
        mask = mask.bool()
        values = values.detach().double()
        return Stat(torch.where(mask, values, -math.inf).amax(), mask.sum().double(), "max")


Metrics = dict[str, Stat]


def gopd_metrics(
    loss_mask: torch.Tensor,
    advantages: torch.Tensor,
    teacher_lp: torch.Tensor,
    old_lp: torch.Tensor,
    ref_lp: torch.Tensor | None = None,
    entropy: torch.Tensor | None = None,
) -> Metrics:
    """Token-mean partials of the G-OPD quantities of one micro-batch, plus response lengths (mean and max).

    gopd/reward is the lambda-free reward log pi_T - log pi_ref and gopd/kl_ref the sampled KL(pi_old || pi_ref);
    both need `ref_lp` (absent when the trainer skipped the reference at lam == 1). gopd/kl_teacher is the sampled
    reverse KL(pi_old || pi_T) = E[log pi_old - log pi_T], the quantity OPD minimises."""
    _check_same_shape(
        loss_mask=loss_mask, advantages=advantages, teacher_lp=teacher_lp, old_lp=old_lp, ref_lp=ref_lp,
        entropy=entropy,
    )
    mask = loss_mask.bool()
    metrics = {
        "gopd/advantage": Stat.masked_mean(advantages, mask),
        "gopd/kl_teacher": Stat.masked_mean(old_lp.float() - teacher_lp.float(), mask),
    }
    if ref_lp is not None:
        metrics["gopd/reward"] = Stat.masked_mean(teacher_lp.float() - ref_lp.float(), mask)
        metrics["gopd/kl_ref"] = Stat.masked_mean(old_lp.float() - ref_lp.float(), mask)
    if entropy is not None:
        metrics["actor/entropy"] = Stat.masked_mean(entropy, mask)
    lengths, has_response = mask.sum(-1), mask.any(-1)
    metrics["response_length/mean"] = Stat.masked_mean(lengths, has_response)
    metrics["response_length/max"] = Stat.masked_max(lengths, has_response)
    return metrics


def merge_metrics(*parts: Metrics) -> Metrics:
    """Combines partials of several micro-batches (sums add, maxima take the max); keys may differ between parts."""
    merged: Metrics = {}
    for part in parts:
        for name, stat in part.items():
            prev = merged.get(name)
            if prev is None:
                merged[name] = stat
            elif stat.op == "max":
                merged[name] = Stat(torch.maximum(prev.total, stat.total), prev.count + stat.count, "max")
            else:
                merged[name] = Stat(prev.total + stat.total, prev.count + stat.count, stat.op)
    return merged


def reduce_metrics(metrics: Metrics, group: dist.ProcessGroup | None = None) -> dict[str, float]:
    """Means (sum / count), sums and maxima over all ranks of `group`; None means this process only.

    Every rank of the group must call it with the same metric names. Reduce over the data-parallel group: TP/PP
    ranks of one replica hold copies of the same numbers. A mean over zero items, or a max over none, is nan."""
    names = sorted(metrics)
    means = [n for n in names if metrics[n].op == "mean"]
    maxes = [n for n in names if metrics[n].op == "max"]
    additive = [n for n in names if metrics[n].op == "sum"]
    communicate = group is not None and dist.get_world_size(group) > 1
    out: dict[str, float] = {}
    if means:
        sums = torch.stack([metrics[n].total for n in means] + [metrics[n].count for n in means]).double()
        if communicate:
            dist.all_reduce(sums, group=group)
        totals, counts = sums.tolist()[: len(means)], sums.tolist()[len(means) :]
        out.update({n: t / c if c > 0 else math.nan for n, t, c in zip(means, totals, counts)})
    if additive:
        totals = torch.stack([metrics[n].total for n in additive]).double()
        if communicate:
            dist.all_reduce(totals, group=group)
        out.update(zip(additive, totals.tolist()))
    if maxes:
        values = torch.stack([metrics[n].total for n in maxes]).double()
        if communicate:
            dist.all_reduce(values, op=dist.ReduceOp.MAX, group=group)
        out.update({n: v if v > -math.inf else math.nan for n, v in zip(maxes, values.tolist())})
    return out


def _check_aggregation(aggregation: str) -> None:
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {aggregation!r}")


def _check_same_shape(**tensors: torch.Tensor | None) -> None:
    shapes = {name: tuple(t.shape) for name, t in tensors.items() if t is not None}
    if len(set(shapes.values())) > 1:
        raise ValueError(f"per-token tensors must share one [batch, seq] shape, got {shapes}")
