"""The streamed HF forward (verify/streaming.py) is HF's forward: for every card, its logits and every module's
output are bit-identical to the model transformers loads whole, in float32 and bfloat16, tied or not, with the
conversion's rounding applied to the source tensors; and only one unit's parameters are ever resident."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

from shardproof.converter.api import plan_conversion
from shardproof.converter.card import cards
from shardproof.converter.errors import CheckNotRun, ShardproofError
from shardproof.converter.source import open_source
from shardproof.verify.streaming import ResidentParameters, StreamedModel
from shardproof.verify.tiny_models import build_tiny_model

CPU = torch.device("cpu")
IDS = torch.randint(0, 50, (2, 16), generator=torch.Generator().manual_seed(0))
CASES = [(card.name, tied) for card in cards() for tied in (False, True)]


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[tuple[str, bool], Path]:
    tmp = tmp_path_factory.mktemp("streaming")
    return {(name, tied): build_tiny_model(tmp / f"{name}-{tied}", name, seed=3, tie_word_embeddings=tied,
                                           **next(c for c in cards() if c.name == name).tests.selftest)
            for name, tied in CASES}


def _whole(model_dir: Path, dtype: torch.dtype) -> torch.nn.Module:
    from shardproof.converter.card import get_card

    card = get_card(open_source(model_dir).architecture)
    mapping = {"key_mapping": dict(card.hf_key_mapping)} if card.hf_key_mapping else {}
    return AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype, local_files_only=True, **mapping).eval()


def _outputs(model: torch.nn.Module) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    states: dict[str, torch.Tensor] = {}

    def keep(name: str):
        def hook(module, args, output) -> None:
            tensor = output if isinstance(output, torch.Tensor) else output[0]
            states.setdefault(name, tensor.detach().clone())
        return hook

    handles = [m.register_forward_hook(keep(n)) for n, m in model.named_modules() if n]
    with torch.inference_mode():
        logits = model(input_ids=IDS, use_cache=False).logits
    for handle in handles:
        handle.remove()
    return logits, states


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("name, tied", CASES, ids=[f"{n}-{'tied' if t else 'untied'}" for n, t in CASES])
def test_streamed_forward_is_bit_identical_to_the_whole_model(models, name, tied, dtype) -> None:
    model_dir = models[(name, tied)]
    expected, expected_states = _outputs(_whole(model_dir, dtype))
    with StreamedModel(model_dir, dtype, CPU) as streamed:
        logits, states = _outputs(streamed.model)
    assert torch.equal(logits, expected)
    assert states.keys() == expected_states.keys()
    assert all(torch.equal(states[k], expected_states[k]) for k in states)
    assert all(p.device.type == "meta" for p in streamed.model.parameters())  # everything dropped again
    source = streamed.source
    largest = max(sum(source.nbytes(k) for k in u.keys) for u in streamed.units)
    source_bytes = sum(source.nbytes(k) for k in source.shapes)
    assert streamed.resident.now == 0 and 0 < streamed.resident.peak <= largest * 4 // dtype.itemsize
    assert streamed.resident.peak < source_bytes * 4 // dtype.itemsize


@pytest.mark.parametrize("name", [card.name for card in cards()])
def test_streamed_values_are_what_transformers_loads_from_rounded_tensors(models, name, tmp_path) -> None:
    """`value` rounds each source tensor as it is read: the same model as transformers loading a copy whose
    tensors were rounded first (its own key mapping, fusing and stacking applied to them)."""
    model_dir = models[(name, True)]  # every card converts a tied model (Gemma converts only that)
    plan, source = plan_conversion(model_dir, dtype="bfloat16")
    rounded = tmp_path / "rounded"
    rounded.mkdir()
    save_file({n: plan.reassembled_value(n, source.load(n)).contiguous() for n in source.shapes},
              rounded / "model.safetensors", metadata={"format": "pt"})
    shutil.copy(model_dir / "config.json", rounded / "config.json")
    expected, _ = _outputs(_whole(rounded, torch.float32))
    with StreamedModel(model_dir, torch.float32, CPU, value=plan.reassembled_value) as streamed:
        logits, _ = _outputs(streamed.model)
    assert torch.equal(logits, expected)
    original, _ = _outputs(_whole(model_dir, torch.float32))
    assert not torch.equal(logits, original)  # the rounding really reached the model


def test_resident_parameters_stay_under_a_quarter_of_the_model(tmp_path) -> None:
    """Eight layers: a cap at a quarter of the parameters' bytes holds; a cap below one layer cannot run."""
    model_dir = build_tiny_model(tmp_path / "deep", "LlamaForCausalLM", seed=1, num_hidden_layers=8, vocab_size=64)
    source = open_source(model_dir)
    total = sum(source.nbytes(k) for k in source.shapes)
    progress: list[int] = []
    with StreamedModel(model_dir, torch.float32, CPU, resident=ResidentParameters(cap=total // 4),
                       progress=progress.append) as streamed:
        _outputs(streamed.model)
    assert streamed.resident.peak <= total // 4
    assert sum(progress) == total  # every source tensor read once (float32 source: bytes as resident)
    with pytest.raises(CheckNotRun, match="above the cap"):
        with StreamedModel(model_dir, torch.float32, CPU, resident=ResidentParameters(cap=total // 64)) as small:
            _outputs(small.model)


def test_a_parameter_missing_from_the_source_is_bad_input(models, tmp_path) -> None:
    model_dir = shutil.copytree(models[("LlamaForCausalLM", False)], tmp_path / "m")
    from safetensors.torch import load_file

    tensors = load_file(model_dir / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, model_dir / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ShardproofError, match=r"no tensor for parameter\(s\) model\.layers\.1\.mlp\.up_proj\.weight"):
        with StreamedModel(model_dir, torch.float32, CPU) as streamed:
            _outputs(streamed.model)
