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
from dad3dlib.errors import ParamsError
from dad3dlib.launch import (LAUNCHER_DEFAULTS, ClusterError, SlurmQueue, job_failure, launcher_settings, make_executor,
                             settle_gpus)


def test_settings_come_from_the_preset_then_the_command_line():
    params = {"launcher": {"name": "slurm", "partition": "gpu", "time_min": 60}}
    s = launcher_settings(params, {"partition": "long", "mem_gb": None, "gpus_per_run": 4})
    assert (s["name"], s["partition"], s["time_min"], s["gpus_per_run"], s["mem_gb"]) == ("slurm", "long", 60, 4, None)
    assert launcher_settings({}) == LAUNCHER_DEFAULTS and LAUNCHER_DEFAULTS["name"] == "local"
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
    executor = make_executor(settle_gpus(settings, _sinfo(["gpu*|gpu:4"])), tmp_path, "dad3d-paper")
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
    execute = lambda run, out, dev, threads, stop: seen.update(  # noqa: E731
        device=dev, threads=threads, job_name=os.environ["SLURM_JOB_NAME"]) or {"status": "finished"}
    launch.run_job(execute, SimpleNamespace(name="baseline_s1"), tmp_path, 6)
    assert seen == {"device": device, "threads": 6, "job_name": job_name}


def test_a_cpu_job_uses_the_cores_slurm_gave_it(monkeypatch, tmp_path):
    """Without task affinity (TaskPlugin=task/none) a job sees every core: its threads are the CPUs
    SLURM allocated to it, not the machine's."""
    import torch

    from dad3dlib import launch

    seen = {}
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    monkeypatch.delenv("SLURM_CPUS_PER_TASK", raising=False)
    monkeypatch.setenv("SLURM_CPUS_ON_NODE", "3")
    execute = lambda run, out, dev, threads, stop: seen.update(threads=threads) or {"status": "finished"}  # noqa: E731
    launch.run_job(execute, SimpleNamespace(name="baseline_s1"), tmp_path, None)
    assert seen == {"threads": 3}


def test_the_signal_before_the_time_limit_stops_the_notebook_and_records_the_limit(tmp_path):
    """submitit's USR2 before the time limit interrupts the run (like Ctrl-C: checkpoints kept), and
    the run is recorded as failed at its time limit, resumable; without it the run's result stands."""
    import signal

    from dad3dlib import launch

    def execute(run, out, device, threads, stop):
        os.kill(os.getpid(), signal.SIGUSR2)
        return {"run": run.name, "status": "interrupted" if stop.is_set() else "finished", "error": None}

    before = signal.getsignal(signal.SIGUSR2)
    result = launch.run_job(execute, SimpleNamespace(name="baseline_s1"), tmp_path, 1, time_min=3)
    assert result["status"] == "failed" and "time limit (--time 3 min)" in result["error"], result
    assert "resumes" in result["error"] and signal.getsignal(signal.SIGUSR2) is before
    assert json.loads((tmp_path / "runs" / "baseline_s1" / "error.json").read_text())["cause"] == "time limit"
    finished = lambda run, out, device, threads, stop: {"run": run.name, "status": "finished", "error": None}  # noqa: E731
    assert launch.run_job(finished, SimpleNamespace(name="no_2d_s1"), tmp_path, 1)["status"] == "finished"


def test_time_limits_leave_room_for_the_signal(tmp_path, monkeypatch):
    """submitit signals 90 s before the limit: a shorter limit gets a quarter of it instead, and a
    limit under a minute is refused in one line naming --time."""
    from dad3dlib.launch import signal_delay_s

    assert [signal_delay_s(t) for t in (1, 2, 5, 6, 720)] == [15, 30, 75, 90, 90]
    for bad in (0, -5, 1.5):
        with pytest.raises(ParamsError, match=r"--time\) must be a whole number of minutes >= 1"):
            launcher_settings({}, {"name": "slurm", "time_min": bad})
    srun = tmp_path / "bin" / "srun"
    srun.parent.mkdir()
    srun.write_text("#!/bin/sh\nexit 1\n")
    srun.chmod(0o755)
    monkeypatch.setenv("PATH", f"{srun.parent}:{os.environ['PATH']}")
    executor = make_executor({**launcher_settings({}, {"name": "slurm", "time_min": 1}), "gpus_per_run": 0},
                             tmp_path, "dad3d-smoke")
    script = executor._executor._make_submission_file_text("python -m submitit.core._submit", "UID")
    assert "#SBATCH --signal=USR2@15" in script and "#SBATCH --time=1" in script and "gpus" not in script


def _sinfo(lines):
    return lambda *args: "\n".join(lines) + "\n"


def test_gpus_are_asked_only_of_a_partition_that_has_them(capsys):
    """Unset: one GPU per run where the partition has GPUs, none (said once) where it has none; GPUs
    asked of a partition without any, or an unknown partition, are one line naming the flag."""
    cpu_only, mixed = _sinfo(["debug*|(null)"]), _sinfo(["cpu*|(null)", "gpu|gpu:a100:4(S:0-1)", "gpu|(null)"])
    slurm = launcher_settings({}, {"name": "slurm"})
    assert slurm["gpus_per_run"] is None
    assert settle_gpus(slurm, cpu_only)["gpus_per_run"] == 0
    assert "partition debug has no GPUs" in capsys.readouterr().out
    assert settle_gpus({**slurm, "partition": "gpu"}, mixed)["gpus_per_run"] == 1
    assert settle_gpus(slurm, mixed)["gpus_per_run"] == 0  # the default partition, cpu
    assert settle_gpus({**slurm, "partition": "gpu", "gpus_per_run": 2}, mixed)["gpus_per_run"] == 2
    with pytest.raises(ClusterError, match="--gpus-per-run 1: partition debug has no GPUs.*--gpus-per-run 0"):
        settle_gpus({**slurm, "gpus_per_run": 1}, cpu_only)
    with pytest.raises(ClusterError, match=r"--partition long: no such partition \(sinfo lists cpu, gpu\)"):
        settle_gpus({**slurm, "partition": "long"}, mixed)
    assert settle_gpus({**slurm, "name": "submitit-local"}, None)["gpus_per_run"] == 0  # sinfo not asked


class FakeClock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def test_the_queue_says_what_ended_a_job():
    """squeue's state of each array task: queued or running is no verdict; an ended one is, after a
    grace for its result; a pending task that leaves the queue was cancelled before it started; an
    unreachable controller decides nothing; ids it no longer knows at all are no jobs listed."""
    said, clock = {"out": ""}, FakeClock()

    def squeue(*args):
        if said.get("purged"):
            raise ClusterError("squeue failed: slurm_load_jobs error: Invalid job id specified")
        if said["out"] is None:
            raise ClusterError("squeue failed: Unable to contact slurm controller")
        return said["out"]

    q = SlurmQueue({"time_min": 30, "mem_gb": None}, grace_s=10, squeue=squeue, clock=clock)
    ids = ["7_0", "7_1", "7_2", "7_3"]
    said["out"] = "7_0|RUNNING\n7_1|PENDING\n7_2|RUNNING\n7_3|RUNNING\n"
    q.poll(ids)
    assert [q.outcome(j) for j in ids] == [None] * 4
    said["out"] = "7_0|CANCELLED\n7_2|TIMEOUT\n7_3|OUT_OF_MEMORY\n"  # 7_1 cancelled while pending: gone
    q.poll(ids)
    assert q.outcome("7_1") == (None, "was cancelled before it started (it left the queue without running)")
    assert q.outcome("7_0") is None and q.outcome("7_2") is None  # its result may be on its way
    assert q.outcome("7_0", has_result=True) == ("CANCELLED", "was cancelled (scancel, or an administrator)")
    clock.t = 11
    assert q.outcome("7_2") == ("TIMEOUT", "reached its time limit (--time 30 min)")
    assert q.outcome("7_3") == ("OUT_OF_MEMORY", "ran out of memory (set --mem)")
    said["out"] = None
    q.poll(ids)
    assert q.outcome("7_2") is None and q.outcome("7_2", has_result=True) == (None, "")
    said["out"] = "7_3|RUNNING\n"
    q.poll(ids)
    assert q.outcome("7_3") is None
    said["out"] = None
    said["purged"] = True  # every job asked of has left: squeue refuses the ids
    q.poll(ids)
    assert q.outcome("7_3") is None  # its result may be on its way
    clock.t = 30
    assert q.outcome("7_3")[1].startswith("left the queue without a result")


class FakeJob:
    """A submitit job as the runner sees it: a result file that appears (or not), a result."""

    def __init__(self, folder, job_id, result=None):
        self.job_id, self._result = job_id, result
        self.paths = SimpleNamespace(result_pickle=folder / f"{job_id}_result.pkl", stdout=folder / f"{job_id}.out",
                                     stderr=folder / f"{job_id}.err")
        self.cancelled = False

    def finish(self):
        self.paths.result_pickle.write_text("done")

    def result(self):
        return self._result

    def done(self):
        return self.paths.result_pickle.exists()

    def cancel(self, check=True):
        self.cancelled = True


def test_the_runner_ends_when_jobs_are_cancelled_or_vanish(tmp_path, monkeypatch):
    """Three tasks: one finishes its run; one is cancelled while pending (no result, then no record
    in squeue); one is cancelled while running (its notebook's kernel dies: the run says only
    'Kernel died'). The runner does not wait forever: the two are failed, each with the scheduler's
    word and how to resume, in the run's error.json. A task waiting in the queue is not shown as running."""
    import threading

    from dad3dlib import launch

    runs = [SimpleNamespace(name=n, params={"preset": "smoke"}) for n in ("baseline_s1", "no_2d_s1", "no_l3d_s1")]
    jobs = [FakeJob(tmp_path, "9_0", {"run": "baseline_s1", "status": "finished", "error": None}),
            FakeJob(tmp_path, "9_1"),
            FakeJob(tmp_path, "9_2", {"run": "no_l3d_s1", "status": "failed", "error": "DeadKernelError: Kernel died"})]
    monkeypatch.setattr(launch, "make_executor", lambda *a: SimpleNamespace(map_array=lambda *args: jobs))
    clock, polls = FakeClock(), []

    def squeue(*args):
        polls.append(args)
        clock.t += 1
        assert len(polls) < 50, "the runner is still waiting for jobs that ended"
        if len(polls) == 1:
            return "9_0|RUNNING\n9_1|PENDING\n9_2|RUNNING\n"
        jobs[0].finish()
        jobs[2].finish()
        return "9_0|COMPLETED\n9_2|CANCELLED\n"

    queue = SlurmQueue({"time_min": 720, "mem_gb": None}, grace_s=5, squeue=squeue, clock=clock)
    settings = {**launcher_settings({}, {"name": "slurm", "gpus_per_run": 0}), "name": "slurm"}
    monkeypatch.setattr(launch, "settle_gpus", lambda s: s)
    ticks = []
    results = launch.execute_runs_submitit(None, runs, tmp_path, settings, threading.Event(), poll_s=0, queue=queue,
                                           on_tick=lambda active: ticks.append(sorted(active)))
    assert ticks[0] == ["baseline_s1", "no_l3d_s1"]  # shown as running: not the one waiting in the queue
    by_run = {r["run"]: r for r in results}
    assert by_run["baseline_s1"]["status"] == "finished" and len(polls) == 2
    assert by_run["no_2d_s1"]["error"].startswith("job 9_1 was cancelled before it started")
    assert by_run["no_l3d_s1"]["error"].startswith("job 9_2 was cancelled (scancel")
    for run in ("no_2d_s1", "no_l3d_s1"):
        assert "the same study command resumes the run" in by_run[run]["error"]
        error = json.loads((tmp_path / "runs" / run / "error.json").read_text())
        assert error["error"] == by_run[run]["error"] and error["stderr"].endswith(".err")
    assert json.loads((tmp_path / "runs" / "no_l3d_s1" / "error.json").read_text())["run_error"] == \
        "DeadKernelError: Kernel died"


def test_a_job_that_died_is_recorded_like_a_failed_run(tmp_path):
    run = SimpleNamespace(name="baseline_s1")

    class DeadJob:
        job_id = "123_4"
        paths = SimpleNamespace(stdout=tmp_path / "123_4.out", stderr=tmp_path / "123_4.err")

        def exception(self):
            return RuntimeError("Job 123_4 (task: 0) with path ... has state TIMEOUT\nkilled at its time limit")

    (tmp_path / "123_4.err").write_text("")
    result = job_failure(run, DeadJob(), tmp_path)
    assert result == {"run": "baseline_s1", "status": "failed",
                      "error": "job 123_4 failed: RuntimeError: killed at its time limit; the same study command "
                               f"resumes the run (its log: {tmp_path / '123_4.err'})"}
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
    assert "1 run(s) failed; once the cause is fixed, resume with: python -m dad3dlib study --preset smoke " \
           f"--out {out}" in first.stderr
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
