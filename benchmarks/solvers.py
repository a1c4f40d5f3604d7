"""Relative error against products for every linear solver, on the backward systems of measured
problems. The data behind the plot in the docs page on choosing a solver.

Each backward solver gets a budget of ``k`` products (``max_iter=k`` for CG, GMRES and Neumann,
``k // 2`` iterations for BiCGSTAB and NormalCG, which spend two per iteration; ``rank=k`` for
Nystrom; ``tol=0`` so that the budget, not the tolerance, stops it) and its answer ``x`` is
compared with a dense float64 solve: ``||x - x_ref|| / ||x_ref||``. The x-axis is the products
the solver's record counts. All in float64, so that the curves show the methods, not rounding.

Problems, four backward systems ``A x = b``:

* ``ridge`` and ``logistic``: the Hessians (symmetric positive definite) of the two inner
  problems of ``benchmarks/hypergradient.py`` at their exact minimisers, with ``b`` the
  gradient of the validation loss: ``d = 1000``, condition number ~160, and ``d = 200``, ~34.
  ``Neumann`` takes the step ``1 / L`` (``L`` from a power iteration); ``Nystrom`` takes
  ``rho = 0.1 L`` (the default of ``benchmarks/hypergradient.py``) and ``rho = 0.01 L``.
* ``deq gaussian`` and ``deq orthogonal``: ``(I - J)^T`` of the tanh cell of
  ``benchmarks/deq.py`` at its fixed point (hidden size 256, the first 8 samples of the batch,
  so ``n = 2048``), a block-diagonal system that is not symmetric. ``Neumann`` takes step 1
  (the adjoint fixed-point iteration ``x <- J^T x + b``); ``Anderson`` is the forward solver put
  on that fixed point, as ``DEQ(backward=Anderson())`` does, each sample stopping on its own.
  ``CG`` is run too, to show what it does on a system it does not apply to.

``Direct`` builds the matrix with ``n`` products and is shown as one point.

    python benchmarks/solvers.py [--quick] [--json PATH]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from implicit_layers import (
    CG,
    GMRES,
    Anderson,
    BiCGSTAB,
    Direct,
    FunctionOperator,
    Neumann,
    NormalCG,
    Nystrom,
)
from implicit_layers._linear.fixed_point_iteration import FixedPointIteration

HERE = Path(__file__).resolve().parent
DEQ_SAMPLES = 8
f64 = torch.float64


def _load(name: str):
    """A sibling benchmark script, imported as a module (its ``main`` is not run)."""
    spec = importlib.util.spec_from_file_location(f"_bench_{name}", HERE / f"{name}.py")
    module = sys.modules[spec.name] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@dataclass
class System:
    """``A x = b`` with its dense float64 solution and the solvers that apply to it."""

    name: str
    operator: object  # a LinearOperator
    b: torch.Tensor
    x_ref: torch.Tensor
    methods: dict[str, Callable[[int], object]]  # label -> budget -> solver
    direct: bool = True


def hessian_system(name: str, problem) -> System:
    """The Hessian system of an inner problem of ``benchmarks/hypergradient.py``."""
    H, b, L = problem.hessian, problem.b, problem.lipschitz
    methods = {
        "CG": lambda k: CG(max_iter=k, tol=0.0),
        "GMRES (restart 20)": lambda k: GMRES(max_iter=k, tol=0.0),
        "BiCGSTAB": lambda k: BiCGSTAB(max_iter=max(1, k // 2), tol=0.0),
        "Neumann (step 1/L)": lambda k: Neumann(step=1.0 / L, max_iter=k, tol=0.0),
        "NormalCG": lambda k: NormalCG(max_iter=max(1, k // 2), tol=0.0),
        "Nystrom (rho 0.1 L)": lambda k: Nystrom(rank=k, rho=0.1 * L),
        "Nystrom (rho 0.01 L)": lambda k: Nystrom(rank=k, rho=0.01 * L),
    }
    # products through a function, as in a layer (a MatrixOperator would give Direct its matrix)
    operator = FunctionOperator(lambda v: H @ v, size=H.shape[0], dtype=f64, rmv=lambda v: H @ v)
    return System(name, operator, b, torch.linalg.solve(H, b), methods)


def deq_system(name: str, problem) -> System:
    """``(I - J)^T x = g`` of a DEQ cell at ``z*``, per sample ``J_i = diag(1 - z_i^2) W``."""
    W = problem.params64[0]
    z = problem.z_ref[:DEQ_SAMPLES]
    g = problem.G[:DEQ_SAMPLES].to(f64)
    slope = 1 - z**2
    rows, hidden = z.shape

    def mv(v):  # (I - J)^T v, row by row: v_i - W^T (s_i * v_i)
        v = v.view(rows, hidden)
        return (v - (slope * v) @ W).reshape(-1)

    def rmv(v):  # (I - J) v: v_i - s_i * (W v_i)
        v = v.view(rows, hidden)
        return (v - slope * (v @ W.T)).reshape(-1)

    operator = FunctionOperator(mv, size=rows * hidden, dtype=f64, rmv=rmv)
    operator.rows = rows  # block-diagonal: the fixed-point solvers stop each sample on its own
    eye = torch.eye(hidden, dtype=f64)
    systems = (eye - slope[:, :, None] * W).transpose(1, 2)
    x_ref = torch.linalg.solve(systems, g.unsqueeze(2)).squeeze(2).reshape(-1)
    methods = {
        "CG": lambda k: CG(max_iter=k, tol=0.0),
        "GMRES (restart 20)": lambda k: GMRES(max_iter=k, tol=0.0),
        "BiCGSTAB": lambda k: BiCGSTAB(max_iter=max(1, k // 2), tol=0.0),
        "Neumann (step 1)": lambda k: Neumann(max_iter=k, tol=0.0),
        "NormalCG": lambda k: NormalCG(max_iter=max(1, k // 2), tol=0.0),
        "Anderson (adjoint)": lambda k: FixedPointIteration(Anderson(max_iter=k, tol=0.0)),
    }
    return System(name, operator, g.reshape(-1), x_ref, methods)


def systems(quick: bool) -> list[System]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hypergradient = _load("hypergradient")
        deq = _load("deq")
    found = [
        hessian_system(
            "ridge Hessian (SPD, d=1000)", hypergradient.finish(hypergradient.ridge_problem())
        ),
        hessian_system(
            "logistic Hessian (SPD, d=200)", hypergradient.finish(hypergradient.logistic_problem())
        ),
    ]
    for conditioning in ("gaussian", "orthogonal"):
        problem = deq.make_problem(conditioning, f64)
        found.append(deq_system(f"DEQ {conditioning} (I - J)^T (n=2048)", problem))
    return found


def relative_error(x: torch.Tensor, reference: torch.Tensor) -> float:
    return float((x - reference).norm() / reference.norm())


def measure(system: System, budgets: list[int]) -> list[dict]:
    rows = []
    for label, make in system.methods.items():
        for k in budgets:
            if label.startswith("Nystrom") and k > system.b.numel():
                continue
            x, record = make(k).solve(system.operator, system.b)
            rows.append(
                dict(problem=system.name, method=label, budget=k, products=record.products)
                | dict(error=relative_error(x, system.x_ref), status=record.status.name)
            )
    if system.direct:
        x, record = Direct().solve(system.operator, system.b)
        rows.append(
            dict(problem=system.name, method="Direct", budget=None, products=record.products)
            | dict(error=relative_error(x, system.x_ref), status=record.status.name)
        )
    return rows


def print_table(name: str, rows: list[dict], budgets: list[int]) -> None:
    print(f"\n== {name}: relative error of x at a budget of k products ==")
    header = f"{'method':22}" + "".join(f"{f'k={k}':>10}" for k in budgets)
    print(header)
    print("-" * len(header))
    for method in dict.fromkeys(r["method"] for r in rows):
        mine = [r for r in rows if r["method"] == method]
        if method == "Direct":
            only = mine[0]
            print(f"{method:22}{only['error']:>10.1e}  ({only['products']} products)")
            continue
        by_budget = {r["budget"]: r for r in mine}
        cells = [
            f"{by_budget[k]['error']:>10.1e}" if k in by_budget else f"{'-':>10}" for k in budgets
        ]
        stops = {r["status"] for r in mine} - {"MAX_ITER", "UNCHECKED"}
        note = f"  (stopped early: {', '.join(sorted(stops))})" if stops else ""
        print(f"{method:22}" + "".join(cells) + note)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer budgets")
    parser.add_argument("--json", metavar="PATH", help="also write the rows printed to PATH")
    args = parser.parse_args()
    if args.quick:
        budgets = [2, 5, 10, 20, 50, 100, 200]
    else:
        budgets = [2, 4, 6, 10, 14, 20, 30, 40, 60, 80, 100, 150, 200, 300]
    start = time.perf_counter()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, float64")
    all_rows = []
    for system in systems(args.quick):
        rows = measure(system, budgets)
        print_table(system.name, rows, budgets)
        all_rows += rows
    print(f"\n(total {time.perf_counter() - start:.0f} s)")
    if args.json:
        meta = dict(budgets=budgets, dtype="float64", threads=torch.get_num_threads())
        with open(args.json, "w") as file:
            json.dump(dict(meta=meta, rows=all_rows), file, indent=1)


if __name__ == "__main__":
    main()
