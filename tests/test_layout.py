"""Issue 2 acceptance: the role layout puts students and teachers on disjoint groups."""

import pytest

from tests.conftest import run_torchrun


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    return run_torchrun("layout_roles.py", 4, tmp_path=tmp_path_factory.mktemp("layout"))


def test_student_and_dedicated_teachers_have_disjoint_groups(result):
    by_rank = {r["rank"]: r for r in result["ranks"]}
    assert [by_rank[r]["role"] for r in range(4)] == ["student", "student", "math", "code"]
    assert result["world_size"] == 4
    assert result["reference_shares_student_groups"]

    for rank in (0, 1):
        m = by_rank[rank]["members"]
        assert m["dp"] == m["dp_cp"] == m["intra_dist_opt"] == m["role_world"] == [0, 1]
        assert m["tp"] == m["pp"] == m["mp"] == m["embd"] == m["pos_embd"] == [rank]
    for rank in (2, 3):
        m = by_rank[rank]["members"]
        assert all(members == [rank] for members in m.values()), m

    # Every collective of the student's training step (DDP all-reduce, optimizer, grad norm) stays on 0-1;
    # each teacher's forward stays on its own rank.
    for rank in (0, 1):
        collectives = by_rank[rank]["collectives"]
        assert any(c.startswith(("all_reduce:(0, 1)", "reduce_scatter_tensor:(0, 1)")) for c in collectives), collectives
        for c in collectives:
            group = c.split(":", 1)[1]
            assert group != "WORLD" and set(eval(group)) <= {0, 1}, c
    for rank in (2, 3):
        for c in by_rank[rank]["collectives"]:
            assert c.split(":", 1)[1] == f"({rank},)", c


def test_fp8_amax_reduction_stays_within_each_role(result):
    """Issue 20: megatron's fp8 context takes Transformer Engine's amax group from parallel_state, never
    initialised here: it would reduce over the WORLD, dedicated teacher ranks included (a hang)."""
    by_rank = {r["rank"]: r["fp8"] for r in result["ranks"]}
    for rank in (0, 1):  # the student: TP x DP x CP, and TP x CP with tp_only_amax_red
        assert by_rank[rank]["amax_group"] == [0, 1] and by_rank[rank]["tp_only"] == [rank]
    for rank in (2, 3):
        assert by_rank[rank]["amax_group"] == [rank]
    assert all(r["megatron_parallel_state_untouched"] for r in by_rank.values())


def test_an_unchecked_megatron_core_version_fails_before_any_group(monkeypatch):
    """Issue 20: the layout leans on HyperCommGrid and ProcessGroupCollection as megatron-core 0.16-0.19 have
    them (their sources read side by side); another version is refused with a clear message."""
    import megatron.core

    from megatron_gopd.runtime.layout import ParallelShape, build_layout, check_megatron_version

    for version in ("0.16.1", "0.17.0", "0.18.0", "0.19.2", "0.19.0rc1"):
        check_megatron_version(version)
    monkeypatch.setattr(megatron.core, "__version__", "0.20.0")
    with pytest.raises(RuntimeError, match=r"megatron-core 0.20.0 is not one the role layout was checked against "
                                           r"\(0.16, 0.17, 0.18, 0.19.x\)"):
        build_layout(ParallelShape())  # no process group exists: the check comes first
    for version in ("0.15.2", "1.0.0"):
        with pytest.raises(RuntimeError, match=f"megatron-core {version} is not one"):
            check_megatron_version(version)
