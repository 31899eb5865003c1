"""megatron-gopd model or training checkpoint -> Hugging Face checkpoint (safetensors shards + index, config,
generation config, tokenizer), streamed through the same exporter that feeds the rollout engines.

    python tools/convert_megatron_to_hf.py --load-dir runs/x/checkpoints/latest --save-dir student-hf
"""

import argparse
import json
import sys
import warnings
from pathlib import Path

warnings.filterwarnings("ignore", module=r"megatron\.core")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--load-dir", required=True, help="a model checkpoint, a training checkpoint or `latest`")
    parser.add_argument("--save-dir", required=True)
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1)
    parser.add_argument("--ep", type=int, default=1, help="expert parallel ranks (mixture-of-experts models)")
    parser.add_argument("--max-shard-gb", type=float, default=2.0)
    parser.add_argument("--bucket-mb", type=int, default=512, help="bound on the weights gathered at once")
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    from megatron_gopd.runtime.distributed import init_distributed

    _, world = init_distributed()
    import torch.distributed as dist

    from megatron_gopd.checkpoint import load_model, read_checkpoint_metadata, resolve_checkpoint_dir
    from megatron_gopd.models.architectures import ModelDims
    from megatron_gopd.models.builder import DTYPES, build_model
    from megatron_gopd.models.export import export_hf_weights
    from megatron_gopd.models.hf_io import write_hf_checkpoint
    from megatron_gopd.runtime.layout import ParallelShape, build_layout

    needed = args.tp * args.pp * args.ep
    if world != needed:
        sizes = f"--tp {args.tp} x --pp {args.pp}" + (f" x --ep {args.ep}" if args.ep > 1 else "")
        sys.exit(f"error: {sizes} needs {needed} processes, got {world}")
    try:
        directory = resolve_checkpoint_dir(args.load_dir)
        meta = read_checkpoint_metadata(directory)
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"error: --load-dir: {e}")
    hf_dir = _find_hf_dir(directory)
    dims = ModelDims.from_hf(hf_dir)
    try:
        dims.check_parallel(args.tp, args.pp, args.ep)
    except ValueError as e:
        sys.exit(f"error: {e}")
    layout = build_layout(ParallelShape(args.tp, args.pp, dp=args.ep, ep=args.ep))
    dtype = DTYPES[meta.get("dtype", "fp32")]
    gpt = build_model(dims, layout.student.pgc, dtype=dtype)
    load_model(directory, gpt, group=layout.student.world)
    stream = export_hf_weights(gpt, dims, bucket_bytes=args.bucket_mb << 20)
    if dist.get_rank() == 0:  # with --ep, the other replicas' leaders get the same weights: rank 0 writes them
        write_hf_checkpoint(stream, args.save_dir, metadata_from=hf_dir, max_shard_bytes=int(args.max_shard_gb * 2**30))
        _set_config_dtype(Path(args.save_dir) / "config.json", dtype)
        print(f"wrote {args.save_dir}")
    else:
        for _ in stream:
            pass
    dist.barrier()
    dist.destroy_process_group()


def _find_hf_dir(directory: Path) -> Path:
    """A model checkpoint holds hf/; a training checkpoint's run keeps the student's in its first model dir."""
    for candidate in (directory / "hf", directory.parent.parent / "student-hf"):
        if (candidate / "config.json").is_file():
            return candidate
    sys.exit(f"error: --load-dir: no hf/ directory with config.json next to {directory}")


def _set_config_dtype(path: Path, dtype) -> None:
    config = json.loads(path.read_text())
    name = str(dtype).removeprefix("torch.")
    config["torch_dtype"] = name
    config["dtype"] = name
    path.write_text(json.dumps(config, indent=2))


if __name__ == "__main__":
    main()
