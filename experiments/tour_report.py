"""The tour's figures and ``report.md``, drawn from its results alone.

:mod:`curvlab.experiments.tour` computes and hands its results (``results.json``'s content)
to :func:`figures` and :func:`report`, so a report can be redrawn from a saved
``results.json`` without recomputing anything.
"""

from __future__ import annotations

import math
from pathlib import Path

from . import _common as C
from .registry import EXPERIMENTS


def figures(out_dir: Path, results: dict) -> list[str]:
    """Draw ``autodamping.png`` (and ``backends.png`` when a backend ran) into ``out_dir``
    from the tour's results; return the file names."""
    files = [_autodamping_figure(out_dir, results["autodamping"])]
    ok = [r for r in results["backends"] if "values" in r]
    if ok:
        fig, axes = C.new_figure(width=7)
        ax = axes[0, 0]
        for i, r in enumerate(ok):
            ax.plot(
                range(1, len(r["values"]) + 1),
                r["values"],
                "o-" if i < 4 else "s--",
                label=f"{r['label']} ({r['n_matvecs']} matvecs)",
            )
        ax.set_xlabel("eigenvalue index")
        ax.set_ylabel("eigenvalue")
        ax.set_yscale("log")
        ax.set_title("top eigenvalues by backend and method")
        ax.legend(fontsize=7)
        fig.savefig(out_dir / "backends.png", dpi=110)
        files.append("backends.png")
    return files


def _autodamping_figure(out_dir: Path, ad: dict) -> str:
    """Train loss, validation accuracy, and eps against the step: the flat runs as
    horizontal lines, each learned run's smoothed eps with its raw estimates ± stderr."""
    fig, axes = C.new_figure(3, width=4.3)
    for i, (label, r) in enumerate(ad["runs"].items()):
        h, color = r["history"], f"C{i}"
        style = "-" if r["learned"] else "--"
        axes[0, 0].plot(h["step"], h["train_loss"], style, color=color, label=label)
        axes[0, 1].plot(h["step"], h["val_acc"], style, color=color, label=label)
        if not r["learned"]:
            axes[0, 2].axhline(r["eps_start"], ls="--", color=color, label=label)
            continue
        d = r["damping_history"]
        steps = [p["step"] for p in d]
        axes[0, 2].plot(  # from the start value through every smoothed update
            [0, *steps],
            [r["eps_start"], *(p["damping"] for p in d)],
            "-o",
            ms=3,
            color=color,
            label=f"{label}: eps",
        )
        axes[0, 2].errorbar(
            steps,
            [p["estimate"] for p in d],
            yerr=[p["stderr"] for p in d],
            fmt="x",
            color="k",
            alpha=0.6,
            label="raw noise estimates (± stderr)",
        )
    axes[0, 0].set_yscale("log")
    axes[0, 0].set_title("train loss (dashed: flat eps)")
    axes[0, 1].set_title("validation accuracy")
    axes[0, 2].set_title(f"eps: learned from {ad['eps_start']:g} vs flat")
    axes[0, 2].set_yscale("log")
    for ax in axes[0]:
        ax.set_xlabel("step")
        ax.legend(fontsize=6)
    fig.savefig(out_dir / "autodamping.png", dpi=110)
    return "autodamping.png"


def _fmt(v, spec=".4g") -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "—"
    return format(v, spec)


def report(results: dict) -> str:
    """The tour's ``report.md`` from its results (``results.json``'s content)."""
    sp, nz, sh, ad = (results[k] for k in ("spectrum", "noise", "shrinkage", "autodamping"))
    tr = results["training"]
    lines = [
        "# curvlab tour: curvature of a digits classifier",
        "",
        f"`{results['command']}` — {results['wall_time_s']:.0f} s on "
        f"{results['environment']['platform']} ({results['environment']['threads']} torch "
        f"threads, device `{results['device']}`), curvlab {results['environment']['curvlab']}, "
        f"torch {results['environment']['torch']}.",
        "",
        f"Model: {tr['model']} (P={sp['num_params']}) trained with Adam (lr {tr['lr']}, "
        f"batch {tr['batch_size']}) for {tr['steps']} steps on {tr['n_train']} digits: train "
        f"accuracy {tr['train_acc']:.3f}, validation accuracy {tr['val_acc']:.3f} "
        f"({tr['n_val']} held out).",
        "",
        "## 1. Hessian spectrum (paper section 4)",
        "",
        f"Stochastic Lanczos quadrature ({sp['slq_matvecs']} matvecs) and the top "
        f"{len(sp['top_eigenvalues'])} eigenvalues by restarted Lanczos "
        f"({sp['lanczos_matvecs']} matvecs, converged: "
        f"{sp['lanczos_converged']}) of the Hessian over {sp['samples']} training samples. "
        f"P^-1 Tr H = {sp['trace_per_param']:.3g}.",
        "",
    ]
    if sp.get("n_outliers") is None:
        lines.append(f"Bulk fit failed: {sp.get('bulk_fit_error')}")
    else:
        n_out, n_cls = sp["n_outliers"], sp["n_classes"]
        lower_bound = n_out == len(sp["top_eigenvalues"])  # every computed one is beyond
        count = f"at least {n_out}" if lower_bound else str(n_out)
        verdict = (
            "more than"
            if n_out > n_cls
            else ("not yet conclusive about" if lower_bound else "consistent with")
        )
        lines.append(
            f"Fitted semicircle bulk [{sp['edge_left']:.3g}, {sp['edge_right']:.3g}] "
            f"(+ Tracy-Widom margin {sp['tracy_widom_margin']:.2g}); **{count} outliers** "
            f"beyond it: {', '.join(f'{v:.3g}' for v in sp['outliers'])}"
            + (" (every computed eigenvalue lies beyond the edge)" if lower_bound else "")
            + f". That is {verdict} the paper's expectation of at most as many outliers as "
            f"classes ({n_cls}); a trained network's bulk is not a semicircle, so the fitted "
            "edge is a moment-matched approximation (curvlab.rmt.fit_bulk_edge)."
        )
        n_noise = sp["noise_n_outliers"]
        noise_bound = n_noise == len(sp["top_eigenvalues"])
        lines.append(
            f"\nCalibrated instead by the measured noise (sigma^2 = s2/N = "
            f"{sp['noise_sigma'] ** 2:.3g} for the {sp['samples']}-sample Hessian, "
            f"curvlab.noise), the noise edge is {sp['noise_edge_right']:.3g} and "
            f"**{'at least ' if noise_bound else ''}{n_noise} outliers** lie beyond it "
            f"({'more than' if n_noise > n_cls else 'at most'} the {n_cls} classes)."
        )
    lines += [
        "",
        "![spectrum](spectrum.png)",
        "",
        "## 2. Top eigenvalues from every installed backend",
        "",
        f"Top {results['setting']['backend_k']} eigenvalues on "
        f"{results['setting']['backend_samples']} training samples. Lanczos runs to "
        "tol 1e-8; PyHessian's power iteration runs at its defaults (maxIter 100, tol "
        "1e-3). Agreement is the largest relative difference to the reference row "
        "(the exact Hessian, or for KFAC the exact GGN it approximates).",
        "",
        "| backend / curvature / method | top eigenvalues | matvecs | seconds | "
        "max rel. diff | reference |",
        "|---|---|---|---|---|---|",
    ]
    for r in results["backends"]:
        if "values" not in r:
            lines.append(f"| {r['label']} | {r.get('error', '')} | | | | |")
            continue
        vals = ", ".join(f"{v:.6g}" for v in r["values"])
        lines.append(
            f"| {r['label']} | {vals} | {r['n_matvecs']} | {r['seconds']:.2f} | "
            f"{_fmt(r.get('max_rel_diff'), '.1e')} | {r['reference'] or '(reference)'} |"
        )
    lines += [
        "",
        "KFAC is an approximation of the GGN (Kronecker factors per layer), not of the "
        "Hessian: its difference to the exact GGN measures the approximation, not an "
        "error of curvlab.",
        "",
        "![backends](backends.png)",
        "",
        "## 3. Noise-variance damping (paper eq. 15, sections 6-7)",
        "",
        f"delta = P^-1 E||H_B - H||_F^2 for batches of B={nz['batch_size']} drawn from "
        f"N={nz['population']} (unbiased estimator, {nz['n_probes']} probes over "
        f"{nz['samples']} per-sample Hessians, {nz['n_matvecs']} per-sample products, "
        f"{nz['seconds']:.1f} s):",
        "",
        f"**delta = {nz['damping']:.4g} ± {nz['stderr']:.2g}** (standard error), i.e. "
        f"shrinkage beta = 1/(1 + delta) = {nz['shrinkage_beta']:.4f}. With lambda_1 = "
        f"{nz['lambda_1']:.4g}, R_est-curv = 1 + (lambda_1 - lambda_P)/delta = "
        f"{_fmt(nz['r_est_curv'])}, against {nz['r_est_curv_adam_default']:.3g} for "
        "Adam's default eps = 1e-8.",
        "",
        "## 4. Shrinkage estimators against the true Hessian",
        "",
    ]
    if "error" in sh:
        lines += [f"The comparison failed: {sh['error']}", ""]
    else:
        lines += [
            f"{sh['model']}; truth: the {sh['truth']}; batches of "
            f"{', '.join(map(str, sh['batch_sizes']))} samples, {sh['repeats']} "
            "repeat(s). Frobenius = ||H_hat - H||_F^2 / P (lower is better), overlap_1 = "
            "|<u_1, u_hat_1>|^2.",
            "",
            C.markdown_table(
                sh["table"],
                ["estimator", "batch_size", "frobenius", "spectral", "overlap_1", "damping"],
            ),
            "Lowest Frobenius error: "
            + ", ".join(f"B={b}: {n}" for b, n in sh["best_by_batch_size"].items())
            + ".",
            "",
            "![shrinkage](shrinkage.png)",
            "",
        ]
    lines += [
        "## 5. Learned damping for Adam (paper section 7.3)",
        "",
        f"{ad['optimizer']}, {ad['steps']} steps. The learned eps starts at Adam's default "
        f"{ad['eps_start']:g}, far below the noise, and is re-estimated as the Hessian noise "
        f"variance every {ad['update_every']} steps on a fixed subsample of {ad['subsample']} "
        "samples (EMA 0.7, floor = the start value); the flat runs keep eps at Adam's "
        f"default and at the noise measured in section 3 ({ad['noise_eps']:.3g}).",
        "",
        "| run | final eps | train loss | val accuracy |",
        "|---|---|---|---|",
    ]
    for label, r in ad["runs"].items():
        lines.append(
            f"| {label} | {r['final_eps']:.3g} | {_fmt(r['train_loss'])} | "
            f"{_fmt(r['val_acc'], '.3f')} |"
        )
    for label, r in ad["runs"].items():
        d = r["damping_history"]
        if d:
            lines.append(
                f"\n{label}: eps went from {ad['eps_start']:g} to {d[0]['damping']:.3g} at the "
                f"first estimate ({d[0]['estimate']:.3g} ± {d[0]['stderr']:.2g}) and ended at "
                f"{r['final_eps']:.3g} after {len(d)} estimates "
                f"({sum(not p['accepted'] for p in d)} rejected)."
            )
    lines += [
        "",
        "![autodamping](autodamping.png)",
        "",
        "The paper-claim experiments (`curvlab experiment NAME`, NAME in "
        + ", ".join(EXPERIMENTS)
        + ") test each claim over seeds with a computed verdict.",
        "",
    ]
    return "\n".join(lines)
