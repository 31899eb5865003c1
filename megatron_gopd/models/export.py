"""The streaming exporter: (hf_name, full tensor) pairs out of a live TP x PP (x EP)-sharded model, in bounded
buckets.

The one path by which weights leave Megatron: the HF checkpoint converter, the CPU rollout engine's weight sync
and the SGLang `update_weights_from_tensor` path all consume this iterator.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator

import torch
import torch.distributed as dist
from megatron.core.models.gpt import GPTModel

from megatron_gopd.models.architectures import ModelDims
from megatron_gopd.models.builder import global_parameter_names, shard_group
from megatron_gopd.models.weights import REPLICATED, ResolvedWeight, hf_shapes, resolved_weights, to_hf_tensors


@dataclass
class ExportStats:
    """Bytes of exported tensors this rank held at once (the bound the bucket size promises), and totals."""

    peak_bytes: int = 0
    tensors: int = 0
    total_bytes: int = 0
    _held: int = field(default=0, repr=False)

    def hold(self, nbytes: int) -> None:
        self._held += nbytes
        self.peak_bytes = max(self.peak_bytes, self._held)

    def release(self, nbytes: int) -> None:
        self._held -= nbytes


def _stage_of(dims: ModelDims, weight: ResolvedWeight, pp: int) -> int:
    if weight.layer is not None:
        return weight.layer // (dims.num_layers // pp)
    return 0 if weight.megatron.startswith("embedding.") else pp - 1


def _buckets(dims: ModelDims, weights: list[ResolvedWeight], bucket_bytes: int, itemsize: int):
    bucket, size = [], 0
    for w in weights:
        nbytes = sum(torch.Size(s).numel() for s in hf_shapes(dims, w)) * itemsize
        if bucket and size + nbytes > bucket_bytes:
            yield bucket
            bucket, size = [], 0
        bucket.append(w)
        size += nbytes
    if bucket:
        yield bucket


@torch.no_grad()
def export_hf_weights(
    gpt: GPTModel, dims: ModelDims, *, bucket_bytes: int = 512 << 20, stats: ExportStats | None = None,
    tp_receivers: int = 1,
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yields every HF weight of the model on this DP replica's first-stage ranks of TP rank < `tp_receivers`
    (by default the (tp=0, pp=0) rank alone; an SGLang engine spanning TP wants all of them); elsewhere nothing.

    Every rank of the replica's TP x PP group must exhaust the iterator (it drives collectives); with expert
    parallelism, every rank of the role (an expert's weights come from the EP rank that holds it, which may be
    in another replica). At most one bucket of full tensors (plus one weight larger than a bucket) exists at a
    time on a receiving rank, and one weight's shards on the others. The yielded tensors are only valid until
    the next bucket.
    """
    pgc = gpt.pg_collection
    pp = pgc.pp.size()
    stage, receives = pgc.pp.rank(), pgc.tp.rank() < tp_receivers  # this TP index of the first stage receives
    dst = dist.get_global_rank(pgc.pp, 0) if pp > 1 else dist.get_rank()
    is_dst = stage == 0 and receives
    stats = stats if stats is not None else ExportStats()
    local = global_parameter_names(gpt)
    local_experts = (dims.num_experts // pgc.ep.size()) if dims.is_moe else 0
    dtype = gpt.config.params_dtype
    device = next(gpt.parameters()).device

    def gathered(weight: ResolvedWeight, convert: bool) -> list[torch.Tensor] | None:
        """The weight's HF tensors (when `convert`) from this rank's shard and its (expert) TP peers'."""
        shard, group = local[weight.megatron].detach(), shard_group(gpt, weight)
        if group.size() == 1 or weight.entry.split == REPLICATED:
            return to_hf_tensors(dims, weight, [shard]) if convert else None
        shards = [torch.empty_like(shard) for _ in range(group.size())]
        dist.all_gather(shards, shard.contiguous(), group=group)
        nbytes = shard.numel() * shard.element_size() * group.size()
        stats.hold(nbytes)
        tensors = to_hf_tensors(dims, weight, shards) if convert else None
        del shards
        stats.release(nbytes)
        return tensors

    for bucket in _buckets(dims, resolved_weights(dims), bucket_bytes, torch.finfo(dtype).bits // 8):
        ready: list[tuple[str, torch.Tensor]] = []
        for weight in bucket:
            owner = _stage_of(dims, weight, pp)
            tensors = None
            if owner == stage and weight.expert is not None:
                # The EP rank holding the expert assembles it and broadcasts it to its EP peers, so that every
                # rank of the stage (each replica's tp=0 rank among them) has it.
                holder = weight.expert // local_experts
                if pgc.ep.rank() == holder:
                    tensors = gathered(weight, convert=True)
                else:
                    tensors = [torch.empty(s, dtype=dtype, device=device) for s in hf_shapes(dims, weight)]
                for t in tensors if pgc.ep.size() > 1 else []:
                    dist.broadcast(t, src=dist.get_global_rank(pgc.ep, holder), group=pgc.ep)
                tensors = tensors if receives else None
            elif owner == stage:
                tensors = gathered(weight, convert=receives)
            if owner != 0 and receives and stage in (0, owner):
                if stage == owner:
                    for t in tensors:
                        dist.send(t.contiguous(), dst=dst)
                    tensors = None
                else:
                    tensors = [torch.empty(s, dtype=dtype, device=device) for s in hf_shapes(dims, weight)]
                    for t in tensors:
                        dist.recv(t, src=dist.get_global_rank(pgc.pp, owner))
            if is_dst:
                for name, t in zip(weight.hf, tensors):
                    stats.hold(t.numel() * t.element_size())
                    ready.append((name, t))
        for name, t in ready:
            stats.tensors += 1
            stats.total_bytes += t.numel() * t.element_size()
            yield name, t
        for _, t in ready:
            stats.release(t.numel() * t.element_size())
        del ready
