"""The paper's claims as runnable experiments (installed as ``curvlab.experiments``).

``registry`` lists them (:data:`EXPERIMENTS`) and their scales (:data:`SCALES`); each module
``NAME`` has ``run(out_dir, *, scale, seed, device, progress) -> dict``; ``tour`` is the guided
tour behind ``curvlab tour``.
"""

from curvlab.experiments.registry import EXPERIMENTS, SCALES

__all__ = ["EXPERIMENTS", "SCALES"]
