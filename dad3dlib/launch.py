"""Where a study's runs execute: here (``local``: threads of the runner, each executing a run's
notebook, :func:`dad3dlib.study.execute_runs`) or as jobs through submitit: ``slurm`` submits one
job array (one task per run) to a SLURM cluster, ``submitit-local`` runs the same pickled jobs as
separate processes on this machine (handy on a workstation too).

Settings come from the preset's ``launcher:`` section, overridden by the command line::

    launcher: {name: slurm, partition: gpu, gpus_per_run: 1, cpus_per_run: 8, time_min: 720,
               mem_gb: 64, account: null, qos: null, constraint: null, array_parallelism: 32}

``gpus_per_run`` unset: 1 when the partition has GPUs (``sinfo``), else none; GPUs asked of a
partition without any are refused in one line. Either way a job executes
:func:`dad3dlib.study.execute_run` (which never raises: a failed run writes its ``error.json``).
submitit signals a job ``signal_delay_s`` (:func:`signal_delay_s`) before its time limit: the job
stops its notebook then, keeping the checkpoints written so far, and records the time limit. A job
that ends otherwise without finishing its run (cancelled, out of memory, node failure, time limit)
is recorded the same way by the runner, with what the scheduler says happened
(:class:`SlurmQueue`: ``squeue``, so that no accounting database is needed) and the job's log files
named; a job that leaves the queue without a result fails its run after a bounded wait instead of
hanging the study. Finished runs are skipped, so the same command after an interruption or failure
resubmits only what is left; Ctrl-C cancels the submitted jobs that have not ended.
"""
from __future__ import annotations

import logging
import os
import signal
import subprocess
import time
import traceback
from pathlib import Path

from .errors import InputValueError, ParamsError
from .files import write_record

LAUNCHER_DEFAULTS = {"name": "local", "partition": None, "gpus_per_run": None, "cpus_per_run": None, "time_min": 720,
                     "mem_gb": None, "account": None, "qos": None, "constraint": None, "array_parallelism": 32}
CLUSTERS = {"local": None, "submitit-local": "local", "slurm": "slurm"}  # name -> submitit cluster
SIGNAL_DELAY_S = 90  # submitit's default: its signal comes this long before a job's time limit


class ClusterError(InputValueError):
    """The cluster cannot be asked, or refused what was asked (one line naming the setting)."""


def launcher_settings(params: dict, overrides: dict | None = None) -> dict:
    """The preset's ``launcher`` section over :data:`LAUNCHER_DEFAULTS`, then ``overrides`` (the command
    line; None values ignored). Unknown keys and names, and a time limit under a minute, are refused."""
    section = params.get("launcher") or {}
    given = {k: v for k, v in (overrides or {}).items() if v is not None}
    unknown = sorted(set(section) - set(LAUNCHER_DEFAULTS)) + sorted(set(given) - set(LAUNCHER_DEFAULTS))
    if unknown:
        raise ParamsError(f"launcher: unknown setting(s) {', '.join(unknown)}; known: {', '.join(LAUNCHER_DEFAULTS)}")
    settings = {**LAUNCHER_DEFAULTS, **section, **given}
    if settings["name"] not in CLUSTERS:
        raise ParamsError(f"launcher: unknown name {settings['name']!r}; one of {', '.join(CLUSTERS)}")
    time_min = settings["time_min"]
    if not isinstance(time_min, int) or isinstance(time_min, bool) or time_min < 1:
        raise ParamsError(f"launcher time_min (--time) must be a whole number of minutes >= 1, got {time_min!r}")
    return settings


def signal_delay_s(time_min: int) -> int:
    """How long before its time limit a job is signalled to stop: submitit's 90 s, or a quarter of
    a limit shorter than 6 minutes (with 90 s, a job of 1 minute would be stopped as it starts)."""
    return min(SIGNAL_DELAY_S, time_min * 60 // 4)


def slurm_command(*args: str, timeout: float = 60) -> str:
    """The output of a SLURM command (``sinfo``, ``squeue``); ClusterError in one line when it
    cannot run or fails (what it printed last)."""
    try:
        res = subprocess.run(args, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise ClusterError(f"{args[0]}: cannot ask SLURM ({e})") from e
    if res.returncode:
        said = (res.stderr.strip() or res.stdout.strip() or f"exit status {res.returncode}").splitlines()[-1]
        raise ClusterError(f"{' '.join(args[:1])} failed: {said}")
    return res.stdout


def partition_gpus(partition: str | None, sinfo=slurm_command) -> tuple[str, bool]:
    """(name, whether it has nodes with a ``gpu`` generic resource) of ``partition`` (None: the
    cluster's default, ``*`` in sinfo). An unknown partition is refused in one line listing the known ones."""
    rows = [line.split("|", 1) for line in sinfo("sinfo", "-h", "-o", "%P|%G").splitlines() if "|" in line]
    names = sorted({name.rstrip("*") for name, _ in rows})
    mine = [(name.rstrip("*"), gres) for name, gres in rows
            if (name.rstrip("*") == partition if partition else name.endswith("*"))]
    if not mine:
        raise ClusterError(f"--partition {partition}: no such partition (sinfo lists {', '.join(names) or 'none'})"
                           if partition else "no default SLURM partition (sinfo marks none with *); set --partition")
    return mine[0][0], any(g.strip().startswith("gpu") for _, gres in mine for g in gres.split(","))


def settle_gpus(settings: dict, sinfo=slurm_command) -> dict:
    """``settings`` with ``gpus_per_run`` decided for a SLURM partition: unset, 1 when the partition has
    GPUs, else 0 (said in one line); GPUs asked of a partition without any: ClusterError."""
    if settings["name"] != "slurm":
        return {**settings, "gpus_per_run": 0}
    gpus = settings["gpus_per_run"]
    name, has = partition_gpus(settings["partition"], sinfo)
    where = f"partition {name}"
    if gpus is None:
        if not has:
            print(f"{where} has no GPUs: each job runs on CPUs (--gpus-per-run 0)", flush=True)
        return {**settings, "gpus_per_run": 1 if has else 0}
    if gpus > 0 and not has:
        raise ClusterError(f"--gpus-per-run {gpus}: {where} has no GPUs (sinfo lists no gpu resource); "
                           "set --gpus-per-run 0, or --partition with GPUs")
    return settings


def make_executor(settings: dict, folder: Path, job_name: str):
    """A submitit executor for ``settings`` (``gpus_per_run`` decided, :func:`settle_gpus`) whose logs
    and pickles live in ``folder`` (``<job id>_<task>_log.out``/``.err``)."""
    import submitit

    executor = submitit.AutoExecutor(folder=folder, cluster=CLUSTERS[settings["name"]])
    slurm = settings["name"] == "slurm"
    common = {"timeout_min": settings["time_min"], "name": job_name, "nodes": 1, "tasks_per_node": 1}
    if slurm and settings["gpus_per_run"]:
        common["gpus_per_node"] = settings["gpus_per_run"]
    if settings["cpus_per_run"]:
        common["cpus_per_task"] = settings["cpus_per_run"]
    if settings["mem_gb"]:
        common["mem_gb"] = settings["mem_gb"]
    specific = {f"slurm_{k}": settings[k] for k in ("partition", "account", "qos", "constraint") if settings[k]}
    specific.update(slurm_array_parallelism=settings["array_parallelism"],
                    slurm_signal_delay_s=signal_delay_s(settings["time_min"]))  # submitit-local: 30 s
    executor.update_parameters(**common, **(specific if slurm else {}))
    return executor


def run_job(execute, run, study_dir: Path, threads: int | None, time_min: int | None = None) -> dict:
    """One job: ``execute(run, study_dir, device, threads, stop)`` (the runner's
    :func:`dad3dlib.study.execute_run`) where the job landed: on its GPU if it has one; with
    several, the run's ``trainer`` section decides (``devices``, ``strategy: ddp``); else on the CPUs
    SLURM gave it. submitit's signal before the time limit (``time_min``) stops the notebook like
    Ctrl-C, its checkpoints kept, and the run is recorded as failed at its time limit."""
    import torch

    from .kernels import Interrupt

    gpus = torch.cuda.device_count()
    device = "cuda" if gpus == 1 else "auto" if gpus > 1 else "cpu"
    if gpus > 1:  # one task with several GPUs: Lightning must start the run's processes itself, which
        # it does under SLURM only in "interactive" mode (otherwise it expects one srun task per GPU)
        os.environ["SLURM_JOB_NAME"] = "interactive"
    if device == "cpu" and not threads:  # without task affinity (task/none) the job sees every core
        threads = int(os.environ.get("SLURM_CPUS_PER_TASK") or os.environ.get("SLURM_CPUS_ON_NODE") or 0) \
            or len(os.sched_getaffinity(0))
    stop = Interrupt()
    usr2 = signal.signal(signal.SIGUSR2, lambda signum, frame: stop.set())  # replaces submitit's requeue
    try:
        result = execute(run, study_dir, device, threads, stop)
    finally:
        signal.signal(signal.SIGUSR2, usr2)
    if result["status"] != "interrupted":
        return result
    limit = f" (--time {time_min} min)" if time_min else ""
    message = (f"the job reached its time limit{limit}: its notebook was stopped shortly before, the "
               "checkpoints written so far kept; the same study command resumes the run")
    write_record(study_dir / "runs" / run.name / "error.json", {"error": message, "cause": "time limit"})
    return {**result, "status": "failed", "error": message}


# What SLURM's job states mean for a run that did not finish (squeue's %T).
ENDED = {"CANCELLED": "was cancelled (scancel, or an administrator)", "TIMEOUT": "reached its time limit{time}",
         "OUT_OF_MEMORY": "ran out of memory{mem}", "NODE_FAIL": "lost its node (node failure)",
         "FAILED": "failed (its process exited with an error)", "PREEMPTED": "was preempted",
         "BOOT_FAIL": "could not start (its node failed to boot)", "DEADLINE": "passed its deadline",
         "COMPLETED": "ended without a result", "SPECIAL_EXIT": "was held (special exit)"}
GONE_PENDING = "was cancelled before it started (it left the queue without running)"
GONE = "left the queue without a result (SLURM no longer lists it, and has no accounting to ask)"
BY_SCHEDULER = set(ENDED) - {"COMPLETED", "FAILED"}  # ended by SLURM, whatever the run said


class SlurmQueue:
    """What SLURM says about submitted jobs (``squeue``, which also lists ended jobs for a few
    minutes, ``MinJobAge``; no accounting database needed). :meth:`poll` asks once for all;
    :meth:`outcome` says what ended a job."""

    def __init__(self, settings: dict, grace_s: float = 30.0, squeue=slurm_command, clock=time.monotonic):
        self.settings, self.grace_s, self.squeue, self.clock = settings, grace_s, squeue, clock
        self.states: dict[str, str] = {}    # this poll's
        self.last: dict[str, str] = {}      # each job's last state seen
        self.ended_at: dict[str, float] = {}
        self.error: str | None = None

    def poll(self, job_ids: list[str]) -> None:
        arrays = sorted({j.split("_")[0] for j in job_ids})
        try:
            out = self.squeue("squeue", "-h", "-r", "-t", "all", "-j", ",".join(arrays), "-o", "%i|%T")
        except ClusterError as e:
            if "Invalid job id" not in str(e):  # the controller is unreachable: nothing is decided
                if self.error is None:
                    print(f"warning: {e}; still waiting for the jobs", flush=True)
                self.error, self.states = str(e), {}
                return
            out = ""  # every job asked of has left the queue
        self.error, now = None, self.clock()
        self.states = dict(line.strip().split("|", 1) for line in out.splitlines() if "|" in line)
        for job_id in job_ids:  # when each job was first seen ended, or not listed
            if job_id not in self.states or self.states[job_id] in ENDED:
                self.ended_at.setdefault(job_id, now)
            else:
                self.ended_at.pop(job_id, None)
        self.last.update(self.states)

    def outcome(self, job_id: str, has_result: bool = False) -> tuple[str | None, str] | None:
        """None while the job is queued or running, or while its result may still be on its way
        (``grace_s`` after it ended: shared file systems lag; a job with a result waits only until
        SLURM says how it ended); else (its state, None when SLURM no longer lists it; what ended it,
        a phrase for "job <id> ...")."""
        if self.error is not None:
            return (None, "") if has_result else None
        state = self.states.get(job_id)
        if job_id not in self.ended_at:  # PENDING, RUNNING, COMPLETING, REQUEUED, ...
            return None
        never_ran = state is None and self.last.get(job_id) == "PENDING"
        if not never_ran and self.clock() - self.ended_at[job_id] < self.grace_s and not (has_result and state):
            return None
        if state is None:
            return None, GONE_PENDING if never_ran else GONE
        time_min, mem = self.settings.get("time_min"), self.settings.get("mem_gb")
        return state, ENDED[state].format(time=f" (--time {time_min} min)" if time_min else "",
                                          mem=f" (--mem {mem} GB)" if mem else " (set --mem)")


class _QuietSacct(logging.Filter):
    """submitit asks ``sacct`` for job states and warns each time it fails, which it always does on a
    cluster without accounting; the runner asks squeue instead (:class:`SlurmQueue`)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Bypassing sacct error" not in record.getMessage()


def job_failure(run, job, study_dir: Path, why: str | None = None, result: dict | None = None) -> dict:
    """The result of a job that did not finish its run: ``why`` (what the scheduler says ended it,
    :class:`SlurmQueue`), else what submitit says; recorded in the run's ``error.json`` like a failed
    notebook, with the job's log files named and what the run itself said (``result``), if anything."""
    exc = None
    if why is None:
        try:
            exc = job.exception()
        except Exception as e:  # the job's result cannot even be read
            exc = e
        text = str(exc).strip()
        if "has not produced any output" in text:
            why = "ended without a result"
        else:
            why = f"failed: {type(exc).__name__}: {text.splitlines()[-1] if text else ''}"
    log = f" (its log: {job.paths.stderr})" if Path(job.paths.stderr).exists() else ""
    message = f"job {job.job_id} {why}; the same study command resumes the run{log}"
    error = {"error": message, "job_id": str(job.job_id), "stdout": str(job.paths.stdout),
             "stderr": str(job.paths.stderr), "run_error": (result or {}).get("error"),
             "traceback": traceback.format_exception(exc)[-20:] if isinstance(exc, BaseException) else []}
    write_record(study_dir / "runs" / run.name / "error.json", error)
    return {"run": run.name, "status": "failed", "error": message}


def execute_runs_submitit(execute, todo: list, out: Path, settings: dict, stop, on_result=lambda r: None,
                          on_tick=lambda active: None, poll_s: float = 2.0, queue: SlurmQueue | None = None) -> list[dict]:
    """Submit ``todo`` as one job array of :func:`run_job` with ``execute`` (a module-level function,
    pickled by name) and wait for it, like :func:`dad3dlib.study.execute_runs` (same results, same
    callbacks). On SLURM, ``queue`` (default :class:`SlurmQueue`) says which jobs ended and how:
    a job that ended without finishing its run is failed with the scheduler's word. ``stop`` set
    (Ctrl-C): the jobs not yet ended are cancelled and reported as interrupted."""
    if not todo:
        return []
    slurm = settings["name"] == "slurm"
    settings = settle_gpus(settings)
    logging.getLogger("submitit").addFilter(_QuietSacct())
    queue = queue or (SlurmQueue(settings) if slurm else None)
    executor = make_executor(settings, out / "jobs", f"dad3d-{todo[0].params.get('preset', 'study')}")
    n = len(todo)
    try:
        jobs = executor.map_array(run_job, [execute] * n, todo, [out] * n, [settings["cpus_per_run"]] * n,
                                  [settings["time_min"]] * n)
    except (subprocess.CalledProcessError, RuntimeError) as e:  # sbatch refused (submitit's FailedJobError)
        said = getattr(e, "output", None) or str(e)
        said = said.decode(errors="replace") if isinstance(said, bytes) else said
        lines = [line.strip() for line in said.splitlines() if line.strip()]
        raise ClusterError(f"{settings['name']}: the job array was refused: {lines[-1] if lines else e}") from e
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
        if queue is not None:
            queue.poll([str(j.job_id) for j in pending])
        on_tick({run.name: out / "runs" / run.name for job, run in pending.items()  # not those waiting in the queue
                 if queue is None or queue.last.get(str(job.job_id)) != "PENDING"})
        for job in list(pending):
            result = _settled(job, pending[job], out, queue)
            if result is not None:
                pending.pop(job)
                results.append(result)
                on_result(result)
        if pending:
            time.sleep(poll_s)
    return results


def _settled(job, run, out: Path, queue: SlurmQueue | None) -> dict | None:
    """A job's result once it is settled, else None: its run's own result, unless the scheduler
    says that it ended otherwise (cancelled, time limit, ...); a job without a result that the
    scheduler says ended, or no longer knows, is failed with its word (:class:`SlurmQueue`)."""
    done = job.paths.result_pickle.exists() or queue is None and job.done()
    if done:
        try:
            result = job.result()
        except Exception:  # the job failed, however: recorded as a failed run, the others go on
            return job_failure(run, job, out)
        if result["status"] == "finished" or queue is None:
            return result
        verdict = queue.outcome(str(job.job_id), has_result=True)
        if verdict is None:
            return None
        return job_failure(run, job, out, verdict[1], result) if verdict[0] in BY_SCHEDULER else result
    if queue is None:
        return None
    verdict = queue.outcome(str(job.job_id))
    return None if verdict is None else job_failure(run, job, out, verdict[1])
