"""``make bench-eval``: throughput of each metric on FLAME-sized meshes and of the benchmark CLI.

Prints samples/s per metric (batches of random heads of the FLAME assets: 5,023 vertices on FLAME,
5,000 on the project's synthetic head; CPU) and the benchmark CLI's time per item end to end
(JSON parsing included) on a synthetic GT/submission pair in the reference formats. The
reference evaluator takes about 2 s per item on this kind of machine.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from dad3dlib import benchmark as BM
from dad3dlib import metrics as M
from dad3dlib.flame import ALIGN7, N_EXPR, N_SHAPE, FlameLayer, load_flame_assets
from dad3dlib.synthetic_head import default_flame_dir

REFERENCE_S_PER_ITEM = 2.0


def _timed(fn, repeats: int) -> float:
    """Best wall time of ``repeats`` calls after one warm-up."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def _rotations(b: int, rng) -> np.ndarray:
    q, r = np.linalg.qr(rng.normal(size=(b, 3, 3)))
    q = q * np.sign(np.diagonal(r, axis1=1, axis2=2))[:, None]
    return q * np.linalg.det(q)[:, None, None]


def random_heads(layer: FlameLayer, n: int, gen: torch.Generator, sigma: float = 1.0) -> tuple[Tensor, Tensor]:
    """GT and predicted model-space heads [n,V,3]: random identity/expression, and the same
    coefficients perturbed (a few-millimetre error, like a trained network's)."""
    coeffs = torch.randn(n, N_SHAPE + N_EXPR, generator=gen) * sigma
    noisy = coeffs + 0.3 * torch.randn(coeffs.shape, generator=gen)
    jaw = torch.zeros(n, 3)
    with torch.no_grad():
        return tuple(layer.vertices(c[:, :N_SHAPE], c[:, N_SHAPE:], jaw).double() for c in (coeffs, noisy))


def metric_table(layer: FlameLayer, topo, batch: int, repeats: int) -> list[tuple[str, float]]:
    """samples/s of each metric on a batch of heads."""
    rng, gen = np.random.default_rng(0), torch.Generator().manual_seed(0)
    gt, pred = random_heads(layer, batch, gen)
    scorer = BM.Scorer(topo)
    faces, z_n, face = scorer.faces, scorer.z_n, scorer.face
    lmk_gt, lmk_pred = scorer.landmarks68(gt), scorer.landmarks68(pred)
    R_gt = torch.as_tensor(_rotations(batch, rng))
    R_pred = torch.as_tensor(_rotations(batch, rng))
    bbox = torch.tensor([[0.0, 0, 200, 220]] * batch, dtype=torch.float64)
    a7 = list(ALIGN7)
    cases = {
        "nme_reprojection": lambda: M.nme_reprojection(lmk_pred[..., :2], lmk_gt[..., :2], bbox),
        "pose_error + angle_error_deg": lambda: (M.pose_error(R_pred, R_gt), M.angle_error_deg(R_pred, R_gt)),
        "yaw_pitch_roll_error_deg": lambda: M.yaw_pitch_roll_error_deg(R_pred, R_gt),
        "z5_accuracy (reference pairing)": lambda: M.z_n_accuracy_reference(pred[:, z_n].float(),
                                                                           gt[:, z_n].float()),
        "z5_accuracy_local": lambda: M.z_n_accuracy_local(pred[:, z_n].float(), gt[:, z_n].float()),
        "chamfer (reference)": lambda: M.chamfer_reference(pred, lmk_pred[:, a7], gt, lmk_gt, face),
        "shape_error_mm": lambda: M.shape_error_mm(pred, lmk_pred[:, a7], gt[:, face], lmk_gt[:, a7], faces),
        "shape_error_mm, NoW protocol": lambda: M.shape_error_mm(pred, lmk_pred[:, a7], gt, lmk_gt[:, a7], faces,
                                                                 "now"),
    }
    return [(name, batch / _timed(fn, repeats)) for name, fn in cases.items()]


def synthetic_files(layer: FlameLayer, topo, n_items: int, root: Path) -> tuple[Path, Path]:
    """A GT file and a submission with errors, in the reference formats."""
    rng, gen = np.random.default_rng(1), torch.Generator().manual_seed(1)
    gt_v, pred_v = (v.numpy() for v in random_heads(layer, n_items, gen))
    scorer = BM.Scorer(topo)
    proj = np.array([[900.0, 0, -128, 0], [0, 900, -128, 0], [0, 0, -1.002, -0.2], [0, 0, -1, 0]])
    gt, sub = [], {}
    for k, (R, v, pv) in enumerate(zip(_rotations(n_items, rng), gt_v, pred_v)):
        mv = np.eye(4)
        mv[:3, :3], mv[:3, 3] = np.diag([1.0, -1.0, -1.0]) @ R, [0.0, 0.0, -1.0]
        pred_world = pv @ mv[:3, :3].T + mv[:3, 3]
        lmk = scorer.landmarks68(torch.as_tensor(-pred_world[None]))[0].numpy()
        item = f"{k:05d}"
        gt.append({"id": item, "bbox": [20, 20, 200, 200], "vertices": v.tolist(), "model_view_matrix": mv.tolist(),
                   "projection_matrix": proj.tolist(), "image_height": 256,
                   "attributes": {"quality": ["hq", "lq"][k % 2]}})
        sub[item] = {"68_landmarks_2d": rng.uniform(0, 256, size=(68, 2)).tolist(),
                     "N_landmarks_3d": (-pred_world).tolist(), "7_landmarks_3d": lmk[list(ALIGN7)].tolist(),
                     "rotation_matrix": R.tolist()}
    (root / "gt.json").write_text(json.dumps(gt))
    (root / "sub.json").write_text(json.dumps(sub))
    return root / "gt.json", root / "sub.json"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--flame-assets", type=Path, default=None,
                    help="FLAME-format directory with the model (default: the project's synthetic head)")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--items", type=int, default=64, help="items in the synthetic benchmark files")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    assets = load_flame_assets(args.flame_assets or default_flame_dir())
    layer, topo = FlameLayer(assets), assets.topology
    n_vert = layer.n_vertices
    print(f"metrics on {n_vert}-vertex meshes ({len(topo.faces)} faces), batch {args.batch}, "
          f"{args.threads} thread(s), CPU")
    print(f"  {'metric':<34}{'samples/s':>12}")
    for name, rate in metric_table(layer, topo, args.batch, args.repeats):
        print(f"  {name:<34}{rate:>12.1f}")
    with tempfile.TemporaryDirectory() as tmp:
        gt_path, sub_path = synthetic_files(layer, topo, args.items, Path(tmp))
        megabytes = (gt_path.stat().st_size + sub_path.stat().st_size) / 1e6
        t0, c0 = time.perf_counter(), time.process_time()
        result = BM.run(gt_path, sub_path, assets.path)
        total, cpu = time.perf_counter() - t0, time.process_time() - c0
        t0 = time.perf_counter()
        BM.read_ground_truth(gt_path, n_vert), BM.read_submission(sub_path)
        parse = time.perf_counter() - t0
    n = result["n_items"]
    print(f"\nbenchmark CLI on {n} items ({megabytes / n:.2f} MB of JSON per item), end to end:")
    print(f"  {'total per item':<34}{total / n * 1e3:>9.1f} ms  ({REFERENCE_S_PER_ITEM * n / total:.0f}x the "
          f"reference's ~{REFERENCE_S_PER_ITEM:.0f} s)")
    print(f"  {'  (CPU time of this process)':<34}{cpu / n * 1e3:>9.1f} ms")
    print(f"  {'  reading the two files (orjson)':<34}{parse / n * 1e3:>9.1f} ms")
    print(f"  {'  the rest (checks, scoring, start)':<34}{(total - parse) / n * 1e3:>9.1f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
