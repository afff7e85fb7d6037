"""IAA — Intra-class Adaptive Augmentation with Neighbor Correction (Fu et al., IEEE TMM 2022).

Pieces (methods.md §5.2 paper, §5.3 released code ``darkpromise98/IAA``):

* :class:`~deepmetric.synthesis.iaa_estimator.ClassGaussianEstimator` — the per-class diagonal Gaussians with
  the paper's neighbor correction (module :mod:`deepmetric.synthesis.iaa_estimator`).
* :func:`iaa_synthesize` — M copies ẑ_i^m = z_i + √λ·σ_{y_i} ⊙ ε_m (paper), or the code's cumulative-√ bug.
* :func:`iaa_lambda` — the code's undocumented λ schedule.
* :class:`IAASynthesizer` — estimator + synthesis: ``(z, y) -> ([z; ẑ¹; …; ẑᴹ], [y; …], is_synthetic)``.
* :class:`IAA` — the wrapper around a base loss: real rows are the only anchors, synthetic rows are extra
  candidates, an anchor's own copies are ignored.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor, nn

from deepmetric.functional import l2_normalize
from deepmetric.loss_hooks import StepContext
from deepmetric.synthesis.base import (
    LossFn,
    RandomSource,
    SynthesisMethod,
    check_embeddings,
    own_copy_ignore_mask,
)
from deepmetric.synthesis.iaa_estimator import ClassGaussianEstimator, EstimatorUpdate

#: λ schedule of the released code (``intra.py:lamda_epoch``): factor f(ep/E) by upper bound of ep/E.
LAMBDA_SCHEDULE: tuple[tuple[float, float], ...] = ((0.4, 1.0), (0.6, 0.9), (0.8, 0.75), (math.inf, 0.6))


def iaa_lambda(lam: float, epoch: int, total_epochs: int) -> float:
    """λ_ep = λ·f(ep/E), f = 1.0 (≤0.4), 0.9 (≤0.6), 0.75 (≤0.8), 0.6 (>0.8); ``epoch`` is 1-based.

    Not in the paper; the released code uses it for every run (methods.md §5.3).
    """
    if total_epochs <= 0:
        raise ValueError(f"total_epochs must be positive, got {total_epochs}")
    ratio = epoch / total_epochs
    for bound, factor in LAMBDA_SCHEDULE:
        if ratio <= bound:
            return lam * factor
    raise AssertionError("unreachable")  # pragma: no cover


def iaa_synthesize(
    embeddings: Tensor,
    variances: Tensor,
    lam: float,
    num_copies: int,
    *,
    noise: Tensor | None = None,
    generator: torch.Generator | None = None,
    legacy_cumulative_sqrt: bool = False,
) -> Tensor:
    """M synthetic copies of each row, stacked copy-major: output (M·B) × d, row m·B + i is copy m+1 of row i.

    Paper (§IV-C): ẑ_i^m = z_i + √λ · σ_i ⊙ ε_m with σ_i = √Σ_{y_i} (the per-row class variances passed in
    ``variances``, B × d) and ε_m ~ N(0, I), for every m.

    ``legacy_cumulative_sqrt=True`` reproduces ``intra.py:intra_synthetsis``, which applies the square root
    cumulatively: copy m uses Σ^(1/2^m) (σ, σ^½, σ^¼, …), so later copies are much noisier when σ ≪ 1.
    ``noise`` (M × B × d) injects ε; otherwise it is drawn from ``generator``.
    """
    if variances.shape != embeddings.shape:
        raise ValueError(
            f"variances must be per-row (B×d) like embeddings {tuple(embeddings.shape)}, got {tuple(variances.shape)}"
        )
    if lam < 0:
        raise ValueError(f"lam must be ≥ 0, got {lam}")
    shape = (num_copies, *embeddings.shape)
    if noise is None:
        noise = torch.randn(shape, generator=generator, device=embeddings.device, dtype=embeddings.dtype)
    elif noise.shape != shape:
        raise ValueError(f"noise must have shape (M, B, d) = {shape}, got {tuple(noise.shape)}")
    scale = math.sqrt(lam)
    variances = variances.clamp_min(0.0)
    if legacy_cumulative_sqrt:
        stds, v = [], variances
        for _ in range(num_copies):
            v = v.sqrt()
            stds.append(v)
        std = torch.stack(stds) if stds else variances.new_zeros(shape)
    else:
        std = variances.sqrt().unsqueeze(0)
    return (embeddings.unsqueeze(0) + scale * std * noise).reshape(-1, embeddings.shape[1])


class IAASynthesizer(nn.Module):
    """Estimator + synthesis: ``(z, y) -> ([z; ẑ¹; …; ẑᴹ], [y; …; y], is_synthetic)`` with B(1+M) rows.

    Use :meth:`ignore_mask` (B × B(1+M)) with the base loss so that real rows are the only anchors and an
    anchor's own copies are not its positives::

        z_all, y_all, _ = synth(z, y, lam=0.8)
        z_all = l2_normalize(z_all)
        loss = base(z_all[:B], y, z_all, y_all, ignore_mask=synth.ignore_mask(B))

    Randomness comes from the module's :class:`RandomSource` (seed ``seed``; its state is in ``state_dict``).
    ``detach=True`` builds copies from z.detach() (the code's default is False: gradients flow through the copy).
    """

    def __init__(
        self,
        num_classes: int,
        embedding_size: int,
        *,
        num_copies: int = 3,
        legacy_cumulative_sqrt: bool = False,
        detach: bool = False,
        seed: int | None = 0,
        **estimator_kwargs: Any,
    ) -> None:
        super().__init__()
        if num_copies < 0:
            raise ValueError(f"num_copies must be ≥ 0, got {num_copies}")
        self.num_copies = num_copies
        self.legacy_cumulative_sqrt = legacy_cumulative_sqrt
        self.detach = detach
        self.estimator = ClassGaussianEstimator(num_classes, embedding_size, **estimator_kwargs)
        self.rng = RandomSource(seed)

    def ignore_mask(self, batch_size: int, device: torch.device | str | None = None) -> Tensor:
        return own_copy_ignore_mask(batch_size, self.num_copies, device=device)

    def forward(
        self, embeddings: Tensor, labels: Tensor, lam: float, *, noise: Tensor | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        check_embeddings(embeddings, labels, "IAASynthesizer", self.estimator.embedding_size)
        source = embeddings.detach() if self.detach else embeddings
        variances = self.estimator.class_variances(labels).to(embeddings.dtype)
        gen = self.rng.generator(embeddings.device) if noise is None else None
        copies = iaa_synthesize(
            source, variances, lam, self.num_copies, noise=noise, generator=gen,
            legacy_cumulative_sqrt=self.legacy_cumulative_sqrt,
        )
        b = embeddings.shape[0]
        out = torch.cat([embeddings, copies], dim=0)
        out_labels = labels.repeat(1 + self.num_copies)
        is_synthetic = torch.arange(out.shape[0], device=embeddings.device) >= b
        return out, out_labels, is_synthetic


def default_unpack_batch(batch: Any) -> tuple[Any, Tensor]:
    """(inputs, labels) from a loader batch: a tuple/list (inputs, labels, ...) or a dict with the usual keys."""
    if isinstance(batch, (tuple, list)) and len(batch) >= 2:
        return batch[0], batch[1]
    if isinstance(batch, Mapping):
        inputs = next((batch[k] for k in ("images", "image", "inputs", "input", "x") if k in batch), None)
        labels = next((batch[k] for k in ("labels", "label", "targets", "target", "y") if k in batch), None)
        if inputs is not None and labels is not None:
            return inputs, labels
    raise TypeError(
        "IAA estimation pass: cannot find (inputs, labels) in a loader batch of type "
        f"{type(batch).__name__}; pass embed_fn=(model, batch) -> (embeddings, labels) to IAA"
    )


class IAA(SynthesisMethod):
    """IAA wrapper around a base loss (Fu et al., "Intra-class Adaptive Augmentation with Neighbor Correction for
    Deep Metric Learning", IEEE TMM 2022).

    Expects the **raw** head output (``expects_normalized_embeddings = False``): the estimator, as in the code,
    models un-normalised embeddings; real and synthetic rows are L2-normalised before the loss (``normalize``).

    Per batch, when active (estimator initialised, code epoch ep > ``start_epoch``, M > 0 and λ_ep > 0)::

        λ_ep = λ·f(ep/E)  (code schedule, ``lambda_schedule=True``; constant λ otherwise)
        Z' = [z; ẑ¹; …; ẑᴹ],  ẑ^m = z + √λ_ep·σ_y ⊙ ε_m
        L  = base(normalize(z), y, normalize(Z'), [y; …], ignore_mask = own row and own copies)

    otherwise ``L = base(normalize(z), y)`` — exactly the base loss (also when ``num_copies=0`` or ``lam=0``).

    With a ``miner``, the tuples are mined on exactly the rows the loss compares (real anchors vs [real; copies]
    with the own-copy mask when active, the batch vs itself otherwise) and passed as ``mined=``.
    ``IAA(CrossBatchMemory(loss))`` adds a memory of the normalised real rows (see :mod:`deepmetric.memory`).

    Epochs: the trainer's ``epoch`` is **0-based** and arrives through :meth:`on_step_start` /
    :meth:`on_epoch_start` (kept in the ``current_epoch`` buffer); the paper/code epoch is ep = epoch + 1 (used by the λ
    schedule, ``start_epoch`` and ``total_epochs``), so with ``start_epoch=30`` trainer epochs 0–29 are the
    plain baseline and synthesis starts at trainer epoch 30 (code epoch 31).

    Estimation: :meth:`on_epoch_start` re-estimates from a pass of ``model`` over ``loader`` in eval mode
    without gradients, before the epoch's first step, at code epochs start_epoch+1, start_epoch+1+update_every,
    … (code: 31, 33, …; the paper re-estimates every 4 epochs). The pass covers every training image once, in
    order. ``estimation_transform`` says which transform the trainer's loader applies: ``"train"`` (default)
    the training augmentation, as the released code (``run.py``: ``loader_train_eval`` is built on
    ``dataset_train``, which carries ``train_transform``); ``"eval"`` the deterministic evaluation transform.
    The paper does not say; the default follows the code because the estimated Σ perturbs embeddings of
    augmented training images, so it is estimated on that same distribution. Model mode: the code runs the
    pass in train mode with every BN in eval mode; its backbones (and ours, cut before any dropout) have no
    other train-mode layer, so that equals eval mode, which is used here so that a trainer whose BN policy
    trains the statistics does not update them on the estimation pass.
    ``embed_fn(model, batch) -> (embeddings, labels)`` customises how a batch is embedded.

    Defaults follow the paper (plain estimate, correct √ for every copy, constant λ, update every 4 epochs).
    Neighbor correction is off by default: the paper applies it only to few-sample datasets (SOP, In-shop,
    VehicleID; methods.md §5.2), so enable it there; the released code computes it and never applies it.
    :meth:`legacy_kwargs` gives the released code's settings (running update with momentum 0.2, no neighbor
    correction, cumulative √, λ schedule, update every 2 epochs, estimation on augmented images).
    ``start_epoch=30`` is the code's value (the paper does not state one). With an iteration-based
    trainer set ``total_epochs`` to the number of sampler epochs of the run, or the λ schedule is meaningless.
    """

    expects_normalized_embeddings = False
    build_arguments: ClassVar[tuple[str, ...]] = ("num_classes", "embedding_size", "total_epochs")

    def __init__(
        self,
        loss: LossFn,
        miner: nn.Module | None = None,
        *,
        num_classes: int,
        embedding_size: int,
        num_copies: int = 3,
        lam: float = 0.8,
        lambda_schedule: bool = False,
        total_epochs: int = 100,
        start_epoch: int = 30,
        update_every: int = 4,
        estimator_update: EstimatorUpdate = "plain",
        momentum: float = 0.2,
        apply_neighbor_correction: bool = False,
        num_neighbors: int = 25,
        beta: float = 0.1,
        gamma: float = 0.1,
        tau: int = 40,
        sigma_m: float = 1.0,
        sigma_cv: float = 1.0,
        legacy_cumulative_sqrt: bool = False,
        detach: bool = False,
        normalize: bool = True,
        estimation_transform: Literal["train", "eval"] = "train",
        seed: int | None = 0,
        embed_fn: Callable[[nn.Module, Any], tuple[Tensor, Tensor]] | None = None,
    ) -> None:
        super().__init__(loss, miner)
        if update_every < 1:
            raise ValueError(f"update_every must be ≥ 1, got {update_every}")
        if lam < 0:
            raise ValueError(f"lam must be ≥ 0, got {lam}")
        if estimation_transform not in ("train", "eval"):
            raise ValueError(f"estimation_transform must be 'train' or 'eval', got {estimation_transform!r}")
        self.lam = lam
        self.estimation_transform = estimation_transform
        self.lambda_schedule = lambda_schedule
        self.total_epochs = total_epochs
        self.start_epoch = start_epoch
        self.update_every = update_every
        self.normalize = normalize
        self.embed_fn = embed_fn
        self.synthesizer = IAASynthesizer(
            num_classes, embedding_size, num_copies=num_copies, legacy_cumulative_sqrt=legacy_cumulative_sqrt,
            detach=detach, seed=seed, update=estimator_update, momentum=momentum,
            apply_neighbor_correction=apply_neighbor_correction, num_neighbors=num_neighbors, beta=beta,
            gamma=gamma, tau=tau, sigma_m=sigma_m, sigma_cv=sigma_cv,
        )
        self.register_buffer("current_epoch", torch.zeros((), dtype=torch.long))

    @staticmethod
    def legacy_kwargs() -> dict[str, Any]:
        """Constructor overrides reproducing ``darkpromise98/IAA`` (methods.md §5.3)."""
        return {
            "estimator_update": "running", "momentum": 0.2, "apply_neighbor_correction": False,
            "legacy_cumulative_sqrt": True, "update_every": 2, "start_epoch": 30, "lambda_schedule": True,
            "estimation_transform": "train",
        }

    @property
    def estimator(self) -> ClassGaussianEstimator:
        return self.synthesizer.estimator

    @property
    def num_copies(self) -> int:
        return self.synthesizer.num_copies

    def lambda_at(self, epoch: int) -> float:
        """λ for the 0-based trainer ``epoch`` (code epoch ep = epoch + 1)."""
        return iaa_lambda(self.lam, epoch + 1, self.total_epochs) if self.lambda_schedule else self.lam

    def is_active_epoch(self, epoch: int) -> bool:
        """Synthesis runs in code epochs ep > start_epoch (0-based trainer ``epoch`` ≥ start_epoch)."""
        return epoch + 1 > self.start_epoch

    def should_update(self, epoch: int) -> bool:
        """True at code epochs start_epoch+1, start_epoch+1+update_every, … (trainer ``epoch`` is 0-based)."""
        ep = epoch + 1
        return ep > self.start_epoch and (ep - self.start_epoch - 1) % self.update_every == 0

    def on_step_start(self, context: StepContext) -> None:
        if context.epoch is not None:
            self.current_epoch.fill_(int(context.epoch))

    def on_epoch_start(self, epoch: int, model: nn.Module | None = None, loader: Iterable[Any] | None = None) -> None:
        self.current_epoch.fill_(int(epoch))
        if model is not None and loader is not None and self.should_update(epoch):
            self.estimate(model, loader)

    @torch.no_grad()
    def estimate(self, model: nn.Module, loader: Iterable[Any]) -> None:
        """Re-estimate the class Gaussians from one pass of ``model`` (eval mode, no grad) over ``loader``."""
        modes = [(m, m.training) for m in model.modules()]
        model.eval()
        try:
            device = next((p.device for p in model.parameters()), self.estimator.means.device)
            est = self.estimator
            est.begin_pass()
            for batch in loader:
                if self.embed_fn is not None:
                    emb, labels = self.embed_fn(model, batch)
                else:
                    inputs, labels = default_unpack_batch(batch)
                    if isinstance(inputs, Tensor):
                        inputs = inputs.to(device)
                    emb = model(inputs)
                if not isinstance(emb, Tensor):
                    raise TypeError(
                        f"IAA estimation pass: the model returned {type(emb).__name__}, expected a Tensor of "
                        "embeddings; pass embed_fn=(model, batch) -> (embeddings, labels)"
                    )
                est.accumulate(emb, torch.as_tensor(labels).to(est.means.device))
            est.end_pass()
        finally:
            # restore per-module flags: a plain model.train() would undo the trainer's BN-freezing policy
            for m, was_training in modes:
                m.training = was_training

    def forward(
        self,
        embeddings: Tensor,
        labels: Tensor,
        ref_embeddings: Tensor | None = None,
        ref_labels: Tensor | None = None,
    ) -> Tensor:
        self._refuse_references(ref_embeddings)
        ep = int(self.current_epoch)
        lam = self.lambda_at(ep)
        active = (
            bool(self.estimator.initialized) and self.is_active_epoch(ep) and self.num_copies > 0 and lam > 0
        )
        norm = l2_normalize if self.normalize else (lambda x: x)
        if not active:
            loss = self.inner_loss(norm(embeddings), labels)
            self.last_logs = {"loss": loss.detach(), "iaa_active": 0.0, "iaa_lambda": lam}
            return loss
        z_all, y_all, _ = self.synthesizer(embeddings, labels, lam)
        z_all = norm(z_all)
        b = embeddings.shape[0]
        loss = self.inner_loss(
            z_all[:b], labels, z_all, y_all, ignore_mask=self.synthesizer.ignore_mask(b, embeddings.device)
        )
        self.last_logs = {"loss": loss.detach(), "iaa_active": 1.0, "iaa_lambda": lam}
        return loss
