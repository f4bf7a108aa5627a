"""Agreement between ``torch.distributed`` ranks: one collective per damping update.

Under ``torch.distributed`` every rank runs its own damper on its own shard of the batch and
must take the same decision at every update, or the ranks fall out of step (one rank inside
the estimator's all-reduces, the other not) and the job hangs or aborts. So before anything
rank-local can diverge, each rank packs what only it knows into a :class:`RankReport`: its
step count, a fault code (non-finite data, parameters or loss, a failure while preparing the
update), its sample counts, its loss and whether that loss spikes. :func:`exchange` sums one
float64 tensor of one row per rank (each rank fills its own row) over a dedicated gloo group
created with ``timeout``: ONE all-reduce, after which every rank holds every report and
derives the same decision (skip, raise, or estimate; what follows the estimate is computed
from all-reduced numbers and is identical on every rank by construction).

**Failures.** A rank whose preparation raised still joins the exchange, with code
``FAILED``; every rank then raises (that rank its own error, the others
:class:`DampingSyncError` naming it). If a rank never arrives (it died, or is stuck
elsewhere) the exchange raises :class:`DampingSyncError` on the waiting ranks after
``timeout`` seconds (default :data:`DEFAULT_TIMEOUT`), instead of torch's 30-minute
default. One limit remains: an error raised *inside* the estimator on one rank only, after
the agreement, leaves the other ranks in the estimator's own collectives, which wait for the
timeout of the default process group (``init_process_group(timeout=...)``); the damper
checks data, parameters and loss before the agreement so that the known faults are caught
there.
"""

from __future__ import annotations

import datetime
import math
from dataclasses import astuple, dataclass, fields

import torch
import torch.distributed as tdist

from curvlab import distributed as dist
from curvlab.errors import CurvlabError

#: Seconds a rank waits for the others at a damping update before raising.
DEFAULT_TIMEOUT = 300.0

OK, NONFINITE_DATA, NONFINITE_PARAMS, NONFINITE_LOSS, FAILED = range(5)
#: What each fault code means, in words (the skip reasons recorded in the history).
FAULTS = {
    NONFINITE_DATA: "the data is not finite",
    NONFINITE_PARAMS: "the parameters are not finite",
    NONFINITE_LOSS: "the loss is not finite",
    FAILED: "preparing the update failed",
}


class DampingSyncError(CurvlabError, RuntimeError):
    """The ranks could not agree on a damping update (a rank failed, died or timed out)."""


@dataclass(frozen=True)
class RankReport:
    """What one rank knows at an update, in the order it is packed.

    Attributes
    ----------
    step : int
        The rank's step count (ranks at different steps are out of step).
    code : int
        OK or a fault (:data:`FAULTS`).
    n_samples : int
        Samples this rank holds for the estimate.
    n_largest : int
        The largest batch this rank passed to ``step`` since the previous update.
    loss : float
        This rank's loss at the update (NaN: not given).
    spike : bool
        Whether that loss spikes against this rank's recent losses.
    value : float
        An estimate passed to ``damper.update`` (NaN: none); it must agree across ranks.
    """

    step: int
    code: int = OK
    n_samples: int = 0
    n_largest: int = 0
    loss: float = math.nan
    spike: bool = False
    value: float = math.nan

    @classmethod
    def from_row(cls, row: torch.Tensor) -> RankReport:
        values = row.tolist()
        kinds = [f.type for f in fields(cls)]
        out = []
        for value, kind in zip(values, kinds):
            if kind == "int":
                out.append(round(value))
            elif kind == "bool":
                out.append(bool(value))
            else:
                out.append(value)
        return cls(*out)


class Collective:
    """The damper's agreement channel: a gloo group with its own timeout, made on first use.

    Parameters
    ----------
    timeout : float, default DEFAULT_TIMEOUT
        Seconds to wait for the other ranks.
    """

    def __init__(self, timeout: float = DEFAULT_TIMEOUT):
        self.timeout = float(timeout)
        self._group = None

    def exchange(self, report: RankReport) -> list[RankReport]:
        """Every rank's report, in rank order (one all-reduce; ``[report]`` on one process).

        Raises
        ------
        DampingSyncError
            A rank did not arrive within ``timeout`` seconds, or the channel broke.
        """
        if not dist.is_distributed():
            return [report]
        world, rank = dist.world_size(), dist.rank()
        rows = torch.zeros(world, len(fields(RankReport)), dtype=torch.float64)
        rows[rank] = torch.tensor([float(v) for v in astuple(report)], dtype=torch.float64)
        try:
            if self._group is None:
                self._group = tdist.new_group(
                    backend="gloo", timeout=datetime.timedelta(seconds=self.timeout)
                )
            tdist.all_reduce(rows, op=tdist.ReduceOp.SUM, group=self._group)
        except RuntimeError as exc:
            raise DampingSyncError(
                f"rank {rank}: the ranks did not agree on the damping update at step "
                f"{report.step} within {self.timeout:g} s (another rank failed, died or fell "
                f"behind): {exc}"
            ) from exc
        return [RankReport.from_row(row) for row in rows]


__all__ = [
    "DEFAULT_TIMEOUT",
    "FAILED",
    "FAULTS",
    "NONFINITE_DATA",
    "NONFINITE_LOSS",
    "NONFINITE_PARAMS",
    "OK",
    "Collective",
    "DampingSyncError",
    "RankReport",
]
