"""``BilevelTrainer``: its schedule, its hypergradients against a dense float64 solve, its data
streams, logs and errors."""

from __future__ import annotations

import sys

import pytest
import torch

from implicit_layers import CG, BilevelLog, BilevelTrainer, Direct

f64 = torch.float64
N, D = 30, 4


def ridge_data(seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    X = torch.randn(2 * N, D, generator=generator, dtype=f64)
    y = X @ torch.randn(D, generator=generator, dtype=f64) + torch.randn(
        2 * N, generator=generator, dtype=f64
    )
    return (X[:N], y[:N]), (X[N:], y[N:])


def squared_error(model, batch):
    X, y = batch
    return 0.5 * ((model(X)[:, 0] - y) ** 2).mean()


def inner_loss(model, log_decay, batch):
    return squared_error(model, batch) + 0.5 * (log_decay.exp() * model.weight[0] ** 2).sum()


def outer_loss(model, log_decay, batch):
    return squared_error(model, batch)


class Decay(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.log_decay = torch.nn.Parameter(torch.linspace(-1.0, 0.5, D, dtype=f64))


def make_trainer(hyper_module: bool, lr: float = 0.0, **options):
    train, val = ridge_data()
    model = torch.nn.Linear(D, 1, bias=False).to(f64)
    torch.nn.init.zeros_(model.weight)
    if hyper_module:
        hyper = Decay()
        parameters, loss = (
            list(hyper.parameters()),
            (
                lambda m, h, b: inner_loss(m, h.log_decay, b),
                lambda m, h, b: outer_loss(m, h.log_decay, b),
            ),
        )
    else:
        hyper = torch.linspace(-1.0, 0.5, D, dtype=f64).requires_grad_()
        parameters, loss = [hyper], (inner_loss, outer_loss)
    options = dict(dict(method=Direct(), unroll_steps=5, progress=False), **options)
    trainer = BilevelTrainer(
        model,
        hyper,
        *loss,
        [train],
        [val],
        inner_optimizer=torch.optim.SGD(model.parameters(), lr=0.3),
        outer_optimizer=torch.optim.SGD(parameters, lr=lr),
        **options,
    )
    return trainer, model, parameters[0], train, val


def dense_hypergradient(w, log_decay, train, val):
    """``-(d^2 f / dlam dw)^T H^{-1} grad_w g`` at the weights ``w`` (not only at ``w*``)."""
    (X, _), (X_val, y_val) = train, val
    hessian = X.T @ X / N + torch.diag(log_decay.exp())
    grad_g = X_val.T @ (X_val @ w - y_val) / N
    return -(log_decay.exp() * w) * torch.linalg.solve(hessian, grad_g)


@pytest.mark.parametrize("hyper_module", [False, True], ids=["tensor", "module"])
def test_hypergradient_is_the_dense_one_at_the_current_weights(hyper_module):
    trainer, model, log_decay, train, val = make_trainer(hyper_module)
    logs = trainer.run(12)  # outer steps after inner steps 5 and 10; two more inner steps
    assert [log.step for log in logs] == [5, 10]
    # lr=0 outer steps leave lam alone; the weights the last hypergradient saw are gone, so
    # recompute it at the current weights and compare.
    trainer.outer_step()
    w = model.weight.detach()[0]
    expected = dense_hypergradient(w, log_decay.detach(), train, val)
    torch.testing.assert_close(log_decay.grad, expected, rtol=1e-10, atol=1e-12)
    assert float(expected.norm()) > 1e-3  # the comparison is not between zeros


def test_module_and_tensor_hyperparameters_train_alike():
    runs = []
    for hyper_module in (False, True):
        trainer, model, log_decay, *_ = make_trainer(hyper_module, lr=0.5)
        logs = trainer.run(40)
        runs.append((model.weight.detach().clone(), log_decay.detach().clone(), logs))
    torch.testing.assert_close(runs[0][0], runs[1][0], rtol=1e-12, atol=0)
    torch.testing.assert_close(runs[0][1], runs[1][1], rtol=1e-12, atol=0)
    assert [log.outer_loss for log in runs[0][2]] == pytest.approx(
        [log.outer_loss for log in runs[1][2]], rel=1e-12
    )


def test_outer_steps_lower_the_validation_loss():
    trainer, *_ = make_trainer(False, lr=1.0, method=CG(max_iter=D))
    logs = trainer.run(300)
    assert logs[-1].outer_loss < 0.9 * logs[0].outer_loss
    assert all(log.record.status.name == "CONVERGED" for log in logs)


@pytest.mark.parametrize(
    "num_iters, unroll_steps, patience, expected",
    [
        (25, 5, 0, [5, 10, 15, 20, 25]),
        (25, 5, 12, [15, 20, 25]),
        (7, 1, 5, [5, 6, 7]),
        (4, 5, 0, []),
    ],
)
def test_schedule(num_iters, unroll_steps, patience, expected):
    trainer, *_ = make_trainer(False, unroll_steps=unroll_steps, outer_patience_iters=patience)
    logs = trainer.run(num_iters)
    assert [log.step for log in logs] == expected
    assert [log.outer_step for log in logs] == list(range(1, len(expected) + 1))
    assert trainer.steps == num_iters


def _hypergrad_solver_steps(num_iters: int, unroll_steps: int, patience: int) -> list[int]:
    """The inner-step counts after which hypergrad's own ``Solver.run`` loop makes its outer
    updates (its model bookkeeping, functorch's, stubbed out)."""
    solver = pytest.importorskip("hypergrad.solver")
    updates: list[int] = []

    class Counting(solver.BaseSolver):
        def reset_inner_model(self):
            pass

        def sync_inner(self):
            pass

        def inner_update(self):
            pass

        def outer_update(self):
            updates.append(self.inner_step)

    module = torch.nn.Linear(1, 1)
    optimizer = torch.optim.SGD(module.parameters(), lr=0.1)
    Counting(
        module,
        module,
        [],
        [],
        num_iters,
        unroll_steps,
        optimizer,
        optimizer,
        patience,
        log_freq=10**9,
        device=torch.device("cpu"),
    ).run()
    return updates


@pytest.mark.parametrize(
    "num_iters, unroll_steps, patience",
    [(1000, 100, 0), (1000, 10, 50), (25, 5, 12), (7, 1, 5), (30, 7, 3), (4, 5, 0)],
)
def test_the_hypergrad_schedule_is_its_solver_step_for_step(num_iters, unroll_steps, patience):
    """Issue 17: run(1000) made 10 outer steps where hypergrad's Solver makes 9 with the same
    unroll_steps and outer_patience_iters; schedule="hypergrad" makes the same steps at the
    same inner steps."""
    expected = _hypergrad_solver_steps(num_iters, unroll_steps, patience)
    trainer, *_ = make_trainer(
        False, unroll_steps=unroll_steps, outer_patience_iters=patience, schedule="hypergrad"
    )
    assert [log.step for log in trainer.run(num_iters)] == expected
    if (num_iters, unroll_steps, patience) == (1000, 100, 0):
        assert len(expected) == 9


def test_after_outer_step_receives_the_trainer_after_the_callback():
    """hypergrad's post_outer_update: here resetting the inner weights after each outer step."""
    order: list[str] = []

    def reset(trainer):
        order.append("after")
        torch.nn.init.zeros_(trainer.model.weight)

    trainer, model, *_ = make_trainer(
        False, callback=lambda log: order.append("callback"), after_outer_step=reset
    )
    trainer.run(10)
    assert order == ["callback", "after"] * 2
    assert torch.equal(model.weight, torch.zeros_like(model.weight))


def test_callback_sees_each_log_with_the_losses_of_the_moment():
    seen: list[BilevelLog] = []
    trainer, model, log_decay, train, val = make_trainer(False, callback=seen.append)
    for _ in range(4):
        trainer.inner_step()
    last_inner = inner_loss(model, log_decay.detach(), train).item()  # before step 5's update
    trainer.inner_step()
    outer_now = outer_loss(model, log_decay.detach(), val).item()
    log = trainer.outer_step()
    assert seen == [log]
    assert log.inner_loss == pytest.approx(last_inner, rel=1e-12)
    assert log.outer_loss == pytest.approx(outer_now, rel=1e-12)
    assert log.hypergradient_norm == pytest.approx(float(log_decay.grad.norm()), rel=1e-12)


def test_data_streams_cycle_and_callables_are_called():
    train, val = ridge_data()
    halves = [(train[0][: N // 2], train[1][: N // 2]), (train[0][N // 2 :], train[1][N // 2 :])]
    drawn = []

    def outer_data():
        drawn.append(1)
        return val

    model = torch.nn.Linear(D, 1, bias=False).to(f64)
    hyper = torch.zeros(D, dtype=f64, requires_grad=True)
    seen_batches = []

    def recording_inner_loss(model, hyper, batch):
        seen_batches.append(batch[0].data_ptr())
        return inner_loss(model, hyper, batch)

    trainer = BilevelTrainer(
        model, hyper, recording_inner_loss, outer_loss, halves, outer_data,
        inner_optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        outer_optimizer=torch.optim.SGD([hyper], lr=0.1),
        unroll_steps=3, progress=False,
    )  # fmt: skip
    trainer.run(3)
    first, second = halves[0][0].data_ptr(), halves[1][0].data_ptr()
    # three inner steps, then the outer step's inner batch (evaluated once for its graph)
    assert seen_batches == [first, second, first, second]
    assert len(drawn) == 1


def test_progress_bar_with_and_without_tqdm(monkeypatch):
    pytest.importorskip("tqdm")
    trainer, *_ = make_trainer(False, progress=True)
    assert len(trainer.run(10)) == 2
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)  # import now raises ImportError
    trainer, *_ = make_trainer(False, progress=True)
    assert len(trainer.run(10)) == 2


def test_bad_arguments_are_named():
    train, val = ridge_data()
    model = torch.nn.Linear(D, 1, bias=False).to(f64)
    hyper = torch.zeros(D, dtype=f64, requires_grad=True)
    good = dict(
        inner_optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        outer_optimizer=torch.optim.SGD([hyper], lr=0.1),
    )

    def make(model=model, hyper=hyper, inner_data=(train,), **options):
        return BilevelTrainer(
            model, hyper, inner_loss, outer_loss, inner_data, [val], **dict(good, **options)
        )

    with pytest.raises(TypeError, match="`model` must be an nn.Module"):
        make(model=lambda x: x)
    with pytest.raises(TypeError, match="`outer_optimizer` must be a torch.optim.Optimizer"):
        make(outer_optimizer=lambda: None)
    with pytest.raises(ValueError, match="`unroll_steps` must be an int >= 1"):
        make(unroll_steps=0)
    with pytest.raises(ValueError, match="`outer_patience_iters` must be an int >= 0"):
        make(outer_patience_iters=-1)
    with pytest.raises(TypeError, match="`inner_data` must be an iterable of batches"):
        make(inner_data=train[0])
    with pytest.raises(TypeError, match="`hyper` must be an nn.Module or tensors that require"):
        make(hyper=torch.zeros(D, dtype=f64))
    with pytest.raises(ValueError, match="`inner_data` yielded no batch"):
        make(inner_data=[]).run(1)
    with pytest.raises(ValueError, match="`num_iters` must be an int >= 0"):
        make().run(2.5)
    with pytest.raises(ValueError, match="`schedule` must be one of"):
        make(schedule="hypergrad's")
    with pytest.raises(TypeError, match="`after_outer_step` must be callable"):
        make(after_outer_step="reset")
