"""The estimated peak GPU memory of a run, per role and rank, before launching it (megatron_gopd.memory_plan).

    python tools/plan.py --config CFG.yaml [--gpu-memory-gb 80] [--world-size N] [--margin 0.1] [key=value ...]

Prints, per kind of rank, its resident state and each phase's total in GiB, and the terms of its peak. Exits 1 when
a rank would exceed the GPU (less the margin), naming its biggest terms, the knobs that change them and the config
changes under which the run fits; 2 on a config error. Model architectures come from each model's checkpoint, or, before it exists, from
<the config's directory>/models/<name>/config.json.
"""

import argparse
import sys
from pathlib import Path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="the run's YAML config")
    parser.add_argument("--gpu-memory-gb", type=float, default=80.0, help="memory per GPU, GiB (default 80)")
    parser.add_argument("--world-size", type=int, help="ranks of the job (default: the fewest the config allows, "
                                                       "one student replica)")
    parser.add_argument("--margin", type=float, default=0.1,
                        help="fraction of each GPU kept free for what the estimate leaves out: the CUDA context, "
                             "NCCL, allocator fragmentation (default 0.1)")
    parser.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. train.recompute=full")
    args = parser.parse_args(argv)

    from megatron_gopd.config import ConfigError, load_config
    from megatron_gopd.memory_plan import PlanError, make_plan, report
    from megatron_gopd.preflight import check_run

    try:  # the checkpoints need not exist yet: the plan reads the recipe's copies of the models' configs
        cfg = load_config(args.config, args.overrides)
        check_run(cfg, args.world_size, files=False)
        kwargs = dict(gpu_memory_gb=args.gpu_memory_gb, margin=args.margin, recipe_dir=Path(args.config).parent)
        plan = make_plan(cfg, world_size=args.world_size, **kwargs)
    except (ConfigError, PlanError) as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    print(report(cfg, plan, **kwargs))
    return 1 if plan.over() else 0


if __name__ == "__main__":
    sys.exit(main())
