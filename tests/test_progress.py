"""Progress inside a batch: ``on_step(done)`` from the solver drivers (fixed, shared and per-sample adaptive,
per-sample grids, inverses), through sample_with_logq / roundtrip_certificate and FlowProposal, to the sampler's
bar; nothing is reported under --quiet. Closed-form Gaussian flow (no network) except for the proposal test."""
import io
import re

import numpy as np
import pytest
import torch
from tqdm import tqdm

from rexmol.cli import main
from rexmol.likelihood.flow import LogQOptions, roundtrip_certificate, sample_with_logq
from rexmol.likelihood.priors import StandardGaussian
from rexmol.models.gaussian import GaussianFlow
from rexmol.proposal import ProposalSpec
from rexmol.sampling import _bar_mover, run_rank, standard_normal_draws
from rexmol.solvers import AdaptiveSteps, FixedGrid, invert, make_solver, solve
from rexmol.systems import load_system
from tiny_fixtures import make_tiny_ckpt


def _flow():
    mean = torch.randn(4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    prior = StandardGaussian((4,))
    return GaussianFlow(mean, 0.6).model("velocity"), prior, prior.sample(5, generator=torch.Generator().manual_seed(1))


def _check(calls: list[float], n_calls: int | None = None) -> None:
    assert calls, "on_step was never called"
    assert all(0.0 < a <= b <= 1.0 for a, b in zip(calls, calls[1:])), calls
    assert calls[-1] == 1.0 and calls[0] < 1.0
    if n_calls is not None:
        assert len(calls) == n_calls


@pytest.mark.parametrize("steps", [FixedGrid.uniform_t(0.0, 0.99, 7), AdaptiveSteps(0.0, 0.99, rtol=1e-6),
                                   AdaptiveSteps(0.0, 0.99, rtol=1e-6, control="per-sample")],
                         ids=["fixed", "shared", "per-sample"])
def test_solve_and_invert_report_rising_fractions_ending_at_one(steps):
    model, _, x0 = _flow()
    solver = make_solver("rex-dopri5", model)
    forward, backward = [], []
    sol = solve(solver, x0, steps, on_step=forward.append)
    _check(forward, None if sol.per_sample else sol.accepted)
    back = invert(solver, sol, on_step=backward.append)
    _check(backward)
    if sol.per_sample:  # the replay of per-sample grids reports once per marched step
        replay = []
        solve(solver, x0, sol.record.grid(), on_step=replay.append)
        assert len(replay) == sol.accepted
        _check(replay)
    torch.testing.assert_close(back.x, x0, rtol=0, atol=1e-10)  # the callback changes nothing


def test_non_reversible_inverse_and_the_flow_layer_report_too():
    model, prior, x0 = _flow()
    calls = []
    out = sample_with_logq(model, prior, x0, "dopri5", AdaptiveSteps(0.0, 0.99, rtol=1e-6), on_step=calls.append)
    _check(calls, out.solution.accepted)
    back = []
    roundtrip_certificate(out, back.append)
    _check(back)
    chunks = []  # discrete mode with one tangent column per solve: 4 solves, progress spans all of them
    sample_with_logq(model, prior, x0, "rex-rk4", FixedGrid.uniform_t(0.0, 0.99, 3),
                     options=LogQOptions(mode="discrete", memory_budget=1), on_step=chunks.append)
    _check(chunks)
    assert len(chunks) > 3 and chunks[2] == pytest.approx(0.25)  # 3 steps of the first of 4 solves


def test_the_proposal_reports_its_batch_and_the_bar_moves_inside_it(tmp_path):
    spec = ProposalSpec(ckpt=make_tiny_ckpt(tmp_path / "tiny.pt"), solver="rex-euler", steps=2,
                        trace_method="vjp-loop")
    proposal = spec.build()
    z = standard_normal_draws(0, range(2), (33, 3))
    calls = []
    batch = proposal(z, on_step=calls.append)
    assert calls == [0.25, 0.5, 0.75, 1.0]  # 2 steps forward, then 2 back (the round trip)
    np.testing.assert_array_equal(batch.log_q, proposal(z).log_q)
    bar = tqdm(total=10, initial=4, file=io.StringIO(), mininterval=0)
    move = _bar_mover(bar, 4, 4)
    for f in calls:
        move(f)
    move(0.5)  # never backwards
    counters = re.findall(r"\| ?([0-9.]+)/10 \[", bar.fp.getvalue())  # the "n/total" field of every refresh
    assert bar.n == 8 and isinstance(bar.n, int) and counters[-4:] == ["5", "6", "7", "8"]


class _Recording:
    """A proposal that records the callbacks it is given and reports half of each batch."""

    def __init__(self):
        self.system = load_system("ala3")
        self.description = {"model": "recording"}
        self.given = []

    def __call__(self, z, on_step=None):
        from rexmol.sampling import ProposalBatch

        self.given.append(on_step)
        if on_step is not None:
            on_step(0.5)
        n = len(z)
        return ProposalBatch(x=self.system.positions[None] + 0.002 * z, log_q=np.zeros(n), nfe=np.zeros(n, np.int64),
                             roundtrip_x=np.full(n, np.nan), roundtrip_logq=np.full(n, np.nan))


def test_quiet_passes_no_callback_and_prints_nothing(tmp_path, capsys):
    loud, quiet = _Recording(), _Recording()
    run_rank(loud, tmp_path / "loud", 2, 2, seed=0)
    assert callable(loud.given[0]) and "2/2" in capsys.readouterr().err
    run_rank(quiet, tmp_path / "quiet", 2, 2, seed=0, quiet=True)
    assert quiet.given == [None] and capsys.readouterr() == ("", "")
    assert main(["sample", "--model", "gaussian", "--n", "4", "--solver", "rex-rk4", "--steps", "4", "--quiet"]) == 0
    assert capsys.readouterr() == ("", "")
