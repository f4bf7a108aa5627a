"""Two gloo CPU processes: the ranks take every damping decision together.

One spawn runs three scenarios in order on a fixed model (the damper's logic, not DDP):
agreement (identical histories on both ranks, equal to one process on the union of the
shards, an update skipped identically on both when rank 1's data holds a NaN), a failure on
rank 1 (both ranks raise, rank 0 naming rank 1), and a rank that arrives too late (the other
raises after the damper's timeout, not torch's 30 minutes).
"""

import math
import socket
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from curvlab.damping import DampingSyncError, LinearShrinkageDamper, RMTNoise

pytestmark = pytest.mark.distributed

N, SPLIT, STEPS = 120, 70, 6  # rank 0 holds 70 samples of every batch, rank 1 holds 50
NAN_STEP = 4  # the update at this step sees a NaN in rank 1's data


def make_problem():
    gen = torch.Generator().manual_seed(0)
    xs = torch.randn(STEPS, N, 6, generator=gen, dtype=torch.float64)
    ys = torch.randint(0, 3, (STEPS, N), generator=gen)
    xs[NAN_STEP - 1, SPLIT + 7, 2] = math.nan  # a sample of rank 1's shard
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)).to(torch.float64)
    return model, nn.CrossEntropyLoss(), xs, ys


def agreement_run(part):
    """The damper's history over STEPS steps on the samples ``part`` of every batch."""
    model, loss_fn, xs, ys = make_problem()
    damper = LinearShrinkageDamper(rule=RMTNoise(group_size=1, n_probes=3), update_every=1,
                                   init=1e-2, seed=4)
    for t in range(STEPS):
        loss = loss_fn(model(xs[t, part]), ys[t, part]).detach()
        damper.step(model, loss_fn, (xs[t, part], ys[t, part]), loss=loss)
    return [(r.step, r.decision, r.reason, r.estimate, r.batch_size, r.damping)
            for r in damper.history]


def _worker(rank, world, port, out_dir):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    out = {}
    try:
        part = slice(0, SPLIT) if rank == 0 else slice(SPLIT, N)
        out["history"] = agreement_run(part)

        model, loss_fn, xs, ys = make_problem()
        damper = LinearShrinkageDamper(update_every=1)
        batch = (xs[0, part], ys[0, part]) if rank == 0 else (xs[0, part],)  # malformed
        try:
            damper.step(model, loss_fn, batch)
        except Exception as exc:
            out["failure"] = (type(exc).__name__, str(exc))

        damper = LinearShrinkageDamper(update_every=1, timeout=2.0)
        if rank == 1:
            time.sleep(5.0)
        start = time.monotonic()
        try:
            damper.step(model, loss_fn, (xs[1, part], ys[1, part]))
        except Exception as exc:
            out["late"] = (type(exc).__name__, str(exc), time.monotonic() - start)
    finally:
        torch.save(out, f"{out_dir}/rank{rank}.pt")
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.timeout(240)
def test_two_gloo_ranks_decide_together(tmp_path):
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    got = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]

    # agreement: the same history on both ranks, the NaN update skipped by both
    h0, h1 = got[0]["history"], got[1]["history"]
    assert len(h0) == len(h1) == STEPS
    for a, b in zip(h0, h1):  # identical, bit for bit (NaN estimates of the skip included)
        assert a[:3] == b[:3] and a[4:] == b[4:]
        assert a[3] == b[3] or (math.isnan(a[3]) and math.isnan(b[3]))
    assert [r[1] for r in h0] == ["accept"] * (NAN_STEP - 1) + ["skip"] + ["accept"] * (
        STEPS - NAN_STEP
    )
    assert h0[NAN_STEP - 1][2] == "the data is not finite on rank 1"
    assert {r[4] for r in h0 if r[1] == "accept"} == {N}  # B inferred over both ranks
    # equal to one process holding the union (groups of one sample never straddle ranks)
    single = agreement_run(slice(0, N))
    for a, b in zip(h0, single):
        assert a[1] == b[1] and a[4] == b[4]
        if a[1] == "accept":
            assert a[3] == pytest.approx(b[3], rel=1e-10) and a[5] == pytest.approx(b[5],
                                                                                   rel=1e-10)
    assert single[NAN_STEP - 1][2] == "the data is not finite"

    # a failure on rank 1 raises on both ranks
    assert got[1]["failure"][0] == "InvalidInputError"
    assert got[0]["failure"][0] == "DampingSyncError"
    assert "rank 1 failed" in got[0]["failure"][1]

    # a late rank: the waiting one raises after the damper's timeout, and so does the late one
    assert got[0]["late"][0] == "DampingSyncError" and 1.5 < got[0]["late"][2] < 4.5
    assert "within 2 s" in got[0]["late"][1]
    assert got[1]["late"][0] == "DampingSyncError"
    assert issubclass(DampingSyncError, RuntimeError)
