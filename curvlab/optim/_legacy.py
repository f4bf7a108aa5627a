"""The keywords of :class:`~curvlab.optim.LanczosOPT` and :class:`~curvlab.optim.KFAC` before
issue 17, mapped onto the objects that replace them. Each use warns (DeprecationWarning)
with its replacement; they will be removed in the release after next."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch

from curvlab.errors import InvalidInputError

#: LanczosOPT's old keyword -> what replaces it
LANCZOS_REPLACEMENTS = {
    "estimator_factory": "LanczosOPT(params, factory) (the curvature, second argument)",
    "model": "LanczosOPT(params, curvlab.estimator(backend, model, loss_fn, data))",
    "loss_fn": "LanczosOPT(params, curvlab.estimator(backend, model, loss_fn, data))",
    "data": "LanczosOPT(params, curvlab.estimator(backend, model, loss_fn, data))",
    "backend": "curvlab.estimator(backend, ...) as the curvature",
    "curvature": "curvlab.estimator(..., curvature=...) as the curvature",
    "estimator_options": "curvlab.estimator(..., **options) as the curvature",
    "tol": "eigensolver=Eigensolver(tol=...)",
    "max_iter": "eigensolver=Eigensolver(max_iter=...)",
    "seed": "eigensolver=Eigensolver(seed=...)",
    "eigenpairs_options": "eigensolver=Eigensolver(ncv=..., verify=..., ...)",
}
_ESTIMATOR_KEYS = ("model", "loss_fn", "data", "backend", "curvature", "estimator_options")
_SOLVER_KEYS = ("tol", "max_iter", "seed")

#: KFAC's old keyword -> what replaces it
KFAC_REPLACEMENTS = {
    "fisher_type": "factors=KFACFactors(fisher_type=...)",
    "mc_samples": "factors=KFACFactors(mc_samples=...)",
    "kfac_approx": "factors=KFACFactors(kfac_approx=...)",
}


def _warn(owner: str, used: Sequence[str], replacements: dict[str, str]) -> None:
    """One DeprecationWarning at the caller of ``owner``, keywords grouped by replacement."""
    grouped: dict[str, list[str]] = {}
    for key in sorted(used):
        grouped.setdefault(replacements[key], []).append(f"{key}=")
    parts = [
        f"{', '.join(keys)} {'are' if len(keys) > 1 else 'is'} deprecated, use {replacement}"
        for replacement, keys in grouped.items()
    ]
    warnings.warn(f"{owner}: " + "; ".join(parts), DeprecationWarning, stacklevel=4)


def _refuse_unknown(owner: str, legacy: dict, replacements: dict[str, str]) -> None:
    unknown = sorted(set(legacy) - set(replacements))
    if unknown:
        raise TypeError(f"{owner}() got unexpected keyword arguments {unknown}")


def lanczos_from_legacy(
    curvature: Any, eigensolver: Any, legacy: dict
) -> tuple[Any, Any, Callable[[list[torch.Tensor]], Any] | None]:
    """(curvature, eigensolver, build) with LanczosOPT's old keywords applied. ``build``
    (None unless model/loss_fn/data were given) makes the estimator from the optimizer's
    parameters, which are known only after ``Optimizer.__init__``."""
    _refuse_unknown("LanczosOPT", legacy, LANCZOS_REPLACEMENTS)
    if isinstance(curvature, str):  # the old curvature="ggn", beside model=, loss_fn=, data=
        if not any(k in legacy for k in _ESTIMATOR_KEYS):
            raise InvalidInputError(
                f"curvature={curvature!r} names a kind of curvature; pass the operator itself, "
                f"curvlab.estimator(backend, model, loss_fn, data, curvature={curvature!r})"
            )
        legacy, curvature = {**legacy, "curvature": curvature}, None
    if not legacy:
        return curvature, eigensolver, None
    _warn("LanczosOPT", list(legacy), LANCZOS_REPLACEMENTS)
    if "estimator_factory" in legacy:
        if curvature is not None:
            raise InvalidInputError("pass the curvature once: not also estimator_factory=")
        curvature = legacy["estimator_factory"]
    build = None
    if any(k in legacy for k in _ESTIMATOR_KEYS):
        build = _estimator_builder({k: legacy[k] for k in _ESTIMATOR_KEYS if k in legacy})
        if curvature is not None:
            raise InvalidInputError(
                "pass either the curvature (an operator or a factory) or model, loss_fn and "
                "data, not both"
            )
    solver_options = {k: legacy[k] for k in _SOLVER_KEYS if k in legacy}
    solver_options.update(legacy.get("eigenpairs_options") or {})
    if solver_options:
        if eigensolver is not None:
            raise InvalidInputError(
                f"pass the eigensolver settings once: eigensolver= or {sorted(solver_options)}"
            )
        eigensolver = solver_options
    return curvature, eigensolver, build


def _estimator_builder(options: dict) -> Callable[[list[torch.Tensor]], Any]:
    missing = [k for k in ("model", "loss_fn", "data") if options.get(k) is None]
    if missing:
        raise InvalidInputError(f"with model=..., pass loss_fn and data too (missing {missing})")

    def build(params: list[torch.Tensor]) -> Any:
        from curvlab.registry import estimator

        return estimator(
            options.get("backend", "autograd"),
            options["model"],
            options["loss_fn"],
            options["data"],
            curvature=options.get("curvature", "hessian"),
            params=params,
            **(options.get("estimator_options") or {}),
        )

    return build


def kfac_from_legacy(factors: Any, legacy: dict) -> Any:
    """``factors`` with KFAC's old fisher_type/mc_samples/kfac_approx keywords applied."""
    _refuse_unknown("KFAC", legacy, KFAC_REPLACEMENTS)
    if not legacy:
        return factors
    _warn("KFAC", list(legacy), KFAC_REPLACEMENTS)
    if factors is not None:
        raise InvalidInputError(
            f"pass the factor settings once: factors= or {sorted(legacy)}, not both"
        )
    from curvlab.optim.kfac_factors import KFACFactors

    return KFACFactors(**legacy)
