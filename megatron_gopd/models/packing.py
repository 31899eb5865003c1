"""Sequence packing: the rows of a micro-batch laid end to end in one sequence of batch 1, without padding.

A packed micro-batch holds `tokens` [1, T] and its per-token tensors [1, T, ...] (response_mask, rollout_lp, ...)
concatenated the same way, plus `cu_seqlens` (int32 [rows + 1], the rows' boundaries in the sequence: row i is
tokens[0, cu_seqlens[i]:cu_seqlens[i + 1]]). Tokens past cu_seqlens[-1], if the pack was padded to a fixed length,
are padding that belongs to no row. Per-row tensors ([rows, ...], e.g. teacher_index) are kept as they are.

The model (ParallelModel.run) runs each row as if it were alone: positions restart per row (RoPE), attention stays
within the row, and the log-prob of a row's first token is 0, as for an unpacked row.
"""

from __future__ import annotations

from typing import Sequence

import torch
from megatron.core.packed_seq_params import PackedSeqParams

ROW_BOUNDS = "cu_seqlens"


def pack_rows(batch: dict[str, torch.Tensor], lengths: Sequence[int], *,
              pad_to: int | None = None) -> dict[str, torch.Tensor]:
    """Packs the right-padded rows of `batch` (tokens [rows, s]; row i's first lengths[i] tokens are real) into
    one sequence [1, sum(lengths)], or [1, pad_to] with a padding tail (one shape for every micro-batch, as
    megatron's pipeline schedule needs at PP > 1).

    Every tensor whose leading dims are tokens' [rows, s] is per-token and is packed; any other tensor with
    `rows` leading entries is per-row and kept as it is."""
    if ROW_BOUNDS in batch:
        raise ValueError("pack_rows: the micro-batch is packed already")
    tokens = batch["tokens"]
    rows, seq = tokens.shape
    if len(lengths) != rows:
        raise ValueError(f"pack_rows: {len(lengths)} lengths for {rows} rows")
    if not all(0 < n <= seq for n in lengths):
        raise ValueError(f"pack_rows: lengths must be in [1, {seq}] (the rows' padded length), "
                         f"got {list(lengths)}")
    total = sum(lengths)
    if pad_to is not None and pad_to < total:
        raise ValueError(f"pack_rows: pad_to={pad_to} is shorter than the rows' {total} tokens")
    real = torch.arange(seq) < torch.tensor(lengths)[:, None]  # [rows, s]
    packed = {}
    for key, value in batch.items():
        if value.shape[:2] == (rows, seq):
            flat = value[real].unsqueeze(0)  # row-major: row 0's tokens, then row 1's, ...
            if pad_to is not None:
                flat = torch.cat([flat, flat.new_zeros(1, pad_to - total, *flat.shape[2:])], 1)
            packed[key] = flat
        elif value.dim() > 0 and value.shape[0] == rows:
            packed[key] = value
        else:
            raise ValueError(f"pack_rows: {key} of shape {tuple(value.shape)} is neither per-token "
                             f"[{rows}, {seq}, ...] nor per-row [{rows}, ...]")
    packed[ROW_BOUNDS] = torch.tensor([0, *lengths], dtype=torch.int32).cumsum(0, dtype=torch.int32)
    return packed


def is_packed(mb: dict[str, torch.Tensor]) -> bool:
    return ROW_BOUNDS in mb


def num_rows(mb: dict[str, torch.Tensor]) -> int:
    """The rows a micro-batch holds, packed or not."""
    return len(mb[ROW_BOUNDS]) - 1 if is_packed(mb) else mb["tokens"].shape[0]


def row_index(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """[total] (long): the row of each token of the packed sequence; padding after the last row gets `rows`."""
    cu = cu_seqlens.long()
    return torch.searchsorted(cu, torch.arange(total, device=cu.device), right=True) - 1


def unpack(values: torch.Tensor, cu_seqlens: torch.Tensor) -> list[torch.Tensor]:
    """Each row's values (views), from a packed per-token tensor [1, T, ...]."""
    flat = _sequence(values)
    bounds = cu_seqlens.tolist()
    return [flat[start:end] for start, end in zip(bounds[:-1], bounds[1:])]


def unpack_padded(values: torch.Tensor, cu_seqlens: torch.Tensor, seq: int | None = None) -> torch.Tensor:
    """A packed per-token tensor [1, T, ...] as right-padded rows [rows, seq, ...] (zeros past each row's end;
    `seq` defaults to the longest row). Differentiable: row-wise reductions (a per-sequence mean of a loss) can run
    on it as on an unpacked micro-batch."""
    flat = _sequence(values)
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    seq = int(lengths.max()) if seq is None else seq
    if int(lengths.max()) > seq:
        raise ValueError(f"unpack_padded: seq={seq} is shorter than the longest row ({int(lengths.max())})")
    real = torch.arange(seq, device=lengths.device) < lengths[:, None]
    out = flat.new_zeros(len(lengths), seq, *flat.shape[1:])
    return out.masked_scatter(real.view(*real.shape, *[1] * (flat.dim() - 1)).expand_as(out),
                              flat[: int(cu_seqlens[-1])])


def pack_values(rows: Sequence[torch.Tensor] | torch.Tensor, cu_seqlens: torch.Tensor,
                total: int | None = None) -> torch.Tensor:
    """Per-token values given per row (a list of [len_i, ...] tensors, or right-padded [rows, s, ...]) laid out like
    the packed tokens: [1, total, ...] (`total` defaults to cu_seqlens[-1]; a padding tail is zeros). Adds a
    tensor computed per row (teacher scores, ...) to a packed micro-batch."""
    bounds = cu_seqlens.tolist()
    lengths = [end - start for start, end in zip(bounds[:-1], bounds[1:])]
    if len(rows) != len(lengths):
        raise ValueError(f"pack_values: {len(rows)} rows for {len(lengths)} packed rows")
    parts = [row[:n] for row, n in zip(rows, lengths)]
    short = [i for i, (part, n) in enumerate(zip(parts, lengths)) if part.shape[0] != n]
    if short:
        raise ValueError(f"pack_values: rows {short} have fewer values than their packed lengths {lengths}")
    flat = torch.cat(parts)
    total = bounds[-1] if total is None else total
    return torch.cat([flat, flat.new_zeros(total - bounds[-1], *flat.shape[1:])]).unsqueeze(0)


def packed_positions(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """[1, total]: each token's position within its row (the padding tail counts as a row of its own)."""
    bounds = _with_tail(cu_seqlens.long(), total)
    starts = bounds[row_index(bounds, total)]
    return (torch.arange(total, device=bounds.device) - starts).unsqueeze(0)


def row_starts(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """The sequence index of each row's first token (and the padding tail's), whose log-prob must not be scored
    against the previous row."""
    return _with_tail(cu_seqlens.long(), total)[:-1]


def packed_seq_params(cu_seqlens: torch.Tensor, total: int, device: torch.device) -> PackedSeqParams:
    """megatron's THD description of a packed sequence of `total` tokens. A padding tail becomes one more row, so
    that it attends only to itself and RoPE's per-row split covers every token. `cu_seqlens` is read on the host:
    max_seqlen is needed as a Python int (it sizes the rotary table, which megatron caches by it)."""
    bounds = _with_tail(cu_seqlens.cpu().int(), total)
    longest = int((bounds[1:] - bounds[:-1]).max())
    bounds = bounds.to(device)
    # max_seqlen must be the longest ROW: megatron's THD RoPE restarts positions per row only when its table is
    # shorter than the whole pack (with a table of `total` positions it would continue them across rows).
    return PackedSeqParams(qkv_format="thd", cu_seqlens_q=bounds, cu_seqlens_kv=bounds, max_seqlen_q=longest,
                           max_seqlen_kv=longest)


def _sequence(values: torch.Tensor) -> torch.Tensor:
    if values.dim() < 2 or values.shape[0] != 1:
        raise ValueError(f"expected a packed per-token tensor [1, T, ...], got shape {tuple(values.shape)}")
    return values[0]


def _with_tail(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    end = int(cu_seqlens[-1])
    if end > total:
        raise ValueError(f"cu_seqlens ends at {end}, past the sequence's {total} tokens")
    return cu_seqlens if end == total else torch.cat([cu_seqlens, cu_seqlens.new_tensor([total])])
