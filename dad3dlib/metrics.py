"""The study's metrics (README, "Metrics per run"), batched torch, CPU or GPU.

Every function takes a batch and returns one value per sample ([B] or [B,k]); aggregate with a
mean (or median) over the split. :data:`METRICS` registers one record per metric of the study
(label, direction, precision, where it is shown, how the evaluation and the benchmark compute it);
every list of metrics derives from it. NME, the rotation metrics and the reference Z_n are plain torch (the
training loop uses them); the others import pytorch3d (and, on CPU, scipy) inside.

Shapes: B batch, V vertices, N points of a subset, L landmarks, F faces.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, fields
from typing import Callable

import numpy as np
import torch
from torch import Tensor

from .flame import ALIGN7, FlameLayer, TopologyTensors, rot6d_to_matrix, split_3dmm
from .geometry import apparent_rotation, crop_to_image, flip_yz

MM_PER_METRE = 1000.0
Z_N = 5                     # Z_n accuracy at n = 5 (the reference benchmark's Z5)
INTER_EYE_UNITS = 20.0      # the reference benchmark scales GT so that |lmk39 - lmk42| = 20
INNER_EYE_CORNERS = (39, 42)
_MIN_TRIANGLE_AREA_MM2 = 1e-6  # pytorch3d treats smaller triangles as degenerate (default 5e-3)
# CPU point-to-surface pruning: triangles split at these radius quantiles; the last tier (the
# largest triangles) is bound-tested against every point, the others searched by KD-tree.
_RADIUS_TIERS = (0.7, 0.95, 0.99)
Z_N = 5  # the n of the Z_n depth-order accuracies
FLAME_MESH = "N_landmarks_3d on the FLAME topology"  # benchmark pseudo-key: N_landmarks_3d with N = V


# --------------------------------------------------------------------------------------------
# 2D landmarks
# --------------------------------------------------------------------------------------------
def nme_reprojection(pred: Tensor, gt: Tensor, bbox: Tensor) -> Tensor:
    """Mean landmark distance over sqrt(w·h) of the GT bbox, ×100.

    pred [B,L,2], gt [B,L,2] image pixels, bbox [B,4] (x, y, w, h) -> [B]
    """
    dist = torch.linalg.vector_norm(pred - gt, dim=-1).mean(dim=-1)
    return dist / torch.sqrt(bbox[:, 2] * bbox[:, 3]) * 100.0


# --------------------------------------------------------------------------------------------
# Neighbours
# --------------------------------------------------------------------------------------------
def knn(query: Tensor, points: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The k nearest ``points`` of each query point, nearest first (exact).

    CUDA: pytorch3d.ops.knn_points; CPU: scipy's cKDTree (about 10x pytorch3d's brute-force CPU
    kernel on FLAME-sized sets, and memory-bounded).
    query [B,P,3], points [B,Q,3] -> squared distances [B,P,k] (query dtype), ids [B,P,k] long
    """
    if query.is_cuda:
        from pytorch3d.ops import knn_points

        r = knn_points(query.float(), points.float(), K=k)
        return r.dists.to(query.dtype), r.idx
    from scipy.spatial import cKDTree

    found = [cKDTree(p).query(q, k=[*range(1, k + 1)])
             for q, p in zip(query.detach().double().numpy(), points.detach().double().numpy())]
    dist = torch.as_tensor(np.stack([d for d, _ in found]), dtype=query.dtype)
    return dist.square(), torch.as_tensor(np.stack([i for _, i in found]), dtype=torch.long)


# --------------------------------------------------------------------------------------------
# Depth order (Z_n)
# --------------------------------------------------------------------------------------------
def _depth_agreement(pred_z: Tensor, gt_z: Tensor, partner: Tensor) -> Tensor:
    """Fraction of pairs (i, partner[i, k]) whose depth order agrees.

    pred_z [B,N], gt_z [B,N], partner [B,N,K] long -> [B]
    """
    B, N, K = partner.shape
    flat = partner.reshape(B, N * K)
    gt_j = torch.gather(gt_z, 1, flat).view(B, N, K)
    pred_j = torch.gather(pred_z, 1, flat).view(B, N, K)
    agree = (gt_z[:, :, None] >= gt_j) == (pred_z[:, :, None] >= pred_j)
    return agree.to(pred_z.dtype).mean(dim=(1, 2))


def z_n_accuracy_local(pred: Tensor, gt: Tensor, n: int = 5) -> Tensor:
    """Z_n as the paper defines it: each GT point against its n nearest GT neighbours (3D).

    A pair (i, j) agrees when (gt_i.z >= gt_j.z) == (pred_i.z >= pred_j.z).
    pred [B,N,3], gt [B,N,3] (same vertex order) -> [B]
    """
    B, N, _ = gt.shape
    _, idx = knn(gt, gt, n + 1)  # [B,N,n+1], self (distance 0) first
    # Drop the point itself wherever it sits (duplicates may come first); else drop the last.
    is_self = idx == torch.arange(N, device=idx.device)[None, :, None]
    rank = torch.arange(n + 1, device=idx.device) + is_self.long() * (n + 1)
    keep = torch.argsort(rank.expand_as(idx), dim=-1)[..., :n]
    partner = torch.gather(idx, 2, keep)
    return _depth_agreement(pred[..., 2], gt[..., 2], partner)


def z_n_accuracy_reference(pred: Tensor, gt: Tensor, n: int = 5) -> Tensor:
    """Z_n with the reference benchmark's pairing (the published numbers).

    The reference argsorts the GT distance matrix along dim 0 and takes columns 1..n: point i is
    paired with the i-th nearest GT point of each of the points 1..n. Only those n columns of the
    distance matrix are needed, so this is O(N·n) memory.
    pred [B,N,3], gt [B,N,3] -> [B]
    """
    cols = gt[:, 1:n + 1]                                   # [B,n,3]
    dist = torch.cdist(gt, cols)                            # [B,N,n], as the reference's columns
    partner = torch.argsort(dist, dim=1)                    # [B,N,n]: rank i -> point id
    return _depth_agreement(pred[..., 2], gt[..., 2], partner)


# --------------------------------------------------------------------------------------------
# Rotation
# --------------------------------------------------------------------------------------------
def pose_error(R_pred: Tensor, R_gt: Tensor) -> Tensor:
    """The benchmark's ‖I − R_pred·R_gtᵀ‖_F.  R_pred [B,3,3], R_gt [B,3,3] -> [B]"""
    eye = torch.eye(3, dtype=R_pred.dtype, device=R_pred.device)
    return torch.linalg.matrix_norm(eye - R_pred @ R_gt.transpose(-1, -2))


def rotation_angle_deg(R: Tensor) -> Tensor:
    """Geodesic angle of rotations, stable over [0°, 180°] (atan2 of sin and cos).

    R [...,3,3] -> [...]
    """
    skew = R - R.transpose(-1, -2)
    sin = torch.stack([skew[..., 2, 1], skew[..., 0, 2], skew[..., 1, 0]], -1).norm(dim=-1) / 2
    cos = (torch.diagonal(R, dim1=-2, dim2=-1).sum(-1) - 1) / 2
    return torch.rad2deg(torch.atan2(sin, cos))


def angle_error_deg(R_pred: Tensor, R_gt: Tensor) -> Tensor:
    """Geodesic angle of R_pred·R_gtᵀ in degrees.  R_pred [B,3,3], R_gt [B,3,3] -> [B]"""
    return rotation_angle_deg(R_pred @ R_gt.transpose(-1, -2))


def yaw_pitch_roll_deg(R: Tensor) -> Tensor:
    """Head yaw, pitch, roll in degrees of a 3DMM rotation (camera x right, y down, z forward).

    The rotation is first expressed in OpenGL camera axes, ``Q = diag(1,-1,-1)·R`` (a frontal head
    gives Q = I), then decomposed as Q = Ry(yaw)·Rx(pitch)·Rz(roll).
    R [B,3,3] -> [B,3] (yaw, pitch, roll)
    """
    Q = flip_yz(R)
    yaw = torch.atan2(Q[..., 0, 2], Q[..., 2, 2])
    pitch = torch.asin(torch.clamp(-Q[..., 1, 2], -1.0, 1.0))
    roll = torch.atan2(Q[..., 1, 0], Q[..., 1, 1])
    return torch.rad2deg(torch.stack([yaw, pitch, roll], dim=-1))


def yaw_pitch_roll_error_deg(R_pred: Tensor, R_gt: Tensor) -> Tensor:
    """Absolute yaw/pitch/roll differences, wrapped to [0°, 180°].  [B,3,3] x2 -> [B,3]"""
    d = yaw_pitch_roll_deg(R_pred) - yaw_pitch_roll_deg(R_gt)
    return torch.remainder(d + 180.0, 360.0).sub(180.0).abs()


# --------------------------------------------------------------------------------------------
# 3D shape
# --------------------------------------------------------------------------------------------
def similarity_align(points: Tensor, src_lmk: Tensor, dst_lmk: Tensor,
                     allow_reflection: bool = False) -> Tensor:
    """Map ``points`` by the similarity (s, R, t) fitted from ``src_lmk`` onto ``dst_lmk`` (Umeyama).

    points [B,M,3], src_lmk [B,K,3], dst_lmk [B,K,3] -> [B,M,3]
    """
    from pytorch3d.ops import corresponding_points_alignment

    t = corresponding_points_alignment(src_lmk, dst_lmk, estimate_scale=True,
                                       allow_reflection=allow_reflection)
    return t.s[:, None, None] * points @ t.R + t.T[:, None]


def _point_face_sq(points: Tensor, tris: Tensor, first_p: Tensor, first_t: Tensor, max_points: int) -> Tensor:
    """pytorch3d's packed point-face kernel: points [P,3], tris [T,3,3] -> squared distances [P]."""
    from pytorch3d.loss.point_mesh_distance import point_face_distance

    return point_face_distance(points.contiguous(), first_p, tris.contiguous(), first_t, max_points,
                               _MIN_TRIANGLE_AREA_MM2)


def _pairs_sq(points: Tensor, tris: Tensor, point_ids: np.ndarray, tri_ids: np.ndarray) -> Tensor:
    """Squared distance of each point to the nearest of its paired triangles (pairs sorted by
    point, every point paired at least once).  points [P,3], tris [F,3,3] -> [P]"""
    counts = torch.bincount(torch.from_numpy(point_ids), minlength=len(points))
    return _point_face_sq(points, tris[torch.from_numpy(tri_ids)], torch.arange(len(points)),
                          torch.cumsum(counts, 0) - counts, 1)


def _tier_pairs(tree, ids: np.ndarray, r_tier: float, points: np.ndarray, d_upper: np.ndarray,
                slack: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(point, triangle) pairs of one radius tier: centroids within d_upper + r_tier of the point
    (one KD-tree ball query per point, each with its own radius)."""
    groups = tree.query_ball_point(points, d_upper + r_tier + slack, return_sorted=False)
    counts = np.fromiter(map(len, groups), dtype=np.int64, count=len(points))
    found = np.fromiter(itertools.chain.from_iterable(groups), dtype=np.int64, count=int(counts.sum()))
    return np.repeat(np.arange(len(points)), counts), ids[found]


def _candidate_pairs(points: Tensor, tris: Tensor) -> tuple[np.ndarray, np.ndarray]:
    """(point, triangle) pairs, sorted by point, holding every triangle that can be nearest to
    each point (every point paired at least once), found on CPU.

    A triangle T with centroid c and radius r (farthest corner from c) is at least |p − c| − r
    from p. Pass 1 measures each point against the triangles of its 8 nearest centroids: an upper
    bound d on its distance. Pass 2 keeps every triangle with |p − c| − r <= d, found per radius
    tier (KD-tree balls of radius d + the tier's largest r; the largest triangles are bound-tested
    one by one).
    points [P,3], tris [F,3,3] float32 (CPU) -> point ids [K], triangle ids [K]
    """
    from scipy.spatial import cKDTree

    p64, t64 = points.double().numpy(), tris.double().numpy()
    centre = t64.mean(axis=1)
    radius = np.linalg.norm(t64 - centre[:, None], axis=-1).max(axis=1)
    order = np.argsort(radius)
    cuts = [int(np.ceil(q * len(order))) for q in _RADIUS_TIERS]
    tiers = [t for t in np.split(order, cuts) if len(t)]
    dense = tiers.pop() if len(tiers) > 1 else np.zeros(0, np.int64)
    trees = [cKDTree(centre[t]) for t in tiers]
    P, k = len(p64), min(8, len(tiers[0]))
    _, near = trees[0].query(p64, k=k)
    d_upper = _pairs_sq(points, tris, np.repeat(np.arange(P), k), tiers[0][near.reshape(P * k)])
    d_upper = d_upper.double().sqrt().numpy()
    slack = 1e-6 * (1 + d_upper)  # float32 kernel vs float64 bounds
    pairs = [_tier_pairs(tree, ids, radius[ids[-1]], p64, d_upper, slack) for tree, ids in zip(trees, tiers)]
    if len(dense):
        lower = torch.cdist(torch.from_numpy(p64), torch.from_numpy(centre[dense])) - torch.from_numpy(radius[dense])
        p_dense, j = np.nonzero((lower.numpy() <= (d_upper + slack)[:, None]))
        pairs.append((p_dense, dense[j]))
    point_ids = np.concatenate([p for p, _ in pairs])
    tri_ids = np.concatenate([t for _, t in pairs])
    by_point = np.argsort(point_ids, kind="stable")
    return point_ids[by_point], tri_ids[by_point]


def _surface_sq_pruned(points: Tensor, tris: Tensor) -> Tensor:
    """Exact squared point-to-surface distances on CPU, measuring only the triangles that can be
    nearest (:func:`_candidate_pairs`).  points [P,3], tris [F,3,3] float32 -> [P]"""
    return _pairs_sq(points, tris, *_candidate_pairs(points, tris))


def point_to_surface_distance(points: Tensor, vertices: Tensor, faces: Tensor) -> Tensor:
    """Euclidean distance of each point to the closest triangle of its sample's mesh (exact).

    pytorch3d's point-face kernel, in float32: pass coordinates in millimetres (its degenerate-
    triangle threshold is an area, set here to 1e-6 mm²). On CUDA every point meets every
    triangle; on CPU (where that kernel is a plain double loop) only the triangles that can be
    nearest are measured.
    points [B,P,3], vertices [B,V,3], faces [F,3] long -> [B,P]
    """
    B, P, _ = points.shape
    F = faces.shape[0]
    tris = vertices[:, faces].float().detach()  # [B,F,3,3]
    pts = points.float().detach()
    if points.is_cuda:
        first_p, first_t = (torch.arange(B, device=points.device) * n for n in (P, F))
        sq = _point_face_sq(pts.reshape(B * P, 3), tris.reshape(B * F, 3, 3), first_p, first_t, P)
    else:
        sq = torch.stack([_surface_sq_pruned(p, t) for p, t in zip(pts, tris)])
    return sq.view(B, P).clamp_min(0).sqrt()


def nearest_surface_points(points: Tensor, vertices: Tensor, faces: Tensor) -> tuple[Tensor, Tensor]:
    """The closest point of a mesh's surface to each point (exact), and its distance.

    The nearest triangle of each point is the argmin of pytorch3d's point-face kernel over the
    candidates of :func:`_candidate_pairs`; the closest point on it is read from the same kernel's
    gradient (d|p − c|²/dp = 2(p − c)), so that this and :func:`point_to_surface_distance` share one
    point-to-triangle computation. float32 on CPU: pass millimetres near the origin.
    points [P,3], vertices [V,3], faces [F,3] long -> distances [P], closest points [P,3] (float32)
    """
    pts = points.detach().float().cpu()
    tris = vertices.detach().float().cpu()[faces.cpu()]
    pid, tid = (torch.from_numpy(a) for a in _candidate_pairs(pts, tris))
    K, P = len(pid), len(pts)
    sq = _point_face_sq(pts[pid], tris[tid], torch.arange(K), torch.arange(K), 1)
    best = torch.full((P,), float("inf")).scatter_reduce(0, pid, sq, "amin")
    nearest = torch.zeros(P, dtype=torch.long)
    hit = sq == best[pid]
    nearest[pid[hit]] = tid[hit]  # any of equally near triangles
    with torch.enable_grad():
        p = pts.clone().requires_grad_(True)
        _point_face_sq(p, tris[nearest], torch.arange(P), torch.arange(P), 1).sum().backward()
    return best.clamp_min(0).sqrt(), pts - p.grad / 2


# --------------------------------------------------------------------------------------------
# The NoW protocol (github.com/soubhiksanyal/now_evaluation, scan2mesh_computations.py)
# --------------------------------------------------------------------------------------------
# The 7 landmarks, in the NoW order (flame.ALIGN7): 0 right eye outer corner, 1 right eye inner
# corner, 2 left eye inner corner, 3 left eye outer corner, 4 nose bottom (68-point landmark 33,
# the subnasale: not the tip), 5 right mouth corner, 6 left mouth corner.
NOW_NOSE_BOTTOM, NOW_INNER_EYES, NOW_OUTER_EYES = 4, (1, 2), (0, 3)
NOW_CENTRE_FRACTION = 0.3   # the crop's centre: nose bottom + 0.3·(nose bridge − nose bottom)
NOW_RADIUS_FACTOR = 1.4     # its radius: 1.4 × (outer-eye distance + nose length) / 2
NOW_TRUST_RADIUS = 0.1      # the refinement's initial trust region, in parameter units (mm for t)
NOW_MIN_IMPROVEMENT = 1e-4  # ... stops after an accepted step improving the squared sum by less
NOW_MAX_ITERS = 200         # ... or after this many iterations
NOW_SCALE_PENALTY = 100.0   # ... with the residual 100·(|s| − s), which keeps the scale positive
SHAPE_PROTOCOLS = {
    "landmarks": "the FLAME face region of the ground-truth mesh to the predicted surface after the "
                 "7-landmark similarity (no reflection, no refinement)",
    "now": "the NoW protocol: the ground-truth points inside the NoW sphere around the nose to the "
           "predicted surface after the 7-landmark similarity and the scan-to-mesh refinement of "
           "scale, rotation and translation",
}


def now_crop_sphere(lmk7: Tensor) -> tuple[Tensor, Tensor]:
    """NoW's face sphere from a scan's 7 landmarks: centre = nose bottom + 0.3·(nose bridge − nose
    bottom), the bridge being the midpoint of the inner eye corners; radius = 1.4 × (outer eye
    corner distance + |nose bridge − nose bottom|) / 2.
    lmk7 [B,7,3] (NoW order) -> centre [B,3], radius [B]
    """
    bottom = lmk7[:, NOW_NOSE_BOTTOM]
    bridge = lmk7[:, list(NOW_INNER_EYES)].mean(dim=1)
    centre = bottom + NOW_CENTRE_FRACTION * (bridge - bottom)
    eyes = torch.linalg.vector_norm(lmk7[:, NOW_OUTER_EYES[0]] - lmk7[:, NOW_OUTER_EYES[1]], dim=-1)
    radius = NOW_RADIUS_FACTOR * (eyes + torch.linalg.vector_norm(bridge - bottom, dim=-1)) / 2
    return centre, radius


def now_crop_mask(points: Tensor, lmk7: Tensor) -> Tensor:
    """Which scan points NoW scores: those at distance <= radius from the centre of
    :func:`now_crop_sphere` (the official code crops the ground-truth scan's vertices, never the
    predicted mesh).  points [B,P,3], lmk7 [B,7,3] -> [B,P] bool
    """
    centre, radius = now_crop_sphere(lmk7)
    return torch.linalg.vector_norm(points - centre[:, None], dim=-1) <= radius[:, None]


def _skew(v: np.ndarray) -> np.ndarray:
    """Cross-product matrices: v [...,3] -> [...,3,3] with skew(v) @ u = v × u."""
    z = np.zeros(v.shape[:-1])
    return np.stack([np.stack([z, -v[..., 2], v[..., 1]], -1), np.stack([v[..., 2], z, -v[..., 0]], -1),
                     np.stack([-v[..., 1], v[..., 0], z], -1)], -2)


def _rotated_jacobian(r: np.ndarray, c: np.ndarray) -> np.ndarray:
    """d(R(r)·c)/dr of the axis-angle map R (Rodrigues), for each point c.
    r [3], c [P,3] -> [P,3,3] (Gallego & Yezzi's formula; -[c]× at r = 0)"""
    from scipy.spatial.transform import Rotation

    theta_sq = float(r @ r)
    if theta_sq < 1e-24:
        return -_skew(c)
    R = Rotation.from_rotvec(r).as_matrix()
    A = (np.outer(r, r) + (R.T - np.eye(3)) @ _skew(r)) / theta_sq
    return -np.einsum("ij,pjk,kl->pil", R, _skew(c), A)


def _similarity(x: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
    """x [7] = (s, axis-angle r [3], t [3]) -> s, R [3,3], t [3]"""
    from scipy.spatial.transform import Rotation

    return float(x[0]), Rotation.from_rotvec(x[1:4]).as_matrix(), x[4:7]


def _scan_residuals(x: np.ndarray, scan: Tensor, vertices: np.ndarray, faces: Tensor) -> tuple[np.ndarray, np.ndarray]:
    """The refinement's residuals at x and their Jacobian: each scan point's distance to the mesh
    moved by x, then 100·(|s| − s).  x [7], scan [P,3], vertices [V,3] -> r [P+1], J [P+1,7]"""
    s, R, t = _similarity(x)
    moved = s * vertices @ R.T + t
    d, closest = nearest_surface_points(scan, torch.from_numpy(moved), faces)
    d, closest = d.double().numpy(), closest.double().numpy()
    n = (scan.double().numpy() - closest) / np.maximum(d, 1e-12)[:, None]  # d d_i / d c_i = -n_i
    n[d <= 1e-12] = 0.0
    body = (closest - t) @ R / s                                           # c̃: c = s·R·c̃ + t
    J = np.empty((len(d) + 1, 7))
    J[:-1, 0] = -np.einsum("pi,pi->p", n, body @ R.T)
    J[:-1, 1:4] = -s * np.einsum("pi,pij->pj", n, _rotated_jacobian(x[1:4], body))
    J[:-1, 4:7] = -n
    J[-1] = 0.0
    J[-1, 0] = NOW_SCALE_PENALTY * (np.sign(s) - 1.0)
    return np.append(d, NOW_SCALE_PENALTY * (abs(s) - s)), J


def scan_to_mesh_refine(scan: Tensor, vertices: Tensor, faces: Tensor) -> tuple[Tensor, dict]:
    """NoW's refinement: the similarity x = (s, r, t), mesh ↦ s·R(r)·mesh + t about the frame's
    origin (R from the axis-angle r), from x0 = (1, 0, 0), that minimises the sum of the squared
    scan-to-mesh distances (each scan point to the nearest point of the moved surface) plus
    (100·(|s| − s))².

    The optimiser is the one the official code runs (chumpy's ``minimize``, whose default is
    Powell's dogleg, with its options there), written here on the 7 parameters: each iteration takes
    the Cauchy point cut to the trust region, else the Gauss-Newton step when it fits inside, else
    the dogleg between them; a step that lowers the squared sum is accepted; the trust radius starts
    at 0.1 (:data:`NOW_TRUST_RADIUS`), grows to at least 2.5× the step when the gain ratio is over
    0.9 and shrinks by 4 under 0.05. It stops after an accepted step that improved the squared sum
    by less than 1e-4 of itself (:data:`NOW_MIN_IMPROVEMENT`), after 200 iterations, or when the
    step or the trust radius falls under 1e-15·|x|. The Jacobian re-reads the nearest point of
    every scan point at each accepted step (its triangle and barycentric coordinates then held
    fixed), as the official distance term does.
    scan [P,3], vertices [V,3] (same unit, mm for the trust radius to mean what NoW's does),
    faces [F,3] long -> the moved vertices [V,3] (float64) and {"scale", "rotation" [3,3],
    "translation" [3], "iterations", "squared_sum"}
    """
    v = vertices.detach().double().cpu().numpy()
    x, eps = np.array([1.0, 0, 0, 0, 0, 0, 0]), 1e-15
    r, J = _scan_residuals(x, scan, v, faces)
    delta, iteration, done = NOW_TRUST_RADIUS, 0, False
    g, A = J.T @ -r, J.T @ J
    done = np.abs(g).max() < eps
    while not done:
        iteration += 1
        d_sd = (g @ g) / max(np.sum((J @ g) ** 2), 1e-300) * g
        d_gn = None
        while True:
            if np.linalg.norm(d_sd) >= delta:
                step = delta / np.linalg.norm(d_sd) * d_sd
            else:
                if d_gn is None:
                    d_gn = np.linalg.lstsq(A, g, rcond=None)[0]
                if np.linalg.norm(d_gn) <= delta:
                    step = d_gn
                else:
                    diff = d_gn - d_sd
                    c = (diff @ diff) * delta ** 2 + (d_gn @ d_sd) ** 2 - (d_gn @ d_gn) * (d_sd @ d_sd)
                    step = d_sd + (delta ** 2 - d_sd @ d_sd) / (diff @ d_sd + np.sqrt(max(c, 0.0))) * diff
            if np.linalg.norm(step) <= eps * np.linalg.norm(x):
                done = True
                break
            r_new, J_new = _scan_residuals(x + step, scan, v, faces)
            gain = r @ r - r_new @ r_new
            rho = gain / (2 * g @ step - step @ A @ step) if gain > 0 else gain
            if gain > 0:
                x = x + step
                if gain / (r @ r) < NOW_MIN_IMPROVEMENT:
                    done = True
                else:
                    r, J = r_new, J_new
                    g, A = J.T @ -r, J.T @ J
                    done = np.abs(g).max() < eps
            if rho > 0.9:
                delta = max(delta, 2.5 * np.linalg.norm(step))
            elif rho < 0.05:
                delta *= 0.25
            done = done or delta <= eps * np.linalg.norm(x)
            if done or gain > 0:
                break
        done = done or iteration >= NOW_MAX_ITERS
    s, R, t = _similarity(x)
    moved = torch.from_numpy(s * v @ R.T + t)
    return moved, {"scale": s, "rotation": R, "translation": t, "iterations": iteration,
                   "squared_sum": float(r @ r)}


def shape_error_mm(pred_vertices: Tensor, pred_lmk7: Tensor, gt_points: Tensor, gt_lmk7: Tensor,
                   faces: Tensor, protocol: str = "landmarks", units_to_mm: float = MM_PER_METRE
                   ) -> dict[str, Tensor]:
    """The 3D shape error: ground-truth points to the aligned predicted surface, in mm.

    ``protocol`` (:data:`SHAPE_PROTOCOLS`):

    - ``landmarks``: ``gt_points`` (the ground truth's FLAME face region) to the predicted mesh
      mapped by the similarity fitted on the 7 landmarks (no reflection).
    - ``now``: the NoW protocol, step by step as the official evaluation: ``gt_points`` is the
      scan (here a ground-truth mesh's vertices), cropped to the sphere of :func:`now_crop_mask`
      around the ground truth's landmarks; the predicted mesh is mapped by the least-squares
      similarity of its 7 landmarks onto the scan's, reflection allowed when it fits better (the
      official Procrustes' ``reflection='best'``), then refined by :func:`scan_to_mesh_refine` (in mm,
      on the cropped points, rotating about the mean of ``gt_points``: the official code rotates
      about its scan's origin, which changes the optimiser's path, not its optimum); each cropped
      point's exact distance to the refined surface is scored.

    Points outside the crop are NaN in "distances"; the per-sample statistics are over the rest.
    pred_vertices [B,V,3], pred_lmk7 [B,7,3], gt_points [B,P,3], gt_lmk7 [B,7,3], faces [F,3] long
    -> {"median", "mean", "std"} each [B] (std: population), and "distances" [B,P] (float32)
    """
    if protocol not in SHAPE_PROTOCOLS:
        raise ValueError(f"unknown shape protocol '{protocol}' (known: {', '.join(SHAPE_PROTOCOLS)})")
    now = protocol == "now"
    aligned = similarity_align(pred_vertices, pred_lmk7, gt_lmk7, allow_reflection=now)
    centre = gt_points.mean(dim=1, keepdim=True)  # float32 precision: work near the origin
    points, aligned = (gt_points - centre) * units_to_mm, (aligned - centre) * units_to_mm
    if not now:
        d = point_to_surface_distance(points, aligned, faces)
    else:
        keep = now_crop_mask(gt_points, gt_lmk7).cpu()  # the refinement runs on CPU (scipy, numpy)
        points, aligned, faces = points.cpu(), aligned.cpu(), faces.cpu()
        d = torch.full(keep.shape, float("nan"))
        for b in range(len(points)):
            scan = points[b][keep[b]].float()
            refined, _ = scan_to_mesh_refine(scan, aligned[b], faces)
            d[b, keep[b]] = point_to_surface_distance(scan[None], refined[None].float(), faces)[0]
        std = (d - d.nanmean(dim=1, keepdim=True)).square().nanmean(dim=1).sqrt()
        return {"median": d.nanquantile(0.5, dim=1), "mean": d.nanmean(dim=1), "std": std, "distances": d}
    return {"median": d.quantile(0.5, dim=1), "mean": d.mean(dim=1), "std": d.std(dim=1, correction=0),
            "distances": d}


def chamfer_reference(pred_vertices: Tensor, pred_lmk7: Tensor, gt_vertices: Tensor, gt_lmk68: Tensor,
                      gt_region: Tensor) -> Tensor:
    """The DAD-3DHeads benchmark's one-sided "chamfer", with its conventions.

    GT scaled (about the origin) so that |lmk39 − lmk42| = 20; the predicted points mapped by the
    orthogonal Procrustes similarity (reflection allowed) from ``pred_lmk7`` onto the scaled GT's
    7 landmarks; value = mean over GT region vertices of the SQUARED distance to the nearest
    transformed predicted vertex.
    pred_vertices [B,M,3], pred_lmk7 [B,7,3], gt_vertices [B,V,3] (world), gt_lmk68 [B,68,3] of
    those vertices, gt_region [R] long (the "face" subset) -> [B]
    """
    a, b = INNER_EYE_CORNERS
    scale = INTER_EYE_UNITS / torch.linalg.vector_norm(gt_lmk68[:, a] - gt_lmk68[:, b], dim=-1)
    gt_face = gt_vertices[:, gt_region] * scale[:, None, None]
    gt7 = gt_lmk68[:, list(ALIGN7)] * scale[:, None, None]
    aligned = similarity_align(pred_vertices.double(), pred_lmk7.double(), gt7.double(),
                               allow_reflection=True)
    sq, _ = knn(gt_face.double(), aligned, 1)
    return sq[..., 0].mean(dim=1).to(gt_vertices.dtype)


# --------------------------------------------------------------------------------------------
# The registry: one record per metric
# --------------------------------------------------------------------------------------------
SCOPES = ("study", "benchmark", "attributes")


@dataclass(frozen=True)
class MetricInputs:
    """What each metric's ``sample`` reads for a batch of B samples, built by ``evaluate.sample_metrics``."""
    pred: dict               # ``evaluate.predict_batch``'s output (CPU)
    batch: dict              # the data's batch (docs/ARCHITECTURE.md), as given to sample_metrics
    topo: TopologyTensors
    pred_vertices: Tensor    # [B,V,3] the predicted canonical model-space mesh, float64
    gt_vertices: Tensor      # [B,V,3] the GT model-space mesh, float64
    pred_lmk68: Tensor       # [B,68,3] the landmarks of pred_vertices
    gt_lmk68: Tensor         # [B,68,3] the landmarks of gt_vertices
    R: Tensor                # [B,3,3] the predicted rotation, float64
    R_gt: Tensor             # [B,3,3] the GT rotation, float64
    zn_pred: Tensor          # [B,N,3] the Z_n head points of the predicted image-space mesh, float32
    zn_gt: Tensor            # [B,N,3] the Z_n head points of the GT posed by R_gt, float32
    shape: dict              # :func:`shape_error_mm`'s dict


@dataclass(frozen=True)
class BenchmarkGT:
    """The ground truth a benchmark metric reads for b rows, prepared by ``benchmark.Scorer.prepare``
    from the benchmark's GT file."""
    landmarks_2d: Tensor     # [b,68,2] image pixels
    world: Tensor            # [b,V,3] the mesh under its model-view matrix
    landmarks_world: Tensor  # [b,68,3] the landmarks of world
    rotation: Tensor         # [b,3,3] the model-view rotation, y and z flipped
    bbox: Tensor             # [b,4] x, y, w, h

    def rows(self, idx: Tensor) -> BenchmarkGT:
        """The same for rows ``idx``."""
        return BenchmarkGT(*(getattr(self, f.name)[idx] for f in fields(self)))


@dataclass(frozen=True)
class Metric:
    """One metric: every table, plot and list of metrics reads it from here.

    ``direction``: "lower" or "higher" is better. ``precision``: decimals in the report's tables.
    ``scopes``: where it is shown besides each run's per-sample and aggregate values (every
    metric is computed by ``evaluate``): "study" (the report's tables, ``summary.csv``, the
    differences from the baseline), "benchmark" (``python -m dad3dlib benchmark``; needs
    ``benchmark``), "attributes" (the report's plots by image attribute).
    ``sample(c) -> [B]``: the value per sample in a study's evaluation, from the batch's
    :class:`MetricInputs` ``c``.
    ``benchmark``: (the submission keys it needs, ``fn(g, p, scorer) -> [b]``) on the benchmark's
    file formats (see ``benchmark.Scorer``: ``g`` its prepared :class:`BenchmarkGT`, ``p`` the stacked predictions).
    ``short``: its column header in the benchmark's per-attribute table.
    """
    name: str
    label: str
    direction: str
    sample: Callable
    precision: int = 2
    scopes: frozenset = frozenset()
    benchmark: tuple | None = None
    short: str = ""

    @property
    def lower_is_better(self) -> bool:
        return self.direction == "lower"


METRICS: dict[str, Metric] = {}


def register_metric(name: str, label: str, direction: str, sample: Callable, precision: int = 2,
                    scopes: tuple = (), benchmark: tuple | None = None, short: str = "") -> Metric:
    """Add a :class:`Metric` to :data:`METRICS` (its order is every table's order)."""
    if direction not in ("lower", "higher") or not set(scopes) <= set(SCOPES) or name in METRICS:
        raise ValueError(f"metric '{name}': direction must be lower or higher, scopes among {SCOPES}, name new")
    if ("benchmark" in scopes) != (benchmark is not None):
        raise ValueError(f"metric '{name}': the benchmark scope and a benchmark function go together")
    METRICS[name] = Metric(name, label, direction, sample, precision, frozenset(scopes), benchmark, short or name)
    return METRICS[name]


def metric_names(scope: str | None = None) -> tuple[str, ...]:
    """The registered metrics in a scope (every one with None), in registration order."""
    return tuple(k for k, m in METRICS.items() if scope is None or scope in m.scopes)


def text_table(title: str, columns, rows, label: int = 22, width: int = 12, digits: int = 4) -> list[str]:
    """Metric values as a text table (the evaluate and benchmark commands' printouts): a header of
    ``title`` in ``label`` characters and each column's name right-aligned in ``width``, then a line
    per ``(name, values)`` of ``rows``, the name indented by two, each value right-aligned under its
    column (an integer as it is, a float with ``digits`` decimals, None as n/a)."""
    def cell(v) -> str:
        return "n/a" if v is None else f"{v:d}" if isinstance(v, (int, np.integer)) else f"{v:.{digits}f}"

    lines = [f"{title[:label - 1]:<{label}}" + "".join(f"{c[:width - 1]:>{width}}" for c in columns)]
    return lines + [f"  {name[:label - 2]:<{label - 2}}" + "".join(f"{cell(v):>{width}}" for v in values)
                    for name, values in rows]


def _bench_zn(g: dict, p: dict, s) -> tuple[Tensor, Tensor]:
    """The reference's Z_n points: prediction unchanged, GT = -world; head subset, float32."""
    return p["N_landmarks_3d"][:, s.z_n].float(), (-g.world[:, s.z_n]).float()


def _bench_rotation(fn):
    return (("rotation_matrix",), lambda g, p, s: fn(p["rotation_matrix"], g.rotation))


register_metric("median_mm", "Median (mm)", "lower", lambda c: c.shape["median"], scopes=("study",))
register_metric("mean_mm", "Mean (mm)", "lower", lambda c: c.shape["mean"], scopes=("study", "attributes"))
register_metric("std_mm", "Std (mm)", "lower", lambda c: c.shape["std"], scopes=("study",))
register_metric("angle_error_deg", "Angle error (°)", "lower", lambda c: angle_error_deg(c.R, c.R_gt),
                scopes=("study", "benchmark", "attributes"), benchmark=_bench_rotation(angle_error_deg),
                short="angle_deg")
register_metric("angle_error_seen_deg", "Angle error vs the crop's view (°)", "lower",
                lambda c: angle_error_deg(c.R, apparent_rotation(c.R_gt, c.batch["view_ray"].double())),
                scopes=("study",))
register_metric(
    "nme_reprojection", "Reprojection NME", "lower",
    lambda c: nme_reprojection(c.pred["landmarks_2d_image"].double(), c.batch["landmarks_2d_image"].double(),
                               c.batch["bbox"].double()),
    scopes=("study", "benchmark", "attributes"), short="nme",
    benchmark=(("68_landmarks_2d",), lambda g, p, s: nme_reprojection(p["68_landmarks_2d"], g.landmarks_2d, g.bbox)))
register_metric("z5_accuracy", "Z₅ accuracy (reference pairing)", "higher",
                lambda c: z_n_accuracy_reference(c.zn_pred, c.zn_gt, Z_N), precision=3,
                scopes=("study", "benchmark"), short="z5",
                benchmark=((FLAME_MESH,), lambda g, p, s: z_n_accuracy_reference(*_bench_zn(g, p, s), Z_N).double()))
register_metric("z5_accuracy_local", "Z₅ accuracy (5 nearest, paper)", "higher",
                lambda c: z_n_accuracy_local(c.zn_pred, c.zn_gt, Z_N), precision=3,
                scopes=("study", "benchmark"), short="z5_local",
                benchmark=((FLAME_MESH,), lambda g, p, s: z_n_accuracy_local(*_bench_zn(g, p, s), Z_N).double()))
register_metric("pose_error", "Pose error (‖I − R·R_gtᵀ‖_F)", "lower", lambda c: pose_error(c.R, c.R_gt),
                scopes=("benchmark",), benchmark=_bench_rotation(pose_error))
for _i, _axis in enumerate(("yaw", "pitch", "roll")):
    register_metric(f"{_axis}_error_deg", f"{_axis.capitalize()} error (°)", "lower",
                    lambda c, i=_i: yaw_pitch_roll_error_deg(c.R, c.R_gt)[:, i])
register_metric(
    "chamfer", "Chamfer (reference)", "lower",
    lambda c: chamfer_reference(c.pred_vertices, c.pred_lmk68[:, list(ALIGN7)], c.gt_vertices, c.gt_lmk68,
                                c.topo.face),
    scopes=("benchmark",),
    benchmark=(("N_landmarks_3d", "7_landmarks_3d"),
               lambda g, p, s: chamfer_reference(p["N_landmarks_3d"], p["7_landmarks_3d"], g.world, g.landmarks_world,
                                                 s.face)))


def batch_metrics(pred: dict, batch: dict, flame: FlameLayer) -> dict[str, Tensor]:
    """Per-sample reprojection NME (×100, image space) and angle error (degrees): [B] each."""
    lmk_crop = flame.landmarks68(pred["vertices_reprojected"])[..., :2]
    lmk_img = crop_to_image(lmk_crop, batch["crop_affine"])
    R = rot6d_to_matrix(split_3dmm(pred["params_3dmm"])["rot6d"])
    return {"nme": nme_reprojection(lmk_img, batch["landmarks_2d_image"], batch["bbox"]),
            "angle_error": angle_error_deg(R, batch["rotation"])}


__all__ = ["nme_reprojection", "z_n_accuracy_local", "z_n_accuracy_reference", "pose_error",
           "rotation_angle_deg", "angle_error_deg", "yaw_pitch_roll_deg", "yaw_pitch_roll_error_deg",
           "knn", "similarity_align", "point_to_surface_distance", "nearest_surface_points",
           "now_crop_sphere", "now_crop_mask", "scan_to_mesh_refine", "shape_error_mm", "SHAPE_PROTOCOLS",
           "chamfer_reference", "batch_metrics", "MM_PER_METRE", "Metric", "MetricInputs", "BenchmarkGT", "METRICS",
           "register_metric", "metric_names"]
