"""A run's settings, typed: one frozen dataclass per params section, each field with its default and
its check. The one home of every setting's default and check.

Params stay plain nested data on disk (the YAML files, a run's ``params.yaml``, a checkpoint's hyper
parameters); :meth:`Settings.parse` reads such a dict once, filling in the defaults and checking every
value, and :meth:`Settings.to_dict` gives the complete plain dict back::

    s = Settings.parse(config.run_params("smoke"))
    s.data.crop_size, s.model.hidden, s.optim.schedule    # 64, 64, "plateau"
    s.to_dict()["model"]["dropout"]                       # 0.3, the default

A bad value raises :class:`dad3dlib.errors.ParamsError` naming the source (the file) and the key.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field, fields

from .errors import InputValueError, ParamsError
from .losses import LOSS_TERMS, validate_lambdas
from .metrics import SHAPE_PROTOCOLS


def _integer(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def setting(default, test=None, what: str = ""):
    """A section's field: its ``default`` (a dict or list is copied for each instance) and, when
    given, its check: ``test(value)`` true, else ParamsError "<section>.<key> must be <what>"."""
    kind = {"default_factory": lambda: copy.deepcopy(default)} if isinstance(default, (dict, list)) else \
        {"default": default}
    return field(**kind, metadata={"check": (test, what)} if test else {})


def deep_merge(base: dict, override: dict) -> dict:
    """A new dict: ``override`` on top of ``base``, merging nested dicts."""
    out = copy.deepcopy(base)
    for k, v in override.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


@dataclass(frozen=True)
class Section:
    """A params section: fields with their defaults and checks (:func:`setting`), run on construction."""

    NAME = ""  # the section's key in params

    def __post_init__(self):
        for f in fields(self):
            test, what = f.metadata.get("check", (None, ""))
            value = getattr(self, f.name)
            if test and not test(value):
                raise ParamsError(f"{self.NAME}.{f.name} must be {what}, got {value!r}")

    @classmethod
    def parse(cls, given: dict | None, source: str = "params"):
        """The section of a params dict's ``given`` entry (None: every default); unknown keys and bad
        values raise ParamsError naming ``source``."""
        given = {} if given is None else given
        if not isinstance(given, dict):
            raise ParamsError(f"{source}: '{cls.NAME}' must be a mapping, got {given!r}")
        known = [f.name for f in fields(cls)]
        unknown = set(given) - set(known)
        if unknown:
            raise ParamsError(f"{source}: unknown {cls.NAME} key(s) {sorted(unknown)}; known: {sorted(known)}")
        try:
            return cls(**given)
        except ParamsError as e:
            raise ParamsError(f"{source}: {e}") from None

    def to_dict(self) -> dict:
        """The section as plain data, every key (a copy)."""
        return {f.name: copy.deepcopy(getattr(self, f.name)) for f in fields(self)}


# --------------------------------------------------------------------------------------------
# data.synthetic: a generated data set's recipe, made by synthetic_data.make_data
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


# --------------------------------------------------------------------------------------------
# The sections
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DataSettings(Section):
    """The data set and its loading. ``root``: absolute, or relative to outputs/
    (:func:`dad3dlib.config.data_root`); ``flame_path`` None: the data set's recorded FLAME assets,
    else the synthetic head (:func:`dad3dlib.data.flame_dir`); ``synthetic``: the recipe of a generated
    data set, completed (:func:`synthetic_recipe`), or None; ``holdout_fraction``: the share of train
    that selects checkpoints when the test split has no annotations (:func:`dad3dlib.data.split_protocol`)."""

    NAME = "data"
    root: str | None = None
    crop_size: int = setting(256, lambda v: _integer(v) and v > 0 and v % 32 == 0,
                             "a positive multiple of 32 (the encoder's stride)")
    batch_size: int = setting(64, lambda v: _integer(v) and v >= 1, "an integer >= 1")
    num_workers: int = setting(4, lambda v: _integer(v) and v >= 0, "an integer >= 0")
    flame_path: str | None = None
    augment: bool = True
    skip_bad: bool = False
    clip_bbox: bool = False
    holdout_fraction: float = setting(0.1, lambda v: _finite(v) and 0 < v < 1, "a number between 0 and 1")
    synthetic: dict | None = None

    def __post_init__(self):
        object.__setattr__(self, "synthetic", synthetic_recipe(self.synthetic))
        super().__post_init__()


@dataclass(frozen=True)
class ModelSettings(Section):
    """The network: ``name`` of :data:`dad3dlib.model.MODELS` and its constructor's arguments
    (:meth:`network`; :class:`dad3dlib.model.DAD3DNet` explains them), and ``pose_prior_samples``: the
    training samples the pose head's initial scale and translation are fitted to (0: none)."""

    NAME = "model"
    name: str = "dad3dnet"
    encoder: str = "resnet50"
    bifpn_filters: int = 256
    bifpn_repeats: int = setting(1, lambda v: _integer(v) and v >= 1, "an integer >= 1")
    hidden: int = 512
    dropout: float = 0.3
    init_scale: float = 8.0
    pretrained_path: str | None = None
    pose_prior_samples: int = 64
    bifpn_levels: int = 3
    bifpn_depthwise_kernel: int = setting(3, lambda v: _integer(v) and v >= 1 and v % 2 == 1, "an odd integer >= 1")
    bifpn_act: str = "silu"
    bifpn_bn_momentum: float = setting(0.1, lambda v: _finite(v) and 0 <= v <= 1, "a number in [0, 1]")
    bifpn_bn_eps: float = setting(1e-5, lambda v: _finite(v) and v > 0,
                                  "a finite number > 0 (write 4.0e-5: YAML reads 4e-5 as text)")
    bifpn_downsample: str = "maxpool"
    bifpn_lateral: str = "bn"
    bifpn_top_inputs: int = 2

    def network(self) -> dict:
        """The keyword arguments of the network's constructor: every setting but ``name`` and
        ``pose_prior_samples``."""
        return {k: v for k, v in self.to_dict().items() if k not in ("name", "pose_prior_samples")}


@dataclass(frozen=True)
class LossSettings(Section):
    """The objective: ``lambdas``, a weight per term of :data:`dad3dlib.losses.LOSS_TERMS` (as floats;
    default: each term's reference weight), and the heatmap loss."""

    NAME = "loss"
    lambdas: dict = setting({k: t.reference_weight for k, t in LOSS_TERMS.items()})
    heatmap_loss: str = "awing"

    def __post_init__(self):
        try:
            object.__setattr__(self, "lambdas", validate_lambdas(self.lambdas, None))
        except InputValueError as e:
            raise ParamsError(str(e)) from None
        super().__post_init__()


CHECKPOINT_POLICY = {  # optim.schedule -> (checkpoint file, why); lightning_module.SCHEDULES implements them
    "onecycle": ("last.ckpt", "fixed-budget schedule (one-cycle): the last step is the intended result"),
    "plateau": ("best.ckpt", "plateau schedule: the lowest validation NME"),
}


@dataclass(frozen=True)
class OptimSettings(Section):
    """Adam and the learning-rate schedule: ``plateau`` (ReduceLROnPlateau on validation NME) or
    ``onecycle`` (warm-up over ``warmup_fraction`` of the run, then cosine decay); the schedule
    decides the checkpoint a run is evaluated on (:data:`CHECKPOINT_POLICY`)."""

    NAME = "optim"
    lr: float = setting(1e-4, lambda v: _finite(v) and v > 0, "a finite number > 0")
    weight_decay: float = setting(0.0, lambda v: _finite(v) and v >= 0, "a finite number >= 0")
    schedule: str = setting("plateau", lambda v: v in CHECKPOINT_POLICY, f"one of {', '.join(sorted(CHECKPOINT_POLICY))}")
    plateau_patience: int = 10
    plateau_factor: float = 0.5
    min_lr: float = 1e-7
    warmup_fraction: float = 0.1


@dataclass(frozen=True)
class TrainerSettings(Section):
    """Lightning's Trainer (:func:`dad3dlib.train.build_trainer`), plus ``num_threads`` (CPU threads
    per process; None: torch's default), ``progress_bar``, ``early_stopping_patience`` (validations;
    None: no early stop), ``checkpoint_every_n_steps`` and ``compile`` (torch.compile the network)."""

    NAME = "trainer"
    max_epochs: int = 100
    max_steps: int = -1
    max_time: float | str | None = None
    precision: str = "auto"
    accelerator: str = "auto"
    devices: int | str | list = "auto"
    num_nodes: int = 1
    strategy: str = "auto"
    val_check_interval: int | float | None = None
    check_val_every_n_epoch: int = 1
    limit_val_batches: int | float | None = None
    log_every_n_steps: int = 10
    checkpoint_every_n_steps: int | None = None
    gradient_clip_val: float | None = None
    num_threads: int | None = None
    progress_bar: bool = True
    early_stopping_patience: int | None = None
    min_epochs: int | None = None
    compile: bool = setting(False, lambda v: isinstance(v, bool), "true or false")


@dataclass(frozen=True)
class StudySettings(Section):
    """The study runner's and the evaluation's settings (they count in no training fingerprint):
    ``jobs`` concurrent runs and ``seeds`` per ablation (the command line's, else these),
    ``cell_timeout_s`` the longest a notebook cell may run (None: no limit), ``shape_protocol`` how the
    3D shape error is measured (:data:`dad3dlib.metrics.SHAPE_PROTOCOLS`; landmarks is what every study
    measured before it existed)."""

    NAME = "study"
    jobs: int = setting(1, lambda v: _integer(v) and v >= 1, "a positive integer")
    seeds: int = setting(1, lambda v: _integer(v) and v >= 1, "a positive integer")
    cell_timeout_s: int | None = setting(None, lambda v: v is None or _integer(v) and v >= 1,
                                         "a positive number of seconds or null")
    shape_protocol: str = setting("landmarks", lambda v: v in SHAPE_PROTOCOLS, f"one of {', '.join(SHAPE_PROTOCOLS)}")


SECTIONS = {s.NAME: s for s in (DataSettings, ModelSettings, LossSettings, OptimSettings, TrainerSettings,
                                StudySettings)}


@dataclass(frozen=True)
class Settings:
    """A run's settings: ``seed`` and the typed sections; ``other``: the params' remaining entries as
    given (preset, ablation, descriptions, hypothesis, launcher), which no training reads."""

    seed: int = 1
    data: DataSettings = field(default_factory=DataSettings)
    model: ModelSettings = field(default_factory=ModelSettings)
    loss: LossSettings = field(default_factory=LossSettings)
    optim: OptimSettings = field(default_factory=OptimSettings)
    trainer: TrainerSettings = field(default_factory=TrainerSettings)
    study: StudySettings = field(default_factory=StudySettings)
    other: dict = field(default_factory=dict)

    @classmethod
    def parse(cls, params: dict, source: str = "params") -> Settings:
        """The settings of a params dict (complete or not); ParamsError names ``source`` and the key."""
        seed = params.get("seed", cls.seed)
        if not _integer(seed):
            raise ParamsError(f"{source}: seed must be an integer, got {seed!r}")
        other = {k: copy.deepcopy(v) for k, v in params.items() if k != "seed" and k not in SECTIONS}
        return cls(seed, **{name: section.parse(params.get(name), source) for name, section in SECTIONS.items()},
                   other=other)

    def to_dict(self) -> dict:
        """The complete params as plain data: the other entries, then seed and every section's keys."""
        return {**copy.deepcopy(self.other), "seed": self.seed,
                **{name: getattr(self, name).to_dict() for name in SECTIONS}}
