"""LinearShrinkageDamper: the paper's learned damping, as estimate -> judge -> sink.

A damping delta on a curvature estimate H equals linear shrinkage toward tau I with the
learning rate scaled by beta = tau / (tau + delta) (paper eq. 13; beta = 1 / (1 + delta) for
the identity target), and the optimal delta is the Hessian noise variance P^-1 Tr X^2
(eq. 15). The damper learns it online. Every ``update_every`` training steps it

1. **estimates** a raw damping on the update's samples with its estimate rule
   (:mod:`curvlab.damping.estimates`; by default :class:`~curvlab.damping.RMTNoise`, the
   noise variance of a batch of B), reusing one curvature estimator through
   ``est.with_data``;
2. **judges** the estimate (:mod:`curvlab.damping.guard`): skipped when the data,
   parameters or loss are not finite, the loss spikes or the batch is too small; rejected or
   capped when far outside the recent estimates; under ``torch.distributed`` the ranks agree
   on all of it in one collective (:mod:`curvlab.damping.sync`);
3. **smooths** it into the damping with its update rule (:mod:`curvlab.damping.updates`),
   and **pushes** the result to every attached sink (:mod:`curvlab.damping.sinks`).

Every update leaves a :class:`~curvlab.damping.DampingRecord` in ``history``.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections import deque
from collections.abc import Callable
from dataclasses import asdict
from numbers import Real
from typing import Any

import torch

from curvlab import distributed as dist
from curvlab._random import make_generator
from curvlab.damping import _data, _state, sync
from curvlab.damping._legacy import from_legacy
from curvlab.damping.estimates import (
    EstimateRule,
    RawEstimate,
    as_estimate_rule,
    as_raw_estimate,
)
from curvlab.damping.guard import as_guard, usable
from curvlab.damping.history import DampingRecord
from curvlab.damping.resolve import checked_damping
from curvlab.damping.sinks import as_sink
from curvlab.damping.updates import as_update_rule
from curvlab.errors import CurvlabWarning, InvalidInputError, NumericalError
from curvlab.estimator import CURVATURES, CurvatureEstimator
from curvlab.model_view import batch_coupled
from curvlab.results import NoiseEstimate
from curvlab.shrinkage.conversions import damping_to_shrinkage, learning_rate_scale
from curvlab.validation import check_choice, check_int, check_optional, check_positive

#: The default update rule (chosen from the measurements in BENCHMARKS.md, damping section).
DEFAULT_UPDATE_RULE = "authors"
_SEED_RANGE = 2**62


class LinearShrinkageDamper:
    """Learns the damping online from the curvature noise and feeds it to optimizers.

    Parameters
    ----------
    rule : str, rule object, shrinkage estimator or callable, default "rmt"
        What a raw estimate is: "rmt" (the paper, :class:`~curvlab.damping.RMTNoise`),
        "ledoit_wolf", "oas", "fixed" (never updates); an estimate rule object; a shrinkage
        estimator with ``fit`` (:class:`~curvlab.shrinkage.LedoitWolf`, ``OAS``,
        ``RMTLinear``, ...); or a callable ``est -> number or NoiseEstimate``.
    init : float, default 1e-3
        delta*, the damping until the first estimate: the paper's "starting value" (its
        figures call it the initial floor value; here the floor is the update rule's own
        setting, see :mod:`curvlab.damping.updates`).
    update_rule : str or callable, default "authors"
        How an estimate moves the damping: "authors" (the released code's rule: the first
        estimate at full weight, then a moving average 0.7 of floor + estimate, the additive
        floor delta* unless set), "paper" (the paper's moving average from delta*, no floor)
        or "curvlab" (the pre-issue-13 rule, max(floor, estimate)), or a rule object such as
        ``AuthorsUpdate(floor=1e-6)`` (:mod:`curvlab.damping.updates`). The default is
        chosen from the measurements in BENCHMARKS.md (damping section).
    guard : bool or OutlierGuard, default True
        Outlier safety (:class:`~curvlab.damping.OutlierGuard`); False keeps only the
        refusal of non-finite or negative estimates and of non-finite data/loss.
    update_every : int, default 100
        Re-estimate in the calls to :meth:`step` that complete update_every, 2 update_every,
        ... training steps (``init`` is used before).
    batch_size : int or None, default None
        B, the optimizer's batch whose curvature noise is the damping. None infers it from
        the data passed to :meth:`step`: the largest batch passed since the previous update
        (over all ranks), so an epoch's short last batch does not set it. Required with
        ``subsample`` (the data passed is then a pool, not the batch); a warning says when
        it disagrees with the batch passed.
    subsample : int, Subsample or None, default None
        Estimate on that many samples drawn from the data passed (for example the training
        set; :class:`~curvlab.damping.Subsample` draws afresh at every update with
        ``fresh=True``). None estimates on the data passed, e.g. the current batch.
    estimator : str, CurvatureEstimator or callable, default "autograd"
        How the curvature is computed: a backend name for :func:`curvlab.estimator`, an
        estimator (its model and loss are used; each update calls ``est.with_data``), or a
        factory ``(model, loss_fn, data, curvature=...) -> CurvatureEstimator``. One
        estimator is built and reused through ``with_data`` at later updates.
    curvature : str, default "hessian"
        "hessian", "ggn", "fisher" or "ef" (for the default backend and factories).
    seed : int, default 0
        Seeds the probes, the sample order and subsamples (saved in ``state_dict``).
    timeout : float, default 300
        Seconds the ranks of ``torch.distributed`` wait for each other at an update before
        raising :class:`~curvlab.damping.DampingSyncError` (:mod:`curvlab.damping.sync`).

    Attributes
    ----------
    damping : float
        delta, the current damping (also ``damper(step)``, a kfac-pytorch-style schedule).
    shrinkage, lr_scale, rho, tau : float
        beta = tau / (tau + delta), beta again, 1 - beta, and the target scale.
    history : list of DampingRecord
        One record per update (:mod:`curvlab.damping.history`).

    Notes
    -----
    Keywords of curvlab before issue 13 (``ema``, ``floor``, ``min``, ``max``, ``n_probes``,
    ``group_size``, ``method``, ``population``, ``target``, ``fresh_subsample``,
    ``backend``, ``backend_options``) still work, with a DeprecationWarning naming their
    replacement; ``ema``/``floor``/``min``/``max`` select the "curvlab" update rule with
    the old default floor (``init``).

    References
    ----------
    D. Granziol et al., "A Random Matrix Theory Approach to Damping in Deep Learning",
    section 7: eq. 13 (damping as linear shrinkage), eq. 15 (the optimal damping),
    Algorithm 1, and the learned damping of section 7.1.

    Examples
    --------
    >>> import torch, curvlab
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <torch._C.Generator object at ...>
    >>> model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(),
    ...                             torch.nn.Linear(16, 3))
    >>> loss_fn = torch.nn.CrossEntropyLoss()
    >>> damper = curvlab.LinearShrinkageDamper(init=1e-3, update_every=5)
    >>> opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    >>> _ = damper.attach(opt, key="eps", compensate=True)  # eps follows, lr x (1 + delta)
    >>> for step in range(10):
    ...     x, y = torch.randn(32, 8), torch.randint(0, 3, (32,))
    ...     opt.zero_grad()
    ...     loss = loss_fn(model(x), y)
    ...     loss.backward()
    ...     opt.step()
    ...     _ = damper.step(model, loss_fn, (x, y), loss=loss)
    >>> [(r.step, r.decision, r.batch_size) for r in damper.history]
    [(5, 'accept', 32), (10, 'accept', 32)]
    >>> opt.param_groups[0]["eps"] == damper.damping
    True
    """

    def __init__(
        self,
        *,
        rule: Any = "rmt",
        init: float = 1e-3,
        update_rule: Any = DEFAULT_UPDATE_RULE,
        guard: Any = True,
        update_every: int = 100,
        batch_size: int | None = None,
        subsample: int | _data.Subsample | None = None,
        estimator: Any = "autograd",
        curvature: str = "hessian",
        seed: int = 0,
        timeout: float = sync.DEFAULT_TIMEOUT,
        **legacy: Any,
    ):
        self.init = check_positive("init", init, fix="every consumer divides by the damping")
        rule, update_rule, subsample, estimator = from_legacy(
            legacy, rule, update_rule, subsample, estimator
        )
        self.rule = as_estimate_rule(rule)
        update_rule = as_update_rule(update_rule)
        bind = getattr(update_rule, "with_init", None)
        self.update_rule = update_rule if bind is None else bind(self.init)
        self.guard = as_guard(guard)
        self.update_every = check_int("update_every", update_every, minimum=1)
        self.batch_size = check_optional(check_int, "batch_size", batch_size, minimum=1)
        self.subsample = _data.as_subsample(subsample)
        if self.subsample is not None and self.batch_size is None:
            raise InvalidInputError(
                "with a subsample the data passed to step is a pool, not the training batch: "
                "pass batch_size (the optimizer's batch)"
            )
        self.curvature = check_choice("curvature", curvature, CURVATURES)
        self._factory, self._est = _estimator_source(estimator)
        self.seed = check_int("seed", seed, minimum=0)
        self._collective = sync.Collective(check_positive("timeout", timeout))
        self._gen = make_generator(self.seed)
        clamp = getattr(self.update_rule, "clamp", None)
        self._delta = self.init if clamp is None else checked_damping(clamp(self.init))
        self._tau: float | None = None
        self._indices: torch.Tensor | None = None
        self._history: list[DampingRecord] = []
        self._losses: deque = deque(maxlen=self.guard.loss_window)
        self._largest = 0
        self._warned: set[str] = set()
        self._sinks: list[Any] = []
        self.steps = 0

    # ------------------------------------------------------------------ read-outs
    @property
    def damping(self) -> float:
        """delta, the current damping."""
        return self._delta

    @property
    def tau(self) -> float:
        """The target scale: 1 for the identity target, else the smoothed estimate."""
        return 1.0 if self._tau is None else self._tau

    @property
    def shrinkage(self) -> float:
        """beta = tau / (tau + delta): damping delta is the shrunk matrix beta H + (1 - beta)
        tau I at the learning rate beta * lr (eq. 13)."""
        return learning_rate_scale(self._delta, self.tau)

    @property
    def lr_scale(self) -> float:
        """beta, the learning-rate factor of eq. 13 (``compensate=True`` divides by it)."""
        return self.shrinkage

    @property
    def lr_compensation(self) -> float:
        """1 / beta = (tau + delta) / tau = 1 + delta / tau: the factor ``compensate=True``
        multiplies the learning rate by (eq. 13)."""
        return 1.0 + self._delta / self.tau

    @property
    def rho(self) -> float:
        """rho = 1 - beta, the weight on the target (scikit-learn's ``shrinkage_``)."""
        return damping_to_shrinkage(self._delta, self.tau)

    @property
    def floor(self) -> float | None:
        """The update rule's floor (None if it has none)."""
        return getattr(self.update_rule, "floor", None)

    @property
    def history(self) -> list[DampingRecord]:
        """One record per update (a copy)."""
        return list(self._history)

    @property
    def n_rejected(self) -> int:
        """Updates that left the damping unchanged (rejected or skipped)."""
        return sum(r.decision in ("reject", "skip") for r in self._history)

    def __call__(self, step: int | None = None) -> float:
        """The current damping (a schedule callable, as kfac-pytorch's ``damping(step)``)."""
        return self._delta

    def __repr__(self) -> str:
        return (
            f"LinearShrinkageDamper(rule={self.rule!r}, update_rule={self.update_rule!r}, "
            f"damping={self._delta:.4g}, update_every={self.update_every}, "
            f"updates={len(self._history)})"
        )

    # ------------------------------------------------------------------ consumers
    def attach(
        self,
        obj: Any,
        key: str | None = "eps",
        *,
        groups: str | None = None,
        compensate: bool = False,
    ) -> Any:
        """Keep ``obj``'s damping equal to this damper's, now and after every update.

        Parameters
        ----------
        obj : torch optimizer, mapping, any object, or a sink
            A torch optimizer gets ``group[key]`` in its param groups (Adam/AdamW ``eps``,
            ``damping`` of LanczosOPT/KFAC); a mapping ``obj[key]``; anything else the
            attribute ``key``. The key must exist.
        key : str or None, default "eps"
            None with ``compensate=True``: only the learning rate is compensated.
        groups : {None, "shared", "scaled"}, default None
            How a torch optimizer's param groups relate to the damping
            (:class:`~curvlab.damping.ParamGroupSink`): all the learned value, or each
            group's initial value scaled; None refuses groups holding different values.
        compensate : bool, default False
            Run the optimizer's steps at ``lr / beta`` = ``lr (1 + delta)`` (eq. 13), on top
            of its own lr and any LR scheduler.

        Returns
        -------
        obj
        """
        sink = as_sink(obj, key, groups=groups, compensate=compensate)
        sink.push(self._delta, self.lr_compensation)
        self._sinks.append(sink)
        return obj

    def detach(self, obj: Any) -> None:
        """Stop updating ``obj`` (and remove its learning-rate compensation)."""
        kept = []
        for sink in self._sinks:
            targets = [getattr(sink, name, None) for name in ("optimizer", "obj", "mapping")]
            if sink is obj or any(t is obj for t in targets):
                sink.remove()
            else:
                kept.append(sink)
        self._sinks = kept

    def _push(self) -> None:
        factor = self.lr_compensation
        for sink in self._sinks:
            sink.push(self._delta, factor)

    # ------------------------------------------------------------------ training loop
    def step(
        self,
        model: torch.nn.Module | None = None,
        loss_fn: Callable | None = None,
        data: Any = None,
        *,
        loss: Any = None,
    ) -> float:
        """Call once per training step (after ``optimizer.step()``); re-estimates when due.

        Parameters
        ----------
        model : torch.nn.Module, optional
            The model (omit it when the damper was given an estimator).
        loss_fn : callable, optional
            Its mean-reduced loss ``loss_fn(model(x), y)`` (omit it likewise).
        data : (x, y) or iterable of (x, y)
            The training batch of this step (or the pool a ``subsample`` is drawn from). It
            is read only at updates.
        loss : tensor or float, optional
            This step's training loss: enables the guard's non-finite-loss and spike checks
            (read only at updates; a tensor is not synchronised before).

        Returns
        -------
        float
            The damping after this step.
        """
        self._largest = max(self._largest, _data.batch_size_of(data))
        self.steps += 1
        if getattr(self.rule, "learns", True) and self.steps % self.update_every == 0:
            self._update_from_batch(model, loss_fn, data, loss)
            self._largest = 0
        if loss is not None:
            self._losses.append(loss.detach() if isinstance(loss, torch.Tensor) else loss)
        return self._delta

    def _update_from_batch(self, model, loss_fn, data, loss) -> None:
        step = self.steps
        report, batch, error = self._prepare(model, loss_fn, data, loss)
        reports = self._collective.exchange(report)
        skip = self._agree(reports, error)
        losses = [r.loss for r in reports if math.isfinite(r.loss)]
        mean_loss = sum(losses) / len(losses) if losses else math.nan
        if skip is not None:
            return self._skip(step, *skip, mean_loss)
        counts = [r.n_samples for r in reports]
        total = sum(counts)
        indices, self._indices = _data.global_indices(
            total, self.subsample, getattr(self.rule, "shuffle", False), self._indices, self._gen
        )
        model, loss_fn, x, y = batch
        if indices is not None:
            local, counts, why = _data.local_positions(indices, counts, dist.rank())
            if why is not None:
                return self._skip(step, "too_small", why, mean_loss)
            local = local.to(x.device)
            x, y = x[local], y[local]
        too_small = self._too_small(counts, model)
        if too_small is not None:
            return self._skip(step, "too_small", f"too few samples: {too_small}", mean_loss)
        batch_size = self._batch_size(reports)
        est = self._estimator(model, loss_fn, (x, y))
        try:
            raw = self._estimate(est, batch_size)
        finally:
            est.release()
        self._fold(step, raw, batch_size, mean_loss)

    def _too_small(self, counts: list[int], model) -> str | None:
        """The rule's reason to skip these samples (EstimateRules also learn whether the
        model couples the samples of a batch; duck-typed rules get the counts only)."""
        reason_of = getattr(self.rule, "skip_reason", None)
        if reason_of is None:
            return None
        if isinstance(self.rule, EstimateRule):
            return reason_of(counts, coupled=bool(batch_coupled(model)))
        return reason_of(counts)

    def _prepare(self, model, loss_fn, data, loss):
        """This rank's report and batch; never raises (a failure is reported as FAILED)."""
        try:
            model, loss_fn = self._model_and_loss(model, loss_fn)
            params = [p for p in model.parameters() if p.requires_grad]
            x, y = _data.read_batch(data, params)
            loss_value = math.nan if loss is None else _float(loss)
            code = sync.OK
            if not _data.all_finite([x, y]):
                code = sync.NONFINITE_DATA
            elif not _data.all_finite(params):
                code = sync.NONFINITE_PARAMS
            elif loss is not None and not math.isfinite(loss_value):
                code = sync.NONFINITE_LOSS
            recent = [_float(v) for v in self._losses]
            spike = self.guard.loss_spike(loss_value, recent) is not None
            report = sync.RankReport(
                step=self.steps,
                code=code,
                n_samples=int(x.shape[0]),
                n_largest=max(self._largest, int(x.shape[0])),
                loss=loss_value,
                spike=spike,
            )
            return report, (model, loss_fn, x, y), None
        except Exception as exc:  # reported to every rank, raised after the agreement
            return sync.RankReport(step=self.steps, code=sync.FAILED), None, exc

    def _agree(self, reports, error) -> tuple[str, str] | None:
        """(kind, reason) to skip on, the same on every rank; raises on every rank when a
        rank failed or the ranks are out of step."""
        steps = sorted({r.step for r in reports})
        if len(steps) > 1:
            raise sync.DampingSyncError(
                f"the ranks are at different damping steps {[r.step for r in reports]}: call "
                "damper.step once per training step on every rank"
            )
        failed = [i for i, r in enumerate(reports) if r.code == sync.FAILED]
        if failed:
            if error is not None:
                raise error
            raise sync.DampingSyncError(
                f"rank {failed[0]} failed while preparing the damping update at step "
                f"{steps[0]}; every rank stops (see rank {failed[0]}'s error)"
            )
        where = (lambda i: "") if len(reports) == 1 else (lambda i: f" on rank {i}")
        for i, r in enumerate(reports):
            if r.code != sync.OK:
                return "nonfinite", f"{sync.FAULTS[r.code]}{where(i)}"
        spiking = [i for i, r in enumerate(reports) if r.spike]
        if spiking:
            i = spiking[0]
            if len(reports) == 1:
                why = self.guard.loss_spike(reports[0].loss, [_float(v) for v in self._losses])
            else:
                why = f"the loss {reports[i].loss:.3g} spikes above its recent median"
            return "loss_spike", f"{why}{where(i)}"
        return None

    def _batch_size(self, reports) -> int:
        inferred = sum(r.n_largest for r in reports)
        if self.batch_size is None:
            return inferred
        # inferred: the largest batches since the last update, over all ranks
        if self.subsample is None and inferred != self.batch_size:
            self._warn_once(
                "batch_size",
                f"batch_size={self.batch_size} but the batch passed to step holds {inferred} "
                f"samples; the damping is for batches of {self.batch_size} (leave batch_size "
                "unset to use the size of the batches passed)",
            )
        return self.batch_size

    # ------------------------------------------------------------------ scripted updates
    def update(self, step: int, estimate: Any) -> float:
        """Fold one estimate into the damping and return the damping.

        Parameters
        ----------
        step : int
            The step recorded in the history.
        estimate : number, NoiseEstimate, RawEstimate, CurvatureEstimator or callable
            A raw damping estimate; or an estimator the rule runs on (on the subsample, in a
            fresh random order where the rule groups samples; B is ``batch_size``, else the
            estimator's sample count); or a no-argument callable returning one of these.
            Under ``torch.distributed`` every rank must pass the same value.
        """
        if not getattr(self.rule, "learns", True):
            raise InvalidInputError(f"rule {self.rule!r} keeps damping=init; it has no updates")
        if isinstance(estimate, bool):
            raise InvalidInputError("estimate must be a number, not a bool")
        if callable(estimate) and not isinstance(estimate, CurvatureEstimator):
            estimate = estimate()
        step = int(step)
        batch_size = self.batch_size or 0
        if isinstance(estimate, CurvatureEstimator):
            batch_size = self.batch_size or estimate.num_samples
            raw = self._estimate(self._arranged(estimate), batch_size)
        elif isinstance(estimate, (RawEstimate, NoiseEstimate, Real)):
            raw = as_raw_estimate(estimate)
        else:
            raise InvalidInputError(
                "estimate must be a number, a NoiseEstimate, a RawEstimate, a CurvatureEstimator "
                f"or a callable returning one; got {type(estimate).__name__}"
            )
        reports = self._collective.exchange(sync.RankReport(step=step, value=raw.value))
        values = {("nan" if math.isnan(r.value) else r.value) for r in reports}
        if len({r.step for r in reports}) > 1 or len(values) > 1:
            raise sync.DampingSyncError(
                f"the ranks passed different estimates to damper.update: "
                f"{[(r.step, r.value) for r in reports]}; pass the same value on every rank"
            )
        self._fold(step, raw, batch_size, math.nan)
        return self._delta

    def _arranged(self, est: CurvatureEstimator) -> CurvatureEstimator:
        indices, self._indices = _data.global_indices(
            est.num_samples,
            self.subsample,
            getattr(self.rule, "shuffle", False),
            self._indices,
            self._gen,
        )
        return est if indices is None else est.subset(indices)

    # ------------------------------------------------------------------ estimate and fold
    def _model_and_loss(self, model, loss_fn):
        if self._est is not None and self._factory is None:  # an injected estimator
            est_model = self._est.model
            if model is not None and model is not est_model and getattr(
                model, "module", None
            ) is not est_model:
                raise InvalidInputError(
                    "the damper was given an estimator: pass no model to step (or that "
                    "estimator's model)"
                )
            return est_model, self._est.loss_fn
        if model is None or loss_fn is None:
            raise InvalidInputError(
                "this step re-estimates the damping: pass model, loss_fn and data, "
                "damper.step(model, loss_fn, (x, y))"
            )
        return model, loss_fn

    def _estimator(self, model, loss_fn, data) -> CurvatureEstimator:
        """The reused estimator on ``data``: ``with_data`` of the one built first."""
        est = self._est
        if est is not None and (
            self._factory is None or (est.model is _unwrapped(model) and est.loss_fn is loss_fn)
        ):
            self._est = est.with_data(data)
        else:
            self._est = self._factory(model, loss_fn, data, curvature=self.curvature)
            if not isinstance(self._est, CurvatureEstimator):
                raise InvalidInputError(
                    "the estimator factory must return a CurvatureEstimator, got "
                    f"{type(self._est).__name__}"
                )
        return self._est

    def _estimate(self, est: CurvatureEstimator, batch_size: int) -> RawEstimate | str:
        """The rule's raw estimate, or the reason it failed (a NumericalError)."""
        seed = int(torch.randint(0, _SEED_RANGE, (1,), generator=self._gen))
        try:
            return as_raw_estimate(self.rule.estimate(est, batch_size=batch_size, seed=seed))
        except NumericalError as exc:
            return f"estimation failed ({exc})"

    def _fold(self, step: int, raw: RawEstimate | str, batch_size: int, loss: float) -> None:
        if isinstance(raw, str):
            return self._record(step, "estimation_failed", "reject", raw, batch_size, loss)
        recent = [r.folded for r in self._history if r.accepted]
        verdict = self.guard.judge(raw.value, raw.stderr, recent)
        kind = "unusable" if usable(raw.value) else "outlier"
        if verdict.decision == "reject":
            return self._record(step, kind, "reject", verdict.reason, batch_size, loss, raw)
        first = not recent
        new = self.update_rule(self._delta, verdict.value, first)
        if not (isinstance(new, (int, float)) and new > 0 and math.isfinite(new)):
            why = f"the update rule gave the damping {new!r} (it must be finite and positive)"
            return self._record(step, "bad_update", "reject", why, batch_size, loss, raw)
        self._delta = float(new)
        tau = raw.target_scale
        if tau is not None and math.isfinite(tau) and tau > 0:
            w = getattr(self.update_rule, "ema", None)
            w = 0.7 if w is None else w  # the update rule's smoothing, 0.7 if it has none
            self._tau = tau if self._tau is None else w * self._tau + (1.0 - w) * tau
        self._record(step, kind, verdict.decision, verdict.reason, batch_size, loss, raw,
                     folded=verdict.value)
        self._push()

    def _skip(self, step: int, kind: str, reason: str, loss: float) -> None:
        self._record(step, kind, "skip", reason, 0, loss)

    def _record(self, step, kind, decision, reason, batch_size, loss, raw=None, folded=math.nan):
        raw = raw if raw is not None else RawEstimate(math.nan)
        self._history.append(
            DampingRecord(
                step=step,
                estimate=raw.value,
                stderr=raw.stderr,
                decision=decision,
                reason=reason,
                damping=self._delta,
                batch_size=int(batch_size),
                loss=loss,
                folded=folded,
            )
        )
        if decision != "accept":
            self._warn_once(
                kind,
                f"LinearShrinkageDamper: {decision} at step {step}: {reason}; damping "
                f"{self._delta:.4g} (recorded in history; warned once per kind)",
            )

    def _warn_once(self, kind: str, message: str) -> None:
        if kind not in self._warned:
            self._warned.add(kind)
            warnings.warn(message, CurvlabWarning, stacklevel=4)

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume exactly: a versioned snapshot (no references to the
        damper's own objects)."""
        return {
            "version": _state.VERSION,
            "damping": self._delta,
            "tau": self._tau,
            "steps": self.steps,
            "history": [asdict(r) for r in self._history],
            "rng_state": self._gen.get_state(),
            "indices": None if self._indices is None else self._indices.clone(),
            "losses": [_float(v) for v in self._losses],
            "largest": self._largest,
            "warned": sorted(self._warned),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`, all or nothing, and push the damping to the sinks.

        Raises
        ------
        InvalidInputError
            Not a damper state (wrong version, missing or malformed entries, a damping that
            is not finite and positive); the damper is left unchanged.
        """
        values = _state.parse(state, self._gen)
        self._delta = values["damping"]
        self._tau = values["tau"]
        self.steps = values["steps"]
        self._history = values["history"]
        self._gen.set_state(values["rng_state"])
        self._indices = values["indices"]
        self._losses = deque(values["losses"], maxlen=self.guard.loss_window)
        self._largest = values["largest"]
        self._warned = values["warned"]
        self._push()


# ---------------------------------------------------------------------- helpers
def _float(value: Any) -> float:
    return float(value.detach()) if isinstance(value, torch.Tensor) else float(value)


def _unwrapped(model):
    from curvlab.model_view import unwrap

    return unwrap(model)


def _estimator_source(spec: Any):
    """(factory or None, estimator or None) from ``estimator=``."""
    if isinstance(spec, CurvatureEstimator):
        return None, spec
    if isinstance(spec, str):
        from curvlab.registry import estimator, get_spec

        get_spec(spec)  # an unknown backend fails now, not at the first update
        return functools.partial(estimator, spec), None
    if callable(spec):
        return spec, None
    raise InvalidInputError(
        "estimator must be a backend name, a CurvatureEstimator or a factory "
        f"(model, loss_fn, data, curvature=...) -> CurvatureEstimator; got {type(spec).__name__}"
    )


__all__ = ["DEFAULT_UPDATE_RULE", "LinearShrinkageDamper"]
