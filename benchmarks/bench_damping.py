"""Cost and precision of the learned damping on a digits MLP (paper section 7.1).

One damping update (estimator + noise variance) against one Adam training step: the
defaults (the current training batch of 128 in a fresh random order, 16 groups of 8, 2
probes vectorised with vmap), per-sample products, a subsample of 1024 from the training
set (groups of 8, per sample, and groups of 128 as the paper did), and per-sample products
looped over samples instead of vmapped; then whole training runs (50 epochs, 750 steps,
update_every=100) with and without the damper. Times are this process's CPU time on one
thread (the machine is shared). Precision: at a fixed model, the raw estimates' mean and
spread over 20 re-estimates (fresh batches or subsamples and probes) against a reference
(all 1797 samples, 32 probes); the smoothed damping's spread is the raw one times
sqrt((1 - ema) / (1 + ema)), the stationary spread of the moving average.
"""

from __future__ import annotations

import copy
import math
import statistics

import torch
from torch import nn

import curvlab
from curvlab.damping import LinearShrinkageDamper
from curvlab.noise import noise_variance

from ._common import cpu_time, digits

TITLE = "Learned damping: update cost, epoch overhead and precision (digits MLP)"
BATCH, EPOCHS, UPDATE_EVERY, REPEATS = 128, 50, 100, 20


def _problem():
    x, y = digits(dtype=torch.float32)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 10))
    return model, nn.CrossEntropyLoss(), x, y


def _train(model, opt, loss_fn, x, y, steps, gen, damper=None, data=None):
    for _ in range(steps):
        idx = torch.randint(0, x.shape[0], (BATCH,), generator=gen)
        xb, yb = x[idx], y[idx]
        opt.zero_grad()
        loss_fn(model(xb), yb).backward()
        opt.step()
        if damper is not None:
            damper.step(model, loss_fn, (xb, yb) if data is None else data)


PER_SAMPLE = {"group_size": 1}
SUB = {"subsample": 1024, "fresh_subsample": True}
LOOP = {"backend_options": {"vectorize": False}}
SETTINGS = {
    "defaults: training batch, groups of 8": ({}, "batch"),
    "training batch, per sample": (PER_SAMPLE, "batch"),
    "subsample 1024, groups of 8": (SUB, "train"),
    "subsample 1024, per sample": ({**SUB, **PER_SAMPLE}, "train"),
    "subsample 1024, groups of 128 (paper)": ({**SUB, "group_size": 128}, "train"),
    "training batch, per sample, loop": ({**PER_SAMPLE, **LOOP}, "batch"),
    "subsample 1024, per sample, loop": ({**SUB, **PER_SAMPLE, **LOOP}, "train"),
}


def run() -> str:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _run()
    finally:
        torch.set_num_threads(threads)


def _run() -> str:
    model, loss_fn, x, y = _problem()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(0)
    _train(model, opt, loss_fn, x, y, 300, gen)  # leave the random initialisation
    start_model, start_opt = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    step_time = cpu_time(lambda: _train(model, opt, loss_fn, x, y, 300, gen)) / 300
    model.load_state_dict(start_model)
    opt.load_state_dict(start_opt)

    full = curvlab.estimator("autograd", model, loss_fn, (x, y))
    reference = noise_variance(full, batch_size=BATCH, n_probes=32, population=math.inf).value
    n_probes = LinearShrinkageDamper().n_probes
    shrink = math.sqrt((1 - 0.7) / (1 + 0.7))

    rows, spreads = [], {}
    for row, (name, (kwargs, source)) in enumerate(SETTINGS.items()):
        damper = LinearShrinkageDamper(update_every=1, seed=row, **kwargs)
        loop = "vectorize" in kwargs.get("backend_options", {})
        reps = 2 if loop else REPEATS
        raws, times = [], []
        for _ in range(reps):
            idx = torch.randint(0, x.shape[0], (BATCH,), generator=gen)
            data = (x[idx], y[idx]) if source == "batch" else (x, y)
            times.append(cpu_time(lambda d=data, dm=damper: dm.step(model, loss_fn, d)))
            raws.append(damper.history[-1].estimate)
        cost = statistics.median(times[1:] if len(times) > 2 else times)
        samples = BATCH if source == "batch" else kwargs["subsample"]
        groups = samples // damper.group_size
        if loop:
            quality = "| (same numbers as vmap) | |"
        else:
            spread = spreads[name] = statistics.stdev(raws) / reference
            quality = (
                f"| {statistics.mean(raws) / reference:.2f} | {spread:.2f} | {spread * shrink:.2f}"
            )
        rows.append(
            f"| {name} | {samples} / {groups} / {n_probes} | {cost * 1e3:.1f} | "
            f"{cost / step_time:.1f} {quality} |"
        )

    fixed = {"subsample": 1024}
    runs = {
        "flat eps (no damper)": None,
        "damper at the defaults (training batch, groups of 8)": ({}, None),
        "training batch, per sample": (PER_SAMPLE, None),
        "fixed subsample 1024, groups of 8": (fixed, (x, y)),
        "fixed subsample 1024, groups of 128 (paper)": ({**fixed, "group_size": 128}, (x, y)),
        "fixed subsample 1024, per sample": ({**fixed, **PER_SAMPLE}, (x, y)),
    }
    epoch_times: dict[str, list[float]] = {name: [] for name in runs}
    steps = EPOCHS * math.ceil(x.shape[0] / BATCH)
    for repeat in range(5):
        for name, spec in runs.items():
            model.load_state_dict(start_model)
            opt.load_state_dict(start_opt)
            run_gen = torch.Generator().manual_seed(repeat)
            damper, data = None, None
            if spec is not None:
                damper = LinearShrinkageDamper(update_every=UPDATE_EVERY, **spec[0])
                damper.attach(opt, key="eps")
                data = spec[1]
            t = cpu_time(
                lambda d=damper, s=data, g=run_gen: _train(
                    model, opt, loss_fn, x, y, steps, g, damper=d, data=s
                )
            )
            epoch_times[name].append(t / EPOCHS)
    flat = statistics.median(epoch_times["flat eps (no damper)"])
    run_rows = [
        f"| {name} | {statistics.median(ts) * 1e3:.1f} | {statistics.median(ts) / flat:.3f} |"
        for name, ts in epoch_times.items()
    ]
    defaults_ratio = statistics.median(epoch_times[list(runs)[1]]) / flat
    return "\n".join(
        [
            f"MLP 64-64-10 (P = {full.num_params}), Adam, batch {BATCH}; one training step "
            f"= {step_time * 1e3:.2f} ms CPU (one thread). Reference noise variance of a "
            f"batch of {BATCH} (all 1797 samples, 32 probes, i.i.d. batches): "
            f"{reference:.3g}. Raw mean and sd over {REPEATS} re-estimates at that model "
            f"(fresh batches or subsamples, fresh probes); the mean's standard error is about "
            f"sd / {math.sqrt(REPEATS):.1f}.",
            "",
            "| one update | samples / groups / probes | CPU ms | x training step "
            "| raw mean / reference | raw rel. sd | smoothed rel. sd (EMA 0.7) |",
            "|---|---|---|---|---|---|---|",
            *rows,
            "",
            f"Whole runs: {EPOCHS} epochs ({steps} steps), update_every={UPDATE_EVERY}, "
            "damper attached to Adam's eps; median of 5.",
            "",
            "| run | CPU ms per epoch | x flat |",
            "|---|---|---|",
            *run_rows,
            "",
            f"At the defaults the learned damping costs {defaults_ratio:.2f}x the flat epoch "
            f"time (target < 1.15x; the paper's learner took 2x), with the smoothed estimate "
            f"within about {100 * shrink * next(iter(spreads.values())):.0f}% (one sd) of "
            "the reference.",
        ]
    )
