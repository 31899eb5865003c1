"""A mixture-of-experts student's training step against a dense one of the same active parameters (torchrun,
world 1 or 2: at world 2 both are DP=2, the MoE's experts spread over the two replicas, EP=2).

Both are Qwen3 decoders with the same attention; the dense MLP has `ffn` hidden units, the MoE MLP has `experts`
experts of ffn / topk units and routes each token to `topk` of them: the same MLP FLOPs per token (plus the
router's), `experts / topk` times the MLP parameters. One step = TrainableModel.train_step (megatron's schedule,
DDP, distributed optimizer) on `micro_batches` micro-batches of `batch` x `seq` random tokens with a token-mean
NLL loss. Rounds alternate the two models (dense, MoE, MoE, dense, ...) after a warm-up step each; times are
each rank's CPU seconds per step.

    torchrun --nproc_per_node N bench/dist/moe_step.py --out F [--rounds R]
"""

import argparse
import json
import sys
import warnings
from pathlib import Path

warnings.filterwarnings("ignore")
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from megatron_gopd.runtime.distributed import init_distributed  # noqa: E402

init_distributed()

from bench.common import VOCAB, timed  # noqa: E402
from megatron_gopd.models.architectures import ModelDims  # noqa: E402
from megatron_gopd.models.builder import build_model  # noqa: E402
from megatron_gopd.models.expert_load import ExpertLoad  # noqa: E402
from megatron_gopd.models.parallel_model import TrainableModel, adam  # noqa: E402
from megatron_gopd.runtime.layout import ParallelShape, build_layout  # noqa: E402

parser = argparse.ArgumentParser()
parser.add_argument("--out", required=True)
parser.add_argument("--rounds", type=int, default=3)
parser.add_argument("--hidden", type=int, default=256)
parser.add_argument("--ffn", type=int, default=1024)
parser.add_argument("--experts", type=int, default=8)
parser.add_argument("--topk", type=int, default=2)
parser.add_argument("--batch", type=int, default=4)
parser.add_argument("--seq", type=int, default=256)
parser.add_argument("--micro-batches", type=int, default=2)
args = parser.parse_args()

world = dist.get_world_size()
layout = build_layout(ParallelShape(dp=world, ep=world))
attention = dict(model_type="qwen3", vocab_size=VOCAB, hidden_size=args.hidden, num_hidden_layers=4,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=args.hidden // 4, rms_norm_eps=1e-6,
                 rope_theta=1e6, max_position_embeddings=args.seq, tie_word_embeddings=False)
configs = {
    "dense": dict(attention, intermediate_size=args.ffn),
    "moe": dict(attention, model_type="qwen3_moe", intermediate_size=args.ffn, num_experts=args.experts,
                num_experts_per_tok=args.topk, moe_intermediate_size=args.ffn // args.topk, norm_topk_prob=True),
}
generator = torch.Generator().manual_seed(dist.get_rank())
micro_batches = [{"tokens": torch.randint(0, VOCAB, (args.batch, args.seq), generator=generator)}
                 for _ in range(args.micro_batches)]
tokens_per_step = world * args.micro_batches * args.batch * (args.seq - 1)


def nll(mb, lp, ent, logits):
    return -lp[:, 1:].sum() / tokens_per_step, {}


models, loads, result = {}, {}, {"world": world, "tokens_per_step": tokens_per_step, "models": {}}
for name, config in configs.items():
    dims = ModelDims.from_hf(config)
    gpt = build_model(dims, layout.student.pgc, seed=1)
    local = sum(p.numel() for p in gpt.parameters())
    expert = sum(p.numel() for n, p in gpt.named_parameters() if ".experts." in n)
    total = torch.tensor([float(local), float(expert)], dtype=torch.float64)
    if world > 1:  # experts differ between the EP ranks; everything else is replicated
        experts_all = torch.tensor([float(expert)], dtype=torch.float64)
        dist.all_reduce(experts_all)
        total = torch.tensor([local - expert + experts_all.item(), experts_all.item()], dtype=torch.float64)
    params, expert_params = total.tolist()
    active = params - expert_params * (1 - args.topk / args.experts) if dims.is_moe else params
    models[name] = TrainableModel(gpt, dims, adam(1e-4), layout.student.world)
    loads[name] = ExpertLoad(gpt) if dims.is_moe else None
    result["models"][name] = {"params": params, "active_params": active, "cpu": [], "wall": []}


def step(name):
    _, info = models[name].train_step(micro_batches, nll, temperature=1.0)
    assert info["update_ok"], info


for name in configs:  # warm-up: the optimizer state, the code paths
    step(name)
loads["moe"].metrics()  # count the measured steps only
for r in range(args.rounds):
    for name in (("dense", "moe") if r % 2 == 0 else ("moe", "dense")):
        clock = timed(step, name)
        result["models"][name]["cpu"].append(clock["cpu"])
        result["models"][name]["wall"].append(clock["wall"])
result["models"]["moe"]["load"] = loads["moe"].metrics()  # expert loads of the measured steps

cpu = [None] * world
dist.all_gather_object(cpu, {name: m["cpu"] for name, m in result["models"].items()})
for name in configs:
    result["models"][name]["cpu_per_rank"] = [c[name] for c in cpu]
if dist.get_rank() == 0:
    Path(args.out).write_text(json.dumps(result))
dist.destroy_process_group()
