"""Evaluation of a trained DAD-3DNet on a data split, and reference-format predictions.

    python -m dad3dlib evaluate --checkpoint CKPT [--split SPLIT] [--data DIR] [--out DIR]
    python -m dad3dlib predict --checkpoint CKPT --data DIR --split test --out SUB.json
    python -m dad3dlib predict --format now --checkpoint CKPT --images NOW_DIR --out DIR

Per sample (metrics.py): reprojection NME (the predicted mesh's 68 landmarks mapped back
to the original image), Z5 accuracy with the reference pairing and with the paper's (head
subset), pose error, angle error and yaw/pitch/roll errors, the 3D shape error in mm (median,
mean, std of the GT points' distances to the predicted canonical surface, by a shape protocol of
:data:`metrics.SHAPE_PROTOCOLS`: ``landmarks``, the FLAME face region after a 7-landmark similarity,
or ``now``, the NoW protocol; a run's choice is its ``study.shape_protocol``) and the reference's "chamfer". The aggregate is the mean over
samples, except median_mm / mean_mm / std_mm, which pool every scored distance of the split (as the
NoW benchmark does); ``by_attribute`` breaks every metric down by the split's attributes the same
way (means over samples, the three shape statistics pooled over the group's distances).

The network runs on ``device``; FLAME on the same device; the metrics on CPU.
"""
from __future__ import annotations

import argparse
import io
import json
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from . import metrics as M
from .data import attribute_key, collate, flame_dir, open_split, split_protocol
from .errors import InputFileNotFound, InputValueError
from .files import atomic_write, write_json
from .flame import ALIGN7, FlameLayer, TopologyTensors, load_flame_assets, rot6d_to_matrix, split_3dmm
from .geometry import crop_to_image
from .model import load_model
from .settings import DataSettings, Settings, StudySettings, deep_merge

METRIC_COLUMNS = M.metric_names()  # every registered metric (metrics.METRICS)


def resolve_device(device: str) -> torch.device:
    return torch.device(("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device)


# --------------------------------------------------------------------------------------------
# Prediction
# --------------------------------------------------------------------------------------------
@torch.no_grad()
def predict_batch(model: nn.Module, layer: FlameLayer, image: Tensor, crop_affine: Tensor) -> dict[str, Tensor]:
    """The network's 3DMM vector and the meshes it implies.

    image [B,3,S,S], crop_affine [B,2,3] (isotropic) -> params_3dmm [B,413], vertices_canonical
    [B,V,3] (model space, metres), vertices_image [B,V,3] (the reprojected mesh in original-image
    pixels, x right, y down, depth in pixels growing away from the camera), landmarks_2d_image
    [B,68,2], rotation [B,3,3]
    """
    return mesh_views(layer, model(image)["params_3dmm"].float(), image.shape[-1], crop_affine)


def mesh_views(layer: FlameLayer, params: Tensor, crop_size: int, crop_affine: Tensor,
               canonical: Tensor | None = None) -> dict[str, Tensor]:
    """What a 3DMM vector predicts, as :func:`predict_batch` returns it; ``canonical`` [B,V,3]
    replaces the mesh of the vector's shape/expression/jaw (the reference predictors place a
    ground-truth mesh with it).  params [B,413], crop_affine [B,2,3] -> predict_batch's dict"""
    canonical = layer.canonical(params) if canonical is None else canonical
    crop = layer.reproject(params, crop_size, canonical)
    xy = crop_to_image(crop[..., :2], crop_affine)
    on_image = torch.cat([xy, crop[..., 2:] / crop_affine[:, 0, 0, None, None]], dim=-1)
    return {"params_3dmm": params, "vertices_canonical": canonical, "vertices_image": on_image,
            "landmarks_2d_image": layer.landmarks68(on_image)[..., :2],
            "rotation": rot6d_to_matrix(split_3dmm(params)["rot6d"])}


def sample_metrics(pred: dict[str, Tensor], batch: dict[str, Tensor], topo: TopologyTensors,
                   protocol: str = StudySettings.shape_protocol) -> tuple[dict[str, Tensor], Tensor]:
    """Every registered metric per sample ([B] each, METRIC_COLUMNS) and each GT vertex's distance
    in mm [B,V] (NaN where the protocol does not score it).

    pred: predict_batch's output (CPU); batch: vertices_model, rotation, landmarks_2d_image, bbox.
    Builds the :class:`metrics.MetricInputs` each metric's ``sample`` reads. Z_n compares the GT
    posed by its rotation (z forward, as the benchmark's -world) with the predicted image-space
    mesh; the 3D metrics use the predicted canonical mesh. The shape error (``protocol``,
    :func:`metrics.shape_error_mm`) compares the posed meshes, expression and jaw included: the
    annotation is the posed GT mesh only, so no neutral GT exists to compare with (the NoW export,
    ``now.py``, writes neutral meshes for a NoW release, whose scans are neutral).
    """
    gt_v, R_gt = batch["vertices_model"].double(), batch["rotation"].double()
    pv, R = pred["vertices_canonical"].double(), pred["rotation"].double()
    gt68, pred68 = topo.landmarks68(gt_v), topo.landmarks68(pv)
    a7 = list(ALIGN7)
    zn_pred, zn_gt = pred["vertices_image"][:, topo.z_n].float(), (gt_v @ R_gt.transpose(1, 2))[:, topo.z_n].float()
    scored = topo.face if protocol == "landmarks" else torch.arange(gt_v.shape[1])  # "now": the sphere crops
    shape = M.shape_error_mm(pv, pred68[:, a7], gt_v[:, scored], gt68[:, a7], topo.faces, protocol)
    distances = torch.full(gt_v.shape[:2], float("nan"))
    distances[:, scored] = shape["distances"]
    c = M.MetricInputs(pred, batch, topo, pred_vertices=pv, gt_vertices=gt_v, pred_lmk68=pred68, gt_lmk68=gt68, R=R,
                       R_gt=R_gt, zn_pred=zn_pred, zn_gt=zn_gt, shape=shape)
    return {name: m.sample(c) for name, m in M.METRICS.items()}, distances


# --------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------
def _as_model(model_or_ckpt) -> nn.Module:
    return model_or_ckpt if isinstance(model_or_ckpt, nn.Module) else load_model(model_or_ckpt)[0]


POOLED = ("median_mm", "mean_mm", "std_mm")  # statistics of every distance of a group, not means over samples


def pooled_shape(distances: np.ndarray) -> dict[str, float]:
    """median_mm, mean_mm, std_mm (population) of every scored distance: distances [N,V], NaN
    where not scored (the NoW benchmark's statistics pool all images' distances the same way)."""
    d = distances[~np.isnan(distances)]
    return {"median_mm": float(np.median(d)), "mean_mm": float(d.mean()), "std_mm": float(d.std())}


def summarize(df, distances: np.ndarray, protocol: str = StudySettings.shape_protocol) -> dict:
    """Means over samples of METRIC_COLUMNS, but :data:`POOLED` are pooled over every distance
    (:func:`pooled_shape`; distances [N,V], rows in ``df``'s order); n_samples; shape_protocol;
    by_attribute {attribute: {value: {metric: the same statistics over the group, "n": count}}}."""
    def stats(rows) -> dict:
        return {**{m: float(df[m].iloc[rows].mean()) for m in METRIC_COLUMNS}, **pooled_shape(distances[rows])}

    out = {**stats(np.arange(len(df))), "n_samples": int(len(df)), "shape_protocol": protocol}
    attrs = [c for c in df.columns if c not in METRIC_COLUMNS and c != "item_id"]
    out["by_attribute"] = {a: {str(v): {"n": int(len(rows)), **stats(rows)}
                               for v, rows in df.groupby(a, sort=True).indices.items()} for a in attrs}
    return out


def evaluate(model_or_ckpt, dataset, flame_layer: FlameLayer, batch_size: int = 16, device: str = "cpu",
             protocol: str = StudySettings.shape_protocol, num_workers: int = 0) -> tuple:
    """Score a model (or a checkpoint path) on a dataset with annotations: :func:`evaluate_predictor`
    with the network's predictions."""
    dev = resolve_device(device)
    model = _as_model(model_or_ckpt).to(dev).eval()
    layer = flame_layer.to(dev).eval()
    return evaluate_predictor(lambda b: predict_batch(model, layer, b["image"].to(dev), b["crop_affine"].to(dev)),
                              dataset, layer, batch_size, protocol, num_workers)


def evaluate_predictor(predictor, dataset, layer: FlameLayer, batch_size: int = 16,
                       protocol: str = StudySettings.shape_protocol,
                       num_workers: int = 0, desc: str = "evaluate", progress: bool = True) -> tuple:
    """Score any predictor on a dataset with annotations.

    predictor: batch -> predict_batch's dict; dataset: a DAD3DHeadsDataset (or anything with its
    batch keys and ``items``) -> (per-sample DataFrame: item_id, one column per attribute,
    METRIC_COLUMNS; the aggregate dict, see :func:`summarize`; arrays for predictions.npz:
    item_id, params_3dmm, crop_affine, landmarks_2d_image, crop_size, vertex_error_mm [V]
    (each vertex's mean distance over the samples that score it, NaN where none does)).
    """
    import pandas as pd
    from tqdm import tqdm

    topo = TopologyTensors(layer.topology)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                                         collate_fn=collate)
    rows, dists, keep = [], [], defaultdict(list)
    crop_size = None
    for batch in tqdm(loader, desc=desc, unit="batch", disable=not progress or len(loader) < 2):
        crop_size = batch["image"].shape[-1]
        with torch.no_grad():
            pred = {k: v.cpu() for k, v in predictor(batch).items()}
        values, d = sample_metrics(pred, batch, topo, protocol)
        for j, i in enumerate(batch["index"].tolist()):
            item = dataset.items[i]
            attributes = {str(k): attribute_key(v) for k, v in (item.get("attributes") or {}).items()}
            rows.append({"item_id": str(item["item_id"]), **attributes,
                         **{m: float(values[m][j]) for m in METRIC_COLUMNS}})
        dists.append(d.numpy())
        for k in ("params_3dmm", "landmarks_2d_image"):
            keep[k].append(pred[k].numpy())
        keep["crop_affine"].append(batch["crop_affine"].numpy())
    if not rows:
        raise InputValueError("evaluate: the dataset is empty")
    df = pd.DataFrame(rows)
    distances = np.concatenate(dists)
    vertex_error = np.full(layer.n_vertices, np.nan)
    counts = (~np.isnan(distances)).sum(axis=0)
    some = counts > 0
    scored = np.ascontiguousarray(distances[:, some])  # row-major, so that the sums run as they always did
    vertex_error[some] = np.nansum(scored, axis=0) / counts[some].astype(distances.dtype)
    arrays = {"item_id": df["item_id"].to_numpy(dtype=str), "crop_size": np.int64(crop_size),
              "vertex_error_mm": vertex_error, **{k: np.concatenate(v) for k, v in keep.items()}}
    return df, summarize(df, distances, protocol), arrays


def save_evaluation(out_dir: str | Path, df, agg: dict, arrays: dict) -> None:
    """per_sample.csv, evaluation.json and predictions.npz in ``out_dir``, each written atomically."""
    out = Path(out_dir)
    atomic_write(out / "per_sample.csv", df.to_csv(index=False).encode())
    write_json(out / "evaluation.json", agg)
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    atomic_write(out / "predictions.npz", buf.getvalue())


def split_dataset(d: DataSettings, split: str, annotations: bool | None = True, assets=None):
    """(dataset, FLAME assets) of a split (:func:`dad3dlib.data.open_split`) of a run's data section
    (``assets``: already loaded ones)."""
    assets = assets or load_flame_assets(flame_dir(d))
    return open_split(d, split, assets, annotations=annotations), assets


def evaluate_run(params: dict, checkpoint: str | Path, out_dir: str | Path, split: str | None = None,
                 device: str = "auto", batch_size: int | None = None) -> dict:
    """Evaluate a run's checkpoint on ``split`` of its data (None: the evaluation split of
    :func:`dad3dlib.data.split_protocol`) with its shape protocol (``study.shape_protocol``); writes
    per_sample.csv, evaluation.json and predictions.npz into ``out_dir`` and returns the aggregate
    (flat metrics + by_attribute + ``split`` + ``shape_protocol``)."""
    settings = Settings.parse(params)
    d = settings.data
    split = split or split_protocol(d)["evaluate"]
    dataset, assets = split_dataset(d, split)
    df, agg, arrays = evaluate(checkpoint, dataset, FlameLayer(assets), batch_size or d.batch_size, device,
                               settings.study.shape_protocol, num_workers=d.num_workers)
    agg["split"] = split
    save_evaluation(out_dir, df, agg, {**arrays, "split": np.str_(split)})
    return agg


# --------------------------------------------------------------------------------------------
# Submission in the reference benchmark's format
# --------------------------------------------------------------------------------------------
def submission_entries(pred: dict[str, Tensor], topo: TopologyTensors) -> list[dict]:
    """predict_batch output -> reference submission entries: 68_landmarks_2d and N_landmarks_3d
    in original-image pixels (depth growing away from the camera, as the benchmark's Z_n expects),
    7_landmarks_3d of that mesh, the 3DMM rotation matrix."""
    v = pred["vertices_image"].double().cpu()
    lmk = topo.landmarks68(v)
    return [{"68_landmarks_2d": lmk[i, :, :2].tolist(), "N_landmarks_3d": v[i].tolist(),
             "7_landmarks_3d": lmk[i, list(ALIGN7)].tolist(), "rotation_matrix": pred["rotation"][i].double().tolist()}
            for i in range(len(v))]


def predict(checkpoint: str | Path, data: str | Path, split: str, out: str | Path, flame_assets=None,
            device: str = "auto", batch_size: int = 16, num_workers: int = 0) -> int:
    """Write a reference-format submission for every item of ``split`` (annotations not needed);
    returns the number of items."""
    from tqdm import tqdm

    model, params = load_model(checkpoint)
    d = DataSettings.parse({**params["data"], "root": str(Path(data).resolve()),
                            **({"flame_path": str(flame_assets)} if flame_assets else {})}, str(checkpoint))
    dataset, assets = split_dataset(d, split, annotations=False)
    dev = resolve_device(device)
    model, layer = model.to(dev).eval(), FlameLayer(assets).to(dev).eval()
    topo = TopologyTensors(layer.topology)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                                         collate_fn=collate)
    submission = {}
    for batch in tqdm(loader, desc="predict", unit="batch", disable=len(loader) < 2):
        pred = predict_batch(model, layer, batch["image"].to(dev), batch["crop_affine"].to(dev))
        entries = submission_entries(pred, topo)
        for i, entry in zip(batch["index"].tolist(), entries):
            submission[str(dataset.items[i]["item_id"])] = entry
    atomic_write(Path(out), json.dumps(submission).encode())
    return len(submission)


def predict_now(checkpoint: str | Path, images: str | Path, out: str | Path, flame_assets=None,
                device: str = "auto", batch_size: int = 16) -> int:
    """NoW challenge files for every image of a NoW release folder (:func:`now.export`) with a
    checkpoint, cropped as its evaluation crops (its crop size and ``data.clip_bbox``); FLAME from ``flame_assets``, else the checkpoint's data's
    (:func:`data.flame_dir`). Returns the number of images."""
    from . import now

    model, params = load_model(checkpoint)
    d = DataSettings.parse(params["data"], str(checkpoint))
    if flame_assets is None:
        try:
            flame_assets = flame_dir(d)
        except FileNotFoundError as e:
            raise InputFileNotFound(f"{checkpoint}: its data are not here to tell its FLAME directory ({e}); "
                                    "name it with --flame-assets") from None
    layer = FlameLayer(load_flame_assets(flame_assets))
    return now.export(model, layer, images, out, d.crop_size, resolve_device(device), batch_size, d.clip_bbox)


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------
def format_aggregate(agg: dict) -> str:
    lines = [f"{agg['n_samples']} samples" + (f" of {agg['split']}" if agg.get("split") else "")
             + f"; shape protocol {agg.get('shape_protocol', StudySettings.shape_protocol)}"]
    lines += M.text_table("metric", ("value",), [(m, [agg[m]]) for m in METRIC_COLUMNS])
    for attr, values in agg["by_attribute"].items():
        rows = [(value, [row["n"], *(row[m] for m in METRIC_COLUMNS)]) for value, row in values.items()]
        lines += ["", *M.text_table(attr, ("n",) + METRIC_COLUMNS, rows, width=11)]
    return "\n".join(lines)


def main_evaluate(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m dad3dlib evaluate",
                                 description="evaluate a checkpoint on a data split (per-sample CSV, JSON, npz)")
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--split", help="default: test, or val when the test split has no annotations")
    ap.add_argument("--data", help="DAD-3DHeads-format root (default: the checkpoint's)")
    ap.add_argument("--flame-assets", help="FLAME-format directory (default: the checkpoint's data's)")
    ap.add_argument("--out", help="output directory (default: next to the checkpoint, eval_<split>)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--shape-protocol", choices=tuple(M.SHAPE_PROTOCOLS),
                    help="how the 3D shape error is measured (default: the checkpoint's study.shape_protocol, "
                         "else landmarks): " + "; ".join(f"{k}: {v}" for k, v in M.SHAPE_PROTOCOLS.items()))
    args = ap.parse_args(argv)
    _, params = load_model(args.checkpoint)
    params = deep_merge(params, {"data": {**({"root": str(Path(args.data).resolve())} if args.data else {}),
                                          **({"flame_path": str(Path(args.flame_assets).resolve())}
                                             if args.flame_assets else {})},
                                 "study": {"shape_protocol": args.shape_protocol} if args.shape_protocol else {}})
    split = args.split or split_protocol(DataSettings.parse(params["data"], args.checkpoint))["evaluate"]
    out = Path(args.out) if args.out else Path(args.checkpoint).resolve().parent.parent / f"eval_{split}"
    agg = evaluate_run(params, args.checkpoint, out, split, args.device, args.batch_size)
    print(format_aggregate(agg))
    print(f"\nwrote {out}/per_sample.csv, evaluation.json, predictions.npz")
    return 0


def main_predict(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m dad3dlib predict",
                                 description="write a DAD-3DHeads benchmark submission JSON for a split, or "
                                             "NoW challenge meshes and landmarks for a NoW release folder")
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--format", choices=("dad3dheads", "now"), default="dad3dheads",
                    help="dad3dheads: a submission JSON (--data, --split); now: <subject>/<challenge>/<name>.obj "
                         "and .npy per image of --images (see dad3dlib/now.py)")
    ap.add_argument("--data", help="DAD-3DHeads-format root (--format dad3dheads)")
    ap.add_argument("--split", default="test")
    ap.add_argument("--images", help="NoW release folder: iphone_pictures/ and detected_face/ (--format now)")
    ap.add_argument("--out", required=True, help="submission JSON (dad3dheads) or folder (now) to write")
    ap.add_argument("--flame-assets", help="FLAME-format directory (default: the checkpoint's data's)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--batch-size", type=int, default=16)
    args = ap.parse_args(argv)
    if args.format == "now":
        if not args.images:
            ap.error("--format now needs --images")
        n = predict_now(args.checkpoint, args.images, args.out, args.flame_assets, args.device, args.batch_size)
    else:
        if not args.data:
            ap.error("--format dad3dheads needs --data")
        n = predict(args.checkpoint, args.data, args.split, args.out, args.flame_assets, args.device, args.batch_size)
    print(f"wrote {n} predictions to {args.out}")
    return 0
