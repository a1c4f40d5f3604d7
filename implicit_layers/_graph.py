"""Walking an autograd graph: which tensors that require grad does an output depend on?"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["foreign_leaves"]


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
