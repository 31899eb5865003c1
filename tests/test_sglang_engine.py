"""Issue 20: the SGLang rollout engine's adapter code on CPU, against stand-ins that check the formats read from
sglang 0.5.3's and 0.5.23's sources: the engine start outside torchrun's environment, the version floor, weight
update results, per-row seeds, memory stages, the flattened-bucket weight format, and generate_iter over sglang's
async API. The engine itself is GPU-only (the gpu-marked tests at the end)."""

import asyncio
import configparser
import math
import os
import sys
import types

import pytest
import torch

from megatron_gopd.rollout.base import SamplingParams
from megatron_gopd.rollout.sglang_engine import (
    MIN_SGLANG,
    FlatTensorMeta,
    SGLangRolloutEngine,
    WeightHandoff,
    check_sglang_version,
    flatten_by_dtype,
    parse_sglang_output,
    row_requests,
    sampling_params_to_sglang,
    weight_buckets,
)
from tests.conftest import ROOT
from tests.tiny import tiny_hf_model

TORCHRUN = {"RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "8", "LOCAL_WORLD_SIZE": "4", "GROUP_RANK": "0",
            "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29500", "TORCHELASTIC_USE_AGENT_STORE": "True",
            "TORCHELASTIC_RUN_ID": "job", "TORCHELASTIC_RESTART_COUNT": "0"}


@pytest.fixture
def fake_sglang(monkeypatch):
    """sglang's modules as the engine imports them, with an Engine that records its environment and arguments."""
    seen = {}

    class Engine:
        def __init__(self, **kwargs):
            seen["env"], seen["kwargs"] = dict(os.environ), kwargs

    modules = {name: types.ModuleType(name) for name in
               ["sglang", "sglang.srt", "sglang.srt.constants", "sglang.srt.utils", "sglang.srt.utils.patch_torch",
                "sglang.srt.weight_sync", "sglang.srt.weight_sync.tensor_bucket"]}
    modules["sglang"].__version__, modules["sglang"].Engine = "0.5.3", Engine
    constants = modules["sglang.srt.constants"]
    constants.GPU_MEMORY_TYPE_KV_CACHE, constants.GPU_MEMORY_TYPE_WEIGHTS = "kv_cache", "weights"
    modules["sglang.srt.utils"].MultiprocessingSerializer = types.SimpleNamespace(serialize=lambda obj, output_str: obj)
    modules["sglang.srt.utils.patch_torch"].monkey_patch_torch_reductions = lambda: seen.setdefault("patched", True)
    modules["sglang.srt.weight_sync.tensor_bucket"].FlattenedTensorMetadata = FlatTensorMeta
    for name, module in modules.items():
        monkeypatch.setitem(sys.modules, name, module)
        parent, _, child = name.rpartition(".")
        if parent:
            setattr(modules[parent], child, module)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    return seen, modules


def test_the_engine_starts_outside_torchruns_environment(fake_sglang, monkeypatch):
    seen, _ = fake_sglang
    for name, value in {**TORCHRUN, "CUDA_VISIBLE_DEVICES": "0,1,2,3"}.items():
        monkeypatch.setenv(name, value)
    engine = SGLangRolloutEngine("hf", deterministic=True)
    assert not set(TORCHRUN) & set(seen["env"])  # sglang's scheduler processes inherit none of it
    assert seen["env"]["CUDA_VISIBLE_DEVICES"] == "0,1,2,3"  # everything else stays
    assert all(os.environ[name] == value for name, value in TORCHRUN.items())  # restored for the trainer
    kwargs = seen["kwargs"]
    assert (kwargs["tp_size"], kwargs["base_gpu_id"], kwargs["enable_deterministic_inference"]) == (1, 3, True)
    assert kwargs["enable_memory_saver"] and kwargs["load_format"] == "dummy" and kwargs["skip_tokenizer_init"]
    assert seen["patched"]  # sglang's CUDA-IPC reductions, for the weight handles
    assert (engine.weight_tags, engine.cache_tags) == (["weights"], ["kv_cache"])  # 0.5.3: no CUDA-graph tag
    with pytest.raises(ValueError, match="tp_size 2 needs the TP group"):
        SGLangRolloutEngine("hf", tp_size=2)


def test_sglang_below_the_floor_is_refused(fake_sglang):
    seen, modules = fake_sglang
    modules["sglang"].__version__ = "0.5.2"  # no SamplingParams.sampling_seed: every request would fail
    with pytest.raises(RuntimeError, match=r"sglang 0.5.2 is too old .* needs >= 0.5.3"):
        SGLangRolloutEngine("hf")
    assert "kwargs" not in seen  # refused before anything started
    check_sglang_version("0.5.3")
    check_sglang_version("0.5.23")
    extras = configparser.ConfigParser()
    extras.read(ROOT / "setup.cfg")
    assert f"sglang>={MIN_SGLANG}" in extras["options.extras_require"]["gpu"].split()


class RecordingSGLang:
    """update_weights_from_tensor / begin / end answers as sglang gives them: (ok, message)."""

    def __init__(self, begin=(True, ""), update=(True, "Success"), end=(True, "")):
        self.answers, self.calls = {"begin": begin, "update": update, "end": end}, []

    def begin_weight_update(self):
        self.calls.append("begin")
        return self.answers["begin"]

    def update_weights_from_tensor(self, payloads, load_format=None, flush_cache=True):
        self.calls.append((len(payloads), load_format, flush_cache))
        return self.answers["update"]

    def end_weight_update(self):
        self.calls.append("end")
        return self.answers["end"]

    def flush_cache(self):
        self.calls.append("flush")

    def release_memory_occupation(self, tags):
        self.calls.append(("release", tags))

    def resume_memory_occupation(self, tags):
        self.calls.append(("resume", tags))


def engine_over(sglang) -> SGLangRolloutEngine:
    engine = object.__new__(SGLangRolloutEngine)  # its __init__ starts a real sglang.Engine on a GPU
    engine.engine, engine.released = sglang, set()
    engine.handoff = WeightHandoff(1 << 10, serializer=(lambda payload: payload, FlatTensorMeta))
    engine.weight_tags, engine.cache_tags = ["weights"], ["kv_cache", "cuda_graph"]
    return engine


def test_weight_update_results_are_checked():
    weights = [("a", torch.ones(4)), ("b", torch.zeros(2, 3, dtype=torch.bfloat16))]
    ok = RecordingSGLang()
    engine_over(ok).sync_weights(iter(weights))
    assert ok.calls == ["begin", (1, "flattened_bucket", False), (1, "flattened_bucket", False), "end", "flush"]
    for answers, message in [({"begin": (False, "a session is open")}, "begin_weight_update failed: a session"),
                             ({"update": (False, "shape mismatch")}, "rejected a weight update: shape mismatch"),
                             ({"end": (False, "finalize failed")}, "end_weight_update failed: finalize")]:
        with pytest.raises(RuntimeError, match=message):
            engine_over(RecordingSGLang(**answers)).sync_weights(iter(weights))


def test_memory_is_released_and_resumed_in_stages_and_only_in_turn():
    sglang = RecordingSGLang()
    engine = engine_over(sglang)
    engine.wake_weights()  # the first weight sync: never released, so nothing to resume
    engine.wake_cache()
    assert sglang.calls == []
    engine.sleep()
    engine.sleep()  # the last step, then shutdown: released once
    engine.wake_weights()
    engine.wake_weights()
    engine.wake_cache()
    assert sglang.calls == [("release", ["kv_cache", "cuda_graph"]), ("release", ["weights"]),
                            ("resume", ["weights"]), ("resume", ["kv_cache", "cuda_graph"])]


def test_every_row_gets_its_own_seed():
    params = SamplingParams(temperature=0.7, max_new_tokens=5, stop_token_ids=(2,), seed=1234)
    requests = row_requests(params, 8)  # e.g. 2 prompts x 4 samples: duplicates must sample differently
    seeds = [r["sampling_seed"] for r in requests]
    assert len(set(seeds)) == 8 and all(0 <= s < 2**31 for s in seeds)  # sglang holds them in int32
    assert [r["sampling_seed"] for r in row_requests(params, 8)] == seeds  # a resumed step asks the same
    other_step = [r["sampling_seed"] for r in row_requests(SamplingParams(seed=1235), 8)]
    assert not set(other_step) & set(seeds)
    unseeded = [r["sampling_seed"] for r in row_requests(SamplingParams(), 8)]
    assert len(set(unseeded)) == 8
    assert all({k: v for k, v in r.items() if k != "sampling_seed"} == sampling_params_to_sglang(params)
               for r in requests)


def test_request_and_result_formats():
    request = sampling_params_to_sglang(SamplingParams(temperature=0.7, max_new_tokens=5, stop_token_ids=(2,)))
    assert request["temperature"] == 0.7 and request["max_new_tokens"] == 5 and request["stop_token_ids"] == [2]
    assert request["top_k"] == -1 and request["no_stop_trim"]
    with pytest.raises(ValueError, match="top_p=1 and top_k=0"):
        sampling_params_to_sglang(SamplingParams(top_p=0.9))
    # the structure sglang 0.5.x returns from Engine.(async_)generate(input_ids=..., return_logprob=True)
    output = {"output_ids": [11, 12, 2], "meta_info": {
        "finish_reason": {"type": "stop", "matched": 2},
        "output_token_logprobs": [(-0.5, 11, None), (-1.25, 12, None), (-0.01, 2, None)]}}
    sample = parse_sglang_output([1, 2, 3], output)
    assert sample.response_ids == [11, 12, 2] and sample.logprobs == [-0.5, -1.25, -0.01]
    assert sample.finish_reason == "stop"
    length = {"output_ids": [4], "meta_info": {"finish_reason": {"type": "length", "length": 1},
                                                "output_token_logprobs": [(-2.0, 4, None)]}}
    assert parse_sglang_output([1], length).finish_reason == "length"
    with pytest.raises(RuntimeError, match="aborted"):
        parse_sglang_output([1], {"output_ids": [], "meta_info": {"finish_reason": {"type": "abort"},
                                                                   "output_token_logprobs": []}})


def test_weight_buckets_respect_the_size_and_keep_order():
    stream = [(f"w{i}", torch.full((10,), float(i))) for i in range(7)]  # 40 bytes each
    buckets = list(weight_buckets(iter(stream), bucket_bytes=100))
    assert [len(b) for b in buckets] == [2, 2, 2, 1]
    assert [n for b in buckets for n, _ in b] == [n for n, _ in stream]


def sglang_0_5_3_reconstruct(payload):
    """FlattenedTensorBucket.reconstruct_tensors of sglang 0.5.3: slice, reshape, cast if the dtype differs."""
    flat = payload["flattened_tensor"]
    return [(m.name, flat[m.start_idx:m.end_idx].reshape(m.shape).to(m.dtype)) for m in payload["metadata"]]


def sglang_0_5_23_reconstruct(payload):
    """... of sglang 0.5.23: slice, view as the dtype, reshape."""
    flat = payload["flattened_tensor"]
    return [(m.name, flat[m.start_idx:m.end_idx].view(m.dtype).reshape(m.shape)) for m in payload["metadata"]]


def test_flattened_buckets_round_trip_bit_exact_under_both_sglang_readers():
    g = torch.Generator().manual_seed(0)
    bucket = [("embed", torch.randn(7, 5, generator=g)),
              ("q_norm", torch.randn(3, generator=g).to(torch.bfloat16)),
              ("fc1", torch.randn(4, 6, generator=g)[:, ::2]),  # not contiguous
              ("scale", torch.tensor(float("nan"))),  # a 0-d tensor, NaN kept bit for bit
              ("lm_head", torch.randn(2, 3, 4, generator=g).to(torch.bfloat16))]
    payloads = flatten_by_dtype(bucket)
    assert [p["flattened_tensor"].dtype for p in payloads] == [torch.float32, torch.bfloat16]  # one per dtype
    assert [p["flattened_tensor"].numel() for p in payloads] == [35 + 12 + 1, 3 + 24]
    for reconstruct in (sglang_0_5_3_reconstruct, sglang_0_5_23_reconstruct):
        rebuilt = dict(item for p in payloads for item in reconstruct(p))
        assert sorted(rebuilt) == sorted(dict(bucket))
        for name, tensor in bucket:
            assert rebuilt[name].dtype == tensor.dtype and rebuilt[name].shape == tensor.shape
            assert torch.equal(rebuilt[name].view(-1).view(torch.uint8),
                               tensor.contiguous().view(-1).view(torch.uint8)), name
    flat = payloads[0]["flattened_tensor"]
    flat.zero_()  # a copy: the trainer's tensors are untouched
    assert bucket[0][1].abs().sum() > 0 and math.isnan(bucket[3][1])


class OutOfOrderSGLang:
    """sglang.Engine's async API as generate_iter uses it: one async_generate per prompt on the engine's loop;
    row r finishes after a delay that makes the completion order differ from the submission order."""

    def __init__(self):
        self.loop, self.requests = asyncio.new_event_loop(), {}

    async def async_generate(self, input_ids, sampling_params, return_logprob):
        row = input_ids[0]
        self.requests[row] = sampling_params
        await asyncio.sleep(0.002 * ((row * 7) % 5))
        return {"output_ids": [row, 99], "meta_info": {"finish_reason": {"type": "length"},
                                                        "output_token_logprobs": [(-0.5, row, None), (-1.0, 99, None)]}}


def test_generate_iter_submits_everything_and_yields_rows_as_they_finish():
    sglang = OutOfOrderSGLang()
    engine = engine_over(sglang)
    prompts = [[row, 1, 2] for row in range(10)]
    params = SamplingParams(max_new_tokens=2, seed=5)
    stream = list(engine.generate_iter(prompts, params))
    rows = [row for row, _ in stream]
    assert sorted(rows) == list(range(10)) and rows != list(range(10))  # each once, not in submission order
    assert all(sample.prompt_ids == prompts[row] and sample.response_ids == [row, 99] for row, sample in stream)
    assert [sglang.requests[row]["sampling_seed"] for row in range(10)] == [
        r["sampling_seed"] for r in row_requests(params, 10)]
    samples = engine.generate(prompts, params)  # the same, in prompt order
    assert [s.response_ids for s in samples] == [[row, 99] for row in range(10)]
    sglang.loop.close()


@pytest.mark.gpu
def test_flattened_buckets_with_sglangs_own_reader():
    pytest.importorskip("sglang", reason="needs the gpu extra (SGLang)")
    from sglang.srt.weight_sync.tensor_bucket import FlattenedTensorBucket, FlattenedTensorMetadata

    bucket = [("a", torch.randn(5, 3, device="cuda")), ("b", torch.randn(4, device="cuda").to(torch.bfloat16)),
              ("c", torch.randn(2, 2, device="cuda"))]
    for payload in flatten_by_dtype(bucket, FlattenedTensorMetadata):
        rebuilt = FlattenedTensorBucket(flattened_tensor=payload["flattened_tensor"],
                                        metadata=payload["metadata"]).reconstruct_tensors()
        for name, tensor in rebuilt:
            assert torch.equal(tensor, dict(bucket)[name]), name


@pytest.mark.gpu
def test_sglang_engine_matches_transformers_engine(tmp_path):
    pytest.importorskip("sglang", reason="needs the gpu extra (SGLang)")
    hf = tiny_hf_model("qwen3", seed=1).to(torch.bfloat16)
    hf.save_pretrained(tmp_path)
    engine = SGLangRolloutEngine(str(tmp_path), dtype="bfloat16", mem_fraction_static=0.2)
    try:
        engine.sync_weights(hf.state_dict().items())
        params = SamplingParams(temperature=0.0, max_new_tokens=8)
        samples = engine.generate([[5, 6, 7]], params)
        with torch.no_grad():
            ids = torch.tensor([[5, 6, 7] + samples[0].response_ids]).cuda()
            greedy = hf.cuda()(ids).logits[0, 2:-1].argmax(-1).tolist()
        assert greedy == samples[0].response_ids
        engine.sleep()
        engine.wake_weights()
        engine.sync_weights(hf.state_dict().items())
        engine.wake_cache()
        rows = dict(engine.generate_iter([[5, 6, 7], [8, 9]], params))
        assert rows[0].response_ids == samples[0].response_ids and len(rows) == 2
    finally:
        engine.shutdown()


@pytest.mark.gpu
def test_colocated_sglang_run_on_one_gpu(tiny_checkpoints_bf16, tmp_path):
    """The trainer under torchrun with the SGLang engine sharing the GPU: the engine starts inside torchrun's
    environment, takes flattened weights each step, hands memory back and forth in stages (with the optimizer
    offloaded), and its log-probs match the bf16 student's."""
    pytest.importorskip("sglang", reason="needs the gpu extra (SGLang)")
    from tests.test_trainer import launch, metrics, write_run

    teachers = [{"name": name, "path": str(tiny_checkpoints_bf16 / name), "domains": [name], "dtype": "bf16"}
                for name in ("math", "code")]
    config = write_run(tmp_path, tiny_checkpoints_bf16, train__steps=2, student__dtype="bf16",
                       reference={"dtype": "bf16"}, teachers=teachers)
    done = launch(config, "rollout.engine=sglang", "rollout.sglang_mem_fraction=0.3", "train.offload_optimizer=true",
                  nproc=1)
    assert done.returncode == 0, done.stderr[-3000:]
    m = metrics(tmp_path / "run")
    for step in (1, 2):
        assert math.isfinite(m[step]["loss"]) and m[step]["grad_norm"] > 0, m[step]
        assert abs(m[step]["mismatch/abs_mean"]) < 5e-2, m[step]


class Rank:
    """A stand-in process group, seen from one of its ranks."""

    def __init__(self, rank: int):
        self._rank = rank

    def rank(self) -> int:
        return self._rank


@pytest.mark.parametrize("tp, engine_tp, engine_ranks", [(2, None, 2), (2, 2, 2), (2, 1, 1), (4, None, 4),
                                                         (4, 1, 1), (1, None, 1)])
def test_the_engine_spans_engine_tp_of_the_first_stages_tp_ranks(tp, engine_tp, engine_ranks, tmp_path, monkeypatch):
    """README: the SGLang engine runs on rollout.engine_tp of each replica's first-stage TP ranks (default: the
    student's TP), and each of those trainer ranks hands its weights to its own engine rank. build_rollout on every
    rank of a TP x PP=2 replica, with the process groups stood in: the leader alone starts an engine, of
    engine_ranks GPUs (over its TP group when more than one); first-stage TP ranks 1 .. engine_ranks-1 get a
    WeightHandoff over their TP group; no other rank takes part."""
    from megatron_gopd.config import load_config
    from megatron_gopd.rollout import build, sglang_engine
    from tests.runs import minimal_config

    cfg = load_config(minimal_config(tmp_path), ["rollout.engine=sglang", f"student.parallel.tp={tp}",
                                                 "student.parallel.pp=2",
                                                 f"rollout.engine_tp={'null' if engine_tp is None else engine_tp}"])
    engines, handoffs = [], []
    monkeypatch.setattr(build, "make_engine",
                        lambda cfg, tp_size, tp_group: engines.append((tp_size, tp_group)) or object())
    monkeypatch.setattr(sglang_engine, "WeightHandoff", lambda bucket_bytes, group: handoffs.append(group) or object())
    tp_groups = {}
    for pp_rank in range(2):
        for tp_rank in range(tp):
            tp_groups[tp_rank, pp_rank] = Rank(tp_rank)
            pgc = types.SimpleNamespace(mp=Rank(pp_rank * tp + tp_rank), tp=tp_groups[tp_rank, pp_rank],
                                        pp=Rank(pp_rank))
            rollout = build.build_rollout(cfg, None, types.SimpleNamespace(pg_collection=pgc), None, None)
            assert rollout.engine_ranks == engine_ranks
    assert engines == [(engine_ranks, tp_groups[0, 0] if engine_ranks > 1 else None)]
    assert handoffs == [tp_groups[r, 0] for r in range(1, engine_ranks)]
