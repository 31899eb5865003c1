"""Issue 8: the cluster recipes cannot run here, but each config must load and fit its stated GPU count. Issue 20:
their launch scripts' node ranks, one-time conversion and server launch lines, and the chat template's mode."""

import os
import subprocess

import pytest

from megatron_gopd.config import ConfigError, load_config
from megatron_gopd.preflight import check_run, frozen_models
from tests.conftest import ROOT

WORLD = r"^student.parallel: world size {} minus \d+ dedicated"  # the GPUs do not hold the roles
EXPERTS = r"^student.parallel.ep: etp\*ep = \d+ must divide the tp\*dp"  # the student's ranks do not hold its experts
SPLIT = r"^data.prompts_per_step: 1024 prompts per step do not split over {} data-parallel"  # they do, unevenly
RECIPES = {  # config -> (GPUs its launch script starts: student + dedicated frozen-model ranks, train.steps,
    #                      why one GPU fewer is rejected)
    "examples/qwen3_4b_multi_teacher/config.yaml": (16, 50, WORLD),
    "examples/qwen3_strong_to_weak/config.yaml": (8, 100, SPLIT),
    "examples/qwen3_strong_to_weak/reward_correction.yaml": (8, 100, SPLIT),
    "examples/grpo_domain_expert/config.yaml": (8, 300, WORLD),
    "examples/qwen3_30b_a3b_moe/config.yaml": (24, 50, EXPERTS),
}


@pytest.mark.parametrize("recipe", list(RECIPES))
def test_recipe_fits_its_gpu_count(recipe):
    gpus, steps, fewer = RECIPES[recipe]
    config = load_config(ROOT / recipe)
    check_run(config, gpus, files=False)
    assert config.train.steps == steps
    with pytest.raises(ConfigError, match=fewer.format(gpus - 1)):
        check_run(config, gpus - 1, files=False)  # one GPU fewer does not fit


def test_paper_hyper_parameters():
    merge = load_config(ROOT / "examples/qwen3_4b_multi_teacher/config.yaml")
    assert (merge.algo.lam, merge.optim.lr, merge.data.prompts_per_step, merge.train.steps) == (1.25, 1e-5, 1024, 50)
    assert "reference" in frozen_models(merge)  # lambda != 1: the student's init is needed as the reference
    rc = load_config(ROOT / "examples/qwen3_strong_to_weak/reward_correction.yaml")
    assert rc.reference.path == "hf/Qwen3-30B-A3B-Base"


# ---- issue 20: what a first cluster run of the recipes needs ----------------------------------------------

QWEN3_RECIPES = [r for r in RECIPES if "qwen3" in r or "grpo" in r]


@pytest.mark.parametrize("recipe", QWEN3_RECIPES)
def test_qwen3_recipes_render_the_non_thinking_chat_template(recipe):
    config = load_config(ROOT / recipe)
    assert config.data.chat_template_kwargs == {"enable_thinking": False}


def test_chat_template_kwargs_reach_the_template(tmp_path):
    from megatron_gopd.data.prompts import encode_prompts, load_prompts
    from tests.tiny import tiny_tokenizer

    tokenizer = tiny_tokenizer()
    tokenizer.chat_template = ("{% for m in messages %}{{ m['content'] }} {% endfor %}"
                               "{% if enable_thinking is defined and not enable_thinking %}t9 {% endif %}<assistant>")
    messages = [[{"role": "user", "content": "t5 t6"}]]
    assert encode_prompts(messages, tokenizer) == [[5, 6, 3]]
    assert encode_prompts(messages, tokenizer, {"enable_thinking": False}) == [[5, 6, 9, 3]]
    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "t5 t6", "domain": "math"}\n')
    dataset = load_prompts(str(data), tokenizer, max_prompt_len=16, chat_template_kwargs={"enable_thinking": False})
    assert dataset.take([0])[0].prompt_ids == [5, 6, 9, 3]
    config = tmp_path / "c.yaml"
    config.write_text("student: {path: s}\nteachers: [{name: t, path: t, domains: [math]}]\n"
                      "data: {train: [x.jsonl], chat_template_kwargs: {not-a-name: 1}}\n")
    with pytest.raises(ConfigError, match="data.chat_template_kwargs: keys must be identifiers"):
        load_config(config)


def test_teacher_servers_listen_beyond_localhost():
    launches = [line for path in (ROOT / "examples").rglob("*.sh") for line in path.read_text().splitlines()
                if "sglang.launch_server" in line]
    assert launches and all("--host 0.0.0.0" in line for line in launches), launches


def run_bash(script: str, env: dict, cwd) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "-c", f"set -euo pipefail; source {ROOT}/examples/cluster.sh; {script}"],
                          capture_output=True, text=True, env={"PATH": os.environ["PATH"], **env}, cwd=cwd,
                          timeout=60)


def test_node_rank_comes_from_slurm_and_is_never_silently_zero(tmp_path):
    assert run_bash("node_rank 2", {"NODE_RANK": "1"}, tmp_path).stdout.strip() == "1"
    assert run_bash("node_rank 2", {"SLURM_NODEID": "1"}, tmp_path).stdout.strip() == "1"
    assert run_bash("node_rank 1", {}, tmp_path).stdout.strip() == "0"
    unknown = run_bash("node_rank 2", {}, tmp_path)
    assert unknown.returncode != 0 and "neither NODE_RANK nor SLURM_NODEID" in unknown.stderr
    for launch in (ROOT / "examples").glob("*/launch.sh"):
        text = launch.read_text()
        assert "source examples/cluster.sh" in text and "NODE_RANK:-0" not in text, launch
    sbatch = (ROOT / "examples/qwen3_4b_multi_teacher/slurm.sbatch").read_text()
    assert "#SBATCH --nodes=2" in sbatch and "srun" in sbatch and "launch.sh" in sbatch


def test_the_conversion_runs_once_on_node_0_while_other_nodes_wait(tmp_path):
    """Two nodes on a shared filesystem: node 1 starts first and waits; node 0 converts once (a stand-in for the
    converter, which writes megatron_gopd.json last); an interrupted conversion is redone."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python").write_text('#!/usr/bin/env bash\necho "$@" >> calls.log; sleep 1\n'
                                    'mkdir -p "$5"; echo {} > "$5/megatron_gopd.json"\n')
    (bin_dir / "python").chmod(0o755)
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "CONVERT_POLL_S": "1"}
    (tmp_path / "ckpt" / "m").mkdir(parents=True)
    (tmp_path / "ckpt" / "m" / "partial").write_text("an interrupted conversion")
    waiting = subprocess.Popen(["bash", "-c", f"source {ROOT}/examples/cluster.sh; convert_once hf/m ckpt/m 1"],
                               cwd=tmp_path, env={**os.environ, **env})
    first = run_bash("convert_once hf/m ckpt/m 0", env, tmp_path)
    assert first.returncode == 0, first.stderr
    assert waiting.wait(timeout=30) == 0
    again = run_bash("convert_once hf/m ckpt/m 0; convert_once hf/m ckpt/m 1", env, tmp_path)
    assert again.returncode == 0
    calls = (tmp_path / "calls.log").read_text().splitlines()
    assert calls == ["tools/convert_hf_to_megatron.py --hf-dir hf/m --save-dir ckpt/m --dtype bf16"]
    assert not (tmp_path / "ckpt" / "m" / "partial").exists()
    late = run_bash("convert_once hf/x ckpt/x 1", {**env, "CONVERT_WAIT_S": "1"}, tmp_path)
    assert late.returncode != 0 and "waited" in late.stderr


def test_moe_recipe_ships_the_qwen3_30b_a3b_config_and_its_layout_splits_it():
    """Issue 22: the HF config the MoE recipe ships gives the model card's 30.5B parameters, 3.3B active, and
    the recipe's EP sizes divide its 128 experts."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from megatron_gopd.models.architectures import ModelDims

    recipe = ROOT / "examples/qwen3_30b_a3b_moe"
    model_dir = recipe / "models/qwen3-30b-a3b"
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir))
    total = sum(p.numel() for p in model.parameters())
    experts = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    dims = ModelDims.from_hf(model_dir)
    active = total - experts * (1 - dims.moe_topk / dims.num_experts)
    assert round(total / 1e9, 1) == 30.5 and 3.3 <= active / 1e9 < 3.4
    config = load_config(recipe / "config.yaml")
    check_run(config, 24, files=False)
    for parallel in [config.student.parallel] + [t.parallel for t in config.teachers]:
        dims.check_parallel(parallel.tp, parallel.pp, parallel.ep, parallel.etp)
