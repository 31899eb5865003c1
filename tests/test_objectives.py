"""Issue 8: GRPO and SFT through the trainer's own machinery, on a 16-token tiny model."""

import json
import subprocess
import sys

import pytest
import yaml

from tests.conftest import ROOT, run_torchrun
from tests.runs import launch, metrics
from tests.tiny import save_tiny_hf


@pytest.fixture(scope="module")
def small_vocab_model(tmp_path_factory):
    root = tmp_path_factory.mktemp("vocab16")
    save_tiny_hf("qwen3_vocab16", root / "hf", seed=0, tokenizer_vocab=16)
    subprocess.run([sys.executable, "tools/convert_hf_to_megatron.py", "--hf-dir", str(root / "hf"),
                    "--save-dir", str(root / "ckpt")], check=True, cwd=ROOT, capture_output=True)
    rows = [{"prompt": f"t{5 + i % 11} t{5 + (i * 5) % 11}", "domain": "toy", "answer": "t7", "response": "t7"}
            for i in range(32)]
    (root / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def config(root, tmp_path, **algo):
    cfg = {
        "student": {"path": str(root / "ckpt")},
        "algo": algo,
        "rollout": {"max_new_tokens": 1, "samples_per_prompt": 8},
        "data": {"train": [str(root / "data.jsonl")], "prompts_per_step": 8, "max_prompt_len": 16},
        "train": {"steps": 10, "micro_batch_size": 16, "output_dir": str(tmp_path / "run"), "seed": 3},
        "optim": {"lr": 1e-2},
        "checkpoint": {"interval": 100},
        "log": {"progress": False, "tensorboard": False},
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="module")
def grpo_run(small_vocab_model, tmp_path_factory):
    """10 GRPO steps of 8 prompts x 8 one-token samples; the reward is 1 for "t7" (1 token in 16)."""
    tmp = tmp_path_factory.mktemp("grpo")
    result = launch(config(small_vocab_model, tmp, name="grpo", tis_cap=None), nproc=1)
    assert result.returncode == 0, result.stderr[-3000:]
    return metrics(tmp / "run")


def test_grpo_raises_the_verifier_reward(grpo_run):
    """From about 1/16 to about 1 (rerun with train.seed 1-7 and 1-2 threads: the first step's reward was 0.03-0.06
    and the last 0.98-1.0; with 64 samples per step the standard error is at most 0.06)."""
    first, last = grpo_run[1]["grpo/reward"], grpo_run[10]["grpo/reward"]  # step 1 samples from the initial policy
    assert first < 0.2
    assert last > 0.8, (first, last)
    # one update per batch: the update's forward is pi_old's, so the PPO ratio is exactly 1 and nothing is clipped
    assert all(grpo_run[step]["actor/pg_clip_frac"] == 0 for step in range(1, 11))


def test_a_second_update_on_the_same_batch_is_clipped(small_vocab_model, tmp_path):
    """algo.updates_per_batch=2: the second update sees the policy the first one moved (at lr 1e-2, far beyond
    the ratio range 1 +- 0.2), which is where the PPO clip acts."""
    result = launch(config(small_vocab_model, tmp_path, name="grpo", tis_cap=None, updates_per_batch=2),
                    "train.steps=1", nproc=1)
    assert result.returncode == 0, result.stderr[-3000:]
    assert metrics(tmp_path / "run")[1]["actor/pg_clip_frac"] > 0.05


def test_grpo_kl_to_the_reference_enters_the_loss(grpo_run, small_vocab_model, tmp_path):
    """algo.kl_coef > 0 adds beta * KL(pi || pi_ref) (k3). At step 1 the policy is the reference: the KL and its
    gradient are 0, so step 1 equals the run without it; step 2 draws the same samples, but its gradient differs."""
    result = launch(config(small_vocab_model, tmp_path, name="grpo", tis_cap=None, kl_coef=0.5),
                    "train.steps=2", nproc=1)
    assert result.returncode == 0, result.stderr[-3000:]
    m = metrics(tmp_path / "run")
    assert abs(m[1]["grpo/kl_ref"]) < 1e-6 and m[2]["grpo/kl_ref"] > 1e-4
    assert m[1]["grad_norm"] == pytest.approx(grpo_run[1]["grad_norm"], rel=1e-6)
    assert m[2]["grpo/reward"] == grpo_run[2]["grpo/reward"]
    assert abs(m[2]["grad_norm"] - grpo_run[2]["grad_norm"]) > 1e-4 * grpo_run[2]["grad_norm"]


def test_sft_fits_the_dataset_responses(small_vocab_model, tmp_path):
    result = launch(config(small_vocab_model, tmp_path, name="sft"), nproc=1)
    assert result.returncode == 0, result.stderr[-3000:]
    m = metrics(tmp_path / "run")
    assert m[1]["sft/nll"] > 1.0
    assert m[10]["sft/nll"] < 0.2 * m[1]["sft/nll"]


def write_varied_prompts(path):
    """Prompts of 1 to 5 words (3 to 7 tokens with the chat template) whose reward is exact: "t7", and nothing else
    but special tokens (EOS included)."""
    rows = [{"prompt": " ".join(f"t{5 + (i * 3 + 2 * k) % 11}" for k in range(1 + i % 5)), "domain": "toy",
             "answer": "t7", "verifier": "exact"} for i in range(32)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_grpo_raises_the_reward_with_multi_token_responses_and_padding(small_vocab_model, tmp_path):
    """GRPO where credit must reach the right tokens of the right rows: responses of up to 4 tokens (the reward
    needs "t7" followed only by special tokens or EOS, so the tokens after the first matter too), prompts of 3 to 7 tokens
    (left-padded in the rollout, right-padded for training), and a step of 64 rows that spans 2 rollout chunks and
    4 micro-batches. A sign error, advantages on the wrong groups, or advantages shifted off each response's first
    token fail it (checked by injecting each); the next test checks the exact placement of the advantages."""
    write_varied_prompts(tmp_path / "varied.jsonl")
    path = config(small_vocab_model, tmp_path, name="grpo", tis_cap=5.0, aggregation="seq-mean-token-mean")
    cfg = yaml.safe_load(path.read_text())
    cfg["rollout"].update(max_new_tokens=4, chunk_size=32)
    cfg["data"]["train"] = [str(tmp_path / "varied.jsonl")]
    cfg["train"]["steps"] = 12  # a step takes about half a second; start-up dominates
    path.write_text(yaml.safe_dump(cfg))
    result = launch(path, nproc=1)
    assert result.returncode == 0, result.stderr[-3000:]
    m = metrics(tmp_path / "run")
    rewards = [round(m[s]["grpo/reward"], 3) for s in range(1, 13)]
    # The climb's speed differs between machines and seeds (train.seed 1-7 here: the mean of the last two steps
    # 0.87-0.97; once on a CUDA device 0.58), its direction does not. Per step 64 samples: standard error <= 0.06.
    assert rewards[0] < 0.1, rewards  # the initial policy: about 1 sample in 60
    assert sum(rewards[-2:]) / 2 - rewards[0] > 0.3, rewards


def test_grpo_advantages_and_gradient_land_on_each_rows_response_tokens(small_vocab_model, tmp_path):
    """One GRPO step on 2 DP ranks, each with 2 rollout chunks and 4 micro-batches of prompts of different lengths,
    checked from outside (tests/dist/grpo_alignment.py): the advantages sit on exactly each row's response tokens with
    that row's group-normalised reward, and the update's gradient is the GRPO surrogate's, recomputed on the HF
    copy of the weights (same norm; Adam's first step lowers it by lr * |g|_1)."""
    write_varied_prompts(tmp_path / "varied.jsonl")
    out = run_torchrun("grpo_alignment.py", 2, "--ckpt", str(small_vocab_model / "ckpt"), "--data",
                       str(tmp_path / "varied.jsonl"), "--workdir", str(tmp_path), tmp_path=tmp_path)
    assert out["dp"] == 2 and out["micro_batches"] == 4 and out["rows"] == 64
    assert len({n for rank in out["ranks"] for n in rank["prompt_lengths"]}) > 1
    assert max(n for rank in out["ranks"] for n in rank["response_lengths"]) > 1
    assert max(rank["max_advantage_error"] for rank in out["ranks"]) < 1e-6
    assert out["grad_norm"] > 0
    assert abs(out["grad_norm"] - out["reference_grad_norm"]) < 1e-4 * out["reference_grad_norm"], out
    assert out["descent_ratio"] > 0.95, out  # 1.0 up to Adam's eps and second order; wrong rows give about 0
    assert abs(out["descent_ratio_shuffled"]) < 0.5, out


@pytest.mark.parametrize("old_logprobs, updates_per_batch, source", [
    ("auto", 1, "update"), ("train_forward", 1, "update"), ("auto", 2, "old_lp"), ("recompute", 1, "old_lp"),
    ("rollout", 1, "rollout_lp")])
def test_pi_old_comes_from_where_algo_old_logprobs_says(old_logprobs, updates_per_batch, source, tmp_path):
    """README: algo.old_logprobs auto takes pi_old from the update's own forward when algo.updates_per_batch is 1
    (exact: the forward's very numbers, detached), else from the pass before the update (old_lp; the trainer runs
    that pass only then: tests/test_rollout.py)."""
    import torch

    from megatron_gopd.algo.objectives import Objective
    from megatron_gopd.config import load_config
    from tests.runs import minimal_config

    cfg = load_config(minimal_config(tmp_path), [f"algo.old_logprobs={old_logprobs}",
                                                 f"algo.updates_per_batch={updates_per_batch}"])
    lp = torch.randn(2, 5, requires_grad=True)  # the update's forward
    mb = {"old_lp": torch.randn(2, 5), "rollout_lp": torch.randn(2, 5)}
    old = Objective(cfg, None).old_logprobs(mb, lp)
    assert torch.equal(old, lp if source == "update" else mb[source]) and not old.requires_grad
