"""TensorBoard records of a run: the training curves (written by Lightning's logger while training,
see :func:`dad3dlib.train.build_trainer`) and, once the run is evaluated, its hyperparameters with
its final metrics in TensorBoard's HParams view, so that

    tensorboard --logdir outputs/cpu/runs

compares the ablations and seeds side by side (SCALARS: curves; HPARAMS: λ, seed, ... against the
evaluation metrics). Nothing here imports Lightning.
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


def record_hparams(run_dir: str | Path, params: dict, metrics: dict) -> Path:
    """Register a run's params and its final (evaluation) metrics as one HParams session in the
    run's TensorBoard directory; non-numeric metrics are left out. Returns that directory."""
    from torch.utils.tensorboard import SummaryWriter
    from torch.utils.tensorboard.summary import hparams

    log_dir = Path(run_dir) / BOARD_DIR
    values = {f"{HPARAM_METRIC_PREFIX}{k}": float(v) for k, v in metrics.items()
              if isinstance(v, (int, float)) and not isinstance(v, bool)}
    with SummaryWriter(log_dir=str(log_dir)) as w:
        for summary in hparams(flat_hparams(params), values):
            w.file_writer.add_summary(summary)
        for k, v in values.items():
            w.add_scalar(k, v)
    return log_dir
