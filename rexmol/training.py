"""Flow-matching training of a generator (network + space, :mod:`rexmol.models.space`) with PyTorch Lightning.

One module trains every combination of ``coordinates`` (``cartesian``: centred frames / data scale, mean-free
prior; ``internal``: standardised bond/angle/torsion tokens, masked prior) and ``network`` (``dit``: the atom DiT,
Cartesian only; ``hollow``: :class:`rexmol.models.hollow.HollowTransformer`, or its non-hollow twin with
``hollow: {hollow: false}``). The space is fitted once, on the training frames, when a fresh run starts; it is
stored in every checkpoint and restored on resume, never refitted from other data.

Path (t = 0 noise, t = 1 data): ``x_t = t x1 + (1 - (1 - sigma_min) t) x0`` with ``x0`` a draw of the space's
prior and ``x1`` a training frame in model coordinates. Targets by ``output_kind``: velocity
``x1 - (1 - sigma_min) x0``, data ``x1``, noise ``x0``; loss = mean squared error over the valid slots (all of
them in Cartesian coordinates). ``t = 1 - (1 - u)^time_power`` with ``u`` uniform: ``time_power`` > 1 samples t
more often near the data end.

The module keeps an EMA copy of the weights (``self.ema``), used for validation and for sampling, and counts the
process CPU time of training across resumes (logged as ``cpu_hours``). Callbacks here write the small generator
files (best by a validation metric and latest), the loss curve PNG, cheap sample-energy diagnostics and the
validation figure that tracks the goal: exact-log-q ESS and reweighted E-W2 of a fixed prior draw.
"""
from __future__ import annotations

import copy
import math
import shlex
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback, Timer
from torch import Tensor

from rexmol.data import random_rotations
from rexmol.likelihood.flow import LogQOptions, sample_with_logq
from rexmol.likelihood.priors import MaskedGaussian, MeanFreeGaussian
from rexmol.models.checkpoint import (NETWORKS, OUTPUT_KINDS, build_network, generator_info, load_generator,
                                      save_generator)
from rexmol.models.dit import DiTConfig
from rexmol.models.hollow import HollowConfig, select_blocks
from rexmol.models.space import SPACE_KINDS, CartesianSpace, InternalSpace, space_from_dict
from rexmol.solvers import FixedGrid, FlowMatching as FlowMatchingPath, LawsonCoordinates
from rexmol.systems import load_system
from rexmol.weights import kish_ess, normalized_weights
from rexmol.zmatrix import build_zmatrix


def mean_free_noise(shape: tuple[int, ...], *, dtype: torch.dtype, device: torch.device | str = "cpu",
                    generator: torch.Generator | None = None) -> Tensor:
    """Standard Gaussian [B, N, 3] projected to zero centroid (the mean-free prior)."""
    z = torch.randn(shape, dtype=dtype, generator=generator, device=device)
    return z - z.mean(dim=1, keepdim=True)


def equivariance_error(model: torch.nn.Module, x: Tensor, t: Tensor, seed: int = 7) -> float:
    """Relative rotation-equivariance error ||f(R x) - R f(x)|| / ||R f(x)|| of a model over one random proper
    rotation R per sample; ``x`` [B, N, 3] normalised, ``t`` [B]."""
    rot = random_rotations(len(x), dtype=x.dtype, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        rotated_out = model(x @ rot.transpose(1, 2), t)
        out_rotated = model(x, t) @ rot.transpose(1, 2)
    return float((rotated_out - out_rotated).norm() / out_rotated.norm())


def flow_matching_loss(model: torch.nn.Module, x1: Tensor, x0: Tensor, u: Tensor, *, output_kind: str = "velocity",
                       sigma_min: float = 0.0, time_power: float = 1.0, mask: Tensor | None = None) -> Tensor:
    """Mean squared flow-matching error; ``x1`` data and ``x0`` noise [B, N, 3] in model coordinates, ``u`` [B]
    uniform; ``mask`` [N, 3] bool: average over the valid slots only (None: all)."""
    t = 1.0 - (1.0 - u) ** time_power
    tt = t[:, None, None]
    xt = tt * x1 + (1.0 - (1.0 - sigma_min) * tt) * x0
    if output_kind == "velocity":
        target = x1 - (1.0 - sigma_min) * x0
    elif output_kind == "data":
        target = x1
    else:
        target = x0
    err = (model(xt, t) - target) ** 2
    return err.mean() if mask is None else err[:, mask.to(err.device)].mean()


class FlowMatching(L.LightningModule):
    """Flow matching of a generator (network + space) on one molecular system.

    Args:
        system: system name (``rexmol.systems.load_system``); the data module must hold the same system.
        coordinates: ``cartesian`` or ``internal`` (see :mod:`rexmol.models.space`).
        network: ``dit`` (Cartesian only) or ``hollow`` (:class:`rexmol.models.hollow.HollowTransformer`).
        hollow: options of :class:`rexmol.models.hollow.HollowConfig`, with an optional ``size`` preset (default
            ``small``); ``hollow: false`` gives the non-hollow twin.
        size: DiT preset (``tiny``, ``small``, ``base``); ``hidden``/``depth``/``heads``/``mlp_ratio``/
            ``graph_bias``/``distance_bias``/``chirality``/``local_frames`` override it (DiT only).
        output_kind: what the network predicts: ``velocity``, ``data`` or ``noise``.
        sigma_min: noise left at t = 1 (0: the plain linear path the solvers assume).
        time_power: ``t = 1 - (1 - u)^time_power``; 1 is uniform, > 1 favours the data end.
        lr, weight_decay, betas: AdamW (no decay on biases, embeddings and bias tables).
        warmup_steps: linear warm-up; then cosine decay to ``min_lr_ratio * lr``.
        schedule_by: ``steps`` (decay over ``schedule_steps``, default the trainer's max_steps) or ``time``
            (decay over the trainer's ``max_time``: the right choice for a time-limited run).
        ema_decay: EMA of the weights (effective decay ``min(ema_decay, (1 + step) / (10 + step))``).
        rotor_symmetry: internal coordinates only: model each symmetric rotor (methyl, NH3+, carboxylate)
            modulo 2 pi / s (:mod:`rexmol.internal_coordinates`); a resumed or warm-started run must match the
            space it stores.
        init_from: warm start from a generator file or checkpoint (its EMA weights and its space); same network
            kind and space kind; a DiT may gain the zero-initialised ``chirality``/``local_frames`` additions.
        init_blocks: with ``init_from`` and a hollow network: start a shallower network from these blocks of the
            source's streams (strictly increasing indices, as many as ``hollow.depth``;
            :func:`rexmol.models.hollow.select_blocks`).
    """

    def __init__(
        self,
        system: str = "ala3",
        coordinates: str = "cartesian",
        network: str = "dit",
        hollow: dict[str, Any] | None = None,
        size: str = "small",
        hidden: int | None = None,
        depth: int | None = None,
        heads: int | None = None,
        mlp_ratio: int | None = None,
        graph_bias: bool | None = None,
        distance_bias: bool | None = None,
        chirality: bool | None = None,
        local_frames: bool | None = None,
        output_kind: str = "velocity",
        sigma_min: float = 0.0,
        time_power: float = 1.0,
        lr: float = 5e-4,
        weight_decay: float = 0.01,
        betas: tuple[float, float] = (0.9, 0.999),
        warmup_steps: int = 500,
        min_lr_ratio: float = 0.05,
        schedule_by: str = "steps",
        schedule_steps: int | None = None,
        ema_decay: float = 0.999,
        rotor_symmetry: bool = True,
        init_from: str | None = None,
        init_blocks: list[int] | None = None,
    ):
        super().__init__()
        self.save_hyperparameters()
        if output_kind not in OUTPUT_KINDS:
            raise ValueError(f"unknown output_kind {output_kind!r}; expected one of {OUTPUT_KINDS}")
        if coordinates not in SPACE_KINDS:
            raise ValueError(f"unknown model.coordinates {coordinates!r}; expected one of {SPACE_KINDS}")
        if network not in NETWORKS:
            raise ValueError(f"unknown model.network {network!r}; expected one of {NETWORKS}")
        if network == "dit" and coordinates != "cartesian":
            raise ValueError("model.network dit works in Cartesian coordinates only; use model.network hollow for "
                             "model.coordinates internal")
        if schedule_by not in ("steps", "time"):
            raise ValueError(f"schedule_by must be 'steps' or 'time', got {schedule_by!r}")
        if not 0.0 <= sigma_min < 1.0:
            raise ValueError(f"sigma_min must be in [0, 1), got {sigma_min}")
        if time_power <= 0:
            raise ValueError(f"time_power must be > 0, got {time_power}")
        self.system = load_system(system)
        n = self.system.n_atoms
        if network == "dit":
            config = DiTConfig.from_size(size, hidden=hidden, depth=depth, heads=heads, mlp_ratio=mlp_ratio,
                                         graph_bias=graph_bias, distance_bias=distance_bias, chirality=chirality,
                                         local_frames=local_frames)
            entry, order, mask = {"kind": "dit", "config": config.to_dict()}, None, None
        else:
            zmatrix = build_zmatrix(self.system)
            order = np.asarray(zmatrix.order)
            mask = np.asarray(zmatrix.mask) if coordinates == "internal" else np.ones((n, 3), dtype=bool)
            options = dict(hollow or {})
            config = HollowConfig.from_size(options.pop("size", "small"), **options)
            entry = {"kind": "hollow", "config": config.to_dict()}
        self.model = build_network(self.system, entry, mean_free=coordinates == "cartesian", order=order, mask=mask)
        self.mask = None if mask is None or mask.all() else torch.as_tensor(mask, dtype=torch.bool)
        self.prior = MeanFreeGaussian(n, 3) if self.mask is None else MaskedGaussian(self.mask)
        self.register_buffer("data_scale", torch.zeros((), dtype=torch.float64))  # Cartesian nm; 0 until fitted
        self._internal_space: InternalSpace | None = None
        self.data_info: dict[str, Any] = {}
        self.cpu_seconds_before = 0.0  # process CPU of earlier sessions (restored on resume)
        self.validation_cpu_seconds = 0.0  # part of cpu_seconds() spent in ValidationESS (all sessions)
        self._cpu_start: float | None = None
        if init_blocks is not None and (init_from is None or network != "hollow"):
            raise ValueError("model.init_blocks needs model.init_from and model.network hollow")
        if init_blocks is not None and len(init_blocks) != self.model.config.depth:
            raise ValueError(f"model.init_blocks names {len(init_blocks)} blocks but the hollow depth is "
                             f"{self.model.config.depth}; give one source block per block")
        if init_from is not None:
            self._warm_start(init_from, None if init_blocks is None else [int(b) for b in init_blocks])
        self.ema = copy.deepcopy(self.model).requires_grad_(False)

    # -- the space -----------------------------------------------------------------------------------------
    @property
    def space(self) -> CartesianSpace | InternalSpace | None:
        """The fitted space (None before a fresh run has seen its training frames)."""
        if self.hparams.coordinates == "internal":
            return self._internal_space
        scale = float(self.data_scale)
        return CartesianSpace(self.system.n_atoms, scale) if scale > 0 else None

    def _set_space(self, space: CartesianSpace | InternalSpace, source: str) -> None:
        """Adopt a stored or fitted space after checking it matches this network (kind and Z-matrix)."""
        if space.kind != self.hparams.coordinates:
            raise ValueError(f"{source} is in {space.kind} coordinates, but model.coordinates is "
                             f"{self.hparams.coordinates!r}")
        if isinstance(space, CartesianSpace):
            self.data_scale.fill_(space.scale)
            return
        if self.mask is None or not torch.equal(space.mask, self.mask) or \
                not np.array_equal(np.asarray(space.zmatrix.order), np.asarray(build_zmatrix(self.system).order)):
            raise ValueError(f"{source}: its Z-matrix differs from the one this network was built on")
        if space.rotor_symmetry != bool(self.hparams.rotor_symmetry):
            raise ValueError(f"{source} was fitted with rotor_symmetry={space.rotor_symmetry}; set "
                             f"--model.rotor_symmetry {str(space.rotor_symmetry).lower()} to continue it")
        self._internal_space = space

    def _warm_start(self, path: str, blocks: list[int] | None) -> None:
        source = load_generator(path)
        if source.system_name != self.system.name:
            raise ValueError(f"init_from {path} is for system {source.system_name!r}, not {self.system.name!r}")
        if source.network != self.hparams.network:
            raise ValueError(f"init_from {path}: architecture differs (network {source.network!r}, not "
                             f"{self.hparams.network!r})")
        state = source.model.state_dict()
        if blocks is not None:
            state = select_blocks(state, blocks)
        try:
            missing, unexpected = self.model.load_state_dict(state, strict=False)
        except RuntimeError as err:  # shape mismatch
            raise ValueError(f"init_from {path}: architecture differs: {err}") from err
        new_modules = [k for k in missing if not (source.network == "dit" and k.startswith(("chiral_", "frame_")))]
        if unexpected or new_modules:
            raise ValueError(f"init_from {path}: architecture differs (missing {new_modules}, unexpected {unexpected})")
        self._set_space(source.space, f"init_from {path}")
        self._init_source = {"init_from": str(path), "init_global_step": source.meta.get("global_step"),
                             "init_space": source.space.to_dict(), "init_blocks": blocks}

    # -- data, space fit, provenance and CPU clock ---------------------------------------------------------
    def on_fit_start(self) -> None:
        dm = self.trainer.datamodule
        if dm is None or not hasattr(dm, "scale"):
            raise ValueError("FlowMatching needs rexmol.data.MDDataModule (a datamodule with .scale and .info)")
        if dm.system.n_atoms != self.system.n_atoms or dm.system.name != self.system.name:
            raise ValueError(f"data module holds system {dm.system.name!r} ({dm.system.n_atoms} atoms) but the model "
                             f"is for {self.system.name!r} ({self.system.n_atoms} atoms)")
        if self.space is None:  # fresh run; a resumed or warm-started run keeps its space
            if self.hparams.coordinates == "cartesian":
                self.data_scale.fill_(dm.scale)
            else:
                self._set_space(InternalSpace.fit(dm.train_set.frames.double(), self.system,
                                                  rotor_symmetry=self.hparams.rotor_symmetry),
                                f"the space fitted on {dm.data_dir}")
        if not self.data_info:  # a resumed run keeps the provenance it was trained with
            self.data_info = {**dm.info, **getattr(self, "_init_source", {}), "space_fitted_on": dict(dm.info)}
            if self.hparams.coordinates == "cartesian":
                self.data_info["scale_used_nm"] = float(self.data_scale)
        self._cpu_start = time.process_time()

    def cpu_seconds(self) -> float:
        """Process CPU seconds of this run over all sessions (under DDP: rank 0's times the world size)."""
        now = 0.0 if self._cpu_start is None else time.process_time() - self._cpu_start
        world = self.trainer.world_size if self._trainer is not None else 1
        return self.cpu_seconds_before + now * world

    def encode(self, batch_nm: Tensor) -> Tensor:
        """Training frames in nm [B, N, 3] -> model coordinates (internal: computed in float64), batch dtype."""
        if self.hparams.coordinates == "internal":
            return self.space.encode(batch_nm.double()).to(batch_nm.dtype)
        return batch_nm / self.data_scale.to(batch_nm.dtype)

    # -- steps ---------------------------------------------------------------------------------------------
    def _loss(self, model: torch.nn.Module, x1: Tensor, generator: torch.Generator | None = None) -> Tensor:
        x0 = self.prior.sample(len(x1), generator=generator, dtype=x1.dtype, device=x1.device)
        u = torch.rand(len(x1), dtype=x1.dtype, generator=generator, device=x1.device)
        hp = self.hparams
        return flow_matching_loss(model, x1, x0, u, output_kind=hp.output_kind, sigma_min=hp.sigma_min,
                                  time_power=hp.time_power, mask=self.mask)

    def training_step(self, batch: Tensor, batch_idx: int) -> Tensor:
        loss = self._loss(self.model, self.encode(batch))
        self.log("train/loss", loss, prog_bar=True)
        self.log("lr", self.optimizers().param_groups[0]["lr"], prog_bar=False)
        self.log("cpu_hours", self.cpu_seconds() / 3600.0, prog_bar=False)
        return loss

    def validation_step(self, batch: Tensor, batch_idx: int) -> None:
        generator = torch.Generator(device=batch.device).manual_seed(1000 + batch_idx)  # same noise every time
        with torch.no_grad():
            loss = self._loss(self.ema, self.encode(batch), generator)
        self.log("val/loss", loss, prog_bar=True, batch_size=len(batch), sync_dist=True)

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        step = self.global_step
        decay = min(self.hparams.ema_decay, (1.0 + step) / (10.0 + step))
        ema_params = list(self.ema.parameters())
        torch._foreach_lerp_(ema_params, [p.detach() for p in self.model.parameters()], 1.0 - decay)

    # -- optimisation --------------------------------------------------------------------------------------
    def configure_optimizers(self) -> dict[str, Any]:
        decay, no_decay = [], []
        for name, p in self.model.named_parameters():
            (no_decay if p.dim() < 2 or name.startswith("emb_") or name == "hop_bias" else decay).append(p)
        hp = self.hparams
        optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": hp.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=hp.lr, betas=tuple(hp.betas),
        )
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, self._lr_factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def _progress(self, step: int) -> float:
        """Fraction of the decay phase done, in [0, 1]."""
        hp = self.hparams
        if hp.schedule_by == "time":
            timer = next((c for c in self.trainer.callbacks if isinstance(c, Timer)), None)
            if timer is None or timer.time_remaining() is None:
                raise ValueError("schedule_by='time' needs trainer.max_time")
            elapsed = timer.time_elapsed()
            return min(1.0, elapsed / max(elapsed + timer.time_remaining(), 1e-9))
        total = hp.schedule_steps or self.trainer.max_steps
        if total is None or total <= 0:
            raise ValueError("schedule_by='steps' needs model.schedule_steps or trainer.max_steps")
        return min(1.0, max(0, step - hp.warmup_steps) / max(1, total - hp.warmup_steps))

    def _lr_factor(self, step: int) -> float:
        hp = self.hparams
        if step < hp.warmup_steps:
            return (step + 1) / hp.warmup_steps
        cosine = 0.5 * (1.0 + math.cos(math.pi * self._progress(step)))
        return hp.min_lr_ratio + (1.0 - hp.min_lr_ratio) * cosine

    # -- checkpoint metadata -------------------------------------------------------------------------------
    def generator_info(self) -> dict[str, Any]:
        """What :func:`rexmol.models.checkpoint.load_generator` needs besides the weights (space must be fitted)."""
        meta = {"data": self.data_info, "hparams": dict(self.hparams), "cpu_seconds": self.cpu_seconds(),
                "validation_cpu_seconds": self.validation_cpu_seconds}
        return generator_info(self.model, self.space, system_name=self.system.name,
                              output_kind=self.hparams.output_kind, sigma_min=self.hparams.sigma_min, meta=meta)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["rexmol"] = self.generator_info()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        info = checkpoint.get("rexmol", {})
        meta = info.get("meta", {})
        self.data_info = dict(meta.get("data", {}))
        self.cpu_seconds_before = float(meta.get("cpu_seconds", 0.0))
        self.validation_cpu_seconds = float(meta.get("validation_cpu_seconds", 0.0))
        if self.hparams.coordinates == "internal":  # Cartesian: the data_scale buffer comes with the weights
            if "space" not in info:
                raise ValueError("checkpoint has no stored space, but model.coordinates is 'internal'")
            self._set_space(space_from_dict(info["space"]), "the checkpoint")


class ExportGenerator(Callback):
    """Write the small generator file (EMA weights + metadata), config, command, resume command and metrics to
    ``dirpath`` (default: ``<trainer.default_root_dir>/model``) after every validation (so a time-limited run
    always leaves a usable file) and at the end. ``rexmol train`` refuses to start a new run into a folder that
    holds another run's files unless ``--overwrite`` is given.

    ``monitor`` None: ``filename`` is the latest export. With ``monitor`` (e.g. ``val/ess``, ``mode`` max): the
    latest goes to ``last_filename`` and ``filename`` is rewritten only when the monitored value improves; the best
    value is callback state, so it survives a resume. ``resume_command.txt`` is this run's command with
    ``--ckpt_path`` set to the ``last.ckpt`` of the trainer's ModelCheckpoint.
    """

    def __init__(self, dirpath: str | None = None, filename: str = "generator.pt", monitor: str | None = None,
                 mode: str = "max", last_filename: str = "generator_last.pt"):
        if mode not in ("max", "min"):
            raise ValueError(f"ExportGenerator mode must be 'max' or 'min', got {mode!r}")
        if monitor is not None and last_filename == filename:
            raise ValueError("ExportGenerator: filename and last_filename must differ when monitoring")
        self.dirpath = None if dirpath is None else Path(dirpath)
        self.filename, self.monitor, self.mode, self.last_filename = filename, monitor, mode, last_filename
        self.best: float | None = None
        self.best_step: int | None = None
        self._log_dir: Path | None = None

    def resolve_dir(self, trainer: L.Trainer) -> Path:
        """The export folder: ``dirpath``, by default ``<trainer.default_root_dir>/model`` (the run's own folder,
        never a shipped ``data/`` folder)."""
        return self.dirpath if self.dirpath is not None else Path(trainer.default_root_dir) / "model"

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.dirpath = self.resolve_dir(trainer)
        self._log_dir = _log_dir(trainer)

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "best_step": self.best_step, "monitor": self.monitor}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("monitor") == self.monitor:
            self.best, self.best_step = state_dict.get("best"), state_dict.get("best_step")

    def _improved(self, value: float) -> bool:
        if not math.isfinite(value):
            return False
        if self.best is None:
            return True
        return value > self.best if self.mode == "max" else value < self.best

    def _export(self, trainer: L.Trainer, module: FlowMatching) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero or module.space is None:
            return
        info = module.generator_info()
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if torch.as_tensor(v).numel() == 1}
        meta = {**info["meta"], "global_step": trainer.global_step, "epoch": trainer.current_epoch,
                "metrics": metrics, "command": shlex.join(sys.argv), "versions": _versions()}
        save = dict(system_name=info["system"], space=module.space, output_kind=info["output_kind"],
                    sigma_min=info["sigma_min"])
        if self.monitor is None:
            save_generator(self.dirpath / self.filename, module.ema, meta=meta, **save)
        else:
            value = metrics.get(self.monitor)
            if value is not None and self._improved(value):
                self.best, self.best_step = value, trainer.global_step
            meta.update(monitor=self.monitor, best=self.best, best_step=self.best_step)
            save_generator(self.dirpath / self.last_filename, module.ema, meta=meta, **save)
            if self.best_step == trainer.global_step:
                save_generator(self.dirpath / self.filename, module.ema, meta=meta, **save)
        (self.dirpath / "command.txt").write_text(shlex.join(sys.argv) + "\n")
        resume = _resume_command(trainer)
        if resume is not None:
            (self.dirpath / "resume_command.txt").write_text(resume + "\n")
        for name in ("config.yaml", "metrics.csv"):
            if self._log_dir is not None and (self._log_dir / name).is_file():
                shutil.copyfile(self._log_dir / name, self.dirpath / name)

    def on_validation_end(self, trainer: L.Trainer, module: FlowMatching) -> None:
        if trainer.logger is not None:
            trainer.logger.save()
        self._export(trainer, module)

    def on_train_end(self, trainer: L.Trainer, module: FlowMatching) -> None:
        if trainer.logger is not None:
            trainer.logger.save()
        self._export(trainer, module)


def _log_dir(trainer: L.Trainer) -> Path | None:
    """The logger's folder, read in ``setup`` on every rank: ``trainer.log_dir`` is a collective under DDP
    (a broadcast from rank 0), so calling it from a rank-0-only hook leaves rank 0 waiting for ever."""
    return Path(trainer.log_dir) if trainer.log_dir else None


def _resume_command(trainer: L.Trainer) -> str | None:
    """This process's command with ``--ckpt_path`` pointing at the ModelCheckpoint's ``last.ckpt`` (or None)."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    ckpt = next((c for c in trainer.callbacks if isinstance(c, ModelCheckpoint) and c.save_last and c.dirpath), None)
    if ckpt is None:
        return None
    argv, kept = list(sys.argv), []
    skip = False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--ckpt_path":
            skip = True
        elif not arg.startswith("--ckpt_path="):
            kept.append(arg)
    return shlex.join([*kept, "--ckpt_path", str(Path(ckpt.dirpath) / "last.ckpt")])


class LossCurve(Callback):
    """Plot train/val loss (log scale) from the CSV logger's ``metrics.csv`` to ``path`` after each validation."""

    def __init__(self, path: str):
        self.path = Path(path)
        self._log_dir: Path | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._log_dir = _log_dir(trainer)

    def _plot(self, trainer: L.Trainer) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero or self._log_dir is None:
            return
        if trainer.logger is not None:
            trainer.logger.save()
        csv = self._log_dir / "metrics.csv"
        if csv.is_file():
            plot_loss_curve(csv, self.path)

    def on_validation_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self._plot(trainer)

    def on_train_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self._plot(trainer)


def plot_loss_curve(metrics_csv: str | Path, out_png: str | Path) -> None:
    """Train loss (raw and smoothed) and validation loss against step, log y axis."""
    import csv

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series: dict[str, list[tuple[int, float]]] = {}
    with open(metrics_csv) as fh:
        for row in csv.DictReader(fh):
            for key in ("train/loss", "val/loss", "val/sample_energy_median_kT", "val/md_energy_median_kT"):
                if row.get(key):
                    series.setdefault(key, []).append((int(row["step"]), float(row[key])))
    n_panels = 2 if "val/sample_energy_median_kT" in series else 1
    fig, axes = plt.subplots(1, n_panels, figsize=(6 * n_panels, 4), squeeze=False)
    ax = axes[0, 0]
    if "train/loss" in series:
        s, v = np.array(series["train/loss"]).T
        ax.plot(s, v, color="C0", alpha=0.3, lw=0.8, label="train")
        k = max(1, len(v) // 50)
        if len(v) > k:
            ax.plot(s[k - 1:], np.convolve(v, np.ones(k) / k, mode="valid"), color="C0", label=f"train ({k}-pt mean)")
    if "val/loss" in series:
        s, v = np.array(series["val/loss"]).T
        ax.plot(s, v, "o-", color="C1", ms=3, label="val (EMA)")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("flow-matching loss")
    ax.legend()
    ax.grid(alpha=0.3)
    if n_panels == 2:
        ax = axes[0, 1]
        s, v = np.array(series["val/sample_energy_median_kT"]).T
        ax.plot(s, v, "o-", color="C2", ms=3, label="model (Euler samples, EMA)")
        if "val/md_energy_median_kT" in series:
            ax.axhline(series["val/md_energy_median_kT"][0][1], color="k", ls="--", lw=1, label="MD validation")
        ax.set_yscale("symlog", linthresh=100.0)
        ax.set_xlabel("step")
        ax.set_ylabel("median sample energy (kT)")
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    Path(out_png).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=110)
    plt.close(fig)


def prior_draws(module: FlowMatching, n: int, seed: int, dtype: torch.dtype) -> tuple[Tensor, Tensor | None]:
    """``n`` fixed prior draws [n, N, 3] of the module's prior (``seed``) and the symmetric-rotor branches the
    same raw draws give (None without symmetric rotors)."""
    raw = torch.randn((n, *module.prior.shape), generator=torch.Generator().manual_seed(seed), dtype=dtype)
    return module.prior.project(raw), module.space.draw_branches(raw)


class SampleEnergies(Callback):
    """After each validation: ``n_samples`` Euler samples (``n_steps``, EMA model) -> OpenMM energies (kT).

    Logs the median sample energy, the fraction of finite energies, the median MD-validation energy (once), the
    RMS bond-length error against the system's reference frame (nm) and the fraction of samples with a
    wrongly handed C-alpha: local geometry is what limits ESS.
    Velocity-output models only (a cheap diagnostic, not the project's sampler).
    """

    def __init__(self, n_samples: int = 64, n_steps: int = 40, seed: int = 0):
        self.n_samples, self.n_steps, self.seed = n_samples, n_steps, seed
        self._md_energy: float | None = None

    def on_validation_end(self, trainer: L.Trainer, module: FlowMatching) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero or module.hparams.output_kind != "velocity":
            return
        from rexmol.energy import evaluate
        from rexmol.geometry import wrong_handedness

        system = module.system
        dtype = next(module.ema.parameters()).dtype
        x, branches = prior_draws(module, self.n_samples, self.seed, dtype)
        with torch.no_grad():
            for k in range(self.n_steps):
                t = torch.full((self.n_samples,), k / self.n_steps, dtype=dtype)
                x = x + module.ema(x, t) / self.n_steps
        x_nm = module.space.decode(x.double(), branches)[0].cpu().numpy()
        energy = evaluate(x_nm, system).energy
        finite = np.isfinite(energy)
        bonds = np.array([(b[0].index, b[1].index) for b in system.topology.bonds()])
        ref = np.linalg.norm(system.positions[bonds[:, 0]] - system.positions[bonds[:, 1]], axis=-1)
        got = np.linalg.norm(x_nm[:, bonds[:, 0]] - x_nm[:, bonds[:, 1]], axis=-1)
        metrics = {
            "val/sample_energy_median_kT": float(np.median(energy)) if finite.any() else float("inf"),
            "val/sample_energy_finite": float(finite.mean()),
            "val/sample_bond_rmse_nm": float(np.sqrt(((got - ref) ** 2).mean())),
            "val/sample_wrong_handedness": float(wrong_handedness(x_nm, system).any(axis=1).mean()),
        }
        if self._md_energy is None:
            frames = trainer.datamodule.val_set.frames[: self.n_samples].double().numpy()
            self._md_energy = float(np.median(evaluate(frames, system).energy))
        metrics["val/md_energy_median_kT"] = self._md_energy
        if trainer.logger is not None:
            trainer.logger.log_metrics(metrics, step=trainer.global_step)
        trainer.callback_metrics.update({k: torch.tensor(v) for k, v in metrics.items()})


class ValidationESS(Callback):
    """The validation figure that tracks the goal: exact-log-q ESS and reweighted E-W2 of the EMA model.

    Every ``every_n`` validations (counted from the global step, so resumed runs keep the same steps): ``n_samples`` fixed prior draws (``seed``) through ``solver`` on ``steps``
    fixed steps uniform in t on [0, ``t1``] with the exact divergence (``trace_method`` "auto": the structured
    trace of a hollow network, else the fastest exact method), decoded to nm with log q_nm = log q_model -
    log|det|; OpenMM energies (kT) give log w = -E - log q_nm. Logs ``val/ess`` (Kish ESS / N),
    ``val/ew2_reweighted_kT`` (E-W2 of the SNIS-weighted samples against ``n_reference`` evenly spaced MD
    validation frames), ``val/ew2_proposal_kT``, ``val/sample_energy_median_kT``, ``val/nonfinite``, with
    ``cpu_hours`` and ``train_cpu_hours`` (the same without this callback's CPU) on the same row. The energies in
    the E-W2s and the median are of the samples rounded as the MD frames are stored (``mddata.as_stored``), like
    for like with the reference (logs before 2026-12-07 compared exact energies, ~0.5 kT lower); log w keeps the
    exact energies.
    """

    def __init__(self, n_samples: int = 128, solver: str = "rk4", steps: int = 16, t1: float = 0.999,
                 seed: int = 0, n_reference: int = 512, trace_method: str = "auto", every_n: int = 1):
        if n_samples < 2 or steps < 1 or n_reference < 2 or every_n < 1:
            raise ValueError("ValidationESS needs n_samples >= 2, steps >= 1, n_reference >= 2, every_n >= 1")
        if not 0.0 < t1 <= 1.0:
            raise ValueError(f"ValidationESS t1 must be in (0, 1], got {t1}")
        self.n_samples, self.solver, self.steps, self.t1, self.seed = n_samples, solver, steps, t1, seed
        self.n_reference, self.trace_method, self.every_n = n_reference, trace_method, every_n
        self._reference: np.ndarray | None = None

    def _reference_energies(self, trainer: L.Trainer, module: FlowMatching) -> np.ndarray:
        from rexmol.energy import evaluate

        if self._reference is None:
            frames = trainer.datamodule.val_set.frames.double().numpy()
            pick = np.linspace(0, len(frames) - 1, min(self.n_reference, len(frames))).round().astype(int)
            energy = evaluate(frames[pick], module.system).energy
            self._reference = energy[np.isfinite(energy)]
        return self._reference

    def measure(self, trainer: L.Trainer, module: FlowMatching) -> dict[str, float]:
        """The metrics of the current EMA model (see the class docstring)."""
        from rexmol.energy import evaluate
        from rexmol.mddata import as_stored
        from rexmol.metrics import energy_w2

        dtype = next(module.ema.parameters()).dtype
        prior = module.prior
        x0, branches = prior_draws(module, self.n_samples, self.seed, dtype)
        coords = LawsonCoordinates(FlowMatchingPath(), kind="data", output=module.hparams.output_kind)
        with torch.no_grad():
            out = sample_with_logq(module.ema, prior, x0, self.solver, FixedGrid.uniform_t(0.0, self.t1, self.steps),
                                   coords=coords, options=LogQOptions(mode="exact", method=self.trace_method))
            x_nm, log_det, flags = module.space.decode(out.x.double(), branches)
        logq = torch.where(flags, torch.full_like(log_det, float("nan")), out.logq.double() - log_det).numpy()
        x_nm = x_nm.numpy()
        energy, compared = np.full(len(logq), np.inf), np.full(len(logq), np.inf)
        finite_x = np.isfinite(x_nm).all(axis=(1, 2))
        if finite_x.any():
            energy[finite_x] = evaluate(x_nm[finite_x], module.system).energy
            compared[finite_x] = evaluate(as_stored(x_nm[finite_x]).astype(np.float64), module.system).energy
        log_w = -energy - logq
        ok = np.isfinite(log_w)
        reference = self._reference_energies(trainer, module)
        metrics = {"val/ess": kish_ess(log_w), "val/nonfinite": float((~ok).mean()),
                   "val/ew2_reweighted_kT": float("inf"), "val/ew2_proposal_kT": float("inf"),
                   "val/sample_energy_median_kT": float(np.median(compared))}
        usable = ok & np.isfinite(compared)
        if usable.any():
            weights = normalized_weights(log_w)[usable]
            metrics["val/ew2_reweighted_kT"] = energy_w2(reference, compared[usable], gen_weights=weights)
            metrics["val/ew2_proposal_kT"] = energy_w2(reference, compared[np.isfinite(compared)])
        return metrics

    def on_validation_end(self, trainer: L.Trainer, module: FlowMatching) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero or module.space is None:
            return
        # Counted from the global step (not from calls) so that a resumed run measures at the same steps.
        interval = max(1, int(getattr(trainer, "val_check_batch", 1) or 1))
        if (max(1, trainer.global_step // interval) - 1) % self.every_n:
            return
        start = time.process_time()
        metrics = self.measure(trainer, module)
        module.validation_cpu_seconds += (time.process_time() - start) * trainer.world_size
        total = module.cpu_seconds()
        metrics.update(cpu_hours=total / 3600.0, train_cpu_hours=(total - module.validation_cpu_seconds) / 3600.0)
        if trainer.logger is not None:
            trainer.logger.log_metrics(metrics, step=trainer.global_step)
        trainer.callback_metrics.update({k: torch.tensor(v) for k, v in metrics.items()})


def _versions() -> dict[str, str]:
    import lightning

    import rexmol

    return {"rexmol": rexmol.__version__, "torch": torch.__version__, "lightning": lightning.__version__,
            "python": sys.version.split()[0]}
