"""TP=2 vocab-parallel log-probs / entropy / full-vocab KL against a plain log_softmax on the full vocabulary, and
reduce_metrics across 2 ranks. Every rank generates the same full logits from a fixed seed and keeps its half of
the (padded) vocabulary columns; rank 0 writes the max abs errors as JSON."""

from __future__ import annotations

import argparse
import json

import torch
import torch.distributed as dist

from megatron_gopd.algo.logprobs import full_vocab_gopd_kl, token_logprobs_and_entropy
from megatron_gopd.metrics import Stat, reduce_metrics

B, S, PADDED = 3, 11, 256
CHUNK = 4  # 33 tokens: 8 full chunks and a remainder


def full_logits(seed: int, scale: float = 2.0) -> torch.Tensor:
    return torch.randn(B, S, PADDED, generator=torch.Generator().manual_seed(seed)) * scale


def my_shard(full: torch.Tensor, rank: int) -> torch.Tensor:
    width = PADDED // 2
    return full[..., rank * width : (rank + 1) * width].clone()


def gather_last(t: torch.Tensor, group) -> torch.Tensor:
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, t.contiguous(), group=group)
    return torch.cat(parts, dim=-1)


def ranks_agree(t: torch.Tensor, group) -> float:
    """Max abs difference between this tensor on all ranks (outputs must be replicated over TP)."""
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, t.contiguous(), group=group)
    return max((p - parts[0]).abs().max().item() for p in parts)


def reference_lp_entropy(full: torch.Tensor, targets, vocab: int, temperature: float, g_lp, g_h):
    """Plain fp64 log_softmax over the true vocabulary; returns (lp, entropy, grad wrt the padded logits)."""
    leaf = full.double().requires_grad_()
    logp = torch.log_softmax(leaf[..., :vocab] / temperature, dim=-1)
    lp = logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    ent = -(logp.exp() * logp).sum(-1)
    loss = (lp * g_lp).sum() + (ent * g_h).sum() if g_h is not None else (lp * g_lp).sum()
    loss.backward()
    return lp.detach(), ent.detach(), leaf.grad


def reference_kl(student, teacher, ref, lam, vocab, temperature, g):
    leaf = student.double().requires_grad_()

    def z(t):
        return torch.log_softmax(t[..., :vocab].double() / temperature, dim=-1)

    log_q = torch.log_softmax(lam * z(teacher) + ((1 - lam) * z(ref) if ref is not None else 0.0), dim=-1)
    log_p = z(leaf)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1)
    (kl * g).sum().backward()
    return kl.detach(), leaf.grad


def check_logprobs(rank, group, vocab, temperature, dtype, with_entropy) -> dict:
    full = full_logits(seed=vocab).to(dtype)
    targets = torch.randint(0, vocab, (B, S), generator=torch.Generator().manual_seed(1))
    g_lp = torch.randn(B, S, generator=torch.Generator().manual_seed(2))
    g_h = torch.randn(B, S, generator=torch.Generator().manual_seed(3)) if with_entropy else None
    shard = my_shard(full, rank).requires_grad_()
    lp, ent = token_logprobs_and_entropy(
        shard, targets, group, vocab_size=vocab, temperature=temperature, chunk_tokens=CHUNK, with_entropy=with_entropy
    )
    loss = (lp * g_lp).sum() + ((ent * g_h).sum() if with_entropy else 0.0)
    loss.backward()
    grad = gather_last(shard.grad, group)
    lp_ref, ent_ref, grad_ref = reference_lp_entropy(full, targets, vocab, temperature, g_lp, g_h)
    out = {
        "lp": (lp.double() - lp_ref).abs().max().item(),
        "grad": (grad.double() - grad_ref).abs().max().item(),
        "grad_rel": ((grad.double() - grad_ref).abs().max() / grad_ref.abs().max()).item(),
        "grad_padding_absmax": grad[..., vocab:].abs().max().item() if vocab < PADDED else 0.0,
        "grad_dtype": str(grad.dtype),
        "ranks_agree": ranks_agree(lp, group),
        "entropy_is_none": ent is None,
    }
    if with_entropy:
        out["entropy"] = (ent.double() - ent_ref).abs().max().item()
        out["ranks_agree"] = max(out["ranks_agree"], ranks_agree(ent, group))
    return out


def check_kl(rank, group, vocab, temperature, lam, with_ref) -> dict:
    # Unit-scale logits: KL values of O(1), so fp32 rounding of the vocabulary sums stays well below 1e-5.
    student, teacher, ref = (full_logits(seed=10 + i, scale=1.0) for i in range(3))
    ref = ref if with_ref else None
    g = torch.randn(B, S, generator=torch.Generator().manual_seed(4))
    shard = my_shard(student, rank).requires_grad_()
    kl = full_vocab_gopd_kl(
        shard, my_shard(teacher, rank), my_shard(ref, rank) if with_ref else None, lam, group,
        vocab_size=vocab, temperature=temperature, chunk_tokens=CHUNK,
    )
    (kl * g).sum().backward()
    grad = gather_last(shard.grad, group)
    kl_ref, grad_ref = reference_kl(student, teacher, ref, lam, vocab, temperature, g)
    return {
        "kl": (kl.double() - kl_ref).abs().max().item(),
        "kl_min_ref": kl_ref.min().item(),
        "grad": (grad.double() - grad_ref).abs().max().item(),
        "grad_padding_absmax": grad[..., vocab:].abs().max().item() if vocab < PADDED else 0.0,
        "ranks_agree": ranks_agree(kl, group),
    }


def check_metrics(rank, group) -> dict:
    """Each rank holds different tokens; reduced means/maxes must equal those over the union of both ranks.
    Rank 1's values are shifted up, so rank 0's local mean and max are both far from the global ones."""

    def data(r):
        gen = torch.Generator().manual_seed(100 + r)
        values = torch.randn(2 + r, 5, generator=gen) + 3.0 * r
        mask = torch.rand(2 + r, 5, generator=gen) > 0.4
        return values, mask

    values, mask = data(rank)
    got = reduce_metrics({"m": Stat.masked_mean(values, mask), "x": Stat.masked_max(values, mask)}, group)
    union = torch.cat([data(r)[0][data(r)[1]] for r in range(2)]).double()
    return {
        "mean_err": abs(got["m"] - union.mean().item()),
        "max_err": abs(got["x"] - union.max().item()),
        "local_mean_gap": abs(values[mask].double().mean().item() - union.mean().item()),
        "local_max_gap": abs(values[mask].double().max().item() - union.max().item()),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    # Plain gloo init from torchrun's env: algo needs no megatron, and skipping its import halves the runtime.
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    assert world == 2, "run with 2 processes"
    group = dist.new_group([0, 1])  # an explicit group: the functions must not assume WORLD or megatron state
    results = {
        # vocab 250 of 256: padding inside shard 1; vocab 100: shard 1 is pure padding.
        "lp_v250": check_logprobs(rank, group, 250, 0.7, torch.float32, with_entropy=True),
        "lp_v100": check_logprobs(rank, group, 100, 1.3, torch.float32, with_entropy=True),
        "lp_v250_no_entropy": check_logprobs(rank, group, 250, 0.7, torch.float32, with_entropy=False),
        "lp_v250_bf16": check_logprobs(rank, group, 250, 0.7, torch.bfloat16, with_entropy=True),
        "kl_lam1.25": check_kl(rank, group, 250, 0.7, 1.25, with_ref=True),
        "kl_lam0.5_v100": check_kl(rank, group, 100, 1.3, 0.5, with_ref=True),
        "kl_lam1_noref": check_kl(rank, group, 250, 0.7, 1.0, with_ref=False),
        "metrics": check_metrics(rank, group),
    }
    if rank == 0:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
