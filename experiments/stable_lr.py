"""Section 8: the largest stable learning rate of SGD, Adam and KFAC.

Section 8 reads the largest learning rate that trains stably as a measure of how well a
preconditioner captures the sharpest directions (alpha < 2 / ||B^-1/2 H B^-1/2||). For every
seed (initialisation, split and batch order) we search a logarithmic grid with
``curvlab.optim.largest_stable_lr`` for SGD, Adam and KFAC at two dampings, all with momentum
0.9 as in the paper (KFAC refreshes its factors every step here: a stale curvature estimate
would lower its stable rate for reasons the claim is not about). Stable: every loss along
the way finite, the final training loss below the initial one, and no collapse to a
constant classifier (a network whose ReLUs died sits at chance accuracy with a loss a hair
below ln 10; counting it as stable once inflated Adam's rate 3.2x). Next to each raw rate
alpha we report the paper's preconditioned sharpness alpha * lambda_1(B^-1/2 H B^-1/2) at
the end of the run at that rate (``curvlab.optim.stable_lr.preconditioned_sharpness``): to
second order a step is stable below 2 (2 (1 + m) = 3.8 with heavy-ball momentum m = 0.9).
"""

from __future__ import annotations

import math
import sys
import warnings

import torch
from torch import nn

from curvlab.errors import CurvlabWarning
from curvlab.optim import KFAC, largest_stable_lr

from . import _common as C
from . import stats
from .workloads import describe_workload, image_workload

NAME = "stable_lr"
TITLE = "Section 8: largest stable learning rate of SGD, Adam and KFAC"
CLAIM = (
    "Section 8: the largest stable learning rates order SGD < Adam < KFAC (0.01, 0.12, 0.32 "
    "for VGG-16 on CIFAR-100): adaptive methods, KFAC most, estimate the sharp directions "
    "better than curvature-blind SGD; and (eq. 19) a larger damping allows a larger rate."
)
PAPER_SETTING = (
    "VGG-16 on CIFAR-100, no weight decay, 300 epochs with linear annealing, momentum 0.9, "
    "logarithmic grid in (0.01, 1); `--scale paper` here: VGG-16 (no batch norm) on "
    "CIFAR-100 from local files, batch 128, 5 epochs per rate, 13 rates from 1e-3 to 1"
)
FIELDS = (*C.COMMON_FIELDS, "per_seed", "summary")

MOMENTUM = 0.9
SETTINGS = {
    "smoke": {
        "seeds": 3,
        "n_steps": 8,
        "lrs": (1e-2, 1.0),
        "kfac_dampings": (1e-2, 1e-1),
        "batches": 4,
    },
    "fast": {
        "seeds": 3,
        "n_steps": 60,
        "lrs": tuple(10 ** (k / 2) for k in range(-6, 1)),
        "kfac_dampings": (1e-2, 1e-1),
        "batches": None,
    },
    "paper": {
        "seeds": 3,
        "n_steps": 1950,
        "lrs": tuple(10 ** (k / 4) for k in range(-12, 1)),
        "kfac_dampings": (1e-3, 1e-2, 1e-1),
        "batches": None,
    },
}


def _factories(s: dict, loss_fn) -> dict:
    factories = {
        "sgd": lambda m, lr: torch.optim.SGD(m.parameters(), lr=lr, momentum=MOMENTUM),
        "adam": lambda m, lr: torch.optim.Adam(m.parameters(), lr=lr, betas=(MOMENTUM, 0.999)),
    }
    for delta in s["kfac_dampings"]:
        factories[f"kfac(d={delta:g})"] = lambda m, lr, delta=delta: KFAC(
            m, loss_fn, lr=lr, damping=delta, momentum=MOMENTUM
        )
    return factories


def _search(work, seed: int, s: dict) -> dict:
    data, b = work.data, work.batch_size
    loss_fn = nn.CrossEntropyLoss()
    order = torch.randperm(data.n_train, generator=torch.Generator().manual_seed(seed))
    order = order.to(data.x_train.device)
    batches = [
        (data.x_train[order[i : i + b]], data.y_train[order[i : i + b]])
        for i in range(0, data.n_train - b + 1, b)
    ][: s["batches"]]
    out = {}
    for name, factory in _factories(s, loss_fn).items():
        with warnings.catch_warnings():  # diverging runs are the point of the search
            warnings.simplefilter("ignore", CurvlabWarning)
            res = largest_stable_lr(
                factory,
                work.model_factory,
                loss_fn,
                batches,
                lrs=s["lrs"],
                n_steps=s["n_steps"],
                seed=seed,
                sharpness=True,
            )
        out[name] = {
            "lr": res.lr,
            "sharpness": res.sharpness,
            "lr_times_sharpness": res.lr_times_sharpness,
            "lrs": res.lrs,
            "final_losses": res.final_losses,
            "stable": res.stable,
            "collapsed": res.collapsed,
            "final_accuracies": res.final_accuracies,
            "initial_loss": res.initial_loss,
        }
    return out


def _log_ratio(a: float | None, b: float | None) -> float:
    return math.log10(a / b) if a and b else math.nan


def run(
    out_dir, *, scale: str = "fast", seed: int = 0, device: str = "cpu", progress: bool = False
) -> dict:
    """Run the experiment (module docstring); returns the JSON content (keys: FIELDS)."""
    dev, rec, s, seeds = C.begin(sys.modules[__name__], out_dir, scale, seed, device)
    per_seed = C.per_seed(
        lambda sd: _search(image_workload(scale, sd, dev), sd, s), seeds, progress, NAME
    )
    names = list(per_seed[0])
    kfac_names = [f"kfac(d={d:g})" for d in s["kfac_dampings"]]
    best_kfac = [max((r[k]["lr"] or 0.0) for k in kfac_names) or None for r in per_seed]

    def lrs(name):
        return ", ".join(f"{r[name]['lr'] or 0:.3g}" for r in per_seed)

    checks = [
        C.claim_check(
            "Adam's largest stable learning rate exceeds SGD's",
            "log10(largest stable lr of Adam / SGD's)",
            [_log_ratio(r["adam"]["lr"], r["sgd"]["lr"]) for r in per_seed],
            direction=+1,
            evidence=f"largest stable lr per seed: SGD {lrs('sgd')}; Adam {lrs('adam')}",
            caveat=f"the grid is {len(s['lrs'])} rates half a decade apart, so a ratio is "
            "known to a factor 3.2",
        ),
        C.claim_check(
            "KFAC's largest stable learning rate (at its best damping tried) exceeds Adam's",
            "log10(largest stable lr of KFAC at its best damping / Adam's)",
            [_log_ratio(k, r["adam"]["lr"]) for k, r in zip(best_kfac, per_seed)],
            direction=+1,
            evidence="; ".join(f"{k}: {lrs(k)}" for k in kfac_names),
            caveat="more dampings could raise KFAC's best rate",
        ),
        C.claim_check(
            "eq. 19: a larger KFAC damping allows a larger stable learning rate",
            f"log10(largest stable lr of {kfac_names[-1]} / {kfac_names[0]})",
            [_log_ratio(r[kfac_names[-1]]["lr"], r[kfac_names[0]]["lr"]) for r in per_seed],
            direction=+1,
            evidence="; ".join(f"{k}: {lrs(k)}" for k in kfac_names),
        ),
    ]
    summary = {}
    for name in names:
        m_lr = stats.mean_se(
            [math.log10(r[name]["lr"]) if r[name]["lr"] else math.nan for r in per_seed]
        )
        m_s = stats.mean_se([r[name]["lr_times_sharpness"] or math.nan for r in per_seed])
        summary[name] = {
            "log10_lr_mean": m_lr[0],
            "log10_lr_stderr": m_lr[1],
            "lr_times_sharpness_mean": m_s[0],
            "lr_times_sharpness_stderr": m_s[1],
            "n_collapsed": sum(sum(r[name]["collapsed"]) for r in per_seed),
        }
    rec.csv(
        [
            {"seed": sd, "optimizer": k, "lr": lr, "final_loss": fl, "stable": st, "collapsed": co}
            for sd, r in zip(seeds, per_seed)
            for k, v in r.items()
            for lr, fl, st, co in zip(v["lrs"], v["final_losses"], v["stable"], v["collapsed"])
        ]
    )
    _figure(rec, per_seed, seeds, s)
    rows = [
        {
            "optimizer": k,
            "largest stable lr (per seed)": lrs(k),
            "geometric mean": 10 ** v["log10_lr_mean"]
            if math.isfinite(v["log10_lr_mean"])
            else None,
            "lr x lambda_1(B^-1/2 H B^-1/2)": _pm(
                v["lr_times_sharpness_mean"], v["lr_times_sharpness_stderr"]
            ),
            "collapsed runs": v["n_collapsed"],
        }
        for k, v in summary.items()
    ]
    body = C.markdown_table(rows, list(rows[0])) + (
        f"\nA rate is stable if after {s['n_steps']} steps the training loss is finite, below "
        "the initial one, and the classifier has not collapsed to a constant output. "
        "lr x lambda_1 is the preconditioned sharpness at the end of the run at the largest "
        "stable rate (mean ± SE over seeds); second-order stability needs it below 2 "
        f"(below 2(1 + {MOMENTUM}) = {2 * (1 + MOMENTUM):.1f} with heavy-ball momentum)."
    )
    setting = dict(
        s,
        momentum=MOMENTUM,
        adam_eps=1e-8,
        kfac="factors and inverses refreshed every step",
        model=describe_workload(scale),
    )
    return rec.finish(setting, checks, {"per_seed": per_seed, "summary": summary}, body)


def _pm(mean: float, se: float) -> str:
    if not math.isfinite(mean):
        return "—"
    return f"{mean:.3g} ± {se:.2g}" if math.isfinite(se) else f"{mean:.3g}"


def _figure(rec: C.Recorder, per_seed: list[dict], seeds: list[int], s: dict) -> None:
    fig, axes = C.new_figure()
    ax = axes[0, 0]
    for i, name in enumerate(per_seed[0]):
        for j, r in enumerate(per_seed):
            v = r[name]
            ax.plot(
                v["lrs"],
                [
                    fl if fl is not None and math.isfinite(fl) else math.nan
                    for fl in v["final_losses"]
                ],
                "-o",
                ms=3,
                color=f"C{i}",
                alpha=0.8,
                label=name if j == 0 else None,
            )
            ax.plot(
                [lr for lr, c in zip(v["lrs"], v["collapsed"]) if c],
                [fl for fl, c in zip(v["final_losses"], v["collapsed"]) if c],
                "kx",
                ms=8,
            )
    ax.axhline(math.log(10), color="k", ls=":", label="ln 10 (chance); x: collapsed")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel(f"training loss after {s['n_steps']} steps")
    ax.set_title(f"seeds {seeds}")
    ax.legend(fontsize=7)
    rec.figure(fig)
