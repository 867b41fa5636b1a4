"""Boltzmann sampler: prior draws -> proposal (solver + log-density) -> OpenMM energies -> log-weights.

A run writes into one folder ``DIR``::

    run.json                 what determines the samples (system, n, batch size, seed, proposal description)
    batches/b00000.npz       one file per batch, written atomically; a rerun skips batches already present
    samples.npz              all per-sample arrays, ordered by sample index (written when every batch exists)
    records.jsonl            the same record, one JSON object per sample
    samples.dcd + topology.pdb   the proposal's coordinates (nm; not mirrored) for VMD/PyMOL/mdtraj
    summary.json             counts, ESS, NFE, timings

Per-sample record: ``index, log_q, energy (kT), log_w, nfe, roundtrip_x, roundtrip_logq, energy_failed,
nonfinite, wrong_chirality, batch, wall_seconds, cpu_seconds`` (the last two: the batch's time / batch size). ``log_w = -energy - log_q``; a sample whose solve, energy or log q is
not finite has ``nonfinite`` set and gets weight 0 downstream (it is counted, never dropped).

Reproducibility: sample ``i`` starts from standard-normal draws generated from ``(seed, i)`` alone, and batch
``b`` always holds samples ``[b B, (b + 1) B)``. Batches are dealt round-robin to ranks, so the same seed gives
the same samples for any number of processes (adaptive step control is shared within a batch, which is why
the batch — not the rank — is the unit of work): every batch's inputs are bitwise equal; its outputs are too
given the same network round-off (same trace method and thread count; worker ranks run one thread each).

Faults: every setting is checked (and the folder opened) in the calling process before a worker starts or a
file is written; a damaged batch file, ``samples.npz`` or ``run.json`` is refused with the file and the fix
named; the count of finished batches comes from one directory listing and is then kept incrementally.
"""
from __future__ import annotations

import io
import json
import os
import re
import socket
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Protocol

import numpy as np

from rexmol.atomic import write_atomic
from rexmol.systems import System

__all__ = [
    "FORMAT",
    "ProposalBatch",
    "Proposal",
    "standard_normal_draws",
    "batch_indices",
    "SampleRun",
    "sample_batch",
    "run_rank",
    "sample",
    "load_samples",
]

FORMAT = "rexmol-samples/1"
FINAL_OUTPUTS = ("samples.npz", "records.jsonl", "samples.dcd", "topology.pdb", "summary.json")
_BATCH_NAME = re.compile(r"b([0-9]{5,})\.npz")
# arrays of a batch file besides its "seconds" and "cpu_seconds" (see sample_batch)
BATCH_FIELDS = ("index", "x", "log_q", "energy", "log_w", "nfe", "roundtrip_x", "roundtrip_logq", "energy_failed",
                "nonfinite", "wrong_chirality")
RECORD_FIELDS = ("index", "log_q", "energy", "log_w", "nfe", "roundtrip_x", "roundtrip_logq", "energy_failed",
                 "nonfinite", "wrong_chirality", "batch", "wall_seconds", "cpu_seconds")
# Coordinates beyond this many nm are an exploded sample, not a molecule (the energy bridge refuses them).
EXPLODED_NM = 50.0


@dataclass(frozen=True)
class ProposalBatch:
    """Output of a proposal on B prior draws: ``x`` [B, N, 3] float64 nm; ``log_q`` [B] (density w.r.t. nm);
    ``nfe`` [B] model evaluations per sample; ``roundtrip_x`` [B] max |x0 - x0 reconstructed| (prior units) and
    ``roundtrip_logq`` [B] |log q - log q reconstructed|, NaN when no round trip was run."""

    x: np.ndarray
    log_q: np.ndarray
    nfe: np.ndarray
    roundtrip_x: np.ndarray
    roundtrip_logq: np.ndarray


class Proposal(Protocol):
    """A generative model with exact log-densities: ``proposal(z)`` maps standard-normal draws z [B, N, 3]
    (float64) to a :class:`ProposalBatch`. ``description`` is JSON-able and names everything that
    determines the samples (checkpoint hash, solver, tolerances, trace, dtype); ``system`` the molecule.
    A batch whose solve hits a non-finite value raises :class:`rexmol.solvers.state.NonFiniteError`.
    ``on_step(done)``, if given, may be called during the batch with the fraction of it done (0 to 1), for the
    progress bar."""

    system: System
    description: dict[str, Any]

    def __call__(self, z: np.ndarray, on_step: Callable[[float], None] | None = None) -> ProposalBatch: ...


def standard_normal_draws(seed: int, indices, shape: tuple[int, ...]) -> np.ndarray:
    """Standard-normal draws [len(indices), *shape] float64; row i depends only on (seed, indices[i])."""
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    return np.stack([np.random.default_rng([seed, int(i)]).standard_normal(shape) for i in indices])


def batch_indices(n: int, batch_size: int, b: int) -> np.ndarray:
    """Sample indices of batch ``b``: ``[b * batch_size, min((b + 1) * batch_size, n))``."""
    return np.arange(b * batch_size, min((b + 1) * batch_size, n))


def _nonfinite_batch(n: int, n_atoms: int) -> ProposalBatch:
    nan = np.full(n, np.nan)
    return ProposalBatch(x=np.full((n, n_atoms, 3), np.nan), log_q=nan, nfe=np.zeros(n, np.int64),
                         roundtrip_x=nan, roundtrip_logq=nan)


def _propose(proposal: Proposal, z: np.ndarray, on_step: Callable[[float], None] | None = None) -> ProposalBatch:
    """``proposal(z)``; if the batch's solve goes non-finite, solve each sample alone and flag those that fail."""
    from rexmol.solvers.state import NonFiniteError

    try:
        return proposal(z) if on_step is None else proposal(z, on_step=on_step)
    except NonFiniteError:
        if len(z) == 1:
            return _nonfinite_batch(1, z.shape[1])
        parts = [_propose(proposal, z[i : i + 1], _part(on_step, i, len(z))) for i in range(len(z))]
        return ProposalBatch(*(np.concatenate([getattr(p, f) for p in parts]) for f in ProposalBatch.__dataclass_fields__))


def _part(on_step: Callable[[float], None] | None, i: int, n: int) -> Callable[[float], None] | None:
    """Progress of sample ``i`` of ``n`` solved alone, as a fraction of the whole batch."""
    return None if on_step is None else (lambda done: on_step((i + done) / n))


def sample_batch(proposal: Proposal, energy, seed: int, indices: np.ndarray,
                 on_step: Callable[[float], None] | None = None) -> dict[str, np.ndarray]:
    """Record of the samples ``indices`` (see module doc) plus ``x`` [B, N, 3] nm; ``energy`` an OpenMMEnergy;
    ``on_step``: passed to the proposal (progress within the batch)."""
    from rexmol.geometry import wrong_handedness

    system = proposal.system
    z = standard_normal_draws(seed, indices, (system.n_atoms, 3))
    out = _propose(proposal, z, on_step)
    x = np.asarray(out.x, dtype=np.float64)
    if x.shape != (len(indices), system.n_atoms, 3):
        raise ValueError(f"proposal returned x of shape {x.shape}, expected {(len(indices), system.n_atoms, 3)}")
    finite_x = np.isfinite(x).all(axis=(1, 2))
    sane = finite_x & (np.abs(np.where(np.isfinite(x), x, 0.0)).max(axis=(1, 2)) <= EXPLODED_NM)
    e = np.full(len(indices), np.inf)
    failed = ~sane
    if sane.any():
        res = energy.evaluate(x[sane])
        e[sane], failed[sane] = res.energy, res.failed
    log_q = np.asarray(out.log_q, dtype=np.float64)
    log_w = -e - log_q
    wrong = np.zeros(len(indices), dtype=bool)
    if finite_x.any():
        wrong[finite_x] = wrong_handedness(x[finite_x], system).any(axis=1)
    return {
        "index": indices.astype(np.int64), "x": x, "log_q": log_q, "energy": e, "log_w": log_w,
        "nfe": np.asarray(out.nfe, dtype=np.int64), "roundtrip_x": np.asarray(out.roundtrip_x, dtype=np.float64),
        "roundtrip_logq": np.asarray(out.roundtrip_logq, dtype=np.float64), "energy_failed": failed,
        "nonfinite": ~np.isfinite(log_w), "wrong_chirality": wrong,
    }


def _write_npz_atomic(path: Path, arrays: dict[str, np.ndarray]) -> None:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    write_atomic(path, buffer.getvalue())


class SampleRun:
    """The folder of one sampling run: config check on reopen, atomic batch files, final outputs."""

    def __init__(self, out: str | os.PathLike, config: dict[str, Any]):
        self.out = Path(out)
        self.config = config
        self.n, self.batch_size = int(config["n"]), int(config["batch_size"])
        if self.n < 1 or self.batch_size < 1:
            raise ValueError(f"need n >= 1 and batch size >= 1, got n={self.n}, batch size={self.batch_size}")
        self.n_batches = -(-self.n // self.batch_size)

    @property
    def batch_dir(self) -> Path:
        return self.out / "batches"

    def batch_path(self, b: int) -> Path:
        return self.batch_dir / f"b{b:05d}.npz"

    def open(self) -> None:
        """Create the folder, or check that the run stored there has this exact config (else ValueError)."""
        from rexmol.report import write_json

        check_output_folder(self.out)
        path = self.out / "run.json"
        if path.is_file():
            old = read_run_json(path)
            new = json.loads(json.dumps(self.config))
            if old != new:
                keys = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
                raise ValueError(f"{self.out} holds a different sampling run (differs in {', '.join(keys)}); "
                                 "use another --out or the original settings to resume")
        self.batch_dir.mkdir(parents=True, exist_ok=True)
        if not path.is_file():
            write_json(path, self.config)

    def done(self) -> set[int]:
        """Indices of the batches whose file exists (one directory listing, not one check per batch)."""
        if not self.batch_dir.is_dir():
            return set()
        names = (e.name for e in os.scandir(self.batch_dir) if e.is_file())
        return {int(m[1]) for m in map(_BATCH_NAME.fullmatch, names) if m and int(m[1]) < self.n_batches}

    def missing(self) -> list[int]:
        done = self.done()
        return [b for b in range(self.n_batches) if b not in done]

    def size(self, b: int) -> int:
        """Number of samples in batch ``b``."""
        return min(self.batch_size, self.n - b * self.batch_size)

    def n_done(self) -> int:
        return sum(self.size(b) for b in self.done())

    def read_batch(self, b: int) -> dict[str, np.ndarray]:
        """Arrays of batch ``b``; ValueError naming the file and the fix if it is damaged or holds other samples."""
        path = self.batch_path(b)
        hint = f"delete it and rerun the same command to recompute batch {b}"
        try:
            with np.load(path) as f:
                arrays = {k: f[k] for k in f.files}
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
            raise ValueError(f"{path} is damaged ({' '.join(str(err).split())}); {hint}") from err
        expected = batch_indices(self.n, self.batch_size, b)
        keys = {*BATCH_FIELDS, "seconds", "cpu_seconds"}
        if not keys <= set(arrays) or not np.array_equal(arrays["index"], expected):
            raise ValueError(f"{path} does not hold samples {expected[0]}..{expected[-1]} of this run; {hint}")
        if any(len(arrays[k]) != len(expected) for k in BATCH_FIELDS):
            raise ValueError(f"{path} holds arrays of inconsistent length; {hint}")
        return arrays

    def write_batch(self, b: int, record: dict[str, np.ndarray], seconds: float, cpu_seconds: float) -> None:
        """Write batch ``b`` atomically with its wall and CPU (this process) time."""
        _write_npz_atomic(self.batch_path(b), {**record, "seconds": np.float64(seconds),
                                               "cpu_seconds": np.float64(cpu_seconds)})

    def finalize(self, system: System) -> dict[str, Any]:
        """Merge the batches into samples.npz, records.jsonl, samples.dcd + topology.pdb and summary.json."""
        import mdtraj

        from rexmol.report import write_json
        from rexmol.weights import snis

        missing = self.missing()
        if missing:
            raise ValueError(f"{self.out}: {len(missing)} of {self.n_batches} batches missing; rerun to resume")
        parts, seconds, cpu = [], 0.0, 0.0
        for b in range(self.n_batches):
            f = self.read_batch(b)
            part = {k: f[k] for k in BATCH_FIELDS}
            seconds += float(f["seconds"])
            cpu += float(f["cpu_seconds"])
            size = len(part["index"])
            part["wall_seconds"] = np.full(size, float(f["seconds"]) / size)
            part["cpu_seconds"] = np.full(size, float(f["cpu_seconds"]) / size)
            part["batch"] = np.full(size, b, dtype=np.int64)
            parts.append(part)
        data = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
        if not np.array_equal(data["index"], np.arange(self.n)):
            raise ValueError(f"{self.out}: batch files do not hold samples 0..{self.n - 1} in order")
        _write_npz_atomic(self.out / "samples.npz", data)
        lines = []
        for i in range(self.n):
            rec = {k: data[k][i].item() for k in RECORD_FIELDS}
            lines.append(json.dumps({k: (None if isinstance(v, float) and not np.isfinite(v) else v)
                                     for k, v in rec.items()}) + "\n")
        write_atomic(self.out / "records.jsonl", "".join(lines))
        traj = mdtraj.Trajectory(data["x"].astype(np.float32), system.mdtraj_topology)
        tmp = self.out / f".samples.{os.getpid()}.dcd"
        traj.save_dcd(str(tmp))
        os.replace(tmp, self.out / "samples.dcd")
        traj[:1].save_pdb(str(self.out / "topology.pdb"))
        w = snis(data["log_w"])
        summary = {
            "n": self.n, "system": system.name, "proposal": self.config.get("proposal"),
            "ess": w.ess, "ess_abs": w.ess_abs, "n_nonfinite": w.n_nonfinite,
            "n_energy_failed": int(data["energy_failed"].sum()),
            "n_wrong_chirality": int(data["wrong_chirality"].sum()),
            "nfe_mean": float(data["nfe"].mean()), "seconds": seconds, "s_per_sample": seconds / self.n,
            "cpu_s_per_sample": cpu / self.n,
            "roundtrip_x_max": _nanmax(data["roundtrip_x"]), "roundtrip_logq_max": _nanmax(data["roundtrip_logq"]),
        }
        write_json(self.out / "summary.json", summary)
        return summary


def check_output_folder(out: Path) -> None:
    """ValueError if ``out`` (or a folder above it) exists as a file, so nothing can be written there."""
    for p in (out, *out.parents):
        if p.exists():
            if not p.is_dir():
                raise ValueError(f"--out {out}: {p} is a file, not a folder; choose another output folder")
            return


def read_run_json(path: Path) -> dict[str, Any]:
    """A sample folder's run.json; ValueError naming it if it is not a JSON object."""
    try:
        config = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON ({err}); it records what determines the samples: restore it, "
                         "or sample into another --out") from err
    if not isinstance(config, dict):
        raise ValueError(f"{path} is not a rexmol run.json (not a JSON object); sample into another --out")
    return config


def _nanmax(a: np.ndarray) -> float | None:
    return float(np.nanmax(a)) if np.isfinite(a).any() else None


def run_config(proposal: Proposal, n: int, batch_size: int, seed: int) -> dict[str, Any]:
    """The run.json content: everything that determines the samples of a run."""
    return {"format": FORMAT, "system": proposal.system.name, "n_atoms": proposal.system.n_atoms, "n": n,
            "batch_size": batch_size, "seed": seed, "proposal": proposal.description}


def run_rank(proposal: Proposal, out, n: int, batch_size: int, seed: int, rank: int = 0, world: int = 1,
             quiet: bool = False, stop_after: int | None = None) -> None:
    """Compute this rank's missing batches (b % world == rank) into ``out``; rank 0 shows a progress bar in
    samples, which moves inside a batch too (fractionally, from the proposal's ``on_step``; none when ``quiet``).

    ``stop_after``: return after that many batches (simulates an interruption in tests).
    """
    from tqdm import tqdm

    from rexmol.energy import OpenMMEnergy

    run = SampleRun(out, run_config(proposal, n, batch_size, seed))
    if rank == 0:
        run.open()
    missing = run.missing()  # one listing; afterwards counts are kept incrementally
    mine = [b for b in missing if b % world == rank]
    others = [b for b in missing if b % world != rank]  # rank 0's bar also counts other ranks' batches, in order
    done = n - sum(run.size(b) for b in missing)
    bar = tqdm(total=n, initial=done, unit="sample", disable=quiet or rank != 0, dynamic_ncols=True,
               desc=str(proposal.description.get("solver", "sample")))
    with OpenMMEnergy(proposal.system) as energy:
        for k, b in enumerate(mine):
            if stop_after is not None and k >= stop_after:
                break
            t0, c0 = time.perf_counter(), time.process_time()
            on_step = None if bar.disable else _bar_mover(bar, done, run.size(b))
            record = sample_batch(proposal, energy, seed, batch_indices(n, batch_size, b), on_step)
            run.write_batch(b, record, time.perf_counter() - t0, time.process_time() - c0)
            done += run.size(b)
            while others and run.batch_path(others[0]).is_file():
                done += run.size(others.pop(0))
            bar.update(done - bar.n)
    bar.close()


def _bar_mover(bar, done: int, size: int) -> Callable[[float], None]:
    """Progress callback of one batch of ``size`` samples after ``done``: moves ``bar`` to done + fraction * size
    (to 0.1 sample; never backwards), through tqdm's update so that its refresh throttling applies."""
    def on_step(fraction: float) -> None:
        value = done + round(min(max(fraction, 0.0), 1.0) * size, 1)
        if value > bar.n:
            bar.n = int(value) if float(value).is_integer() else value
            bar.update(0)
    return on_step


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _distributed(make_proposal: Callable[[], Proposal], out, n: int, batch_size: int, seed: int, quiet: bool,
                 init_method: str, rank: int = -1, world: int = -1) -> None:
    """One rank of a torch.distributed (gloo) run: rank 0 opens the folder, every rank samples its batches,
    rank 0 writes the final outputs."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world)
    try:
        rank, world = dist.get_rank(), dist.get_world_size()
        proposal = make_proposal()
        run = SampleRun(out, run_config(proposal, n, batch_size, seed))
        if rank == 0:
            run.open()
        dist.barrier()
        run_rank(proposal, out, n, batch_size, seed, rank, world, quiet)
        dist.barrier()
        if rank == 0 and init_method == "env://":  # local ranks: the parent finalizes
            run.finalize(proposal.system)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _spawned(rank: int, world: int, port: int, errors: str, *args) -> None:
    """A local worker rank. A bad-input error (ValueError, OSError) is written to ``errors/rank<r>.txt`` for the
    parent to raise as the same one-line error; Ctrl-C (sent to the whole process group) is the parent's to
    report, so a worker just ends."""
    import torch

    torch.set_num_threads(1)
    os.environ["LOCAL_RANK"] = str(rank)  # a CUDA proposal picks its GPU from it
    try:
        _distributed(*args, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world=world)
    except (ValueError, OSError) as err:
        kind = "OSError" if isinstance(err, OSError) else "ValueError"
        Path(errors, f"rank{rank}.txt").write_text(f"{kind}\n{err}")
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        raise SystemExit(130) from None


def _spawn(processes: int, args: tuple) -> None:
    """Run ``processes`` local ranks; a rank's bad-input error is re-raised here as itself, a Ctrl-C as
    KeyboardInterrupt."""
    import torch.multiprocessing as tmp

    with tempfile.TemporaryDirectory(prefix="rexmol-ranks-") as errors:
        try:
            tmp.spawn(_spawned, args=(processes, _free_port(), errors, *args), nprocs=processes, join=True)
        except tmp.ProcessExitedException as err:
            reports = sorted(Path(errors).glob("rank*.txt"))
            if reports:
                kind, _, message = reports[0].read_text().partition("\n")
                raise (OSError if kind == "OSError" else ValueError)(message) from None
            if err.exit_code == 130:
                raise KeyboardInterrupt from None
            raise


def sample(make_proposal: Callable[[], Proposal], out, n: int, batch_size: int, seed: int,
           processes: int = 1, quiet: bool = False) -> dict[str, Any]:
    """Sample ``n`` molecules into ``out`` (resuming what is there) and write the final outputs; returns summary.

    ``make_proposal`` builds the proposal (called once per process; must be picklable for ``processes > 1``).
    With ``processes > 1`` local worker processes (torch.distributed, gloo; one thread each) share the
    batches; under ``torchrun`` (``WORLD_SIZE`` > 1 in the environment) every launched rank calls this.
    """
    if processes < 1:
        raise ValueError(f"processes must be >= 1, got {processes}")
    args = (make_proposal, out, n, batch_size, seed, quiet)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        _distributed(*args, init_method="env://")
        return json.loads((Path(out) / "summary.json").read_text())
    proposal = make_proposal()
    run = SampleRun(out, run_config(proposal, n, batch_size, seed))
    run.open()  # every check (options, folder, an existing run's settings) before any worker starts
    if not run.missing() and all((run.out / name).is_file() for name in FINAL_OUTPUTS):
        return json.loads((run.out / "summary.json").read_text())  # finished: nothing is rewritten
    if processes > 1:
        _spawn(processes, args)
    else:
        run_rank(proposal, out, n, batch_size, seed, quiet=quiet)
    return run.finalize(proposal.system)


def load_samples(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """``(run config, per-sample arrays)`` of a finished sample folder; clear errors for empty/unfinished ones."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"sample folder {path} does not exist")
    if not (path / "run.json").is_file():
        raise ValueError(f"{path} is not a rexmol sample folder (no run.json); make one with `rexmol sample`")
    config = read_run_json(path / "run.json")
    if config.get("format") != FORMAT:
        raise ValueError(f"{path}/run.json has format {config.get('format')!r}, expected {FORMAT!r}")
    if not (path / "samples.npz").is_file():
        run = SampleRun(path, config)
        raise ValueError(f"{path}: sampling unfinished ({run.n_done()} of {run.n} samples); rerun `rexmol sample` "
                         "with the same options to resume")
    hint = "delete it and rerun `rexmol sample` with the same options to rebuild it from batches/"
    try:
        with np.load(path / "samples.npz") as f:
            data = {k: f[k] for k in f.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
        raise ValueError(f"{path / 'samples.npz'} is damaged ({' '.join(str(err).split())}); {hint}") from err
    fields = (*BATCH_FIELDS, "batch")
    if not set(fields) <= set(data) or any(len(data[k]) != len(data["index"]) for k in fields):
        raise ValueError(f"{path / 'samples.npz'} lacks per-sample arrays or they differ in length; {hint}")
    if len(data["index"]) == 0:
        raise ValueError(f"{path}: no samples")
    return config, data
