"""Evaluate sample folders against held-out MD: ESS, E-W2, T-W2 (proposal and reweighted), basins, intervals.

Protocol (docs/design.md §5, as the published tri-alanine evaluation): log-weights are taken as sampled; samples
with a wrongly handed C-alpha are then mirrored (x -> -x) before dihedrals are measured; optionally the
ceil(Q N) largest finite log-weights are dropped (``clip_logw``, the published ``logw_quantile_filter``; off by
default because it biases the estimate); the reweighted set is as many indices as samples kept, drawn with
replacement from softmax(log w) (multinomial). E-W2 and T-W2 of that set are computed exactly from the distinct
drawn samples weighted by their counts (identical to the metric of the resampled set with its duplicates, and
much cheaper when the ESS is small). Deterministic SNIS-weighted versions (``*_weighted``) are reported too.

Why intervals: at small N or small ESS the reweighted metrics rest on a handful of samples, so every number
carries a 95 % percentile-bootstrap interval: each replicate redraws the N samples with replacement and repeats
the whole protocol (clip, SNIS, resample, metrics), as multiplicities over the original samples (nothing is
copied). The reference is held fixed. Why a floor row: E-W2 and T-W2 of a perfect sampler are not 0 at finite
N; the same metrics between N evenly spaced MD frames of another split and the reference show that floor.

Reference energies are computed once per frame set and cached by content hash in ``DATASET/cache/``.
"""
from __future__ import annotations

import hashlib
import io
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np

from rexmol.atomic import write_atomic
from rexmol.mddata import XTC_QUANTUM_NM, as_stored
from rexmol.metrics import BASINS, basin_labels, basin_populations, energy_w2, residue_pairs, torus_w2
from rexmol.report import (basin_table, markdown_table, plot_cost, plot_energy_histograms, plot_log_weights,
                           plot_ramachandran, plot_roundtrip, write_json)
from rexmol.systems import System
from rexmol.weights import (bootstrap_intervals, clip_counts, counts_ess, counts_weights, n_clipped,
                            resample)

__all__ = ["Reference", "SampleSet", "reference_energies", "load_reference", "check_system_match", "DISTANCES",
           "checked_skip", "protocol_metrics", "evaluate_run", "evaluate_floor", "write_report", "FEW_SAMPLES"]

# A run is flagged when its reweighted columns rest on fewer effective samples than this, or N is below FEW_N.
FEW_SAMPLES = 10.0
FEW_N = 100


@dataclass(frozen=True)
class Reference:
    """Held-out MD frames: ``frames`` [F, N, 3] nm (float32), ``energy`` [F] kT, ``angles`` [F, D] radians;
    ``quantum_nm``: the rounding the frames went through in storage (XTC: 1e-3 nm; None: stored exactly)."""

    path: Path
    split: str
    system: System
    frames: np.ndarray
    energy: np.ndarray
    angles: np.ndarray
    quantum_nm: float | None = None

    @property
    def n_frames(self) -> int:
        return int(self.energy.size)


@dataclass(frozen=True)
class SampleSet:
    """What the protocol needs of N samples: ``log_w`` [N], ``energy`` [N] kT, ``angles`` [N, D] radians
    (NaN where the coordinates are non-finite)."""

    log_w: np.ndarray
    energy: np.ndarray
    angles: np.ndarray

    @property
    def n(self) -> int:
        return int(self.log_w.size)


def _atom_names(topology) -> list[tuple[str, str]]:
    """(residue name, atom name) per atom of an mdtraj topology."""
    return [(a.residue.name, a.name) for a in topology.atoms]


def _openmm_energies(frames: np.ndarray, system: System) -> np.ndarray:
    from rexmol.energy import OpenMMEnergy

    with OpenMMEnergy(system) as bridge:
        return bridge.evaluate(frames).energy


def _energy_key(frames: np.ndarray, system: System) -> str:
    """sha256 of the frames (float32 bytes, shape) and of everything the energy depends on (spec and PDB)."""
    h = hashlib.sha256()
    f = np.ascontiguousarray(frames, dtype=np.float32)
    h.update(repr(f.shape).encode())
    h.update(f.tobytes())
    h.update(system.name.encode())
    h.update(json.dumps(system.spec, sort_keys=True, default=str).encode())
    h.update(Path(system.pdb_path).read_bytes())
    return h.hexdigest()


def reference_energies(data_dir, frames: np.ndarray, system: System,
                       compute: Callable[[np.ndarray, System], np.ndarray] = _openmm_energies) -> np.ndarray:
    """Energies [F] kT of MD ``frames`` [F, N, 3], cached in ``data_dir/cache/energy-<sha256>.npy``.

    The key hashes the frames and the system's spec and PDB, so a changed force field or frame set is never
    served a stale cache. ``compute(frames, system)`` is called only on a miss; an unwritable dataset folder
    just skips the cache.
    """
    path = Path(data_dir) / "cache" / f"energy-{_energy_key(frames, system)}.npy"
    if path.is_file():
        energy = np.load(path)
        if energy.shape == (len(frames),):
            return energy
    energy = np.asarray(compute(frames, system), dtype=np.float64)
    buf = io.BytesIO()
    np.save(buf, energy)
    try:
        path.parent.mkdir(exist_ok=True)
        write_atomic(path, buf.getvalue())
    except OSError:
        pass
    return energy


def _checked_frames(data_dir: Path, system: System, split: str, max_frames: int | None):
    from rexmol.geometry import backbone_dihedrals
    from rexmol.mddata import dataset_topology, load_frames, load_manifest

    manifest = load_manifest(data_dir)
    top = dataset_topology(data_dir)
    if manifest["system"] != system.name or _atom_names(top) != _atom_names(system.mdtraj_topology):
        raise ValueError(f"reference {data_dir} is system {manifest['system']!r} with {top.n_atoms} atoms; the samples "
                         f"are of {system.name!r} with {system.n_atoms} atoms (different topology)")
    frames = load_frames(data_dir, split, max_frames=max_frames)
    energy = reference_energies(data_dir, frames, system)
    if not np.isfinite(energy).all():
        raise ValueError(f"reference {data_dir}: {int((~np.isfinite(energy)).sum())} MD frames of the {split} split "
                         "have non-finite energies")
    return frames, energy, backbone_dihedrals(frames, system)


def load_reference(data_dir, system: System, split: str = "test", max_frames: int | None = 10_000) -> Reference:
    """Frames of ``split`` (at most ``max_frames``, evenly spaced) with energies (cached) and dihedrals.

    ValueError when the dataset's system or topology differs from ``system``.
    """
    data_dir = Path(data_dir)
    frames, energy, angles = _checked_frames(data_dir, system, split, max_frames)
    return Reference(path=data_dir, split=split, system=system, frames=frames, energy=energy, angles=angles,
                     quantum_nm=XTC_QUANTUM_NM)


def energies_as_stored(x: np.ndarray, system: System, quantum_nm: float) -> np.ndarray:
    """Energies [N] kT of samples ``x`` [N, n, 3] nm rounded as MD frames are in storage (:func:`as_stored`), so
    that they compare like for like with the reference's energies; +inf where x is not finite or OpenMM fails."""
    from rexmol.energy import OpenMMEnergy

    energy = np.full(len(x), np.inf)
    finite = np.isfinite(x).all(axis=(1, 2))
    if finite.any():
        with OpenMMEnergy(system) as bridge:
            energy[finite] = bridge.evaluate(as_stored(x[finite], quantum_nm).astype(np.float64)).energy
    return energy


def check_system_match(config: dict[str, Any], system: System, where: str) -> None:
    """ValueError unless a sample run's config names ``system`` with its atom count."""
    if config.get("system") != system.name or int(config.get("n_atoms", -1)) != system.n_atoms:
        raise ValueError(f"{where} holds samples of {config.get('system')!r} ({config.get('n_atoms')} atoms), "
                         f"not of {system.name!r} ({system.n_atoms} atoms)")


LOGQ_LABELS = {"exact": "integrated exact trace", "hutchinson": "Hutchinson (biased)",
               "discrete": "discrete-map exact"}


def _steps_label(desc: dict[str, Any]) -> str:
    """``8 steps, grid log-varsigma`` or ``rtol=0.001, atol=0.001, error norm ..., step control ...``."""
    if desc.get("steps"):
        parts = [f"{desc['steps']} steps"]
        if desc.get("grid") not in (None, "t"):
            parts.append(f"grid {desc['grid']}")
    elif desc.get("rtol") is not None:
        parts = [f"rtol={desc['rtol']:g}", f"atol={desc['atol']:g}"]
        if desc.get("logq_atol") is not None:
            parts.append(f"log q atol={desc['logq_atol']:g}")
        parts += [f"{name} {desc[key]}" for key, name in (("error_norm", "error norm"), ("step_control", "step control"))
                  if desc.get(key) is not None]
    else:
        return ""
    return ", ".join(parts)


def _label(config: dict[str, Any]) -> tuple[str, str]:
    """``(model, solver label)``: solver, steps or tolerances, Lawson coordinates and interval, dtypes, log q."""
    desc = config.get("proposal") or {}
    solver = str(desc.get("solver", "?"))
    steps = _steps_label(desc)
    if steps:
        solver += f" ({steps})"
    if desc.get("lawson") is not None:
        lawson = "in t" if str(desc["lawson"]).startswith("velocity (t)") else f"{desc['lawson']}-kind Lawson"
        solver += f"; {lawson}"
    if desc.get("t1") is not None:
        solver += f", t in [{desc.get('t0', 0.0):g}, {desc['t1']:g}]"
    if desc.get("zeta") not in (None, 1.0):
        solver += f", zeta={desc['zeta']:g}"
    if desc.get("dtype") is not None:
        solver += f"; {desc['dtype']} state, {desc.get('model_dtype') or desc['dtype']} network"
    logq = str(desc.get("logq", "exact"))
    solver += f"; log q: {LOGQ_LABELS.get(logq, logq)}"
    return str(desc.get("model", "?")), solver


def _short_label(config: dict[str, Any]) -> str:
    """A plot label: solver, steps or rtol, log-q mode."""
    desc = config.get("proposal") or {}
    label = str(desc.get("solver", "?"))
    if desc.get("steps"):
        label += f" {desc['steps']} steps"
    elif desc.get("rtol") is not None:
        label += f" rtol {desc['rtol']:g}"
    return label + f", {desc.get('logq', 'exact')}"


def _protocol_label(q: float | None, n: int) -> str:
    if not q:
        return "unclipped SNIS"
    return f"top {100 * q:g} % of log w dropped ({n_clipped(q, n)} of {n})"


def _residue_columns(system: System) -> list[tuple[str, int, int]]:
    """(label "phiK/psiK", phi column, psi column) in the dihedral array for each residue with both angles."""
    from rexmol.geometry import dihedral_names

    names = dihedral_names(system)
    offset, start = {}, 0
    for kind, quads in system.dihedrals.items():
        offset[kind] = start
        start += len(quads)
    cols = [(offset["phi"] + i, offset["psi"] + j) for i, j in residue_pairs(system.dihedrals)]
    return [(f"{names[a]}/{names[b]}", a, b) for a, b in cols]


def _basin_fractions(angles: np.ndarray, weights: np.ndarray, a: int, b: int) -> np.ndarray:
    """Populations [len(BASINS)] of (angles[:, a], angles[:, b]) under non-negative ``weights`` [N]."""
    ok = (weights > 0) & np.isfinite(angles[:, a]) & np.isfinite(angles[:, b])
    labels = basin_labels(angles[ok, a], angles[ok, b])
    pops = np.bincount(labels, weights=weights[ok], minlength=len(BASINS))
    return pops / pops.sum()


# The distances a bootstrap may leave out (``skip``): each costs one exact transport (T-W2) or sort (E-W2) per
# replicate, and T-W2 of the proposal is the costliest (all its distinct samples against the reference).
DISTANCES: tuple[str, ...] = ("e_w2", "t_w2", "e_w2_proposal", "t_w2_proposal")


def protocol_metrics(samples: SampleSet, reference: Reference, counts: np.ndarray, clip_logw: float | None,
                     rng: np.random.Generator, skip: frozenset[str] = frozenset()) -> dict[str, float]:
    """One pass of the protocol on the multiset ``counts`` [N] of ``samples``: clip, SNIS, resample, metrics.

    Returns flat metrics: ``ess``, ``e_w2``, ``t_w2`` (resampled set), ``e_w2_proposal``, ``t_w2_proposal``
    (the drawn samples as they are), ``n_distinct_resampled``, ``n_clipped`` and ``basin:KEY:BASIN:proposal`` /
    ``...:reweighted`` populations; the distances named in ``skip`` (of ``DISTANCES``) are NaN, not computed
    (``rng`` is drawn from the same either way). ValueError when no finite log-weight is left.
    """
    lw, energy, angles = samples.log_w, samples.energy, samples.angles
    kept = clip_counts(lw, counts, clip_logw)
    w = counts_weights(lw, kept)
    drawn = np.bincount(resample(w, int(kept.sum()), rng), minlength=samples.n)
    used = drawn > 0
    c = np.asarray(counts, dtype=np.float64)
    prop_e = (c > 0) & np.isfinite(energy)
    prop_a = (c > 0) & np.isfinite(angles).all(axis=1)
    nan = math.nan
    distances = {
        "e_w2": lambda: energy_w2(reference.energy, energy[used], gen_weights=drawn[used]),
        "t_w2": lambda: torus_w2(reference.angles, angles[used], b_weights=drawn[used]),
        "e_w2_proposal": lambda: energy_w2(reference.energy, energy[prop_e], gen_weights=c[prop_e])
        if prop_e.any() else nan,
        "t_w2_proposal": lambda: torus_w2(reference.angles, angles[prop_a], b_weights=c[prop_a])
        if prop_a.any() else nan,
    }
    out = {"ess": counts_ess(lw, kept), "n_clipped": int(counts.sum() - kept.sum()),
           "n_distinct_resampled": int(used.sum())}
    out.update({k: nan if k in skip else fn() for k, fn in distances.items()})
    for key, a, b in _residue_columns(reference.system):
        for kind, weights in (("proposal", c * prop_a), ("reweighted", w)):
            pops = _basin_fractions(angles, weights, a, b) if weights.sum() > 0 else np.full(len(BASINS), math.nan)
            out.update({f"basin:{key}:{name}:{kind}": float(p) for name, p in zip(BASINS, pops)})
    return out


def _metrics_row(samples: SampleSet, reference: Reference, seed: int, clip_logw: float | None,
                 bootstrap: int, on_replicate: Callable[[int], None] | None,
                 bootstrap_skip: frozenset[str]) -> tuple[dict[str, Any], np.ndarray]:
    """The point estimate (with its SNIS-weighted twins and basin error bars) and its intervals (none for the
    distances in ``bootstrap_skip``); also the clipped mask [N] for the plots."""
    ones = np.ones(samples.n, dtype=np.int64)
    point = protocol_metrics(samples, reference, ones, clip_logw, np.random.default_rng([seed, 8]))
    clipped = clip_counts(samples.log_w, ones, clip_logw) == 0
    w = counts_weights(samples.log_w, ~clipped)
    used = w > 0
    row: dict[str, Any] = {k: v for k, v in point.items() if not k.startswith("basin:")}
    row["protocol"] = _protocol_label(clip_logw, samples.n)
    row["clip_logw"] = clip_logw
    row["ess_abs"] = row["ess"] * (samples.n - row["n_clipped"])
    row["e_w2_weighted"] = energy_w2(reference.energy, samples.energy[used], gen_weights=w[used])
    row["t_w2_weighted"] = torus_w2(reference.angles, samples.angles[used], b_weights=w[used])
    intervals, failed = ({}, 0) if not bootstrap else bootstrap_intervals(
        samples.n, lambda counts, rng: protocol_metrics(samples, reference, counts, clip_logw, rng, bootstrap_skip),
        bootstrap, np.random.default_rng([seed, 16]), on_replicate=on_replicate)
    row["ci95"] = {k: v for k, v in intervals.items() if not k.startswith("basin:")}
    row["bootstrap"] = {"replicates": bootstrap, "failed": failed, "seed": seed, "level": 0.95,
                        "skipped": sorted(bootstrap_skip) if bootstrap else [],
                        "method": "percentile; each replicate redraws the samples and repeats clip, SNIS, "
                                  "resample, metrics"}
    lw_clipped = np.where(clipped, -np.inf, samples.log_w)
    basins = {}
    prop_a = np.isfinite(samples.angles).all(axis=1)
    for key, a, b in _residue_columns(reference.system):
        entry = {
            "md": _pops(basin_populations(reference.angles[:, a], reference.angles[:, b])),
            "proposal": _pops(basin_populations(samples.angles[prop_a, a], samples.angles[prop_a, b])),
            "reweighted": _pops(basin_populations(samples.angles[:, a], samples.angles[:, b], lw_clipped)),
        }
        for kind in ("proposal", "reweighted"):
            for name, pop in entry[kind].items():
                pop["ci95"] = intervals.get(f"basin:{key}:{name}:{kind}")
        basins[key] = entry
    row["basins"] = basins
    return row, clipped


def evaluate_run(config: dict[str, Any], data: dict[str, np.ndarray], reference: Reference, seed: int = 0,
                 where: str = "sample folder", *, clip_logw: float | None = None, bootstrap: int = 0,
                 on_replicate: Callable[[int], None] | None = None,
                 bootstrap_skip: Iterable[str] = ()) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Metrics of one sample run against ``reference``: ``(row for the report, arrays for the plots)``.

    ``clip_logw``: drop the ceil(Q N) largest finite log-weights first (None: unclipped). ``bootstrap``:
    replicates for the 95 % intervals (0: none), seeded by ``seed``; ``on_replicate(k)`` after each (progress);
    ``bootstrap_skip``: distances (of ``DISTANCES``) left without an interval. Energy metrics (E-W2, medians, means)
    use the samples' energies after the reference's storage rounding (``reference.quantum_nm``), like for like
    with the MD frames; the weights keep the exact energies (``e_w2_weighted_exact``: E-W2 without the rounding).
    """
    from rexmol.geometry import backbone_dihedrals, fix_chirality

    system = reference.system
    check_system_match(config, system, where)
    n = int(data["log_w"].size)
    finite_w = np.isfinite(data["log_w"])
    if not finite_w.any():
        raise ValueError(f"{where}: all {n} samples have non-finite log-weights; nothing to evaluate")
    x = data["x"]
    finite_x = np.isfinite(x).all(axis=(1, 2))
    angles = np.full((n, reference.angles.shape[1]), np.nan)
    fix = fix_chirality(x[finite_x], system)
    angles[finite_x] = backbone_dihedrals(fix.x, system)
    mirrored = np.zeros(n, bool)
    mirrored[finite_x] = fix.mirrored
    still_wrong = np.zeros(n, bool)
    still_wrong[finite_x] = fix.still_wrong

    exact = np.asarray(data["energy"], dtype=np.float64)
    log_w = np.asarray(data["log_w"], dtype=np.float64)
    energy = exact if reference.quantum_nm is None else energies_as_stored(x, system, reference.quantum_nm)
    samples = SampleSet(log_w=log_w, energy=energy, angles=angles)
    metrics, clipped = _metrics_row(samples, reference, seed, clip_logw, bootstrap, on_replicate,
                                    checked_skip(bootstrap_skip))
    w = counts_weights(log_w, ~clipped)
    model, solver = _label(config)
    row: dict[str, Any] = {
        "model": model, "solver": solver, "label": f"{model} {_short_label(config)}", "n": n,
        "n_nonfinite": int((~finite_w).sum()), "n_energy_failed": int(data["energy_failed"].sum()),
        "n_mirrored": int(mirrored.sum()), "n_mixed_chirality": int(still_wrong.sum()),
        **metrics,
        "n_excluded_e_w2_proposal": int((~np.isfinite(energy)).sum()),
        "nfe": float(data["nfe"].mean()),
        "s_per_sample": float(data["wall_seconds"].mean()),
        "cpu_s_per_sample": float(data["cpu_seconds"].mean()),
        "energy_quantum_nm": reference.quantum_nm,
        "e_w2_weighted_exact": _exact_energy_w2(reference, exact, w),
        "energy_median_proposal": _nanstat(np.nanmedian, energy[np.isfinite(energy)]),
        "energy_mean_md": float(reference.energy.mean()),
        "energy_mean_reweighted": _weighted_mean(energy, w),
        "energy_mean_reweighted_exact": _weighted_mean(exact, w),
        "roundtrip_x_median": _nanstat(np.nanmedian, data["roundtrip_x"]),
        "roundtrip_x_max": _nanstat(np.nanmax, data["roundtrip_x"]),
        "roundtrip_logq_max": _nanstat(np.nanmax, data["roundtrip_logq"]),
        "sampling": {"seed": config["seed"], "batch_size": config["batch_size"], "proposal": config["proposal"]},
    }
    row["few_samples"] = bool(n < FEW_N or row["ess_abs"] < FEW_SAMPLES)
    arrays = {"energy": energy, "weights": w, "log_w": data["log_w"],
              "clipped": clipped, "angles": angles, "roundtrip_x": data["roundtrip_x"]}
    return row, arrays


def checked_skip(names: Iterable[str], where: str = "bootstrap_skip") -> frozenset[str]:
    """``names`` as a set; ValueError naming ``where`` for a name outside ``DISTANCES``."""
    skip = frozenset(names)
    unknown = sorted(skip - set(DISTANCES))
    if unknown:
        raise ValueError(f"{where}: unknown metric(s) {', '.join(unknown)}; choose from {', '.join(DISTANCES)}")
    return skip


def _weighted_mean(values: np.ndarray, weights: np.ndarray) -> float:
    """SNIS mean of ``values`` [N] under ``weights`` [N] (>= 0), over the finite values with weight."""
    used = (weights > 0) & np.isfinite(values)
    return float(np.sum(weights[used] * values[used]) / np.sum(weights[used])) if used.any() else math.nan


def _exact_energy_w2(reference: Reference, exact: np.ndarray, weights: np.ndarray) -> float:
    """E-W2 (kT) of the samples' exact energies under ``weights`` against the reference as stored: what E-W2 was
    before samples were rounded like the reference (its excess over ``e_w2_weighted`` is the storage rounding)."""
    used = (weights > 0) & np.isfinite(exact)
    return energy_w2(reference.energy, exact[used], gen_weights=weights[used]) if used.any() else math.nan


def evaluate_floor(reference: Reference, split: str, n: int, seed: int = 0, *, clip_logw: float | None = None,
                   bootstrap: int = 0, on_replicate: Callable[[int], None] | None = None,
                   bootstrap_skip: Iterable[str] = ()) -> dict[str, Any]:
    """The MD floor: the same metrics for ``n`` evenly spaced frames of ``split`` (equal weights) against
    ``reference``. ValueError when a floor frame is byte-identical to a reference frame (sets not disjoint)."""
    if n < 1:
        raise ValueError(f"floor row needs n >= 1, got {n}")
    frames, energy, angles = _checked_frames(reference.path, reference.system, split, n)
    seen = {f.tobytes() for f in np.ascontiguousarray(reference.frames, dtype=np.float32)}
    shared = sum(f.tobytes() in seen for f in np.ascontiguousarray(frames, dtype=np.float32))
    if shared:
        raise ValueError(f"--floor-split {split}: {shared} of its {len(frames)} frames are also reference frames "
                         f"({reference.split} split); choose another split or --floor-split none")
    samples = SampleSet(log_w=np.zeros(len(frames)), energy=energy, angles=angles)
    metrics, _ = _metrics_row(samples, reference, seed, clip_logw, bootstrap, on_replicate,
                              checked_skip(bootstrap_skip))
    return {"model": "MD floor", "solver": f"{len(frames)} evenly spaced {split} frames (equal weights)",
            "label": f"MD {split}", "n": int(len(frames)), "split": split, "n_nonfinite": 0, "n_mirrored": 0,
            "disjoint_from_reference": True, **metrics, "few_samples": False}


def _pops(pops) -> dict[str, dict[str, float]]:
    return {name: {"mean": float(e.mean), "stderr": float(e.stderr)} for name, e in pops.items()}


def _nanstat(fn, a: np.ndarray) -> float | None:
    return float(fn(a)) if np.isfinite(a).any() else None


def write_report(out, rows: list[dict[str, Any]], arrays: list[dict[str, np.ndarray]], reference: Reference,
                 published: dict | None, extra: dict[str, Any] | None = None,
                 floor: dict[str, Any] | None = None) -> str:
    """Write report.json, report.md and the PNG plots into ``out``; returns the Markdown text."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    system = reference.system
    titles = [f"{r['label']}: N = {r['n']}, ESS = {r['ess']:.3g} (ESS·N = {r['ess_abs']:.1f})" for r in rows]
    plots = []
    for key, a, b in _residue_columns(system):
        panels = [(f"MD {reference.split} split ({reference.n_frames} frames)", reference.angles[:, a],
                   reference.angles[:, b], None)]
        for r, arr in zip(rows, arrays):
            panels.append((f"{r['label']}\nproposal (N = {r['n']})", arr["angles"][:, a], arr["angles"][:, b], None))
            panels.append((f"{r['label']}\nreweighted (ESS·N = {r['ess_abs']:.1f})", arr["angles"][:, a],
                           arr["angles"][:, b], arr["weights"]))
        name = f"ramachandran_{key.replace('/', '_')}.png"
        plot_ramachandran(out / name, panels, title=f"{system.name}: {key}")
        plots.append(name)
    plot_energy_histograms(out / "energy.png", reference.energy,
                           [(t, arr["energy"], arr["weights"]) for t, arr in zip(titles, arrays)])
    plot_log_weights(out / "log_weights.png", [(t, arr["log_w"], arr["clipped"]) for t, arr in zip(titles, arrays)])
    plot_roundtrip(out / "roundtrip.png", [(r["label"], arr["roundtrip_x"]) for r, arr in zip(rows, arrays)])
    plot_cost(out / "cost.png", rows)
    plots += ["energy.png", "log_weights.png", "roundtrip.png", "cost.png"]
    text = f"# {system.name}: Boltzmann sampling against {reference.n_frames} MD frames ({reference.split} split)\n\n"
    text += markdown_table(rows, published, floor)
    text += "\n" + basin_table(rows, floor)
    write_json(out / "report.json", {
        "system": system.name, "reference": {"path": reference.path, "split": reference.split,
                                             "n_frames": reference.n_frames},
        "runs": rows, "floor": floor, "published": published, "plots": plots, **(extra or {}),
    })
    (out / "report.md").write_text(text + "\n" + "\n".join(f"![{p}]({p})" for p in plots) + "\n")
    return text
