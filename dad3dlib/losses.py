"""DAD-3DNet's four losses and their weighted sum (Martyniuk et al., CVPR 2022).

    L = λ1·L_3D + λ2·L_1 + λ3·L_proj + λ4·L_heatmap   (weights keys: l3d, l1, lproj, awing)

Each term is one record of :data:`LOSS_TERMS`: the key of its weight in ``loss.lambdas``, its display
name, the reference recipe's weight, the prediction it reads and its function, registered by
decorating the function (:func:`register_term`); every list of loss terms derives from the records.

A term whose weight is 0 is not computed at all. L_proj, the one term measured in pixels, uses
the units of the reference recipe's 256-px crop (:data:`REFERENCE_CROP`), so that a run at any crop
size weighs its terms as a 256-px run does: at 64 px a geometric error of one crop pixel counts as 4
reference pixels. L_1 (crop fractions), L_3D (unit cube) and the heatmap loss (per cell) do not
depend on the crop size. ``awing`` is λ4 for whichever heatmap loss is
chosen (Adaptive Wing by default, soft-IoU as an option).

Shapes: B batch, V vertices, K = 68 landmarks, S crop side, H×W heatmap size (S/4).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

L3D_SUBSET_WEIGHTS = {"head": 0.5, "face_w_ears": 0.75, "face": 1.0}
LPROJ_SUBSET_WEIGHTS = {"face": 0.5, "face_w_ears": 0.5}
REFERENCE_CROP = 256  # px: the crop side whose pixels measure L_proj


# --------------------------------------------------------------------------------------------
# L_3D
# --------------------------------------------------------------------------------------------
def normalize_unit_cube(points: Tensor) -> Tensor:
    """Per sample: subtract the per-axis min, subtract half the per-axis max, divide by the
    largest coordinate. [B,N,3] -> [B,N,3] centred, largest axis spanning [-1,1]."""
    p = points - points.amin(dim=1, keepdim=True)
    p = p - p.amax(dim=1, keepdim=True) / 2
    return p / p.amax(dim=(1, 2), keepdim=True).clamp_min(1e-12)


def shape_loss(pred: Tensor, target: Tensor, subsets: dict[str, Tensor],
               subset_weights: dict[str, float] = L3D_SUBSET_WEIGHTS) -> Tensor:
    """L_3D: sum over subsets of weight · MSE(unit-cube(pred[subset]), unit-cube(target[subset])).

    pred [B,V,3] canonical predicted vertices, target [B,V,3] GT model-space vertices,
    subsets name -> [n] vertex ids -> scalar
    """
    total = pred.new_zeros(())
    for name, w in subset_weights.items():
        idx = subsets[name]
        total = total + w * F.mse_loss(normalize_unit_cube(pred[:, idx]), normalize_unit_cube(target[:, idx]))
    return total


# --------------------------------------------------------------------------------------------
# L_proj
# --------------------------------------------------------------------------------------------
def reprojection_loss(pred: Tensor, target: Tensor, subsets: dict[str, Tensor],
                      subset_weights: dict[str, float] = LPROJ_SUBSET_WEIGHTS,
                      crop_size: float = REFERENCE_CROP) -> Tensor:
    """L_proj: sum over subsets of weight · smooth-L1 (mean) between vertex positions measured in
    pixels of a :data:`REFERENCE_CROP` crop (crop pixels × REFERENCE_CROP / ``crop_size``; a
    256-px crop is unchanged).

    pred [B,V,>=2] reprojected predicted vertices (x, y used), target [B,V,2] GT crop pixels,
    crop_size S of both -> scalar
    """
    k = REFERENCE_CROP / crop_size
    total = pred.new_zeros(())
    for name, w in subset_weights.items():
        idx = subsets[name]
        total = total + w * F.smooth_l1_loss(pred[:, idx, :2] * k, target[:, idx, :2] * k)
    return total


# --------------------------------------------------------------------------------------------
# L_1
# --------------------------------------------------------------------------------------------
def landmark_loss(pred: Tensor, target: Tensor, visibility: Tensor, crop_size: float) -> Tensor:
    """L_1: mean over all coordinates of visibility · smooth-L1(pred, target / S).

    pred [B,K,2] in [0,1] of the crop, target [B,K,2] crop pixels, visibility [B,K] {0,1} -> scalar
    """
    err = F.smooth_l1_loss(pred, target / crop_size, reduction="none")
    return (err * visibility[..., None].to(err.dtype)).mean()


# --------------------------------------------------------------------------------------------
# Heatmap losses (registry)
# --------------------------------------------------------------------------------------------
def dilate3x3(mask: Tensor) -> Tensor:
    """Binary 3x3 dilation over the last two dims (separable, on bool tensors). [...,H,W] -> [...,H,W]"""
    h = mask.clone()
    h[..., :, 1:] |= mask[..., :, :-1]
    h[..., :, :-1] |= mask[..., :, 1:]
    out = h.clone()
    out[..., 1:, :] |= h[..., :-1, :]
    out[..., :-1, :] |= h[..., 1:, :]
    return out


def adaptive_wing_loss(pred: Tensor, target: Tensor, alpha: float = 2.1, omega: float = 14.0,
                       epsilon: float = 1.0, theta: float = 0.5, w: float = 10.0,
                       fg_threshold: float = 0.2) -> Tensor:
    """Adaptive Wing loss (Wang et al., ICCV 2019) with its weighted loss map, mean over pixels.

        AWing = ω·ln(1 + |d/ε|^(α-y))   if |d| < θ,   A·|d| - C   otherwise (d = y - ŷ)

    with A, C making it continuous and smooth at θ; the map is W·M + 1 with M the 3x3-dilated
    foreground (target > fg_threshold). Everything that depends on the target only is computed
    without autograd.
    pred [B,K,H,W] heatmaps in [0,1], target [B,K,H,W] Gaussian heatmaps in [0,1] -> scalar
    """
    with torch.no_grad():
        power = alpha - target
        ratio = theta / epsilon
        ratio_pow = torch.pow(ratio, power)
        a = omega / (1 + ratio_pow) * power * ratio_pow / ratio / epsilon
        c = theta * a - omega * torch.log1p(ratio_pow)
        weight = dilate3x3(target > fg_threshold).to(pred.dtype) * w + 1
    diff = (target - pred).abs()
    loss = torch.where(diff < theta, omega * torch.log1p((diff / epsilon) ** power), a * diff - c)
    return (loss * weight).mean()


def soft_iou_loss(pred: Tensor, target: Tensor, eps: float = 1e-6) -> Tensor:
    """1 - soft IoU per heatmap, averaged: 1 - Σp·t / (Σ(p + t - p·t) + eps).

    pred [B,K,H,W] in [0,1], target [B,K,H,W] in [0,1] -> scalar (0 for equal binary maps)
    """
    inter = (pred * target).sum(dim=(-2, -1))
    union = (pred + target - pred * target).sum(dim=(-2, -1))
    return (1 - inter / (union + eps)).mean()


HEATMAP_LOSSES = {"awing": adaptive_wing_loss, "soft_iou": soft_iou_loss}


# --------------------------------------------------------------------------------------------
# The terms: one registered record each
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LossTerm:
    """A term of the objective: the key of its weight in ``loss.lambdas``, its display name, the
    reference recipe's weight, the prediction it reads (a key of what ``train.DADModule``
    predicts) and ``fn(loss: DADLoss, pred, batch) -> unweighted scalar``."""
    name: str
    label: str
    reference_weight: float
    needs: str
    fn: Callable


LOSS_TERMS: dict[str, LossTerm] = {}  # in registration order: λ1..λ4


def register_term(name: str, label: str, reference_weight: float, needs: str):
    """Decorator: register ``fn(loss, pred, batch) -> scalar`` as the term ``name`` (see :class:`LossTerm`)."""
    if name in LOSS_TERMS:
        raise KeyError(f"loss term '{name}' is registered already")

    def add(fn):
        LOSS_TERMS[name] = LossTerm(name, label, float(reference_weight), needs, fn)
        return fn
    return add


@register_term("l3d", "L_3D", 50.0, needs="vertices_canonical")
def _l3d(loss, p, b):
    return shape_loss(p["vertices_canonical"].float(), b["vertices_model"], loss.subsets)


@register_term("l1", "L_1", 100.0, needs="landmarks_2d")
def _l1(loss, p, b):
    return landmark_loss(p["landmarks_2d"].float(), b["landmarks_2d"], b["visibility"], b["image"].shape[-1])


@register_term("lproj", "L_proj", 0.05, needs="vertices_reprojected")
def _lproj(loss, p, b):
    return reprojection_loss(p["vertices_reprojected"].float(), b["vertices_crop"], loss.subsets,
                             crop_size=b["image"].shape[-1])


@register_term("awing", "L_AWing", 1.0, needs="heatmaps")
def _awing(loss, p, b):
    return loss.heatmap_loss(torch.sigmoid(p["heatmaps"].float()), b["heatmaps"])


def validate_lambdas(lambdas, source: str = "loss weights") -> dict:
    """The loss weights as floats: exactly the keys of :data:`LOSS_TERMS` (0 switches a term off), each
    finite and >= 0, not all zero; ValueError naming ``source`` otherwise. The one check of loss
    weights (params files, :class:`DADLoss`)."""
    names = tuple(LOSS_TERMS)
    if not isinstance(lambdas, dict):
        raise ValueError(f"{source}: loss.lambdas must be a mapping of {names}, got {lambdas!r}")
    unknown, missing = set(lambdas) - set(names), [k for k in names if k not in lambdas]
    if unknown:
        raise ValueError(f"{source}: unknown loss weight(s) {sorted(unknown)}; expected {names}")
    if missing:
        raise ValueError(f"{source}: loss.lambdas misses {missing}; list all of {names} (0 switches a term off)")
    for k, v in lambdas.items():
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or v < 0:
            raise ValueError(f"{source}: loss.lambdas.{k} must be a finite number >= 0, got {v!r}")
    if not any(lambdas.values()):
        raise ValueError(f"{source}: all loss weights are zero; nothing would be trained")
    return {k: float(lambdas[k]) for k in names}


# --------------------------------------------------------------------------------------------
# The weighted total
# --------------------------------------------------------------------------------------------
class DADLoss(nn.Module):
    """Weighted sum of the active terms (:data:`LOSS_TERMS`, in their order).

    forward(pred, batch) -> (total scalar, {term: weighted scalar} for the active terms).
    ``pred`` holds what the active terms read (see :attr:`needs`):
      ``vertices_canonical`` [B,V,3] (l3d), ``vertices_reprojected`` [B,V,>=2] crop pixels (lproj),
      ``landmarks_2d`` [B,K,2] in [0,1] (l1), ``heatmaps`` [B,K,H,W] logits (awing).
    ``batch`` holds the data keys of docs/ARCHITECTURE.md: ``vertices_model``, ``vertices_crop``,
    ``landmarks_2d``, ``visibility``, ``heatmaps``, ``image`` (for the crop size S).
    ``subsets``: "face", "face_w_ears", "head" -> [n] vertex ids (e.g. from FlameLayer.subset).
    """

    def __init__(self, weights: dict, subsets: dict[str, Tensor], heatmap_loss: str = "awing"):
        super().__init__()
        self.weights = {k: v for k, v in validate_lambdas(weights).items() if v > 0}
        if heatmap_loss not in HEATMAP_LOSSES:
            raise ValueError(f"unknown heatmap loss '{heatmap_loss}' (known: {sorted(HEATMAP_LOSSES)})")
        self.heatmap_loss = HEATMAP_LOSSES[heatmap_loss]
        for name in L3D_SUBSET_WEIGHTS:
            self.register_buffer(f"subset_{name}", torch.as_tensor(subsets[name], dtype=torch.long),
                                 persistent=False)

    @property
    def subsets(self) -> dict[str, Tensor]:
        return {name: getattr(self, f"subset_{name}") for name in L3D_SUBSET_WEIGHTS}

    @property
    def needs(self) -> set[str]:
        """Prediction keys the active terms read."""
        return {LOSS_TERMS[k].needs for k in self.weights}

    def forward(self, pred: dict, batch: dict) -> tuple[Tensor, dict[str, Tensor]]:
        terms = {k: w * LOSS_TERMS[k].fn(self, pred, batch) for k, w in self.weights.items()}
        return sum(terms.values()), terms
