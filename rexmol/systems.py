"""Load a molecular system (topology + force field + thermodynamic state) from ``systems/<name>/``.

A system folder holds ``topology.pdb`` and ``spec.toml``; the folder is found inside the installed package
``rexmol_systems`` (the repository's ``systems/``), or given as a path. :func:`load_system` is the one way
the rest of rexmol reads a system.
"""
from __future__ import annotations

import functools
import importlib.resources
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

MOLAR_GAS_CONSTANT_KJ = 0.00831446261815324  # kJ/(mol K)
ELEMENTS = ("H", "C", "N", "O", "S", "P")


def systems_root() -> Path:
    """Directory holding the shipped systems (installed package data)."""
    return Path(str(importlib.resources.files("rexmol_systems")))


def available_systems() -> list[str]:
    """Names of the shipped systems."""
    return sorted(p.parent.name for p in systems_root().glob("*/spec.toml"))


@dataclass(frozen=True, eq=False)
class System:
    """A molecular system: topology, positions of the reference frame (nm) and the simulation spec."""

    name: str
    folder: Path
    spec: dict[str, Any] = field(repr=False)

    @property
    def pdb_path(self) -> Path:
        return self.folder / self.spec.get("pdb", "topology.pdb")

    @functools.cached_property
    def _pdb(self):
        import openmm.app as app

        return app.PDBFile(str(self.pdb_path))

    @property
    def topology(self):
        """The OpenMM topology."""
        return self._pdb.topology

    @functools.cached_property
    def positions(self) -> np.ndarray:
        """Reference-frame positions [N, 3] in nm (float64)."""
        import openmm.unit as unit

        return np.asarray(self._pdb.getPositions(asNumpy=True).value_in_unit(unit.nanometer), dtype=np.float64)

    @functools.cached_property
    def mdtraj_topology(self):
        import mdtraj

        return mdtraj.load_topology(str(self.pdb_path))

    @property
    def n_atoms(self) -> int:
        return self.topology.getNumAtoms()

    @property
    def temperature(self) -> float:
        """Temperature in K."""
        return float(self.spec["thermodynamics"]["temperature_K"])

    @property
    def kT(self) -> float:
        """Thermal energy in kJ/mol."""
        return MOLAR_GAS_CONSTANT_KJ * self.temperature

    @property
    def dihedrals(self) -> dict[str, list[list[int]]]:
        """Backbone dihedral atom quadruples (0-based), e.g. ``{"phi": [[i, j, k, l], ...], "psi": [...]}``."""
        return {k: [list(map(int, q)) for q in v] for k, v in self.spec["dihedrals"].items()}

    @property
    def md(self) -> dict[str, Any]:
        """MD protocol (timestep_fs, friction_per_ps, frame_interval_ps, equilibration_ps, ...)."""
        return dict(self.spec.get("md", {}))

    def create_openmm_system(self):
        """A fresh ``openmm.System`` built from the spec's force field, nonbonded method and constraints."""
        import openmm.app as app
        import openmm.unit as unit

        ff = self.spec["forcefield"]
        try:
            forcefield = app.ForceField(*ff["files"])
        except ValueError as err:
            raise ValueError(f"system {self.name!r}: cannot load force field {ff['files']}: {err}") from err
        kwargs: dict[str, Any] = {
            "nonbondedMethod": getattr(app, ff.get("nonbonded_method", "NoCutoff")),
            "constraints": None if ff.get("constraints", "none") == "none" else getattr(app, ff["constraints"]),
            "rigidWater": bool(ff.get("rigid_water", False)),
        }
        if ff.get("nonbonded_method", "NoCutoff") != "NoCutoff":
            kwargs["nonbondedCutoff"] = float(ff["cutoff_nm"]) * unit.nanometer
        try:
            return forcefield.createSystem(self.topology, **kwargs)
        except ValueError as err:
            raise ValueError(
                f"system {self.name!r}: force field {ff['files']} cannot parametrise {self.pdb_path}: {err}"
            ) from err

    def atom_features(self) -> dict[str, np.ndarray]:
        """Integer token features per atom [N]: element, atom name, residue index, residue name, chain position.

        ``atom_name`` ids index :attr:`atom_vocabulary` (sorted unique names of this system).
        """
        atoms = list(self.topology.atoms())
        names = self.atom_vocabulary
        residue_names = sorted({a.residue.name for a in atoms})
        n_res = self.topology.getNumResidues()
        return {
            "element": np.array([ELEMENTS.index(a.element.symbol) for a in atoms], dtype=np.int64),
            "atom_name": np.array([names.index(a.name) for a in atoms], dtype=np.int64),
            "residue_index": np.array([a.residue.index for a in atoms], dtype=np.int64),
            "residue_name": np.array([residue_names.index(a.residue.name) for a in atoms], dtype=np.int64),
            # 0 = N-terminal residue, 1 = interior, 2 = C-terminal residue
            "chain_position": np.array(
                [0 if a.residue.index == 0 else 2 if a.residue.index == n_res - 1 else 1 for a in atoms], dtype=np.int64
            ),
        }

    @property
    def atom_vocabulary(self) -> list[str]:
        return sorted({a.name for a in self.topology.atoms()})


def load_system(name_or_path: str | Path) -> System:
    """Load a shipped system by name (``"ala3"``) or a system folder by path (``spec.toml`` + PDB)."""
    path = Path(name_or_path)
    folder = path if (path / "spec.toml").is_file() else systems_root() / str(name_or_path)
    spec_file = folder / "spec.toml"
    if not spec_file.is_file():
        raise ValueError(f"unknown system {str(name_or_path)!r}; shipped systems: {', '.join(available_systems())}")
    try:
        with open(spec_file, "rb") as fh:
            spec = tomllib.load(fh)
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{spec_file} is not valid TOML: {err}") from err
    system = System(name=spec.get("name", folder.name), folder=folder, spec=spec)
    if not system.pdb_path.is_file():
        raise FileNotFoundError(f"system {system.name!r}: topology {system.pdb_path} is missing")
    check_spec(system, spec_file)
    return system


# [md] entries (all required, the tolerance optional) and whether each must be > 0 (True) or >= 0 (False)
MD_NUMBERS = {"timestep_fs": True, "friction_per_ps": True, "frame_interval_ps": True, "equilibration_ps": False,
              "minimise_tolerance_kj_per_mol_nm": True}
MD_OPTIONAL = ("minimise_tolerance_kj_per_mol_nm",)


def check_spec(system: System, spec_file: Path) -> None:
    """ValueError naming ``spec_file`` and the entry for a spec the rest of rexmol would trip over later:
    non-numeric or non-positive MD numbers or temperature, dihedral quadruples that are not 4 atom indices
    of the topology."""
    def number(section: str, key: str, value: Any, positive: bool) -> None:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and np.isfinite(value)
        if not ok or (value <= 0 if positive else value < 0):
            raise ValueError(f"{spec_file}: [{section}] {key} = {value!r} must be a number "
                             f"{'> 0' if positive else '>= 0'}")

    number("thermodynamics", "temperature_K", system.spec.get("thermodynamics", {}).get("temperature_K"), True)
    for key, positive in MD_NUMBERS.items():
        if key in system.md or key not in MD_OPTIONAL:
            number("md", key, system.md.get(key), positive)
    n_atoms = system.n_atoms
    for name, quads in system.spec.get("dihedrals", {}).items():
        for q in quads if isinstance(quads, list) else [quads]:
            if not (isinstance(q, list) and len(q) == 4 and all(isinstance(i, int) and 0 <= i < n_atoms for i in q)):
                raise ValueError(f"{spec_file}: [dihedrals] {name} entry {q!r} is not 4 atom indices in "
                                 f"[0, {n_atoms}) of {system.pdb_path.name}")
