"""Core attention for megatron's local layer spec over torch's fused attention: linear memory without Transformer
Engine.

megatron-core's own `DotProductAttention` (the local spec's) builds the [b, heads, s, s] score matrix and rejects
packed sequences; `SDPAttention` takes its place in the spec and computes the same causal attention with
`torch.nn.functional.scaled_dot_product_attention` (FlashAttention / memory-efficient kernels on CUDA, the fused
flash kernel on CPU), never forming the S x S scores. Packed rows (megatron's `PackedSeqParams`, THD format) attend
only within their row: on CUDA through FlexAttention with a document mask, on CPU one fused call per row
(FlexAttention has no backward on CPU in torch 2.13, and an SDPA block-diagonal mask is itself S x S: measured in
torch 2.13 on CPU, a boolean mask at 4096 tokens adds 56 MiB, a float copy of it, and still computes every causal
block).
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule


class SDPAttention(MegatronModule):
    """Drop-in for megatron-core's `DotProductAttention`: the same constructor and forward signature (identical in
    megatron-core 0.16 through 0.19, so nothing beyond them is accepted), causal self-attention, grouped-query
    attention, packed rows. In: query [s, b, heads, dim], key/value [s, b, groups, dim] (packed: [t, heads, dim],
    [t, groups, dim]); out: [s, b, heads * dim] (packed: [t, heads * dim])."""

    def __init__(self, config, layer_number: int, attn_mask_type: AttnMaskType, attention_type: str,
                 attention_dropout: float | None = None, softmax_scale: float | None = None,
                 cp_comm_type: str | None = None, pg_collection=None):
        super().__init__(config=config)
        dropout = config.attention_dropout if attention_dropout is None else attention_dropout
        unsupported = {
            "attention_type": (attention_type != "self", f"{attention_type!r} (only 'self')"),
            "attn_mask_type": (attn_mask_type != AttnMaskType.causal, f"{attn_mask_type} (only causal)"),
            # the project trains without attention dropout; with TP it would need megatron's RNG tracker
            "attention_dropout": (dropout != 0.0, f"{dropout} (only 0)"),
            "context_parallel_size": (config.context_parallel_size != 1, f"{config.context_parallel_size} (only 1)"),
            "softmax_type": (config.softmax_type != "vanilla", f"{config.softmax_type!r} (only 'vanilla')"),
            "window_size": (config.window_size is not None, f"{config.window_size} (no sliding window)"),
        }
        bad = [f"{name}={why}" for name, (is_bad, why) in unsupported.items() if is_bad]
        if bad:
            raise ValueError(f"SDPAttention (student.attention: sdpa) does not support {', '.join(bad)}; "
                             "use attention 'megatron' or 'te'")
        # apply_query_key_layer_scaling divides the scale by the layer number and megatron's softmax multiplies it
        # back (an fp16 range trick): the function is the plain scaled softmax, so it needs nothing here.
        self.softmax_scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(config.kv_channels)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                attention_mask: torch.Tensor | None, attn_mask_type: AttnMaskType | None = None,
                attention_bias: torch.Tensor | None = None,
                packed_seq_params: PackedSeqParams | None = None) -> torch.Tensor:
        if attention_mask is not None or attention_bias is not None:
            raise ValueError("SDPAttention computes causal attention only: pass attention_mask=None and no "
                             "attention_bias (packed rows go through packed_seq_params)")
        if attn_mask_type not in (None, AttnMaskType.causal):
            raise ValueError(f"SDPAttention: attn_mask_type={attn_mask_type} is not supported (only causal)")
        if packed_seq_params is None:
            q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [b, heads, s, dim]
            out = self._causal(q, k, v)
            return out.permute(2, 0, 1, 3).reshape(query.shape[0], query.shape[1], -1)
        bounds = row_bounds(packed_seq_params)
        if query.dim() != 3 or query.shape[0] != bounds[-1]:
            raise ValueError(f"SDPAttention: packed query of shape {tuple(query.shape)} does not match "
                             f"cu_seqlens ending at {bounds[-1]} (expected [tokens, heads, dim])")
        if query.is_cuda:
            out = self._document_masked(query, key, value, bounds)
        else:
            out = torch.cat([self._causal(*(t[start:end].transpose(0, 1).unsqueeze(0) for t in (query, key, value)))
                             .squeeze(0).transpose(0, 1) for start, end in zip(bounds[:-1], bounds[1:])])
        return out.reshape(query.shape[0], -1)

    def sharded_state_dict(self, prefix: str = "", sharded_offsets=(), metadata=None) -> dict:
        # No parameters or buffers. (MegatronModule's default would look up the global TP group, which this
        # project never initialises: its models carry their own process groups.)
        return {}

    def _causal(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """[b, heads, s, dim] causal attention; key/value may have fewer (grouped) heads."""
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.softmax_scale,
                                              enable_gqa=k.shape[1] != q.shape[1])

    def _document_masked(self, query, key, value, bounds: tuple[int, ...]) -> torch.Tensor:
        """Packed [t, heads, dim] attention within each row, in one FlexAttention call (CUDA)."""
        q, k, v = (t.transpose(0, 1).unsqueeze(0) for t in (query, key, value))  # [1, heads, t, dim]
        out = _compiled_flex_attention()(q, k, v, block_mask=_document_block_mask(bounds, str(query.device)),
                                         scale=self.softmax_scale, enable_gqa=k.shape[1] != q.shape[1])
        return out.squeeze(0).transpose(0, 1)


def row_bounds(packed_seq_params: PackedSeqParams) -> tuple[int, ...]:
    """The packed rows' boundaries (cu_seqlens) as Python ints, checked to be self-attention over unpadded rows."""
    p = packed_seq_params
    if p.qkv_format != "thd":
        raise ValueError(f"SDPAttention: packed_seq_params.qkv_format={p.qkv_format!r} is not supported (only 'thd')")
    if p.cu_seqlens_kv is not None and not torch.equal(p.cu_seqlens_q, p.cu_seqlens_kv):
        raise ValueError("SDPAttention: packed_seq_params.cu_seqlens_kv differs from cu_seqlens_q (self-attention "
                         "needs the same rows)")
    for name in ("cu_seqlens_q_padded", "cu_seqlens_kv_padded"):
        if getattr(p, name) is not None:
            raise ValueError(f"SDPAttention: packed_seq_params.{name} is not supported (rows without padding)")
    return tuple(p.cu_seqlens_q.tolist())


@functools.cache
def _compiled_flex_attention():
    # Eager FlexAttention materialises the full score matrix; compiled, it is a fused kernel. Compiled lazily so
    # that importing this module never imports dynamo.
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=True)


@functools.lru_cache(maxsize=8)
def _document_block_mask(bounds: tuple[int, ...], device: str):
    """Causal and within-row: one block mask per packed micro-batch, shared by every layer."""
    from torch.nn.attention.flex_attention import create_block_mask

    cu = torch.tensor(bounds, device=device)
    row = torch.repeat_interleave(torch.arange(len(bounds) - 1, device=device), cu.diff())

    def same_row_causal(b, h, q_idx, kv_idx):
        return (row[q_idx] == row[kv_idx]) & (q_idx >= kv_idx)

    return create_block_mask(same_row_causal, None, None, bounds[-1], bounds[-1], device=device, _compile=True)
