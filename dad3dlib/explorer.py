"""The report's offline explorer: one self-contained HTML fragment, no network, no live kernel.

Pick an ablation and a test sample; see the image with the predicted and ground-truth landmarks,
and the predicted mesh beside the ground truth, the two rotating together (drag, or the yaw
slider). The viewer is ``explorer.js``, inlined: a canvas-2D software renderer (back-face culling,
painter's algorithm, flat Lambert shading), which needs no WebGL.

Everything is embedded once: the shared faces, per sample one JPEG and the ground-truth mesh, per
run and sample the predicted mesh. Meshes are int16 quantised over their bounding box, base64
(:func:`encode_mesh`). Shapes: V vertices, F faces, S the display size of a sample's image.
"""
from __future__ import annotations

import base64
import hashlib
import json
from pathlib import Path

import numpy as np

# ground truth and prediction, here and in the report's figures (dad3dlib.viz)
COLOURS = {"gt_landmarks": "lime", "prediction_landmarks": "red",
           "gt_mesh": (0.55, 0.8, 0.55), "prediction_mesh": (0.72, 0.74, 0.78)}


def encode_mesh(vertices: np.ndarray) -> dict:
    """vertices [V,3] -> {"lo": [3], "step": [3], "q": base64 of int16 [V,3] little-endian}, with
    vertex = lo + (q + 32768) * step (error at most step / 2 per coordinate)."""
    v = np.asarray(vertices, np.float64)
    lo = v.min(0)
    step = np.maximum(v.max(0) - lo, 1e-9) / 65535
    q = (np.rint((v - lo) / step) - 32768).astype("<i2")
    return {"lo": lo.tolist(), "step": step.tolist(), "q": _b64(q)}


def _b64(array: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(array).tobytes()).decode()


def decode_mesh(mesh: dict) -> np.ndarray:
    """:func:`encode_mesh`'s dict -> vertices [V,3] float64."""
    q = np.frombuffer(base64.b64decode(mesh["q"]), "<i2").reshape(-1, 3)
    return np.asarray(mesh["lo"]) + (q.astype(np.float64) + 32768) * np.asarray(mesh["step"])


def submesh(faces: np.ndarray, vertex_ids: np.ndarray, n_vertices: int) -> tuple[np.ndarray, np.ndarray]:
    """The faces [F,3] of a mesh of ``n_vertices`` vertices (its topology's ``n_vertices``) whose
    three vertices are all in ``vertex_ids``, re-indexed: -> (faces [F',3] into ``keep``, keep [V']
    the vertex ids they use, ascending)."""
    inside = np.zeros(n_vertices, bool)
    inside[np.asarray(vertex_ids)] = True
    sub = faces[inside[faces].all(1)]
    keep, remapped = np.unique(sub, return_inverse=True)
    return remapped.reshape(-1, 3), keep


def jpeg_data_uri(image: np.ndarray, quality: int = 85) -> str:
    """image [H,W,3] uint8 RGB -> 'data:image/jpeg;base64,...'."""
    import cv2

    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(image, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise RuntimeError("JPEG encoding failed")
    return "data:image/jpeg;base64," + base64.b64encode(buf.tobytes()).decode()


def explorer_html(faces: np.ndarray, samples: list[dict], predictions: dict[str, list], runs: dict[str, str],
                  view: int = 256) -> str:
    """The explorer as one HTML fragment (its <style>, data and <script> inside; no URL).

    faces [F,3] shared by every mesh; samples: per test sample {"item_id", "image" [S,S,3] uint8,
    "landmarks" [68,2] and "vertices" [V,3] of the ground truth}, in the image's display frame
    (pixels, x right, y down, z away from the viewer); predictions: run -> per sample None or
    {"landmarks" [68,2], "vertices" [V,3], "caption" str}, same frame; runs: ablation name -> its
    run (several names may share one); view: the panels' size in pixels.
    """
    sizes = {s["image"].shape[0] for s in samples} | {s["image"].shape[1] for s in samples}
    if len(sizes) != 1:
        raise ValueError(f"explorer: sample images must be square and of one size, got {sorted(sizes)}")
    wide = int(np.max(faces)) >= 2 ** 16
    points = lambda a: np.round(np.asarray(a, np.float64), 1).tolist()  # noqa: E731
    data = {
        "size": sizes.pop(), "colours": COLOURS, "ablations": list(runs), "runs": runs,
        "faces": {"dtype": "uint32" if wide else "uint16", "data": _b64(np.asarray(faces, "<u4" if wide else "<u2"))},
        "samples": [{"item_id": str(s["item_id"]), "image": jpeg_data_uri(s["image"]),
                     "landmarks": points(s["landmarks"]), "mesh": encode_mesh(s["vertices"])} for s in samples],
        "predictions": {run: [None if p is None else {"landmarks": points(p["landmarks"]), "caption": p["caption"],
                                                      "mesh": encode_mesh(p["vertices"])} for p in preds]
                        for run, preds in predictions.items()},
    }
    payload = json.dumps(data, separators=(",", ":")).replace("<", "\\u003c")  # nothing closes the <script>
    uid = "dad3d-explorer-" + hashlib.sha1(payload.encode()).hexdigest()[:10]
    script = (Path(__file__).with_name("explorer.js")).read_text()
    panel = f'width="{view}" height="{view}"'
    return f"""<div class="dad3d-explorer" id="{uid}">
<style>
#{uid} .x-views {{display: flex; gap: 8px; flex-wrap: wrap; margin: 6px 0}}
#{uid} figure {{margin: 0}} #{uid} figcaption {{font-size: 12px; text-align: center}}
#{uid} canvas.x-3d {{cursor: grab; touch-action: none}} #{uid} label {{margin-right: 14px}}
</style>
<div><label>ablation <select class="x-ablation"></select></label>
<label>sample <select class="x-sample"></select></label>
<label>yaw <input class="x-yaw" type="range" min="-180" max="180" step="1" value="0">
<span class="x-yaw-value"></span></label></div>
<div class="x-views">
<figure><canvas class="x-image" {panel}></canvas><figcaption>image: landmarks
<span style="color:{COLOURS['gt_landmarks']}">&#9679;</span> ground truth,
<span style="color:{COLOURS['prediction_landmarks']}">&#9679;</span> prediction</figcaption></figure>
<figure><canvas class="x-3d x-prediction" {panel}></canvas><figcaption>prediction (drag to rotate)</figcaption></figure>
<figure><canvas class="x-3d x-gt" {panel}></canvas><figcaption>ground truth</figcaption></figure>
</div>
<div class="x-caption" style="font-size: 12px"></div>
<script type="application/json" class="x-data">{payload}</script>
<script>
{script}
dad3dExplorer(document.getElementById("{uid}"));
</script>
</div>"""
