"""Params files: presets (how big) × ablations (which loss weights) × seeds, as plain nested dicts.

A run's params = the preset file, overridden by the ablation file, plus ``seed`` and ``ablation``.
Files live in ``params/presets/<name>.yaml`` and ``params/ablations/<name>.yaml``; any other YAML
path works too. Every problem is reported with the file it came from.
"""
from __future__ import annotations

import copy
import hashlib
import json
import math
from pathlib import Path

import yaml

from . import OUTPUTS_DIR, REPO_ROOT, stats
from .errors import InputValueError
from .files import atomic_write, read_bytes
from .losses import LOSS_TERMS, validate_lambdas  # the objective's terms, one record each
from .metrics import SHAPE_PROTOCOLS

PARAMS_DIR = REPO_ROOT / "params"


SECTIONS = {"name", "description", "seed", "ablation", "data", "model", "loss", "optim", "trainer", "study",
            "launcher", "hypothesis"}
RUN_SECTIONS = SECTIONS - {"name"} | {"preset", "ablation_description"}  # a run's complete params.yaml
ABLATION_KEYS = ("name", "description", "hypothesis", "loss")  # what an ablation file may set
MAPPINGS = ("data", "model", "loss", "optim", "trainer", "study", "launcher")
HOLDOUT_FRACTION = 0.1  # default data.holdout_fraction


# --------------------------------------------------------------------------------------------
# Defaults, and what a run's directory records
# --------------------------------------------------------------------------------------------
DEFAULTS: dict = {
    "seed": 1,
    "model": {"name": "dad3dnet", "encoder": "resnet50", "bifpn_filters": 256, "bifpn_repeats": 1,
              "hidden": 512, "dropout": 0.3, "init_scale": 8.0, "pretrained_path": None,
              "pose_prior_samples": 64, "bifpn_levels": 3, "bifpn_depthwise_kernel": 3, "bifpn_act": "silu",
              "bifpn_bn_momentum": 0.1, "bifpn_bn_eps": 1e-5, "bifpn_downsample": "maxpool",
              "bifpn_lateral": "bn", "bifpn_top_inputs": 2},
    "loss": {"lambdas": {k: t.reference_weight for k, t in LOSS_TERMS.items()}, "heatmap_loss": "awing"},
    "data": {"root": None, "crop_size": 256, "batch_size": 64, "num_workers": 4, "flame_path": None,
             "augment": True, "skip_bad": False, "clip_bbox": False, "holdout_fraction": HOLDOUT_FRACTION,
             "synthetic": None},
    "optim": {"lr": 1e-4, "weight_decay": 0.0, "schedule": "plateau", "plateau_patience": 10,
              "plateau_factor": 0.5, "min_lr": 1e-7, "warmup_fraction": 0.1},
    "trainer": {"max_epochs": 100, "max_steps": -1, "max_time": None, "precision": "auto",
                "accelerator": "auto", "devices": "auto", "num_nodes": 1, "strategy": "auto",
                "val_check_interval": None, "check_val_every_n_epoch": 1, "limit_val_batches": None,
                "log_every_n_steps": 10, "checkpoint_every_n_steps": None, "gradient_clip_val": None,
                "num_threads": None, "progress_bar": True, "early_stopping_patience": None, "min_epochs": None,
                "compile": False},
}
# Keys added after studies had run, whose defaults reproduce what ran before them: they count in a
# run's training fingerprint only when set otherwise, so that finished runs stay finished.
LATER_KEYS = {"model": ("bifpn_levels", "bifpn_depthwise_kernel", "bifpn_act", "bifpn_bn_momentum", "bifpn_bn_eps",
                        "bifpn_downsample", "bifpn_lateral", "bifpn_top_inputs"),
              "data": ("clip_bbox", "holdout_fraction"), "trainer": ("min_epochs", "compile")}
MODEL_ONLY_KEYS = ("pose_prior_samples",)  # model params that are not constructor arguments


def with_defaults(params: dict) -> dict:
    """A copy of ``params`` with every missing key from :data:`DEFAULTS`; unknown keys of the
    sections training reads (model is checked by create_model) raise ParamsError."""
    out = copy.deepcopy(params)
    for section, defaults in DEFAULTS.items():
        if not isinstance(defaults, dict):
            out.setdefault(section, defaults)
            continue
        given = out.setdefault(section, {}) or {}
        unknown = set(given) - set(defaults) if section != "model" else set()
        if unknown:
            raise ParamsError(f"params: unknown {section} key(s) {sorted(unknown)}; known: {sorted(defaults)}")
        out[section] = {**copy.deepcopy(defaults), **given}
    out["data"]["synthetic"] = synthetic_recipe(out["data"]["synthetic"])
    if out["optim"]["schedule"] not in CHECKPOINT_POLICY:
        raise ParamsError(f"params: unknown optim.schedule '{out['optim']['schedule']}' (known: {sorted(CHECKPOINT_POLICY)})")
    return out


# --------------------------------------------------------------------------------------------
# Synthetic data: a generated data set's recipe (data.synthetic), made by synthetic_data.make_data
# --------------------------------------------------------------------------------------------
# Scene distributions, the defaults of data.synthetic.sampling (angles in degrees, lengths in metres).
SYNTHETIC_SAMPLING: dict = {
    "yaw_sigma": 25.0, "yaw_wide_prob": 0.3, "yaw_max": 90.0,       # wide: uniform over ±max
    "pitch_sigma": 10.0, "pitch_wide_prob": 0.1, "pitch_max": 45.0,
    "roll_sigma": 7.0, "roll_wide_prob": 0.1, "roll_max": 35.0,
    "fov": [20.0, 65.0],             # horizontal field of view of the larger image side
    "head_fraction": [0.3, 0.8],     # head bbox height / image height
    "shape_clip": 3.0,               # β ~ N(0,1) truncated at ±clip
    "expression_prob": 0.6, "expression_sigma": [0.3, 1.3], "neutral_sigma": 0.2,
    "jaw_prob": 0.4, "jaw_open": [0.05, 0.4],  # radians about x
    "light_standard_prob": 0.65,
    "occluder_prob": 0.2,
    "torso_prob": 0.85,              # shoulders under the neck (drawn behind the head)
    "degrade": {"blur": 0.1, "noise": 0.12, "downscale": 0.1, "jpeg": 0.08},  # ~1/3 of images "lq"
}
SYNTHETIC_KEYS = ("splits", "image_sizes", "seed", "sampling")
# The recipes of the smoke, cpu and paper presets, when they were named in code and left out of the
# fingerprint (recipe_digest): a run made from one of them counts as it did then, so that studies
# begun before recipes were params keep their finished runs. Any other recipe counts in full.
FORMER_RECIPES = {"131ef80b897a", "0cabc1a91db3", "015142394e4e"}


def synthetic_recipe(given: dict | None) -> dict | None:
    """The complete recipe of a generated data set: ``given`` = {splits: {split: images},
    image_sizes: [[width, height], ...] (one drawn per image), seed (default 0), sampling (over
    :data:`SYNTHETIC_SAMPLING`)}; None (a data set that is not generated) stays None. Raises
    ParamsError naming the first bad key."""
    if given is None:
        return None
    if not isinstance(given, dict) or set(given) - set(SYNTHETIC_KEYS):
        raise ParamsError(f"data.synthetic must be a mapping of {', '.join(SYNTHETIC_KEYS)}, got {given!r}")
    splits, sizes, seed = given.get("splits"), given.get("image_sizes"), given.get("seed", 0)
    if not isinstance(splits, dict) or not splits or set(splits) - {"train", "val", "test"} or \
            not all(_integer(n) and n >= 1 for n in splits.values()):
        raise ParamsError(f"data.synthetic.splits must map train, val, test to image counts >= 1, got {splits!r}")
    if not isinstance(sizes, list) or not sizes or not all(
            isinstance(s, (list, tuple)) and len(s) == 2 and all(_integer(v) and v >= 32 for v in s) for s in sizes):
        raise ParamsError(f"data.synthetic.image_sizes must be a list of [width, height] (integers >= 32), got {sizes!r}")
    if not _integer(seed):
        raise ParamsError(f"data.synthetic.seed must be an integer, got {seed!r}")
    sampling = given.get("sampling") or {}
    unknown = sorted(set(sampling) - set(SYNTHETIC_SAMPLING)) + \
        sorted(f"degrade.{k}" for k in set(sampling.get("degrade") or {}) - set(SYNTHETIC_SAMPLING["degrade"]))
    if unknown:
        raise ParamsError(f"data.synthetic.sampling: unknown key(s) {unknown}; known: {sorted(SYNTHETIC_SAMPLING)}")
    return {"splits": dict(splits), "image_sizes": [list(s) for s in sizes], "seed": seed,
            "sampling": deep_merge(SYNTHETIC_SAMPLING, sampling)}


def recipe_digest(recipe: dict) -> str:
    """A short hash of a complete recipe (:func:`synthetic_recipe`)."""
    return hashlib.sha1(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:12]


TRAINING_RECORD = "training.json"  # precision used, processes, the checkpoint to evaluate (step, why), the splits
CHECKPOINT_POLICY = {  # optim.schedule -> (checkpoint file, why); the schedules lightning_module.SCHEDULES implements
    "onecycle": ("last.ckpt", "fixed-budget schedule (one-cycle): the last step is the intended result"),
    "plateau": ("best.ckpt", "plateau schedule: the lowest validation NME"),
}


def evaluation_checkpoint(params: dict, out_dir: Path) -> tuple[Path, str]:
    """The checkpoint a run is evaluated on, by its schedule (:data:`CHECKPOINT_POLICY`), and why;
    ``last.ckpt`` when the policy's file does not exist (no validation ran)."""
    name, why = CHECKPOINT_POLICY[params["optim"]["schedule"]]
    path = out_dir / "checkpoints" / name
    if not path.exists():
        path, why = out_dir / "checkpoints" / "last.ckpt", f"{why}; no {name} was written, so the last step"
    return path, why


def _integer(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


# (section, key) -> (test, what the value must be); checked where present (absent keys take defaults)
FIELD_CHECKS = {
    ("data", "crop_size"): (lambda v: _integer(v) and v > 0 and v % 32 == 0,
                            "a positive multiple of 32 (the encoder's stride)"),
    ("data", "batch_size"): (lambda v: _integer(v) and v >= 1, "an integer >= 1"),
    ("data", "num_workers"): (lambda v: _integer(v) and v >= 0, "an integer >= 0"),
    ("model", "bifpn_repeats"): (lambda v: _integer(v) and v >= 1, "an integer >= 1"),
    ("model", "bifpn_depthwise_kernel"): (lambda v: _integer(v) and v >= 1 and v % 2 == 1, "an odd integer >= 1"),
    ("model", "bifpn_bn_momentum"): (lambda v: _finite(v) and 0 <= v <= 1, "a number in [0, 1]"),
    ("model", "bifpn_bn_eps"): (lambda v: _finite(v) and v > 0, "a finite number > 0 (write 4.0e-5: YAML reads 4e-5 as text)"),
    ("data", "holdout_fraction"): (lambda v: _finite(v) and 0 < v < 1, "a number between 0 and 1"),
    ("optim", "lr"): (lambda v: _finite(v) and v > 0, "a finite number > 0"),
    ("optim", "weight_decay"): (lambda v: _finite(v) and v >= 0, "a finite number >= 0"),
    ("trainer", "compile"): (lambda v: isinstance(v, bool), "true or false"),
    ("study", "shape_protocol"): (lambda v: v in SHAPE_PROTOCOLS, f"one of {', '.join(SHAPE_PROTOCOLS)}"),
}
DEFAULT_SHAPE_PROTOCOL = "landmarks"  # study.shape_protocol unset: what every study measured before it existed


def shape_protocol(params: dict) -> str:
    """How a run's 3D shape error is measured: its ``study.shape_protocol``, else
    :data:`DEFAULT_SHAPE_PROTOCOL`; a name of :data:`metrics.SHAPE_PROTOCOLS`. An evaluation setting:
    the study section is not part of the training fingerprint, so changing it re-trains nothing."""
    value = (params.get("study") or {}).get("shape_protocol") or DEFAULT_SHAPE_PROTOCOL
    ok, what = FIELD_CHECKS[("study", "shape_protocol")]
    if not ok(value):
        raise ParamsError(f"study.shape_protocol must be {what}, got {value!r}")
    return value


class ParamsError(InputValueError):
    """A params file is missing, unreadable or invalid; the message names the file."""


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


def deep_merge(base: dict, override: dict) -> dict:
    """A new dict: ``override`` on top of ``base``, merging nested dicts."""
    out = copy.deepcopy(base)
    for k, v in override.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


def validate_params(params: dict, source: str) -> dict:
    """A run's params with its loss weights as floats (see :func:`validate_lambdas`) and its
    ablation's primary hypothesis checked (:func:`hypothesis`); refuses unknown sections, sections
    that are not mappings and values failing FIELD_CHECKS, naming ``source`` (the file(s) they came
    from)."""
    _refuse_unknown_sections(params, source, RUN_SECTIONS)
    for name in MAPPINGS:
        if params.get(name) is not None and not isinstance(params[name], dict):
            raise ParamsError(f"{source}: '{name}' must be a mapping, got {params[name]!r}")
    if set(params.get("study") or {}) & {"make_data", "data_seed"}:
        raise ParamsError(f"{source}: study.make_data and study.data_seed are now data.synthetic, the generated data "
                          "set's recipe (splits, image_sizes, seed, sampling; see params/presets/cpu.yaml)")
    try:
        synthetic_recipe((params.get("data") or {}).get("synthetic"))
    except ParamsError as e:
        raise ParamsError(f"{source}: {e}") from None
    for (section, key), (ok, what) in FIELD_CHECKS.items():
        value = (params.get(section) or {}).get(key)
        if value is not None and not ok(value):
            raise ParamsError(f"{source}: {section}.{key} must be {what}, got {value!r}")
    if "hypothesis" in params:
        params["hypothesis"] = hypothesis(params["hypothesis"], source)
    loss = params.get("loss") or {}
    try:
        params["loss"] = {**loss, "lambdas": validate_lambdas(loss.get("lambdas", {}), source)}
    except InputValueError as e:
        raise ParamsError(str(e)) from None
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
        data["root"] = str(data_root(data))
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


def data_root(data: dict) -> Path:
    """The directory of a data section's data set, by one rule for every reader of params: ``data.root``
    with ``~`` expanded; a relative root is under outputs/ (where the presets keep generated data)."""
    if not data.get("root"):
        raise ParamsError("params: data.root is not set (a directory holding DAD-3DHeadsDataset/)")
    root = Path(data["root"]).expanduser()
    return root if root.is_absolute() else OUTPUTS_DIR / root


def load_params(path: str | Path) -> dict:
    """A complete params file (as written into each run's directory), validated."""
    return validate_params(_read_mapping(path), str(path))


PLACEMENT_KEYS = ("accelerator", "devices", "num_threads")  # trainer keys the study runner sets per run


def training_fingerprint(params: dict) -> str:
    """A short hash of everything that changes what a run trains (not its name, nor where it runs:
    :data:`PLACEMENT_KEYS`). Params count with their defaults filled in (a run's ``params.yaml``
    rewritten by training hashes as the params it was started with); keys added later
    (:data:`LATER_KEYS`) count only when they differ from their defaults. Data under outputs/ counts by
    its path relative to outputs/, so a moved checkout keeps its finished runs; generated data also by
    its recipe (``data.synthetic``, but not one of :data:`FORMER_RECIPES`)."""
    params = with_defaults(params)
    for section, keys in LATER_KEYS.items():
        params[section] = {k: v for k, v in params[section].items()
                           if k not in keys or v != DEFAULTS[section][k]}
    if params["data"]["synthetic"] is None or recipe_digest(params["data"]["synthetic"]) in FORMER_RECIPES:
        params["data"].pop("synthetic")
    params["trainer"] = {k: v for k, v in params["trainer"].items() if k not in PLACEMENT_KEYS}
    keep = {k: v for k, v in params.items()
            if k not in ("ablation", "ablation_description", "hypothesis", "description", "study", "launcher")}
    root = (keep.get("data") or {}).get("root")
    if root and Path(root).is_absolute() and Path(root).is_relative_to(OUTPUTS_DIR):
        keep["data"] = {**keep["data"], "root": str(Path(root).relative_to(OUTPUTS_DIR))}
    return hashlib.sha1(json.dumps(keep, sort_keys=True, default=str).encode()).hexdigest()[:12]


def save_params(params: dict, path: str | Path) -> None:
    """Write params as YAML atomically."""
    atomic_write(path, yaml.safe_dump(params, sort_keys=False))
