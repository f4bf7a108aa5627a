"""Shared plumbing of the experiments: arguments, seeds, verdicts, output files, training.

Every experiment module defines ``NAME``, ``TITLE``, ``CLAIM`` (the paper's statement),
``PAPER_SETTING``, ``SETTINGS`` (per scale, each with ``"seeds"``: how many), ``FIELDS`` (the
top-level keys of its JSON, :data:`COMMON_FIELDS` first) and ``run(out_dir, *, scale="fast",
seed=0, device="cpu", progress=False) -> dict``. ``run`` uses the seeds ``seed, seed + 1,
...`` and writes ``<NAME>.json``, ``<NAME>.csv`` (and more CSVs), PNG figures and
``<NAME>.md`` (its report section) into ``out_dir``, and returns the JSON's content.

Verdicts follow the one rule of :mod:`curvlab.experiments.stats` (claims about networks,
:class:`Check`); checks that curvlab's own maths is right (simulated random-matrix models,
unbiasedness of an estimator) are :class:`LibraryCheck` and never decide a verdict.
"""

from __future__ import annotations

import csv
import json
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

import curvlab
from curvlab._params import resolve_device
from curvlab.errors import InvalidInputError
from curvlab.progress import track
from curvlab.validation import check_choice, check_int

from . import stats
from .registry import SCALES

#: Keys every experiment's JSON has (documented in each module's FIELDS).
COMMON_FIELDS = (
    "experiment",  # module name
    "title",
    "claim",  # the paper's statement under test
    "paper_setting",  # what the paper ran (and what --scale paper runs here)
    "setting",  # what this run used (sizes, grids, steps)
    "scale",  # "smoke" | "fast" | "paper"
    "seeds",  # the seeds run, in order (every per-seed list follows this order)
    "device",
    "checks",  # the paper's claims: list of Check.as_dict() (verdict, effect per seed)
    "library_checks",  # curvlab's maths: list of LibraryCheck.as_dict() (no verdict)
    "verdict",  # "supports" | "contradicts" | "inconclusive" (stats.combine of the checks)
    "supports",  # the verdict as True / False / None (read by the CLI)
    "files",  # files written, relative to out_dir
    "wall_time_s",
)


#: curvlab.optim.KFAC's refresh intervals in every experiment: factors and their
#: eigendecompositions every 10 steps (3.3x cheaper per step than every step on the digits
#: CNN, and the usual practice for KFAC).
KFAC_OPTIONS = {"factor_update_every": 10, "inverse_update_every": 10}


# --------------------------------------------------------------------------- arguments


def check_args(scale: str, seed: int, device) -> torch.device:
    """Validate ``scale`` and ``seed``; return the resolved device."""
    check_choice("scale", scale, SCALES)
    check_int("seed", seed, minimum=0)
    return resolve_device(device)


def seed_list(first: int, count: int) -> list[int]:
    """The seeds ``first, first + 1, ..., first + count - 1``."""
    return list(range(first, first + count))


def per_seed(fn: Callable[[int], Any], seeds: list[int], progress: bool, desc: str) -> list[Any]:
    """``[fn(seed) for seed in seeds]`` with a progress bar over the seeds."""
    return [fn(seed) for seed in track(seeds, f"{desc}: seeds", progress=progress)]


# --------------------------------------------------------------------------- verdicts


@dataclass(frozen=True)
class Check:
    """A claim of the paper about networks, decided by a per-seed effect (stats.effect).

    ``measure`` says what the effect is (one number per seed); ``evidence`` gives the
    underlying numbers; ``caveat`` what besides more seeds would change the verdict.
    ``effect`` None means the runs could not measure it (verdict inconclusive).
    """

    claim: str
    measure: str
    effect: stats.Effect | None
    evidence: str
    caveat: str = ""

    @property
    def verdict(self) -> str:
        return stats.INCONCLUSIVE if self.effect is None else self.effect.verdict

    def would_change(self) -> str:
        """What would change the verdict: the margin in standard errors, the seeds needed,
        and the caveat."""
        e = self.effect
        parts = []
        if e is None or e.n < stats.MIN_SEEDS:
            parts.append(f"at least {stats.MIN_SEEDS} seeds with a finite value")
        elif self.verdict == stats.INCONCLUSIVE:
            need = e.seeds_for_verdict()
            offset = (e.mean - e.threshold) * e.direction
            if abs(offset) <= 1e-12 * max(1.0, abs(e.threshold)):
                where = "the mean equals it" + (
                    " on every seed (the compared runs end identically)"
                    if e.stderr == 0 else ""
                )
            else:
                where = f"the mean is on the {'claimed' if offset > 0 else 'opposite'} side"
            parts.append(
                f"the 95% interval contains the threshold {e.threshold:g}; {where}"
                + (
                    f", and about {need} seeds would decide it if the mean and spread held"
                    if need
                    else ""
                )
            )
        else:
            margin = min(abs(e.low - e.threshold), abs(e.high - e.threshold))
            parts.append(
                f"the interval clears the threshold by {margin:.3g}; a shift of the mean by "
                "that much (other seeds, a larger scale) would make it inconclusive"
            )
        if self.caveat:
            parts.append(self.caveat)
        return "; ".join(parts) + "."

    def as_dict(self) -> dict:
        return {
            "claim": self.claim,
            "measure": self.measure,
            "verdict": self.verdict,
            "supports": as_supports(self.verdict),
            "effect": None if self.effect is None else self.effect.as_dict(),
            "evidence": self.evidence,
            "would_change": self.would_change(),
        }


def claim_check(
    claim: str,
    measure: str,
    values,
    *,
    direction: int,
    threshold: float = 0.0,
    evidence: str = "",
    caveat: str = "",
) -> Check:
    """A :class:`Check` whose effect is ``stats.effect(values, direction, threshold)``."""
    eff = stats.effect(values, direction=direction, threshold=threshold)
    return Check(claim, measure, eff, evidence, caveat)


@dataclass(frozen=True)
class LibraryCheck:
    """A check that curvlab computes the maths right (never a verdict on the paper)."""

    check: str
    passed: bool
    evidence: str

    def as_dict(self) -> dict:
        return {"check": self.check, "passed": bool(self.passed), "evidence": self.evidence}


def overall(checks: list[Check]) -> str:
    """The experiment's verdict: :func:`stats.combine` of its claim checks."""
    return stats.combine(c.verdict for c in checks)


def as_supports(verdict: str) -> bool | None:
    """Map "supports" to True, "contradicts" to False and "inconclusive" to None."""
    return {stats.SUPPORTS: True, stats.CONTRADICTS: False}.get(verdict)


def verdict_word(verdict) -> str:
    """SUPPORTS / CONTRADICTS / INCONCLUSIVE for a verdict string (or its True/False/None)."""
    if not isinstance(verdict, str):
        verdict = {True: stats.SUPPORTS, False: stats.CONTRADICTS}.get(verdict, stats.INCONCLUSIVE)
    return verdict.upper()


def claim_tally(checks: list[dict]) -> str:
    """How the claims of an experiment came out, such as ``"1 supports, 2 contradict"``.

    Examples
    --------
    >>> claim_tally([{"verdict": "supports"}, {"verdict": "contradicts"},
    ...              {"verdict": "contradicts"}])
    '1 supports, 2 contradict'
    """
    words = {stats.SUPPORTS: ("supports", "support"),
             stats.CONTRADICTS: ("contradicts", "contradict"),
             stats.INCONCLUSIVE: ("inconclusive", "inconclusive")}
    counts = [(sum(c["verdict"] == v for c in checks), forms) for v, forms in words.items()]
    return ", ".join(f"{n} {forms[n != 1]}" for n, forms in counts if n)


def report_section(results: dict, body: str) -> str:
    """The markdown section of one experiment: for each claim its setting, numbers with error
    bars, verdict and what would change it; then the library checks, the body, the files."""
    seeds = results["seeds"]
    lines = [
        f"## {results['title']}",
        "",
        f"**Paper's claim.** {results['claim']}",
        "",
        f"**Setting** (scale `{results['scale']}`, seeds {seeds}, device `{results['device']}`, "
        f"{results['wall_time_s']:.1f} s): {describe(results['setting'])}.",
        "",
        f"Paper's setting: {results['paper_setting']}",
        "",
        f"**Verdict: {verdict_word(results['verdict'])}** ({claim_tally(results['checks'])} "
        "of the claims below; contradicts if any claim does, supports if every claim does, "
        "inconclusive otherwise; each claim by the 95% t-interval of its per-seed effect "
        "against its threshold).",
        "",
    ]
    for i, c in enumerate(results["checks"], 1):
        e = c["effect"]
        numbers = "not measured" if e is None else _effect_text(e)
        lines += [
            f"{i}. **{c['claim']}** — {verdict_word(c['verdict'])}.",
            f"   Measure: {c['measure']}; claimed {_side(e)}. Result: {numbers}.",
        ]
        if e is not None:
            lines.append(
                "   Per seed: "
                + ", ".join(f"{s}: {_num(v)}" for s, v in zip(seeds, e["values"]))
                + "."
            )
        if c["evidence"]:
            lines.append(f"   Evidence: {c['evidence']}")
        lines.append(f"   What would change it: {c['would_change']}")
    if results["library_checks"]:
        lines += ["", "Library checks (curvlab's maths, not a claim of the paper):", ""]
        for c in results["library_checks"]:
            lines.append(
                f"- {'PASSED' if c['passed'] else 'FAILED'}: {c['check']} — {c['evidence']}"
            )
    lines += ["", body.strip(), ""]
    lines.append("Files: " + ", ".join(f"`{f}`" for f in results["files"]))
    return "\n".join(lines) + "\n"


def _num(v, fmt: str = ".3g") -> str:
    return "—" if v is None or not math.isfinite(v) else format(v, fmt)


def _side(e: dict | None) -> str:
    if e is None:
        return "—"
    return f"{'>' if e['direction'] > 0 else '<'} {e['threshold']:g}"


def _effect_text(e: dict) -> str:
    if e["n"] < 2:
        return f"{_num(e['mean'])} ({e['n']} finite seed(s))"
    return (
        f"{_num(e['mean'])} ± {_num(e['stderr'])} (mean ± SE, 95% CI [{_num(e['low'])}, "
        f"{_num(e['high'])}], {e['n']} seeds)"
    )


def pm(values, fmt: str = ".3g") -> str:
    """``mean ± SE`` of the finite values (an SE below 1e-12 of the mean shows as 0)."""
    mean, se, n = stats.mean_se(values)
    if n == 0:
        return "—"
    if n == 1 or not math.isfinite(se):
        return format(mean, fmt)
    if se <= 1e-12 * abs(mean):
        se = 0.0
    return f"{mean:{fmt}} ± {se:.2g}"


def describe(setting: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in setting.items())


# --------------------------------------------------------------------------- output


def jsonable(obj: Any) -> Any:
    """Tensors and arrays to lists, non-finite floats to None (strict JSON)."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return jsonable(obj.detach().cpu().tolist())
    if isinstance(obj, np.ndarray):
        return jsonable(obj.tolist())
    if isinstance(obj, (np.floating, float)):
        value = float(obj)
        return value if math.isfinite(value) else None
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.bool_,)):
        return bool(obj)
    return obj


def begin(module, out_dir, scale: str, seed: int, device):
    """Validate the arguments; return (device, Recorder, the scale's settings, seeds)."""
    dev = check_args(scale, seed, device)
    settings = module.SETTINGS[scale]
    seeds = seed_list(seed, settings["seeds"])
    return dev, Recorder(out_dir, module.NAME, module, scale, seeds, dev), settings, seeds


class Recorder:
    """Writes an experiment's files into ``out_dir`` and assembles its results dict."""

    def __init__(
        self, out_dir, name: str, module, scale: str, seeds: list[int], device: torch.device
    ):
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.name, self.module = name, module
        self.scale, self.seeds, self.device = scale, list(seeds), device
        self.files: list[str] = []
        self.start = time.perf_counter()

    def _add(self, filename: str) -> Path:
        if filename not in self.files:
            self.files.append(filename)
        return self.out_dir / filename

    def csv(self, rows: list[dict], suffix: str = "") -> str:
        filename = f"{self.name}{suffix}.csv"
        keys: list[str] = []
        for row in rows:
            keys += [k for k in row if k not in keys]
        with open(self._add(filename), "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=keys)
            writer.writeheader()
            for row in rows:
                writer.writerow({k: jsonable(v) for k, v in row.items()})
        return filename

    def figure(self, fig, suffix: str = "") -> str:
        filename = f"{self.name}{suffix}.png"
        fig.savefig(self._add(filename), dpi=110, bbox_inches="tight")
        return filename

    def finish(
        self,
        setting: dict,
        checks: list[Check],
        data: dict,
        body: str,
        library_checks: list[LibraryCheck] | tuple = (),
    ) -> dict:
        """Write ``<name>.json`` and ``<name>.md``; return the results (keys = FIELDS)."""
        json_name, md_name = f"{self.name}.json", f"{self.name}.md"
        self._add(json_name)
        self._add(md_name)
        verdict = overall(checks)
        results = {
            "experiment": self.name,
            "title": self.module.TITLE,
            "claim": self.module.CLAIM,
            "paper_setting": self.module.PAPER_SETTING,
            "setting": setting,
            "scale": self.scale,
            "seeds": self.seeds,
            "device": str(self.device),
            "checks": [c.as_dict() for c in checks],
            "library_checks": [c.as_dict() for c in library_checks],
            "verdict": verdict,
            "supports": as_supports(verdict),
            "files": list(self.files),
            "wall_time_s": time.perf_counter() - self.start,
            **data,
        }
        results = jsonable(results)
        missing = [k for k in self.module.FIELDS if k not in results]
        extra = [k for k in results if k not in self.module.FIELDS]
        if missing or extra:  # the module's FIELDS documentation is out of date
            raise AssertionError(f"{self.name}: FIELDS mismatch, missing {missing}, extra {extra}")
        with open(self.out_dir / json_name, "w") as fh:
            json.dump(results, fh, indent=1, allow_nan=False)
        (self.out_dir / md_name).write_text(report_section(results, body))
        return results


def new_figure(ncols: int = 1, nrows: int = 1, width: float = 5.0, height: float = 3.6):
    """A matplotlib Figure with axes (no pyplot, so no global state or display needed)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width * ncols, height * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False)
    return fig, axes


def markdown_table(rows: list[dict], columns: list[str]) -> str:
    """A markdown table of ``columns`` (floats to 4 significant digits, None as a dash)."""
    head = "| " + " | ".join(columns) + " |\n|" + "---|" * len(columns) + "\n"
    body = []
    for row in rows:
        cells = []
        for c in columns:
            v = row.get(c, "")
            if v is None or (isinstance(v, float) and not math.isfinite(v)):
                cells.append("—" if v is None else str(v))
            elif isinstance(v, float):
                cells.append(f"{v:.4g}")
            else:
                cells.append(str(v))
        body.append("| " + " | ".join(cells) + " |")
    return head + "\n".join(body) + "\n"


# --------------------------------------------------------------------------- models


def seeded(seed: int, factory: Callable[[], nn.Module]) -> nn.Module:
    """Build a model under ``torch.manual_seed(seed)`` without touching the global RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return factory()


def mlp(d_in: int, hidden: int, d_out: int, activation=nn.Tanh) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d_in, hidden), activation(), nn.Linear(hidden, d_out))


class DigitsCNN(nn.Sequential):
    """A small CNN for 1x8x8 digits: conv3x3(1->c) relu pool2, conv3x3(c->2c) relu pool2,
    linear(2c*2*2 -> 10). About 2k parameters at c = 8; Conv2d and Linear only (KFAC)."""

    def __init__(self, channels: int = 8, n_classes: int = 10):
        c = channels
        super().__init__(
            nn.Conv2d(1, c, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(c, 2 * c, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(2 * c * 4, n_classes),
        )


# --------------------------------------------------------------------------- training


def minibatches(
    x: torch.Tensor, y: torch.Tensor, batch_size: int, seed: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Endless shuffled mini-batches (a new seeded permutation each epoch, last partial
    batch dropped)."""
    gen = torch.Generator().manual_seed(seed)
    n = int(x.shape[0])
    if batch_size > n:
        raise InvalidInputError(f"batch_size {batch_size} exceeds the {n} training samples")
    while True:
        order = torch.randperm(n, generator=gen).to(x.device)
        for start in range(0, n - batch_size + 1, batch_size):
            idx = order[start : start + batch_size]
            yield x[idx], y[idx]


@torch.no_grad()
def evaluate(
    model: nn.Module, loss_fn, x: torch.Tensor, y: torch.Tensor, chunk: int = 2048
) -> tuple[float, float]:
    """(mean loss, accuracy) over (x, y), ``chunk`` samples per forward pass (``loss_fn``
    mean-reduced; accuracy for class labels, NaN for float targets)."""
    n = int(x.shape[0])
    loss, correct = 0.0, 0.0
    for start in range(0, n, chunk):
        out = model(x[start : start + chunk])
        target = y[start : start + chunk]
        loss += float(loss_fn(out, target)) * int(target.shape[0])
        if not target.is_floating_point():
            correct += float((out.argmax(1) == target).sum())
    return loss / n, (correct / n if not y.is_floating_point() else math.nan)


def train(
    model: nn.Module,
    loss_fn,
    optimizer: torch.optim.Optimizer,
    data,
    *,
    steps: int,
    batch_size: int,
    seed: int,
    scheduler=None,
    after_step: Callable[[int, tuple], None] | None = None,
    eval_every: int = 0,
    target_loss: float | None = None,
    progress: bool = False,
    desc: str = "train",
    diverge_above: float = 1e6,
) -> dict:
    """Mini-batch training; returns the history (steps, train/val loss and accuracy).

    ``after_step(step, batch)`` runs after each optimizer step (a damper's update). The
    run stops early (``diverged=True``) when the batch loss is not finite or exceeds
    ``diverge_above`` times the initial training loss. With ``target_loss`` it also stops
    at the first evaluation (every ``eval_every`` steps) whose full training loss is at or
    below it: ``reached`` is that step (None if never), so runs can be compared at matched
    training loss.
    """
    if target_loss is not None and eval_every < 1:
        raise InvalidInputError("target_loss needs eval_every >= 1 (when the loss is checked)")
    batches = minibatches(data.x_train, data.y_train, batch_size, seed)
    history: dict[str, Any] = {
        "step": [],
        "train_loss": [],
        "train_acc": [],
        "val_loss": [],
        "val_acc": [],
    }
    initial, _ = evaluate(model, loss_fn, data.x_train, data.y_train)

    def record(step: int) -> float:
        tl, ta = evaluate(model, loss_fn, data.x_train, data.y_train)
        vl, va = evaluate(model, loss_fn, data.x_val, data.y_val)
        for key, value in zip(history, (step, tl, ta, vl, va)):
            history[key].append(value)
        return tl

    was_training = model.training
    record(0)
    diverged, reached, step = False, None, 0
    model.train()
    for step in track(range(1, steps + 1), desc, steps, progress=progress):
        batch = next(batches)
        out = step_optimizer(optimizer, model, loss_fn, batch)
        loss = float(out.detach()) if isinstance(out, torch.Tensor) else float(out)
        if not math.isfinite(loss) or loss > diverge_above * max(initial, 1e-12):
            diverged = True
            break
        if scheduler is not None:
            scheduler.step()
        if after_step is not None:
            after_step(step, batch)
        if eval_every and (step % eval_every == 0 or step == steps):
            model.eval()
            tl = record(step)
            model.train()
            if target_loss is not None and tl <= target_loss:
                reached = step
                break
    if diverged or not eval_every:
        model.eval()
        record(step)
    model.train(was_training)
    history["diverged"] = diverged
    history["reached"] = reached
    return history


def spectral_norm(model: nn.Module, loss_fn, x, y, seed: int, tol: float = 1e-4) -> float:
    """lambda_1 of the Hessian on (x, y) by Lanczos (autograd backend); the graph is freed."""
    est = curvlab.estimator("autograd", model, loss_fn, (x, y))
    try:
        return float(est.eigenpairs(k=1, tol=tol, seed=seed).values[0])
    finally:
        est.release()


def takes_batch(optimizer) -> bool:
    """curvlab's KFAC steps on a batch (``opt.step((x, y))``), not on a closure."""
    from curvlab.optim.kfac import KFAC

    return isinstance(optimizer, KFAC)


def step_optimizer(optimizer, model: nn.Module, loss_fn, batch) -> torch.Tensor:
    """One optimizer step on ``batch``; returns the batch loss (before the step)."""
    if takes_batch(optimizer):
        return optimizer.step(batch)

    def closure():
        optimizer.zero_grad()
        loss = loss_fn(model(batch[0]), batch[1])
        loss.backward()
        return loss

    return optimizer.step(closure)


def final(history: dict, key: str) -> float:
    """Last recorded value; NaN when the run diverged (so it never looks good)."""
    if history.get("diverged"):
        return math.nan
    return float(history[key][-1])


#: Floor of the training losses put on a log scale (a run at zero loss is not -inf).
LOSS_FLOOR = 1e-4


def log_final_loss(run: dict) -> float:
    """log10 of a run's final training loss, its initial loss if it diverged or ended
    non-finite, floored at :data:`LOSS_FLOOR`.

    Examples
    --------
    >>> log_final_loss({"diverged": True, "train_loss": 0.1, "initial_loss": 10.0})
    1.0
    """
    bad = run["diverged"] or not math.isfinite(run["train_loss"])
    return math.log10(max(run["initial_loss"] if bad else run["train_loss"], LOSS_FLOOR))


def spearman(a, b) -> float:
    """Spearman rank correlation of finite pairs (NaN when fewer than 3 pairs)."""
    from scipy.stats import spearmanr

    pairs = [(x, y) for x, y in zip(a, b) if math.isfinite(x) and math.isfinite(y)]
    if len(pairs) < 3:
        return math.nan
    xs, ys = zip(*pairs)
    if len(set(xs)) < 2 or len(set(ys)) < 2:
        return math.nan
    return float(spearmanr(xs, ys).statistic)


def dense_hessian(
    model: nn.Module, loss_fn, x: torch.Tensor, y: torch.Tensor, chunk: int = 256
) -> torch.Tensor:
    """Exact [P, P] Hessian of ``loss_fn(model(x), y)`` in the trainable parameters' flat
    order: one graph of the gradient, then batched double-backward over identity columns
    (``torch.autograd.grad(..., is_grads_batched=True)``), ``chunk`` columns at a time.
    The model is left as found (parameters are differentiated through detached aliases)."""
    from torch.func import functional_call

    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    aliases = [p.detach().requires_grad_() for _, p in named]
    state = {n: a for (n, _), a in zip(named, aliases)}
    loss = loss_fn(functional_call(model, state, (x,), strict=False), y)
    grads = torch.autograd.grad(loss, aliases, create_graph=True)
    g = torch.cat([t.reshape(-1) for t in grads])
    n_params = g.numel()
    eye = torch.eye(n_params, dtype=g.dtype, device=g.device)
    cols = []
    for start in range(0, n_params, chunk):
        block = eye[start : start + chunk]
        rows = torch.autograd.grad(g, aliases, block, retain_graph=True, is_grads_batched=True)
        cols.append(torch.cat([r.reshape(block.shape[0], -1) for r in rows], dim=1))
    hess = torch.cat(cols).detach()
    return (hess + hess.T) / 2
