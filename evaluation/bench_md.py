"""MD speed of ``rexmol md``'s production loop against a bare OpenMM ``integrator.step`` loop (same platform).

The production loop is :func:`rexmol.md.run_replica` itself (frames, chunk commits: XTC append, checkpoint, state
file), run in this process on a copy of the system whose equilibration is cut to ``--equilibration-ps``; its rate
is taken between the first and the last chunk commit (so it includes the commits). The bare loop is
``integrator.step(steps_per_frame)`` on an identically built context. Rounds alternate the two; both are timed in
process CPU time (the machine is shared: wall time would measure the other jobs) and in wall time. Target: ratio
>= 0.9.

    nice -n 10 env OMP_NUM_THREADS=1 .venv/bin/python evaluation/bench_md.py --system ala3 --ps 60 --chunk-ps 10
"""
from __future__ import annotations

import argparse
import re
import shutil
import statistics
import tempfile
import time
from pathlib import Path


class Clock:
    """Progress sink for ``run_replica``: records (CPU time, wall time, steps) at each chunk commit."""

    def __init__(self) -> None:
        self.marks: list[tuple[float, float, int]] = []

    def put(self, item) -> None:
        _, _, steps, _ = item
        self.marks.append((time.process_time(), time.perf_counter(), steps))

    def rates(self) -> tuple[float, float]:
        """Steps per CPU-second and per wall-second between the first and the last commit."""
        steps = sum(m[2] for m in self.marks[1:])
        return steps / (self.marks[-1][0] - self.marks[0][0]), steps / (self.marks[-1][1] - self.marks[0][1])


def short_equilibration_copy(system_name: str, dest: Path, equilibration_ps: float) -> Path:
    """A copy of a shipped system folder with ``equilibration_ps`` replaced (everything else unchanged)."""
    from rexmol.systems import load_system

    system = load_system(system_name)
    folder = dest / system.name
    folder.mkdir(parents=True)
    shutil.copyfile(system.pdb_path, folder / "topology.pdb")
    text = (system.folder / "spec.toml").read_text()
    text = re.sub(r'(?m)^pdb\s*=.*$', 'pdb = "topology.pdb"', text)
    text, n = re.subn(r"(?m)^equilibration_ps\s*=.*$", f"equilibration_ps = {equilibration_ps}", text)
    if n != 1:
        raise ValueError(f"{system.folder / 'spec.toml'}: expected one equilibration_ps line")
    (folder / "spec.toml").write_text(text)
    return folder


def bare_rates(system, platform: str, steps_per_frame: int, n_frames: int) -> tuple[float, float]:
    """Steps per CPU-second and per wall-second of a bare ``integrator.step`` loop after minimisation."""
    import openmm

    from rexmol.md import make_simulation

    context, integrator = make_simulation(system, 1, platform)
    context.setPositions(system.positions)
    openmm.LocalEnergyMinimizer.minimize(context, 10.0, 0)
    integrator.step(steps_per_frame)  # warm up
    c, t = time.process_time(), time.perf_counter()
    for _ in range(n_frames):
        integrator.step(steps_per_frame)
    return n_frames * steps_per_frame / (time.process_time() - c), n_frames * steps_per_frame / (time.perf_counter() - t)


def main(argv: list[str] | None = None) -> None:
    from rexmol.md import MDConfig, run_replica
    from rexmol.systems import load_system

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--system", default="ala3")
    p.add_argument("--platform", default="Reference")
    p.add_argument("--ps", type=float, default=60.0, help="production per round (ps)")
    p.add_argument("--chunk-ps", type=float, default=10.0)
    p.add_argument("--equilibration-ps", type=float, default=1.0)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args(argv)

    rexmol_cpu, rexmol_wall, bare_cpu, bare_wall, ratios = [], [], [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        folder = short_equilibration_copy(args.system, Path(tmp) / "systems", args.equilibration_ps)
        system = load_system(folder)
        steps_per_frame = int(round(system.md["frame_interval_ps"] * 1000.0 / system.md["timestep_fs"]))
        n_frames = int(round(args.ps / system.md["frame_interval_ps"]))
        for r in range(args.repeats):
            out = Path(tmp) / f"run{r}"
            out.mkdir()
            config = MDConfig(system=str(folder), ns=args.ps / 1000.0, replicas=1, seed=r,
                              chunk_ps=args.chunk_ps, platform=args.platform)
            clock = Clock()
            run_replica(config, out, 0, clock)
            rc, rw = clock.rates()
            bc, bw = bare_rates(system, args.platform, steps_per_frame, n_frames)
            rexmol_cpu.append(rc), rexmol_wall.append(rw), bare_cpu.append(bc), bare_wall.append(bw)
            ratios.append(rc / bc)
            shutil.rmtree(out)
    med = statistics.median
    print(f"system {system.name} ({system.spec['forcefield']['nonbonded_method']}), platform {args.platform}, "
          f"{args.ps:g} ps per round in {args.chunk_ps:g} ps chunks, {args.repeats} rounds")
    print(f"bare integrator.step loop: {med(bare_cpu):7.0f} steps/CPU-s  {med(bare_wall):7.0f} steps/wall-s")
    print(f"rexmol.md.run_replica:     {med(rexmol_cpu):7.0f} steps/CPU-s  {med(rexmol_wall):7.0f} steps/wall-s")
    print(f"ratio rexmol / bare (CPU time, median of rounds): {med(ratios):.3f}  "
          f"(range {min(ratios):.3f}-{max(ratios):.3f}); {med(rexmol_cpu) * 86400e-6:.0f} ns/day per core")


if __name__ == "__main__":
    main()
