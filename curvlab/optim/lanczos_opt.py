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
from curvlab.operators import is_operator
from curvlab.optim._legacy import lanczos_from_legacy
from curvlab.optim.eigensolver import EigensolverLike, as_eigensolver
from curvlab.validation import check_choice, check_int, check_positive

_NEGATIVE = ("abs", "clamp")


def lanczos_direction(
    grad: torch.Tensor,
    values: torch.Tensor,
    vectors: torch.Tensor,
    damping: float,
    eta: float = 1.0,
    negative: str = "abs",
) -> torch.Tensor:
    """The bracket of eq. 9 for a flat gradient [P], eigenvalues [k], eigenvectors [P, k].

    (1/eta) sum_i phi_i phi_i^T g / (lambda_i + delta) + (1/delta) (g - sum_i phi_i phi_i^T g),
    with lambda_i replaced by |lambda_i| (``negative="abs"``) or max(lambda_i, 0).

    Parameters
    ----------
    grad : torch.Tensor
        [P] flat gradient g.
    values : torch.Tensor
        [k] eigenvalues lambda_i.
    vectors : torch.Tensor
        [P, k] orthonormal eigenvectors phi_i.
    damping : float
        delta > 0.
    eta : float, default 1.0
        Sharp-direction perturbation.
    negative : {"abs", "clamp"}, default "abs"
        Handling of negative eigenvalues.

    Returns
    -------
    torch.Tensor
        [P] the step direction (before the learning rate).

    References
    ----------
    D. Granziol and N. Baskerville, "A random matrix theory approach to damping in deep
    learning", J. Phys. Complex. 3 (2022), eq. 9.

    Examples
    --------
    >>> import torch
    >>> from curvlab.optim.lanczos_opt import lanczos_direction
    >>> e1 = torch.tensor([[1.0], [0.0]])
    >>> lanczos_direction(torch.tensor([1.0, 1.0]), torch.tensor([3.0]), e1, damping=1.0)
    tensor([0.2500, 1.0000])
    """
    lam = values.abs() if negative == "abs" else values.clamp(min=0)
    coeffs = vectors.T @ grad
    scale = 1.0 / (eta * (lam + damping)) - 1.0 / damping
    return vectors @ (coeffs * scale) + grad / damping


def _check_curvature(curvature: Any) -> None:
    if curvature is None or not (is_operator(curvature) or callable(curvature)):
        raise InvalidInputError(
            "LanczosOPT needs the curvature: an Operator over the optimizer's parameters "
            "(curvlab.estimator(backend, model, loss_fn, data), a fitted shrinkage, ...) or a "
            f"zero-argument factory returning one; got {type(curvature).__name__}"
        )


class LanczosOPT(Optimizer):
    """The update of eq. 9 with the k-dimensional eigenbasis of a curvature operator.

    Parameters
    ----------
    params : iterable of torch.Tensor or of dict
        Parameters or param groups. Each group may set its own ``lr``; ``damping`` and
        ``eta`` act on the joint eigenbasis and must agree across groups.
    curvature : Operator or callable
        The curvature whose top eigenpairs span the sharp directions, over exactly these
        parameters: any :class:`~curvlab.Operator`, such as ``curvlab.estimator("autograd",
        model, loss_fn, data)`` (it follows the parameters as they change and rebuilds its
        graphs) or a fitted shrinkage (``LedoitWolf().fit(est)``, fixed once fitted); or a
        zero-argument factory returning one, called at each refresh (e.g. an estimator on
        a new batch, or a shrinkage refitted to the current curvature). An operator with
        ``params`` (a curvature estimator) is matched to the optimizer's parameters by
        identity and may order them differently; any other operator's vectors are read in
        the flat order of the param groups.
    lr : float, default 0.01
        The learning rate alpha.
    damping : float, callable or object with ``damping``, default 1.0
        delta > 0: a float (stored in the param groups, so ``damper.attach(opt,
        key="damping")`` works), a callable of the step count, or an object with a
        ``damping`` attribute such as a LinearShrinkageDamper (read at every step; save
        its own ``state_dict`` alongside the optimizer's).
    eta : float, default 1.0
        Sharp-direction perturbation (eq. 9's 1/eta); 1 is the plain LanczosOPT.
    k : int, default 50
        Number of eigenpairs (``which="largest"``); the paper uses 50.
    refresh_every : int, default 1
        Steps between eigenbasis recomputations.
    negative : {"abs", "clamp"}, default "abs"
        Handling of negative eigenvalues (module docstring).
    eigensolver : Eigensolver, mapping or callable, optional
        How the eigenpairs are computed: :class:`~curvlab.optim.Eigensolver` settings (``tol``,
        ``max_iter``, ``ncv``, ``seed``, ...; the seed used at step t is seed + t), a mapping of
        them, or a callable ``(operator, k, step) -> Eigenpairs``. Default ``Eigensolver()``.
    **deprecated : Any
        The keywords before issue 17 (``estimator_factory``, ``model``, ``loss_fn``,
        ``data``, ``backend``, ``curvature`` as a name, ``estimator_options``, ``tol``,
        ``max_iter``, ``seed``, ``eigenpairs_options``) still work for one release, with a
        DeprecationWarning naming their replacement.

    Raises
    ------
    InvalidInputError
        For a missing or non-operator curvature, a non-positive ``lr``/``eta``/damping,
        ``k`` above the number of parameters, or an unknown ``negative``.

    Notes
    -----
    A step whose loss (from ``closure``) or gradient is not finite leaves the parameters
    and the state unchanged and warns with a :class:`~curvlab.CurvlabWarning`. Parameters
    without a gradient count as zero gradient (the preconditioner may still move them).
    The eigenbasis and step count live in the state of the first parameter, so
    ``state_dict``/``load_state_dict`` resume bitwise. Unconverged Lanczos pairs are used as
    returned (the routine warns with a NotConvergedWarning).

    References
    ----------
    D. Granziol and N. Baskerville, "A random matrix theory approach to damping in deep
    learning", J. Phys. Complex. 3 (2022), eq. 9 and section 5. K. Wu and H. Simon,
    "Thick-restart Lanczos method for large symmetric eigenvalue problems", SIAM J. Matrix
    Anal. Appl. 22 (2000). Y. N. Dauphin et al., "Identifying and attacking the saddle point
    problem in high-dimensional non-convex optimization", NeurIPS (2014) (``negative="abs"``).

    Examples
    --------
    With k = P and eta = 1 a step is the damped Newton step (H + delta I)^-1 g:

    >>> import torch, curvlab
    >>> from curvlab.optim import LanczosOPT
    >>> g = torch.Generator().manual_seed(0)
    >>> x = torch.randn(16, 2, generator=g, dtype=torch.float64)
    >>> y = torch.randn(16, 1, generator=g, dtype=torch.float64)
    >>> model, loss_fn = torch.nn.Linear(2, 1).double(), torch.nn.MSELoss()
    >>> est = curvlab.estimator("autograd", model, loss_fn, (x, y))
    >>> opt = LanczosOPT(model.parameters(), est, lr=1.0, damping=0.1, k=3)
    >>> before = torch.nn.utils.parameters_to_vector(model.parameters()).detach().clone()
    >>> loss_fn(model(x), y).backward()
    >>> grad = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    >>> newton = torch.linalg.solve(est.to_dense() + 0.1 * torch.eye(3, dtype=torch.float64), grad)
    >>> opt.step()
    >>> after = torch.nn.utils.parameters_to_vector(model.parameters()).detach()
    >>> torch.allclose(before - after, newton)
    True
    """

    def __init__(
        self,
        params: Iterable,
        curvature: Any = None,
        *,
        lr: float = 0.01,
        damping: DampingSource = 1.0,
        eta: float = 1.0,
        k: int = 50,
        refresh_every: int = 1,
        negative: str = "abs",
        eigensolver: EigensolverLike | None = None,
        **deprecated: Any,
    ):
        curvature, eigensolver, build = lanczos_from_legacy(curvature, eigensolver, deprecated)
        check_positive("lr", lr)
        check_positive("eta", eta)
        self.k = check_int("k", k, minimum=1)
        self.refresh_every = check_int("refresh_every", refresh_every, minimum=1)
        self.negative = check_choice("negative", negative, _NEGATIVE)
        if build is None:
            _check_curvature(curvature)
        self.eigensolver = as_eigensolver(eigensolver)
        is_number = isinstance(damping, numbers.Real)
        if is_number:
            resolve_damping(damping, 0)
        defaults = {"lr": lr, "damping": float(damping) if is_number else None, "eta": eta}
        super().__init__(params, defaults)
        self._damping_source = None if is_number else damping
        self._params = [p for group in self.param_groups for p in group["params"]]
        self.num_params = sum(p.numel() for p in self._params)
        if self.k > self.num_params:
            raise InvalidInputError(f"k={k} exceeds the number of parameters {self.num_params}")
        self.curvature = curvature if build is None else build(self._params)
        self._groups_fixed = True

    def add_param_group(self, param_group: dict) -> None:
        """Param groups are fixed at construction: the eigenbasis spans all of them.

        Parameters
        ----------
        param_group : dict
            Refused after construction.

        Raises
        ------
        InvalidInputError
            Always, once the optimizer is built (build a new one to add parameters).
        """
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
    def _operator(self) -> Any:
        """The curvature operator for this refresh (the factory's product, checked)."""
        op = self.curvature if is_operator(self.curvature) else self.curvature()
        if not is_operator(op):
            raise InvalidInputError(
                f"the curvature factory returned {type(op).__name__}, not an Operator "
                "(num_params, dtype, device, matvec)"
            )
        own = getattr(op, "params", None)
        if own is not None and sorted(map(id, own)) != sorted(map(id, self._params)):
            raise InvalidInputError(
                "the estimator must differentiate exactly the optimizer's parameters: build it "
                "with params=<the optimizer's parameters> or from the same model"
            )
        if op.num_params != self.num_params:
            raise InvalidInputError(
                f"the curvature operator has {op.num_params} rows but the optimizer's "
                f"parameters have {self.num_params} entries; build it over exactly them"
            )
        return op

    def _refresh(self, step: int) -> None:
        op = self._operator()
        try:
            with torch.enable_grad():
                pairs = self.eigensolver(op, self.k, step)
        finally:
            release = getattr(op, "release", None)  # cached graphs are stale after a step
            if callable(release):
                release()
        cast = {"dtype": self._params[0].dtype, "device": self._params[0].device}
        vectors = pairs.vectors.detach().to(**cast)
        own = getattr(op, "params", None)
        if own is not None and [id(p) for p in own] != [id(p) for p in self._params]:
            vectors = self._to_optimizer_order(own, vectors)
        state = self._global_state
        state["eigenvalues"] = pairs.values.detach().to(**cast).clone()
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
        """One update of eq. 9; returns the closure's loss if one was given.

        The eigenbasis is recomputed first when ``step % refresh_every == 0``.

        Parameters
        ----------
        closure : callable, optional
            Re-evaluates the model and returns the loss (its backward fills ``.grad``).

        Returns
        -------
        torch.Tensor or None
            The closure's loss.

        Warns
        -----
        CurvlabWarning
            When the loss or gradient is not finite (the step is skipped).
        """
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
        check_positive("eta", eta)
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
