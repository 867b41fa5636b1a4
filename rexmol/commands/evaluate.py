"""``rexmol evaluate``: ESS, E-W2, T-W2 (proposal and reweighted) against held-out MD, a Table-6 table and plots.

Two forms:

- ``rexmol evaluate DIR --reference data/ala3 [--against DIR2 ...]``: evaluate finished sample folders.
- ``rexmol evaluate --ckpt PATH --solvers dopri5,rex-dopri5 --n N --out OUT --reference data/ala3``: sample
  with each solver from the same prior draws (same ``--seed``) into ``OUT/<solver>/`` (resumable), then
  evaluate them together into ``OUT/report/``.
"""
from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path

from rexmol.commands.sample import add_solver_options, proposal_spec
from rexmol.solvers.grids import GRID_KINDS


def configure(parser: argparse.ArgumentParser) -> None:
    """Options of ``rexmol evaluate``."""
    parser.add_argument("dir", nargs="?", type=Path, default=None, help="a finished sample folder")
    parser.add_argument("--reference", type=Path, default=Path("data/ala3"), help="MD dataset made by `rexmol md`")
    parser.add_argument("--against", type=Path, nargs="+", default=[], metavar="DIR",
                        help="further sample folders in the same table")
    parser.add_argument("--split", default="test", choices=["train", "val", "test"], help="reference split")
    parser.add_argument("--published", type=Path, default=None,
                        help="published results table (TOML/JSON); default for ala3: the shipped Table 6 of "
                             "the Rex paper (Blasingame and Liu, ICML 2026), none otherwise")
    parser.add_argument("--out", type=Path, default=None,
                        help="report folder (DIR/report), or the root of the sample folders with --ckpt")
    parser.add_argument("--ckpt", type=Path, default=None, help="sample this checkpoint with every --solvers entry")
    parser.add_argument("--solvers", default="dopri5,rex-dopri5",
                        help="comma-separated entries SOLVER[@STEPS][/GRID][:LOGQ] for --ckpt, e.g. "
                             "torchdiffeq-dopri5,dopri5,rex-dopri5 or rex-rk4@8:discrete,rex-rk4@8/log-varsigma "
                             "(@STEPS overrides --steps, /GRID --grid, :LOGQ --trace for that entry)")
    parser.add_argument("--n", type=int, default=256, help="samples per solver with --ckpt")
    add_evaluation_options(parser)
    add_solver_options(parser)


def add_evaluation_options(parser: argparse.ArgumentParser) -> None:
    """Options of the evaluation protocol, shared by ``rexmol evaluate`` and ``rexmol demo``."""
    parser.add_argument("--max-reference", type=int, default=10_000,
                        help="at most this many reference frames, evenly spaced (published protocol: 10^4)")
    parser.add_argument("--bootstrap", type=int, default=100, metavar="B",
                        help="bootstrap replicates for the 95%% intervals (seeded by --seed; 0: none); each "
                             "repeats clip, SNIS, resampling and metrics (default: 100)")
    parser.add_argument("--bootstrap-skip", default="", metavar="METRICS",
                        help="comma-separated distances left without a bootstrap interval (of e_w2, t_w2, "
                             "e_w2_proposal, t_w2_proposal; their point estimates stay), e.g. t_w2_proposal: "
                             "one exact 10^4-point transport fewer per replicate (default: none)")
    parser.add_argument("--clip-logw", type=float, default=None, metavar="Q",
                        help="drop the ceil(Q N) largest finite log-weights before SNIS, as the published "
                             "evaluation does (Q = 0.002); default: off (unclipped SNIS, unbiased)")
    parser.add_argument("--floor-split", default="train", choices=["train", "val", "test", "none"],
                        help="MD floor row: N evenly spaced frames of this split against the reference "
                             "(default: train; none: no floor row)")


_ENTRY = re.compile(r"^(?P<solver>[A-Za-z0-9_.-]+)(?:@(?P<steps>[0-9]+))?(?:/(?P<grid>[a-z0-9-]+))?"
                    r"(?::(?P<logq>exact|hutchinson|discrete))?$")


def parse_solver_entry(entry: str, args: argparse.Namespace) -> tuple[str, argparse.Namespace]:
    """``SOLVER[@STEPS][/GRID][:LOGQ]`` -> (solver name, options with ``steps``/``grid``/``trace`` overridden for
    this entry)."""
    m = _ENTRY.match(entry)
    if m is None or (m["grid"] is not None and m["grid"] not in GRID_KINDS):
        raise ValueError(f"--solvers entry {entry!r} is not SOLVER[@STEPS][/GRID][:LOGQ] "
                         f"(GRID: {', '.join(GRID_KINDS)}; LOGQ: exact, hutchinson or discrete), "
                         "e.g. rex-rk4@8/log-varsigma:discrete")
    opts = argparse.Namespace(**vars(args))
    if m["steps"] is not None:
        opts.steps = int(m["steps"])
    if m["grid"] is not None:
        opts.grid = m["grid"]
    if m["logq"] is not None:
        opts.trace = m["logq"]
    return m["solver"], opts


def _folder_name(entry: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", entry)


def sample_solvers(args: argparse.Namespace) -> list[Path]:
    """Sample ``args.ckpt`` with each entry of ``args.solvers`` (``SOLVER[@STEPS][:LOGQ]``) into
    ``args.out/<entry>``, all from the same prior draws (``args.seed``); returns the folders."""
    from rexmol.sampling import sample

    entries = [s.strip() for s in args.solvers.split(",") if s.strip()]
    if not entries:
        raise ValueError("--solvers names no solver")
    if len(set(entries)) != len(entries):
        raise ValueError(f"--solvers repeats an entry: {args.solvers!r}")
    if args.out is None:
        raise ValueError("--out DIR is required with --ckpt (sample folders and the report go there)")
    if args.n < 1 or args.batch_size < 1:
        raise ValueError("--n and --batch-size must be >= 1")
    specs = [proposal_spec(opts, solver) for solver, opts in (parse_solver_entry(e, args) for e in entries)]
    for spec in specs:  # fail fast: bad checkpoint, unknown solver, singular end time
        spec.build()
    dirs = []
    for entry, spec in zip(entries, specs):
        out = args.out / _folder_name(entry)
        sample(spec.build, out, args.n, args.batch_size, args.seed, processes=args.processes, quiet=args.quiet)
        dirs.append(out)
    return dirs


def check_evaluation_options(args: argparse.Namespace) -> None:
    """ValueError naming the option for bad evaluation options (before anything is sampled or written)."""
    from rexmol.evaluation import checked_skip

    if args.max_reference is not None and args.max_reference < 1:
        raise ValueError("--max-reference must be >= 1")
    if args.bootstrap < 0:
        raise ValueError(f"--bootstrap must be >= 0 replicates, got {args.bootstrap}")
    checked_skip(bootstrap_skip(args), "--bootstrap-skip")
    if args.clip_logw is not None:
        if not 0.0 < args.clip_logw < 1.0:
            raise ValueError(f"--clip-logw must be in (0, 1) (e.g. 0.002, the published filter), got {args.clip_logw}")
    if args.floor_split != "none" and args.floor_split == args.split:
        raise ValueError(f"--floor-split {args.floor_split} is the reference split itself; choose another split "
                         "or --floor-split none")


def bootstrap_skip(args: argparse.Namespace) -> tuple[str, ...]:
    """The metric names of ``--bootstrap-skip`` (comma-separated; empty: none)."""
    return tuple(m.strip() for m in args.bootstrap_skip.split(",") if m.strip())


class _Progress:
    """One line per bootstrap replicate of one row, on stderr (moves every ~minute at N = 10^4; silent when quiet)."""

    def __init__(self, label: str, total: int, quiet: bool):
        self.label, self.total, self.quiet, self.start = label, total, quiet, time.perf_counter()

    def __call__(self, k: int) -> None:
        if not self.quiet:
            print(f"evaluate {self.label}: bootstrap replicate {k}/{self.total} "
                  f"({time.perf_counter() - self.start:.0f} s)", file=sys.stderr, flush=True)


def _evaluate_folder(d: Path, config: dict, data: dict, reference, seed: int, clip_logw: float | None,
                     bootstrap: int, skip: tuple[str, ...], quiet: bool):
    """(row, arrays) of one finished sample folder, loaded as ``config`` and ``data`` (a process-pool task)."""
    from rexmol.evaluation import evaluate_run

    row, arr = evaluate_run(config, data, reference, seed=seed, where=str(d), clip_logw=clip_logw,
                            bootstrap=bootstrap, on_replicate=_Progress(d.name, bootstrap, quiet),
                            bootstrap_skip=skip)
    return {**row, "folder": str(d)}, arr


def _evaluate_floor(reference, split: str, n: int, seed: int, clip_logw: float | None, bootstrap: int,
                    skip: tuple[str, ...], quiet: bool):
    """The MD floor row (a process-pool task)."""
    from rexmol.evaluation import evaluate_floor

    return evaluate_floor(reference, split, n, seed=seed, clip_logw=clip_logw, bootstrap=bootstrap,
                          on_replicate=_Progress(f"MD floor ({split})", bootstrap, quiet), bootstrap_skip=skip)


def evaluate_folders(dirs: list[Path], reference_dir: Path, out: Path, *, split: str = "test",
                     max_reference: int | None = 10_000, published: Path | None = None, seed: int = 0,
                     extra: dict | None = None, bootstrap: int = 0, bootstrap_skip: tuple[str, ...] = (),
                     clip_logw: float | None = None, floor_split: str | None = None, processes: int = 1,
                     quiet: bool = True) -> str:
    """Evaluate sample folders against one reference and write the report into ``out``; returns the Markdown.

    ``bootstrap_skip``: distances left without an interval (``rexmol.evaluation.DISTANCES``).
    ``floor_split``: also the MD floor row from that split at the largest run's N (None: no floor row).
    ``processes``: evaluate the folders and the floor row in that many worker processes (each row is seeded by
    ``seed`` alone, so the report does not depend on it). ``quiet=False``: a line per bootstrap replicate.
    """
    from concurrent.futures import ProcessPoolExecutor
    from multiprocessing import get_context

    from rexmol.evaluation import check_system_match, load_reference, write_report
    from rexmol.report import load_published, published_table
    from rexmol.sampling import load_samples
    from rexmol.systems import load_system

    if processes < 1:
        raise ValueError(f"--processes must be >= 1, got {processes}")
    runs = [(d, *load_samples(d)) for d in dirs]  # every folder checked before any work
    system = load_system(runs[0][1]["system"])
    for d, config, _ in runs:
        check_system_match(config, system, str(d))
    reference = load_reference(reference_dir, system, split=split, max_frames=max_reference)
    n_floor = max(int(config["n"]) for _, config, _ in runs)
    with ProcessPoolExecutor(min(processes, len(dirs) + 1), mp_context=get_context("spawn")) if processes > 1 \
            else _Inline() as pool:
        tasks = [pool.submit(_evaluate_folder, d, config, data, reference, seed, clip_logw, bootstrap,
                             bootstrap_skip, quiet) for d, config, data in runs]
        floor = None if floor_split is None else pool.submit(
            _evaluate_floor, reference, floor_split, n_floor, seed, clip_logw, bootstrap, bootstrap_skip, quiet)
        rows, arrays = map(list, zip(*(f.result() for f in tasks)))
        floor = None if floor is None else floor.result()
    if published is None:
        published = published_table(system.name)
    table = load_published(published) if published is not None else None
    return write_report(out, rows, arrays, reference, table, extra, floor=floor)


class _Inline:
    """A stand-in for a process pool that runs each task at once in this process (``processes=1``)."""

    def __enter__(self) -> _Inline:
        return self

    def __exit__(self, *exc) -> None:
        return None

    def submit(self, fn, *args, **kwargs):
        from concurrent.futures import Future

        future: Future = Future()
        future.set_result(fn(*args, **kwargs))
        return future


REPO = Path(__file__).resolve().parents[2]


def shipped(path: Path) -> Path:
    """``path`` as given if it exists, else relative to the repository (running from another directory)."""
    return path if path.exists() or path.is_absolute() else REPO / path


def run(args: argparse.Namespace) -> int:
    args.reference = shipped(args.reference)
    start = time.perf_counter()
    check_evaluation_options(args)
    if args.ckpt is not None:
        if args.dir is not None:
            raise ValueError("give either a sample folder DIR or --ckpt (which samples into --out), not both")
        dirs = sample_solvers(args) + list(args.against)
        out = args.out / "report"
    else:
        if args.dir is None:
            raise ValueError("give a sample folder DIR (made by `rexmol sample`) or --ckpt PATH")
        dirs = [args.dir, *args.against]
        out = args.out if args.out is not None else args.dir / "report"
    text = evaluate_folders(dirs, args.reference, out, split=args.split, max_reference=args.max_reference,
                            published=args.published, seed=args.seed, bootstrap=args.bootstrap,
                            bootstrap_skip=bootstrap_skip(args),
                            clip_logw=args.clip_logw,
                            floor_split=None if args.floor_split == "none" else args.floor_split,
                            processes=args.processes, quiet=args.quiet,
                            extra={"evaluate_wall_seconds": time.perf_counter() - start})
    if not args.quiet:
        print(text)
        print(f"report: {out}/report.md, report.json and plots")
    return 0
