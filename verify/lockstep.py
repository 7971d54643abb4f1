"""Several streamed HF passes over one source, each unit's source tensors read once for all of them (lock step).

Each pass (`Pass`: the model's dtype, the `value` applied to each source tensor, and what to run on the model)
is a `StreamedModel` of its own. Together, each runs in a thread of its own, but as a coroutine: exactly one pass
executes at a time, holding the baton. At each unit's forward pre-hook a pass hands the baton to the next pass in
turn and waits for it to come back, so the passes advance unit by unit: the first to take a unit reads its
tensors once, as stored, onto the device (`Source.load`), every pass casts them or passes them through its
`value` itself, and the stored copy is dropped when the last pass has taken it. Memory holds one stored unit, the
active pass's loaded unit and each pass's activations, never the model; the numerics are each pass's own run.

A pass may run another model over the same units (`Pass.source`: a model rebuilt from a checkpoint): its
`tensors(unit, shared)` gives its own tensors of each unit, `shared` being the shared source's tensors of that
unit as stored, in hand to compare with.

The passes must visit the same units in the same order: one asking for another unit, or for more units than
another ran, stops them all (`CannotShare`, a CheckNotRun). An exception in any pass stops the others at their next
unit and is raised again in the caller, of its own type; every thread has ended and every hook is removed by then.

Under a cap on resident parameters (`ResidentParameters.cap`) the stored unit is accounted with the loaded one;
when the largest unit's stored bytes and its bytes in a pass's dtypes could exceed the cap (from the headers,
before running), the passes run one after another instead, each reading the source itself; with a pass over
another source, which needs the shared units in hand, they raise `CannotShare` instead, before running, as
they do when that pass's model declares other units than the source's.
"""

from __future__ import annotations

import contextlib
import contextvars
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Generic, Iterator, Sequence, TypeVar

import torch
from torch import Tensor

from shardproof.converter.errors import CheckNotRun
from shardproof.converter.source import Source, open_source

from .streaming import Feed, Progress, ResidentParameters, StreamedModel, Unit, ValueFn, release, stored_bytes

T = TypeVar("T")


Tensors = Callable[[Unit, dict[str, Tensor]], dict[str, Tensor]]


@dataclass(frozen=True)
class Pass(Generic[T]):
    """One streamed pass: the model in `dtype`, each source tensor through `value` (None: cast to the dtype
    transformers loads it in), and `run(model)`, called under inference mode, whose result the pass gives.
    With `source`, the model is that source's and `tensors` gives each of its units' tensors (module docstring)."""

    dtype: torch.dtype
    run: Callable[[torch.nn.Module], T]
    value: ValueFn | None = None
    source: Source | None = None
    tensors: Tensors | None = None


def run_passes(model_dir: Path | str | Source, passes: Sequence[Pass[Any]], device: torch.device,
               resident: ResidentParameters | None = None, progress: Progress | None = None) -> list[Any]:
    """Each pass's result, in order: in lock step (module docstring) unless a single pass, or `resident`'s cap
    cannot hold a stored unit beside a loaded one; then one after another. `progress` gets the bytes read. The
    device gets the freed memory back when they end (`release`)."""
    try:
        return _run_passes(model_dir, passes, device, resident, progress)
    finally:
        release(device)


def _run_passes(model_dir: Path | str | Source, passes: Sequence[Pass[Any]], device: torch.device,
                resident: ResidentParameters | None, progress: Progress | None) -> list[Any]:
    source = model_dir if isinstance(model_dir, Source) else open_source(model_dir)
    resident = resident if resident is not None else ResidentParameters()
    models = [StreamedModel(p.source or source, p.dtype, device, p.value, resident, None if p.source else progress)
              for p in passes]
    # the source's own units, which every pass's feed reads by prefix: from a pass over it, or, when every pass is
    # over another source (the self-test's rebuilt models, the reference's own runs kept), from its skeleton
    readers = [m for m, p in zip(models, passes) if p.source is None]
    reader = readers[0] if readers else StreamedModel(source, torch.float32, device)
    shared = {u.prefix: u for u in reader.units}
    fits = fits_together(reader, models, resident.cap)
    for streamed, p in zip(models, passes):
        if p.tensors is not None and [u.prefix for u in streamed.units] != [u.prefix for u in reader.units]:
            raise CannotShare(f"{p.source.model_dir}: its model's units differ from those of {source.model_dir}'s "
                              "model, so it cannot run in step with it")
        if p.tensors is not None and not fits:
            raise CannotShare(f"{source.model_dir}: a pass over another source cannot hold the source's units beside "
                              f"its own under the cap of {resident.cap / 2**30:.3f} GiB")
    if not any(p.tensors for p in passes) and (len(passes) == 1 or not fits):
        results = []
        for streamed, p in zip(models, passes):
            with streamed, torch.inference_mode():
                results.append(p.run(streamed.model))
        return results
    baton = _Baton(source, shared, device, len(passes), resident, progress)
    with contextlib.ExitStack() as stack:
        for index, (streamed, p) in enumerate(zip(models, passes)):
            streamed.feed = baton.feed(index) if p.tensors is None else _given(baton.feed(index), p.tensors)
            stack.enter_context(streamed)
        return baton.run([lambda p=p, m=m: p.run(m.model) for p, m in zip(passes, models)], device)


def fits_together(reader: StreamedModel, models: Sequence[StreamedModel], cap: int | None) -> bool:
    """Whether every unit's stored bytes (as `reader`, a model over the shared source, has its units) beside its
    bytes loaded by any of `models` stay within `cap`."""
    if cap is None:
        return True
    source, shared = reader.source, {u.prefix: u for u in reader.units}
    need = max((stored_bytes(source, shared[unit.prefix]) + m.loaded_bytes(unit)
                for m in models for unit in m.units if unit.prefix in shared), default=0)
    return need <= cap


def _given(feed: Feed, tensors: Tensors) -> Feed:
    """A pass's own tensors of each unit (`Pass.tensors`), from the shared source's tensors that `feed` gives."""

    @contextlib.contextmanager
    def take(unit: Unit) -> Iterator[dict[str, Tensor]]:
        with feed(unit) as stored:
            yield tensors(unit, stored)

    return take


class CannotShare(CheckNotRun):
    """The passes cannot share the source's reads: they do not run the same units in the same order, or a pass over
    another source cannot hold a unit as stored beside its own under the cap."""


class _Stopped(BaseException):
    """Raised in a waiting pass when another failed: unwinds its forward without being caught on the way."""


class _Baton:
    """The passes' turns, the order of units the first pass took, and the one unit read (module docstring)."""

    def __init__(self, source: Source, shared: dict[str, Unit], device: torch.device, count: int,
                 resident: ResidentParameters, progress: Progress | None) -> None:
        self.source, self.shared, self.device, self.resident, self.progress = source, shared, device, resident, progress
        self.count = count
        self.changed = threading.Condition()
        self.turn = 0
        self.done = [False] * count
        self.taken = [0] * count  # units each pass has taken
        self.order: list[str] = []  # unit prefixes, in the order the first pass took them
        self.stored: dict[str, Tensor] = {}
        self.takers = count  # passes that have taken the last unit read
        self.error: BaseException | None = None

    def run(self, runs: list[Callable[[], Any]], device: torch.device) -> list[Any]:
        results: list[Any] = [None] * self.count
        cuda = torch.cuda.current_device() if device.type == "cuda" else None

        def body(index: int) -> None:
            try:
                if cuda is not None:
                    torch.cuda.set_device(cuda)
                self._wait(index)
                with torch.inference_mode():
                    results[index] = runs[index]()
            except _Stopped:
                pass
            except BaseException as e:  # noqa: BLE001 - raised again in the caller
                self._stop(e)
            finally:
                self._finish(index)

        # each pass in a copy of the caller's context (context variables such as --allow-pickle's hold there too)
        threads = [threading.Thread(target=contextvars.copy_context().run, args=(body, i), name=f"lockstep-pass-{i}")
                   for i in range(self.count)]
        try:
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
        except BaseException as e:  # an interrupt in the caller stops every pass before leaving
            self._stop(e)
            for thread in threads:
                thread.join()
            raise
        finally:
            self.stored = {}
        if self.error is not None:
            raise self.error
        return results

    def feed(self, index: int) -> Callable[[Unit], contextlib.AbstractContextManager[dict[str, Tensor]]]:
        """Pass `index`'s source of units: hands the baton on, and gives the unit's stored tensors when it returns."""

        @contextlib.contextmanager
        def take(unit: Unit) -> Iterator[dict[str, Tensor]]:
            with self.changed:
                self._hand_on(index)
            self._wait(index)
            step = self.taken[index]
            if step == len(self.order):
                self._read(unit, step)
            else:
                self._check(unit, step)
            try:
                yield self.stored
            finally:
                self.taken[index] += 1
                self.takers += 1
                if self.takers == self.count:
                    self.stored = {}
                    self.resident.remove(stored_bytes(self.source, self.shared[unit.prefix]))

        return take

    def _read(self, unit: Unit, step: int) -> None:
        if any(self.done):
            self._mismatch(f"a pass asks for {unit.prefix!r} at unit {step + 1}, which another pass never runs")
        if unit.prefix not in self.shared:
            self._mismatch(f"a pass asks for {unit.prefix!r}, which the source's model does not have")
        unit = self.shared[unit.prefix]
        self.order.append(unit.prefix)
        self.takers = 0
        nbytes = stored_bytes(self.source, unit)
        self.resident.add(nbytes, f"{unit.prefix} (read once for {self.count} passes)")
        self.stored = {key: self.source.load(key, self.device) for key in unit.keys}
        if self.progress:
            self.progress(nbytes)

    def _check(self, unit: Unit, step: int) -> None:
        if self.order[step] != unit.prefix:
            self._mismatch(f"a pass asks for {unit.prefix!r} at unit {step + 1}, where another ran {self.order[step]!r}")

    def _mismatch(self, what: str) -> None:
        raise CannotShare(f"{self.source.model_dir}: the passes over the source do not run the same units in the "
                          f"same order ({what}), so they cannot share its reads")

    def _wait(self, index: int) -> None:
        """Until pass `index` holds the baton; _Stopped when a pass has failed."""
        with self.changed:
            self.changed.wait_for(lambda: self.turn == index or self.error is not None)
            if self.error is not None:
                raise _Stopped

    def _hand_on(self, index: int) -> None:
        """The baton to the next pass after `index` that has not finished (back to `index` when none); lock held."""
        for step in range(1, self.count + 1):
            following = (index + step) % self.count
            if not self.done[following]:
                self.turn = following
                break
        self.changed.notify_all()

    def _stop(self, error: BaseException) -> None:
        with self.changed:
            if self.error is None:
                self.error = error
            self.changed.notify_all()

    def _finish(self, index: int) -> None:
        with self.changed:
            self.done[index] = True
            if self.turn == index:
                self._hand_on(index)
            self.changed.notify_all()
