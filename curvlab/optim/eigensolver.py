"""How :class:`~curvlab.optim.LanczosOPT` finds its eigenbasis: the settings of one call of
thick-restart Lanczos (:func:`curvlab.spectral.eigenpairs`), as one small object.

Any callable ``(operator, k, step) -> Eigenpairs`` can take its place (``values`` [k] and
``vectors`` [P, k] are what LanczosOPT reads), for example an ARPACK call through
``operator.to_scipy()``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

import torch

from curvlab.errors import InvalidInputError
from curvlab.progress import Callback
from curvlab.results import Eigenpairs
from curvlab.validation import check_bool, check_int, check_optional, check_positive


@dataclass(frozen=True)
class Eigensolver:
    """The k largest eigenpairs of an operator by thick-restart Lanczos, seeded per step.

    Parameters
    ----------
    tol : float, default 1e-6
        Residual tolerance relative to ||A||_2 (see :meth:`curvlab.Operator.eigenpairs`).
    max_iter : int or None, default None
        Matvec budget (None: 50 ncv).
    ncv : int or None, default None
        Lanczos basis size (None: max(2k + 1, 20)).
    seed : int, default 0
        The call at optimizer step t uses ``seed + t`` for its start vectors.
    verify : bool or int, default True
        Products spent checking for missed copies of repeated eigenvalues.
    basis_dtype : torch.dtype or None, default None
        dtype of the Lanczos basis.
    progress : bool or None, default None
        A progress bar on stderr (None: when stderr is a terminal).
    callback : callable or None, default None
        Called with a :class:`~curvlab.progress.ProgressEvent` after every product.

    Examples
    --------
    >>> import torch, curvlab
    >>> from curvlab.optim import Eigensolver
    >>> A = curvlab.DenseOperator(torch.diag(torch.arange(10.0, dtype=torch.float64)))
    >>> Eigensolver(tol=1e-10)(A, k=2, step=3).values.tolist()
    [9.0, 8.0]
    """

    tol: float = 1e-6
    max_iter: int | None = None
    ncv: int | None = None
    seed: int = 0
    verify: bool | int = True
    basis_dtype: torch.dtype | None = None
    progress: bool | None = None
    callback: Callback | None = None

    def __post_init__(self) -> None:
        check_positive("tol", self.tol)
        check_optional(check_int, "max_iter", self.max_iter, minimum=1)
        check_optional(check_int, "ncv", self.ncv, minimum=3)
        check_int("seed", self.seed, minimum=0)
        if not isinstance(self.verify, bool):
            check_int("verify", self.verify, minimum=0)
        check_bool("progress", self.progress, allow_none=True)

    def __call__(self, op: Any, k: int, step: int = 0) -> Eigenpairs:
        """The ``k`` largest eigenpairs of ``op`` at optimizer step ``step``.

        Parameters
        ----------
        op : Operator
            Anything with ``num_params``, ``dtype``, ``device`` and ``matvec`` (its own
            ``eigenpairs`` method is used when it has one).
        k : int
            Number of eigenpairs.
        step : int, default 0
            The optimizer's step count, added to ``seed``.

        Returns
        -------
        Eigenpairs
        """
        options = {
            "k": k, "which": "largest", "tol": self.tol, "max_iter": self.max_iter,
            "ncv": self.ncv, "seed": self.seed + step, "verify": self.verify,
            "basis_dtype": self.basis_dtype, "progress": self.progress,
            "callback": self.callback,
        }
        solve = getattr(op, "eigenpairs", None)
        if solve is None:
            from curvlab.spectral import eigenpairs

            return eigenpairs(op, **options)
        return solve(**options)

    def replace(self, **changes: Any) -> Eigensolver:
        """A copy with ``changes`` applied (validated).

        Examples
        --------
        >>> Eigensolver().replace(tol=1e-8).tol
        1e-08
        """
        return as_eigensolver({**asdict(self), **changes})


EigensolverLike = Eigensolver | Mapping[str, Any] | Callable[..., Eigenpairs]


def as_eigensolver(spec: EigensolverLike | None) -> Callable[..., Eigenpairs]:
    """The eigensolver that ``eigensolver=`` names: None (the defaults), a mapping of
    :class:`Eigensolver` fields, or a callable ``(operator, k, step) -> Eigenpairs``.

    Examples
    --------
    >>> solver = as_eigensolver({"tol": 1e-8, "seed": 3})
    >>> solver.tol, solver.seed
    (1e-08, 3)
    """
    if spec is None:
        return Eigensolver()
    if isinstance(spec, Mapping):
        unknown = sorted(set(spec) - set(Eigensolver.__dataclass_fields__))
        if unknown:
            raise InvalidInputError(
                f"eigensolver settings {unknown} are not fields of Eigensolver; choose from "
                f"{', '.join(Eigensolver.__dataclass_fields__)}"
            )
        return Eigensolver(**spec)
    if callable(spec):
        return spec
    raise InvalidInputError(
        "eigensolver must be an Eigensolver, a mapping of its settings (tol, max_iter, seed, "
        f"...) or a callable (operator, k, step) -> Eigenpairs; got {type(spec).__name__}"
    )


__all__ = ["Eigensolver", "EigensolverLike", "as_eigensolver"]
