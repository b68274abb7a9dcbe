"""The LightningModule: the network, FLAME and the losses joined into one training step.

image [B,3,S,S] -> :class:`dad3dlib.model.DAD3DNet` -> 3DMM vector [B,413] -> FLAME mesh
(:class:`dad3dlib.flame.FlameLayer`, canonical and reprojected into the crop) -> the loss terms
(:class:`dad3dlib.losses.DADLoss`) and, in validation, the metrics (:func:`dad3dlib.metrics.batch_metrics`);
the optimiser and the learning-rate schedules (:data:`SCHEDULES`). :mod:`dad3dlib.train` runs it.
"""
from __future__ import annotations

import math

import lightning as L
import torch
from torch import Tensor, nn

from .errors import ParamsError
from .data import flame_dir
from .flame import SUBSETS, FlameAssets, FlameLayer, load_flame_assets
from .losses import LOSS_TERMS, DADLoss
from .metrics import batch_metrics
from .model import create_model
from .settings import OptimSettings, Settings

MONITOR = "val/nme"  # the validation metric that picks best.ckpt and steps the plateau schedule


def _non_persistent(module: nn.Module) -> nn.Module:
    """Keep a module's buffers out of state dicts (FLAME is data, not weights: checkpoints stay
    small and never carry a licensed model)."""
    for m in module.modules():
        m._non_persistent_buffers_set.update(m._buffers)
    return module


class DADModule(L.LightningModule):
    """DAD-3DNet + FlameLayer + DADLoss of a run's settings, which checkpoints hold as plain data
    (hyper parameter ``params``: :meth:`dad3dlib.settings.Settings.to_dict`)."""

    def __init__(self, settings: Settings, flame: FlameAssets | None = None):
        super().__init__()
        self.settings = settings
        self.save_hyperparameters({"params": settings.to_dict()})
        self.model = create_model(settings.model)
        self.flame = _non_persistent(FlameLayer(flame or load_flame_assets(flame_dir(settings.data))))
        self.loss = DADLoss(settings.loss.lambdas, {n: self.flame.subset(n) for n in SUBSETS},
                            settings.loss.heatmap_loss)
        union = self.loss.vertex_subsets.union  # training computes only the vertices its losses read
        if union is not None and len(union) < self.flame.n_vertices:
            self.flame.select_vertices(union)

    def forward(self, image: Tensor) -> dict[str, Tensor]:
        return self.model(image)

    def setup(self, stage: str) -> None:
        # faster convolutions, bf16 above all; here, before DDP wraps the model (its gradient
        # buckets take the parameters' layout then)
        self.model.to(memory_format=torch.channels_last)
        # Deterministic algorithms (set by the Trainer on CPUs) also fill every new tensor with NaN,
        # a debugging aid that costs ~8 % of a cpu-preset step; the algorithms stay deterministic.
        torch.utils.deterministic.fill_uninitialized_memory = False
        if self.settings.trainer.compile:  # in place: state-dict keys unchanged
            self.model.compile()

    def _predict(self, batch: dict, needs: set[str], selected: bool = False) -> dict[str, Tensor]:
        """Network outputs plus the FLAME views in ``needs`` (fp32, outside autocast); ``selected``:
        of the vertices the losses read alone (``FlameLayer.select_vertices``)."""
        out = self.model(batch["image"].contiguous(memory_format=torch.channels_last))
        with torch.autocast(self.device.type, enabled=False):
            params = out["params_3dmm"].float()
            pred = {**out, "params_3dmm": params}
            if needs & {"vertices_canonical", "vertices_reprojected"}:
                pred["vertices_canonical"] = self.flame.canonical(params, selected)
            if "vertices_reprojected" in needs:
                pred["vertices_reprojected"] = self.flame.reproject(params, batch["image"].shape[-1],
                                                                    pred["vertices_canonical"])
        return pred

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        pred = self._predict(batch, self.loss.needs, selected=True)
        raw = self.loss.terms(pred, batch)
        total, terms = self.loss.combine(raw)
        B = batch["image"].shape[0]
        self.log("train/loss", total, on_step=True, on_epoch=True, prog_bar=True, batch_size=B, sync_dist=True)
        for k, v in terms.items():  # train/<term>: the weighted contribution; train/raw/<term>: the term itself
            self.log(f"train/{k}", v, on_step=True, on_epoch=True, batch_size=B, sync_dist=True)
            self.log(f"train/raw/{k}", raw[k].detach(), on_step=True, on_epoch=True, batch_size=B, sync_dist=True)
        return total

    def on_validation_epoch_start(self) -> None:
        self._val_sums: dict[str, Tensor] = {}  # name -> [sum over this process's samples, count]

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        pred = self._predict(batch, {term.needs for term in LOSS_TERMS.values()})
        raw = self.loss.terms(pred, batch, LOSS_TERMS)  # every term, those weighted 0 too
        total, terms = self.loss.combine(raw)
        with torch.autocast(self.device.type, enabled=False):  # fp32, whatever the network's precision
            metrics = batch_metrics(pred, batch, self.flame)
        B = batch["image"].shape[0]
        sums = {"loss": total * B, **{k: v * B for k, v in terms.items()}, **{f"raw/{k}": v * B for k, v in raw.items()},
                **{k: v.sum() for k, v in metrics.items()}}
        for k, v in sums.items():
            acc = self._val_sums.setdefault(k, torch.zeros(2, dtype=torch.float64, device=self.device))
            acc += torch.stack([v.detach().double(), acc.new_tensor(B)])

    def on_validation_epoch_end(self) -> None:
        """Log the validation means over the samples of all processes: sums and counts reduced
        over the processes, then divided (Lightning's own mean over processes truncates its
        integer counts, so unequal shares would be weighted wrongly). Then step the plateau
        schedule, before this validation's checkpoints are written, so that they hold its state
        after the step (Lightning steps it after them, and not again on resume)."""
        # the same on every process, even one without samples
        keys = ["loss", *self.loss.weights, *(f"raw/{k}" for k in LOSS_TERMS), "nme", "angle_error"]
        zero = torch.zeros(2, dtype=torch.float64, device=self.device)
        sums = self.trainer.strategy.reduce(torch.stack([self._val_sums.get(k, zero) for k in keys]), reduce_op="sum")
        means = {f"val/{k}": s / n for k, (s, n) in zip(keys, sums) if n > 0}
        for k, v in means.items():
            self.log(k, v.float(), prog_bar=k in ("val/nme", "val/angle_error"), sync_dist=True)  # equal: a no-op
        sched = self.lr_schedulers()
        if isinstance(sched, torch.optim.lr_scheduler.ReduceLROnPlateau) and MONITOR in means \
                and not self.trainer.sanity_checking:
            sched.step(means[MONITOR])

    def lr_scheduler_step(self, scheduler, metric) -> None:
        if not isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):  # see on_validation_epoch_end
            scheduler.step()

    def configure_optimizers(self):
        o = self.settings.optim
        # fused: one kernel for all parameters (on a CPU 6x faster than the per-tensor loop)
        opt = torch.optim.Adam(self.model.parameters(), lr=o.lr, weight_decay=o.weight_decay,
                               fused=self.device.type in ("cpu", "cuda"))
        return {"optimizer": opt, "lr_scheduler": SCHEDULES[o.schedule](opt, o, self.trainer)}


def _plateau(opt: torch.optim.Optimizer, o: OptimSettings, trainer: L.Trainer) -> dict:
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="min", factor=o.plateau_factor,
                                                       patience=o.plateau_patience, min_lr=o.min_lr)
    return {"scheduler": sched, "monitor": MONITOR, "interval": "epoch", "strict": False}


def _onecycle(opt: torch.optim.Optimizer, o: OptimSettings, trainer: L.Trainer) -> dict:
    total = trainer.estimated_stepping_batches
    if not math.isfinite(total):
        raise ParamsError("params: optim.schedule 'onecycle' needs a bounded run (trainer.max_steps or max_epochs)")
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=o.lr, total_steps=max(int(total), 1),
                                                pct_start=o.warmup_fraction, anneal_strategy="cos")
    return {"scheduler": sched, "interval": "step"}


SCHEDULES = {"plateau": _plateau, "onecycle": _onecycle}  # optim.schedule: settings.CHECKPOINT_POLICY's names
