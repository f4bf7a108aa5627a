"""The largest stable learning rate on a logarithmic grid, and the preconditioned sharpness
that should set it (paper section 8).

Section 8 reads the largest learning rate that trains stably as a measure of how well an
optimizer's preconditioner B captures the sharpest curvature: to second order (eq. 17) a
step is stable while alpha < 2 / ||B^-1/2 H B^-1/2||_op, for gradient descent
2 / lambda_max(H). :func:`preconditioned_sharpness` measures lambda_1(B^-1/2 H B^-1/2) for
SGD (B = I), Adam/AdamW (B = diag(sqrt(v_hat) + eps)) and curvlab's KFAC
(B = G (x) A + delta I per layer), so alpha * lambda_1 can be reported next to the raw alpha.

Definition used by :func:`largest_stable_lr`: a learning rate is *stable* if, after
``n_steps`` optimizer steps from the same initialization (``model_factory()`` under
``torch.manual_seed(seed)``) over the same batches in the same order (cycled),

1. every training loss along the way was finite,
2. the final training loss over all of ``data`` is finite and strictly below its initial
   value, and
3. for classification (integer labels of at least two classes, [N, C] outputs) the network
   has not collapsed to a constant predictor: the spread of its outputs across the samples
   (the largest per-output standard deviation) is above ``collapse_tol`` times the spread at
   initialization. A network whose ReLUs all died outputs its last bias for every input:
   chance accuracy, a loss near ln(classes), zero spread; its loss can still sit a hair below
   the initial one, so clause 2 alone would call it stable. (For regression a constant can be
   the best predictor, so the clause does not apply.)
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from curvlab._params import _is_batch, as_batches
from curvlab.errors import InvalidInputError, UnsupportedCapabilityError
from curvlab.operators import Operator
from curvlab.validation import check_callable, check_int, check_probability


@dataclass(frozen=True)
class StableLRResult:
    """Outcome of :func:`largest_stable_lr` (grid in ascending order).

    Attributes
    ----------
    lr : float or None
        The largest stable grid value; None if none is stable.
    lrs : tuple of float
        The grid, ascending.
    final_losses : tuple of float
        Training loss after ``n_steps`` (nan/inf where it diverged).
    stable : tuple of bool
        The definition of the module docstring, per grid value.
    collapsed : tuple of bool
        The run ended as a constant classifier (clause 3; always False for regression).
    output_spreads : tuple of float
        Final output spread divided by the initial one (nan where it diverged).
    final_accuracies : tuple of float or None
        Training accuracy after ``n_steps`` for integer class labels, else None.
    initial_loss : float
        The loss of the fresh model.
    n_steps : int
        Steps per grid value.
    sharpness : float or None
        lambda_1(B^-1/2 H B^-1/2) at the end of the run at ``lr`` (``sharpness=True``),
        with H the Hessian of the loss over all of ``data`` and B the optimizer's
        preconditioner at that point; None if not computed.

    References
    ----------
    D. Granziol and N. Baskerville, "A random matrix theory approach to damping in deep
    learning", J. Phys. Complex. 3 (2022), eq. 17-19 and the largest stable learning rates
    of SGD, Adam and KFAC.

    Examples
    --------
    See :func:`largest_stable_lr`.
    """

    lr: float | None
    lrs: tuple[float, ...]
    final_losses: tuple[float, ...]
    stable: tuple[bool, ...]
    collapsed: tuple[bool, ...]
    output_spreads: tuple[float, ...]
    final_accuracies: tuple[float | None, ...]
    initial_loss: float
    n_steps: int
    sharpness: float | None = None

    @property
    def lr_times_sharpness(self) -> float | None:
        """alpha * lambda_1(B^-1/2 H B^-1/2) at the largest stable alpha (stable below 2 to
        second order without momentum, 2 (1 + m) with heavy-ball momentum m)."""
        if self.lr is None or self.sharpness is None:
            return None
        return self.lr * self.sharpness


def default_grid() -> tuple[float, ...]:
    """13 learning rates 1e-5 ... 10, half a decade apart.

    Returns
    -------
    tuple of float
        Ascending.

    Examples
    --------
    >>> from curvlab.optim.stable_lr import default_grid
    >>> grid = default_grid()
    >>> len(grid), grid[0], grid[-1]
    (13, 1e-05, 10.0)
    """
    return tuple(float(v) for v in torch.logspace(-5, 1, 13, dtype=torch.float64))


# ---------------------------------------------------------------------- measurements
@torch.no_grad()
def _outputs(model: nn.Module, batches) -> list[torch.Tensor]:
    return [model(x) for x, _ in batches]


def _loss(outputs, loss_fn, batches) -> float:
    n = sum(int(x.shape[0]) for x, _ in batches)
    with torch.no_grad():
        return (
            sum(float(loss_fn(o, y)) * int(y.shape[0]) for o, (_, y) in zip(outputs, batches)) / n
        )


def _spread(outputs) -> float:
    """The largest standard deviation across samples of any output coordinate."""
    flat = torch.cat([o.reshape(o.shape[0], -1) for o in outputs]).double()
    if flat.shape[0] < 2:
        return math.nan
    return float(flat.std(dim=0).max())


def _is_classification(outputs, batches) -> bool:
    """Integer labels of at least two classes and [N, C] outputs."""
    ys = [y for _, y in batches]
    if any(y.is_floating_point() or y.ndim != 1 for y in ys) or outputs[0].ndim != 2:
        return False
    return int(torch.unique(torch.cat(ys)).numel()) >= 2


def _accuracy(outputs, batches) -> float | None:
    if not _is_classification(outputs, batches):
        return None
    ys = [y for _, y in batches]
    correct = sum(int((o.argmax(1) == y).sum()) for o, y in zip(outputs, ys))
    return correct / sum(int(y.shape[0]) for y in ys)


def _is_kfac(optimizer) -> bool:
    from curvlab.optim.kfac import KFAC

    return isinstance(optimizer, KFAC)


def _train(optimizer_factory, model_factory, loss_fn, data, lr, n_steps, seed):
    """Train one fresh model at ``lr``: (model, optimizer, initial and final measurements)."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = model_factory()
        if not isinstance(model, nn.Module):
            raise InvalidInputError("model_factory must return a torch.nn.Module")
        batches = as_batches(data, next(model.parameters()).device)
        out0 = _outputs(model, batches)
        initial = (_loss(out0, loss_fn, batches), _spread(out0))
        optimizer = optimizer_factory(model, lr)
        kfac = _is_kfac(optimizer)
        for t in range(n_steps):
            x, y = batches[t % len(batches)]
            if kfac:  # curvlab's KFAC steps on the batch itself
                loss = optimizer.step((x, y))
            else:

                def closure(x=x, y=y):
                    optimizer.zero_grad()
                    loss = loss_fn(model(x), y)
                    loss.backward()
                    return loss

                loss = optimizer.step(closure)
            value = math.nan if loss is None else float(torch.as_tensor(loss).detach())
            if loss is not None and not math.isfinite(value):
                return model, optimizer, batches, initial, (value, None)
        return model, optimizer, batches, initial, (None, _outputs(model, batches))


def largest_stable_lr(
    optimizer_factory: Callable[[nn.Module, float], torch.optim.Optimizer],
    model_factory: Callable[[], nn.Module],
    loss_fn: Callable,
    data,
    lrs: Sequence[float] | None = None,
    n_steps: int = 100,
    seed: int = 0,
    *,
    collapse_tol: float = 1e-3,
    sharpness: bool = False,
    sharpness_tol: float = 1e-3,
) -> StableLRResult:
    """Train a fresh model at every grid value and report the largest stable one.

    Parameters
    ----------
    optimizer_factory : callable
        ``optimizer_factory(model, lr)`` builds the optimizer (e.g. ``lambda m, lr:
        torch.optim.SGD(m.parameters(), lr=lr)``). Its ``step`` is called with a closure
        that zeroes the gradients, computes the loss on the next batch and back-propagates;
        curvlab's :class:`~curvlab.optim.KFAC` is stepped on the batch itself.
    model_factory : callable
        Builds the model (called under ``torch.manual_seed(seed)``).
    loss_fn : callable
        ``loss_fn(model(x), y)``, mean-reduced.
    data : (x, y) or list of (x, y)
        One batch (full-batch training) or a list of batches, cycled in order.
    lrs : sequence of float, optional
        The grid (default :func:`default_grid`); sorted ascending.
    n_steps : int, default 100
        Training steps per grid value.
    seed : int, default 0
        ``torch.manual_seed(seed)`` before building each fresh model.
    collapse_tol : float, default 1e-3
        For classification, a final output spread at or below ``collapse_tol`` times the
        initial one is a collapse (unstable); 0 turns the clause off. Skipped when the
        initial spread is 0.
    sharpness : bool, default False
        Also measure :func:`preconditioned_sharpness` at the end of the run at the largest
        stable rate.
    sharpness_tol : float, default 1e-3
        Relative tolerance of that eigenvalue.

    Returns
    -------
    StableLRResult
        Stability is defined in the module docstring. The global RNG state is left as found.

    Raises
    ------
    InvalidInputError
        For an empty or non-positive grid, or options out of range.

    References
    ----------
    D. Granziol and N. Baskerville, "A random matrix theory approach to damping in deep
    learning", J. Phys. Complex. 3 (2022) (the largest stable learning rates of SGD, Adam
    and KFAC as a measure of how well sharp directions are estimated).

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> x = torch.diag(torch.tensor([1.0, 10.0 ** 0.5], dtype=torch.float64))
    >>> data = (x, torch.zeros(2, 1, dtype=torch.float64))
    >>> def model_factory():  # L = mean (x.w)^2 = w1^2/2 + 5 w2^2: H = diag(1, 10)
    ...     m = nn.Linear(2, 1, bias=False).double()
    ...     torch.nn.init.ones_(m.weight)
    ...     return m
    >>> res = largest_stable_lr(lambda m, lr: torch.optim.SGD(m.parameters(), lr=lr),
    ...                         model_factory, nn.MSELoss(), data, lrs=[0.1, 0.15, 0.3],
    ...                         n_steps=40, sharpness=True)
    >>> res.lr, round(res.sharpness, 6), round(res.lr_times_sharpness, 3)
    (0.15, 10.0, 1.5)
    """
    grid = default_grid() if lrs is None else tuple(sorted(float(lr) for lr in lrs))
    if not grid or not all(lr > 0 and math.isfinite(lr) for lr in grid):
        raise InvalidInputError(f"lrs must be a non-empty sequence of positive floats, got {lrs}")
    n_steps = check_int("n_steps", n_steps, minimum=1)
    collapse_tol = check_probability("collapse_tol", collapse_tol)
    data = data if _is_batch(data) else list(data)  # a one-pass iterable serves every lr
    finals, stable, collapsed, spreads, accs = [], [], [], [], []
    initial_loss, last_stable = math.nan, None
    for lr in grid:
        model, opt, batches, (loss0, spread0), (bad, outputs) = _train(
            optimizer_factory, model_factory, loss_fn, data, lr, n_steps, seed
        )
        if not math.isfinite(loss0):
            raise InvalidInputError(f"the initial loss is not finite ({loss0}); check the model")
        initial_loss = loss0
        if outputs is None:  # a non-finite loss along the way
            final, ratio, acc = bad, math.nan, None
        else:
            final, acc = _loss(outputs, loss_fn, batches), _accuracy(outputs, batches)
            spread = _spread(outputs)
            ratio = spread / spread0 if spread0 > 0 else math.nan
        is_collapsed = (
            acc is not None and collapse_tol > 0 and math.isfinite(ratio) and ratio <= collapse_tol
        )
        ok = math.isfinite(final) and final < loss0 and not is_collapsed
        finals.append(final)
        stable.append(ok)
        collapsed.append(is_collapsed)
        spreads.append(ratio)
        accs.append(acc)
        if ok:
            last_stable = (model, opt, batches)
    best = max((lr for lr, ok in zip(grid, stable) if ok), default=None)
    sharp = None
    if sharpness and last_stable is not None:
        model, opt, batches = last_stable
        sharp = preconditioned_sharpness(model, loss_fn, batches, opt, tol=sharpness_tol, seed=seed)
    return StableLRResult(
        lr=best,
        lrs=grid,
        final_losses=tuple(finals),
        stable=tuple(stable),
        collapsed=tuple(collapsed),
        output_spreads=tuple(spreads),
        final_accuracies=tuple(accs),
        initial_loss=initial_loss,
        n_steps=n_steps,
        sharpness=sharp,
    )


# ---------------------------------------------------------------------- preconditioners
def _adam_inv_sqrt(optimizer, params) -> list[torch.Tensor]:
    """Per parameter 1 / sqrt(B) for Adam/AdamW: B = sqrt(v / (1 - beta2^t)) + eps."""
    scales = []
    groups = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    for p in params:
        group, state = groups[id(p)], optimizer.state.get(p, {})
        if "exp_avg_sq" not in state:
            raise InvalidInputError(
                "the Adam optimizer has not taken a step for every parameter yet: its "
                "preconditioner is undefined; call this after training"
            )
        v = state["max_exp_avg_sq"] if group.get("amsgrad") else state["exp_avg_sq"]
        step = float(state["step"])
        correction = 1.0 - group["betas"][1] ** step
        denom = (v / correction).sqrt() + group["eps"]
        scales.append(denom.rsqrt())
    return scales


class _KFACInvSqrt:
    """(G (x) A + delta I)^-1/2 per Linear/Conv2d layer of curvlab's KFAC ([W | b] joint
    layout, exact damping); the identity on other parameters (they take SGD steps)."""

    def __init__(self, optimizer, model: nn.Module, params: list[torch.Tensor]):
        if optimizer.heuristic_damping:
            raise UnsupportedCapabilityError(
                "preconditioned_sharpness supports KFAC's exact damping only, not "
                "heuristic_damping=True"
            )
        factors = optimizer.factors()
        if not factors:
            raise InvalidInputError("KFAC has no factors yet; call this after training")
        delta = float(optimizer.param_groups[0]["damping"])
        index = {id(p): i for i, p in enumerate(params)}
        self.layers = []
        for name, (A, G) in factors.items():
            module = model.get_submodule(name)
            w, b = getattr(module, "weight", None), getattr(module, "bias", None)
            iw = None if w is None else index[id(w)]
            ib = None if b is None else index[id(b)]
            lam_g, q_g = torch.linalg.eigh(G)
            if A is None:  # a lone bias
                scale = (lam_g.clamp_min(0) + delta).rsqrt()[:, None]
                self.layers.append((iw, ib, q_g, scale, None))
                continue
            lam_a, q_a = torch.linalg.eigh(A)
            scale = (torch.outer(lam_g.clamp_min(0), lam_a.clamp_min(0)) + delta).rsqrt()
            self.layers.append((iw, ib, q_g, scale, q_a))

    def __call__(self, blocks: list[torch.Tensor]) -> list[torch.Tensor]:
        """``blocks[i]``: [k, *shape of parameter i]; returns B^-1/2 applied to each column."""
        out = list(blocks)
        for iw, ib, q_g, scale, q_a in self.layers:
            parts = []
            if iw is not None:
                parts.append(blocks[iw].reshape(blocks[iw].shape[0], blocks[iw].shape[1], -1))
            if ib is not None:
                parts.append(blocks[ib][..., None])
            m = torch.cat(parts, dim=2)  # [k, d_out, d_in'] (bias column last)
            if q_a is None:
                m = q_g @ (scale * (q_g.T @ m))
            else:
                m = q_g @ (scale * (q_g.T @ m @ q_a)) @ q_a.T
            if iw is not None:
                width = m.shape[2] - (ib is not None)
                out[iw] = m[:, :, :width].reshape(blocks[iw].shape)
            if ib is not None:
                out[ib] = m[:, :, -1].reshape(blocks[ib].shape)
        return out


class _Preconditioned(Operator):
    """B^-1/2 H B^-1/2 for a curvature operator H and a blockwise B^-1/2."""

    def __init__(self, hessian: Operator, params: list[torch.Tensor], inv_sqrt):
        self.hessian, self.inv_sqrt = hessian, inv_sqrt
        self.shapes = [p.shape for p in params]
        self.num_params, self.dtype, self.device = hessian.num_params, hessian.dtype, hessian.device
        self.n_matvecs = 0

    def _apply(self, V: torch.Tensor) -> torch.Tensor:
        k, blocks, start = V.shape[1], [], 0
        for shape in self.shapes:
            size = math.prod(shape)
            blocks.append(V[start : start + size].T.reshape(k, *shape))
            start += size
        return torch.cat([b.reshape(k, -1) for b in self.inv_sqrt(blocks)], dim=1).T

    def _matvec(self, V: torch.Tensor) -> torch.Tensor:
        return self._apply(self.hessian.matvec(self._apply(V).contiguous()))


def preconditioned_sharpness(
    model: nn.Module,
    loss_fn: Callable,
    data,
    optimizer=None,
    *,
    backend: str | Callable[..., Operator] = "autograd",
    tol: float = 1e-3,
    seed: int = 0,
) -> float:
    """lambda_1(B^-1/2 H B^-1/2): the curvature an optimizer's step sees (paper eq. 17-19).

    A step alpha B^-1 g is stable to second order while alpha < 2 / lambda_1 (without
    momentum), so alpha * lambda_1 near 2 means the learning rate is at the edge the
    preconditioner allows.

    Parameters
    ----------
    model : nn.Module
        At the point of interest (e.g. after training).
    loss_fn : callable
        ``loss_fn(model(x), y)``, mean-reduced.
    data : (x, y) or list of (x, y)
        H is the Hessian of the loss averaged over all of it.
    optimizer : torch.optim.Optimizer or KFAC, optional
        None or ``torch.optim.SGD``: B = I (momentum is ignored). ``torch.optim.Adam`` /
        ``AdamW``: B = diag(sqrt(v / (1 - beta2^t)) + eps) from its state (``max_exp_avg_sq``
        with amsgrad). :class:`curvlab.optim.KFAC`: B = G (x) A + delta I per layer from its
        running factors and current damping (exact damping; KL clipping, which only shortens
        steps, is ignored), B = I on parameters outside its layers.
    backend : str or callable, default "autograd"
        What provides H: a backend name (an alias of ``curvlab.estimator(backend, ...)``) or
        a factory ``(model, loss_fn, data, params=...) -> Operator``, such as
        ``functools.partial(curvlab.estimator, "backpack", cache=False)``.
    tol : float, default 1e-3
        Relative tolerance of the Lanczos eigenvalue.
    seed : int, default 0
        Seeds the Lanczos start vector.

    Returns
    -------
    float
        The largest eigenvalue.

    Raises
    ------
    UnsupportedCapabilityError
        For other optimizers (their preconditioner is not known here).

    References
    ----------
    D. Granziol and N. Baskerville, "A random matrix theory approach to damping in deep
    learning", J. Phys. Complex. 3 (2022), eq. 17-19. K. Wu and H. Simon, "Thick-restart
    Lanczos method for large symmetric eigenvalue problems", SIAM J. Matrix Anal. Appl. 22
    (2000).

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> model = nn.Linear(2, 1, bias=False).double()
    >>> x = torch.diag(torch.tensor([1.0, 10.0 ** 0.5], dtype=torch.float64))
    >>> data = (x, torch.zeros(2, 1, dtype=torch.float64))
    >>> round(preconditioned_sharpness(model, nn.MSELoss(), data), 6)  # H = diag(1, 10)
    10.0
    """
    from curvlab.optim.kfac import KFAC
    from curvlab.registry import estimator

    params = [p for p in model.parameters() if p.requires_grad]
    if optimizer is None or type(optimizer) is torch.optim.SGD:
        inv_sqrt = None
    elif isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)):
        scales = _adam_inv_sqrt(optimizer, params)

        def inv_sqrt(blocks, scales=scales):
            return [b * s for b, s in zip(blocks, scales)]

    elif isinstance(optimizer, KFAC):
        inv_sqrt = _KFACInvSqrt(optimizer, model, params)
    else:
        raise UnsupportedCapabilityError(
            f"preconditioned_sharpness knows the preconditioner of SGD, Adam, AdamW and "
            f"curvlab's KFAC, not of {type(optimizer).__name__}"
        )
    build = functools.partial(estimator, backend) if isinstance(backend, str) else backend
    hess = check_callable("backend", build, what="a backend name or an estimator factory")(
        model, loss_fn, data, params=params
    )
    op = hess if inv_sqrt is None else _Preconditioned(hess, params, inv_sqrt)
    try:
        return float(op.eigenpairs(k=1, tol=tol, seed=seed).values[0])
    finally:
        release = getattr(hess, "release", None)
        if callable(release):
            release()


__all__ = ["StableLRResult", "default_grid", "largest_stable_lr", "preconditioned_sharpness"]
