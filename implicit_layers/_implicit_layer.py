"""The autograd machinery every implicit layer shares.

An implicit layer's output ``w*`` solves ``F(w*, *params) = 0``. A subclass says how to find
``w*`` (:meth:`ImplicitLayer._find`) and what ``F`` is (:meth:`ImplicitLayer._residual`); this
module runs the forward with no graph, records it, and differentiates it implicitly.

The backward solves ``F_w^T x = b`` and returns ``-F_p^T x``. When the backward itself must be
differentiable (``create_graph=True``, or ``torch.func.grad``), ``x`` comes from an
:class:`_AdjointLayer`: the adjoint equation ``F_w(w, p)^T x = b`` is an implicit layer in
``(b, w, p)`` in its own right, so its derivatives (second order, and further) come from the same
machinery.
"""

from __future__ import annotations

import abc
import contextlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.autograd.forward_ad as fwAD
from torch import nn

from ._graph import in_functorch_transform, under_vmap
from ._implicit import ImplicitOperator, Residual, ResidualGraph
from ._linear import LinearSolver, as_linear_solver
from ._operator import FunctionOperator
from ._records import ON_FAILURE_CHOICES, OnFailure, SolveRecord, Status, report
from ._tree import FlatSpace, tree_flatten, tree_unflatten

__all__ = ["ImplicitLayer", "SolveInfo"]


@dataclass
class SolveInfo:
    """The records of one call of a layer: ``forward`` at once, ``backward`` once it has run
    (the latest, if the graph is differentiated more than once). A backward run with
    ``create_graph=True`` is itself a layer call: ``adjoint`` holds its info, whose
    ``backward`` is the second-order solve. ``tangent`` is the solve of a forward-mode
    derivative (``torch.func.jvp``, ``jacfwd``)."""

    forward: SolveRecord | None = None
    backward: SolveRecord | None = None
    adjoint: SolveInfo | None = None
    tangent: SolveRecord | None = None


class ImplicitLayer(nn.Module, abc.ABC):
    """Base of the layers whose output ``w*`` solves ``F(w*, *params) = 0``.

    The forward finds ``w*`` from ``w0`` with no graph kept. The backward, given
    ``b = dL/dw*``, solves ``F_w^T x = b`` with ``backward`` from one evaluation of ``F`` with a
    graph, and each param that requires grad receives ``-F_p^T x``. ``layer.last_forward`` and
    ``layer.last_backward`` hold the records of the most recent solves; :meth:`solve` returns a
    per-call :class:`SolveInfo`. A forward stopped by a NaN/Inf returns NaN (after the
    ``on_failure`` policy), so the failure reaches the loss. With ``warm_start=True`` each
    backward solve starts from the previous backward's solution (when its shape matches): in
    a training loop the system changes slowly, so fewer products are needed (the initial
    residual costs one). A failed solve warns (``on_failure="warn"``), raises
    ``ConvergenceError`` (``"raise"``) or is only recorded (``"ignore"``).

    The backward is differentiable: with ``create_graph=True`` (or under ``torch.func.grad``)
    ``x`` solves the adjoint equation as a layer of its own, whose backward solves the
    untransposed system ``F_w y = g`` with the same ``backward`` solver. Under autocast, the
    function runs in the autocast region in the forward and again in the backward, its output
    is cast to the dtype of ``w0``, and the solves run in that dtype.
    """

    def __init__(
        self,
        function: Callable[..., Any],
        solver: Any,
        backward: LinearSolver | Callable,
        on_failure: OnFailure,
        warm_start: bool = False,
    ):
        super().__init__()
        if not callable(function):
            raise TypeError(
                f"`{self._function_name}` must be callable as {self._function_name}(w, *params), "
                f"got {type(function).__name__}."
            )
        if on_failure not in ON_FAILURE_CHOICES:
            raise ValueError(
                f"`on_failure` must be one of {', '.join(map(repr, ON_FAILURE_CHOICES))}; "
                f"got {on_failure!r}."
            )
        if not (isinstance(solver, self._solver_type) or callable(solver)):
            raise TypeError(
                f"`solver` must be a {self._solver_type.__name__} ({self._solver_examples}) or a "
                f"callable (f, w0) -> w; got {type(solver).__name__}."
            )
        setattr(self, self._function_name, function)  # an nn.Module becomes a submodule
        self.solver = solver
        self.backward_solver = as_linear_solver(backward)
        self.on_failure = on_failure
        self.warm_start = bool(warm_start)
        self._previous_backward: torch.Tensor | None = None
        self.last_forward: SolveRecord | None = None
        self.last_backward: SolveRecord | None = None
        self.last_tangent: SolveRecord | None = None

    _function_name = "function"
    _start_name = "w0"  # what the initial guess is called in messages
    _solver_type: type = object  # the solver objects a subclass accepts, besides callables
    _solver_examples = ""
    _order = 0  # 1 for the adjoint layer of a differentiable backward, 2 for its adjoint...

    @property
    def function(self) -> Callable[..., Any]:
        """The user's function: ``phi`` of a fixed point, ``f`` of an argmin."""
        return getattr(self, self._function_name)

    def forward(self, w0: Any, *params: Any) -> Any:
        """The solution ``w*``, with the structure of ``w0``."""
        return self.solve(w0, *params)[0]

    def solve(self, w0: Any, *params: Any) -> tuple[Any, SolveInfo]:
        """Like calling the layer, and also return this call's :class:`SolveInfo`."""
        space = FlatSpace(w0, self._start_name)
        call = _Call(self, space, params)
        w_star = _ImplicitFunction.apply(call, space.flatten(w0).detach(), *call.tensors)
        if torch.is_grad_enabled() and not w_star.requires_grad and not in_functorch_transform():
            call.check_closure(w_star)
        del call.tensors  # the backward reads the saved tensors: keep no other reference
        return space.unflatten(w_star), call.info

    def extra_repr(self) -> str:
        return f"solver={self.solver!r}, backward={self.backward_solver!r}"

    @abc.abstractmethod
    def _find(
        self, function: Callable[..., Any], space: FlatSpace, params: tuple, w0: torch.Tensor
    ) -> tuple[torch.Tensor, SolveRecord]:
        """``w*`` as a flat vector from the flat ``w0``, and the record of the search.

        ``function`` is the user's function with every tensor it could reach detached, so an
        inner loop that calls ``.backward()`` cannot touch the gradients of the caller's tensors.
        """

    @abc.abstractmethod
    def _residual(self, space: FlatSpace, function: Callable[..., Any]) -> Residual:
        """``G(w, *params)`` from the user's ``function``, as a list of leaves matching ``w``:
        ``F = w - G`` when the class sets ``_identity_minus`` (a fixed point), else ``F = G``."""

    _identity_minus = False

    def _rows(self, space: FlatSpace) -> int | None:
        """How many independent rows ``w`` holds (a batch of samples that never mix); None
        for one vector."""
        return None

    def _keep(self, info: SolveInfo, stage: str, record: SolveRecord) -> None:
        """File ``record`` of the ``stage`` ("forward", "backward" or "tangent") solve and report
        it."""
        setattr(info, stage, record)
        setattr(self, f"last_{stage}", record)
        order = "" if stage == "forward" or self._order == 0 else f"order-{self._order + 1} "
        report(record, order + stage, self.on_failure)


def poisoned_if_nonfinite(w_star: torch.Tensor, record: SolveRecord) -> torch.Tensor:
    """All NaN when a NaN/Inf stopped the solve: the point the solver kept is finite, but
    handing it back (and a gradient taken there) would hide the failure from the loss, from a
    NaN check and from AMP's GradScaler."""
    if record.status is Status.NONFINITE:
        return torch.full_like(w_star, math.nan)
    return w_star


def _tangent_or_zeros(dual: torch.Tensor) -> torch.Tensor:
    tangent = fwAD.unpack_dual(dual).tangent
    return torch.zeros_like(dual) if tangent is None else tangent


def _autocast_state(device_type: str) -> dict | None:
    """The autocast region the forward runs in, to replay in the backward (``None``: none)."""
    if not torch.is_autocast_enabled(device_type):
        return None
    return {"device_type": device_type, "dtype": torch.get_autocast_dtype(device_type)}


class _Call:
    """Everything one call of a layer needs in its forward and backward (nothing is kept on
    the layer but the latest records).

    The call's tensor inputs are the tensor leaves of ``params`` and, for an ``nn.Module``
    function, its parameters that require grad. The backward never reads them from the
    module: it substitutes the saved tensors with ``functional_call``, so gradients reach the
    tensors the forward used (under ``functional_call``, or after saved-tensor hooks).
    """

    def __init__(self, layer: ImplicitLayer, space: FlatSpace, params: tuple):
        self.layer, self.space, self.info = layer, space, SolveInfo()
        leaves, self.param_spec = tree_flatten(params)
        self.tensor_slots = [i for i, leaf in enumerate(leaves) if isinstance(leaf, torch.Tensor)]
        self.constants = [None if isinstance(leaf, torch.Tensor) else leaf for leaf in leaves]
        explicit = [leaves[i] for i in self.tensor_slots]
        for slot, tensor in zip(self.tensor_slots, explicit):
            if tensor.ndim > 0 and tensor.device != space.device:
                raise ValueError(
                    f"params leaf {slot} is on {tensor.device} but `w0` is on {space.device}; "
                    "move them to one device."
                )
        own = []
        if isinstance(layer.function, nn.Module):
            own = [(name, p) for name, p in layer.function.named_parameters() if p.requires_grad]
        self.own_names = [name for name, _ in own]
        self.n_explicit = len(explicit)
        self.tensors = explicit + [p for _, p in own]
        self.autocast = _autocast_state(space.device.type)

    def bind(self, tensors: Sequence[torch.Tensor]) -> tuple[Callable[..., Any], tuple]:
        """The user's function and its params, with ``tensors`` in place of the call's tensor
        inputs."""
        leaves = list(self.constants)
        for slot, tensor in zip(self.tensor_slots, tensors[: self.n_explicit]):
            leaves[slot] = tensor
        params = tree_unflatten(self.param_spec, leaves)
        function = self.layer.function
        if not self.own_names:
            return function, params
        state = dict(zip(self.own_names, tensors[self.n_explicit :]))

        def with_state(*args: Any) -> Any:
            return torch.func.functional_call(function, state, args)

        return with_state, params

    def residual(self, w: Any, *tensors: torch.Tensor) -> list[torch.Tensor]:
        """``G(w, p)`` with ``tensors`` as the call's tensor inputs, in the forward's autocast
        region."""
        function, params = self.bind(tensors)
        region = torch.autocast(**self.autocast) if self.autocast else contextlib.nullcontext()
        with region:
            return self.layer._residual(self.space, function)(w, *params)

    def graph(
        self, w_star: torch.Tensor, tensors: Sequence[torch.Tensor], needs: Sequence[bool]
    ) -> ResidualGraph:
        return ResidualGraph(
            self.residual,
            self.space,
            tuple,
            w_star,
            tensors,
            needs,
            self.layer._identity_minus,
        )

    def solve_forward(self, w0: torch.Tensor, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
        function, params = self.bind([t.detach() for t in tensors])
        w_star, record = self.layer._find(function, self.space, params, w0)
        self.layer._keep(self.info, "forward", record)
        w_star = poisoned_if_nonfinite(w_star, record)
        if w_star.untyped_storage().data_ptr() == w0.untyped_storage().data_ptr():
            w_star = w_star.clone()  # never hand back (a view of) the caller's w0
        return w_star

    def solve_adjoint(self, graph: ResidualGraph, b: torch.Tensor) -> tuple[torch.Tensor, Any]:
        """``x`` with ``F_w^T x = b`` at the graph's point, and the solve's record."""
        layer, x0 = self.layer, None
        previous = layer._previous_backward
        if layer.warm_start and previous is not None and previous.shape == b.shape:
            x0 = previous.to(dtype=b.dtype, device=b.device)
        operator = ImplicitOperator(graph, layer._rows(self.space))
        x, record = layer.backward_solver.solve(operator, b, x0)
        if layer.warm_start:
            layer._previous_backward = x.detach()
        return x, record

    def solve_backward(
        self, w_star: torch.Tensor, tensors: Sequence[torch.Tensor], needs: Sequence[bool], b
    ) -> list[torch.Tensor | None]:
        graph = self.graph(w_star, tensors, needs)
        x, record = self.solve_adjoint(graph, b.reshape(-1))
        self.layer._keep(self.info, "backward", record)
        return graph.param_grads(x)

    def differentiable_backward(
        self, w_star: torch.Tensor, tensors: Sequence[torch.Tensor], needs: Sequence[bool], b
    ) -> list[torch.Tensor | None]:
        """The backward as differentiable operations: ``x`` from the adjoint layer, then
        ``-F_p^T x`` by ``torch.func.vjp`` at the live ``w*`` and params."""
        b = b.reshape(-1)
        x, self.info.adjoint = _AdjointLayer(self).solve(torch.zeros_like(b), b, w_star, *tensors)
        wanted = [i for i, need in enumerate(needs) if need]

        def residual_of(*chosen: torch.Tensor) -> list[torch.Tensor]:
            substituted = list(tensors)
            for i, tensor in zip(wanted, chosen):
                substituted[i] = tensor
            return self.residual(self.space.unflatten(w_star), *substituted)

        _, vjp = torch.func.vjp(residual_of, *[tensors[i] for i in wanted])
        grads = vjp(self.space.unflatten_leaves(x))
        result: list[torch.Tensor | None] = [None] * len(tensors)
        for i, grad in zip(wanted, grads):  # -F_p^T x: +G_p^T x for F = w - G, else -G_p^T x
            result[i] = grad if self.layer._identity_minus else -grad
        return result

    def solve_tangent(
        self,
        w_star: torch.Tensor,
        tensors: Sequence[torch.Tensor],
        tangents: Sequence[torch.Tensor | None],
    ) -> torch.Tensor:
        """Forward mode: the tangent ``t = -F_w^{-1} F_p dp`` of ``w*``, from ``F_w t = -F_p dp``
        solved with the layer's backward solver; the right-hand side and every product are one
        evaluation of ``G`` with dual numbers (at the dual level of the caller's jvp)."""
        space, minus = self.space, self.layer._identity_minus

        def pushed(w_tangent: torch.Tensor | None, param_tangents) -> torch.Tensor:
            """``G_w dw + G_p dp`` at ``(w*, p)``, flat."""

            def dual(tensor: torch.Tensor, tangent: torch.Tensor | None) -> torch.Tensor:
                primal = fwAD.unpack_dual(tensor).primal  # the caller's tangent is not ours
                return primal if tangent is None else fwAD.make_dual(primal, tangent)

            with fwAD._set_fwd_grad_enabled(True):  # a jvp rule runs with it off
                w = space.unflatten(dual(w_star, w_tangent))
                leaves = self.residual(w, *map(dual, tensors, param_tangents))
                return space.flatten_leaves([_tangent_or_zeros(leaf) for leaf in leaves])

        rhs = pushed(None, tangents)  # G_p dp; F_p dp is -G_p dp for F = w - G
        none = [None] * len(tensors)

        def product(vector: torch.Tensor) -> torch.Tensor:  # F_w v
            g_w = pushed(vector, none)
            return vector - g_w if minus else g_w

        operator = FunctionOperator(
            product, size=space.size, dtype=space.dtype, device=space.device
        )
        operator.rows = self.layer._rows(space)
        tangent, record = self.layer.backward_solver.solve(operator, rhs if minus else -rhs)
        self.layer._keep(self.info, "tangent", record)
        return tangent

    def check_closure(self, w_star: torch.Tensor) -> None:
        """Raise if the function closes over a tensor that requires grad: no input of this
        call requires grad, so the backward (where the check runs otherwise) never comes, and
        that tensor would silently get no gradient. Costs one evaluation with a graph."""
        tensors = [t.detach() for t in self.tensors]
        self.graph(w_star.detach(), tensors, [False] * len(tensors))._build()


class _AdjointLayer(ImplicitLayer):
    """``x = F_w(w, p)^{-T} b`` as an implicit layer in ``(b, w, p)``: a call's backward, made
    differentiable.

    Its equation is the adjoint equation, ``x = b + J^T x`` for a fixed point (``F = w - Phi``)
    and ``H x - b = 0`` for an argmin; its forward is the primal call's backward solve (filed
    as that call's backward record); its own backward solves ``F_w y = g``, the untransposed
    system, with the same linear solver. Second derivatives of the user's function come from
    ``torch.func.vjp`` inside the equation.
    """

    _function_name = "equation"
    _start_name = "x0"
    _solver_type = LinearSolver
    _solver_examples = "GMRES(), CG()"

    def __init__(self, primal: _Call):
        layer = primal.layer
        super().__init__(
            _adjoint_equation(primal),
            layer.backward_solver,
            layer.backward_solver,
            layer.on_failure,
        )
        self.primal = primal
        self._identity_minus = layer._identity_minus
        self._order = layer._order + 1

    def _find(self, equation, space, params, x0):
        b, w_star, *tensors = params
        graph = self.primal.graph(w_star, tensors, [False] * len(tensors))
        return self.primal.solve_adjoint(graph, b)

    def _residual(self, space, function):
        def residual(x, *params):
            return [function(x, *params)]

        return residual

    def _rows(self, space: FlatSpace) -> int | None:
        return self.primal.layer._rows(self.primal.space)

    def _keep(self, info: SolveInfo, stage: str, record: SolveRecord) -> None:
        if stage == "forward":  # this layer's forward is the primal call's backward solve
            info.forward = record
            self.primal.layer._keep(self.primal.info, "backward", record)
        else:
            super()._keep(info, stage, record)


def _adjoint_equation(primal: _Call) -> Callable[..., torch.Tensor]:
    """``G_adj(x, b, w, *p)``: ``b + G_w^T x`` for a fixed point (``x = G_adj`` at the
    solution), ``G_w^T x - b`` for an argmin (``G_adj = 0``)."""
    space = primal.space

    def equation(x: torch.Tensor, b: torch.Tensor, w: torch.Tensor, *tensors: torch.Tensor):
        def residual_of(w: torch.Tensor) -> list[torch.Tensor]:
            return primal.residual(space.unflatten(w), *tensors)

        _, vjp = torch.func.vjp(residual_of, w)
        (product,) = vjp(space.unflatten_leaves(x))
        return b + product if primal.layer._identity_minus else product - b

    return equation


class _ImplicitFunction(torch.autograd.Function):
    @staticmethod
    def forward(call: _Call, w0: torch.Tensor, *tensors: torch.Tensor) -> torch.Tensor:
        return call.solve_forward(w0, tensors)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        call, _, *tensors = inputs
        ctx.call = call
        ctx.save_for_backward(output, *tensors)
        ctx.save_for_forward(output, *tensors)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        w_star, *tensors = ctx.saved_tensors
        needs = ctx.needs_input_grad[2:]
        if not any(needs):
            return (None, None, *([None] * len(tensors)))
        if torch.is_grad_enabled() or in_functorch_transform():  # create_graph, torch.func
            grads = ctx.call.differentiable_backward(w_star, tensors, needs, grad)
        else:
            grads = ctx.call.solve_backward(w_star, tensors, needs, grad)
        return (None, None, *grads)

    @staticmethod
    def vmap(info, in_dims, call: _Call, w0: torch.Tensor, *tensors: torch.Tensor):
        """One solve per slice: the solver decides when to stop from the values it sees, so a
        vmapped layer is a loop over the slices (``jacrev`` vmaps the backward this way)."""
        _, w0_dim, *tensor_dims = in_dims

        def pick(tensor: torch.Tensor, dim: int | None, index: int) -> torch.Tensor:
            return tensor if dim is None else tensor.select(dim, index)

        slices = [
            _ImplicitFunction.apply(
                call,
                pick(w0, w0_dim, index),
                *(pick(t, dim, index) for t, dim in zip(tensors, tensor_dims)),
            )
            for index in range(info.batch_size)
        ]
        return torch.stack(slices), 0

    @staticmethod
    def jvp(ctx, _call_tangent, _w0_tangent, *tangents: torch.Tensor | None) -> torch.Tensor:
        w_star, *tensors = ctx.saved_for_forward
        if under_vmap():  # the tangent solve reads its residuals, which vmap forbids
            raise NotImplementedError(
                "implicit layers support forward-mode AD (torch.func.jvp, forward_ad) one "
                "tangent at a time, not under vmap (torch.func.jacfwd, torch.func.hessian): use "
                "torch.func.jacrev, and jacrev(jacrev(f)) for a Hessian."
            )
        return ctx.call.solve_tangent(w_star, tensors, tangents)
