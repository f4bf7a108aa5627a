"""Optimizers from the paper on the shared curvature interface, and its schedules.

- :class:`LanczosOPT` (eq. 9): the damped Newton step on the top-k Lanczos eigenbasis of
  any curvature operator, with :class:`Eigensolver` settings;
- :class:`KFAC`: K-FAC with exact damping from running averages of Kronecker factors
  (:class:`KFACFactors` computes them);
- :func:`adam_with_learned_eps`: torch's Adam/AdamW with ``eps`` learned by a damper;
- :class:`PaperSchedule` / :func:`paper_schedule` (eq. 12) and :class:`WarmupSchedule` /
  :func:`warmup_schedule` (eq. 16): the paper's learning-rate schedules;
- :func:`largest_stable_lr`: the largest stable learning rate on a grid, with the
  preconditioned sharpness the step sees (eq. 17-19).

Every damping argument takes a number, a callable of the step or a
:class:`~curvlab.LinearShrinkageDamper` (one resolver, :mod:`curvlab.damping.resolve`).
"""

from curvlab.optim.adam import adam_with_learned_eps
from curvlab.optim.eigensolver import Eigensolver
from curvlab.optim.kfac import KFAC
from curvlab.optim.kfac_factors import KFACFactors
from curvlab.optim.lanczos_opt import LanczosOPT
from curvlab.optim.schedules import PaperSchedule, WarmupSchedule, paper_schedule, warmup_schedule
from curvlab.optim.stable_lr import StableLRResult, largest_stable_lr

__all__ = [
    "KFAC",
    "Eigensolver",
    "KFACFactors",
    "LanczosOPT",
    "PaperSchedule",
    "StableLRResult",
    "WarmupSchedule",
    "adam_with_learned_eps",
    "largest_stable_lr",
    "paper_schedule",
    "warmup_schedule",
]
