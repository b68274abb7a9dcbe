"""A study directory's numbers: tables, differences from the baseline, Findings, ``summary.csv``
and training curves (used by aggregate.ipynb; its figures are :mod:`dad3dlib.viz`'s).

Reads what each run wrote (``runs/<run>/metrics.json``, ``per_sample.csv``, the training log
``metrics.csv``) and nothing else, so it works on partial and finished studies. It draws nothing:
no OpenCV, matplotlib, OpenGL or FLAME layer, not even inside a function (tests/test_imports.py).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from . import stats
from .files import atomic_write
from .losses import LOSS_TERMS
from .metrics import METRICS as REGISTRY
from .metrics import metric_names

# name: (label, lower is better), the registered metrics in the study scope (metrics.METRICS)
METRICS = {k: (REGISTRY[k].label, REGISTRY[k].lower_is_better) for k in metric_names("study")}
ATTRIBUTE_METRICS = metric_names("attributes")  # plotted by image attribute, the explorer's captions
# The report's training curves: each term unweighted, per step while it is trained and at each
# validation for every run (those whose weight is 0 too); train/<term> holds the weighted contributions.
CURVES = ("train/loss_step", *(f"train/raw/{k}_step" for k in LOSS_TERMS), *(f"val/raw/{k}" for k in LOSS_TERMS),
          "val/nme", "val/angle_error")
ATTRIBUTES = ("pose", "occlusions", "quality", "expression", "standard light")
UNRECORDED_SPLIT = "test"  # the split of runs whose records predate the split protocol (always test)


def study_runs(study_dir: str | Path) -> list[dict]:
    """The runs ``study.json`` lists: {"run", "ablation", "seed", "aliases"} each."""
    return json.loads((Path(study_dir) / "study.json").read_text())["runs"]


def run_table(study_dir: str | Path) -> pd.DataFrame:
    """One row per (ablation, seed) — aliases of a shared run get its numbers — with status, the split
    it was evaluated on and metrics."""
    study_dir = Path(study_dir)
    rows = []
    for r in study_runs(study_dir):
        run_dir = study_dir / "runs" / r["run"]
        metrics, status = {}, "pending"
        if (run_dir / "metrics.json").exists():
            metrics, status = json.loads((run_dir / "metrics.json").read_text()), "finished"
        elif (run_dir / "error.json").exists():
            status = "failed"
        for name in [r["ablation"], *r["aliases"]]:
            rows.append({"ablation": name, "seed": r["seed"], "run": r["run"], "status": status,
                         "split": metrics.get("split", UNRECORDED_SPLIT) if metrics else None,
                         **{k: metrics.get(k, np.nan) for k in METRICS}})
    return pd.DataFrame(rows)


def per_sample_table(study_dir: str | Path) -> pd.DataFrame:
    """Every run's per-sample metrics, with ablation (aliases repeated), seed and run columns."""
    study_dir = Path(study_dir)
    frames = []
    for r in study_runs(study_dir):
        path = study_dir / "runs" / r["run"] / "per_sample.csv"
        if not path.exists() or not (path.parent / "metrics.json").exists():
            continue
        df = pd.read_csv(path)
        for name in [r["ablation"], *r["aliases"]]:
            frames.append(df.assign(ablation=name, seed=r["seed"], run=r["run"]))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def reference_table(study_dir: str | Path) -> pd.DataFrame:
    """One row per reference predictor (``references/<name>/metrics.json``, evaluated on the same
    split as the runs), in the order of ``references/references.json`` ({"descriptions": {name:
    one-sentence description}, "split", ...}, as :func:`dad3dlib.evaluate.evaluate_references`
    writes it): kind 'reference', split, description and the metrics. Empty when there are none; a
    file that cannot be read is named in a warning and skipped."""
    ref_dir = Path(study_dir) / "references"
    if not ref_dir.is_dir():
        return pd.DataFrame()
    record = _read_json(ref_dir / "references.json") or {}
    descriptions = record.get("descriptions", {})
    names = list(descriptions) + sorted(d.name for d in ref_dir.iterdir() if d.is_dir() and d.name not in descriptions)
    rows = []
    for name in names:
        if not (ref_dir / name / "metrics.json").exists():
            continue
        metrics = _read_json(ref_dir / name / "metrics.json")
        if metrics is not None:
            rows.append({"ablation": name, "kind": "reference", "split": record.get("split", UNRECORDED_SPLIT),
                         "description": str(descriptions.get(name, "")),
                         **{k: metrics.get(k, np.nan) for k in METRICS}})
    return pd.DataFrame(rows).set_index("ablation") if rows else pd.DataFrame()


def _read_json(path: Path):
    """A JSON object from ``path``; None (and a warning naming the file) when it is not one."""
    import warnings

    if not path.exists():
        return None
    try:
        obj = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        obj, problem = None, f"not readable JSON ({e})"
    else:
        problem = None if isinstance(obj, dict) else f"expected a JSON object, got {type(obj).__name__}"
    if problem:
        warnings.warn(f"{path}: {problem}; skipped", stacklevel=3)
        return None
    return obj


def summary_table(runs: pd.DataFrame, references: pd.DataFrame | None = None) -> pd.DataFrame:
    """Per ablation (kind 'run'): number of seeds, the evaluation split, and per metric the mean over
    seeds and the seed spread (``_sd``, ``_min``, ``_max``; SD NaN with one seed); then the reference
    predictors (kind 'reference', with their description; see :func:`reference_table`)."""
    done = runs[runs.status == "finished"]
    order = list(dict.fromkeys(runs.ablation))
    g = done.groupby("ablation", sort=False)
    out = pd.DataFrame({"kind": "run", "seeds": g.size(), "split": g["split"].agg(_names)})
    for k in METRICS:
        out[k], out[k + "_sd"], out[k + "_min"], out[k + "_max"] = g[k].mean(), g[k].std(), g[k].min(), g[k].max()
    out["description"] = ""
    out = out.reindex([a for a in order if a in out.index])
    if references is not None and not references.empty:
        out = pd.concat([out, references.reindex(columns=out.columns)])
    return out.astype({"seeds": "Int64"}).rename_axis("ablation")


def _names(values) -> str:
    """The distinct values of a column, in order, comma-separated."""
    return ", ".join(dict.fromkeys(str(v) for v in values if isinstance(v, str)))


def evaluation_split(study_dir: str | Path) -> str:
    """The split a study's runs and reference predictors were evaluated on (comma-separated if they
    differ; :data:`UNRECORDED_SPLIT` when nothing is finished yet)."""
    runs, refs = run_table(study_dir), reference_table(study_dir)
    return _names([*runs.get("split", []), *refs.get("split", [])]) or UNRECORDED_SPLIT


def splits_note(study_dir: str | Path) -> str:
    """One markdown paragraph: the split the study was evaluated on and, as its first finished run
    recorded them (``metrics.json``'s ``splits``), the splits training fitted and selected on and the
    benchmark submission each run wrote."""
    study_dir = Path(study_dir)
    text = f"Runs and reference predictors are evaluated on the **{evaluation_split(study_dir)}** split."
    for r in study_runs(study_dir):
        s = (_read_json(study_dir / "runs" / r["run"] / "metrics.json") or {}).get("splits")
        if not isinstance(s, dict):
            continue
        text += (f" Training fitted on `{s['fit']}` ({s.get('fit_items', '?')} images) and validated on `{s['select']}` "
                 f"({s.get('select_items', '?')} images; what the validation decides, where a run uses it: the "
                 "checkpoint, the plateau schedule, early stopping)")
        if s.get("holdout_fraction"):
            text += (f", {s['holdout_fraction']:.0%} of train chosen by a hash of the item id; the `{s['submit']}` "
                     f"split has no annotations, so each run's directory holds a benchmark submission for it "
                     f"(`submission_{s['submit']}.json`)")
        return text + "."
    return text


def shape_protocol_note(study_dir: str | Path) -> str:
    """One markdown sentence: the shape protocol (:data:`metrics.SHAPE_PROTOCOLS`) the 3D shape error of
    the study's finished runs and reference predictors was measured with (their ``metrics.json``'s
    ``shape_protocol``; records from before the setting existed measured ``landmarks``), and a
    warning when they differ (a study whose ``study.shape_protocol`` changed after runs finished)."""
    from .config import DEFAULT_SHAPE_PROTOCOL
    from .metrics import SHAPE_PROTOCOLS

    study_dir = Path(study_dir)
    paths = [study_dir / "runs" / r["run"] / "metrics.json" for r in study_runs(study_dir)]
    paths += sorted((study_dir / "references").glob("*/metrics.json"))
    used = dict.fromkeys(str(m.get("shape_protocol", DEFAULT_SHAPE_PROTOCOL))
                         for m in map(_read_json, paths) if isinstance(m, dict))
    if not used:
        return "No run has finished: the 3D shape error's protocol is not known yet."
    text = " ".join(f"**{p}**: {SHAPE_PROTOCOLS.get(p, 'unknown')}." for p in used)
    if len(used) > 1:
        return (f"The 3D shape errors were measured with different protocols ({', '.join(used)}), so they do "
                f"not compare across runs: {text} Re-evaluate the runs or set study.shape_protocol back.")
    return (f"3D shape error (median / mean / std, mm, each pooled over every scored distance of the split), "
            f"protocol {text}")


def baseline_differences(per_sample: pd.DataFrame, baseline: str = "baseline") -> pd.DataFrame:
    """Per ablation and metric, the difference from the baseline with the seed as the unit (see
    :mod:`dad3dlib.stats`): ``delta`` = mean over the shared seeds of the mean per-image difference
    (ablation − baseline, same seed, same image), ``delta_sd`` its SD over seeds, the 95 % interval
    with training and test-image noise (``lo``, ``hi``: Student's t on the seeds), ``p``, ``p_holm``
    (Holm over every ablation × metric tested), ``verdict``: better / worse / not distinguishable;
    'training noise unmeasured (1 seed)' (no interval, no p) when only one seed is shared; 'same run
    as baseline' for an alias (not tested); and the interval from test-image noise alone
    (``img_lo``, ``img_hi``, also with one seed).

    For median_mm and std_mm the per-image values are each image's median and SD, so delta is the
    mean difference of those, not the difference of the pooled values in :func:`summary_table`.
    """
    if per_sample.empty or baseline not in set(per_sample.ablation):
        return pd.DataFrame()
    metrics = [k for k in METRICS if k in per_sample]
    base = per_sample[per_sample.ablation == baseline].set_index(["seed", "item_id"])
    rows = []
    for abl, df in per_sample.groupby("ablation", sort=False):
        if abl == baseline:
            continue
        df = df.set_index(["seed", "item_id"])
        seeds = sorted(set(df.index.get_level_values(0)) & set(base.index.get_level_values(0)))
        if not seeds:
            continue
        items = sorted(set(df.index.get_level_values(1)) | set(base.index.get_level_values(1)))
        x = _cube(df, seeds, items, metrics) - _cube(base, seeds, items, metrics)  # [M,S,N]
        alias = (_cube(df, seeds, items, ["run"]) == _cube(base, seeds, items, ["run"])).all()
        t = stats.seed_t_test(x)
        rows += [{"ablation": abl, "metric": k, "seeds": len(seeds), "n_items": int(np.isfinite(x[j]).any(0).sum()),
                  "alias": alias, "delta": t.delta[j], "delta_sd": t.delta_sd[j], "lo": t.lo[j], "hi": t.hi[j],
                  "p": t.p[j], "img_lo": t.img_lo[j], "img_hi": t.img_hi[j]}
                 for j, k in enumerate(metrics)]
    out = pd.DataFrame(rows)
    if out.empty:
        return out
    tested = (out.seeds > 1) & ~out.alias
    out[["lo", "hi", "p"]] = out[["lo", "hi", "p"]].where(tested)
    out["p_holm"] = stats.holm(out.p.to_numpy())
    verdict = stats.verdicts(out.delta, out.p_holm, [METRICS[k][1] for k in out.metric])
    out["verdict"] = np.where(out.alias, "same run as baseline", np.where(out.seeds > 1, verdict, stats.UNMEASURED))
    return out


def _cube(indexed: pd.DataFrame, seeds: list, items: list, metrics: list[str]) -> np.ndarray:
    """Per-sample values indexed by (seed, item_id) -> [M,S,N] on the given seeds and items (NaN where
    missing)."""
    grid = pd.MultiIndex.from_product([seeds, items])
    return indexed.reindex(grid)[metrics].to_numpy().reshape(len(seeds), len(items), len(metrics)).transpose(2, 0, 1)


def format_differences(differences: pd.DataFrame, split: str = UNRECORDED_SPLIT) -> pd.DataFrame:
    """:func:`baseline_differences` as one row per ablation and one labelled column per metric, each
    cell 'Δ [lo, hi] verdict; <split> images only [img_lo, img_hi]' (no seed-level interval with one
    seed; ``split``: the evaluation split, :func:`evaluation_split`)."""
    if differences.empty:
        return pd.DataFrame()

    def cell(r) -> str:
        if r.alias:
            return r.verdict
        interval = f" {_interval(r.metric, r.lo, r.hi)}" if np.isfinite(r.lo) else ""
        images = f"; {split} images only {_interval(r.metric, r.img_lo, r.img_hi)}" if np.isfinite(r.img_lo) else ""
        return f"{format_metric(r.metric, r.delta, True)}{interval} {r.verdict}{images}"

    table = differences.assign(cell=[cell(r) for r in differences.itertuples()]).pivot(
        index="ablation", columns="metric", values="cell")
    table = table.reindex(index=list(dict.fromkeys(differences.ablation)),
                          columns=[k for k in METRICS if k in table.columns])
    return table.rename(columns={k: label for k, (label, _) in METRICS.items()}).rename_axis(index=None, columns=None)


def format_metric(metric: str, value: float, signed: bool = False) -> str:
    """A metric's value as the tables and the explorer's captions print it (its registered precision)."""
    return f"{value:{'+' if signed else ''}.{REGISTRY[metric].precision}f}"


def _interval(metric: str, lo: float, hi: float) -> str:
    return f"[{format_metric(metric, lo, True)}, {format_metric(metric, hi, True)}]"


REL_TOL = 0.02  # "equals a reference": within 2 % of the reference's value (or inside the seed interval)


def equals_reference(seed_values: np.ndarray, reference: float, se_img: float = 0.0,
                     rel_tol: float = REL_TOL) -> bool:
    """Whether an ablation's metric equals a reference predictor's: the reference's value lies inside
    the seed-level 95 % t interval of the ablation's mean over its per-seed values [S], with the
    test-image standard error ``se_img`` of that mean combined as in
    :func:`dad3dlib.stats.two_part_interval`; no interval with one seed), or within ``rel_tol`` of the
    reference's value."""
    v = np.asarray(seed_values, dtype=np.float64)
    v = v[np.isfinite(v)]
    if not len(v) or not np.isfinite(reference):
        return False
    if abs(v.mean() - reference) <= rel_tol * abs(reference):
        return True
    if len(v) < 2:
        return False
    lo, hi, _ = stats.two_part_interval(v.mean(), np.sqrt(v.var(ddof=1) / len(v)), len(v) - 1, se_img, 10 ** 6)
    return bool(lo <= reference <= hi)


def findings(runs: pd.DataFrame, differences: pd.DataFrame, references: pd.DataFrame | None = None,
             baseline: str = "baseline", per_sample: pd.DataFrame | None = None,
             split: str = UNRECORDED_SPLIT) -> str:
    """The report's "Findings" (markdown): an opening sentence on what the verdicts can say, then one
    sentence per ablation (aliases of the baseline left out) naming the metrics whose difference from
    the baseline is distinguishable from training noise, with the effect and its 95 % interval, and
    the reference predictors it equals on those metrics (:func:`equals_reference`, with the image-level
    standard error of the ablation's mean from ``per_sample`` when given). With one seed every change
    is listed, as not yet distinguishable from training noise. ``split``: the evaluation split
    (:func:`evaluation_split`), named in the text."""
    if differences.empty:
        return f"No finished `{baseline}` run to compare with yet."
    seeds = int(differences.seeds.max())
    tested = int(differences.p_holm.notna().sum())
    if seeds < 2:
        lines = ["Training noise is unmeasured: this study has one seed per ablation, so no difference "
                 "below can be told from training noise; the changes are listed as measured, not as "
                 "findings (run the study with `--seeds 3` or more)."]
    else:
        _, quantile, _ = stats.t_interval(0.0, 1.0, seeds - 1)
        lines = [f"Differences from `{baseline}` beyond training noise: 95 % intervals whose training-noise part "
                 f"is a Student t over the {seeds} seeds (± {quantile:.2f} standard errors of the per-seed "
                 f"differences, {seeds - 1} degrees of freedom) and whose image part is the paired standard "
                 f"error over the {split} images, the two margins added in quadrature; verdicts Holm-corrected over "
                 f"{tested} comparisons. With few seeds only large, consistent effects can be told from training "
                 "noise; not distinguishable does not mean equal."]
    done = runs[runs.status == "finished"]
    refs = references if references is not None else pd.DataFrame()
    for abl, d in differences.groupby("ablation", sort=False):
        if d.alias.all():
            continue
        one_seed = (d.seeds < 2).all()
        shown = d[d.delta != 0] if one_seed else d[d.verdict.isin([stats.BETTER, stats.WORSE])]
        if shown.empty:
            lines.append(f"- **{abl}**: no metric distinguishable from training noise.")
            continue
        effects = []
        for r in shown.itertuples():
            interval = "" if one_seed else f" {_interval(r.metric, r.lo, r.hi)} {r.verdict}"
            effects.append(f"{METRICS[r.metric][0]} {format_metric(r.metric, r.delta, True)}{interval}")
        text = f"- **{abl}**: " + ", ".join(effects) + (
            " (not yet distinguishable from training noise)" if one_seed else f" than `{baseline}`")
        se_img = _own_image_se(per_sample, abl)
        same = []
        for r in shown.itertuples():
            values = done.loc[done.ablation == abl, r.metric].to_numpy()
            matches = [f"`{name}`'s ({format_metric(r.metric, ref[r.metric])})" for name, ref in refs.iterrows()
                       if r.metric in ref and equals_reference(values, ref[r.metric], se_img.get(r.metric, 0.0))]
            if matches:
                same.append(f"its {METRICS[r.metric][0]} equals " + " and ".join(matches))
        lines.append(text + ("; " + "; ".join(same) if same else "") + ".")
    return lines[0] + "\n\n" + "\n".join(lines[1:])


def _own_image_se(per_sample: pd.DataFrame | None, ablation: str) -> dict[str, float]:
    """metric -> the test-image standard error of an ablation's own mean over its seeds (see
    :func:`dad3dlib.stats.seed_t_test`); empty without per-sample values."""
    if per_sample is None or per_sample.empty:
        return {}
    own = per_sample[per_sample.ablation == ablation].set_index(["seed", "item_id"])
    metrics = [k for k in METRICS if k in own]
    seeds, items = sorted(set(own.index.get_level_values(0))), sorted(set(own.index.get_level_values(1)))
    return dict(zip(metrics, stats.seed_t_test(_cube(own, seeds, items, metrics)).se_img))


def write_summary(study_dir: str | Path) -> Path:
    """``summary.csv``: :func:`summary_table` (runs and reference predictors, mean and seed spread of
    each metric) joined with :func:`baseline_differences` (``<metric>_delta``, ``_delta_sd``, ``_lo``,
    ``_hi``, ``_p``, ``_p_holm``, ``_verdict``, ``_img_lo``, ``_img_hi``)."""
    study_dir = Path(study_dir)
    summary = summary_table(run_table(study_dir), reference_table(study_dir))
    diffs = baseline_differences(per_sample_table(study_dir))
    if not diffs.empty:
        stats_cols = ["delta", "delta_sd", "lo", "hi", "p", "p_holm", "verdict", "img_lo", "img_hi"]
        wide = diffs.pivot(index="ablation", columns="metric", values=stats_cols)
        wide.columns = [f"{m}_{stat}" for stat, m in wide.columns]
        summary = summary.join(wide[[f"{m}_{stat}" for m in METRICS for stat in stats_cols
                                     if f"{m}_{stat}" in wide.columns]])
    path = study_dir / "summary.csv"
    atomic_write(path, summary.to_csv(index_label="ablation"))
    return path


def format_summary(summary: pd.DataFrame) -> pd.DataFrame:
    """:func:`summary_table` for reading: kind, seeds, each metric as 'mean (min–max over seeds)'
    (just the value with one seed and for reference predictors), the references' descriptions."""
    out = pd.DataFrame({"kind": summary.kind,
                        "seeds": summary.seeds.astype("string").fillna("")}, index=summary.index)
    for k, (label, _) in METRICS.items():
        out[label] = [format_metric(k, m) + (f" ({format_metric(k, lo)}–{format_metric(k, hi)})" if n > 1 else "")
                      for m, lo, hi, n in zip(summary[k], summary[k + "_min"], summary[k + "_max"],
                                              summary.seeds.fillna(0))]
    out["description"] = summary.description.fillna("")
    return out.rename_axis(None)


def training_curves(study_dir: str | Path) -> pd.DataFrame:
    """Long table (run, ablation, seed, step, epoch, metric, value) of every run's training log."""
    frames = [run_curves(Path(study_dir) / "runs" / r["run"]).assign(run=r["run"], ablation=r["ablation"],
                                                                     seed=r["seed"])
              for r in study_runs(study_dir)]
    frames = [f for f in frames if not f.empty]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def run_curves(run_dir: str | Path) -> pd.DataFrame:
    """Long table (step, epoch, metric, value) of one run's training log (resumed versions joined)."""
    df = read_metrics(run_dir)
    if df is None or df.empty:
        return pd.DataFrame()
    ids = [c for c in ("step", "epoch") if c in df]
    return (df.melt(id_vars=ids, value_vars=[c for c in df if c not in ids], var_name="metric")
            .dropna(subset=["value"]).assign(ablation=Path(run_dir).name))


def read_metrics(out_dir: str | Path):
    """All CSV logs of a run as one pandas DataFrame; rows a later (resumed) version re-did are dropped."""
    versions = sorted((Path(out_dir) / "logs").glob("version_*/metrics.csv"),
                      key=lambda p: int(p.parent.name.split("_")[1]))
    frames = [pd.read_csv(p) for p in versions]
    kept = []
    for i, df in enumerate(frames):
        later = [f["step"].min() for f in frames[i + 1:] if len(f)]
        kept.append(df[df["step"] < min(later)] if later else df)
    return pd.concat(kept, ignore_index=True) if kept else pd.DataFrame()


TIME_PARTS = ("train_steps", "data", "validation", "evaluation", "rest")  # a run's provenance.json time_s


def time_table(study_dir: str | Path) -> pd.DataFrame:
    """Where the study's time went: per part of a run (:data:`TIME_PARTS`, from each run's
    ``provenance.json``; runs recorded before it was kept are left out and counted) the seconds
    summed over runs and their share. Index: part; columns: seconds, share, runs."""
    study_dir = Path(study_dir)
    rows = [(_read_json(study_dir / "runs" / r["run"] / "provenance.json") or {}).get("time_s")
            for r in study_runs(study_dir)]
    rows = [r for r in rows if r]
    total = pd.DataFrame(rows, columns=list(TIME_PARTS)).fillna(0.0).sum()
    out = pd.DataFrame({"seconds": total.round(1), "share": (total / max(total.sum(), 1e-9)).round(3)})
    out["runs"] = len(rows)
    out.index.name = "part"
    return out
