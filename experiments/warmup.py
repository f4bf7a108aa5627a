"""Section 7.3: Adam with learned eps across learning rates, with and without the eq. 16
warm-up schedule (Figs. 14-15).

Adam's eps is its damping; the paper learns it online as the Hessian noise variance (eq.
15) and finds that under the usual schedule (eq. 12) the learned eps improves little: for
Adam's square-root preconditioner the damping is "too harsh". With the aggressive eq. 16
schedule (the rate ramps to 5 alpha between 10% and 30% of training, then decays to 0.01
alpha) flat damping diverges while the learned damping stabilises training and generalises
better.

On the digits CNN (batch 64) and for every seed we train Adam at several learning rates
alpha, each with eps = delta* = alpha kept flat and with eps learned from delta* = alpha (the
setting of Fig. 15, where alpha = delta* = 1e-4) by every rule of
:data:`~curvlab.experiments.dampers.DAMPER_CONFIGS`, under eq. 12 and under eq. 16. (Started
at Adam's default 1e-8 instead, the largest alpha collapses some seeds within the first
update interval, before any rule acts, whatever the schedule.)

Effects per seed and rule: at the largest learning rate under eq. 16, log10(final train
loss flat) - log10(learned) (the paper: positive, learned trains
where flat fails; a diverged run counts as its initial loss); averaged over learning rates,
the validation-accuracy gain of eq. 16 over eq. 12 for learned minus that for flat (the
paper: positive, the schedule helps the learned damping most); and averaged over learning
rates under eq. 12, the validation-accuracy gain of learned over flat (the paper: small,
below 0.02).
"""

from __future__ import annotations

import math
import sys

import torch
from torch import nn

from curvlab.optim import adam_with_learned_eps, paper_schedule, warmup_schedule

from . import _common as C
from .dampers import (
    DAMPER_CONFIGS,
    SAME_NOTE,
    damping_history,
    identical_arms,
    make_damper,
)
from .workloads import describe_workload, image_workload

NAME = "warmup"
TITLE = "Section 7.3: Adam with learned eps, with and without the eq. 16 warm-up (Figs. 14-15)"
CLAIM = (
    "Section 7.3: for Adam, the learned damping improves little under the usual schedule "
    "(eq. 12); with the aggressive warm-up schedule (eq. 16, kappa = 5) flat damping fails "
    "while the learned damping stabilises training and gives the better generalisation."
)
PAPER_SETTING = (
    "VGG-16 on CIFAR-100, batch 128, Adam alpha and delta* = 1e-4 (Fig. 15) and larger, eq. "
    "16 with kappa = 5, r = 0.01, damping re-estimated every 100 steps; `--scale paper` here: "
    "VGG-16 (no batch norm) on CIFAR-100 from local files, alpha = delta* in {1e-4, 4e-4, "
    "1e-3}, 100 epochs"
)
FIELDS = (*C.COMMON_FIELDS, "runs", "summary")

SCHEDULES = {"eq12": paper_schedule, "eq16": warmup_schedule}
SETTINGS = {
    "smoke": {
        "seeds": 3,
        "lrs": (0.1,),
        "steps": 30,
        "update_every": 10,
        "subsample": 64,
        "n_probes": 2,
        "eval_every": 15,
    },
    "fast": {
        "seeds": 3,
        "lrs": (0.01, 0.03, 0.1),
        "steps": 200,
        "update_every": 20,
        "subsample": 256,
        "n_probes": 2,
        "eval_every": 40,
    },
    "paper": {
        "seeds": 3,
        "lrs": (1e-4, 4e-4, 1e-3),
        "steps": 100 * 390,
        "update_every": 100,
        "subsample": 10000,
        "n_probes": 2,
        "eval_every": 390,
    },
}


def _run_one(work, lr: float, schedule: str, config, s: dict, seed: int) -> dict:
    loss_fn = nn.CrossEntropyLoss()
    model = work.model_factory()
    damper = after = None
    if config is None:
        opt = torch.optim.Adam(model.parameters(), lr=lr, eps=lr)
    else:
        damper = make_damper(
            config,
            lr,
            batch_size=work.batch_size,
            update_every=s["update_every"],
            seed=seed,
            subsample=s["subsample"],
            n_probes=s["n_probes"],
            population=work.data.n_train,
        )
        train_set = work.data.train()
        opt = adam_with_learned_eps(model.parameters(), damper, lr=lr)

        def after(step, batch):
            damper.step(model, loss_fn, train_set)

    hist = C.train(
        model,
        loss_fn,
        opt,
        work.data,
        steps=s["steps"],
        batch_size=work.batch_size,
        seed=seed,
        scheduler=SCHEDULES[schedule](opt, s["steps"]),
        after_step=after,
        eval_every=s["eval_every"],
    )
    return {
        "seed": seed,
        "lr": lr,
        "schedule": schedule,
        "eps": "flat" if config is None else config.label,
        "final_eps": opt.param_groups[0]["eps"],
        "train_loss": C.final(hist, "train_loss"),
        "val_acc": C.final(hist, "val_acc"),
        "diverged": hist["diverged"],
        "initial_loss": hist["train_loss"][0],
        "history": {k: hist[k] for k in ("step", "train_loss", "val_acc")},
        "damping_history": [] if damper is None else damping_history(damper),
    }


def _seed_runs(seed: int, s: dict, scale: str, dev) -> list[dict]:
    work = image_workload(scale, seed, dev)
    return [
        _run_one(work, lr, schedule, config, s, seed)
        for lr in s["lrs"]
        for schedule in SCHEDULES
        for config in (None, *DAMPER_CONFIGS)
    ]


def _acc(r: dict) -> float:
    return 0.0 if r["diverged"] or not math.isfinite(r["val_acc"]) else r["val_acc"]


def run(
    out_dir, *, scale: str = "fast", seed: int = 0, device: str = "cpu", progress: bool = False
) -> dict:
    """Run the experiment (module docstring); returns the JSON content (keys: FIELDS)."""
    dev, rec, s, seeds = C.begin(sys.modules[__name__], out_dir, scale, seed, device)
    per_seed = C.per_seed(lambda sd: _seed_runs(sd, s, scale, dev), seeds, progress, NAME)
    runs = [r for rs in per_seed for r in rs]
    checks, summary = _checks(per_seed, s)
    rec.csv([{k: v for k, v in r.items() if k not in ("history", "damping_history")} for r in runs])
    rec.csv(
        [
            {"seed": r["seed"], "lr": r["lr"], "schedule": r["schedule"], "rule": r["eps"], **h}
            for r in runs
            for h in r["damping_history"]
        ],
        "_damping",
    )
    _figure(rec, runs, seeds[0], s)
    rows = []
    for lr in s["lrs"]:
        for schedule in SCHEDULES:
            for label in ("flat", *(c.label for c in DAMPER_CONFIGS)):
                sub = [
                    r for r in runs if (r["lr"], r["schedule"], r["eps"]) == (lr, schedule, label)
                ]
                rows.append(
                    {
                        "alpha": lr,
                        "schedule": schedule,
                        "eps": label if label == "flat" else "learned: " + label,
                        "final eps": C.pm([r["final_eps"] for r in sub]),
                        "log10 train loss": C.pm([C.log_final_loss(r) for r in sub], ".2f"),
                        "val acc": C.pm([_acc(r) for r in sub], ".3f"),
                    }
                )
    body = (
        f"Adam with eps starting at delta* = alpha, {s['steps']} steps, mean ± SE over seeds "
        f"{seeds} (a "
        "diverged run counts as its initial loss and accuracy 0):\n\n"
        + C.markdown_table(rows, list(rows[0]))
    )
    same = identical_arms(
        runs, "eps", lambda r: f"alpha {r['lr']:g}, {r['schedule']}",
        lambda r: (r["final_eps"], C.log_final_loss(r), _acc(r)),
    )
    if same:
        body += f"\n\n{same} {SAME_NOTE}"
    setting = {
        "model": describe_workload(scale),
        "optimizer": "Adam (betas 0.9, 0.999)",
        "eps_start": "delta* = alpha (Fig. 15)",
        "kappa": 5.0,
        "r": 0.01,
        "rules": [c.label for c in DAMPER_CONFIGS],
        **s,
    }
    return rec.finish(setting, checks, {"runs": runs, "summary": summary}, body)


def _checks(per_seed: list[list[dict]], s: dict) -> tuple[list[C.Check], dict]:
    top = max(s["lrs"])
    checks, summary = [], {}
    for config in DAMPER_CONFIGS:
        rescue, boost, gain12 = [], [], []
        for rs in per_seed:

            def pick(lr, schedule, label, rs=rs):
                return next(
                    r for r in rs if (r["lr"], r["schedule"], r["eps"]) == (lr, schedule, label)
                )

            lab = config.label
            rescue.append(C.log_final_loss(pick(top, "eq16", "flat"))
                          - C.log_final_loss(pick(top, "eq16", lab)))
            boost.append(
                sum(
                    (_acc(pick(lr, "eq16", lab)) - _acc(pick(lr, "eq12", lab)))
                    - (_acc(pick(lr, "eq16", "flat")) - _acc(pick(lr, "eq12", "flat")))
                    for lr in s["lrs"]
                )
                / len(s["lrs"])
            )
            gain12.append(
                sum(_acc(pick(lr, "eq12", lab)) - _acc(pick(lr, "eq12", "flat")) for lr in s["lrs"])
                / len(s["lrs"])
            )
        summary[config.label] = {"rescue": rescue, "warmup_boost": boost, "eq12_gain": gain12}
        checks += [
            C.claim_check(
                f"Adam, eq. 16 at the largest alpha ({top:g}): learned eps ({config.label}) "
                "trains where flat eps fails",
                "log10(final train loss, flat eps) - log10(final train loss, learned eps)",
                rescue,
                direction=+1,
                caveat="which alpha counts as aggressive depends on the network",
            ),
            C.claim_check(
                f"Adam: the eq. 16 warm-up raises validation accuracy more with learned eps "
                f"({config.label}) than with flat eps",
                "mean over alpha of [val acc(eq. 16) - val acc(eq. 12)] learned - the same flat",
                boost,
                direction=+1,
            ),
            C.claim_check(
                f"Adam under eq. 12: learned eps ({config.label}) gains little over flat eps",
                "mean over alpha of val acc(learned) - val acc(flat), eq. 12",
                gain12,
                direction=-1,
                threshold=0.02,
                caveat="'little' is our threshold of 2 accuracy points",
            ),
        ]
    return checks, summary


def _figure(rec: C.Recorder, runs: list[dict], seed: int, s: dict) -> None:
    rules = [c.label for c in DAMPER_CONFIGS]
    fig, axes = C.new_figure(3, 2, width=4.2, height=3.2)
    for row, schedule in enumerate(SCHEDULES):
        for r in (r for r in runs if r["seed"] == seed and r["schedule"] == schedule):
            color = f"C{s['lrs'].index(r['lr'])}"
            style = "--" if r["eps"] == "flat" else "-"
            label = f"{r['eps'].split(':')[0]} alpha={r['lr']:g}"
            h = r["history"]
            axes[row, 0].plot(h["step"], h["train_loss"], style, color=color, label=label)
            axes[row, 1].plot(h["step"], h["val_acc"], style, color=color, label=label)
            if r["damping_history"]:
                d = r["damping_history"]
                axes[row, 2].plot(  # from delta* = alpha through every update
                    [0, *(p["step"] for p in d)],
                    [r["lr"], *(p["damping"] for p in d)],
                    ["-", "-.", ":"][rules.index(r["eps"]) % 3],
                    color=color,
                    label=f"{r['eps'].split(':')[0]} alpha={r['lr']:g}",
                )
        axes[row, 0].set_yscale("log")
        axes[row, 0].set_title(f"{schedule}: train loss (dashed: flat eps = alpha)")
        axes[row, 1].set_title(f"{schedule}: validation accuracy")
        axes[row, 2].set_title(f"{schedule}: learned eps")
        axes[row, 2].set_yscale("log")
        axes[row, 0].legend(fontsize=5)
        axes[row, 2].legend(fontsize=5)
    rec.figure(fig)
