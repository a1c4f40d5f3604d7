"""What every wrapper around a user's callable solver shares."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

__all__ = ["UserCallable"]


class UserCallable:
    """A user's function used as a solver: its name, and calling it on the user's own tree."""

    def __init__(self, function: Callable[..., Any], space: Any = None):
        self.function, self.space = function, space

    @property
    def method(self) -> str:
        return getattr(self.function, "__name__", type(self.function).__name__)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.method})"

    def _solve_on_tree(self, f: Callable[[Any], Any], w0: torch.Tensor) -> torch.Tensor:
        """``function(f, w0)`` with ``w0`` as the user's tree; the result checked and flat."""
        space = self.space
        w_tree = self.function(f, space.unflatten(w0))
        return space.flatten_leaves(
            space.check(w_tree, f"the result of the solver `{self.method}`")
        )
