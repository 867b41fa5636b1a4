"""Exact trace implementations against a brute-force Jacobian, Hutchinson, priors (float64)."""
import math

import numpy as np
import pytest
import torch
from torch import nn

from rexmol.likelihood.divergence import ExactTrace, Hutchinson, brute_force_jacobian
from rexmol.likelihood.priors import MeanFreeGaussian, StandardGaussian, helmert_basis
from rexmol.models.dit import AtomDiT, DiTConfig

DT = torch.float64
N = 5  # particles


class MLP(nn.Module):
    def __init__(self, d: int, width: int = 32):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(d + 1, width), nn.Tanh(), nn.Linear(width, width), nn.SiLU(),
                                 nn.Linear(width, d))

    def forward(self, x, t):
        return self.net(torch.cat([x.reshape(x.shape[0], -1), t[:, None]], -1)).reshape(x.shape)


class TinyTransformer(nn.Module):
    """Two pre-norm attention blocks over particle tokens (manual softmax attention)."""

    def __init__(self, width: int = 16, heads: int = 2):
        super().__init__()
        self.heads = heads
        self.embed, self.time = nn.Linear(3, width), nn.Linear(1, width)
        self.qkv = nn.ModuleList(nn.Linear(width, 3 * width) for _ in range(2))
        self.mlp = nn.ModuleList(nn.Sequential(nn.LayerNorm(width), nn.Linear(width, 2 * width), nn.GELU(),
                                               nn.Linear(2 * width, width)) for _ in range(2))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, 3)

    def forward(self, x, t):
        b, n, _ = x.shape
        h = self.embed(x) + self.time(t[:, None])[:, None]
        for qkv, mlp in zip(self.qkv, self.mlp):
            q, k, v = qkv(self.norm(h)).reshape(b, n, 3, self.heads, -1).unbind(2)
            a = torch.softmax(torch.einsum("bnhc,bmhc->bhnm", q, k) / math.sqrt(q.shape[-1]), -1)
            h = h + torch.einsum("bhnm,bmhc->bnhc", a, v).reshape(b, n, -1)
            h = h + mlp(h)
        return self.head(h)


def atom_dit(n_atoms: int = 5) -> AtomDiT:
    """The project's DiT ('tiny' size) on a toy branched molecule (atom 0 has three bonds), every weight
    randomised (adaLN-Zero starts at 0)."""
    feats = {name: np.arange(n_atoms) % 3 for name in
             ("element", "atom_name", "residue_index", "residue_name", "chain_position")}
    bonds = [(0, 1), (0, 2), (0, 3)] + [(i, i + 1) for i in range(3, n_atoms - 1)]
    model = AtomDiT(DiTConfig.from_size("tiny"), feats, bonds).to(DT)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.3 * torch.randn(p.shape, generator=g, dtype=DT))
    return model.eval()


def models():
    torch.manual_seed(0)
    return {"mlp": MLP(3 * N).to(DT), "transformer": TinyTransformer().to(DT), "dit": atom_dit(N)}


@pytest.fixture(scope="module")
def cases():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, N, 3, generator=g, dtype=DT)
    t = torch.rand(3, generator=g, dtype=DT)
    out = {}
    for name, model in models().items():
        J = brute_force_jacobian(model, x, t)
        out[name] = (model, J)
    return x, t, out


@pytest.mark.parametrize("name", ["mlp", "transformer", "dit"])
@pytest.mark.parametrize("method", ExactTrace.METHODS + ("auto",))
def test_exact_trace_equals_brute_force(cases, name, method):
    x, t, ms = cases
    model, J = ms[name]
    et = ExactTrace(method)
    f, tr = et(model, x, t)
    assert torch.allclose(f, model(x, t), atol=1e-13, rtol=0)
    assert (tr - J.diagonal(dim1=1, dim2=2).sum(-1)).abs().max() <= 1e-10
    _, K = et.jacobian(model, x, t)
    assert (K - J).abs().max() <= 1e-10
    # on the mean-free subspace: tr(U^T J U) and U^T J U
    U = MeanFreeGaussian(N).basis(DT)
    _, tr_u = et(model, x, t, U)
    _, K_u = et.jacobian(model, x, t, U)
    assert (K_u - U.T @ J @ U).abs().max() <= 1e-10
    assert (tr_u - (U.T @ J @ U).diagonal(dim1=1, dim2=2).sum(-1)).abs().max() <= 1e-10
    if method == "auto":
        assert set(et.choices.values()) <= set(ExactTrace.METHODS)
        assert all(len(s) >= 2 for s in et.probe_seconds.values())


def test_chunking_by_budget_and_forced_chunk_agree(cases):
    x, t, ms = cases
    model, J = ms["transformer"]
    ref = J.diagonal(dim1=1, dim2=2).sum(-1)
    for et in (ExactTrace("vjp-vmap", chunk=5), ExactTrace("jvp-vmap", memory_budget=1),
               ExactTrace("vjp-batch", chunk=1)):
        assert (et(model, x, t)[1] - ref).abs().max() <= 1e-10
        assert et._chunk_size(model, model, x, t, 3 * N, et.method) == (et.chunk or 1)


def test_module_parameters_stay_untouched_and_no_grad_graph(cases):
    x, t, ms = cases
    model, _ = ms["mlp"]
    f, tr = ExactTrace("vjp-loop")(model, x, t)
    assert not f.requires_grad and not tr.requires_grad
    assert all(p.grad is None for p in model.parameters())


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="unknown exact-trace method"):
        ExactTrace("jacrev")
    with pytest.raises(ValueError, match="n_probes"):
        Hutchinson(0)
    with pytest.raises(ValueError, match="noise"):
        Hutchinson(1, "uniform")
    x, t = torch.zeros(2, 4, 3, dtype=DT), torch.zeros(2, dtype=DT)
    with pytest.raises(ValueError, match="basis must be"):
        ExactTrace()(lambda z, s: z, x, t, torch.zeros(5, 2, dtype=DT))


@pytest.mark.parametrize("noise", Hutchinson.NOISES)
@pytest.mark.parametrize("basis", [False, True])
def test_hutchinson_unbiased_within_4_se(cases, noise, basis):
    x, t, ms = cases
    model, J = ms["transformer"]
    U = MeanFreeGaussian(N).basis(DT) if basis else None
    K = J if U is None else U.T @ J @ U
    exact = K.diagonal(dim1=1, dim2=2).sum(-1)
    n = 4000
    h = Hutchinson(n, noise, seed=11)
    e = h.probes(3, K.shape[-1], DT, "cpu")  # [n, B, k]
    single = torch.einsum("pbi,bij,pbj->pb", e, K, e)  # each probe's estimate
    mean, se = single.mean(0), single.std(0) / math.sqrt(n)
    _, est = h(model, x, t, U)
    assert torch.allclose(est, mean, atol=1e-10, rtol=0)  # the estimator is the mean over its probes
    assert ((mean - exact).abs() <= 4 * se).all(), ((mean - exact) / se)


def test_hutchinson_noise_fixed_within_solve_and_reproduced_by_seed():
    a, b, c = Hutchinson(3, seed=5), Hutchinson(3, seed=5), Hutchinson(3, seed=6)
    pa = a.probes(4, 9, DT, "cpu")
    assert a.probes(4, 9, DT, "cpu") is pa
    assert torch.equal(pa, b.probes(4, 9, DT, "cpu"))
    assert not torch.equal(pa, c.probes(4, 9, DT, "cpu"))
    assert set(pa.unique().tolist()) == {-1.0, 1.0}


def test_mean_free_prior_normalisation_and_support():
    prior = MeanFreeGaussian(5)
    assert prior.dim == 12
    U = prior.basis(DT)
    assert torch.allclose(U.T @ U, torch.eye(12, dtype=DT), atol=1e-14)
    assert torch.allclose(U.reshape(5, 3, 12).sum(0), torch.zeros(3, 12, dtype=DT), atol=1e-14)
    x = prior.sample(7, generator=torch.Generator().manual_seed(0))
    assert x.mean(1).abs().max() < 1e-15
    z = x.reshape(7, -1) @ U  # orthonormal coordinates on the subspace
    ref = torch.distributions.Normal(0.0, 1.0).log_prob(z).sum(-1)
    assert torch.allclose(prior.log_prob(x), ref, atol=1e-12)
    with pytest.raises(ValueError, match="not centred"):
        prior.log_prob(x + 0.1)
    std = StandardGaussian((5, 3))
    y = std.sample(4, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(std.log_prob(y), torch.distributions.Normal(0.0, 1.0).log_prob(y).sum((1, 2)), atol=1e-12)
    assert torch.allclose(helmert_basis(3).sum(0), torch.zeros(2, dtype=DT), atol=1e-15)
    with pytest.raises(ValueError, match="shape"):
        std.log_prob(torch.zeros(2, 4, 3))
