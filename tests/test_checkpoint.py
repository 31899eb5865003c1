"""Checkpoints (issue 7 part 5, issue 11 part 4): model checkpoints that load at any TP/PP, and training
checkpoints that resume exactly and survive a SIGKILL, a full disk and corrupted files.

The torchrun jobs live in tests/dist/checkpoint_model.py and tests/dist/checkpoint_training.py.
"""

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from megatron_gopd import checkpoint
from tests.conftest import run_torchrun

ARCHS = ["llama", "qwen3_tied"]


@pytest.fixture(scope="module")
def model_job(tmp_path_factory):
    work = tmp_path_factory.mktemp("model-ckpt")
    return run_torchrun("checkpoint_model.py", 2, "--workdir", str(work), tmp_path=work)


@pytest.fixture(scope="module")
def training_jobs(tmp_path_factory):
    """(first job's results per rank, second job's results per rank). The first job ends SIGKILLed mid-save."""
    work = tmp_path_factory.mktemp("training-ckpt")
    progress = work / "progress.json"
    args = ("--workdir", str(work), "--progress", str(progress))
    with pytest.raises(AssertionError, match="SIGKILL"):
        run_torchrun("checkpoint_training.py", 2, "--phase", "first", *args, tmp_path=work)
    first = json.loads(progress.read_text())
    second = run_torchrun("checkpoint_training.py", 2, "--phase", "second", *args, tmp_path=work)
    return first, second


# ---- model checkpoints ------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
def test_model_checkpoint_reshards_to_tp2_and_pp2(model_job, arch):
    result = model_job["archs"][arch]
    for layout in ("tp2", "pp2"):
        got = result[layout]
        assert got["diff_before_load"] > 0.1, (layout, got)  # the model really starts elsewhere
        assert got["diff"] < 1e-6, (layout, got)  # against the world-1 model that saved it
        assert got["diff_vs_hf_load"] == 0.0, (layout, got)  # the weights came back bit-exact
    assert result["pp2"]["diff"] == 0.0
    # a dedicated teacher role (ranks from 1) loads it while the student's ranks stay out
    assert result["teacher_diff"] == 0.0


def test_model_checkpoint_layout_and_metadata(model_job):
    files = set(model_job["files"])
    assert {"megatron_gopd.json", "dist/metadata.json", "dist/common.pt", "dist/.metadata",
            "hf/config.json", "hf/tokenizer.json"} <= files
    assert any(f.startswith("dist/__0_") and f.endswith(".distcp") for f in files)
    assert "hf/model.safetensors" not in files  # weight files are never copied into hf/
    meta = model_job["archs"]["llama"]["teacher_meta"]
    assert meta["kind"] == "model" and meta["format_version"] == 1
    assert meta["model_type"] == "llama" and meta["dtype"] == "fp32"
    assert meta["parallel"] == {"tp": 1, "pp": 1, "dp": 1, "ep": 1, "etp": 1}
    assert meta["architecture"]["padded_vocab_size"] == 256  # 250 padded to 128s, whatever the TP
    assert model_job["archs"]["qwen3_tied"]["teacher_meta"]["architecture"]["tie_word_embeddings"] is True


def test_fp32_model_checkpoint_loads_into_a_bf16_model_cast(model_job):
    cast = model_job["archs"]["bf16_cast"]
    assert cast["diff_before_load"] > 0.1 and cast["dtype"] == "torch.bfloat16"
    assert cast["diff"] == 0.0  # every weight is exactly the checkpoint's, rounded to the model's dtype


def test_resuming_a_training_checkpoint_in_another_dtype_is_an_error():
    model = SimpleNamespace(config=SimpleNamespace(params_dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="holds fp32 weights, but the model was built with bf16; resume with dtype"):
        checkpoint._check_same_dtype({"dtype": "fp32"}, model, Path("run/checkpoints/step_00000002"))


def test_model_checkpoint_errors(model_job):
    errors = model_job["errors"]
    assert errors["missing"].startswith("FileNotFoundError: no megatron-gopd model checkpoint at ")
    assert "nowhere: expected " in errors["missing"] and "nowhere/megatron_gopd.json" in errors["missing"]
    assert errors["architecture"].startswith("ValueError:") and "qk_layernorm" in errors["architecture"]
    assert errors["exists"].startswith("FileExistsError:")


# ---- training checkpoints ---------------------------------------------------------------------------------


def test_exact_resume_dp2_distributed_optimizer(training_jobs):
    first, second = training_jobs
    for rank in range(2):
        before, after = first[rank], second[rank]
        # the same losses, grad norms and learning rates, bit for bit, over the two steps after the checkpoint
        assert after["steps"] == before["steps"], rank
        assert before["steps"][0]["lr"] != before["steps"][1]["lr"]  # the LR schedule moves
        # every RNG stream continues where it was at the save
        assert after["draws"] == before["draws"], rank
        assert after["trainer_state"] == {"step": 1, "data": {"epoch": 0, "cursor": 4}}
        assert after["rank_state"] == {"sampler": [rank, 1], "seen": 3 + rank}
    assert first[0]["draws"]["torch"] != first[1]["draws"]["torch"]  # per-rank streams, restored per rank


def test_training_checkpoint_layout_and_manifest(training_jobs):
    first, _ = training_jobs
    files = set(first[0]["resume_files"])
    step = "step_00000001/"
    expected = {"latest", step + "MANIFEST.json", step + "megatron_gopd.json", step + "trainer_state.json",
                step + "hf/config.json", step + "rank_state/rank_00000.pt", step + "rank_state/rank_00001.pt",
                step + "dist/metadata.json", step + "dist/common.pt", step + "dist/.metadata"}
    assert expected <= files
    manifest = first[0]["resume_manifest"]["files"]
    covered = {f for f in files if f.startswith(step) and not f.endswith("MANIFEST.json")}
    assert {step + name for name in manifest} == covered
    assert all(len(entry["sha256"]) == 64 and entry["size"] > 0 for entry in manifest.values())


def test_sigkill_during_save_keeps_previous_checkpoint(training_jobs):
    first, second = training_jobs
    after_kill = second[0]["after_kill"]
    assert after_kill["listing"] == [".tmp-step_00000004", "latest", "step_00000003"]
    assert after_kill["latest"] == "step_00000003"
    trainer_state, warned, error = after_kill["load"]
    assert error is None and warned == [] and trainer_state["step"] == 3
    assert after_kill["fp"] == first[0]["fp3"]  # weights, Adam state and schedule as saved
    assert second[0]["fp4"] != first[0]["fp3"]  # (a step later, they differ: the fingerprint sees a change)
    assert second[0]["after_save4"] == ["latest", "step_00000003", "step_00000004"]  # the temp dir is gone


def test_full_disk_during_save_keeps_previous_checkpoint(training_jobs):
    _, second = training_jobs
    for rank in range(2):  # every rank raises, none hangs
        assert second[rank]["enospc"]["error"].startswith("OSError: writing the dist checkpoint")
    enospc = second[0]["enospc"]
    assert "No space left on device" in enospc["error"]
    assert enospc["listing"] == ["latest", "step_00000003", "step_00000004"]
    assert enospc["latest"] == "step_00000004"
    trainer_state, warned, error = enospc["load"]
    assert error is None and warned == [] and trainer_state["step"] == 4
    assert enospc["fp"] == second[0]["fp4"]


def test_corrupted_shard_falls_back_to_previous(training_jobs):
    first, second = training_jobs
    trainer_state, warned, error = second[0]["corrupt"]["load"]
    assert error is None and trainer_state["step"] == 3
    assert len(warned) == 1 and "step_00000004" in warned[0]
    assert "checksum mismatch for dist/__1_0.distcp" in warned[0]
    assert second[0]["corrupt"]["fp"] == first[0]["fp3"]


def test_keep_last(training_jobs):
    _, second = training_jobs
    assert second[0]["keep_last"] == ["latest", "step_00000006", "step_00000007"]


def test_truncated_and_missing_files(training_jobs):
    _, second = training_jobs
    trainer_state, warned, error = second[0]["truncated"]["load"]
    assert error is None and trainer_state["step"] == 6
    assert len(warned) == 1 and "size mismatch for rank_state/rank_00001.pt" in warned[0]
    assert second[0]["truncated"]["fp"] == second[0]["fp6"]
    # with the previous one broken too, there is nothing left to fall back on: an error, never a silent restart
    _, warned, error = second[0]["missing"]["load"]
    assert any("step_00000006: missing file trainer_state.json" in w for w in warned)
    assert error.startswith("RuntimeError: no loadable checkpoint")
    for rank in range(2):
        assert second[rank]["missing"]["load"][2] == error
    # an explicit resume path is never replaced by another checkpoint
    _, _, error = second[0]["explicit"]["load"]
    assert error.startswith("ValueError: cannot resume from") and "size mismatch" in error
