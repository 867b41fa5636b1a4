"""Flow-matching training of :class:`rexmol.models.dit.AtomDiT` with PyTorch Lightning.

Path (t = 0 noise, t = 1 data): ``x_t = t x1 + (1 - (1 - sigma_min) t) x0`` with ``x0`` a mean-free standard
Gaussian and ``x1`` a centred training frame divided by the data scale. Targets by ``output_kind``: velocity
``x1 - (1 - sigma_min) x0``, data ``x1``, noise ``x0``; loss = mean squared error over atoms and coordinates.
``t = 1 - (1 - u)^time_power`` with ``u`` uniform: ``time_power`` > 1 samples t more often near the data end.

The module keeps an EMA copy of the weights (``self.ema``), used for validation and for sampling; the
data scale (nm) and the dataset provenance are stored in every checkpoint. Callbacks here write the small
generator file, the loss curve PNG and the sample-energy diagnostics.
"""
from __future__ import annotations

import copy
import math
import shlex
import shutil
import sys
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback, Timer
from torch import Tensor

from rexmol.data import random_rotations
from rexmol.models.checkpoint import OUTPUT_KINDS, save_generator
from rexmol.models.dit import AtomDiT, DiTConfig
from rexmol.systems import load_system


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
                       sigma_min: float = 0.0, time_power: float = 1.0) -> Tensor:
    """Mean squared flow-matching error; ``x1`` data and ``x0`` noise [B, N, 3] normalised, ``u`` [B] uniform."""
    t = 1.0 - (1.0 - u) ** time_power
    tt = t[:, None, None]
    xt = tt * x1 + (1.0 - (1.0 - sigma_min) * tt) * x0
    if output_kind == "velocity":
        target = x1 - (1.0 - sigma_min) * x0
    elif output_kind == "data":
        target = x1
    else:
        target = x0
    return ((model(xt, t) - target) ** 2).mean()


class FlowMatching(L.LightningModule):
    """Flow matching of a DiT on one molecular system.

    Args:
        system: system name (``rexmol.systems.load_system``); the data module must hold the same system.
        size: DiT preset (``tiny``, ``small``, ``base``); ``hidden``/``depth``/``heads``/``mlp_ratio``/
            ``graph_bias``/``distance_bias``/``chirality``/``local_frames`` override it.
        output_kind: what the network predicts: ``velocity``, ``data`` or ``noise``.
        sigma_min: noise left at t = 1 (0: the plain linear path the solvers assume).
        time_power: ``t = 1 - (1 - u)^time_power``; 1 is uniform, > 1 favours the data end.
        lr, weight_decay, betas: AdamW (no decay on biases, embeddings and bias tables).
        warmup_steps: linear warm-up; then cosine decay to ``min_lr_ratio * lr``.
        schedule_by: ``steps`` (decay over ``schedule_steps``, default the trainer's max_steps) or ``time``
            (decay over the trainer's ``max_time``: the right choice for a time-limited run).
        ema_decay: EMA of the weights (effective decay ``min(ema_decay, (1 + step) / (10 + step))``).
        init_from: warm start from a generator file or checkpoint (its EMA weights and its data scale); the
            architecture must match except for the zero-initialised ``chirality``/``local_frames`` additions.
    """

    def __init__(
        self,
        system: str = "ala3",
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
        init_from: str | None = None,
    ):
        super().__init__()
        self.save_hyperparameters()
        if output_kind not in OUTPUT_KINDS:
            raise ValueError(f"unknown output_kind {output_kind!r}; expected one of {OUTPUT_KINDS}")
        if schedule_by not in ("steps", "time"):
            raise ValueError(f"schedule_by must be 'steps' or 'time', got {schedule_by!r}")
        if not 0.0 <= sigma_min < 1.0:
            raise ValueError(f"sigma_min must be in [0, 1), got {sigma_min}")
        if time_power <= 0:
            raise ValueError(f"time_power must be > 0, got {time_power}")
        self.system = load_system(system)
        config = DiTConfig.from_size(size, hidden=hidden, depth=depth, heads=heads, mlp_ratio=mlp_ratio,
                                     graph_bias=graph_bias, distance_bias=distance_bias, chirality=chirality,
                                     local_frames=local_frames)
        self.model = AtomDiT.for_system(self.system, config)
        self.register_buffer("data_scale", torch.zeros((), dtype=torch.float64))  # nm; 0 until the data sets it
        self.data_info: dict[str, Any] = {}
        if init_from is not None:
            self._warm_start(init_from)
        self.ema = copy.deepcopy(self.model).requires_grad_(False)

    def _warm_start(self, path: str) -> None:
        from rexmol.models.checkpoint import load_generator

        source = load_generator(path)
        if source.system_name != self.system.name:
            raise ValueError(f"init_from {path} is for system {source.system_name!r}, not {self.system.name!r}")
        try:
            missing, unexpected = self.model.load_state_dict(source.model.state_dict(), strict=False)
        except RuntimeError as err:  # shape mismatch
            raise ValueError(f"init_from {path}: architecture differs: {err}") from err
        new_modules = [k for k in missing if not k.startswith(("chiral_", "frame_"))]
        if unexpected or new_modules:
            raise ValueError(f"init_from {path}: architecture differs (missing {new_modules}, unexpected {unexpected})")
        self.data_scale.fill_(source.scale)
        self._init_source = {"init_from": str(path), "init_global_step": source.meta.get("global_step"),
                             "init_scale_nm": source.scale}

    # -- data scale and provenance -------------------------------------------------------------------------
    def on_fit_start(self) -> None:
        dm = self.trainer.datamodule
        if dm is None or not hasattr(dm, "scale"):
            raise ValueError("FlowMatching needs rexmol.data.MDDataModule (a datamodule with .scale and .info)")
        if dm.system.n_atoms != self.system.n_atoms or dm.system.name != self.system.name:
            raise ValueError(f"data module holds system {dm.system.name!r} ({dm.system.n_atoms} atoms) but the model "
                             f"is for {self.system.name!r} ({self.system.n_atoms} atoms)")
        if float(self.data_scale) == 0.0:  # fresh run; a resumed or warm-started run keeps its scale
            self.data_scale.fill_(dm.scale)
        if not self.data_info:  # a resumed run keeps the provenance it was trained with
            self.data_info = {**dm.info, **getattr(self, "_init_source", {}), "scale_used_nm": float(self.data_scale)}

    def normalise(self, batch_nm: Tensor) -> Tensor:
        return batch_nm / self.data_scale.to(batch_nm.dtype)

    # -- steps ---------------------------------------------------------------------------------------------
    def _loss(self, model: torch.nn.Module, x1: Tensor, generator: torch.Generator | None = None) -> Tensor:
        x0 = mean_free_noise(tuple(x1.shape), dtype=x1.dtype, device=x1.device, generator=generator)
        u = torch.rand(len(x1), dtype=x1.dtype, generator=generator, device=x1.device)
        hp = self.hparams
        return flow_matching_loss(model, x1, x0, u, output_kind=hp.output_kind, sigma_min=hp.sigma_min,
                                  time_power=hp.time_power)

    def training_step(self, batch: Tensor, batch_idx: int) -> Tensor:
        loss = self._loss(self.model, self.normalise(batch))
        self.log("train/loss", loss, prog_bar=True)
        self.log("lr", self.optimizers().param_groups[0]["lr"], prog_bar=False)
        return loss

    def validation_step(self, batch: Tensor, batch_idx: int) -> None:
        generator = torch.Generator(device=batch.device).manual_seed(1000 + batch_idx)  # same noise every time
        with torch.no_grad():
            loss = self._loss(self.ema, self.normalise(batch), generator)
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
        """What :func:`rexmol.models.checkpoint.load_generator` needs besides the weights."""
        return {
            "system": self.system.name,
            "n_atoms": self.system.n_atoms,
            "model_config": self.model.config.to_dict(),
            "scale": float(self.data_scale),
            "output_kind": self.hparams.output_kind,
            "sigma_min": float(self.hparams.sigma_min),
            "meta": {"data": self.data_info, "hparams": dict(self.hparams)},
        }

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["rexmol"] = self.generator_info()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.data_info = dict(checkpoint.get("rexmol", {}).get("meta", {}).get("data", {}))


class ExportGenerator(Callback):
    """Write the small generator file (EMA weights + metadata), config, command and metrics to ``dirpath``.

    Written after every validation (so a time-limited run always leaves a usable file) and at the end.
    """

    def __init__(self, dirpath: str, filename: str = "generator.pt"):
        self.dirpath = Path(dirpath)
        self.filename = filename

    def _export(self, trainer: L.Trainer, module: FlowMatching) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero or float(module.data_scale) == 0.0:
            return
        info = module.generator_info()
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if torch.as_tensor(v).numel() == 1}
        meta = {**info["meta"], "global_step": trainer.global_step, "epoch": trainer.current_epoch,
                "metrics": metrics, "command": shlex.join(sys.argv), "versions": _versions()}
        save_generator(self.dirpath / self.filename, module.ema, system_name=info["system"], scale=info["scale"],
                       output_kind=info["output_kind"], sigma_min=info["sigma_min"], meta=meta)
        (self.dirpath / "command.txt").write_text(shlex.join(sys.argv) + "\n")
        log_dir = Path(trainer.log_dir) if trainer.log_dir else None
        for name in ("config.yaml", "metrics.csv"):
            if log_dir is not None and (log_dir / name).is_file():
                shutil.copyfile(log_dir / name, self.dirpath / name)

    def on_validation_end(self, trainer: L.Trainer, module: FlowMatching) -> None:
        if trainer.logger is not None:
            trainer.logger.save()
        self._export(trainer, module)

    def on_train_end(self, trainer: L.Trainer, module: FlowMatching) -> None:
        if trainer.logger is not None:
            trainer.logger.save()
        self._export(trainer, module)


class LossCurve(Callback):
    """Plot train/val loss (log scale) from the CSV logger's ``metrics.csv`` to ``path`` after each validation."""

    def __init__(self, path: str):
        self.path = Path(path)

    def _plot(self, trainer: L.Trainer) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero or not trainer.log_dir:
            return
        if trainer.logger is not None:
            trainer.logger.save()
        csv = Path(trainer.log_dir) / "metrics.csv"
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
        g = torch.Generator().manual_seed(self.seed)
        dtype = next(module.ema.parameters()).dtype
        x = mean_free_noise((self.n_samples, system.n_atoms, 3), dtype=dtype, generator=g)
        with torch.no_grad():
            for k in range(self.n_steps):
                t = torch.full((self.n_samples,), k / self.n_steps, dtype=dtype)
                x = x + module.ema(x, t) / self.n_steps
        x_nm = (x * float(module.data_scale)).double().cpu().numpy()
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


def _versions() -> dict[str, str]:
    import lightning

    import rexmol

    return {"rexmol": rexmol.__version__, "torch": torch.__version__, "lightning": lightning.__version__,
            "python": sys.version.split()[0]}
