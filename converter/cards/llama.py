"""LlamaForCausalLM (TensorRT-LLM 0.16–1.x `models/llama/convert.py`), and the decoder tables its relatives reuse.

Rules and their sources are in docs/format.md. Mistral, Qwen2, Qwen3 and Gemma cards build on `decoder_card`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping

from ..errors import ShardproofError
from ..card import (Card, ConfigMap, Dims, Row, Shape, Skip, TIED_LM_HEAD, TargetRows, TestSupport, first, last, layer,
                    register)
from ..hf_fields import HFField, flag, number, real, size, table, word
from ..transforms import COLUMN, EMBEDDING, QKV_SPEC, REPLICATED, ROW, VOCAB, CeilSplit, FusedColumn

HF_LAYER = "model.layers.{i}"


@dataclass(frozen=True)
class DecoderDims(Dims):
    """A pre-norm decoder with fused-QKV attention and a gated MLP."""

    vocab_size: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    qkv_bias: bool = False
    dense_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    tie_word_embeddings: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.num_heads % self.num_kv_heads:
            raise ShardproofError(
                f"num_attention_heads={self.num_heads} is not a multiple of num_key_value_heads={self.num_kv_heads}"
            )


ROWS = (
    first("transformer.vocab_embedding.weight", "model.embed_tokens.weight", shard=EMBEDDING),
    layer("input_layernorm.weight", f"{HF_LAYER}.input_layernorm.weight", shard=REPLICATED),
    layer("attention.qkv.weight", *(f"{HF_LAYER}.self_attn.{p}_proj.weight" for p in "qkv"), shard=QKV_SPEC),
    layer("attention.qkv.bias", *(f"{HF_LAYER}.self_attn.{p}_proj.bias" for p in "qkv"), shard=QKV_SPEC, when="qkv_bias"),
    layer("attention.q_layernorm.weight", f"{HF_LAYER}.self_attn.q_norm.weight", shard=REPLICATED, when="qk_norm"),
    layer("attention.k_layernorm.weight", f"{HF_LAYER}.self_attn.k_norm.weight", shard=REPLICATED, when="qk_norm"),
    layer("attention.dense.weight", f"{HF_LAYER}.self_attn.o_proj.weight", shard=ROW),
    layer("attention.dense.bias", f"{HF_LAYER}.self_attn.o_proj.bias", shard=REPLICATED, when="dense_bias"),
    layer("post_layernorm.weight", f"{HF_LAYER}.post_attention_layernorm.weight", shard=REPLICATED),
    # GatedMLP computes act(fc(x)) * gate(x): HF's gate_proj is the activated branch, so it becomes `fc`.
    layer("mlp.fc.weight", f"{HF_LAYER}.mlp.gate_proj.weight", shard=COLUMN),
    layer("mlp.fc.bias", f"{HF_LAYER}.mlp.gate_proj.bias", shard=COLUMN, when="mlp_bias"),
    layer("mlp.gate.weight", f"{HF_LAYER}.mlp.up_proj.weight", shard=COLUMN),
    layer("mlp.gate.bias", f"{HF_LAYER}.mlp.up_proj.bias", shard=COLUMN, when="mlp_bias"),
    layer("mlp.proj.weight", f"{HF_LAYER}.mlp.down_proj.weight", shard=ROW),
    layer("mlp.proj.bias", f"{HF_LAYER}.mlp.down_proj.bias", shard=REPLICATED, when="mlp_bias"),
    last("transformer.ln_f.weight", "model.norm.weight", shard=REPLICATED),
    last("lm_head.weight", "lm_head.weight", shard=VOCAB, when="!tie_word_embeddings"),
    # A layout that shares the embedding table with lm_head (a card's layout rule decides) stores no lm_head.
    last("lm_head.weight", "model.embed_tokens.weight", shard=VOCAB, when="tie_word_embeddings & !share_embedding_table"),
)

PYTORCH = "trtllm-pytorch"


def pt_layer(name: str, *sources: str, shard, **kw: Any) -> Row:
    """A PyTorch-backend layer parameter: `model.layers.{i}.<name>`, {i} the global layer."""
    return Row(f"{HF_LAYER}.{name}", sources, shard, "layer", **kw)


# TensorRT-LLM's PyTorch backend (modeling_llama.py, modeling_qwen.py, modeling_qwen3.py; docs/format.md): fused
# qkv_proj [q_r; k_r; v_r] with whole KV heads duplicated when tp > KV heads, fused gate_up_proj [gate_r; up_r],
# row-parallel o_proj / down_proj whose 1-D bias stays whole, a vocab-parallel embedding and lm_head padded with
# zero rows, a tied lm_head that is the embedding's parameter (held again by the last stage at pp > 1), and a
# stage that is not the last keeping the next layer's input_layernorm (DecoderModel.__pp_init__).
ATTN = "self_attn"
PYTORCH_ROWS = (
    Row("model.embed_tokens.weight", ("model.embed_tokens.weight",), VOCAB, "first"),
    pt_layer("input_layernorm.weight", f"{HF_LAYER}.input_layernorm.weight", shard=REPLICATED),
    pt_layer(f"{ATTN}.qkv_proj.weight", *(f"{HF_LAYER}.{ATTN}.{p}_proj.weight" for p in "qkv"), shard=QKV_SPEC),
    pt_layer(f"{ATTN}.qkv_proj.bias", *(f"{HF_LAYER}.{ATTN}.{p}_proj.bias" for p in "qkv"), shard=QKV_SPEC,
             when="qkv_bias"),
    pt_layer(f"{ATTN}.q_norm.weight", f"{HF_LAYER}.{ATTN}.q_norm.weight", shard=REPLICATED, when="qk_norm"),
    pt_layer(f"{ATTN}.k_norm.weight", f"{HF_LAYER}.{ATTN}.k_norm.weight", shard=REPLICATED, when="qk_norm"),
    pt_layer(f"{ATTN}.o_proj.weight", f"{HF_LAYER}.{ATTN}.o_proj.weight", shard=CeilSplit(1)),
    pt_layer(f"{ATTN}.o_proj.bias", f"{HF_LAYER}.{ATTN}.o_proj.bias", shard=CeilSplit(1), when="dense_bias"),
    pt_layer("post_attention_layernorm.weight", f"{HF_LAYER}.post_attention_layernorm.weight", shard=REPLICATED),
    pt_layer("mlp.gate_up_proj.weight", *(f"{HF_LAYER}.mlp.{p}_proj.weight" for p in ("gate", "up")),
             shard=FusedColumn(2)),
    pt_layer("mlp.gate_up_proj.bias", *(f"{HF_LAYER}.mlp.{p}_proj.bias" for p in ("gate", "up")),
             shard=FusedColumn(2), when="mlp_bias"),
    pt_layer("mlp.down_proj.weight", f"{HF_LAYER}.mlp.down_proj.weight", shard=CeilSplit(1)),
    pt_layer("mlp.down_proj.bias", f"{HF_LAYER}.mlp.down_proj.bias", shard=CeilSplit(1), when="mlp_bias"),
    Row("model.norm.weight", ("model.norm.weight",), REPLICATED, "last"),
    Row("lm_head.weight", ("lm_head.weight",), VOCAB, "last", when="!tie_word_embeddings"),
    Row("model.embed_tokens.weight", ("model.embed_tokens.weight",), VOCAB, "last",
        when="tie_word_embeddings & pipeline"),
)
PYTORCH_TARGETS = {PYTORCH: TargetRows(PYTORCH_ROWS, next_stage=(f"{HF_LAYER}.input_layernorm.weight",))}

SKIPS = (
    Skip(r"\.rotary_emb\.inv_freq$", "rotary frequencies are recomputed by the runtime from rotary_base"),
    TIED_LM_HEAD,
)


def source_shapes(d: DecoderDims) -> dict[str, Shape]:
    """Shape of every source tensor a Llama-family checkpoint may hold."""
    q, kv, h, i = d.num_heads * d.head_dim, d.num_kv_heads * d.head_dim, d.hidden_size, d.intermediate_size
    attn, mlp = f"{HF_LAYER}.self_attn", f"{HF_LAYER}.mlp"
    return {
        "model.embed_tokens.weight": (d.vocab_size, h),
        f"{HF_LAYER}.input_layernorm.weight": (h,),
        f"{attn}.q_proj.weight": (q, h),
        f"{attn}.k_proj.weight": (kv, h),
        f"{attn}.v_proj.weight": (kv, h),
        f"{attn}.q_proj.bias": (q,),
        f"{attn}.k_proj.bias": (kv,),
        f"{attn}.v_proj.bias": (kv,),
        f"{attn}.q_norm.weight": (d.head_dim,),
        f"{attn}.k_norm.weight": (d.head_dim,),
        f"{attn}.o_proj.weight": (h, q),
        f"{attn}.o_proj.bias": (h,),
        f"{HF_LAYER}.post_attention_layernorm.weight": (h,),
        f"{mlp}.gate_proj.weight": (i, h),
        f"{mlp}.gate_proj.bias": (i,),
        f"{mlp}.up_proj.weight": (i, h),
        f"{mlp}.up_proj.bias": (i,),
        f"{mlp}.down_proj.weight": (h, i),
        f"{mlp}.down_proj.bias": (h,),
        "model.norm.weight": (h,),
        "lm_head.weight": (d.vocab_size, h),
    }


def rope(hf: Any) -> tuple[float, dict | None]:
    """(rotary_base, rotary_scaling) from an HF config of transformers 4 (rope_theta, rope_scaling) or 5 (rope_parameters)."""
    params = dict(getattr(hf, "rope_parameters", None) or getattr(hf, "rope_scaling", None) or {})
    base = float(params.pop("rope_theta", getattr(hf, "rope_theta", 10000.0)))
    if params.get("rope_type", params.get("type", "default")) == "default":
        return base, None
    return base, params


def dims_from_hf(hf: Any, *, qkv_bias: bool | None = None, dense_bias: bool | None = None,
                 mlp_bias: bool | None = None, qk_norm: bool = False) -> DecoderDims:
    """Model dimensions of a Llama-family HF config; a card pins the switches its family's code hard-wires."""
    heads = hf.num_attention_heads
    attention_bias = bool(getattr(hf, "attention_bias", False))
    return DecoderDims(
        vocab_size=hf.vocab_size,
        hidden_size=hf.hidden_size,
        num_layers=hf.num_hidden_layers,
        num_heads=heads,
        num_kv_heads=getattr(hf, "num_key_value_heads", None) or heads,
        head_dim=getattr(hf, "head_dim", None) or hf.hidden_size // heads,
        intermediate_size=hf.intermediate_size,
        qkv_bias=attention_bias if qkv_bias is None else qkv_bias,
        dense_bias=attention_bias if dense_bias is None else dense_bias,
        mlp_bias=bool(getattr(hf, "mlp_bias", False)) if mlp_bias is None else mlp_bias,
        qk_norm=qk_norm,
        tie_word_embeddings=bool(getattr(hf, "tie_word_embeddings", False)),
    )


def trt_fields(hf: Any, d: DecoderDims) -> dict:
    """The decoder's fields of TensorRT-LLM's config.json (LLaMAConfig.from_hugging_face)."""
    base, scaling = rope(hf)
    return {
        "vocab_size": d.vocab_size,
        "hidden_size": d.hidden_size,
        "num_hidden_layers": d.num_layers,
        "num_attention_heads": d.num_heads,
        "num_key_value_heads": d.num_kv_heads,
        "head_size": d.head_dim,
        "intermediate_size": d.intermediate_size,
        "tie_word_embeddings": d.tie_word_embeddings,
        "hidden_act": hf.hidden_act,
        "norm_epsilon": float(hf.rms_norm_eps),
        "position_embedding_type": "rope_gpt_neox",
        "max_position_embeddings": hf.max_position_embeddings,
        "rotary_base": base,
        "rotary_scaling": scaling,
        "rotary_embedding_dim": d.head_dim,
        "attn_bias": d.qkv_bias,
        "mlp_bias": d.mlp_bias,
        "qk_layernorm": d.qk_norm,
        "residual_mlp": False,
    }


def dims_from_trt(cfg: dict, *, dense_bias: bool | None = None) -> DecoderDims:
    """Model dimensions recorded in a TensorRT-LLM config.json."""
    return DecoderDims(
        vocab_size=cfg["vocab_size"],
        hidden_size=cfg["hidden_size"],
        num_layers=cfg["num_hidden_layers"],
        num_heads=cfg["num_attention_heads"],
        num_kv_heads=cfg["num_key_value_heads"],
        head_dim=cfg["head_size"],
        intermediate_size=cfg["intermediate_size"],
        qkv_bias=bool(cfg.get("attn_bias", False)),
        dense_bias=bool(cfg.get("attn_bias", False)) if dense_bias is None else dense_bias,
        mlp_bias=bool(cfg.get("mlp_bias", False)),
        qk_norm=bool(cfg.get("qk_layernorm", False)),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
    )


def hf_config(cfg: dict, model_type: str) -> dict:
    """An HF config.json for a Llama-family TensorRT-LLM config (the reassembler's output)."""
    scaling = cfg.get("rotary_scaling")
    base = float(cfg["rotary_base"])
    rope_parameters = {**(scaling or {"rope_type": "default"}), "rope_theta": base}
    return {
        "architectures": [cfg["architecture"]],
        "model_type": model_type,
        "vocab_size": cfg["vocab_size"],
        "hidden_size": cfg["hidden_size"],
        "intermediate_size": cfg["intermediate_size"],
        "num_hidden_layers": cfg["num_hidden_layers"],
        "num_attention_heads": cfg["num_attention_heads"],
        "num_key_value_heads": cfg["num_key_value_heads"],
        "head_dim": cfg["head_size"],
        "hidden_act": cfg["hidden_act"],
        "max_position_embeddings": cfg["max_position_embeddings"],
        "rms_norm_eps": cfg["norm_epsilon"],
        # transformers 5 reads rope_parameters; transformers 4 reads rope_theta and rope_scaling.
        "rope_parameters": rope_parameters,
        "rope_theta": base,
        "rope_scaling": scaling,
        "attention_bias": bool(cfg.get("attn_bias", False)),
        "mlp_bias": bool(cfg.get("mlp_bias", False)),
        "tie_word_embeddings": bool(cfg.get("tie_word_embeddings", False)),
        "dtype": cfg["dtype"],
        "torch_dtype": cfg["dtype"],
    }


# LlamaConfig's (transformers 5) types and defaults of the fields the translation reads; relatives revise them.
# rope_scaling and rope_theta are the transformers 4 spellings that `rope_parameters` folds into rope_parameters.
HF_FIELDS: Mapping[str, HFField] = {
    "vocab_size": size(32000),
    "hidden_size": size(4096),
    "intermediate_size": size(11008),
    "num_hidden_layers": size(32),
    "num_attention_heads": size(32),
    "num_key_value_heads": size(None, optional=True),
    "head_dim": size(None, optional=True),
    "hidden_act": word("silu"),
    "max_position_embeddings": size(2048),
    "rms_norm_eps": number(1e-6),
    "tie_word_embeddings": flag(False),
    "attention_bias": flag(False),
    "mlp_bias": flag(False),
    "rope_parameters": table(),
    "rope_scaling": table(),
    "rope_theta": real(10000.0),  # the config class's default_theta
}
HF_READ = frozenset(HF_FIELDS)

# The keys transformers requires of each rope type's parameters (RotaryEmbeddingConfigMixin._validate_*, 5.x); a
# scaled type also gets the pretraining length, from max_position_embeddings when the parameters leave it out.
ROPE_REQUIRED = {
    "default": (),
    "linear": ("factor",),
    "dynamic": ("factor",),
    "yarn": ("factor", "original_max_position_embeddings"),
    "longrope": ("short_factor", "long_factor", "original_max_position_embeddings"),
    "llama3": ("factor", "original_max_position_embeddings", "low_freq_factor", "high_freq_factor", "rope_theta"),
}
SCALED_ROPE = ("llama3", "yarn", "longrope")


def rope_parameters(values: Mapping[str, Any], original: int | None = None) -> dict:
    """The rope parameters as transformers 5 standardizes them (`convert_rope_params_to_dict`,
    `standardize_rope_params`): the rope_scaling spelling over rope_parameters, rope_theta folded in, rope_type from
    the legacy `type`, a scaled rope's pretraining length `original` (a config class that has the field) else the
    parameters' own else max_position_embeddings."""
    params = dict(values["rope_scaling"] or values["rope_parameters"] or {})
    params.setdefault("rope_theta", values["rope_theta"])
    params.setdefault("rope_type", params.get("type", "default"))
    if params["rope_type"] in SCALED_ROPE:
        if original is not None:
            params["original_max_position_embeddings"] = original
        params.setdefault("original_max_position_embeddings", values["max_position_embeddings"])
    return params


def check_rope(params: Mapping[str, Any], head_dim: int) -> None:
    """ShardproofError where transformers' rope validation raises: a rope type missing a key it requires, a fully
    rotated odd head_dim above 4."""
    kind = params["rope_type"]
    word("default").check("rope_parameters.rope_type", kind)
    real(None).check("rope_parameters.rope_theta", params["rope_theta"])
    missing = [key for key in ROPE_REQUIRED.get(kind, ()) if key not in params]
    if missing:
        raise ShardproofError(f"rope_parameters: rope_type {kind!r} needs {', '.join(missing)}")
    partial = params.get("partial_rotary_factor", 1.0)
    if head_dim > 4 and head_dim % 2 and isinstance(partial, (int, float)) and int(head_dim * partial) == head_dim:
        raise ShardproofError(f"head_dim={head_dim}: rope needs an even rotary dimension")


def standard_decoder(values: dict[str, Any]) -> dict[str, Any]:
    """A Llama-family config as transformers' config class holds it: rope standardized (`rope_scaling` its alias)."""
    params = rope_parameters(values)
    check_rope(params, values["head_dim"] or values["hidden_size"] // values["num_attention_heads"])
    return {**values, "rope_parameters": params, "rope_scaling": params}


def standard_llama(values: dict[str, Any]) -> dict[str, Any]:
    """LlamaConfig's: the decoder's, and its `validate_architecture` (hidden_size a multiple of the heads, whatever
    head_dim says)."""
    if values["hidden_size"] % values["num_attention_heads"]:
        raise ShardproofError(f"the hidden size (hidden_size={values['hidden_size']}) is not a multiple of "
                              f"num_attention_heads={values['num_attention_heads']}")
    return standard_decoder(values)


HF_IGNORED = {
    "pretraining_tp": "transformers slices the same matrix products into pretraining_tp parts: the same math",
}
SLIDING_WINDOW_IGNORED = {
    name: "sliding-window attention is a runtime setting (max_attention_window_size), not part of a TensorRT-LLM "
    "checkpoint; verify notes it when the checked sequences are longer than the window"
    for name in ("sliding_window", "use_sliding_window", "max_window_layers", "layer_types")
}


def model_strategy() -> Any:
    """Config overrides for the property tests: GQA ratios, head_dim != hidden/heads, odd vocab, ties, biases."""
    from hypothesis import strategies as st

    @st.composite
    def draw(draw: Callable) -> dict:
        kv = draw(st.sampled_from([1, 2, 4]))
        heads = kv * draw(st.sampled_from([1, 2, 4]))
        return dict(
            num_attention_heads=heads,
            num_key_value_heads=kv,
            head_dim=draw(st.sampled_from([4, 6, 8])),
            hidden_size=heads * draw(st.integers(1, 5)),  # transformers requires a multiple of heads
            intermediate_size=8 * draw(st.integers(2, 6)),
            num_hidden_layers=draw(st.integers(1, 4)),
            vocab_size=draw(st.integers(17, 131)),
            tie_word_embeddings=draw(st.booleans()),
        )

    return draw()


def with_switches(strategy: Callable[[], Any], **switches: bool) -> Callable[[], Any]:
    """`strategy` with boolean config switches (e.g. attention_bias) drawn too."""

    def build() -> Any:
        from hypothesis import strategies as st

        return st.tuples(strategy(), st.fixed_dictionaries({k: st.booleans() for k in switches})).map(
            lambda pair: {**pair[0], **pair[1]}
        )

    return build


# A large rope_theta (as Llama 3) in every self-test model, so that a config that drops it is wrong at long positions.
SELFTEST = {"rope_parameters": {"rope_type": "default", "rope_theta": 500000.0}}


def decoder_card(
    name: str,
    model_type: str,
    config_class: str,
    *,
    forward: str = "llama",
    rows: tuple[Row, ...] = ROWS,
    dims_from_hf: Callable[[Any], DecoderDims] = dims_from_hf,
    dims_from_trt: Callable[[dict], DecoderDims] = dims_from_trt,
    extra_trt: Mapping[str, Any] | None = None,
    extra_hf: Mapping[str, Any] | None = None,
    hf_fields: Mapping[str, HFField] = HF_FIELDS,
    standardize: Callable[[dict[str, Any]], dict[str, Any]] = standard_decoder,
    hf_ignored: Mapping[str, str] = HF_IGNORED,
    strategy: Callable[[], Any] = model_strategy,
    selftest: Mapping[str, Any] | None = None,
    norm_center: float = 1.0,
    layout: Callable[[Any, Dims], Any] | None = None,
    targets: Mapping[str, TargetRows] = PYTORCH_TARGETS,
) -> Card:
    """A Llama-family card: the shared rows, shapes and config translation, with the family's differences."""
    extra = dict(layout=layout) if layout else {}
    return Card(
        name=name,
        model_type=model_type,
        forward=forward,
        rows=rows,
        skips=SKIPS,
        source_shapes=source_shapes,
        config=ConfigMap(
            dims_from_hf=dims_from_hf,
            trt_fields=lambda hf, d: {**trt_fields(hf, d), **(extra_trt or {})},
            dims_from_trt=dims_from_trt,
            hf_config=lambda cfg: {**hf_config(cfg, model_type), **(extra_hf or {})},
            hf_fields=hf_fields,
            standardize=standardize,
            hf_ignored=hf_ignored,
        ),
        tests=TestSupport(config_class=config_class, strategy=strategy, selftest={**SELFTEST, **(selftest or {})},
                          norm_center=norm_center),
        targets=targets,
        **extra,
    )


LLAMA = register(decoder_card(
    "LlamaForCausalLM", "llama", "LlamaConfig",
    standardize=standard_llama,
    strategy=with_switches(model_strategy, attention_bias=True, mlp_bias=True),
    selftest=dict(attention_bias=True, mlp_bias=True),  # biases everywhere, so that every bias mutant applies
))
