"""The report's offline explorer fragment: well-formed, self-contained, and its embedded data decode
back to the input (the viewer itself is tested in headless Chromium in test_study.py)."""
import base64
import json
import re
from html.parser import HTMLParser

import numpy as np
import pytest

from dad3dlib import explorer

VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}


class Parser(HTMLParser):
    """Checks that every element is closed in order; collects the explorer's JSON data."""

    def __init__(self):
        super().__init__()
        self.stack, self.errors, self.data, self.scripts = [], [], None, []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "script":
            self.scripts.append(attrs)
        if tag not in VOID:
            self.stack.append((tag, attrs))

    def handle_endtag(self, tag):
        if not self.stack or self.stack[-1][0] != tag:
            self.errors.append(f"</{tag}> closes {self.stack[-1][0] if self.stack else 'nothing'}")
            return
        self.stack.pop()

    def handle_data(self, text):
        if self.stack and self.stack[-1][0] == "script" and self.stack[-1][1].get("class") == "x-data":
            self.data = json.loads(text)


def _mesh(rng, n=50):
    return rng.normal(size=(n, 3)) * [40.0, 50.0, 30.0] + 96


def _build(rng, n_samples=3):
    faces = rng.integers(0, 50, size=(80, 3))
    samples = [{"item_id": f"test_{i:06d}", "image": rng.integers(0, 255, (32, 32, 3), dtype=np.uint8),
                "landmarks": rng.uniform(0, 192, (68, 2)), "vertices": _mesh(rng)} for i in range(n_samples)]
    predictions = {"baseline_s1": [{"landmarks": rng.uniform(0, 192, (68, 2)), "vertices": _mesh(rng),
                                    "caption": "NME 3.1 </script><b>"} for _ in range(n_samples)],
                   "no_l3d_s1": [None] + [{"landmarks": rng.uniform(0, 192, (68, 2)), "vertices": _mesh(rng),
                                           "caption": "x"} for _ in range(n_samples - 1)]}
    runs = {"baseline": "baseline_s1", "l3d50_proj0.05": "baseline_s1", "no_l3d": "no_l3d_s1"}
    return faces, samples, predictions, runs


def test_fragment_is_well_formed_self_contained_and_decodes_to_its_input():
    rng = np.random.default_rng(0)
    faces, samples, predictions, runs = _build(rng)
    fragment = explorer.explorer_html(faces, samples, predictions, runs)
    p = Parser()
    p.feed(fragment)
    p.close()
    assert not p.errors and not p.stack, (p.errors, p.stack)
    assert not re.search(r"https?://", fragment), "the fragment names a URL"
    assert all("src" not in attrs for attrs in p.scripts) and len(p.scripts) == 2
    d = p.data
    assert d["ablations"] == list(runs) and d["runs"] == runs and d["size"] == 32
    assert sorted(d["predictions"]) == ["baseline_s1", "no_l3d_s1"]  # a run shared by two names once
    dtype = np.dtype(d["faces"]["dtype"]).newbyteorder("<")
    np.testing.assert_array_equal(np.frombuffer(base64.b64decode(d["faces"]["data"]), dtype),
                                  faces.ravel())
    for s, e in zip(samples, d["samples"]):
        assert e["item_id"] == s["item_id"] and e["image"].startswith("data:image/jpeg;base64,")
        step = np.asarray(e["mesh"]["step"])
        assert (np.abs(explorer.decode_mesh(e["mesh"]) - s["vertices"]) <= step / 2 + 1e-9).all()
        assert step.max() < 1e-3 * np.ptp(s["vertices"], 0).max()
        np.testing.assert_allclose(e["landmarks"], s["landmarks"], atol=0.05 + 1e-9)
    for run, preds in predictions.items():
        for p_in, p_out in zip(preds, d["predictions"][run]):
            if p_in is None:
                assert p_out is None
                continue
            assert p_out["caption"] == p_in["caption"]  # a caption cannot close the data's <script>
            np.testing.assert_allclose(explorer.decode_mesh(p_out["mesh"]), p_in["vertices"],
                                       atol=np.max(p_out["mesh"]["step"]))


def test_encode_mesh_of_a_flat_mesh():
    v = np.zeros((4, 3))
    v[:, 0] = [0, 1, 2, 3]
    np.testing.assert_allclose(explorer.decode_mesh(explorer.encode_mesh(v)), v, atol=1e-4)


def test_submesh_keeps_the_faces_inside_the_subset_reindexed():
    faces = np.array([[0, 1, 2], [2, 3, 4], [4, 5, 6], [1, 2, 5]])
    sub, keep = explorer.submesh(faces, np.array([1, 2, 5, 6, 4]), 8)
    np.testing.assert_array_equal(keep, [1, 2, 4, 5, 6])
    np.testing.assert_array_equal(keep[sub], faces[[2, 3]])


def test_samples_of_different_sizes_are_refused():
    rng = np.random.default_rng(1)
    faces, samples, predictions, runs = _build(rng, 2)
    samples[1]["image"] = samples[1]["image"][:, :16]
    with pytest.raises(ValueError, match="square and of one size"):
        explorer.explorer_html(faces, samples, predictions, runs)


def test_faces_beyond_uint16_are_embedded_as_uint32():
    rng = np.random.default_rng(2)
    _, samples, predictions, runs = _build(rng, 1)
    faces = np.array([[0, 1, 70_000], [2, 3, 4]])
    p = Parser()
    p.feed(explorer.explorer_html(faces, samples, predictions, runs))
    assert p.data["faces"]["dtype"] == "uint32"
    np.testing.assert_array_equal(np.frombuffer(base64.b64decode(p.data["faces"]["data"]), "<u4"), faces.ravel())


def test_report_explorer_of_a_study_without_finished_runs_says_so(tmp_path):
    from dad3dlib import viz

    (tmp_path / "study.json").write_text(json.dumps(
        {"runs": [{"run": "baseline_s1", "ablation": "baseline", "aliases": [], "seed": 1}]}))
    assert viz.explorer(tmp_path) == ("<p>No finished run yet: the explorer shows predictions once a run has "
                                      "finished.</p>")
