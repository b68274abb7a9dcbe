"""The study runner: one runner per study directory, records that survive a full disk; the smoke
study end to end: data → six runs → aggregate → HTML, stopped by Ctrl-C, killed, and resumed."""
import errno
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

import dad3dlib
from dad3dlib import config, data, report, study

from test_data import as_released

SIX = ("median_mm", "mean_mm", "std_mm", "angle_error_deg", "nme_reprojection", "z5_accuracy")
ABLATIONS = ("baseline", "l3d50_proj0.05", "no_l3d", "no_lproj", "no_2d", "l3d50_proj0.5", "l3d5_proj0.05")
SUBMISSION_KEYS = {"68_landmarks_2d", "N_landmarks_3d", "7_landmarks_3d", "rotation_matrix"}
HOLD_LOCK = "import sys, time; from pathlib import Path; from dad3dlib.study import study_lock\n" \
            "with study_lock(Path(sys.argv[1])):\n    print('held', flush=True); time.sleep(600)"


def test_a_second_runner_is_refused_and_a_dead_ones_lock_blocks_nobody(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(tmp_path)], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(dad3dlib.REPO_ROOT)})
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(study.StudyBusy, match=rf"in use by another study runner \(pid {holder.pid}\)"):
            with study.study_lock(tmp_path):
                pass
    finally:
        holder.kill()  # SIGKILL: the lock file stays, naming a dead process
        holder.wait()
    assert (tmp_path / "study.lock").read_text().strip() == str(holder.pid)
    with study.study_lock(tmp_path):
        assert (tmp_path / "study.lock").read_text().strip() == str(os.getpid())


def test_study_command_on_a_held_directory_exits_2_naming_the_holder(tmp_path, monkeypatch, capsys):
    def must_not_run(*args):
        raise AssertionError("the second runner started the study")

    monkeypatch.setattr(study, "ensure_data", must_not_run)
    with study.study_lock(tmp_path):
        assert study.main(["--preset", "smoke", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: {tmp_path}: in use by another study runner (pid {os.getpid()}); wait for it to end "
                   "or stop it, then run this command again"]


def test_a_full_disk_fails_the_run_without_crashing_the_runner(tmp_path, monkeypatch, capsys):
    """Nothing can be written under the study directory: the run is failed, and each record the
    runner cannot write is one line on stderr naming it."""
    import papermill

    run = study.plan_runs("smoke", ["baseline"], [1])[0]
    replace = os.replace

    def full_disk(src, dst, *args, **kwargs):
        if str(tmp_path) in str(dst):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", full_disk)
    monkeypatch.setattr(papermill, "execute_notebook", lambda *a, **k: pytest.fail("the notebook ran"))
    result = study.execute_run(run, tmp_path, "cpu", 1)
    assert result["status"] == "failed" and "No space left on device" in result["error"]
    err = capsys.readouterr().err
    assert f"cannot write {tmp_path / 'runs' / run.name / 'error.json'}: No space left on device" in err
    assert "Traceback" not in err and not list(tmp_path.glob("runs/*/.*.tmp"))


def _study_cmd(out: Path) -> list[str]:
    return [sys.executable, "-m", "dad3dlib", "study", "--preset", "smoke", "--out", str(out)]


def _start(out: Path) -> subprocess.Popen:
    return subprocess.Popen(_study_cmd(out), cwd=dad3dlib.REPO_ROOT, start_new_session=True,
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


@pytest.fixture(scope="module")
def smoke_study(tmp_path_factory):
    """Start the smoke study. Once its first run has finished, a second runner on the directory is
    refused and Ctrl-C stops the first; run it again and kill it (and its kernels) once another
    run has finished; run it a third time, to the end."""
    out = tmp_path_factory.mktemp("smoke_study")
    proc = _start(out)
    _wait_for_finished_runs(proc, out, 1)
    second = subprocess.run(_study_cmd(out), cwd=dad3dlib.REPO_ROOT, capture_output=True, text=True, timeout=300)
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
    res = subprocess.run(_study_cmd(out), cwd=dad3dlib.REPO_ROOT, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    return out, stamps, ctrl_c


@pytest.mark.slow
def test_ctrl_c_stops_the_study_resumably(smoke_study):
    out, _, ctrl_c = smoke_study
    assert ctrl_c["returncode"] == 130, ctrl_c["stderr"][-3000:]
    assert "Traceback" not in ctrl_c["stderr"]
    assert ctrl_c["stderr"].strip().splitlines()[-1].endswith(
        f"resume with: python -m dad3dlib study --preset smoke --out {out}")
    record = ctrl_c["record"]
    assert record["interrupted"] and record["report"] is None and not record["failed"]
    assert 1 <= len(record["unfinished"]) <= 5
    assert all(p.exists() for p in ctrl_c["checkpoints"])  # the stopped notebooks' checkpoints are kept


@pytest.mark.slow
def test_a_second_runner_was_refused(smoke_study):
    _, _, ctrl_c = smoke_study
    assert ctrl_c["second"].returncode == 2
    assert f"in use by another study runner (pid {ctrl_c['pid']})" in ctrl_c["second"].stderr


@pytest.mark.slow
def test_resume_skips_finished_runs(smoke_study):
    out, stamps, _ = smoke_study
    assert stamps, "the interrupted study had finished a run"
    for path, mtime in stamps.items():
        assert path.stat().st_mtime_ns == mtime, f"{path.parent.name} was run again"


@pytest.mark.slow
def test_every_run_wrote_its_files(smoke_study):
    out, _, _ = smoke_study
    runs = json.loads((out / "study.json").read_text())["runs"]
    assert len(runs) == 6  # seven ablation names, the plan's λ1=50, λ3=0.05 variant is the baseline
    assert next(r for r in runs if r["ablation"] == "baseline")["aliases"] == ["l3d50_proj0.05"]
    for r in runs:
        d = out / "runs" / r["run"]
        metrics = json.loads((d / "metrics.json").read_text())
        for k in SIX:
            assert np.isfinite(metrics[k]), (r["run"], k)
        assert 0 <= metrics["z5_accuracy"] <= 1 and 0 <= metrics["z5_accuracy_local"] <= 1
        assert metrics["median_mm"] > 0 and metrics["nme_reprojection"] > 0
        per_sample = pd.read_csv(d / "per_sample.csv")
        assert len(per_sample) == metrics["n_samples"] > 0
        assert np.isclose(per_sample["nme_reprojection"].mean(), metrics["nme_reprojection"], rtol=1e-4)
        prov = json.loads((d / "provenance.json").read_text())
        assert prov["status"] == "finished" and prov["packages"]["torch"] and prov["wall_time_s"] > 0
        # the smoke preset's plateau schedule selects on validation NME; the record says so
        ckpt = metrics["checkpoint"]
        assert ckpt["file"] == "checkpoints/best.ckpt" and "validation NME" in ckpt["why"] and ckpt["step"] > 0
        assert metrics["precision"] in ("bf16-mixed", "32-true")
        assert (d / "ablation.ipynb").exists() and list(d.glob("**/*.ckpt"))


@pytest.mark.slow
def test_reference_predictors_are_in_the_study(smoke_study):
    out, _, _ = smoke_study
    refs = json.loads((out / "references" / "references.json").read_text())
    assert set(refs["descriptions"]) == {"constant", "shape_blind", "pose_blind", "camera_floor"}
    floor = json.loads((out / "references" / "camera_floor" / "metrics.json").read_text())
    const = json.loads((out / "references" / "constant" / "metrics.json").read_text())
    assert floor["angle_error_deg"] < 1e-3 and floor["mean_mm"] < 1e-3 and floor["z5_accuracy"] > 0.99
    assert const["angle_error_deg"] > 1 and const["mean_mm"] > 0.1
    assert 0 < floor["nme_reprojection"] < const["nme_reprojection"]
    summary = pd.read_csv(out / "summary.csv", index_col="ablation")
    assert set(summary[summary.kind == "reference"].index) == set(refs["descriptions"])


@pytest.mark.slow
def test_summary_has_every_ablation_and_metric(smoke_study):
    out, _, _ = smoke_study
    summary = pd.read_csv(out / "summary.csv", index_col="ablation")
    summary = summary[summary.kind == "run"]
    assert set(summary.index) == set(ABLATIONS)
    assert summary.loc[list(ABLATIONS), list(SIX)].notna().all().all()
    pd.testing.assert_series_equal(summary.loc["baseline", list(SIX)], summary.loc["l3d50_proj0.05", list(SIX)],
                                   check_names=False)
    assert summary.loc["baseline", "seeds"] == 1
    tested = summary.drop(index=["baseline", "l3d50_proj0.05"])
    assert (tested[[f"{k}_verdict" for k in SIX]] == "training noise unmeasured (1 seed)").all().all()
    assert (summary.loc["l3d50_proj0.05", [f"{k}_verdict" for k in SIX]] == "same run as baseline").all()


@pytest.mark.slow
def test_report_html_is_self_contained(smoke_study):
    out, _, _ = smoke_study
    html = (out / "report.html").read_text()
    for label, _ in report.METRICS.values():
        assert label in html
    for name in ABLATIONS:
        assert name in html
    assert html.count("data:image/png;base64") >= 5
    assert "Traceback" not in html  # no cell of the aggregate notebook failed
    assert "Findings" in html and "Training noise is unmeasured" in html  # one seed: no verdicts


@pytest.mark.slow
def test_report_in_headless_chromium(smoke_study):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if not chromium:
        pytest.skip("chromium not installed")
    out, _, _ = smoke_study
    shot = dad3dlib.OUTPUTS_DIR / "report_screenshot.png"
    shot.parent.mkdir(parents=True, exist_ok=True)
    shot.unlink(missing_ok=True)
    profile = out / "chromium-profile"
    subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                    "--disable-background-networking", "--disable-component-update", "--disable-sync",
                    f"--user-data-dir={profile}", "--window-size=1200,2400", f"--screenshot={shot}",
                    (out / "report.html").as_uri()], capture_output=True, timeout=120)
    import cv2
    img = cv2.imread(str(shot))
    assert img is not None, "no screenshot"
    # a rendered report: text and figures, not a blank page
    assert img.std() > 20 and (img < 128).mean() > 0.005


# --------------------------------------------------------------------------------------------
# The released layout: a test split without annotations
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def released(tmp_path_factory):
    """The smoke preset's data (24 train, 8 val, 8 test images) in the released DAD-3DHeads layout."""
    root = tmp_path_factory.mktemp("released") / "data"
    shutil.copytree(study.ensure_data(config.run_params("smoke")), root)
    return as_released(root)


def _released_params(root: Path) -> dict:
    return config.run_params("smoke", overrides={"data": {"root": str(root)}, "study": {"make_data": None}})


def _item_ids(root: Path, split: str) -> list[str]:
    return [e["item_id"] for e in json.loads((root / data.DATASET_DIR / split / f"{split}.json").read_text())]


def _check_submission(path: Path, root: Path) -> None:
    """A benchmark submission with an entry, in predict's format, for every test item."""
    submission = json.loads(path.read_text())
    assert sorted(submission) == sorted(_item_ids(root, "test"))
    assert all(set(entry) == SUBMISSION_KEYS and len(entry["68_landmarks_2d"]) == 68 for entry in submission.values())


def test_released_layout_selects_on_a_train_holdout_evaluates_on_val_and_submits_test(released, tmp_path):
    """val is out of reach while training runs (any read of it fails); the run then evaluates on
    val and writes a submission for every test item; the reference predictors' prior comes from the
    fit split."""
    from dad3dlib.evaluate import evaluate_references
    from dad3dlib.flame import load_flame_assets
    from dad3dlib.train import pose_prior, train

    params, run = _released_params(released), tmp_path / "run"
    holdout = [i for i in _item_ids(released, "train") if data.holdout_score(i) < data.HOLDOUT_FRACTION]
    val = released / data.DATASET_DIR / "val"
    val.rename(val.with_name("val.hidden"))
    try:
        checkpoint = train(study.on_device(params, "cpu", 2), run)
    finally:
        val.with_name("val.hidden").rename(val)
    assert json.loads((run / "training.json").read_text())["splits"] == {
        "fit": "train-fit", "select": "train-holdout", "evaluate": "val", "submit": "test", "holdout_fraction": 0.1,
        "fit_items": 24 - len(holdout), "select_items": len(holdout)}
    assert 0 < len(holdout) < 24 and config.load_params(run / "params.yaml")["data"]["holdout_fraction"] == 0.1

    metrics = study.finish_run(params, checkpoint, run, "cpu")
    assert metrics["split"] == "val" and metrics["n_samples"] == 8
    recorded = json.loads((run / "metrics.json").read_text())
    assert recorded["split"] == "val" and recorded["splits"]["select"] == "train-holdout"
    assert recorded["submission"] == "submission_test.json"
    _check_submission(run / "submission_test.json", released)

    refs = evaluate_references(params, tmp_path / "refs", names=("constant",))
    record = json.loads((tmp_path / "refs" / "references.json").read_text())
    fit = data.open_split(params["data"], "train-fit", load_flame_assets())
    assert record["split"] == "val" and refs["constant"]["n_samples"] == 8
    assert record["prior"] == pose_prior(fit, params["model"]["pose_prior_samples"], params["data"]["crop_size"])


@pytest.mark.slow
def test_the_smoke_study_runs_unchanged_on_the_released_layout(released, tmp_path):
    out = tmp_path / "study"
    res = subprocess.run(_study_cmd(out) + ["--data", str(released)], cwd=dad3dlib.REPO_ROOT, capture_output=True,
                         text=True, timeout=1800)
    assert res.returncode == 0, res.stderr[-3000:]
    summary = pd.read_csv(out / "summary.csv", index_col="ablation")
    assert set(summary[summary.kind == "run"].index) == set(ABLATIONS)
    assert (summary[summary.kind == "reference"].index.size == 4) and (summary.split == "val").all()
    assert json.loads((out / "references" / "references.json").read_text())["split"] == "val"
    for r in json.loads((out / "study.json").read_text())["runs"]:
        d = out / "runs" / r["run"]
        metrics = json.loads((d / "metrics.json").read_text())
        assert metrics["split"] == "val" and metrics["n_samples"] == 8, r["run"]
        assert metrics["splits"]["select"] == "train-holdout" and metrics["splits"]["fit"] == "train-fit"
        assert json.loads((d / "provenance.json").read_text())["splits"]["evaluate"] == "val"
        _check_submission(d / "submission_test.json", released)
    html = (out / "report.html").read_text()
    assert "Traceback" not in html and "evaluated on the <strong>val</strong> split" in html
    assert "val images only" in html and "submission_test.json" in html
