"""Exact log-densities of flow samples (docs/design.md §4).

Modules: ``priors`` (standard and mean-free Gaussian), ``divergence`` (exact trace implementations, Hutchinson),
``cnf`` (augmented (x, ell) dynamics in Lawson coordinates), ``discrete`` (tangent propagation: exact density of
the discrete solver map), ``flow`` (sample with log q, density of given data, round-trip certificate),
``check`` (closed-form Gaussian check behind ``rexmol sample --model gaussian``). The public names of
``priors``, ``divergence`` and ``flow`` are re-exported here (``__all__``).
"""
from rexmol.likelihood.divergence import ExactTrace, Hutchinson
from rexmol.likelihood.flow import (LOGQ_MODES, Certificate, FlowSamples, LogQOptions, freeze_grid, log_density,
                                    roundtrip_certificate, sample_with_logq)
from rexmol.likelihood.priors import MaskedGaussian, MeanFreeGaussian, StandardGaussian

__all__ = [
    "ExactTrace", "Hutchinson", "LOGQ_MODES", "Certificate", "FlowSamples", "LogQOptions", "freeze_grid",
    "log_density", "roundtrip_certificate", "sample_with_logq", "MaskedGaussian", "MeanFreeGaussian",
    "StandardGaussian",
]
