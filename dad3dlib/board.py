"""TensorBoard records of a run: the training curves (written by Lightning's logger while training,
see :func:`dad3dlib.train.build_trainer`) and, once the run is evaluated, its hyperparameters with
its final metrics in TensorBoard's HParams view, so that

    tensorboard --logdir outputs/cpu/runs

compares the ablations and seeds side by side (SCALARS: curves, and each evaluation metric as one
point at the run's final training step; HPARAMS: λ, seed, ... against the evaluation metrics).
Nothing here imports Lightning.
"""
from __future__ import annotations

from pathlib import Path

BOARD_DIR = "tensorboard"  # a run's event files, beside its CSV logs
HPARAM_METRIC_PREFIX = "eval/"  # final metrics; distinct from the curves' train/ and val/ tags


def flat_hparams(params: dict, prefix: str = "") -> dict[str, bool | int | float | str]:
    """Nested params → {"loss.lambdas.l3d": 50.0, ...}; values TensorBoard can hold (None and lists
    become strings)."""
    flat = {}
    for k, v in params.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            flat.update(flat_hparams(v, f"{key}."))
        elif isinstance(v, (bool, int, float, str)):
            flat[key] = v
        else:
            flat[key] = str(v)
    return flat


def last_step(log_dir: str | Path) -> int:
    """The highest step of any event in a TensorBoard directory (a run's final training step once
    it has trained); 0 when it holds no event."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    return max((event.step for f in sorted(Path(log_dir).glob("events.out.tfevents.*"))
                for event in EventFileLoader(str(f)).Load()), default=0)


def record_hparams(run_dir: str | Path, params: dict, metrics: dict) -> Path:
    """Register a run's params and its final (evaluation) metrics as one HParams session in the
    run's TensorBoard directory, and each metric as a scalar at the run's final training step
    (:func:`last_step`: beside the end of the training curves, not at step 0, where TensorBoard
    would draw an empty chart); non-numeric metrics are left out. Returns that directory."""
    from torch.utils.tensorboard import SummaryWriter
    from torch.utils.tensorboard.summary import hparams

    log_dir = Path(run_dir) / BOARD_DIR
    values = {f"{HPARAM_METRIC_PREFIX}{k}": float(v) for k, v in metrics.items()
              if isinstance(v, (int, float)) and not isinstance(v, bool)}
    step = last_step(log_dir)
    with SummaryWriter(log_dir=str(log_dir)) as w:
        for summary in hparams(flat_hparams(params), values):
            w.file_writer.add_summary(summary)
        for k, v in values.items():
            w.add_scalar(k, v, global_step=step)
    return log_dir
