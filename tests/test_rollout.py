"""Issue 5: rollout engines. The transformers engine against the Megatron student, sampling filters, stop tokens,
and the SGLang adapter's request/response/weight handling (its engine itself is GPU-only)."""

import math

import pytest
import torch

from megatron_gopd.rollout.base import Sample, SamplingParams, samples_to_batch
from megatron_gopd.rollout.hf_engine import HFRolloutEngine, processed_logprobs, sample_next
from megatron_gopd.rollout.sglang_engine import parse_sglang_output, sampling_params_to_sglang, weight_buckets
from tests.conftest import run_torchrun
from tests.tiny import tiny_hf_model


@pytest.mark.parametrize("tp", [1, 2])
def test_engine_matches_megatron_student_before_and_after_a_step(tp, tmp_path):
    result = run_torchrun("rollout_sync.py", tp, "--tp", str(tp), tmp_path=tmp_path)
    assert result["response_tokens"] > 40
    assert result["diff_before"] < 1e-4
    assert result["greedy_matches_student_argmax"]
    assert result["responses_changed"] > 0  # the new weights reached the engine...
    assert result["diff_after"] < 1e-4  # ...and it matches the updated student again


def test_top_k_and_top_p_never_sample_outside_their_sets():
    logits = torch.log(torch.tensor([[0.4, 0.25, 0.15, 0.1, 0.06, 0.04]])).repeat(4000, 1)
    generator = torch.Generator().manual_seed(0)
    for params, allowed in [
        (SamplingParams(top_k=2), {0, 1}),
        (SamplingParams(top_p=0.7), {0, 1, 2}),  # 0.4 + 0.25 < 0.7, so the third token is still needed
        (SamplingParams(top_p=0.6), {0, 1}),  # 0.4 + 0.25 already reaches 0.6
        (SamplingParams(top_k=3, top_p=0.55), {0, 1}),  # top-p acts on the top-k renormalised: 0.5, 0.31, 0.19
        (SamplingParams(top_k=3, top_p=0.5), {0}),
    ]:
        tokens, lp = sample_next(logits, params, generator)
        assert set(tokens.tolist()) == allowed, params
        # the reported log-prob is that of the renormalised distribution that was sampled from
        probs = torch.softmax(logits[0], -1)[sorted(allowed)]
        expected = torch.log(probs / probs.sum())
        assert torch.allclose(lp, expected[tokens], atol=1e-6)
    lp = processed_logprobs(logits[:1], SamplingParams(temperature=0.5))
    assert torch.allclose(lp, torch.log_softmax(logits[:1] / 0.5, -1))


def test_greedy_is_deterministic_and_stop_tokens_end_samples(tmp_path):
    hf = tiny_hf_model("llama", seed=4)
    hf.config.save_pretrained(tmp_path)
    engine = HFRolloutEngine(str(tmp_path))
    engine.sync_weights(hf.state_dict().items())
    prompts = [[5, 17, 42], [7, 7, 9, 100, 3]]
    greedy = SamplingParams(temperature=0.0, max_new_tokens=10)
    first, second = engine.generate(prompts, greedy), engine.generate(prompts, greedy)
    assert [s.response_ids for s in first] == [s.response_ids for s in second]
    assert all(s.finish_reason == "length" and len(s.response_ids) == 10 for s in first)
    with torch.no_grad():  # greedy == argmax of the model, token by token
        ids = torch.tensor([prompts[0] + first[0].response_ids])
        assert hf(ids).logits[0, 2:-1].argmax(-1).tolist() == first[0].response_ids

    row = first[0].response_ids
    stop_at = next(i for i, t in enumerate(row) if t not in row[:i] and i >= 2)
    stopped = engine.generate(prompts, SamplingParams(temperature=0.0, max_new_tokens=10, stop_token_ids=(row[stop_at],)))
    assert stopped[0].response_ids == row[: stop_at + 1]  # the stop token is kept, nothing after it
    assert stopped[0].finish_reason == "stop" and len(stopped[0].logprobs) == stop_at + 1


def test_sampling_params_are_validated():
    for bad in [dict(temperature=-1), dict(top_p=0.0), dict(top_k=-2), dict(max_new_tokens=0)]:
        with pytest.raises(ValueError, match=next(iter(bad))):
            SamplingParams(**bad)


def test_samples_to_batch_aligns_rollout_logprobs_with_tokens():
    batch = samples_to_batch([Sample([1, 2], [3, 4, 5], [-0.1, -0.2, -0.3], "stop")], seq_len=7, pad_id=0)
    assert batch["tokens"].tolist() == [[1, 2, 3, 4, 5, 0, 0]]
    assert batch["response_mask"].tolist() == [[0, 0, 1, 1, 1, 0, 0]]
    assert torch.allclose(batch["rollout_lp"], torch.tensor([[0, 0, -0.1, -0.2, -0.3, 0, 0]]))
    with pytest.raises(ValueError, match="more than the batch length"):
        samples_to_batch([Sample([1, 2], [3, 4, 5], [0.0] * 3, "stop")], seq_len=4)


def test_sglang_request_and_result_formats():
    request = sampling_params_to_sglang(SamplingParams(temperature=0.7, max_new_tokens=5, stop_token_ids=(2,), seed=9))
    assert request["temperature"] == 0.7 and request["max_new_tokens"] == 5 and request["stop_token_ids"] == [2]
    assert request["sampling_seed"] == 9 and request["top_k"] == -1
    with pytest.raises(ValueError, match="top_p=1 and top_k=0"):
        sampling_params_to_sglang(SamplingParams(top_p=0.9))
    # the structure sglang 0.5.x returns from Engine.generate(input_ids=..., return_logprob=True)
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
    buckets = list(weight_buckets(iter(stream), bucket_bytes=100, device="cpu"))
    assert [len(b) for b in buckets] == [2, 2, 2, 1]
    assert [n for b in buckets for n, _ in b] == [n for n, _ in stream]
    assert all(torch.equal(t, dict(stream)[n]) for b in buckets for n, t in b)


@pytest.mark.gpu
def test_sglang_engine_matches_transformers_engine(tmp_path):
    pytest.importorskip("sglang", reason="needs the gpu extra (SGLang)")
    from megatron_gopd.rollout.sglang_engine import SGLangRolloutEngine

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
        engine.wake()
        assert not math.isnan(engine.generate([[5, 6, 7]], params)[0].logprobs[0])
    finally:
        engine.shutdown()


def test_sglang_engine_releases_and_resumes_only_in_turn():
    """Issue 5: wake() on an engine never slept (the first weight sync) must not call sglang's resume, and
    sleep() twice (the last step, then shutdown) releases once."""
    from megatron_gopd.rollout.sglang_engine import SGLangRolloutEngine

    calls = []

    class FakeSGLang:
        def release_memory_occupation(self):
            calls.append("release")

        def resume_memory_occupation(self):
            calls.append("resume")

    engine = object.__new__(SGLangRolloutEngine)  # its __init__ starts a real sglang.Engine on a GPU
    engine.engine, engine.asleep = FakeSGLang(), False
    engine.wake()
    assert calls == []
    engine.sleep()
    engine.sleep()
    engine.wake()
    engine.wake()
    engine.sleep()
    assert calls == ["release", "resume", "release"]


def test_trainer_sleeps_the_engine_before_the_update_and_wakes_it_for_the_sync(monkeypatch):
    """Issue 5: Trainer.run's order of rollout and training phases, with the phases and the run faked (no
    process groups)."""
    import contextlib
    from types import SimpleNamespace

    from megatron_gopd.trainer import StepData, Trainer

    calls = []

    class Rollout:
        def sleep(self):
            calls.append("sleep")

        def sync_weights(self):
            calls.append("sync")

    class Logger:
        @contextlib.contextmanager
        def phase(self, name):
            calls.append(name)
            yield

        def log(self, step, metrics, **kwargs):
            calls.append("log")

    class FakeTrainer(Trainer):
        def rollout(self, step):
            return StepData([], [], [[5, 6]], ["length"], 4)

        def add_old_logprobs(self, data):
            pass

        def add_frozen_logprobs(self, data):
            pass

        def add_advantages(self, data):
            return {}

        def update(self, data):
            calls.append("train_step")
            return {}

        def save(self, step):
            pass

    cfg = SimpleNamespace(eval=SimpleNamespace(interval=0), train=SimpleNamespace(steps=2),
                          checkpoint=SimpleNamespace(interval=100), algo=SimpleNamespace(updates_per_batch=1))
    run = SimpleNamespace(config=cfg, trainer_state={}, start_step=0, rollout=Rollout(), logger=Logger(),
                          dataset=SimpleNamespace(report=SimpleNamespace(as_metrics=dict)),
                          student=SimpleNamespace(pgc=SimpleNamespace(dp=None)), shutdown=lambda: calls.append("end"))
    trainer = FakeTrainer(run)
    trainer._stop_agreed = lambda: False
    monkeypatch.setattr("megatron_gopd.trainer._sum_over", lambda value, group: value)
    trainer.run()
    step = ["rollout", "sleep", "old_logprobs", "teachers", "update", "train_step", "weight_sync", "sync", "log"]
    assert calls == ["sync"] + step + step + ["checkpoint", "end"]
