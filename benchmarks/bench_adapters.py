"""Adapter overhead per curvature-vector product, and BackPACK's per-sample diagonal GGN.

Each adapter's ``est.matvec(v)`` (flat [P] vector in and out, input checks, batch
weighting, finiteness check) is timed against the backend's own product function called
directly with per-parameter tensors on an equivalent cached graph built on a copy of the
model (for kfac: the adapter's curvlinops operator itself). The two run back to back in
each repetition, in alternating order; the ratio is the median of the pairs' ratios and
its quartiles show the timing noise. The per-sample diagonal GGN (BackPACK's
BatchDiagGGNExact through the adapter) is timed against a plain autograd loop over samples
(one Jacobian per sample, J^T H_out J diagonal), best of three. Model: a trained
64-128-10 tanh MLP on all 1797 digits (float64, P = 9610). Times are this process's CPU
time on one torch thread, because the machine is shared.
"""

from __future__ import annotations

import copy
import importlib.util
import statistics
import time
from collections.abc import Callable

import torch

import curvlab
from curvlab._params import unflatten

from ._common import cpu_time, digits, table, trained_mlp

TITLE = "Adapters: overhead per product against the backends' direct calls"
N, CALLS, REPEATS, PER_SAMPLE_N = 1797, 3, 100, 128


def _paired_cpu_times(
    adapter: Callable[[], object], direct: Callable[[], object], repeats: int
) -> tuple[float, float, float, float, float]:
    """Median CPU seconds of each, and the median and quartiles of the per-repetition ratio.

    The two run back to back in each repetition (order flipped every time), so the ratio of
    a pair sees the same machine state; its quartiles show the timing noise.
    """
    adapter(), direct()
    ta, td = [], []
    for rep in range(repeats):
        for fn, out in ((adapter, ta), (direct, td)) if rep % 2 else ((direct, td), (adapter, ta)):
            start = time.process_time()
            fn()
            out.append(time.process_time() - start)
    q1, q2, q3 = statistics.quantiles([a / d for a, d in zip(ta, td)], n=4)
    return statistics.median(ta), statistics.median(td), q2, q1, q3


def _direct_autograd(model, loss_fn, x, y):
    params = list(model.parameters())
    grads = torch.autograd.grad(loss_fn(model(x), y), params, create_graph=True)
    return lambda vs: torch.autograd.grad(grads, params, vs, retain_graph=True)


def _direct_backpack(model, loss_fn, x, y, curvature):
    from backpack.hessianfree.ggnvp import ggn_vector_product_from_plist
    from backpack.hessianfree.hvp import hessian_vector_product

    params = list(model.parameters())
    out = model(x)
    loss = loss_fn(out, y)
    if curvature == "ggn":
        return lambda vs: ggn_vector_product_from_plist(loss, out, params, vs)
    grads = torch.autograd.grad(loss, params, create_graph=True)
    return lambda vs: hessian_vector_product(loss, params, vs, grad_params=grads)


def _direct_pyhessian(model, loss_fn, x, y):
    from pyhessian import hessian
    from pyhessian.utils import hessian_vector_product

    h = hessian(model, loss_fn, data=(x, y), cuda=False)
    return lambda vs: hessian_vector_product(h.gradsH, h.params, vs)


def _pairs(model, loss_fn, x, y):
    """(label, estimator, direct product on per-parameter tensors)."""
    out = []
    for backend, curvature in [("autograd", "hessian"), ("backpack", "ggn"),
                               ("backpack", "hessian"), ("pyhessian", "hessian")]:
        est = curvlab.estimator(backend, model, loss_fn, (x, y), curvature=curvature)
        own = copy.deepcopy(model)  # the direct calls get their own copy and graph
        if backend == "autograd":
            direct = _direct_autograd(own, loss_fn, x, y)
        elif backend == "backpack":
            direct = _direct_backpack(own, loss_fn, x, y, curvature)
        else:
            direct = _direct_pyhessian(own, loss_fn, x, y)
        out.append((f"{backend} ({curvature})", est, direct))
    if importlib.util.find_spec("curvlab.adapters.kfac") and importlib.util.find_spec("curvlinops"):
        est = curvlab.estimator("kfac", model, loss_fn, (x, y), curvature="ggn")
        operator = est._computed().operator  # the curvlinops KFACLinearOperator itself

        def direct(vs, operator=operator):
            with torch.no_grad():
                return operator @ vs

        out.append(("kfac (ggn, curvlinops KFAC)", est, direct))
    return out


def _overhead_rows(model, loss_fn, x, y) -> list[list[object]]:
    rows = []
    for label, est, direct in _pairs(model, loss_fn, x, y):
        v = torch.randn(est.num_params, dtype=est.dtype, generator=torch.Generator().manual_seed(0))
        vs = v[:, None] if label.startswith("kfac") else unflatten(v, est.params)
        a, d, ratio, q1, q3 = _paired_cpu_times(
            lambda est=est, v=v: [est.matvec(v) for _ in range(CALLS)],
            lambda direct=direct, vs=vs: [direct(vs) for _ in range(CALLS)],
            REPEATS,
        )
        rows.append([label, a / CALLS * 1e3, d / CALLS * 1e3, ratio, f"{q1:.2f}-{q3:.2f}"])
    return rows


def _autograd_per_sample_ggn_diagonal(model, loss_fn, x, y) -> torch.Tensor:
    """Loop over samples: diag(J_n^T H_n J_n) with J_n from one backward per output."""
    params = list(model.parameters())
    rows = []
    for n in range(x.shape[0]):
        out = model(x[n : n + 1])
        jac = []
        for c in range(out.shape[1]):
            g = torch.autograd.grad(out[0, c], params, retain_graph=True)
            jac.append(torch.cat([t.reshape(-1) for t in g]))
        J = torch.stack(jac)
        H = torch.autograd.functional.hessian(lambda o, t=y[n : n + 1]: loss_fn(o, t), out.detach())
        H = H.reshape(out.shape[1], out.shape[1])
        rows.append(torch.einsum("cp,cd,dp->p", J, H, J))
    return torch.stack(rows)


def _per_sample_rows(model, loss_fn, x, y) -> tuple[list[list[object]], float]:
    est = curvlab.estimator("backpack", model, loss_fn, (x, y), curvature="ggn")
    t_bp, t_loop = [], []
    for _ in range(3):  # best of three against machine noise
        t_bp.append(cpu_time(lambda: est.per_sample_diagonal("ggn")))
        t_loop.append(cpu_time(lambda: _autograd_per_sample_ggn_diagonal(model, loss_fn, x, y)))
    fast = est.per_sample_diagonal("ggn")
    slow = _autograd_per_sample_ggn_diagonal(model, loss_fn, x, y)
    t_bp, t_loop = min(t_bp), min(t_loop)
    err = float((fast - slow).abs().max() / slow.abs().max())
    rows = [
        ["BackPACK BatchDiagGGNExact (adapter)", t_bp * 1e3, 1.0],
        ["autograd loop over samples", t_loop * 1e3, t_loop / t_bp],
    ]
    return rows, err


def run() -> str:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model, loss_fn = trained_mlp()
        x, y = digits(N)
        overhead = _overhead_rows(model, loss_fn, x, y)
        per_sample, err = _per_sample_rows(model, loss_fn, x[:PER_SAMPLE_N], y[:PER_SAMPLE_N])
    finally:
        torch.set_num_threads(threads)
    exact = [r for r in overhead if not r[0].startswith("kfac")]
    worst = max(exact, key=lambda r: r[3])
    kfac = [r for r in overhead if r[0].startswith("kfac")]
    speedup = per_sample[1][2]
    return "\n\n".join(
        [
            f"Per product (CPU ms, one thread), N = {N} digits, "
            f"P = {sum(p.numel() for p in model.parameters())}; medians of {REPEATS} paired "
            f"timings of {CALLS} products, ratio = median of the pairs' ratios:",
            table(["backend", "adapter ms", "direct ms", "ratio", "ratio quartiles"], overhead),
            f"Per-sample diagonal GGN of {PER_SAMPLE_N} samples (relative max difference "
            f"{err:.1e}):",
            table(["method", "CPU ms", "x BackPACK"], per_sample),
            f"The exact-product adapters cost at most {100 * (worst[3] - 1):+.1f}% over the direct "
            f"calls ({worst[0]}, ratio quartiles {worst[4]}; target 5%)"
            + (
                f", the kfac adapter {100 * (kfac[0][3] - 1):+.0f}% "
                f"({(kfac[0][1] - kfac[0][2]) * 1e3:.0f} us fixed cost on a product "
                f"{overhead[0][2] / kfac[0][2]:.0f}x cheaper than an exact one)"
                if kfac
                else ""
            )
            + f"; BackPACK's per-sample diagonal GGN is {speedup:.0f}x faster than an autograd "
            "loop over samples.",
        ]
    )
