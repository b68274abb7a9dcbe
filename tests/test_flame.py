"""FLAME file formats, the 3DMM vector and the layer (against an independent numpy LBS)."""
import collections
import io
import pickle
import re
import shlex
import struct
import sys
import types
import weakref
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.spatial.transform import Rotation

import dad3dlib
from conftest import tiny_flame_assets
from dad3dlib import flame
from dad3dlib.flame import (FlameFormatError, FlameLayer, FlameModel, load_flame_assets,
                            matrix_to_rot6d, pack_3dmm, rot6d_to_matrix, save_flame_assets, split_3dmm)

SHARED_TOPOLOGY = Path(dad3dlib.REPO_ROOT).parent / "shared" / "flame_topology"


@pytest.fixture
def tiny_dir(tmp_path):
    assets = tiny_flame_assets(n_vertices=40, n_faces=60)
    model, topo = assets.model, assets.topology
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


def _published_flame_pickle(path: Path, model: FlameModel) -> bytes:
    """Write generic_model.pkl as the published FLAME 2020 file is: a protocol-2 dict with its keys,
    ``shapedirs`` a chumpy ``Ch`` pickled with chumpy's own state (its __dict__ less _parents and
    _cache: x, the set _dirty_vars, ...), J_regressor(_prior) scipy CSC matrices, ``f`` uint32, the
    kintree root 2**32-1, and the module names of the numpy 1 / scipy of the time."""
    import scipy.sparse

    class Ch:  # chumpy.ch.Ch, as far as pickling goes (chumpy defines __getstate__, no __reduce__)
        def __init__(self, x):
            self.__dict__.update(_dirty_vars={"x"}, _itr=None, _parents=weakref.WeakKeyDictionary(),
                                 _cache={"r": None, "drs": weakref.WeakKeyDictionary()},
                                 _depends_on_deps={}, _make_dense=False, _make_sparse=False,
                                 x=np.asarray(x, np.float64))

        def __getstate__(self):  # the weak dictionaries cannot be pickled
            state = dict(self.__dict__)
            del state["_parents"], state["_cache"]
            return state

    ch_mod = types.ModuleType("chumpy.ch")
    Ch.__module__, Ch.__qualname__, ch_mod.Ch = "chumpy.ch", "Ch", Ch
    V = len(model.v_template)
    J_regressor = scipy.sparse.csc_matrix(model.J_regressor.astype(np.float64))
    d = {"f": model.faces.astype(np.uint32), "J_regressor": J_regressor,
         "kintree_table": np.array([[2**32 - 1, 0, 1, 1, 1], [0, 1, 2, 3, 4]], np.int64),
         "J": J_regressor @ model.v_template.astype(np.float64), "weights": model.weights.astype(np.float64),
         "posedirs": model.posedirs.astype(np.float64), "v_template": model.v_template.astype(np.float64),
         "shapedirs": Ch(model.shapedirs), "bs_style": "lbs", "bs_type": "lrotmin",
         "weights_prior": model.weights.astype(np.float64), "J_regressor_prior": J_regressor.copy(),
         "vert_sym_idxs": np.arange(V)[::-1].copy()}
    saved = {k: sys.modules.pop(k) for k in ("chumpy", "chumpy.ch") if k in sys.modules}
    sys.modules["chumpy"], sys.modules["chumpy.ch"] = types.ModuleType("chumpy"), ch_mod
    try:
        data = pickle.dumps(d, protocol=2)
    finally:
        del sys.modules["chumpy"], sys.modules["chumpy.ch"]
        sys.modules.update(saved)
    for new, old in ((b"cnumpy.core.multiarray\n", b"cnumpy._core.multiarray\n"),
                     (b"cscipy.sparse.csc\n", b"cscipy.sparse._csc\n")):
        assert old in data
        data = data.replace(old, new)
    path.write_bytes(data)
    return data


def test_published_flame_pickle_loads_without_chumpy(tiny_dir):
    path, model, _ = tiny_dir
    data = _published_flame_pickle(path / flame.MODEL_FILE, model)
    assert b"cchumpy.ch\nCh\n" in data and b"c__builtin__\nset\n" in data and b"_dirty_vars" in data
    with pytest.raises(ImportError):
        import chumpy  # noqa: F401
    a = load_flame_assets(path)
    np.testing.assert_allclose(a.model.shapedirs, model.shapedirs)
    np.testing.assert_allclose(a.model.J_regressor, model.J_regressor, rtol=1e-6)
    np.testing.assert_allclose(a.model.v_template, model.v_template)
    np.testing.assert_array_equal(a.model.faces, model.faces)
    np.testing.assert_array_equal(a.model.parents, [-1, 0, 1, 1, 1])
    assert FlameLayer(a).n_vertices == len(model.v_template)


class _Exploit:
    def __reduce__(self):
        import os
        return (os.system, ("echo pwned > /dev/null",))


def test_code_executing_pickle_is_refused(tmp_path):
    bad = tmp_path / "generic_model.pkl"
    bad.write_bytes(pickle.dumps({"v_template": _Exploit()}))
    with pytest.raises(FlameFormatError, match=r"generic_model\.pkl.*(posix|os)\.system.*not allowed"):
        flame.safe_load_pickle(bad)


# Hand-assembled malicious pickles (raw opcodes): each writes the marker file when its global is
# resolved (pickle walks a dotted name attribute by attribute from protocol 4 on).
def _unicode(s: str) -> bytes:
    b = s.encode()
    return pickle.BINUNICODE + struct.pack("<I", len(b)) + b


def _global(module: str, name: str, stack: bool = True) -> bytes:
    if stack:  # STACK_GLOBAL (protocol 4)
        return _unicode(module) + _unicode(name) + pickle.STACK_GLOBAL
    return pickle.GLOBAL + f"{module}\n{name}\n".encode()


def _call(fn: bytes, *args: bytes) -> bytes:
    return fn + pickle.MARK + b"".join(args) + pickle.TUPLE + pickle.REDUCE


def _program(proto: int, body: bytes) -> bytes:
    return pickle.PROTO + bytes([proto]) + body + pickle.STOP


def _escapes(marker: Path) -> dict[str, bytes]:
    code = _unicode(f"open({str(marker)!r}, 'w').write('ran')")
    shell = _unicode(f"touch {shlex.quote(str(marker))}")

    def via_get(module, name, stack=True):  # <module>.<name> is dict.get of a __builtins__ -> eval
        return _program(4, _call(_call(_global(module, name, stack), _unicode("eval")), code))

    def call(module, name, arg, proto=2):
        return _program(proto, _call(_global(module, name, proto >= 4), arg))

    nested = _program(2, _call(_global("os", "system", False), shell))
    return {
        "numpy dotted, STACK_GLOBAL": via_get("numpy.lib.format", "dtype_to_descr.__builtins__.get"),
        "numpy dotted, GLOBAL": via_get("numpy.lib.format", "dtype_to_descr.__builtins__.get", stack=False),
        "numpy function dotted": via_get("numpy", "load.__builtins__.get"),
        "allowed numpy name, dotted": via_get("numpy._core.numeric", "_frombuffer.__builtins__.get"),
        "scipy.sparse dotted": via_get("scipy.sparse._csc", "csc_matrix.__init__.__builtins__.get"),
        "chumpy dotted": via_get("chumpy.ch", "Ch.__new__.__builtins__.get"),
        "copyreg dotted": via_get("copyreg", "_reconstructor.__builtins__.get"),
        "builtins.eval": call("builtins", "eval", code, 4),
        "__builtin__.eval": call("__builtin__", "eval", code),
        "builtins.exec": call("builtins", "exec", code, 4),
        "os.system": call("os", "system", shell),
        "posix.system": call("posix", "system", shell),
        "subprocess.getoutput": call("subprocess", "getoutput", shell),
        "torch._utils._rebuild_tensor_v2": call("torch._utils", "_rebuild_tensor_v2", _unicode("x")),
        "torch.storage._load_from_bytes": call(  # torch.load(weights_only=False) of a nested pickle
            "torch.storage", "_load_from_bytes", pickle.BINBYTES + struct.pack("<I", len(nested)) + nested, 4),
    }


@pytest.mark.parametrize("case", sorted(_escapes(Path("m"))))
def test_crafted_pickles_run_no_code(tmp_path, case):
    marker = tmp_path / "marker"
    bad = tmp_path / "generic_model.pkl"
    bad.write_bytes(_escapes(marker)[case])
    with pytest.raises(FlameFormatError, match=re.escape(str(bad)) + r": refused to unpickle: .*not allowed"):
        flame.safe_load_pickle(bad)
    assert not marker.exists()


def test_crafted_pickles_are_refused_in_every_flame_file(tiny_dir):
    path, _, _ = tiny_dir
    marker = path / "marker"
    exploit = _escapes(marker)["numpy dotted, STACK_GLOBAL"]
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "|O", "fortran_order": False, "shape": ()})
    for name, content in ((flame.MODEL_FILE, exploit), (flame.STATIC_FILE, exploit),
                          (flame.DYNAMIC_FILE, header.getvalue() + exploit)):
        kept = (path / name).read_bytes()
        (path / name).write_bytes(content)
        with pytest.raises(FlameFormatError, match=re.escape(str(path / name)) + ": refused to unpickle"):
            load_flame_assets(path)
        assert not marker.exists()
        (path / name).write_bytes(kept)
    load_flame_assets(path)


def test_refused_modules_are_not_imported(tmp_path, monkeypatch):
    """A module named in a pickle is never imported (importing can run code, e.g. a __main__)."""
    marker = tmp_path / "marker"
    (tmp_path / "numpy_import_probe.py").write_text(f"open({str(marker)!r}, 'w').write('imported')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    bad = tmp_path / "generic_model.pkl"
    bad.write_bytes(_program(4, _global("numpy_import_probe", "dtype")))
    try:
        with pytest.raises(FlameFormatError, match=re.escape(str(bad)) + r".*numpy_import_probe\.dtype' is not allowed"):
            flame.safe_load_pickle(bad)
        assert not marker.exists() and "numpy_import_probe" not in sys.modules
    finally:
        sys.modules.pop("numpy_import_probe", None)


@pytest.mark.parametrize("proto", [2, 4, 5])
def test_arrays_and_matrices_numpy_and_scipy_pickle_load(tmp_path, proto):
    import scipy.sparse

    arrays = {t: np.arange(6, dtype=t).reshape(2, 3) for t in ("float32", "float64", "int64", "uint32")}
    obj = {**arrays, "fortran": np.asfortranarray(arrays["float64"]), "scalar": np.float64(2.5),
           "csc": scipy.sparse.csc_matrix(arrays["float64"]), "csr": scipy.sparse.csr_matrix(arrays["float32"]),
           "ordered": collections.OrderedDict(a=1), "set": {"x"}, "bytes": b"ab"}
    data = pickle.dumps(obj, protocol=proto)
    if proto == 2:  # numpy 1 and the scipy of the published files named these modules so
        data = data.replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n")
        data = data.replace(b"cscipy.sparse._csc\n", b"cscipy.sparse.csc\n")
    (tmp_path / "a.pkl").write_bytes(data)
    out = flame.safe_load_pickle(tmp_path / "a.pkl")
    for t, a in arrays.items():
        assert out[t].dtype == a.dtype
        np.testing.assert_array_equal(out[t], a)
    np.testing.assert_array_equal(out["fortran"], arrays["float64"])
    np.testing.assert_array_equal(out["csc"].toarray(), arrays["float64"])
    np.testing.assert_array_equal(out["csr"].toarray(), arrays["float32"])
    assert out["scalar"] == 2.5 and out["ordered"] == {"a": 1} and out["set"] == {"x"} and out["bytes"] == b"ab"


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
    # pytorch3d stacks the same basis as rows; ours (the reference's) is columns.
    torch.testing.assert_close(R, rotation_6d_to_matrix(x).transpose(1, 2))
    torch.testing.assert_close(rot6d_to_matrix(matrix_to_rot6d(R)), R)


def test_frontal_rot6d_is_the_camera_flip():
    """The pose a head facing the camera has: the 3DMM rotation diag(FLIP_YZ)."""
    from dad3dlib.geometry import FLIP_YZ, FRONTAL_ROT6D
    flip = torch.diag(torch.tensor(FLIP_YZ, dtype=torch.float64))
    torch.testing.assert_close(matrix_to_rot6d(flip), torch.tensor(FRONTAL_ROT6D, dtype=torch.float64))


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


def test_flame_needs_a_path_and_imports_no_synthetic_head():
    """No import cycle: the synthetic head (which writes FLAME files) imports flame, never the
    reverse; "no path given" is resolved by data.flame_dir / synthetic_head.default_flame_dir."""
    import ast

    tree = ast.parse(Path(flame.__file__).read_text())
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    imported |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    assert not any("synthetic_head" in (m or "") for m in imported)
    with pytest.raises(TypeError):
        load_flame_assets()


def test_jaw_only_skinning_matches_smplx_and_the_reference(tiny_dir):
    """The layer's fast path (only the jaw rotates: every canonical mesh of training and
    evaluation) gives smplx's lbs and the independent reference, values and gradients."""
    from smplx.lbs import lbs

    path, model, _ = tiny_dir
    layer = FlameLayer(load_flame_assets(path))
    assert layer.jaw_only
    g = torch.Generator().manual_seed(2)
    shape, expr = torch.randn(4, 300, generator=g), torch.randn(4, 100, generator=g)
    jaw = (torch.randn(4, 3, generator=g) * 0.4).requires_grad_()
    fast = layer.vertices(shape, expr, jaw)
    zero = torch.zeros_like(jaw)
    pose = torch.cat([zero, zero, jaw, zero, zero], -1)
    ref, _ = lbs(torch.cat([shape, expr], -1), pose, layer.v_template[None].expand(4, -1, -1), layer.shapedirs,
                 layer.posedirs, layer.J_regressor, layer.parents, layer.lbs_weights)
    torch.testing.assert_close(fast, ref, atol=1e-6, rtol=1e-5)
    for i in range(4):
        np.testing.assert_allclose(fast[i].detach().numpy(), numpy_lbs(model, torch.cat([shape, expr], -1)[i].numpy(),
                                                                       pose[i].detach().numpy()), atol=1e-5)
    w = torch.randn(fast.shape, generator=g)
    g_fast, = torch.autograd.grad((fast * w).sum(), jaw)
    g_ref, = torch.autograd.grad((ref * w).sum(), jaw)
    torch.testing.assert_close(g_fast, g_ref, atol=1e-5, rtol=1e-4)


def test_selected_vertices_are_those_of_the_whole_mesh(tiny_dir):
    """Training computes only the vertices its losses read (select_vertices): the same points,
    values and gradients, as the whole mesh taken at those ids."""
    path, _, _ = tiny_dir
    layer = FlameLayer(load_flame_assets(path))
    g = torch.Generator().manual_seed(4)
    ids = torch.randperm(layer.n_vertices, generator=g)[: layer.n_vertices // 2]
    layer.select_vertices(ids)
    params = (torch.randn(3, 413, generator=g) * 0.3).requires_grad_()
    part, whole = layer.canonical(params, selected=True), layer.canonical(params)[:, ids]
    torch.testing.assert_close(part, whole)
    w = torch.randn(part.shape, generator=g)
    torch.testing.assert_close(torch.autograd.grad((part * w).sum(), params)[0],
                               torch.autograd.grad((whole * w).sum(), params)[0])
    layer.select_vertices(None)
    assert layer.canonical(params, selected=True).shape[1] == layer.n_vertices
