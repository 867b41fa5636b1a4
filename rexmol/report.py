"""Evaluation report: JSON, a Markdown table shaped like the paper's Table 6, and PNG plots (matplotlib Agg).

A *run row* is a dict with at least ``model``, ``solver``, ``n``, ``ess``, ``e_w2`` (reweighted),
``t_w2`` (reweighted); optional ``protocol``, ``ci95`` ({metric: [lo, hi]}), ``e_w2_proposal``,
``t_w2_proposal``, ``n_distinct_resampled``, ``nfe``, ``s_per_sample``, ``n_nonfinite``, ``n_mirrored``,
``few_samples``, ``label`` (short, for plots), ``basins``. Published rows (``load_published``) have ``model``,
``solver``, ``e_w2``, ``t_w2`` and optionally ``ess``; they are shown beside ours and labelled as published,
with the paper cited. The published table ships inside the package (``rexmol/published/<system>.toml``).

Why the plots look as they do: at N = 24 or N = 10^4 alike, legends sit outside the data, titles carry N and
the ESS, counts are linear, and anything not drawn (out of range, non-finite) is said in words.
"""
from __future__ import annotations

import json
import math
import os
import sys
import textwrap
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from rexmol.atomic import write_atomic

if TYPE_CHECKING:
    from importlib.resources.abc import Traversable
if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

__all__ = [
    "published_table",
    "jsonable",
    "load_published",
    "write_json",
    "markdown_table",
    "basin_table",
    "plot_ramachandran",
    "plot_energy_histograms",
    "plot_log_weights",
    "plot_roundtrip",
    "plot_cost",
]


def published_table(system: str) -> Traversable | None:
    """The published results shipped for ``system`` (package data ``rexmol/published/<system>.toml``), or None."""
    table = resources.files("rexmol").joinpath("published", f"{system}.toml")
    return table if table.is_file() else None


def load_published(source: str | os.PathLike | Traversable | None = None) -> dict:
    """Read a published-results table (TOML or JSON): ``{"source": str, "n_samples": int, "rows": [...]}``.

    ``source`` None: the shipped ala3 table (Table 6 of the Rex paper).
    """
    if source is None:
        source = published_table("ala3")
    elif isinstance(source, (str, os.PathLike)):
        source = Path(source)
    if source is None or not source.is_file():
        raise FileNotFoundError(f"published results table not found: {source}")
    data = source.read_bytes()
    table = tomllib.loads(data.decode()) if source.name.endswith(".toml") else json.loads(data)
    rows = table.get("rows")
    if not isinstance(rows, list) or not rows:
        raise ValueError(f"{source}: expected a non-empty list 'rows'")
    for row in rows:
        missing = {"model", "e_w2", "t_w2"} - set(row)
        if missing:
            raise ValueError(f"{source}: a row lacks {sorted(missing)}: {row}")
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


def _fmt_ci(row: dict, key: str, digits: int = 3) -> str:
    """``value [lo, hi]`` with the row's 95 % interval for ``key`` when it has one."""
    ci = (row.get("ci95") or {}).get(key)
    text = _fmt(row.get(key), digits)
    return text if ci is None else f"{text} [{_fmt(ci[0], digits)}, {_fmt(ci[1], digits)}]"


def _line(cells: list) -> str:
    """One Markdown table line; a '|' inside a cell would split it, so none survives."""
    return "| " + " | ".join(str(c).replace("|", "/") for c in cells) + " |"


HEAD = ["Model", "Solver", "Protocol", "E-W2 ↓", "T-W2 ↓", "ESS ↑", "E-W2 prop.", "T-W2 prop.", "distinct",
        "NFE", "s/sample", "N", "non-finite", "mirrored", "source"]


def _our_cells(r: dict, source: str) -> list:
    return [r.get("model", ""), r.get("solver", ""), r.get("protocol", "unclipped SNIS"), _fmt_ci(r, "e_w2"),
            _fmt_ci(r, "t_w2"), _fmt_ci(r, "ess", 4), _fmt_ci(r, "e_w2_proposal"), _fmt_ci(r, "t_w2_proposal"),
            _fmt(r.get("n_distinct_resampled")), _fmt(r.get("nfe"), 1), _fmt(r.get("s_per_sample"), 3),
            _fmt(r.get("n")), _fmt(r.get("n_nonfinite")), _fmt(r.get("n_mirrored")), source]


def markdown_table(runs: list[dict], published: dict | None = None, floor: dict | None = None) -> str:
    """Table 6 layout: Model | Solver | Protocol | E-W2 | T-W2 | ESS, our proposal metrics, distinct resampled
    samples, NFE, s/sample, N; then the MD floor row, the published rows, a caption and few-sample warnings.

    E-W2/T-W2 are the reweighted (resampled) values as published; proposal columns are the raw model.
    """
    lines = [_line(HEAD), "|" + "---|" * len(HEAD)]
    for r in runs:
        lines.append(_line(_our_cells(r, "this run ⚠" if r.get("few_samples") else "this run")))
    if floor is not None:
        lines.append(_line(_our_cells(floor, "MD floor")))
    if published is not None:
        for r in published["rows"]:
            cells = [r["model"], r.get("solver", "") or "–", published.get("protocol", "–"), _fmt(r["e_w2"]),
                     _fmt(r["t_w2"]), _fmt(r.get("ess"), 3), "–", "–", "–", "–", "–",
                     _fmt(published.get("n_samples")), "–", "–", "**published**"]
            lines.append(_line(cells))
    boot = next((r["bootstrap"] for r in runs if (r.get("bootstrap") or {}).get("replicates")), None)
    note = ("E-W2 in kT, T-W2 in radians on the backbone dihedrals, ESS = Kish ESS / N. E-W2/T-W2 are on the "
            "reweighted (resampled) set; 'prop.' columns are the raw proposal; 'distinct' counts the distinct "
            "samples in the resampled set. Protocol: 'unclipped SNIS' uses every finite log-weight (unbiased as "
            "N grows); 'top Q % of log w dropped' removes the ceil(Q N) largest finite log-weights first, as the "
            "published evaluation code does (biased, lower variance); non-finite log-weights are never dropped, "
            "they count as non-finite with weight 0.")
    if boot is not None:
        note += (f" Brackets: 95 % percentile-bootstrap intervals over the samples ({boot['replicates']} "
                 "replicates; each redraws the N samples with replacement and repeats clip, SNIS, resampling and "
                 "metrics; the MD reference is held fixed). E-W2 and T-W2 are distances to a fixed reference: a "
                 "replicate holds about 63 % distinct samples, which raises them, so their intervals can sit above "
                 "the point estimate (the MD floor row shows by how much at this N): read them as the spread, not as "
                 "centred error bars.")
        if boot.get("skipped"):
            note += f" No interval for {', '.join(boot['skipped'])} (left out of the bootstrap: --bootstrap-skip)."
    quantum = next((r["energy_quantum_nm"] for r in runs if r.get("energy_quantum_nm")), None)
    if quantum is not None:
        note += (f" Energies compared (E-W2 columns) are the samples' after rounding to {quantum:g} nm as the MD "
                 "frames were in storage (XTC), which raises energies by ~0.5 kT on tri-alanine; the weights use the "
                 "exact energies (report.json: e_w2_weighted_exact, energy_mean_reweighted_exact).")
    if floor is not None:
        note += (f" MD floor: {floor['solver']} against the reference, through the same protocol: the value a "
                 "perfect sampler of this N would get.")
    if published is not None:
        note += (f" Published rows: {published.get('source', 'published results')}, "
                 f"{published.get('n_samples', '?')} samples each — different data and force field, comparable "
                 "in kind, not in value.")
    text = "\n".join(lines) + "\n\n" + note + "\n"
    for r in runs:
        if r.get("few_samples"):
            text += (f"\n> **Warning: few samples.** {r.get('model', '')} {r.get('solver', '')}: N = {r.get('n')}, "
                     f"ESS·N = {r.get('ess_abs', r['ess'] * r['n']):.1f}, {_fmt(r.get('n_distinct_resampled'))} "
                     "distinct resampled sample(s): the reweighted columns (E-W2, T-W2, ESS, reweighted basins) "
                     "rest on that few samples; read the proposal columns and the intervals.\n")
    return text


def basin_table(runs: list[dict], floor: dict | None = None) -> str:
    """Ramachandran-basin populations per run and residue: MD, proposal and reweighted, with 95 % intervals."""
    head = ["Run", "residue", "basin", "MD", "proposal", "reweighted"]
    lines = [_line(head), "|" + "---|" * len(head)]

    def cell(pop: dict) -> str:
        ci = pop.get("ci95")
        return _fmt(pop["mean"]) + ("" if ci is None else f" [{_fmt(ci[0])}, {_fmt(ci[1])}]")

    for r in runs + ([floor] if floor is not None else []):
        for key, entry in (r.get("basins") or {}).items():
            for name, md in entry["md"].items():
                lines.append(_line([r.get("label", r.get("model", "")), key, name, _fmt(md["mean"]),
                                    cell(entry["proposal"][name]), cell(entry["reweighted"][name])]))
    if len(lines) == 2:
        return ""
    return ("Basin populations (alpha_R: phi < 0, -120° <= psi < 50°; alpha_L: phi >= 0; beta/PII: the rest); "
            "brackets: 95 % bootstrap intervals.\n\n" + "\n".join(lines) + "\n")


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


SCATTER_MAX = 300


def plot_ramachandran(path, panels: list[tuple[str, np.ndarray, np.ndarray, np.ndarray | None]],
                      title: str = "", max_columns: int = 5) -> None:
    """One 2-D histogram per panel: ``(label, phi [N], psi [N], weights [N] or None)``, radians; at most
    ``max_columns`` panels a row.

    Colour is the log density on one scale shared by all panels (8 nats below the highest bin). A panel with at
    most ``SCATTER_MAX`` samples also marks each sample by a circle (area growing with its weight), so a
    handful of samples stays visible.
    """
    plt = _pyplot()
    if not panels:
        raise ValueError("no Ramachandran panels to plot")
    edges = np.linspace(-np.pi, np.pi, 61)
    logh, points = [], []
    for _, phi, psi, w in panels:
        phi, psi = np.asarray(phi, dtype=np.float64), np.asarray(psi, dtype=np.float64)
        ok = np.isfinite(phi) & np.isfinite(psi) & (np.ones_like(phi, bool) if w is None else np.asarray(w) > 0)
        h, _, _ = np.histogram2d(_wrap(phi[ok]), _wrap(psi[ok]), bins=[edges, edges],
                                 weights=None if w is None else np.asarray(w, dtype=np.float64)[ok], density=True)
        logh.append(np.log(np.where(h > 0, h, np.nan)).T)
        size = None if w is None else np.asarray(w, dtype=np.float64)[ok]
        size = 14.0 if size is None else 14.0 + 120.0 * size / size.max()
        points.append((_wrap(phi[ok]), _wrap(psi[ok]), size) if 0 < ok.sum() <= SCATTER_MAX else None)
    vmax = max((float(np.nanmax(h)) for h in logh if np.isfinite(h).any()), default=0.0)
    ncols = min(len(panels), max_columns)
    nrows = -(-len(panels) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.4 * ncols, 3.9 * nrows), squeeze=False)
    for ax, (label, *_), h, pts in zip(axes.flat, panels, logh, points):
        mesh = ax.pcolormesh(edges, edges, h, cmap="viridis", shading="flat", vmin=vmax - 8.0, vmax=vmax)
        if pts is not None:
            ax.scatter(*pts[:2], s=pts[2], facecolors="none", edgecolors="C3", linewidths=0.8)
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


def _legend_outside(ax) -> None:
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0, frameon=False)


def _annotate_panel(ax, title: str, ylabel: str, words: str) -> None:
    """Title, y label, a note in words under the axis and the legend outside the data."""
    ax.set_title(_wrap_label(title, 90), fontsize=8)
    ax.set_ylabel(ylabel)
    ax.text(0.0, -0.32, _wrap_label(words, 100), transform=ax.transAxes, fontsize=7, va="top")
    _legend_outside(ax)


def _save_panels(plt, fig, axes, xlabel: str, path) -> None:
    """x label on the bottom panel, then write ``path`` and close the figure."""
    axes[-1].set_xlabel(xlabel)
    fig.tight_layout(h_pad=2.5)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def _panels(plt, n: int, width: float = 6.0, height: float = 2.6):
    fig, axes = plt.subplots(n, 1, figsize=(width, height * n + 0.4), squeeze=False)
    return fig, list(axes[:, 0])


def plot_energy_histograms(path, e_md: np.ndarray, runs: list[tuple[str, np.ndarray, np.ndarray]]) -> None:
    """One panel per ``(title, energies [N] kT, normalised SNIS weights [N])``: MD, proposal and reweighted
    energy densities as steps on one axis.

    The range spans MD and the central 98 % of the proposal, but at most one MD span below and four above the
    MD range (so MD stays readable beside a poor proposal); what falls outside it (and non-finite energies) is
    written under the panel in words, never drawn.
    """
    plt = _pyplot()
    e_md = np.asarray(e_md, dtype=np.float64)
    e_md = e_md[np.isfinite(e_md)]
    finite_all = [np.asarray(e, dtype=np.float64)[np.isfinite(e)] for _, e, _ in runs]
    md_lo, md_hi = float(e_md.min()), float(e_md.max())
    span = max(md_hi - md_lo, 10.0)
    lo = min([md_lo] + [float(np.quantile(e, 0.01)) for e in finite_all if e.size])
    hi = max([md_hi] + [float(np.quantile(e, 0.99)) for e in finite_all if e.size])
    lo, hi = max(lo, md_lo - span) - 0.05 * span, min(hi, md_hi + 4.0 * span) + 0.05 * span
    bins = np.linspace(lo, hi, 70)
    fig, axes = _panels(plt, max(len(runs), 1))
    for ax, (title, e, w) in zip(axes, runs):
        e, w = np.asarray(e, dtype=np.float64), np.asarray(w, dtype=np.float64)
        finite = np.isfinite(e)
        inside = finite & (e >= lo) & (e <= hi)
        ax.hist(e_md, bins=bins, density=True, histtype="stepfilled", alpha=0.3, color="k",
                label=f"MD ({e_md.size} frames)")
        if inside.any():
            ax.hist(e[inside], bins=bins, density=True, histtype="step", lw=1.4, color="C0", label="proposal")
        if (w[inside] > 0).any():
            ax.hist(e[inside], bins=bins, weights=w[inside], density=True, histtype="step", lw=1.4, color="C3",
                    label="reweighted (SNIS weights)")
        above, below = int((finite & (e > hi)).sum()), int((finite & (e < lo)).sum())
        mass_out = float(w[finite & ~inside].sum())
        words = (f"Not drawn: {above} proposal sample(s) above {hi:.0f} kT and {below} below {lo:.0f} kT "
                 f"(reweighted weight {mass_out:.2g} there); {int((~finite).sum())} non-finite (weight 0).")
        _annotate_panel(ax, title, "density", words)
    _save_panels(plt, fig, axes, "energy (kT)", path)


def plot_log_weights(path, runs: list[tuple[str, np.ndarray, np.ndarray | None]]) -> None:
    """One panel per ``(title, log_w [N], clipped [N] bool or None)``: histogram of log w - max(log w) on a
    linear count axis, the samples dropped by ``--clip-logw`` stacked in another colour; non-finite log-weights
    are counted in the panel's text (weight 0, not drawn)."""
    plt = _pyplot()
    fig, axes = _panels(plt, max(len(runs), 1))
    for ax, (title, lw, clipped) in zip(axes, runs):
        lw = np.asarray(lw, dtype=np.float64)
        clipped = np.zeros(lw.size, bool) if clipped is None else np.asarray(clipped, bool)
        ok = np.isfinite(lw)
        words = f"{int((~ok).sum())} non-finite log-weight(s): weight 0, not drawn."
        if ok.any():
            rel = lw - lw[ok].max()
            lo = float(np.quantile(rel[ok], 0.01)) if ok.sum() >= 100 else float(rel[ok].min())
            shown = ok & (rel >= lo)
            bins = np.histogram_bin_edges(rel[shown], bins=min(60, max(10, int(shown.sum() // 4))))
            ax.hist([rel[shown & ~clipped], rel[shown & clipped]], bins=bins, stacked=True, color=["C0", "C3"],
                    label=[f"used ({int((ok & ~clipped).sum())})", f"dropped by --clip-logw ({int(clipped.sum())})"])
            if (ok & ~shown).any():
                words += f" {int((ok & ~shown).sum())} more than {-lo:.3g} below the max (the lowest 1 %): not drawn."
        _annotate_panel(ax, title, "count", words)
    _save_panels(plt, fig, axes, "log w - max log w", path)


def plot_roundtrip(path, runs: list[tuple[str, np.ndarray]]) -> None:
    """Histogram of log10 round-trip certificates (e.g. max |x0 - x0_reconstructed|) per ``(label, values [N])``.

    Exact zeros are placed at 1e-17; runs without certificates (all NaN) are listed as such.
    """
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.0, 3.2))
    for label, c in runs:
        c = np.asarray(c, dtype=np.float64)
        ok = np.isfinite(c)
        if ok.any():
            ax.hist(np.log10(np.maximum(c[ok], 1e-17)), bins=50, histtype="step", lw=1.4,
                    label=f"{label} (N = {int(ok.sum())}, median {np.median(c[ok]):.1e}, max {c[ok].max():.1e})")
        else:
            ax.plot([], [], label=f"{label} (no certificate)")
    ax.set_xlabel("log10 round-trip error max |x0' - x0|")
    ax.set_ylabel("count")
    _legend_outside(ax)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def plot_cost(path, rows: list[dict]) -> None:
    """Cost per solver: seconds per sample (wall and CPU) and NFE per sample, as horizontal bars."""
    plt = _pyplot()
    labels = [_wrap_label(str(r.get("label", r.get("solver", "?"))), 40) for r in rows]
    y = np.arange(len(rows))
    fig, (ax_s, ax_n) = plt.subplots(1, 2, figsize=(9.0, 0.6 * len(rows) + 1.6), sharey=True)
    wall = [r.get("s_per_sample") or 0.0 for r in rows]
    cpu = [r.get("cpu_s_per_sample") or 0.0 for r in rows]
    ax_s.barh(y - 0.2, wall, height=0.4, color="C0", label="wall")
    ax_s.barh(y + 0.2, cpu, height=0.4, color="C1", label="CPU (process)")
    ax_s.set_xlabel("seconds per sample")
    ax_s.set_yticks(y, labels, fontsize=7)
    ax_s.invert_yaxis()
    ax_s.legend(fontsize=7, loc="lower left", bbox_to_anchor=(0.0, 1.01), ncols=2, frameon=False)
    ax_n.barh(y, [r.get("nfe") or 0.0 for r in rows], height=0.5, color="C2")
    ax_n.set_xlabel("NFE per sample (forward solve)")
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
