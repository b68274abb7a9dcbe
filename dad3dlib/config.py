"""Params files: presets (how big) × ablations (which loss weights) × seeds, as plain nested dicts.

A run's params = the preset file, overridden by the ablation file, plus ``seed`` and ``ablation``.
Files live in ``params/presets/<name>.yaml`` and ``params/ablations/<name>.yaml``; any other YAML
path works too. Every problem is reported with the file it came from. The settings' defaults and
checks are :mod:`dad3dlib.settings`' (``Settings.parse``); here: reading, merging, the training
fingerprint and the evaluated checkpoint.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import fields
from pathlib import Path

import yaml

from . import OUTPUTS_DIR, REPO_ROOT, stats
from .errors import ParamsError
from .files import atomic_write, read_bytes
from .settings import CHECKPOINT_POLICY, SECTIONS as SETTINGS_SECTIONS, Settings, deep_merge

PARAMS_DIR = REPO_ROOT / "params"


SECTIONS = {"name", "description", "seed", "ablation", "data", "model", "loss", "optim", "trainer", "study",
            "launcher", "hypothesis"}
RUN_SECTIONS = SECTIONS - {"name"} | {"preset", "ablation_description"}  # a run's complete params.yaml
ABLATION_KEYS = ("name", "description", "hypothesis", "loss")  # what an ablation file may set


# --------------------------------------------------------------------------------------------
# What counts in a run's training fingerprint
# --------------------------------------------------------------------------------------------
# Keys added after studies had run, whose defaults reproduce what ran before them: they count in a
# run's training fingerprint only when set otherwise, so that finished runs stay finished.
LATER_KEYS = {"model": ("bifpn_levels", "bifpn_depthwise_kernel", "bifpn_act", "bifpn_bn_momentum", "bifpn_bn_eps",
                        "bifpn_downsample", "bifpn_lateral", "bifpn_top_inputs"),
              "data": ("clip_bbox", "holdout_fraction"), "trainer": ("min_epochs", "compile")}
# The recipes of the smoke, cpu and paper presets, when they were named in code and left out of the
# fingerprint (recipe_digest): a run made from one of them counts as it did then, so that studies
# begun before recipes were params keep their finished runs. Any other recipe counts in full.
FORMER_RECIPES = {"131ef80b897a", "0cabc1a91db3", "015142394e4e"}


def recipe_digest(recipe: dict) -> str:
    """A short hash of a complete recipe (:func:`synthetic_recipe`)."""
    return hashlib.sha1(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:12]


TRAINING_RECORD = "training.json"  # precision used, processes, the checkpoint to evaluate (step, why), the splits


def evaluation_checkpoint(schedule: str, out_dir: Path) -> tuple[Path, str]:
    """The checkpoint a run is evaluated on, by its ``optim.schedule`` (:data:`CHECKPOINT_POLICY`), and
    why; ``last.ckpt`` when the policy's file does not exist (no validation ran)."""
    name, why = CHECKPOINT_POLICY[schedule]
    path = out_dir / "checkpoints" / name
    if not path.exists():
        path, why = out_dir / "checkpoints" / "last.ckpt", f"{why}; no {name} was written, so the last step"
    return path, why


def _read_mapping(path: str | Path) -> dict:
    path = Path(path)
    text = read_bytes(path, ParamsError, "params file")
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
    _refuse_unknown_sections(data, str(path), SECTIONS)
    return data


def _refuse_unknown_sections(params: dict, source: str, sections: set) -> None:
    unknown = set(params) - sections
    if unknown:
        raise ParamsError(f"{source}: unknown section(s) {sorted(unknown)}; allowed: {sorted(sections)}")


def validate_params(params: dict, source: str) -> dict:
    """A run's params with its loss weights as floats and its ablation's primary hypothesis checked
    (:func:`hypothesis`); refuses unknown sections and any value :meth:`Settings.parse` refuses, naming
    ``source`` (the file(s) they came from)."""
    _refuse_unknown_sections(params, source, RUN_SECTIONS)
    if params.get("launcher") is not None and not isinstance(params["launcher"], dict):  # the typed sections: parse
        raise ParamsError(f"{source}: 'launcher' must be a mapping, got {params['launcher']!r}")
    if isinstance(params.get("study"), dict) and set(params["study"]) & {"make_data", "data_seed"}:
        raise ParamsError(f"{source}: study.make_data and study.data_seed are now data.synthetic, the generated data "
                          "set's recipe (splits, image_sizes, seed, sampling; see params/presets/cpu.yaml)")
    settings = Settings.parse(params, source)
    if "hypothesis" in params:
        params["hypothesis"] = hypothesis(params["hypothesis"], source)
    params["loss"] = {**(params.get("loss") or {}), "lambdas": settings.loss.lambdas}
    return params


# --------------------------------------------------------------------------------------------
# An ablation's primary hypothesis: what it is expected to change, stated before the study runs
# --------------------------------------------------------------------------------------------
DIRECTIONS = (stats.WORSE, stats.BETTER)  # than the baseline, in each metric's own sense (lower_is_better)


def hypothesis(given, source: str) -> dict[str, str]:
    """An ablation's primary hypothesis as {metric: expected direction}: ``given`` maps registered
    study metrics (:func:`dad3dlib.metrics.metric_names`) to "worse" or "better" than the baseline;
    None or {} is no hypothesis (every comparison of that ablation is exploratory). It counts in no
    training fingerprint. Raises ParamsError naming ``source`` and the bad entry."""
    from .metrics import metric_names

    if given is None:
        return {}
    known = metric_names("study")
    if not isinstance(given, dict):
        raise ParamsError(f"{source}: hypothesis must map metrics to an expected direction "
                          f"({' or '.join(DIRECTIONS)}), e.g. {{mean_mm: worse}}; got {given!r}")
    for metric, direction in given.items():
        if metric not in known:
            raise ParamsError(f"{source}: hypothesis: unknown metric {metric!r}; known: {', '.join(known)}")
        if direction not in DIRECTIONS:
            raise ParamsError(f"{source}: hypothesis.{metric} must be {' or '.join(DIRECTIONS)}, got {direction!r}")
    return dict(given)


def stated_hypothesis(ablation: str | Path) -> dict[str, str]:
    """The primary hypothesis an ablation file states (a name in params/ablations/ or a path), as
    :func:`hypothesis` validates it."""
    path = resolve("ablations", ablation)
    return hypothesis(read_yaml(path).get("hypothesis"), str(path))


def resolve(kind: str, name_or_path: str | Path) -> Path:
    """The file of a preset or ablation (``kind`` "presets" or "ablations"): a .yaml path as given,
    else the name's file in params/<kind>/ (unknown names are refused, listing the known ones)."""
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
    ppath, apath = resolve("presets", preset), resolve("ablations", ablation)
    abl = read_yaml(apath)
    extra = set(abl) - set(ABLATION_KEYS)
    if extra:
        raise ParamsError(f"{apath}: an ablation may only set {', '.join(ABLATION_KEYS)}; found {sorted(extra)}")
    params = read_yaml(ppath)
    if "hypothesis" in params:
        raise ParamsError(f"{ppath}: hypothesis belongs in an ablation file (params/ablations/), not in a preset")
    params = deep_merge(params, {"loss": abl.get("loss", {})})
    params = deep_merge(params, overrides or {})
    params["preset"] = params.pop("name", ppath.stem)
    params["ablation"] = abl.get("name", apath.stem)
    params["ablation_description"] = abl.get("description", "")
    params["hypothesis"] = hypothesis(abl.get("hypothesis"), str(apath))  # a bad one names the ablation file
    params["seed"] = int(seed)
    data = params.setdefault("data", {})
    if data.get("root"):
        data["root"] = str(data_root(data["root"]))
    return validate_params(params, f"{ppath} + {apath}")


def data_overrides(data_dir: str | Path | None = None, flame_assets: str | Path | None = None) -> dict:
    """The overrides of a command line's ``--data DIR`` (a DAD-3DHeads-format root, not generated:
    no ``data.synthetic``) and ``--flame-assets DIR``, as absolute paths; {} for neither."""
    data: dict = {}
    if data_dir:
        data.update(root=str(Path(data_dir).expanduser().resolve()), synthetic=None)
    if flame_assets:
        data["flame_path"] = str(Path(flame_assets).expanduser().resolve())
    return {"data": data} if data else {}


def data_root(root: str | Path | None) -> Path:
    """The directory of a data set, by one rule for every reader of params: ``data.root`` with ``~``
    expanded; a relative root is under outputs/ (where the presets keep generated data)."""
    if not root:
        raise ParamsError("params: data.root is not set (a directory holding DAD-3DHeadsDataset/)")
    root = Path(root).expanduser()
    return root if root.is_absolute() else OUTPUTS_DIR / root


def load_params(path: str | Path) -> dict:
    """A complete params file (as written into each run's directory), validated."""
    return validate_params(_read_mapping(path), str(path))


PLACEMENT_KEYS = ("accelerator", "devices", "num_threads")  # trainer keys the study runner sets per run
# The meaning of params: raise it when the same params come to train something else (a changed
# default, a key that now means another thing), so that every run trains again. It counts in the
# training fingerprint only when it differs from 1, the version of every run made before it existed,
# so that their fingerprints, and the finished studies, stay as they were (as LATER_KEYS do).
SCHEMA_VERSION = 1
NOT_TRAINING = ("ablation", "ablation_description", "hypothesis", "description", "study", "launcher")


def training_fingerprint(params: dict) -> str:
    """A short hash of everything that changes what a run trains (not its name, nor where it runs:
    :data:`PLACEMENT_KEYS`). Params count with their defaults filled in (:meth:`Settings.parse`: a
    run's ``params.yaml`` rewritten by training hashes as the params it was started with); keys added
    later (:data:`LATER_KEYS`) count only when they differ from their defaults, and
    :data:`SCHEMA_VERSION` only when it differs from 1. Data under outputs/ counts by its path relative
    to outputs/, so a moved checkout keeps its finished runs; generated data also by its recipe
    (``data.synthetic``, but not one of :data:`FORMER_RECIPES`)."""
    params = Settings.parse(params).to_dict()
    for section, keys in LATER_KEYS.items():
        defaults = {f.name: f.default for f in fields(SETTINGS_SECTIONS[section])}
        params[section] = {k: v for k, v in params[section].items() if k not in keys or v != defaults[k]}
    if params["data"]["synthetic"] is None or recipe_digest(params["data"]["synthetic"]) in FORMER_RECIPES:
        params["data"].pop("synthetic")
    params["trainer"] = {k: v for k, v in params["trainer"].items() if k not in PLACEMENT_KEYS}
    keep = {k: v for k, v in params.items() if k not in NOT_TRAINING}
    if SCHEMA_VERSION != 1:
        keep["schema_version"] = SCHEMA_VERSION
    root = keep["data"]["root"]
    if root and Path(root).is_absolute() and Path(root).is_relative_to(OUTPUTS_DIR):
        keep["data"] = {**keep["data"], "root": str(Path(root).relative_to(OUTPUTS_DIR))}
    return hashlib.sha1(json.dumps(keep, sort_keys=True, default=str).encode()).hexdigest()[:12]


def save_params(params: dict, path: str | Path) -> None:
    """Write params as YAML atomically."""
    atomic_write(path, yaml.safe_dump(params, sort_keys=False))
