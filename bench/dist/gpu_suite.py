"""The GPU suite (torchrun, one process on one CUDA device): student train-step MFU at ~1.3B scale with the local
layer spec (megatron's attention, then torch's fused attention), and with Transformer Engine (bf16, then FP8) when TE
is installed; rollout tokens/s of our engine
against transformers.generate; weight-sync GB/s. Models are randomly initialised from a Llama config (no download).
Each part records its error instead of stopping the others. Written without a GPU to run it on: only its --smoke
form (a tiny model, any device, the CPU included) has been run.

    torchrun --nproc_per_node 1 bench/dist/gpu_suite.py --out F [--quick] [--smoke]
"""

import argparse
import json
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

warnings.filterwarnings("ignore")
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402

from bench.common import write_hf_config_dir  # noqa: E402
from megatron_gopd.runtime.distributed import device, init_distributed  # noqa: E402

# ~1.26B parameters: 24 layers, hidden 2048, GQA 16/8 heads, SwiGLU 5632, vocab 32000 (untied)
MODEL = dict(hidden_size=2048, num_hidden_layers=24, num_attention_heads=16, num_key_value_heads=8,
             intermediate_size=5632, vocab_size=32000, max_position_embeddings=4096, eos_token_id=None,
             bos_token_id=None, pad_token_id=None)
SMOKE_MODEL = dict(MODEL, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                   intermediate_size=96, vocab_size=256)
# dense bf16 tensor-core peaks (FLOP/s) by device-name substring, most specific first
PEAK_BF16 = [("H200", 989e12), ("GH200", 989e12), ("H100 PCIe", 756e12), ("H100", 989e12), ("H800", 989e12),
             ("A100", 312e12), ("A800", 312e12), ("L40S", 362e12), ("L4", 121e12), ("B200", 2250e12)]


def peak_flops(name: str) -> float | None:
    return next((peak for key, peak in PEAK_BF16 if key in name), None)


def step_flops(dims, tokens: int, seq: int) -> float:
    """Model FLOPs of one training step (forward + backward = 3 x forward, no recompute): 6 FLOPs per matmul
    parameter per token (the LM head included, the embedding lookup not), plus attention's QK^T and PV,
    2 x 2 x seq x heads x head_dim per token per layer forward (no causal discount, as in the PaLM MFU)."""
    h, kv = dims.hidden_size, dims.num_kv_heads * dims.head_dim
    q = dims.num_heads * dims.head_dim
    per_layer = h * q + 2 * h * kv + q * h + 3 * h * dims.ffn_hidden_size
    matmul_params = dims.num_layers * per_layer + dims.vocab_size * h
    attention = dims.num_layers * 4 * seq * q
    return 3 * tokens * (2 * matmul_params + attention)


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def peak_gib() -> float | None:
    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None


def train_mfu(hf_dir: Path, layout, spec: str, fp8: str | None, micro_batches: int, mbs: int, seq: int,
              steps: int) -> dict:
    from megatron_gopd.algo.losses import PolicyLossConfig, policy_loss
    from megatron_gopd.models import builder
    from megatron_gopd.models.architectures import ModelDims
    from megatron_gopd.models.parallel_model import TrainableModel, adam

    dims = ModelDims.from_hf(hf_dir)
    # "local": megatron's own local attention (S x S scores); "sdpa": the local spec with torch's fused attention
    attention = {"local": "megatron", "sdpa": "sdpa", "te": "te"}[spec]
    gpt = builder.build_model(dims, layout.student.pgc, dtype=torch.bfloat16, fp8=fp8, attention=attention)
    student = TrainableModel(gpt, dims, adam(1e-5), layout.student.world)
    g = torch.Generator(device=device()).manual_seed(0)
    batches = []
    for _ in range(micro_batches):
        tokens = torch.randint(3, dims.vocab_size, (mbs, seq), device=device(), generator=g)
        zeros = torch.zeros(mbs, seq, device=device())
        batches.append({"tokens": tokens, "old_lp": zeros - 5.0, "rollout_lp": zeros - 5.0,
                        "advantages": torch.randn(mbs, seq, device=device(), generator=g),
                        "loss_mask": torch.ones(mbs, seq, device=device())})
    cfg = PolicyLossConfig(aggregation="token-mean")
    denominator = float(micro_batches * mbs * seq)

    def loss_fn(mb, lp, entropy, logits):
        return policy_loss(lp, mb["old_lp"], mb["advantages"], mb["loss_mask"], cfg, rollout_lp=mb["rollout_lp"],
                           denominator=denominator)

    times = []
    for i in range(steps + 2):  # two warm-up steps
        sync()
        start = time.perf_counter()
        student.train_step(batches, loss_fn, temperature=1.0)
        sync()
        if i >= 2:
            times.append(time.perf_counter() - start)
    seconds = sorted(times)[len(times) // 2]
    flops = step_flops(dims, micro_batches * mbs * seq, seq)
    peak = peak_flops(torch.cuda.get_device_name()) if torch.cuda.is_available() else None
    result = {"spec": spec, "fp8": fp8, "params": sum(p.numel() for p in gpt.parameters()),
              "tokens_per_step": micro_batches * mbs * seq, "step_s": seconds, "step_s_all": times,
              "tflops": flops / seconds / 1e12, "mfu": flops / seconds / peak if peak else None,
              "peak_gpu_gb": peak_gib()}
    del student, gpt, batches
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    return result


def rollout_and_sync(hf_dir: Path, layout, batch: int, new_tokens: int, rounds: int) -> dict:
    import dataclasses

    from transformers import AutoModelForCausalLM

    from megatron_gopd.models.architectures import ModelDims
    from megatron_gopd.models.builder import build_model
    from megatron_gopd.models.export import ExportStats, export_hf_weights
    from megatron_gopd.rollout.base import SamplingParams
    from megatron_gopd.rollout.colocated import ColocatedRollout
    from megatron_gopd.rollout.hf_engine import HFRolloutEngine

    dims = ModelDims.from_hf(hf_dir)
    gpt = build_model(dims, layout.student.pgc, dtype=torch.bfloat16)
    engine = HFRolloutEngine(str(hf_dir), dtype=torch.bfloat16, device=device())
    rollout = ColocatedRollout(engine, gpt, dims, bucket_bytes=512 << 20)
    stats = ExportStats()
    for _ in export_hf_weights(gpt, dims, bucket_bytes=512 << 20, stats=stats):
        pass
    rollout.sync_weights()
    sync_s = []
    for _ in range(5):
        sync()
        start = time.perf_counter()
        rollout.sync_weights()
        sync()
        sync_s.append(time.perf_counter() - start)
    sync_med = sorted(sync_s)[2]
    result = {"sync": {"bytes": stats.total_bytes, "seconds": sync_med, "seconds_all": sync_s,
                       "gb_per_s": stats.total_bytes / sync_med / 1e9}}

    baseline = AutoModelForCausalLM.from_config(engine.model.config, dtype=torch.bfloat16).to(device()).eval()
    baseline.load_state_dict(engine.model.state_dict())
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, dims.vocab_size, (32,), generator=g).tolist() for _ in range(batch)]
    ids = torch.tensor(prompts, device=device())
    params = SamplingParams(temperature=1.0, max_new_tokens=new_tokens, stop_token_ids=())

    def ours(seed):
        engine.generate(prompts, dataclasses.replace(params, seed=seed))

    @torch.no_grad()
    def generate(seed):
        torch.manual_seed(seed)
        out = baseline.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=True, top_k=0,
                                top_p=1.0, temperature=1.0, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                output_scores=True, return_dict_in_generate=True)
        baseline.compute_transition_scores(out.sequences, out.scores, normalize_logits=True)

    ours(0), generate(0)
    times = {"engine": [], "generate+logprobs": []}
    for r in range(rounds):
        for name in (("engine", "generate+logprobs") if r % 2 == 0 else ("generate+logprobs", "engine")):
            sync()
            start = time.perf_counter()
            (ours if name == "engine" else generate)(r + 1)
            sync()
            times[name].append(time.perf_counter() - start)
    tokens = batch * new_tokens
    result["rollout"] = {"batch": batch, "new_tokens": new_tokens,
                         "tokens_per_s": {k: tokens / sorted(v)[len(v) // 2] for k, v in times.items()},
                         "ratio": [g_ / e for g_, e in zip(times["generate+logprobs"], times["engine"])]}
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--smoke", action="store_true", help="tiny model and shapes: checks the code on any device")
    args = parser.parse_args()
    if not (torch.cuda.is_available() or args.smoke):
        sys.exit("the GPU suite needs a CUDA device (or --smoke)")
    init_distributed()
    from megatron_gopd.models.builder import transformer_engine_available
    from megatron_gopd.runtime.layout import ParallelShape, build_layout

    layout = build_layout(ParallelShape())
    report = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu (smoke)",
              "torch": torch.__version__, "cuda": torch.version.cuda, "smoke": args.smoke,
              "transformer_engine": transformer_engine_available(), "train": []}
    with tempfile.TemporaryDirectory() as tmp:
        hf_dir = write_hf_config_dir(dict(model_type="llama", rms_norm_eps=1e-5, rope_theta=10000.0,
                                          tie_word_embeddings=False, **(SMOKE_MODEL if args.smoke else MODEL)),
                                     Path(tmp) / "llama")
        runs = [("local", None), ("sdpa", None)] + (
            [("te", None), ("te", "hybrid")] if report["transformer_engine"] else [])
        shape = dict(micro_batches=2 if args.smoke else 4, mbs=2, seq=64 if args.smoke else 2048,
                     steps=1 if args.smoke else 3 if args.quick else 8)
        for spec, fp8 in runs:
            try:
                report["train"].append(train_mfu(hf_dir, layout, spec, fp8, **shape))
            except Exception:
                report["train"].append({"spec": spec, "fp8": fp8, "error": traceback.format_exc()[-3000:]})
        if not report["transformer_engine"]:
            report["train"].append({"spec": "te", "skipped": "transformer_engine is not importable here"})
        try:
            report.update(rollout_and_sync(hf_dir, layout, batch=4 if args.smoke else 64,
                                           new_tokens=8 if args.smoke else 128,
                                           rounds=1 if args.smoke else 3 if args.quick else 6))
        except Exception:
            report["rollout_error"] = traceback.format_exc()[-3000:]
    json.dump(report, open(args.out, "w"))


if __name__ == "__main__":
    main()
