"""Params files: presets (how big) × ablations (which loss weights) × seeds, as plain nested dicts.

A run's params = the preset file, overridden by the ablation file, plus ``seed`` and ``ablation``.
Files live in ``params/presets/<name>.yaml`` and ``params/ablations/<name>.yaml``; any other YAML
path works too. Every problem is reported with the file it came from.
"""
from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path

import yaml

from . import OUTPUTS_DIR, REPO_ROOT
from .files import atomic_write

PARAMS_DIR = REPO_ROOT / "params"
LAMBDAS = ("l3d", "l1", "lproj", "awing")  # λ1 L_3D, λ2 L_1, λ3 L_proj, λ4 L_AWing
SECTIONS = {"name", "description", "seed", "ablation", "data", "model", "loss", "optim", "trainer", "eval",
            "study"}


class ParamsError(ValueError):
    """A params file is missing, unreadable or invalid; the message names the file."""


def _read_mapping(path: str | Path) -> dict:
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise ParamsError(f"{path}: cannot read params file ({e.strerror})") from e
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ParamsError(f"{path}: malformed YAML: {e}") from e
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ParamsError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def read_yaml(path: str | Path) -> dict:
    """A preset or ablation file: a mapping of known sections."""
    data = _read_mapping(path)
    unknown = set(data) - SECTIONS
    if unknown:
        raise ParamsError(f"{path}: unknown section(s) {sorted(unknown)}; allowed: {sorted(SECTIONS)}")
    return data


def deep_merge(base: dict, override: dict) -> dict:
    """A new dict: ``override`` on top of ``base``, merging nested dicts."""
    out = copy.deepcopy(base)
    for k, v in override.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


def validate_lambdas(lambdas: dict, source: str) -> dict:
    """λ1..λ4 as floats; refuses unknown names, negative weights and the all-zero configuration."""
    if not isinstance(lambdas, dict):
        raise ParamsError(f"{source}: loss.lambdas must be a mapping of {LAMBDAS}")
    unknown = set(lambdas) - set(LAMBDAS)
    if unknown:
        raise ParamsError(f"{source}: unknown loss weight(s) {sorted(unknown)}; expected {LAMBDAS}")
    out = {}
    for k in LAMBDAS:
        v = lambdas.get(k, 0.0)
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise ParamsError(f"{source}: loss.lambdas.{k} must be a number, got {v!r}")
        if v < 0:
            raise ParamsError(f"{source}: loss.lambdas.{k} = {v} is negative")
        out[k] = float(v)
    if not any(out.values()):
        raise ParamsError(f"{source}: all loss weights are zero; nothing would be trained")
    return out


def _resolve(kind: str, name_or_path: str | Path) -> Path:
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml"):
        return p
    path = PARAMS_DIR / kind / f"{name_or_path}.yaml"
    if not path.exists():
        known = ", ".join(available(kind)) or "none"
        raise ParamsError(f"unknown {kind[:-1]} '{name_or_path}' (no {path}); available: {known}")
    return path


def available(kind: str) -> list[str]:
    """Names of the files in params/<kind>/ ("presets" or "ablations")."""
    return sorted(p.stem for p in (PARAMS_DIR / kind).glob("*.yaml"))


def run_params(preset: str | Path, ablation: str | Path = "baseline", seed: int = 1,
               overrides: dict | None = None) -> dict:
    """The full params of one run: preset ⊕ ablation ⊕ overrides, validated."""
    ppath, apath = _resolve("presets", preset), _resolve("ablations", ablation)
    abl = read_yaml(apath)
    extra = set(abl) - {"name", "description", "loss"}
    if extra:
        raise ParamsError(f"{apath}: an ablation may only set name, description and loss; found {sorted(extra)}")
    params = deep_merge(read_yaml(ppath), {"loss": abl.get("loss", {})})
    params = deep_merge(params, overrides or {})
    params["preset"] = params.pop("name", ppath.stem)
    params["ablation"] = abl.get("name", apath.stem)
    params["ablation_description"] = abl.get("description", "")
    params["seed"] = int(seed)
    data = params.setdefault("data", {})
    if data.get("root") and not Path(data["root"]).is_absolute():  # relative roots live under outputs/
        data["root"] = str(OUTPUTS_DIR / data["root"])
    params.setdefault("loss", {})
    params["loss"]["lambdas"] = validate_lambdas(params["loss"].get("lambdas", {}), f"{ppath} + {apath}")
    return params


def load_params(path: str | Path) -> dict:
    """A complete params file (as written into each run's directory), validated."""
    params = _read_mapping(path)
    params.setdefault("loss", {})
    params["loss"]["lambdas"] = validate_lambdas(params["loss"].get("lambdas", {}), str(path))
    return params


PLACEMENT_KEYS = ("accelerator", "devices", "num_threads")  # trainer keys the study runner sets per run


def training_fingerprint(params: dict) -> str:
    """A short hash of everything that changes what a run trains (not its name, nor where it runs:
    :data:`PLACEMENT_KEYS`). Params count with their defaults filled in (a run's ``params.yaml``
    rewritten by training hashes as the params it was started with). Data under outputs/ counts by
    its path relative to outputs/, so a moved checkout keeps its finished runs."""
    from .train import with_defaults

    params = with_defaults(params)
    params["trainer"] = {k: v for k, v in params["trainer"].items() if k not in PLACEMENT_KEYS}
    keep = {k: v for k, v in params.items() if k not in ("ablation", "ablation_description", "description", "study")}
    root = (keep.get("data") or {}).get("root")
    if root and Path(root).is_absolute() and Path(root).is_relative_to(OUTPUTS_DIR):
        keep["data"] = {**keep["data"], "root": str(Path(root).relative_to(OUTPUTS_DIR))}
    return hashlib.sha1(json.dumps(keep, sort_keys=True, default=str).encode()).hexdigest()[:12]


def save_params(params: dict, path: str | Path) -> None:
    """Write params as YAML atomically."""
    atomic_write(path, yaml.safe_dump(params, sort_keys=False))
