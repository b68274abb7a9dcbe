"""The end of a run: its evaluation (:func:`finish_run`) and ``metrics.json``, written last, which
marks the run finished when it was produced from the same params (:func:`is_finished`)."""
from __future__ import annotations

import json
import time
from pathlib import Path

from .config import TRAINING_RECORD, training_fingerprint
from .files import write_json
from .plan import Run


def is_finished(run_dir: Path, run: Run) -> bool:
    try:
        metrics = json.loads((run_dir / "metrics.json").read_text())
    except (OSError, ValueError):
        return False
    return metrics.get("fingerprint") == run.fingerprint


def write_run_metrics(run_dir: str | Path, metrics: dict, params: dict) -> Path:
    """A run's ``metrics.json`` (atomic), stamped with the fingerprint of the params it came from,
    the precision it trained in and the checkpoint it was evaluated on (step, why; from the run's
    training.json). The params and metrics are also registered in the run's TensorBoard HParams
    view (:func:`dad3dlib.board.record_hparams`)."""
    from .board import record_hparams

    path = Path(run_dir) / "metrics.json"
    try:
        training = json.loads((Path(run_dir) / TRAINING_RECORD).read_text())
    except (OSError, ValueError):
        training = {}
    record_hparams(run_dir, params, metrics)
    write_json(path, {**metrics, **training, "ablation": params["ablation"], "seed": params["seed"],
                      "fingerprint": training_fingerprint(params)})
    return path


def finish_run(params: dict, checkpoint: str | Path, run_dir: str | Path, device: str = "auto") -> dict:
    """The end of a run: evaluate ``checkpoint`` on the evaluation split of the data's split protocol
    (:func:`dad3dlib.data.split_protocol`); when the protocol has a split to submit (the unlabelled
    test split), write its benchmark submission (``submission_<split>.json``, ``predict``'s format);
    then ``metrics.json``, last, since it marks the run finished. Returns the metrics."""
    from .config import data_root
    from .data import split_protocol
    from .evaluate import evaluate_run, predict
    from .settings import DataSettings

    data = DataSettings.parse(params.get("data"))
    splits, run_dir, start = split_protocol(data), Path(run_dir), time.perf_counter()
    metrics = evaluate_run(params, checkpoint, run_dir, splits["evaluate"], device)
    if splits["submit"]:
        metrics["submission"] = f"submission_{splits['submit']}.json"
        predict(checkpoint, data_root(data.root), splits["submit"], run_dir / metrics["submission"],
                device=device)
    metrics["evaluation_time_s"] = round(time.perf_counter() - start, 2)
    write_run_metrics(run_dir, metrics, params)
    return metrics
