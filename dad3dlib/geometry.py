"""The geometry several stages share, as pure functions of arrays (numpy or torch where noted).

Conventions (docs/ARCHITECTURE.md): ``P`` maps camera space straight to pixels, bottom-up; ``MV``
maps model space to camera space (OpenGL axes: y up, the camera looks down -z); image rows are
top-down. A crop is ``crop = A @ [x_img, y_img, 1]`` with ``A`` [2,3].

Shapes: B batch, N points, V vertices, F faces, E edges.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

FLIP_YZ = (1.0, -1.0, -1.0)  # diag(1,-1,-1): OpenGL camera axes <-> the 3DMM rotation's axes
FRONTAL_ROT6D = (1.0, 0.0, 0.0, 0.0, -1.0, 0.0)  # R = diag(FLIP_YZ) in 6D (its first two columns): facing the camera


def flip_yz(matrix):
    """``diag(1,-1,-1) @ matrix[..., :3, :3]``: the GT rotation ``R`` of a model-view matrix, or
    a rotation in OpenGL camera axes. matrix [...,3,3] or [...,4,4] -> [...,3,3] (numpy or torch)."""
    m = matrix[..., :3, :3]
    sign = m.new_tensor(FLIP_YZ) if isinstance(m, Tensor) else np.asarray(FLIP_YZ)
    return m * sign[:, None]


def project(vertices, mv, p, height):
    """Image pixels (x right, y down) of model-space points: the one projection formula.

    vertices [...,N,3], mv [...,4,4], p [...,4,4], height: scalar or [...] -> [...,N,2].
    numpy arrays or torch tensors (differentiable); ``p = P·MV·[v,1]``, ``(x, y) = p[:2]/p[3]``,
    image ``y = height - y``.
    """
    m = p @ mv                                                     # [...,4,4]
    clip = vertices @ m[..., :, :3].swapaxes(-1, -2) + m[..., None, :, 3]  # [...,N,4]
    x = clip[..., 0] / clip[..., 3]
    y = clip[..., 1] / clip[..., 3]
    if not np.isscalar(height):
        height = height[..., None]
    stack = np.stack if isinstance(x, np.ndarray) else torch.stack
    return stack([x, height - y], -1)


def perspective_projection(focal_px: float, cx: float, cy: float, near: float, far: float) -> np.ndarray:
    """P [4,4] float64 mapping camera space to pixels (bottom-up) with OpenGL depth terms.

    ``(cx, cy)``: principal point in pixels, y measured bottom-up (as ``P`` itself).
    ``P = [[f,0,-cx,0],[0,f,-cy,0],[0,0,A,B],[0,0,-1,0]]``: ``x = cx + f·X/(-Z)``.
    """
    a = -(far + near) / (far - near)
    b = -2.0 * far * near / (far - near)
    return np.array([[focal_px, 0.0, -cx, 0.0],
                     [0.0, focal_px, -cy, 0.0],
                     [0.0, 0.0, a, b],
                     [0.0, 0.0, -1.0, 0.0]])


def orthographic_projection(cx: float, cy: float, near: float, far: float) -> np.ndarray:
    """P [4,4] float64 of an orthographic camera in pixel units: ``x = cx + X``, ``y = cy + Y``
    (bottom-up), with the depth terms of :func:`perspective_projection`: ``near`` and ``far`` are
    distances along the view direction (``-Z``) mapped to OpenGL depth -1 and +1, so nearer wins.
    """
    return np.array([[1.0, 0.0, 0.0, cx],
                     [0.0, 1.0, 0.0, cy],
                     [0.0, 0.0, -2.0 / (far - near), -(far + near) / (far - near)],
                     [0.0, 0.0, 0.0, 1.0]])


def viewing_ray(vertices: np.ndarray, mv: np.ndarray, p: np.ndarray) -> np.ndarray:
    """The unit direction from the camera's centre to the centroid of ``vertices`` [N,3] (model
    space), in the axes of the GT rotation (:func:`flip_yz`: x right, y down, z away from the
    camera, so that the optical axis is (0, 0, 1)) -> [3]. The centre is the null vector of ``p``'s
    rows x, y, w (the origin for :func:`perspective_projection`); an orthographic ``p`` has it at
    infinity and every ray along the optical axis. numpy, float64."""
    centre = np.linalg.svd(np.asarray(p, np.float64)[[0, 1, 3]])[2][-1]  # [4] homogeneous, eye space
    if abs(centre[3]) < 1e-9 * np.linalg.norm(centre[:3]):
        ray = centre[:3]
    else:
        centroid = np.ones(len(vertices), vertices.dtype) @ vertices / len(vertices)  # a product: ~10x a mean's speed
        ray = mv[:3, :3] @ centroid + mv[:3, 3] - centre[:3] / centre[3]
    ray = ray * np.asarray(FLIP_YZ)
    return ray / np.linalg.norm(ray) * np.sign(ray[2])


def apparent_rotation(rotation: Tensor, ray: Tensor) -> Tensor:
    """The rotation a crop shows: ``rotation`` [B,3,3] (camera axes, :func:`flip_yz`) as seen by a
    camera turned, by the shortest arc, from the optical axis to look along ``ray`` [B,3] (unit,
    :func:`viewing_ray`) -> [B,3,3]. A crop cut around a head off the optical axis is such a turned
    camera's view, up to the small distortion of the turn, so a network that sees only the crop
    sees this rotation, not ``rotation``; they differ by the angle between ``ray`` and the axis."""
    from pytorch3d.transforms import axis_angle_to_matrix

    axis = torch.cross(ray.new_tensor([0.0, 0.0, 1.0]).expand_as(ray), ray, dim=-1)  # |axis| = sin
    sin, cos = axis.norm(dim=-1, keepdim=True), ray[..., 2:]
    angle = torch.atan2(sin, cos)
    turn = axis_angle_to_matrix(axis * torch.where(sin > 1e-12, angle / sin.clamp_min(1e-12), 1.0))
    return turn.transpose(-1, -2) @ rotation


def apply_affine(A, points):
    """Image -> crop pixels (or any 2D affine map). A [...,2,3], points [...,N,2] -> [...,N,2]
    (numpy or torch)."""
    return points @ A[..., :, :2].swapaxes(-1, -2) + A[..., None, :, 2]


def crop_to_image(points: Tensor, affine: Tensor) -> Tensor:
    """Invert the crop map ``crop = A @ [x, y, 1]``. points [B,L,2] crop px, affine [B,2,3] -> [B,L,2]"""
    M, t = affine[:, :, :2], affine[:, :, 2]
    return torch.linalg.solve(M, (points - t[:, None]).transpose(1, 2)).transpose(1, 2)


def landmarks_from_vertices(vertices, faces, face_idx, bary):
    """Barycentric points on a mesh (landmarks embedded as a face and barycentric coordinates).

    vertices [...,V,3], faces [F,3] int, face_idx [L] int, bary [L,3] -> [...,L,3] (numpy or torch)
    """
    tri = vertices[..., faces[face_idx], :]  # [...,L,3(corners),3]
    w = bary.to(vertices.dtype) if isinstance(vertices, Tensor) else bary.astype(vertices.dtype)
    return (tri * w[:, :, None]).sum(-2)


def vertex_normals(vertices: np.ndarray, faces: np.ndarray) -> np.ndarray:
    """Area-weighted unit vertex normals. vertices [V,3], faces [F,3] -> [V,3] float32."""
    tri = vertices[faces]                                              # [F,3,3]
    fn = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])        # [F,3], |fn| = 2·area
    n = np.zeros_like(vertices, dtype=np.float64)
    for corner in range(3):
        for axis in range(3):
            n[:, axis] += np.bincount(faces[:, corner], fn[:, axis], minlength=len(vertices))
    n /= np.maximum(np.linalg.norm(n, axis=1, keepdims=True), 1e-12)
    return n.astype(np.float32)


def edge_counts(faces: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Undirected edges [E,2] (sorted ids, sorted rows) of a triangle mesh faces [F,3], and how
    many faces use each [E]."""
    e = np.sort(faces[:, [0, 1, 1, 2, 2, 0]].reshape(-1, 2), axis=1)
    return np.unique(e, axis=0, return_counts=True)
