"""The project's ``now`` shape protocol against the official NoW evaluation on a NoW-style release
made from the synthetic data (tests/test_now_protocol.py's: neutral scans in mm, the export's
prediction files), pooled median / mean / std in mm and each image's mean.

    .venv/bin/python benchmarks/now_agreement.py --release DIR [--subjects 30] \\
        [--official-python /tmp/noweval/bin/python --official now_evaluation]

Writes the release into DIR when it holds none. Without ``--official`` it compares with the test
oracle (tests/now_oracle.py); with it, with the official code run by
benchmarks/now_official/run_official.py (see there for its set-up). Exit status 1 when a pooled
statistic differs by more than 0.01 mm.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))
import test_now_protocol as T  # noqa: E402
from now_oracle import oracle_errors  # noqa: E402


def stats(per_image: dict[str, np.ndarray]) -> dict:
    d = np.concatenate(list(per_image.values()))
    return {"median": float(np.median(d)), "mean": float(d.mean()), "std": float(d.std()),
            "images": {k: [len(v), float(v.mean())] for k, v in per_image.items()}}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--release", required=True, type=Path)
    ap.add_argument("--subjects", type=int, default=30)
    ap.add_argument("--noise", type=float, default=0.5, help="SD of the predictions' shape-coefficient noise")
    ap.add_argument("--official", help="a set-up now_evaluation checkout (benchmarks/now_official/run_official.py)")
    ap.add_argument("--official-python", default="python", help="the interpreter of its environment")
    args = ap.parse_args()
    if not (args.release / "dataset" / "imagepathsvalidation.txt").is_file():
        T.make_release(args.release, args.subjects, args.noise)
    names = (args.release / "dataset" / "imagepathsvalidation.txt").read_text().splitlines()
    samples = list(T.release_samples(args.release))
    ours = stats(dict(zip(names, (T.project_errors(*s) for s in samples))))
    if args.official:
        with tempfile.TemporaryDirectory() as out:
            run = subprocess.run([args.official_python, str(HERE / "now_official" / "run_official.py"), "--official",
                                  args.official, "--release", str(args.release), "--out", out],
                                 capture_output=True, text=True, check=True)
        theirs, label = json.loads(run.stdout.strip().splitlines()[-1]), "official NoW evaluation"
    else:
        theirs, label = stats(dict(zip(names, (oracle_errors(*s) for s in samples)))), "oracle of the official steps"
    print(f"{len(names)} images, {sum(n for n, _ in ours['images'].values())} scan points")
    print(f"{'':32}{'median':>10}{'mean':>10}{'std':>10}")
    for name, r in (("dad3dlib now protocol", ours), (label, theirs)):
        print(f"{name:32}" + "".join(f"{r[k]:10.6f}" for k in ("median", "mean", "std")))
    diff = {k: abs(ours[k] - theirs[k]) for k in ("median", "mean", "std")}
    worst = max(abs(ours["images"][n][1] - theirs["images"][n][1]) for n in names)
    same_crop = all(ours["images"][n][0] == theirs["images"][n][0] for n in names)
    print(f"{'|difference|':32}" + "".join(f"{diff[k]:10.6f}" for k in ("median", "mean", "std")))
    print(f"largest difference of an image's mean: {worst:.6f} mm; same crop on every image: {same_crop}")
    return 0 if max(diff.values()) <= T.TOLERANCE_MM and same_crop else 1


if __name__ == "__main__":
    sys.exit(main())
