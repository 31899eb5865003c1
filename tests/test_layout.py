"""Issue 2 acceptance: the role layout puts students and teachers on disjoint groups."""

from tests.conftest import run_torchrun


def test_student_and_dedicated_teachers_have_disjoint_groups(tmp_path):
    result = run_torchrun("layout_roles.py", 4, tmp_path=tmp_path)
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
