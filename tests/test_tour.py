"""The tour's learned-damping section and its split into computation and report: the learned
eps starts below the noise and its trajectory is recorded and drawn; the report is redrawn
from results.json alone."""

from __future__ import annotations

import json

import pytest
import torch

from curvlab.experiments import dampers, tour, tour_report


@pytest.fixture(scope="module")
def fast_tour(tmp_path_factory):
    out = tmp_path_factory.mktemp("tour")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        results = tour.run(out, fast=True, seed=0)
    finally:
        torch.set_num_threads(before)
    return out, results


def test_learned_eps_starts_below_the_noise_and_climbs_to_it(fast_tour):
    _, results = fast_tour
    ad = results["autodamping"]
    noise = results["noise"]["damping"]
    assert ad["eps_start"] == 1e-8 and ad["noise_eps"] == noise
    runs = ad["runs"]
    flat = {label: r for label, r in runs.items() if not r["learned"]}
    learned = {label: r for label, r in runs.items() if r["learned"]}
    assert len(learned) == 1 and dampers.DAMPER_CONFIGS[0].label in next(iter(learned))
    assert sorted(r["final_eps"] for r in flat.values()) == [1e-8, noise]
    for r in learned.values():
        d = r["damping_history"]
        assert r["eps_start"] == 1e-8
        assert len(d) >= ad["steps"] // ad["update_every"]  # one record per re-estimate
        assert all(p["estimate"] > 1e4 * r["eps_start"] for p in d)  # the noise is far above
        assert d[0]["damping"] > 1e4 * r["eps_start"]  # the learner moved, visibly
        # after 6 or more updates the start value is forgotten: eps sits at the noise
        assert noise / 3 < r["final_eps"] < 3 * noise
        assert r["final_eps"] == d[-1]["damping"]


def test_report_is_redrawn_from_results_json_alone(fast_tour, tmp_path):
    out, results = fast_tour
    saved = json.loads((out / "results.json").read_text())
    assert saved == results
    assert tour_report.report(saved) == (out / "report.md").read_text()
    files = tour_report.figures(tmp_path, saved)
    assert "autodamping.png" in files
    for name in files:
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = (out / "report.md").read_text()
    assert "starts at Adam's default 1e-08, far below the noise" in report
    assert "eps went from 1e-08 to" in report
