"""Composable linear operators on flat parameter vectors (curvlinops-style).

An :class:`Operator` is a square linear map on [P] vectors (and [P, k] blocks of them)
given by its products alone. Every curvature estimator, fitted shrinkage and Kronecker
operator is one, so they share the spectral methods (eigenpairs, traces, densities,
diagonals) and an algebra::

    damped = est + 1e-3 * curvlab.IdentityOperator.like(est)     # H + delta I
    diff = est_a - est_b                                          # a difference of operators
    squared = est @ est                                           # H H, matrix-free
    scipy_op = est.to_scipy()                                     # scipy.sparse.linalg

Subclasses implement ``_matvec(V)`` for a [P, k] block; :meth:`Operator.matvec` validates
the input, accepts [P] or [P, k] and counts products in ``n_matvecs``. Objects that are not
subclasses but have ``num_params``, ``dtype``, ``device`` and ``matvec`` are accepted
by the spectral methods too (:func:`is_operator`).

Examples
--------
>>> import torch, curvlab
>>> A = curvlab.DenseOperator(torch.diag(torch.tensor([3.0, 1.0], dtype=torch.float64)))
>>> B = 2 * A - curvlab.IdentityOperator.like(A)
>>> B @ torch.ones(2, dtype=torch.float64)
tensor([5., 1.], dtype=torch.float64)
"""

from __future__ import annotations

import abc
import numbers
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from curvlab.errors import InvalidInputError
from curvlab.validation import check_int

if TYPE_CHECKING:
    from scipy.sparse.linalg import LinearOperator

    from curvlab._random import Seed
    from curvlab.progress import Callback
    from curvlab.results import DiagonalEstimate, Eigenpairs, Estimate, SpectralDensity

#: ``to_dense`` refuses operators above this size unless ``max_params`` is raised.
DEFAULT_MAX_DENSE_PARAMS = 20_000
_PROTOCOL = ("num_params", "dtype", "device", "matvec")


class Operator(abc.ABC):
    """A square linear operator on flat [P] vectors, defined by its products.

    Attributes
    ----------
    num_params : int
        P, the dimension.
    dtype : torch.dtype
        The dtype of the vectors it takes and returns.
    device : torch.device
        Where those vectors live.
    n_matvecs : int
        Products computed so far (a [P, k] block counts k).

    Notes
    -----
    The spectral methods (:meth:`eigenpairs`, :meth:`trace`, :meth:`spectral_density`, ...)
    assume a symmetric operator, as every curvature matrix is. Sums, differences and scalar
    multiples of symmetric operators are symmetric; a product ``A @ B`` is symmetric only
    when A and B commute (``A @ A`` always is).

    A subclass sets ``num_params``, ``dtype``, ``device`` (and ``n_matvecs = 0``) and
    implements ``_matvec(V)`` for a validated [P, k] block; everything else comes from this
    class.

    References
    ----------
    F. Dangel et al., curvlinops: linear operators for curvature matrices in PyTorch,
    https://github.com/f-dangel/curvlinops (the design this class follows).

    Examples
    --------
    >>> import torch, curvlab
    >>> class Scaled(curvlab.Operator):
    ...     def __init__(self, scales):
    ...         self.scales = scales
    ...         self.num_params, self.dtype, self.device = len(scales), scales.dtype, scales.device
    ...     def _matvec(self, V):
    ...         return self.scales[:, None] * V
    >>> A = Scaled(torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64))
    >>> A.trace(n_matvecs=6, progress=False).value, A.n_matvecs
    (6.0, 3)
    >>> (A + 2 * A) @ torch.ones(3, dtype=torch.float64)
    tensor([3., 6., 9.], dtype=torch.float64)
    """

    num_params: int
    dtype: torch.dtype
    device: torch.device
    n_matvecs: int = 0

    @abc.abstractmethod
    def _matvec(self, V: torch.Tensor) -> torch.Tensor:
        """[P, k] -> [P, k]: the operator applied to each column of a validated block."""

    # ------------------------------------------------------------------ products
    def check_vector(self, v: Any, *, allow_block: bool = True) -> torch.Tensor:
        """Validate a [P] vector or [P, k] block against this operator's size, dtype, device.

        Parameters
        ----------
        v : torch.Tensor
            The vector or block to check.
        allow_block : bool, default True
            Accept [P, k] blocks as well as [P] vectors.

        Returns
        -------
        torch.Tensor
            ``v`` itself, unchanged.

        Raises
        ------
        InvalidInputError
            For a non-tensor (numpy arrays included: use :meth:`to_scipy`), a wrong shape,
            a dtype other than ``dtype`` or a device other than ``device``.
        """
        if not isinstance(v, torch.Tensor):
            raise InvalidInputError(
                f"expected a torch.Tensor, got {type(v).__name__}; use to_scipy() for numpy"
            )
        if v.ndim not in ((1, 2) if allow_block else (1,)) or v.shape[0] != self.num_params:
            shape = f"[{self.num_params}]" + (f" or [{self.num_params}, k]" if allow_block else "")
            raise InvalidInputError(f"expected a vector of shape {shape}, got {tuple(v.shape)}")
        if v.dtype != self.dtype:
            raise InvalidInputError(
                f"vector dtype {v.dtype} differs from the operator's {self.dtype}; "
                f"use v.to({self.dtype})"
            )
        if v.device != self.device:
            raise InvalidInputError(f"vector is on {v.device} but the operator is on {self.device}")
        return v

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        """The operator times ``v``.

        Parameters
        ----------
        v : torch.Tensor
            A [P] vector or a [P, k] block of k vectors, in ``dtype`` on ``device``.

        Returns
        -------
        torch.Tensor
            The product, with the shape of ``v``. ``op @ v`` is the same call.

        Raises
        ------
        InvalidInputError
            When ``v`` does not match the operator (:meth:`check_vector`).

        Examples
        --------
        >>> import torch, curvlab
        >>> A = curvlab.DenseOperator(torch.tensor([[2.0, 1.0], [1.0, 2.0]], dtype=torch.float64))
        >>> A.matvec(torch.eye(2, dtype=torch.float64))  # a [P, k] block: k products
        tensor([[2., 1.],
                [1., 2.]], dtype=torch.float64)
        >>> A.n_matvecs
        2
        """
        self.check_vector(v)
        block = v if v.ndim == 2 else v[:, None]
        out = self._matvec(block)
        self.n_matvecs += block.shape[1]
        return out if v.ndim == 2 else out[:, 0]

    @property
    def shape(self) -> tuple[int, int]:
        """(P, P): the operator's shape, as scipy and numpy report it."""
        return (self.num_params, self.num_params)

    # ------------------------------------------------------------------ algebra
    #: numpy defers binary operators to this class (so ``array @ op`` is a TypeError)
    __array_ufunc__ = None

    def __matmul__(self, other: Any) -> Any:
        if isinstance(other, Operator):
            return ProductOperator(self, other)
        if isinstance(other, torch.Tensor):
            return self.matvec(other)
        if isinstance(other, np.ndarray):
            raise InvalidInputError(
                "operators act on torch tensors: use torch.as_tensor(v), or op.to_scipy() "
                "for numpy vectors"
            )
        return NotImplemented

    def __add__(self, other: Any) -> Operator:
        if isinstance(other, Operator):
            return SumOperator([(1.0, self), (1.0, other)])
        return NotImplemented

    def __sub__(self, other: Any) -> Operator:
        if isinstance(other, Operator):
            return SumOperator([(1.0, self), (-1.0, other)])
        return NotImplemented

    def __neg__(self) -> Operator:
        return SumOperator([(-1.0, self)])

    def __mul__(self, scalar: Any) -> Operator:
        if isinstance(scalar, numbers.Real) and not isinstance(scalar, bool):
            return SumOperator([(float(scalar), self)])
        return NotImplemented

    __rmul__ = __mul__

    def __truediv__(self, scalar: Any) -> Operator:
        if isinstance(scalar, numbers.Real) and not isinstance(scalar, bool):
            return SumOperator([(1.0 / float(scalar), self)])
        return NotImplemented

    # ------------------------------------------------------------------ conversions
    def to_scipy(self, dtype: Any = None) -> LinearOperator:
        """This operator as a ``scipy.sparse.linalg.LinearOperator`` on numpy vectors.

        Parameters
        ----------
        dtype : numpy dtype, optional
            The numpy dtype scipy sees (default: the operator's dtype in numpy). Inputs are
            converted to the operator's torch dtype and device, outputs back to numpy.

        Returns
        -------
        scipy.sparse.linalg.LinearOperator
            Of shape (P, P), symmetric (``rmatvec`` is ``matvec``); its products count in
            ``n_matvecs``.

        Examples
        --------
        >>> import numpy as np, torch, curvlab
        >>> from scipy.sparse.linalg import eigsh
        >>> A = curvlab.DenseOperator(torch.diag(torch.arange(1.0, 6.0, dtype=torch.float64)))
        >>> round(float(eigsh(A.to_scipy(), k=1)[0][0]), 10)
        5.0
        """
        from scipy.sparse.linalg import LinearOperator

        np_dtype = np.dtype(dtype) if dtype is not None else _numpy_dtype(self.dtype)

        def apply(x: np.ndarray) -> np.ndarray:
            t = torch.as_tensor(np.asarray(x), device=self.device).to(self.dtype)
            return self.matvec(t).detach().cpu().numpy().astype(np_dtype, copy=False)

        return LinearOperator(
            self.shape, matvec=apply, rmatvec=apply, matmat=apply, rmatmat=apply, dtype=np_dtype
        )

    def to_dense(
        self, max_params: int = DEFAULT_MAX_DENSE_PARAMS, chunk: int = 256
    ) -> torch.Tensor:
        """The [P, P] matrix, assembled from products with identity columns.

        Parameters
        ----------
        max_params : int, default 20000
            Refuse (with the memory it would take) above this P.
        chunk : int, default 256
            Identity columns per product block.

        Returns
        -------
        torch.Tensor
            [P, P] in ``dtype`` on ``device`` (P products).

        Raises
        ------
        InvalidInputError
            When P exceeds ``max_params``; the message gives the memory it would take.

        Examples
        --------
        >>> import torch, curvlab
        >>> A = curvlab.DenseOperator(torch.diag(torch.tensor([1.0, 2.0], dtype=torch.float64)))
        >>> (A + curvlab.IdentityOperator.like(A)).to_dense()
        tensor([[2., 0.],
                [0., 3.]], dtype=torch.float64)
        """
        if self.num_params > max_params:
            gib = self.num_params**2 * torch.finfo(self.dtype).bits / 8 / 2**30
            raise InvalidInputError(
                f"to_dense would form a {self.num_params} x {self.num_params} matrix "
                f"({gib:.1f} GiB) above max_params={max_params}; use matvec-based methods "
                "or raise max_params"
            )
        from curvlab.spectral._krylov import column_blocks

        return torch.cat([cols for _, cols in column_blocks(self, chunk)], dim=1)

    # ------------------------------------------------------------------ spectral methods
    def eigenpairs(
        self,
        k: int = 10,
        which: str = "largest",
        *,
        tol: float = 1e-6,
        max_iter: int | None = None,
        ncv: int | None = None,
        seed: Seed = 0,
        verify: bool | int = True,
        basis_dtype: torch.dtype | None = None,
        progress: bool | None = None,
        callback: Callback | None = None,
    ) -> Eigenpairs:
        """The k extreme eigenpairs by thick-restart Lanczos (:func:`curvlab.spectral.eigenpairs`).

        Parameters
        ----------
        k : int, default 10
            Number of eigenpairs.
        which : {"largest", "smallest", "both"}, default "largest"
            The k algebraically largest, the k smallest (most negative), or the ceil(k/2)
            largest and floor(k/2) smallest; the result is sorted descending in every case.
        tol : float, default 1e-6
            Residual tolerance relative to ||A||_2: each pair has ||A x - lambda x|| <=
            tol ||A||_2, so each eigenvalue is within tol ||A||_2 of one of A's (about
            (tol ||A||_2)^2 / gap for a separated one).
        max_iter : int, optional
            Matvec budget (default 50 * ncv).
        ncv : int, optional
            Basis size (default max(2k + 1, 20), capped at P; at least k + 2).
        seed : int or torch.Generator, default 0
            Start and restart vectors.
        verify : bool or int, default True
            Check for missed copies of repeated eigenvalues with 5 products (an int: that
            many; False: none).
        basis_dtype : torch.dtype, optional
            dtype of the Lanczos basis (default: float64 for lower-precision operators when
            the float64 basis fits in a quarter of the device's total memory).
        progress : bool, optional
            Show a progress bar on stderr (default: only when stderr is a terminal).
        callback : callable, optional
            Called with a :class:`~curvlab.progress.ProgressEvent` after every product
            (``info``: ``n_matvecs``, ``n_converged``).

        Returns
        -------
        Eigenpairs
            Values in descending order, vectors [P, k] as columns, residual norms, the
            matvec count and ``converged``.

        Warns
        -----
        NotConvergedWarning
            When ``max_iter`` products end before every pair meets ``tol``; the pairs are
            returned with ``converged=False``.

        References
        ----------
        K. Wu and H. Simon, "Thick-restart Lanczos method for large symmetric eigenvalue
        problems", SIAM J. Matrix Anal. Appl. 22 (2000).

        Examples
        --------
        >>> import torch, curvlab
        >>> A = curvlab.DenseOperator(torch.diag(torch.arange(100.0, dtype=torch.float64)))
        >>> [round(v, 6) for v in A.eigenpairs(k=2, progress=False).values.tolist()]
        [99.0, 98.0]
        """
        from curvlab.spectral.lanczos import eigenpairs

        return eigenpairs(
            self,
            k=k,
            which=which,
            tol=tol,
            max_iter=max_iter,
            ncv=ncv,
            seed=seed,
            verify=verify,
            basis_dtype=basis_dtype,
            progress=progress,
            callback=callback,
        )

    def spectral_density(
        self,
        *,
        n_probes: int = 4,
        n_steps: int = 40,
        seed: Seed = 0,
        grid_size: int = 1000,
        sigma: float | None = None,
        log_grid: bool = True,
        probe_batch: int | None = None,
        progress: bool | None = None,
        callback: Callback | None = None,
    ) -> SpectralDensity:
        """Stochastic Lanczos quadrature (:func:`curvlab.spectral.spectral_density`).

        Parameters
        ----------
        n_probes : int, default 4
            Rademacher probes; the mass on a part of the spectrum holding a fraction p of
            the eigenvalues has standard error about sqrt(2 p / (P n_probes)).
        n_steps : int, default 40
            Lanczos steps per probe (n_matvecs = n_probes * n_steps); exact quadrature for
            polynomials of degree < 2 n_steps, broadening about 4% of the spectral range.
        seed : int or torch.Generator, default 0
            Probes and breakdown restarts.
        grid_size : int, default 1000
            Points of the linear (and log) grid.
        sigma : float, optional
            Gaussian broadening (default pi / (2 n_steps) x the node range).
        log_grid : bool, default True
            Also return the density of log10(lambda) over the positive spectrum.
        probe_batch : int, optional
            Probes run together; their bases take P x n_steps x batch numbers (default:
            all that fit in a quarter of the device's total memory, at least one).
        progress : bool, optional
            Show a progress bar on stderr (default: only when stderr is a terminal).
        callback : callable, optional
            Called with a :class:`~curvlab.progress.ProgressEvent` after every Lanczos step
            (``info["n_matvecs"]``).

        Returns
        -------
        SpectralDensity
            Per-probe nodes and weights, grids and densities (float64, CPU).

        References
        ----------
        S. Ubaru, J. Chen and Y. Saad, "Fast estimation of tr(f(A)) via stochastic Lanczos
        quadrature", SIAM J. Matrix Anal. Appl. 38 (2017).

        Examples
        --------
        >>> import torch, curvlab
        >>> A = curvlab.DenseOperator(torch.diag(torch.linspace(0, 1, 500, dtype=torch.float64)))
        >>> A.spectral_density(progress=False).n_matvecs
        160
        """
        from curvlab.spectral.slq import spectral_density

        return spectral_density(
            self,
            n_probes=n_probes,
            n_steps=n_steps,
            seed=seed,
            grid_size=grid_size,
            sigma=sigma,
            log_grid=log_grid,
            probe_batch=probe_batch,
            progress=progress,
            callback=callback,
        )

    def trace(
        self,
        n_matvecs: int = 60,
        method: str = "hutch++",
        seed: Seed = 0,
        *,
        progress: bool | None = None,
        callback: Callback | None = None,
    ) -> Estimate:
        """Stochastic Tr A with a standard error (:func:`curvlab.spectral.trace`).

        Parameters
        ----------
        n_matvecs : int, default 60
            Products to spend (exact when >= P). Hutch++'s standard error at the default is
            at most about 0.32 ||A - A_20||_F (A_20: the top 20 directions); Hutchinson's
            at most 0.18 ||A||_F.
        method : {"hutch++", "hutchinson"}, default "hutch++"
        seed : int or torch.Generator, default 0
            The sketch and probes.
        progress : bool, optional
            Show a progress bar on stderr (default: only when stderr is a terminal).
        callback : callable, optional
            Called with a :class:`~curvlab.progress.ProgressEvent` after every block of
            products (``info["n_matvecs"]``).

        Returns
        -------
        Estimate
            ``value``, ``stderr``, ``n_matvecs`` and the Hutchinson ``samples``.

        References
        ----------
        M. F. Hutchinson, "A stochastic estimator of the trace of the influence matrix for
        Laplacian smoothing splines", Commun. Stat. Simul. Comput. 18 (1989).
        R. A. Meyer, C. Musco, C. Musco and D. P. Woodruff, "Hutch++: optimal stochastic
        trace estimation", SOSA (2021).

        Examples
        --------
        >>> import torch, curvlab
        >>> A = curvlab.DenseOperator(torch.eye(3, dtype=torch.float64))
        >>> A.trace(n_matvecs=6, progress=False).value
        3.0
        """
        from curvlab.spectral.trace import trace

        return trace(
            self,
            n_matvecs=n_matvecs,
            method=method,
            seed=seed,
            progress=progress,
            callback=callback,
        )

    def _exact_diagonal(self, progress: bool | None, callback: Any) -> torch.Tensor | None:
        """An exact diagonal cheaper than P products, where a subclass has one."""
        return None

    def diagonal(
        self,
        method: str | None = None,
        n_matvecs: int | None = None,
        seed: Seed = 0,
        progress: bool | None = None,
        callback: Any = None,
    ) -> torch.Tensor | DiagonalEstimate:
        """The diagonal: exact by default, or an estimate with a standard error.

        Parameters
        ----------
        method : {None, "exact", "xdiag", "hutchinson"}, default None
            None and "exact" give the exact diagonal: the operator's own where it has one
            (BackPACK's and KFAC's estimators), else P products with identity columns (a
            warning comes first when that is predicted to take long). "xdiag"/"hutchinson"
            estimate it from ``n_matvecs`` products (see
            :func:`curvlab.spectral.diagonal_estimate`).
        n_matvecs : int, optional
            The budget of an estimate (default 100); a budget of at least P is exact.
        seed : int or torch.Generator, default 0
            The probes of an estimate.
        progress : bool, optional
            Show a progress bar on stderr (default: only when stderr is a terminal).
        callback : callable, optional
            Called with a :class:`~curvlab.progress.ProgressEvent` after every block of
            products (``info["n_matvecs"]``).

        Returns
        -------
        torch.Tensor or DiagonalEstimate
            The exact [P] diagonal as a tensor (the same answer on every backend), or, when an
            estimate is asked for, a :class:`~curvlab.DiagonalEstimate` with ``value`` and an
            entrywise ``stderr``.

        Raises
        ------
        InvalidInputError
            For an unknown ``method``, or ``n_matvecs`` without an estimating method.

        References
        ----------
        C. Bekas, E. Kokiopoulou and Y. Saad, "An estimator for the diagonal of a matrix",
        Appl. Numer. Math. 57 (2007) (Hutchinson's diagonal).
        E. N. Epperly, J. A. Tropp and R. J. Webber, "XTrace: making the most of every sample
        in stochastic trace estimation", SIAM J. Matrix Anal. Appl. 45 (2024) (XDiag).

        Examples
        --------
        >>> import torch, curvlab
        >>> A = curvlab.DenseOperator(torch.diag(torch.arange(1.0, 5.0, dtype=torch.float64)))
        >>> A.diagonal()
        tensor([1., 2., 3., 4.], dtype=torch.float64)
        >>> estimate = A.diagonal(method="xdiag", n_matvecs=2, seed=0)
        >>> estimate.value.shape, estimate.exact, estimate.stderr.shape
        (torch.Size([4]), False, torch.Size([4]))
        """
        if method not in (None, "exact", "xdiag", "hutchinson"):
            raise InvalidInputError(
                f"method must be None, 'exact', 'xdiag' or 'hutchinson', got {method!r}"
            )
        from curvlab.results import DiagonalEstimate
        from curvlab.spectral.diagonal import diagonal_estimate

        if method in ("xdiag", "hutchinson"):
            budget = 100 if n_matvecs is None else n_matvecs
            exact_budget = not isinstance(budget, bool) and isinstance(budget, int)
            if exact_budget and budget >= self.num_params:  # exact: the cheapest route
                exact = self._exact_diagonal(progress, callback)
                if exact is not None:
                    return DiagonalEstimate(exact, torch.zeros_like(exact), 0, "exact")
            return diagonal_estimate(
                self, method=method, n_matvecs=budget, seed=seed, progress=progress,
                callback=callback,
            )
        if n_matvecs is not None:
            raise InvalidInputError(
                "n_matvecs sets the budget of an estimate: pass method='xdiag' or 'hutchinson'"
            )
        exact = self._exact_diagonal(progress, callback)
        if exact is not None:
            return exact
        return diagonal_estimate(
            self, n_matvecs=self.num_params, progress=progress, callback=callback
        ).value

    def trace_of_square(
        self,
        n_matvecs: int = 60,
        method: str = "hutchinson",
        seed: Seed = 0,
        *,
        progress: bool | None = None,
        callback: Callback | None = None,
    ) -> Estimate:
        """Stochastic Tr A^2 = ||A||_F^2 with a standard error
        (:func:`curvlab.spectral.trace_of_square`).

        Parameters
        ----------
        n_matvecs : int, default 60
            Products to spend (exact when >= P); relative standard error at most
            sqrt(2 / 60) = 0.18 at the default.
        method : {"hutchinson", "hutch++"}, default "hutchinson"
        seed : int or torch.Generator, default 0
            The probes.
        progress : bool, optional
            Show a progress bar on stderr (default: only when stderr is a terminal).
        callback : callable, optional
            Called with a :class:`~curvlab.progress.ProgressEvent` after every block of
            products (``info["n_matvecs"]``).

        Returns
        -------
        Estimate
            ``value``, ``stderr``, ``n_matvecs`` and the Hutchinson ``samples``.

        Examples
        --------
        >>> import torch, curvlab
        >>> A = curvlab.DenseOperator(torch.diag(torch.tensor([3.0, 4.0], dtype=torch.float64)))
        >>> A.trace_of_square(progress=False).value
        25.0
        """
        from curvlab.spectral.trace import trace_of_square

        return trace_of_square(
            self,
            n_matvecs=n_matvecs,
            method=method,
            seed=seed,
            progress=progress,
            callback=callback,
        )


def is_operator(obj: Any) -> bool:
    """Whether ``obj`` can be used as an operator: an :class:`Operator`, or any object with
    ``num_params``, ``dtype``, ``device`` and ``matvec``.

    Parameters
    ----------
    obj : object
        Anything.

    Returns
    -------
    bool
        True for :class:`Operator` instances and duck-typed operators (accepted by the
        spectral functions of :mod:`curvlab.spectral`).

    Examples
    --------
    >>> import torch, curvlab
    >>> from curvlab.operators import is_operator
    >>> is_operator(curvlab.IdentityOperator(3)), is_operator(torch.eye(3))
    (True, False)
    """
    return isinstance(obj, Operator) or all(hasattr(obj, a) for a in _PROTOCOL)


def _numpy_dtype(dtype: torch.dtype) -> np.dtype:
    return torch.empty((), dtype=dtype).numpy().dtype


def check_same_space(operators: list[Operator]) -> Operator:
    """Refuse operators of different size, dtype or device; return the first."""
    first = operators[0]
    for op in operators[1:]:
        if (op.num_params, op.dtype, op.device) != (first.num_params, first.dtype, first.device):
            raise InvalidInputError(
                "operators must share num_params, dtype and device to be combined, got "
                f"({first.num_params}, {first.dtype}, {first.device}) and "
                f"({op.num_params}, {op.dtype}, {op.device})"
            )
    return first


class _Combined(Operator):
    """Shared plumbing of operators built from others."""

    def _adopt(self, operators: list[Operator]) -> None:
        first = check_same_space(operators)
        self.num_params, self.dtype, self.device = first.num_params, first.dtype, first.device
        self.n_matvecs = 0


class SumOperator(_Combined):
    """sum_i c_i A_i for scalars c_i and operators A_i of one shape, dtype and device.

    What ``A + B``, ``A - B``, ``-A``, ``c * A`` and ``A / c`` build; nested sums are
    flattened into one list of terms.

    Parameters
    ----------
    terms : list of (float, Operator)
        The pairs (c_i, A_i).

    Raises
    ------
    InvalidInputError
        When the operators differ in ``num_params``, ``dtype`` or ``device``.

    Examples
    --------
    >>> import torch, curvlab
    >>> A = curvlab.DenseOperator(torch.diag(torch.tensor([1.0, 2.0], dtype=torch.float64)))
    >>> damped = A + 0.5 * curvlab.IdentityOperator.like(A)
    >>> damped
    1 * DenseOperator + 0.5 * IdentityOperator
    >>> damped @ torch.ones(2, dtype=torch.float64)
    tensor([1.5000, 2.5000], dtype=torch.float64)
    """

    def __init__(self, terms: list[tuple[float, Operator]]):
        flat: list[tuple[float, Operator]] = []
        for c, op in terms:  # (a + b) + c stays one flat sum
            if isinstance(op, SumOperator):
                flat += [(c * ci, oi) for ci, oi in op.terms]
            else:
                flat.append((float(c), op))
        self._adopt([op for _, op in flat])
        self.terms = flat

    def _matvec(self, V: torch.Tensor) -> torch.Tensor:
        out = None
        for c, op in self.terms:
            term = op.matvec(V)
            out = c * term if out is None else out.add_(term, alpha=c)
        return out

    def __repr__(self) -> str:
        return " + ".join(f"{c:g} * {type(op).__name__}" for c, op in self.terms)


class ProductOperator(_Combined):
    """A B: ``(A @ B) @ v = A @ (B @ v)``.

    What ``A @ B`` builds for two operators; each product costs one product of each.

    Parameters
    ----------
    left : Operator
        A.
    right : Operator
        B, of A's shape, dtype and device.

    Examples
    --------
    >>> import torch, curvlab
    >>> A = curvlab.DenseOperator(torch.diag(torch.tensor([1.0, 3.0], dtype=torch.float64)))
    >>> (A @ A).trace(n_matvecs=6, progress=False).value  # Tr A^2
    10.0
    """

    def __init__(self, left: Operator, right: Operator):
        self._adopt([left, right])
        self.left, self.right = left, right

    def _matvec(self, V: torch.Tensor) -> torch.Tensor:
        return self.left.matvec(self.right.matvec(V))


class DenseOperator(Operator):
    """An explicit square matrix as an operator (tests, synthetic models, small problems).

    Parameters
    ----------
    matrix : torch.Tensor
        [P, P]; symmetric for the spectral methods.

    Examples
    --------
    >>> import torch, curvlab
    >>> op = curvlab.DenseOperator(torch.eye(3, dtype=torch.float64))
    >>> op.trace(n_matvecs=6).value
    3.0
    """

    def __init__(self, matrix: torch.Tensor):
        if not isinstance(matrix, torch.Tensor) or matrix.ndim != 2:
            raise InvalidInputError("expected a square [P, P] torch.Tensor")
        if matrix.shape[0] != matrix.shape[1]:
            raise InvalidInputError(f"expected a square matrix, got shape {tuple(matrix.shape)}")
        self.matrix = matrix
        self.num_params = matrix.shape[0]
        self.dtype = matrix.dtype
        self.device = matrix.device
        self.n_matvecs = 0

    def _matvec(self, V: torch.Tensor) -> torch.Tensor:
        return self.matrix @ V

    def to_dense(self, max_params: int = DEFAULT_MAX_DENSE_PARAMS, chunk: int = 256):
        return self.matrix


class IdentityOperator(Operator):
    """The P x P identity (build damped operators as ``est + delta * IdentityOperator.like(est)``).

    Parameters
    ----------
    num_params : int
        P, the dimension.
    dtype : torch.dtype, default torch.float32
        The dtype of the vectors it takes.
    device : torch.device or str, default "cpu"
        Where those vectors live.

    Examples
    --------
    >>> import torch, curvlab
    >>> A = curvlab.DenseOperator(torch.diag(torch.tensor([1.0, 2.0], dtype=torch.float64)))
    >>> (A + 1e-3 * curvlab.IdentityOperator.like(A)).diagonal()
    tensor([1.0010, 2.0010], dtype=torch.float64)
    """

    def __init__(
        self, num_params: int, dtype: torch.dtype = torch.float32, device: Any = "cpu"
    ):
        num_params = check_int("num_params", num_params, minimum=1)
        self.num_params, self.dtype, self.device = num_params, dtype, torch.device(device)
        self.n_matvecs = 0

    @classmethod
    def like(cls, op: Operator) -> IdentityOperator:
        """The identity on ``op``'s space (size, dtype, device).

        Parameters
        ----------
        op : Operator
            Any operator (or object with ``num_params``, ``dtype`` and ``device``).

        Returns
        -------
        IdentityOperator
            P x P, in ``op.dtype`` on ``op.device``.
        """
        return cls(op.num_params, op.dtype, op.device)

    def _matvec(self, V: torch.Tensor) -> torch.Tensor:
        return V.clone()


__all__ = [
    "DEFAULT_MAX_DENSE_PARAMS",
    "DenseOperator",
    "IdentityOperator",
    "Operator",
    "ProductOperator",
    "SumOperator",
    "is_operator",
]
