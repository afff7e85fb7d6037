"""Lean forward/backward machinery shared by the dense losses.

Every pair loss here is a scalar function L(S) of one B×R similarity (or distance) matrix between L2-normalised
anchors x̂ and references r̂. Instead of recording ~30 elementwise ops for autograd, a loss computes, under
``no_grad``, its value *and* the analytic gradient G = ∂L/∂S (B×R) in a few fused passes; one autograd node
(:class:`_PairMatrixGrad`) then maps G back through the GEMM and the normalisation:

    ∂L/∂x̂ = G r̂ (+ Gᵀ x̂ when the references are the batch itself),   ∂L/∂x = (∂L/∂x̂ − x̂ ⟨x̂, ∂L/∂x̂⟩) / ‖x‖.

So forward + backward is: normalise, one GEMM, the loss's own elementwise passes, one GEMM (two with separate
references) and a B×d projection. Half-precision inputs are computed in fp32 (gradients are returned in the
input's dtype); float64 stays float64 (gradcheck).
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from deepmetric.functional import check_loss_inputs

if TYPE_CHECKING:
    from deepmetric.losses.base import Mined, MinedTriplets

NORM_EPS = 1e-12
DIST_EPS = 1e-12
_HALF = (torch.float16, torch.bfloat16)
# exp(x) is finite for x below these; bounded exponents skip the max-subtraction pass.
EXP_SAFE = {torch.float32: 80.0, torch.float64: 700.0}


def full_precision(device: torch.device) -> contextlib.AbstractContextManager:
    """Autocast off, so that similarities, softmaxes and row dots accumulate in the inputs' fp32/fp64 precision;
    free when autocast is not active. Entered once per entry point — ``MetricLoss.forward`` around the lean
    forward, :class:`_PairMatrixGrad`'s backward, ``Miner.forward`` — not around each operation."""
    if torch.is_autocast_enabled(device.type):
        return torch.autocast(device_type=device.type, enabled=False)
    return contextlib.nullcontext()


class Normalized:
    """x̂ = x / max(‖x‖, eps) computed without autograd, with what the backward needs.

    x̂ itself (``xn``, a B×d copy) is only built when a caller asks for it: losses against a few references
    (proxies) fold 1/‖x‖ into the B×R similarity matrix instead (:func:`prepare` with ``fold_norms``).
    """

    __slots__ = ("_xn", "inv", "norm", "proj", "sq", "x", "xf")

    def __init__(self, x: Tensor, normalize: bool = True) -> None:
        self.x = x
        xf = x.detach()
        if xf.dtype in _HALF:
            xf = xf.float()
        self.xf = xf
        self._xn: Tensor | None = None
        if normalize:
            self.norm = torch.linalg.vector_norm(xf, dim=1, keepdim=True)
            # Rows with ‖x‖ ≤ eps are divided by eps (F.normalize): no projection in their backward.
            self.proj = self.norm > NORM_EPS
            self.inv = self.norm.clamp_min(NORM_EPS).reciprocal_()
        else:
            self.norm = self.proj = self.inv = None
            self._xn = xf
        self.sq: Tensor | None = None

    def rebound(self, x: Tensor) -> Normalized:
        """This normalisation for ``x``, a tensor with the same values (the graph-carrying original of the
        detached tensor it was computed from): shares every computed part."""
        other = object.__new__(Normalized)
        for name in Normalized.__slots__:
            setattr(other, name, getattr(self, name))
        other.x = x
        return other

    @property
    def xn(self) -> Tensor:
        if self._xn is None:
            self._xn = self.xf * self.inv
        return self._xn

    def sqnorm(self) -> Tensor:
        """‖x̂‖² per row (1 for rows longer than eps)."""
        if self.sq is None:
            if self._xn is None:
                self.sq = self.norm.mul(self.inv).square_().squeeze(1)
            else:
                self.sq = torch.linalg.vecdot(self._xn, self._xn)
        return self.sq

    def backward(self, g: Tensor, scale: Tensor, consume: bool = True) -> Tensor:
        """Gradient wrt x from the gradient wrt x̂ (``g``, modified in place unless ``consume`` is False) times
        ``scale`` (scalar)."""
        if self.inv is None:
            out = g.mul_(scale) if consume else g * scale
        else:
            # vecdot: row dots, ~5× faster than einsum("ij,ij->i") (which goes through bmm) on CPU
            if self._xn is not None:
                xn, c = self._xn, torch.linalg.vecdot(self._xn, g).unsqueeze(1).mul_(self.proj)
            else:  # the same with x̂ = x·inv, without materialising x̂
                xn = self.xf
                c = torch.linalg.vecdot(self.xf, g).unsqueeze(1).mul_(self.proj).mul_(self.inv.square())
            out = g.addcmul_(xn, c, value=-1.0) if consume else torch.addcmul(g, xn, c, value=-1.0)
            out.mul_(self.inv * scale)
        return out.to(self.x.dtype)


class _PairMatrixGrad(torch.autograd.Function):
    """value(x, r) with a precomputed ∂value/∂S; backward = the GEMM(s) and the normalisation backward.

    ``st`` carries: ``value`` (0-dim), ``G`` (B×R, ∂L/∂S with S = x̂ r̂ᵀ, or None for an all-zero gradient),
    ``nx``/``nr`` (:class:`Normalized`) and ``same`` (references are the batch itself).
    """

    @staticmethod
    def forward(ctx, x: Tensor, r: Tensor | None, st: PairState) -> Tensor:  # type: ignore[override]
        ctx.st = st
        # Hand the value over instead of keeping it on ``st``: the output tensor gets this node as grad_fn, so
        # st.value → grad_fn → ctx → st would be a reference cycle that keeps G (B×R) and the normalised
        # references (R×d) alive until Python's cyclic GC runs — hundreds of MB per step with a large memory.
        value, st.value = st.value, None
        return value

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, go: Tensor):  # type: ignore[override]
        st = ctx.st  # kept: backward may run more than once (retain_graph, gradcheck)
        with full_precision(go.device):
            return _backward(ctx, st, go)


def _backward(ctx, st: PairState, go: Tensor):
    G = st.G
    need_x, need_r = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    gx = gr = None
    if G is None:
        if need_x:
            gx = torch.zeros_like(st.nx.x)
        if need_r and st.nr is not None:
            gr = torch.zeros_like(st.nr.x)
        return gx, gr, None
    go = go.to(st.nx.xn.dtype)
    if st.direct:  # G is (∂L/∂x̂, ∂L/∂r̂) already
        gxn, grn = G
        # G stays intact: backward may run more than once (retain_graph, gradcheck)
        if st.same:
            if grn is None:
                return st.nx.backward(gxn, go, consume=False), None, None
            return st.nx.backward(gxn + grn, go), None, None
        if need_x:
            gx = st.nx.backward(gxn, go, consume=False)
        if need_r:
            gr = st.nr.backward(grn, go, consume=False)
        return gx, gr, None
    if G.is_sparse:  # built from pair lists (:func:`sparse_matrix`)
        if st.nnz * SPARSE_FRACTION < G.shape[0] * G.shape[1]:
            return _sparse_backward(st, G, need_x, need_r, go)
        G = G.to_dense()
    elif st.nnz is not None and st.nnz * SPARSE_FRACTION < G.numel():
        return _sparse_backward(st, G, need_x, need_r, go)
    if st.fold:  # S = diag(1/‖x‖)·x rᵀ·diag(1/‖r‖): the row/column scales go onto G, not onto B×d copies
        if need_x:
            gx = st.nx.backward(torch.mm(G * st.nr.inv.t(), st.nr.xf), go)
        if need_r:
            gr = st.nr.backward(torch.mm((G * st.nx.inv).t(), st.nx.xf), go)
        return gx, gr, None
    if st.same:
        Gs, k = _plus_transpose(st, G)
        gxn = torch.mm(Gs, st.nx.xn)
        if st.dx is not None:
            gxn.addcmul_(st.dx.unsqueeze(1) + st.dr.unsqueeze(1), st.nx.xn, value=1.0 / k)
        return st.nx.backward(gxn, go * k), None, None
    if need_x:
        gxn = torch.mm(G, st.nr.xn)
        if st.dx is not None:
            gxn.addcmul_(st.dx.unsqueeze(1), st.nx.xn)
        gx = st.nx.backward(gxn, go)
    if need_r:
        grn = torch.mm(G.t(), st.nx.xn)
        if st.dr is not None:
            grn.addcmul_(st.dr.unsqueeze(1), st.nr.xn)
        gr = st.nr.backward(grn, go)
    return gx, gr, None


def _plus_transpose(st: PairState, G: Tensor) -> tuple[Tensor, float]:
    """G + Gᵀ of a dense self-comparison G as (M, k) with G + Gᵀ = k·M: (G, 2) when G is symmetric (no pass),
    else (Gᵀ.contiguous() + G, 1) — faster than G + G.t(), a strided add."""
    if st.symmetric:
        return G, 2.0
    return G.t().contiguous().add_(G), 1.0


SPARSE_FRACTION = 16  # backward through sparse×dense products instead of the GEMM when nnz(G) < B·R / 16


def _sparse_backward(st: PairState, G: Tensor, need_x: bool, need_r: bool, go: Tensor):
    """The backward GEMM(s) as COO sparse × dense products, O(nnz·d), for a sparse ∂L/∂S (hinge losses)."""
    xn, rn = st.nx.xn, st.nr.xn
    gx = gr = None
    if st.same:
        # one product with G + Gᵀ instead of two; a dense G is summed with its transpose first (two passes over
        # B×R, none when symmetric), whose to_sparse() comes out coalesced, cheaper than coalescing the
        # concatenated pair lists
        if G.is_sparse:
            idx, val = G._indices(), G._values()
            sym, k = torch.sparse_coo_tensor(torch.cat((idx, idx.flip(0)), 1), torch.cat((val, val)), G.shape,
                                             check_invariants=False).coalesce(), 1.0
        else:
            Gs, k = _plus_transpose(st, G)
            sym = Gs.to_sparse()
        gxn = torch.sparse.mm(sym, xn)
        if st.dx is not None:
            gxn.addcmul_(st.dx.unsqueeze(1) + st.dr.unsqueeze(1), xn, value=1.0 / k)
        return st.nx.backward(gxn, go * k), None, None
    co = (G if G.is_sparse else G.to_sparse()).coalesce()
    if need_x:
        gxn = torch.sparse.mm(co, rn)
        if st.dx is not None:
            gxn.addcmul_(st.dx.unsqueeze(1), xn)
        gx = st.nx.backward(gxn, go)
    if need_r:
        grn = torch.sparse.mm(co.t(), xn)
        if st.dr is not None:
            grn.addcmul_(st.dr.unsqueeze(1), rn)
        gr = st.nr.backward(grn, go)
    return gx, gr, None


class PairState:
    """``dx``/``dr``: optional per-row factors d such that ∂L/∂x̂_i gets d_i·x̂_i (the ‖x̂‖² terms of a distance
    matrix on unnormalised rows; on normalised rows the projection removes them). ``direct``: ``G`` is the pair
    (∂L/∂x̂, ∂L/∂r̂) instead of ∂L/∂S. ``symmetric``: under a self comparison G equals Gᵀ (up to the rounding of
    the similarity GEMM, whose two triangles may differ in the last bit), so G + Gᵀ is formed as 2G. ``nnz``:
    optional bound on the non-zeros of G; a sparse G (hinge losses, mined pairs) is back-propagated by
    sparse×dense products in O(nnz·d) instead of the B×R×d GEMM."""

    __slots__ = ("G", "direct", "dr", "dx", "fold", "grad", "nnz", "nr", "nx", "same", "symmetric", "value")

    def __init__(self, nx: Normalized, nr: Normalized, same: bool, fold: bool = False) -> None:
        self.fold = fold
        self.grad = torch.is_grad_enabled()  # the caller's grad mode: finish() attaches a graph only then
        self.nx, self.nr, self.same = nx, nr, same
        self.value: Tensor | None = None
        self.G = None
        self.dx: Tensor | None = None
        self.dr: Tensor | None = None
        self.direct = False
        self.nnz: int | None = None  # an upper bound of the non-zeros of G, when the loss knows one
        self.symmetric = False  # G = Gᵀ (self comparison, symmetric masks): the backward uses 2G for G + Gᵀ


def prepare(x: Tensor, r: Tensor, normalize: bool = True, fold_norms: bool = False) -> PairState:
    """Normalise anchors and references once (once in total when ``r is x``). Records the caller's grad mode:
    :func:`finish` attaches the graph only when gradients were enabled at this call.

    ``fold_norms`` (separate, normalised references only): never build x̂ and r̂; the GEMMs run on x and r and
    the norms scale the B×R matrices instead — cheaper when R is small next to d (class proxies).
    """
    nx = Normalized(x, normalize)
    if r is x:
        return PairState(nx, nx, True)
    return PairState(nx, Normalized(r, normalize), False, fold=fold_norms and normalize)


# From this many rows on (CPU), a self-comparison Gram matrix is formed from 3/4 of the products (self_gram).
# Measured at d = 512 in the loss benchmark: 5–15% off the whole loss step at B = 1024; no gain at B = 180, where
# the two extra calls cost about what the saved products do.
GRAM_SPLIT_MIN_ROWS = 256


def _gram_splits(x: Tensor) -> bool:
    return x.shape[0] >= GRAM_SPLIT_MIN_ROWS and x.device.type == "cpu"


def self_gram(x: Tensor) -> Tensor:
    """x xᵀ of a B×d matrix. On CPU from ``GRAM_SPLIT_MIN_ROWS`` rows on, 3/4 of the products are computed: the
    top half of the rows against every row, the bottom-right block, and the bottom-left block copied from the
    transposed top-right one (torch has no SYRK; ~20% less GEMM time at B = 1024, d = 512). As with one GEMM,
    the two triangles of the diagonal blocks may differ in the last bit. Otherwise one GEMM (on GPU the split is
    unmeasured)."""
    if not _gram_splits(x):
        return torch.mm(x, x.t())
    b = x.shape[0]
    h = b // 2
    out = x.new_empty(b, b)
    torch.mm(x[:h], x.t(), out=out[:h])
    bottom = x[h:]
    torch.mm(bottom, bottom.t(), out=out[h:, h:])
    out[h:, :h].copy_(out[:h, h:].t())
    return out


def similarity(st: PairState) -> Tensor:
    if st.fold:
        return torch.mm(st.nx.xf, st.nr.xf.t()).mul_(st.nx.inv).mul_(st.nr.inv.t())
    if st.same:
        return self_gram(st.nx.xn)
    return torch.mm(st.nx.xn, st.nr.xn.t())


def finish(st: PairState, value: Tensor, G: Tensor | None) -> Tensor:
    """Attach ``value`` (0-dim, computed without autograd) to the graph of x (and r) with gradient G wrt S."""
    st.value, st.G = value, G
    x, r = st.nx.x, st.nr.x
    if not torch.is_grad_enabled():
        if st.grad:  # called inside a loss's own no_grad block
            with torch.enable_grad():
                return _PairMatrixGrad.apply(x, None if st.same else r, st)
        return value
    return _PairMatrixGrad.apply(x, None if st.same else r, st)


def finish_direct(st: PairState, value: Tensor, gxn: Tensor, grn: Tensor) -> Tensor:
    """Like :func:`finish` with the gradients wrt x̂ (B×d) and r̂ (R×d) given directly (gathered tuples)."""
    st.direct = True
    return finish(st, value, (gxn, grn))


def squared_distance_unclamped(st: PairState, sim: Tensor | None = None) -> Tensor:
    """‖x̂_i‖² + ‖r̂_j‖² − 2 x̂_i·r̂_j by the GEMM expansion, before the clamp at 0 (a new tensor). ``sim``:
    S = x̂ r̂ᵀ already computed (a miner's; only read). Every caller that compares D² with a threshold uses this
    one function, so that the same pairs pass whichever path computes them."""
    nx = st.nx.sqnorm()
    nr = nx if st.same else st.nr.sqnorm()
    if sim is None and st.same and _gram_splits(st.nx.xn):
        sim = self_gram(st.nx.xn)  # 3/4 of the GEMM outweighs addmm's fused bias
    if sim is not None:
        return torch.add(nx.unsqueeze(1), sim, alpha=-2.0).add_(nr)
    if st.fold:
        return similarity(st).mul_(-2.0).add_(nx.unsqueeze(1)).add_(nr)
    return torch.addmm(nx.unsqueeze(1), st.nx.xn, st.nr.xn.t(), alpha=-2.0).add_(nr)


def distance(st: PairState, squared: bool, sim: Tensor | None = None) -> Tensor:
    """D_ij = ‖x̂_i − r̂_j‖ as :func:`deepmetric.functional.euclidean_distance_matrix` (GEMM expansion, clamped
    at 0, √(·+eps)), or its square. ``sim``: S = x̂ r̂ᵀ already computed (a miner's; only read)."""
    d = squared_distance_unclamped(st, sim).clamp_min_(0.0)
    return d if squared else d.add_(DIST_EPS).sqrt_()


def distance_grad(st: PairState, gd: Tensor, d: Tensor, squared: bool) -> Tensor:
    """∂L/∂S from ∂L/∂D (``gd``, consumed) for D from :func:`distance`; records the ‖·‖² terms when the rows are
    not normalised. (At clamped entries, exact duplicates, the gradient of the clamp is not replicated.)"""
    # dD/dsq = 1/(2D) (1 squared), dsq/dS = −2
    if st.nx.inv is not None and not squared:
        return gd.div_(d).neg_()  # = ·0.5·(−2) exactly, one pass fewer; no ‖·‖² terms on normalised rows
    gsq = gd if squared else gd.div_(d).mul_(0.5)
    if st.nx.inv is None:
        st.dx = gsq.sum(1).mul_(2.0)
        st.dr = gsq.sum(0).mul_(2.0)
    return gsq.mul_(-2.0)


def zero(st: PairState) -> Tensor:
    """A 0 scalar (fp32 for half inputs) connected to x and r, with an all-zero gradient."""
    return finish(st, st.nx.xn.new_zeros(()), None)


# ----------------------------------------------------------------------------------------------------------- masks
# Bool kernels are slow on CPU (bool→float conversion, any(), where() on irregular masks, multiply by a bool):
# the helpers below go through a free uint8 view, which is 10–50× faster at B = 1024.


def u8(mask: Tensor) -> Tensor:
    return mask.view(torch.uint8)


def fm(mask: Tensor, dtype: torch.dtype) -> Tensor:
    """``mask`` as 0/1 in ``dtype``."""
    return mask.view(torch.uint8).to(dtype)


def row_any(mask: Tensor, dim: int = 1) -> Tensor:
    return mask.view(torch.uint8).amax(dim).bool()


def row_count(mask: Tensor, dim: int = 1) -> Tensor:
    """Per-row number of True entries (int64 vector)."""
    return mask.view(torch.uint8).sum(dim, dtype=torch.int32).long()


def count(mask: Tensor) -> int:
    return int(mask.view(torch.uint8).sum(-1, dtype=torch.int32).sum())


def resolve(
    embeddings: Tensor, labels: Tensor, ref_embeddings: Tensor | None, ref_labels: Tensor | None,
    ignore_mask: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor | None, bool]:
    """:func:`deepmetric.functional.resolve_reference` without materialising the B×B identity.

    Returns (references, reference labels, ignore_mask, self_comparison); with ``self_comparison`` the diagonal
    is an ignored pair in addition to ``ignore_mask``.
    """
    check_loss_inputs(embeddings, labels, ref_embeddings, ref_labels, ignore_mask)
    if ref_embeddings is None:
        return embeddings, labels, ignore_mask, True
    return ref_embeddings, ref_labels, ignore_mask, False


def masks(
    labels: Tensor, ref_labels: Tensor, ignore_mask: Tensor | None, self_cmp: bool, mined: Mined | None = None,
) -> tuple[Tensor, Tensor]:
    """(positive, negative) B×R masks: label agreement minus the diagonal (self comparison) and ignored pairs,
    intersected with mined pairs when given. Same result as :func:`deepmetric.losses.base.pair_masks`."""
    pos = labels.unsqueeze(1) == ref_labels.unsqueeze(0)
    neg = ~pos
    if self_cmp:
        pos.fill_diagonal_(False)
    if ignore_mask is not None:
        keep = ~ignore_mask.to(pos.device)
        pos &= keep
        neg &= keep
    if mined is not None:
        mpos, mneg = mined.to_masks((labels.shape[0], ref_labels.shape[0]))
        pos &= mpos.to(pos.device)
        neg &= mneg.to(neg.device)
    return pos, neg


# Comparisons that write bool are several times slower on CPU than an arithmetic pass of the same size (≈ 45 µs
# against ≈ 8 µs at 180 × 180): masks that only feed arithmetic are built as 0/1 floats by arithmetic instead.
_EXACT_INTEGERS = {torch.float32: 1 << 24, torch.float64: 1 << 53}


def _exact_labels(labels: Tensor, dtype: torch.dtype) -> bool:
    """Integer labels that ``dtype`` holds exactly (CPU only: the range check reads the values)."""
    if labels.device.type != "cpu" or labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        return False
    limit = _EXACT_INTEGERS.get(dtype)
    if limit is None or labels.numel() == 0:
        return False
    lo, hi = labels.aminmax()
    return -limit <= int(lo) and int(hi) <= limit


def float_other_label_mask(labels: Tensor, ref_labels: Tensor, dtype: torch.dtype) -> Tensor:
    """[y_i ≠ y_j] as a B×R 0/1 matrix in ``dtype`` (every pair with another label; nothing ignored)."""
    if _exact_labels(labels, dtype) and (ref_labels is labels or _exact_labels(ref_labels, dtype)):
        a = labels.to(dtype)
        b = a if ref_labels is labels else ref_labels.to(dtype)
        # distinct integers differ by ≥ 1 (also after rounding to dtype): |a − b| clamped at 1 is [a ≠ b]
        return torch.sub(a.unsqueeze(1), b).abs_().clamp_(max=1.0)
    return fm(labels.unsqueeze(1) != ref_labels.to(labels.device).unsqueeze(0), dtype)


def float_pair_masks(
    labels: Tensor, ref_labels: Tensor, ignore_mask: Tensor | None, self_cmp: bool, dtype: torch.dtype,
    mined: Mined | None = None,
) -> tuple[Tensor, Tensor]:
    """(P, N): the positive pairs (same label, the diagonal dropped under self comparison) and the negative pairs
    (other label) as B×R 0/1 matrices in ``dtype``, ignored pairs removed, intersected with mined pairs when
    given. Same pairs as :func:`masks`."""
    neg = float_other_label_mask(labels, ref_labels, dtype)
    pos = torch.rsub(neg, 1.0)
    if self_cmp:
        pos.fill_diagonal_(0.0)
    if ignore_mask is not None:
        keep = fm(~ignore_mask.to(pos.device), dtype)
        pos.mul_(keep)
        neg.mul_(keep)
    if mined is not None:
        mpos, mneg = mined.to_masks((labels.shape[0], ref_labels.shape[0]))
        pos.mul_(fm(mpos.to(pos.device), dtype))
        neg.mul_(fm(mneg.to(neg.device), dtype))
    return pos, neg


def positive_part_indicator(t: Tensor) -> Tensor:
    """[t > 0] as 0/1 in t's dtype, in place: ⌈clamp(t, 0, 1)⌉ (two arithmetic passes, no bool)."""
    return t.clamp_(0.0, 1.0).ceil_()


def count_ones(t: Tensor) -> int:
    """The number of ones in a 0/1 float tensor (summed in float64 where float32 would lose integers)."""
    if t.dtype == torch.float32 and t.numel() >= 1 << 24:
        return int(t.sum(dtype=torch.float64))
    return int(t.sum())


class MiningSource:
    """What a built-in miner knew when it returned its tuples, so that a lean loss called on the same inputs
    neither normalises them again nor re-validates the tuples (valid by construction for those inputs).

    The miner creates it with its :class:`PairState` (``every_row``: the anchors are exactly 0..B−1 in order;
    ``similarity``: the B×R matrix S = x̂ r̂ᵀ it mined on, when it formed one); ``Miner.forward`` then binds it
    (:meth:`bind`) to the tensors mined on and to the tensors it returned. The source holds those tensors, so their
    storage cannot be freed and reused while it lives, and their version counters as they were: an in-place
    change of the embeddings, labels, ignore_mask or of the returned tuples between mining and the loss makes
    :meth:`state_for` refuse, and the loss takes its ordinary path. ``similarity`` is shared, never written to.
    """

    __slots__ = ("every_row", "inputs", "normalize", "self_cmp", "similarity", "state", "versions")

    def __init__(
        self, state: PairState, normalize: bool, every_row: bool, similarity: Tensor | None = None,
    ) -> None:
        self.state, self.normalize, self.every_row = state, normalize, every_row
        self.similarity = similarity
        self.inputs: tuple | None = None  # (x, r, labels, ref_labels, ignore_mask, *returned tuples)
        self.versions: tuple = ()
        self.self_cmp = False

    def bind(
        self, x: Tensor, r: Tensor, labels: Tensor, ref_labels: Tensor, ignore_mask: Tensor | None, self_cmp: bool,
        outputs: tuple[Tensor, ...] = (),
    ) -> None:
        inputs = (x, r, labels, ref_labels, ignore_mask, *outputs)
        if any(t is not None and t.is_inference() for t in inputs):
            return  # inference tensors have no version counter: never reused
        self.inputs, self.self_cmp = inputs, self_cmp
        self.versions = tuple(None if t is None else t._version for t in inputs)

    def state_for(
        self, x: Tensor, r: Tensor, labels: Tensor, ref_labels: Tensor, ignore_mask: Tensor | None, self_cmp: bool,
        normalize: bool, outputs: tuple[Tensor, ...] | None = None,
    ) -> PairState | None:
        """A :class:`PairState` for a loss on (x, r) reusing the miner's normalisation, or None when the loss's
        inputs are not the (unmodified) ones mined on. ``outputs``: the tuples the loss was given (default: the
        ones the miner returned, checked for in-place changes)."""
        if self.inputs is None or self_cmp != self.self_cmp or normalize != self.normalize:
            return None
        given_all = (x, r, labels, ref_labels, ignore_mask, *(self.inputs[5:] if outputs is None else outputs))
        if len(given_all) != len(self.inputs):
            return None
        for given, held, version in zip(given_all, self.inputs, self.versions):
            if held is None or given is None:
                if held is not given:
                    return None
            elif not (given.data_ptr() == held.data_ptr() and given.device == held.device
                      and given.dtype == held.dtype and given.shape == held.shape
                      and given.stride() == held.stride() and not given.is_inference()
                      and given._version == version):
                return None
        st = self.state
        nx = st.nx.rebound(x)
        return PairState(nx, nx, True) if st.same else PairState(nx, st.nr.rebound(r), False, fold=st.fold)


def valid_triplets(
    triplets: MinedTriplets, labels: Tensor, ref_labels: Tensor, ignore_mask: Tensor | None, self_cmp: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """Triplets whose labels agree and whose two pairs are not ignored (the diagonal under self comparison)."""
    a, p, n = triplets.anchor.long(), triplets.positive.long(), triplets.negative.long()
    la = labels[a]
    ok = (la == ref_labels[p]) & (la != ref_labels[n])
    if self_cmp:
        ok &= a != p  # a != n follows from the label test
    if ignore_mask is not None:
        ok &= ~(ignore_mask[a, p] | ignore_mask[a, n])
    if bool(ok.all()):
        return a, p, n
    return a[ok], p[ok], n[ok]


def mined_triplet_state(
    mined: MinedTriplets, x: Tensor, r: Tensor, labels: Tensor, ref_labels: Tensor, ignore_mask: Tensor | None,
    self_cmp: bool, normalize: bool,
) -> tuple[PairState, Tensor, Tensor, Tensor, bool]:
    """(state, a, p, n, every_row) for a loss on mined triplets: a built-in miner's normalisation and triplets,
    taken as they are, when the loss is given the very inputs mined on (:class:`MiningSource`); otherwise x and r
    normalised here and the triplets validated. ``every_row``: the anchors are exactly 0..B−1 in order."""
    source = mined._source
    st = None if source is None else source.state_for(
        x, r, labels, ref_labels, ignore_mask, self_cmp, normalize, mined.tensors())
    if st is not None:
        return st, mined.anchor, mined.positive, mined.negative, source.every_row
    st = prepare(x, r, normalize)
    a, p, n = valid_triplets(mined, labels, ref_labels, ignore_mask, self_cmp)
    # batch-hard and semi-hard miners give every anchor once, in order: no gather for the anchors then
    every_row = a.shape[0] == x.shape[0] and bool((a == torch.arange(a.shape[0], device=a.device)).all())
    return st, a, p, n, every_row


def triplet_differences(
    st: PairState, a: Tensor, p: Tensor, n: Tensor, every_row: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """(diff, sq, pn): x̂_a − r̂_p and x̂_a − r̂_n as one 2×T×d block (written over the gathered reference rows:
    one buffer, one row norm, one scatter later), their squared norms (2×T: D²_ap, D²_an, taken directly; the
    dense paths' GEMM expansion agrees up to rounding) and the reference indices (p, n) concatenated.
    ``index_select`` because advanced indexing of rows is several times slower on CPU."""
    xn, rn = st.nx.xn, st.nr.xn
    t = a.shape[0]
    xa = xn if every_row else xn.index_select(0, a)
    pn = torch.cat((p, n))
    diff = rn.index_select(0, pn).view(2, t, -1)
    torch.sub(xa, diff, out=diff)
    # vector_norm reads the block once; a row dot (vecdot) writes a product of its size first
    sq = torch.linalg.vector_norm(diff.view(2 * t, -1), dim=1).view(2, t).square_()
    return diff, sq, pn


def triplet_gradients(
    st: PairState, diff: Tensor, coef: Tensor, a: Tensor, pn: Tensor, every_row: bool,
) -> tuple[Tensor, Tensor | None]:
    """(∂/∂x̂, ∂/∂r̂ or None under a self comparison) of Σ_k coef_k · ‖diff_k‖²/2-type terms: each difference row
    x̂_a − r̂ scaled by its ``coef`` (2×T) goes to its anchor with + and to its reference row with − (``diff`` is
    consumed)."""
    xn, rn = st.nx.xn, st.nr.xn
    diff.mul_(coef.unsqueeze(2))
    ga = diff[0] + diff[1]
    gxn = ga if every_row else torch.zeros_like(xn).index_add_(0, a, ga)
    grn = gxn if st.same else torch.zeros_like(rn)
    grn.index_add_(0, pn, diff.view(2 * a.shape[0], -1), alpha=-1.0)
    return gxn, None if st.same else grn


# ---------------------------------------------------------------------------------------------------- reductions


def log1p_sum_exp(a: Tensor, mask: Tensor, bound: float, scale: Tensor | float = 1.0) -> tuple[Tensor, Tensor]:
    """Per row: v = log(1 + Σ_{mask} e^{a}) and W = ∂v/∂a (zero off ``mask``). ``a`` is consumed (in place).
    ``mask``: bool, or 0/1 in a's dtype when ``bound`` is below the safe exponent.

    ``bound`` is an upper bound of |a| over the whole matrix (e.g. α·(1+|λ|) on cosines); below the dtype's
    safe exponent the max-subtraction pass is skipped, otherwise the row max (≥ 0, for the implicit e⁰ term)
    is subtracted first. ``scale`` (scalar or B×1) multiplies W (folded into the normalisation pass).
    """
    if bound < EXP_SAFE.get(a.dtype, 0.0):
        e = a.exp_().mul_(mask if mask.is_floating_point() else u8(mask))
        s = e.sum(1, keepdim=True)
        v = torch.log1p(s)
        return v.squeeze(1), e.mul_(s.add_(1.0).reciprocal_().mul_(scale))
    m = torch.where(mask, a, float("-inf")).amax(1, keepdim=True).clamp_min_(0.0)
    e = torch.where(mask, a.sub_(m).exp_(), 0.0)
    z = e.sum(1, keepdim=True).add_(torch.exp(-m))
    v = m + torch.log(z)
    return v.squeeze(1), e.mul_(z.reciprocal_().mul_(scale))


def softplus_and_sigmoid(a: Tensor) -> tuple[Tensor, Tensor]:
    """(softplus(a), sigmoid(a)) = (log(1 + eᵃ), eᵃ/(1 + eᵃ)) elementwise for |a| below the dtype's safe exponent
    (the caller checks its bound); ``a`` is consumed. fp32 ``log1p`` (and so ``softplus``) runs ~13× slower than
    ``log`` on CPU (10 ms against 0.8 ms for 1024² entries): log1p(x) is taken as log(u) − ((u − 1) − x)/u with
    u = 1 + x, the rounding of u corrected to first order (exact for x below half an ulp of 1, where log u = 0)."""
    e = a.exp_()
    u = e + 1.0
    sp = torch.log(u).sub_(torch.sub(u, 1.0).sub_(e).div_(u))
    return sp, e.div_(u)


def log_sum_exp(a: Tensor, mask: Tensor, bound: float) -> tuple[Tensor, Tensor]:
    """Per row: v = log Σ_{mask} e^{a} and W = ∂v/∂a (the masked softmax, zero off ``mask``). ``a`` is consumed.

    Empty rows give v = −∞ and W = 0 (callers exclude them). ``bound`` ≥ max |a| over the matrix: below the
    dtype's safe exponent neither overflow nor underflow to 0 can happen and the row-max pass is skipped.
    """
    if bound < EXP_SAFE.get(a.dtype, 0.0):
        e = a.exp_().mul_(u8(mask))
        z = e.sum(1, keepdim=True)
        v = torch.log(z)
    else:
        m = torch.where(mask, a, float("-inf")).amax(1, keepdim=True)
        m = torch.where(torch.isfinite(m), m, 0.0)
        e = torch.where(mask, a.sub_(m).exp_(), 0.0)
        z = e.sum(1, keepdim=True)
        v = torch.log(z).add_(m)
    return v.squeeze(1), e.div_(z.clamp_min_(torch.finfo(z.dtype).tiny))


def cross_entropy(z: Tensor, target: Tensor | None, bound: float, scale: float = 1.0) -> tuple[Tensor, Tensor]:
    """Mean cross-entropy of the logits ``z`` (B×C, consumed) against ``target`` (B, long; None: the diagonal,
    target i for row i), and W = scale·∂value/∂z = scale·(softmax(z) − onehot(target))/B.

    ``bound`` ≥ max |z| over the matrix: below the dtype's safe exponent the row-max pass is skipped.
    """
    b = z.shape[0]
    t = None if target is None else target.unsqueeze(1)
    # per-row target logits (minus the row max), taken before z is overwritten
    zt = z.diagonal().unsqueeze(1).clone() if t is None else z.gather(1, t)
    if bound >= EXP_SAFE.get(z.dtype, 0.0):
        m = z.amax(1, keepdim=True)
        zt.sub_(m)
        z.sub_(m)
    e = z.exp_()
    s = e.sum(1, keepdim=True)
    value = s.log().sub_(zt).sum().div_(b)
    w = e.mul_(s.reciprocal_().mul_(scale / b))
    if t is None:
        w.diagonal().sub_(scale / b)
        return value, w
    return value, w.scatter_add_(1, t, w.new_full((b, 1), -scale / b))


# ------------------------------------------------------------------------------------------------- pair lists
# Hinge losses touch few pairs: an m-per-class batch has B·(m−1) positive pairs, and the active negatives are
# the few inside the margin. Finding them from the labels (positives) and one threshold pass (negatives) avoids
# the B×R label masks, the bool→float conversions and the nonzero() scan of a dense ∂L/∂S — together more than
# the similarity GEMM itself at B = 1024.


# Below this many anchor × reference pairs the dense mask path is as fast (measured crossover ≈ 360 × 360 at
# d = 512 on one CPU thread: per-op overhead dominates there, the B×R passes above).
PAIR_LIST_MIN_GRID = 1 << 17


def same_label_pairs(
    labels: Tensor, ref_labels: Tensor, self_cmp: bool, max_pairs: int,
) -> tuple[Tensor, Tensor] | None:
    """(rows, cols) of every anchor/reference pair with equal labels (the diagonal dropped under self
    comparison), from one sort of the reference labels: O((B + R)·log R + P). None if there are more than
    ``max_pairs`` (a dense mask is then cheaper)."""
    sorted_l, order = torch.sort(ref_labels)
    lab = labels.to(device=sorted_l.device, dtype=sorted_l.dtype)
    lo = torch.searchsorted(sorted_l, lab)
    cnt = torch.searchsorted(sorted_l, lab, right=True).sub_(lo)
    total = int(cnt.sum())
    if total > max_pairs:
        return None
    rows = torch.repeat_interleave(torch.arange(labels.shape[0], device=lo.device), cnt, output_size=total)
    # the k-th pair of anchor i sits at sorted position lo_i + k = lo_i + (p − first pair index of i)
    start = lo.sub_(cnt.cumsum(0).sub_(cnt))
    cols = order[torch.repeat_interleave(start, cnt, output_size=total).add_(torch.arange(total, device=lo.device))]
    if self_cmp:
        keep = rows != cols
        rows, cols = rows[keep], cols[keep]
    return rows, cols


def listed_positive_pairs(
    labels: Tensor, ref_labels: Tensor, ignore_mask: Tensor | None, mined: Mined | None, self_cmp: bool,
) -> tuple[Tensor, Tensor] | None:
    """The positive pairs as (rows, cols) when a loss with a dense negative term should take its positive term
    from them: a grid of at least ``PAIR_LIST_MIN_GRID`` pairs, nothing ignored or mined, and at most
    B·R/``SPARSE_FRACTION`` positives (m-per-class batches have m − 1 per anchor). None otherwise: masks then."""
    b, r = labels.shape[0], ref_labels.shape[0]
    if ignore_mask is not None or mined is not None or b * r < PAIR_LIST_MIN_GRID:
        return None
    return same_label_pairs(labels, ref_labels, self_cmp, b * r // SPARSE_FRACTION)


def drop_ignored(rows: Tensor, cols: Tensor, ignore_mask: Tensor | None) -> tuple[Tensor, Tensor]:
    if ignore_mask is None:
        return rows, cols
    keep = ~ignore_mask.to(rows.device)[rows, cols]
    return rows[keep], cols[keep]


def sparse_matrix(rows: Tensor, cols: Tensor, values: Tensor, shape: tuple[int, int]) -> Tensor:
    """∂L/∂S as a COO matrix over distinct pairs, left uncoalesced: the backward coalesces once (with Gᵀ
    appended under self comparison)."""
    return torch.sparse_coo_tensor(torch.stack((rows, cols)), values, shape, check_invariants=False)


class _RowsGrad(torch.autograd.Function):
    """A value whose gradient is non-zero on a few rows only (given, per input, as row indices and an n×d
    block): the backward scatters the blocks into zeros instead of replaying the gathers through autograd."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx, x: Tensor, r: Tensor | None, value: Tensor, parts: tuple, distinct: bool,
    ) -> Tensor:
        ctx.parts = parts  # ((input 0 or 1, rows, block), ...); not the output: no reference cycle
        ctx.like = (x, r)
        ctx.distinct = distinct
        return value

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, go: Tensor):  # type: ignore[override]
        grads: list[Tensor | None] = [None, None]
        for which, rows, block in ctx.parts:
            if not ctx.needs_input_grad[which]:
                continue
            if grads[which] is None:
                grads[which] = torch.zeros_like(ctx.like[which])
            # index_copy_ when every row occurs once in all blocks of this input (no accumulation needed)
            block = (block * go.to(block.dtype)).to(grads[which].dtype)
            if ctx.distinct:
                grads[which].index_copy_(0, rows, block)
            else:
                grads[which].index_put_((rows,), block, accumulate=True)
        return grads[0], grads[1], None, None, None


def finish_rows(x: Tensor, r: Tensor | None, value: Tensor, parts: tuple, distinct: bool = False) -> Tensor:
    """Attach ``value`` to x (and r) with the per-row gradient blocks ``parts`` (see :class:`_RowsGrad`).
    ``distinct``: no row index repeats within or across the blocks of one input."""
    with torch.enable_grad():
        return _RowsGrad.apply(x, r, value, parts, distinct)
