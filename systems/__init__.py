"""Molecular systems as data, one folder per system (``ala3/``, ``ala3-sbg/``, ``ala2/``).

Each folder holds a topology PDB built by rexmol's own code and a ``spec.toml`` (force-field files, implicit
solvent, temperature, cutoff, MD protocol, backbone dihedral atoms). Read only through
:func:`rexmol.systems.load_system`. Installed inside the wheel as the package ``rexmol_systems``.
"""
