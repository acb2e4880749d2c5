"""Exact LAFTR for the ``l2`` metric: closed-form second-moment propagation (METHOD.md section 2b).

The joint state u = [1; every live tensor of both streams] has uncentered second moment
``M = E[u u^T]``. Each node updates it exactly for the stochastic-gated model:

- affine node with map T (stream-specific weights): the new block b = T u has ``E[b u^T] = T M`` and
  ``E[b b^T] = T M T^T``, computed by running the node's own op on the columns of M (``torch.vmap``),
  so any affine op the MC path supports works here without a hand-written matrix;
- gate node (unit i on with probability mu_i, value 1 or slope): ``E[g_i u_j] = e1_i E[s_i u_j]`` and
  ``E[g_i g_k] = e1_i e1_k E[s_i s_k]`` (i != k) or ``e2_i E[s_i s_k]`` (same unit, either stream),
  with e1, e2 the first and second moments of the gate;
- tensors with no remaining users are dropped, so memory follows the widest cut of the graph.

The output gives ``D = 1/2 E||z - z0||^2 = 1/2 sum_i (M[z_i, z_i] - 2 M[z_i, z0_i] + M[z0_i, z0_i])``.
No sampling noise, differentiable w.r.t. theta.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import fx
from torch.utils._pytree import tree_map

from .graph import Pair, TracedNet, _get_attr, _pairs, _stream, module_call
from .rules import Kind, UnsupportedOpError


class _Ref:
    """A data tensor living in the moment state: rows ``[start, start + size)`` of M."""

    __slots__ = ("block", "shape")

    def __init__(self, block: int, shape: tuple[int, ...]) -> None:
        self.block = block
        self.shape = shape  # per-example shape


class _State:
    def __init__(self, M: torch.Tensor, max_size: int) -> None:
        self.M = M
        self.blocks: dict[int, tuple[int, int]] = {}
        self.next_id = 0
        self.max_size = max_size

    def rows(self, ref: _Ref) -> slice:
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

    def drop(self, block_ids: set[int]) -> None:
        if not block_ids:
            return
        keep = [torch.arange(1, device=self.M.device)]
        new_blocks = {}
        pos = 1
        for bid, (start, size) in sorted(self.blocks.items(), key=lambda kv: kv[1][0]):
            if bid in block_ids:
                continue
            keep.append(torch.arange(start, start + size, device=self.M.device))
            new_blocks[bid] = (pos, size)
            pos += size
        idx = torch.cat(keep)
        self.M = self.M.index_select(0, idx).index_select(1, idx)
        self.blocks = new_blocks


def exact_l2(
    net: TracedNet,
    params: Sequence[dict[str, torch.Tensor]],
    mean: torch.Tensor,
    second: torch.Tensor,
    input_shape: tuple[int, ...],
    gates: dict[str, tuple[torch.Tensor, torch.Tensor]],
    outputs: Sequence[int] | None = None,
    max_state: int = 12000,
) -> torch.Tensor:
    """``1/2 E||g(x, m; theta) - g(x, m; theta0)||^2`` for x with the given first two moments.

    Args:
        net: the traced network.
        params: ``(theta0, theta)`` parameter dicts.
        mean: ``E[x]`` flattened, shape ``(d,)``.
        second: ``E[x x^T]``, shape ``(d, d)``.
        input_shape: per-example input shape (``prod == d``).
        gates: per gate site, ``(e1, e2)``: first and second moment of the gate of every unit.
        outputs: output units compared (all when None).
        max_state: refuse to track more joint units than this.
    """
    d = mean.numel()
    M0 = torch.cat([torch.cat([mean.new_ones(1, 1), mean.view(1, d)], 1), torch.cat([mean.view(d, 1), second], 1)])
    st = _State(M0, max_state)
    st.blocks[0] = (1, d)
    st.next_id = 1
    x_ref = _Ref(0, tuple(input_shape))
    env: dict[str, Any] = {}
    users = dict(net.users_left)
    node_blocks: dict[str, set[int]] = {}
    param_names = net._param_names
    for node in net.gm.graph.nodes:
        if node.op == "placeholder":
            if node is net.input_node:
                env[node.name] = Pair((x_ref, x_ref), True)
                node_blocks[node.name] = {0}
            else:
                env[node.name] = node.args[0]
            continue
        if node.op == "get_attr":
            t = str(node.target)
            env[node.name] = Pair(tuple(p[t] for p in params), False) if t in param_names else _get_attr(net.gm, t)
            continue
        if node.op == "output":
            out = fx.node.map_arg(node.args[0], lambda m: env[m.name])
            if not isinstance(out, Pair) or not out.data:
                raise UnsupportedOpError("the network must return a single tensor that depends on its input")
            r0, r1 = out.vals
            if r0.block == r1.block:
                return st.M.new_zeros(())
            s0, s1 = st.rows(r0), st.rows(r1)
            idx = torch.arange(s0.stop - s0.start, device=st.M.device)
            if outputs is not None:
                idx = idx[torch.as_tensor(list(outputs), device=st.M.device)]
            a = st.M[s0.start + idx, s0.start + idx]
            b = st.M[s1.start + idx, s1.start + idx]
            c = st.M[s0.start + idx, s1.start + idx]
            return 0.5 * (a + b - 2 * c).sum()
        args = fx.node.map_arg(node.args, lambda m: env[m.name])
        kwargs = fx.node.map_arg(node.kwargs, lambda m: env[m.name])
        env[node.name], new_ids = _eval(net, node, st, params, args, kwargs, gates)
        node_blocks[node.name] = new_ids
        dead: set[int] = set()
        for inp in node.all_input_nodes:
            users[inp.name] -= 1
            if users[inp.name] == 0:
                dead |= node_blocks.get(inp.name, set())
        live = set().union(*(node_blocks[n] for n in node_blocks if users.get(n, 0) > 0 or n == node.name))
        st.drop(dead - live)
    raise AssertionError("graph has no output node")


def _eval(net: TracedNet, node: fx.Node, st: _State, params: Sequence[dict], args: Any, kwargs: Any,
          gates: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> tuple[Any, set[int]]:
    pairs = _pairs((args, kwargs))
    data = [p for p in pairs if p.data]
    rule = net.rules[node.name]
    if not data:
        if not pairs:
            return net._call(node, 0, params[0], args, kwargs), set()
        return Pair(tuple(net._call(node, s, params[s], args, kwargs) for s in range(2)), False), set()
    if rule.kind is Kind.SHAPE:
        dummy = tree_map(lambda v: _dummy(v, st.M) if isinstance(v, Pair) and v.data else v, (args, kwargs))
        return net._call(node, 0, params[0], dummy[0], dummy[1]), set()
    if rule.kind is Kind.IDENTITY:
        return args[0], set()
    if rule.kind is Kind.MAXPOOL:
        raise UnsupportedOpError(
            f"node {node.name!r}: laftr-exact does not handle max pooling; use the Monte Carlo 'laftr' estimator"
        )
    if rule.kind is Kind.GATE:
        return _gate(st, args[0], gates[node.name])
    if rule.kind is Kind.AFFINE:
        net.check_affine(node, args, kwargs)
    return _affine(net, node, st, params, args, kwargs, data)


def _dummy(p: Pair, M: torch.Tensor) -> torch.Tensor:
    return M.new_zeros((1, *p.vals[0].shape))


def _gate(st: _State, pre: Pair, e: tuple[torch.Tensor, torch.Tensor]) -> tuple[Pair, set[int]]:
    r0, r1 = pre.vals
    e1 = e[0].reshape(-1).to(st.M)
    e2 = e[1].reshape(-1).to(st.M)
    if e1.numel() != st.blocks[r0.block][1]:
        raise ValueError(f"gate statistics have {e1.numel()} units, the network has {st.blocks[r0.block][1]}")
    inner = e1[:, None] * e1[None, :] + torch.diag(e2 - e1 * e1)
    refs = [r0] if r0.block == r1.block else [r0, r1]
    R = torch.cat([e1[:, None] * st.M[st.rows(r)] for r in refs])
    Q = torch.cat([torch.cat([inner * st.M[st.rows(a), st.rows(b)] for b in refs], 1) for a in refs])
    ids = st.add(R, Q, [e1.numel()] * len(refs))
    outs = [_Ref(i, r0.shape) for i in ids]
    return Pair((outs[0], outs[-1]), True), set(ids)


def _affine(net: TracedNet, node: fx.Node, st: _State, params: Sequence[dict], args: Any, kwargs: Any,
            data: list[Pair]) -> tuple[Pair, set[int]]:
    uniq: list[Pair] = []
    for p in data:
        if all(p is not q for q in uniq):
            uniq.append(p)
    stream_specific = any(not p.data for p in _pairs((args, kwargs))) or (
        node.op == "call_module" and any(True for _ in net.gm.get_submodule(str(node.target)).parameters(recurse=True))
    ) or (node.op == "call_module" and any(True for _ in net.gm.get_submodule(str(node.target)).buffers()))
    shared = not stream_specific and all(p.vals[0].block == p.vals[1].block for p in uniq)
    streams = [0] if shared else [0, 1]

    def make_fn(s: int):
        def fn(*tensors: torch.Tensor) -> torch.Tensor:
            lookup = {id(p): t for p, t in zip(uniq, tensors)}
            a, k = tree_map(lambda v: lookup[id(v)] if isinstance(v, Pair) and v.data else v, (args, kwargs))
            a, k = _stream(a, s), _stream(k, s)
            if node.op == "call_module":
                return module_call(net.gm.get_submodule(str(node.target)), str(node.target), params[s], a, k)
            if node.op == "call_function":
                return node.target(*a, **k)
            return getattr(a[0], str(node.target))(*a[1:], **k)

        return fn

    fns = [make_fn(s) for s in streams]
    zeros = [st.M.new_zeros((1, *p.vals[0].shape)) for p in uniq]
    consts = [f(*zeros) for f in fns]
    if not isinstance(consts[0], torch.Tensor):
        raise UnsupportedOpError(f"node {node.name!r}: laftr-exact supports only ops that return one tensor")
    out_shape = tuple(consts[0].shape[1:])
    if consts[0].shape[0] != 1:
        raise UnsupportedOpError(f"node {node.name!r} mixes examples of a batch; not a per-example map")
    n_out = consts[0].numel()

    def apply_T(i: int, W: torch.Tensor) -> torch.Tensor:
        s = streams[i]
        ins = [W[:, st.rows(p.vals[s])].reshape(W.shape[0], 1, *p.vals[s].shape) for p in uniq]
        out = torch.vmap(fns[i])(*ins).reshape(W.shape[0], n_out)
        return out + (W[:, :1] - 1) * consts[i].reshape(1, n_out)

    R = [apply_T(i, st.M).T for i in range(len(streams))]  # E[out_i u^T]
    Q = torch.cat([torch.cat([apply_T(j, R[i]) for j in range(len(streams))], 1) for i in range(len(streams))])
    Q = 0.5 * (Q + Q.T)
    ids = st.add(torch.cat(R), Q, [n_out] * len(streams))
    refs = [_Ref(i, out_shape) for i in ids]
    return Pair((refs[0], refs[-1]), True), set(ids)
