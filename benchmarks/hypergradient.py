"""Accuracy and time of one hypergradient, for every method of ``hypergradient`` and its peers.

Two inner problems with per-feature weight decay ``0.5 * sum(exp(lam) * w^2)`` and the
hyperparameter ``lam`` (one entry per feature):

* ridge regression, ``n = 2000``, ``d = 1000``: ``f = ||X w - y||^2 / (2n) + decay``,
  outer loss the validation mean squared error;
* logistic regression, ``n = 1000``, ``d = 200``: ``f = mean(softplus(-t * X w)) + decay``,
  outer loss the validation logistic loss.

The columns of ``X`` are scaled geometrically (from 1 down to 0.1) and ``exp(lam) ~ 1e-2``,
so the Hessian is moderately ill-conditioned (condition number ~160 for ridge, ~34 for logistic
regression) and the methods separate over ``k = 5 .. 50`` products. Every method sees the same
``w*``: the exact minimiser in float64 (a dense solve for ridge, Newton's method for logistic
regression), cast to the run's dtype. The reference hypergradient is the dense float64 formula
``-(grad^2_{lam w} f)^T H^{-1} grad_w g``.

For each problem, dtype (float32, float64) and budget ``k`` it prints, per method: the
Hessian-vector products spent (as each library counts or as we counted them), the relative
error against the reference, the median time of one hypergradient (all contenders sampled
alternately, after a warm-up; by default on one thread, timed by the thread's CPU time, which
a shared machine's load disturbs least), and the ratio to torchopt's ``solve_cg`` (via
``torchopt.diff.implicit.custom_root``) and to hypergrad's ``conjugate_gradient`` at the same k.

Ours: ``CG``, ``GMRES(restart=k)``, ``NormalCG`` (two products per iteration, so ``k // 2``
iterations), ``Neumann(step=1/L)`` (the series up to the k-th power, as hypergrad's) with ``L``
from a power iteration computed once outside the timing, ``Nystrom(rank=k, rho, seed=0)`` (``k``
columns in one vectorised backward pass, plus one product to measure the residual),
``StochasticAID(steps=k)`` with SGD at ``lr = 1/L`` (the loss is deterministic here, so it is
the Neumann series one term short, rebuilt from a fresh graph every step); k-independent:
``FiniteDifference(step=1/L)`` and ``Direct`` (its ``n`` columns in one vectorised pass).

Peers, where they import (a missing one is skipped with a note): torchopt 0.7.3
(``custom_root`` + ``linear_solve.solve_cg(maxiter=k, rtol=0, atol=0)``, which spends one
extra product on ``A @ x0`` with ``x0 = 0`` and evaluates the optimality function twice), and
moskomule's hypergrad 0.0.1 (``approx_hypergrad.conjugate_gradient / neumann / nystrom``; its
products are forward-over-reverse and rebuild the inner graph every time; its CG updates the
search direction with the *old* residual, so its error is not the textbook CG error; its CG is
called with ``lr=1``, as any other ``lr`` also leaves its residual update inconsistent with its
step; its Nystrom draws columns from the global RNG, so its error varies from call to call).

Two side tables check the targets: our CG error against textbook CG run on the dense Hessian
(and against the "old-residual" recurrence of hypergrad's CG, on the same dense matrix), and our
``Nystrom`` against a dense computation of the paper's formula (Hataya & Yamada, AISTATS 2023:
``H ~ C W^+ C^T + rho I`` with ``C = H[:, K]``, ``W = H[K, K]``, ``K`` the same random columns
our ``Nystrom`` draws: ``torch.randperm(d, generator=Generator().manual_seed(seed))[:k]``).

    python benchmarks/hypergradient.py [--quick] [--repeats 15] [--ks 5 10 20 50] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch

from implicit_layers import (
    CG,
    GMRES,
    Direct,
    FiniteDifference,
    Neumann,
    NormalCG,
    Nystrom,
    StochasticAID,
    hypergradient,
)

# the peers use the deprecated functorch namespace and torch.jit.script: keep the output readable
warnings.filterwarnings("ignore", category=DeprecationWarning)
warnings.filterwarnings("ignore", category=FutureWarning)
warnings.filterwarnings("ignore", message=".*functorch.*")

try:
    import torchopt
except Exception as error:  # noqa: BLE001 - any failure to import means "skip the peer"
    torchopt = None
    TORCHOPT_NOTE = (
        f"torchopt does not import ({error!r:.60}): its rows are 'torchopt-style CG*', a "
        "re-implementation of what custom_root + solve_cg do per call"
    )
else:
    TORCHOPT_NOTE = f"torchopt {torchopt.__version__}"
try:
    from hypergrad import approx_hypergrad
except Exception as error:  # noqa: BLE001
    approx_hypergrad = None
    HYPERGRAD_NOTE = f"hypergrad not measured: it does not import ({error!r:.60})"
else:
    try:
        from importlib.metadata import version

        HYPERGRAD_NOTE = f"hypergrad {version('hypergrad')}"
    except Exception:  # noqa: BLE001
        HYPERGRAD_NOTE = "hypergrad"

NYSTROM_SEED = 0
ROWS: list[dict] = []  # every printed row, for --json


# ----------------------------------------------------------------------------- problems


@dataclass
class Problem:
    """One bilevel problem: float64 data, losses built for any dtype, and the dense reference."""

    name: str
    data: dict[str, torch.Tensor]  # float64
    make_losses: Callable[[dict[str, torch.Tensor]], tuple[Callable, Callable]]
    w_star: torch.Tensor  # float64, exact
    lam: torch.Tensor  # float64
    hessian: torch.Tensor = None  # dense float64 H at w*
    b: torch.Tensor = None  # grad_w g at w*
    direct: torch.Tensor = None  # grad_lam g at w*
    reference: torch.Tensor = None  # the hypergradient
    lipschitz: float = math.nan  # power-iteration estimate of ||H||

    def losses(self, dtype: torch.dtype):
        return self.make_losses({k: v.to(dtype) for k, v in self.data.items()})

    def implicit_term(self, x: torch.Tensor) -> torch.Tensor:
        """``-(grad^2_{lam w} f)^T x`` in float64 (for a dense solution ``x`` of ``H x = b``)."""
        inner, _ = self.losses(torch.float64)
        _, vjp = torch.func.vjp(lambda lam: torch.func.grad(inner)(self.w_star, lam), self.lam)
        return -vjp(x.double())[0]


def _design(n, d, low, generator):
    """Gaussian features with geometrically decaying column scales (correlated spectrum)."""
    scales = torch.logspace(0.0, low, d, dtype=torch.float64)
    return torch.randn(n, d, generator=generator, dtype=torch.float64) * scales


def _decay(lam, generator):
    return math.log(1e-2) + 0.5 * torch.randn(lam, generator=generator, dtype=torch.float64)


def ridge_problem(n=2000, d=1000, seed=0) -> Problem:
    generator = torch.Generator().manual_seed(seed)
    X = _design(n, d, -1.0, generator)
    truth = torch.randn(d, generator=generator, dtype=torch.float64)
    y = X @ truth + 0.5 * torch.randn(n, generator=generator, dtype=torch.float64)
    X_val = _design(n // 2, d, -1.0, generator)
    y_val = X_val @ truth + 0.5 * torch.randn(n // 2, generator=generator, dtype=torch.float64)
    lam = _decay(d, generator)

    def make_losses(p):
        X, y, X_val, y_val = p["X"], p["y"], p["X_val"], p["y_val"]

        def inner(w, lam):
            return 0.5 * ((X @ w - y) ** 2).mean() + 0.5 * (lam.exp() * w * w).sum()

        def outer(w, lam):
            return 0.5 * ((X_val @ w - y_val) ** 2).mean()

        return inner, outer

    hessian = X.T @ X / n + torch.diag(lam.exp())
    w_star = torch.linalg.solve(hessian, X.T @ y / n)
    data = dict(X=X, y=y, X_val=X_val, y_val=y_val)
    return Problem(f"ridge n={n} d={d}", data, make_losses, w_star, lam)


def logistic_problem(n=1000, d=200, seed=1) -> Problem:
    generator = torch.Generator().manual_seed(seed)
    X = _design(n, d, -1.0, generator)
    truth = 3.0 * torch.randn(d, generator=generator, dtype=torch.float64)

    def labels(features):
        p = torch.sigmoid(features @ truth / 3.0)
        return 2.0 * torch.bernoulli(p, generator=generator) - 1.0

    t = labels(X)
    X_val = _design(n // 2, d, -1.0, generator)
    t_val = labels(X_val)
    lam = _decay(d, generator)

    def make_losses(p):
        X, t, X_val, t_val = p["X"], p["t"], p["X_val"], p["t_val"]

        def inner(w, lam):
            return (
                torch.nn.functional.softplus(-t * (X @ w)).mean() + 0.5 * (lam.exp() * w * w).sum()
            )

        def outer(w, lam):
            return torch.nn.functional.softplus(-t_val * (X_val @ w)).mean()

        return inner, outer

    # Newton's method in float64, to machine precision
    w = torch.zeros(d, dtype=torch.float64)
    decay = lam.exp()
    for _ in range(100):
        margin = t * (X @ w)
        s = torch.sigmoid(-margin)
        gradient = -X.T @ (t * s) / n + decay * w
        if float(gradient.norm()) < 1e-15:
            break
        curvature = s * (1 - s)
        hessian = X.T @ (curvature[:, None] * X) / n + torch.diag(decay)
        w = w - torch.linalg.solve(hessian, gradient)
    data = dict(X=X, t=t, X_val=X_val, t_val=t_val)
    return Problem(f"logistic n={n} d={d}", data, make_losses, w, lam)


def finish(problem: Problem) -> Problem:
    """The dense float64 Hessian, ``b``, the reference hypergradient and ``L``, by autograd."""
    inner, outer = problem.losses(torch.float64)
    w, lam = problem.w_star, problem.lam
    gradient_norm = float(torch.func.grad(inner)(w, lam).norm())
    assert gradient_norm < 1e-10, f"{problem.name}: w* is not a minimiser ({gradient_norm:.1e})"
    hessian = torch.func.hessian(inner)(w, lam)
    problem.hessian = 0.5 * (hessian + hessian.T)
    problem.b, problem.direct = torch.func.grad(outer, argnums=(0, 1))(w, lam)
    x = torch.linalg.solve(problem.hessian, problem.b)
    problem.reference = problem.direct + problem.implicit_term(x)
    v = torch.ones_like(w)
    for _ in range(100):  # power iteration: the step of the Neumann-type methods is 1 / L
        v = problem.hessian @ v
        v = v / v.norm()
    problem.lipschitz = float(v @ (problem.hessian @ v))
    return problem


# ----------------------------------------------------------------------------- contenders


@dataclass
class Contender:
    label: str
    run: Callable[[], torch.Tensor]  # one hypergradient, as it is timed
    products: int | str  # as counted (for hypergrad: its iterations, known by construction)
    result: torch.Tensor  # from the first call, which is also the warm-up
    seconds: float  # that first call's time, to decide how often to sample


# the timer: the calling thread's CPU time when torch runs on one thread (steady on a shared
# machine: time spent descheduled is not counted), else wall-clock time; set in main()
clock = time.perf_counter


def _first_call(run: Callable[[], torch.Tensor]) -> tuple[torch.Tensor, float]:
    start = clock()
    result = run()
    return result, clock() - start


def ours(label, inner, outer, w, lam, method) -> Contender:
    def run():
        grads, _ = hypergradient(inner, outer, w, lam, method=method, on_failure="ignore")
        return grads

    start = clock()
    grads, record = hypergradient(inner, outer, w, lam, method=method, on_failure="ignore")
    return Contender(label, run, record.products, grads, clock() - start)


def torchopt_cg(inner, outer, w, lam, k) -> Contender:
    """torchopt's implicit gradient set up as its tutorials do: ``custom_root`` with the inner
    gradient (``torch.func.grad``) as optimality function; the decorated solver returns the
    given ``w*`` (we time the backward). Products are counted on a separate, untimed copy."""
    optimality = torch.func.grad(inner, argnums=0)

    def make(count=None):
        solve = torchopt.linear_solve.solve_cg(maxiter=k, rtol=0.0, atol=0.0)
        if count is not None:
            base = solve

            def solve(matvec, b):
                def counted(v):
                    count[0] += 1
                    return matvec(v)

                return base(counted, b)

        @torchopt.diff.implicit.custom_root(optimality, argnums=1, solve=solve)
        def solver(w0, lam):
            return w0.detach()

        def run():
            lam_var = lam.detach().requires_grad_()
            (grad,) = torch.autograd.grad(outer(solver(w, lam_var), lam_var), lam_var)
            return grad

        return run

    count = [0]
    make(count)()
    run = make()
    result, seconds = _first_call(run)
    return Contender("torchopt solve_cg", run, count[0], result, seconds)


def torchopt_style_cg(inner, outer, w, lam, k) -> Contender:
    """Only when torchopt does not import: a re-implementation (ours, not torchopt's code) of
    what ``custom_root`` + ``solve_cg(maxiter=k)`` do per call, labelled ``torchopt-style CG*``:
    one ``torch.func.vjp`` of the optimality function in ``w`` (the matvec), CG from ``x0 = 0``
    with the residual ``b - A x0`` spent as a product, ``rtol`` checked every iteration, then a
    second evaluation of the optimality function for the VJP in ``lam``."""
    optimality = torch.func.grad(inner, argnums=0)
    count = [0]

    def run():
        grad_w, grad_lam = torch.func.grad(outer, argnums=(0, 1))(w, lam)
        _, vjp_w = torch.func.vjp(lambda v: optimality(v, lam), w)

        def matvec(v):
            count[0] += 1
            return vjp_w(v)[0]

        b = -grad_w
        x = torch.zeros_like(b)
        r = b - matvec(x)
        p, gamma = r, r.dot(r)
        iterations = 0
        while bool(gamma > 0) and iterations < k:
            q = matvec(p)
            alpha = gamma / p.dot(q)
            x, r = x + alpha * p, r - alpha * q
            gamma_new = r.dot(r)
            p, gamma = r + (gamma_new / gamma) * p, gamma_new
            iterations += 1
        _, vjp_lam = torch.func.vjp(lambda v: optimality(w, v), lam)
        return grad_lam + vjp_lam(x)[0]  # x = -H^-1 grad_w g

    result, seconds = _first_call(run)
    return Contender("torchopt-style CG*", run, count[0], result, seconds)


def hypergrad_method(name, inner, outer, w, lam, *options) -> Contender:
    """``hypergrad.approx_hypergrad.<name>(inner, outer, (w,), (lam,), *options)``: its
    objectives take tuples of parameters."""
    function = getattr(approx_hypergrad, name)

    def inner_t(inner_params, outer_params):
        return inner(inner_params[0], outer_params[0])

    def outer_t(inner_params, outer_params):
        return outer(inner_params[0], outer_params[0])

    def run():
        return function(inner_t, outer_t, (w,), (lam,), *options)[0]

    products = f"{options[0]}b" if name == "nystrom" else options[0]  # b: one batched jacrev
    label = {"conjugate_gradient": "hypergrad cg"}.get(name, f"hypergrad {name}")
    result, seconds = _first_call(run)
    return Contender(label, run, products, result, seconds)


TORCHOPT_LABELS = ("torchopt solve_cg", "torchopt-style CG*")  # the real one, or our stand-in
SLOW_S = 0.2  # a contender slower than this is sampled max(3, repeats // 3) times


def median_times(contenders: list[Contender], repeats: int, cap: int | None = None) -> list[float]:
    """Median time of each contender, sampled alternately (round-robin) so that drift in the
    machine's load hits every contender alike; slow ones get fewer rounds, ``cap`` at most."""
    counts = [repeats if c.seconds < SLOW_S else max(3, repeats // 3) for c in contenders]
    if cap is not None:
        counts = [min(n, cap) for n in counts]
    samples: list[list[float]] = [[] for _ in contenders]
    for round_ in range(max(counts)):
        for contender, times, count in zip(contenders, samples, counts):
            if round_ < count:
                start = clock()
                contender.run()
                times.append(clock() - start)
    return [statistics.median(times) for times in samples]


def relative_error(estimate: torch.Tensor, reference: torch.Tensor) -> float:
    return float((estimate.double() - reference).norm() / reference.norm())


# ----------------------------------------------------------------------------- dense references


def dense_cg(A, b, k, old_residual=False):
    """``k`` iterations of CG from 0; ``old_residual`` updates the direction with the residual
    before the step, ``p <- r_old + beta p`` (hypergrad's recurrence), instead of the new one."""
    x, r = torch.zeros_like(b), b.clone()
    p, rr = r.clone(), r.dot(r)
    for _ in range(k):
        q = A @ p
        alpha = rr / p.dot(q)
        x = x + alpha * p
        r_new = r - alpha * q
        rr_new = r_new.dot(r_new)
        p = (r if old_residual else r_new) + (rr_new / rr) * p
        r, rr = r_new, rr_new
    return x


def paper_nystrom(problem: Problem, k: int, rho: float, seed: int) -> torch.Tensor:
    """The hypergradient with ``H^-1 ~ (C W^+ C^T + rho I)^-1`` built densely in float64 from
    the columns our ``Nystrom`` draws."""
    d = problem.hessian.shape[0]
    indices = torch.randperm(d, generator=torch.Generator().manual_seed(seed))[:k]
    C = problem.hessian[:, indices]
    sketch = C @ torch.linalg.pinv(problem.hessian[indices][:, indices], hermitian=True) @ C.T
    x = torch.linalg.solve(sketch + rho * torch.eye(d, dtype=torch.float64), problem.b)
    return problem.direct + problem.implicit_term(x)


# ----------------------------------------------------------------------------- tables


def row(cells, widths) -> str:
    first, *rest = [str(c) for c in cells]
    return " ".join([f"{first:<{widths[0]}}"] + [f"{c:>{w}}" for c, w in zip(rest, widths[1:])])


def ratio(seconds: float, base: float | None) -> str:
    return "-" if base is None else f"{seconds / base:.2f}"


COLUMNS = ["k", "method", "products", "rel. error", "median ms", "/torchopt", "/hg cg"]
WIDTHS = [3, 22, 8, 10, 10, 9, 7]


def contenders_at(k, inner, outer, w, lam, step, rho) -> list[Contender]:
    def sgd(params):
        return torch.optim.SGD(params, lr=step)

    methods = [
        ("CG", CG(max_iter=k, tol=0.0)),
        ("GMRES(restart=k)", GMRES(max_iter=k, restart=k, tol=0.0)),
        (f"NormalCG({k // 2} iter.)", NormalCG(max_iter=max(1, k // 2), tol=0.0)),
        ("Neumann(1/L)", Neumann(step=step, max_iter=k, tol=0.0)),
        ("Nystrom(rank=k)", Nystrom(rank=k, rho=rho, seed=NYSTROM_SEED)),
        ("StochasticAID(SGD 1/L)", StochasticAID(steps=k, optimizer=sgd)),
    ]
    contenders = [ours(label, inner, outer, w, lam, method) for label, method in methods]
    if torchopt is not None:
        contenders.append(torchopt_cg(inner, outer, w, lam, k))
    else:
        contenders.append(torchopt_style_cg(inner, outer, w, lam, k))
    if approx_hypergrad is not None:
        contenders += [
            hypergrad_method("conjugate_gradient", inner, outer, w, lam, k, 1.0),
            hypergrad_method("neumann", inner, outer, w, lam, k, step),
            hypergrad_method("nystrom", inner, outer, w, lam, k, rho),
        ]
    return contenders


def run_case(problem: Problem, dtype: torch.dtype, args, summary: dict) -> None:
    inner, outer = problem.losses(dtype)
    w, lam = problem.w_star.to(dtype), problem.lam.to(dtype)
    step, rho = 1.0 / problem.lipschitz, args.rho_factor * problem.lipschitz
    name = str(dtype).removeprefix("torch.")
    print(
        f"\n== {problem.name}, {name}: L = {problem.lipschitz:.3g} (power iteration), "
        f"Neumann step = 1/L, Nystrom rho = {args.rho_factor:g} L = {rho:.3g} =="
    )
    print(row(COLUMNS, WIDTHS))
    print("-" * (sum(WIDTHS) + len(WIDTHS) - 1))
    cg_rows, nystrom_rows = [], []
    for k in args.ks:
        contenders = contenders_at(k, inner, outer, w, lam, step, rho)
        times = median_times(contenders, args.repeats)
        by_label = {c.label: (c, t) for c, t in zip(contenders, times)}
        base_to = next((by_label[b][1] for b in TORCHOPT_LABELS if b in by_label), None)
        base_hg = by_label["hypergrad cg"][1] if "hypergrad cg" in by_label else None
        errors = {}
        for contender, seconds in zip(contenders, times):
            errors[contender.label] = error = relative_error(contender.result, problem.reference)
            summary[(problem.name, name, k, contender.label)] = (error, seconds)
            ROWS.append(
                dict(problem=problem.name, dtype=name, k=k, method=contender.label)
                | dict(products=contender.products, error=error, ms=1e3 * seconds)
                | dict(lipschitz=problem.lipschitz, rho=rho)
            )
            print(
                row(
                    [
                        k,
                        contender.label,
                        contender.products,
                        f"{error:.3e}",
                        f"{1e3 * seconds:.2f}",
                        ratio(seconds, base_to),
                        ratio(seconds, base_hg),
                    ],
                    WIDTHS,
                )
            )
        print()
        # textbook CG on the dense Hessian, in this dtype and in float64, and the old-residual
        # recurrence; the hypergradient from each, against the reference
        H, b = problem.hessian, problem.b
        textbook = dense_cg(H.to(dtype), b.to(dtype), k)
        dense = [
            problem.direct + problem.implicit_term(x)
            for x in (textbook, dense_cg(H, b, k), dense_cg(H, b, k, old_residual=True))
        ]
        cg_rows.append(
            (
                k,
                errors["CG"],
                *(relative_error(g, problem.reference) for g in dense),
                errors.get("hypergrad cg"),
            )
        )
        paper = paper_nystrom(problem, k, rho, NYSTROM_SEED)
        nystrom_rows.append(
            (
                k,
                relative_error(by_label["Nystrom(rank=k)"][0].result, paper),
                relative_error(paper, problem.reference),
                errors["Nystrom(rank=k)"],
                errors.get("hypergrad nystrom"),
            )
        )

    def show(value):
        return "-" if value is None else f"{value:.3e}"

    print("-- CG against textbook CG on the dense Hessian, relative errors --")
    widths = [3, 10, 16, 13, 17, 12]
    print(
        row(
            ["k", "our CG", f"textbook {name}", "textbook f64", "old-residual f64", "hypergrad cg"],
            widths,
        )
    )
    for cells in cg_rows:
        print(row([cells[0]] + [show(v) for v in cells[1:]], widths))
    summary[(problem.name, name, "cg-check")] = cg_rows

    print("-- Nystrom against the paper's formula (dense float64, the same columns) --")
    widths = [3, 19, 14, 12, 16]
    print(
        row(
            ["k", "|ours-paper|/|paper|", "paper rel.err", "ours rel.err", "hypergrad rel.err"],
            widths,
        )
    )
    for cells in nystrom_rows:
        print(row([cells[0]] + [show(v) for v in cells[1:]], widths))
    summary[(problem.name, name, "nystrom-check")] = nystrom_rows

    print("-- k-independent --")
    single = [
        ours("FiniteDifference(1/L)", inner, outer, w, lam, FiniteDifference(step=step)),
        ours("Direct", inner, outer, w, lam, Direct()),
    ]
    times = median_times(single, args.repeats, cap=3 if single[1].seconds > SLOW_S else None)
    for contender, seconds in zip(single, times):
        error = relative_error(contender.result, problem.reference)
        ROWS.append(
            dict(problem=problem.name, dtype=name, k=None, method=contender.label)
            | dict(products=contender.products, error=error, ms=1e3 * seconds)
        )
        print(
            row(
                ["-", contender.label, contender.products, f"{error:.3e}", f"{1e3 * seconds:.2f}"],
                WIDTHS[:5],
            )
        )


def verdicts(summary: dict, problems: list[Problem], dtypes: list[str], ks: list[int]) -> None:
    print("\n== targets ==")
    for problem in problems:
        limit = 0.9 if problem.name.startswith("ridge") else 0.7
        for dtype in dtypes:
            rows = summary[(problem.name, dtype, "cg-check")]
            ours_errors = [r[1] for r in rows]
            floor = 1e-5 if dtype == "float32" else 1e-12  # rounding, relative to the answer
            never_grows = all(b <= a + floor for a, b in zip(ours_errors, ours_errors[1:]))
            textbook = all(r[1] <= 1.1 * r[2] + floor for r in rows)
            print(f"{problem.name}, {dtype}:")
            print(
                f"  CG error never grows with k: {never_grows}; equals textbook CG in {dtype} "
                f"(within 10% or {floor:g}): {textbook}"
            )
            ratios = []
            for k in ks:
                ours_time = summary[(problem.name, dtype, k, "CG")][1]
                peer = next(
                    summary[(problem.name, dtype, k, b)]
                    for b in TORCHOPT_LABELS
                    if (problem.name, dtype, k, b) in summary
                )
                ratios.append(ours_time / peer[1])
            shown = ", ".join(f"k={k}: {r:.2f}" for k, r in zip(ks, ratios))
            print(
                f"  time CG / torchopt solve_cg, target <= {limit}: {shown} -> "
                f"{'met' if max(ratios) <= limit else 'MISSED'}"
            )
            diffs = [r[1] for r in summary[(problem.name, dtype, "nystrom-check")]]
            print(f"  Nystrom against the paper's formula: largest difference {max(diffs):.1e}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="k in {5, 20} and 3 repeats")
    parser.add_argument(
        "--repeats",
        type=int,
        default=None,
        help="timed samples per contender (default 15; --quick 3)",
    )
    parser.add_argument("--ks", type=int, nargs="+", default=None)
    parser.add_argument(
        "--dtypes", nargs="+", default=["float32", "float64"], choices=["float32", "float64"]
    )
    parser.add_argument(
        "--problems", nargs="+", default=["ridge", "logistic"], choices=["ridge", "logistic"]
    )
    parser.add_argument(
        "--rho-factor",
        type=float,
        default=0.1,
        help="Nystrom's rho as a multiple of L (default 0.1)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (default 1: steadier on a shared machine; 0: torch's default)",
    )
    parser.add_argument(
        "--clock",
        choices=["auto", "cpu", "wall"],
        default="auto",
        help="cpu: the thread's CPU time (only meaningful with --threads 1); wall: wall-clock "
        "time; auto (default): cpu with one thread, else wall",
    )
    parser.add_argument("--json", metavar="PATH", help="also write the rows printed to PATH")
    args = parser.parse_args()
    args.ks = args.ks or ([5, 20] if args.quick else [5, 10, 20, 50])
    args.repeats = args.repeats or (3 if args.quick else 15)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    global clock
    cpu = args.clock == "cpu" or (args.clock == "auto" and torch.get_num_threads() == 1)
    clock = time.thread_time if cpu else time.perf_counter
    torch.manual_seed(0)

    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), "
        f"{'CPU time of the thread' if cpu else 'wall-clock time'}; median of "
        f"{args.repeats} round-robin samples (contenders slower than {SLOW_S} s: "
        f"{max(3, args.repeats // 3)}); errors relative to the dense float64 reference"
    )
    print(f"peers: {TORCHOPT_NOTE}; {HYPERGRAD_NOTE}")
    print(
        "products: Hessian-vector products as counted (hypergrad's: its iterations, each a "
        "forward-over-reverse product; 'Nb' = one batched jacrev of N rows);\n"
        "/torchopt, /hg cg: time over torchopt solve_cg's and hypergrad cg's at the same k"
    )
    builders = {"ridge": ridge_problem, "logistic": logistic_problem}
    start = time.perf_counter()
    problems = [finish(builders[name]()) for name in args.problems]
    summary: dict = {}
    for problem in problems:
        for dtype in args.dtypes:
            run_case(problem, getattr(torch, dtype), args, summary)
    verdicts(summary, problems, args.dtypes, args.ks)
    if args.json:
        meta = dict(threads=torch.get_num_threads(), clock="cpu" if cpu else "wall")
        meta |= dict(repeats=args.repeats, ks=args.ks, peers=[TORCHOPT_NOTE, HYPERGRAD_NOTE])
        checks = {" ".join(key): value for key, value in summary.items() if len(key) == 3}
        with open(args.json, "w") as file:
            json.dump(dict(meta=meta, rows=ROWS, checks=checks), file, indent=1)
    print(f"\n(total {time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
