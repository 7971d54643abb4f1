"""Verify's peak host memory (and device memory on CUDA) and wall time against the floor, on synthetic
Llama-shaped checkpoints of one width at several depths: the memory must stay flat in depth.

    python bench/verify_memory.py --out /tmp/verify-bench [--hidden 4096 --intermediate 14336 --layers 32,64
        --vocab 128256 --heads 32 --kv-heads 8 --source-dtype bfloat16 --dtype bfloat16 --tp 1
        --modes reassembled,sharded --device auto --num-sequences 4 --seq-len 256 --max-device-memory GIB
        --checkpoints DIR]

For each depth the model (random values, `bench/convert_bench.py`'s builder, 4 shards and an index) and its
conversion (`shardproof convert --tp_size N`) are written under --out once, then every measured command runs in a
fresh subprocess of this parent, which imports neither torch nor transformers (ru_maxrss survives fork and exec):
- floor: start-up (torch and transformers imported) and every byte of the source and the rank files read once;
- apart from the floor, in a process of its own, the source's `AutoConfig.from_pretrained` after the same start-up
  (`config_load`: the imports of transformers' model code that any tool loading the model pays, torchvision's
  included where it is installed); the table gives each run's ratio to the floor and to the floor plus it;
- `verify --mode M` for each mode, in-process in the child (`verify_checkpoint`, the CLI's code path), which
  reports the verdict and, on CUDA, the peak device memory (torch.cuda.max_memory_allocated).
Prints a Markdown table (wall time, its ratio to the floor, peak RSS, the stricter of issue 11's two RSS targets,
4 GiB + 2 x the largest tensor (set at 8B) and 1.5 GiB + 4 x the largest tensor (set for a 1 GB model), peak
device memory) and writes every figure to --out/verify_memory.json. The files stay in the page cache (just
written): warm-cache figures, the floor's too.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from convert_bench import CHUNK, GIB, child_command, largest_tensor_bytes, measure  # noqa: E402


# ---- children (each runs in its own process) ----

def floor(*directories: str) -> None:
    """Start-up with torch and transformers, then every safetensors byte of `directories` read once."""
    import time

    start = time.perf_counter()
    import torch  # noqa: F401
    import transformers  # noqa: F401

    imported = time.perf_counter()
    buffer, total = bytearray(CHUNK), 0
    for directory in directories:
        for path in sorted(Path(directory).glob("*.safetensors")):
            with open(path, "rb", buffering=0) as f:
                while n := f.readinto(buffer):
                    total += n
    print(json.dumps({"startup": imported - start, "read": time.perf_counter() - imported, "bytes": total}))


def verify(model: str, checkpoint: str, mode: str, batch: str) -> None:
    """verify_checkpoint in this process; prints its status and the peak device memory (CUDA)."""
    import torch

    from shardproof.verify.forward import BatchOptions
    from shardproof.verify.verification import verify_checkpoint

    options = BatchOptions(**json.loads(batch))
    result = verify_checkpoint(model, checkpoint, mode, options)
    device = options.torch_device
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    comparisons = result.sharded.comparisons if result.sharded else []
    checks = {c.name: [str(check) for check in c.checks.values()] for c in comparisons}
    if result.reassembled and result.reassembled.precision:
        checks["reassembled precision"] = [str(check) for check in result.reassembled.precision.checks.values()]
    print(json.dumps({"status": result.status.value, "failures": result.failures, "not_run": result.not_run,
                      "peak_device_bytes": peak,
                      "timings_s": result.timings, "checks": checks}))


# ---- the parent ----

def child(mode: str, *args: object) -> list[str]:
    return [sys.executable, str(Path(__file__).resolve()), "--child", mode, *map(str, args)]


def prepare(out: Path, layers: int, args: argparse.Namespace) -> tuple[Path, Path]:
    """The model of `layers` layers under `out` and its conversion under --checkpoints (default `out`), made once."""
    checkpoints = (args.checkpoints or out).resolve()
    checkpoints.mkdir(parents=True, exist_ok=True)
    model, checkpoint = out / f"hf-{layers}", checkpoints / f"trt-{layers}-tp{args.tp}"
    if not model.exists():
        sizes = dict(hidden=args.hidden, intermediate=args.intermediate, layers=layers, vocab=args.vocab,
                     heads=args.heads, kv_heads=args.kv_heads, shards=4, source_dtype=args.source_dtype)
        print(f"building {model} ...", file=sys.stderr)
        subprocess.run([sys.executable, str(Path(__file__).resolve().parent / "convert_bench.py"), "--child", "build",
                        str(model), json.dumps(sizes)], check=True)
    if not checkpoint.exists():
        print(f"converting into {checkpoint} ...", file=sys.stderr)
        subprocess.run([sys.executable, "-m", "shardproof", "convert", "--model_dir", str(model), "--output_dir",
                        str(checkpoint), "--dtype", args.dtype, "--tp_size", str(args.tp), "--quiet"], check=True)
    return model, checkpoint


def run(args: argparse.Namespace) -> None:
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    batch = dict(device=args.device, num_sequences=args.num_sequences, seq_len=args.seq_len,
                 max_device_memory=args.max_device_memory)
    results = []
    for layers in (int(n) for n in args.layers.split(",")):
        model, checkpoint = prepare(out, layers, args)
        source_bytes = sum(p.stat().st_size for p in model.glob("*.safetensors"))
        largest = largest_tensor_bytes(model)
        base = measure(child("floor", model, checkpoint))
        base["config_load"] = measure(child_command("config", model))["config"]
        results.append(dict(layers=layers, run="floor", source_bytes=source_bytes, largest_tensor_bytes=largest, **base))
        for mode in args.modes.split(","):
            figures = measure(child("verify", model, checkpoint, mode, json.dumps(batch)))
            results.append(dict(layers=layers, run=f"verify --mode {mode}", source_bytes=source_bytes,
                                largest_tensor_bytes=largest, floor_seconds=base["seconds"],
                                config_load=base["config_load"], **figures))
            _save(out, args, results)  # after every run: a run cut short keeps what was measured
    _save(out, args, results)
    print(f"hidden {args.hidden}, intermediate {args.intermediate}, vocab {args.vocab}, {args.source_dtype} -> "
          f"{args.dtype}, tp {args.tp}, device {args.device}, {args.num_sequences} x {args.seq_len} tokens"
          + (f", --max-device-memory {args.max_device_memory} GiB" if args.max_device_memory else "") + "\n")
    print("| layers | model GiB | run | status | wall s | × floor | × floor + config | peak RSS GiB | RSS target GiB "
          "| peak device GiB |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        floor_s = r.get("floor_seconds", r["seconds"])
        largest = r["largest_tensor_bytes"]
        target = min(4 * GIB + 2 * largest, 1.5 * GIB + 4 * largest) / GIB
        rss = r["peak_rss_mib"] / 1024
        device = f"{r['peak_device_bytes'] / GIB:.2f}" if r.get("peak_device_bytes") else "-"
        print(f"| {r['layers']} | {r['source_bytes'] / GIB:.2f} | {r['run']} | {r.get('status', '-')} | "
              f"{r['seconds']:.1f} | {r['seconds'] / floor_s:.2f} | {r['seconds'] / (floor_s + r['config_load']):.2f} | "
              f"{rss:.2f} | {target:.2f} "
              f"({'met' if rss <= target else 'missed'}) | {device} |")


def _save(out: Path, args: argparse.Namespace, results: list[dict]) -> None:
    (out / "verify_memory.json").write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                                        "results": results}, indent=2) + "\n")


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        {"floor": floor, "verify": verify}[sys.argv[2]](*sys.argv[3:])
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="Holds the models and checkpoints (reused if there).")
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--intermediate", type=int, default=14336)
    parser.add_argument("--layers", default="32,64", help="Depths, comma-separated.")
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", dest="kv_heads", type=int, default=8)
    parser.add_argument("--source-dtype", dest="source_dtype", default="bfloat16")
    parser.add_argument("--dtype", default="bfloat16", help="The converted checkpoint's dtype.")
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--modes", default="reassembled,sharded")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--num-sequences", dest="num_sequences", type=int, default=4)
    parser.add_argument("--seq-len", dest="seq_len", type=int, default=256)
    parser.add_argument("--max-device-memory", dest="max_device_memory", type=float, default=None)
    parser.add_argument("--checkpoints", type=Path, default=None,
                        help="Where the conversions go (default --out): a disk, when the source and the checkpoint "
                        "together exceed the RAM disk holding --out (80 layers at 8B width: 2 x 34.5 GiB).")
    run(parser.parse_args())


if __name__ == "__main__":
    main()
