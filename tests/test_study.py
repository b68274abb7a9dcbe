"""The study runner: planning runs, one runner per study directory, records that survive a full disk; the smoke
study end to end: data → six runs → aggregate → HTML, stopped by Ctrl-C, killed, and resumed."""
import base64
import errno
import json
import os
import re
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
from conftest import as_released, study_cmd
from dad3dlib import (cli, config, data, data_setup, devices, errors, files, finish, html_report, kernels, plan, report,
                      settings, study)
from dad3dlib.errors import ParamsError

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
    assert issubclass(study.StudyBusy, errors.InputError)

    def must_not_run(*args):
        raise AssertionError("the second runner started the study")

    monkeypatch.setattr(study, "ensure_data", must_not_run)
    with study.study_lock(tmp_path):
        assert cli.main(["study", "--preset", "smoke", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: {tmp_path}: in use by another study runner (pid {os.getpid()}); wait for it to end "
                   "or stop it, then run this command again"]


def test_concurrent_notebooks_have_kernels_of_their_own_over_ipc(tmp_path):
    """Two notebooks executed at once (as with --jobs 2): each kernel on Unix sockets of its own in
    Jupyter's runtime directory, none in the working directory, both notebooks complete."""
    from concurrent.futures import ThreadPoolExecutor

    import nbformat
    import papermill as pm

    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell("print(sum(range(10**5)))")]
    nbformat.write(nb, tmp_path / "in.ipynb")
    managers = []

    class Recording(kernels.ipc_kernel_manager()):
        async def start_kernel(self, **kw):
            managers.append(self)
            await super().start_kernel(**kw)

    def run(i):
        pm.execute_notebook(str(tmp_path / "in.ipynb"), str(tmp_path / f"out{i}.ipynb"), kernel_name="python3",
                            progress_bar=False, cwd=str(tmp_path), kernel_manager_class=Recording)
        return nbformat.read(tmp_path / f"out{i}.ipynb", as_version=4).cells[0].outputs[0]["text"]

    with ThreadPoolExecutor(2) as pool:
        assert list(pool.map(run, range(2))) == ["4999950000\n"] * 2
    assert [m.transport for m in managers] == ["ipc", "ipc"]
    assert managers[0].ip != managers[1].ip and all(Path(m.ip).parent.is_absolute() for m in managers)
    assert not [p for p in tmp_path.iterdir() if "ipc" in p.name]  # nothing in the working directory


def test_a_full_disk_fails_the_run_without_crashing_the_runner(tmp_path, monkeypatch, capsys):
    """Nothing can be written under the study directory: the run is failed, and each record the
    runner cannot write is one line on stderr naming it."""
    import papermill

    run = plan.plan_runs("smoke", ["baseline"], [1])[0]
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


HUNG_KERNEL = "import os, signal\nsignal.signal(signal.SIGINT, signal.SIG_IGN)  # deaf to an interrupt too\n" \
              "print(os.getpid(), flush=True)\nwhile True:\n    pass"


def test_a_hung_kernel_fails_its_run_after_the_cell_timeout(tmp_path, monkeypatch):
    """A cell that never ends (and ignores SIGINT) fails its run once it has run study.cell_timeout_s
    seconds: one line in error.json naming the setting, and the kernel is gone."""
    import nbformat

    nb = nbformat.v4.new_notebook(metadata=nbformat.read(study.ABLATION_NB, as_version=4).metadata)
    nb.cells = [nbformat.v4.new_code_cell("params_file = out_dir = device = num_threads = None",
                                          metadata={"tags": ["parameters"]}), nbformat.v4.new_code_cell(HUNG_KERNEL)]
    nbformat.write(nb, tmp_path / "hangs.ipynb")
    monkeypatch.setattr(study, "ABLATION_NB", tmp_path / "hangs.ipynb")
    run = plan.plan_runs("smoke", ["baseline"], [1], overrides={"study": {"cell_timeout_s": 2}})[0]
    start = time.time()
    result = study.execute_run(run, tmp_path, "cpu", 1)
    assert result["status"] == "failed" and time.time() - start < 60
    error = json.loads((tmp_path / "runs" / run.name / "error.json").read_text())
    assert error["error"] == result["error"] == ("CellTimeoutError: a cell ran longer than study.cell_timeout_s (2 s); "
                                                 "its kernel was stopped")
    executed = nbformat.read(tmp_path / "runs" / run.name / "ablation.ipynb", as_version=4)
    kernel = int(executed.cells[-1].outputs[0]["text"])
    deadline = time.time() + 10
    while time.time() < deadline and Path(f"/proc/{kernel}").exists():
        time.sleep(0.2)
    assert not Path(f"/proc/{kernel}").exists(), "the hung kernel is still running"


def test_a_bad_cell_timeout_is_one_line():
    with pytest.raises(ParamsError, match=r"^params: study.cell_timeout_s must be a positive number of seconds or null, "
                                          r"got '1h'$"):
        plan.cell_timeout({"study": {"cell_timeout_s": "1h"}})
    assert plan.cell_timeout({}) is None and plan.cell_timeout(config.run_params("smoke"))


def test_identical_configurations_run_once():
    runs = plan.plan_runs("smoke", ["baseline", "l3d50_proj0.05", "no_l3d"], seeds=[1, 2])
    assert [r.name for r in runs] == ["baseline_s1", "no_l3d_s1", "baseline_s2", "no_l3d_s2"]
    assert runs[0].aliases == ["l3d50_proj0.05"] and runs[1].aliases == []


def test_missing_real_data_dir_is_a_clear_error(tmp_path):
    p = config.run_params("smoke", "baseline", overrides=config.data_overrides(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="nowhere.*not found"):
        data_setup.ensure_data(p)


def test_generated_data_is_remade_when_its_recipe_changes_and_only_then(tmp_path, capsys):
    """The data set is the preset's recipe: made when missing, kept while the recipe is the one its
    make_data.json records (also a record written before recipes were params), remade for another."""
    tiny = {"splits": {"train": 2}, "image_sizes": [[64, 64]], "seed": 1}
    params = config.run_params("smoke", overrides={"data": {"root": str(tmp_path / "d")}})
    params["data"]["synthetic"] = tiny
    record = data_setup.ensure_data(params) / "make_data.json"
    assert "no data set there yet" in capsys.readouterr().out
    made = json.loads(record.read_text())
    assert made["recipe"] == settings.synthetic_recipe(tiny)
    stamp = record.stat().st_mtime_ns
    data_setup.ensure_data(params)
    assert record.stat().st_mtime_ns == stamp and capsys.readouterr().out == ""
    earlier = {k: v for k, v in made.items() if k != "recipe"} | {  # the form of an earlier record
        "config": {"splits": tiny["splits"], "image_sizes": tiny["image_sizes"]}, "sampling": settings.SYNTHETIC_SAMPLING}
    record.write_text(json.dumps(earlier))
    stamp = record.stat().st_mtime_ns
    data_setup.ensure_data(params)
    assert record.stat().st_mtime_ns == stamp
    other = settings.deep_merge(params, {"data": {"synthetic": {"sampling": {"yaw_max": 60.0}}}})
    data_setup.ensure_data(other)
    assert "made from another recipe" in capsys.readouterr().out
    assert json.loads(record.read_text())["recipe"]["sampling"]["yaw_max"] == 60.0


def test_study_cli_reports_bad_input(tmp_path, capsys):
    assert cli.main(["study", "--preset", "smoke", "--out", str(tmp_path), "--ablations", "baseline,bogus"]) == 2
    assert "unknown ablation 'bogus'" in capsys.readouterr().err
    assert cli.main(["study", "--preset", "smoke", "--out", str(tmp_path), "--data", str(tmp_path / "none")]) == 2
    assert "not found" in capsys.readouterr().err


def test_concurrent_jobs_come_from_the_flag_else_the_preset():
    cpu, smoke = config.run_params("cpu"), config.run_params("smoke")
    assert plan.study_jobs(cpu) == cpu["study"]["jobs"] == 2  # two 1-thread runs beat one 2-thread run
    assert plan.study_jobs(smoke) == 1 and plan.study_jobs(cpu, 3) == 3
    with pytest.raises(ParamsError, match="jobs must be a positive integer, got 0"):
        plan.study_jobs(cpu, 0)
    with pytest.raises(ParamsError, match="got 'two'"):
        plan.study_jobs({"study": {"jobs": "two"}})
    with pytest.raises(ParamsError, match="got 0"):
        plan.study_jobs({"study": {"jobs": 0}})


def test_runs_over_several_processes_run_one_at_a_time_here():
    """Two DDP runs at once would contend for this machine's devices and rendezvous ports; as cluster
    jobs each has its own allocation."""
    ddp = settings.deep_merge(config.run_params("cpu"), {"trainer": {"devices": 2, "strategy": "ddp"}})
    with pytest.raises(ParamsError, match=r"jobs 2: each run of this preset trains over 2 processes"):
        plan.study_jobs(ddp)
    assert plan.study_jobs(ddp, 1) == 1 and plan.study_jobs(ddp, 4, "slurm") == 4
    nodes = settings.deep_merge(config.run_params("smoke"), {"trainer": {"num_nodes": 2}})
    with pytest.raises(ParamsError, match="over 2 processes"):
        plan.study_jobs(nodes, 2)


def test_a_run_trained_with_other_params_is_moved_aside_not_resumed(tmp_path):
    run = plan.plan_runs("smoke", ["baseline"], seeds=[1])[0]
    run_dir = tmp_path / "runs" / run.name
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "checkpoints" / "last.ckpt").write_text("an older model")
    files.write_json(run_dir / "provenance.json", {"fingerprint": "0123abcd", "status": "running"})
    moved = plan.retire_stale(run_dir, run)
    assert moved == tmp_path / "runs" / f"{run.name}.stale-0123abcd"
    assert not run_dir.exists() and (moved / "checkpoints" / "last.ckpt").read_text() == "an older model"
    run_dir.mkdir()
    files.write_json(run_dir / "metrics.json", {"fingerprint": run.fingerprint})
    assert plan.retire_stale(run_dir, run) is None and run_dir.exists()  # same params: resumed
    files.write_json(run_dir / "metrics.json", {"fingerprint": "0123abcd"})
    assert plan.retire_stale(run_dir, run).name == f"{run.name}.stale-0123abcd-2"


def test_the_runner_keeps_a_multi_process_runs_devices_and_shares_out_its_threads():
    ddp = settings.deep_merge(config.run_params("smoke"), {"trainer": {"accelerator": "cpu", "devices": 2,
                                                                     "strategy": "ddp"}})
    cpu = devices.on_device(ddp, "cpu", num_threads=2)["trainer"]
    assert (cpu["accelerator"], cpu["devices"], cpu["num_threads"]) == ("cpu", 2, 1)
    gpu = devices.on_device(ddp, "cuda:1", num_threads=8)["trainer"]
    assert (gpu["accelerator"], gpu["devices"], gpu["num_threads"]) == ("gpu", 2, 4)
    one = devices.on_device(config.run_params("smoke"), "cuda:1", num_threads=8)["trainer"]
    assert (one["devices"], one["num_threads"]) == ([1], 8)


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
def test_progress_log_and_kernels_over_ipc(smoke_study):
    """Not attached to a terminal, the study logs lines, not bars; its kernels never warn about
    plain-text TCP (they run over Unix sockets)."""
    _, _, ctrl_c = smoke_study
    for err in (ctrl_c["stderr"], ctrl_c["final_stderr"]):
        assert "without encryption" not in err and "\r" not in err
    lines = ctrl_c["final_stderr"].splitlines()
    assert any(line.startswith("study smoke: 6 runs, ") and line.endswith("already finished") for line in lines)
    assert any(line.endswith("(6/6 runs)") and ": finished" in line for line in lines)
    assert any(": step " in line or ": starting;" in line for line in ctrl_c["stderr"].splitlines())


@pytest.mark.slow
def test_tensorboard_compares_the_runs(smoke_study):
    from tensorboard.backend.event_processing.event_multiplexer import EventMultiplexer

    out, _, _ = smoke_study
    mux = EventMultiplexer()
    mux.AddRunsFromDirectory(str(out / "runs"))
    mux.Reload()
    runs = mux.Runs()
    assert len(runs) == 6 and all(r.endswith("/tensorboard") for r in runs)
    for run, tags in runs.items():
        assert {"train/loss_step", "val/nme", "eval/nme_reprojection", "eval/angle_error_deg"} <= set(tags["scalars"])
        assert mux.SummaryMetadata(run, "_hparams_/session_start_info").plugin_data.plugin_name == "hparams"
        metrics = json.loads((out / "runs" / run.split("/")[0] / "metrics.json").read_text())
        final = mux.Scalars(run, "eval/angle_error_deg")[-1]
        assert final.value == pytest.approx(metrics["angle_error_deg"])
        assert final.step == max(e.step for e in mux.Scalars(run, "train/loss_step")) > 0  # at the training's end


@pytest.mark.slow
def test_reference_predictors_are_in_the_study(smoke_study):
    out, _, _ = smoke_study
    refs = json.loads((out / "references" / "references.json").read_text())
    assert set(refs["descriptions"]) == {"constant", "shape_blind", "pose_blind", "camera_floor"}
    floor, blind, const = (json.loads((out / "references" / n / "metrics.json").read_text())
                           for n in ("camera_floor", "shape_blind", "constant"))
    # the generated images are perspective: the pose a crop shows is off by its viewing ray's angle
    assert floor["angle_error_deg"] == pytest.approx(blind["angle_error_deg"])
    assert 0 < floor["angle_error_deg"] < const["angle_error_deg"]
    assert const["mean_mm"] == pytest.approx(blind["mean_mm"]) and floor["mean_mm"] < 1e-3 < const["mean_mm"]
    assert 0 < floor["nme_reprojection"] < blind["nme_reprojection"] < const["nme_reprojection"]
    assert floor["z5_accuracy"] > const["z5_accuracy"]
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
    for m in report.METRICS.values():
        assert m.label in html
    for name in ABLATIONS:
        assert name in html
    assert html.count("data:image/png;base64") >= 5
    assert "Traceback" not in html  # no cell of the aggregate notebook failed
    assert "Findings" in html and "Training noise is unmeasured" in html  # one seed: no verdicts
    assert not re.findall(r"<(?:script|link)[^>]+(?:src|href)=[\"'](?:https?:)?//", html)  # nothing from a network


def test_the_report_page_fetches_nothing_from_a_network(tmp_path):
    """nbconvert's own template loads require.js and MathJax from a CDN (a report read offline then
    waits on them); the report's template leaves them out and keeps the outputs."""
    import nbformat

    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("x", outputs=[nbformat.v4.new_output(
        "display_data", {"text/html": "<table><tr><td>a table</td></tr></table>"})])])
    nbformat.write(nb, tmp_path / "nb.ipynb")
    html = html_report.report_html(tmp_path / "nb.ipynb")
    assert "a table" in html and ">x<" not in html  # the output, not the input
    assert not re.findall(r"<(?:script|link)[^>]+(?:src|href)=[\"'](?:https?:)?//", html), \
        re.findall(r"<(?:script|link)[^>]+>", html)


def _chromium(page: str, shot: Path, profile: Path, height: int) -> str:
    """Screenshot ``page`` (a URL) in headless Chromium, 1200 px wide; returns its log (stderr), in
    which each console message is a ':CONSOLE' line. Skips when Chromium is not installed."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if not chromium:
        pytest.skip("chromium not installed")
    shot.parent.mkdir(parents=True, exist_ok=True)
    shot.unlink(missing_ok=True)
    res = subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                          "--disable-background-networking", "--disable-component-update", "--disable-sync",
                          f"--user-data-dir={profile}", f"--window-size=1200,{height}", "--force-device-scale-factor=1",
                          "--virtual-time-budget=10000", "--enable-logging=stderr", "--v=0", f"--screenshot={shot}",
                          page],
                         capture_output=True, text=True, timeout=120)
    return res.stderr


@pytest.mark.slow
def test_report_in_headless_chromium(smoke_study):
    out, _, _ = smoke_study
    shot = dad3dlib.OUTPUTS_DIR / "report_screenshot.png"
    _chromium((out / "report.html").as_uri(), shot, out / "chromium-profile", 2400)
    import cv2
    img = cv2.imread(str(shot))
    assert img is not None, "no screenshot"
    # a rendered report: text and figures, not a blank page
    assert img.std() > 20 and (img < 128).mean() > 0.005


EXPLORER_BACKGROUND = (247, 241, 236)  # BGR of explorer.js's BACKGROUND, around each 3D view's head


@pytest.mark.slow
def test_explorer_in_headless_chromium_draws_and_rotates(smoke_study):
    """The whole report (tall enough to hold it) at yaw 0 and 60 (set by the URL hash): no console
    message, and both 3D views show a head whose pixels change with the rotation."""
    import cv2

    out, _, _ = smoke_study
    shots = {}
    for yaw in (0, 60):
        shot = out / f"explorer_yaw{yaw}.png"
        log = _chromium(f"{(out / 'report.html').as_uri()}#explorer-yaw={yaw}", shot, out / "chromium-profile", 9000)
        assert not [line for line in log.splitlines() if ":CONSOLE" in line], log[-3000:]
        shots[yaw] = cv2.imread(str(shot))
        assert shots[yaw] is not None, "no screenshot"
    background = (shots[0] == EXPLORER_BACKGROUND).all(-1)
    # the views' rows and columns hold that colour by the hundred; a stray anti-aliased pixel of
    # that colour in a plot elsewhere on the page does not count
    rows, cols = np.nonzero(background.sum(1) >= 50)[0], np.nonzero(background.sum(0) >= 50)[0]
    assert len(rows) and len(cols), "no explorer view in the screenshot"
    y0, y1, x0, x1 = rows.min(), rows.max() + 1, cols.min(), cols.max() + 1
    assert 400 < x1 - x0 < 700 and 200 < y1 - y0 < 300, "the two 3D views are not where expected"
    views = {yaw: im[y0:y1, x0:x1] for yaw, im in shots.items()}
    half = (x1 - x0) // 2
    for yaw, view in views.items():
        for name, panel in (("prediction", view[:, :half]), ("ground truth", view[:, half:])):
            drawn = (panel != EXPLORER_BACKGROUND).any(-1).mean()
            assert drawn > 0.1, f"yaw {yaw}: the {name} view is blank ({drawn:.3f} drawn)"
    changed = (np.abs(views[0].astype(int) - views[60].astype(int)).max(-1) > 30).mean()
    assert changed > 0.05, f"rotating by 60 degrees changed {changed:.3f} of the views' pixels"


@pytest.mark.slow
def test_explorer_fragment_is_compact(smoke_study):
    """The explorer in report.html holds each mesh once as int16 (aliases share their run's): its size
    is bounded by that encoding. It does not grow with seeds or test images (first seed, first 8
    samples), so the default study (the same six distinct runs) adds as much as the smoke study, and
    the report stays under 15 MB."""
    import math
    import re

    out, _, _ = smoke_study
    html = (out / "report.html").read_text()
    fragment = re.search(r'<div class="dad3d-explorer".*?</script>\n</div>', html, re.S).group(0)
    data = json.loads(re.search(r'<script[^>]*class="x-data"[^>]*>(.*?)</script>', fragment, re.S).group(1))
    n_runs = len({r["run"] for r in json.loads((out / "study.json").read_text())["runs"]})
    assert len(data["samples"]) == 8 and len(data["predictions"]) == n_runs == 6
    assert data["ablations"] == list(dict.fromkeys(report.run_table(out).ablation))
    faces = np.frombuffer(base64.b64decode(data["faces"]["data"]), data["faces"]["dtype"])
    b64 = lambda n_bytes: 4 * math.ceil(n_bytes / 3)  # noqa: E731
    meshes = len(data["samples"]) * (1 + n_runs) * b64(6 * (int(faces.max()) + 1))
    budget = meshes + b64(faces.nbytes) + len(data["samples"]) * (1 + n_runs) * 2500 \
        + len(data["samples"]) * 16_000 + 40_000  # landmarks and captions; JPEGs; viewer and markup
    assert len(fragment) <= budget
    assert len(html) < 15e6


# --------------------------------------------------------------------------------------------
# The released layout: a test split without annotations
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def released(tmp_path_factory):
    """The smoke preset's data (24 train, 8 val, 8 test images) in the released DAD-3DHeads layout."""
    root = tmp_path_factory.mktemp("released") / "data"
    shutil.copytree(data_setup.ensure_data(config.run_params("smoke")), root)
    return as_released(root)


def _released_params(root: Path) -> dict:
    return config.run_params("smoke", overrides=config.data_overrides(root))


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
    from dad3dlib.references import evaluate_references
    from dad3dlib.flame import load_flame_assets
    from dad3dlib.synthetic_head import default_flame_dir
    from dad3dlib.model import pose_prior
    from dad3dlib.train import train

    params, run = _released_params(released), tmp_path / "run"
    holdout = [i for i in _item_ids(released, "train") if data.holdout_score(i) < settings.DataSettings.holdout_fraction]
    val = released / data.DATASET_DIR / "val"
    val.rename(val.with_name("val.hidden"))
    try:
        checkpoint = train(devices.on_device(params, "cpu", 2), run)
    finally:
        val.with_name("val.hidden").rename(val)
    assert json.loads((run / "training.json").read_text())["splits"] == {
        "fit": "train-fit", "select": "train-holdout", "evaluate": "val", "submit": "test", "holdout_fraction": 0.1,
        "fit_items": 24 - len(holdout), "select_items": len(holdout)}
    assert 0 < len(holdout) < 24 and config.load_params(run / "params.yaml")["data"]["holdout_fraction"] == 0.1

    metrics = finish.finish_run(params, checkpoint, run, "cpu")
    assert metrics["split"] == "val" and metrics["n_samples"] == 8
    recorded = json.loads((run / "metrics.json").read_text())
    assert recorded["split"] == "val" and recorded["splits"]["select"] == "train-holdout"
    assert recorded["submission"] == "submission_test.json"
    _check_submission(run / "submission_test.json", released)

    refs = evaluate_references(params, tmp_path / "refs", names=("constant",))
    record = json.loads((tmp_path / "refs" / "references.json").read_text())
    fit = data.open_split(settings.DataSettings.parse(params["data"]), "train-fit", load_flame_assets(default_flame_dir()))
    assert record["split"] == "val" and refs["constant"]["n_samples"] == 8
    assert record["prior"] == pose_prior(fit, params["model"]["pose_prior_samples"], params["data"]["crop_size"])


@pytest.mark.slow
def test_the_smoke_study_runs_unchanged_on_the_released_layout(released, tmp_path):
    out = tmp_path / "study"
    res = subprocess.run(study_cmd(out) + ["--data", str(released)], cwd=dad3dlib.REPO_ROOT, capture_output=True,
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
