"""DAD-3DNet: output contract, encoder split, initial prediction, local pretrained weights."""
from __future__ import annotations

import pytest
import timm
import torch

from dad3dlib.flame import rot6d_to_matrix, split_3dmm
from dad3dlib.model import SplitEncoder, create_model

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    return create_model({"encoder": "resnet10t", "bifpn_filters": 16, "hidden": 32, "init_scale": 9.0}).eval()


def test_output_keys_and_shapes(net):
    with torch.no_grad():
        out = net(torch.randn(2, 3, 64, 64))
    assert set(out) == {"params_3dmm", "landmarks_2d", "heatmaps"}
    assert out["params_3dmm"].shape == (2, 413)
    assert out["landmarks_2d"].shape == (2, 68, 2)
    assert out["heatmaps"].shape == (2, 68, 16, 16)  # stride 4


def test_initial_prediction_is_a_frontal_centred_head(net):
    with torch.no_grad():
        out = net(torch.randn(4, 3, 64, 64))
    p = split_3dmm(out["params_3dmm"])
    torch.testing.assert_close(rot6d_to_matrix(p["rot6d"]), torch.diag(torch.tensor([1.0, -1, -1])).expand(4, 3, 3),
                               atol=0.05, rtol=0)
    assert torch.allclose(p["scale"] + 1, torch.tensor(9.0), atol=0.05)
    assert p["translation"].abs().max() < 0.05 and p["shape"].abs().max() < 0.1
    assert torch.allclose(out["landmarks_2d"], torch.tensor(0.5), atol=0.05)
    assert torch.allclose(torch.sigmoid(out["heatmaps"]).mean(), torch.tensor(0.01), atol=0.01)


def test_shape_head_is_bounded_and_landmarks_non_negative(net):
    big = create_model({"encoder": "resnet10t", "bifpn_filters": 16, "hidden": 32}).eval()
    with torch.no_grad():
        for head in (big.shape_head, big.landmark_head):
            head[-1].weight.normal_(0, 10.0)
        out = big(torch.randn(2, 3, 64, 64))
    shape = out["params_3dmm"][:, :403]
    assert shape.abs().max() <= 3.0 and shape.abs().max() > 2.9  # tanh * 3, saturated
    assert out["landmarks_2d"].min() == 0.0  # ReLU


@pytest.mark.parametrize("name", ["resnet10t", "mobilenetv3_small_050", "convnext_atto"])
def test_encoder_split_matches_timm_features(name):
    torch.manual_seed(0)
    split = SplitEncoder(name).eval()
    torch.manual_seed(0)
    ref = timm.create_model(name, pretrained=False, features_only=True).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        want = dict(zip(ref.feature_info.reduction(), ref(x)))
        f4, f8, f16 = split.forward_to_16(x)
        f32 = split.forward_last(f16)
    for stride, got in zip((4, 8, 16, 32), (f4, f8, f16, f32)):
        torch.testing.assert_close(got, want[stride])
        assert got.shape[1] == split.channels[stride]


def test_fusion_multiplies_the_stride16_features(net):
    """Zeroing the fusion conv zeroes what the last stage sees: heads then see a constant input."""
    m = create_model({"encoder": "resnet10t", "bifpn_filters": 16, "hidden": 32}).eval()
    with torch.no_grad():
        m.fusion.weight.zero_()
        m.fusion.bias.zero_()
        a, b = m(torch.randn(1, 3, 64, 64)), m(torch.randn(1, 3, 64, 64))
    torch.testing.assert_close(a["params_3dmm"], b["params_3dmm"])
    assert not torch.allclose(a["heatmaps"], b["heatmaps"])  # the heatmap branch does not pass there


@pytest.mark.parametrize("name, suffix", [("resnet10t", ".pth"), ("mobilenetv3_small_050", ".safetensors"),
                                          ("convnext_atto", ".pth")])
def test_pretrained_encoder_from_local_file(tmp_path, name, suffix):
    torch.manual_seed(1)
    full = timm.create_model(name, pretrained=False)  # a "classification checkpoint" with its head
    sd = full.state_dict()
    path = tmp_path / f"weights{suffix}"
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    else:
        torch.save({"state_dict": {f"module.{k}": v for k, v in sd.items()}}, path)
    net = create_model({"encoder": name, "bifpn_filters": 16, "hidden": 32, "pretrained_path": path})
    enc = dict(net.encoder.stem.named_parameters()) | dict(net.encoder.last.named_parameters())
    matched = 0
    for k, v in enc.items():
        head, _, rest = k.partition(".")
        src = sd.get(k, sd.get(head.replace("_", ".", 1) + "." + rest))
        assert src is not None, k
        torch.testing.assert_close(v, src)
        matched += 1
    assert matched > 10


def test_pretrained_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothere.pth"):
        create_model({"encoder": "resnet10t", "bifpn_filters": 16, "hidden": 32, "pretrained_path": tmp_path / "nothere.pth"})
    other = tmp_path / "other.pth"
    torch.save(timm.create_model("resnet18", pretrained=False).state_dict(), other)
    with pytest.raises(ValueError, match="other.pth: .* missing or of another shape"):
        create_model({"encoder": "resnet10t", "bifpn_filters": 16, "hidden": 32, "pretrained_path": other})
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="junk.pth: cannot read"):
        create_model({"encoder": "resnet10t", "bifpn_filters": 16, "hidden": 32, "pretrained_path": junk})


def test_create_model_errors():
    with pytest.raises(ValueError, match="unknown model 'nope'"):
        create_model({"name": "nope"})
    with pytest.raises(ValueError, match=r"^model: unknown model key\(s\) \['filters'\]; known: "):
        create_model({"encoder": "resnet10t", "filters": 3})
    with pytest.raises(ValueError, match="FeatureGetterNet is not supported"):
        SplitEncoder("vit_tiny_patch16_224")


# --------------------------------------------------------------------------------------------
# BiFPN: the light default and the reference's (the paper preset)
# --------------------------------------------------------------------------------------------
def reference_bifpn_parameters(c4: int, c8: int, c16: int, f: int, layers: int = 2) -> int:
    """The reference BiFPN's parameter count, from its description (docs/ARCHITECTURE.md).

    Input column: P3, P4, P5 = 1x1 conv with bias of the stride-4/8/16 maps: c*f + f each;
    P6 = 3x3 stride-2 conv with bias of the stride-16 map: 9*c16*f + f;
    P7 = 3x3 stride-2 conv with bias (9*f*f + f) + BatchNorm (weight, bias: 2f).
    One layer: 8 nodes (top-down P6..P3, bottom-up P4..P7), each a kernel-1 depthwise conv
    without bias (f) + 1x1 pointwise conv without bias (f*f) + BatchNorm (2f); fusion weights:
    2 per top-down node (2x4) and 3 per bottom-up node (3x4) = 20.
    """
    column = (c4 * f + f) + (c8 * f + f) + (c16 * f + f) + (9 * c16 * f + f) + (9 * f * f + f + 2 * f)
    node = f + f * f + 2 * f
    layer = 8 * node + 2 * 4 + 3 * 4
    return column + layers * layer


def test_paper_preset_builds_the_reference_bifpn():
    from dad3dlib.config import run_params

    model_cfg = {k: v for k, v in run_params("paper")["model"].items() if k != "pose_prior_samples"}
    net = create_model(model_cfg)
    ch = net.encoder.channels
    assert (ch[4], ch[8], ch[16]) == (256, 512, 1024)  # ResNet-50
    want = reference_bifpn_parameters(256, 512, 1024, 256)
    assert want == 4_470_568  # the arithmetic above, written out: 459,520 + 2,359,552 + 590,592 + 2 x 530,452
    assert sum(p.numel() for p in net.bifpn.parameters()) == want
    bns = [m for m in net.bifpn.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert len(bns) == 1 + 2 * 8 and all(m.momentum == 0.9997 and m.eps == 4e-5 for m in bns)
    assert not any(isinstance(m, torch.nn.SiLU) for m in net.bifpn.modules())
    depthwise = [m for m in net.bifpn.modules() if isinstance(m, torch.nn.Conv2d) and m.groups > 1]
    assert len(depthwise) == 16 and all(m.kernel_size == (1, 1) for m in depthwise)


@pytest.mark.parametrize("size", [64, 96])
def test_reference_bifpn_gives_five_levels_and_the_net_its_outputs(size):
    cfg = {"encoder": "resnet10t", "bifpn_filters": 16, "hidden": 32, "bifpn_levels": 5, "bifpn_repeats": 2,
           "bifpn_depthwise_kernel": 1, "bifpn_act": "relu", "bifpn_downsample": "nearest",
           "bifpn_lateral": "bias", "bifpn_top_inputs": 3, "bifpn_bn_momentum": 0.9997, "bifpn_bn_eps": 4e-5}
    net = create_model(cfg).eval()
    ch = net.encoder.channels
    assert sum(p.numel() for p in net.bifpn.parameters()) == reference_bifpn_parameters(ch[4], ch[8], ch[16], 16)
    with torch.no_grad():
        levels = net.bifpn(net.encoder.forward_to_16(torch.randn(2, 3, size, size)))
        out = net(torch.randn(2, 3, size, size))
    sides = [size // 4, size // 8, size // 16, -(-size // 32), -(-size // 64)]
    assert [tuple(x.shape) for x in levels] == [(2, 16, s, s) for s in sides]
    assert out["heatmaps"].shape == (2, 68, size // 4, size // 4) and out["params_3dmm"].shape == (2, 413)


def test_bifpn_downsampling_choices():
    from dad3dlib.model import BIFPN_DOWNSAMPLING

    x = torch.arange(16.0).view(1, 1, 4, 4)
    torch.testing.assert_close(BIFPN_DOWNSAMPLING["nearest"](x, (2, 2)), x[..., ::2, ::2])  # the reference's
    torch.testing.assert_close(BIFPN_DOWNSAMPLING["maxpool"](x, (2, 2)), x[..., 1::2, 1::2])


def test_light_bifpn_keeps_its_modules():
    """The default (cpu, smoke presets) is the light pyramid, module for module: checkpoints of
    runs made before the reference's settings existed still load."""
    net = create_model({"encoder": "resnet10t", "bifpn_filters": 16, "hidden": 32})
    layer = {k.removeprefix("bifpn.layers.0.") for k in net.state_dict() if k.startswith("bifpn.layers.0.")}
    fusions = {f"{n}.weight" for n in ("td_mid", "td_fine", "bu_mid", "bu_coarse")}
    blocks = {f"conv.{n}.{i}.{p}" for n in ("td_mid", "out_fine", "out_mid", "out_coarse")
              for i, p in [(0, "weight"), (1, "weight"), (2, "weight"), (2, "bias"), (2, "running_mean"),
                           (2, "running_var"), (2, "num_batches_tracked")]}
    assert layer == fusions | blocks and len(net.bifpn.layers) == 1
    assert net.bifpn.layers[0].bu_coarse.weight.shape == (2,)
    assert all(net.bifpn.layers[0].conv[k][0].kernel_size == (3, 3) for k in net.bifpn.layers[0].conv)
    assert sum(isinstance(m, torch.nn.SiLU) for m in net.bifpn.modules()) == 4


@pytest.mark.parametrize("key, value, match", [
    ("bifpn_levels", 4, r"model.bifpn_levels must be one of \[3, 5\], got 4"),
    ("bifpn_act", "gelu", r"model.bifpn_act must be one of \['relu', 'silu'\], got 'gelu'"),
    ("bifpn_downsample", "avg", r"model.bifpn_downsample must be one of"),
    ("bifpn_lateral", "none", r"model.bifpn_lateral must be one of"),
    ("bifpn_top_inputs", 4, r"model.bifpn_top_inputs must be one of \[2, 3\]"),
    ("bifpn_depthwise_kernel", 2, r"model.bifpn_depthwise_kernel must be an odd integer"),
])
def test_bad_bifpn_settings_are_named(key, value, match):
    with pytest.raises(ValueError, match=match):
        create_model({"encoder": "resnet10t", "bifpn_filters": 8, key: value})


def test_a_bug_in_a_network_is_not_reported_as_bad_settings(monkeypatch):
    """create_model checks the keys against the model section, so a TypeError from inside the
    network's constructor is a bug and keeps its traceback."""
    from dad3dlib import model

    def broken(**kwargs):
        raise TypeError("a bug in the constructor")

    monkeypatch.setitem(model.MODELS, "dad3dnet", broken)
    with pytest.raises(TypeError, match="a bug in the constructor"):
        create_model({"encoder": "resnet10t"})
