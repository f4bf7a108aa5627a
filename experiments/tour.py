"""``curvlab tour``: what curvlab measures, on scikit-learn's digits, in one folder.

1. Train an MLP 64-32-10 (tanh, float64, P = 2410) briefly on digits.
2. Its Hessian spectrum: stochastic Lanczos quadrature density and Lanczos top eigenvalues,
   with the fitted noise bulk, its edge and the outliers (paper section 4).
3. The top eigenvalues from every installed backend side by side, with their matvec counts,
   wall times and agreement: curvlab's Lanczos on the Hessian through autograd, BackPACK
   and PyHessian, PyHessian's own power iteration, and KFAC (curvlinops) against the exact
   GGN it approximates.
4. The noise-variance damping delta = P^-1 E||H_B - H||_F^2 for the training batch size, with
   its standard error, and the implied shrinkage and R_est-curv (paper sections 6-7).
5. The shrinkage comparison (``curvlab.shrinkage.compare``) on the digits softmax-regression
   Hessian, where the full-data Hessian is the truth.
6. A short training run with Adam whose eps is learned by a LinearShrinkageDamper from
   Adam's default 1e-8 (below the noise), against flat eps = 1e-8 and flat eps = the
   measured noise (paper section 7.3); the damper's trajectory is plotted with them.

This module computes; :mod:`curvlab.experiments.tour_report` draws the figures and writes
``report.md`` from the results alone. Writes ``report.md``, ``results.json`` (keys:
:data:`FIELDS`) and PNG figures.
"""

from __future__ import annotations

import json
import math
import platform
import time
import warnings
from pathlib import Path

import torch
from torch import nn

import curvlab
from curvlab import rmt
from curvlab.errors import CurvlabError, CurvlabWarning
from curvlab.optim import adam_with_learned_eps
from curvlab.progress import track

from . import _common as C
from . import tour_report
from .dampers import DAMPER_CONFIGS, damping_history, make_damper
from .data import load_sklearn

FIELDS = (
    "command",  # the CLI line that reproduces the run
    "fast",
    "seed",
    "device",
    "environment",  # versions, threads, platform
    "setting",  # sizes used by each section
    "training",  # the trained MLP: steps, accuracies
    "spectrum",  # top eigenvalues, bulk edge, outliers, matvecs
    "backends",  # per backend/method: top eigenvalues, matvecs, seconds, agreement
    "noise",  # noise-variance damping with its standard error
    "shrinkage",  # compare() records summarised per estimator and batch size
    "autodamping",  # learned vs flat eps runs
    "timings",  # seconds per section
    "files",
    "wall_time_s",
)

SETTINGS = {
    True: {
        "train_steps": 150,
        "spectrum_samples": 512,
        "k": 12,
        "slq_probes": 4,
        "slq_steps": 40,
        "backend_samples": 256,
        "backend_k": 5,
        "noise_samples": 512,
        "noise_probes": 4,
        "compare_batches": (32, 128),
        "compare_repeats": 1,
        "compare_probes": 10,
        "damp_steps": 150,
        "damp_update_every": 25,
        "damp_subsample": 256,
    },
    False: {
        "train_steps": 600,
        "spectrum_samples": 1348,
        "k": 40,
        "slq_probes": 16,
        "slq_steps": 100,
        "backend_samples": 1348,
        "backend_k": 5,
        "noise_samples": 1348,
        "noise_probes": 20,
        "compare_batches": (16, 64, 256),
        "compare_repeats": 3,
        "compare_probes": 30,
        "damp_steps": 1500,
        "damp_update_every": 100,
        "damp_subsample": 1024,
    },
}
BATCH = 64
HIDDEN = 32
LR = 1e-2
EPS_START = 1e-8  # the learned eps starts at Adam's default, below the noise


def _mlp(seed: int, dev) -> nn.Module:
    return C.seeded(seed, lambda: C.mlp(64, HIDDEN, 10).to(torch.float64).to(dev))


def _timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


# --------------------------------------------------------------------------- sections


def spectrum(model, loss_fn, data, s, seed, out_dir: Path) -> dict:
    x, y = data.x_train[: s["spectrum_samples"]], data.y_train[: s["spectrum_samples"]]
    est = curvlab.estimator("autograd", model, loss_fn, (x, y))
    top, t_top = _timed(lambda: est.eigenpairs(k=s["k"], tol=1e-6, seed=seed))
    density, t_slq = _timed(
        lambda: est.spectral_density(n_probes=s["slq_probes"], n_steps=s["slq_steps"], seed=seed)
    )
    info = {
        "samples": int(x.shape[0]),
        "num_params": est.num_params,
        "top_eigenvalues": top.values,
        "lanczos_matvecs": top.n_matvecs,
        "lanczos_converged": top.converged,
        "lanczos_seconds": t_top,
        "slq_matvecs": density.n_matvecs,
        "slq_seconds": t_slq,
        "trace_per_param": density.integrate(lambda t: t),
        "smallest_node": float(density.nodes.min()),
        "n_classes": 10,
    }
    from curvlab.plotting import plot_spectral_density

    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", CurvlabWarning)
            fit = rmt.fit_bulk_edge(top, density=density, size=est.num_params)
        info["bulk_fit_warnings"] = [str(w.message) for w in caught]
    except CurvlabError as exc:
        info.update(bulk_fit_error=str(exc), n_outliers=None)
        fit = None
    else:
        info.update(
            edge_left=fit.edge_left,
            edge_right=fit.edge_right,
            tracy_widom_margin=fit.tracy_widom_margin,
            outliers=fit.outliers,
            n_outliers=fit.n_outliers,
            bulk_sigma=fit.sigma,
        )
    # The paper's model H_N = H_true + X: the noise of the N-sample Hessian has variance
    # sigma^2 = s2 / N (batches drawn i.i.d.), so its semicircle edge is 2 sigma.
    noise = est.noise_variance(
        batch_size=est.num_samples, n_probes=5, population=math.inf, seed=seed
    )
    with warnings.catch_warnings(record=True) as caught:  # reported as the lower bound
        warnings.simplefilter("always", CurvlabWarning)
        calibrated = rmt.fit_bulk_edge(
            top, density=density, size=est.num_params, sigma=math.sqrt(max(noise.value, 0.0))
        )
    info.setdefault("bulk_fit_warnings", []).extend(str(w.message) for w in caught)
    info.update(
        noise_sigma=math.sqrt(max(noise.value, 0.0)),
        noise_edge_right=calibrated.edge_right,
        noise_outliers=calibrated.outliers,
        noise_n_outliers=calibrated.n_outliers,
    )
    plot_spectral_density(
        density,
        top,
        fit,
        path=out_dir / "spectrum.png",
        title=f"Hessian of MLP 64-{HIDDEN}-10 on digits (P={est.num_params})",
    )
    est.release()
    return info


HESSIAN_REF = "autograd / Hessian / Lanczos"
#: (label, backend, curvature, method, reference label) in display order.
BACKEND_JOBS = (
    (HESSIAN_REF, "autograd", "hessian", "lanczos", None),
    ("backpack / Hessian / Lanczos", "backpack", "hessian", "lanczos", HESSIAN_REF),
    ("pyhessian / Hessian / Lanczos", "pyhessian", "hessian", "lanczos", HESSIAN_REF),
    ("pyhessian / Hessian / its power iteration", "pyhessian", "hessian", "power", HESSIAN_REF),
    ("autograd / GGN / Lanczos", "autograd", "ggn", "lanczos", HESSIAN_REF),
    (
        "kfac / GGN (KFAC approximation) / Lanczos",
        "kfac",
        "ggn",
        "lanczos",
        "autograd / GGN / Lanczos",
    ),
)


def backends(model, loss_fn, data, s, seed) -> list[dict]:
    x, y = data.x_train[: s["backend_samples"]], data.y_train[: s["backend_samples"]]
    available = curvlab.backends()
    rows: dict[str, dict] = {}
    k = s["backend_k"]
    for label, backend, curvature, method, ref in BACKEND_JOBS:
        row = {
            "label": label,
            "backend": backend,
            "curvature": curvature,
            "method": method,
            "reference": ref,
            "approximation": backend == "kfac",
        }
        rows[label] = row
        if not available[backend].available:
            row["error"] = f"not installed ({available[backend].install_hint})"
            continue
        try:
            est = curvlab.estimator(backend, model, loss_fn, (x, y), curvature=curvature)
            if method == "power":  # PyHessian's eigenvalues() at its defaults
                pairs, secs = _timed(
                    lambda est=est: est.power_eigenvalues(top_n=k, maxIter=100, tol=1e-3, seed=seed)
                )
            else:
                pairs, secs = _timed(lambda est=est: est.eigenpairs(k=k, tol=1e-8, seed=seed))
            est.release()
        except (CurvlabError, RuntimeError, NotImplementedError) as exc:
            row["error"] = f"{type(exc).__name__}: {exc}"
            continue
        row.update(
            values=pairs.values.tolist(),
            n_matvecs=pairs.n_matvecs,
            seconds=secs,
            converged=pairs.converged,
        )
        if ref is not None and "values" in rows[ref]:
            truth = torch.tensor(rows[ref]["values"], dtype=torch.float64)
            got = torch.tensor(row["values"], dtype=torch.float64)
            row["max_rel_diff"] = float(((got - truth).abs() / truth.abs()).max())
    return list(rows.values())


def noise(model, loss_fn, data, s, seed, spec: dict) -> dict:
    n = s["noise_samples"]
    est = curvlab.estimator("autograd", model, loss_fn, (data.x_train[:n], data.y_train[:n]))
    ne, secs = _timed(
        lambda: est.noise_variance(
            batch_size=BATCH, n_probes=s["noise_probes"], population=data.n_train, seed=seed
        )
    )
    est.release()
    lam1 = float(spec["top_eigenvalues"][0])
    lam_p = min(spec["smallest_node"], 0.0)
    return {
        "batch_size": BATCH,
        "samples": n,
        "population": data.n_train,
        "damping": ne.value,
        "stderr": ne.stderr,
        "n_probes": s["noise_probes"],
        "n_matvecs": ne.n_matvecs,
        "seconds": secs,
        "shrinkage_beta": 1.0 / (1.0 + ne.value),
        "lambda_1": lam1,
        "lambda_P_estimate": lam_p,
        "r_est_curv": float(rmt.r_est_curv(lam1, lam_p, ne.value)) if ne.value > 0 else math.nan,
        "r_est_curv_adam_default": float(rmt.r_est_curv(lam1, lam_p, 1e-8)),
    }


def shrinkage(data, s, seed, dev, out_dir: Path) -> dict:
    from curvlab.shrinkage import (
        OAS,
        EigenvalueClipping,
        LedoitWolf,
        RMTLinear,
        RotationInvariant,
        compare,
    )

    loss_fn = nn.CrossEntropyLoss()
    model = C.seeded(seed, lambda: nn.Linear(64, 10).to(torch.float64).to(dev))
    C.train(
        model,
        loss_fn,
        torch.optim.Adam(model.parameters(), lr=1e-2),
        data,
        steps=100,
        batch_size=BATCH,
        seed=seed,
    )
    truth = curvlab.estimator("autograd", model, loss_fn, data.train())
    p = s["compare_probes"]
    estimators = {
        "LedoitWolf": LedoitWolf(n_probes=p, seed=seed, store_precision=False),
        "OAS": OAS(n_probes=p, seed=seed, store_precision=False),
        "RMTLinear": RMTLinear(n_probes=p, seed=seed, store_precision=False),
        "EigenvalueClipping": EigenvalueClipping(),
        "RotationInvariant": RotationInvariant(n_probes=p, seed=seed),
    }
    records = compare(
        truth,
        estimators,
        s["compare_batches"],
        n_repeats=s["compare_repeats"],
        seed=seed,
        csv_path=out_dir / "shrinkage.csv",
        plot_path=out_dir / "shrinkage.png",
    )
    table = []
    for name in dict.fromkeys(r["estimator"] for r in records):
        for b in s["compare_batches"]:
            sub = [r for r in records if r["estimator"] == name and r["batch_size"] == b]
            row = {"estimator": name, "batch_size": b}
            for key in ("frobenius", "spectral", "overlap_1", "damping"):
                vals = [r[key] for r in sub if r.get(key) is not None]
                row[key] = sum(vals) / len(vals) if vals else None
            table.append(row)
    return {
        "model": "softmax regression 64 -> 10 (P=650), float64, 100 Adam steps",
        "truth": f"full-data Hessian ({data.n_train} samples)",
        "batch_sizes": s["compare_batches"],
        "repeats": s["compare_repeats"],
        "table": table,
        "best_by_batch_size": {
            b: min((r for r in table if r["batch_size"] == b), key=lambda r: r["frobenius"])[
                "estimator"
            ]
            for b in s["compare_batches"]
        },
    }


def autodamping(data, s, seed, dev, progress: bool, noise_value: float) -> dict:
    """Adam with eps learned from Adam's default 1e-8 (below the noise) by curvlab's default
    rule (DAMPER_CONFIGS[0]), against flat eps = 1e-8 and flat eps = the measured noise
    (section 3)."""
    loss_fn = nn.CrossEntropyLoss()
    train_set = data.train()
    flat = [
        ("flat eps=1e-8 (Adam default)", 1e-8),
        (f"flat eps={noise_value:.2g} (the noise)", noise_value),
    ]
    jobs = [(label, eps, None) for label, eps in flat]
    rule = DAMPER_CONFIGS[0]  # curvlab's default; the experiments compare every rule
    jobs.append((f"learned eps from {EPS_START:g} ({rule.label})", EPS_START, rule))
    runs = {}
    for label, eps, config in jobs:
        model = _mlp(seed, dev)
        damper = after = None
        if config is None:
            opt = torch.optim.Adam(model.parameters(), lr=LR, eps=eps)
        else:
            damper = make_damper(
                config,
                eps,
                batch_size=BATCH,
                update_every=s["damp_update_every"],
                seed=seed,
                n_probes=4,
                subsample=s["damp_subsample"],
                population=data.n_train,
            )
            opt = adam_with_learned_eps(model.parameters(), damper, lr=LR)

            def after(step, batch, damper=damper, model=model):
                damper.step(model, loss_fn, train_set)

        hist = C.train(
            model,
            loss_fn,
            opt,
            data,
            steps=s["damp_steps"],
            batch_size=BATCH,
            seed=seed,
            after_step=after,
            eval_every=max(s["damp_steps"] // 15, 1),
            progress=progress,
            desc=f"tour: Adam {label}",
        )
        runs[label] = {
            "learned": config is not None,
            "eps_start": eps,
            "train_loss": C.final(hist, "train_loss"),
            "train_acc": C.final(hist, "train_acc"),
            "val_acc": C.final(hist, "val_acc"),
            "val_loss": C.final(hist, "val_loss"),
            "diverged": hist["diverged"],
            "final_eps": opt.param_groups[0]["eps"],
            "history": hist,
            "damping_history": [] if damper is None else damping_history(damper),
        }
    return {
        "optimizer": f"Adam lr={LR}, batch {BATCH}",
        "steps": s["damp_steps"],
        "update_every": s["damp_update_every"],
        "subsample": s["damp_subsample"],
        "eps_start": EPS_START,
        "noise_eps": noise_value,
        "runs": runs,
    }


def run(
    out_dir, *, fast: bool = False, seed: int = 0, device: str = "cpu", progress: bool = False
) -> dict:
    """Run the tour (module docstring) into ``out_dir``; returns results.json's content."""
    start = time.perf_counter()
    dev = C.check_args("fast", seed, device)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    s = SETTINGS[bool(fast)]
    data = load_sklearn("digits", device=dev, seed=seed)
    loss_fn = nn.CrossEntropyLoss()
    steps = ["train", "spectrum", "backends", "noise", "shrinkage", "autodamping"]
    bar = track(steps, "curvlab tour", progress=progress)
    results: dict = {"timings": {}}
    for step in bar:
        started = time.perf_counter()
        if step == "train":
            model = _mlp(seed, dev)
            hist = C.train(
                model,
                loss_fn,
                torch.optim.Adam(model.parameters(), lr=LR),
                data,
                steps=s["train_steps"],
                batch_size=BATCH,
                seed=seed,
            )
            model.eval()
            results["training"] = {
                "model": f"MLP 64-{HIDDEN}-10 (tanh, float64)",
                "lr": LR,
                "batch_size": BATCH,
                "steps": s["train_steps"],
                "n_train": data.n_train,
                "n_val": data.n_val,
                "train_acc": C.final(hist, "train_acc"),
                "val_acc": C.final(hist, "val_acc"),
                "train_loss": C.final(hist, "train_loss"),
            }
        elif step == "spectrum":
            results["spectrum"] = spectrum(model, loss_fn, data, s, seed, out)
        elif step == "backends":
            results["backends"] = backends(model, loss_fn, data, s, seed)
        elif step == "noise":
            results["noise"] = noise(model, loss_fn, data, s, seed, results["spectrum"])
        elif step == "shrinkage":
            try:
                results["shrinkage"] = shrinkage(data, s, seed, dev, out)
            except CurvlabError as exc:
                results["shrinkage"] = {"error": f"{type(exc).__name__}: {exc}", "table": []}
        else:
            results["autodamping"] = autodamping(
                data, s, seed, dev, progress, results["noise"]["damping"]
            )
        results["timings"][step] = time.perf_counter() - started
    files = ["spectrum.png", *tour_report.figures(out, C.jsonable(results))]
    if (out / "shrinkage.png").exists():
        files += ["shrinkage.png", "shrinkage.csv"]
    results.update(
        command=f"curvlab tour{' --fast' if fast else ''} --seed {seed} --device {device}",
        fast=bool(fast),
        seed=seed,
        device=str(dev),
        setting=s,
        environment={
            "curvlab": curvlab.__version__,
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "platform": platform.platform(),
            "python": platform.python_version(),
        },
        files=[*files, "report.md", "results.json"],
        wall_time_s=time.perf_counter() - start,
    )
    results = C.jsonable({k: results[k] for k in FIELDS})
    (out / "report.md").write_text(tour_report.report(results))
    with open(out / "results.json", "w") as fh:
        json.dump(results, fh, indent=1, allow_nan=False)
    return results
