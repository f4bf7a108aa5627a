"""LanczosOPT: the paper's low-rank damped Newton step (eq. 9, section 5).

With g the gradient, (lambda_i, phi_i) the k largest eigenpairs of a curvature estimate
(found by Lanczos through any :class:`~curvlab.CurvatureEstimator`), damping delta and
sharp-direction perturbation eta,

    w <- w - lr * [ (1/eta) sum_i phi_i phi_i^T g / (lambda_i + delta)
                    + (1/delta) (g - sum_i phi_i phi_i^T g) ].

With k = P and eta = 1 this is the damped Newton step (H + delta I)^-1 g; eta > 1 shrinks
the steps along the sharp directions (the paper's LOPT[eta]). The eigenbasis is recomputed
every ``refresh_every`` steps at the current parameters.

Eigenvalues below -delta would make 1/(lambda + delta) negative or infinite (the paper uses
logistic regression, where H is PSD). ``negative="abs"`` (default) uses |lambda_i| as in
saddle-free Newton (Dauphin et al., 2014); ``negative="clamp"`` uses max(lambda_i, 0), so a
negative direction gets the step 1/(eta delta). Both leave a PSD spectrum unchanged.
"""

from __future__ import annotations

import numbers
import warnings
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch.optim import Optimizer

from curvlab.damping.resolve import DampingSource, resolve_damping
from curvlab.errors import CurvlabWarning, InvalidInputError
from curvlab.estimator import CurvatureEstimator

_NEGATIVE = ("abs", "clamp")


def lanczos_direction(
    grad: torch.Tensor,
    values: torch.Tensor,
    vectors: torch.Tensor,
    damping: float,
    eta: float = 1.0,
    negative: str = "abs",
) -> torch.Tensor:
    """The bracket of eq. 9 for a flat gradient [P], eigenvalues [k], eigenvectors [P, k]."""
    lam = values.abs() if negative == "abs" else values.clamp(min=0)
    coeffs = vectors.T @ grad
    scale = 1.0 / (eta * (lam + damping)) - 1.0 / damping
    return vectors @ (coeffs * scale) + grad / damping


class LanczosOPT(Optimizer):
    """The update of eq. 9 with the k-dimensional eigenbasis from ``est.eigenpairs``.

    Parameters
    ----------
    params : parameters or param groups. Each group may set its own ``lr``; ``damping`` and
        ``eta`` act on the joint eigenbasis and must agree across groups.
    estimator_factory : zero-argument callable returning a CurvatureEstimator over exactly
        these parameters (any backend), e.g. ``lambda: curvlab.estimator("autograd", model,
        loss_fn, batch)``. Called at each refresh. Alternatively pass ``model``,
        ``loss_fn``, ``data`` (and ``backend``, ``curvature``, ``estimator_options``).
    lr : learning rate alpha.
    damping : delta > 0: a float (stored in the param groups, so ``damper.attach(opt,
        key="damping")`` works), a callable of the step count, or an object with a
        ``damping`` attribute such as a LinearShrinkageDamper (read at every step; save
        its own ``state_dict`` alongside the optimizer's).
    eta : sharp-direction perturbation (eq. 9's 1/eta); 1 is the plain LanczosOPT.
    k : number of eigenpairs (``which="largest"``); the paper uses 50.
    refresh_every : steps between eigenbasis recomputations.
    tol, max_iter, seed : passed to ``est.eigenpairs``; the seed used at step t is seed + t.
    negative : "abs" or "clamp": handling of negative eigenvalues (module docstring).
    eigenpairs_options : further keywords of ``est.eigenpairs`` (e.g. ``ncv``, ``verify``).

    A step whose loss (from ``closure``) or gradient is not finite leaves the parameters
    and the state unchanged and warns with a :class:`~curvlab.CurvlabWarning`. Parameters
    without a gradient count as zero gradient (the preconditioner may still move them).
    The eigenbasis and step count live in the state of the first parameter, so
    ``state_dict``/``load_state_dict`` resume bitwise. Unconverged Lanczos pairs are used as
    returned (the routine warns with a NotConvergedWarning).
    """

    def __init__(
        self,
        params: Iterable,
        estimator_factory: Callable[[], CurvatureEstimator] | None = None,
        *,
        lr: float = 0.01,
        damping: DampingSource = 1.0,
        eta: float = 1.0,
        k: int = 50,
        refresh_every: int = 1,
        tol: float = 1e-6,
        max_iter: int | None = None,
        seed: int = 0,
        negative: str = "abs",
        eigenpairs_options: dict | None = None,
        model: torch.nn.Module | None = None,
        loss_fn: Callable | None = None,
        data: Any = None,
        backend: str = "autograd",
        curvature: str = "hessian",
        estimator_options: dict | None = None,
    ):
        if not lr > 0:
            raise InvalidInputError(f"lr must be positive, got {lr!r}")
        if not eta > 0:
            raise InvalidInputError(f"eta must be positive, got {eta!r}")
        for name, value in (("k", k), ("refresh_every", refresh_every)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InvalidInputError(f"{name} must be a positive int, got {value!r}")
        if negative not in _NEGATIVE:
            raise InvalidInputError(f"negative must be one of {_NEGATIVE}, got {negative!r}")
        if (estimator_factory is None) == (model is None):
            raise InvalidInputError(
                "pass either estimator_factory (a callable returning a CurvatureEstimator) "
                "or model, loss_fn and data"
            )
        if model is not None and (loss_fn is None or data is None):
            raise InvalidInputError("with model=..., pass loss_fn and data too")
        is_number = isinstance(damping, numbers.Real)
        if is_number:
            resolve_damping(damping, 0)
        defaults = {"lr": lr, "damping": float(damping) if is_number else None, "eta": eta}
        super().__init__(params, defaults)
        self._damping_source = None if is_number else damping
        self._factory = estimator_factory
        self._model, self._loss_fn, self._data = model, loss_fn, data
        self._backend, self._curvature = backend, curvature
        self._estimator_options = dict(estimator_options or {})
        self.k, self.refresh_every, self.tol, self.max_iter = k, refresh_every, tol, max_iter
        self.seed, self.negative = seed, negative
        self._eigenpairs_options = dict(eigenpairs_options or {})
        self._params = [p for group in self.param_groups for p in group["params"]]
        self.num_params = sum(p.numel() for p in self._params)
        if k > self.num_params:
            raise InvalidInputError(f"k={k} exceeds the number of parameters {self.num_params}")
        self._groups_fixed = True

    def add_param_group(self, param_group: dict) -> None:
        """Param groups are fixed at construction: the eigenbasis spans all of them."""
        if getattr(self, "_groups_fixed", False):
            raise InvalidInputError(
                "LanczosOPT's eigenbasis spans the parameters given at construction; "
                "build a new optimizer to add parameters"
            )
        super().add_param_group(param_group)

    # ------------------------------------------------------------------ state
    @property
    def _global_state(self) -> dict:
        return self.state[self._params[0]]

    @property
    def eigenvalues(self) -> torch.Tensor | None:
        """The current eigenvalues [k] (None before the first step)."""
        return self._global_state.get("eigenvalues")

    @property
    def eigenvectors(self) -> torch.Tensor | None:
        """The current eigenvectors [P, k] in the flat order of the param groups."""
        return self._global_state.get("eigenvectors")

    def _shared(self, key: str) -> float:
        values = {group[key] for group in self.param_groups}
        if len(values) > 1:
            raise InvalidInputError(
                f"all param groups must share one {key!r} (it acts on the joint eigenbasis), "
                f"found {sorted(values)}"
            )
        return values.pop()

    def _damping(self, step: int) -> float:
        if self._damping_source is None:
            return resolve_damping(self._shared("damping"), step)
        value = resolve_damping(self._damping_source, step)
        for group in self.param_groups:
            group["damping"] = value
        return value

    # ------------------------------------------------------------------ eigenbasis
    def _estimator(self) -> CurvatureEstimator:
        if self._factory is not None:
            est = self._factory()
        else:
            from curvlab.registry import estimator

            est = estimator(
                self._backend,
                self._model,
                self._loss_fn,
                self._data,
                curvature=self._curvature,
                params=self._params,
                **self._estimator_options,
            )
        if not isinstance(est, CurvatureEstimator):
            raise InvalidInputError(
                f"estimator_factory returned {type(est).__name__}, not a CurvatureEstimator"
            )
        if sorted(map(id, est.params)) != sorted(map(id, self._params)):
            raise InvalidInputError(
                "the estimator must differentiate exactly the optimizer's parameters: build it "
                "with params=<the optimizer's parameters> or from the same model"
            )
        return est

    def _refresh(self, step: int) -> None:
        est = self._estimator()
        try:
            with torch.enable_grad():
                pairs = est.eigenpairs(
                    k=self.k, which="largest", tol=self.tol, max_iter=self.max_iter,
                    seed=self.seed + step, **self._eigenpairs_options,
                )
        finally:
            est.release()
        vectors = pairs.vectors.detach()
        if [id(p) for p in est.params] != [id(p) for p in self._params]:
            vectors = self._to_optimizer_order(est.params, vectors)
        state = self._global_state
        state["eigenvalues"] = pairs.values.detach().clone()
        state["eigenvectors"] = vectors.clone()

    def _to_optimizer_order(self, est_params, vectors: torch.Tensor) -> torch.Tensor:
        offsets, start = {}, 0
        for p in est_params:
            offsets[id(p)] = (start, p.numel())
            start += p.numel()
        return torch.cat([vectors[s : s + n] for s, n in (offsets[id(p)] for p in self._params)])

    # ------------------------------------------------------------------ step
    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None):
        """One update of eq. 9; returns the closure's loss if one was given."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if all(p.grad is None for p in self._params):
            return loss
        grad = torch.cat(
            [
                (torch.zeros_like(p) if p.grad is None else p.grad).reshape(-1)
                for p in self._params
            ]
        )
        finite_loss = loss is None or bool(torch.isfinite(torch.as_tensor(loss)).all())
        if not finite_loss or not bool(torch.isfinite(grad).all()):
            warnings.warn(
                "LanczosOPT skipped a step: the loss or gradient is not finite; the parameters "
                "are unchanged (lower the learning rate or raise the damping)",
                CurvlabWarning,
                stacklevel=2,
            )
            return loss
        state = self._global_state
        step = int(state.get("step", 0))
        delta, eta = self._damping(step), self._shared("eta")
        if not eta > 0:
            raise InvalidInputError(f"eta must be positive, got {eta!r}")
        if "eigenvectors" not in state or step % self.refresh_every == 0:
            self._refresh(step)
        direction = lanczos_direction(
            grad, state["eigenvalues"], state["eigenvectors"], delta, eta, self.negative
        )
        start = 0
        for group in self.param_groups:
            for p in group["params"]:
                n = p.numel()
                p.add_(direction[start : start + n].view_as(p), alpha=-group["lr"])
                start += n
        state["step"] = step + 1
        return loss
