"""The criterion: everything between the embeddings and the scalar loss, and how the config composes it.

The loss stack is built inside out — base loss, then the cross-batch memory around it, then a synthesis wrapper
around that — and the miner goes to the innermost wrapper (the one that calls the base loss)::

    loss:      multi_similarity            →  MultiSimilarityLoss()
    memory:    xbm                         →  CrossBatchMemory(loss, miner, embedding_size=…, **params)
    synthesis: das                         →  DAS(memory, num_classes=…, embedding_size=…, **params)

so ``DAS + XBM + miner`` is XBM over DAS-produced embeddings, mined on (batch vs memory) and (batch vs batch).
The builder refuses only the combinations that cannot mean anything, and says why.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

from deepmetric.loss_hooks import LossWrapper, StepContext, TrainingHooks
from deepmetric.losses import LOSSES, MetricLoss, ProxyLoss
from deepmetric.memory import MEMORIES
from deepmetric.miners import MINERS
from deepmetric.synthesis import IAA, SYNTHESIS
from deepmetric.training.config import ConfigError, ExperimentConfig

#: ``memory.params.dtype`` spellings
MEMORY_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32, "float64": torch.float64, "float16": torch.float16, "bfloat16": torch.bfloat16,
}


class Criterion(nn.Module):
    """The composed loss stack the trainer calls; all state (proxies, memory, banks) lives in submodules, so
    ``state_dict()`` is complete.

    ``forward(embeddings, labels, features=None, head=None, step=None, epoch=None) -> (loss, logs)``: builds a
    :class:`~deepmetric.loss_hooks.StepContext`, hands it to every :class:`~deepmetric.loss_hooks.TrainingHooks`
    submodule, evaluates the stack and collects the detached terms of every wrapper (``batch_loss``,
    ``memory_loss``, ``iaa_lambda``, …) plus ``"loss"``, the returned total, as floats.

    ``miner`` is used only when ``loss`` is a bare loss; a wrapper holds its own miner.
    """

    def __init__(self, loss: nn.Module, miner: nn.Module | None = None) -> None:
        super().__init__()
        if miner is not None and isinstance(loss, LossWrapper):
            raise ValueError(f"Criterion: give the miner to the {type(loss).__name__}, not to the criterion")
        self.loss = loss
        self.miner = miner

    def _hooks(self) -> list[TrainingHooks]:
        return [m for m in self.modules() if isinstance(m, TrainingHooks)]

    @property
    def needs_features(self) -> bool:
        """Whether some module needs the pooled backbone features in its step context."""
        return any(hook.needs_features for hook in self._hooks())

    @property
    def estimation_transform(self) -> str:
        """Transform of the epoch-start pass over the training set: ``"train"`` if some module asks for the
        training augmentation (IAA as released), else ``"eval"``."""
        wanted = {hook.estimation_transform for hook in self._hooks()}
        return "train" if "train" in wanted else "eval"

    def estimation_dataset(self, train: Any, train_eval: Any | None) -> Any:
        """The training split under :attr:`estimation_transform` (``train_eval`` carries the eval transform)."""
        return train if self.estimation_transform == "train" or train_eval is None else train_eval

    def on_epoch_start(self, epoch: int, model: nn.Module | None = None, loader: Iterable[Any] | None = None) -> None:
        """Before every 0-based sampler ``epoch`` (IAA re-estimates its class statistics here)."""
        for hook in self._hooks():
            hook.on_epoch_start(epoch, model, loader)

    def forward(
        self,
        embeddings: Tensor,
        labels: Tensor,
        features: Tensor | None = None,
        head: nn.Module | None = None,
        step: int | None = None,
        epoch: int | None = None,
    ) -> tuple[Tensor, dict[str, float]]:
        context = StepContext(step=step, epoch=epoch, features=features, head=head)
        for hook in self._hooks():
            hook.on_step_start(context)
        wrappers = [m for m in self.modules() if isinstance(m, LossWrapper)]
        for wrapper in wrappers:
            wrapper.last_logs = {}
        if self.miner is not None:
            loss = self.loss(embeddings, labels, mined=self.miner(embeddings, labels))
        else:
            loss = self.loss(embeddings, labels)
        logs: dict[str, float] = {}
        for wrapper in wrappers:
            logs.update({key: float(value) for key, value in wrapper.last_logs.items() if key != "loss"})
        logs["loss"] = float(loss.detach())
        return loss, logs

    def parameter_groups(self, lr_multiplier_override: float | None = None) -> list[dict[str, Any]]:
        """The loss-side parameters, one group per learning-rate multiplier (in order of first appearance).

        A parameter's multiplier is the ``lr_multiplier`` of the nearest module above it that declares one — a
        :class:`~deepmetric.losses.MetricLoss` (proxies ×100 for Proxy-Anchor) or a
        :class:`~deepmetric.loss_hooks.LossWrapper` (MDR's levels ×1) — and 1 if none does.
        ``lr_multiplier_override`` (``optimizer.loss_lr_multiplier``) puts every loss-side parameter in one group
        with that multiplier. Groups are ``{"name", "params", "lr_multiplier"}``; the optimizer sets ``lr``.
        """
        multipliers: dict[str, float] = {"": 1.0}
        by_multiplier: dict[float, list[nn.Parameter]] = {}
        seen: set[int] = set()
        for name, module in self.named_modules():
            if name:
                parent = multipliers[name.rpartition(".")[0]]
                multipliers[name] = (
                    float(module.lr_multiplier) if isinstance(module, (MetricLoss, LossWrapper)) else parent
                )
            for param in module.parameters(recurse=False):
                if id(param) in seen:
                    continue
                seen.add(id(param))
                mult = multipliers[name] if lr_multiplier_override is None else float(lr_multiplier_override)
                by_multiplier.setdefault(mult, []).append(param)
        single = len(by_multiplier) == 1
        return [
            {"name": "loss" if single else f"loss_lr_x{mult:g}", "params": params, "lr_multiplier": mult}
            for mult, params in by_multiplier.items()
        ]


# --------------------------------------------------------------------------------------------- building -----
def _lookup(registry: dict[str, Any], name: str, field: str) -> Any:
    if name not in registry:
        raise ConfigError(f"unknown {field} '{name}' (known: {', '.join(sorted(registry))})")
    return registry[name]


def _construct(cls: Any, params: dict[str, Any], field: str, facts: dict[str, Any], **inputs: Any) -> Any:
    """``cls(**inputs, **facts it declares in build_arguments, **params)``; params override the facts."""
    clash = sorted(set(params) & set(inputs))
    if clash:
        raise ConfigError(f"{field}: {', '.join(clash)} cannot be set here (the builder passes it)")
    kwargs = {key: facts[key] for key in cls.build_arguments if key in facts}
    kwargs.update(params)
    try:
        return cls(**inputs, **kwargs)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{field}: cannot build {cls.__name__} with {kwargs}: {exc}") from exc


def _memory_params(params: dict[str, Any]) -> dict[str, Any]:
    if "dtype" not in params:
        return params
    dtype = params["dtype"]
    if dtype not in MEMORY_DTYPES:
        raise ConfigError(f"memory.params.dtype must be one of {', '.join(MEMORY_DTYPES)}, got {dtype!r}")
    return {**params, "dtype": MEMORY_DTYPES[dtype]}


def build_criterion(cfg: ExperimentConfig, num_classes: int, batches_per_epoch: int | None = None) -> Criterion:
    """Loss, miner, memory and synthesis of ``cfg`` composed into one :class:`Criterion`.

    Run facts for ``build_arguments``: ``num_classes``, ``embedding_size`` (``model.embedding_size``) and, when
    ``batches_per_epoch`` is known, ``total_epochs`` (the run length in sampler epochs, IAA's λ schedule).
    """
    facts: dict[str, Any] = {"num_classes": num_classes, "embedding_size": cfg.model.embedding_size}
    if batches_per_epoch:
        facts["total_epochs"] = cfg.train.epochs or max(1, -(-cfg.train.iterations // batches_per_epoch))
    loss_cls = _lookup(LOSSES, cfg.loss.name, "loss.name")
    loss = _construct(loss_cls, cfg.loss.params, "loss.params", facts)
    proxy = isinstance(loss, ProxyLoss)
    miner = None
    if cfg.loss.miner:
        miner_cls = _lookup(MINERS, cfg.loss.miner, "loss.miner")
        if not loss.accepts_mined:
            raise ConfigError(
                f"loss.miner '{cfg.loss.miner}' cannot be used with loss '{cfg.loss.name}': it compares embeddings "
                "with learnable class proxies and takes no mined pairs or triplets; remove loss.miner"
            )
        miner = _construct(miner_cls, cfg.loss.miner_params, "loss.miner_params", facts)
    stack: nn.Module = loss
    if cfg.memory.name:
        memory_cls = _lookup(MEMORIES, cfg.memory.name, "memory.name")
        if proxy:
            raise ConfigError(
                f"memory '{cfg.memory.name}' cannot be used with loss '{cfg.loss.name}': a proxy loss compares each "
                "embedding with its class proxies and ignores reference rows, so the memory term would repeat "
                "the batch term; remove the memory section"
            )
        stack = _construct(memory_cls, _memory_params(cfg.memory.params), "memory.params", facts,
                           loss=stack, miner=miner)
        miner = None
    if cfg.synthesis.name:
        synthesis_cls = _lookup(SYNTHESIS, cfg.synthesis.name, "synthesis.name")
        if proxy and synthesis_cls is IAA:
            raise ConfigError(
                f"synthesis 'iaa' cannot be used with loss '{cfg.loss.name}': IAA's synthetic rows enter the loss "
                "only as reference rows, which a proxy loss ignores, so the result would be the plain loss"
            )
        stack = _construct(synthesis_cls, cfg.synthesis.params, "synthesis.params", facts, loss=stack, miner=miner)
        miner = None
        wants_normalized = stack.expects_normalized_embeddings
        if wants_normalized != cfg.model.normalize:
            raise ConfigError(
                f"synthesis '{cfg.synthesis.name}' expects {'L2-normalised' if wants_normalized else 'raw'} "
                f"embeddings: set model.normalize={'true' if wants_normalized else 'false'}"
            )
    return Criterion(stack, miner=miner)
