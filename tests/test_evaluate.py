"""Split evaluation and reference-format predictions, with a model that outputs known 3DMM vectors."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import Dataset

from conftest import random_3dmm
from dad3dlib import benchmark as BM
from dad3dlib import evaluate as E
from dad3dlib import metrics as M
from dad3dlib.flame import FlameLayer, TopologyTensors, load_flame_assets, matrix_to_rot6d, rot6d_to_matrix, split_3dmm
from dad3dlib.references import REFERENCES, reference_prediction
from dad3dlib.settings import Settings
from dad3dlib.synthetic_head import default_flame_dir

torch.set_num_threads(1)
S = 64
FLIP = torch.diag(torch.tensor([1.0, -1.0, -1.0]))


def _yaw_pitch(yaw: float, pitch: float) -> torch.Tensor:
    cy, sy, cp, sp = math.cos(yaw), math.sin(yaw), math.cos(pitch), math.sin(pitch)
    Ry = torch.tensor([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    Rx = torch.tensor([[1, 0, 0], [0, cp, -sp], [0, sp, cp]])
    return FLIP @ Ry @ Rx  # the 3DMM rotation of a head turned by (yaw, pitch)


class TableModel(nn.Module):
    """Outputs row i of a table of 3DMM vectors for an image whose first pixel holds i."""

    def __init__(self, params: torch.Tensor):
        super().__init__()
        self.register_buffer("params", params)

    def forward(self, image):
        return {"params_3dmm": self.params[image[:, 0, 0, 0].round().long()]}


class HeadsFromParams(Dataset):
    """Samples whose ground truth is exactly the mesh of given 3DMM vectors (crop = 2·image − 20)."""

    def __init__(self, layer: FlameLayer, params: torch.Tensor, rays: torch.Tensor | None = None):
        self.params = params
        self.rays = torch.tensor([0.0, 0.0, 1.0]).expand(len(params), 3) if rays is None else rays
        p = split_3dmm(params)
        with torch.no_grad():
            self.vertices = layer.vertices(p["shape"], p["expression"], p["jaw"])
            crop = layer.reproject(params, S)
        self.crop = crop[..., :2]
        self.R = rot6d_to_matrix(p["rot6d"])
        self.A = torch.tensor([[2.0, 0, -20], [0, 2.0, -20]]).expand(len(params), 2, 3)
        self.image_vertices = torch.cat([(crop[..., :2] + 20) / 2, crop[..., 2:] / 2], -1)
        self.lmk = layer.landmarks68(self.image_vertices)[..., :2]
        self.items = [{"item_id": f"s{i}", "attributes": {"quality": ["hq", "lq"][i % 2], "occlusions": i < 2}}
                      for i in range(len(params))]

    def __len__(self):
        return len(self.params)

    def __getitem__(self, i):
        lo, hi = self.lmk[i].min(0).values, self.lmk[i].max(0).values
        image = torch.zeros(3, S, S)
        image[0, 0, 0] = i
        return {"image": image, "crop_affine": self.A[i], "vertices_model": self.vertices[i], "rotation": self.R[i],
                "view_ray": self.rays[i], "vertices_crop": self.crop[i],
                "landmarks_2d_image": self.lmk[i], "bbox": torch.cat([lo, hi - lo]), "index": torch.tensor(i)}


@pytest.fixture(scope="module")
def setup():
    assets = load_flame_assets(default_flame_dir())  # the project's synthetic head
    layer = FlameLayer(assets)
    g = torch.Generator().manual_seed(0)
    n = 5
    angles = torch.rand(n, 2, generator=g) - 0.5
    R = torch.stack([_yaw_pitch(0.5 * float(a), 0.3 * float(b)) for a, b in angles])
    params = random_3dmm(R, g, scale=4.0)
    return layer, params, HeadsFromParams(layer, params)


def test_gt_as_prediction_is_perfect(setup):
    layer, params, data = setup
    df, agg, arrays = E.evaluate(TableModel(params), data, layer, batch_size=2)
    assert list(df["item_id"]) == [f"s{i}" for i in range(5)]
    assert {"quality", "occlusions"} <= set(df.columns) and set(E.METRIC_COLUMNS) <= set(df.columns)
    for m in ("nme_reprojection", "angle_error_deg", "pose_error", "yaw_error_deg", "median_mm", "mean_mm", "chamfer"):
        assert df[m].abs().max() < 1e-3, m
    assert df["z5_accuracy"].min() == 1.0 and df["z5_accuracy_local"].min() == 1.0
    assert agg["n_samples"] == 5 and agg["mean_mm"] < 1e-3
    assert agg["by_attribute"]["quality"]["hq"]["n"] == 3
    assert set(agg["by_attribute"]["occlusions"]) == {"true", "false"}
    assert arrays["params_3dmm"].shape == (5, 413) and arrays["crop_affine"].shape == (5, 2, 3)
    assert np.isnan(arrays["vertex_error_mm"]).sum() == layer.n_vertices - len(layer.subset("face"))


def test_sample_metrics_computes_exactly_the_registered_metrics(setup):
    layer, params, data = setup
    batch = next(iter(torch.utils.data.DataLoader(data, batch_size=2)))
    pred = E.mesh_views(layer, params[:2], batch["image"].shape[-1], batch["crop_affine"])
    values, _ = E.sample_metrics(pred, batch, TopologyTensors(layer.topology))
    assert tuple(values) == E.METRIC_COLUMNS == tuple(M.METRICS)
    assert all(v.shape == (2,) for v in values.values())


def test_every_list_of_metrics_derives_from_the_records():
    from dad3dlib import REPO_ROOT, report

    assert list(report.METRICS) == [k for k, m in M.METRICS.items() if "study" in m.scopes]
    assert all(report.METRICS[k] is m for k, m in M.METRICS.items() if k in report.METRICS)
    assert BM.METRICS == M.metric_names("benchmark") and set(BM.SHORT) == set(BM.METRICS)
    assert all(BM.BENCHMARK_METRICS[k] == M.METRICS[k].benchmark for k in BM.METRICS)
    notebook = json.loads((REPO_ROOT / "notebooks" / "aggregate.ipynb").read_text())
    code = "".join("".join(c["source"]) for c in notebook["cells"] if c["cell_type"] == "code")
    assert "report.ATTRIBUTE_METRICS" in code and not any(f"'{k}'" in code or f'"{k}"' in code for k in M.METRICS)
    assert report.format_metric("z5_accuracy", 0.5) == "0.500" and report.format_metric("mean_mm", 0.5) == "0.50"
    with pytest.raises(ValueError, match="benchmark scope and a benchmark function go together"):
        M.register_metric("nothing", "Nothing", "lower", lambda c: None, scopes=("benchmark",))


def test_pose_error_moves_pose_metrics_only(setup):
    """Rotating the prediction by 10° about the camera's vertical axis: angle 10°, yaw 10°, the
    canonical shape untouched (0 mm), the reprojection off."""
    layer, params, data = setup
    turned = params.clone()
    R = rot6d_to_matrix(split_3dmm(params)["rot6d"])
    c, s = math.cos(math.radians(10)), math.sin(math.radians(10))
    Ry = torch.tensor([[c, 0, s], [0, 1, 0], [-s, 0, c]])
    turned[:, 403:409] = matrix_to_rot6d(FLIP @ Ry @ FLIP @ R)
    df, agg, _ = E.evaluate(TableModel(turned), data, layer, batch_size=5)
    assert np.allclose(df["angle_error_deg"], 10, atol=1e-3) and np.allclose(df["yaw_error_deg"], 10, atol=0.2)
    assert df["mean_mm"].max() < 1e-3 and df["chamfer"].max() < 1e-6
    assert df["nme_reprojection"].min() > 1 and df["z5_accuracy_local"].max() < 1


def test_shape_error_in_millimetres(setup):
    """A different identity gives mm errors of the size of the change; pooled median vs per sample."""
    layer, params, data = setup
    other = params.clone()
    other[:, :300] += 0.5 * torch.randn(5, 300, generator=torch.Generator().manual_seed(1))
    df, agg, arrays = E.evaluate(TableModel(other), data, layer, batch_size=5)
    assert 0.2 < agg["mean_mm"] < 20 and df["median_mm"].min() > 0.05
    assert agg["mean_mm"] == pytest.approx(df["mean_mm"].mean(), rel=1e-6)  # same point count per sample
    assert np.nanmean(arrays["vertex_error_mm"]) == pytest.approx(agg["mean_mm"], rel=1e-6)


def test_reference_predictors_known_answers(setup):
    """On data whose camera is exactly weak-perspective, the camera floor (GT mesh, GT pose) is
    perfect; the shape-blind predictor has the constant's mesh error and no pose error; the
    pose-blind one has no mesh error and the constant's pose error (frontal vs GT rotation)."""
    from dad3dlib.metrics import angle_error_deg
    from dad3dlib.geometry import FRONTAL_ROT6D

    layer, params, data = setup
    prior = {"scale": 4.5, "tx": 0.02, "ty": -0.01}
    res = {n: E.evaluate_predictor(lambda b, n=n: reference_prediction(n, b, layer, prior), data, layer, 5)[0]
           for n in REFERENCES}
    floor, const, sblind, pblind = (res[n] for n in ("camera_floor", "constant", "shape_blind", "pose_blind"))
    for m in ("nme_reprojection", "angle_error_deg", "median_mm", "mean_mm"):
        assert floor[m].abs().max() < 1e-3, m
    assert floor["z5_accuracy"].min() == 1.0
    frontal = rot6d_to_matrix(torch.tensor(FRONTAL_ROT6D)).expand(5, 3, 3)
    np.testing.assert_allclose(const["angle_error_deg"], angle_error_deg(frontal, data.R).numpy(), atol=1e-3)
    np.testing.assert_allclose(pblind["angle_error_deg"], const["angle_error_deg"], atol=1e-6)
    assert sblind["angle_error_deg"].max() < 1e-3 and pblind["mean_mm"].max() < 1e-3
    np.testing.assert_allclose(sblind["mean_mm"], const["mean_mm"], rtol=1e-5)
    assert const["mean_mm"].min() > 0.1 and (const["nme_reprojection"] > 1).all()
    assert (sblind["nme_reprojection"] > 0.1).all() and (pblind["nme_reprojection"] > 1).all()


def test_angle_against_the_crops_view_known_answers(setup):
    """Heads seen along rays at known angles from the optical axis: the GT rotation as prediction
    is off by each ray's angle against the rotation the crop shows, and the camera floor (posed as
    the crop shows) by the same angle against the GT rotation; each is exact on its own rotation."""
    layer, params, _ = setup
    tilt = torch.tensor([0.0, 5.0, 12.0, 20.0, 33.0])
    azimuth = torch.tensor([0.0, 40.0, 150.0, 260.0, 330.0])
    t, a = torch.deg2rad(tilt), torch.deg2rad(azimuth)
    rays = torch.stack([t.sin() * a.cos(), t.sin() * a.sin(), t.cos()], -1)
    data = HeadsFromParams(layer, params, rays)
    gt = E.evaluate(TableModel(params), data, layer, batch_size=2)[0]
    floor = E.evaluate_predictor(lambda b: reference_prediction("camera_floor", b, layer, {}), data, layer, 5)[0]
    np.testing.assert_allclose(gt["angle_error_deg"], 0, atol=1e-3)
    np.testing.assert_allclose(gt["angle_error_seen_deg"], tilt, atol=1e-3)
    np.testing.assert_allclose(floor["angle_error_seen_deg"], 0, atol=1e-3)
    np.testing.assert_allclose(floor["angle_error_deg"], tilt, atol=1e-3)


def test_save_evaluation_writes_atomically(setup, tmp_path):
    layer, params, data = setup
    df, agg, arrays = E.evaluate(TableModel(params), data, layer, batch_size=5)
    E.save_evaluation(tmp_path / "run", df, agg, arrays)
    files = sorted(p.name for p in (tmp_path / "run").iterdir())
    assert files == ["evaluation.json", "per_sample.csv", "predictions.npz"]
    assert json.loads((tmp_path / "run" / "evaluation.json").read_text())["n_samples"] == 5
    npz = np.load(tmp_path / "run" / "predictions.npz", allow_pickle=False)
    assert list(npz["item_id"]) == list(df["item_id"]) and int(npz["crop_size"]) == S


def _benchmark_gt(data: HeadsFromParams, layer: FlameLayer, params: torch.Tensor, i: int, height: int = 100) -> dict:
    """The benchmark GT of sample i: MV = [FLIP·R | 0] and an orthographic P that reproduce the
    weak-perspective image of the sample (crop = 2·image − 20)."""
    p = split_3dmm(params[i:i + 1])
    s = float(p["scale"][0, 0]) + 1
    k = s * S / 2 / 2  # image px per model unit
    R = data.R[i]
    off = R @ torch.tensor([0.0, 0.0, 0.05])
    c = [(k * off[j] + ((float(p["translation"][0, j]) + 1) * S / 2 + 20) / 2).item() for j in (0, 1)]
    mv = torch.eye(4)
    mv[:3, :3] = FLIP @ R
    proj = torch.tensor([[k, 0, 0, c[0]], [0, k, 0, height - c[1]], [0, 0, 1.0, 0], [0, 0, 0, 1.0]])
    return {"vertices": data.vertices[i].double(), "model_view_matrix": mv.double(), "projection_matrix": proj.double(),
            "image_height": torch.tensor(float(height), dtype=torch.float64), "bbox": data[i]["bbox"].double()}


def test_submission_scores_perfectly_on_the_benchmark(setup):
    """predict's entries (image-space mesh, landmarks, rotation) for the GT's own 3DMM vectors score
    NME 0, Z5 1, chamfer 0 and pose error 0 in the benchmark: the conventions agree."""
    layer, params, data = setup
    topo = TopologyTensors(layer.topology)
    batch = next(iter(torch.utils.data.DataLoader(data, batch_size=5)))
    pred = E.predict_batch(TableModel(params), layer, batch["image"], batch["crop_affine"])
    entries = E.submission_entries(pred, topo)
    scorer = BM.Scorer(load_flame_assets(default_flame_dir()).topology)
    gts = [_benchmark_gt(data, layer, params, i) for i in range(5)]
    gt = {k: torch.stack([g[k] for g in gts]) for k in BM.GT_KEYS}
    preds = [BM.parse_prediction(e, f"item {i}", scorer.n_vertices) for i, e in enumerate(entries)]
    values = scorer(gt, preds)
    assert np.abs(values["nme_reprojection"]).max() < 1e-3
    assert values["z5_accuracy"].min() == 1.0 and values["z5_accuracy_local"].min() == 1.0
    assert values["chamfer"].max() < 1e-6 and values["pose_error"].max() < 1e-5


def test_now_protocol_scores_gt_as_prediction_zero_and_pools_by_attribute(setup):
    """Under the NoW protocol the ground truth scores 0; with another identity, every group's
    median / mean / std are the statistics of that group's pooled distances, as the top level's."""
    layer, params, data = setup
    df, agg, arrays = E.evaluate(TableModel(params), data, layer, batch_size=5, protocol="now")
    assert agg["shape_protocol"] == "now" and agg["mean_mm"] < 1e-3 and df["median_mm"].max() < 1e-3
    assert 0 < np.isnan(arrays["vertex_error_mm"]).sum() < layer.n_vertices  # the crop, not the face subset
    other = params.clone()
    other[:, :300] += 0.5 * torch.randn(5, 300, generator=torch.Generator().manual_seed(1))
    df, agg, _ = E.evaluate(TableModel(other), data, layer, batch_size=5, protocol="now")
    assert 0.1 < agg["mean_mm"] < 10
    for value, row in agg["by_attribute"]["quality"].items():
        rows = np.flatnonzero(df["quality"] == value)
        assert row["n"] == len(rows) and row["angle_error_deg"] == pytest.approx(df["angle_error_deg"].iloc[rows].mean())
    everything = E.summarize(df.assign(all="yes"), _distances(E, TableModel(other), data, layer), "now")
    assert {m: everything["by_attribute"]["all"]["yes"][m] for m in E.POOLED} == {m: agg[m] for m in E.POOLED}
    assert agg["median_mm"] != pytest.approx(df["median_mm"].mean(), rel=1e-4)  # pooled, not a mean of medians


def _distances(E, model, data, layer) -> np.ndarray:
    """Each sample's per-vertex distances [N,V] under the NoW protocol, in data order."""
    topo = TopologyTensors(layer.topology)
    batch = next(iter(torch.utils.data.DataLoader(data, batch_size=len(data))))
    pred = E.mesh_views(layer, model.params[batch["index"]], S, batch["crop_affine"])
    return E.sample_metrics(pred, batch, topo, "now")[1].numpy()


def test_evaluate_command_takes_the_shape_protocol(monkeypatch, tmp_path, capsys):
    """``evaluate --shape-protocol now`` overrides the checkpoint's study.shape_protocol; without it
    the checkpoint's params decide, and the printout names the protocol."""
    seen = []
    agg = {"n_samples": 1, "by_attribute": {}, **{m: 0.0 for m in E.METRIC_COLUMNS}}
    monkeypatch.setattr(E, "load_model", lambda c: (None, {"data": {"root": str(tmp_path)}, "study": {"jobs": 2}}))
    monkeypatch.setattr(E, "split_protocol", lambda d: {"evaluate": "test"})
    monkeypatch.setattr(E, "evaluate_run", lambda params, *a: seen.append(params["study"]) or
                        {**agg, "shape_protocol": Settings.parse(params).study.shape_protocol})
    assert E.main_evaluate(["--checkpoint", "c.ckpt", "--out", str(tmp_path), "--shape-protocol", "now"]) == 0
    assert E.main_evaluate(["--checkpoint", "c.ckpt", "--out", str(tmp_path)]) == 0
    assert seen == [{"jobs": 2, "shape_protocol": "now"}, {"jobs": 2}]
    out = capsys.readouterr().out
    assert "shape protocol now" in out and "shape protocol landmarks" in out
