"""Figures: plots of the study's tables, images of meshes (renders, predictions over their images),
the report's explorer data, and the ``show-head`` / ``show-data`` commands. The numbers they show
come from :mod:`dad3dlib.report`.

Shapes: V vertices, F faces, H x W images (uint8 RGB, top-down). Views: positive yaw shows the
subject's left cheek, positive pitch looks from above (:func:`view_rotation`).

Caches (module state, all here; :func:`clear_caches` empties them): renderers by image size
(``(width, height)``, they depend on nothing else), FLAME layers by FLAME directory, data sets by
(root, split, crop size, FLAME directory, skip_bad). A FLAME layer or data set is rebuilt when a
file it was read from changes: :class:`FileCache` compares each file's path, mtime and size.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

from .explorer import COLOURS, explorer_html, submesh
from .files import atomic_write
from .geometry import FLIP_YZ, apply_affine, edge_counts, orthographic_projection, perspective_projection, project
from .losses import LOSS_TERMS
from .report import (ATTRIBUTE_METRICS, ATTRIBUTES, CURVES, METRICS, UNRECORDED_SPLIT, format_metric, one_name_per_run,
                     run_label, study_runs)
from .settings import DataSettings


# --------------------------------------------------------------------------------------------
# One colour per ablation, the same in every figure of the report and the notebooks
# --------------------------------------------------------------------------------------------
PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
           "#17becf", "#aec7e8", "#ffbb78", "#98df8a", "#ff9896", "#c5b0d5", "#c49c94", "#f7b6d2", "#dbdb8d",
           "#9edae5", "#393b79")  # matplotlib's tab10, then tab20's light ones
_OTHER_COLOURS: dict[str, str] = {}  # ablations without a params file, in the order first drawn


def ablation_colour(ablation: str) -> str:
    """An ablation's colour: the study's ablations (params/ablations/, baseline first, as ``make study``
    runs them) take :data:`PALETTE`'s colours in that order, so every figure and notebook agrees; any
    other name takes the next colour not taken, kept for the rest of the session."""
    from .plan import default_ablations

    known = default_ablations()
    if ablation in known:
        return PALETTE[known.index(ablation) % len(PALETTE)]
    if ablation not in _OTHER_COLOURS:
        _OTHER_COLOURS[ablation] = PALETTE[(len(known) + len(_OTHER_COLOURS)) % len(PALETTE)]
    return _OTHER_COLOURS[ablation]


def _labelled(table: pd.DataFrame) -> tuple[pd.DataFrame, dict[str, str]]:
    """A table's rows with each run once under its label (:func:`dad3dlib.report.one_name_per_run`)
    and the palette {label: its ablation's colour}."""
    table = one_name_per_run(table)
    pairs = table[["label", "ablation"]].drop_duplicates("label")
    return table, {lab: ablation_colour(a) for lab, a in zip(pairs.label, pairs.ablation)}


# --------------------------------------------------------------------------------------------
# Plots of the study's tables (dad3dlib.report's)
# --------------------------------------------------------------------------------------------
def plot_metrics(runs: pd.DataFrame):
    """One seaborn bar panel per metric, one bar per ablation in its colour (an alias named in the
    baseline's label, not drawn): the mean over seeds, whiskers from the lowest to the highest seed,
    dots the seeds."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    done, palette = _labelled(runs[runs.status == "finished"])
    fig, axes = plt.subplots(1, len(METRICS), figsize=(3.0 * len(METRICS), 3.9))
    for ax, (k, metric) in zip(axes, METRICS.items()):
        sns.barplot(data=done, x="label", y=k, hue="label", palette=palette, saturation=1, ax=ax,
                    errorbar=("pi", 100), legend=False)
        sns.stripplot(data=done, x="label", y=k, ax=ax, color="k", size=3)
        ax.set_title(metric.label + (" ↓" if metric.lower_is_better else " ↑"), fontsize=9)
        ax.set_xlabel("")
        ax.set_ylabel("")
        ax.tick_params(axis="x", rotation=70, labelsize=8)
    fig.suptitle("bars: mean over seeds; whiskers: lowest to highest seed; dots: the seeds", fontsize=9)
    fig.tight_layout()
    return fig


def curve_title(metric: str) -> str:
    """A panel title: a loss term's display name and which of its values the curve holds."""
    for k, t in LOSS_TERMS.items():
        if metric == f"train/raw/{k}_step":
            return f"{t.label} unweighted, training steps ({metric})"
        if metric == f"val/raw/{k}":
            return f"{t.label} unweighted, validation, every run ({metric})"
        if metric in (f"train/{k}_step", f"val/{k}"):
            return f"λ·{t.label}, weighted ({metric})"
    return metric


def band_note(curves: pd.DataFrame) -> str:
    """What the training curves' lines and bands are, with the number of seeds they summarise."""
    if "seed" not in curves:
        return "one run"
    counts = curves.groupby("label" if "label" in curves else "ablation").seed.nunique()
    lo, hi = int(counts.min()), int(counts.max())
    if hi < 2:
        return "one seed per ablation: one line each, no band"
    seeds = f"{hi} seeds" if lo == hi else f"{lo}-{hi} seeds"
    return f"line: the mean over each ablation's {seeds} at each step; band: the lowest to the highest seed"


def plot_training_curves(curves: pd.DataFrame, metrics: list[str] | None = None):
    """Training curves on shared axes, one panel per metric (default: ``report.CURVES``, each loss
    term unweighted, while trained and at validation for every run, and the validation metrics; runs
    logged before the unweighted terms were kept show only the rest): one line per ablation in its
    colour, the mean over its seeds with a band from the lowest to the highest seed
    (:func:`band_note`, the figure's title), an alias of the baseline named in the baseline's label."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    if curves.empty:
        return None
    curves, palette = _labelled(curves)
    logged = set(curves.metric)
    metrics = metrics or [m for m in CURVES if m in logged] or sorted(logged)
    cols = 3
    rows = -(-len(metrics) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.0 * rows + 0.4), squeeze=False)
    for ax, m in zip(axes.flat, metrics):
        d = curves[curves.metric == m]
        x = "step" if "step" in d and d["step"].notna().any() else "epoch"
        sns.lineplot(data=d, x=x, y="value", hue="label", palette=palette, ax=ax, legend=ax is axes.flat[0],
                     estimator="mean", errorbar=("pi", 100))
        ax.set_title(curve_title(m), fontsize=9)
        ax.set_ylabel("")
        if d["value"].gt(0).all() and d["value"].max() / max(d["value"].min(), 1e-12) > 50:
            ax.set_yscale("log")
    if axes.flat[0].get_legend() is not None:
        axes.flat[0].get_legend().set_title("")
    for ax in axes.flat[len(metrics):]:
        ax.axis("off")
    fig.suptitle(band_note(curves), fontsize=9)
    fig.tight_layout()
    return fig


def plot_by_attribute(per_sample: pd.DataFrame, metric: str = "nme_reprojection"):
    """The metric per ablation (mean over its seeds and images, in its colour; an alias of the
    baseline named in the baseline's label, not drawn), split by each image attribute present. For the
    mm statistics the per-image values are each image's own median / mean / std, not the statistics
    of the pooled distances that evaluation.json's by_attribute holds."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    attrs = [a for a in ATTRIBUTES if a in per_sample]
    if per_sample.empty or not attrs:
        return None
    per_sample, palette = _labelled(per_sample)
    fig, axes = plt.subplots(1, len(attrs), figsize=(4.5 * len(attrs), 3.6), squeeze=False)
    for ax, a in zip(axes.flat, attrs):
        sns.barplot(data=per_sample, x=a, y=metric, hue="label", palette=palette, saturation=1, ax=ax,
                    errorbar=None)
        ax.set_title(f"{METRICS[metric].label if metric in METRICS else metric} by {a}", fontsize=9)
        ax.set_ylabel(f"{metric}: mean over images", fontsize=8)  # of per-image values, not pooled distances
        ax.legend(fontsize=6) if ax is axes.flat[0] else ax.get_legend().remove()
    fig.tight_layout()
    return fig


# --------------------------------------------------------------------------------------------
# Caches: renderers, FLAME layers, data sets
# --------------------------------------------------------------------------------------------
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
_LAYERS = FileCache()  # FLAME directory -> FlameLayer; stamp: the directory's files
_DATASETS = FileCache()  # (root, split, crop size, FLAME directory, skip_bad) -> DAD3DHeadsDataset;
#                          stamp: the FLAME directory's files and the split's annotation file


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


def _layer(flame_dir):
    from .flame import FlameLayer, load_flame_assets

    path = Path(flame_dir)
    return _LAYERS.get(str(path), [path], lambda: FlameLayer(load_flame_assets(path)).eval())


def _dataset(data: DataSettings, split: str):
    from .data import DAD3DHeadsDataset, dataset_dir, flame_dir
    from .flame import load_flame_assets

    flame, root, crop_size, skip_bad = flame_dir(data), data.root, data.crop_size, data.skip_bad

    def build():
        assets = load_flame_assets(flame, require_model=False)
        return DAD3DHeadsDataset(root, split, crop_size, assets, skip_bad=skip_bad)

    split_file = dataset_dir(root) / split / f"{split}.json"
    return _DATASETS.get((str(root), split, crop_size, str(flame), skip_bad), [flame, split_file], build)


# --------------------------------------------------------------------------------------------
# Images of meshes
# --------------------------------------------------------------------------------------------
def view_rotation(yaw_deg: float, pitch_deg: float = 0.0) -> np.ndarray:
    """R [3,3] turning a model-space head (y up, facing +z) to a view from ``yaw_deg`` (about y,
    positive shows the subject's left cheek) and ``pitch_deg`` (about x, positive looks from above)."""
    from scipy.spatial.transform import Rotation

    return Rotation.from_euler("xy", [pitch_deg, -yaw_deg], degrees=True).as_matrix()


def orbit_camera(yaw_deg: float, pitch_deg: float, centre, distance: float, size: int,
                 field_m: float) -> tuple[np.ndarray, np.ndarray]:
    """Model-view [4,4] and projection [4,4] (docs/ARCHITECTURE.md convention) of a camera on a
    sphere around ``centre``, looking from yaw and pitch (:func:`view_rotation`), seeing ``field_m``
    metres across a square image of ``size``."""
    R = view_rotation(yaw_deg, pitch_deg)
    mv = np.eye(4)
    mv[:3, :3] = R
    mv[:3, 3] = -R @ np.asarray(centre, float) + (0.0, 0.0, -distance)
    p = perspective_projection(size * distance / field_m, size / 2, size / 2, 0.1 * distance, 10 * distance)
    return mv, p


def render_views(renderer, vertices: np.ndarray, faces: np.ndarray, colors: np.ndarray, views, centre,
                 field_m: float, background: int = 255) -> list[np.ndarray]:
    """One image [H,W,3] per (yaw, pitch) view of a mesh: vertices [V,3], faces [F,3], colors [V,3]."""
    size = renderer.width
    bg = np.full((size, size, 3), background, np.uint8)
    out = []
    for yaw, pitch in views:
        mv, p = orbit_camera(yaw, pitch, centre, 1.0, size, field_m)
        out.append(renderer.render(vertices, faces, colors, mv, p, background=bg)[0])
    return out


def render_head(vertices: np.ndarray, faces: np.ndarray, colors: np.ndarray, yaw_deg: float = 0.0,
                size: int = 256) -> np.ndarray:
    """A model-space head seen from ``yaw_deg`` (:func:`view_rotation`) with an orthographic camera,
    filling a size×size white image: vertices [V,3], faces [F,3], colors [V,3] -> [size,size,3]."""
    v = (vertices - vertices.mean(0)) @ view_rotation(yaw_deg).T
    scale = 0.9 * size / (v[:, :2].max(0) - v[:, :2].min(0)).max()
    img_v = np.stack([v[:, 0] * scale + size / 2, -v[:, 1] * scale + size / 2, -v[:, 2] * scale], axis=1)
    white = np.full((size, size, 3), 255, np.uint8)
    return overlay_mesh(white, img_v, faces, colors, alpha=1.0)


def image_space_projection(height: int, z: np.ndarray) -> np.ndarray:
    """P for vertices given in image pixels (x right, y down, z away from the viewer) with ``IMAGE_MV``.

    The renderer's camera space is OpenGL's (y up, looking down -z), so ``IMAGE_MV = diag(1,-1,-1,1)``
    flips y and z: camera ``Z = -z`` and the distance along the view is z itself. The depth range is
    z [V]'s own, widened by a margin so that neither the nearest nor the farthest point is clipped.
    """
    lo, hi = float(z.min()), float(z.max())
    margin = 0.05 * (hi - lo) + 1.0
    return orthographic_projection(0.0, float(height), near=lo - margin, far=hi + margin)


IMAGE_MV = np.diag([*FLIP_YZ, 1.0])


def overlay_mesh(image: np.ndarray, vertices_img: np.ndarray, faces: np.ndarray, colors=None,
                 alpha: float = 0.6) -> np.ndarray:
    """Render a mesh given in image pixels (x, y down, z away) over ``image`` [H,W,3] uint8 (colors:
    [V,3] or one colour; None: a prediction's)."""
    h, w = image.shape[:2]
    colors = np.broadcast_to(np.asarray(COLOURS["prediction_mesh"] if colors is None else colors, np.float32),
                             (len(vertices_img), 3))
    rgb, mask = _renderer(w, h).render(vertices_img.astype(np.float32), faces, colors, IMAGE_MV,
                                       image_space_projection(h, vertices_img[:, 2]))
    out = image.copy()
    out[mask] = (alpha * rgb[mask] + (1 - alpha) * image[mask]).astype(np.uint8)
    return out


def error_colors(err: np.ndarray, vmax: float) -> np.ndarray:
    """Per-vertex error [V] -> colours [V,3] from matplotlib's 'inferno' map on [0, vmax]."""
    import matplotlib

    colors = matplotlib.colormaps["inferno"](np.clip(np.nan_to_num(err) / max(vmax, 1e-9), 0, 1))[:, :3]
    colors[np.isnan(err)] = 0.8  # outside the evaluated region
    return colors


def label(image: np.ndarray, text: str, scale: float = 0.45) -> np.ndarray:
    """The image [H,W,3] with a caption in its top-left corner."""
    image = np.ascontiguousarray(image)
    cv2.putText(image, text, (6, 18), cv2.FONT_HERSHEY_SIMPLEX, scale, (40, 40, 40), 1, cv2.LINE_AA)
    return image


def title_bar(text: str, width: int, height: int = 26) -> np.ndarray:
    """[height,width,3] white bar with a left-aligned title."""
    bar = np.full((height, width, 3), 255, np.uint8)
    cv2.putText(bar, text, (8, height - 8), cv2.FONT_HERSHEY_SIMPLEX, 0.55, (0, 0, 0), 1, cv2.LINE_AA)
    return bar


def save_png(image: np.ndarray, path: str | Path) -> Path:
    """Write an RGB image atomically (tmp file + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ok, buf = cv2.imencode(".png", cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    if not ok:
        raise RuntimeError(f"{path}: PNG encoding failed")
    atomic_write(path, buf.tobytes())
    return path


# --------------------------------------------------------------------------------------------
# A study's predictions over its images (predictions.npz, written by evaluate.evaluate_run)
# --------------------------------------------------------------------------------------------
def _run_dirs(study_dir: Path) -> dict[str, Path]:
    """ablation name -> its first seed's finished run directory."""
    out = {}
    for r in study_runs(study_dir):
        d = Path(study_dir) / "runs" / r["run"]
        if (d / "predictions.npz").exists() and (d / "metrics.json").exists():
            for name in [r["ablation"], *r["aliases"]]:
                out.setdefault(name, d)
    return out


def _labelled_run_dirs(study_dir: Path) -> dict[str, tuple[str, Path]]:
    """ablation -> (its label, :func:`dad3dlib.report.run_label`, and its first seed's finished run
    directory), each run once: aliases are named in the label, not listed."""
    out = {}
    for r in study_runs(study_dir):
        d = Path(study_dir) / "runs" / r["run"]
        if (d / "predictions.npz").exists() and (d / "metrics.json").exists():
            out.setdefault(r["ablation"], (run_label(r["ablation"], r["aliases"]), d))
    return out


def _column_title(ax, ablation: str, text: str) -> None:
    """A figure column's title in the ablation's colour, an alias list on its own line."""
    ax.set_title(text.replace(" (= ", "\n(= "), fontsize=8, color=ablation_colour(ablation))


def _predictions(run_dir: Path) -> dict:
    """A finished run's ``predictions.npz`` as a dict of arrays, plus ``split`` (the split they were
    made on) and ``index`` (item id -> row)."""
    pred = dict(np.load(run_dir / "predictions.npz", allow_pickle=False))
    pred["split"] = str(pred.get("split", UNRECORDED_SPLIT))
    pred["index"] = {str(x): k for k, x in enumerate(pred["item_id"])}
    return pred


def _run_layer(run_dir: Path):
    """(params, FlameLayer) of a run."""
    from .config import load_params
    from .data import flame_dir

    params = load_params(run_dir / "params.yaml")
    return params, _layer(flame_dir(DataSettings.parse(params["data"], str(run_dir / "params.yaml"))))


def _run_context(run_dir: Path):
    """(params, FlameLayer, :func:`_predictions`) of a finished run."""
    return (*_run_layer(run_dir), _predictions(run_dir))


def predicted_mesh_image(layer, params_3dmm: np.ndarray, crop_affine: np.ndarray, crop_size: int) -> np.ndarray:
    """A prediction's mesh in original-image pixels: [413], [2,3] (crop = A·[x,y,1]) -> [V,3]."""
    import torch

    with torch.no_grad():
        v = layer.reproject(torch.as_tensor(params_3dmm, dtype=torch.float32)[None], crop_size)[0].numpy()
    scale = crop_affine[0, 0]
    xy = (v[:, :2] - crop_affine[:, 2]) / scale
    return np.concatenate([xy, v[:, 2:] / scale], axis=1)


def _predicted_mesh(layer, pred: dict, k: int) -> np.ndarray:
    """Row ``k`` of a run's predictions (:func:`_run_context`) as a mesh in image pixels [V,3]."""
    return predicted_mesh_image(layer, pred["params_3dmm"][k], pred["crop_affine"][k], int(pred["crop_size"]))


def _landmarks(layer, vertices_img: np.ndarray) -> np.ndarray:
    """The 68 landmarks [68,2] of a mesh in image pixels [V,3]."""
    import torch

    with torch.no_grad():
        return layer.landmarks68(torch.as_tensor(vertices_img[None], dtype=torch.float32))[0, :, :2].numpy()


def _sample(params: dict, split: str, item_id: str):
    """(image RGB uint8, GT vertices in image pixels with depth [V,3]) of one item of a run's data."""
    ds = _dataset(DataSettings.parse(params["data"]), split)
    i = ds.position(item_id)
    img = ds.image(i)
    v, mv, p, _ = ds.geometry(i, img.shape[0])
    v = v.astype(np.float64)
    xy = project(v, mv, p, img.shape[0])
    depth = -(v @ mv[:3, :3].T + mv[:3, 3])[:, 2]
    z = (depth - depth.mean()) * p[0, 0] / depth.mean()  # depth in pixel units around the head
    return img, np.concatenate([xy, z[:, None]], axis=1)


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
        pv = _predicted_mesh(layer, pred, i)
        box = _crop_box(gt_v)
        ax.imshow(_cut(overlay_mesh(img, pv, faces, alpha=0.45), box))
        off = np.array(box[:2])
        ax.scatter(*(_landmarks(layer, gt_v) - off).T, s=4, c=COLOURS["gt_landmarks"])
        ax.scatter(*(pred["landmarks_2d_image"][i] - off).T, s=4, c=COLOURS["prediction_landmarks"])
        ax.set_title(item, fontsize=8)
    for ax in axes.flat:
        ax.axis("off")
    fig.tight_layout()
    return fig


def plot_mesh_comparison(study_dir: str | Path, n_items: int = 4):
    """Rows: the same evaluation images; columns: image, GT mesh, each ablation's predicted mesh."""
    import matplotlib.pyplot as plt

    runs = _labelled_run_dirs(Path(study_dir))
    if not runs:
        return None
    ctx = {name: (label, *_run_context(d)) for name, (label, d) in runs.items()}
    _, params, layer, pred0 = next(iter(ctx.values()))
    faces = layer.faces.numpy()
    items = [str(x) for x in pred0["item_id"][:n_items]]
    cols = 2 + len(ctx)
    fig, axes = plt.subplots(len(items), cols, figsize=(2.4 * cols, 2.5 * len(items) + 0.2), squeeze=False)
    for r, item in enumerate(items):
        img, gt_v = _sample(params, pred0["split"], item)
        box = _crop_box(gt_v)
        panels = [(None, "image", img), (None, "ground truth", overlay_mesh(img, gt_v, faces, COLOURS["gt_mesh"]))]
        for name, (label, _, lay, pred) in ctx.items():
            if item in pred["index"]:
                panels.append((name, label, overlay_mesh(img, _predicted_mesh(lay, pred, pred["index"][item]), faces)))
        for c, (name, title, im) in enumerate(panels):
            axes[r, c].imshow(_cut(im, box))
            if r == 0 and name is None:
                axes[r, c].set_title(title, fontsize=8)
            elif r == 0:
                _column_title(axes[r, c], name, title)
    for ax in axes.flat:
        ax.axis("off")
    fig.tight_layout()
    return fig


def plot_error_heatmaps(study_dir: str | Path, size: int = 256):
    """Each ablation's mean per-vertex error (mm) painted on the mean head (front, and the right
    cheek's profile)."""
    import matplotlib.pyplot as plt

    runs = _labelled_run_dirs(Path(study_dir))
    errs = {}
    for name, (label, d) in runs.items():
        with np.load(d / "predictions.npz", allow_pickle=False) as pred:  # reads only the array it takes
            if "vertex_error_mm" in pred:
                errs[name] = (label, pred["vertex_error_mm"])
    if not errs:
        return None
    _, layer = _run_layer(next(iter(runs.values()))[1])
    v = layer.v_template.numpy()
    faces = layer.faces.numpy()
    vmax = float(np.nanpercentile(np.concatenate([e for _, e in errs.values()]), 98))
    fig, axes = plt.subplots(2, len(errs), figsize=(2.6 * len(errs), 5.6), squeeze=False)
    for c, (name, (label, e)) in enumerate(errs.items()):
        for r, yaw in enumerate((0.0, -70.0)):
            axes[r, c].imshow(render_head(v, faces, error_colors(e, vmax), yaw, size))
            axes[r, c].axis("off")
        _column_title(axes[0, c], name, f"{label}\nmean {np.nanmean(e):.2f} mm")
    sm = plt.cm.ScalarMappable(cmap="inferno", norm=plt.Normalize(0, vmax))
    fig.colorbar(sm, ax=axes, fraction=0.02, label="mm")
    return fig


# --------------------------------------------------------------------------------------------
# The explorer's data (dad3dlib.explorer builds its HTML)
# --------------------------------------------------------------------------------------------
def explorer(study_dir: str | Path, n_samples: int = 8, size: int = 192, items: list[str] | None = None,
             runs: dict[str, Path] | None = None) -> str:
    """The offline explorer (:func:`dad3dlib.explorer.explorer_html`, an HTML fragment) of a study's
    first ``n_samples`` evaluation images (or of the evaluation images ``items``, by item id): each
    ablation's first finished seed (or ``runs``, display name -> finished run directory) beside the
    ground truth, every sample cut around its head and shown at ``size`` pixels. A sentence when no
    run has finished yet."""
    runs = runs or _run_dirs(Path(study_dir))
    if not runs:
        return "<p>No finished run yet: the explorer shows predictions once a run has finished.</p>"
    ctx = {d: _run_context(d) for d in dict.fromkeys(runs.values())}
    params, layer, pred0 = next(iter(ctx.values()))
    faces, keep = submesh(layer.faces.numpy(), layer.subset("head").numpy(), layer.n_vertices)
    items = [str(x) for x in pred0["item_id"][:n_samples]] if items is None else [str(x) for x in items]
    if not items:
        return "<p>No evaluation sample to explore.</p>"
    frames, samples = [], []
    for item in items:
        img, gt_v = _sample(params, pred0["split"], item)
        box = _crop_box(gt_v)
        frames.append((np.array(box[:2], np.float64), size / (box[2] - box[0])))
        image = cv2.resize(_cut(img, box), (size, size), interpolation=cv2.INTER_AREA)
        samples.append({"item_id": item, "image": image, "landmarks": _display(_landmarks(layer, gt_v), *frames[-1]),
                        "vertices": _display(gt_v[keep], *frames[-1])})
    predictions = {}
    for d, (_, lay, pred) in ctx.items():
        per_sample = pd.read_csv(d / "per_sample.csv").set_index("item_id")
        rows = []
        for item, frame in zip(items, frames):
            k = pred["index"].get(item)
            if k is None:
                rows.append(None)
                continue
            pv = _predicted_mesh(lay, pred, k)
            m = per_sample.loc[item] if item in per_sample.index else {}
            caption = ", ".join(f"{METRICS[c].label} {format_metric(c, m[c])}" for c in ATTRIBUTE_METRICS if c in m)
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


# --------------------------------------------------------------------------------------------
# CLI helpers: show-head, a head model and its variations
# --------------------------------------------------------------------------------------------
def head_title(assets) -> str:
    """What a head model is: the project's synthetic head, or the FLAME-format model of a directory."""
    from .synthetic_head import default_flame_dir

    if assets.path is not None and Path(assets.path).resolve() == default_flame_dir(make=False).resolve():
        return "synthetic FLAME-compatible head"
    return f"FLAME-format head model: {assets.path}"


def show_head(assets, out_png: str | Path, seed: int = 0, tile: int = 160, columns: int = 6) -> Path:
    """The mean head from the front, at 3/4 and in profile, then rows of random identities
    (β ~ N(0,1)), random expressions (ψ ~ N(0,1)) of one identity, and jaw openings from 0 to
    0.4 rad, each with a random albedo, rendered with :mod:`dad3dlib.render`. -> out_png"""
    import torch

    from .flame import N_EXPR, N_SHAPE, FlameLayer
    from .synthetic_head import albedo

    rng = np.random.default_rng(seed)
    layer = FlameLayer(assets)
    faces = assets.topology.faces
    n = columns

    def mesh(shape, expression, jaw) -> np.ndarray:  # [n,k] numpy -> [n,V,3]
        f = lambda a: torch.as_tensor(a, dtype=torch.float32)  # noqa: E731
        with torch.no_grad():
            return layer.vertices(f(shape), f(expression), f(jaw)).numpy()

    template = assets.model.v_template
    head = template[assets.topology.subsets["head"]]
    centre = 0.5 * (head.min(0) + head.max(0)) - (0.0, 0.02, 0.0)
    field = 1.45 * float(np.ptp(head, axis=0).max())
    big = _renderer(tile * n // 3, tile * n // 3)
    small = _renderer(tile, tile)
    mean_colors = albedo(template, assets.topology, np.random.default_rng(seed))
    top = render_views(big, template, faces, mean_colors, [(0, 0), (40, 5), (90, 0)], centre, field)
    top = [label(im, t) for im, t in zip(top, ("mean head: front", "3/4", "profile"))]

    zeros = lambda k: np.zeros((n, k))  # noqa: E731
    shapes = rng.normal(size=(n, N_SHAPE))
    rows = {
        f"random identities (shape ~ N(0,1)), seed {seed}": mesh(shapes, zeros(N_EXPR), zeros(3)),
        "random expressions (expression ~ N(0,1)), one identity": mesh(
            np.repeat(shapes[:1], n, 0), rng.normal(size=(n, N_EXPR)), zeros(3)),
        "jaw opening 0 to 0.4 rad (pitch)": mesh(
            np.repeat(shapes[1:2], n, 0), zeros(N_EXPR), np.stack([np.linspace(0, 0.4, n), np.zeros(n), np.zeros(n)], 1)),
    }
    parts = [title_bar(head_title(assets), tile * n), np.concatenate(top, 1)]
    for title, verts in rows.items():
        tiles = []
        for i, v in enumerate(verts):
            yaw = rng.uniform(-35, 35)
            colors = albedo(v, assets.topology, rng)
            img = render_views(small, v, faces, colors, [(yaw, rng.uniform(-5, 10))], centre, field)[0]
            tiles.append(label(img, f"yaw {yaw:+.0f}", 0.35))
        parts += [title_bar(title, tile * n), np.concatenate(tiles, 1)]
    return save_png(np.concatenate(parts, 0), out_png)


def main_show_head(argv: list[str] | None = None) -> int:
    """``python -m dad3dlib show-head --out FILE.png [--flame-assets DIR] [--seed N]``"""
    from .data import flame_dir
    from .flame import load_flame_assets

    ap = argparse.ArgumentParser(prog="dad3dlib show-head", description=show_head.__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, type=Path, help="PNG to write")
    ap.add_argument("--flame-assets", type=Path, default=None,
                    help="FLAME-format directory (default: the project's synthetic head)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    out = show_head(load_flame_assets(flame_dir(DataSettings(flame_path=args.flame_assets))), args.out, args.seed)
    print(f"wrote {out}")
    return 0


# --------------------------------------------------------------------------------------------
# CLI helpers: show-data, data grids of samples with GT landmarks and the projected mesh overlaid,
# beside the crops the loader produces
# --------------------------------------------------------------------------------------------
PANEL = 256  # display size of each panel (pixels)


def draw_overlay(image: np.ndarray, vertices_2d: np.ndarray | None, edges: np.ndarray | None,
                 landmarks: np.ndarray | None, visibility: np.ndarray | None = None, bbox=None,
                 size: int = PANEL) -> np.ndarray:
    """image [H,W,3] uint8 RGB scaled so its longest side is ``size``, with the mesh wireframe
    (vertices_2d [V,2] image pixels, edges [E,2]) blended in, landmarks [68,2] as dots (red where
    visibility [68] is 0), and the bbox (x, y, w, h). Returns [size,size,3] (padded)."""
    h, w = image.shape[:2]
    s = size / max(h, w)
    canvas = np.zeros((size, size, 3), np.uint8)
    img = cv2.resize(image, (round(w * s), round(h * s)),
                     interpolation=cv2.INTER_AREA if s < 1 else cv2.INTER_LINEAR)
    canvas[: img.shape[0], : img.shape[1]] = img
    fix = lambda p: np.round((np.asarray(p, np.float64) * s - 0.5) * 16).astype(np.int32)  # noqa: E731
    if vertices_2d is not None:
        wire = canvas.copy()
        cv2.polylines(wire, list(fix(vertices_2d)[edges]), False, (80, 220, 255), 1, cv2.LINE_AA, shift=4)
        canvas = cv2.addWeighted(canvas, 0.6, wire, 0.4, 0)
    if bbox is not None:
        x, y, bw, bh = bbox
        cv2.rectangle(canvas, tuple(fix([x, y])), tuple(fix([x + bw, y + bh])), (255, 255, 0), 1, cv2.LINE_AA,
                      shift=4)
    if landmarks is not None:
        vis = np.ones(len(landmarks)) if visibility is None else np.asarray(visibility)
        for p, v in zip(fix(landmarks), vis):
            cv2.circle(canvas, tuple(p), 2 * 16, (0, 255, 0) if v > 0 else (255, 40, 40), -1, cv2.LINE_AA, shift=4)
    return canvas


def _caption(panel: np.ndarray, text: str) -> np.ndarray:
    cv2.putText(panel, text, (4, PANEL - 6), cv2.FONT_HERSHEY_SIMPLEX, 0.38, (0, 0, 0), 3, cv2.LINE_AA)
    cv2.putText(panel, text, (4, PANEL - 6), cv2.FONT_HERSHEY_SIMPLEX, 0.38, (255, 255, 255), 1, cv2.LINE_AA)
    return panel


def show_data(data: str | Path, out: str | Path, split: str = "train", n: int = 12, crop_size: int = 128,
              flame_assets: str | Path | None = None, seed: int = 0, columns: int = 4,
              cache_dir: str | Path | None = None) -> Path:
    """Write a grid of ``n`` samples: [image + projected mesh + GT landmarks + bbox | loader crop
    (training augmentation) + crop landmarks + heatmap maxima] per sample. flame_assets None: the
    FLAME directory the data were made with (else the synthetic head); cache_dir: the loader's
    cache (None: its default)."""
    import torch

    from .data import DAD3DHeadsDataset, denormalize_image, flame_dir, read_image
    from .flame import load_flame_assets

    assets = load_flame_assets(flame_dir(DataSettings(root=data, flame_path=flame_assets)), require_model=False)
    ds = DAD3DHeadsDataset(data, split, crop_size, assets, train=True, augment=True, cache_dir=cache_dir)
    edges = edge_counts(assets.topology.faces)[0]
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    pairs = []
    for i in sorted(rng.choice(len(ds), size=min(n, len(ds)), replace=False)):
        entry, sample = ds.items[i], ds[int(i)]
        image = read_image(ds.index.images[i])
        A = sample["crop_affine"].double().numpy()
        Ainv = np.linalg.inv(np.vstack([A, [0, 0, 1]]))[:2]
        verts = apply_affine(Ainv, sample["vertices_crop"].double().numpy()) if "vertices_crop" in sample else None
        left = draw_overlay(image, verts, edges, sample.get("landmarks_2d_image"), bbox=entry["bbox"])
        a = entry.get("attributes", {})
        flags = [a.get("pose", ""), a.get("quality", "")] + [name for key, name in (("occlusions", "occl"),
                 ("expression", "expr")) if a.get(key) == "true"]
        _caption(left, " ".join([entry["item_id"]] + flags))
        crop = denormalize_image(sample["image"])
        if "heatmaps" in sample:
            hm = 0.35 * cv2.resize(sample["heatmaps"].amax(0).numpy(), (crop_size, crop_size))[..., None]
            crop = np.clip(crop * (1 - hm) + np.array([255, 0, 255]) * hm, 0, 255).astype(np.uint8)
        right = draw_overlay(crop, None, None, sample.get("landmarks_2d"), sample.get("visibility"))
        pairs += [left, _caption(right, f"loader crop {crop_size}px")]
    gap = np.full((PANEL, 4, 3), 255, np.uint8)
    cells = [np.concatenate([pairs[k], pairs[k + 1], gap], 1) for k in range(0, len(pairs), 2)]
    while len(cells) % columns:
        cells.append(np.full_like(cells[0], 255))
    rows = [np.concatenate(cells[r: r + columns], 1) for r in range(0, len(cells), columns)]
    grid = np.concatenate([np.concatenate([r, np.full((4, r.shape[1], 3), 255, np.uint8)], 0) for r in rows], 0)
    return save_png(grid, out)


def main_show_data(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m dad3dlib show-data",
                                 description="a grid of data samples with overlays and loader crops")
    ap.add_argument("--data", required=True, help="folder holding DAD-3DHeadsDataset/ (or that folder)")
    ap.add_argument("--out", required=True, help="PNG file to write")
    ap.add_argument("--split", default="train")
    ap.add_argument("-n", type=int, default=12, help="number of samples")
    ap.add_argument("--crop-size", type=int, default=128)
    ap.add_argument("--flame-assets", default=None,
                    help="FLAME-format directory (default: the one the data were made with, else the synthetic head)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    out = show_data(args.data, args.out, args.split, args.n, args.crop_size, args.flame_assets, args.seed)
    print(f"wrote {out}")
    return 0
