"""KFAC with exact damping from running averages of Kronecker factors (DESIGN.md sec. 4).

For each Linear/Conv2d layer (weight and bias joined as [W | b], Martens & Grosse 2015):

    A_t = decay * A_{t-1} + (1 - decay) * A(batch_t),   A_0 = A(batch_0)   (same for G)
    d   = (G_t (x) A_t + delta I)^-1 g        (exact damping, default)
    d   = (G_t + sqrt(delta)/pi I)^-1 (x) (A_t + pi sqrt(delta) I)^-1 g   (heuristic=True)

with A(batch), G(batch) the KFAC factors of the current batch computed by curvlinops
through :func:`curvlab.adapters.kfac.kronecker_factors` (the ``kfac`` backend's code). The
inverse is applied through the eigendecompositions of A_t and G_t, refreshed every
``inverse_update_every`` steps, so a new delta (a damping schedule, a
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

import torch
from torch import nn
from torch.optim import Optimizer

from curvlab._params import resolve_params
from curvlab.errors import CurvlabWarning, InvalidInputError
from curvlab.losses import LIKELIHOOD_LOSSES, LossSpec
from curvlab.optim.lanczos_opt import DampingSource, resolve_damping

_FISHER_TYPES = ("mc", "type-2", "empirical")
_EIG_KEYS = ("eigvals_A", "eigvecs_A", "eigvals_G", "eigvecs_G")


def _finite(tensors: Iterable[torch.Tensor | None]) -> bool:
    flat = [t.reshape(-1) for t in tensors if t is not None]
    return not flat or bool(torch.isfinite(torch.cat(flat)).all())


class KFAC(Optimizer):
    """K-FAC optimizer on curvlinops' factors with exact (or pi-) damping.

    Usage::

        opt = KFAC(model, nn.CrossEntropyLoss(), lr=0.1, damping=1e-3)
        for x, y in loader:
            loss = opt.step((x, y))        # forward, gradient, factors, update

    ``step(batch)`` evaluates ``loss_fn(model(x), y)``, differentiates it with
    ``torch.autograd.grad`` (``.grad`` is neither read nor written), updates the factors and
    the parameters, and returns the detached loss. The factors come from a second forward
    pass on the same batch (curvlinops'; buffers such as BatchNorm statistics are restored
    after it, dropout draws fresh masks). Learning-rate schedulers work as with any torch
    optimizer (one param group).

    Parameters
    ----------
    model, loss_fn : the model and a mean-reduced MSELoss, CrossEntropyLoss or
        BCEWithLogitsLoss (the losses curvlinops' KFAC supports).
    params : the parameters to train (default: those with ``requires_grad``).
    lr, momentum, weight_decay : as in torch's SGD (weight decay is not preconditioned,
        as in kfac-pytorch).
    damping : delta > 0 — a float (stored in the param group, so ``damper.attach(opt,
        key="damping")`` works), a callable of the step count, or an object with a
        ``damping`` attribute (a LinearShrinkageDamper). Callables and dampers are read at
        every step and not saved in ``state_dict`` (save the damper's own state).
    factor_decay : running-average weight of the old factors (the first update uses the
        batch factors as they are).
    factor_update_every, inverse_update_every : factors are updated at steps t with
        t % factor_update_every == 0 and eigendecomposed at t % inverse_update_every == 0
        (t = 0, 1, ...; step 0 does both).
    kl_clip : None (off) or the KL-clipping bound.
    heuristic_damping : use pi-damping instead of exact damping.
    fisher_type : "mc" (default; ``mc_samples`` labels sampled from the model, seeded by
        ``seed + t``), "type-2" (exact output Hessian; KFAC = GGN for one Linear + MSE) or
        "empirical".
    kfac_approx : "expand" or "reduce" (weight sharing, Eschenhagen et al. 2023).

    A step whose loss, gradient or factors are not finite leaves the parameters, factors,
    momentum and step count unchanged and warns with a :class:`~curvlab.CurvlabWarning`.
    Parameters outside Linear/Conv2d layers get SGD steps; one warning at construction lists
    them. The state (factors, eigendecompositions, momentum, step count) round-trips through
    ``state_dict``, so resuming reproduces training bitwise.
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
        fisher_type: str = "mc",
        mc_samples: int = 1,
        kfac_approx: str = "expand",
        seed: int = 0,
    ):
        from curvlab.adapters import kfac as backend  # lazy: core never imports adapters

        if not lr > 0:
            raise InvalidInputError(f"lr must be positive, got {lr!r}")
        if not 0 <= factor_decay < 1:
            raise InvalidInputError(f"factor_decay must be in [0, 1), got {factor_decay!r}")
        if not 0 <= momentum < 1 or weight_decay < 0:
            raise InvalidInputError("momentum must be in [0, 1) and weight_decay >= 0")
        if kl_clip is not None and not kl_clip > 0:
            raise InvalidInputError(f"kl_clip must be None or positive, got {kl_clip!r}")
        for name, value in (
            ("factor_update_every", factor_update_every),
            ("inverse_update_every", inverse_update_every),
            ("mc_samples", mc_samples),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InvalidInputError(f"{name} must be a positive int, got {value!r}")
        if fisher_type not in _FISHER_TYPES:
            raise InvalidInputError(
                f"fisher_type must be one of {_FISHER_TYPES}, got {fisher_type!r}"
            )
        if mc_samples != 1 and fisher_type != "mc":
            raise InvalidInputError("mc_samples applies to fisher_type='mc' only")
        if kfac_approx not in ("expand", "reduce"):
            raise InvalidInputError(
                f"kfac_approx must be 'expand' or 'reduce', got {kfac_approx!r}"
            )
        if LossSpec(loss_fn).kind is None:
            raise InvalidInputError(
                f"KFAC needs {LIKELIHOOD_LOSSES} as loss_fn, got {type(loss_fn).__name__}"
            )
        is_number = isinstance(damping, numbers.Real)
        if is_number:
            resolve_damping(damping, 0)
        chosen, names = resolve_params(model, params)
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
        self.model, self.loss_fn, self._backend = model, loss_fn, backend
        self.factor_update_every = factor_update_every
        self.inverse_update_every = inverse_update_every
        self.heuristic_damping, self.fisher_type = heuristic_damping, fisher_type
        self.mc_samples, self.kfac_approx, self.seed = mc_samples, kfac_approx, int(seed)
        self.n_factorizations = 0
        self._params = list(chosen)
        kfac_idx, other = backend.split_params(model, names)
        self._kfac_idx = kfac_idx
        self._blocks = (
            backend.kfac_blocks(model, [chosen[i] for i in kfac_idx]) if kfac_idx else []
        )
        self._layers = list(dict.fromkeys(b.layer for b in self._blocks))
        # each layer's state lives with its first parameter
        self._anchor = {}
        for b in self._blocks:
            first = b.weight if b.weight is not None else b.bias
            self._anchor.setdefault(b.layer, chosen[kfac_idx[first]])
        if other:
            warnings.warn(
                "KFAC preconditions the weights and biases of Linear and Conv2d layers only; "
                f"these parameters get plain SGD steps: {', '.join(other)}",
                CurvlabWarning,
                stacklevel=2,
            )

    # ------------------------------------------------------------------ state
    def add_param_group(self, param_group: dict) -> None:
        if self.param_groups:
            raise InvalidInputError("KFAC takes one param group (built from the model)")
        super().add_param_group(param_group)

    @property
    def steps(self) -> int:
        """Completed steps (skipped non-finite steps excluded)."""
        return int(self.state[self._params[0]].get("step", 0))

    def factors(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Layer name -> running averages (A, G) (empty before the first step)."""
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

    # ------------------------------------------------------------------ step
    def _check_batch(self, batch) -> tuple[torch.Tensor, torch.Tensor]:
        if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
            raise InvalidInputError(
                "KFAC.step needs the batch: call opt.step((x, y)) (see the class docstring)"
            )
        return batch[0], batch[1]

    def _skip(self, what: str, loss: torch.Tensor, buffers) -> torch.Tensor:
        with torch.no_grad():  # the forward pass updated BatchNorm statistics: undo it
            for b, value in buffers:
                b.copy_(value)
        warnings.warn(
            f"KFAC skipped a step: the {what} is not finite; parameters, factors and momentum "
            "are unchanged (lower the learning rate or raise the damping)",
            CurvlabWarning,
            stacklevel=3,
        )
        return loss.detach()

    def _new_factors(self, x, y, step: int, group: dict) -> dict[str, tuple[torch.Tensor, ...]]:
        """Running averages after this step's factor update."""
        kfac_params = [self._params[i] for i in self._kfac_idx]
        fresh = self._backend.kronecker_factors(
            self.model,
            self.loss_fn,
            kfac_params,
            [(x, y)],
            fisher_type=self.fisher_type,
            mc_samples=self.mc_samples,
            seed=self.seed + step,
            kfac_approx=self.kfac_approx,
        ).factors
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
            eig = {layer: self._backend.eigendecompose(A, G) for layer, (A, G) in factors.items()}
            self.n_factorizations += sum(int(A is not None) + 1 for A, _ in factors.values())
            return eig
        return {
            layer: self._backend.LayerEigen(*(self.state[a][k] for k in _EIG_KEYS))
            for layer, a in self._anchor.items()
        }

    def step(  # type: ignore[override]
        self, batch: tuple[torch.Tensor, torch.Tensor] | None = None
    ) -> torch.Tensor:
        """One KFAC update on ``batch = (x, y)``; returns the detached loss."""
        x, y = self._check_batch(batch)
        group = self.param_groups[0]
        params = self._params
        step = self.steps
        buffers = [(b, b.detach().clone()) for b in self.model.buffers()]
        with torch.enable_grad():
            loss = self.loss_fn(self.model(x), y)
            if loss.numel() != 1:
                raise InvalidInputError("loss_fn must return a scalar (reduction='mean')")
            if not torch.isfinite(loss):
                return self._skip("loss", loss, buffers)
            grads = torch.autograd.grad(loss, params, allow_unused=True)
        grads = [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]
        if not _finite(grads):
            return self._skip("gradient", loss, buffers)
        delta = self._damping(step)

        directions = list(grads)
        factors, eigen = {}, {}
        if self._blocks:
            has_state = "G" in self.state[self._anchor[self._layers[0]]]
            if step % self.factor_update_every == 0 or not has_state:
                factors = self._new_factors(x, y, step, group)
                if not _finite(t for f in factors.values() for t in f):
                    return self._skip("Kronecker factors", loss, buffers)
            else:
                factors = self.factors()
            refresh = step % self.inverse_update_every == 0 or not has_state
            eigen = self._eigen(factors, refresh)
            scaling = (
                self._backend.heuristic_inverse(delta)
                if self.heuristic_damping
                else self._backend.exact_inverse(delta)
            )
            local = [grads[i][None] for i in self._kfac_idx]
            pre = [d[0] for d in self._backend.precondition(self._blocks, eigen, local, scaling)]
            nu = 1.0
            if group["kl_clip"] is not None:
                vg = sum(float((d * g[0]).sum()) for d, g in zip(pre, local))
                vg *= group["lr"] ** 2
                nu = min(1.0, math.sqrt(group["kl_clip"] / abs(vg))) if vg != 0 else 1.0
            for i, d in zip(self._kfac_idx, pre):
                directions[i] = d if nu == 1.0 else nu * d
            if not _finite(directions):
                return self._skip("preconditioned direction", loss, buffers)

        self._commit(directions, factors, eigen, group)
        self.state[params[0]]["step"] = step + 1
        return loss.detach()

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
