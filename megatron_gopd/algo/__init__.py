"""G-OPD algorithm: vocab-parallel log-probs/entropy/KL, advantages, the policy loss and step metrics."""

from megatron_gopd.algo.gopd import (
    AGGREGATIONS,
    Metrics,
    PolicyLossConfig,
    Stat,
    aggregate_loss,
    gopd_advantages,
    gopd_metrics,
    loss_denominator,
    merge_metrics,
    policy_loss,
    reduce_metrics,
)
from megatron_gopd.algo.logprobs import full_vocab_gopd_kl, token_logprobs_and_entropy

__all__ = [
    "AGGREGATIONS",
    "Metrics",
    "PolicyLossConfig",
    "Stat",
    "aggregate_loss",
    "full_vocab_gopd_kl",
    "gopd_advantages",
    "gopd_metrics",
    "loss_denominator",
    "merge_metrics",
    "policy_loss",
    "reduce_metrics",
    "token_logprobs_and_entropy",
]
