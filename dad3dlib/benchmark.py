"""The DAD-3DHeads benchmark (its metrics: metrics.py), vectorized, on the reference's file formats.

``python -m dad3dlib benchmark --gt GT.json --submission SUB.json --flame-assets DIR [--json OUT]``

Ground truth: a JSON list of ``{id, bbox [x,y,w,h], vertices [V,3], model_view_matrix 4x4,
projection_matrix 4x4, image_height[, attributes]}``. Submission: ``{id: {"68_landmarks_2d" [68,2],
"N_landmarks_3d" [N,3], "7_landmarks_3d" [7,3], "rotation_matrix" 3x3}}``; as the reference's
README allows, an entry may hold a subset of the keys: a metric whose inputs are absent is not
computed for that item (Z_n also needs N = V, FLAME's topology). Items are scored in batches with
the reference's conventions. A GT item without a prediction is reported and left out of the means
(as the reference does); a malformed entry is an error naming the file, the item and the key.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from . import metrics as M
from .data import attribute_key
from .errors import InputValueError
from .files import write_json
from .geometry import flip_yz
from .flame import FlameTopology, TopologyTensors, landmarks_image, load_flame_assets

FLAME_MESH = M.FLAME_MESH  # a pseudo-key: N_landmarks_3d with N = V

GT_KEYS = {"bbox": (4,), "vertices": ("V", 3), "model_view_matrix": (4, 4),
           "projection_matrix": (4, 4), "image_height": ()}
PRED_KEYS = {"68_landmarks_2d": (68, 2), "N_landmarks_3d": ("N", 3), "7_landmarks_3d": (7, 3),
             "rotation_matrix": (3, 3)}


class BenchmarkFormatError(InputValueError):
    """A ground-truth or submission file does not follow the reference format."""


# The metrics: name -> (prediction keys needed, fn(gt, pred, scorer) -> [b]), the registered
# metrics in the benchmark scope (metrics.METRICS); gt: the rows' metrics.BenchmarkGT (see
# Scorer.prepare); pred: stacked prediction arrays.
BENCHMARK_METRICS = {k: M.METRICS[k].benchmark for k in M.metric_names("benchmark")}
METRICS = tuple(BENCHMARK_METRICS)
SHORT = {k: M.METRICS[k].short for k in METRICS}

# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------
def _read_json(path: Path):
    """The parsed file; an object that repeats a key (e.g. a submission listing an item twice) is
    refused, as are unreadable files. NaN / Infinity literals are read (and rejected later)."""
    def unique(pairs: list) -> dict:
        repeated = [k for k, n in Counter(k for k, _ in pairs).items() if n > 1]
        if repeated:
            raise BenchmarkFormatError(f"{path}: duplicate key(s) {repeated} (each may appear once)")
        return dict(pairs)

    try:
        return json.loads(path.read_bytes(), object_pairs_hook=unique)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BenchmarkFormatError(f"{path}: cannot read JSON ({e})") from e


def _array(value, shape: tuple, where: str, key: str, sizes: dict) -> np.ndarray:
    """A finite float64 array of ``shape``; a letter in ``shape`` is ``sizes[letter]``, or any size."""
    try:
        arr = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise BenchmarkFormatError(f"{where}: key '{key}' is not a numeric array ({e})") from e
    want = tuple(sizes.get(s, s) for s in shape)
    if arr.ndim != len(want) or arr.size == 0 or any(isinstance(w, int) and a != w for a, w in zip(arr.shape, want)):
        raise BenchmarkFormatError(f"{where}: key '{key}' has shape {arr.shape}, expected {want}")
    if not np.isfinite(arr).all():
        raise BenchmarkFormatError(f"{where}: key '{key}' holds NaN or infinite values")
    return arr


def read_ground_truth(path: str | Path, n_vertices: int) -> list[dict]:
    """The GT list, validated: each item {id, attributes (dict), and the GT_KEYS as float64 arrays}."""
    path = Path(path)
    data = _read_json(path)
    if not isinstance(data, list) or not data:
        got = "an empty list" if isinstance(data, list) else type(data).__name__
        raise BenchmarkFormatError(f"{path}: expected a non-empty JSON list of items, got {got}")
    items = []
    for k, entry in enumerate(data):
        if not isinstance(entry, dict) or "id" not in entry:
            raise BenchmarkFormatError(f"{path}: item #{k}: missing key 'id'")
        where = f"{path}: item {entry['id']!r}"
        missing = [key for key in GT_KEYS if key not in entry]
        if missing:
            raise BenchmarkFormatError(f"{where}: missing key '{missing[0]}'")
        attributes = entry.get("attributes") or {}
        if not isinstance(attributes, dict):
            raise BenchmarkFormatError(f"{where}: key 'attributes' must be an object")
        arrays = {key: _array(entry[key], shape, where, key, {"V": n_vertices}) for key, shape in GT_KEYS.items()}
        items.append({"id": str(entry["id"]), "attributes": attributes, **arrays})
    repeated = [i for i, n in Counter(item["id"] for item in items).items() if n > 1]
    if repeated:
        raise BenchmarkFormatError(f"{path}: duplicate id(s) {repeated} (each item may appear once)")
    return items


def read_submission(path: str | Path) -> dict:
    """The submission dict {item id: raw entry}; entries are validated when scored."""
    path = Path(path)
    data = _read_json(path)
    if not isinstance(data, dict):
        raise BenchmarkFormatError(f"{path}: expected a JSON object {{item id: prediction}}")
    return data


def parse_prediction(entry, where: str, n_vertices: int) -> dict[str, np.ndarray]:
    """The keys present in one submission entry, validated, plus the FLAME_MESH pseudo-key."""
    if not isinstance(entry, dict):
        raise BenchmarkFormatError(f"{where}: expected an object, got {type(entry).__name__}")
    if not any(k in entry for k in PRED_KEYS):
        raise BenchmarkFormatError(f"{where}: none of the keys {list(PRED_KEYS)}")
    out = {k: _array(entry[k], shape, where, k, {}) for k, shape in PRED_KEYS.items() if k in entry}
    if "N_landmarks_3d" in out and len(out["N_landmarks_3d"]) == n_vertices:
        out[FLAME_MESH] = out["N_landmarks_3d"]
    return out


# --------------------------------------------------------------------------------------------
# Ground-truth quantities (reference conventions)
# --------------------------------------------------------------------------------------------
def gt_world(vertices: Tensor, mv: Tensor) -> Tensor:
    """MV applied to model-space vertices.  vertices [B,V,3], mv [B,4,4] -> [B,V,3]"""
    return vertices @ mv[:, :3, :3].transpose(1, 2) + mv[:, None, :3, 3]


class Scorer(TopologyTensors):
    """The benchmark's metrics on one topology, for batches of GT items and predictions."""

    def __init__(self, topology: FlameTopology, device: str | torch.device = "cpu"):
        super().__init__(topology, device)
        self.device = torch.device(device)

    def prepare(self, gt: dict[str, Tensor]) -> M.BenchmarkGT:
        """GT arrays (vertices [B,V,3], model_view_matrix, projection_matrix [B,4,4], image_height
        [B], bbox [B,4]) -> what the metrics read (:class:`dad3dlib.metrics.BenchmarkGT`)."""
        mv = gt["model_view_matrix"]
        world = gt_world(gt["vertices"], mv)
        return M.BenchmarkGT(
            landmarks_2d=landmarks_image(gt["vertices"], mv, gt["projection_matrix"], gt["image_height"], self),
            world=world, landmarks_world=self.landmarks68(world), rotation=flip_yz(mv), bbox=gt["bbox"])

    def __call__(self, gt: dict[str, Tensor], preds: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
        """Every metric for every row that has its inputs: {metric: [B] float64, NaN elsewhere}."""
        g = self.prepare(gt)
        out = {m: np.full(len(preds), np.nan) for m in METRICS}
        for name, (needs, fn) in BENCHMARK_METRICS.items():
            groups = defaultdict(list)  # rows with the needed keys, by their arrays' shapes
            for i, p in enumerate(preds):
                if all(k in p for k in needs):
                    groups[tuple(p[k].shape for k in needs)].append(i)
            for rows in groups.values():
                idx = torch.as_tensor(rows, device=self.device)
                stacked = {k: torch.as_tensor(np.stack([preds[i][k] for i in rows]), device=self.device)
                           for k in needs}
                if FLAME_MESH in stacked:
                    stacked["N_landmarks_3d"] = stacked[FLAME_MESH]
                out[name][rows] = fn(g.rows(idx), stacked, self).cpu().numpy()
        return out


# --------------------------------------------------------------------------------------------
# Running
# --------------------------------------------------------------------------------------------
def score(gt_items: list[dict], submission: dict, scorer: Scorer, batch_size: int = 64,
          submission_name: str = "submission") -> tuple[list[dict], list[str]]:
    """Per-item rows {id, attributes, metric: float (NaN: not computable)} for items with a
    prediction, and the ids without one."""
    from tqdm import tqdm

    todo = [g for g in gt_items if g["id"] in submission]
    missing = [g["id"] for g in gt_items if g["id"] not in submission]
    rows = []
    for start in tqdm(range(0, len(todo), batch_size), desc="benchmark", unit="batch",
                      disable=len(todo) <= batch_size):
        chunk = todo[start:start + batch_size]
        preds = [parse_prediction(submission[g["id"]], f"{submission_name}: item {g['id']!r}", scorer.n_vertices)
                 for g in chunk]
        gt = {k: torch.as_tensor(np.stack([g[k] for g in chunk]), device=scorer.device) for k in GT_KEYS}
        values = scorer(gt, preds)
        rows += [{"id": g["id"], "attributes": g["attributes"], **{m: float(values[m][i]) for m in METRICS}}
                 for i, g in enumerate(chunk)]
    return rows, missing


def _mean(values: list[float]) -> float | None:
    values = [v for v in values if not np.isnan(v)]
    return float(np.mean(values)) if values else None


def summarize(rows: list[dict]) -> dict:
    """{"overall": {metric: mean}, "per_attribute": {metric: {attribute: {value: mean}}},
    "n_scored": {metric: items}}; means over the items where the metric was computable."""
    groups: dict = defaultdict(lambda: defaultdict(list))
    for r in rows:
        for name, value in r["attributes"].items():
            groups[name][attribute_key(value)].append(r)
    return {
        "overall": {m: _mean([r[m] for r in rows]) for m in METRICS},
        "per_attribute": {m: {name: {v: _mean([r[m] for r in rs]) for v, rs in sorted(vals.items())}
                              for name, vals in groups.items()} for m in METRICS},
        "n_scored": {m: sum(not np.isnan(r[m]) for r in rows) for m in METRICS},
    }


def format_report(result: dict) -> str:
    """The overall table and the per-attribute table, as text."""
    lines = M.text_table("overall", ("value", "items"), [(m, [v, result["n_scored"][m]])
                                                         for m, v in result["overall"].items()], width=10, digits=6)
    first = next(iter(result["per_attribute"].values()), {})
    if first:
        rows = [(f"{name}={value}", [result["per_attribute"][m][name][value] for m in METRICS])
                for name, vals in first.items() for value in vals]
        lines += ["", *M.text_table("per attribute", [SHORT[m] for m in METRICS], rows, label=28, digits=6)]
    return "\n".join(lines)


def run(gt_path, submission_path, flame_assets, device="cpu", batch_size: int = 64) -> dict:
    """Score a submission file against a GT file: the summary plus n_items and missing (ids)."""
    topology = load_flame_assets(flame_assets, require_model=False).topology
    scorer = Scorer(topology, device)
    gt_items = read_ground_truth(gt_path, scorer.n_vertices)
    submission = read_submission(submission_path)
    rows, missing = score(gt_items, submission, scorer, batch_size, str(submission_path))
    return {**summarize(rows), "n_items": len(gt_items), "missing": missing}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m dad3dlib benchmark", description=__doc__.split("\n")[0])
    ap.add_argument("--gt", required=True, help="ground-truth JSON (reference format)")
    ap.add_argument("--submission", required=True, help="submission JSON (reference format)")
    ap.add_argument("--flame-assets", required=True,
                    help="FLAME-format directory (topology files suffice, e.g. ../shared/flame_topology)")
    ap.add_argument("--json", type=Path, help="write {overall, per_attribute, n_scored, n_items, missing} here")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch-size", type=int, default=64)
    args = ap.parse_args(argv)
    result = run(args.gt, args.submission, args.flame_assets, args.device, args.batch_size)
    if result["missing"]:
        ids = ", ".join(map(str, result["missing"][:10])) + (" ..." if len(result["missing"]) > 10 else "")
        print(f"No prediction for {len(result['missing'])} of {result['n_items']} items: {ids}", file=sys.stderr)
    print(f"{result['n_items'] - len(result['missing'])} of {result['n_items']} items have a prediction")
    print(format_report(result))
    if args.json:
        write_json(args.json, result)
    return 0
