"""Working on an autograd graph: which tensors that require grad does an output depend on, and
Jacobian-vector products through it by reverse mode."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ._compat import retained_vjp

__all__ = ["foreign_leaves", "ForwardProducts"]


def foreign_leaves(outputs: Sequence[torch.Tensor], known: Sequence[object]) -> list[torch.Tensor]:
    """The leaves that require grad, other than ``known``, that ``outputs`` depend on.

    A function that closes over such a tensor instead of taking it as an input would silently
    give it no gradient; the callers turn a non-empty answer into an error.
    """
    known_ids = {id(t) for t in known}
    foreign: list[torch.Tensor] = []
    seen: set = set()
    stack: list = []
    for out in outputs:
        if out.grad_fn is None:
            if out.requires_grad and id(out) not in known_ids:
                foreign.append(out)
        else:
            stack.append(out.grad_fn)
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        variable = getattr(node, "variable", None)  # AccumulateGrad: a leaf that requires grad
        if variable is not None:
            if id(variable) not in known_ids:
                foreign.append(variable)
            continue
        stack.extend(child for child, _ in node.next_functions)
    return foreign


class ForwardProducts:
    """Jacobian-vector products by reverse mode, from the graph of ``outputs`` on ``inputs``:
    ``J t = d/du <J^T u, t>``.

    ``J^T u`` is taken once, with a graph in a dummy cotangent ``u`` (zeros that require grad);
    each product is then one backward pass through it, about two vector-Jacobian products'
    work. Unlike dual numbers this needs no forward-mode rule from the functions that made the
    graph, only a differentiable backward (torchopt and HyperTorch take the transposed product
    of normal-equation CG the same way).
    """

    def __init__(self, outputs: Sequence[torch.Tensor], inputs: Sequence[torch.Tensor]):
        self.n_outputs = len(outputs)
        self.live = [i for i, out in enumerate(outputs) if out.requires_grad]
        live = [outputs[i] for i in self.live]
        grads: Sequence[torch.Tensor | None] = [None] * len(inputs)
        with torch.enable_grad():
            self.cotangents = [torch.zeros_like(out, requires_grad=True) for out in live]
            if live:
                grads = torch.autograd.grad(
                    live, inputs, self.cotangents, create_graph=True, allow_unused=True
                )
        # an input whose J^T u has no graph in u has a zero Jacobian: it adds nothing
        self.transposed = [g if g is not None and g.requires_grad else None for g in grads]

    def __call__(self, tangents: Sequence[torch.Tensor | None]) -> list[torch.Tensor | None]:
        """``sum_k (d output / d input_k) t_k`` for each output (None where it is zero); a
        ``None`` tangent is zero."""
        pairs = [
            (transposed, tangent)
            for transposed, tangent in zip(self.transposed, tangents)
            if transposed is not None and tangent is not None
        ]
        products: list[torch.Tensor | None] = [None] * self.n_outputs
        if pairs:
            grads = retained_vjp([t for t, _ in pairs], self.cotangents, [v for _, v in pairs])
            for i, g in zip(self.live, grads):
                products[i] = g
        return products
