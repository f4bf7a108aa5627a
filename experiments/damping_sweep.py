"""Section 6: Adam and KFAC across learning rate and damping on a small CNN (Table 1 analogue).

A small CNN (two 3x3 convolutions, about 1.9k parameters, float32) on scikit-learn's 8x8
digits, trained with mini-batches of 64 under the paper's eq. 12 schedule, for a grid of
learning rates alpha and dampings delta: Adam's eps, and KFAC's exact damping
(curvlab.optim.KFAC). At the end of training we measure the spectral norm lambda_1 of the
training-set Hessian (Lanczos through the autograd backend, on a fixed subsample) and the
validation accuracy, and the estimated curvature learning-rate ratio
R_est-curv = 1 + (lambda_1 - lambda_P) / delta of section 6.1 with lambda_P taken as 0 (the
paper's assumption lambda_P << delta for a positive (semi-)definite preconditioner).
"""

from __future__ import annotations

import math
import sys

import torch
from torch import nn

from curvlab.optim import paper_schedule
from curvlab.optim.kfac import KFAC

from . import _common as C
from .data import load_sklearn

NAME = "damping_sweep"
TITLE = "Section 6: damping, spectral norm and generalisation for Adam and KFAC (Table 1)"
CLAIM = (
    "Section 6 / Table 1: increasing the damping delta always decreases the spectral norm "
    "lambda_1 of the solution; and a larger estimated curvature learning-rate ratio "
    "R_est-curv = 1 + lambda_1 / delta goes with worse generalisation."
)
PAPER_SETTING = (
    "VGG-16 (no batch norm, no weight decay) on CIFAR-100, batch 128, eq. 12 schedule; Adam "
    "alpha in {4e-4, 1e-3}, delta from 1e-7 to 8e-3; KFAC alpha in {0.1, 1e-3, 1e-4}, delta "
    "from 1e-4 to 0.1; `--scale paper` here: the digits CNN for 2000 steps on 3 x 5 grids"
)
FIELDS = (*C.COMMON_FIELDS, "runs", "table", "summary")

SETTINGS = {
    "smoke": {
        "steps": 20,
        "hessian_samples": 128,
        "adam": {"lrs": (3e-3,), "deltas": (1e-8, 1e-3, 1e-2)},
        "kfac": {"lrs": (0.03,), "deltas": (1e-2, 1e-1, 1.0)},
    },
    "fast": {
        "steps": 120,
        "hessian_samples": 256,
        "adam": {"lrs": (3e-3, 1e-2), "deltas": (1e-8, 1e-3, 1e-2)},
        "kfac": {"lrs": (0.01, 0.03), "deltas": (1e-3, 1e-2, 1e-1)},
    },
    "paper": {
        "steps": 2000,
        "hessian_samples": 1347,
        "adam": {"lrs": (1e-3, 3e-3, 1e-2), "deltas": (1e-8, 1e-4, 1e-3, 1e-2, 3e-2)},
        "kfac": {"lrs": (3e-3, 0.01, 0.03), "deltas": (1e-4, 1e-3, 1e-2, 1e-1, 1.0)},
    },
}


def make_optimizer(name: str, model: nn.Module, lr: float, delta: float):
    if name == "adam":
        return torch.optim.Adam(model.parameters(), lr=lr, eps=delta)
    return KFAC(model, nn.CrossEntropyLoss(), lr=lr, damping=delta)


def run(
    out_dir, *, scale: str = "fast", seed: int = 0, device: str = "cpu", progress: bool = False
) -> dict:
    """Run the experiment (module docstring); returns the JSON content (keys: FIELDS)."""
    dev, rec, s = C.begin(sys.modules[__name__], out_dir, scale, seed, device)
    data = load_sklearn("digits", image=True, dtype=torch.float32, device=dev, seed=seed)
    loss_fn = nn.CrossEntropyLoss()
    xh, yh = data.x_train[: s["hessian_samples"]], data.y_train[: s["hessian_samples"]]
    grid = [
        (opt, lr, d) for opt in ("adam", "kfac") for lr in s[opt]["lrs"] for d in s[opt]["deltas"]
    ]
    runs = []
    for name, lr, delta in C.progress_bar(grid, progress, "damping_sweep: grid"):
        model = C.seeded(seed, lambda: C.DigitsCNN().to(dev))
        opt = make_optimizer(name, model, lr, delta)
        hist = C.train(
            model,
            loss_fn,
            opt,
            data,
            steps=s["steps"],
            batch_size=64,
            seed=seed,
            scheduler=paper_schedule(opt, s["steps"]),
        )
        model.eval()
        lam = math.nan if hist["diverged"] else C.spectral_norm(model, loss_fn, xh, yh, seed)
        runs.append(
            {
                "optimizer": name,
                "lr": lr,
                "delta": delta,
                "lambda_1": lam,
                "r_est_curv": 1 + lam / delta if math.isfinite(lam) else math.nan,
                "train_loss": C.final(hist, "train_loss"),
                "train_acc": C.final(hist, "train_acc"),
                "val_acc": C.final(hist, "val_acc"),
                "diverged": hist["diverged"],
            }
        )
    checks, summary = _checks(runs)
    table = {
        name: {
            f"{lr:g}": {
                f"{r['delta']:g}": [r["lambda_1"], r["val_acc"]]
                for r in runs
                if r["optimizer"] == name and r["lr"] == lr
            }
            for lr in s[name]["lrs"]
        }
        for name in ("adam", "kfac")
    }
    rec.csv(runs)
    _figure(rec, runs)
    body = "\n".join(_table_md(name, runs, s[name]) for name in ("adam", "kfac"))
    return rec.finish(
        {
            "steps": s["steps"],
            "batch_size": 64,
            "schedule": "eq. 12",
            "hessian_samples": s["hessian_samples"],
            "adam": s["adam"],
            "kfac": s["kfac"],
        },
        checks,
        {"runs": runs, "table": table, "summary": summary},
        body,
    )


def _checks(runs: list[dict]) -> tuple[list[C.Check], dict]:
    rows, evidence = [], []
    for name in ("adam", "kfac"):
        for lr in sorted({r["lr"] for r in runs if r["optimizer"] == name}):
            pts = [r for r in runs if r["optimizer"] == name and r["lr"] == lr]
            rho = C.spearman([r["delta"] for r in pts], [r["lambda_1"] for r in pts])
            rows.append(rho)
            evidence.append(
                f"{name} lr={lr:g}: "
                + ", ".join(f"d={r['delta']:g} -> {r['lambda_1']:.3g}" for r in pts)
                + f" (rho {rho:.2f})"
            )
    decided = [r for r in rows if math.isfinite(r)]
    checks = [
        C.Check(
            "at fixed learning rate, a larger damping gives a smaller spectral norm lambda_1",
            None if not decided else all(r < 0 for r in decided),
            "; ".join(evidence) + " (supports if Spearman(delta, lambda_1) < 0 in every row with "
            ">= 3 finite runs)",
        )
    ]
    summary = {"spearman_delta_lambda1": rows}
    for name in ("adam", "kfac"):
        pts = [r for r in runs if r["optimizer"] == name]
        rho = C.spearman(
            [math.log(r["r_est_curv"]) if r["r_est_curv"] > 0 else math.nan for r in pts],
            [r["val_acc"] for r in pts],
        )
        summary[f"spearman_logR_val_acc_{name}"] = rho
        checks.append(
            C.Check(
                f"{name}: a larger R_est-curv goes with lower validation accuracy",
                None if math.isnan(rho) else rho < 0,
                f"Spearman(log R_est-curv, val acc) = {rho:.2f} over "
                f"{sum(math.isfinite(r['val_acc']) for r in pts)} finite runs "
                f"({sum(r['diverged'] for r in pts)} diverged)",
            )
        )
    return checks, summary


def _table_md(name: str, runs: list[dict], grid: dict) -> str:
    """Table 1 layout: rows delta, columns alpha, cells 'lambda_1 (val acc %)'."""
    head = f"**{name}**: lambda_1 at the end (validation accuracy %)\n\n| delta \\ alpha | "
    head += " | ".join(f"{lr:g}" for lr in grid["lrs"]) + " |\n|---|"
    head += "---|" * len(grid["lrs"]) + "\n"
    lines = []
    for d in grid["deltas"]:
        cells = []
        for lr in grid["lrs"]:
            r = next(r for r in runs if (r["optimizer"], r["lr"], r["delta"]) == (name, lr, d))
            cells.append(
                "diverged"
                if r["diverged"]
                else f"**{r['lambda_1']:.3g}** ({100 * r['val_acc']:.1f})"
            )
        lines.append(f"| {d:g} | " + " | ".join(cells) + " |")
    return head + "\n".join(lines) + "\n"


def _figure(rec: C.Recorder, runs: list[dict]) -> None:
    fig, axes = C.new_figure(2)
    for ax, name in zip(axes[0], ("adam", "kfac")):
        pts = [r for r in runs if r["optimizer"] == name and not r["diverged"]]
        for i, lr in enumerate(sorted({r["lr"] for r in pts})):
            sub = [r for r in pts if r["lr"] == lr]
            ax.scatter(
                [r["lambda_1"] for r in sub],
                [r["val_acc"] for r in sub],
                color=f"C{i}",
                label=f"lr={lr:g}",
            )
            for r in sub:
                ax.annotate(f"{r['delta']:g}", (r["lambda_1"], r["val_acc"]), fontsize=6)
        ax.set_xscale("log")
        ax.set_xlabel("final spectral norm lambda_1 (labels: delta)")
        ax.set_ylabel("validation accuracy")
        ax.set_title(name)
        ax.legend(fontsize=7)
    rec.figure(fig)
