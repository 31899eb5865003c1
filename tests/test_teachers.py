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
