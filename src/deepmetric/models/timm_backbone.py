"""timm backbones (``timm:<model>[.<tag>]``): CNNs give a feature map, ViTs (ViT, DeiT, DINO, DINOv2, CLIP image
towers, EVA) a token sequence, which the embedding head pools with its token path (:mod:`deepmetric.models.head`).

ViTs are built with ``dynamic_img_size=True``, so any input size that is a whole number of patches runs (the
position embeddings are interpolated), and with ``img_size`` when ``image_size`` is given (pretrained position
embeddings are then resampled once, at load). Weights: :func:`deepmetric.models.pretrained.resolve_timm_weights`
(local file, our weights folder, the Hugging Face cache, else timm downloads them; offline the error names the
file to place and where).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from deepmetric.config_errors import ConfigError
from deepmetric.models.pretrained import PretrainedWeightsError, resolve_timm_weights, timm_weights_hint

# timm modules whose models produce (B, prefix + patches, C) tokens and accept dynamic_img_size / img_size
_TOKEN_MODULES = ("vision_transformer", "deit", "eva")
# parameters of a ViT's input stem (layer 0 of layer-wise lr decay; frozen with any freeze_blocks > 0)
_STEM = ("cls_token", "reg_token", "pos_embed", "patch_embed", "norm_pre", "pos_drop", "patch_drop")
_BLOCK = re.compile(r"^blocks\.(\d+)\.")


def _timm() -> Any:
    try:
        import timm
    except ImportError as exc:
        raise ImportError("timm backbones need the optional dependency timm: pip install 'deepmetric[timm]'") from exc
    return timm


def is_token_model(name: str) -> bool:
    """Whether timm model ``name`` is a ViT-style token model (by the module that defines it; no model built)."""
    timm = _timm()
    arch = timm.models.split_model_name_tag(name)[0]
    if not timm.models.is_model(arch):
        raise KeyError(f"timm has no model {arch!r} (timm.list_models() lists them)")
    return timm.models.model_entrypoint(arch).__module__.rsplit(".", 1)[-1] in _TOKEN_MODULES


class TimmBackbone(nn.Module):
    """Any timm model through ``forward_features``; needs the ``timm`` extra.

    ``feature_layout`` is ``"tokens"`` (ViTs: (B, P + N, C), ``num_prefix_tokens`` = P) or ``"map"``
    (B, C, H, W; channels-last outputs such as Swin's are permuted). ``pretrained``: None, ``"imagenet"`` /
    ``"timm"`` (the weights of the model's tag), or a weight file (timm's own or the original release format:
    timm's converters run on it). ``image_size``: token models only.
    """

    input_convention = "imagenet"  # the transforms read the exact mean/std from timm's pretrained config

    def __init__(
        self,
        name: str,
        pretrained: str | Path | None = None,
        keep_classifier: bool = False,
        image_size: int | None = None,
    ) -> None:
        super().__init__()
        timm = _timm()
        tokens = is_token_model(name)
        options: dict[str, Any] = {}
        if tokens:
            options["dynamic_img_size"] = True
            if image_size is not None:
                options["img_size"] = image_size
        elif image_size is not None:
            raise ConfigError(f"model.image_size applies to token backbones (ViT), not timm:{name}; "
                              "leave it null (a CNN takes any input size)")
        if pretrained is None:
            net = timm.create_model(name, pretrained=False, **options)
        else:
            net = self._pretrained(timm, name, pretrained, options)
        if not keep_classifier:
            net.reset_classifier(0)
        self.net = net
        self.name = name
        self.out_channels = int(net.num_features)
        self.feature_layout = "tokens" if tokens else "map"
        self.num_prefix_tokens = int(getattr(net, "num_prefix_tokens", 0)) if tokens else None
        self.has_class_token = tokens and getattr(net, "cls_token", None) is not None
        self._channels_last = str(getattr(net, "output_fmt", "NCHW")) == "NHWC" and not tokens

    @staticmethod
    def _pretrained(timm: Any, name: str, pretrained: str | Path, options: dict[str, Any]) -> nn.Module:
        if str(pretrained) in ("imagenet", "timm"):
            file = resolve_timm_weights(name)
        else:
            file = Path(pretrained).expanduser()
            if not file.is_file():
                raise PretrainedWeightsError(f"weight file {file} does not exist")
        if file is not None:
            # timm's loader runs the model's converter (original DINO/DINOv2/CLIP files, position-embedding
            # resampling); .npz files are the JAX releases, which only the model's own loader reads
            options = options | {"pretrained_cfg_overlay": {"file": str(file), "custom_load": file.suffix == ".npz"}}
        try:
            return timm.create_model(name, pretrained=True, **options)
        except Exception as exc:  # hub, network and file-format errors all mean "these weights are not usable"
            where = f"from {file}" if file is not None else "through timm"
            detail = " ".join(str(exc).split())  # one line: load_state_dict lists its mismatches on several
            detail = detail if len(detail) <= 400 else detail[:400] + " …"
            raise PretrainedWeightsError(
                f"could not load the pretrained weights of timm:{name} {where} ({type(exc).__name__}: {detail}); "
                f"{timm_weights_hint(name)}"
            ) from exc

    def forward(self, x: Tensor) -> Tensor:
        features = self.net.forward_features(x)
        return features.permute(0, 3, 1, 2) if self._channels_last else features

    def classify(self, x: Tensor) -> Tensor:
        """Class logits (needs ``keep_classifier=True``)."""
        features = self.net.forward_features(x)
        return self.net.forward_head(features)

    # ---------------------------------------------------------------------------------- blocks (ViTs) ----
    @property
    def num_blocks(self) -> int:
        blocks = getattr(self.net, "blocks", None)
        if self.feature_layout != "tokens" or blocks is None:
            raise ConfigError(f"timm:{self.name} has no numbered transformer blocks (model.freeze_blocks and "
                              "optimizer.layer_decay apply to ViT backbones)")
        return len(blocks)

    def parameter_layers(self) -> dict[str, int]:
        """Layer index of every parameter for layer-wise lr decay (BEiT / MAE rule): the stem (patch embedding,
        class / register tokens, position embedding) is 0, block i is i + 1, the rest (final norm) L + 1."""
        last = self.num_blocks + 1
        layers = {}
        for name, _ in self.net.named_parameters():
            match = _BLOCK.match(name)
            layers[f"net.{name}"] = 0 if name.startswith(_STEM) else int(match.group(1)) + 1 if match else last
        return layers

    def freeze_first_blocks(self, count: int) -> None:
        """``requires_grad=False`` on the stem and the first ``count`` blocks (their weights stay pretrained)."""
        if count > self.num_blocks:
            raise ConfigError(f"model.freeze_blocks is {count}, but timm:{self.name} has {self.num_blocks} blocks")
        if count == 0:
            return
        for name, layer in self.parameter_layers().items():
            if layer <= count:
                self.get_parameter(name).requires_grad_(False)


def layer_decay_groups(backbone: nn.Module, lr_multiplier: float, decay: float) -> list[dict[str, Any]]:
    """Optimizer parameter groups of ``backbone`` with layer-wise lr decay (Clark et al., ELECTRA 2020; BEiT):
    layer ℓ of L + 1 gets ``lr_multiplier · decay^(L + 1 − ℓ)``, so the last block learns fastest and the patch
    embedding slowest. Needs a backbone with numbered blocks (:meth:`TimmBackbone.parameter_layers`)."""
    if not 0.0 < decay <= 1.0:
        raise ConfigError(f"optimizer.layer_decay must be in (0, 1], got {decay}")
    if not isinstance(backbone, TimmBackbone):
        raise ConfigError(f"optimizer.layer_decay needs a ViT backbone with numbered blocks (timm:<vit model>), "
                          f"not {type(backbone).__name__}; leave it at 1.0")
    layers = backbone.parameter_layers()
    last = max(layers.values())
    groups: dict[int, list[nn.Parameter]] = {}
    for name, layer in layers.items():
        groups.setdefault(layer, []).append(backbone.get_parameter(name))
    # the last layer first: group 0 keeps the backbone's own lr, which the training log reports
    return [
        {"name": f"backbone.layer{layer}", "params": params, "lr_multiplier": lr_multiplier * decay ** (last - layer)}
        for layer, params in sorted(groups.items(), reverse=True)
    ]
