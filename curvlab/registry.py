"""Backend registry: names resolve to adapter classes lazily.

Availability is checked with ``importlib.util.find_spec``, so listing backends never
imports a backend package (``import curvlab`` needs only torch, numpy and scipy).
"""

from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass

from curvlab.errors import BackendUnavailableError, InvalidInputError, UnsupportedCapabilityError
from curvlab.estimator import CURVATURES
from curvlab.results import BackendInfo

#: What each capability name means (the README table uses these columns).
CAPABILITY_DOCS = {
    "matvec": "curvature-vector products",
    "group_matvecs": "per-sample / per-group products with one shared probe",
    "diagonal": "exact diagonal",
    "per_sample_gradients": "individual gradients",
    "per_sample_diagonal": "per-sample diagonal curvature",
    "kronecker_factors": "per-layer Kronecker factors",
    "damped_inverse": "exact damped inverse products",
    "power_iteration": "the backend's own power-iteration eigenvalues",
    "native_trace": "the backend's own trace estimator",
    "native_density": "the backend's own spectral density",
    "damping_callable": "accepts damping as a callable of the step",
}


@dataclass(frozen=True)
class BackendSpec:
    name: str
    target: str  # "module:Class" of the adapter, or "" for integration-only entries
    requires: tuple[str, ...]  # import names that must be importable
    extra: str | None  # pip extra that installs them
    install_hint: str | None
    curvatures: frozenset[str]
    capabilities: frozenset[str]
    description: str

    def available(self) -> bool:
        return all(importlib.util.find_spec(mod) is not None for mod in self.requires)

    def info(self) -> BackendInfo:
        ok = self.available()
        return BackendInfo(
            name=self.name,
            available=ok,
            extra=None if ok else self.extra,
            install_hint=None if ok else self.install_hint,
            curvatures=self.curvatures,
            capabilities=self.capabilities,
            description=self.description,
        )


_REGISTRY: dict[str, BackendSpec] = {}


def register(spec: BackendSpec) -> None:
    """Declare a backend (adapters may be third-party; names must be unique)."""
    _REGISTRY[spec.name] = spec


def _pip_hint(extra: str) -> str:
    return f"pip install 'curvlab[{extra}]'"


register(
    BackendSpec(
        name="autograd",
        target="curvlab.adapters.autograd:AutogradEstimator",
        requires=(),
        extra=None,
        install_hint=None,
        curvatures=frozenset({"hessian", "ggn", "fisher", "ef"}),
        capabilities=frozenset({"matvec", "group_matvecs", "per_sample_gradients"}),
        description="exact products by double backward / torch.func (reference backend)",
    )
)
register(
    BackendSpec(
        name="backpack",
        target="curvlab.adapters.backpack:BackpackEstimator",
        requires=("backpack",),
        extra="backpack",
        install_hint=_pip_hint("backpack"),
        curvatures=frozenset({"hessian", "ggn", "fisher", "ef"}),
        capabilities=frozenset(
            {
                "matvec",
                "group_matvecs",
                "diagonal",
                "per_sample_gradients",
                "per_sample_diagonal",
                "kronecker_factors",
            }
        ),
        description="BackPACK: per-sample quantities, diagonals, KFAC/KFLR/KFRA factors",
    )
)
register(
    BackendSpec(
        name="pyhessian",
        target="curvlab.adapters.pyhessian:PyHessianEstimator",
        requires=("pyhessian",),
        extra="pyhessian",
        install_hint=_pip_hint("pyhessian"),
        curvatures=frozenset({"hessian"}),
        capabilities=frozenset({"matvec", "power_iteration", "native_trace", "native_density"}),
        description="PyHessian 0.1: cached-graph Hessian products, its power iteration",
    )
)
register(
    BackendSpec(
        name="kfac",
        target="curvlab.adapters.kfac:KFACEstimator",
        requires=("curvlinops",),
        extra="kfac",
        install_hint=_pip_hint("kfac"),
        curvatures=frozenset({"ggn", "fisher", "ef"}),
        capabilities=frozenset({"matvec", "diagonal", "kronecker_factors", "damped_inverse"}),
        description="curvlinops KFAC/EKFAC: Kronecker-factored curvature, exact damped inverse",
    )
)
register(
    BackendSpec(
        name="kfac-pytorch",
        target="",
        requires=("kfac",),
        extra=None,
        install_hint=(
            "kfac-pytorch is not on PyPI: install it from its source repository "
            "(gpauloski/kfac-pytorch); curvlab integrates with it through "
            "KFACPreconditioner(damping=curvlab.adapters.kfac_pytorch.damping_schedule(damper))"
        ),
        curvatures=frozenset(),
        capabilities=frozenset({"damping_callable"}),
        description="kfac-pytorch integration: LinearShrinkageDamper as its damping schedule",
    )
)


def backends() -> dict[str, BackendInfo]:
    """Every registered backend: availability, the extra to install, and capabilities."""
    return {name: spec.info() for name, spec in _REGISTRY.items()}


def get_spec(name: str) -> BackendSpec:
    if not isinstance(name, str) or name not in _REGISTRY:
        raise InvalidInputError(
            f"unknown backend {name!r}; choose one of {', '.join(sorted(_REGISTRY))}"
        )
    return _REGISTRY[name]


def resolve(name: str):
    """The adapter class behind ``name``, importing it (and its package) only now."""
    spec = get_spec(name)
    if not spec.target:
        raise UnsupportedCapabilityError(
            f"{name!r} is an integration, not an estimator backend: {spec.description}"
        )
    missing = [m for m in spec.requires if importlib.util.find_spec(m) is None]
    if missing:
        raise BackendUnavailableError(
            f"backend {name!r} needs {', '.join(missing)}, which is not installed: "
            f"{spec.install_hint}"
        )
    module_name, class_name = spec.target.split(":")
    return getattr(importlib.import_module(module_name), class_name)


def estimator(backend, model, loss_fn, data, curvature="hessian", params=None, **options):
    """Build the curvature estimator of ``backend`` (see :class:`CurvatureEstimator`)."""
    spec = get_spec(backend)
    if curvature not in CURVATURES:
        raise InvalidInputError(
            f"unknown curvature {curvature!r}; choose one of {', '.join(CURVATURES)}"
        )
    if spec.target and curvature not in spec.curvatures:
        offers = sorted(s.name for s in _REGISTRY.values() if curvature in s.curvatures)
        raise UnsupportedCapabilityError(
            f"backend {backend!r} does not provide curvature {curvature!r}; "
            f"backends that do: {', '.join(offers)}"
        )
    cls = resolve(backend)
    return cls(model, loss_fn, data, curvature=curvature, params=params, **options)


def capability_table() -> str:
    """The README's backends x capabilities table, generated from the declarations."""
    caps = sorted({c for spec in _REGISTRY.values() for c in spec.capabilities})
    header = ["backend", "extra", *CURVATURES, *caps]
    rows = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name in sorted(_REGISTRY):
        spec = _REGISTRY[name]
        extra = f"`{spec.extra}`" if spec.extra else ("core" if not spec.requires else "source")
        cells = [f"`{name}`", extra]
        cells += ["yes" if c in spec.curvatures else "" for c in CURVATURES]
        cells += ["yes" if c in spec.capabilities else "" for c in caps]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)
