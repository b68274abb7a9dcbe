"""The study runner: preset × ablations × seeds, one papermill execution of
``notebooks/ablation.ipynb`` per run, then ``notebooks/aggregate.ipynb`` → ``report.html``.

Layout of a study directory ``DIR``::

    DIR/study.json                 what was asked (preset, ablations, seeds) and the run table
    DIR/runs/<ablation>_s<seed>/   params.yaml, ablation.ipynb (executed), metrics.json,
                                   per_sample.csv, checkpoints/, provenance.json, error.json,
                                   submission_test.json (when the test split has no annotations)
    DIR/summary.csv, DIR/aggregate.ipynb, DIR/report.html

A run is finished when its ``metrics.json`` exists and was produced from the same params; finished
runs are skipped, unfinished ones resume from their last checkpoint (the notebook's training
resumes), a failed run is recorded in ``error.json`` without stopping the others. Ablations with
identical training params (the plan's ``l3d50_proj0.05`` is the baseline) run once and are
reported under every name. The data set decides which split each stage uses
(:func:`dad3dlib.data.split_protocol`, recorded in each run's provenance.json and metrics.json).

One runner at a time per study directory (``DIR/study.lock``; a second one is refused, exit 2).
Ctrl-C stops the study cleanly: no new run starts, the running notebooks stop with their
checkpoints kept, ``study.json`` records the unfinished runs, and the runner exits 130 with the
command that resumes it (the same command).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shlex
import sys
import threading
import time
import traceback
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from pathlib import Path

from . import NOTEBOOKS
from .config import available, data_overrides, run_params, save_params
from .errors import InputError
from .data_setup import ensure_data
from .devices import devices_for
from .files import exclusive_lock, write_json, write_record
from .finish import is_finished
from .html_report import write_report
from .kernels import Interrupt, ipc_kernel_manager
from .launch import execute_runs_submitit, launcher_settings
from .plan import (Run, cell_timeout, default_ablations, plan_runs, retire_stale, study_jobs,
                   study_setting)
from .progress import StudyProgress
from .provenance import complete_provenance, provenance, time_parts
from .references import ensure_references

ABLATION_NB = NOTEBOOKS / "ablation.ipynb"


class StudyBusy(InputError):
    """The study directory is held by another runner (the user's situation: one line naming the holder)."""


@contextlib.contextmanager
def study_lock(study_dir: Path):
    """Hold ``study_dir`` for one runner: an exclusive ``flock`` on ``study_dir/study.lock``, which
    records the holder's pid. The system drops the lock when its holder exits, however it exits, so
    the file left by a killed runner blocks nobody. Raises StudyBusy naming the holder."""
    lock = study_dir / "study.lock"
    with contextlib.ExitStack() as stack:
        try:
            f = stack.enter_context(exclusive_lock(lock, wait=False))
        except BlockingIOError:
            raise StudyBusy(f"{study_dir}: in use by another study runner (pid {lock.read_text().strip() or '?'}); "
                            "wait for it to end or stop it, then run this command again") from None
        f.seek(0)
        f.truncate()
        f.write(f"{os.getpid()}\n")
        f.flush()
        yield


def execute_run(run: Run, study_dir: Path, device: str, num_threads: int | None,
                stop: Interrupt | None = None) -> dict:
    """Execute the ablation notebook for one run; never raises (failures are recorded). A run that
    ``stop`` interrupted is "interrupted", not failed: the next study resumes it."""
    import papermill as pm

    from .data import split_protocol
    from .settings import DataSettings

    run_dir = study_dir / "runs" / run.name
    start = time.time()
    prov = {**provenance(run), "status": "running", "started_at": start, "device": device}
    status, error, timeout = "finished", None, cell_timeout(run.params)
    try:
        retire_stale(run_dir, run)
        run_dir.mkdir(parents=True, exist_ok=True)
        prov["splits"] = split_protocol(DataSettings.parse(run.params["data"]))
        save_params(run.params, run_dir / "params.yaml")
        (run_dir / "error.json").unlink(missing_ok=True)
        write_record(run_dir / "provenance.json", prov)
        pm.execute_notebook(
            str(ABLATION_NB), str(run_dir / "ablation.ipynb"),
            parameters={"params_file": str(run_dir / "params.yaml"), "out_dir": str(run_dir),
                        "device": device, "num_threads": num_threads},
            kernel_name="python3", progress_bar=False, cwd=str(NOTEBOOKS), execution_timeout=timeout,
            **(stop.notebook_options() if stop else {"kernel_manager_class": ipc_kernel_manager()}))
        if not is_finished(run_dir, run):
            raise RuntimeError(f"{run_dir / 'ablation.ipynb'} ran but wrote no valid metrics.json")
    except Exception as e:  # a failed run must not stop the study
        status = "interrupted" if stop and stop.is_set() else "failed"
        error = {"error": f"{type(e).__name__}: {_one_line(e, timeout)}",
                 "notebook": str(run_dir / "ablation.ipynb"),
                 "cell": _failed_cell(run_dir / "ablation.ipynb"),
                 "traceback": [_ANSI.sub("", line) for line in
                               (getattr(e, "traceback", None) or traceback.format_exc().splitlines())]}
        if status == "failed":
            write_record(run_dir / "error.json", error)
    prov.update(status=status, wall_time_s=round(time.time() - start, 1))
    if status == "finished":
        prov["time_s"] = time_parts(run_dir, prov["wall_time_s"])
    write_record(run_dir / "provenance.json", prov)
    return {"run": run.name, "status": status, "error": error and error["error"]}


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _one_line(e: Exception, timeout: int | None) -> str:
    """What failed a notebook: the cell's error, or that a cell ran past ``timeout`` (nbclient's
    CellTimeoutError, a TimeoutError)."""
    if isinstance(e, TimeoutError) and timeout and "timed out while it was being executed" in str(e):
        return f"a cell ran longer than study.cell_timeout_s ({timeout} s); its kernel was stopped"
    return str(getattr(e, "evalue", e))


def _failed_cell(nb_path: Path) -> int | None:
    """Index of the first code cell whose output is an error, in the executed notebook."""
    try:
        cells = json.loads(nb_path.read_text())["cells"]
    except (OSError, ValueError, KeyError):
        return None
    for i, c in enumerate(cells):
        if any(o.get("output_type") == "error" for o in c.get("outputs", [])):
            return i
    return None


class BackgroundJob:
    """``fn(*args)`` in a daemon thread with one torch thread (a study's runs hold the cores);
    :meth:`wait` joins it and reports its failure as one line, never raises."""

    def __init__(self, fn, *args):
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, args=(fn, *args), daemon=True)
        self.thread.start()

    def _run(self, fn, *args) -> None:
        import torch

        torch.set_num_threads(1)
        try:
            fn(*args)
        except Exception as e:  # any failure, told by wait(): the study goes on without this job's output
            self.error = e

    def wait(self, what: str) -> bool:
        self.thread.join()
        if self.error is not None:
            print(f"{what} failed: {type(self.error).__name__}: {self.error}", file=sys.stderr)
        return self.error is None


def execute_runs(todo: list[Run], out: Path, jobs: int, stop: Interrupt, on_result=lambda result: None,
                 on_tick=lambda active: None) -> list[dict]:
    """Execute runs ``jobs`` at a time, each job on a device of its own
    (:func:`dad3dlib.devices.devices_for`); on a CPU the cores are shared out (``trainer.num_threads``
    = cores // jobs). Once ``stop`` is set, no run starts and the running ones are interrupted.
    ``on_tick({run name: run dir})`` about every second with the runs executing. Returns
    execute_run's results."""
    devices = devices_for(jobs)
    cpu_threads = max(1, (os.cpu_count() or 1) // jobs)
    pending, running, results = list(todo), {}, []
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        while running or (pending and not stop.is_set()):
            for slot in sorted(set(range(jobs)) - {slot for slot, _ in running.values()}):
                if pending and not stop.is_set():
                    device, run = devices[slot], pending.pop(0)
                    running[pool.submit(execute_run, run, out, device,
                                        cpu_threads if device == "cpu" else None, stop)] = (slot, run)
            on_tick({run.name: out / "runs" / run.name for _, run in running.values()})
            done, _ = wait(running, timeout=1.0, return_when=FIRST_COMPLETED)
            if stop.is_set():
                stop.signal_kernels()
            for f in done:
                del running[f]
                results.append(f.result())
                on_result(results[-1])
    return results


def run_study(preset: str, out: Path, seeds: int | None = None, jobs: int | None = None,
              ablations: list[str] | None = None, overrides: dict | None = None,
              launcher: dict | None = None) -> dict:
    """Plan, execute (skipping finished runs), score the reference predictors, aggregate. Returns
    the study record.

    ``seeds``: seeds 1..K per ablation; None takes the preset's ``study.seeds`` (default 1).
    ``jobs``: concurrent runs; None takes the preset's ``study.jobs`` (default 1). The study
    directory is held (:func:`study_lock`) throughout. Ctrl-C while the runs execute
    (:class:`Interrupt`) ends the study early: the record then says ``interrupted`` and lists the
    ``unfinished`` runs, which the next run of the study resumes.

    ``launcher``: command-line launcher settings over the preset's ``launcher`` section
    (:mod:`dad3dlib.launch`); the default executes the runs here, ``jobs`` at a time."""
    started = time.time()
    ablations = ablations or default_ablations()
    out = Path(out).resolve()  # the notebooks run with notebooks/ as their working directory
    out.mkdir(parents=True, exist_ok=True)
    with study_lock(out):
        seeds = study_setting(run_params(preset, ablations[0], 1, overrides), "seeds", seeds)
        runs = plan_runs(preset, ablations, list(range(1, seeds + 1)), overrides)
        ensure_data(runs[0].params)
        launch = launcher_settings(runs[0].params, launcher)
        jobs = study_jobs(runs[0].params, jobs, launch["name"])
        timeout = cell_timeout(runs[0].params)
        record = {"preset": preset, "ablations": ablations, "seeds": seeds, "launcher": launch["name"],
                  "runs": [{"run": r.name, "ablation": r.ablation, "aliases": r.aliases, "seed": r.seed,
                            "fingerprint": r.fingerprint} for r in runs],
                  "hypotheses": {p["ablation"]: p["hypothesis"]  # stated before the runs (report.study_hypotheses)
                                 for p in (run_params(preset, a, 1, overrides) for a in ablations)}}
        write_json(out / "study.json", record)
        todo = [r for r in runs if not is_finished(out / "runs" / r.name, r)]
        for r in runs:
            if r not in todo:
                complete_provenance(out / "runs" / r.name)

        references = BackgroundJob(ensure_references, runs[0].params, out)  # beside the runs, one thread
        stop, report = Interrupt(), None
        shown = StudyProgress(f"study {preset}", total=len(runs), done=len(runs) - len(todo))
        with contextlib.closing(shown), stop.handling():
            if launch["name"] == "local":
                results = execute_runs(todo, out, jobs, stop, shown.finished, shown.update)
            else:
                results = execute_runs_submitit(execute_run, todo, out, launch, stop, shown.finished, shown.update)
            failed = [r for r in results if r["status"] == "failed"]
            for r in failed:
                print(f"run {r['run']} failed: {r['error']} (see {out / 'runs' / r['run'] / 'error.json'})",
                      file=sys.stderr)
            if not stop.is_set():
                references.wait("reference predictors")  # the runs stand without them
                try:
                    report = write_report(out, stop, timeout)
                except Exception:  # whatever Ctrl-C broke in the report's notebooks; any other is re-raised
                    if not stop.is_set():
                        raise
        record.update(failed=[r["run"] for r in failed], report=report and str(report), jobs=jobs,
                      skipped=[r.name for r in runs if r not in todo],
                      wall_time_s=round(time.time() - started, 1))  # this invocation: data, runs, report
        if report is None:
            record.update(interrupted=True,
                          unfinished=[r.name for r in runs if not is_finished(out / "runs" / r.name, r)])
        write_json(out / "study.json", record)
    return record


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m dad3dlib study", description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="cpu", help=f"one of {available('presets')} or a YAML path")
    ap.add_argument("--out", type=Path, required=True, help="study directory")
    ap.add_argument("--seeds", type=int, default=None, help="seeds 1..K per ablation; default: the preset's "
                    "study.seeds, else 1")
    ap.add_argument("--jobs", type=int, default=None,
                    help="concurrent runs (one per GPU when there are GPUs; on a CPU the cores are shared "
                         "out); default: the preset's study.jobs, else 1")
    ap.add_argument("--ablations", help=f"comma-separated subset of {available('ablations')}")
    ap.add_argument("--data", help="data root (the directory holding DAD-3DHeadsDataset/); default: the preset's")
    ap.add_argument("--flame-assets", help="FLAME-format directory; default: the synthetic head")
    cluster = ap.add_argument_group("launcher (default: the preset's launcher section, else local)")
    cluster.add_argument("--launcher", choices=["local", "submitit-local", "slurm"],
                         help="local: runs execute here; slurm: one SLURM job array through submitit; "
                              "submitit-local: the same jobs as processes on this machine")
    cluster.add_argument("--partition", help="SLURM partition")
    cluster.add_argument("--gpus-per-run", type=int, help="GPUs of each run's job (slurm; default: 1 when the "
                         "partition has GPUs, else 0)")
    cluster.add_argument("--cpus-per-run", type=int, help="CPU cores of each run's job")
    cluster.add_argument("--time", type=int, dest="time_min", help="time limit of each job in minutes (default 720); "
                         "the job stops its notebook a quarter of it, at most 90 s, before")
    cluster.add_argument("--mem", type=int, dest="mem_gb", help="memory of each job in GB")
    cluster.add_argument("--account", help="SLURM account")
    cluster.add_argument("--qos", help="SLURM quality of service")
    args = ap.parse_args(argv)
    launcher = {"name": args.launcher, "partition": args.partition, "gpus_per_run": args.gpus_per_run,
                "cpus_per_run": args.cpus_per_run, "time_min": args.time_min, "mem_gb": args.mem_gb,
                "account": args.account, "qos": args.qos}
    overrides = data_overrides(args.data, args.flame_assets)
    ablations = [a.strip() for a in args.ablations.split(",")] if args.ablations else None
    try:  # bad input (InputError, OSError naming a file) ends the command in one line (dad3dlib.cli)
        record = run_study(args.preset, args.out, args.seeds, args.jobs, ablations, overrides, launcher)
    except KeyboardInterrupt:  # before the runs started (planning, data generation)
        record = {"interrupted": True}
    command = shlex.join(["python", "-m", "dad3dlib", "study", *(sys.argv[1:] if argv is None else argv)])
    if record.get("interrupted"):
        unfinished = f": {len(record['unfinished'])} run(s) unfinished, their checkpoints kept" \
            if "unfinished" in record else ""
        print(f"\ninterrupted{unfinished}; resume with: {command}", file=sys.stderr)
        return 130
    print(f"report: {record['report']}")
    if record["failed"]:
        print(f"{len(record['failed'])} run(s) failed; once the cause is fixed, resume with: {command}", file=sys.stderr)
    return 1 if record["failed"] else 0
