"""``BilevelTrainer``: alternate inner training steps and hypergradient steps.

The runner behind most hyperparameter-optimisation and meta-learning loops. The inner model is
an ``nn.Module`` trained in place by any ``torch.optim`` optimizer, so its weights carry over
from one outer step to the next (a warm start of the inner problem). Every ``unroll_steps``
inner steps, :func:`hypergradient` treats the current weights as ``w*(lam)`` and the outer
optimizer takes one step on the hyperparameters ``lam`` (an ``nn.Module`` or tensors).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ._distributed import GroupAverage
from ._hypergradient import HypergradientMethod, hypergradient_and_loss
from ._layers.argmin import DEFAULT_HESSIAN_SOLVER
from ._linear import LinearSolver
from ._records import OnFailure, SolveRecord
from ._tree import tree_flatten, tree_unflatten

__all__ = ["BilevelTrainer", "BilevelLog"]

Loss = Callable[[nn.Module, Any, Any], torch.Tensor]


@dataclass(frozen=True)
class BilevelLog:
    """What one outer step saw: passed to the callback and collected by ``run``.

    ``step`` counts inner steps so far; ``inner_loss`` is the loss of the last inner step,
    ``outer_loss`` the outer loss at the weights the hypergradient was taken at (before the
    outer update), ``hypergradient_norm`` the 2-norm over every hyperparameter, and ``record``
    the record of the hypergradient's linear solve.
    """

    step: int
    outer_step: int
    inner_loss: float
    outer_loss: float
    hypergradient_norm: float
    record: SolveRecord


class _Objective(nn.Module):
    """The inner model and the hyperparameter module under one root, so one
    ``functional_call`` swaps both sets of tensors while a user's loss runs."""

    def __init__(self, model: nn.Module, hyper: nn.Module | None):
        super().__init__()
        self.model, self.hyper = model, hyper

    def forward(self, loss: Loss, hyper: Any, batch: Any) -> torch.Tensor:
        return loss(self.model, self.hyper if hyper is None else hyper, batch)


def _detached(tree: Any) -> Any:
    leaves, spec = tree_flatten(tree)
    return tree_unflatten(spec, [leaf.detach() for leaf in leaves])


def _batches(data: Iterable | Callable[[], Any], name: str) -> Iterator:
    """An endless stream of batches: a callable is called each time; an iterable (a
    ``DataLoader``, a list of batches) is iterated again whenever it runs out."""
    if callable(data) and not isinstance(data, nn.Module):
        return iter(data, object())  # calls data() forever
    if isinstance(data, torch.Tensor) or not isinstance(data, Iterable):
        raise TypeError(
            f"`{name}` must be an iterable of batches (a DataLoader, a list of batches) or a "
            f"callable returning a batch; got {type(data).__name__}. For one full batch, pass "
            "`[batch]`."
        )

    def endless() -> Iterator:
        for epoch in itertools.count():
            empty = True
            for batch in data:
                empty = False
                yield batch
            if empty:
                raise ValueError(f"`{name}` yielded no batch (epoch {epoch}).")

    return endless()


SCHEDULES = ("every", "hypergrad")


class BilevelTrainer:
    """Alternates inner and outer updates, in the spirit of hypergrad's ``Solver``.

    ``inner_loss(model, hyper, batch)`` and ``outer_loss(model, hyper, batch)`` are written as
    ordinary PyTorch code on the inner ``model`` and the hyperparameters ``hyper`` (the
    ``nn.Module`` or the tensors given); for the hypergradient they run under
    ``torch.func.functional_call`` with the weights and hyperparameters as variables. Each
    inner step draws a batch of ``inner_data`` and steps ``inner_optimizer`` (over the
    model's parameters). After every ``unroll_steps`` inner steps, once ``outer_patience_iters``
    have passed, an outer step draws a batch of each, sets ``hyper``'s ``.grad`` to
    ``d outer / d hyper = grad_hyper g - (grad^2_{hyper w} f)^T H^{-1} grad_w g`` at the
    current weights (``method`` solves with ``H``) and steps ``outer_optimizer``.

    Data are iterables of batches, re-iterated when they run out, or callables returning a
    batch. With ``process_group``, each rank draws its own shard's batches (of one size on
    every rank): the inner gradients are averaged over the group before each inner step, as
    ``DistributedDataParallel`` does, and the hypergradient is :func:`hypergradient`'s over the
    group, so every rank takes the steps of one process on the batches of all ranks together.
    With ``progress=True`` a ``tqdm`` bar shows the losses when tqdm is installed.
    ``callback(log)`` receives each outer step's :class:`BilevelLog`; ``after_outer_step(trainer)``
    runs after it with the trainer itself (hypergrad's ``post_outer_update``: reset the inner
    weights, change a learning rate).

    ``schedule`` says after which inner steps the outer steps come. ``"every"`` (default): after
    inner step ``s`` whenever ``s`` is a multiple of ``unroll_steps`` and ``s >=
    outer_patience_iters``, so ``run(1000)`` with ``unroll_steps=100`` makes 10. ``"hypergrad"``:
    hypergrad's ``Solver`` step for step, which counts the steps taken before the current one:
    after inner step ``s`` when ``s - 1`` is a positive multiple of ``unroll_steps`` and
    ``s - 1 >= outer_patience_iters``, so the same run makes 9, each one inner step later.

    >>> _ = torch.manual_seed(0)
    >>> X, y = torch.randn(40, 5), torch.randn(40)
    >>> model = torch.nn.Linear(5, 1, bias=False)
    >>> log_decay = torch.zeros(5, requires_grad=True)
    >>> def inner_loss(model, log_decay, batch):
    ...     X, y = batch
    ...     decay = 0.5 * (log_decay.exp() * model.weight[0] ** 2).sum()
    ...     return ((model(X)[:, 0] - y) ** 2).mean() + decay
    >>> def outer_loss(model, log_decay, batch):
    ...     X, y = batch
    ...     return ((model(X)[:, 0] - y) ** 2).mean()
    >>> trainer = BilevelTrainer(
    ...     model, log_decay, inner_loss, outer_loss, [(X[:20], y[:20])], [(X[20:], y[20:])],
    ...     inner_optimizer=torch.optim.SGD(model.parameters(), lr=0.2),
    ...     outer_optimizer=torch.optim.Adam([log_decay], lr=0.1),
    ...     unroll_steps=50, progress=False)
    >>> logs = trainer.run(500)
    >>> len(logs), logs[-1].outer_loss < logs[0].outer_loss
    (10, True)
    """

    def __init__(
        self,
        model: nn.Module,
        hyper: nn.Module | Any,
        inner_loss: Loss,
        outer_loss: Loss,
        inner_data: Iterable | Callable[[], Any],
        outer_data: Iterable | Callable[[], Any],
        *,
        inner_optimizer: torch.optim.Optimizer,
        outer_optimizer: torch.optim.Optimizer,
        method: LinearSolver | HypergradientMethod | Callable = DEFAULT_HESSIAN_SOLVER,
        unroll_steps: int = 1,
        outer_patience_iters: int = 0,
        callback: Callable[[BilevelLog], None] | None = None,
        after_outer_step: Callable[[BilevelTrainer], None] | None = None,
        schedule: str = "every",
        progress: bool = True,
        on_failure: OnFailure = "warn",
        process_group: Any = None,
    ):
        if not isinstance(model, nn.Module):
            raise TypeError(f"`model` must be an nn.Module, got {type(model).__name__}.")
        for name, optimizer in (
            ("inner_optimizer", inner_optimizer),
            ("outer_optimizer", outer_optimizer),
        ):
            if not isinstance(optimizer, torch.optim.Optimizer):
                raise TypeError(
                    f"`{name}` must be a torch.optim.Optimizer, got {type(optimizer).__name__}."
                )
        for name, value, low in (
            ("unroll_steps", unroll_steps, 1),
            ("outer_patience_iters", outer_patience_iters, 0),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"`{name}` must be an int >= {low}, got {value!r}.")
        if schedule not in SCHEDULES:
            raise ValueError(f"`schedule` must be one of {SCHEDULES}, got {schedule!r}.")
        for name, hook in (("callback", callback), ("after_outer_step", after_outer_step)):
            if hook is not None and not callable(hook):
                raise TypeError(f"`{name}` must be callable or None, got {hook!r:.60}.")
        self.model, self.hyper = model, hyper
        self.schedule, self.after_outer_step = schedule, after_outer_step
        self.process_group = process_group
        self._average = None if process_group is None else GroupAverage(process_group)
        self.inner_loss, self.outer_loss = inner_loss, outer_loss
        self.inner_optimizer, self.outer_optimizer = inner_optimizer, outer_optimizer
        self.method, self.on_failure = method, on_failure
        self.unroll_steps, self.outer_patience_iters = unroll_steps, outer_patience_iters
        self.callback, self.progress = callback, progress
        self._inner_batches = _batches(inner_data, "inner_data")
        self._outer_batches = _batches(outer_data, "outer_data")
        self._objective = _Objective(model, hyper if isinstance(hyper, nn.Module) else None)
        self.steps = 0
        self.outer_steps = 0
        self._hyper_tensors = self._hyperparameters()
        self._last_inner_loss = float("nan")

    def _hyperparameters(self) -> dict[str, torch.Tensor] | Any:
        if isinstance(self.hyper, nn.Module):
            return dict(self.hyper.named_parameters())
        for index, leaf in enumerate(tree_flatten(self.hyper)[0]):
            if not (isinstance(leaf, torch.Tensor) and leaf.requires_grad):
                raise TypeError(
                    "`hyper` must be an nn.Module or tensors that require grad; leaf "
                    f"{index} is {leaf!r:.60}."
                )
        return self.hyper

    def _weights(self) -> dict[str, torch.Tensor]:
        return {n: p for n, p in self.model.named_parameters() if p.requires_grad}

    def _evaluate(self, loss: Loss, w: dict, lam: Any, batch: Any) -> torch.Tensor:
        """``loss`` with the weights ``w`` and the hyperparameters ``lam`` swapped in."""
        tensors = {f"model.{name}": value for name, value in w.items()}
        if isinstance(self.hyper, nn.Module):
            tensors.update({f"hyper.{name}": value for name, value in lam.items()})
            lam = None
        return torch.func.functional_call(self._objective, tensors, (loss, lam, batch))

    def inner_step(self) -> float:
        """One step of the inner optimizer on a batch of ``inner_data``; returns its loss."""
        weights = self._weights()
        lam = _detached(self._hyper_tensors)
        with torch.enable_grad():
            loss = self._evaluate(self.inner_loss, weights, lam, next(self._inner_batches))
            grads: Sequence[torch.Tensor | None] = torch.autograd.grad(
                loss, list(weights.values()), allow_unused=True
            )
        if self._average is not None:  # the gradient of all the shards, as DDP averages it
            grads = self._average.many(
                [torch.zeros_like(p) if g is None else g for g, p in zip(grads, weights.values())]
            )
        for parameter, grad in zip(weights.values(), grads):
            parameter.grad = grad
        self.inner_optimizer.step()
        self.inner_optimizer.zero_grad(set_to_none=True)
        self.steps += 1
        self._last_inner_loss = loss.item()
        return self._last_inner_loss

    def outer_step(self) -> BilevelLog:
        """One hypergradient at the current weights and one step of the outer optimizer."""
        inner_batch, outer_batch = next(self._inner_batches), next(self._outer_batches)
        w = {name: p.detach() for name, p in self._weights().items()}
        grads, record, outer_value = hypergradient_and_loss(
            lambda w, lam: self._evaluate(self.inner_loss, w, lam, inner_batch),
            lambda w, lam: self._evaluate(self.outer_loss, w, lam, outer_batch),
            w,
            _detached(self._hyper_tensors),
            self.method,
            self.on_failure,
            self.process_group,
        )
        leaves = tree_flatten(self._hyper_tensors)[0]
        grad_leaves = tree_flatten(grads)[0]
        for leaf, grad in zip(leaves, grad_leaves):
            leaf.grad = grad
        self.outer_optimizer.step()
        self.outer_steps += 1
        norm = math.sqrt(sum(float(torch.linalg.vector_norm(g)) ** 2 for g in grad_leaves))
        log = BilevelLog(
            step=self.steps,
            outer_step=self.outer_steps,
            inner_loss=self._last_inner_loss,
            outer_loss=float(outer_value),
            hypergradient_norm=norm,
            record=record,
        )
        if self.callback is not None:
            self.callback(log)
        if self.after_outer_step is not None:
            self.after_outer_step(self)
        return log

    def _outer_step_due(self) -> bool:
        """Whether an outer step follows the inner step just taken (see ``schedule``)."""
        if self.schedule == "every":
            steps, first = self.steps, self.outer_patience_iters
        else:  # hypergrad counts the steps taken before this one, and never outer-steps at 0
            steps, first = self.steps - 1, max(self.outer_patience_iters, 1)
        return steps >= first and steps % self.unroll_steps == 0

    def run(self, num_iters: int) -> list[BilevelLog]:
        """``num_iters`` inner steps, with an outer step after every ``unroll_steps`` of them
        once ``outer_patience_iters`` have been taken; returns the outer steps' logs."""
        if isinstance(num_iters, bool) or not isinstance(num_iters, int) or num_iters < 0:
            raise ValueError(f"`num_iters` must be an int >= 0, got {num_iters!r}.")
        logs: list[BilevelLog] = []
        bar = _progress_bar(num_iters) if self.progress else None
        for _ in range(num_iters):
            self.inner_step()
            if self._outer_step_due():
                logs.append(self.outer_step())
                if bar is not None:
                    bar.set_postfix(inner=logs[-1].inner_loss, outer=logs[-1].outer_loss)
            if bar is not None:
                bar.update()
        if bar is not None:
            bar.close()
        return logs


def _progress_bar(total: int):
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc="bilevel", leave=False)
