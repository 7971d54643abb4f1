"""The `shardproof` command line: convert, reassemble, inspect (and the verification verbs).

Options are spelled as TensorRT-LLM's convert_checkpoint.py spells them (`--model_dir`), dash forms accepted.
Exit codes: 0 success or pass; 1 a check failed; 2 bad input or usage (one line naming the file or option);
3 (verify, check) nothing failed but a requested check could not run (the report says which and why).
"""

from __future__ import annotations

import contextlib
import functools
from pathlib import Path
from typing import Callable, Iterator, NoReturn, Optional

import typer
from rich.console import Console
from rich.progress import (BarColumn, DownloadColumn, Progress, TextColumn, TimeElapsedColumn,
                           TransferSpeedColumn)
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from shardproof.converter.errors import ShardproofError

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT, EXIT_NOT_RUN = 0, 1, 2, 3
EXIT_CODES = ("Exit codes: 0 pass; 1 a check failed; 2 bad input or usage; 3 (verify, check) nothing failed but a "
              "requested check could not run.")

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help=f"Convert HF checkpoints to TensorRT-LLM and prove them exact. {EXIT_CODES}")
console = Console()
err_console = Console(stderr=True)


def _option(*names: str, **kwargs) -> typer.models.OptionInfo:
    """An option under TensorRT-LLM's underscore spelling and its dash form."""
    spellings = []
    for name in names:
        spellings += [name, name.replace("_", "-")] if "_" in name else [name]
    return typer.Option(None, *dict.fromkeys(spellings), **kwargs)


def _target_option() -> typer.models.OptionInfo:
    """`--target`, one of the registered targets (converter/target.py); checked when used (exit 2 otherwise).
    Plugins may register targets, so the names are not listed here: importing the CLI loads no plugin."""
    from shardproof.converter.plan import DEFAULT_TARGET

    return typer.Option(DEFAULT_TARGET, "--target", help="Rank-file layout (`shardproof list` shows every registered target).")


def fails_cleanly(command: Callable) -> Callable:
    """Turn ShardproofError (and any filesystem error) into one line on stderr and exit code 2, with no traceback."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except ShardproofError as e:
            _error(str(e))
        except OSError as e:  # a filesystem error no reader anticipated still names the file, in one line
            _error(f"{e.filename if e.filename is not None else 'input'}: {e.strerror or e}")

    return wrapper


def pickle_consent(command: Callable) -> Callable:
    """Run the command with pickle checkpoints readable when its `allow_pickle` option is set (`--allow-pickle`)."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        from shardproof.converter.formats.torch_pickle import pickle_allowed

        with pickle_allowed(bool(kwargs.get("allow_pickle"))):
            return command(*args, **kwargs)

    return wrapper


def _error(message: str) -> NoReturn:
    one_line = message.replace("\r", "\\r").replace("\n", "\\n")
    err_console.print(Text.assemble(("error:", "bold red"), " ", one_line), highlight=False, soft_wrap=True)
    raise typer.Exit(EXIT_BAD_INPUT)


@contextlib.contextmanager
def bytes_progress_bar(description: str, total: int | None, quiet: bool = False) -> Iterator[Callable[[str, int], None]]:
    """A rich progress bar of bytes and bytes/s (on stderr, shown only on a terminal and not `quiet`), advanced by
    each tensor's bytes; `total` None when the bytes to come are not known (verification reads the model in
    several passes): the bar then counts up."""
    columns = (TextColumn("{task.description}"), BarColumn(), DownloadColumn(binary_units=True),
               TransferSpeedColumn(), TimeElapsedColumn())
    shown = err_console.is_terminal and not quiet
    with Progress(*columns, console=err_console, transient=True, disable=not shown) as progress:
        task = progress.add_task(description, total=total)
        yield lambda name, nbytes: progress.update(task, advance=nbytes)


def _human_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    raise AssertionError


def _layers(layers: range) -> str:
    return f"{layers.start}-{layers.stop - 1}" if len(layers) else "-"


def plan_table(plan, title: str) -> Table:
    """Per rank: stage, layers, tensors and bytes of a plan."""
    table = Table(title=title)
    for column in ("rank", "tp_rank", "pp_rank", "layers", "tensors", "bytes"):
        table.add_column(column, justify="right" if column != "layers" else "center")
    for rank in plan.ranks:
        table.add_row(
            str(rank.rank), str(rank.tp_rank), str(rank.pp_rank), _layers(rank.layers),
            str(len(rank.tensors)), _human_bytes(rank.nbytes),
        )
    return table


MOE_TP_HELP = "Experts: tensor-parallel size of each expert (moe_tp_size * moe_ep_size = tp_size; default tp_size)."
MOE_EP_HELP = "Experts: expert-parallel size, each rank holding num_experts / moe_ep_size experts (default 1)."
WORKERS_HELP = ("Threads reading, casting, sharding and writing at once (default: the number of usable cores); "
                "the output's bytes do not depend on it.")
ALLOW_NONFINITE_HELP = "Convert NaN/Inf in the source, and values the dtype overflows (as inf), instead of refusing them."
ALLOW_PICKLE_HELP = ("Read PyTorch pickle weights (pytorch_model.bin, *.pth) with torch.load(weights_only=True, mmap=True); "
                     "without it such a source is refused.")
CLAMP_HELP = "Saturate values beyond the dtype's range (float16: ±65504) to its finite max instead of refusing them."


@app.command()
@fails_cleanly
@pickle_consent
def convert(
    model_dir: Path = _option("--model_dir", help="HF model directory (config.json + safetensors)."),
    output_dir: Optional[Path] = _option("--output_dir", help="Where to write the TensorRT-LLM checkpoint."),
    dtype: str = typer.Option("auto", "--dtype", help="auto, float32, float16 or bfloat16 (auto: the source's, float32 -> float16)."),
    tp_size: int = typer.Option(1, "--tp_size", "--tp-size", help="Tensor-parallel size."),
    pp_size: int = typer.Option(1, "--pp_size", "--pp-size", help="Pipeline-parallel size."),
    use_parallel_embedding: bool = typer.Option(False, "--use_parallel_embedding", "--use-parallel-embedding", help="Shard the embedding over TP ranks."),
    embedding_sharding_dim: int = typer.Option(0, "--embedding_sharding_dim", "--embedding-sharding-dim", help="0: shard vocab rows (padded); 1: shard hidden columns."),
    moe_tp_size: Optional[int] = typer.Option(None, "--moe_tp_size", "--moe-tp-size", help=MOE_TP_HELP),
    moe_ep_size: Optional[int] = typer.Option(None, "--moe_ep_size", "--moe-ep-size", help=MOE_EP_HELP),
    dry_run: bool = typer.Option(False, "--dry-run", "--dry_run", help="Print the plan from headers alone; read and write no tensor data."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing non-empty output directory."),
    workers: Optional[int] = typer.Option(None, "--workers", help=WORKERS_HELP),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
    allow_nonfinite: bool = typer.Option(False, "--allow-nonfinite", "--allow_nonfinite", help=ALLOW_NONFINITE_HELP),
    clamp: bool = typer.Option(False, "--clamp", help=CLAMP_HELP),
    target: str = _target_option(),
    allow_pickle: bool = typer.Option(False, "--allow-pickle", "--allow_pickle", help=ALLOW_PICKLE_HELP),
) -> None:
    """Convert an HF checkpoint into a TensorRT-LLM checkpoint (or another target's rank files)."""
    from shardproof.converter.api import convert as run_convert, plan_conversion
    from shardproof.converter.target import get_target

    if model_dir is None:
        raise ShardproofError("--model_dir is required")
    args = dict(dtype=dtype, tp_size=tp_size, pp_size=pp_size, use_parallel_embedding=use_parallel_embedding, embedding_sharding_dim=embedding_sharding_dim,
                moe_tp_size=moe_tp_size, moe_ep_size=moe_ep_size, target=get_target(target).name)
    plan, source = plan_conversion(model_dir, **args)
    console.print(f"read {model_dir} as {source.format_name} ({len(source.files)} file(s))", markup=False, highlight=False,
                  soft_wrap=True)
    console.print(plan_table(plan, f"{plan.card.name} -> {plan.layout.dtype}, tp={tp_size} pp={pp_size}"))
    if plan.skipped:
        console.print(f"skipped {len(plan.skipped)} source tensor(s): " + "; ".join(sorted(set(plan.skipped.values()))), markup=False)
    if plan.ignored_fields:
        console.print(f"ignored {len(plan.ignored_fields)} config.json field(s) that do not change the model: "
                      + ", ".join(sorted(plan.ignored_fields)), markup=False)
    if dry_run:
        return
    if output_dir is None:
        raise ShardproofError("--output_dir is required (or pass --dry-run)")
    with bytes_progress_bar("converting", sum(r.nbytes for r in plan.ranks), quiet) as advance:
        run_convert(model_dir, output_dir, overwrite=overwrite, progress=advance, workers=workers,
                    allow_nonfinite=allow_nonfinite, clamp=clamp, note=_note, **args)
    metadata = "config.json" if get_target(target).trt_config else "their rank{N}.json"
    console.print(f"wrote {plan.layout.mapping.world_size} rank file(s) and {metadata} to {output_dir}", markup=False)


@app.command()
@fails_cleanly
def reassemble(
    checkpoint_dir: Path = typer.Argument(..., help="TensorRT-LLM checkpoint directory."),
    output_dir: Path = typer.Argument(..., help="Where to write the rebuilt HF checkpoint."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing non-empty output directory."),
    target: str = _target_option(),
    model_dir: Optional[Path] = _option("--model_dir", help="The source HF model, for rank files whose metadata holds no HF config (a dump)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
) -> None:
    """Rebuild the HF checkpoint from the rank files alone, checking replicas, padding and completeness."""
    from shardproof.converter.reassemble import reassemble as run_reassemble
    from shardproof.converter.target_checkpoint import open_checkpoint

    integrity = _check_manifest(checkpoint_dir)
    total = sum(r.nbytes for r in open_checkpoint(checkpoint_dir, target, model_dir).plan.ranks)
    with bytes_progress_bar("reassembling", total, quiet) as advance:
        result = run_reassemble(checkpoint_dir, output_dir, overwrite=overwrite, progress=advance, target=target,
                                model_dir=model_dir)
    _print_violations(result.violations)
    if result.output_dir is not None:
        console.print(f"wrote the HF checkpoint to {result.output_dir}", markup=False)
    console.print(integrity, markup=False)
    raise typer.Exit(EXIT_OK if result.ok else EXIT_FAILED)


def _check_manifest(checkpoint_dir: Path) -> str:
    """Check the checkpoint's files against its integrity manifest before anything reads them: exit 1 naming
    each file that differs; else the line saying what was checked (or that there is no manifest)."""
    from shardproof.converter.checkpoint import Violation
    from shardproof.converter.manifest import check_manifest

    integrity = check_manifest(checkpoint_dir)
    if not integrity.passed:
        _print_violations([Violation(None, name, problem) for name, problem in integrity.problems.items()])
        raise typer.Exit(EXIT_FAILED)
    return integrity.summary()


def _print_violations(violations: list) -> None:
    """Print each violation (rank, tensor, problem), or nothing when there are none."""
    from shardproof.verify.report_view import violations_table

    if violations:
        console.print(violations_table(violations))


@app.command()
@fails_cleanly
def inspect(checkpoint_dir: Path = typer.Argument(..., help="TensorRT-LLM checkpoint directory.")) -> None:
    """Print ranks, stages, tensors and bytes of a checkpoint, from its headers."""
    from shardproof.converter.checkpoint import TRTCheckpoint

    integrity = _check_manifest(checkpoint_dir)
    ckpt = TRTCheckpoint(checkpoint_dir)
    cfg, mapping = ckpt.config, ckpt.mapping
    table = Table(title=escape(f"{cfg['architecture']} {cfg['dtype']}, tp={mapping.tp_size} pp={mapping.pp_size}, vocab {cfg['vocab_size']}"))
    for column in ("rank", "tp_rank", "pp_rank", "layers", "tensors", "bytes", "file"):
        table.add_column(column, justify="right" if column not in ("layers", "file") else "left")
    for rank in ckpt.plan.ranks:
        headers = ckpt.headers(rank.rank)
        if headers is None:
            table.add_row(str(rank.rank), str(rank.tp_rank), str(rank.pp_rank), _layers(rank.layers), "-", "-", "missing")
            continue
        size = ckpt.rank_path(rank.rank).stat().st_size
        table.add_row(
            str(rank.rank), str(rank.tp_rank), str(rank.pp_rank), _layers(rank.layers),
            str(len(headers)), _human_bytes(size), ckpt.rank_path(rank.rank).name,
        )
    console.print(table)
    console.print(integrity, markup=False)
    violations = ckpt.structural_violations()
    _print_violations(violations)
    raise typer.Exit(EXIT_OK if not violations else EXIT_FAILED)


def _log(message: str) -> None:
    err_console.print(Text(message, style="dim"), highlight=False)


def _note(message: str) -> None:
    err_console.print(Text.assemble(("note:", "yellow"), " ", message), highlight=False, soft_wrap=True)


def _check_report_path(report: Optional[Path], option: str = "--report") -> None:
    """Check up front that an output file can be written, so a long check does not end in a lost report."""
    if report is None:
        return
    if report.is_dir():
        raise ShardproofError(f"{option} {report}: is a directory, not a file")
    if not report.parent.is_dir():
        raise ShardproofError(f"{option} {report}: directory {report.parent} does not exist")


def _write_report(data: dict, report: Optional[Path]) -> None:
    """Write JSON-safe `data` to `report`, when given."""
    import json

    if report is not None:
        report.write_text(json.dumps(data, indent=2, allow_nan=False) + "\n")
        console.print(f"wrote the JSON report to {report}", markup=False)


def _batch_options(device: str, num_sequences: int, seq_len: int, seed: int, mode: str, report: Optional[Path],
                   max_device_memory: Optional[float], limits: tuple[Optional[float], ...]):
    """verify's and check's options, checked before any work: ShardproofError names the first bad one. `limits`:
    --max-kl, --max-kl-max, --min-top1, --min-cosine."""
    from shardproof.verify.forward import BatchOptions
    from shardproof.verify.thresholds import UserLimits
    from shardproof.verify.verification import check_mode

    check_mode(mode)
    _check_report_path(report)
    return BatchOptions(device, num_sequences, seq_len, seed, max_device_memory, UserLimits(*limits))



def _finish(result, report: Optional[Path]) -> None:
    """Print the verification, write its JSON to `report`, and exit 0 (passed), 1 (failed) or 3 (not run)."""
    from shardproof.verify.outcomes import Status
    from shardproof.verify.report_view import render
    from shardproof.verify.serialize import to_json

    render(result, console)
    _write_report(to_json(result), report)
    raise typer.Exit({Status.PASSED: EXIT_OK, Status.FAILED: EXIT_FAILED, Status.NOT_RUN: EXIT_NOT_RUN}[result.status])


DEVICE_HELP = "auto (cuda when available), cpu or cuda: where the models run, one at a time."
SEQUENCES_HELP = "Random token sequences run through every model."
SEQ_LEN_HELP = "Tokens per sequence (long enough that rotary position errors show)."
MAX_KL_HELP = "Fail if the dtype's cost, KL divergence from float32 (mean over positions, nats), exceeds this."
MAX_KL_MAX_HELP = "Fail if the dtype's KL divergence at the worst position exceeds this."
MIN_TOP1_HELP = "Fail if top-1 agreement with float32 on decisive (not near-tie) positions is below this."
MIN_COSINE_HELP = "Fail if the logits' cosine similarity to float32 at the worst position is below this."
MAX_DEVICE_MEMORY_HELP = ("GiB the models may hold on the device (on CUDA the process's share of it; everywhere the "
                          "parameters resident at once); models stream one layer at a time, so a model larger than "
                          "this is verified; a check that needs more does not run (exit 3).")
MODE_HELP = ("reassembled: invert the rank files and compare with the source bit for bit; sharded: run the rank "
             "files as TensorRT-LLM would and compare with the source; both (default).")


@app.command()
@fails_cleanly
@pickle_consent
def verify(
    model_dir: Path = _option("--model_dir", help="The source HF model directory."),
    checkpoint_dir: Path = _option("--checkpoint_dir", help="The TensorRT-LLM checkpoint made from it."),
    device: str = typer.Option("auto", "--device", help=DEVICE_HELP),
    num_sequences: int = typer.Option(4, "--num_sequences", "--num-sequences", help=SEQUENCES_HELP),
    seq_len: int = typer.Option(256, "--seq_len", "--seq-len", help=SEQ_LEN_HELP),
    seed: int = typer.Option(0, "--seed", help="Seed of the random token batches."),
    mode: str = typer.Option("both", "--mode", help=MODE_HELP),
    max_device_memory: Optional[float] = typer.Option(None, "--max_device_memory", "--max-device-memory",
                                                      help=MAX_DEVICE_MEMORY_HELP),
    max_kl: Optional[float] = typer.Option(None, "--max-kl", "--max_kl", help=MAX_KL_HELP),
    max_kl_max: Optional[float] = typer.Option(None, "--max-kl-max", "--max_kl_max", help=MAX_KL_MAX_HELP),
    min_top1: Optional[float] = typer.Option(None, "--min-top1", "--min_top1", help=MIN_TOP1_HELP),
    min_cosine: Optional[float] = typer.Option(None, "--min-cosine", "--min_cosine", help=MIN_COSINE_HELP),
    report: Optional[Path] = typer.Option(None, "--report", help="Write the full report as JSON to this file."),
    target: str = _target_option(),
    allow_pickle: bool = typer.Option(False, "--allow-pickle", "--allow_pickle", help=ALLOW_PICKLE_HELP),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
) -> None:
    """Prove a checkpoint is the model: reassembly, bit-exact weights and logits, sharded run, dtype cost, first divergence.

    Exit codes: 0 every check passed; 1 a check failed; 2 bad input or usage; 3 nothing failed but a requested
    check could not run.
    """
    from shardproof.converter.target import get_target
    from shardproof.verify.verification import verify_checkpoint

    if model_dir is None or checkpoint_dir is None:
        raise ShardproofError("--model_dir and --checkpoint_dir are required")
    batch = _batch_options(device, num_sequences, seq_len, seed, mode, report, max_device_memory,
                           (max_kl, max_kl_max, min_top1, min_cosine))
    with bytes_progress_bar("verifying", None, quiet) as advance:
        result = verify_checkpoint(model_dir, checkpoint_dir, mode, batch, log=_log, target=get_target(target).name,
                                   progress=lambda nbytes: advance("", nbytes))
    _finish(result, report)


@app.command()
@fails_cleanly
@pickle_consent
def check(
    model_dir: Optional[Path] = _option("--model_dir", help="HF model directory (or --demo)."),
    output_dir: Optional[Path] = _option("--output_dir", help="Keep the converted checkpoint here (default: a temporary directory)."),
    demo: bool = typer.Option(False, "--demo", help="Build a tiny random GQA model and check it (no download)."),
    architecture: Optional[str] = typer.Option(None, "--architecture", help="With --demo: the architecture of the demo model (default: the first registered)."),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="auto, float32, float16 or bfloat16 (default auto; float16 with --demo)."),
    tp_size: Optional[int] = typer.Option(None, "--tp_size", "--tp-size", help="Tensor-parallel size (default 1; 4 with --demo)."),
    pp_size: Optional[int] = typer.Option(None, "--pp_size", "--pp-size", help="Pipeline-parallel size (default 1; 2 with --demo)."),
    use_parallel_embedding: bool = typer.Option(False, "--use_parallel_embedding", "--use-parallel-embedding", help="Shard the embedding over TP ranks."),
    embedding_sharding_dim: int = typer.Option(0, "--embedding_sharding_dim", "--embedding-sharding-dim", help="0: shard vocab rows (padded); 1: shard hidden columns."),
    moe_tp_size: Optional[int] = typer.Option(None, "--moe_tp_size", "--moe-tp-size", help=MOE_TP_HELP),
    moe_ep_size: Optional[int] = typer.Option(None, "--moe_ep_size", "--moe-ep-size", help=MOE_EP_HELP),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing non-empty --output_dir."),
    workers: Optional[int] = typer.Option(None, "--workers", help=WORKERS_HELP),
    allow_nonfinite: bool = typer.Option(False, "--allow-nonfinite", "--allow_nonfinite", help=ALLOW_NONFINITE_HELP),
    clamp: bool = typer.Option(False, "--clamp", help=CLAMP_HELP),
    allow_pickle: bool = typer.Option(False, "--allow-pickle", "--allow_pickle", help=ALLOW_PICKLE_HELP),
    device: str = typer.Option("auto", "--device", help=DEVICE_HELP),
    num_sequences: int = typer.Option(4, "--num_sequences", "--num-sequences", help=SEQUENCES_HELP),
    seq_len: int = typer.Option(256, "--seq_len", "--seq-len", help=SEQ_LEN_HELP),
    seed: int = typer.Option(0, "--seed", help="Seed of the random token batches (and of the demo model)."),
    mode: str = typer.Option("both", "--mode", help=MODE_HELP),
    max_device_memory: Optional[float] = typer.Option(None, "--max_device_memory", "--max-device-memory",
                                                      help=MAX_DEVICE_MEMORY_HELP),
    max_kl: Optional[float] = typer.Option(None, "--max-kl", "--max_kl", help=MAX_KL_HELP),
    max_kl_max: Optional[float] = typer.Option(None, "--max-kl-max", "--max_kl_max", help=MAX_KL_MAX_HELP),
    min_top1: Optional[float] = typer.Option(None, "--min-top1", "--min_top1", help=MIN_TOP1_HELP),
    min_cosine: Optional[float] = typer.Option(None, "--min-cosine", "--min_cosine", help=MIN_COSINE_HELP),
    report: Optional[Path] = typer.Option(None, "--report", help="Write the full report as JSON to this file."),
    target: str = _target_option(),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
) -> None:
    """Convert, then verify, in one command: the same report and exit codes (0, 1, 2, 3) as `verify`."""
    import tempfile

    from shardproof.converter.target import get_target

    from shardproof.verify import demo as demo_model
    from shardproof.verify.verification import convert_and_check

    if demo == (model_dir is not None):
        raise ShardproofError("pass either --model_dir or --demo")
    if architecture and not demo:
        raise ShardproofError("--architecture applies to --demo only (a model directory names its own)")
    batch = _batch_options(device, num_sequences, seq_len, seed, mode, report, max_device_memory,
                           (max_kl, max_kl_max, min_top1, min_cosine))
    defaults = demo_model.LAYOUT if demo else dict(dtype="auto", tp_size=1, pp_size=1)
    layout = dict(
        dtype=dtype or defaults["dtype"],
        tp_size=tp_size if tp_size is not None else defaults["tp_size"],
        pp_size=pp_size if pp_size is not None else defaults["pp_size"],
    )
    with tempfile.TemporaryDirectory(prefix="shardproof-demo-") as tmp:
        if demo:
            architecture = architecture or demo_model.default_architecture()
            model_dir = demo_model.build_demo_model(Path(tmp) / "model", architecture, seed)
            console.print(demo_model.describe(model_dir, architecture, **layout), highlight=False)
        with bytes_progress_bar("converting and verifying", None, quiet) as advance:
            result = convert_and_check(
                model_dir, output_dir, mode, batch, overwrite, _log, lambda nbytes: advance("", nbytes), **layout,
                use_parallel_embedding=use_parallel_embedding, embedding_sharding_dim=embedding_sharding_dim,
                moe_tp_size=moe_tp_size, moe_ep_size=moe_ep_size, workers=workers, allow_nonfinite=allow_nonfinite,
                clamp=clamp, target=get_target(target).name,
            )
    _finish(result, report)


@app.command()
@fails_cleanly
def selftest(
    architecture: Optional[list[str]] = typer.Option(None, "--architecture", help="Run on this registered architecture only (repeatable; default: every one)."),
    device: str = typer.Option("auto", "--device", help=DEVICE_HELP),
    num_sequences: int = typer.Option(1, "--num_sequences", "--num-sequences", help=SEQUENCES_HELP),
    seq_len: int = typer.Option(256, "--seq_len", "--seq-len", help=SEQ_LEN_HELP),
    seed: int = typer.Option(0, "--seed", help="Seed of the tiny models and of the random token batches."),
    report: Optional[Path] = typer.Option(None, "--report", help="Write every result as JSON to this file."),
    target: str = _target_option(),
) -> None:
    """Inject known conversion faults into tiny models; exit 1 if the sharded mode misses one or a clean run fails."""
    from shardproof.verify.forward import BatchOptions
    from shardproof.verify.selftest import margins_line, run_selftest, selftest_table

    _check_report_path(report)
    result = run_selftest(architectures=architecture, batch=BatchOptions(device, num_sequences, seq_len, seed), log=_log,
                          target=target)
    console.print(selftest_table(result))
    console.print(margins_line(result), highlight=False)
    _write_report(result.to_json(), report)
    raise typer.Exit(EXIT_OK if result.passed else EXIT_FAILED)


@app.command("list")
@fails_cleanly
def list_(as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table.")) -> None:
    """Every registered architecture, checkpoint format, config loader, weight loader and target, with where it came
    from (built-in, a plugin package, or registered in-process)."""
    import dataclasses
    import json

    from shardproof.converter.catalog import catalog

    components = catalog()
    if as_json:
        typer.echo(json.dumps([dataclasses.asdict(c) for c in components], indent=2))
        return
    table = Table(title="registered components")
    for column in ("kind", "name", "origin", "details"):
        table.add_column(column)
    for c in components:
        table.add_row(c.kind, c.name, c.origin, escape(", ".join(f"{k}: {v}" for k, v in c.details.items())))
    console.print(table)


golden_app = typer.Typer(no_args_is_help=True, help="The golden regression suite: every card's tiny models, converted into "
                         "every target the card supports, "
                         "against the committed manifests (exit 1 on any difference).")
app.add_typer(golden_app, name="golden")
ARCHITECTURE_FILTER = "Only this registered architecture (repeatable; default: every one)."
TARGET_FILTER = ("Only this registered target (repeatable; default: every target each card supports). Without "
                 "--architecture, the cards that support it; an architecture named whose card does not support it "
                 "is bad input.")
MANIFEST_DIR_HELP = ("Manifest directory (default: where each card keeps its manifests: golden/manifests, or a plugin's "
                     "own); a target other than the default keeps its manifests in a subfolder named after it.")


@golden_app.command("check")
@fails_cleanly
def golden_check(
    architecture: Optional[list[str]] = typer.Option(None, "--architecture", help=ARCHITECTURE_FILTER),
    target: Optional[list[str]] = typer.Option(None, "--target", help=TARGET_FILTER),
    manifest_dir: Optional[Path] = _option("--manifest_dir", help=MANIFEST_DIR_HELP),
) -> None:
    """Regenerate, convert and compare every case; exit 1 naming each changed, missing or extra tensor per rank."""
    from shardproof.golden import suite, view

    report = suite.check(architecture, manifest_dir, log=_log, target_names=target)
    view.render(report, console, "shardproof golden check")
    if not report.passed:
        console.print("[bold red]golden check failed[/]: review the change; if it is intended, run "
                      "`shardproof golden update` and commit the manifests")
    raise typer.Exit(EXIT_OK if report.passed else EXIT_FAILED)


@golden_app.command("update")
@fails_cleanly
def golden_update(
    architecture: Optional[list[str]] = typer.Option(None, "--architecture", help=ARCHITECTURE_FILTER),
    target: Optional[list[str]] = typer.Option(None, "--target", help=TARGET_FILTER),
    manifest_dir: Optional[Path] = _option("--manifest_dir", help=MANIFEST_DIR_HELP),
) -> None:
    """Rewrite the manifests of the cases that changed (or have none) and print what changed; exit 1 if a case
    no longer converts."""
    from shardproof.golden import suite, view

    report = suite.update(architecture, manifest_dir, log=_log, target_names=target)
    view.render(report, console, "shardproof golden update (status before the rewrite)")
    written = [suite.manifest_path(r.case, manifest_dir) for r in report.results if r.status in ("changed", "no manifest")]
    console.print(f"rewrote {len(written)} manifest(s)" + "".join(f"\n  {p}" for p in written), highlight=False)
    if report.removed:
        console.print("removed stale manifest(s): " + ", ".join(report.removed), highlight=False)
    errors = [r for r in report.results if r.status == "error"]
    raise typer.Exit(EXIT_FAILED if errors else EXIT_OK)


@app.command()
@fails_cleanly
def gate(
    architectures: Optional[list[str]] = typer.Argument(None, help="HF architecture names (e.g. as in config.json's 'architectures')."),
    all_: bool = typer.Option(False, "--all", help="Every registered architecture."),
    check: Optional[list[str]] = typer.Option(None, "--check", help="Run only this check (repeatable): coverage, properties, golden, verify, selftest."),
    target: Optional[list[str]] = typer.Option(None, "--target", help=(
        "Run the checks in this registered target only (repeatable; default: every target each card supports). "
        "With --all, the cards that support it; an architecture named whose card does not support it is bad input.")),
    summary: Optional[Path] = typer.Option(None, "--summary", help="Also write the Markdown summary to this file (e.g. $GITHUB_STEP_SUMMARY)."),
    junit_xml: Optional[Path] = _option("--junit_xml", help="Write JUnit XML (one testcase per architecture x target x check) to this file."),
) -> None:
    """The CI gate for an architecture: registry coverage, property checks, golden check, verify across layouts,
    mutation self-test, each in every target the card supports (`shardproof list` shows the targets). Exit 0
    only when every check passes; 1 a check failed; 2 bad input, or an architecture no card maps (the unmapped
    parameters of its HF model listed); 3 nothing failed but a check did not run."""
    from shardproof.ci import checks as gate_checks
    from shardproof.ci.coverage import refuse_unregistered
    from shardproof.ci.summary import junit_xml as to_junit, markdown
    from shardproof.converter.card import supported_architectures

    if all_ == bool(architectures):
        raise ShardproofError("pass architecture names or --all (not both)")
    unknown = [c for c in check or [] if c not in gate_checks.CHECKS]
    if unknown:
        raise ShardproofError(f"--check {unknown[0]!r} is not one of {', '.join(gate_checks.CHECKS)}")
    _check_report_path(summary, "--summary")
    _check_report_path(junit_xml, "--junit-xml")
    names = supported_architectures() if all_ else list(dict.fromkeys(architectures))
    refuse_unregistered(names)
    report = gate_checks.run_gate(names, check or list(gate_checks.CHECKS), log=_log, target_names=target,
                                  strict=not all_)
    text = markdown(report)
    console.print(text, markup=False, highlight=False, soft_wrap=True)
    if summary is not None:
        with summary.open("a") as f:  # CI job summaries are appended to
            f.write(text)
    if junit_xml is not None:
        junit_xml.write_text(to_junit(report))
    raise typer.Exit(report.exit_code)
