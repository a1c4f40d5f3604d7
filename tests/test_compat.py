"""Every private torch entry point has a public fallback: delete it before the package is
imported (in a fresh interpreter), and the package still imports and computes right gradients
(and, where the fallback is reverse mode, right forward-mode tangents)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

import implicit_layers._compat as compat

PRIVATE = [
    "torch.autograd.graph._engine_run_backward",
    "torch.autograd.forward_ad._set_fwd_grad_enabled",
    "torch._C._functorch.maybe_current_level",
    "torch._C._functorch.TransformType",
]

CHECK = """
import importlib, torch
for path in {deleted!r}:
    module, name = path.rsplit(".", 1)
    delattr(importlib.import_module(module) if not module.startswith("torch._C") else
            eval(module, {{"torch": torch}}), name)
import torch.autograd.forward_ad as fwAD
import implicit_layers
from implicit_layers import GMRES, FixedPoint, GradientDescent, NormalCG, argmin_layer
from implicit_layers import fixed_point_layer
import implicit_layers._compat as compat

f64 = torch.float64
g = torch.Generator().manual_seed(0)
A = torch.randn(5, 5, generator=g, dtype=f64)
A = 0.5 * A / torch.linalg.matrix_norm(A, 2)
lam = torch.randn(5, generator=g, dtype=f64, requires_grad=True)
v = torch.randn(5, generator=g, dtype=f64)
exact = torch.linalg.solve((torch.eye(5, dtype=f64) - A).T, v)
tangent = torch.linalg.solve(torch.eye(5, dtype=f64) - A, v)
for backward in (NormalCG(tol=1e-13, max_iter=200), GMRES(tol=1e-13)):
    layer = fixed_point_layer(lambda w, lam: A @ w + lam, backward=backward,
                              solver=FixedPoint(tol=1e-14, max_iter=500))
    (grad,) = torch.autograd.grad(layer(torch.zeros(5, dtype=f64), lam) @ v, lam)
    assert torch.allclose(grad, exact, atol=1e-10), (backward, grad, exact)
with fwAD.dual_level():  # the tangent solve, with GMRES
    out = layer(torch.zeros(5, dtype=f64), fwAD.make_dual(lam.detach(), v))
    got = fwAD.unpack_dual(out).tangent
assert torch.allclose(got, tangent, atol=1e-10), (got, tangent)
# an argmin layer's Hessian products go through the same engine call
X = torch.randn(8, 5, generator=g, dtype=f64)
# (a minimizer of ours: torch's own LBFGS needs the private forward-AD switch)
lr = float(1 / torch.linalg.eigvalsh(X.T @ X).max())
ridge = argmin_layer(lambda w, lam: ((X @ w) ** 2).sum() / 2 - lam @ w,
                     solver=GradientDescent(lr=lr, tol=1e-13, max_iter=100_000))
(grad,) = torch.autograd.grad(ridge(torch.zeros(5, dtype=f64), lam) @ v, lam)
assert torch.allclose(grad, torch.linalg.solve(X.T @ X, v), atol=1e-5)
print("fallbacks", compat._engine_run_backward is None, compat.CAN_REENABLE_FORWARD_GRAD,
      compat.in_functorch_transform(), compat.under_vmap())
"""


def run_without(deleted: list[str]) -> str:
    script = textwrap.dedent(CHECK.format(deleted=deleted))
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


@pytest.mark.parametrize("private", PRIVATE)
def test_each_private_name_has_a_working_fallback(private):
    output = run_without([private])
    assert "fallbacks" in output


def test_all_fallbacks_at_once():
    output = run_without(PRIVATE).split()
    # no engine, no way to re-enable forward AD, no transform detection: all public paths
    assert output[1:] == ["True", "False", "False", "False"]


def test_this_torch_has_every_private_name():
    """Where a private name goes missing in a new torch, this test says which (the package
    still works, on its fallback)."""
    assert compat._engine_run_backward is not None
    assert compat.CAN_REENABLE_FORWARD_GRAD
    assert compat._maybe_current_level is not None and compat._transform_type is not None
