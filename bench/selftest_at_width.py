"""The self-test's mutants at a real model's width: every mutant of the catalog that applies, injected into
conversions of a synthetic Llama-shaped model (`bench/convert_bench.py`'s builder, random values, Llama-3's
rope_theta), both modes run on each, on the chosen device. Prints docs/selftest.md's rows, the conversion
comparison's margins both ways and the clean runs' cost margins, and writes the report as JSON.

    python bench/selftest_at_width.py --out /dev/shm/width [--hidden 4096 --intermediate 14336 --layers 4
        --vocab 128256 --heads 32 --kv-heads 8 --source-dtype float32 --device cuda --num-sequences 2 --seq-len 256
        --mutants NAME,NAME]

A mutant's fault sits in a layer (or the embedding, or the head), and the teacher-forced comparison judges each
stage on the reference's own input, so its margin does not depend on depth: a few layers at full width measure it.
Clean margins at full depth come from `bench/verify_memory.py` (docs/verification.md).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from selftest_table import rows  # noqa: E402


def cost_margin(report) -> float | None:
    """The smallest threshold / value over the clean runs' precision checks judged against the model's own cost."""
    margins = [check.threshold / check.value
               for outcome in report.clean if (precision := outcome.sharded.comparison("precision"))
               for check in precision.checks.values() if check.op == "<=" and check.value > 0]
    return min(margins, default=None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="Holds the model (reused if there) and the work.")
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--intermediate", type=int, default=14336)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", dest="kv_heads", type=int, default=8)
    parser.add_argument("--source-dtype", dest="source_dtype", default="float32")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--num-sequences", dest="num_sequences", type=int, default=2)
    parser.add_argument("--seq-len", dest="seq_len", type=int, default=256)
    parser.add_argument("--mutants", help="Comma-separated mutant names (default: every one that applies).")
    args = parser.parse_args()

    from shardproof.verify.forward import BatchOptions
    from shardproof.verify.mutations import CATALOG
    from shardproof.verify.selftest import margins_line, run_selftest

    out = args.out.resolve()
    model = out / f"hf-{args.hidden}x{args.layers}-{args.source_dtype}"
    if not model.exists():
        sizes = dict(hidden=args.hidden, intermediate=args.intermediate, layers=args.layers, vocab=args.vocab,
                     heads=args.heads, kv_heads=args.kv_heads, shards=4, source_dtype=args.source_dtype)
        subprocess.run([sys.executable, str(Path(__file__).resolve().parent / "convert_bench.py"), "--child", "build",
                        str(model), json.dumps(sizes)], check=True)
    catalog = CATALOG
    if args.mutants:
        wanted = args.mutants.split(",")
        catalog = tuple(m for m in CATALOG if m.name in wanted)
        if unknown := set(wanted) - {m.name for m in catalog}:
            parser.error(f"unknown mutant(s): {', '.join(sorted(unknown))}")
    tempfile.tempdir = str(out)  # conversions and mutated copies beside the model (a RAM disk when --out is one)
    start = time.perf_counter()
    report = run_selftest(catalog, models={"LlamaForCausalLM": model},
                          batch=BatchOptions(args.device, num_sequences=args.num_sequences, seq_len=args.seq_len))
    elapsed = time.perf_counter() - start
    print(f"{args.hidden} wide, {args.layers} layers, {args.source_dtype} source, {args.device}, "
          f"{args.num_sequences} x {args.seq_len} tokens\n")
    print("\n".join(rows(report)))
    print()
    print(f"{len(report.clean)} clean setups, {len(report.mutants)} mutant runs, "
          f"{len(report.not_applicable)} not applicable; passed: {report.passed}; {elapsed:.0f} s")
    print(margins_line(report))
    margin = cost_margin(report)
    print(f"clean runs' cost against COST_FACTOR x the model's own: smallest margin "
          f"{'-' if margin is None else f'{margin:.1f}x'}")
    (out / "selftest_at_width.json").write_text(json.dumps(
        {"args": {k: str(v) for k, v in vars(args).items()}, "seconds": elapsed, "cost_margin": margin,
         **report.to_json()}, indent=2, allow_nan=False) + "\n")


if __name__ == "__main__":
    main()
