"""Issue 2: FP8 (`student.fp8`) is settable from the config, runs with Transformer Engine on a GPU, and is
rejected with a clear error where it cannot run (no GPU, or no Transformer Engine)."""

from types import SimpleNamespace

import pytest
import torch

from megatron_gopd.config import ConfigError, load_config
from megatron_gopd.models import builder
from megatron_gopd.models.architectures import ModelDims, transformer_config
from megatron_gopd.models.parallel_model import fp8_padded_length
from tests.conftest import run_torchrun
from tests.tiny import tiny_hf_config


@pytest.fixture
def dims():
    return ModelDims.from_hf(tiny_hf_config("qwen3"))


def test_fp8_config_without_a_gpu_is_a_clear_error(dims, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # as on a CPU machine, also on a GPU one
    assert transformer_config(dims, fp8=None).fp8 is None  # the same model without fp8 builds
    with pytest.raises(ValueError, match=r"fp8='e4m3' needs a CUDA GPU and Transformer Engine; set fp8: null on CPU"):
        transformer_config(dims, fp8="e4m3")
    with pytest.raises(ValueError, match=r"fp8='hybrid' needs a CUDA GPU"):
        transformer_config(dims, fp8="hybrid")


def test_fp8_layer_spec_without_transformer_engine_is_a_clear_error(dims, monkeypatch):
    # a GPU but no Transformer Engine: the local spec cannot run fp8
    monkeypatch.setattr(builder, "transformer_engine_available", lambda: False)
    assert builder.layer_spec(dims, None) is not None
    with pytest.raises(ValueError, match=r"fp8='e4m3' needs Transformer Engine on a CUDA GPU"):
        builder.layer_spec(dims, "e4m3")


def test_student_fp8_from_the_config(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("student: {path: s, fp8: e4m3, fp8_recipe: delayed}\n"
                      "teachers: [{name: t, path: t, domains: [math]}]\ndata: {train: [x.jsonl]}\n")
    assert load_config(config).student.fp8 == "e4m3"
    with pytest.raises(ConfigError, match="student.fp8"):
        load_config(config, ["student.fp8=e5m2"])


def test_building_an_fp8_student_on_cpu_fails_before_any_work(tmp_path, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # the real build path, as on a machine without a GPU
    result = run_torchrun("fp8_te.py", 1, "--fp8", "e4m3", tmp_path=tmp_path)
    assert not result["te_available"]
    assert result["error"] == "ValueError: fp8='e4m3' needs a CUDA GPU and Transformer Engine; set fp8: null on CPU"


@pytest.mark.gpu
def test_fp8_te_student_matches_the_local_spec_on_gpu(tmp_path):
    pytest.importorskip("transformer_engine.pytorch", reason="needs the gpu extra (Transformer Engine)")
    result = run_torchrun("fp8_te.py", 1, "--fp8", "e4m3", tmp_path=tmp_path)
    assert result["te_available"]
    assert result["te_uses_te"] and not result["local_uses_te"]  # the two specs really differ
    # bf16 throughout: the local spec against HF, and the TE spec against the local one, agree to bf16 rounding
    assert result["local_vs_hf"]["cosine"] > 0.999, result
    assert result["te_vs_local"]["cosine"] > 0.999 and result["te_vs_local"]["max_abs"] < 0.05 * result["scale"], result
    # fp8 e4m3 (3 mantissa bits) in every GEMM: the same function, within fp8 rounding
    assert result["fp8_finite"]
    assert result["fp8_vs_local"]["cosine"] > 0.99, result
    assert result["fp8_vs_local"]["max_abs"] < 0.15 * result["scale"], result
    assert result["fp8_vs_local"]["argmax_agree"] > 0.9, result
    assert result["fp8_vs_te"]["max_abs"] > 0, result  # fp8 was really applied, not silently ignored



def test_fp8_token_counts_are_padded_to_what_transformer_engine_needs():
    """Issue 20: TE's FP8 GEMMs need 16-token multiples (32 for MXFP8), per TP rank with sequence parallelism.
    ParallelModel.run pads every micro-batch so (tests/test_gpu_adapters.py checks the log-probs stay)."""
    def config(fp8="e4m3", recipe="delayed", sp=False, tp=2):
        return SimpleNamespace(fp8=fp8, fp8_recipe=recipe, sequence_parallel=sp, tensor_model_parallel_size=tp)

    assert fp8_padded_length(37, config(fp8=None)) == 37
    assert fp8_padded_length(37, config()) == 48 and fp8_padded_length(48, config()) == 48
    assert fp8_padded_length(37, config(recipe="mxfp8")) == 64
    assert fp8_padded_length(37, config(sp=True)) == 64  # 32 per TP rank pair: each rank holds 16k tokens
