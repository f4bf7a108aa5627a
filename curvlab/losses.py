"""The loss contract: how a mean-reduced loss normalises, and what the Fisher needs.

curvlab takes ``loss_fn(model(x), y)`` averaged the way the loss itself averages, over all
the data an estimator holds, as if it were one batch (DESIGN.md section 5b). Writing the
loss of a batch b as ``L_b = S_b / W_b``, with ``S_b`` the sum of the samples' contributions
and ``W_b`` its normaliser, the loss of all data is ``L = sum_b S_b / W``, ``W = sum_b W_b``:

- a per-sample mean (any loss that averages over samples, elementwise means such as
  MSELoss and BCEWithLogitsLoss included): ``S_b = n_b L_b``, ``W_b = n_b``;
- CrossEntropyLoss / NLLLoss with class-index targets: ``S_b`` the sum-reduced loss and
  ``W_b = sum_n weight[y_n] [y_n != ignore_index]`` (over every position of [N, C, T]
  logits), so class weights, ``ignore_index`` and label smoothing average exactly as torch
  defines them.

Curvature products are ``H(sum_b S_b) v / W``. Per-sample (per-group) products are scaled
by ``N / W`` per sample, so that they always average to the full product; for a plain
per-sample mean this is the curvature of each sample's (group's) own loss.

Losses with ``reduction="sum"`` or ``"none"`` are refused. A plain callable must average
over samples; that is checked on each new batch shape (the loss of a batch must be the
size-weighted mean of its halves' losses).

The Fisher needs a likelihood: for MSELoss, CrossEntropyLoss and BCEWithLogitsLoss with
``l_n = c * (-log p(y_n | f_n)) + const`` the type-2 Fisher is the GGN (canonical links):
CrossEntropyLoss c = 1 (categorical); MSELoss (mean over N*D entries) c = 2/D (unit
Gaussian); BCEWithLogitsLoss c = 1/D (Bernoulli per entry).

Example
-------
>>> import torch
>>> from torch import nn
>>> spec = LossSpec(nn.CrossEntropyLoss(ignore_index=-1))
>>> y = torch.tensor([0, 2, -1, 1])
>>> spec.normaliser(y)
3.0
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn

from curvlab.errors import InvalidInputError, NumericalError, UnsupportedModelError
from curvlab.model_view import hook_free_copy, no_global_hooks

#: The losses with a likelihood (Fisher, BackPACK, KFAC).
LIKELIHOOD_LOSSES = "MSELoss, CrossEntropyLoss or BCEWithLogitsLoss"
_ELEMENTWISE = (
    nn.MSELoss,
    nn.L1Loss,
    nn.SmoothL1Loss,
    nn.HuberLoss,
    nn.BCELoss,
    nn.BCEWithLogitsLoss,
    nn.PoissonNLLLoss,
    nn.SoftMarginLoss,
)
_TARGET_LIKE_OUTPUT = (*_ELEMENTWISE,)
_CLASS_INDEX = (nn.CrossEntropyLoss, nn.NLLLoss)


class LossSpec:
    """What curvlab needs to know about ``loss_fn`` (see module docstring).

    Parameters
    ----------
    loss_fn : callable
        ``loss_fn(output, target)`` returning a scalar averaged over the samples.

    Attributes
    ----------
    kind : {"ce", "mse", "bce", None}
        The likelihood for the Fisher, None where there is none (class weights, label
        smoothing, other losses).
    name : str
        The loss's class name, for messages.

    Raises
    ------
    InvalidInputError
        For a loss that is not callable or not mean-reduced (``reduction="sum"`` or
        ``"none"``).

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> from curvlab.losses import LossSpec
    >>> spec = LossSpec(nn.CrossEntropyLoss(weight=torch.tensor([1.0, 3.0])))
    >>> spec.kind, spec.normaliser(torch.tensor([0, 1, 1]))  # W = 1 + 3 + 3
    (None, 7.0)
    """

    def __init__(self, loss_fn):
        if not callable(loss_fn):
            raise InvalidInputError("loss_fn must be callable as loss_fn(model(x), y)")
        reduction = getattr(loss_fn, "reduction", "mean")
        if reduction not in ("mean", "batchmean"):
            raise InvalidInputError(
                f"{type(loss_fn).__name__} has reduction={reduction!r}; curvlab needs the loss "
                "averaged over samples: use reduction='mean'"
            )
        if isinstance(loss_fn, nn.Module):  # its hooks are the user's: never fire them
            loss_fn = hook_free_copy(loss_fn, functional_layers=False)[0]
        self.loss_fn = loss_fn
        self.name = type(loss_fn).__name__
        self.class_index = isinstance(loss_fn, _CLASS_INDEX)
        self.known = isinstance(loss_fn, (*_CLASS_INDEX, *_ELEMENTWISE)) or (
            isinstance(loss_fn, nn.KLDivLoss) and reduction == "batchmean"
        )
        self._sum = None
        if self.class_index:
            self._sum = copy.copy(loss_fn)
            self._sum.reduction = "sum"
        self.kind = _likelihood(loss_fn)
        self._checked_shapes: set[tuple] = set()

    # ------------------------------------------------------------------ normalisation
    def __call__(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The loss itself (without the user's hooks, global ones included)."""
        with no_global_hooks():
            return self.loss_fn(out, y)

    def summed(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """S_b: the sum of the samples' contributions, with ``loss = S_b / W_b``.

        Parameters
        ----------
        out : torch.Tensor
            The model's output on the batch.
        y : torch.Tensor
            The targets.

        Returns
        -------
        torch.Tensor
            A scalar, differentiable in ``out``.
        """
        if self._sum is not None and not y.is_floating_point():
            with no_global_hooks():
                return self._sum(out, y)
        return out.shape[0] * self(out, y)

    def normaliser(self, y: torch.Tensor) -> float:
        """W_b, the loss's normaliser for targets ``y`` (independent of the parameters).

        Parameters
        ----------
        y : torch.Tensor
            The batch's targets.

        Returns
        -------
        float
            n_b for a per-sample mean; for class-index targets of CrossEntropyLoss /
            NLLLoss, the summed class weights of the labels other than ``ignore_index``.
        """
        if self._sum is None or y.is_floating_point():
            return float(y.shape[0])
        valid = y != self.loss_fn.ignore_index
        if self.loss_fn.weight is None:
            return float(valid.sum())
        w = self.loss_fn.weight.to(y.device)[y.clamp(min=0) * valid]
        return float((w * valid).sum())

    def uniform(self, batches) -> bool:
        """Whether every sample counts once (W_b = n_b): no class weights, no ignored
        labels, no extra positions per sample.

        Parameters
        ----------
        batches : iterable of (torch.Tensor, torch.Tensor)
            The (x, y) batches.

        Returns
        -------
        bool
            True when per-sample rows need no rescaling.
        """
        return all(
            self.normaliser(y) == y.shape[0] or (not self.class_index) for _, y in batches
        ) and not (self.class_index and getattr(self.loss_fn, "weight", None) is not None)

    # ------------------------------------------------------------------ checks
    def check_targets(self, out: torch.Tensor, y: torch.Tensor, where: str) -> None:
        """Refuse targets the loss would silently mis-read (dtype, range, shape).

        Parameters
        ----------
        out : torch.Tensor
            The model's output on the batch.
        y : torch.Tensor
            The targets.
        where : str
            Names the batch in messages (e.g. ``"batch 3"``).

        Raises
        ------
        InvalidInputError
            For labels of the wrong dtype or out of range, targets that torch would
            broadcast against the outputs, or non-floating targets of a regression loss.
        """
        if self.class_index and not y.is_floating_point():
            if y.dtype != torch.long:
                raise InvalidInputError(
                    f"{where}: class labels have dtype {y.dtype}; {self.name} needs torch.long: "
                    "pass y.long()"
                )
            classes = out.shape[1] if out.ndim > 1 else out.shape[0]
            valid = y != self.loss_fn.ignore_index
            bad = valid & ((y < 0) | (y >= classes))
            if bool(bad.any()):
                raise InvalidInputError(
                    f"{where}: labels must lie in [0, {classes}) for the {classes} outputs (or "
                    f"equal ignore_index={self.loss_fn.ignore_index}), found "
                    f"{int(y[bad][0])}"
                )
            expected = (out.shape[0], *out.shape[2:])
            if tuple(y.shape) != expected:
                raise InvalidInputError(
                    f"{where}: {self.name} with outputs {tuple(out.shape)} needs labels of shape "
                    f"{expected}, got {tuple(y.shape)}"
                )
            return
        if self.class_index and isinstance(self.loss_fn, nn.NLLLoss):
            raise InvalidInputError(f"{where}: NLLLoss needs integer class labels (y.long())")
        if self.class_index or isinstance(self.loss_fn, _TARGET_LIKE_OUTPUT):
            if y.shape != out.shape:
                raise InvalidInputError(
                    f"{where}: {self.name} compares outputs of shape {tuple(out.shape)} with "
                    f"targets of shape {tuple(y.shape)}; torch would broadcast them silently. "
                    f"Reshape the targets (e.g. y.view({', '.join(map(str, out.shape))})) or "
                    "the model's output"
                )
            if not y.is_floating_point():
                raise InvalidInputError(
                    f"{where}: {self.name} needs floating-point targets, got {y.dtype}: pass "
                    f"y.to({out.dtype})"
                )
            if y.dtype != out.dtype:
                raise InvalidInputError(
                    f"{where}: targets have dtype {y.dtype} but the outputs {out.dtype}: pass "
                    f"y.to({out.dtype})"
                )
            if isinstance(self.loss_fn, (nn.BCELoss, nn.BCEWithLogitsLoss)) and bool(
                ((y < 0) | (y > 1)).any()
            ):
                raise InvalidInputError(f"{where}: {self.name} targets must lie in [0, 1]")

    def check_batch(self, out: torch.Tensor, y: torch.Tensor, where: str) -> torch.Tensor:
        """Check one batch's targets and its loss: a finite scalar that equals
        ``summed / normaliser`` (and, for a plain callable, the size-weighted mean of its
        halves' losses: a per-sample average). Shapes already seen are not re-checked.

        Parameters
        ----------
        out : torch.Tensor
            The model's output on the batch.
        y : torch.Tensor
            The targets.
        where : str
            Names the batch in messages.

        Returns
        -------
        torch.Tensor
            The batch's loss.

        Raises
        ------
        InvalidInputError
            For bad targets, a non-scalar loss, or a loss that does not average over
            samples.
        NumericalError
            For a loss that is NaN or infinite.
        """
        self.check_targets(out, y, where)
        loss = self(out, y)
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
            raise InvalidInputError(
                f"loss_fn must return a scalar averaged over the batch, got {shape}; "
                "use reduction='mean'"
            )
        if not torch.isfinite(loss):
            raise NumericalError(f"the loss is {loss.item()} on {where}; check data and model")
        shape = (tuple(out.shape), tuple(y.shape))
        if shape in self._checked_shapes:
            return loss
        W = self.normaliser(y)
        with torch.no_grad():
            if W == 0:
                raise InvalidInputError(
                    f"{where}: every label equals ignore_index or has weight 0, so the loss "
                    "has nothing to average"
                )
            summed = self.summed(out, y) / W
            _require_close(summed, loss, "the loss is not the normalised sum of its samples")
            n = out.shape[0]
            if not self.known and n >= 2:
                k = n // 2
                halves = k * self(out[:k], y[:k]) + (n - k) * self(out[k:], y[k:])
                _require_close(
                    halves / n,
                    loss,
                    "loss_fn does not average over samples (the batch loss is not the mean of "
                    "its halves' losses); use a mean-reduced loss",
                )
        self._checked_shapes.add(shape)
        return loss


def _require_close(a: torch.Tensor, b: torch.Tensor, message: str) -> None:
    tol = 1e-4 if b.dtype in (torch.float16, torch.bfloat16, torch.float32) else 1e-10
    if not math.isclose(float(a), float(b), rel_tol=tol, abs_tol=tol * 1e-2):
        raise InvalidInputError(message)


def _likelihood(loss_fn) -> str | None:
    """'ce', 'mse', 'bce' for the losses with a likelihood (no weights), else None."""
    if isinstance(loss_fn, nn.MSELoss):
        return "mse"
    if isinstance(loss_fn, nn.CrossEntropyLoss):
        if loss_fn.weight is not None or loss_fn.label_smoothing != 0.0:
            return None
        return "ce"
    if isinstance(loss_fn, nn.BCEWithLogitsLoss):
        if loss_fn.weight is not None or loss_fn.pos_weight is not None:
            return None
        return "bce"
    return None


def fisher_scale(kind: str, out: torch.Tensor) -> float:
    """c in l_n = c * (-log p): 1 for CE, 2/D for MSE, 1/D for BCE (D outputs per sample).

    Parameters
    ----------
    kind : {"ce", "mse", "bce"}
        The likelihood (``LossSpec.kind``).
    out : torch.Tensor
        The model's output, [n, ...]; D is the size of one sample's output.

    Returns
    -------
    float
        c.

    References
    ----------
    J. Martens, "New insights and perspectives on the natural gradient method", JMLR 21
    (2020) (the Fisher of a likelihood loss equals its GGN for canonical links).

    Examples
    --------
    >>> import torch
    >>> from curvlab.losses import fisher_scale
    >>> fisher_scale("mse", torch.zeros(8, 4)), fisher_scale("ce", torch.zeros(8, 10))
    (0.5, 1.0)
    """
    per_sample = out[0].numel()
    return {"ce": 1.0, "mse": 2.0 / per_sample, "bce": 1.0 / per_sample}[kind]


def sample_residuals(
    kind: str, out: torch.Tensor, mc_samples: int, generator: torch.Generator
) -> torch.Tensor:
    """[M, n, D] scaled gradients sqrt(c) * grad_f(-log p(y~ | f)) at sampled labels y~ ~ p(.|f).

    E over samples of r r^T equals the output Hessian of l_n (Monte-Carlo Fisher).

    Parameters
    ----------
    kind : {"ce", "mse", "bce"}
        The likelihood.
    out : torch.Tensor
        [n, ...] the model's outputs (logits for CE and BCE); CE needs [n, C].
    mc_samples : int
        M, labels drawn per sample.
    generator : torch.Generator
        The draws.

    Returns
    -------
    torch.Tensor
        [M, n, D] residuals.

    Raises
    ------
    UnsupportedModelError
        For CrossEntropyLoss with outputs that are not [n, C].

    References
    ----------
    J. Martens and R. Grosse, "Optimizing neural networks with Kronecker-factored
    approximate curvature", ICML (2015) (the Monte-Carlo Fisher).

    Examples
    --------
    >>> import torch
    >>> from curvlab.losses import sample_residuals
    >>> r = sample_residuals("ce", torch.zeros(3, 4), 2, torch.Generator().manual_seed(0))
    >>> r.shape, bool(torch.allclose(r.sum(-1), torch.zeros(2, 3)))  # p - onehot sums to 0
    (torch.Size([2, 3, 4]), True)
    """
    out = out.detach()
    n = out.shape[0]
    flat = out.reshape(n, -1)
    scale = fisher_scale(kind, out) ** 0.5
    if kind == "ce" and out.ndim != 2:
        raise UnsupportedModelError(
            "the Monte-Carlo Fisher for CrossEntropyLoss needs [N, C] logits"
        )
    draws = []
    for _ in range(mc_samples):
        if kind == "ce":
            probs = torch.softmax(flat, dim=1)
            labels = torch.multinomial(probs, 1, generator=generator).squeeze(1)
            r = probs - torch.nn.functional.one_hot(labels, flat.shape[1]).to(flat.dtype)
        elif kind == "mse":
            r = -torch.randn(flat.shape, generator=generator, dtype=flat.dtype, device=flat.device)
        else:
            probs = torch.sigmoid(flat)
            r = probs - torch.bernoulli(probs, generator=generator)
        draws.append(scale * r)
    return torch.stack(draws)


__all__ = ["LIKELIHOOD_LOSSES", "LossSpec", "fisher_scale", "sample_residuals"]
