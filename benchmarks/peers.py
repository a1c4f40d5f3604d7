"""Ours against every torch peer, method by method, at equal budget: the table of issue 16.

For each problem, dtype, method and budget ``k`` (Hessian-vector products), one hypergradient
at the exact inner solution ``w*`` by every library that has the method, each with the same
loss functions (``hypergradient.py``'s problems: per-feature weight decay ``exp(lam)``):

======== ======================================================================================
method   contenders (``k`` products each, unless said)
======== ======================================================================================
CG       ours ``CG``; torchopt ``custom_root`` + ``solve_cg``; HyperTorch ``CG``; Betty ``cg``;
         hypergrad ``conjugate_gradient``
Neumann  ours ``Neumann(step=1/L)``; torchopt ``solve_inv(ns=True, alpha=1/L)``; HyperTorch
         ``neumann`` and ``fixed_point`` (``K = k + 1``: its first product is ``J^T 0``, so it
         needs one more for the same series); Betty ``neumann``; hypergrad ``neumann``
NormalCG ours ``NormalCG`` (``k`` iterations, two products each); torchopt ``solve_normal_cg``;
         HyperTorch ``CG_normaleq``
Direct   ours ``Direct``; torchopt ``solve_inv`` (the matrix materialised)
Nystrom  ours ``Nystrom(rank=k, rho)``; hypergrad ``nystrom``
======== ======================================================================================

HyperTorch and Betty are read from source folders named by the environment variables
``HYPERTORCH_PATH`` (the folder holding HyperTorch's ``hypergrad/``, loaded under another
name, since moskomule's hypergrad takes that one) and ``BETTY_PATH`` (the folder holding
``betty/``); a peer that is absent or does not import is skipped with a line saying so. Betty's
methods take its ``Problem`` objects: a two-line stand-in supplies the inner loss and the
parameters, which is all they read.

Timing: one torch thread, the thread's CPU time, all contenders of one row sampled in turn
(round-robin) after a warm-up; ``min`` and ``med`` over the rounds, the ratio of medians against
the fastest peer. Errors are relative to the dense float64 hypergradient.

    HYPERTORCH_PATH=... BETTY_PATH=... python benchmarks/peers.py [--quick] [--json PATH]

``benchmarks/report.py`` runs it and puts its table in ``docs/benchmarks.md``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).parent))
from hypergradient import (  # noqa: E402
    HYPERGRAD_NOTE,
    approx_hypergrad,
    finish,
    hypergrad_method,
    logistic_problem,
    relative_error,
    ridge_problem,
)

from implicit_layers import CG, Direct, Neumann, NormalCG, Nystrom, hypergradient  # noqa: E402

warnings.filterwarnings("ignore", category=DeprecationWarning)
warnings.filterwarnings("ignore", category=FutureWarning)
warnings.filterwarnings("ignore", category=UserWarning)

NOTES: list[str] = []


def _peer(name: str, load: Callable[[], object]) -> object | None:
    try:
        module = load()
    except Exception as error:  # noqa: BLE001 - any failure to import means "skip the peer"
        NOTES.append(f"{name}: skipped ({error!r:.80})")
        return None
    NOTES.append(f"{name}: {getattr(module, '__version__', 'source')}")
    return module


def _load_hypertorch() -> object:
    folder = Path(os.environ["HYPERTORCH_PATH"]) / "hypergrad"
    spec = importlib.util.spec_from_file_location(
        "hypertorch", folder / "__init__.py", submodule_search_locations=[str(folder)]
    )
    module = importlib.util.module_from_spec(spec)
    saved = sys.modules.pop("hypergrad", None)  # its files import themselves as `hypergrad`
    sys.modules["hypergrad"] = sys.modules["hypertorch"] = module
    try:
        spec.loader.exec_module(module)
    finally:
        del sys.modules["hypergrad"]
        if saved is not None:
            sys.modules["hypergrad"] = saved
    return module


def _load_betty() -> object:
    sys.path.insert(0, os.environ["BETTY_PATH"])
    import betty.hypergradient

    return betty.hypergradient


torchopt = _peer("torchopt", lambda: importlib.import_module("torchopt"))
hypertorch = _peer("HyperTorch", _load_hypertorch)
betty = _peer("Betty", _load_betty)
moskomule = approx_hypergrad  # hypergradient.py imports it (None if it does not import)
NOTES.append(HYPERGRAD_NOTE)

clock = time.thread_time


@dataclass
class Row:
    library: str
    run: Callable[[], torch.Tensor]
    products: int | str


# ----------------------------------------------------------------------------- contenders


def ours(method) -> Callable:
    def make(inner, outer, w, lam):
        def run():
            return hypergradient(inner, outer, w, lam, method=method, on_failure="ignore")[0]

        return run

    return make


def torchopt_solve(solve) -> Callable:
    """``custom_root`` with the inner gradient as optimality function, as torchopt's tutorials
    set it up; the decorated solver returns the given ``w*``."""

    def make(inner, outer, w, lam):
        optimality = torch.func.grad(inner, argnums=0)

        @torchopt.diff.implicit.custom_root(optimality, argnums=1, solve=solve)
        def solver(w0, lam):
            return w0.detach()

        def run():
            lam_var = lam.detach().requires_grad_()
            return torch.autograd.grad(outer(solver(w, lam_var), lam_var), lam_var)[0]

        return run

    return make


def hypertorch_method(name: str, K: int, step: float) -> Callable:
    """HyperTorch's methods on the map ``Phi(w) = w - step * grad_w f``; its ``tol=0`` runs
    every iteration."""

    def make(inner, outer, w, lam):
        def fp_map(params, hparams):
            (g,) = torch.autograd.grad(inner(params[0], hparams[0]), params[0], create_graph=True)
            return [params[0] - step * g]

        def outer_loss(params, hparams):
            return outer(params[0], hparams[0])

        method = getattr(hypertorch, name)

        def run():
            lam_var = lam.detach().requires_grad_()
            return method([w], [lam_var], K, fp_map, outer_loss, tol=0.0, set_grad=False)[0]

        return run

    return make


def betty_method(name: str, k: int, step: float) -> Callable:
    """Betty's ``cg``/``neumann`` with stand-ins for its inner and outer ``Problem``s; the
    outer gradient is taken as Betty's engine takes it before calling them."""

    def make(inner, outer, w, lam):
        config = SimpleNamespace(
            cg_iterations=k, cg_alpha=1.0, neumann_iterations=k, neumann_alpha=step
        )
        method = getattr(betty, name)

        def run():
            w_var, lam_var = w.detach().requires_grad_(), lam.detach().requires_grad_()
            g_w, g_lam = torch.autograd.grad(
                outer(w_var, lam_var), (w_var, lam_var), allow_unused=True, materialize_grads=True
            )
            curr = SimpleNamespace(
                paths=[],
                config=config,
                cur_batch=None,
                training_step_exec=lambda batch: inner(w_var, lam_var),
                trainable_parameters=lambda: [w_var],
                parameters=lambda: [w_var],
            )
            prev = SimpleNamespace(trainable_parameters=lambda: [lam_var])
            return g_lam + method([g_w], curr, prev, sync=False)[0]

        return run

    return make


def moskomule_method(name: str, *options) -> Callable:
    """hypergrad's ``approx_hypergrad.<name>``, called as ``hypergradient.py`` calls it."""

    def make(inner, outer, w, lam):
        return hypergrad_method(name, inner, outer, w, lam, *options).run

    return make


def contenders(method: str, k: int, step: float, rho: float) -> list[tuple[str, Callable, str]]:
    """``(library, make, products)`` for one method at budget ``k``; missing peers left out."""
    rows: list[tuple[str, Callable | None, str]] = []
    if method == "CG":
        rows = [
            ("ours", ours(CG(max_iter=k, tol=0.0)), f"{k}"),
            ("torchopt", torchopt and torchopt_solve(_torchopt_cg(k)), f"{k}+1"),
            ("HyperTorch", hypertorch and hypertorch_method("CG", k, 1.0), f"{k}"),
            ("Betty", betty and betty_method("cg", k, step), f"{k}"),
            ("hypergrad", moskomule and moskomule_method("conjugate_gradient", k, 1.0), f"{k}"),
        ]
    elif method == "Neumann":
        rows = [
            ("ours", ours(Neumann(step=step, max_iter=k, tol=0.0)), f"{k}"),
            ("torchopt", torchopt and torchopt_solve(_torchopt_ns(k, step)), f"{k}"),
            ("HyperTorch", hypertorch and hypertorch_method("neumann", k, step), f"{k}"),
            (
                "HyperTorch fixed_point",
                hypertorch and hypertorch_method("fixed_point", k + 1, step),
                f"{k + 1}",
            ),
            ("Betty", betty and betty_method("neumann", k, step), f"{k}"),
            ("hypergrad", moskomule and moskomule_method("neumann", k, step), f"{k}"),
        ]
    elif method == "NormalCG":
        rows = [
            ("ours", ours(NormalCG(max_iter=k, tol=0.0)), f"2x{k}"),
            ("torchopt", torchopt and torchopt_solve(_torchopt_normal_cg(k)), f"2x{k}+2"),
            ("HyperTorch", hypertorch and hypertorch_method("CG_normaleq", k, 1.0), f"2x{k}+2"),
        ]
    elif method == "Direct":
        rows = [
            ("ours", ours(Direct()), "d"),
            ("torchopt", torchopt and torchopt_solve(torchopt.linear_solve.solve_inv()), "d"),
        ]
    elif method == "Nystrom":
        rows = [
            ("ours", ours(Nystrom(rank=k, rho=rho, seed=0)), f"{k}b+1"),
            ("hypergrad", moskomule and moskomule_method("nystrom", k, rho), f"{k}b"),
        ]
    return [(library, make, products) for library, make, products in rows if make]


def _torchopt_cg(k):
    return torchopt.linear_solve.solve_cg(maxiter=k, rtol=0.0, atol=0.0)


def _torchopt_ns(k, step):
    return torchopt.linear_solve.solve_inv(ns=True, maxiter=k, alpha=step)


def _torchopt_normal_cg(k):
    return torchopt.linear_solve.solve_normal_cg(maxiter=k, rtol=0.0, atol=0.0)


# ----------------------------------------------------------------------------- timing


def sample(runs: list[Callable], rounds: int) -> list[list[float]]:
    """Each run's times over ``rounds`` round-robin rounds, after one warm-up call each."""
    for run in runs:
        run()
    times: list[list[float]] = [[] for _ in runs]
    for _ in range(rounds):
        for run, bucket in zip(runs, times):
            start = clock()
            run()
            bucket.append(clock() - start)
    return times


METHODS_AT_K = ("CG", "Neumann", "NormalCG", "Nystrom")


def measure(problems, dtypes, ks, rounds) -> list[dict]:
    results = []
    for problem in problems:
        for dtype in dtypes:
            inner, outer = problem.losses(dtype)
            w, lam = problem.w_star.to(dtype), problem.lam.to(dtype)
            step, rho = 1.0 / problem.lipschitz, 0.1 * problem.lipschitz
            cases = [(m, k) for m in METHODS_AT_K for k in ks] + [("Direct", None)]
            for method, k in cases:
                entries = contenders(method, k or 0, step, rho)
                runs = [make(inner, outer, w, lam) for _, make, _ in entries]
                errors = [relative_error(run(), problem.reference) for run in runs]
                times = sample(runs, rounds if method != "Direct" else max(3, rounds // 3))
                for (library, _, products), error, bucket in zip(entries, errors, times):
                    results.append(
                        dict(
                            problem=problem.name,
                            dtype=str(dtype).removeprefix("torch."),
                            method=method,
                            k=k,
                            library=library,
                            products=products,
                            error=error,
                            min_ms=1e3 * min(bucket),
                            median_ms=1e3 * statistics.median(bucket),
                        )
                    )
                print(_table_rows(results[-len(entries) :]), flush=True)
    return results


# ----------------------------------------------------------------------------- tables


def _ratio_row(rows: list[dict]) -> tuple[dict, dict | None, float | None]:
    mine = next(r for r in rows if r["library"] == "ours")
    peers = [r for r in rows if r["library"] != "ours"]
    fastest = min(peers, key=lambda r: r["median_ms"], default=None)
    ratio = None if fastest is None else mine["median_ms"] / fastest["median_ms"]
    return mine, fastest, ratio


def _table_rows(rows: list[dict]) -> str:
    mine, fastest, ratio = _ratio_row(rows)
    cells = [
        f"{r['library']} {r['median_ms']:.2f} ({r['min_ms']:.2f}) err {r['error']:.1e}"
        for r in rows
    ]
    head = f"{mine['problem']:<22} {mine['dtype']:<8} {mine['method']:<8} k={mine['k']}"
    verdict = "" if ratio is None else f"  -> ours/fastest {ratio:.2f} ({fastest['library']})"
    return head + "\n    " + "\n    ".join(cells) + verdict


def markdown(results: list[dict]) -> str:
    """One line per (problem, dtype, method, k): ours, the fastest peer, the ratio, and every
    contender's median ms and error."""
    groups: dict[tuple, list[dict]] = {}
    for r in results:
        groups.setdefault((r["problem"], r["dtype"], r["method"], r["k"]), []).append(r)
    lines = [
        "| problem | dtype | method | k | ours ms (min) | fastest peer ms | ours / fastest "
        "| ours error | every peer: ms, error |",
        "|---|---|---|--:|--:|--:|--:|--:|---|",
    ]
    for (problem, dtype, method, k), rows in groups.items():
        mine, fastest, ratio = _ratio_row(rows)
        others = "; ".join(
            f"{r['library']} {r['median_ms']:.2f}, {r['error']:.1e}" for r in rows if r is not mine
        )
        peer = "-" if fastest is None else f"{fastest['median_ms']:.2f} ({fastest['library']})"
        shown = "-" if ratio is None else f"{ratio:.2f}"
        lines.append(
            f"| {problem} | {dtype} | {method} | {'-' if k is None else k} "
            f"| {mine['median_ms']:.2f} ({mine['min_ms']:.2f}) | {peer} | {shown} "
            f"| {mine['error']:.1e} | {others} |"
        )
    return "\n".join(lines)


def summary(results: list[dict]) -> str:
    groups: dict[tuple, list[dict]] = {}
    for r in results:
        groups.setdefault((r["problem"], r["dtype"], r["method"], r["k"]), []).append(r)
    ratios = [(key, _ratio_row(rows)[2]) for key, rows in groups.items()]
    ratios = [(key, r) for key, r in ratios if r is not None]
    worst = max(ratios, key=lambda item: item[1])
    above = sum(r > 0.9 for _, r in ratios)
    where = " ".join(map(str, worst[0]))
    return (
        f"{len(ratios)} points with a peer; ours / fastest peer from "
        f"{min(r for _, r in ratios):.2f} to {worst[1]:.2f} (worst: {where}); "
        f"{above} above 0.9, {sum(r > 1 for _, r in ratios)} above 1"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="k in {5, 20}, float32, 3 rounds")
    parser.add_argument("--rounds", type=int, default=None, help="timed rounds (default 10)")
    parser.add_argument("--ks", type=int, nargs="+", default=None)
    parser.add_argument("--dtypes", nargs="+", default=None, choices=["float32", "float64"])
    parser.add_argument("--problems", nargs="+", default=None, choices=list(PROBLEMS))
    parser.add_argument("--json", metavar="PATH", help="also write the rows to PATH")
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    ks = args.ks or ([5, 20] if args.quick else [5, 10, 20, 50])
    default_dtypes = ["float32"] if args.quick else ["float32", "float64"]
    dtypes = [getattr(torch, d) for d in args.dtypes or default_dtypes]
    rounds = args.rounds or (3 if args.quick else 10)
    names = args.problems or list(PROBLEMS)
    header = (
        f"torch {torch.__version__}, Python {platform.python_version()}, "
        f"{platform.processor() or platform.machine()}, 1 thread, CPU time of the thread; "
        f"median (min) of {rounds} round-robin rounds; " + "; ".join(NOTES)
    )
    print(header)
    start = time.perf_counter()
    problems = [finish(PROBLEMS[name]()) for name in names]
    results = measure(problems, dtypes, ks, rounds)
    table = markdown(results)
    verdict = summary(results)
    print("\n" + table + "\n\n" + verdict)
    if args.json:
        with open(args.json, "w") as file:
            json.dump(dict(meta=dict(header=header, rounds=rounds), rows=results), file)
    print(f"(total {time.perf_counter() - start:.0f} s)")


PROBLEMS = {
    "ridge-small": lambda: ridge_problem(n=500, d=100),
    "ridge": ridge_problem,
    "logistic": logistic_problem,
}

if __name__ == "__main__":
    main()
