"""Keep freed memory in the process (glibc malloc): tensors of a few MiB, allocated and freed at every step.

Why: a network evaluation allocates and frees dozens of activations of 1-4 MiB (batch 64 x 33 tokens x 384
floats is 3.2 MiB). With glibc's defaults the heap top above 2x the largest freed block is handed back to the
kernel at each free and faulted in again, page by page, at the next allocation: measured on the shipped
generator, 7 % of the sampling CPU (1.8 of 29 CPU-s, nearly all of the system time) and 10-13 % of a bare
network call. Raising the trim threshold and the top pad keeps those pages; the mmap threshold is fixed at
glibc's maximum (32 MiB) so blocks up to that size come from the heap as well. Peak memory is unchanged (pages
are kept, not added). Only the allocator's policy changes: no result depends on it.

Applied by the ``rexmol`` command line for its own process (``mallopt``) and, through the environment, for the
worker processes it starts. A user's own ``MALLOC_*`` settings win: nothing is changed when any is set.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os

# name: (mallopt parameter of malloc.h, value in bytes); the mmap threshold at glibc's maximum on 64-bit systems.
TUNING = {"MMAP_THRESHOLD": (-3, 32 << 20), "TRIM_THRESHOLD": (-1, 1 << 30), "TOP_PAD": (-2, 64 << 20)}
SETTINGS = dict(TUNING.values())
ENVIRONMENT = {f"MALLOC_{name}_": str(value) for name, (_, value) in TUNING.items()}


def tune_allocator() -> bool:
    """Apply :data:`SETTINGS` to this process and :data:`ENVIRONMENT` for its children; True when applied
    (glibc present and no ``MALLOC_*`` variable set by the user), False otherwise (nothing changed)."""
    if any(key.startswith("MALLOC_") for key in os.environ):
        return False
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        mallopt = ctypes.CDLL(name).mallopt
    except (OSError, AttributeError):  # not glibc (macOS, musl without mallopt)
        return False
    if not all(mallopt(param, value) == 1 for param, value in SETTINGS.items()):
        return False
    os.environ.update(ENVIRONMENT)
    return True
