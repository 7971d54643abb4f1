"""What float16 and bfloat16 cost HF's own forward, and how far they move the reference's top-2 gap.

    python bench/own_cost_table.py --trained            # the fetched SmolLM2 (bench/fetch_smollm2.py)
    python bench/own_cost_table.py --tiny               # every card's self-test model, seeds 0 and 1
    python bench/own_cost_table.py --random 512x64      # a random Llama: hidden 512, 64 layers, vocab 32000

Each row is `verify.dtype_cost.own_cost` (HF float32 vs HF loaded in the dtype, on BatchOptions' tokens) with
the near-tie numbers, plus the change of the float32 top-2 gap in units of u x std(logits) (its quantiles, and
the largest gap that flipped): the measurements docs/verification.md sets NOISE_MULTIPLE from.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from shardproof.converter.card import get_card, supported_architectures
from shardproof.converter.dtypes import TORCH_DTYPES
from shardproof.verify.dtype_cost import own_cost
from shardproof.verify.forward import BatchOptions, model_logits
from shardproof.verify.metrics import unit_roundoff
from shardproof.verify.tiny_models import build_tiny_model

QUANTILES = (0.5, 0.99, 0.999)


def gap_noise(reference: torch.Tensor, candidate: torch.Tensor, dtype: str) -> str:
    """Quantiles and max of |change of the reference's top-2 gap| / (u x std), and the largest gap that flipped."""
    vocab = reference.shape[-1]
    ref, cand = reference.reshape(-1, vocab).double(), candidate.reshape(-1, vocab).double()
    unit = unit_roundoff(dtype) * ref.std(dim=-1, correction=0)
    top = ref.topk(2, dim=-1)
    gap = top.values[:, 0] - top.values[:, 1]
    moved = (cand.gather(1, top.indices).diff(dim=1)[:, 0].neg() - gap).abs() / unit
    flipped = cand.argmax(dim=-1) != top.indices[:, 0]
    q = torch.quantile(moved, torch.tensor(QUANTILES, dtype=torch.double)).tolist()
    largest = float((gap / unit)[flipped].max()) if flipped.any() else 0.0
    return " | ".join(f"{v:.3g}" for v in [*q, float(moved.max()), largest])


def rows(name: str, model: Path, batch: BatchOptions) -> None:
    vocab = vocab_size(model)
    ids, device = batch.input_ids(vocab), batch.torch_device
    reference = model_logits(model, torch.float32, device, ids)
    for dtype in ("float16", "bfloat16"):
        m = own_cost(model, dtype, ids, device, reference=reference).metrics
        candidate = model_logits(model, TORCH_DTYPES[dtype], device, ids)
        print(f"| {name} | {dtype} | {m.kl_mean:.3g} | {m.kl_max:.3g} | {m.cosine_min:.6g} | {m.top1_agreement:.4f} | "
              f"{m.decisive_top1_agreement:.4f} | {m.near_ties}/{m.positions} | {gap_noise(reference, candidate, dtype)} |",
              flush=True)


def vocab_size(model: Path) -> int:
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(model).vocab_size


def random_llama(directory: Path, hidden: int, layers: int) -> Path:
    """A Llama with transformers' init (std 0.02) and norms 1 + N(0, 0.1): bench/gpu_verify.py's builder, seed 0."""
    from gpu_verify import build_model  # this folder is on sys.path when the script runs

    sizes = dict(hidden_size=hidden, num_hidden_layers=layers, intermediate_size=3 * hidden,
                 num_attention_heads=hidden // 64, num_key_value_heads=max(1, hidden // 256), head_dim=64,
                 vocab_size=32000)
    build_model(directory, sizes, torch.device("cpu"), seed=0)
    return directory


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--trained", action="store_true", help="the model bench/fetch_smollm2.py fetches")
    which.add_argument("--tiny", action="store_true", help="every card's self-test model, seeds 0 and 1")
    which.add_argument("--random", metavar="HIDDENxLAYERS", help="a random Llama of that width and depth")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--num-sequences", type=int, default=BatchOptions.num_sequences)
    parser.add_argument("--seq-len", type=int, default=BatchOptions.seq_len)
    args = parser.parse_args()
    batch = BatchOptions(device=args.device, num_sequences=args.num_sequences, seq_len=args.seq_len)
    print("| model | dtype | KL mean | KL max | cosine min | top-1 | decisive top-1 | near-ties | "
          "Δgap/(u·std) p50 | p99 | p99.9 | max | largest flipped gap |")
    print("|---" * 13 + "|")
    with tempfile.TemporaryDirectory() as tmp:
        if args.trained:
            from fetch_smollm2 import cache_dir, is_complete

            if not is_complete(cache_dir()):
                raise SystemExit(f"{cache_dir()}: no fetched model; run bench/fetch_smollm2.py first")
            rows("SmolLM2-135M-Instruct", cache_dir(), batch)
        elif args.tiny:
            for architecture in supported_architectures():
                for seed in (0, 1):
                    model = build_tiny_model(Path(tmp) / f"{architecture}-{seed}", architecture, seed=seed,
                                             **get_card(architecture).tests.selftest)
                    rows(f"{architecture} seed {seed}", model, batch)
        else:
            hidden, layers = map(int, args.random.split("x"))
            rows(f"random Llama h{hidden} L{layers}", random_llama(Path(tmp) / "llama", hidden, layers), batch)


if __name__ == "__main__":
    main()
