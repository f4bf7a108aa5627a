"""Where :class:`~curvlab.optim.KFAC` gets the Kronecker factors of a batch: an injectable
factor source.

A factor source is any callable

    source(model, loss_fn, params, batches, *, seed) -> {layer name: (A or None, G)}

with ``model`` the optimizer's private hook-free view of the user's model, ``params`` the
preconditioned weights and biases (of Linear and Conv2d layers, in the optimizer's order),
``batches`` a list of (x, y) pairs and ``seed`` the step's seed (Monte-Carlo labels and
dropout masks). A is the layer's input covariance (None for a bias-only block) and G its
output-gradient covariance, over the samples of all batches (curvlinops' conventions: the
weight and bias of a layer share one A with a row for the bias). Layer names are those of
``model.named_modules()``.

:class:`KFACFactors` is the default: curvlinops' KFAC through the registry's ``kfac``
backend. The strings ``"mc"``, ``"type-2"`` and ``"empirical"`` are aliases of
``KFACFactors(fisher_type=...)``.

References
----------
J. Martens and R. Grosse, "Optimizing Neural Networks with Kronecker-factored Approximate
Curvature", ICML 2015. R. Eschenhagen et al., "Kronecker-Factored Approximate Curvature for
Modern Neural Network Architectures", NeurIPS 2023 (``kfac_approx``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from curvlab.errors import InvalidInputError
from curvlab.validation import check_choice, check_int

FISHER_TYPES = ("mc", "type-2", "empirical")
KFAC_APPROX = ("expand", "reduce")

Factors = Mapping[str, tuple[torch.Tensor | None, torch.Tensor]]
FactorSource = Callable[..., Factors]


class KFACFactors:
    """curvlinops' KFAC factors of a batch (the default factor source of KFAC).

    Parameters
    ----------
    fisher_type : {"mc", "type-2", "empirical"}, default "mc"
        "mc": ``mc_samples`` labels sampled from the model per sample, seeded by the step;
        "type-2": the exact output Hessian (KFAC = GGN for one Linear layer and MSE);
        "empirical": the true labels' gradients.
    mc_samples : int, default 1
        Sampled labels per sample (``fisher_type="mc"`` only).
    kfac_approx : {"expand", "reduce"}, default "expand"
        Weight sharing (Eschenhagen et al. 2023).

    Raises
    ------
    BackendUnavailableError
        curvlinops is not installed (the message says how to install it).

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> from curvlab.optim import KFACFactors
    >>> model = nn.Linear(3, 2).double()
    >>> x, y = torch.randn(8, 3, dtype=torch.float64), torch.randn(8, 2, dtype=torch.float64)
    >>> source = KFACFactors(fisher_type="type-2")
    >>> A, G = source(model, nn.MSELoss(), list(model.parameters()), [(x, y)], seed=0)[""]
    >>> A.shape, G.shape  # [W | b]: 3 inputs and a row for the bias
    (torch.Size([4, 4]), torch.Size([2, 2]))
    """

    def __init__(
        self, fisher_type: str = "mc", mc_samples: int = 1, kfac_approx: str = "expand"
    ):
        self.fisher_type = check_choice("fisher_type", fisher_type, FISHER_TYPES)
        self.mc_samples = check_int("mc_samples", mc_samples, minimum=1)
        if self.mc_samples != 1 and fisher_type != "mc":
            raise InvalidInputError("mc_samples applies to fisher_type='mc' only")
        self.kfac_approx = check_choice("kfac_approx", kfac_approx, KFAC_APPROX)
        from curvlab.registry import resolve

        self._compute = resolve("kfac").batch_factors  # an install hint if missing

    def __call__(
        self,
        model: nn.Module,
        loss_fn: nn.Module,
        params: Sequence[torch.Tensor],
        batches: Sequence[tuple[torch.Tensor, torch.Tensor]],
        *,
        seed: int = 0,
    ) -> dict[str, tuple[torch.Tensor | None, torch.Tensor]]:
        """The factors of ``loss_fn(model(x), y)`` over ``batches`` (module docstring)."""
        return self._compute(
            model,
            loss_fn,
            params,
            batches,
            fisher_type=self.fisher_type,
            mc_samples=self.mc_samples,
            seed=seed,
            kfac_approx=self.kfac_approx,
            batch_seed=seed,
        ).factors

    def __repr__(self) -> str:
        return (
            f"KFACFactors(fisher_type={self.fisher_type!r}, mc_samples={self.mc_samples}, "
            f"kfac_approx={self.kfac_approx!r})"
        )


def as_factor_source(spec: Any) -> FactorSource:
    """The factor source that ``factors=`` names: None (``KFACFactors()``), a fisher type
    (``"mc"``, ``"type-2"``, ``"empirical"``: ``KFACFactors(fisher_type=spec)``), or a
    callable source (module docstring).

    Examples
    --------
    >>> as_factor_source("type-2")
    KFACFactors(fisher_type='type-2', mc_samples=1, kfac_approx='expand')
    """
    if spec is None:
        return KFACFactors()
    if isinstance(spec, str):
        check_choice("factors", spec, FISHER_TYPES, fix="or a factor source object")
        return KFACFactors(fisher_type=spec)
    if callable(spec):
        return spec
    raise InvalidInputError(
        "factors must be a factor source (a callable (model, loss_fn, params, batches, *, "
        "seed) -> {layer: (A, G)}, such as KFACFactors(...)) or one of "
        f"{', '.join(map(repr, FISHER_TYPES))}; got {type(spec).__name__}"
    )


__all__ = ["FISHER_TYPES", "KFACFactors", "as_factor_source"]
