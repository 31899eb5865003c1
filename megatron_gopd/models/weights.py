"""The HF <-> Megatron weight map of Llama-style decoders (Llama, Qwen2, Qwen3, Qwen3-MoE), as one table.

Each row names a Megatron parameter, the HF tensors it is made of, and how it is split over tensor-parallel
ranks. Loading, the dist-checkpoint converter and the streaming exporter all walk this one table, so a new
architecture switch is one `when=` condition, never another loop.

Expert rows ("{e}" in the names) are repeated for every expert of every sparse layer. Their names carry the
GLOBAL expert index on both sides (HF's hub names, `mlp.experts.{e}.gate_proj.weight`, and megatron's
`mlp.experts.local_experts.{e}` as if one rank held every expert); `local_to_global_name` maps a rank's local
experts there. Expert tensors are split over the expert-tensor-parallel group, the others over the TP group.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Iterable

import torch

from megatron_gopd.models.architectures import ModelDims, padded_vocab_size

# How a Megatron tensor is laid out across TP ranks, and how it is assembled from HF tensors.
REPLICATED, COLUMN, ROW, QKV, GLU, VOCAB = "replicated", "column", "row", "qkv", "glu", "vocab"


@dataclass(frozen=True)
class WeightEntry:
    megatron: str  # "{i}" stands for the global layer index, "{e}" for the global expert index
    hf: tuple[str, ...]
    split: str
    when: Callable[[ModelDims], bool] = lambda dims: True
    mlp: str = "any"  # a layer row of dense layers only ("dense"), of sparse layers only ("moe"), or of all

    @property
    def is_expert(self) -> bool:
        return "{e}" in self.megatron


_L = "decoder.layers.{i}."
_H = "model.layers.{i}."
_E, _HE = _L + "mlp.experts.local_experts.{e}.", _H + "mlp.experts.{e}."
WEIGHT_TABLE: tuple[WeightEntry, ...] = (
    WeightEntry("embedding.word_embeddings.weight", ("model.embed_tokens.weight",), VOCAB),
    WeightEntry(_L + "input_layernorm.weight", (_H + "input_layernorm.weight",), REPLICATED),
    WeightEntry(
        _L + "self_attention.linear_qkv.weight",
        tuple(_H + f"self_attn.{p}_proj.weight" for p in "qkv"),
        QKV,
    ),
    WeightEntry(
        _L + "self_attention.linear_qkv.bias",
        tuple(_H + f"self_attn.{p}_proj.bias" for p in "qkv"),
        QKV,
        when=lambda d: d.qkv_bias,
    ),
    WeightEntry(_L + "self_attention.q_layernorm.weight", (_H + "self_attn.q_norm.weight",), REPLICATED, lambda d: d.qk_norm),
    WeightEntry(_L + "self_attention.k_layernorm.weight", (_H + "self_attn.k_norm.weight",), REPLICATED, lambda d: d.qk_norm),
    WeightEntry(_L + "self_attention.linear_proj.weight", (_H + "self_attn.o_proj.weight",), ROW),
    WeightEntry(_L + "pre_mlp_layernorm.weight", (_H + "post_attention_layernorm.weight",), REPLICATED),
    WeightEntry(_L + "mlp.linear_fc1.weight", (_H + "mlp.gate_proj.weight", _H + "mlp.up_proj.weight"), GLU,
                mlp="dense"),
    WeightEntry(_L + "mlp.linear_fc2.weight", (_H + "mlp.down_proj.weight",), ROW, mlp="dense"),
    WeightEntry(_L + "mlp.router.weight", (_H + "mlp.gate.weight",), REPLICATED, mlp="moe"),
    WeightEntry(_E + "linear_fc1.weight", (_HE + "gate_proj.weight", _HE + "up_proj.weight"), GLU, mlp="moe"),
    WeightEntry(_E + "linear_fc2.weight", (_HE + "down_proj.weight",), ROW, mlp="moe"),
    WeightEntry("decoder.final_layernorm.weight", ("model.norm.weight",), REPLICATED),
    WeightEntry("output_layer.weight", ("lm_head.weight",), VOCAB, when=lambda d: not d.tie_word_embeddings),
)

# The Transformer Engine spec fuses the pre-attention and pre-MLP norms into the following linear layer.
TE_ALIASES = {
    "input_layernorm.weight": "self_attention.linear_qkv.layer_norm_weight",
    "pre_mlp_layernorm.weight": "mlp.linear_fc1.layer_norm_weight",
}


@dataclass(frozen=True)
class ResolvedWeight:
    """One table row bound to a layer index: concrete names."""

    entry: WeightEntry
    megatron: str
    hf: tuple[str, ...]
    layer: int | None
    expert: int | None = None


def _layer_has(dims: ModelDims, entry: WeightEntry, layer: int) -> bool:
    return entry.mlp == "any" or (entry.mlp == "moe") == (layer in dims.moe_layers)


def resolved_weights(dims: ModelDims, layers: Iterable[int] | None = None) -> list[ResolvedWeight]:
    """Every weight of the model (or of the given global layers plus the non-layer weights), in a fixed order:
    table order, then layer, then expert."""
    layers = range(dims.num_layers) if layers is None else layers
    out = []
    for entry in WEIGHT_TABLE:
        if not entry.when(dims):
            continue
        if "{i}" not in entry.megatron:
            out.append(ResolvedWeight(entry, entry.megatron, entry.hf, None))
            continue
        for i in layers:
            if not _layer_has(dims, entry, i):
                continue
            for e in range(dims.num_experts) if entry.is_expert else [None]:
                names = entry.megatron.format(i=i, e=e), tuple(h.format(i=i, e=e) for h in entry.hf)
                out.append(ResolvedWeight(entry, *names, i, e))
    return out


def hf_shapes(dims: ModelDims, weight: ResolvedWeight) -> list[tuple[int, ...]]:
    """The HF tensor shapes of a weight, known from the config alone (so receivers can preallocate)."""
    h, d = dims.hidden_size, dims.head_dim
    if weight.entry.is_expert:
        i = dims.moe_ffn_hidden_size
        return [(h, i) if name.endswith("down_proj.weight") else (i, h) for name in weight.hf]
    by_name = {
        "mlp.gate.weight": (dims.num_experts, h),
        "embed_tokens": (dims.vocab_size, h),
        "lm_head": (dims.vocab_size, h),
        "q_proj.weight": (dims.num_heads * d, h),
        "k_proj.weight": (dims.num_kv_heads * d, h),
        "v_proj.weight": (dims.num_kv_heads * d, h),
        "q_proj.bias": (dims.num_heads * d,),
        "k_proj.bias": (dims.num_kv_heads * d,),
        "v_proj.bias": (dims.num_kv_heads * d,),
        "q_norm": (d,),
        "k_norm": (d,),
        "o_proj": (h, dims.num_heads * d),
        "gate_proj": (dims.ffn_hidden_size, h),
        "up_proj": (dims.ffn_hidden_size, h),
        "down_proj": (h, dims.ffn_hidden_size),
        "layernorm": (h,),
        "model.norm": (h,),
    }
    return [next(shape for key, shape in by_name.items() if key in name) for name in weight.hf]


# ---- HF tensors -> the shard held by one TP rank ----------------------------------------------------------


def to_megatron_shard(dims: ModelDims, weight: ResolvedWeight, hf: list[torch.Tensor], tp_rank: int, tp: int) -> torch.Tensor:
    split = weight.entry.split
    if split == REPLICATED:
        return hf[0]
    if split == COLUMN:
        return hf[0].chunk(tp, dim=0)[tp_rank]
    if split == ROW:
        return hf[0].chunk(tp, dim=1)[tp_rank]
    if split == VOCAB:
        full = hf[0]
        padded = full.new_zeros((padded_vocab_size(dims.vocab_size),) + tuple(full.shape[1:]))
        padded[: full.shape[0]] = full
        return padded.chunk(tp, dim=0)[tp_rank]
    if split == GLU:  # each rank holds [its gate rows; its up rows]
        gate, up = hf
        return torch.cat([gate.chunk(tp, dim=0)[tp_rank], up.chunk(tp, dim=0)[tp_rank]], dim=0)
    if split == QKV:
        return _fuse_qkv(dims, *hf).chunk(tp, dim=0)[tp_rank]
    raise AssertionError(split)


def _fuse_qkv(dims: ModelDims, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    # Megatron interleaves per query group: [q heads of group g, k_g, v_g] for each g, so a TP shard is a
    # contiguous run of whole groups.
    groups, d = dims.num_kv_heads, dims.head_dim
    tail = q.shape[1:]
    q = q.reshape(groups, -1, *tail)
    k = k.reshape(groups, d, *tail)
    v = v.reshape(groups, d, *tail)
    return torch.cat([q, k, v], dim=1).reshape(-1, *tail)


# ---- the TP shards of one weight -> HF tensors ------------------------------------------------------------


def to_hf_tensors(dims: ModelDims, weight: ResolvedWeight, shards: list[torch.Tensor]) -> list[torch.Tensor]:
    split = weight.entry.split
    if split == REPLICATED:
        return [shards[0]]
    if split == COLUMN:
        return [torch.cat(shards, dim=0)]
    if split == ROW:
        return [torch.cat(shards, dim=1)]
    if split == VOCAB:
        return [torch.cat(shards, dim=0)[: dims.vocab_size]]
    if split == GLU:
        halves = [s.chunk(2, dim=0) for s in shards]
        return [torch.cat([g for g, _ in halves], dim=0), torch.cat([u for _, u in halves], dim=0)]
    if split == QKV:
        fused = torch.cat(shards, dim=0)
        groups, d = dims.num_kv_heads, dims.head_dim
        tail = fused.shape[1:]
        per_group = fused.reshape(groups, -1, *tail)
        q_rows = per_group.shape[1] - 2 * d
        q, k, v = per_group.split([q_rows, d, d], dim=1)
        return [t.reshape(-1, *tail) for t in (q, k, v)]
    raise AssertionError(split)


# ---- naming of a live (possibly pipeline-split, expert-parallel, TE) model ----------------------------------

_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.*)$")
_LOCAL_EXPERT = re.compile(r"^mlp\.experts\.local_experts\.(\d+)\.(.*)$")
# Transformer Engine's grouped GEMM holds a layer's local experts as weight0, weight1, ... of one module.
_TE_GROUPED_EXPERT = re.compile(r"^mlp\.experts\.(linear_fc[12])\.weight(\d+)$")


def local_to_global_name(local_name: str, layer_offset: int, expert_offset: int = 0) -> str:
    """Local parameter name of a pipeline stage -> the table's global name (TE names folded to local ones).
    `expert_offset` is the global index of this rank's first local expert."""
    match = _LAYER.match(local_name)
    if not match:
        return local_name
    rest = match.group(2)
    for local, te in TE_ALIASES.items():
        if rest == te:
            rest = local
    if grouped := _TE_GROUPED_EXPERT.match(rest):
        rest = f"mlp.experts.local_experts.{grouped.group(2)}.{grouped.group(1)}.weight"
    if expert := _LOCAL_EXPERT.match(rest):
        rest = f"mlp.experts.local_experts.{int(expert.group(1)) + expert_offset}.{expert.group(2)}"
    return f"decoder.layers.{int(match.group(1)) + layer_offset}.{rest}"
