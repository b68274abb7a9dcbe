"""Exploring a study in JupyterLab: which study a notebook opens (:func:`find_study`), and the live
results browser (:class:`ResultsBrowser`, ipywidgets) over every seed and every evaluation image.

The browser reads the study with :mod:`dad3dlib.report`'s readers and draws with
:mod:`dad3dlib.viz` (its plot by image attribute, and its explorer for the selected image: the
image with the ground-truth and predicted landmarks, the predicted mesh beside the ground truth's).
Widgets need a running kernel; in the exported ``report.html`` they would render as nothing, so
the report keeps the static explorer (:func:`dad3dlib.viz.explorer`) instead.
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from . import OUTPUTS_DIR, report
from .errors import InputFileNotFound

DEFAULT_STUDY = "cpu"  # under outputs/: what `make study` writes (the default preset's study)


# --------------------------------------------------------------------------------------------
# Which study
# --------------------------------------------------------------------------------------------
class StudyNotFound(InputFileNotFound):
    """No study where a notebook looked. A notebook shows it as its one-line message (IPython's
    ``_render_traceback_`` hook), not as a traceback."""

    def _render_traceback_(self) -> list[str]:
        return [f"error: {self}"]


def studies(outputs: str | Path = OUTPUTS_DIR) -> list[Path]:
    """The study directories (those holding a ``study.json``) up to two levels under ``outputs``,
    the most recently written first."""
    found = {p.parent for pattern in ("*/study.json", "*/*/study.json") for p in Path(outputs).glob(pattern)}
    return sorted(found, key=lambda d: (d / "study.json").stat().st_mtime, reverse=True)


def find_study(study_dir: str | Path | None = None, outputs: str | Path = OUTPUTS_DIR) -> tuple[Path, str]:
    """(the study a notebook opens, a sentence saying which): ``study_dir`` when given; else
    ``outputs/cpu`` (the default study, what ``make study`` writes) when it holds one; else the most
    recent study under ``outputs``. :class:`StudyNotFound`, one line listing the studies found,
    when there is none there."""
    outputs = Path(outputs)
    found = studies(outputs)
    listing = (f"studies under {outputs}: {', '.join(str(d.relative_to(outputs)) for d in found)}" if found
               else f"no study under {outputs} (`make study` writes {outputs / DEFAULT_STUDY})")
    if study_dir is not None:
        study_dir = Path(study_dir)
        if not (study_dir / "study.json").is_file():
            raise StudyNotFound(f"{study_dir}: not a study directory (no study.json); {listing}; "
                                "set study_dir in the parameters cell")
        return study_dir, f"study: {study_dir}"
    default = outputs / DEFAULT_STUDY
    if (default / "study.json").is_file():
        return default, f"study: {default} (the default study, what `make study` writes)"
    if not found:
        raise StudyNotFound(f"{listing}; run it, or set study_dir in the parameters cell to a study directory")
    return found[0], (f"study: {found[0]} (the most recent study under {outputs}; the default study {default} "
                      "does not exist; set study_dir in the parameters cell for another)")


# --------------------------------------------------------------------------------------------
# Per-image results
# --------------------------------------------------------------------------------------------
def value_column(metric: str, against: str | None = None) -> str:
    """The name of the column :func:`image_results` fills: the metric, or 'Δ <its label>'."""
    return metric if against is None else f"Δ {report.METRICS[metric].label}"


def image_results(per_sample: pd.DataFrame, metric: str, against: str | None = None) -> pd.DataFrame:
    """One row per (ablation, seed, evaluation image) of :func:`dad3dlib.report.per_sample_table`
    with the metric in :func:`value_column`; with ``against`` (an ablation, the baseline), the
    per-image difference instead: this row's value minus that ablation's on the same seed and image
    (``<against>_value``, ``<against>_run`` beside it), rows of that ablation's own runs (itself and
    its aliases) left out, and images it lacks dropped."""
    rows = per_sample.dropna(subset=[metric])
    if against is None:
        return rows.reset_index(drop=True)
    base = rows.loc[rows.ablation == against, ["seed", "item_id", "run", metric]].drop_duplicates(["seed", "item_id"])
    base = base.rename(columns={"run": f"{against}_run", metric: f"{against}_value"})
    out = rows.merge(base, on=["seed", "item_id"], how="inner")
    out = out[out.run != out[f"{against}_run"]].reset_index(drop=True)
    return out.assign(**{value_column(metric, against): out[metric] - out[f"{against}_value"]})


def select(results: pd.DataFrame, ablations=None, seeds=None, filters: dict | None = None) -> pd.DataFrame:
    """The rows of the given ablations and seeds (None: all) whose image attributes equal
    ``filters`` ({attribute: value}; a value None: any)."""
    keep = pd.Series(True, index=results.index)
    if ablations is not None:
        keep &= results.ablation.isin(list(ablations))
    if seeds is not None:
        keep &= results.seed.isin(list(seeds))
    for attribute, value in (filters or {}).items():
        if value is not None:
            keep &= results[attribute].astype(str) == str(value)
    return results[keep]


def worst_first(results: pd.DataFrame, metric: str, column: str) -> pd.DataFrame:
    """The rows ordered from the worst value of ``column`` (the metric, or a difference in it) to
    the best, by the metric's registered direction; ties by ablation, seed and image."""
    lower_is_better = report.METRICS[metric].lower_is_better
    return results.sort_values([column, "ablation", "seed", "item_id"],
                               ascending=[not lower_is_better, True, True, True], kind="stable")


# --------------------------------------------------------------------------------------------
# The widgets
# --------------------------------------------------------------------------------------------
ANY = "any"  # an attribute filter that keeps every value


class ResultsBrowser:
    """The live results browser of a study: pick ablations, seeds, a metric, whether to show each
    image's difference from the baseline (same seed, same image), and image-attribute filters; see
    how many images that selects, each ablation's mean, the metric by image attribute
    (:func:`dad3dlib.viz.plot_by_attribute`) and the worst images; select one to see it with its
    landmarks and the predicted and ground-truth meshes (:func:`dad3dlib.viz.explorer`), the
    baseline's prediction on the same seed beside it. Display it in a notebook (``display(b)``, or as
    a cell's last value); its widgets are attributes, for scripts and tests."""

    def __init__(self, study_dir: str | Path, baseline: str = "baseline", n_worst: int = 12):
        import ipywidgets as w

        self.study_dir, self.baseline = Path(study_dir), baseline
        self.per_sample = report.per_sample_table(self.study_dir)
        self.message = w.HTML()
        self.plot, self.sample = w.Output(), w.Output()
        if self.per_sample.empty:
            self.message.value = ("<p>No finished run yet: the browser shows each image's results once a run has "
                                  "finished.</p>")
            self.widget = w.VBox([self.message])
            return
        ps = self.per_sample
        names = list(dict.fromkeys(ps.ablation))
        seeds = sorted(ps.seed.unique().tolist())
        wide = {"description_width": "initial"}
        distinct = tuple(ps.drop_duplicates("run").ablation.drop_duplicates())  # an alias repeats its run's rows
        self.ablations = w.SelectMultiple(options=names, value=distinct,
                                          rows=min(len(names), 8), description="ablations", style=wide)
        self.seeds = w.SelectMultiple(options=seeds, value=tuple(seeds), rows=min(len(seeds), 8), description="seeds")
        metrics = [k for k in report.METRICS if k in ps]
        self.metric = w.Dropdown(options=[(report.METRICS[k].label, k) for k in metrics], value=metrics[0],
                                 description="metric")
        self.against = w.Checkbox(value=False, description=f"each image's difference from {baseline} (same seed)",
                                  disabled=baseline not in names, style=wide, indent=False,
                                  layout=w.Layout(width="auto"))
        self.filters = {a: w.Dropdown(options=[ANY, *sorted(ps[a].dropna().astype(str).unique())], value=ANY,
                                      description=a, style=wide)
                        for a in report.ATTRIBUTES if a in ps}
        self.n_worst = w.BoundedIntText(value=n_worst, min=1, max=len(ps), description="worst images shown", style=wide)
        self.images = w.Select(options=[], rows=12, description="image", layout=w.Layout(width="95%"))
        for control in (self.ablations, self.seeds, self.metric, self.against, self.n_worst, *self.filters.values()):
            control.observe(self.refresh, names="value")
        self.images.observe(self.show, names="value")
        self.widget = w.VBox([
            w.HBox([self.ablations, self.seeds, w.VBox([self.metric, self.against, self.n_worst])]),
            w.HBox(list(self.filters.values()), layout=w.Layout(flex_flow="row wrap")),
            self.message, self.plot, self.images, self.sample])
        self.refresh()

    def _ipython_display_(self):
        from IPython.display import display

        display(self.widget)

    # -- what is selected ---------------------------------------------------------------------
    @property
    def column(self) -> str:
        return value_column(self.metric.value, self.baseline if self.against.value else None)

    def results(self) -> pd.DataFrame:
        """Every selected (ablation, seed, image) row, worst first (:func:`worst_first`)."""
        table = image_results(self.per_sample, self.metric.value, self.baseline if self.against.value else None)
        filters = {a: None if d.value == ANY else d.value for a, d in self.filters.items()}
        table = select(table, self.ablations.value, self.seeds.value, filters)
        return worst_first(table, self.metric.value, self.column)

    # -- updates ------------------------------------------------------------------------------
    def refresh(self, change=None) -> None:
        """Recompute the selection: the summary line, the plot, the list of worst images (the
        first one selected, which shows it)."""
        import matplotlib.pyplot as plt
        from IPython.display import display

        from . import viz

        table, column, metric = self.results(), self.column, self.metric.value
        self.shown = table.head(self.n_worst.value).reset_index(drop=True)
        means = table.groupby("ablation")[column].mean().reindex([a for a in self.ablations.options if a in
                                                                   set(table.ablation)])
        results = f"{len(table)} image result" + ("" if len(table) == 1 else "s")
        self.message.value = (f"<p>{results} ({table.item_id.nunique()} images, "
                              f"{table.seed.nunique()} seed(s), {table.ablation.nunique()} ablation(s)); mean "
                              f"{column if self.against.value else report.METRICS[metric].label}: "
                              + ", ".join(f"{a} {report.format_metric(metric, v, self.against.value)}"
                                          for a, v in means.items()) + "</p>")
        with self.plot:
            self.plot.clear_output(wait=True)
            fig = viz.plot_by_attribute(table, column) if len(table) else None
            if fig is not None:
                display(fig)
                plt.close(fig)
        self.images.unobserve(self.show, names="value")
        self.images.options = [(self._label(r), k) for k, r in enumerate(self.shown.itertuples())]
        self.images.value = 0 if len(self.shown) else None
        self.images.observe(self.show, names="value")
        self.show()

    def _label(self, r) -> str:
        metric = self.metric.value
        value = report.format_metric(metric, getattr(r, metric))
        text = f"{r.ablation} · seed {r.seed} · {r.item_id} · {report.METRICS[metric].label} {value}"
        if self.against.value:
            delta = report.format_metric(metric, getattr(r, metric) - getattr(r, f"{self.baseline}_value"), True)
            text += f" (Δ {delta} from {self.baseline})"
        return text

    def show(self, change=None) -> None:
        """Show the selected image (:meth:`sample_html`)."""
        from IPython.display import HTML, display

        with self.sample:
            self.sample.clear_output(wait=True)
            display(HTML(self.sample_html()))

    def sample_html(self) -> str:
        """The selected image: its attributes and :func:`dad3dlib.viz.explorer` for it, with the
        row's run and the baseline's run of the same seed (a sentence when there is nothing to show)."""
        from . import viz

        if self.images.value is None:
            return "<p>No image matches the selection.</p>"
        row = self.shown.iloc[self.images.value]
        runs = {f"{row.ablation} (seed {row.seed})": self.study_dir / "runs" / row.run}
        base = self.per_sample[(self.per_sample.ablation == self.baseline) & (self.per_sample.seed == row.seed)]
        if len(base) and base.run.iloc[0] != row.run:
            runs[f"{self.baseline} (seed {row.seed})"] = self.study_dir / "runs" / base.run.iloc[0]
        missing = [str(d / "predictions.npz") for d in runs.values() if not (d / "predictions.npz").exists()]
        if missing:
            return f"<p>No predictions to show: {', '.join(missing)} not found.</p>"
        return (f"<p><b>{row.item_id}</b>: " + ", ".join(f"{a} {row[a]}" for a in self.filters) + "</p>"
                + viz.explorer(self.study_dir, items=[row.item_id], runs=runs))
