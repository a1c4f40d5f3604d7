"""Bytes of tensors saved for backward, counted through saved-tensor hooks: shared by the
benchmarks that measure memory (``deq.py``, ``unroll_memory.py``)."""

from __future__ import annotations

import weakref

import torch


class _Handle:
    __slots__ = ("tensor", "__weakref__")

    def __init__(self, tensor: torch.Tensor):
        self.tensor = tensor


class SavedMemory:
    """Bytes of tensors saved for backward and still alive: now (``live``) and at most
    (``peak``), one count per storage; storages in ``exclude`` are not counted."""

    def __init__(self, exclude: tuple[torch.Tensor, ...] = ()):
        self.excluded = {t.untyped_storage().data_ptr() for t in exclude}
        self.counts: dict[int, int] = {}
        self.live = self.peak = self.kept = 0

    def pack(self, tensor: torch.Tensor) -> _Handle:
        # hold the data, not the tensor: a tensor saved as its node's output holds that node as
        # its grad_fn, a reference cycle through C++ that would keep every graph alive; autograd
        # restores the grad_fn on unpack, so even higher derivatives are unchanged
        handle = _Handle(tensor.detach())
        storage = tensor.untyped_storage()
        key, size = storage.data_ptr(), storage.nbytes()
        if key in self.excluded:
            return handle
        if self.counts.get(key, 0) == 0:
            self.live += size
            self.peak = max(self.peak, self.live)
        self.counts[key] = self.counts.get(key, 0) + 1
        weakref.finalize(handle, self._release, key, size)
        return handle

    def _release(self, key: int, size: int) -> None:
        self.counts[key] -= 1
        if self.counts[key] == 0:
            del self.counts[key]
            self.live -= size

    def hooks(self):
        return torch.autograd.graph.saved_tensors_hooks(self.pack, lambda handle: handle.tensor)
