"""Two CPU processes on gloo, data sharded unequally: every rank equals one process on the union.

Each rank holds a shard; matvec, eigenpairs, trace, the noise variance (with and without a
subsample) and the damper's estimates all-reduce their sufficient statistics, so both
ranks must return the single-process numbers (float64, tight tolerance).
"""

import importlib.util
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import curvlab
from curvlab.damping import LinearShrinkageDamper
from curvlab.noise import noise_variance

pytestmark = pytest.mark.distributed

N, SPLIT = 120, 70  # rank 0 holds 70 samples, rank 1 holds 50
HAS_TRACE = importlib.util.find_spec("curvlab.spectral.trace") is not None


def make_problem():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(N, 6, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (N,), generator=gen)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)).to(torch.float64)
    return model, nn.CrossEntropyLoss(), x, y


def compute(x, y) -> dict:
    """Every quantity under test, on whatever samples this process holds."""
    model, loss_fn, _, _ = make_problem()
    est = curvlab.estimator("autograd", model, loss_fn, (x, y))
    v = torch.linspace(-1, 1, est.num_params, dtype=torch.float64)
    out = {
        "num_samples": est.num_samples,
        "matvec": est.matvec(v),
        "eigenvalues": est.eigenpairs(k=3, seed=0).values,
        "noise": noise_variance(est, batch_size=16, n_probes=4, seed=3).per_probe,
        "noise_paper": noise_variance(
            est, batch_size=16, n_probes=2, method="paper", seed=4
        ).per_probe,
        "noise_subsample": noise_variance(
            est, batch_size=8, n_probes=3, subsample=40, seed=5
        ).per_probe,
    }
    if HAS_TRACE:
        out["trace"] = est.trace(n_matvecs=12, seed=0).value
    damper = LinearShrinkageDamper(update_every=1, n_probes=3, batch_size=16, group_size=1, seed=2)
    sub = LinearShrinkageDamper(
        update_every=1,
        n_probes=2,
        batch_size=16,
        group_size=1,
        subsample=50,
        fresh_subsample=True,
        population=N,
        seed=6,
    )
    lw = LinearShrinkageDamper(rule="ledoit_wolf", update_every=1, n_probes=3, seed=8)
    for _ in range(2):
        damper.step(model, loss_fn, (x, y))
        sub.step(model, loss_fn, (x, y))
    lw.update(0, curvlab.estimator("autograd", model, loss_fn, (x, y), curvature="ggn"))
    out["damper"] = [(r.estimate, r.stderr, r.damping) for r in damper.history]
    out["damper_subsample"] = [(r.estimate, r.stderr, r.damping) for r in sub.history]
    out["damper_lw"] = [(r.estimate, r.damping) for r in lw.history]
    return out


def _worker(rank, world, address, port, out_dir):
    dist.init_process_group(
        "gloo", init_method=f"tcp://{address}:{port}", rank=rank, world_size=world
    )
    try:
        _, _, x, y = make_problem()
        part = slice(0, SPLIT) if rank == 0 else slice(SPLIT, N)
        torch.save(compute(x[part], y[part]), f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def assert_same(a, b):
    if isinstance(a, torch.Tensor):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-14), (a, b)
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for u, w in zip(a, b):
            assert_same(u, w)
    else:
        assert a == pytest.approx(b, rel=1e-10, abs=1e-14)


@pytest.mark.timeout(120)
def test_two_gloo_ranks_equal_one_process_on_the_union(tmp_path):
    mp.spawn(_worker, args=(2, "127.0.0.1", _free_port(), str(tmp_path)), nprocs=2, join=True)
    _, _, x, y = make_problem()
    single = compute(x, y)
    assert single["num_samples"] == N
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=False)
        assert got.keys() == single.keys()
        for key in single:
            assert_same(got[key], single[key])
