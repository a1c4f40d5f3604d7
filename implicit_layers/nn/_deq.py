"""``DEQ``: a deep equilibrium model, ``z* = cell(z*, x)``, as an ``nn.Module``."""

from __future__ import annotations

from collections.abc import Callable

import torch

from .._fixed_point_layer import FixedPointLayer
from .._forward import Anderson, ForwardSolver, as_forward_solver
from .._implicit_layer import poisoned_if_nonfinite
from .._linear import GMRES, LinearSolver
from .._records import OnFailure, report
from .._tree import FlatSpace
from ._differentiation import Phantom, Unrolled

__all__ = ["DEQ"]

Backward = LinearSolver | ForwardSolver | Phantom | Unrolled | Callable
DEFAULT_SOLVER = Anderson()
DEFAULT_BACKWARD = GMRES()


class DEQ(FixedPointLayer):
    """A deep equilibrium model: ``forward(x, z0=None)`` returns ``z*`` with ``z* = cell(z*, x)``.

    ``cell(z, x)`` is an ``nn.Module`` (or a function) mapping each sample of a batch on its
    own; ``z`` has the batch in its first dimension. Its parameters, and ``x`` when it requires
    grad, get gradients from ``loss.backward()``, so a DEQ trains inside a larger model with any
    ``torch.optim`` optimizer.

    * ``solver`` finds ``z*``: :class:`Anderson` (default), :class:`Broyden`,
      :class:`FixedPoint`, or a callable ``solver(f, z0)``. Each sample is judged on its own
      and, once it meets the tolerance, keeps improving while the others run (``refine``);
      ``last_forward`` records the worst sample, and each sample's iterations to the tolerance
      and relative residual in ``sample_iterations`` and ``sample_residuals``.
    * ``backward`` says how to differentiate. Implicitly, with the memory of one evaluation of
      the cell, whatever the number of forward iterations: a linear solver on
      ``(I - J)^T u = dL/dz*`` (:class:`GMRES`, default; :class:`BiCGSTAB`, :class:`Neumann`,
      ...), or a forward solver on the adjoint fixed point ``u = J^T u + dL/dz*``
      (:class:`Anderson`, :class:`Broyden`, :class:`FixedPoint`, judged per sample). Or
      approximately: :class:`Phantom` gradients and :func:`JacobianFree` backpropagation; or by
      :class:`Unrolled` backpropagation through the forward iterations.
    * ``z0`` warm-starts the solve (e.g. from the previous batch's ``z*``); by default ``z0`` is
      ``z_init(x)``, zeros shaped like ``x`` unless ``z_init`` is given.

    >>> class Cell(torch.nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.linear = torch.nn.Linear(4, 4)
    ...     def forward(self, z, x):
    ...         return torch.tanh(self.linear(z) + x)
    >>> _ = torch.manual_seed(0)
    >>> cell = Cell()
    >>> _ = cell.linear.weight.data.mul_(0.5 / torch.linalg.matrix_norm(cell.linear.weight, 2))
    >>> deq = DEQ(cell, solver=Anderson(tol=1e-6))
    >>> x = torch.randn(3, 4, requires_grad=True)
    >>> z = deq(x)
    >>> bool(torch.allclose(z, cell(z, x), atol=1e-5))
    True
    >>> len(deq.last_forward.sample_iterations)  # one entry per sample
    3
    >>> z.sum().backward()
    >>> x.grad.shape, cell.linear.weight.grad.shape, deq.last_backward.method
    (torch.Size([3, 4]), torch.Size([4, 4]), 'GMRES')
    """

    _function_name = "cell"
    _start_name = "z0"

    def __init__(
        self,
        cell: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        solver: ForwardSolver | Callable = DEFAULT_SOLVER,
        backward: Backward = DEFAULT_BACKWARD,
        *,
        z_init: Callable[[torch.Tensor], torch.Tensor] | None = None,
        on_failure: OnFailure = "warn",
        warm_start: bool = False,
    ):
        self._mode = backward if isinstance(backward, (Phantom, Unrolled)) else None
        super().__init__(
            cell,
            solver=solver,
            backward=DEFAULT_BACKWARD if self._mode is not None else backward,
            on_failure=on_failure,
            warm_start=warm_start,
        )
        if z_init is not None and not callable(z_init):
            raise TypeError(f"`z_init` must be a callable x -> z0, got {type(z_init).__name__}.")
        self.z_init = z_init

    def extra_repr(self) -> str:
        backward = self._mode if self._mode is not None else self.backward_solver
        return f"solver={self.solver!r}, backward={backward!r}"

    def forward(self, x: torch.Tensor, z0: torch.Tensor | None = None) -> torch.Tensor:
        """``z*`` for the batch ``x``, from ``z0`` (default ``z_init(x)``, or zeros like x)."""
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"`x` must be a torch.Tensor, got {type(x).__name__}.")
        if z0 is None:
            z0 = torch.zeros_like(x) if self.z_init is None else self.z_init(x)
        if not isinstance(z0, torch.Tensor) or z0.ndim == 0:
            raise ValueError(
                f"`z0` must be a tensor with the batch in its first dimension, got {z0!r:.60}."
            )
        if x.ndim > 0 and z0.shape[0] != x.shape[0]:
            raise ValueError(
                f"`z0` and `x` must share their batch dimension: z0 has {z0.shape[0]} rows, x "
                f"{x.shape[0]}."
            )
        if self._mode is None:
            return self.solve(z0, x)[0]
        if isinstance(self._mode, Unrolled):
            return self._unrolled(z0.detach(), x)
        return self._phantom(z0.detach(), x)

    def _rows(self, space: FlatSpace) -> int:
        return space.shapes[0][0]

    def _find(self, cell, space, params, w0):
        rows = self._rows(space)
        (x,) = params

        def f(z: torch.Tensor) -> torch.Tensor:
            out = space.check(cell(space.unflatten(z.reshape(-1)), x), "the cell's output")
            return space.flatten_leaves(out).view(rows, -1)

        z, record = as_forward_solver(self.solver, space).solve(f, w0.view(rows, -1))
        return z.reshape(-1), record

    def _run_cell(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        out = self.cell(z, x)
        FlatSpace(z, "z0").check(out, "the cell's output")
        return out

    def _solve_without_graph(self, z0: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        space = FlatSpace(z0, "z0")
        with torch.no_grad():
            z, record = self._find(self.cell, space, (x.detach(),), space.flatten(z0))
        self.last_forward, self.last_backward = record, None
        report(record, "forward", self.on_failure)
        return space.unflatten(poisoned_if_nonfinite(z, record))

    def _phantom(self, z0: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        z = self._solve_without_graph(z0, x)
        damping = self._mode.damping
        for _ in range(self._mode.steps):
            z = (
                (1 - damping) * z + damping * self._run_cell(z, x)
                if damping < 1
                else (self._run_cell(z, x))
            )
        return z

    def _unrolled(self, z0: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        space = FlatSpace(z0, "z0")
        with torch.enable_grad():
            z, record = self._find(self.cell, space, (x,), space.flatten(z0))
        self.last_forward, self.last_backward = record, None
        report(record, "forward", self.on_failure)
        return space.unflatten(poisoned_if_nonfinite(z, record))

    def jacobian_penalty(self, z: torch.Tensor, x: torch.Tensor, samples: int = 1) -> torch.Tensor:
        """A Hutchinson estimate of ``||J||_F^2 / n`` at ``z`` (Bai et al., 2021), differentiable
        in the cell's parameters and ``x``: add ``gamma * penalty`` to the loss to keep the
        equilibrium well conditioned. ``E ||e^T J||^2 = ||J||_F^2`` for ``e ~ N(0, I)``; the
        estimate averages ``samples`` draws and divides by ``n``, the entries of ``z``, so it
        estimates the mean squared singular value of ``J`` (per sample of the batch, averaged).
        """
        if not isinstance(samples, int) or samples < 1:
            raise ValueError(f"`samples` must be an int >= 1, got {samples!r}.")
        z = z.detach().requires_grad_()
        with torch.enable_grad():
            out = self._run_cell(z, x)
            total = out.new_zeros(())
            for _ in range(samples):
                noise = torch.randn_like(out)
                (vjp,) = torch.autograd.grad(out, z, noise, create_graph=True, retain_graph=True)
                total = total + vjp.pow(2).sum()
        return total / (samples * z.numel())
