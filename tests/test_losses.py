"""The four DAD-3DNet losses against hand-computed values, zero at equality, and gradient routing."""
from __future__ import annotations

import math

import pytest
import torch

from conftest import tiny_flame_assets
from dad3dlib.flame import FlameLayer, split_3dmm
from dad3dlib.losses import (L3D_SUBSET_WEIGHTS, LOSS_TERMS, DADLoss, VertexSubsets, adaptive_wing_loss, dilate3x3,
                             landmark_loss, normalize_unit_cube, reprojection_loss, shape_loss, soft_iou_loss)

ALL_ONE = {"face": torch.tensor([0, 1]), "face_w_ears": torch.tensor([0, 1]), "head": torch.tensor([0, 1])}
WEIGHTS = {"l3d": 50.0, "l1": 100.0, "lproj": 0.05, "awing": 1.0}


# --------------------------------------------------------------------------------------------
# Hand-computed values
# --------------------------------------------------------------------------------------------
def test_normalize_unit_cube_hand_computed():
    pts = torch.tensor([[[0.0, 0, 0], [2, 4, 6]]])
    expect = torch.tensor([[[-1 / 3, -2 / 3, -1.0], [1 / 3, 2 / 3, 1.0]]])
    torch.testing.assert_close(normalize_unit_cube(pts), expect)


def test_shape_loss_hand_computed():
    pred = torch.tensor([[[0.0, 0, 0], [2, 4, 6]]])
    target = torch.tensor([[[0.0, 0, 0], [2, 4, 3]]])
    # normalized: pred (±1/3, ±2/3, ±1), target (±1/2, ±1, ±3/4) -> squared errors 1/36, 1/9, 1/16
    mse = (1 / 36 + 1 / 9 + 1 / 16) / 3
    expect = (0.5 + 0.75 + 1.0) * mse
    assert shape_loss(pred, target, ALL_ONE).item() == pytest.approx(expect, rel=1e-6)


def test_shape_loss_invariant_to_scale_and_translation():
    target = torch.randn(2, 30, 3)
    pred = target * 3.0 + torch.tensor([0.1, -2.0, 5.0])
    subsets = {"face": torch.arange(10), "face_w_ears": torch.arange(20), "head": torch.arange(5, 30)}
    assert shape_loss(pred, target, subsets).item() == pytest.approx(0.0, abs=1e-10)
    assert shape_loss(pred.flip(1), target, subsets).item() > 1e-3


def test_reprojection_loss_hand_computed():
    pred = torch.tensor([[[10.5, 23.0, 7.0], [5.0, 5.0, 1.0]]])   # z is ignored
    target = torch.tensor([[[10.0, 20.0], [5.0, 5.0]]])
    subsets = {"face": torch.tensor([0]), "face_w_ears": torch.tensor([0, 1])}
    # vertex 0: smooth-L1 of 0.5 -> 0.125 (quadratic), of 3 -> 2.5 (linear); vertex 1: 0
    face = (0.125 + 2.5) / 2
    face_w_ears = (0.125 + 2.5) / 4
    assert reprojection_loss(pred, target, subsets).item() == pytest.approx(0.5 * face + 0.5 * face_w_ears)


def test_reprojection_loss_is_in_reference_crop_pixels():
    """A 64-px run measures L_proj in 256-px units: the same geometric error as at 256 px gives the
    same loss; at 256 px (the default) nothing changes."""
    torch.manual_seed(0)
    subsets = {"face": torch.arange(5), "face_w_ears": torch.arange(10)}
    target = torch.rand(2, 10, 2) * 64
    pred = target + torch.randn(2, 10, 2) * 0.6  # both zones of smooth-L1 once scaled
    at64 = reprojection_loss(pred, target, subsets, crop_size=64)
    at256 = reprojection_loss(pred * 4, target * 4, subsets, crop_size=256)
    assert at64.item() == pytest.approx(at256.item(), rel=1e-6)
    assert reprojection_loss(pred * 4, target * 4, subsets).item() == at256.item()
    assert at64.item() > 3 * reprojection_loss(pred, target, subsets).item()  # not the crop-pixel loss


def test_landmark_loss_hand_computed_and_visibility_masked():
    pred = torch.tensor([[[0.1, 0.2], [0.5, 0.5]]])
    target = torch.tensor([[[10.0, 40.0], [0.0, 0.0]]])           # crop pixels, S = 100
    vis = torch.tensor([[1.0, 0.0]])
    # landmark 0: errors (0, 0.2) -> 0.5*0.04 = 0.02; landmark 1 is invisible
    assert landmark_loss(pred, target, vis, 100).item() == pytest.approx(0.02 / 4)
    assert landmark_loss(pred, target, torch.ones(1, 2), 100).item() == pytest.approx((0.02 + 0.25) / 4)


def _awing_hand(diff: float, y: float) -> float:
    alpha, omega, eps, theta = 2.1, 14.0, 1.0, 0.5
    if diff < theta:
        return omega * math.log(1 + (diff / eps) ** (alpha - y))
    a = omega / (1 + (theta / eps) ** (alpha - y)) * (alpha - y) * (theta / eps) ** (alpha - y - 1) / eps
    c = theta * a - omega * math.log(1 + (theta / eps) ** (alpha - y))
    return a * diff - c


def test_adaptive_wing_hand_computed_with_loss_map():
    target = torch.tensor([1.0, 0.0, 0.0, 0.0, 0.0]).view(1, 1, 1, 5)
    pred = torch.tensor([0.8, 0.3, 0.0, 0.6, 0.3]).view(1, 1, 1, 5)
    # 3x3 dilation of the foreground (pixel 0) covers pixels 0 and 1: weight 10 + 1 there, 1 elsewhere
    expect = (11 * _awing_hand(0.2, 1.0) + 11 * _awing_hand(0.3, 0.0) + 0.0
              + _awing_hand(0.6, 0.0) + _awing_hand(0.3, 0.0)) / 5
    assert adaptive_wing_loss(pred, target).item() == pytest.approx(expect, rel=1e-5)
    # 14*ln(1 + 0.3^2.1), worked by hand
    assert _awing_hand(0.3, 0.0) == pytest.approx(1.0750, abs=1e-3)


def test_adaptive_wing_is_continuous_at_theta():
    target = torch.full((1, 1, 1, 2), 0.3)
    pred = target + torch.tensor([0.5 - 1e-6, 0.5 + 1e-6]).view(1, 1, 1, 2)
    a, b = torch.stack([adaptive_wing_loss(pred[..., i:i + 1], target[..., i:i + 1]) for i in range(2)])
    assert a.item() == pytest.approx(b.item(), abs=1e-3)  # slope ~ 11 * 12, step 2e-6


def test_soft_iou_hand_computed():
    pred = torch.tensor([[0.5, 1.0], [0.0, 0.0]]).view(1, 1, 2, 2)
    target = torch.tensor([[1.0, 1.0], [0.0, 0.0]]).view(1, 1, 2, 2)
    # intersection 1.5, union 1 + 1 = 2
    assert soft_iou_loss(pred, target).item() == pytest.approx(0.25, abs=1e-5)


# --------------------------------------------------------------------------------------------
# Zero at equality
# --------------------------------------------------------------------------------------------
def test_each_loss_is_zero_when_prediction_equals_target():
    torch.manual_seed(0)
    v = torch.randn(2, 30, 3)
    subsets = {"face": torch.arange(10), "face_w_ears": torch.arange(20), "head": torch.arange(5, 30)}
    assert shape_loss(v, v, subsets).item() == 0.0
    assert reprojection_loss(v, v[..., :2], subsets).item() == 0.0
    lmk = torch.rand(2, 68, 2) * 64
    assert landmark_loss(lmk / 64, lmk, torch.ones(2, 68), 64).item() == pytest.approx(0.0, abs=1e-12)
    hm = torch.rand(2, 68, 8, 8)
    assert adaptive_wing_loss(hm, hm).item() == 0.0
    binary = (hm > 0.5).float()
    assert soft_iou_loss(binary, binary).item() == pytest.approx(0.0, abs=1e-6)


# --------------------------------------------------------------------------------------------
# DADLoss: weights, skipped terms, gradient routing through FLAME
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad, message", [
    ({"l3d": -1.0, "l1": 1.0, "lproj": 1.0, "awing": 1.0}, "l3d must be a finite number >= 0, got -1.0"),
    ({"l3d": 0, "l1": 0, "lproj": 0, "awing": 0}, "all loss weights are zero"),
    ({"l3d": 1.0, "l1": 1.0, "lproj": 1.0}, "misses \\['awing'\\]"),
    ({"l3d": 1.0, "l1": 1.0, "lproj": 1.0, "awing": 1.0, "l5": 1.0}, "unknown loss weight\\(s\\) \\['l5'\\]"),
    ({"l3d": float("nan"), "l1": 1.0, "lproj": 1.0, "awing": 1.0}, "finite"),
])
def test_dadloss_refuses_bad_weights(bad, message):
    with pytest.raises(ValueError, match=message):
        DADLoss(bad, ALL_ONE)


def test_dadloss_refuses_unknown_heatmap_loss():
    with pytest.raises(ValueError, match="unknown heatmap loss 'l2'"):
        DADLoss(WEIGHTS, ALL_ONE, heatmap_loss="l2")


@pytest.fixture(scope="module")
def flame():
    return FlameLayer(tiny_flame_assets())


def _batch(flame: FlameLayer, S: int = 32, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    B = 2
    gt = torch.cat([torch.randn(B, 403, generator=g) * 0.5,
                    torch.tensor([1.0, 0, 0, 0, -1, 0, 0.05, -0.02, 0, 6.0]).expand(B, 10)], dim=1)
    return {"image": torch.zeros(B, 3, S, S), "vertices_model": flame.canonical(gt) - torch.tensor([0, 0, 0.05]),
            "vertices_crop": flame.reproject(gt, S)[..., :2],
            "landmarks_2d": torch.rand(B, 68, 2, generator=g) * S, "visibility": torch.ones(B, 68),
            "heatmaps": torch.rand(B, 68, S // 4, S // 4, generator=g)}


def _pred(flame: FlameLayer, S: int = 32) -> tuple[dict, torch.Tensor]:
    params = torch.cat([torch.randn(2, 403) * 0.5, torch.tensor([0.9, 0.1, 0, 0.1, -1, 0, 0, 0, 0, 5.0]).expand(2, 10)],
                       dim=1).requires_grad_()
    canonical = flame.canonical(params)
    pred = {"vertices_canonical": canonical, "vertices_reprojected": flame.reproject(params, S, canonical),
            "landmarks_2d": torch.rand(2, 68, 2).requires_grad_(),
            "heatmaps": torch.randn(2, 68, S // 4, S // 4).requires_grad_()}
    return pred, params


def test_dadloss_sums_weighted_terms_and_skips_zero_weights(flame):
    torch.manual_seed(0)
    batch, (pred, _) = _batch(flame), _pred(flame)
    subsets = {n: flame.subset(n) for n in ("face", "face_w_ears", "head")}
    total, terms = DADLoss(WEIGHTS, subsets)(pred, batch)
    assert set(terms) == {"l3d", "l1", "lproj", "awing"}
    torch.testing.assert_close(terms["l3d"], 50 * shape_loss(pred["vertices_canonical"], batch["vertices_model"], subsets))
    torch.testing.assert_close(terms["lproj"],
                               0.05 * reprojection_loss(pred["vertices_reprojected"], batch["vertices_crop"], subsets,
                                                        crop_size=32))
    torch.testing.assert_close(total, sum(terms.values()))
    # inactive terms are never computed: their inputs may be absent
    loss = DADLoss({"l3d": 0, "l1": 1.0, "lproj": 0, "awing": 0}, subsets)
    assert loss.needs == {"landmarks_2d"}
    _, terms = loss({"landmarks_2d": pred["landmarks_2d"]}, batch)
    assert set(terms) == {"l1"}


def test_gt_as_prediction_gives_zero_3d_and_projection_terms(flame):
    batch = _batch(flame)
    pred = {"vertices_canonical": batch["vertices_model"] + torch.tensor([0, 0, 0.05]),
            "vertices_reprojected": batch["vertices_crop"]}
    subsets = {n: flame.subset(n) for n in ("face", "face_w_ears", "head")}
    total, _ = DADLoss({"l3d": 1.0, "l1": 0, "lproj": 1.0, "awing": 0}, subsets)(pred, batch)
    assert total.item() == pytest.approx(0.0, abs=1e-9)


def _grads(flame, weights):
    torch.manual_seed(0)
    batch, (pred, params) = _batch(flame), _pred(flame)
    subsets = {n: flame.subset(n) for n in ("face", "face_w_ears", "head")}
    total, _ = DADLoss(weights, subsets)(pred, batch)
    total.backward()
    return params.grad, pred["landmarks_2d"].grad, pred["heatmaps"].grad


def test_no_l3d_gradient_on_shape_when_lambda1_is_zero(flame):
    only_proj, _, _ = _grads(flame, {"l3d": 0, "l1": 1.0, "lproj": 0.05, "awing": 1.0})
    both, _, _ = _grads(flame, {"l3d": 50.0, "l1": 1.0, "lproj": 0.05, "awing": 1.0})
    torch.manual_seed(0)
    batch, (pred, params) = _batch(flame), _pred(flame)
    subsets = {n: flame.subset(n) for n in ("face", "face_w_ears", "head")}
    (0.05 * reprojection_loss(pred["vertices_reprojected"], batch["vertices_crop"], subsets, crop_size=32)).backward()
    shape_expr = slice(0, 400)
    torch.testing.assert_close(only_proj[:, shape_expr], params.grad[:, shape_expr])  # L_proj's gradient only
    assert not torch.allclose(both[:, shape_expr], only_proj[:, shape_expr])
    none, _, _ = _grads(flame, {"l3d": 0, "l1": 1.0, "lproj": 0, "awing": 1.0})
    assert none is None


def test_no_gradient_on_pose_when_lambda3_is_zero(flame):
    pose = slice(403, 413)
    g, _, _ = _grads(flame, {"l3d": 50.0, "l1": 1.0, "lproj": 0, "awing": 1.0})
    assert torch.count_nonzero(g[:, pose]) == 0
    assert torch.count_nonzero(g[:, :400]) > 0
    g, _, _ = _grads(flame, {"l3d": 50.0, "l1": 1.0, "lproj": 0.05, "awing": 1.0})
    assert torch.count_nonzero(g[:, pose]) > 0
    assert set(split_3dmm(g)) >= {"rot6d", "translation", "scale"}


def test_no_gradient_on_landmark_or_heatmap_outputs_without_2d_terms(flame):
    _, lmk, hm = _grads(flame, {"l3d": 50.0, "l1": 0, "lproj": 0.05, "awing": 0})
    assert lmk is None and hm is None
    _, lmk, hm = _grads(flame, WEIGHTS)
    assert torch.count_nonzero(lmk) > 0 and torch.count_nonzero(hm) > 0


@pytest.mark.parametrize("name", ["awing", "soft_iou"])
def test_heatmap_loss_option_reaches_heatmaps(flame, name):
    torch.manual_seed(0)
    batch, (pred, _) = _batch(flame), _pred(flame)
    subsets = {n: flame.subset(n) for n in ("face", "face_w_ears", "head")}
    total, terms = DADLoss({"l3d": 0, "l1": 0, "lproj": 0, "awing": 1.0}, subsets, heatmap_loss=name)(pred, batch)
    total.backward()
    assert set(terms) == {"awing"} and torch.count_nonzero(pred["heatmaps"].grad) > 0


# --------------------------------------------------------------------------------------------
# The registry: one record per term (losses.LOSS_TERMS), function included
# --------------------------------------------------------------------------------------------
def test_each_registered_term_reads_only_its_recorded_prediction(flame):
    from dad3dlib.losses import LOSS_TERMS

    batch, (pred, _) = _batch(flame), _pred(flame)
    for name, term in LOSS_TERMS.items():
        alone = DADLoss({k: float(k == name) for k in LOSS_TERMS}, {n: flame.subset(n) for n in ALL_ONE})
        assert alone.needs == {term.needs}, name
        total, terms = alone({term.needs: pred[term.needs]}, batch)  # no other prediction given
        assert list(terms) == [name] and torch.isfinite(total) and total > 0, name


def test_every_list_of_loss_terms_derives_from_the_records(monkeypatch):
    """A term registered in losses.py alone is a weight every params file must list, has its reference
    weight as default, is computed by DADLoss and plotted by the report."""
    from dad3dlib import losses, report
    from dad3dlib.settings import LossSettings

    defaults = LossSettings().lambdas
    assert tuple(defaults) == ("l3d", "l1", "lproj", "awing")
    assert defaults == {k: t.reference_weight for k, t in losses.LOSS_TERMS.items()}
    assert all(f"train/raw/{k}_step" in report.CURVES and f"val/raw/{k}" in report.CURVES for k in losses.LOSS_TERMS)
    with pytest.raises(KeyError, match="'l1' is registered already"):
        losses.register_term("l1", "L_1", 1.0, "landmarks_2d")
    monkeypatch.setattr(losses, "LOSS_TERMS", dict(losses.LOSS_TERMS))
    losses.register_term("lzero", "L_0", 2.0, needs="landmarks_2d")(lambda loss, p, b: p["landmarks_2d"].sum() * 0 + 3)
    with pytest.raises(ValueError, match=r"loss.lambdas misses \['lzero'\]"):
        losses.validate_lambdas(defaults)
    weights = {**{k: 0.0 for k in losses.LOSS_TERMS}, "lzero": 2.0}
    total, terms = losses.DADLoss(weights, {n: torch.arange(3) for n in losses.L3D_SUBSET_WEIGHTS})(
        {"landmarks_2d": torch.zeros(1, 68, 2)}, {})
    assert terms == {"lzero": 6.0} and total == 6.0


# --------------------------------------------------------------------------------------------
# The fast forms of the terms against their plain definitions
# --------------------------------------------------------------------------------------------
def _plain_unit_cube(p):
    """The definition, step by step: subtract the min, then half the max, divide by the largest."""
    p = p - p.amin(dim=1, keepdim=True)
    p = p - p.amax(dim=1, keepdim=True) / 2
    return p / p.amax(dim=(1, 2), keepdim=True)


def _plain_shape_loss(pred, target, subsets):
    return sum(w * torch.nn.functional.mse_loss(_plain_unit_cube(pred[:, subsets[k]]), _plain_unit_cube(target[:, subsets[k]]))
               for k, w in L3D_SUBSET_WEIGHTS.items())


@pytest.mark.parametrize("nested", [True, False])
def test_shape_loss_is_its_definition_with_one_gather_or_several(nested):
    g = torch.Generator().manual_seed(0)
    V = 50
    perm = torch.randperm(V, generator=g)
    subsets = ({"face": perm[:12], "face_w_ears": perm[:40], "head": perm[:30]} if nested else
               {"face": perm[:12], "face_w_ears": perm[5:40], "head": perm[20:]})
    vs = VertexSubsets(subsets)
    assert vs.nested == nested
    pred = torch.randn(3, V, 3, generator=g, dtype=torch.float64, requires_grad=True)
    target = torch.randn(3, V, 3, generator=g, dtype=torch.float64)
    fast = shape_loss(pred, target, vs)
    plain = _plain_shape_loss(pred, target, subsets)
    torch.testing.assert_close(fast, plain)
    torch.testing.assert_close(torch.autograd.grad(fast, pred)[0], torch.autograd.grad(plain, pred)[0])
    taken = vs.take(pred, list(subsets))
    for k, ids in subsets.items():  # the same points, in some order
        assert sorted(taken[k][0, :, 0].tolist()) == sorted(pred[0, ids, 0].tolist())


def test_unit_cube_mse_gradient_is_autograds_of_the_definition():
    """The fused L_3D subset term (value and gradient formed together) against finite differences,
    on points with distinct coordinates (no ties for a min or max)."""
    from dad3dlib.losses import _UnitCubeMSE

    g = torch.Generator().manual_seed(3)
    p = torch.randn(2, 3, 9, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randn(2, 3, 9, generator=g, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda x: _UnitCubeMSE.apply(x, t), (p,))
    plain = torch.nn.functional.mse_loss(_plain_unit_cube(p.transpose(1, 2)), t.transpose(1, 2))
    torch.testing.assert_close(_UnitCubeMSE.apply(p, t), plain)


def test_the_vertex_terms_of_the_subsets_union_alone_are_those_of_the_whole_mesh():
    """L_3D and L_proj of points computed for the subsets' union alone (as training computes
    them) equal those of the whole mesh, value and gradient; points of another size are refused."""
    g = torch.Generator().manual_seed(5)
    V = 40
    perm = torch.randperm(V, generator=g)
    vs = VertexSubsets({"face": perm[:8], "face_w_ears": perm[:20], "head": perm[:30]})
    pred = torch.randn(2, V, 3, generator=g, dtype=torch.float64, requires_grad=True)
    target = torch.randn(2, V, 3, generator=g, dtype=torch.float64)
    for fn, t in ((shape_loss, target), (reprojection_loss, target[..., :2])):
        whole, sub = fn(pred, t, vs), fn(pred[:, vs.union], t, vs)
        torch.testing.assert_close(sub, whole)
        torch.testing.assert_close(torch.autograd.grad(sub, pred)[0], torch.autograd.grad(whole, pred)[0])
    with pytest.raises(ValueError, match="not the subsets' union"):
        shape_loss(pred[:, :25], target, vs)


def _plain_awing(pred, target, alpha=2.1, omega=14.0, epsilon=1.0, theta=0.5, w=10.0):
    """Adaptive Wing from its formula, through autograd."""
    power = alpha - target
    a = omega / (1 + (theta / epsilon) ** power) * power * (theta / epsilon) ** (power - 1) / epsilon
    c = theta * a - omega * torch.log1p((theta / epsilon) ** power)
    diff = (target - pred).abs()
    loss = torch.where(diff < theta, omega * torch.log1p((diff / epsilon) ** power), a * diff - c)
    fg = torch.nn.functional.max_pool2d((target > 0.2).to(pred.dtype), 3, stride=1, padding=1)
    return (loss * (fg * w + 1)).mean()


def test_adaptive_wing_value_and_gradient_are_its_formula():
    g = torch.Generator().manual_seed(1)
    target = torch.rand(2, 5, 8, 8, generator=g, dtype=torch.float64) ** 3
    target[0, 0] = 0  # no foreground at all
    pred = torch.rand(2, 5, 8, 8, generator=g, dtype=torch.float64)
    pred[1, 1, :2] = target[1, 1, :2]  # |d| = 0
    pred = pred.requires_grad_()
    fast, plain = adaptive_wing_loss(pred, target), _plain_awing(pred, target)
    torch.testing.assert_close(fast, plain)
    torch.testing.assert_close(torch.autograd.grad(fast, pred)[0], torch.autograd.grad(plain, pred)[0])
    small = pred.detach()[:1, 1:3].clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda p: adaptive_wing_loss(p, target[:1, 1:3]), (small,))


def test_dilate3x3_is_a_3x3_max_filter():
    m = torch.rand(3, 4, 9, 7, generator=torch.Generator().manual_seed(2)) > 0.9
    expect = torch.nn.functional.max_pool2d(m.float(), 3, stride=1, padding=1)
    torch.testing.assert_close(dilate3x3(m), expect)


def test_terms_gives_every_term_unweighted_and_combine_weighs_the_active_ones():
    g = torch.Generator().manual_seed(3)
    V, B, S = 30, 2, 32
    subsets = {"face": torch.arange(10), "face_w_ears": torch.arange(20), "head": torch.arange(5, V)}
    loss = DADLoss({"l3d": 0.0, "l1": 2.0, "lproj": 0.5, "awing": 1.0}, subsets)
    pred = {"vertices_canonical": torch.randn(B, V, 3, generator=g), "vertices_reprojected": torch.rand(B, V, 3, generator=g) * S,
            "landmarks_2d": torch.rand(B, 68, 2, generator=g), "heatmaps": torch.randn(B, 68, S // 4, S // 4, generator=g)}
    batch = {"vertices_model": torch.randn(B, V, 3, generator=g), "vertices_crop": torch.rand(B, V, 2, generator=g) * S,
             "landmarks_2d": torch.rand(B, 68, 2, generator=g) * S, "visibility": torch.ones(B, 68),
             "heatmaps": torch.rand(B, 68, S // 4, S // 4, generator=g), "image": torch.zeros(B, 3, S, S)}
    raw = loss.terms(pred, batch, LOSS_TERMS)
    assert set(raw) == set(LOSS_TERMS) and set(loss.terms(pred, batch)) == {"l1", "lproj", "awing"}
    torch.testing.assert_close(raw["l3d"], shape_loss(pred["vertices_canonical"], batch["vertices_model"], subsets))
    total, weighted = loss.combine(raw)
    assert set(weighted) == {"l1", "lproj", "awing"}
    torch.testing.assert_close(weighted["l1"], 2.0 * raw["l1"])
    torch.testing.assert_close(total, loss(pred, batch)[0])
