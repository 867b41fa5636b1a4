"""Exactly reversible (Rex) and baseline ODE solvers for diffusion / flow-matching models.

Chemistry-free: states are tuples of tensors batched over a leading dim B; models are called as
``model(x [B, *shape], t [B]) -> [B, *shape]``. See the README section "Solvers" and docs/design.md §2.
"""
from rexmol.solvers.brownian import BrownianTree
from rexmol.solvers.control import AdaptiveSteps, StepRecord
from rexmol.solvers.dynamics import Dynamics, ModelDynamics, model_output, time_vector
from rexmol.solvers.grids import FixedGrid
from rexmol.solvers.lawson import LAWSON_KINDS, LawsonCoordinates
from rexmol.solvers.princeps import Increment, Princeps, PrincepsSolver
from rexmol.solvers.rex import RexSolver
from rexmol.solvers.sde import SDE_SOLVER_NAMES, SDECoordinates, StochasticPsi, make_sde_solver
from rexmol.solvers.schedules import OUTPUT_KINDS, VP, FlowMatching, Schedule
from rexmol.solvers.solve import Solution, invert, make_solver, solve
from rexmol.solvers.state import WEIGHT_KINDS, NonFiniteError, State, as_state
from rexmol.solvers.tableaus import TABLEAUS, Tableau, get_tableau

__all__ = [
    "AdaptiveSteps", "StepRecord", "Dynamics", "ModelDynamics", "model_output", "time_vector", "FixedGrid",
    "LAWSON_KINDS", "LawsonCoordinates", "Increment", "Princeps", "PrincepsSolver", "RexSolver", "OUTPUT_KINDS",
    "VP", "FlowMatching", "Schedule", "Solution", "invert", "make_solver", "solve",
    "WEIGHT_KINDS", "NonFiniteError", "State", "as_state", "TABLEAUS", "Tableau", "get_tableau",
    "BrownianTree", "SDE_SOLVER_NAMES", "SDECoordinates", "StochasticPsi", "make_sde_solver",
]
