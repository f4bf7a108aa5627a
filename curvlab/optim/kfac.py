"""KFAC with exact damping from running averages of Kronecker factors (DESIGN.md sec. 4).

For each Linear/Conv2d layer (weight and bias joined as [W | b], Martens & Grosse 2015):

    A_t = decay * A_{t-1} + (1 - decay) * A(batch_t),   A_0 = A(batch_0)   (same for G)
    d   = (G_t (x) A_t + delta I)^-1 g        (exact damping, default)
    d   = (G_t + sqrt(delta)/pi I)^-1 (x) (A_t + pi sqrt(delta) I)^-1 g   (heuristic=True)

with A(batch), G(batch) the KFAC factors of the current batch from a factor source
(:mod:`curvlab.optim.kfac_factors`; by default curvlinops through the registry's ``kfac``
backend), computed on a private hook-free view of the model. The
inverse is applied through the eigendecompositions of A_t and G_t (:mod:`curvlab.kronecker`),
refreshed every ``inverse_update_every`` steps, so a new delta (a damping schedule, a
LinearShrinkageDamper) costs no refactorization; ``n_factorizations`` counts them.

KL clipping (Ba et al. 2017, as in kfac-pytorch): the preconditioned directions of all
KFAC layers are scaled by nu = min(1, sqrt(kl_clip / |lr^2 sum d.g|)). Then, for every
parameter (plain SGD for parameters outside Linear/Conv2d layers: d = g), as torch's SGD:

    d <- d + weight_decay * w;   buf <- momentum * buf + d (buf_0 = d);   w <- w - lr * buf
"""

from __future__ import annotations

import math
import numbers
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.optim import Optimizer

from curvlab._params import resolve_params
from curvlab.damping.resolve import DampingSource, resolve_damping
from curvlab.errors import CurvlabWarning, InvalidInputError, UnsupportedModelError
from curvlab.kronecker import (
    LayerEigen,
    count_factors,
    eigendecompose,
    exact_inverse,
    heuristic_inverse,
    kronecker_blocks,
    precondition,
    split_params,
)
from curvlab.losses import LIKELIHOOD_LOSSES, LossSpec
from curvlab.model_view import ModelView, unwrap
from curvlab.optim._legacy import kfac_from_legacy
from curvlab.optim.kfac_factors import FactorSource, as_factor_source
from curvlab.validation import (
    check_int,
    check_nonnegative,
    check_optional,
    check_positive,
    check_probability,
)

_EIG_KEYS = ("eigvals_A", "eigvecs_A", "eigvals_G", "eigvecs_G")


def _finite(tensors: Iterable[torch.Tensor | None]) -> bool:
    flat = [t.reshape(-1) for t in tensors if t is not None]
    return not flat or bool(torch.isfinite(torch.cat(flat)).all())


@dataclass
class Recorded:
    """What a :class:`BatchCapture` saw: the model's inputs and the loss targets, in call
    order, and a problem with a call (reported by :meth:`batches`).

    Attributes
    ----------
    inputs : list of torch.Tensor
        The model's inputs x (detached).
    targets : list of torch.Tensor
        The loss targets y (detached).
    problem : str or None, default None
        A call that cannot be used, described.

    Examples
    --------
    >>> import torch
    >>> from curvlab.optim.kfac import Recorded
    >>> seen = Recorded(inputs=[torch.ones(2, 3)], targets=[torch.zeros(2)])
    >>> [tuple(t.shape) for t in seen.batches()[0]]
    [(2, 3), (2,)]
    """

    inputs: list[torch.Tensor] = field(default_factory=list)
    targets: list[torch.Tensor] = field(default_factory=list)
    problem: str | None = None

    def batches(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The recorded (x, y) pairs.

        Returns
        -------
        list of (torch.Tensor, torch.Tensor)
            In call order.

        Raises
        ------
        InvalidInputError
            Nothing recorded, unequal numbers of model and loss calls, or unusable calls.
        """
        fix = "or call opt.step((x, y)) with the batch"
        if self.problem is not None:
            raise InvalidInputError(f"{self.problem} ({fix})")
        if not self.inputs or not self.targets:
            seen = "model" if self.targets else "loss_fn" if self.inputs else "model or loss_fn"
            raise InvalidInputError(
                f"KFAC saw no call of the {seen} since the last step: call opt.zero_grad() "
                "before the forward pass, compute the loss with the loss_fn given to KFAC "
                f"(loss = loss_fn(model(x), y)), then loss.backward() and opt.step(); {fix}"
            )
        sizes = [(int(x.shape[0]), int(y.shape[0])) for x, y in zip(self.inputs, self.targets)]
        if len(self.inputs) != len(self.targets) or any(a != b for a, b in sizes):
            raise InvalidInputError(
                f"KFAC saw {len(self.inputs)} model calls and {len(self.targets)} loss calls "
                "with gradients enabled since opt.zero_grad() that do not pair up as "
                f"loss_fn(model(x), y); run other forward passes under torch.no_grad(), {fix}"
            )
        return list(zip(self.inputs, self.targets))


class BatchCapture:
    """The batches of a standard training loop, seen by forward-pre hooks that exist only
    between :meth:`arm` and :meth:`release`.

    While armed, every call ``model(x)`` and ``loss_fn(output, y)`` made with gradients
    enabled records ``x`` and ``y`` (no copies, nothing else is read or changed); calls
    under ``torch.no_grad()`` (evaluation) are ignored. Problems (keyword inputs, several
    inputs) are reported by :meth:`Recorded.batches`, never inside the user's forward.

    Parameters
    ----------
    model : nn.Module
        The model whose calls are recorded.
    loss_fn : nn.Module
        The loss whose calls are recorded.

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> from curvlab.optim.kfac import BatchCapture
    >>> model, loss_fn = nn.Linear(2, 1), nn.MSELoss()
    >>> capture = BatchCapture(model, loss_fn)
    >>> capture.arm()
    >>> x, y = torch.ones(3, 2), torch.zeros(3, 1)
    >>> _ = loss_fn(model(x), y)
    >>> [tuple(t.shape) for t in capture.release().batches()[0]], len(model._forward_pre_hooks)
    ([(3, 2), (3, 1)], 0)
    """

    def __init__(self, model: nn.Module, loss_fn: nn.Module):
        self.model, self.loss_fn = model, loss_fn
        self._handles: list = []
        self._recorded = Recorded()

    def arm(self) -> None:
        """Forget what was recorded and (re)install the two hooks."""
        self.release()
        self._handles = [
            self.model.register_forward_pre_hook(self._on_model, with_kwargs=True),
            self.loss_fn.register_forward_pre_hook(self._on_loss, with_kwargs=True),
        ]

    def release(self) -> Recorded:
        """Remove the hooks and hand over (and forget) what was recorded.

        Returns
        -------
        Recorded
            The calls seen since :meth:`arm`.
        """
        for handle in self._handles:
            handle.remove()
        self._handles = []
        recorded, self._recorded = self._recorded, Recorded()
        return recorded

    def _on_model(self, module, args, kwargs) -> None:
        if not torch.is_grad_enabled():
            return
        if len(args) != 1 or kwargs or not isinstance(args[0], torch.Tensor):
            self._recorded.problem = (
                "the model was called with other than one positional tensor input; KFAC's "
                "standard loop needs model(x)"
            )
            return
        self._recorded.inputs.append(args[0].detach())

    def _on_loss(self, module, args, kwargs) -> None:
        if not torch.is_grad_enabled():
            return
        target = args[1] if len(args) > 1 else kwargs.get("target")
        if not isinstance(target, torch.Tensor):
            self._recorded.problem = (
                "loss_fn was called without a target tensor: call loss_fn(output, y)"
            )
            return
        self._recorded.targets.append(target.detach())


class KFAC(Optimizer):
    """K-FAC optimizer on the ``kfac`` backend's factors with exact (or pi-) damping.

    Usage: the usual loop, or one call per batch::

        opt = KFAC(model, nn.CrossEntropyLoss(), lr=0.1, damping=1e-3)
        for x, y in loader:
            opt.zero_grad()
            loss = loss_fn(model(x), y)    # loss_fn: the object given to KFAC
            loss.backward()
            opt.step()

        for x, y in loader:
            loss = opt.step((x, y))        # forward, gradient, factors, update

    **The usual loop** (``step()`` or ``step(closure)``): the direction preconditions the
    gradients in ``.grad``; the factors come from the batches the model saw since
    ``zero_grad()`` (several under gradient accumulation, averaged over their samples).
    KFAC sees them through two forward-pre hooks, on the model and on ``loss_fn``, that
    record ``x`` and ``y`` of calls made with gradients enabled; they are installed by
    ``zero_grad()`` (and at construction) and removed by ``step()``, so after a step
    neither object carries a hook of KFAC's, and forward passes under ``torch.no_grad()``
    are ignored. **step(batch)** evaluates ``loss_fn(model(x), y)``, differentiates it
    with ``torch.autograd.grad`` (``.grad`` is neither read nor written), updates the
    factors and the parameters, and returns the detached loss. Both give the same
    parameters, bitwise, on the same batches.

    Either way the factors come from a second pass on the batch through the factor source
    (by default curvlinops, on a private hook-free view of the model: the model's own hooks,
    such as kfac-pytorch's, never fire, BatchNorm statistics are not updated, and dropout
    draws its masks from ``seed + step``, leaving the global RNG untouched). Learning-rate
    schedulers work as with any torch optimizer (one param group).

    Parameters
    ----------
    model : nn.Module
        The model (a DistributedDataParallel or torch.compile wrapper is unwrapped for the
        factors; the usual loop records the calls of the object given).
    loss_fn : nn.Module
        A mean-reduced MSELoss, CrossEntropyLoss or BCEWithLogitsLoss (the losses
        curvlinops' KFAC supports).
    params : iterable of torch.Tensor, optional
        The parameters to train (default: those with ``requires_grad``).
    lr : float, default 0.01
        The learning rate.
    damping : float, callable or damper, default 1e-3
        delta > 0: a float (stored in the param group, so ``damper.attach(opt,
        key="damping")`` works), a callable of the step count, or an object with a
        ``damping`` attribute (a LinearShrinkageDamper). Callables and dampers are read at
        every step and not saved in ``state_dict`` (save the damper's own state).
    factor_decay : float, default 0.95
        Running-average weight of the old factors (the first update uses the batch factors
        as they are).
    factor_update_every, inverse_update_every : int, default 1
        Factors are updated at steps t with t % factor_update_every == 0 and
        eigendecomposed at t % inverse_update_every == 0 (t = 0, 1, ...; step 0 does both).
    momentum, weight_decay : float, default 0
        As in torch's SGD (weight decay is not preconditioned, as in kfac-pytorch).
    kl_clip : float or None, default None
        The KL-clipping bound (None: off).
    heuristic_damping : bool, default False
        Use pi-damping instead of exact damping.
    factors : factor source or str, optional
        Computes the Kronecker factors of a batch (:mod:`curvlab.optim.kfac_factors`):
        default ``KFACFactors()`` (curvlinops' KFAC with Monte-Carlo labels, seeded by
        ``seed + t``); ``KFACFactors(fisher_type="type-2")`` for the exact output Hessian,
        ``"empirical"`` for the true labels' gradients (the strings are aliases of those
        objects); or any callable ``(model, loss_fn, params, batches, *, seed) -> {layer:
        (A, G)}``.
    seed : int, default 0
        The factor source's seed at step t is ``seed + t``.
    **deprecated : Any
        The keywords ``fisher_type``, ``mc_samples`` and ``kfac_approx`` (before issue 17)
        still work for one release, with a DeprecationWarning: they are ``KFACFactors``'s
        now.

    Raises
    ------
    InvalidInputError
        For a loss without a likelihood, or an option out of range.

    Notes
    -----
    A step whose loss, gradient or factors are not finite leaves the parameters, factors,
    momentum and step count unchanged and warns with a :class:`~curvlab.CurvlabWarning`.
    Parameters outside Linear/Conv2d layers get SGD steps; one warning at construction
    lists them. The state (factors, eigendecompositions, momentum, step count) round-trips
    through ``state_dict``, so resuming reproduces training bitwise.

    References
    ----------
    J. Martens and R. Grosse, "Optimizing Neural Networks with Kronecker-factored
    Approximate Curvature", ICML 2015. J. Ba, R. Grosse and J. Martens, "Distributed
    Second-Order Optimization using Kronecker-Factored Approximations", ICLR 2017.

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> from curvlab.optim import KFAC
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <torch._C.Generator object at ...>
    >>> model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    >>> loss_fn = nn.CrossEntropyLoss()
    >>> x, y = torch.randn(32, 4), torch.randint(0, 3, (32,))
    >>> opt = KFAC(model, loss_fn, lr=0.1, damping=1e-2)
    >>> for _ in range(3):
    ...     opt.zero_grad()
    ...     loss_fn(model(x), y).backward()
    ...     opt.step()
    >>> opt.steps, sorted(opt.factors())
    (3, ['0', '2'])
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: nn.Module,
        *,
        params: Iterable[torch.Tensor] | None = None,
        lr: float = 0.01,
        damping: DampingSource = 1e-3,
        factor_decay: float = 0.95,
        factor_update_every: int = 1,
        inverse_update_every: int = 1,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        kl_clip: float | None = None,
        heuristic_damping: bool = False,
        factors: FactorSource | str | None = None,
        seed: int = 0,
        **deprecated,
    ):
        factors = kfac_from_legacy(factors, deprecated)
        check_positive("lr", lr)
        check_probability("factor_decay", factor_decay)
        check_probability("momentum", momentum)
        check_nonnegative("weight_decay", weight_decay)
        check_optional(check_positive, "kl_clip", kl_clip, fix="or None for no clipping")
        check_int("factor_update_every", factor_update_every, minimum=1)
        check_int("inverse_update_every", inverse_update_every, minimum=1)
        if LossSpec(loss_fn).kind is None:
            raise InvalidInputError(
                f"KFAC needs {LIKELIHOOD_LOSSES} as loss_fn, got {type(loss_fn).__name__}"
            )
        is_number = isinstance(damping, numbers.Real)
        if is_number:
            resolve_damping(damping, 0)
        module = unwrap(model)
        chosen, names = resolve_params(module, params)
        defaults = {
            "lr": lr,
            "damping": float(damping) if is_number else None,
            "momentum": momentum,
            "weight_decay": weight_decay,
            "factor_decay": factor_decay,
            "kl_clip": kl_clip,
        }
        super().__init__(chosen, defaults)
        self._damping_source = None if is_number else damping
        self.model, self.loss_fn = model, loss_fn
        self.factor_update_every = factor_update_every
        self.inverse_update_every = inverse_update_every
        self.heuristic_damping, self.seed = heuristic_damping, int(seed)
        self.n_factorizations = 0
        self._params = list(chosen)
        kfac_idx, other = split_params(module, names)
        self._kfac_idx = kfac_idx
        self._blocks = kronecker_blocks(module, [chosen[i] for i in kfac_idx]) if kfac_idx else []
        self.factor_source = None
        if self._blocks:  # the factor source computes them, on a hook-free view
            self.factor_source = as_factor_source(factors)
            self._view = ModelView(module, [names[i] for i in kfac_idx])
        self._layers = list(dict.fromkeys(b.layer for b in self._blocks))
        # each layer's state lives with its first parameter
        self._anchor = {}
        for b in self._blocks:
            first = b.weight if b.weight is not None else b.bias
            self._anchor.setdefault(b.layer, chosen[kfac_idx[first]])
        self._capture = BatchCapture(model, loss_fn)
        if self._blocks:
            self._capture.arm()
        if other:
            warnings.warn(
                "KFAC preconditions the weights and biases of Linear and Conv2d layers only; "
                f"these parameters get plain SGD steps: {', '.join(other)}",
                CurvlabWarning,
                stacklevel=2,
            )

    # ------------------------------------------------------------------ state
    def add_param_group(self, param_group: dict) -> None:
        """KFAC holds one param group, built from the model at construction.

        Parameters
        ----------
        param_group : dict
            Accepted only while building the optimizer.

        Raises
        ------
        InvalidInputError
            For a second group.
        """
        if self.param_groups:
            raise InvalidInputError("KFAC takes one param group (built from the model)")
        super().add_param_group(param_group)

    @property
    def steps(self) -> int:
        """Completed steps (skipped non-finite steps excluded)."""
        return int(self.state[self._params[0]].get("step", 0))

    def factors(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Layer name -> running averages (A, G) (empty before the first step).

        Returns
        -------
        dict of str to (torch.Tensor or None, torch.Tensor)
            A is None for a layer whose only trained parameter is its bias.
        """
        return {
            layer: (self.state[a]["A"], self.state[a]["G"])
            for layer, a in self._anchor.items()
            if "G" in self.state[a]
        }

    def _damping(self, step: int) -> float:
        group = self.param_groups[0]
        source = group["damping"] if self._damping_source is None else self._damping_source
        value = resolve_damping(source, step)
        group["damping"] = value
        return value

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Reset the gradients (as torch's optimizers do) and start recording the batches of
        the next forward passes (see the class docstring).

        Parameters
        ----------
        set_to_none : bool, default True
            As in ``torch.optim.Optimizer.zero_grad``.
        """
        super().zero_grad(set_to_none)
        if self._blocks:
            self._capture.arm()

    # ------------------------------------------------------------------ step
    def _check_batch(self, batch) -> tuple[torch.Tensor, torch.Tensor]:
        if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
            raise InvalidInputError(
                "KFAC.step takes the batch (x, y), a closure, or nothing after "
                "loss.backward(): call opt.step((x, y)) or opt.step() (see the class docstring)"
            )
        return batch[0], batch[1]

    @staticmethod
    def _skip(what: str, buffers=None) -> None:
        if buffers is not None:
            with torch.no_grad():  # our forward pass updated BatchNorm statistics: undo it
                for b, value in buffers:
                    b.copy_(value)
        warnings.warn(
            f"KFAC skipped a step: the {what} is not finite; parameters, factors and momentum "
            "are unchanged (lower the learning rate or raise the damping)",
            CurvlabWarning,
            stacklevel=3,
        )

    def _new_factors(self, batches, step: int, group: dict) -> dict[str, tuple[torch.Tensor, ...]]:
        """Running averages after this step's factor update."""
        view = self._view
        view.sync()  # buffers, modes and replaced parameters of the user's model
        coupled = view.batch_coupled()
        if coupled and len(batches) > 1:
            raise UnsupportedModelError(
                f"train-mode BatchNorm ({', '.join(coupled[:3])}) normalises each batch with "
                f"its own statistics, so the factors of {len(batches)} accumulated batches "
                "are not defined: step on one batch per zero_grad(), or call model.eval()"
            )
        fresh = self.factor_source(
            view.module, self.loss_fn, view.parameters, batches, seed=self.seed + step
        )
        decay = group["factor_decay"]
        out = {}
        for layer, (A, G) in fresh.items():
            old = self.state[self._anchor[layer]]
            if "G" in old:
                A = None if A is None else decay * old["A"] + (1 - decay) * A
                G = decay * old["G"] + (1 - decay) * G
            out[layer] = (A, G)
        return out

    def _eigen(self, factors: dict, refresh: bool) -> dict:
        if refresh:
            eig = {layer: eigendecompose(A, G) for layer, (A, G) in factors.items()}
            self.n_factorizations += count_factors(factors)
            return eig
        return {
            layer: LayerEigen(*(self.state[a][k] for k in _EIG_KEYS))
            for layer, a in self._anchor.items()
        }

    def step(  # type: ignore[override]
        self, batch=None
    ) -> torch.Tensor | None:
        """One KFAC update.

        Parameters
        ----------
        batch : (x, y), callable or None, default None
            A batch: KFAC evaluates the loss and its gradient itself. None (after
            ``loss.backward()``) or a closure that zeroes the gradients, evaluates the loss,
            calls ``backward`` and returns the loss: the gradients in ``.grad`` are used.

        Returns
        -------
        torch.Tensor or None
            The detached loss for a batch, the closure's loss, or None.
        """
        if batch is None or callable(batch):
            return self._standard_step(batch)
        x, y = self._check_batch(batch)
        self._capture.release()
        params = self._params
        buffers = [(b, b.detach().clone()) for b in self.model.buffers()]
        with torch.enable_grad():
            loss = self.loss_fn(self.model(x), y)
            if loss.numel() != 1:
                raise InvalidInputError("loss_fn must return a scalar (reduction='mean')")
            if not torch.isfinite(loss):
                self._skip("loss", buffers)
                return loss.detach()
            grads = torch.autograd.grad(loss, params, allow_unused=True)
        grads = [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]
        failed = self._update(grads, lambda: [(x, y)])
        if failed is not None:
            self._skip(failed, buffers)
        return loss.detach()

    def _standard_step(self, closure) -> torch.Tensor | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        recorded = self._capture.release()
        if all(p.grad is None for p in self._params):
            raise InvalidInputError(
                "the parameters have no gradients: call loss.backward() before opt.step(), "
                "or pass the batch, opt.step((x, y))"
            )
        grads = [torch.zeros_like(p) if p.grad is None else p.grad for p in self._params]
        failed = self._update(grads, recorded.batches)
        if failed is not None:
            self._skip(failed)
        return loss

    def _update(self, grads: list[torch.Tensor], batches) -> str | None:
        """Precondition ``grads`` and update the parameters, factors and step count; on a
        non-finite quantity change nothing and return its name. ``batches()`` gives the
        batches of this step's factor update."""
        if not _finite(grads):
            return "gradient"
        group = self.param_groups[0]
        step = self.steps
        delta = self._damping(step)
        directions = list(grads)
        factors, eigen = {}, {}
        if self._blocks:
            has_state = "G" in self.state[self._anchor[self._layers[0]]]
            if step % self.factor_update_every == 0 or not has_state:
                factors = self._new_factors(batches(), step, group)
                if not _finite(t for f in factors.values() for t in f):
                    return "Kronecker factors"
            else:
                factors = self.factors()
            refresh = step % self.inverse_update_every == 0 or not has_state
            eigen = self._eigen(factors, refresh)
            scaling = heuristic_inverse(delta) if self.heuristic_damping else exact_inverse(delta)
            local = [grads[i][None] for i in self._kfac_idx]
            pre = [d[0] for d in precondition(self._blocks, eigen, local, scaling)]
            nu = 1.0
            if group["kl_clip"] is not None:
                vg = sum(float((d * g[0]).sum()) for d, g in zip(pre, local))
                vg *= group["lr"] ** 2
                nu = min(1.0, math.sqrt(group["kl_clip"] / abs(vg))) if vg != 0 else 1.0
            for i, d in zip(self._kfac_idx, pre):
                directions[i] = d if nu == 1.0 else nu * d
            if not _finite(directions):
                return "preconditioned direction"
        self._commit(directions, factors, eigen, group)
        self.state[self._params[0]]["step"] = step + 1
        return None

    @torch.no_grad()
    def _commit(self, directions, factors, eigen, group) -> None:
        for layer, anchor in self._anchor.items():
            state = self.state[anchor]
            state["A"], state["G"] = factors[layer]
            e = eigen[layer]
            for key, value in zip(_EIG_KEYS, (e.evals_A, e.evecs_A, e.evals_G, e.evecs_G)):
                state[key] = value
        lr, mom, wd = group["lr"], group["momentum"], group["weight_decay"]
        for p, d in zip(self._params, directions):
            if wd:
                d = d + wd * p
            if mom:
                state = self.state[p]
                buf = state.get("momentum_buffer")
                d = d.clone() if buf is None else mom * buf + d
                state["momentum_buffer"] = d
            p.add_(d, alpha=-lr)
