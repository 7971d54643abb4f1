"""Run the self-test over every registered card and print docs/selftest.md's results table and margins.

    python bench/selftest_table.py [--device cpu] [--target trtllm-pytorch] [--report selftest.json]
        [--model DIR --tp N]

Every row comes from one `run_selftest` call: the clean conversion of each card's self-test model in each layout
the catalog needs, laid out in `--target` (default: the TensorRT-LLM checkpoint; another target covers the cards
that support it, with the mutants that apply to it), then every mutant injected into it (not applicable where the
card has nothing of its kind).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from shardproof.converter.plan import DEFAULT_TARGET
from shardproof.converter.source import open_source
from shardproof.verify.forward import BatchOptions
from shardproof.verify.mutations import catalog_for
from shardproof.verify.selftest import Outcome, margins_line, reassembled_evidence, run_selftest, sharded_located


def _precision(outcome: Outcome) -> str:
    precision = outcome.sharded.comparison("precision")
    if precision is None:
        return "–"
    m = precision.metrics
    return f"{m.kl_mean:.2g} / {m.top1_agreement:.3f} / {m.cosine_min:.5g}"


def _conversion(outcome: Outcome) -> str:
    if outcome.sharded.structural:
        return "structural"
    conversion = outcome.sharded.comparison("conversion")
    if conversion is None:
        return "–"
    return f"{conversion.checks['stage_relative_error'].value:.2g} / {conversion.relative_error:.2g}"


def rows(report) -> list[str]:
    lines = ["| checkpoint | setup | conversion rel. error: worst stage / logits | precision: KL mean / top-1 / cos min | sharded | names | reassembled |",
             "|---|---|---|---|---|---|---|"]
    for o in [*report.clean, *report.mutants]:
        name = o.mutant.name if o.mutant else "clean"
        sharded = ("pass" if o.sharded.passed else "FAIL") if o.mutant is None else ("caught" if not o.sharded.passed else "MISSED")
        reassembled = "pass" if o.reassembled.passed else f"caught: {reassembled_evidence(o.reassembled)[:60]}"
        lines.append(f"| {name} | {o.setup} | {_conversion(o)} | {_precision(o)} | {sharded} | "
                     f"{sharded_located(o.sharded) or '–'} | {reassembled} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--target", default=DEFAULT_TARGET)
    parser.add_argument("--report", type=Path)
    parser.add_argument("--model", type=Path, help="Inject the catalog into conversions of this model (a trained "
                        "one, say) instead of every card's self-test model.")
    parser.add_argument("--tp", type=int, help="With --model: the tp size of the catalog's split layouts, for a "
                        "model whose heads the catalog's 2 and 4 do not divide.")
    args = parser.parse_args()
    catalog, models = None, None
    if args.model:
        source = open_source(args.model)
        layers = source.hf_config.num_hidden_layers
        catalog = [m.on_model(args.tp, layers) if args.tp else m for m in catalog_for(args.target)]
        models = {source.architecture: args.model}
    start = time.perf_counter()
    report = run_selftest(catalog, batch=BatchOptions(args.device, num_sequences=1), target=args.target,
                          models=models)
    elapsed = time.perf_counter() - start
    print("\n".join(rows(report)))
    print()
    print(f"{len(report.clean)} clean setups, {len(report.mutants)} mutant runs, "
          f"{len(report.not_applicable)} not applicable; passed: {report.passed}; {elapsed:.0f} s")
    print(margins_line(report))
    if args.report:
        args.report.write_text(json.dumps(report.to_json(), indent=2, allow_nan=False) + "\n")


if __name__ == "__main__":
    main()
