"""The names of the paper-claim experiments and their scales (no heavy imports).

``curvlab.cli`` and the experiments' shared plumbing both read these, so the experiments
package does not depend on the command-line module.

Examples
--------
>>> from curvlab.experiments.registry import EXPERIMENTS, SCALES
>>> "theorem1" in EXPERIMENTS and SCALES[0]
'smoke'
"""

from __future__ import annotations

#: Every experiment module in ``curvlab.experiments`` that tests a claim of the paper, in the
#: order ``curvlab experiment all`` runs them.
EXPERIMENTS: tuple[str, ...] = (
    "theorem1",
    "algorithm1",
    "lanczos_damping",
    "damping_sweep",
    "autodamping",
    "warmup",
    "adam_vs_sgd",
    "stable_lr",
)

#: smoke: seconds, for tests; fast: CPU minutes (CI); paper: the larger documented setting
#: (VGG-16 on CIFAR-100 where the paper used it), for a GPU.
SCALES: tuple[str, ...] = ("smoke", "fast", "paper")

__all__ = ["EXPERIMENTS", "SCALES"]
