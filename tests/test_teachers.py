"""Issue 6: frozen teachers and references on their own groups or colocated, streaming log-probs, routing."""

import json
import math

import pytest

from megatron_gopd.teachers.frozen import TokenizerMismatchError, check_same_tokenizer
from tests.conftest import run_torchrun
from tests.runs import swapped_tokenizer_copy
from tests.tiny import tiny_tokenizer

# placement -> (student [tp, pp, dp], dedicated models' [tp, pp, dp]); the ranks follow in that order
PLACEMENTS = {
    "colocated": ([2, 1, 1], {}),  # every model on the student's TP=2 groups
    "mixed": ([2, 1, 1], {"math": [1, 1, 1]}),
    "dedicated_tp_pp": ([1, 1, 1], {"math": [2, 1, 1], "code": [1, 2, 1]}),  # TP=2 and PP=2 teachers
    "dedicated_dp": ([1, 1, 2], {"math": [1, 1, 2]}),  # each student replica served by its own teacher replica
}


@pytest.mark.parametrize("placement", list(PLACEMENTS))
def test_teacher_logprobs_reach_the_student_and_only_their_domain(placement, tiny_checkpoints, tmp_path):
    student, dedicated = PLACEMENTS[placement]
    nproc = math.prod(student) + sum(math.prod(shape) for shape in dedicated.values())
    result = run_torchrun("teachers_service.py", nproc, "--ckpts", str(tiny_checkpoints), "--layout",
                          json.dumps({"student": student, "dedicated": dedicated}), tmp_path=tmp_path)
    assert result["max_diff"] < 1e-5  # against HF log_softmax at the rollout temperature, single process
    counts = {}
    for rank in result["ranks"]:
        for name, (calls, samples) in rank["counts"].items():
            counts.setdefault(name, set()).add((calls, samples))
    # per step, math rows 2 + 2 and code rows 1 + 3 in two submissions; the references score all 8. A colocated
    # model scores the step's rows at once, 4 rows per forward; a dedicated one each submission as it comes.
    calls = {name: (2 if name in dedicated else 1) if name in ("math", "code") else (3 if name in dedicated else 2)
             for name in ("math", "code", "ref_init", "ref_base")}
    samples = {"math": 4, "code": 4, "ref_init": 8, "ref_base": 8}
    assert counts == {name: {(2 * calls[name], 2 * samples[name])} for name in calls}, counts  # 2 steps
    roles = {r["rank"]: r["role"] for r in result["ranks"]}
    assert [roles[r] for r in sorted(roles)] == ["student"] * math.prod(student) + [
        name for name, shape in dedicated.items() for _ in range(math.prod(shape))]


def test_tokenizer_mismatch_is_caught_naming_both_models(tiny_checkpoints, tmp_path):
    check_same_tokenizer({"student": str(tiny_checkpoints / "student"), "math": str(tiny_checkpoints / "math")})
    other = swapped_tokenizer_copy(tiny_checkpoints / "math", tmp_path / "other")  # same size, other token ids
    with pytest.raises(TokenizerMismatchError, match=r"math \(.*other\).*student"):
        check_same_tokenizer({"student": str(tiny_checkpoints / "student"), "math": str(other)})


def _hf_dir(path, config: dict, tokenizer_vocab: int = 250):
    import json

    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps(config))
    tiny_tokenizer(tokenizer_vocab).save_pretrained(path)
    return path


def test_tokenizer_check_needs_only_tokenizer_and_vocab_size_for_an_sglang_moe_teacher(tmp_path):
    """Issue 6/8: an SGLang teacher of an architecture we cannot build (qwen2_moe) still passes the check."""
    from megatron_gopd.models.architectures import ModelDims, UnsupportedModelError
    from megatron_gopd.teachers.frozen import tokenizer_fingerprint
    from tests.tiny import TINY_CONFIGS

    moe_cfg = {"model_type": "qwen2_moe", "vocab_size": 250, "hidden_size": 64, "num_experts": 8,
               "num_experts_per_tok": 2, "num_hidden_layers": 2, "num_attention_heads": 4}
    teacher = _hf_dir(tmp_path / "moe", moe_cfg)
    _hf_dir(tmp_path / "student" / "hf", dict(TINY_CONFIGS["qwen3"]))
    with pytest.raises(UnsupportedModelError):
        ModelDims.from_hf(teacher)
    size, digest = tokenizer_fingerprint(str(teacher))
    assert size == 256 and (size, digest) == tokenizer_fingerprint(str(tmp_path / "student"))
    check_same_tokenizer({"student": str(tmp_path / "student"), "strong": str(teacher)})
    # the config's vocab size still counts: a padded vocab of 384 is a mismatch
    big = _hf_dir(tmp_path / "big", dict(moe_cfg, vocab_size=300))
    with pytest.raises(TokenizerMismatchError, match="padded vocab size 384"):
        check_same_tokenizer({"student": str(tmp_path / "student"), "big": str(big)})
