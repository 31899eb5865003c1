"""Build one pipeline stage of a megatron-core GPTModel for a HF architecture, and fill it with HF weights."""

from __future__ import annotations

import torch
from megatron.core import tensor_parallel
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

from megatron_gopd.models.architectures import ModelDims, padded_vocab_size, transformer_config
from megatron_gopd.models.attention import SDPAttention
from megatron_gopd.models.hf_io import HFWeights
from megatron_gopd.models.weights import local_to_global_name, resolved_weights, to_megatron_shard

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def transformer_engine_available() -> bool:
    if not torch.cuda.is_available():
        return False
    try:
        import transformer_engine.pytorch  # noqa: F401
    except ImportError:
        return False
    return True


ATTENTIONS = ("auto", "sdpa", "megatron", "te")


def layer_spec(dims: ModelDims, fp8: str | None, attention: str = "auto"):
    """The transformer layer spec for `attention`:
    - "te": Transformer Engine's spec (its fused attention; packed rows in the THD format); needs TE and CUDA;
    - "sdpa": megatron's local spec with SDPAttention (torch's fused attention, linear memory, packed rows);
    - "megatron": megatron's local spec as it is (DotProductAttention: S x S scores, no packed rows);
    - "auto": "te" where Transformer Engine and CUDA are present, else "sdpa".
    """
    if attention not in ATTENTIONS:
        raise ValueError(f"attention={attention!r} is not one of {', '.join(ATTENTIONS)}")
    has_te = transformer_engine_available()
    if attention == "auto":
        attention = "te" if has_te else "sdpa"
    if attention == "te":
        if not has_te:
            raise ValueError("attention='te' needs Transformer Engine on a CUDA GPU, which this process does not "
                             "have; use 'sdpa'")
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec

        return get_gpt_layer_with_transformer_engine_spec(qk_layernorm=dims.qk_norm)
    if fp8 and not has_te:
        raise ValueError(f"fp8={fp8!r} needs Transformer Engine on a CUDA GPU, which this process does not have")
    if fp8:
        raise ValueError(f"fp8={fp8!r} needs Transformer Engine's layers: attention 'te' or 'auto', not {attention!r}")
    spec = get_gpt_layer_local_spec(normalization="RMSNorm", qk_layernorm=dims.qk_norm)
    if attention == "sdpa":
        spec.submodules.self_attention.submodules.core_attention = SDPAttention
    return spec


class RoleAmaxGroups:
    """The two questions megatron's fp8 context (fp8_utils.get_fp8_context) asks `parallel_state`, answered with
    one role's groups. parallel_state is never initialised here, so megatron would pass fp8_group=None and
    Transformer Engine would reduce its amax statistics over the WORLD, dedicated teacher ranks included, which
    never join: a hang. The group is megatron's own choice (TP x DP x CP, or TP x CP with tp_only_amax_red)."""

    def __init__(self, pgc: ProcessGroupCollection):
        self.pgc = pgc

    def model_parallel_is_initialized(self) -> bool:
        return True

    def get_amax_reduction_group(self, with_context_parallel: bool = False, tp_only_amax_red: bool = False):
        # cp is 1 in every layout here, so the groups with and without context parallelism coincide
        return self.pgc.tp_cp if tp_only_amax_red else self.pgc.tp_dp_cp


def route_fp8_amax_reduction(pgc: ProcessGroupCollection) -> None:
    """Makes megatron's fp8 context reduce amax over this role's groups (see RoleAmaxGroups)."""
    from megatron.core import fp8_utils

    fp8_utils.parallel_state = RoleAmaxGroups(pgc)  # fp8_utils reads nothing else from parallel_state


def build_model(
    dims: ModelDims,
    pgc: ProcessGroupCollection,
    *,
    dtype: torch.dtype = torch.float32,
    seed: int = 1234,
    fp8: str | None = None,
    fp8_recipe: str = "delayed",
    attention: str = "auto",
) -> GPTModel:
    """This rank's pipeline stage of the model, TP-sharded over `pgc.tp`, randomly initialised from `seed`, with
    the core attention that `layer_spec` picks for `attention`."""
    tp, pp = pgc.tp.size(), pgc.pp.size()
    config = transformer_config(dims, tp=tp, pp=pp, dtype=dtype, fp8=fp8, fp8_recipe=fp8_recipe)
    if fp8:
        route_fp8_amax_reduction(pgc)
    # Seeds the per-TP-rank RNG states; with CPU initialisation the full weight is drawn then sliced, so the
    # initial model is the same at every TP size.
    tensor_parallel.model_parallel_cuda_manual_seed(seed, tp_rank=pgc.tp.rank(), ep_rank=0, etp_rank=0)
    torch.manual_seed(seed)
    pp_rank = pgc.pp.rank()
    model = GPTModel(
        config=config,
        transformer_layer_spec=layer_spec(dims, fp8, attention),
        vocab_size=padded_vocab_size(dims.vocab_size),
        max_sequence_length=dims.max_position_embeddings,
        pre_process=pp_rank == 0,
        post_process=pp_rank == pp - 1,
        share_embeddings_and_output_weights=dims.tie_word_embeddings,
        position_embedding_type="rope",
        rotary_base=int(dims.rope_theta),
        pg_collection=pgc,
    )
    if torch.cuda.is_available():
        model.cuda(torch.cuda.current_device())
    return model


def layer_offset(model: GPTModel) -> int:
    return get_transformer_layer_offset(model.config, vp_stage=None, pp_rank=model.pg_collection.pp.rank())


@torch.no_grad()
def load_hf_weights(model: GPTModel, dims: ModelDims, weights: HFWeights) -> None:
    """Copies HF weights into this rank's shard of the model. Each rank reads only the tensors it needs."""
    by_global = {w.megatron: w for w in resolved_weights(dims)}
    tp_rank, tp = model.pg_collection.tp.rank(), model.pg_collection.tp.size()
    offset = layer_offset(model)
    for local_name, param in model.named_parameters():
        global_name = local_to_global_name(local_name, offset)
        if global_name == "output_layer.weight" and dims.tie_word_embeddings:
            # The last pipeline stage keeps its own copy of the tied embedding.
            global_name = "embedding.word_embeddings.weight"
        weight = by_global.get(global_name)
        if weight is None:
            raise KeyError(f"megatron parameter {local_name} has no entry in the {dims.model_type} weight map")
        shard = to_megatron_shard(dims, weight, [weights[n] for n in weight.hf], tp_rank, tp)
        if shard.shape != param.shape:
            raise ValueError(f"{local_name}: HF weights give shape {tuple(shard.shape)}, model has {tuple(param.shape)}")
        param.copy_(shard)
