"""Rank-file tensors read once for the two readers of a both-mode verification: the sharded runtime and the
rebuilt model of the reassembled mode each read every tensor of the rank files once, on the same device, in the
same lock step (`verification._together`).

Each reader declares what it will read (file, tensor, device) before reading anything. A tensor both declared is
read once: the first read keeps it, the second reader is handed it and it is dropped; anything else is read as
it is asked for. So each reader's tensor waits at most until the other reader reaches it (the same unit of the
lock step, or the head after it), never longer.
"""

from __future__ import annotations

import threading
from collections import Counter
from pathlib import Path
from typing import Callable, Iterable

import torch
from torch import Tensor

Key = tuple[Path, str, torch.device]


def rank_key(path: Path | str, name: str, device: torch.device | str | None) -> Key:
    """(resolved path, tensor name, device with its index: `cuda` names the current one; None: the host)."""
    device = torch.device("cpu" if device is None else device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return Path(path).resolve(), name, device


class RankReads:
    """Tensors two readers both declared, each read once for both (module docstring)."""

    def __init__(self) -> None:
        self._declared: Counter[Key] = Counter()
        self._left: dict[Key, int] = {}  # reads still to come of a tensor both declared
        self._kept: dict[Key, Tensor] = {}
        self._lock = threading.Lock()

    def declare(self, keys: Iterable[Key]) -> None:
        """What one reader will read, each tensor once."""
        with self._lock:
            self._declared.update(set(keys))
            self._left = {key: 2 for key, count in self._declared.items() if count >= 2}

    def read(self, key: Key, read: Callable[[], Tensor]) -> Tensor:
        """The tensor `key` names: `read()` unless the other reader's read is kept for this one."""
        with self._lock:
            left = self._left.get(key, 0)
            if left == 1:
                self._left[key] = 0
                return self._kept.pop(key)
        tensor = read()
        if left == 2:
            with self._lock:
                self._left[key] = 1
                self._kept[key] = tensor
        return tensor
