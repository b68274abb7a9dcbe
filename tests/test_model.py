"""DAD-3DNet: output contract, encoder split, initial prediction, local pretrained weights."""
from __future__ import annotations

import pytest
import timm
import torch

from dad3dlib.flame import rot6d_to_matrix, split_3dmm
from dad3dlib.model import DAD3DNet, SplitEncoder, create_model

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
    net = DAD3DNet(encoder=name, bifpn_filters=16, hidden=32, pretrained_path=path)
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
        DAD3DNet(encoder="resnet10t", bifpn_filters=16, hidden=32, pretrained_path=tmp_path / "nothere.pth")
    other = tmp_path / "other.pth"
    torch.save(timm.create_model("resnet18", pretrained=False).state_dict(), other)
    with pytest.raises(ValueError, match="other.pth: .* missing or of another shape"):
        DAD3DNet(encoder="resnet10t", bifpn_filters=16, hidden=32, pretrained_path=other)
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="junk.pth: cannot read"):
        DAD3DNet(encoder="resnet10t", bifpn_filters=16, hidden=32, pretrained_path=junk)


def test_create_model_errors():
    with pytest.raises(ValueError, match="unknown model 'nope'"):
        create_model({"name": "nope"})
    with pytest.raises(ValueError, match="bad config keys"):
        create_model({"encoder": "resnet10t", "filters": 3})
    with pytest.raises(ValueError, match="FeatureGetterNet is not supported"):
        SplitEncoder("vit_tiny_patch16_224")
