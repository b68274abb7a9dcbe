"""A run's checkpoints, and resuming from them exactly.

Checkpoints are written atomically (:class:`AtomicCheckpointIO`); a run resumes from
:func:`resume_checkpoint` (``last.ckpt``, else ``best.ckpt``) once :func:`check_resumable` finds
its params compatible; :class:`ExactResume` saves and restores what else decides the rest of the
run (the global RNG states, :func:`rng_states`, and the train sampler's generator and position), so
that a run killed and resumed ends with the same weights as an uninterrupted one on the same
machine.
"""
from __future__ import annotations

import random
import sys
from pathlib import Path

import lightning as L
import numpy as np
import torch
from lightning.pytorch.plugins import TorchCheckpointIO

from .config import load_params
from .errors import ParamsError
from .settings import Settings
from .files import LOAD_ERRORS, atomic_open
from .samplers import EpochSampler

RESUME_MUST_MATCH = ("model", "loss", "optim")  # sections a resumed run cannot change


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


def check_resumable(out_dir: Path, settings: Settings) -> None:
    """Refuse to resume ``out_dir`` with params whose network, losses or optimiser differ from the
    ones it was started with (its ``params.yaml``): the checkpoint would not fit, or would silently
    continue another experiment. Trainer settings (devices, threads, more epochs) may change."""
    try:
        before = Settings.parse(load_params(out_dir / "params.yaml"))
    except ParamsError:
        return  # no readable record of the first start: nothing to compare with
    changed = [f"{section}.{k}" for section in RESUME_MUST_MATCH
               for k, v in getattr(settings, section).to_dict().items() if getattr(getattr(before, section), k) != v]
    if changed:
        raise ParamsError(f"{out_dir}: holds a run started with other params ({', '.join(changed)} differ from "
                          f"{out_dir / 'params.yaml'}); it cannot be resumed with these. Use another output "
                          "directory, or delete this one to start afresh")


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
