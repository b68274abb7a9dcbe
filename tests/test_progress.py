"""Live progress: the run's progress record and the study's display of it."""
from __future__ import annotations

import io

import pytest

from dad3dlib.progress import StudyProgress, describe, format_duration, read_progress, write_progress


def test_progress_record_and_its_eta(tmp_path, monkeypatch):
    monkeypatch.setattr("dad3dlib.progress.time.time", lambda: 1000.0)
    write_progress(tmp_path, step=30, total=90, loss=1.5, started=940.0, start_step=10)  # 20 steps in 60 s
    r = read_progress(tmp_path)
    assert (r["step"], r["total"], r["loss"], r["elapsed_s"]) == (30, 90, 1.5, 60.0)
    assert r["eta_s"] == pytest.approx(180.0)  # 60 steps left at 3 s/step: this process's pace only
    assert describe("baseline_s1", r) == "baseline_s1: step 30/90 (33%), loss 1.5, ETA 3m00s"
    write_progress(tmp_path, step=90, total=90, loss=1.0, started=940.0)
    assert describe("baseline_s1", read_progress(tmp_path)) == "baseline_s1: trained (90 steps), evaluating"
    assert read_progress(tmp_path / "missing") is None and describe("x", None) == "x: starting"
    (tmp_path / "progress.json").write_text("{half")
    assert read_progress(tmp_path) is None


def test_format_duration():
    assert [format_duration(s) for s in (None, 5, 95, 3725)] == ["?", "5s", "1m35s", "1h02m"]


def test_log_lines_when_not_attached_to_a_terminal(tmp_path, monkeypatch):
    clock = [100.0]
    monkeypatch.setattr("dad3dlib.progress.time.time", lambda: clock[0])
    out = io.StringIO()
    shown = StudyProgress("study cpu", total=4, done=1, stream=out, log_every_s=60)
    a, b = tmp_path / "a", tmp_path / "b"
    write_progress(a, step=50, total=100, loss=2.0, started=0.0)  # half-way after 100 s
    shown.update({"a": a, "b": b})
    clock[0] = 130.0
    shown.update({"a": a, "b": b})  # within log_every_s: nothing new
    clock[0] = 200.0
    write_progress(a, step=100, total=100, loss=1.0, started=0.0)
    shown.update({"a": a, "b": b})
    shown.finished({"run": "a", "status": "finished"})
    shown.close()
    lines = out.getvalue().splitlines()
    assert lines[0] == "study cpu: 4 runs, 1 already finished"
    assert lines[1] == "  a: step 50/100 (50%), loss 2, ETA 1m40s; study 1.5/4 runs, ETA ?"  # no time yet
    assert lines[2] == "  b: starting; study 1.5/4 runs, ETA ?"
    # 1 run's worth done in this invocation's 100 s, 2 left
    assert lines[3] == "  a: trained (100 steps), evaluating; study 2.0/4 runs, ETA 3m20s"
    assert lines[4] == "  b: starting; study 2.0/4 runs, ETA 3m20s"
    assert lines[5] == "a: finished (2/4 runs)"
    assert "\r" not in out.getvalue()  # no bars in a log


def test_bars_in_a_terminal(tmp_path):
    out = io.StringIO()
    shown = StudyProgress("study cpu", total=2, stream=out, tty=True)
    write_progress(tmp_path / "a", step=3, total=12, loss=0.5, started=0.0)
    shown.update({"a": tmp_path / "a"})
    assert shown.bar.n == pytest.approx(0.25)
    assert "a:" in out.getvalue() and "3/12" in out.getvalue()
    shown.finished({"run": "a", "status": "finished"})
    shown.close()
    assert shown.bar.n == 1


def test_a_new_runs_bar_takes_the_line_a_finished_one_freed(tmp_path):
    shown = StudyProgress("study cpu", total=3, stream=io.StringIO(), tty=True)
    for name in ("a", "b", "c"):
        write_progress(tmp_path / name, step=1, total=10, loss=1.0, started=0.0)
    shown.update({"a": tmp_path / "a", "b": tmp_path / "b"})
    shown.finished({"run": "a", "status": "finished"})
    shown.update({"b": tmp_path / "b", "c": tmp_path / "c"})
    assert shown._lines == {"b": 2, "c": 1}  # not two bars on line 2
    shown.close()
