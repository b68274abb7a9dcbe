"""Training DAD-3DNet with Lightning from a params dict (``python -m dad3dlib train``).

    python -m dad3dlib train --params FILE [--out DIR]

Params: plain nested data, sections seed, model, loss, data, optim, trainer. Every key but
``data.root`` has a default; the keys and their defaults are ``config.DEFAULTS`` (their one home),
and a run's ``params.yaml`` is rewritten with all of them filled in.

``model.pose_prior_samples`` > 0 fits the pose head's initial scale/translation to that many training
samples (a weak-perspective least-squares fit of the GT), so that training from scratch starts from
a head at the right size and place. The ``bifpn_*`` keys choose the BiFPN (model.DAD3DNet; the
paper preset sets the reference's). ``data.clip_bbox``: clip the grown bbox to the image before
cropping (the reference does). ``trainer.min_epochs``: no early stop before. ``data.root``: absolute, or
relative to outputs/ (``config.data_root``). ``data.flame_path`` null: the FLAME assets recorded in the data set's
``make_data.json``, else the project's synthetic head. ``trainer.max_time``: seconds or
Lightning's "DD:HH:MM:SS"; it is a budget over the whole run (resumes continue the clock).
The data set decides the splits (:func:`dad3dlib.data.split_protocol`): training fits on train and
validates (checkpoint, plateau schedule, early stopping) on val, or, when the test split has no
annotations, on the ``data.holdout_fraction`` of train chosen by item-id hash, fitting on the rest.
``optim.schedule``: ``plateau`` (the reference: ReduceLROnPlateau on validation NME, stepped after
each validation: once per epoch unless ``val_check_interval`` / ``check_val_every_n_epoch`` say otherwise) or
``onecycle`` (warm-up over ``warmup_fraction`` of the run to ``lr``, then cosine decay to ~0 at the
last step; for fixed step budgets such as the cpu preset).
``precision: auto`` is bf16-mixed on a GPU and on a CPU with native bfloat16, else 32-true; FLAME and the
losses always run in fp32.

Outputs in ``--out DIR``: ``checkpoints/best.ckpt`` (lowest validation reprojection NME),
``checkpoints/last.ckpt``, ``logs/version_N/metrics.csv`` (per step: the learning rate, each active
loss term's weighted contribution ``train/<term>`` and its unweighted value ``train/raw/<term>``; per
validation: NME, angle error, the weighted terms ``val/<term>`` and every term unweighted,
``val/raw/<term>``, those weighted 0 included; one version per
(re)start, :func:`dad3dlib.report.read_metrics` joins them), the same curves as TensorBoard events in
``tensorboard/``, ``progress.json`` (steps done of total, kept current for the study's display),
``params.yaml``. Checkpoints are written atomically
(:class:`AtomicCheckpointIO`). Running again on the same DIR resumes from ``last.ckpt`` (from
``best.ckpt``, saying so, when ``last.ckpt`` is unreadable), exactly: a run killed and resumed ends
with the same weights as an uninterrupted one on the same machine (:class:`ExactResume`).

Several processes (DDP through Lightning's standard launchers; gloo on CPUs): set ``trainer.devices``
(processes per node: GPUs, or CPU processes with ``accelerator: cpu``), ``trainer.num_nodes`` and
``trainer.strategy: ddp``. One node: run the command as usual, Lightning starts one process per
device (running the command again). Several nodes: run the same command on every node with
``MASTER_ADDR``, ``MASTER_PORT``, ``NODE_RANK`` (and ``WORLD_SIZE``) set, or under SLURM (``srun``,
detected automatically), or with ``torchrun --nnodes N --nproc-per-node G -m dad3dlib train ...``.
From a Jupyter kernel (the study's notebook), which Lightning cannot run again, :func:`train` runs
the command as a child process and waits for it. With P processes in all:

- ``data.batch_size`` is per process: a step averages the gradients of P × batch_size samples;
  ``optim.lr`` is used as given (not scaled with P). ``trainer.num_threads`` is per process.
- Each epoch, every process takes its share ``order[rank::P]`` of the same seeded random order,
  cut to a multiple of P first, so all step alike: each sample is seen at most once per epoch,
  and the ``n mod P`` samples at the end of that epoch's order are left out (others each epoch).
- Validation: process r takes samples ``r, r+P, ...`` (no padding, no repeats); the logged means
  are weighted sums and counts reduced over the processes, so ``val/nme`` (which picks
  ``best.ckpt``) equals a one-process validation of the same weights.
- The pose prior is fitted once, by rank 0, and sent to the others; the data cache is built by
  one process while the others wait (:func:`dad3dlib.data.build_index`); checkpoints, logs,
  ``training.json`` and the printed lines come from rank 0 only.
- Resuming continues from the checkpoint's step with each process's remaining share of the
  interrupted epoch; unlike one process, it is not checked to be bit-exact.

Nothing here imports pytorch3d, papermill or moderngl.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import random
import subprocess
import sys
import tempfile
import time
from collections import deque
from pathlib import Path

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback, EarlyStopping, LearningRateMonitor, ModelCheckpoint, TQDMProgressBar
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.plugins import TorchCheckpointIO
from lightning.pytorch.utilities import rank_zero_only
from torch import Tensor, nn

from .board import BOARD_DIR
from .config import (CHECKPOINT_POLICY, MODEL_ONLY_KEYS, TRAINING_RECORD, ParamsError, evaluation_checkpoint,
                     load_params, save_params, with_defaults)
from .data import flame_dir, open_split, split_protocol
from .files import LOAD_ERRORS, atomic_open, write_json
from .flame import SUBSETS, FlameAssets, FlameLayer, load_flame_assets
from .losses import LOSS_TERMS, DADLoss
from .metrics import batch_metrics
from .model import checkpoint_step, cpu_has_native_bf16, create_model, pose_prior, set_pose_prior
from .progress import write_progress

MONITOR = "val/nme"


# --------------------------------------------------------------------------------------------
# LightningModule
# --------------------------------------------------------------------------------------------
def _non_persistent(module: nn.Module) -> nn.Module:
    """Keep a module's buffers out of state dicts (FLAME is data, not weights: checkpoints stay
    small and never carry a licensed model)."""
    for m in module.modules():
        m._non_persistent_buffers_set.update(m._buffers)
    return module


class DADModule(L.LightningModule):
    """DAD-3DNet + FlameLayer + DADLoss. ``params`` as :data:`dad3dlib.config.DEFAULTS` (already completed)."""

    def __init__(self, params: dict, flame: FlameAssets | None = None):
        super().__init__()
        self.save_hyperparameters({"params": params})
        model_cfg = {k: v for k, v in params["model"].items() if k not in MODEL_ONLY_KEYS}
        self.model = create_model(model_cfg)
        self.flame = _non_persistent(FlameLayer(flame or load_flame_assets(flame_dir(params["data"]))))
        self.loss = DADLoss(params["loss"]["lambdas"], {n: self.flame.subset(n) for n in SUBSETS},
                            params["loss"].get("heatmap_loss", "awing"))
        union = self.loss.vertex_subsets.union  # training computes only the vertices its losses read
        if union is not None and len(union) < self.flame.num_vertices:
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
        if self.hparams["params"]["trainer"].get("compile"):  # in place: state-dict keys unchanged
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
        o = self.hparams["params"]["optim"]
        # fused: one kernel for all parameters (on a CPU 6x faster than the per-tensor loop)
        opt = torch.optim.Adam(self.model.parameters(), lr=o["lr"], weight_decay=o["weight_decay"],
                               fused=self.device.type in ("cpu", "cuda"))
        return {"optimizer": opt, "lr_scheduler": SCHEDULES[o["schedule"]](opt, o, self.trainer)}


def _plateau(opt: torch.optim.Optimizer, o: dict, trainer: L.Trainer) -> dict:
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="min", factor=o["plateau_factor"],
                                                       patience=o["plateau_patience"], min_lr=o["min_lr"])
    return {"scheduler": sched, "monitor": MONITOR, "interval": "epoch", "strict": False}


def _onecycle(opt: torch.optim.Optimizer, o: dict, trainer: L.Trainer) -> dict:
    total = trainer.estimated_stepping_batches
    if not math.isfinite(total):
        raise ParamsError("params: optim.schedule 'onecycle' needs a bounded run (trainer.max_steps or max_epochs)")
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=o["lr"], total_steps=max(int(total), 1),
                                                pct_start=o["warmup_fraction"], anneal_strategy="cos")
    return {"scheduler": sched, "interval": "step"}


SCHEDULES = {"plateau": _plateau, "onecycle": _onecycle}
assert set(SCHEDULES) == set(CHECKPOINT_POLICY), "config.CHECKPOINT_POLICY names the schedules implemented here"


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------
def make_datasets(params: dict, flame: FlameAssets | None = None,
                  splits: dict | None = None) -> dict[str, torch.utils.data.Dataset]:
    """{"train", "val"}: the fit and the model-selection datasets of the data section's split
    protocol (``splits``, default :func:`dad3dlib.data.split_protocol`)."""
    d = params["data"]
    splits = splits or split_protocol(d)
    flame = flame or load_flame_assets(flame_dir(d))
    return {"train": open_split(d, splits["fit"], flame, train=True), "val": open_split(d, splits["select"], flame)}


def make_loaders(datasets: dict, params: dict) -> dict[str, torch.utils.data.DataLoader]:
    """Train (shuffled by an :class:`EpochSampler` seeded from ``params["seed"]``, samples drawn
    through :class:`SeededSamples`) and val (in order, :class:`ShardSampler`) loaders, each taking
    this process's share of the samples. Neither draws from the global torch generator."""
    d, seed = params["data"], params["seed"]
    common = {"batch_size": d["batch_size"], "num_workers": d["num_workers"],
              "persistent_workers": d["num_workers"] > 0, "pin_memory": torch.cuda.is_available()}
    private = lambda: torch.Generator().manual_seed(seed)  # noqa: E731 (worker base seeds only)
    return {"train": torch.utils.data.DataLoader(SeededSamples(datasets["train"]), drop_last=True,
                                                 sampler=EpochSampler(len(datasets["train"]), seed),
                                                 generator=private(), **common),
            "val": torch.utils.data.DataLoader(datasets["val"], sampler=ShardSampler(len(datasets["val"])),
                                               generator=private(), **common)}


def check_shares(sizes: dict[str, int], world: int, batch_size: int) -> None:
    """Refuse splits too small for ``world`` processes: each process needs a full training batch
    (incomplete ones are dropped: it would train nothing) and a validation sample (one without would
    skip validation while the others wait for it in the reduction of the means). sizes: {"train":
    samples, "val": samples}."""
    if sizes["train"] // world < batch_size:
        raise ParamsError(f"params: {sizes['train']} training samples make no full batch of data.batch_size "
                          f"{batch_size} for each of {world} process(es)")
    if sizes["val"] < world:
        raise ParamsError(f"params: {sizes['val']} validation samples for {world} processes: each needs at least "
                          "one (use fewer processes)")


def process_rank(rank: int | None = None, world: int | None = None) -> tuple[int, int]:
    """(rank, number of processes): the given values, else those of the default process group
    (several training processes), else (0, 1)."""
    if rank is None or world is None:
        group = torch.distributed.is_available() and torch.distributed.is_initialized()
        rank, world = (torch.distributed.get_rank(), torch.distributed.get_world_size()) if group else (0, 1)
    return rank, world


class ShardSampler(torch.utils.data.Sampler):
    """Samples ``rank, rank + world, ...`` of ``n``, in order: each sample on exactly one process,
    none repeated (shares differ by at most one). rank, world None: :func:`process_rank`'s."""

    def __init__(self, n: int, rank: int | None = None, world: int | None = None):
        self.n, self.rank, self.world = n, rank, world

    def __len__(self) -> int:
        rank, world = process_rank(self.rank, self.world)
        return len(range(rank, self.n, world))

    def __iter__(self):
        rank, world = process_rank(self.rank, self.world)
        return iter(range(rank, self.n, world))


class EpochSampler(torch.utils.data.Sampler):
    """A random order of ``n`` samples per epoch, from its own generator, with a seed per position
    for the sample's random draws: yields (index, seed). On several processes (rank, world; None:
    :func:`process_rank`'s) every process draws the same order, cuts it to a multiple of world and
    takes ``order[rank::world]``, so all have n // world items. ``skip`` items of this process's
    next epoch are left out (a run resumed within an epoch); ``epoch_start`` is the generator's
    state before the current epoch was drawn."""

    def __init__(self, n: int, seed: int, rank: int | None = None, world: int | None = None):
        self.n, self.skip, self.rank, self.world = n, 0, rank, world
        self.generator = torch.Generator().manual_seed(seed)
        self.epoch_start = self.generator.get_state()

    def __len__(self) -> int:
        return self.n // process_rank(self.rank, self.world)[1]

    def __iter__(self):
        rank, world = process_rank(self.rank, self.world)
        self.epoch_start = self.generator.get_state()
        order = torch.randperm(self.n, generator=self.generator).tolist()
        seeds = torch.randint(0, 2 ** 62, (self.n,), generator=self.generator).tolist()
        end = self.n - self.n % world
        skip, self.skip = self.skip, 0
        yield from list(zip(order[:end], seeds[:end]))[rank::world][skip:]


class SeededSamples(torch.utils.data.Dataset):
    """``dataset[index]`` for an (index, seed) item, with the global torch generator seeded by
    ``seed`` for the call and restored after: a sample's random draws (crop margins, photometric
    augmentation) depend on its epoch and position only, not on the worker that drew it nor on
    what ran before (prefetching, dropout)."""

    def __init__(self, dataset: torch.utils.data.Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, item: tuple[int, int]) -> dict:
        index, seed = item
        with torch.random.fork_rng(devices=()):
            torch.default_generator.manual_seed(seed)
            return self.dataset[index]


class PosePrior(L.Callback):
    """Fit :func:`dad3dlib.model.pose_prior` of the first ``n`` samples of ``dataset`` into the network when
    training starts: once, on rank 0, and sent to every other process, so that all start alike
    (and it is printed once). ``prior``: the prior set."""

    def __init__(self, dataset: torch.utils.data.Dataset, n: int, crop_size: int):
        self.dataset, self.n, self.crop_size, self.prior = dataset, n, crop_size, None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        prior = pose_prior(self.dataset, self.n, self.crop_size) if trainer.is_global_zero else None
        self.prior = trainer.strategy.broadcast(prior, src=0)
        set_pose_prior(pl_module.model, self.prior)
        if trainer.is_global_zero:
            print(f"pose prior from data: {self.prior}")


# --------------------------------------------------------------------------------------------
# Exact resume
# --------------------------------------------------------------------------------------------
def rng_states() -> dict:
    """The global RNG states (torch, CUDA, numpy, random) as tensors and plain data, so that a
    checkpoint holding them still loads with ``weights_only=True``."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else [],
            "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
            "random": random.getstate()}


def set_rng_states(states: dict) -> None:
    """Inverse of :func:`rng_states` (CUDA states only onto as many GPUs)."""
    torch.set_rng_state(states["torch"])
    if states["cuda"] and torch.cuda.is_available() and torch.cuda.device_count() == len(states["cuda"]):
        torch.cuda.set_rng_state_all(states["cuda"])
    kind, keys, pos, has_gauss, gauss = states["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    random.setstate(states["random"])


class ExactResume(L.Callback):
    """Checkpoints what else decides the rest of a run, so that a run resumed from a checkpoint
    continues exactly like the uninterrupted run on the same machine: the global RNG states and
    the train sampler's generator and position within the epoch. (Lightning restores weights,
    optimiser, schedulers, loops and callbacks, not these.) A run on several processes resumes
    with each process's remaining share of the interrupted epoch (the RNG states are rank 0's);
    that it continues bit-exactly is checked for one process only."""

    KEY = "exact_resume"

    def __init__(self, sampler: EpochSampler, batch_size: int):
        self.sampler, self.batch_size = sampler, batch_size

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        done = trainer.fit_loop.epoch_loop.batch_progress.current.processed
        checkpoint[self.KEY] = {"rng": rng_states(), "epoch_start": self.sampler.epoch_start,
                                "generator": self.sampler.generator.get_state(),
                                "skip": done * self.batch_size if done < trainer.num_training_batches else 0}

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        state = checkpoint.get(self.KEY)
        if state is None:  # written before this existed: resumes, not bit-exactly
            return
        set_rng_states(state["rng"])
        if state["skip"]:  # within an epoch: redraw it, skip what was done (each process its share)
            self.sampler.generator.set_state(state["epoch_start"])
            self.sampler.skip = state["skip"]
        else:
            self.sampler.generator.set_state(state["generator"])


# --------------------------------------------------------------------------------------------
# Entry points
# --------------------------------------------------------------------------------------------
def _max_time(value) -> datetime.timedelta | str | None:
    if value is None or isinstance(value, str):
        return value
    return datetime.timedelta(seconds=float(value))


def _on_gpu(t: dict) -> bool:
    return t["accelerator"] in ("auto", "gpu", "cuda") and torch.cuda.is_available()


def resolve_precision(t: dict) -> str:
    """``trainer.precision``; ``auto``: bf16-mixed on a GPU and on a CPU with native bfloat16, else
    32-true. The network runs in the chosen precision; FLAME and the losses always in fp32."""
    if t["precision"] != "auto":
        return str(t["precision"])
    return "bf16-mixed" if _on_gpu(t) or cpu_has_native_bf16() else "32-true"


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoints written through :func:`dad3dlib.files.atomic_open`: a full disk or a kill leaves
    the previous checkpoint whole, and the error names the file. (Lightning's own save copies a
    temporary file from the system's temp directory into place, which a full disk truncates.)"""

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options")
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        with atomic_open(path) as f:
            torch.save(checkpoint, f)


class PhaseTimes(Callback):
    """Wall time of a fit by part, seconds: ``train_steps`` (forward, backward and optimiser steps
    of the training batches), ``data`` (waiting for the next training batch: loading it and what
    Lightning does between steps), ``validation`` and ``fit`` (all of ``Trainer.fit``: the rest is
    set-up, checkpoints and logging). ``times``: the dict, filled as training goes."""

    def __init__(self):
        self.times = {"train_steps": 0.0, "data": 0.0, "validation": 0.0, "fit": 0.0}
        self._mark: dict[str, float] = {}

    def _start(self, key: str) -> None:
        self._mark[key] = time.perf_counter()

    def _stop(self, key: str, into: str) -> None:
        if key in self._mark:
            self.times[into] += time.perf_counter() - self._mark.pop(key)

    def on_fit_start(self, trainer, pl_module) -> None:
        self._start("fit")

    def on_fit_end(self, trainer, pl_module) -> None:
        self._stop("fit", "fit")

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._start("data")

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._stop("data", "data")
        self._start("step")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._stop("step", "train_steps")
        self._start("data")

    def on_validation_start(self, trainer, pl_module) -> None:
        self._mark.pop("data", None)
        self._start("validation")

    def on_validation_end(self, trainer, pl_module) -> None:
        self._stop("validation", "validation")


class ProgressFile(Callback):
    """Keeps ``progress.json`` in the run directory current (steps done of the run's total, the
    last training loss; :func:`dad3dlib.progress.write_progress`), at most every ``every_s``
    seconds and at the end of training, for the study's live display. Rank 0 only."""

    def __init__(self, out_dir: Path, every_s: float = 2.0):
        self.out_dir, self.every_s, self._last, self._started, self._start_step = Path(out_dir), every_s, 0.0, 0.0, 0

    def _write(self, trainer: L.Trainer) -> None:
        loss = trainer.callback_metrics.get("train/loss_step", trainer.callback_metrics.get("train/loss"))
        total = trainer.estimated_stepping_batches  # inf when neither max_epochs nor max_steps bounds it
        write_progress(self.out_dir, trainer.global_step, int(total) if math.isfinite(total) else 0,
                       None if loss is None else float(loss), self._started, self._start_step)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._started, self._start_step = time.time(), trainer.global_step  # a resume counts from here
        if trainer.is_global_zero:
            self._write(trainer)

    def on_train_batch_end(self, trainer: L.Trainer, *args) -> None:
        if trainer.is_global_zero and time.time() - self._last >= self.every_s:
            self._last = time.time()
            self._write(trainer)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.is_global_zero:
            self._write(trainer)


def build_trainer(params: dict, out_dir: Path, callbacks=()) -> tuple[L.Trainer, ModelCheckpoint]:
    """Lightning Trainer of the trainer section; returns it and the best-checkpoint callback."""
    t = params["trainer"]
    gpu = _on_gpu(t)
    precision = resolve_precision(t)
    ckpt_dir = out_dir / "checkpoints"
    best = ModelCheckpoint(dirpath=ckpt_dir, filename="best", monitor=MONITOR, mode="min", save_top_k=1,
                           enable_version_counter=False)
    # "last.ckpt" = the top-1 checkpoint by step: written after every validation (and every
    # checkpoint_every_n_steps steps), unlike save_last, which only follows saved top-k files.
    last = ModelCheckpoint(dirpath=ckpt_dir, filename="last", monitor="step", mode="max", save_top_k=1,
                           every_n_train_steps=t["checkpoint_every_n_steps"], enable_version_counter=False)
    cbs = [best, last, LearningRateMonitor("step"), ProgressFile(out_dir), *callbacks]
    if t["progress_bar"]:
        cbs.append(TQDMProgressBar(refresh_rate=max(1, t["log_every_n_steps"])))
    if t["early_stopping_patience"]:
        cbs.append(EarlyStopping(MONITOR, patience=t["early_stopping_patience"], mode="min", check_finite=False))
    trainer = L.Trainer(
        accelerator=t["accelerator"], devices=t["devices"], num_nodes=t["num_nodes"], strategy=t["strategy"],
        precision=precision, min_epochs=t["min_epochs"], max_epochs=t["max_epochs"], max_steps=t["max_steps"], max_time=_max_time(t["max_time"]),
        val_check_interval=t["val_check_interval"], check_val_every_n_epoch=t["check_val_every_n_epoch"],
        limit_val_batches=t["limit_val_batches"], log_every_n_steps=t["log_every_n_steps"],
        gradient_clip_val=t["gradient_clip_val"], deterministic=not gpu or "warn", callbacks=cbs,
        logger=[CSVLogger(out_dir, name="logs", flush_logs_every_n_steps=t["log_every_n_steps"]),
                TensorBoardLogger(out_dir, name=BOARD_DIR, version="", default_hp_metric=False)],
        default_root_dir=out_dir, enable_progress_bar=t["progress_bar"],
        enable_model_summary=False, num_sanity_val_steps=0, plugins=[AtomicCheckpointIO()],
        use_distributed_sampler=False)  # make_loaders' samplers share the data out themselves
    return trainer, best


RESUME_MUST_MATCH = ("model", "loss", "optim")  # sections a resumed run cannot change


def check_resumable(out_dir: Path, params: dict) -> None:
    """Refuse to resume ``out_dir`` with params whose network, losses or optimiser differ from the
    ones it was started with (its ``params.yaml``): the checkpoint would not fit, or would silently
    continue another experiment. Trainer settings (devices, threads, more epochs) may change."""
    try:
        before = with_defaults(load_params(out_dir / "params.yaml"))
    except ParamsError:
        return  # no readable record of the first start: nothing to compare with
    changed = [f"{section}.{k}" for section in RESUME_MUST_MATCH
               for k in sorted(set(before[section]) | set(params[section]))
               if before[section].get(k) != params[section].get(k)]
    if changed:
        raise ParamsError(f"{out_dir}: holds a run started with other params ({', '.join(changed)} differ from "
                          f"{out_dir / 'params.yaml'}); it cannot be resumed with these. Use another output "
                          "directory, or delete this one to start afresh")


def resume_checkpoint(ckpt_dir: Path) -> Path | None:
    """The checkpoint a run resumes from: ``last.ckpt``, else ``best.ckpt`` (an earlier state of
    the same run) when ``last.ckpt`` cannot be read (damaged, or truncated by a full disk under an
    older version); each unreadable one is named on stderr. None when none can be read."""
    bad = []
    for path in (ckpt_dir / "last.ckpt", ckpt_dir / "best.ckpt"):
        if not path.exists():
            continue
        try:
            torch.load(path, map_location="cpu", weights_only=True)
        except LOAD_ERRORS as e:
            first_line = (str(e).strip().splitlines() or [""])[0]
            bad.append(f"{path}: unreadable checkpoint ({type(e).__name__}: {first_line})")
            continue
        for line in bad:
            print(f"{line}; resuming from {path}", file=sys.stderr)
        return path
    for line in bad:
        print(f"{line}; no readable checkpoint left, training starts afresh", file=sys.stderr)
    return None


def train(params: dict, out_dir: str | Path, datasets: dict | None = None, callbacks=()) -> Path:
    """Train (or resume, from :func:`resume_checkpoint`) and return the checkpoint to evaluate
    (:func:`dad3dlib.config.evaluation_checkpoint`: the last step for one-cycle, the lowest validation NME for
    plateau), recorded with the precision used in ``out_dir/training.json``. A resumed run
    continues exactly as the uninterrupted one would have (:class:`ExactResume`). Several
    processes: see the module's docstring; in a Jupyter kernel such a run trains in a child
    process (:func:`train_in_child`).

    ``datasets``: {"train", "val"} to use instead of the data section's (tests, notebooks); else
    those of :func:`dad3dlib.data.split_protocol`, recorded in training.json with their sizes.
    """
    params = with_defaults(params)
    out_dir = Path(out_dir)
    if _in_kernel() and _relaunches_command(params["trainer"]):
        if datasets is not None or callbacks:
            raise ParamsError("params: trainer.strategy 'ddp' starts its processes by running a command; from an "
                              "interactive session it trains from the params alone (no datasets or callbacks)")
        return train_in_child(params, out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    last = out_dir / "checkpoints" / "last.ckpt"
    resume = resume_checkpoint(last.parent)
    if resume:
        check_resumable(out_dir, params)
    save_params(params, out_dir / "params.yaml")
    if params["trainer"]["num_threads"]:
        torch.set_num_threads(int(params["trainer"]["num_threads"]))
    L.seed_everything(params["seed"], workers=True, verbose=False)
    flame = load_flame_assets(flame_dir(params["data"]))
    splits = None if datasets else split_protocol(params["data"])
    datasets = datasets or make_datasets(params, flame, splits)
    module = DADModule(params, flame)
    n_prior = params["model"]["pose_prior_samples"]
    prior = [PosePrior(datasets["train"], n_prior, params["data"]["crop_size"])] if n_prior and not resume else []
    loaders = make_loaders(datasets, params)
    exact, times = ExactResume(loaders["train"].sampler, params["data"]["batch_size"]), PhaseTimes()
    trainer, best = build_trainer(params, out_dir, [exact, times, *prior, *callbacks])
    check_shares({k: len(v) for k, v in datasets.items()}, trainer.world_size, params["data"]["batch_size"])
    if params["trainer"]["num_threads"] and trainer.world_size > 1:  # the other processes' threads
        os.environ["OMP_NUM_THREADS"] = str(int(params["trainer"]["num_threads"]))  # (Lightning's default otherwise)
    trainer.fit(module, loaders["train"], loaders["val"], ckpt_path=resume)
    chosen, why = evaluation_checkpoint(params, out_dir)
    if trainer.is_global_zero:
        record = {"precision": str(trainer.precision), "cpu_native_bf16": cpu_has_native_bf16(),
                  "processes": trainer.world_size, "checkpoint": {"file": str(chosen.relative_to(out_dir)),
                                                                  "step": checkpoint_step(chosen), "why": why},
                  "splits": splits and {**splits, "fit_items": len(datasets["train"]),
                                        "select_items": len(datasets["val"])},
                  "fit_time_s": {k: round(v, 2) for k, v in times.times.items()}}
        write_json(out_dir / TRAINING_RECORD, record)
    return chosen


def _in_kernel() -> bool:
    """Whether this is an interactive session (a Jupyter kernel, a REPL), which Lightning cannot
    run again to start a run's other processes."""
    return hasattr(sys, "ps1") or bool(sys.flags.interactive)


def _relaunches_command(t: dict) -> bool:
    """Whether the trainer section's strategy starts its processes by running the command again
    (Lightning's ``ddp`` family, not its spawn, fork or notebook variants)."""
    s = str(t["strategy"])
    return s.startswith("ddp") and not any(w in s for w in ("spawn", "fork", "notebook"))


def train_in_child(params: dict, out_dir: Path) -> Path:
    """:func:`train` as ``python -m dad3dlib train`` in a child process, whose output is passed on,
    and the checkpoint to evaluate from its training.json. Ctrl-C (which reaches the child too: it
    is in this process group) lets the child stop, with its checkpoints, before raising."""
    tail: deque[str] = deque(maxlen=20)
    with tempfile.TemporaryDirectory() as tmp:
        save_params(params, Path(tmp) / "params.yaml")
        cmd = [sys.executable, "-m", "dad3dlib", "train", "--params", str(Path(tmp) / "params.yaml"),
               "--out", str(out_dir)]
        with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as proc:
            try:
                for line in proc.stdout:
                    print(line, end="", flush=True)
                    tail.append(line)
                proc.wait()
            except KeyboardInterrupt:
                try:
                    proc.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    proc.kill()
                raise
    if proc.returncode:
        raise RuntimeError(f"training in a child process (python -m dad3dlib train --out {out_dir}) failed with exit "
                           f"status {proc.returncode}; its last lines:\n{''.join(tail)}")
    return out_dir / json.loads((out_dir / TRAINING_RECORD).read_text())["checkpoint"]["file"]


def main(argv: list[str] | None = None) -> int:
    from . import OUTPUTS_DIR

    ap = argparse.ArgumentParser(prog="python -m dad3dlib train", description=__doc__.split("\n\n")[0])
    ap.add_argument("--params", required=True, help="params YAML (a complete run's params)")
    ap.add_argument("--out", default=None, help="run directory (default: outputs/runs/<params name>)")
    args = ap.parse_args(argv)
    out = Path(args.out) if args.out else OUTPUTS_DIR / "runs" / Path(args.params).stem
    best = train(load_params(args.params), out)
    rank_zero_only(print)(f"best checkpoint: {best}")  # once, from rank 0 of several processes
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
