"""The EGL rasterizer against the projection formula of docs/ARCHITECTURE.md and an OpenCV reference."""
import numpy as np
import pytest
import torch

from dad3dlib import render
from dad3dlib.geometry import project
from dad3dlib.geometry import orthographic_projection, perspective_projection
from dad3dlib.render import Light, Renderer, silhouette

W, H = 160, 120


def uv_sphere(radius: float = 0.1, rings: int = 24, segments: int = 48) -> tuple[np.ndarray, np.ndarray]:
    """A closed sphere: vertices [V,3] float32, faces [F,3] counter-clockwise from outside."""
    theta = np.linspace(0, np.pi, rings + 1)[1:-1]
    phi = np.linspace(0, 2 * np.pi, segments, endpoint=False)
    t, p = np.meshgrid(theta, phi, indexing="ij")
    ring = np.stack([np.sin(t) * np.sin(p), np.cos(t), np.sin(t) * np.cos(p)], -1).reshape(-1, 3)
    v = np.concatenate([[[0, 1, 0]], ring, [[0, -1, 0]]]) * radius
    rid = lambda i, j: 1 + i * segments + j % segments  # noqa: E731
    faces = [[0, rid(0, j), rid(0, j + 1)] for j in range(segments)]
    for i in range(rings - 2):
        for j in range(segments):
            faces += [[rid(i, j), rid(i + 1, j), rid(i, j + 1)], [rid(i, j + 1), rid(i + 1, j), rid(i + 1, j + 1)]]
    faces += [[len(v) - 1, rid(rings - 2, j + 1), rid(rings - 2, j)] for j in range(segments)]
    return v.astype(np.float32), np.array(faces, np.int64)


def model_view(yaw: float, t) -> np.ndarray:
    c, s = np.cos(yaw), np.sin(yaw)
    mv = np.eye(4)
    mv[:3, :3] = [[c, 0, s], [0, 1, 0], [-s, 0, c]]
    mv[:3, 3] = t
    return mv


@pytest.fixture(scope="module")
def scene():
    v, f = uv_sphere()
    v = v * np.array([1.0, 1.3, 0.8], np.float32)  # an ellipsoid: rotation matters
    return v, f, model_view(0.6, [0.04, -0.02, -0.7]), perspective_projection(220.0, 70.0, 65.0, 0.1, 5.0)


def test_perspective_projection_principal_point_and_focal():
    P = perspective_projection(200.0, 30.0, 40.0, 0.1, 10.0)
    pts = np.array([[0.0, 0.0, -2.0], [0.1, 0.05, -2.0]])
    xy = project(pts, np.eye(4), P, H)
    np.testing.assert_allclose(xy[0], [30.0, H - 40.0])
    np.testing.assert_allclose(xy[1] - xy[0], [200.0 * 0.1 / 2.0, -200.0 * 0.05 / 2.0])  # y up -> rows up


@pytest.mark.parametrize("make", [lambda n, f: perspective_projection(200.0, 30.0, 40.0, n, f),
                                  lambda n, f: orthographic_projection(30.0, 40.0, n, f)])
def test_projections_map_near_and_far_to_gl_depth_minus_one_and_one(make):
    P = make(0.5, 8.0)
    clip = P @ np.array([[0.0, 0.0, -0.5, 1.0], [0.0, 0.0, -8.0, 1.0]]).T   # distances 0.5 and 8 ahead
    np.testing.assert_allclose(clip[2] / clip[3], [-1.0, 1.0])


def test_orthographic_projection_offsets_in_pixels():
    P = orthographic_projection(30.0, 40.0, 1.0, 9.0)
    xy = project(np.array([[3.0, 4.0, -2.0], [3.0, 4.0, -7.0]]), np.eye(4), P, H)
    np.testing.assert_allclose(xy, [[33.0, H - 44.0]] * 2)


def test_project_numpy_torch_batched_agree(scene):
    v, _, mv, P = scene
    ref = project(v.astype(np.float64), mv, P, H)
    tv = torch.tensor(np.stack([v, v]), dtype=torch.float64, requires_grad=True)
    out = project(tv, torch.tensor(np.stack([mv, mv])), torch.tensor(np.stack([P, P])), torch.tensor([H, H]))
    assert out.shape == (2, len(v), 2)
    np.testing.assert_allclose(out.detach().numpy()[1], ref, atol=1e-9)
    out.sum().backward()
    assert torch.isfinite(tv.grad).all()


def test_project_matches_the_gl_pipeline(scene):
    v, _, mv, P = scene
    gl = Renderer(W, H, samples=0).project_gl(v, mv, P)
    np.testing.assert_allclose(gl, project(v.astype(np.float64), mv, P, H), atol=1e-3)


@pytest.mark.parametrize("samples", [0, 4])
def test_mask_matches_projected_silhouette(scene, samples):
    v, f, mv, P = scene
    rgb, mask = Renderer(W, H, samples=samples).render(v, f, np.full_like(v, 0.7), mv, P)
    sil = silhouette(project(v.astype(np.float64), mv, P, H), f, H, W)
    assert rgb.shape == (H, W, 3) and rgb.dtype == np.uint8 and mask.shape == (H, W)
    assert sil.sum() > 1500
    assert (sil & mask).sum() / (sil | mask).sum() >= 0.98
    # moving the mesh one pixel-width to the right moves the mask: the test can fail
    shifted = mv.copy()
    shifted[0, 3] += 0.7 * 6 / 220.0
    _, mask2 = Renderer(W, H, samples=samples).render(v, f, np.full_like(v, 0.7), shifted, P)
    assert (sil & mask2).sum() / (sil | mask2).sum() < 0.95


@pytest.mark.parametrize("order", [(0, 1), (1, 0)])
def test_depth_ordering_near_hides_far(order):
    near = np.array([[-0.1, -0.1, -1.0], [0.1, -0.1, -1.0], [0.0, 0.1, -1.0]])
    far = near * [4, 4, 1] + [0, 0, -1.0]   # twice the near one's size on screen
    tris = [near, far]
    v = np.concatenate([tris[order[0]], tris[order[1]]]).astype(np.float32)
    colors = np.array([[1, 0, 0]] * 3 + [[0, 1, 0]] * 3, np.float32)
    if order == (1, 0):
        colors = colors[[3, 4, 5, 0, 1, 2]]
    light = Light(direction=(0, 0, 1), ambient=1.0, diffuse=0.0, specular=0.0)
    rgb, mask = Renderer(W, H, samples=0).render(v, np.array([[0, 1, 2], [3, 4, 5]]), colors, np.eye(4),
                                                 perspective_projection(200.0, W / 2, H / 2, 0.5, 10.0),
                                                 light=light)
    centre = rgb[H // 2, W // 2]
    assert centre[0] > 200 and centre[1] < 30          # the near (red) triangle
    assert rgb[H // 2 + 30, W // 2][1] > 200       # only the far (green) one covers this pixel
    assert mask[H // 2, W // 2] and not mask[2, 2]


def test_background_kept_outside_mask_and_light_direction(scene):
    v, f, _, P = scene
    mv = model_view(0.0, [0.0, 0.0, -0.7])
    bg = np.random.default_rng(0).integers(0, 256, (H, W, 3), dtype=np.uint8)
    light = Light(direction=(1.0, 0.0, 0.3), ambient=0.1, diffuse=0.9, specular=0.0)
    rgb, mask = Renderer(W, H, samples=4).render(v, f, np.full_like(v, 0.8), mv, P, background=bg, light=light)
    np.testing.assert_array_equal(rgb[~mask][:50], bg[~mask][:50])
    pix = project(np.array([[0.05, 0.0, 0.08], [-0.05, 0.0, 0.08]]), mv, P, H).round().astype(int)
    right, left = (rgb[y, x].astype(int).sum() for x, y in pix)   # subject's left = image right
    assert right > left + 100


def test_missing_egl_names_the_system_packages(monkeypatch):
    import moderngl

    def fail(**kwargs):
        raise Exception("libEGL.so: cannot open shared object file")

    monkeypatch.setattr(moderngl, "create_standalone_context", fail)
    monkeypatch.setattr(render, "_CTX", {})
    with pytest.raises(RuntimeError, match="libegl1 libgl1-mesa-dri"):
        render.gl_context()


def test_scenery_is_drawn_in_the_same_zbuffer_but_left_out_of_the_mask(scene):
    v, f, mv, P = scene
    r = Renderer(W, H, samples=0)
    _, alone = r.render(v, f, np.full_like(v, 0.7), mv, P)
    wall = np.array([[-1, -1, 0], [1, -1, 0], [0, 1, 0]], np.float32)
    front, behind = mv.copy(), mv.copy()
    front[2, 3] += 0.3   # between the camera and the mesh: hides it
    behind[2, 3] -= 0.3
    red = np.tile([1.0, 0, 0], (3, 1)).astype(np.float32)
    bg = np.zeros((H, W, 3), np.uint8)
    rgb, mask = r.render(v, f, np.full_like(v, 0.7), mv, P, background=bg, scenery=[(wall, [[0, 1, 2]], red, behind)])
    np.testing.assert_array_equal(mask, alone)
    assert rgb[~alone][:, 0].mean() > 100   # the wall shows around the mesh
    _, hidden = r.render(v, f, np.full_like(v, 0.7), mv, P, scenery=[(wall, np.array([[0, 1, 2]]), red, front)])
    assert not hidden.any()
    with pytest.raises(ValueError, match="samples=0"):
        Renderer(W, H, samples=4).render(v, f, np.full_like(v, 0.7), mv, P, scenery=[(wall, [[0, 1, 2]], red, front)])


def test_arrays_of_any_memory_layout_render_alike(scene):
    """Vertices as a view of a coordinate-major array (what FLAME gives) draw the same image."""
    v, f, mv, P = scene
    rgb, mask = Renderer(W, H, samples=0).render(v, f, np.full_like(v, 0.7), mv, P)
    transposed = np.ascontiguousarray(v.T).T  # the same numbers, Fortran order
    assert not transposed.flags.c_contiguous
    one_colour = np.broadcast_to(np.float32([0.7, 0.7, 0.7]), v.shape)  # as viz.overlay_mesh passes it
    rgb2, mask2 = Renderer(W, H, samples=0).render(transposed, f, one_colour, mv, P)
    np.testing.assert_array_equal(rgb, rgb2)
    np.testing.assert_array_equal(mask, mask2)
