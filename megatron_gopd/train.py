"""torchrun --nproc_per_node N -m megatron_gopd.train --config CFG.yaml [--resume auto|never|DIR] [key=value ...]"""

from __future__ import annotations

import argparse
import os
import sys
import warnings


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m megatron_gopd.train", description=__doc__)
    parser.add_argument("--config", help="YAML config (see examples/)")
    parser.add_argument("--resume", help="auto (latest valid checkpoint), never, or a checkpoint directory")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. algo.lam=1.25 train.steps=10")
    args = parser.parse_args(argv)
    overrides = list(args.overrides) + ([f"train.resume={args.resume}"] if args.resume else [])

    from megatron_gopd.config import ConfigError, load_config

    try:  # everything is validated before any process group exists
        config = load_config(args.config, overrides, world_size=int(os.environ.get("WORLD_SIZE", "1")))
    except (ConfigError, FileNotFoundError) as e:
        sys.exit(f"config error: {e}")

    warnings.filterwarnings("ignore", module=r"megatron\.core")
    from megatron_gopd.runtime.distributed import init_distributed, seed_everything

    init_distributed(timeout_s=max(config.faults.exchange_timeout_s, 1800))
    import torch.distributed as dist

    from megatron_gopd.session import build_run
    from megatron_gopd.trainer import Trainer

    seed_everything(config.train.seed)
    run = build_run(config)  # a resumed run restores its RNG states here
    if run is not None:
        Trainer(run).run()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
