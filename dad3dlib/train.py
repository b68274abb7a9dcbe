"""Training DAD-3DNet with Lightning from a params dict (``python -m dad3dlib train``).

    python -m dad3dlib train --params FILE [--out DIR]

Params: plain nested data, sections seed, model, loss, data, optim, trainer, read once into typed
settings (:class:`dad3dlib.settings.Settings`: every key, its default and its check). Every key but
``data.root`` has a default, and a run's ``params.yaml`` is rewritten with all of them filled in.

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
(:class:`dad3dlib.resume.AtomicCheckpointIO`). Running again on the same DIR resumes from ``last.ckpt`` (from
``best.ckpt``, saying so, when ``last.ckpt`` is unreadable), exactly: a run killed and resumed ends
with the same weights as an uninterrupted one on the same machine (:class:`dad3dlib.resume.ExactResume`).

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
import math
import os
import time
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, EarlyStopping, LearningRateMonitor, ModelCheckpoint, TQDMProgressBar
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_only

from .board import BOARD_DIR
from .config import TRAINING_RECORD, evaluation_checkpoint, load_params, save_params
from .errors import ParamsError
from .data import flame_dir, open_split, split_protocol
from .ddp import train_in_child, trains_in_child
from .files import write_json
from .flame import FlameAssets, load_flame_assets
from .lightning_module import MONITOR, DADModule
from .model import checkpoint_step, cpu_has_native_bf16, pose_prior
from .progress import write_progress
from .resume import AtomicCheckpointIO, ExactResume, check_resumable, resume_checkpoint
from .samplers import check_shares, make_loaders
from .settings import DataSettings, Settings, TrainerSettings


def make_datasets(d: DataSettings, flame: FlameAssets | None = None,
                  splits: dict | None = None) -> dict[str, torch.utils.data.Dataset]:
    """{"train", "val"}: the fit and the model-selection datasets of the data section's split
    protocol (``splits``, default :func:`dad3dlib.data.split_protocol`)."""
    splits = splits or split_protocol(d)
    flame = flame or load_flame_assets(flame_dir(d))
    return {"train": open_split(d, splits["fit"], flame, train=True), "val": open_split(d, splits["select"], flame)}


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
        pl_module.model.set_pose_prior(self.prior)
        if trainer.is_global_zero:
            print(f"pose prior from data: {self.prior}")


def _max_time(value) -> datetime.timedelta | str | None:
    if value is None or isinstance(value, str):
        return value
    return datetime.timedelta(seconds=float(value))


def _on_gpu(t: TrainerSettings) -> bool:
    return t.accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available()


def resolve_precision(t: TrainerSettings) -> str:
    """``trainer.precision``; ``auto``: bf16-mixed on a GPU and on a CPU with native bfloat16, else
    32-true. The network runs in the chosen precision; FLAME and the losses always in fp32."""
    if t.precision != "auto":
        return str(t.precision)
    return "bf16-mixed" if _on_gpu(t) or cpu_has_native_bf16() else "32-true"


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


class LastStep(ModelCheckpoint):
    """``last.ckpt``: the top-1 checkpoint by step, written after every validation (and every
    ``checkpoint_every_n_steps`` steps), unlike ``save_last``, which only follows saved top-k files;
    and at the end of training when the last step came after the last validation (a run whose
    epochs are not a multiple of ``check_val_every_n_epoch``, or stopped by ``max_time``), so that
    the one-cycle result, the last step, is always the one evaluated."""

    def __init__(self, dirpath: Path, every_n_train_steps: int | None):
        super().__init__(dirpath=dirpath, filename="last", monitor="step", mode="max", save_top_k=1,
                         every_n_train_steps=every_n_train_steps, enable_version_counter=False)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        saved = self.best_model_score  # the step of last.ckpt, None before the first
        if trainer.global_step and (saved is None or int(saved) < trainer.global_step):
            trainer.save_checkpoint(Path(self.dirpath) / "last.ckpt", weights_only=self.save_weights_only)


def build_trainer(t: TrainerSettings, out_dir: Path, callbacks=()) -> tuple[L.Trainer, ModelCheckpoint]:
    """Lightning Trainer of the trainer section; returns it and the best-checkpoint callback."""
    gpu = _on_gpu(t)
    precision = resolve_precision(t)
    ckpt_dir = out_dir / "checkpoints"
    best = ModelCheckpoint(dirpath=ckpt_dir, filename="best", monitor=MONITOR, mode="min", save_top_k=1,
                           enable_version_counter=False)
    last = LastStep(ckpt_dir, t.checkpoint_every_n_steps)
    cbs = [best, last, LearningRateMonitor("step"), ProgressFile(out_dir), *callbacks]
    if t.progress_bar:
        cbs.append(TQDMProgressBar(refresh_rate=max(1, t.log_every_n_steps)))
    if t.early_stopping_patience:
        cbs.append(EarlyStopping(MONITOR, patience=t.early_stopping_patience, mode="min", check_finite=False))
    trainer = L.Trainer(
        accelerator=t.accelerator, devices=t.devices, num_nodes=t.num_nodes, strategy=t.strategy,
        precision=precision, min_epochs=t.min_epochs, max_epochs=t.max_epochs, max_steps=t.max_steps, max_time=_max_time(t.max_time),
        val_check_interval=t.val_check_interval, check_val_every_n_epoch=t.check_val_every_n_epoch,
        limit_val_batches=t.limit_val_batches, log_every_n_steps=t.log_every_n_steps,
        gradient_clip_val=t.gradient_clip_val, deterministic=not gpu or "warn", callbacks=cbs,
        logger=[CSVLogger(out_dir, name="logs", flush_logs_every_n_steps=t.log_every_n_steps),
                TensorBoardLogger(out_dir, name=BOARD_DIR, version="", default_hp_metric=False)],
        default_root_dir=out_dir, enable_progress_bar=t.progress_bar,
        enable_model_summary=False, num_sanity_val_steps=0, plugins=[AtomicCheckpointIO()],
        use_distributed_sampler=False)  # make_loaders' samplers share the data out themselves
    return trainer, best


def train(params: dict, out_dir: str | Path, datasets: dict | None = None, callbacks=()) -> Path:
    """Train (or resume, from :func:`dad3dlib.resume.resume_checkpoint`) and return the checkpoint to evaluate
    (:func:`dad3dlib.config.evaluation_checkpoint`: the last step for one-cycle, the lowest validation NME for
    plateau), recorded with the precision used in ``out_dir/training.json``. A resumed run
    continues exactly as the uninterrupted one would have (:class:`dad3dlib.resume.ExactResume`). Several
    processes: see the module's docstring; in a Jupyter kernel such a run trains in a child
    process (:func:`dad3dlib.ddp.train_in_child`).

    ``datasets``: {"train", "val"} to use instead of the data section's (tests, notebooks); else
    those of :func:`dad3dlib.data.split_protocol`, recorded in training.json with their sizes.
    """
    settings = Settings.parse(params)
    out_dir = Path(out_dir)
    if trains_in_child(settings.trainer):
        if datasets is not None or callbacks:
            raise ParamsError("params: trainer.strategy 'ddp' starts its processes by running a command; from an "
                              "interactive session it trains from the params alone (no datasets or callbacks)")
        return train_in_child(settings.to_dict(), out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    last = out_dir / "checkpoints" / "last.ckpt"
    resume = resume_checkpoint(last.parent)
    if resume:
        check_resumable(out_dir, settings)
    save_params(settings.to_dict(), out_dir / "params.yaml")
    d, t = settings.data, settings.trainer
    if t.num_threads:
        torch.set_num_threads(int(t.num_threads))
    L.seed_everything(settings.seed, workers=True, verbose=False)
    flame = load_flame_assets(flame_dir(d))
    splits = None if datasets else split_protocol(d)
    datasets = datasets or make_datasets(d, flame, splits)
    module = DADModule(settings, flame)
    n_prior = settings.model.pose_prior_samples
    prior = [PosePrior(datasets["train"], n_prior, d.crop_size)] if n_prior and not resume else []
    loaders = make_loaders(datasets, d, settings.seed)
    exact, times = ExactResume(loaders["train"].sampler, d.batch_size), PhaseTimes()
    trainer, best = build_trainer(t, out_dir, [exact, times, *prior, *callbacks])
    check_shares({k: len(v) for k, v in datasets.items()}, trainer.world_size, d.batch_size)
    if t.num_threads and trainer.world_size > 1:  # the other processes' threads
        os.environ["OMP_NUM_THREADS"] = str(int(t.num_threads))  # (Lightning's default otherwise)
    trainer.fit(module, loaders["train"], loaders["val"], ckpt_path=resume)
    chosen, why = evaluation_checkpoint(settings.optim.schedule, out_dir)
    if trainer.is_global_zero:
        record = {"precision": str(trainer.precision), "cpu_native_bf16": cpu_has_native_bf16(),
                  "processes": trainer.world_size, "checkpoint": {"file": str(chosen.relative_to(out_dir)),
                                                                  "step": checkpoint_step(chosen), "why": why},
                  "splits": splits and {**splits, "fit_items": len(datasets["train"]),
                                        "select_items": len(datasets["val"])},
                  "fit_time_s": {k: round(v, 2) for k, v in times.times.items()}}
        write_json(out_dir / TRAINING_RECORD, record)
    return chosen


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
