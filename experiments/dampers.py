"""The learned-damping configurations the experiments compare, in one place.

``autodamping`` (KFAC), ``warmup`` (Adam) and the tour build their learned dampings from
:data:`DAMPER_CONFIGS`: every configuration is one update rule of
:class:`curvlab.LinearShrinkageDamper`, run from the same initial damping delta* with the
same estimate (the paper's Hessian noise variance of a batch, ``RMTNoise``) and the damper's
default outlier guard, so the experiments compare the rules side by side. With s2 the raw
estimate (issue 13, ``curvlab.damping.updates``):

- ``"authors"`` (curvlab's default): delta <- delta* + s2 at the first update, then
  0.7 delta + 0.3 (delta* + s2), the authors' released code;
- ``"paper"``: delta <- 0.7 delta + 0.3 s2 from delta*, the paper's description (section 7.1);
- ``"curvlab"``: delta <- 0.7 delta + 0.3 max(delta*, s2), curvlab's rule before issue 13.

A new rule is one more :class:`DamperConfig` here, with the keyword arguments that select it
in ``options`` (a dict, or a function of delta* for rule objects built per run, e.g.
``lambda init: {"update_rule": CurvlabUpdate(ema=0.9, floor=init / 10)}``); every
comparison, table and figure picks it up. The tour shows the first one only.

Examples
--------
>>> damper = make_damper(DAMPER_CONFIGS[0], 1e-3, batch_size=16, update_every=25, seed=0)
>>> damper.damping, damper.floor
(0.001, 0.001)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import curvlab
from curvlab.damping import RMTNoise


@dataclass(frozen=True)
class DamperConfig:
    """One learned-damping rule: a label for tables and plots, and the keyword arguments of
    :class:`curvlab.LinearShrinkageDamper` that select it.

    Attributes
    ----------
    label : str
    options : dict or callable
        Keyword arguments besides the common ones of :func:`make_damper` (they override
        those), or a function of delta* returning them.
    """

    label: str
    options: dict[str, Any] | Callable[[float], dict[str, Any]] = field(default_factory=dict)


#: The rules compared by the experiments (module docstring); the first is curvlab's default.
DAMPER_CONFIGS: tuple[DamperConfig, ...] = (
    DamperConfig("authors: 0.7 d + 0.3 (d* + s2)", {"update_rule": "authors"}),
    DamperConfig("paper: 0.7 d + 0.3 s2", {"update_rule": "paper"}),
    DamperConfig("curvlab-0.1: 0.7 d + 0.3 max(d*, s2)", {"update_rule": "curvlab"}),
)


#: Why arms can coincide, for the reports that list identical arms.
SAME_NOTE = (
    "The old curvlab rule 0.7 d + 0.3 max(d*, s2) equals the paper's 0.7 d + 0.3 s2 when "
    "every estimate exceeds d*, and stays at the flat d* when none does."
)


def identical_arms(runs: list[dict], arm: str, setting: Callable[[dict], str],
                   outcome: Callable[[dict], Any]) -> str:
    """Sentences naming, per setting, the compared arms whose runs ended identically on
    every seed.

    A rule that never moves the damping away from another arm's (the old ``"curvlab"``
    rule max(delta*, s2) equals ``"paper"`` when every estimate exceeds delta* and the flat
    run when none does) gives bit-identical runs; the report says so instead of leaving the
    reader to suspect a bug.

    Parameters
    ----------
    runs : list of dict
        One record per run, with a ``"seed"``.
    arm : str
        The key naming a run's arm (``"flat"`` or a rule's label).
    setting : callable
        A run's setting as a short label (``"alpha 0.1, eq12"``), shared by the arms.
    outcome : callable
        What must agree exactly (for example the final training loss).

    Returns
    -------
    str
        Empty when no two arms agree on every seed of a setting.

    Examples
    --------
    >>> runs = [{"arm": a, "seed": s, "lr": lr, "loss": s + lr * (a == "b")}
    ...         for a in "abc" for s in (0, 1) for lr in (0.1, 0.2)]
    >>> identical_arms(runs, "arm", lambda r: f"lr {r['lr']}", lambda r: r["loss"])
    'Identical on every seed: lr 0.1: a and c; lr 0.2: a and c.'
    """
    table: dict[str, dict[str, dict[Any, Any]]] = {}
    for r in runs:
        table.setdefault(setting(r), {}).setdefault(r[arm], {})[r["seed"]] = outcome(r)
    found = []
    for label, by_arm in table.items():
        arms = list(by_arm)
        pairs = [f"{a} and {b}" for i, a in enumerate(arms) for b in arms[i + 1:]
                 if by_arm[a] == by_arm[b]]
        if pairs:
            found.append(f"{label}: {', '.join(pairs)}")
    return f"Identical on every seed: {'; '.join(found)}." if found else ""


def make_damper(
    config: DamperConfig,
    init: float,
    *,
    batch_size: int,
    update_every: int,
    seed: int,
    n_probes: int = 2,
    population: float | None = None,
    **common: Any,
) -> curvlab.LinearShrinkageDamper:
    """The damper of ``config`` starting at ``init`` (delta*).

    Parameters
    ----------
    config : DamperConfig
    init : float
        The initial damping delta*.
    batch_size : int
        B, the optimizer's batch: the damping is the Hessian noise of a batch of B.
    update_every : int
        Steps between re-estimates.
    seed : int
        Seeds the damper's probes and subsamples.
    n_probes : int, default 2
        Probe rounds of each noise estimate (``RMTNoise``).
    population : float or None, default None
        N of the finite-population factor 1/B - 1/N (``RMTNoise``).
    **common
        Further keyword arguments of the damper shared by every configuration
        (``subsample``, ...).

    Returns
    -------
    curvlab.LinearShrinkageDamper
    """
    kwargs = {
        "rule": RMTNoise(n_probes=n_probes, population=population),
        "init": init,
        "batch_size": batch_size,
        "update_every": update_every,
        "seed": seed,
        **common,
    }
    kwargs.update(config.options(init) if callable(config.options) else config.options)
    return curvlab.LinearShrinkageDamper(**kwargs)


def damping_history(damper) -> list[dict]:
    """The damper's trajectory: step, raw estimate, its standard error, the damping after the
    update and the guard's decision, one dict per update."""
    return [
        {
            "step": h.step,
            "estimate": h.estimate,
            "stderr": h.stderr,
            "damping": h.damping,
            "accepted": h.accepted,
            "decision": getattr(h, "decision", "accept" if h.accepted else "reject"),
        }
        for h in damper.history
    ]


__all__ = [
    "DAMPER_CONFIGS",
    "SAME_NOTE",
    "DamperConfig",
    "damping_history",
    "identical_arms",
    "make_damper",
]
