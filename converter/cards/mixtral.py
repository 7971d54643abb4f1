"""MixtralForCausalLM (TensorRT-LLM `models/llama/convert.py`, the MoE branch of `convert_layer`;
`models/llama/config.py`; `layers/moe.py`): Llama attention, a sparse mixture of SwiGLU experts as the MLP.

Per layer the experts are stacked: `mlp.fc` = `[w3_e; w1_e]` per expert (the plugin's fused SwiGLU takes the
linear half first, the activated half second), `mlp.proj` = `w2_e`, each split over the expert-TP ranks on the
intermediate dim, the experts spread over the expert-parallel ranks. The router (`block_sparse_moe.gate`)
becomes `mlp.router`, kept in float32 and replicated. Rules and sources: docs/format.md.

Target `trtllm-pytorch` (`modeling_mixtral.py`; `modules/fused_moe/quantization.py` `FusedMoEMethodBase`, the
VANILLA loading mode): the same stacked experts under `block_sparse_moe.experts.w3_w1_weight` / `w2_weight`, the
router `block_sparse_moe.gate.weight` replicated in the model's dtype, and an embedding that is not split (a plain
`Embedding`, no mapping), so a tied model cannot be built there (`DecoderModelForCausalLM` asserts the embedding
and lm_head share a TP mode).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from ..card import Card, ConfigMap, Row, Shape, TargetRows, TestSupport, layer, register
from ..errors import ShardproofError
from ..hf_fields import number, real, revised, size
from ..transforms import REPLICATED, VOCAB, Experts
from . import llama

MOE = f"{llama.HF_LAYER}.block_sparse_moe"
EXPERTS = (("e", "num_experts"),)
RENORMALIZE = 1  # MoeConfig.ExpertScaleNormalizationMode.RENORMALIZE: softmax, top-k, divide by their sum


@dataclass(frozen=True)
class MixtralDims(llama.DecoderDims):
    """A Llama decoder whose MLP is `num_experts` SwiGLU experts, `top_k` of them per token."""

    num_experts: int = 1
    top_k: int = 1

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.top_k > self.num_experts:
            raise ShardproofError(f"num_experts_per_tok={self.top_k} exceeds num_local_experts={self.num_experts}")


ROWS = tuple(row for row in llama.ROWS if ".mlp." not in row.target) + (
    layer("mlp.router.weight", f"{MOE}.gate.weight", shard=REPLICATED, dtype="float32"),
    layer("mlp.fc.weight", f"{MOE}.experts.{{e}}.w3.weight", f"{MOE}.experts.{{e}}.w1.weight",
          shard=Experts(groups=2, dim=0), gather=EXPERTS),
    layer("mlp.proj.weight", f"{MOE}.experts.{{e}}.w2.weight", shard=Experts(groups=1, dim=1), gather=EXPERTS),
)

PT_MOE = "block_sparse_moe"
PYTORCH_ROWS = (
    Row("model.embed_tokens.weight", ("model.embed_tokens.weight",), REPLICATED, "first"),
    *(row for row in llama.PYTORCH_ROWS if row.stage == "layer" and row.when is None and ".mlp." not in row.target),
    llama.pt_layer(f"{PT_MOE}.gate.weight", f"{MOE}.gate.weight", shard=REPLICATED),
    llama.pt_layer(f"{PT_MOE}.experts.w3_w1_weight", f"{MOE}.experts.{{e}}.w3.weight", f"{MOE}.experts.{{e}}.w1.weight",
                   shard=Experts(groups=2, dim=0), gather=EXPERTS),
    llama.pt_layer(f"{PT_MOE}.experts.w2_weight", f"{MOE}.experts.{{e}}.w2.weight", shard=Experts(groups=1, dim=1),
                   gather=EXPERTS),
    Row("model.norm.weight", ("model.norm.weight",), REPLICATED, "last"),
    Row("lm_head.weight", ("lm_head.weight",), VOCAB, "last"),
)
PYTORCH_TARGETS = {llama.PYTORCH: dataclasses.replace(
    llama.PYTORCH_TARGETS[llama.PYTORCH], rows=PYTORCH_ROWS,
    refused=(("tie_word_embeddings", "its embedding is not split and its lm_head is (modeling_mixtral.py, "
              "modeling_utils.py DecoderModelForCausalLM asserts a tied pair shares a TP mode)"),),
)}


def source_shapes(d: MixtralDims) -> dict[str, Shape]:
    """The Llama shapes, and the router's and every expert's."""
    h, i = d.hidden_size, d.intermediate_size
    return {
        **llama.source_shapes(d),
        f"{MOE}.gate.weight": (d.num_experts, h),
        f"{MOE}.experts.{{e}}.w1.weight": (i, h),
        f"{MOE}.experts.{{e}}.w3.weight": (i, h),
        f"{MOE}.experts.{{e}}.w2.weight": (h, i),
    }


def dims_from_hf(hf: Any) -> MixtralDims:
    if hf.hidden_act != "silu":
        # LLaMAConfig.from_hugging_face writes hidden_act "swiglu" for Mixtral whatever the HF act is
        raise ShardproofError(f"hidden_act={hf.hidden_act!r}: TensorRT-LLM's Mixtral experts compute SwiGLU (silu) only")
    dims = llama.dims_from_hf(hf, qkv_bias=False, dense_bias=False, mlp_bias=False)
    return MixtralDims(**dataclasses.asdict(dims), num_experts=hf.num_local_experts, top_k=hf.num_experts_per_tok)


def trt_fields(hf: Any, d: MixtralDims) -> dict:
    """LLaMAConfig's fields with the MoE block; `hidden_act` is "swiglu", as from_hugging_face sets it."""
    return {
        **llama.trt_fields(hf, d),
        "hidden_act": "swiglu",
        "moe": {"num_experts": d.num_experts, "top_k": d.top_k, "normalization_mode": RENORMALIZE},
    }


def dims_from_trt(cfg: dict) -> MixtralDims:
    moe = cfg["moe"]
    if moe.get("normalization_mode", RENORMALIZE) != RENORMALIZE:
        raise ShardproofError(f"moe.normalization_mode={moe['normalization_mode']}: Mixtral renormalizes the top-k (1)")
    dims = llama.dims_from_trt(cfg)
    return MixtralDims(**dataclasses.asdict(dims), num_experts=moe["num_experts"], top_k=moe["top_k"])


def hf_config(cfg: dict) -> dict:
    return {
        **llama.hf_config(cfg, "mixtral"),
        "hidden_act": "silu",
        "num_local_experts": cfg["moe"]["num_experts"],
        "num_experts_per_tok": cfg["moe"]["top_k"],
        "sliding_window": None,
    }


def strategy() -> Any:
    """The Llama-family draws, with 2 to 8 experts and top-1 or top-2 routing."""
    from hypothesis import strategies as st

    return st.tuples(llama.model_strategy(), st.sampled_from([2, 4, 8]), st.integers(1, 2)).map(
        lambda t: {**t[0], "num_local_experts": t[1], "num_experts_per_tok": t[2]}
    )


MIXTRAL = register(Card(
    name="MixtralForCausalLM",
    model_type="mixtral",
    forward="mixtral",
    rows=ROWS,
    skips=llama.SKIPS,
    source_shapes=source_shapes,
    config=ConfigMap(
        dims_from_hf=dims_from_hf,
        trt_fields=trt_fields,
        dims_from_trt=dims_from_trt,
        hf_config=hf_config,
        hf_fields=revised(llama.HF_FIELDS, ("attention_bias", "mlp_bias"), intermediate_size=size(14336),
                          max_position_embeddings=size(131072), num_key_value_heads=size(8),
                          rms_norm_eps=number(1e-5), rope_theta=real(1e6), num_local_experts=size(8),
                          num_experts_per_tok=size(2)),
        standardize=llama.standard_decoder,
        hf_ignored={
            **llama.SLIDING_WINDOW_IGNORED,
            "attention_bias": "not a MixtralConfig field: Mixtral's attention hard-wires no bias",
            "mlp_bias": "not a MixtralConfig field: Mixtral's experts have no bias",
            "router_aux_loss_coef": "the load-balancing loss is training only",
            "router_jitter_noise": "router jitter is applied in training only",
            "output_router_logits": "what a forward returns, not what it computes",
        },
    ),
    targets=PYTORCH_TARGETS,
    tests=TestSupport(config_class="MixtralConfig", strategy=strategy,
                      tiny=dict(num_local_experts=4, num_experts_per_tok=2),
                      # every expert on every token: a tiny random router has near-ties that float16/bfloat16
                      # math flips, which the precision thresholds (set for dense models) count as a failure
                      selftest=dict(num_experts_per_tok=4)),
))
