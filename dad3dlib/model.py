"""DAD-3DNet (docs/ARCHITECTURE.md): timm encoder, BiFPN, heatmap head, fusion, shape/pose/landmark heads.

The encoder is any timm CNN created with ``features_only=True`` (never downloaded: weights come
only from a local file). It runs to its stride-16 stage; a BiFPN fuses its stride-4/8/16 maps; a
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
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .flame import N_3DMM, N_EXPR, N_JAW, N_SHAPE

N_LANDMARKS = 68
N_SHAPE_HEAD = N_SHAPE + N_EXPR + N_JAW  # 403, tanh * 3
N_POSE_HEAD = N_3DMM - N_SHAPE_HEAD      # 10: rot6d, translation, scale - 1
FRONTAL_ROT6D = (1.0, 0.0, 0.0, 0.0, -1.0, 0.0)  # R = diag(1,-1,-1): a head facing the camera
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
            raise ValueError(f"encoder '{name}': timm feature class {kind} is not supported "
                             f"(supported: {sorted(_SEQUENCERS)})")
        info = enc.feature_info
        taps = {r: m.replace(".", "_") for r, m in zip(info.reduction(), info.module_name())}
        missing = [r for r in (4, 8, 16, 32) if r not in taps]
        if missing:
            raise ValueError(f"encoder '{name}' has no feature stage at stride(s) {missing}")
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
        raise FileNotFoundError(f"{path}: pretrained weights file not found")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd = load_file(str(path))
        else:
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"{path}: cannot read weights ({type(e).__name__}: {e})") from e
    for key in ("state_dict", "model"):
        if isinstance(sd, dict) and isinstance(sd.get(key), dict):
            sd = sd[key]
    if not isinstance(sd, dict):
        raise ValueError(f"{path}: expected a state dict, got {type(sd).__name__}")
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
        raise ValueError(f"{path}: {len(missing)} encoder tensors missing or of another shape, "
                         f"e.g. {missing[:3]}")
    enc.load_state_dict(loaded)


# --------------------------------------------------------------------------------------------
# BiFPN over strides 4, 8, 16
# --------------------------------------------------------------------------------------------
class SeparableConvBlock(nn.Sequential):
    """Depthwise 3x3 + pointwise 1x1 + BN + SiLU, channels kept."""

    def __init__(self, channels: int):
        super().__init__(
            nn.Conv2d(channels, channels, 3, padding=1, groups=channels, bias=False),
            nn.Conv2d(channels, channels, 1, bias=False),
            nn.BatchNorm2d(channels),
            nn.SiLU(inplace=True),
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
    """One bidirectional pass over three levels [fine, mid, coarse], each [B,F,h_l,w_l]."""

    def __init__(self, filters: int):
        super().__init__()
        self.td_mid, self.td_fine = WeightedSum(2), WeightedSum(2)
        self.bu_mid, self.bu_coarse = WeightedSum(3), WeightedSum(2)
        self.conv = nn.ModuleDict({k: SeparableConvBlock(filters)
                                   for k in ("td_mid", "out_fine", "out_mid", "out_coarse")})

    @staticmethod
    def _up(x: Tensor, ref: Tensor) -> Tensor:
        return F.interpolate(x, size=ref.shape[-2:], mode="nearest")

    @staticmethod
    def _down(x: Tensor, ref: Tensor) -> Tensor:
        return F.adaptive_max_pool2d(x, ref.shape[-2:])

    def forward(self, feats: list[Tensor]) -> list[Tensor]:
        fine, mid, coarse = feats
        mid_td = self.conv["td_mid"](self.td_mid([mid, self._up(coarse, mid)]))
        fine_out = self.conv["out_fine"](self.td_fine([fine, self._up(mid_td, fine)]))
        mid_out = self.conv["out_mid"](self.bu_mid([mid, mid_td, self._down(fine_out, mid)]))
        coarse_out = self.conv["out_coarse"](self.bu_coarse([coarse, self._down(mid_out, coarse)]))
        return [fine_out, mid_out, coarse_out]


class BiFPN(nn.Module):
    """1x1 lateral projections to ``filters`` channels, then ``repeats`` BiFPN layers.

    feats: three maps [B,C_l,h_l,w_l] (strides 4, 8, 16) -> three maps [B,filters,h_l,w_l]
    """

    def __init__(self, in_channels: list[int], filters: int = 256, repeats: int = 1):
        super().__init__()
        self.lateral = nn.ModuleList(
            nn.Sequential(nn.Conv2d(c, filters, 1, bias=False), nn.BatchNorm2d(filters)) for c in in_channels)
        self.layers = nn.Sequential(*(BiFPNLayer(filters) for _ in range(repeats)))

    def forward(self, feats: list[Tensor]) -> list[Tensor]:
        return self.layers([lat(f) for lat, f in zip(self.lateral, feats)])


# --------------------------------------------------------------------------------------------
# DAD-3DNet
# --------------------------------------------------------------------------------------------
def mlp_head(in_features: int, out_features: int, hidden: int = 512, dropout: float = 0.3) -> nn.Sequential:
    """Linear-ReLU-Dropout-Linear: [B,in] -> [B,out]."""
    return nn.Sequential(nn.Linear(in_features, hidden), nn.ReLU(inplace=True), nn.Dropout(dropout),
                         nn.Linear(hidden, out_features))


class DAD3DNet(nn.Module):
    """image [B,3,S,S] (S divisible by 32) -> dict(params_3dmm [B,413], landmarks_2d [B,68,2],
    heatmaps [B,68,S/4,S/4] logits).

    ``init_scale``: the weak-perspective scale s of the initial pose prediction (a frontal head at
    the crop centre); with FLAME metres and crop coordinates in [-1,1], a head filling the crop has
    s ~ 8-10. :meth:`set_pose_prior` replaces it with values fitted on data.
    """

    def __init__(self, encoder: str = "resnet50", bifpn_filters: int = 256, bifpn_repeats: int = 1,
                 hidden: int = 512, dropout: float = 0.3, init_scale: float = 8.0,
                 pretrained_path: str | Path | None = None):
        super().__init__()
        self.encoder = SplitEncoder(encoder, pretrained_path)
        ch = self.encoder.channels
        self.bifpn = BiFPN([ch[4], ch[8], ch[16]], bifpn_filters, bifpn_repeats)
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
        self.set_pose_prior(torch.tensor(FRONTAL_ROT6D), torch.zeros(2), init_scale)

    @torch.no_grad()
    def set_pose_prior(self, rot6d: Tensor, translation_xy: Tensor, scale: float) -> None:
        """Set the pose head's output bias: rot6d [6], translation_xy [2], scale s (stored s - 1)."""
        bias = torch.cat([rot6d.float(), translation_xy.float(), torch.zeros(1), torch.tensor([scale - 1.0])])
        self.pose_head[-1].bias.copy_(bias)

    def forward(self, image: Tensor) -> dict[str, Tensor]:
        f4, f8, f16 = self.encoder.forward_to_16(image)
        p4, _, p16 = self.bifpn([f4, f8, f16])
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


def create_model(cfg: dict) -> nn.Module:
    """A model from plain config data: ``{"name": "dad3dnet", "encoder": ..., "bifpn_filters": ...,
    "bifpn_repeats": ..., "hidden": ..., "dropout": ..., "init_scale": ..., "pretrained_path": ...}``
    (every key but ``encoder`` optional)."""
    cfg = dict(cfg)
    name = cfg.pop("name", "dad3dnet")
    if name not in MODELS:
        raise ValueError(f"unknown model '{name}' (known: {sorted(MODELS)})")
    try:
        return MODELS[name](**cfg)
    except TypeError as e:
        raise ValueError(f"model '{name}': bad config keys {sorted(cfg)} ({e})") from e
