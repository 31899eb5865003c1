"""Model checkpoints: written at world size 1, loaded at TP=2 and at PP=2, and by a dedicated teacher role.

Ranks: 2. First the student role is rank 0 alone, with a dedicated teacher on rank 1: the student saves while the
teacher runs forward passes on its own groups (a save that used the WORLD group would hang here), then the
teacher loads the checkpoint on its own (its role starts at global rank 1). Then both ranks load it at TP=2 and
at PP=2. All logits are compared with the saving model's. Also records the clear errors.
"""

import argparse
import json
import warnings
from pathlib import Path

warnings.filterwarnings("ignore")

import torch
import torch.distributed as dist

ARCHS = ["llama", "qwen3_tied"]  # untied, and tied embeddings (the last PP stage holds a copy)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--workdir", required=True)
    args = parser.parse_args()

    from megatron_gopd.runtime.distributed import init_distributed

    rank, world = init_distributed(timeout_s=120)  # a collective that spans the wrong ranks fails, not hangs

    from megatron.core.tensor_parallel.mappings import gather_from_tensor_model_parallel_region

    from megatron_gopd import checkpoint
    from megatron_gopd.models.architectures import ModelDims
    from megatron_gopd.models.builder import HFWeights, build_model, load_hf_weights
    from megatron_gopd.models.parallel_model import ParallelModel
    from megatron_gopd.runtime.layout import ParallelShape, build_layout
    from tests.tiny import tiny_hf_model

    work = Path(args.workdir)
    tokens = torch.randint(0, 250, (2, 16), generator=torch.Generator().manual_seed(5))

    def logits_of(gpt, dims):
        """Full-vocab logits on the last pipeline stage, None elsewhere."""
        tp = gpt.pg_collection.tp

        def keep(mb, lp, ent, logits):
            full = gather_from_tensor_model_parallel_region(logits, group=tp)[..., : dims.vocab_size]
            return lp.new_zeros(()), {"logits": full.detach().clone()}

        out = ParallelModel(gpt, dims).forward_backward([{"tokens": tokens}], keep, temperature=1.0, forward_only=True,
                                           with_entropy=False)
        return out[0]["logits"] if out else None

    def max_diff(logits, ref):
        diff = torch.tensor((logits - ref).abs().max().item() if logits is not None else 0.0)
        dist.all_reduce(diff, op=dist.ReduceOp.MAX)
        return diff.item()

    # 1. world-1 student saves while a dedicated teacher works on its own groups; then the teacher loads
    roles = build_layout(ParallelShape(1, 1, 1), {"teacher": (ParallelShape(1, 1, 1), True)})
    dims_of = {arch: ModelDims.from_hf(tiny_hf_model(arch).config) for arch in ARCHS}
    refs, result = {}, {arch: {} for arch in ARCHS}
    for arch in ARCHS:
        hf, dims = tiny_hf_model(arch, seed=3), dims_of[arch]
        if roles.student.is_member:
            hf.config.save_pretrained(work / f"hf-{arch}")
            (work / f"hf-{arch}" / "tokenizer.json").write_text("{}")  # stands in for the tokenizer files
            (work / f"hf-{arch}" / "model.safetensors").write_bytes(b"weights are never copied")
            gpt = build_model(dims, roles.student.pgc, seed=11)
            load_hf_weights(gpt, dims, HFWeights(hf.state_dict()))
            checkpoint.save_model(work / arch, gpt, hf_dir=work / f"hf-{arch}", group=roles.student.world)
            refs[arch] = logits_of(gpt, dims)
        else:
            teacher = build_model(dims, roles.frozen["teacher"].pgc, seed=11)
            load_hf_weights(teacher, dims, HFWeights(hf.state_dict()))
            for _ in range(3):
                logits_of(teacher, dims)
    for arch in ARCHS:
        box = [refs.get(arch)]
        dist.broadcast_object_list(box, src=0)
        refs[arch] = box[0]
        if roles.frozen["teacher"].is_member:
            teacher = build_model(dims_of[arch], roles.frozen["teacher"].pgc, seed=99)
            meta = checkpoint.load_model(work / arch, teacher, group=roles.frozen["teacher"].world)
            result[arch]["teacher_diff"] = (logits_of(teacher, dims_of[arch]) - refs[arch]).abs().max().item()
            result[arch]["teacher_meta"] = meta
        dist.barrier()

    # 2. both ranks load it at TP=2, then at PP=2, into a model built from another seed. Against the saving
    # model (TP changes the order of float sums), and against the same layout filled from the HF weights
    # directly: there the weights, hence the logits, must be bit-identical.
    for name, shape in {"tp2": ParallelShape(2, 1, 1), "pp2": ParallelShape(1, 2, 1)}.items():
        layout = build_layout(shape)
        for arch in ARCHS:
            dims = dims_of[arch]
            gpt = build_model(dims, layout.student.pgc, seed=99)
            before = max_diff(logits_of(gpt, dims), refs[arch])
            checkpoint.load_model(work / arch, gpt, group=layout.student.world)
            loaded = logits_of(gpt, dims)
            direct = build_model(dims, layout.student.pgc, seed=99)
            load_hf_weights(direct, dims, HFWeights(tiny_hf_model(arch, seed=3).state_dict()))
            direct_logits = logits_of(direct, dims)
            result[arch][name] = {"diff_before_load": before, "diff": max_diff(loaded, refs[arch]),
                                  "diff_vs_hf_load": max_diff(loaded, direct_logits)}

    # 3. clear errors
    layout = build_layout(ParallelShape(2, 1, 1))
    errors = {}

    def error_of(fn):
        try:
            fn()
        except Exception as e:  # noqa: BLE001 - the test asserts on the type and the message
            return f"{type(e).__name__}: {e}"
        return None

    llama = build_model(dims_of["llama"], layout.student.pgc, seed=99)
    errors["missing"] = error_of(lambda: checkpoint.load_model(work / "nowhere", llama, group=layout.student.world))
    # an fp32 checkpoint into a bf16 model: the weights are cast on load (its norms stay fp32)
    bf16 = build_model(dims_of["llama"], layout.student.pgc, dtype=torch.bfloat16)
    checkpoint.load_model(work / "llama", llama, group=layout.student.world)

    def bf16_diff():
        return max(float((a.float() - b.to(a.dtype).float()).abs().max())
                   for a, b in zip(bf16.parameters(), llama.parameters(), strict=True))

    result["bf16_cast"] = {"diff_before_load": bf16_diff()}
    checkpoint.load_model(work / "llama", bf16, group=layout.student.world)
    result["bf16_cast"].update(diff=bf16_diff(), dtype=str(next(bf16.parameters()).dtype))
    tied = build_model(dims_of["qwen3_tied"], layout.student.pgc)
    errors["architecture"] = error_of(lambda: checkpoint.load_model(work / "llama", tied, group=layout.student.world))
    errors["exists"] = error_of(lambda: checkpoint.save_model(work / "llama", llama, group=layout.student.world))

    gathered = [None] * world
    dist.all_gather_object(gathered, result)
    for arch in ARCHS:  # the teacher's measurements were taken on rank 1
        result[arch].update({k: v for k, v in gathered[1][arch].items() if k.startswith("teacher")})
    if rank == 0:
        files = sorted(str(p.relative_to(work / "llama")) for p in (work / "llama").rglob("*") if p.is_file())
        with open(args.out, "w") as f:
            json.dump({"archs": result, "errors": errors, "files": files}, f)
    dist.destroy_process_group()


if __name__ == "__main__":  # required: dist_checkpointing's writer starts a multiprocessing Manager
    main()
