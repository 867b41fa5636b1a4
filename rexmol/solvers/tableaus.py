"""Butcher tableaux of explicit Runge–Kutta schemes, stored as exact fractions.

Each tableau is data: nodes ``c``, strictly lower-triangular ``a`` (row i holds a_i0 .. a_i,i-1), weights
``b`` and, for embedded pairs, the lower-order weights ``b_embedded`` used for the error estimate.
The float64 views are computed once from the fractions, so convergence tests reach the tableau's order.
Tableaux with irrational coefficients (Tsit5) store 85-digit decimal expansions as fractions and declare that
accuracy as ``tolerance``; every consistency check then holds to within it.
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
    tolerance: F = F(0)  # 0: exact rationals; else the accuracy of decimal expansions of irrational coefficients
    c_f: tuple[float, ...] = field(init=False, repr=False)
    a_f: tuple[tuple[float, ...], ...] = field(init=False, repr=False)
    b_f: tuple[float, ...] = field(init=False, repr=False)
    b_err_f: tuple[float, ...] | None = field(init=False, repr=False)

    def __post_init__(self) -> None:
        s = len(self.c)
        if len(self.a) != s or any(len(row) != i for i, row in enumerate(self.a)) or len(self.b) != s:
            raise ValueError(f"tableau {self.name}: c, a, b must describe {s} explicit stages")
        for i, row in enumerate(self.a):
            if not self.agrees(sum(row, F(0)), self.c[i]):
                raise ValueError(f"tableau {self.name}: row {i} of a does not sum to c_{i}")
        if not self.agrees(sum(self.b, F(0)), 1):
            raise ValueError(f"tableau {self.name}: weights b do not sum to 1")
        if (self.b_embedded is None) != (self.embedded_order is None):
            raise ValueError(f"tableau {self.name}: b_embedded and embedded_order go together")
        embedded = self.b_embedded
        if embedded is not None and (len(embedded) != s or not self.agrees(sum(embedded, F(0)), 1)):
            raise ValueError(f"tableau {self.name}: embedded weights must have {s} entries summing to 1")
        if self.fsal and (self.c[-1] != 1 or tuple(self.a[-1]) != tuple(self.b[:-1]) or self.b[-1] != 0):
            raise ValueError(f"tableau {self.name}: FSAL needs a last row equal to b and c_last = 1")
        set_ = object.__setattr__
        set_(self, "c_f", tuple(float(x) for x in self.c))
        set_(self, "a_f", tuple(tuple(float(x) for x in row) for row in self.a))
        set_(self, "b_f", tuple(float(x) for x in self.b))
        err = None if self.b_embedded is None else tuple(float(b - e) for b, e in zip(self.b, self.b_embedded))
        set_(self, "b_err_f", err)

    def agrees(self, value: F, target: F | int) -> bool:
        """``value == target`` up to the tableau's ``tolerance`` (exactly for rational tableaux)."""
        return abs(value - target) <= self.tolerance

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

# Tsitouras (2011), "Runge-Kutta pairs of order 5(4) satisfying only the first column simplifying assumption",
# Comput. Math. Appl. 62, 770-775. Its coefficients are not short rationals (c_2..c_5 are free parameters of the
# construction, c_5 = 0.98002554...); these are the 85-digit expansions distributed with DiffEqDevTools.jl
# (Tsitouras5), whose float64 roundings are the published Tsit5 values. Order 5, embedded order 4, FSAL.
_TSIT5_B = _f(".9646076681806522951816731316512876333711995238157997181903319145764851595234062815396e-1", "1/100",
              ".4798896504144995747752495322905965199130404621990332488332634944254542060153074523509",
              "1.379008574103741893192274821856872770756462643091360525934940067397245698027561293331",
              "-3.290069515436080679901047585711363850115683290894936158531296799594813811049925401677",
              "2.324710524099773982415355918398765796109060233222962411944060046314465391054716027841", 0)
TSIT5 = Tableau(
    "tsit5",
    c=_f(0, "161/1000", "327/1000", "9/10",
         ".9800255409045096857298102862870245954942137979563024768854764293221195950761080302604", 1, 1),
    a=(
        (),
        _f("161/1000"),
        _f("-.8480655492356988544426874250230774675121177393430391537369234245294192976164141156943e-2",
           ".3354806554923569885444268742502307746751211773934303915373692342452941929761641411569"),
        _f("2.897153057105493432130432594192938764924887287701866490314866693455023795137503079289",
           "-6.359448489975074843148159912383825625952700647415626703305928850207288721235210244366",
           "4.362295432869581411017727318190886861027813359713760212991062156752264926097707165077"),
        _f("5.325864828439256604428877920840511317836476253097040101202360397727981648835607691791",
           "-11.74888356406282787774717033978577296188744178259862899288666928009020615663593781589",
           "7.495539342889836208304604784564358155658679161518186721010132816213648793440552049753",
           "-.9249506636175524925650207933207191611349983406029535244034750452930469056411389539635e-1"),
        _f("5.861455442946420028659251486982647890394337666164814434818157239052507339770711679748",
           "-12.92096931784710929170611868178335939541780751955743459166312250439928519268343184452",
           "8.159367898576158643180400794539253485181918321135053305748355423955009222648673734986",
           "-.7158497328140099722453054252582973869127213147363544882721139659546372402303777878835e-1",
           "-.2826905039406838290900305721271224146717633626879770007617876201276764571291579142206e-1"),
        _TSIT5_B[:6],
    ),
    b=_TSIT5_B,
    order=5,
    b_embedded=_f(".9468075576583945807478876255758922856117527357724631226139574065785592789071067303271e-1",
                  ".9183565540343253096776363936645313759813746240984095238905939532922955247253608687270e-2",
                  ".4877705284247615707855642599631228241516691959761363774365216240304071651579571959813",
                  "1.234297566930478985655109673884237654035539930748192848315425833500484878378061439761",
                  "-2.707712349983525454881109975059321670689605166938197378763992255714444407154902012702",
                  "1.866628418170587035753719399566211498666255505244122593996591602841258328965767580089",
                  "1/66"),
    embedded_order=4,
    fsal=True,
    tolerance=F(1, 10**80),
)

TABLEAUS: dict[str, Tableau] = {t.name: t for t in (EULER, MIDPOINT, HEUN, RK4, BOSH3, DOPRI5, TSIT5)}


def get_tableau(name: str) -> Tableau:
    """The tableau called ``name`` (one of ``TABLEAUS``), with a clear error otherwise."""
    try:
        return TABLEAUS[name]
    except KeyError:
        raise ValueError(f"unknown tableau {name!r}; known: {', '.join(TABLEAUS)}") from None
