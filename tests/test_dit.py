"""AtomDiT: shapes, mean-free output, torch.func exact trace, graph distances, config errors."""
import numpy as np
import pytest
import torch
from torch.func import jvp, vjp, vmap

from rexmol.models.dit import AtomDiT, DiTConfig, graph_distances
from rexmol.systems import load_system


@pytest.fixture(scope="module")
def system():
    return load_system("ala3")


def random_model(system, dtype=torch.float64, **overrides) -> AtomDiT:
    """A tiny DiT with all weights random (zero-initialised heads would make every check trivial)."""
    torch.manual_seed(0)
    model = AtomDiT.for_system(system, DiTConfig.from_size("tiny", **overrides)).to(dtype)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.3 * torch.randn_like(p))
    return model


def test_shapes_and_mean_free_output(system):
    model = random_model(system)
    x = torch.randn(5, 33, 3, dtype=torch.float64) + 3.0  # not centred: the model centres its input
    t = torch.rand(5, dtype=torch.float64)
    out = model(x, t)
    assert out.shape == (5, 33, 3)
    assert out.mean(dim=1).abs().max() < 1e-14
    assert out.abs().mean() > 0.1
    torch.testing.assert_close(model(x.reshape(5, 99), t), out.reshape(5, 99), rtol=0, atol=1e-12)
    torch.testing.assert_close(model(x[2], t[2]), out[2], rtol=0, atol=1e-12)
    torch.testing.assert_close(model(x[2].reshape(99), float(t[2])), out[2].reshape(99), rtol=0, atol=1e-12)
    # translation invariance follows from centring the input
    torch.testing.assert_close(model(x + torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64), t), out,
                               rtol=0, atol=1e-12)


def test_torch_func_exact_trace_matches_brute_force(system):
    model = random_model(system)
    x = torch.randn(3, 99, dtype=torch.float64)
    t = torch.rand(3, dtype=torch.float64)
    f = lambda z: model(z, t)  # noqa: E731
    basis = torch.eye(99, dtype=torch.float64)[:, None, :].expand(99, 3, 99)
    columns = vmap(lambda v: jvp(f, (x,), (v,))[1])(basis)  # [99 directions, B, 99]
    trace_jvp = torch.einsum("jbj->b", columns)
    _, pull = vjp(f, x)
    rows = vmap(lambda v: pull(v)[0])(basis)
    trace_vjp = torch.einsum("jbj->b", rows)
    jacobian = torch.autograd.functional.jacobian
    brute = torch.stack([
        torch.trace(jacobian(lambda z: model(z, t[b:b + 1]), x[b:b + 1], vectorize=True).reshape(99, 99))
        for b in range(2)
    ])
    torch.testing.assert_close(trace_jvp[:2], brute, rtol=0, atol=1e-12)
    torch.testing.assert_close(trace_vjp[:2], brute, rtol=0, atol=1e-12)
    # per-sample vmap (x [99], t scalar) equals the batched call
    torch.testing.assert_close(vmap(model)(x, t), model(x, t), rtol=0, atol=1e-13)


def test_graph_distances_on_a_chain_and_ala3(system):
    hops = graph_distances(5, [(0, 1), (1, 2), (2, 3)], max_hops=3)
    expected = np.array([[0, 1, 2, 3, 3], [1, 0, 1, 2, 3], [2, 1, 0, 1, 3], [3, 2, 1, 0, 3], [3, 3, 3, 3, 0]])
    np.testing.assert_array_equal(hops, expected)
    bonds = [(b[0].index, b[1].index) for b in system.topology.bonds()]
    hops = graph_distances(system.n_atoms, bonds, max_hops=6)
    assert (hops == 1).sum() == 2 * len(bonds) and (np.diag(hops) == 0).all() and (hops == hops.T).all()


def test_graph_bias_makes_bonded_pairs_matter(system):
    """With the hop table set, attention logits differ by bonded distance even for identical tokens' inputs."""
    model = random_model(system, distance_bias=False)
    bias = model._attention_bias(torch.zeros(1, 33, 3, dtype=torch.float64))
    assert bias.shape == (1, model.config.depth, model.config.heads, 33, 33)
    hop_table = model.hop_bias.reshape(-1, model.config.depth, model.config.heads)
    torch.testing.assert_close(bias[0, 0, 0], hop_table[model.hops, 0, 0])


def test_config_errors():
    with pytest.raises(ValueError, match="unknown DiT size"):
        DiTConfig.from_size("huge")
    with pytest.raises(ValueError, match="divisible"):
        DiTConfig(hidden=30, heads=4)
    with pytest.raises(ValueError, match="unknown DiT option"):
        DiTConfig.from_size("tiny", width=3)
    with pytest.raises(ValueError, match="out of range"):
        graph_distances(3, [(0, 5)], 4)


def test_handedness_feature_is_rotation_invariant_and_mirror_odd(system):
    model = random_model(system)
    x = torch.as_tensor(system.positions, dtype=torch.float64)[None] / 0.2
    rot = torch.linalg.qr(torch.randn(3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0)))[0]
    rot = rot * torch.linalg.det(rot)  # proper rotation
    chi = model._handedness(x)
    torch.testing.assert_close(model._handedness(x @ rot.T), chi, rtol=0, atol=1e-12)
    torch.testing.assert_close(model._handedness(-x), -chi, rtol=0, atol=1e-12)
    ca = [a.index for a in system.topology.atoms() if a.name == "CA"]
    assert (chi[0, ca].abs() > 0.5).all()  # tetrahedral centres: clearly signed
    assert chi[0, [a.index for a in system.topology.atoms() if a.element.symbol == "H"]].abs().max() == 0


def test_local_frame_output_is_rotation_equivariant(system):
    """The frame head's directions rotate with the molecule (the coefficients come from the tokens)."""
    model = random_model(system)
    x = torch.randn(3, 33, 3, dtype=torch.float64)
    h = torch.randn(3, 33, model.config.hidden, dtype=torch.float64)
    rot = torch.linalg.qr(torch.randn(3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1)))[0]
    rot = rot * torch.linalg.det(rot)
    frame = model._frame_output(x, h)
    assert frame.abs().mean() > 0.1
    torch.testing.assert_close(model._frame_output(x @ rot.T, h), frame @ rot.T, rtol=0, atol=1e-12)
    # a mirror image flips the normal: the frame output is not simply mirrored
    assert (model._frame_output(-x, h) + frame).abs().max() > 0.1
