"""Evaluate sample folders against held-out MD: ESS, E-W2, T-W2 (proposal and reweighted), basins, plots.

Protocol (DESIGN.md §5, as the published tri-alanine evaluation): log-weights are taken as sampled; samples
with a wrongly handed C-alpha are then mirrored (x -> -x) before dihedrals are measured; the reweighted set
is N indices drawn with replacement from softmax(log w) (multinomial). E-W2 and T-W2 of that set are computed
exactly from the distinct drawn samples weighted by their counts (identical to the metric of the resampled
set with its duplicates, and much cheaper when the ESS is small). Deterministic SNIS-weighted versions
(``*_weighted``, no resampling noise) are reported as well.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from rexmol.systems import System

__all__ = ["Reference", "load_reference", "check_system_match", "evaluate_run", "write_report"]


@dataclass(frozen=True)
class Reference:
    """Held-out MD frames: ``energy`` [F] kT, ``angles`` [F, D] backbone dihedrals (radians)."""

    path: Path
    split: str
    system: System
    energy: np.ndarray
    angles: np.ndarray

    @property
    def n_frames(self) -> int:
        return int(self.energy.size)


def _atom_names(topology) -> list[tuple[str, str]]:
    """(residue name, atom name) per atom of an mdtraj topology."""
    return [(a.residue.name, a.name) for a in topology.atoms]


def load_reference(data_dir, system: System, split: str = "test", max_frames: int | None = 10_000) -> Reference:
    """Frames of ``split`` (at most ``max_frames``, evenly spaced) with energies and dihedrals.

    ValueError when the dataset's system or topology differs from ``system``.
    """
    from rexmol.energy import OpenMMEnergy
    from rexmol.geometry import backbone_dihedrals
    from rexmol.mddata import dataset_topology, load_frames, load_manifest

    data_dir = Path(data_dir)
    manifest = load_manifest(data_dir)
    top = dataset_topology(data_dir)
    if manifest["system"] != system.name or _atom_names(top) != _atom_names(system.mdtraj_topology):
        raise ValueError(f"reference {data_dir} is system {manifest['system']!r} with {top.n_atoms} atoms; the samples "
                         f"are of {system.name!r} with {system.n_atoms} atoms (different topology)")
    frames = load_frames(data_dir, split, max_frames=max_frames)
    with OpenMMEnergy(system) as bridge:
        res = bridge.evaluate(frames)
    if res.n_failed:
        raise ValueError(f"reference {data_dir}: {res.n_failed} MD frames have non-finite energies")
    return Reference(path=data_dir, split=split, system=system, energy=res.energy,
                     angles=backbone_dihedrals(frames, system))


def check_system_match(config: dict[str, Any], system: System, where: str) -> None:
    """ValueError unless a sample run's config names ``system`` with its atom count."""
    if config.get("system") != system.name or int(config.get("n_atoms", -1)) != system.n_atoms:
        raise ValueError(f"{where} holds samples of {config.get('system')!r} ({config.get('n_atoms')} atoms), "
                         f"not of {system.name!r} ({system.n_atoms} atoms)")


LOGQ_LABELS = {"exact": "integrated exact trace", "hutchinson": "Hutchinson (biased)",
               "discrete": "discrete-map exact"}


def _label(config: dict[str, Any]) -> tuple[str, str]:
    desc = config.get("proposal") or {}
    solver = str(desc.get("solver", "?"))
    if desc.get("steps"):
        solver += f" ({desc['steps']} steps)"
    elif desc.get("rtol") is not None:
        solver += f" (rtol={desc['rtol']:g}, atol={desc['atol']:g})"
    logq = str(desc.get("logq", "exact"))
    solver += f", log q: {LOGQ_LABELS.get(logq, logq)}"
    return str(desc.get("model", "?")), solver


def evaluate_run(config: dict[str, Any], data: dict[str, np.ndarray], reference: Reference,
                 seed: int = 0, where: str = "sample folder") -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Metrics of one sample run against ``reference``: ``(row for the report, arrays for the plots)``."""
    from rexmol.geometry import backbone_dihedrals, fix_chirality
    from rexmol.metrics import basin_populations, energy_w2, torus_w2
    from rexmol.weights import resample, snis

    system = reference.system
    check_system_match(config, system, where)
    n = int(data["log_w"].size)
    w = snis(data["log_w"])
    if w.n_nonfinite == n:
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

    energy = data["energy"]
    finite_e = np.isfinite(energy)
    counts = np.bincount(resample(w.weights, n, np.random.default_rng([seed, 8])), minlength=n)
    drawn = counts > 0
    used = w.weights > 0
    row: dict[str, Any] = {
        "model": _label(config)[0], "solver": _label(config)[1], "n": n,
        "ess": w.ess, "ess_abs": w.ess_abs, "n_nonfinite": w.n_nonfinite,
        "n_energy_failed": int(data["energy_failed"].sum()), "n_mirrored": int(mirrored.sum()),
        "n_mixed_chirality": int(still_wrong.sum()), "n_distinct_resampled": int(drawn.sum()),
        "e_w2": energy_w2(reference.energy, energy[drawn], gen_weights=counts[drawn]),
        "t_w2": torus_w2(reference.angles, angles[drawn], b_weights=counts[drawn]),
        "e_w2_weighted": energy_w2(reference.energy, energy[used], gen_weights=w.weights[used]),
        "t_w2_weighted": torus_w2(reference.angles, angles[used], b_weights=w.weights[used]),
        "e_w2_proposal": energy_w2(reference.energy, energy[finite_e]),
        "n_excluded_e_w2_proposal": int((~finite_e).sum()),
        "t_w2_proposal": torus_w2(reference.angles, angles[finite_x]),
        "nfe": float(data["nfe"].mean()),
        "s_per_sample": float(data["wall_seconds"].mean()),
        "cpu_s_per_sample": float(data["cpu_seconds"].mean()),
        "energy_median_proposal": float(np.median(energy[finite_e])) if finite_e.any() else None,
        "energy_mean_md": float(reference.energy.mean()),
        "roundtrip_x_median": _nanstat(np.nanmedian, data["roundtrip_x"]),
        "roundtrip_x_max": _nanstat(np.nanmax, data["roundtrip_x"]),
        "roundtrip_logq_max": _nanstat(np.nanmax, data["roundtrip_logq"]),
        "sampling": {"seed": config["seed"], "batch_size": config["batch_size"], "proposal": config["proposal"]},
    }
    basins = {}
    for key, a, b in _residue_columns(system):
        basins[key] = {
            "md": _pops(basin_populations(reference.angles[:, a], reference.angles[:, b])),
            "proposal": _pops(basin_populations(angles[finite_x, a], angles[finite_x, b])),
            "reweighted": _pops(basin_populations(angles[:, a], angles[:, b], data["log_w"])),
        }
    row["basins"] = basins
    arrays = {"energy": energy, "weights": w.weights, "log_w": data["log_w"], "angles": angles,
              "roundtrip_x": data["roundtrip_x"]}
    return row, arrays


def _residue_columns(system: System) -> list[tuple[str, int, int]]:
    """(label "phiK/psiK", phi column, psi column) in the dihedral array for each residue with both angles."""
    from rexmol.geometry import dihedral_names
    from rexmol.metrics import residue_pairs

    names = dihedral_names(system)
    offset, start = {}, 0
    for kind, quads in system.dihedrals.items():
        offset[kind] = start
        start += len(quads)
    cols = [(offset["phi"] + i, offset["psi"] + j) for i, j in residue_pairs(system.dihedrals)]
    return [(f"{names[a]}/{names[b]}", a, b) for a, b in cols]


def _pops(pops) -> dict[str, dict[str, float]]:
    return {name: {"mean": float(e.mean), "stderr": float(e.stderr)} for name, e in pops.items()}


def _nanstat(fn, a: np.ndarray) -> float | None:
    return float(fn(a)) if np.isfinite(a).any() else None


def write_report(out, rows: list[dict[str, Any]], arrays: list[dict[str, np.ndarray]], reference: Reference,
                 published: dict | None, extra: dict[str, Any] | None = None) -> str:
    """Write report.json, report.md and the PNG plots into ``out``; returns the Markdown text."""
    from rexmol.report import (markdown_table, plot_energy_histograms, plot_log_weights, plot_ramachandran,
                               plot_roundtrip, write_json)

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    system = reference.system
    labels = [f"{r['model']} {r['solver']}" for r in rows]
    plots = []
    for key, a, b in _residue_columns(system):
        panels = [("MD", reference.angles[:, a], reference.angles[:, b], None)]
        for label, arr in zip(labels, arrays):
            panels.append((f"{label}\nproposal", arr["angles"][:, a], arr["angles"][:, b], None))
            panels.append((f"{label}\nreweighted", arr["angles"][:, a], arr["angles"][:, b], arr["weights"]))
        name = f"ramachandran_{key.replace('/', '_')}.png"
        plot_ramachandran(out / name, panels, title=f"{system.name}: {key}")
        plots.append(name)
    energy_runs = []
    for label, arr in zip(labels, arrays):
        energy_runs += [(f"{label} proposal", arr["energy"], None), (f"{label} reweighted", arr["energy"], arr["weights"])]
    plot_energy_histograms(out / "energy.png", reference.energy, energy_runs)
    plot_log_weights(out / "log_weights.png", [(lb, arr["log_w"]) for lb, arr in zip(labels, arrays)])
    plot_roundtrip(out / "roundtrip.png", [(lb, arr["roundtrip_x"]) for lb, arr in zip(labels, arrays)])
    plots += ["energy.png", "log_weights.png", "roundtrip.png"]
    text = f"# {system.name}: Boltzmann sampling against {reference.n_frames} MD frames ({reference.split} split)\n\n"
    text += markdown_table(rows, published)
    write_json(out / "report.json", {
        "system": system.name, "reference": {"path": reference.path, "split": reference.split,
                                             "n_frames": reference.n_frames},
        "runs": rows, "published": published, "plots": plots, **(extra or {}),
    })
    (out / "report.md").write_text(text + "\n" + "\n".join(f"![{p}]({p})" for p in plots) + "\n")
    return text
