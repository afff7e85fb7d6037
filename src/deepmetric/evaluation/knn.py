"""Exact, deterministic k-nearest-neighbour primitives on one block of a similarity matrix.

Ranking convention (used everywhere in the evaluation package): gallery items are ordered by the key
(−s_qj, j), i.e. by decreasing score and, among exactly equal scores, by increasing gallery index ("stable"
ties). A score is "higher is closer": cosine / dot similarity, or for Euclidean distance the per-query monotone
surrogate s_qj = 2⟨q, g_j⟩ − ‖g_j‖² = ‖q‖² − ‖q − g_j‖².

The block top-k avoids sorting full rows: with the row split into chunks of ``width`` columns (interleaved, see
:func:`stable_topk`), the top-k items lie in the k chunks with the largest maxima (when the k-th and (k+1)-th
maxima differ, every item elsewhere has k strictly better items), so one cheap ``amax`` pass over the block plus
a top-k over k·width candidates is exact. Both stages use ``torch.topk`` for the values and resolve ties by
position explicitly, so the result does not depend on topk's internal tie order.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _topk_set(values: Tensor, k: int) -> tuple[Tensor, Tensor | None]:
    """Positions (b, k) of the k largest values per row, in increasing position order, and the rows where that set
    is ambiguous (entry k ties with entry k − 1, so which equal value belongs to the set needs a tie rule)."""
    m = values.shape[1]
    kk = min(k + 1, m)
    top_v, top_p = values.topk(kk, dim=1, sorted=True)
    ambiguous = top_v[:, k - 1] == top_v[:, k] if kk > k else None
    return top_p[:, :k].sort(dim=1).values, ambiguous


def _order_stable(values: Tensor, pos: Tensor) -> Tensor:
    """Reorder ascending positions ``pos`` (b, k) by (−value, position)."""
    order = torch.sort(values.gather(1, pos), dim=1, descending=True, stable=True).indices
    return pos.gather(1, order)


def _full_row_topk(values: Tensor, k: int) -> Tensor:
    return torch.sort(values, dim=1, descending=True, stable=True).indices[:, :k]


def chunk_width(n: int, k: int, max_width: int = 64) -> int:
    """Power-of-two chunk width in [8, max_width] near √(n/k)/4: more, narrower chunks than the balance of the
    n/width maxima and the k·width candidates, because ``topk`` costs less per element on the long row of maxima
    than on the short candidate row (measured per block of SOP- and In-Shop-shaped scores)."""
    width = 8
    while width * 2 <= max_width and (width * 2) ** 2 * 8 * k <= n:
        width *= 2
    return width


def stable_topk(
    scores: Tensor, k: int, width: int | None = None, workspace: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Exact top-k of each row of ``scores`` (b, n) in the order (−score, column index).

    Two stages over a partition of the n columns into n/width interleaved chunks, chunk c = the columns
    {c + j·(n/width) : j < width}: the chunk maxima (one ``amax`` across ``width`` contiguous slices of length
    n/width, which vectorises along the row, unlike a reduction over short contiguous runs), then the k·width
    columns of the k best chunks. When the k-th and (k+1)-th chunk maxima differ, every item outside the chosen
    chunks has ≥ k items strictly better than it, so the stable top-k lies among the candidates. ``torch.topk``
    picks values; ties are resolved by column explicitly, and rows whose selection boundary is tied are ranked by
    a stable sort of the whole row (rare outside constructed data), so the result never depends on topk's internal
    tie order. ``scores`` may contain −inf (excluded items). ``workspace`` (optional, same dtype and device, at least
    b·n/width elements) receives the chunk maxima: callers ranking many blocks pass one buffer so the largest
    temporary is not a fresh allocation each time (fresh pages are filled several times slower than reused ones).
    Returns (values (b, k), column indices (b, k), int64).
    """
    b, n = scores.shape
    if not 1 <= k <= n:
        raise ValueError(f"stable_topk: k={k} must be in [1, {n}]")
    if width is None:
        width = chunk_width(n, k)
    if k * width * 2 >= n or n % width != 0:
        pos, ambiguous = _topk_set(scores, k)
        pos = _order_stable(scores, pos)
    else:
        n_chunks = n // width
        blocks = scores.view(b, width, n_chunks)
        if workspace is not None and workspace.numel() >= b * n_chunks:
            maxima = torch.amax(blocks, dim=1, out=workspace[: b * n_chunks].view(b, n_chunks))
        else:
            maxima = blocks.amax(dim=1)
        chunks, ambiguous = _topk_set(maxima, k)  # ascending chunk ids
        # candidate (j, c) is column j·n_chunks + chunks[c]: with ascending chunk ids, j-major order is ascending
        # in column, which the tie rule below relies on
        lane = torch.arange(width, device=scores.device) * n_chunks
        cand_cols = (lane.view(1, width, 1) + chunks.unsqueeze(1)).reshape(b, width * k)
        cand = scores.gather(1, cand_cols)
        cpos, amb2 = _topk_set(cand, k)
        ambiguous = amb2 if ambiguous is None else (ambiguous if amb2 is None else ambiguous | amb2)
        pos = cand_cols.gather(1, _order_stable(cand, cpos))
    if ambiguous is not None and bool(ambiguous.any()):
        rows = torch.nonzero(ambiguous).squeeze(1)
        # heavily tied data (e.g. binary codes) can make many rows ambiguous: sort them in groups so the sort's
        # values + indices stay within ~1.5 score blocks of memory
        group = max(1, b // 8)
        for start in range(0, rows.shape[0], group):
            sub = rows[start : start + group]
            pos[sub] = _full_row_topk(scores[sub], k)
    return scores.gather(1, pos), pos


def exact_cosine_key(s: Tensor, gallery_sq_norm: Tensor, max_elements: int = 1 << 22) -> None:
    """Turn raw products S = ⟨q, g⟩ into the ranking key sign(S)·S²/‖g‖² in place (per query the order of cosine).

    For quantised float64 data (integers or coarse binary fractions) S and ‖g‖² are exact, so the key is one
    correctly rounded division of exact values: mathematically tied cosines stay exactly tied whatever the GEMM's
    summation order or the block shape. Normalising the rows first rounds every entry, and the GEMM's rounding then
    depends on the kernel BLAS picks for the block's row count. Rows go in groups to bound the |S| temporary.
    """
    rows = max(1, max_elements // max(1, s.shape[1]))
    for r0 in range(0, s.shape[0], rows):
        part = s[r0 : r0 + rows]
        part.mul_(part.abs()).div_(gallery_sq_norm)


def count_ranked_before(
    scores: Tensor, rows: Tensor, thresholds: Tensor, index: Tensor | None, max_rows: int
) -> Tensor:
    """For each triple (row r, score t, gallery index i): #{j : s_rj > t} + #{j < i : s_rj = t}.

    That is the 0-based stable rank of an item with score t at index i in row r (``index=None`` counts only
    strictly greater scores: the "optimistic" tie policy). With ``index`` given, row r must hold the item itself
    (score exactly t at column i), as it does for every caller: ranks of listed gallery items. Rows are processed ``max_rows`` at a time so the
    temporary copy stays within the block budget.
    """
    out = torch.empty(rows.shape[0], dtype=torch.int64, device=scores.device)
    cols = torch.arange(scores.shape[1], device=scores.device)
    for start in range(0, rows.shape[0], max_rows):
        sl = slice(start, start + max_rows)
        sub = scores.index_select(0, rows[sl])
        t = thresholds[sl].unsqueeze(1)
        # int32 sums of bool are several times faster than the default int64 reduction on CPU
        count = (sub > t).sum(dim=1, dtype=torch.int32).to(torch.int64)
        if index is not None:
            # the item itself scores exactly t, so only rows with another item at t need the index-aware count
            # (one pass over the copy instead of three: exact ties are rare outside constructed data)
            tied = torch.nonzero((sub == t).sum(dim=1, dtype=torch.int32) > 1).squeeze(1)
            if tied.numel():
                before = (sub[tied] == t[tied]) & (cols < index[sl][tied].unsqueeze(1))
                count[tied] += before.sum(dim=1, dtype=torch.int32)
        out[sl] = count
    return out
