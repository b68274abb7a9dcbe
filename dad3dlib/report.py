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

# name: its record (metrics.Metric: label, lower_is_better, ...), the registered metrics in the study scope
METRICS = {k: REGISTRY[k] for k in metric_names("study")}
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


def run_label(ablation: str, aliases=()) -> str:
    """How figures name a run reported under several names: its ablation with the aliases in
    parentheses, 'baseline (= l3d50_proj0.05)'; the ablation alone without aliases."""
    return f"{ablation} (= {', '.join(aliases)})" if len(aliases) else ablation


def one_name_per_run(table: pd.DataFrame) -> pd.DataFrame:
    """The rows of a table with ``ablation`` and ``run`` columns (:func:`run_table`,
    :func:`per_sample_table`) with each run under its first name only, so that a figure draws an
    alias of the baseline once, and a ``label`` column naming the aliases (:func:`run_label`). A
    table that has a ``label`` already, or no ``run`` column, keeps its rows (label: the ablation)."""
    if table.empty or "label" in table:
        return table
    if "run" not in table:
        return table.assign(label=table.ablation)
    names = table[["run", "ablation"]].drop_duplicates()
    first = names.drop_duplicates("run").set_index("run").ablation  # run -> the name it was planned under
    main = names.run.map(first)
    aliases = {a: list(dict.fromkeys(names.ablation[(main == a) & (names.ablation != a)])) for a in dict.fromkeys(first)}
    kept = table[table.ablation == table.run.map(first)]
    return kept.assign(label=kept.ablation.map(lambda a: run_label(a, aliases.get(a, []))))


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
    one-sentence description}, "split", ...}, as :func:`dad3dlib.references.evaluate_references`
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
    from .metrics import SHAPE_PROTOCOLS
    from .settings import StudySettings

    study_dir = Path(study_dir)
    paths = [study_dir / "runs" / r["run"] / "metrics.json" for r in study_runs(study_dir)]
    paths += sorted((study_dir / "references").glob("*/metrics.json"))
    used = dict.fromkeys(str(m.get("shape_protocol", StudySettings.shape_protocol))
                         for m in map(_read_json, paths) if isinstance(m, dict))
    if not used:
        return "No run has finished: the 3D shape error's protocol is not known yet."
    text = " ".join(f"**{p}**: {SHAPE_PROTOCOLS.get(p, 'unknown')}." for p in used)
    if len(used) > 1:
        return (f"The 3D shape errors were measured with different protocols ({', '.join(used)}), so they do "
                f"not compare across runs: {text} Re-evaluate the runs or set study.shape_protocol back.")
    return (f"3D shape error (median / mean / std, mm, each pooled over every scored distance of the split), "
            f"protocol {text}")


PRIMARY, EXPLORATORY = "primary", "exploratory"  # a comparison's role (an alias of the baseline has none)


def baseline_differences(per_sample: pd.DataFrame, baseline: str = "baseline",
                         hypotheses: dict[str, dict[str, str]] | None = None) -> pd.DataFrame:
    """Per ablation and metric, the difference from the baseline with the seed as the unit (see
    :mod:`dad3dlib.stats`): ``delta`` = mean over the shared seeds of the mean per-image difference
    (ablation − baseline, same seed, same image), ``delta_sd`` its SD over seeds, the 95 % interval
    with training and test-image noise (``lo``, ``hi``: Student's t on the seeds), ``p``, and the
    interval from test-image noise alone (``img_lo``, ``img_hi``, also with one seed).

    ``hypotheses`` ({ablation: {metric: "worse" | "better"}}, :func:`study_hypotheses`) name the
    primary comparisons (``role`` primary, ``expected`` the direction); ``p_holm`` is Holm over
    those only, their ``verdict`` (better / worse / not distinguishable) is on ``p_holm`` and
    ``hypothesis`` says confirmed / contradicted / not distinguishable. Every other comparison is
    exploratory: verdict on its unadjusted ``p``, no ``p_holm``. 'training noise unmeasured (1 seed)'
    (no interval, no p) when only one seed is shared; 'same run as baseline' for an alias (not tested).

    What the study could have detected (:func:`dad3dlib.stats.detectable_effect`, from this
    comparison's own noise, ``seed_var``, ``image_var``, ``within_var``): ``mde``, the difference
    found with 80 % power with these seeds and images at two-sided level ``alpha`` (0.05 for an
    exploratory comparison; 0.05 / the number of primaries for a primary one, Holm's most demanding step,
    so a conservative bound); for a primary not distinguishable, ``seeds_needed`` to find the observed
    difference with 80 % power at that level (inf: more than :data:`dad3dlib.stats.MAX_SEEDS`).

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
        t, noise = stats.seed_t_test(x), stats.noise(x)
        rows += [{"ablation": abl, "metric": k, "seeds": len(seeds), "n_items": int(np.isfinite(x[j]).any(0).sum()),
                  "alias": alias, "delta": t.delta[j], "delta_sd": t.delta_sd[j], "lo": t.lo[j], "hi": t.hi[j],
                  "p": t.p[j], "img_lo": t.img_lo[j], "img_hi": t.img_hi[j], "seed_var": noise.seed_var[j],
                  "image_var": noise.image_var[j], "within_var": noise.within_var[j], "noise_items": noise.n_images[j]}
                 for j, k in enumerate(metrics)]
    out = pd.DataFrame(rows)
    if out.empty:
        return out
    hypotheses = hypotheses or {}
    out["expected"] = [(hypotheses.get(a) or {}).get(k, "") for a, k in zip(out.ablation, out.metric)]
    out["role"] = np.where(out.alias, "", np.where(out.expected != "", PRIMARY, EXPLORATORY))
    tested = (out.seeds > 1) & ~out.alias
    out[["lo", "hi", "p"]] = out[["lo", "hi", "p"]].where(tested)
    primary = tested & (out.role == PRIMARY)
    out["p_holm"] = stats.holm(out.p.where(primary).to_numpy())
    lower = [METRICS[k].lower_is_better for k in out.metric]
    verdict = stats.verdicts(out.delta, np.where(out.role == PRIMARY, out.p_holm, out.p), lower)
    out["verdict"] = np.where(out.alias, "same run as baseline", np.where(out.seeds > 1, verdict, stats.UNMEASURED))
    out["hypothesis"] = np.where(primary, stats.hypothesis_verdicts(out.verdict, out.expected), "")
    out["alpha"] = np.where(out.role == PRIMARY, stats.ALPHA / max(int(primary.sum()), 1), stats.ALPHA)
    noise = stats.Noise(*(out[c].to_numpy() for c in ("seed_var", "image_var", "within_var", "noise_items")))
    out["mde"] = np.where(tested, stats.detectable_effect(noise, out.seeds, out.alpha), np.nan)
    unresolved = primary & (out.verdict == stats.NOT_DISTINGUISHABLE)
    out["seeds_needed"] = np.where(unresolved, stats.seeds_needed(out.delta, noise, out.alpha), np.nan)
    return out


def study_hypotheses(study_dir: str | Path) -> dict[str, dict[str, str]]:
    """Each ablation's primary hypothesis ({metric: expected direction}) as ``study.json`` recorded it
    when the study was planned; for a study planned before hypotheses were recorded, as the ablation
    files of this checkout state them now (:func:`dad3dlib.config.stated_hypothesis`; an ablation
    without a file has none)."""
    from .config import stated_hypothesis
    from .errors import ParamsError

    record = json.loads((Path(study_dir) / "study.json").read_text())
    if "hypotheses" in record:
        return record["hypotheses"]
    import warnings

    warnings.warn(f"{Path(study_dir) / 'study.json'} records no hypotheses (the study was planned before they were "
                  "recorded): the ablation files' present ones are used, which were not stated before this study ran",
                  stacklevel=2)
    out = {}
    for name in dict.fromkeys(n for r in record["runs"] for n in [r["ablation"], *r["aliases"]]):
        try:
            out[name] = stated_hypothesis(name)
        except ParamsError:
            out[name] = {}
    return out


def _cube(indexed: pd.DataFrame, seeds: list, items: list, metrics: list[str]) -> np.ndarray:
    """Per-sample values indexed by (seed, item_id) -> [M,S,N] on the given seeds and items (NaN where
    missing)."""
    grid = pd.MultiIndex.from_product([seeds, items])
    return indexed.reindex(grid)[metrics].to_numpy().reshape(len(seeds), len(items), len(metrics)).transpose(2, 0, 1)


def format_differences(differences: pd.DataFrame, split: str = UNRECORDED_SPLIT) -> pd.DataFrame:
    """:func:`baseline_differences` as one row per ablation and one labelled column per metric, each
    cell 'Δ [lo, hi] verdict (role); <split> images only [img_lo, img_hi]' (:func:`verdict_label`; no
    seed-level interval with one seed; ``split``: the evaluation split, :func:`evaluation_split`)."""
    if differences.empty:
        return pd.DataFrame()

    def cell(r) -> str:
        if r.alias:
            return r.verdict
        interval = f" {_interval(r.metric, r.lo, r.hi)}" if np.isfinite(r.lo) else ""
        images = f"; {split} images only {_interval(r.metric, r.img_lo, r.img_hi)}" if np.isfinite(r.img_lo) else ""
        return f"{format_metric(r.metric, r.delta, True)}{interval} {verdict_label(r)}{images}"

    table = differences.assign(cell=[cell(r) for r in differences.itertuples()]).pivot(
        index="ablation", columns="metric", values="cell")
    table = table.reindex(index=list(dict.fromkeys(differences.ablation)),
                          columns=[k for k in METRICS if k in table.columns])
    return table.rename(columns={k: m.label for k, m in METRICS.items()}).rename_axis(index=None, columns=None)


def verdict_label(r) -> str:
    """A comparison's verdict with its role (a row of :func:`baseline_differences`): 'worse (primary,
    Holm): confirmed', 'not distinguishable (primary, Holm)', 'worse (exploratory, unadjusted)'; with
    one seed or for an alias the verdict alone."""
    if r.alias or r.seeds < 2:
        return r.verdict
    if r.role == PRIMARY:
        return f"{r.verdict} ({PRIMARY}, Holm)" + (f": {r.hypothesis}" if r.hypothesis != r.verdict else "")
    return f"{r.verdict} ({EXPLORATORY}, unadjusted)"


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
    """The report's "Findings" (markdown). With several seeds: the design (:func:`design_note`) and
    the intervals, then **Primary hypotheses**, one line per primary comparison with its verdict
    (confirmed / contradicted / not distinguishable, Holm over the primaries), its difference and
    interval and, when not distinguishable, what the study could have detected and the seeds that
    would resolve the observed difference; then **Exploratory**, one sentence per ablation (aliases of
    the baseline left out) naming the other metrics whose unadjusted interval excludes 0. A
    distinguishable difference names the reference predictors the ablation equals on that metric
    (:func:`equals_reference`, with the image-level standard error of the ablation's mean from
    ``per_sample`` when given). With one seed every change is listed, as not yet distinguishable from
    training noise. ``split``: the evaluation split (:func:`evaluation_split`), named in the text."""
    if differences.empty:
        return f"No finished `{baseline}` run to compare with yet."
    seeds = int(differences.seeds.max())
    done = runs[runs.status == "finished"]
    refs = references if references is not None else pd.DataFrame()

    def same_as_references(r) -> str:  # "; equals `constant`'s (31.59)" for a row of differences
        values = done.loc[done.ablation == r.ablation, r.metric].to_numpy()
        se_img = _own_image_se(per_sample, r.ablation).get(r.metric, 0.0)
        matches = [f"`{name}`'s ({format_metric(r.metric, ref[r.metric])})" for name, ref in refs.iterrows()
                   if r.metric in ref and equals_reference(values, ref[r.metric], se_img)]
        return f"its {METRICS[r.metric].label} equals " + " and ".join(matches) if matches else ""

    if seeds < 2:
        intro = ("Training noise is unmeasured: this study has one seed per ablation, so no difference "
                 "below can be told from training noise; the changes are listed as measured, not as "
                 "findings (run the study with `--seeds 3` or more).")
    else:
        _, quantile, _ = stats.t_interval(0.0, 1.0, seeds - 1)
        intro = (design_note(differences, baseline) + "\n\n" +
                 f"Each difference from `{baseline}` has a 95 % interval whose training-noise part is a Student t "
                 f"over the {seeds} seeds (± {quantile:.2f} standard errors of the per-seed differences, "
                 f"{seeds - 1} degrees of freedom) and whose image part is the paired standard error over the "
                 f"{split} images, the two margins added in quadrature. With few seeds only large, consistent "
                 "effects can be told from training noise; not distinguishable does not mean equal.")
    lines = []
    for abl, d in differences.groupby("ablation", sort=False):
        if d.alias.all():
            continue
        one_seed = (d.seeds < 2).all()
        shown = d[d.delta != 0] if one_seed else d[(d.role == EXPLORATORY) & d.verdict.isin([stats.BETTER, stats.WORSE])]
        if shown.empty:
            others = "" if one_seed or not (d.role == PRIMARY).any() else "other "
            lines.append(f"- **{abl}**: no {others}metric distinguishable from training noise.")
            continue
        effects = []
        for r in shown.itertuples():
            interval = "" if one_seed else f" {_interval(r.metric, r.lo, r.hi)} {r.verdict}"
            effects.append(f"{METRICS[r.metric].label} {format_metric(r.metric, r.delta, True)}{interval}")
        text = f"- **{abl}**: " + ", ".join(effects) + (
            " (not yet distinguishable from training noise)" if one_seed else f" than `{baseline}`")
        same = [t for t in map(same_as_references, shown.itertuples()) if t]
        lines.append(text + ("; " + "; ".join(same) if same else "") + ".")
    if seeds < 2:
        return intro + "\n\n" + "\n".join(lines)
    primary = [_primary_line(r, split, same_as_references(r)) for r in differences.itertuples() if r.role == PRIMARY]
    return "\n\n".join([intro, "**Primary hypotheses**",
                         "\n".join(primary or ["- none stated: every comparison is exploratory"]),
                         f"**{EXPLORATORY.capitalize()}** (every other ablation × metric; unadjusted 95 % intervals)",
                         "\n".join(lines)])


def design_note(differences: pd.DataFrame, baseline: str = "baseline") -> str:
    """Two sentences on the study's design: primary hypotheses stated in the ablation files and
    Holm-corrected among themselves, every other comparison exploratory (counts from
    :func:`baseline_differences`)."""
    tested = differences[(differences.seeds > 1) & ~differences.alias]
    n_primary, n_other = int((tested.role == PRIMARY).sum()), int((tested.role == EXPLORATORY).sum())
    return (f"Each ablation states its primary hypothesis before the study runs (`hypothesis:` in "
            f"`params/ablations/<name>.yaml`: the metrics it should change and in which direction); these "
            f"{n_primary} comparisons with `{baseline}` are the confirmatory ones, Holm-corrected among themselves at "
            f"α = {stats.ALPHA:g}, each confirmed, contradicted (distinguishable, the other way) or not "
            f"distinguishable. The other {n_other} ablation × metric comparisons are exploratory: their intervals "
            "and verdicts are not corrected for multiplicity, so about 1 in 20 of them can look distinguishable by "
            "chance, and a finding among them is a lead for a next study, not a result.")


def _primary_line(r, split: str, same: str) -> str:
    """One primary comparison of :func:`findings` (a row of :func:`baseline_differences`)."""
    label = METRICS[r.metric].label
    head = f"- **{r.ablation}**: {label} expected {r.expected}"
    if r.seeds < 2:
        return f"{head}: {r.verdict}."
    line = (f"{head}: **{r.hypothesis}**, {format_metric(r.metric, r.delta, True)} "
            f"{_interval(r.metric, r.lo, r.hi)} (Holm p = {r.p_holm:.2g})")
    if same:
        line += f"; {same}"
    if r.hypothesis == stats.NOT_DISTINGUISHABLE:
        line += (f". With {r.seeds} seeds an effect on {label} smaller than ±{format_metric(r.metric, r.mde)} "
                 f"cannot be told from noise (80 % power, two-sided α = {r.alpha:.2g}, Holm's most demanding step)")
        observed = f"the observed {format_metric(r.metric, r.delta, True)}"
        line += (f"; {observed} would need {int(r.seeds_needed)} seeds" if np.isfinite(r.seeds_needed) else
                 f"; {observed} would not be resolved by {stats.MAX_SEEDS} seeds on these {r.n_items} {split} images")
    return line + "."


def detectable_table(differences: pd.DataFrame) -> pd.DataFrame:
    """What the study could have detected: one row per tested ablation (aliases and single seeds left
    out), one labelled column per metric, each cell the minimum detectable effect of
    :func:`baseline_differences` ('±0.52'; '±0.52 primary' for a primary hypothesis, at its
    most demanding Holm level), and a column with the seeds it assumes."""
    d = differences[(differences.seeds > 1) & ~differences.alias] if len(differences) else differences
    if d.empty:
        return pd.DataFrame()
    d = d.assign(cell=[f"±{format_metric(r.metric, r.mde)}" + (f" {PRIMARY}" if r.role == PRIMARY else "")
                       for r in d.itertuples()])
    table = d.pivot(index="ablation", columns="metric", values="cell")
    table = table.reindex(index=list(dict.fromkeys(d.ablation)), columns=[k for k in METRICS if k in table.columns])
    table = table.rename(columns={k: m.label for k, m in METRICS.items()})
    table.insert(0, "seeds", d.groupby("ablation", sort=False).seeds.max())
    return table.rename_axis(index=None, columns=None)


# The measured example of what seeds do not cover (README, "Replication across machines")
CROSS_MACHINE_EXAMPLE = (
    "For the cpu preset, a fresh clone of the same commit on another machine of the same kind gave, for seed 1, "
    "`no_2d` 15.42° where README's three seeds spanned 12.25-13.45°, and `no_l3d` 2.906 mm against 2.92-3.19")


def replication_note(study_dir: str | Path) -> str:
    """One markdown paragraph: seeds cover training noise on one machine only; the platform the runs
    recorded (``provenance.json``) and the measured cross-machine example (:data:`CROSS_MACHINE_EXAMPLE`)."""
    study_dir = Path(study_dir)
    platforms = _names([(_read_json(study_dir / "runs" / r["run"] / "provenance.json") or {}).get("platform")
                        for r in study_runs(study_dir)])
    where = f" (this study's runs: `{platforms}`, as their `provenance.json` records it)" if platforms else ""
    return (f"Seeds cover training noise on one machine only{where}: another machine, even of the same kind, "
            "rounds differently, the same seed follows another trajectory, and its numbers can land outside the "
            f"spread over seeds. {CROSS_MACHINE_EXAMPLE}. The intervals here say what another seed on this machine "
            "would give, not what another machine would.")


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
    each metric) joined with :func:`baseline_differences` under the study's hypotheses
    (``<metric>_role``, ``_expected``, ``_delta``, ``_delta_sd``, ``_lo``, ``_hi``, ``_p``, ``_p_holm``,
    ``_verdict``, ``_hypothesis``, ``_img_lo``, ``_img_hi``, ``_alpha``, ``_mde``, ``_seeds_needed``)."""
    study_dir = Path(study_dir)
    summary = summary_table(run_table(study_dir), reference_table(study_dir))
    diffs = baseline_differences(per_sample_table(study_dir), hypotheses=study_hypotheses(study_dir))
    if not diffs.empty:
        stats_cols = ["role", "expected", "delta", "delta_sd", "lo", "hi", "p", "p_holm", "verdict", "hypothesis",
                      "img_lo", "img_hi", "alpha", "mde", "seeds_needed"]
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
    for k in METRICS:
        label = METRICS[k].label
        out[label] = [format_metric(k, m) + (f" ({format_metric(k, lo)}–{format_metric(k, hi)})" if n > 1 else "")
                      for m, lo, hi, n in zip(summary[k], summary[k + "_min"], summary[k + "_max"],
                                              summary.seeds.fillna(0))]
    out["description"] = summary.description.fillna("")
    return out.rename_axis(None)


def training_curves(study_dir: str | Path) -> pd.DataFrame:
    """Long table (run, ablation, label, seed, step, epoch, metric, value) of every run's training log,
    each run once under its first name (``label`` names its aliases, :func:`run_label`)."""
    frames = [run_curves(Path(study_dir) / "runs" / r["run"]).assign(run=r["run"], ablation=r["ablation"],
                                                                     label=run_label(r["ablation"], r["aliases"]),
                                                                     seed=r["seed"])
              for r in study_runs(study_dir)]
    frames = [f for f in frames if not f.empty]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def run_curves(run_dir: str | Path) -> pd.DataFrame:
    """Long table (step, epoch, metric, value, ablation) of one run's training log (resumed versions
    joined); ablation: the one its ``params.yaml`` names, else the directory's name."""
    import yaml

    df = read_metrics(run_dir)
    if df is None or df.empty:
        return pd.DataFrame()
    params = Path(run_dir) / "params.yaml"
    try:
        ablation = (yaml.safe_load(params.read_text()) or {}).get("ablation") if params.exists() else None
    except (OSError, yaml.YAMLError):
        ablation = None
    ids = [c for c in ("step", "epoch") if c in df]
    return (df.melt(id_vars=ids, value_vars=[c for c in df if c not in ids], var_name="metric")
            .dropna(subset=["value"]).assign(ablation=str(ablation or Path(run_dir).name)))


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
