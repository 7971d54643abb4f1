"""Time `shardproof check` on a random ~1.1B-parameter Llama: build, convert, reassemble, weights, forward, precision.

    python bench/gpu_verify.py                      # TinyLlama shape: 2048 hidden x 22 layers, 32/8 heads, bf16, tp=2 pp=2, cuda
    python bench/gpu_verify.py --small --device cpu # tiny sizes: a smoke test that runs anywhere in seconds

The model is built from a config with transformers' random init (std = initializer_range) and random norm
weights (1 + N(0, 0.1)), saved in float32, converted and verified on the device. The check never holds two
models on the device at once; the peak device memory printed shows it. Prints the equivalence report, the
stage timings as a table and as JSON (also written to --json FILE). Exit code 0 when the check passes, else 1.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from shardproof.verify.verification import MODES, convert_and_check
from shardproof.verify.forward import BatchOptions, resolve_device
from shardproof.verify.report_view import render
from shardproof.verify.serialize import to_json

FULL = dict(
    hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=8,
    vocab_size=32000, max_position_embeddings=4096,
)
SMALL = dict(
    hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
    vocab_size=1001, max_position_embeddings=1024,
)


def build_model(directory: Path, sizes: dict, device: torch.device, seed: int) -> int:
    """Save a random float32 Llama of `sizes` to `directory` (initialized on `device`); returns its parameter count."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(**sizes, architectures=["LlamaForCausalLM"])
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "norm" in name:
                    param.copy_(1.0 + 0.1 * torch.randn_like(param))
    model.save_pretrained(directory)
    count = sum(p.numel() for p in model.parameters())
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return count


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="tiny sizes (a CPU smoke test)")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda (default auto)")
    parser.add_argument("--dtype", default="bfloat16", help="checkpoint dtype (default bfloat16)")
    parser.add_argument("--tp", type=int, default=2, help="tp_size (default 2)")
    parser.add_argument("--pp", type=int, default=2, help="pp_size (default 2)")
    parser.add_argument("--num-sequences", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--mode", choices=MODES, default="both", help="verification mode(s) (default both)")
    parser.add_argument("--workdir", type=Path, default=None, help="where the model and checkpoint go (needs ~9 GB)")
    parser.add_argument("--json", type=Path, default=None, help="also write the timings JSON here")
    parser.add_argument("--max-gpu-gib", type=float, default=None,
                        help="cap this process's GPU memory (e.g. below twice the float32 model) to show the "
                             "check never holds two models at once")
    args = parser.parse_args(argv)

    console = Console()
    device = resolve_device(args.device)
    sizes = SMALL if args.small else FULL
    with tempfile.TemporaryDirectory(prefix="shardproof-bench-", dir=args.workdir) as tmp:
        start = time.perf_counter()
        parameters = build_model(Path(tmp) / "model", sizes, device, args.seed)
        build_s = time.perf_counter() - start
        console.print(f"built a random Llama with {parameters / 1e9:.3f}B parameters on {device} in {build_s:.1f}s")
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            if args.max_gpu_gib:
                total = torch.cuda.get_device_properties(device).total_memory
                torch.cuda.set_per_process_memory_fraction(args.max_gpu_gib * 2**30 / total, device.index or 0)
                console.print(f"GPU memory capped at {args.max_gpu_gib} GiB; the float32 model alone needs "
                              f"{parameters * 4 / 2**30:.1f} GiB")
        report = convert_and_check(
            Path(tmp) / "model", Path(tmp) / "checkpoint", dtype=args.dtype, tp_size=args.tp, pp_size=args.pp,
            mode=args.mode, batch=BatchOptions(str(device), args.num_sequences, args.seq_len, args.seed),
            log=lambda message: console.print(message, style="dim"),
        )
    render(report, console)
    timings = {"build": build_s, **report.timings}
    timings["total"] = sum(timings.values())
    table = Table(title="stage timings")
    table.add_column("stage")
    table.add_column("seconds", justify="right")
    for stage, seconds in timings.items():
        table.add_row(stage, f"{seconds:.2f}")
    console.print(table)
    result = {
        "passed": report.passed,
        "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "peak_gpu_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
        "gpu_memory_cap_gib": args.max_gpu_gib,
        "parameters": parameters,
        "model": sizes,
        "dtype": args.dtype,
        "tp_size": args.tp,
        "pp_size": args.pp,
        "num_sequences": args.num_sequences,
        "seq_len": args.seq_len,
        "timings_s": {k: round(v, 3) for k, v in timings.items()},
        "mode": args.mode,
        "precision": to_json(report.reassembled.precision) if report.reassembled and report.reassembled.precision else None,
        "sharded": to_json(report.sharded) if report.sharded else None,
        "failures": report.failures,
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    return 0 if report.passed else 1


if __name__ == "__main__":
    sys.exit(main())
