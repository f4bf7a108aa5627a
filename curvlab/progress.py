"""Progress reporting for long operations: a tqdm bar on stderr and/or a callback.

Every long-running curvlab call (eigenpairs, traces, spectral densities, noise estimates
with many probes, ``compare``, the experiments and the tour) takes ``progress=`` and
``callback=``:

- ``progress=None`` (default): a bar on stderr when stderr is a terminal, none otherwise
  (logs and CI stay clean); ``True`` forces it; ``False`` turns it off.
- ``callback``: ``callback(ProgressEvent)`` after every unit of work, for notebooks and
  loggers (it runs whether or not a bar is shown).

tqdm is optional: without it the bar is silently replaced by nothing; callbacks still run.

Examples
--------
>>> from curvlab.progress import Progress
>>> seen = []
>>> with Progress("probes", total=3, progress=False, callback=seen.append) as bar:
...     for _ in range(3):
...         bar.update()
>>> [e.done for e in seen]
[1, 2, 3]
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

from curvlab.validation import check_bool, check_callable, check_optional

T = TypeVar("T")


@dataclass(frozen=True)
class ProgressEvent:
    """One step of a long operation: ``done`` of ``total`` units (``total`` may be None),
    plus operation-specific numbers in ``info`` (e.g. ``{"n_matvecs": 40}``).

    Attributes
    ----------
    desc : str
        The operation (``"eigenpairs"``, ``"noise probes"``, ...).
    done : int
        Units finished so far.
    total : int or None
        Units planned, where known.
    info : dict of str to Any, default {}
        Operation-specific numbers, e.g. ``n_matvecs`` and ``n_converged`` for eigenpairs.

    Examples
    --------
    >>> import torch, curvlab
    >>> events = []
    >>> A = curvlab.DenseOperator(torch.eye(40, dtype=torch.float64))
    >>> _ = A.trace(n_matvecs=30, progress=False, callback=events.append)
    >>> events[-1].desc, events[-1].info["n_matvecs"]
    ('trace', 30)
    """

    desc: str
    done: int
    total: int | None
    info: dict[str, Any] = field(default_factory=dict)


Callback = Callable[[ProgressEvent], Any]


def show_bar(progress: bool | None) -> bool:
    """Resolve ``progress=``: None shows a bar only when stderr is interactive.

    Parameters
    ----------
    progress : bool or None
        The user's ``progress=`` argument.

    Returns
    -------
    bool
        Whether to show a bar.

    Raises
    ------
    InvalidInputError
        For anything but True, False or None.

    Examples
    --------
    >>> from curvlab.progress import show_bar
    >>> show_bar(False), show_bar(True)
    (False, True)
    """
    if progress is None:
        return bool(getattr(sys.stderr, "isatty", lambda: False)())
    return check_bool("progress", progress, allow_none=True)


class Progress:
    """A progress reporter: ``update(n, **info)`` advances it; use as a context manager.

    Parameters
    ----------
    desc : str
        What is being done (shown on the bar and passed to the callback).
    total : int or None
        The number of units, if known.
    progress : bool or None, default None
        Show a tqdm bar on stderr (None: only when stderr is a terminal).
    callback : callable, optional
        Called with a :class:`ProgressEvent` after every update.

    Examples
    --------
    >>> from curvlab.progress import Progress
    >>> events = []
    >>> with Progress("fit", total=2, progress=False, callback=events.append) as bar:
    ...     bar.update(loss=0.5)
    ...     bar.update(loss=0.25)
    >>> [(e.done, e.total, e.info["loss"]) for e in events]
    [(1, 2, 0.5), (2, 2, 0.25)]
    """

    def __init__(
        self,
        desc: str,
        total: int | None = None,
        *,
        progress: bool | None = None,
        callback: Callback | None = None,
    ):
        check_optional(check_callable, "callback", callback, what="a callable of a ProgressEvent")
        self.desc, self.total, self.done = desc, total, 0
        self.callback = callback
        self._bar = None
        if show_bar(progress):
            try:
                from tqdm.auto import tqdm
            except ImportError:  # tqdm is optional
                tqdm = None
            if tqdm is not None:
                self._bar = tqdm(
                    total=total, desc=desc, file=sys.stderr, leave=False, dynamic_ncols=True
                )

    def update(self, n: int = 1, **info: Any) -> None:
        """Advance by ``n`` units; ``info`` is shown on the bar and passed to the callback.

        Parameters
        ----------
        n : int, default 1
            Units finished since the last update.
        **info : Any
            Numbers to show (e.g. ``n_matvecs=40``).
        """
        self.done += n
        if self._bar is not None:
            self._bar.update(n)
            if info:
                self._bar.set_postfix(info, refresh=False)
        if self.callback is not None:
            self.callback(ProgressEvent(self.desc, self.done, self.total, dict(info)))

    def close(self) -> None:
        """Remove the bar (if any); leaving the ``with`` block calls this."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def track(
    iterable: Iterable[T],
    desc: str,
    total: int | None = None,
    *,
    progress: bool | None = None,
    callback: Callback | None = None,
) -> Iterator[T]:
    """Iterate ``iterable`` while reporting one unit per item (see :class:`Progress`).

    Parameters
    ----------
    iterable : iterable
        The items.
    desc : str
        What is being done.
    total : int, optional
        The number of items (default ``len(iterable)`` where it has one).
    progress : bool, optional
        Show a bar on stderr (default: only when stderr is a terminal).
    callback : callable, optional
        Called with a :class:`ProgressEvent` after every item.

    Yields
    ------
    object
        The items of ``iterable``, in order.

    Examples
    --------
    >>> from curvlab.progress import track
    >>> events = []
    >>> [x * x for x in track(range(3), "squares", progress=False, callback=events.append)]
    [0, 1, 4]
    >>> events[-1].done, events[-1].total
    (3, 3)
    """
    if total is None and hasattr(iterable, "__len__"):
        total = len(iterable)  # type: ignore[arg-type]
    with Progress(desc, total, progress=progress, callback=callback) as bar:
        for item in iterable:
            yield item
            bar.update()


__all__ = ["Callback", "Progress", "ProgressEvent", "show_bar", "track"]
