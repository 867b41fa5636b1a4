"""Rex: the McCallum–Foster coupling over any Psi, with coupling zeta in (0, 1] (DESIGN.md §2).

With r_n = w_{n+1}/w_n (per component; 1 for weight kind "one") and auxiliary state x_hat_0 = x_0:

    forward:  x_{n+1}     = r_n (zeta x_n + (1 - zeta) x_hat_n) + w_{n+1} Psi_h(t_n, x_hat_n)
              x_hat_{n+1} = r_n x_hat_n - w_{n+1} Psi_{-h}(t_{n+1}, x_{n+1})
    backward: x_hat_n     = x_hat_{n+1} / r_n + w_n Psi_{-h}(t_{n+1}, x_{n+1})
              x_n         = (x_{n+1} / r_n - (1 - zeta) x_hat_n - w_n Psi_h(t_n, x_hat_n)) / zeta

``psi(t_from, t_to, state, ...)`` is any object with the Princeps call signature and ``component_weights``;
Psi_{-h}(t_{n+1}, .) is ``psi(t_{n+1}, t_n, .)`` (a stochastic Psi reads -W_n from that orientation).
"""
from __future__ import annotations

from rexmol.solvers.princeps import Increment, Princeps
from rexmol.solvers.state import State


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

    def candidate(self, t0: float, t1: float, carry, inc: Increment) -> State:
        """x_{n+1} from the first Psi call."""
        x, xh = carry
        w0, w1 = self.psi.component_weights(t0), self.psi.component_weights(t1)
        z = self.zeta
        out = []
        for xi, xhi, d, a, b in zip(x, xh, inc.increment, w0, w1):
            mixed = xi if z == 1.0 else xi * z + xhi * (1.0 - z)
            out.append(mixed + d if a == 1.0 and b == 1.0 else mixed * (b / a) + d * b)
        return tuple(out)

    def complete(self, t0: float, t1: float, carry, inc: Increment, x1: State) -> tuple[tuple[State, State], int]:
        """x_hat_{n+1} = r x_hat_n - w_{n+1} Psi_{-h}(t_{n+1}, x_{n+1}); returns ((x1, x_hat1), nfe)."""
        back = self.psi(t1, t0, x1)
        w0, w1 = self.psi.component_weights(t0), self.psi.component_weights(t1)
        xh1 = tuple(
            xh - d if a == 1.0 and b == 1.0 else xh * (b / a) - d * b
            for xh, d, a, b in zip(carry[1], back.increment, w0, w1)
        )
        return (x1, xh1), back.nfe

    def step(self, t0: float, t1: float, carry) -> tuple[tuple[State, State], int]:
        """One forward step t0 -> t1 (either direction in t); returns ((x1, x_hat1), nfe)."""
        inc = self.first_psi(t0, t1, carry)
        new, nfe = self.complete(t0, t1, carry, inc, self.candidate(t0, t1, carry, inc))
        return new, inc.nfe + nfe

    def backward(self, t0: float, t1: float, carry1) -> tuple[tuple[State, State], int]:
        """Closed-form inverse of ``step(t0, t1, .)``: from (x_{n+1}, x_hat_{n+1}) back to (x_n, x_hat_n)."""
        x1, xh1 = carry1
        w0, w1 = self.psi.component_weights(t0), self.psi.component_weights(t1)
        back = self.psi(t1, t0, x1)
        xh = tuple(
            v + d if a == 1.0 and b == 1.0 else v * (a / b) + d * a
            for v, d, a, b in zip(xh1, back.increment, w0, w1)
        )
        fwd = self.psi(t0, t1, xh)
        z = self.zeta
        x = []
        for v, vh, d, a, b in zip(x1, xh, fwd.increment, w0, w1):
            base = v - d if a == 1.0 and b == 1.0 else v * (a / b) - d * a
            x.append(base if z == 1.0 else (base - vh * (1.0 - z)) / z)
        return (tuple(x), xh), back.nfe + fwd.nfe
