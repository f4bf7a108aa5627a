"""Outlier safety: the second stage of the damper, between the estimate and the update.

At every update the damper asks the guard two questions and records the answer with its
reason in the history:

1. *Before estimating* (:meth:`OutlierGuard.loss_spike`): is this rank's training loss
   spiking? The loss of the step (``damper.step(..., loss=loss)``) is compared with the
   median of the last ``loss_window`` losses this rank passed; above ``loss_ratio`` times
   that median the update is skipped (an estimate taken during a spike measures the spike).
   A non-finite loss, data or parameters skip the update whatever the guard.
2. *After estimating* (:meth:`OutlierGuard.judge`): is the raw estimate far outside the
   recent ones? With x = log(value) and the last ``window`` values folded into the damping
   (at least ``min_history`` of them), c their median log and s = 1.4826 MAD of their logs
   (their spread), e = min(stderr / value, 1) the estimate's relative standard error, the
   estimate is an outlier when

       |x - c| > w,   w = max(log(min_ratio), z * sqrt(s^2 + e^2)),

   and is then capped to exp(c +- w) (``action="cap"``, default) or rejected
   (``action="reject"``). Judging on the log scale treats a 100x jump up and down alike;
   capping rather than rejecting lets a genuine, lasting change through over a few updates,
   where rejection would freeze the damping at the old level for good.

NaN, infinite and negative estimates are always rejected, with or without a guard.

The guard holds no state: the damper passes it the recent values and losses (saved in the
damper's ``state_dict``), and under ``torch.distributed`` every input is the same on every
rank except the loss, whose spike flag the ranks agree on with the rest of the decision.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from curvlab.errors import InvalidInputError
from curvlab.validation import check_choice, check_int, check_number, check_positive

ACTIONS = ("cap", "reject")
#: Decisions recorded in the history: folded in as measured, folded in capped, refused after
#: estimating, or not estimated at all.
DECISIONS = ("accept", "cap", "reject", "skip")
_MAD_TO_SD = 1.4826  # the MAD of a normal sample times this estimates its sd


@dataclass(frozen=True)
class Verdict:
    """What becomes of one raw estimate.

    Attributes
    ----------
    decision : {"accept", "cap", "reject", "skip"}
    value : float
        The value folded into the damping (the estimate, or its cap); NaN when nothing is.
    reason : str
        Why ("" for a plain accept).
    """

    decision: str
    value: float
    reason: str = ""


def usable(value: float) -> str | None:
    """Why ``value`` cannot be a damping estimate at all (non-finite, negative), or None."""
    if math.isnan(value) or math.isinf(value):
        return f"the estimate {value} is not finite"
    if value < 0:
        return f"the estimate {value:.3g} is negative"
    return None


class OutlierGuard:
    """Rejects or caps estimates far outside the recent ones and skips updates during loss
    spikes (module docstring).

    Parameters
    ----------
    window : int, default 5
        Recent folded values the estimate is compared with.
    min_history : int, default 3
        Fewer folded values than this: no outlier test (nothing to compare with yet).
    z : float, default 4.0
        Width of the band in combined standard deviations (spread and stderr, log scale).
    min_ratio : float, default 3.0
        The band is at least this factor either side of the median: estimates within it are
        never outliers, whatever the spread.
    action : {"cap", "reject"}, default "cap"
        What happens to an outlier.
    loss_ratio : float or None, default 3.0
        Skip the update when the loss exceeds this multiple of the recent median (None: no
        spike test).
    loss_window : int, default 20
        Recent losses kept for the spike test (at least 5 are needed to judge).

    Examples
    --------
    >>> guard = OutlierGuard()
    >>> guard.judge(1.1e-2, 1e-3, [1e-2, 1.2e-2, 0.9e-2]).decision
    'accept'
    >>> verdict = guard.judge(2e2, 10.0, [1e-2, 1.2e-2, 0.9e-2])
    >>> verdict.decision, round(verdict.value, 3)
    ('cap', 0.03)
    >>> guard.loss_spike(7.5, [2.0, 2.1, 1.9, 2.0, 2.2])
    'the loss 7.5 spikes to 3.75 x the median 2 of the last 5 losses'
    """

    def __init__(
        self,
        *,
        window: int = 5,
        min_history: int = 3,
        z: float = 4.0,
        min_ratio: float = 3.0,
        action: str = "cap",
        loss_ratio: float | None = 3.0,
        loss_window: int = 20,
    ):
        self.window = check_int("window", window, minimum=1)
        self.min_history = check_int("min_history", min_history, minimum=1)
        if self.min_history > self.window:
            raise InvalidInputError(f"min_history {min_history} exceeds window {window}")
        self.z = check_positive("z", z)
        self.min_ratio = check_number("min_ratio", min_ratio, low=1.0)
        self.action = check_choice("action", action, ACTIONS)
        self.loss_ratio = None if loss_ratio is None else check_positive("loss_ratio", loss_ratio)
        self.loss_window = check_int("loss_window", loss_window, minimum=5)

    def __repr__(self) -> str:
        return (
            f"OutlierGuard(window={self.window}, min_history={self.min_history}, z={self.z}, "
            f"min_ratio={self.min_ratio}, action={self.action!r}, "
            f"loss_ratio={self.loss_ratio}, loss_window={self.loss_window})"
        )

    def loss_spike(self, loss: float, recent: Sequence[float]) -> str | None:
        """Why an update at ``loss`` should be skipped given the ``recent`` losses, or None.

        A spike is log(loss / m) > max(log(loss_ratio), 3 s), m the median and s = 1.4826
        MAD of the logs of the last ``loss_window`` positive losses (at least 5): a loss
        ``loss_ratio`` times the recent median, or further when the recent losses themselves
        vary that much (as near-zero losses do).
        """
        finite = [v for v in recent if math.isfinite(v) and v > 0][-self.loss_window :]
        if self.loss_ratio is None or len(finite) < 5 or not (math.isfinite(loss) and loss > 0):
            return None
        logs = [math.log(v) for v in finite]
        center = statistics.median(logs)
        spread = _MAD_TO_SD * statistics.median(abs(v - center) for v in logs)
        if math.log(loss) - center > max(math.log(self.loss_ratio), 3.0 * spread):
            median = math.exp(center)
            return (
                f"the loss {loss:.3g} spikes to {loss / median:.3g} x the median {median:.3g} "
                f"of the last {len(finite)} losses"
            )
        return None

    def judge(self, value: float, stderr: float, recent: Sequence[float]) -> Verdict:
        """The verdict on a raw estimate, given the ``recent`` values folded into the damping.

        Parameters
        ----------
        value, stderr : float
            The raw estimate and its standard error (NaN: unknown).
        recent : sequence of float
            The values folded in at the previous updates, oldest first.
        """
        why = usable(value)
        if why is not None:
            return Verdict("reject", math.nan, why)
        history = [v for v in recent if v > 0][-self.window :]
        if len(history) < self.min_history:
            return Verdict("accept", value)
        logs = [math.log(v) for v in history]
        center = statistics.median(logs)
        spread = _MAD_TO_SD * statistics.median(abs(v - center) for v in logs)
        rel = stderr / value if value > 0 and math.isfinite(stderr) else 0.0
        width = max(math.log(self.min_ratio), self.z * math.hypot(spread, min(rel, 1.0)))
        x = math.log(value) if value > 0 else -math.inf
        if abs(x - center) <= width:
            return Verdict("accept", value)
        side, bound = ("above", center + width) if x > center else ("below", center - width)
        why = (
            f"the estimate {value:.3g} is {side} the band [{math.exp(center - width):.3g}, "
            f"{math.exp(center + width):.3g}] of the last {len(history)} values"
        )
        if self.action == "reject":
            return Verdict("reject", math.nan, why)
        return Verdict("cap", math.exp(bound), why)


class NoGuard(OutlierGuard):
    """The guard switched off (``guard=False``): only unusable estimates are rejected.

    Examples
    --------
    >>> NoGuard().judge(1e6, 0.0, [1e-3, 1e-3, 1e-3]).decision
    'accept'
    """

    def __init__(self) -> None:
        super().__init__(loss_ratio=None)

    def __repr__(self) -> str:
        return "NoGuard()"

    def judge(self, value: float, stderr: float, recent: Sequence[float]) -> Verdict:
        why = usable(value)
        return Verdict("reject", math.nan, why) if why else Verdict("accept", value)


def as_guard(spec: Any) -> OutlierGuard:
    """``guard=``: True (the default guard), False or None (off), or an OutlierGuard.

    Examples
    --------
    >>> as_guard(False)
    NoGuard()
    """
    if spec is True:
        return OutlierGuard()
    if spec is False or spec is None:
        return NoGuard()
    if callable(getattr(spec, "judge", None)) and callable(getattr(spec, "loss_spike", None)):
        return spec
    raise InvalidInputError(
        f"guard must be True, False or an OutlierGuard, got {type(spec).__name__}"
    )


__all__ = ["ACTIONS", "DECISIONS", "NoGuard", "OutlierGuard", "Verdict", "as_guard", "usable"]
