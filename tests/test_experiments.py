"""The paper-claim experiments: each runs, writes its files and documents its JSON fields;
their exact reference values are right; verdicts are computed; the data loaders."""

from __future__ import annotations

import gzip
import importlib
import json
import math
import struct

import pytest
import torch
from conftest import dense_hessian
from torch import nn

from curvlab.cli import EXPERIMENTS
from curvlab.errors import InvalidInputError
from curvlab.experiments import _common as C
from curvlab.experiments import algorithm1, data, lanczos_damping

NAMES = EXPERIMENTS


def _check_outputs(module, results: dict, out) -> None:
    assert tuple(results) == module.FIELDS
    assert module.FIELDS[: len(C.COMMON_FIELDS)] == C.COMMON_FIELDS
    on_disk = json.loads((out / f"{module.NAME}.json").read_text())
    assert on_disk == results
    for name in results["files"]:
        assert (out / name).stat().st_size > 0, name
    suffixes = {f.rsplit(".", 1)[1] for f in results["files"]}
    assert {"json", "csv", "png", "md"} <= suffixes
    assert results["checks"], "every experiment states at least one computed check"
    for check in results["checks"]:
        assert set(check) == {"claim", "supports", "evidence"}
        assert check["supports"] in (True, False, None)
        assert check["evidence"]
    verdicts = [c["supports"] for c in results["checks"]]
    if False in verdicts:  # one failed check decides the overall verdict
        assert results["supports"] is False
    report = (out / f"{module.NAME}.md").read_text()
    assert f"Verdict: our run {C.verdict_word(results['supports'])} the claim" in report
    assert f"seed {results['seed']}" in report


@pytest.mark.parametrize("name", NAMES)
def test_smoke_scale_runs_and_documents_fields(name, tmp_path):
    module = importlib.import_module(f"curvlab.experiments.{name}")
    results = module.run(tmp_path, scale="smoke", seed=1)
    assert results["scale"] == "smoke" and results["seed"] == 1
    _check_outputs(module, results, tmp_path)


@pytest.mark.parametrize("name", NAMES)
def test_fast_scale_runs_and_documents_fields(name, tmp_path):
    module = importlib.import_module(f"curvlab.experiments.{name}")
    results = module.run(tmp_path, scale="fast", seed=0)
    _check_outputs(module, results, tmp_path)
    if name == "theorem1":  # the simulated spiked model follows eq. 8 at P=500
        assert results["checks"][0]["supports"] is True, results["checks"][0]["evidence"]
    if name == "algorithm1":  # the unbiased estimator agrees with the exact value
        assert abs(results["digits"]["unbiased_g1"]["z_vs_target"]) < 4


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


def test_common_dense_hessian_matches_torch_func():
    model = C.seeded(0, lambda: C.mlp(5, 4, 3).to(torch.float64))
    x = torch.randn(7, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([0, 1, 2, 0, 1, 2, 0])
    ours = C.dense_hessian(model, nn.CrossEntropyLoss(), x, y, chunk=5)
    reference = dense_hessian(model, nn.CrossEntropyLoss(), x, y)
    torch.testing.assert_close(ours, reference, rtol=1e-12, atol=1e-14)


# --------------------------------------------------------------------------- verdicts


def _lopt_runs(val_errors):
    deltas = (1e-3, 1e-2, 1e-1)
    runs = []
    for d, v in zip(deltas, val_errors):
        for eta, bump in ((1.0, 0.0), (10.0, 0.05)):
            runs.append(
                {
                    "delta": d,
                    "eta": eta,
                    "r_est_curv": 1 + 1 / d,
                    "diverged": False,
                    "val_error": v + bump,
                    "train_error": 0.01 + bump / 2,
                }
            )
    return runs, {"deltas": deltas, "etas": (1.0, 10.0)}


def test_lanczos_damping_verdicts_follow_the_numbers():
    runs, s = _lopt_runs([0.10, 0.08, 0.06])  # worse at small delta (large R)
    checks, _ = lanczos_damping._checks(runs, s)
    assert checks[0].supports is True and checks[2].supports is True
    runs, s = _lopt_runs([0.06, 0.08, 0.10])  # better at small delta
    checks, _ = lanczos_damping._checks(runs, s)
    assert checks[0].supports is False


def test_overall_verdict():
    yes, no, unknown = (C.Check("c", v, "e") for v in (True, False, None))
    assert C.overall([yes, yes]) is True
    assert C.overall([yes, no, unknown]) is False
    assert C.overall([yes, unknown]) is None


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
