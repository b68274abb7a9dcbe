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

from .errors import InputValueError

L3D_SUBSET_WEIGHTS = {"head": 0.5, "face_w_ears": 0.75, "face": 1.0}
LPROJ_SUBSET_WEIGHTS = {"face": 0.5, "face_w_ears": 0.5}
REFERENCE_CROP = 256  # px: the crop side whose pixels measure L_proj


# --------------------------------------------------------------------------------------------
# Vertex subsets
# --------------------------------------------------------------------------------------------
class VertexSubsets(nn.Module):
    """Named vertex subsets, taken from a batch of points with as few gathers as possible: when
    the subsets nest (FLAME's face ⊂ head ⊂ face_w_ears; the synthetic head's face ⊂ face_w_ears ⊂
    head), their vertices are ordered once so that each subset is a prefix of the largest, and one
    gather serves them all. Otherwise one gather per subset. The ids are buffers (they move with the
    module) and stay out of state dicts.

    subsets: name -> [n] vertex ids (any order; a subset's points come in the order of its ids
    unless the subsets nest).
    """

    def __init__(self, subsets: dict):
        super().__init__()
        ids = {k: torch.as_tensor(v, dtype=torch.long).cpu() for k, v in subsets.items()}
        self.names = list(ids)
        chain = sorted(ids, key=lambda k: len(ids[k]))
        sets = [set(ids[k].tolist()) for k in chain]
        self.nested = all(a <= b for a, b in zip(sets, sets[1:]))
        if self.nested:
            order, seen = [], set()
            for k in chain:
                order += [i for i in ids[k].tolist() if i not in seen]
                seen.update(ids[k].tolist())
            self.register_buffer("order", torch.tensor(order, dtype=torch.long), persistent=False)
            self.sizes = {k: len(ids[k]) for k in self.names}
        for k, v in ids.items():
            self.register_buffer(f"ids_{k}", v, persistent=False)

    def ids(self, name: str) -> Tensor:
        return getattr(self, f"ids_{name}")

    @property
    def union(self) -> Tensor | None:
        """The ids of every subset's vertices, in the order of the one gather ([U]; None when the
        subsets do not nest). Points computed for these vertices alone (``FlameLayer.select_vertices``)
        are taken without a gather."""
        return self.order if self.nested else None

    def take(self, points: Tensor, names, dim: int = 1, gathered: bool = False) -> dict[str, Tensor]:
        """points [...,V,...] (vertices along ``dim``), or, ``gathered``, [...,U,...] holding
        :attr:`union` -> {name: [...,n,...]}, views of one gather (or of none) when the subsets nest."""
        if gathered:
            if self.union is None or points.shape[dim] != len(self.union):
                raise ValueError(f"points with {points.shape[dim]} vertices are not the subsets' union "
                                 f"({None if self.union is None else len(self.union)} vertices)")
            taken = points
        elif self.nested:
            taken = points.index_select(dim, self.order[: max(self.sizes[k] for k in names)])
        else:
            return {k: points.index_select(dim, self.ids(k)) for k in names}
        return {k: taken.narrow(dim, 0, self.sizes[k]) for k in names}


def as_vertex_subsets(subsets) -> VertexSubsets:
    """A :class:`VertexSubsets` as it is, or made from a dict name -> ids."""
    if isinstance(subsets, VertexSubsets):
        return subsets
    first = next(iter(subsets.values()))
    return VertexSubsets(subsets).to(first.device if torch.is_tensor(first) else "cpu")


# --------------------------------------------------------------------------------------------
# L_3D
# --------------------------------------------------------------------------------------------
def normalize_unit_cube(points: Tensor, dim: int = 1) -> Tensor:
    """Per sample: subtract the per-axis min, subtract half the per-axis max, divide by the
    largest coordinate; that is, centre each axis's range on 0 and divide by half the longest
    range. [B,N,3] (points along ``dim`` 1; ``dim`` -1: [B,3,N]) -> the same shape, centred, the
    largest axis spanning [-1,1]."""
    axes = 2 if dim == 1 else 1
    lo, hi = points.amin(dim=dim, keepdim=True), points.amax(dim=dim, keepdim=True)
    half = (hi - lo).amax(dim=axes, keepdim=True) / 2
    return (points - (lo + hi) / 2) / half.clamp_min(1e-12)


def shape_loss(pred: Tensor, target: Tensor, subsets,
               subset_weights: dict[str, float] = L3D_SUBSET_WEIGHTS) -> Tensor:
    """L_3D: sum over subsets of weight · MSE(unit-cube(pred[subset]), unit-cube(target[subset])).

    pred [B,V,3] canonical predicted vertices (or [B,U,3], the subsets' union
    :attr:`VertexSubsets.union` alone, as training computes it), target [B,V,3] GT model-space
    vertices, subsets name -> [n] vertex ids, or a :class:`VertexSubsets` -> scalar. The target's
    side is computed without autograd; the points are reduced in a [B,3,n] layout (contiguous
    reductions), and each subset's term forms its gradient with its value (:class:`_UnitCubeMSE`).
    """
    subsets, names = as_vertex_subsets(subsets), list(subset_weights)
    p = subsets.take(pred.transpose(1, 2), names, dim=2, gathered=pred.shape[1] != target.shape[1])  # {name: [B,3,n]}
    with torch.no_grad():
        t = subsets.take(target.transpose(1, 2), names, dim=2)
        t = {k: normalize_unit_cube(v, dim=-1) for k, v in t.items()}
    total = pred.new_zeros(())
    for name, w in subset_weights.items():
        total = total + w * _UnitCubeMSE.apply(p[name], t[name])
    return total


class _UnitCubeMSE(torch.autograd.Function):
    """MSE(unit-cube(p), t) for p [B,3,n] (points along the last dim), t [B,3,n] -> scalar, with its
    gradient in p formed in the forward pass from what it computes anyway.

    With y = (p - c) / h (c = (lo + hi) / 2 per axis, h = half the longest axis range) and
    g = dL/dy = 2 (y - t) / N, the gradient is g / h, plus, at each axis's min and max point, the
    part that flows through c (half of -Σ g / h each) and, on the longest axis, through h
    (∓ half of Σ g·y / h). Autograd's chain over ``amin``/``amax`` takes several passes over the
    points per step; this takes two. Where several points tie for a min or max, autograd splits
    that part among them and this gives it to one (both are valid subgradients); elsewhere the two
    agree (``tests/test_losses.py``, with ``gradcheck``)."""

    @staticmethod
    def forward(ctx, p, t):
        lo, i_lo = p.min(dim=-1, keepdim=True)                      # [B,3,1]
        hi, i_hi = p.max(dim=-1, keepdim=True)
        half, axis = ((hi - lo) / 2).max(dim=1, keepdim=True)       # [B,1,1]
        half = half.clamp_min(1e-12)
        y = (p - (lo + hi) / 2).div_(half)
        r = y - t
        loss = r.pow(2).mean()
        if ctx.needs_input_grad[0]:
            g = r.mul_(2 / r.numel()).div_(half)                    # dL/dp through y alone
            d_centre = -g.sum(-1, keepdim=True)                     # [B,3,1]
            d_half = -(g * y).sum((1, 2), keepdim=True)             # [B,1,1]
            longest = torch.zeros_like(lo).scatter_(1, axis, 1.0)   # [B,3,1] one-hot
            g.scatter_add_(-1, i_lo, d_centre / 2 - longest * d_half / 2)
            g.scatter_add_(-1, i_hi, d_centre / 2 + longest * d_half / 2)
            ctx.save_for_backward(g)
        return loss

    @staticmethod
    def backward(ctx, grad):
        (g,) = ctx.saved_tensors
        return grad * g, None


# --------------------------------------------------------------------------------------------
# L_proj
# --------------------------------------------------------------------------------------------
def reprojection_loss(pred: Tensor, target: Tensor, subsets,
                      subset_weights: dict[str, float] = LPROJ_SUBSET_WEIGHTS,
                      crop_size: float = REFERENCE_CROP) -> Tensor:
    """L_proj: sum over subsets of weight · smooth-L1 (mean) between vertex positions measured in
    pixels of a :data:`REFERENCE_CROP` crop (crop pixels × REFERENCE_CROP / ``crop_size``; a
    256-px crop is unchanged).

    pred [B,V,>=2] reprojected predicted vertices (x, y used; or [B,U,>=2] as :func:`shape_loss`'s),
    target [B,V,2] GT crop pixels, subsets as :func:`shape_loss`'s, crop_size S of both -> scalar.
    Reduced in a [B,2,n] layout, as :func:`shape_loss`.
    """
    k = REFERENCE_CROP / crop_size
    subsets, names = as_vertex_subsets(subsets), list(subset_weights)
    p = subsets.take(pred.transpose(1, 2)[:, :2], names, dim=2, gathered=pred.shape[1] != target.shape[1])  # [B,2,n]
    t = subsets.take(target.transpose(1, 2)[:, :2], names, dim=2)
    total = pred.new_zeros(())
    for name, w in subset_weights.items():
        total = total + w * F.smooth_l1_loss(p[name] * k, t[name] * k)
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
    """Binary 3x3 dilation over the last two dims of a 0/1 (or bool) map: a separable 3x3 max
    filter. [...,H,W] -> [...,H,W] float"""
    m = mask.float()
    h = m.clone()
    torch.maximum(h[..., :, 1:], m[..., :, :-1], out=h[..., :, 1:])
    torch.maximum(h[..., :, :-1], m[..., :, 1:], out=h[..., :, :-1])
    out = h.clone()
    torch.maximum(out[..., 1:, :], h[..., :-1, :], out=out[..., 1:, :])
    torch.maximum(out[..., :-1, :], h[..., 1:, :], out=out[..., :-1, :])
    return out


def adaptive_wing_loss(pred: Tensor, target: Tensor, alpha: float = 2.1, omega: float = 14.0,
                       epsilon: float = 1.0, theta: float = 0.5, w: float = 10.0,
                       fg_threshold: float = 0.2) -> Tensor:
    """Adaptive Wing loss (Wang et al., ICCV 2019) with its weighted loss map, mean over pixels.

        AWing = ω·ln(1 + |d/ε|^(α-y))   if |d| < θ,   A·|d| - C   otherwise (d = y - ŷ)

    with A, C making it continuous and smooth at θ; the map is W·M + 1 with M the 3x3-dilated
    foreground (target > fg_threshold). Everything that depends on the target only is computed
    without autograd, and the gradient is formed with the loss (:class:`_AdaptiveWing`): one
    pass over the maps instead of autograd's chain of elementwise steps.
    pred [B,K,H,W] heatmaps in [0,1], target [B,K,H,W] Gaussian heatmaps in [0,1] -> scalar
    """
    with torch.no_grad():  # in place where it can be: each new map of a 64-px batch is ~2 MB
        power = alpha - target
        ratio = theta / epsilon
        ratio_pow = torch.mul(power, math.log(ratio)).exp_()                 # ratio^power
        a = ratio_pow.add(1).reciprocal_().mul_(ratio_pow).mul_(power).mul_(omega / (ratio * epsilon))
        c = torch.log1p(ratio_pow).mul_(-omega).add_(a, alpha=theta)          # theta·a - omega·ln(1 + ratio^power)
        foreground = (target - fg_threshold).sign_().clamp_(min=0)    # 1 where target > fg_threshold
        weight = dilate3x3(foreground).mul_(w).add_(1)
    return _AdaptiveWing.apply(pred, target, power, a, c, weight, omega, epsilon, theta)


class _AdaptiveWing(torch.autograd.Function):
    """mean(weight · AWing(|target - pred|)) and its gradient in pred, which the forward pass forms
    from what it computes anyway: d/d|d| is ω·p·x^(p-1) / (ε·(1 + x^p)) with x = |d|/ε below θ, A
    above. Branches are blended with a 0/1 mask (``lerp``), which CPUs run much faster than
    ``torch.where``. ``tests/test_losses.py`` checks value and gradient against autograd of the
    formula."""

    @staticmethod
    def forward(ctx, pred, target, power, a, c, weight, omega, epsilon, theta):
        d = pred - target
        diff = d.abs()
        xp = torch.log(diff / epsilon).mul_(power).exp_()           # x^p, 0 at x = 0 (p > 0)
        small = (theta - diff).sign_().clamp_(min=0)                  # 1 below theta (the branches meet at it)
        loss = torch.lerp(torch.mul(a, diff).sub_(c), torch.log1p(xp).mul_(omega), small)
        if ctx.needs_input_grad[0]:
            steep = torch.mul(power, xp).mul_(omega).div_(xp.add(1).mul_(diff).clamp_min_(1e-30))
            slope = torch.lerp(a, steep, small)
            ctx.save_for_backward(slope.mul_(weight).copysign_(d).div_(d.numel()))
        return loss.mul_(weight).mean()

    @staticmethod
    def backward(ctx, grad):
        (g,) = ctx.saved_tensors
        return grad * g, None, None, None, None, None, None, None, None


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
    reference recipe's weight, the prediction it reads (a key of what ``lightning_module.DADModule``
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
    return shape_loss(p["vertices_canonical"].float(), b["vertices_model"], loss.vertex_subsets)


@register_term("l1", "L_1", 100.0, needs="landmarks_2d")
def _l1(loss, p, b):
    return landmark_loss(p["landmarks_2d"].float(), b["landmarks_2d"], b["visibility"], b["image"].shape[-1])


@register_term("lproj", "L_proj", 0.05, needs="vertices_reprojected")
def _lproj(loss, p, b):
    return reprojection_loss(p["vertices_reprojected"].float(), b["vertices_crop"], loss.vertex_subsets,
                             crop_size=b["image"].shape[-1])


@register_term("awing", "L_AWing", 1.0, needs="heatmaps")
def _awing(loss, p, b):
    return loss.heatmap_loss(torch.sigmoid(p["heatmaps"].float()), b["heatmaps"])


def validate_lambdas(lambdas, source: str | None = "loss weights") -> dict:
    """The loss weights as floats: exactly the keys of :data:`LOSS_TERMS` (0 switches a term off), each
    finite and >= 0, not all zero; InputValueError naming ``source`` (None: the message alone)
    otherwise. The one check of loss weights (params files, :class:`DADLoss`)."""
    names, at = tuple(LOSS_TERMS), f"{source}: " if source else ""
    if not isinstance(lambdas, dict):
        raise InputValueError(f"{at}loss.lambdas must be a mapping of {names}, got {lambdas!r}")
    unknown, missing = set(lambdas) - set(names), [k for k in names if k not in lambdas]
    if unknown:
        raise InputValueError(f"{at}unknown loss weight(s) {sorted(unknown)}; expected {names}")
    if missing:
        raise InputValueError(f"{at}loss.lambdas misses {missing}; list all of {names} (0 switches a term off)")
    for k, v in lambdas.items():
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or v < 0:
            raise InputValueError(f"{at}loss.lambdas.{k} must be a finite number >= 0, got {v!r}")
    if not any(lambdas.values()):
        raise InputValueError(f"{at}all loss weights are zero; nothing would be trained")
    return {k: float(lambdas[k]) for k in names}


# --------------------------------------------------------------------------------------------
# The weighted total
# --------------------------------------------------------------------------------------------
class DADLoss(nn.Module):
    """Weighted sum of the active terms (:data:`LOSS_TERMS`, in their order).

    forward(pred, batch) -> (total scalar, {term: weighted scalar} for the active terms);
    :meth:`terms` gives unweighted terms (any of them), :meth:`combine` weighs and sums them.
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
            raise InputValueError(f"unknown heatmap loss '{heatmap_loss}' (known: {sorted(HEATMAP_LOSSES)})")
        self.heatmap_loss = HEATMAP_LOSSES[heatmap_loss]
        self.vertex_subsets = VertexSubsets({name: subsets[name] for name in L3D_SUBSET_WEIGHTS})

    @property
    def subsets(self) -> dict[str, Tensor]:
        return {name: self.vertex_subsets.ids(name) for name in L3D_SUBSET_WEIGHTS}

    @property
    def needs(self) -> set[str]:
        """Prediction keys the active terms read."""
        return {LOSS_TERMS[k].needs for k in self.weights}

    def terms(self, pred: dict, batch: dict, names=None) -> dict[str, Tensor]:
        """The unweighted terms ``names`` (default: the active ones; any registered term can be
        computed, e.g. at validation, given the predictions it reads) -> {term: scalar}."""
        return {k: LOSS_TERMS[k].fn(self, pred, batch) for k in (self.weights if names is None else names)}

    def combine(self, raw: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        """Unweighted terms (at least the active ones) -> (total, {active term: weighted scalar})."""
        weighted = {k: w * raw[k] for k, w in self.weights.items()}
        return sum(weighted.values()), weighted

    def forward(self, pred: dict, batch: dict) -> tuple[Tensor, dict[str, Tensor]]:
        return self.combine(self.terms(pred, batch))
