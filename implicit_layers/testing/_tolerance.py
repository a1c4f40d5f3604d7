"""The error model of a finite-difference gradient check, from the solvers' tolerances.

Notation: ``u`` is the unit roundoff of the dtype compared in, ``kappa`` the condition number of
the backward system (``I - J`` for a fixed point, the Hessian for an argmin), ``tau_f`` and
``tau_b`` the relative accuracies of the forward and backward solves (their ``tol``, read from
the layers' records; see :func:`forward_accuracy` and :func:`backward_accuracy`),
``G = ||g||`` the norm of the autograd gradient of ``L = <v, y>`` (``||v|| = 1``),
``Y = ||y||`` the size of the output, ``n`` the output's size and ``m`` the number of checked
parameters.

* A solve to relative residual ``tau`` of a system with condition number ``kappa`` is accurate
  to ``kappa tau`` relative. The backward's ``x`` thus carries ``kappa tau_b``; the forward's
  ``w`` carries ``kappa tau_f``, which moves the point where ``J`` and ``dPhi/dp`` are taken by
  as much. Rounding adds ``sqrt(n + m) u kappa``. So the autograd directional derivative
  ``<g, d>`` (``||d|| = 1``) is off by at most ``rtol G``,
  ``rtol = SAFETY kappa (tau_f + tau_b + sqrt(n + m) u)``.
* Each re-solved value of ``L`` is off by ``delta = (sqrt(n) u + kappa tau_f) Y``. A central
  difference with step ``eps`` turns that into ``delta / eps``; the Richardson combination of
  the differences at ``eps`` and ``2 eps`` into at most ``1.5 delta / eps``, so
  ``atol = SAFETY 1.5 delta / eps``. Since a solver may stop short of its tolerance without
  knowing it (a stalled line search), the check also measures ``delta``: the fourth difference
  ``(L(2e) + L(-2e) - 2 L(0)) - 4 (L(e) + L(-e) - 2 L(0))`` of the same values is ``O(e^4)``
  for a smooth ``L`` and at most ``14 delta`` in size, so ``|N| / 14`` bounds the noise present
  from below; ``delta`` is the larger of the two.
* The truncation error of a central difference is ``eps^2 L''' / 6 = O(eps^2)``; it is measured
  per direction, as ``|D(eps) - D(2 eps)| / 3``, and added.
* The default ``eps`` balances truncation, ``eps^2`` on a unit length scale, against the noise,
  ``(delta / Y) / eps``: ``eps = (sqrt(n) u + kappa tau_f)^(1/3)``, times the size of the
  parameters when they exceed 1, and at most 0.1 of it. For exact solves this is the textbook
  ``u^(1/3)`` of the dtype (6e-6 in float64, 5e-3 in float32).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

from .._records import SolveRecord

__all__ = [
    "SAFETY",
    "ASSUMED_TOL",
    "MAX_RESOLUTION",
    "forward_accuracy",
    "backward_accuracy",
    "roundoff",
    "default_eps",
    "gradient_rtol",
    "value_noise",
    "difference_atol",
]

SAFETY = 10.0  # room for the constants the norm-wise bounds leave out
ASSUMED_TOL = 1e-6  # the library's default solver tol, assumed where no record can be read
MAX_RESOLUTION = 0.1  # a check allowing more than 10% of |grad| per direction is inconclusive


def forward_accuracy(records: Iterable[SolveRecord | None]) -> float:
    """``tau_f``: the relative accuracy the forward solves in ``records`` vouch for, the largest.

    A record with a tolerance vouches for ``tol + atol / scale``, or for its relative residual if
    that is larger (a failed solve). A smaller measured residual is not trusted: a minimizer that
    stops on its step size records a zero step when its line search stalls, with ``w`` still off.
    A record without a tolerance (a user callable) vouches for its measured relative residual;
    one with nothing measured, and no record at all, for :data:`ASSUMED_TOL`.
    """
    values = []
    for record in records:
        if record is None:
            continue
        measured = record.relative_residual
        if record.tol is not None:
            promised = _promised(record)
            values.append(max(promised, measured) if math.isfinite(measured) else promised)
        elif math.isfinite(measured):
            values.append(measured)
        else:
            values.append(ASSUMED_TOL)
    return max(values, default=ASSUMED_TOL)


def backward_accuracy(records: Iterable[SolveRecord | None]) -> float:
    """``tau_b``: the relative accuracy the backward solves in ``records`` were asked for.

    Unlike the forward's, a backward's error is not forgiven because it was recorded: a
    backward that stopped short of its ``tol`` gives a wrong gradient, and the check must say so.
    A record without a tolerance (a user callable) is held to its measured residual, but to no
    more than :data:`ASSUMED_TOL`, so that a callable returning a poor solution fails.
    """
    values = []
    for record in records:
        if record is None:
            continue
        if record.tol is not None:
            values.append(_promised(record))
        elif math.isfinite(record.relative_residual):
            values.append(min(record.relative_residual, ASSUMED_TOL))
        else:
            values.append(ASSUMED_TOL)
    return max(values, default=ASSUMED_TOL)


def _promised(record: SolveRecord) -> float:
    """``tol + atol / scale``, the relative residual the record's stopping rule allows."""
    promised = record.tol or 0.0
    measured = record.relative_residual
    if record.atol and record.residual > 0 and math.isfinite(measured) and measured > 0:
        promised += record.atol * measured / record.residual  # atol / scale
    return promised


def roundoff(dtypes: Iterable[torch.dtype]) -> float:
    """``u``: the machine epsilon of the least precise of ``dtypes``."""
    return max((torch.finfo(dtype).eps for dtype in dtypes), default=torch.finfo(torch.float64).eps)


def default_eps(u: float, condition: float, forward_tol: float, size: int, scale: float) -> float:
    """``eps = min((sqrt(size) u + kappa tau_f)^(1/3), 0.1) * max(1, scale)``."""
    noise = math.sqrt(size) * u + condition * forward_tol
    return min(noise ** (1 / 3), 0.1) * max(1.0, scale)


def gradient_rtol(
    u: float, condition: float, forward_tol: float, backward_tol: float, size: int
) -> float:
    """``SAFETY kappa (tau_f + tau_b + sqrt(size) u)``, relative to ``||g||``."""
    return SAFETY * condition * (forward_tol + backward_tol + math.sqrt(size) * u)


def value_noise(u: float, condition: float, forward_tol: float, size: int, value: float) -> float:
    """``delta = (sqrt(size) u + kappa tau_f) ||y||``: the error of one re-solved ``<v, y>``."""
    return (math.sqrt(size) * u + condition * forward_tol) * value


def difference_atol(noise: float, eps: float) -> float:
    """``SAFETY 1.5 delta / eps``: the noise of the Richardson difference."""
    return SAFETY * 1.5 * noise / eps
