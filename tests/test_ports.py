"""The migration page's ports against the peers they port: each port block of
``docs/migration.md`` runs (as in ``test_docs.py``) and its result is compared with the peer's
own computation on the same problem, where the peer is installed (hypergrad, torchopt and
torchdeq are installed in CI; HyperTorch is read from ``HYPERTORCH_PATH`` when it is set)."""

from __future__ import annotations

import importlib.util
import os
import sys
from types import SimpleNamespace

import pytest
import torch
from test_docs import ROOT, execute


@pytest.fixture(scope="module")
def page() -> dict:
    return execute(ROOT / "docs" / "migration.md")[1]


def test_hypergrad_neumann(page):
    approx_hypergrad = pytest.importorskip("hypergrad.approx_hypergrad")
    inner, outer, w, lam = page["inner"], page["outer"], page["w"], page["lam"]
    theirs = approx_hypergrad.neumann(
        lambda i, o: inner(i[0], o[0]), lambda i, o: outer(i[0], o[0]), (w,), (lam,), 20, 0.1
    )[0]
    torch.testing.assert_close(page["hypergrad_port"], theirs, rtol=1e-12, atol=1e-15)


def test_torchopt_custom_root_solve_cg(page):
    torchopt = pytest.importorskip("torchopt")
    inner, outer, lam = page["inner"], page["outer"], page["lam"]
    solve = torchopt.linear_solve.solve_cg(maxiter=5, rtol=0.0, atol=0.0)

    @torchopt.diff.implicit.custom_root(torch.func.grad(inner, argnums=0), argnums=1, solve=solve)
    def solver(w0, lam):
        return page["ridge_solution"](lam.detach())

    lam_var = lam.clone().requires_grad_()
    w0 = torch.zeros(5, dtype=torch.float64)
    (theirs,) = torch.autograd.grad(outer(solver(w0, lam_var), lam_var), lam_var)
    torch.testing.assert_close(page["torchopt_port"], theirs, rtol=1e-10, atol=1e-14)


def test_torchdeq_fixed_point_iter(page):
    torchdeq = pytest.importorskip("torchdeq")
    cell, x = page["Cell"](), page["x"]
    cell.load_state_dict(page["cell"].state_dict())
    deq = torchdeq.get_deq(
        ift=True,
        f_solver="fixed_point_iter",
        f_max_iter=200,
        f_tol=1e-12,
        b_solver="fixed_point_iter",
        b_max_iter=200,
        b_tol=1e-12,
    )
    z_out, _ = deq(lambda z: cell(z, x), torch.zeros_like(x))
    z_out[-1].sum().backward()
    z, weight_grad = page["torchdeq_port"]
    torch.testing.assert_close(z, z_out[-1].detach(), rtol=1e-10, atol=1e-11)
    torch.testing.assert_close(weight_grad, cell.linear.weight.grad, rtol=1e-9, atol=1e-10)


def _source_peers():
    """``benchmarks/peers.py``, which loads HyperTorch and Betty from the folders named by
    ``HYPERTORCH_PATH`` and ``BETTY_PATH`` (each ``None`` when not named)."""
    if "_peers" not in sys.modules:  # its dataclasses need it registered while it runs
        spec = importlib.util.spec_from_file_location("_peers", ROOT / "benchmarks" / "peers.py")
        sys.modules["_peers"] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules["_peers"])
    return sys.modules["_peers"]


def test_hypertorch_neumann(page):
    if not os.environ.get("HYPERTORCH_PATH"):
        pytest.skip("HYPERTORCH_PATH does not name HyperTorch's source")
    hypertorch = _source_peers().hypertorch
    inner, outer, w, lam = page["inner"], page["outer"], page["w"], page["lam"]
    w_var = w.clone().requires_grad_()
    lam_var = lam.clone().requires_grad_()

    def fp_map(params, hparams):
        (g,) = torch.autograd.grad(inner(params[0], hparams[0]), params[0], create_graph=True)
        return [params[0] - 0.1 * g]

    theirs = hypertorch.neumann(
        [w_var], [lam_var], 20, fp_map, lambda p, h: outer(p[0], h[0]), tol=0.0, set_grad=False
    )[0]
    torch.testing.assert_close(page["hypertorch_port"], theirs, rtol=1e-12, atol=1e-15)


def test_betty_darts(page):
    if not os.environ.get("BETTY_PATH"):
        pytest.skip("BETTY_PATH does not name Betty's source")
    darts = _source_peers().betty.darts
    inner, outer, w, lam = page["inner"], page["outer"], page["w"], page["lam"]
    w_var, lam_var = w.clone().requires_grad_(), lam.clone().requires_grad_()
    g_w, g_lam = torch.autograd.grad(
        outer(w_var, lam_var), (w_var, lam_var), allow_unused=True, materialize_grads=True
    )
    # the two Problem objects of Betty's engine, reduced to what darts reads of them
    config = SimpleNamespace(darts_alpha=0.01, darts_multitask=False)
    curr = SimpleNamespace(
        config=config,
        _strategy="default",
        cur_batch=None,
        training_step_exec=lambda batch: inner(w_var, lam_var),
        meta_trainable_parameters=lambda: [w_var],
    )
    prev = SimpleNamespace(trainable_parameters=lambda: [lam_var])
    theirs = g_lam + darts([g_w], curr, prev, sync=False)[0]
    torch.testing.assert_close(page["betty_port"], theirs, rtol=1e-8, atol=1e-12)


def test_jaxopt_ridge_jacobian(page):
    jax = pytest.importorskip("jax")
    jaxopt = pytest.importorskip("jaxopt")
    jax.config.update("jax_enable_x64", True)
    jnp = jax.numpy
    X, y = jnp.asarray(page["X"].numpy()), jnp.asarray(page["y"].numpy())

    def ridge_objective(params, l2reg, data):
        X, y = data
        return 0.5 * jnp.mean((X @ params - y) ** 2) + 0.5 * l2reg * jnp.sum(params**2)

    # its default solve, normal-equation CG at jaxopt's default tolerance, is 7e-6 off here;
    # a dense solve on both sides compares the implicit differentiation itself
    @jaxopt.implicit_diff.custom_root(jax.grad(ridge_objective), solve=jaxopt.linear_solve.solve_lu)
    def ridge_solver(init_params, l2reg, data):
        X, y = data
        gram = X.T @ X / X.shape[0] + l2reg * jnp.eye(X.shape[1])
        return jnp.linalg.solve(gram, X.T @ y / X.shape[0])

    theirs = jax.jacobian(ridge_solver, argnums=1)(None, 10.0, (X, y))
    torch.testing.assert_close(
        page["jaxopt_port"], torch.from_numpy(jax.device_get(theirs).copy()), rtol=1e-8, atol=1e-14
    )
