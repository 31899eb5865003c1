"""Issue 20: the GPU-only adapters' paths that real megatron-core runs on CPU (TP=2 over gloo, one torchrun of
tests/dist/gpu_adapters.py): the SGLang weight hand-off across TP ranks and the memory stages around it,
generate_iter across the replica, FP8 token padding, and model checkpoints across the local and TE layer specs."""

import pytest

from tests.conftest import run_torchrun


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    return run_torchrun("gpu_adapters.py", 2, tmp_path=tmp_path_factory.mktemp("gpu_adapters"))


def test_each_trainer_tp_rank_hands_its_own_flattened_buckets_to_its_engine_rank(result):
    handoff = result["handoff"]
    assert len(handoff["origins"]) >= 10  # several buckets (64 KiB each), one update per bucket and dtype
    assert all(origins == [0, 1] for origins in handoff["origins"])  # engine rank i got trainer rank i's payload
    assert handoff["same_names"] and handoff["bit_exact"]  # every HF weight, bit for bit


def test_memory_moves_in_stages_around_the_weight_sync(result):
    calls = result["handoff"]["calls"]
    updates = [i for i, c in enumerate(calls) if c.startswith("update:")]
    assert all(calls[i] == "update:flattened_bucket:False" for i in updates)
    first_sync = calls[:calls.index("flush_cache") + 1]
    # the first sync: the engine has never slept, so nothing is resumed
    assert first_sync[:2] == ["trainer.release(offload=True)", "begin_weight_update"]
    assert first_sync[-2:] == ["end_weight_update", "flush_cache"]
    rest = calls[len(first_sync):]
    # sleep: the KV cache (and CUDA graphs), then the weights, then the trainer takes its memory back
    assert rest[:3] == ["release:kv_cache,cuda_graph", "release:weights", "trainer.reclaim"]
    # sync: the trainer frees its memory, the weights come back, stream in, and only then the KV cache
    assert rest[3:6] == ["trainer.release(offload=True)", "resume:weights", "begin_weight_update"]
    assert rest[-3:] == ["end_weight_update", "flush_cache", "resume:kv_cache,cuda_graph"]
    assert result["peer_calls"] == ["trainer.release(offload=True)", "trainer.reclaim", "trainer.release(offload=True)"]


def test_generate_iter_streams_the_leaders_samples_to_the_whole_replica(result):
    expected = [[row, [5 + row, 6, 7 + row], [row + 10, row + 11]] for row in [3, 0, 5, 1, 4, 2]]
    assert result["stream_0"] == result["stream_1"] == expected


def test_fp8_padding_keeps_the_log_probs(result):
    padding = result["fp8_padding"]
    assert padding["mask_shapes"] == [[2, 16]]  # the loss saw 13 tokens padded to 16...
    assert padding["shape"] == [2, 13]  # ...and the caller gets its own length back
    assert padding["max_diff"] < 1e-5


def test_model_checkpoints_load_across_the_local_and_te_layer_specs(result):
    specs = result["specs"]
    assert specs["te_like_has_extra_state"] == ["final_layernorm", "k_layernorm", "linear_fc1", "linear_fc2",
                                                "linear_proj", "linear_qkv", "q_layernorm"]
    assert specs["local_into_te"] == 0.0 and specs["te_into_local"] == 0.0
