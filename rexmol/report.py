"""Evaluation report: JSON, a Markdown table shaped like the paper's Table 6, and PNG plots (matplotlib Agg).

A *run row* is a dict with at least ``model``, ``solver``, ``n``, ``ess``, ``e_w2`` (reweighted),
``t_w2`` (reweighted); optional ``e_w2_proposal``, ``t_w2_proposal``, ``nfe``, ``s_per_sample``,
``n_nonfinite``, ``n_mirrored``. Published rows (``load_published``) have ``model``, ``solver``, ``e_w2``,
``t_w2`` and optionally ``ess``; they are shown beside ours and labelled as published.
"""
from __future__ import annotations

import json
import math
import os
import sys
import textwrap
from pathlib import Path

import numpy as np

from rexmol.atomic import write_atomic

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

__all__ = [
    "DEFAULT_PUBLISHED",
    "jsonable",
    "load_published",
    "write_json",
    "markdown_table",
    "plot_ramachandran",
    "plot_energy_histograms",
    "plot_log_weights",
    "plot_roundtrip",
]

DEFAULT_PUBLISHED = Path(__file__).resolve().parent.parent / "evaluation" / "published_ala3.toml"


def load_published(path: str | os.PathLike = DEFAULT_PUBLISHED) -> dict:
    """Read a published-results table (TOML or JSON): ``{"source": str, "n_samples": int, "rows": [...]}``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"published results table not found: {path}")
    with open(path, "rb") as fh:
        table = tomllib.load(fh) if path.suffix == ".toml" else json.load(fh)
    rows = table.get("rows")
    if not isinstance(rows, list) or not rows:
        raise ValueError(f"{path}: expected a non-empty list 'rows'")
    for row in rows:
        missing = {"model", "e_w2", "t_w2"} - set(row)
        if missing:
            raise ValueError(f"{path}: a row lacks {sorted(missing)}: {row}")
    return table


def jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return jsonable(obj.tolist())
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None if math.isnan(obj) else ("inf" if obj > 0 else "-inf")
    if isinstance(obj, Path):
        return str(obj)
    return obj


def write_json(path: str | os.PathLike, obj) -> None:
    """Write ``obj`` as indented JSON atomically (numpy values converted; NaN -> null, +-inf -> "inf"/"-inf")."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, json.dumps(jsonable(obj), indent=2, allow_nan=False) + "\n")


def _fmt(value, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, float) and math.isinf(value):
        return "inf"
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    return f"{value:.{digits}f}" if abs(value) < 1e4 else f"{value:.2e}"


def markdown_table(runs: list[dict], published: dict | None = None) -> str:
    """Table 6 layout: Model | Solver | E-W2 | T-W2 | ESS, plus our proposal metrics, NFE, s/sample, N.

    E-W2/T-W2 are the reweighted (resampled) values as published; proposal columns are the raw model.
    """
    head = ["Model", "Solver", "E-W2 ↓", "T-W2 ↓", "ESS ↑", "E-W2 prop.", "T-W2 prop.", "NFE", "s/sample",
            "N", "non-finite", "mirrored", "source"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in runs:
        cells = [r.get("model", ""), r.get("solver", ""), _fmt(r.get("e_w2")), _fmt(r.get("t_w2")),
                 _fmt(r.get("ess"), 4), _fmt(r.get("e_w2_proposal")), _fmt(r.get("t_w2_proposal")),
                 _fmt(r.get("nfe"), 1), _fmt(r.get("s_per_sample"), 3), _fmt(r.get("n")),
                 _fmt(r.get("n_nonfinite")), _fmt(r.get("n_mirrored")), "this run"]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    if published is not None:
        n_pub = published.get("n_samples")
        for r in published["rows"]:
            cells = [r["model"], r.get("solver", "") or "–", _fmt(r["e_w2"]), _fmt(r["t_w2"]),
                     _fmt(r.get("ess"), 3), "–", "–", "–", "–", _fmt(n_pub), "–", "–", "**published**"]
            lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    note = ("E-W2 in kT, T-W2 in radians on the backbone dihedrals, ESS = Kish ESS / N. E-W2/T-W2 are on the "
            "reweighted (resampled) set; 'prop.' columns are the raw proposal.")
    if published is not None:
        note += (f" Published rows: {published.get('source', 'published results')} — different data and force "
                 "field, comparable in kind, not in value.")
    return "\n".join(lines) + "\n\n" + note + "\n"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _wrap(a: np.ndarray) -> np.ndarray:
    return np.mod(np.asarray(a, dtype=np.float64) + np.pi, 2 * np.pi) - np.pi


def _wrap_label(label: str, width: int) -> str:
    """``label`` with each of its lines wrapped at ``width`` characters (for panel titles)."""
    return "\n".join(textwrap.fill(line, width) for line in label.split("\n"))


def plot_ramachandran(path, panels: list[tuple[str, np.ndarray, np.ndarray, np.ndarray | None]],
                      title: str = "", max_columns: int = 5) -> None:
    """One 2-D histogram per panel: ``(label, phi [N], psi [N], weights [N] or None)``, radians; at most
    ``max_columns`` panels a row.

    Colour is the log density on one scale shared by all panels (8 nats below the highest bin).
    """
    plt = _pyplot()
    if not panels:
        raise ValueError("no Ramachandran panels to plot")
    edges = np.linspace(-np.pi, np.pi, 61)
    logh = []
    for _, phi, psi, w in panels:
        phi, psi = np.asarray(phi, dtype=np.float64), np.asarray(psi, dtype=np.float64)
        ok = np.isfinite(phi) & np.isfinite(psi) & (np.ones_like(phi, bool) if w is None else np.asarray(w) > 0)
        h, _, _ = np.histogram2d(_wrap(phi[ok]), _wrap(psi[ok]), bins=[edges, edges],
                                 weights=None if w is None else np.asarray(w, dtype=np.float64)[ok], density=True)
        logh.append(np.log(np.where(h > 0, h, np.nan)).T)
    vmax = max((float(np.nanmax(h)) for h in logh if np.isfinite(h).any()), default=0.0)
    ncols = min(len(panels), max_columns)
    nrows = -(-len(panels) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.4 * ncols, 3.9 * nrows), squeeze=False)
    for ax, (label, *_), h in zip(axes.flat, panels, logh):
        mesh = ax.pcolormesh(edges, edges, h, cmap="viridis", shading="flat", vmin=vmax - 8.0, vmax=vmax)
        ax.set_title(_wrap_label(label, 34), fontsize=8)
        ax.set_xlabel("phi (rad)")
        ax.set_xlim(-np.pi, np.pi)
        ax.set_ylim(-np.pi, np.pi)
        ax.set_aspect("equal")
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    fig.colorbar(mesh, ax=axes.ravel().tolist(), label="log density", shrink=0.85)
    for row in axes:
        row[0].set_ylabel("psi (rad)")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def plot_energy_histograms(path, e_md: np.ndarray, runs: list[tuple[str, np.ndarray, np.ndarray | None]]) -> None:
    """Energy histograms (kT): MD against each ``(label, energies [N], weights [N] or None)``.

    The range is the MD range widened by its spread; samples outside it (and non-finite ones) are counted
    in the legend.
    """
    plt = _pyplot()
    e_md = np.asarray(e_md, dtype=np.float64)
    e_md = e_md[np.isfinite(e_md)]
    lo, hi = float(e_md.min()), float(e_md.max())
    span = max(hi - lo, 1.0)
    lo, hi = lo - 0.5 * span, hi + 1.5 * span
    bins = np.linspace(lo, hi, 80)
    fig, ax = plt.subplots(figsize=(6.0, 3.6))
    ax.hist(e_md, bins=bins, density=True, histtype="stepfilled", alpha=0.35, color="k", label="MD")
    for label, e, w in runs:
        e = np.asarray(e, dtype=np.float64)
        keep = np.isfinite(e) if w is None else np.isfinite(e) & (np.asarray(w) > 0)
        inside = keep & (e >= lo) & (e <= hi)
        n_out = int(keep.sum() - inside.sum())
        n_bad = int((~np.isfinite(e)).sum())
        weights = None if w is None else np.asarray(w, dtype=np.float64)[inside]
        text = f"{label} ({n_out} outside, {n_bad} non-finite)"
        if inside.any() and (weights is None or weights.sum() > 0):
            ax.hist(e[inside], bins=bins, weights=weights, density=True, histtype="step", lw=1.4, label=text)
        else:
            ax.plot([], [], label=text)
    ax.set_xlabel("energy (kT)")
    ax.set_ylabel("density")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_log_weights(path, runs: list[tuple[str, np.ndarray]]) -> None:
    """Histograms of log w - max(log w) per ``(label, log_w [N])``; non-finite entries counted in the legend."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.0, 3.6))
    for label, lw in runs:
        lw = np.asarray(lw, dtype=np.float64)
        ok = np.isfinite(lw)
        if ok.any():
            ax.hist(lw[ok] - lw[ok].max(), bins=60, histtype="step", lw=1.4,
                    label=f"{label} ({int((~ok).sum())} non-finite)")
    ax.set_xlabel("log w - max log w")
    ax.set_ylabel("count")
    ax.set_yscale("log")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_roundtrip(path, runs: list[tuple[str, np.ndarray]]) -> None:
    """Histogram of log10 round-trip certificates (e.g. max |x0 - x0_reconstructed|) per ``(label, values [N])``.

    Exact zeros are placed at 1e-17; runs without certificates (all NaN) are listed as such.
    """
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.0, 3.6))
    for label, c in runs:
        c = np.asarray(c, dtype=np.float64)
        ok = np.isfinite(c)
        if ok.any():
            ax.hist(np.log10(np.maximum(c[ok], 1e-17)), bins=50, histtype="step", lw=1.4,
                    label=f"{label} (median {np.median(c[ok]):.1e})")
        else:
            ax.plot([], [], label=f"{label} (no certificate)")
    ax.set_xlabel("log10 round-trip error")
    ax.set_ylabel("count")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
