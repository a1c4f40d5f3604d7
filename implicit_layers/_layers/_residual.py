"""The backward system of an implicit layer, built from one evaluation of its residual at ``w*``.

An implicit layer's output solves ``F(w*, p) = 0``. The implicit function theorem gives
``dw*/dp = -F_w^{-1} F_p``, so for ``b = dL/dw*``: solve ``F_w^T x = b``, then
``dL/dp = -F_p^T x``. The user's function gives ``G``, and a :class:`Form` says how ``F`` is
made of it: ``F = w - G`` for a fixed point (``G = Phi``, so ``F_w^T = (I - J)^T`` and
``-F_p^T x = (dPhi/dp)^T x``), ``F = G`` for a root (``G = F``) or an argmin (``G = grad_w f``,
``F_w`` the Hessian).

:class:`ResidualGraph` evaluates ``G`` once with a graph and serves every vector-Jacobian
product from it: the identity of a fixed point is applied as a vector subtraction rather than as
one more node in every product. :class:`ImplicitOperator` is ``A = F_w^T`` for the linear solver.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from .._compat import retained_vjp
from .._graph import ForwardProducts, foreign_leaves
from .._operator import LinearOperator
from .._tree import FlatSpace, tree_unflatten

__all__ = ["Form", "FIXED_POINT", "ROOT", "Residual", "ResidualGraph", "ImplicitOperator"]

# G(w, *params) -> the leaves of G, matching the leaves of w
Residual = Callable[..., Sequence[torch.Tensor]]


class Form:
    """How the equation ``F(w, p) = 0`` is made of ``G``, the user's function: the one place
    where a layer kind's operator and the sign of its parameter gradient are decided."""

    def f_w(self, vector: torch.Tensor, g_w: torch.Tensor) -> torch.Tensor:
        """A product with ``F_w`` (or its transpose) from the same product with ``G_w``."""
        raise NotImplementedError

    def minus_f_p(self, g_p: torch.Tensor) -> torch.Tensor:
        """``-F_p^T x`` from ``G_p^T x`` (and ``-F_p dp`` from ``G_p dp``)."""
        raise NotImplementedError

    def adjoint(self, b: torch.Tensor, g_w: torch.Tensor) -> torch.Tensor:
        """``G_adj`` of the adjoint equation ``F_w^T x = b`` in this form, from ``G_w^T x``."""
        raise NotImplementedError


class _FixedPointForm(Form):
    """``F = w - G``: the adjoint equation is the fixed point ``x = b + G_w^T x``."""

    def f_w(self, vector, g_w):
        return vector - g_w

    def minus_f_p(self, g_p):
        return g_p

    def adjoint(self, b, g_w):
        return b + g_w


class _RootForm(Form):
    """``F = G``: the adjoint equation is the root ``G_w^T x - b = 0``."""

    def f_w(self, vector, g_w):
        return g_w

    def minus_f_p(self, g_p):
        return -g_p

    def adjoint(self, b, g_w):
        return g_w - b


FIXED_POINT: Form = _FixedPointForm()
ROOT: Form = _RootForm()


class ResidualGraph:
    """``G`` at ``(w*, params)`` with a graph, built on first use (a zero ``b`` never builds it);
    ``F`` is made of ``G`` by ``form``.

    ``params`` are the layer's tensor inputs; the graph is built on detached leaves in their
    place (so it stays local), which ``rebuild_params`` turns into the residual's arguments.
    """

    def __init__(
        self,
        residual: Residual,
        space: FlatSpace,
        rebuild_params: Callable[[Sequence[torch.Tensor]], tuple],
        w_star: torch.Tensor,
        params: Sequence[torch.Tensor],
        needs_grad: Sequence[bool],
        form: Form,
    ):
        self.residual, self.space, self.rebuild_params = residual, space, rebuild_params
        self.form = form
        self.w_star, self.params, self.needs_grad = w_star, params, needs_grad
        self._built = False
        self._products: ForwardProducts | None = None

    def _w_leaves(self) -> list[torch.Tensor]:
        """Fresh leaves at ``w*`` that require grad (a residual may differentiate in w)."""
        return [leaf.detach().requires_grad_() for leaf in self.space.unflatten_leaves(self.w_star)]

    def _build(self) -> None:
        if self._built:
            return
        with torch.enable_grad():
            self.w_vars = self._w_leaves()
            self.param_vars = [
                p.detach().requires_grad_(need) if p.is_floating_point() or p.is_complex() else p
                for p, need in zip(self.params, self.needs_grad)
            ]
            w = tree_unflatten(self.space.spec, self.w_vars)
            self.outputs = list(self.residual(w, *self.rebuild_params(self.param_vars)))
        known = self.w_vars + [p for p, need in zip(self.param_vars, self.needs_grad) if need]
        if any(self.needs_grad) and not any(out.requires_grad for out in self.outputs):
            raise ValueError(
                "the layer's function returned an output with no graph to w or to the params "
                "that require grad, so the backward has nothing to differentiate. If it was "
                "detached (.detach(), .data, torch.no_grad() inside), keep its graph; if it "
                "really depends on none of them, its gradient is zero: do not ask for one."
            )
        _check_no_foreign_tensors(self.outputs, known, self.w_vars)
        self._built = True

    def _vjp(self, vector: torch.Tensor, inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """``(dF/d inputs)^T vector`` from the one graph; zeros where F does not depend."""
        self._build()
        grads = retained_vjp(self.outputs, inputs, self.space.unflatten_leaves(vector))
        return [torch.zeros_like(t) if g is None else g for g, t in zip(grads, inputs)]

    def vjp_w(self, vector: torch.Tensor) -> torch.Tensor:
        """``F_w^T v``: one vector-Jacobian product."""
        self._build()
        product = self.space.flatten_leaves(self._vjp(vector, self.w_vars))
        return self.form.f_w(vector, product)

    def vjp_w_columns(self, matrix: torch.Tensor) -> torch.Tensor:
        """``F_w^T V`` for an ``n x m`` matrix ``V``: ``m`` vector-Jacobian products in one
        backward pass, vectorised over the columns by ``torch.func.vmap``."""
        self._build()  # the graph is built once, outside the vectorised map
        rows = matrix.T.contiguous()  # batched matrix products run faster on contiguous rows
        return torch.func.vmap(self.vjp_w, out_dims=1)(rows)

    def jvp_w(self, vector: torch.Tensor) -> torch.Tensor:
        """``F_w v`` by reverse mode through the same graph (:class:`ForwardProducts`): about
        two VJPs' work, and no forward-mode rule needed from the user's function."""
        self._build()
        product = self._jvp(self.space.unflatten_leaves(vector))
        return self.form.f_w(vector, product)

    def param_jvp(self, tangents: Sequence[torch.Tensor | None]) -> torch.Tensor:
        """``G_p dp`` (flat, in the space of ``w``) for the params that need grad, by reverse
        mode as :meth:`jvp_w`."""
        self._build()
        wanted = [tangents[i] for i, need in enumerate(self.needs_grad) if need]
        return self._jvp([None] * len(self.w_vars) + wanted)

    def _jvp(self, tangents: Sequence[torch.Tensor | None]) -> torch.Tensor:
        """``sum_k (dG/d input_k) t_k`` over the inputs: ``w``'s leaves, then the params that
        need grad."""
        if self._products is None:
            wanted = [p for p, need in zip(self.param_vars, self.needs_grad) if need]
            self._products = ForwardProducts(self.outputs, self.w_vars + wanted)
        products = self._products(tangents)
        return self.space.flatten_leaves(
            [torch.zeros_like(w) if g is None else g for g, w in zip(products, self.w_vars)]
        )

    def param_grads(self, x: torch.Tensor) -> list[torch.Tensor | None]:
        """``-F_p^T x`` for every param that needs a gradient (``None`` for the others)."""
        wanted = [i for i, need in enumerate(self.needs_grad) if need]
        if not wanted:
            return [None] * len(self.params)
        if not self._built and not bool(x.any()):  # b was zero: no graph was needed
            grads = [torch.zeros_like(self.params[i]) for i in wanted]
        else:
            self._build()
            grads = self._vjp(x, [self.param_vars[i] for i in wanted])
            grads = [self.form.minus_f_p(g) for g in grads]
        result: list[torch.Tensor | None] = [None] * len(self.params)
        for i, g in zip(wanted, grads):
            result[i] = g
        return result


class ImplicitOperator(LinearOperator):
    """``A = F_w^T`` at the solution: ``mv`` is one VJP, ``rmv`` one JVP."""

    def __init__(self, graph: ResidualGraph, rows: int | None = None):
        self.graph, self.rows = graph, rows
        self.size = graph.space.size
        self.dtype = graph.space.dtype
        self.device = graph.space.device

    def mv(self, vector: torch.Tensor) -> torch.Tensor:
        return self.graph.vjp_w(vector)

    def mm(self, matrix: torch.Tensor) -> torch.Tensor:
        return self.graph.vjp_w_columns(matrix)

    def rmv(self, vector: torch.Tensor) -> torch.Tensor:
        return self.graph.jvp_w(vector)


def _check_no_foreign_tensors(
    outputs: Sequence[torch.Tensor], known: Sequence[torch.Tensor], w_vars: Sequence[torch.Tensor]
) -> None:
    """Raise if the residual's graph reaches a tensor that requires grad but is not a layer
    input: such a tensor (one the user's function closes over) would silently get no gradient.
    """
    foreign = foreign_leaves(outputs, known)
    if not foreign:
        return
    shapes = ", ".join(str(tuple(t.shape)) for t in foreign[:5])
    hint = ""
    w_storage = {w.untyped_storage().data_ptr() for w in w_vars}
    if any(t.untyped_storage().data_ptr() in w_storage for t in foreign):  # w detached in f
        hint = (
            " If your function takes gradients inside, do not detach w: use torch.enable_grad() "
            "and call w.requires_grad_() only when w does not already require grad."
        )
    raise RuntimeError(
        f"the layer's function uses {len(foreign)} tensor(s) that require grad but are not "
        f"inputs of the layer (shapes {shapes}); they would silently get no gradient. Pass them "
        "as params, layer(w0, *params), make the function an nn.Module (its parameters are then "
        f"inputs), or detach them if they are constants.{hint}"
    )
