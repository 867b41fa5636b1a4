"""Internal coordinates on real ala3 MD frames, float64, against independent truths: mdtraj's distances, angles
and dihedrals; autograd Jacobians of the placement (full 3N x 3N with a rigid motion, and the 3N - 6 canonical
frame); a Gram-Schmidt canonical frame; C-alpha chirality; a Gaussian density pushed through and back; finite
differences of the torsion bijection; flagged bad geometry."""
import json

import mdtraj
import numpy as np
import pytest
import torch
from torch.func import jacfwd, vmap

from rexmol.geometry import chirality_centres, chirality_signs, wrong_handedness
from rexmol.internal_coordinates import (
    InternalCoordinates,
    Standardisation,
    branches_from_normals,
    circle_from_line,
    circle_log_derivative,
    fit_standardisation,
    internal_values,
    line_from_circle,
    random_orientation,
)
from rexmol.mddata import load_frames
from rexmol.systems import load_system
from rexmol.models.space import InternalSpace
from rexmol.zmatrix import build_zmatrix, with_rotor_symmetry

DATA = "data/ala3"


@pytest.fixture(scope="module")
def setup():
    system = load_system("ala3")
    zm = build_zmatrix(system)
    train = load_frames(DATA, "train", stride=40)  # 2,000 frames
    test = torch.tensor(load_frames(DATA, "test", max_frames=6), dtype=torch.float64)
    std = fit_standardisation(train, zm)
    return system, zm, train, test, InternalCoordinates(zm, std)


def canonical_frame(x: np.ndarray, order: np.ndarray) -> np.ndarray:
    """Gram-Schmidt: order[0] at 0, order[1] on +x, order[2] in the xy plane with y > 0 (a proper rotation)."""
    x = x - x[:, order[:1]]
    ex = x[:, order[1]] / np.linalg.norm(x[:, order[1]], axis=-1, keepdims=True)
    v = x[:, order[2]] - (x[:, order[2]] * ex).sum(-1, keepdims=True) * ex
    ey = v / np.linalg.norm(v, axis=-1, keepdims=True)
    rot = np.stack([ex, ey, np.cross(ex, ey)], 1)  # rows: new axes
    return np.einsum("bij,bnj->bni", rot, x)


def pairwise(x: torch.Tensor) -> torch.Tensor:
    return torch.linalg.vector_norm(x[:, :, None] - x[:, None], dim=-1)


def test_raw_values_match_mdtraj(setup):
    system, zm, _, test, _ = setup
    bond, angle, torsion = (v.numpy() for v in internal_values(test, zm))
    traj = mdtraj.Trajectory(test.numpy(), system.mdtraj_topology)
    b, a, t = zm.order[1:], zm.order[2:], zm.order[3:]
    assert np.allclose(mdtraj.compute_distances(traj, np.stack([b, zm.bond[b]], 1)), bond[:, b], atol=1e-6)
    assert np.allclose(mdtraj.compute_angles(traj, np.stack([a, zm.bond[a], zm.angle[a]], 1)), angle[:, a], atol=1e-5)
    quads = np.stack([zm.torsion[t], zm.angle[t], zm.bond[t], t], 1)
    assert np.allclose(mdtraj.compute_dihedrals(traj, quads, periodic=False), torsion[:, t], atol=1e-5)
    assert not np.any(bond[:, zm.order[0]]) and not np.any(torsion[:, zm.order[:3]])


def scatter_valid(zv: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """z [N, 3] with the valid slots (mask True, row-major) filled from zv [3N - 6], zeros elsewhere."""
    idx = torch.nonzero(mask.reshape(-1)).squeeze(1)
    return torch.zeros(mask.numel(), dtype=zv.dtype).scatter(0, idx, zv).reshape(mask.shape)


def full_map(ic, mask, branches=None):
    """(z_valid [3N-6], rigid (rotation vector, translation) [6]) -> x [3N]: x = (1 + [w]x) x_canonical(z) + t,
    which has the Jacobian of exp([w]x) x_canonical + t at w = 0 (where the test evaluates it); ``branches``
    [1, S] of the symmetric rotors, held fixed."""

    def f(zv, rigid):
        z = scatter_valid(zv, mask)
        xc = ic.decode(z[None], branches)[0][0]
        w, t = rigid[:3], rigid[3:]
        zero = torch.zeros((), dtype=zv.dtype)
        k = torch.stack([torch.stack([zero, -w[2], w[1]]), torch.stack([w[2], zero, -w[0]]),
                         torch.stack([-w[1], w[0], zero])])
        return (xc + xc @ k.T + t).reshape(-1)

    return f


def test_log_det_equals_autograd_full_jacobian(setup):
    """3N x 3N Jacobian of (z, rigid motion) -> x at the identity: its log|det| is log|det dx/dz| on the full
    Cartesian measure (Haar measure = d omega at the identity), with no constant."""
    _, zm, _, test, ic = setup
    mask = torch.tensor(zm.mask)
    z, log_det, flags = ic.encode(test[:3])
    assert not flags.any()
    f = full_map(ic, mask)
    for b in range(3):
        zv, rigid = z[b][mask], torch.zeros(6, dtype=torch.float64)
        jac = torch.cat([jacfwd(f, argnums=0)(zv, rigid), jacfwd(f, argnums=1)(zv, rigid)], 1)
        assert jac.shape == (99, 99)
        assert abs(torch.linalg.slogdet(jac)[1] - log_det[b]) <= 1e-10


def test_log_det_equals_canonical_frame_jacobian_plus_orbit_volume(setup):
    """The (3N-6) x (3N-6) Jacobian of z -> the Cartesian coordinates the canonical frame leaves free misses
    exactly the rotation-orbit volume r1^2 * y2 (x of order[1] squared times y of order[2])."""
    _, zm, _, test, ic = setup
    mask = torch.tensor(zm.mask)
    o = zm.order
    free = torch.ones(zm.n_atoms, 3, dtype=torch.bool)
    free[o[0]] = False
    free[o[1], 1:] = False
    free[o[2], 2] = False
    z, log_det, _ = ic.encode(test[3:6])

    def g(zv):
        zz = scatter_valid(zv, mask)
        return ic.decode(zz[None])[0][0][free]

    for b in range(3):
        x = ic.decode(z[b : b + 1])[0][0]
        jac = jacfwd(g)(z[b][mask])
        orbit = 2 * torch.log(x[o[1], 0]) + torch.log(x[o[2], 1])
        assert abs(torch.linalg.slogdet(jac)[1] + orbit - log_det[b]) <= 1e-10


def test_round_trip_on_md_frames_in_canonical_frame(setup):
    system, zm, _, test, ic = setup
    z, log_det, flags = ic.encode(test)
    x, log_det_back, flags_back = ic.decode(z)
    assert not flags.any() and not flags_back.any()
    truth = torch.tensor(canonical_frame(test.numpy(), zm.order))
    assert (x - truth).abs().max() <= 1e-10
    assert (pairwise(x) - pairwise(test)).abs().max() <= 1e-10
    assert (log_det - log_det_back).abs().max() <= 1e-10
    z2, _, _ = ic.encode(x)
    assert (z2 - z).abs().max() <= 1e-10
    # C-alpha handedness preserved
    centres = chirality_centres(system)
    assert np.array_equal(chirality_signs(x.numpy(), centres), chirality_signs(test.numpy(), centres))
    assert not wrong_handedness(x, system).any()
    # invalid slots are zero; the fitted training z is standardised
    assert not z[:, ~torch.tensor(zm.mask)].any()


def test_standardisation_and_torsion_cuts(setup):
    system, zm, train, _, ic = setup
    z, _, flags = ic.encode(torch.tensor(train, dtype=torch.float64))
    assert not flags.any()
    valid = z[:, torch.tensor(zm.mask)]
    assert valid.mean(0).abs().max() < 1e-10 and (valid.std(0, correction=0) - 1).abs().max() < 1e-10
    std = ic.standardisation
    _, _, torsion = internal_values(torch.tensor(train, dtype=torch.float64), zm)
    for i in np.flatnonzero(zm.rotor):
        # the cut is among the least populated 10-degree windows of the raw torsion (cut stored as the cut)
        centres = np.linspace(-np.pi, np.pi, 36, endpoint=False)
        dist = lambda c: np.abs(np.angle(np.exp(1j * (torsion[:, i].numpy() - c))))
        counts = np.array([(dist(c) < np.radians(5)).sum() for c in centres])
        assert (dist(std.torsion_cut[i]) < np.radians(5)).sum() <= np.quantile(counts, 0.2)
    atoms = list(system.topology.atoms())
    omega = [i for i in np.flatnonzero(zm.rotor) if atoms[i].name == "CA"]
    assert len(omega) == 2  # omega is trans: its cut lies far from 180 degrees
    assert all(abs(np.angle(np.exp(1j * (std.torsion_cut[i] - np.pi)))) > np.pi / 2 for i in omega)


def test_gaussian_pushed_to_x_and_back_gives_same_log_q(setup):
    _, zm, _, _, ic = setup
    mask = torch.tensor(zm.mask)
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(16, zm.n_atoms, 3, generator=gen, dtype=torch.float64) * mask
    log_pz = lambda zz: (-0.5 * zz[:, mask] ** 2 - 0.5 * np.log(2 * np.pi)).sum(-1)
    x, log_det, flags = ic.decode(z)
    assert not flags.any()
    log_q = log_pz(z) - log_det
    z2, log_det2, flags2 = ic.encode(random_orientation(x, torch.Generator().manual_seed(1)) + 0.3)
    assert not flags2.any()
    assert (z2 - z).abs().max() <= 1e-10
    assert (log_pz(z2) - log_det2 - log_q).abs().max() <= 1e-10


def test_torsion_bijection_against_finite_differences():
    u = torch.linspace(-4, 4, 41, dtype=torch.float64)
    h = 1e-4
    fd = (circle_from_line(u + h) - circle_from_line(u - h)) / (2 * h)
    assert (torch.log(fd) - circle_log_derivative(u)).abs().max() < 1e-7
    assert (line_from_circle(circle_from_line(u)) - u).abs().max() < 1e-10
    assert circle_from_line(torch.tensor([-40.0, 40.0], dtype=torch.float64)).abs().max() <= np.pi
    assert (fd > 0).all()


def test_float32_vmap_and_json(setup):
    _, zm, _, test, ic = setup
    z, log_det, _ = ic.encode(test)
    x32, ld32, flags32 = ic.decode(z.float())
    assert x32.dtype == torch.float32 and ld32.dtype == torch.float32 and not flags32.any()
    assert (pairwise(x32).double() - pairwise(test)).abs().max() < 1e-4
    assert ((ld32.double() - log_det) / log_det).abs().max() < 1e-5
    per_sample = vmap(lambda zz: ic.decode(zz[None])[0][0])(z)
    assert (per_sample - ic.decode(z)[0]).abs().max() < 1e-13
    again = InternalCoordinates(zm, Standardisation.from_dict(json.loads(json.dumps(ic.standardisation.to_dict()))))
    assert torch.equal(again.encode(test)[0], z)
    # invalid slots are ignored on input
    garbage = z.clone()
    garbage[:, ~torch.tensor(zm.mask)] = float("nan")
    x_g, _, flags_g = ic.decode(garbage)
    assert torch.equal(x_g, ic.decode(z)[0]) and not flags_g.any()


def test_bad_input_is_flagged_or_rejected(setup):
    _, zm, train, test, ic = setup
    with pytest.raises(ValueError, match=r"\[B, 33, 3\]"):
        ic.encode(test[:, :32])
    with pytest.raises(ValueError, match=r"\[B, 33, 3\]"):
        ic.encode(test[0])
    with pytest.raises(ValueError, match="shape"):
        ic.decode(torch.zeros(2, 33, 2, dtype=torch.float64))
    with pytest.raises(ValueError, match="F >= 2"):
        fit_standardisation(train[:1], zm)
    with pytest.raises(ValueError, match="non-finite"):
        fit_standardisation(np.where(np.arange(33)[None, :, None] == 5, np.nan, train[:4]), zm)
    x = test[:4].clone()
    i = int(zm.order[10])
    j, k = int(zm.bond[i]), int(zm.angle[i])
    x[1, 3] = float("nan")
    x[2, i] = x[2, j] + 0.1 * (x[2, j] - x[2, k])  # i, j, k collinear (angle pi)
    x[3, i] = x[3, j]  # zero bond
    z, log_det, flags = ic.encode(x)
    assert flags.tolist() == [False, True, True, True]
    # decoding an angle at pi is flagged too
    z_bad = ic.encode(test[:2])[0]
    a = int(zm.order[5])
    z_bad[1, a, 1] = (np.pi - ic.standardisation.angle_mean[a]) / ic.standardisation.angle_std[a]
    assert ic.decode(z_bad)[2].tolist() == [False, True]
    # and so is a negative (or zero) decoded bond, where x, log_det are finite but the map is not injective
    z_neg = ic.encode(test[:2])[0]
    z_neg[0, a, 0] = (-0.05 - ic.standardisation.bond_mean[a]) / ic.standardisation.bond_std[a]
    x_neg, ld_neg, flags_neg = ic.decode(z_neg)
    assert torch.isfinite(x_neg).all() and torch.isfinite(ld_neg).all() and flags_neg.tolist() == [True, False]


def test_random_orientation_is_haar_rigid_and_centred():
    x = torch.tensor([[[1.0, 0, 0], [0, 1, 0], [0, 0, 1], [-1, -1, -1]]], dtype=torch.float64).expand(20000, 4, 3)
    y = random_orientation(x, torch.Generator().manual_seed(0))
    rot = y[:, :3].transpose(1, 2)  # columns: images of the axes
    assert (rot @ rot.transpose(1, 2) - torch.eye(3, dtype=torch.float64)).abs().max() < 1e-12
    assert (torch.linalg.det(rot) - 1).abs().max() < 1e-12
    assert rot.mean(0).abs().max() < 0.02 and ((rot**2).mean(0) - 1 / 3).abs().max() < 0.02
    assert y.mean(1).abs().max() < 1e-15


# ---- symmetric rotors (methyl, NH3+, carboxylate) -----------------------------------------------------------
@pytest.fixture(scope="module")
def symmetric(setup):
    system, _, train, test, _ = setup
    zm = with_rotor_symmetry(build_zmatrix(system), system)
    return zm, InternalCoordinates(zm, fit_standardisation(train, zm)), test


def test_symmetric_rotors_are_found_from_the_force_field():
    names = {}
    for name in ("ala3", "ala2"):
        system = load_system(name)
        zm = with_rotor_symmetry(build_zmatrix(system), system)
        atoms = list(system.topology.atoms())
        names[name] = sorted((f"{atoms[i].residue.name}{atoms[i].residue.index}:{atoms[i].name}", int(zm.symmetry[i]))
                             for i in zm.symmetric)
        back = type(zm).from_dict(json.loads(json.dumps(zm.to_dict())))
        assert np.array_equal(back.symmetry, zm.symmetry)
        assert "symmetry" not in build_zmatrix(system).to_dict()  # files without symmetric rotors are unchanged
    # three methyls and NH3+ (3-fold), the C-terminal carboxylate (2-fold); the capped ala2 has three methyls
    assert names["ala3"] == [("ALA0:H", 3), ("ALA0:HB1", 3), ("ALA1:HB1", 3), ("ALA2:HB1", 3), ("ALA2:O", 2)]
    assert [s for _, s in names["ala2"]] == [3, 3, 3]
    zm = build_zmatrix(load_system("ala3"))
    bad = np.ones(zm.n_atoms, dtype=np.int64)
    bad[np.flatnonzero(~zm.rotor)[-1]] = 3  # a sibling torsion cannot be symmetric
    with pytest.raises(ValueError, match="only for rotors"):
        type(zm)(order=zm.order, bond=zm.bond, angle=zm.angle, torsion=zm.torsion, rotor=zm.rotor, symmetry=bad)


def test_symmetric_round_trip_and_log_det_on_md_frames(symmetric):
    """x -> (z, branches) -> x at round-off; the symmetric rotors' torsions are fitted on s * phi (one mode)."""
    zm, ic, test = symmetric
    z, log_det, flags = ic.encode(test)
    k = ic.branches(test)
    assert k.shape == (len(test), len(zm.symmetric)) and k.dtype == torch.int64
    x, log_det_back, flags_back = ic.decode(z, k)
    assert not flags.any() and not flags_back.any()
    assert (x - torch.tensor(canonical_frame(test.numpy(), zm.order))).abs().max() <= 1e-10
    assert (log_det - log_det_back).abs().max() <= 1e-10
    _, _, torsion = internal_values(test, zm)
    for i in zm.symmetric:  # psi = s phi (mod 2 pi) is what the standardisation sees
        s = zm.symmetry[i]
        psi = ic.standardisation.torsion_cut[i] - np.pi + circle_from_line(
            ic.standardisation.torsion_mean[i] + ic.standardisation.torsion_std[i] * z[:, i, 2])
        assert np.allclose(np.angle(np.exp(1j * (psi.numpy() - s * torsion[:, i].numpy()))), 0, atol=1e-10)
    with pytest.raises(ValueError, match="needs branches"):
        ic.decode(z)
    with pytest.raises(ValueError, match=r"in \[0, s\)"):
        ic.decode(z, k + 3)


def test_symmetric_log_det_is_autograd_jacobian_plus_branch_probability(symmetric):
    """dphi / dpsi = 1 / s enters the Jacobian; the branch probability 1 / s cancels it in the density, so the
    transform's log_det is log|det J| + sum log s."""
    zm, ic, test = symmetric
    mask = torch.tensor(zm.mask)
    z, log_det, _ = ic.encode(test[:2])
    k = ic.branches(test[:2])
    sum_log_s = float(np.log(zm.symmetry[zm.symmetric]).sum())
    for b in range(2):
        f = full_map(ic, mask, k[b : b + 1])
        zv, rigid = z[b][mask], torch.zeros(6, dtype=torch.float64)
        jac = torch.cat([jacfwd(f, argnums=0)(zv, rigid), jacfwd(f, argnums=1)(zv, rigid)], 1)
        assert abs(torch.linalg.slogdet(jac)[1] + sum_log_s - log_det[b]) <= 1e-10


def test_symmetric_density_integrates_to_one(setup, symmetric):
    """Monte Carlo with an independent proposal: E_r[q(x) / r(x)] = 1 for r the plain (non-symmetric) density.
    A missing branch probability or dphi/dpsi would make it 162 or 1/162 (ala3: 3^4 * 2); measured 1.02 +- 0.02
    at 10^5 draws."""
    system, _, train, _, plain = setup
    _, ic, _ = symmetric
    mask = torch.tensor(plain.zmatrix.mask)
    n = 30000
    z = torch.randn(n, system.n_atoms, 3, generator=torch.Generator().manual_seed(5), dtype=torch.float64) * mask
    log_pz = lambda zz: (-0.5 * zz[:, mask] ** 2 - 0.5 * np.log(2 * np.pi)).sum(-1)
    x, log_det_r, flags = plain.decode(z)
    z_q, log_det_q, flags_q = ic.encode(x)
    ok = ~(flags | flags_q)
    assert ok.float().mean() > 0.999
    w = torch.exp(log_pz(z_q) - log_det_q - log_pz(z) + log_det_r)[ok].numpy()
    mean, se = w.mean(), w.std() / np.sqrt(len(w))
    print(f"E_r[q / r] = {mean:.3f} +- {se:.3f}")
    assert se < 0.06 and abs(mean - 1) < max(5 * se, 0.1)


def test_branches_from_normals_are_uniform_independent_and_reproducible():
    normals = torch.randn(60000, 6, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    radices = [2, 3, 3]
    k = branches_from_normals(normals, radices)
    joint = np.zeros((2, 3, 3))
    np.add.at(joint, tuple(k.numpy().T), 1)
    expected = len(k) / 18
    chi2 = ((joint - expected) ** 2 / expected).sum()
    assert chi2 < 45  # 17 degrees of freedom: P(chi2 > 45) ~ 2e-4
    assert torch.equal(k, branches_from_normals(normals.clone(), radices))
    # more rotors than one normal carries spill into the next; too many is an error, not a wrap
    many = branches_from_normals(normals, [3] * 20)
    assert many.shape == (60000, 20) and len(torch.unique(many[:, 19])) == 3
    with pytest.raises(ValueError, match="spare normal draws"):
        branches_from_normals(normals[:, :1], [3] * 20)


def test_space_draws_branches_from_the_prior_slots_it_discards(setup):
    system, _, train, _, _ = setup
    space = InternalSpace.fit(train, system, rotor_symmetry=True)
    raw = torch.randn(4, system.n_atoms, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    k = space.draw_branches(raw)
    changed = raw.clone()
    changed[:, space.mask] += 1.0  # the projected draw the flow starts from does not decide the branches
    assert torch.equal(space.draw_branches(changed), k)
    assert InternalSpace.fit(train, system).draw_branches(raw) is None
