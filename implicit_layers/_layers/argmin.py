"""``argmin_layer``: a minimiser ``w* = argmin_w f(w, *params)`` as a differentiable layer."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from .._compat import in_functorch_transform, loss_gradients
from .._linear import CG
from .._minimize import LBFGS, Minimizer, as_minimizer
from .._records import OnFailure
from .._tree import FlatSpace, tree_flatten, tree_unflatten
from ._core import Equation, ImplicitLayer, made_or_decorator
from ._residual import ROOT

__all__ = ["argmin_layer", "ArgminLayer", "ArgminEquation", "gradient_residual"]

DEFAULT_MINIMIZER = LBFGS()  # a line search: no step size to tune (issue 15 item 7)
DEFAULT_HESSIAN_SOLVER = CG()  # the Hessian at a strict minimum is symmetric positive definite


class ArgminEquation(Equation):
    """``w = argmin f(w, *params)``: ``F = grad_w f`` (a root); a minimizer finds it."""

    form = ROOT
    kind = "argmin"
    function_name = "f"
    output_name = "f's output"
    solver_type = Minimizer
    solver_examples = "LBFGS(), GradientDescent()"

    def find(self, solver, f, space, params, w0):
        if torch.is_inference_mode_enabled():
            raise RuntimeError(
                "argmin_layer cannot run under torch.inference_mode(): its minimizer takes "
                "gradients of f, which inference mode forbids. Use torch.no_grad() instead."
            )
        if space.dtype.is_complex:
            raise TypeError(
                f"argmin_layer: `w0` is {space.dtype}; its minimizers work on real w. Split w "
                "into real and imaginary parts, or write the stationarity condition as a "
                "root_layer(F) with F(w) = 0."
            )

        def objective(w: torch.Tensor) -> torch.Tensor:
            return _scalar(f(space.unflatten(w), *params))

        return as_minimizer(solver, space, params).solve(objective, w0)

    def residual(self, space: FlatSpace, f):
        return gradient_residual(f)


class ArgminLayer(ImplicitLayer):
    """A layer returning ``w* = argmin_w f(w, *params)``, differentiable in ``params``.

    Forward: ``solver`` minimises ``w -> f(w, *params)`` from ``w0`` with no graph kept.
    Backward: at ``w*``, ``grad_w f = 0``, so with ``H = grad^2_ww f`` and ``b = dL/dw*``,
    ``backward`` solves ``H x = b`` by Hessian-vector products from one evaluation of
    ``grad_w f`` with a graph, and each param receives ``-(grad^2_{p w} f)^T x``. Unlike a
    fixed point of ``w - a grad f``, there is no step size to choose and the products are
    Hessian-vector products directly, with no cancellation in ``v - (v - a H v)``.

    Everything else (pytrees, records, ``on_failure``, an ``nn.Module`` ``f``) is as for
    :class:`FixedPointLayer`.

    >>> X, y = torch.randn(20, 3), torch.randn(20)
    >>> layer = argmin_layer(lambda w, lam: ((X @ w - y) ** 2).mean() + lam * (w * w).sum())
    >>> lam = torch.tensor(0.1, requires_grad=True)
    >>> w = layer(torch.zeros(3), lam)
    >>> w.sum().backward()
    >>> H = 2 * X.T @ X / 20 + 0.2 * torch.eye(3)
    >>> torch.allclose(lam.grad, -(2 * w.detach()) @ torch.linalg.solve(H, torch.ones(3)),
    ...                atol=1e-4)
    True
    """

    def __init__(
        self,
        f: Callable[..., torch.Tensor],
        solver: Minimizer | Callable = DEFAULT_MINIMIZER,
        backward: Any = DEFAULT_HESSIAN_SOLVER,
        on_failure: OnFailure = "warn",
        warm_start: bool = False,
    ):
        super().__init__(ArgminEquation(), f, solver, backward, on_failure, warm_start)


def gradient_residual(f: Callable[..., torch.Tensor]):
    """``F(w, *params) = grad_w f(w, *params)``, with a graph, as a list of leaves."""

    def gradient(w, *params):
        leaves, spec = tree_flatten(w)
        if in_functorch_transform():  # autograd.grad cannot reach a transform's tensors

            def loss(leaves: list[torch.Tensor]) -> torch.Tensor:
                return _scalar(f(tree_unflatten(spec, leaves), *params))

            return list(torch.func.grad(loss)(leaves))
        with torch.enable_grad():
            grads = loss_gradients(_scalar(f(w, *params)), leaves, create_graph=True)
        return [torch.zeros_like(leaf) if g is None else g for g, leaf in zip(grads, leaves)]

    return gradient


def _scalar(loss: Any) -> torch.Tensor:
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
        raise ValueError(f"f must return a scalar tensor (the loss to minimise), got {shape}.")
    return loss.reshape(())


def argmin_layer(
    f: Callable[..., torch.Tensor] | None = None,
    /,
    *,
    solver: Minimizer | Callable = DEFAULT_MINIMIZER,
    backward: Any = DEFAULT_HESSIAN_SOLVER,
    on_failure: OnFailure = "warn",
    warm_start: bool = False,
):
    """Make an :class:`ArgminLayer` from ``f(w, *params)``; also usable as a decorator.

    ``solver``: :class:`LBFGS` (default: a line search, no step size to tune),
    :class:`GradientDescent` (with a step below ``2 / L``), or a callable
    ``solver(f, w0) -> w`` such as a user's inner training loop (``f(w)`` returns the loss;
    a callable that takes the params too, ``solver(f, w0, *params)``, receives them).
    ``backward`` solves the Hessian system: :class:`CG` by default, since the Hessian at a strict
    minimum is symmetric positive definite; any linear solver or callable works.

    >>> @argmin_layer(solver=LBFGS(tol=1e-5))
    ... def nearest(w, target):
    ...     return ((w - target) ** 2).sum() + (w ** 4).sum()
    >>> target = torch.tensor([1.0, -1.0], requires_grad=True)
    >>> nearest(torch.zeros(2), target).sum().backward()
    >>> nearest.last_backward.converged
    True
    """

    return made_or_decorator(
        ArgminLayer,
        f,
        solver=solver,
        backward=backward,
        on_failure=on_failure,
        warm_start=warm_start,
    )
