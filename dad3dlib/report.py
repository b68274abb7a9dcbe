"""Aggregation of a study directory into tables, plots and renders (used by aggregate.ipynb).

Reads what each run wrote (``runs/<run>/metrics.json``, ``per_sample.csv``, ``predictions.npz``,
the training log ``metrics.csv``) and nothing else, so it works on partial and finished studies.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

# name: (label, lower is better)
METRICS = {
    "median_mm": ("Median (mm)", True),
    "mean_mm": ("Mean (mm)", True),
    "std_mm": ("Std (mm)", True),
    "angle_error_deg": ("Angle error (°)", True),
    "nme_reprojection": ("Reprojection NME", True),
    "z5_accuracy": ("Z₅ accuracy (reference pairing)", False),
    "z5_accuracy_local": ("Z₅ accuracy (5 nearest, paper)", False),
}
CURVES = ("train/loss_step", "train/l3d_step", "train/l1_step", "train/lproj_step", "train/awing_step",
          "val/loss", "val/nme", "val/angle_error")
ATTRIBUTES = ("pose", "occlusions", "quality", "expression", "standard light")


def _runs(study_dir: Path) -> list[dict]:
    return json.loads((Path(study_dir) / "study.json").read_text())["runs"]


def run_table(study_dir: str | Path) -> pd.DataFrame:
    """One row per (ablation, seed) — aliases of a shared run get its numbers — with status and metrics."""
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


def _ci95(x: pd.Series) -> float:
    from scipy import stats

    x = x.dropna()
    return float(stats.t.ppf(0.975, len(x) - 1) * x.std(ddof=1) / np.sqrt(len(x))) if len(x) > 1 else np.nan


def summary_table(runs: pd.DataFrame) -> pd.DataFrame:
    """Per ablation: mean over seeds and the 95 % CI half-width (NaN with one seed) of each metric."""
    done = runs[runs.status == "finished"]
    order = list(dict.fromkeys(runs.ablation))
    g = done.groupby("ablation", sort=False)
    out = pd.DataFrame({"seeds": g.size()})
    for k in METRICS:
        out[k] = g[k].mean()
        out[k + "_ci95"] = g[k].agg(_ci95)
    return out.reindex([a for a in order if a in out.index])


def paired_deltas(per_sample: pd.DataFrame, baseline: str = "baseline") -> pd.DataFrame:
    """Per ablation and per-sample metric: mean difference vs the baseline on the same test items
    and seeds, and the Wilcoxon signed-rank p-value of the paired differences."""
    from scipy import stats

    if per_sample.empty or baseline not in set(per_sample.ablation):
        return pd.DataFrame()
    keys = ["item_id", "seed"]
    base = per_sample[per_sample.ablation == baseline].set_index(keys)
    rows = []
    for abl, df in per_sample.groupby("ablation", sort=False):
        if abl == baseline:
            continue
        df = df.set_index(keys)
        common = df.index.intersection(base.index)
        for k in METRICS:
            if k not in df or k not in base:
                continue
            d = (df.loc[common, k] - base.loc[common, k]).dropna()
            p = np.nan
            if len(d) > 0 and (d != 0).any():
                p = float(stats.wilcoxon(d).pvalue)
            rows.append({"ablation": abl, "metric": k, "delta": float(d.mean()) if len(d) else np.nan,
                         "p_value": p, "n": len(d)})
    return pd.DataFrame(rows)


def format_deltas(deltas: pd.DataFrame) -> pd.DataFrame:
    """:func:`paired_deltas` as one row per ablation and one labelled column per metric, each cell
    'Δ (p=…)': the signed mean difference and its p-value ('identical' when every difference is 0)."""
    if deltas.empty:
        return pd.DataFrame()

    def cell(r) -> str:
        if not np.isfinite(r.p_value):
            return "identical" if r.delta == 0 else f"{r.delta:+.3g}"
        return f"{r.delta:+.{3 if r.metric.startswith('z5') else 2}f} (p={r.p_value:.1g})"

    table = deltas.assign(cell=[cell(r) for r in deltas.itertuples()]).pivot(
        index="ablation", columns="metric", values="cell")
    table = table.reindex(index=list(dict.fromkeys(deltas.ablation)),
                          columns=[k for k in METRICS if k in table.columns])
    return table.rename(columns={k: label for k, (label, _) in METRICS.items()}).rename_axis(columns=None)


def write_summary(study_dir: str | Path) -> Path:
    """``summary.csv``: per ablation, the six metrics (mean ± CI over seeds), deltas vs baseline and p-values."""
    study_dir = Path(study_dir)
    summary = summary_table(run_table(study_dir))
    deltas = paired_deltas(per_sample_table(study_dir))
    if not deltas.empty:
        wide = deltas.pivot(index="ablation", columns="metric", values=["delta", "p_value"])
        wide.columns = [f"{m}_{stat}" for stat, m in wide.columns]
        summary = summary.join(wide)
    path = study_dir / "summary.csv"
    tmp = path.with_name("summary.csv.tmp")
    summary.to_csv(tmp, index_label="ablation")
    tmp.replace(path)
    return path


def format_summary(summary: pd.DataFrame) -> pd.DataFrame:
    """The six metrics as 'mean ± ci' strings (just the mean with one seed), labelled."""
    out = pd.DataFrame(index=summary.index)
    for k, (label, _) in METRICS.items():
        ci = summary[k + "_ci95"]
        digits = 3 if k.startswith("z5") else 2
        out[label] = [f"{m:.{digits}f}" + ("" if np.isnan(c) else f" ± {c:.{digits}f}")
                      for m, c in zip(summary[k], ci)]
    return out


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
    terms per step and the validation metrics)."""
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
        ax.set_title(m, fontsize=9)
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
    from .render import orthographic_projection

    lo, hi = float(z.min()), float(z.max())
    margin = 0.05 * (hi - lo) + 1.0
    return orthographic_projection(0.0, float(height), near=lo - margin, far=hi + margin)


IMAGE_MV = np.diag([1.0, -1.0, -1.0, 1.0])


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


_RENDERERS: dict = {}


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
    """(params, FlameLayer, predictions dict) of a finished run."""
    from .config import load_params
    from .data import flame_dir

    params = load_params(run_dir / "params.yaml")
    layer = _layer(flame_dir(params["data"]))
    pred = dict(np.load(run_dir / "predictions.npz", allow_pickle=False))
    return params, layer, pred


_LAYERS: dict = {}


def _layer(flame_dir):
    from .flame import FlameLayer, load_flame_assets

    if flame_dir not in _LAYERS:
        _LAYERS[flame_dir] = FlameLayer(load_flame_assets(flame_dir)).eval()
    return _LAYERS[flame_dir]


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
    from .render import project

    ds = _dataset(params["data"]["root"], split, params["data"]["crop_size"], params["data"])
    i = ds.position(item_id)
    img = ds.image(i)
    v, mv, p, _ = ds.geometry(i, img.shape[0])
    v = v.astype(np.float64)
    xy = project(v, mv, p, img.shape[0])
    depth = -(v @ mv[:3, :3].T + mv[:3, 3])[:, 2]
    z = (depth - depth.mean()) * p[0, 0] / depth.mean()  # depth in pixel units around the head
    return img, np.concatenate([xy, z[:, None]], axis=1)


_DATASETS: dict = {}


def _dataset(root: str, split: str, crop_size: int, data: dict):
    from .data import DAD3DHeadsDataset, flame_dir
    from .flame import load_flame_assets

    key = (root, split)
    if key not in _DATASETS:
        assets = load_flame_assets(flame_dir(data), require_model=False)
        _DATASETS[key] = DAD3DHeadsDataset(root, split, crop_size, assets, skip_bad=data.get("skip_bad", False))
    return _DATASETS[key]


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


def plot_predictions(run_dir: str | Path, params: dict | None = None, n: int = 8, split: str = "test"):
    """A run's first ``n`` test images: GT landmarks (green), predicted landmarks (red), predicted mesh."""
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
        img, gt_v = _sample(params, split, item)
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


def plot_mesh_comparison(study_dir: str | Path, n_items: int = 4, split: str = "test"):
    """Rows: the same test images; columns: image, GT mesh, each ablation's predicted mesh."""
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
        img, gt_v = _sample(params, split, item)
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


def explorer(study_dir: str | Path, split: str = "test"):
    """ipywidgets: pick an ablation and a test sample; see the image, landmarks and the predicted mesh.
    In a static HTML export the widget renders as nothing; the figures above are the static version."""
    import ipywidgets as widgets
    import matplotlib.pyplot as plt
    from IPython.display import display

    runs = _run_dirs(Path(study_dir))
    if not runs:
        return None
    names = list(runs)
    n = len(np.load(runs[names[0]] / "predictions.npz", allow_pickle=False)["item_id"])
    out = widgets.Output()

    def show(ablation, sample):
        with out:
            out.clear_output(wait=True)
            ctx = _run_context(runs[ablation])
            params, layer, pred = ctx
            item = str(pred["item_id"][sample])
            img, gt_v = _sample(params, split, item)
            pv = predicted_mesh_image(layer, pred["params_3dmm"][sample], pred["crop_affine"][sample],
                                      int(pred["crop_size"]))
            box = _crop_box(gt_v)
            fig, axes = plt.subplots(1, 3, figsize=(10, 3.5))
            axes[0].imshow(_cut(img, box))
            axes[0].scatter(*(pred["landmarks_2d_image"][sample] - np.array(box[:2])).T, s=5, c="red")
            axes[1].imshow(_cut(overlay_mesh(img, pv, layer.faces.numpy()), box))
            axes[2].imshow(_cut(overlay_mesh(img, gt_v, layer.faces.numpy(), (0.55, 0.8, 0.55)), box))
            for ax, t in zip(axes, (f"{item}: predicted landmarks", f"{ablation}: predicted mesh", "ground truth")):
                ax.set_title(t, fontsize=9)
                ax.axis("off")
            plt.show()

    ui = widgets.interactive(show, ablation=widgets.Dropdown(options=names, description="ablation"),
                             sample=widgets.IntSlider(0, 0, n - 1, description="sample"))
    display(widgets.VBox([ui.children[0], ui.children[1], out]))
    show(names[0], 0)
    return None


def run_curves(run_dir: str | Path) -> pd.DataFrame:
    """Long table (step, epoch, metric, value) of one run's training log (resumed versions joined)."""
    from .train import read_metrics

    df = read_metrics(run_dir)
    if df is None or df.empty:
        return pd.DataFrame()
    ids = [c for c in ("step", "epoch") if c in df]
    return (df.melt(id_vars=ids, value_vars=[c for c in df if c not in ids], var_name="metric")
            .dropna(subset=["value"]).assign(ablation=Path(run_dir).name))
