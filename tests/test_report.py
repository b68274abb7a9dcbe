"""Report tables from per-sample results and mesh renders in image space (no study needed)."""
import numpy as np
import pandas as pd
import pytest

from dad3dlib import report


def per_sample(n: int = 40) -> pd.DataFrame:
    rng = np.random.default_rng(0)
    base = rng.uniform(1, 3, n)
    rows = []
    for abl, shift in (("baseline", 0.0), ("alias", 0.0), ("worse", 0.5)):
        for i in range(n):
            rows.append({"ablation": abl, "item_id": f"i{i}", "seed": 1, "mean_mm": base[i] + shift,
                         "z5_accuracy": 0.9 - shift / 10})
    return pd.DataFrame(rows)


def test_paired_deltas_and_their_table():
    deltas = report.paired_deltas(per_sample())
    worse = deltas[(deltas.ablation == "worse") & (deltas.metric == "mean_mm")].iloc[0]
    assert abs(worse.delta - 0.5) < 1e-12
    assert worse.p_value < 1e-6 and worse.n == 40
    table = report.format_deltas(deltas)
    assert list(table.index) == ["alias", "worse"]
    assert list(table.columns) == ["Mean (mm)", "Z₅ accuracy (reference pairing)"]
    assert table.loc["alias", "Mean (mm)"] == "identical"
    assert table.loc["worse", "Mean (mm)"].startswith("+0.50 (p=")
    assert table.loc["worse", "Z₅ accuracy (reference pairing)"].startswith("-0.050 (p=")
    assert report.format_deltas(pd.DataFrame()).empty


# ------------------------------------------------------------------------------------------------
# Mesh renders in image space (x right, y down, z away from the viewer): the near surface wins
# ------------------------------------------------------------------------------------------------
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

    layer = FlameLayer(load_flame_assets()).eval()
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
