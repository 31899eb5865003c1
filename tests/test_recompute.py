"""Issue 19, item 1: activation recompute of the student (train.recompute: none | selective | full) through
megatron-core's own settings, in the tiny Qwen3 GPTModel with SDPAttention at TP=1 and TP=2
(tests/dist/recompute.py)."""

import pytest

from megatron_gopd.models.architectures import ModelDims, transformer_config
from tests.conftest import run_torchrun
from tests.tiny import tiny_hf_config

MODES = ("none", "selective", "full")


def test_recompute_maps_to_megatrons_settings():
    dims = ModelDims.from_hf(tiny_hf_config("qwen3"))
    none, selective, full = (transformer_config(dims, recompute=mode) for mode in MODES)
    assert none.recompute_granularity is None
    assert (selective.recompute_granularity, selective.recompute_modules) == ("selective", ["core_attn"])
    assert (full.recompute_granularity, full.recompute_method, full.recompute_num_layers) == ("full", "uniform", 1)
    with pytest.raises(ValueError, match="recompute='layers' is not one of none, selective, full"):
        transformer_config(dims, recompute="layers")


@pytest.fixture(scope="module", params=[1, 2], ids=["tp1", "tp2"])
def checks(request, tmp_path_factory):
    return run_torchrun("recompute.py", request.param, tmp_path=tmp_path_factory.mktemp("recompute"))


def test_recompute_gives_the_same_loss_and_gradients(checks):
    parity = checks["parity"]
    assert parity["none"]["grad_max_abs"] > 1e-2, parity  # real gradients
    for mode in ("selective", "full"):
        assert parity[mode]["loss_diff"] < 1e-6, (mode, parity)
        assert parity[mode]["grad_max_diff"] < 1e-6, (mode, parity)


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_recompute_keeps_fewer_activations_exactly_as_planned(checks, dtype):
    saved = {mode: checks["saved"][f"{dtype}/{mode}"] for mode in MODES}
    per_layer = {mode: s["layer_bytes_per_token"] for mode, s in saved.items()}
    # full keeps only each layer's input: hidden 64 x the dtype's bytes per token
    assert per_layer["full"] == 64 * {"fp32": 4, "bf16": 2}[dtype], per_layer
    # selective drops the core attention's internals: SDPA's log-sum-exp (4 heads / tp, fp32)
    assert per_layer["full"] * 10 < per_layer["selective"] < per_layer["none"], per_layer
    assert saved["full"]["four_layers_bytes"] * 5 < saved["none"]["four_layers_bytes"], saved
    for mode, s in saved.items():  # the planner counts the same bytes (selective: + a 4-byte mask-type tensor)
        assert s["planned_layer_bytes_per_token"] == pytest.approx(s["layer_bytes_per_token"], abs=0.1), (mode, s)
