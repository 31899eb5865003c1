"""The streaming exporter on a TP x PP (x EP) model: the HF state dict comes back bit-exact, in bounded buckets, on
the replica's (tp=0, pp=0) rank, or on every first-stage TP rank (tp_receivers)."""

import argparse
import json
import warnings

warnings.filterwarnings("ignore")

import torch
import torch.distributed as dist

from megatron_gopd.runtime.distributed import init_distributed

init_distributed()

from megatron_gopd.models.architectures import ModelDims
from megatron_gopd.models.builder import HFWeights, build_model, load_hf_weights
from megatron_gopd.models.export import ExportStats, export_hf_weights
from megatron_gopd.models.hf_io import hub_state_dict
from megatron_gopd.runtime.layout import ParallelShape, build_layout
from tests.tiny import tiny_hf_model

parser = argparse.ArgumentParser()
parser.add_argument("--out", required=True)
parser.add_argument("--tp", type=int, default=1)
parser.add_argument("--pp", type=int, default=1)
parser.add_argument("--ep", type=int, default=1)
parser.add_argument("--etp", type=int, default=None)
parser.add_argument("--bucket-bytes", type=int, default=64 << 10)
parser.add_argument("--archs", default="llama,qwen2,qwen3,qwen3_tied")
args = parser.parse_args()

layout = build_layout(ParallelShape(args.tp, args.pp, dist.get_world_size() // (args.tp * args.pp), args.ep, args.etp))
results = {}
for arch in args.archs.split(","):
    hf = tiny_hf_model(arch, seed=5)
    dims = ModelDims.from_hf(hf.config)
    gpt = build_model(dims, layout.student.pgc)
    state = hub_state_dict(hf)
    load_hf_weights(gpt, dims, HFWeights(state))
    stats = ExportStats()
    exported = {name: t.clone() for name, t in export_hf_weights(gpt, dims, bucket_bytes=args.bucket_bytes, stats=stats)}
    expected = {k: v for k, v in state.items() if not (dims.tie_word_embeddings and k == "lm_head.weight")}
    entry = {"peak_bytes": stats.peak_bytes, "largest_weight_bytes": max(v.numel() * 4 for v in expected.values())}
    if exported:  # the replica's receiving rank
        entry.update(
            names_equal=sorted(exported) == sorted(expected),
            bit_exact=all(torch.equal(exported[k], expected[k]) for k in expected if k in exported),
            total_bytes=stats.total_bytes,
            model_bytes=sum(v.numel() * 4 for v in expected.values()),
        )
    # an SGLang engine spanning TP takes full weights on every first-stage TP rank (PP stages send to each)
    every_tp = {name: t.clone() for name, t in export_hf_weights(gpt, dims, bucket_bytes=args.bucket_bytes,
                                                                 tp_receivers=args.tp)}
    entry["every_tp_rank"] = bool(every_tp) and sorted(every_tp) == sorted(expected) and all(
        torch.equal(every_tp[k], expected[k]) for k in expected)
    results[arch] = entry
gathered = [None] * dist.get_world_size()
dist.all_gather_object(gathered, results)
if dist.get_rank() == 0:
    json.dump({"ranks": gathered, "bucket_bytes": args.bucket_bytes}, open(args.out, "w"))
dist.destroy_process_group()
