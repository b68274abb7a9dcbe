"""A study's scores of the reference predictors (:data:`dad3dlib.evaluate.REFERENCES`), measured once
on its evaluation split in ``DIR/references/``."""
from __future__ import annotations

import json
from pathlib import Path

from .config import DEFAULT_SHAPE_PROTOCOL, shape_protocol, training_fingerprint
from .files import write_json


REFERENCES_DIR = "references"


def ensure_references(params: dict, study_dir: Path) -> Path:
    """The reference predictors (evaluate.REFERENCES) scored on the study's evaluation split
    (:func:`dad3dlib.data.split_protocol`) with its shape protocol, in ``study_dir/references/``;
    skipped when already measured on the same data, split, crop, prior and protocol."""
    from .data import split_protocol
    from .evaluate import evaluate_references

    out = study_dir / REFERENCES_DIR
    split = split_protocol(params["data"])["evaluate"]
    protocol = shape_protocol(params)  # counted when not the default, so earlier studies keep their references
    key = {"data": training_fingerprint({"data": params["data"]}), "split": split, "pose_prior_samples":
           (params.get("model") or {}).get("pose_prior_samples"),
           **({"shape_protocol": protocol} if protocol != DEFAULT_SHAPE_PROTOCOL else {})}
    try:
        if json.loads((out / "references.json").read_text()).get("key") == key:
            return out
    except (OSError, ValueError):
        pass
    evaluate_references({**params, "trainer": {**(params.get("trainer") or {}), "num_threads": None}}, out, split,
                        progress=False)  # beside the runs: the study's own bar is the progress
    record = json.loads((out / "references.json").read_text())
    write_json(out / "references.json", {**record, "key": key})
    return out
