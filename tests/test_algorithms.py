"""Issue 8: GRPO and SFT through the trainer's own machinery, on a 16-token tiny model."""

import json
import subprocess
import sys

import pytest
import yaml

from tests.conftest import ROOT
from tests.test_trainer import launch, metrics
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


def test_grpo_raises_the_verifier_reward(small_vocab_model, tmp_path):
    result = launch(config(small_vocab_model, tmp_path, name="grpo", tis_cap=None), nproc=1)
    assert result.returncode == 0, result.stderr[-3000:]
    m = metrics(tmp_path / "run")
    first, last = m[1]["grpo/reward"], m[10]["grpo/reward"]  # step 1 samples from the initial policy
    assert first < 0.2  # about 1 in 16
    assert last > 0.8, (first, last)


def test_sft_fits_the_dataset_responses(small_vocab_model, tmp_path):
    result = launch(config(small_vocab_model, tmp_path, name="sft"), nproc=1)
    assert result.returncode == 0, result.stderr[-3000:]
    m = metrics(tmp_path / "run")
    assert m[1]["sft/nll"] > 1.0
    assert m[10]["sft/nll"] < 0.2 * m[1]["sft/nll"]
