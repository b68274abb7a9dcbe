"""Report tables, Findings and figures from fabricated study directories (no training), mesh renders in
image space, and the figures' caches."""
import json
import re

import numpy as np
import pandas as pd
import pytest

from scipy.stats import t as student_t

from dad3dlib import report, stats

N = 60
BASE = {"median_mm": 2.0, "mean_mm": 2.6, "std_mm": 2.4, "angle_error_deg": 11.6, "nme_reprojection": 4.3,
        "z5_accuracy": 0.91, "z5_accuracy_local": 0.92}
# ablation -> {metric: per-seed shift from the baseline's run of the same seed}
EFFECTS = {
    "no_lproj": {"angle_error_deg": [19.6, 20.3, 20.1]},           # +20°: the constant predictor's 31.6
    "good": {"mean_mm": [-0.5, -0.48, -0.52], "z5_accuracy": [-0.05, -0.049, -0.051]},
    "noisy": {"mean_mm": [0.8, -0.7, 0.2]},                        # training noise, no effect
}
REFERENCES = {"constant": ("The mean head at the train split's pose prior.", {"angle_error_deg": 31.6}),
              "camera_floor": ("The ground-truth mesh under the best weak-perspective fit.",
                               {"angle_error_deg": 0.0, "nme_reprojection": 1.0})}


def write_study(root, seeds=(1, 2, 3), references=True, split=None):
    """study.json, runs/<run>/{metrics.json, per_sample.csv} (l3d50_proj0.05 an alias of the
    baseline), references/ with references.json, as the study and the reference evaluation write them
    (``split``: the evaluation split they record; None: none, as records from before it was recorded)."""
    rng = np.random.default_rng(0)
    items = [f"test_{i:06d}" for i in range(N)]
    image = {k: v * rng.uniform(0.5, 1.5, N) for k, v in BASE.items()}  # per-image difficulty
    runs = []
    for s in seeds:
        seed_noise = {k: v * rng.normal(0, 0.02) for k, v in BASE.items()}
        base = {k: image[k] + seed_noise[k] + rng.normal(0, 0.01 * BASE[k], N) for k in BASE}
        for abl in ("baseline", *EFFECTS):
            values = {k: v + np.asarray(EFFECTS.get(abl, {}).get(k, [0] * len(seeds)))[s - 1]
                      for k, v in base.items()}
            _write_run(root / "runs" / f"{abl}_s{s}", items, values, split)
            runs.append({"run": f"{abl}_s{s}", "ablation": abl, "seed": s,
                         "aliases": ["l3d50_proj0.05"] if abl == "baseline" else []})
    (root / "study.json").write_text(json.dumps({"preset": "fake", "seeds": len(seeds), "runs": runs}))
    if references:
        for name, (_, shift) in REFERENCES.items():
            _write_run(root / "references" / name, items, {k: np.full(N, shift.get(k, 9.0)) for k in BASE}, split)
        record = {"descriptions": {name: text for name, (text, _) in REFERENCES.items()}, "prior": {}}
        (root / "references" / "references.json").write_text(json.dumps(record | ({"split": split} if split else {})))
    return root


def _write_run(d, items, values, split=None):
    d.mkdir(parents=True)
    df = pd.DataFrame({"item_id": items, "pose": "front", **values})
    df.to_csv(d / "per_sample.csv", index=False)
    (d / "metrics.json").write_text(json.dumps({k: float(df[k].mean()) for k in values} | {"n_samples": len(df)}
                                               | ({"split": split} if split else {})))


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    root = write_study(tmp_path_factory.mktemp("study"))
    diffs = report.baseline_differences(report.per_sample_table(root))
    return root, diffs.set_index(["ablation", "metric"])


def test_known_effects_are_found_and_training_noise_is_not(study):
    _, d = study
    angle = d.loc[("no_lproj", "angle_error_deg")]
    shifts = EFFECTS["no_lproj"]["angle_error_deg"]
    # the fabricated differences are the same on every image: the seed-level t interval alone
    half = student_t.ppf(0.975, 2) * np.std(shifts, ddof=1) / np.sqrt(3)
    assert angle.verdict == "worse" and np.isclose(angle.lo, 20.0 - half) and np.isclose(angle.hi, 20.0 + half)
    assert angle.lo < min(shifts) and angle.hi > max(shifts)  # t(0.975, 2) = 4.30 reaches past the seeds
    assert np.isclose(angle.delta_sd, np.std(shifts, ddof=1)) and np.isclose(angle.img_lo, 20.0)
    assert abs(angle.delta - 20.0) < 1e-9 and angle.p_holm < 0.05 and angle.seeds == 3 and angle.n_items == N
    assert d.loc[("good", "mean_mm")].verdict == "better"
    assert d.loc[("good", "z5_accuracy")].verdict == "worse"  # higher is better
    noisy = d.loc[("noisy", "mean_mm")]
    assert noisy.verdict == "not distinguishable" and noisy.lo < 0 < noisy.hi
    assert d.loc[("no_lproj", "mean_mm")].verdict == "not distinguishable"


def test_alias_is_the_baseline_and_not_tested(study):
    _, d = study
    alias = d.loc["l3d50_proj0.05"]
    assert (alias.verdict == "same run as baseline").all() and (alias.delta == 0).all()
    assert alias.p_holm.isna().all()
    tested = d.p_holm.notna().sum()
    assert tested == 3 * len(report.METRICS)  # no_lproj, good, noisy; Holm over those only
    np.testing.assert_allclose(d.p_holm.dropna(), stats.holm(d.p.where(d.p_holm.notna()).to_numpy())[d.p_holm.notna()])


def test_summary_csv_has_spread_differences_and_reference_rows(study):
    root, d = study
    summary = pd.read_csv(report.write_summary(root), index_col="ablation")
    assert list(summary.index) == ["baseline", "l3d50_proj0.05", "no_lproj", "good", "noisy", "constant",
                                   "camera_floor"]
    assert (summary.kind == ["run"] * 5 + ["reference"] * 2).all()
    assert summary.loc["constant", "description"] == REFERENCES["constant"][0]
    assert np.isclose(summary.loc["constant", "angle_error_deg"], 31.6) and np.isnan(summary.loc["constant", "seeds"])
    runs = report.run_table(root)
    seed_values = runs[runs.ablation == "noisy"].mean_mm
    assert summary.loc["noisy", "seeds"] == 3
    assert np.isclose(summary.loc["noisy", "mean_mm_sd"], seed_values.std())
    assert np.isclose(summary.loc["noisy", "mean_mm_min"], seed_values.min())
    assert np.isclose(summary.loc["noisy", "mean_mm_max"], seed_values.max())
    for stat in ("delta", "delta_sd", "lo", "hi", "p", "p_holm", "img_lo", "img_hi"):
        assert np.isclose(summary.loc["no_lproj", f"angle_error_deg_{stat}"], d.loc[("no_lproj", "angle_error_deg"), stat])
    assert summary.loc["no_lproj", "angle_error_deg_verdict"] == "worse"
    assert summary.loc[["constant", "camera_floor"], "angle_error_deg_verdict"].isna().all()
    table = report.format_summary(report.summary_table(runs, report.reference_table(root)))
    assert table.loc["constant", "kind"] == "reference" and table.loc["constant", "description"]
    assert re.fullmatch(r"\d+\.\d\d \(\d+\.\d\d–\d+\.\d\d\)", table.loc["noisy", "Mean (mm)"])


def test_findings_name_effects_references_and_not_aliases(study):
    root, d = study
    text = report.findings(report.run_table(root), d.reset_index(), report.reference_table(root))
    lines = text.splitlines()
    assert "3 seeds" in lines[0] and "Holm" in lines[0]
    no_lproj = next(line for line in lines if "**no_lproj**" in line)
    assert "Angle error (°) +20.00 [+" in no_lproj and "worse" in no_lproj
    assert "equals `constant`'s (31.60)" in no_lproj and "camera_floor" not in no_lproj
    assert "Mean (mm)" not in no_lproj  # not distinguishable: not a finding
    good = next(line for line in lines if "**good**" in line)
    assert "Mean (mm) -0.50 [" in good and "better" in good and "worse" in good
    assert "- **noisy**: no metric distinguishable from training noise." in lines
    assert "l3d50_proj0.05" not in text


def test_one_seed_measures_no_training_noise(tmp_path):
    root = write_study(tmp_path, seeds=(1,))
    d = report.baseline_differences(report.per_sample_table(root))
    tested = d[~d.alias]
    assert (tested.verdict == "training noise unmeasured (1 seed)").all()
    assert tested[["lo", "hi", "p", "p_holm", "delta_sd"]].isna().all().all()
    assert tested[["img_lo", "img_hi"]].notna().all().all()  # the test images still give an interval
    assert np.isclose(d.set_index(["ablation", "metric"]).loc[("no_lproj", "angle_error_deg"), "delta"], 19.6)
    text = report.findings(report.run_table(root), d, report.reference_table(root))
    assert text.startswith("Training noise is unmeasured")
    assert "not yet distinguishable from training noise" in text and "p=" not in text and "[" not in text
    assert "equals `constant`'s" in text and "l3d50_proj0.05" not in text
    assert "Median (mm)" not in text  # unchanged metrics are not listed
    cells = report.format_differences(d)
    assert cells.loc["no_lproj", "Angle error (°)"] == ("+19.60 training noise unmeasured (1 seed); "
                                                        "test images only [+19.60, +19.60]")
    assert cells.loc["l3d50_proj0.05", "Angle error (°)"] == "same run as baseline"
    summary = pd.read_csv(report.write_summary(root), index_col="ablation")
    assert summary.loc["no_lproj", "angle_error_deg_verdict"] == "training noise unmeasured (1 seed)"
    assert summary.loc["no_lproj", ["angle_error_deg_p", "angle_error_deg_p_holm"]].isna().all()


def test_the_evaluation_split_is_named_in_summary_and_report(tmp_path):
    """A study evaluated on val (the released test split has no annotations) says val, not test:
    summary.csv's split column, the differences' image-only interval, the Findings' method sentence;
    records from before the split was recorded were evaluated on test."""
    root = write_study(tmp_path / "val", seeds=(1, 2), split="val")
    summary = pd.read_csv(report.write_summary(root), index_col="ablation")
    assert (summary.split == "val").all() and report.evaluation_split(root) == "val"
    assert summary.loc["constant", "description"] == REFERENCES["constant"][0]
    d = report.baseline_differences(report.per_sample_table(root))
    assert "; val images only [" in report.format_differences(d, "val").loc["no_lproj", "Angle error (°)"]
    text = report.findings(report.run_table(root), d, report.reference_table(root), split="val")
    assert "paired standard error over the val images" in text and "test" not in text
    assert report.splits_note(root) == "Runs and reference predictors are evaluated on the **val** split."
    legacy = write_study(tmp_path / "legacy", seeds=(1,))
    assert report.evaluation_split(legacy) == "test"
    assert (pd.read_csv(report.write_summary(legacy)).split == "test").all()


def test_equals_reference():
    assert report.equals_reference([31.0, 32.0, 31.4], 31.7)      # inside the seed interval
    assert report.equals_reference([31.0, 32.0, 31.4], 32.3)      # t interval reaches past the largest seed
    assert not report.equals_reference([31.0, 32.0, 31.4], 33.0)
    assert report.equals_reference([31.0], 31.5)                  # within 2 %
    assert not report.equals_reference([31.0], 30.0)              # one seed: tolerance only
    assert not report.equals_reference([31.0], 30.0, se_img=5.0)
    assert not report.equals_reference([20.0, 20.1, 19.9], 31.6)
    assert not report.equals_reference([20.0, 20.1, 19.9], 21.0)  # seeds agree: 20 ± 0.25
    assert not report.equals_reference([20.0, 20.1, 19.9], 21.0, se_img=0.3)  # ± hypot(0.25, 1.96·0.3) = 0.64
    assert report.equals_reference([20.0, 20.1, 19.9], 21.0, se_img=0.6)  # the test images' SE widens it
    assert not report.equals_reference([np.nan], 1.0)


def test_findings_compare_references_with_the_test_image_se(study):
    """no_lproj's angle error is 31.55 over seeds 31.27-31.88 (seed-level half-width 0.77); the test
    images' SE of its mean (0.44, margin 0.86) widens the interval to ± 1.16, which reaches a
    reference at 32.55."""
    root, d = study
    near = pd.DataFrame({"angle_error_deg": [32.55]}, index=["near"])
    runs = report.run_table(root)
    without = report.findings(runs, d.reset_index(), near)
    with_images = report.findings(runs, d.reset_index(), near, per_sample=report.per_sample_table(root))
    assert "equals `near`'s" not in without and "equals `near`'s (32.55)" in with_images


def test_reference_table_absent_and_bad_files(tmp_path):
    assert report.reference_table(tmp_path).empty
    root = write_study(tmp_path / "s", seeds=(1,))
    (root / "references" / "references.json").write_text("{not json")
    (root / "references" / "constant" / "metrics.json").write_text("[1, 2]")
    with pytest.warns(UserWarning) as caught:
        refs = report.reference_table(root)
    messages = [str(w.message) for w in caught]
    assert any(m.startswith(str(root / "references" / "references.json") + ": not readable JSON") for m in messages)
    assert any(m.startswith(str(root / "references" / "constant" / "metrics.json") + ": expected a JSON object")
               for m in messages)
    assert list(refs.index) == ["camera_floor"] and refs.loc["camera_floor", "description"] == ""


RED, BLUE = (1.0, 0.0, 0.0), (0.0, 0.0, 1.0)


def _two_triangles(z_red: float, z_blue: float, red_first: bool):
    """A red triangle (left) and a blue one (right), overlapping around pixel (50, 40) of 100x80."""
    red = np.array([[10, 10, z_red], [60, 40, z_red], [10, 70, z_red]], np.float32)
    blue = np.array([[90, 10, z_blue], [40, 40, z_blue], [90, 70, z_blue]], np.float32)
    tris, cols = ([red, blue], [RED, BLUE]) if red_first else ([blue, red], [BLUE, RED])
    return np.concatenate(tris), np.arange(6).reshape(2, 3), np.repeat(np.array(cols, np.float32), 3, axis=0)


@pytest.mark.parametrize("red_first", [True, False])
@pytest.mark.parametrize("z_red, z_blue", [(-30.0, 15.0), (15.0, -30.0)])
def test_overlay_mesh_near_triangle_wins_and_the_depth_extremes_are_drawn(z_red, z_blue, red_first):
    """Both triangles lie at the nearest/farthest depth of the mesh; the overlap shows the nearer."""
    v, f, colors = _two_triangles(z_red, z_blue, red_first)
    out = report.overlay_mesh(np.zeros((80, 100, 3), np.uint8), v, f, colors, alpha=1.0).astype(int)
    near_is_red = z_red < z_blue
    r, _, b = out[40, 50]                          # inside both triangles
    assert (r > b + 40) if near_is_red else (b > r + 40)
    assert out[40, 20, 0] > 40 and out[40, 80, 2] > 40   # each triangle's own part is drawn


@pytest.mark.parametrize("red_first", [True, False])
def test_overlay_mesh_depth_order_inside_a_wider_range(red_first):
    """The overlap shows the nearer triangle when neither sits at an end of the depth range."""
    v, f, colors = _two_triangles(20.0, 40.0, red_first)
    extent = np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 60], [1, 0, 60], [0, 1, 60]], np.float32)
    v, f = np.concatenate([v, extent]), np.concatenate([f, [[6, 7, 8], [9, 10, 11]]])
    colors = np.concatenate([colors, np.zeros((6, 3), np.float32)])
    out = report.overlay_mesh(np.zeros((80, 100, 3), np.uint8), v, f, colors, alpha=1.0).astype(int)
    assert out[40, 50, 0] > out[40, 50, 2] + 40


@pytest.mark.parametrize("z", [-30.0, 30.0])
def test_overlay_mesh_lights_a_surface_facing_the_viewer_anywhere(z):
    """Orthographic view: a camera-facing grey triangle gets ambient + diffuse = its full colour,
    wherever it lies in the image and whatever the sign of its depth."""
    v = np.array([[60, 40, z], [95, 40, z], [95, 75, z], [5, 5, 0], [6, 5, 0], [5, 6, 0]], np.float32)
    out = report.overlay_mesh(np.zeros((80, 100, 3), np.uint8), v, np.array([[0, 1, 2], [3, 4, 5]]),
                              np.full((6, 3), 0.5, np.float32), alpha=1.0)
    assert 125 <= out[50, 85, 0] <= 165


@pytest.fixture(scope="module")
def head():
    """The synthetic FLAME head: layer, faces, colours (face subset red, the rest blue)."""
    from dad3dlib.flame import FlameLayer, load_flame_assets
    from dad3dlib.synthetic_head import default_flame_dir

    layer = FlameLayer(load_flame_assets(default_flame_dir())).eval()
    colors = np.tile(np.array(BLUE, np.float32), (layer.num_vertices, 1))
    colors[layer.subset("face").numpy()] = RED
    return layer, layer.faces.numpy(), colors


def test_render_head_from_the_front_shows_the_face(head):
    layer, faces, colors = head
    img = report.render_head(layer.v_template.numpy(), faces, colors, yaw_deg=0, size=128).astype(int)
    r, _, b = img[64, 64]
    assert r > b + 40
    back = report.render_head(layer.v_template.numpy(), faces, colors, yaw_deg=180, size=128).astype(int)
    assert back[64, 64, 2] > back[64, 64, 0] + 40   # seen from behind: the back of the head


def test_predicted_mesh_overlay_from_the_front_shows_the_face(head):
    import torch

    from dad3dlib.flame import matrix_to_rot6d, pack_3dmm

    layer, faces, colors = head
    s, crop = 5.0, 128
    R = torch.diag(torch.tensor([1.0, -1.0, -1.0]))    # frontal: model (y up, z out of the face) -> image
    centre = (layer.v_template.mean(0) + torch.tensor([0, 0, 0.05])) @ R.T
    params = pack_3dmm(torch.zeros(1, 300), torch.zeros(1, 100), torch.zeros(1, 3), matrix_to_rot6d(R)[None],
                       -s * centre[None], torch.tensor([[s - 1.0]]))[0].numpy()
    pv = report.predicted_mesh_image(layer, params, np.array([[1.0, 0, 0], [0, 1.0, 0]]), crop)
    assert np.abs(pv[:, :2].mean(0) - crop / 2).max() < 1e-3
    assert pv[layer.subset("face").numpy(), 2].mean() < pv[:, 2].mean()   # the face is nearer
    img = report.overlay_mesh(np.zeros((crop, crop, 3), np.uint8), pv, faces, colors, alpha=1.0).astype(int)
    r, _, b = img[crop // 2, crop // 2]
    assert r > b + 40


def test_training_curves_name_each_loss_term_by_its_label():
    from dad3dlib.config import LOSS_TERMS

    curves = pd.DataFrame([{"ablation": "a", "step": s, "epoch": 0, "metric": m, "value": 1.0 + s}
                           for m in ("train/l3d_step", "val/nme") for s in range(3)])
    fig = report.plot_training_curves(curves)
    titles = [ax.get_title() for ax in fig.axes if ax.get_title()]
    assert titles == [f"{LOSS_TERMS['l3d'].label} (train/l3d_step)", "val/nme"]
# --------------------------------------------------------------------------------------------
# Tables and figures of a hand-made study: known answers
# --------------------------------------------------------------------------------------------
def _small_study(root):
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


def test_run_table_has_a_row_per_ablation_and_seed_with_status_and_split(tmp_path):
    runs = report.run_table(_small_study(tmp_path)).set_index(["ablation", "seed"])
    assert list(runs.index) == [("baseline", 1), ("l3d50_proj0.05", 1), ("baseline", 2), ("l3d50_proj0.05", 2),
                                ("no_l3d", 1), ("no_l3d", 2), ("no_2d", 1)]
    assert list(runs.status) == ["finished"] * 5 + ["pending", "failed"]
    assert list(runs.split[:5]) == ["val"] * 5 and runs.split[5:].isna().all()
    assert runs.loc[("l3d50_proj0.05", 2), "mean_mm"] == 4.0 and runs.loc[("l3d50_proj0.05", 2), "run"] == "baseline_s2"
    assert np.isnan(runs.loc[("no_l3d", 2), "mean_mm"]) and np.isnan(runs.loc[("baseline", 1), "median_mm"])


def test_summary_table_is_the_mean_and_spread_over_finished_seeds_then_the_references(tmp_path):
    root = _small_study(tmp_path)
    summary = report.summary_table(report.run_table(root), report.reference_table(root))
    assert list(summary.index) == ["baseline", "l3d50_proj0.05", "no_l3d", "constant"]  # no_2d: nothing finished
    assert list(summary.kind) == ["run"] * 3 + ["reference"] and list(summary.split) == ["val"] * 4
    base = summary.loc["baseline"]
    assert (base.seeds, base.mean_mm, base.mean_mm_min, base.mean_mm_max) == (2, 3.0, 2.0, 4.0)
    assert np.isclose(base.mean_mm_sd, np.sqrt(2)) and np.isclose(base.angle_error_deg, 15.0)
    assert summary.loc["l3d50_proj0.05", "mean_mm"] == 3.0
    assert summary.loc["no_l3d", "seeds"] == 1 and np.isnan(summary.loc["no_l3d", "mean_mm_sd"])
    assert summary.loc["constant", "mean_mm"] == 9.0 and summary.loc["constant", "description"] == "The mean head."
    assert pd.isna(summary.loc["constant", "seeds"])


def test_figures_have_one_panel_per_metric_attribute_and_curve(tmp_path):
    import matplotlib
    import matplotlib.pyplot as plt

    matplotlib.use("Agg")
    root = _small_study(tmp_path)
    fig = report.plot_metrics(report.run_table(root))
    assert isinstance(fig, matplotlib.figure.Figure) and len(fig.axes) == len(report.METRICS)
    fig_attr = report.plot_by_attribute(report.per_sample_table(root), "mean_mm")
    assert len(fig_attr.axes) == 2  # pose and quality: the attributes the table has
    curves = pd.DataFrame({"ablation": "baseline", "step": [0, 1] * 4, "value": [1.0, 0.5] * 4,
                           "metric": ["train/loss_step"] * 2 + ["train/l3d_step"] * 2 + ["val/loss"] * 2 + ["x"] * 2})
    fig_curves = report.plot_training_curves(curves, ["train/loss_step", "train/l3d_step", "val/loss", "x"])
    assert len(fig_curves.axes) == 6 and sum(ax.axison for ax in fig_curves.axes) == 4  # 2 rows of 3
    assert report.plot_training_curves(pd.DataFrame()) is None
    plt.close("all")


# --------------------------------------------------------------------------------------------
# The figures' caches follow their files
# --------------------------------------------------------------------------------------------
def test_flame_layer_cache_follows_the_directory_and_its_files(tmp_path):
    from conftest import tiny_flame_assets

    from dad3dlib.flame import save_flame_assets

    def save(n_vertices, path):
        assets = tiny_flame_assets(n_vertices=n_vertices, n_faces=20)
        return save_flame_assets(assets.model, assets.topology, path)

    a, b = save(30, tmp_path / "a"), save(40, tmp_path / "b")
    layer = report._layer(a)
    assert layer.num_vertices == 30 and report._layer(a) is layer
    assert report._layer(b).num_vertices == 40  # another study's FLAME directory
    save(50, a)  # the same directory rewritten
    assert report._layer(a).num_vertices == 50
    kept = report._layer(b)
    report.clear_caches()
    assert report._layer(b) is not kept


def test_dataset_cache_is_keyed_by_crop_size_and_follows_the_split_file(tmp_path, monkeypatch):
    from dad3dlib import data
    from dad3dlib.synthetic_data import make_data

    monkeypatch.setattr(data, "_cache_root", lambda: tmp_path / "cache")
    root = tmp_path / "d"
    make_data(root, {"splits": {"train": 3}, "image_sizes": [[96, 96]], "seed": 1}, workers=1)
    section = {"root": str(root)}
    ds = report._dataset(str(root), "train", 64, section)
    assert len(ds) == 3 and ds.crop_size == 64 and report._dataset(str(root), "train", 64, section) is ds
    assert report._dataset(str(root), "train", 96, section).crop_size == 96
    split = root / data.DATASET_DIR / "train" / "train.json"
    split.write_text(json.dumps(json.loads(split.read_text())[:2]))  # the data set changed on disk
    assert len(report._dataset(str(root), "train", 64, section)) == 2
