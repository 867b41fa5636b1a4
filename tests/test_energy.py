"""The OpenMM energy bridge: kT units, agreement with a direct OpenMM evaluation, pool = serial, failure flags."""
import numpy as np
import openmm
import openmm.app as app
import openmm.unit as unit
import pytest
import torch

from rexmol.energy import OpenMMEnergy, evaluate, evaluate_in_context, make_context
from rexmol.systems import load_system


def noisy_frames(system, n: int, scale: float = 0.003, seed: int = 0) -> np.ndarray:
    """[n, N, 3] nm: the reference frame plus small Gaussian noise (moderate, finite energies)."""
    rng = np.random.default_rng(seed)
    return system.positions[None] + scale * rng.standard_normal((n, system.n_atoms, 3))


def direct_openmm(system, frames: np.ndarray, platform: str) -> tuple[np.ndarray, np.ndarray]:
    """Energies [B] (kJ/mol) and forces [B, N, 3] (kJ/mol/nm) from OpenMM alone, built from the spec's files."""
    ff = system.spec["forcefield"]
    kwargs = {"nonbondedMethod": getattr(app, ff["nonbonded_method"]), "constraints": None}
    if ff["nonbonded_method"] != "NoCutoff":
        kwargs["nonbondedCutoff"] = ff["cutoff_nm"] * unit.nanometer
    omm_system = app.ForceField(*ff["files"]).createSystem(app.PDBFile(str(system.pdb_path)).topology, **kwargs)
    context = openmm.Context(omm_system, openmm.VerletIntegrator(1.0 * unit.femtosecond),
                             openmm.Platform.getPlatformByName(platform))
    energies, forces = [], []
    for x in frames:
        context.setPositions([openmm.Vec3(*map(float, r)) for r in x] * unit.nanometer)
        state = context.getState(getEnergy=True, getForces=True)
        energies.append(state.getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole))
        forces.append(state.getForces(asNumpy=True).value_in_unit(unit.kilojoule_per_mole / unit.nanometer))
    return np.array(energies), np.array(forces)


@pytest.mark.parametrize("name", ["ala2", "ala3", "ala3-sbg"])
def test_energies_and_forces_equal_direct_openmm_in_kT(name):
    """Same platform on both sides; the direct side uses OpenMM's own gas constant and Quantity units."""
    system = load_system(name)
    frames = noisy_frames(system, 6)
    kT = (unit.MOLAR_GAS_CONSTANT_R * system.temperature * unit.kelvin).value_in_unit(unit.kilojoule_per_mole)
    platform = {"ala2": "Reference", "ala3": "Reference", "ala3-sbg": "CPU"}[name]  # the specs' measured choices
    assert OpenMMEnergy(system).platform == platform
    e_kj, f_kj = direct_openmm(system, frames, platform)
    result = evaluate(frames, name, forces=True)
    assert result.energy.dtype == np.float64 and result.energy.shape == (6,)
    assert not result.failed.any()
    np.testing.assert_allclose(result.energy, e_kj / kT, rtol=1e-6, atol=0)
    np.testing.assert_allclose(result.forces, f_kj / kT, rtol=1e-6, atol=1e-6 * np.abs(f_kj / kT).max())


def test_pool_equals_serial_exactly():
    system = load_system("ala3")
    frames = noisy_frames(system, 9)
    frames[4, 3, 0] = np.nan
    serial = OpenMMEnergy(system).evaluate(frames, forces=True)
    with OpenMMEnergy(system, workers=2) as pool:
        pooled = pool.evaluate(frames, forces=True)
    np.testing.assert_array_equal(pooled.energy, serial.energy)
    np.testing.assert_array_equal(pooled.failed, serial.failed)
    np.testing.assert_array_equal(pooled.forces, serial.forces)
    assert serial.failed.tolist() == [i == 4 for i in range(9)]


def test_failed_samples_are_inf_and_flagged_never_zero():
    system = load_system("ala3")
    frames = noisy_frames(system, 5)
    frames[1, 0, 2] = np.nan
    frames[2, 7, 1] = -np.inf
    frames[3, 1] = frames[3, 0]  # two atoms on top of each other: OpenMM returns a non-finite energy
    result = OpenMMEnergy(system).evaluate(frames, forces=True)
    assert result.failed.tolist() == [False, True, True, True, False]
    assert result.n_failed == 3
    assert np.isposinf(result.energy[1:4]).all()
    assert np.isfinite(result.energy[[0, 4]]).all() and (result.energy[[0, 4]] != 0).all()
    assert np.isnan(result.forces[1:4]).all() and np.isfinite(result.forces[[0, 4]]).all()


def test_openmm_exception_is_a_flagged_failure():
    """A real OpenMM error (positions of the wrong length for the context) is caught per sample."""
    ala2, ala3 = load_system("ala2"), load_system("ala3")
    context = make_context(ala2.create_openmm_system(), "Reference")
    energy, failed, _ = evaluate_in_context(context, noisy_frames(ala3, 2), forces=False)
    assert failed.all() and np.isposinf(energy).all()


def test_bgflow_style_interface_with_torch():
    system = load_system("ala2")
    bridge = OpenMMEnergy(system)
    x = torch.tensor(noisy_frames(system, 3), dtype=torch.float32).reshape(3, -1)  # [B, 3N], bgflow layout
    e = bridge.energy(x)
    assert isinstance(e, torch.Tensor) and e.shape == (3, 1) and e.dtype == torch.float64
    np.testing.assert_array_equal(e[:, 0].numpy(), bridge.evaluate(x).energy)
    f = bridge.force(x)
    assert f.shape == x.shape and f.dtype == torch.float64
    assert bridge.dim == 3 * system.n_atoms


def test_forces_are_minus_the_energy_gradient_in_kT_per_nm():
    system = load_system("ala2")
    bridge = OpenMMEnergy(system)
    x = noisy_frames(system, 1)
    f = bridge.evaluate(x, forces=True).forces[0]
    h = 1e-5
    for atom, axis in [(0, 0), (8, 1), (15, 2)]:
        plus, minus = x.copy(), x.copy()
        plus[0, atom, axis] += h
        minus[0, atom, axis] -= h
        e = bridge.evaluate(np.concatenate([plus, minus])).energy
        assert f[atom, axis] == pytest.approx(-(e[0] - e[1]) / (2 * h), rel=1e-4, abs=1e-3)


def test_bad_inputs_raise_clear_errors():
    system = load_system("ala3")
    bridge = OpenMMEnergy(system)
    x = noisy_frames(system, 2)
    with pytest.raises(ValueError, match="32 atoms, the system has 33"):
        bridge.evaluate(x[:, :32])
    with pytest.raises(ValueError, match=r"shape \[B, 33, 3\]"):
        bridge.evaluate(x[0])
    with pytest.raises(ValueError, match="must be in nm"):
        bridge.evaluate(x * 1000.0)
    with pytest.raises(ValueError, match="unknown system 'ala4'"):
        evaluate(x, "ala4")
    with pytest.raises(ValueError, match="platform 'Quantum' is not available"):
        OpenMMEnergy(system, platform="Quantum")
    assert OpenMMEnergy(system, platform="auto").platform in ("CUDA", "Reference")
    with pytest.raises(ValueError, match="workers"):
        OpenMMEnergy(system, workers=-1)
