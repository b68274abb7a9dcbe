"""The reference predictors: what trivial or perfect predictions score with the study's metrics
(:data:`REFERENCES`, :func:`reference_prediction`), their evaluation on a run's data
(:func:`evaluate_references`), and a study's scores of them, measured once on its evaluation split in
``DIR/references/`` (:func:`ensure_references`)."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from .config import data_root, training_fingerprint
from .data import split_protocol
from .evaluate import evaluate_predictor, mesh_views, split_dataset
from .files import atomic_write, write_json
from .flame import (CANONICAL_Z_OFFSET, N_EXPR, N_JAW, N_SHAPE, FlameLayer, fit_weak_perspective, matrix_to_rot6d,
                    pack_3dmm)
from .geometry import FRONTAL_ROT6D, apparent_rotation
from .model import pose_prior
from .settings import ModelSettings, Settings, StudySettings


@dataclass(frozen=True)
class Reference:
    """A reference predictor: what of the ground truth it is given, and what it stands for."""
    gt_mesh: bool     # the ground-truth mesh (shape, expression, jaw); else the mean head
    gt_pose: bool     # the ground-truth rotation as the crop shows it, its best weak perspective; else the constant pose
    description: str  # one sentence for the report


REFERENCES = {
    "constant": Reference(False, False, "the mean head (zero shape, expression and jaw), frontal, at the training "
                          "split's median scale and position: what a network that ignores the image scores"),
    "shape_blind": Reference(False, True, "the mean head under the rotation the crop shows and its best "
                             "weak-perspective scale and translation: perfect pose, no knowledge of shape"),
    "pose_blind": Reference(True, False, "the ground-truth mesh (shape, expression, jaw) at the constant "
                            "predictor's pose: perfect shape, no knowledge of pose"),
    "camera_floor": Reference(True, True, "the ground-truth mesh under the rotation the crop shows (the ground "
                              "truth's, seen along the head's viewing ray) and its best weak-perspective scale and "
                              "translation: what a perfect network scores under DAD-3DNet's camera model from the "
                              "crop alone; its angle error is the viewing ray's angle to the optical axis, which "
                              "no crop shows"),
}


def at_gt_pose(batch: dict[str, Tensor], shape: Tensor, expression: Tensor, jaw: Tensor) -> Tensor:
    """The 3DMM vector of these shape, expression and jaw coefficients under the ground truth's
    rotation as the crop shows it (:func:`geometry.apparent_rotation`: a crop cannot show the angle
    of the head's viewing ray) and its best weak-perspective scale and translation
    (:func:`flame.fit_weak_perspective`).

    batch: vertices_model [B,V,3], rotation [B,3,3], view_ray [B,3], vertices_crop [B,V,2],
    image [B,3,S,S] (for S); shape [B,300], expression [B,100], jaw [B,3] -> [B,413]
    """
    verts = batch["vertices_model"].float()
    R = apparent_rotation(batch["rotation"].float(), batch["view_ray"].float())
    scale, trans = fit_weak_perspective(verts, R, batch["vertices_crop"].float(), batch["image"].shape[-1])
    return pack_3dmm(shape, expression, jaw, matrix_to_rot6d(R), torch.cat([trans, trans.new_zeros(len(trans), 1)], -1),
                     (scale - 1)[:, None])


def reference_prediction(name: str, batch: dict[str, Tensor], layer: FlameLayer, prior: dict) -> dict[str, Tensor]:
    """The prediction of reference predictor ``name`` (:data:`REFERENCES`) for a batch.

    batch: vertices_model [B,V,3], rotation [B,3,3], view_ray [B,3], vertices_crop [B,V,2],
    crop_affine [B,2,3], image [B,3,S,S] (for S); prior: {"scale", "tx", "ty"} (:func:`model.pose_prior`)
    -> predict_batch's dict
    """
    reference = REFERENCES[name]
    verts = batch["vertices_model"].float()
    B, S = len(verts), batch["image"].shape[-1]
    zeros = verts.new_zeros
    mean = zeros(B, N_SHAPE), zeros(B, N_EXPR), zeros(B, N_JAW)
    if reference.gt_pose:
        params = at_gt_pose(batch, *mean)
    else:
        rot6d = torch.tensor(FRONTAL_ROT6D).expand(B, 6)
        scale, trans = torch.full((B,), float(prior["scale"])), torch.tensor([prior["tx"], prior["ty"]]).expand(B, 2)
        params = pack_3dmm(*mean, rot6d, torch.cat([trans, zeros(B, 1)], -1), (scale - 1)[:, None])
    canonical = verts + verts.new_tensor([0.0, 0.0, CANONICAL_Z_OFFSET]) if reference.gt_mesh else None
    return mesh_views(layer, params, S, batch["crop_affine"].float(), canonical)


def evaluate_references(params: dict, out_dir: str | Path, split: str | None = None, names=tuple(REFERENCES),
                        progress: bool = True) -> dict:
    """Evaluate the reference predictors on ``split`` of a run's data (None: the evaluation split of
    :func:`dad3dlib.data.split_protocol`), the pose prior fitted as training fits it
    (:func:`model.pose_prior` of the first ``model.pose_prior_samples`` samples of the protocol's fit
    split, never the evaluation split; here at the evaluation crop, so that it is deterministic; with
    the setting's default when a run fits none). Writes ``out_dir/<name>/{metrics.json,
    per_sample.csv}`` and ``out_dir/references.json`` (name -> description, the prior and the data it
    was measured on); returns {name: aggregate}."""
    settings = Settings.parse(params)
    d = settings.data
    splits = split_protocol(d)
    split = split or splits["evaluate"]
    dataset, assets = split_dataset(d, split)
    fit, _ = split_dataset(d, splits["fit"], assets=assets)
    prior = pose_prior(fit, settings.model.pose_prior_samples or ModelSettings.pose_prior_samples, d.crop_size)
    layer = FlameLayer(assets).eval()
    out, results = Path(out_dir), {}
    for name in names:
        df, agg, _ = evaluate_predictor(lambda b, n=name: reference_prediction(n, b, layer, prior), dataset, layer,
                                        d.batch_size, settings.study.shape_protocol, desc=f"reference {name}",
                                        progress=progress)
        atomic_write(out / name / "per_sample.csv", df.to_csv(index=False).encode())
        write_json(out / name / "metrics.json", {**agg, "reference": name})
        results[name] = agg
    write_json(out / "references.json",
               {"descriptions": {n: REFERENCES[n].description for n in names}, "split": split, "prior": prior,
                "data_root": str(data_root(d.root)), "crop_size": d.crop_size})
    return results


REFERENCES_DIR = "references"


def ensure_references(params: dict, study_dir: Path) -> Path:
    """The reference predictors (:data:`REFERENCES`) scored on the study's evaluation split
    (:func:`dad3dlib.data.split_protocol`) with its shape protocol, in ``study_dir/references/``;
    skipped when already measured on the same data, split, crop, prior and protocol."""
    out = study_dir / REFERENCES_DIR
    settings = Settings.parse(params)
    split = split_protocol(settings.data)["evaluate"]
    protocol = settings.study.shape_protocol  # counted when not the default, so earlier studies keep their references
    key = {"data": training_fingerprint({"data": params["data"]}), "split": split, "pose_prior_samples":
           (params.get("model") or {}).get("pose_prior_samples"),  # as given: the key of earlier studies
           **({"shape_protocol": protocol} if protocol != StudySettings.shape_protocol else {}),
           "pose": "apparent"}  # since the references' pose is the rotation the crop shows: measured again
    try:
        if json.loads((out / "references.json").read_text()).get("key") == key:
            return out
    except (OSError, ValueError):
        pass
    evaluate_references(params, out, split, progress=False)  # beside the runs: the study's own bar is the progress
    record = json.loads((out / "references.json").read_text())
    write_json(out / "references.json", {**record, "key": key})
    return out
