"""``hypergradient``: the total derivative of an outer loss through an inner minimiser."""

from __future__ import annotations

import abc
import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch

from ._compat import loss_gradients
from ._distributed import AveragedOperator, GroupAverage
from ._layers import implicit_solver
from ._layers._residual import ROOT, ImplicitOperator, ResidualGraph
from ._layers.argmin import DEFAULT_HESSIAN_SOLVER, _scalar, gradient_residual
from ._linear import LinearSolver, Neumann
from ._operator import LinearOperator
from ._options import check_in_interval, check_positive_int, options
from ._records import OnFailure, SolveRecord, Status, relative, report, unmeasured_record
from ._tree import FlatSpace, TreeSpec, tree_flatten, tree_unflatten

__all__ = ["hypergradient", "HypergradientMethod", "FiniteDifference", "StochasticAID"]


def hypergradient(
    inner_loss: Callable[[Any, Any], torch.Tensor],
    outer_loss: Callable[[Any, Any], torch.Tensor],
    w: Any,
    lam: Any,
    method: LinearSolver | HypergradientMethod | Callable = DEFAULT_HESSIAN_SOLVER,
    on_failure: OnFailure = "warn",
    process_group: Any = None,
    resample: bool = False,
) -> tuple[Any, SolveRecord]:
    """The hypergradient ``d/dlam g(w*(lam), lam)`` at ``w ~ w*(lam) = argmin f(., lam)``.

    With ``f = inner_loss``, ``g = outer_loss``, ``H = grad^2_ww f`` and ``b = grad_w g``:
    ``dg/dlam = grad_lam g - (grad^2_{lam w} f)^T H^{-1} b``, the direct term plus the implicit
    term. ``method`` solves ``H x = b``: :class:`CG` (default), :class:`Neumann` (its ``step``
    is the inner learning rate of hypergrad's and Betty's Neumann method; HyperTorch's
    ``fixed_point`` is the same iteration), :class:`NormalCG`, :class:`GMRES`,
    :class:`Nystrom`, :class:`Direct`, a callable ``(matvec, b) -> x``, or an approximation of
    the implicit term as a whole: :class:`FiniteDifference` (Betty's DARTS method) or
    :class:`StochasticAID` (HyperTorch's). ``w`` and ``lam`` are
    tensors or pytrees (e.g. ``dict(model.named_parameters())``); the result has ``lam``'s
    structure, and comes with the record of the linear solve (the policy ``on_failure`` applies).

    With ``process_group`` (e.g. ``torch.distributed.group.WORLD``) each rank's losses are the
    means over its shard of the data (shards of equal size): the outer gradients, every
    product of the solve and the parameter gradients are averaged over the group, so every rank
    gets the hypergradient of the whole data, with the same iterations (the record counts the
    all-reduces: one per product, plus two). Linear solvers only.

    With ``resample=True`` every product, and the parameter gradient, evaluates ``inner_loss``
    afresh, so a loss that draws a minibatch per call (from the user's iterator) gives each
    product its own minibatch (Lorraine et al., 2020). Only :class:`Neumann` applies: its
    series is a product of independent factors ``I - step H_i``, whose expectation is the
    series of the full-data ``H``, so the estimate is unbiased for the truncated series (and
    for the hypergradient as that converges); its variance grows with ``k`` and shrinks with
    the batch. Each product costs one more evaluation of the loss with its gradient graph.

    >>> X, y = torch.randn(30, 3, dtype=torch.float64), torch.randn(30, dtype=torch.float64)
    >>> inner = lambda w, lam: ((X @ w - y) ** 2).mean() + lam * (w * w).sum()
    >>> outer = lambda w, lam: (w ** 2).sum()
    >>> lam = torch.tensor(0.5, dtype=torch.float64)
    >>> H = 2 * X.T @ X / 30 + 2 * lam * torch.eye(3, dtype=torch.float64)
    >>> w = torch.linalg.solve(H, 2 * X.T @ y / 30)
    >>> grad, record = hypergradient(inner, outer, w, lam)
    >>> exact = -(2 * w) @ torch.linalg.solve(H, 2 * w)
    >>> bool(torch.isclose(grad, exact)), record.method
    (True, 'CG')
    """
    grads, record, _ = hypergradient_and_loss(
        inner_loss, outer_loss, w, lam, method, on_failure, process_group, resample
    )
    return grads, record


def hypergradient_and_loss(
    inner_loss: Callable[[Any, Any], torch.Tensor],
    outer_loss: Callable[[Any, Any], torch.Tensor],
    w: Any,
    lam: Any,
    method: LinearSolver | HypergradientMethod | Callable = DEFAULT_HESSIAN_SOLVER,
    on_failure: OnFailure = "warn",
    process_group: Any = None,
    resample: bool = False,
) -> tuple[Any, SolveRecord, torch.Tensor]:
    """:func:`hypergradient`, and the outer loss it evaluated on the way (detached; this
    rank's own over a process group)."""
    if process_group is not None and isinstance(method, HypergradientMethod):
        raise NotImplementedError(
            f"hypergradient: `process_group` works with the linear solvers (CG, GMRES, "
            f"Neumann, ...), not {type(method).__name__}."
        )
    if resample and not isinstance(method, Neumann):
        raise ValueError(
            "hypergradient: `resample=True` draws a new minibatch for every product, which only "
            f"Neumann's series averages correctly; got {type(method).__name__} (Krylov methods "
            "and direct solves assume one fixed Hessian)."
        )
    average = None if process_group is None else GroupAverage(process_group)
    space = FlatSpace(w, "w")
    lam_leaves, lam_spec = tree_flatten(lam)
    for index, leaf in enumerate(lam_leaves):
        if not (isinstance(leaf, torch.Tensor) and leaf.dtype.is_floating_point):
            where = "lam" if lam_spec.kind == "leaf" else f"lam (leaf {index})"
            raise TypeError(f"`{where}` must be a floating-point tensor, got {leaf!r:.60}.")
    inner = InnerProblem(inner_loss, space, space.flatten(w).detach(), lam_spec, lam_leaves)
    with torch.enable_grad():
        w_vars = [leaf.detach().requires_grad_() for leaf in space.unflatten_leaves(inner.w)]
        lam_vars = [leaf.detach().requires_grad_() for leaf in lam_leaves]
        outer = _scalar(
            outer_loss(tree_unflatten(space.spec, w_vars), tree_unflatten(lam_spec, lam_vars))
        )
        found = loss_gradients(outer, w_vars + lam_vars)
    grads = [torch.zeros_like(v) if g is None else g for g, v in zip(found, w_vars + lam_vars)]
    if average is not None:
        grads = average.many(grads)
    b, direct = space.flatten_leaves(grads[: len(w_vars)]), grads[len(w_vars) :]

    if isinstance(method, HypergradientMethod):
        implicit, record = method.implicit_term(inner, b)
    else:
        graph = inner.graph()
        operator: LinearOperator = _Resampled(inner) if resample else ImplicitOperator(graph)
        if average is not None:
            operator = AveragedOperator(operator, average)
        x, record = implicit_solver(method).solve(operator, b)
        graph = inner.graph() if resample else graph  # a fresh minibatch for this term too
        implicit = graph.param_grads(x)  # type: ignore[assignment]  # every lam needs grad
        if average is not None:
            implicit = average.many(implicit)  # type: ignore[arg-type]
            record = replace(record, all_reduces=average.calls, reduced_bytes=average.bytes)
    report(record, "hypergradient", on_failure)
    total = [d + i for d, i in zip(direct, implicit)]
    return tree_unflatten(lam_spec, total), record, outer.detach()


@dataclass(frozen=True)
class InnerProblem:
    """The inner loss at ``(w, lam)``, as the hypergradient methods need it."""

    loss: Callable[[Any, Any], torch.Tensor]
    space: FlatSpace
    w: torch.Tensor  # flat
    lam_spec: TreeSpec
    lam: list[torch.Tensor]

    def graph(self) -> ResidualGraph:
        """``grad_w f`` at ``(w, lam)`` with a graph (the inner loss is evaluated afresh, so a
        loss that samples a minibatch per call gives a new sample)."""
        return ResidualGraph(
            gradient_residual(self.loss),
            self.space,
            lambda tensors: (tree_unflatten(self.lam_spec, list(tensors)),),
            self.w,
            self.lam,
            [True] * len(self.lam),
            ROOT,
        )

    def lam_gradient(self, w: torch.Tensor) -> list[torch.Tensor]:
        """``grad_lam f(w, lam)``: first order only."""
        with torch.enable_grad():
            lam_vars = [leaf.detach().requires_grad_() for leaf in self.lam]
            loss = _scalar(
                self.loss(self.space.unflatten(w), tree_unflatten(self.lam_spec, lam_vars))
            )
            grads = torch.autograd.grad(loss, lam_vars, allow_unused=True)
        return [torch.zeros_like(v) if g is None else g for g, v in zip(grads, lam_vars)]


class _Resampled(LinearOperator):
    """``H`` from a fresh evaluation of the inner loss at every product (``resample``)."""

    def __init__(self, inner: InnerProblem):
        self.inner = inner
        self.size, self.dtype, self.device = inner.space.size, inner.space.dtype, inner.space.device

    def mv(self, vector: torch.Tensor) -> torch.Tensor:
        return self.inner.graph().vjp_w(vector)


class HypergradientMethod(abc.ABC):
    """An approximation of the implicit term ``-(grad^2_{lam w} f)^T H^{-1} b`` that is not a
    linear solve on one Hessian (a linear solver object covers that case)."""

    @abc.abstractmethod
    def implicit_term(
        self, inner: InnerProblem, b: torch.Tensor
    ) -> tuple[list[torch.Tensor], SolveRecord]: ...


@options
class FiniteDifference(HypergradientMethod):
    """Betty's finite-difference (DARTS) hypergradient: ``H^{-1} ~ step I`` and the mixed
    product by central differences of first-order gradients,
    ``-(grad_lam f(w + eps x) - grad_lam f(w - eps x)) / (2 eps)``, ``x = step b``,
    ``eps = radius / ||x||``.

    No second-order graph is built: two gradient evaluations in all. ``step = 1`` is Betty's
    re-interpretation; the inner learning rate gives DARTS' one-step approximation. It ignores
    the curvature of ``f`` (exact only when ``H = I / step``), so it is biased: its residual
    is not measured (status ``UNCHECKED``).

    >>> inner = lambda w, lam: 0.5 * (w * w).sum() - lam @ w   # H = I: exact here
    >>> outer = lambda w, lam: (w ** 2).sum()
    >>> lam = torch.tensor([1.0, 2.0], dtype=torch.float64)
    >>> grad, record = hypergradient(inner, outer, lam.clone(), lam, method=FiniteDifference())
    >>> torch.allclose(grad, torch.tensor([2.0, 4.0], dtype=torch.float64)), record.products
    (True, 2)
    """

    step: float = 1.0
    radius: float = 0.01

    def __post_init__(self) -> None:
        check_in_interval(self, "step", self.step, 0.0, math.inf)
        check_in_interval(self, "radius", self.radius, 0.0, math.inf)

    def implicit_term(self, inner, b):
        x = self.step * b
        norm = float(torch.linalg.vector_norm(x))
        if norm == 0:
            zeros = [torch.zeros_like(leaf) for leaf in inner.lam]
            return zeros, unmeasured_record(
                "FiniteDifference", iterations=0, products=0, finite=True
            )
        eps = self.radius / norm
        plus, minus = inner.lam_gradient(inner.w + eps * x), inner.lam_gradient(inner.w - eps * x)
        implicit = [-(p - m) / (2 * eps) for p, m in zip(plus, minus)]
        finite = all(bool(torch.isfinite(g).all()) for g in implicit)
        return implicit, unmeasured_record(
            "FiniteDifference", iterations=1, products=2, finite=finite
        )


def _sgd(parameters: list[torch.Tensor]) -> torch.optim.Optimizer:
    return torch.optim.SGD(parameters, lr=0.1)


@options
class StochasticAID(HypergradientMethod):
    """HyperTorch's stochastic approximate implicit differentiation: ``H x = b`` solved by a
    ``torch.optim`` optimizer on ``q(x) = x.H x / 2 - b.x``, whose gradient ``H x - b`` is one
    Hessian-vector product on a fresh evaluation of the inner loss per step.

    An inner loss that samples a minibatch on each call makes every product stochastic; the
    final mixed product uses one more sample. ``steps`` products plus that one. The record's
    residual is the last step's stochastic ``||H x - b||`` (before its update), reported, not
    judged (status ``UNCHECKED``).

    >>> inner = lambda w, lam: 0.5 * (w * w).sum() - lam @ w
    >>> outer = lambda w, lam: (w ** 2).sum()
    >>> lam = torch.tensor([1.0, 2.0], dtype=torch.float64)
    >>> method = StochasticAID(steps=200)
    >>> grad, record = hypergradient(inner, outer, lam.clone(), lam, method=method)
    >>> torch.allclose(grad, torch.tensor([2.0, 4.0], dtype=torch.float64)), record.products
    (True, 201)
    """

    steps: int = 10
    optimizer: Callable[[list[torch.Tensor]], torch.optim.Optimizer] = _sgd

    def __post_init__(self) -> None:
        check_positive_int(self, "steps", self.steps)
        if not callable(self.optimizer):
            raise TypeError(
                "StochasticAID: `optimizer` must be a callable params -> torch.optim.Optimizer, "
                f"got {type(self.optimizer).__name__}."
            )

    def implicit_term(self, inner, b):
        x = torch.zeros_like(b, requires_grad=True)
        optimizer = self.optimizer([x])
        history = []
        for _ in range(self.steps):
            gradient = inner.graph().vjp_w(x.detach()) - b
            history.append(torch.linalg.vector_norm(gradient))
            x.grad = gradient
            optimizer.step()
        implicit = inner.graph().param_grads(x.detach())
        residuals = torch.stack(history).tolist()
        scale = float(torch.linalg.vector_norm(b))
        record = SolveRecord(
            method="StochasticAID",
            iterations=self.steps,
            products=self.steps + 1,
            residual=residuals[-1],
            relative_residual=relative(residuals[-1], scale),
            tol=None,
            atol=None,
            status=Status.UNCHECKED if math.isfinite(residuals[-1]) else Status.NONFINITE,
            history=tuple(relative(r, scale) for r in residuals),
        )
        return implicit, record
