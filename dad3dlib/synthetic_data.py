"""A synthetic data set in exactly the DAD-3DHeads layout, rendered from a FLAME-format model.

    python -m dad3dlib make-data --preset cpu --out DIR [--flame-assets DIR] [--seed N] [--workers N]

renders the recipe of a preset's ``data.synthetic`` (sizes, image sizes, seed, scene distributions)
into ``DIR/DAD-3DHeadsDataset/{train,val,test}/images/<id>.png``, ``annotations/<id>.json``
(vertices [V,3] model space, model_view_matrix, projection_matrix; every split is annotated) and
``<split>/<split>.json`` (item_id, annotation_path, img_path, bbox [x,y,w,h], attributes), plus
``DIR/make_data.json`` recording how it was made.

Every item draws from its own generator seeded by (seed, split, index) and is computed on its own,
so an item does not depend on the number of workers or on the split's size. The data set is
rendered into a temporary folder in DIR and renamed into place when complete, make_data.json last:
a failed or interrupted run leaves DIR as it was (or without make_data.json, never with a record
of data that is not there).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import cv2
import numpy as np
import orjson

from .settings import synthetic_recipe
from .data import DATASET_DIR, gaussian_blur, gaussian_noise
from .files import atomic_write
from .flame import landmarks_image
from .geometry import perspective_projection, project
from .render import Light, Renderer

SPLITS = ("train", "val", "test")
FEATHER = 0.6        # px: soft silhouette edge (anti-aliasing without MSAA)
VERTEX_DECIMALS = 6  # annotation precision (1 µm); the image is rendered from the rounded vertices

ALBEDO_BANK = 64  # distinct appearances (albedo() costs ~60 ms; each is made once per process)
CHUNK = 16  # items per job sent to a worker

# DAD-3DHeads attribute thresholds (degrees).
POSE_SIDED_YAW = 30.0
POSE_ATYPICAL = {"pitch": 30.0, "roll": 25.0}


# --------------------------------------------------------------------------------------------
# Scene sampling
# --------------------------------------------------------------------------------------------
def _angle(rng: np.random.Generator, sigma: float, wide_prob: float, limit: float) -> float:
    a = rng.uniform(-limit, limit) if rng.random() < wide_prob else rng.normal(0.0, sigma)
    return float(np.clip(a, -limit, limit))


def rotation_matrix(yaw: float, pitch: float, roll: float) -> np.ndarray:
    """Head orientation in camera space, R = Rz(roll)·Ry(yaw)·Rx(pitch), degrees -> [3,3]."""
    from scipy.spatial.transform import Rotation

    return Rotation.from_euler("ZYX", [roll, yaw, pitch], degrees=True).as_matrix()


def pose_attribute(yaw: float, pitch: float, roll: float) -> str:
    if abs(pitch) > POSE_ATYPICAL["pitch"] or abs(roll) > POSE_ATYPICAL["roll"]:
        return "atypical"
    return "sided" if abs(yaw) > POSE_SIDED_YAW else "front"


def sample_light(rng: np.random.Generator, standard: bool) -> Light:
    """Frontal-ish white light when ``standard``; otherwise side, top, dim or tinted light."""
    if standard:
        az, el = rng.normal(0.0, 15.0), rng.normal(15.0, 10.0)
        color = 1.0 + rng.uniform(-0.05, 0.05, 3)
        ambient, diffuse = rng.uniform(0.35, 0.5), rng.uniform(0.5, 0.7)
    else:
        az, el = rng.uniform(-110.0, 110.0), rng.uniform(-30.0, 75.0)
        color = 1.0 + rng.uniform(-0.3, 0.3, 3)
        ambient, diffuse = rng.uniform(0.1, 0.45), rng.uniform(0.4, 1.1)
    az, el = math.radians(az), math.radians(el)
    direction = (math.sin(az) * math.cos(el), math.sin(el), math.cos(az) * math.cos(el))
    return Light(direction=direction, color=tuple(color / color.max()), ambient=float(ambient),
                 diffuse=float(diffuse), specular=float(rng.uniform(0.0, 0.25)),
                 shininess=float(rng.uniform(8.0, 40.0)))


@dataclass
class Scene:
    """Everything drawn for one image before rendering."""

    shape: np.ndarray        # [300]
    expression: np.ndarray   # [100]
    jaw: np.ndarray          # [3] axis-angle
    angles: tuple            # yaw, pitch, roll (degrees)
    size: tuple              # image width, height
    fov: float               # degrees
    head_fraction: float
    centre: tuple            # where the head centre goes, as fractions of the free range
    expressive: bool
    standard_light: bool


def sample_scene(rng: np.random.Generator, cfg: dict, image_sizes: list) -> Scene:
    n_shape, n_expr = 300, 100
    shape = np.clip(rng.standard_normal(n_shape), -cfg["shape_clip"], cfg["shape_clip"])
    expressive = rng.random() < cfg["expression_prob"]
    sigma = rng.uniform(*cfg["expression_sigma"]) if expressive else cfg["neutral_sigma"]
    expression = rng.standard_normal(n_expr) * sigma
    jaw = np.zeros(3)
    if rng.random() < cfg["jaw_prob"]:
        jaw = np.array([rng.uniform(*cfg["jaw_open"]), rng.normal(0, 0.02), rng.normal(0, 0.02)])
    angles = (_angle(rng, cfg["yaw_sigma"], cfg["yaw_wide_prob"], cfg["yaw_max"]),
              _angle(rng, cfg["pitch_sigma"], cfg["pitch_wide_prob"], cfg["pitch_max"]),
              _angle(rng, cfg["roll_sigma"], cfg["roll_wide_prob"], cfg["roll_max"]))
    return Scene(shape=shape, expression=expression, jaw=jaw, angles=angles,
                 size=tuple(image_sizes[rng.integers(len(image_sizes))]),
                 fov=float(rng.uniform(*cfg["fov"])), head_fraction=float(rng.uniform(*cfg["head_fraction"])),
                 centre=tuple(rng.uniform(0.0, 1.0, 2)),
                 expressive=bool(expressive or jaw[0] > 0.15),
                 standard_light=bool(rng.random() < cfg["light_standard_prob"]))


def _fit(lo: float, hi: float, size: float) -> float:
    """Shift that brings [lo, hi] inside [0, size] (centres it when it is larger)."""
    if hi - lo >= size:
        return size / 2.0 - (lo + hi) / 2.0
    return max(-lo, 0.0) + min(size - hi, 0.0)


def camera(scene: Scene, head_vertices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """MV [4,4] and P [4,4] placing the head at the scene's size and position, its projected
    bbox inside the frame.

    head_vertices [n,3]: model-space vertices of the head subset (rotation about their centre).
    """
    width, height = scene.size
    focal = 0.5 * max(width, height) / math.tan(math.radians(scene.fov) / 2.0)
    lo, hi = head_vertices.min(0), head_vertices.max(0)
    centre = (lo + hi) / 2.0
    head_px = scene.head_fraction * min(width, height)
    distance = focal * (hi[1] - lo[1]) / head_px
    free = np.maximum(np.array([width, height]) - head_px, 0.0)
    px = (np.array([width, height]) - free) / 2.0 + free * np.asarray(scene.centre)  # bottom-up
    cx, cy = width / 2.0, height / 2.0
    R = rotation_matrix(*scene.angles)
    t = np.array([(px[0] - cx) / focal * distance, (px[1] - cy) / focal * distance, -distance])
    mv = np.eye(4)
    mv[:3, :3] = R
    mv[:3, 3] = t - R @ centre
    radius = float(np.linalg.norm(hi - lo))
    P = perspective_projection(focal, cx, cy, near=max(distance - 2 * radius, 0.01), far=distance + 2 * radius)
    for _ in range(3):  # rotation and perspective change the box: shift it into the frame
        box = project(head_vertices, mv, P, height)
        (x0, y0), (x1, y1) = box.min(0), box.max(0)
        dx, dy = _fit(x0, x1, width), _fit(y0, y1, height)
        mv[:3, 3] += np.array([dx, -dy, 0.0]) * distance / focal
    return mv, P


# --------------------------------------------------------------------------------------------
# Shoulders: an ellipsoid under the neck, part of the background (never annotated)
# --------------------------------------------------------------------------------------------
TORSO_RADII = (0.21, 0.3, 0.11)  # half shoulder width, half height, half depth (metres)
TORSO_EXPONENTS = (0.5, 0.6, 1.0)  # squared-off shoulders


def ellipsoid_mesh(radii, exponents=(1.0, 1.0, 1.0), rings: int = 16,
                   segments: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """A closed (super-)ellipsoid: coordinates u on the unit sphere become radius·sign(u)·|u|^e
    (e < 1 squares the shape off). -> vertices [V,3] float32, faces [F,3] int64."""
    theta = np.linspace(0, np.pi, rings + 1)[1:-1]
    phi = np.linspace(0, 2 * np.pi, segments, endpoint=False)
    t, p = np.meshgrid(theta, phi, indexing="ij")
    ring = np.stack([np.sin(t) * np.sin(p), np.cos(t), np.sin(t) * np.cos(p)], -1).reshape(-1, 3)
    u = np.concatenate([[[0, 1, 0]], ring, [[0, -1, 0]]])
    v = np.sign(u) * np.abs(u) ** np.asarray(exponents) * np.asarray(radii)
    i, j = np.meshgrid(np.arange(rings - 2), np.arange(segments), indexing="ij")
    a, b = 1 + i * segments + j, 1 + i * segments + (j + 1) % segments
    quads = np.stack([a, a + segments, b, b, a + segments, b + segments], -1).reshape(-1, 3)
    j = np.arange(segments)
    last = len(v) - 1
    caps = [np.stack([np.zeros_like(j), 1 + j, 1 + (j + 1) % segments], 1),
            np.stack([np.full_like(j, last), last - segments + (j + 1) % segments, last - segments + j], 1)]
    return v.astype(np.float32), np.concatenate([quads] + caps).astype(np.int64)


def torso_pose(rng: np.random.Generator, scene: Scene, mv: np.ndarray, vertices: np.ndarray) -> np.ndarray:
    """MV [4,4] of the shoulders: top at the neck's base (lowest vertices [V,3] of the head), turned
    about half as far as the head."""
    yaw, pitch, roll = scene.angles
    R = rotation_matrix(0.5 * yaw + rng.normal(0, 6), rng.normal(0, 4), 0.3 * roll + rng.normal(0, 3))
    low = vertices[vertices[:, 1] < vertices[:, 1].min() + 0.01].mean(0)
    top = mv[:3, :3] @ low + mv[:3, 3]
    out = np.eye(4)
    out[:3, :3] = R
    out[:3, 3] = top + R @ np.array([0.0, -0.85 * TORSO_RADII[1], -0.03])
    return out


def clothing(rng: np.random.Generator, vertices: np.ndarray) -> np.ndarray:
    """Per-vertex colours [V,3] in [0,1]: a plain, striped or two-tone garment."""
    c = _palette(rng, 2) / 255.0
    kind = rng.integers(3)
    if kind == 0:
        t = np.zeros(len(vertices))
    elif kind == 1:
        t = (np.sin(vertices[:, 1] * rng.uniform(60, 200)) > 0).astype(np.float64)
    else:
        t = (vertices[:, 0] * rng.choice([-1, 1]) > rng.uniform(-0.05, 0.05)).astype(np.float64)
    return _lerp(c[0], c[1], t).astype(np.float32)


# --------------------------------------------------------------------------------------------
# Textures: backgrounds and occluders (registries of generators: rng, height, width -> uint8)
# --------------------------------------------------------------------------------------------
def _palette(rng: np.random.Generator, n: int) -> np.ndarray:
    """n random colours [n,3] float in 0..255 with moderate saturation."""
    hsv = np.stack([rng.uniform(0, 180, n), rng.uniform(0, 1, n) ** 1.5 * 190, rng.uniform(30, 250, n)], 1)
    return cv2.cvtColor(hsv.astype(np.uint8)[None], cv2.COLOR_HSV2RGB)[0].astype(np.float32)


def _lerp(c0: np.ndarray, c1: np.ndarray, t: np.ndarray) -> np.ndarray:
    return c0 + (c1 - c0) * t[..., None]


def _noise(rng: np.random.Generator, h: int, w: int, octaves: int = 3) -> np.ndarray:
    """Fractal value noise [h,w] in [0,1]."""
    out, amp = np.zeros((h, w), np.float32), 1.0
    for o in range(octaves):
        cells = int(rng.integers(2, 5)) * 2 ** o
        grid = rng.random((cells + 1, cells + 1)).astype(np.float32)
        out += amp * cv2.resize(grid, (w, h), interpolation=cv2.INTER_CUBIC)
        amp *= 0.5
    out -= out.min()
    return out / max(out.max(), 1e-6)


def _coords(h: int, w: int, angle: float) -> np.ndarray:
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    return x * math.cos(angle) + y * math.sin(angle)


def bg_noise(rng, h, w):
    c = _palette(rng, 2)
    return _lerp(c[0], c[1], _noise(rng, h, w, octaves=4))


def bg_stripes(rng, h, w):
    c = _palette(rng, 2)
    period = rng.uniform(6, 60)
    u = _coords(h, w, rng.uniform(0, math.pi)) + 10 * _noise(rng, h, w, 2)
    t = 0.5 + 0.5 * np.sin(2 * math.pi * u / period)
    return _lerp(c[0], c[1], t if rng.random() < 0.5 else (t > 0.5).astype(np.float32))


def bg_gradient(rng, h, w):
    c = _palette(rng, 2)
    u = _coords(h, w, rng.uniform(0, 2 * math.pi))
    return _lerp(c[0], c[1], (u - u.min()) / max(u.max() - u.min(), 1e-6))


def bg_blobs(rng, h, w):
    c = _palette(rng, 8)
    img = np.broadcast_to(c[0], (h, w, 3)).copy()
    for k in range(int(rng.integers(4, 12))):
        centre = (int(rng.integers(0, w)), int(rng.integers(0, h)))
        axes = (int(rng.integers(w // 20 + 1, w // 3 + 2)), int(rng.integers(h // 20 + 1, h // 3 + 2)))
        cv2.ellipse(img, centre, axes, float(rng.uniform(0, 180)), 0, 360, c[1 + k % 7].tolist(), -1)
    return cv2.GaussianBlur(img, (0, 0), rng.uniform(0.5, 6))


def bg_tiles(rng, h, w):
    c = _palette(rng, 2)
    s = rng.uniform(8, 48)
    a = rng.uniform(0, math.pi / 2)
    checker = (np.floor(_coords(h, w, a) / s) + np.floor(_coords(h, w, a + math.pi / 2) / s)) % 2
    return _lerp(c[0], c[1], checker.astype(np.float32))


def bg_room(rng, h, w):
    """Walls, doors, shelves: axis-aligned rectangles with soft shading."""
    c = _palette(rng, 6)
    img = np.broadcast_to(c[0], (h, w, 3)).copy()
    for k in range(int(rng.integers(3, 9))):
        x0, y0 = int(rng.integers(-w // 4, w)), int(rng.integers(-h // 4, h))
        x1, y1 = x0 + int(rng.integers(w // 10, w)), y0 + int(rng.integers(h // 10, h))
        cv2.rectangle(img, (x0, y0), (x1, y1), c[1 + k % 5].tolist(), -1)
    shade = 0.7 + 0.3 * _noise(rng, h, w, 2)
    return img * shade[..., None]


BACKGROUNDS = {"noise": bg_noise, "stripes": bg_stripes, "gradient": bg_gradient, "blobs": bg_blobs,
               "tiles": bg_tiles, "room": bg_room}


def background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A textured background [h,w,3] uint8: one generator, often blended with a second through a
    noise mask, made at half resolution (a background is rarely in focus), then grain."""
    names = list(BACKGROUNDS)
    hh, hw = (h + 1) // 2, (w + 1) // 2
    img = BACKGROUNDS[names[rng.integers(len(names))]](rng, hh, hw)
    if rng.random() < 0.6:
        other = BACKGROUNDS[names[rng.integers(len(names))]](rng, hh, hw)
        m = np.clip((_noise(rng, hh, hw, 2) - 0.5) * rng.uniform(2, 8) + 0.5, 0, 1)[..., None]
        img = img * m + other * (1 - m)
    img = cv2.resize(img.astype(np.float32), (w, h), interpolation=cv2.INTER_LINEAR)
    img = cv2.GaussianBlur(img, (0, 0), rng.uniform(0.3, 2.0))
    grain = rng.uniform(0, 4)
    if grain > 1.0:
        img += rng.normal(0, grain, (h, w, 1)).astype(np.float32)
    return np.clip(img, 0, 255).astype(np.uint8)


def _occluder_polygon(rng, centre, size):
    n = int(rng.integers(3, 9))
    ang = np.sort(rng.uniform(0, 2 * math.pi, n))
    r = size * rng.uniform(0.4, 1.0, n)
    return [np.stack([centre[0] + r * np.cos(ang), centre[1] + r * np.sin(ang)], 1)]


def _occluder_ellipse(rng, centre, size):
    pts = cv2.ellipse2Poly((int(centre[0]), int(centre[1])),
                           (int(size * rng.uniform(0.4, 1)) + 1, int(size * rng.uniform(0.2, 0.8)) + 1),
                           int(rng.uniform(0, 180)), 0, 360, 10)
    return [pts.astype(np.float64)]


def _occluder_bar(rng, centre, size):
    """A long thin object across the face (a hand-held item, a strap, hair strand)."""
    a = rng.uniform(0, math.pi)
    d = np.array([math.cos(a), math.sin(a)])
    n = np.array([-d[1], d[0]]) * size * rng.uniform(0.1, 0.3)
    c, L = np.asarray(centre), d * size * rng.uniform(1.0, 2.5)
    return [np.stack([c - L - n, c + L - n, c + L + n, c - L + n])]


OCCLUDERS = {"polygon": _occluder_polygon, "ellipse": _occluder_ellipse, "bar": _occluder_bar}


def add_occluders(rng: np.random.Generator, image: np.ndarray, landmarks: np.ndarray,
                  bbox: list) -> np.ndarray:
    """Draw 1-2 textured shapes over the face, in place; returns their coverage mask [H,W] bool.

    landmarks [68,2] image pixels: the shapes are centred on random landmarks.
    """
    h, w = image.shape[:2]
    mask = np.zeros((h, w), np.uint8)
    names = list(OCCLUDERS)
    for _ in range(int(rng.integers(1, 3))):
        centre = landmarks[rng.integers(len(landmarks))] + rng.normal(0, 0.05, 2) * bbox[2:]
        size = rng.uniform(0.12, 0.35) * max(bbox[2], bbox[3])
        polys = OCCLUDERS[names[rng.integers(len(names))]](rng, centre, size)
        cv2.fillPoly(mask, [np.round(p * 16).astype(np.int32) for p in polys], 1, cv2.LINE_AA, shift=4)
    texture = background(rng, h, w).astype(np.float32) * rng.uniform(0.5, 1.0)
    soft = cv2.GaussianBlur(mask.astype(np.float32), (0, 0), 0.7)[..., None]
    image[:] = np.clip(image * (1 - soft) + texture * soft, 0, 255).astype(np.uint8)
    return mask.astype(bool)


def degrade_downscale(rng, img):
    h, w = img.shape[:2]
    f = rng.uniform(2.0, 4.5)
    small = cv2.resize(img, (max(int(w / f), 8), max(int(h / f), 8)), interpolation=cv2.INTER_AREA)
    return cv2.resize(small, (w, h), interpolation=cv2.INTER_LINEAR)


def degrade_jpeg(rng, img):
    ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, int(rng.integers(10, 40))])
    return cv2.imdecode(buf, cv2.IMREAD_UNCHANGED)


DEGRADATIONS = {"blur": partial(gaussian_blur, sigma=(0.8, 2.5)), "noise": partial(gaussian_noise, sd=(4, 14)),
                "downscale": degrade_downscale, "jpeg": degrade_jpeg}


# --------------------------------------------------------------------------------------------
# Rendering items
# --------------------------------------------------------------------------------------------
@dataclass
class Item:
    """One generated sample; ``mask`` is the renderer's head coverage before occluders."""

    item_id: str
    image: np.ndarray       # [H,W,3] uint8 RGB
    mask: np.ndarray        # [H,W] bool
    annotation: dict        # vertices [V,3], model_view_matrix [4,4], projection_matrix [4,4] (float64)
    entry: dict             # the split-file record


def item_rng(seed: int, split: str, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, SPLITS.index(split), index])


def item_scene(recipe: dict, item_id: str) -> Scene:
    """The scene a generated item was drawn from (its identity, expression, jaw, pose, camera), drawn
    again from its complete recipe (``settings.synthetic_recipe``) and its id ``<split>_<index>``:
    the parameters behind the annotation, for analyses that need more than the mesh."""
    split, index = item_id.rsplit("_", 1)
    return sample_scene(item_rng(recipe["seed"], split, int(index)), recipe["sampling"], recipe["image_sizes"])


class Generator:
    """Renders chunks of items; one per process (holds the FLAME layer and the GL renderers)."""

    def __init__(self, flame_assets: str | Path, recipe: dict):
        """recipe: complete (``settings.synthetic_recipe``)."""
        import torch

        from .flame import FlameLayer, load_flame_assets

        self.assets = load_flame_assets(flame_assets)
        self.layer = FlameLayer(self.assets).eval()
        self.faces = self.assets.model.faces
        self.head = self.assets.topology.subsets["head"]
        self.recipe, self.seed, self.cfg = recipe, recipe["seed"], recipe["sampling"]
        self.renderers: dict = {}
        self.albedos: dict = {}
        self.torso = ellipsoid_mesh(TORSO_RADII, TORSO_EXPONENTS)
        self._torch = torch

    def renderer(self, size: tuple) -> Renderer:
        if size not in self.renderers:
            self.renderers[size] = Renderer(*size)
        return self.renderers[size]

    def albedo(self, rng: np.random.Generator) -> np.ndarray:
        """Per-vertex colours [V,3]: one of ALBEDO_BANK people (each made once, on the template mesh,
        so the colours travel with the surface), with a small per-image colour balance change."""
        from .synthetic_head import albedo

        k = int(rng.integers(ALBEDO_BANK))
        if k not in self.albedos:
            self.albedos[k] = albedo(self.assets.model.v_template, self.assets.topology,
                                     np.random.default_rng([self.seed, len(SPLITS), k]))
        return np.clip(self.albedos[k] * rng.uniform(0.92, 1.08, 3), 0.0, 1.0)

    def vertices(self, scene: Scene) -> np.ndarray:
        """[V,3] float64 model-space vertices, rounded to the annotation precision. One item at a
        time on one thread, so an item never depends on what else is computed with it."""
        torch = self._torch
        t = lambda a: torch.tensor(a[None], dtype=torch.float32)  # noqa: E731
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            with torch.no_grad():
                v = self.layer.vertices(t(scene.shape), t(scene.expression), t(scene.jaw))[0]
        finally:
            torch.set_num_threads(threads)
        return np.round(v.double().numpy(), VERTEX_DECIMALS)

    def chunk(self, split: str, start: int, stop: int) -> list[Item]:
        return [self.item(split, i) for i in range(start, stop)]

    def item(self, split: str, index: int) -> Item:
        rng = item_rng(self.seed, split, index)
        scene = sample_scene(rng, self.cfg, self.recipe["image_sizes"])
        verts = self.vertices(scene)

        width, height = scene.size
        mv, P = camera(scene, verts[self.head])
        colors = self.albedo(rng)
        light = sample_light(rng, scene.standard_light)
        renderer = self.renderer(scene.size)
        bg = background(rng, height, width)
        scenery = []
        if rng.random() < self.cfg["torso_prob"]:
            scenery.append((*self.torso, clothing(rng, self.torso[0]), torso_pose(rng, scene, mv, verts)))
        image, mask = renderer.render(verts.astype(np.float32), self.faces, colors, mv, P, background=bg,
                                      light=light, feather=FEATHER, scenery=scenery)
        head_px = project(verts[self.head], mv, P, height)
        x0, y0 = np.clip(np.floor(head_px.min(0)), 0, [width, height]).astype(int)
        x1, y1 = np.clip(np.ceil(head_px.max(0)), 0, [width, height]).astype(int)
        bbox = [int(x0), int(y0), int(x1 - x0), int(y1 - y0)]
        occluded = False
        if rng.random() < self.cfg["occluder_prob"]:
            occ = add_occluders(rng, image, landmarks_image(verts, mv, P, height, self.assets.topology), bbox)
            occluded = bool((occ & mask).sum() > 0.05 * max(mask.sum(), 1))
        degraded = False
        for name in DEGRADATIONS:  # a fixed order of draws, however the recipe lists them
            if rng.random() < self.cfg["degrade"].get(name, 0.0):
                image = DEGRADATIONS[name](rng, image)
                degraded = True
        item_id = f"{split}_{index:06d}"
        attributes = {"quality": "lq" if degraded else "hq", "gender": "undefined",
                      "expression": "true" if scene.expressive else "false", "age": "undefined",
                      "occlusions": "true" if occluded else "false", "pose": pose_attribute(*scene.angles),
                      "standard light": "true" if scene.standard_light else "false"}
        entry = {"item_id": item_id,
                 "annotation_path": f"{DATASET_DIR}/{split}/annotations/{item_id}.json",
                 "img_path": f"{DATASET_DIR}/{split}/images/{item_id}.png",
                 "bbox": bbox, "attributes": attributes}
        annotation = {"vertices": verts, "model_view_matrix": mv, "projection_matrix": P}
        return Item(item_id, image, mask, annotation, entry)


def write_item(root: Path, split: str, item: Item) -> None:
    """Image and annotation of one item under root/DAD-3DHeadsDataset (root = --out)."""
    ok, png = cv2.imencode(".png", cv2.cvtColor(item.image, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_PNG_COMPRESSION, 1])
    if not ok:
        raise RuntimeError(f"PNG encoding failed for {item.item_id}")
    atomic_write(root / item.entry["img_path"], png.tobytes())
    annotation = orjson.dumps(item.annotation, option=orjson.OPT_SERIALIZE_NUMPY)
    atomic_write(root / item.entry["annotation_path"], annotation)


# Worker processes: one Generator each, built by the pool initializer.
_WORKER: dict = {}


def _init_worker(flame_assets, recipe, root, pool: bool = False) -> None:
    if pool:  # one thread per worker process: torch, and llvmpipe rasterizing in the calling thread
        import torch

        torch.set_num_threads(1)
        os.environ.setdefault("LP_NUM_THREADS", "0")
    try:
        _WORKER.update(gen=Generator(flame_assets, recipe), root=Path(root))
    except Exception as e:  # re-raised by the first job (a pool respawns a failing initializer forever): none hidden
        _WORKER.update(error=e)


def _run_chunk(job: tuple) -> list[dict]:
    if "error" in _WORKER:
        raise _WORKER["error"]
    split, start, stop = job
    items = _WORKER["gen"].chunk(split, start, stop)
    for item in items:
        write_item(_WORKER["root"], split, item)
    return [item.entry for item in items]


def make_data(out: str | Path, recipe: dict, flame_assets: str | Path | None = None, workers: int | None = None,
              name: str = "custom") -> Path:
    """Render the data set ``recipe`` describes under ``out``; returns ``out/DAD-3DHeadsDataset``.

    recipe: a preset's ``data.synthetic`` ({splits: {split: n}, image_sizes: [[w, h], ...], seed,
    sampling}; missing keys take their defaults, :func:`dad3dlib.settings.synthetic_recipe`); ``name``
    labels it (progress bar, record). The FLAME assets are loaded (validated) first; the data set is
    rendered into a temporary folder in ``out`` and replaces the previous one only when complete, so
    a failed or interrupted run leaves ``out`` as it was.
    """
    import shutil
    import tempfile

    from .flame import load_flame_assets
    from .synthetic_head import default_flame_dir

    recipe = synthetic_recipe(recipe)
    # generate the default head once, in this process; bad assets fail here, before any worker
    flame_assets = str(Path(flame_assets).resolve()) if flame_assets is not None else str(default_flame_dir())
    load_flame_assets(flame_assets)
    root = Path(out)
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".make-data-", dir=root))  # same filesystem: renames are atomic
    try:
        record = _render(staging, recipe, name, flame_assets, workers)
        (staging / "make_data.json").write_text(json.dumps(record, indent=1))
        (root / "make_data.json").unlink(missing_ok=True)  # no record while the data set is swapped
        if (root / DATASET_DIR).exists():
            (root / DATASET_DIR).rename(staging / "previous")
        (staging / DATASET_DIR).rename(root / DATASET_DIR)
        os.replace(staging / "make_data.json", root / "make_data.json")  # written last
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return root / DATASET_DIR


def recorded_recipe(record: dict) -> dict | None:
    """The complete recipe a ``make_data.json`` record was made with (records written before recipes
    were params hold it as ``config`` + ``sampling`` + ``seed``); None when it cannot be told."""
    if "recipe" in record:
        return record["recipe"]
    try:
        return synthetic_recipe({"splits": record["config"]["splits"], "image_sizes": record["config"]["image_sizes"],
                                 "seed": record["seed"], "sampling": record["sampling"]})
    except (KeyError, TypeError, ValueError):
        return None


def why_make(out: str | Path, recipe: dict, flame_assets: str | Path | None = None) -> str:
    """Why ``out`` needs :func:`make_data` for ``recipe`` (complete) and these FLAME assets: "" when
    its ``make_data.json`` (written last) records this recipe and is newer than the FLAME model."""
    from .flame import MODEL_FILE
    from .synthetic_head import default_flame_dir

    record = Path(out) / "make_data.json"
    model = Path(flame_assets or default_flame_dir()) / MODEL_FILE
    if not record.is_file():
        return "no data set there yet" if not (Path(out) / DATASET_DIR).exists() else "no record of how it was made"
    try:
        made = recorded_recipe(json.loads(record.read_bytes()))
    except (OSError, ValueError) as e:
        return f"{record} is unreadable: {e}"
    if made != recipe:
        return "it was made from another recipe"
    return "it is older than the FLAME model" if model.stat().st_mtime > record.stat().st_mtime else ""


def _render(root: Path, recipe: dict, name: str, flame_assets: str, workers: int | None) -> dict:
    """Render every split of ``recipe`` under ``root/DAD-3DHeadsDataset``; returns the make_data.json record."""
    import multiprocessing as mp

    from tqdm import tqdm

    splits = recipe["splits"]
    for split in splits:
        for sub in ("images", "annotations"):
            (root / DATASET_DIR / split / sub).mkdir(parents=True, exist_ok=True)
    jobs = [(split, s, min(s + CHUNK, n)) for split, n in splits.items() for s in range(0, n, CHUNK)]
    total = sum(splits.values())
    workers = max(1, min(workers or os.cpu_count() or 1, len(jobs)))
    entries: dict = {split: [] for split in splits}
    start = time.perf_counter()
    init = (flame_assets, recipe, str(root))
    with tqdm(total=total, desc=f"make-data {name}", unit="img") as bar:
        if workers == 1:
            _init_worker(*init)
            results = map(_run_chunk, jobs)
        else:
            pool = mp.get_context("spawn").Pool(workers, initializer=_init_worker, initargs=init + (True,))
            results = pool.imap(_run_chunk, jobs)
        try:
            for job, chunk in zip(jobs, results):
                entries[job[0]] += chunk
                bar.update(len(chunk))
        finally:
            if workers > 1:
                pool.terminate()
            _WORKER.clear()
    for split, items in entries.items():
        atomic_write(root / DATASET_DIR / split / f"{split}.json", json.dumps(items).encode())
    seconds = time.perf_counter() - start
    return {"name": name, "recipe": recipe, "seed": recipe["seed"], "flame_assets": flame_assets, "workers": workers,
            "seconds": round(seconds, 2), "images_per_second": round(total / seconds, 2)}


def main(argv: list[str] | None = None) -> int:
    from .config import read_yaml, resolve
    from .errors import ParamsError

    ap = argparse.ArgumentParser(prog="python -m dad3dlib make-data", description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="smoke",
                    help="a preset (name in params/presets/ or a .yaml file) whose data.synthetic is the recipe")
    ap.add_argument("--out", required=True, help="output directory (DAD-3DHeadsDataset/ is created in it)")
    ap.add_argument("--flame-assets", default=None, help="FLAME-format directory (default: the synthetic head)")
    ap.add_argument("--seed", type=int, default=None, help="the recipe's seed instead of the preset's")
    ap.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")
    args = ap.parse_args(argv)
    path = resolve("presets", args.preset)
    recipe = (read_yaml(path).get("data") or {}).get("synthetic")
    if not recipe:
        raise ParamsError(f"{path}: no data.synthetic recipe (a preset for real data generates nothing)")
    if args.seed is not None:
        recipe = {**recipe, "seed": args.seed}
    try:
        recipe = synthetic_recipe(recipe)
    except ParamsError as e:
        raise ParamsError(f"{path}: {e}") from None
    out = make_data(args.out, recipe, args.flame_assets, args.workers, name=path.stem)
    record = json.loads((Path(args.out) / "make_data.json").read_text())
    print(f"wrote {out} in {record['seconds']} s ({record['images_per_second']} images/s)")
    return 0
