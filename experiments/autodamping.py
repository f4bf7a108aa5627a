"""Section 7: KFAC and Adam with learned damping against flat damping (Figs. 11-15 analogues).

The digits CNN of ``damping_sweep`` trained with KFAC (damping) and Adam (eps) from several
initial dampings delta*: once with delta* kept flat, once with a
``curvlab.LinearShrinkageDamper`` (rule "rmt": the Hessian noise variance of a batch of the
optimizer's size, unbiased estimator, finite-population factor, on a fixed random
subsample; floor delta*, EMA 0.7 as in the paper) attached to the optimizer. Same data
order, initialization and eq. 12 schedule for every run.
"""

from __future__ import annotations

import math
import sys

import torch
from torch import nn

import curvlab
from curvlab.optim import KFAC, adam_with_learned_eps, paper_schedule

from . import _common as C
from .data import load_sklearn

NAME = "autodamping"
TITLE = "Section 7: learned (RMT) damping against flat damping for KFAC and Adam"
CLAIM = (
    "Section 7: with damping learned online as the Hessian noise variance (eq. 15), KFAC is "
    "relatively insensitive to the initial damping and trains faster than flat damping from "
    "the same starting values; for Adam the learned damping helps only a little (it can be "
    "too harsh for Adam's square-root preconditioner)."
)
PAPER_SETTING = (
    "VGG-16 on CIFAR-100, batch 128; KFAC alpha in {1e-4, 1e-3} with delta* in {alpha, 3 "
    "alpha, 10 alpha} and flat dampings, Adam alpha up to 4e-4; damping re-estimated every 100 "
    "steps on a 10000-sample subsample, EMA 0.7; `--scale paper` here: the digits CNN for "
    "2000 steps, update every 100 steps, subsample 1024"
)
FIELDS = (*C.COMMON_FIELDS, "runs", "summary")

BATCH = 64
SETTINGS = {
    "smoke": {
        "steps": 20,
        "update_every": 10,
        "subsample": 128,
        "n_probes": 2,
        "eval_every": 10,
        "kfac": {"lr": 0.01, "inits": (1e-3, 1e-1)},
        "adam": {"lr": 3e-3, "inits": (1e-4, 1e-2)},
    },
    "fast": {
        "steps": 150,
        "update_every": 25,
        "subsample": 256,
        "n_probes": 4,
        "eval_every": 15,
        "kfac": {"lr": 0.01, "inits": (1e-3, 1e-2, 1e-1)},
        "adam": {"lr": 3e-3, "inits": (1e-4, 1e-3, 1e-2)},
    },
    "paper": {
        "steps": 2000,
        "update_every": 100,
        "subsample": 1024,
        "n_probes": 8,
        "eval_every": 50,
        "kfac": {"lr": 0.01, "inits": (1e-3, 3e-3, 1e-2, 3e-2, 1e-1)},
        "adam": {"lr": 3e-3, "inits": (1e-5, 1e-4, 1e-3, 1e-2)},
    },
}


def _run_one(name, lr, init, learned, s, data, seed, dev):
    loss_fn = nn.CrossEntropyLoss()
    model = C.seeded(seed, lambda: C.DigitsCNN().to(dev))
    damper = None
    after = None
    if learned:
        damper = curvlab.LinearShrinkageDamper(
            rule="rmt",
            init=init,
            update_every=s["update_every"],
            ema=0.7,
            batch_size=BATCH,
            n_probes=s["n_probes"],
            subsample=s["subsample"],  # drawn once (the paper's 10000 of 50000)
            population=data.n_train,
            seed=seed,
        )
        train_set = data.train()

        def after(step, batch):  # step counts from 1; the damper estimates at 0, k, 2k, ...
            damper.step(model, loss_fn, train_set)

        damper.step(model, loss_fn, train_set)  # the estimate at initialization
    if name == "kfac":  # KFAC reads the damper's cached value every step
        opt = KFAC(model, loss_fn, lr=lr, damping=init if damper is None else damper)
    elif damper is None:
        opt = torch.optim.Adam(model.parameters(), lr=lr, eps=init)
    else:
        opt = adam_with_learned_eps(model.parameters(), damper, lr=lr)
    hist = C.train(
        model,
        loss_fn,
        opt,
        data,
        steps=s["steps"],
        batch_size=BATCH,
        seed=seed,
        scheduler=paper_schedule(opt, s["steps"]),
        after_step=after,
        eval_every=s["eval_every"],
    )
    trajectory = (
        []
        if damper is None
        else [
            {"step": h.step, "estimate": h.estimate, "stderr": h.stderr, "damping": h.damping}
            for h in damper.history
        ]
    )
    return {
        "optimizer": name,
        "lr": lr,
        "init": init,
        "learned": learned,
        "final_damping": init if damper is None else damper.damping,
        "train_loss": C.final(hist, "train_loss"),
        "train_acc": C.final(hist, "train_acc"),
        "val_acc": C.final(hist, "val_acc"),
        "diverged": hist["diverged"],
        "n_rejected": 0 if damper is None else damper.n_rejected,
        "history": hist,
        "damping_history": trajectory,
    }


def run(
    out_dir, *, scale: str = "fast", seed: int = 0, device: str = "cpu", progress: bool = False
) -> dict:
    """Run the experiment (module docstring); returns the JSON content (keys: FIELDS)."""
    dev, rec, s = C.begin(sys.modules[__name__], out_dir, scale, seed, device)
    data = load_sklearn("digits", image=True, dtype=torch.float32, device=dev, seed=seed)
    jobs = [
        (name, s[name]["lr"], init, learned)
        for name in ("kfac", "adam")
        for init in s[name]["inits"]
        for learned in (False, True)
    ]
    runs = [
        _run_one(*job, s, data, seed, dev)
        for job in C.progress_bar(jobs, progress, "autodamping: runs")
    ]
    checks, summary = _checks(runs)
    rec.csv([{k: v for k, v in r.items() if k not in ("history", "damping_history")} for r in runs])
    rec.csv(
        [
            {"optimizer": r["optimizer"], "init": r["init"], **h}
            for r in runs
            for h in r["damping_history"]
        ],
        "_damping",
    )
    _figure(rec, runs)
    rows = [
        {
            "optimizer": r["optimizer"],
            "delta*": r["init"],
            "damping": "learned" if r["learned"] else "flat",
            "final delta": r["final_damping"],
            "train loss": r["train_loss"],
            "val acc": r["val_acc"],
        }
        for r in runs
    ]
    body = C.markdown_table(
        rows, ["optimizer", "delta*", "damping", "final delta", "train loss", "val acc"]
    )
    setting = {k: v for k, v in s.items()}
    setting.update(batch_size=BATCH, schedule="eq. 12", ema=0.7, rule="rmt")
    return rec.finish(setting, checks, {"runs": runs, "summary": summary}, body)


def _spread(values: list[float]) -> float:
    finite = [v for v in values if math.isfinite(v)]
    if len(finite) < len(values):
        return math.inf  # a diverged run is the largest possible sensitivity
    return max(finite) - min(finite)


def _checks(runs: list[dict]) -> tuple[list[C.Check], dict]:
    summary: dict = {}
    checks = []
    for name in ("kfac", "adam"):
        flat = {r["init"]: r for r in runs if r["optimizer"] == name and not r["learned"]}
        learned = {r["init"]: r for r in runs if r["optimizer"] == name and r["learned"]}
        inits = sorted(flat)
        sf = _spread([flat[i]["train_loss"] for i in inits])
        sl = _spread([learned[i]["train_loss"] for i in inits])
        wins = sum(
            math.isfinite(learned[i]["train_loss"])
            and not learned[i]["train_loss"] > flat[i]["train_loss"]
            for i in inits
        )
        gain = max((learned[i]["val_acc"] - flat[i]["val_acc"]) for i in inits)
        summary[name] = {
            "spread_flat": sf,
            "spread_learned": sl,
            "learned_wins": wins,
            "max_val_gain": gain,
            "inits": inits,
        }
        losses = ", ".join(
            f"d*={i:g}: flat {flat[i]['train_loss']:.3g} / learned {learned[i]['train_loss']:.3g}"
            for i in inits
        )
        if name == "kfac":
            checks.append(
                C.Check(
                    "KFAC with learned damping is less sensitive to the initial damping than flat",
                    sl < 0.8 * sf,
                    f"spread (max - min) of final train loss over delta* = {inits}: learned "
                    f"{sl:.3g} vs flat {sf:.3g} (supports if learned < 0.8 x flat; a diverged "
                    "run counts as infinite spread)",
                )
            )
            checks.append(
                C.Check(
                    "KFAC with learned damping trains at least as fast as flat damping from the "
                    "same delta* (most initial values)",
                    2 * wins > len(inits),
                    f"learned reaches a lower or equal final train loss for {wins} of {len(inits)} "
                    f"initial values ({losses})",
                )
            )
        else:
            checks.append(
                C.Check(
                    "Adam with learned eps gains little over flat eps "
                    "(paper: 'the improvements are small')",
                    None if not math.isfinite(gain) else gain < 0.05,
                    f"largest validation-accuracy gain of learned over flat across delta* = "
                    f"{inits}: {gain:+.3f} (supports if below +0.05); {losses}",
                )
            )
    return checks, summary


def _figure(rec: C.Recorder, runs: list[dict]) -> None:
    fig, axes = C.new_figure(3, 2, width=4.2, height=3.2)
    for row, name in enumerate(("kfac", "adam")):
        inits = sorted({r["init"] for r in runs if r["optimizer"] == name})
        for r in (r for r in runs if r["optimizer"] == name):
            color = f"C{inits.index(r['init'])}"
            style = "-" if r["learned"] else "--"
            label = f"{'learned' if r['learned'] else 'flat'} d*={r['init']:g}"
            h = r["history"]
            axes[row, 0].plot(h["step"], h["train_loss"], style, color=color, label=label)
            axes[row, 1].plot(h["step"], h["val_acc"], style, color=color, label=label)
            if r["learned"] and r["damping_history"]:
                d = r["damping_history"]
                axes[row, 2].plot(
                    [p["step"] for p in d],
                    [p["damping"] for p in d],
                    "-o",
                    ms=3,
                    color=color,
                    label=label,
                )
                axes[row, 2].errorbar(
                    [p["step"] for p in d],
                    [p["estimate"] for p in d],
                    yerr=[p["stderr"] for p in d],
                    fmt="x",
                    color=color,
                    alpha=0.5,
                )
        axes[row, 0].set_yscale("log")
        axes[row, 0].set_title(f"{name}: train loss (dashed: flat)")
        axes[row, 1].set_title(f"{name}: validation accuracy")
        axes[row, 2].set_title(f"{name}: learned damping (x: raw estimates)")
        axes[row, 2].set_yscale("log")
        for ax in axes[row]:
            ax.set_xlabel("step")
        axes[row, 0].legend(fontsize=6)
    rec.figure(fig)
