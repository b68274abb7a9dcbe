"""Training on several processes from an interactive session.

Lightning's ``ddp`` strategies start a run's other processes by running the command again, which a
Jupyter kernel (the study's notebook) or a REPL cannot be: there :func:`dad3dlib.train.train` runs
``python -m dad3dlib train`` as a child process (:func:`train_in_child`) and waits for it. Nothing
here imports Lightning.
"""
from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from collections import deque
from pathlib import Path

from .config import TRAINING_RECORD, save_params
from .settings import TrainerSettings


def trains_in_child(t: TrainerSettings) -> bool:
    """Whether a run of the trainer section ``t`` trains in a child process (:func:`train_in_child`):
    its strategy starts the other processes by running the command again (Lightning's ``ddp``
    family, not its spawn, fork or notebook variants), and this is an interactive session (a
    Jupyter kernel, a REPL), which Lightning cannot run again."""
    s = str(t.strategy)
    relaunches = s.startswith("ddp") and not any(w in s for w in ("spawn", "fork", "notebook"))
    return relaunches and (hasattr(sys, "ps1") or bool(sys.flags.interactive))


def train_in_child(params: dict, out_dir: Path) -> Path:
    """:func:`dad3dlib.train.train` as ``python -m dad3dlib train`` in a child process, whose output is passed on,
    and the checkpoint to evaluate from its training.json. Ctrl-C (which reaches the child too: it
    is in this process group) lets the child stop, with its checkpoints, before raising."""
    tail: deque[str] = deque(maxlen=20)
    with tempfile.TemporaryDirectory() as tmp:
        save_params(params, Path(tmp) / "params.yaml")
        cmd = [sys.executable, "-m", "dad3dlib", "train", "--params", str(Path(tmp) / "params.yaml"),
               "--out", str(out_dir)]
        with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as proc:
            try:
                for line in proc.stdout:
                    print(line, end="", flush=True)
                    tail.append(line)
                proc.wait()
            except KeyboardInterrupt:
                try:
                    proc.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    proc.kill()
                raise
    if proc.returncode:
        raise RuntimeError(f"training in a child process (python -m dad3dlib train --out {out_dir}) failed with exit "
                           f"status {proc.returncode}; its last lines:\n{''.join(tail)}")
    return out_dir / json.loads((out_dir / TRAINING_RECORD).read_text())["checkpoint"]["file"]
