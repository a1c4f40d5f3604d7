"""What every wrapper around a user's callable solver shares."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch

__all__ = ["UserCallable"]


class UserCallable:
    """A user's function used as a solver: its name, and calling it on the user's own tree.

    ``solver(f, w0)`` is handed ``f`` with the layer's params bound; a solver that takes them
    too, ``solver(f, w0, *params)``, gets them: one with ``*args``, or with a positional
    parameter without default for each (a defaulted option such as ``steps=100`` is not one).
    """

    def __init__(self, function: Callable[..., Any], space: Any = None, params: tuple = ()):
        self.function, self.space = function, space
        self.params = params if params and _takes(function, 2 + len(params)) else ()

    @property
    def method(self) -> str:
        return getattr(self.function, "__name__", type(self.function).__name__)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.method})"

    def _solve_on_tree(self, f: Callable[[Any], Any], w0: torch.Tensor) -> torch.Tensor:
        """``function(f, w0)`` with ``w0`` as the user's tree; the result checked and flat."""
        space = self.space
        w_tree = self.function(f, space.unflatten(w0), *self.params)
        return space.flatten_leaves(
            space.check(w_tree, f"the result of the solver `{self.method}`")
        )


def _takes(function: Callable[..., Any], count: int) -> bool:
    """Whether ``function`` takes ``count`` positional arguments of its own (none defaulted)."""
    try:
        parameters = inspect.signature(function).parameters.values()
    except (TypeError, ValueError):  # a builtin without a signature
        return False
    if any(p.kind is inspect.Parameter.VAR_POSITIONAL for p in parameters):
        return True
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    required = [p for p in parameters if p.kind in positional and p.default is p.empty]
    return len(required) >= count
