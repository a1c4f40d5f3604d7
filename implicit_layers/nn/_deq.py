"""``DEQ``: a deep equilibrium model, ``z* = cell(z*, x)``, as an ``nn.Module``."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from contextvars import ContextVar
from typing import Any

import torch

from .._compat import retained_vjp
from .._forward import Anderson, ForwardSolver
from .._forward._base import step_towards
from .._layers import FixedPointEquation, FixedPointLayer, Phantom
from .._linear import GMRES
from .._records import OnFailure
from .._tree import FlatSpace, tree_flatten, tree_unflatten

__all__ = ["DEQ"]

DEFAULT_SOLVER = Anderson()
DEFAULT_BACKWARD = GMRES()
DEFAULT_STATE_BACKWARD = Phantom(steps=1, damping=1.0)  # torchdeq's grad=1, tau=1


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
    * ``eval_factor`` multiplies the forward solver's ``max_iter`` in eval mode
      (``deq.eval()``), as torchdeq's does: a test-time budget larger than the training one.
    * :meth:`spectral_radius` estimates ``rho(J)`` at ``z*`` per sample (torchdeq's
      ``sradius``), :meth:`jacobian_penalty` regularises ``||J||_F``.
    * ``n_states > 1`` returns a list of states along the forward solve for fixed-point
      correction (Bai et al., 2022; torchdeq's ``n_states``/``indexing``): the solver's
      iterates after ``indexing`` steps (default: ``max_iter`` split evenly), each passed
      through ``state_backward``'s damped steps with a graph (a
      :class:`Phantom`, by default one undamped step: torchdeq's ``grad=1``), so each has its
      own gradient; the last entry is ``z*`` with the layer's ``backward``. A solve that ends
      before an index gives ``z*``'s steps in its place.

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

    def __init__(
        self,
        cell: Callable[..., Any],
        solver: ForwardSolver | Callable = DEFAULT_SOLVER,
        backward: Any = DEFAULT_BACKWARD,
        *,
        z_init: Callable[[Any], Any] | None = None,
        eval_factor: float = 1.0,
        n_states: int = 1,
        indexing: Sequence[int] | None = None,
        state_backward: Phantom = DEFAULT_STATE_BACKWARD,
        on_failure: OnFailure = "warn",
        warm_start: bool = False,
    ):
        super().__init__(
            cell,
            solver,
            backward,
            on_failure,
            warm_start,
            per_sample=True,
            equation=FixedPointEquation("cell", "z0", "the cell's output"),
        )
        if z_init is not None and not callable(z_init):
            raise TypeError(f"`z_init` must be a callable x -> z0, got {type(z_init).__name__}.")
        self.z_init = z_init
        number = isinstance(eval_factor, (int, float)) and not isinstance(eval_factor, bool)
        if not number or not eval_factor > 0:
            raise ValueError(f"`eval_factor` must be a positive number, got {eval_factor!r}.")
        self.eval_factor = eval_factor
        if isinstance(n_states, bool) or not isinstance(n_states, int) or n_states < 1:
            raise ValueError(f"`n_states` must be an int >= 1, got {n_states!r}.")
        if n_states > 1 and not hasattr(solver, "max_iter"):
            raise TypeError(
                "`n_states` > 1 records the iterates of an iterative forward solver (FixedPoint, "
                f"Anderson, Broyden); got {solver!r:.60}."
            )
        if indexing is not None and (
            len(indexing) != n_states - 1
            or any(isinstance(i, bool) or not isinstance(i, int) or i < 1 for i in indexing)
        ):
            raise ValueError(
                f"`indexing` must hold n_states - 1 = {n_states - 1} evaluation counts >= 1 (the "
                f"last state is z*), got {indexing!r}."
            )
        if not isinstance(state_backward, Phantom):
            raise TypeError(
                f"`state_backward` must be a Phantom(steps, damping), got {state_backward!r:.60}."
            )
        self.n_states, self.state_backward = n_states, state_backward
        self.indexing = None if indexing is None else tuple(indexing)

    def forward_solver(self) -> Any:
        """The solver, with ``max_iter`` times ``eval_factor`` (rounded down, as torchdeq's) in
        eval mode, and recording the iterates of ``n_states`` when this call asks for them."""
        solver, budget = self.solver, getattr(self.solver, "max_iter", None)
        if not (self.training or self.eval_factor == 1 or budget is None):
            solver = dataclasses.replace(solver, max_iter=max(1, int(budget * self.eval_factor)))
        recorder = _RECORDER.get()
        return solver if recorder is None else recorder.around(solver)

    def _indices(self) -> tuple[int, ...]:
        if self.indexing is not None:
            return self.indexing
        budget = self.forward_solver().max_iter
        return tuple(max(1, budget * (i + 1) // self.n_states) for i in range(self.n_states - 1))

    def _states(self, z0: Any, x: Any) -> list[Any]:
        """``n_states`` states: the recorded iterates' damped steps, then ``z*``."""
        recorder = _Recorder(self._indices())
        token = _RECORDER.set(recorder)
        try:
            z_star = self.solve(z0, x)[0]
        finally:
            _RECORDER.reset(token)
        space = FlatSpace(z0, "z0", per_sample=True)

        def step(w: torch.Tensor) -> torch.Tensor:
            out = self.function(space.unflatten(w), x)
            return space.flatten_leaves(space.check(out, "the cell's output"))

        states = []
        for index in recorder.at:
            iterate = recorder.iterates.get(index)
            w = (space.flatten(z_star) if iterate is None else iterate.reshape(-1)).detach()
            with torch.enable_grad():
                for _ in range(self.state_backward.steps):
                    w = step_towards(w, step(w), self.state_backward.damping)
            states.append(space.unflatten(w))
        return states + [z_star]

    def forward(self, x: Any, z0: Any = None) -> Any:
        """``z*`` for the batch ``x``, from ``z0`` (default ``z_init(x)``, or zeros like x).

        ``x`` and ``z0`` are tensors or pytrees of tensors, each with the batch first."""
        leaves = [leaf for leaf in tree_flatten(x)[0] if isinstance(leaf, torch.Tensor)]
        if not leaves:
            raise TypeError(
                f"`x` must be a torch.Tensor or a pytree of tensors, got {type(x).__name__}."
            )
        if z0 is None and self.z_init is not None:
            z0 = self.z_init(x)
        if z0 is not None:
            _check_batch(z0, leaves)
            return self._states(z0, x) if self.n_states > 1 else self.solve(z0, x)[0]
        odd = [leaf.dtype for leaf in leaves if not (leaf.is_floating_point() or leaf.is_complex())]
        if odd:
            raise TypeError(
                f"`x` holds a tensor of dtype {odd[0]}: with neither `z0` nor `z_init` the state "
                "starts at zeros_like(x), which must be floating-point. Convert x (x.float()), "
                "or pass z0 (DEQ.forward(x, z0)) or z_init (DEQ(cell, z_init=...))."
            )
        z0 = _zeros_like(x)
        try:
            return self._states(z0, x) if self.n_states > 1 else self.solve(z0, x)[0]
        except (RuntimeError, ValueError, TypeError) as error:
            raise ValueError(
                "DEQ: the solve failed from z0 = zeros_like(x), the default when neither `z0` "
                "(DEQ.forward(x, z0)) nor `z_init` (DEQ(cell, z_init=...)) is given; if the state "
                f"z does not have the shape of x, pass one of them. The error: {error}"
            ) from error

    def spectral_radius(self, z: Any, x: Any, iterations: int = 50) -> torch.Tensor:
        """An estimate of the spectral radius of ``J = d cell / dz`` at ``z``, one per sample
        (shape ``(batch,)``), by ``iterations`` steps of the power method on ``J^T`` (vector-
        Jacobian products: ``J^T`` has the eigenvalues of ``J``): ``v <- J^T v / ||J^T v||``
        per sample, the estimate ``||J^T v||`` for a unit ``v``. It converges to ``rho(J)``
        when one real eigenvalue dominates; with a complex pair on top it oscillates around it.
        Not differentiable (a diagnostic, as torchdeq's ``sradius``); ``rho(J) < 1`` is what
        the adjoint fixed-point and Neumann backwards need.
        """
        if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 1:
            raise ValueError(f"`iterations` must be an int >= 1, got {iterations!r}.")
        space = FlatSpace(z, "z", per_sample=True)
        leaves = [leaf.detach().requires_grad_() for leaf in tree_flatten(z)[0]]
        with torch.enable_grad():
            out = space.check(
                self.function(tree_unflatten(space.spec, leaves), x), "the cell's output"
            )
        rows = space.rows or 1
        v = torch.randn(rows, space.size // rows, dtype=space.dtype, device=space.device)
        estimate = v.new_zeros(rows).real
        for _ in range(iterations):
            v = v / torch.linalg.vector_norm(v, dim=1, keepdim=True)
            products = retained_vjp(out, leaves, space.unflatten_leaves(v.reshape(-1)))
            v = space.flatten_leaves(
                [torch.zeros_like(t) if g is None else g for g, t in zip(products, leaves)]
            ).reshape(rows, -1)
            estimate = torch.linalg.vector_norm(v, dim=1)
        return estimate.detach()

    def jacobian_penalty(self, z: Any, x: Any, samples: int = 1) -> torch.Tensor:
        """A Hutchinson estimate of ``||J||_F^2 / n`` at ``z`` (Bai et al., 2021), differentiable
        in the cell's parameters and ``x``: add ``gamma * penalty`` to the loss to keep the
        equilibrium well conditioned. ``E ||e^T J||^2 = ||J||_F^2`` for ``e ~ N(0, I)``; the
        estimate averages ``samples`` draws and divides by ``n``, the entries of ``z``, so it
        estimates the mean squared singular value of ``J`` (per sample of the batch, averaged).
        ``z`` may be a pytree, as the state of the DEQ.
        """
        if not isinstance(samples, int) or samples < 1:
            raise ValueError(f"`samples` must be an int >= 1, got {samples!r}.")
        space = FlatSpace(z, "z", per_sample=True)
        leaves = [leaf.detach().requires_grad_() for leaf in tree_flatten(z)[0]]
        with torch.enable_grad():
            state = tree_unflatten(space.spec, leaves)
            out = space.check(self.function(state, x), "the cell's output")
            total = out[0].new_zeros(())
            for _ in range(samples):
                noise = [torch.randn_like(leaf) for leaf in out]
                vjps = torch.autograd.grad(out, leaves, noise, create_graph=True, retain_graph=True)
                total = total + sum(vjp.pow(2).sum() for vjp in vjps)
        return total / (samples * space.size)


def _zeros_like(x: Any) -> Any:
    """Zeros shaped like each tensor leaf of ``x`` (the default ``z0``)."""
    leaves, spec = tree_flatten(x)
    return tree_unflatten(
        spec,
        [torch.zeros_like(leaf) if isinstance(leaf, torch.Tensor) else leaf for leaf in leaves],
    )


def _check_batch(z0: Any, x_leaves: list[torch.Tensor]) -> None:
    """``z0`` holds tensors with the batch of ``x`` first."""
    z_leaves = tree_flatten(z0)[0]
    if not z_leaves or not all(isinstance(t, torch.Tensor) and t.ndim > 0 for t in z_leaves):
        raise ValueError(
            "`z0` must be a tensor, or a pytree of tensors, with the batch in its first "
            f"dimension; got {z0!r:.60}."
        )
    batch = z_leaves[0].shape[0]
    for leaf in x_leaves:
        if leaf.ndim > 0 and leaf.shape[0] != batch:
            raise ValueError(
                f"`z0` and `x` must share their batch dimension: z0 has {batch} rows, x "
                f"{leaf.shape[0]}."
            )


class _Recorder:
    """The solver's iterates after ``at`` steps (each the one it hands the cell next)."""

    def __init__(self, at: Sequence[int]):
        self.at = tuple(at)
        self.iterates: dict[int, torch.Tensor] = {}

    def around(self, solver: ForwardSolver) -> ForwardSolver:
        return _RecordingSolver(solver, self)


class _RecordingSolver(ForwardSolver):
    """``solver``, with the cell's evaluations counted and the chosen iterates kept."""

    def __init__(self, solver: ForwardSolver, recorder: _Recorder):
        self.solver, self.recorder = solver, recorder

    @property
    def method(self) -> str:
        return self.solver.method

    def _run(self, f, w0):
        wanted, iterates, count = set(self.recorder.at), self.recorder.iterates, 0

        def recording(w: torch.Tensor) -> torch.Tensor:
            nonlocal count
            if count in wanted:  # the iterate after `count` steps, handed to evaluation count+1
                iterates[count] = w.detach().clone()
            count += 1
            return f(w)

        return self.solver.solve(recording, w0)


_RECORDER: ContextVar[_Recorder | None] = ContextVar("implicit_layers_deq_states", default=None)
