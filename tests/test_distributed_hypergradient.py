"""``hypergradient(..., process_group=...)``: ranks holding shards of the data get the
hypergradient of one process on all of it, with the same iterations, for 2 and 3 gloo
processes, tensor and dict hyperparameters, CG, GMRES and Neumann, in float64."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from implicit_layers import CG, GMRES, Neumann, hypergradient

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()),
    reason="torch.distributed with the gloo backend is not available",
)

f64 = torch.float64
SAMPLES, FEATURES = 12, 4  # 12 rows: shards of 6 and of 4


def data():
    generator = torch.Generator().manual_seed(0)
    X = torch.randn(SAMPLES, FEATURES, generator=generator, dtype=f64)
    y = torch.randn(SAMPLES, generator=generator, dtype=f64)
    X_val = torch.randn(SAMPLES, FEATURES, generator=generator, dtype=f64)
    y_val = torch.randn(SAMPLES, generator=generator, dtype=f64)
    return X, y, X_val, y_val


def losses(X, y, X_val, y_val, as_dict: bool):
    """Shard means: ridge with per-feature decay, split over two hyperparameter tensors for
    the dict case; the outer loss depends on lam too (a direct term)."""

    def decay(lam):
        return torch.cat([lam["a"], lam["b"]]).exp() if as_dict else lam.exp()

    def inner(w, lam):
        return 0.5 * ((X @ w - y) ** 2).mean() + 0.5 * (decay(lam) * w * w).sum()

    def outer(w, lam):
        return 0.5 * ((X_val @ w - y_val) ** 2).mean() + 0.01 * decay(lam).sum()

    return inner, outer


def problem(as_dict: bool):
    X, y, _, _ = data()
    lam = torch.linspace(-1.0, 0.5, FEATURES, dtype=f64)
    H = X.T @ X / SAMPLES + torch.diag(lam.exp())
    w = torch.linalg.solve(H, X.T @ y / SAMPLES)  # the minimiser on all the data
    return w, ({"a": lam[:2], "b": lam[2:]} if as_dict else lam)


METHODS = {
    "CG": lambda: CG(tol=1e-13),
    "GMRES": lambda: GMRES(tol=1e-13),
    "Neumann": lambda: Neumann(step=0.5, max_iter=500, tol=1e-13),
}


def on_shard(rank: int, world: int, port: int, out: str, job) -> None:
    """Rank ``rank`` of a gloo group of ``world``: ``job`` on its shard of the data, its result
    saved for the test to read."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        shard = SAMPLES // world
        parts = [t[rank * shard : (rank + 1) * shard] for t in data()]
        torch.save(job(parts, dist.group.WORLD), os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def hypergradients(parts, group):
    """Every method's hypergradient and record, for tensor and dict hyperparameters."""
    results = {}
    for as_dict in (False, True):
        w, lam = problem(as_dict)
        inner, outer = losses(*parts, as_dict)
        for name, make in METHODS.items():
            results[(as_dict, name)] = hypergradient(
                inner, outer, w, lam, make(), process_group=group
            )
    return results


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.parametrize("world", [2, 3])
def test_every_rank_gets_the_hypergradient_of_all_the_data(world, tmp_path):
    mp.spawn(on_shard, args=(world, free_port(), str(tmp_path), hypergradients), nprocs=world)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(world)]
    for as_dict in (False, True):
        w, lam = problem(as_dict)
        inner, outer = losses(*data(), as_dict)
        for name, make in METHODS.items():
            expected, alone = hypergradient(inner, outer, w, lam, make())
            for results in ranks:
                grads, record = results[(as_dict, name)]
                for got, want in zip(
                    grads.values() if as_dict else [grads],
                    expected.values() if as_dict else [expected],
                ):
                    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
                # the same iterations as one process, and one all-reduce per product plus two
                assert record.iterations == alone.iterations, (name, record, alone)
                assert record.all_reduces == record.products + 2
                bytes_per_vector = FEATURES * 8
                expected_bytes = bytes_per_vector * (record.products + 2 + 1)  # b and direct: 2n
                assert record.reduced_bytes == expected_bytes
            assert len({results[(as_dict, name)][1] for results in ranks}) == 1  # identical


def test_a_process_group_needs_torch_distributed_and_a_linear_solver():
    from implicit_layers import FiniteDifference

    w, lam = problem(False)
    inner, outer = losses(*data(), False)
    with pytest.raises(NotImplementedError, match="`process_group` works with the linear"):
        hypergradient(inner, outer, w, lam, FiniteDifference(), process_group=object())
    if not dist.is_initialized():
        with pytest.raises(RuntimeError, match="torch.distributed is not initialised"):
            hypergradient(inner, outer, w, lam, CG(), process_group=object())


def train(parts, process_group=None):
    """A BilevelTrainer on ridge regression with per-feature log decay: 20 inner SGD steps,
    an outer step after every 5; returns the final weights and hyperparameters."""
    from implicit_layers import BilevelTrainer

    X, y, X_val, y_val = parts
    model = torch.nn.Linear(FEATURES, 1, bias=False, dtype=f64)
    torch.nn.init.zeros_(model.weight)
    log_decay = torch.linspace(-1.0, 0.5, FEATURES, dtype=f64).requires_grad_()

    def inner_loss(model, lam, batch):
        X, y = batch
        return (
            0.5 * ((model(X)[:, 0] - y) ** 2).mean()
            + 0.5 * (lam.exp() * model.weight[0] ** 2).sum()
        )

    def outer_loss(model, lam, batch):
        X, y = batch
        return 0.5 * ((model(X)[:, 0] - y) ** 2).mean()

    trainer = BilevelTrainer(
        model,
        log_decay,
        inner_loss,
        outer_loss,
        [(X, y)],
        [(X_val, y_val)],
        inner_optimizer=torch.optim.SGD(model.parameters(), lr=0.3),
        outer_optimizer=torch.optim.SGD([log_decay], lr=0.5),
        method=CG(tol=1e-13),
        unroll_steps=5,
        progress=False,
        process_group=process_group,
    )
    logs = trainer.run(20)
    return model.weight.detach().clone(), log_decay.detach().clone(), [log.record for log in logs]


def test_a_bilevel_trainer_over_shards_takes_the_steps_of_one_process_on_all_the_data(tmp_path):
    mp.spawn(on_shard, args=(2, free_port(), str(tmp_path), train), nprocs=2)
    weight, log_decay, records = train(data())
    for rank in range(2):
        got_weight, got_decay, got_records = torch.load(
            tmp_path / f"rank{rank}.pt", weights_only=False
        )
        torch.testing.assert_close(got_weight, weight, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(got_decay, log_decay, rtol=1e-10, atol=1e-12)
        assert [r.iterations for r in got_records] == [r.iterations for r in records]
        assert all(r.all_reduces == r.products + 2 for r in got_records)
