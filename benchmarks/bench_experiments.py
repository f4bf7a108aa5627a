"""CPU time of every paper-claim experiment at the fast scale (the CI budget of issue 15)."""

from __future__ import annotations

import importlib
import tempfile
import time
import warnings

import torch

from ._common import table

TITLE = "The paper-claim experiments: fast-scale CPU time (issue 15)"
BUDGET_S = 300.0


def run() -> str:
    from curvlab.experiments.registry import EXPERIMENTS

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    rows, total_cpu, total_wall = [], 0.0, 0.0
    try:
        with tempfile.TemporaryDirectory() as out, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for name in EXPERIMENTS:
                module = importlib.import_module(f"curvlab.experiments.{name}")
                cpu, wall = time.process_time(), time.perf_counter()
                results = module.run(out, scale="fast", seed=0)
                cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
                total_cpu += cpu
                total_wall += wall
                rows.append([name, len(results["seeds"]), cpu, wall, results["verdict"]])
    finally:
        torch.set_num_threads(before)
    rows.append(["all", "", total_cpu, total_wall, ""])
    body = table(["experiment", "seeds", "CPU s", "wall s", "verdict (seeds 0-2)"], rows)
    return body + (
        f"\n\nOne process, one torch thread, `run(out, scale='fast', seed=0)` for each "
        f"experiment in turn; all of them take {total_cpu:.0f} CPU-seconds against the "
        f"budget of {BUDGET_S:.0f} (5 CPU-minutes). Wall time counts the wait for a CPU on a "
        "shared machine."
    )
