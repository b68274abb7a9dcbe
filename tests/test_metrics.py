"""dad3dlib.metrics against hand-built cases and slow reference oracles."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from dad3dlib import metrics as M
from dad3dlib.flame import ALIGN7

torch.set_num_threads(1)


def _axis_angle(axis: torch.Tensor, deg: float) -> torch.Tensor:
    """Rodrigues: unit axis [3], angle in degrees -> [3,3] float64."""
    k = axis / axis.norm()
    K = torch.tensor([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]], dtype=torch.float64)
    t = math.radians(deg)
    return torch.eye(3, dtype=torch.float64) + math.sin(t) * K + (1 - math.cos(t)) * K @ K


def _random_rotations(b: int, gen: torch.Generator) -> torch.Tensor:
    q, r = torch.linalg.qr(torch.randn(b, 3, 3, generator=gen, dtype=torch.float64))
    q = q * torch.sign(torch.diagonal(r, dim1=-2, dim2=-1))[:, None]
    return q * torch.det(q)[:, None, None]


@pytest.fixture(scope="module")
def meshes():
    """A batch of 3 bumpy spheres (metres), their faces, 68 'landmark' vertex ids, a face region."""
    from pytorch3d.utils import ico_sphere

    sphere = ico_sphere(3)
    v, f = sphere.verts_packed().double(), sphere.faces_packed()
    gen = torch.Generator().manual_seed(0)
    radii = 0.09 + 0.01 * torch.rand(3, v.shape[0], 1, generator=gen, dtype=torch.float64)
    verts = v[None] * radii
    lmk_ids = torch.randperm(v.shape[0], generator=gen)[:68]
    region = torch.nonzero(v[:, 2] > 0.3).squeeze(1)  # a "face" cap
    return verts, f, lmk_ids, region


# --------------------------------------------------------------------------------------------
# GT as prediction
# --------------------------------------------------------------------------------------------
def test_gt_as_prediction_is_perfect(meshes):
    verts, faces, lmk, region = meshes
    gen = torch.Generator().manual_seed(1)
    lmk2d = torch.rand(3, 68, 2, generator=gen, dtype=torch.float64) * 200
    bbox = torch.tensor([[10.0, 20.0, 150.0, 180.0]] * 3, dtype=torch.float64)
    R = _random_rotations(3, gen)
    assert torch.all(M.nme_reprojection(lmk2d, lmk2d, bbox) == 0)
    assert torch.all(M.z_n_accuracy_local(verts, verts) == 1)
    assert torch.all(M.z_n_accuracy_reference(verts, verts) == 1)
    assert torch.allclose(M.pose_error(R, R), torch.zeros(3, dtype=torch.float64), atol=1e-6)
    assert torch.allclose(M.angle_error_deg(R, R), torch.zeros(3, dtype=torch.float64), atol=1e-5)
    assert torch.allclose(M.yaw_pitch_roll_error_deg(R, R), torch.zeros(3, 3, dtype=torch.float64),
                          atol=1e-5)
    lmk7 = verts[:, lmk[list(ALIGN7)]]
    err = M.shape_error_mm(verts, lmk7, verts[:, region], lmk7, faces)
    for key in ("median", "mean", "std"):
        assert err[key].abs().max() < 1e-3, key
    chamfer = M.chamfer_reference(verts, lmk7, verts, verts[:, lmk], region)
    assert chamfer.abs().max() < 1e-8


# --------------------------------------------------------------------------------------------
# NME
# --------------------------------------------------------------------------------------------
def test_nme_one_pixel_shift():
    gen = torch.Generator().manual_seed(2)
    gt = torch.rand(4, 68, 2, generator=gen, dtype=torch.float64) * 300
    direction = torch.nn.functional.normalize(torch.randn(4, 68, 2, generator=gen, dtype=torch.float64), dim=-1)
    bbox = torch.tensor([[0, 0, 100, 100], [5, 5, 64, 256], [0, 0, 30, 50], [1, 2, 200, 150]],
                        dtype=torch.float64)
    expected = 100.0 / torch.sqrt(bbox[:, 2] * bbox[:, 3])
    assert torch.allclose(M.nme_reprojection(gt + direction, gt, bbox), expected)
    assert torch.allclose(M.nme_reprojection(gt + 3 * direction, gt, bbox), 3 * expected)


# --------------------------------------------------------------------------------------------
# Rotation
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("theta", [0.5, 10.0, 45.0, 90.0, 135.0, 179.0])
def test_rotation_by_theta_gives_angle_theta(theta):
    gen = torch.Generator().manual_seed(3)
    R_gt = _random_rotations(5, gen)
    axes = torch.randn(5, 3, generator=gen, dtype=torch.float64)
    R_delta = torch.stack([_axis_angle(a, theta) for a in axes])
    R_pred = R_delta @ R_gt
    assert torch.allclose(M.angle_error_deg(R_pred, R_gt), torch.full((5,), theta, dtype=torch.float64),
                          atol=1e-6)
    # ‖I − R‖_F = 2·sqrt(2)·sin(θ/2) for a rotation by θ
    expected = 2 * math.sqrt(2) * math.sin(math.radians(theta) / 2)
    assert torch.allclose(M.pose_error(R_pred, R_gt), torch.full((5,), expected, dtype=torch.float64))


def test_yaw_pitch_roll_of_single_axis_rotations():
    frontal = torch.diag(torch.tensor([1.0, -1.0, -1.0], dtype=torch.float64))  # R_gt of a frontal head
    for axis, column in (((0, 1, 0), 0), ((1, 0, 0), 1), ((0, 0, 1), 2)):
        # a head rotation by 20° about a camera axis (OpenGL axes: Q = diag(1,-1,-1)·R)
        R = frontal @ _axis_angle(torch.tensor(axis, dtype=torch.float64), 20.0)
        ypr = M.yaw_pitch_roll_deg(R[None])[0]
        expected = torch.zeros(3, dtype=torch.float64)
        expected[column] = 20.0
        assert torch.allclose(ypr, expected, atol=1e-6), (axis, ypr)
        err = M.yaw_pitch_roll_error_deg(R[None], frontal[None])[0]
        assert torch.allclose(err, expected, atol=1e-6)


# --------------------------------------------------------------------------------------------
# Z_n
# --------------------------------------------------------------------------------------------
def _zn_reference_loop(pred: np.ndarray, gt: np.ndarray, n: int) -> float:
    """The reference pairing read literally: point i is paired with the i-th nearest GT point of each of
    the points 1..n (rank 0 = the point itself)."""
    N = len(gt)
    agree = []
    for col in range(1, n + 1):
        order = sorted(range(N), key=lambda q: np.linalg.norm(gt[q] - gt[col]))
        for i in range(N):
            j = order[i]
            agree.append((gt[i, 2] >= gt[j, 2]) == (pred[i, 2] >= pred[j, 2]))
    return float(np.mean(agree))


def _zn_local_loop(pred: np.ndarray, gt: np.ndarray, n: int) -> float:
    """The paper's Z_n: each point against its n nearest other GT points."""
    agree = []
    for i in range(len(gt)):
        others = sorted((q for q in range(len(gt)) if q != i), key=lambda q: np.linalg.norm(gt[q] - gt[i]))
        for j in others[:n]:
            agree.append((gt[i, 2] >= gt[j, 2]) == (pred[i, 2] >= pred[j, 2]))
    return float(np.mean(agree))


@pytest.mark.parametrize("n", [1, 5])
def test_zn_matches_double_loop_oracles(n):
    gen = torch.Generator().manual_seed(4)
    gt = torch.randn(3, 50, 3, generator=gen)
    pred = gt + 0.4 * torch.randn(3, 50, 3, generator=gen)
    ref = M.z_n_accuracy_reference(pred, gt, n)
    loc = M.z_n_accuracy_local(pred, gt, n)
    for b in range(3):
        assert ref[b].item() == pytest.approx(_zn_reference_loop(pred[b].numpy(), gt[b].numpy(), n), abs=1e-6)
        assert loc[b].item() == pytest.approx(_zn_local_loop(pred[b].numpy(), gt[b].numpy(), n), abs=1e-6)
    assert not torch.allclose(ref, loc)  # the two pairings really differ
    assert (ref < 1).all() and (loc < 1).all()


def test_zn_reference_equals_the_full_matrix_procedure_in_float32():
    """The reference's own steps on a FLAME-sized head subset: cdist of all points, argsort along
    dim 0, columns 1..n. Same float32 ranking, so the values are identical, not just close."""
    gen = torch.Generator().manual_seed(8)
    gt = 0.08 * torch.randn(3669, 3, generator=gen)
    pred = 1.7 * gt + 0.01 * torch.randn(3669, 3, generator=gen)
    partner = torch.argsort(torch.cdist(gt, gt), dim=0)[:, 1:6]
    g, p = gt[:, 2], pred[:, 2]
    want = ((g[:, None] >= g[partner]) == (p[:, None] >= p[partner])).float().mean()
    assert M.z_n_accuracy_reference(pred[None], gt[None]).item() == want.item()


def test_zn_invariant_to_prediction_scale_and_translation():
    gen = torch.Generator().manual_seed(5)
    gt = torch.randn(2, 400, 3, generator=gen)
    pred = gt + 0.3 * torch.randn(2, 400, 3, generator=gen)
    moved = 2.5 * pred + torch.tensor([3.0, -7.0, 11.0])
    for fn in (M.z_n_accuracy_local, M.z_n_accuracy_reference):
        assert torch.equal(fn(pred, gt), fn(moved, gt))
        assert fn(-pred, gt).max() < fn(pred, gt).min()  # a depth flip is noticed


def test_zn_local_drops_self_when_duplicates_come_first():
    gt = torch.tensor([[[0.0, 0, 0], [0.0, 0, 0], [1.0, 0, 1], [0.0, 2, 2], [5.0, 0, 3]]])
    pred = gt.clone()
    pred[0, 1, 2] = -1.0  # point 1 (the duplicate of point 0) now nearer than point 0
    got = M.z_n_accuracy_local(pred, gt, n=1)
    assert got.item() == pytest.approx(_zn_local_loop(pred[0].numpy(), gt[0].numpy(), 1))


# --------------------------------------------------------------------------------------------
# 3D shape
# --------------------------------------------------------------------------------------------
def test_point_to_surface_distance_per_point():
    tri = torch.tensor([[[0.0, 0, 0], [10.0, 0, 0], [0.0, 10, 0]]])
    faces = torch.tensor([[0, 1, 2]])
    points = torch.tensor([[[2.0, 2, 3], [2.0, 2, -4], [-3.0, -4, 0], [20.0, 0, 0], [5.0, 5, 0]]])
    d = M.point_to_surface_distance(points, tri, faces)
    assert torch.allclose(d, torch.tensor([[3.0, 4.0, 5.0, 10.0, 0.0]]), atol=1e-5)


@pytest.mark.parametrize("stretch, spread, tiers", [(1.3, 0.02, (0.7, 0.95, 0.99)), (3.0, 0.3, (0.7, 0.95, 0.99)),
                                                  (1.0, 0.05, (0.5,)), (1.0, 0.05, ())])
def test_point_to_surface_matches_brute_force(meshes, monkeypatch, stretch, spread, tiers):
    """The CPU path (KD-tree pruning) against pytorch3d's kernel over every triangle, on meshes
    with a few long slivers, points near and far, and other radius tiers: the same numbers, bit
    for bit (the same kernel on a set of triangles that holds the nearest)."""
    from pytorch3d.loss.point_mesh_distance import point_face_distance

    monkeypatch.setattr(M, "_RADIUS_TIERS", tiers)
    verts, faces, _, _ = meshes
    gen = torch.Generator().manual_seed(9)
    mesh = verts[:2].float() * 1000
    mesh[:, :5] *= stretch  # stretch a few vertices: their triangles become long slivers
    points = mesh[:, torch.randperm(mesh.shape[1], generator=gen)[:300]]
    points = points * (1 + spread * torch.rand(2, 300, 1, generator=gen)) + 2 * torch.randn(2, 300, 3, generator=gen)
    got = M.point_to_surface_distance(points, mesh, faces)
    for b in range(2):
        brute = point_face_distance(points[b].contiguous(), torch.tensor([0]), mesh[b][faces].contiguous(),
                                    torch.tensor([0]), 300, 1e-6).clamp_min(0).sqrt()
        assert torch.equal(got[b], brute)
    assert got.max() > 1


def test_knn_matches_brute_force():
    gen = torch.Generator().manual_seed(10)
    q, p = torch.randn(2, 40, 3, generator=gen), torch.randn(2, 70, 3, generator=gen)
    sq, idx = M.knn(q, p, 4)
    d = torch.cdist(q.double(), p.double()).square()
    want_sq, want_idx = torch.topk(d, 4, dim=-1, largest=False)
    assert torch.equal(idx, want_idx) and torch.allclose(sq.double(), want_sq, atol=1e-6)


def test_similarity_transformed_prediction_gives_zero_mm(meshes):
    verts, faces, lmk, region = meshes
    gen = torch.Generator().manual_seed(6)
    R = _random_rotations(3, gen)
    s = torch.tensor([0.5, 3.0, 1200.0], dtype=torch.float64)[:, None, None]
    pred = s * verts @ R.transpose(1, 2) + torch.randn(3, 1, 3, generator=gen, dtype=torch.float64)
    for protocol, points in (("landmarks", verts[:, region]), ("now", verts)):
        err = M.shape_error_mm(pred, pred[:, lmk[list(ALIGN7)]], points, verts[:, lmk[list(ALIGN7)]],
                               faces, protocol)
        assert err["mean"].max() < 1e-3 and err["median"].max() < 1e-3, protocol


def test_now_refinement_brings_a_similarity_transformed_gt_back_to_zero(meshes):
    """The GT mesh under a random similarity, its landmarks off by a 4° rotation and 3 mm: the
    landmark similarity leaves millimetres; NoW's scan-to-mesh refinement of scale, rotation and
    translation brings the error back to 0."""
    verts, faces, lmk, region = meshes
    gen = torch.Generator().manual_seed(7)
    R = _random_rotations(3, gen)
    s = torch.tensor([0.8, 2.0, 15.0], dtype=torch.float64)[:, None, None]
    pred = s * verts @ R.transpose(1, 2) + torch.randn(3, 1, 3, generator=gen, dtype=torch.float64)
    pred7 = pred[:, lmk[list(ALIGN7)]]
    centre = pred7.mean(1, keepdim=True)
    wrong7 = (pred7 - centre) @ _axis_angle(torch.tensor([0.3, 1.0, 0.2]), 4.0).T + centre + 0.003 * s
    gt7 = verts[:, lmk[list(ALIGN7)]]
    plain = M.shape_error_mm(pred, wrong7, verts[:, region], gt7, faces)["mean"]
    refined = M.shape_error_mm(pred, wrong7, verts, gt7, faces, "now")
    assert plain.min() > 1.0
    assert refined["mean"].max() < 1e-3 and refined["median"].max() < 1e-3


def test_shape_error_measures_a_known_offset(meshes):
    """GT points pushed 2 mm out along the normal of a flat patch are 2 mm from the surface."""
    verts, faces, lmk, region = meshes
    pred = verts[:1]
    lmk7 = pred[:, lmk[list(ALIGN7)]]
    # GT points: centroids of a few far-from-landmark triangles, lifted 2 mm along their normals
    tri = pred[0][faces[:50]]
    normal = torch.nn.functional.normalize(torch.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0], dim=-1), dim=-1)
    points = (tri.mean(1) + 0.002 * normal)[None]
    err = M.shape_error_mm(pred, lmk7, points, lmk7, faces)
    assert err["median"].item() == pytest.approx(2.0, abs=0.05)
    assert err["std"].item() < 0.1


def test_reflection_allowed_only_in_reference_chamfer(meshes):
    verts, faces, lmk, region = meshes
    mirrored = verts * torch.tensor([-1.0, 1.0, 1.0], dtype=torch.float64)
    lmk7_gt, lmk7_m = verts[:, lmk[list(ALIGN7)]], mirrored[:, lmk[list(ALIGN7)]]
    assert M.chamfer_reference(mirrored, lmk7_m, verts, verts[:, lmk], region).max() < 1e-8
    assert M.shape_error_mm(mirrored, lmk7_m, verts[:, region], lmk7_gt, faces)["mean"].min() > 0.5


def _chamfer_oracle(pred, pred7, gt, gt68, region):
    """The reference chamfer with numpy: scale, MATLAB-style Procrustes (reflection allowed), brute force."""
    scale = 20.0 / np.linalg.norm(gt68[39] - gt68[42])
    gt, gt7 = gt * scale, gt68[list(ALIGN7)] * scale
    mu_x, mu_y = gt7.mean(0), pred7.mean(0)
    X0, Y0 = gt7 - mu_x, pred7 - mu_y
    U, S, Vt = np.linalg.svd(X0.T @ Y0)
    T = Vt.T @ U.T
    b = S.sum() / (Y0 ** 2).sum()
    moved = b * (pred - mu_y) @ T + mu_x
    d2 = ((gt[region][:, None] - moved[None]) ** 2).sum(-1)
    return d2.min(1).mean()


def test_chamfer_reference_matches_numpy_oracle(meshes):
    verts, faces, lmk, region = meshes
    gen = torch.Generator().manual_seed(7)
    pred = 3.0 * verts @ _random_rotations(3, gen).transpose(1, 2) + 0.02 * torch.randn(
        verts.shape, generator=gen, dtype=torch.float64)
    pred7 = pred[:, lmk[list(ALIGN7)]] + 0.01 * torch.randn(3, 7, 3, generator=gen, dtype=torch.float64)
    got = M.chamfer_reference(pred, pred7, verts, verts[:, lmk], region)
    for b in range(3):
        want = _chamfer_oracle(pred[b].numpy(), pred7[b].numpy(), verts[b].numpy(), verts[b, lmk].numpy(),
                               region.numpy())
        assert got[b].item() == pytest.approx(want, rel=1e-4)
    assert got.min() > 0.01


# --------------------------------------------------------------------------------------------
# The NoW protocol: its crop and its refinement
# --------------------------------------------------------------------------------------------
def _now_landmarks() -> torch.Tensor:
    """7 landmarks (NoW order) whose sphere is known: nose bottom at the origin, nose bridge (inner
    eye corners' midpoint) at (0, 10, 0), outer eye corners 40 apart -> centre (0, 3, 0), radius
    1.4 × (40 + 10) / 2 = 35.  [1,7,3] float64"""
    return torch.tensor([[[-20.0, 10, 0], [-1, 10, 0], [1, 10, 0], [20, 10, 0], [0, 0, 0], [-15, -20, 5],
                          [15, -20, 5]]], dtype=torch.float64)


def test_now_crop_keeps_exactly_the_points_inside_its_sphere():
    lmk7 = _now_landmarks()
    centre, radius = M.now_crop_sphere(lmk7)
    assert centre[0].tolist() == pytest.approx([0.0, 3.0, 0.0]) and radius.item() == pytest.approx(35.0)
    gen = torch.Generator().manual_seed(11)
    directions = torch.nn.functional.normalize(torch.randn(200, 3, generator=gen, dtype=torch.float64), dim=-1)
    lengths = torch.tensor([34.999, 35.001, 10.0, 60.0], dtype=torch.float64).repeat(50)
    points = centre + directions * lengths[:, None]
    on_sphere = torch.tensor([[35.0, 3.0, 0.0], [0.0, 38.0, 0.0], [0.0, 3.0, -35.0]], dtype=torch.float64)
    mask = M.now_crop_mask(torch.cat([points, on_sphere])[None], lmk7)[0]
    assert mask.tolist() == (lengths < 35).tolist() + [True] * 3  # the boundary is inside (<=)


def test_now_scores_a_known_normal_offset():
    """Scan points 2 mm off a flat 100 mm patch along its normal, up and down in a checkerboard
    symmetric about the centre (no scale, rotation or translation brings them closer), score 2 mm
    after NoW's refinement; every point is inside the crop."""
    n, cell = 20, 0.005                                                  # 20 x 20 cells of 5 mm
    grid = torch.stack(torch.meshgrid(torch.arange(n + 1.0), torch.arange(n + 1.0), indexing="ij"), -1)
    verts = torch.cat([(grid.reshape(-1, 2) - n / 2) * cell, torch.zeros((n + 1) ** 2, 1)], -1).double()[None]
    i, j = torch.meshgrid(torch.arange(n), torch.arange(n), indexing="ij")
    a, b, c, d = (i * (n + 1) + j), (i * (n + 1) + j + 1), ((i + 1) * (n + 1) + j), ((i + 1) * (n + 1) + j + 1)
    faces = torch.cat([torch.stack([a, b, d], -1), torch.stack([a, d, c], -1)], 0).reshape(-1, 3)
    inner = ((i > 0) & (i < n - 1) & (j > 0) & (j < n - 1)).reshape(-1).repeat(2)
    sign = (1.0 - 2.0 * ((i + j) % 2)).reshape(-1).repeat(2).double()
    points = verts[0][faces].mean(1) + 0.002 * sign[:, None] * torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64)
    points = points[inner][None]
    lmk7 = torch.tensor([[[-0.1, 0.01, 0.02], [-0.01, 0.01, 0.03], [0.01, 0.01, 0.03], [0.1, 0.01, 0.02],
                          [0.0, -0.01, 0.03], [-0.03, -0.04, 0.025], [0.03, -0.04, 0.025]]], dtype=torch.float64)
    err = M.shape_error_mm(verts, lmk7, points, lmk7, faces, "now")
    assert M.now_crop_mask(points, lmk7).all() and not torch.isnan(err["distances"]).any()
    assert err["median"].item() == pytest.approx(2.0, abs=1e-3)
    assert err["mean"].item() == pytest.approx(2.0, abs=1e-3) and err["std"].item() < 1e-3


def test_now_alignment_allows_a_reflection_as_the_official_procrustes():
    """NoW's landmark Procrustes takes a reflection when it fits better ('best'); the landmarks
    protocol never does."""
    from pytorch3d.utils import ico_sphere

    sphere = ico_sphere(2)
    v, f = sphere.verts_packed().double()[None] * 0.09, sphere.faces_packed()
    v = v * torch.tensor([1.0, 1.3, 0.8], dtype=torch.float64)  # an ellipsoid: no symmetry but the mirror
    ids = torch.tensor([0, 5, 9, 14, 20, 33, 40])
    mirrored = v * torch.tensor([-1.0, 1.0, 1.0], dtype=torch.float64)
    now = M.shape_error_mm(mirrored, mirrored[:, ids], v, v[:, ids], f, "now")
    assert now["mean"].item() < 1e-3
    assert M.shape_error_mm(mirrored, mirrored[:, ids], v, v[:, ids], f)["mean"].item() > 0.5


def test_nearest_surface_points_are_on_the_surface_at_the_kernel_distance(meshes):
    """The closest points agree with point_to_surface_distance and lie on the nearest triangle's plane."""
    verts, faces, _, _ = meshes
    gen = torch.Generator().manual_seed(12)
    mesh = verts[0].float() * 1000
    points = mesh[torch.randperm(len(mesh), generator=gen)[:200]] * 1.05 + torch.randn(200, 3, generator=gen)
    d, closest = M.nearest_surface_points(points, mesh, faces)
    assert torch.allclose(d, M.point_to_surface_distance(points[None], mesh[None], faces)[0], atol=1e-4)
    assert torch.allclose((points - closest).norm(dim=-1), d, atol=1e-3)
    assert torch.allclose(M.point_to_surface_distance(closest[None], mesh[None], faces)[0], torch.zeros(200), atol=1e-3)


def test_unknown_shape_protocol_is_refused_naming_the_known_ones(meshes):
    verts, faces, lmk, region = meshes
    with pytest.raises(ValueError, match="unknown shape protocol 'icp' \\(known: landmarks, now\\)"):
        M.shape_error_mm(verts, verts[:, :7], verts, verts[:, :7], faces, "icp")
