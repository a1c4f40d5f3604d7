"""A layer inside DistributedDataParallel: two gloo processes on half a batch each give the
gradients of one process on the whole batch."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
from torch import nn

from implicit_layers import GMRES, FixedPoint, FixedPointLayer

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()),
    reason="torch.distributed with the gloo backend is not available",
)

f64 = torch.float64
WORLD_SIZE = 2
BATCH, N_IN, N_HIDDEN, N_OUT = 8, 3, 5, 2


class Cell(nn.Module):
    """``Phi(z, x) = tanh(W z + x)`` with ``||W||_2 = 0.5``: a contraction with parameters."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(N_HIDDEN, N_HIDDEN, dtype=f64)
        with torch.no_grad():
            self.linear.weight.mul_(0.5 / torch.linalg.matrix_norm(self.linear.weight, 2))

    def forward(self, z, x):
        return torch.tanh(self.linear(z) + x)


class Model(nn.Module):
    """Linear encoder, a fixed-point layer whose Phi has parameters, linear head."""

    def __init__(self):
        super().__init__()
        self.encoder = nn.Linear(N_IN, N_HIDDEN, dtype=f64)
        self.equilibrium = FixedPointLayer(
            Cell(), solver=FixedPoint(tol=1e-13, max_iter=500), backward=GMRES(tol=1e-13)
        )
        self.head = nn.Linear(N_HIDDEN, N_OUT, dtype=f64)

    def forward(self, x):
        h = self.encoder(x)
        return self.head(self.equilibrium(torch.zeros_like(h), h))


def make_problem():
    torch.manual_seed(0)
    model = Model()
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(BATCH, N_IN, dtype=f64, generator=generator)
    y = torch.randn(BATCH, N_OUT, dtype=f64, generator=generator)
    return model, x, y


def loss_fn(output, y):
    return ((output - y) ** 2).mean()  # a mean: DDP's average of half-batch grads matches it


def worker(rank: int, port: int, out_dir: str) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD_SIZE)
    try:
        model, x, y = make_problem()  # the same seed: the same initial weights on every rank
        ddp = nn.parallel.DistributedDataParallel(model)
        half = slice(rank * BATCH // WORLD_SIZE, (rank + 1) * BATCH // WORLD_SIZE)
        loss_fn(ddp(x[half]), y[half]).backward()
        grads = {name: p.grad.clone() for name, p in model.named_parameters()}
        record = model.equilibrium.last_backward
        torch.save(
            {"grads": grads, "backward_converged": record is not None and record.converged},
            os.path.join(out_dir, f"rank{rank}.pt"),
        )
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_gradients_match_single_process_on_the_full_batch(tmp_path):
    import torch.multiprocessing as mp

    model, x, y = make_problem()
    loss_fn(model(x), y).backward()
    expected = {name: p.grad for name, p in model.named_parameters()}
    # the layer's own parameters (Phi's weight and bias) are part of the comparison
    assert any(name.startswith("equilibrium.phi.") for name in expected)

    mp.spawn(worker, args=(free_port(), str(tmp_path)), nprocs=WORLD_SIZE, join=True)

    for rank in range(WORLD_SIZE):
        result = torch.load(tmp_path / f"rank{rank}.pt")
        assert result["backward_converged"]
        assert result["grads"].keys() == expected.keys()
        for name, grad in result["grads"].items():
            torch.testing.assert_close(grad, expected[name], rtol=1e-10, atol=1e-12, msg=name)
