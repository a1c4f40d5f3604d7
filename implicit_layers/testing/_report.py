"""What a gradient check found, per direction, and the error it raises when it fails."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .._records import SolveRecord
from ._tolerance import MAX_RESOLUTION

__all__ = ["DirectionCheck", "GradientCheck", "GradientCheckError"]


@dataclass(frozen=True)
class DirectionCheck:
    """One direction ``d`` of a gradient check: ``<g, d>`` against finite differences.

    Attributes:
        index: the direction's number, from 0.
        autograd: ``<g, d>``, the layer's gradient along the displacement actually applied.
        finite_difference: the Richardson extrapolation ``(4 D(eps) - D(2 eps)) / 3`` of the
            central differences ``D(h) = (L(p + h d) - L(p - h d)) / (2 h)`` of re-solved values.
        truncation: ``|D(eps) - D(2 eps)| / 3``, the measured truncation error of ``D(eps)``.
        allowed: the largest ``|autograd - finite_difference|`` that passes:
            ``rtol ||g|| + atol + truncation``.
        forward: the records of this direction's forward re-solves, the worst (largest relative
            residual) per layer.

    >>> from implicit_layers.testing import DirectionCheck
    >>> row = DirectionCheck(0, autograd=1.0, finite_difference=1.01, truncation=0.0,
    ...                      allowed=1e-3, forward=())
    >>> round(row.difference, 6), row.passed
    (0.01, False)
    """

    index: int
    autograd: float
    finite_difference: float
    truncation: float
    allowed: float
    forward: tuple[SolveRecord | None, ...]

    @property
    def difference(self) -> float:
        """``|autograd - finite_difference|``."""
        return abs(self.autograd - self.finite_difference)

    @property
    def passed(self) -> bool:
        """Whether ``difference <= allowed`` (False when either value is NaN)."""
        return self.difference <= self.allowed


@dataclass(frozen=True)
class GradientCheck:
    """The outcome of :func:`check_gradients`: every direction and the tolerance it used.

    Attributes:
        directions: one :class:`DirectionCheck` per direction.
        dtype: the dtype compared in.
        promoted: whether the check ran on a float64 copy of float32 inputs (or module).
        promotion_failure: why the check could not run in float64, or ``None``.
        eps: the finite-difference step.
        rtol: the relative tolerance, relative to ``gradient_norm``.
        atol: the absolute tolerance.
        condition: ``kappa``, the condition number the tolerance assumed.
        forward_tol: ``tau_f``, the relative accuracy of the forward solves it assumed.
        backward_tol: ``tau_b``, the relative accuracy of the backward solves it assumed.
        value_error: ``delta``, the error it allowed in each re-solved value of ``<v, y>``: the
            model's, or the noise the values showed, if larger.
        gradient_norm: ``||g||``, the norm of the autograd gradient of ``<v, y>``.
        layers: the names of the layers whose records were read.
        forward: the forward records of the autograd pass, one per layer.
        backward: the backward records of the autograd pass, one per layer.

    >>> from implicit_layers.testing import check_gradients
    >>> layer = fixed_point_layer(lambda w, c: 0.5 * torch.cos(w) + c,
    ...                           solver=Anderson(tol=1e-12), backward=GMRES(tol=1e-12))
    >>> c = torch.tensor([0.1, 0.2], dtype=torch.float64, requires_grad=True)
    >>> result = check_gradients(layer, (torch.zeros(2, dtype=torch.float64), c))
    >>> result.passed, result.dtype, len(result.directions)
    (True, torch.float64, 3)
    >>> result.resolution < 1e-5
    True
    """

    directions: tuple[DirectionCheck, ...]
    dtype: torch.dtype
    promoted: bool
    promotion_failure: str | None
    eps: float
    rtol: float
    atol: float
    condition: float
    forward_tol: float
    backward_tol: float
    value_error: float
    gradient_norm: float
    layers: tuple[str, ...]
    forward: tuple[SolveRecord | None, ...]
    backward: tuple[SolveRecord | None, ...]

    @property
    def failures(self) -> tuple[DirectionCheck, ...]:
        """The directions that disagree."""
        return tuple(row for row in self.directions if not row.passed)

    @property
    def resolution(self) -> float:
        """The largest tolerance over ``||g||``: the relative error the check can resolve."""
        allowed = max((row.allowed for row in self.directions), default=0.0)
        scale = max([self.gradient_norm] + [abs(r.finite_difference) for r in self.directions])
        if scale == 0:
            return 0.0
        return allowed / scale

    @property
    def conclusive(self) -> bool:
        """Whether the tolerance is below ``MAX_RESOLUTION`` (10%) of the gradient's size."""
        return self.resolution <= MAX_RESOLUTION

    @property
    def passed(self) -> bool:
        """No direction disagrees, and the check was sharp enough to mean it."""
        return not self.failures and self.conclusive

    def report(self) -> str:
        """A readable account: the verdict, the tolerance, a table of the directions and the
        records of the solves."""
        lines = [self._verdict(), self._setting(), ""]
        lines.append(
            f"{'direction':>9}  {'autograd':>16}  {'finite diff.':>16}  "
            f"{'difference':>10}  {'allowed':>10}  {'truncation':>10}"
        )
        for row in self.directions:
            lines.append(
                f"{row.index:>9}  {row.autograd:>16.9e}  {row.finite_difference:>16.9e}  "
                f"{row.difference:>10.3e}  {row.allowed:>10.3e}  {row.truncation:>10.3e}  "
                f"{'ok' if row.passed else 'FAIL'}"
            )
        lines += ["", "records of the autograd pass:"]
        if not self.layers:
            lines.append(
                "  (no layer found: pass `layers=` to read its records; the tolerance assumed "
                f"tau = {self.forward_tol:.1e})"
            )
        for name, forward, backward in zip(self.layers, self.forward, self.backward):
            lines.append(f"  {name} forward:  {_summary(forward)}")
            lines.append(f"  {name} backward: {_summary(backward)}")
        if self.layers:
            lines.append("forward re-solves of each direction (the worst per layer):")
            for row in self.directions:
                for name, record in zip(self.layers, row.forward):
                    lines.append(f"  direction {row.index}, {name}: {_summary(record)}")
        return "\n".join(lines)

    def _verdict(self) -> str:
        count = len(self.directions)
        if self.failures:
            which = ", ".join(str(row.index) for row in self.failures)
            return (
                f"autograd disagrees with finite differences in {len(self.failures)} of {count} "
                f"directions ({which})."
            )
        if not self.conclusive:
            advice = (
                "Tighten the solvers' `tol`, or let the check run in float64."
                if self.layers
                else "Pass the function's layers as `layers=`: the tolerance then follows from "
                "their records instead of an assumed tau = 1e-6."
            )
            return (
                f"inconclusive: the tolerance is {self.resolution:.1%} of the gradient's size "
                f"(above {MAX_RESOLUTION:.0%}), too loose to tell a wrong gradient from a right "
                f"one. {advice}"
            )
        return f"autograd agrees with finite differences in all {count} directions."

    def _setting(self) -> str:
        dtype = str(self.dtype).removeprefix("torch.")
        where = f"compared in {dtype}"
        if self.promoted:
            where += " (promoted)"
        if self.promotion_failure:
            where += f" (float64 was not possible: {self.promotion_failure})"
        return (
            f"{where}; eps = {self.eps:.2e}, ||g|| = {self.gradient_norm:.3e}.\n"
            f"tolerance: rtol = {self.rtol:.2e}, atol = {self.atol:.2e}, from condition "
            f"{self.condition:.3g}, tau_forward {self.forward_tol:.1e}, tau_backward "
            f"{self.backward_tol:.1e}, error of a re-solved value {self.value_error:.1e}."
        )

    def __str__(self) -> str:
        return self.report()


def _summary(record: SolveRecord | None) -> str:
    return "none" if record is None else record.summary()


class GradientCheckError(AssertionError):
    """Raised by :func:`check_gradients` when autograd and finite differences disagree, or when
    the tolerance is too loose for the check to mean anything; ``.result`` holds the
    :class:`GradientCheck` and the message is its report.

    >>> from implicit_layers.testing import GradientCheckError, check_gradients
    >>> class Doubled(torch.autograd.Function):  # y = x, with a backward that doubles
    ...     @staticmethod
    ...     def forward(ctx, x):
    ...         return x.clone()
    ...     @staticmethod
    ...     def backward(ctx, grad):
    ...         return 2 * grad
    >>> x = torch.ones(3, dtype=torch.float64, requires_grad=True)
    >>> try:
    ...     check_gradients(Doubled.apply, (x,))
    ... except GradientCheckError as error:
    ...     print([row.index for row in error.result.failures])
    [0, 1, 2]
    """

    def __init__(self, result: GradientCheck):
        super().__init__(result.report())
        self.result = result
