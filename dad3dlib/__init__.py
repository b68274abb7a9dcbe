"""dad3dlib: a loss-ablation study of DAD-3DNet (FLAME head reconstruction from one image)."""
from __future__ import annotations

import os
from pathlib import Path

__version__ = "0.1.0"

REPO_ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = REPO_ROOT / "notebooks"  # the study's notebooks: ablation.ipynb (a run), aggregate.ipynb (the report)
OUTPUTS_DIR = Path(os.environ.get("DAD3D_OUTPUTS", REPO_ROOT / "outputs"))
