"""The official NoW evaluation, run unmodified on a NoW-style release, with psbody-mesh replaced by
the stand-ins beside this file (psbody-mesh is not installable here: no registry package, and its
CGAL archive is not in its repository's snapshot).

    OFFICIAL_PY benchmarks/now_official/run_official.py --official DIR --release DIR --out DIR

``--official``: a checkout of soubhiksanyal/now_evaluation (7bd1498 was used) holding, as its README
says, flame-fitting's ``sbody`` and ``smpl_webuser`` (Rubikplayer/flame-fitting ca806ce, the
commit its Dockerfile pins) with ``sbody/alignment/mesh_distance``'s compiled helper built:

    python3.11 -m venv /tmp/noweval
    /tmp/noweval/bin/pip install numpy==1.26.4 scipy==1.13.1 opencv-python-headless==4.10.0.84 \\
        chumpy-fixed werkzeug cython matplotlib tqdm setuptools   # chumpy needs numpy < 2
    apt-get install libeigen3-dev
    cp -r flame-fitting/sbody flame-fitting/smpl_webuser now_evaluation/
    cd now_evaluation/sbody/alignment/mesh_distance && ln -s /usr/include/eigen3 eigen && \\
        /tmp/noweval/bin/python setup.py build_ext --inplace

``--release``: ``dataset/{scans, scans_lmks_onlypp, imagepathsvalidation.txt}`` and
``predictions/`` (benchmarks/now_agreement.py writes one). Calls ``compute_error.metric_computation``
(one process) and prints one JSON line: pooled median, mean, std (mm) and each image's mean.
"""
import argparse
import json
import sys
from pathlib import Path

import numpy as np
import scipy

ap = argparse.ArgumentParser()
ap.add_argument("--official", required=True)
ap.add_argument("--release", required=True)
ap.add_argument("--out", required=True)
args = ap.parse_args()
scipy.array = np.array  # sbody/alignment/objectives.py imports scipy.array, which scipy has since dropped
sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(args.official).resolve())]
import compute_error  # noqa: E402

compute_error.metric_computation(f"{args.release}/dataset", f"{args.release}/predictions", image_set="val",
                                 error_out_path=args.out, method_identifier="official", nproc=1)
result = np.load(Path(args.out) / "official_computed_distances.npy", allow_pickle=True).item()
d = np.concatenate(result["computed_distances"])
print(json.dumps({"median": float(np.median(d)), "mean": float(d.mean()), "std": float(d.std()),
                  "missing": int(result["num_missing_files"]),
                  "images": {str(f): [len(x), float(np.mean(x))]
                             for f, x in zip(result["input_files"], result["computed_distances"])}}))
