"""The joint second-moment state of LAFTR's closed form (METHOD.md section 2b, generalized in section 6).

The joint state u = [1; every live tensor of both streams] has uncentered second moment ``M = E[u u^T]``.
Rules update it through these operations (the interpreter in :mod:`laftr.graph` decides nothing itself):

- :meth:`JointMoments.affine`: a new block b = T u with ``E[b u^T] = T M`` and ``E[b b^T] = T M T^T``,
  computed by running the op itself on the columns of M (``torch.vmap``), so any affine op works;
- :meth:`JointMoments.linear`: the same for ``x -> W x + b`` with the matrix at hand (linear layers): plain
  matrix products, ``W A W^T`` with a backward pass that uses the symmetry of ``A`` (outside autocast), and
  ``W A`` at the cost of a few columns when the input's second moment is diagonal plus low rank (diagonal and
  low-rank input models);
- :meth:`JointMoments.gate`: a random per-unit affine map ``y = c * s + r`` of a pre-activation block s, with
  (c, r) independent of the state and, across units, independent unless they share a randomness group (a
  normalizer is shared by the units of one position). Only first moments and same-group second moments of
  (c, r) enter (:class:`GateMoments`);
- reshapes need none: their output is their input's block under another shape (:class:`Ref`).

M is never formed as one dense matrix. It is kept by blocks: every live block b has its mean ``E[b]`` (the
row of the constant 1) and every pair of live blocks ``(b, c)`` its cross moment ``E[b c^T]``. A pair is
computed only when it is first read (a cross moment that no later op reads, such as that of a gate's output
with its own pre-activation, is never computed), and blocks that no live value refers to are dropped, so
memory follows the widest cut of the graph.

The blocks of theta0's stream alone (and of the input) do not depend on the parameters theta being
evaluated. The pairs of such blocks that an evaluation reads are kept in a :class:`Theta0Cache` (given by
the estimator, one per mixture component, device and dtype) and are computed only on the first evaluation;
the later ones compute only what depends on theta. The distance is
``D = 1/2 E||z - z0||^2 = 1/2 sum_i (M[z_i, z_i] - 2 M[z_i, z0_i] + M[z0_i, z0_i])``.

The numbers are those of the dense computation up to rounding (``tests/test_exact_speed.py`` compares them
with it, values and gradients, for every op with a closed form).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch

from ._util import autocast_dtype, in_func_transform, is_batched
from .errors import UnsupportedOpError

#: A pair is computed when it is read; a chain of pairs waiting on each other longer than this is computed
#: at once (bounds the recursion when a long chain is finally read).
MAX_PENDING_DEPTH = 16


class Ref:
    """A data tensor living in the moment state: block ``block`` of M, with per-example shape ``shape``."""

    __slots__ = ("block", "shape")

    def __init__(self, block: int, shape: tuple[int, ...]) -> None:
        """A reference to block ``block`` of M, with per-example shape ``shape``."""
        self.block = block
        self.shape = shape

    def __repr__(self) -> str:  # pragma: no cover - debugging aid
        """The block and the shape, for debugging."""
        return f"Ref({self.block}, {self.shape})"


@dataclasses.dataclass
class GateMoments:
    """Moments of a random per-unit affine map ``y^a_i = c^a_i s^a_i + r^a_i`` (stream a, unit i).

    Attributes:
        c1: ``E[c^a]`` per stream, each ``(n,)`` (one entry when the map is the same in both streams).
        c2: ``E[c^a_i c^b_i]`` for a unit with itself (or with a unit of its randomness group), keyed by
            the stream pair ``(a, b)``; each ``(n,)``.
        r1, cr, r2: the same for the intercept: ``E[r^a]``, ``E[c^a_i r^b_i]``, ``E[r^a_i r^b_i]``; None
            when the intercept is zero (ReLU-like gates, normalizers).
        unit_groups: None when units are independent; else ``(n,)`` group ids: units of one group share
            their random draw (the entries of c2 then hold the group's second moment).
    """

    c1: Sequence[torch.Tensor]
    c2: dict[tuple[int, int], torch.Tensor]
    r1: Sequence[torch.Tensor] | None = None
    cr: dict[tuple[int, int], torch.Tensor] | None = None
    r2: dict[tuple[int, int], torch.Tensor] | None = None
    unit_groups: torch.Tensor | None = None

    @property
    def stream_specific(self) -> bool:
        """Whether the map differs between the two streams."""
        return len(self.c1) > 1

    def _s(self, a: int) -> int:
        return min(a, len(self.c1) - 1)

    def key(self, a: int, b: int) -> tuple[int, int]:
        """The key of the stream pair ``(a, b)`` in the second moments."""
        return (self._s(a), self._s(b))

    def same_group(self, n: int, like: torch.Tensor) -> torch.Tensor | None:
        """``(n, n)``: 1 where two units share their draw, else 0; None for independent units."""
        if self.unit_groups is None:
            return None
        g = self.unit_groups.to(like.device)
        return (g[:, None] == g[None, :]).to(like.dtype)

    def inner(self, a: int, b: int, like: torch.Tensor, same: torch.Tensor | None) -> torch.Tensor:
        """``E[c^a_i c^b_k]`` for every pair of units ``(i, k)``."""
        ca, cb = self.c1[self._s(a)], self.c1[self._s(b)]
        c2 = self.c2[self.key(a, b)]
        if same is None:  # independent units: the diagonal alone differs from the product of means
            return ca[:, None] * cb[None, :] + torch.diag(c2 - ca * cb)
        outer = ca[:, None] * cb[None, :]
        return outer + same * (c2[:, None] - outer)

    def inner_fast(self, a: int, b: int, like: torch.Tensor, same: torch.Tensor | None) -> torch.Tensor:
        """:meth:`inner`, with fewer passes over ``(n, n)`` for independent units (diagonal set in place)."""
        if same is not None:
            return self.inner(a, b, like, same)
        ca, cb = self.c1[self._s(a)], self.c1[self._s(b)]
        out = torch.outer(ca, cb)
        out.diagonal().copy_(self.c2[self.key(a, b)])
        return out


class Theta0Cache:
    """The pairs of theta0-only blocks that an evaluation reads, kept between evaluations.

    They depend only on theta0, the stored summary, the network and the mixture component, never on the
    parameters evaluated; the estimator keeps one per component, device and dtype and drops it when any of
    those changes. It is derived data (not stored in a summary file, not counted as stored floats).

    Attributes:
        values: ``(block, block) -> tensor``: the pairs read so far (block ids are assigned in graph order, so
            they are the same on every evaluation of one network).
        complete: set after the first evaluation: every theta0-only pair an evaluation reads is in ``values``.
    """

    def __init__(self) -> None:
        """An empty cache (the next evaluation fills it)."""
        self.values: dict[tuple[int, int], torch.Tensor] = {}
        self.complete = False


class CacheMiss(RuntimeError):
    """A complete :class:`Theta0Cache` lacks a pair that an evaluation reads (rebuild it, evaluate again)."""


class _Block:
    """A live block: its number of entries, its mean ``E[b]`` and whether it depends on theta0 alone."""

    __slots__ = ("mean", "size", "theta0")

    def __init__(self, size: int, mean: torch.Tensor, theta0: bool) -> None:
        self.size = size
        self.mean = mean
        self.theta0 = theta0


#: Computes a pair; its argument says whether the pair depends on theta (then the theta0-only pairs it reads
#: are kept in the cache).
_Compute = Callable[[bool], torch.Tensor]


class _Pair:
    """``E[b c^T]`` of two blocks: a tensor, or a function computing it when it is first read.

    Attributes:
        value: the tensor once known.
        compute: the function (None once the value is known).
        depth: how many computations wait on each other to give it (0: known, or a cache lookup).
        key: for a pair of two theta0-only blocks, its key in the cache; None otherwise.
    """

    __slots__ = ("compute", "depth", "key", "value")

    def __init__(self, value: torch.Tensor | None = None, compute: _Compute | None = None,
                 key: tuple[int, int] | None = None) -> None:
        self.value = value
        self.compute = compute
        self.depth = 0
        self.key = key


class _View(NamedTuple):
    """A pair as a reader sees it: ``E[b_i b_j^T]`` is pair ``(j, i)`` transposed when ``i < j``."""

    pair: _Pair
    transposed: bool


class JointMoments:
    """``M = E[u u^T]`` of the joint state, by blocks (see the module docstring)."""

    def __init__(self, mean: torch.Tensor, second: torch.Tensor, input_shape: tuple[int, ...],
                 max_size: int, cache: Theta0Cache | None = None,
                 factors: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
        """The input's state (mean ``mean``, second moment ``second``), to grow to ``max_size`` units.

        ``cache`` (optional) keeps the theta0-only pairs between evaluations. ``factors`` (optional): ``(v,
        U)`` with ``second = diag(v) + U U^T`` and few columns in ``U`` (diagonal and low-rank input models),
        which a linear layer reading the input multiplies by at the cost of ``U``'s columns.
        """
        d = mean.numel()
        self.like = mean.new_zeros(())  # the device and dtype of the state
        self.max_size = max_size
        self.cache = cache
        self._blocks: dict[int, _Block] = {0: _Block(d, mean.reshape(d), True)}
        self._pairs: dict[tuple[int, int], _Pair] = {(0, 0): _Pair(value=second)}  # (i, j) with i >= j
        self.next_id = 1
        self.input = Ref(0, tuple(input_shape))
        self._input_factors = factors

    # ------------------------------------------------------------------ blocks and pairs
    def size_of(self, ref: Ref) -> int:
        """The number of entries of the block of ``ref``."""
        return self._blocks[ref.block].size

    def mean(self, block: int) -> torch.Tensor:
        """``E[b]`` of a live block, ``(n,)``."""
        return self._blocks[block].mean

    @property
    def num_units(self) -> int:
        """The number of joint units tracked: the constant and every entry of every live block."""
        return 1 + sum(b.size for b in self._blocks.values())

    def pair(self, i: int, j: int) -> torch.Tensor:
        """``E[b_i b_j^T]`` of two live blocks (computed now if it was not yet)."""
        return self._get(self._view(i, j), True)

    def _view(self, i: int, j: int) -> _View:
        return _View(self._pairs[(i, j)], False) if i >= j else _View(self._pairs[(j, i)], True)

    def _get(self, view: _View, mark: bool) -> torch.Tensor:
        """The value of a pair seen through ``view`` (its blocks may have been dropped since).

        ``mark``: the reader depends on theta, so a theta0-only pair it reads goes into the cache.
        """
        p = view.pair
        cache = self.cache
        if p.value is None:
            if p.key is not None and cache is not None:
                hit = cache.values.get(p.key)
                if hit is not None:
                    return hit.T if view.transposed else hit
                if cache.complete:
                    raise CacheMiss(f"theta0 pair {p.key} is not in the cache")
            assert p.compute is not None
            p.value = p.compute(p.key is None)
            p.compute = None
            p.depth = 0
        if mark and p.key is not None and cache is not None and not cache.complete:
            cache.values[p.key] = p.value
        return p.value.T if view.transposed else p.value

    def _cached(self, p: _Pair) -> bool:
        """Whether ``p`` is read from a complete cache (it is then never computed)."""
        return p.key is not None and self.cache is not None and self.cache.complete

    def _put(self, i: int, j: int, compute: _Compute, reads: Sequence[_View]) -> None:
        """Pair ``(i, j)`` (``i > j``, or ``i == j``), computed by ``compute`` when first read.

        ``reads``: the pairs ``compute`` reads. A pair at the end of a long chain of pairs still to compute is
        computed at once.
        """
        p = _Pair(compute=compute, key=(i, j) if self._blocks[i].theta0 and self._blocks[j].theta0 else None)
        p.depth = 1 + max((v.pair.depth for v in reads if not self._cached(v.pair)), default=0)
        self._pairs[(i, j)] = p
        if p.depth > MAX_PENDING_DEPTH and not self._cached(p):
            self._get(_View(p, False), False)

    def _new_block(self, size: int, mean: torch.Tensor, theta0: bool) -> int:
        total = self.num_units + size
        if total > self.max_size:
            raise MemoryError(
                f"laftr-exact would track {total} joint units (limit {self.max_size}); use the Monte Carlo "
                "'laftr' estimator for networks this wide, or raise max_state"
            )
        bid = self.next_id
        self.next_id += 1
        self._blocks[bid] = _Block(size, mean, theta0)
        return bid

    def keep_only(self, live: set[int]) -> None:
        """Drop every block not in ``live`` (pairs still to compute keep what they read)."""
        dead = set(self._blocks) - live
        if not dead:
            return
        for b in dead:
            del self._blocks[b]
        self._pairs = {k: v for k, v in self._pairs.items() if k[0] not in dead and k[1] not in dead}

    # ------------------------------------------------------------------ updates
    def affine(self, fns: Sequence[Callable[..., torch.Tensor]], inputs: Sequence[Sequence[Ref]], name: str,
               ) -> list[Ref]:
        """New blocks ``fns[i](inputs[i])`` (one per entry: one per stream, or one shared by both).

        Args:
            fns: per output block, the op of one example as a function of its data inputs (tensors of shape
                ``(1, *shape)``), affine in them. With two entries the first is theta0's stream and must not
                read theta; a single entry is shared by both streams and must read no parameters.
            inputs: per output block, the refs of its data inputs (the same order as the function's
                arguments).
            name: the node, for messages.
        """
        zeros = [[self.like.new_zeros((1, *r.shape)) for r in refs] for refs in inputs]
        consts = [f(*z) for f, z in zip(fns, zeros, strict=True)]
        if not isinstance(consts[0], torch.Tensor):
            raise UnsupportedOpError(f"node {name!r}: laftr-exact supports only ops that return one tensor")
        out_shape = tuple(consts[0].shape[1:])
        if consts[0].shape[0] != 1:
            raise UnsupportedOpError(
                f"node {name!r} moves or mixes the batch axis (one example's value has "
                f"{consts[0].shape[0]} rows, not 1): the closed forms need every value to keep its examples "
                "first, one per row; keep the batch axis first, or use the Monte Carlo estimators (laftr, "
                "liftr), which follow any layout")
        n_out = consts[0].numel()

        def apply_T(i: int, cols: Sequence[torch.Tensor], ones: torch.Tensor) -> torch.Tensor:
            """Op ``i`` on a batch of B columns: ``cols[k]`` ``(B, entries of input k)``, ``ones`` ``(B,)``.

            ``ones`` holds each column's entry for the constant 1 (the mean, for a column of M).
            """
            B = ones.shape[0]
            # contiguous: a transposed pair would make a matrix product broadcast its weight per column
            ins = [c.contiguous().view(B, 1, *r.shape) for c, r in zip(cols, inputs[i], strict=True)]
            out = torch.vmap(fns[i])(*ins).reshape(B, n_out)
            return torch.addr(out, ones - 1, consts[i].reshape(n_out))

        def cross(i: int, views: list[_View], mean: torch.Tensor) -> _Compute:
            """``E[o_i c^T]``: op i on the columns ``E[in c^T]`` (``views``) of block c (mean ``mean``)."""
            return lambda mark: apply_T(i, [self._get(v, mark) for v in views], mean).T

        def inner(i: int, j: int, views: list[_View], mean: torch.Tensor) -> _Compute:
            """``E[o_j o_i^T]`` (``i <= j``): op j on the rows ``E[o_i in_j^T]`` (``views``)."""
            def compute(mark: bool) -> torch.Tensor:
                Q = apply_T(j, [self._get(v, mark) for v in views], mean)  # (n_i, n_j) = E[o_i o_j^T]
                return 0.5 * (Q + Q.T) if i == j else Q.T

            return compute

        k = len(fns)
        old = list(self._blocks)
        one = self.like.new_ones(1)
        ids = []
        for i in range(k):
            theta0 = (k == 1 or i == 0) and all(self._blocks[r.block].theta0 for r in inputs[i])
            mean = apply_T(i, [self.mean(r.block)[None] for r in inputs[i]], one)[0]
            ids.append(self._new_block(n_out, mean, theta0))
        for i, o in enumerate(ids):
            for c in old:
                views = [self._view(c, r.block) for r in inputs[i]]
                self._put(o, c, cross(i, views, self.mean(c)), views)
        for j, oj in enumerate(ids):
            for i, oi in enumerate(ids[: j + 1]):
                views = [self._view(oi, r.block) for r in inputs[j]]
                self._put(oj, oi, inner(i, j, views, self.mean(oi)), views)
        return [Ref(i, out_shape) for i in ids]

    def linear(self, mats: Sequence[tuple[torch.Tensor, torch.Tensor | None]], inputs: Sequence[Ref],
               ) -> list[Ref]:
        """New blocks ``W_i in_i + b_i`` of 1-d blocks: :meth:`affine` with the op's matrix at hand.

        Args:
            mats: per output block, ``(W, b)`` with ``W`` ``(n_out, n_in)`` and ``b`` ``(n_out,)`` or None.
                With two entries the first is theta0's stream; a single entry is shared by both streams.
            inputs: per output block, its one data input.
        """
        k = len(mats)
        n_out = mats[0][0].shape[0]
        for (W, _), r in zip(mats, inputs, strict=True):
            if W.shape != (n_out, self.size_of(r)):
                raise ValueError(f"a {tuple(W.shape)} matrix cannot map a block of {self.size_of(r)} "
                                 f"entries to {n_out}")

        def offset(X: torch.Tensor, b: torch.Tensor | None, mean: torch.Tensor) -> torch.Tensor:
            """``X + b mean^T`` (a product with one inner index: faster than ``torch.addr``)."""
            return X if b is None else torch.addmm(X, b[:, None], mean[None, :])

        def cross(i: int, view: _View, mean_c: torch.Tensor) -> _Compute:
            """``E[o_i c^T] = W E[in c^T] + b E[c]^T``."""
            W, b = mats[i]
            return lambda mark: offset(W @ self._get(view, mark), b, mean_c)

        def inner(i: int, j: int, view: _View, mean_i: torch.Tensor) -> _Compute:
            """``E[o_j o_i^T] = W_j E[in_j o_i^T] + b_j E[o_i]^T`` (``i < j``)."""
            W, b = mats[j]
            return lambda mark: offset(W @ self._get(view, mark), b, mean_i)

        def square(i: int, view: _View, mean_in: torch.Tensor) -> _Compute:
            """``E[o o^T] = W A W^T + (W m) b^T + b (W m)^T + b b^T``, ``A = E[in in^T]``, ``m = E[in]``."""
            W, b = mats[i]
            factors = self._input_factors if inputs[i].block == 0 else None

            def compute(mark: bool) -> torch.Tensor:
                X = None
                if factors is not None:  # W A = W diag(v) + (W U) U^T
                    v, U = factors
                    X = torch.addmm(W * v, W @ U, U.mT)
                Q = _sandwich(W, self._get(view, mark), X)
                if b is None:
                    return Q
                u = W @ mean_in
                return offset(offset(Q, u + b, b), b, u)

            return compute

        old = list(self._blocks)
        ids = []
        for i, ((W, b), r) in enumerate(zip(mats, inputs, strict=True)):
            theta0 = (k == 1 or i == 0) and self._blocks[r.block].theta0
            mean = W @ self.mean(r.block)
            ids.append(self._new_block(n_out, mean if b is None else mean + b, theta0))
        for i, o in enumerate(ids):
            for c in old:
                view = self._view(inputs[i].block, c)
                self._put(o, c, cross(i, view, self.mean(c)), [view])
        for j, oj in enumerate(ids):
            for i, oi in enumerate(ids[:j]):
                view = self._view(inputs[j].block, oi)
                self._put(oj, oi, inner(i, j, view, self.mean(oi)), [view])
            view = self._view(inputs[j].block, inputs[j].block)
            self._put(oj, oj, square(j, view, self.mean(inputs[j].block)), [view])
        return [Ref(i, (n_out,)) for i in ids]

    def independent(self, mean: torch.Tensor, second: torch.Tensor, shape: tuple[int, ...]) -> Ref:
        """A new block independent of the whole state, with mean ``mean`` (n,) and second moment ``second``.

        ``second`` is (n, n); ``E[a u^T] = E[a] E[u]^T``. Its moments are stored ones: it depends on no
        parameter.
        """
        def cross(mean_c: torch.Tensor) -> _Compute:
            return lambda mark: mean[:, None] * mean_c[None, :]

        old = list(self._blocks)
        bid = self._new_block(mean.numel(), mean, True)
        for c in old:
            self._put(bid, c, cross(self.mean(c)), [])
        self._pairs[(bid, bid)] = _Pair(value=0.5 * (second + second.T))
        return Ref(bid, shape)

    def gate(self, pre: tuple[Ref, Ref], gm: GateMoments) -> tuple[Ref, Ref]:
        """Blocks ``y^a = c^a * s^a + r^a`` for both streams.

        One shared block when both the input and the map are the same in both streams.
        """
        n = self.size_of(pre[0])
        if gm.c1[0].numel() != n:
            raise ValueError(f"gate statistics have {gm.c1[0].numel()} units, the network has {n}")
        shared = pre[0].block == pre[1].block and not gm.stream_specific
        streams = [0] if shared else [0, 1]
        same = gm.same_group(n, self.like)
        pre_means = [self.mean(r.block) for r in pre]

        def cross(a: int, view: _View, mean_c: torch.Tensor) -> _Compute:
            """``E[y^a c^T] = E[c^a] E[s^a c^T] + E[r^a] E[c]^T``."""
            def compute(mark: bool) -> torch.Tensor:
                part = gm.c1[gm._s(a)][:, None] * self._get(view, mark)
                if gm.r1 is not None:
                    part = part + gm.r1[gm._s(a)][:, None] * mean_c[None, :]
                return part

            return compute

        def inner(a: int, b: int, view: _View) -> _Compute:
            """``E[y^b y^a^T]`` from ``E[s^a s^b^T]`` (``view``)."""
            def compute(mark: bool) -> torch.Tensor:
                blk = gm.inner_fast(a, b, self.like, same) * self._get(view, mark)
                if gm.r1 is not None:
                    blk = blk + _intercept_terms(gm, a, b, pre_means, same)
                return blk.T

            return compute

        old = list(self._blocks)
        ids = []
        for a in streams:
            mean = gm.c1[gm._s(a)] * pre_means[a]
            if gm.r1 is not None:
                mean = mean + gm.r1[gm._s(a)]
            theta0 = self._blocks[pre[a].block].theta0 and (a == 0 or not gm.stream_specific)
            ids.append(self._new_block(n, mean, theta0))
        for a, y in zip(streams, ids, strict=True):
            for c in old:
                view = self._view(pre[a].block, c)
                self._put(y, c, cross(a, view, self.mean(c)), [view])
        for bi, b in enumerate(streams):
            for ai, a in enumerate(streams[: bi + 1]):
                view = self._view(pre[a].block, pre[b].block)
                self._put(ids[bi], ids[ai], inner(a, b, view), [view])
        outs = [Ref(i, pre[0].shape) for i in ids]
        return outs[0], outs[-1]

    # ------------------------------------------------------------------ result
    def l2(self, out: tuple[Ref, Ref], outputs: Sequence[int] | None) -> torch.Tensor:
        """``1/2 E||z - z0||^2`` over the selected output units."""
        r0, r1 = out
        if r0.block == r1.block:
            return self.like.new_zeros(())
        a = torch.diagonal(self.pair(r0.block, r0.block))
        b = torch.diagonal(self.pair(r1.block, r1.block))
        c = torch.diagonal(self.pair(r0.block, r1.block))
        d = a + b - 2 * c
        size = a.abs() + b.abs() + 2 * c.abs()  # what the rounding of a + b - 2c is relative to
        if outputs is not None:
            keep = torch.as_tensor(list(outputs), device=d.device)
            d, size = d[keep], size[keep]
        # no single value under torch.func.vmap (one per parameter set; the caller then works in float64)
        self.last_scale = float("nan") if is_batched([size]) else 0.5 * float(size.detach().sum())
        return 0.5 * d.sum()


class _Sandwich(torch.autograd.Function):
    """``W A W^T`` for a symmetric ``A``: one matrix product fewer in the backward pass than autograd's.

    With ``X = W A`` kept from the forward pass, the gradient for ``W`` is ``(G + G^T) X`` and the one for
    ``A`` is ``W^T G W``. Differentiable twice (``X`` is then recomputed so that its graph is recorded).
    """

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, W: torch.Tensor, A: torch.Tensor,
                X: torch.Tensor | None) -> torch.Tensor:
        """``W A W^T``; ``X``: ``W A`` when it was computed more cheaply than by a product (else None)."""
        if X is None:
            X = W @ A
        ctx.save_for_backward(W, A, X)
        return X @ W.mT

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, G: torch.Tensor,
                 ) -> tuple[torch.Tensor | None, torch.Tensor | None, None]:
        """The gradients for ``W`` and ``A``."""
        W, A, X = ctx.saved_tensors  # type: ignore[attr-defined]
        needs_W, needs_A, _ = ctx.needs_input_grad  # type: ignore[attr-defined]
        if torch.is_grad_enabled():  # a graph of the gradient is being recorded: X must be a function of W
            X = W @ A
        dW = (G + G.mT) @ X if needs_W else None
        dA = W.mT @ G @ W if needs_A else None
        return dW, dA, None


def _sandwich(W: torch.Tensor, A: torch.Tensor, X: torch.Tensor | None = None) -> torch.Tensor:
    """``W A W^T`` for a symmetric ``A`` (a second moment); ``X = W A`` if known (computed differentiably).

    Inside a ``torch.func`` transform, plain products (the custom backward is autograd's alone); under
    autocast for ``W``'s device too (autocast runs the forward's products in a lower precision and not the
    custom backward's, which would then mix dtypes; autograd's backward of the plain products follows
    autocast's casts).
    """
    if in_func_transform() or autocast_dtype(W.device) is not None:
        return (W @ A if X is None else X) @ W.mT
    out = _Sandwich.apply(W, A, X)
    assert isinstance(out, torch.Tensor)
    return out


def _intercept_terms(gm: GateMoments, a: int, b: int, pre_means: Sequence[torch.Tensor],
                     same: torch.Tensor | None) -> torch.Tensor:
    """``E[c^a_i r^b_k] E[s^a_i] + E[r^a_i c^b_k] E[s^b_k] + E[r^a_i r^b_k]`` for every pair (i, k)."""
    assert gm.r1 is not None and gm.cr is not None and gm.r2 is not None
    ms_a, ms_b = pre_means[a], pre_means[b]
    ca, cb = gm.c1[gm._s(a)], gm.c1[gm._s(b)]
    ra, rb = gm.r1[gm._s(a)], gm.r1[gm._s(b)]

    def pairwise(x: torch.Tensor, y: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
        outer = x[:, None] * y[None, :]
        if same is None:
            return outer + torch.diag(second - x * y)
        return outer + same * (second[:, None] - outer)

    cr_ab = pairwise(ca, rb, gm.cr[gm.key(a, b)])  # E[c^a_i r^b_k]
    rc_ab = pairwise(ra, cb, gm.cr[gm.key(b, a)])  # E[r^a_i c^b_k] (same unit: E[c^b r^a])
    rr_ab = pairwise(ra, rb, gm.r2[gm.key(a, b)])
    return cr_ab * ms_a[:, None] + rc_ab * ms_b[None, :] + rr_ab
