"""Shared test helpers: a tiny FLAME model, the released DAD-3DHeads layout, a hand-written study;
the synthetic head (``assets``) and the smoke study (``smoke_study``), session fixtures: built once,
read by several test files.

Plain functions, imported as ``from conftest import ...``: pytest's default import mode puts this
directory (no ``__init__.py``) on the import path when it loads this file.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import dad3dlib

from dad3dlib.flame import FlameAssets, FlameModel, FlameTopology, matrix_to_rot6d, pack_3dmm


def tiny_flame_assets(n_vertices: int = 30, n_faces: int = 20, seed: int = 0) -> FlameAssets:
    """A random FLAME-structured model small enough for fast tests (not a head): the real array
    layouts (400 shape/expression bases, 5 joints, 51 static and 17 dynamic landmarks) with
    ``n_vertices`` vertices and ``n_faces`` faces."""
    rng = np.random.default_rng(seed)
    V = n_vertices
    faces = np.stack([rng.choice(V, 3, replace=False) for _ in range(n_faces)]).astype(np.int64)
    norm_rows = lambda a: (a / a.sum(-1, keepdims=True)).astype(np.float32)  # noqa: E731
    model = FlameModel(
        v_template=rng.uniform(-0.1, 0.1, (V, 3)).astype(np.float32), faces=faces,
        shapedirs=(rng.standard_normal((V, 3, 400)) * 1e-3).astype(np.float32),
        posedirs=(rng.standard_normal((V, 3, 36)) * 1e-3).astype(np.float32),
        J_regressor=norm_rows(rng.uniform(0.1, 1, (5, V))), weights=norm_rows(rng.uniform(0.1, 1, (V, 5))),
        kintree_table=np.array([[2**32 - 1, 0, 1, 1, 1], [0, 1, 2, 3, 4]], np.int64))
    topo = FlameTopology(
        faces=faces, static_face_idx=rng.integers(0, n_faces, 51), static_bary=norm_rows(rng.uniform(0.1, 1, (51, 3))),
        dynamic_face_idx=rng.integers(0, n_faces, (1, 17)),
        dynamic_bary=norm_rows(rng.uniform(0.1, 1, (1, 17, 3))),
        subsets={"face": np.arange(10), "face_w_ears": np.arange(20), "head": np.arange(5, V)})
    return FlameAssets(topology=topo, model=model, path=None)


def random_3dmm(R: torch.Tensor, g: torch.Generator, scale: float = 5.0) -> torch.Tensor:
    """3DMM vectors [B,413] (:func:`dad3dlib.flame.pack_3dmm`) of heads turned by R [B,3,3]: shape,
    expression and jaw ~ N(0, 0.5²), translation x, y uniform in ±0.1 (z 0), scale uniform in
    [scale, scale + 1); drawn from ``g`` in that order."""
    n = len(R)
    coeffs = torch.randn(n, 403, generator=g) * 0.5
    translation = torch.cat([(torch.rand(n, 2, generator=g) - 0.5) * 0.2, torch.zeros(n, 1)], 1)
    return pack_3dmm(coeffs[:, :300], coeffs[:, 300:400], coeffs[:, 400:], matrix_to_rot6d(R), translation,
                     scale + torch.rand(n, 1, generator=g))


def as_released(root: Path) -> Path:
    """Turn generated data at ``root`` into the released DAD-3DHeads layout: the test split keeps its
    images and ``test.json`` entries but loses its annotations and every ``annotation_path``; no
    ``make_data.json``. Returns root."""
    shutil.rmtree(root / "DAD-3DHeadsDataset/test/annotations")
    split = root / "DAD-3DHeadsDataset/test/test.json"
    entries = [{k: v for k, v in e.items() if k != "annotation_path"} for e in json.loads(split.read_text())]
    split.write_text(json.dumps(entries))
    (root / "make_data.json").unlink()
    return root


def small_study(root: Path) -> Path:
    """Five runs written by hand: baseline (alias l3d50_proj0.05) seeds 1 and 2 finished on val with
    mean_mm 2 and 4, no_l3d seed 1 finished (3), seed 2 pending, no_2d seed 1 failed; one reference."""
    runs = [("baseline_s1", "baseline", 1, {"mean_mm": 2.0}), ("baseline_s2", "baseline", 2, {"mean_mm": 4.0}),
            ("no_l3d_s1", "no_l3d", 1, {"mean_mm": 3.0}), ("no_l3d_s2", "no_l3d", 2, None),
            ("no_2d_s1", "no_2d", 1, "failed")]
    for run, _, seed, metrics in runs:
        d = root / "runs" / run
        d.mkdir(parents=True)
        if isinstance(metrics, dict):
            (d / "metrics.json").write_text(json.dumps({**metrics, "angle_error_deg": 10.0 * seed, "split": "val"}))
            pd.DataFrame({"item_id": ["a", "b"], "pose": ["front", "side"], "quality": ["hq", "lq"],
                          "mean_mm": [metrics["mean_mm"] - 1, metrics["mean_mm"] + 1]}).to_csv(d / "per_sample.csv")
        elif metrics == "failed":
            (d / "error.json").write_text("{}")
    (root / "study.json").write_text(json.dumps({"runs": [
        {"run": run, "ablation": abl, "seed": seed, "aliases": ["l3d50_proj0.05"] if abl == "baseline" else []}
        for run, abl, seed, _ in runs]}))
    (root / "references" / "constant").mkdir(parents=True)
    (root / "references" / "constant" / "metrics.json").write_text(json.dumps({"mean_mm": 9.0}))
    (root / "references" / "references.json").write_text(json.dumps({"descriptions": {"constant": "The mean head."},
                                                                     "split": "val"}))
    return root


def study_cmd(out: Path) -> list[str]:
    return [sys.executable, "-m", "dad3dlib", "study", "--preset", "smoke", "--out", str(out)]


def _start(out: Path) -> subprocess.Popen:
    return subprocess.Popen(study_cmd(out), cwd=dad3dlib.REPO_ROOT, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _wait_for_finished_runs(proc: subprocess.Popen, out: Path, n: int) -> None:
    deadline = time.time() + 600
    while len(list(out.glob("runs/*/metrics.json"))) < n:
        if proc.poll() is not None:
            pytest.fail(f"study exited early ({proc.returncode}): {proc.stderr.read()[-3000:]}")
        if time.time() > deadline:
            os.killpg(proc.pid, signal.SIGKILL)
            pytest.fail(f"no {n} run(s) finished within 10 minutes")
        time.sleep(0.5)


@pytest.fixture(scope="session")
def assets() -> FlameAssets:
    """The project's synthetic head (its FLAME-format directory, made on first use)."""
    from dad3dlib.flame import load_flame_assets
    from dad3dlib.synthetic_head import default_flame_dir

    return load_flame_assets(default_flame_dir())


@pytest.fixture(scope="session")
def smoke_study(tmp_path_factory):
    """The smoke study, built once for the session (tests/test_study.py checks how it was built, other
    files read it): start it; once its first run has finished, a second runner on the directory is
    refused and Ctrl-C stops the first; run it again and kill it (and its kernels) once another
    run has finished; run it a third time, to the end. -> (study directory, {metrics.json: mtime}
    before the last start, what the interrupted runners did)"""
    out = tmp_path_factory.mktemp("smoke_study")
    proc = _start(out)
    _wait_for_finished_runs(proc, out, 1)
    second = subprocess.run(study_cmd(out), cwd=dad3dlib.REPO_ROOT, capture_output=True, text=True, timeout=300)
    checkpoints = set(out.glob("runs/*/checkpoints/*.ckpt"))
    os.killpg(proc.pid, signal.SIGINT)
    _, stderr = proc.communicate(timeout=300)
    ctrl_c = {"pid": proc.pid, "returncode": proc.returncode, "stderr": stderr, "second": second,
              "checkpoints": checkpoints, "record": json.loads((out / "study.json").read_text())}
    stamps = {p: p.stat().st_mtime_ns for p in out.glob("runs/*/metrics.json")}
    proc = _start(out)
    _wait_for_finished_runs(proc, out, len(stamps) + 1)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    stamps = {p: p.stat().st_mtime_ns for p in out.glob("runs/*/metrics.json")}
    res = subprocess.run(study_cmd(out), cwd=dad3dlib.REPO_ROOT, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    ctrl_c["final_stderr"] = res.stderr
    return out, stamps, ctrl_c
