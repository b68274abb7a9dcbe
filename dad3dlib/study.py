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
import platform
import re
import shlex
import subprocess
import sys
import threading
import time
import traceback
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path

from . import REPO_ROOT
from .config import (DEFAULT_SHAPE_PROTOCOL, TRAINING_RECORD, ParamsError, available, data_overrides, run_params,
                     save_params, shape_protocol, synthetic_recipe, training_fingerprint)
from .errors import InputFileNotFound
from .files import atomic_write, exclusive_lock, write_json, write_record
from .kernels import Interrupt, ipc_kernel_manager
from .launch import ClusterError, execute_runs_submitit, launcher_settings
from .progress import StudyProgress
from .data import DATASET_DIR

NOTEBOOKS = REPO_ROOT / "notebooks"
ABLATION_NB = NOTEBOOKS / "ablation.ipynb"
AGGREGATE_NB = NOTEBOOKS / "aggregate.ipynb"
REPORT_TEMPLATE = Path(__file__).parent / "report_template" / "report.html.j2"  # no script from a CDN
PACKAGES = ("torch", "torchvision", "timm", "lightning", "easypytorch3d", "numpy", "papermill", "moderngl")


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


def is_finished(run_dir: Path, run: Run) -> bool:
    try:
        metrics = json.loads((run_dir / "metrics.json").read_text())
    except (OSError, ValueError):
        return False
    return metrics.get("fingerprint") == run.fingerprint


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


def processes(trainer: dict) -> tuple[int, int]:
    """(processes per machine, machines) of a run's trainer section: ``devices`` (a count or a
    list; "auto" counts 1) and ``num_nodes``."""
    devices = trainer.get("devices", 1)
    local = len(devices) if isinstance(devices, list) else devices if isinstance(devices, int) and devices > 1 else 1
    return local, int(trainer.get("num_nodes") or 1)


def on_device(params: dict, device: str = "auto", num_threads: int | None = None) -> dict:
    """A copy of params whose trainer runs on ``device`` ("auto", "cpu", "cuda", "cuda:<i>") with
    ``num_threads`` CPU threads. A run over several processes (``trainer.devices`` > 1 or
    ``trainer.num_nodes`` > 1, e.g. strategy ddp) keeps its devices, takes only the kind of device
    ("cpu" or a GPU) from ``device``, and shares ``num_threads`` out among its processes."""
    trainer = dict(params.get("trainer") or {})
    local, nodes = processes(trainer)
    several = local * nodes > 1
    if device == "cpu":
        trainer.update(accelerator="cpu", **({} if several else {"devices": 1}))
    elif device.startswith("cuda"):
        trainer.update(accelerator="gpu", **({} if several else
                                             {"devices": [int(device.split(":")[1])] if ":" in device else 1}))
    if num_threads:
        trainer["num_threads"] = max(1, int(num_threads) // local)  # per process, on each machine
    return {**params, "trainer": trainer}


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

    splits, run_dir, start = split_protocol(params["data"]), Path(run_dir), time.perf_counter()
    metrics = evaluate_run(params, checkpoint, run_dir, splits["evaluate"], device)
    if splits["submit"]:
        metrics["submission"] = f"submission_{splits['submit']}.json"
        predict(checkpoint, data_root(params["data"]), splits["submit"], run_dir / metrics["submission"],
                device=device)
    metrics["evaluation_time_s"] = round(time.perf_counter() - start, 2)
    write_run_metrics(run_dir, metrics, params)
    return metrics


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


class StudyBusy(RuntimeError):
    """The study directory is held by another runner."""


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

    run_dir = study_dir / "runs" / run.name
    start = time.time()
    prov = {**provenance(run), "status": "running", "started_at": start, "device": device}
    status, error, timeout = "finished", None, cell_timeout(run.params)
    try:
        retire_stale(run_dir, run)
        run_dir.mkdir(parents=True, exist_ok=True)
        prov["splits"] = split_protocol(run.params["data"])
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


def time_parts(run_dir: Path, wall_time_s: float) -> dict:
    """A finished run's wall time by part, seconds (``report.TIME_PARTS``): the training steps, waiting
    for training batches and validation (this execution's fit, ``train.PhaseTimes``), the
    evaluation (:func:`finish_run`), and the rest: kernel start, imports, data and pose-prior
    set-up, checkpoints, logging, plots."""
    from .report import TIME_PARTS

    metrics = json.loads((run_dir / "metrics.json").read_text())
    fit = metrics.get("fit_time_s") or {}
    parts = {k: float(fit.get(k, 0.0)) for k in TIME_PARTS[:3]}
    parts["evaluation"] = float(metrics.get("evaluation_time_s", 0.0))
    parts["rest"] = max(0.0, wall_time_s - sum(parts.values()))
    return {k: round(v, 1) for k, v in parts.items()}


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _one_line(e: Exception, timeout: int | None) -> str:
    """What failed a notebook: the cell's error, or that a cell ran past ``timeout`` (nbclient's
    CellTimeoutError, a TimeoutError)."""
    if isinstance(e, TimeoutError) and timeout and "timed out while it was being executed" in str(e):
        return f"a cell ran longer than study.{CELL_TIMEOUT} ({timeout} s); its kernel was stopped"
    return str(getattr(e, "evalue", e))


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


def study_setting(params: dict, key: str, given: int | None = None) -> int:
    """A positive integer study setting (``jobs``, ``seeds``): ``given`` (the command line) when
    set, else the preset's ``study.<key>``, else 1."""
    value = given if given is not None else (params.get("study") or {}).get(key, 1)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ParamsError(f"{key} must be a positive integer, got {value!r} (--{key} or the preset's study.{key})")
    return value


CELL_TIMEOUT = "cell_timeout_s"  # the preset's study.cell_timeout_s


def cell_timeout(params: dict) -> int | None:
    """The longest one notebook cell may run, in seconds (the preset's ``study.cell_timeout_s``;
    unset or null: no limit). A cell still running then fails its notebook (the run's
    ``error.json``, or the report) and its kernel is stopped, so that a hung kernel cannot hang the
    study."""
    value = (params.get("study") or {}).get(CELL_TIMEOUT)
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
        raise ParamsError(f"study.{CELL_TIMEOUT} must be a positive number of seconds or null, got {value!r}")
    return value


def study_jobs(params: dict, jobs: int | None = None, launcher: str = "local") -> int:
    """Concurrent runs: ``jobs`` when given, else the preset's ``study.jobs``, else 1. Runs over
    several processes (``trainer.devices``/``num_nodes``) share out this machine already: here
    (``launcher`` local) they run one at a time, and more is refused."""
    jobs = study_setting(params, "jobs", jobs)
    local, nodes = processes(params.get("trainer") or {})
    if jobs > 1 and local * nodes > 1 and launcher == "local":
        raise ParamsError(f"jobs {jobs}: each run of this preset trains over {local * nodes} processes "
                          "(trainer.devices, num_nodes), which use this machine's devices and ports: run them "
                          "one at a time (--jobs 1), or as cluster jobs (--launcher slurm)")
    return jobs


def devices_for(jobs: int) -> list[str]:
    """One device string per concurrent job: a GPU each when there are GPUs, else the CPU."""
    import torch

    n = torch.cuda.device_count()  # 0 without CUDA or with a broken driver (torch warns), never raises
    return [f"cuda:{i % n}" for i in range(jobs)] if n else ["cpu"] * jobs


def ensure_data(params: dict) -> Path:
    """The data root of a run: generated from the preset's recipe (``data.synthetic``) when
    ``make_data.json`` (written last) is missing, older than the FLAME model or records another
    recipe; an error when a real data set is missing."""
    root = Path(params["data"]["root"])
    recipe = synthetic_recipe(params["data"].get("synthetic"))
    if recipe:
        from .synthetic_data import make_data, why_make

        why = why_make(root, recipe, params["data"].get("flame_path"))
        if why:
            print(f"{root}: generating the data set ({why})", flush=True)
            make_data(root, recipe, params["data"].get("flame_path"), name=params.get("preset", "custom"))
    elif not (root / DATASET_DIR).is_dir():
        raise InputFileNotFound(f"data directory {root} not found (expected the DAD-3DHeads layout "
                                f"{root / DATASET_DIR}/{{train,val,test}}); set data.root or --data")
    return root


REFERENCES_DIR = "references"


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


def ensure_references(params: dict, study_dir: Path) -> Path:
    """The reference predictors (evaluate.REFERENCES) scored on the study's evaluation split
    (:func:`dad3dlib.data.split_protocol`) with its shape protocol, in ``study_dir/references/``;
    skipped when already measured on the same data, split, crop, prior and protocol."""
    from .data import split_protocol
    from .evaluate import evaluate_references

    out = study_dir / REFERENCES_DIR
    split = split_protocol(params["data"])["evaluate"]
    protocol = shape_protocol(params)  # counted when not the default, so earlier studies keep their references
    key = {"data": training_fingerprint({"data": params["data"]}), "split": split, "pose_prior_samples":
           (params.get("model") or {}).get("pose_prior_samples"),
           **({"shape_protocol": protocol} if protocol != DEFAULT_SHAPE_PROTOCOL else {})}
    try:
        if json.loads((out / "references.json").read_text()).get("key") == key:
            return out
    except (OSError, ValueError):
        pass
    evaluate_references({**params, "trainer": {**(params.get("trainer") or {}), "num_threads": None}}, out, split,
                        progress=False)  # beside the runs: the study's own bar is the progress
    record = json.loads((out / "references.json").read_text())
    write_json(out / "references.json", {**record, "key": key})
    return out


def write_report(study_dir: Path, stop: Interrupt | None = None, timeout: int | None = None) -> Path:
    """summary.csv, the executed aggregate notebook (each cell at most ``timeout`` seconds, None: no
    limit; without the live results browser, which needs a kernel), and report.html (inputs hidden)."""
    import papermill as pm

    from .report import write_summary

    write_summary(study_dir)
    out_nb = study_dir / "aggregate.ipynb"
    pm.execute_notebook(str(AGGREGATE_NB), str(out_nb),
                        parameters={"study_dir": str(study_dir.resolve()), "live_browser": False},
                        kernel_name="python3", progress_bar=False, cwd=str(NOTEBOOKS), execution_timeout=timeout,
                        **(stop.notebook_options() if stop else {"kernel_manager_class": ipc_kernel_manager()}))
    report = study_dir / "report.html"
    atomic_write(report, report_html(out_nb))
    return report


def report_html(notebook: Path) -> str:
    """An executed notebook as a self-contained page: outputs only (inputs and prompts hidden), and
    no script fetched from a network (:data:`REPORT_TEMPLATE`)."""
    import nbformat
    from nbconvert import HTMLExporter

    exporter = HTMLExporter(exclude_input=True, exclude_input_prompt=True, exclude_output_prompt=True,
                            extra_template_paths=[str(REPORT_TEMPLATE.parent)], template_file=REPORT_TEMPLATE.name)
    return exporter.from_notebook_node(nbformat.read(str(notebook), as_version=4))[0]


def execute_runs(todo: list[Run], out: Path, jobs: int, stop: Interrupt, on_result=lambda result: None,
                 on_tick=lambda active: None) -> list[dict]:
    """Execute runs ``jobs`` at a time, each job on a device of its own (:func:`devices_for`); on a
    CPU the cores are shared out (``trainer.num_threads`` = cores // jobs). Once ``stop`` is set, no
    run starts and the running ones are interrupted. ``on_tick({run name: run dir})`` about every
    second with the runs executing. Returns execute_run's results."""
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


def default_ablations() -> list[str]:
    names = available("ablations")
    return ["baseline"] + [n for n in names if n != "baseline"]


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
    try:
        record = run_study(args.preset, args.out, args.seeds, args.jobs, ablations, overrides, launcher)
    except (ParamsError, StudyBusy, ClusterError, OSError) as e:  # OSError: a missing data set, a full disk
        print(f"error: {e}", file=sys.stderr)                       # (names the file)
        return 2
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
