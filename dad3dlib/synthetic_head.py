"""The project's FLAME-compatible synthetic head model, written in FLAME's file formats.

The surface is an implicit anatomy: a signed-distance field of smoothly blended primitives
(cranium, face, mandible, cheekbones, brow ridge, nose, lips, ears, neck; eye sockets carved,
eyeballs with eyelids set in, a mouth slit opening into a mouth cavity), meshed with marching
cubes and decimated to FLAME's vertex budget. Identity and expression components are principal
components of smooth ambient displacement fields (anatomical ones first, then random smooth
ones); joints, skinning weights, landmarks and vertex subsets are placed from the same anatomy.

Axes as FLAME: metres, x towards the subject's left, y up, z out of the face. ``ANATOMY`` is
given in a local frame with the eyes at y = 0; the finished mesh is moved so that the centre of
the head's bounding box is at (0, 0, -0.05), the skull centre that DAD-3DNet's canonical
``z += 0.05`` moves to the origin.

Shapes: V vertices, F faces, N query points.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from .flame import N_EXPR as N_EXPRESSION
from .flame import N_SHAPE as N_IDENTITY
from .flame import FlameModel, FlameTopology, save_flame_assets
from .geometry import edge_counts, landmarks_from_vertices

HEAD_CENTRE = np.array([0.0, 0.0, -0.05])  # where the head's bounding-box centre goes
# meshing: voxel (m), grid box (local frame; x symmetric on the grid), vertex budget, a space
# magnified around the face for the decimation, relax-and-project rounds
GRID_STEP = 0.0015
GRID_BOX = ((-0.102, 0.102), (-0.222, 0.126), (-0.132, 0.102))
TARGET_VERTICES = 5000
DECIMATION_FOCUS = dict(c=(0.0, -0.03, 0.05), sigma=0.06, gain=1.5)
RELAX_STEPS = 3
N_DYNAMIC_ROWS = 79  # FLAME's dynamic embedding has one row per yaw bin; ours are all equal
NECK_PLANE = (-0.125, -0.433, 0.03)  # neck where y < y0 + slope·(z - z0) (local frame)
SUBSET_AXIS_Z = -0.03                # vertical axis for the azimuth of subset regions
NECK_JOINTS_Y = (-0.16, -0.07)       # heights of the global and neck joints on the neck axis
JAW_BACK_Z = -0.03                   # the jaw's skinning weights fade in from here forwards
# jaw contour: fan centre (x, y); faces within reach of the jaw chain (from the cheek at ear level,
# CONTOUR_TOP, down the ramus and the mandible to the chin) and in front of the ears
CONTOUR_CENTRE, CONTOUR_TOP, CONTOUR_REACH, CONTOUR_MIN_Z = (0.0, 0.0), (0.064, 0.004, -0.008), 0.022, -0.015

# Plain data: centres c, radii r (semi-axes) in metres, local frame (eyes at y = 0). Paired parts
# are given for the subject's left (+x) and mirrored.
ANATOMY = {
    "cranium": dict(c=(0.0, 0.030, -0.031), r=(0.074, 0.086, 0.093), taper=0.10),
    "midface": dict(c=(0.0, -0.035, 0.020), r=(0.061, 0.060, 0.042)),
    "lower_face": dict(c=(0.0, -0.076, 0.000), r=(0.045, 0.034, 0.050), taper=0.35),
    "chin": dict(c=(0.0, -0.098, 0.046), r=(0.022, 0.017, 0.013)),
    "jaw_line": dict(a=(0.047, -0.082, -0.016), b=(0.014, -0.102, 0.044), r=0.009),
    "ramus": dict(a=(0.056, -0.020, -0.026), b=(0.047, -0.082, -0.016), r=0.009),
    "neck": dict(x=0.0, z=-0.032, lean=0.10, r=(0.055, 0.056), flare=0.15, bottom=-0.195, top=-0.02),
    "cheekbone": dict(c=(0.048, -0.008, 0.028), r=(0.017, 0.012, 0.018)),
    "socket": dict(c=(0.031, 0.004, 0.057), r=(0.020, 0.013, 0.012)),
    "brow": dict(a=(0.008, 0.017, 0.058), b=(0.046, 0.019, 0.045), r=0.0055),
    "nose_bridge": dict(a=(0.0, 0.010, 0.055), b=(0.0, -0.031, 0.078), ra=0.0065, rb=0.0075),
    "nose_tip": dict(c=(0.0, -0.036, 0.0785), r=(0.0095, 0.0085, 0.0090)),
    "ala": dict(c=(0.0110, -0.041, 0.064), r=(0.0070, 0.0065, 0.0085)),
    "nose_base": dict(c=(0.0, -0.043, 0.064), r=(0.014, 0.005, 0.011)),
    "upper_lip": dict(c=(0.0, -0.062, 0.059), r=(0.024, 0.0080, 0.0075)),
    "lower_lip": dict(c=(0.0, -0.0745, 0.057), r=(0.021, 0.0075, 0.0075)),
    # mouth slit: y = y + bend·(x/half_width)², half-thickness; x-z extent: an ellipse of
    # semi-axes half_width, depth centred at z (in front of the lips); the cavity behind it
    "mouth": dict(y=-0.0685, bend=-0.0015, half_width=0.025, half_gap=0.0013, z=0.075, depth=0.035),
    "mouth_cavity": dict(c=(0.0, -0.069, 0.040), r=(0.019, 0.009, 0.014)),
    # eye: eyeball centre and semi-axes, lid ball radius; the opening (almond, in the x-y plane):
    # half width, upper/lower lid heights, rise of the outer corner, depth of its floor
    "eye": dict(c=(0.032, 0.0, 0.036), r=(0.0145, 0.0123, 0.0123), lid=0.0150, half_width=0.0145,
                upper=0.0055, lower=0.0040, rise=0.0012, floor=0.004),
    # ear: centre, semi-axes of the plate (up, front-back), half-thickness, rim radius,
    # tilt back and turn out (rad); concha bowl carved into the outer face
    "ear": dict(c=(0.078, -0.008, -0.042), r=(0.031, 0.016), half=0.002, rim=0.003,
                tilt=0.26, turn=0.35, concha_c=(-0.004, 0.002, 0.0075), concha_r=(0.016, 0.010, 0.0065)),
}


# --------------------------------------------------------------------------------------------
# Signed-distance primitives (points p [N,3] -> distances [N])
# --------------------------------------------------------------------------------------------
def smin(a: np.ndarray, b: np.ndarray, k: float) -> np.ndarray:
    """Smooth union (polynomial, blend radius k)."""
    h = np.clip(0.5 + 0.5 * (b - a) / k, 0.0, 1.0)
    return b + (a - b) * h - k * h * (1.0 - h)


def smax(a: np.ndarray, b: np.ndarray, k: float) -> np.ndarray:
    """Smooth intersection."""
    return -smin(-a, -b, k)


def sd_ellipsoid(p: np.ndarray, c, r, taper: float = 0.0) -> np.ndarray:
    """Ellipsoid (first-order distance); ``taper`` narrows x towards +z (face side)."""
    q = (p - np.asarray(c, p.dtype)) / np.asarray(r, p.dtype)
    if taper:
        q[:, 0] /= 1.0 - taper * np.clip(q[:, 2], -1.0, 1.0)
    k0 = np.linalg.norm(q, axis=1)
    k1 = np.linalg.norm(q / np.asarray(r, p.dtype), axis=1)
    return k0 * (k0 - 1.0) / np.maximum(k1, 1e-9)


def sd_capsule(p: np.ndarray, a, b, ra: float, rb: float | None = None) -> np.ndarray:
    """Segment a-b swept by a sphere whose radius goes linearly from ra to rb."""
    a, b = np.asarray(a, p.dtype), np.asarray(b, p.dtype)
    ab = b - a
    t = np.clip((p - a) @ ab / (ab @ ab), 0.0, 1.0)
    rb = ra if rb is None else rb
    return np.linalg.norm(p - a - t[:, None] * ab, axis=1) - (ra + t * (rb - ra))


def side_x(v, side: float) -> tuple:
    """A left-side (+x) point on the given side (+1 left, -1 right)."""
    return (side * v[0], v[1], v[2])


def ear_frame(a: dict, side: float) -> tuple[np.ndarray, np.ndarray]:
    """Ear centre [3] and rows (up, front, out) [3,3] of its local frame; side +1 left, -1 right."""
    tilt, turn = a["tilt"], a["turn"]
    up = np.array([0.0, np.cos(tilt), -np.sin(tilt)])
    out = np.array([np.cos(turn) * side, 0.0, np.sin(turn)])
    out -= up * (out @ up)
    out /= np.linalg.norm(out)
    front = np.cross(up, out) * side  # towards +z
    c = np.array(a["c"]) * (side, 1, 1)
    return c, np.stack([up, front, out])


def sd_ear(p: np.ndarray, a: dict, side: float) -> np.ndarray:
    """A rounded elliptic plate (helix rim) with the concha bowl carved into its outer face."""
    c, frame = ear_frame(a, side)
    q = (p - c) @ frame.T.astype(p.dtype)  # [N,3] (up, front, out)
    ru, rv = a["r"]
    d2 = (np.hypot(q[:, 0] / ru, q[:, 1] / rv) - 1.0) * min(ru, rv)
    dw = np.abs(q[:, 2]) - a["half"]
    outside = np.hypot(np.maximum(d2, 0.0), np.maximum(dw, 0.0))
    plate = outside + np.minimum(np.maximum(d2, dw), 0.0) - a["rim"]
    bowl = sd_ellipsoid(q, a["concha_c"], a["concha_r"])
    return smax(plate, -bowl, 0.002)


def eye_opening(p: np.ndarray, a: dict, side: float) -> np.ndarray:
    """Almond-shaped tube along z through the lids, open from the eyeball's floor forwards."""
    c = a["c"]
    t = (p[:, 0] - side * c[0]) * side / a["half_width"]      # -1 inner corner, +1 outer corner
    v = p[:, 1] - c[1] - a["rise"] * t
    bulge = np.maximum(1.0 - t ** 2, 0.0)
    lids = np.maximum(v - a["upper"] * bulge * (1.0 - 0.15 * t), -a["lower"] * bulge - v)
    return np.maximum.reduce([lids, (np.abs(t) - 1.0) * a["half_width"], c[2] + a["floor"] - p[:, 2]])


def sd_mouth(p: np.ndarray, m: dict, cavity: dict) -> np.ndarray:
    """The mouth slit and the cavity behind it. The slit is a thin sheet around y = y_slit(x),
    bounded by an ellipse in x-z that leaves the lip surface at the mouth corners."""
    w = m["half_width"]
    s = np.clip(p[:, 0] / w, -1.0, 1.0)
    y_slit = m["y"] + m["bend"] * s ** 2
    gap = m["half_gap"] * np.maximum(1.0 - s ** 2, 0.0) ** 0.25
    extent = (np.hypot(p[:, 0] / w, (p[:, 2] - m["z"]) / m["depth"]) - 1.0) * min(w, m["depth"])
    slit = np.maximum(np.abs(p[:, 1] - y_slit) - gap, extent)
    return smin(slit, sd_ellipsoid(p, cavity["c"], cavity["r"]), 0.002)


def sd_neck(p: np.ndarray, n: dict) -> np.ndarray:
    """Elliptic cylinder leaning forward and widening going down, rounded bottom, open into the
    head at the top."""
    t = np.clip((n["top"] - p[:, 1]) / (n["top"] - n["bottom"]), 0.0, 1.0)
    z_axis = n["z"] + n["lean"] * (n["top"] - p[:, 1])
    grow = 1.0 + n["flare"] * t ** 2
    rx, rz = n["r"][0] * grow, n["r"][1] * grow
    side = (np.hypot((p[:, 0] - n["x"]) / rx, (p[:, 2] - z_axis) / rz) - 1.0) * np.minimum(rx, rz)
    return smax(smax(side, n["bottom"] - p[:, 1], 0.015), p[:, 1] - n["top"], 0.01)


def head_sdf(p: np.ndarray, a: dict = ANATOMY) -> np.ndarray:
    """Signed distance (negative inside) of the head at points p [N,3] (local frame) -> [N]."""
    sides = (1.0, -1.0)
    ellipsoid = lambda part, s: sd_ellipsoid(p, side_x(a[part]["c"], s), a[part]["r"])  # noqa: E731
    capsule = lambda part, s: sd_capsule(p, side_x(a[part]["a"], s), side_x(a[part]["b"], s), a[part]["r"])  # noqa: E731
    d = sd_ellipsoid(p, **a["cranium"])
    d = smin(d, sd_ellipsoid(p, **a["midface"]), 0.025)
    d = smin(d, sd_ellipsoid(p, **a["lower_face"]), 0.025)
    d = smin(d, sd_ellipsoid(p, **a["chin"]), 0.02)
    for s in sides:
        d = smin(d, capsule("jaw_line", s), 0.012)
        d = smin(d, capsule("ramus", s), 0.012)
    d = smin(d, sd_neck(p, a["neck"]), 0.025)
    for s in sides:
        d = smin(d, ellipsoid("cheekbone", s), 0.015)
    for s in sides:
        d = smax(d, -ellipsoid("socket", s), 0.006)
    for s in sides:
        d = smin(d, capsule("brow", s), 0.012)
    nb = a["nose_bridge"]
    nose = sd_capsule(p, nb["a"], nb["b"], nb["ra"], nb["rb"])
    nose = smin(nose, sd_ellipsoid(p, **a["nose_tip"]), 0.006)
    nose = smin(nose, sd_ellipsoid(p, **a["nose_base"]), 0.006)
    for s in sides:
        nose = smin(nose, ellipsoid("ala", s), 0.007)
    d = smin(d, nose, 0.012)
    lips = smin(sd_ellipsoid(p, **a["upper_lip"]), sd_ellipsoid(p, **a["lower_lip"]), 0.004)
    d = smin(d, lips, 0.010)
    d = smax(d, -sd_mouth(p, a["mouth"], a["mouth_cavity"]), 0.0012)
    eye = a["eye"]
    for s in sides:
        c = np.array(side_x(eye["c"], s))
        d = smin(d, np.linalg.norm(p - c.astype(p.dtype), axis=1) - eye["lid"], 0.008)
        d = smax(d, -eye_opening(p, eye, s), 0.0012)
        d = np.minimum(d, sd_ellipsoid(p, c, eye["r"]))
        d = smin(d, sd_ear(p, a["ear"], s), 0.006)
    return d


# --------------------------------------------------------------------------------------------
# Meshing
# --------------------------------------------------------------------------------------------
def sample_grid(sdf, step: float = GRID_STEP, box=GRID_BOX, coarse: int = 4,
                chunk: int = 1 << 19) -> tuple[np.ndarray, np.ndarray]:
    """SDF on a regular grid, exact only near the surface: -> values [nx,ny,nz] float32, origin [3].

    A grid ``coarse`` times sparser is sampled first; blocks whose corners lie within two block
    diagonals of the surface are sampled at full resolution, the rest interpolated (they only
    need the right sign).
    """
    from scipy.ndimage import map_coordinates

    lo = np.array([b[0] for b in box])
    n_blocks = np.ceil((np.array([b[1] for b in box]) - lo) / (step * coarse)).astype(int)
    shape = tuple(n_blocks * coarse + 1)

    def evaluate(idx):  # fine-grid integer indices [N,3] -> values [N]
        pts = (lo + idx * step).astype(np.float32)
        return np.concatenate([sdf(pts[i:i + chunk]) for i in range(0, len(pts), chunk)])

    c_idx = np.stack(np.meshgrid(*[np.arange(n + 1) for n in n_blocks], indexing="ij"), -1)
    c_vals = evaluate(c_idx.reshape(-1, 3) * coarse).reshape(c_idx.shape[:3])
    fine = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), 0) / coarse
    vals = map_coordinates(c_vals, fine.reshape(3, -1), order=1).reshape(shape).astype(np.float32)
    near = np.abs(c_vals) < np.sqrt(3.0) * step * coarse
    blocks = np.zeros(tuple(n_blocks), bool)
    for dx in (0, 1):
        for dy in (0, 1):
            for dz in (0, 1):
                blocks |= near[dx:dx + n_blocks[0], dy:dy + n_blocks[1], dz:dz + n_blocks[2]]
    mask = np.zeros(shape, bool)
    mask[:-1, :-1, :-1] = blocks.repeat(coarse, 0).repeat(coarse, 1).repeat(coarse, 2)
    mask[1:] |= mask[:-1].copy()
    mask[:, 1:] |= mask[:, :-1].copy()
    mask[:, :, 1:] |= mask[:, :, :-1].copy()
    idx = np.argwhere(mask)
    vals[mask] = evaluate(idx)
    return vals, lo


def mesh_report(vertices: np.ndarray, faces: np.ndarray) -> dict:
    """Topology checks: closed (every edge in 2 faces), oriented, vertex links are single fans,
    connected, every vertex used; Euler characteristic and genus."""
    import scipy.sparse
    from scipy.sparse.csgraph import connected_components

    V = len(vertices)
    edges, counts = edge_counts(faces)
    directed = faces[:, [0, 1, 1, 2, 2, 0]].reshape(-1, 2)
    _, dcounts = np.unique(directed, axis=0, return_counts=True)
    adj = scipy.sparse.coo_matrix((np.ones(len(edges)), (edges[:, 0], edges[:, 1])), shape=(V, V))
    n_comp, _ = connected_components(adj, directed=False)
    # a vertex is a manifold point when its incident faces form one fan: #faces == #link edges
    # and the link (opposite edges) is one cycle, i.e. faces around it are edge-connected
    fan_ok = _single_fans(faces, V)
    chi = V - len(edges) + len(faces)
    return dict(vertices=V, faces=len(faces), closed=bool(np.all(counts == 2)),
                oriented=bool(np.all(dcounts == 1)), single_fans=fan_ok, components=int(n_comp),
                all_used=bool(len(np.unique(faces)) == V), euler=int(chi), genus=(2 - chi) // 2)


def _single_fans(faces: np.ndarray, V: int) -> bool:
    """Every vertex's incident faces form one cycle through shared edges (no pinch points)."""
    corner_v = faces.reshape(-1)                     # [3F]
    # each corner's link edge (next, previous vertex); the links of a vertex must chain into one cycle
    nxt = faces[:, [1, 2, 0]].reshape(-1)
    prv = faces[:, [2, 0, 1]].reshape(-1)
    order = np.argsort(corner_v, kind="stable")
    counts = np.bincount(corner_v, minlength=V)
    start = np.concatenate([[0], np.cumsum(counts)])
    for v in range(V):
        sl = order[start[v]:start[v + 1]]
        a, b = nxt[sl], prv[sl]
        succ = dict(zip(a.tolist(), b.tolist()))
        if len(succ) != len(sl):
            return False
        x, steps = a[0], 0
        while True:
            x = succ.get(int(x))
            steps += 1
            if x is None or steps > len(sl):
                return False
            if x == a[0]:
                break
        if steps != len(sl):
            return False
    return True


def neighbour_mean(faces: np.ndarray, V: int):
    """Sparse [V,V] operator: the mean of each vertex's edge neighbours."""
    import scipy.sparse

    edges, _ = edge_counts(faces)
    i = np.concatenate([edges[:, 0], edges[:, 1]])
    j = np.concatenate([edges[:, 1], edges[:, 0]])
    A = scipy.sparse.csr_matrix((np.ones(len(i)), (i, j)), shape=(V, V))
    return scipy.sparse.diags(1.0 / np.asarray(A.sum(1)).ravel()) @ A


def flip_edges(vertices: np.ndarray, faces: np.ndarray, passes: int = 4, flat: float = 0.97) -> np.ndarray:
    """Delaunay edge flips between nearly coplanar triangles (normals' cosine above ``flat``):
    removes slivers without changing the surface. faces [F,3] (closed mesh) -> [F,3], same
    orientation."""
    faces = faces.copy()
    F, V = len(faces), len(vertices)
    unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)  # noqa: E731
    for _ in range(passes):
        # half-edges u->w of each face, p the opposite corner
        u, w, p = faces.reshape(-1), faces[:, [1, 2, 0]].reshape(-1), faces[:, [2, 0, 1]].reshape(-1)
        fid = np.repeat(np.arange(F), 3)
        key = np.minimum(u, w) * V + np.maximum(u, w)
        order = np.lexsort((u > w, key))                  # each edge: (u<w half, u>w half)
        h1, h2 = order[0::2], order[1::2]                 # f1 = (u, w, p), f2 = (w, u, q)
        U, W, P, Q = vertices[u[h1]], vertices[w[h1]], vertices[p[h1]], vertices[p[h2]]
        n1, n2 = unit(np.cross(W - U, P - U)), unit(np.cross(U - W, Q - W))
        angle_p = np.arccos(np.clip((unit(U - P) * unit(W - P)).sum(1), -1, 1))
        angle_q = np.arccos(np.clip((unit(U - Q) * unit(W - Q)).sum(1), -1, 1))
        keep_orient = ((np.cross(Q - P, W - P) * n1).sum(1) > 0) & ((np.cross(U - P, Q - P) * n1).sum(1) > 0)
        cand = np.flatnonzero(((n1 * n2).sum(1) > flat) & (angle_p + angle_q > np.pi + 1e-9) & keep_orient)
        existing = set(key.tolist())
        touched = np.zeros(F, bool)
        flips = 0
        for e in cand[np.argsort(-(angle_p + angle_q)[cand])]:
            f1, f2 = fid[h1[e]], fid[h2[e]]
            a, b, c, d = u[h1[e]], w[h1[e]], p[h1[e]], p[h2[e]]
            new_key = min(c, d) * V + max(c, d)
            if touched[f1] or touched[f2] or new_key in existing:
                continue
            faces[f1], faces[f2] = (c, d, b), (c, a, d)
            existing.add(new_key)
            touched[[f1, f2]] = True
            flips += 1
        if not flips:
            break
    return faces


def project_to_surface(sdf, v: np.ndarray, iters: int = 3, h: float = 1e-4) -> np.ndarray:
    """Newton steps onto the zero level set along the finite-difference gradient. v [N,3] -> [N,3]."""
    for _ in range(iters):
        d = sdf(v.astype(np.float32)).astype(np.float64)
        g = np.stack([(sdf((v + e).astype(np.float32)) - sdf((v - e).astype(np.float32))) / (2 * h)
                      for e in np.eye(3) * h], axis=1)
        v = v - (d / np.maximum((g * g).sum(1), 1e-6))[:, None] * g
    return v


def radial_warp(p: np.ndarray, c, sigma: float, gain: float, inverse: bool = False) -> np.ndarray:
    """Magnify space around c: r -> r·(1 + gain·exp(-(r/sigma)²)), monotone for gain < 2.2.
    p [N,3] -> [N,3]; ``inverse`` undoes it (bisection on the radius)."""
    q = p - np.asarray(c)
    r = np.linalg.norm(q, axis=1)
    f = lambda x: x * (1.0 + gain * np.exp(-(x / sigma) ** 2))  # noqa: E731
    if not inverse:
        return np.asarray(c) + q * (f(r) / np.maximum(r, 1e-12))[:, None]
    lo, hi = r / (1.0 + gain), r.copy()
    for _ in range(50):
        mid = 0.5 * (lo + hi)
        below = f(mid) < r
        lo, hi = np.where(below, mid, lo), np.where(below, hi, mid)
    return np.asarray(c) + q * (0.5 * (lo + hi) / np.maximum(r, 1e-12))[:, None]


def mesh_head(anatomy: dict = ANATOMY, step: float = GRID_STEP,
              n_vertices: int = TARGET_VERTICES) -> tuple[np.ndarray, np.ndarray]:
    """Marching cubes of the head SDF, decimated to about n_vertices (in a space magnified around
    the face, so the face keeps more of them, as FLAME does), relaxed and projected back onto the
    surface.

    -> vertices [V,3] float64 (local frame), faces [F,3] int64 (counter-clockwise seen from outside)
    """
    import fast_simplification
    from skimage.measure import marching_cubes

    sdf = lambda p: head_sdf(p, anatomy)  # noqa: E731
    vals, origin = sample_grid(sdf, step)
    verts, faces, _, _ = marching_cubes(vals, 0.0, spacing=(step,) * 3, allow_degenerate=False)
    warped = radial_warp(verts + origin, **DECIMATION_FOCUS)
    warped, faces = fast_simplification.simplify(warped, faces.astype(np.int32),
                                                 target_count=2 * n_vertices - 4, agg=3)
    verts = radial_warp(warped, **DECIMATION_FOCUS, inverse=True)
    faces = faces.astype(np.int64)
    for _ in range(RELAX_STEPS):
        faces = flip_edges(verts, faces)
        verts = project_to_surface(sdf, verts + 0.3 * (neighbour_mean(faces, len(verts)) @ verts - verts))
    return verts, faces


# --------------------------------------------------------------------------------------------
# Landmarks: rays cast at the anatomy, embedded as (face, barycentric) like FLAME's
# --------------------------------------------------------------------------------------------
def ray_hits(vertices: np.ndarray, faces: np.ndarray, origins: np.ndarray,
             dirs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """First triangle hit by each ray (Moller-Trumbore).

    vertices [V,3], faces [F,3], origins [L,3], dirs [L,3] -> face ids [L] int64, bary [L,3]
    (weights of the face's three corners). Raises when a ray misses the mesh.
    """
    tri = vertices[faces]
    e1, e2 = tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0]
    out_f, out_b = [], []
    for o, d in zip(origins, dirs):
        pvec = np.cross(d, e2)
        det = (e1 * pvec).sum(1)
        ok = np.abs(det) > 1e-14
        inv = np.where(ok, 1.0 / np.where(ok, det, 1.0), 0.0)
        tvec = o - tri[:, 0]
        u = (tvec * pvec).sum(1) * inv
        qvec = np.cross(tvec, e1)
        v = (qvec @ d) * inv
        t = (qvec * e2).sum(1) * inv
        hit = ok & (u >= 0) & (v >= 0) & (u + v <= 1) & (t > 0)
        if not hit.any():
            raise ValueError(f"landmark ray from {o} along {d} misses the head mesh")
        f = int(np.argmin(np.where(hit, t, np.inf)))
        out_f.append(f)
        out_b.append((1.0 - u[f] - v[f], u[f], v[f]))
    return np.array(out_f, np.int64), np.array(out_b)


def landmark_rays(a: dict = ANATOMY) -> tuple[np.ndarray, np.ndarray]:
    """Rays [51,3] origins and directions (along -z) whose first hits are the iBUG landmarks
    17-67 (brows 17-26, nose 27-35, eyes 36-47, mouth 48-67; subject's right first)."""
    front = np.array([0.0, 0.0, -1.0])
    origins, dirs = [], []

    def frontal(x, y):
        origins.append((x, y, 0.3))
        dirs.append(front)

    for x, y in ((-0.050, 0.012), (-0.042, 0.019), (-0.033, 0.022), (-0.023, 0.021), (-0.013, 0.018)):
        frontal(x, y)                                           # 17-21 right brow, outer to inner
    for x, y in ((0.013, 0.018), (0.023, 0.021), (0.033, 0.022), (0.042, 0.019), (0.050, 0.012)):
        frontal(x, y)                                           # 22-26 left brow, inner to outer
    for y in (0.004, -0.008, -0.020, a["nose_tip"]["c"][1]):   # 27-30 bridge to tip
        frontal(0.0, y)
    for x, y in ((-0.013, -0.0455), (-0.0065, -0.0475), (0.0, -0.049), (0.0065, -0.0475), (0.013, -0.0455)):
        frontal(x, y)                                           # 31-35 nostril base
    e = a["eye"]
    lid = 0.0006  # rays just onto the lid margins

    def eye_point(side, t, part):  # part: 0 corner, +1 upper lid, -1 lower lid
        bulge = 1.0 - t * t
        v = {0: 0.0, 1: e["upper"] * bulge * (1 - 0.15 * t) + lid, -1: -e["lower"] * bulge - lid}[part]
        frontal(side * (e["c"][0] + t * e["half_width"]), e["c"][1] + e["rise"] * t + v)

    for t, part in ((1, 0), (1 / 3, 1), (-1 / 3, 1), (-1, 0), (-1 / 3, -1), (1 / 3, -1)):
        eye_point(-1.0, t, part)                                # 36-41 right eye from outer corner
    for t, part in ((-1, 0), (-1 / 3, 1), (1 / 3, 1), (1, 0), (1 / 3, -1), (-1 / 3, -1)):
        eye_point(1.0, t, part)                                 # 42-47 left eye from inner corner
    m = a["mouth"]
    y_slit = lambda x: m["y"] + m["bend"] * (x / m["half_width"]) ** 2  # noqa: E731
    corner = 0.0235
    outer = [(-corner, y_slit(-corner)), (-0.016, -0.0595), (-0.007, -0.0555), (0.0, -0.0565),
             (0.007, -0.0555), (0.016, -0.0595), (corner, y_slit(corner)),            # 48-54
             (0.017, -0.078), (0.009, -0.0815), (0.0, -0.082), (-0.009, -0.0815), (-0.017, -0.078)]
    up, lo = m["half_gap"] + 0.0008, -m["half_gap"] - 0.0008
    inner = [(-0.020, y_slit(-0.020)), (-0.009, y_slit(-0.009) + up), (0.0, y_slit(0.0) + up),
             (0.009, y_slit(0.009) + up), (0.020, y_slit(0.020)),                    # 60-64
             (0.009, y_slit(0.009) + lo), (0.0, y_slit(0.0) + lo), (-0.009, y_slit(-0.009) + lo)]
    for x, y in outer + inner:
        frontal(x, y)
    return np.array(origins, float), np.array(dirs, float)


def is_neck(vertices: np.ndarray) -> np.ndarray:
    """[V,3] (local frame) -> [V] bool: below the plane from under the chin to the skull base."""
    return vertices[:, 1] < NECK_PLANE[0] + NECK_PLANE[1] * (vertices[:, 2] - NECK_PLANE[2])


def segment_distance(p: np.ndarray, a, b) -> np.ndarray:
    """Distance [N] of points p [N,3] to the segment a-b."""
    return sd_capsule(p, a, b, 0.0)


def contour_landmarks(vertices: np.ndarray, faces: np.ndarray, a: dict = ANATOMY) -> tuple[np.ndarray, np.ndarray]:
    """The 17 jaw-contour landmarks as seen from the front (zero yaw), on the outline of the
    faces near the jaw (cheek, ramus, mandible border; not the ears or the neck): the chin (8)
    is the lowest vertex near the midline; the others are where 2D rays fanning from ear level
    (0) down to the chin and up the other side (16) leave that outline.
    -> face ids [17] int64, barycentric coordinates [17,3]."""
    ramus, jaw = a["ramus"], a["jaw_line"]
    chain = [CONTOUR_TOP, ramus["a"], ramus["b"], jaw["b"], (0.0, jaw["b"][1], jaw["b"][2])]
    near_jaw = np.full(len(vertices), np.inf)
    for side in (1.0, -1.0):
        pts = [np.array(c) * (side, 1.0, 1.0) for c in chain]
        for p0, p1 in zip(pts[:-1], pts[1:]):
            near_jaw = np.minimum(near_jaw, segment_distance(vertices, p0, p1))
    ok = (near_jaw < CONTOUR_REACH) & (vertices[:, 2] > CONTOUR_MIN_Z)
    midline = np.flatnonzero(ok & (np.abs(vertices[:, 0]) < 0.008))
    menton = midline[np.argmin(vertices[midline, 1])]
    ok &= vertices[:, 1] >= vertices[menton, 1]                    # nothing below the chin
    cf = np.flatnonzero(ok[faces].all(1))
    tri = vertices[faces[cf], :2] - np.array(CONTOUR_CENTRE)       # [Fc,3,2]
    start, edge = tri, np.roll(tri, -1, axis=1) - tri                # edges corner k -> k+1
    cross = lambda u, v: u[..., 0] * v[..., 1] - u[..., 1] * v[..., 0]  # noqa: E731
    ids, bary = np.zeros(17, np.int64), np.zeros((17, 3))
    f8, c8 = np.argwhere(faces == menton)[0]
    ids[8], bary[8, c8] = f8, 1.0
    for i in (*range(8), *range(9, 17)):
        phi = -np.pi / 2 + np.pi * i / 16
        d = np.array([np.sin(phi), -np.cos(phi)])
        den = cross(d, edge)
        with np.errstate(divide="ignore", invalid="ignore"):
            t, s = cross(start, edge) / den, cross(start, d) / den
        t = np.where((np.abs(den) > 1e-12) & (s >= 0) & (s <= 1) & (t > 0), t, -np.inf)
        if not np.isfinite(t).any():
            raise ValueError(f"jaw-contour landmark {i}: no face of the jaw outline in that direction")
        f, k = np.unravel_index(np.argmax(t), t.shape)              # the farthest crossing
        ids[i] = cf[f]
        bary[i, k], bary[i, (k + 1) % 3] = 1.0 - s[f, k], s[f, k]
    return ids, bary


def embed_landmarks(vertices: np.ndarray, faces: np.ndarray, a: dict = ANATOMY) -> tuple[np.ndarray, np.ndarray]:
    """-> face ids [68] int64, barycentric coordinates [68,3] of the iBUG landmarks (local frame)."""
    jaw_f, jaw_b = contour_landmarks(vertices, faces, a)
    f, b = ray_hits(vertices, faces, *landmark_rays(a))
    return np.concatenate([jaw_f, f]), np.concatenate([jaw_b, b])


# --------------------------------------------------------------------------------------------
# Vertex subsets, joints, skinning weights
# --------------------------------------------------------------------------------------------
def smoothstep(t: np.ndarray) -> np.ndarray:
    """0 below 0, 1 above 1, C1 in between."""
    t = np.clip(t, 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


def vertex_subsets(vertices: np.ndarray, faces: np.ndarray, lmk: np.ndarray) -> dict[str, np.ndarray]:
    """FLAME's vertex subsets from the geometry (local frame) and the 68 landmarks [68,3].

    head: all but the neck; face_w_ears: the front of the head from under the hairline to the
    jaw, temples and ears included; face: the face proper (brows to chin, cheek to cheek).
    """
    from .geometry import vertex_normals

    head = ~is_neck(vertices)
    azimuth = np.abs(np.arctan2(vertices[:, 0], vertices[:, 2] - SUBSET_AXIS_Z))
    under_jaw = (vertex_normals(vertices, faces)[:, 1] < -0.6) & (vertices[:, 1] < lmk[48:68, 1].min())
    brow_y = lmk[17:27, 1].mean()
    face = head & ~under_jaw & (azimuth < 0.95) & (vertices[:, 1] < brow_y + 0.03)
    face_w_ears = face | (head & ~under_jaw & (azimuth < 2.1) & (vertices[:, 1] < brow_y + 0.07))
    return {name: np.flatnonzero(m).astype(np.int64)
            for name, m in (("face", face), ("face_w_ears", face_w_ears), ("head", head))}


def joint_targets(a: dict = ANATOMY) -> np.ndarray:
    """[5,3] joint positions (local frame): global, neck, jaw, left eye, right eye."""
    n = a["neck"]
    axis_z = lambda y: n["z"] + n["lean"] * (n["top"] - y)  # noqa: E731
    eye = np.array(a["eye"]["c"])
    return np.array([(0.0, NECK_JOINTS_Y[0], axis_z(NECK_JOINTS_Y[0])),
                     (0.0, NECK_JOINTS_Y[1], axis_z(NECK_JOINTS_Y[1])),
                     (0.0, a["ramus"]["a"][1], a["ramus"]["a"][2]),
                     eye, eye * (-1.0, 1.0, 1.0)])


def joint_regressor(vertices: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Dense J_regressor [5,V]: for each joint, non-negative weights summing to 1 over the shell
    of vertices around it (within 3 cm beyond the nearest, at most 400) whose weighted mean is
    the joint."""
    from scipy.optimize import nnls

    J = np.zeros((len(targets), len(vertices)))
    for j, t in enumerate(targets):
        dist = np.linalg.norm(vertices - t, axis=1)
        order = np.argsort(dist)[:400]
        cand = order[dist[order] < dist.min() + 0.03]
        k = len(cand)
        A = np.concatenate([vertices[cand].T, 10.0 * np.ones((1, k)), 1e-3 * np.eye(k)])
        b = np.concatenate([t, [10.0], np.zeros(k)])
        w, _ = nnls(A, b, maxiter=50 * k)
        J[j, cand] = w / w.sum()
    return J


def skinning_weights(vertices: np.ndarray, a: dict = ANATOMY) -> np.ndarray:
    """[V,5] smooth LBS weights (local frame), rows summing to 1.

    global: the lower neck; jaw: below the mouth slit (a sharp boundary between the lips that
    widens and rises across the cheeks towards the jaw joint), fading into the neck; eyes: the
    eyeballs; neck: the rest of the head.
    """
    x, y, z = vertices.T
    m = a["mouth"]
    w_global = smoothstep((NECK_JOINTS_Y[1] - 0.06 - y) / 0.05)
    lateral = np.maximum(np.abs(x) - m["half_width"], 0.0)
    s = np.clip(x / m["half_width"], -1.0, 1.0)
    boundary = m["y"] + m["bend"] * s ** 2 + 1.5 * lateral
    width = 0.0008 + 0.35 * lateral
    below = smoothstep(0.5 + (boundary - y) / (2.0 * width))
    in_front = smoothstep((z - JAW_BACK_Z) / 0.015)
    above_neck = smoothstep(1.0 + (y - NECK_PLANE[0] - NECK_PLANE[1] * (z - NECK_PLANE[2])) / 0.03)
    w_jaw = below * in_front * above_neck
    eye = a["eye"]
    w_eyes = [smoothstep(1.0 - sd_ellipsoid(vertices, np.array(eye["c"]) * (s, 1, 1), eye["r"]) / 0.0012)
              for s in (1.0, -1.0)]
    W = np.zeros((len(vertices), 5))
    W[:, 0] = w_global
    W[:, 2] = (1.0 - w_global) * w_jaw
    W[:, 3] = (1.0 - w_global) * (1.0 - w_jaw) * w_eyes[0]
    W[:, 4] = (1.0 - w_global) * (1.0 - w_jaw) * w_eyes[1]
    W[:, 1] = 1.0 - W[:, [0, 2, 3, 4]].sum(1)
    return W


# --------------------------------------------------------------------------------------------
# Identity and expression components: principal components of smooth displacement fields
# --------------------------------------------------------------------------------------------
def gauss(p: np.ndarray, c, s) -> np.ndarray:
    """Gaussian bump [N] at c with per-axis (or scalar) width s."""
    return np.exp(-0.5 * (((p - np.asarray(c)) / np.asarray(s)) ** 2).sum(1))


def symmetric(field, p: np.ndarray) -> np.ndarray:
    """Mirror-symmetrize a displacement field: (f(p) + M f(M p)) / 2 with M = diag(-1, 1, 1)."""
    M = np.array([-1.0, 1.0, 1.0])
    return 0.5 * (field(p) + field(p * M) * M)


def random_bumps(p: np.ndarray, centres: np.ndarray, sigma: float, amplitude: float,
                 rng: np.random.Generator) -> np.ndarray:
    """Sum of Gaussian vector bumps of random directions at the given centres. -> [N,3]"""
    out = np.zeros_like(p)
    for c in centres:
        d = rng.normal(size=3)
        out += amplitude * (d / np.linalg.norm(d)) * gauss(p, c, sigma)[:, None]
    return out


def identity_fields(p: np.ndarray, a: dict, rng: np.random.Generator) -> np.ndarray:
    """[N,3,300] displacement fields (one standard deviation each) of head identity, local frame:
    first anatomical proportions, then random smooth fields from coarse to fine (mostly
    symmetric). Smooth ambient fields of small gradient cannot fold the surface."""
    x, y, z = p.T
    one = np.ones_like(x)
    zero = np.zeros_like(x)
    lower = smoothstep((-0.03 - y) / 0.05)
    tip = np.array(a["nose_tip"]["c"])
    ear = np.array(a["ear"]["c"])
    pair = lambda c, s: gauss(p, c, s) + gauss(p, np.asarray(c) * (-1, 1, 1), s)  # noqa: E731
    sgn = np.tanh(x / 0.01)
    fields = [
        np.stack([0.045 * x, zero, zero], 1),                                     # breadth
        np.stack([zero, zero, 0.040 * (z + 0.03)], 1),                            # length
        np.stack([zero, 0.035 * y, zero], 1),                                     # height
        np.stack([zero, 0.050 * np.clip(y, -0.12, 0.0), zero], 1),                 # face length
        np.stack([0.080 * x * lower * smoothstep((z + 0.05) / 0.04), zero, zero], 1),  # jaw width
        0.15 * (p - (0.0, 0.005, 0.055)) * gauss(p, (0.0, -0.02, 0.07), 0.018)[:, None],  # nose size
        np.stack([zero, zero, 0.004 * gauss(p, tip, 0.012)], 1),                  # nose projection
        np.stack([0.004 * np.tanh(x / 0.008) * gauss(p, (0, -0.042, 0.062), (0.02, 0.01, 0.015)), zero,
                  zero], 1),                                                      # nose width
        np.stack([zero, zero, 0.005 * gauss(p, (0, 0.06, 0.04), (0.05, 0.025, 0.04))], 1),  # forehead
        np.stack([zero, zero, 0.003 * pair((0.028, 0.018, 0.055), (0.02, 0.01, 0.015))], 1),  # brow ridge
        np.stack([zero, zero, 0.005 * gauss(p, (0, -0.1, 0.05), (0.025, 0.015, 0.02))], 1),  # chin
        0.004 * np.stack([sgn, zero, 0.5 * one], 1) * pair((0.048, -0.008, 0.028), 0.015)[:, None],  # cheekbones
        np.stack([0.003 * sgn * gauss(p, (0, 0, 0.04), (0.05, 0.015, 0.03)), zero, zero], 1),  # eye spacing
        np.stack([zero, zero, 0.003 * gauss(p, (0, -0.068, 0.065), (0.02, 0.01, 0.01))], 1),  # lips
        np.stack([0.004 * sgn * gauss(p, (0, -0.068, 0.055), (0.03, 0.012, 0.02)), zero, zero], 1),  # mouth width
        np.stack([0.12 * x, zero, 0.12 * (z + 0.02)], 1) * smoothstep((-0.11 - y) / 0.04)[:, None],  # neck
        np.stack([zero, zero, -0.006 * gauss(p, (0, 0.02, -0.12), (0.06, 0.05, 0.04))], 1),  # occiput
        np.stack([zero, 0.005 * gauss(p, (0, 0.115, -0.03), (0.06, 0.03, 0.08)), zero], 1),  # vertex
        0.15 * (p - ear * np.stack([np.sign(x), one, one], 1)) * pair(ear, 0.025)[:, None],  # ear size
        np.stack([0.004 * sgn * pair(ear + (0.005, 0, -0.015), 0.015), zero, zero], 1),  # ear protrusion
        np.stack([zero, zero, 0.004 * gauss(p, (0, -0.03, 0.05), (0.04, 0.03, 0.03))], 1),  # midface
        np.stack([zero, zero, -0.002 * pair(a["eye"]["c"], 0.012)], 1),           # eye depth
        np.stack([0.05 * x * gauss(p, (0, -0.02, 0.02), (1.0, 0.04, 0.05)), zero, zero], 1),  # face width
    ]
    n_random = N_IDENTITY - len(fields)
    centres = p[rng.choice(len(p), size=(n_random, 3))]
    for k in range(n_random):
        sigma = 0.06 * (0.012 / 0.06) ** (k / (n_random - 1))
        amp = 0.0025 * (sigma / 0.06) ** 1.3
        seed = int(rng.integers(2**31))
        field = lambda q: random_bumps(q, centres[k], sigma, amp, np.random.default_rng(seed))  # noqa: E731
        fields.append(symmetric(field, p) if k % 4 else field(p))
    return np.stack(fields, -1)


def expression_fields(p: np.ndarray, a: dict, face_ids: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """[N,3,100] displacement fields (one standard deviation each) of facial expression, local
    frame, all vanishing behind the face: mouth, lips, cheeks, eyelids, brows, nose, then random
    localized fields on the face from coarse to fine."""
    x, y, z = p.T
    zero = np.zeros_like(x)
    mask = (smoothstep((z + 0.035) / 0.04) * smoothstep((y + 0.14) / 0.02))[:, None]
    corner = (a["mouth"]["half_width"], a["mouth"]["y"], 0.052)
    lips = (0.0, a["mouth"]["y"], 0.06)
    sgn = np.tanh(x / 0.01)

    def side(c, s, sides=(1.0, -1.0)):
        return sum(gauss(p, np.asarray(c) * (k, 1, 1), s) for k in sides)

    def lid(upper: bool, sides=(1.0, -1.0)):
        """Rotate an eyelid about the eyeball centre (x axis); the eyeball surface between the
        lids turns with a share growing towards the moving lid, so nothing folds."""
        e = a["eye"]
        top, bottom = np.arctan2(e["upper"], e["r"][1]), -np.arctan2(e["lower"], e["r"][1])
        out = np.zeros_like(p)
        for k in sides:
            c = np.array(e["c"]) * (k, 1, 1)
            q = p - c
            elevation = np.arctan2(q[:, 1], np.hypot(q[:, 0], q[:, 2]))
            share = (elevation - bottom) / (top - bottom)
            w = 0.15 * (smoothstep(share) if upper else -smoothstep(1.0 - share)) * gauss(p, c, 0.02)
            out += w[:, None] * np.stack([zero, -q[:, 2], q[:, 1]], 1)
        return out

    def smile(sides):
        return (0.004 * np.stack([0.5 * sgn, np.ones_like(x), -0.4 * np.ones_like(x)], 1)
                * side(corner, 0.012, sides)[:, None]
                + np.stack([zero, 0.002 * side((0.035, -0.035, 0.045), 0.015, sides), zero], 1))

    fields = [
        np.stack([0.004 * sgn * side(corner, 0.012), zero, zero], 1),              # mouth stretch
        0.004 * np.stack([-x / 0.02, zero, np.ones_like(x)], 1) * gauss(p, lips, (0.02, 0.012, 0.012))[:, None],  # pucker
        np.stack([zero, zero, -0.003 * gauss(p, lips, (0.022, 0.012, 0.012))], 1),  # lip press
        np.stack([0.003 * gauss(p, lips, (0.025, 0.015, 0.02)), zero, zero], 1),    # mouth sideways
        np.stack([zero, 0.003 * gauss(p, (0, -0.06, 0.06), (0.02, 0.012, 0.015)), zero], 1),  # upper lip raise
        np.stack([zero, 0.004 * side((0.03, 0.022, 0.05), (0.022, 0.012, 0.02)), zero], 1),  # brow raise
        np.stack([zero, 0.003 * side((0.015, 0.02, 0.055), 0.01), zero], 1),        # inner brow raise
        0.003 * np.stack([-0.7 * sgn, -0.5 * np.ones_like(x), zero], 1) * side((0.018, 0.018, 0.055), 0.012)[:, None],  # frown
        lid(False),                                                                 # squint
        np.stack([zero, 0.002 * side((0.01, -0.02, 0.06), 0.008), zero], 1),        # nose wrinkle
        0.004 * np.stack([sgn, zero, 0.3 * np.ones_like(x)], 1) * side((0.04, -0.06, 0.035), 0.015)[:, None],  # cheek puff
        np.stack([zero, 0.002 * gauss(p, (0, -0.1, 0.05), 0.012), zero], 1),        # chin raise
        np.stack([0.0015 * np.tanh(x / 0.005) * side((0.011, -0.041, 0.064), 0.007), zero, zero], 1),  # nostrils
        lid(True, (1.0,)), lid(True, (-1.0,)),                                      # eyelids
        smile((1.0,)), smile((-1.0,)),                                              # smile
        np.stack([zero, 0.003 * side((0.03, 0.022, 0.05), (0.022, 0.012, 0.02), (1.0,)), zero], 1),  # one brow
    ]
    n_random = N_EXPRESSION - len(fields)
    focus = np.array([corner, lips, a["eye"]["c"], (0.03, 0.02, 0.05), (0.04, -0.05, 0.04)])
    folded = p[face_ids] * (1, 1, 1)
    folded[:, 0] = np.abs(folded[:, 0])                              # focus points are given for +x
    near = np.linalg.norm(folded[:, None] - focus[None], axis=2).min(1)
    prob = np.exp(-near / 0.02)
    centres = p[face_ids][rng.choice(len(face_ids), size=(n_random, 2), p=prob / prob.sum())]
    for k in range(n_random):
        sigma = 0.02 * (0.006 / 0.02) ** (k / (n_random - 1))
        amp = 0.0012 * sigma / 0.02
        seed = int(rng.integers(2**31))
        field = lambda q: random_bumps(q, centres[k], sigma, amp, np.random.default_rng(seed))  # noqa: E731
        fields.append(symmetric(field, p) if k % 3 else field(p))
    return np.stack(fields, -1) * mask[:, :, None]


def principal_components(fields: np.ndarray, n: int) -> np.ndarray:
    """The n leading principal directions of a set of fields [V,3,K], scaled by their singular
    values: orthogonal in R^{3V}, norms decreasing, spanning the same distribution
    (sum_k N(0,1)·field_k). Signs fixed: the largest entry of each is positive. -> [V,3,n]"""
    import torch

    V = fields.shape[0]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a small SVD: threads only contend on a busy machine
    try:
        U, S, _ = (t.numpy() for t in torch.linalg.svd(torch.from_numpy(fields.reshape(V * 3, -1)),
                                                       full_matrices=False))
    finally:
        torch.set_num_threads(threads)
    U = U[:, :n] * np.sign(U[np.abs(U[:, :n]).argmax(0), np.arange(n)])
    return (U * S[:n]).reshape(V, 3, n)


# --------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------
def build_head(seed: int = 0) -> tuple[FlameModel, FlameTopology]:
    """The synthetic head as FLAME arrays; deterministic per seed (the seed draws the random
    identity and expression fields; the mesh is the same for every seed)."""
    return rig_head(*mesh_head(ANATOMY), seed)


def rig_head(v: np.ndarray, faces: np.ndarray, seed: int = 0,
             a: dict = ANATOMY) -> tuple[FlameModel, FlameTopology]:
    """FLAME arrays for a head mesh in the local frame: landmarks, subsets, components, joints,
    skinning weights; the template moved to FLAME's origin. v [V,3], faces [F,3]."""
    lmk_f, lmk_b = embed_landmarks(v, faces, a)
    lmk = (v[faces[lmk_f]] * lmk_b[:, :, None]).sum(1)
    subsets = vertex_subsets(v, faces, lmk)
    rng = np.random.default_rng(seed)
    shapedirs = np.concatenate([principal_components(identity_fields(v, a, rng), N_IDENTITY),
                                principal_components(expression_fields(v, a, subsets["face"], rng),
                                                     N_EXPRESSION)], axis=2)
    head = v[subsets["head"]]
    shift = HEAD_CENTRE - 0.5 * (head.min(0) + head.max(0))
    model = FlameModel(
        v_template=(v + shift).astype(np.float32), faces=faces, shapedirs=shapedirs.astype(np.float32),
        posedirs=np.zeros((len(v), 3, 36), np.float32),
        J_regressor=joint_regressor(v, joint_targets(a)).astype(np.float32),
        weights=skinning_weights(v, a).astype(np.float32),
        kintree_table=np.array([[-1, 0, 1, 1, 1], [0, 1, 2, 3, 4]], np.int64))
    topology = FlameTopology(
        faces=faces, static_face_idx=lmk_f[17:], static_bary=lmk_b[17:],
        dynamic_face_idx=np.tile(lmk_f[:17], (N_DYNAMIC_ROWS, 1)),
        dynamic_bary=np.tile(lmk_b[:17], (N_DYNAMIC_ROWS, 1, 1)), subsets=subsets)
    return model, topology


def make_head(out_dir: str | Path, seed: int = 0) -> Path:
    """Build the head and write it in FLAME's file formats. -> the directory"""
    model, topology = build_head(seed)
    return save_flame_assets(model, topology, out_dir)


def measure(model: FlameModel, topology: FlameTopology) -> dict[str, float]:
    """Dimensions (metres) of the template: head breadth (above the ears), front-to-back and
    chin-to-top of the head subset, outer eye-corner distance, nose tip ahead of the eye corners."""
    v = model.v_template.astype(np.float64)
    lmk = landmarks_from_vertices(v, topology.faces, topology.lmk_face_idx, topology.lmk_bary)
    head = v[topology.subsets["head"]]
    cranium = head[head[:, 1] > lmk[17:27, 1].max() + 0.01]      # above the brows and the ears
    return {
        "breadth": float(np.ptp(cranium[:, 0])),
        "breadth_with_ears": float(np.ptp(head[:, 0])),
        "front_to_back": float(np.ptp(head[:, 2])),
        "chin_to_top": float(head[:, 1].max() - lmk[8, 1]),
        "outer_eye_corners": float(np.linalg.norm(lmk[45] - lmk[36])),
        "nose_ahead_of_eye_corners": float(lmk[30, 2] - 0.5 * (lmk[36, 2] + lmk[45, 2])),
    }


def default_flame_dir(make: bool = True) -> Path:
    """The project's synthetic head (FLAME formats) under outputs/, written on first use
    (``make``): where a data set that names no FLAME directory takes its model from."""
    from . import OUTPUTS_DIR
    from .flame import MODEL_FILE

    out = OUTPUTS_DIR / "flame_synthetic"
    if make and not (out / MODEL_FILE).exists():
        make_head(out, seed=0)
    return out


def main(argv: list[str] | None = None) -> int:
    """``python -m dad3dlib make-head --out DIR [--seed N]``"""
    ap = argparse.ArgumentParser(prog="dad3dlib make-head", description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, type=Path, help="output directory (FLAME file formats)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the random shape/expression fields")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    model, topology = build_head(args.seed)
    out = save_flame_assets(model, topology, args.out)
    print(f"wrote {out} in {time.perf_counter() - t0:.1f} s: {len(model.v_template)} vertices, "
          f"{len(model.faces)} faces")
    for name, value in measure(model, topology).items():
        print(f"  {name:<26} {value * 100:6.2f} cm")
    return 0


# --------------------------------------------------------------------------------------------
# Albedo: per-vertex colours from geometry, landmarks and subsets only (works on FLAME too)
# --------------------------------------------------------------------------------------------
SKIN_TONES = np.array([(0.96, 0.82, 0.72), (0.92, 0.74, 0.62), (0.85, 0.64, 0.52), (0.76, 0.55, 0.42),
                       (0.64, 0.44, 0.32), (0.50, 0.33, 0.24), (0.36, 0.23, 0.17)])
HAIR_COLOURS = np.array([(0.05, 0.04, 0.035), (0.16, 0.10, 0.06), (0.32, 0.20, 0.11), (0.70, 0.56, 0.36),
                         (0.52, 0.23, 0.11), (0.62, 0.61, 0.60)])
IRIS_COLOURS = np.array([(0.30, 0.17, 0.08), (0.12, 0.07, 0.04), (0.28, 0.42, 0.60), (0.33, 0.45, 0.30),
                         (0.45, 0.35, 0.18)])
LIP_COLOUR, MOUTH_COLOUR, SCLERA_COLOUR = (0.70, 0.34, 0.34), (0.30, 0.08, 0.08), (0.93, 0.90, 0.86)


def polygon_depth(points: np.ndarray, polygon: np.ndarray) -> np.ndarray:
    """Signed distance [N] of 2D points [N,2] to a closed polygon [M,2], positive inside."""
    a, b = polygon, np.roll(polygon, -1, axis=0)
    ab = b - a
    t = np.clip(((points[:, None] - a[None]) * ab[None]).sum(-1) / np.maximum((ab * ab).sum(-1), 1e-18), 0, 1)
    dist = np.linalg.norm(points[:, None] - (a[None] + t[..., None] * ab[None]), axis=-1).min(1)
    py = points[:, 1:2]
    crosses = ((a[None, :, 1] > py) != (b[None, :, 1] > py)) & (
        points[:, 0:1] < a[None, :, 0] + (py - a[None, :, 1]) * ab[None, :, 0] / np.where(ab[:, 1] == 0, 1e-18, ab[:, 1]))
    inside = crosses.sum(1) % 2 == 1
    return np.where(inside, dist, -dist)


def polyline_distance(points: np.ndarray, line: np.ndarray) -> np.ndarray:
    """Distance [N] of 2D points [N,2] to an open polyline [M,2]."""
    a, b = line[:-1], line[1:]
    ab = b - a
    t = np.clip(((points[:, None] - a[None]) * ab[None]).sum(-1) / (ab * ab).sum(-1), 0, 1)
    return np.linalg.norm(points[:, None] - (a[None] + t[..., None] * ab[None]), axis=-1).min(1)


def albedo(vertices: np.ndarray, topology: FlameTopology, rng: np.random.Generator) -> np.ndarray:
    """A random person's per-vertex colours: skin tone with mottling and flushed cheeks/nose, lips
    and mouth interior, brows, sclera/iris/pupil and lash line, hair above a hairline (sometimes
    receding or bald), sometimes stubble. Uses only the vertex positions (model space, FLAME
    axes), the landmark embedding and the faces, so it also fits a real FLAME model.

    vertices [V,3], topology of the mesh -> colours [V,3] float32 in [0,1]
    """
    v = np.asarray(vertices, np.float64)
    lmk = landmarks_from_vertices(v, topology.faces, topology.lmk_face_idx, topology.lmk_bary)
    u = np.linalg.norm(lmk[45] - lmk[36]) / 0.09              # length unit: eye-corner span
    xy = v[:, :2]
    mix = lambda base, colour, w: base + (colour - base) * np.clip(w, 0, 1)[:, None]  # noqa: E731

    tone = rng.uniform(0, len(SKIN_TONES) - 1)
    i = int(tone)
    skin = SKIN_TONES[i] + (SKIN_TONES[min(i + 1, len(SKIN_TONES) - 1)] - SKIN_TONES[i]) * (tone - i)
    skin = np.clip(skin * rng.uniform(0.95, 1.05, 3), 0, 1)
    waves = rng.normal(size=(4, 3)) * 40.0 / u
    mottle = 1.0 + 0.03 * np.sin(v @ waves.T + rng.uniform(0, 2 * np.pi, 4)).mean(1)
    c = np.tile(skin, (len(v), 1)) * mottle[:, None]
    flush = sum(np.exp(-0.5 * (np.linalg.norm(v - p, axis=1) / (0.018 * u)) ** 2)
                for p in (lmk[30], 0.5 * (lmk[1] + lmk[31]), 0.5 * (lmk[15] + lmk[35])))
    c = mix(c, skin * (1.0, 0.78, 0.75), rng.uniform(0.2, 0.5) * flush)

    front = v[:, 2] > lmk[27:36, 2].min() - 0.05 * u            # the face side of the head
    # lips and the mouth interior
    outer, inner = lmk[48:60, :2], lmk[60:68, :2]
    lip_w = smoothstep(polygon_depth(xy, outer) / (0.0015 * u) + 0.5) * (v[:, 2] > lmk[48:60, 2].min() - 0.012 * u)
    c = mix(c, np.array(LIP_COLOUR) * (0.6 + 0.4 * skin.mean() / 0.8) * rng.uniform(0.85, 1.1), 0.8 * lip_w)
    cavity = (polygon_depth(xy, outer) > -0.001 * u) & (v[:, 2] < lmk[60:68, 2].mean() - 0.004 * u) & front
    opening = smoothstep(polygon_depth(xy, inner) / (0.001 * u) + 0.5) * (v[:, 2] < lmk[60:68, 2].min()) * front
    c = mix(c, MOUTH_COLOUR, np.maximum(cavity, opening))

    hair_colour = HAIR_COLOURS[rng.integers(len(HAIR_COLOURS))] * rng.uniform(0.85, 1.15)
    # brows: bands above the brow landmarks
    brow_w = np.zeros(len(v))
    for ids in ((17, 18, 19, 20, 21), (22, 23, 24, 25, 26)):
        line = lmk[list(ids), :2] + (0, 0.001 * u)
        d = polyline_distance(xy, line)
        brow_w = np.maximum(brow_w, smoothstep((0.0045 * u - d) / (0.0015 * u)) * (v[:, 2] > lmk[list(ids), 2].min() - 0.015 * u))
    c = mix(c, hair_colour * 0.7, rng.uniform(0.6, 0.9) * brow_w)

    # eyes: sclera inside the lid polygon, iris and pupil, a dark lash line along the upper lid
    iris_colour = IRIS_COLOURS[rng.integers(len(IRIS_COLOURS))]
    for ids in (range(36, 42), range(42, 48)):
        poly = lmk[list(ids)]
        depth = polygon_depth(xy, poly[:, :2])
        inside = smoothstep(depth / (0.0008 * u) + 0.5) * (v[:, 2] > poly[:, 2].min() - 0.012 * u)
        centre = poly[[1, 2, 4, 5], :2].mean(0)
        r = np.linalg.norm(xy - centre, axis=1) / u
        eye = mix(np.tile(SCLERA_COLOUR, (len(v), 1)), iris_colour, smoothstep((0.0058 - r) / 0.0008))
        eye = mix(eye, (0.02, 0.02, 0.02), smoothstep((0.0024 - r) / 0.0005))
        c = c + (eye - c) * inside[:, None]
        lash = polyline_distance(xy, poly[:4, :2]) / u
        c = mix(c, (0.05, 0.04, 0.04), 0.85 * smoothstep((0.0011 - lash) / 0.0006)
                * (v[:, 2] > poly[:, 2].min() - 0.008 * u))

    # hair above a hairline that runs from the forehead over the ears to the nape
    brow_y = lmk[17:27, 1].mean()
    centre = np.array([lmk[27, 0], lmk[27, 2] - 0.09 * u])
    theta = np.arctan2(v[:, 0] - centre[0], v[:, 2] - centre[1])
    bald = rng.random() < 0.1
    front_y = brow_y + (0.20 if bald else rng.uniform(0.04, 0.075)) * u
    side_y, back_y = brow_y + rng.uniform(0.008, 0.02) * u, brow_y - rng.uniform(0.03, 0.07) * u
    mean_fb = 0.5 * (front_y + back_y)
    hairline = (0.5 * (mean_fb + side_y) + 0.5 * (front_y - back_y) * np.cos(theta)
                + 0.5 * (mean_fb - side_y) * np.cos(2 * theta))
    strands = 1.0 + 0.12 * np.sin(v @ (rng.normal(size=3) * 900.0 / u)) * np.sin(v[:, 1] * 1300.0 / u)
    hair_w = smoothstep((v[:, 1] - hairline) / (0.008 * u) + 0.5)
    c = c + (hair_colour * strands[:, None] - c) * hair_w[:, None]

    if rng.random() < 0.2:  # stubble on the lower face
        face = np.zeros(len(v))
        face[topology.subsets["face"]] = 1.0
        mean = neighbour_mean(topology.faces, len(v))
        for _ in range(4):                                   # soften the subset's border
            face = mean @ face
        below_nose = smoothstep((lmk[33, 1] - 0.004 * u - v[:, 1]) / (0.008 * u))
        beard = below_nose * face * (1.0 - lip_w)
        c = mix(c, hair_colour * 0.8, rng.uniform(0.15, 0.35) * beard)
    return np.clip(c, 0.0, 1.0).astype(np.float32)
