"""What every implicit layer shares: the layer, one call's forward and backward computations.

A layer makes three independent choices. Its :class:`Equation` says what its output ``w*``
solves, ``F(w*, *params) = 0``, and how ``F`` is made of the user's function (a
:class:`~._residual.Form`); its ``solver`` finds ``w*``; its differentiation (``backward=``,
:mod:`._differentiate`) says how gradients are made. :class:`_Call` holds one call and does the
work the differentiation asks for: the forward solve, the backward solve ``F_w^T x = b`` (then
``-F_p^T x`` for the params), a differentiable backward, the tangent of forward mode.
"""

from __future__ import annotations

import abc
import collections
import contextlib
import math
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.autograd.forward_ad as fwAD
from torch import nn

from .._compat import (
    CAN_REENABLE_FORWARD_GRAD,
    forward_grad_enabled,
    in_functorch_transform,
    version_of,
)
from .._forward import ForwardSolver
from .._operator import FunctionOperator, LinearOperator
from .._records import (
    ON_FAILURE_CHOICES,
    LatestRecords,
    OnFailure,
    SolveInfo,
    SolveRecord,
    Status,
    report,
)
from .._tree import FlatSpace, tree_flatten, tree_unflatten
from ._differentiate import Differentiation, as_differentiation
from ._residual import Form, ImplicitOperator, Residual, ResidualGraph

__all__ = ["ImplicitLayer", "Equation", "solve_on_rows", "made_or_decorator", "checked_call"]


class Equation(abc.ABC):
    """One kind of layer: what its output solves and how it is found.

    ``form`` makes ``F`` of ``G``, the function :meth:`residual` evaluates from the user's
    function; :meth:`find` runs the layer's solver; :meth:`step_map` is the fixed-point map
    that :class:`Phantom` and :class:`Unrolled` step through, where the kind has one. The names
    are those of the user's function (its attribute on the layer), of ``w0`` and of the
    function's output, for messages.
    """

    form: Form
    kind: str  # "fixed-point", "argmin", "root": in messages
    has_map = False  # whether step_map gives a map (Phantom and Unrolled need one)
    function_name: str
    start_name: str = "w0"
    output_name: str
    solver_type: type
    solver_examples: str

    @abc.abstractmethod
    def find(
        self, solver: Any, function: Callable, space: FlatSpace, params: tuple, w0: torch.Tensor
    ) -> tuple[torch.Tensor, SolveRecord]:
        """``w*`` as a flat vector from the flat ``w0``, and the record of the search.

        ``function`` is the user's function with every tensor it could reach detached (unless
        the layer is :class:`Unrolled`), so an inner loop that calls ``.backward()`` cannot touch
        the gradients of the caller's tensors."""

    @abc.abstractmethod
    def residual(self, space: FlatSpace, function: Callable) -> Residual:
        """``G(w, *params)`` from the user's function, as a list of leaves matching ``w``."""

    def step_map(
        self, space: FlatSpace, function: Callable, params: tuple
    ) -> Callable[[torch.Tensor], torch.Tensor] | None:
        """``w -> Phi(w, *params)`` on flat vectors, or None for a kind with no such map."""
        return None


def checked_call(
    function: Callable, name: str, w: torch.Tensor, space: FlatSpace, *args: Any
) -> Any:
    """``function(w as a tree, *args)``, refusing a function that changed ``w`` in place (it
    would corrupt the solver's iterate and the caller's ``w0``, and look converged).

    A function that takes gradients inside, as HyperTorch's maps do
    (``w - a * autograd.grad(f(w), w, create_graph=True)[0]``), fails on the forward's detached
    ``w``; it then runs with grad mode on and ``w`` requiring grad, its output detached (it is
    remembered, so the failed attempt is made once per function)."""
    before = version_of(w)
    if function in _TAKES_GRADIENTS:
        out = _with_gradients(function, w, space, args)
    else:
        try:
            out = function(space.unflatten(w), *args)
        except RuntimeError as error:
            if w.requires_grad or "does not require grad" not in str(error):
                raise
            _TAKES_GRADIENTS.add(function)
            out = _with_gradients(function, w, space, args)
    if before is not None and version_of(w) != before:
        raise ValueError(
            f"`{name}` changed its input w in place (an operation such as "
            "w.mul_() or w += ...); it must return a new tensor: write w = w * 0.5 + c, not "
            "w.mul_(0.5).add_(c)."
        )
    return out


_TAKES_GRADIENTS: weakref.WeakSet = weakref.WeakSet()  # functions that differentiate inside


def _with_gradients(function: Callable, w: torch.Tensor, space: FlatSpace, args: tuple) -> Any:
    with torch.enable_grad():
        out = function(space.unflatten(w.detach().requires_grad_()), *args)
    leaves, spec = tree_flatten(out)
    detached = [leaf.detach() if isinstance(leaf, torch.Tensor) else leaf for leaf in leaves]
    return tree_unflatten(spec, detached)


def solve_on_rows(
    solver: ForwardSolver, step: Callable[[torch.Tensor], torch.Tensor], space: FlatSpace, w0
) -> tuple[torch.Tensor, SolveRecord]:
    """A forward solver on the flat map ``step``; on a space of rows it sees a
    ``(rows, n)`` matrix and judges each row on its own."""
    rows = space.rows
    if rows is None:
        return solver.solve(step, w0)

    def on_rows(z: torch.Tensor) -> torch.Tensor:
        return step(z.reshape(-1)).view(rows, -1)

    w, record = solver.solve(on_rows, w0.view(rows, -1))
    return w.reshape(-1), record


class ImplicitLayer(nn.Module):
    """A layer whose output ``w*`` solves ``F(w*, *params) = 0`` (see :class:`FixedPointLayer`,
    :class:`ArgminLayer`, :class:`RootLayer`, :class:`~implicit_layers.nn.DEQ`).

    The forward finds ``w*`` from ``w0`` with no graph kept. With an implicit ``backward`` (a
    linear solver, or a forward solver on the adjoint fixed point) the backward, given
    ``b = dL/dw*``, solves ``F_w^T x = b`` from one evaluation of ``F`` with a graph, and each
    param that requires grad receives ``-F_p^T x``; :class:`Phantom` and :class:`Unrolled`
    backpropagate through steps of the map instead. :meth:`solve` returns a per-call
    :class:`SolveInfo`; ``layer.last_forward``, ``last_backward`` and ``last_tangent`` hold the
    records of the latest solves made by the calling thread. A forward stopped by a NaN/Inf
    returns NaN (after the ``on_failure`` policy), so the failure reaches the loss. With
    ``warm_start=True`` each backward solve starts from the previous backward's solution of the
    same thread (when its shape matches). A failed solve warns (``on_failure="warn"``; once per
    layer, stage and status, at the caller's line, with the running count in ``layer.failures``),
    raises ``ConvergenceError`` (``"raise"``) or is only recorded (``"ignore"``). With
    ``per_sample=True`` every leaf of ``w0`` has a batch of independent samples in its first
    dimension, and each sample is judged and recorded on its own.

    The implicit backward is differentiable: with ``create_graph=True`` (or under
    ``torch.func.grad``) ``x`` solves the adjoint equation as a layer of its own, whose backward
    solves the untransposed system ``F_w y = g`` with the same linear solver. Under autocast,
    the function runs in the autocast region in the forward and again in the backward, its
    output is cast to the dtype of ``w0``, and the solves run in that dtype.
    """

    def __init__(
        self,
        equation: Equation,
        function: Callable[..., Any],
        solver: Any,
        backward: Any,
        on_failure: OnFailure,
        warm_start: bool = False,
        per_sample: bool = False,
        order: int = 0,
    ):
        super().__init__()
        name = equation.function_name
        if not callable(function):
            raise TypeError(
                f"`{name}` must be callable as {name}(w, *params), got {type(function).__name__}."
            )
        if on_failure not in ON_FAILURE_CHOICES:
            raise ValueError(
                f"`on_failure` must be one of {', '.join(map(repr, ON_FAILURE_CHOICES))}; "
                f"got {on_failure!r}."
            )
        _check_instance(solver, "solver")
        if not (isinstance(solver, equation.solver_type) or callable(solver)):
            raise TypeError(
                f"`solver` must be a {equation.solver_type.__name__} ({equation.solver_examples})"
                f" or a callable (f, w0) -> w; got {type(solver).__name__}."
            )
        for flag, value in (("warm_start", warm_start), ("per_sample", per_sample)):
            if not isinstance(value, bool):
                raise TypeError(f"`{flag}` must be True or False, got {value!r}.")
        self.equation = equation
        setattr(self, name, function)  # an nn.Module becomes a submodule
        self.solver = solver
        self.differentiation: Differentiation = as_differentiation(backward, equation, solver)
        self.on_failure = on_failure
        self.warm_start = warm_start
        self.per_sample = per_sample
        self.order = order  # 1 for the adjoint layer of a differentiable backward, 2 for its...
        self._latest = LatestRecords()
        # failed solves by (stage, status): the running count behind the warnings given once
        self.failures: collections.Counter[tuple[str, str]] = collections.Counter()

    @property
    def function(self) -> Callable[..., Any]:
        """The user's function: ``phi`` of a fixed point, ``f`` of an argmin, ``F`` of a root."""
        return getattr(self, self.equation.function_name)

    @property
    def last_forward(self) -> SolveRecord | None:
        """The record of this thread's latest forward solve."""
        return self._latest.forward

    @property
    def last_backward(self) -> SolveRecord | None:
        """The record of this thread's latest backward solve (None after a forward whose
        differentiation solves nothing, such as :class:`Phantom`)."""
        return self._latest.backward

    @property
    def last_tangent(self) -> SolveRecord | None:
        """The record of this thread's latest forward-mode (tangent) solve."""
        return self._latest.tangent

    def forward(self, w0: Any, *params: Any) -> Any:
        """The solution ``w*``, with the structure of ``w0``."""
        return self.solve(w0, *params)[0]

    def solve(self, w0: Any, *params: Any) -> tuple[Any, SolveInfo]:
        """Like calling the layer, and also return this call's :class:`SolveInfo`."""
        space = FlatSpace(w0, self.equation.start_name, per_sample=self.per_sample)
        call = _Call(self, space, params)
        start = space.flatten(w0).detach()
        if len(space.shapes) == 1:  # a view of the caller's tensor: the solver gets its own
            start = start.clone()
        w_star = self.differentiation.run(call, start)
        del call.tensors  # the backward reads the saved tensors: keep no other reference
        return space.unflatten(w_star), call.info

    def forward_solver(self) -> Any:
        """The solver of this call's forward solve (a subclass may adapt it, as ``DEQ`` does
        in eval mode)."""
        return self.solver

    def extra_repr(self) -> str:
        return f"solver={self.solver!r}, backward={self.differentiation!r}"

    def _report(self, record: SolveRecord, stage: str) -> None:
        """Count a failed solve in :attr:`failures` and act on it by ``on_failure``; a warning
        comes once per layer, stage and status (a loop failing every step would otherwise
        repeat it, its numbers changing, past Python's once-per-line rule)."""
        order = "" if stage == "forward" or self.order == 0 else f"order-{self.order + 1} "
        if record.failed:
            key = (order + stage, record.status.name)
            self.failures[key] += 1
            if self.on_failure == "warn" and self.failures[key] > 1:
                return
        note = " Further failures of this kind are counted in `layer.failures`, not warned again."
        report(record, order + stage, self.on_failure, note)


def made_or_decorator(layer_class: type, function: Callable | None, **options: Any) -> Any:
    """``layer_class(function, **options)``, or with no ``function`` a decorator making it:
    what every layer factory (``fixed_point_layer``, ``argmin_layer``, ``root_layer``) does."""

    def make(function: Callable[..., Any]) -> Any:
        return layer_class(function, **options)

    return make if function is None else make(function)


def _check_instance(value: Any, name: str) -> None:
    """A solver class where an instance is expected is callable, and would fail much later."""
    if isinstance(value, type):
        raise TypeError(
            f"`{name}` must be a solver object: pass `{value.__name__}()`, an instance, not the "
            f"class {value.__name__}."
        )


def poisoned_if_nonfinite(w_star: torch.Tensor, record: SolveRecord) -> torch.Tensor:
    """All NaN when a NaN/Inf stopped the solve: the point the solver kept is finite, but
    handing it back (and a gradient taken there) would hide the failure from the loss, from a
    NaN check and from AMP's GradScaler. (A product, so an unrolled graph stays connected.)"""
    if record.status is Status.NONFINITE:
        return w_star * math.nan
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
        self.equation = layer.equation
        leaves, self.param_spec = tree_flatten(params)
        self.tensor_slots = [i for i, leaf in enumerate(leaves) if isinstance(leaf, torch.Tensor)]
        self.constants = [None if isinstance(leaf, torch.Tensor) else leaf for leaf in leaves]
        explicit = [leaves[i] for i in self.tensor_slots]
        for slot, tensor in zip(self.tensor_slots, explicit):
            if tensor.ndim > 0 and tensor.device != space.device:
                raise ValueError(
                    f"params leaf {slot} is on {tensor.device} but `{space.name}` is on "
                    f"{space.device}; move them to one device."
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
        module: Any = function  # an nn.Module: only modules have own parameters

        def with_state(*args: Any) -> Any:
            return torch.func.functional_call(module, state, args)

        return with_state, params

    def residual(self, w: Any, *tensors: torch.Tensor) -> Sequence[torch.Tensor]:
        """``G(w, p)`` with ``tensors`` as the call's tensor inputs, in the forward's autocast
        region."""
        function, params = self.bind(tensors)
        region = torch.autocast(**self.autocast) if self.autocast else contextlib.nullcontext()
        try:
            with region:
                return self.equation.residual(self.space, function)(w, *params)
        except RuntimeError as error:
            if self.layer.function in _TAKES_GRADIENTS and in_functorch_transform():
                name = self.equation.function_name
                raise RuntimeError(
                    f"`{name}` takes gradients inside with torch.autograd.grad, which a "
                    "torch.func transform (jacrev, grad, vmap) cannot see through. Differentiate "
                    f"this layer with loss.backward() or torch.autograd.grad, or write `{name}` "
                    "with torch.func.grad instead."
                ) from error
            raise

    def step_map(self, tensors: Sequence[torch.Tensor]) -> Any:
        """The equation's fixed-point map on flat vectors, with ``tensors`` as inputs."""
        function, params = self.bind(tensors)
        return self.equation.step_map(self.space, function, params)

    def graph(
        self, w_star: torch.Tensor, tensors: Sequence[torch.Tensor], needs: Sequence[bool]
    ) -> ResidualGraph:
        return ResidualGraph(
            self.residual, self.space, tuple, w_star, tensors, needs, self.equation.form
        )

    def solve_forward(self, w0: torch.Tensor, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
        """``w*`` from ``w0`` with ``tensors`` as the inputs (detached ones keep no graph)."""
        function, params = self.bind(tensors)
        solver = self.layer.forward_solver()
        w_star, record = self.equation.find(solver, function, self.space, params, w0)
        self.file_forward(record)
        w_star = poisoned_if_nonfinite(w_star, record)
        inputs = [w0, *tensors]
        storages = {t.untyped_storage().data_ptr() for t in inputs if t.numel()}
        if w_star.numel() and w_star.untyped_storage().data_ptr() in storages:
            w_star = w_star.clone()  # never hand back (a view of) w0 or a param
        return w_star

    def file_forward(self, record: SolveRecord) -> None:
        self.info.forward = self.layer._latest.forward = record
        self.layer._report(record, "forward")

    def file_backward(self, record: SolveRecord) -> None:
        self.info.backward = self.layer._latest.backward = record
        self.layer._report(record, "backward")

    def file_tangent(self, record: SolveRecord) -> None:
        self.info.tangent = self.layer._latest.tangent = record
        self.layer._report(record, "tangent")

    @property
    def linear_solver(self) -> Any:
        """The solver of an :class:`Implicit` differentiation (the only kind that solves)."""
        differentiation: Any = self.layer.differentiation
        return differentiation.linear_solver

    def solve_adjoint(self, graph: ResidualGraph, b: torch.Tensor) -> tuple[torch.Tensor, Any]:
        """``x`` with ``F_w^T x = b`` at the graph's point, and the solve's record."""
        latest, x0 = self.layer._latest, None
        previous = latest.previous_backward
        if self.layer.warm_start and previous is not None and previous.shape == b.shape:
            x0 = previous.to(dtype=b.dtype, device=b.device)
        operator = ImplicitOperator(graph, self.space.rows)
        self.check_holomorphic(operator, b)
        x, record = self.linear_solver.solve(operator, b, x0)
        if self.layer.warm_start:
            latest.previous_backward = x.detach()
        return x, record

    def check_holomorphic(self, operator: Any, vector: torch.Tensor) -> None:
        """On a complex layer with a solver that relies on complex linearity, check that the
        operator has it, ``A (i v) = i A v`` at ``v``: it has when the function is holomorphic
        in ``w``, and an ``abs``, ``conj`` or ``.real`` of ``w`` breaks it. Two products."""
        solver = self.linear_solver
        if not vector.is_complex() or not solver.complex_linear or not bool(vector.any()):
            return
        plain, turned = operator.mv(vector), operator.mv(1j * vector)
        error = float(torch.linalg.vector_norm(turned - 1j * plain))
        scale = float(torch.linalg.vector_norm(plain)) + float(torch.linalg.vector_norm(vector))
        if error <= torch.finfo(vector.dtype).eps ** 0.5 * scale:
            return
        name = self.equation.function_name
        raise ValueError(
            f"{solver.method} treats the backward operator of this complex layer as "
            f"complex-linear, which it is only when `{name}` is holomorphic in w (no abs, conj, "
            f".real or .imag of w); here A(i v) differs from i A(v) by {error / scale:.1e} "
            "relatively. Use backward=Neumann(), or a forward solver on the adjoint fixed point "
            "(FixedPoint(), Anderson(), Broyden()): they need only real linearity."
        )

    def solve_backward(
        self, w_star: torch.Tensor, tensors: Sequence[torch.Tensor], needs: Sequence[bool], b
    ) -> list[torch.Tensor | None]:
        graph = self.graph(w_star, tensors, needs)
        x, record = self.solve_adjoint(graph, b.reshape(-1))
        self.file_backward(record)
        return graph.param_grads(x)

    def differentiable_backward(
        self, w_star: torch.Tensor, tensors: Sequence[torch.Tensor], needs: Sequence[bool], b
    ) -> list[torch.Tensor | None]:
        """The backward as differentiable operations: ``x`` from the adjoint layer, then
        ``-F_p^T x`` by ``torch.func.vjp`` at the live ``w*`` and params."""
        b = b.reshape(-1)
        rows = self.space.rows
        x0 = torch.zeros_like(b) if rows is None else b.new_zeros(rows, b.numel() // rows)
        x, self.info.adjoint = _adjoint_layer(self).solve(x0, b, w_star, *tensors)
        wanted = [i for i, need in enumerate(needs) if need]

        def residual_of(*chosen: torch.Tensor) -> Sequence[torch.Tensor]:
            substituted = list(tensors)
            for i, tensor in zip(wanted, chosen):
                substituted[i] = tensor
            return self.residual(self.space.unflatten(w_star), *substituted)

        vjp = torch.func.vjp(residual_of, *[tensors[i] for i in wanted])[1]
        grads = vjp(self.space.unflatten_leaves(x.reshape(-1)))
        result: list[torch.Tensor | None] = [None] * len(tensors)
        for i, grad in zip(wanted, grads):
            result[i] = self.equation.form.minus_f_p(grad)
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
        space, form = self.space, self.equation.form
        operator: Any
        if not CAN_REENABLE_FORWARD_GRAD:  # no dual numbers inside a jvp rule: reverse mode
            primal = [fwAD.unpack_dual(t).primal for t in tensors]
            needs = [t is not None for t in tangents]
            graph = self.graph(fwAD.unpack_dual(w_star).primal, primal, needs)
            operator = _Transposed(graph, space.rows)
            rhs = graph.param_jvp(tangents)  # G_p dp
        else:
            rhs = self._pushed(w_star, tensors, None, tangents)
            none = [None] * len(tensors)

            def product(vector: torch.Tensor) -> torch.Tensor:  # F_w v
                return form.f_w(vector, self._pushed(w_star, tensors, vector, none))

            operator = FunctionOperator(
                product, size=space.size, dtype=space.dtype, device=space.device
            )
            operator.rows = space.rows
        self.check_holomorphic(operator, rhs)
        tangent, record = self.linear_solver.solve(operator, form.minus_f_p(rhs))
        self.file_tangent(record)
        return tangent

    def _pushed(self, w_star, tensors, w_tangent, param_tangents) -> torch.Tensor:
        """``G_w dw + G_p dp`` at ``(w*, p)``, flat, by dual numbers."""

        def dual(tensor: torch.Tensor, tangent: torch.Tensor | None) -> torch.Tensor:
            primal = fwAD.unpack_dual(tensor).primal  # the caller's tangent is not ours
            return primal if tangent is None else fwAD.make_dual(primal, tangent)

        with forward_grad_enabled():  # a jvp rule runs with it off
            w = self.space.unflatten(dual(w_star, w_tangent))
            leaves = self.residual(w, *map(dual, tensors, param_tangents))
            return self.space.flatten_leaves([_tangent_or_zeros(leaf) for leaf in leaves])


class _Transposed(ImplicitOperator):
    """``F_w`` from the graph of ``G``, by reverse mode (the transpose of ``F_w^T``)."""

    def mv(self, vector: torch.Tensor) -> torch.Tensor:
        return self.graph.jvp_w(vector)

    mm = LinearOperator.mm  # column by column: ImplicitOperator's batched mm is of F_w^T

    def rmv(self, vector: torch.Tensor) -> torch.Tensor:
        return self.graph.vjp_w(vector)


class _AdjointEquation(Equation):
    """``x = F_w(w, p)^{-T} b`` as an implicit equation in ``(b, w, p)``: a call's backward,
    made differentiable.

    In the primal's form, ``G_adj = b + G_w^T x`` (a fixed point) or ``G_w^T x - b`` (a root);
    its forward is the primal call's backward solve (filed as that call's backward record); its
    own backward solves ``F_w y = g``, the untransposed system, with the same linear solver.
    Second derivatives of the user's function come from ``torch.func.vjp`` inside.
    """

    kind = "adjoint"
    function_name = "adjoint"
    start_name = "x0"
    output_name = "the adjoint equation"
    solver_examples = "GMRES(), CG()"

    def __init__(self, primal: _Call):
        self.primal, self.form = primal, primal.equation.form
        self.solver_type = object

    def find(self, solver, equation, space, params, x0):
        b, w_star, *tensors = params
        primal = self.primal
        graph = primal.graph(w_star, tensors, [False] * len(tensors))
        x, record = primal.solve_adjoint(graph, b)
        primal.file_backward(record)
        return x, record

    def residual(self, space, function):
        def residual(x, *params):
            return [function(x, *params)]

        return residual


def _adjoint_layer(primal: _Call) -> ImplicitLayer:
    layer, space, form = primal.layer, primal.space, primal.equation.form

    def equation(x: torch.Tensor, b: torch.Tensor, w: torch.Tensor, *tensors: torch.Tensor):
        def residual_of(w: torch.Tensor) -> Sequence[torch.Tensor]:
            return primal.residual(space.unflatten(w), *tensors)

        vjp = torch.func.vjp(residual_of, w)[1]
        (product,) = vjp(space.unflatten_leaves(x.reshape(-1)))
        return form.adjoint(b, product).view_as(x)

    solver = primal.linear_solver
    return ImplicitLayer(
        _AdjointEquation(primal),
        equation,
        solver,
        solver,
        layer.on_failure,
        per_sample=space.rows is not None,
        order=layer.order + 1,
    )
