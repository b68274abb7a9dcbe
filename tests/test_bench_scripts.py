"""The benchmark scripts (``make bench-*``) run end to end at tiny sizes and print their figures, so
that a change elsewhere cannot leave one broken until someone measures."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

import dad3dlib

BENCHMARKS = dad3dlib.REPO_ROOT / "benchmarks"


def _bench(script: str, tmp_path, *args) -> str:
    env = {**os.environ, "DAD3D_OUTPUTS": str(tmp_path / "outputs"), "PYTHONPATH": str(dad3dlib.REPO_ROOT)}
    done = subprocess.run([sys.executable, str(BENCHMARKS / script), *args], capture_output=True, text=True,
                          env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


@pytest.mark.slow
def test_bench_eval_prints_each_metric_and_the_benchmark_cli(tmp_path):
    out = _bench("bench_eval.py", tmp_path, "--batch", "2", "--items", "4", "--repeats", "1")
    assert "nme_reprojection" in out and "z5_accuracy_local" in out and "total per item" in out


@pytest.mark.slow
def test_bench_train_writes_its_figures(tmp_path):
    _bench("bench_train.py", tmp_path, "--config", "smoke", "--steps", "1", "--warmup", "0",
           "--out", str(tmp_path / "train.json"))
    (result,) = json.loads((tmp_path / "train.json").read_text())["results"]
    assert result["config"] == "smoke" and result["steps"] == 1 and result["images_per_s"] > 0


@pytest.mark.slow
def test_bench_data_measures_generation_and_loading(tmp_path):
    out = _bench("bench_data.py", tmp_path, "--images", "4")
    assert "make-data (cpu preset sizes), 2 worker(s)" in out and "loader cached" in out


@pytest.mark.slow
def test_bench_run_times_a_whole_run_by_part(tmp_path):
    _bench("bench_run.py", tmp_path, "--preset", "smoke", "--epochs", "1", "--out", str(tmp_path / "run.json"))
    row = json.loads((tmp_path / "run.json").read_text())
    assert row["steps"] > 0 and row["images_per_s_whole_run"] > 0
    assert set(row["time_s"]) == {"train_steps", "data", "validation", "evaluation", "rest"}
    assert sum(row["time_s"].values()) == pytest.approx(row["wall_s"], abs=0.5)
    assert row["time_s"]["train_steps"] > 0 and row["time_s"]["evaluation"] > 0


@pytest.mark.slow
def test_now_agreement_compares_the_now_protocol_with_the_oracle(tmp_path):
    out = _bench("now_agreement.py", tmp_path, "--release", str(tmp_path / "release"), "--subjects", "1")
    assert "2 images" in out and "oracle of the official steps" in out and "same crop on every image: True" in out


@pytest.mark.slow
def test_identity_takes_a_run_apart_and_knows_its_known_answers(tmp_path, smoke_study):
    """Known answers of the decomposition: more of the ground truth's identity, less error; the
    mean head scores what the shape_blind reference does (the mean mesh at the GT pose)."""
    run = smoke_study[0] / "runs" / "baseline_s1"
    _bench("identity.py", tmp_path, "--run", str(run), "--noise", "0", "--out", str(tmp_path / "id.json"))
    result = json.loads((tmp_path / "id.json").read_text())
    parts = result["decomposition_mean_mm"]
    assert parts["ground truth, identity components 0-99 only"] < parts["ground truth without identity"] < parts["mean head"]
    assert result["footprint_px"]["weak-perspective residual"][0] > 0
    (reader,) = result["landmark_reader"]
    assert np.isfinite(reader["reader"]) and reader["noise_px"] == 0
    shape_blind = json.loads((smoke_study[0] / "references" / "shape_blind" / "metrics.json").read_text())
    assert parts["mean head"] == pytest.approx(shape_blind["mean_mm"], abs=1e-4)
    net = result["network"]
    assert set(net["test"]["R2"]) == set(net["train"]["R2"]) and net["test"]["landmark_error_px"] > 0
    assert net["test"]["mean_mm"]["the network's mesh"] > 0
