"""Issue 19, items 5-6: the memory planner (megatron_gopd/memory_plan.py, tools/plan.py) and the recipes it passes.

The activation counts themselves are measured exactly against autograd in tests/test_recompute.py; here, a tiny
model's plan term by term against numbers computed by hand, the exit codes, the knobs and fixes it names, and
the cluster recipes at 80 GB per GPU."""

import json

import pytest
import yaml

from megatron_gopd import memory_plan
from megatron_gopd.config import load_config
from megatron_gopd.models.architectures import ModelDims
from megatron_gopd.preflight import check_run
from tests.conftest import ROOT
from tools.plan import main as plan_main

# A Llama: hidden 64, 4 heads of 16 (2 KV groups), SwiGLU 96, 2 layers, 256 tokens (already a multiple of 128).
TINY = {"model_type": "llama", "vocab_size": 256, "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "head_dim": 16, "intermediate_size": 96, "max_position_embeddings": 128,
        "rms_norm_eps": 1e-6, "tie_word_embeddings": False}


def tiny_run(tmp_path, *overrides):
    """One student replica (world 1), micro-batches of 2 rows of 8 + 56 = 64 tokens, fp32, SFT (no frozen
    models), the architecture from <recipe>/models/student/config.json."""
    (tmp_path / "models" / "student").mkdir(parents=True)
    (tmp_path / "models" / "student" / "config.json").write_text(json.dumps(TINY))
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({
        "student": {"path": "ckpt/student"}, "algo": {"name": "sft"}, "rollout": {"max_new_tokens": 56},
        "data": {"train": ["train.jsonl"], "max_prompt_len": 8, "prompts_per_step": 2},
        "train": {"micro_batch_size": 2},
    }))
    return config, load_config(config, list(overrides))


def test_tiny_model_plan_term_by_term(tmp_path):
    _, cfg = tiny_run(tmp_path)
    dims = ModelDims.from_hf(TINY)
    # a layer: qkv 64 x (64 + 2 * 32) + proj 64 x 64 + fc1 64 x 192 + fc2 96 x 64 + two norms of 64
    assert memory_plan.layer_params(dims, tp=1) == 8192 + 4096 + 12288 + 6144 + 128 == 30848
    # 2 layers, embedding 256 x 64, final norm 64, output layer 256 x 64
    assert memory_plan.stage_params(dims, 1, 1, 0) == 2 * 30848 + 16384 + 64 + 16384 == 94528
    # per token and layer, fp32: two norms (input + normalised + 1/rms) 2 * 129 * 4, linear_qkv's and fc1's
    # inputs 2 * 64 * 4, linear_qkv's output 128 * 4, RoPE's cos/sin 4 * 16 * 4, SwiGLU 5 * 96 * 4, attention's
    # rotated q, k and output (64 + 32 + 64) * 4, its log-sum-exp 4 heads * 4
    none = 1032 + 512 + 512 + 256 + 1920 + 640 + 16
    layer = memory_plan.layer_activations(dims, tp=1, dtype="fp32", attention="sdpa", recompute="none", seq=64)
    assert layer.kept == layer.full == none == 4888
    assert memory_plan.layer_activations(dims, tp=1, dtype="fp32", attention="sdpa", recompute="selective",
                                         seq=64).kept == none - 16
    assert memory_plan.layer_activations(dims, tp=1, dtype="fp32", attention="sdpa", recompute="full",
                                         seq=64).kept == 64 * 4
    # attention 'megatron': q and k, v repeated to 4 heads, each copied (4 * 64 * 4), and the softmax 4 x S
    megatron = memory_plan.layer_activations(dims, tp=1, dtype="fp32", attention="megatron", recompute="none",
                                             seq=64)
    assert megatron.kept == none - 640 - 16 + 4 * 64 * 4 + 4 * 64 * 4

    plan = memory_plan.make_plan(cfg, recipe_dir=tmp_path)
    assert (plan.world_size, plan.micro_batch_tokens, plan.row_length) == (1, 128, 64)
    [student] = plan.ranks
    terms = {t.name: t.bytes for t in student.phases["loss"]}
    assert terms["weights"] == terms["grads"] == 94528 * 4
    assert terms["optimizer"] == 94528 * 8  # Adam's two fp32 moments; the fp32 weights are the main copy
    # 128 tokens x (2 layers x 4888 + the final norm (2 * 64 + 1) * 4 + the output layer's input 64 * 4)
    assert terms["activations"] == 128 * (2 * 4888 + 516 + 256)
    # logits 128 x 256 fp32 and their gradient, plus 3 log-prob chunk slabs (here the whole 128 x 256 each)
    assert terms["logits"] == 2 * 131072 + 3 * 131072
    assert student.peak_phase == "loss" and student.peak == sum(terms.values()) == 3517952


def test_bf16_norms_and_tensor_parallel_shards(tmp_path):
    dims = ModelDims.from_hf(dict(TINY, model_type="qwen3"))  # qk-norm
    layer = memory_plan.layer_activations(dims, tp=2, dtype="bf16", attention="sdpa", recompute="none", seq=64)
    # per TP rank: q 32, kv 16, 2 heads, 1 group; norms keep fp32 copies whatever the dtype:
    # 2 * 129 * 4 + 2 * 64 * 2 + 64 * 2 + 4 * 16 * 2 + 5 * 48 * 2 + q-norm (2 * 32 + 2) * 4 + k-norm (2 * 16 + 1) * 4
    #   + (32 + 16 + 32) * 2 + 2 heads * 4
    assert layer.kept == 1032 + 256 + 128 + 128 + 480 + 264 + 132 + 160 + 8
    # the distributed optimizer shards Adam's state over data-parallel ranks; bf16 weights add fp32 main params
    _, cfg = tiny_run(tmp_path, "student.dtype=bf16")
    one, four = (memory_plan.make_plan(cfg, world_size=n, recipe_dir=tmp_path).ranks[0] for n in (1, 4))
    optimizer = {n: {t.name: t.bytes for t in r.phases["loss"]}["optimizer"] for n, r in ((1, one), (4, four))}
    assert optimizer == {1: 94528 * 12, 4: 94528 * 3}


def test_token_budget_and_recompute_shrink_the_update(tmp_path):
    _, cfg = tiny_run(tmp_path, "train.micro_batch_size=4", "data.prompts_per_step=4")
    assert memory_plan.micro_batch_tokens(cfg) == 256
    budget = memory_plan.with_overrides(cfg, {"train.max_tokens_per_micro_batch": 100})
    assert memory_plan.micro_batch_tokens(budget) == 100
    over = memory_plan.with_overrides(cfg, {"train.max_tokens_per_micro_batch": 8})  # a row alone: 64 tokens
    assert memory_plan.micro_batch_tokens(over) == 64
    full = memory_plan.with_overrides(cfg, {"train.recompute": "full"})
    peaks = [memory_plan.make_plan(c, recipe_dir=tmp_path).ranks[0].total("loss") for c in (cfg, budget, full)]
    assert peaks[1] < peaks[0] and peaks[2] < peaks[0]


def test_colocated_frozen_models(tmp_path):
    """One colocated teacher (the tiny model too): scoring holds it beside the student; with the full-vocab loss it
    is on the GPU during the loss too, with its logits, and until the next scoring."""
    (tmp_path / "models" / "teacher").mkdir(parents=True)
    (tmp_path / "models" / "teacher" / "config.json").write_text(json.dumps(TINY))
    _, cfg = tiny_run(tmp_path, "algo.name=gopd", "algo.lam=1.0", "teachers=[{name: t, path: ckpt/teacher, "
                      "domains: [math]}]")
    [student] = memory_plan.make_plan(cfg, recipe_dir=tmp_path).ranks
    scoring = {t.name: t.bytes for t in student.phases["scoring"]}
    assert scoring["frozen t"] == 94528 * 4
    # its forward: one layer's temporaries for 128 tokens (4888 bytes each), its logits twice and 3 log-prob slabs
    assert scoring["forward"] == 4888 * 128 + 2 * 128 * 256 * 4 + 3 * 128 * 256 * 4
    assert all(not t.name.startswith("frozen") for t in student.phases["loss"] + student.phases["rollout"])
    full_vocab = memory_plan.make_plan(memory_plan.with_overrides(cfg, {"algo.loss": "full_vocab"}),
                                       recipe_dir=tmp_path).ranks[0]
    assert {t.name: t.bytes for t in full_vocab.phases["loss"]}["frozen t"] == 94528 * 4 + 128 * 256 * 4
    assert {t.name: t.bytes for t in full_vocab.phases["rollout"]}["frozen t"] == 94528 * 4


def test_exit_codes_knobs_and_fixes(tmp_path, capsys):
    config, _ = tiny_run(tmp_path)
    assert plan_main(["--config", str(config), "--gpu-memory-gb", "1"]) == 0
    assert "fits: peak 0.0 GiB" in capsys.readouterr().out
    # 3.5 MiB per GPU, 10% kept free: the 3.35 MiB loss phase does not fit, with recompute (2.2 MiB) it does
    assert plan_main(["--config", str(config), "--gpu-memory-gb", str(3.5 / 1024)]) == 1
    out = capsys.readouterr().out
    assert "OVER BUDGET: student (pp stage 0, tp rank 0 (rollout engine)) peaks at" in out
    assert "activations 0.0 GiB (knobs: train.recompute, train.max_tokens_per_micro_batch" in out
    assert "fits with:\n  train.recompute=full" in out
    assert plan_main(["--config", str(config), "student.path=ckpt/missing"]) == 2
    assert "ckpt/missing: no HF config.json found" in capsys.readouterr().err
    assert plan_main(["--config", str(config), "train.recompute=some"]) == 2
    assert "train.recompute: 'some' is not one of" in capsys.readouterr().err


def test_trainer_start_lines(tmp_path):
    _, cfg = tiny_run(tmp_path, "student.path=" + str(tmp_path / "models" / "student"))
    fits = memory_plan.startup_lines(cfg, 1, 2**30)
    assert len(fits) == 1 and fits[0].startswith("memory plan: estimated peak 0.0 GiB per GPU of 1.0 GiB")
    over = memory_plan.startup_lines(cfg, 1, 2**21)
    assert over[1].startswith("WARNING: memory plan: student (pp stage 0, tp rank 0 (rollout engine)) may need")
    assert "activations" in over[1] and "tools/plan.py" in over[1]


RECIPES = {  # each recipe's GPUs (its launch script: student + dedicated frozen-model ranks) and their GiB
    "examples/qwen3_4b_multi_teacher/config.yaml": (16, 80),
    "examples/qwen3_strong_to_weak/config.yaml": (8, 80),
    "examples/qwen3_strong_to_weak/reward_correction.yaml": (8, 80),
    "examples/grpo_domain_expert/config.yaml": (8, 80),
    "examples/qwen3_30b_a3b_moe/config.yaml": (24, 141),
}


def plan_rows(out: str) -> dict[tuple[str, ...], int]:
    """tools/plan.py's table: {(weights, grads, ..., update, peak): ranks}, rows of equal numbers merged."""
    rows: dict[tuple[str, ...], int] = {}
    for line in out.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if line.startswith("| ") and cells[0] != "role":
            rows[tuple(cells[3:12])] = rows.get(tuple(cells[3:12]), 0) + int(cells[2])
    return rows


def readme_recipe_rows(recipe: str) -> tuple[str, dict[tuple[str, ...], int]]:
    """The README's recipe table for one recipe: its GPUs cell and {(weights, ..., update, peak): ranks}, the peak
    being the bold phase ("4 + 4" ranks: two roles on one line)."""
    gpus, rows = None, {}
    for line in (ROOT / "README.md").read_text().splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if line.startswith(f"| {recipe} ("):
            gpus = cells[0].removeprefix(recipe).strip(" ()")
            [peak] = [c.strip("*") for c in cells[3:] if c.startswith("**")]
            numbers = tuple(c.strip("*") for c in cells[3:]) + (peak,)
            rows[numbers] = rows.get(numbers, 0) + sum(int(n) for n in cells[2].split("+"))
    return gpus, rows


@pytest.mark.parametrize("recipe", list(RECIPES))
def test_recipes_fit_their_gpus_at_the_papers_lengths(recipe, capsys):
    world, gib = RECIPES[recipe]
    cfg = load_config(ROOT / recipe)
    check_run(cfg, world, files=False)
    assert (cfg.data.max_prompt_len, cfg.rollout.max_new_tokens) == (2048, 16384)
    args = ["--config", str(ROOT / recipe), "--world-size", str(world), "--gpu-memory-gb", str(gib)]
    assert plan_main(args) == 0
    out = capsys.readouterr().out
    assert "fits: peak" in out
    gpus, readme = readme_recipe_rows(recipe.split("/")[1])
    if recipe.endswith("/config.yaml"):  # the README's table: every rank kind's phases as printed, in GiB
        assert gpus == (str(world) if gib == 80 else f"{world} of {gib} GB")
        assert readme == plan_rows(out)
    # as they were before recompute and token budgets: micro-batches of 2 to 8 rows of 18k tokens
    assert plan_main(args + ["train.recompute=none", "train.max_tokens_per_micro_batch=null"]) == 1
    assert "OVER BUDGET: student" in capsys.readouterr().out


def test_readme_worked_example_and_the_recipes_without_recompute(capsys):
    """The README's numbers for the recipes as they were (no recompute, no token budget): the multi-teacher
    recipe's activations and the fix the planner names, and the students' peaks, 337-739 GiB, in micro-batches of
    2 to 8 rows of 18k tokens."""
    student_peaks, rows_per_micro_batch = [], set()
    for recipe, (world, gib) in RECIPES.items():
        args = ["--config", str(ROOT / recipe), "--world-size", str(world), "--gpu-memory-gb", str(gib),
                "train.recompute=none", "train.max_tokens_per_micro_batch=null"]
        assert plan_main(args) == 1
        out = capsys.readouterr().out
        if recipe == "examples/qwen3_4b_multi_teacher/config.yaml":
            assert "activations 340.1 GiB (knobs: train.recompute, " in out
            assert "fits with:\n  train.recompute=full  (peak 64.6 GiB)\n" in out
        tokens = int(out.split("micro-batches of ")[1].split(" tokens")[0])
        rows_per_micro_batch.add(tokens // 18432)
        student_peaks += [float(line.split("|")[12]) for line in out.splitlines() if line.startswith("| student")]
    assert (round(min(student_peaks)), round(max(student_peaks))) == (337, 739)
    assert rows_per_micro_batch == {2, 4, 8}


def test_recipe_models_are_the_public_qwen3_configs():
    recipe_models = sorted(p.relative_to(ROOT / "examples").as_posix()
                           for p in (ROOT / "examples").glob("*/models/*/config.json"))
    assert recipe_models == sorted([
        "grpo_domain_expert/models/qwen3-4b/config.json",
        "qwen3_4b_multi_teacher/models/qwen3-4b-code-grpo/config.json",
        "qwen3_4b_multi_teacher/models/qwen3-4b-math-grpo/config.json",
        "qwen3_4b_multi_teacher/models/qwen3-4b/config.json",
        "qwen3_30b_a3b_moe/models/qwen3-30b-a3b-code-grpo/config.json",
        "qwen3_30b_a3b_moe/models/qwen3-30b-a3b-math-grpo/config.json",
        "qwen3_30b_a3b_moe/models/qwen3-30b-a3b/config.json",
        "qwen3_strong_to_weak/models/Qwen3-30B-A3B-Instruct-2507/config.json",
        "qwen3_strong_to_weak/models/qwen3-1.7b/config.json",
    ])
    four_b = ModelDims.from_hf(ROOT / "examples/qwen3_4b_multi_teacher/models/qwen3-4b")
    assert memory_plan.stage_params(four_b, 1, 1, 0) == 4022468096  # Qwen3-4B: 4.02B with the tied embedding
    small = ModelDims.from_hf(ROOT / "examples/qwen3_strong_to_weak/models/qwen3-1.7b")
    assert memory_plan.stage_params(small, 1, 1, 0) == 1720574976  # Qwen3-1.7B: 1.72B
    moe = ModelDims.from_hf(ROOT / "examples/qwen3_30b_a3b_moe/models/qwen3-30b-a3b")
    assert memory_plan.stage_params(moe, 1, 1, 0) == 30532122624  # Qwen3-30B-A3B: 30.5B (untied)
    per_expert = 3 * moe.hidden_size * moe.moe_ffn_hidden_size * moe.num_layers
    assert memory_plan.stage_params(moe, 1, 1, 0) - memory_plan.stage_params(moe, 1, 1, 0, ep=8) == 112 * per_expert


@pytest.mark.gpu
def test_trainer_logs_the_plan_and_recomputes_on_one_gpu(tiny_checkpoints, tmp_path):
    """On CUDA the trainer's rank 0 logs the estimate before building anything, and a run with full recompute
    (megatron's checkpointing with the CUDA RNG tracker) trains."""
    from tests.runs import launch, metrics, write_run

    config = write_run(tmp_path, tiny_checkpoints, train__steps=1, train__recompute="full", eval__interval=0)
    done = launch(config, nproc=1)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "memory plan: estimated peak" in done.stdout and "WARNING: memory plan" not in done.stdout
    assert metrics(tmp_path / "run")[1]["grad_norm"] > 0
