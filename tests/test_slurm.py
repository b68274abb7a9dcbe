"""The study on a real SLURM cluster: the one-node cluster of ``scripts/slurm_cluster.sh`` (no
GPUs, no accounting), used as it runs (``.ci/run`` starts it), else started here and stopped after;
skipped, with the reason, where SLURM is not installed or does not start.

One study directory, the smoke preset, ``--launcher slurm`` with the default settings:
1. the 6 runs as a job array; one task cancelled while pending, one while running: the runner
   ends, the two are failed with the scheduler's word and the command that resumes them;
2. the same command: the 2 run, the 4 finished are skipped; 3. again: nothing is submitted.
Then a longer smoke run under ``--time 1``: stopped before its time limit, recorded as such, and
resumed from its checkpoint by the same command without ``--time``.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

import dad3dlib

SCRIPT = dad3dlib.REPO_ROOT / "scripts" / "slurm_cluster.sh"
RUNS = 6  # the smoke preset's runs: its distinct ablations, one seed


@pytest.fixture(scope="module")
def slurm_env():
    """The environment reaching the cluster (SLURM_CONF); started here, and stopped after, when it
    was not running; skipped, naming the reason, when it cannot start."""
    env = {**os.environ, "SLURM_CLUSTER_INSTALL": "0"}
    script = lambda verb, timeout=30: subprocess.run(["bash", str(SCRIPT), verb], env=env, capture_output=True,  # noqa: E731
                                                     text=True, timeout=timeout)
    conf = script("env").stdout.split("=", 1)[-1].strip()
    started_here = False
    if script("status").returncode != 0:
        if not shutil.which("slurmctld"):
            pytest.skip("SLURM is not installed (scripts/slurm_cluster.sh start installs it, as root)")
        res = script("start", timeout=180)
        if res.returncode != 0:
            pytest.skip(f"the test SLURM cluster did not start: {(res.stderr or res.stdout).strip()[-300:]}")
        started_here = True
    yield {**os.environ, "SLURM_CONF": conf}
    if started_here:
        script("stop")


class Runner:
    """``python -m dad3dlib study`` in the background, its output collected line by line."""

    def __init__(self, env: dict, *args: str):
        self.cmd = [sys.executable, "-m", "dad3dlib", "study", *args]
        self.proc = subprocess.Popen(self.cmd, cwd=dad3dlib.REPO_ROOT, env=env, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True)
        self.lines: list[str] = []
        self.reader = threading.Thread(target=lambda: self.lines.extend(self.proc.stdout), daemon=True)
        self.reader.start()

    def wait_for(self, pattern: str, timeout: float = 120) -> re.Match:
        deadline = time.time() + timeout
        while time.time() < deadline:
            for line in list(self.lines):
                if m := re.search(pattern, line):
                    return m
            if self.proc.poll() is not None and not self.reader.is_alive():
                break
            time.sleep(0.5)
        pytest.fail(f"no line matching {pattern!r}; output:\n{self.output[-3000:]}")

    def finish(self, timeout: float) -> int:
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            pytest.fail(f"the study runner still waits after {timeout} s (a hang); output:\n{self.output[-3000:]}")
        self.reader.join(10)
        return self.proc.returncode

    @property
    def output(self) -> str:
        return "".join(self.lines)


def squeue_state(env: dict, job_id: str) -> str:
    return subprocess.run(["squeue", "-h", "-r", "-t", "all", "-j", job_id.split("_")[0], "-o", "%i %T"], env=env,
                          capture_output=True, text=True, timeout=30).stdout.split(f"{job_id} ", 1)[-1].split("\n")[0]


def wait_state(env: dict, job_id: str, state: str, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while squeue_state(env, job_id) != state:
        assert time.time() < deadline, f"job {job_id} not {state} after {timeout} s: {squeue_state(env, job_id)!r}"
        time.sleep(0.5)


def record(out: Path) -> dict:
    return json.loads((out / "study.json").read_text())


def finished(out: Path) -> set[str]:
    return {p.parent.name for p in out.glob("runs/*/metrics.json")}


@pytest.mark.slow
def test_smoke_study_on_slurm_with_defaults_cancelled_jobs_and_reruns(slurm_env, tmp_path):
    out = tmp_path / "study"
    args = ["--preset", "smoke", "--out", str(out), "--launcher", "slurm"]
    first = Runner(slurm_env, *args)
    ids = first.wait_for(r"submitted 6 job\(s\) \(slurm\): (.*); logs in").group(1).split(", ")
    pending, running = ids[-1], ids[0]
    assert squeue_state(slurm_env, pending) == "PENDING", \
        "the cluster runs all 6 jobs at once: this test needs one with fewer cores (scripts/slurm_cluster.sh has 2)"
    subprocess.run(["scancel", pending], env=slurm_env, check=True, timeout=30)
    wait_state(slurm_env, running, "RUNNING")
    time.sleep(5)  # its notebook is starting
    subprocess.run(["scancel", running], env=slurm_env, check=True, timeout=30)
    assert first.finish(timeout=600) == 1, first.output[-3000:]
    assert "partition debug has no GPUs: each job runs on CPUs" in first.output  # no GPU asked by default
    assert "gpus" not in next((out / "jobs").glob("*_submission.sh")).read_text()
    assert "sacct" not in first.output  # without accounting submitit's sacct calls fail: not shown
    failed = {rec["run"] for rec in record(out)["runs"] if rec["run"] in record(out)["failed"]}
    assert len(failed) == 2 and len(finished(out)) == RUNS - 2, first.output[-3000:]
    lines = {line.split(" failed: ")[0].removeprefix("run "): line for line in first.output.splitlines()
             if line.startswith("run ") and " failed: " in line}
    assert set(lines) == failed, first.output[-3000:]
    reasons = {json.loads((out / "runs" / r / "error.json").read_text())["error"] for r in failed}
    assert any(e.startswith(f"job {pending} was cancelled before it started") for e in reasons), reasons
    assert any(e.startswith(f"job {running} was cancelled (scancel") for e in reasons), reasons
    assert all("the same study command resumes the run" in e for e in reasons)
    assert f"2 run(s) failed; once the cause is fixed, resume with: python -m dad3dlib study {' '.join(args)}" \
        in first.output

    second = Runner(slurm_env, *args)
    assert second.finish(timeout=600) == 0, second.output[-3000:]
    assert "submitted 2 job(s) (slurm)" in second.output and len(finished(out)) == RUNS
    assert sorted(record(out)["skipped"]) == sorted(set(finished(out)) - failed) and not record(out)["failed"]

    third = Runner(slurm_env, *args)
    assert third.finish(timeout=300) == 0, third.output[-3000:]
    assert "submitted" not in third.output and len(record(out)["skipped"]) == RUNS


@pytest.mark.slow
def test_a_job_at_its_time_limit_is_recorded_and_resumes(slurm_env, tmp_path):
    """A smoke run trained for longer (120 steps, about two minutes on an idle machine of the usual
    kind, so that it outlasts the limit on a fast one: 10 epochs once ended before it) under
    ``--time 1``: the job stops its notebook 15 s before the limit, checkpoints kept; the run is
    failed at its time limit; the same command with the default time resumes it from its checkpoint."""
    preset = yaml.safe_load((dad3dlib.REPO_ROOT / "params" / "presets" / "smoke.yaml").read_text())
    preset["trainer"].update(max_epochs=40, checkpoint_every_n_steps=1)
    (tmp_path / "smoke_long.yaml").write_text(yaml.safe_dump(preset))
    out = tmp_path / "study"
    args = ["--preset", str(tmp_path / "smoke_long.yaml"), "--ablations", "baseline", "--out", str(out),
            "--launcher", "slurm"]
    limited = Runner(slurm_env, *args, "--time", "1")
    assert limited.finish(timeout=300) == 1, limited.output[-3000:]
    error = json.loads((out / "runs" / "baseline_s1" / "error.json").read_text())
    assert re.search(r"reached its time limit \(--time 1 min\)", error["error"]), error
    assert re.search(r"run baseline_s1 failed: .*reached its time limit \(--time 1 min\)", limited.output)
    assert list((out / "runs" / "baseline_s1" / "checkpoints").glob("last*.ckpt")), "no checkpoint to resume from"
    resumed = Runner(slurm_env, *args)
    assert resumed.finish(timeout=900) == 0, resumed.output[-3000:]
    assert finished(out) == {"baseline_s1"}
    notebook = (out / "runs" / "baseline_s1" / "ablation.ipynb").read_text()
    assert "Restored all states from the checkpoint" in notebook, "the rerun started afresh"
