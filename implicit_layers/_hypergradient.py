"""``hypergradient``: the total derivative of an outer loss through an inner minimiser."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from ._argmin_layer import DEFAULT_HESSIAN_SOLVER, _scalar, gradient_residual
from ._implicit import ImplicitOperator, ResidualGraph
from ._linear import LinearSolver, as_linear_solver
from ._records import OnFailure, SolveRecord, report
from ._tree import FlatSpace, tree_flatten, tree_unflatten

__all__ = ["hypergradient"]


def hypergradient(
    inner_loss: Callable[[Any, Any], torch.Tensor],
    outer_loss: Callable[[Any, Any], torch.Tensor],
    w: Any,
    lam: Any,
    method: LinearSolver | Callable = DEFAULT_HESSIAN_SOLVER,
    on_failure: OnFailure = "warn",
) -> tuple[Any, SolveRecord]:
    """The hypergradient ``d/dlam g(w*(lam), lam)`` at ``w ~ w*(lam) = argmin f(., lam)``.

    With ``f = inner_loss``, ``g = outer_loss``, ``H = grad^2_ww f`` and ``b = grad_w g``:
    ``dg/dlam = grad_lam g - (grad^2_{lam w} f)^T H^{-1} b``, the direct term plus the implicit
    term. ``method`` solves ``H x = b``: :class:`CG` (default), :class:`Neumann` (its ``step``
    is the inner learning rate of hypergrad's and Betty's Neumann method; HyperTorch's
    ``fixed_point`` is the same iteration), :class:`NormalCG`, :class:`GMRES`,
    :class:`Nystrom`, :class:`Direct` or a callable ``(matvec, b) -> x``. ``w`` and ``lam`` are
    tensors or pytrees (e.g. ``dict(model.named_parameters())``); the result has ``lam``'s
    structure, and comes with the record of the linear solve (the policy ``on_failure`` applies).

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
    space = FlatSpace(w, "w")
    lam_leaves, lam_spec = tree_flatten(lam)
    for index, leaf in enumerate(lam_leaves):
        if not (isinstance(leaf, torch.Tensor) and leaf.dtype.is_floating_point):
            where = "lam" if lam_spec.kind == "leaf" else f"lam (leaf {index})"
            raise TypeError(f"`{where}` must be a floating-point tensor, got {leaf!r:.60}.")
    w_star = space.flatten(w).detach()
    with torch.enable_grad():
        w_vars = [leaf.detach().requires_grad_() for leaf in space.unflatten_leaves(w_star)]
        lam_vars = [leaf.detach().requires_grad_() for leaf in lam_leaves]
        outer = _scalar(
            outer_loss(tree_unflatten(space.spec, w_vars), tree_unflatten(lam_spec, lam_vars))
        )
        grads = torch.autograd.grad(outer, w_vars + lam_vars, allow_unused=True)
    grads = [torch.zeros_like(v) if g is None else g for g, v in zip(grads, w_vars + lam_vars)]
    b, direct = space.flatten_leaves(grads[: len(w_vars)]), grads[len(w_vars) :]

    graph = ResidualGraph(
        gradient_residual(inner_loss),
        space,
        lambda tensors: (tree_unflatten(lam_spec, list(tensors)),),
        w_star,
        lam_leaves,
        [True] * len(lam_leaves),
        len(lam_leaves),
        identity_minus=False,
    )
    x, record = as_linear_solver(method).solve(ImplicitOperator(graph), b)
    report(record, "hypergradient", on_failure)
    implicit = graph.param_grads(x)
    total = [d + i for d, i in zip(direct, implicit)]
    return tree_unflatten(lam_spec, total), record
