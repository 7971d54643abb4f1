"""Hostile inputs of issue 13, each built in a scratch directory and run through the `shardproof` command line.

Shared by tests/test_hostile_inputs.py (which asserts each outcome) and bench/reliability_table.py (which
records them in docs/reliability.md). A builder gets (scratch dir, a clean HF model, its tp=2 checkpoint),
may copy and damage them, and returns the command line plus the inputs that must stay untouched.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from shardproof.converter.manifest import MANIFEST
from shardproof.converter.staging import staging_prefix

REPO = Path(__file__).resolve().parents[1]
SMALL = dict(num_attention_heads=4, num_key_value_heads=2, head_dim=4, hidden_size=16, intermediate_size=16,
             num_hidden_layers=2, vocab_size=19)


@dataclass
class Run:
    """A command line, the inputs it must leave untouched and the output that must not appear on failure."""

    args: list[str]
    inputs: list[Path] = field(default_factory=list)
    output: Path | None = None


@dataclass(frozen=True)
class Case:
    """One hostile input: the issue-13 item it belongs to, what it is, how to build it, what it must get."""

    item: str
    name: str
    build: Callable[[Path, Path, Path], Run]
    exit_code: int = 2
    fragments: tuple[str, ...] = ()


@dataclass
class Outcome:
    """What the command line did with a case."""

    exit_code: int
    stderr_lines: list[str]
    output: str
    inputs_untouched: bool
    leftovers: list[str]

    @property
    def error_lines(self) -> list[str]:
        return [line for line in self.stderr_lines if line.startswith("error:")]

    @property
    def first_line(self) -> str:
        """The error line, else the first line printed."""
        lines = self.error_lines or self.stderr_lines or [line for line in self.output.splitlines() if line.strip()]
        return lines[0].strip() if lines else ""

    @property
    def clean_failure(self) -> bool:
        """One error line, printed last (verify and check log progress before it), no traceback, nothing left."""
        return (len(self.error_lines) == 1 and self.stderr_lines[-1] == self.error_lines[0]
                and "Traceback" not in self.output and self.inputs_untouched and not self.leftovers)


def digest(path: Path) -> str:
    """A digest of every name and byte under `path` (symlinks by target), to prove an input untouched."""
    h = hashlib.sha256()
    for p in sorted(Path(path).rglob("*")) if Path(path).is_dir() else [Path(path)]:
        h.update(str(p).encode())
        if p.is_symlink():
            h.update(os.readlink(p).encode())
        elif p.is_file():
            h.update(p.read_bytes())
    return h.hexdigest()


# --- damage helpers -------------------------------------------------------------------------------------

def copy_model(tmp: Path, model: Path, name: str = "m") -> Path:
    return Path(shutil.copytree(model, tmp / name, symlinks=True))


def copy_checkpoint(tmp: Path, ckpt: Path) -> Path:
    return Path(shutil.copytree(ckpt, tmp / "ckpt"))


def split_file(path: Path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def write_file(path: Path, header: dict | bytes, data: bytes) -> None:
    text = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)


def edit_header(path: Path, edit: Callable[[dict], None], extra: bytes = b"") -> None:
    header, data = split_file(path)
    edit(header)
    write_file(path, header, data + extra)


def first_tensor(header: dict) -> dict:
    """The entry whose data starts at 0."""
    return next(v for k, v in header.items() if k != "__metadata__" and v["data_offsets"][0] == 0)


def second_tensor(header: dict) -> dict:
    end = first_tensor(header)["data_offsets"][1]
    return next(v for k, v in header.items() if k != "__metadata__" and v["data_offsets"][0] == end)


def edit_config(directory: Path, **fields) -> None:
    path = directory / "config.json"
    cfg = json.loads(path.read_text())
    cfg.update(fields)
    path.write_text(json.dumps(cfg))


def convert(model: Path, out: Path, *extra: str) -> Run:
    return Run(["convert", "--model_dir", str(model), "--output_dir", str(out), *extra], [model], out)


def damaged_model(edit: Callable[[Path], None]) -> Callable[[Path, Path, Path], Run]:
    """A builder converting a copy of the model after `edit(model copy)`."""

    def build(tmp: Path, model: Path, ckpt: Path) -> Run:
        m = copy_model(tmp, model)
        edit(m)
        return convert(m, tmp / "out")

    return build


def damaged_weights(edit: Callable[[dict], None], extra: bytes = b"") -> Callable[[Path, Path, Path], Run]:
    return damaged_model(lambda m: edit_header(m / "model.safetensors", edit, extra))


def damaged_checkpoint(edit: Callable[[Path], None], verb: str) -> Callable[[Path, Path, Path], Run]:
    """A builder running `verb` (inspect, reassemble, verify) on a copy of the checkpoint after `edit`."""

    def build(tmp: Path, model: Path, ckpt: Path) -> Run:
        c = copy_checkpoint(tmp, ckpt)
        edit(c)
        if verb == "inspect":
            return Run(["inspect", str(c)], [c])
        if verb == "reassemble":
            return Run(["reassemble", str(c), str(tmp / "back")], [c], tmp / "back")
        return Run(["verify", "--model_dir", str(model), "--checkpoint_dir", str(c), "--num_sequences", "1",
                    "--seq_len", "8", "--device", "cpu", "--mode", verb.split(":")[1] if ":" in verb else "both"], [c, model])

    return build


def sharded(tmp: Path, model: Path, name_map: Callable[[Path, dict], dict]) -> Path:
    """A copy of the model split in two shards with an index whose weight_map `name_map` may rewrite."""
    from safetensors.torch import load_file, save_file

    m = copy_model(tmp, model)
    tensors = load_file(m / "model.safetensors")
    (m / "model.safetensors").unlink()
    names = sorted(tensors)
    weight_map = {}
    for i, part in enumerate((names[::2], names[1::2])):
        file = f"model-{i + 1:05d}-of-00002.safetensors"
        save_file({k: tensors[k] for k in part}, m / file)
        weight_map.update(dict.fromkeys(part, file))
    index = {"metadata": {}, "weight_map": name_map(m, weight_map)}
    (m / "model.safetensors.index.json").write_text(json.dumps(index))
    return m


def moved_shard_outside(tmp: Path, model: Path, how: str) -> Run:
    def name_map(m: Path, weight_map: dict) -> dict:
        outside = tmp / "elsewhere"
        outside.mkdir()
        shutil.move(m / "model-00002-of-00002.safetensors", outside / "stolen.safetensors")
        target = {"absolute": str(outside / "stolen.safetensors"), "dotdot": "../elsewhere/stolen.safetensors",
                  "symlink": "model-00002-of-00002.safetensors"}[how]
        if how == "symlink":
            os.symlink(outside / "stolen.safetensors", m / target)
        return {k: (target if v.startswith("model-00002") else v) for k, v in weight_map.items()}

    m = sharded(tmp, model, name_map)
    return convert(m, tmp / "out")


def index_value(value: object) -> Callable[[Path, Path, Path], Run]:
    def build(tmp: Path, model: Path, ckpt: Path) -> Run:
        m = sharded(tmp, model, lambda m, wm: {**wm, sorted(wm)[0]: value})
        return convert(m, tmp / "out")

    return build


def overwrite_input(where: str) -> Callable[[Path, Path, Path], Run]:
    def build(tmp: Path, model: Path, ckpt: Path) -> Run:
        m = copy_model(tmp / "parent", model)
        out = {"same": m, "parent": m.parent, "inside": m / "out", "via symlink": tmp / "link"}[where]
        if where == "via symlink":
            os.symlink(m, out)
        return Run(convert(m, out, "--overwrite").args, [m])

    return build


def reassemble_over_input(tmp: Path, model: Path, ckpt: Path) -> Run:
    c = copy_checkpoint(tmp, ckpt)
    return Run(["reassemble", str(c), str(c), "--overwrite"], [c])


def check_over_input(tmp: Path, model: Path, ckpt: Path) -> Run:
    m = copy_model(tmp, model)
    return Run(["check", "--model_dir", str(m), "--output_dir", str(m), "--overwrite", "--device", "cpu"], [m])


def output_parent_is_file(verb: str) -> Callable[[Path, Path, Path], Run]:
    def build(tmp: Path, model: Path, ckpt: Path) -> Run:
        (tmp / "file").write_text("x")
        if verb == "reassemble":
            return Run(["reassemble", str(ckpt), str(tmp / "file" / "out")], [ckpt])
        return Run(convert(model, tmp / "file" / "out").args, [model])

    return build


def long_output_name(length: int, verb: str = "convert") -> Callable[[Path, Path, Path], Run]:
    def build(tmp: Path, model: Path, ckpt: Path) -> Run:
        out = tmp / ("o" * length)
        if verb == "reassemble":
            return Run(["reassemble", str(ckpt), str(out)], [ckpt], None if length <= 255 else out)
        return Run(convert(model, out).args, [model], None if length <= 255 else out)

    return build


def output_symlink(tmp: Path, model: Path, ckpt: Path) -> Run:
    (tmp / "real").mkdir()
    os.symlink(tmp / "real", tmp / "link")
    return Run(convert(model, tmp / "link", "--overwrite").args, [model, tmp / "real"])


def markup_path(name: str) -> Callable[[Path, Path, Path], Run]:
    def build(tmp: Path, model: Path, ckpt: Path) -> Run:
        m = copy_model(tmp, model, name)
        (m / "config.json").unlink()
        return convert(m, tmp / "out")

    return build


def directory_instead_of(file: str, verb: str) -> Callable[[Path, Path, Path], Run]:
    def replace(directory: Path) -> None:
        (directory / file).unlink()
        (directory / file).mkdir()

    if verb == "convert":
        return damaged_model(replace)
    return damaged_checkpoint(replace if file == "config.json" else without_manifest(replace), verb)


def config_from(source: str) -> Callable[[Path, Path, Path], Run]:
    def edit(m: Path) -> None:
        (m / "config.json").unlink()
        if source == "/dev/zero":
            os.symlink("/dev/zero", m / "config.json")
        else:  # a sparse file beyond the JSON size limit
            with open(m / "config.json", "wb") as f:
                f.truncate(200 * 1024 * 1024)

    return damaged_model(edit)


def trt_config(**fields) -> Callable[[Path, Path, Path], Run]:
    return damaged_checkpoint(without_manifest(lambda c: edit_config(c, **fields)), "inspect")


def trt_config_without(key: str) -> Callable[[Path, Path, Path], Run]:
    def edit(c: Path) -> None:
        cfg = json.loads((c / "config.json").read_text())
        cfg.pop(key, None)
        (c / "config.json").write_text(json.dumps(cfg))

    return damaged_checkpoint(without_manifest(edit), "inspect")


def set_offsets(begin: object, end: object = None) -> Callable[[dict], None]:
    def edit(header: dict) -> None:
        entry = first_tensor(header)
        entry["data_offsets"] = [begin, entry["data_offsets"][1] if end is None else end]

    return edit


def overlap_second(header: dict) -> None:
    first, second = first_tensor(header), second_tensor(header)
    size = second["data_offsets"][1] - second["data_offsets"][0]
    second["data_offsets"] = [0, size]  # reads the first tensor's bytes (and what follows) as its own


def four_tib(header: dict) -> None:
    entry = max((v for k, v in header.items() if k != "__metadata__"), key=lambda v: v["data_offsets"][0])  # the last
    entry["shape"] = [1024, 1024, 1024, 1024]
    entry["dtype"] = "F32"
    entry["data_offsets"] = [entry["data_offsets"][0], entry["data_offsets"][0] + 4 * 1024**4]


def raw_header(text: bytes, claimed: int | None = None) -> Callable[[Path, Path, Path], Run]:
    def edit(m: Path) -> None:
        length = len(text) if claimed is None else claimed
        (m / "model.safetensors").write_bytes(struct.pack("<Q", length) + text)

    return damaged_model(edit)


def source_for_sharded_verify(edit: Callable[[Path], None]) -> Callable[[Path, Path, Path], Run]:
    """`verify --mode sharded` (which never reassembles) of the checkpoint against a damaged copy of the model."""

    def build(tmp: Path, model: Path, ckpt: Path) -> Run:
        m = copy_model(tmp, model)
        edit(m)
        return Run(["verify", "--model_dir", str(m), "--checkpoint_dir", str(ckpt), "--mode", "sharded", "--device", "cpu",
                    "--num_sequences", "1", "--seq_len", "8"], [m, ckpt])

    return build


def without_manifest(edit: Callable[[Path], None]) -> Callable[[Path], None]:
    """`edit` on a checkpoint written by another tool (no manifest), so the reader behind the manifest judges it."""

    def edit_copy(c: Path) -> None:
        (c / MANIFEST).unlink()
        edit(c)

    return edit_copy


def rank_trailing_bytes(verb: str) -> Callable[[Path, Path, Path], Run]:
    return damaged_checkpoint(without_manifest(lambda c: c.joinpath("rank1.safetensors").open("ab").write(b"\0" * 64)), verb)


def rank_bytes(verb: str, damage: str) -> Callable[[Path, Path, Path], Run]:
    """rank1.safetensors with its last byte flipped ("corrupt") or its last 64 bytes cut ("truncate"), manifest kept."""

    def edit(c: Path) -> None:
        raw = bytearray((c / "rank1.safetensors").read_bytes())
        if damage == "corrupt":
            raw[-1] ^= 0x40
        else:
            del raw[-64:]
        (c / "rank1.safetensors").write_bytes(bytes(raw))

    return damaged_checkpoint(edit, verb)


def source_values(*values: float) -> Callable[[Path], None]:
    """The model's first tensor (by name) starting with `values`."""

    def edit(m: Path) -> None:
        from safetensors.torch import load_file, save_file
        import torch

        tensors = load_file(m / "model.safetensors")
        first = tensors[sorted(tensors)[0]]
        first.view(-1)[: len(values)] = torch.tensor(values)
        save_file(tensors, m / "model.safetensors", metadata={"format": "pt"})

    return edit


def converted_with(edit: Callable[[Path], None], *flags: str) -> Callable[[Path, Path, Path], Run]:
    def build(tmp: Path, model: Path, ckpt: Path) -> Run:
        m = copy_model(tmp, model)
        edit(m)
        return convert(m, tmp / "out", *flags)

    return build


def verify_other_source(tmp: Path, model: Path, ckpt: Path) -> Run:
    m = copy_model(tmp, model)
    (m / "config.json").write_text(json.dumps(json.loads((m / "config.json").read_text()), indent=4))  # re-saved
    return Run(["verify", "--model_dir", str(m), "--checkpoint_dir", str(ckpt), "--device", "cpu", "--num_sequences", "1",
                "--seq_len", "8"], [m, ckpt])


CASES: list[Case] = [
    # 1. --overwrite must never delete an input
    Case("1 overwrite", "convert --output_dir = --model_dir --overwrite", overwrite_input("same"), fragments=("overlap",)),
    Case("1 overwrite", "convert --output_dir = parent of --model_dir --overwrite", overwrite_input("parent"), fragments=("overlap",)),
    Case("1 overwrite", "convert --output_dir inside --model_dir --overwrite", overwrite_input("inside"), fragments=("overlap",)),
    Case("1 overwrite", "convert --output_dir = symlink to --model_dir --overwrite", overwrite_input("via symlink"), fragments=("overlap",)),
    Case("1 overwrite", "reassemble CKPT CKPT --overwrite", reassemble_over_input, fragments=("overlap",)),
    Case("1 overwrite", "check --output_dir = --model_dir --overwrite", check_over_input, fragments=("overlap",)),
    # 2. headers validated as safetensors validates them
    Case("2 offsets", "negative data_offsets", damaged_weights(set_offsets(-8)), fragments=("data_offsets",)),
    Case("2 offsets", "far-negative data_offsets (-2**70)", damaged_weights(set_offsets(-(2**70))), fragments=("data_offsets",)),
    Case("2 offsets", "second tensor's offsets overlap the first", damaged_weights(overlap_second), fragments=("data_offsets",)),
    Case("2 offsets", "gap between tensors", damaged_weights(set_offsets(8)), fragments=("expected to start at 0",)),
    Case("2 offsets", "size differs from shape x dtype", damaged_weights(set_offsets(0, 3)), fragments=("need",)),
    Case("2 offsets", "64 trailing bytes after the data (convert)", damaged_weights(lambda h: None, b"\0" * 64), fragments=("the file holds",)),
    Case("2 offsets", "64 trailing bytes in a rank file (inspect)", rank_trailing_bytes("inspect"), fragments=("rank1.safetensors",)),
    Case("2 offsets", "64 trailing bytes in a rank file (reassemble)", rank_trailing_bytes("reassemble"), fragments=("rank1.safetensors",)),
    Case("2 offsets", "64 trailing bytes in a rank file (verify)", rank_trailing_bytes("verify"), fragments=("rank1.safetensors",)),
    Case("2 offsets", "64 trailing bytes in the source (verify --mode sharded)",
         source_for_sharded_verify(lambda m: m.joinpath("model.safetensors").open("ab").write(b"\0" * 64)), fragments=("model.safetensors",)),
    Case("2 offsets", "header length beyond the file", raw_header(b'{"a":1}', claimed=1000), fragments=("exceeds",)),
    Case("2 offsets", "header not UTF-8", raw_header(b'{"\xff":1}'), fragments=("UTF-8",)),
    Case("2 offsets", "unknown dtype", damaged_weights(lambda h: first_tensor(h).update(dtype="F128")), fragments=("dtype",)),
    Case("2 offsets", "three data_offsets", damaged_weights(lambda h: first_tensor(h)["data_offsets"].append(0)), fragments=("data_offsets",)),
    Case("2 offsets", "__metadata__ values not strings", damaged_weights(lambda h: h.update(__metadata__={"format": 1})), fragments=("__metadata__",)),
    # 3. shards from outside the model directory
    Case("3 index", "index names a shard by absolute path", lambda t, m, c: moved_shard_outside(t, m, "absolute"), fragments=("outside",)),
    Case("3 index", "index names a shard by ../", lambda t, m, c: moved_shard_outside(t, m, "dotdot"), fragments=("outside",)),
    Case("3 index", "shard is a symlink out of the model directory", lambda t, m, c: moved_shard_outside(t, m, "symlink"), fragments=("outside",)),
    Case("3 index", "weight_map value is a number", index_value(3), fragments=("weight_map",)),
    Case("3 index", "weight_map value is a list", index_value(["a.safetensors"]), fragments=("weight_map",)),
    Case("3 index", "weight_map value is null", index_value(None), fragments=("weight_map",)),
    # 4. outputs and staging
    Case("4 output", "output name of 250 characters", long_output_name(250), exit_code=0),
    Case("4 output", "output name of 300 characters (convert)", long_output_name(300), fragments=("File name too long",)),
    Case("4 output", "output name of 300 characters (reassemble)", long_output_name(300, "reassemble"), fragments=("File name too long",)),
    Case("4 output", "output directory is a symlink", output_symlink, fragments=("symbolic link",)),
    Case("4 output", "output parent is a file (convert)", output_parent_is_file("convert"), fragments=("is not a directory",)),
    Case("4 output", "output parent is a file (reassemble)", output_parent_is_file("reassemble"), fragments=("is not a directory",)),
    # 5. paths are text, not markup
    Case("5 markup", "model directory named 'm[/]x'", markup_path("m[/]x"), fragments=("m[/]x",)),
    Case("5 markup", "model directory named 'm[red]x'", markup_path("m[red]x"), fragments=("m[red]x",)),
    # 6. bounded reads
    Case("6 bounds", "header claims a 4 TiB tensor in a small file", damaged_weights(four_tib), fragments=("tensors cover 43980465",)),
    Case("6 bounds", "header length 2**63", raw_header(b"{}", claimed=2**63), fragments=("implausible",)),
    Case("6 bounds", "config.json is /dev/zero", config_from("/dev/zero"), fragments=("not a regular file",)),
    Case("6 bounds", "source config.json is /dev/zero (verify --mode sharded)",
         source_for_sharded_verify(lambda m: (m / "config.json").unlink() or os.symlink("/dev/zero", m / "config.json")),
         fragments=("not a regular file",)),
    Case("6 bounds", "config.json is 200 MiB", config_from("sparse"), fragments=("bytes",)),
    # 7. malformed inputs, one line each
    Case("7 malformed", "data_offsets missing", damaged_weights(lambda h: first_tensor(h).pop("data_offsets")), fragments=("data_offsets",)),
    Case("7 malformed", "data_offsets are strings", damaged_weights(set_offsets("0", "4")), fragments=("data_offsets",)),
    Case("7 malformed", "shape holds floats", damaged_weights(lambda h: first_tensor(h).update(shape=[2.0, 8.0])), fragments=("shape",)),
    Case("7 malformed", "shape holds NaN", raw_header(b'{"a":{"dtype":"F32","shape":[NaN],"data_offsets":[0,0]}}'), fragments=("JSON",)),
    Case("7 malformed", "header nested 100000 deep", raw_header(b"[" * 100000), fragments=("JSON",)),
    Case("7 malformed", "architectures is a nested list", damaged_model(lambda m: edit_config(m, architectures=[["LlamaForCausalLM"]])), fragments=("architectures",)),
    Case("7 malformed", "architectures is a string", damaged_model(lambda m: edit_config(m, architectures="LlamaForCausalLM")), fragments=("architectures",)),
    Case("7 malformed", "hidden_size not divisible by heads", damaged_model(lambda m: edit_config(m, hidden_size=18, head_dim=None)), fragments=("hidden size",)),
    Case("7 malformed", "rms_norm_eps is a string", damaged_model(lambda m: edit_config(m, rms_norm_eps="1e-5")), fragments=("rms_norm_eps",)),
    Case("7 malformed", "num_attention_heads is 0", damaged_model(lambda m: edit_config(m, num_attention_heads=0)), fragments=("config.json", "zero")),
    Case("7 malformed", "config.json is a directory (convert)", directory_instead_of("config.json", "convert"), fragments=("directory",)),
    Case("7 malformed", "config.json is a directory (inspect)", directory_instead_of("config.json", "inspect"), fragments=("directory",)),
    Case("7 malformed", "rank file is a directory (inspect)", directory_instead_of("rank1.safetensors", "inspect"), fragments=("directory",)),
    Case("7 malformed", "rank file is a directory (reassemble)", directory_instead_of("rank1.safetensors", "reassemble"), fragments=("directory",)),
    Case("7 malformed", "rank file is a directory (verify)", directory_instead_of("rank1.safetensors", "verify"), fragments=("directory",)),
    Case("7 malformed", "model.safetensors is a directory", directory_instead_of("model.safetensors", "convert"), fragments=("directory",)),
    # TensorRT-LLM config.json type errors: judged when the plan is rebuilt through the card, before any work
    Case("7 TRT config", "mapping is not an object", trt_config(mapping=[2])),
    Case("7 TRT config", "mapping.tp_size is null", trt_config(mapping={"world_size": 2, "tp_size": None, "pp_size": 1})),
    Case("7 TRT config", "rotary_base missing", trt_config_without("rotary_base")),
    Case("7 TRT config", "rotary_base is null", trt_config(rotary_base=None)),
    Case("7 TRT config", "num_attention_heads is a string", trt_config(num_attention_heads="4")),
    # issue 13 item 11: what the config fuzzer (tests/test_fuzz_trt_config.py) found
    Case("11 TRT config", "num_hidden_layers is 10**12", trt_config(num_hidden_layers=10**12), fragments=("implausible",)),
    Case("11 TRT config", "num_hidden_layers is 10**6", trt_config(num_hidden_layers=10**6), fragments=("implausible",)),
    Case("11 TRT config", "mapping.pp_size is 2.5", trt_config(mapping={"world_size": 2, "tp_size": 2, "pp_size": 2.5}),
         fragments=("mapping.pp_size=2.5",)),
    Case("11 TRT config", "mapping.tp_size is true", trt_config(mapping={"world_size": 1, "tp_size": True, "pp_size": 1}),
         fragments=("mapping.tp_size=True",)),
    Case("11 TRT config", "use_parallel_embedding is a string", trt_config(use_parallel_embedding="yes"),
         fragments=("use_parallel_embedding",)),
    # issue 13 item 3: values the dtype cannot hold
    Case("3 values", "source value 7e4 converted to float16", converted_with(source_values(7.0e4), "--dtype", "float16"),
         fragments=("beyond float16's finite range", "max |value| 70000")),
    Case("3 values", "NaN and Inf in a source tensor", converted_with(source_values(float("nan"), float("inf"))),
         fragments=("2 non-finite value(s)",)),
    Case("3 values", "source value 7e4 to float16 with --clamp",
         converted_with(source_values(7.0e4), "--dtype", "float16", "--clamp"), exit_code=0),
    Case("3 values", "NaN in a source tensor with --allow-nonfinite",
         converted_with(source_values(float("nan")), "--allow-nonfinite"), exit_code=0),
    # issue 13 item 10: the integrity manifest
    Case("10 manifest", "rank file corrupted (inspect)", rank_bytes("inspect", "corrupt"), exit_code=1),
    Case("10 manifest", "rank file corrupted (verify)", rank_bytes("verify", "corrupt"), exit_code=1),
    Case("10 manifest", "rank file truncated (reassemble)", rank_bytes("reassemble", "truncate"), exit_code=1),
    Case("10 manifest", "rank file truncated (verify --mode sharded)", rank_bytes("verify:sharded", "truncate"), exit_code=1),
    Case("10 manifest", "manifest is not JSON (inspect)",
         damaged_checkpoint(lambda c: (c / MANIFEST).write_text("{"), "inspect"), fragments=(MANIFEST,)),
    Case("10 manifest", "verify against a re-saved copy of the source", verify_other_source, exit_code=1),
]


def convert_slowly(model: Path, out: Path, **popen) -> subprocess.Popen:
    """`shardproof convert` in a subprocess that pauses, staging complete, before moving it into place."""
    script = (
        "import sys, time\n"
        "import shardproof.converter.api as api\n"
        "write = api.write_checkpoint\n"
        "def slow(*args, **kwargs):\n"
        "    write(*args, **kwargs)\n"
        "    print('STAGED', flush=True)\n"
        "    time.sleep(60)\n"
        "api.write_checkpoint = slow\n"
        "from shardproof.cli import app\n"
        "sys.argv = ['shardproof'] + sys.argv[1:]\n"
        "app()\n"
    )
    return subprocess.Popen([sys.executable, "-c", script, "convert", "--model_dir", str(model), "--output_dir", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO, **popen)


def wait_staged(process: subprocess.Popen) -> None:
    for line in process.stdout:
        if line.strip() == "STAGED":
            return
    raise AssertionError(f"conversion ended before staging: {process.wait()} {process.stderr.read()}")


def stagings(out: Path) -> list[Path]:
    return [p for p in out.parent.iterdir() if p.name.startswith(staging_prefix(out))]


def run_case(case: Case, tmp: Path, model: Path, ckpt: Path) -> Outcome:
    """Build `case` in the empty directory `tmp`, run it through the CLI in-process and observe the result."""
    from typer.testing import CliRunner

    from shardproof.cli import app

    run = case.build(tmp, model, ckpt)
    before = [digest(p) for p in run.inputs]
    result = CliRunner().invoke(app, run.args)
    output = result.output
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        import traceback

        output += "".join(traceback.format_exception(result.exception))
    leftovers = [str(p) for p in tmp.rglob("*.partial-*")]
    if run.output is not None and result.exit_code != 0 and os.path.lexists(run.output):
        leftovers.append(str(run.output))
    return Outcome(
        exit_code=result.exit_code,
        stderr_lines=[line for line in result.stderr.splitlines() if line.strip()],
        output=output,
        inputs_untouched=before == [digest(p) for p in run.inputs],
        leftovers=leftovers,
    )
