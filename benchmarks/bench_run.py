"""A whole training run, timed by part (``make bench-run``): one run of a preset on its data (generated
from the preset's recipe when missing), trained and evaluated as the study does, in this process.

    python benchmarks/bench_run.py [--preset cpu] [--ablation baseline] [--epochs N] [--threads 1]
                                   [--out FILE]

Prints and saves (default outputs/bench/bench_run_<preset>.json) the run's images/s (training
images over the wall time of the whole run, imports included) and its wall time split into the
parts each study run records in its provenance.json (``report.TIME_PARTS``): training steps,
waiting for training batches, validation, evaluation and the rest (imports, data and pose-prior
set-up, checkpoints, logging). ``--epochs`` shortens the run (the one-cycle schedule is laid over
the shorter run). Wall times depend on the machine and what else runs on it: compare two commits
side by side, in one sitting.
"""
from __future__ import annotations

import time

START = time.perf_counter()

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from dad3dlib import OUTPUTS_DIR  # noqa: E402
from dad3dlib.config import run_params  # noqa: E402
from dad3dlib.report import TIME_PARTS  # noqa: E402
from dad3dlib.data_setup import ensure_data  # noqa: E402
from dad3dlib.devices import on_device  # noqa: E402
from dad3dlib.finish import finish_run  # noqa: E402
from dad3dlib.provenance import time_parts  # noqa: E402
from dad3dlib.train import train  # noqa: E402

IMPORTS_S = time.perf_counter() - START


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="cpu")
    ap.add_argument("--ablation", default="baseline")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--epochs", type=int, default=None, help="trainer.max_epochs (default: the preset's)")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (a study job's share)")
    ap.add_argument("--out", default=None, help="JSON results (default outputs/bench/bench_run_<preset>.json)")
    args = ap.parse_args(argv)
    params = run_params(args.preset, args.ablation, args.seed)
    if args.epochs:
        params["trainer"]["max_epochs"] = args.epochs
    params["trainer"]["progress_bar"] = False
    ensure_data(params)
    params = on_device(params, "cpu" if not torch.cuda.is_available() else "auto", args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp)
        t0 = time.perf_counter()
        checkpoint = train(params, run_dir)
        metrics = finish_run(params, checkpoint, run_dir, "auto")
        wall = time.perf_counter() - START
        parts = time_parts(run_dir, wall)
        steps = json.loads((run_dir / "training.json").read_text())["checkpoint"]["step"]
    images = steps * params["data"]["batch_size"]
    row = {"preset": args.preset, "ablation": args.ablation, "epochs": params["trainer"]["max_epochs"],
           "threads": args.threads, "steps": steps, "wall_s": round(wall, 1), "imports_s": round(IMPORTS_S, 1),
           "train_and_evaluate_s": round(time.perf_counter() - t0, 1),
           "images_per_s_whole_run": round(images / wall, 1),
           "images_per_s_training_steps": round(images / max(parts["train_steps"], 1e-9), 1),
           "time_s": parts, "share": {k: round(parts[k] / wall, 3) for k in TIME_PARTS},
           "mean_mm": round(metrics["mean_mm"], 3), "angle_error_deg": round(metrics["angle_error_deg"], 2),
           "machine": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
           "torch": torch.__version__}
    print(json.dumps(row))
    out = Path(args.out) if args.out else OUTPUTS_DIR / "bench" / f"bench_run_{args.preset}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(row, indent=1))
    os.replace(tmp, out)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
