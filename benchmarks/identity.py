"""What stops a run from learning identity: the 3D shape error of a generated data set taken apart
(``make bench-identity``).

    python benchmarks/identity.py [--preset cpu] [--run RUN_DIR] [--noise 0 0.33 1.3]
                                  [--test-items N] [--train-items N] [--out FILE]

Generated data only: every item's scene (identity β, expression ψ, jaw) is drawn again from its
recipe (``synthetic_data.item_scene``). Everything is scored on the test split with the study's
metrics, at the ground-truth rotation as the crop shows it and its best weak perspective (as the
``camera_floor`` reference), so that only the mesh differs. Prints and saves (default outputs/bench/identity_<preset>.json):

1. **What each part of the mesh is worth**: the mean mm of the mean head, of the ground truth
   without identity (the best a network that learns no identity can score), with only its first k
   identity components, and so on.
2. **How far each part moves the visible face in the crop** (px, RMS over the face vertices facing
   the camera, after the 2D similarity a camera absorbs), beside the weak-perspective residual (the
   projection the camera model cannot express).
3. **A landmark reader**: identity, expression and jaw read off the 68 ground-truth landmarks (and
   the rotation) by ridge regression fitted on train, with Gaussian noise of ``--noise`` px per
   coordinate on the landmarks: what the landmarks' geometry allows at a given precision.
4. With ``--run``: how much of each group of components the run's network predicts (R² over the
   items, on test and on train; 0 is the mean, below 0 worse than the mean), the mean mm of its
   mesh with each part swapped for the ground truth, and its landmark error in crop px, to read
   against 3.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from dad3dlib import OUTPUTS_DIR  # noqa: E402
from dad3dlib.config import load_params, run_params  # noqa: E402
from dad3dlib.data import flame_dir, open_split  # noqa: E402
from dad3dlib.data_setup import ensure_data  # noqa: E402
from dad3dlib.evaluate import evaluate_predictor, mesh_views  # noqa: E402
from dad3dlib.files import atomic_write  # noqa: E402
from dad3dlib.flame import (CANONICAL_Z_OFFSET, N_EXPR, N_SHAPE, FlameLayer, fit_weak_perspective,  # noqa: E402
                            load_flame_assets, rot6d_to_matrix, split_3dmm, weak_perspective)
from dad3dlib.geometry import apparent_rotation, vertex_normals  # noqa: E402
from dad3dlib.metrics import similarity_align  # noqa: E402
from dad3dlib.model import load_model  # noqa: E402
from dad3dlib.references import at_gt_pose  # noqa: E402
from dad3dlib.settings import Settings  # noqa: E402
from dad3dlib.synthetic_data import item_scene  # noqa: E402

Tensor = torch.Tensor
PARTS = ("shape", "expression", "jaw")
GROUPS = {"identity 0-2": ("shape", 0, 3), "identity 3-9": ("shape", 3, 10), "identity 10-22": ("shape", 10, 23),
          "identity 23-49": ("shape", 23, 50), "identity 50-299": ("shape", 50, N_SHAPE),
          "expression 0-9": ("expression", 0, 10), "expression 10-99": ("expression", 10, N_EXPR),
          "jaw opening": ("jaw", 0, 1)}


# --------------------------------------------------------------------------------------------
# Items and their scenes
# --------------------------------------------------------------------------------------------
class Items:
    """The first ``n`` items of a split, their batches (loaded once) and their scenes' parameters
    {part: [N,k]} (``truth``)."""

    def __init__(self, settings: Settings, split: str, assets, n: int | None):
        ds = open_split(settings.data, split, assets)
        keep = list(range(len(ds)))[:n]
        self.dataset = torch.utils.data.Subset(ds, keep)
        self.dataset.items = [ds.items[i] for i in keep]  # what evaluate_predictor reads, by position
        self.batches = list(torch.utils.data.DataLoader(self.dataset, batch_size=100))  # "index": the position
        scenes = [item_scene(settings.data.synthetic, e["item_id"]) for e in self.dataset.items]
        self.truth = {p: np.stack([getattr(s, p) for s in scenes]).astype(np.float32) for p in PARTS}

    def cat(self, key: str) -> Tensor:
        return torch.cat([b[key] for b in self.batches])


def mean_mm(items: Items, layer: FlameLayer, values: dict[str, np.ndarray]) -> float:
    """The test items' mean of mean mm for meshes of ``values`` {part: [N,k]} at the GT pose."""
    def predictor(batch):
        i = batch["index"].numpy()
        params = at_gt_pose(batch, *(torch.from_numpy(values[p][i]) for p in PARTS))
        return mesh_views(layer, params, batch["image"].shape[-1], batch["crop_affine"].float())
    df, _, _ = evaluate_predictor(predictor, items.dataset, layer, batch_size=100, progress=False)
    return float(df["mean_mm"].mean())


def mixed(truth: dict, **parts) -> dict:
    """The ground truth with some parts replaced: a value, or None for zeros (the mean)."""
    return {p: (np.zeros_like(truth[p]) if parts[p] is None else parts[p]) if p in parts else truth[p] for p in PARTS}


# --------------------------------------------------------------------------------------------
# 1. What each part is worth
# --------------------------------------------------------------------------------------------
def decomposition(items: Items, layer: FlameLayer) -> dict[str, float]:
    t = items.truth
    rows = {"mean head": mixed(t, shape=None, expression=None, jaw=None),
            "ground truth without identity": mixed(t, shape=None),
            "ground truth without expression": mixed(t, expression=None),
            "ground truth without jaw": mixed(t, jaw=None),
            "identity only (no expression, jaw)": mixed(t, expression=None, jaw=None)}
    for k in (10, 23, 50, 100):
        rows[f"ground truth, identity components 0-{k - 1} only"] = mixed(
            t, shape=np.concatenate([t["shape"][:, :k], np.zeros_like(t["shape"][:, k:])], 1))
    return {name: mean_mm(items, layer, v) for name, v in rows.items()}


# --------------------------------------------------------------------------------------------
# 2. The image footprint of each part
# --------------------------------------------------------------------------------------------
def footprint(items: Items, layer: FlameLayer, faces: np.ndarray, face_ids: Tensor) -> dict[str, list[float]]:
    """Per part, the median [10th, 90th percentile] over the items of the RMS displacement (crop px)
    of the visible face vertices when the part is set to its mean, at the GT pose as the crop shows it
    (:func:`geometry.apparent_rotation`); and the weak-perspective residual (the true projection
    against the GT mesh's best weak perspective)."""
    t = items.truth
    drop = {"identity": dict(shape=None), "identity components 0-9": "shape:0:10",
            "identity components 10-22": "shape:10:23", "identity components 23-299": "shape:23:300",
            "expression": dict(expression=None), "jaw": dict(jaw=None)}
    out: dict[str, list] = {k: [] for k in (*drop, "weak-perspective residual")}
    for batch in items.batches:
        i = batch["index"].numpy()
        gt = {p: torch.from_numpy(t[p][i]) for p in PARTS}
        R, S = apparent_rotation(batch["rotation"].float(), batch["view_ray"].float()), batch["image"].shape[-1]
        v_gt = layer.vertices(gt["shape"], gt["expression"], gt["jaw"])
        s, tr = fit_weak_perspective(v_gt, R, batch["vertices_crop"].float(), S)

        def project(v):
            shift = torch.cat([tr, tr.new_zeros(len(tr), 1)], -1)
            return weak_perspective(v + v.new_tensor([0, 0, CANONICAL_Z_OFFSET]), R, shift, (s - 1)[:, None], S)[..., :2]

        normals = torch.from_numpy(np.stack([vertex_normals(v, faces) for v in v_gt.numpy()]))
        seen = ((normals @ R.transpose(1, 2))[..., 2] > 0.1)[:, face_ids].float()

        def rms(a, b):
            return ((a - similarity_align(b, b, a)).square().sum(-1).mul(seen).sum(1) / seen.sum(1)).sqrt()

        p_gt = project(v_gt)[:, face_ids]
        out["weak-perspective residual"] += rms(batch["vertices_crop"].float()[:, face_ids], p_gt).tolist()
        for name, how in drop.items():
            part = {k: v.clone() for k, v in gt.items()}
            if isinstance(how, str):
                p, a, b = how.split(":")
                part[p][:, int(a):int(b)] = 0
            else:
                part.update({p: torch.zeros_like(gt[p]) for p in how})
            out[name] += rms(p_gt, project(layer.vertices(part["shape"], part["expression"], part["jaw"]))[:, face_ids]).tolist()
    return {k: [round(float(np.percentile(v, q)), 3) for q in (50, 10, 90)] for k, v in out.items()}


# --------------------------------------------------------------------------------------------
# 3. A landmark reader
# --------------------------------------------------------------------------------------------
def reader_features(landmarks: np.ndarray, rotation: np.ndarray, noise: float = 0.0,
                    rng: np.random.Generator | None = None) -> np.ndarray:
    """68 landmarks [N,68,2] (crop px, plus Gaussian noise of ``noise`` px per coordinate), centred
    and scaled to unit RMS, beside a rotation's 9 entries [N,3,3]. -> [N, 68·2 + 9]"""
    lmk = landmarks.astype(np.float64)
    lmk = lmk + rng.normal(0.0, noise, lmk.shape) if noise else lmk
    lmk = lmk - lmk.mean(1, keepdims=True)
    lmk = lmk / np.sqrt(np.square(lmk).sum(2).mean(1))[:, None, None]
    return np.hstack([lmk.reshape(len(lmk), -1), rotation.reshape(len(lmk), -1)])


def ridge(x: np.ndarray, y: np.ndarray, alpha: float):
    """Ridge regression on standardized features: x [N,F], y [N,K] -> predict(x' [M,F]) -> [M,K]."""
    mu, sd, y0 = x.mean(0), x.std(0) + 1e-9, y.mean(0)
    a = (x - mu) / sd
    w = np.linalg.solve(a.T @ a + alpha * np.eye(a.shape[1]), a.T @ (y - y0))
    return lambda q: ((q - mu) / sd) @ w + y0


def read(train: Items, test: Items, layer: FlameLayer, x_train: np.ndarray, x_test: np.ndarray,
         alphas=(0.1, 10.0, 100.0, 1000.0)) -> dict:
    """A ridge reader of identity, expression and jaw from features [N_train,F] / [N_test,F]: the mean
    mm of its mesh (the ridge weight chosen on test, so an optimistic bound), and of the ground truth
    with only its identity, or only its expression and jaw, from the reader (the other parts at the
    truth / at the mean)."""
    y = np.hstack([train.truth[p] for p in PARTS])
    cuts = np.cumsum([train.truth[p].shape[1] for p in PARTS])[:-1]
    best = None
    for alpha in alphas:
        got = dict(zip(PARTS, (v.astype(np.float32) for v in np.split(ridge(x_train, y, alpha)(x_test), cuts, 1))))
        score = mean_mm(test, layer, got)
        if best is None or score < best[0]:
            best = (score, alpha, got)
    score, alpha, got = best
    return {"alpha": alpha, "reader": round(score, 3),
            "identity from the reader, the rest true": round(mean_mm(test, layer, mixed(test.truth, shape=got["shape"])), 3),
            "expression and jaw from the reader, mean identity": round(
                mean_mm(test, layer, mixed(test.truth, shape=None, expression=got["expression"], jaw=got["jaw"])), 3)}


def landmark_reader(train: Items, test: Items, layer: FlameLayer, noise: float) -> dict:
    """:func:`read` off the ground-truth landmarks with ``noise`` px per coordinate and the GT rotation."""
    rng = np.random.default_rng(0)
    x = [reader_features(s.cat("landmarks_2d").numpy(), s.cat("rotation").double().numpy(), noise, rng)
         for s in (train, test)]
    return {"noise_px": noise, **read(train, test, layer, *x)}


def print_reader(name: str, row: dict) -> None:
    print(f"   {name}: all parts {row['reader']:.3f}; its identity, the rest true "
          f"{row['identity from the reader, the rest true']:.3f}; its expression and jaw, mean identity "
          f"{row['expression and jaw from the reader, mean identity']:.3f}")


# --------------------------------------------------------------------------------------------
# 4. A run's network
# --------------------------------------------------------------------------------------------
@torch.no_grad()
def network_outputs(model, items: Items) -> dict[str, np.ndarray]:
    """The network's identity, expression and jaw {part: [N,k]}, its landmarks [N,68,2] (crop px), its
    rotation [N,3,3] and its landmark head's mean error per item [N] (crop px, visible landmarks)."""
    got = {k: [] for k in (*PARTS, "landmarks", "rotation", "landmark_error_px")}
    for batch in items.batches:
        out = model(batch["image"])
        p = split_3dmm(out["params_3dmm"].float())
        for k in PARTS:
            got[k].append(p[k].numpy())
        got["rotation"].append(rot6d_to_matrix(p["rot6d"]).double().numpy())
        lmk = out["landmarks_2d"].float() * batch["image"].shape[-1]
        got["landmarks"].append(lmk.numpy())
        d, vis = (lmk - batch["landmarks_2d"]).norm(dim=-1), (batch["visibility"] > 0).float()
        got["landmark_error_px"].append(((d * vis).sum(1) / vis.sum(1).clamp_min(1)).numpy())
    return {k: np.concatenate(v) for k, v in got.items()}


def r_squared(pred: np.ndarray, truth: np.ndarray) -> float:
    """1 - SSE / SST over items and components (0: the mean's score)."""
    return float(1 - np.square(pred - truth).sum() / np.square(truth - truth.mean(0)).sum())


def probe(got: dict, items: Items, layer: FlameLayer, with_swaps: bool) -> dict:
    """R² of each group of the network's components (:data:`GROUPS`) and its landmark error; with
    ``with_swaps``, the mean mm of its mesh and of each of its parts with the rest true."""
    row = {"R2": {g: round(r_squared(got[p][:, a:b], items.truth[p][:, a:b]), 3) for g, (p, a, b) in GROUPS.items()},
           "landmark_error_px": round(float(got["landmark_error_px"].mean()), 2)}
    if with_swaps:
        t, mine = items.truth, {p: got[p] for p in PARTS}
        row["mean_mm"] = {"the network's mesh": mean_mm(items, layer, mine),
                          "the network's identity, the rest true": mean_mm(items, layer, mixed(t, shape=got["shape"])),
                          "the network's expression and jaw, the rest true": mean_mm(
                              items, layer, mixed(t, expression=got["expression"], jaw=got["jaw"]))}
    return row


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="cpu", help="the data set of this preset (ignored with --run)")
    ap.add_argument("--run", default=None, help="a run directory (params.yaml, checkpoints/last.ckpt)")
    ap.add_argument("--noise", type=float, nargs="*", default=[0.0, 0.33, 1.3],
                    help="landmark noise (px per coordinate) of the landmark reader")
    ap.add_argument("--test-items", type=int, default=None, help="score on the first N test items")
    ap.add_argument("--train-items", type=int, default=None, help="fit the reader on the first N train items")
    ap.add_argument("--sections", type=int, nargs="*", default=[1, 2, 3, 4], choices=[1, 2, 3, 4],
                    help="which of the sections above to compute (4 needs --run)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None, help="JSON results (default outputs/bench/identity_<preset>.json)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.run:  # a run's data set as it was trained on: never generated again here
        params = load_params(Path(args.run) / "params.yaml")
    else:
        params = run_params(args.preset)
        ensure_data(params)
    settings = Settings.parse(params)
    if not settings.data.synthetic:
        raise SystemExit("error: identity.py needs a generated data set (data.synthetic): the scenes are drawn again")
    assets = load_flame_assets(flame_dir(settings.data))
    layer = FlameLayer(assets).eval()
    faces = np.asarray(assets.model.faces)
    face_ids = torch.as_tensor(assets.topology.subsets["face"])
    test = Items(settings, "test", assets, args.test_items)
    train = Items(settings, "train", assets, args.train_items)
    S = settings.data.crop_size
    result = {"data": str(settings.data.root), "crop_size": S, "test_items": len(test.dataset),
              "train_items": len(train.dataset)}

    if 1 in args.sections:
        result["decomposition_mean_mm"] = decomposition(test, layer)
        print(f"1. mean mm on {len(test.dataset)} test items, GT pose:")
        for k, v in result["decomposition_mean_mm"].items():
            print(f"   {k:52s} {v:6.3f}")
    if 2 in args.sections:
        result["footprint_px"] = footprint(test, layer, faces, face_ids)
        print(f"2. RMS displacement of the visible face in the {S}-px crop, median [10th, 90th percentile]:")
        for k, (m, lo, hi) in result["footprint_px"].items():
            print(f"   {k:52s} {m:5.2f} [{lo:.2f}, {hi:.2f}] px")
    if 3 in args.sections:
        result["landmark_reader"] = [landmark_reader(train, test, layer, n) for n in args.noise]
        print(f"3. a ridge reader of the 68 GT landmarks + GT rotation, fitted on {len(train.dataset)} train items "
              "(mean mm):")
        for row in result["landmark_reader"]:
            print_reader(f"noise {row['noise_px']:4.2f} px", row)
    if args.run and 4 in args.sections:
        model, _ = load_model(Path(args.run) / "checkpoints" / "last.ckpt")
        model.eval()
        got = {"test": network_outputs(model, test), "train": network_outputs(model, train)}
        result["network"] = {"test": probe(got["test"], test, layer, True), "train": probe(got["train"], train, layer, False)}
        x = [reader_features(got[s]["landmarks"], got[s]["rotation"]) for s in ("train", "test")]
        result["network"]["reader_of_its_landmarks"] = read(train, test, layer, *x)
        print(f"4. the network of {args.run}:")
        for split in ("test", "train"):
            row = result["network"][split]
            print(f"   {split}: landmark error {row['landmark_error_px']} px; R2 " +
                  ", ".join(f"{g} {v:+.3f}" for g, v in row["R2"].items()))
        for k, v in result["network"]["test"]["mean_mm"].items():
            print(f"   test, {k:50s} {v:6.3f} mm")
        print_reader("a ridge reader of its own landmarks and rotation", result["network"]["reader_of_its_landmarks"])
    out = Path(args.out) if args.out else OUTPUTS_DIR / "bench" / f"identity_{params.get('preset', 'run')}.json"
    atomic_write(out, json.dumps(result, indent=1).encode())
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
