"""GRPO through the trainer's own pieces (rollout, old log-probs, advantages, update), checked from outside:

- every row of every micro-batch holds its item's prompt, then exactly its response tokens under `response_mask`,
  then padding;
- `advantages` equal, on exactly those response tokens, the group-normalised reward recomputed here by verifying
  the response tokens read back from the batch (0 everywhere else);
- the gradient of the update is the gradient of the GRPO surrogate computed independently on the rollout engine's
  HF copy of the weights: same norm, and Adam's first step (lr * sign(g)) lowers that surrogate by lr * |g|_1.

Rows span several rollout chunks and micro-batches per replica, prompts differ in length, and the reference gradient
is summed over the data-parallel ranks."""

import argparse
import json
import os
import warnings
from pathlib import Path

warnings.filterwarnings("ignore")

import torch
import torch.distributed as dist
import yaml

from megatron_gopd.config import load_config
from megatron_gopd.eval.verifiers import exact_match
from megatron_gopd.preflight import check_run
from megatron_gopd.runtime.distributed import init_distributed, seed_everything
from megatron_gopd.session import build_session
from megatron_gopd.trainer import Trainer

parser = argparse.ArgumentParser()
parser.add_argument("--out", required=True)
parser.add_argument("--ckpt", required=True)
parser.add_argument("--data", required=True)
parser.add_argument("--workdir", required=True)
args = parser.parse_args()

LR, N_SAMPLES, TIS_CAP = 1e-5, 8, 5.0
cfg = {
    "student": {"path": args.ckpt},
    "algo": {"name": "grpo", "tis_cap": TIS_CAP, "aggregation": "seq-mean-token-mean"},
    "rollout": {"max_new_tokens": 4, "samples_per_prompt": N_SAMPLES, "chunk_size": 16},
    "data": {"train": [args.data], "prompts_per_step": 8, "max_prompt_len": 16},
    "train": {"steps": 1, "micro_batch_size": 8, "output_dir": str(Path(args.workdir) / "run"), "seed": 3,
              "resume": "never"},
    "optim": {"lr": LR, "weight_decay": 0.0},
    "checkpoint": {"interval": 100},
    "log": {"progress": False, "tensorboard": False},
}
config_path = Path(args.workdir) / "grpo_alignment.yaml"
if os.environ.get("RANK", "0") == "0":
    config_path.write_text(yaml.safe_dump(cfg))
init_distributed()
dist.barrier()
config = load_config(config_path)
check_run(config, dist.get_world_size())
seed_everything(config.train.seed)

run = build_session(config)
trainer = Trainer(run)
run.rollout.sync_weights()
dp = run.student.pgc.dp


def global_sum(x: float) -> float:
    t = torch.tensor([x], dtype=torch.float64)
    dist.all_reduce(t, group=dp)
    return t.item()


# Draw steps until one has a group with mixed rewards (a non-zero gradient); the update below is then Adam's first.
for step in range(10):
    data = trainer.rollout(step)
    trainer.add_scores(data)
    trainer.prepare(data)
    rows, rewards, prompt_lens, response_lens, adv_error = {}, {}, set(), set(), 0.0
    for j, (indices, mb) in enumerate(zip(data.plan.micro_batches, data.micro_batches)):
        for k, row in enumerate(indices):
            item, response = data.items[row], data.samples[row].response_ids
            tokens, mask = mb["tokens"][k], mb["response_mask"][k].bool()
            start, end = len(item.prompt_ids), len(item.prompt_ids) + len(response)
            assert tokens[:start].tolist() == item.prompt_ids, f"row {row}: not its prompt"
            assert mask.nonzero().view(-1).tolist() == list(range(start, end)), f"row {row}: mask off its response"
            assert torch.equal(mb["loss_mask"][k], mb["response_mask"][k]), f"row {row}: loss off its response"
            assert tokens[mask].tolist() == response, f"row {row}: not its response"
            assert (tokens[end:] == run.pad_id).all(), f"row {row}: not padding after the response"
            text = run.tokenizer.decode(tokens[mask].tolist(), skip_special_tokens=True)
            rewards[row] = float(exact_match(text, item.answer).correct)
            rows[row] = (j, k)
            prompt_lens.add(start)
            response_lens.add(end - start)
    g = len(rows)
    assert sorted(rows) == list(range(len(data.items)))
    for first in range(0, g, N_SAMPLES):
        assert len({data.items[x].uid for x in range(first, first + N_SAMPLES)}) == 1, "a group mixes prompts"
    groups = torch.tensor([rewards[x] for x in range(g)], dtype=torch.float64).view(-1, N_SAMPLES)
    expected = ((groups - groups.mean(-1, keepdim=True)) / (groups.std(-1, keepdim=True, unbiased=False) + 1e-6))
    expected = expected.view(-1)
    adv_error = max(abs(float(data.micro_batches[j]["advantage"][k]) - float(expected[x]))
                    for x, (j, k) in rows.items())
    if global_sum(float(expected.abs().sum())) > 0:
        break
else:
    raise AssertionError("no step with a non-zero advantage in 10 draws")

model = run.rollout.engine.model  # the HF copy of the student's current weights (tp = pp = 1)
sequences = global_sum(sum(1 for j, k in rows.values() if data.micro_batches[j]["response_mask"][k].any()))
# pi_old: the policy before the update (the update's own forward, which the trainer uses, computes the same)
old = run.student.token_logprobs(data.micro_batches, temperature=config.rollout.temperature)


def surrogate(advantages: list[float], grad: bool) -> float:
    """sum_i A_i / |T_i| sum_{t in T_i} w_t log pi(y_t) / (#sequences over DP), negated: GRPO's loss at ratio 1,
    with w_t the truncated importance weight; on the HF model, with torch's own log_softmax."""
    model.zero_grad(set_to_none=True)
    total = 0.0
    with torch.set_grad_enabled(grad):
        for j, mb in enumerate(data.micro_batches):
            logits = model(input_ids=mb["tokens"]).logits.float() / config.rollout.temperature
            lp = torch.log_softmax(logits[:, :-1], -1).gather(-1, mb["tokens"][:, 1:, None]).squeeze(-1)
            lp = torch.cat([lp.new_zeros(lp.shape[0], 1), lp], 1)
            mask = mb["response_mask"].bool()
            weight = (old[j] - mb["rollout_lp"]).exp().clamp(max=TIS_CAP)
            adv = torch.tensor([advantages[x] for x in data.plan.micro_batches[j]], dtype=torch.float32)
            per_token = torch.where(mask, -adv[:, None] * weight * lp, 0.0)
            loss = (per_token.sum(-1) / mask.sum(-1).clamp(min=1)).sum() / sequences
            if grad:
                loss.backward()
            total += loss.item()
    return global_sum(total)


before = surrogate(expected.tolist(), grad=True)
grads = torch.cat([p.grad.reshape(-1).double() for p in model.parameters()])
dist.all_reduce(grads, group=dp)
model.zero_grad(set_to_none=True)
shuffled = expected[torch.randperm(len(expected), generator=torch.Generator().manual_seed(0))].tolist()
before_shuffled = surrogate(shuffled, grad=False)
metrics = trainer.update(data)
run.rollout.sync_weights()
after, after_shuffled = surrogate(expected.tolist(), grad=False), surrogate(shuffled, grad=False)
l1 = grads.abs().sum().item()

result = {
    "step": step + 1, "rows": global_sum(g), "micro_batches": len(data.micro_batches), "dp": dp.size(),
    "prompt_lengths": sorted(prompt_lens), "response_lengths": sorted(response_lens),
    "reward": global_sum(sum(rewards.values())) / global_sum(len(rewards)),
    "max_advantage_error": adv_error,
    "grad_norm": metrics["grad_norm"], "reference_grad_norm": grads.norm().item(),
    # Adam's first step is lr * sign(g): the reference surrogate falls by lr * |g|_1 if both gradients agree
    "descent_ratio": (before - after) / (LR * l1),
    "descent_ratio_shuffled": (before_shuffled - after_shuffled) / (LR * l1),
}
gathered = [None] * dist.get_world_size()
dist.all_gather_object(gathered, result)
if dist.get_rank() == 0:
    result["ranks"] = gathered
    Path(args.out).write_text(json.dumps(result))
dist.destroy_process_group()
