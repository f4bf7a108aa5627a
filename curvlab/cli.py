"""The ``curvlab`` command: ``tour``, ``experiment NAME`` and ``backends``.

Exit codes: 0 success, 1 a curvlab error or an ``OSError`` (unwritable folder, disk full) at
run time (one line on stderr), 2 a usage error (bad arguments, an ``--out`` that is a file or
is not empty without ``--force``; argparse's message, no traceback), 130 interrupted.

``--out`` is checked before any computation starts: it is created if needed and must accept
a file. Results go to stdout; progress bars and notes go to stderr.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from curvlab._params import resolve_device
from curvlab.errors import CurvlabError
from curvlab.experiments.registry import EXPERIMENTS, SCALES

# --------------------------------------------------------------------------- argument types


def _seed(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"seed must be a non-negative integer, got {text!r}"
        ) from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"seed must be a non-negative integer, got {text!r}")
    return value


def _device(text: str) -> str:
    try:
        resolve_device(text)
    except CurvlabError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def _threads(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"threads must be a positive integer, got {text!r}")
    return value


def _out_dir(text: str) -> Path:
    path = Path(text).expanduser()
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"--out {text!r} exists and is not a directory")
    return path


# --------------------------------------------------------------------------- parser


def _common(parser: argparse.ArgumentParser, default_out: str) -> None:
    parser.add_argument(
        "--out",
        type=_out_dir,
        default=Path(default_out),
        metavar="DIR",
        help=f"output folder, created if needed (default: {default_out})",
    )
    parser.add_argument(
        "--force",
        action="store_true",
        help="write into a non-empty --out, overwriting files of the same names",
    )
    parser.add_argument("--seed", type=_seed, default=0, help="random seed (default: 0)")
    parser.add_argument(
        "--device", type=_device, default="cpu", help="cpu, cuda or cuda:N (default: cpu)"
    )
    parser.add_argument(
        "--threads",
        type=_threads,
        default=1,
        metavar="N",
        help="torch CPU threads (default: 1: the models are small, and extra threads slow "
        "them down badly on a busy machine)",
    )
    parser.add_argument(
        "--progress",
        dest="progress",
        action="store_true",
        default=sys.stderr.isatty(),
        help="progress bars on stderr even when it is not a terminal",
    )
    parser.add_argument(
        "--no-progress",
        dest="progress",
        action="store_false",
        help="no progress bars (default: shown when stderr is a terminal)",
    )


def build_parser() -> argparse.ArgumentParser:
    """The ``curvlab`` argument parser with its ``tour``, ``experiment`` and ``backends``
    subcommands.

    Returns
    -------
    argparse.ArgumentParser
        Each subcommand's parser sets ``func`` (the ``cmd_*`` function to run).

    Examples
    --------
    >>> from curvlab.cli import build_parser
    >>> args = build_parser().parse_args(["experiment", "theorem1", "--scale", "smoke"])
    >>> args.func.__name__, args.name, args.scale
    ('cmd_experiment', 'theorem1', 'smoke')
    """
    from curvlab import __version__

    parser = argparse.ArgumentParser(
        prog="curvlab",
        description="Curvature of neural-network losses through one interface over BackPACK, "
        "PyHessian, KFAC and autograd, with random-matrix damping.",
    )
    parser.add_argument("--version", action="version", version=f"curvlab {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    tour = sub.add_parser(
        "tour",
        help="the guided tour on scikit-learn's digits (report.md, PNGs, results.json)",
        description="Train a small classifier on scikit-learn's digits and write report.md, "
        "PNG figures and results.json: the Hessian spectrum with its bulk and outliers, top "
        "eigenvalues from every installed backend, the noise-variance damping, the shrinkage "
        "comparison and an auto-damped training run. About 5 minutes on 2 CPU cores "
        "(--fast: under a minute).",
    )
    tour.add_argument("--fast", action="store_true", help="reduced sizes (under a minute)")
    _common(tour, "curvlab-tour")
    tour.set_defaults(func=cmd_tour, command_parser=tour)

    exp = sub.add_parser(
        "experiment",
        help="reproduce one of the paper's claims (or 'all')",
        description="Run a paper-claim experiment; writes NAME.json, CSV, PNG and NAME.md (its "
        "report section with a computed verdict). Experiments: "
        + ", ".join(EXPERIMENTS)
        + ". 'all' runs every one and writes report.md.",
    )
    exp.add_argument(
        "name",
        choices=(*EXPERIMENTS, "all"),
        metavar="NAME",
        help="one of: " + ", ".join((*EXPERIMENTS, "all")),
    )
    size = exp.add_mutually_exclusive_group()
    size.add_argument(
        "--scale",
        choices=SCALES,
        default="fast",
        help="smoke (seconds, for tests), fast (CPU, minutes; default) or paper "
        "(the larger setting documented in each experiment, for a GPU)",
    )
    size.add_argument(
        "--fast", dest="scale", action="store_const", const="fast", help="same as --scale fast"
    )
    _common(exp, "curvlab-results")
    exp.set_defaults(func=cmd_experiment, command_parser=exp)

    back = sub.add_parser(
        "backends",
        help="list the backends, whether they are installed, what they compute",
        description="Print every registered backend with its availability, curvatures, "
        "capabilities and the install command of missing ones.",
    )
    back.add_argument("--json", action="store_true", help="print JSON instead of a table")
    back.set_defaults(func=cmd_backends)
    return parser


# --------------------------------------------------------------------------- commands


def _setup(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(args.threads)


def cmd_tour(args: argparse.Namespace) -> int:
    """``curvlab tour``: run the tour into ``args.out`` and print its headline numbers.

    Parameters
    ----------
    args : argparse.Namespace
        The parsed ``tour`` arguments (``out``, ``fast``, ``seed``, ``device``,
        ``threads``, ``progress``).

    Returns
    -------
    int
        0.
    """
    _setup(args)
    from curvlab.experiments import tour

    results = tour.run(
        args.out, fast=args.fast, seed=args.seed, device=args.device, progress=args.progress
    )
    spec, noise = results["spectrum"], results["noise"]
    n_out = spec.get("n_outliers")
    if n_out is None:
        outliers = "the bulk fit failed (see the report)"
    else:
        bound = "at least " if n_out == len(spec["top_eigenvalues"]) else ""
        outliers = f"{bound}{n_out} outliers beyond the fitted bulk edge"
    print(f"curvlab tour: {results['wall_time_s']:.0f} s; report in {args.out / 'report.md'}")
    print(f"  Hessian: lambda_1 = {spec['top_eigenvalues'][0]:.4g}, {outliers}")
    print(
        f"  damping for batch {noise['batch_size']}: {noise['damping']:.4g} "
        f"+- {noise['stderr']:.2g}"
    )
    return 0


def cmd_experiment(args: argparse.Namespace) -> int:
    """``curvlab experiment NAME``: run one experiment (or all) and print each verdict.

    Parameters
    ----------
    args : argparse.Namespace
        The parsed ``experiment`` arguments (``name``, ``scale``, ``out``, ``seed``,
        ``device``, ``threads``, ``progress``).

    Returns
    -------
    int
        0 (a verdict against the paper is a result, not an error).
    """
    _setup(args)
    from curvlab.experiments._common import claim_tally, verdict_word
    from curvlab.experiments.stats import RULE

    if args.scale == "paper" and not args.device.startswith("cuda"):
        print(
            "curvlab: note: --scale paper is sized for a GPU; on the CPU it takes long",
            file=sys.stderr,
        )
    names = EXPERIMENTS if args.name == "all" else (args.name,)
    summary, tallies = {}, {}
    for name in names:
        module = importlib.import_module(f"curvlab.experiments.{name}")
        results = module.run(
            args.out, scale=args.scale, seed=args.seed, device=args.device, progress=args.progress
        )
        summary[name] = results["verdict"]
        tallies[name] = claim_tally(results["checks"])
        print(
            f"{name}: {verdict_word(results['verdict'])} the paper's claim ({tallies[name]}) "
            f"over seeds "
            f"{results['seeds']} ({results['wall_time_s']:.0f} s) -> {args.out / (name + '.md')}"
        )
        for check in results["checks"]:
            print(f"  {verdict_word(check['verdict'])}: {check['claim']}")
    if args.name == "all":
        sections = [(args.out / f"{n}.md").read_text() for n in names]
        head = (
            f"# curvlab: the paper's claims, reproduced (scale {args.scale}, seed "
            f"{args.seed})\n\n{RULE}\n\n"
            + "\n".join(f"- {n}: {verdict_word(summary[n])} ({tallies[n]})" for n in names)
            + "\n\n"
        )
        (args.out / "report.md").write_text(head + "\n".join(sections))
        with open(args.out / "results.json", "w") as fh:
            json.dump({"scale": args.scale, "seed": args.seed, "verdicts": summary}, fh, indent=1)
    return 0


def cmd_backends(args: argparse.Namespace) -> int:
    """``curvlab backends``: print every backend's availability and capabilities.

    Parameters
    ----------
    args : argparse.Namespace
        The parsed ``backends`` arguments (``json``).

    Returns
    -------
    int
        0.
    """
    from curvlab.registry import backends

    infos = backends()
    if args.json:
        print(
            json.dumps(
                {
                    name: {
                        "available": i.available,
                        "curvatures": sorted(i.curvatures),
                        "capabilities": sorted(i.capabilities),
                        "install": i.install_hint,
                        "description": i.description,
                    }
                    for name, i in infos.items()
                },
                indent=1,
            )
        )
        return 0
    rows = [("backend", "installed", "curvatures", "capabilities")]
    for name, info in infos.items():
        rows.append(
            (
                name,
                "yes" if info.available else "no",
                ",".join(sorted(info.curvatures)) or "-",
                ",".join(sorted(info.capabilities)),
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row[:3], widths)) + "  " + row[3])
    missing = [(n, i.install_hint) for n, i in infos.items() if not i.available]
    for name, hint in missing:
        print(f"\n{name}: {hint}")
    return 0


# --------------------------------------------------------------------------- entry point


def _check_out(args: argparse.Namespace) -> None:
    """Make sure ``--out`` can take the results before anything is computed.

    A non-empty folder without ``--force`` is a usage error (exit 2). The folder is then
    created and a temporary file is written in it, so an unwritable or full folder raises an
    ``OSError`` now rather than after the whole run.
    """
    out: Path = args.out
    if out.is_dir() and not args.force:
        entries = sorted(path.name for path in out.iterdir())
        if entries:
            shown = ", ".join(entries[:3]) + (", ..." if len(entries) > 3 else "")
            count = f"{len(entries)} {'entry' if len(entries) == 1 else 'entries'}"
            args.command_parser.error(
                f"--out {str(out)!r} is not empty ({count}: {shown}); pass "
                "--force to write into it (files of the same names are overwritten), or "
                "choose another folder"
            )
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryFile(dir=out):
        pass


def _describe(exc: OSError) -> str:
    """An OSError as "reason: 'file'" (its errno is noise to a user)."""
    if exc.strerror and exc.filename is not None:
        return f"{exc.strerror}: {str(exc.filename)!r}"
    return exc.strerror or str(exc)


def _fail(message: str) -> int:
    """Print ``message`` as one line on stderr; the exit code of a run-time error."""
    print(f"curvlab: error: {' '.join(message.split())}", file=sys.stderr)
    return 1


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``curvlab`` command with ``argv`` (default: ``sys.argv[1:]``).

    Parameters
    ----------
    argv : sequence of str, optional
        The arguments after the program name.

    Returns
    -------
    int
        The exit code: 0 success, 1 a run-time error (a one-line message on stderr),
        130 interrupted. Usage errors exit through ``SystemExit(2)`` with argparse's message.

    Examples
    --------
    >>> import contextlib, io, json
    >>> from curvlab.cli import main
    >>> out = io.StringIO()
    >>> with contextlib.redirect_stdout(out):
    ...     code = main(["backends", "--json"])
    >>> code, json.loads(out.getvalue())["autograd"]["available"]
    (0, True)
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if hasattr(args, "out"):
            try:
                _check_out(args)
            except OSError as exc:
                return _fail(f"cannot write to --out {str(args.out)!r}: {_describe(exc)}")
        return args.func(args)
    except CurvlabError as exc:
        return _fail(str(exc))
    except OSError as exc:
        return _fail(_describe(exc))
    except KeyboardInterrupt:
        print("curvlab: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
