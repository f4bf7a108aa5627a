"""Section 5: LanczosOPT against gradient descent for logistic regression, across delta and eta.

Softmax regression on scikit-learn's digits (1000 training images as in the paper's 1K MNIST
set, the other 797 held out) trained full-batch with LanczosOPT (eq. 9): steps
alpha / (eta (lambda_i + delta)) along the k Lanczos eigenvectors of the training Hessian and
alpha / delta on their complement, for a grid of dampings delta and sharp-direction
perturbations eta (LOPT[eta]). The learning rate alpha = 0.01 is fixed as in the paper, so
the estimated curvature learning-rate ratio R_est-curv = 1 + (lambda_1 - lambda_P) / delta
grows as delta shrinks (lambda_P = 0: the softmax-regression Hessian is singular). Gradient
descent runs as the curvature-blind baseline (R_est-curv = 1) with the classic step 1 /
lambda_1 (lambda_1 of the initial Hessian, by Lanczos).

Outputs: a heat map of final train and validation error minus the best run's (Fig. 4
analogue) and training/validation error curves (Fig. 5 analogue).
"""

from __future__ import annotations

import math
import sys

import torch
from torch import nn

import curvlab
from curvlab.optim import LanczosOPT

from . import _common as C
from .data import load_sklearn

NAME = "lanczos_damping"
TITLE = "Section 5: LanczosOPT across damping and sharp-direction perturbation (Figs. 4-5)"
CLAIM = (
    "Section 5: for logistic regression at a fixed alpha = 0.01, increasing R_est-curv "
    "(decreasing delta) makes generalisation suffer, and perturbing the sharp directions "
    "(LOPT[eta], eta = 3, 10) harms generalisation more than training."
)
PAPER_SETTING = (
    "logistic regression on 1K MNIST training images (P=7850), 10K test, 500 full-batch "
    "epochs, k=50 Lanczos directions, alpha=0.01, eta in {1, 3, 10}; `--scale paper` here: "
    "digits (P=650), 500 steps, k=50, refresh every step, 8 dampings"
)
FIELDS = (*C.COMMON_FIELDS, "alpha", "lambda_1_init", "gd", "runs", "best", "summary")

ALPHA = 0.01
ETAS = (1.0, 3.0, 10.0)
SETTINGS = {
    "smoke": {
        "steps": 20,
        "k": 5,
        "refresh_every": 10,
        "deltas": (1e-3, 1e-2),
        "etas": (1.0, 10.0),
        "eval_every": 5,
    },
    "fast": {
        "steps": 100,
        "k": 20,
        "refresh_every": 25,
        "deltas": (3e-4, 1e-3, 3e-3, 1e-2, 3e-2),
        "etas": ETAS,
        "eval_every": 10,
    },
    "paper": {
        "steps": 500,
        "k": 50,
        "refresh_every": 1,
        "deltas": (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1),
        "etas": ETAS,
        "eval_every": 10,
    },
}


def _errors(history: dict) -> dict:
    return {
        "train_error": 1 - C.final(history, "train_acc"),
        "val_error": 1 - C.final(history, "val_acc"),
        "diverged": bool(history["diverged"]),
    }


def _full_batch(model, loss_fn, opt, data, steps, eval_every, progress, desc):
    return C.train(
        model,
        loss_fn,
        opt,
        data,
        steps=steps,
        batch_size=data.n_train,
        seed=0,
        eval_every=eval_every,
        progress=progress,
        desc=desc,
    )


def run(
    out_dir, *, scale: str = "fast", seed: int = 0, device: str = "cpu", progress: bool = False
) -> dict:
    """Run the experiment (module docstring); returns the JSON content (keys: FIELDS)."""
    dev, rec, s = C.begin(sys.modules[__name__], out_dir, scale, seed, device)
    data = load_sklearn("digits", n_train=1000, device=dev, seed=seed)
    loss_fn = nn.CrossEntropyLoss()

    def fresh() -> nn.Module:
        return C.seeded(seed, lambda: nn.Linear(64, 10).to(torch.float64).to(dev))

    model = fresh()
    lam1 = C.spectral_norm(model, loss_fn, *data.train(), seed=seed, tol=1e-6)
    gd_model = fresh()
    gd_hist = _full_batch(
        gd_model,
        loss_fn,
        torch.optim.SGD(gd_model.parameters(), lr=1 / lam1),
        data,
        s["steps"],
        s["eval_every"],
        progress,
        "GD",
    )
    gd = {"lr": 1 / lam1, **_errors(gd_hist), "history": gd_hist}

    runs = []
    grid = [(d, e) for d in s["deltas"] for e in s["etas"]]
    for delta, eta in C.progress_bar(grid, progress, "lanczos_damping: LOPT grid"):
        m = fresh()
        opt = LanczosOPT(
            m.parameters(),
            model=m,
            loss_fn=loss_fn,
            data=data.train(),
            lr=ALPHA,
            damping=delta,
            eta=eta,
            k=s["k"],
            refresh_every=s["refresh_every"],
            tol=1e-5,
            seed=seed,
        )
        hist = _full_batch(m, loss_fn, opt, data, s["steps"], s["eval_every"], False, "LOPT")
        lam = float(opt.eigenvalues[0]) if opt.eigenvalues is not None else math.nan
        runs.append(
            {
                "delta": delta,
                "eta": eta,
                "lambda_1": lam,
                "r_est_curv": float(curvlab.rmt.r_est_curv(lam, 0.0, delta)),
                **_errors(hist),
                "history": hist,
            }
        )

    ok = [r for r in runs if not r["diverged"]]
    best = {
        "train_error": min((r["train_error"] for r in ok), default=math.nan),
        "val_error": min((r["val_error"] for r in ok), default=math.nan),
    }
    for r in runs:
        r["train_excess"] = r["train_error"] - best["train_error"]
        r["val_excess"] = r["val_error"] - best["val_error"]
    checks, summary = _checks(runs, s)
    rec.csv([{k: v for k, v in r.items() if k != "history"} for r in runs])
    rec.csv(
        [
            {
                "optimizer": "GD" if r is gd else f"LOPT[{r['eta']:g}] delta={r['delta']:g}",
                "step": st,
                "train_error": 1 - ta,
                "val_error": 1 - va,
            }
            for r in [gd, *runs]
            for st, ta, va in zip(
                r["history"]["step"], r["history"]["train_acc"], r["history"]["val_acc"]
            )
        ],
        "_curves",
    )
    _figures(rec, runs, gd, s)
    rows = [
        {
            "delta": r["delta"],
            "eta": r["eta"],
            "R_est-curv": r["r_est_curv"],
            "train err": r["train_error"],
            "val err": r["val_error"],
        }
        for r in runs
    ]
    body = (
        f"GD (lr 1/lambda_1 = {1 / lam1:.3g}): train error {gd['train_error']:.4f}, val "
        f"error {gd['val_error']:.4f}.\n\n"
        + C.markdown_table(rows, ["delta", "eta", "R_est-curv", "train err", "val err"])
    )
    return rec.finish(
        dict(s, alpha=ALPHA),
        checks,
        {
            "alpha": ALPHA,
            "lambda_1_init": lam1,
            "gd": gd,
            "runs": runs,
            "best": best,
            "summary": summary,
        },
        body,
    )


def _checks(runs: list[dict], s: dict) -> tuple[list[C.Check], dict]:
    plain = [r for r in runs if r["eta"] == 1.0]
    n_div = sum(r["diverged"] for r in runs)
    rho = C.spearman([r["r_est_curv"] for r in plain], [r["val_error"] for r in plain])
    rho_train = C.spearman([r["r_est_curv"] for r in plain], [r["train_error"] for r in plain])
    checks = [
        C.Check(
            "at fixed alpha, validation error rises with R_est-curv (LOPT, eta = 1)",
            None if math.isnan(rho) else rho > 0,
            f"Spearman(R_est-curv, val error) = {rho:.2f} over {len(plain)} dampings "
            f"(train error: {rho_train:.2f}); {n_div} of {len(runs)} runs diverged (excluded)",
        )
    ]
    gap = [r["val_error"] - r["train_error"] for r in plain]
    rho_gap = C.spearman([r["r_est_curv"] for r in plain], gap)
    checks.append(
        C.Check(
            "at fixed alpha, the generalisation gap (val - train error) grows with R_est-curv "
            "(eta = 1)",
            None if math.isnan(rho_gap) else rho_gap > 0,
            f"Spearman(R_est-curv, gap) = {rho_gap:.2f}; gaps "
            + ", ".join(f"delta={r['delta']:g}: {g:.4f}" for r, g in zip(plain, gap)),
        )
    )
    eta_max = max(s["etas"])
    gaps_val, gaps_train = [], []
    for delta in s["deltas"]:
        pair = {r["eta"]: r for r in runs if r["delta"] == delta and not r["diverged"]}
        if 1.0 in pair and eta_max in pair:
            gaps_val.append(pair[eta_max]["val_error"] - pair[1.0]["val_error"])
            gaps_train.append(pair[eta_max]["train_error"] - pair[1.0]["train_error"])
    if gaps_val:
        dv, dt = sum(gaps_val) / len(gaps_val), sum(gaps_train) / len(gaps_train)
        checks.append(
            C.Check(
                f"perturbing the sharp directions (eta = {eta_max:g}) harms validation more than "
                "training",
                dv > dt,
                f"mean change from eta=1 to eta={eta_max:g} over {len(gaps_val)} dampings: "
                f"val error {dv:+.4f}, train error {dt:+.4f}",
            )
        )
        summary = {
            "spearman_r_val": rho,
            "spearman_r_train": rho_train,
            "spearman_r_gap": rho_gap,
            "eta_val_gap": dv,
            "eta_train_gap": dt,
            "n_diverged": n_div,
        }
    else:
        checks.append(
            C.Check(
                "perturbing the sharp directions harms validation more than training",
                None,
                "no damping with both eta runs finite",
            )
        )
        summary = {
            "spearman_r_val": rho,
            "spearman_r_train": rho_train,
            "spearman_r_gap": rho_gap,
            "n_diverged": n_div,
        }
    return checks, summary


def _figures(rec: C.Recorder, runs: list[dict], gd: dict, s: dict) -> None:
    deltas, etas = s["deltas"], s["etas"]
    fig, axes = C.new_figure(2, width=4.2)
    for ax, key, title in (
        (axes[0, 0], "train_excess", "train"),
        (axes[0, 1], "val_excess", "validation"),
    ):
        grid = torch.full((len(deltas), len(etas)), math.nan)
        for r in runs:
            grid[deltas.index(r["delta"]), etas.index(r["eta"])] = r[key]
        img = ax.imshow(grid.numpy(), cmap="Greys", aspect="auto", origin="lower")
        ax.set_xticks(range(len(etas)), [f"{e:g}" for e in etas])
        ax.set_yticks(range(len(deltas)), [f"{d:g}" for d in deltas])
        ax.set_xlabel("eta (sharp-direction perturbation)")
        ax.set_ylabel("delta")
        ax.set_title(f"{title} error minus best run")
        fig.colorbar(img, ax=ax)
    rec.figure(fig, "_heatmap")
    fig, axes = C.new_figure(2)
    for ax, key, title in (
        (axes[0, 0], "train_acc", "train"),
        (axes[0, 1], "val_acc", "validation"),
    ):
        ax.plot(gd["history"]["step"], [1 - a for a in gd["history"][key]], "k-", label="GD")
        for r in runs:
            style = {1.0: "-", 3.0: "--"}.get(r["eta"], ":")
            ax.plot(
                r["history"]["step"],
                [1 - a for a in r["history"][key]],
                style,
                color=f"C{deltas.index(r['delta'])}",
                label=f"LOPT[{r['eta']:g}] d={r['delta']:g}",
            )
        ax.set_yscale("log")
        ax.set_xlabel("step (full batch)")
        ax.set_ylabel(f"{title} error")
        ax.legend(fontsize=5, ncol=2)
    rec.figure(fig, "_curves")
