"""Online damping as linear shrinkage: the paper's learned damping (section 7, Algorithm 1).

A damping delta on a curvature estimate H equals linear shrinkage toward tau * I (paper
eq. 13, DESIGN.md section 4): (1 - rho) H + rho tau I = (1 - rho)(H + delta I) with
rho = delta / (tau + delta), and the learning rate scaled by beta = 1 - rho
(beta = 1 / (1 + delta) for the identity target). The optimal delta is the Hessian noise
variance P^-1 Tr X^2 (eq. 15), zero at a random initialisation, so the paper starts from a
floor delta* and re-estimates every 100 steps with an exponential moving average (0.7):

    delta <- ema * delta + (1 - ema) * max(floor, estimate),   then clamped to [min, max].

Usage (one call per training step; ``damper(step)`` is the cached value, the callable
``damping(step)`` convention of kfac-pytorch)::

    damper = LinearShrinkageDamper(init=1e-3, update_every=100)
    opt = torch.optim.Adam(model.parameters(), eps=damper.damping)
    damper.attach(opt, key="eps")                  # eps follows every update
    for x, y in loader:
        ...; opt.step()
        damper.step(model, loss_fn, (x, y))        # estimates on (a subsample of) the data

or ``damper.update(step, estimate)`` with a number, a NoiseEstimate, a curvature estimator
or a factory returning one (for custom estimators and scripted tests).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import MutableMapping
from dataclasses import asdict, dataclass
from numbers import Real
from typing import Any

import torch

from curvlab import distributed as dist
from curvlab._params import as_batches, draw_subsample, local_selection, shard_layout
from curvlab._random import make_generator
from curvlab.errors import CurvlabWarning, InvalidInputError, NumericalError
from curvlab.estimator import CURVATURES, CurvatureEstimator
from curvlab.noise import METHODS, noise_variance, subsample_estimator
from curvlab.results import NoiseEstimate
from curvlab.shrinkage.conversions import (
    damping_to_shrinkage,
    learning_rate_scale,
    shrinkage_to_damping,
)

RULES = ("rmt", "ledoit_wolf", "oas", "fixed")
TARGETS = ("identity", "trace")
_SEED_RANGE = 2**62


@dataclass(frozen=True)
class DampingRecord:
    """One re-estimation: the raw estimate, its standard error and the smoothed damping."""

    step: int
    estimate: float
    stderr: float
    damping: float
    accepted: bool


class LinearShrinkageDamper:
    """Learns the damping online from the curvature noise and feeds it to optimizers.

    Parameters (keyword-only)
    ----------
    rule : "rmt" (the paper: delta = Hessian noise variance of a batch, unbiased estimator
        of :func:`curvlab.noise.noise_variance`), "ledoit_wolf" / "oas" (curvlab.shrinkage
        fitted on the estimator's data, toward (tr H / P) I, converted with
        ``shrinkage_to_damping``; they shrink the curvature of the data they are given, so
        ``batch_size`` does not apply), or "fixed" (delta = init forever).
    init : the starting damping delta* (the paper's initial floor value).
    floor : lower bound of each estimate before smoothing; default ``init``.
    update_every : re-estimate at steps 0, update_every, 2 update_every, ...
    ema : weight of the old value in the moving average (0 keeps only the new estimate).
    batch_size : B, the optimizer's batch whose curvature noise is the damping.
    subsample : estimate on that many samples drawn from the data (None: all of it, e.g.
        the current training batch); ``fresh_subsample`` draws new ones at every update,
        otherwise the first draw is reused (the same data must then be passed each time).
    n_probes : probe rounds per estimate (vectorised together; the spread over training
        batches, not the probes, dominates the error, so 2 suffice for the standard error).
    group_size : g, samples per group: 1 is per-sample products; g > 1 (default 8: 16
        groups in a batch of 128; B is the paper's per-batch route) groups a fresh random
        order of the samples and is cheaper than per-sample products at a similar precision
        (4.8 against 8.0 ms per update on the digits benchmark in BENCHMARKS.md). Exact
        agreement of torch.distributed ranks with one process holds for g = 1.
    method : "unbiased" or "paper" (Algorithm 1 as printed; biased).
    population : N in the factor 1/B - 1/N; None treats training batches as i.i.d. draws
        (factor 1/B); pass the dataset size for the finite-population value.
    target : "identity" (tau = 1) or "trace" (tau = tr H / P, estimated with the noise);
        sets ``shrinkage``/``rho``/``lr_scale``, not the damping.
    min, max : clamp of the smoothed damping.
    seed : seeds the probes and subsamples (saved in ``state_dict``).
    backend, curvature, backend_options : how ``step``/``maybe_update`` build estimators.
    """

    def __init__(
        self,
        *,
        rule: str = "rmt",
        init: float = 1e-3,
        floor: float | None = None,
        update_every: int = 100,
        ema: float = 0.7,
        batch_size: int = 128,
        subsample: int | None = None,
        fresh_subsample: bool = False,
        n_probes: int = 2,
        group_size: int = 8,
        method: str = "unbiased",
        population: float | None = None,
        target: str = "identity",
        min: float | None = None,
        max: float | None = None,
        seed: int = 0,
        backend: str = "autograd",
        curvature: str = "hessian",
        backend_options: dict[str, Any] | None = None,
    ):
        _choice("rule", rule, RULES)
        _choice("target", target, TARGETS)
        _choice("method", method, METHODS)
        _choice("curvature", curvature, CURVATURES)
        self.rule, self.target, self.method, self.curvature = rule, target, method, curvature
        self.init = _number("init", init)
        self.floor = self.init if floor is None else _number("floor", floor)
        self.update_every = _count("update_every", update_every, 1)
        if not (isinstance(ema, Real) and 0.0 <= ema < 1.0):
            raise InvalidInputError(f"ema must lie in [0, 1), got {ema!r}")
        self.ema = float(ema)
        self.batch_size = _count("batch_size", batch_size, 1)
        self.subsample = None if subsample is None else _count("subsample", subsample, 2)
        self.fresh_subsample = bool(fresh_subsample)
        self.n_probes = _count("n_probes", n_probes, 2 if rule in ("ledoit_wolf", "oas") else 1)
        self.group_size = _count("group_size", group_size, 1)
        self.population = math.inf if population is None else float(population)
        if not self.population >= self.batch_size:
            raise InvalidInputError(
                f"population {population} is smaller than batch_size {batch_size}"
            )
        self.min = None if min is None else _number("min", min)
        self.max = None if max is None else _number("max", max)
        if self.min is not None and self.max is not None and self.min > self.max:
            raise InvalidInputError(f"min {min} exceeds max {max}")
        self.seed = int(seed)
        self.backend = backend
        self.backend_options = dict(backend_options or {})
        self._gen = make_generator(self.seed)
        self._delta = self._clamp(self.init)
        self._tau: float | None = None
        self._indices: torch.Tensor | None = None
        self._history: list[DampingRecord] = []
        self._warned: set[str] = set()
        self._attached: list[tuple[Any, str]] = []
        self.steps = 0
        self.n_rejected = 0

    # ------------------------------------------------------------------ read-outs
    @property
    def damping(self) -> float:
        """The current (smoothed, clamped) damping delta."""
        return self._delta

    @property
    def tau(self) -> float:
        """The target scale: 1 for the identity target, the smoothed tr H / P for "trace"."""
        return 1.0 if self.target == "identity" or self._tau is None else self._tau

    @property
    def shrinkage(self) -> float:
        """beta = tau / (tau + delta), the weight kept on the curvature (1 / (1 + delta) for
        the identity target): damping delta is the shrunk matrix beta H + (1 - beta) tau I."""
        return learning_rate_scale(self._delta, self.tau)

    @property
    def rho(self) -> float:
        """rho = delta / (tau + delta) = 1 - beta, the weight on the target (scikit-learn's
        ``shrinkage_``)."""
        return damping_to_shrinkage(self._delta, self.tau)

    @property
    def lr_scale(self) -> float:
        """beta: the learning-rate factor that makes the damped step a shrunk-matrix step."""
        return self.shrinkage

    @property
    def history(self) -> list[DampingRecord]:
        return list(self._history)

    def __call__(self, step: int | None = None) -> float:
        """The cached damping (a schedule callable, as kfac-pytorch's ``damping(step)``)."""
        return self._delta

    def __repr__(self) -> str:
        return (
            f"LinearShrinkageDamper(rule={self.rule!r}, damping={self._delta:.4g}, "
            f"update_every={self.update_every}, ema={self.ema}, updates={len(self._history)})"
        )

    # ------------------------------------------------------------------ updating
    def due(self, step: int) -> bool:
        """Whether ``step`` re-estimates (never for the fixed rule)."""
        return self.rule != "fixed" and int(step) % self.update_every == 0

    def step(self, model=None, loss_fn=None, data=None) -> float:
        """Call once per training step: re-estimates when due, returns the damping."""
        self.maybe_update(self.steps, model, loss_fn, data)
        self.steps += 1
        return self._delta

    def maybe_update(self, step: int, model=None, loss_fn=None, data=None) -> bool:
        """Re-estimate from ``loss_fn(model(x), y)`` on ``data`` if ``step`` is due."""
        if not self.due(step):
            return False
        if model is None or loss_fn is None or data is None:
            raise InvalidInputError(
                f"step {step} re-estimates the damping: pass model, loss_fn and data "
                "(or call update(step, estimate) yourself)"
            )
        self._fold(int(step), lambda: self._measure(self._estimator(model, loss_fn, data)))
        return True

    def update(self, step: int, estimate) -> float:
        """Fold one estimate into the damping and return it.

        ``estimate``: a number (the raw damping estimate), a NoiseEstimate, a curvature
        estimator (the rule runs on it: on the subsample if one is set, in a fresh random
        order for groups), or a callable returning one of these (e.g. a factory). NaN,
        infinite or negative estimates keep the last value; a NumericalError while
        estimating (a diverging loss) is caught; both are counted in ``n_rejected`` and
        each kind is warned about once.
        """
        if self.rule == "fixed":
            raise InvalidInputError("rule='fixed' keeps damping=init; it has no updates")
        return self._fold(int(step), lambda: self._resolve(estimate))

    def _fold(self, step: int, produce) -> float:
        """Run ``produce() -> (value, stderr, tau)`` and fold the value into the damping."""
        try:
            value, stderr, tau = produce()
        except NumericalError as exc:
            self._reject(step, math.nan, math.nan, "failed", f"estimation failed ({exc})")
            return self._delta
        if not (math.isfinite(value) and value >= 0.0):
            self._reject(step, value, stderr, "rejected", f"estimate {value} is unusable")
            return self._delta
        smoothed = self.ema * self._delta + (1.0 - self.ema) * _max(self.floor, value)
        self._delta = self._clamp(smoothed)
        if tau is not None and math.isfinite(tau) and tau > 0:
            self._tau = tau if self._tau is None else self.ema * self._tau + (1 - self.ema) * tau
        self._history.append(DampingRecord(step, value, stderr, self._delta, True))
        self._push_all()
        return self._delta

    def _reject(self, step: int, value: float, stderr: float, kind: str, why: str) -> None:
        self.n_rejected += 1
        self._history.append(DampingRecord(step, value, stderr, self._delta, False))
        if kind not in self._warned:
            self._warned.add(kind)
            warnings.warn(
                f"LinearShrinkageDamper: {why} at step {step}; keeping damping "
                f"{self._delta:.4g} (counted in n_rejected; warned once)",
                CurvlabWarning,
                stacklevel=3,
            )

    def _clamp(self, value: float) -> float:
        if self.min is not None:
            value = _max(value, self.min)
        if self.max is not None:
            value = _min(value, self.max)
        return value

    # ------------------------------------------------------------------ estimating
    def _resolve(self, estimate) -> tuple[float, float, float | None]:
        if callable(estimate):
            estimate = estimate()
        if isinstance(estimate, bool):
            raise InvalidInputError("estimate must be a number, not a bool")
        if isinstance(estimate, Real):
            return float(estimate), math.nan, None
        if isinstance(estimate, NoiseEstimate):
            return float(estimate.value), float(estimate.stderr), None
        if isinstance(estimate, CurvatureEstimator):
            indices = self._selection(estimate.num_samples)
            if indices is not None:
                estimate = subsample_estimator(estimate, indices)
            return self._measure(estimate)
        raise InvalidInputError(
            "estimate must be a number, a NoiseEstimate, a CurvatureEstimator or a callable "
            f"returning one; got {type(estimate).__name__}"
        )

    def _estimator(self, model, loss_fn, data) -> CurvatureEstimator:
        """An estimator of this damper's backend on (a subsample or reordering of) ``data``."""
        from curvlab.registry import estimator

        if self.subsample is not None or (self.rule == "rmt" and self.group_size > 1):
            device = next(model.parameters()).device
            batches = as_batches(data, device)
            x = torch.cat([b[0] for b in batches])
            y = torch.cat([b[1] for b in batches])
            distributed = dist.is_distributed()
            total = shard_layout(x.shape[0], distributed)[1]
            local = local_selection(self._selection(total), x.shape[0], distributed)
            data = (x[local.to(device)], y[local.to(device)])
        return estimator(
            self.backend, model, loss_fn, data, curvature=self.curvature, **self.backend_options
        )

    def _selection(self, total: int) -> torch.Tensor | None:
        """Global indices of the samples to estimate on, in order (None: all, as given).

        A subsample is drawn once (or at every update with ``fresh_subsample``); without
        one, the rmt rule's groups of more than one sample get a fresh random order, so
        they partition the data at random whatever its order.
        """
        if self.subsample is not None:
            if self.fresh_subsample or self._indices is None:
                self._indices = draw_subsample(total, self.subsample, self._gen)
            return self._indices
        if self.rule == "rmt" and self.group_size > 1:
            return draw_subsample(total, total, self._gen)
        return None

    def _draw_seed(self) -> int:
        return int(torch.randint(0, _SEED_RANGE, (1,), generator=self._gen))

    def _measure(self, est: CurvatureEstimator) -> tuple[float, float, float | None]:
        """(raw damping, its standard error, tr H / P or None) from the rule on ``est``."""
        seed = self._draw_seed()
        if self.rule == "rmt":
            noise = noise_variance(
                est,
                batch_size=self.batch_size,
                n_probes=self.n_probes,
                method=self.method,
                group_size=self.group_size,
                population=self.population,
                seed=seed,
            )
            tau = noise.trace_per_param if self.target == "trace" else None
            return noise.value, noise.stderr, tau
        from curvlab.shrinkage import OAS, LedoitWolf

        cls = LedoitWolf if self.rule == "ledoit_wolf" else OAS
        fit = cls(n_probes=self.n_probes, seed=seed, store_precision=False).fit(est)
        rho, tau = fit.shrinkage_, fit.target_scale_
        if not (math.isfinite(tau) and tau > 0):
            return math.nan, math.nan, None  # a non-positive mean curvature has no target
        delta = shrinkage_to_damping(rho, tau)
        stderr = fit.shrinkage_stderr_ * tau / (1.0 - rho) ** 2 if rho < 1 else math.inf
        return delta, stderr, tau

    # ------------------------------------------------------------------ consumers
    def attach(self, obj, key: str = "eps"):
        """Keep ``obj``'s damping equal to this damper's (now and after every update).

        A torch optimizer gets ``group[key]`` in every param group (Adam/AdamW ``eps``,
        ``damping`` of LanczosOPT); a mapping gets ``obj[key]``; anything else the attribute
        (a KFAC preconditioner's ``damping``). The key must already exist. Returns ``obj``.
        """
        if isinstance(obj, torch.optim.Optimizer):
            missing = [i for i, g in enumerate(obj.param_groups) if key not in g]
            if missing:
                raise InvalidInputError(
                    f"param groups {missing} of {type(obj).__name__} have no {key!r}; pass the "
                    "key that holds the damping (Adam/AdamW: 'eps')"
                )
        elif isinstance(obj, MutableMapping):
            if key not in obj:
                raise InvalidInputError(f"the mapping has no key {key!r} to keep updated")
        elif not hasattr(obj, key):
            raise InvalidInputError(
                f"{type(obj).__name__} has no attribute {key!r}; pass key= the attribute "
                "that holds the damping"
            )
        self._attached.append((obj, key))
        _push(obj, key, self._delta)
        return obj

    def _push_all(self) -> None:
        for obj, key in self._attached:
            _push(obj, key, self._delta)

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume exactly (values, counters, history, RNG, subsample)."""
        return {
            "damping": self._delta,
            "tau": self._tau,
            "steps": self.steps,
            "n_rejected": self.n_rejected,
            "warned": sorted(self._warned),
            "history": [asdict(r) for r in self._history],
            "rng_state": self._gen.get_state(),
            "indices": None if self._indices is None else self._indices.clone(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (attached objects get the restored damping)."""
        try:
            self._delta = float(state["damping"])
            self._tau = None if state["tau"] is None else float(state["tau"])
            self.steps = int(state["steps"])
            self.n_rejected = int(state["n_rejected"])
            self._warned = set(state["warned"])
            self._history = [DampingRecord(**r) for r in state["history"]]
            self._gen.set_state(state["rng_state"])
            self._indices = None if state["indices"] is None else state["indices"].clone()
        except (KeyError, TypeError) as exc:
            raise InvalidInputError(
                f"not a LinearShrinkageDamper state_dict ({exc!r}); pass damper.state_dict()"
            ) from exc
        self._push_all()


# ---------------------------------------------------------------------- helpers
_max, _min = max, min  # the constructor's min/max keywords shadow the builtins


def _push(obj, key: str, value: float) -> None:
    if isinstance(obj, torch.optim.Optimizer):
        for group in obj.param_groups:
            group[key] = value
    elif isinstance(obj, MutableMapping):
        obj[key] = value
    else:
        setattr(obj, key, value)


def _choice(name: str, value, options) -> None:
    if value not in options:
        raise InvalidInputError(f"{name} must be one of {options}, got {value!r}")


def _number(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, Real) or not 0 <= value < math.inf:
        raise InvalidInputError(f"{name} must be a finite number >= 0, got {value!r}")
    return float(value)


def _count(name: str, value, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise InvalidInputError(f"{name} must be an int >= {low}, got {value!r}")
    return value


__all__ = ["RULES", "TARGETS", "DampingRecord", "LinearShrinkageDamper"]
