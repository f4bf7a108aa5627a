"""Optimizers from the paper on the shared curvature interface, and its schedules."""

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
