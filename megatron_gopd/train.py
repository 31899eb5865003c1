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
    from megatron_gopd.preflight import check_run

    try:  # everything is checked before any process group exists
        config = load_config(args.config, overrides)
        check_run(config, world_size=int(os.environ.get("WORLD_SIZE", "1")))
    except (ConfigError, FileNotFoundError) as e:
        print(f"config error: {e}", file=sys.stderr)
        sys.exit(2)  # as argparse does for a bad command line

    warnings.filterwarnings("ignore", module=r"megatron\.core")
    from megatron_gopd.runtime.distributed import init_distributed, seed_everything

    init_distributed(timeout_s=max(config.faults.exchange_timeout_s, 1800))
    import torch.distributed as dist

    from megatron_gopd.session import build_session
    from megatron_gopd.trainer import Trainer

    seed_everything(config.train.seed)
    session = build_session(config)
    if session is not None:  # None: a dedicated frozen model's rank, which served until the student was done
        Trainer(session).train()  # a resumed run restores its RNG states as the trainer is made
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
