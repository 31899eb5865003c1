"""ExPO weight extrapolation, the paper's weight-space baseline: w = w_s + (1 + alpha) * (mean(w_teachers) - w_s).

    python tools/expo.py --student base-hf --teachers math-hf code-hf --alpha 0.5 --out expo-hf
    python tools/expo.py --student ckpt/base --teachers ckpt/math ckpt/code --alpha 0.5 --out ckpt/expo

Works on Hugging Face directories (tensor by tensor, little memory) or on megatron-gopd model checkpoints (all
models in one process). Every model must have the student's architecture.
"""

import argparse
import sys
from pathlib import Path

import torch


def extrapolate(student: torch.Tensor, teachers: list[torch.Tensor], alpha: float) -> torch.Tensor:
    """(1 + alpha) * mean - alpha * w_s: the same line, written so that alpha = 0 gives the teachers' mean exactly."""
    mean = torch.stack([t.float() for t in teachers]).mean(0)
    return ((1 + alpha) * mean - alpha * student.float()).to(student.dtype)


def expo_hf(student: Path, teachers: list[Path], alpha: float, out: Path) -> None:
    from megatron_gopd.models.hf_io import HFWeights, write_hf_checkpoint

    sources = [HFWeights(student)] + [HFWeights(t) for t in teachers]
    names = sources[0].names()
    for path, src in zip(teachers, sources[1:]):
        if src.names() != names:
            sys.exit(f"error: {path} has different tensors than {student}: not the same architecture")

    def tensors():
        for name in names:
            ws, *wt = (src[name] for src in sources)
            if any(t.shape != ws.shape for t in wt):
                sys.exit(f"error: {name} has shapes {[tuple(t.shape) for t in [ws, *wt]]}: not the same architecture")
            yield name, extrapolate(ws, wt, alpha)

    write_hf_checkpoint(tensors(), out, metadata_from=student)


def expo_megatron(student: Path, teachers: list[Path], alpha: float, out: Path) -> None:
    from megatron_gopd.runtime.distributed import init_distributed

    init_distributed()
    import torch.distributed as dist

    from megatron_gopd.checkpoint import load_model, read_checkpoint_metadata, save_model
    from megatron_gopd.models.builder import DTYPES, build_model
    from megatron_gopd.runtime.layout import ParallelShape, build_layout

    dims = _same_architecture([student, *teachers])
    layout = build_layout(ParallelShape())

    def load(path):
        gpt = build_model(dims, layout.student.pgc, dtype=DTYPES[read_checkpoint_metadata(path)["dtype"]])
        load_model(path, gpt, group=layout.student.world)
        return gpt

    base = load(student)
    teacher_params = [dict(load(t).named_parameters()) for t in teachers]
    with torch.no_grad():
        for name, p in base.named_parameters():
            p.copy_(extrapolate(p, [tp[name] for tp in teacher_params], alpha))
    save_model(out, base, hf_dir=student / "hf", group=layout.student.world)
    dist.destroy_process_group()


def _same_architecture(paths: list[Path]):
    from megatron_gopd.models.architectures import ModelDims

    dims = [ModelDims.from_hf(p / "hf") for p in paths]
    for path, d in zip(paths[1:], dims[1:]):
        if d != dims[0]:
            sys.exit(f"error: {path} is {d}, but the student {paths[0]} is {dims[0]}: not the same architecture")
    return dims[0]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--student", required=True, type=Path)
    parser.add_argument("--teachers", required=True, nargs="+", type=Path)
    parser.add_argument("--alpha", type=float, default=0.5)
    parser.add_argument("--out", required=True, type=Path)
    args = parser.parse_args(argv)
    if (args.student / "config.json").is_file():
        expo_hf(args.student, args.teachers, args.alpha, args.out)
    elif (args.student / "hf").is_dir():
        expo_megatron(args.student, args.teachers, args.alpha, args.out)
    else:
        sys.exit(f"error: --student {args.student} is neither a HF model directory nor a megatron-gopd checkpoint")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
