"""Issue 19: how a step's rows become micro-batches (a token budget, padded or packed), and that the loss does not
depend on the layout (here on the aggregation; tests/dist/batching_parity.py: through real models at DP=2, PP=2)."""

import pytest
import torch

from megatron_gopd.algo.losses import AGGREGATIONS, aggregate_loss, loss_denominator
from megatron_gopd.batching import Batching, assemble, lay_out, per_row, plan, spread
from tests.conftest import run_torchrun

LENGTHS = [5, 40, 9, 120, 17, 3, 64, 30]


def test_without_a_budget_consecutive_rows_make_micro_batches():
    result = plan(LENGTHS, Batching(max_rows=3))
    assert result.micro_batches == [[0, 1, 2], [3, 4, 5], [6, 7]] and result.over_budget == 0


@pytest.mark.parametrize("packed", [False, True])
def test_a_token_budget_groups_rows_by_length_and_isolates_rows_over_it(packed):
    batching = Batching(max_rows=3, max_tokens=100, packed=packed)
    result = plan(LENGTHS, batching)
    assert sorted(i for mb in result.micro_batches for i in mb) == list(range(len(LENGTHS)))  # each row once
    assert result.over_budget == 1 and [3] in result.micro_batches  # 120 > 100: alone, and counted
    for mb in result.micro_batches:
        assert len(mb) <= 3
        if mb != [3]:
            assert batching.cost([LENGTHS[i] for i in mb]) <= 100
    # longest first: 64 shares with nobody (64 + 40 packed, 2 x 64 padded, are over 100); then padded rows pay for
    # the longest row of their micro-batch, packed ones only for their own tokens. Padded, five micro-batches are
    # the fewest, and of those [17, 9] + [5, 3] runs 34 + 10 tokens where a greedy fill's [17, 9, 5] + [3] runs 51 + 3
    assert result.micro_batches == ([[3], [6], [1, 7], [4, 2], [0, 5]] if not packed else
                                    [[3], [6], [1, 7, 4], [2, 0, 5]])


@pytest.mark.parametrize("packed", [False, True])
def test_a_token_budget_uses_the_fewest_micro_batches_and_of_those_the_least_padding(packed):
    """Against every way of cutting the rows, longest first, into consecutive micro-batches (exhaustive: 2^(n-1))."""
    batching = Batching(max_rows=4, max_tokens=200, packed=packed)
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        lengths = (torch.exp(torch.randn(10, generator=g)) * 40).long().clamp(1, 190).tolist()
        ordered = sorted(lengths, reverse=True)
        feasible = []
        for cuts in range(2 ** (len(ordered) - 1)):
            runs, start = [], 0
            for i in range(1, len(ordered) + 1):
                if i == len(ordered) or cuts >> (i - 1) & 1:
                    runs.append(ordered[start:i])
                    start = i
            if all(len(r) <= 4 and batching.cost(r) <= 200 for r in runs):
                feasible.append((len(runs), sum(batching.cost(r) for r in runs)))
        got = plan(lengths, batching).micro_batches
        assert (len(got), sum(batching.cost([lengths[i] for i in mb]) for mb in got)) == min(feasible)


def test_rows_of_different_groups_never_share_a_micro_batch():
    groups = ["math", "code"] * 4
    result = plan(LENGTHS, Batching(max_rows=4), groups)
    assert all(len({groups[i] for i in mb}) == 1 for mb in result.micro_batches)
    assert result.micro_batches == [[0, 2, 4, 6], [1, 3, 5, 7]]


@pytest.mark.parametrize("packed", [False, True])
def test_values_laid_out_per_row_come_back_per_row(packed):
    rows = [[1, 2, 3], [4, 5], [6, 7, 8, 9]]
    values = [torch.tensor([0.1, 0.2, 0.3]), torch.tensor([0.4, 0.5]), torch.tensor([0.6, 0.7, 0.8, 0.9])]
    mb = assemble(rows, Batching(3, packed=packed), pad_id=0, per_token={"v": values})
    assert mb["tokens"].shape == ((1, 9) if packed else (3, 4))
    assert mb["lengths"].tolist() == [3, 2, 4] and mb["row_ids"].shape == mb["tokens"].shape
    assert [t.tolist() for t in per_row(mb, mb["tokens"])] == rows
    assert all(torch.equal(a, b) for a, b in zip(per_row(mb, mb["v"]), values))
    assert all(torch.equal(a, b) for a, b in zip(per_row(mb, lay_out(mb, values)), values))
    tokens_of_row = [mb["tokens"][mb["row_ids"] == r].tolist() for r in range(3)]
    if packed:
        assert tokens_of_row == rows
    else:  # a padded row's padding carries its row id; masks make it count for nothing
        assert [t[:len(r)] for t, r in zip(tokens_of_row, rows)] == rows
    assert per_row(mb, spread(mb, torch.tensor([10.0, 20.0, 30.0])))[1].tolist() == [20.0, 20.0]


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
def test_the_loss_of_packed_rows_equals_the_padded_one(aggregation):
    g = torch.Generator().manual_seed(0)
    rows = [list(range(n)) for n in (6, 2, 9, 4)]
    losses = [torch.randn(len(r), generator=g) for r in rows]
    masks = [(torch.rand(len(r), generator=g) > 0.3).float() for r in rows]
    masks[1].zero_()  # a row with no loss token: it counts in no denominator
    results = []
    for packed in (False, True):
        mb = assemble(rows, Batching(4, packed=packed), per_token={"loss": losses, "mask": masks})
        per_token = mb["loss"].clone().requires_grad_(True)
        denominator = loss_denominator(mb["mask"], aggregation, mb["row_ids"])
        loss = aggregate_loss(per_token, mb["mask"], aggregation, denominator, mb["row_ids"])
        loss.backward()
        results.append((loss.item(), denominator, per_row(mb, per_token.grad)))
    (padded, d_padded, g_padded), (packed, d_packed, g_packed) = results
    assert d_padded == d_packed == (3 if aggregation != "token-mean" else sum(int(m.sum()) for m in masks))
    assert packed == pytest.approx(padded, abs=1e-6)
    assert all(torch.allclose(a, b, atol=1e-7) for a, b in zip(g_padded, g_packed))


@pytest.mark.parametrize("layout", ["dp2", "pp2"])
def test_loss_and_gradients_do_not_depend_on_the_micro_batch_layout(layout, tmp_path):
    """One step on real megatron models: every micro-batch padded to the step's longest row, a token budget, and
    packed rows give the same loss and gradients (fp32), with rows unevenly spread over the replicas."""
    result = run_torchrun("batching_parity.py", 2, *(["--pp", "2"] if layout == "pp2" else []), tmp_path=tmp_path)
    for rank in result["ranks"]:
        for name in ("token_budget", "packed"):
            r = rank[name]
            assert r["loss_diff"] < 1e-6 and r["grad_diff"] < 1e-6 * max(1.0, r["grad_scale"]), (name, r)
            assert r["over_budget"] == (1 if layout == "pp2" or rank is result["ranks"][1] else 0), (name, r)
        assert rank["pad_to_max"]["grad_scale"] > 1e-3  # the step has a gradient to compare
