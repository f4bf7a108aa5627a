"""Backend registry: names resolve to adapter classes lazily.

Availability is checked with ``importlib.util.find_spec``, so listing backends never
imports a backend package (``import curvlab`` needs only torch, numpy and scipy). A new
backend is one adapter class plus one :func:`register` call with its :class:`BackendSpec`.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from curvlab.errors import BackendUnavailableError, InvalidInputError, UnsupportedCapabilityError
from curvlab.estimator import CURVATURES
from curvlab.results import BackendInfo

if TYPE_CHECKING:
    import torch
    from torch import nn

    from curvlab.estimator import CurvatureEstimator

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
    """What the registry knows about a backend before importing anything of it.

    Attributes
    ----------
    name : str
        The name users pass to :func:`estimator` (unique).
    target : str
        ``"module:Class"`` of the adapter (a ``CurvatureEstimator`` subclass), or ``""``
        for an integration that is not an estimator (such as kfac-pytorch's).
    requires : tuple of str
        Import names that must be importable for the backend to be available.
    extra : str or None
        The pip extra of curvlab that installs them (None: nothing to install).
    install_hint : str or None
        The command or instructions shown when the backend is missing.
    curvatures : frozenset of str
        The curvatures it computes, a subset of ``curvlab.CURVATURES``.
    capabilities : frozenset of str
        What it can do beyond products, named as in ``CAPABILITY_DOCS``.
    description : str
        One line for ``curvlab backends`` and the README table.

    Examples
    --------
    >>> from curvlab.registry import get_spec
    >>> spec = get_spec("autograd")
    >>> spec.target, spec.available()
    ('curvlab.adapters.autograd:AutogradEstimator', True)
    """

    name: str
    target: str
    requires: tuple[str, ...]
    extra: str | None
    install_hint: str | None
    curvatures: frozenset[str]
    capabilities: frozenset[str]
    description: str

    def available(self) -> bool:
        """Whether every package in ``requires`` can be imported (nothing is imported).

        Returns
        -------
        bool
            True when ``importlib.util.find_spec`` finds each required package.
        """
        return all(importlib.util.find_spec(mod) is not None for mod in self.requires)

    def info(self) -> BackendInfo:
        """The user-facing summary: availability, and the extra and hint when missing.

        Returns
        -------
        BackendInfo
            What :func:`backends` reports for this backend (``extra`` and
            ``install_hint`` are None when it is available).
        """
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
    """Declare a backend; a later spec of the same name replaces the earlier one.

    Adapters may be third-party: the class named by ``spec.target`` is imported only when
    the backend is first used.

    Parameters
    ----------
    spec : BackendSpec
        The backend's name, adapter target, requirements and capabilities.

    Examples
    --------
    A third-party backend is a ``CurvatureEstimator`` subclass in its own package and one
    spec; ``register(spec)`` then makes ``curvlab.estimator("my-backend", ...)`` import
    the class on first use (until then nothing of it is imported):

    >>> from curvlab.registry import BackendSpec
    >>> spec = BackendSpec(
    ...     name="my-backend",
    ...     target="my_package.curvature:MyEstimator",
    ...     requires=("my_package",),
    ...     extra=None,
    ...     install_hint="pip install my-package",
    ...     curvatures=frozenset({"hessian"}),
    ...     capabilities=frozenset({"matvec"}),
    ...     description="my package's Hessian products",
    ... )
    >>> spec.info().available, spec.info().install_hint
    (False, 'pip install my-package')
    """
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
        extra="kfac-pytorch",
        install_hint=(
            "pip install 'curvlab[kfac-pytorch]' (kfac-pytorch from PyPI, "
            "gpauloski/kfac-pytorch); curvlab drives its damping through "
            "KFACPreconditioner(damping=curvlab.adapters.kfac_pytorch.damping_schedule(damper))"
        ),
        curvatures=frozenset(),
        capabilities=frozenset({"damping_callable"}),
        description="kfac-pytorch integration: LinearShrinkageDamper as its damping schedule",
    )
)


def backends() -> dict[str, BackendInfo]:
    """Every registered backend: availability, the extra to install, and capabilities.

    Returns
    -------
    dict of str to BackendInfo
        Keyed by backend name, in registration order. Nothing is imported to compute it.

    Examples
    --------
    >>> import curvlab
    >>> info = curvlab.backends()["autograd"]
    >>> info.available, sorted(info.curvatures)
    (True, ['ef', 'fisher', 'ggn', 'hessian'])
    """
    return {name: spec.info() for name, spec in _REGISTRY.items()}


def get_spec(name: str) -> BackendSpec:
    """The :class:`BackendSpec` registered as ``name``.

    Parameters
    ----------
    name : str
        A registered backend name.

    Returns
    -------
    BackendSpec
        Its spec (nothing is imported).

    Raises
    ------
    InvalidInputError
        No backend of that name; the message lists the registered ones.

    Examples
    --------
    >>> from curvlab.registry import get_spec
    >>> sorted(get_spec("kfac").curvatures)
    ['ef', 'fisher', 'ggn']
    """
    if not isinstance(name, str) or name not in _REGISTRY:
        raise InvalidInputError(
            f"unknown backend {name!r}; choose one of {', '.join(sorted(_REGISTRY))}"
        )
    return _REGISTRY[name]


def resolve(name: str) -> type[CurvatureEstimator]:
    """The adapter class behind ``name``, importing it (and its package) only now.

    Parameters
    ----------
    name : str
        A registered backend name.

    Returns
    -------
    type
        The ``CurvatureEstimator`` subclass named by the spec's ``target``.

    Raises
    ------
    InvalidInputError
        An unknown name.
    UnsupportedCapabilityError
        The name is an integration, not an estimator backend.
    BackendUnavailableError
        A required package is missing; the message says how to install it.

    Examples
    --------
    >>> from curvlab.registry import resolve
    >>> resolve("autograd").__name__
    'AutogradEstimator'
    """
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


def estimator(
    backend: str,
    model: nn.Module,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    data: tuple[torch.Tensor, torch.Tensor] | Iterable[tuple[torch.Tensor, torch.Tensor]],
    curvature: str = "hessian",
    params: Iterable[torch.Tensor] | None = None,
    **options: Any,
) -> CurvatureEstimator:
    """Build the curvature estimator of ``backend`` for ``model`` on ``data``.

    Parameters
    ----------
    backend : str
        A registered backend: "autograd", "backpack", "pyhessian", "kfac" (see
        :func:`backends`).
    model : torch.nn.Module
        The model, as the user holds it (parameters, buffers, train/eval mode).
    loss_fn : callable
        ``loss_fn(model(x), y)`` returning a scalar with mean reduction.
    data : (x, y) or iterable of (x, y)
        One batch, or an iterable of batches such as a ``DataLoader``; every product is an
        average over all their samples.
    curvature : str, default "hessian"
        "hessian", "ggn", "fisher" or "ef" (empirical Fisher); backends declare which they
        support.
    params : iterable of torch.Tensor or None, default None
        The parameters to differentiate (default: those with ``requires_grad``).
    **options : Any
        Keyword options of the adapter class. Every backend takes ``mode`` (None, "train"
        or "eval"; default None: the model's own flags), ``seed`` (int or
        torch.Generator, default 0: dropout masks and Monte-Carlo draws), ``cache`` (True,
        False or "auto", default "auto") and ``distributed`` (bool, default: when
        ``torch.distributed`` is initialised); see
        :class:`~curvlab.CurvatureEstimator`. Backend-specific ones: ``fisher_type``,
        ``mc_samples``, ``vectorize``, ``chunk_size`` (autograd); ``fisher_type``,
        ``mc_samples``, ``use_converter`` (backpack); ``approximation``, ``fisher_type``,
        ``mc_samples``, ``kfac_approx``, ``separate_weight_and_bias`` (kfac). An unknown
        option raises :class:`~curvlab.InvalidInputError` naming the options there are.

    Returns
    -------
    CurvatureEstimator
        An :class:`~curvlab.operators.Operator` with ``matvec``, ``eigenpairs``, ``trace``,
        ``spectral_density``, ``noise_variance`` and the backend's capabilities.

    Raises
    ------
    InvalidInputError
        An unknown backend or curvature.
    UnsupportedCapabilityError
        The backend does not compute that curvature; the message names those that do.
    BackendUnavailableError
        The backend's package is missing; the message says how to install it.

    References
    ----------
    D. Granziol and N. Baskerville, "A random matrix theory approach to damping in deep
    learning", J. Phys. Complex. 3 (2022) (the curvature whose noise sets the damping).

    Examples
    --------
    >>> import torch, curvlab
    >>> model = torch.nn.Linear(3, 2)
    >>> x, y = torch.randn(8, 3, generator=torch.Generator().manual_seed(0)), torch.arange(8) % 2
    >>> est = curvlab.estimator("autograd", model, torch.nn.CrossEntropyLoss(), (x, y))
    >>> est.num_params
    8
    """
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
    accepted = inspect.signature(cls.__init__).parameters
    unknown = sorted(set(options) - set(accepted))
    if unknown and not any(p.kind is p.VAR_KEYWORD for p in accepted.values()):
        known = sorted(n for n, p in accepted.items() if p.kind is p.KEYWORD_ONLY)
        raise InvalidInputError(
            f"backend {backend!r} has no option {', '.join(map(repr, unknown))}; its options: "
            f"{', '.join(known)}"
        )
    return cls(model, loss_fn, data, curvature=curvature, params=params, **options)


def capability_table() -> str:
    """The README's backends x capabilities table (Markdown), generated from the specs.

    Returns
    -------
    str
        A Markdown table: one row per backend (sorted by name), its extra, a column per
        curvature and per capability.

    Examples
    --------
    >>> from curvlab.registry import capability_table
    >>> capability_table().splitlines()[0][:42]
    '| backend | extra | hessian | ggn | fisher'
    """
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
