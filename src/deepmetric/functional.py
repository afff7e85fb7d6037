"""Shared dense math: normalisation, similarity matrices and label masks.

Every loss in the library computes one B×R similarity (or distance) matrix between B anchors and R reference
rows and boolean masks over it. Self-comparisons are removed by *index* (an ``ignore_mask``), never by testing
whether a similarity is close to 1, so exact duplicate embeddings stay valid positives.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def l2_normalize(x: Tensor, eps: float = 1e-12) -> Tensor:
    """Row-wise L2 normalisation (zero rows stay zero)."""
    return F.normalize(x, p=2.0, dim=-1, eps=eps)


def cosine_similarity_matrix(x: Tensor, y: Tensor) -> Tensor:
    """S_ij = x̂_iᵀŷ_j, accumulated in fp32 even under fp16/bf16 autocast."""
    x = l2_normalize(x.float() if x.dtype in (torch.float16, torch.bfloat16) else x)
    y = l2_normalize(y.float() if y.dtype in (torch.float16, torch.bfloat16) else y)
    with torch.autocast(device_type=x.device.type, enabled=False):
        return x @ y.t()


def euclidean_distance_matrix(x: Tensor, y: Tensor, squared: bool = False, eps: float = 1e-12) -> Tensor:
    """D_ij = ‖x_i − y_j‖₂ via the GEMM expansion, clamped at 0; the sqrt is made differentiable at 0 by eps."""
    if x.dtype in (torch.float16, torch.bfloat16):
        x, y = x.float(), y.float()
    with torch.autocast(device_type=x.device.type, enabled=False):
        sq = (x * x).sum(1, keepdim=True) + (y * y).sum(1).unsqueeze(0) - 2.0 * (x @ y.t())
    sq = sq.clamp_min(0.0)
    return sq if squared else torch.sqrt(sq + eps)


def check_loss_inputs(embeddings: Tensor, labels: Tensor, ref_embeddings: Tensor | None,
                      ref_labels: Tensor | None, ignore_mask: Tensor | None = None) -> None:
    """Shape checks shared by every loss entry point (reference and lean paths); errors say what was expected.

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

    ``ref_embeddings=None`` means "the batch against itself" and the diagonal is ignored (self-pairs removed by
    index). With explicit references nothing is ignored unless ``ignore_mask`` (B×R, True = never use this pair)
    says so; cross-batch memory and synthesis wrappers use it to drop an anchor's own memory slot or copies.
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
    same = labels.unsqueeze(1) == ref_labels.unsqueeze(0)
    positive = same
    negative = ~same
    if ignore_mask is not None:
        positive = positive & ~ignore_mask
        negative = negative & ~ignore_mask
    return positive, negative


def masked_logsumexp(x: Tensor, mask: Tensor, dim: int = -1, add_one: bool = False) -> Tensor:
    """log Σ_{mask} eˣ along ``dim`` (optionally log(1 + Σ eˣ)), stable, −inf/0 for empty rows.

    With ``add_one`` the implicit extra term e⁰ makes the value 0 for an empty row, which is the
    ``log(1 + Σ ...)`` form used by MS, Proxy-Anchor, binomial and lifted losses.
    """
    neg_inf = torch.finfo(x.dtype).min
    x = x.masked_fill(~mask, neg_inf)
    if add_one:
        zeros = torch.zeros_like(x.narrow(dim, 0, 1))
        x = torch.cat([x, zeros], dim=dim)
    out = torch.logsumexp(x, dim=dim)
    if not add_one:
        out = out.masked_fill(~mask.any(dim=dim), neg_inf)
    return out


def as_float(x: Tensor) -> Tensor:
    """Half-precision inputs are promoted to fp32 so similarities and softmaxes accumulate in fp32 under autocast."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def zero_loss(*tensors: Tensor) -> Tensor:
    """A scalar 0 that is still connected to the graph of ``tensors`` (backward gives zero grads, never NaN)."""
    total = None
    for t in tensors:
        term = (as_float(t) * 0.0).sum()
        total = term if total is None else total + term
    if total is None:
        raise ValueError("zero_loss needs at least one tensor")
    return total


def masked_max(x: Tensor, mask: Tensor, dim: int = -1) -> Tensor:
    """max over ``mask`` along ``dim``; −inf for empty rows (detached selection, gradient flows to the max)."""
    return x.masked_fill(~mask, float("-inf")).amax(dim=dim)


def masked_min(x: Tensor, mask: Tensor, dim: int = -1) -> Tensor:
    """min over ``mask`` along ``dim``; +inf for empty rows."""
    return x.masked_fill(~mask, float("inf")).amin(dim=dim)


def masked_mean(x: Tensor, mask: Tensor, dim: int = -1) -> Tensor:
    """mean over ``mask`` along ``dim``; 0 for empty rows (no 0/0)."""
    m = mask.to(x.dtype)
    return (x * m).sum(dim) / m.sum(dim).clamp_min(1.0)


def distance_from_cosine(sim: Tensor, eps: float = 1e-12) -> Tensor:
    """Euclidean distance between unit vectors from their cosine: √(2 − 2S), with eps so the sqrt has a gradient at 0."""
    return torch.sqrt((2.0 - 2.0 * sim).clamp_min(0.0) + eps)


def pairwise_distance(x: Tensor, y: Tensor, *, normalize: bool = True, squared: bool = False) -> Tensor:
    """Euclidean (or squared) distance matrix, optionally between L2-normalised rows (PML's LpDistance default)."""
    x, y = as_float(x), as_float(y)
    if normalize:
        x, y = l2_normalize(x), l2_normalize(y)
    return euclidean_distance_matrix(x, y, squared=squared)
