"""Shared plumbing of the experiments: arguments, output files, verdicts, models, training.

Every experiment module defines ``NAME``, ``TITLE``, ``CLAIM`` (the paper's statement),
``PAPER_SETTING``, ``FIELDS`` (the top-level keys of its JSON, :data:`COMMON_FIELDS` first)
and ``run(out_dir, *, scale="fast", seed=0, device="cpu", progress=False) -> dict``, which
writes ``<NAME>.json``, ``<NAME>.csv`` (and more CSVs), PNG figures and ``<NAME>.md`` (its
report section) into ``out_dir`` and returns the JSON's content.
"""

from __future__ import annotations

import csv
import json
import math
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

import curvlab
from curvlab._params import resolve_device
from curvlab.errors import InvalidInputError

from .registry import SCALES

#: Keys every experiment's JSON has (documented in each module's FIELDS).
COMMON_FIELDS = (
    "experiment",  # module name
    "title",
    "claim",  # the paper's statement under test
    "paper_setting",  # what the paper ran (for --scale paper on a GPU)
    "setting",  # what this run used (sizes, grids, steps)
    "scale",  # "smoke" | "fast" | "paper"
    "seed",
    "device",
    "checks",  # list of {claim, supports (bool or None), evidence}
    "supports",  # True if every check supports the claim, False if any does not, else None
    "files",  # files written, relative to out_dir
    "wall_time_s",
)


# --------------------------------------------------------------------------- arguments


def check_args(scale: str, seed: int, device) -> torch.device:
    if scale not in SCALES:
        raise InvalidInputError(f"scale must be one of {SCALES}, got {scale!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise InvalidInputError(f"seed must be a non-negative int, got {seed!r}")
    return resolve_device(device)


# --------------------------------------------------------------------------- verdicts


@dataclass(frozen=True)
class Check:
    """One computed verdict: does our run support this part of the paper's claim?"""

    claim: str
    supports: bool | None  # None: the run cannot decide (e.g. everything diverged)
    evidence: str

    def as_dict(self) -> dict:
        return {"claim": self.claim, "supports": self.supports, "evidence": self.evidence}


def overall(checks: list[Check]) -> bool | None:
    if any(c.supports is False for c in checks):
        return False
    if checks and all(c.supports is True for c in checks):
        return True
    return None


def verdict_word(supports: bool | None) -> str:
    return {True: "SUPPORTS", False: "DOES NOT SUPPORT", None: "INCONCLUSIVE"}[supports]


def report_section(results: dict, body: str) -> str:
    """The markdown section of one experiment: claim, setting, verdicts, body, files."""
    lines = [
        f"## {results['title']}",
        "",
        f"**Paper's claim.** {results['claim']}",
        "",
        f"**Our run** (scale `{results['scale']}`, seed {results['seed']}, device "
        f"`{results['device']}`, {results['wall_time_s']:.1f} s): {describe(results['setting'])}.",
        f"Paper setting: {results['paper_setting']}",
        "",
        f"**Verdict: our run {verdict_word(results['supports'])} the claim.**",
        "",
    ]
    for c in results["checks"]:
        lines.append(f"- {verdict_word(c['supports'])}: {c['claim']} — {c['evidence']}")
    lines += ["", body.strip(), ""]
    lines.append("Files: " + ", ".join(f"`{f}`" for f in results["files"]))
    return "\n".join(lines) + "\n"


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
    """Validate the arguments; return (device, Recorder, the scale's settings)."""
    dev = check_args(scale, seed, device)
    return dev, Recorder(out_dir, module.NAME, module, scale, seed, dev), module.SETTINGS[scale]


class Recorder:
    """Writes an experiment's files into ``out_dir`` and assembles its results dict."""

    def __init__(self, out_dir, name: str, module, scale: str, seed: int, device: torch.device):
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.name, self.module = name, module
        self.scale, self.seed, self.device = scale, seed, device
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

    def finish(self, setting: dict, checks: list[Check], data: dict, body: str) -> dict:
        """Write ``<name>.json`` and ``<name>.md``; return the results (keys = FIELDS)."""
        json_name, md_name = f"{self.name}.json", f"{self.name}.md"
        self._add(json_name)
        self._add(md_name)
        results = {
            "experiment": self.name,
            "title": self.module.TITLE,
            "claim": self.module.CLAIM,
            "paper_setting": self.module.PAPER_SETTING,
            "setting": setting,
            "scale": self.scale,
            "seed": self.seed,
            "device": str(self.device),
            "checks": [c.as_dict() for c in checks],
            "supports": overall(checks),
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


# --------------------------------------------------------------------------- progress


def progress_bar(iterable: Iterable, enabled: bool, desc: str, total: int | None = None):
    """tqdm over ``iterable`` when ``enabled`` (and tqdm is installed), else the iterable."""
    if not enabled:
        return iterable
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm is an experiments extra
        return iterable
    return tqdm(iterable, desc=desc, total=total, leave=False, dynamic_ncols=True)


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
def evaluate(model: nn.Module, loss_fn, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """(mean loss, accuracy) over (x, y) in one pass."""
    out = model(x)
    loss = float(loss_fn(out, y))
    acc = float((out.argmax(1) == y).double().mean())
    return loss, acc


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
    progress: bool = False,
    desc: str = "train",
    diverge_above: float = 1e6,
) -> dict:
    """Mini-batch training; returns the history (steps, train/val loss and accuracy).

    ``after_step(step, batch)`` runs after each optimizer step (a damper's update). The
    run stops early (``diverged=True``) when the batch loss is not finite or exceeds
    ``diverge_above`` times the initial training loss.
    """
    batches = minibatches(data.x_train, data.y_train, batch_size, seed)
    history: dict[str, list] = {
        "step": [],
        "train_loss": [],
        "train_acc": [],
        "val_loss": [],
        "val_acc": [],
    }
    initial, _ = evaluate(model, loss_fn, data.x_train, data.y_train)

    def record(step: int) -> None:
        tl, ta = evaluate(model, loss_fn, data.x_train, data.y_train)
        vl, va = evaluate(model, loss_fn, data.x_val, data.y_val)
        for k, v in zip(history, (step, tl, ta, vl, va)):
            history[k].append(v)

    record(0)
    diverged = False
    model.train()
    for step in progress_bar(range(1, steps + 1), progress, desc, steps):
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
            record(step)
    if diverged or not eval_every:
        record(step)
    history["diverged"] = diverged
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
