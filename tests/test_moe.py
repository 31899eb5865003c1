"""Issue 22: Qwen3-MoE students and teachers with expert parallelism (real megatron-core over gloo).

Megatron against Hugging Face at EP=1, EP=2 and TP=2 x EP=2; an EP=2 training step against EP=1 (with the
router aux loss on, and expert-load metrics checked against HF's own routing); conversion both ways across
EP/TP/PP, bit-exact; the streaming exporter with experts; the rollout engine's per-expert weight views; scoring
in lockstep when experts span replicas; config errors; and a G-OPD run with an EP=2 student and a dedicated
EP=2 teacher that resumes exactly."""

import json

import numpy as np
import pytest
import torch

from tests.conftest import make_tiny_checkpoints, run_torchrun
from tests.test_tools import hf_tensors, run
from tests.test_trainer import launch, metrics, write_run
from tests.tiny import save_tiny_hf, tiny_hf_config, tiny_hf_model

ARCHS = "qwen3_moe,qwen3_moe_step2"  # top-2 renormalised with one dense layer; top-2 of all, every 2nd layer sparse
# Adam normalises each gradient element by its own magnitude, so an element whose gradient is ~1e-10 (float
# noise) moves by up to lr in either run: eps 1e-6 keeps such elements' updates proportional to their gradients.
TRAIN = ("--train", "--archs", ARCHS, "--moe-aux-loss-coef", "0.01", "--adam-eps", "1e-6", "--save-weights")


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    out = tmp_path_factory.mktemp("moe-ref")
    return run_torchrun("model_parity.py", 1, *TRAIN, tmp_path=out), out


def _weights(directory, arch):
    (path,) = directory.glob(f"*.json.{arch}.pt")
    return torch.load(path)


def test_ep2_logits_and_training_step_match_hf_and_ep1(one_process, tmp_path):
    ref, ref_dir = one_process
    got = run_torchrun("model_parity.py", 2, *TRAIN, "--ep", "2", tmp_path=tmp_path)
    for arch in ARCHS.split(","):
        a, b = ref[arch], got[arch]
        assert a["logits_max_diff"] < 1e-5 and b["logits_max_diff"] < 1e-5, arch
        for x, y in zip(a["steps"], b["steps"]):
            assert abs(x["loss"] - y["loss"]) < 1e-5 and abs(x["grad_norm"] - y["grad_norm"]) < 1e-5, (arch, x, y)
            assert abs(x["moe/aux_loss"] - y["moe/aux_loss"]) < 1e-5
            assert {k: v for k, v in x.items() if k.startswith("moe/tokens")} == \
                   {k: v for k, v in y.items() if k.startswith("moe/tokens")}
        before, after = _weights(ref_dir, arch), _weights(tmp_path, arch)
        assert sorted(before) == sorted(after)
        assert max((before[k] - after[k]).abs().max().item() for k in before) < 1e-5, arch
        assert np.abs(np.array(a["logprobs_after"]) - np.array(b["logprobs_after"])).max() < 1e-5
        # the first step's expert loads are exactly HF's routing of the same micro-batches, on both layouts;
        # the aux loss is megatron's switch loss recomputed from HF's router probabilities
        assert a["expert_counts"] == b["expert_counts"] == a["hf_expert_counts"], arch
        assert abs(a["steps"][0]["moe/aux_loss"] - a["hf_aux_loss"]) < 1e-5
        counts = np.array(a["hf_expert_counts"])
        assert a["steps"][0]["moe/tokens_per_expert_max"] == counts.max()
        assert a["steps"][0]["moe/imbalance_max"] == pytest.approx((counts.max(1) / counts.mean(1)).max())
        assert a["steps"][0]["moe/imbalance_max"] > 1.05  # random routers are unbalanced: the metric can fail


def test_tp2_ep2_logits_match_hf(tmp_path):
    result = run_torchrun("model_parity.py", 4, "--tp", "2", "--ep", "2", "--archs", ARCHS, tmp_path=tmp_path)
    assert all(result[arch]["logits_max_diff"] < 1e-5 for arch in ARCHS.split(",")), result


def test_scoring_stays_in_lockstep_when_experts_span_replicas(tmp_path):
    """Rank 0 scores two micro-batches, rank 1 none, then the reverse: without the dummy forwards the
    all-to-all of rank 0's forward waits forever for rank 1."""
    result = run_torchrun("moe_scoring.py", 2, tmp_path=tmp_path, timeout=120)
    assert [r["scored"] for r in result] == [2, 1]
    assert all(r["experts_span_replicas"] and r["max_diff"] < 1e-5 for r in result), result


def test_hf_megatron_hf_round_trip_across_ep_pp_and_tp_is_bit_exact(tmp_path):
    save_tiny_hf("qwen3_moe", tmp_path / "hf", seed=2)
    run("tools/convert_hf_to_megatron.py", "--hf-dir", str(tmp_path / "hf"), "--save-dir", str(tmp_path / "mg"),
        "--ep", "2", "--pp", "2", nproc=4)
    run("tools/convert_megatron_to_hf.py", "--load-dir", str(tmp_path / "mg"), "--save-dir", str(tmp_path / "back"),
        "--tp", "2", nproc=2)
    original, back = hf_tensors(tmp_path / "hf"), hf_tensors(tmp_path / "back")
    assert sorted(original) == sorted(back) and "model.layers.3.mlp.experts.3.down_proj.weight" in back
    assert all(torch.equal(original[k], back[k]) for k in original)
    from transformers import AutoModelForCausalLM

    _, info = AutoModelForCausalLM.from_pretrained(tmp_path / "back", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]


def test_exporter_gathers_experts_across_ep_and_pp_in_bounded_buckets(tmp_path):
    bucket = 64 << 10
    result = run_torchrun("export_weights.py", 4, "--pp", "2", "--ep", "2", "--archs", ARCHS,
                          "--bucket-bytes", str(bucket), tmp_path=tmp_path)
    for arch in ARCHS.split(","):
        for rank in (0, 1):  # both replicas' leaders receive every expert, half of which the other one holds
            receiver = result["ranks"][rank][arch]
            assert receiver["names_equal"] and receiver["bit_exact"], (arch, rank)
            assert receiver["total_bytes"] == receiver["model_bytes"] > 8 * bucket
        for rank in result["ranks"]:
            assert rank[arch]["peak_bytes"] <= max(bucket, rank[arch]["largest_weight_bytes"]) * 1.1, (arch, rank)


def test_rollout_engine_takes_hub_names_into_transformers_fused_experts(tmp_path):
    """The engine's per-expert views of transformers' fused expert tensors: loading the hub's per-expert
    tensors through them gives what transformers' own conversion (from_pretrained) gives, bit for bit."""
    from transformers import AutoModelForCausalLM

    from megatron_gopd.models.hf_io import hub_state_dict
    from megatron_gopd.rollout.hf_engine import HFRolloutEngine

    save_tiny_hf("qwen3_moe", tmp_path, seed=6)
    engine = HFRolloutEngine.from_pretrained(str(tmp_path))
    reference = AutoModelForCausalLM.from_pretrained(tmp_path)
    ours, theirs = engine.model.state_dict(), reference.state_dict()
    assert "model.layers.0.mlp.experts.gate_up_proj" in ours
    assert sorted(ours) == sorted(theirs) and all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert set(hub_state_dict(reference)) == set(hf_tensors(tmp_path))  # the exporter's names are the hub's


def test_moe_dims_and_parallel_errors():
    from megatron_gopd.models.architectures import ModelDims
    from megatron_gopd.runtime.layout import ParallelShape

    hub = dict(tiny_hf_config("qwen3_moe").to_dict(), num_experts=4)  # the hub's config.json key
    hub.pop("num_local_experts")
    dims = ModelDims.from_hf(hub)
    assert (dims.num_experts, dims.moe_topk, dims.moe_ffn_hidden_size, dims.moe_layers) == (4, 2, 48, (0, 2, 3))
    assert ModelDims.from_hf(tiny_hf_config("qwen3_moe_step2")).moe_layers == (1, 3)
    dims.check_parallel(2, 2, 4, 1)
    with pytest.raises(ValueError, match=r"^ep=3 does not divide num_experts=4$"):
        dims.check_parallel(1, 1, 3)
    with pytest.raises(ValueError, match=r"^etp=5 does not divide moe_intermediate_size=48$"):
        dims.check_parallel(1, 1, 1, 5)
    with pytest.raises(ValueError, match="expert parallelism needs a mixture-of-experts model"):
        ModelDims.from_hf(tiny_hf_config("qwen3")).check_parallel(1, 1, 2)
    with pytest.raises(ValueError, match=r"etp=1 x ep=4 must divide tp=1 x dp=2"):
        ParallelShape(dp=2, ep=4)
    assert ParallelShape(tp=2, ep=2, etp=1).experts_within_replica
    assert not ParallelShape(dp=2, ep=2).experts_within_replica


def test_local_expert_names_map_to_global_ones_local_spec_and_transformer_engine():
    """A rank's local experts (megatron's per-expert MLPs, or TE's grouped GEMM weights, GPU) name global ones."""
    from megatron_gopd.models.weights import local_to_global_name

    # pipeline stage from layer 2, EP rank holding experts 8-15
    assert local_to_global_name("decoder.layers.1.mlp.experts.local_experts.3.linear_fc1.weight", 2, 8) == \
        "decoder.layers.3.mlp.experts.local_experts.11.linear_fc1.weight"
    assert local_to_global_name("decoder.layers.1.mlp.experts.linear_fc2.weight3", 2, 8) == \
        "decoder.layers.3.mlp.experts.local_experts.11.linear_fc2.weight"
    assert local_to_global_name("decoder.layers.0.mlp.router.weight", 2, 8) == "decoder.layers.2.mlp.router.weight"


@pytest.fixture(scope="module")
def moe_checkpoints(tiny_checkpoints):
    """The tiny dense checkpoints plus moe_student and moe_math (Qwen3-MoE, same tokenizer), in one root."""
    return make_tiny_checkpoints(tiny_checkpoints, moe=True)


def moe_run(tmp_path, ckpts, steps, **overrides):
    """A 4-rank G-OPD run: an EP=2 MoE student (ranks 0-1, experts spread over its 2 replicas), the math teacher
    an MoE on 2 dedicated ranks (TP=2, EP=2 inside the replica), the code teacher the same MoE colocated (its
    per-domain scoring is unequal over the student's replicas: lockstep), and the colocated MoE reference
    (lam = 1.25)."""
    return write_run(tmp_path, ckpts, train__steps=steps, train__micro_batch_size=1, eval__interval=0,
                     **{"student": {"path": str(ckpts / "moe_student"), "parallel": {"ep": 2}},
                        "teachers": _teachers(ckpts), **overrides})


def _teachers(ckpts, math_placement="dedicated", math_parallel=None, code="moe_math", math_dp=1):
    return [{"name": "math", "path": str(ckpts / "moe_math"), "domains": ["math"], "placement": math_placement,
             "parallel": math_parallel or {"tp": 2, "ep": 2, "etp": 1}, "dp": math_dp},
            {"name": "code", "path": str(ckpts / code), "domains": ["code"]}]


def test_gopd_with_moe_student_and_dedicated_moe_teacher_resumes_exactly(moe_checkpoints, tmp_path):
    config = moe_run(tmp_path, moe_checkpoints, 2)
    full = launch(config, nproc=4)
    assert full.returncode == 0, full.stderr[-3000:]
    straight = metrics(tmp_path / "run")
    for step in (1, 2):
        m = straight[step]
        assert m["teacher/math/samples"] + m["teacher/code/samples"] == 4 and m["grad_norm"] > 0
        assert abs(m["mismatch/abs_mean"]) < 1e-5  # the rollout engine (transformers' MoE) matches the student
    # step 2 again, resumed from the step-1 checkpoint into another directory
    resumed = launch(config, "--resume", str(tmp_path / "run" / "checkpoints" / "step_00000001"),
                     f"train.output_dir={tmp_path / 'resumed'}", nproc=4)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from step 1" in resumed.stdout + resumed.stderr
    assert metrics(tmp_path / "resumed")[2] == straight[2]  # same samples, same losses, bit for bit


@pytest.mark.parametrize("teachers, overrides, world, error", [
    ({}, ["student.parallel.ep=3"], 4, "student.parallel: ep=3 does not divide num_experts=4"),
    ({}, ["student.parallel.tp=2"], 4, "student.parallel.tp: megatron trains a mixture of experts at tp > 1 only "
                                      "with sequence parallelism"),
    ({"math_parallel": {"ep": 2}, "math_dp": 2}, [], 4, "teachers[0].parallel: a dedicated model's expert groups "
                                                         "must stay inside one replica"),
    ({"math_placement": "colocated"}, ["algo.loss=full_vocab"], 2, "algo.loss: full_vocab runs teachers[0]'s"),
    ({}, ["student.moe_aux_loss_coef=-1"], 4, "student.moe_aux_loss_coef: must be >= 0"),
    ({"code": "code"}, [], 4, None),  # a dense colocated teacher beside an EP=2 student is fine
])
def test_moe_config_errors_name_the_key(teachers, overrides, world, error, moe_checkpoints, tmp_path):
    from megatron_gopd.config import ConfigError, load_config
    from megatron_gopd.preflight import check_run

    config = moe_run(tmp_path, moe_checkpoints, 1, teachers=_teachers(moe_checkpoints, **teachers))
    if error is None:
        check_run(load_config(config, overrides), world)
        return
    with pytest.raises(ConfigError) as raised:
        check_run(load_config(config, overrides), world)
    assert str(raised.value).startswith(error), str(raised.value)
