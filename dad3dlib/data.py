"""DAD-3DHeads-format data set (the real one or the synthetic one; one code path).

Layout (docs/ARCHITECTURE.md): ``<root>/DAD-3DHeadsDataset/<split>/<split>.json`` lists ``{item_id, img_path,
annotation_path, bbox [x,y,w,h], attributes}``; ``annotations/<id>.json`` holds ``vertices``
[V,3], ``model_view_matrix`` and ``projection_matrix``. Parsing thousands of 5k-vertex JSON files
per epoch is slow, so the first use of a split validates every item and writes a compact cache
(``.npy`` arrays, memory-mapped) under ``outputs/data_cache/``; the cache is keyed on the sizes
and modification times of all source files and rebuilt when any of them changes.

A sample is a dict of tensors with the batch keys of docs/ARCHITECTURE.md. Shapes: V vertices,
S crop side, L = 68 landmarks.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import warnings
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import cv2
import numpy as np
import orjson
import torch
from torch.utils.data import Dataset

from .config import data_root
from .errors import InputError, InputFileNotFound, InputValueError
from .files import exclusive_lock
from .flame import MODEL_FILE, FlameAssets, FlameTopology, landmarks_image
from .geometry import apply_affine, flip_yz, project, viewing_ray
from .settings import DataSettings

log = logging.getLogger(__name__)

DATASET_DIR = "DAD-3DHeadsDataset"
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)
HEATMAP = {"stride": 4, "radius": 5}  # cells of the heatmap (S/4 x S/4)
MARGIN_TRAIN = (0.05, 0.15)   # random bbox growth per side, fraction of the bbox side
MARGIN_EVAL = 0.10            # fixed growth per side in evaluation
_SCALE = (1.0 / (255.0 * IMAGENET_STD))[:, None, None]
_SHIFT = (IMAGENET_MEAN / IMAGENET_STD)[:, None, None]
CACHE_VERSION = 1


# --------------------------------------------------------------------------------------------
# Pure functions: crop geometry and targets
# --------------------------------------------------------------------------------------------
def crop_affine(bbox, margins, size: int, clip_to: tuple[int, int] | None = None) -> np.ndarray:
    """A [2,3] mapping image pixels to crop pixels (continuous coordinates, pixel i covers [i, i+1)).

    bbox (x, y, w, h); margins (left, right, top, bottom) as fractions of w / h; ``clip_to``
    (width, height): the grown box is cut to the image first (the reference's crop); the box's
    longest side becomes ``size`` and the other is centred (padding on both sides).
    """
    x, y, w, h = (float(v) for v in bbox)
    left, right, top, bottom = margins
    x0, x1, y0, y1 = x - left * w, x + w + right * w, y - top * h, y + h + bottom * h
    if clip_to is not None:
        x0, x1, y0, y1 = max(x0, 0.0), min(x1, clip_to[0]), max(y0, 0.0), min(y1, clip_to[1])
        if x1 <= x0 or y1 <= y0:
            raise InputValueError(f"bbox [{x:g}, {y:g}, {w:g}, {h:g}] lies outside the "
                                  f"{clip_to[0]}x{clip_to[1]} image")
    s = size / max(x1 - x0, y1 - y0)
    return np.array([[s, 0.0, (size - s * (x1 - x0)) / 2.0 - s * x0],
                     [0.0, s, (size - s * (y1 - y0)) / 2.0 - s * y0]])


def sample_affine(bbox, image_size: tuple[int, int], size: int, clip_bbox: bool,
                  rng: np.random.Generator | None = None) -> np.ndarray:
    """The crop map of one image, for every reader that crops a face box (the data set, the NoW
    export): the box grown per side by random margins in :data:`MARGIN_TRAIN` when ``rng`` is given
    (training), else by :data:`MARGIN_EVAL`; cut to the image (``image_size`` (width, height)) when
    ``clip_bbox`` (the data section's ``clip_bbox``); :func:`crop_affine`. bbox (x, y, w, h) -> [2,3]"""
    margins = rng.uniform(*MARGIN_TRAIN, 4) if rng is not None else (MARGIN_EVAL,) * 4
    return crop_affine(bbox, margins, size, tuple(image_size) if clip_bbox else None)


def warp_crop(image: np.ndarray, A: np.ndarray, size: int) -> np.ndarray:
    """The S x S crop of an image [H,W,3] uint8 under A (zero padding outside the image).

    Large down-scalings first shrink the image by an integer factor with area averaging.
    """
    A = np.asarray(A, np.float64).copy()
    k = int(1.0 / A[0, 0]) if A[0, 0] < 0.5 else 1
    if k > 1:
        h, w = image.shape[:2]
        image = cv2.resize(image[: h - h % k, : w - w % k], (w // k, h // k), interpolation=cv2.INTER_AREA)
        A[:, :2] *= k
    # OpenCV indexes pixel centres: idx_out + 0.5 = s·(idx_in + 0.5) + t
    M = A.copy()
    M[:, 2] += 0.5 * A[:, :2].sum(1) - 0.5
    return cv2.warpAffine(image, M, (size, size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT)


def gaussian_heatmaps(points, visibility, size: int, stride: int = 4, radius: int = 5):
    """68 target heatmaps: a Gaussian of sigma (2r+1)/6 cells in a (2r+1)^2 window around the cell
    ``floor(point / stride)``, zero for invisible points (the reference coder's convention).

    The geometry is in heatmap cells at every crop size. (Scaled to the reference's 256-px crop, a
    64-px crop's 16x16 map would get sigma = 0.46 cells: targets the stride-4 map cannot resolve;
    tried, it slowed learning of pose and shape. So only L_proj is in reference units, see losses.py.)

    points [...,L,2] crop pixels, visibility [...,L] -> [...,L,size/stride,size/stride] float32;
    numpy arrays or torch tensors (separable: two 1-D Gaussians per point, one outer product).
    """
    xp = torch if isinstance(points, torch.Tensor) else np
    n = size // stride
    sigma = (2 * radius + 1) / 6.0
    cells = xp.floor(points / stride)[..., None]                      # [...,L,2,1]
    if xp is np:
        cells, visibility = cells.astype(np.float32), np.asarray(visibility, np.float32)
    grid = xp.arange(n, dtype=cells.dtype)
    if xp is torch:
        grid = grid.to(cells.device)
    d = grid - cells                                                  # [...,L,2,n]
    g = xp.exp(-d ** 2 / (2 * sigma ** 2)) * (abs(d) <= radius)
    hm = g[..., 1, :, None] * g[..., 0, None, :] * visibility[..., None, None]  # [...,L,n,n] rows y
    return hm.float() if xp is torch else hm.astype(np.float32)


def normalize_image(crop: np.ndarray) -> torch.Tensor:
    """[...,S,S,3] uint8 RGB -> [...,3,S,S] float32, ImageNet mean/std."""
    x = np.moveaxis(crop, -1, -3).astype(np.float32, order="C")
    x *= _SCALE
    x -= _SHIFT
    return torch.from_numpy(x)


def denormalize_image(x: torch.Tensor) -> np.ndarray:
    """Inverse of :func:`normalize_image`: [3,S,S] -> [S,S,3] uint8."""
    img = x.detach().cpu().numpy().transpose(1, 2, 0) * IMAGENET_STD + IMAGENET_MEAN
    return np.clip(img * 255.0 + 0.5, 0, 255).astype(np.uint8)


# Photometric augmentation: name -> (probability, function(rng, uint8 RGB crop) -> uint8 crop).
def _jitter(rng, img):
    """Saturation, contrast, brightness and a colour cast as one affine colour map."""
    s, c, b = rng.uniform(0.6, 1.4), rng.uniform(0.7, 1.3), rng.uniform(0.7, 1.3)
    M = b * c * (s * np.eye(3) + (1.0 - s) / 3.0)
    mean = float(np.mean(cv2.mean(img)[:3]))
    offset = b * mean * (1.0 - c) + rng.uniform(-20, 20, 3)
    return cv2.transform(img, np.concatenate([M, offset[:, None]], 1))


def _gamma(rng, img):
    lut = np.clip(255.0 * (np.arange(256) / 255.0) ** rng.uniform(0.7, 1.5) + 0.5, 0, 255).astype(np.uint8)
    return cv2.LUT(img, lut)


def gaussian_blur(rng: np.random.Generator, img: np.ndarray, sigma: tuple[float, float]) -> np.ndarray:
    """[H,W,3] uint8 -> [H,W,3] uint8 blurred by a Gaussian of σ ~ U(sigma) pixels. The training
    augmentation's and the synthetic data's (its "lq" images) one blur."""
    return cv2.GaussianBlur(img, (0, 0), rng.uniform(*sigma))


def gaussian_noise(rng: np.random.Generator, img: np.ndarray, sd: tuple[float, float],
                   dtype: type = np.float64) -> np.ndarray:
    """[H,W,3] uint8 -> [H,W,3] uint8 plus Gaussian noise of σ ~ U(sd) grey levels (added in
    ``dtype``), clipped. The training augmentation's and the synthetic data's one noise."""
    noise = rng.normal(0, rng.uniform(*sd), img.shape).astype(dtype, copy=False)
    return np.clip(img + noise, 0, 255).astype(np.uint8)


def _grayscale(rng, img):
    return cv2.cvtColor(cv2.cvtColor(img, cv2.COLOR_RGB2GRAY), cv2.COLOR_GRAY2RGB)


PHOTOMETRIC = {"jitter": (0.8, _jitter), "gamma": (0.3, _gamma),
               "blur": (0.1, partial(gaussian_blur, sigma=(0.5, 1.5))),
               "noise": (0.2, partial(gaussian_noise, sd=(2, 10), dtype=np.float32)),
               "grayscale": (0.05, _grayscale)}


def photometric(rng: np.random.Generator, crop: np.ndarray) -> np.ndarray:
    """[S,S,3] uint8 -> [S,S,3] uint8, each op of PHOTOMETRIC applied with its probability."""
    for prob, fn in PHOTOMETRIC.values():
        if rng.random() < prob:
            crop = fn(rng, crop)
    return crop


# --------------------------------------------------------------------------------------------
# Reading and validating the layout
# --------------------------------------------------------------------------------------------
def dataset_dir(root: str | Path) -> Path:
    """``root`` itself or ``root/DAD-3DHeadsDataset``."""
    root = Path(root)
    if not root.is_dir():
        raise InputFileNotFound(f"{root}: data directory not found (expected one holding {DATASET_DIR}/)")
    return root / DATASET_DIR if (root / DATASET_DIR).is_dir() else root


def flame_dir(data: DataSettings) -> Path:
    """The FLAME directory of a data section (its root and flame_path): ``flame_path``, else the one
    recorded in the data set's ``make_data.json`` (data made by ``make-data``), else the
    project's synthetic head (``synthetic_head.default_flame_dir``, written if missing). Every
    reader of a data set takes its FLAME directory from here."""
    from .synthetic_head import default_flame_dir

    if data.flame_path:
        return Path(data.flame_path)
    if not data.root:
        return default_flame_dir()
    record = dataset_dir(data_root(data.root)).parent / "make_data.json"
    if not record.is_file():
        return default_flame_dir()
    try:
        path = Path(json.loads(record.read_text())["flame_assets"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise InputValueError(f"{record}: no readable FLAME directory in it ({type(e).__name__}: {e})") from e
    model = path / MODEL_FILE
    if model.is_file() and model.stat().st_mtime > record.stat().st_mtime:
        warnings.warn(f"{model} is newer than the data set made with it ({record}): if the model changed, "
                      "its annotations no longer match; regenerate the data")
    return path


def read_split(path: Path) -> list[dict]:
    """The split file: a JSON list of objects with at least ``item_id`` and ``bbox``."""
    if not path.is_file():
        raise InputFileNotFound(f"{path}: split file not found")
    try:
        entries = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputValueError(f"{path}: malformed split file ({e})") from e
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise InputValueError(f"{path}: malformed split file (expected a JSON list of objects)")
    counts = Counter(str(e["item_id"]) for e in entries if "item_id" in e)
    duplicates = [item for item, n in counts.items() if n > 1]
    if duplicates:
        raise InputValueError(f"{path}: duplicate item_id(s) {duplicates} (each item may appear once)")
    return entries


def attribute_key(value) -> str:
    """An entry's attribute value as a group's name (the evaluation's columns, the benchmark's groups):
    a string as it is, any other value as its JSON."""
    return value if isinstance(value, str) else json.dumps(value)


def _check_entry(entry: dict, annotations: bool) -> None:
    keys = ("item_id", "bbox") + (("annotation_path",) if annotations else ())
    missing = [k for k in keys if k not in entry]
    if missing:
        raise InputValueError(f"missing {missing}")
    bbox = entry["bbox"]
    ok = isinstance(bbox, list) and len(bbox) == 4 and all(isinstance(v, (int, float)) for v in bbox)
    if not ok or not all(map(math.isfinite, bbox)) or bbox[2] <= 0 or bbox[3] <= 0:
        raise InputValueError(f"bad bbox {bbox!r} (expected [x, y, w, h] with w, h > 0)")


def _resolve(ds: Path, split: str, rel: str | None, default: str) -> Path:
    """A path from the split file: relative to the data set's parent (the reference's
    convention), the data set or the split folder; else the layout's default location."""
    if rel:
        for base in (ds.parent, ds, ds / split):
            if (base / rel).exists():
                return base / rel
    return ds / split / default


def read_annotation(path: Path, n_vertices: int | None) -> dict[str, np.ndarray]:
    """vertices [V,3] float32, model_view_matrix / projection_matrix [4,4] float64, validated
    (n_vertices None: any V)."""
    if not path.is_file():
        raise InputFileNotFound(f"{path}: annotation not found")
    try:
        text = path.read_bytes()
        try:
            raw = orjson.loads(text)
        except orjson.JSONDecodeError:  # Python's json also accepts NaN / Infinity literals
            raw = json.loads(text)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputValueError(f"{path}: malformed annotation ({e})") from e
    if not isinstance(raw, dict):
        raise InputValueError(f"{path}: malformed annotation (expected a JSON object)")
    out = {}
    for key, shape, dtype in (("vertices", (n_vertices, 3), np.float32), ("model_view_matrix", (4, 4), np.float64),
                              ("projection_matrix", (4, 4), np.float64)):
        if key not in raw:
            raise InputValueError(f"{path}: annotation lacks '{key}'")
        try:
            arr = np.asarray(raw[key], dtype=np.float64)
        except (TypeError, ValueError) as e:
            raise InputValueError(f"{path}: '{key}' is not a numeric array ({e})") from e
        if n_vertices is None and key == "vertices" and arr.ndim == 2:
            shape = (len(arr), 3)
        if arr.shape != shape:
            what = "vertex count" if key == "vertices" and arr.ndim == 2 and arr.shape[1] == 3 else "shape"
            raise InputValueError(f"{path}: '{key}' has {what} {arr.shape}, expected {shape}")
        if not np.isfinite(arr).all():
            raise InputValueError(f"{path}: '{key}' contains NaN or inf")
        out[key] = arr.astype(dtype)
    return out


def image_size(path: Path) -> tuple[int, int]:
    """(width, height) of an image file, checking that the file is intact."""
    from PIL import Image, UnidentifiedImageError

    if not path.is_file():
        raise InputFileNotFound(f"{path}: image not found")
    try:
        with Image.open(path) as im:
            size = im.size
            im.verify()
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as e:  # what PIL raises for a damaged file
        raise InputValueError(f"{path}: unreadable image ({e})") from e
    return size


def read_image(path: Path) -> np.ndarray:
    """[H,W,3] uint8 RGB."""
    img = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if img is None:
        raise (InputValueError(f"{path}: unreadable image") if path.exists()
               else InputFileNotFound(f"{path}: image not found"))
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


# --------------------------------------------------------------------------------------------
# The per-split cache
# --------------------------------------------------------------------------------------------
@dataclass
class SplitIndex:
    """Validated items of one split and their arrays (memory-mapped when cached)."""

    entries: list            # kept split entries
    images: list             # Path per kept item
    sizes: np.ndarray        # [N,2] image width, height
    vertices: np.ndarray | None     # [N,V,3] float32 model space
    model_view: np.ndarray | None   # [N,4,4] float64
    projection: np.ndarray | None   # [N,4,4] float64
    landmarks: np.ndarray | None    # [N,68,2] float64 image pixels
    skipped: list            # [(position in the split file, "FileNotFoundError" or "ValueError", reason)]
    path: Path | None = None  # the cache's folder (None: not cached)


def _files(ds: Path, split: str, entries: list[dict], annotations: bool) -> list[tuple[Path, Path | None]]:
    out = []
    for e in entries:
        item = str(e.get("item_id", ""))
        img = _resolve(ds, split, e.get("img_path"), f"images/{item}.png")
        ann = _resolve(ds, split, e.get("annotation_path"), f"annotations/{item}.json") if annotations else None
        out.append((img, ann))
    return out


def _cache_key(split_file: Path, files, topology: FlameTopology, annotations: bool) -> str:
    """The cache of a split's files: the split file's resolved path; each file's path within the
    data set, size and modification time; the topology. Two spellings of one data set (through a
    symbolic link) share a cache instead of replacing each other's."""
    ds = split_file.parent.parent
    h = hashlib.sha1(f"v{CACHE_VERSION} {annotations} {split_file.resolve()}".encode())
    for p in [split_file] + [p for pair in files for p in pair if p is not None]:
        name = p.relative_to(ds) if p.is_relative_to(ds) else p
        try:
            st = p.stat()
            h.update(f"{name}:{st.st_size}:{st.st_mtime_ns};".encode())
        except OSError:
            h.update(f"{name}:missing;".encode())
    for arr in (topology.faces, topology.lmk_face_idx, topology.lmk_bary):
        h.update(np.ascontiguousarray(arr).tobytes())
    return h.hexdigest()


def _check_vertex_count(ds: Path, annotation: Path, n_vertices: int, flame: Path | None) -> None:
    """One line naming the data and the FLAME directory (``flame``; None: a topology given directly)
    when the data's meshes (read from one annotation) have another vertex count than the FLAME model,
    i.e. the data were made with another FLAME model. A broken annotation is left to the item checks."""
    try:
        n = len(read_annotation(annotation, None)["vertices"])
    except InputError:
        return
    if n != n_vertices:
        raise InputValueError(f"{ds}: the data's meshes have {n} vertices but the FLAME model "
                         f"{f'in {flame}' if flame else 'given'} has {n_vertices}: use the FLAME directory the "
                         "data were made with (--flame-assets, data.flame_path)")


def build_index(ds: Path, split: str, topology: FlameTopology, annotations: bool, skip_bad: bool,
                cache_dir: Path | None, flame_dir: Path | None = None) -> SplitIndex:
    """Validate a split and load (or build) its cache. cache_dir None: no cache, arrays in memory.
    flame_dir: where ``topology`` comes from, for the messages. One process at a time builds or
    reads a cache (``cache_dir/.lock``): others, such as the processes of a multi-process training
    run, wait for the first builder and then read its cache."""
    if cache_dir is None:
        return _build_index(ds, split, topology, annotations, skip_bad, None, flame_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    with exclusive_lock(cache_dir / ".lock"):
        return _build_index(ds, split, topology, annotations, skip_bad, cache_dir, flame_dir)


def _build_index(ds: Path, split: str, topology: FlameTopology, annotations: bool, skip_bad: bool,
                 cache_dir: Path | None, flame_dir: Path | None) -> SplitIndex:
    split_file = ds / split / f"{split}.json"
    entries = read_split(split_file)
    files = _files(ds, split, entries, annotations)
    n_vert = topology.n_vertices
    key = _cache_key(split_file, files, topology, annotations)
    if cache_dir is not None:
        cached = _load_cache(cache_dir / key, ds, split, entries, files, skip_bad)
        if cached is not None:
            return cached
    if annotations and files:
        _check_vertex_count(ds, files[0][1], n_vert, flame_dir)

    kept, skipped, sizes, arrays = [], [], [], {k: [] for k in ("vertices", "model_view", "projection", "landmarks")}
    from tqdm import tqdm

    for pos, (entry, (img, ann)) in enumerate(tqdm(list(zip(entries, files)), desc=f"index {split}", unit="item",
                                                    disable=len(entries) < 500)):
        try:
            try:
                _check_entry(entry, annotations)
            except InputError as e:
                raise InputValueError(f"{split_file}: entry {pos}: {e}") from None
            size = image_size(img)
            if annotations:
                a = read_annotation(ann, n_vert)
                lmk = landmarks_image(a["vertices"].astype(np.float64), a["model_view_matrix"], a["projection_matrix"],
                                      size[1], topology)
                if not np.isfinite(lmk).all():
                    raise InputValueError(f"{ann}: the projection of the landmarks is not finite")
        except InputError as e:
            if not skip_bad:
                raise
            skipped.append((pos, "FileNotFoundError" if isinstance(e, FileNotFoundError) else "ValueError", str(e)))
            continue
        kept.append(pos)
        sizes.append(size)
        if annotations:
            for k, v in zip(arrays, (a["vertices"], a["model_view_matrix"], a["projection_matrix"], lmk)):
                arrays[k].append(v)
    if skipped:
        log.warning("%s: skipped %d bad items (first: %s)", split_file, len(skipped), skipped[0][2])
    arrays = {k: (np.stack(v) if v else np.zeros((0,))) for k, v in arrays.items()} if annotations else {}
    sizes = np.array(sizes, np.int64).reshape(-1, 2)
    if cache_dir is not None:
        _write_cache(cache_dir, key, kept, skipped, sizes, arrays)
        cached = _load_cache(cache_dir / key, ds, split, entries, files, skip_bad)
        if cached is not None:
            return cached
    return SplitIndex([entries[i] for i in kept], [files[i][0] for i in kept], sizes,
                      *(arrays.get(k) for k in ("vertices", "model_view", "projection", "landmarks")),
                      skipped=skipped)


def _write_cache(cache_dir: Path, key: str, kept, skipped, sizes, arrays) -> None:
    """Write into a fresh folder, then rename it into place (atomic; a concurrent builder wins)."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = cache_dir / f".{key}.{os.getpid()}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    for name, arr in arrays.items():
        np.save(tmp / f"{name}.npy", arr)
    np.save(tmp / "sizes.npy", sizes)
    (tmp / "meta.json").write_text(json.dumps({"kept": kept, "skipped": skipped}))
    try:
        os.replace(tmp, cache_dir / key)
    except OSError:  # another process built it first
        shutil.rmtree(tmp, ignore_errors=True)
    for old in cache_dir.iterdir():  # caches of earlier versions of this split's files
        if old.name != key and not old.name.startswith("."):
            shutil.rmtree(old, ignore_errors=True)


def _load_cache(path: Path, ds, split, entries, files, skip_bad: bool) -> SplitIndex | None:
    if not (path / "meta.json").is_file():
        return None
    meta = json.loads((path / "meta.json").read_text())
    if meta["skipped"] and not skip_bad:
        _, kind, reason = meta["skipped"][0]
        raise (InputFileNotFound if kind == "FileNotFoundError" else InputValueError)(reason)
    arr = {n: np.load(path / f"{n}.npy", mmap_mode="r") if (path / f"{n}.npy").exists() else None
           for n in ("vertices", "model_view", "projection", "landmarks")}
    kept = meta["kept"]
    return SplitIndex([entries[i] for i in kept], [files[i][0] for i in kept], np.load(path / "sizes.npy"),
                      arr["vertices"], arr["model_view"], arr["projection"], arr["landmarks"],
                      skipped=[tuple(s) for s in meta["skipped"]], path=path)


# --------------------------------------------------------------------------------------------
# The decoded-image cache: each item's pixels that any of its crops can read
# --------------------------------------------------------------------------------------------
IMAGE_CACHE_VERSION = 1


def shrink_factors(bbox, size: int, clip: bool) -> tuple[int, int]:
    """The smallest and largest integer pre-shrink factor (:func:`warp_crop`'s k) of any crop of
    a bbox (x, y, w, h) at crop side ``size``: training's random margins (:data:`MARGIN_TRAIN`)
    and evaluation's fixed one lie between the smallest and the largest grown box."""
    w, h = float(bbox[2]), float(bbox[3])
    k = lambda side: max(1, int(side / size)) if size / side < 0.5 else 1  # noqa: E731 (warp_crop's rule)
    grow_lo, grow_hi = 1 + 2 * min(MARGIN_TRAIN[0], MARGIN_EVAL), 1 + 2 * max(MARGIN_TRAIN[1], MARGIN_EVAL)
    return (1 if clip else k(max(w, h) * grow_lo)), k(max(w, h) * grow_hi)


def crop_region(bbox, image_size: tuple[int, int], size: int, clip: bool) -> tuple[int, int, int, int]:
    """The part (x0, y0, x1, y1) of an image that every crop of a bbox at side ``size`` reads,
    with room for the bilinear taps and the pre-shrink's blocks, its corner on a multiple of every
    pre-shrink factor the crops use (so that shrinking the part equals cutting the shrunk image)."""
    x, y, w, h = (float(v) for v in bbox)
    k_lo, k_hi = shrink_factors(bbox, size, clip)
    step = math.lcm(*range(k_lo, k_hi + 1))
    # the crop is the square of side max(grown w, grown h) about the grown box's centre, which the
    # asymmetric margins move by up to half their spread
    spread = max(MARGIN_TRAIN[1] - MARGIN_TRAIN[0], 0.0)
    half = max(w, h) * (1 + 2 * max(MARGIN_TRAIN[1], MARGIN_EVAL)) / 2 + spread * max(w, h) / 2 + 2 * k_hi + 2
    cx, cy = x + w / 2, y + h / 2
    W, H = image_size
    x0, y0 = max(0, int(math.floor((cx - half) / step)) * step), max(0, int(math.floor((cy - half) / step)) * step)
    x1, y1 = min(W, int(math.ceil(cx + half)) + step), min(H, int(math.ceil(cy + half)) + step)
    return (x0, y0, max(x1, x0 + 1), max(y1, y0 + 1)) if x0 < W and y0 < H else (0, 0, W, H)


@dataclass
class ImageCache:
    """Each item's :func:`crop_region` of its decoded image, uint8 RGB, in one memory-mapped file:
    ``pixels`` [total] and ``table`` [N,5] (offset, x0, y0, height, width). Built once per split
    and crop side (``image(i)`` then costs a slice instead of a PNG/JPEG decode)."""

    pixels: np.ndarray
    table: np.ndarray

    def region(self, i: int) -> tuple[np.ndarray, int, int]:
        """Item i's region [h,w,3] and its corner (x0, y0) in the image."""
        off, x0, y0, h, w = (int(v) for v in self.table[i])
        return self.pixels[off: off + h * w * 3].reshape(h, w, 3), x0, y0


def build_image_cache(path: Path, images: list[Path], entries: list[dict], sizes: np.ndarray, size: int,
                      clip: bool) -> ImageCache:
    """Load (or write, atomically, with a progress bar) the :class:`ImageCache` in ``path``."""
    if not (path / "table.npy").is_file():
        from tqdm import tqdm

        boxes = [crop_region(e["bbox"], tuple(int(v) for v in wh), size, clip) for e, wh in zip(entries, sizes)]
        table, offset = [], 0
        for x0, y0, x1, y1 in boxes:
            table.append((offset, x0, y0, y1 - y0, x1 - x0))
            offset += (y1 - y0) * (x1 - x0) * 3
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        pixels = np.lib.format.open_memmap(tmp / "pixels.npy", mode="w+", dtype=np.uint8, shape=(max(offset, 1),))
        for (off, x0, y0, h, w), img in zip(table, tqdm(images, desc="decode images", unit="img",
                                                         disable=len(images) < 500)):
            pixels[off: off + h * w * 3] = read_image(img)[y0: y0 + h, x0: x0 + w].reshape(-1)
        pixels.flush()
        del pixels
        np.save(tmp / "table.npy", np.array(table, np.int64).reshape(-1, 5))
        try:
            os.replace(tmp, path)
        except OSError:  # another process wrote it first
            shutil.rmtree(tmp, ignore_errors=True)
    return ImageCache(np.load(path / "pixels.npy", mmap_mode="r"), np.load(path / "table.npy"))


# --------------------------------------------------------------------------------------------
# The Dataset
# --------------------------------------------------------------------------------------------
def _cache_root() -> Path:
    from . import OUTPUTS_DIR

    return OUTPUTS_DIR / "data_cache"


class DAD3DHeadsDataset(Dataset):
    """One split of a DAD-3DHeads-format data set.

    root: the folder holding ``DAD-3DHeadsDataset/`` (or that folder); flame: FlameAssets or
    FlameTopology (faces, landmark embedding); train: random crop margins (5-15 % per side) instead
    of a fixed 10 %; clip_bbox: cut the grown bbox to the image (:func:`crop_affine`); augment: photometric augmentation (training only); skip_bad: drop invalid items
    and count them in ``skipped`` instead of raising; annotations: False for image + bbox only
    (the real test split), None to decide by :func:`has_annotations`;
    cache: False parses every annotation on access (no cache, no validation pass).
    """

    def __init__(self, root: str | Path, split: str, crop_size: int, flame: FlameAssets | FlameTopology,
                 train: bool = False, augment: bool = False, skip_bad: bool = False,
                 annotations: bool | None = None, cache: bool = True, cache_dir: str | Path | None = None,
                 clip_bbox: bool = False):
        self.ds, self.split, self.crop_size = dataset_dir(root), split, int(crop_size)
        self.clip_bbox = clip_bbox
        self.topology = flame.topology if isinstance(flame, FlameAssets) else flame
        self.train, self.augment = train, augment and train
        self.annotations = has_annotations(self.ds, split) if annotations is None else annotations
        self.cached = cache
        self.n_vertices = self.topology.n_vertices
        flame_path = flame.path if isinstance(flame, FlameAssets) else None
        if cache:
            cache_path = Path(cache_dir) if cache_dir is not None else _cache_root() / hashlib.sha1(
                str((self.ds / split).resolve()).encode()).hexdigest()[:16]
            self.index = build_index(self.ds, split, self.topology, self.annotations, skip_bad, cache_path,
                                     flame_path)
        else:
            entries = read_split(self.ds / split / f"{split}.json")
            files = _files(self.ds, split, entries, self.annotations)
            if self.annotations and files:
                _check_vertex_count(self.ds, files[0][1], self.n_vertices, flame_path)
            self.index = SplitIndex(entries, [f[0] for f in files], np.zeros((0, 2), np.int64),
                                    None, None, None, None, skipped=[])
            self._annotation_files = [f[1] for f in files]
        self.skipped = len(self.index.skipped)

    @property
    def items(self) -> list[dict]:
        """The kept split entries (item_id, bbox, attributes, ...), in sample order."""
        return self.index.entries

    def __len__(self) -> int:
        return len(self.index.entries)

    def position(self, item_id: str) -> int:
        """Sample index of an item id."""
        if not hasattr(self, "_positions"):
            self._positions = {str(e["item_id"]): k for k, e in enumerate(self.index.entries)}
        try:
            return self._positions[str(item_id)]
        except KeyError:
            raise KeyError(f"{self.ds / self.split}: no item '{item_id}'") from None

    def image(self, i: int) -> np.ndarray:
        """The original image of sample i, [H,W,3] uint8 RGB."""
        return read_image(self.index.images[i])

    def _source(self, i: int) -> tuple[np.ndarray, int, int, int, int]:
        """The pixels sample i's crops read, their corner in the image and the image's size:
        (pixels [h,w,3] uint8 RGB, x0, y0, width, height). With the data cache, the item's region
        of the :class:`ImageCache` (decoded once), else that region of the image file: crops are
        the same either way (``tests/test_data.py``). (Cropped from the whole image instead, a
        crop differs by OpenCV's fixed-point rounding of the shifted map: at most one grey level,
        in under 1 % of pixels.)"""
        if self.index.path is None:
            image = self.image(i)
            x0, y0, x1, y1 = crop_region(self.index.entries[i]["bbox"], image.shape[1::-1], self.crop_size,
                                         self.clip_bbox)
            return image[y0:y1, x0:x1], x0, y0, image.shape[1], image.shape[0]
        if getattr(self, "_images", None) is None:
            path = self.index.path / f"images_{IMAGE_CACHE_VERSION}_S{self.crop_size}_clip{int(self.clip_bbox)}"
            with exclusive_lock(self.index.path.parent / ".lock"):
                self._images = build_image_cache(path, self.index.images, self.index.entries, self.index.sizes,
                                                 self.crop_size, self.clip_bbox)
        region, x0, y0 = self._images.region(i)
        return (region, x0, y0, *(int(v) for v in self.index.sizes[i]))

    def _vertices_image(self, i: int, verts, mv, P, height: int) -> np.ndarray:
        """GT vertices of sample i in image pixels [V,2] float64 (:func:`project`); with the data
        cache, projected once per split (``vertices_image.npy`` beside the cached arrays)."""
        if self.index.path is None or self.index.vertices is None:
            return project(verts.astype(np.float64), mv, P, height)
        if getattr(self, "_projected", None) is None:
            path = self.index.path / "vertices_image.npy"
            with exclusive_lock(self.index.path.parent / ".lock"):
                if not path.is_file():
                    ix = self.index
                    out = np.empty((len(ix.entries), ix.vertices.shape[1], 2))
                    for k in range(len(out)):
                        out[k] = project(np.asarray(ix.vertices[k], np.float64), ix.model_view[k], ix.projection[k],
                                         int(ix.sizes[k][1]))
                    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
                    with open(tmp, "wb") as f:
                        np.save(f, out)
                    os.replace(tmp, path)
            self._projected = np.load(path, mmap_mode="r")
        return np.asarray(self._projected[i])

    def geometry(self, i: int, height: int) -> tuple[np.ndarray, ...]:
        """Annotation of sample i: vertices [V,3] float32, MV [4,4], P [4,4], GT landmarks [68,2]
        image pixels (``height``: the image's)."""
        return self._arrays(i, height)

    def _arrays(self, i: int, height: int) -> tuple[np.ndarray, ...]:
        """vertices [V,3] float32, MV [4,4], P [4,4], landmarks [68,2] image pixels."""
        ix = self.index
        if ix.vertices is not None:
            return np.asarray(ix.vertices[i]), np.asarray(ix.model_view[i]), np.asarray(ix.projection[i]), \
                np.asarray(ix.landmarks[i])
        a = read_annotation(self._annotation_files[i], self.n_vertices)
        v, mv, P = a["vertices"], a["model_view_matrix"], a["projection_matrix"]
        return v, mv, P, landmarks_image(v.astype(np.float64), mv, P, height, self.topology)

    def draw(self) -> np.random.Generator | None:
        """The generator of one sample's random draws (crop margins, photometric augmentation):
        seeded by one draw from the global torch generator in training, None in evaluation."""
        return np.random.default_rng(int(torch.randint(0, 2**62, ()).item())) if self.train else None

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return self.samples([i], [self.draw()])[0]

    def __getitems__(self, indices: list[int]) -> SampleBatch:
        """Samples ``indices`` made together (the DataLoader's batched fetch), each drawing its
        generator in turn as :meth:`__getitem__` does."""
        return self.samples(indices, [self.draw() for _ in indices])

    def samples(self, indices: list[int], rngs: list[np.random.Generator | None]) -> SampleBatch:
        """The samples ``indices``, sample k drawing from ``rngs[k]`` (:meth:`draw`), as one
        :class:`SampleBatch`. Crops are cut one by one; the rest (normalisation, the crop maps of
        the landmarks and vertices, visibility, heatmaps, the tensors) is computed for the whole
        batch at once, elementwise or per sample as one sample alone would be: a sample is the
        same bit for bit in a batch of any size (``tests/test_data.py``)."""
        S, B, ix = self.crop_size, len(indices), self.index
        crops = np.empty((B, S, S, 3), np.uint8)
        A, bbox, size = np.empty((B, 2, 3)), np.empty((B, 4)), np.empty((B, 2), np.int64)
        for k, (i, rng) in enumerate(zip(indices, rngs)):
            entry = ix.entries[i]
            pixels, x0, y0, width, height = self._source(i)
            bbox[k], size[k] = entry["bbox"], (width, height)
            try:
                A[k] = sample_affine(bbox[k], (width, height), S, self.clip_bbox, rng)
            except InputError as e:
                raise InputValueError(f"{self.ds / self.split}: item '{entry['item_id']}': {e}") from None
            A_pixels = A[k].copy()
            A_pixels[:, 2] += A[k, :, :2] @ [x0, y0]  # the same map from the region's pixels
            crops[k] = warp_crop(pixels, A_pixels, S)
            if self.augment:
                crops[k] = photometric(rng, crops[k])
        out = {"image": normalize_image(crops), "crop_affine": _float32(A), "bbox": _float32(bbox),
               "index": torch.tensor(indices, dtype=torch.int64)}
        if self.annotations:
            V = self.n_vertices
            verts, verts_img = np.empty((B, V, 3), np.float32), np.empty((B, V, 2))
            mv, lmk_img, rays = np.empty((B, 4, 4)), np.empty((B, 68, 2)), np.empty((B, 3))
            for k, i in enumerate(indices):
                verts[k], mv[k], P, lmk_img[k] = self._arrays(i, int(size[k, 1]))
                rays[k] = viewing_ray(verts[k], mv[k], P)
                verts_img[k] = self._vertices_image(i, verts[k], mv[k], P, int(size[k, 1]))
            lmk_crop = apply_affine(A, lmk_img)
            inside_crop = ((lmk_crop > 0) & (lmk_crop < S)).all(-1)
            inside_image = ((lmk_img >= 0) & (lmk_img < size[:, None])).all(-1)
            visibility = (inside_crop & inside_image).astype(np.float32)
            out.update({
                "landmarks_2d": _float32(lmk_crop),
                "visibility": torch.from_numpy(visibility),
                "heatmaps": torch.from_numpy(gaussian_heatmaps(lmk_crop, visibility, S, **HEATMAP)),
                "vertices_crop": _float32(apply_affine(A, verts_img)),
                "vertices_model": torch.from_numpy(verts),
                "rotation": _float32(flip_yz(mv)),
                "view_ray": _float32(rays),
                "landmarks_2d_image": _float32(lmk_img),
            })
        return SampleBatch(out)


def _float32(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.asarray(a, np.float32))


class SampleBatch(Sequence):
    """Samples made together (:meth:`DAD3DHeadsDataset.samples`): ``stacked`` {key: tensor [B,...]}.
    As a sequence, sample k is the dict of each tensor's row k (views), which is what a DataLoader
    with torch's default collate stacks again; :func:`collate` takes ``stacked`` as it is."""

    def __init__(self, stacked: dict[str, torch.Tensor]):
        self.stacked = stacked

    def __len__(self) -> int:
        return len(self.stacked["index"])

    def __getitem__(self, k: int) -> dict[str, torch.Tensor]:
        if not -len(self) <= k < len(self):
            raise IndexError(k)
        return {key: v[k] for key, v in self.stacked.items()}


def collate(samples) -> dict:
    """A DataLoader's ``collate_fn`` for the data sets here: a :class:`SampleBatch`'s tensors as
    they are (no second copy), any other list of samples by torch's default collate."""
    if isinstance(samples, SampleBatch):
        return samples.stacked
    return torch.utils.data.default_collate(samples)


# --------------------------------------------------------------------------------------------
# The split protocol: which split each stage of a run uses
# --------------------------------------------------------------------------------------------
HOLDOUT_PARTS = {"fit": False, "holdout": True}  # "train-<part>": train without / only its holdout


def has_annotations(ds: Path, split: str) -> bool:
    """Whether a split is labelled: it has an ``annotations/`` folder or an entry with an
    ``annotation_path`` (the released DAD-3DHeads test split has neither)."""
    if (ds / split / "annotations").is_dir():
        return True
    return any("annotation_path" in e for e in read_split(ds / split / f"{split}.json"))


def split_protocol(data: DataSettings) -> dict:
    """Which split each stage of a run uses, decided by the data set of a data section:
    ``{"fit", "select", "evaluate", "submit", "holdout_fraction"}`` (split names of :func:`open_split`).

    Test split labelled (the synthetic data): fit on ``train``; select the checkpoint, step the
    plateau schedule and stop early on ``val``; evaluate on ``test``; no submission.
    Test split without annotations (the released DAD-3DHeads), or no test split: select on
    ``train-holdout``, the items of train whose :func:`holdout_score` is below ``holdout_fraction``;
    fit on ``train-fit``, the rest; evaluate on ``val``, which training never reads; write a
    benchmark submission for ``test`` when there is one.
    """
    ds = dataset_dir(data_root(data.root))
    has_test = (ds / "test" / "test.json").is_file()
    if has_test and has_annotations(ds, "test"):
        return {"fit": "train", "select": "val", "evaluate": "test", "submit": None, "holdout_fraction": None}
    return {"fit": "train-fit", "select": "train-holdout", "evaluate": "val", "submit": "test" if has_test else None,
            "holdout_fraction": data.holdout_fraction}


def holdout_score(item_id) -> float:
    """A number in [0, 1) fixed by an item id: the first 8 bytes of its SHA-256 (the same on every
    machine and Python, unlike ``hash()``). An item is in the holdout when it is below the fraction."""
    return int.from_bytes(hashlib.sha256(str(item_id).encode()).digest()[:8], "big") / 2.0 ** 64


def open_split(data: DataSettings, name: str, flame: FlameAssets | FlameTopology, train: bool = False,
               annotations: bool | None = True) -> Dataset:
    """The dataset a split name of :func:`split_protocol` names, on a run's data section (its root,
    crop_size, augment, skip_bad, clip_bbox, holdout_fraction): a split of the data set, or
    ``train-holdout`` / ``train-fit`` (a ``torch.utils.data.Subset`` of train; an empty one is an
    error naming the split). ``train``, ``annotations``: as :class:`DAD3DHeadsDataset`'s."""
    split, _, part = name.partition("-")
    if part and part not in HOLDOUT_PARTS:
        raise InputValueError(f"unknown split '{name}' (a split name, or <split>-fit / <split>-holdout)")
    dataset = DAD3DHeadsDataset(data_root(data.root), split, data.crop_size, flame, train=train,
                                augment=data.augment, skip_bad=data.skip_bad, annotations=annotations,
                                clip_bbox=data.clip_bbox)
    if not part:
        return dataset
    fraction = data.holdout_fraction
    keep = [i for i, e in enumerate(dataset.items) if (holdout_score(e["item_id"]) < fraction) == HOLDOUT_PARTS[part]]
    if not keep:
        raise InputValueError(f"{dataset.ds / split}: '{name}' is empty (data.holdout_fraction {fraction} of "
                         f"{len(dataset)} items); change data.holdout_fraction")
    return torch.utils.data.Subset(dataset, keep)
