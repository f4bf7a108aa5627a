"""The paper-claim experiments: each runs over seeds, writes its files and documents its JSON
fields; verdicts follow the one rule of experiments/stats.py; library checks stay apart from
claims; their exact reference values are right; the data loaders and workloads."""

from __future__ import annotations

import gzip
import importlib
import json
import math
import struct

import pytest
import torch
from helpers import dense_hessian
from torch import nn

from curvlab import cli
from curvlab.errors import InvalidInputError
from curvlab.experiments import _common as C
from curvlab.experiments import (
    algorithm1,
    dampers,
    data,
    lanczos_damping,
    registry,
    stats,
    workloads,
)

NAMES = registry.EXPERIMENTS
CHECK_KEYS = {"claim", "measure", "verdict", "supports", "effect", "evidence", "would_change"}


def _check_outputs(module, results: dict, out) -> None:
    assert tuple(results) == module.FIELDS
    assert module.FIELDS[: len(C.COMMON_FIELDS)] == C.COMMON_FIELDS
    on_disk = json.loads((out / f"{module.NAME}.json").read_text())
    assert on_disk == results
    for name in results["files"]:
        assert (out / name).stat().st_size > 0, name
    suffixes = {f.rsplit(".", 1)[1] for f in results["files"]}
    assert {"json", "csv", "png", "md"} <= suffixes
    seeds = results["seeds"]
    assert len(seeds) >= stats.MIN_SEEDS and seeds == sorted(set(seeds))
    assert results["checks"], "every experiment tests at least one claim"
    for check in results["checks"]:
        assert set(check) == CHECK_KEYS
        assert check["verdict"] in stats.VERDICTS
        assert check["supports"] == C.as_supports(check["verdict"])
        assert check["would_change"]
        effect = check["effect"]
        assert len(effect["values"]) == len(seeds)  # one value per seed, in seed order
        redo = stats.effect(  # the verdict is the rule applied to the reported values
            [math.nan if v is None else v for v in effect["values"]],
            direction=effect["direction"],
            threshold=effect["threshold"],
        )
        assert redo.verdict == check["verdict"]
    for check in results["library_checks"]:
        assert set(check) == {"check", "passed", "evidence"}
    assert results["verdict"] == stats.combine(c["verdict"] for c in results["checks"])
    assert results["supports"] == C.as_supports(results["verdict"])
    report = (out / f"{module.NAME}.md").read_text()
    assert f"**Verdict: {results['verdict'].upper()}**" in report
    assert f"seeds {seeds}" in report
    assert report.count("What would change it:") == len(results["checks"])


@pytest.mark.parametrize("name", NAMES)
def test_smoke_scale_runs_and_documents_fields(name, tmp_path):
    module = importlib.import_module(f"curvlab.experiments.{name}")
    results = module.run(tmp_path, scale="smoke", seed=1)
    assert results["scale"] == "smoke" and results["seeds"] == [1, 2, 3]
    _check_outputs(module, results, tmp_path)


@pytest.mark.parametrize("name", NAMES)
def test_fast_scale_runs_and_documents_fields(name, tmp_path):
    module = importlib.import_module(f"curvlab.experiments.{name}")
    results = module.run(tmp_path, scale="fast", seed=0)
    _check_outputs(module, results, tmp_path)
    assert results["seeds"] == [0, 1, 2]
    if name == "theorem1":  # curvlab.rmt follows eq. 8 on the simulated spiked model
        assert results["library_checks"][0]["passed"], results["library_checks"][0]
    if name == "algorithm1":  # the unbiased estimator agrees with the exact value
        assert abs(results["digits"]["unbiased_g1"]["z_vs_target"]) < 4
        assert all(c["passed"] for c in results["library_checks"])
    if name == "stable_lr":  # a collapsed run is never the largest stable rate
        for per in results["per_seed"]:
            for v in per.values():
                assert not any(s and c for s, c in zip(v["stable"], v["collapsed"]))
                if v["lr"] is not None:
                    assert v["lr_times_sharpness"] > 0


def test_fast_scales_use_at_least_three_seeds_and_the_registry_is_the_clis():
    assert cli.EXPERIMENTS is registry.EXPERIMENTS and cli.SCALES is registry.SCALES
    for name in NAMES:
        module = importlib.import_module(f"curvlab.experiments.{name}")
        assert set(module.SETTINGS) == set(registry.SCALES)
        assert all(s["seeds"] >= stats.MIN_SEEDS for s in module.SETTINGS.values()), name
        # the paper scale (run on a GPU, never in CI) has exactly the keys the tested ones have
        assert set(module.SETTINGS["paper"]) == set(module.SETTINGS["fast"]), name
        assert module.NAME == name and module.CLAIM and module.PAPER_SETTING


def test_runs_are_reproducible(tmp_path):
    a = algorithm1.run(tmp_path / "a", scale="smoke", seed=3)
    b = algorithm1.run(tmp_path / "b", scale="smoke", seed=3)
    assert a["digits"] == b["digits"] and a["spiked"] == b["spiked"]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"scale": "huge"}, "scale"),
        ({"seed": -1}, "seed"),
        ({"seed": 1.5}, "seed"),
        ({"device": "tpu"}, "device"),
    ],
)
def test_bad_arguments_raise_curvlab_errors(kwargs, match, tmp_path):
    with pytest.raises(InvalidInputError, match=match):
        algorithm1.run(tmp_path, **{"scale": "smoke", **kwargs})


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA present")
def test_cuda_without_cuda_is_a_clear_error(tmp_path):
    with pytest.raises(InvalidInputError, match="no CUDA device"):
        algorithm1.run(tmp_path, scale="smoke", device="cuda")


# --------------------------------------------------------------------------- exact references


def _per_sample_reference(model, x, y):
    """Dense per-sample Hessians: S2, P^-1 Tr H, P^-1 Tr H^2 by brute force."""
    loss = nn.CrossEntropyLoss()
    hs = torch.stack(
        [dense_hessian(model, loss, x[i : i + 1], y[i : i + 1]) for i in range(x.shape[0])]
    )
    mean = hs.mean(0)
    p, n = mean.shape[0], x.shape[0]
    s2 = float(((hs - mean) ** 2).sum()) / ((n - 1) * p)
    return s2, float(torch.trace(mean)) / p, float((mean**2).sum()) / p


def test_logreg_exact_noise_equals_dense_per_sample_hessians():
    digits = data.load_sklearn("digits", seed=0)
    x, y = digits.x_train[:25], digits.y_train[:25]
    model = C.seeded(0, lambda: nn.Linear(64, 10).to(torch.float64))
    with torch.no_grad():
        model.weight.mul_(5)  # away from uniform predictions
    exact = algorithm1.logreg_exact(model, x, y)
    s2, tr, tr2 = _per_sample_reference(model, x, y)
    assert exact["s2"] == pytest.approx(s2, rel=1e-10)
    assert exact["trace_per_p"] == pytest.approx(tr, rel=1e-10)
    assert exact["trace_sq_per_p"] == pytest.approx(tr2, rel=1e-10)


def test_spiked_quadratic_has_the_stated_per_sample_hessians():
    model, z, exact = algorithm1.spiked_case(12, 9, seed=0, device="cpu")
    y = torch.zeros(z.shape[0], dtype=torch.float64)
    hs = torch.stack(
        [
            dense_hessian(model, algorithm1.mean_loss, z[i : i + 1], y[i : i + 1])
            for i in range(z.shape[0])
        ]
    )
    mean = hs.mean(0)
    expected = model.s + model.c * (torch.outer(z[0], z[0]) - torch.eye(12))
    torch.testing.assert_close(hs[0], expected, rtol=1e-12, atol=1e-12)
    s2 = float(((hs - mean) ** 2).sum()) / ((9 - 1) * 12)
    assert exact["s2"] == pytest.approx(s2, rel=1e-10)
    assert exact["trace_sq_per_p"] == pytest.approx(float((mean**2).sum()) / 12, rel=1e-10)


def test_common_dense_hessian_matches_the_row_by_row_double_backward_reference():
    model = C.seeded(0, lambda: C.mlp(5, 4, 3).to(torch.float64))
    x = torch.randn(7, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([0, 1, 2, 0, 1, 2, 0])
    ours = C.dense_hessian(model, nn.CrossEntropyLoss(), x, y, chunk=5)
    reference = dense_hessian(model, nn.CrossEntropyLoss(), x, y)
    torch.testing.assert_close(ours, reference, rtol=1e-12, atol=1e-14)


def test_logreg_hessian_is_the_dense_hessian_in_parameter_order():
    digits = data.load_sklearn("digits", seed=0)
    x, y = digits.x_train[:30], digits.y_train[:30]
    model = C.seeded(0, lambda: nn.Linear(64, 10).to(torch.float64))
    with torch.no_grad():
        model.weight.mul_(5)
    reference = dense_hessian(model, nn.CrossEntropyLoss(), x, y)
    torch.testing.assert_close(algorithm1.logreg_hessian(model, x), reference, atol=1e-14, rtol=0)


# --------------------------------------------------------------------------- verdicts


def test_the_verdict_rule():
    t3 = stats.t_quantile(3)
    # two degrees of freedom have a closed-form quantile: (2p - 1) / sqrt(2 p (1 - p))
    assert t3 == pytest.approx(0.95 / math.sqrt(2 * 0.975 * 0.025), rel=1e-9)
    e = stats.effect([0.30, 0.25, 0.35], direction=+1)
    assert (e.mean, e.n) == (pytest.approx(0.3), 3)
    assert e.stderr == pytest.approx(0.05 / math.sqrt(3))
    assert e.low == pytest.approx(0.3 - t3 * e.stderr) and e.verdict == "supports"
    # the same numbers, claimed the other way, contradict; a threshold inside the interval
    # leaves it open
    assert stats.effect([0.30, 0.25, 0.35], direction=-1).verdict == "contradicts"
    assert stats.effect([0.30, 0.25, 0.35], direction=+1, threshold=0.3).verdict == ("inconclusive")
    # a margin smaller than t * SE is not enough, whatever the sign of every seed
    assert stats.effect([0.1, 0.3, 0.05], direction=+1).verdict == "inconclusive"
    # fewer than 3 finite seeds: never a verdict; NaN seeds are left out
    assert stats.effect([1.0, 1.1], direction=+1).verdict == "inconclusive"
    e = stats.effect([1.0, 1.1, math.nan, 1.05], direction=+1)
    assert e.n == 3 and e.verdict == "supports" and math.isnan(e.values[2])
    # zero spread: the interval is the point
    assert stats.effect([-1.0, -1.0, -1.0], direction=-1, threshold=-0.5).verdict == "supports"
    assert stats.effect([0.0, 0.0, 0.0], direction=+1).verdict == "inconclusive"
    assert stats.combine(["supports", "supports"]) == "supports"
    assert stats.combine(["supports", "contradicts", "inconclusive"]) == "contradicts"
    assert stats.combine(["supports", "inconclusive"]) == "inconclusive"
    assert stats.combine([]) == "inconclusive"


def test_what_would_change_a_verdict():
    open_ = C.claim_check("c", "m", [0.1, 0.3, 0.05], direction=+1)
    need = open_.effect.seeds_for_verdict()
    assert need is not None and need > 3
    # with that many seeds at the same mean and sd the interval clears the threshold
    sd = open_.effect.stderr * math.sqrt(3)
    assert stats.t_quantile(need) * sd / math.sqrt(need) < open_.effect.mean
    assert stats.t_quantile(need - 1) * sd / math.sqrt(need - 1) >= open_.effect.mean
    assert f"about {need} seeds" in open_.would_change()
    done = C.claim_check("c", "m", [0.3, 0.25, 0.35], direction=+1, caveat="grid is coarse")
    assert "clears the threshold by" in done.would_change()
    assert done.would_change().endswith("grid is coarse.")
    assert C.Check("c", "m", None, "nothing ran").verdict == "inconclusive"
    assert C.verdict_word(True) == "SUPPORTS" and C.verdict_word("contradicts") == "CONTRADICTS"
    # a mean on the threshold is on neither side; identical arms say so
    tied = C.claim_check("c", "m", [0.02, -0.03, 0.01], direction=+1).would_change()
    assert "the mean equals it." in tied and "side" not in tied
    same = C.claim_check("c", "m", [0.0, 0.0, 0.0], direction=+1).would_change()
    assert "the mean equals it on every seed" in same


def test_claim_tally_counts_each_verdict():
    checks = [{"verdict": v} for v in ("supports", "contradicts", "supports", "inconclusive")]
    assert C.claim_tally(checks) == "2 support, 1 contradicts, 1 inconclusive"


def test_identical_arms_are_named_per_setting():
    from curvlab.experiments.dampers import identical_arms

    runs = [
        {"arm": arm, "seed": seed, "lr": lr, "loss": 1.0 + seed + (arm == "b" and lr == 0.2)}
        for arm in ("flat", "b") for seed in (0, 1, 2) for lr in (0.1, 0.2)
    ]
    text = identical_arms(runs, "arm", lambda r: f"lr {r['lr']}", lambda r: r["loss"])
    assert text == "Identical on every seed: lr 0.1: flat and b."
    runs[0]["loss"] += 1e-15  # one seed differs: no longer identical
    assert "lr 0.1" not in identical_arms(runs, "arm", lambda r: f"lr {r['lr']}",
                                          lambda r: r["loss"])


def _lopt_per_seed(val_errors_by_seed, eta_bump):
    """Runs as lanczos_damping makes them: one list per seed, val error at matched loss."""
    per_seed = []
    for seed, errors in enumerate(val_errors_by_seed):
        runs = []
        for d, v in zip((1e-3, 1e-2, 1e-1), errors):
            for eta, bump in ((1.0, 0.0), (10.0, eta_bump)):
                runs.append(
                    {"seed": seed, "delta": d, "eta": eta, "reached": 10, "val_error": v + bump}
                )
        per_seed.append(runs)
    return per_seed, {
        "deltas": (1e-3, 1e-2, 1e-1),
        "etas": (10.0,),
        "eta_deltas": (1e-3, 1e-2, 1e-1),
        "target_loss": 0.2,
    }


def test_lanczos_damping_verdicts_follow_the_numbers():
    worse_small = [[0.10, 0.08, 0.06], [0.11, 0.08, 0.05], [0.10, 0.07, 0.06]]
    checks, summary = lanczos_damping._checks(*_lopt_per_seed(worse_small, 0.03))
    assert [c.verdict for c in checks] == ["supports", "supports"]
    assert summary["slope_val_error_per_decade"][0] == pytest.approx(-0.02)
    better_small = [[0.06, 0.08, 0.10], [0.05, 0.08, 0.11], [0.06, 0.07, 0.10]]
    checks, _ = lanczos_damping._checks(*_lopt_per_seed(better_small, -0.03))
    assert [c.verdict for c in checks] == ["contradicts", "contradicts"]
    mixed = [[0.10, 0.08, 0.06], [0.06, 0.08, 0.10], [0.08, 0.08, 0.08]]
    checks, _ = lanczos_damping._checks(*_lopt_per_seed(mixed, 0.0))
    assert [c.verdict for c in checks] == ["inconclusive", "inconclusive"]


def test_overall_verdict():
    yes, no, unknown = (
        C.claim_check("c", "m", v, direction=+1)
        for v in ([1.0, 1.1, 0.9], [-1.0, -1.1, -0.9], [1.0, -1.0, 0.0])
    )
    assert C.overall([yes, yes]) == "supports"
    assert C.overall([yes, no, unknown]) == "contradicts"
    assert C.overall([yes, unknown]) == "inconclusive"


def test_json_is_strict():
    assert C.jsonable({"a": math.nan, "b": torch.tensor([1.0, math.inf]), 3: (1, 2)}) == {
        "a": None,
        "b": [1.0, None],
        "3": [1, 2],
    }


# --------------------------------------------------------------------------- data


def test_sklearn_sets_split_reproducibly():
    a = data.load_sklearn("digits", n_train=1000, seed=4)
    b = data.load_sklearn("digits", n_train=1000, seed=4)
    assert a.n_train == 1000 and a.n_val == 797 and a.n_classes == 10
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.y_val, b.y_val)
    assert float(a.x_train.max()) <= 1.0
    img = data.load_sklearn("digits", image=True, dtype=torch.float32)
    assert img.x_train.shape[1:] == (1, 8, 8) and img.x_train.dtype == torch.float32
    cancer = data.load_sklearn("breast_cancer")
    assert cancer.n_classes == 2
    assert torch.allclose(cancer.x_train.mean(0), torch.zeros(30, dtype=torch.float64), atol=1e-12)
    with pytest.raises(InvalidInputError, match="unknown data set"):
        data.load_sklearn("mnist")


def test_teacher_student_and_spiked_model():
    reg = data.teacher_student(200, 5, seed=1)
    assert reg.n_classes == 0 and reg.y_train.shape == (150, 1)
    cls = data.teacher_student(200, 5, n_classes=3, seed=1)
    assert cls.n_classes == 3 and set(cls.y_train.tolist()) <= {0, 1, 2}
    assert torch.equal(cls.x_train, data.teacher_student(200, 5, n_classes=3, seed=1).x_train)
    m, theta = data.spiked_model(50, (5.0, 3.0), seed=0)
    assert m.shape == (50, 50) and theta.shape == (50, 2)


@pytest.mark.parametrize("name", sorted(data.TORCHVISION_SETS))
def test_missing_torchvision_set_names_what_to_download(name, tmp_path, monkeypatch):
    monkeypatch.delenv(data.ENV_VAR, raising=False)
    with pytest.raises(data.DataNotFoundError) as info:
        data.load_torchvision(name, root=tmp_path)
    message = str(info.value)
    source = data.TORCHVISION_SETS[name][2]
    assert str(tmp_path) in message and source.split()[0] in message
    assert "never downloads" in message and data.ENV_VAR in message
    assert not [p for p in tmp_path.rglob("*") if p.is_file()]  # nothing was downloaded


def _write_idx(path, array: torch.Tensor, compress: bool = False) -> None:
    """torchvision's MNIST on-disk format: big-endian magic (0x08 = uint8, ndim), sizes, data."""
    header = struct.pack(">I", 0x0800 + array.ndim) + b"".join(
        struct.pack(">I", s) for s in array.shape
    )
    payload = header + array.to(torch.uint8).numpy().tobytes()
    (gzip.open if compress else open)(path, "wb").write(payload)


@pytest.mark.parametrize("name", ["mnist", "fashion_mnist"])
def test_torchvision_loader_reads_local_idx_files(name, tmp_path, monkeypatch):
    folder = tmp_path / data.TORCHVISION_SETS[name][0] / "raw"
    folder.mkdir(parents=True)
    gen = torch.Generator().manual_seed(0)
    images = {
        s: torch.randint(0, 256, (n, 28, 28), generator=gen) for s, n in (("train", 6), ("t10k", 4))
    }
    labels = {s: torch.randint(0, 10, (len(images[s]),), generator=gen) for s in images}
    for split in images:
        _write_idx(folder / f"{split}-images-idx3-ubyte", images[split])
        _write_idx(folder / f"{split}-labels-idx1-ubyte", labels[split])
    monkeypatch.setenv(data.ENV_VAR, str(tmp_path))  # root from the environment
    x, y = data.load_torchvision(name, train=False)
    assert x.shape == (4, 1, 28, 28) and x.dtype == torch.float32
    assert torch.allclose(x[:, 0] * 255, images["t10k"].float())
    assert torch.equal(y, labels["t10k"])
    x, y = data.load_torchvision(name, root=tmp_path, limit=5)
    assert x.shape == (5, 1, 28, 28) and torch.equal(y, labels["train"][:5])


# --------------------------------------------------------------------------- workloads


def test_paper_scale_reads_cifar100_from_local_files_only(tmp_path, monkeypatch):
    monkeypatch.setenv(data.ENV_VAR, str(tmp_path))
    with pytest.raises(data.DataNotFoundError, match="never downloads"):
        workloads.image_workload("paper", 0, torch.device("cpu"))
    assert not [p for p in tmp_path.rglob("*") if p.is_file()]  # nothing was downloaded
    assert workloads.describe_workload("paper").startswith("VGG-16")


def test_vgg16_has_the_papers_shape():
    model = workloads.VGG16(n_classes=100)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert len(convs) == 13 and len(linears) == 3  # 16 weight layers
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert sum(p.numel() for p in model.parameters()) == 15_291_300
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 100)


def test_damper_configurations_start_at_delta_star():
    from curvlab.damping import AuthorsUpdate, CurvlabUpdate, PaperUpdate

    labels = [c.label for c in dampers.DAMPER_CONFIGS]
    assert len(labels) == len(set(labels)) == 3
    rules = []
    for config in dampers.DAMPER_CONFIGS:
        damper = dampers.make_damper(
            config, 3e-4, batch_size=16, update_every=5, seed=0, n_probes=3, population=500
        )
        assert damper.damping == 3e-4 and damper.batch_size == 16 and damper.update_every == 5
        assert damper.rule.n_probes == 3 and damper.rule.population == 500
        rules.append(type(damper.update_rule))
        if damper.floor is not None:  # the rules with a floor take delta*
            assert damper.floor == 3e-4
    assert rules == [AuthorsUpdate, PaperUpdate, CurvlabUpdate]
    per_run = dampers.DamperConfig(
        "floor delta*/10", lambda init: {"update_rule": CurvlabUpdate(floor=init / 10)}
    )
    damper = dampers.make_damper(per_run, 1e-3, batch_size=8, update_every=1, seed=0)
    assert damper.floor == pytest.approx(1e-4)
