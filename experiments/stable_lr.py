"""Section 8: the largest stable learning rate of SGD, Adam and KFAC.

Section 8 reads the largest learning rate that trains stably as a measure of how well a
preconditioner captures the sharpest directions (alpha < 2 / ||B^-1/2 H B^-1/2||). We search
a logarithmic grid with ``curvlab.optim.largest_stable_lr`` (stable: every loss along the way
finite and the final training loss below the initial one, after a fixed number of steps from
the same initialization over the same mini-batches) for SGD, Adam and KFAC, all with
momentum 0.9 as in the paper, on the digits CNN. For reference, the heavy-ball stability
bound of SGD on the initial quadratic model is 2 (1 + 0.9) / lambda_1.
"""

from __future__ import annotations

import itertools
import math
import sys
import warnings

import torch
from torch import nn

from curvlab.errors import CurvlabWarning
from curvlab.optim import largest_stable_lr
from curvlab.optim.kfac import KFAC

from . import _common as C
from .data import load_sklearn

NAME = "stable_lr"
TITLE = "Section 8: largest stable learning rate of SGD, Adam and KFAC"
CLAIM = (
    "Section 8: the largest stable learning rates order SGD < Adam < KFAC (0.01, 0.12, 0.32 "
    "for VGG-16 on CIFAR-100): adaptive methods, KFAC most, estimate the sharp directions "
    "better than curvature-blind SGD."
)
PAPER_SETTING = (
    "VGG-16 on CIFAR-100, no weight decay, 300 epochs with linear annealing, momentum 0.9, "
    "logarithmic grid in (0.01, 1); `--scale paper` here: the digits CNN, 600 steps, a grid "
    "of 17 rates from 1e-3 to 10"
)
FIELDS = (*C.COMMON_FIELDS, "lambda_1_init", "sgd_bound", "results", "order")

MOMENTUM = 0.9
SETTINGS = {
    "smoke": {
        "n_steps": 15,
        "lrs": (1e-3, 1e-2, 1e-1, 1.0, 10.0),
        "batch_size": 128,
        "kfac_dampings": (1e-2, 1e-1),
    },
    "fast": {
        "n_steps": 60,
        "lrs": tuple(10 ** (k / 2) for k in range(-6, 3)),
        "batch_size": 64,
        "kfac_dampings": (1e-2, 1e-1),
    },
    "paper": {
        "n_steps": 600,
        "lrs": tuple(10 ** (k / 4) for k in range(-12, 5)),
        "batch_size": 64,
        "kfac_dampings": (1e-3, 1e-2, 1e-1, 1.0),
    },
}


class _BatchKFAC:
    """``step(closure)`` for curvlab's KFAC, which steps on a batch: the t-th call uses
    ``batches[t % len(batches)]``, the order ``largest_stable_lr`` documents and follows."""

    def __init__(self, kfac: KFAC, batches: list):
        self.kfac, self.batches, self.t = kfac, batches, 0

    def zero_grad(self, set_to_none: bool = True) -> None:
        """KFAC never reads ``.grad``."""

    def step(self, closure=None) -> torch.Tensor:
        batch = self.batches[self.t % len(self.batches)]
        self.t += 1
        return self.kfac.step(batch)


def run(
    out_dir, *, scale: str = "fast", seed: int = 0, device: str = "cpu", progress: bool = False
) -> dict:
    """Run the experiment (module docstring); returns the JSON content (keys: FIELDS)."""
    dev, rec, s = C.begin(sys.modules[__name__], out_dir, scale, seed, device)
    data = load_sklearn("digits", image=True, dtype=torch.float32, device=dev, seed=seed)
    loss_fn = nn.CrossEntropyLoss()
    order = torch.randperm(data.n_train, generator=torch.Generator().manual_seed(seed)).to(dev)
    b = s["batch_size"]
    batches = [
        (data.x_train[order[i : i + b]], data.y_train[order[i : i + b]])
        for i in range(0, data.n_train - b + 1, b)
    ]

    def model_factory() -> nn.Module:
        return C.DigitsCNN().to(dev)

    init_model = C.seeded(seed, model_factory)
    lam1 = C.spectral_norm(init_model, loss_fn, *data.train(), seed=seed)
    factories = {
        "sgd": lambda m, lr: torch.optim.SGD(m.parameters(), lr=lr, momentum=MOMENTUM),
        "adam": lambda m, lr: torch.optim.Adam(m.parameters(), lr=lr, betas=(MOMENTUM, 0.999)),
    }
    for delta in s["kfac_dampings"]:
        factories[f"kfac(d={delta:g})"] = lambda m, lr, delta=delta: _BatchKFAC(
            KFAC(m, loss_fn, lr=lr, damping=delta, momentum=MOMENTUM), batches
        )
    results = {}
    for name in C.progress_bar(list(factories), progress, "stable_lr: optimizers"):
        with warnings.catch_warnings():  # diverging runs are the point of the search
            warnings.simplefilter("ignore", CurvlabWarning)
            res = largest_stable_lr(
                factories[name],
                model_factory,
                loss_fn,
                batches,
                lrs=s["lrs"],
                n_steps=s["n_steps"],
                seed=seed,
            )
        results[name] = {
            "lr": res.lr,
            "lrs": res.lrs,
            "final_losses": res.final_losses,
            "stable": res.stable,
            "initial_loss": res.initial_loss,
        }
    best = {k: (v["lr"] if v["lr"] is not None else 0.0) for k, v in results.items()}
    kfac_names = [f"kfac(d={d:g})" for d in s["kfac_dampings"]]
    best_kfac = max(kfac_names, key=lambda k: best[k])
    kfac_lrs = [best[k] for k in kfac_names]
    checks = [
        C.Check(
            "Adam's largest stable learning rate exceeds SGD's",
            best["adam"] > best["sgd"] if best["sgd"] or best["adam"] else None,
            f"SGD {best['sgd']:.3g}, Adam {best['adam']:.3g}",
        ),
        C.Check(
            "KFAC's largest stable learning rate (at its best damping tried) exceeds Adam's",
            best[best_kfac] > best["adam"] if best["adam"] or best[best_kfac] else None,
            f"Adam {best['adam']:.3g}, " + ", ".join(f"{k} {best[k]:.3g}" for k in kfac_names),
        ),
        C.Check(
            "eq. 19: a larger KFAC damping allows a larger (or equal) stable learning rate",
            all(a <= b for a, b in itertools.pairwise(kfac_lrs)),
            ", ".join(f"{k}: {best[k]:.3g}" for k in kfac_names),
        ),
    ]
    sgd_bound = 2 * (1 + MOMENTUM) / lam1
    rec.csv(
        [
            {"optimizer": k, "lr": lr, "final_loss": fl, "stable": st}
            for k, v in results.items()
            for lr, fl, st in zip(v["lrs"], v["final_losses"], v["stable"])
        ]
    )
    fig, axes = C.new_figure()
    ax = axes[0, 0]
    for i, (k, v) in enumerate(results.items()):
        ax.plot(
            v["lrs"],
            [fl if math.isfinite(fl) else math.nan for fl in v["final_losses"]],
            "-o",
            color=f"C{i}",
            label=f"{k} (largest stable {best[k]:.3g})",
        )
    ax.axhline(
        next(iter(results.values()))["initial_loss"], color="k", ls=":", label="initial loss"
    )
    ax.axvline(sgd_bound, color="C0", ls="--", lw=1, label="SGD bound 2(1+m)/lambda_1")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel(f"training loss after {s['n_steps']} steps")
    ax.legend(fontsize=7)
    rec.figure(fig)
    body = C.markdown_table(
        [{"optimizer": k, "largest stable lr": best[k]} for k in results],
        ["optimizer", "largest stable lr"],
    ) + (
        f"\nInitial lambda_1 = {lam1:.4g}: heavy-ball bound for SGD 2(1 + {MOMENTUM})/lambda_1 = "
        f"{sgd_bound:.3g}. Grid: {len(s['lrs'])} rates from {min(s['lrs']):g} to "
        f"{max(s['lrs']):g}; a rate is stable if the final training loss after "
        f"{s['n_steps']} steps is finite and below the initial one."
    )
    setting = dict(s, momentum=MOMENTUM, adam_eps=1e-8)
    return rec.finish(
        setting,
        checks,
        {
            "lambda_1_init": lam1,
            "sgd_bound": sgd_bound,
            "results": results,
            "order": sorted(best, key=best.get),
        },
        body,
    )
