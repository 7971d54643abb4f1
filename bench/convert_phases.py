"""Where a conversion's time goes: thread-seconds in each phase (summed over the workers) beside the wall time.

    python bench/convert_phases.py MODEL_DIR OUT_DIR --workers 16 --tp_size 8 [--dtype float16]

Phases: the config (transformers' AutoConfig), the streamed row instances (converter/row_stream.py: their block
reads with the source digests, casts and positional writes; the rest of their time is the shards' digests, the
slice copies, the min/max and Python), and for the whole-tensor path: reading source tensors, their digests,
`to_stored` (ops and the cast), the value guard, writing shards (with the copy that makes a slice contiguous), the
shards' digests; and the source fingerprint's remainder. A phase whose thread-seconds approach `workers` × wall is
where the workers wait; one near the wall alone is serial.
"""

from __future__ import annotations

import argparse
import collections
import functools
import shutil
import threading
import time
from pathlib import Path

import shardproof.converter.api as api
import shardproof.converter.execute as execute
import shardproof.converter.formats.hf as hf
import shardproof.converter.planned_file as planned_file
import shardproof.converter.row_stream as row_stream
import shardproof.converter.safetensors_io as safetensors_io
from shardproof.converter.planned_file import PlannedFile
from shardproof.converter.source import Source
from shardproof.converter.value_range import ValueGuard

totals: collections.Counter = collections.Counter()
_lock = threading.Lock()


def timed(name: str, fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            with _lock:
                totals[name] += time.perf_counter() - start
    return wrapper


def timed_blocks(name: str, blocks):
    """`Source.blocks` with the time spent producing each block (a generator's work happens as it is iterated)."""
    @functools.wraps(blocks)
    def wrapper(*args, **kwargs):
        iterator = iter(blocks(*args, **kwargs))
        while True:
            start = time.perf_counter()
            block = next(iterator, None)
            with _lock:
                totals[name] += time.perf_counter() - start
            if block is None:
                return
            yield block
    return wrapper


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--tp_size", type=int, default=1)
    parser.add_argument("--pp_size", type=int, default=1)
    parser.add_argument("--dtype", default="float16")
    args = parser.parse_args()
    hf.auto_config = timed("config (AutoConfig.from_pretrained)", hf.auto_config)
    execute.write_streamed = timed("streamed row instances (all their work)", execute.write_streamed)
    Source.blocks = timed_blocks("  read a block (with its source digest)", Source.blocks)
    row_stream.cast_block = timed("  cast a block", row_stream.cast_block)
    PlannedFile.write_at = timed("  pwrite (both paths)", PlannedFile.write_at)
    Source.load = timed("read (with its digest)", Source.load)
    safetensors_io.part_digest = timed("  digest of a source tensor", safetensors_io.part_digest)
    execute.to_stored = timed("to_stored (ops, cast)", execute.to_stored)
    ValueGuard.stored = timed("value guard", ValueGuard.stored)
    PlannedFile.write = timed("write (contiguous copy, pwrite, digest)", PlannedFile.write)
    planned_file.part_digest = timed("  digest of a shard", planned_file.part_digest)
    api.source_fingerprint = timed("source fingerprint (headers, unread tensors)", api.source_fingerprint)
    shutil.rmtree(args.out_dir, ignore_errors=True)
    start = time.perf_counter()
    api.convert(args.model_dir, args.out_dir, dtype=args.dtype, tp_size=args.tp_size, pp_size=args.pp_size,
                workers=args.workers)
    wall = time.perf_counter() - start
    print(f"wall {wall:.2f} s, {args.workers} workers, tp {args.tp_size} pp {args.pp_size}; thread-seconds per phase:")
    for name, seconds in totals.most_common():
        print(f"  {name:48s} {seconds:8.2f}")
    shutil.rmtree(args.out_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
