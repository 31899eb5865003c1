"""Issue 8: the cluster recipes cannot run here, but each config must load and fit its stated GPU count."""

import pytest

from megatron_gopd.config import ConfigError, load_config
from tests.conftest import ROOT

WORLD = r"^student.parallel: world size {} minus \d+ dedicated"  # the GPUs do not hold the roles
SPLIT = r"^data.prompts_per_step: 1024 prompts per step do not split over {} data-parallel"  # they do, unevenly
RECIPES = {  # config -> (GPUs its launch script starts: student + dedicated frozen-model ranks, train.steps,
    #                      why one GPU fewer is rejected)
    "examples/qwen3_4b_multi_teacher/config.yaml": (16, 50, WORLD),
    "examples/qwen3_strong_to_weak/config.yaml": (8, 100, SPLIT),
    "examples/qwen3_strong_to_weak/reward_correction.yaml": (8, 100, SPLIT),
    "examples/grpo_domain_expert/config.yaml": (8, 300, WORLD),
}


@pytest.mark.parametrize("recipe", list(RECIPES))
def test_recipe_fits_its_gpu_count(recipe):
    gpus, steps, fewer = RECIPES[recipe]
    config = load_config(ROOT / recipe, world_size=gpus, check_paths=False)
    assert config.train.steps == steps
    with pytest.raises(ConfigError, match=fewer.format(gpus - 1)):
        load_config(ROOT / recipe, world_size=gpus - 1, check_paths=False)  # one GPU fewer does not fit


def test_paper_hyper_parameters():
    merge = load_config(ROOT / "examples/qwen3_4b_multi_teacher/config.yaml", world_size=16, check_paths=False)
    assert (merge.algo.lam, merge.optim.lr, merge.data.prompts_per_step, merge.train.steps) == (1.25, 1e-5, 1024, 50)
    assert merge.uses_reference()  # lambda != 1: the student's init is needed as the reference
    rc = load_config(ROOT / "examples/qwen3_strong_to_weak/reward_correction.yaml", world_size=8, check_paths=False)
    assert rc.reference.path == "hf/Qwen3-30B-A3B-Base"
