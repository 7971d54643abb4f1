"""Streamed passes in lock step (verify/lockstep.py): the same logits, bit for bit, as the passes run one after
another; each unit read once for all of them; one stored unit beside one loaded unit at most; a failing pass
stops all of them with its own error, no thread left and no hook; passes that part ways stop rather than hang;
a cap too small for a stored unit beside a loaded one runs them one after another."""

from __future__ import annotations

import threading
from collections import Counter
from pathlib import Path

import pytest
import torch

from shardproof.converter.api import plan_conversion
from shardproof.converter.card import cards
from shardproof.converter.errors import CheckNotRun, ShardproofError
from shardproof.converter.source import Source, open_source
from shardproof.verify.forward import logits_pass
from shardproof.verify.lockstep import CannotShare, Pass, fits_together, run_passes
from shardproof.verify.streaming import ResidentParameters, StreamedModel
from shardproof.verify.tiny_models import build_tiny_model

CPU = torch.device("cpu")
IDS = torch.randint(0, 50, (2, 16), generator=torch.Generator().manual_seed(0))
NAMES = [card.name for card in cards()]


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("lockstep")
    return {name: build_tiny_model(tmp / name, name, seed=5, tie_word_embeddings=True) for name in NAMES}


def _passes(model_dir: Path) -> list[Pass]:
    """What the verify modes run: the checkpoint dtype with the conversion's rounding, float32, the dtype alone."""
    rounded = plan_conversion(model_dir, dtype="bfloat16")[0].reassembled_value
    return [logits_pass(torch.bfloat16, CPU, IDS, rounded), logits_pass(torch.float32, CPU, IDS),
            logits_pass(torch.float32, CPU, IDS, rounded), logits_pass(torch.bfloat16, CPU, IDS)]


def _counted(model_dir: Path) -> tuple[Source, Counter]:
    """The source, each of its `load` calls counted by tensor name."""
    source, reads = open_source(model_dir), Counter()
    load = source.load

    def counted(name, *args, **kwargs):
        reads[name] += 1
        return load(name, *args, **kwargs)

    source.load = counted
    return source, reads


def _unit_keys(model_dir: Path) -> Counter:
    """Each unit's source tensors, counted over the units (a tied embedding is read again for the lm_head)."""
    return Counter(key for unit in StreamedModel(model_dir, torch.float32, CPU).units for key in unit.keys)


def _lockstep_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("lockstep-pass-")]


@pytest.mark.parametrize("name", NAMES)
def test_lockstep_logits_are_those_of_the_passes_run_one_after_another(models, name) -> None:
    model_dir = models[name]
    source, reads = _counted(model_dir)
    progress: list[int] = []
    together = run_passes(source, _passes(model_dir), CPU, progress=progress.append)
    alone = [run_passes(model_dir, [p], CPU)[0] for p in _passes(model_dir)]
    assert len(together) == 4
    for lockstep, expected in zip(together, alone):
        assert lockstep.dtype == expected.dtype and torch.equal(lockstep, expected)
    assert not torch.equal(together[1], together[2])  # the passes really differ (the rounding reached one) ...
    # ... and each unit's tensors were read once for all four, its bytes reported once
    assert reads == _unit_keys(model_dir)
    assert sum(progress) == sum(source.nbytes(k) * n for k, n in reads.items())


def test_passes_take_turns_unit_by_unit(models) -> None:
    """Every pass runs unit k before any runs unit k + 1, in the passes' order, each in a thread of its own."""
    model_dir = models["LlamaForCausalLM"]
    prefixes = [unit.prefix for unit in StreamedModel(model_dir, torch.float32, CPU).units]
    ran: list[tuple[int, str]] = []
    threads: set[str] = set()

    def recording(index: int):
        def run(model: torch.nn.Module) -> torch.Tensor:
            threads.add(threading.current_thread().name)
            for prefix in prefixes:
                model.get_submodule(prefix).register_forward_pre_hook(lambda *_, p=prefix: ran.append((index, p)))
            return model(input_ids=IDS, use_cache=False).logits
        return run

    run_passes(model_dir, [Pass(torch.float32, recording(i)) for i in range(3)], CPU)
    order = [p for i, p in ran if i == 0]
    assert sorted(order) == sorted(prefixes)
    assert ran == [(i, p) for p in order for i in range(3)]
    assert len(threads) == 3 and threading.current_thread().name not in threads


def test_two_passes_hold_one_stored_unit_beside_one_loaded_unit(models) -> None:
    """float32 source, a float32 and a bfloat16 pass: the peak is the largest unit stored plus loaded in float32,
    never two loaded units, and far below the model."""
    model_dir = build_tiny_model(models["LlamaForCausalLM"].parent / "deep", "LlamaForCausalLM", seed=1,
                                 num_hidden_layers=8, vocab_size=64)
    resident = ResidentParameters()
    run_passes(model_dir, [logits_pass(torch.float32, CPU, IDS), logits_pass(torch.bfloat16, CPU, IDS)], CPU,
               resident)
    source, units = open_source(model_dir), StreamedModel(model_dir, torch.float32, CPU).units
    stored = {unit.prefix: sum(source.nbytes(k) for k in unit.keys) for unit in units}
    assert resident.now == 0
    assert resident.peak == max(2 * stored[u] for u in stored)  # float32 stored beside float32 loaded
    assert resident.peak < sum(source.nbytes(k) for k in source.shapes) / 2


@pytest.mark.parametrize("error", [ShardproofError("bad tensor"), CheckNotRun("cannot run"), ValueError("boom")],
                         ids=lambda e: type(e).__name__)
def test_a_failing_pass_stops_every_pass_with_its_own_error(models, error) -> None:
    """The second pass fails reading the second layer while the others wait: its error reaches the caller, of its
    type; no pass thread is left, no hook is left on any model, every parameter is back on the meta device."""
    model_dir = models["LlamaForCausalLM"]
    key = StreamedModel(model_dir, torch.float32, CPU).units[2].keys[0]
    seen: list[torch.nn.Module] = []

    def failing(name: str, tensor: torch.Tensor) -> torch.Tensor:
        if name == key:
            raise error
        return tensor

    def run(model: torch.nn.Module) -> torch.Tensor:
        seen.append(model)
        return model(input_ids=IDS, use_cache=False).logits

    passes = [Pass(torch.float32, run), Pass(torch.float32, run, failing), Pass(torch.bfloat16, run)]
    with pytest.raises(type(error), match=str(error)):
        run_passes(model_dir, passes, CPU)
    assert len(seen) == 3 and not _lockstep_threads()
    for model in seen:
        assert not any(m._forward_pre_hooks or m._forward_hooks for m in model.modules())
        assert all(p.device.type == "meta" for p in model.parameters())


def test_passes_that_run_different_units_stop_instead_of_waiting(models) -> None:
    """One pass runs the embedding alone, or starts from the lm_head: not run (CheckNotRun), never a hang."""
    model_dir = models["LlamaForCausalLM"]

    def whole(model: torch.nn.Module) -> torch.Tensor:
        return model(input_ids=IDS, use_cache=False).logits

    def embedding_only(model: torch.nn.Module) -> torch.Tensor:
        return model.get_input_embeddings()(IDS)

    def head_first(model: torch.nn.Module) -> torch.Tensor:
        model.get_output_embeddings()(torch.zeros(1, 4, model.config.hidden_size))
        return whole(model)

    for other in (embedding_only, head_first):
        for passes in ([Pass(torch.float32, whole), Pass(torch.float32, other)],
                       [Pass(torch.float32, other), Pass(torch.float32, whole)]):
            raised: list[BaseException] = []

            def attempt(passes=passes) -> None:
                try:
                    run_passes(model_dir, passes, CPU)
                except BaseException as e:  # noqa: BLE001 - judged below
                    raised.append(e)

            caller = threading.Thread(target=attempt)
            caller.start()
            caller.join(timeout=60)
            assert not caller.is_alive(), "the passes hung"
            assert len(raised) == 1 and isinstance(raised[0], CheckNotRun), raised
            assert "do not run the same units" in str(raised[0])
    assert not _lockstep_threads()


def test_a_cap_too_small_for_both_runs_the_passes_one_after_another(models) -> None:
    """A cap holding any loaded unit but not the largest one stored beside it: the passes read the source each,
    one after another, under the cap, and give the same logits."""
    model_dir = models["LlamaForCausalLM"]
    passes = _passes(model_dir)
    streamed = [StreamedModel(model_dir, p.dtype, CPU, p.value) for p in passes]
    cap = max(m.loaded_bytes(u) for m in streamed for u in m.units)
    assert not fits_together(streamed[0], streamed, cap) and fits_together(streamed[0], streamed, 2 * cap)
    source, reads = _counted(model_dir)
    resident = ResidentParameters(cap)
    apart = run_passes(source, passes, CPU, resident)
    assert reads == Counter({k: n * len(passes) for k, n in _unit_keys(model_dir).items()})
    assert 0 < resident.peak <= cap and resident.now == 0
    together = run_passes(model_dir, passes, CPU)
    assert all(torch.equal(a, b) for a, b in zip(apart, together))


def test_a_pass_over_its_own_source_is_handed_each_units_shared_tensors_as_stored(models, tmp_path) -> None:
    """A pass over another source (here a float16 copy of the model) walks the same units in lock step: its
    `tensors` gets each unit's tensors of the shared source as stored, and its model runs on what it returns.
    Under a cap too small to hold a stored unit beside a loaded one it cannot run, and says so before running."""
    import shutil

    from safetensors.torch import load_file, save_file

    model_dir = models["LlamaForCausalLM"]
    copy = tmp_path / "copy"
    shutil.copytree(model_dir, copy)
    path = next(copy.glob("*.safetensors"))
    save_file({k: v.half() for k, v in load_file(path).items()}, path, metadata={"format": "pt"})
    shared_source, own_source = open_source(model_dir), open_source(copy)
    seen: list[tuple[str, dict]] = []

    def tensors(unit, shared):
        seen.append((unit.prefix, {k: v.clone() for k, v in shared.items()}))
        return {key: own_source.load(key) for key in unit.keys}

    passes = [logits_pass(torch.float32, CPU, IDS),
              Pass(torch.float32, logits_pass(torch.float32, CPU, IDS).run, source=own_source, tensors=tensors)]
    streamed = StreamedModel(model_dir, torch.float32, CPU)
    logits = run_passes(shared_source, passes, CPU)
    units = {u.prefix: u for u in streamed.units}
    assert sorted(prefix for prefix, _ in seen) == sorted(units)  # each unit once, in the order the model runs them
    for prefix, shared in seen:
        unit = units[prefix]
        assert set(shared) == set(unit.keys)
        assert all(torch.equal(shared[k], shared_source.load(k)) for k in unit.keys)  # as stored: float32
    alone = run_passes(own_source, [logits_pass(torch.float32, CPU, IDS)], CPU)[0]
    assert torch.equal(logits[1], alone) and not torch.equal(logits[0], logits[1])
    seen.clear()  # alone over the shared source (its own runs kept elsewhere): the source's units still lead it
    assert torch.equal(run_passes(shared_source, passes[1:], CPU)[0], alone) and len(seen) == len(units)
    seen.clear()
    with pytest.raises(CannotShare, match="cannot hold the source's units beside its own"):
        run_passes(shared_source, passes, CPU, ResidentParameters(max(streamed.loaded_bytes(u) for u in streamed.units)))
    assert not seen
