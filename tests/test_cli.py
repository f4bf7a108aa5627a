"""The ``curvlab`` command: the tour end to end, usage errors, run-time errors, the --out
checks, progress on stderr, backends."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import curvlab
from curvlab import cli
from curvlab.errors import InvalidInputError
from curvlab.experiments import tour

ENTRY_POINT = Path(sys.executable).parent / "curvlab"


def _run(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """``python -m curvlab.cli ARGS`` in a fresh process with one torch thread."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "curvlab.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


def test_tour_fast_end_to_end(tmp_path):
    out = tmp_path / "tour"
    proc = _run(
        "tour", "--fast", "--out", str(out), "--seed", "0", "--threads", "1", "--no-progress"
    )
    assert proc.returncode == 0, proc.stderr
    assert "report.md" in proc.stdout
    results = json.loads((out / "results.json").read_text())
    assert tuple(results) == tour.FIELDS
    for name in results["files"]:
        assert (out / name).stat().st_size > 0, name
    for png in ("spectrum.png", "backends.png", "autodamping.png", "shrinkage.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = (out / "report.md").read_text()
    for heading in (
        "Hessian spectrum",
        "every installed backend",
        "Noise-variance damping",
        "Shrinkage estimators",
        "Learned damping",
    ):
        assert heading in report

    spec = results["spectrum"]
    top = spec["top_eigenvalues"]
    assert top == sorted(top, reverse=True) and spec["lanczos_converged"]
    assert spec["num_params"] == 64 * 32 + 32 + 32 * 10 + 10
    rows = {r["label"]: r for r in results["backends"]}
    ref = rows["autograd / Hessian / Lanczos"]
    assert ref["values"][0] == pytest.approx(top[0], rel=0.1)  # fewer samples, same model
    for backend in ("backpack", "pyhessian"):  # exact Hessian products: same numbers
        row = rows[f"{backend} / Hessian / Lanczos"]
        if "values" in row:
            assert row["max_rel_diff"] < 1e-6
    power = rows["pyhessian / Hessian / its power iteration"]
    if "values" in power:
        assert power["max_rel_diff"] < 0.1  # PyHessian's defaults: about 1e-3 relative
    kfac = rows["kfac / GGN (KFAC approximation) / Lanczos"]
    assert kfac["approximation"] and kfac["reference"] == "autograd / GGN / Lanczos"

    noise = results["noise"]
    assert noise["damping"] > 0 and 0 < noise["stderr"] < noise["damping"]
    assert {r["estimator"] for r in results["shrinkage"]["table"]} >= {
        "raw",
        "LedoitWolf",
        "OAS",
        "RMTLinear",
    }
    runs = results["autodamping"]["runs"]
    learned = [r for r in runs.values() if r["learned"]]
    assert len(runs) == 3 and len(learned) == 1 and learned[0]["damping_history"]
    assert learned[0]["final_eps"] > 1e-6  # it starts at 1e-8 and learns the noise level
    assert results["wall_time_s"] < 120


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ([], "required"),
        (["experiment", "nope"], "invalid choice"),
        (["experiment"], "required"),
        (["experiment", "theorem1", "--scale", "huge"], "invalid choice"),
        (["experiment", "theorem1", "--fast", "--scale", "paper"], "not allowed"),
        (["tour", "--seed", "-3"], "non-negative"),
        (["tour", "--seed", "abc"], "non-negative"),
        (["tour", "--device", "tpu"], "unknown device"),
        (["tour", "--device", "cuda:x"], "unknown device"),
        (["tour", "--threads", "0"], "positive"),
        (["tour", "--unknown"], "unrecognized"),
        (["backends", "extra"], "unrecognized"),
    ],
)
def test_bad_arguments_are_usage_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: curvlab") and message in err and "Traceback" not in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA present")
def test_cuda_without_cuda_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["experiment", "theorem1", "--device", "cuda"])
    assert info.value.code == 2
    assert "sees no CUDA device" in capsys.readouterr().err


def test_out_must_be_a_directory(tmp_path, capsys):
    afile = tmp_path / "file.txt"
    afile.write_text("x")
    with pytest.raises(SystemExit) as info:
        cli.main(["tour", "--out", str(afile)])
    assert info.value.code == 2
    assert "not a directory" in capsys.readouterr().err


def test_usage_error_in_a_fresh_process_has_no_traceback():
    proc = _run("experiment", "theorem2")
    assert proc.returncode == 2
    assert "invalid choice" in proc.stderr and "Traceback" not in proc.stderr


def test_runtime_curvlab_error_is_one_line_and_exit_1(tmp_path, capsys, monkeypatch):
    def broken(*args, **kwargs):
        raise InvalidInputError("something the user can fix:\n  do this")

    monkeypatch.setattr(tour, "run", broken)
    assert cli.main(["tour", "--out", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err == "curvlab: error: something the user can fix: do this\n"


def test_experiment_command_writes_the_report(tmp_path, capsys):
    before = torch.get_num_threads()
    try:
        assert (
            cli.main(
                [
                    "experiment",
                    "algorithm1",
                    "--scale",
                    "smoke",
                    "--out",
                    str(tmp_path),
                    "--threads",
                    "1",
                    "--no-progress",
                ]
            )
            == 0
        )
    finally:
        torch.set_num_threads(before)
    out = capsys.readouterr().out
    assert out.startswith("algorithm1: ") and "the paper's claim" in out
    assert (tmp_path / "algorithm1.md").exists() and (tmp_path / "algorithm1.json").exists()


def test_force_writes_into_a_non_empty_out_with_progress_on_stderr(tmp_path, capsys):
    (tmp_path / "algorithm1.md").write_text("stale")
    (tmp_path / "notes.txt").write_text("mine")
    before = torch.get_num_threads()
    try:
        argv = ["experiment", "algorithm1", "--scale", "smoke", "--out", str(tmp_path)]
        code = cli.main([*argv, "--threads", "1", "--force", "--progress"])
    finally:
        torch.set_num_threads(before)
    assert code == 0
    captured = capsys.readouterr()
    lines = captured.out.splitlines()
    assert lines[0].startswith("algorithm1: ")
    assert all(line.startswith(("algorithm1: ", "  ")) for line in lines), captured.out
    assert "it/s" not in captured.out and "\r" not in captured.out
    assert "algorithm1: " in captured.err and "it/s" in captured.err  # the tqdm bars
    assert (tmp_path / "algorithm1.md").read_text() != "stale"
    assert (tmp_path / "notes.txt").read_text() == "mine"


def _no_run(monkeypatch) -> list:
    """Replace the tour's computation by a recorder: the --out checks must refuse first."""
    calls = []
    monkeypatch.setattr(tour, "run", lambda *args, **kwargs: calls.append(args))
    return calls


def test_non_empty_out_is_refused_before_any_computation(tmp_path, capsys, monkeypatch):
    calls = _no_run(monkeypatch)
    (tmp_path / "report.md").write_text("the user's report")
    with pytest.raises(SystemExit) as info:
        cli.main(["tour", "--out", str(tmp_path)])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "is not empty (1 entry: report.md)" in err and "--force" in err
    assert "Traceback" not in err
    assert calls == [] and (tmp_path / "report.md").read_text() == "the user's report"


def test_out_that_cannot_be_created_fails_before_any_computation(tmp_path, capsys, monkeypatch):
    calls = _no_run(monkeypatch)
    afile = tmp_path / "file.txt"
    afile.write_text("x")
    out = afile / "results"  # a folder inside a file: mkdir raises NotADirectoryError
    assert cli.main(["tour", "--out", str(out)]) == 1
    assert calls == []
    assert capsys.readouterr().err == (
        f"curvlab: error: cannot write to --out {str(out)!r}: Not a directory: {str(out)!r}\n"
    )


def test_unwritable_out_fails_before_any_computation(tmp_path, capsys, monkeypatch):
    calls = _no_run(monkeypatch)

    def denied(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", str(kwargs["dir"]))

    # root writes through permission bits, so the refusal of the probe file is simulated
    monkeypatch.setattr(cli.tempfile, "TemporaryFile", denied)
    out = tmp_path / "new"
    assert cli.main(["tour", "--out", str(out)]) == 1
    assert calls == []
    assert capsys.readouterr().err == (
        f"curvlab: error: cannot write to --out {str(out)!r}: Permission denied: {str(out)!r}\n"
    )


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores permission bits")
def test_read_only_out_fails_before_any_computation(tmp_path, capsys, monkeypatch):
    calls = _no_run(monkeypatch)
    out = tmp_path / "read-only"
    out.mkdir()
    out.chmod(0o500)
    try:
        assert cli.main(["tour", "--out", str(out)]) == 1
    finally:
        out.chmod(0o700)
    assert calls == [] and "Permission denied" in capsys.readouterr().err


def test_os_error_during_the_run_is_one_line_and_exit_1(tmp_path, capsys, monkeypatch):
    report = tmp_path / "out" / "report.md"

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(report))

    monkeypatch.setattr(tour, "run", disk_full)
    assert cli.main(["tour", "--out", str(tmp_path / "out")]) == 1
    captured = capsys.readouterr()
    assert captured.err == f"curvlab: error: No space left on device: {str(report)!r}\n"
    assert captured.out == ""


def test_help_everywhere(capsys):
    for argv in ([], ["tour"], ["experiment"], ["backends"]):
        with pytest.raises(SystemExit) as info:
            cli.main([*argv, "--help"])
        assert info.value.code == 0
        assert "usage: curvlab" in capsys.readouterr().out


def test_backends_command(capsys):
    assert cli.main(["backends"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:2] == ["backend", "installed"]
    assert any(line.split()[:2] == ["autograd", "yes"] for line in lines)
    assert cli.main(["backends", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["autograd"]["available"] is True
    assert "hessian" in info["autograd"]["curvatures"]


def test_python_dash_m_curvlab():
    proc = subprocess.run(
        [sys.executable, "-m", "curvlab", "backends"], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split()[:2] == ["backend", "installed"]
    proc = subprocess.run(
        [sys.executable, "-m", "curvlab", "--version"], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0 and proc.stdout == f"curvlab {curvlab.__version__}\n"


@pytest.mark.skipif(not ENTRY_POINT.exists(), reason="package not installed with its scripts")
def test_installed_entry_point():
    proc = subprocess.run(
        [str(ENTRY_POINT), "backends"], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert "autograd" in proc.stdout
    proc = subprocess.run(
        [str(ENTRY_POINT), "--version"], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0 and proc.stdout.startswith("curvlab ")
