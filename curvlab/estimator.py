"""The :class:`CurvatureEstimator` base class: one interface over every backend.

Backends implement ``_matvec`` (and optionally ``_group_matvecs``, ``_diagonal``); the
core implements the spectral algorithms, traces, densities and noise estimates once, on
top of ``matvec``. Products are averages over all samples the estimator holds (over all
ranks under ``torch.distributed``).
"""

from __future__ import annotations

import abc
from collections.abc import Iterable
from typing import ClassVar

import torch
from torch import nn

from curvlab import distributed as dist
from curvlab._params import as_batches, resolve_params
from curvlab._random import Seed
from curvlab.errors import InvalidInputError, NumericalError, UnsupportedCapabilityError
from curvlab.operators import Operator
from curvlab.results import NoiseEstimate

CURVATURES = ("hessian", "ggn", "fisher", "ef")


class CurvatureEstimator(Operator):
    """Curvature of ``loss_fn(model(x), y)`` over ``data`` as a matrix-free operator.

    Parameters
    ----------
    model : the user's module; left as found (mode, hooks, parameters, ``.grad``).
    loss_fn : ``loss_fn(model(x), y)`` returns a scalar averaged over the samples.
    data : one (x, y) batch or an iterable of batches; products average over all samples.
    curvature : "hessian" | "ggn" | "fisher" | "ef" (see ``supported_curvatures``).
    params : parameters to differentiate; default those with ``requires_grad``.
    distributed : reduce over ``torch.distributed`` ranks (default: when initialised).
    """

    backend: ClassVar[str] = "abstract"
    supported_curvatures: ClassVar[frozenset[str]] = frozenset()
    base_capabilities: ClassVar[frozenset[str]] = frozenset({"matvec"})

    def __init__(
        self,
        model: nn.Module,
        loss_fn,
        data,
        curvature: str = "hessian",
        params: Iterable[torch.Tensor] | None = None,
        *,
        distributed: bool | None = None,
    ):
        if curvature not in CURVATURES:
            raise InvalidInputError(
                f"unknown curvature {curvature!r}; choose one of {', '.join(CURVATURES)}"
            )
        if curvature not in self.supported_curvatures:
            raise UnsupportedCapabilityError(
                f"backend {self.backend!r} does not provide curvature {curvature!r} "
                f"(it provides {sorted(self.supported_curvatures)}); see curvlab.backends()"
            )
        if not callable(loss_fn):
            raise InvalidInputError("loss_fn must be callable as loss_fn(model(x), y)")
        self.model = model
        self.loss_fn = loss_fn
        self.curvature = curvature
        self.params, self.param_names = resolve_params(model, params)
        self.num_params = sum(p.numel() for p in self.params)
        self.dtype = self.params[0].dtype
        self.device = self.params[0].device
        self.batches = as_batches(data, self.device)
        self.local_num_samples = sum(int(x.shape[0]) for x, _ in self.batches)
        self.distributed = dist.is_distributed() if distributed is None else bool(distributed)
        self.num_samples = int(
            dist.all_reduce_scalars(self.local_num_samples)[0]
            if self.distributed
            else self.local_num_samples
        )
        self.n_matvecs = 0
        self._state_tensors = [*model.parameters(), *model.buffers()]

    # ------------------------------------------------------------------ contract
    @property
    def capabilities(self) -> frozenset[str]:
        return self.base_capabilities

    @abc.abstractmethod
    def _matvec(self, V: torch.Tensor) -> torch.Tensor:
        """[P, k] -> [P, k]: curvature averaged over this process's samples times V."""

    def _group_matvecs(self, v: torch.Tensor, group_size: int) -> torch.Tensor:
        raise UnsupportedCapabilityError(
            f"backend {self.backend!r} cannot form per-group products; use 'autograd'"
        )

    def _diagonal(self) -> torch.Tensor:
        raise UnsupportedCapabilityError(f"backend {self.backend!r} has no exact diagonal")

    def _model_version(self) -> tuple[int, ...]:
        """Changes whenever a parameter or buffer of the model is modified in place (an
        optimizer step), so adapters know when cached graphs or factors are stale."""
        return tuple(t._version for t in self._state_tensors)

    def with_data(self, data) -> CurvatureEstimator:
        """The same estimator (backend, curvature, parameters, options) on other data.

        Parameters
        ----------
        data : tuple of torch.Tensor or iterable of them
            One (x, y) batch or an iterable of batches, as for the constructor.

        Returns
        -------
        CurvatureEstimator
            A new estimator of this class; this one is left unchanged.
        """
        from curvlab.noise import rebuild_estimator

        return rebuild_estimator(self, data)

    def subset(self, indices: torch.Tensor) -> CurvatureEstimator:
        """The same estimator on the samples at ``indices`` (global indices over all ranks,
        in that order; see :meth:`with_data`)."""
        from curvlab.noise import subsample_estimator

        return subsample_estimator(self, indices)

    def release(self) -> None:
        """Drop cached graphs and buffers (also happens when the estimator is collected)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(backend={self.backend!r}, curvature={self.curvature!r}, "
            f"num_params={self.num_params}, num_samples={self.num_samples})"
        )

    # ------------------------------------------------------------------ products
    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        """Curvature times ``v`` ([P] or [P, k]), averaged over all samples."""
        self.check_vector(v)
        block = v if v.ndim == 2 else v[:, None]
        out = self._matvec(block)
        if self.distributed:
            out = dist.all_reduce_sum(out * self.local_num_samples) / self.num_samples
        # the sum is a cheap finite test; the elementwise one only confirms (overflow)
        if not torch.isfinite(out.sum()) and not torch.isfinite(out).all():
            raise NumericalError(
                f"the {self.curvature} product is not finite; check the loss and the data"
            )
        self.n_matvecs += block.shape[1]
        return out if v.ndim == 2 else out[:, 0]

    __matmul__ = matvec

    def group_matvecs(self, v: torch.Tensor, group_size: int = 1) -> torch.Tensor:
        """[G, P]: curvature of each group of ``group_size`` consecutive samples times ``v``.

        Groups partition this process's samples in data order; a remainder smaller than
        ``group_size`` is dropped so all groups have equal size (G = N // group_size).
        """
        self.check_vector(v, allow_block=False)
        if not isinstance(group_size, int) or group_size < 1:
            raise InvalidInputError(f"group_size must be a positive int, got {group_size!r}")
        if group_size > self.local_num_samples:
            raise InvalidInputError(
                f"group_size {group_size} exceeds the {self.local_num_samples} samples held"
            )
        out = self._group_matvecs(v, group_size)
        self.n_matvecs += out.shape[0]
        return out

    # ------------------------------------------------------------------ algorithms
    def diagonal(
        self, method: str | None = None, n_matvecs: int = 100, seed: Seed = 0
    ) -> torch.Tensor:
        """The diagonal: exact where the backend can, else XDiag or Hutchinson."""
        if method in (None, "exact") and "diagonal" in self.capabilities:
            return self._diagonal()
        if method == "exact":
            raise UnsupportedCapabilityError(
                f"backend {self.backend!r} has no exact diagonal; use method='xdiag' or "
                "the 'backpack' backend"
            )
        from curvlab.spectral.diagonal import diagonal

        return diagonal(self, method=method or "xdiag", n_matvecs=n_matvecs, seed=seed)

    def noise_variance(
        self,
        batch_size: int = 128,
        n_probes: int = 10,
        method: str = "unbiased",
        subsample: int | torch.Tensor | None = None,
        seed: Seed = 0,
        *,
        group_size: int = 1,
        source: str = "matvec",
        population: float | None = None,
    ) -> NoiseEstimate:
        """Hessian noise variance P^-1 E||H_B - H||_F^2 for batches of ``batch_size``.

        The paper's optimal damping (eq. 15); see :func:`curvlab.noise.noise_variance`.
        """
        from curvlab.noise import noise_variance

        return noise_variance(
            self,
            batch_size=batch_size,
            n_probes=n_probes,
            method=method,
            subsample=subsample,
            group_size=group_size,
            source=source,
            population=population,
            seed=seed,
        )
