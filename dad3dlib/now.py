"""NoW challenge export: a neutral FLAME mesh and its 7 landmarks per image of the NoW release.

    python -m dad3dlib predict --format now --checkpoint CKPT --images NOW_DIR --out DIR [--flame-assets DIR]

Input, the NoW release as distributed: ``NOW_DIR`` (or its ``final_release_version/``) holds
``iphone_pictures/<subject>/<challenge>/<name>.jpg`` and the release's face boxes
``detected_face/<subject>/<challenge>/<name>.npy`` (a dict ``left, right, top, bottom`` in pixels,
pickled inside ``.npy``; read through the restricted unpickler of flame.py, never ``allow_pickle``).
Each image is cropped exactly as evaluation crops (``data.sample_affine``, the one home of the crop:
the box grown by ``MARGIN_EVAL`` per side, cut to the image when the checkpoint's ``data.clip_bbox``
is set, as the paper preset does, the longest side resized to the checkpoint's crop size, padded),
so the network sees what it was evaluated on.

Output, where the NoW evaluation code (github.com/soubhiksanyal/now_evaluation: its README, and
``metric_computation`` in ``compute_error.py``, which splits each image-list line into subject,
challenge and file name and looks for ``<predicted_mesh_folder>/<subject>/<challenge>/<name>.obj``
and ``.npy``) reads it:

- ``DIR/<subject>/<challenge>/<name>.obj``: the predicted identity with zero expression, zero jaw,
  neck and eye pose and identity global rotation, in FLAME's model space and unit, metres (the
  default ``--predicted_mesh_unit m`` of ``compute_error.py``); plain ``v x y z`` and 1-based
  ``f i j k`` lines only (the README: its mesh loader cannot read vertex colours).
- ``DIR/<subject>/<challenge>/<name>.npy``: [7,3] float64, the mesh's landmarks in the README's
  order (landmarks_7_annotated.png): right eye outer corner, right eye inner corner, left eye inner
  corner, left eye outer corner, nose bottom, right mouth corner, left mouth corner, i.e. the 68-point
  landmarks :data:`flame.ALIGN7` (36, 39, 42, 45, 33, 48, 54) of the mesh.

The mesh has the topology of the FLAME directory used (``--flame-assets``: the real FLAME model for
a NoW submission). Every file is written atomically; files of earlier images stay when a later
one fails.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from .data import normalize_image, read_image, sample_affine, warp_crop
from .errors import InputError, InputFileNotFound, InputValueError
from .files import atomic_open, atomic_write
from .flame import FlameLayer, load_npy_dict, split_3dmm

IMAGES_DIR = "iphone_pictures"
BOXES_DIR = "detected_face"
RELEASE_DIR = "final_release_version"
IMAGE_SUFFIXES = (".jpg", ".png")  # compute_error.py strips a 4-character extension
BOX_KEYS = ("left", "right", "top", "bottom")


# --------------------------------------------------------------------------------------------
# The release folder
# --------------------------------------------------------------------------------------------
def read_face_box(path: str | Path) -> np.ndarray:
    """A NoW face box file -> [4] float64 (x, y, w, h) image pixels: (left, top, right - left,
    bottom - top). Read restrictedly (numpy arrays and scalars only); one error naming the file."""
    path = Path(path)
    if not path.is_file():
        raise InputFileNotFound(f"{path}: face box not found")
    box = load_npy_dict(path)
    if not isinstance(box, dict) or any(k not in box for k in BOX_KEYS):
        raise InputValueError(f"{path}: expected a dict with keys {list(BOX_KEYS)}")
    try:
        left, right, top, bottom = (float(box[k]) for k in BOX_KEYS)
    except (TypeError, ValueError) as e:
        raise InputValueError(f"{path}: the face box values are not numbers ({e})") from None
    if not all(map(math.isfinite, (left, right, top, bottom))) or right <= left or bottom <= top:
        raise InputValueError(f"{path}: bad face box {dict(zip(BOX_KEYS, (left, right, top, bottom)))} "
                              "(expected finite values with right > left and bottom > top)")
    return np.array([left, top, right - left, bottom - top])


def release_items(root: str | Path) -> list[dict]:
    """Every image of a NoW release folder, sorted: ``{"name": "<subject>/<challenge>/<stem>",
    "image": Path, "bbox": [4] (x, y, w, h)}``. ``root`` holds ``iphone_pictures/`` and
    ``detected_face/``, or holds ``final_release_version/`` that holds them; every
    face box is read here, so that a missing or bad one stops the run before any prediction."""
    root = Path(root)
    if (root / RELEASE_DIR).is_dir():
        root = root / RELEASE_DIR
    if not (root / IMAGES_DIR).is_dir():
        raise InputFileNotFound(f"{root}: no {IMAGES_DIR}/ (expected a NoW release folder holding "
                                f"{IMAGES_DIR}/<subject>/<challenge>/ and {BOXES_DIR}/)")
    images = sorted(p for p in (root / IMAGES_DIR).glob("*/*/*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not images:
        raise InputFileNotFound(f"{root / IMAGES_DIR}: no images <subject>/<challenge>/<name>{{.jpg,.png}}")
    items = []
    for img in images:
        rel = img.relative_to(root / IMAGES_DIR).with_suffix("")
        items.append({"name": rel.as_posix(), "image": img,
                      "bbox": read_face_box(root / BOXES_DIR / f"{rel}.npy")})
    return items


class NowImages(Dataset):
    """The evaluation crops of release items (``clip_bbox``: the checkpoint's ``data.clip_bbox``):
    {"image" [3,S,S], "crop_affine" [2,3], "index"}."""

    def __init__(self, items: list[dict], crop_size: int, clip_bbox: bool = False):
        self.items, self.crop_size, self.clip_bbox = items, int(crop_size), bool(clip_bbox)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        image = read_image(self.items[i]["image"])
        try:
            A = sample_affine(self.items[i]["bbox"], image.shape[1::-1], self.crop_size, self.clip_bbox)
        except InputError as e:
            raise InputValueError(f"{self.items[i]['image']}: {e}") from None
        crop = warp_crop(image, A, self.crop_size)
        return {"image": normalize_image(crop), "crop_affine": torch.tensor(A, dtype=torch.float32),
                "index": torch.tensor(i)}


# --------------------------------------------------------------------------------------------
# Meshes and files
# --------------------------------------------------------------------------------------------
def neutral_mesh(layer: FlameLayer, params: Tensor) -> tuple[Tensor, Tensor]:
    """The identity of 3DMM vectors with zero expression, jaw, neck and eyes and no global rotation,
    in FLAME's model space (metres), and its 7 NoW landmarks.

    params [B,413] -> vertices [B,V,3], landmarks [B,7,3] (:data:`flame.ALIGN7`)
    """
    p = split_3dmm(params)
    v = layer.vertices(p["shape"], torch.zeros_like(p["expression"]), torch.zeros_like(p["jaw"]))
    return v, layer.landmarks7(v)


def obj_text(vertices: np.ndarray, faces: np.ndarray) -> str:
    """A Wavefront OBJ with ``v x y z`` and 1-based ``f i j k`` lines only. vertices [V,3], faces [F,3]"""
    v = "\n".join(f"v {x:.7g} {y:.7g} {z:.7g}" for x, y, z in np.asarray(vertices, np.float64).tolist())
    f = "\n".join(f"f {i} {j} {k}" for i, j, k in (np.asarray(faces, np.int64) + 1).tolist())
    return f"{v}\n{f}\n"


def write_prediction(out: str | Path, name: str, vertices: np.ndarray, faces: np.ndarray,
                     landmarks: np.ndarray) -> None:
    """``out/<name>.obj`` and ``out/<name>.npy`` ([7,3] float64), each atomically."""
    base = Path(out) / name
    atomic_write(f"{base}.obj", obj_text(vertices, faces))
    with atomic_open(f"{base}.npy") as f:
        np.save(f, np.asarray(landmarks, np.float64), allow_pickle=False)


@torch.no_grad()
def export(model: nn.Module, layer: FlameLayer, root: str | Path, out: str | Path, crop_size: int,
           device: str | torch.device = "cpu", batch_size: int = 16, clip_bbox: bool = False) -> int:
    """Write every image's neutral mesh and landmarks of a NoW release folder ``root`` into
    ``out`` (module docstring), each image cropped as the checkpoint's evaluation crops it
    (``crop_size``, ``clip_bbox``: its data section's); returns the number of images."""
    from tqdm import tqdm

    items = release_items(root)
    model, layer = model.to(device).eval(), layer.to(device).eval()
    faces = layer.faces.cpu().numpy()
    loader = torch.utils.data.DataLoader(NowImages(items, crop_size, clip_bbox), batch_size=batch_size, shuffle=False)
    for batch in tqdm(loader, desc="predict NoW", unit="batch", disable=len(loader) < 2):
        vertices, landmarks = neutral_mesh(layer, model(batch["image"].to(device))["params_3dmm"].float())
        for i, v, lmk in zip(batch["index"].tolist(), vertices.cpu().numpy(), landmarks.cpu().numpy()):
            write_prediction(out, items[i]["name"], v, faces, lmk)
    return len(items)
