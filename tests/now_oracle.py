"""An independent numpy / scipy re-implementation of each step of the official NoW evaluation
(soubhiksanyal/now_evaluation: ``compute_error.py``, ``scan2mesh_computations.py``), in their order,
for tests/test_now_protocol.py; it uses nothing of dad3dlib (nor torch), so the stand-in for
psbody-mesh's nearest-point search (benchmarks/now_official/) can run it beside the official code.

1. read the scan (``.obj``), its 7 landmarks (a MeshLab ``.pp`` file, rows 8-14), the predicted
   mesh (``.obj``) and its 7 landmarks (``.npy``);
2. crop the scan's vertices to the sphere around the nose (centre nose bottom + 0.3·(nose bridge −
   nose bottom), radius 1.4 × (outer-eye distance + nose length) / 2, kept when <= radius);
3. map the prediction by MATLAB-style Procrustes of its landmarks onto the scan's (scaling,
   reflection 'best');
4. refine scale, rotation (axis-angle about the origin) and translation, minimising the squared
   scan-to-mesh distances plus (100·(|s| − s))² (here scipy's least_squares, to its optimum; the
   official code runs chumpy's dogleg, which stops when a step improves by less than 1e-4);
5. score each cropped scan vertex's exact distance to the refined mesh (closest point on a
   triangle by region tests, every triangle that can be nearest examined).
"""
from __future__ import annotations

import numpy as np
from scipy.optimize import least_squares
from scipy.spatial import cKDTree
from scipy.spatial.transform import Rotation


def read_obj(path) -> tuple[np.ndarray, np.ndarray]:
    v, f = [], []
    for line in open(path):
        parts = line.split()
        if parts and parts[0] == "v":
            v.append([float(x) for x in parts[1:4]])
        elif parts and parts[0] == "f":
            f.append([int(x.split("/")[0]) - 1 for x in parts[1:4]])
    return np.array(v), np.array(f)


def read_pp(path) -> np.ndarray:
    """Rows 8-14 of a MeshLab picked-points file, x= y= z= attributes, as float32 (the official reader's)."""
    out = np.zeros((7, 3), np.float32)
    lines = open(path).readlines()
    for k, line in enumerate(lines[8:15]):
        attrs = dict(tok.split("=", 1) for tok in line.split() if "=" in tok)
        out[k] = [float(attrs[a].split('"')[1]) for a in "xyz"]
    return out


def oracle_crop(scan_v: np.ndarray, lmk: np.ndarray) -> np.ndarray:
    bottom = lmk[4].astype(np.float64)
    bridge = (lmk[1].astype(np.float64) + lmk[2]) / 2
    centre = bottom + 0.3 * (bridge - bottom)
    radius = 1.4 * (np.linalg.norm(lmk[0].astype(np.float64) - lmk[3]) + np.linalg.norm(bridge - bottom)) / 2
    return scan_v[np.linalg.norm(scan_v - centre, axis=1) <= radius]


def oracle_procrustes(X: np.ndarray, Y: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
    """MATLAB's procrustes(X, Y) with scaling and reflection 'best': b, T, c with X ≈ b·Y·T + c."""
    X, Y = X.astype(np.float64), Y.astype(np.float64)
    muX, muY = X.mean(0), Y.mean(0)
    X0, Y0 = X - muX, Y - muY
    normX, normY = np.sqrt((X0 ** 2).sum()), np.sqrt((Y0 ** 2).sum())
    U, s, Vt = np.linalg.svd((X0 / normX).T @ (Y0 / normY))
    T = Vt.T @ U.T
    b = s.sum() * normX / normY
    return b, T, muX - b * muY @ T


def closest_on_triangles(p, a, b, c) -> tuple[np.ndarray, np.ndarray]:
    """Closest point of triangle (a, b, c) to p, by Voronoi regions (Ericson, Real-Time Collision
    Detection, 5.1.5), and where it lies: 0 inside, edges ab 1, bc 2, ca 3, corners a 4, b 5, c 6
    (psbody's AABB-tree codes).  all [K,3] -> [K,3], [K]"""
    dot = lambda u, v: np.einsum("ki,ki->k", u, v)  # noqa: E731
    ab, ac, ap, bp, cp = b - a, c - a, p - a, p - b, p - c
    d1, d2, d3, d4, d5, d6 = dot(ab, ap), dot(ac, ap), dot(ab, bp), dot(ac, bp), dot(ab, cp), dot(ac, cp)
    va, vb, vc = d3 * d6 - d5 * d4, d5 * d2 - d1 * d6, d1 * d4 - d3 * d2
    with np.errstate(divide="ignore", invalid="ignore"):
        denom = 1.0 / (va + vb + vc)
        inside = a + ab * (vb * denom)[:, None] + ac * (vc * denom)[:, None]
        on_ab = a + ab * (d1 / (d1 - d3))[:, None]
        on_ca = a + ac * (d2 / (d2 - d6))[:, None]
        on_bc = b + (c - b) * ((d4 - d3) / ((d4 - d3) + (d5 - d6)))[:, None]
    regions = [((d1 <= 0) & (d2 <= 0), a, 4), ((d3 >= 0) & (d4 <= d3), b, 5),
               ((vc <= 0) & (d1 >= 0) & (d3 <= 0), on_ab, 1), ((d6 >= 0) & (d5 <= d6), c, 6),
               ((vb <= 0) & (d2 >= 0) & (d6 <= 0), on_ca, 3), ((va <= 0) & (d4 - d3 >= 0) & (d5 - d6 >= 0), on_bc, 2)]
    point, part = inside.copy(), np.zeros(len(p), np.int64)
    for cond, q, code in reversed(regions):  # the first region that holds wins
        point[cond], part[cond] = q[cond], code
    return point, part


def nearest_on_mesh(points: np.ndarray, v: np.ndarray, f: np.ndarray) -> tuple[np.ndarray, ...]:
    """Each point's nearest triangle, the part of it (:func:`closest_on_triangles`), the closest
    point and its distance: every triangle whose centroid lies within (distance to the nearest vertex
    + its centroid-to-corner radius) is examined.  points [P,3], v [V,3], f [F,3] -> [P], [P], [P,3], [P]"""
    tri = v[f]
    centroid = tri.mean(1)
    radius = np.linalg.norm(tri - centroid[:, None], axis=-1).max(1)  # a triangle is >= |p - centroid| - radius away
    upper, _ = cKDTree(v).query(points)
    tree, k = cKDTree(centroid), min(48, len(f))
    dist, idx = tree.query(points, k=k)  # enough unless a farther centroid could still be near enough:
    dist, idx = dist.reshape(len(points), k), idx.reshape(len(points), k)
    full = np.flatnonzero(dist[:, -1] - radius.max() <= upper) if k < len(f) else np.arange(len(points))
    groups = tree.query_ball_point(points[full], upper[full] + radius.max() + 1e-9)
    keep = ~np.isin(np.arange(len(points)), full)
    pid = np.concatenate([np.repeat(np.flatnonzero(keep), k), np.repeat(full, [len(g) for g in groups])])
    tid = np.concatenate([idx[keep].reshape(-1), *[np.asarray(g, np.int64) for g in groups]])
    near = np.linalg.norm(points[pid] - centroid[tid], axis=1) - radius[tid] <= upper[pid] + 1e-9
    pid, tid = pid[near], tid[near]
    q, part = closest_on_triangles(points[pid], *(tri[tid, j] for j in range(3)))
    d = np.linalg.norm(points[pid] - q, axis=1)
    order = np.lexsort((d, pid))  # by point, nearest first
    first = order[np.r_[True, pid[order][1:] != pid[order][:-1]]]
    return tid[first], part[first], q[first], d[first]


def oracle_scan_to_mesh(points: np.ndarray, v: np.ndarray, f: np.ndarray) -> np.ndarray:
    """Exact distance of each point to the mesh surface.  points [P,3] -> [P]"""
    return nearest_on_mesh(points, v, f)[3]


def oracle_errors(scan_v, scan_lmk, pred_v, pred_f, pred_lmk) -> np.ndarray:
    """compute_errors: crop, Procrustes, refinement, scan-to-mesh distances [P]."""
    scan = oracle_crop(scan_v, scan_lmk)
    b, T, c = oracle_procrustes(scan_lmk, pred_lmk)
    aligned = b * pred_v @ T + c

    def moved(x):
        return x[0] * aligned @ Rotation.from_rotvec(x[1:4]).as_matrix().T + x[4:7]

    def residuals(x):
        return np.append(oracle_scan_to_mesh(scan, moved(x), pred_f), 100.0 * (abs(x[0]) - x[0]))

    fit = least_squares(residuals, np.array([1.0, 0, 0, 0, 0, 0, 0]), method="lm", xtol=1e-12, ftol=1e-12)
    return oracle_scan_to_mesh(scan, moved(fit.x), pred_f)


def pooled(distances: list[np.ndarray]) -> dict[str, float]:
    d = np.concatenate(distances)
    return {"median": float(np.median(d)), "mean": float(d.mean()), "std": float(d.std())}
