"""Token (ViT) backbones: the head's token pooling path, GeM, projection-free heads, freezing the first blocks,
layer-wise lr decay, the encoder-family transform presets and the timm weight lookup (random-init tiny ViTs, no
network)."""

from __future__ import annotations

import pytest
import torch
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms import v2 as T

from deepmetric.config_errors import ConfigError
from deepmetric.data.transforms import (
    CLIP_MEAN,
    IMAGENET_MEAN,
    build_transforms,
    family_preset,
    get_transform,
    input_convention,
)
from deepmetric.models import ModelConfig, build_model
from deepmetric.models.head import EmbeddingHead, gem, global_pool
from deepmetric.models.pretrained import PretrainedWeightsError
from deepmetric.training.config import OptimizerConfig, load_config
from deepmetric.training.criterion import build_criterion

pytest.importorskip("timm")
TINY = "timm:vit_tiny_patch16_224"


def tiny(**options) -> torch.nn.Module:
    torch.manual_seed(0)
    config = ModelConfig(backbone=TINY, embedding_size=options.pop("embedding_size", 192), image_size=32, **options)
    return build_model(config, in_channels=3)


# ---------------------------------------------------------------------------------------------- pooling ----
def test_token_pooling_takes_the_class_token_or_pools_patch_tokens_only():
    x = torch.randn(3, 1 + 2 + 6, 5)  # class token, 2 registers, 6 patch tokens
    patches = x[:, 3:]
    assert torch.equal(global_pool(x, "cls", num_prefix_tokens=3), x[:, 0])
    assert torch.allclose(global_pool(x, "avg", num_prefix_tokens=3), patches.mean(1))
    assert torch.equal(global_pool(x, "max", num_prefix_tokens=3), patches.amax(1))
    assert torch.allclose(global_pool(x, "avg+max", num_prefix_tokens=3), patches.mean(1) + patches.amax(1))
    brute = torch.stack([torch.stack([(patches[b, :, c].clamp(min=1e-6) ** 3).mean() ** (1 / 3) for c in range(5)])
                         for b in range(3)])
    assert torch.allclose(global_pool(x, "gem", num_prefix_tokens=3, gem_p=3.0), brute, atol=1e-6)


def test_gem_limits_and_gradient():
    x = torch.rand(2, 4, 3, 3, dtype=torch.float64) + 0.1
    assert torch.allclose(gem(x, 1.0, dim=(2, 3)), x.mean((2, 3)))
    assert torch.allclose(gem(x, 200.0, dim=(2, 3)), x.amax((2, 3)), rtol=2e-2)
    p = torch.tensor(2.5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t, q: gem(t, q, dim=(2, 3)), (x.requires_grad_(), p))


def test_vit_backbone_gives_tokens_and_every_pooling_gives_embeddings():
    model = tiny(pooling="cls", projection=False, normalize=True)
    x = torch.randn(2, 3, 32, 32)
    assert model.backbone.feature_layout == "tokens" and model.backbone.num_prefix_tokens == 1
    assert model.backbone(x).shape == (2, 1 + 4, 192)  # 32 px / patch 16 → 2×2 patches
    z = model(x)
    assert z.shape == (2, 192) and torch.allclose(z.norm(dim=1), torch.ones(2), atol=1e-5)
    assert model(torch.randn(2, 3, 64, 64)).shape == (2, 192)  # dynamic image size: other whole-patch sizes run
    with torch.no_grad():
        assert torch.allclose(z, torch.nn.functional.normalize(model.backbone(x)[:, 0], dim=1), atol=1e-6)
    for pooling in ("avg", "max", "avg+max", "gem"):
        m = tiny(pooling=pooling, embedding_size=16)
        emb, features = m(x, return_features=True)
        assert emb.shape == (2, 16) and features.shape == (2, 192)
    assert isinstance(tiny(pooling="gem", embedding_size=16).head.gem_p, torch.nn.Parameter)


def test_invalid_pooling_and_projection_combinations_are_config_errors():
    with pytest.raises(ConfigError, match="class token of a ViT.*feature map"):
        build_model(ModelConfig(backbone="resnet18", pooling="cls"), in_channels=3)
    with pytest.raises(ConfigError, match="model.embedding_size=192"):
        tiny(projection=False, embedding_size=128)
    with pytest.raises(ConfigError, match="image_size applies to timm token backbones"):
        build_model(ModelConfig(backbone="resnet18", image_size=64), in_channels=3)
    with pytest.raises(ValueError, match="class token"):
        EmbeddingHead(8, 8, pooling="cls")
    with pytest.raises(ConfigError, match="model.pooling"):
        load_config(None, ["model.pooling=token"])


def test_cnn_gem_pooling_and_projection_free_head():
    model = build_model(ModelConfig(backbone="resnet18", pooling="gem", projection=False, embedding_size=512),
                        in_channels=3)
    assert model(torch.randn(2, 3, 64, 64)).shape == (2, 512)


# ---------------------------------------------------------------------------- freezing and lr decay ----
def test_freeze_blocks_freezes_stem_and_first_blocks_and_a_step_leaves_them_unchanged():
    model = tiny(pooling="cls", embedding_size=8, freeze_blocks=2)
    net = model.backbone.net
    assert not net.patch_embed.proj.weight.requires_grad and not net.cls_token.requires_grad
    assert not any(p.requires_grad for p in net.blocks[1].parameters())
    assert all(p.requires_grad for p in net.blocks[2].parameters()) and net.norm.weight.requires_grad
    frozen = net.blocks[0].attn.qkv.weight.detach().clone()
    trained = net.blocks[5].attn.qkv.weight.detach().clone()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model(torch.randn(4, 3, 32, 32)).pow(2).sum().backward()
    optimizer.step()
    assert torch.equal(net.blocks[0].attn.qkv.weight, frozen)
    assert not torch.equal(net.blocks[5].attn.qkv.weight, trained)
    with pytest.raises(ConfigError, match="has 12 blocks"):
        tiny(freeze_blocks=13)
    with pytest.raises(ConfigError, match="freeze_blocks applies to ViT"):
        build_model(ModelConfig(backbone="resnet18", freeze_blocks=1), in_channels=3)


def test_layer_decay_groups_scale_lr_from_the_last_block_down():
    from deepmetric.training.builders import parameter_groups

    model = tiny(pooling="cls", embedding_size=8)
    criterion = build_criterion(load_config(None, ["model.embedding_size=8"]), num_classes=4, batches_per_epoch=1)
    groups = parameter_groups(model, criterion, OptimizerConfig(lr=1e-3, layer_decay=0.5, backbone_lr_multiplier=2.0))
    backbone_groups = [g for g in groups if g["name"].startswith("backbone.layer")]
    assert [g["name"] for g in backbone_groups] == [f"backbone.layer{i}" for i in range(13, -1, -1)]
    by_name = {g["name"]: g for g in backbone_groups}
    assert by_name["backbone.layer13"]["lr"] == pytest.approx(2e-3)  # final norm: the backbone's own lr
    assert by_name["backbone.layer12"]["lr"] == pytest.approx(1e-3)  # last block
    assert by_name["backbone.layer0"]["lr"] == pytest.approx(2e-3 * 0.5**13)  # patch embedding, tokens
    assert {id(p) for p in by_name["backbone.layer0"]["params"]} == {
        id(p) for n, p in model.backbone.net.named_parameters() if n.startswith(("cls_token", "pos_embed", "patch"))}
    ids = [id(p) for g in backbone_groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == len(list(model.backbone.parameters()))
    assert groups[len(backbone_groups)]["name"] == "head"
    cnn = build_model(ModelConfig(backbone="kanji_cnn", width=4))
    with pytest.raises(ConfigError, match="layer_decay needs a ViT"):
        parameter_groups(cnn, criterion, OptimizerConfig(layer_decay=0.5))
    with pytest.raises(ConfigError, match=r"\(0, 1\]"):
        parameter_groups(model, criterion, OptimizerConfig(layer_decay=1.5))


# ------------------------------------------------------------------------------------------ transforms ----
@pytest.mark.parametrize(("preset", "eval_resize"), [("vit", 248), ("dino", 224), ("dinov2", 224), ("clip", 224)])
def test_family_presets_are_224_bicubic_and_make_grey_glyphs_three_channel(preset, eval_resize):
    train, evaluation = build_transforms(preset, "timm:vit_small_patch14_dinov2.lvd142m")
    resize = next(t for t in evaluation.transforms if isinstance(t, T.Resize))
    assert list(resize.size) == [eval_resize] and resize.interpolation == InterpolationMode.BICUBIC
    glyph = Image.new("L", (32, 32), 200)
    assert train(glyph).shape == evaluation(glyph).shape == (3, 224, 224)


def test_colour_convention_follows_the_timm_weights():
    assert input_convention("timm:vit_small_patch16_224.dino") == "imagenet"
    assert input_convention("timm:vit_small_patch16_224") == "imagenet_inception"  # AugReg: mean = std = 0.5
    assert input_convention("timm:vit_base_patch16_clip_224.openai") == "clip"
    norm = get_transform("clip_eval", backbone="timm:vit_base_patch16_clip_224.openai").transforms[-1]
    assert tuple(norm.mean) == CLIP_MEAN
    assert tuple(get_transform("dino_eval").transforms[-1].mean) == IMAGENET_MEAN  # the family's default


def test_presets_must_tile_the_patch_grid_and_family_defaults():
    with pytest.raises(ConfigError, match="227.*patch size 16"):
        build_transforms("ms", "timm:vit_small_patch16_224.dino")
    with pytest.raises(ConfigError, match="patch size 14"):
        build_transforms("reality_check", "timm:vit_small_patch14_dinov2.lvd142m")
    assert family_preset("timm:vit_small_patch16_224.dino") == "dino"
    assert family_preset("timm:vit_small_patch14_dinov2.lvd142m") == "dinov2"
    assert family_preset("timm:vit_base_patch16_clip_224.openai") == "clip"
    assert family_preset("timm:vit_tiny_patch16_224") == "vit"
    assert family_preset("mobilenet_v2") == "xbm"


# -------------------------------------------------------------------------------------- timm weights ----
@pytest.fixture
def empty_caches(tmp_path, monkeypatch):
    """No weight file anywhere: torch hub and Hugging Face caches point into tmp_path."""
    import huggingface_hub.constants

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    return tmp_path


def test_offline_timm_error_names_the_file_and_where_to_put_it(empty_caches, monkeypatch):
    monkeypatch.setenv("DEEPMETRIC_OFFLINE", "1")
    expected = empty_caches / "torch" / "hub" / "checkpoints" / "timm" / "vit_tiny_patch16_224.augreg_in21k.safetensors"
    with pytest.raises(PretrainedWeightsError) as info:
        build_model(ModelConfig(backbone="timm:vit_tiny_patch16_224.augreg_in21k", pretrained="timm",
                                embedding_size=8), in_channels=3)
    message = str(info.value)
    assert "DEEPMETRIC_OFFLINE" in message and f"at {expected}" in message
    assert "https://huggingface.co/timm/vit_tiny_patch16_224.augreg_in21k/resolve/main/model.safetensors" in message
    assert "model.pretrained=/path/to/model.safetensors" in message


def test_failed_download_is_a_weights_error_with_the_same_hint(empty_caches, monkeypatch):
    import timm

    real = timm.create_model

    def no_network(name, pretrained=False, **kwargs):
        if pretrained:
            raise OSError("Network is unreachable")
        return real(name, pretrained=False, **kwargs)

    monkeypatch.delenv("DEEPMETRIC_OFFLINE", raising=False)
    monkeypatch.setattr(timm, "create_model", no_network)
    with pytest.raises(PretrainedWeightsError, match=r"OSError: Network is unreachable.*put the file model.safetensors"):
        build_model(ModelConfig(backbone="timm:vit_tiny_patch16_224.augreg_in21k", pretrained="imagenet",
                                embedding_size=8), in_channels=3)


def test_weights_placed_where_the_error_says_are_loaded_offline(empty_caches, monkeypatch):
    import timm
    from safetensors.torch import save_file

    monkeypatch.setenv("DEEPMETRIC_OFFLINE", "1")
    torch.manual_seed(1)
    source = timm.create_model("vit_tiny_patch16_224.augreg_in21k", pretrained=False)  # its 21,843-class head
    target = empty_caches / "torch" / "hub" / "checkpoints" / "timm" / "vit_tiny_patch16_224.augreg_in21k.safetensors"
    target.parent.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(target))
    model = build_model(ModelConfig(backbone="timm:vit_tiny_patch16_224.augreg_in21k", pretrained="timm",
                                    embedding_size=192, projection=False, pooling="cls"), in_channels=3)
    assert torch.equal(model.backbone.net.blocks[3].mlp.fc1.weight, source.blocks[3].mlp.fc1.weight)
    resampled = build_model(ModelConfig(backbone="timm:vit_tiny_patch16_224.augreg_in21k", pretrained=str(target),
                                        image_size=32, embedding_size=8), in_channels=3)
    assert resampled.backbone.net.pos_embed.shape == (1, 1 + 4, 192)  # 14×14 grid resampled to 2×2 at load
    with pytest.raises(PretrainedWeightsError, match="does not exist"):
        build_model(ModelConfig(backbone=TINY, pretrained=str(target) + ".missing", embedding_size=8), in_channels=3)
