"""Trainer runs with the rollout engine on a rank of its own (torchrun, world 2: rank 0 the student with a colocated
teacher, rank 1 the engine), one per entry of --staleness, one after the other in the same processes (each run
builds its own role layout and engine); rank 0 writes each run's steps (wall time, phase times, sample staleness)
from its metrics.jsonl.

    torchrun --nproc_per_node 2 bench/dist/async_step.py --out F --config CFG.yaml --staleness 0,1,1,0
"""

import argparse
import json
import sys
import warnings
from pathlib import Path

warnings.filterwarnings("ignore")
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch.distributed as dist  # noqa: E402

from megatron_gopd.config import load_config  # noqa: E402
from megatron_gopd.preflight import check_run  # noqa: E402
from megatron_gopd.runtime.distributed import init_distributed, seed_everything  # noqa: E402
from megatron_gopd.session import build_session  # noqa: E402
from megatron_gopd.trainer import Trainer  # noqa: E402

parser = argparse.ArgumentParser()
parser.add_argument("--out", required=True)
parser.add_argument("--config", required=True)
parser.add_argument("--staleness", required=True, help="rollout.max_staleness of each run, in order")
args = parser.parse_args()

init_distributed()
runs = []
for i, staleness in enumerate(int(s) for s in args.staleness.split(",")):
    run_dir = Path(args.config).parent / f"run{i}"
    cfg = load_config(args.config, [f"rollout.max_staleness={staleness}", f"train.output_dir={run_dir}"])
    check_run(cfg, world_size=dist.get_world_size())
    seed_everything(cfg.train.seed)
    session = build_session(cfg)
    if session is not None:  # None on the engine's rank, which served until the student was done
        Trainer(session).train()
    if dist.get_rank() == 0:
        steps = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        runs.append({"staleness": staleness, "steps": [
            {k: v for k, v in m.items() if k == "rollout/staleness" or k.startswith("time/")} for m in steps]})
if dist.get_rank() == 0:
    Path(args.out).write_text(json.dumps({"runs": runs}))
dist.destroy_process_group()
