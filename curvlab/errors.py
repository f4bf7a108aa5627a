"""One exception hierarchy for everything curvlab refuses to do.

Every error derives from :class:`CurvlabError`; most also derive from the matching
built-in (``ValueError``, ``ImportError``, ...) so generic handlers keep working.
"""

from __future__ import annotations


class CurvlabError(Exception):
    """Base class of all curvlab errors."""


class InvalidInputError(CurvlabError, ValueError):
    """An argument has the wrong shape, dtype, device, value or type."""


class UnsupportedCapabilityError(CurvlabError, NotImplementedError):
    """The chosen backend cannot compute the requested quantity."""


class UnsupportedModelError(CurvlabError, NotImplementedError):
    """The backend cannot handle a layer or loss of the user's model."""


class BackendUnavailableError(CurvlabError, ImportError):
    """The backend's package is not installed; the message names the extra to install."""


class BackendError(CurvlabError, RuntimeError):
    """A backend failed while computing; the message names the backend and what to do."""


class NumericalError(CurvlabError, FloatingPointError):
    """A loss or curvature product is NaN or infinite."""


class NotConvergedWarning(UserWarning):
    """An iterative method stopped before reaching its tolerance."""


class CurvlabWarning(UserWarning):
    """Something recoverable happened (a skipped update, a fallback path)."""
