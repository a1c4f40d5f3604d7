"""Ways to differentiate a deep equilibrium model that are not an implicit linear solve."""

from __future__ import annotations

from .._options import check_in_interval, check_positive_int, options

__all__ = ["Phantom", "JacobianFree", "Unrolled"]


@options
class Phantom:
    """Phantom gradients (Geng et al., 2021): from ``z*`` (no graph), ``steps`` damped steps
    ``z <- (1 - damping) z + damping f(z, x)`` run with a graph, and the gradient is
    backpropagated through them alone.

    This approximates the implicit gradient ``(I - J)^{-T}`` by the truncated, damped series
    ``damping sum_{i<steps} ((1 - damping) I + damping J)^{iT}`` (exact as ``steps`` grows when
    the iteration contracts). Costs ``steps`` evaluations with a graph in the forward, ``steps``
    vector-Jacobian products in the backward, and keeps ``steps`` evaluations' activations.
    The output is the last step's ``z``, within the forward tolerance of ``z*``.
    """

    steps: int = 5
    damping: float = 0.5

    def __post_init__(self) -> None:
        check_positive_int(self, "steps", self.steps)
        check_in_interval(self, "damping", self.damping, 0.0, 1.0)


def JacobianFree() -> Phantom:
    """Jacobian-free backpropagation (Fung et al., 2022): the gradient through one step
    ``f(z*, x)``, i.e. ``(I - J)^{-T} ~ I``; :class:`Phantom` with one undamped step."""
    return Phantom(steps=1, damping=1.0)


@options
class Unrolled:
    """Backpropagation through every iteration of the forward solver, run with a graph: the
    reference that implicit differentiation avoids. Memory grows with the iterations."""
