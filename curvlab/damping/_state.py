"""The damper's checkpoint format: versioned, validated before anything is restored.

``parse`` reads a ``state_dict`` into plain checked values or raises
:class:`~curvlab.errors.InvalidInputError` naming the first bad entry; the damper assigns
them only after the whole dict has passed, so a failed load leaves it unchanged. Version 1
(curvlab before issue 13: no ``version`` key, records with ``accepted``) is migrated.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from numbers import Real
from typing import Any

import torch

from curvlab.damping.guard import DECISIONS
from curvlab.damping.history import COLUMNS, DampingRecord
from curvlab.errors import InvalidInputError
from curvlab.validation import check_int, check_optional, check_positive

VERSION = 2
_V2_KEYS = frozenset(
    {"version", "damping", "tau", "steps", "history", "rng_state", "indices", "losses",
     "largest", "warned"}
)
_V1_KEYS = frozenset({"damping", "tau", "steps", "n_rejected", "warned", "history", "rng_state",
                      "indices"})


def parse(state: Any, generator: torch.Generator) -> dict[str, Any]:
    """The checked values of a damper ``state_dict`` (any version), ready to assign."""
    if not isinstance(state, Mapping):
        raise InvalidInputError(
            f"a damper state_dict is a dict, got {type(state).__name__}; pass damper.state_dict()"
        )
    if "version" not in state and set(state) == _V1_KEYS:
        state = _from_v1(state)
    if state.get("version") != VERSION:
        raise InvalidInputError(
            f"unknown damper state_dict version {state.get('version')!r} (this curvlab writes "
            f"version {VERSION}); pass damper.state_dict()"
        )
    missing, extra = _V2_KEYS - set(state), set(state) - _V2_KEYS
    if missing or extra:
        raise InvalidInputError(
            f"not a damper state_dict: missing {sorted(missing)}, unexpected {sorted(extra)}"
        )
    out = {
        "damping": _damping(state["damping"]),
        "tau": _tau(state["tau"]),
        "steps": _count("steps", state["steps"]),
        "history": _history(state["history"]),
        "rng_state": _rng_state(state["rng_state"], generator),
        "indices": _indices(state["indices"]),
        "losses": _losses(state["losses"]),
        "largest": _count("largest", state["largest"]),
        "warned": _strings("warned", state["warned"]),
    }
    return out


def _from_v1(state: Mapping) -> dict[str, Any]:
    history = []
    for r in state["history"]:
        if not isinstance(r, Mapping) or set(r) != {"step", "estimate", "stderr", "damping",
                                                     "accepted"}:
            raise InvalidInputError(f"version-1 damper state: bad history record {r!r}")
        accepted = bool(r["accepted"])
        history.append(
            {
                "step": r["step"],
                "estimate": r["estimate"],
                "stderr": r["stderr"],
                "decision": "accept" if accepted else "reject",
                "reason": "" if accepted else "rejected (version-1 checkpoint)",
                "damping": r["damping"],
                "batch_size": 0,
                "loss": math.nan,
                "folded": r["estimate"] if accepted else math.nan,
            }
        )
    return {
        "version": VERSION,
        "damping": state["damping"],
        "tau": state["tau"],
        "steps": state["steps"],
        "history": history,
        "rng_state": state["rng_state"],
        "indices": state["indices"],
        "losses": [],
        "largest": 0,
        "warned": list(state["warned"]),
    }


def _number(name: str, value: Any) -> float:
    """A record's real number; NaN stands for a value the update did not have."""
    if isinstance(value, bool) or not isinstance(value, Real):
        raise InvalidInputError(f"state_dict[{name!r}] must be a number, got {value!r}")
    return float(value)


def _damping(value: Any) -> float:
    return check_positive(
        "state_dict['damping']", value, fix="refusing to push it into the optimizer"
    )


def _tau(value: Any) -> float | None:
    return check_optional(check_positive, "state_dict['tau']", value)


def _count(name: str, value: Any) -> int:
    return check_int(f"state_dict[{name!r}]", value, minimum=0)


def _history(records: Any) -> list[DampingRecord]:
    if not isinstance(records, (list, tuple)):
        raise InvalidInputError("state_dict['history'] must be a list of records")
    out = []
    for i, r in enumerate(records):
        if not isinstance(r, Mapping) or set(r) != set(COLUMNS):
            raise InvalidInputError(f"state_dict['history'][{i}] is not a damping record: {r!r}")
        if r["decision"] not in DECISIONS:
            raise InvalidInputError(
                f"state_dict['history'][{i}]: unknown decision {r['decision']!r}"
            )
        damping = check_positive(f"state_dict['history'][{i}].damping", r["damping"])
        out.append(
            DampingRecord(
                step=_count(f"history[{i}].step", r["step"]),
                estimate=_number(f"history[{i}].estimate", r["estimate"]),
                stderr=_number(f"history[{i}].stderr", r["stderr"]),
                decision=r["decision"],
                reason=str(r["reason"]),
                damping=damping,
                batch_size=_count(f"history[{i}].batch_size", r["batch_size"]),
                loss=_number(f"history[{i}].loss", r["loss"]),
                folded=_number(f"history[{i}].folded", r["folded"]),
            )
        )
    return out


def _rng_state(value: Any, generator: torch.Generator) -> torch.Tensor:
    expected = generator.get_state()
    if not (
        isinstance(value, torch.Tensor)
        and value.dtype == expected.dtype
        and value.shape == expected.shape
    ):
        raise InvalidInputError("state_dict['rng_state'] is not a CPU generator state")
    return value.clone()


def _indices(value: Any) -> torch.Tensor | None:
    if value is None:
        return None
    if not (
        isinstance(value, torch.Tensor)
        and value.ndim == 1
        and value.dtype == torch.long
        and value.numel() > 0
        and int(value.min()) >= 0
    ):
        raise InvalidInputError("state_dict['indices'] must be None or a 1-D long tensor >= 0")
    return value.clone()


def _losses(values: Any) -> list[float]:
    if not isinstance(values, (list, tuple)):
        raise InvalidInputError("state_dict['losses'] must be a list of numbers")
    return [_number("losses", v) for v in values]


def _strings(name: str, values: Any) -> set[str]:
    if not isinstance(values, (list, tuple, set)) or not all(isinstance(v, str) for v in values):
        raise InvalidInputError(f"state_dict[{name!r}] must be a list of str")
    return set(values)
