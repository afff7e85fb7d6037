"""Loading pretrained weights: from a local file (strict), or "imagenet" from the torch hub cache / download.

Nothing here downloads unless asked for ``"imagenet"`` and the file is not already in
``$TORCH_HOME/hub/checkpoints`` (default ``~/.cache/torch/hub/checkpoints``). Setting ``DEEPMETRIC_OFFLINE=1``
forbids the download attempt; offline, the error says which file to put where.

timm models (:func:`resolve_timm_weights`) are looked up in ``<hub checkpoints>/timm/<model>.<tag>.<ext>``, then
in the Hugging Face cache (and, for weights timm fetches by URL, the hub checkpoints folder); when none has them
timm downloads them into its own cache.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

StateDict = dict[str, Tensor]


class PretrainedWeightsError(RuntimeError):
    """Weights could not be found, read or matched to the model; the message says what to do."""


@dataclass(frozen=True)
class WeightSource:
    """Where the ImageNet weights of a backbone come from: hub-cache file name(s) and download URL."""

    filename: str
    url: str
    alternates: tuple[str, ...] = field(default_factory=tuple)  # older names of the same weights


_TV = "https://download.pytorch.org/models/"
IMAGENET_WEIGHTS: dict[str, WeightSource] = {
    "bninception": WeightSource(
        "bn_inception-52deb4733.pth", "http://data.lip6.fr/cadene/pretrainedmodels/bn_inception-52deb4733.pth"
    ),
    "googlenet": WeightSource("googlenet-1378be20.pth", _TV + "googlenet-1378be20.pth"),
    "resnet18": WeightSource(
        "resnet18-f37072fd.pth", _TV + "resnet18-f37072fd.pth", ("resnet18-5c106cde.pth",)
    ),
    "resnet50": WeightSource(
        "resnet50-0676ba61.pth", _TV + "resnet50-0676ba61.pth", ("resnet50-19c8e357.pth",)
    ),
    "resnet101": WeightSource("resnet101-63fe2227.pth", _TV + "resnet101-63fe2227.pth"),
    "mobilenet_v2": WeightSource("mobilenet_v2-b0353104.pth", _TV + "mobilenet_v2-b0353104.pth"),
    "efficientnet_b0": WeightSource(
        "efficientnet_b0_rwightman-7f5810bc.pth", _TV + "efficientnet_b0_rwightman-7f5810bc.pth"
    ),
    "efficientnet_b1": WeightSource(
        "efficientnet_b1_rwightman-bac287d4.pth", _TV + "efficientnet_b1_rwightman-bac287d4.pth"
    ),
}


def hub_checkpoint_dir() -> Path:
    """``torch.hub.get_dir()/checkpoints`` — where torchvision caches (and we look for) weight files."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def _download(url: str, dst: Path) -> None:
    """Fetch ``url`` to ``dst`` (a seam for tests, which replace it to guarantee no network use)."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    torch.hub.download_url_to_file(url, str(dst), progress=False)


def _offline() -> bool:
    return os.environ.get("DEEPMETRIC_OFFLINE", "").strip().lower() in ("1", "true", "yes")


def resolve_imagenet_file(backbone: str) -> Path:
    """Local path of ``backbone``'s ImageNet weights, downloading into the hub cache if allowed and needed."""
    if backbone not in IMAGENET_WEIGHTS:
        raise PretrainedWeightsError(
            f"no ImageNet weights are known for backbone {backbone!r} (known: {sorted(IMAGENET_WEIGHTS)}); "
            f"pass a weight file with model.pretrained=/path/to/weights.pth"
        )
    src = IMAGENET_WEIGHTS[backbone]
    cache = hub_checkpoint_dir()
    for name in (src.filename, *src.alternates):
        if (cache / name).is_file():
            return cache / name
    target = cache / src.filename
    hint = (
        f"put the file {src.filename} (from {src.url}) at {target}, or pass its location with "
        f"model.pretrained=/path/to/{src.filename}"
    )
    if _offline():
        raise PretrainedWeightsError(
            f"ImageNet weights for {backbone!r} not found and DEEPMETRIC_OFFLINE is set: {hint}"
        )
    try:
        _download(src.url, target)
    except Exception as exc:  # URLError, HTTPError, timeouts, SSL errors … all mean "not available"
        raise PretrainedWeightsError(
            f"could not download ImageNet weights for {backbone!r} ({type(exc).__name__}: {exc}); {hint}"
        ) from exc
    return target


def _timm_source(name: str) -> tuple[str, str, str]:
    """(full model name with its tag, file name, download address) of timm model ``name``'s pretrained weights."""
    try:
        from timm.models import get_pretrained_cfg
    except ImportError as exc:
        raise ImportError("timm backbones need the optional dependency timm: pip install 'deepmetric[timm]'") from exc
    cfg = get_pretrained_cfg(name)
    if cfg is None or not (cfg.hf_hub_id or cfg.url):
        raise PretrainedWeightsError(
            f"timm publishes no pretrained weights for {name!r}; timm.list_pretrained('{name.split('.')[0]}*') lists "
            "the tags that have them (e.g. timm:vit_small_patch16_224.dino), or pass model.pretrained=/path/to/file"
        )
    if cfg.hf_hub_id:
        filename = cfg.hf_hub_filename or "model.safetensors"
        return cfg.hf_hub_id.split("/")[-1], filename, f"https://huggingface.co/{cfg.hf_hub_id}/resolve/main/{filename}"
    full = f"{cfg.architecture}.{cfg.tag}" if cfg.tag else name
    return full, cfg.url.rsplit("/", 1)[-1], cfg.url


def timm_weights_file(name: str) -> Path:
    """Where deepmetric looks first for timm model ``name``'s weights: ``<hub checkpoints>/timm/<model>.<tag>.<ext>``."""
    full, filename, _ = _timm_source(name)
    return hub_checkpoint_dir() / "timm" / f"{full}{Path(filename).suffix}"


def timm_weights_hint(name: str) -> str:
    """What to do without network: the file to download, and where to put it or how to pass it."""
    _, filename, address = _timm_source(name)
    return (f"put the file {filename} (from {address}) at {timm_weights_file(name)}, or pass its location with "
            f"model.pretrained=/path/to/{filename}")


def resolve_timm_weights(name: str) -> Path | None:
    """A local file with timm model ``name``'s pretrained weights, or None when timm is to download them.

    Offline (``DEEPMETRIC_OFFLINE``) without a local file: :class:`PretrainedWeightsError` naming the file to place.
    """
    full, filename, address = _timm_source(name)
    candidates = [timm_weights_file(name)]
    if address.startswith("https://huggingface.co/"):
        from huggingface_hub import try_to_load_from_cache

        repo = address[len("https://huggingface.co/"):].split("/resolve/")[0]
        for hub_name in dict.fromkeys((filename, "model.safetensors", "pytorch_model.bin")):
            cached = try_to_load_from_cache(repo, hub_name)
            if isinstance(cached, str):
                candidates.append(Path(cached))
    else:
        candidates.append(hub_checkpoint_dir() / filename)  # timm's URL downloads land there
    for path in candidates:
        if path.is_file():
            return path
    if _offline():
        raise PretrainedWeightsError(
            f"pretrained weights of timm:{full} not found and DEEPMETRIC_OFFLINE is set: {timm_weights_hint(name)}"
        )
    return None


def read_state_dict(path: str | Path) -> StateDict:
    """Tensors of a weight file; unwraps ``{"state_dict"|"model"|"model_state_dict": …}`` and DDP ``module.``."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise PretrainedWeightsError(f"weight file {path} does not exist")
    try:
        obj: Any = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise PretrainedWeightsError(f"cannot read weight file {path}: {exc}") from exc
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model_state_dict", "model"):
            if key in obj and isinstance(obj[key], Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise PretrainedWeightsError(f"{path} does not hold a state dict (a mapping from names to tensors)")
    if obj and all(k.startswith("module.") for k in obj):
        obj = {k[len("module.") :]: v for k, v in obj.items()}
    return dict(obj)


def squeeze_leading_singletons(state: StateDict, reference: StateDict) -> StateDict:
    """Reshape (1, C) tensors to (C,) where the model has (C,): the Cadene BN-Inception file stores BN
    parameters and statistics with a leading singleton dimension (an artefact of its Caffe conversion)."""
    out = {}
    for k, v in state.items():
        ref = reference.get(k)
        if ref is not None and v.shape != ref.shape and v.dim() == ref.dim() + 1 and v.shape[0] == 1:
            v = v.reshape(ref.shape) if v.numel() == ref.numel() else v
        out[k] = v
    return out


def _short(keys: list[str], limit: int = 12) -> str:
    more = f" … (+{len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def load_state_dict_strict(
    module: nn.Module,
    state: StateDict,
    source: str,
    adapt: Callable[[StateDict, StateDict], StateDict] | None = None,
) -> None:
    """``module.load_state_dict(state, strict=True)`` with an error listing missing/unexpected/mis-shaped keys.

    ``num_batches_tracked`` buffers absent from old (pre-PyTorch-0.4) files are not counted as missing: they are
    bookkeeping, not weights, and PyTorch itself fills them in for such files.
    """
    reference = module.state_dict()
    if adapt is not None:
        state = adapt(state, reference)
    missing = [k for k in reference if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in reference]
    mismatched = [
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(reference[k].shape)}"
        for k in reference
        if k in state and state[k].shape != reference[k].shape
    ]
    if missing or unexpected or mismatched:
        parts = [f"weights from {source} do not match {type(module).__name__} (strict loading):"]
        if missing:
            parts.append(f"  missing keys ({len(missing)}): {_short(missing)}")
        if unexpected:
            parts.append(f"  unexpected keys ({len(unexpected)}): {_short(unexpected)}")
        if mismatched:
            parts.append(f"  shape mismatches ({len(mismatched)}): {_short(mismatched)}")
        raise PretrainedWeightsError("\n".join(parts))
    for k, v in reference.items():
        if k.endswith("num_batches_tracked") and k not in state:
            state[k] = v
    module.load_state_dict(state, strict=True)


def load_weights(
    module: nn.Module,
    path: str | Path,
    adapt: Callable[[StateDict, StateDict], StateDict] | None = None,
) -> None:
    """Read ``path`` and load it strictly into ``module`` (see :func:`load_state_dict_strict`)."""
    load_state_dict_strict(module, read_state_dict(path), str(path), adapt)
