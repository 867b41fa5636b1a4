"""Validation ESS and reweighted E-W2 against training CPU-hours, from the Lightning CSV metrics of `rexmol train`.

Why: the generator is picked by a validation figure that tracks the goal (exact-log-q ESS and reweighted E-W2 of
a fixed prior draw, logged by ``rexmol.training.ValidationESS``), and the question a CPU budget asks is whether
that figure is still improving per CPU-hour. The x axis is ``train_cpu_hours``: the process CPU time of the run
summed across resumes (stored in every checkpoint), without the validation callback's own CPU, so runs whose
validation costs differ (a hollow network and its non-hollow twin) are compared at equal training cost.

A resumed run writes a new ``logs/version_N/metrics.csv``; give all of them (rows are merged by step, later files
win). Several runs can be drawn together with one ``--run LABEL=CSV[,CSV...]`` each:

    python evaluation/training_curve.py --run hollow=runs/ala3_ic_hollow/logs/version_*/metrics.csv \\
        --run token=runs/ala3_ic_token/logs/version_*/metrics.csv --out runs/validation_curve.png
"""
from __future__ import annotations

import argparse
import csv
import glob
import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

X_KEY = "train_cpu_hours"
PANELS = (("val/ess", "validation ESS (Kish, / N)", "log"), ("val/ew2_reweighted_kT", "reweighted E-W2 (kT)", "log"))


def read_curve(csv_paths: list[str | Path]) -> list[dict[str, float]]:
    """Validation rows (those with ``val/ess``) of one run's metrics CSVs, merged by step, sorted by step."""
    rows: dict[int, dict[str, float]] = {}
    for path in csv_paths:
        with open(path) as fh:
            for row in csv.DictReader(fh):
                if not row.get("val/ess") or not row.get(X_KEY):
                    continue
                rows[int(row["step"])] = {k: float(v) for k, v in row.items() if v not in ("", None)}
    if not rows:
        raise ValueError(f"no rows with val/ess and {X_KEY} in {[str(p) for p in csv_paths]}: was the run trained "
                         "with the rexmol.training.ValidationESS callback?")
    return [rows[s] for s in sorted(rows)]


def plot(curves: dict[str, list[dict[str, float]]], out: str | Path) -> None:
    fig, axes = plt.subplots(1, len(PANELS), figsize=(6 * len(PANELS), 4), squeeze=False)
    for ax, (key, label, yscale) in zip(axes[0], PANELS):
        for name, rows in curves.items():
            pts = [(r[X_KEY], r[key]) for r in rows if key in r and r[key] > 0 and r[key] != float("inf")]
            if pts:
                x, y = zip(*pts)
                ax.plot(x, y, "o-", ms=3, label=name)
        ax.set_yscale(yscale)
        ax.set_xlabel("training CPU-hours (validation excluded)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)


def _run(spec: str) -> tuple[str, list[str]]:
    label, sep, paths = spec.partition("=")
    if not sep or not label or not paths:
        raise ValueError(f"--run {spec!r}: expected LABEL=CSV[,CSV...]")
    files = sorted(f for p in paths.split(",") for f in (glob.glob(p) or [p]))
    missing = [f for f in files if not Path(f).is_file()]
    if missing:
        raise ValueError(f"--run {label}: no such metrics file {missing[0]}")
    return label, files


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", action="append", required=True, metavar="LABEL=CSV[,CSV...]",
                        help="one run: a label and its metrics.csv files (globs allowed); repeat for several runs")
    parser.add_argument("--out", required=True, help="output PNG")
    parser.add_argument("--json", help="also write the plotted points to this JSON file")
    args = parser.parse_args(argv)
    try:
        curves = {label: read_curve(files) for label, files in map(_run, args.run)}
    except ValueError as err:
        print(f"training_curve: error: {err}", file=sys.stderr)
        return 2
    plot(curves, args.out)
    if args.json:
        keep = ("step", X_KEY, "cpu_hours", *(k for k, _, _ in PANELS), "val/ew2_proposal_kT")
        Path(args.json).write_text(json.dumps({n: [{k: r[k] for k in keep if k in r} for r in rows]
                                               for n, rows in curves.items()}, indent=1) + "\n")
    for name, rows in curves.items():
        last = rows[-1]
        print(f"{name}: {len(rows)} validations, last at step {int(last['step'])}, {last[X_KEY]:.3f} CPU-h: "
              f"ESS {last['val/ess']:.4f}, reweighted E-W2 {last.get('val/ew2_reweighted_kT', float('nan')):.2f} kT")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
