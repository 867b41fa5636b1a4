"""``rexmol md SYSTEM --ns N --replicas K --out DIR --seed S``: resumable OpenMM data generation."""
from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path


def configure(parser: argparse.ArgumentParser) -> None:
    """Options of ``rexmol md``."""
    parser.add_argument("system", help="system name (e.g. ala3) or a system folder")
    parser.add_argument("--ns", type=float, required=True, help="production length per replica (ns)")
    parser.add_argument("--replicas", type=int, default=2, help="independent trajectories")
    parser.add_argument("--workers", type=int, default=None, help="parallel processes (None: one per core)")
    parser.add_argument("--out", type=Path, required=True, help="output folder (rerun to resume)")
    parser.add_argument("--chunk-ps", type=float, default=100.0, help="frames committed per chunk (ps)")
    parser.add_argument("--platform", default=None,
                        help="OpenMM platform (default: the system's measured choice; 'auto' prefers CUDA)")


def run(args: argparse.Namespace) -> int:
    from rexmol.md import MDConfig, run_md

    if args.workers is not None and args.workers < 1:
        raise ValueError(f"--workers must be >= 1, got {args.workers}")
    config = MDConfig(system=args.system, ns=args.ns, replicas=args.replicas, seed=args.seed,
                      chunk_ps=args.chunk_ps, platform=args.platform)
    command = "rexmol " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    manifest = run_md(config, args.out, workers=args.workers, quiet=args.quiet, command=command)
    from rexmol.dataset_summary import summarise_dataset

    summarise_dataset(args.out)  # summary.json + ramachandran.png
    if not args.quiet:
        print(f"{args.out}: {manifest['total_ns']:.3f} ns in {len(manifest['replicas'])} replicas")
    return 0
