"""Rex: the McCallum–Foster coupling over any Psi, with coupling zeta in (0, 1] (docs/design.md §2).

With r_n = w_{n+1}/w_n (per component; 1 for weight kind "one") and auxiliary state x_hat_0 = x_0:

    forward:  x_{n+1}     = r_n (zeta x_n + (1 - zeta) x_hat_n) + w_{n+1} Psi_h(t_n, x_hat_n)
              x_hat_{n+1} = r_n x_hat_n - w_{n+1} Psi_{-h}(t_{n+1}, x_{n+1})
    backward: x_hat_n     = x_hat_{n+1} / r_n + w_n Psi_{-h}(t_{n+1}, x_{n+1})
              x_n         = (x_{n+1} / r_n - (1 - zeta) x_hat_n - w_n Psi_h(t_n, x_hat_n)) / zeta

``psi(t_from, t_to, state, ...)`` is any object with the Princeps call signature and ``component_weights``;
Psi_{-h}(t_{n+1}, .) is ``psi(t_{n+1}, t_n, .)`` (a stochastic Psi reads -W_n from that orientation).
Times are floats or per-sample [B] tensors (then r_n and w_n are per sample).

A forward step makes two Psi calls, and both are integration steps of the same ODE (x_hat_{n+1} feeds the next
Psi_h), so adaptive control checks the embedded error of both: ``closing_psi`` with ``with_error=True``.
"""
from __future__ import annotations

from rexmol.solvers.princeps import Increment, Princeps
from rexmol.solvers.state import State, is_const, per_sample


def _ratio_update(v, d, a, b, sign: float):
    """r v + sign b d with r = b / a, per component (the exact identity when a = b = 1)."""
    if is_const(a, 1.0) and is_const(b, 1.0):
        return v + d if sign > 0 else v - d
    scaled = v * per_sample(b / a, v)
    return scaled + d * per_sample(b, d) if sign > 0 else scaled - d * per_sample(b, d)


class RexSolver:
    """Algebraically reversible solver. Its carry is the pair ``(x, x_hat)`` of tuple states."""

    reversible = True
    uses_fsal = False

    def __init__(self, psi: Princeps, zeta: float = 1.0):
        zeta = float(zeta)
        if not 0.0 < zeta <= 1.0:
            raise ValueError(f"Rex coupling zeta must lie in (0, 1], got {zeta}")
        self.psi, self.zeta = psi, zeta

    def __repr__(self) -> str:
        return f"RexSolver({self.psi!r}, zeta={self.zeta})"

    def start(self, state: State) -> tuple[State, State]:
        return state, state

    def first_psi(self, t0: float, t1: float, carry, first_stage: State | None = None, with_error: bool = False):
        """Psi_h(t_n, x_hat_n): the call whose embedded error drives step control."""
        return self.psi(t0, t1, carry[1], first_stage=first_stage, with_error=with_error)

    def candidate(self, t0, t1, carry, inc: Increment) -> State:
        """x_{n+1} from the first Psi call."""
        x, xh = carry
        w0, w1 = self.psi.component_weights(t0), self.psi.component_weights(t1)
        z = self.zeta
        out = []
        for xi, xhi, d, a, b in zip(x, xh, inc.increment, w0, w1):
            mixed = xi if z == 1.0 else xi * z + xhi * (1.0 - z)
            out.append(_ratio_update(mixed, d, a, b, 1.0))
        return tuple(out)

    def closing_psi(self, t0, t1, x1: State, with_error: bool = False) -> Increment:
        """Psi_{-h}(t_{n+1}, x_{n+1}): the second call of the step t0 -> t1."""
        return self.psi(t1, t0, x1, with_error=with_error)

    def finish(self, t0, t1, carry, x1: State, back: Increment) -> tuple[State, State]:
        """(x_{n+1}, x_hat_{n+1}) with x_hat_{n+1} = r x_hat_n - w_{n+1} Psi_{-h}(t_{n+1}, x_{n+1})."""
        w0, w1 = self.psi.component_weights(t0), self.psi.component_weights(t1)
        xh1 = tuple(_ratio_update(xh, d, a, b, -1.0) for xh, d, a, b in zip(carry[1], back.increment, w0, w1))
        return x1, xh1

    def complete(self, t0, t1, carry, inc: Increment, x1: State) -> tuple[tuple[State, State], int]:
        """Closing call and x_hat_{n+1}; returns ((x1, x_hat1), nfe)."""
        back = self.closing_psi(t0, t1, x1)
        return self.finish(t0, t1, carry, x1, back), back.nfe

    def step(self, t0, t1, carry) -> tuple[tuple[State, State], int]:
        """One forward step t0 -> t1 (either direction in t); returns ((x1, x_hat1), nfe)."""
        inc = self.first_psi(t0, t1, carry)
        new, nfe = self.complete(t0, t1, carry, inc, self.candidate(t0, t1, carry, inc))
        return new, inc.nfe + nfe

    def backward(self, t0, t1, carry1) -> tuple[tuple[State, State], int]:
        """Closed-form inverse of ``step(t0, t1, .)``: from (x_{n+1}, x_hat_{n+1}) back to (x_n, x_hat_n)."""
        x1, xh1 = carry1
        w0, w1 = self.psi.component_weights(t0), self.psi.component_weights(t1)
        back = self.psi(t1, t0, x1)
        xh = tuple(_ratio_update(v, d, b, a, 1.0) for v, d, a, b in zip(xh1, back.increment, w0, w1))
        fwd = self.psi(t0, t1, xh)
        z = self.zeta
        x = []
        for v, vh, d, a, b in zip(x1, xh, fwd.increment, w0, w1):
            base = _ratio_update(v, d, b, a, -1.0)
            x.append(base if z == 1.0 else (base - vh * (1.0 - z)) / z)
        return (tuple(x), xh), back.nfe + fwd.nfe
