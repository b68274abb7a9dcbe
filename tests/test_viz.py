"""Figures: mesh renders in image space and from a view, plots of the report's tables, and the
figures' caches (which follow the files they were read from)."""
import json
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest

from conftest import small_study, tiny_flame_assets
from dad3dlib import report, viz
from dad3dlib.settings import DataSettings


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
    out = viz.overlay_mesh(np.zeros((80, 100, 3), np.uint8), v, f, colors, alpha=1.0).astype(int)
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
    out = viz.overlay_mesh(np.zeros((80, 100, 3), np.uint8), v, f, colors, alpha=1.0).astype(int)
    assert out[40, 50, 0] > out[40, 50, 2] + 40


@pytest.mark.parametrize("z", [-30.0, 30.0])
def test_overlay_mesh_lights_a_surface_facing_the_viewer_anywhere(z):
    """Orthographic view: a camera-facing grey triangle gets ambient + diffuse = its full colour,
    wherever it lies in the image and whatever the sign of its depth."""
    v = np.array([[60, 40, z], [95, 40, z], [95, 75, z], [5, 5, 0], [6, 5, 0], [5, 6, 0]], np.float32)
    out = viz.overlay_mesh(np.zeros((80, 100, 3), np.uint8), v, np.array([[0, 1, 2], [3, 4, 5]]),
                              np.full((6, 3), 0.5, np.float32), alpha=1.0)
    assert 125 <= out[50, 85, 0] <= 165


@pytest.fixture(scope="module")
def head():
    """The synthetic FLAME head: layer, faces, colours (face subset red, the rest blue)."""
    from dad3dlib.flame import FlameLayer, load_flame_assets
    from dad3dlib.synthetic_head import default_flame_dir

    layer = FlameLayer(load_flame_assets(default_flame_dir())).eval()
    colors = np.tile(np.array(BLUE, np.float32), (layer.n_vertices, 1))
    colors[layer.subset("face").numpy()] = RED
    return layer, layer.faces.numpy(), colors


def test_render_head_from_the_front_shows_the_face(head):
    layer, faces, colors = head
    img = viz.render_head(layer.v_template.numpy(), faces, colors, yaw_deg=0, size=128).astype(int)
    r, _, b = img[64, 64]
    assert r > b + 40
    back = viz.render_head(layer.v_template.numpy(), faces, colors, yaw_deg=180, size=128).astype(int)
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
    pv = viz.predicted_mesh_image(layer, params, np.array([[1.0, 0, 0], [0, 1.0, 0]]), crop)
    assert np.abs(pv[:, :2].mean(0) - crop / 2).max() < 1e-3
    assert pv[layer.subset("face").numpy(), 2].mean() < pv[:, 2].mean()   # the face is nearer
    img = viz.overlay_mesh(np.zeros((crop, crop, 3), np.uint8), pv, faces, colors, alpha=1.0).astype(int)
    r, _, b = img[crop // 2, crop // 2]
    assert r > b + 40


def test_training_curves_show_each_loss_term_unweighted_by_its_label():
    """The default panels are the unweighted terms (per step while trained; at validation for every
    run, weight 0 included), never the weighted contributions under the term's name."""
    from dad3dlib.losses import LOSS_TERMS

    label = LOSS_TERMS["l3d"].label
    curves = pd.DataFrame([{"ablation": a, "step": s, "epoch": 0, "metric": m, "value": 1.0 + s}
                           for a, ms in (("baseline", ("train/l3d_step", "train/raw/l3d_step", "val/raw/l3d")),
                                         ("no_l3d", ("val/raw/l3d",)))
                           for m in (*ms, "val/nme") for s in range(3)])
    fig = viz.plot_training_curves(curves)
    titles = [ax.get_title() for ax in fig.axes if ax.get_title()]
    assert titles == [f"{label} unweighted, training steps (train/raw/l3d_step)",
                      f"{label} unweighted, validation, every run (val/raw/l3d)", "val/nme"]
    assert viz.curve_title("train/l3d_step") == f"λ·{label}, weighted (train/l3d_step)"


def test_render_head_and_render_views_share_the_view_convention(head):
    """Positive yaw shows the subject's left cheek (x > 0, red) in both the orthographic head render
    (the error heatmaps) and the orbit camera's perspective views (show-head)."""
    from dad3dlib.render import Renderer

    layer, faces, _ = head
    v = layer.v_template.numpy()
    colors = np.where(v[:, :1] > 0, np.array(RED, np.float32), np.array(BLUE, np.float32))
    head_img = viz.render_head(v, faces, colors, yaw_deg=60, size=128).astype(int)
    centre, field = 0.5 * (v.min(0) + v.max(0)), 1.5 * float(np.ptp(v, axis=0).max())
    view = viz.render_views(Renderer(128, 128), v, faces, colors, [(60, 0)], centre, field)[0].astype(int)
    for img in (head_img, view):
        red = (img[..., 0] > img[..., 2] + 40).sum()
        blue = (img[..., 2] > img[..., 0] + 40).sum()
        assert red > 2 * blue


def test_figures_have_one_panel_per_metric_attribute_and_curve(tmp_path):
    import matplotlib
    import matplotlib.pyplot as plt

    matplotlib.use("Agg")
    root = small_study(tmp_path)
    fig = viz.plot_metrics(report.run_table(root))
    assert isinstance(fig, matplotlib.figure.Figure) and len(fig.axes) == len(report.METRICS)
    fig_attr = viz.plot_by_attribute(report.per_sample_table(root), "mean_mm")
    assert len(fig_attr.axes) == 2  # pose and quality: the attributes the table has
    curves = pd.DataFrame({"ablation": "baseline", "step": [0, 1] * 4, "value": [1.0, 0.5] * 4,
                           "metric": ["train/loss_step"] * 2 + ["train/l3d_step"] * 2 + ["val/loss"] * 2 + ["x"] * 2})
    fig_curves = viz.plot_training_curves(curves, ["train/loss_step", "train/l3d_step", "val/loss", "x"])
    assert len(fig_curves.axes) == 6 and sum(ax.axison for ax in fig_curves.axes) == 4  # 2 rows of 3
    assert viz.plot_training_curves(pd.DataFrame()) is None
    plt.close("all")


# --------------------------------------------------------------------------------------------
# One colour per ablation in every figure; an alias of the baseline named, not drawn
# --------------------------------------------------------------------------------------------
BASELINE_LABEL = "baseline (= l3d50_proj0.05)"


def _write_logs(root, values):
    """runs/<run>/logs/version_0/metrics.csv: steps 0-2 of train/loss_step, per run."""
    for run, ys in values.items():
        d = root / "runs" / run / "logs" / "version_0"
        d.mkdir(parents=True, exist_ok=True)
        pd.DataFrame({"step": [0, 1, 2], "epoch": 0, "train/loss_step": ys}).to_csv(d / "metrics.csv", index=False)


def test_every_ablation_has_one_colour_from_one_place():
    """The study's ablations (params/ablations, baseline first) take the palette in order; another
    name takes the next free colour and keeps it; no two names share one."""
    from dad3dlib.plan import default_ablations

    known = default_ablations()
    assert known[0] == "baseline" and [viz.ablation_colour(a) for a in known] == list(viz.PALETTE[:len(known)])
    mine, other = viz.ablation_colour("my_ablation"), viz.ablation_colour("my_other_ablation")
    assert viz.ablation_colour("my_ablation") == mine and len({mine, other, *viz.PALETTE[:len(known)]}) == len(known) + 2


def test_figures_colour_each_ablation_alike_and_draw_the_alias_once(tmp_path):
    """The bars of the metrics, the bars by attribute and the training curves give baseline and no_l3d
    the same colours (viz.ablation_colour); the baseline's alias is named in its label, not drawn."""
    import matplotlib
    import matplotlib.pyplot as plt
    from matplotlib.colors import to_hex

    matplotlib.use("Agg")
    root = small_study(tmp_path)
    _write_logs(root, {"baseline_s1": [3.0, 2.0, 1.0], "baseline_s2": [5.0, 4.0, 3.0], "no_l3d_s1": [4.0, 4.0, 4.0]})
    want = {BASELINE_LABEL: viz.ablation_colour("baseline"), "no_l3d": viz.ablation_colour("no_l3d")}
    fig = viz.plot_metrics(report.run_table(root))
    ax = fig.axes[list(report.METRICS).index("mean_mm")]
    names = [t.get_text() for t in ax.get_xticklabels()]
    assert names == list(want)  # no_2d failed: nothing to draw; l3d50_proj0.05 only in the baseline's label
    assert [to_hex(p.get_facecolor()) for p in ax.patches] == list(want.values())
    assert "lowest to highest seed" in fig.texts[0].get_text()
    whisker = ax.lines[0].get_ydata()  # the baseline's seeds: 2 and 4 mm
    assert sorted(whisker) == [2.0, 4.0]
    fig = viz.plot_by_attribute(report.per_sample_table(root), "mean_mm")
    legend = fig.axes[0].get_legend()
    assert [t.get_text() for t in legend.get_texts()] == list(want)
    assert [to_hex(h.get_facecolor()) for h in legend.legend_handles] == list(want.values())
    assert len(fig.axes[0].patches) == 2 * 2 + 2  # 2 ablations x 2 poses, and the 2 legend patches
    curves = report.training_curves(root)
    assert set(curves.label) == set(want) and set(curves.ablation) == {"baseline", "no_l3d"}
    fig = viz.plot_training_curves(curves, ["train/loss_step"])
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == list(want)
    assert [to_hex(line.get_color()) for line in ax.lines[:2]] == list(want.values())
    plt.close("all")


def test_training_curves_are_the_mean_over_seeds_with_a_min_max_band(tmp_path):
    """One line per ablation: the mean over its seeds at each step, with a band from the lowest to the
    highest seed, as the figure's title says; a single seed has no band."""
    import matplotlib
    import matplotlib.pyplot as plt
    from matplotlib.collections import PolyCollection

    matplotlib.use("Agg")
    root = small_study(tmp_path)
    _write_logs(root, {"baseline_s1": [3.0, 2.0, 1.0], "baseline_s2": [5.0, 4.0, 3.0], "no_l3d_s1": [4.0, 4.0, 4.0]})
    curves = report.training_curves(root)
    fig = viz.plot_training_curves(curves, ["train/loss_step"])
    ax = fig.axes[0]
    np.testing.assert_allclose(ax.lines[0].get_ydata(), [4.0, 3.0, 2.0])  # baseline: mean of the two seeds
    bands = [c.get_paths()[0].vertices for c in ax.collections if isinstance(c, PolyCollection) and c.get_paths()]
    assert len(bands) == 1  # no_l3d has one seed: no band
    assert np.isclose(bands[0][:, 1].min(), 1.0) and np.isclose(bands[0][:, 1].max(), 5.0)  # lowest, highest seed
    at_step_0 = bands[0][np.isclose(bands[0][:, 0], 0.0), 1]
    assert np.isclose(at_step_0.min(), 3.0) and np.isclose(at_step_0.max(), 5.0)  # seeds 3 and 5 at step 0
    assert fig.texts[0].get_text() == viz.band_note(curves)
    assert viz.band_note(curves) == ("line: the mean over each ablation's 1-2 seeds at each step; band: the lowest "
                                     "to the highest seed")
    one = viz.band_note(curves[curves.seed == 1])
    assert one == "one seed per ablation: one line each, no band"
    plt.close("all")


def test_mesh_figures_take_each_run_once_under_its_label(tmp_path):
    root = small_study(tmp_path)
    for run in ("baseline_s1", "baseline_s2", "no_l3d_s1"):
        (root / "runs" / run / "predictions.npz").write_bytes(b"")
    runs = viz._labelled_run_dirs(root)
    assert runs == {"baseline": (BASELINE_LABEL, root / "runs" / "baseline_s1"),
                    "no_l3d": ("no_l3d", root / "runs" / "no_l3d_s1")}


def test_a_run_s_own_curves_take_its_ablation_s_name(tmp_path):
    """The run notebook's curves are coloured by the ablation its params.yaml names."""
    from dad3dlib import config

    run = tmp_path / "no_l3d_s2"
    _write_logs(tmp_path, {"x": [1.0, 2.0, 3.0]})
    (tmp_path / "runs" / "x").rename(run)
    assert set(report.run_curves(run).ablation) == {"no_l3d_s2"}  # no params.yaml: the directory's name
    config.save_params(config.run_params("smoke", "no_l3d", 2), run / "params.yaml")
    assert set(report.run_curves(run).ablation) == {"no_l3d"}


# --------------------------------------------------------------------------------------------
# The figures' caches follow their files
# --------------------------------------------------------------------------------------------
def test_flame_layer_cache_follows_the_directory_and_its_files(tmp_path):
    from dad3dlib.flame import save_flame_assets

    def save(n_vertices, path):
        assets = tiny_flame_assets(n_vertices=n_vertices, n_faces=20)
        return save_flame_assets(assets.model, assets.topology, path)

    a, b = save(30, tmp_path / "a"), save(40, tmp_path / "b")
    layer = viz._layer(a)
    assert layer.n_vertices == 30 and viz._layer(a) is layer
    assert viz._layer(b).n_vertices == 40  # another study's FLAME directory
    save(50, a)  # the same directory rewritten
    assert viz._layer(a).n_vertices == 50
    kept = viz._layer(b)
    viz.clear_caches()
    assert viz._layer(b) is not kept


def test_dataset_cache_is_keyed_by_crop_size_and_follows_the_split_file(tmp_path, monkeypatch):
    from dad3dlib import data
    from dad3dlib.synthetic_data import make_data

    monkeypatch.setattr(data, "_cache_root", lambda: tmp_path / "cache")
    root = tmp_path / "d"
    make_data(root, {"splits": {"train": 3}, "image_sizes": [[96, 96]], "seed": 1}, workers=1)
    section = DataSettings(root=str(root), crop_size=64)
    ds = viz._dataset(section, "train")
    assert len(ds) == 3 and ds.crop_size == 64 and viz._dataset(section, "train") is ds
    assert viz._dataset(replace(section, crop_size=96), "train").crop_size == 96
    split = root / data.DATASET_DIR / "train" / "train.json"
    split.write_text(json.dumps(json.loads(split.read_text())[:2]))  # the data set changed on disk
    assert len(viz._dataset(section, "train")) == 2
