"""An internal-coordinate hollow generator end to end: trained a few steps by the Lightning module, saved in every
checkpoint with its fitted space (restored on resume, never refitted), and sampled by FlowProposal, whose log q
(nm) must equal an independent density: the backward ``log_density`` of the re-encoded sample (plain RK4 in t,
vjp-loop trace) minus the transform's log|det dx/dz|. The Rex certificate must be at round-off (float64)."""
import lightning as L
import numpy as np
import pytest
import torch
from dit_support import write_dataset

from rexmol.data import MDDataModule
from rexmol.likelihood.flow import LogQOptions, log_density
from rexmol.mddata import load_frames
from rexmol.models.checkpoint import load_generator
from rexmol.models.space import InternalSpace
from rexmol.proposal import FlowProposal, ProposalSpec
from rexmol.solvers import FixedGrid
from rexmol.training import ExportGenerator, FlowMatching, ValidationESS

TINY_HOLLOW = {"hidden": 32, "depth": 2, "heads": 2, "mlp_ratio": 2, "tau_hidden": 16}


def md_frames(n: int, offset: int = 0) -> np.ndarray:
    train = load_frames("data/ala3", "train")
    return train[offset:: len(train) // n][:n]


def fit(tmp, data, max_steps, ckpt_path=None, callbacks=()):
    torch.manual_seed(0)
    dm = MDDataModule(str(data), batch_size=16, rotate=False)
    module = FlowMatching(coordinates="internal", network="hollow", hollow=TINY_HOLLOW, lr=3e-3, warmup_steps=2,
                          schedule_steps=max_steps)
    trainer = L.Trainer(accelerator="cpu", max_steps=max_steps, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0, default_root_dir=tmp, limit_val_batches=1,
                        val_check_interval=max_steps, check_val_every_n_epoch=None, gradient_clip_val=1.0,
                        callbacks=[*callbacks, L.pytorch.callbacks.ModelCheckpoint(tmp / "ckpt", save_last=True)])
    trainer.fit(module, datamodule=dm, ckpt_path=ckpt_path)
    return module, trainer


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny IC hollow generator, 6 steps on 48 MD frames, then resumed to 8 steps on *other* frames."""
    tmp = tmp_path_factory.mktemp("ic")
    data = write_dataset(tmp / "d", md_frames(48), n_val=8)
    other = write_dataset(tmp / "other", md_frames(48, offset=17), n_val=8)
    export = ExportGenerator(str(tmp / "model"), monitor="val/ess")
    validation = ValidationESS(n_samples=8, steps=2, n_reference=8)
    first, _ = fit(tmp, data, 6, callbacks=[validation, export])
    resumed, trainer = fit(tmp, other, 8, ckpt_path=tmp / "ckpt" / "last.ckpt", callbacks=[validation, export])
    return first, resumed, trainer, tmp


def test_resume_refuses_a_space_with_other_rotor_symmetry(trained):
    first = trained[0]
    plain = FlowMatching(coordinates="internal", network="hollow", hollow=TINY_HOLLOW, rotor_symmetry=False)
    with pytest.raises(ValueError, match="--model.rotor_symmetry true"):
        plain._set_space(first.space, "the checkpoint")


def test_space_is_fitted_once_and_restored_on_resume(trained):
    first, resumed, trainer, tmp = trained
    assert trainer.global_step == 8
    assert resumed.space.to_dict() == first.space.to_dict()  # restored, not refitted on the other frames
    assert resumed.cpu_seconds() > resumed.cpu_seconds_before > 0  # CPU clock summed across the resume
    gen = load_generator(tmp / "ckpt" / "last.ckpt")
    assert gen.space.to_dict() == first.space.to_dict() and gen.network == "hollow"
    assert gen.meta["global_step"] == 8 and gen.meta["cpu_seconds"] >= resumed.cpu_seconds_before
    last = load_generator(tmp / "model" / "generator_last.pt")
    best = load_generator(tmp / "model" / "generator.pt")
    assert last.meta["global_step"] == 8 and best.meta["best_step"] in (6, 8)
    assert best.meta["global_step"] == best.meta["best_step"] and last.meta["best"] == best.meta["best"]
    x, t = gen.prior.sample(4, generator=torch.Generator().manual_seed(0), dtype=torch.float32), torch.rand(4)
    with torch.no_grad():
        assert torch.equal(last.model(x, t), resumed.ema(x, t)) and torch.equal(gen.model(x, t), resumed.ema(x, t))
    assert "--ckpt_path" in (tmp / "model" / "resume_command.txt").read_text()


def test_validation_metrics_are_logged(trained):
    _, _, trainer, _ = trained
    metrics = trainer.callback_metrics
    assert 1 / 8 <= float(metrics["val/ess"]) <= 1.0
    assert float(metrics["val/ew2_reweighted_kT"]) >= 0 and float(metrics["val/nonfinite"]) == 0.0
    assert 0 < float(metrics["train_cpu_hours"]) < float(metrics["cpu_hours"])


@pytest.fixture(scope="module")
def generator(trained):
    """The trained generator with randomised weights on top (a few steps leave the zero-initialised heads small,
    and the density check needs a non-trivial flow), float64."""
    _, _, _, tmp = trained
    gen = load_generator(tmp / "ckpt" / "last.ckpt")
    torch.manual_seed(3)
    with torch.no_grad():
        for p in gen.model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return gen.to(torch.float64)


def test_sampler_log_q_equals_independent_backward_density_minus_log_det(generator):
    """Sampler: RK4 in t on 8 steps, structured (hollow) trace, decode. Independent: encode the sampled Cartesian
    frames, integrate (z, 0) backward on the same grid with the vjp-batch trace. The two agree to the backward
    pass's truncation error (measured 1.7e-8 at 16 steps); without the log-det they differ by ~|log det| > 100."""
    grid_steps = 8
    spec = ProposalSpec(ckpt="unused", solver="rk4", steps=grid_steps, dtype="float64", t1=0.999, roundtrip=False)
    proposal = FlowProposal(spec, generator, "sha")
    draws = np.random.default_rng(0).standard_normal((3, 33, 3))
    out = proposal(draws)
    assert np.isfinite(out.log_q).all()
    space: InternalSpace = generator.space
    z_enc, log_det, flags = space.transform.encode(torch.as_tensor(out.x))  # the forward transform's log-det
    assert not flags.any()
    # the symmetric rotors (trained by default) took the branches the raw draws give
    assert space.rotor_symmetry
    assert torch.equal(space.transform.branches(torch.as_tensor(out.x)), space.draw_branches(draws))
    logq_model, _, _ = log_density(generator.model, generator.prior, z_enc, "rk4",
                                   FixedGrid.uniform_t(0.0, 0.999, grid_steps), options=LogQOptions(method="vjp-batch"))
    independent = (logq_model - log_det).numpy()
    err = np.abs(out.log_q - independent).max()
    print(f"sampler vs independent log q: max |diff| {err:.2e}; without the log-det "
          f"{np.abs(out.log_q - logq_model.numpy()).min():.1f}")
    assert err <= 1e-4
    assert np.abs(out.log_q - logq_model.numpy()).min() > 1.0  # leaving the log-det out is off


@pytest.mark.parametrize("solver,steps,lawson", [("rex-rk4", 16, "data"), ("rex-rk4", 16, "velocity"),
                                                 ("rex-dopri5", None, "velocity")])
def test_rex_certificate_is_at_round_off(generator, solver, steps, lawson):
    """Both Lawson kinds; velocity-kind Rex-Dopri5 with (x, log q) control is the demo's proposal."""
    spec = ProposalSpec(ckpt="unused", solver=solver, steps=steps, lawson=lawson, rtol=1e-3, atol=1e-3,
                        logq_atol=1e-2, dtype="float64", t1=0.999, roundtrip=True)
    out = FlowProposal(spec, generator, "sha")(np.random.default_rng(1).standard_normal((4, 33, 3)))
    print(f"certificate: x {out.roundtrip_x.max():.1e}, log q {out.roundtrip_logq.max():.1e}")
    assert out.roundtrip_x.max() < 1e-9 and out.roundtrip_logq.max() < 1e-8
