"""Averages over a ``torch.distributed`` process group, counted, for data split across ranks.

When each rank's losses are the means over its own shard of equally sized shards, the loss of
the whole data is the mean of the ranks' losses, and so are its gradients and Hessian-vector
products: averaging each of them over the group (one ``all_reduce``) gives every rank the same
numbers as one process on all the data, and so the same iterates and stopping decisions.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist

from ._operator import LinearOperator

__all__ = ["GroupAverage", "AveragedOperator"]


class GroupAverage:
    """``mean over the ranks of the group``, of one tensor or of several in one message;
    ``calls`` and ``bytes`` count what was sent."""

    def __init__(self, group: Any):
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError(
                "`process_group` was given but torch.distributed is not initialised: call "
                "torch.distributed.init_process_group first (torchrun sets up its environment)."
            )
        self.group, self.size = group, dist.get_world_size(group)
        self.calls = self.bytes = 0

    def __call__(self, tensor: torch.Tensor) -> torch.Tensor:
        return self._reduce(tensor.detach().clone(memory_format=torch.contiguous_format))

    def many(self, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Each tensor averaged, all in one all-reduce of their concatenation."""
        flat = self._reduce(torch.cat([t.detach().reshape(-1) for t in tensors]))
        return [
            part.view_as(t) for part, t in zip(flat.split([t.numel() for t in tensors]), tensors)
        ]

    def _reduce(self, total: torch.Tensor) -> torch.Tensor:
        """The mean of ``total`` (a fresh contiguous tensor, reduced in place)."""
        dist.all_reduce(total, group=self.group)
        self.calls += 1
        self.bytes += total.numel() * total.element_size()
        return total.div_(self.size)


class AveragedOperator(LinearOperator):
    """``inner``'s products averaged over the group: one all-reduce per product."""

    def __init__(self, inner: LinearOperator, average: GroupAverage):
        self.inner, self.average = inner, average
        self.size, self.dtype, self.device, self.rows = (
            inner.size,
            inner.dtype,
            inner.device,
            inner.rows,
        )

    def mv(self, vector: torch.Tensor) -> torch.Tensor:
        return self.average(self.inner.mv(vector))

    def mm(self, matrix: torch.Tensor) -> torch.Tensor:
        return self.average(self.inner.mm(matrix))

    def rmv(self, vector: torch.Tensor) -> torch.Tensor:
        return self.average(self.inner.rmv(vector))
