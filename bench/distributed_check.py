"""Run the truly distributed reference runtime (one process per rank) and compare it with the simulated one
and with HF transformers.

On a multi-GPU machine (NCCL):  python bench/distributed_check.py --backend nccl --layouts 2x1 2x2 4x1
On a CPU (gloo, smoke test):     python bench/distributed_check.py --backend gloo --layouts 2x1 1x2

For each layout (tp x pp) and dtype it converts a tiny random model, runs `run_distributed` (NCCL: one GPU per
rank), `run_simulated` on the first device, and HF's float32 forward, and prints a table plus JSON lines:
distributed vs simulated max abs diff (the reduction order of NCCL may differ from the simulated rank-order
sum), and the relative error against HF float32 of the float32 run.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from shardproof.converter.api import convert
from shardproof.verify.runtime.distributed import run_distributed
from shardproof.verify.runtime.simulated import run_simulated
from shardproof.verify.tiny_models import build_tiny_model

MODEL = dict(num_attention_heads=8, num_key_value_heads=2, hidden_size=256, head_dim=32, intermediate_size=512,
             num_hidden_layers=4, vocab_size=1001)


def check(tmp: Path, arch: str, tp: int, pp: int, dtype: str, backend: str, seq_len: int) -> dict:
    hf_dir = tmp / f"hf-{arch}"
    if not hf_dir.exists():
        build_tiny_model(hf_dir, arch, seed=11, **MODEL)
    ckpt = tmp / f"{arch}-{tp}x{pp}-{dtype}"
    convert(hf_dir, ckpt, dtype=dtype, tp_size=tp, pp_size=pp, use_parallel_embedding=tp > 1)
    ids = torch.randint(0, MODEL["vocab_size"], (2, seq_len), generator=torch.Generator().manual_seed(3))
    device = "cuda" if backend == "nccl" else "cpu"
    start = time.perf_counter()
    distributed = run_distributed(ckpt, ids, backend=backend)
    seconds = time.perf_counter() - start
    simulated = run_simulated(ckpt, ids, device=device).cpu()
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        reference = model(ids).logits.float()
    row = {
        "arch": arch, "tp": tp, "pp": pp, "dtype": dtype, "backend": backend, "seq_len": seq_len,
        "dist_vs_sim_max_abs": (distributed - simulated).abs().max().item(),
        "dist_equal_sim": bool(torch.equal(distributed, simulated)),
        "top1_agree_vs_hf": (distributed.argmax(-1) == reference.argmax(-1)).float().mean().item(),
        "rel_err_vs_hf_fp32": ((distributed - reference).abs().max() / reference.abs().max()).item(),
        "distributed_seconds": round(seconds, 2),
    }
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=["nccl", "gloo"], default="nccl")
    parser.add_argument("--layouts", nargs="+", default=["2x1", "2x2", "4x1"], help="tp x pp")
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--archs", nargs="+", default=["LlamaForCausalLM", "Qwen3ForCausalLM"])
    parser.add_argument("--seq-len", type=int, default=256)
    args = parser.parse_args()
    if args.backend == "nccl":
        print(f"GPUs: {torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}, torch {torch.__version__}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for arch in args.archs:
            for layout in args.layouts:
                tp, pp = map(int, layout.split("x"))
                for dtype in args.dtypes:
                    row = check(Path(tmp), arch, tp, pp, dtype, args.backend, args.seq_len)
                    rows.append(row)
                    print(json.dumps(row), flush=True)
    header = f"{'arch':18} {'tp':>2} {'pp':>2} {'dtype':9} {'dist==sim':>9} {'|dist-sim|':>10} {'rel err vs HF fp32':>18} {'top1':>6}"
    print(header)
    for r in rows:
        print(f"{r['arch']:18} {r['tp']:>2} {r['pp']:>2} {r['dtype']:9} {str(r['dist_equal_sim']):>9} "
              f"{r['dist_vs_sim_max_abs']:>10.2e} {r['rel_err_vs_hf_fp32']:>18.2e} {r['top1_agree_vs_hf']:>6.3f}")


if __name__ == "__main__":
    main()
