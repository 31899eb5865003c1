"""G-OPD advantages, the clipped policy-gradient loss the paper trains with, and loss aggregation.

Per-token tensors share one shape: [rows, seq] (one row per sequence, right-padded), or [1, T] for a packed
micro-batch, whose rows are segments of one sequence; `row_ids` (the same shape, long) then names each token's row
(models/packing.py). `loss_mask` is 1 on response tokens that carry loss and 0 on prompt and padding tokens. Values
at masked positions are never read (they may be garbage or inf).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import get_args

import torch

from megatron_gopd.config import Aggregation
from megatron_gopd.metrics import Metrics, Stat

AGGREGATIONS = get_args(Aggregation)


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


def loss_denominator(loss_mask: torch.Tensor, aggregation: str, row_ids: torch.Tensor | None = None) -> float:
    """The local normaliser of `aggregate_loss`: the number of loss tokens for "token-mean", else the number of
    sequences (rows) with at least one loss token. Sum it over micro-batches and DP ranks for the global one."""
    _check_aggregation(aggregation)
    mask = loss_mask.bool()
    if aggregation == "token-mean":
        return float(mask.sum())
    return float((_row_sums(mask.float(), row_ids) > 0).sum())


def aggregate_loss(
    per_token: torch.Tensor, loss_mask: torch.Tensor, aggregation: str, denominator: float | None = None,
    row_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """Reduces a per-token loss to a scalar: numerator / denominator, where the numerator is

    - "token-mean": the sum of the loss over loss tokens;
    - "seq-mean-token-mean": the sum over sequences of each sequence's mean over its loss tokens (paper default);
    - "seq-mean-token-sum": the sum over sequences of each sequence's sum over its loss tokens;

    and `denominator` defaults to `loss_denominator(loss_mask, aggregation)` (tokens, resp. non-empty sequences).
    Passing the GLOBAL denominator (summed over all micro-batches and DP ranks of the step) makes the sum of the
    returned losses over micro-batches and DP ranks equal the aggregate over the whole step's batch. (A framework
    that averages over micro-batches or DP ranks must be compensated by the caller, e.g. by multiplying the loss by
    the number of micro-batches and by the DP size.) `row_ids`: the sequences of a packed micro-batch.
    """
    _check_aggregation(aggregation)
    _check_same_shape(per_token=per_token, loss_mask=loss_mask, row_ids=row_ids)
    mask = loss_mask.bool()
    masked = torch.where(mask, per_token, 0.0)  # where, not multiply: masked positions may hold inf
    if aggregation == "seq-mean-token-mean":
        numerator = (_row_sums(masked, row_ids) / _row_sums(mask.to(masked.dtype), row_ids).clamp(min=1)).sum()
    else:  # the two sums coincide; the modes differ in the denominator
        numerator = masked.sum()
    if denominator is None:
        denominator = max(loss_denominator(mask, aggregation, row_ids), 1.0)  # an empty micro-batch contributes 0
    elif not denominator > 0:
        raise ValueError(f"denominator must be > 0, got {denominator}")
    return numerator / denominator


def _row_sums(values: torch.Tensor, row_ids: torch.Tensor | None) -> torch.Tensor:
    """Per-sequence sums: over the last dim of [rows, seq], or by row id (a packed micro-batch; differentiable)."""
    if row_ids is None:
        return values.sum(-1)
    flat, ids = values.reshape(-1), row_ids.reshape(-1)
    return flat.new_zeros(int(ids.max()) + 1).index_add(0, ids, flat)


def policy_loss(
    logprobs: torch.Tensor,
    old_lp: torch.Tensor,
    advantages: torch.Tensor,
    loss_mask: torch.Tensor,
    cfg: PolicyLossConfig,
    rollout_lp: torch.Tensor | None = None,
    denominator: float | None = None,
    row_ids: torch.Tensor | None = None,
) -> tuple[torch.Tensor, Metrics]:
    """PPO clipped-ratio policy-gradient loss with a truncated importance weight, aggregated per `cfg.aggregation`.

    Per token: max(-A r, -A clip(r, 1 - clip_low, 1 + clip_high)) with r = pi_theta / pi_old, bounded by -dual_clip*A
    for A < 0 when dual clip is on, times w = min(pi_old / pi_rollout, tis_cap) (detached; needs `rollout_lp`
    unless tis_cap is None). `denominator`, `row_ids`: see `aggregate_loss`. Returns (scalar loss, local metric
    partials).
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
    return aggregate_loss(per_token, mask, cfg.aggregation, denominator, row_ids), metrics


def _check_aggregation(aggregation: str) -> None:
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {aggregation!r}")


def _check_same_shape(**tensors: torch.Tensor | None) -> None:
    shapes = {name: tuple(t.shape) for name, t in tensors.items() if t is not None}
    if len(set(shapes.values())) > 1:
        raise ValueError(f"per-token tensors must share one [batch, seq] shape, got {shapes}")
