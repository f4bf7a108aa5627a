"""Where the damping goes: the third stage of the damper (estimate, judge, sink).

``damper.attach(obj, key, ...)`` wraps ``obj`` in a sink; after every update (and at
attach and ``load_state_dict``) the damper calls ``sink.push(damping, lr_factor)``:

- :class:`ParamGroupSink`, a torch optimizer: ``group[key]`` in every param group (Adam's
  ``eps``, ``damping`` of curvlab's LanczosOPT/KFAC), each group in a documented relation to
  the learned value (``groups=``), and optionally the learning-rate compensation of eq. 13;
- :class:`MappingSink`, ``obj[key]`` of a dict-like config;
- :class:`AttributeSink`, ``setattr(obj, key, damping)`` (a preconditioner's attribute).

kfac-pytorch reads its damping instead of being written to: pass
``damping=curvlab.adapters.kfac_pytorch.damping_schedule(damper)``.

**Learning-rate compensation** (eq. 13). A step with damping delta is a step with the shrunk
curvature beta H + (1 - beta) tau I at the learning rate beta * lr, beta = tau / (tau +
delta) (1 / (1 + delta) for the identity target). ``compensate=True`` undoes that cut: every
optimizer step runs at ``lr / beta`` (``lr (1 + delta)``), as the authors' released code
does. The factor is applied inside ``optimizer.step`` only (a step pre-hook multiplies each
group's ``lr``, a post-hook restores it), so ``group["lr"]`` always holds the value of the
optimizer and of any LR scheduler, chained or closed-form: the rate used is the scheduler's
value times the compensation, and the optimizer's, the scheduler's and the damper's
``state_dict`` each resume exactly.
"""

from __future__ import annotations

import math
from collections.abc import MutableMapping
from typing import Any

import torch

from curvlab.errors import InvalidInputError

GROUP_RELATIONS = ("shared", "scaled")


class ParamGroupSink:
    """Writes the damping into ``group[key]`` of a torch optimizer's param groups.

    Parameters
    ----------
    optimizer : torch.optim.Optimizer
    key : str or None, default "eps"
        The group entry holding the damping (Adam/AdamW ``"eps"``; ``"damping"`` of
        curvlab's LanczosOPT and KFAC). None writes no damping (compensation only, e.g.
        the SGD under a kfac-pytorch preconditioner).
    groups : {None, "shared", "scaled"}, default None
        How each param group relates to the learned damping delta:
        "shared", every group gets delta; "scaled", group i gets delta * e_i / e_0 with
        e_i its value of ``key`` at attach (each group keeps its ratio to group 0, which
        gets delta). None is "shared" when all groups hold the same value and an error
        otherwise: different values are never silently flattened.
    compensate : bool, default False
        Run every step at ``lr / beta`` (module docstring).

    Examples
    --------
    >>> import torch
    >>> w, b = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(1))
    >>> opt = torch.optim.Adam([{"params": [w], "eps": 1e-8}, {"params": [b], "eps": 1e-6}])
    >>> sink = ParamGroupSink(opt, "eps", groups="scaled")
    >>> sink.push(1e-3, 1.0)
    >>> [g["eps"] for g in opt.param_groups]
    [0.001, 0.1]
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        key: str | None = "eps",
        *,
        groups: str | None = None,
        compensate: bool = False,
    ):
        if key is None and not compensate:
            raise InvalidInputError("key=None writes no damping: pass a key or compensate=True")
        if groups is not None and groups not in GROUP_RELATIONS:
            raise InvalidInputError(f"groups must be one of {GROUP_RELATIONS}, got {groups!r}")
        self.optimizer, self.key, self.compensate = optimizer, key, bool(compensate)
        self.scales = self._scales(groups) if key is not None else []
        self.groups = groups
        self.lr_factor = 1.0
        self._saved: list[Any] = []
        self._applied: list[Any] = []
        self._handles = []
        if self.compensate:
            self._handles = [
                optimizer.register_step_pre_hook(self._before_step),
                optimizer.register_step_post_hook(self._after_step),
            ]

    def _scales(self, groups: str | None) -> list[float]:
        key, param_groups = self.key, self.optimizer.param_groups
        missing = [i for i, g in enumerate(param_groups) if key not in g]
        if missing:
            raise InvalidInputError(
                f"param groups {missing} of {type(self.optimizer).__name__} have no {key!r}; "
                "pass the key that holds the damping (Adam/AdamW: 'eps')"
            )
        values = [param_groups[i][key] for i in range(len(param_groups))]
        if groups == "shared" or (groups is None and len(set(values)) <= 1):
            return [1.0] * len(values)
        if groups is None:
            raise InvalidInputError(
                f"the param groups hold different {key!r} values {values}: pass "
                "groups='shared' (every group gets the learned value) or groups='scaled' "
                "(each keeps its ratio to group 0)"
            )
        base = values[0]
        if not (isinstance(base, (int, float)) and 0 < base < math.inf):
            raise InvalidInputError(
                f"groups='scaled' needs a finite positive {key!r} in group 0, got {base!r}"
            )
        return [float(v) / base for v in values]

    def push(self, damping: float, lr_factor: float) -> None:
        """Write ``damping`` (scaled per group) and remember the compensation factor."""
        if self.key is not None:
            if len(self.optimizer.param_groups) != len(self.scales):
                raise InvalidInputError(
                    "the optimizer's param groups changed after attach; attach it again"
                )
            for group, scale in zip(self.optimizer.param_groups, self.scales):
                group[self.key] = damping * scale if scale != 1.0 else damping
        self.lr_factor = float(lr_factor)

    def _before_step(self, optimizer, args, kwargs) -> None:
        saved = []
        for i, group in enumerate(optimizer.param_groups):
            lr = group["lr"]
            if i < len(self._applied) and lr is self._applied[i]:
                lr = self._saved[i]  # a step that raised left our value behind
            saved.append(lr)
        self._saved = saved
        self._applied = [lr * self.lr_factor for lr in saved]
        for group, lr in zip(optimizer.param_groups, self._applied):
            group["lr"] = lr

    def _after_step(self, optimizer, args, kwargs) -> None:
        for group, lr in zip(optimizer.param_groups, self._saved):
            group["lr"] = lr
        self._applied = []

    def remove(self) -> None:
        """Stop compensating (remove the step hooks)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []


class MappingSink:
    """Writes the damping into ``mapping[key]`` (the key must exist).

    Examples
    --------
    >>> config = {"damping": 1.0}
    >>> MappingSink(config, "damping").push(0.01, 1.0)
    >>> config
    {'damping': 0.01}
    """

    def __init__(self, mapping: MutableMapping, key: str):
        if key not in mapping:
            raise InvalidInputError(f"the mapping has no key {key!r} to keep updated")
        self.mapping, self.key = mapping, key

    def push(self, damping: float, lr_factor: float) -> None:
        self.mapping[self.key] = damping

    def remove(self) -> None:
        """Nothing to undo."""


class AttributeSink:
    """Sets the attribute ``key`` of any object (it must exist and be writable).

    Examples
    --------
    >>> class Preconditioner:
    ...     damping = 0.1
    >>> pre = Preconditioner()
    >>> AttributeSink(pre, "damping").push(0.02, 1.0)
    >>> pre.damping
    0.02
    """

    def __init__(self, obj: Any, key: str):
        if not hasattr(obj, key):
            raise InvalidInputError(
                f"{type(obj).__name__} has no attribute {key!r}; pass key= the attribute "
                "that holds the damping"
            )
        try:
            setattr(obj, key, getattr(obj, key))
        except AttributeError as exc:
            raise InvalidInputError(
                f"{type(obj).__name__}.{key} is read-only; a kfac-pytorch preconditioner reads "
                "its damping instead: pass damping=damping_schedule(damper) "
                "(curvlab.adapters.kfac_pytorch)"
            ) from exc
        self.obj, self.key = obj, key

    def push(self, damping: float, lr_factor: float) -> None:
        setattr(self.obj, self.key, damping)

    def remove(self) -> None:
        """Nothing to undo."""


def as_sink(obj: Any, key: str | None, *, groups: str | None, compensate: bool) -> Any:
    """The sink for ``damper.attach(obj, key, groups=, compensate=)``."""
    if callable(getattr(obj, "push", None)):
        return obj  # already a sink
    if isinstance(obj, torch.optim.Optimizer):
        return ParamGroupSink(obj, key, groups=groups, compensate=compensate)
    if compensate or groups is not None:
        raise InvalidInputError(
            "groups= and compensate= apply to torch optimizers (their param groups' lr); "
            f"got a {type(obj).__name__}. For kfac-pytorch attach the optimizer that owns the "
            "learning rate: damper.attach(optimizer, key=None, compensate=True)"
        )
    if key is None:
        raise InvalidInputError(f"pass the key or attribute of {type(obj).__name__} to write")
    if isinstance(obj, MutableMapping):
        return MappingSink(obj, key)
    return AttributeSink(obj, key)


__all__ = ["GROUP_RELATIONS", "AttributeSink", "MappingSink", "ParamGroupSink", "as_sink"]
