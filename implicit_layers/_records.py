"""What every solve records, and what happens when a solve fails (the ``on_failure`` policy)."""

from __future__ import annotations

import dataclasses
import enum
import math
import sys
import threading
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from types import FrameType
from typing import Any, Literal

import torch

__all__ = [
    "Status",
    "SolveRecord",
    "SolveInfo",
    "LatestRecords",
    "ConvergenceWarning",
    "ConvergenceError",
    "OnFailure",
    "report",
]

OnFailure = Literal["warn", "raise", "ignore"]
ON_FAILURE_CHOICES = ("warn", "raise", "ignore")


class Status(enum.Enum):
    """How a solve ended. The value is the sentence shown to users."""

    CONVERGED = "converged: the residual is within the tolerance"
    MAX_ITER = "did not converge: the iteration budget ran out before the tolerance was met"
    INACCURATE = "did not converge: the final residual is above the tolerance"
    NONFINITE = "failed: a NaN or Inf appeared"
    INDEFINITE = (
        "failed: the system is not positive definite (a search direction p has p.A p <= 0), "
        "and CG needs a symmetric positive definite one"
    )
    UNCHECKED = "finished: the method has no tolerance to judge by; read the residual"


@dataclass(frozen=True)
class SolveRecord:
    """An immutable account of one forward or backward solve.

    Attributes:
        method: the solver's name, e.g. ``"GMRES"`` or the user callable's ``__name__``.
        iterations: iterations made (for a user callable: the products or evaluations it made).
        products: operator applications spent: evaluations of Phi in a forward solve, products
            with ``J^T`` (or ``J``) in a backward solve.
        residual: final absolute residual, ``||Phi(w) - w||`` or ``||b - A x||``. A forward
            solver with ``final_step=True`` (the default) returns ``w + damping (Phi(w) - w)``,
            one step past the ``w`` judged here (the residual of the returned point is then
            smaller when Phi contracts, but not measured).
        relative_residual: ``residual`` over its scale, ``||w||`` or ``||b||``.
        tol, atol: the tolerances judged against (``residual <= atol + tol * scale``).
        status: how the solve ended, see :class:`Status`.
        history: the relative residual at every iteration, the initial one first (if measured);
            for a batch, the worst row's.
        sample_iterations, sample_residuals, sample_converged: for a batch of independent rows
            (a deep equilibrium model's samples, even a batch of one), each row's iterations
            until it met the tolerance (or stopped), the relative residual of the iterate it
            settled on, and whether it converged; empty for a single vector. ``residual`` and
            ``relative_residual`` are then the worst row's. A linear solver (GMRES, CG, ...)
            judges the batch as one system instead: its ``residual`` is the whole batch's, and
            per row it records the batch's iterations, the row's share of the residual over
            its ``||b_i||``, and whether that share meets the rule on its own.
        all_reduces, reduced_bytes: for a solve over a process group (``hypergradient``'s
            ``process_group``), the all-reduces it made (the products and the right-hand side
            and parameter gradients) and the bytes each rank sent into them; 0 otherwise.
    """

    method: str
    iterations: int
    products: int
    residual: float
    relative_residual: float
    tol: float | None
    atol: float | None
    status: Status
    history: tuple[float, ...] = ()
    sample_iterations: tuple[int, ...] = ()
    sample_residuals: tuple[float, ...] = ()
    sample_converged: tuple[bool, ...] = ()
    all_reduces: int = 0
    reduced_bytes: int = 0

    def to_dict(self) -> dict[str, Any]:
        """The record as plain Python numbers, strings and lists, for a logger (tensorboard,
        wandb, a CSV, ``json.dumps``); the status by its name.

        >>> import json
        >>> record = SolveRecord("GMRES", 2, 2, 1e-7, 1e-8, 1e-6, 0.0, Status.CONVERGED)
        >>> json.dumps(record.to_dict())[:60]
        '{"method": "GMRES", "iterations": 2, "products": 2, "residua'
        """
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        fields["status"] = self.status.name
        return {k: list(v) if isinstance(v, tuple) else v for k, v in fields.items()}

    def without_rows(self) -> SolveRecord:
        """This record with no per-row fields: that of one vector, run as a row."""
        return replace(self, sample_iterations=(), sample_residuals=(), sample_converged=())

    @property
    def converged(self) -> bool:
        return self.status is Status.CONVERGED

    @property
    def failed(self) -> bool:
        """True for the statuses the ``on_failure`` policy acts on."""
        return self.status in (
            Status.MAX_ITER,
            Status.INACCURATE,
            Status.NONFINITE,
            Status.INDEFINITE,
        )

    def summary(self) -> str:
        tolerance = "" if self.tol is None else f" (tol {self.tol:.1e})"
        return (
            f"{self.method}: {self.status.value}; {self.iterations} iterations, "
            f"{self.products} products, relative residual {self.relative_residual:.3e}{tolerance}"
        )


@dataclass
class SolveInfo:
    """The records of one call of a layer: ``forward`` at once, ``backward`` once it has run
    (the latest, if the graph is differentiated more than once). A backward run with
    ``create_graph=True`` is itself a layer call: ``adjoint`` holds its info, whose
    ``backward`` is the second-order solve. ``tangent`` is the solve of a forward-mode
    derivative (``torch.func.jvp``, ``jacfwd``)."""

    forward: SolveRecord | None = None
    backward: SolveRecord | None = None
    adjoint: SolveInfo | None = None
    tangent: SolveRecord | None = None

    def to_dict(self) -> dict[str, Any]:
        """Each record as :meth:`SolveRecord.to_dict` (None where no solve ran)."""
        return {
            "forward": None if self.forward is None else self.forward.to_dict(),
            "backward": None if self.backward is None else self.backward.to_dict(),
            "adjoint": None if self.adjoint is None else self.adjoint.to_dict(),
            "tangent": None if self.tangent is None else self.tangent.to_dict(),
        }


class LatestRecords(threading.local):
    """A layer's latest records, one set per thread: a thread reads the records of its own
    latest call, whatever other threads run on the same layer. Also the thread's warm start
    of the backward solve (``previous_backward``).

    A copy (``copy.deepcopy`` of a model, pickling) starts with no records."""

    def __init__(self) -> None:
        self.forward: SolveRecord | None = None
        self.backward: SolveRecord | None = None
        self.tangent: SolveRecord | None = None
        self.previous_backward: Any = None

    def __deepcopy__(self, memo: dict) -> LatestRecords:
        return LatestRecords()

    def __reduce__(self) -> tuple:
        return (LatestRecords, ())


def relative(residual: float, scale: float) -> float:
    if scale > 0:
        return residual / scale
    return 0.0 if residual == 0 else math.inf


class ConvergenceWarning(UserWarning):
    """A forward or backward solve did not converge (``on_failure="warn"``, the default)."""


class ConvergenceError(RuntimeError):
    """A forward or backward solve failed under ``on_failure="raise"``; ``.record`` tells how."""

    def __init__(self, message: str, record: SolveRecord):
        super().__init__(message)
        self.record = record


_ADVICE = {
    ("forward", Status.MAX_ITER): "Increase the solver's `max_iter` or `tol`. For a fixed point "
    "try `Anderson`, or check that Phi contracts in w near the fixed point; for an argmin try "
    "`LBFGS` or a larger `lr`.",
    ("forward", Status.NONFINITE): "Check the function for overflow (a step size too large?) "
    "and the initial guess and params for NaN/Inf.",
    ("forward", Status.INACCURATE): "The minimizer stalled: its line search found no decrease "
    "along the step it proposed. f must be smooth at its minimum (no ReLU kink: try a smooth "
    "activation) and deterministic (no new minibatch per call); or raise `tol` to what the "
    "loss's rounding resolves.",
    ("backward", Status.MAX_ITER): "Increase the backward solver's `max_iter` or `tol`. For a "
    "fixed point use `GMRES` (valid whenever I - J is non-singular): `CG` needs a symmetric "
    "positive definite I - J and `Neumann` a spectral radius of J below 1. For an argmin the "
    "Hessian must be positive definite at w (a strict minimum).",
    ("backward", Status.INACCURATE): "The system is ill-conditioned at w*: solve in float64, or "
    "check that w* is an isolated fixed point or a strict minimum.",
    ("backward", Status.INDEFINITE): "The solution returned is the last iterate before that "
    "direction. For a fixed point use `GMRES` (valid whenever I - J is non-singular). For an "
    "argmin, w is not at a strict minimum (its Hessian has a negative or zero eigenvalue): train "
    "the inner problem further, use `GMRES` (any non-singular system) or add damping with "
    "`Nystrom(rho=...)`.",
    ("backward", Status.NONFINITE): "Check the incoming gradient and the function's derivatives "
    "at w* for NaN/Inf; a breakdown of the method's recurrence also shows as NaN (try `GMRES`).",
}


def describe_failure(record: SolveRecord, stage: str) -> str:
    where = ""
    if record.status is Status.NONFINITE:
        where = f" at iteration {record.iterations}" if record.iterations else " in its input"
    kind = "forward" if stage == "forward" else "backward"  # hypergradient: the same system
    advice = _ADVICE.get((kind, record.status), "")
    return f"{stage} solve {record.summary()}{where}. {advice}".rstrip()


def report(record: SolveRecord, stage: str, on_failure: OnFailure, note: str = "") -> None:
    """Warn, raise or stay quiet about a failed solve, as ``on_failure`` asks."""
    if not record.failed or on_failure == "ignore":
        return
    message = describe_failure(record, stage) + note
    if on_failure == "raise":
        raise ConvergenceError(message, record)
    warnings.warn(message, ConvergenceWarning, stacklevel=_callers_level())


_INSIDE = (str(Path(__file__).parent), str(Path(torch.__file__).parent))


def _callers_level() -> int:
    """The ``stacklevel`` of the first frame outside this package and torch: the user's line
    (the layer call, or ``loss.backward()``; on a device's autograd thread there is none, and
    the warning points at its innermost frame)."""
    frame: FrameType | None = sys._getframe(2)  # the frame that called report
    level = 2
    while frame is not None and frame.f_code.co_filename.startswith(_INSIDE):
        frame, level = frame.f_back, level + 1
    return level if frame is not None else 2


def measured_record(
    method: str,
    *,
    iterations: int,
    products: int,
    residual: float,
    scale: float,
    tol: float | None = None,
    atol: float = 0.0,
) -> SolveRecord:
    """The record of a one-shot solve whose final residual was measured: a direct solve, or a
    user callable (``tol=None``: nothing to judge against, status ``UNCHECKED``)."""
    rel = relative(residual, scale)
    if not math.isfinite(residual):
        status = Status.NONFINITE
    elif tol is None:
        status = Status.UNCHECKED
    elif residual <= atol + tol * scale:
        status = Status.CONVERGED
    else:
        status = Status.INACCURATE
    return SolveRecord(
        method=method,
        iterations=iterations,
        products=products,
        residual=residual,
        relative_residual=rel,
        tol=tol,
        atol=None if tol is None else atol,
        status=status,
        history=(rel,),
    )


def unmeasured_record(method: str, *, iterations: int, products: int, finite: bool) -> SolveRecord:
    """The record of an approximation whose residual is not measured (measuring it would cost
    the products the method exists to save): status ``UNCHECKED``, residual NaN."""
    return SolveRecord(
        method=method,
        iterations=iterations,
        products=products,
        residual=math.nan,
        relative_residual=math.nan,
        tol=None,
        atol=None,
        status=Status.UNCHECKED if finite else Status.NONFINITE,
        history=(),
    )
