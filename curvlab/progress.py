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
    plus operation-specific numbers in ``info`` (e.g. ``{"n_matvecs": 40}``)."""

    desc: str
    done: int
    total: int | None
    info: dict[str, Any] = field(default_factory=dict)


Callback = Callable[[ProgressEvent], Any]


def show_bar(progress: bool | None) -> bool:
    """Resolve ``progress=``: None shows a bar only when stderr is interactive."""
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
        """Advance by ``n`` units; ``info`` is shown on the bar and passed to the callback."""
        self.done += n
        if self._bar is not None:
            self._bar.update(n)
            if info:
                self._bar.set_postfix(info, refresh=False)
        if self.callback is not None:
            self.callback(ProgressEvent(self.desc, self.done, self.total, dict(info)))

    def close(self) -> None:
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
    """Iterate ``iterable`` while reporting one unit per item (see :class:`Progress`)."""
    if total is None and hasattr(iterable, "__len__"):
        total = len(iterable)  # type: ignore[arg-type]
    with Progress(desc, total, progress=progress, callback=callback) as bar:
        for item in iterable:
            yield item
            bar.update()


__all__ = ["Callback", "Progress", "ProgressEvent", "show_bar", "track"]
