"""Expert-load metrics of a training mixture of experts: tokens per expert, imbalance, the router's aux loss.

megatron's routers keep no per-expert token counts (they do only for aux-loss-free expert-bias routing, which
changes the routing), so forward hooks on them count the routing map of every training forward (grad enabled,
train mode: the update's micro-batches, not the forward-only pi_old pass). The aux loss comes from megatron's
own tracker, which the routers fill when `student.moe_aux_loss_coef` > 0. Padding positions of a micro-batch
are routed like any token and counted.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer.moe.moe_utils import clear_aux_losses_tracker, get_moe_layer_wise_logging_tracker
from megatron.core.transformer.moe.router import TopKRouter

_AUX_LOSS = "load_balancing_loss"  # megatron's tracker key for the "aux_loss" balancing type


class ExpertLoad:
    """Counts, per sparse layer and expert, the tokens routed there since the last `metrics()` call."""

    def __init__(self, gpt: GPTModel):
        config = gpt.config
        self.gpt, self.num_layers = gpt, config.num_layers
        self.experts = config.num_moe_experts or 0
        self.aux_loss_on = self.experts > 0 and config.moe_router_load_balancing_type == "aux_loss"
        self.counts = torch.zeros(self.num_layers, max(self.experts, 1), dtype=torch.float64)
        self.forwards = torch.zeros(self.num_layers, dtype=torch.float64)  # training forwards seen per layer
        self.sparse_layers = sorted(i for i, sparse in enumerate(_layer_pattern(config)) if sparse)
        self.last_counts: torch.Tensor | None = None  # [sparse layers, experts] behind the last metrics()
        self._hooks = [m.register_forward_hook(self._count) for m in gpt.modules() if isinstance(m, TopKRouter)]

    def _count(self, router: TopKRouter, inputs, outputs) -> None:
        if not (router.training and torch.is_grad_enabled()):
            return
        _, routing_map = outputs  # [tokens, experts] booleans
        layer = router.layer_number - 1  # megatron numbers layers globally, from 1
        self.counts[layer] += routing_map.sum(0).to("cpu", torch.float64)
        self.forwards[layer] += 1

    def metrics(self) -> dict[str, float]:
        """The step's expert-load metrics, the same on every rank of the role (collective over its DP and PP
        groups: call it on every student rank, after the update), then starts counting afresh.

        `moe/tokens_per_expert_{mean,min,max}`: tokens (top-k slots) an expert received in one sparse layer over
        the step, summed over DP; `moe/imbalance_mean` / `moe/imbalance_max`: max over mean of a layer's expert
        loads (1 = balanced), averaged over / worst of the sparse layers; `moe/aux_loss`, when the aux loss is
        on: megatron's per-layer switch loss, averaged over the micro-batches and DP, summed over layers (what
        the coefficient multiplies)."""
        if not self.experts:
            return {}
        pgc = self.gpt.pg_collection
        tracker = get_moe_layer_wise_logging_tracker().get(_AUX_LOSS)
        aux = tracker["values"].detach().to("cpu", torch.float64) if tracker else torch.zeros(self.num_layers)
        aux = aux[: self.num_layers].to(torch.float64)
        # One buffer, two reductions: sums over DP (different tokens) and PP (different layers); TP ranks route
        # the same tokens, so they are not summed.
        packed = torch.cat([self.counts.flatten(), self.forwards, aux])
        for group in (pgc.dp, pgc.pp):
            if group.size() > 1:
                dist.all_reduce(packed, group=group)
        counts, forwards, aux = packed.split([self.counts.numel(), self.num_layers, self.num_layers])
        counts = self.last_counts = counts.view_as(self.counts)[self.sparse_layers]
        forwards = forwards[self.sparse_layers]
        out = {}
        if forwards.sum() > 0:
            mean = counts.mean(-1)
            imbalance = counts.max(-1).values / mean.clamp(min=1e-12)
            out = {"moe/tokens_per_expert_mean": mean.mean().item(), "moe/tokens_per_expert_min": counts.min().item(),
                   "moe/tokens_per_expert_max": counts.max().item(), "moe/imbalance_mean": imbalance.mean().item(),
                   "moe/imbalance_max": imbalance.max().item()}
            if self.aux_loss_on:  # each DP rank's sum over its micro-batches -> the mean per micro-batch
                out["moe/aux_loss"] = (aux[self.sparse_layers] / forwards).sum().item()
        self.counts.zero_()
        self.forwards.zero_()
        clear_aux_losses_tracker()
        return out

    def remove(self) -> None:
        for hook in self._hooks:
            hook.remove()


def _layer_pattern(config) -> list[int]:
    freq = config.moe_layer_freq
    return list(freq) if isinstance(freq, list) else [int(i % freq == 0) for i in range(config.num_layers)]
