"""Training throughput of DAD-3DNet on synthetic batches (``make bench-train``).

    python benchmarks/bench_train.py [--config cpu paper] [--steps N] [--batch N] [--device cpu|cuda]
                                     [--flame DIR] [--out FILE]

For each configuration: training images/s of a full step (network forward, FLAME canonical +
reprojection, the four losses, backward, Adam), and per batch the time of the network alone
(forward + backward, with its floating-point work and the GFLOP/s it attains beside a plain
matrix product's in the same precision: how far a faster implementation could take it), of the
FLAME layer (forward + backward) and of the losses (forward + backward), all together and each
term alone. A configuration takes the model/data
sections of ``params/presets/<name>.yaml`` (``paper``: the reference network and recipe); ``cpu``
has a built-in fallback. ``--precision auto`` is what training uses: the network in bf16
autocast on a GPU and on a CPU with native bfloat16 (FLAME and losses in fp32), channels-last
memory format; compare with ``--precision 32-true``. On a GPU utilisation is sampled with nvidia-smi. The FLAME layer is a random model of FLAME's sizes
(5023 vertices, 9976 faces; timing depends only on sizes) unless ``--flame`` names a FLAME-format
directory. Imports neither pytorch3d, papermill nor moderngl.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from dad3dlib import OUTPUTS_DIR, REPO_ROOT  # noqa: E402
from dad3dlib.flame import (FlameAssets, FlameLayer, FlameModel, FlameTopology,  # noqa: E402
                            load_flame_assets)
from dad3dlib.losses import DADLoss  # noqa: E402
from dad3dlib.model import cpu_has_native_bf16, create_model  # noqa: E402
from dad3dlib.settings import ModelSettings  # noqa: E402

FLAME_V, FLAME_F = 5023, 9976
CPU_FALLBACK = {"model": {"encoder": "resnet18", "bifpn_filters": 64}, "data": {"crop_size": 128, "batch_size": 32}}
LAMBDAS = {"l3d": 50.0, "l1": 100.0, "lproj": 0.05, "awing": 1.0}


def flame_sized_assets(seed: int = 0) -> FlameAssets:
    """A random model with FLAME's array sizes (not a head; for timing only)."""
    rng = np.random.default_rng(seed)
    faces = rng.integers(0, FLAME_V, (FLAME_F, 3))
    rows = lambda a: (a / a.sum(-1, keepdims=True)).astype(np.float32)  # noqa: E731
    model = FlameModel(rng.uniform(-0.1, 0.1, (FLAME_V, 3)).astype(np.float32), faces,
                       (rng.standard_normal((FLAME_V, 3, 400)) * 1e-3).astype(np.float32),
                       (rng.standard_normal((FLAME_V, 3, 36)) * 1e-3).astype(np.float32),
                       rows(rng.uniform(0, 1, (5, FLAME_V))), rows(rng.uniform(0, 1, (FLAME_V, 5))),
                       np.array([[-1, 0, 1, 1, 1], [0, 1, 2, 3, 4]]))
    subsets = {"face": np.arange(2094), "face_w_ears": np.arange(3669), "head": np.arange(3457)}  # nested, as FLAME's
    topo = FlameTopology(faces, rng.integers(0, FLAME_F, 51), rows(rng.uniform(0, 1, (51, 3))),
                         rng.integers(0, FLAME_F, (79, 17)), rows(rng.uniform(0, 1, (79, 17, 3))), subsets)
    return FlameAssets(topo, model, Path("random"))


def configs(names: list[str]) -> dict[str, dict]:
    out = {}
    for name in names:
        preset = REPO_ROOT / "params" / "presets" / f"{name}.yaml"
        if preset.is_file():
            import yaml

            p = yaml.safe_load(preset.read_text())
            out[name] = {"model": p["model"], "data": p["data"], "source": str(preset.relative_to(REPO_ROOT))}
        elif name == "cpu":
            out[name] = {**CPU_FALLBACK, "source": "built-in (no params/presets/cpu.yaml)"}
        else:
            raise SystemExit(f"unknown config '{name}' (no {preset})")
    return out


def synthetic_batch(B: int, S: int, V: int, device) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    batch = {"image": torch.randn(B, 3, S, S, generator=g), "landmarks_2d": torch.rand(B, 68, 2, generator=g) * S,
             "visibility": torch.ones(B, 68), "heatmaps": torch.rand(B, 68, S // 4, S // 4, generator=g),
             "vertices_crop": torch.rand(B, V, 2, generator=g) * S,
             "vertices_model": torch.randn(B, V, 3, generator=g) * 0.1}
    return {k: v.to(device) for k, v in batch.items()}


class GpuSampler:
    """nvidia-smi utilisation.gpu samples (percent) in a background thread."""

    def __init__(self, period: float = 0.2):
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(period,), daemon=True)

    def _run(self, period: float) -> None:
        while not self._stop.is_set():
            try:
                out = subprocess.run(["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits"],
                                     capture_output=True, text=True, timeout=5).stdout
                self.samples.append(float(out.split()[0]))
            except (OSError, ValueError, IndexError, subprocess.TimeoutExpired):
                return
            time.sleep(period)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(timeout=10)


def _timed(fn, device, repeats: int) -> tuple[float, float]:
    """Mean (wall, process CPU) seconds per call of fn(), after one untimed call."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    fn()
    sync()
    t, c = time.perf_counter(), time.process_time()
    for _ in range(repeats):
        fn()
    sync()
    return (time.perf_counter() - t) / repeats, (time.process_time() - c) / repeats


def gemm_gflops(device, bf16: bool, n: int = 1024, repeats: int = 10) -> float:
    """What one matrix product of the precision the network runs in attains here (GFLOP/s): the
    ceiling to read the network's own throughput against."""
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16 if bf16 else torch.float32)
    sec = _timed(lambda: a @ a, device, repeats)[0]
    return 2 * n**3 / sec / 1e9


def network_row(fwd_bwd, device, repeats: int, bf16: bool) -> dict:
    """The network alone (forward and backward, no FLAME, losses or optimizer): its time per batch,
    its floating-point work (``torch.utils.flop_counter``: convolutions and matrix products) and the
    rate it attains, beside a plain matrix product's."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        fwd_bwd()
    sec = _timed(fwd_bwd, device, repeats)[0]
    flops = counter.get_total_flops()
    return {"network_ms_per_batch": round(1000 * sec, 2), "network_gflop_per_batch": round(flops / 1e9, 2),
            "network_gflops": round(flops / sec / 1e9, 1), "gemm_gflops": round(gemm_gflops(device, bf16), 1)}


def bench_config(name: str, cfg: dict, flame: FlameLayer, device, steps: int, batch: int | None,
                 warmup: int, bf16: bool) -> dict:
    B, S = batch or cfg["data"]["batch_size"], cfg["data"]["crop_size"]
    model_settings = ModelSettings.parse({**cfg["model"], "pretrained_path": None})
    model = create_model(model_settings).to(device).to(memory_format=torch.channels_last).train()
    loss_fn = DADLoss(LAMBDAS, {n: flame.subset(n) for n in ("face", "face_w_ears", "head")}).to(device)
    flame.select_vertices(loss_fn.vertex_subsets.union)  # as training: the vertices the losses read
    opt = torch.optim.Adam(model.parameters(), lr=1e-4, fused=device.type in ("cpu", "cuda"))  # as training
    data = synthetic_batch(B, S, flame.n_vertices, device)
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)
    image = data["image"].contiguous(memory_format=torch.channels_last)

    def step():
        with amp:
            out = model(image)
        params = out["params_3dmm"].float()
        canonical = flame.canonical(params, selected=True)
        pred = {**out, "vertices_canonical": canonical, "vertices_reprojected": flame.reproject(params, S, canonical)}
        total, _ = loss_fn(pred, data)
        opt.zero_grad(set_to_none=True)
        total.backward()
        opt.step()

    params0 = torch.zeros(B, 413, device=device)
    params0[:, 403:413] = torch.tensor([1.0, 0, 0, 0, -1, 0, 0, 0, 0, 7.0])

    def network_fwd_bwd():
        with amp:
            out = model(image)
        sum(v.float().mean() for v in out.values() if torch.is_tensor(v)).backward()

    def flame_fwd_bwd():
        p = params0.clone().requires_grad_()
        c = flame.canonical(p, selected=True)
        (c.sum() + flame.reproject(p, S, c).sum()).backward()

    with torch.no_grad():
        c = flame.canonical(params0, selected=True)
        fixed = {"vertices_canonical": c, "vertices_reprojected": flame.reproject(params0, S, c),
                 "landmarks_2d": torch.rand(B, 68, 2, device=device), "heatmaps": torch.randn(B, 68, S // 4, S // 4,
                                                                                               device=device)}

    def loss_fwd_bwd():
        pred = {k: v.clone().requires_grad_() for k, v in fixed.items()}
        loss_fn(pred, data)[0].backward()

    def term_fwd_bwd(name):
        def run():
            pred = {k: v.clone().requires_grad_() for k, v in fixed.items()}
            loss_fn.terms(pred, data, [name])[name].backward()
        return run

    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    sampler = GpuSampler() if device.type == "cuda" else None
    if sampler:
        sampler.__enter__()
    try:
        sec_step, cpu_step = _timed(step, device, steps)
    finally:
        if sampler:
            sampler.__exit__()
    row = {"config": name, "source": cfg.get("source", "built-in"), "encoder": cfg["model"]["encoder"],
           "bifpn_filters": model_settings.bifpn_filters, "crop_size": S, "batch_size": B,
           "batch_size_preset": cfg["data"]["batch_size"], "steps": steps, "device": str(device),
           "precision": "bf16-mixed" if bf16 else "32-true", "channels_last": True,
           "images_per_s": round(B / sec_step, 2), "ms_per_step": round(1000 * sec_step, 1),
           "cpu_core_s_per_step": round(cpu_step, 2),  # shows how much of the wall time was ours
           **network_row(network_fwd_bwd, device, max(3, steps // 2), bf16),
           "flame_ms_per_batch": round(1000 * _timed(flame_fwd_bwd, device, max(3, steps // 2))[0], 2),
           "loss_ms_per_batch": round(1000 * _timed(loss_fwd_bwd, device, max(3, steps // 2))[0], 2),
           "term_ms_per_batch": {k: round(1000 * _timed(term_fwd_bwd(k), device, max(3, steps // 2))[0], 2)
                                 for k in LAMBDAS}}
    if device.type == "cuda":
        row["peak_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        row["gpu_util_mean_pct"] = round(float(np.mean(sampler.samples)), 1) if sampler.samples else None
    return row


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", nargs="+", default=["cpu", "paper"], help="cpu (preset), paper, or other preset names")
    ap.add_argument("--steps", type=int, default=None, help="timed steps (default 20 on GPU, 3 on CPU)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 5 on GPU, 1 on CPU)")
    ap.add_argument("--batch", type=int, default=None, help="override every config's batch size")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--precision", default="auto", choices=["auto", "bf16-mixed", "32-true"],
                    help="auto: bf16 on a GPU or a CPU with native bfloat16, as training does")
    ap.add_argument("--flame", default=None, help="FLAME-format directory (default: random, FLAME-sized)")
    ap.add_argument("--out", default=None, help="JSON results (default outputs/bench/bench_train_<device>.json)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    steps, warmup = args.steps or (20 if gpu else 3), args.warmup if args.warmup is not None else (5 if gpu else 1)
    torch.manual_seed(0)
    flame = FlameLayer(load_flame_assets(args.flame) if args.flame else flame_sized_assets()).to(device)
    bf16 = args.precision == "bf16-mixed" or (args.precision == "auto" and (gpu or cpu_has_native_bf16()))
    rows = [bench_config(n, c, flame, device, steps, args.batch, warmup, bf16)
            for n, c in configs(args.config).items()]
    info = {"torch": torch.__version__, "python": platform.python_version(), "threads": torch.get_num_threads(),
            "cpu_count": os.cpu_count(), "cpu_native_bf16": cpu_has_native_bf16(), "gpu": torch.cuda.get_device_name(device) if gpu else None,
            "flame": args.flame or f"random FLAME-sized ({FLAME_V} vertices)"}
    for r in rows:
        print(json.dumps(r))
    out = Path(args.out) if args.out else OUTPUTS_DIR / "bench" / f"bench_train_{device.type}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps({"info": info, "results": rows}, indent=1))
    os.replace(tmp, out)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
