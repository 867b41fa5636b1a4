"""Generator spaces and the generator file: masked prior against closed forms, Cartesian and internal spaces
(round trips, log-dets, to_dict/from_dict), format-2 save/load for both networks, format-1 files, proposal
decoding (flagged decodes get log q = NaN)."""
import json
import math

import numpy as np
import pytest
import torch

from rexmol.likelihood.priors import MaskedGaussian
from rexmol.mddata import load_frames
from rexmol.models.checkpoint import FORMAT, FORMAT_1, build_network, load_generator, save_generator
from rexmol.models.dit import AtomDiT, DiTConfig
from rexmol.models.hollow import HollowConfig, HollowTransformer
from rexmol.models.space import CartesianSpace, InternalSpace, space_from_dict
from rexmol.proposal import FlowProposal, ProposalSpec
from rexmol.systems import load_system
from rexmol.zmatrix import build_zmatrix

TINY_HOLLOW = {"hidden": 32, "depth": 2, "heads": 2, "mlp_ratio": 2, "tau_hidden": 16}
SHIPPED = "data/ala3/model/generator.pt"


@pytest.fixture(scope="module")
def frames() -> torch.Tensor:
    """200 evenly spaced ala3 MD training frames (nm, float64)."""
    train = load_frames("data/ala3", "train")
    return torch.as_tensor(train[:: len(train) // 200][:200], dtype=torch.float64)


@pytest.fixture(scope="module")
def internal(frames) -> InternalSpace:
    return InternalSpace.fit(frames, load_system("ala3"))


def randomised(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Perturb every weight (zero-initialised heads would give a zero velocity)."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


# ---- masked prior ------------------------------------------------------------------------------------------
def test_masked_gaussian_against_closed_form():
    mask = torch.ones(5, 3, dtype=torch.bool)
    mask[0] = False
    mask[1, 1:] = False
    mask[2, 2] = False
    prior = MaskedGaussian(mask)
    assert prior.dim == 15 - 6 and prior.shape == (5, 3)
    x = prior.sample(64, generator=torch.Generator().manual_seed(0))
    assert (x[:, ~mask] == 0).all() and (x[:, mask] != 0).all()
    expected = torch.distributions.Normal(0.0, 1.0).log_prob(x[:, mask].double()).sum(-1)
    torch.testing.assert_close(prior.log_prob(x), expected, rtol=0, atol=1e-12)
    junk = x.clone()
    junk[:, ~mask] = 7.0  # invalid slots are ignored by log_prob and zeroed by project
    torch.testing.assert_close(prior.log_prob(junk), expected, rtol=0, atol=1e-12)
    assert torch.equal(prior.project(junk), x)
    nan = x.clone()
    nan[:, ~mask] = float("nan")
    assert torch.isfinite(prior.project(nan)).all()
    U = prior.basis(torch.float64)
    assert U.shape == (15, 9)
    torch.testing.assert_close(U.T @ U, torch.eye(9, dtype=torch.float64))
    torch.testing.assert_close(x.reshape(64, -1) @ U, x[:, mask])  # U^T x = the valid slots, in layout order
    with pytest.raises(ValueError, match="boolean mask"):
        MaskedGaussian(torch.ones(5, 3))
    with pytest.raises(ValueError, match="no valid slot"):
        MaskedGaussian(torch.zeros(5, 3, dtype=torch.bool))


# ---- spaces ------------------------------------------------------------------------------------------------
def test_cartesian_space_round_trip_and_log_det(frames):
    space = CartesianSpace(33, 0.15)
    z = space.encode(frames)
    torch.testing.assert_close(z.mean(1), torch.zeros(len(z), 3, dtype=z.dtype), rtol=0, atol=1e-14)
    x, log_det, flags = space.decode(z)
    torch.testing.assert_close(x, frames - frames.mean(1, keepdim=True), rtol=0, atol=1e-14)
    # log|det| of x -> 0.15 x on the 96-dim centred subspace, against the basis-projected Jacobian
    U = space.prior.basis(torch.float64)
    J = U.T @ (0.15 * torch.eye(99, dtype=torch.float64)) @ U
    assert torch.allclose(log_det, torch.linalg.slogdet(J)[1].expand(len(z)), rtol=0, atol=1e-10)
    assert not flags.any()
    bad = z.clone()
    bad[3, 4, 1] = float("nan")
    assert space.decode(bad)[2].tolist() == [i == 3 for i in range(len(z))]
    again = space_from_dict(json.loads(json.dumps(space.to_dict())))
    assert isinstance(again, CartesianSpace) and again.scale == 0.15 and again.n_atoms == 33
    with pytest.raises(ValueError, match="positive number of nm"):
        CartesianSpace(33, 0.0)


def test_internal_space_round_trip_log_det_and_dict(internal, frames):
    z = internal.encode(frames)
    assert z.shape == frames.shape and (z[:, ~internal.mask] == 0).all() and internal.prior.dim == 93
    assert z[:, internal.mask].std() == pytest.approx(1.0, abs=0.15)  # standardised on its own training frames
    x, log_det, flags = internal.decode(z)
    assert not flags.any()
    exact = "donot_use_mm_for_euclid_dist"
    d_in, d_out = torch.cdist(frames, frames, compute_mode=exact), torch.cdist(x, x, compute_mode=exact)  # rigid motion
    assert (d_in - d_out).abs().max() < 1e-10
    _, log_det_encoded, _ = internal.transform.encode(frames)
    torch.testing.assert_close(log_det, log_det_encoded, rtol=0, atol=1e-10)
    again = space_from_dict(json.loads(json.dumps(internal.to_dict())))
    assert isinstance(again, InternalSpace)
    assert torch.equal(again.encode(frames), z)
    assert np.array_equal(again.zmatrix.order, internal.zmatrix.order)
    with pytest.raises(ValueError, match="unknown generator space"):
        space_from_dict({"kind": "polar"})
    collinear = frames[:2].clone()
    o = internal.zmatrix.order
    collinear[0, o[2]] = 2 * collinear[0, o[1]] - collinear[0, o[0]]  # third placed atom on the first bond's line
    with pytest.raises(ValueError, match="1 of 2 frames have near-singular geometry"):
        internal.encode(collinear)


# ---- generator files ---------------------------------------------------------------------------------------
def hollow_ic(internal: InternalSpace, hollow: bool = True) -> HollowTransformer:
    zm = internal.zmatrix
    model = HollowTransformer.for_system(load_system("ala3"), HollowConfig(**TINY_HOLLOW, hollow=hollow), zm.order,
                                         zm.mask, mean_free=False)
    return randomised(model)


@pytest.mark.parametrize("hollow", [True, False])
def test_format_2_internal_hollow_round_trip(internal, tmp_path, hollow):
    model = hollow_ic(internal, hollow)
    path = save_generator(tmp_path / "g.pt", model, system_name="ala3", space=internal, meta={"note": 1})
    payload = torch.load(path, weights_only=False)
    assert payload["format"] == FORMAT and payload["network"]["kind"] == "hollow"
    assert payload["network"]["config"]["hollow"] is hollow and payload["space"]["kind"] == "internal"
    gen = load_generator(path)
    assert gen.network == "hollow" and gen.coordinates == "internal" and gen.meta == {"note": 1}
    assert isinstance(gen.space, InternalSpace) and gen.prior.dim == 93
    x, t = gen.prior.sample(4, generator=torch.Generator().manual_seed(1), dtype=torch.float32), torch.rand(4)
    with torch.no_grad():
        assert torch.equal(gen.model(x, t), model(x, t))
    with pytest.raises(ValueError, match="no Cartesian scale"):
        gen.scale


def test_format_2_network_rebuilt_from_the_stored_zmatrix(internal, tmp_path):
    """The IC network's token order and mask come from the file's Z-matrix: a file whose Z-matrix has another
    placement order cannot load weights meant for a different token layout silently."""
    model = hollow_ic(internal)
    path = save_generator(tmp_path / "g.pt", model, system_name="ala3", space=internal)
    gen = load_generator(path)
    assert torch.equal(gen.model.order.cpu(), torch.as_tensor(internal.zmatrix.order))
    assert torch.equal(gen.model.mask.cpu(), torch.as_tensor(internal.zmatrix.mask))
    payload = torch.load(path, weights_only=False)
    payload["network"]["order"] = payload["network"]["order"][::-1]  # ignored for internal coordinates
    torch.save(payload, tmp_path / "h.pt")
    assert torch.equal(load_generator(tmp_path / "h.pt").model.order.cpu(), torch.as_tensor(internal.zmatrix.order))


def test_format_2_cartesian_hollow_and_dit(tmp_path):
    system = load_system("ala3")
    order = build_zmatrix(system).order
    hollow = randomised(HollowTransformer.for_system(system, HollowConfig(**TINY_HOLLOW), order,
                                                     np.ones((33, 3), bool), mean_free=True))
    gen = load_generator(save_generator(tmp_path / "h.pt", hollow, system_name="ala3", scale=0.2))
    assert gen.network == "hollow" and gen.coordinates == "cartesian" and gen.scale == 0.2
    assert torch.equal(gen.model.order.cpu(), torch.as_tensor(order))
    x, t = gen.prior.sample(3, generator=torch.Generator().manual_seed(2), dtype=torch.float32), torch.rand(3)
    with torch.no_grad():
        assert torch.equal(gen.model(x, t), hollow(x, t))
    dit = randomised(AtomDiT.for_system(system, DiTConfig.from_size("tiny")))
    gen = load_generator(save_generator(tmp_path / "d.pt", dit, system_name="ala3", space=CartesianSpace(33, 0.3)))
    assert gen.network == "dit" and gen.scale == 0.3 and isinstance(gen.model, AtomDiT)
    with pytest.raises(ValueError, match="exactly one of space= or scale="):
        save_generator(tmp_path / "x.pt", dit, system_name="ala3")
    with pytest.raises(ValueError, match="Cartesian coordinates only"):
        build_network(system, {"kind": "dit", "config": dit.config.to_dict()}, mean_free=False)
    with pytest.raises(ValueError, match="unknown network kind"):
        build_network(system, {"kind": "mlp", "config": {}}, mean_free=True)


def test_format_1_files_still_load(tmp_path):
    """The shipped generator (format 1) and a hand-written format-1 file load as Cartesian DiTs."""
    shipped = load_generator(SHIPPED)
    assert torch.load(SHIPPED, weights_only=False)["format"] == FORMAT_1
    assert shipped.network == "dit" and isinstance(shipped.space, CartesianSpace) and shipped.scale > 0
    dit = randomised(AtomDiT.for_system(load_system("ala3"), DiTConfig.from_size("tiny")))
    payload = {"format": FORMAT_1, "system": "ala3", "n_atoms": 33, "model_config": dit.config.to_dict(),
               "state_dict": dit.state_dict(), "scale": 0.25, "output_kind": "velocity", "sigma_min": 0.0, "meta": {}}
    torch.save(payload, tmp_path / "old.pt")
    gen = load_generator(tmp_path / "old.pt")
    assert gen.scale == 0.25 and gen.prior.dim == 96
    x, t = gen.prior.sample(2, generator=torch.Generator().manual_seed(0), dtype=torch.float32), torch.rand(2)
    with torch.no_grad():
        assert torch.equal(gen.model(x, t), dit(x, t))
    torch.testing.assert_close(gen.to_nm(x), 0.25 * x)


# ---- the proposal decodes ----------------------------------------------------------------------------------
class FlagFirst(InternalSpace):
    """The fitted space with sample 0's decode flagged (as near-singular geometry would be)."""

    def decode(self, z, branches=None):
        x, log_det, flags = super().decode(z, branches)
        return x, log_det, flags | (torch.arange(len(z)) == 0)


def test_proposal_decodes_with_log_det_and_nans_flagged(internal, tmp_path):
    model = hollow_ic(internal)
    path = save_generator(tmp_path / "g.pt", model, system_name="ala3", space=internal)
    spec = ProposalSpec(ckpt=str(path), solver="rex-rk4", steps=4, dtype="float64", roundtrip=False)
    gen = load_generator(path)
    proposal = FlowProposal(spec, gen, "sha")
    assert proposal.description["model"] == "Hollow (internal)"
    z = np.random.default_rng(0).standard_normal((3, 33, 3))
    out = proposal(z)
    x0 = proposal.prior.project(torch.as_tensor(z))
    from rexmol.likelihood.flow import sample_with_logq
    from rexmol.solvers import FixedGrid
    ref = sample_with_logq(gen.model, gen.prior, x0, "rex-rk4", FixedGrid.uniform_t(0.0, 0.999, 4),
                           coords=proposal.coords)
    x_nm, log_det, _ = internal.decode(ref.x)
    np.testing.assert_allclose(out.log_q, (ref.logq - log_det).numpy(), rtol=0, atol=1e-9)
    np.testing.assert_allclose(out.x, x_nm.numpy(), rtol=0, atol=1e-12)
    assert out.x.shape == (3, 33, 3) and np.isfinite(out.log_q).all() and math.isnan(out.roundtrip_x[0])
    gen.space = FlagFirst(internal.zmatrix, internal.standardisation)
    flagged = FlowProposal(spec, gen, "sha")(z)
    assert np.isnan(flagged.log_q[0]) and np.array_equal(flagged.log_q[1:], out.log_q[1:])
