"""Report tables, differences and Findings from fabricated study directories (no training); the
figures are test_viz.py's."""
import json
import re

import numpy as np
import pandas as pd
import pytest
from scipy.stats import t as student_t

from conftest import small_study
from dad3dlib import report, stats

N = 60
BASE = {"median_mm": 2.0, "mean_mm": 2.6, "std_mm": 2.4, "angle_error_deg": 11.6, "angle_error_seen_deg": 10.1,
        "nme_reprojection": 4.3,
        "z5_accuracy": 0.91, "z5_accuracy_local": 0.92}
# ablation -> {metric: per-seed shift from the baseline's run of the same seed}
EFFECTS = {
    "no_lproj": {"angle_error_deg": [19.6, 20.3, 20.1]},           # +20°: the constant predictor's 31.6
    "good": {"mean_mm": [-0.5, -0.48, -0.52], "z5_accuracy": [-0.05, -0.049, -0.051]},
    "noisy": {"mean_mm": [0.8, -0.7, 0.2]},                        # training noise, no effect
}
# primary hypotheses, as the ablation files state them: confirmed, contradicted, not distinguishable
HYPOTHESES = {"no_lproj": {"angle_error_deg": "worse"}, "good": {"mean_mm": "worse"}, "noisy": {"mean_mm": "worse"}}
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
    (root / "study.json").write_text(json.dumps({"preset": "fake", "seeds": len(seeds), "runs": runs,
                                                 "hypotheses": HYPOTHESES}))
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
    diffs = report.baseline_differences(report.per_sample_table(root), hypotheses=report.study_hypotheses(root))
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
    assert angle.role == "primary" and angle.expected == "worse" and angle.hypothesis == "confirmed"
    good = d.loc[("good", "mean_mm")]
    assert good.verdict == "better" and good.hypothesis == "contradicted"  # expected worse: significant, other way
    assert d.loc[("good", "z5_accuracy")].verdict == "worse"  # higher is better; exploratory
    noisy = d.loc[("noisy", "mean_mm")]
    assert noisy.verdict == "not distinguishable" and noisy.lo < 0 < noisy.hi and noisy.hypothesis == "not distinguishable"
    assert d.loc[("no_lproj", "mean_mm")].verdict == "not distinguishable"


def test_alias_is_the_baseline_and_not_tested(study):
    _, d = study
    alias = d.loc["l3d50_proj0.05"]
    assert (alias.verdict == "same run as baseline").all() and (alias.delta == 0).all()
    assert alias.p_holm.isna().all() and alias.p.isna().all() and (alias.role == "").all() and alias.mde.isna().all()


def test_holm_runs_over_the_primary_hypotheses_only(study):
    """The three stated hypotheses are one Holm family; every other comparison of no_lproj, good and
    noisy (3 × 7 - 3) is exploratory, its verdict on its own unadjusted p, with no p_holm."""
    _, d = study
    primary = d[d.role == "primary"]
    assert sorted(primary.index) == sorted((a, k) for a, h in HYPOTHESES.items() for k in h)
    np.testing.assert_allclose(primary.p_holm, stats.holm(primary.p.to_numpy()))
    exploratory = d[d.role == "exploratory"]
    assert len(exploratory) == 3 * len(report.METRICS) - 3 and exploratory.p_holm.isna().all()
    assert (exploratory.hypothesis == "").all() and (exploratory.expected == "").all()
    lower = [report.METRICS[k].lower_is_better for k in exploratory.index.get_level_values("metric")]
    assert list(exploratory.verdict) == stats.verdicts(exploratory.delta, exploratory.p, lower)
    # without hypotheses every comparison is exploratory
    plain = report.baseline_differences(report.per_sample_table(study[0]))
    assert (plain.role[~plain.alias] == "exploratory").all() and plain.p_holm.isna().all()


def test_labels_say_which_comparisons_are_primary_and_which_are_exploratory(study):
    root, d = study
    cells = report.format_differences(d.reset_index())
    assert re.fullmatch(r"\+20\.00 \[\+\d+\.\d\d, \+\d+\.\d\d\] worse \(primary, Holm\): confirmed; test images only .*",
                        cells.loc["no_lproj", "Angle error (°)"])
    assert "better (primary, Holm): contradicted" in cells.loc["good", "Mean (mm)"]
    assert "worse (exploratory, unadjusted)" in cells.loc["good", report.METRICS["z5_accuracy"].label]
    assert cells.loc["l3d50_proj0.05", "Mean (mm)"] == "same run as baseline"
    summary = pd.read_csv(report.write_summary(root), index_col="ablation")
    assert summary.loc["good", "mean_mm_role"] == "primary" and summary.loc["good", "mean_mm_hypothesis"] == "contradicted"
    assert summary.loc["good", "z5_accuracy_role"] == "exploratory" and np.isnan(summary.loc["good", "z5_accuracy_p_holm"])


def test_detectable_effects_and_seeds_needed(study):
    """Every tested comparison states its minimum detectable effect from its own noise (primaries at
    0.05 / 3, Holm's most demanding step); the unresolved primary (noisy: seeds +0.8, -0.7, +0.2 on mean mm)
    also the seeds that would resolve its observed difference, and the Findings say both."""
    root, d = study
    tested = d[d.role != ""]
    noisy_ones = tested.seed_var + tested.image_var + tested.within_var > 0
    assert tested.mde.notna().all() and (tested.mde[noisy_ones] > 0).all() and (tested.mde[~noisy_ones] == 0).all()
    assert np.allclose(d[d.role == "primary"].alpha, 0.05 / 3) and np.allclose(d[d.role == "exploratory"].alpha, 0.05)
    noisy = d.loc[("noisy", "mean_mm")]
    noise = stats.Noise(np.array(noisy.seed_var), np.array(noisy.image_var), np.array(noisy.within_var), np.array(N))
    assert np.isclose(noisy.mde, stats.detectable_effect(noise, 3, 0.05 / 3))
    assert noisy.mde > abs(noisy.delta)  # not distinguishable, and the study could not have told it
    assert noisy.seeds_needed == stats.seeds_needed(noisy.delta, noise, 0.05 / 3) and noisy.seeds_needed > 3
    assert d[d.role == "primary"].drop(("noisy", "mean_mm")).seeds_needed.isna().all()  # resolved ones
    text = report.findings(report.run_table(root), d.reset_index(), report.reference_table(root))
    line = next(x for x in text.splitlines() if x.startswith("- **noisy**: Mean (mm) expected worse"))
    assert f"With 3 seeds an effect on Mean (mm) smaller than ±{noisy.mde:.2f} cannot be told from noise" in line
    seeds = f"would need {int(noisy.seeds_needed)} seeds" if np.isfinite(noisy.seeds_needed) else "would not be resolved"
    assert seeds in line and "α = 0.017" in line
    table = report.detectable_table(d.reset_index())
    assert list(table.index) == ["no_lproj", "good", "noisy"] and (table.seeds == 3).all()
    assert table.loc["noisy", "Mean (mm)"] == f"±{noisy.mde:.2f} primary"
    assert table.loc["noisy", "Median (mm)"] == f"±{d.loc[('noisy', 'median_mm')].mde:.2f}"


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
    for stat in ("delta", "delta_sd", "lo", "hi", "p", "p_holm", "img_lo", "img_hi", "alpha", "mde"):
        assert np.isclose(summary.loc["no_lproj", f"angle_error_deg_{stat}"], d.loc[("no_lproj", "angle_error_deg"), stat])
    assert summary.loc["no_lproj", "angle_error_deg_verdict"] == "worse"
    assert summary.loc[["constant", "camera_floor"], "angle_error_deg_verdict"].isna().all()
    table = report.format_summary(report.summary_table(runs, report.reference_table(root)))
    assert table.loc["constant", "kind"] == "reference" and table.loc["constant", "description"]
    assert re.fullmatch(r"\d+\.\d\d \(\d+\.\d\d–\d+\.\d\d\)", table.loc["noisy", "Mean (mm)"])


def test_findings_name_effects_references_and_not_aliases(study):
    root, d = study
    text = report.findings(report.run_table(root), d.reset_index(), report.reference_table(root))
    blocks = text.split("\n\n")
    assert blocks[0] == report.design_note(d.reset_index())
    assert "3 primary" not in blocks[0] and "these 3 comparisons" in blocks[0]
    assert f"other {3 * len(report.METRICS) - 3} " in blocks[0]  # 3 ablations × the study metrics, less the primaries
    assert "3 seeds" in blocks[1] and blocks[2] == "**Primary hypotheses**" and blocks[4].startswith("**Exploratory**")
    primary, exploratory = blocks[3].splitlines(), blocks[5].splitlines()
    no_lproj = next(line for line in primary if "**no_lproj**" in line)
    assert no_lproj.startswith("- **no_lproj**: Angle error (°) expected worse: **confirmed**, +20.00 [+")
    assert "equals `constant`'s (31.60)" in no_lproj and "camera_floor" not in no_lproj
    good = next(line for line in primary if "**good**" in line)
    assert "Mean (mm) expected worse: **contradicted**, -0.50 [" in good
    assert next(line for line in exploratory if "**good**" in line).startswith("- **good**: Z₅")  # not mean mm again
    assert "- **no_lproj**: no other metric distinguishable from training noise." in exploratory
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
    d = report.baseline_differences(report.per_sample_table(root), hypotheses=HYPOTHESES)
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


# --------------------------------------------------------------------------------------------
# Tables of a hand-made study: known answers
# --------------------------------------------------------------------------------------------
def test_run_table_has_a_row_per_ablation_and_seed_with_status_and_split(tmp_path):
    runs = report.run_table(small_study(tmp_path)).set_index(["ablation", "seed"])
    assert list(runs.index) == [("baseline", 1), ("l3d50_proj0.05", 1), ("baseline", 2), ("l3d50_proj0.05", 2),
                                ("no_l3d", 1), ("no_l3d", 2), ("no_2d", 1)]
    assert list(runs.status) == ["finished"] * 5 + ["pending", "failed"]
    assert list(runs.split[:5]) == ["val"] * 5 and runs.split[5:].isna().all()
    assert runs.loc[("l3d50_proj0.05", 2), "mean_mm"] == 4.0 and runs.loc[("l3d50_proj0.05", 2), "run"] == "baseline_s2"
    assert np.isnan(runs.loc[("no_l3d", 2), "mean_mm"]) and np.isnan(runs.loc[("baseline", 1), "median_mm"])


def test_summary_table_is_the_mean_and_spread_over_finished_seeds_then_the_references(tmp_path):
    root = small_study(tmp_path)
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




def test_the_shape_protocol_is_named_and_a_mixed_study_is_flagged(tmp_path):
    """The report names the protocol the runs recorded (records from before the setting measured
    landmarks); runs measured with different protocols are flagged as not comparable."""
    legacy = write_study(tmp_path / "legacy", seeds=(1,))
    note = report.shape_protocol_note(legacy)
    assert note.startswith("3D shape error (median / mean / std, mm, each pooled") and "**landmarks**:" in note
    path = legacy / "runs" / "good_s1" / "metrics.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "shape_protocol": "now"}))
    mixed = report.shape_protocol_note(legacy)
    assert "different protocols (landmarks, now)" in mixed and "**now**: the NoW protocol" in mixed


def test_hypotheses_come_from_study_json_else_the_ablation_files(tmp_path):
    """A study records its hypotheses when it is planned; one planned before that takes the ablation
    files' present ones, with a warning that they were not stated in advance."""
    root = write_study(tmp_path / "new", seeds=(1, 2))
    assert report.study_hypotheses(root) == HYPOTHESES
    record = json.loads((root / "study.json").read_text())
    del record["hypotheses"]
    (root / "study.json").write_text(json.dumps(record))
    with pytest.warns(UserWarning, match="records no hypotheses"):
        old = report.study_hypotheses(root)
    assert old == {"baseline": {}, "l3d50_proj0.05": {}, "no_lproj": {"angle_error_deg": "worse"},
                   "good": {}, "noisy": {}}  # good and noisy have no ablation file
