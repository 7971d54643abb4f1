"""What the checkpoint dtype costs the sharded runtime, next to what it costs HF's own model, on the same tokens.

    python bench/numerics_table.py [--seeds 0 1] [--tp 2] [--seq-len 256] [--num-sequences 4] [--model DIR ...]

For every registered card (its self-test config: every optional feature on) and seed, a tiny random model is
built; each `--model DIR` (a trained one) is measured too. Against HF's float32 forward, for float16 and bfloat16:
HF's own model loaded in the dtype, and the sharded runtime running the converted checkpoint (tp `--tp`) in the
dtype. Prints a Markdown table of KL mean / top-1 agreement / worst-position cosine for both, and the ratio of the
runtime's KL to HF's.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from shardproof.converter.api import convert
from shardproof.converter.card import cards, get_card
from shardproof.converter.source import open_source
from shardproof.verify.forward import model_logits
from shardproof.verify.metrics import LogitMetrics, logit_metrics
from shardproof.verify.runtime.simulated import run_simulated
from shardproof.verify.tiny_models import build_tiny_model

DTYPES = ("float16", "bfloat16")


def _cell(m: LogitMetrics) -> str:
    return f"{m.kl_mean:.2g} / {m.top1_agreement:.3f} / {m.cosine_min:.5f}"


def measure(model_dir: Path, scratch: Path, tp: int, num_sequences: int, seq_len: int, seed: int) -> list[tuple]:
    """(dtype, HF metrics, runtime metrics) for each dtype."""
    vocab = open_source(model_dir).hf_config.vocab_size
    ids = torch.randint(0, vocab, (num_sequences, seq_len), generator=torch.Generator().manual_seed(seed))
    reference = model_logits(model_dir, torch.float32, torch.device("cpu"), ids).float()
    out = []
    for dtype in DTYPES:
        hf = model_logits(model_dir, getattr(torch, dtype), torch.device("cpu"), ids).float()
        ckpt = scratch / f"{model_dir.name}-{dtype}"
        convert(model_dir, ckpt, dtype=dtype, tp_size=tp, overwrite=True)
        with torch.inference_mode():
            runtime = run_simulated(ckpt, ids)
        out.append((dtype, logit_metrics(reference, hf), logit_metrics(reference, runtime)))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--tp", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--num-sequences", type=int, default=4)
    parser.add_argument("--model", type=Path, nargs="*", default=[], help="more model directories (trained models)")
    parser.add_argument("--cards", nargs="*", help="only these architectures")
    args = parser.parse_args()
    torch.manual_seed(0)
    print("| model | dtype | HF's own: KL / top-1 / cos min | runtime: KL / top-1 / cos min | KL runtime / HF |")
    print("|---|---|---|---|---|")
    with tempfile.TemporaryDirectory(prefix="shardproof-numerics-") as tmp:
        scratch = Path(tmp)
        models = []
        for card in cards():
            if args.cards and card.name not in args.cards:
                continue
            for seed in args.seeds:
                directory = scratch / f"{card.name}-seed{seed}"
                build_tiny_model(directory, card.name, seed=seed, **get_card(card.name).tests.selftest)
                models.append((f"{card.name} seed {seed}", directory))
        models += [(str(m), m) for m in args.model]
        for label, directory in models:
            for dtype, hf, rt in measure(directory, scratch, args.tp, args.num_sequences, args.seq_len, 0):
                ratio = rt.kl_mean / hf.kl_mean if hf.kl_mean else float("nan")
                print(f"| {label} | {dtype} | {_cell(hf)} | {_cell(rt)} | {ratio:.2f} |", flush=True)


if __name__ == "__main__":
    main()
