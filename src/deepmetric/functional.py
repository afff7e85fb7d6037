"""Shared dense math: normalisation, similarity and distance matrices, label masks and masked reductions.

Every loss in the library computes one B×R similarity (or distance) matrix between B anchors and R reference
rows and masks over it. Self-comparisons are removed by *index* (an ``ignore_mask`` or the diagonal), never by
testing whether a similarity is close to 1, so exact duplicate embeddings stay valid positives.

Masks may be boolean or 0/1 in the matrix's dtype. The masked reductions below select by multiplying with
the mask or by adding a large negative penalty outside it, instead of filling with ±inf, so that an empty row
stays finite and its gradient is zero (a row of −inf would give NaN gradients through ``logsumexp``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

# Added outside a mask before a max: finite in fp32, and no selected value comes near it.
MASK_PENALTY = 1e30
# exp of arguments below about −87 (fp32 underflow) takes a slow path on CPU; e^{−80} is below any sum's precision.
EXP_RANGE = 80.0


def as_float(x: Tensor) -> Tensor:
    """Half-precision inputs are promoted to fp32 so similarities and softmaxes accumulate in fp32 under autocast."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def l2_normalize(x: Tensor, eps: float = 1e-12) -> Tensor:
    """Row-wise L2 normalisation (zero rows stay zero)."""
    return F.normalize(x, p=2.0, dim=-1, eps=eps)


def gram_matrix(x: Tensor, y: Tensor) -> Tensor:
    """x yᵀ with autocast off, so products of half inputs (promoted by the callers) accumulate in fp32."""
    with torch.autocast(device_type=x.device.type, enabled=False):
        return x @ y.t()


def cosine_similarity_matrix(x: Tensor, y: Tensor) -> Tensor:
    """S_ij = x̂_iᵀŷ_j, accumulated in fp32 even under fp16/bf16 autocast."""
    xn = l2_normalize(as_float(x))
    return gram_matrix(xn, xn if y is x else l2_normalize(as_float(y)))


def sqrt_zero_safe(sq: Tensor, eps: float = 1e-12) -> Tensor:
    """√(sq + eps) where sq > 0, and exactly 0 with a zero gradient where sq = 0 (an exact duplicate).

    eps bounds the sqrt's derivative for near-duplicates; an exact duplicate is at distance 0, as in PML
    (``torch.cdist``), so a hinge at margin 0 gives exactly 0 there and ``avg_nonzero`` does not count it.
    """
    positive = sq > 0
    return torch.where(positive, torch.where(positive, sq, torch.ones_like(sq)).add(eps).sqrt(), torch.zeros_like(sq))


def euclidean_distance_matrix(x: Tensor, y: Tensor, squared: bool = False, eps: float = 1e-12) -> Tensor:
    """D_ij = ‖x_i − y_j‖₂ via the GEMM expansion, clamped at 0; the sqrt as in :func:`sqrt_zero_safe`.

    The expansion rounds: in float32 an exact duplicate of unit rows can come out at D ≈ 3e-4 instead of 0
    (float64 and small float32 inputs give 0 exactly).
    """
    same = y is x
    x = as_float(x)
    y = x if same else as_float(y)
    x_sq = (x * x).sum(1, keepdim=True)
    y_sq = x_sq.t() if same else (y * y).sum(1).unsqueeze(0)
    sq = torch.add(x_sq, gram_matrix(x, y), alpha=-2.0).add_(y_sq).clamp_min_(0.0)
    return sq if squared else sqrt_zero_safe(sq, eps)


def pairwise_distance(x: Tensor, y: Tensor, *, normalize: bool = True, squared: bool = False) -> Tensor:
    """Euclidean (or squared) distance matrix, optionally between L2-normalised rows (PML's LpDistance default)."""
    if normalize:
        xn = l2_normalize(as_float(x))
        return euclidean_distance_matrix(xn, xn if y is x else l2_normalize(as_float(y)), squared=squared)
    return euclidean_distance_matrix(x, y, squared=squared)


def row_distance(x: Tensor, y: Tensor, squared: bool = False, eps: float = 1e-12) -> Tensor:
    """‖x_i − y_i‖₂ of matched rows (or its square); the sqrt as in :func:`sqrt_zero_safe`."""
    sq = (x - y).square().sum(1)
    return sq if squared else sqrt_zero_safe(sq, eps)


def distance_from_cosine(sim: Tensor, eps: float = 1e-12) -> Tensor:
    """Euclidean distance between unit vectors from their cosine: √(2 − 2S), with eps so the sqrt has a gradient at 0."""
    return torch.sqrt((2.0 - 2.0 * sim).clamp_min(0.0) + eps)


def check_loss_inputs(embeddings: Tensor, labels: Tensor, ref_embeddings: Tensor | None,
                      ref_labels: Tensor | None, ignore_mask: Tensor | None = None) -> None:
    """Shape checks shared by every loss and miner entry point; errors say what was expected.

    ``ignore_mask`` must be B×R, where R = B when the batch is compared with itself.
    """
    if embeddings.dim() != 2:
        raise ValueError(f"embeddings must be 2-D (batch, dim), got shape {tuple(embeddings.shape)}")
    if labels.dim() != 1 or labels.shape[0] != embeddings.shape[0]:
        raise ValueError(
            f"labels must be 1-D with one label per embedding row: got labels {tuple(labels.shape)} "
            f"for embeddings {tuple(embeddings.shape)}"
        )
    if (ref_embeddings is None) != (ref_labels is None):
        raise ValueError("ref_embeddings and ref_labels must be given together")
    if ref_embeddings is not None:
        if ref_embeddings.dim() != 2 or ref_embeddings.shape[1] != embeddings.shape[1]:
            raise ValueError(
                f"ref_embeddings must be 2-D with dim {embeddings.shape[1]}, got {tuple(ref_embeddings.shape)}"
            )
        if ref_labels.dim() != 1 or ref_labels.shape[0] != ref_embeddings.shape[0]:
            raise ValueError("ref_labels must be 1-D with one label per ref_embeddings row")
    n_ref = embeddings.shape[0] if ref_embeddings is None else ref_embeddings.shape[0]
    if ignore_mask is not None and ignore_mask.shape != (embeddings.shape[0], n_ref):
        raise ValueError(
            f"ignore_mask must have shape (B, R) = {(embeddings.shape[0], n_ref)}, got {tuple(ignore_mask.shape)}"
        )


def resolve_reference(
    embeddings: Tensor,
    labels: Tensor,
    ref_embeddings: Tensor | None,
    ref_labels: Tensor | None,
    ignore_mask: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Apply the library's one loss convention.

    ``ref_embeddings=None`` means "the batch against itself" (the references are ``embeddings``, the same
    object) and the diagonal is ignored (self-pairs removed by index). With explicit references nothing is
    ignored unless ``ignore_mask`` (B×R, True = never use this pair) says so; cross-batch memory and synthesis
    wrappers use it to drop an anchor's own memory slot or copies.
    """
    check_loss_inputs(embeddings, labels, ref_embeddings, ref_labels, ignore_mask)
    if ref_embeddings is None:
        n = embeddings.shape[0]
        eye = torch.eye(n, dtype=torch.bool, device=embeddings.device)
        ignore_mask = eye if ignore_mask is None else (ignore_mask | eye)
        return embeddings, labels, ignore_mask
    return ref_embeddings, ref_labels, ignore_mask


def label_masks(labels: Tensor, ref_labels: Tensor, ignore_mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Boolean (positive, negative) masks of shape B×R; ignored pairs are in neither."""
    same = labels.unsqueeze(1) == ref_labels.to(labels.device).unsqueeze(0)
    positive, negative = same, ~same
    if ignore_mask is not None:
        keep = ~ignore_mask.to(same.device)
        positive, negative = positive & keep, negative & keep
    return positive, negative


def mask_penalty(mask: Tensor, dtype: torch.dtype) -> Tensor:
    """0 on the mask, −``MASK_PENALTY`` elsewhere: added to a matrix it takes the unmasked entries out of a max or
    a log-sum-exp while leaving the masked ones exactly as they are."""
    return torch.sub(mask.to(dtype), 1.0).mul_(MASK_PENALTY)


def masked_logsumexp(x: Tensor, mask: Tensor, dim: int = -1, add_one: bool = False) -> Tensor:
    """log Σ_{mask} eˣ along ``dim`` (or log(1 + Σ_{mask} eˣ) with ``add_one``), stable.

    ``add_one`` adds the implicit term e⁰, which makes an empty row exactly 0 — the ``log(1 + Σ ...)`` form of
    MS, Proxy-Anchor and binomial losses. Without it an empty row gives a large negative finite value (about
    −1e30) and zero gradients; callers leave such rows out.

    The row's largest selected value is subtracted first, and the differences are clamped to [−80, 80]: a term
    e^{−80} below the largest is invisible even in float64 sums of 10⁴ terms, exp stays away from its slow
    underflow range, and the unselected entries (which may lie far above the selected maximum) stay finite
    until the mask zeroes them. The selected maximum itself sits at 0, inside the clamp, so it keeps its
    gradient.
    """
    m = mask.to(x.dtype)
    top = (x.detach() + mask_penalty(m, x.dtype)).amax(dim, keepdim=True)
    if add_one:
        top = top.clamp_min(0.0)
    total = (torch.clamp(x - top, -EXP_RANGE, EXP_RANGE).exp() * m).sum(dim, keepdim=True)
    if add_one:
        total = total + torch.exp(-top)
    else:
        total = total.clamp_min(torch.finfo(x.dtype).tiny)
    return (top + torch.log(total)).squeeze(dim)


def masked_max(x: Tensor, mask: Tensor, dim: int = -1) -> Tensor:
    """max over ``mask`` along ``dim``; −inf for empty rows (gradient flows to the max)."""
    values = (x + mask_penalty(mask, x.dtype)).amax(dim)
    return values.masked_fill(mask.to(x.dtype).amax(dim) <= 0, float("-inf"))


def masked_min(x: Tensor, mask: Tensor, dim: int = -1) -> Tensor:
    """min over ``mask`` along ``dim``; +inf for empty rows."""
    return -masked_max(-x, mask, dim)


def masked_mean(x: Tensor, mask: Tensor, dim: int = -1) -> Tensor:
    """mean over ``mask`` along ``dim``; 0 for empty rows (no 0/0)."""
    m = mask.to(x.dtype)
    return (x * m).sum(dim) / m.sum(dim).clamp_min(1.0)


def zero_loss(*tensors: Tensor) -> Tensor:
    """A scalar 0 that is still connected to the graph of ``tensors`` (backward gives zero grads, never NaN)."""
    total = None
    for t in tensors:
        term = (as_float(t) * 0.0).sum()
        total = term if total is None else total + term
    if total is None:
        raise ValueError("zero_loss needs at least one tensor")
    return total
