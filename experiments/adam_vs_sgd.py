"""Table 2: Adam with raised damping (Adam-D) against SGD and plain Adam.

The paper's Table 2 reports test accuracy over seeds: on CIFAR-100 (VGG-16, 5 seeds) SGD
65.3 ± 0.6, Adam-D (eps = 5e-3) 65.5 ± 0.7, Adam (eps = 1e-8) 61.9 ± 0.4: plain Adam
generalises worse than SGD, and raising its damping closes the gap.

We train the three to convergence (the eq. 12 schedule over a budget long enough that
every run ends with a training loss near zero, reported) from the same initialisation and
data order per seed, and compare validation accuracy at the end. The hyperparameters are
fixed, not tuned per run: SGD with momentum 0.9 at the best of {0.01, 0.03, 0.1} on a probe
(0.1), Adam at 0.03 (the largest rate Adam trains stably on this network, as the paper uses
Adam's largest stable rate), and Adam-D at the same rate with eps = 1e-2, the order of the
Hessian noise variance of a batch of 64 during training (the value the learned damping of
section 7 reaches).

Per seed the effects are accuracy differences: SGD - Adam (the paper's premise, positive),
Adam-D - Adam (positive: raised damping helps) and Adam-D - SGD (the gap closes: not below
-0.01, one accuracy point).
"""

from __future__ import annotations

import sys

import torch
from torch import nn

from curvlab.optim import paper_schedule

from . import _common as C
from . import stats
from .workloads import describe_workload, image_workload

NAME = "adam_vs_sgd"
TITLE = "Table 2: Adam with raised damping closes the gap to SGD"
CLAIM = (
    "Table 2: plain Adam (eps = 1e-8) generalises worse than SGD, and Adam with raised "
    "damping (Adam-D) matches or beats SGD (CIFAR-100 / VGG-16: SGD 65.3 ± 0.6, Adam-D "
    "65.5 ± 0.7, Adam 61.9 ± 0.4)."
)
PAPER_SETTING = (
    "VGG-16 on CIFAR-100, 5 seeds, no weight decay; SGD alpha = 0.01, Adam alpha = 4e-4 "
    "with eps 1e-8 (Adam) or 5e-3 (Adam-D); `--scale paper` here: the same on CIFAR-100 "
    "from local files, 5 seeds, 200 epochs with the eq. 12 schedule, batch 128"
)
FIELDS = (*C.COMMON_FIELDS, "runs", "summary")

SETTINGS = {
    "smoke": {
        "seeds": 3,
        "steps": 30,
        "sgd_lr": 0.1,
        "adam_lr": 0.03,
        "adam_d_eps": 1e-2,
    },
    "fast": {
        "seeds": 3,
        "steps": 600,
        "sgd_lr": 0.1,
        "adam_lr": 0.03,
        "adam_d_eps": 1e-2,
    },
    "paper": {
        "seeds": 5,
        "steps": 200 * 390,
        "sgd_lr": 0.01,
        "adam_lr": 4e-4,
        "adam_d_eps": 5e-3,
    },
}
MOMENTUM = 0.9
ADAM_EPS = 1e-8
OPTIMIZERS = ("SGD", "Adam", "Adam-D")


def make_optimizer(name: str, model: nn.Module, s: dict) -> torch.optim.Optimizer:
    """SGD (momentum 0.9), Adam (eps 1e-8) or Adam-D (eps raised to ``adam_d_eps``)."""
    if name == "SGD":
        return torch.optim.SGD(model.parameters(), lr=s["sgd_lr"], momentum=MOMENTUM)
    eps = ADAM_EPS if name == "Adam" else s["adam_d_eps"]
    return torch.optim.Adam(model.parameters(), lr=s["adam_lr"], eps=eps)


def _seed_runs(seed: int, s: dict, scale: str, dev) -> dict:
    work = image_workload(scale, seed, dev)
    loss_fn = nn.CrossEntropyLoss()
    out = {}
    for name in OPTIMIZERS:
        model = work.model_factory()
        opt = make_optimizer(name, model, s)
        hist = C.train(
            model,
            loss_fn,
            opt,
            work.data,
            steps=s["steps"],
            batch_size=work.batch_size,
            seed=seed,
            scheduler=paper_schedule(opt, s["steps"]),
        )
        out[name] = {
            "train_loss": C.final(hist, "train_loss"),
            "train_acc": C.final(hist, "train_acc"),
            "val_acc": C.final(hist, "val_acc"),
            "val_loss": C.final(hist, "val_loss"),
            "diverged": hist["diverged"],
        }
    return out


def run(
    out_dir, *, scale: str = "fast", seed: int = 0, device: str = "cpu", progress: bool = False
) -> dict:
    """Run the experiment (module docstring); returns the JSON content (keys: FIELDS)."""
    dev, rec, s, seeds = C.begin(sys.modules[__name__], out_dir, scale, seed, device)
    per_seed = C.per_seed(lambda sd: _seed_runs(sd, s, scale, dev), seeds, progress, NAME)

    def diff(a: str, b: str) -> list[float]:
        return [r[a]["val_acc"] - r[b]["val_acc"] for r in per_seed]

    accs = "; ".join(
        f"{n}: " + ", ".join(f"{r[n]['val_acc']:.4f}" for r in per_seed) for n in OPTIMIZERS
    )
    checks = [
        C.claim_check(
            "plain Adam generalises worse than SGD (the gap Table 2 closes)",
            "val acc(SGD) - val acc(Adam)",
            diff("SGD", "Adam"),
            direction=+1,
            evidence=f"validation accuracy per seed: {accs}",
            caveat="digits may have no adaptive generalisation gap to close; the paper's "
            "setting is `--scale paper`",
        ),
        C.claim_check(
            "raising Adam's damping improves its generalisation",
            "val acc(Adam-D) - val acc(Adam)",
            diff("Adam-D", "Adam"),
            direction=+1,
            evidence=f"Adam-D eps = {s['adam_d_eps']:g}",
        ),
        C.claim_check(
            "Adam with raised damping matches SGD (within one accuracy point or better)",
            "val acc(Adam-D) - val acc(SGD)",
            diff("Adam-D", "SGD"),
            direction=+1,
            threshold=-0.01,
            caveat="the one-point margin is ours",
        ),
    ]
    runs = [{"seed": sd, "optimizer": n, **r[n]} for sd, r in zip(seeds, per_seed) for n in r]
    rec.csv(runs)
    summary = {
        n: {
            key: stats.mean_se([r[n][key] for r in per_seed])[:2]
            for key in ("val_acc", "train_loss", "val_loss")
        }
        for n in OPTIMIZERS
    }
    _figure(rec, per_seed, seeds)
    rows = [
        {
            "optimizer": n,
            "setting": {
                "SGD": f"lr {s['sgd_lr']:g}, momentum {MOMENTUM}",
                "Adam": f"lr {s['adam_lr']:g}, eps {ADAM_EPS:g}",
                "Adam-D": f"lr {s['adam_lr']:g}, eps {s['adam_d_eps']:g}",
            }[n],
            "val acc (%)": f"{100 * v['val_acc'][0]:.2f} ± {100 * v['val_acc'][1]:.2f}",
            "final train loss": f"{v['train_loss'][0]:.2g} ± {v['train_loss'][1]:.1g}",
        }
        for n, v in summary.items()
    ]
    body = (
        f"Mean ± SE over seeds {seeds}, after {s['steps']} steps (eq. 12 schedule):\n\n"
        + C.markdown_table(rows, list(rows[0]))
    )
    setting = {"model": describe_workload(scale), "schedule": "eq. 12", **s}
    return rec.finish(setting, checks, {"runs": runs, "summary": summary}, body)


def _figure(rec: C.Recorder, per_seed: list[dict], seeds: list[int]) -> None:
    fig, axes = C.new_figure()
    ax = axes[0, 0]
    for i, n in enumerate(OPTIMIZERS):
        vals = [100 * r[n]["val_acc"] for r in per_seed]
        ax.plot([i] * len(vals), vals, "o", color=f"C{i}", alpha=0.7)
        mean, se, _ = stats.mean_se(vals)
        ax.errorbar([i + 0.15], [mean], yerr=[se], fmt="s", color="k", capsize=4)
    ax.set_xticks(range(len(OPTIMIZERS)), list(OPTIMIZERS))
    ax.set_ylabel("validation accuracy (%)")
    ax.set_title(f"seeds {seeds} (black: mean ± SE)")
    rec.figure(fig)
