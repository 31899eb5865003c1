"""FP8 student. On a CUDA GPU with Transformer Engine: the same tiny model built with the TE layer spec and fp8,
with the TE spec without fp8, and with the local spec, all in bf16 from the same HF weights; it writes their
logits' differences. Without them: it tries to build the fp8 model and writes the error it got."""

import argparse
import json
import warnings

warnings.filterwarnings("ignore")

import torch
import torch.distributed as dist

from megatron_gopd.runtime.distributed import init_distributed

init_distributed()

from megatron_gopd.models import builder
from megatron_gopd.models.architectures import ModelDims
from megatron_gopd.models.builder import HFWeights, build_model, load_hf_weights
from megatron_gopd.runtime.layout import ParallelShape, build_layout
from tests.tiny import tiny_hf_model

parser = argparse.ArgumentParser()
parser.add_argument("--out", required=True)
parser.add_argument("--fp8", default="e4m3")
parser.add_argument("--arch", default="qwen3")
args = parser.parse_args()

pgc = build_layout(ParallelShape(1, 1, 1)).student.pgc
hf = tiny_hf_model(args.arch, seed=3)
dims = ModelDims.from_hf(hf.config)
result = {"te_available": builder.transformer_engine_available()}

if not result["te_available"]:
    try:
        build_model(dims, pgc, fp8=args.fp8)
        result["error"] = None
    except Exception as e:  # noqa: BLE001 - the test asserts on the type and message
        result["error"] = f"{type(e).__name__}: {e}"
else:
    # fp8 GEMMs want every dimension a multiple of 16: 2 x 32 tokens, hidden 64, ffn 96, qkv 256
    tokens = torch.randint(0, dims.vocab_size, (2, 32), generator=torch.Generator().manual_seed(7)).cuda()
    positions = torch.arange(32, device="cuda").unsqueeze(0).expand(2, -1)
    with torch.no_grad():
        hf_logits = hf.cuda()(tokens).logits.float()

    def logits(fp8, te):
        if not te:  # force the local spec on this GPU
            builder.transformer_engine_available = lambda: False
        try:
            gpt = build_model(dims, pgc, dtype=torch.bfloat16, seed=11, fp8=fp8)
        finally:
            builder.transformer_engine_available = result_te
        # whether any module of the layer is (a subclass of) a Transformer Engine module
        uses_te = any(c.__module__.startswith("transformer_engine")
                      for m in gpt.decoder.layers[0].modules() for c in type(m).__mro__)
        load_hf_weights(gpt, dims, HFWeights(hf.state_dict()))
        gpt.eval()
        with torch.no_grad():
            out = gpt(tokens, positions, None)
            out = out.transpose(0, 1) if out.shape[0] != tokens.shape[0] else out  # [s, b, v] -> [b, s, v]
            return out[..., : dims.vocab_size].float(), uses_te

    result_te = builder.transformer_engine_available
    local, local_uses_te = logits(None, te=False)
    te_bf16, te_uses_te = logits(None, te=True)
    te_fp8, _ = logits(args.fp8, te=True)

    def compare(a, b):
        cos = torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0).item()
        return {"max_abs": (a - b).abs().max().item(), "cosine": cos,
                "argmax_agree": (a.argmax(-1) == b.argmax(-1)).float().mean().item()}

    result.update(
        local_uses_te=local_uses_te, te_uses_te=te_uses_te, scale=local.abs().max().item(),
        local_vs_hf=compare(local, hf_logits), te_vs_local=compare(te_bf16, local), fp8_vs_local=compare(te_fp8, local),
        fp8_vs_te=compare(te_fp8, te_bf16), fp8_finite=bool(torch.isfinite(te_fp8).all()),
    )

if dist.get_rank() == 0:
    with open(args.out, "w") as f:
        json.dump(result, f)
dist.destroy_process_group()
