"""DAD-3DNet (docs/ARCHITECTURE.md): timm encoder, BiFPN, heatmap head, fusion, shape/pose/landmark heads.

The encoder is any timm CNN created with ``features_only=True`` (never downloaded: weights come
only from a local file). It runs to its stride-16 stage; a BiFPN fuses its stride-4/8/16 maps (and,
with ``bifpn_levels=5`` as the reference, two coarser levels made from them); a
3x3 conv on the fused stride-4 map gives 68 heatmap logits. The sigmoid heatmaps (resized to
stride 16), the BiFPN stride-16 map and the encoder stride-16 map are concatenated, a 1x1 conv maps
them back to the encoder's channels and the result multiplies the encoder's stride-16 features.
The encoder's last (stride-32) stage runs on that; three MLP heads read its pooled output.

Shapes: B batch, S crop side; output keys as docs/ARCHITECTURE.md:
``params_3dmm`` [B,413], ``landmarks_2d`` [B,68,2] in [0,1] of the crop, ``heatmaps`` [B,68,S/4,S/4]
(logits).
"""
from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .errors import InputFileNotFound, InputValueError
from .files import LOAD_ERRORS
from .flame import N_3DMM, N_EXPR, N_JAW, N_SHAPE, fit_weak_perspective
from .geometry import FRONTAL_ROT6D
from .settings import ModelSettings

N_LANDMARKS = 68
N_SHAPE_HEAD = N_SHAPE + N_EXPR + N_JAW  # 403, tanh * 3
N_POSE_HEAD = N_3DMM - N_SHAPE_HEAD      # 10: rot6d, translation, scale - 1
HEATMAP_PRIOR = 0.01  # initial sigmoid of the heatmap logits (most pixels are background)


# --------------------------------------------------------------------------------------------
# Encoder: a timm feature extractor split at its stride-16 stage
# --------------------------------------------------------------------------------------------
def _children_features_list(enc: nn.Module) -> list[tuple[str, nn.Module]]:
    return list(enc.items())


def _children_blocks(enc: nn.Module) -> list[tuple[str, nn.Module]]:
    stem = [(n, m) for n, m in enc.named_children() if n != "blocks"]
    return stem + [(f"blocks_{i}", b) for i, b in enumerate(enc.blocks)]


# timm feature-extractor class name -> its ordered modules, named like feature_info ('.' -> '_')
_SEQUENCERS = {
    "FeatureListNet": _children_features_list,
    "FeatureDictNet": _children_features_list,
    "MobileNetV3Features": _children_blocks,
    "EfficientNetFeatures": _children_blocks,
}


class SplitEncoder(nn.Module):
    """A timm CNN as two runs: up to stride 16 (taps at strides 4, 8, 16) and the stride-32 rest.

    ``channels``: dict stride -> channels for strides 4, 8, 16, 32.
    """

    def __init__(self, name: str, pretrained_path: str | Path | None = None):
        super().__init__()
        enc = timm.create_model(name, pretrained=False, features_only=True)
        if pretrained_path is not None:
            load_encoder_weights(enc, pretrained_path)
        kind = type(enc).__name__
        if kind not in _SEQUENCERS:
            raise InputValueError(f"encoder '{name}': timm feature class {kind} is not supported "
                                  f"(supported: {sorted(_SEQUENCERS)})")
        info = enc.feature_info
        taps = {r: m.replace(".", "_") for r, m in zip(info.reduction(), info.module_name())}
        missing = [r for r in (4, 8, 16, 32) if r not in taps]
        if missing:
            raise InputValueError(f"encoder '{name}' has no feature stage at stride(s) {missing}")
        self.channels = {r: c for r, c in zip(info.reduction(), info.channels()) if r in (4, 8, 16, 32)}
        mods = _SEQUENCERS[kind](enc)
        names = [n for n, _ in mods]
        split, last = names.index(taps[16]) + 1, names.index(taps[32]) + 1
        self.stem = nn.ModuleDict(mods[:split])
        self.last = nn.ModuleDict(mods[split:last])
        self.taps = (taps[4], taps[8], taps[16])

    def forward_to_16(self, x: Tensor) -> list[Tensor]:
        """[B,3,S,S] -> [stride-4, stride-8, stride-16 feature maps]."""
        out = []
        for name, module in self.stem.items():
            x = module(x)
            if name in self.taps:
                out.append(x)
        return out

    def forward_last(self, x: Tensor) -> Tensor:
        """Stride-16 map [B,C16,S/16,S/16] -> stride-32 map [B,C32,S/32,S/32]."""
        for module in self.last.values():
            x = module(x)
        return x


def read_state_dict(path: str | Path) -> dict[str, Tensor]:
    """Weights from a local ``.safetensors`` or torch file (``weights_only``), unwrapped from a
    ``state_dict``/``model`` entry, a leading ``module.`` prefix removed."""
    path = Path(path)
    if not path.is_file():
        raise InputFileNotFound(f"{path}: pretrained weights file not found")
    from safetensors import SafetensorError

    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd = load_file(str(path))
        else:
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except (*LOAD_ERRORS, SafetensorError) as e:
        raise InputValueError(f"{path}: cannot read weights ({type(e).__name__}: {e})") from e
    for key in ("state_dict", "model"):
        if isinstance(sd, dict) and isinstance(sd.get(key), dict):
            sd = sd[key]
    if not isinstance(sd, dict):
        raise InputValueError(f"{path}: expected a state dict, got {type(sd).__name__}")
    return {k.removeprefix("module."): v for k, v in sd.items() if isinstance(v, Tensor)}


def load_encoder_weights(enc: nn.Module, path: str | Path) -> None:
    """Load a classification checkpoint of the same timm architecture into a features-only encoder.

    Keys are matched as they are or with the first '.' of a flattened name restored
    (timm's ``blocks_0.x`` is ``blocks.0.x`` in the full model); the classifier is ignored.
    """
    src = read_state_dict(path)
    own = enc.state_dict()
    loaded, missing = {}, []
    for key, value in own.items():
        head, _, rest = key.partition(".")
        for cand in (key, head.replace("_", ".", 1) + "." + rest):
            if cand in src and src[cand].shape == value.shape:
                loaded[key] = src[cand]
                break
        else:
            missing.append(key)
    if missing:
        raise InputValueError(f"{path}: {len(missing)} encoder tensors missing or of another shape, "
                              f"e.g. {missing[:3]}")
    enc.load_state_dict(loaded)


# --------------------------------------------------------------------------------------------
# BiFPN: the light 3-level pyramid (default) or the reference's 5-level one (docs/ARCHITECTURE.md)
# --------------------------------------------------------------------------------------------
BIFPN_ACTIVATIONS = {"silu": nn.SiLU, "relu": nn.ReLU}
BIFPN_DOWNSAMPLING = {  # x [B,F,h,w] -> [B,F,h',w'] at the size of the next coarser level
    "maxpool": lambda x, size: F.adaptive_max_pool2d(x, size),
    "nearest": lambda x, size: F.interpolate(x, size=size, mode="nearest"),  # the reference's
}
BIFPN_LATERALS = ("bn", "bias")  # 1x1 input convs: without bias + BatchNorm, or with bias (the reference)
LEVEL_NAMES = {3: ("fine", "mid", "coarse"), 5: ("p3", "p4", "p5", "p6", "p7")}  # finest first


def _choice(setting: str, value, known) -> None:
    if value not in known:
        raise InputValueError(f"model.{setting} must be one of {sorted(known)}, got {value!r}")


class SeparableConvBlock(nn.Sequential):
    """Depthwise k x k + pointwise 1x1 + BN + activation, channels kept: [B,C,h,w] -> [B,C,h,w].

    The reference's block has k = 1 (a per-channel scale before the pointwise conv) and ReLU.
    """

    def __init__(self, channels: int, kernel: int, act: str, bn_momentum: float, bn_eps: float):
        super().__init__(
            nn.Conv2d(channels, channels, kernel, padding=kernel // 2, groups=channels, bias=False),
            nn.Conv2d(channels, channels, 1, bias=False),
            nn.BatchNorm2d(channels, eps=bn_eps, momentum=bn_momentum),
            BIFPN_ACTIVATIONS[act](inplace=True),
        )


class WeightedSum(nn.Module):
    """Fast normalized fusion (EfficientDet): sum_i relu(w_i) x_i / (sum_i relu(w_i) + eps)."""

    def __init__(self, n: int, eps: float = 1e-4):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(n))
        self.eps = eps

    def forward(self, xs: list[Tensor]) -> Tensor:
        w = F.relu(self.weight)
        w = w / (w.sum() + self.eps)
        return sum(wi * x for wi, x in zip(w, xs))


class BiFPNLayer(nn.Module):
    """One bidirectional pass over L levels x_0 (finest) .. x_{L-1}, each [B,F,h_l,w_l].

    Top-down: td_{L-1} = x_{L-1}; td_l = block(fuse(x_l, up(td_{l+1}))) for l = L-2 .. 0.
    Bottom-up: out_0 = td_0; out_l = block(fuse(x_l, td_l, down(out_{l-1}))) for 0 < l < L-1;
    the top node fuses (x_{L-1}, down(out_{L-2})), or with ``top_inputs=3`` (the reference)
    (x_{L-1}, td_{L-1}, down(out_{L-2})), i.e. its input twice, with two weights.
    Upsampling is nearest-neighbour; downsampling is :data:`BIFPN_DOWNSAMPLING` [``downsample``].
    Modules are named after ``names`` (one per level, finest first): fusions ``td_<level>``,
    ``bu_<level>``; blocks ``conv.td_<level>`` and ``conv.out_<level>``.
    """

    def __init__(self, filters: int, names: tuple[str, ...], block: dict, downsample: str, top_inputs: int):
        super().__init__()
        _choice("bifpn_downsample", downsample, BIFPN_DOWNSAMPLING)
        _choice("bifpn_top_inputs", top_inputs, (2, 3))
        self.names, self.down, self.top_inputs = names, BIFPN_DOWNSAMPLING[downsample], top_inputs
        top = len(names) - 1
        blocks = []  # in the order of construction (and of the initializer's random draws)
        for l in range(top - 1, -1, -1):  # top-down nodes, coarse to fine; the finest is an output
            self.add_module(f"td_{names[l]}", WeightedSum(2))
            blocks.append(self._td_block(l))
        for l in range(1, top + 1):
            self.add_module(f"bu_{names[l]}", WeightedSum(3 if l < top else top_inputs))
            blocks.append(f"out_{names[l]}")
        self.conv = nn.ModuleDict({k: SeparableConvBlock(filters, **block) for k in blocks})

    def _td_block(self, l: int) -> str:
        return f"out_{self.names[l]}" if l == 0 else f"td_{self.names[l]}"

    def forward(self, feats: list[Tensor]) -> list[Tensor]:
        names, top = self.names, len(self.names) - 1
        td = [None] * top + [feats[top]]
        for l in range(top - 1, -1, -1):
            up = F.interpolate(td[l + 1], size=feats[l].shape[-2:], mode="nearest")
            td[l] = self.conv[self._td_block(l)](getattr(self, f"td_{names[l]}")([feats[l], up]))
        out = [td[0]]
        for l in range(1, top + 1):
            down = self.down(out[l - 1], feats[l].shape[-2:])
            inputs = [feats[l], td[l], down] if l < top or self.top_inputs == 3 else [feats[l], down]
            out.append(self.conv[f"out_{names[l]}"](getattr(self, f"bu_{names[l]}")(inputs)))
        return out


class BiFPN(nn.Module):
    """Input column, then ``repeats`` :class:`BiFPNLayer` over ``levels`` levels of ``filters`` channels.

    Input column: a 1x1 conv of each of the stride-4, 8, 16 maps (``lateral``: ``bn`` = without
    bias + BatchNorm; ``bias`` = with bias, the reference). ``levels=5`` (the reference) adds P6, a
    3x3 stride-2 conv (with bias) of the stride-16 encoder map, and P7, a 3x3 stride-2 conv
    (with bias) + BN + activation of P6 (the order of the reference's code).
    ``block``: :class:`SeparableConvBlock` settings (kernel, act, bn_momentum, bn_eps), which the
    input column's BatchNorms and activation share.

    feats: three maps [B,C_l,h_l,w_l] (strides 4, 8, 16) -> ``levels`` maps [B,filters,h_l,w_l]
    (strides 4, 8, 16[, 32, 64]); h_l = ceil(h_{l-1} / 2) above stride 16.
    """

    def __init__(self, in_channels: list[int], filters: int, repeats: int, levels: int, block: dict,
                 downsample: str, lateral: str, top_inputs: int):
        super().__init__()
        _choice("bifpn_levels", levels, LEVEL_NAMES)
        _choice("bifpn_lateral", lateral, BIFPN_LATERALS)
        _choice("bifpn_act", block["act"], BIFPN_ACTIVATIONS)
        bn = lambda: nn.BatchNorm2d(filters, eps=block["bn_eps"], momentum=block["bn_momentum"])  # noqa: E731
        self.lateral = nn.ModuleList(
            nn.Sequential(nn.Conv2d(c, filters, 1, bias=False), bn()) if lateral == "bn" else nn.Conv2d(c, filters, 1)
            for c in in_channels)
        if levels == 5:
            self.p6 = nn.Conv2d(in_channels[-1], filters, 3, stride=2, padding=1)
            self.p7 = nn.Sequential(nn.Conv2d(filters, filters, 3, stride=2, padding=1), bn(),
                                    BIFPN_ACTIVATIONS[block["act"]](inplace=True))
        self.levels = levels
        self.layers = nn.Sequential(*(BiFPNLayer(filters, LEVEL_NAMES[levels], block, downsample, top_inputs)
                                      for _ in range(repeats)))

    def forward(self, feats: list[Tensor]) -> list[Tensor]:
        x = [lat(f) for lat, f in zip(self.lateral, feats)]
        if self.levels == 5:
            x.append(self.p6(feats[-1]))
            x.append(self.p7(x[-1]))
        return self.layers(x)


# --------------------------------------------------------------------------------------------
# DAD-3DNet
# --------------------------------------------------------------------------------------------
def mlp_head(in_features: int, out_features: int, hidden: int, dropout: float) -> nn.Sequential:
    """Linear-ReLU-Dropout-Linear: [B,in] -> [B,out]."""
    return nn.Sequential(nn.Linear(in_features, hidden), nn.ReLU(inplace=True), nn.Dropout(dropout),
                         nn.Linear(hidden, out_features))


class DAD3DNet(nn.Module):
    """image [B,3,S,S] (S divisible by 32) -> dict(params_3dmm [B,413], landmarks_2d [B,68,2],
    heatmaps [B,68,S/4,S/4] logits).

    ``init_scale``: the weak-perspective scale s of the initial pose prediction (a frontal head at
    the crop centre); with FLAME metres and crop coordinates in [-1,1], a head filling the crop has
    s ~ 8-10. :meth:`set_pose_prior` replaces it with values fitted on data.

    The arguments are the model section's settings (:class:`dad3dlib.settings.ModelSettings`, their
    defaults and checks; :func:`create_model` builds one from them).
    BiFPN settings (:class:`BiFPN`; defaults: the light pyramid, the paper preset: the reference's):
    ``bifpn_levels`` 3 | 5, ``bifpn_repeats`` layers, ``bifpn_depthwise_kernel`` k of the blocks'
    depthwise conv, ``bifpn_act`` silu | relu, ``bifpn_bn_momentum`` / ``bifpn_bn_eps`` of its
    BatchNorms (PyTorch's convention: momentum is the weight of the new batch), ``bifpn_downsample``
    maxpool | nearest, ``bifpn_lateral`` bn | bias, ``bifpn_top_inputs`` 2 | 3.
    """

    def __init__(self, *, encoder: str, bifpn_filters: int, bifpn_repeats: int, hidden: int, dropout: float,
                 init_scale: float, pretrained_path: str | Path | None, bifpn_levels: int,
                 bifpn_depthwise_kernel: int, bifpn_act: str, bifpn_bn_momentum: float, bifpn_bn_eps: float,
                 bifpn_downsample: str, bifpn_lateral: str, bifpn_top_inputs: int):
        super().__init__()
        self.encoder = SplitEncoder(encoder, pretrained_path)
        ch = self.encoder.channels
        block = {"kernel": bifpn_depthwise_kernel, "act": bifpn_act, "bn_momentum": bifpn_bn_momentum,
                 "bn_eps": bifpn_bn_eps}
        self.bifpn = BiFPN([ch[4], ch[8], ch[16]], bifpn_filters, bifpn_repeats, bifpn_levels, block,
                           bifpn_downsample, bifpn_lateral, bifpn_top_inputs)
        self.heatmap_head = nn.Conv2d(bifpn_filters, N_LANDMARKS, 3, padding=1)
        self.fusion = nn.Conv2d(N_LANDMARKS + bifpn_filters + ch[16], ch[16], 1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.shape_head = mlp_head(ch[32], N_SHAPE_HEAD, hidden, dropout)
        self.pose_head = mlp_head(ch[32], N_POSE_HEAD, hidden, dropout)
        self.landmark_head = mlp_head(ch[32], N_LANDMARKS * 2, hidden, dropout)
        self._init_outputs(init_scale)

    def _init_outputs(self, init_scale: float) -> None:
        """Near-zero 3DMM coefficients, a frontal head at the centre, landmarks at the centre,
        heatmaps at a low prior."""
        for head in (self.shape_head, self.pose_head, self.landmark_head):
            nn.init.normal_(head[-1].weight, std=1e-3)
            nn.init.zeros_(head[-1].bias)
        nn.init.constant_(self.landmark_head[-1].bias, 0.5)
        nn.init.constant_(self.heatmap_head.bias, math.log(HEATMAP_PRIOR / (1 - HEATMAP_PRIOR)))
        self.set_pose_prior({"scale": init_scale, "tx": 0.0, "ty": 0.0}, torch.tensor(FRONTAL_ROT6D))

    @torch.no_grad()
    def set_pose_prior(self, prior: dict, rot6d: Tensor | None = None) -> None:
        """Set the pose head's output bias to a pose prior {"scale" s, "tx", "ty"} (:func:`pose_prior`;
        s stored as s - 1) and the rotation to ``rot6d`` [6] (None: it stays)."""
        rot6d = self.pose_head[-1].bias[:6].clone() if rot6d is None else rot6d
        bias = torch.cat([rot6d.float(), torch.tensor([prior["tx"], prior["ty"]]).float(), torch.zeros(1),
                          torch.tensor([prior["scale"] - 1.0])])
        self.pose_head[-1].bias.copy_(bias)

    def forward(self, image: Tensor) -> dict[str, Tensor]:
        f4, f8, f16 = self.encoder.forward_to_16(image)
        p4, _, p16, *_ = self.bifpn([f4, f8, f16])
        heatmaps = self.heatmap_head(p4)
        hm16 = F.interpolate(torch.sigmoid(heatmaps), size=f16.shape[-2:], mode="bilinear", align_corners=False)
        fused = f16 * self.fusion(torch.cat([hm16, p16, f16], dim=1))
        feat = self.pool(self.encoder.forward_last(fused)).flatten(1)
        shape = torch.tanh(self.shape_head(feat)) * 3.0
        params = torch.cat([shape, self.pose_head(feat)], dim=1)
        landmarks = F.relu(self.landmark_head(feat)).view(-1, N_LANDMARKS, 2)
        return {"params_3dmm": params, "landmarks_2d": landmarks, "heatmaps": heatmaps}


MODELS = {"dad3dnet": DAD3DNet}


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bfloat16 natively (e.g. AVX512-BF16, AMX); elsewhere autocast
    emulates it and is slower than fp32."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def create_model(cfg: ModelSettings | dict) -> nn.Module:
    """A model from its settings, or from plain config data: ``{"name": "dad3dnet", "encoder": ...,
    "bifpn_filters": ..., "hidden": ..., ...}`` (the model section of params: any key of
    :class:`dad3dlib.settings.ModelSettings`, which refuses unknown keys and bad values and fills in
    the defaults)."""
    if isinstance(cfg, dict):
        cfg = ModelSettings.parse(cfg, "model")
    if cfg.name not in MODELS:
        raise InputValueError(f"unknown model '{cfg.name}' (known: {sorted(MODELS)})")
    return MODELS[cfg.name](**cfg.network())


# --------------------------------------------------------------------------------------------
# Training checkpoints and the pose prior
# --------------------------------------------------------------------------------------------
def checkpoint_step(path: Path) -> int | None:
    """The global step a training checkpoint was written at; None when it cannot be read."""
    try:
        return int(torch.load(path, map_location="cpu", weights_only=True)["global_step"])
    except LOAD_ERRORS:  # no file, a damaged one, one without a step (KeyError, TypeError)
        return None


def load_model(ckpt: str | Path, map_location: str = "cpu") -> tuple[nn.Module, dict]:
    """The network of a training checkpoint (eval mode) and its params; FLAME is not needed."""
    ckpt = Path(ckpt)
    try:
        data = torch.load(ckpt, map_location=map_location, weights_only=True)
    except LOAD_ERRORS as e:
        raise InputValueError(f"{ckpt}: cannot read checkpoint ({type(e).__name__}: {e})") from e
    if not isinstance(data, dict) or not {"hyper_parameters", "state_dict"} <= set(data):
        raise InputValueError(f"{ckpt}: not a training checkpoint (no hyper_parameters and state_dict)")
    params = data["hyper_parameters"]["params"]
    model = create_model(replace(ModelSettings.parse(params["model"], str(ckpt)), pretrained_path=None))
    prefix = "model."
    model.load_state_dict({k[len(prefix):]: v for k, v in data["state_dict"].items() if k.startswith(prefix)})
    return model.eval(), params


@torch.no_grad()
def pose_prior(dataset: torch.utils.data.Dataset, n: int, crop_size: int) -> dict:
    """The median weak-perspective scale and translation of the first ``n`` samples of a dataset
    (their ground truth fitted by :func:`dad3dlib.flame.fit_weak_perspective`): {"scale", "tx", "ty"}."""
    items = [dataset[i] for i in range(min(n, len(dataset)))]
    stack = lambda k: torch.stack([torch.as_tensor(it[k]) for it in items]).float()  # noqa: E731
    s, t = fit_weak_perspective(stack("vertices_model"), stack("rotation"), stack("vertices_crop"), crop_size)
    scale, trans = s.median(), t.median(0).values
    return {"scale": float(scale), "tx": float(trans[0]), "ty": float(trans[1])}
