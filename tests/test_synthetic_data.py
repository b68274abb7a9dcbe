"""The synthetic DAD-3DHeads generator: layout, schema, exactness of the annotations, determinism,
and a data set that is never lost or half-written."""
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from dad3dlib import REPO_ROOT
from dad3dlib import synthetic_data as sd
from dad3dlib.flame import MODEL_FILE, FlameFormatError, landmarks_from_vertices, load_flame_assets
from dad3dlib.geometry import project
from dad3dlib.render import silhouette
from dad3dlib.settings import SYNTHETIC_SAMPLING, synthetic_recipe
from dad3dlib.synthetic_head import default_flame_dir

# no shoulders: the renderer's mask is then the head's whole coverage, comparable to its silhouette
TINY = {"splits": {"train": 5, "val": 2, "test": 2}, "image_sizes": [[160, 160], [176, 144]],
        "sampling": {"occluder_prob": 0.5, "torso_prob": 0.0}}
ATTRIBUTES = {"quality": {"hq", "lq"}, "gender": {"undefined"}, "expression": {"true", "false"},
              "age": {"undefined"}, "occlusions": {"true", "false"}, "pose": {"front", "sided", "atypical"},
              "standard light": {"true", "false"}}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, assets):
    out = tmp_path_factory.mktemp("tiny")
    sd.make_data(out, {**TINY, "seed": 3}, workers=1)
    return out


def test_layout_and_schema(tiny, assets):
    ds = tiny / "DAD-3DHeadsDataset"
    n_vert = len(assets.model.v_template)
    for split, n in TINY["splits"].items():
        entries = json.loads((ds / split / f"{split}.json").read_text())
        assert len(entries) == n
        for e in entries:
            assert set(e) == {"item_id", "annotation_path", "img_path", "bbox", "attributes"}
            assert e["img_path"] == f"DAD-3DHeadsDataset/{split}/images/{e['item_id']}.png"
            assert e["annotation_path"] == f"DAD-3DHeadsDataset/{split}/annotations/{e['item_id']}.json"
            assert {k: v in ATTRIBUTES[k] for k, v in e["attributes"].items()} == {k: True for k in ATTRIBUTES}
            w, h = Image.open(tiny / e["img_path"]).size
            assert [w, h] in TINY["image_sizes"]
            x, y, bw, bh = e["bbox"]
            assert 0 <= x and 0 <= y and x + bw <= w and y + bh <= h and bw > 0.2 * h and bh > 0.2 * h
            ann = json.loads((tiny / e["annotation_path"]).read_text())
            assert set(ann) == {"vertices", "model_view_matrix", "projection_matrix"}
            assert np.array(ann["vertices"]).shape == (n_vert, 3)
            assert np.array(ann["model_view_matrix"]).shape == (4, 4) == np.array(ann["projection_matrix"]).shape
    assert not list(ds.rglob("*.tmp"))
    assert json.loads((tiny / "make_data.json").read_text())["seed"] == 3


def test_item_scene_draws_again_the_parameters_behind_each_annotation(tiny, assets):
    from dad3dlib.flame import FlameLayer

    layer = FlameLayer(assets).eval()
    recipe = synthetic_recipe({**TINY, "seed": 3})
    for split in ("train", "test"):
        for e in json.loads((tiny / "DAD-3DHeadsDataset" / split / f"{split}.json").read_text()):
            scene = sd.item_scene(recipe, e["item_id"])
            ann = np.array(json.loads((tiny / e["annotation_path"]).read_text())["vertices"])
            t = lambda a: torch.tensor(a[None], dtype=torch.float32)  # noqa: E731
            with torch.no_grad():
                v = layer.vertices(t(scene.shape), t(scene.expression), t(scene.jaw))[0].double().numpy()
            assert np.abs(v - ann).max() < 1e-5  # the annotation's rounding
            assert list(scene.size) in TINY["image_sizes"]
    other = sd.item_scene({**recipe, "seed": 4}, e["item_id"])
    assert not np.allclose(other.shape, scene.shape)


def test_projection_lands_on_the_rendered_head(tiny, assets):
    """The projection formula applied to the written annotation reproduces the rendered silhouette, and
    the landmarks agree with the GL pipeline's own projection."""
    gen = sd.Generator(default_flame_dir(), synthetic_recipe({**TINY, "seed": 3}))
    topo = assets.topology
    for item in gen.chunk("train", 0, TINY["splits"]["train"]):
        ann = json.loads((tiny / item.entry["annotation_path"]).read_text())
        v, mv, P = (np.array(ann[k]) for k in ("vertices", "model_view_matrix", "projection_matrix"))
        disk = np.asarray(Image.open(tiny / item.entry["img_path"]).convert("RGB"))
        np.testing.assert_array_equal(disk, item.image)  # deterministic per seed
        h, w = disk.shape[:2]
        sil = silhouette(project(v, mv, P, h), assets.model.faces, h, w)
        assert (sil & item.mask).sum() / (sil | item.mask).sum() >= 0.98
        lmk = landmarks_from_vertices(torch.from_numpy(v[None]), torch.from_numpy(topo.faces),
                                      torch.from_numpy(topo.lmk_face_idx), torch.from_numpy(topo.lmk_bary))[0].numpy()
        gl = gen.renderer((w, h)).project_gl(lmk, mv, P)
        assert np.abs(project(lmk, mv, P, h) - gl).max() < 0.5
        # the bbox is the projected head subset's
        head = project(v[topo.subsets["head"]], mv, P, h)
        x, y, bw, bh = item.entry["bbox"]
        assert abs(x - max(head[:, 0].min(), 0)) <= 1 and abs(y + bh - min(head[:, 1].max(), h)) <= 1


def test_seed_changes_output_and_workers_and_split_size_do_not(tmp_path, tiny, monkeypatch):
    small = {**TINY, "splits": {"train": 2}}
    monkeypatch.setattr(sd, "CHUNK", 1)  # two jobs: both worker processes get one
    sd.make_data(tmp_path / "a", {**small, "seed": 3}, workers=2)
    assert json.loads((tmp_path / "a/make_data.json").read_text())["workers"] == 2
    sd.make_data(tmp_path / "b", {**small, "seed": 4}, workers=1)
    for name in ("train_000000.png", "train_000001.png"):
        ref = (tiny / "DAD-3DHeadsDataset/train/images" / name).read_bytes()
        assert (tmp_path / "a/DAD-3DHeadsDataset/train/images" / name).read_bytes() == ref
        assert (tmp_path / "b/DAD-3DHeadsDataset/train/images" / name).read_bytes() != ref


def _tree(root) -> dict:
    """{relative path: bytes} of every file under root (hidden ones included)."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _bad_flame_dir(tmp_path, kind: str):
    """The synthetic head with a generic_model.pkl that is refused (it would run code) or truncated."""
    bad = tmp_path / f"flame_{kind}"
    shutil.copytree(default_flame_dir(), bad)
    model = bad / MODEL_FILE
    model.write_bytes(pickle.dumps(os.system) if kind == "refused" else model.read_bytes()[:1000])
    return bad


def test_interrupted_run_keeps_the_previous_data_set(tmp_path, monkeypatch):
    small = {**TINY, "splits": {"train": 3}}
    sd.make_data(tmp_path, small, workers=1)
    before = _tree(tmp_path)
    calls = []

    def failing_write(root, split, item):
        calls.append(item.item_id)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_write(root, split, item)

    real_write = sd.write_item
    monkeypatch.setattr(sd, "write_item", failing_write)
    with pytest.raises(KeyboardInterrupt):
        sd.make_data(tmp_path, {**small, "seed": 1}, workers=1)
    assert _tree(tmp_path) == before  # files, split file and make_data.json; nothing left behind
    monkeypatch.setattr(sd, "write_item", real_write)
    sd.make_data(tmp_path, {**small, "seed": 1}, workers=1)  # a complete run replaces the data set
    after = _tree(tmp_path)
    assert set(after) == set(before) and json.loads(after["make_data.json"])["seed"] == 1
    assert after["DAD-3DHeadsDataset/train/images/train_000000.png"] != before[
        "DAD-3DHeadsDataset/train/images/train_000000.png"]


def test_failed_make_data_leaves_the_existing_data_set_as_it_was(tmp_path):
    small = {**TINY, "splits": {"train": 2, "val": 1}}
    sd.make_data(tmp_path / "d", small, workers=1)
    before = _tree(tmp_path / "d")
    with pytest.raises(FlameFormatError, match=f"{_bad_flame_dir(tmp_path, 'refused') / MODEL_FILE}: refused"):
        sd.make_data(tmp_path / "d", small, flame_assets=tmp_path / "flame_refused", workers=1)
    assert _tree(tmp_path / "d") == before


def _run_bounded(cmd: list, timeout: float = 60) -> subprocess.CompletedProcess:
    """Run a command; fail the test when it has not ended after ``timeout`` s, killing its whole
    process group (worker processes included)."""
    proc = subprocess.Popen(cmd, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail(f"{cmd[1:3]} still running after {timeout} s")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


@pytest.mark.parametrize("kind", ["refused", "truncated"])
def test_make_data_with_bad_flame_assets_ends_at_once_naming_the_file(tmp_path, kind):
    """With the default worker count (a process pool), not a pool respawning failing workers forever."""
    bad = _bad_flame_dir(tmp_path, kind)
    res = _run_bounded([sys.executable, "-m", "dad3dlib", "make-data", "--out", str(tmp_path / "d"),
                        "--flame-assets", str(bad)])
    assert res.returncode == 2, res.stderr
    lines = res.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {bad / MODEL_FILE}: ")


def test_a_failing_worker_ends_make_data_with_its_error(tmp_path):
    """Workers that cannot start (here: the parent's check of the assets is skipped) stop the run."""
    bad, out = _bad_flame_dir(tmp_path, "truncated"), tmp_path / "d"
    script = f"""
import dad3dlib.flame
from dad3dlib import synthetic_data as sd
dad3dlib.flame.load_flame_assets = lambda *args, **kwargs: None  # in this process only
sd.CHUNK = 1
sd.make_data({str(out)!r}, {{"splits": {{"train": 2}}, "image_sizes": [[64, 64]]}}, {str(bad)!r}, workers=2)
"""
    res = _run_bounded([sys.executable, "-c", script])
    assert res.returncode == 1
    assert f"FlameFormatError: {bad / MODEL_FILE}: " in res.stderr
    assert [p.name for p in out.iterdir()] == []  # the temporary folder is gone


def test_pose_sampling_concentrated_towards_frontal():
    rng = np.random.default_rng(0)
    scenes = [sd.sample_scene(rng, SYNTHETIC_SAMPLING, [[64, 64]]) for _ in range(2000)]
    yaw, pitch, roll = np.abs(np.array([s.angles for s in scenes])).T
    assert yaw.max() <= 90 and pitch.max() <= 45 and roll.max() <= 35
    assert yaw.max() > 80 and pitch.max() > 40 and roll.max() > 30
    assert np.median(yaw) < 25 and np.median(pitch) < 12
    attrs = [sd.pose_attribute(*s.angles) for s in scenes]
    assert 0.4 < attrs.count("front") / len(attrs) < 0.9 and attrs.count("atypical") > 0


def test_rotation_and_pose_attribute():
    R = sd.rotation_matrix(40.0, -10.0, 5.0)
    np.testing.assert_allclose(R @ R.T, np.eye(3), atol=1e-12)
    assert np.linalg.det(R) == pytest.approx(1.0)
    # positive yaw turns the face (+z) towards +x (the image's right)
    assert sd.rotation_matrix(30.0, 0.0, 0.0)[0, 2] == pytest.approx(np.sin(np.radians(30.0)))
    assert sd.pose_attribute(10, 5, 3) == "front"
    assert sd.pose_attribute(50, 5, 3) == "sided"
    assert sd.pose_attribute(10, 40, 3) == "atypical"


@pytest.mark.parametrize("name", sorted(sd.BACKGROUNDS))
def test_backgrounds_are_textured(name):
    rng = np.random.default_rng(1)
    img = sd.BACKGROUNDS[name](rng, 96, 128)
    assert img.shape == (96, 128, 3)
    # not flat: the image varies at more than one place (row and column spread)
    assert np.ptp(img.mean(axis=(1, 2))) + np.ptp(img.mean(axis=(0, 2))) > 5


@pytest.mark.parametrize("recipe, match", [
    ({"splits": {"train": 2}}, r"image_sizes must be a list"),
    ({"splits": {"train": 0}, "image_sizes": [[64, 64]]}, r"splits must map train, val, test to image counts >= 1"),
    ({"splits": {"holdout": 2}, "image_sizes": [[64, 64]]}, r"splits must map train, val, test"),
    ({"splits": {"train": 2}, "image_sizes": [[64, 64]], "sampling": {"yaw_mx": 60.0}}, r"unknown key\(s\) \['yaw_mx'\]"),
    ({"splits": {"train": 2}, "image_sizes": [[64, 64]], "sampling": {"degrade": {"fog": 0.1}}}, r"\['degrade.fog'\]"),
    ({"splits": {"train": 2}, "image_sizes": [[64, 64]], "size": 3}, r"must be a mapping of splits, image_sizes"),
])
def test_a_bad_recipe_is_refused_before_anything_is_written(tmp_path, recipe, match):
    with pytest.raises(ValueError, match=match):
        sd.make_data(tmp_path / "d", recipe)
    assert not (tmp_path / "d").exists()


def test_sampling_overrides_change_only_what_they_name():
    """A recipe's sampling is the defaults with its keys replaced (nested degradations too); the draws
    follow the degradations' fixed order, however a recipe lists them."""
    r = synthetic_recipe({"splits": {"train": 1}, "image_sizes": [[64, 64]],
                          "sampling": {"yaw_max": 60.0, "degrade": {"jpeg": 0.5}}})
    assert r["seed"] == 0 and r["sampling"]["yaw_max"] == 60.0 and r["sampling"]["pitch_max"] == 45.0
    assert r["sampling"]["degrade"] == {**SYNTHETIC_SAMPLING["degrade"], "jpeg": 0.5}
    assert list(sd.DEGRADATIONS) == list(SYNTHETIC_SAMPLING["degrade"])
