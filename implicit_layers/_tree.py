"""Pytrees (nested tuples, namedtuples, lists and dicts) and the flat vector they are solved as."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["TreeSpec", "tree_flatten", "tree_unflatten", "FlatSpace"]


@dataclass(frozen=True)
class TreeSpec:
    """The structure of a pytree: its containers and keys (comparable and hashable)."""

    kind: str  # "leaf", "tuple", "namedtuple", "list" or "dict"
    keys: tuple = ()  # a dict's keys, or a namedtuple's class
    children: tuple[TreeSpec, ...] = ()

    @property
    def num_leaves(self) -> int:
        if self.kind == "leaf":
            return 1
        return sum(child.num_leaves for child in self.children)

    def __str__(self) -> str:
        if self.kind == "leaf":
            return "*"
        if self.kind == "dict":
            inner = ", ".join(f"{k!r}: {c}" for k, c in zip(self.keys, self.children))
            return "{" + inner + "}"
        inner = ", ".join(str(c) for c in self.children)
        if self.kind == "namedtuple":
            return f"{self.keys[0].__name__}({inner})"
        return f"({inner},)" if self.kind == "tuple" else f"[{inner}]"


_LEAF = TreeSpec("leaf")


def tree_flatten(tree: Any) -> tuple[list[Any], TreeSpec]:
    """Leaves of ``tree`` in a fixed order (dicts by sorted key) and its structure."""
    leaves: list[Any] = []
    return leaves, _flatten_into(tree, leaves)


def _flatten_into(tree: Any, leaves: list[Any]) -> TreeSpec:
    if isinstance(tree, dict):
        keys = tuple(sorted(tree))
        return TreeSpec("dict", keys, tuple(_flatten_into(tree[k], leaves) for k in keys))
    if isinstance(tree, (tuple, list)):
        children = tuple(_flatten_into(child, leaves) for child in tree)
        if hasattr(tree, "_fields"):
            return TreeSpec("namedtuple", (type(tree),), children)
        return TreeSpec("tuple" if isinstance(tree, tuple) else "list", (), children)
    leaves.append(tree)
    return _LEAF


def tree_unflatten(spec: TreeSpec, leaves: Sequence[Any]) -> Any:
    """Inverse of :func:`tree_flatten`."""
    iterator = iter(leaves)
    return _build(spec, iterator)


def _build(spec: TreeSpec, leaves) -> Any:
    if spec.kind == "leaf":
        return next(leaves)
    children = [_build(child, leaves) for child in spec.children]
    if spec.kind == "dict":
        return dict(zip(spec.keys, children))
    if spec.kind == "namedtuple":
        return spec.keys[0](*children)
    return tuple(children) if spec.kind == "tuple" else children


class FlatSpace:
    """A pytree of floating-point tensors seen as one flat vector.

    Iterative solvers work on flat vectors; this class converts both ways and checks that a tree
    (say, Phi's output) has the structure, shapes, dtype and device of the template tree ``w0``.
    A single tensor is flattened without a copy. With ``per_sample=True`` every leaf has a batch
    of ``rows`` independent samples in its first dimension, and the flat vector holds sample
    after sample (each sample's part of every leaf together), so that a ``(rows, n)`` view of it
    has one sample a row; otherwise ``rows`` is None.
    """

    def __init__(self, template: Any, name: str = "w0", per_sample: bool = False):
        leaves, self.spec = tree_flatten(template)
        if not leaves:
            raise TypeError(
                f"`{name}` must be a tensor or a pytree of tensors; it holds no leaves."
            )
        for index, leaf in enumerate(leaves):
            where = name if self.spec.kind == "leaf" else f"{name} (leaf {index})"
            if not isinstance(leaf, torch.Tensor):
                raise TypeError(
                    f"`{where}` must be a torch.Tensor, got {type(leaf).__name__}. "
                    "Convert it with torch.as_tensor(..., dtype=torch.float32)."
                )
            if not (leaf.dtype.is_floating_point or leaf.dtype.is_complex):
                raise TypeError(
                    f"`{where}` must have a real floating-point dtype or a complex one "
                    f"(float16/32/64, bfloat16, complex64/128), got {leaf.dtype}."
                )
        first = leaves[0]
        if first.device.type == "meta":
            raise ValueError(
                f"`{name}` is on the meta device, which holds shapes but no values: a solve "
                "needs values. Move it to the CPU or a GPU."
            )
        for index, leaf in enumerate(leaves[1:], 1):
            if leaf.dtype != first.dtype or leaf.device != first.device:
                raise TypeError(
                    f"every leaf of `{name}` must share one dtype and device, as they are solved "
                    f"as one vector: leaf 0 is {first.dtype} on {first.device}, leaf {index} is "
                    f"{leaf.dtype} on {leaf.device}."
                )
        if not sum(leaf.numel() for leaf in leaves):
            shapes = [tuple(leaf.shape) for leaf in leaves]
            raise ValueError(f"`{name}` has no entries (shapes {shapes}): nothing to solve.")
        self.name = name
        self.shapes = tuple(tuple(leaf.shape) for leaf in leaves)
        self.numels = tuple(leaf.numel() for leaf in leaves)
        self.size = sum(self.numels)
        self.dtype = first.dtype
        self.device = first.device
        # a single 1-D tensor is its own flat vector: no view on the hot path of every product
        self._is_flat = len(self.shapes) == 1 and len(self.shapes[0]) == 1
        self.rows: int | None = _batch_size(leaves, name) if per_sample else None
        # several leaves, by sample: each sample's part of each leaf, side by side in a row
        self._by_sample = self.rows is not None and len(leaves) > 1
        self._batch = self.rows or 1
        self._row_numels = [numel // self._batch for numel in self.numels]

    def flatten(self, tree: Any) -> torch.Tensor:
        return self.flatten_leaves(tree_flatten(tree)[0])

    def flatten_leaves(self, leaves: Sequence[torch.Tensor]) -> torch.Tensor:
        if self._is_flat:
            return leaves[0]
        if len(leaves) == 1:
            return leaves[0].reshape(-1)
        if self._by_sample:
            return torch.cat([leaf.reshape(self._batch, -1) for leaf in leaves], 1).reshape(-1)
        return torch.cat([leaf.reshape(-1) for leaf in leaves])

    def unflatten_leaves(self, vector: torch.Tensor) -> list[torch.Tensor]:
        if self._is_flat:
            return [vector]
        if len(self.shapes) == 1:
            return [vector.view(self.shapes[0])]
        if self._by_sample:
            parts = vector.view(self._batch, -1).split(self._row_numels, dim=1)
            return [part.reshape(shape) for part, shape in zip(parts, self.shapes)]
        return [part.view(shape) for part, shape in zip(vector.split(self.numels), self.shapes)]

    def unflatten(self, vector: torch.Tensor) -> Any:
        return tree_unflatten(self.spec, self.unflatten_leaves(vector))

    def check(self, tree: Any, what: str) -> list[torch.Tensor]:
        """Leaves of ``tree``, checked against the template; ``what`` names it in errors.

        Under autocast a floating-point leaf of another dtype is cast to the template's: the
        autocast region chose that dtype (a bfloat16 matmul), and the iterate keeps ``w0``'s."""
        leaves, spec = tree_flatten(tree)
        if spec != self.spec:
            raise ValueError(
                f"{what} must have the structure of `{self.name}`: "
                f"expected {self.spec}, got {spec}."
            )
        for index, (leaf, shape) in enumerate(zip(leaves, self.shapes)):
            where = what if spec.kind == "leaf" else f"{what} (leaf {index})"
            if not isinstance(leaf, torch.Tensor):
                raise TypeError(f"{where} must be a torch.Tensor, got {type(leaf).__name__}.")
            if tuple(leaf.shape) != shape:
                raise ValueError(
                    f"{where} must have the shape of `{self.name}`, {tuple(shape)}; "
                    f"got {tuple(leaf.shape)}."
                )
            if leaf.dtype != self.dtype and leaf.dtype.is_floating_point and _autocasting(leaf):
                leaves[index] = leaf = leaf.to(self.dtype)  # autocast chose it, not the user
            if leaf.dtype != self.dtype:
                raise TypeError(
                    f"{where} must have the dtype of `{self.name}`, {self.dtype}; got {leaf.dtype}."
                )
            if leaf.device != self.device:
                raise ValueError(
                    f"{where} must be on the device of `{self.name}`, {self.device}; "
                    f"got {leaf.device}."
                )
        return leaves


def _batch_size(leaves: Sequence[torch.Tensor], name: str) -> int:
    """The batch size every leaf has in its first dimension (``per_sample=True``)."""
    sizes = {leaf.shape[0] if leaf.ndim else None for leaf in leaves}
    if None in sizes or len(sizes) != 1:
        shapes = [tuple(leaf.shape) for leaf in leaves]
        raise ValueError(
            f"`{name}` must have the batch of samples in the first dimension of every leaf "
            f"(per-sample solves), one size for all; got leaf shapes {shapes}."
        )
    return leaves[0].shape[0]


def _autocasting(tensor: torch.Tensor) -> bool:
    return torch.is_autocast_enabled(tensor.device.type)
