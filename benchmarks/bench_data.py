"""Data pipeline throughput: synthetic images generated per second, and loader samples per second
(cached vs uncached, 0 and 2 DataLoader workers). ``make bench-data`` runs it; the table is
printed and saved to outputs/bench_data.json.

    .venv/bin/python benchmarks/bench_data.py [--images 384] [--crop 256]

Wall-clock rates depend on what else runs on the machine; the CPU time per item (this process and
its worker processes) does much less.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dad3dlib import OUTPUTS_DIR  # noqa: E402
from dad3dlib.data import DAD3DHeadsDataset  # noqa: E402
from dad3dlib.flame import load_flame_assets  # noqa: E402
from dad3dlib.config import read_yaml, resolve  # noqa: E402
from dad3dlib.synthetic_data import make_data  # noqa: E402
from dad3dlib.synthetic_head import default_flame_dir  # noqa: E402


def cpu_seconds() -> float:
    """User + system CPU time of this process and its finished children (worker pools)."""
    return sum(getattr(resource.getrusage(who), f) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
               for f in ("ru_utime", "ru_stime"))


def measure(what: str, n: int, fn) -> dict:
    cpu, start = cpu_seconds(), time.perf_counter()
    fn()
    seconds = time.perf_counter() - start
    return {"what": what, "n": n, "seconds": seconds, "per_second": n / seconds,
            "cpu_ms_per_item": 1000 * (cpu_seconds() - cpu) / n}


def bench_generation(tmp: Path, n: int, workers: int) -> dict:
    recipe = {**read_yaml(resolve("presets", "cpu"))["data"]["synthetic"], "splits": {"train": n}}
    return measure(f"make-data (cpu preset sizes), {workers} worker(s)", n,
                   lambda: make_data(tmp / f"gen{workers}", recipe, workers=workers, name="bench"))


def bench_loader(root: Path, cache_dir: Path, crop: int, cached: bool, workers: int) -> dict:
    ds = DAD3DHeadsDataset(root, "train", crop, load_flame_assets(default_flame_dir()), train=True, augment=True, cache=cached,
                           cache_dir=cache_dir)
    loader = torch.utils.data.DataLoader(ds, batch_size=32, num_workers=workers, shuffle=True)
    kind = "cached" if cached else "uncached"
    return measure(f"loader {kind}, crop {crop}, train+augment, num_workers={workers}", len(ds),
                   lambda: sum(len(batch["index"]) for batch in loader))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=384, help="images to generate per measurement")
    ap.add_argument("--crop", type=int, default=256)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_data_") as tmp:
        tmp = Path(tmp)
        for workers in (1, 2):
            rows.append(bench_generation(tmp, args.images, workers))
        root = tmp / "gen2"
        rows.append(measure("loader cache build (validate + parse all annotations)", args.images,
                            lambda: DAD3DHeadsDataset(root, "train", args.crop, load_flame_assets(default_flame_dir()),
                                                      cache_dir=tmp / "cache")))
        for cached in (True, False):
            for workers in (0, 2):
                rows.append(bench_loader(root, tmp / "cache", args.crop, cached, workers))
    width = max(len(r["what"]) for r in rows)
    print(f"\n{'measurement':<{width}} | {'items':>5} | {'seconds':>7} | {'items/s':>7} | {'CPU ms/item':>11}")
    print(f"{'-' * width}-|-------|---------|---------|------------")
    for r in rows:
        print(f"{r['what']:<{width}} | {r['n']:>5} | {r['seconds']:>7.2f} | {r['per_second']:>7.1f} | "
              f"{r['cpu_ms_per_item']:>11.1f}")
    print(f"(machine: {os.cpu_count()} cores; load average {os.getloadavg()[0]:.1f})")
    OUTPUTS_DIR.mkdir(parents=True, exist_ok=True)
    out = OUTPUTS_DIR / "bench_data.json"
    tmp_out = out.with_suffix(".json.tmp")
    tmp_out.write_text(json.dumps({"rows": rows, "load_average": os.getloadavg()[0]}, indent=1))
    os.replace(tmp_out, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
