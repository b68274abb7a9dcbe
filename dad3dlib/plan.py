"""A study's plan: one :class:`Run` per distinct (training params, seed) of preset × ablations × seeds
(identical ablations become aliases), the study's settings (``study.seeds``, ``study.jobs``,
``study.cell_timeout_s``), and the run directories trained with other params, which start afresh."""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

from .config import available, run_params, training_fingerprint
from .devices import processes
from .errors import ParamsError
from .settings import StudySettings, TrainerSettings


@dataclass
class Run:
    name: str                      # directory name: <ablation>_s<seed>
    ablation: str
    seed: int
    params: dict
    aliases: list[str] = field(default_factory=list)  # other ablations with identical params

    @property
    def fingerprint(self) -> str:
        return training_fingerprint(self.params)


def plan_runs(preset: str, ablations: list[str], seeds: list[int], overrides: dict | None = None) -> list[Run]:
    """One Run per distinct (training params, seed); identical ablations become aliases."""
    runs: dict[tuple[str, int], Run] = {}
    for seed in seeds:
        for abl in ablations:
            params = run_params(preset, abl, seed, overrides)
            key = (training_fingerprint(params), seed)
            if key in runs:
                runs[key].aliases.append(params["ablation"])
            else:
                runs[key] = Run(f"{params['ablation']}_s{seed}", params["ablation"], seed, params)
    return list(runs.values())


def default_ablations() -> list[str]:
    names = available("ablations")
    return ["baseline"] + [n for n in names if n != "baseline"]


def recorded_fingerprint(run_dir: Path) -> str | None:
    """The training fingerprint a run directory was started with (provenance.json, else metrics.json)."""
    for name in ("provenance.json", "metrics.json"):
        try:
            return json.loads((run_dir / name).read_text())["fingerprint"]
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return None


def retire_stale(run_dir: Path, run: Run) -> Path | None:
    """Move a run directory that was trained with other params (the preset or ablation changed
    since) to ``<run>.stale-<old fingerprint>[-k]`` so that the run starts afresh instead of
    resuming an incompatible checkpoint; nothing is deleted. Returns the new path, if moved."""
    old = recorded_fingerprint(run_dir)
    if old is None or old == run.fingerprint:
        return None
    target, k = run_dir.with_name(f"{run.name}.stale-{old}"), 1
    while target.exists():
        k += 1
        target = run_dir.with_name(f"{run.name}.stale-{old}-{k}")
    run_dir.rename(target)
    print(f"{run_dir}: trained with other params (fingerprint {old}, now {run.fingerprint}); "
          f"moved to {target.name}, starting afresh", file=sys.stderr)
    return target


def study_setting(params: dict, key: str, given: int | None = None) -> int:
    """A study setting (``jobs``, ``seeds``: :class:`dad3dlib.settings.StudySettings`): ``given`` (the
    command line) when set, else the preset's ``study.<key>``, else its default."""
    study = {**(params.get("study") or {}), **({key: given} if given is not None else {})}
    return getattr(StudySettings.parse(study, f"--{key} or the preset"), key)


def cell_timeout(params: dict) -> int | None:
    """The longest one notebook cell may run, in seconds (the preset's ``study.cell_timeout_s``;
    unset or null: no limit). A cell still running then fails its notebook (the run's
    ``error.json``, or the report) and its kernel is stopped, so that a hung kernel cannot hang the
    study."""
    return StudySettings.parse(params.get("study")).cell_timeout_s


def study_jobs(params: dict, jobs: int | None = None, launcher: str = "local") -> int:
    """Concurrent runs: ``jobs`` when given, else the preset's ``study.jobs``, else 1. Runs over
    several processes (``trainer.devices``/``num_nodes``) share out this machine already: here
    (``launcher`` local) they run one at a time, and more is refused."""
    jobs = study_setting(params, "jobs", jobs)
    local, nodes = processes(TrainerSettings.parse(params.get("trainer")))
    if jobs > 1 and local * nodes > 1 and launcher == "local":
        raise ParamsError(f"jobs {jobs}: each run of this preset trains over {local * nodes} processes "
                          "(trainer.devices, num_nodes), which use this machine's devices and ports: run them "
                          "one at a time (--jobs 1), or as cluster jobs (--launcher slurm)")
    return jobs
