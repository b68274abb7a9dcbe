"""Where a study's runs execute: here (``local``: threads of the runner, each executing a run's
notebook, :func:`dad3dlib.study.execute_runs`) or as jobs through submitit: ``slurm`` submits one
job array (one task per run) to a SLURM cluster, ``submitit-local`` runs the same pickled jobs as
separate processes on this machine (what the tests use; handy on a workstation too).

Settings come from the preset's ``launcher:`` section, overridden by the command line::

    launcher: {name: slurm, partition: gpu, gpus_per_run: 1, cpus_per_run: 8, time_min: 720,
               mem_gb: 64, account: null, qos: null, constraint: null, array_parallelism: 32}

Either way a job executes :func:`dad3dlib.study.execute_run` (which never raises: a failed run
writes its ``error.json``); a job that dies outside it (killed at its time limit, out of memory) is
recorded the same way by the runner. Finished runs are skipped, so the same command after an
interruption resubmits only what is left; Ctrl-C cancels the submitted jobs that have not ended.
"""
from __future__ import annotations

import os
import time
import traceback
from pathlib import Path

from .config import ParamsError
from .files import write_record

DEFAULTS = {"name": "local", "partition": None, "gpus_per_run": 1, "cpus_per_run": None, "time_min": 720,
            "mem_gb": None, "account": None, "qos": None, "constraint": None, "array_parallelism": 32}
CLUSTERS = {"local": None, "submitit-local": "local", "slurm": "slurm"}  # name -> submitit cluster


def launcher_settings(params: dict, overrides: dict | None = None) -> dict:
    """The preset's ``launcher`` section over :data:`DEFAULTS`, then ``overrides`` (the command
    line; None values ignored). Unknown keys and names are refused."""
    section = params.get("launcher") or {}
    given = {k: v for k, v in (overrides or {}).items() if v is not None}
    unknown = sorted(set(section) - set(DEFAULTS)) + sorted(set(given) - set(DEFAULTS))
    if unknown:
        raise ParamsError(f"launcher: unknown setting(s) {', '.join(unknown)}; known: {', '.join(DEFAULTS)}")
    settings = {**DEFAULTS, **section, **given}
    if settings["name"] not in CLUSTERS:
        raise ParamsError(f"launcher: unknown name {settings['name']!r}; one of {', '.join(CLUSTERS)}")
    return settings


def make_executor(settings: dict, folder: Path, job_name: str):
    """A submitit executor for ``settings`` whose logs and pickles live in ``folder`` (``<job id>_<task>_log.out``/``.err``)."""
    import submitit

    executor = submitit.AutoExecutor(folder=folder, cluster=CLUSTERS[settings["name"]])
    gpus = settings["gpus_per_run"] if settings["name"] == "slurm" else 0
    common = {"timeout_min": settings["time_min"], "name": job_name, "nodes": 1, "tasks_per_node": 1,
              "gpus_per_node": gpus}
    if settings["cpus_per_run"]:
        common["cpus_per_task"] = settings["cpus_per_run"]
    if settings["mem_gb"]:
        common["mem_gb"] = settings["mem_gb"]
    slurm = {f"slurm_{k}": settings[k] for k in ("partition", "account", "qos", "constraint") if settings[k]}
    slurm["slurm_array_parallelism"] = settings["array_parallelism"]
    executor.update_parameters(**common, **(slurm if settings["name"] == "slurm" else {}))
    return executor


def run_job(execute, run, study_dir: Path, threads: int | None) -> dict:
    """One job: ``execute(run, study_dir, device, threads)`` (the runner's
    :func:`dad3dlib.study.execute_run`) where the job landed: on its GPU if it has one; with
    several, the run's ``trainer`` section decides (``devices``, ``strategy: ddp``); else on its CPUs."""
    import torch

    gpus = torch.cuda.device_count()
    device = "cuda" if gpus == 1 else "auto" if gpus > 1 else "cpu"
    if gpus > 1:  # one task with several GPUs: Lightning must start the run's processes itself, which
        # it does under SLURM only in "interactive" mode (otherwise it expects one srun task per GPU)
        os.environ["SLURM_JOB_NAME"] = "interactive"
    threads = threads or (len(os.sched_getaffinity(0)) if device == "cpu" else None)
    return execute(run, study_dir, device, threads)


def job_failure(run, job, study_dir: Path) -> dict:
    """The result of a job that died outside :func:`run_job` (time limit, memory, node failure):
    recorded in the run's ``error.json`` like a failed notebook, with the job's log files named."""
    try:
        exc = job.exception()
    except Exception as e:  # the job's result cannot even be read
        exc = e
    message = f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1] if str(exc).strip() else ''}"
    error = {"error": f"job {job.job_id} failed: {message}", "job_id": str(job.job_id),
             "stdout": str(job.paths.stdout), "stderr": str(job.paths.stderr),
             "traceback": traceback.format_exception(exc)[-20:] if isinstance(exc, BaseException) else []}
    write_record(study_dir / "runs" / run.name / "error.json", error)
    return {"run": run.name, "status": "failed", "error": error["error"]}


def execute_runs_submitit(execute, todo: list, out: Path, settings: dict, stop, on_result=lambda r: None,
                          on_tick=lambda active: None, poll_s: float = 2.0) -> list[dict]:
    """Submit ``todo`` as one job array of :func:`run_job` with ``execute`` (a module-level function,
    pickled by name) and wait for it, like :func:`dad3dlib.study.execute_runs` (same results, same
    callbacks). ``stop`` set (Ctrl-C): the jobs not yet ended are cancelled and reported as interrupted."""
    if not todo:
        return []
    executor = make_executor(settings, out / "jobs", f"dad3d-{todo[0].params.get('preset', 'study')}")
    threads = settings["cpus_per_run"]
    jobs = executor.map_array(run_job, [execute] * len(todo), todo, [out] * len(todo), [threads] * len(todo))
    print(f"submitted {len(jobs)} job(s) ({settings['name']}): {', '.join(str(j.job_id) for j in jobs)}; "
          f"logs in {out / 'jobs'}", flush=True)
    pending, results = dict(zip(jobs, todo)), []
    while pending:
        if stop.is_set():
            for job, run in pending.items():
                job.cancel(check=False)
                results.append({"run": run.name, "status": "interrupted", "error": None})
                on_result(results[-1])
            break
        on_tick({run.name: out / "runs" / run.name for job, run in pending.items()})
        for job in [j for j in pending if j.done()]:
            run = pending.pop(job)
            try:
                result = job.result()
            except Exception:  # the job failed, however: recorded as a failed run, the others go on
                result = job_failure(run, job, out)
            results.append(result)
            on_result(result)
        time.sleep(poll_s)
    return results
