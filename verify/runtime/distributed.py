"""Truly distributed reference run: one process per rank, real torch.distributed collectives.

    torchrun --nproc_per_node=WORLD -m shardproof.verify.runtime.distributed \\
        --checkpoint_dir CKPT --input IDS.pt --output LOGITS.pt [--backend gloo|nccl]

Each process loads only its own ``rank{N}.safetensors``, all-reduces row-parallel partial sums
over its TP group, all-gathers vocab-parallel logits (and a dim-1 sharded embedding), and
sends hidden states to the next pipeline stage with ``dist.send``/``dist.recv``. TP rank 0 of
the last stage writes the float32 logits. The math is the simulated runner's
(``run_stage`` with the checkpoint's family).
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor

from .blocks import rotary_cos_sin
from .config import DTYPES
from .rank_files import ShardedCheckpoint
from .stage import check_input_ids, run_stage


class TorchDistributedCollectives:
    """Collectives of one TP group through torch.distributed; this process holds one rank."""

    def __init__(self, group: dist.ProcessGroup, tp_size: int) -> None:
        self.group, self.tp_size = group, tp_size

    def all_reduce(self, parts: list[Tensor]) -> list[Tensor]:
        (t,) = parts
        t = t.contiguous()
        if self.tp_size > 1:
            dist.all_reduce(t, op=dist.ReduceOp.SUM, group=self.group)
        return [t]

    def all_gather(self, parts: list[Tensor], dim: int) -> list[Tensor]:
        (t,) = parts
        if self.tp_size == 1:
            return [t]
        out = [torch.empty_like(t) for _ in range(self.tp_size)]
        dist.all_gather(out, t.contiguous(), group=self.group)
        return [torch.cat(out, dim)]


def run_rank(ckpt: ShardedCheckpoint, rank: int, input_ids: Tensor, device: torch.device,
             compute_dtype: torch.dtype | None = None) -> Tensor | None:
    """This process's part of the forward pass (process group already initialized).

    Returns float32 logits on last-stage ranks, None elsewhere.
    """
    cfg = ckpt.config
    tp, pp_rank, dtype = cfg.tp_size, rank // cfg.tp_size, compute_dtype or cfg.dtype
    # every process creates every TP group, in the same order, as new_group requires
    groups = [dist.new_group(list(range(p * tp, (p + 1) * tp))) for p in range(cfg.pp_size)]
    ckpt.validate([rank])
    ids = check_input_ids(input_ids, cfg).to(device)
    B, T = ids.shape
    if pp_rank == 0:
        inputs: Tensor | list[Tensor] = ids
    else:
        x = torch.empty(B, T, cfg.hidden_size, dtype=dtype, device=device)
        dist.recv(x, src=rank - tp)
        inputs = [x]
    comm = TorchDistributedCollectives(groups[pp_rank], tp)
    (out,) = run_stage(ckpt.family, cfg, pp_rank, [ckpt.weights(rank, device, dtype)], inputs, comm,
                       rotary_cos_sin(cfg, T, device))
    if pp_rank == cfg.pp_size - 1:
        return out
    dist.send(out.contiguous(), dst=rank + tp)
    return None


def main(argv: list[str] | None = None) -> None:
    """Entry point for one torchrun worker."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint_dir", required=True)
    ap.add_argument("--input", required=True, help="torch.save'd LongTensor [B, T] of token ids")
    ap.add_argument("--output", required=True, help="where the last stage writes float32 logits")
    ap.add_argument("--backend", choices=("gloo", "nccl"), default="gloo")
    ap.add_argument("--compute_dtype", choices=sorted(DTYPES), default=None)
    ap.add_argument("--timeout_s", type=float, default=300.0, help="collective timeout")
    args = ap.parse_args(argv)

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    ckpt = ShardedCheckpoint(args.checkpoint_dir)
    if world != ckpt.config.world_size:
        raise ValueError(f"{ckpt.path / 'config.json'}: world_size is {ckpt.config.world_size}, "
                         f"launched with {world} processes")
    if args.backend == "nccl":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    input_ids = torch.load(args.input, weights_only=True)
    dist.init_process_group(args.backend, rank=rank, world_size=world,
                            timeout=timedelta(seconds=args.timeout_s))
    try:
        logits = run_rank(ckpt, rank, input_ids, device,
                          DTYPES[args.compute_dtype] if args.compute_dtype else None)
        if logits is not None and rank % ckpt.config.tp_size == 0:
            tmp = f"{args.output}.tmp{rank}"
            torch.save(logits.cpu(), tmp)
            os.replace(tmp, args.output)
    except Exception as e:  # leave the cause where run_distributed can find it, then fail
        Path(f"{args.output}.rank{rank}.error").write_text(f"{type(e).__name__}: {e}")
        raise
    finally:
        dist.destroy_process_group()


def run_distributed(checkpoint_dir: str | Path, input_ids: Tensor, nproc: int | None = None,
                    backend: str = "gloo", compute_dtype: torch.dtype | None = None,
                    timeout_s: float = 300.0) -> Tensor:
    """Launch ``torchrun`` with one process per rank and return float32 logits [B, T, vocab].

    ``nproc`` defaults to the checkpoint's world size (and must equal it). Raises
    ``RuntimeError`` with the workers' output if the launch fails or exceeds ``timeout_s``.
    """
    ckpt = ShardedCheckpoint(checkpoint_dir)
    check_input_ids(input_ids, ckpt.config)
    world = ckpt.config.world_size
    if nproc is not None and nproc != world:
        raise ValueError(f"{ckpt.path / 'config.json'}: world_size is {world}, nproc={nproc}")
    dtype_name = {v: k for k, v in DTYPES.items()}.get(compute_dtype) if compute_dtype else None
    if compute_dtype is not None and dtype_name is None:
        raise ValueError(f"unsupported compute_dtype {compute_dtype}")
    with tempfile.TemporaryDirectory(prefix="shardproof-dist-") as tmp:
        inp, out = Path(tmp) / "input_ids.pt", Path(tmp) / "logits.pt"
        torch.save(input_ids.detach().cpu().long(), inp)
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}",
               "-m", "shardproof.verify.runtime.distributed", "--checkpoint_dir", str(ckpt.path.resolve()),
               "--input", str(inp), "--output", str(out), "--backend", backend,
               "--timeout_s", str(timeout_s)] + (["--compute_dtype", dtype_name] if dtype_name else [])
        env = dict(os.environ)
        env.setdefault("OMP_NUM_THREADS", "1")
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, start_new_session=True)
        try:
            log, _ = proc.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # torchrun and the workers it started
            log, _ = proc.communicate()
            raise RuntimeError(f"torchrun timed out after {timeout_s}s:\n{log[-4000:]}") from None
        if proc.returncode != 0 or not out.is_file():
            errors = "\n".join(f"  {p.name.split('.')[-2]}: {p.read_text()[:1000]}"
                               for p in sorted(Path(tmp).glob("logits.pt.rank*.error")))
            raise RuntimeError(f"torchrun failed (exit {proc.returncode})\n"
                               f"worker errors:\n{errors or '  none recorded'}\noutput tail:\n{log[-3000:]}")
        return torch.load(out, weights_only=True)


if __name__ == "__main__":
    main()
