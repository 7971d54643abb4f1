"""An HF model run one module at a time: HF's own forward over a skeleton whose parameters are loaded from the
safetensors source just before a module runs and dropped right after it.

The skeleton is the transformers model built from config.json with every parameter on the meta device and every
buffer real (rotary frequencies, ...). Its units are the decoder layers and, outside them, each module that holds
parameters of its own (embedding, final norm, lm_head). A forward pre-hook loads a unit's source tensors through
transformers' own loading (`convert_and_load_state_dict_in_model`: the card's key mapping, fused or stacked
experts, the cast to the model's dtype), a forward hook puts the meta parameters back. A parameter tied to
another (lm_head sharing the embedding) is loaded from the tensor it is tied to, as `tie_weights` makes it.
So host and device memory hold one unit's parameters plus activations, whatever the depth.

`value(name, tensor)` may replace each source tensor as it is read (the rounding a conversion applies);
`ResidentParameters` accounts the bytes of parameters resident at once and refuses a unit above its cap.
Several passes over one source can share each unit's read (`feed`, `verify/lockstep.py`).
"""

from __future__ import annotations

import contextlib
import gc
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, ContextManager, Iterator

import torch
from torch import Tensor

from shardproof.converter.card import get_card
from shardproof.converter.errors import CheckNotRun, ShardproofError
from shardproof.converter.source import Source, open_source

ValueFn = Callable[[str, Tensor], Tensor]
Progress = Callable[[int], None]

Feed = Callable[["Unit"], ContextManager[dict[str, Tensor]]]


@dataclass
class ResidentParameters:
    """Bytes of parameters resident at once: now, at most so far, and the cap (None: no cap) a unit may not push
    them above (CheckNotRun: the check cannot run within the memory it was given)."""

    cap: int | None = None
    now: int = 0
    peak: int = 0

    def add(self, nbytes: int, what: str) -> None:
        self.now += nbytes
        self.peak = max(self.peak, self.now)
        if self.cap is not None and self.now > self.cap:
            raise CheckNotRun(f"{what} needs {self.now / 2**30:.3f} GiB of parameters resident at once, "
                              f"above the cap of {self.cap / 2**30:.3f} GiB")

    def remove(self, nbytes: int) -> None:
        self.now -= nbytes


@dataclass(frozen=True)
class Unit:
    """A module whose parameters are loaded together: `names` (full parameter names), `loads` the names
    transformers loads them under (a tied parameter's is the one it is tied to), `keys` the source tensors."""

    module: torch.nn.Module
    prefix: str
    names: tuple[str, ...]
    loads: tuple[str, ...]
    keys: tuple[str, ...]


@contextlib.contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """Modules built inside register their parameters on the meta device; buffers stay real."""
    register = torch.nn.Module.register_parameter

    def on_meta(module: torch.nn.Module, name: str, param: torch.nn.Parameter | None) -> None:
        if param is not None and param.device.type != "meta":
            param = torch.nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        register(module, name, param)

    torch.nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = register


def skeleton(config, dtype: torch.dtype, device: torch.device) -> torch.nn.Module:
    """The transformers model for `config` in `dtype`, parameters on the meta device, buffers on `device`, eval."""
    from transformers import AutoModelForCausalLM

    with _parameters_on_meta():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    for module in model.modules():
        for name, buffer in module._buffers.items():
            if buffer is not None:
                module._buffers[name] = buffer.to(device)
    return model.eval()


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The decoder's list of layers, whatever the family calls it (`layers`, `h`): its module list with one
    entry per hidden layer."""
    count = model.config.num_hidden_layers
    return next(m for m in model.get_decoder().children() if isinstance(m, torch.nn.ModuleList) and len(m) == count)


class StreamedModel:
    """The HF model at `model_dir` (or an opened `Source`) in `dtype` on `device`, streamed unit by unit (module
    docstring).

    Use as a context manager: inside, `model` runs like any transformers model (hooks included); each call
    of `progress` gets the bytes of source tensors read for the unit about to run. `feed`, when set, hands each
    unit's source tensors as stored, on the device (read once for several passes, `verify/lockstep.py`), which
    this model casts or passes through `value` itself; None: this model reads them, cast as they are read.
    """

    def __init__(self, model_dir: Path | str | Source, dtype: torch.dtype, device: torch.device,
                 value: ValueFn | None = None, resident: ResidentParameters | None = None,
                 progress: Progress | None = None) -> None:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.utils import logging

        logging.disable_progress_bar()
        self.source = model_dir if isinstance(model_dir, Source) else open_source(model_dir)
        model_dir = self.source.model_dir
        self.device, self.value, self.progress = device, value, progress
        self.resident = resident if resident is not None else ResidentParameters()
        card = get_card(self.source.architecture)
        try:
            self.model = skeleton(self.source.hf_config, dtype, device)
        except Exception as e:  # reading the input failed: bad input, never a failed check
            raise ShardproofError(f"{model_dir}: transformers cannot build the model ({_one_line(e)})") from None
        self._conversions = get_model_conversion_mapping(self.model, dict(card.hf_key_mapping) or None)
        self._meta = dict(self.model.named_parameters(remove_duplicate=False))
        self._tied: dict[str, str] = dict(getattr(self.model, "all_tied_weights_keys", None) or {})
        self._dtypes: dict[str, torch.dtype] = {}
        self.units = self._units()
        self.feed: Feed | None = None
        self._handles: list = []

    def _units(self) -> list[Unit]:
        from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

        model = self.model
        renamings = [c for c in self._conversions if isinstance(c, WeightRenaming)]
        converters = [c for c in self._conversions if isinstance(c, WeightConverter)]
        state = model.state_dict()
        by_target: dict[str, list[str]] = {}
        for key in self.source.shapes:
            target, _ = rename_source_key(key, renamings, converters, model.base_model_prefix, state)
            by_target.setdefault(target, []).append(key)
            if target in state and state[target].is_floating_point():
                self._dtypes[key] = state[target].dtype  # what transformers would cast it to
        layers = decoder_layers(model)
        layer_ids = {id(m) for m in layers}
        modules = dict(model.named_modules())
        prefixes = [name for name, m in modules.items() if id(m) in layer_ids]
        inside = tuple(p + "." for p in prefixes)
        prefixes += [name for name, m in modules.items()
                     if not (name + ".").startswith(inside) and any(True for _ in m.parameters(recurse=False))]
        units = []
        for prefix in prefixes:
            module = modules[prefix]
            recurse = prefix in prefixes[: len(layers)]
            names = tuple(f"{prefix}.{n}" for n, _ in module.named_parameters(recurse=recurse, remove_duplicate=False))
            loads = tuple(dict.fromkeys(self._tied.get(n, n) for n in names))
            keys = tuple(k for n in loads for k in by_target.get(n, ()))
            units.append(Unit(module, prefix, names, loads, keys))
        return units

    def __enter__(self) -> StreamedModel:
        for unit in self.units:
            self._handles.append(unit.module.register_forward_pre_hook(
                lambda module, args, unit=unit: self._load(unit), prepend=True))
            self._handles.append(unit.module.register_forward_hook(
                lambda module, args, output, unit=unit: self._free(unit), always_call=True))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for unit in self.units:
            self._free(unit)

    def _load(self, unit: Unit) -> None:
        from transformers.core_model_loading import convert_and_load_state_dict_in_model
        from transformers.modeling_utils import LoadStateDictConfig

        with self._read(unit) as state:
            config = LoadStateDictConfig(dtype=None, device_map={"": self.device}, weight_mapping=self._conversions)
            convert_and_load_state_dict_in_model(self.model, state, config)
            del state
            for name in unit.names:
                if name in self._tied:
                    _set(self.model, name, _get(self.model, self._tied[name]))
            missing = [n for n in (*unit.names, *unit.loads) if _get(self.model, n).device.type == "meta"]
            if missing:
                raise ShardproofError(f"{self.source.model_dir}: no tensor for parameter(s) {', '.join(missing)}")
            self.resident.add(self._bytes(unit), unit.prefix)

    @contextlib.contextmanager
    def _read(self, unit: Unit) -> Iterator[dict[str, Tensor]]:
        """The unit's source tensors on the device, as this model loads them (its `value`, its dtypes)."""
        if self.feed is not None:
            with self.feed(unit) as stored:
                yield {key: self._cast(key, stored[key]) for key in unit.keys}
            return
        state = {}
        for key in unit.keys:
            # read to the device and cast to its parameter's dtype there, a buffer at a time: the bus carries stored
            # bytes, and memory never holds the stored copy beside the cast one
            if self.value:
                state[key] = self.value(key, self.source.load(key)).to(self.device)
            else:
                state[key] = self.source.load(key, self.device, self._dtypes.get(key))
        if self.progress:
            self.progress(stored_bytes(self.source, unit))
        yield state

    def _cast(self, key: str, stored: Tensor) -> Tensor:
        if self.value:
            return self.value(key, stored)
        dtype = self._dtypes.get(key)
        return stored if dtype is None else stored.to(dtype)

    def loaded_bytes(self, unit: Unit) -> int:
        """The bytes `unit`'s parameters take once loaded by this model, from the source's metadata."""
        tensors = self.source.tensors
        return sum(math.prod(tensors[k].shape) * (self._dtypes.get(k) or tensors[k].dtype).itemsize for k in unit.keys)

    def _free(self, unit: Unit) -> None:
        nbytes = self._bytes(unit)
        for name in (*unit.names, *unit.loads):
            _set(self.model, name, self._meta[name])
        self.resident.remove(nbytes)

    def _bytes(self, unit: Unit) -> int:
        tensors = {id(t): t for t in (_get(self.model, n) for n in (*unit.names, *unit.loads))}
        return sum(t.numel() * t.element_size() for t in tensors.values() if t.device.type != "meta")




def stored_bytes(source: Source, unit: Unit) -> int:
    """The bytes of `unit`'s source tensors as stored."""
    return sum(source.nbytes(k) for k in unit.keys)

def release(device: torch.device) -> None:
    """Return freed memory (a model just dropped) to the device."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()

def _get(model: torch.nn.Module, name: str) -> torch.nn.Parameter:
    module, _, attr = name.rpartition(".")
    return getattr(model.get_submodule(module), attr)


def _set(model: torch.nn.Module, name: str, value: torch.nn.Parameter) -> None:
    module, _, attr = name.rpartition(".")
    model.get_submodule(module)._parameters[attr] = value


def _one_line(error: Exception) -> str:
    return " ".join(str(error).split()) or type(error).__name__
