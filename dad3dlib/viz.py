"""Figures: small functions that render heads and compose image grids.

Shapes: V vertices, F faces, H x W images (uint8 RGB, top-down).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import cv2
import numpy as np

from .files import atomic_write

def orbit_camera(yaw_deg: float, pitch_deg: float, centre, distance: float, size: int,
                 field_m: float) -> tuple[np.ndarray, np.ndarray]:
    """Model-view [4,4] and projection [4,4] (docs/ARCHITECTURE.md convention) of a camera on a
    sphere around ``centre`` (yaw about y, positive shows the subject's left cheek; pitch about
    x, positive looks from above), seeing ``field_m`` metres across a square image of ``size``."""
    from scipy.spatial.transform import Rotation

    from .geometry import perspective_projection

    R = Rotation.from_euler("xy", [pitch_deg, -yaw_deg], degrees=True).as_matrix()
    mv = np.eye(4)
    mv[:3, :3] = R
    mv[:3, 3] = -R @ np.asarray(centre, float) + (0.0, 0.0, -distance)
    p = perspective_projection(size * distance / field_m, size / 2, size / 2, 0.1 * distance, 10 * distance)
    return mv, p


def render_views(renderer, vertices: np.ndarray, faces: np.ndarray, colors: np.ndarray, views, centre,
                 field_m: float, background: int = 255) -> list[np.ndarray]:
    """One image [H,W,3] per (yaw, pitch) view of a mesh: vertices [V,3], faces [F,3], colors [V,3]."""
    size = renderer.width
    bg = np.full((size, size, 3), background, np.uint8)
    out = []
    for yaw, pitch in views:
        mv, p = orbit_camera(yaw, pitch, centre, 1.0, size, field_m)
        out.append(renderer.render(vertices, faces, colors, mv, p, background=bg)[0])
    return out


def label(image: np.ndarray, text: str, scale: float = 0.45) -> np.ndarray:
    """The image [H,W,3] with a caption in its top-left corner."""
    image = np.ascontiguousarray(image)
    cv2.putText(image, text, (6, 18), cv2.FONT_HERSHEY_SIMPLEX, scale, (40, 40, 40), 1, cv2.LINE_AA)
    return image


def title_bar(text: str, width: int, height: int = 26) -> np.ndarray:
    """[height,width,3] white bar with a left-aligned title."""
    bar = np.full((height, width, 3), 255, np.uint8)
    cv2.putText(bar, text, (8, height - 8), cv2.FONT_HERSHEY_SIMPLEX, 0.55, (0, 0, 0), 1, cv2.LINE_AA)
    return bar


def save_png(image: np.ndarray, path: str | Path) -> Path:
    """Write an RGB image atomically (tmp file + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ok, buf = cv2.imencode(".png", cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    if not ok:
        raise RuntimeError(f"{path}: PNG encoding failed")
    atomic_write(path, buf.tobytes())
    return path


def head_title(assets) -> str:
    """What a head model is: the project's synthetic head, or the FLAME-format model of a directory."""
    from .synthetic_head import default_flame_dir

    if assets.path is not None and Path(assets.path).resolve() == default_flame_dir(make=False).resolve():
        return "synthetic FLAME-compatible head"
    return f"FLAME-format head model: {assets.path}"


def show_head(assets, out_png: str | Path, seed: int = 0, tile: int = 160, columns: int = 6) -> Path:
    """The mean head from the front, at 3/4 and in profile, then rows of random identities
    (β ~ N(0,1)), random expressions (ψ ~ N(0,1)) of one identity, and jaw openings from 0 to
    0.4 rad, each with a random albedo, rendered with :mod:`dad3dlib.render`. -> out_png"""
    import torch

    from .flame import N_EXPR, N_SHAPE, FlameLayer
    from .render import Renderer
    from .synthetic_head import albedo

    rng = np.random.default_rng(seed)
    layer = FlameLayer(assets)
    faces = assets.topology.faces
    n = columns

    def mesh(shape, expression, jaw) -> np.ndarray:  # [n,k] numpy -> [n,V,3]
        f = lambda a: torch.as_tensor(a, dtype=torch.float32)  # noqa: E731
        with torch.no_grad():
            return layer.vertices(f(shape), f(expression), f(jaw)).numpy()

    template = assets.model.v_template
    head = template[assets.topology.subsets["head"]]
    centre = 0.5 * (head.min(0) + head.max(0)) - (0.0, 0.02, 0.0)
    field = 1.45 * float(np.ptp(head, axis=0).max())
    big = Renderer(tile * n // 3, tile * n // 3)
    small = Renderer(tile, tile)
    mean_colors = albedo(template, assets.topology, np.random.default_rng(seed))
    top = render_views(big, template, faces, mean_colors, [(0, 0), (40, 5), (90, 0)], centre, field)
    top = [label(im, t) for im, t in zip(top, ("mean head: front", "3/4", "profile"))]

    zeros = lambda k: np.zeros((n, k))  # noqa: E731
    shapes = rng.normal(size=(n, N_SHAPE))
    rows = {
        f"random identities (shape ~ N(0,1)), seed {seed}": mesh(shapes, zeros(N_EXPR), zeros(3)),
        "random expressions (expression ~ N(0,1)), one identity": mesh(
            np.repeat(shapes[:1], n, 0), rng.normal(size=(n, N_EXPR)), zeros(3)),
        "jaw opening 0 to 0.4 rad (pitch)": mesh(
            np.repeat(shapes[1:2], n, 0), zeros(N_EXPR), np.stack([np.linspace(0, 0.4, n), np.zeros(n), np.zeros(n)], 1)),
    }
    parts = [title_bar(head_title(assets), tile * n), np.concatenate(top, 1)]
    for title, verts in rows.items():
        tiles = []
        for i, v in enumerate(verts):
            yaw = rng.uniform(-35, 35)
            colors = albedo(v, assets.topology, rng)
            img = render_views(small, v, faces, colors, [(yaw, rng.uniform(-5, 10))], centre, field)[0]
            tiles.append(label(img, f"yaw {yaw:+.0f}", 0.35))
        parts += [title_bar(title, tile * n), np.concatenate(tiles, 1)]
    return save_png(np.concatenate(parts, 0), out_png)


def main_show_head(argv: list[str] | None = None) -> int:
    """``python -m dad3dlib show-head --out FILE.png [--flame-assets DIR] [--seed N]``"""
    from .data import flame_dir
    from .flame import load_flame_assets

    ap = argparse.ArgumentParser(prog="dad3dlib show-head", description=show_head.__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, type=Path, help="PNG to write")
    ap.add_argument("--flame-assets", type=Path, default=None,
                    help="FLAME-format directory (default: the project's synthetic head)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    try:
        out = show_head(load_flame_assets(flame_dir({"flame_path": args.flame_assets})), args.out, args.seed)
    except ValueError as e:  # FlameFormatError: one line naming the file
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


# --------------------------------------------------------------------------------------------
# Data grids (show-data): samples with GT landmarks and the projected mesh overlaid, beside the
# crops the loader produces
# --------------------------------------------------------------------------------------------
PANEL = 256  # display size of each panel (pixels)


def draw_overlay(image: np.ndarray, vertices_2d: np.ndarray | None, edges: np.ndarray | None,
                 landmarks: np.ndarray | None, visibility: np.ndarray | None = None, bbox=None,
                 size: int = PANEL) -> np.ndarray:
    """image [H,W,3] uint8 RGB scaled so its longest side is ``size``, with the mesh wireframe
    (vertices_2d [V,2] image pixels, edges [E,2]) blended in, landmarks [68,2] as dots (red where
    visibility [68] is 0), and the bbox (x, y, w, h). Returns [size,size,3] (padded)."""
    h, w = image.shape[:2]
    s = size / max(h, w)
    canvas = np.zeros((size, size, 3), np.uint8)
    img = cv2.resize(image, (round(w * s), round(h * s)),
                     interpolation=cv2.INTER_AREA if s < 1 else cv2.INTER_LINEAR)
    canvas[: img.shape[0], : img.shape[1]] = img
    fix = lambda p: np.round((np.asarray(p, np.float64) * s - 0.5) * 16).astype(np.int32)  # noqa: E731
    if vertices_2d is not None:
        wire = canvas.copy()
        cv2.polylines(wire, list(fix(vertices_2d)[edges]), False, (80, 220, 255), 1, cv2.LINE_AA, shift=4)
        canvas = cv2.addWeighted(canvas, 0.6, wire, 0.4, 0)
    if bbox is not None:
        x, y, bw, bh = bbox
        cv2.rectangle(canvas, tuple(fix([x, y])), tuple(fix([x + bw, y + bh])), (255, 255, 0), 1, cv2.LINE_AA,
                      shift=4)
    if landmarks is not None:
        vis = np.ones(len(landmarks)) if visibility is None else np.asarray(visibility)
        for p, v in zip(fix(landmarks), vis):
            cv2.circle(canvas, tuple(p), 2 * 16, (0, 255, 0) if v > 0 else (255, 40, 40), -1, cv2.LINE_AA, shift=4)
    return canvas


def _caption(panel: np.ndarray, text: str) -> np.ndarray:
    cv2.putText(panel, text, (4, PANEL - 6), cv2.FONT_HERSHEY_SIMPLEX, 0.38, (0, 0, 0), 3, cv2.LINE_AA)
    cv2.putText(panel, text, (4, PANEL - 6), cv2.FONT_HERSHEY_SIMPLEX, 0.38, (255, 255, 255), 1, cv2.LINE_AA)
    return panel


def show_data(data: str | Path, out: str | Path, split: str = "train", n: int = 12, crop_size: int = 128,
              flame_assets: str | Path | None = None, seed: int = 0, columns: int = 4,
              cache_dir: str | Path | None = None) -> Path:
    """Write a grid of ``n`` samples: [image + projected mesh + GT landmarks + bbox | loader crop
    (training augmentation) + crop landmarks + heatmap maxima] per sample. flame_assets None: the
    FLAME directory the data were made with (else the synthetic head); cache_dir: the loader's
    cache (None: its default)."""
    import torch

    from .data import DAD3DHeadsDataset, denormalize_image, flame_dir, read_image
    from .geometry import apply_affine, edge_counts
    from .flame import load_flame_assets

    assets = load_flame_assets(flame_dir({"root": data, "flame_path": flame_assets}), require_model=False)
    ds = DAD3DHeadsDataset(data, split, crop_size, assets, train=True, augment=True, cache_dir=cache_dir)
    edges = edge_counts(assets.topology.faces)[0]
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    pairs = []
    for i in sorted(rng.choice(len(ds), size=min(n, len(ds)), replace=False)):
        entry, sample = ds.items[i], ds[int(i)]
        image = read_image(ds.index.images[i])
        A = sample["crop_affine"].double().numpy()
        Ainv = np.linalg.inv(np.vstack([A, [0, 0, 1]]))[:2]
        verts = apply_affine(Ainv, sample["vertices_crop"].double().numpy()) if "vertices_crop" in sample else None
        left = draw_overlay(image, verts, edges, sample.get("landmarks_2d_image"), bbox=entry["bbox"])
        a = entry.get("attributes", {})
        flags = [a.get("pose", ""), a.get("quality", "")] + [name for key, name in (("occlusions", "occl"),
                 ("expression", "expr")) if a.get(key) == "true"]
        _caption(left, " ".join([entry["item_id"]] + flags))
        crop = denormalize_image(sample["image"])
        if "heatmaps" in sample:
            hm = 0.35 * cv2.resize(sample["heatmaps"].amax(0).numpy(), (crop_size, crop_size))[..., None]
            crop = np.clip(crop * (1 - hm) + np.array([255, 0, 255]) * hm, 0, 255).astype(np.uint8)
        right = draw_overlay(crop, None, None, sample.get("landmarks_2d"), sample.get("visibility"))
        pairs += [left, _caption(right, f"loader crop {crop_size}px")]
    gap = np.full((PANEL, 4, 3), 255, np.uint8)
    cells = [np.concatenate([pairs[k], pairs[k + 1], gap], 1) for k in range(0, len(pairs), 2)]
    while len(cells) % columns:
        cells.append(np.full_like(cells[0], 255))
    rows = [np.concatenate(cells[r: r + columns], 1) for r in range(0, len(cells), columns)]
    grid = np.concatenate([np.concatenate([r, np.full((4, r.shape[1], 3), 255, np.uint8)], 0) for r in rows], 0)
    return save_png(grid, out)


def main_show_data(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m dad3dlib show-data",
                                 description="a grid of data samples with overlays and loader crops")
    ap.add_argument("--data", required=True, help="folder holding DAD-3DHeadsDataset/ (or that folder)")
    ap.add_argument("--out", required=True, help="PNG file to write")
    ap.add_argument("--split", default="train")
    ap.add_argument("-n", type=int, default=12, help="number of samples")
    ap.add_argument("--crop-size", type=int, default=128)
    ap.add_argument("--flame-assets", default=None,
                    help="FLAME-format directory (default: the one the data were made with, else the synthetic head)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    try:
        out = show_data(args.data, args.out, args.split, args.n, args.crop_size, args.flame_assets, args.seed)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0
