"""``unroll``: iterative differentiation, by reverse mode through the steps of an inner loop.

``unroll(step, w0, lam, steps)`` runs ``w_{t+1} = step(w_t, lam, t)`` for ``t < steps`` and
returns ``w_T`` (``T = steps``), differentiable with respect to ``lam`` and ``w0``. Reverse mode
propagates the adjoint ``a_t = dL/dw_t`` back from ``a_T = dL/dw_T``::

    a_t    = (d step / d w (w_t, lam, t))^T a_{t+1}
    dL/dlam = sum_t (d step / d lam (w_t, lam, t))^T a_{t+1},      dL/dw0 = a_0

each term one vector-Jacobian product through one step. The modes differ in what they keep:
:class:`Full` keeps every step's graph, :class:`Recompute` keeps only the iterates and rebuilds
one step's graph at a time, :class:`Truncated` differentiates only the last ``k`` steps.

An inner optimizer with state (momentum buffers, Adam's moments) is unrolled by making the
state part of the iterate: ``w = (params, opt_state)``. Then ``step`` is a map of the iterate
like any other, :class:`Recompute` stores the state with the parameters, and gradients flow
through the state as they must (the momentum buffer carries ``d/dlr`` from step to step).
"""

from __future__ import annotations

import abc
import contextlib
from collections.abc import Callable, Iterator, Sequence
from contextvars import ContextVar
from typing import Any

import torch
from torch.autograd.function import once_differentiable

from ._graph import foreign_leaves
from ._options import check_positive_int, options
from ._tree import tree_flatten, tree_unflatten

__all__ = ["unroll", "UnrollMode", "Full", "Recompute", "Truncated"]

Step = Callable[[Any, Any, int], Any]


_GRAPH_DROPPED: ContextVar[bool] = ContextVar("implicit_layers_graph_dropped", default=False)


def graph_dropped() -> bool:
    """True while :func:`unroll` runs a step whose graph it drops (Recompute's forward,
    Truncated's first steps, any mode under ``torch.no_grad()``): a step may then skip
    ``create_graph=True``, as :func:`gradient_step` does. Grad mode is on all the same."""
    return _GRAPH_DROPPED.get()


@contextlib.contextmanager
def _graph_dropped(value: bool) -> Iterator[None]:
    """Set :func:`graph_dropped` for the steps run inside (restored after, so that an ``unroll``
    nested in a step, or a backward run inside one, sees its own value)."""
    token = _GRAPH_DROPPED.set(value)
    try:
        yield
    finally:
        _GRAPH_DROPPED.reset(token)


def _is_float(leaf: Any) -> bool:
    return isinstance(leaf, torch.Tensor) and leaf.dtype.is_floating_point


def _requiring_grad(leaf: Any) -> Any:
    """The contract with ``step``: every floating-point leaf of ``w`` it sees requires grad, so a
    step may always take ``torch.autograd.grad(loss, params)``."""
    if _is_float(leaf) and not leaf.requires_grad:
        return leaf.detach().requires_grad_()
    return leaf


def _detached(leaf: Any) -> Any:
    return leaf.detach() if isinstance(leaf, torch.Tensor) else leaf


class _Problem:
    """One call of :func:`unroll`: the step, the structure of ``w`` and ``lam``, the checks."""

    def __init__(self, step: Step, w0: Any, lam: Any, steps: int):
        self.step, self.steps = step, steps
        self.w0_leaves, self.spec = tree_flatten(w0)
        self.float_index = [i for i, leaf in enumerate(self.w0_leaves) if _is_float(leaf)]
        if not self.float_index:
            raise TypeError(
                "unroll: `w0` must hold at least one floating-point tensor (the iterate that "
                f"is differentiated); its leaves are {[type(x).__name__ for x in self.w0_leaves]}."
            )
        self.lam = lam
        self.lam_leaves, self.lam_spec = tree_flatten(lam)
        self.lam_float_index = [i for i, x in enumerate(self.lam_leaves) if _is_float(x)]
        self.lam_detached = tree_unflatten(self.lam_spec, [_detached(x) for x in self.lam_leaves])
        self.final_other: list[Any] = []  # Recompute: w_T's leaves that are not outputs

    def lam_with(self, floats: Sequence[torch.Tensor]) -> Any:
        leaves = list(self.lam_leaves)
        for i, x in zip(self.lam_float_index, floats):
            leaves[i] = x
        return tree_unflatten(self.lam_spec, leaves)

    def apply(self, leaves: list[Any], lam: Any, t: int) -> list[Any]:
        """``step(w_t, lam, t)`` as leaves, checked against ``w0``."""
        out, spec = tree_flatten(self.step(tree_unflatten(self.spec, leaves), lam, t))
        if spec != self.spec:
            raise ValueError(
                f"unroll: `step` must return an iterate with the structure of `w0`: expected "
                f"{self.spec}, got {spec} (at step t={t})."
            )
        for i in self.float_index:
            ref, got = self.w0_leaves[i], out[i]
            where = "`step`'s output" + ("" if self.spec.kind == "leaf" else f" (leaf {i})")
            if not isinstance(got, torch.Tensor):
                raise TypeError(f"unroll: {where} must be a tensor, got {type(got).__name__}.")
            if got.shape != ref.shape or got.dtype != ref.dtype or got.device != ref.device:
                raise ValueError(
                    f"unroll: {where} must have the shape, dtype and device of `w0`, "
                    f"{tuple(ref.shape)} {ref.dtype} {ref.device}; got {tuple(got.shape)} "
                    f"{got.dtype} {got.device} (at step t={t})."
                )
        return out

    def step_with_graph(self, leaves: list[Any], t: int) -> list[Any]:
        return self.apply([_requiring_grad(x) for x in leaves], self.lam, t)

    def step_detached(self, leaves: list[Any], t: int, check_closure: bool = False) -> list[Any]:
        """One step whose graph is dropped (grad mode is on all the same: ``step`` may take
        gradients). With ``check_closure`` its whole graph is built and searched for tensors
        that require grad and come from neither ``w`` nor ``lam``."""
        with _graph_dropped(not check_closure), torch.enable_grad():
            fresh = [_requiring_grad(_detached(x)) for x in leaves]
            out = self.apply(fresh, self.lam_detached, t)
            if check_closure:
                _check_no_closure([out[i] for i in self.float_index], fresh)
        return [_detached(x) for x in out]

    def run_detached(self, leaves: list[Any], start: int, stop: int) -> list[Any]:
        for t in range(start, stop):
            leaves = self.step_detached(leaves, t)
        return leaves


def _check_no_closure(outputs: list[torch.Tensor], own: list[Any]) -> None:
    """Raise if the graph of ``outputs`` reaches a tensor that requires grad other than ``own``:
    :class:`Recompute` could not give it its gradient."""
    foreign = foreign_leaves(outputs, own)
    if foreign:
        _raise_closure(foreign[0])


def _raise_closure(tensor: torch.Tensor) -> None:
    raise ValueError(
        "unroll(mode=Recompute()): `step` uses a tensor that requires grad but is not part of "
        f"`w` or `lam` (shape {tuple(tensor.shape)}, {tensor.dtype}), through a closure or a "
        "module's parameters. Recompute differentiates only with respect to `w0` and `lam`, so "
        "it would get no gradient: pass it in `lam`, detach it, or use Full()."
    )


class UnrollMode(abc.ABC):
    """How :func:`unroll` differentiates: :class:`Full`, :class:`Recompute` or
    :class:`Truncated`."""

    @abc.abstractmethod
    def _run(self, problem: _Problem) -> list[Any]:
        """The leaves of ``w_T``, with the graph this mode builds (grad mode is on)."""


@options
class Full(UnrollMode):
    """Plain autograd through every step (HyperTorch's ``reverse_unroll``).

    Memory: every step's graph, ``T`` times what one step saves for backward, which grows with
    the data and activations a step touches, not only with ``w``: for SGD with momentum it was
    1.5 times :class:`Recompute`'s iterates on ridge regression with ``n = d / 2`` samples, 6
    times with ``n = 5 d``, and 17 times on a small tanh network (``benchmarks/unroll_memory.py``,
    ``docs/unrolling.md``). Time: one backward through the stored graphs. The only mode that
    supports higher derivatives (``create_graph=True``) and gradients to tensors that ``step``
    closes over.
    """

    def _run(self, problem: _Problem) -> list[Any]:
        leaves = problem.w0_leaves
        for t in range(problem.steps):
            leaves = problem.step_with_graph(leaves, t)
        return leaves


@options
class Recompute(UnrollMode):
    """Reverse mode that stores only the iterates ``w_0 .. w_{T-1}`` and recomputes each step's
    graph in the backward pass (HyperTorch's ``reverse``).

    The forward runs the steps without keeping their graphs and stores each detached iterate
    (for ``w = (params, opt_state)``: the parameters and the optimizer's state). The backward
    walks ``t = T-1, ..., 0``: it rebuilds ``step(w_t, lam, t)`` from the stored ``w_t``, takes
    one vector-Jacobian product for ``a_t`` and the ``lam`` term, and frees that graph.
    Memory: ``T`` copies of ``w`` plus one step's graph. Time: one more forward per step than
    :class:`Full` (1.3 to 2.3 times Full's time in the benchmark). The gradients are Full's, to
    rounding.

    ``step`` must be a deterministic function of ``(w, lam, t)``: choose a minibatch from ``t``,
    not from an iterator, and avoid random ops (they would differ when recomputed). Everything
    it differentiates must come in through ``w`` or ``lam``; a tensor that requires grad
    reached through a closure is an error (checked on the first step). First derivatives only.
    """

    def _run(self, problem: _Problem) -> list[Any]:
        w_floats = [problem.w0_leaves[i] for i in problem.float_index]
        lam_floats = [problem.lam_leaves[i] for i in problem.lam_float_index]
        outputs = _RecomputeFunction.apply(problem, len(w_floats), *w_floats, *lam_floats)
        leaves = list(problem.final_other)
        for i, out in zip(problem.float_index, outputs):
            leaves[i] = out
        return leaves


class _RecomputeFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, problem: _Problem, n_w: int, *tensors: torch.Tensor):
        leaves = list(problem.w0_leaves)
        for i, x in zip(problem.float_index, tensors[:n_w]):
            leaves[i] = x.detach()
        stored: list[torch.Tensor] = []
        others: list[list[Any]] = []
        for t in range(problem.steps):
            stored.extend(leaves[i] for i in problem.float_index)
            others.append(leaves)  # the float leaves are replaced by the saved ones on use
            leaves = problem.step_detached(leaves, t, check_closure=t == 0)
        ctx.save_for_backward(*stored, *tensors[n_w:])
        ctx.problem, ctx.n_w = problem, n_w
        # keep only the leaves that are not floating-point tensors (counts, flags)
        ctx.others = [[None if _is_float(x) else x for x in row] for row in others]
        problem.final_other = [None if _is_float(x) else x for x in leaves]
        return tuple(leaves[i] for i in problem.float_index)

    @staticmethod
    @once_differentiable
    def backward(ctx, *adjoint_out: torch.Tensor | None):
        problem: _Problem = ctx.problem
        n_w, steps = ctx.n_w, problem.steps
        saved = ctx.saved_tensors
        lam_floats = saved[n_w * steps :]
        need_w0 = any(ctx.needs_input_grad[2 : 2 + n_w])
        need_lam = list(ctx.needs_input_grad[2 + n_w :])
        lam_vars = [x.detach().requires_grad_() for x in lam_floats]
        lam = problem.lam_with(lam_vars)
        wanted_lam = [v for v, need in zip(lam_vars, need_lam) if need]
        lam_grads: list[torch.Tensor | None] = [None] * len(wanted_lam)
        adjoint: list[torch.Tensor | None] = list(adjoint_out)
        for t in reversed(range(steps)):
            if all(a is None for a in adjoint):
                break
            leaves = list(ctx.others[t])
            w_vars = [x.detach().requires_grad_() for x in saved[t * n_w : (t + 1) * n_w]]
            for i, v in zip(problem.float_index, w_vars):
                leaves[i] = v
            with _graph_dropped(False), torch.enable_grad():
                out = problem.apply(leaves, lam, t)
                pairs = [
                    (out[i], a)
                    for i, a in zip(problem.float_index, adjoint)
                    if a is not None and out[i].requires_grad
                ]
                inputs = (w_vars if t > 0 or need_w0 else []) + wanted_lam
                if not pairs or not inputs:
                    adjoint = [None] * n_w
                    continue
                grads = torch.autograd.grad(
                    [o for o, _ in pairs], inputs, [a for _, a in pairs], allow_unused=True
                )
            n_in = len(inputs) - len(wanted_lam)
            adjoint = list(grads[:n_in]) if n_in else [None] * n_w
            for j, g in enumerate(grads[n_in:]):
                if g is not None:
                    previous = lam_grads[j]
                    lam_grads[j] = g if previous is None else previous + g
        w0_grads = adjoint if need_w0 else [None] * n_w
        lam_iter = iter(lam_grads)
        lam_out = [next(lam_iter) if need else None for need in need_lam]
        return (None, None, *w0_grads, *lam_out)


@options
class Truncated(UnrollMode):
    """Backpropagate through the last ``k`` steps only; the first ``T - k`` run without a graph.

    Truncated backpropagation (Shaban et al., 2019): the gradient ignores how ``w_{T-k}``
    depends on ``lam`` (and ``w_T`` does not depend on ``w0`` at all when ``k < T``), so it is
    biased, but its memory is ``k`` steps' graphs whatever ``T`` is. ``k >= T`` is :class:`Full`.
    """

    k: int

    def __post_init__(self) -> None:
        check_positive_int(self, "k", self.k)

    def _run(self, problem: _Problem) -> list[Any]:
        start = max(problem.steps - self.k, 0)
        leaves = problem.run_detached(problem.w0_leaves, 0, start)
        for t in range(start, problem.steps):
            leaves = problem.step_with_graph(leaves, t)
        return leaves


_FULL = Full()


def unroll(step: Step, w0: Any, lam: Any, steps: int, *, mode: UnrollMode = _FULL) -> Any:
    """``w_T`` of ``w_{t+1} = step(w_t, lam, t)``, ``t = 0 .. steps-1``, differentiable in
    ``lam`` and ``w0`` by reverse mode through the steps.

    ``w0`` is a tensor or a pytree of tensors; ``step`` must return the same structure, shapes
    and dtypes. For an optimizer with state make the iterate ``(params, opt_state)`` (see
    :func:`gradient_step`, :func:`sgd`, :func:`adam`). ``lam`` is any pytree; its floating-point
    tensors are differentiated, and may include the inner optimizer's own hyperparameters
    (learning rate, momentum), which implicit differentiation cannot reach. ``step`` is always
    called with grad mode on and every floating-point leaf of ``w`` requiring grad, so it may
    take ``torch.autograd.grad(loss, params, create_graph=True)`` in every mode. ``mode`` is
    :class:`Full` (the default), :class:`Recompute` or :class:`Truncated`. Under
    ``torch.no_grad()`` the steps run without keeping any graph, in every mode.

    Gradient descent on ``(w - c)^2`` with step size ``lr``: ``w_T = c + (1 - 2 lr)^T (w0 - c)``,
    so ``dw_T/dlr = -2 T (1 - 2 lr)^(T-1) (w0 - c)``.

    >>> def step(w, lam, t):
    ...     c, lr = lam
    ...     return w - lr * 2 * (w - c)
    >>> c, lr = torch.tensor(1.0), torch.tensor(0.1, requires_grad=True)
    >>> w = unroll(step, torch.zeros(1), (c, lr), 10, mode=Recompute())
    >>> torch.autograd.grad(w.sum(), lr)[0]      # -2 * 10 * 0.8**9 * (0 - 1) = 2.6844
    tensor(2.6844)
    """
    if not callable(step):
        raise TypeError(f"unroll: `step` must be callable as step(w, lam, t), got {step!r:.60}.")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"unroll: `steps` must be a positive integer, got {steps!r}.")
    if not isinstance(mode, UnrollMode):
        raise TypeError(
            f"unroll: `mode` must be Full(), Recompute() or Truncated(k=...), got {mode!r:.60}."
        )
    problem = _Problem(step, w0, lam, steps)
    if torch.is_grad_enabled():
        with _graph_dropped(False):
            leaves = mode._run(problem)
    else:
        leaves = problem.run_detached(problem.w0_leaves, 0, steps)
    return tree_unflatten(problem.spec, leaves)
