"""Aggregation of a study directory into tables, plots and renders (used by aggregate.ipynb).

Reads what each run wrote (``runs/<run>/metrics.json``, ``per_sample.csv``, ``predictions.npz``,
the training log ``metrics.csv``) and nothing else, so it works on partial and finished studies.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from . import stats
from .config import LOSS_TERMS
from .files import atomic_write
from .metrics import METRICS as REGISTRY
from .metrics import metric_names
from .geometry import FLIP_YZ

# name: (label, lower is better), the registered metrics in the study scope (metrics.METRICS)
METRICS = {k: (REGISTRY[k].label, REGISTRY[k].lower_is_better) for k in metric_names("study")}
ATTRIBUTE_METRICS = metric_names("attributes")  # plotted by image attribute, the explorer's captions
CURVES = ("train/loss_step", *(f"train/{k}_step" for k in LOSS_TERMS), "val/loss", "val/nme", "val/angle_error")
ATTRIBUTES = ("pose", "occlusions", "quality", "expression", "standard light")
UNRECORDED_SPLIT = "test"  # the split of runs whose records predate the split protocol (always test)


def _runs(study_dir: Path) -> list[dict]:
    return json.loads((Path(study_dir) / "study.json").read_text())["runs"]


def run_table(study_dir: str | Path) -> pd.DataFrame:
    """One row per (ablation, seed) — aliases of a shared run get its numbers — with status, the split
    it was evaluated on and metrics."""
    study_dir = Path(study_dir)
    rows = []
    for r in _runs(study_dir):
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
    for r in _runs(study_dir):
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
    for r in _runs(study_dir):
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
        return f"{_num(r.metric, r.delta, True)}{interval} {r.verdict}{images}"

    table = differences.assign(cell=[cell(r) for r in differences.itertuples()]).pivot(
        index="ablation", columns="metric", values="cell")
    table = table.reindex(index=list(dict.fromkeys(differences.ablation)),
                          columns=[k for k in METRICS if k in table.columns])
    return table.rename(columns={k: label for k, (label, _) in METRICS.items()}).rename_axis(index=None, columns=None)


def _num(metric: str, value: float, signed: bool = False) -> str:
    """A metric's value as the tables print it (its registered precision)."""
    return f"{value:{'+' if signed else ''}.{REGISTRY[metric].precision}f}"


def _interval(metric: str, lo: float, hi: float) -> str:
    return f"[{_num(metric, lo, True)}, {_num(metric, hi, True)}]"


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
            effects.append(f"{METRICS[r.metric][0]} {_num(r.metric, r.delta, True)}{interval}")
        text = f"- **{abl}**: " + ", ".join(effects) + (
            " (not yet distinguishable from training noise)" if one_seed else f" than `{baseline}`")
        se_img = _own_image_se(per_sample, abl)
        same = []
        for r in shown.itertuples():
            values = done.loc[done.ablation == abl, r.metric].to_numpy()
            matches = [f"`{name}`'s ({_num(r.metric, ref[r.metric])})" for name, ref in refs.iterrows()
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
        out[label] = [_num(k, m) + (f" ({_num(k, lo)}–{_num(k, hi)})" if n > 1 else "")
                      for m, lo, hi, n in zip(summary[k], summary[k + "_min"], summary[k + "_max"],
                                              summary.seeds.fillna(0))]
    out["description"] = summary.description.fillna("")
    return out.rename_axis(None)


def training_curves(study_dir: str | Path) -> pd.DataFrame:
    """Long table (run, ablation, seed, step, epoch, metric, value) of every run's training log."""
    frames = [run_curves(Path(study_dir) / "runs" / r["run"]).assign(run=r["run"], ablation=r["ablation"],
                                                                     seed=r["seed"])
              for r in _runs(study_dir)]
    frames = [f for f in frames if not f.empty]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


# ------------------------------------------------------------------------------------------------
# Plots
# ------------------------------------------------------------------------------------------------
def plot_metrics(runs: pd.DataFrame):
    """One seaborn bar panel per metric (points: seeds)."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    done = runs[runs.status == "finished"]
    fig, axes = plt.subplots(1, len(METRICS), figsize=(3.0 * len(METRICS), 3.6))
    for ax, (k, (label, lower)) in zip(axes, METRICS.items()):
        sns.barplot(data=done, x="ablation", y=k, ax=ax, errorbar=("ci", 95), color="#8fb3d9")
        sns.stripplot(data=done, x="ablation", y=k, ax=ax, color="k", size=3)
        ax.set_title(label + (" ↓" if lower else " ↑"), fontsize=9)
        ax.set_xlabel("")
        ax.set_ylabel("")
        ax.tick_params(axis="x", rotation=70, labelsize=8)
    fig.tight_layout()
    return fig


def plot_training_curves(curves: pd.DataFrame, metrics: list[str] | None = None):
    """Training curves of all runs on shared axes, one panel per metric (default: the weighted loss
    terms per step, titled with their display names, and the validation metrics)."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    if curves.empty:
        return None
    logged = set(curves.metric)
    metrics = metrics or [m for m in CURVES if m in logged] or sorted(logged)
    cols = 3
    rows = -(-len(metrics) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.0 * rows), squeeze=False)
    for ax, m in zip(axes.flat, metrics):
        d = curves[curves.metric == m]
        x = "step" if "step" in d and d["step"].notna().any() else "epoch"
        sns.lineplot(data=d, x=x, y="value", hue="ablation", ax=ax, legend=ax is axes.flat[0], errorbar=None)
        ax.set_title(next((f"{t.label} ({m})" for k, t in LOSS_TERMS.items() if m == f"train/{k}_step"), m),
                     fontsize=9)
        ax.set_ylabel("")
        if d["value"].gt(0).all() and d["value"].max() / max(d["value"].min(), 1e-12) > 50:
            ax.set_yscale("log")
    for ax in axes.flat[len(metrics):]:
        ax.axis("off")
    fig.tight_layout()
    return fig


def plot_by_attribute(per_sample: pd.DataFrame, metric: str = "nme_reprojection"):
    """The metric per ablation, split by each image attribute present in the table."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    attrs = [a for a in ATTRIBUTES if a in per_sample]
    if per_sample.empty or not attrs:
        return None
    fig, axes = plt.subplots(1, len(attrs), figsize=(4.5 * len(attrs), 3.6), squeeze=False)
    for ax, a in zip(axes.flat, attrs):
        sns.barplot(data=per_sample, x=a, y=metric, hue="ablation", ax=ax, errorbar=None)
        ax.set_title(f"{METRICS.get(metric, (metric,))[0]} by {a}", fontsize=9)
        ax.legend(fontsize=6) if ax is axes.flat[0] else ax.get_legend().remove()
    fig.tight_layout()
    return fig


# ------------------------------------------------------------------------------------------------
# Meshes over images (predictions.npz written by evaluate.evaluate_run)
# ------------------------------------------------------------------------------------------------
MESH_GREY = (0.72, 0.74, 0.78)


def image_space_projection(height: int, z: np.ndarray) -> np.ndarray:
    """P for vertices given in image pixels (x right, y down, z away from the viewer) with ``IMAGE_MV``.

    The renderer's camera space is OpenGL's (y up, looking down -z), so ``IMAGE_MV = diag(1,-1,-1,1)``
    flips y and z: camera ``Z = -z`` and the distance along the view is z itself. The depth range is
    z [V]'s own, widened by a margin so that neither the nearest nor the farthest point is clipped.
    """
    from .geometry import orthographic_projection

    lo, hi = float(z.min()), float(z.max())
    margin = 0.05 * (hi - lo) + 1.0
    return orthographic_projection(0.0, float(height), near=lo - margin, far=hi + margin)


IMAGE_MV = np.diag([*FLIP_YZ, 1.0])


def overlay_mesh(image: np.ndarray, vertices_img: np.ndarray, faces: np.ndarray, colors=None,
                 alpha: float = 0.6) -> np.ndarray:
    """Render a mesh given in image pixels (x, y down, z away) over ``image`` [H,W,3] uint8."""
    h, w = image.shape[:2]
    colors = np.broadcast_to(np.asarray(MESH_GREY if colors is None else colors, np.float32),
                             (len(vertices_img), 3))
    rgb, mask = _renderer(w, h).render(vertices_img.astype(np.float32), faces, colors, IMAGE_MV,
                                       image_space_projection(h, vertices_img[:, 2]))
    out = image.copy()
    out[mask] = (alpha * rgb[mask] + (1 - alpha) * image[mask]).astype(np.uint8)
    return out


class FileCache:
    """Values built from files, reused while those files are unchanged: :meth:`get` rebuilds a key's
    value when the size or modification time of a file it was built from differs from last time
    (a directory counts by the entries directly in it); :meth:`clear` forgets every value."""

    def __init__(self):
        self._entries: dict = {}

    def get(self, key, paths, build):
        """The value of ``key``: ``build()``'s result, rebuilt when ``paths`` changed."""
        stamp = _stamp(paths)
        entry = self._entries.get(key)
        if entry is None or entry[0] != stamp:
            entry = self._entries[key] = (stamp, build())
        return entry[1]

    def clear(self) -> None:
        self._entries.clear()


def _stamp(paths) -> tuple:
    """(path, mtime_ns, size) of each file of ``paths`` (a directory: its entries); missing ones left out."""
    out = []
    for p in map(Path, paths):
        for f in sorted(p.iterdir()) if p.is_dir() else [p]:
            try:
                st = f.stat()
            except OSError:
                continue
            out.append((str(f), st.st_mtime_ns, st.st_size))
    return tuple(out)


_RENDERERS: dict = {}  # (width, height) -> Renderer, which depends on nothing else
_LAYERS = FileCache()  # FLAME directory -> FlameLayer
_DATASETS = FileCache()  # (root, split, crop size, FLAME directory, skip_bad) -> DAD3DHeadsDataset


def clear_caches() -> None:
    """Forget the renderers, FLAME layers and data sets the figures keep between calls (entries
    already follow changes to the files they were read from; this frees their memory)."""
    _RENDERERS.clear()
    _LAYERS.clear()
    _DATASETS.clear()


def _renderer(w: int, h: int):
    from .render import Renderer

    if (w, h) not in _RENDERERS:
        _RENDERERS[(w, h)] = Renderer(w, h)
    return _RENDERERS[(w, h)]


def _run_dirs(study_dir: Path) -> dict[str, Path]:
    """ablation name -> its first seed's finished run directory."""
    out = {}
    for r in _runs(study_dir):
        d = Path(study_dir) / "runs" / r["run"]
        if (d / "predictions.npz").exists() and (d / "metrics.json").exists():
            for name in [r["ablation"], *r["aliases"]]:
                out.setdefault(name, d)
    return out


def _run_context(run_dir: Path):
    """(params, FlameLayer, predictions dict) of a finished run; the predictions' ``split`` is the
    split they were made on."""
    from .config import load_params
    from .data import flame_dir

    params = load_params(run_dir / "params.yaml")
    layer = _layer(flame_dir(params["data"]))
    pred = dict(np.load(run_dir / "predictions.npz", allow_pickle=False))
    pred["split"] = str(pred.get("split", UNRECORDED_SPLIT))
    return params, layer, pred


def _layer(flame_dir):
    from .flame import FlameLayer, load_flame_assets

    path = Path(flame_dir)
    return _LAYERS.get(str(path), [path], lambda: FlameLayer(load_flame_assets(path)).eval())


def predicted_mesh_image(layer, params_3dmm: np.ndarray, crop_affine: np.ndarray, crop_size: int) -> np.ndarray:
    """A prediction's mesh in original-image pixels: [413], [2,3] (crop = A·[x,y,1]) -> [V,3]."""
    import torch

    with torch.no_grad():
        v = layer.reproject(torch.as_tensor(params_3dmm, dtype=torch.float32)[None], crop_size)[0].numpy()
    scale = crop_affine[0, 0]
    xy = (v[:, :2] - crop_affine[:, 2]) / scale
    return np.concatenate([xy, v[:, 2:] / scale], axis=1)


def _sample(params: dict, split: str, item_id: str):
    """(image RGB uint8, GT vertices in image pixels with depth [V,3]) of one item of a run's data."""
    from .geometry import project

    ds = _dataset(params["data"]["root"], split, params["data"]["crop_size"], params["data"])
    i = ds.position(item_id)
    img = ds.image(i)
    v, mv, p, _ = ds.geometry(i, img.shape[0])
    v = v.astype(np.float64)
    xy = project(v, mv, p, img.shape[0])
    depth = -(v @ mv[:3, :3].T + mv[:3, 3])[:, 2]
    z = (depth - depth.mean()) * p[0, 0] / depth.mean()  # depth in pixel units around the head
    return img, np.concatenate([xy, z[:, None]], axis=1)


def _dataset(root: str, split: str, crop_size: int, data: dict):
    from .data import DAD3DHeadsDataset, dataset_dir, flame_dir
    from .flame import load_flame_assets

    flame = flame_dir(data)
    skip_bad = data.get("skip_bad", False)

    def build():
        assets = load_flame_assets(flame, require_model=False)
        return DAD3DHeadsDataset(root, split, crop_size, assets, skip_bad=skip_bad)

    split_file = dataset_dir(root) / split / f"{split}.json"
    return _DATASETS.get((str(root), split, crop_size, str(flame), skip_bad), [flame, split_file], build)


def _crop_box(vertices_img: np.ndarray, margin: float = 0.15) -> tuple[int, int, int, int]:
    lo, hi = vertices_img[:, :2].min(0), vertices_img[:, :2].max(0)
    c, half = (lo + hi) / 2, (hi - lo).max() / 2 * (1 + margin)
    return int(c[0] - half), int(c[1] - half), int(c[0] + half), int(c[1] + half)


def _cut(img: np.ndarray, box) -> np.ndarray:
    x0, y0, x1, y1 = box
    pad = max(0, -x0, -y0, x1 - img.shape[1], y1 - img.shape[0])
    if pad:
        img = np.pad(img, ((pad, pad), (pad, pad), (0, 0)))
    return img[y0 + pad:y1 + pad, x0 + pad:x1 + pad]


def plot_predictions(run_dir: str | Path, params: dict | None = None, n: int = 8):
    """A run's first ``n`` evaluation images: GT landmarks (green), predicted landmarks (red), predicted
    mesh."""
    import matplotlib.pyplot as plt
    import torch

    run_dir = Path(run_dir)
    params_, layer, pred = _run_context(run_dir)
    params = params or params_
    faces = layer.faces.numpy()
    n = min(n, len(pred["item_id"]))
    cols = min(4, n)
    fig, axes = plt.subplots(-(-n // cols), cols, figsize=(3.2 * cols, 3.2 * -(-n // cols)), squeeze=False)
    for ax, i in zip(axes.flat, range(n)):
        item = str(pred["item_id"][i])
        img, gt_v = _sample(params, pred["split"], item)
        pv = predicted_mesh_image(layer, pred["params_3dmm"][i], pred["crop_affine"][i], int(pred["crop_size"]))
        box = _crop_box(gt_v)
        ax.imshow(_cut(overlay_mesh(img, pv, faces, alpha=0.45), box))
        off = np.array(box[:2])
        with torch.no_grad():
            gt_l = layer.landmarks68(torch.as_tensor(gt_v[None], dtype=torch.float32))[0, :, :2].numpy()
        ax.scatter(*(gt_l - off).T, s=4, c="lime")
        ax.scatter(*(pred["landmarks_2d_image"][i] - off).T, s=4, c="red")
        ax.set_title(item, fontsize=8)
    for ax in axes.flat:
        ax.axis("off")
    fig.tight_layout()
    return fig


def plot_mesh_comparison(study_dir: str | Path, n_items: int = 4):
    """Rows: the same evaluation images; columns: image, GT mesh, each ablation's predicted mesh."""
    import matplotlib.pyplot as plt

    runs = _run_dirs(Path(study_dir))
    if not runs:
        return None
    ctx = {name: _run_context(d) for name, d in runs.items()}
    params, layer, pred0 = next(iter(ctx.values()))
    faces = layer.faces.numpy()
    items = [str(x) for x in pred0["item_id"][:n_items]]
    cols = 2 + len(ctx)
    fig, axes = plt.subplots(len(items), cols, figsize=(2.4 * cols, 2.5 * len(items)), squeeze=False)
    for r, item in enumerate(items):
        img, gt_v = _sample(params, pred0["split"], item)
        box = _crop_box(gt_v)
        panels = [("image", img), ("ground truth", overlay_mesh(img, gt_v, faces, (0.55, 0.8, 0.55)))]
        for name, (_, lay, pred) in ctx.items():
            idx = {str(x): k for k, x in enumerate(pred["item_id"])}.get(item)
            if idx is not None:
                pv = predicted_mesh_image(lay, pred["params_3dmm"][idx], pred["crop_affine"][idx],
                                          int(pred["crop_size"]))
                panels.append((name, overlay_mesh(img, pv, faces)))
        for c, (title, im) in enumerate(panels):
            axes[r, c].imshow(_cut(im, box))
            if r == 0:
                axes[r, c].set_title(title, fontsize=8)
    for ax in axes.flat:
        ax.axis("off")
    fig.tight_layout()
    return fig


def error_colors(err: np.ndarray, vmax: float) -> np.ndarray:
    """Per-vertex error [V] -> colours [V,3] from matplotlib's 'inferno' map on [0, vmax]."""
    import matplotlib

    colors = matplotlib.colormaps["inferno"](np.clip(np.nan_to_num(err) / max(vmax, 1e-9), 0, 1))[:, :3]
    colors[np.isnan(err)] = 0.8  # outside the evaluated region
    return colors


def plot_error_heatmaps(study_dir: str | Path, size: int = 256):
    """Each ablation's mean per-vertex error (mm) painted on the mean head (front and profile)."""
    import matplotlib.pyplot as plt

    runs = _run_dirs(Path(study_dir))
    errs = {}
    for name, d in runs.items():
        pred = np.load(d / "predictions.npz", allow_pickle=False)
        if "vertex_error_mm" in pred:
            errs[name] = pred["vertex_error_mm"]
    if not errs:
        return None
    params, layer, _ = _run_context(next(iter(runs.values())))
    v = layer.v_template.numpy()
    faces = layer.faces.numpy()
    vmax = float(np.nanpercentile(np.concatenate(list(errs.values())), 98))
    fig, axes = plt.subplots(2, len(errs), figsize=(2.6 * len(errs), 5.4), squeeze=False)
    for c, (name, e) in enumerate(errs.items()):
        for r, yaw in enumerate((0.0, 70.0)):
            axes[r, c].imshow(render_head(v, faces, error_colors(e, vmax), yaw, size))
            axes[r, c].axis("off")
        axes[0, c].set_title(f"{name}\nmean {np.nanmean(e):.2f} mm", fontsize=8)
    sm = plt.cm.ScalarMappable(cmap="inferno", norm=plt.Normalize(0, vmax))
    fig.colorbar(sm, ax=axes, fraction=0.02, label="mm")
    return fig


def render_head(vertices: np.ndarray, faces: np.ndarray, colors: np.ndarray, yaw_deg: float = 0.0,
                size: int = 256) -> np.ndarray:
    """A model-space head rendered from the front (yaw rotates it), filling a size×size image."""
    from scipy.spatial.transform import Rotation

    R = Rotation.from_euler("y", yaw_deg, degrees=True).as_matrix()
    v = (vertices - vertices.mean(0)) @ R.T
    scale = 0.9 * size / (v[:, :2].max(0) - v[:, :2].min(0)).max()
    img_v = np.stack([v[:, 0] * scale + size / 2, -v[:, 1] * scale + size / 2, -v[:, 2] * scale], axis=1)
    white = np.full((size, size, 3), 255, np.uint8)
    return overlay_mesh(white, img_v, faces, colors, alpha=1.0)


def explorer(study_dir: str | Path, n_samples: int = 8, size: int = 192) -> str:
    """The offline explorer (:func:`dad3dlib.explorer.explorer_html`, an HTML fragment) of a study's
    first ``n_samples`` evaluation images: each ablation's first finished seed beside the ground truth,
    every sample cut around its head and shown at ``size`` pixels. A sentence when no run has
    finished yet."""
    import cv2
    import torch

    from .explorer import explorer_html, submesh

    runs = _run_dirs(Path(study_dir))
    if not runs:
        return "<p>No finished run yet: the explorer shows predictions once a run has finished.</p>"
    ctx = {d: _run_context(d) for d in dict.fromkeys(runs.values())}
    params, layer, pred0 = next(iter(ctx.values()))
    faces, keep = submesh(layer.faces.numpy(), layer.subset("head").numpy())
    items = [str(x) for x in pred0["item_id"][:n_samples]]
    if not items:
        return "<p>No evaluation sample to explore.</p>"
    frames, samples = [], []
    for item in items:
        img, gt_v = _sample(params, pred0["split"], item)
        box = _crop_box(gt_v)
        frames.append((np.array(box[:2], np.float64), size / (box[2] - box[0])))
        with torch.no_grad():
            gt_l = layer.landmarks68(torch.as_tensor(gt_v[None], dtype=torch.float32))[0, :, :2].numpy()
        image = cv2.resize(_cut(img, box), (size, size), interpolation=cv2.INTER_AREA)
        samples.append({"item_id": item, "image": image, "landmarks": _display(gt_l, *frames[-1]),
                        "vertices": _display(gt_v[keep], *frames[-1])})
    predictions = {}
    for d, (_, lay, pred) in ctx.items():
        index = {str(x): k for k, x in enumerate(pred["item_id"])}
        per_sample = pd.read_csv(d / "per_sample.csv").set_index("item_id")
        rows = []
        for item, frame in zip(items, frames):
            k = index.get(item)
            if k is None:
                rows.append(None)
                continue
            pv = predicted_mesh_image(lay, pred["params_3dmm"][k], pred["crop_affine"][k], int(pred["crop_size"]))
            m = per_sample.loc[item] if item in per_sample.index else {}
            caption = ", ".join(f"{METRICS[c][0]} {_num(c, m[c])}"
                                for c in ATTRIBUTE_METRICS if c in m)
            rows.append({"landmarks": _display(pred["landmarks_2d_image"][k], *frame),
                         "vertices": _display(pv[keep], *frame), "caption": caption})
        predictions[d.name] = rows
    return explorer_html(faces, samples, predictions, {name: d.name for name, d in runs.items()})


def _display(points: np.ndarray, origin: np.ndarray, scale: float) -> np.ndarray:
    """Image-pixel points [N,2] or [N,3] (x, y down, z away) -> the display frame of a cut at
    ``origin`` [2] shown ``scale`` times larger; depth centred on the points' mean."""
    out = np.asarray(points, np.float64).copy()
    out[:, :2] = (out[:, :2] - origin) * scale
    if out.shape[1] == 3:
        out[:, 2] = (out[:, 2] - out[:, 2].mean()) * scale
    return out


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
