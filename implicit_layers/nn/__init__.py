"""Modules built on implicit layers: the deep equilibrium model :class:`DEQ` and the ways to
differentiate it that are not an implicit linear solve."""

from ._deq import DEQ
from ._differentiation import JacobianFree, Phantom, Unrolled

__all__ = ["DEQ", "Phantom", "JacobianFree", "Unrolled"]
