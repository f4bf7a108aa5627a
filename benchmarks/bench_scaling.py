"""Scaling: Hessian-vector product cost against one gradient, and graph memory against the
number of batches, cached and streamed (``curvlab.estimator(..., cache=...)``).

- Product cost: one Hessian-vector product over a batch of 64 as a multiple of one gradient
  (forward + backward) on the same batch, for models from P ~ 1e3 to P ~ 1e7 (MLPs on
  8x8 inputs, a small CNN and torchvision's resnet18 on 32x32 inputs). "cached" reuses the
  batch's double-backward graph (the product is one more backward), "streamed" rebuilds it
  at every product (forward, backward with graph, then the product).
- Memory: the peak and held resident memory during two products over 4 to 64 batches of a
  90k-parameter CNN, in a fresh process each, with the time per product.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import torch
import torchvision
from torch import nn

import curvlab

from ._common import table

TITLE = "Scaling: product cost and graph memory, cached and streamed"
BATCH = 64


def _mlp(width: int) -> nn.Module:
    return nn.Sequential(nn.Linear(64, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh(),
                         nn.Linear(width, 10))


def _cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(64 * 8 * 8, 10),
    )


def _models():
    gen = torch.Generator().manual_seed(0)
    flat = torch.randn(BATCH, 64, generator=gen)
    images = torch.randn(BATCH, 3, 32, 32, generator=gen)
    y = torch.randint(0, 10, (BATCH,), generator=gen)
    torch.manual_seed(0)
    yield "MLP 64-16-16-10", _mlp(16), flat, y
    yield "MLP 64-128-128-10", _mlp(128), flat, y
    yield "MLP 64-512-512-10", _mlp(512), flat, y
    yield "MLP 64-2048-2048-10", _mlp(2048), flat, y
    yield "CNN 2 conv + linear", _cnn(), images, y
    yield "resnet18 (eval)", torchvision.models.resnet18(num_classes=10).eval(), images, y


def _seconds(fn, repeats: int = 3) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def _product_rows() -> list[list[object]]:
    rows = []
    loss_fn = nn.CrossEntropyLoss()
    for name, model, x, y in _models():
        params = [p for p in model.parameters() if p.requires_grad]

        def gradient(model=model, x=x, y=y, params=params):
            torch.autograd.grad(loss_fn(model(x), y), params)

        t_grad = _seconds(gradient)
        cost = {}
        for cache in (True, False):
            est = curvlab.estimator("autograd", model, loss_fn, (x, y), cache=cache)
            v = torch.randn(est.num_params)
            cost[cache] = _seconds(lambda est=est, v=v: est.matvec(v)) / t_grad
        rows.append([name, est.num_params, f"{t_grad * 1e3:.1f}", cost[True], cost[False]])
    return rows


_CHILD = """
import json, os, sys, threading, time, torch
from torch import nn
import curvlab
torch.set_num_threads(1)
n_batches, cache = int(sys.argv[1]), sys.argv[2] == "True"
page = os.sysconf("SC_PAGE_SIZE")

def resident():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * page

peak, sampling = [0], [True]

def sample():
    while sampling[0]:
        peak[0] = max(peak[0], resident())
        time.sleep(0.0005)

torch.manual_seed(0)
model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.Tanh(), nn.MaxPool2d(2),
                      nn.Flatten(), nn.Linear(16 * 16 * 16, 22))
gen = torch.Generator().manual_seed(1)
data = [(torch.randn(64, 3, 32, 32, generator=gen), torch.randint(0, 22, (64,), generator=gen))
        for _ in range(n_batches)]
est = curvlab.estimator("autograd", model, nn.CrossEntropyLoss(), data, cache=cache)
v = torch.randn(est.num_params)
before = resident()
thread = threading.Thread(target=sample, daemon=True)
thread.start()
est.matvec(v)
start = time.perf_counter()
est.matvec(v)
took = time.perf_counter() - start
held = resident() - before
sampling[0] = False
thread.join()
print(json.dumps({"peak_mib": (peak[0] - before) / 2**20, "held_mib": held / 2**20,
                  "ms": took / n_batches * 1e3, "params": est.num_params}))
"""

def _child(n_batches: int, cache: bool) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", _CHILD, str(n_batches), str(cache)],
        capture_output=True, text=True, check=True,
        # large tensors are mapped and unmapped, so resident memory follows what is alive
        env={**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"},
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def _memory_rows() -> tuple[list[list[object]], int]:
    rows, params = [], 0
    for n_batches in (4, 16, 64):
        row: list[object] = [n_batches]
        for cache in (True, False):
            res = _child(n_batches, cache)
            row += [round(res["peak_mib"]), round(res["held_mib"]), res["ms"]]
            params = res["params"]
        rows.append(row)
    return rows, params


def _memory_summary(memory: list[list[object]]) -> str:
    (n_lo, *lo), (n_hi, *hi) = memory[0], memory[-1]
    span = n_hi - n_lo

    def slope(i: int) -> float:
        return (hi[i] - lo[i]) / span

    return (
        f"From {n_lo} to {n_hi} batches the cached graphs add {slope(1):.1f} MiB per batch "
        f"(peak {lo[0]} to {hi[0]} MiB); streamed, the peak changes by {slope(3):+.2f} MiB "
        f"per batch ({lo[3]} to {hi[3]} MiB) at {hi[5] / hi[2]:.2f}x the cached time per "
        "batch."
    )


def run() -> str:
    torch.set_num_threads(1)
    products = _product_rows()
    memory, n_params = _memory_rows()
    return "\n\n".join(
        [
            "Hessian-vector product over one batch of 64, as a multiple of one gradient "
            "(forward + backward) on the same batch; best of 3, one thread, float32, CPU.",
            table(
                ["model", "P", "gradient ms", "product / gradient, cached",
                 "product / gradient, streamed"],
                products,
            ),
            f"Memory over batches of 64 (CNN, P = {n_params}), a fresh process per row (data, "
            "model and imports come before): the peak of the resident memory during two "
            "products above what it was before them (sampled every 0.5 ms), what is still "
            "held after them (the cached graphs), and the second product's time per batch. "
            "Large tensors are mapped and unmapped (MALLOC_MMAP_THRESHOLD_=65536), so resident "
            "memory follows what is alive.",
            table(
                ["batches", "cached peak MiB", "cached held MiB", "cached ms/batch",
                 "streamed peak MiB", "streamed held MiB", "streamed ms/batch"],
                memory,
            ),
            _memory_summary(memory),
            "GPU: not measured (no device was lent to this task); every path runs on CUDA "
            "when the tensors are there (tests marked CUDA skip without one).",
        ]
    )
