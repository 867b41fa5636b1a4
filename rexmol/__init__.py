"""rexmol: Boltzmann sampling of molecules with exactly reversible (Rex) solvers and exact log-densities."""
__version__ = "0.1.0"
