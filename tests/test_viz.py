"""Figures: mesh renders in image space and from a view, plots of the report's tables, and the
figures' caches (which follow the files they were read from)."""
import json

import numpy as np
import pandas as pd
import pytest

from conftest import small_study, tiny_flame_assets
from dad3dlib import report, viz


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
    colors = np.tile(np.array(BLUE, np.float32), (layer.num_vertices, 1))
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
# The figures' caches follow their files
# --------------------------------------------------------------------------------------------
def test_flame_layer_cache_follows_the_directory_and_its_files(tmp_path):
    from dad3dlib.flame import save_flame_assets

    def save(n_vertices, path):
        assets = tiny_flame_assets(n_vertices=n_vertices, n_faces=20)
        return save_flame_assets(assets.model, assets.topology, path)

    a, b = save(30, tmp_path / "a"), save(40, tmp_path / "b")
    layer = viz._layer(a)
    assert layer.num_vertices == 30 and viz._layer(a) is layer
    assert viz._layer(b).num_vertices == 40  # another study's FLAME directory
    save(50, a)  # the same directory rewritten
    assert viz._layer(a).num_vertices == 50
    kept = viz._layer(b)
    viz.clear_caches()
    assert viz._layer(b) is not kept


def test_dataset_cache_is_keyed_by_crop_size_and_follows_the_split_file(tmp_path, monkeypatch):
    from dad3dlib import data
    from dad3dlib.synthetic_data import make_data

    monkeypatch.setattr(data, "_cache_root", lambda: tmp_path / "cache")
    root = tmp_path / "d"
    make_data(root, {"splits": {"train": 3}, "image_sizes": [[96, 96]], "seed": 1}, workers=1)
    section = {"root": str(root)}
    ds = viz._dataset(str(root), "train", 64, section)
    assert len(ds) == 3 and ds.crop_size == 64 and viz._dataset(str(root), "train", 64, section) is ds
    assert viz._dataset(str(root), "train", 96, section).crop_size == 96
    split = root / data.DATASET_DIR / "train" / "train.json"
    split.write_text(json.dumps(json.loads(split.read_text())[:2]))  # the data set changed on disk
    assert len(viz._dataset(str(root), "train", 64, section)) == 2
