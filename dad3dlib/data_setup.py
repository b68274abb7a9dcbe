"""A run's data set: generated from its recipe (``data.synthetic``) when missing or stale, a real
one checked to be there."""
from __future__ import annotations

from pathlib import Path

from .config import synthetic_recipe
from .data import DATASET_DIR
from .errors import InputFileNotFound


def ensure_data(params: dict) -> Path:
    """The data root of a run: generated from the preset's recipe (``data.synthetic``) when
    ``make_data.json`` (written last) is missing, older than the FLAME model or records another
    recipe; an error when a real data set is missing."""
    root = Path(params["data"]["root"])
    recipe = synthetic_recipe(params["data"].get("synthetic"))
    if recipe:
        from .synthetic_data import make_data, why_make

        why = why_make(root, recipe, params["data"].get("flame_path"))
        if why:
            print(f"{root}: generating the data set ({why})", flush=True)
            make_data(root, recipe, params["data"].get("flame_path"), name=params.get("preset", "custom"))
    elif not (root / DATASET_DIR).is_dir():
        raise InputFileNotFound(f"data directory {root} not found (expected the DAD-3DHeads layout "
                                f"{root / DATASET_DIR}/{{train,val,test}}); set data.root or --data")
    return root
