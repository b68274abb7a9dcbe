"""Launchers: the study's runs as submitit jobs (a SLURM job array, or the same jobs as local
processes), with a failing run and a resume."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest

import dad3dlib
from dad3dlib.config import ParamsError
from dad3dlib.launch import DEFAULTS, job_failure, launcher_settings, make_executor


def test_settings_come_from_the_preset_then_the_command_line():
    params = {"launcher": {"name": "slurm", "partition": "gpu", "time_min": 60}}
    s = launcher_settings(params, {"partition": "long", "mem_gb": None, "gpus_per_run": 4})
    assert (s["name"], s["partition"], s["time_min"], s["gpus_per_run"], s["mem_gb"]) == ("slurm", "long", 60, 4, None)
    assert launcher_settings({}) == DEFAULTS and DEFAULTS["name"] == "local"
    with pytest.raises(ParamsError, match="unknown setting"):
        launcher_settings({"launcher": {"partitoin": "gpu"}})
    with pytest.raises(ParamsError, match="unknown name 'pbs'"):
        launcher_settings({}, {"name": "pbs"})


def test_slurm_job_array_script(tmp_path, monkeypatch):
    srun = tmp_path / "bin" / "srun"  # submitit's SLURM executor only checks that srun is on PATH
    srun.parent.mkdir()
    srun.write_text("#!/bin/sh\nexit 1\n")
    srun.chmod(0o755)
    monkeypatch.setenv("PATH", f"{srun.parent}:{os.environ['PATH']}")
    settings = launcher_settings({}, {"name": "slurm", "partition": "gpu", "gpus_per_run": 2, "cpus_per_run": 16,
                                      "time_min": 90, "mem_gb": 64, "account": "vision"})
    executor = make_executor(settings, tmp_path, "dad3d-paper")
    script = executor._executor._make_submission_file_text("python -m submitit.core._submit", "UID")
    for line in ("#SBATCH --partition=gpu", "#SBATCH --gpus-per-node=2", "#SBATCH --cpus-per-task=16",
                 "#SBATCH --time=90", "#SBATCH --mem=64GB", "#SBATCH --account=vision", "#SBATCH --job-name=dad3d-paper"):
        assert line in script, line


@pytest.mark.parametrize("gpus, device, job_name", [(0, "cpu", "dad3d-paper"), (1, "cuda", "dad3d-paper"),
                                                     (4, "auto", "interactive")])
def test_a_job_runs_its_run_on_what_it_was_given(monkeypatch, tmp_path, gpus, device, job_name):
    """One GPU: the run's device; several: the run's trainer section decides, and Lightning starts
    the processes itself (SLURM's one-task-per-GPU detection is switched off); none: its CPUs."""
    import torch

    from dad3dlib import launch

    seen = {}
    monkeypatch.setenv("SLURM_JOB_NAME", "dad3d-paper")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    execute = lambda run, out, dev, threads: seen.update(  # noqa: E731
        device=dev, threads=threads, job_name=os.environ["SLURM_JOB_NAME"]) or {"status": "finished"}
    launch.run_job(execute, SimpleNamespace(name="baseline_s1"), tmp_path, 6)
    assert seen == {"device": device, "threads": 6, "job_name": job_name}


def test_a_job_that_died_is_recorded_like_a_failed_run(tmp_path):
    run = SimpleNamespace(name="baseline_s1")

    class DeadJob:
        job_id = "123_4"
        paths = SimpleNamespace(stdout=tmp_path / "123_4.out", stderr=tmp_path / "123_4.err")

        def exception(self):
            return RuntimeError("Job 123_4 (task: 0) with path ... has state TIMEOUT\nkilled at its time limit")

    result = job_failure(run, DeadJob(), tmp_path)
    assert result == {"run": "baseline_s1", "status": "failed",
                      "error": "job 123_4 failed: RuntimeError: killed at its time limit"}
    error = json.loads((tmp_path / "runs" / "baseline_s1" / "error.json").read_text())
    assert error["stderr"].endswith("123_4.err") and error["job_id"] == "123_4"


def _study(out, *extra):
    cmd = [sys.executable, "-m", "dad3dlib", "study", "--preset", "smoke", "--out", str(out),
           "--ablations", "baseline,no_l3d", "--launcher", "submitit-local", "--cpus-per-run", "1", *extra]
    return subprocess.run(cmd, cwd=dad3dlib.REPO_ROOT, capture_output=True, text=True, timeout=1200)


@pytest.mark.slow
def test_submitit_jobs_fail_resume_and_aggregate(tmp_path):
    """Two runs as separate submitit processes; one cannot write its checkpoints (a file is in the
    way) and fails with its error recorded, the other finishes. Once the obstacle is gone the same
    command skips the finished run, completes the failed one and writes the report."""
    out = tmp_path / "study"
    blocked = out / "runs" / "no_l3d_s1" / "checkpoints"
    blocked.parent.mkdir(parents=True)
    blocked.write_text("in the way")
    first = _study(out)
    assert first.returncode == 1, first.stderr[-3000:]
    assert "submitted 2 job(s) (submitit-local)" in first.stdout
    error = json.loads((out / "runs" / "no_l3d_s1" / "error.json").read_text())
    assert "checkpoints" in error["error"], error["error"]
    done = out / "runs" / "baseline_s1" / "metrics.json"
    stamp = done.stat().st_mtime_ns
    assert len(list((out / "jobs").glob("*_log.out"))) == 2  # each job's own log, beside its pickles
    blocked.unlink()
    second = _study(out)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "submitted 1 job(s)" in second.stdout and done.stat().st_mtime_ns == stamp
    record = json.loads((out / "study.json").read_text())
    assert record["launcher"] == "submitit-local" and record["skipped"] == ["baseline_s1"] and not record["failed"]
    assert (out / "report.html").is_file() and json.loads((out / "runs" / "no_l3d_s1" / "metrics.json").read_text())
