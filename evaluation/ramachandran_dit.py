"""Unweighted samples of a trained DiT next to the MD data: Ramachandran plot, energies, validation loss, and
the model's rotation-equivariance error on noised MD test frames at several t (learnt from augmentation only).

Samples come from the project's plain RK4 solver in t (velocity coordinates) on a uniform grid, with no
log-density and no reweighting: this shows what the proposal itself has learnt. Writes
``<out>/ramachandran.png`` and ``<out>/samples_summary.json``.

    nice -n 10 .venv/bin/python evaluation/ramachandran_dit.py data/ala3/model/generator.pt \
        --data-dir data/ala3 --n 2000 --steps 20 --out data/ala3/model
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from rexmol.energy import evaluate
from rexmol.geometry import backbone_dihedrals, dihedral_names, wrong_handedness
from rexmol.mddata import load_frames, load_manifest
from rexmol.metrics import residue_pairs
from rexmol.models.checkpoint import load_generator
from rexmol.report import plot_ramachandran
from rexmol.solvers.grids import FixedGrid
from rexmol.solvers.lawson import LawsonCoordinates
from rexmol.solvers.solve import make_solver, solve
from rexmol.training import equivariance_error, mean_free_noise


def sample(gen, n: int, steps: int, batch: int, seed: int) -> np.ndarray:
    """``n`` samples [n, N, 3] in nm from the prior through RK4 in t (``steps`` uniform steps)."""
    coords = LawsonCoordinates(kind="velocity", output=gen.output_kind)
    solver = make_solver("rk4", gen.model, coords)
    grid = FixedGrid(np.linspace(0.0, 1.0, steps + 1))
    g = torch.Generator().manual_seed(seed)
    out = []
    with torch.no_grad():
        for lo in range(0, n, batch):
            x0 = mean_free_noise((min(batch, n - lo), gen.n_atoms, 3), dtype=torch.float32, generator=g)
            out.append(gen.to_nm(solve(solver, x0, grid).x).double().numpy())
    return np.concatenate(out)


def equivariance_by_time(gen, frames_nm: np.ndarray, times=(0.1, 0.5, 0.9, 0.99), seed: int = 0) -> dict[str, float]:
    """Relative equivariance error of ``gen.model`` at each t on x_t = t x1 + (1 - t) eps, x1 the MD frames."""
    x1 = gen.from_nm(torch.as_tensor(frames_nm, dtype=torch.float32))
    g = torch.Generator().manual_seed(seed)
    errors = {}
    for t in times:
        xt = t * x1 + (1.0 - t) * mean_free_noise(tuple(x1.shape), dtype=x1.dtype, generator=g)
        errors[f"{t:g}"] = equivariance_error(gen.model, xt, torch.full((len(x1),), t))
    return errors


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint")
    parser.add_argument("--data-dir", default="data/ala3")
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=250)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=None, help="output folder (default: the checkpoint's folder)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    gen = load_generator(args.checkpoint)
    system = gen.system
    out = Path(args.out or Path(args.checkpoint).parent)
    out.mkdir(parents=True, exist_ok=True)

    manifest = load_manifest(args.data_dir)
    split = next(s for s in ("test", "val", "train") if manifest["splits"].get(s))
    md = load_frames(args.data_dir, split, max_frames=args.n).astype(np.float64)
    t0 = time.process_time()
    x = sample(gen, args.n, args.steps, args.batch, args.seed)
    cpu_s = time.process_time() - t0

    names = dihedral_names(system)
    n_phi = len(system.dihedrals["phi"])
    angles_md, angles_gen = backbone_dihedrals(md, system), backbone_dihedrals(x, system)
    e_md, e_gen = evaluate(md, system).energy, evaluate(x, system).energy
    panels = []
    for i, j in residue_pairs(system.dihedrals):
        a, b = i, n_phi + j  # columns: phi angles first, then psi (dihedral_names order)
        label = f"{names[a]}/{names[b]}"
        panels.append((f"MD ({split}, {len(md)} frames)\n{label}", angles_md[:, a], angles_md[:, b], None))
        panels.append((f"DiT, {args.n} unweighted samples\n{label}", angles_gen[:, a], angles_gen[:, b], None))
    plot_ramachandran(out / "ramachandran.png", panels,
                      title=f"{system.name}: step {gen.meta.get('global_step')}, RK4 {args.steps} steps")
    finite = np.isfinite(e_gen)
    summary = {
        "checkpoint": str(args.checkpoint),
        "global_step": gen.meta.get("global_step"),
        "val_loss": gen.meta.get("metrics", {}).get("val/loss"),
        "n_samples": args.n,
        "solver": f"rk4, {args.steps} uniform steps in t",
        "sampling_cpu_s": cpu_s,
        "md_split": split,
        "md_energy_median_kT": float(np.median(e_md)),
        "sample_energy_median_kT": float(np.median(e_gen[finite])) if finite.any() else None,
        "sample_energy_quantiles_kT": {q: float(np.quantile(e_gen[finite], q)) for q in (0.1, 0.5, 0.9)}
        if finite.any() else None,
        "sample_energy_finite_fraction": float(finite.mean()),
        "fraction_any_wrong_handedness": float(wrong_handedness(x, system).any(axis=1).mean()),
        "equivariance_error_by_t": equivariance_by_time(gen, md[:256]),
    }
    (out / "samples_summary.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
