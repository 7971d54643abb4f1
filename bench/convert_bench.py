"""Conversion time and peak memory against the floor (start-up, read the source once, write as many bytes) and
against an in-memory baseline, on a synthetic Llama-shaped checkpoint of a chosen size.

    python bench/convert_bench.py --out /tmp/convert-bench [--hidden 2048 --intermediate 5632 --layers 16
        --vocab 32000 --heads 32 --kv-heads 4 --shards 4 --source-dtype bfloat16 --dtype float16
        --layouts tp1,tp2,tp8,pp2 --workers 1,all --repeats 3]

The model (random values, several safetensors shards and an index) is written under --out, then every measured
command runs in a fresh subprocess: its wall time is taken around the process (interpreter start-up included) and
its peak RSS is the process's own ru_maxrss (os.wait4; this parent imports neither torch nor transformers, so what
a child inherits across fork+exec is small). Measured:
- floor: one process that imports torch and transformers, reads every source byte once and writes as many bytes;
- `shardproof convert --quiet --workers N` for each layout, with 1 worker and with the others asked for (`all`:
  every usable core); the rank files must be the same bytes for every worker count (SHA-256);
- `shardproof reassemble --quiet` of each layout's rank files (the manifest checked, the HF tensors rebuilt and
  written: as many bytes read and written as the floor, plus the replicas);
- the in-memory baseline, as TensorRT-LLM's convert_checkpoint.py works: load every tensor, cast, build each rank's
  dict, `save_file` it; its tensors must equal ours.
Prints a Markdown table: wall time, its ratio to the floor, peak RSS, the memory target
(1 GiB + 2 x the largest tensor x workers), and the ratio to the floor less its `import transformers` (convert and
reassemble read the config through the card and import torch only; verify_memory.py's floor keeps transformers,
which verify builds the HF model with). The source stays in the page cache (just written): the numbers are
for a warm cache, the floor's too.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GIB = 1 << 30
CHUNK = 16 << 20


# ---- children (each runs in its own process) ----

def build(model: Path, args: argparse.Namespace) -> None:
    """A Llama checkpoint of random values, `args.shards` files and an index, one shard in memory at a time."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    head_dim = args.hidden // args.heads
    config = LlamaConfig(hidden_size=args.hidden, intermediate_size=args.intermediate, num_hidden_layers=args.layers,
                         num_attention_heads=args.heads, num_key_value_heads=args.kv_heads, vocab_size=args.vocab,
                         head_dim=head_dim, tie_word_embeddings=False, architectures=["LlamaForCausalLM"],
                         rope_parameters={"rope_type": "default", "rope_theta": 500000.0})  # Llama 3's
    config.dtype = args.source_dtype
    model.mkdir(parents=True)
    config.save_pretrained(model)
    kv = args.kv_heads * head_dim
    shapes = {"model.embed_tokens.weight": (args.vocab, args.hidden)}
    for i in range(args.layers):
        p = f"model.layers.{i}."
        shapes |= {p + "input_layernorm.weight": (args.hidden,), p + "post_attention_layernorm.weight": (args.hidden,),
                   p + "self_attn.q_proj.weight": (args.hidden, args.hidden), p + "self_attn.k_proj.weight": (kv, args.hidden),
                   p + "self_attn.v_proj.weight": (kv, args.hidden), p + "self_attn.o_proj.weight": (args.hidden, args.hidden),
                   p + "mlp.gate_proj.weight": (args.intermediate, args.hidden), p + "mlp.up_proj.weight": (args.intermediate, args.hidden),
                   p + "mlp.down_proj.weight": (args.hidden, args.intermediate)}
    shapes |= {"model.norm.weight": (args.hidden,), "lm_head.weight": (args.vocab, args.hidden)}
    names = list(shapes)
    dtype = getattr(torch, args.source_dtype)  # drawn in the source dtype: no float32 copy of an 8B model

    def draw(index: int) -> torch.Tensor:  # a generator per tensor: the same values on any number of threads
        """N(0, 0.02) as Llama initializes its matrices; norm weights around 1 as trained ones are (around 0 they
        scale every layer's input down so far that attention is uniform and a swapped q/k goes unseen)."""
        generator = torch.Generator().manual_seed(index)
        center = 1.0 if names[index].endswith("norm.weight") else 0.0
        return torch.empty(shapes[names[index]], dtype=dtype).normal_(center, 0.02, generator=generator)

    weight_map = {}
    with ThreadPoolExecutor(len(os.sched_getaffinity(0))) as pool:  # normal_ releases the GIL
        for s in range(args.shards):
            part = range(len(names) * s // args.shards, len(names) * (s + 1) // args.shards)
            filename = f"model-{s + 1:05d}-of-{args.shards:05d}.safetensors"
            tensors = dict(zip((names[i] for i in part), pool.map(draw, part)))
            save_file(tensors, model / filename, metadata={"format": "pt"})
            weight_map |= dict.fromkeys(tensors, filename)
    (model / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def floor(model: Path, out: Path) -> None:
    """Start-up with torch and transformers, every source byte read once, as many bytes written."""
    start = time.perf_counter()
    import torch  # noqa: F401

    torch_imported = time.perf_counter()
    import transformers  # noqa: F401

    imported = time.perf_counter()
    buffer, total = bytearray(CHUNK), 0
    for path in sorted(model.glob("*.safetensors")):
        with open(path, "rb", buffering=0) as f:
            while n := f.readinto(buffer):
                total += n
    read = time.perf_counter()
    with open(out / "floor.bin", "wb", buffering=0) as f:
        for offset in range(0, total, CHUNK):
            f.write(memoryview(buffer)[: min(CHUNK, total - offset)])
    written = time.perf_counter()
    print(json.dumps({"startup": imported - start, "transformers_import": imported - torch_imported,
                      "read": read - imported, "write": written - read, "bytes": total}))


def config_load(model: Path) -> None:
    """What reading the model's config with transformers' AutoConfig costs after the floor's start-up (the imports
    that transformers defers until a config class is used, then the parse), which verify pays (its HF-side model is
    transformers'); convert reads the config through the card instead."""
    import torch  # noqa: F401
    import transformers  # noqa: F401

    start = time.perf_counter()
    transformers.AutoConfig.from_pretrained(str(model), local_files_only=True)
    print(json.dumps({"config": time.perf_counter() - start}))


def baseline(model: Path, out: Path, layout: dict, dtype: str) -> None:
    """TensorRT-LLM's way: the whole state dict in memory, each rank's dict built, then saved."""
    from safetensors.torch import load_file, save_file

    from shardproof.converter.api import plan_conversion
    from shardproof.converter.transforms import to_stored

    plan, _ = plan_conversion(model, dtype=dtype, **layout)
    state = {}
    for path in sorted(model.glob("*.safetensors")):
        state |= load_file(path)
    tp = plan.layout.mapping.tp_size
    out.mkdir()
    for rank in plan.ranks:
        weights = {}
        for t in rank.tensors:
            stored = to_stored(t.ops, [state[s] for s in t.sources], t.torch_dtype)
            weights[t.name] = t.shard.forward(stored, tp, t.tp_rank).contiguous()
        save_file(weights, out / f"rank{rank.rank}.safetensors")


def same_tensors(a: Path, b: Path) -> None:
    """Exit 1 unless every rank file of `a` holds the same tensors (names, dtypes, bits) as `b`'s."""
    import torch
    from safetensors.torch import load_file

    for path in sorted(a.glob("rank*.safetensors")):
        x, y = load_file(path), load_file(b / path.name)
        if x.keys() != y.keys() or not all(x[k].dtype == y[k].dtype and torch.equal(x[k], y[k]) for k in x):
            sys.exit(f"{path.name} differs")


# ---- the parent: measures the children ----

def measure(command: list[str]) -> dict:
    """Run `command`: its wall time, its own peak RSS (ru_maxrss from wait4), and its last stdout line if JSON."""
    with tempfile.TemporaryFile("w+") as stdout, tempfile.TemporaryFile("w+") as stderr:
        start = time.perf_counter()
        process = subprocess.Popen(command, stdout=stdout, stderr=stderr, text=True, cwd=ROOT)
        _, status, usage = os.wait4(process.pid, 0)
        seconds = time.perf_counter() - start
        process.returncode = os.waitstatus_to_exitcode(status)
        stdout.seek(0), stderr.seek(0)
        if process.returncode != 0:
            raise SystemExit(f"{' '.join(command)} failed ({process.returncode}):\n{stderr.read()[-3000:]}")
        lines = stdout.read().strip().splitlines()
    extra = json.loads(lines[-1]) if lines and lines[-1].startswith("{") else {}
    return {"seconds": seconds, "peak_rss_mib": usage.ru_maxrss / 1024, **extra}


def child_command(mode: str, *args) -> list[str]:
    return [sys.executable, str(Path(__file__).resolve()), "--child", mode, *map(str, args)]


def layout_args(name: str) -> dict:
    """`tp8` -> tp_size 8; `pp2` -> pp_size 2; `tp2pp2` -> both."""
    import re

    found = dict(re.findall(r"(tp|pp)(\d+)", name))
    if not found or "".join(f"{k}{v}" for k, v in found.items()) != name:
        raise SystemExit(f"--layouts: {name!r} is not like tp2, pp2 or tp2pp2")
    return {f"{k}_size": int(v) for k, v in found.items()}


def digests(directory: Path) -> dict[str, str]:
    out = {}
    for path in sorted(directory.glob("rank*.safetensors")):
        h = hashlib.sha256()
        with open(path, "rb") as f:
            while block := f.read(CHUNK):
                h.update(block)
        out[path.name] = h.hexdigest()
    return out


def largest_tensor_bytes(model: Path) -> int:
    import struct

    largest = 0
    for path in model.glob("*.safetensors"):
        with open(path, "rb") as f:
            header = json.loads(f.read(struct.unpack("<Q", f.read(8))[0]))
        largest = max([largest] + [e["data_offsets"][1] - e["data_offsets"][0] for k, e in header.items() if k != "__metadata__"])
    return largest


def run(args: argparse.Namespace) -> None:
    out = args.out.resolve()
    model = out / "hf"
    if not model.exists():
        print(f"building the model in {model} ...", file=sys.stderr)
        measure(child_command("build", model, *_model_args(args)))
    source_bytes = sum(p.stat().st_size for p in model.glob("*.safetensors"))
    largest = largest_tensor_bytes(model)
    cores = len(os.sched_getaffinity(0))
    worker_counts = list(dict.fromkeys(cores if w == "all" else int(w) for w in args.workers.split(",")))
    rows = []

    floors = [measure(child_command("floor", model, out)) for _ in range(args.repeats)]
    (out / "floor.bin").unlink()
    floor_run = min(floors, key=lambda r: r["seconds"])
    floor_s = floor_run["seconds"]
    rows.append(("floor: start-up + read + write", "-", floor_run["seconds"], max(r["peak_rss_mib"] for r in floors), None))

    identical = True
    for name in args.layouts.split(","):
        layout = layout_args(name)
        flags = [a for k, v in layout.items() for a in (f"--{k}", str(v))]
        kept, runs = None, {w: [] for w in worker_counts}
        for i in range(args.repeats):  # worker counts interleaved, so that a burst of load hits them alike
            for workers in worker_counts:
                target = out / f"{name}-w{workers}-{i}"
                runs[workers].append(measure([sys.executable, "-m", "shardproof", "convert", "--model_dir", str(model),
                                              "--output_dir", str(target), "--dtype", args.dtype, "--quiet",
                                              "--workers", str(workers), *flags]))
                if kept is None:
                    kept, kept_digests = target, digests(target)
                else:
                    identical &= digests(target) == kept_digests
                    _remove(target)
        for workers in worker_counts:
            target_mib = (GIB + 2 * largest * workers) / 2**20
            rows.append((f"convert {name}", str(workers), min(r["seconds"] for r in runs[workers]),
                         max(r["peak_rss_mib"] for r in runs[workers]), target_mib))
        runs = []
        for i in range(args.repeats):
            rebuilt = out / f"{name}-reassembled-{i}"
            runs.append(measure([sys.executable, "-m", "shardproof", "reassemble", str(kept), str(rebuilt), "--quiet"]))
            _remove(rebuilt)
        rows.append((f"reassemble {name}", "1", min(r["seconds"] for r in runs), max(r["peak_rss_mib"] for r in runs), None))
        if args.baseline:
            runs = []
            for i in range(args.repeats):
                target = out / f"{name}-baseline-{i}"
                runs.append(measure(child_command("baseline", model, target, json.dumps(layout), args.dtype)))
                measure(child_command("same", target, kept))
                _remove(target)
            rows.append((f"in-memory baseline {name}", "1", min(r["seconds"] for r in runs), max(r["peak_rss_mib"] for r in runs), None))
        _remove(kept)

    load = os.getloadavg()
    print(f"source: {source_bytes / GIB:.2f} GiB in {args.shards} shards ({args.source_dtype} -> {args.dtype}), "
          f"largest tensor {largest / 2**20:.0f} MiB; {cores} usable cores; load average {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}; "
          f"best of {args.repeats}")
    print(f"floor parts: start-up {floor_run['startup']:.2f} s, read {floor_run['read']:.2f} s, write {floor_run['write']:.2f} s; "
          f"of the start-up, transformers' import {floor_run['transformers_import']:.2f} s, which convert and reassemble "
          f"no longer pay (last column: against the floor without it)")
    print(f"rank files identical for every worker count{' and equal to the baseline' if args.baseline else ''}: "
          f"{'yes' if identical else 'NO'}\n")
    torch_floor_s = floor_s - floor_run["transformers_import"]
    print("| run | workers | wall s | × floor | peak RSS MiB | RSS target MiB | × floor without transformers |")
    print("|---|---|---|---|---|---|---|")
    for label, workers, seconds, rss, target in rows:
        target_text = f"{target:.0f} ({'met' if rss <= target else 'missed'})" if target else "-"
        print(f"| {label} | {workers} | {seconds:.2f} | {seconds / floor_s:.2f} | {rss:.0f} | {target_text} | "
              f"{seconds / torch_floor_s:.2f} |")
    if not identical:
        sys.exit(1)


def _remove(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)


MODEL_ARGS = ("hidden", "intermediate", "layers", "vocab", "heads", "kv_heads", "shards", "source_dtype")


def _model_args(args: argparse.Namespace) -> list[str]:
    return [json.dumps({k: getattr(args, k) for k in MODEL_ARGS})]


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        mode, rest = sys.argv[2], sys.argv[3:]
        if mode == "build":
            build(Path(rest[0]), argparse.Namespace(**json.loads(rest[1])))
        elif mode == "floor":
            floor(Path(rest[0]), Path(rest[1]))
        elif mode == "config":
            config_load(Path(rest[0]))
        elif mode == "baseline":
            baseline(Path(rest[0]), Path(rest[1]), json.loads(rest[2]), rest[3])
        elif mode == "same":
            same_tensors(Path(rest[0]), Path(rest[1]))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="Holds the model (reused if there) and the outputs.")
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--intermediate", type=int, default=5632)
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", dest="kv_heads", type=int, default=4)
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--source-dtype", dest="source_dtype", default="bfloat16")
    parser.add_argument("--dtype", default="float16", help="The converted checkpoint's dtype.")
    parser.add_argument("--layouts", default="tp1,tp2,tp8,pp2")
    parser.add_argument("--workers", default="1,all", help="Worker counts, comma-separated; all = usable cores.")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-baseline", dest="baseline", action="store_false")
    run(parser.parse_args())


if __name__ == "__main__":
    main()
