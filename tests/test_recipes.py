"""Issue 8: the cluster recipes cannot run here, but each config must load and fit its stated GPU count."""

import pytest

from megatron_gopd.config import ConfigError, load_config
from tests.conftest import ROOT

RECIPES = {  # config -> GPUs its launch script starts (student ranks + dedicated frozen-model ranks)
    "examples/qwen3_4b_multi_teacher/config.yaml": 16,
    "examples/qwen3_strong_to_weak/config.yaml": 8,
    "examples/qwen3_strong_to_weak/reward_correction.yaml": 8,
    "examples/grpo_domain_expert/config.yaml": 8,
    "examples/qwen3_30b_a3b_moe/config.yaml": 24,
}


@pytest.mark.parametrize("recipe", list(RECIPES))
def test_recipe_fits_its_gpu_count(recipe):
    gpus = RECIPES[recipe]
    config = load_config(ROOT / recipe, world_size=gpus, check_paths=False)
    assert config.train.steps > 0
    with pytest.raises(ConfigError):  # and one GPU fewer would not fit
        load_config(ROOT / recipe, world_size=gpus - 1, check_paths=False)


def test_paper_hyper_parameters():
    merge = load_config(ROOT / "examples/qwen3_4b_multi_teacher/config.yaml", world_size=16, check_paths=False)
    assert (merge.algo.lam, merge.optim.lr, merge.data.prompts_per_step, merge.train.steps) == (1.25, 1e-5, 1024, 50)
    assert merge.uses_reference()  # lambda != 1: the student's init is needed as the reference
    rc = load_config(ROOT / "examples/qwen3_strong_to_weak/reward_correction.yaml", world_size=8, check_paths=False)
    assert rc.reference.path == "hf/Qwen3-30B-A3B-Base"


def test_moe_recipe_ships_the_qwen3_30b_a3b_config_and_its_layout_splits_it():
    """Issue 22: the HF config beside the MoE recipe gives the model card's 30.5B parameters, 3.3B active, and
    the recipe's EP sizes divide its 128 experts."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from megatron_gopd.models.architectures import ModelDims

    recipe = ROOT / "examples/qwen3_30b_a3b_moe"
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(recipe))
    total = sum(p.numel() for p in model.parameters())
    experts = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    dims = ModelDims.from_hf(recipe)
    active = total - experts * (1 - dims.moe_topk / dims.num_experts)
    assert round(total / 1e9, 1) == 30.5 and 3.3 <= active / 1e9 < 3.4
    config = load_config(recipe / "config.yaml", world_size=24, check_paths=False)
    for parallel in [config.student.parallel] + [t.parallel for t in config.teachers]:
        dims.check_parallel(parallel.tp, parallel.pp, parallel.ep, parallel.etp)
