"""The backward system of a fixed point, built from one evaluation of Phi at ``w*``.

At ``w* = Phi(w*, p)`` the implicit function theorem gives ``dw*/dp = (I - J)^{-1} dPhi/dp`` with
``J = dPhi/dw``, so for ``b = dL/dw*``: solve ``(I - J)^T x = b``, then ``dL/dp = (dPhi/dp)^T x``.
:class:`PhiGraph` evaluates Phi once with a graph and serves every vector-Jacobian product from
it; :class:`ImplicitOperator` is ``A = (I - J)^T`` for the linear solver.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.autograd.forward_ad as fwAD

from ._operator import LinearOperator
from ._tree import FlatSpace, tree_unflatten

__all__ = ["PhiGraph", "ImplicitOperator"]


class PhiGraph:
    """Phi at ``(w*, params)`` with a graph, built on first use (a zero ``b`` never builds it).

    ``params`` are the layer's tensor params; the first ``n_substituted`` are replaced by
    detached leaves (so the graph stays local), the rest (an ``nn.Module`` Phi's own
    parameters) are used as they are, since Phi reads them itself.
    """

    def __init__(
        self,
        phi: Callable[..., Any],
        space: FlatSpace,
        rebuild_params: Callable[[Sequence[torch.Tensor]], tuple],
        w_star: torch.Tensor,
        params: Sequence[torch.Tensor],
        needs_grad: Sequence[bool],
        n_substituted: int,
    ):
        self.phi, self.space, self.rebuild_params = phi, space, rebuild_params
        self.w_star, self.params, self.needs_grad = w_star, params, needs_grad
        self.n_substituted = n_substituted
        self._built = False

    def _build(self) -> None:
        if self._built:
            return
        space = self.space
        with torch.enable_grad():
            self.w_vars = [
                leaf.detach().requires_grad_() for leaf in space.unflatten_leaves(self.w_star)
            ]
            self.param_vars = [
                (p.detach().requires_grad_(need) if p.dtype.is_floating_point else p)
                if index < self.n_substituted
                else p
                for index, (p, need) in enumerate(zip(self.params, self.needs_grad))
            ]
            out = self.phi(
                tree_unflatten(space.spec, self.w_vars), *self.rebuild_params(self.param_vars)
            )
        leaves = space.check(out, "Phi's output")
        self.outputs = [leaf for leaf in leaves if leaf.requires_grad]
        self.output_index = [i for i, leaf in enumerate(leaves) if leaf.requires_grad]
        known = self.w_vars + [
            p
            for index, (p, need) in enumerate(zip(self.param_vars, self.needs_grad))
            if need or index >= self.n_substituted
        ]
        _check_no_foreign_tensors(self.outputs, known, space)
        self._built = True

    def _vjp(self, vector: torch.Tensor, inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """``(d Phi / d inputs)^T vector`` from the one graph; zeros where Phi does not depend."""
        self._build()
        if not self.outputs:
            return [torch.zeros_like(t) for t in inputs]
        cotangents = self.space.unflatten_leaves(vector)
        grads = torch.autograd.grad(
            self.outputs,
            inputs,
            grad_outputs=[cotangents[i] for i in self.output_index],
            retain_graph=True,
            allow_unused=True,
        )
        return [torch.zeros_like(t) if g is None else g for g, t in zip(grads, inputs)]

    def jtv(self, vector: torch.Tensor) -> torch.Tensor:
        """``J^T v``: one vector-Jacobian product."""
        self._build()
        return self.space.flatten_leaves(self._vjp(vector, self.w_vars))

    def jv(self, vector: torch.Tensor) -> torch.Tensor:
        """``J v`` by forward-mode AD: one evaluation of Phi with dual numbers."""
        space = self.space
        tangents = space.unflatten_leaves(vector)
        with fwAD.dual_level(), torch.enable_grad():
            duals = [
                fwAD.make_dual(leaf.detach().requires_grad_(), tangent)
                for leaf, tangent in zip(space.unflatten_leaves(self.w_star), tangents)
            ]
            constants = [p.detach() for p in self.params[: self.n_substituted]]
            params = self.rebuild_params(constants + list(self.params[self.n_substituted :]))
            out = self.phi(tree_unflatten(space.spec, duals), *params)
            leaves = space.check(out, "Phi's output")
            columns = [fwAD.unpack_dual(leaf).tangent for leaf in leaves]
        return space.flatten_leaves(
            [
                torch.zeros_like(leaf) if c is None else c.detach()
                for c, leaf in zip(columns, leaves)
            ]
        )

    def param_grads(self, x: torch.Tensor) -> list[torch.Tensor | None]:
        """``(dPhi/dparams)^T x`` for every param that needs a gradient (``None`` for others)."""
        wanted = [i for i, need in enumerate(self.needs_grad) if need]
        if not wanted:
            return [None] * len(self.params)
        if not self._built and not bool(x.any()):  # b was zero: no graph was needed
            grads = [torch.zeros_like(self.params[i]) for i in wanted]
        else:
            self._build()
            grads = self._vjp(x, [self.param_vars[i] for i in wanted])
        result: list[torch.Tensor | None] = [None] * len(self.params)
        for i, g in zip(wanted, grads):
            result[i] = g
        return result


class ImplicitOperator(LinearOperator):
    """``A = (I - J)^T`` at the fixed point: ``mv`` is one VJP, ``rmv`` one JVP."""

    def __init__(self, graph: PhiGraph):
        self.graph = graph
        self.size = graph.space.size
        self.dtype = graph.space.dtype
        self.device = graph.space.device

    def mv(self, vector: torch.Tensor) -> torch.Tensor:
        return vector - self.graph.jtv(vector)

    def rmv(self, vector: torch.Tensor) -> torch.Tensor:
        return vector - self.graph.jv(vector)


def _check_no_foreign_tensors(
    outputs: Sequence[torch.Tensor], known: Sequence[torch.Tensor], space: FlatSpace
) -> None:
    """Raise if Phi's graph reaches a tensor that requires grad but is not a layer input.

    Such a tensor (one Phi closes over) would silently get no gradient.
    """
    known_ids = {id(t) for t in known}
    foreign: list[torch.Tensor] = []
    seen: set = set()
    stack: list = []
    for out in outputs:
        if out.grad_fn is None:
            if id(out) not in known_ids:
                foreign.append(out)
        else:
            stack.append(out.grad_fn)
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        variable = getattr(node, "variable", None)
        if variable is not None:
            if id(variable) not in known_ids:
                foreign.append(variable)
            continue
        stack.extend(child for child, _ in node.next_functions)
    if not foreign:
        return
    shapes = ", ".join(str(tuple(t.shape)) for t in foreign[:5])
    hint = ""
    if any(tuple(t.shape) in {tuple(s) for s in space.shapes} for t in foreign):
        hint = (
            " If Phi takes gradients inside, do not detach w: use torch.enable_grad() and call "
            "w.requires_grad_() only when w does not already require grad."
        )
    raise RuntimeError(
        f"Phi uses {len(foreign)} tensor(s) that require grad but are not inputs of the layer "
        f"(shapes {shapes}); they would silently get no gradient. Pass them as params, "
        "layer(w0, *params), make Phi an nn.Module (its parameters are then inputs), or "
        f"detach them if they are constants.{hint}"
    )
