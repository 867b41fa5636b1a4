"""OpenMM energy bridge: potential energies (and forces) of a batch of conformations, in units of kT.

``evaluate(x, system)`` takes coordinates [B, N, 3] in nm (torch or numpy; [B, 3N] is accepted too) and returns
an :class:`EnergyResult` with float64 energies [B] in kT (kJ/mol divided by RT at the system's temperature),
optional forces [B, N, 3] in kT/nm, and a per-sample ``failed`` flag. A sample with non-finite coordinates, a
non-finite energy, or an OpenMM exception is *failed*: its energy is +inf (weight zero), never 0.

:class:`OpenMMEnergy` holds one OpenMM context in-process (``workers=0``) or a pool of worker processes, each
with its own context; both paths run the same per-sample code and give identical numbers. It also offers the
bgflow-style ``energy(x) -> [B, 1]`` and ``force(x) -> [B, N, 3]`` in kT, returning torch when given torch.

Platform: by default the one the system's spec names after measurement (``evaluation/bench_platforms.py``):
Reference for ala2/ala3 with the native GBSAOBCForce (1.7-3x faster than CPU per energy at this size), CPU for
ala3-sbg's CustomGBForce (~5x faster than Reference); ``"auto"`` takes CUDA where there is a GPU.
"""
from __future__ import annotations

import atexit
import math
import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from rexmol.geometry import as_numpy_coordinates

if TYPE_CHECKING:
    import openmm

    from rexmol.systems import System

MAX_ABS_COORDINATE_NM = 100.0


@dataclass(frozen=True)
class EnergyResult:
    """Energies of a batch: ``energy`` [B] float64 in kT (+inf where failed), ``failed`` [B] bool,
    ``forces`` [B, N, 3] float64 in kT/nm (NaN where failed) or None."""

    energy: np.ndarray
    failed: np.ndarray
    forces: np.ndarray | None = None

    @property
    def n_failed(self) -> int:
        return int(self.failed.sum())


def choose_platform(name: str | None, system: System) -> str:
    """Resolve a platform name. None: the system's measured choice (spec key ``platform``, default Reference);
    ``"auto"``: CUDA where available, else that choice. ValueError if unknown or not available."""
    import openmm

    available = [openmm.Platform.getPlatform(i).getName() for i in range(openmm.Platform.getNumPlatforms())]
    preferred = str(system.spec.get("platform", "Reference"))
    if name is None:
        name = preferred
    elif name == "auto":
        return "CUDA" if "CUDA" in available else preferred
    if name not in available:
        raise ValueError(f"OpenMM platform {name!r} is not available here; available: {', '.join(available)}")
    return name


def make_context(openmm_system: openmm.System, platform: str) -> openmm.Context:
    """A context for single-point evaluations (dummy Verlet integrator; CPU platform limited to one thread)."""
    import openmm

    properties = {"Threads": "1"} if platform == "CPU" else {}
    integrator = openmm.VerletIntegrator(0.001)
    return openmm.Context(openmm_system, integrator, openmm.Platform.getPlatformByName(platform), properties)


def evaluate_in_context(
    context: openmm.Context, x: np.ndarray, forces: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Energies [b] in kJ/mol, failed [b] bool and forces [b, N, 3] kJ/mol/nm (or None) for x [b, N, 3] nm.

    The one per-sample loop used by both the in-process and the worker path.
    """
    import openmm

    b, n = x.shape[0], x.shape[1]
    energy = np.full(b, np.inf)
    failed = np.zeros(b, dtype=bool)
    force = np.full((b, n, 3), np.nan) if forces else None
    finite = np.isfinite(x).all(axis=(1, 2))
    for i in range(b):
        if not finite[i]:
            failed[i] = True
            continue
        try:
            context.setPositions(x[i])
            state = context.getState(getEnergy=True, getForces=forces)
            e = state.getPotentialEnergy()._value  # kJ/mol, OpenMM's internal unit
            if forces:
                force[i] = state.getForces(asNumpy=True)._value
        except openmm.OpenMMException:
            failed[i] = True
            continue
        if math.isfinite(e):
            energy[i] = e
        else:
            failed[i] = True
    if forces:
        failed |= ~np.isfinite(force).all(axis=(1, 2))
        force[failed] = np.nan
    energy[failed] = np.inf
    return energy, failed, force


# ------------------------------------------------------------------------------------------- worker side

_WORKER_CONTEXT: openmm.Context | None = None


def _worker_init(system_xml: str, platform: str) -> None:
    import openmm

    global _WORKER_CONTEXT
    _WORKER_CONTEXT = make_context(openmm.XmlSerializer.deserialize(system_xml), platform)


def _worker_evaluate(x: np.ndarray, forces: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    assert _WORKER_CONTEXT is not None, "worker not initialised"
    return evaluate_in_context(_WORKER_CONTEXT, x, forces)


# ------------------------------------------------------------------------------------------- front end


class OpenMMEnergy:
    """Energies of a system's conformations in kT, in-process (``workers=0``) or over a process pool.

    ``system``: a :class:`~rexmol.systems.System` or a shipped system's name. ``platform``: an OpenMM platform
    name, ``"auto"`` (CUDA if present) or None (the system's spec choice). ``workers``: number of worker
    processes (0: evaluate in this process). The pool starts on first use (``spawn``: a script that uses it
    needs the usual ``if __name__ == "__main__":`` guard); :meth:`close` (or ``with``) stops it.
    """

    def __init__(self, system: System | str, *, platform: str | None = None, workers: int = 0):
        from rexmol.systems import load_system

        if workers < 0:
            raise ValueError(f"workers must be >= 0, got {workers}")
        self.system = load_system(system) if isinstance(system, str) else system
        self.platform = choose_platform(platform, self.system)
        self.workers = workers
        self.kT = self.system.kT  # kJ/mol
        self._openmm_system = self.system.create_openmm_system()
        self._context: openmm.Context | None = None
        self._pool: ProcessPoolExecutor | None = None

    @property
    def n_atoms(self) -> int:
        return self.system.n_atoms

    @property
    def dim(self) -> int:
        """Number of coordinates (3N), as bgflow's ``Energy.dim``."""
        return 3 * self.n_atoms

    def check_coordinates(self, x: Any) -> np.ndarray:
        """``x`` as float64 [B, N, 3] nm; ValueError on a wrong shape/atom count or values > 100 nm (wrong units)."""
        xyz = as_numpy_coordinates(x, self.n_atoms)
        finite = np.isfinite(xyz)
        largest = float(np.abs(xyz[finite]).max()) if finite.any() else 0.0
        if largest > MAX_ABS_COORDINATE_NM:
            raise ValueError(
                f"coordinates reach {largest:.4g} nm (> {MAX_ABS_COORDINATE_NM:g} nm): positions must be in nm "
                f"(Angstrom or normalised units?)"
            )
        return xyz

    def evaluate(self, x: Any, forces: bool = False) -> EnergyResult:
        """Energies [B] in kT (and forces [B, N, 3] in kT/nm) of coordinates [B, N, 3] in nm."""
        xyz = self.check_coordinates(x)
        if self.workers == 0 or xyz.shape[0] <= 1:
            energy, failed, force = evaluate_in_context(self._local_context(), xyz, forces)
        else:
            energy, failed, force = self._evaluate_pool(xyz, forces)
        energy = energy / self.kT
        energy[failed] = np.inf
        if force is not None:
            force = force / self.kT
        return EnergyResult(energy=energy, failed=failed, forces=force)

    def energy(self, x: Any) -> Any:
        """bgflow-style energies [B, 1] in kT (float64; torch on ``x``'s device when ``x`` is torch)."""
        return _like(x, self.evaluate(x).energy[:, None])

    def force(self, x: Any) -> Any:
        """bgflow-style forces -dE/dx [B, N, 3] in kT/nm (shape of ``x``; torch when ``x`` is torch)."""
        f = self.evaluate(x, forces=True).forces
        return _like(x, f.reshape(np.shape(x)))

    def _local_context(self) -> openmm.Context:
        if self._context is None:
            self._context = make_context(self._openmm_system, self.platform)
        return self._context

    def _evaluate_pool(self, xyz: np.ndarray, forces: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        import openmm

        if self._pool is None:
            xml = openmm.XmlSerializer.serialize(self._openmm_system)
            self._pool = ProcessPoolExecutor(
                max_workers=self.workers,
                mp_context=multiprocessing.get_context("spawn"),
                initializer=_worker_init,
                initargs=(xml, self.platform),
            )
            atexit.register(self.close)
        chunks = np.array_split(xyz, min(4 * self.workers, xyz.shape[0]))  # a few per worker: load balance
        try:
            parts = list(self._pool.map(_worker_evaluate, chunks, [forces] * len(chunks)))
        except BrokenProcessPool as err:
            self.close()
            raise RuntimeError(f"an energy worker process died ({err}); the pool restarts on the next call") from err
        energy = np.concatenate([p[0] for p in parts])
        failed = np.concatenate([p[1] for p in parts])
        force = np.concatenate([p[2] for p in parts]) if forces else None
        return energy, failed, force

    def close(self) -> None:
        """Stop the worker pool (if any)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def __enter__(self) -> OpenMMEnergy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _like(x: Any, values: np.ndarray) -> Any:
    """``values`` as a float64 torch tensor on ``x``'s device if ``x`` is torch, else numpy."""
    if hasattr(x, "detach"):
        import torch

        return torch.as_tensor(values, dtype=torch.float64, device=x.device)
    return values


_BRIDGES: dict[tuple[Any, str | None, int], OpenMMEnergy] = {}


def evaluate(
    x: Any, system: System | str, *, forces: bool = False, platform: str | None = None, workers: int = 0
) -> EnergyResult:
    """Energies [B] in kT (float64; +inf and ``failed`` for bad samples) of coordinates [B, N, 3] in nm.

    Bridges (contexts, worker pools) are cached per (system name or object, platform, workers) for the life of
    the process; see :class:`OpenMMEnergy` for the arguments.
    """
    key = (system, platform, workers)
    if key not in _BRIDGES:
        _BRIDGES[key] = OpenMMEnergy(system, platform=platform, workers=workers)
    return _BRIDGES[key].evaluate(x, forces=forces)

