"""One hypergradient through ``fixed_point_layer`` with CG, against a hand-written baseline.

Ridge regression with per-feature weight decay as a gradient-step map,
``Phi(w, lam) = w - a grad_w f(w, lam)``, ``f = ||X w - y||^2 / (2n) + sum(exp(lam) w^2) / 2``.
Both sides differentiate the same validation loss at the same ``w*``: the baseline takes one
``torch.autograd.grad`` with ``create_graph=True``, then ``k`` Hessian-vector products with the
textbook CG recurrences, then the mixed product; the layer does the same through its backward.
Errors are against a dense float64 solve. Prints a table; run ``python benchmarks/core.py``.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import time
from collections.abc import Callable

import torch

from implicit_layers import CG, argmin_layer, fixed_point_layer


def make_problem(n: int, d: int, dtype: torch.dtype, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=generator, dtype=torch.float64) / d**0.5
    truth = torch.randn(d, generator=generator, dtype=torch.float64)
    y = X @ truth + 0.5 * torch.randn(n, generator=generator, dtype=torch.float64)
    X_val = torch.randn(n // 2, d, generator=generator, dtype=torch.float64) / d**0.5
    y_val = X_val @ truth
    lam = torch.full((d,), -2.0, dtype=torch.float64) + 0.5 * torch.randn(
        d, generator=generator, dtype=torch.float64
    )
    return {k: v.to(dtype) for k, v in dict(X=X, y=y, X_val=X_val, y_val=y_val, lam=lam).items()}


def inner_loss(w, lam, X, y):
    return 0.5 * ((X @ w - y) ** 2).mean() + 0.5 * (lam.exp() * w * w).sum()


def outer_loss(w, X_val, y_val):
    return 0.5 * ((X_val @ w - y_val) ** 2).mean()


def exact(problem) -> tuple[torch.Tensor, torch.Tensor]:
    """``w*`` and the hypergradient by dense float64 solves."""
    p = {k: v.double() for k, v in problem.items()}
    n = p["X"].shape[0]
    hessian = p["X"].T @ p["X"] / n + torch.diag(p["lam"].exp())
    w_star = torch.linalg.solve(hessian, p["X"].T @ p["y"] / n)
    b = p["X_val"].T @ (p["X_val"] @ w_star - p["y_val"]) / p["X_val"].shape[0]
    x = torch.linalg.solve(hessian, b)
    return w_star, -(p["lam"].exp() * w_star) * x  # -(d^2 f / dlam dw)^T x


def baseline(problem, w_star: torch.Tensor, k: int) -> torch.Tensor:
    """The minimal hand-written implicit hypergradient with k CG iterations."""
    lam = problem["lam"].detach().requires_grad_()
    w = w_star.detach().requires_grad_()
    (g,) = torch.autograd.grad(inner_loss(w, lam, problem["X"], problem["y"]), w, create_graph=True)
    (b,) = torch.autograd.grad(outer_loss(w, problem["X_val"], problem["y_val"]), w)
    x = torch.zeros_like(b)
    r = b.clone()
    p = r.clone()
    rr = r.dot(r)
    for _ in range(k):
        (hp,) = torch.autograd.grad(g, w, p, retain_graph=True)
        alpha = rr / p.dot(hp)
        x += alpha * p
        r -= alpha * hp
        rr_new = r.dot(r)
        p = r + (rr_new / rr) * p
        rr = rr_new
    (mixed,) = torch.autograd.grad(g, lam, x)
    return -mixed


def layer_hypergradient(
    problem, w_star: torch.Tensor, k: int, step: float | None
) -> Callable[[], torch.Tensor]:
    """A closure computing the hypergradient through a layer's backward: ``fixed_point_layer``
    on the gradient step with ``step``, or ``argmin_layer`` when ``step`` is ``None``."""
    X, y = problem["X"], problem["y"]

    def phi(w, lam):
        with torch.enable_grad():
            w_in = w if w.requires_grad else w.detach().requires_grad_()
            (g,) = torch.autograd.grad(inner_loss(w_in, lam, X, y), w_in, create_graph=True)
        return w - step * g

    def given(f, w0):  # the forward returns w* as given: we time the backward only
        return w0

    backward = CG(max_iter=k, tol=0.0)
    if step is None:
        inner = functools.partial(inner_loss, X=X, y=y)
        layer = argmin_layer(inner, solver=given, backward=backward, on_failure="ignore")
    else:
        layer = fixed_point_layer(phi, solver=given, backward=backward, on_failure="ignore")
    lam = problem["lam"].detach().requires_grad_()
    w = layer(w_star, lam)
    loss = outer_loss(w, problem["X_val"], problem["y_val"])

    def run() -> torch.Tensor:
        (grad,) = torch.autograd.grad(loss, lam, retain_graph=True)
        return grad

    return run


def median_times(functions: list[Callable[[], torch.Tensor]], repeats: int) -> list[float]:
    """Median time of each function, sampled alternately so that drift in the machine's load
    hits every contender alike."""
    for function in functions:
        function()  # warm-up
    times: list[list[float]] = [[] for _ in functions]
    for _ in range(repeats):
        for function, samples in zip(functions, times):
            start = time.perf_counter()
            function()
            samples.append(time.perf_counter() - start)
    return [statistics.median(samples) for samples in times]


def relative_error(estimate: torch.Tensor, reference: torch.Tensor) -> float:
    return float((estimate.double() - reference).norm() / reference.norm())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--d", type=int, default=1000)
    parser.add_argument("--ks", type=int, nargs="+", default=[10, 20, 50])
    parser.add_argument("--repeats", type=int, default=40)
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    parser.add_argument("--json", metavar="PATH", help="also write the rows printed to PATH")
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)

    problem = make_problem(args.n, args.d, dtype)
    w_exact, hyper_exact = exact(problem)
    w_star = w_exact.to(dtype)
    p64 = {k: v.double() for k, v in problem.items()}
    lipschitz = torch.linalg.eigvalsh(
        p64["X"].T @ p64["X"] / args.n + torch.diag(p64["lam"].exp())
    )[-1]
    step = float(1.0 / lipschitz)

    print(
        f"ridge, n={args.n}, d={args.d}, {args.dtype}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads; median of {args.repeats}"
    )
    columns = ["k", "baseline ms", "layer ms", "ratio", "argmin ms", "ratio"]
    columns += ["baseline err", "layer err", "argmin err"]
    widths = [4, 12, 10, 7, 10, 7, 13, 10, 11]
    header = " ".join(f"{c:>{w}}" for c, w in zip(columns, widths))
    print(header)
    print("-" * len(header))
    rows = []
    for k in args.ks:
        runs = [
            functools.partial(baseline, problem, w_star, k),
            layer_hypergradient(problem, w_star, k, step),
            layer_hypergradient(problem, w_star, k, None),
        ]
        t_base, t_layer, t_argmin = median_times(runs, args.repeats)
        e_base, e_layer, e_argmin = (relative_error(run(), hyper_exact) for run in runs)
        print(
            f"{k:>4} {1e3 * t_base:>12.2f} {1e3 * t_layer:>10.2f} {t_layer / t_base:>7.3f} "
            f"{1e3 * t_argmin:>10.2f} {t_argmin / t_base:>7.3f} "
            f"{e_base:>13.3e} {e_layer:>10.3e} {e_argmin:>11.3e}"
        )
        rows.append(
            dict(k=k, baseline_ms=1e3 * t_base, layer_ms=1e3 * t_layer, argmin_ms=1e3 * t_argmin)
            | dict(baseline_err=e_base, layer_err=e_layer, argmin_err=e_argmin)
        )
    if args.json:
        meta = dict(n=args.n, d=args.d, dtype=args.dtype, repeats=args.repeats)
        meta |= dict(threads=torch.get_num_threads(), torch=torch.__version__)
        with open(args.json, "w") as file:
            json.dump(dict(meta=meta, rows=rows), file, indent=1)


if __name__ == "__main__":
    main()
