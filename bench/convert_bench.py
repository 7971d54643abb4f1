"""Conversion speed and peak memory: shardproof's streaming executor against an in-memory baseline.

    python bench/convert_bench.py [--hidden 1024 --layers 8 --vocab 32000 --tp 4 --pp 2 --dtype bfloat16]

The baseline does what TensorRT-LLM's convert_checkpoint.py does: load the whole state dict, build each rank's
dict of tensors in memory, then `safetensors.torch.save_file` it. Both run the same plan (so the outputs are
identical, which the benchmark checks), each in a fresh subprocess so peak RSS (ru_maxrss) is its own.
Results are ratios against the baseline measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def build(directory: Path, hidden: int, layers: int, vocab: int) -> None:
    from tests.helpers import random_checkpoint

    heads = hidden // 64
    random_checkpoint(directory, "LlamaForCausalLM", seed=0, num_attention_heads=heads, num_key_value_heads=max(heads // 4, 1),
                      head_dim=64, hidden_size=hidden, intermediate_size=int(hidden * 2.75) // 64 * 64,
                      num_hidden_layers=layers, vocab_size=vocab)


def run_stream(model: Path, out: Path, tp: int, pp: int, dtype: str) -> None:
    from shardproof.converter.api import convert

    convert(model, out, dtype=dtype, tp_size=tp, pp_size=pp)


def run_baseline(model: Path, out: Path, tp: int, pp: int, dtype: str) -> None:
    import torch
    from safetensors.torch import load_file, save_file

    from shardproof.converter.api import plan_conversion

    plan, _ = plan_conversion(model, dtype=dtype, tp_size=tp, pp_size=pp)
    state = {k: v.to(getattr(torch, dtype)) for k, v in load_file(model / "model.safetensors").items()}
    out.mkdir()
    for rank in plan.ranks:
        weights = {t.name: t.shard.forward([state[s] for s in t.sources], tp, t.tp_rank).contiguous() for t in rank.tensors}
        save_file(weights, out / f"rank{rank.rank}.safetensors")


def _status_mib(field: str) -> float:
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the parent across fork+exec.
    status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
    return int(status[field].split()[0]) / 1024


def child(mode: str, model: Path, out: Path, tp: int, pp: int, dtype: str) -> None:
    import shardproof.converter.api  # noqa: F401  (imports torch and transformers: counted apart from the conversion)
    import transformers  # noqa: F401

    imported = _status_mib("VmRSS")
    start = time.perf_counter()
    (run_stream if mode == "stream" else run_baseline)(model, out, tp, pp, dtype)
    seconds = time.perf_counter() - start
    print(json.dumps({"mode": mode, "seconds": seconds, "peak_rss_mib": _status_mib("VmHWM"), "after_imports_mib": imported}))


def measure(mode: str, model: Path, out: Path, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--child", mode, "--model", str(model), "--out", str(out),
           "--tp", str(args.tp), "--pp", str(args.pp), "--dtype", args.dtype]
    result = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def same_outputs(a: Path, b: Path, world: int) -> bool:
    from safetensors.torch import load_file
    import torch

    for rank in range(world):
        x, y = load_file(a / f"rank{rank}.safetensors"), load_file(b / f"rank{rank}.safetensors")
        if x.keys() != y.keys() or not all(torch.equal(x[k], y[k]) for k in x):
            return False
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--tp", type=int, default=4)
    parser.add_argument("--pp", type=int, default=2)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--child", choices=["stream", "baseline"])
    parser.add_argument("--model", type=Path)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.model, args.out, args.tp, args.pp, args.dtype)
        return
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        build(tmp / "hf", args.hidden, args.layers, args.vocab)
        size_mib = (tmp / "hf" / "model.safetensors").stat().st_size / 2**20
        results = {"stream": [], "baseline": []}
        for i in range(args.repeats):
            for mode in ("baseline", "stream"):
                results[mode].append(measure(mode, tmp / "hf", tmp / f"{mode}{i}", args))
        identical = same_outputs(tmp / "stream0", tmp / "baseline0", args.tp * args.pp)
    best = {mode: min(r["seconds"] for r in rs) for mode, rs in results.items()}
    peak = {mode: max(r["peak_rss_mib"] for r in rs) for mode, rs in results.items()}
    working = {mode: max(r["peak_rss_mib"] - r["after_imports_mib"] for r in rs) for mode, rs in results.items()}
    summary = {
        "source_mib": round(size_mib, 1), "tp": args.tp, "pp": args.pp, "dtype": args.dtype,
        "seconds": {k: round(v, 2) for k, v in best.items()}, "peak_rss_mib": {k: round(v, 1) for k, v in peak.items()},
        "time_ratio_stream_over_baseline": round(best["stream"] / best["baseline"], 3),
        "memory_ratio_stream_over_baseline": round(peak["stream"] / peak["baseline"], 3),
        "peak_above_imports_mib": {k: round(v, 1) for k, v in working.items()},
        "working_memory_ratio_stream_over_baseline": round(working["stream"] / working["baseline"], 3),
        "identical_rank_files": identical,
    }
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
