"""Every private torch entry point the package uses, each behind a public fallback.

torch may rename or drop a private name in any release. Each is looked up once, here, when the
package is imported; if it is missing the package still imports and a public (slower, or less
capable) equivalent takes its place, as ``tests/test_compat.py`` checks by deleting each name.

* ``retained_vjp`` and ``loss_gradients``: the autograd engine without
  ``torch.autograd.grad``'s Python layer (``torch.autograd.graph._engine_run_backward``);
  fallback ``torch.autograd.grad``.
* ``forward_grad_enabled``: re-enables forward-mode AD inside a ``jvp`` rule, where torch turns
  it off (``torch.autograd.forward_ad._set_fwd_grad_enabled``); fallback ``None``, and the
  tangent solve then takes its products by reverse mode (two VJPs) instead of dual numbers.
* ``in_functorch_transform`` and ``under_vmap``: whether a ``torch.func`` transform (or a vmap)
  is active (``torch._C._functorch``); fallback ``False``, so inside a transform torch's own
  error is raised instead of the transform being served.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any

import torch

__all__ = [
    "retained_vjp",
    "loss_gradients",
    "CAN_REENABLE_FORWARD_GRAD",
    "forward_grad_enabled",
    "in_functorch_transform",
    "under_vmap",
    "version_of",
]


def _lookup(module: Any, name: str) -> Any:
    return getattr(module, name, None)


_engine_run_backward = _lookup(torch.autograd.graph, "_engine_run_backward")
_set_fwd_grad_enabled = _lookup(torch.autograd.forward_ad, "_set_fwd_grad_enabled")
_functorch = _lookup(torch._C, "_functorch")
_maybe_current_level = _lookup(_functorch, "maybe_current_level")
_transform_type = _lookup(_functorch, "TransformType")
try:
    from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters
except ImportError:  # pragma: no cover - a torch without functorch's Python side
    retrieve_all_functorch_interpreters = None  # type: ignore[assignment]


def retained_vjp(
    outputs: Sequence[torch.Tensor],
    inputs: Sequence[torch.Tensor],
    cotangents: Sequence[torch.Tensor],
) -> tuple[torch.Tensor | None, ...]:
    """``torch.autograd.grad(outputs, inputs, cotangents, retain_graph=True,
    allow_unused=True)``.

    The engine is called directly where torch has it: ``autograd.grad``'s argument checks cost
    about 30 us a call on the CPU, 15-20% of a Hessian-vector product of a logistic regression
    with a thousand samples, and here the cotangents match the outputs by construction.
    """
    if _engine_run_backward is None:
        return torch.autograd.grad(
            tuple(outputs), tuple(inputs), tuple(cotangents), retain_graph=True, allow_unused=True
        )
    return _engine_run_backward(
        tuple(outputs),
        tuple(cotangents),
        True,  # retain_graph
        False,  # create_graph
        tuple(inputs),
        allow_unreachable=True,  # allow_unused
        accumulate_grad=False,
    )


def loss_gradients(
    loss: torch.Tensor, inputs: Sequence[torch.Tensor], create_graph: bool = False
) -> tuple[torch.Tensor | None, ...]:
    """``torch.autograd.grad(loss, inputs, allow_unused=True, create_graph=create_graph)``
    for a scalar ``loss``, by the engine directly where torch has it (as :func:`retained_vjp`:
    about 30 us a call less, twice per hypergradient and once per minimizer step)."""
    if _engine_run_backward is None:
        return torch.autograd.grad(
            loss, tuple(inputs), allow_unused=True, create_graph=create_graph
        )
    return _engine_run_backward(
        (loss,),
        (torch.ones_like(loss, memory_format=torch.preserve_format),),
        create_graph,  # retain_graph, as autograd.grad defaults it
        create_graph,
        tuple(inputs),
        allow_unreachable=True,
        accumulate_grad=False,
    )


CAN_REENABLE_FORWARD_GRAD = _set_fwd_grad_enabled is not None


def forward_grad_enabled() -> contextlib.AbstractContextManager:
    """A context that turns forward-mode AD back on inside a ``jvp`` rule (use it only where
    :data:`CAN_REENABLE_FORWARD_GRAD`; torch's object switches the mode when it is made)."""
    return _set_fwd_grad_enabled(True)


def version_of(tensor: torch.Tensor) -> int | None:
    """The tensor's version counter (bumped by every in-place operation on it or a view of it),
    or None where it has none (an inference tensor) or torch does not expose it."""
    try:
        return tensor._version
    except (AttributeError, RuntimeError):
        return None


def in_functorch_transform() -> bool:
    """Whether this code runs inside a ``torch.func`` transform (grad, vjp, vmap, ...), where
    ``requires_grad_()`` is refused and ``torch.autograd.grad`` cannot reach the transform's
    tensors: there, derivatives must be taken with ``torch.func`` itself."""
    if _maybe_current_level is None:
        return False
    return _maybe_current_level() is not None


def under_vmap() -> bool:
    """Whether a ``torch.func.vmap`` (also inside ``jacfwd``, ``jacrev``) is active."""
    if _transform_type is None or retrieve_all_functorch_interpreters is None:
        return False
    vmap = _transform_type.Vmap
    return any(i.key() == vmap for i in retrieve_all_functorch_interpreters())
