"""Sequence packing helpers (models/packing.py): rows laid end to end, per-token tensors with them, and back."""

import pytest
import torch

from megatron_gopd.models.packing import (
    num_rows,
    pack_rows,
    pack_values,
    packed_positions,
    packed_seq_params,
    row_index,
    row_starts,
    unpack,
    unpack_padded,
)


@pytest.fixture
def batch():
    """Three right-padded [prompt | response | pad] rows of 2, 5 and 3 tokens."""
    tokens = torch.tensor([[11, 12, 0, 0, 0], [21, 22, 23, 24, 25], [31, 32, 33, 0, 0]])
    mask = torch.tensor([[0, 1, 0, 0, 0], [0, 0, 1, 1, 1], [0, 1, 1, 0, 0]], dtype=torch.float)
    return {"tokens": tokens, "response_mask": mask, "rollout_lp": -mask * torch.arange(1.0, 6.0),
            "teacher_lp": torch.stack([mask, 2 * mask], -1), "teacher_index": torch.tensor([1, 0, 1])}


def test_pack_rows_lays_rows_end_to_end(batch):
    packed = pack_rows(batch, [2, 5, 3])
    assert packed["tokens"].tolist() == [[11, 12, 21, 22, 23, 24, 25, 31, 32, 33]]
    assert packed["response_mask"].tolist() == [[0, 1, 0, 0, 1, 1, 1, 0, 1, 1]]
    assert packed["rollout_lp"].tolist() == [[0, -2, 0, 0, -3, -4, -5, 0, -2, -3]]
    assert packed["teacher_lp"].shape == (1, 10, 2)  # per-token with a trailing dim
    assert packed["teacher_index"].tolist() == [1, 0, 1]  # per-row, kept
    assert packed["cu_seqlens"].dtype == torch.int32 and packed["cu_seqlens"].tolist() == [0, 2, 7, 10]
    assert num_rows(packed) == 3 and num_rows(batch) == 3


def test_pack_rows_to_a_fixed_length(batch):
    packed = pack_rows(batch, [2, 5, 3], pad_to=13)
    assert packed["tokens"].tolist() == [[11, 12, 21, 22, 23, 24, 25, 31, 32, 33, 0, 0, 0]]
    assert packed["response_mask"][0, 10:].tolist() == [0, 0, 0]
    assert packed["cu_seqlens"].tolist() == [0, 2, 7, 10]  # the rows only: the tail belongs to none
    assert row_index(packed["cu_seqlens"], 13).tolist() == [0, 0, 1, 1, 1, 1, 1, 2, 2, 2, 3, 3, 3]


def test_unpacking_gives_the_rows_back(batch):
    packed = pack_rows(batch, [2, 5, 3], pad_to=12)
    cu = packed["cu_seqlens"]
    assert [r.tolist() for r in unpack(packed["tokens"], cu)] == [[11, 12], [21, 22, 23, 24, 25], [31, 32, 33]]
    assert torch.equal(unpack_padded(packed["rollout_lp"], cu), batch["rollout_lp"])
    assert torch.equal(unpack_padded(packed["teacher_lp"], cu, seq=5), batch["teacher_lp"])
    assert torch.equal(pack_values(batch["rollout_lp"], cu, total=12), packed["rollout_lp"])
    assert torch.equal(pack_values([r[:n] for r, n in zip(batch["rollout_lp"], [2, 5, 3])], cu, total=12),
                       packed["rollout_lp"])


def test_unpack_padded_is_differentiable(batch):
    packed = pack_rows(batch, [2, 5, 3])
    values = torch.arange(10.0).unsqueeze(0).requires_grad_()
    rows = unpack_padded(values, packed["cu_seqlens"])
    (rows.sum(-1) * torch.tensor([1.0, 10.0, 100.0])).sum().backward()  # a per-row weighted reduction
    assert values.grad.tolist() == [[1, 1, 10, 10, 10, 10, 10, 100, 100, 100]]


def test_positions_and_row_starts_restart_per_row(batch):
    cu = pack_rows(batch, [2, 5, 3])["cu_seqlens"]
    assert packed_positions(cu, 10).tolist() == [[0, 1, 0, 1, 2, 3, 4, 0, 1, 2]]
    assert row_starts(cu, 10).tolist() == [0, 2, 7]
    assert packed_positions(cu, 12).tolist() == [[0, 1, 0, 1, 2, 3, 4, 0, 1, 2, 0, 1]]  # the tail: a row of its own
    assert row_starts(cu, 12).tolist() == [0, 2, 7, 10]


def test_packed_seq_params_describe_rows_for_megatron(batch):
    cu = pack_rows(batch, [2, 5, 3])["cu_seqlens"]
    params = packed_seq_params(cu, 10, torch.device("cpu"))
    assert params.qkv_format == "thd" and params.cu_seqlens_q.tolist() == [0, 2, 7, 10]
    assert params.cu_seqlens_q.dtype == torch.int32 and params.cu_seqlens_kv is params.cu_seqlens_q
    # the longest row: megatron's THD RoPE restarts positions per row only for a table shorter than the pack
    assert params.max_seqlen_q == params.max_seqlen_kv == 5 and isinstance(params.max_seqlen_q, int)
    padded = packed_seq_params(cu, 19, torch.device("cpu"))
    assert padded.cu_seqlens_q.tolist() == [0, 2, 7, 10, 19] and padded.max_seqlen_q == 9


def test_bad_packing_input_is_a_clear_error(batch):
    with pytest.raises(ValueError, match="2 lengths for 3 rows"):
        pack_rows(batch, [2, 5])
    with pytest.raises(ValueError, match=r"lengths must be in \[1, 5\]"):
        pack_rows(batch, [2, 6, 3])
    with pytest.raises(ValueError, match="pad_to=9 is shorter than the rows' 10 tokens"):
        pack_rows(batch, [2, 5, 3], pad_to=9)
    with pytest.raises(ValueError, match=r"odd of shape \(2,\) is neither per-token"):
        pack_rows({**batch, "odd": torch.zeros(2)}, [2, 5, 3])
    with pytest.raises(ValueError, match="packed already"):
        pack_rows(pack_rows(batch, [2, 5, 3]), [10])
    with pytest.raises(ValueError, match=r"expected a packed per-token tensor \[1, T, ...\]"):
        unpack(batch["tokens"], torch.tensor([0, 2, 7, 10]))
    with pytest.raises(ValueError, match="rows \\[1\\] have fewer values"):
        pack_values([torch.zeros(2), torch.zeros(4), torch.zeros(3)], torch.tensor([0, 2, 7, 10]))
