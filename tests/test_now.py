"""NoW challenge export on a small generated folder in the NoW release layout: the files where the
NoW evaluation code (compute_error.py) looks for them, the neutral mesh, the landmarks, the face
boxes read without running their pickles, bad input in one line."""
from __future__ import annotations

import os
import pickle

import cv2
import numpy as np
import pytest
import torch
from torch import nn

from dad3dlib import cli, config, now
from dad3dlib.data import IMAGENET_MEAN, IMAGENET_STD
from dad3dlib.flame import ALIGN7, FlameFormatError, FlameLayer, load_flame_assets, split_3dmm
from dad3dlib.model import create_model
from dad3dlib.settings import Settings
from dad3dlib.synthetic_head import default_flame_dir

torch.set_num_threads(1)
IMAGES = [("FaMoS_180424_03335_TA", "multiview_neutral", "IMG_0101"),
          ("FaMoS_180424_03335_TA", "selfie", "IMG_0230"),
          ("FaMoS_180704_03355_TA", "multiview_expressions", "IMG_0052"),
          ("FaMoS_180704_03355_TA", "multiview_occlusions", "IMG_0077")]
GREY = 40  # image k is uniformly grey at GREY * (k + 1)


def _save_npy_pickle(path, obj, protocol: int) -> None:
    """``obj`` pickled (``protocol``: 2 for files written by Python 2) in a 0-d object .npy."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        np.lib.format.write_array_header_1_0(f, {"descr": "|O", "fortran_order": False, "shape": ()})
        f.write(pickle.dumps(obj, protocol=protocol))


def _save_box(path, box: dict, protocol: int = 3) -> None:
    """A face box as the release stores it: a dict in a 0-d object array (np.save)."""
    _save_npy_pickle(path, np.array(box, dtype=object), protocol)


def make_release(root, n: int = len(IMAGES)):
    """A NoW-style release folder: uniform grey 90x120 JPEGs, face boxes inside them, the image list."""
    for k, (subject, challenge, name) in enumerate(IMAGES[:n]):
        img = root / "iphone_pictures" / subject / challenge / f"{name}.jpg"
        img.parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(img), np.full((120, 90, 3), GREY * (k + 1), np.uint8))
        box = {"left": np.float64(20.0 + k), "right": np.float64(70.0), "top": 30, "bottom": np.float32(95.5)}
        _save_box(root / "detected_face" / subject / challenge / f"{name}.npy", box, protocol=2 + k % 2)
    (root / "imagepathsvalidation.txt").write_text("".join(f"{s}/{c}/{n}.jpg\n" for s, c, n in IMAGES[:n]))
    return root


class GreyModel(nn.Module):
    """Outputs row k of a table of 3DMM vectors for a crop whose centre is grey GREY * (k + 1)."""

    def __init__(self, params: torch.Tensor):
        super().__init__()
        self.register_buffer("params", params)

    def forward(self, image):
        S = image.shape[-1]
        grey = (image[:, 0, S // 2, S // 2] * IMAGENET_STD[0] + IMAGENET_MEAN[0]) * 255
        return {"params_3dmm": self.params[(grey / GREY).round().long() - 1]}


@pytest.fixture(scope="module")
def layer():
    return FlameLayer(load_flame_assets(default_flame_dir()))  # the project's synthetic head


def _read_obj(path) -> tuple[np.ndarray, np.ndarray]:
    """Strictly: only ``v x y z`` and ``f i j k`` lines (what the NoW mesh loader reads)."""
    v, f = [], []
    for line in path.read_text().splitlines():
        tag, *rest = line.split()
        assert tag in ("v", "f") and len(rest) == 3, line
        (v if tag == "v" else f).append([float(x) if tag == "v" else int(x) for x in rest])
    return np.array(v), np.array(f)


def _compute_error_paths(folder, image_list) -> list[tuple]:
    """The prediction files compute_error.py's metric_computation opens for each image-list line."""
    out = []
    for line in image_list.read_text().splitlines():
        subject, challenge, filename = line.split("/")[-3], line.split("/")[-2], line.split("/")[-1]
        base = folder / subject / challenge / filename[:-4]
        out.append((base.with_name(base.name + ".obj"), base.with_name(base.name + ".npy")))
    return out


def test_export_writes_neutral_meshes_where_the_now_evaluation_reads_them(layer, tmp_path):
    root = make_release(tmp_path / "NoW_Dataset" / "final_release_version")
    g = torch.Generator().manual_seed(0)
    params = torch.randn(len(IMAGES), 413, generator=g) * 0.5  # shape, expression, jaw, rotation all non-zero
    n = now.export(GreyModel(params), layer, tmp_path / "NoW_Dataset", tmp_path / "pred", crop_size=64, batch_size=3)
    assert n == len(IMAGES)
    assert len(list((tmp_path / "pred").rglob("*.*"))) == 2 * len(IMAGES)
    p = split_3dmm(params)
    with torch.no_grad():
        neutral = layer.vertices(p["shape"], torch.zeros(len(IMAGES), 100), torch.zeros(len(IMAGES), 3)).numpy()
        posed = layer.vertices(p["shape"], p["expression"], p["jaw"]).numpy()
        lmk68 = layer.landmarks68(torch.from_numpy(neutral)).numpy()
    paths = _compute_error_paths(tmp_path / "pred", root / "imagepathsvalidation.txt")
    for k, (obj, npy) in enumerate(paths):
        v, f = _read_obj(obj)
        assert v.shape == (layer.n_vertices, 3) and np.array_equal(f, layer.faces.numpy() + 1)
        np.testing.assert_allclose(v, neutral[k], atol=1e-6)  # this image's identity, neutral, metres
        assert np.abs(posed[k] - neutral[k]).max() > 1e-3  # the expression and jaw were there to remove
        lmk = np.load(npy, allow_pickle=False)
        assert lmk.shape == (7, 3)
        np.testing.assert_allclose(lmk, lmk68[k, list(ALIGN7)], atol=1e-6)
    assert 0.05 < np.ptp(neutral[0][:, 0]) < 0.5  # a head's width in metres


def test_landmark_order_is_the_now_order(layer):
    """Right eye outer, right inner, left inner, left outer (subject's sides: x grows towards the
    subject's left), nose bottom (below the eyes, in front), right mouth corner, left mouth corner."""
    with torch.no_grad():
        _, lmk = now.neutral_mesh(layer, torch.zeros(1, 413))
    x, y, z = lmk[0].T.numpy()
    assert x[0] < x[1] < x[2] < x[3] and x[5] < x[4] < x[6]
    assert y[5] < y[4] < y[:4].min() and abs(y[5] - y[6]) < 1e-3 and z[4] > z[[0, 3, 5, 6]].max()


@pytest.mark.parametrize("protocol", [2, 3])
def test_face_box_is_read_from_the_release_format(tmp_path, protocol):
    path = tmp_path / "IMG_0101.npy"
    _save_box(path, {"left": np.float64(10.5), "right": 110, "top": np.float32(20.0), "bottom": 140.25}, protocol)
    np.testing.assert_allclose(now.read_face_box(path), [10.5, 20.0, 99.5, 120.25])


class _Evil:
    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return os.makedirs, (self.target,)


def test_a_face_box_that_would_run_code_is_refused(tmp_path):
    path, target = tmp_path / "IMG_0101.npy", tmp_path / "pwned"
    _save_npy_pickle(path, _Evil(str(target)), protocol=2)
    with pytest.raises(FlameFormatError, match=f"{path}: refused to unpickle.*os.makedirs"):
        now.read_face_box(path)
    assert not target.exists()


@pytest.mark.parametrize("box, message", [
    ({"left": 10, "right": 5, "top": 0, "bottom": 9}, "bad face box"),
    ({"left": 10, "right": 50, "top": 0}, "expected a dict with keys"),
    ({"left": "a", "right": 50, "top": 0, "bottom": 9}, "not numbers"),
])
def test_bad_face_boxes_are_named(tmp_path, box, message):
    path = tmp_path / "IMG_0101.npy"
    _save_box(path, box)
    with pytest.raises(ValueError, match=f"{path}: .*{message}"):
        now.read_face_box(path)


def test_obj_has_plain_vertices_and_one_based_faces():
    text = now.obj_text(np.array([[0.0, 1.5, -2.0], [1, 0, 0], [0, 0, 1]]), np.array([[0, 1, 2]]))
    assert text == "v 0 1.5 -2\nv 1 0 0\nv 0 0 1\nf 1 2 3\n"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny untrained checkpoint in train.py's format (smoke network, 64-px crops)."""
    settings = Settings.parse(config.run_params("smoke"))
    params = settings.to_dict()
    model = create_model(settings.model)
    path = tmp_path_factory.mktemp("ckpt") / "best.ckpt"
    torch.save({"hyper_parameters": {"params": params},
                "state_dict": {f"model.{k}": v for k, v in model.state_dict().items()}}, path)
    return path


def _predict(ckpt, images, out, flame=True) -> list[str]:
    return ["predict", "--format", "now", "--checkpoint", str(ckpt), "--images", str(images), "--out", str(out),
            "--device", "cpu"] + (["--flame-assets", str(default_flame_dir())] if flame else [])


def test_predict_now_command(checkpoint, tmp_path, capsys, layer):
    root = make_release(tmp_path / "now", n=2)
    assert cli.main(_predict(checkpoint, root, tmp_path / "pred")) == 0
    assert "wrote 2 predictions" in capsys.readouterr().out
    for obj, npy in _compute_error_paths(tmp_path / "pred", root / "imagepathsvalidation.txt"):
        v, f = _read_obj(obj)
        assert v.shape == (layer.n_vertices, 3) and len(f) == len(layer.faces)
        assert np.load(npy, allow_pickle=False).shape == (7, 3)


@pytest.mark.parametrize("breakage, named", [
    (lambda root: (root / "detected_face" / "FaMoS_180424_03335_TA" / "selfie" / "IMG_0230.npy").unlink(),
     "detected_face/FaMoS_180424_03335_TA/selfie/IMG_0230.npy: face box not found"),
    (lambda root: (root / "iphone_pictures" / "FaMoS_180424_03335_TA" / "selfie" / "IMG_0230.jpg").write_bytes(b"x"),
     "iphone_pictures/FaMoS_180424_03335_TA/selfie/IMG_0230.jpg: unreadable image"),
    (lambda root: [p.unlink() for p in root.rglob("*.jpg")], "iphone_pictures: no images"),
])
def test_predict_now_names_bad_input_in_one_line(checkpoint, tmp_path, capsys, breakage, named):
    root = make_release(tmp_path / "now", n=2)
    breakage(root)
    assert cli.main(_predict(checkpoint, root, tmp_path / "pred")) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and named in err and len(err.splitlines()) == 1


def test_predict_now_without_the_training_data_asks_for_the_flame_directory(checkpoint, tmp_path, capsys):
    """The checkpoint's data (which name its FLAME directory) are often not on the machine that runs NoW."""
    root = make_release(tmp_path / "now", n=1)
    ckpt = torch.load(checkpoint, weights_only=True)
    ckpt["hyper_parameters"]["params"]["data"]["root"] = str(tmp_path / "gone")
    torch.save(ckpt, tmp_path / "moved.ckpt")
    assert cli.main(_predict(tmp_path / "moved.ckpt", root, tmp_path / "pred", flame=False)) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / 'moved.ckpt'}: its data are not here" in err and "--flame-assets" in err
    assert len(err.splitlines()) == 1 and not (tmp_path / "pred").exists()


@pytest.mark.parametrize("clip_bbox", [False, True])
def test_export_crops_exactly_as_evaluation(tmp_path, clip_bbox):
    """The export's crop of each image is the evaluation crop (data.sample_affine, as the data set's):
    with ``clip_bbox`` (the paper preset) a box grown past the image is cut to it first."""
    from dad3dlib.data import sample_affine

    root = make_release(tmp_path / "now", n=2)
    subject, challenge, name = IMAGES[1]
    _save_box(root / "detected_face" / subject / challenge / f"{name}.npy",
              {"left": 2.0, "right": 88.0, "top": 4.0, "bottom": 118.0})  # grown by 10 %: past every edge
    items = now.release_items(root)
    images = now.NowImages(items, 64, clip_bbox)
    for k, item in enumerate(items):
        want = sample_affine(item["bbox"], (90, 120), 64, clip_bbox)
        np.testing.assert_array_equal(images[k]["crop_affine"].numpy(), want.astype(np.float32))
    clipped, grown = (sample_affine(items[1]["bbox"], (90, 120), 64, c) for c in (True, False))
    assert not np.allclose(clipped, grown)


def test_predict_now_crops_with_the_checkpoints_clip_setting(checkpoint, tmp_path, monkeypatch):
    """``predict --format now`` passes the checkpoint's data.clip_bbox to the export."""
    ckpt = torch.load(checkpoint, weights_only=True)
    ckpt["hyper_parameters"]["params"]["data"]["clip_bbox"] = True
    torch.save(ckpt, tmp_path / "clip.ckpt")
    seen = {}
    monkeypatch.setattr(now, "export", lambda *a, **k: seen.update(args=a, kwargs=k) or 0)
    assert cli.main(_predict(tmp_path / "clip.ckpt", tmp_path, tmp_path / "pred")) == 0
    assert seen["args"][-1] is True
