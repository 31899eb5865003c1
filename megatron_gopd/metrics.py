"""Step metrics: partials that merge across micro-batches and reduce exactly across ranks, and the metrics every
objective shares (rollout/trainer mismatch, response lengths)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Stat:
    """A metric's local partial: for op "mean", `total` is a sum over `count` items; for op "max", `total` is a
    maximum; for op "sum", `total` is a sum (a count, or a loss share) reported as is. `count` is unused by the
    last two."""

    total: torch.Tensor
    count: torch.Tensor
    op: Literal["mean", "max", "sum"] = "mean"

    @staticmethod
    def total_of(value: torch.Tensor | float) -> Stat:
        value = torch.as_tensor(value).detach().double()
        return Stat(value, torch.ones((), dtype=torch.float64, device=value.device), "sum")

    @staticmethod
    def mean_of(total: float, count: float) -> Stat:
        return Stat(torch.tensor(float(total), dtype=torch.float64), torch.tensor(float(count), dtype=torch.float64))

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


def mismatch_metrics(rollout_lp: torch.Tensor, trainer_lp: torch.Tensor, mask: torch.Tensor) -> Metrics:
    """The rollout engine against the trainer on response tokens: mean and max of |log pi_rollout - log pi_trainer|
    and the sampled KL(rollout || trainer)."""
    diff = rollout_lp.detach().float() - trainer_lp.detach().float()
    return {
        "mismatch/abs_mean": Stat.masked_mean(diff.abs(), mask),
        "mismatch/abs_max": Stat.masked_max(diff.abs(), mask),
        "mismatch/kl": Stat.masked_mean(diff, mask),
    }


def response_metrics(lengths: list[int], finish_reasons: list[str]) -> Metrics:
    """Mean and longest response length, and the fraction of responses cut off at max_new_tokens (finish reason
    "length")."""
    rows = len(lengths)
    longest = torch.tensor(float(max(lengths, default=-math.inf)), dtype=torch.float64)
    return {"rollout/response_length": Stat.mean_of(sum(lengths), rows),
            "rollout/response_length_max": Stat(longest, torch.tensor(float(rows), dtype=torch.float64), "max"),
            "rollout/truncated_frac": Stat.mean_of(sum(r == "length" for r in finish_reasons), rows)}
