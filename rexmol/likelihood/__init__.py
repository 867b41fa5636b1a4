"""Exact log-densities of flow samples (DESIGN.md §4).

Modules: ``priors`` (standard and mean-free Gaussian), ``divergence`` (exact trace implementations, Hutchinson),
``cnf`` (augmented (x, ell) dynamics in Lawson coordinates), ``discrete`` (tangent propagation: exact density of
the discrete solver map), ``flow`` (sample with log q, density of given data, round-trip certificate),
``check`` (closed-form Gaussian check behind ``rexmol sample --model gaussian``).
"""
