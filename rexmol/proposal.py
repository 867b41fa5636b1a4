"""The proposal of a Boltzmann sampler: a trained generator + an ODE solver + an exact log-density.

:class:`ProposalSpec` is a picklable description (checkpoint, solver, tolerances or steps, log-density mode,
dtype); ``spec.build()`` loads the checkpoint and returns a :class:`FlowProposal`, which maps standard-normal
draws z [B, N, 3] to samples in nm with log q w.r.t. nm on the mean-free subspace, NFE and a round-trip
certificate (see :class:`rexmol.sampling.Proposal`).

Solvers: every name of :func:`rexmol.solvers.make_solver` (``rex-dopri5``, ``dopri5``, ``rex-rk4``, ...) through
:func:`rexmol.likelihood.flow.sample_with_logq`, plus ``torchdiffeq-dopri5``: the published baseline's ODE solve
(torchdiffeq dopri5 on the augmented state (x, ell) in t, exact divergence, error control on both components).

Units: the network's flow runs in the generator's model coordinates (:mod:`rexmol.models.space`: normalised
Cartesian on the mean-free subspace, or standardised internal coordinates), from draws of its prior; after the
solve the space decodes the samples to Cartesian nm, and log q_nm(x_nm) = log q_model(x_model) - log|det dx_nm/dx|
(Cartesian: 3(N-1) log(scale)). A sample whose decode is flagged (near-singular geometry) gets log q = NaN: weight
0, counted as non-finite. The round-trip certificate is measured in model coordinates, where the solver runs.
"""
from __future__ import annotations

import hashlib
import math
import os
import pickle
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rexmol.sampling import ProposalBatch

__all__ = ["TORCHDIFFEQ_SOLVERS", "ProposalSpec", "FlowProposal", "file_sha256", "model_label", "torchdiffeq_logq"]

TORCHDIFFEQ_SOLVERS = ("torchdiffeq-dopri5",)
DTYPES = {"float32": torch.float32, "float64": torch.float64}


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@dataclass(frozen=True)
class ProposalSpec:
    """Everything that determines a proposal's samples.

    ``solver``: a solver name or ``torchdiffeq-dopri5``; adaptive with ``rtol``/``atol`` when ``steps`` is None
    (the tableau needs an embedded pair), else ``steps`` uniform steps in t. ``lawson``: Lawson coordinates of
    ``rex-``/``princeps-`` solvers (plain names integrate in t). ``t0``/``t1``: integration interval
    (0 = noise, 1 = data; data-kind coordinates need t1 < 1). ``logq``: "exact" | "hutchinson" | "discrete"
    (discrete: samples where the solver map folds get log q = NaN, i.e. weight 0 and counted as non-finite).
    ``roundtrip``: also run the backward pass and record the certificate (doubles the cost).
    ``model_dtype``: precision the network runs in (None: ``dtype``); float32 with a float64 state keeps Rex's
    round trip near float32 round-off where a float32 state would lose it (see :mod:`rexmol.models.precision`).
    """

    ckpt: str
    solver: str = "rex-dopri5"
    rtol: float = 1e-4
    atol: float = 1e-4
    steps: int | None = None
    lawson: str = "data"
    t0: float = 0.0
    t1: float = 0.999
    logq: str = "exact"
    trace_method: str = "auto"
    dtype: str = "float64"
    zeta: float = 1.0
    roundtrip: bool = True
    device: str = "cpu"
    model_dtype: str | None = None
    grid: str = "t"
    error_norm: str = "x+logq"
    logq_atol: float | None = None
    step_control: str = "per-sample"

    def __post_init__(self) -> None:
        for name, value in (("dtype", self.dtype), ("model_dtype", self.model_dtype or self.dtype)):
            if value not in DTYPES:
                raise ValueError(f"unknown {name} {value!r}; choose from {tuple(DTYPES)}")
        if self.device not in ("cpu", "cuda"):
            raise ValueError(f"unknown device {self.device!r}; choose 'cpu' or 'cuda'")
        if not 0.0 <= self.t0 < self.t1 <= 1.0:
            raise ValueError(f"need 0 <= t0 < t1 <= 1, got t0={self.t0}, t1={self.t1}")
        if self.steps is not None and self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        for name, value in (("rtol", self.rtol), ("atol", self.atol), ("logq-atol", self.logq_atol)):
            if value is not None and not (math.isfinite(value) and value > 0):
                raise ValueError(f"--{name} must be a finite number > 0, got {value}")
        if not 0.0 < self.zeta <= 1.0:
            raise ValueError(f"--zeta must be in (0, 1], got {self.zeta}")
        from rexmol.likelihood.flow import ERROR_NORMS
        from rexmol.solvers.control import CONTROLS
        from rexmol.solvers.grids import GRID_KINDS

        for name, value, allowed in (("grid", self.grid, GRID_KINDS), ("error-norm", self.error_norm, ERROR_NORMS),
                                     ("step-control", self.step_control, CONTROLS)):
            if value not in allowed:
                raise ValueError(f"--{name} {value!r} is unknown; choose from {', '.join(allowed)}")
        if self.solver in TORCHDIFFEQ_SOLVERS:
            if self.steps is not None or self.logq != "exact":
                raise ValueError(f"{self.solver} is adaptive with the exact trace: no --steps, --logq exact")

    def description(self, sha256: str, model: str = "DiT") -> dict[str, Any]:
        d = {"model": model, **asdict(self), "ckpt_sha256": sha256}
        if self.steps is not None:
            d["rtol"] = d["atol"] = d["error_norm"] = d["step_control"] = d["logq_atol"] = None
        else:
            d["grid"] = None
        if self.solver in TORCHDIFFEQ_SOLVERS:  # torchdiffeq's own controller: RMS over the batch's (x, ell)
            d["error_norm"], d["step_control"] = "x+logq (torchdiffeq RMS)", "shared (torchdiffeq)"
            d["logq_atol"] = None
        if self.solver in TORCHDIFFEQ_SOLVERS or self.solver.rpartition("-")[0] == "":
            d["lawson"] = "velocity (t)"
        return d

    def build(self) -> FlowProposal:
        """Load the checkpoint and check the solver settings (ValueError/FileNotFoundError on bad input)."""
        from rexmol.models.checkpoint import load_generator

        if Path(self.ckpt).is_dir():
            raise ValueError(f"checkpoint {self.ckpt} is a folder; pass the generator file in it (generator.pt) "
                             "or a `rexmol train` .ckpt")
        try:
            gen = load_generator(self.ckpt)
        except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, KeyError, AttributeError) as err:
            raise ValueError(f"checkpoint {self.ckpt} is unreadable ({type(err).__name__}: "
                             f"{' '.join(str(err).split())[:200]}); it is damaged or not a rexmol checkpoint: "
                             "restore it or pass another --ckpt") from err
        return FlowProposal(self, gen, file_sha256(self.ckpt))


def model_label(generator) -> str:
    """Row label of a generator in reports: ``DiT`` (Cartesian DiT), else network and coordinates, e.g.
    ``Hollow (internal)`` or ``Token (internal)`` for the non-hollow twin."""
    if generator.network == "dit" and generator.coordinates == "cartesian":
        return "DiT"
    name = {"dit": "DiT", "hollow": "Hollow" if getattr(generator.model.config, "hollow", True) else "Token"}
    return f"{name.get(generator.network, generator.network)} ({generator.coordinates})"


def _torch_device(name: str) -> torch.device:
    """``cpu``, or the CUDA device of this rank (``LOCAL_RANK`` modulo the visible GPUs)."""
    if name == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is visible to torch")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())


class FlowProposal:
    """Callable ``proposal(z [B, N, 3]) -> ProposalBatch`` for a loaded generator; see the module doc."""

    def __init__(self, spec: ProposalSpec, generator, sha256: str):
        from rexmol.models.precision import CastModel
        from rexmol.solvers import FlowMatching, LawsonCoordinates, make_solver

        self.device = _torch_device(spec.device)
        model_dtype = DTYPES[spec.model_dtype or spec.dtype]
        self.spec, self.generator = spec, generator.to(device=self.device, dtype=model_dtype)
        self.model = generator.model if model_dtype == DTYPES[spec.dtype] else CastModel(generator.model, model_dtype)
        self.system = generator.system
        if generator.sigma_min != 0.0:
            raise ValueError(f"checkpoint has sigma_min={generator.sigma_min}; the solvers assume the path sigma_min=0")
        self.prior = generator.prior
        self.coords = LawsonCoordinates(FlowMatching(), kind=spec.lawson, output=generator.output_kind)
        self.description = spec.description(sha256, model_label(generator))
        if spec.solver not in TORCHDIFFEQ_SOLVERS:
            make_solver(spec.solver, self.model, coords=self.coords)  # validates the name
            if spec.solver.startswith(("rex-", "princeps-")):  # Lawson coordinates may be singular at an end
                self.coords.check_time(spec.t0)
                self.coords.check_time(spec.t1)

    def _steps(self):
        from rexmol.solvers import AdaptiveSteps, FixedGrid

        s = self.spec
        if s.steps is not None:
            from rexmol.likelihood.flow import solver_coords

            return FixedGrid.named(s.grid, solver_coords(s.solver, self.coords), s.t0, s.t1, s.steps)
        return AdaptiveSteps(s.t0, s.t1, rtol=s.rtol, atol=s.atol, control=s.step_control)

    def __call__(self, z: np.ndarray, on_step=None) -> ProposalBatch:
        """``on_step(done)``: progress callback, the fraction of the batch's solves done (forward, then the round
        trip; the torchdiffeq baseline does not report)."""
        dtype = DTYPES[self.spec.dtype]
        x0 = self.prior.project(torch.as_tensor(z, dtype=dtype, device=self.device))
        if self.spec.solver in TORCHDIFFEQ_SOLVERS:
            x, logq, nfe, rt_x, rt_logq = self._torchdiffeq(x0)
        else:
            x, logq, nfe, rt_x, rt_logq = self._rex_family(x0, on_step)
        b = x0.shape[0]
        space = self.generator.space
        x_nm, log_det, flags = space.decode(x.detach(), space.draw_branches(z))
        logq_nm = torch.where(flags, torch.full_like(logq, float("nan")), logq.detach() - log_det.to(logq))
        return ProposalBatch(
            x=x_nm.to("cpu", torch.float64).numpy(), log_q=logq_nm.to("cpu", torch.float64).numpy(),
            nfe=np.broadcast_to(np.asarray(nfe, dtype=np.int64), (b,)).copy(),
            roundtrip_x=np.full(b, np.nan) if rt_x is None else rt_x.to("cpu", torch.float64).numpy(),
            roundtrip_logq=np.full(b, np.nan) if rt_logq is None else rt_logq.to("cpu", torch.float64).numpy(),
        )

    def _rex_family(self, x0: torch.Tensor, on_step=None):
        from rexmol.likelihood.flow import LogQOptions, roundtrip_certificate, sample_with_logq
        from rexmol.solvers.solve import progress_span

        s = self.spec
        half = 0.5 if s.roundtrip else 1.0
        with torch.no_grad():
            out = sample_with_logq(self.model, self.prior, x0, s.solver, self._steps(), coords=self.coords,
                                   zeta=s.zeta,
                                   options=LogQOptions(mode=s.logq, method=s.trace_method, error_norm=s.error_norm,
                                                       logq_atol=s.logq_atol),
                                   on_step=progress_span(on_step, 0.0, half))
            cert = roundtrip_certificate(out, progress_span(on_step, half, 1.0)) if s.roundtrip else None
        logq = out.logq
        if out.folded is not None:  # discrete density invalid where the solver map folds: weight 0, counted
            logq = torch.where(out.folded, torch.full_like(logq, float("nan")), logq)
        return (out.x, logq, out.sample_nfe, None if cert is None else cert.x0_error,
                None if cert is None else cert.logq_error)

    def _torchdiffeq(self, x0: torch.Tensor):
        s = self.spec
        return torchdiffeq_logq(self.model, self.prior, x0, s.t0, s.t1, rtol=s.rtol, atol=s.atol,
                                output=self.generator.output_kind, trace_method=s.trace_method,
                                roundtrip=s.roundtrip)


def torchdiffeq_logq(model, prior, x0: torch.Tensor, t0: float, t1: float, *, rtol: float, atol: float,
                     output: str = "velocity", trace_method: str = "auto", roundtrip: bool = True):
    """The published baseline: torchdiffeq dopri5 on (x, ell) in t (flow-matching path), exact divergence.

    ``x0`` [B, *shape] on the prior's support. Returns ``(x1, log q [B], forward NFE, round-trip error of x0 [B]
    or None, of log q [B] or None)``; the round trip integrates back from (x1, ell1) with the same tolerances.
    """
    import torchdiffeq

    from rexmol.likelihood.divergence import ExactTrace
    from rexmol.solvers import FlowMatching, NonFiniteError, time_vector

    schedule, k = FlowMatching(), prior.dim
    basis = prior.basis(x0.dtype, x0.device)
    trace = ExactTrace(trace_method)
    nfe = 0

    def rhs(t: torch.Tensor, state):
        nonlocal nfe
        nfe += 1
        x = state[0]
        f, tr = trace(model, x, time_vector(float(t), x), basis)
        a, b = schedule.velocity_coeffs(float(t), output)
        v, div = f * b + x * a, tr * b + a * k
        if not (torch.isfinite(v).all() and torch.isfinite(div).all()):
            raise NonFiniteError(f"non-finite velocity or divergence at t={float(t)!r}", float(t))
        return v, -div

    def integrate(state, t_from: float, t_to: float):
        ts = torch.tensor([t_from, t_to], dtype=x0.dtype, device=x0.device)
        xs, ells = torchdiffeq.odeint(rhs, state, ts, method="dopri5", rtol=rtol, atol=atol)
        return xs[-1], ells[-1]

    with torch.no_grad():
        x1, ell1 = integrate((x0, x0.new_zeros(x0.shape[0])), t0, t1)
        forward_nfe = nfe
        logq = prior.log_prob(x0) + ell1
        if not roundtrip:
            return x1, logq, forward_nfe, None, None
        x0b, ell0b = integrate((x1, ell1), t1, t0)
    x0b = prior.project(x0b)
    rt_x = (x0b - x0).reshape(x0.shape[0], -1).abs().amax(-1)
    rt_logq = (prior.log_prob(x0b) + ell1 - ell0b - logq).abs()
    return x1, logq, forward_nfe, rt_x, rt_logq
