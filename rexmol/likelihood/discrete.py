"""Exact density of the *discrete* solver map by tangent propagation (docs/design.md §4, issue 9).

On a fixed grid the sampler's output x_N = Phi(x_0) is a smooth map, so log q(x_N) = log p_0(x_0) - log|det dPhi/dx_0|.
Explicit (Lawson) RK steps and the Rex coupling are built from linear combinations of states and right-hand sides
with the same coefficients, so they commute with linearisation: carrying a tangent matrix M (weight kind "x",
initialised to the identity) through the *same* steps with the linearised right-hand side c M + e J_f M gives the
exact Jacobian of the discrete map. For Rex the auxiliary state carries its own tangent (the solver duplicates
the whole state tuple, and x_hat_0 = x_0 gives d x_hat_0/d x_0 = I).

Tangents live in the coordinates of the prior's orthonormal basis U [d, k] (M is [B, k, c]: c of the k columns),
so the determinant is that of the map restricted to the support (the mean-free subspace for molecules); this needs
a model whose output stays in the support (J_f = U U^T J_f), which is what keeps the flow there in the first place.

The round-trip certificate re-derives the log-determinant on the backward pass (:func:`inverse_logdet`) instead of
reusing the forward one: tangents carried through the solver's *backward* steps give the Jacobian of the inverse map,
so a wrong forward log|det| (or a forward tangent that is not the Jacobian of the map) shows up as a log q mismatch.
For Rex the inverse acts on the pair (x_N, x_hat_N), which for sampler outputs lies on the k-dimensional set
S = {(x, x_hat): x_0 = x_hat_0 after the backward pass}. With A = d x_0/d(x_N, x_hat_N), A_hat = d x_hat_0/d(.)
(2k tangent columns carried backward) and D = A - A_hat = [D_1 D_2], S is locally x_hat_N = H(x_N) with
dH = -D_2^{-1} D_1 (implicit function theorem), so d x_0/d x_N along S is the Schur complement A_1 - A_2 D_2^{-1} D_1,
whose log|det| is -log|det dPhi/dx_0| in exact arithmetic; it uses nothing of the forward pass but its end state.
"""
from __future__ import annotations

import torch
from torch import Tensor

from rexmol.likelihood.cnf import check_output, log_density_rate, support_dim
from rexmol.likelihood.divergence import ExactTrace, Model
from rexmol.solvers.dynamics import time_vector
from rexmol.solvers.lawson import LawsonCoordinates
from rexmol.solvers.solve import Progress, Solution, Solver, invert, progress_span
from rexmol.solvers.state import State


class TangentDynamics:
    """State (x, ell, M) with kinds ("x", "one", "x") when ``with_trace`` (all k columns), else (x, M).

    With c >= k columns (all of them, or the 2k of the Rex certificate) the projected Jacobian K = U^T J_f U
    [B, k, k] is formed once per evaluation by the fastest exact method (``jacobian.jacobian``), giving both K M and
    the trace (so the integrated-divergence log q comes for free). With a chunk of c < k columns, J_f (U M) is
    computed by forward mode (c Jacobian-vector products).
    """

    def __init__(self, model: Model, coords: LawsonCoordinates, jacobian: ExactTrace, basis: Tensor | None = None,
                 with_trace: bool = True):
        self.model, self.coords, self.jac, self.basis = model, coords, jacobian, basis
        self.with_trace = with_trace
        self.kinds = ("x", "one", "x") if with_trace else ("x", "x")
        self._columns = ExactTrace("jvp-vmap", memory_budget=jacobian.memory_budget)

    def __call__(self, t: float, state: State) -> State:
        x, M = state[0], state[-1]
        tv = time_vector(t, x)
        k = support_dim(x, self.basis)
        if M.shape[1] != k:
            raise ValueError(f"tangent must be [B, k={k}, c], got {list(M.shape)}")
        if M.shape[2] >= k:
            f, K = self.jac.jacobian(self.model, x, tv, self.basis)
            JM = K @ M
            tr = K.diagonal(dim1=1, dim2=2).sum(-1)
        else:
            if self.with_trace:
                raise ValueError("the integrated trace needs all k tangent columns (with_trace=False for chunks)")
            V = M if self.basis is None else torch.einsum("dk,bkc->bdc", self.basis.to(M), M)
            V = V.permute(2, 0, 1).reshape(M.shape[2], *x.shape)
            try:
                f, P, _ = self._columns.products(self.model, x, tv, V)
            except NotImplementedError as err:
                raise ValueError(f"tangent columns in chunks need forward-mode AD, which this model lacks ({err}); "
                                 "raise memory_budget so that all columns fit one solve") from err
            P = P.reshape(M.shape[2], x.shape[0], -1)
            JM = P.permute(1, 2, 0) if self.basis is None else torch.einsum("dk,cbd->bkc", self.basis.to(P), P)
            tr = None
        check_output(f, x, t)
        c, e = self.coords.lawson_coeffs(t)
        dx = f * e if c == 0.0 else x * c + f * e
        dM = JM * e if c == 0.0 else M * c + JM * e
        if not self.with_trace:
            return dx, dM
        return dx, log_density_rate(self.coords, t, k, tr), dM


def identity_columns(batch: int, k: int, cols: range, dtype: torch.dtype, device) -> Tensor:
    """Columns ``cols`` of the k x k identity for every sample: [B, k, len(cols)]."""
    eye = torch.zeros(k, len(cols), dtype=dtype, device=device)
    eye[torch.as_tensor(list(cols)), torch.arange(len(cols))] = 1.0
    return eye.expand(batch, k, len(cols)).clone()


def column_chunk(batch: int, k: int, itemsize: int, stages: int, reversible: bool, memory_budget: int,
                 n_cols: int | None = None) -> int:
    """Tangent columns per solve (of ``n_cols``, default k) so that the tangent copies a solver holds fit
    ``memory_budget`` bytes.

    A step holds about stages + 3 copies of the state (twice that for Rex, which carries x_hat), plus K [B, k, k]
    when all columns are carried at once.
    """
    n_cols = k if n_cols is None else n_cols
    copies = (stages + 3) * (2 if reversible else 1)
    per_column = copies * batch * k * itemsize
    if per_column * n_cols + batch * k * k * itemsize <= memory_budget:
        return n_cols
    return max(1, min(k, memory_budget // per_column))


def inverse_logdet(solver: Solver, solution: Solution, k: int,
                   on_step: Progress | None = None) -> tuple[Tensor, Tensor | None, Tensor, int]:
    """The backward pass of a discrete-mode solve with tangents: log|det d x_0/d x_N| re-derived from the inverse.

    ``solver``: the tangent solver (``TangentDynamics(..., with_trace=False)``, state (x, M)) of the forward solve;
    ``solution``: its x-only end state (``state = (x_N,)``, Rex ``aux = (x_hat_N,)``) and fixed-grid record; ``k``:
    support dimension. Rex carries 2k columns (perturbations of x_N, then of x_hat_N) back to t_0 and takes the
    Schur complement along the sampler's output set (module docstring); a non-reversible solver carries the k
    columns of the identity through its backward integration (its inverse only to truncation error). Returns
    (x_0' [B, *shape], x_hat_0' or None, log|det| [B] float64 (= -log|det dPhi/dx_0| up to round-off for Rex),
    NFE of the backward solves). ``on_step(done)``: progress over the column chunks' backward solves.
    """
    x = solution.state[0]
    B = x.shape[0]
    n_cols = 2 * k if solver.reversible else k
    tab = solver.psi.tableau
    chunk = column_chunk(B, k, x.element_size(), tab.stages, solver.reversible,
                         solver.psi.dynamics.jac.memory_budget, n_cols)
    cols, x0, xh0, nfe = [], None, None, 0
    n_solves = -(-n_cols // chunk)
    for c0 in range(0, n_cols, chunk):
        sel = range(c0, min(c0 + chunk, n_cols))
        eye = identity_columns(B, n_cols, sel, x.dtype, x.device)  # [B, 2k or k, c]
        state = (x, eye[:, :k])
        aux = (solution.aux[0], eye[:, k:]) if solver.reversible else None
        part = progress_span(on_step, c0 // chunk / n_solves, (c0 // chunk + 1) / n_solves)
        back = invert(solver, Solution(state, aux, solution.record), on_step=part)
        x0, nfe = back.state[0], nfe + back.nfe
        cols.append((back.state[1], None if back.aux is None else back.aux[1]))
        xh0 = None if back.aux is None else back.aux[0]
    A = torch.cat([a for a, _ in cols], dim=-1).to(torch.float64)
    if not solver.reversible:
        return x0, None, torch.linalg.slogdet(A)[1], nfe
    D = A - torch.cat([ah for _, ah in cols], dim=-1).to(torch.float64)
    S = A[..., :k] - A[..., k:] @ torch.linalg.solve(D[..., k:], D[..., :k])
    return x0, xh0, torch.linalg.slogdet(S)[1], nfe


def logdet_diagnostics(M: Tensor, cond_limit: float | None = None) -> dict[str, Tensor]:
    """log|det M|, sign, 2-norm condition number and a ``folded`` flag per sample, computed in float64.

    ``folded``: det <= 0 (the map is orientation-reversing or singular there, so the density formula fails) or
    cond > ``cond_limit`` (default 0.01 / eps of M's dtype: the smallest singular value is not resolved).
    """
    limit = cond_limit if cond_limit is not None else 0.01 / torch.finfo(M.dtype).eps
    M64 = M.to(torch.float64)
    sign, logabs = torch.linalg.slogdet(M64)
    sv = torch.linalg.svdvals(M64)
    cond = sv[..., 0] / sv[..., -1]
    folded = (sign <= 0) | ~torch.isfinite(logabs) | ~(cond <= limit)
    return {"logdet": logabs, "sign": sign, "cond": cond, "folded": folded}
