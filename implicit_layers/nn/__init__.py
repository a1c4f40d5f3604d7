"""Modules built on implicit layers: the deep equilibrium model :class:`DEQ`. ``Phantom``,
``JacobianFree`` and ``Unrolled`` are the top-level names, kept here as aliases."""

from .._layers import JacobianFree, Phantom, Unrolled
from ._deq import DEQ

__all__ = ["DEQ", "Phantom", "JacobianFree", "Unrolled"]
