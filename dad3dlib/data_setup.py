"""A run's data set: generated from its recipe (``data.synthetic``) when missing or stale, a real
one checked to be there."""
from __future__ import annotations

from pathlib import Path

from .data import DATASET_DIR
from .errors import InputFileNotFound
from .settings import DataSettings


def ensure_data(params: dict) -> Path:
    """The data root of a run: generated from the preset's recipe (``data.synthetic``) when
    ``make_data.json`` (written last) is missing, older than the FLAME model or records another
    recipe; an error when a real data set is missing."""
    data = DataSettings.parse(params.get("data"))
    root = Path(data.root)
    if data.synthetic:
        from .synthetic_data import make_data, why_make

        why = why_make(root, data.synthetic, data.flame_path)
        if why:
            print(f"{root}: generating the data set ({why})", flush=True)
            make_data(root, data.synthetic, data.flame_path, name=params.get("preset", "custom"))
    elif not (root / DATASET_DIR).is_dir():
        raise InputFileNotFound(f"data directory {root} not found (expected the DAD-3DHeads layout "
                                f"{root / DATASET_DIR}/{{train,val,test}}); set data.root or --data")
    return root
