"""One exception hierarchy for everything curvlab refuses to do.

Every error derives from :class:`CurvlabError`; most also derive from the matching
built-in (``ValueError``, ``ImportError``, ...) so generic handlers keep working.
"""

from __future__ import annotations


class CurvlabError(Exception):
    """Base class of all curvlab errors.

    curvlab raises rather than return a number it cannot stand behind; every refusal is
    a subclass of this class, with a message that names the problem and the fix. Catch
    it to handle any of them.

    Examples
    --------
    >>> import torch, curvlab
    >>> try:
    ...     curvlab.DenseOperator(torch.ones(2, 3))
    ... except curvlab.CurvlabError as error:
    ...     print(type(error).__name__, "-", error)
    InvalidInputError - expected a square matrix, got shape (2, 3)
    """


class InvalidInputError(CurvlabError, ValueError):
    """An argument has the wrong shape, dtype, device, value or type.

    Also a ``ValueError``, so existing ``except ValueError`` handlers keep working.

    Examples
    --------
    >>> import torch, curvlab
    >>> A = curvlab.DenseOperator(torch.eye(3, dtype=torch.float64))
    >>> try:
    ...     A.matvec(torch.ones(4, dtype=torch.float64))
    ... except ValueError as error:
    ...     print(error)
    expected a vector of shape [3] or [3, k], got (4,)
    """


class UnsupportedCapabilityError(CurvlabError, NotImplementedError):
    """The chosen backend cannot compute the requested quantity.

    The message lists the backends that can (``curvlab.backends()`` shows every
    backend's curvatures and capabilities). Also a ``NotImplementedError``.

    Examples
    --------
    >>> import torch, curvlab
    >>> model, data = torch.nn.Linear(2, 1), (torch.randn(4, 2), torch.randn(4, 1))
    >>> try:
    ...     curvlab.estimator("pyhessian", model, torch.nn.MSELoss(), data, curvature="ggn")
    ... except curvlab.UnsupportedCapabilityError as error:
    ...     print(error)
    backend 'pyhessian' does not provide curvature 'ggn'; backends that do: autograd, ...
    """


class UnsupportedModelError(CurvlabError, NotImplementedError):
    """The backend cannot handle a layer or loss of the user's model.

    Raised instead of computing the curvature of a different model (for example a
    Fisher for a loss that is no likelihood, or per-sample products under train-mode
    BatchNorm). The message names the alternatives. Also a ``NotImplementedError``.

    Examples
    --------
    >>> import torch, curvlab
    >>> model, data = torch.nn.Linear(2, 1), (torch.randn(4, 2), torch.randn(4, 1))
    >>> try:
    ...     curvlab.estimator("autograd", model, torch.nn.L1Loss(), data, curvature="fisher")
    ... except curvlab.UnsupportedModelError as error:
    ...     print(error)
    the Fisher needs a likelihood: use MSELoss, CrossEntropyLoss or BCEWithLogitsLoss ...
    """


class BackendUnavailableError(CurvlabError, ImportError):
    """The backend's package is not installed; the message names the extra to install.

    Raised when a backend is first used, never at ``import curvlab``. Also an
    ``ImportError``. ``curvlab.backends()`` reports each backend's availability and
    install hint without raising.

    Examples
    --------
    >>> import curvlab
    >>> issubclass(curvlab.BackendUnavailableError, ImportError)
    True
    >>> sorted(info.name for info in curvlab.backends().values() if info.available)[:1]
    ['autograd']
    """


class BackendError(CurvlabError, RuntimeError):
    """A backend failed while computing; the message names the backend and what to do.

    The backend's own exception is chained as ``__cause__``. Also a ``RuntimeError``.

    Examples
    --------
    >>> import curvlab
    >>> issubclass(curvlab.errors.BackendError, (curvlab.CurvlabError, RuntimeError))
    True
    """


class NumericalError(CurvlabError, FloatingPointError):
    """A loss or curvature product is NaN or infinite.

    Raised instead of propagating a non-finite number into a result. Also a
    ``FloatingPointError``.

    Examples
    --------
    >>> import torch, curvlab
    >>> x = torch.tensor([[float("nan"), 0.0], [1.0, 2.0]])
    >>> model, data = torch.nn.Linear(2, 1), (x, torch.zeros(2, 1))
    >>> try:
    ...     curvlab.estimator("autograd", model, torch.nn.MSELoss(), data)
    ... except curvlab.NumericalError as error:
    ...     print(error)
    the loss is nan on batch 0; check data and model
    """


class NotConvergedWarning(UserWarning):
    """An iterative method stopped before reaching its tolerance.

    The result is still returned, with ``converged=False`` and its residuals, so the
    caller decides; the message says which budget to raise.

    Examples
    --------
    >>> import warnings, torch, curvlab
    >>> A = curvlab.DenseOperator(torch.diag(torch.arange(1.0, 400.0, dtype=torch.float64)))
    >>> with warnings.catch_warnings(record=True) as caught:
    ...     warnings.simplefilter("always")
    ...     pairs = A.eigenpairs(k=5, ncv=7, max_iter=7, verify=False, progress=False)
    >>> pairs.converged, caught[0].category.__name__
    (False, 'NotConvergedWarning')
    """


class CurvlabWarning(UserWarning):
    """Something recoverable happened (a skipped update, a fallback path).

    Filter it like any ``UserWarning``, e.g. ``warnings.simplefilter("error",
    curvlab.CurvlabWarning)`` to turn every fallback into an error while debugging.

    Examples
    --------
    >>> import curvlab
    >>> issubclass(curvlab.CurvlabWarning, UserWarning)
    True
    """
