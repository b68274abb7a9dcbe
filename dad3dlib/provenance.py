"""A run's ``provenance.json``: what it ran from (git commit, Python, platform, package versions,
params) and its wall time by part (:func:`time_parts`)."""
from __future__ import annotations

import json
import platform
import subprocess
import sys
from pathlib import Path

from . import REPO_ROOT
from .files import write_json
from .plan import Run


PACKAGES = ("torch", "torchvision", "timm", "lightning", "easypytorch3d", "numpy", "papermill", "moderngl")


def provenance(run: Run) -> dict:
    from importlib.metadata import PackageNotFoundError, version

    def pkg(n):
        try:
            return version(n)
        except PackageNotFoundError:
            return None

    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True,
                                timeout=10).stdout.strip() or None
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT,
                                    capture_output=True, text=True, timeout=10).stdout.strip())
    except (OSError, subprocess.SubprocessError):
        commit, dirty = None, None
    return {"run": run.name, "ablation": run.ablation, "aliases": run.aliases, "seed": run.seed,
            "fingerprint": run.fingerprint, "git_commit": commit, "git_dirty": dirty,
            "python": sys.version.split()[0], "platform": platform.platform(),
            "packages": {n: pkg(n) for n in PACKAGES}, "params": run.params}


def time_parts(run_dir: Path, wall_time_s: float) -> dict:
    """A finished run's wall time by part, seconds (``report.TIME_PARTS``): the training steps, waiting
    for training batches and validation (this execution's fit, ``train.PhaseTimes``), the
    evaluation (:func:`dad3dlib.finish.finish_run`), and the rest: kernel start, imports, data and pose-prior
    set-up, checkpoints, logging, plots."""
    from .report import TIME_PARTS

    metrics = json.loads((run_dir / "metrics.json").read_text())
    fit = metrics.get("fit_time_s") or {}
    parts = {k: float(fit.get(k, 0.0)) for k in TIME_PARTS[:3]}
    parts["evaluation"] = float(metrics.get("evaluation_time_s", 0.0))
    parts["rest"] = max(0.0, wall_time_s - sum(parts.values()))
    return {k: round(v, 1) for k, v in parts.items()}


def complete_provenance(run_dir: Path) -> None:
    """A run that finished while its runner was killed: mark it finished, wall time up to its metrics."""
    path = run_dir / "provenance.json"
    try:
        prov = json.loads(path.read_text())
    except (OSError, ValueError):
        return
    if prov.get("status") != "finished" and (run_dir / "metrics.json").exists():
        end = (run_dir / "metrics.json").stat().st_mtime
        prov.update(status="finished", wall_time_s=round(end - prov.get("started_at", end), 1))
        write_json(path, prov)
