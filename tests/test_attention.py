"""Issue 19, items 3-4: linear-memory attention without Transformer Engine (SDPAttention in megatron's local spec)
and packed micro-batches (several rows in one sequence) through ParallelModel, in a real GPTModel."""

import math

import pytest
import torch
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType

from megatron_gopd.models import builder
from megatron_gopd.models.architectures import ModelDims, transformer_config
from megatron_gopd.models.attention import SDPAttention
from tests.conftest import run_torchrun
from tests.tiny import tiny_hf_config

TOL = 1e-5  # fp32


@pytest.fixture
def dims():
    return ModelDims.from_hf(tiny_hf_config("qwen3"))


def reference_attention(q, k, v, scale):
    """Causal attention with the scores written out: [s, heads, dim] query, [s, groups, dim] key/value."""
    k, v = (t.repeat_interleave(q.shape[1] // t.shape[1], dim=1) for t in (k, v))
    scores = torch.einsum("qhd,khd->hqk", q, k) * scale
    scores = scores.masked_fill(torch.ones(q.shape[0], q.shape[0], dtype=torch.bool).triu(1), -math.inf)
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v).reshape(q.shape[0], -1)


def qkv(s, b, generator):
    return (torch.randn(s, b, 4, 32, generator=generator), torch.randn(s, b, 2, 32, generator=generator),
            torch.randn(s, b, 2, 32, generator=generator))


def test_sdpa_is_causal_grouped_query_attention(dims):
    attention = SDPAttention(transformer_config(dims), 1, AttnMaskType.causal, "self")
    q, k, v = qkv(19, 2, torch.Generator().manual_seed(0))
    out = attention(q, k, v, None)
    assert out.shape == (19, 2, 128)
    for i in range(2):
        torch.testing.assert_close(out[:, i], reference_attention(q[:, i], k[:, i], v[:, i], 32 ** -0.5),
                                   atol=TOL, rtol=0)


def test_sdpa_packed_rows_attend_only_within_their_row(dims):
    attention = SDPAttention(transformer_config(dims), 1, AttnMaskType.causal, "self")
    q, k, v = (t[:, 0] for t in qkv(30, 1, torch.Generator().manual_seed(1)))  # THD: [tokens, heads, dim]
    cu = torch.tensor([0, 4, 21, 30], dtype=torch.int32)
    params = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=17, max_seqlen_kv=17)
    out = attention(q, k, v, None, packed_seq_params=params)
    want = torch.cat([reference_attention(q[a:b], k[a:b], v[a:b], 32 ** -0.5) for a, b in [(0, 4), (4, 21), (21, 30)]])
    torch.testing.assert_close(out, want, atol=TOL, rtol=0)
    # the same tokens unpacked: every row after the first sees the rows before it
    assert (attention(q[:, None], k[:, None], v[:, None], None)[4:, 0] - want[4:]).abs().max() > 0.1


def test_sdpa_rejects_what_it_does_not_compute(dims):
    config = transformer_config(dims)
    with pytest.raises(ValueError, match=r"does not support attention_dropout=0.1 \(only 0\)"):
        SDPAttention(config, 1, AttnMaskType.causal, "self", attention_dropout=0.1)
    with pytest.raises(ValueError, match=r"attn_mask_type=AttnMaskType.padding \(only causal\)"):
        SDPAttention(config, 1, AttnMaskType.padding, "self")
    windowed = transformer_config(dims)
    windowed.window_size = (128, 0)
    with pytest.raises(ValueError, match=r"window_size=\(128, 0\)"):
        SDPAttention(windowed, 1, AttnMaskType.causal, "self")
    attention = SDPAttention(config, 1, AttnMaskType.causal, "self")
    q, k, v = qkv(5, 1, torch.Generator().manual_seed(2))
    with pytest.raises(ValueError, match="causal attention only: pass attention_mask=None"):
        attention(q, k, v, torch.ones(1, 1, 5, 5, dtype=torch.bool))
    cu = torch.tensor([0, 5], dtype=torch.int32)
    with pytest.raises(ValueError, match=r"qkv_format='sbhd' is not supported"):
        attention(q[:, 0], k[:, 0], v[:, 0], None,
                  packed_seq_params=PackedSeqParams(qkv_format="sbhd", cu_seqlens_q=cu))


def test_layer_spec_attention_choice(dims, monkeypatch):
    def core_attention(spec):
        return spec.submodules.self_attention.submodules.core_attention

    monkeypatch.setattr(builder, "transformer_engine_available", lambda: False)
    assert core_attention(builder.layer_spec(dims, None)) is SDPAttention  # auto without TE
    assert core_attention(builder.layer_spec(dims, None, "sdpa")) is SDPAttention
    assert core_attention(builder.layer_spec(dims, None, "megatron")) is DotProductAttention
    with pytest.raises(ValueError, match="attention='te' needs Transformer Engine on a CUDA GPU"):
        builder.layer_spec(dims, None, "te")
    with pytest.raises(ValueError, match=r"attention='flash' is not one of auto, sdpa, megatron, te"):
        builder.layer_spec(dims, None, "flash")
    monkeypatch.setattr(builder, "transformer_engine_available", lambda: True)
    with pytest.raises(ValueError, match=r"fp8='e4m3' needs Transformer Engine's layers: attention 'te' or 'auto', "
                                         r"not 'sdpa'"):
        builder.layer_spec(dims, "e4m3", "sdpa")


@pytest.fixture(scope="module", params=[(1, 1), (2, 1), (2, 2)], ids=["tp1", "tp2", "pp2"])
def model_checks(request, tmp_path_factory):
    """parity and packing in the tiny Qwen3 GPTModel at TP=1, TP=2 and PP=2 (tests/dist/attention_packing.py)."""
    nproc, pp = request.param
    return run_torchrun("attention_packing.py", nproc, "--checks", "parity,packing", "--pp", str(pp),
                        tmp_path=tmp_path_factory.mktemp("attention"))


def test_sdpa_matches_megatron_attention_in_the_model(model_checks):
    parity = model_checks["parity"]
    assert parity["logits_max_diff"] < TOL, parity
    assert parity["logprobs_max_diff"] < TOL, parity
    assert parity["grad_max_diff"] < TOL, parity
    assert parity["grad_max_abs"] > 1e-2, parity  # real gradients, not zeros


def test_packed_rows_match_unpacked_rows(model_checks):
    packing = model_checks["packing"]
    assert packing["logprobs_max_abs"] > 1.0, packing  # a real distribution
    for layout, total in (("packed", 220), ("packed_padded", 233)):  # 5 rows of 7 ... 120 tokens; + 13 padding
        entry = packing[layout]
        assert entry["logprobs_tokens"] == total, entry
        assert entry["logprobs_max_diff"] < TOL, (layout, entry)
        assert entry["grad_max_diff"] < TOL, (layout, entry)
        assert entry["first_token_logprobs_max_abs"] == 0.0, (layout, entry)  # never scored against the row before
        assert entry["rope_vs_rows_alone_max_diff"] < 1e-6, (layout, entry)  # positions restart per row
    assert "megatron's DotProductAttention" in packing["megatron_refuses_packed"], packing


def test_sdpa_never_builds_the_score_matrix(tmp_path):
    result = run_torchrun("attention_packing.py", 1, "--checks", "memory", "--forward-only", tmp_path=tmp_path)
    memory = result["memory"]
    one_layer_scores = memory["heads_per_rank"] * memory["score_matrix_one_head_mib"]  # 4 x 4096^2 fp32 = 256 MiB
    # megatron's attention holds the scores and their softmax: the probe sees S x S allocations when there are any
    assert memory["megatron_peak_extra_mib"] > one_layer_scores, memory
    # SDPA's forward at 4096 tokens adds less than one head's S x S scores (measured: ~26 MiB against 64 MiB)
    assert memory["sdpa_peak_extra_mib"] < one_layer_scores / 4, memory


@pytest.mark.gpu
def test_attention_and_packing_on_gpu(tmp_path):
    """On CUDA the packed rows go through FlexAttention with a document mask, the rest through torch's flash /
    memory-efficient kernels; the same bounds as on CPU."""
    result = run_torchrun("attention_packing.py", 1, "--checks", "parity,packing,memory", "--forward-only",
                          tmp_path=tmp_path)
    assert result["parity"]["logits_max_diff"] < TOL and result["parity"]["grad_max_diff"] < TOL, result
    for layout in ("packed", "packed_padded"):
        assert result["packing"][layout]["logprobs_max_diff"] < TOL, result
        assert result["packing"][layout]["grad_max_diff"] < TOL, result
    memory = result["memory"]
    assert memory["device"] == "cuda"
    assert memory["sdpa_peak_extra_mib"] < memory["heads_per_rank"] * memory["score_matrix_one_head_mib"] / 4, memory
