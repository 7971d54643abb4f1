"""Where the sharded runtime rounds to the checkpoint dtype: TensorRT-LLM's cast points, in one place.

In float32 each function is the op transformers runs in float32 (the conversion check compares the runtime with
HF's float32 forward, which only summation order may separate). In float16 and bfloat16 each follows the
TensorRT-LLM kernel or layer that computes the step (paths in NVIDIA/TensorRT-LLM):

| step | TensorRT-LLM | rounded to the dtype |
|---|---|---|
| matmul (qkv, dense, fc, gate, proj, lm_head, experts) | cuBLAS / gemm plugin (`cpp/tensorrt_llm/plugins/gemmPlugin`): float32 accumulation | once, the product (`linear`) |
| linear bias | `tensorrt_llm/layers/linear.py`: added to the gemm's output; row-parallel: after the all-reduce | the sum, in the dtype |
| RMSNorm | `tensorrt_llm/functional.py: rms_norm`: float32 statistics, x / sqrt(mean(x²) + eps) cast to the dtype, then `* weight` | twice: normalized x, then times weight (`blocks.rms_norm`) |
| LayerNorm | `functional.py: layer_norm`: one normalization layer, statistics and affine together | once (`layer_norm`) |
| rotary | `cpp/tensorrt_llm/kernels/unfusedAttentionKernels` (`applyBiasRopeUpdateKVCache`), `decoderMaskedMultiheadAttention` (`mmha::rotary_embedding_transform`): q/k in float32, float32 cos/sin table | once, the rotated q/k (`rotate`) |
| attention | context FMHA (`cpp/tensorrt_llm/kernels/contextFusedMultiHeadAttention`; bf16 forces float32 accumulation, `mFMHAForceFP32Acc`): Q·Kᵀ and softmax in float32, exp(s - max) rounded for P·V, P·V in float32, divided by the float32 row sum | twice: the probabilities, then the output (`attend`) |
| all-reduce | NCCL / custom all-reduce plugin: each rank's partial (rounded by its gemm) summed in the dtype | each partial sum (`collectives`) |
| residual add, activation (silu, gelu) × gate, embedding scale | elementwise layers in the dtype | each op |
| MoE | `cpp/tensorrt_llm/kernels/mixtureOfExperts` (`finalizeMoeRoutingKernel`): router in float32, top-k expert outputs times their weights summed in float32 | once, the sum (`blocks.moe`) |
| logits | lm_head gemm in the dtype, cast to `logits_dtype` float32 | once, by the gemm |

Differences left (ulp-level): TensorRT fuses some elementwise chains (silu is one torch op here), FMHA's running
max over key blocks, and float16 FMHA may accumulate P·V in float16 unless built with `context_fmha_fp32_acc`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

QUERY_BLOCK = 1024  # queries per block in `attend`, which holds [B, heads, block, T] float32 scores


def reduced(x: Tensor) -> bool:
    """Whether ``x`` is in a reduced-precision dtype, computed with TensorRT-LLM's cast points."""
    return x.dtype != torch.float32


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``x @ weight.T (+ bias)``: float32 accumulation rounded once, the bias added in the dtype."""
    if not reduced(x):
        return F.linear(x, weight, bias)
    out = F.linear(x.float(), weight.float()).to(x.dtype)
    return out if bias is None else out + bias


def layer_norm(x: Tensor, weight: Tensor, bias: Tensor, eps: float) -> Tensor:
    """LayerNorm with its affine, computed in float32 and rounded once."""
    return F.layer_norm(x.float(), x.shape[-1:], weight.float(), bias.float(), eps).to(x.dtype)


def rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """GPT-NeoX ("rotate half") rotary embedding of x [B, heads, T, head_size] with float32 ``cos``/``sin``,
    computed in float32 and rounded once."""
    xf = x.float()
    x1, x2 = xf.chunk(2, dim=-1)
    return (xf * cos + torch.cat([-x2, x1], dim=-1) * sin).to(x.dtype)


def attend(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Causal softmax(q kᵀ / sqrt(d)) v for [B, heads, T, d] (k, v already repeated to q's heads)."""
    if not reduced(q):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    T, scale = q.shape[-2], q.shape[-1] ** -0.5
    kf, vf = k.float(), v.float()
    blocks = []
    for start in range(0, T, QUERY_BLOCK):
        stop = min(start + QUERY_BLOCK, T)
        scores = torch.matmul(q[..., start:stop, :].float(), kf.transpose(-1, -2)) * scale
        future = torch.ones(stop - start, T, dtype=torch.bool, device=q.device).triu(start + 1)
        scores = scores.masked_fill(future, float("-inf"))
        p = torch.exp(scores - scores.amax(dim=-1, keepdim=True))
        out = torch.matmul(p.to(q.dtype).float(), vf) / p.sum(dim=-1, keepdim=True)
        blocks.append(out.to(q.dtype))
    return torch.cat(blocks, dim=-2)
