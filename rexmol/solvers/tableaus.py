"""Butcher tableaux of explicit Runge–Kutta schemes, stored as exact fractions.

Each tableau is data: nodes ``c``, strictly lower-triangular ``a`` (row i holds a_i0 .. a_i,i-1), weights
``b`` and, for embedded pairs, the lower-order weights ``b_embedded`` used for the error estimate.
The float64 views are computed once from the fractions, so convergence tests reach the tableau's order.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from fractions import Fraction as F


@dataclass(frozen=True)
class Tableau:
    """An explicit RK scheme. ``order`` is the order of ``b``; ``embedded_order`` that of ``b_embedded``."""

    name: str
    c: tuple[F, ...]
    a: tuple[tuple[F, ...], ...]
    b: tuple[F, ...]
    order: int
    b_embedded: tuple[F, ...] | None = None
    embedded_order: int | None = None
    fsal: bool = False
    c_f: tuple[float, ...] = field(init=False, repr=False)
    a_f: tuple[tuple[float, ...], ...] = field(init=False, repr=False)
    b_f: tuple[float, ...] = field(init=False, repr=False)
    b_err_f: tuple[float, ...] | None = field(init=False, repr=False)

    def __post_init__(self) -> None:
        s = len(self.c)
        if len(self.a) != s or any(len(row) != i for i, row in enumerate(self.a)) or len(self.b) != s:
            raise ValueError(f"tableau {self.name}: c, a, b must describe {s} explicit stages")
        for i, row in enumerate(self.a):
            if sum(row, F(0)) != self.c[i]:
                raise ValueError(f"tableau {self.name}: row {i} of a does not sum to c_{i}")
        if sum(self.b, F(0)) != 1:
            raise ValueError(f"tableau {self.name}: weights b do not sum to 1")
        if (self.b_embedded is None) != (self.embedded_order is None):
            raise ValueError(f"tableau {self.name}: b_embedded and embedded_order go together")
        if self.b_embedded is not None and (len(self.b_embedded) != s or sum(self.b_embedded, F(0)) != 1):
            raise ValueError(f"tableau {self.name}: embedded weights must have {s} entries summing to 1")
        if self.fsal and (self.c[-1] != 1 or tuple(self.a[-1]) != tuple(self.b[:-1]) or self.b[-1] != 0):
            raise ValueError(f"tableau {self.name}: FSAL needs a last row equal to b and c_last = 1")
        set_ = object.__setattr__
        set_(self, "c_f", tuple(float(x) for x in self.c))
        set_(self, "a_f", tuple(tuple(float(x) for x in row) for row in self.a))
        set_(self, "b_f", tuple(float(x) for x in self.b))
        err = None if self.b_embedded is None else tuple(float(b - e) for b, e in zip(self.b, self.b_embedded))
        set_(self, "b_err_f", err)

    @property
    def stages(self) -> int:
        return len(self.c)

    @property
    def solution_stages(self) -> int:
        """Stages needed for the solution alone (trailing stages with b_i = 0 serve only the error estimate)."""
        return max(i for i, b in enumerate(self.b) if b != 0) + 1

    @property
    def error_order(self) -> int | None:
        """Order q of the error estimate (min of the pair); the controller uses exponent 1/(q+1)."""
        return None if self.embedded_order is None else min(self.order, self.embedded_order)


def _f(*xs) -> tuple[F, ...]:
    return tuple(F(x) for x in xs)


EULER = Tableau("euler", c=_f(0), a=((),), b=_f(1), order=1)
MIDPOINT = Tableau("midpoint", c=_f(0, "1/2"), a=((), _f("1/2")), b=_f(0, 1), order=2)
HEUN = Tableau("heun", c=_f(0, 1), a=((), _f(1)), b=_f("1/2", "1/2"), order=2)
RK4 = Tableau(
    "rk4",
    c=_f(0, "1/2", "1/2", 1),
    a=((), _f("1/2"), _f(0, "1/2"), _f(0, 0, 1)),
    b=_f("1/6", "1/3", "1/3", "1/6"),
    order=4,
)
BOSH3 = Tableau(
    "bosh3",
    c=_f(0, "1/2", "3/4", 1),
    a=((), _f("1/2"), _f(0, "3/4"), _f("2/9", "1/3", "4/9")),
    b=_f("2/9", "1/3", "4/9", 0),
    order=3,
    b_embedded=_f("7/24", "1/4", "1/3", "1/8"),
    embedded_order=2,
    fsal=True,
)
DOPRI5 = Tableau(
    "dopri5",
    c=_f(0, "1/5", "3/10", "4/5", "8/9", 1, 1),
    a=(
        (),
        _f("1/5"),
        _f("3/40", "9/40"),
        _f("44/45", "-56/15", "32/9"),
        _f("19372/6561", "-25360/2187", "64448/6561", "-212/729"),
        _f("9017/3168", "-355/33", "46732/5247", "49/176", "-5103/18656"),
        _f("35/384", 0, "500/1113", "125/192", "-2187/6784", "11/84"),
    ),
    b=_f("35/384", 0, "500/1113", "125/192", "-2187/6784", "11/84", 0),
    order=5,
    b_embedded=_f("5179/57600", 0, "7571/16695", "393/640", "-92097/339200", "187/2100", "1/40"),
    embedded_order=4,
    fsal=True,
)

TABLEAUS: dict[str, Tableau] = {t.name: t for t in (EULER, MIDPOINT, HEUN, RK4, BOSH3, DOPRI5)}


def get_tableau(name: str) -> Tableau:
    """The tableau called ``name`` (one of ``TABLEAUS``), with a clear error otherwise."""
    try:
        return TABLEAUS[name]
    except KeyError:
        raise ValueError(f"unknown tableau {name!r}; known: {', '.join(TABLEAUS)}") from None
