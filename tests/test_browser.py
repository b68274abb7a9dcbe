"""Exploring a study in JupyterLab: which study the notebooks open, the per-image results and the
live results browser (dad3dlib.browser), on a hand-written study; the notebooks as committed."""
import os

import nbformat
import pytest

from conftest import small_study
from dad3dlib import NOTEBOOKS, browser
from dad3dlib.html_report import AGGREGATE_NB
from dad3dlib.study import ABLATION_NB


def _study(path, mtime):
    path.mkdir(parents=True)
    (path / "study.json").write_text("{}")
    os.utime(path / "study.json", (mtime, mtime))
    return path


def test_the_default_study_else_the_most_recent_one_saying_which(tmp_path):
    old, new = _study(tmp_path / "smoke", 1_000), _study(tmp_path / "mine" / "a", 2_000)
    assert browser.studies(tmp_path) == [new, old]
    study, which = browser.find_study(outputs=tmp_path)
    assert study == new and which == (f"study: {new} (the most recent study under {tmp_path}; the default study "
                                      f"{tmp_path / 'cpu'} does not exist; set study_dir in the parameters cell for "
                                      "another)")
    default = _study(tmp_path / "cpu", 500)
    assert browser.find_study(outputs=tmp_path) == (default, f"study: {default} (the default study, what `make study` "
                                                             "writes)")
    assert browser.find_study(old, outputs=tmp_path) == (old, f"study: {old}")


def test_a_missing_study_is_one_line_listing_the_studies_found(tmp_path):
    with pytest.raises(browser.StudyNotFound) as e:
        browser.find_study(outputs=tmp_path)
    assert e.value._render_traceback_() == [
        f"error: no study under {tmp_path} (`make study` writes {tmp_path / 'cpu'}); run it, or set study_dir in the "
        "parameters cell to a study directory"]
    _study(tmp_path / "smoke", 1_000), _study(tmp_path / "mine" / "a", 2_000)
    with pytest.raises(browser.StudyNotFound, match=rf"^{tmp_path / 'nope'}: not a study directory \(no study.json\); "
                                                    rf"studies under {tmp_path}: mine/a, smoke; set study_dir in the "
                                                    "parameters cell$"):
        browser.find_study(tmp_path / "nope", outputs=tmp_path)


@pytest.mark.slow
def test_aggregate_notebook_on_a_missing_study_shows_one_line(tmp_path):
    """The notebook as a user runs it, with a study_dir that holds no study: its error output is the
    one line, not a traceback."""
    import papermill as pm

    with pytest.raises(pm.PapermillExecutionError):
        pm.execute_notebook(str(AGGREGATE_NB), str(tmp_path / "out.ipynb"), parameters={"study_dir": str(tmp_path)},
                            kernel_name="python3", progress_bar=False, cwd=str(NOTEBOOKS))
    errors = [o for c in nbformat.read(tmp_path / "out.ipynb", as_version=4).cells for o in c.get("outputs", [])
              if o.output_type == "error"]
    assert len(errors) == 1 and errors[0].traceback == [f"error: {tmp_path}: not a study directory (no study.json); "
                                                        f"{errors[0].traceback[0].split('; ', 1)[1]}"]
    assert "studies under" in errors[0].traceback[0] or "no study under" in errors[0].traceback[0]


def test_per_image_differences_from_the_baseline_pair_seed_and_image(tmp_path):
    """small_study: baseline s1 images a, b mean_mm 1, 3 (s2: 3, 5); no_l3d s1 2, 4 (s2 pending); the
    alias l3d50_proj0.05 shares baseline's runs."""
    per_sample = browser.report.per_sample_table(small_study(tmp_path))
    plain = browser.image_results(per_sample, "mean_mm")
    assert len(plain) == 10 and browser.value_column("mean_mm") == "mean_mm"  # 3 runs x 2 images; the alias: 2 x 2
    delta = browser.image_results(per_sample, "mean_mm", against="baseline")
    column = browser.value_column("mean_mm", "baseline")
    assert column == "Δ Mean (mm)"
    rows = sorted(zip(delta.ablation, delta.seed, delta.item_id, delta[column], delta.baseline_run))
    assert rows == [("no_l3d", 1, "a", 1.0, "baseline_s1"), ("no_l3d", 1, "b", 1.0, "baseline_s1")]


def test_selection_filters_and_the_worst_images_first(tmp_path):
    per_sample = browser.report.per_sample_table(small_study(tmp_path))
    results = browser.image_results(per_sample, "mean_mm")
    side = browser.select(results, ablations=["baseline", "no_l3d"], seeds=[1],
                          filters={"pose": "side", "quality": None})
    assert sorted(zip(side.ablation, side.item_id, side.mean_mm)) == [("baseline", "b", 3.0), ("no_l3d", "b", 4.0)]
    worst = browser.worst_first(browser.select(results, ablations=["baseline", "no_l3d"]), "mean_mm", "mean_mm")
    assert list(worst.mean_mm) == [5.0, 4.0, 3.0, 3.0, 2.0, 1.0]  # lower is better: the highest error first
    assert list(zip(worst.ablation, worst.seed, worst.item_id))[2:4] == [("baseline", 1, "b"), ("baseline", 2, "a")]


def test_results_browser_widgets_follow_the_controls(tmp_path):
    b = browser.ResultsBrowser(small_study(tmp_path), n_worst=3)
    assert b.ablations.value == ("baseline", "no_l3d")  # the alias repeats baseline's rows: not selected at first
    assert b.seeds.options == (1, 2) and b.seeds.value == (1, 2)
    assert set(b.filters) == {"pose", "quality"} and b.filters["pose"].options == ("any", "front", "side")
    assert b.message.value.startswith("<p>6 image results (2 images, 2 seed(s), 2 ablation(s)); mean Mean (mm): "
                                      "baseline 3.00, no_l3d 3.00")
    assert [label for label, _ in b.images.options] == ["baseline · seed 2 · b · Mean (mm) 5.00",
                                                        "no_l3d · seed 1 · b · Mean (mm) 4.00",
                                                        "baseline · seed 1 · b · Mean (mm) 3.00"]
    assert b.sample_html() == (f"<p>No predictions to show: {tmp_path / 'runs/baseline_s2/predictions.npz'} not found."
                               "</p>")  # the hand-written runs have none
    b.against.value = True
    assert [label for label, _ in b.images.options] == [
        "no_l3d · seed 1 · a · Mean (mm) 2.00 (Δ +1.00 from baseline)",
        "no_l3d · seed 1 · b · Mean (mm) 4.00 (Δ +1.00 from baseline)"]
    b.filters["pose"].value = "side"
    assert b.message.value.startswith("<p>1 image result (1 images")
    b.seeds.value = (2,)
    assert b.images.options == () and b.images.value is None
    assert b.sample_html() == "<p>No image matches the selection.</p>"


def test_results_browser_of_a_study_without_finished_runs_says_so(tmp_path):
    (tmp_path / "study.json").write_text('{"runs": []}')
    assert "No finished run yet" in browser.ResultsBrowser(tmp_path).message.value


@pytest.mark.parametrize("path", [ABLATION_NB, AGGREGATE_NB], ids=lambda p: p.name)
def test_notebooks_are_committed_thin_and_without_outputs(path):
    nb = nbformat.read(path, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert not [c for c in code if c.outputs or c.execution_count is not None]
    assert "parameters" in code[0].metadata.get("tags", [])
    assert nb.metadata.kernelspec.name == "python3" and nb.metadata.language_info.name == "python"
