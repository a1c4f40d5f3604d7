"""Walking an autograd graph: which tensors that require grad does an output depend on?"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["foreign_leaves", "in_functorch_transform", "under_vmap"]


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


def in_functorch_transform() -> bool:
    """Whether this code runs inside a ``torch.func`` transform (grad, vjp, vmap, ...), where
    ``requires_grad_()`` is refused and ``torch.autograd.grad`` cannot reach the transform's
    tensors: there, derivatives must be taken with ``torch.func`` itself."""
    return torch._C._functorch.maybe_current_level() is not None


def under_vmap() -> bool:
    """Whether a ``torch.func.vmap`` (also inside ``jacfwd``, ``jacrev``) is active."""
    from torch._C._functorch import TransformType
    from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters

    return any(i.key() == TransformType.Vmap for i in retrieve_all_functorch_interpreters())
