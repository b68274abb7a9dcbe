"""The DAD-3DHeads-format loader: targets, crop geometry, cache, bad input."""
import json
import math
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import as_released, tiny_flame_assets
from dad3dlib import cli, data
from dad3dlib.data import DAD3DHeadsDataset, crop_affine, gaussian_heatmaps, warp_crop
from dad3dlib.settings import DataSettings
from dad3dlib.flame import landmarks_from_vertices, load_flame_assets
from dad3dlib.geometry import project
from dad3dlib.synthetic_head import default_flame_dir
from dad3dlib.synthetic_data import make_data

S = 96
KEYS = {"image", "landmarks_2d", "visibility", "heatmaps", "vertices_crop", "vertices_model", "rotation",
        "view_ray", "crop_affine", "bbox", "landmarks_2d_image", "index"}
TINY = {"splits": {"train": 6, "test": 2}, "image_sizes": [[160, 160], [144, 176]]}


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    out = tmp_path_factory.mktemp("src")
    make_data(out, {**TINY, "seed": 5}, workers=1)
    return out


@pytest.fixture
def root(tmp_path, source):
    """A private copy of the tiny data set (tests may damage it)."""
    shutil.copytree(source, tmp_path / "d")
    return tmp_path / "d"


def dataset(root, assets, **kw):
    kw.setdefault("cache_dir", root / "cache")
    return DAD3DHeadsDataset(root, kw.pop("split", "train"), S, assets, **kw)


def annotation(root, entry):
    ann = json.loads((root / entry["annotation_path"]).read_text())
    return (np.array(ann[k]) for k in ("vertices", "model_view_matrix", "projection_matrix"))


def test_sample_keys_shapes_and_targets(root, assets):
    ds = dataset(root, assets)
    assert len(ds) == 6 and ds.skipped == 0 and ds.items[2]["item_id"] == "train_000002"
    s = ds[2]
    V = len(assets.model.v_template)
    assert set(s) == KEYS
    shapes = {"image": (3, S, S), "landmarks_2d": (68, 2), "visibility": (68,), "heatmaps": (68, S // 4, S // 4),
              "vertices_crop": (V, 2), "vertices_model": (V, 3), "rotation": (3, 3), "view_ray": (3,),
              "crop_affine": (2, 3), "bbox": (4,), "landmarks_2d_image": (68, 2), "index": ()}
    assert {k: tuple(v.shape) for k, v in s.items()} == shapes
    assert s["index"].dtype == torch.int64 and all(v.dtype == torch.float32 for k, v in s.items() if k != "index")
    v, mv, P = annotation(root, ds.items[2])
    topo = assets.topology
    lmk = landmarks_from_vertices(torch.from_numpy(v[None]), torch.from_numpy(topo.faces),
                                  torch.from_numpy(topo.lmk_face_idx), torch.from_numpy(topo.lmk_bary))[0].numpy()
    h = data.read_image(ds.index.images[2]).shape[0]
    np.testing.assert_allclose(s["landmarks_2d_image"].numpy(), project(lmk, mv, P, h), atol=1e-3)
    A = s["crop_affine"].numpy().astype(np.float64)
    np.testing.assert_allclose(s["landmarks_2d"].numpy(), project(lmk, mv, P, h) @ A[:, :2].T + A[:, 2], atol=1e-3)
    np.testing.assert_allclose(s["vertices_crop"].numpy(), project(v, mv, P, h) @ A[:, :2].T + A[:, 2], atol=1e-3)
    np.testing.assert_allclose(s["vertices_model"].numpy(), v, atol=1e-6)
    np.testing.assert_allclose(s["rotation"].numpy(), np.diag([1, -1, -1]) @ mv[:3, :3], atol=1e-6)
    centroid = np.diag([1, -1, -1]) @ (mv[:3, :3] @ v.mean(0) + mv[:3, 3])  # the camera at the origin
    np.testing.assert_allclose(s["view_ray"].numpy(), centroid / np.linalg.norm(centroid), atol=1e-6)
    assert s["visibility"].sum() == 68  # the 10 % margin keeps the whole face in the crop


def test_eval_crop_is_the_bbox_grown_by_ten_percent(root, assets):
    ds = dataset(root, assets)
    s1, s2 = ds[1], ds[1]
    torch.testing.assert_close(s1["image"], s2["image"])
    x, y, w, h = ds.items[1]["bbox"]
    A = s1["crop_affine"].numpy()
    corners = np.array([[x - 0.1 * w, y - 0.1 * h], [x + 1.1 * w, y + 1.1 * h]]) @ A[:, :2].T + A[:, 2]
    long_side = np.argmax([w, h])
    np.testing.assert_allclose(corners[:, long_side], [0, S], atol=1e-3)
    np.testing.assert_allclose(corners.mean(0), [S / 2, S / 2], atol=1e-3)  # centred, padded


def test_train_margins_random_within_5_to_15_percent(root, assets):
    ds = dataset(root, assets, train=True, augment=True)
    torch.manual_seed(0)
    scales = []
    for _ in range(12):
        s = ds[0]
        scales.append(s["crop_affine"][0, 0].item())
        assert s["image"].shape == (3, S, S)
    x, y, w, h = ds.items[0]["bbox"]
    longest = max(w, h)
    grown = S / np.array(scales) / longest  # (1 + m1 + m2) of the longest side
    assert grown.min() >= 1.1 - 1e-4 and grown.max() <= 1.3 + 1e-4 and np.ptp(grown) > 0.02


def test_clip_bbox_cuts_the_grown_box_to_the_image():
    """A bbox at the image's left edge: the grown box is cut at x = 0 (the reference's crop), its
    longest side then fills the crop and the other is centred."""
    W, H = 200, 120
    bbox, m = (2.0, 30.0, 40.0, 50.0), (0.1, 0.1, 0.1, 0.1)  # grown: x in [-2, 46], y in [25, 85]
    A = crop_affine(bbox, m, 64, clip_to=(W, H))
    x0, x1, y0, y1 = 0.0, 46.0, 25.0, 85.0
    corners = np.array([[x0, y0], [x1, y1]]) @ A[:, :2].T + A[:, 2]
    np.testing.assert_allclose(corners[:, 1], [0, 64], atol=1e-9)  # the longest side (60 px) fills the crop
    np.testing.assert_allclose(corners[:, 0].mean(), 32, atol=1e-9)  # the clipped width centred
    assert A[0, 0] == 64 / 60
    unclipped = crop_affine(bbox, m, 64)
    assert not np.allclose(A, unclipped)
    np.testing.assert_allclose(crop_affine((50, 30, 40, 50), m, 64, clip_to=(W, H)), crop_affine((50, 30, 40, 50), m, 64))
    with pytest.raises(ValueError, match=r"bbox \[250, 30, 40, 50\] lies outside the 200x120 image"):
        crop_affine([250, 30, 40, 50], m, 64, clip_to=(W, H))


def test_dataset_clips_the_crop_when_asked(root, assets):
    plain, clipped = dataset(root, assets), dataset(root, assets, clip_bbox=True)
    for i in range(len(plain)):
        h, w = plain.image(i).shape[:2]
        bbox = plain.items[i]["bbox"]
        want = crop_affine(bbox, (data.MARGIN_EVAL,) * 4, S, (w, h))
        np.testing.assert_allclose(clipped[i]["crop_affine"].numpy(), want, rtol=1e-6)
        np.testing.assert_allclose(plain[i]["crop_affine"].numpy(), crop_affine(bbox, (data.MARGIN_EVAL,) * 4, S),
                                   rtol=1e-6)
    entries = json.loads((root / "DAD-3DHeadsDataset" / "train" / "train.json").read_text())
    entries[0]["bbox"] = [1000, 1000, 20, 20]
    (root / "DAD-3DHeadsDataset" / "train" / "train.json").write_text(json.dumps(entries))
    with pytest.raises(ValueError, match=r"train: item 'train_000000': bbox \[1000, 1000, 20, 20\] lies outside"):
        dataset(root, assets, clip_bbox=True, cache_dir=root / "cache2")[0]


def test_warp_crop_pixel_convention():
    """The crop pixel of an image point is A·[x, y, 1] (pixel i covers [i, i+1)), also with the
    area pre-shrink of large down-scalings: a blob's centroid maps through A."""
    ys, xs = np.mgrid[0:400, 0:300] + 0.5
    for bbox, size, sigma in (((100, 180, 60, 50), 64, 3.0), ((0, 0, 300, 400), 32, 25.0)):
        blob = 255 * np.exp(-((xs - 122.3) ** 2 + (ys - 203.6) ** 2) / (2 * sigma**2))
        img = np.repeat(blob[..., None], 3, axis=2).round().astype(np.uint8)
        A = crop_affine(bbox, (0.1, 0.1, 0.1, 0.1), size)
        crop = warp_crop(img, A, size)[..., 0].astype(np.float64)
        cy, cx = np.mgrid[0:size, 0:size] + 0.5
        centre = np.array([(crop * cx).sum(), (crop * cy).sum()]) / crop.sum()
        np.testing.assert_allclose(centre, A[:, :2] @ [122.3, 203.6] + A[:, 2], atol=0.05)


def test_heatmaps_follow_the_reference_coder():
    pts = np.array([[82.0, 45.4], [20.0, 20.0], [400.0, 10.0]])
    vis = np.array([1.0, 0.0, 1.0])
    hm = gaussian_heatmaps(pts, vis, 256)  # the reference crop: radius 5 cells, sigma 11/6
    assert hm.shape == (3, 64, 64) and hm.dtype == np.float32
    assert np.unravel_index(hm[0].argmax(), hm[0].shape) == (11, 20) and hm[0].max() == pytest.approx(1.0)
    sigma = 11 / 6
    assert hm[0, 11, 21] == pytest.approx(math.exp(-1 / (2 * sigma**2)), rel=1e-5)
    assert hm[0, 11, 25] > 0 and hm[0, 11, 26] == 0 and hm[0, 17, 20] == 0  # radius 5 window
    assert hm[1].max() == 0 and hm[2].max() == 0  # invisible; outside the map
    torch.testing.assert_close(gaussian_heatmaps(torch.tensor(pts), torch.tensor(vis), 256), torch.from_numpy(hm))


def test_visibility_is_zero_outside_the_crop(root, assets):
    split = root / "DAD-3DHeadsDataset/train/train.json"
    entries = json.loads(split.read_text())
    x, y, w, h = entries[0]["bbox"]
    entries[0]["bbox"] = [x, y, w, h * 0.4]  # top of the head only: the chin falls outside
    split.write_text(json.dumps(entries))
    s = dataset(root, assets)[0]
    inside = ((s["landmarks_2d"] > 0) & (s["landmarks_2d"] < S)).all(1).float()
    torch.testing.assert_close(s["visibility"], inside)
    lowest = s["landmarks_2d_image"][:, 1].argmax()
    assert 0 < s["visibility"].sum() < 68 and s["visibility"][lowest] == 0
    assert s["heatmaps"][lowest].max() == 0 and s["heatmaps"][s["visibility"].argmax()].max() == 1


def test_cache_is_reused_and_rebuilt_when_a_file_changes(root, assets):
    cache = root / "cache"
    ds = dataset(root, assets)
    assert isinstance(ds.index.vertices, np.memmap)
    caches = lambda: [p for p in cache.iterdir() if p.name != ".lock"]  # noqa: E731
    assert len(caches()) == 1
    first = caches()[0]
    assert dataset(root, assets).index.vertices is not None and caches() == [first]
    path = root / ds.items[3]["annotation_path"]
    ann = json.loads(path.read_text())
    ann["vertices"][0][0] += 0.001
    path.write_text(json.dumps(ann))
    ds2 = dataset(root, assets)
    assert ds2.index.vertices[3, 0, 0] == pytest.approx(ds.index.vertices[3, 0, 0] + 0.001, abs=1e-6)
    assert [p.name for p in caches()] != [first.name] and len(caches()) == 1


def test_a_data_set_reached_through_a_link_shares_its_cache(root, assets, tmp_path):
    """Two spellings of one data set (a checkout's outputs/ linked to another's) read one cache
    instead of rebuilding and replacing each other's."""
    link = tmp_path / "linked"
    link.symlink_to(root, target_is_directory=True)
    cache = tmp_path / "cache"
    dataset(root, assets, cache_dir=cache)
    first = sorted(p.name for p in cache.iterdir())
    dataset(link, assets, cache_dir=cache)
    assert sorted(p.name for p in cache.iterdir()) == first and len(first) == 2  # the cache and its lock


BUILD_CACHE = """
import sys, time
from pathlib import Path
from dad3dlib import data
from dad3dlib.flame import load_flame_assets
from dad3dlib.synthetic_head import default_flame_dir

root, cache, log = sys.argv[1:]
write = data._write_cache

def slow_write(*args):  # a long build: another process must wait for it, not build too
    with open(log, "a") as f:
        f.write("built\\n")
    time.sleep(1.0)
    write(*args)

data._write_cache = slow_write
assets = load_flame_assets(default_flame_dir())
print("ready", flush=True)
while not Path(log + ".go").exists():
    time.sleep(0.01)
print(len(data.DAD3DHeadsDataset(root, "train", 64, assets, cache_dir=cache)), flush=True)
"""


def test_processes_starting_together_build_the_cache_once(root, tmp_path):
    """Two processes (as the processes of one training run) open a split with no cache at the same
    moment: one builds the cache, the other waits for it and reads it."""
    log = tmp_path / "builds.txt"
    cmd = [sys.executable, "-c", BUILD_CACHE, str(root), str(root / "cache"), str(log)]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True) for _ in range(2)]
    try:
        assert [p.stdout.readline().strip() for p in procs] == ["ready", "ready"]
        Path(f"{log}.go").touch()
        assert [p.stdout.readline().strip() for p in procs] == ["6", "6"]
    finally:
        for p in procs:
            p.kill()
            p.wait()
    assert log.read_text().splitlines() == ["built"]


def test_cached_and_uncached_samples_agree(root, assets):
    a, b = dataset(root, assets), dataset(root, assets, cache=False)
    for k, v in a[4].items():
        torch.testing.assert_close(v, b[4][k], atol=1e-4, rtol=1e-5, msg=k)


@pytest.mark.parametrize("kw", [{}, {"train": True, "augment": True}, {"train": True, "cache": False},
                                {"split": "test", "annotations": False}], ids=["eval", "train", "uncached", "unlabelled"])
def test_a_batch_made_at_once_is_its_samples_made_one_by_one(root, assets, kw):
    """The DataLoader's batched fetch (``__getitems__``, then :func:`data.collate`) gives bit for
    bit what one sample at a time and torch's default collate give: same draws, same tensors,
    contiguous; and the default collate takes a batch made at once as well."""
    ds, order = dataset(root, assets, **kw), [1, 0, 1] if kw.get("split") == "test" else [4, 0, 5, 2]
    torch.manual_seed(3)
    batch = data.collate(ds.__getitems__(order))
    torch.manual_seed(3)
    one_by_one = torch.utils.data.default_collate([ds[i] for i in order])
    torch.manual_seed(3)
    default = torch.utils.data.default_collate(ds.__getitems__(order))
    assert set(batch) == set(one_by_one) == set(default)
    for k, v in one_by_one.items():
        for b in (batch[k], default[k]):
            assert b.dtype == v.dtype and b.is_contiguous() and torch.equal(b, v), k


def test_seeded_samples_make_a_batch_at_once_as_one_by_one(root, assets):
    """:class:`samplers.SeededSamples`'s batched fetch, also through a ``Subset`` (``train-fit``):
    each sample drawn from its own seed, as one at a time."""
    from dad3dlib.samplers import SeededSamples

    ds = dataset(root, assets, train=True, augment=True)
    items = [(3, 11), (0, 7), (3, 12), (1, 2 ** 61)]
    for wrapped in (ds, torch.utils.data.Subset(ds, [5, 4, 3, 2, 1, 0])):
        seeded = SeededSamples(wrapped)
        batch = data.collate(seeded.__getitems__(items))
        one_by_one = torch.utils.data.default_collate([seeded[item] for item in items])
        for k, v in one_by_one.items():
            assert torch.equal(batch[k], v), k
    assert not torch.equal(batch["image"][0], batch["image"][2])  # item 3 drawn from two seeds


def _missing_image(root, e):
    (root / e["img_path"]).unlink()


def _garbage_image(root, e):
    (root / e["img_path"]).write_bytes(b"\x89PNG not really")


def _missing_annotation(root, e):
    (root / e["annotation_path"]).unlink()


def _edit_annotation(fn):
    def edit(root, e):
        path = root / e["annotation_path"]
        ann = json.loads(path.read_text())
        fn(ann)
        path.write_text(json.dumps(ann))
    return edit


BAD = {
    "missing image": (_missing_image, FileNotFoundError, "image not found"),
    "unreadable image": (_garbage_image, ValueError, "unreadable image"),
    "missing annotation": (_missing_annotation, FileNotFoundError, "annotation not found"),
    "wrong vertex count": (_edit_annotation(lambda a: a["vertices"].pop()), ValueError, "vertex count"),
    "nan": (_edit_annotation(lambda a: a["model_view_matrix"][0].__setitem__(3, float("nan"))), ValueError,
            "NaN or inf"),
    "bad bbox": (lambda root, e: None, ValueError, "bad bbox"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_names_file_and_problem_or_is_skipped(root, assets, case):
    damage, error, message = BAD[case]
    split = root / "DAD-3DHeadsDataset/train/train.json"
    entries = json.loads(split.read_text())
    damage(root, entries[2])
    if case == "bad bbox":
        entries[2]["bbox"] = [1, 2, -3, 4]
        split.write_text(json.dumps(entries))
    with pytest.raises(error, match=message) as info:
        dataset(root, assets)
    assert "train_000002" in str(info.value) or "entry 2" in str(info.value)
    ds = dataset(root, assets, skip_bad=True)
    assert ds.skipped == 1 and len(ds) == 5 and "train_000002" not in [e["item_id"] for e in ds.items]
    with pytest.raises(error, match=message):  # the cache remembers the bad item
        dataset(root, assets)


@pytest.mark.parametrize("content", ["{not json", '{"a": 1}'])
def test_malformed_split_file(root, assets, content):
    split = root / "DAD-3DHeadsDataset/train/train.json"
    split.write_text(content)
    with pytest.raises(ValueError, match=r"train\.json: malformed split file"):
        dataset(root, assets, skip_bad=True)


def test_missing_split_file(root, assets):
    with pytest.raises(FileNotFoundError, match="val.json: split file not found"):
        dataset(root, assets, split="val")


def test_missing_data_root_is_named(tmp_path, assets):
    with pytest.raises(FileNotFoundError, match=r"nowhere: data directory not found"):
        dataset(tmp_path / "nowhere", assets, cache_dir=tmp_path / "cache")


@pytest.mark.parametrize("cache", [True, False])
def test_duplicate_item_ids_are_refused_naming_them_and_the_file(root, assets, cache):
    """A repeated item would be predicted once and scored twice."""
    split = root / "DAD-3DHeadsDataset/train/train.json"
    entries = json.loads(split.read_text())
    split.write_text(json.dumps(entries + [entries[1], entries[4], entries[1]]))
    with pytest.raises(ValueError, match=r"train\.json: duplicate item_id\(s\) \['train_000001', 'train_000004'\]"):
        dataset(root, assets, cache=cache, skip_bad=True)


def test_unannotated_split_gives_image_and_bbox_only(root, assets):
    ds = dataset(as_released(root), assets, split="test")
    assert not ds.annotations and len(ds) == 2
    assert set(ds[1]) == {"image", "crop_affine", "bbox", "index"}


def test_split_protocol_follows_the_test_splits_annotations(root):
    labelled = data.split_protocol(DataSettings(root=str(root)))
    assert labelled == {"fit": "train", "select": "val", "evaluate": "test", "submit": None, "holdout_fraction": None}
    as_released(root)
    assert data.split_protocol(DataSettings(root=str(root))) == {"fit": "train-fit", "select": "train-holdout",
                                                        "evaluate": "val", "submit": "test", "holdout_fraction": 0.1}
    assert data.split_protocol(DataSettings(root=str(root), holdout_fraction=0.3))["holdout_fraction"] == 0.3
    split = root / "DAD-3DHeadsDataset/test/test.json"  # annotations elsewhere, named by the entries
    split.write_text(json.dumps([{**e, "annotation_path": "x.json"} for e in json.loads(split.read_text())]))
    assert data.split_protocol(DataSettings(root=str(root)))["evaluate"] == "test"
    split.unlink()  # no test split: nothing to submit
    assert data.split_protocol(DataSettings(root=str(root))) == {"fit": "train-fit", "select": "train-holdout",
                                                        "evaluate": "val", "submit": None, "holdout_fraction": 0.1}


def test_holdout_is_a_fixed_hash_of_the_item_id(root, assets, monkeypatch):
    """The same items on every machine (SHA-256, pinned here), disjoint from the fit set, together train."""
    monkeypatch.setattr(data, "_cache_root", lambda: root / "cache")
    assert data.holdout_score("train_000000") == pytest.approx(0.0736371228882203)
    d = DataSettings(root=str(root), crop_size=S, holdout_fraction=0.35)
    ids = lambda ds: [ds.dataset.items[i]["item_id"] for i in ds.indices]  # noqa: E731
    holdout, fit = ids(data.open_split(d, "train-holdout", assets)), ids(data.open_split(d, "train-fit", assets))
    assert holdout == ["train_000000", "train_000001", "train_000002", "train_000005"]
    assert fit == ["train_000003", "train_000004"]
    assert data.open_split(d, "train-fit", assets, train=True).dataset.train
    with pytest.raises(ValueError, match=r"train: 'train-holdout' is empty \(data.holdout_fraction 0.05 of 6 "):
        data.open_split(replace(d, holdout_fraction=0.05), "train-holdout", assets)
    with pytest.raises(ValueError, match="unknown split 'train-other'"):
        data.open_split(d, "train-other", assets)


def test_dataloader_batches(root, assets):
    loader = torch.utils.data.DataLoader(dataset(root, assets, train=True, augment=True), batch_size=4)
    batch = next(iter(loader))
    assert batch["image"].shape == (4, 3, S, S) and batch["heatmaps"].shape == (4, 68, S // 4, S // 4)


def test_reads_annotations_on_the_real_flame_topology(tmp_path):
    """A hand-made item on FLAME's own topology files (no model needed: the topology is enough)."""
    import cv2

    import dad3dlib
    from dad3dlib.geometry import perspective_projection

    shared = dad3dlib.REPO_ROOT.parent / "shared" / "flame_topology"
    if not (shared / "flame_mesh_faces.pt").exists():
        pytest.skip("../shared/flame_topology not present")
    topo = load_flame_assets(shared, require_model=False).topology
    rng = np.random.default_rng(0)
    v = rng.normal(0, 0.05, (5023, 3))
    mv, P = np.eye(4), perspective_projection(300.0, 64.0, 64.0, 0.1, 10.0)
    mv[2, 3] = -0.8
    split = tmp_path / "DAD-3DHeadsDataset" / "val"
    (split / "images").mkdir(parents=True)
    (split / "annotations").mkdir()
    cv2.imwrite(str(split / "images/a1.png"), rng.integers(0, 255, (128, 128, 3), dtype=np.uint8))
    ann = {"vertices": v.tolist(), "model_view_matrix": mv.tolist(), "projection_matrix": P.tolist()}
    (split / "annotations/a1.json").write_text(json.dumps(ann))
    entry = {"item_id": "a1", "annotation_path": "DAD-3DHeadsDataset/val/annotations/a1.json",
             "img_path": "DAD-3DHeadsDataset/val/images/a1.png", "bbox": [30, 30, 60, 70], "attributes": {}}
    (split / "val.json").write_text(json.dumps([entry]))
    s = DAD3DHeadsDataset(tmp_path, "val", S, topo, cache_dir=tmp_path / "cache")[0]
    lmk = landmarks_from_vertices(torch.from_numpy(v[None]), torch.from_numpy(topo.faces),
                                  torch.from_numpy(topo.lmk_face_idx), torch.from_numpy(topo.lmk_bary))[0].numpy()
    np.testing.assert_allclose(s["landmarks_2d_image"].numpy(), project(lmk, mv, P, 128), atol=1e-3)
    assert s["vertices_model"].shape == (5023, 3)


def test_show_data_writes_the_grid(root, tmp_path):
    from PIL import Image

    from dad3dlib.viz import PANEL, show_data

    out = show_data(root, tmp_path / "grid.png", n=3, crop_size=64, columns=2, cache_dir=tmp_path / "cache")
    w, h = Image.open(out).size
    assert (w, h) == (2 * (2 * PANEL + 4), 2 * (PANEL + 4))


# --------------------------------------------------------------------------------------------
# Data made with another FLAME directory
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def other_flame(tmp_path_factory):
    """(data made with --flame-assets DIR, DIR): a tiny FLAME model of 60 vertices."""
    from dad3dlib.flame import save_flame_assets

    tmp = tmp_path_factory.mktemp("other_flame")
    assets = tiny_flame_assets(n_vertices=60, n_faces=50)
    flame = save_flame_assets(assets.model, assets.topology, tmp / "flame")
    make_data(tmp / "d", {"splits": {"train": 3, "val": 1}, "image_sizes": [[96, 96]], "seed": 1}, flame_assets=flame,
              workers=1)
    return tmp / "d", flame


def test_every_reader_takes_the_flame_dir_the_data_were_made_with(other_flame, tmp_path, monkeypatch):
    from dad3dlib import viz
    from dad3dlib.evaluate import split_dataset
    from dad3dlib.train import make_datasets

    root, flame = other_flame
    monkeypatch.setattr(data, "_cache_root", lambda: tmp_path / "cache")
    assert viz.main_show_data(["--data", str(root), "--out", str(tmp_path / "g.png"), "-n", "2"]) == 0
    assert data.flame_dir(DataSettings(root=str(root))) == flame == \
        data.flame_dir(DataSettings(root=str(root / data.DATASET_DIR)))
    assert data.flame_dir(DataSettings(root=str(root), flame_path="/else")) == type(flame)("/else")
    d = DataSettings(root=str(root), crop_size=64)
    fit = make_datasets(d)["train"].dataset  # no test split: training fits on train without its holdout
    for ds in [split_dataset(d, "train")[0], fit, viz._dataset(d, "train")]:
        assert ds.n_vertices == 60 and len(ds) == 3


def test_data_without_a_flame_dir_take_the_synthetic_head(tmp_path):
    assert data.flame_dir(DataSettings()) == default_flame_dir() == data.flame_dir(DataSettings(root=str(tmp_path)))
    assert (default_flame_dir() / "generic_model.pkl").is_file()


def test_unreadable_make_data_record_is_one_line(other_flame, tmp_path):
    shutil.copytree(other_flame[0], tmp_path / "d")
    (tmp_path / "d/make_data.json").write_text("{")
    with pytest.raises(ValueError, match=r"d/make_data\.json: no readable FLAME directory"):
        data.flame_dir(DataSettings(root=str(tmp_path / "d")))


def test_flame_vertex_count_mismatch_is_one_line(other_flame, tmp_path, capsys, monkeypatch):
    from dad3dlib.flame import save_flame_assets

    root, _ = other_flame
    small = tiny_flame_assets(n_vertices=45, n_faces=40)
    wrong = save_flame_assets(small.model, small.topology, tmp_path / "wrong")
    monkeypatch.setattr(data, "_cache_root", lambda: tmp_path / "cache")
    argv = ["show-data", "--data", str(root), "--out", str(tmp_path / "g.png"), "--flame-assets", str(wrong)]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err
    assert err == (f"error: {root / data.DATASET_DIR}: the data's meshes have 60 vertices but the FLAME model in "
                   f"{wrong} has 45: use the FLAME directory the data were made with (--flame-assets, "
                   "data.flame_path)")
    for kw in ({"skip_bad": True}, {"cache": False}):  # a data-set problem, not one bad item
        with pytest.raises(ValueError, match="the data's meshes have 60 vertices but the FLAME model given has 45"):
            DAD3DHeadsDataset(root, "train", S, small.topology, cache_dir=tmp_path / "c", **kw)


def test_show_head_title_names_the_model(other_flame):
    from dad3dlib.viz import head_title

    _, flame = other_flame
    assert head_title(load_flame_assets(flame)) == f"FLAME-format head model: {flame}"
    assert "synthetic" in head_title(load_flame_assets(default_flame_dir()))


@pytest.mark.parametrize("clip", [False, True])
def test_crops_from_the_decoded_image_cache_are_the_crops_from_the_files(root, assets, clip):
    """The image cache holds each item's region that its crops read: training crops (random margins)
    and evaluation crops from it are the crops cut from the image files, pixel for pixel, at
    several crop sizes; and within one grey level of a warp of the whole image (OpenCV's
    fixed-point map moves with the region's corner), in a small fraction of pixels."""
    from dad3dlib.data import IMAGE_CACHE_VERSION, crop_affine, denormalize_image, read_image, warp_crop

    for size in (32, S, 256):
        for train in (True, False):
            cached = DAD3DHeadsDataset(root, "train", size, assets, train=train, clip_bbox=clip, cache_dir=root / "cache")
            files = DAD3DHeadsDataset(root, "train", size, assets, train=train, clip_bbox=clip, cache=False)
            for i in range(len(cached)):
                for seed in range(3):
                    torch.manual_seed(seed)
                    a = cached[i]
                    torch.manual_seed(seed)
                    b = files[i]
                    assert torch.equal(a["image"], b["image"]), (size, train, i)
                    torch.testing.assert_close(a["vertices_crop"], b["vertices_crop"], rtol=0, atol=0)
    assert list((root / "cache").rglob(f"images_{IMAGE_CACHE_VERSION}_S256_clip{int(clip)}/pixels.npy"))
    # against a warp of the whole image
    ds = DAD3DHeadsDataset(root, "train", 256, assets, clip_bbox=clip, cache_dir=root / "cache")
    changed = total = 0
    for i in range(len(ds)):
        img = read_image(ds.index.images[i])
        A = crop_affine(ds.items[i]["bbox"], (0.1,) * 4, 256, img.shape[1::-1] if clip else None)
        whole = warp_crop(img, A, 256).astype(int)
        diff = np.abs(denormalize_image(ds[i]["image"]).astype(int) - whole)
        assert diff.max() <= 1
        changed, total = changed + (diff.max(-1) > 0).sum(), total + diff.shape[0] * diff.shape[1]
    assert changed / total < 0.01


def test_the_crop_shows_the_rotation_seen_along_the_viewing_ray(root, assets):
    """Generated images are perspective: the weak perspective fits each crop better under the
    rotation seen along the head's viewing ray than under the camera-space GT rotation."""
    from dad3dlib.flame import CANONICAL_Z_OFFSET, fit_weak_perspective, weak_perspective
    from dad3dlib.geometry import apparent_rotation

    b = data.collate(dataset(root, assets).samples(range(6), [None] * 6))

    def residual(R):
        s, t = fit_weak_perspective(b["vertices_model"], R, b["vertices_crop"], S)
        v = b["vertices_model"] + torch.tensor([0.0, 0.0, CANONICAL_Z_OFFSET])
        fit = weak_perspective(v, R, torch.cat([t, t.new_zeros(len(t), 1)], -1), (s - 1)[:, None], S)[..., :2]
        return (fit - b["vertices_crop"]).norm(dim=-1).mean(1)

    off_axis = torch.rad2deg(torch.acos(b["view_ray"][:, 2])) > 3
    assert off_axis.sum() >= 2
    apparent, gt = residual(apparent_rotation(b["rotation"], b["view_ray"])), residual(b["rotation"])
    assert (apparent[off_axis] < gt[off_axis]).all() and apparent.mean() < gt.mean()
