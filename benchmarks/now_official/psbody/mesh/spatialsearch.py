"""A numpy stand-in for psbody.mesh.spatialsearch's AABB-tree queries (CGAL in the original), the
one compiled piece of psbody-mesh the NoW evaluation calls (through flame-fitting's sbody):
``aabbtree_compute(v, f)`` -> a handle; ``aabbtree_nearest(handle, points)`` -> (nearest triangle
[S] uint32, part [S] uint32: 0 inside, edges ab 1, bc 2, ca 3, corners a 4, b 5, c 6; closest point
[S,3]). Exact: the test oracle's search (tests/now_oracle.py, numpy and scipy only)."""
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[4] / "tests"))
from now_oracle import nearest_on_mesh  # noqa: E402


def aabbtree_compute(v, f):
    return np.asarray(v, np.float64).copy(), np.asarray(f, np.int64).copy()


def aabbtree_nearest(handle, points):
    tri, part, closest, _ = nearest_on_mesh(np.asarray(points, np.float64).reshape(-1, 3), *handle)
    return tri.astype(np.uint32), part.astype(np.uint32), closest
