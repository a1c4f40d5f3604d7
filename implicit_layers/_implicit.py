"""The backward system of an implicit layer, built from one evaluation of its residual at ``w*``.

An implicit layer's output solves ``F(w*, p) = 0``: ``F = w - Phi(w, p)`` for a fixed point,
``F = grad_w f(w, p)`` for an argmin. The implicit function theorem gives
``dw*/dp = -F_w^{-1} F_p``, so for ``b = dL/dw*``: solve ``F_w^T x = b``, then
``dL/dp = -F_p^T x``. For a fixed point ``F_w^T = (I - J)^T`` with ``J = dPhi/dw`` and
``-F_p^T x = (dPhi/dp)^T x``; for an argmin ``F_w`` is the Hessian.

:class:`ResidualGraph` evaluates ``G`` once with a graph, where ``F = w - G`` (a fixed point,
``G = Phi``) or ``F = G`` (an argmin), and serves every vector-Jacobian product from it: the
identity is applied as a vector subtraction rather than as one more node in every product.
:class:`ImplicitOperator` is ``A = F_w^T`` for the linear solver.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.autograd.forward_ad as fwAD
from torch.autograd.graph import _engine_run_backward

from ._graph import foreign_leaves
from ._operator import LinearOperator
from ._tree import FlatSpace, tree_unflatten

__all__ = ["Residual", "ResidualGraph", "ImplicitOperator"]

# G(w, *params) -> the leaves of G, matching the leaves of w
Residual = Callable[..., Sequence[torch.Tensor]]


class ResidualGraph:
    """``G`` at ``(w*, params)`` with a graph, built on first use (a zero ``b`` never builds it);
    ``F = w - G`` when ``identity_minus`` (a fixed point), else ``F = G``.

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
        identity_minus: bool,
    ):
        self.residual, self.space, self.rebuild_params = residual, space, rebuild_params
        self.identity_minus = identity_minus
        self.w_star, self.params, self.needs_grad = w_star, params, needs_grad
        self._built = False

    def _w_leaves(self) -> list[torch.Tensor]:
        """Fresh leaves at ``w*`` that require grad (a residual may differentiate in w)."""
        return [leaf.detach().requires_grad_() for leaf in self.space.unflatten_leaves(self.w_star)]

    def _build(self) -> None:
        if self._built:
            return
        with torch.enable_grad():
            self.w_vars = self._w_leaves()
            self.param_vars = [
                p.detach().requires_grad_(need) if p.dtype.is_floating_point else p
                for p, need in zip(self.params, self.needs_grad)
            ]
            w = tree_unflatten(self.space.spec, self.w_vars)
            self.outputs = list(self.residual(w, *self.rebuild_params(self.param_vars)))
        known = self.w_vars + [p for p, need in zip(self.param_vars, self.needs_grad) if need]
        _check_no_foreign_tensors(self.outputs, known, self.w_vars)
        self._built = True

    def _vjp(self, vector: torch.Tensor, inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """``(dF/d inputs)^T vector`` from the one graph; zeros where F does not depend."""
        self._build()
        grads = _retained_vjp(self.outputs, inputs, self.space.unflatten_leaves(vector))
        return [torch.zeros_like(t) if g is None else g for g, t in zip(grads, inputs)]

    def vjp_w(self, vector: torch.Tensor) -> torch.Tensor:
        """``F_w^T v``: one vector-Jacobian product."""
        self._build()
        product = self.space.flatten_leaves(self._vjp(vector, self.w_vars))
        return vector - product if self.identity_minus else product

    def vjp_w_columns(self, matrix: torch.Tensor) -> torch.Tensor:
        """``F_w^T V`` for an ``n x m`` matrix ``V``: ``m`` vector-Jacobian products in one
        backward pass, vectorised over the columns by ``torch.func.vmap``."""
        self._build()  # the graph is built once, outside the vectorised map
        rows = matrix.T.contiguous()  # batched matrix products run faster on contiguous rows
        return torch.func.vmap(self.vjp_w, out_dims=1)(rows)

    def jvp_w(self, vector: torch.Tensor) -> torch.Tensor:
        """``F_w v`` by forward-mode AD: one evaluation of ``F`` with dual numbers."""
        space = self.space
        with fwAD.dual_level(), torch.enable_grad():
            duals = [
                fwAD.make_dual(leaf, tangent)
                for leaf, tangent in zip(self._w_leaves(), space.unflatten_leaves(vector))
            ]
            params = self.rebuild_params([p.detach() for p in self.params])
            leaves = self.residual(tree_unflatten(space.spec, duals), *params)
            tangents = [fwAD.unpack_dual(leaf).tangent for leaf in leaves]
        product = space.flatten_leaves(
            [
                torch.zeros_like(leaf) if t is None else t.detach()
                for t, leaf in zip(tangents, leaves)
            ]
        )
        return vector - product if self.identity_minus else product

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
            if not self.identity_minus:  # -F_p^T x = -G_p^T x; for F = w - G it is +G_p^T x
                grads = [-g for g in grads]
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


def _retained_vjp(
    outputs: Sequence[torch.Tensor],
    inputs: Sequence[torch.Tensor],
    cotangents: Sequence[torch.Tensor],
) -> tuple[torch.Tensor | None, ...]:
    """``torch.autograd.grad(outputs, inputs, cotangents, retain_graph=True,
    allow_unused=True)`` without its Python layer.

    That layer (argument normalisation, validation of ``cotangents`` against ``outputs``) costs
    about 30 us a call on the CPU, 15-20% of a Hessian-vector product of a logistic regression
    with a thousand samples; here the graph is ours and the cotangents have the outputs' shapes
    and dtype by construction, so the autograd engine is called directly.
    """
    return _engine_run_backward(
        tuple(outputs),
        tuple(cotangents),
        True,  # retain_graph
        False,  # create_graph
        tuple(inputs),
        allow_unreachable=True,  # allow_unused
        accumulate_grad=False,
    )


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
