"""Section 6 / Table 1: damping, spectral norm and generalisation for Adam and KFAC, compared
at matched training loss.

For a grid of learning rates alpha and dampings delta (Adam's eps; KFAC's exact damping,
curvlab.optim.KFAC) we train until the full training loss first reaches a common target
(checked every ``eval_every`` steps, constant learning rate: a schedule tied to a fixed
budget would end the runs at different losses), then measure the spectral norm lambda_1 of
the training Hessian (Lanczos through the autograd backend on a fixed subsample) and the
validation accuracy, and R_est-curv = 1 + lambda_1 / delta (section 6.1 with lambda_P taken
as 0). Comparing at a fixed budget confounds damping with training progress (a heavily
damped run is less trained); at matched training loss the comparison is the paper's: equal
training, different damping. Runs that never reach the target (diverged or too slow) are
reported and left out.

Per seed the effects are, for each optimizer, the mean over its learning-rate rows of
Spearman(delta, lambda_1) (the paper: negative, "increasing delta always leads to smaller
spectral norm") and Spearman(log R_est-curv, validation accuracy) over all its runs (the
paper: negative, a larger R goes with worse generalisation).
"""

from __future__ import annotations

import math
import sys

import torch
from torch import nn

from curvlab.optim import KFAC

from . import _common as C
from . import stats
from .workloads import describe_workload, image_workload

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
    "from 1e-4 to 0.1; `--scale paper` here: the same network, data and grids, each run to "
    "the matched training loss 0.1 (at most 300 epochs)"
)
FIELDS = (*C.COMMON_FIELDS, "runs", "summary")

OPTIMIZERS = ("adam", "kfac")
SETTINGS = {
    "smoke": {
        "seeds": 3,
        "target_loss": 2.2,
        "max_steps": 60,
        "eval_every": 5,
        "hessian_samples": 64,
        "adam": {1e-2: (1e-8, 1e-3, 1e-2)},
        "kfac": {1e-2: (1e-2, 3e-2, 1e-1)},
    },
    "fast": {
        "seeds": 3,
        "target_loss": 0.1,
        "max_steps": 1500,
        "eval_every": 10,
        "hessian_samples": 256,
        "adam": {1e-2: (1e-8, 1e-3, 1e-2, 3e-2)},
        "kfac": {1e-2: (1e-2, 3e-2, 1e-1)},
    },
    "paper": {
        "seeds": 3,
        "target_loss": 0.1,
        "max_steps": 300 * 390,
        "eval_every": 390,
        "hessian_samples": 2048,
        "adam": {4e-4: (1e-7, 4e-4, 1e-3), 1e-3: (1e-3, 5e-3, 8e-3)},
        "kfac": {1e-1: (1e-1, 3e-1, 1.0), 1e-3: (1e-3, 1e-2, 1e-1), 1e-4: (1e-4, 3e-4, 1e-3)},
    },
}


def make_optimizer(name: str, model: nn.Module, lr: float, delta: float):
    """Adam with eps = delta, or curvlab's KFAC with exact damping delta."""
    if name == "adam":
        return torch.optim.Adam(model.parameters(), lr=lr, eps=delta)
    return KFAC(model, nn.CrossEntropyLoss(), lr=lr, damping=delta, **C.KFAC_OPTIONS)


def _seed_runs(seed: int, s: dict, scale: str, dev) -> list[dict]:
    work = image_workload(scale, seed, dev)
    loss_fn = nn.CrossEntropyLoss()
    data = work.data
    xh, yh = data.x_train[: s["hessian_samples"]], data.y_train[: s["hessian_samples"]]
    runs = []
    for name in OPTIMIZERS:
        for lr, deltas in s[name].items():
            for delta in deltas:
                model = work.model_factory()
                hist = C.train(
                    model,
                    loss_fn,
                    make_optimizer(name, model, lr, delta),
                    data,
                    steps=s["max_steps"],
                    batch_size=work.batch_size,
                    seed=seed,
                    eval_every=s["eval_every"],
                    target_loss=s["target_loss"],
                )
                reached = hist["reached"] is not None
                lam = C.spectral_norm(model, loss_fn, xh, yh, seed) if reached else math.nan
                runs.append(
                    {
                        "seed": seed,
                        "optimizer": name,
                        "lr": lr,
                        "delta": delta,
                        "reached": hist["reached"],
                        "diverged": bool(hist["diverged"]),
                        "lambda_1": lam,
                        "r_est_curv": 1 + lam / delta if reached else math.nan,
                        "train_loss": hist["train_loss"][-1],
                        "val_acc": hist["val_acc"][-1] if reached else math.nan,
                    }
                )
    return runs


def run(
    out_dir, *, scale: str = "fast", seed: int = 0, device: str = "cpu", progress: bool = False
) -> dict:
    """Run the experiment (module docstring); returns the JSON content (keys: FIELDS)."""
    dev, rec, s, seeds = C.begin(sys.modules[__name__], out_dir, scale, seed, device)
    per_seed = C.per_seed(lambda sd: _seed_runs(sd, s, scale, dev), seeds, progress, NAME)
    runs = [r for rs in per_seed for r in rs]
    checks, summary = _checks(per_seed, s)
    rec.csv(runs)
    _figure(rec, runs)
    body = "\n".join(_table_md(name, runs, s[name], seeds) for name in OPTIMIZERS)
    body += (
        f"\nEvery run trains at a constant learning rate until its training loss reaches "
        f"{s['target_loss']} (checked every {s['eval_every']} steps, at most "
        f"{s['max_steps']}); lambda_1 on {s['hessian_samples']} training samples there."
    )
    setting = {
        "model": describe_workload(scale),
        "compare": f"at matched training loss {s['target_loss']}",
        "schedule": "constant learning rate",
        "kfac": C.KFAC_OPTIONS,
        **{k: v for k, v in s.items() if k not in OPTIMIZERS},
        **{name: {f"{lr:g}": list(d) for lr, d in s[name].items()} for name in OPTIMIZERS},
    }
    return rec.finish(setting, checks, {"runs": runs, "summary": summary}, body)


def _checks(per_seed: list[list[dict]], s: dict) -> tuple[list[C.Check], dict]:
    checks, summary = [], {}
    for name in OPTIMIZERS:
        rho_lam, rho_val, missing = [], [], 0
        for rs in per_seed:
            mine = [r for r in rs if r["optimizer"] == name]
            missing += sum(r["reached"] is None for r in mine)
            rows = [
                C.spearman(
                    [r["delta"] for r in mine if r["lr"] == lr],
                    [r["lambda_1"] for r in mine if r["lr"] == lr],
                )
                for lr in s[name]
            ]
            finite = [v for v in rows if math.isfinite(v)]
            rho_lam.append(sum(finite) / len(finite) if finite else math.nan)
            rho_val.append(
                C.spearman(
                    [math.log(r["r_est_curv"]) if r["r_est_curv"] > 0 else math.nan for r in mine],
                    [r["val_acc"] for r in mine],
                )
            )
        summary[name] = {"spearman_delta_lambda1": rho_lam, "spearman_logR_val_acc": rho_val}
        note = f"{missing} {name} run(s) never reached the target loss (left out)"
        checks.append(
            C.claim_check(
                f"{name}: at fixed learning rate and matched training loss, a larger damping "
                "gives a smaller spectral norm lambda_1",
                "Spearman(delta, lambda_1) within each learning-rate row, averaged over rows",
                rho_lam,
                direction=-1,
                evidence=note,
                caveat="a row needs 3 runs that reach the target; the spectral norm is "
                "measured on a subsample",
            )
        )
        checks.append(
            C.claim_check(
                f"{name}: at matched training loss, a larger R_est-curv goes with lower "
                "validation accuracy",
                "Spearman(log R_est-curv, validation accuracy) over its runs",
                rho_val,
                direction=-1,
                evidence=note,
            )
        )
    return checks, summary


def _table_md(name: str, runs: list[dict], grid: dict, seeds: list[int]) -> str:
    """Table 1 layout: rows delta, columns alpha, cells 'lambda_1 (val acc %)', mean ± SE."""
    head = (
        f"**{name}**: lambda_1 at the matched training loss (validation accuracy %), mean ± SE "
        f"over seeds {seeds}\n\n| delta \\ alpha | "
    )
    head += " | ".join(f"{lr:g}" for lr in grid) + " |\n|---|" + "---|" * len(grid) + "\n"
    lines = []
    for d in sorted({d for ds in grid.values() for d in ds}):
        cells = []
        for lr, deltas in grid.items():
            if d not in deltas:
                cells.append("")
                continue
            sub = [r for r in runs if (r["optimizer"], r["lr"], r["delta"]) == (name, lr, d)]
            lam = stats.mean_se([r["lambda_1"] for r in sub])
            acc = stats.mean_se([100 * r["val_acc"] for r in sub])
            if lam[2] == 0:
                cells.append("never reached")
                continue
            cells.append(f"**{lam[0]:.3g} ± {lam[1]:.2g}** ({acc[0]:.1f} ± {acc[1]:.1f})")
        lines.append(f"| {d:g} | " + " | ".join(cells) + " |")
    return head + "\n".join(lines) + "\n"


def _figure(rec: C.Recorder, runs: list[dict]) -> None:
    fig, axes = C.new_figure(2)
    for ax, name in zip(axes[0], OPTIMIZERS):
        pts = [r for r in runs if r["optimizer"] == name and r["reached"] is not None]
        for i, lr in enumerate(sorted({r["lr"] for r in pts})):
            sub = [r for r in pts if r["lr"] == lr]
            ax.scatter(
                [r["delta"] for r in sub],
                [r["lambda_1"] for r in sub],
                color=f"C{i}",
                label=f"lr={lr:g}",
            )
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("damping delta")
        ax.set_ylabel("lambda_1 at the matched training loss")
        ax.set_title(name)
        ax.legend(fontsize=7)
    rec.figure(fig)
