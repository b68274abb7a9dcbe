"""A numpy stand-in for the parts of psbody-mesh (MPI-IS/mesh) that the NoW evaluation uses:
Mesh(filename=...) / Mesh(v, f) with .v (float64) and .f (uint32), keep_vertices, write_obj.
psbody-mesh itself is not installable here (no registry package; its bundled CGAL archive is absent)."""
import numpy as np


class Mesh:
    def __init__(self, v=None, f=None, filename=None, **kwargs):
        if filename is not None:
            vs, fs = [], []
            for line in open(filename):
                parts = line.split()
                if not parts:
                    continue
                if parts[0] == "v":
                    vs.append([float(x) for x in parts[1:4]])
                elif parts[0] == "f":
                    fs.append([int(x.split("/")[0]) - 1 for x in parts[1:]])
            v, f = vs, fs
        self.v = np.array(v, dtype=np.float64).reshape(-1, 3) if v is not None else np.zeros((0, 3))
        self.f = np.array(f, dtype=np.uint32).reshape(-1, 3) if f is not None and len(f) else np.zeros((0, 3), np.uint32)

    def keep_vertices(self, keep_list):
        """psbody's semantics: keep these vertices (in this order) and the faces whose corners all stay."""
        keep = np.asarray(keep_list, dtype=np.int64)
        new_index = np.full(len(self.v), -1, np.int64)
        new_index[keep] = np.arange(len(keep))
        f = new_index[self.f.astype(np.int64)] if len(self.f) else np.zeros((0, 3), np.int64)
        self.f = f[(f >= 0).all(axis=1)].astype(np.uint32)
        self.v = self.v[keep]
        return self

    def write_obj(self, filename):
        with open(filename, "w") as out:
            out.writelines(f"v {x} {y} {z}\n" for x, y, z in self.v)
            out.writelines(f"f {a + 1} {b + 1} {c + 1}\n" for a, b, c in self.f)
