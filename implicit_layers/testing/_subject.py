"""The function under check: its inputs, the tensors a check perturbs, and where its records are.

A check may run in float64 on float32 inputs: the inputs are cast copies, an ``nn.Module`` ``fn``
is deep-copied and cast, and the layers given with a plain function are cast in place for the
duration of the check (their original tensors are put back afterwards, untouched). The caller's
own tensors are never modified otherwise, except that module parameters are shifted in place
during a re-solve and restored exactly afterwards.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from .._layers import ImplicitLayer
from .._records import SolveRecord
from .._tree import tree_flatten, tree_unflatten

__all__ = ["Subject", "floating_leaves", "needs_cast"]


def _is_float(leaf: Any) -> bool:
    return isinstance(leaf, torch.Tensor) and leaf.dtype.is_floating_point


def floating_leaves(tree: Any) -> list[torch.Tensor]:
    """The floating-point tensors of a pytree, in its fixed leaf order."""
    return [leaf for leaf in tree_flatten(tree)[0] if _is_float(leaf)]


def _module_tensors(modules: Sequence[nn.Module]) -> list[torch.Tensor]:
    """The floating parameters and buffers of ``modules``, each once."""
    seen: dict[int, torch.Tensor] = {}
    for module in modules:
        for tensor in [*module.parameters(), *module.buffers()]:
            if tensor.dtype.is_floating_point:
                seen.setdefault(id(tensor), tensor)
    return list(seen.values())


def needs_cast(
    fn: Callable[..., Any], args: tuple, layers: Sequence[nn.Module] | None, dtype: torch.dtype
) -> bool:
    """Whether some floating input, or some parameter or buffer of ``fn`` (an ``nn.Module``) or
    of ``layers``, is not ``dtype``."""
    modules = [fn] if isinstance(fn, nn.Module) else list(layers or ())
    tensors = floating_leaves(args) + _module_tensors(modules)
    return any(t.dtype != dtype for t in tensors)


class Subject:
    """``fn(*args)`` in one dtype, with the checked tensors: the floating inputs that require
    grad, then the parameters that require grad of ``fn`` (an ``nn.Module``) or of the
    ``layers`` given with a plain function.

    ``dtype=None`` keeps the given dtypes; otherwise floating inputs are cast, a module ``fn``
    is deep-copied and cast, and the ``layers`` of a plain function are cast in place while the
    subject is entered (``with subject: ...``). Inputs are always fresh leaves, so nothing
    accumulates on the caller's tensors.
    """

    def __init__(
        self,
        fn: Callable[..., Any],
        args: tuple,
        layers: Sequence[ImplicitLayer] | None,
        dtype: torch.dtype | None,
    ):
        if isinstance(fn, nn.Module) and layers is not None:
            raise ValueError(
                "`layers=` is for plain functions: the layers inside an nn.Module `fn` are found "
                "in it (and in its float64 copy)."
            )
        self.dtype = dtype
        if isinstance(fn, nn.Module):
            if dtype is not None:
                fn = copy.deepcopy(fn).to(dtype)
            found = [(n, m) for n, m in fn.named_modules() if isinstance(m, ImplicitLayer)]
            self.layer_names = tuple(n or type(m).__name__ for n, m in found)
            self.layers = tuple(m for _, m in found)
            owners: list[nn.Module] = [fn]
        else:
            self.layers = tuple(layers or ())
            self.layer_names = tuple(
                f"{type(m).__name__}[{i}]" if len(self.layers) > 1 else type(m).__name__
                for i, m in enumerate(self.layers)
            )
            owners = list(self.layers)
        self.fn = fn
        self._in_place = [] if isinstance(fn, nn.Module) or dtype is None else owners
        self._saved: list[tuple[torch.Tensor, torch.Tensor]] = []
        leaves, self.spec = tree_flatten(args)
        self.leaves = [_fresh(leaf, dtype) if _is_float(leaf) else leaf for leaf in leaves]
        self.input_slots = [
            i for i, leaf in enumerate(self.leaves) if _is_float(leaf) and leaf.requires_grad
        ]
        params: dict[int, torch.Tensor] = {}
        for owner in owners:
            for p in owner.parameters():
                if p.requires_grad:
                    params.setdefault(id(p), p)
        self.params = list(params.values())
        self.tensors = [self.leaves[i] for i in self.input_slots] + self.params

    def __enter__(self) -> Subject:
        with torch.no_grad():
            for tensor in _module_tensors(self._in_place):
                self._saved.append((tensor, tensor.data))
                tensor.data = tensor.data.to(self.dtype)
        return self

    def __exit__(self, *exc: object) -> None:
        with torch.no_grad():
            for tensor, original in self._saved:
                tensor.data = original
        self._saved = []

    def __call__(self) -> Any:
        """``fn`` at the unshifted inputs, with a graph."""
        return self.fn(*tree_unflatten(self.spec, self.leaves))

    def shifted(self, shifts: Sequence[torch.Tensor]) -> tuple[Any, list[torch.Tensor]]:
        """``fn`` with each checked tensor moved by its float64 shift, rounded to its dtype, and
        the displacements actually applied (float64). Runs without a graph."""
        leaves = list(self.leaves)
        applied = []
        inputs = len(self.input_slots)
        for slot, shift in zip(self.input_slots, shifts[:inputs]):
            base = leaves[slot].detach()
            moved = (base.to(torch.float64) + shift).to(base.dtype)
            applied.append(moved.to(torch.float64) - base.to(torch.float64))
            leaves[slot] = moved
        saved = [p.detach().clone() for p in self.params]
        try:
            with torch.no_grad():
                for param, base, shift in zip(self.params, saved, shifts[inputs:]):
                    param.copy_(base.to(torch.float64) + shift)
                    applied.append(param.to(torch.float64) - base.to(torch.float64))
                output = self.fn(*tree_unflatten(self.spec, leaves))
        finally:
            with torch.no_grad():
                for param, base in zip(self.params, saved):
                    param.copy_(base)
        return output, applied

    def records(self, stage: str) -> tuple[SolveRecord | None, ...]:
        """The layers' latest ``stage`` ("forward" or "backward") records."""
        return tuple(getattr(layer, f"last_{stage}") for layer in self.layers)


def _fresh(leaf: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    value = leaf.detach().to(dtype or leaf.dtype).clone()
    return value.requires_grad_(leaf.requires_grad)
