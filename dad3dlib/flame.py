"""FLAME: file formats, the DAD-3DNet 3DMM vector, and a batched differentiable layer.

One loading path serves the real FLAME model (``generic_model.pkl``, often chumpy-pickled) and the
project's synthetic head, which is written in exactly the same formats. Pickles are untrusted input
and only go through :func:`safe_load_pickle`.

Shapes: B batch, V vertices (5023 on FLAME), F faces, L landmarks.
"""
from __future__ import annotations

import builtins
import codecs
import collections
import copyreg
import io
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from .errors import InputValueError
from .files import LOAD_ERRORS, atomic_write, read_bytes
from .geometry import landmarks_from_vertices, project

N_SHAPE, N_EXPR, N_JAW, N_ROT6D, N_TRANS, N_SCALE = 300, 100, 3, 6, 3, 1
N_3DMM = N_SHAPE + N_EXPR + N_JAW + N_ROT6D + N_TRANS + N_SCALE  # 413
LAYOUT_3DMM = (("shape", N_SHAPE), ("expression", N_EXPR), ("jaw", N_JAW),
               ("rot6d", N_ROT6D), ("translation", N_TRANS), ("scale", N_SCALE))
ALIGN7 = (36, 39, 42, 45, 33, 48, 54)
SUBSETS = ("face", "face_w_ears", "head")
Z_N_SUBSET = "face_w_ears"  # the vertices Z_n is scored on (the reference benchmark's head_indices.npy)
FACE_SUBSET = "face"
CANONICAL_Z_OFFSET = 0.05  # moves the origin to the skull centre (DAD-3DNet's canonical space)
JAW_JOINT = 2  # FLAME's joints: global, neck, jaw, left eye, right eye

MODEL_FILE = "generic_model.pkl"
STATIC_FILE = "flame_static_embedding.pkl"
DYNAMIC_FILE = "flame_dynamic_embedding.npy"
FACES_FILE = "flame_mesh_faces.pt"


class FlameFormatError(InputValueError):
    """A FLAME asset file is missing, refused or malformed; the message names the file."""


# --------------------------------------------------------------------------------------------
# Restricted unpickling
# --------------------------------------------------------------------------------------------
class _ChumpyStub:
    """Stands in for chumpy objects so that chumpy pickles load without chumpy installed."""

    def __setstate__(self, state):
        self.__dict__.update(state if isinstance(state, dict) else {"state": state})


# Every global a FLAME-asset pickle may name, as exact (module, name) pairs, and the object each
# stands for. Nothing named in a pickle is imported or looked up by attribute: numpy 1 / numpy 2
# module paths and Python 2 / 3 builtins map to objects of modules imported here.
_ALLOWED: dict[tuple[str, str], object] = {
    ("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype,
    **{(m, n): getattr(np._core.multiarray, n)  # arrays (protocols 0-4), numpy scalars
       for m in ("numpy.core.multiarray", "numpy._core.multiarray") for n in ("_reconstruct", "scalar")},
    **{(m, "_frombuffer"): np._core.numeric._frombuffer  # arrays, protocol 5
       for m in ("numpy.core.numeric", "numpy._core.numeric")},
    **{(m, "_reconstructor"): copyreg._reconstructor for m in ("copyreg", "copy_reg")},
    **{(m, n): getattr(builtins, n)  # set: the state of a chumpy Ch (_dirty_vars)
       for m in ("builtins", "__builtin__") for n in ("object", "set")},
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("_codecs", "encode"): codecs.encode,  # how protocol-2 pickles store bytes
    ("chumpy.ch", "Ch"): _ChumpyStub,
}
# scipy sparse matrices (scipy.sparse.csc in the published files, scipy.sparse._csc today) -> class name
_SPARSE = {(f"scipy.sparse{sep}{k}", f"{k}_matrix"): f"{k}_matrix"
           for k in ("csc", "csr", "coo") for sep in (".", "._")}


class _RestrictedUnpickler(pickle.Unpickler):
    """Resolves only the exact pairs of ``_ALLOWED`` and ``_SPARSE``; anything else (a dotted
    name, any other module) is refused before anything is imported."""

    def find_class(self, module: str, name: str):
        if (module, name) in _ALLOWED:
            return _ALLOWED[module, name]
        if (module, name) in _SPARSE:
            import scipy.sparse

            return getattr(scipy.sparse, _SPARSE[module, name])
        raise pickle.UnpicklingError(f"global '{module}.{name}' is not allowed")


def safe_load_pickle(path: str | Path) -> object:
    """Load a FLAME-asset pickle allowing only numpy, scipy.sparse and (stubbed) chumpy classes.

    Python-2 pickles (the published FLAME files) are read with ``latin1`` encoding.
    Raises FlameFormatError naming the file for anything else (e.g. a pickle that would run code).
    """
    path = Path(path)
    data = read_bytes(path, FlameFormatError)
    try:
        return _RestrictedUnpickler(io.BytesIO(data), encoding="latin1").load()
    except pickle.UnpicklingError as e:
        raise FlameFormatError(f"{path}: refused to unpickle: {e}") from e
    except LOAD_ERRORS as e:  # truncated or corrupt data
        raise FlameFormatError(f"{path}: not a valid pickle ({type(e).__name__}: {e})") from e


def _as_array(value, path: Path, key: str, dtype) -> np.ndarray:
    """A dense numpy array from a numpy array, scipy sparse matrix or chumpy stub."""
    if isinstance(value, _ChumpyStub):
        if "x" not in value.__dict__:
            raise FlameFormatError(f"{path}: '{key}' is a chumpy expression without a value 'x'")
        value = value.__dict__["x"]
    if hasattr(value, "toarray"):
        value = value.toarray()
    arr = np.asarray(value)
    if arr.dtype == object:
        raise FlameFormatError(f"{path}: '{key}' is not a numeric array")
    return arr.astype(dtype)


# --------------------------------------------------------------------------------------------
# Assets
# --------------------------------------------------------------------------------------------
@dataclass
class FlameModel:
    """The content of ``generic_model.pkl`` (numpy)."""

    v_template: np.ndarray     # [V,3] float32, metres
    faces: np.ndarray          # [F,3] int64
    shapedirs: np.ndarray      # [V,3,400]: 300 identity + 100 expression components
    posedirs: np.ndarray       # [V,3,36]
    J_regressor: np.ndarray    # [5,V] dense
    weights: np.ndarray        # [V,5] skinning weights
    kintree_table: np.ndarray  # [2,5] int64

    @property
    def parents(self) -> np.ndarray:
        """[5] int64 parent of each joint, -1 for the root."""
        p = self.kintree_table[0].astype(np.int64).copy()
        p[0] = -1  # stored as 2**32-1 in the published file
        return p


@dataclass
class FlameTopology:
    """Everything of FLAME but the model: faces, the landmark embedding, vertex subsets."""

    faces: np.ndarray             # [F,3] int64
    static_face_idx: np.ndarray   # [51] int64
    static_bary: np.ndarray       # [51,3]
    dynamic_face_idx: np.ndarray  # [K,17] int64 (row 0: zero yaw)
    dynamic_bary: np.ndarray      # [K,17,3]
    subsets: dict                 # name -> int64 vertex ids

    @property
    def n_vertices(self) -> int:
        """V, the mesh's vertex count: the highest vertex id of a face, plus one."""
        return int(self.faces.max()) + 1

    @property
    def lmk_face_idx(self) -> np.ndarray:
        """[68] int64: 17 contour points (dynamic row 0) then the 51 static points."""
        return np.concatenate([self.dynamic_face_idx[0], self.static_face_idx]).astype(np.int64)

    @property
    def lmk_bary(self) -> np.ndarray:
        """[68,3] float32 barycentric coordinates, same order as :attr:`lmk_face_idx`."""
        return np.concatenate([self.dynamic_bary[0], self.static_bary]).astype(np.float32)


@dataclass
class FlameAssets:
    topology: FlameTopology
    model: FlameModel | None  # None for a topology-only directory
    path: Path


def _load_model(path: Path) -> FlameModel:
    raw = safe_load_pickle(path)
    if not isinstance(raw, dict):
        raise FlameFormatError(f"{path}: expected a dict, got {type(raw).__name__}")
    need = ("v_template", "f", "shapedirs", "posedirs", "J_regressor", "weights", "kintree_table")
    missing = [k for k in need if k not in raw]
    if missing:
        raise FlameFormatError(f"{path}: missing keys {missing}")
    m = FlameModel(
        v_template=_as_array(raw["v_template"], path, "v_template", np.float32),
        faces=_as_array(raw["f"], path, "f", np.int64),
        shapedirs=_as_array(raw["shapedirs"], path, "shapedirs", np.float32),
        posedirs=_as_array(raw["posedirs"], path, "posedirs", np.float32),
        J_regressor=_as_array(raw["J_regressor"], path, "J_regressor", np.float32),
        weights=_as_array(raw["weights"], path, "weights", np.float32),
        kintree_table=_as_array(raw["kintree_table"], path, "kintree_table", np.int64),
    )
    V = m.v_template.shape[0]
    expect = {"v_template": (V, 3), "shapedirs": (V, 3, N_SHAPE + N_EXPR), "posedirs": (V, 3, 36),
              "J_regressor": (5, V), "weights": (V, 5), "kintree_table": (2, 5)}
    for key, shape in expect.items():
        if getattr(m, key).shape != shape:
            raise FlameFormatError(f"{path}: '{key}' has shape {getattr(m, key).shape}, expected {shape}")
    if m.faces.ndim != 2 or m.faces.shape[1] != 3 or m.faces.max() >= V or m.faces.min() < 0:
        raise FlameFormatError(f"{path}: 'f' must be [F,3] vertex ids below {V}")
    return m


def _load_embeddings(path: Path) -> tuple[np.ndarray, ...]:
    static = safe_load_pickle(path / STATIC_FILE)
    try:
        dynamic = np.load(path / DYNAMIC_FILE, allow_pickle=False)
    except ValueError:  # the published file is a pickled dict inside .npy
        dynamic = load_npy_dict(path / DYNAMIC_FILE)
    except OSError as e:
        raise FlameFormatError(f"{path / DYNAMIC_FILE}: cannot read ({e})") from e
    out = []
    for name, d, shapes in ((STATIC_FILE, static, ((51,), (51, 3))),
                            (DYNAMIC_FILE, dynamic, ((None, 17), (None, 17, 3)))):
        if not isinstance(d, dict) or "lmk_face_idx" not in d or "lmk_b_coords" not in d:
            raise FlameFormatError(f"{path / name}: expected a dict with lmk_face_idx and lmk_b_coords")
        idx = _as_array(d["lmk_face_idx"], path / name, "lmk_face_idx", np.int64)
        bary = _as_array(d["lmk_b_coords"], path / name, "lmk_b_coords", np.float32)
        for arr, shape, key in ((idx, shapes[0], "lmk_face_idx"), (bary, shapes[1], "lmk_b_coords")):
            if arr.ndim != len(shape) or any(s is not None and s != a for s, a in zip(shape, arr.shape)):
                raise FlameFormatError(f"{path / name}: '{key}' has shape {arr.shape}, expected {shape}")
        out += [idx, bary]
    return tuple(out)


def load_npy_dict(path: Path) -> dict:
    """A dict saved with ``np.save`` (a 0-d object array, pickled inside .npy: FLAME's dynamic
    embedding, NoW's face boxes), read through :class:`_RestrictedUnpickler`; FlameFormatError
    naming the file for anything else."""
    with open(path, "rb") as f:
        try:
            major, _ = np.lib.format.read_magic(f)
            read_header = {1: np.lib.format.read_array_header_1_0, 2: np.lib.format.read_array_header_2_0}
            shape, _, dtype = read_header[major](f)
        except (ValueError, KeyError) as e:  # not the magic string, another major version, a bad header
            raise FlameFormatError(f"{path}: not a .npy file ({e})") from e
        if dtype != object or shape != ():
            raise FlameFormatError(f"{path}: expected a dict saved with np.save, got {dtype} {shape}")
        try:
            obj = _RestrictedUnpickler(f, encoding="latin1").load()
        except LOAD_ERRORS as e:
            raise FlameFormatError(f"{path}: refused to unpickle: {e}") from e
    return obj[()] if isinstance(obj, np.ndarray) else obj


def _load_faces_pt(path: Path) -> np.ndarray:
    try:
        faces = torch.load(path, map_location="cpu", weights_only=True)
    except LOAD_ERRORS as e:
        raise FlameFormatError(f"{path}: cannot load faces ({e})") from e
    return np.asarray(faces, dtype=np.int64)


def load_flame_assets(path: str | Path, require_model: bool = True) -> FlameAssets:
    """Read a FLAME-format directory (the project's synthetic head is
    ``synthetic_head.default_flame_dir()``; ``data.flame_dir`` resolves a data set's).

    The directory holds ``generic_model.pkl`` (optional when ``require_model`` is False, faces
    then come from ``flame_mesh_faces.pt``), ``flame_static_embedding.pkl``,
    ``flame_dynamic_embedding.npy`` and the subsets ``face.npy``, ``face_w_ears.npy``,
    ``head.npy``.
    """
    path = Path(path)
    if not path.is_dir():
        raise FlameFormatError(f"{path}: FLAME assets directory not found")
    model = None
    if (path / MODEL_FILE).exists():
        model = _load_model(path / MODEL_FILE)
        faces = model.faces
    elif require_model:
        raise FlameFormatError(f"{path / MODEL_FILE}: not found (the FLAME model is required here)")
    elif (path / FACES_FILE).exists():
        faces = _load_faces_pt(path / FACES_FILE)
    else:
        raise FlameFormatError(f"{path}: neither {MODEL_FILE} nor {FACES_FILE} found")
    s_idx, s_bary, d_idx, d_bary = _load_embeddings(path)
    n_faces = len(faces)
    for name, idx in ((STATIC_FILE, s_idx), (DYNAMIC_FILE, d_idx)):
        if idx.max() >= n_faces or idx.min() < 0:
            raise FlameFormatError(f"{path / name}: face ids out of range 0..{n_faces - 1}")
    topo = FlameTopology(faces, s_idx, s_bary, d_idx, d_bary, subsets={})
    n_vert = topo.n_vertices
    for name in SUBSETS:
        f = path / f"{name}.npy"
        try:
            ids = np.load(f, allow_pickle=False).astype(np.int64)
        except (OSError, ValueError) as e:
            raise FlameFormatError(f"{f}: cannot read vertex subset ({e})") from e
        if ids.ndim != 1 or len(ids) == 0 or ids.min() < 0 or ids.max() >= n_vert:
            raise FlameFormatError(f"{f}: expected a 1-D array of vertex ids below {n_vert}")
        topo.subsets[name] = ids
    return FlameAssets(topology=topo, model=model, path=path)


def save_flame_assets(model: FlameModel, topology: FlameTopology, out_dir: str | Path) -> Path:
    """Write FLAME's file formats (plain numpy pickles, J_regressor as scipy CSC like FLAME's)."""
    import scipy.sparse

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    def npy_bytes(arr, allow_pickle=False) -> bytes:
        buf = io.BytesIO()
        np.save(buf, arr, allow_pickle=allow_pickle)
        return buf.getvalue()

    for name in SUBSETS:
        atomic_write(out / f"{name}.npy", npy_bytes(np.asarray(topology.subsets[name], np.int64)))
    static = {"lmk_face_idx": topology.static_face_idx.astype(np.uint32),
              "lmk_b_coords": topology.static_bary.astype(np.float64)}
    dynamic = {"lmk_face_idx": topology.dynamic_face_idx.astype(np.uint32),
               "lmk_b_coords": topology.dynamic_bary.astype(np.float64)}
    atomic_write(out / STATIC_FILE, pickle.dumps(static, protocol=2))
    atomic_write(out / DYNAMIC_FILE, npy_bytes(np.array(dynamic, dtype=object), allow_pickle=True))
    kintree = model.kintree_table.astype(np.int64).copy()
    kintree[0, 0] = 2**32 - 1  # as in the published file
    generic = {  # float32 blendshapes: half the size of FLAME's float64, the layer's precision anyway
        "v_template": model.v_template.astype(np.float64),
        "f": model.faces.astype(np.uint32),
        "shapedirs": model.shapedirs.astype(np.float32),
        "posedirs": model.posedirs.astype(np.float32),
        "J_regressor": scipy.sparse.csc_matrix(model.J_regressor.astype(np.float64)),
        "weights": model.weights.astype(np.float64),
        "kintree_table": kintree,
    }
    # The model file last: its presence marks a complete directory (see synthetic_head.default_flame_dir).
    atomic_write(out / MODEL_FILE, pickle.dumps(generic, protocol=2))
    return out


class TopologyTensors:
    """The topology the metrics read, as tensors on one device: ``faces`` [F,3], ``lmk_face_idx``
    [68] and ``lmk_bary`` [68,3] (the 68 landmarks, dynamic contour row 0), the ``z_n``
    (:data:`Z_N_SUBSET`) and ``face`` (:data:`FACE_SUBSET`) vertex ids [n], ``n_vertices``.
    Evaluation and the benchmark scorer share it."""

    def __init__(self, topology: FlameTopology, device: str | torch.device = "cpu"):
        as_long = lambda a: torch.as_tensor(np.asarray(a), dtype=torch.long, device=device)  # noqa: E731
        self.faces = as_long(topology.faces)
        self.lmk_face_idx = as_long(topology.lmk_face_idx)
        self.lmk_bary = torch.as_tensor(topology.lmk_bary, device=device)
        self.z_n = as_long(topology.subsets[Z_N_SUBSET])
        self.face = as_long(topology.subsets[FACE_SUBSET])
        self.n_vertices = topology.n_vertices

    def landmarks68(self, vertices: Tensor) -> Tensor:
        """[B,V,3] -> [B,68,3]"""
        return landmarks_from_vertices(vertices, self.faces, self.lmk_face_idx, self.lmk_bary)


# --------------------------------------------------------------------------------------------
# Pure functions: landmarks, rotations, the 3DMM vector
# --------------------------------------------------------------------------------------------
def landmarks_image(vertices, mv, p, height, topology: FlameTopology | TopologyTensors):
    """The 68 landmarks of meshes in image pixels: the embedding on model space, then MV and P
    (:func:`dad3dlib.geometry.project`), e.g. the ground truth of annotations. vertices [...,V,3],
    mv, p [...,4,4], height scalar or [...] -> [...,68,2]: numpy with a :class:`FlameTopology`,
    torch with :class:`TopologyTensors` (on the vertices' device)."""
    lmk = landmarks_from_vertices(vertices, topology.faces, topology.lmk_face_idx, topology.lmk_bary)  # [...,68,3]
    return project(lmk, mv, p, height)


def rot6d_to_matrix(x: Tensor) -> Tensor:
    """6D rotation (a, b) -> matrix with columns (b1, b2, b3) (Zhou et al., CVPR 2019).

    b1 = normalize(a); b3 = normalize(b1 × b); b2 = −(b1 × b3).  x [...,6] -> [...,3,3]
    """
    a, b = x[..., :3], x[..., 3:]
    b1 = nn.functional.normalize(a, dim=-1)
    b3 = nn.functional.normalize(torch.cross(b1, b, dim=-1), dim=-1)
    b2 = -torch.cross(b1, b3, dim=-1)
    return torch.stack([b1, b2, b3], dim=-1)


def matrix_to_rot6d(R: Tensor) -> Tensor:
    """[...,3,3] -> [...,6]: the first two columns, inverse of :func:`rot6d_to_matrix`."""
    return torch.cat([R[..., :, 0], R[..., :, 1]], dim=-1)


def split_3dmm(vec: Tensor) -> dict[str, Tensor]:
    """[B,413] -> shape [B,300], expression [B,100], jaw [B,3], rot6d [B,6], translation [B,3],
    scale [B,1] (stored as s - 1). The pieces are views of ``vec``."""
    if vec.shape[-1] != N_3DMM:
        raise ValueError(f"3DMM vector must have {N_3DMM} numbers, got {vec.shape[-1]}")
    return dict(zip([n for n, _ in LAYOUT_3DMM], torch.split(vec, [s for _, s in LAYOUT_3DMM], dim=-1)))


def pack_3dmm(shape: Tensor, expression: Tensor, jaw: Tensor, rot6d: Tensor, translation: Tensor,
              scale: Tensor) -> Tensor:
    """Inverse of :func:`split_3dmm`: the pieces [B,k] -> [B,413]."""
    return torch.cat([shape, expression, jaw, rot6d, translation, scale], dim=-1)


def weak_perspective(vertices: Tensor, R: Tensor, translation: Tensor, scale: Tensor,
                     crop_size: float) -> Tensor:
    """Rotate, scale, shift and map to crop pixels (x right, y down): DAD-3DNet's weak perspective.

    vertices [B,V,3], R [B,3,3], translation [B,3] (z ignored), scale [B,1] (s - 1) -> [B,V,3]
    (computed coordinate-major, ``R @ v`` on [B,3,V], which CPUs run ~10x faster than
    ``v @ R^T`` on [B,V,3]; the result is a [B,V,3] view of a [B,3,V] tensor)
    """
    s = torch.clamp(scale + 1.0, min=1e-8)[:, :, None]  # [B,1,1]
    t = torch.cat([translation[:, :2], torch.zeros_like(translation[:, 2:])], dim=-1)[:, :, None]  # [B,3,1]
    v = R @ vertices.transpose(1, 2) * s + t
    return ((v + 1.0) * (crop_size / 2.0)).transpose(1, 2)


def fit_weak_perspective(vertices_model: Tensor, rotation: Tensor, vertices_crop: Tensor,
                         crop_size: float) -> tuple[Tensor, Tensor]:
    """Least-squares scale s and translation (tx, ty) with (s·R·(v + z-offset))_xy + t = crop coords
    in [-1,1], the model's weak perspective (flame.weak_perspective) applied to GT.

    vertices_model [B,V,3], rotation [B,3,3], vertices_crop [B,V,2] px -> s [B], t [B,2]
    """
    src = ((vertices_model + vertices_model.new_tensor([0, 0, CANONICAL_Z_OFFSET])) @ rotation.transpose(1, 2))[..., :2]
    dst = vertices_crop / crop_size * 2 - 1
    src_c, dst_c = src - src.mean(1, keepdim=True), dst - dst.mean(1, keepdim=True)
    s = (src_c * dst_c).sum((1, 2)) / (src_c ** 2).sum((1, 2))
    return s, dst.mean(1) - s[:, None] * src.mean(1)


def jaw_lbs(betas: Tensor, jaw: Tensor, v_template: Tensor, shapedirs: Tensor, posedirs_jaw: Tensor,
            joint_template: Tensor, joint_dirs: Tensor, weights_jaw: Tensor, weights_sum: Tensor) -> Tensor:
    """FLAME's linear blend skinning when only the jaw rotates (global pose, neck and eyes zero),
    as smplx's ``lbs`` computes it, without its per-vertex 4x4 transforms.

    With every other joint at the identity and the jaw a child of that identity chain, the jaw's
    transform relative to the rest pose is ``[R | J - R·J]`` (J the jaw joint) and every other
    joint's is ``[I | 0]``, so each vertex is
    ``v = (Σ_k w_k)·v_posed + w_jaw·(R - I)·(v_posed - J)``; the pose blend shapes of the other
    joints are zero. J is linear in the coefficients (the regressor's row applied to the shaped
    template), so it comes from ``joint_template`` and ``joint_dirs`` and any subset of the
    vertices can be skinned alone. ``tests/test_flame.py`` checks it against smplx's ``lbs``.

    Coordinate-major (the x of every vertex, then every y, then every z): the rotation is then one
    small matrix times a [3,n] block, which CPUs run ~10x faster than [n,3] times a 3x3.
    betas [B,L] shape and expression coefficients, jaw [B,3] axis-angle; for the n vertices skinned:
    v_template [3,n], shapedirs [L,3*n], posedirs_jaw [9,3*n] (the jaw's rows of the pose blend
    shapes), weights_jaw [n] (the jaw's skinning weights), weights_sum [n] (each vertex's weights
    summed); joint_template [3] and joint_dirs [L,3], the jaw joint of the template and its change
    per coefficient -> [B,3,n]
    """
    from smplx.lbs import batch_rodrigues

    B = betas.shape[0]
    v_shaped = v_template + (betas @ shapedirs).view(B, 3, -1)              # [B,3,n]
    joint = (joint_template + betas @ joint_dirs)[:, :, None]               # [B,3,1]
    rot = batch_rodrigues(jaw)                                              # [B,3,3]
    turn = rot - torch.eye(3, dtype=rot.dtype, device=rot.device)           # R - I
    v_posed = v_shaped + (turn.reshape(B, 9) @ posedirs_jaw).view(B, 3, -1)
    return weights_sum * v_posed + weights_jaw * (turn @ (v_posed - joint))


# --------------------------------------------------------------------------------------------
# The layer
# --------------------------------------------------------------------------------------------
class FlameLayer(nn.Module):
    """Batched, differentiable FLAME (LBS from smplx) and the DAD-3DNet 3DMM-vector views."""

    def __init__(self, assets: FlameAssets):
        super().__init__()
        if assets.model is None:
            raise FlameFormatError(f"{assets.path}: {MODEL_FILE} is needed for the FLAME layer")
        m, t = assets.model, assets.topology
        self.topology = t
        f32 = lambda a: torch.as_tensor(np.ascontiguousarray(a), dtype=torch.float32)  # noqa: E731
        self.register_buffer("v_template", f32(m.v_template))
        self.register_buffer("posedirs", f32(m.posedirs.reshape(-1, m.posedirs.shape[-1]).T))  # [36,V*3]
        self.register_buffer("J_regressor", f32(m.J_regressor))
        self.register_buffer("lbs_weights", f32(m.weights))
        # jaw_lbs's per-vertex arrays, coordinate-major (the x of every vertex, then y, then z)
        jaw_rows = m.posedirs[..., 9 * (JAW_JOINT - 1): 9 * JAW_JOINT]  # [V,3,9]: the jaw's pose features
        cm = {"v_template": m.v_template.T,                                              # [3,V]
              "shapedirs": m.shapedirs.transpose(2, 1, 0).reshape(m.shapedirs.shape[-1], -1),  # [L,3V]
              "posedirs_jaw": jaw_rows.transpose(2, 1, 0).reshape(9, -1),                 # [9,3V]
              "weights_jaw": m.weights[:, JAW_JOINT], "weights_sum": m.weights.sum(1)}    # [V]
        for k, v in cm.items():
            self.register_buffer(f"cm_{k}", f32(v))
        regressor = m.J_regressor[JAW_JOINT].astype(np.float64)
        self.register_buffer("joint_template", f32(regressor @ m.v_template))                       # [3]
        self.register_buffer("joint_dirs", f32(np.einsum("v,vcl->lc", regressor, m.shapedirs)))     # [L,3]
        self.selected = None
        self.register_buffer("parents", torch.as_tensor(m.parents))
        # jaw_lbs holds when no joint hangs below the jaw (FLAME: the eyes hang below the neck)
        self.jaw_only = JAW_JOINT not in m.parents
        self.register_buffer("faces", torch.as_tensor(m.faces, dtype=torch.long))
        self.register_buffer("lmk_face_idx", torch.as_tensor(t.lmk_face_idx))
        self.register_buffer("lmk_bary", torch.as_tensor(t.lmk_bary))
        for name in SUBSETS:
            self.register_buffer(f"subset_{name}", torch.as_tensor(t.subsets[name]))

    @property
    def n_vertices(self) -> int:
        """V, the template's vertex count (that of its topology, :attr:`FlameTopology.n_vertices`, for
        assets whose faces use every vertex)."""
        return self.v_template.shape[0]

    JAW_ARRAYS = ("v_template", "shapedirs", "posedirs_jaw", "weights_jaw", "weights_sum")  # jaw_lbs's, in order

    def _jaw_arrays(self, ids: Tensor | None) -> list[Tensor]:
        """:func:`jaw_lbs`'s per-vertex arrays (:data:`JAW_ARRAYS`) for the vertices ``ids`` [n]
        (None: all), coordinate-major."""
        arrays = [getattr(self, f"cm_{k}") for k in self.JAW_ARRAYS]
        if ids is None:
            return arrays
        return [a[..., ids] if a.shape[-1] == len(self.v_template) else a.view(len(a), 3, -1)[..., ids].reshape(len(a), -1)
                for a in arrays]

    def select_vertices(self, ids: Tensor | None) -> None:
        """Let :meth:`canonical` compute only the vertices ``ids`` [n] (in that order) when asked
        for the selection: training computes just the vertices its losses read. None: all.
        The selection's arrays are buffers (``sel_*``, on the layer's device, not in state dicts)."""
        self.selected = None if ids is None else torch.as_tensor(ids, dtype=torch.long, device=self.cm_shapedirs.device)
        for k, a in zip(self.JAW_ARRAYS, self._jaw_arrays(self.selected)):
            self.register_buffer(f"sel_{k}", None if ids is None else a.contiguous(), persistent=False)

    def _jaw_lbs(self, betas: Tensor, jaw: Tensor, selected: bool) -> Tensor:
        """:func:`jaw_lbs` on every vertex, or on the selection -> [B,3,n]."""
        prefix = "sel" if selected and self.selected is not None else "cm"
        v_template, shapedirs, posedirs_jaw, weights_jaw, weights_sum = (getattr(self, f"{prefix}_{k}")
                                                                        for k in self.JAW_ARRAYS)
        return jaw_lbs(betas, jaw, v_template, shapedirs, posedirs_jaw, self.joint_template, self.joint_dirs,
                       weights_jaw, weights_sum)

    @property
    def shapedirs(self) -> Tensor:
        """[V,3,L] (smplx's layout; a view of ``cm_shapedirs``)."""
        return self.cm_shapedirs.view(-1, 3, self.n_vertices).permute(2, 1, 0)

    def subset(self, name: str) -> Tensor:
        """Vertex ids [n] of "face", "face_w_ears" or "head"."""
        return getattr(self, f"subset_{name}")

    def vertices(self, shape: Tensor, expression: Tensor, jaw: Tensor, neck: Tensor | None = None,
                 global_pose: Tensor | None = None) -> Tensor:
        """Model-space vertices by LBS; eyes are zero. Only the jaw rotating (neck and global_pose
        None), :func:`jaw_lbs`; else smplx's ``lbs``.

        shape [B,300], expression [B,100], jaw/neck/global_pose [B,3] axis-angle -> [B,V,3]
        """
        from smplx.lbs import lbs

        betas = torch.cat([shape, expression], dim=-1)
        if neck is None and global_pose is None and self.jaw_only:
            return self._jaw_lbs(betas, jaw, selected=False).transpose(1, 2).contiguous()
        zeros = torch.zeros_like(jaw)
        pose = torch.cat([zeros if global_pose is None else global_pose,
                          zeros if neck is None else neck, jaw, zeros, zeros], dim=-1)
        verts, _ = lbs(betas, pose, self.v_template[None].expand(len(betas), -1, -1), self.shapedirs,
                       self.posedirs, self.J_regressor, self.parents, self.lbs_weights)
        return verts

    def canonical(self, params: Tensor, selected: bool = False) -> Tensor:
        """[B,413] -> [B,V,3]: global rotation, neck and eyes zero, jaw from the vector, z += 0.05.
        ``selected``: only the vertices of :meth:`select_vertices`, [B,n,3] (all when none are)."""
        p = split_3dmm(params)
        if self.jaw_only:  # coordinate-major throughout: the result is a [B,V,3] view of [B,3,V]
            v = self._jaw_lbs(torch.cat([p["shape"], p["expression"]], dim=-1), p["jaw"], selected)
        else:
            v = self.vertices(p["shape"], p["expression"], p["jaw"]).transpose(1, 2)  # [B,3,V]
        return (v + v.new_tensor([0.0, 0.0, CANONICAL_Z_OFFSET])[:, None]).transpose(1, 2)

    def posed(self, params: Tensor) -> Tensor:
        """[B,413] -> [B,V,3]: R·canonical."""
        R = rot6d_to_matrix(split_3dmm(params)["rot6d"])
        return (R @ self.canonical(params).transpose(1, 2)).transpose(1, 2)

    def reproject(self, params: Tensor, crop_size: float, canonical: Tensor | None = None) -> Tensor:
        """[B,413] -> [B,V,3] crop pixels (x right, y down) and scaled depth.

        Pass ``canonical`` when it was already computed, to skip a second LBS.
        """
        p = split_3dmm(params)
        v = self.canonical(params) if canonical is None else canonical
        return weak_perspective(v, rot6d_to_matrix(p["rot6d"]), p["translation"], p["scale"], crop_size)

    def landmarks68(self, vertices: Tensor) -> Tensor:
        """[B,V,3] -> [B,68,3]."""
        return landmarks_from_vertices(vertices, self.faces, self.lmk_face_idx, self.lmk_bary)

    def landmarks7(self, vertices: Tensor) -> Tensor:
        """[B,V,3] -> [B,7,3], the alignment landmarks ALIGN7."""
        return self.landmarks68(vertices)[:, list(ALIGN7)]
