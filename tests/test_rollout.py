"""Issue 5: rollout engines. The transformers engine against the Megatron student, sampling filters, stop tokens
(the SGLang adapter's tests are in test_sglang_engine.py)."""

import os
import shutil
import subprocess
import sys

import pytest
import torch

from megatron_gopd.models.hf_io import hub_parameters
from megatron_gopd.rollout.base import SamplingParams
from megatron_gopd.rollout.hf_engine import HFRolloutEngine, processed_logprobs, sample_next, shape_bucket
from tests.conftest import ROOT, run_torchrun
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


def test_transformers_engine_yields_rows_in_order_chunk_by_chunk(tmp_path):
    """Issue 20: generate_iter on the transformers engine is generate() one (row, sample) at a time."""
    hf = tiny_hf_model("llama", seed=4)
    hf.config.save_pretrained(tmp_path)
    engine = HFRolloutEngine(str(tmp_path), max_batch_size=2)
    engine.sync_weights(hf.state_dict().items())
    prompts = [[5, 17, 42], [7, 7, 9, 100, 3], [11, 12], [40, 41, 42, 43], [9]]
    params = SamplingParams(temperature=1.0, max_new_tokens=6, seed=8)
    stream = list(engine.generate_iter(prompts, params))
    assert [row for row, _ in stream] == [0, 1, 2, 3, 4]
    assert [s.response_ids for _, s in stream] == [s.response_ids for s in engine.generate(prompts, params)]
    assert all(s.prompt_ids == prompts[row] for row, s in stream)


NEEDS_COMPILER = pytest.mark.skipif(shutil.which(os.environ.get("CXX", "g++")) is None,
                                    reason="torch.compile on the CPU builds C++ and no compiler is installed")


def compiled_and_eager_llama(tmp_path, seed: int) -> tuple[HFRolloutEngine, HFRolloutEngine]:
    """A compiled and an eager engine holding the same tiny Llama's weights."""
    hf = tiny_hf_model("llama", seed=seed)
    hf.config.save_pretrained(tmp_path)
    compiled, eager = HFRolloutEngine(str(tmp_path), compile=True), HFRolloutEngine(str(tmp_path))
    for e in (compiled, eager):
        e.sync_weights(hf.state_dict().items())
    return compiled, eager


@NEEDS_COMPILER
@pytest.mark.parametrize("name", ["llama", "qwen2", "qwen3_moe"])  # Qwen3 dense: Qwen3-MoE's attention, Llama's MLP
def test_compiled_decoding_matches_eager_and_sees_weight_syncs(name, tmp_path):
    """Issue 21: rollout.compile. The static-cache decoding under torch.compile samples the eager engine's tokens,
    with its log-probs to float tolerance (compiled kernels round differently), for left-padded prompts in a batch
    padded to its bucket (3 rows -> 4), and an in-place weight sync reaches the compiled graph, which runs without
    its guards after each call's first step, also after a sleep released the cache and after dynamo's reset."""
    tiny_hf_model(name).config.save_pretrained(tmp_path)
    eager, compiled = HFRolloutEngine(str(tmp_path)), HFRolloutEngine(str(tmp_path), compile=True)
    prompts = [[5, 17, 42], [7, 7, 9, 100, 3], [11, 12]]
    params = SamplingParams(temperature=1.0, top_k=50, max_new_tokens=12, seed=3)
    responses, compile_seconds = [], []
    for seed in (4, 5):
        weights = hub_parameters(tiny_hf_model(name, seed=seed))
        for engine in (eager, compiled):
            engine.sync_weights(weights.items())
        want, got = eager.generate(prompts, params), compiled.generate(prompts, params)
        assert [s.response_ids for s in got] == [s.response_ids for s in want]
        for g, w in zip(got, want):
            assert len(g.logprobs) == 12
            assert torch.allclose(torch.tensor(g.logprobs), torch.tensor(w.logprobs), rtol=0, atol=1e-5)
        responses.append([s.response_ids for s in got])
        assert list(compiled._static_caches) == [(4, 32)] and compiled._compiled_buckets == {(4, 32): True}
        compile_seconds.append(compiled.compile_seconds)
        compiled.sleep()  # as between training steps: the cache goes, and the next call's prefill allocates anew
    assert responses[0] != responses[1]  # the second sync changed what the compiled graph computes
    assert compile_seconds[1] == compile_seconds[0] > 0  # no second warm-up after the sleep
    torch._dynamo.reset()  # the graphs are gone: each call's first step, still guarded, compiles the bucket again
    assert ([s.response_ids for s in compiled.generate(prompts, params)]
            == [s.response_ids for s in eager.generate(prompts, params)])


@NEEDS_COMPILER
def test_compiled_decoding_compiles_once_per_shape_bucket(tmp_path):
    """Issue 21: a new batch or cache-length bucket compiles; other prompt lengths and batches inside a bucket reuse
    its graph (dynamo's unique-graph count and the engine's compile time stand still), and the stop-token path works
    there too."""
    from torch._dynamo.utils import counters

    assert shape_bucket(3, 20, 16) == (4, 32) and shape_bucket(16, 141, 16) == (16, 256)
    assert shape_bucket(20, 33, 24) == (24, 64)  # never more rows than max_batch_size (nor fewer than the batch)
    engine, eager = compiled_and_eager_llama(tmp_path, seed=4)
    params = SamplingParams(temperature=1.0, max_new_tokens=8, seed=1)

    def graphs_and_seconds(prompts, params=params):
        assert ([s.response_ids for s in engine.generate(prompts, params)]
                == [s.response_ids for s in eager.generate(prompts, params)])
        return counters["stats"]["unique_graphs"], engine.compile_seconds

    first = graphs_and_seconds([[5, 17, 42], [7, 9]])  # bucket (2, 32)
    assert first[1] > 0
    assert graphs_and_seconds([[5] * 20, [8]]) == first  # 20 + 8 tokens still fit 32
    row = eager.generate([[5, 17, 42]], params)[0].response_ids
    stop = SamplingParams(temperature=1.0, max_new_tokens=8, seed=1, stop_token_ids=(row[2],))
    assert graphs_and_seconds([[5, 17, 42], [7, 9]], stop) == first
    grown = graphs_and_seconds([[5, 17, 42], [7, 9], [1, 2, 3]])  # bucket (4, 32)
    assert grown[0] > first[0] and grown[1] > first[1]
    assert list(engine._static_caches) == [(2, 32), (4, 32)]


@NEEDS_COMPILER
def test_compiled_decoding_past_the_recompile_limit_keeps_its_guards(tmp_path, monkeypatch):
    """Issue 21: a bucket's decode steps skip dynamo's guards only when the bucket has a graph of its own. Past
    dynamo's recompile limit a new bucket's step runs eagerly: that bucket keeps its guards (skipping them would
    raise), with a warning naming the limit, and still samples the eager engine's tokens."""
    monkeypatch.setattr(torch._dynamo.config, "recompile_limit", 1)
    engine, eager = compiled_and_eager_llama(tmp_path, seed=6)
    params = SamplingParams(temperature=1.0, max_new_tokens=30, seed=2)
    engine.generate([[5, 17, 42]], params)  # bucket (1, 64): the step's first graph, or none where others exist
    prompts = [[5, 17, 42], [7, 9], [1, 2, 3], [4], [8, 8]]  # bucket (8, 64), which no other test uses: past the limit
    with pytest.warns(UserWarning, match=r"8 rows x 64 cache positions has no compiled graph \(torch._dynamo"):
        got = engine.generate(prompts, params)
    assert engine._compiled_buckets[8, 64] is False
    assert [s.response_ids for s in got] == [s.response_ids for s in eager.generate(prompts, params)]


def test_rollout_compile_is_validated_and_auto_compiles_long_runs(monkeypatch):
    """Issue 21: rollout.compile takes auto | always | never (YAML reads on/off as booleans, which are refused
    naming the key); always needs the transformers engine; auto compiles when the run plans at least
    AUTO_COMPILE_DECODE_STEPS decode steps, and on a CPU without a C++ compiler stays eager (always is refused)."""
    from megatron_gopd.config import ConfigError, load_config
    from megatron_gopd.rollout.build import AUTO_COMPILE_DECODE_STEPS, compiles_decode

    monkeypatch.setattr("shutil.which", lambda name: f"/usr/bin/{name}")  # a compiler, on any test machine

    with pytest.raises(ConfigError, match=r"rollout.compile: True is not one of \['auto', 'always', 'never'\]"):
        load_config(overrides=["rollout.compile=on"])
    with pytest.raises(ConfigError, match="rollout.compile: always compiles the transformers engine"):
        load_config(overrides=["student.path=/x", "rollout.compile=always", "rollout.engine=sglang"])
    short = ["student.path=/x", "train.steps=10", "data.prompts_per_step=32", "rollout.chunk_size=16", "rollout.max_new_tokens=64"]
    assert not compiles_decode(load_config(overrides=short))  # 10 steps x 2 chunks x 64 tokens
    steps = -(-AUTO_COMPILE_DECODE_STEPS // (2 * 64))
    assert compiles_decode(load_config(overrides=short + [f"train.steps={steps}"]))
    assert not compiles_decode(load_config(overrides=short + [f"train.steps={steps}", "rollout.compile=never"]))
    assert compiles_decode(load_config(overrides=short + ["rollout.compile=always"]))
    monkeypatch.setattr("shutil.which", lambda name: None)
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    assert not compiles_decode(load_config(overrides=short + [f"train.steps={steps}"]))
    with pytest.raises(ValueError, match="rollout.compile: always needs a C\\+\\+ compiler"):
        compiles_decode(load_config(overrides=short + ["rollout.compile=always"]))


def test_sampling_params_are_validated():
    for bad in [dict(temperature=-1), dict(top_p=0.0), dict(top_k=-2), dict(max_new_tokens=0)]:
        with pytest.raises(ValueError, match=next(iter(bad))):
            SamplingParams(**bad)


@pytest.mark.parametrize("old_logprobs, updates_per_batch, pi_old_pass", [
    ("recompute", 1, True), ("auto", 2, True), ("auto", 1, False), ("train_forward", 1, False)])
def test_trainer_sleeps_the_engine_before_the_update_and_wakes_it_for_the_sync(old_logprobs, updates_per_batch,
                                                                              pi_old_pass, monkeypatch):
    """Issue 5: Trainer.train's order of rollout and training phases, with the phases and the session faked (no
    process groups). README: with algo.old_logprobs auto and one update per batch, pi_old is the update's own forward
    (tests/test_objectives.py), so no forward of the student's computes it; with two updates, one per step does."""
    import contextlib
    from types import SimpleNamespace

    from megatron_gopd.trainer import Trainer

    calls = []

    class Rollout:
        def sleep(self):
            calls.append("sleep")

        def sync_weights(self, version):
            calls.append(f"sync {version}")

    class Logger:
        @contextlib.contextmanager
        def phase(self, name):
            calls.append(name)
            yield

        def log(self, step, metrics, **kwargs):
            calls.append("log")

        def start(self, step):
            pass

    def student_forward(micro_batches, temperature):
        calls.append("student forward")
        return []

    class FakeTrainer(Trainer):
        def rollout(self, step):
            return SimpleNamespace(samples=[], micro_batches=[])

        def add_scores(self, batch):
            pass

        def prepare(self, batch):
            return {}

        def update(self, batch):
            calls.append("train_step")
            return {}

        def tokens_per_phase(self, batch, metrics):
            return {}

    cfg = SimpleNamespace(eval=SimpleNamespace(interval=0), train=SimpleNamespace(steps=2, resume="never"),
                          checkpoint=SimpleNamespace(interval=100), rollout=SimpleNamespace(temperature=1.0),
                          algo=SimpleNamespace(old_logprobs=old_logprobs, updates_per_batch=updates_per_batch))
    checkpointer = SimpleNamespace(restore=lambda resume: False, save=lambda step: None)
    session = SimpleNamespace(config=cfg, objective=SimpleNamespace(on_policy=True), rollout=Rollout(),
                              student=SimpleNamespace(expert_metrics=dict, token_logprobs=student_forward),
                              logger=Logger(), checkpointer=lambda states: checkpointer,
                              dataset=SimpleNamespace(report=SimpleNamespace(as_metrics=dict)),
                              shutdown=lambda: calls.append("end"))
    trainer = FakeTrainer(session)
    trainer._stop_agreed = lambda: False
    trainer.train()
    def step(k):  # the weights after step k's update carry version k
        pi_old = ["old_logprobs", "student forward"] if pi_old_pass else []
        return ["rollout", "sleep", *pi_old, "teachers", "update", "train_step", "weight_sync", f"sync {k}", "log"]
    assert calls == ["sync 0"] + step(1) + step(2) + ["checkpoint", "end"]


def test_the_engine_decodes_outside_the_cpu_compat_rewrite(tmp_path):
    """Issue 21: the CPU compatibility layer's CUDA-to-CPU rewrite (a torch function mode in front of every torch
    call) is for megatron; the transformers engine steps outside it while decoding, and it is back afterwards. In a
    process of its own: the layer, once applied, stays for the life of the process."""
    tiny_hf_model("llama", seed=4).save_pretrained(tmp_path)
    script = f"""
import torch
from torch.overrides import _get_current_function_mode_stack as modes
from megatron_gopd.rollout.base import SamplingParams
from megatron_gopd.rollout.hf_engine import HFRolloutEngine
from megatron_gopd.runtime import cpu_compat

assert cpu_compat.apply_if_needed()  # as in every training process on a CPU
engine = HFRolloutEngine.from_pretrained({str(tmp_path)!r})
seen, forward = [], engine.model.forward
engine.model.forward = lambda *a, **k: seen.append(list(modes())) or forward(*a, **k)
engine.generate([[5, 17, 42]], SamplingParams(temperature=1.0, max_new_tokens=3, seed=1))
assert len(seen) == 3 and all(cpu_compat._rewrite not in m for m in seen), seen
assert modes()[-1] is cpu_compat._rewrite
assert torch.zeros(1, device="cuda").device.type == "cpu"  # megatron's hard-coded CUDA still lands on the CPU
print("ok")
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, cwd=ROOT)
    assert proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]
