"""Molecular-dynamics data generation with OpenMM: independent replicas, resumable, atomic outputs.

Layout of an output folder (see :mod:`rexmol.mddata` for the reader)::

    topology.pdb                 the system's topology (reference frame)
    replica_000.xtc              frames every ``frame_interval_ps`` (nm, XTC precision 1e-3 nm)
    replica_000.state.json       progress: frames written, XTC byte length, current checkpoint file and its SHA-256
    replica_000.f<frames>.chk    OpenMM checkpoint after that many frames (positions, velocities, RNG state)
    manifest.json                system spec, seeds, lengths, versions, split assignment, command

Each chunk is simulated in memory, its frames appended to the XTC (XTC frames are self-contained records,
so appending bytes keeps a valid file), a new checkpoint written, and only then the state file replaced
atomically. On resume the XTC is truncated to the length the state file records and the checkpoint it names
is loaded: an interruption loses at most the chunk in flight, and the resumed trajectory is the same as an
uninterrupted one (the checkpoint carries the Langevin integrator's random state).

A state file is written (0 frames) before the first byte of a replica's XTC, so every other inconsistency is
damage, not an interruption, and is refused with the file and the fix named, never repaired by guessing: an XTC
shorter than its state records, an XTC without a state file, a missing or unreadable state file or checkpoint,
replica files beyond ``--replicas``.
"""
from __future__ import annotations

import hashlib
import json
import math
import multiprocessing as mp
import os
import platform
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from rexmol.atomic import write_atomic
from rexmol.systems import System, load_system

SPLIT_FRACTIONS = (("train", 0.80), ("val", 0.05), ("test", 0.15))


@dataclass(frozen=True)
class MDConfig:
    """One MD run: ``replicas`` independent trajectories of ``ns`` nanoseconds of production each."""

    system: str
    ns: float
    replicas: int
    seed: int
    chunk_ps: float = 100.0
    platform: str | None = None  # None: the system spec's measured choice (rexmol.energy.choose_platform)
    split_window_ns: float = 10.0

    def __post_init__(self) -> None:
        for name, value in (("ns", self.ns), ("chunk_ps", self.chunk_ps), ("split_window_ns", self.split_window_ns)):
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"--{name.replace('_', '-')} must be a finite number > 0, got {value!r}")
        if self.replicas < 1:
            raise ValueError(f"--replicas must be >= 1, got {self.replicas}")
        if self.seed < 0:
            raise ValueError(f"--seed must be >= 0, got {self.seed}")

    def replica_seed(self, replica: int) -> int:
        """Integrator seed of one replica, derived from the run seed (positive 31-bit int as OpenMM wants)."""
        return int(np.random.SeedSequence([self.seed, replica]).generate_state(1)[0] % (2**31 - 2)) + 1


def software_versions() -> dict[str, str]:
    """Versions of the software that made an output (recorded in every manifest)."""
    import mdtraj
    import openmm

    from rexmol import __version__

    versions = {"rexmol": __version__, "openmm": openmm.__version__, "mdtraj": mdtraj.__version__,
                "numpy": np.__version__, "python": platform.python_version()}
    try:
        import torch

        versions["torch"] = torch.__version__
    except ImportError:  # pragma: no cover
        pass
    return versions


def write_json_atomic(path: Path, obj: Any) -> None:
    write_atomic(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def make_simulation(system: System, seed: int, platform_name: str, timestep_fs: float | None = None):
    """Context + LangevinMiddleIntegrator for ``system`` as its spec prescribes (``timestep_fs``: another step,
    for time-step studies)."""
    import openmm
    import openmm.unit as unit

    md = system.md
    dt = md["timestep_fs"] if timestep_fs is None else timestep_fs
    integrator = openmm.LangevinMiddleIntegrator(
        system.temperature * unit.kelvin, md["friction_per_ps"] / unit.picosecond, dt * unit.femtosecond
    )
    integrator.setRandomNumberSeed(seed)
    plat = openmm.Platform.getPlatformByName(platform_name)
    properties = {"Threads": "1"} if platform_name == "CPU" else {}
    context = openmm.Context(system.create_openmm_system(), integrator, plat, properties)
    return context, integrator


class Replica:
    """One resumable trajectory in ``out``: files ``replica_<i>.xtc``, ``.state.json``, ``.f<n>.chk``."""

    def __init__(self, out: Path, index: int) -> None:
        self.out, self.index = Path(out), index
        self.xtc = self.out / f"replica_{index:03d}.xtc"
        self.state_file = self.out / f"replica_{index:03d}.state.json"

    @property
    def files(self) -> list[Path]:
        """Every file of this replica on disk (XTC, state file, checkpoints)."""
        return sorted(self.out.glob(f"replica_{self.index:03d}.*"))

    def restart_hint(self) -> str:
        return (f"restore it from a backup, or delete {self.out}/replica_{self.index:03d}.* to re-simulate replica "
                f"{self.index} from frame 0")

    def state(self) -> dict[str, Any]:
        """The committed state (``n_frames``, ``xtc_bytes``, ``checkpoint``); ValueError if it is unreadable."""
        if not self.state_file.is_file():
            if self.xtc.exists():
                raise ValueError(f"{self.state_file} is missing but {self.xtc.name} exists, so how many of its frames "
                                 f"are committed is unknown; {self.restart_hint()}")
            return {"n_frames": 0, "xtc_bytes": 0, "checkpoint": None}
        try:
            state = json.loads(self.state_file.read_text())
            valid = (isinstance(state, dict) and isinstance(state.get("n_frames"), int)
                     and isinstance(state.get("xtc_bytes"), int) and state["n_frames"] >= 0 and state["xtc_bytes"] >= 0
                     and (state.get("checkpoint") is None) == (state["n_frames"] == 0))
        except (ValueError, UnicodeDecodeError):
            valid = False
        if not valid:
            raise ValueError(f"{self.state_file} is not a valid replica state file; {self.restart_hint()}")
        return state

    def begin(self) -> None:
        """Record 0 committed frames before the first byte of the XTC is written (see the module doc)."""
        if not self.state_file.is_file() and not self.xtc.exists():
            write_json_atomic(self.state_file, {"n_frames": 0, "xtc_bytes": 0, "checkpoint": None})

    def check(self, state: dict[str, Any]) -> None:
        """Refuse a replica whose files disagree with its state (ValueError naming the file and the fix)."""
        size = self.xtc.stat().st_size if self.xtc.exists() else 0
        if size < state["xtc_bytes"]:
            raise ValueError(f"{self.xtc} holds {size} bytes but {self.state_file.name} records {state['xtc_bytes']} "
                             f"({state['n_frames']} committed frames): the trajectory lost committed frames; "
                             f"{self.restart_hint()}")
        if state["checkpoint"]:
            chk = self.out / state["checkpoint"]
            if not chk.is_file():
                raise ValueError(f"{chk} named by {self.state_file.name} is missing; {self.restart_hint()}")
            if "checkpoint_sha256" in state and sha256_bytes(chk.read_bytes()) != state["checkpoint_sha256"]:
                raise ValueError(f"{chk} is damaged (its SHA-256 differs from the one {self.state_file.name} "
                                 f"records); {self.restart_hint()}")

    def checkpoint_path(self, n_frames: int) -> Path:
        return self.out / f"replica_{self.index:03d}.f{n_frames:07d}.chk"

    def truncate_to_state(self, state: dict[str, Any]) -> None:
        """Drop XTC bytes written after the last committed chunk (an interrupted append); see :meth:`check`."""
        self.check(state)
        if self.xtc.exists() and self.xtc.stat().st_size > state["xtc_bytes"]:
            with open(self.xtc, "r+b") as fh:
                fh.truncate(state["xtc_bytes"])

    def commit_chunk(self, frames: np.ndarray, times_ps: np.ndarray, checkpoint: bytes, n_frames: int) -> None:
        """Append ``frames`` [F, N, 3] nm, then checkpoint, then the state file (the commit point)."""
        from mdtraj.formats import XTCTrajectoryFile

        old = self.state()
        with tempfile.TemporaryDirectory(dir=self.out) as tmp:
            part = Path(tmp) / "chunk.xtc"
            with XTCTrajectoryFile(str(part), "w") as fh:
                fh.write(frames.astype(np.float32), time=times_ps.astype(np.float32))
            with open(self.xtc, "ab") as dst, open(part, "rb") as src:
                shutil.copyfileobj(src, dst)
                dst.flush()
                os.fsync(dst.fileno())
        chk = self.checkpoint_path(n_frames)
        write_atomic(chk, checkpoint)
        write_json_atomic(self.state_file, {"n_frames": n_frames, "xtc_bytes": self.xtc.stat().st_size,
                                            "checkpoint": chk.name, "checkpoint_sha256": sha256_bytes(checkpoint)})
        if old["checkpoint"] and old["checkpoint"] != chk.name:
            (self.out / old["checkpoint"]).unlink(missing_ok=True)


def load_checkpoint(context, path: Path, hint: str) -> None:
    """``context.loadCheckpoint`` of ``path``; ValueError naming the file if OpenMM cannot read it."""
    import openmm

    try:
        context.loadCheckpoint(path.read_bytes())
    except openmm.OpenMMException as err:
        raise ValueError(f"{path} is not a readable OpenMM checkpoint of this system "
                         f"({' '.join(str(err).split())}); {hint}") from err


def equilibrate(integrator, n_steps: int, on_progress: Callable[[int, int], None] | None = None) -> None:
    """``integrator.step(n_steps)`` in about 50 parts, calling ``on_progress(done, n_steps)`` after each."""
    part = max(1, -(-n_steps // 50))
    for done in range(0, n_steps, part):
        integrator.step(min(part, n_steps - done))
        if on_progress is not None:
            on_progress(min(done + part, n_steps), n_steps)


def run_replica(config: MDConfig, out: Path, index: int, progress=None,
                on_equilibration: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """Simulate (or resume) replica ``index`` of ``config`` until it holds its target number of frames.

    ``progress.put((index, frames, steps, seconds))`` after each committed chunk; ``on_equilibration(done,
    total)`` (steps) during the unrecorded equilibration of a fresh replica.
    """
    import openmm
    import openmm.unit as unit

    system = load_system(config.system)
    md = system.md
    steps_per_frame = int(round(md["frame_interval_ps"] * 1000.0 / md["timestep_fs"]))
    frames_per_chunk = max(1, int(round(config.chunk_ps / md["frame_interval_ps"])))
    target = int(round(config.ns * 1000.0 / md["frame_interval_ps"]))
    seed = config.replica_seed(index)
    replica = Replica(out, index)
    state = replica.state()
    replica.truncate_to_state(state)
    replica.begin()
    from rexmol.energy import choose_platform

    context, integrator = make_simulation(system, seed, choose_platform(config.platform, system))
    if state["checkpoint"]:
        load_checkpoint(context, out / state["checkpoint"], replica.restart_hint())
    else:  # minimise from the reference frame, then equilibrate (not recorded)
        context.setPositions(system.positions)
        tol = md.get("minimise_tolerance_kj_per_mol_nm", 10.0)
        openmm.LocalEnergyMinimizer.minimize(context, tol, 0)
        context.setVelocitiesToTemperature(system.temperature * unit.kelvin, seed)
        equilibrate(integrator, int(round(md["equilibration_ps"] * 1000.0 / md["timestep_fs"])), on_equilibration)
        context.setTime(0.0)
    n = state["n_frames"]
    while n < target:
        count = min(frames_per_chunk, target - n)
        frames = np.empty((count, system.n_atoms, 3), dtype=np.float64)
        t0 = time.perf_counter()
        for f in range(count):
            integrator.step(steps_per_frame)
            frames[f] = context.getState(getPositions=True).getPositions(asNumpy=True)._value
        if not np.isfinite(frames).all():
            raise RuntimeError(f"replica {index}: non-finite coordinates after frame {n}: the simulation blew up")
        times = (n + 1 + np.arange(count)) * md["frame_interval_ps"]
        replica.commit_chunk(frames, times, context.createCheckpoint(), n + count)
        n += count
        if progress is not None:
            progress.put((index, count, count * steps_per_frame, time.perf_counter() - t0))
    return {"index": index, "seed": seed, "trajectory": replica.xtc.name, "n_frames": n}


def split_blocks(n_frames_per_replica: list[int], window: int) -> dict[str, list[list[int]]]:
    """Contiguous train/val/test blocks: every ``window`` frames of a replica are cut by ``SPLIT_FRACTIONS``.

    Frames are never interleaved across splits (each block is tens of thousands of consecutive frames), and a
    frame's split depends only on its index: a run that grows (resume with a larger ``--ns``) keeps every
    earlier assignment, so a model trained on an early snapshot never sees a later test frame, and a test
    set exists from the first window on.
    """
    splits: dict[str, list[list[int]]] = {name: [] for name, _ in SPLIT_FRACTIONS}
    edges = np.cumsum([0] + [int(round(frac * window)) for _, frac in SPLIT_FRACTIONS])
    edges[-1] = window
    for r, n in enumerate(n_frames_per_replica):
        for w0 in range(0, n, window):
            for k, (name, _) in enumerate(SPLIT_FRACTIONS):
                lo, hi = min(w0 + edges[k], n), min(w0 + edges[k + 1], n)
                if hi > lo:
                    splits[name].append([r, int(lo), int(hi)])
    return splits


def write_manifest(config: MDConfig, out: Path, command: str | None = None) -> dict[str, Any]:
    """(Re)write ``manifest.json`` from the replicas' committed state."""
    system = load_system(config.system)
    md = system.md
    target = int(round(config.ns * 1000.0 / md["frame_interval_ps"]))
    window = int(round(config.split_window_ns * 1000.0 / md["frame_interval_ps"]))
    replicas = []
    for i in range(config.replicas):
        st = Replica(out, i).state()
        replicas.append({"index": i, "seed": config.replica_seed(i), "trajectory": f"replica_{i:03d}.xtc",
                         "n_frames": st["n_frames"], "target_frames": target})
    manifest = {
        "system": system.name,
        "spec": system.spec,
        "config": asdict(config),
        "frame_interval_ps": md["frame_interval_ps"],
        "topology": "topology.pdb",
        "replicas": replicas,
        "total_ns": sum(r["n_frames"] for r in replicas) * md["frame_interval_ps"] / 1000.0,
        "splits": split_blocks([r["n_frames"] for r in replicas], window),
        "split_fractions": dict(SPLIT_FRACTIONS),
        "split_window_frames": window,
        "versions": software_versions(),
        "command": command or " ".join(sys.argv),
    }
    write_json_atomic(out / "manifest.json", manifest)
    return manifest


def _replica_worker(args) -> dict[str, Any]:
    config, out, index, queue = args
    os.environ.setdefault("OPENMM_CPU_THREADS", "1")
    return run_replica(config, out, index, queue, lambda done, total: queue.put(("equilibration", index, done, total)))


def _ignore_sigint() -> None:
    """Pool workers leave Ctrl-C to the parent, which terminates them (a chunk in flight is simply lost)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def check_folder(config: MDConfig, out: Path) -> None:
    """Refuse, before anything is written, an output folder that holds another run or damaged replica files."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file, not a folder")
    existing = out / "manifest.json"
    if existing.is_file():
        try:
            old = json.loads(existing.read_text())["config"]
            old_system, old_seed = old["system"], old["seed"]
        except (ValueError, KeyError, TypeError, UnicodeDecodeError) as err:
            raise ValueError(f"{existing} is not a readable rexmol MD manifest ({type(err).__name__}); it is "
                             "rewritten from the replicas' state files: delete it and rerun") from err
        if old_system != config.system or old_seed != config.seed:
            raise ValueError(f"{out} holds a run of system {old_system!r} with seed {old_seed}; "
                             f"refusing to mix it with system {config.system!r} seed {config.seed}")
    extra = sorted({int(p.name[8:11]) for p in out.glob("replica_[0-9][0-9][0-9].*")} - set(range(config.replicas)))
    if extra:
        raise ValueError(f"{out} holds replica(s) {', '.join(map(str, extra))} beyond --replicas {config.replicas}; "
                         f"rerun with --replicas {max(extra) + 1} to resume them all")
    for i in range(config.replicas):
        replica = Replica(out, i)
        replica.check(replica.state())


def run_md(config: MDConfig, out: Path, workers: int | None = None, quiet: bool = False,
           command: str | None = None) -> dict[str, Any]:
    """Run (or resume) all replicas of ``config`` into ``out`` with ``workers`` processes; returns the manifest."""
    from tqdm import tqdm

    system = load_system(config.system)
    out = Path(out)
    check_folder(config, out)
    out.mkdir(parents=True, exist_ok=True)
    if not (out / "topology.pdb").is_file():
        shutil.copyfile(system.pdb_path, out / "topology.pdb")
    write_manifest(config, out, command)
    md = system.md
    target = int(round(config.ns * 1000.0 / md["frame_interval_ps"]))
    done = sum(min(Replica(out, i).state()["n_frames"], target) for i in range(config.replicas))
    workers = max(1, min(workers or os.cpu_count() or 1, config.replicas))
    fresh = [i for i in range(config.replicas) if Replica(out, i).state()["n_frames"] == 0]
    ctx = mp.get_context("spawn")
    with ctx.Manager() as manager:
        queue = manager.Queue()
        equilibration = {i: 0 for i in fresh}
        eq_bar = tqdm(total=len(fresh) * 50, unit="%", disable=quiet or not fresh, dynamic_ncols=True,
                      desc="equilibration", bar_format="{desc}: {percentage:3.0f}%|{bar}| {elapsed}")
        bar = tqdm(total=target * config.replicas, initial=done, unit="frame", disable=quiet, dynamic_ncols=True,
                   desc="production")
        with ctx.Pool(workers, initializer=_ignore_sigint) as pool:
            pending = pool.map_async(_replica_worker, [(config, out, i, queue) for i in range(config.replicas)])
            while not pending.ready() or not queue.empty():
                try:
                    item = queue.get(timeout=0.5)
                except Exception:  # queue.Empty
                    continue
                if item[0] == "equilibration":  # (tag, replica, steps done, steps total)
                    equilibration[item[1]] = round(50 * item[2] / item[3])
                    eq_bar.update(sum(equilibration.values()) - eq_bar.n)
                    continue
                _, frames, steps, seconds = item
                bar.update(frames)
                ns_day = steps * md["timestep_fs"] * 1e-6 / seconds * 86400.0
                bar.set_postfix_str(f"{ns_day:.0f} ns/day/replica")
                write_manifest(config, out, command)
            pending.get()
        eq_bar.close()
        bar.close()
    return write_manifest(config, out, command)
