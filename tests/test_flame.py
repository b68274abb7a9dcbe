"""FLAME file formats, the 3DMM vector and the layer (against an independent numpy LBS)."""
import pickle
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.spatial.transform import Rotation

import dad3dlib
from dad3dlib import flame
from dad3dlib.flame import (FlameFormatError, FlameLayer, FlameModel, FlameTopology, load_flame_assets,
                            matrix_to_rot6d, pack_3dmm, rot6d_to_matrix, save_flame_assets, split_3dmm)

SHARED_TOPOLOGY = Path(dad3dlib.REPO_ROOT).parent / "shared" / "flame_topology"


def tiny_flame(seed=0, V=40, F=60):
    """A random FLAME-shaped model and topology with the real array layouts."""
    rng = np.random.default_rng(seed)
    faces = rng.integers(0, V, size=(F, 3)).astype(np.int64)
    weights = rng.random((V, 5)).astype(np.float32)
    J = rng.random((5, V)).astype(np.float32)
    model = FlameModel(
        v_template=rng.normal(0, 0.1, (V, 3)).astype(np.float32), faces=faces,
        shapedirs=rng.normal(0, 1e-3, (V, 3, 400)).astype(np.float32),
        posedirs=rng.normal(0, 1e-3, (V, 3, 36)).astype(np.float32),
        J_regressor=J / J.sum(1, keepdims=True), weights=weights / weights.sum(1, keepdims=True),
        kintree_table=np.array([[-1, 0, 1, 1, 1], [0, 1, 2, 3, 4]], np.int64))
    bary = lambda *s: (lambda b: b / b.sum(-1, keepdims=True))(rng.random(s + (3,)))  # noqa: E731
    topo = FlameTopology(faces=faces, static_face_idx=rng.integers(0, F, 51), static_bary=bary(51),
                         dynamic_face_idx=rng.integers(0, F, (79, 17)), dynamic_bary=bary(79, 17),
                         subsets={"face": np.arange(10), "face_w_ears": np.arange(20), "head": np.arange(30)})
    return model, topo


@pytest.fixture
def tiny_dir(tmp_path):
    model, topo = tiny_flame()
    save_flame_assets(model, topo, tmp_path)
    return tmp_path, model, topo


def test_round_trip(tiny_dir):
    path, model, topo = tiny_dir
    a = load_flame_assets(path)
    for key in ("v_template", "faces", "shapedirs", "posedirs", "J_regressor", "weights"):
        np.testing.assert_allclose(getattr(a.model, key), getattr(model, key), rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(a.model.parents, [-1, 0, 1, 1, 1])
    np.testing.assert_array_equal(a.topology.lmk_face_idx,
                                  np.concatenate([topo.dynamic_face_idx[0], topo.static_face_idx]))
    for name in flame.SUBSETS:
        np.testing.assert_array_equal(a.topology.subsets[name], topo.subsets[name])


def _fake_chumpy_pickle(path: Path, model: FlameModel):
    """Write generic_model.pkl the way the published file is: chumpy Ch objects holding arrays."""
    ch_mod = types.ModuleType("chumpy.ch")

    class Ch:
        def __init__(self, x):
            self.x = x
    Ch.__module__, Ch.__qualname__ = "chumpy.ch", "Ch"
    ch_mod.Ch = Ch
    sys.modules["chumpy"], sys.modules["chumpy.ch"] = types.ModuleType("chumpy"), ch_mod
    try:
        import scipy.sparse
        d = {"v_template": Ch(model.v_template.astype(np.float64)), "f": model.faces.astype(np.uint32),
             "shapedirs": Ch(model.shapedirs), "posedirs": Ch(model.posedirs),
             "J_regressor": scipy.sparse.csc_matrix(model.J_regressor), "weights": Ch(model.weights),
             "kintree_table": np.array([[2**32 - 1, 0, 1, 1, 1], [0, 1, 2, 3, 4]], np.int64)}
        path.write_bytes(pickle.dumps(d, protocol=2))
    finally:
        del sys.modules["chumpy"], sys.modules["chumpy.ch"]


def test_chumpy_pickle_loads_without_chumpy(tiny_dir):
    path, model, _ = tiny_dir
    _fake_chumpy_pickle(path / flame.MODEL_FILE, model)
    with pytest.raises(ImportError):
        import chumpy  # noqa: F401
    a = load_flame_assets(path)
    np.testing.assert_allclose(a.model.shapedirs, model.shapedirs)
    np.testing.assert_allclose(a.model.J_regressor, model.J_regressor, rtol=1e-6)
    np.testing.assert_array_equal(a.model.parents, [-1, 0, 1, 1, 1])


class _Exploit:
    def __reduce__(self):
        import os
        return (os.system, ("echo pwned > /dev/null",))


def test_code_executing_pickle_is_refused(tmp_path):
    bad = tmp_path / "generic_model.pkl"
    bad.write_bytes(pickle.dumps({"v_template": _Exploit()}))
    with pytest.raises(FlameFormatError, match=r"generic_model\.pkl.*(posix|os)\.system.*not allowed"):
        flame.safe_load_pickle(bad)


def test_corrupt_and_missing_files_name_the_file(tiny_dir):
    path, _, _ = tiny_dir
    (path / flame.STATIC_FILE).write_bytes(b"\x80\x02}q\x00(X")  # truncated
    with pytest.raises(FlameFormatError, match="flame_static_embedding.pkl"):
        load_flame_assets(path)
    (path / "face.npy").unlink()
    with pytest.raises(FlameFormatError, match="face.npy|flame_static"):
        load_flame_assets(path)
    with pytest.raises(FlameFormatError, match="not found"):
        load_flame_assets(path / "nope")


def test_wrong_shape_is_reported(tiny_dir):
    path, model, topo = tiny_dir
    model.shapedirs = model.shapedirs[:, :, :50]
    save_flame_assets(model, topo, path)
    with pytest.raises(FlameFormatError, match=r"generic_model\.pkl: 'shapedirs' has shape"):
        load_flame_assets(path)


def test_rot6d_is_a_rotation_and_matches_pytorch3d():
    from pytorch3d.transforms import rotation_6d_to_matrix
    x = torch.randn(64, 6, dtype=torch.float64)
    R = rot6d_to_matrix(x)
    eye = torch.eye(3, dtype=R.dtype).expand_as(R)
    torch.testing.assert_close(R.transpose(1, 2) @ R, eye)
    torch.testing.assert_close(torch.linalg.det(R), torch.ones(64, dtype=R.dtype))
    # pytorch3d stacks the same basis as rows; the brief's convention is columns.
    torch.testing.assert_close(R, rotation_6d_to_matrix(x).transpose(1, 2))
    torch.testing.assert_close(rot6d_to_matrix(matrix_to_rot6d(R)), R)


def test_3dmm_split_pack_round_trip():
    v = torch.randn(4, flame.N_3DMM)
    p = split_3dmm(v)
    assert [p[k].shape[-1] for k in ("shape", "expression", "jaw", "rot6d", "translation", "scale")] == \
        [300, 100, 3, 6, 3, 1]
    torch.testing.assert_close(pack_3dmm(**p), v)
    torch.testing.assert_close(p["jaw"], v[:, 400:403])
    with pytest.raises(ValueError, match="413"):
        split_3dmm(torch.zeros(2, 412))


def numpy_lbs(model: FlameModel, betas, pose):
    """Independent reference: plain per-joint rigid transforms, one sample, float64."""
    v = model.v_template.astype(np.float64) + model.shapedirs.astype(np.float64) @ betas
    J = model.J_regressor @ v
    rots = Rotation.from_rotvec(pose.reshape(5, 3)).as_matrix()
    v = v + model.posedirs.astype(np.float64) @ (rots[1:] - np.eye(3)).reshape(-1)
    parents = model.parents
    G = np.zeros((5, 4, 4))
    for j in range(5):
        local = np.eye(4)
        local[:3, :3] = rots[j]
        local[:3, 3] = J[j] - (J[parents[j]] if parents[j] >= 0 else 0)
        G[j] = local if parents[j] < 0 else G[parents[j]] @ local
    rest = G.copy()
    rest[:, :3, 3] -= np.einsum("jab,jb->ja", G[:, :3, :3], J)  # remove the rest-pose joint location
    T = np.einsum("vj,jab->vab", model.weights, rest)
    return np.einsum("vab,vb->va", T[:, :3, :3], v) + T[:, :3, 3]


def test_layer_matches_reference_lbs(tiny_dir):
    path, model, _ = tiny_dir
    layer = FlameLayer(load_flame_assets(path))
    rng = np.random.default_rng(1)
    betas = rng.normal(size=(3, 400))
    pose = rng.normal(0, 0.4, size=(3, 5, 3))
    pose[:, 3:] = 0  # the layer keeps the eyes at zero
    t = lambda a: torch.tensor(a, dtype=torch.float32)  # noqa: E731
    out = layer.vertices(t(betas[:, :300]), t(betas[:, 300:]), jaw=t(pose[:, 2]), neck=t(pose[:, 1]),
                         global_pose=t(pose[:, 0]))
    for i in range(3):
        np.testing.assert_allclose(out[i].numpy(), numpy_lbs(model, betas[i], pose[i].reshape(-1)),
                                   atol=1e-5)


def test_canonical_posed_reproject(tiny_dir):
    path, _, _ = tiny_dir
    layer = FlameLayer(load_flame_assets(path))
    params = torch.randn(2, flame.N_3DMM) * 0.1
    p = split_3dmm(params)
    base = layer.vertices(p["shape"], p["expression"], p["jaw"])
    can = layer.canonical(params)
    torch.testing.assert_close(can - base, torch.tensor([0, 0, 0.05]).expand_as(base))
    R = rot6d_to_matrix(p["rot6d"])
    torch.testing.assert_close(layer.posed(params), torch.einsum("bij,bvj->bvi", R, can))
    S = 256
    pix = layer.reproject(params, S)
    s = (p["scale"] + 1)[:, :, None]
    expect = (torch.einsum("bij,bvj->bvi", R, can) * s + torch.cat(
        [p["translation"][:, :2], torch.zeros(2, 1)], 1)[:, None] + 1) / 2 * S
    torch.testing.assert_close(pix, expect)
    params.requires_grad_(True)
    layer.reproject(params, S).sum().backward()
    assert params.grad.abs().sum() > 0


def test_landmarks_on_real_flame_topology():
    if not SHARED_TOPOLOGY.is_dir():
        pytest.skip("../shared/flame_topology not present")
    a = load_flame_assets(SHARED_TOPOLOGY, require_model=False)
    t = a.topology
    assert t.faces.shape == (9976, 3) and t.dynamic_face_idx.shape == (79, 17)
    assert {k: len(v) for k, v in t.subsets.items()} == {"face": 2094, "face_w_ears": 3669, "head": 3457}
    verts = torch.randn(2, 5023, 3, dtype=torch.float64)
    lmk = flame.landmarks_from_vertices(verts, torch.as_tensor(t.faces), torch.as_tensor(t.lmk_face_idx),
                                        torch.as_tensor(t.lmk_bary, dtype=torch.float64))
    assert lmk.shape == (2, 68, 3)
    # landmark 30 (nose tip) is static point 13: check one by hand
    f = t.faces[t.static_face_idx[13]]
    np.testing.assert_allclose(lmk[1, 30].numpy(), (t.static_bary[13][:, None] * verts[1, f].numpy()).sum(0),
                               rtol=1e-6)
    np.testing.assert_allclose(t.lmk_bary.sum(1), 1, atol=1e-5)
