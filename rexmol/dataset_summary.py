"""What an MD dataset holds: frames per split, Ramachandran basin populations, a Ramachandran plot (PNG)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from rexmol.geometry import backbone_dihedrals, dihedral_names
from rexmol.mddata import SPLITS, load_frames, load_manifest
from rexmol.metrics import basin_populations, residue_pairs
from rexmol.report import plot_ramachandran, write_json
from rexmol.systems import load_system


def summarise_dataset(data_dir: str | Path) -> dict[str, Any]:
    """Write ``summary.json`` and ``ramachandran.png`` into ``data_dir``; returns the summary.

    Populations of the alpha_R / beta / alpha_L basins of every residue with both phi and psi, per split,
    with i.i.d. error bars (an underestimate for correlated MD frames; the split-to-split spread is the honest
    uncertainty).
    """
    data_dir = Path(data_dir)
    manifest = load_manifest(data_dir)
    system = load_system(manifest["system"])
    names = dihedral_names(system)
    n_phi = len(system.dihedrals.get("phi", []))
    pairs = residue_pairs(system.dihedrals)
    summary: dict[str, Any] = {"system": system.name, "total_ns": manifest["total_ns"],
                               "frame_interval_ps": manifest["frame_interval_ps"], "splits": {}}
    panels = []
    for split in SPLITS:
        if not manifest["splits"][split]:
            summary["splits"][split] = {"frames": 0}
            continue
        angles = backbone_dihedrals(load_frames(data_dir, split), system)
        entry: dict[str, Any] = {"frames": int(len(angles)), "basins": {}}
        for k_phi, k_psi in pairs:
            phi, psi = angles[:, k_phi], angles[:, n_phi + k_psi]
            label = f"{names[k_phi]}/{names[n_phi + k_psi]}"
            entry["basins"][label] = {b: {"population": e.mean, "stderr": e.stderr}
                                      for b, e in basin_populations(phi, psi).items()}
            panels.append((f"{split} {label} ({len(angles)} frames)", phi, psi, None))
        summary["splits"][split] = entry
    if panels:
        plot_ramachandran(data_dir / "ramachandran.png", panels,
                          title=f"{system.name}: {manifest['total_ns']:.3g} ns of MD "
                                f"({manifest['frame_interval_ps']:g} ps frames)")
    write_json(data_dir / "summary.json", summary)
    return summary
