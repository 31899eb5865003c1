"""Issue 6: frozen teachers and references on their own groups or colocated, streaming log-probs, routing."""

import shutil

import pytest

from megatron_gopd.teachers.frozen import TokenizerMismatchError, check_same_tokenizer
from tests.conftest import run_torchrun
from tests.tiny import tiny_tokenizer

# per placement: world size, dedicated models
PLACEMENTS = {"dedicated": (4, "math,code"), "colocated": (2, ""), "mixed": (3, "math")}


@pytest.mark.parametrize("placement", list(PLACEMENTS))
def test_teacher_logprobs_reach_the_student_and_only_their_domain(placement, tiny_checkpoints, tmp_path):
    nproc, dedicated = PLACEMENTS[placement]
    result = run_torchrun("teachers_service.py", nproc, "--ckpts", str(tiny_checkpoints), "--dedicated", dedicated,
                          tmp_path=tmp_path)
    assert result["max_diff"] < 1e-5  # against HF log_softmax at the rollout temperature, single process
    assert result["reference_switch_error"] < 1e-6
    counts = {}
    for rank in result["ranks"]:
        for name, (calls, samples) in rank["counts"].items():
            counts.setdefault(name, set()).add((calls, samples))
    # 2 steps x 2 micro-batches; math rows: 2+2 per step, code rows: 1+3 per step; references score every row
    assert counts == {"math": {(4, 8)}, "code": {(4, 8)}, "ref_init": {(4, 16)}, "ref_base": {(4, 16)}}
    roles = {r["rank"]: r["role"] for r in result["ranks"]}
    assert [roles[r] for r in sorted(roles)] == ["student", "student"] + dedicated.split(",")[: nproc - 2]


def test_tokenizer_mismatch_is_caught_naming_both_models(tiny_checkpoints, tmp_path):
    check_same_tokenizer({"student": str(tiny_checkpoints / "student"), "math": str(tiny_checkpoints / "math")})
    other = tmp_path / "other"
    shutil.copytree(tiny_checkpoints / "math", other)
    # same vocabulary size, different token -> id map
    tokenizer = tiny_tokenizer()
    vocab = tokenizer.get_vocab()
    swapped = tiny_tokenizer()
    swapped.backend_tokenizer.model = type(swapped.backend_tokenizer.model)(
        {t: (249 - i if i > 10 else i) for t, i in vocab.items()}, unk_token="t0")
    swapped.save_pretrained(other / "hf")
    with pytest.raises(TokenizerMismatchError, match=r"math \(.*other\).*student"):
        check_same_tokenizer({"student": str(tiny_checkpoints / "student"), "math": str(other)})
