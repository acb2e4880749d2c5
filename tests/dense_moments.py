"""The reference for the closed form's moment state: the dense implementation it replaced (kept verbatim).

laftr.moments keeps the joint second moment by blocks, computes each pair of blocks only when it is read
and keeps theta0's blocks between evaluations. This is the implementation it replaced, which holds M as one
dense matrix and recomputes everything on every evaluation; the tests run laftr-exact with both and compare.
Only the constructor's ``cache`` and ``factors`` arguments (ignored), the ``like`` attribute and ``linear`` (the generic\npath on ``F.linear``) were added; ``Ref`` and
``GateMoments`` are laftr's own.

Its original docstring follows.

The joint second-moment state of LAFTR's closed form (METHOD.md section 2b, generalized in section 6).

The joint state u = [1; every live tensor of both streams] has uncentered second moment ``M = E[u u^T]``.
Rules update it through two operations (the interpreter in :mod:`laftr.graph` decides nothing itself):

- :meth:`JointMoments.affine`: a new block b = T u with ``E[b u^T] = T M`` and ``E[b b^T] = T M T^T``,
  computed by running the op itself on the columns of M (``torch.vmap``), so any affine op works;
- :meth:`JointMoments.gate`: a random per-unit affine map ``y = c * s + r`` of a pre-activation block s, with
  (c, r) independent of the state and, across units, independent unless they share a randomness group (a
  normalizer is shared by the units of one position). Only first moments and same-group second moments of
  (c, r) enter (:class:`GateMoments`).

Blocks that no live value refers to are dropped, so memory follows the widest cut of the graph. The distance
is ``D = 1/2 E||z - z0||^2 = 1/2 sum_i (M[z_i, z_i] - 2 M[z_i, z0_i] + M[z0_i, z0_i])``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from laftr.errors import UnsupportedOpError
from laftr.moments import GateMoments, Ref  # the rules' objects (unchanged but for a helper)


class JointMoments:
    """``M = E[u u^T]`` of the joint state and the map from blocks to rows."""

    def __init__(self, mean: torch.Tensor, second: torch.Tensor, input_shape: tuple[int, ...],
                 max_size: int, cache: object = None, factors: object = None) -> None:
        """The input's state ``M = [[1, mean^T], [mean, second]]``, to grow to ``max_size`` rows."""
        d = mean.numel()
        self.M = torch.cat([torch.cat([mean.new_ones(1, 1), mean.view(1, d)], 1),
                            torch.cat([mean.view(d, 1), second], 1)])
        self.blocks: dict[int, tuple[int, int]] = {0: (1, d)}
        self.next_id = 1
        self.max_size = max_size
        self.input = Ref(0, tuple(input_shape))

    @property
    def like(self) -> torch.Tensor:
        """The state's device and dtype (what the rules read)."""
        return self.M

    def rows(self, ref: Ref) -> slice:
        """The rows (and columns) of M that hold the block of ``ref``."""
        start, size = self.blocks[ref.block]
        return slice(start, start + size)

    def add(self, R: torch.Tensor, Q: torch.Tensor, sizes: Sequence[int]) -> list[int]:
        """Append blocks with cross moments ``R`` (n, N) and inner moments ``Q`` (n, n)."""
        N = self.M.shape[0]
        n = R.shape[0]
        if N + n > self.max_size:
            raise MemoryError(
                f"laftr-exact would track {N + n} joint units (limit {self.max_size}); use the Monte Carlo "
                "'laftr' estimator for networks this wide, or raise max_state"
            )
        top = torch.cat([self.M, R.T], 1)
        bottom = torch.cat([R, Q], 1)
        self.M = torch.cat([top, bottom], 0)
        ids = []
        start = N
        for size in sizes:
            self.blocks[self.next_id] = (start, size)
            ids.append(self.next_id)
            self.next_id += 1
            start += size
        return ids

    def keep_only(self, live: set[int]) -> None:
        """Drop every block not in ``live`` (the constant row stays)."""
        dead = set(self.blocks) - live
        if not dead:
            return
        keep = [torch.arange(1, device=self.M.device)]
        new_blocks = {}
        pos = 1
        for bid, (start, size) in sorted(self.blocks.items(), key=lambda kv: kv[1][0]):
            if bid in dead:
                continue
            keep.append(torch.arange(start, start + size, device=self.M.device))
            new_blocks[bid] = (pos, size)
            pos += size
        idx = torch.cat(keep)
        self.M = self.M.index_select(0, idx).index_select(1, idx)
        self.blocks = new_blocks

    def size_of(self, ref: Ref) -> int:
        """The number of entries of the block of ``ref``."""
        return self.blocks[ref.block][1]

    # ------------------------------------------------------------------ updates
    def affine(self, fns: Sequence[Callable[..., torch.Tensor]], inputs: Sequence[Sequence[Ref]], name: str,
               ) -> list[Ref]:
        """New blocks ``fns[i](inputs[i])`` (one per entry: one per stream, or one shared by both).

        Args:
            fns: per output block, the op of one example as a function of its data inputs (tensors of shape
                ``(1, *shape)``), affine in them.
            inputs: per output block, the refs of its data inputs (the same order as the function's
                arguments).
            name: the node, for messages.
        """
        zeros = [[self.M.new_zeros((1, *r.shape)) for r in refs] for refs in inputs]
        consts = [f(*z) for f, z in zip(fns, zeros, strict=True)]
        if not isinstance(consts[0], torch.Tensor):
            raise UnsupportedOpError(f"node {name!r}: laftr-exact supports only ops that return one tensor")
        out_shape = tuple(consts[0].shape[1:])
        if consts[0].shape[0] != 1:
            raise UnsupportedOpError(f"node {name!r} mixes examples of a batch; not a per-example map")
        n_out = consts[0].numel()

        def apply_T(i: int, W: torch.Tensor) -> torch.Tensor:
            ins = [W[:, self.rows(r)].reshape(W.shape[0], 1, *r.shape) for r in inputs[i]]
            out = torch.vmap(fns[i])(*ins).reshape(W.shape[0], n_out)
            return out + (W[:, :1] - 1) * consts[i].reshape(1, n_out)

        k = len(fns)
        R = [apply_T(i, self.M).T for i in range(k)]  # E[out_i u^T]
        Q = torch.cat([torch.cat([apply_T(j, R[i]) for j in range(k)], 1) for i in range(k)])
        Q = 0.5 * (Q + Q.T)
        ids = self.add(torch.cat(R), Q, [n_out] * k)
        return [Ref(i, out_shape) for i in ids]

    def linear(self, mats, inputs):
        """Added for laftr's ``linear`` (a linear layer with its matrix at hand): the generic affine path."""
        fns = [lambda x, W=W, b=b: torch.nn.functional.linear(x, W, b) for W, b in mats]
        return self.affine(fns, [[r] for r in inputs], "linear")

    def independent(self, mean: torch.Tensor, second: torch.Tensor, shape: tuple[int, ...]) -> Ref:
        """A new block independent of the whole state, with mean ``mean`` (n,) and second moment ``second``.

        ``second`` is (n, n); ``E[a u^T] = E[a] E[u]^T`` (the constant row of M holds ``E[u]``).
        """
        R = mean[:, None] * self.M[0:1, :]
        (bid,) = self.add(R, 0.5 * (second + second.T), [mean.numel()])
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
        M = self.M
        has_r = gm.r1 is not None
        R_parts = []
        for a in streams:
            part = gm.c1[gm._s(a)][:, None] * M[self.rows(pre[a])]
            if has_r:
                assert gm.r1 is not None
                part = part + gm.r1[gm._s(a)][:, None] * M[0:1, :]
            R_parts.append(part)
        R = torch.cat(R_parts)
        same = gm.same_group(n, M)
        rows = []
        for a in streams:
            row = []
            for b in streams:
                blk = gm.inner(a, b, M, same) * M[self.rows(pre[a]), self.rows(pre[b])]
                if has_r:
                    assert gm.r1 is not None and gm.cr is not None and gm.r2 is not None
                    blk = blk + self._intercept_terms(gm, a, b, pre, same)
                row.append(blk)
            rows.append(torch.cat(row, 1))
        Q = torch.cat(rows)
        ids = self.add(R, Q, [n] * len(streams))
        outs = [Ref(i, pre[0].shape) for i in ids]
        return outs[0], outs[-1]

    def _intercept_terms(self, gm: GateMoments, a: int, b: int, pre: tuple[Ref, Ref],
                         same: torch.Tensor | None) -> torch.Tensor:
        """``E[c^a_i r^b_k] E[s^a_i] + E[r^a_i c^b_k] E[s^b_k] + E[r^a_i r^b_k]`` for every pair (i, k)."""
        assert gm.r1 is not None and gm.cr is not None and gm.r2 is not None
        ms_a = self.M[self.rows(pre[a]), 0]
        ms_b = self.M[self.rows(pre[b]), 0]
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

    # ------------------------------------------------------------------ result
    def l2(self, out: tuple[Ref, Ref], outputs: Sequence[int] | None) -> torch.Tensor:
        """``1/2 E||z - z0||^2`` over the selected output units."""
        r0, r1 = out
        if r0.block == r1.block:
            return self.M.new_zeros(())
        s0, s1 = self.rows(r0), self.rows(r1)
        idx = torch.arange(s0.stop - s0.start, device=self.M.device)
        if outputs is not None:
            idx = idx[torch.as_tensor(list(outputs), device=self.M.device)]
        a = self.M[s0.start + idx, s0.start + idx]
        b = self.M[s1.start + idx, s1.start + idx]
        c = self.M[s0.start + idx, s1.start + idx]
        return 0.5 * (a + b - 2 * c).sum()
