"""The synthetic FLAME-compatible head: mesh, proportions, landmarks, components, rig, albedo."""
import numpy as np
import pytest
import torch

from dad3dlib import synthetic_head as sh
from dad3dlib.flame import FlameAssets, FlameLayer, load_flame_assets, save_flame_assets


@pytest.fixture(scope="module")
def local_mesh():
    return sh.mesh_head()


@pytest.fixture(scope="module")
def head(local_mesh):
    return sh.rig_head(*local_mesh, seed=0)


@pytest.fixture(scope="module")
def layer(head):
    model, topo = head
    return FlameLayer(FlameAssets(topology=topo, model=model, path=None))


def landmarks(layer, verts):
    return layer.landmarks68(torch.as_tensor(verts, dtype=torch.float32)[None])[0].numpy()


def posed(layer, shape=None, expression=None, jaw=None, neck=None):
    z = lambda n: torch.zeros(1, n)  # noqa: E731
    t = lambda a, n: z(n) if a is None else torch.as_tensor(np.asarray(a), dtype=torch.float32)[None]  # noqa: E731
    with torch.no_grad():
        return layer.vertices(t(shape, 300), t(expression, 100), t(jaw, 3), neck=t(neck, 3))[0].numpy()


def face_normals(v, faces):
    n = np.cross(v[faces[:, 1]] - v[faces[:, 0]], v[faces[:, 2]] - v[faces[:, 0]])
    return n / np.linalg.norm(n, axis=1, keepdims=True)


def test_mesh_is_one_closed_manifold(head):
    model, _ = head
    report = sh.mesh_report(model.v_template, model.faces)
    assert 4000 <= report["vertices"] <= 6000
    assert report["closed"] and report["oriented"] and report["single_fans"]
    assert report["components"] == 1 and report["all_used"] and report["genus"] == 0


def test_faces_point_outwards(head):
    model, _ = head
    v = model.v_template.astype(np.float64)
    tri = v[model.faces]
    signed_volume = np.einsum("ij,ij->i", tri[:, 0], np.cross(tri[:, 1], tri[:, 2])).sum() / 6.0
    assert 0.003 < signed_volume < 0.008  # m³: a head with a neck, positive when outward


def test_adult_proportions(head):
    m = sh.measure(*head)
    assert 0.13 <= m["breadth"] <= 0.17
    assert 0.17 <= m["front_to_back"] <= 0.22
    assert 0.20 <= m["chin_to_top"] <= 0.26
    assert 0.08 <= m["outer_eye_corners"] <= 0.10
    assert m["nose_ahead_of_eye_corners"] >= 0.015


def test_axes_and_origin(head, layer):
    model, topo = head
    v = model.v_template
    lmk = landmarks(layer, v)
    assert lmk[45, 0] > 0 > lmk[36, 0]                     # x towards the subject's left
    top = topo.subsets["head"][v[topo.subsets["head"], 1].argmax()]
    assert top not in topo.subsets["face"] and v[top, 1] > lmk[17:27, 1].max() + 0.08  # y up
    assert lmk[30, 2] > lmk[36, 2] + 0.02                   # the face looks along +z
    head_v = v[topo.subsets["head"]]
    np.testing.assert_allclose(0.5 * (head_v.min(0) + head_v.max(0)), sh.HEAD_CENTRE, atol=1e-6)


def test_landmark_layout(head, layer):
    lmk = landmarks(layer, head[0].v_template)
    assert lmk[36, 0] < lmk[39, 0] < lmk[42, 0] < lmk[45, 0]
    assert lmk[48, 1] < lmk[30, 1] and lmk[54, 1] < lmk[30, 1]
    assert lmk[8, 1] == lmk[:, 1].min()
    assert lmk[30, 2] == lmk[:, 2].max()
    assert np.all(lmk[17:27, 1] > lmk[36:48, 1].max())     # brows above the eyes
    assert lmk[51, 1] > lmk[62, 1] > lmk[66, 1] > lmk[57, 1]  # lips top to bottom
    assert np.all(np.diff(lmk[0:9, 1]) < 0) and np.all(np.diff(lmk[8:17, 1]) > 0)  # jaw down to the chin


def test_landmark_embedding_format(head):
    _, topo = head
    assert topo.static_face_idx.shape == (51,) and topo.static_bary.shape == (51, 3)
    assert topo.dynamic_face_idx.shape == (79, 17) and topo.dynamic_bary.shape == (79, 17, 3)
    np.testing.assert_allclose(topo.lmk_bary.sum(1), 1.0, atol=1e-6)
    assert topo.lmk_bary.min() >= 0.0


def test_subsets(head):
    model, topo = head
    s = {k: set(v.tolist()) for k, v in topo.subsets.items()}
    assert s["face"] < s["face_w_ears"] and s["face"] < s["head"]
    V = len(model.v_template)
    assert 0.2 * V < len(s["face"]) < len(s["face_w_ears"]) < len(s["head"]) < V
    v = model.v_template
    assert v[topo.subsets["head"], 1].min() > v[:, 1].min() + 0.04          # no neck in "head"
    ears = np.abs(v[:, 0]) > 0.95 * np.abs(v[:, 0]).max()
    assert ears.any() and s["face_w_ears"] >= set(np.flatnonzero(ears).tolist())
    assert not s["face"] & set(np.flatnonzero(ears).tolist())


@pytest.mark.parametrize("block", [slice(0, 300), slice(300, 400)], ids=["shape", "expression"])
def test_components_orthogonal_and_decreasing(head, block):
    dirs = head[0].shapedirs[:, :, block].astype(np.float64)
    D = dirs.reshape(-1, dirs.shape[-1])
    norms = np.linalg.norm(D, axis=0)
    assert np.all(np.diff(norms) < 0) and norms[-1] > 0
    gram = (D / norms).T @ (D / norms)
    np.testing.assert_allclose(gram, np.eye(len(norms)), atol=1e-4)


def test_leading_shape_components_are_global(head):
    model, topo = head
    dirs = model.shapedirs[:, :, :5]
    moving = np.linalg.norm(dirs, axis=1) > 0.2 * np.linalg.norm(dirs, axis=1).max(0)
    assert np.all(moving.mean(0) > 0.4)  # each moves much of the head, not a local bump


def test_expressions_vanish_on_back_of_head(head):
    model, _ = head
    v = model.v_template
    back = v[:, 2] < v[:, 2].min() + 0.08
    assert back.sum() > 200
    assert np.abs(model.shapedirs[back, :, 300:]).max() < 1e-7
    front = np.abs(model.shapedirs[:, :, 300:]).max(axis=(1, 2))
    assert front.max() > 1e-3


def test_jaw_opens_mouth(head, layer):
    model, topo = head
    rest, opened = model.v_template, posed(layer, jaw=[0.3, 0.0, 0.0])
    l0, l1 = landmarks(layer, rest), landmarks(layer, opened)
    assert l1[8, 1] < l0[8, 1] - 0.015                     # chin down
    assert l1[57, 1] < l0[57, 1] - 0.01                    # lower lip down
    assert np.linalg.norm(l1[51] - l0[51]) < 5e-4          # upper lip stays
    assert (l1[62, 1] - l1[66, 1]) > (l0[62, 1] - l0[66, 1]) + 0.01  # the mouth opens
    forehead = np.flatnonzero(rest[:, 1] > l0[17:27, 1].max() + 0.02)
    assert np.abs(opened[forehead] - rest[forehead]).max() < 1e-6


def test_neck_turns_head_over_neck(head, layer):
    model, _ = head
    rest, turned = model.v_template, posed(layer, neck=[0.0, 0.5, 0.0])
    l0, l1 = landmarks(layer, rest), landmarks(layer, turned)
    assert l1[30, 0] - l0[30, 0] > 0.03                    # nose swings towards +x
    bottom = rest[:, 1] < rest[:, 1].min() + 0.01
    assert np.abs(turned[bottom] - rest[bottom]).max() < 1e-4


def test_rig_arrays(head):
    model, _ = head
    V = len(model.v_template)
    assert model.weights.shape == (V, 5) and model.weights.min() >= 0
    np.testing.assert_allclose(model.weights.sum(1), 1.0, atol=1e-5)
    assert model.J_regressor.shape == (5, V) and model.J_regressor.min() >= 0
    np.testing.assert_allclose(model.J_regressor.sum(1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(model.parents, [-1, 0, 1, 1, 1])
    assert model.posedirs.shape == (V, 3, 36)
    joints = model.J_regressor @ model.v_template
    assert joints[3, 0] > 0 > joints[4, 0]                  # left eye on +x
    assert joints[0, 1] < joints[1, 1] < joints[3, 1]        # global below neck below the eyes
    eyes = np.flatnonzero(model.weights[:, 3] > 0.5)
    assert len(eyes) > 10 and np.all(model.v_template[eyes, 0] > 0)


def test_random_heads_do_not_fold(head, layer):
    model, _ = head
    n0 = face_normals(model.v_template, model.faces)
    rng = np.random.default_rng(0)
    for _ in range(5):
        for kwargs in ({"shape": rng.normal(size=300)}, {"expression": rng.normal(size=100)}):
            n = face_normals(posed(layer, **kwargs), model.faces)
            assert ((n * n0).sum(1) < 0).sum() == 0


def test_deterministic_per_seed(local_mesh, head):
    v = local_mesh[0][::25]
    fields = lambda seed: sh.identity_fields(v, sh.ANATOMY, np.random.default_rng(seed))  # noqa: E731
    np.testing.assert_array_equal(fields(0), fields(0))
    other, _ = sh.rig_head(*local_mesh, seed=1)
    np.testing.assert_array_equal(other.v_template, head[0].v_template)
    np.testing.assert_array_equal(other.J_regressor, head[0].J_regressor)
    assert not np.allclose(other.shapedirs[:, :, 30:], head[0].shapedirs[:, :, 30:], atol=1e-5)


def test_save_load_round_trip(head, tmp_path):
    model, topo = head
    save_flame_assets(model, topo, tmp_path)
    a = load_flame_assets(tmp_path)
    for key in ("v_template", "faces", "shapedirs", "J_regressor", "weights", "parents"):
        np.testing.assert_allclose(getattr(a.model, key), getattr(model, key), atol=1e-7)
    np.testing.assert_array_equal(a.topology.lmk_face_idx, topo.lmk_face_idx)
    np.testing.assert_allclose(a.topology.lmk_bary, topo.lmk_bary, atol=1e-7)
    for name in ("face", "face_w_ears", "head"):
        np.testing.assert_array_equal(a.topology.subsets[name], topo.subsets[name])


def test_albedo(head, layer):
    model, topo = head
    v = model.v_template
    c = sh.albedo(v, topo, np.random.default_rng(3))
    assert c.shape == (len(v), 3) and c.dtype == np.float32 and 0 <= c.min() and c.max() <= 1
    np.testing.assert_array_equal(c, sh.albedo(v, topo, np.random.default_rng(3)))
    lmk = landmarks(layer, v)
    nearest = lambda p: np.argmin(np.linalg.norm(v - p, axis=1))  # noqa: E731
    lip, cheek = c[nearest(0.5 * (lmk[51] + lmk[62]))], c[nearest(0.5 * (lmk[3] + lmk[31]))]
    assert lip[0] / lip[1] > cheek[0] / cheek[1]            # lips redder than the cheek
    eye = c[nearest(0.5 * (lmk[36] + lmk[39]) + (0, 0, 0.0))]
    assert not np.allclose(eye, cheek, atol=0.05)
    tones = [sh.albedo(v, topo, np.random.default_rng(s))[nearest(lmk[3])] for s in range(8)]
    assert np.ptp(np.mean(tones, axis=1)) > 0.1             # skin tones vary between people
