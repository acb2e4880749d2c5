"""Tracing with torch.fx and THE interpreter that runs a network's parameter sets ("streams") node by node.

The network is never mutated: each stream's parameters come from a dict (theta0's stored copy, or the live
model's parameters). For every node that depends on the input, the interpreter calls the method of the
node's rule (:mod:`laftr.rules`) named by the current *mode*; it never looks at what the op is:

- :class:`ForwardMode` (``forward``): every stream runs the real network (used by K-FAC and diag-Fisher to
  tap their layers, and to check that the interpreter reproduces the model);
- :class:`FitMode` (``fit``): theta0 alone on real data, while sites record their statistics;
- :class:`SampleMode` (``sample``): LAFTR's Monte Carlo linearization from the stored statistics;
- :class:`StepMode` (``sample``): LIFTR's step-wise variant, theta0's stream re-drawn at every anchored op;
- :class:`OwnMode` (``own``): theta0's own linearization on each input (``gates="relu"``);
- :class:`MomentMode` (``moments``): the closed form, on the joint second moment (:mod:`laftr.moments`);
- :class:`StepMomentMode` (``moments``): LIFTR's closed form.

Nodes that do not depend on the input (parameter arithmetic) run exactly in each stream, with or without a
rule.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import inspect
import logging
import math
import operator
from collections.abc import Callable, Iterator, Sequence
from typing import Any, ClassVar, cast

import torch
from torch import fx, nn
from torch.func import functional_call
from torch.nn.utils import parametrize
from torch.utils._pytree import tree_flatten, tree_map

from . import rules as _rules  # noqa: F401  (importing registers the built-in rules)
from ._util import SEVERAL_INPUTS_FIX, eval_mode, param_dict
from .composites import KEPT_WHOLE, OTHER_BASE, traced_forward, traced_function, traced_method
from .errors import UnsupportedOpError
from .metrics import check_network_output
from .moments import GateMoments, JointMoments, Ref
from .rules.affine import SHAPE_ATTRS, CastRule, DivideRule, GetattrRule, LikeRule, ReshapeRule, ShapeRule
from .rules.attention import EmbeddingRule, QuotientRule
from .rules.base import (
    Pair,
    Rule,
    anchorable_pairs,
    data_pairs,
    describe,
    is_registered_function,
    is_registered_method,
    is_registered_module,
    lookup,
    make_rule,
    out_of_place_function,
    out_of_place_method,
    pairs_in,
    registered_targets,
    stream_of,
)
from .rules.gates import ClampGate, ClampMaxGate, ClampMinGate
from .rules.pooling import MaxDimRule

log = logging.getLogger(__name__)

__all__ = ["FitMode", "ForwardMode", "Mode", "MomentMode", "OwnMode", "SampleMode", "StepMode",
           "StepMomentMode", "TracedNet", "check_per_example", "trace"]


class _Tracer(fx.Tracer):
    """torch.fx's tracer, keeping every module that has a rule as a leaf.

    A user's registered activation is kept too. torch.nn's transformer modules (:mod:`laftr.composites`) are
    traced through their parts unless a rule is registered for them.

    Buffers are read as graph nodes first (``proxy_buffer_attributes``, see :func:`trace`).
    """

    proxy_buffer_attributes = True

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if is_registered_module(m):
            return True
        if traced_forward(m) is not None:
            return False
        return super().is_leaf_module(m, module_qualified_name)

    def call_module(self, m: nn.Module, forward: Callable[..., Any], args: tuple[Any, ...],
                    kwargs: dict[str, Any]) -> Any:
        fn = None if is_registered_module(m) else traced_forward(m)
        if fn is not None:
            forward = functools.partial(fn, m)
        elif isinstance(m, fx.GraphModule) and not is_registered_module(m):
            forward = functools.partial(self._replay, m)
        return super().call_module(m, forward, args, kwargs)

    def _replay(self, gm: fx.GraphModule, *args: Any, **kwargs: Any) -> Any:
        """A graph traced before (``transformers.utils.fx.symbolic_trace``'s) recorded again node by node.

        Its generated code is not run: it may call what cannot take a traced value (``torch.finfo`` of a
        tensor's dtype), which the graph holds as plain nodes. Each node is recorded again through this tracer
        (its modules by their rules or parts, its attributes under the enclosing module's names).
        """
        path = self.path_of_module(gm)
        prefix = f"{path}." if path else ""
        placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        env: dict[fx.Node, Any] = {}
        for i, node in enumerate(placeholders):
            if i < len(args):
                env[node] = args[i]
            elif node.target in kwargs:
                env[node] = kwargs[node.target]
            elif node.args:  # its default
                env[node] = node.args[0]
            else:
                raise TypeError(f"{type(gm).__name__} needs its argument {node.target!r}")

        def value(a: Any) -> Any:
            return fx.node.map_arg(a, lambda n: env[n])

        for node in gm.graph.nodes:
            if node.op == "placeholder":
                continue
            if node.op == "output":
                return value(node.args[0])
            if node.op == "get_attr":
                env[node] = self.create_proxy("get_attr", prefix + str(node.target), (), {})
            elif node.op == "call_module":
                sub = gm.get_submodule(str(node.target))
                env[node] = self.call_module(sub, sub.forward, value(node.args), value(node.kwargs))
            else:
                env[node] = self.create_proxy(node.op, node.target, value(node.args), value(node.kwargs))
        raise AssertionError("a graph without an output node")

    def create_proxy(self, kind: str, target: Any, args: tuple[Any, ...], kwargs: dict[str, Any],
                     *rest: Any, **options: Any) -> Any:
        _refuse_out(kind, target, kwargs)
        bounds = _tensor_bounds(kind, target, args, kwargs)
        if bounds is not None:  # clamp(x, lo, hi) with a bound of the state: maximum / minimum, gates on both
            x, lo, hi = bounds
            steps = ((lo, torch.maximum, torch.clamp_min), (hi, torch.minimum, torch.clamp_max))
            for bound, of_tensor, of_number in steps:
                if bound is not None:
                    tensor = isinstance(bound, fx.Proxy) and not _number_valued(bound.node)
                    x = self.create_proxy("call_function", of_tensor if tensor else of_number, (x, bound), {},
                                          *rest, **options)
            return x
        elementwise = _elementwise_max(kind, target, args, kwargs)
        if elementwise is not None:  # torch.max(a, b) of two tensors: torch.maximum(a, b)
            return self.create_proxy(kind, elementwise, (args[0], _other_arg(args, kwargs)), {}, *rest,
                                     **options)
        fn = None
        if kind == "call_function" and not is_registered_function(target):
            fn = traced_function(target)
        elif kind == "call_method" and not is_registered_method(target):
            fn = traced_method(target)
        # F.glu, F.softmin, torch.maximum, torch.lerp, F.bilinear, ...: traced as their parts; torch.maximum
        # and its kin (KEPT_WHOLE) only of both the input and the state, not of booleans (their logical or)
        if fn is not None and (target not in KEPT_WHOLE or (
                all(self._reads((args, kwargs))) and not any(map(_boolean, (*args, *kwargs.values()))))):
            return self._numerically_safe(fn, args, kwargs)(*args, **kwargs)
        return super().create_proxy(kind, target, args, kwargs, *rest, **options)

    def _numerically_safe(self, fn: Callable[..., Any], args: tuple[Any, ...],
                          kwargs: dict[str, Any]) -> Callable[..., Any]:
        """``fn``, or its form with the other operand as the base (:data:`laftr.composites.OTHER_BASE`).

        That form where ``fn``'s own base is a constant and the other operand is not
        (``torch.maximum(scores, c)``).
        """
        if fn not in OTHER_BASE:
            return fn
        alternative, base = OTHER_BASE[fn]
        operands = [args[0] if args else kwargs.get("input"), _other_arg(args, kwargs)]
        constant = [self._constant(v) for v in operands]
        return alternative if constant[base] and not constant[1 - base] else fn

    def _constant(self, value: Any) -> bool:
        """Whether a traced operand is a constant.

        A number, a tensor that is no parameter or buffer, or a value that reads neither the network input
        nor the state -- except zeros made to a shape (exact in either form: ``torch.maximum(h,
        torch.zeros_like(h))`` keeps the form of ``torch.relu(h)``).
        """
        if isinstance(value, fx.Proxy):
            node = value.node
            if node.op in ("call_function", "call_method") and node.target in _ZEROS_LIKE:
                return False
        return not any(self._reads(value))

    def _reads(self, value: Any) -> tuple[bool, bool]:
        """Whether ``value`` (a call's arguments while tracing) reads the network input; and the state.

        The state: a parameter or buffer, or a module that holds one. What only reads a shape (``x.shape``,
        ``x.size(1)``, ``torch.zeros_like(x)``) reads neither of the tensor it looks at.
        """
        root = self.root
        state = getattr(self, "_state", None)
        if state is None:
            named = [*root.named_parameters(remove_duplicate=False),
                     *root.named_buffers(remove_duplicate=False)]
            state = self._state = ({n for n, _ in named}, {id(t) for _, t in named})
        names, ids = state
        reads_input = reads_state = False
        todo: list[fx.Node] = []
        for leaf in tree_flatten(value)[0]:
            if isinstance(leaf, fx.Proxy):
                todo.append(leaf.node)
            elif isinstance(leaf, torch.Tensor) and (isinstance(leaf, nn.Parameter) or id(leaf) in ids):
                reads_state = True
        seen: set[fx.Node] = set()
        while todo and not (reads_input and reads_state):
            node = todo.pop()
            if node in seen:
                continue
            seen.add(node)
            if node.op == "placeholder":
                reads_input = True
                continue
            if node.op == "get_attr":
                reads_state = reads_state or str(node.target) in names
                continue
            if node.op == "call_module":
                mod = root.get_submodule(str(node.target))
                reads_state = reads_state or any(True for _ in mod.parameters()) or any(
                    True for _ in mod.buffers())
            # (a function's or method's rule: the module argument is read for modules only)
            rule = lookup(node, cast(fx.GraphModule, root)) if node.op != "call_module" else None
            attr = node.args[1] if rule is GetattrRule and len(node.args) > 1 else None
            if rule is ShapeRule or attr in SHAPE_ATTRS:
                continue  # a shape, not the values
            if node.op in ("call_function", "call_method") and node.target in _SHAPE_ONLY:
                # the first argument gives a shape only
                sources = [*node.args[1:], *node.kwargs.values()]
                todo.extend(n for n in tree_flatten(sources)[0] if isinstance(n, fx.Node))
                continue
            todo.extend(node.all_input_nodes)
        return reads_input, reads_state


#: torch.max / torch.min (function and method) and their elementwise forms of two tensors
_ELEMENTWISE_FORMS: dict[Any, Any] = {torch.max: torch.maximum, torch.min: torch.minimum, "max": "maximum",
                                      "min": "minimum"}

#: methods and functions whose result is a Python number (a ``dim`` argument built from them)
_NUMBER_RESULTS = frozenset({len, int, float, round, math.floor, math.ceil, operator.index, "size", "dim",
                             "numel", "ndimension", "nelement", "item", "tolist", "__len__", "__index__"})

#: arithmetic, which gives a number of numbers
_NUMBER_OPS = frozenset({operator.add, operator.sub, operator.mul, operator.floordiv, operator.truediv,
                         operator.mod, operator.neg, operator.pos, operator.abs, operator.getitem, abs, min,
                         max})

#: ops whose result is boolean (comparisons, logical ops): no arithmetic of theirs is traced
_BOOLEAN_RESULTS = frozenset({operator.gt, operator.lt, operator.ge, operator.le, operator.eq, operator.ne,
                              operator.and_, operator.or_, operator.xor, operator.invert, torch.gt, torch.lt,
                              torch.ge, torch.le, torch.eq, torch.ne, torch.logical_and, torch.logical_or,
                              torch.logical_xor, torch.logical_not, torch.isnan, torch.isinf, torch.isfinite,
                              "gt", "lt", "ge", "le", "eq", "ne", "logical_and", "logical_or", "logical_xor",
                              "logical_not", "bool", "isnan", "isinf", "isfinite"})


#: the clamps (out of place) and where their bounds are: ``(position, keyword)`` of the lower and the upper
_CLAMPS: dict[Any, tuple[tuple[int, str] | None, tuple[int, str] | None]] = {
    **dict.fromkeys((torch.clamp, torch.clip, "clamp", "clip"), ((1, "min"), (2, "max"))),
    **dict.fromkeys((torch.clamp_min, "clamp_min"), ((1, "min"), None)),
    **dict.fromkeys((torch.clamp_max, "clamp_max"), (None, (1, "max"))),
}


def _tensor_bounds(kind: str, target: Any, args: tuple[Any, ...],
                   kwargs: dict[str, Any]) -> tuple[Any, Any, Any] | None:
    """``(x, lower, upper)`` of a clamp whose bounds include a traced tensor (a learned threshold), else None.

    ``x.clamp(max=self.alpha)`` (PACT's learned clipping) is traced as ``torch.minimum(x, self.alpha)``, a
    number bound beside it as the clamp of that bound: the clamp's rule takes numbers only, and
    ``torch.maximum`` / ``minimum`` are gates on the difference (:mod:`laftr.composites`). Not for the
    in-place clamps (their change of ``x`` would be lost), nor where the user registered a rule of their own.
    """
    spec = _rewritable(kind, target, _CLAMPS, (ClampGate, ClampMinGate, ClampMaxGate))
    if spec is None:
        return None
    lo, hi = (None if at is None else kwargs.get(at[1], args[at[0]] if at[0] < len(args) else None)
              for at in spec)
    if not any(isinstance(b, fx.Proxy) and not _number_valued(b.node) for b in (lo, hi)):
        return None
    return (args[0] if args else kwargs.get("input")), lo, hi


def _rewritable(kind: str, target: Any, table: dict[Any, Any], rules: tuple[type[Rule], ...]) -> Any:
    """``table[target]`` for a call whose registered rule is still one of laftr's ``rules``, else None.

    ``target``: a function, or a method named by a string. A user's own rule for it gets the call as written.
    """
    if kind not in ("call_function", "call_method"):
        return None
    try:
        entry = table.get(target)
    except TypeError:  # unhashable target
        return None
    if entry is None or (kind == "call_method") != isinstance(target, str):
        return None
    registered = registered_targets()["methods" if kind == "call_method" else "functions"]
    return entry if registered.get(target) in rules else None


def _refuse_out(kind: str, target: Any, kwargs: dict[str, Any]) -> None:
    """Refuse ``out=`` on the calls the tracer rewrites (``torch.max(a, b, out=t)``, ``torch.clamp``).

    The rewritten call would drop it: the tensor written into keeps its old value in the graph.
    """
    if "out" not in kwargs or kind not in ("call_function", "call_method"):
        return
    try:
        rewritten = target in _ELEMENTWISE_FORMS or target in _CLAMPS
    except TypeError:  # unhashable target
        return
    if rewritten:
        name = target if isinstance(target, str) else getattr(target, "__name__", str(target))
        raise UnsupportedOpError(
            f"{name}(..., out=...) writes its result into another tensor, which laftr's graph does not "
            "follow (it runs every op out of place); assign the result instead (y = torch.max(a, b))")


def _other_arg(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """The second operand of ``torch.max(input, other)``: positional, or the keyword ``other``."""
    return args[1] if len(args) > 1 else kwargs.get("other")


def _number_valued(node: fx.Node) -> bool:
    """Whether ``node`` computes a Python number (``x.dim() - 1``, ``x.shape[1] * 0.1``, ``self.d.item()``).

    A shape attribute read (``x.ndim``, ``x.shape``), a size query, ``.item()``, and arithmetic, indexing,
    ``abs`` and ``len`` of those; anything else (a tensor op, a constant tensor) is taken for a tensor.
    """
    if node.op == "call_method":
        return node.target in _NUMBER_RESULTS
    if node.op != "call_function":
        return False
    if node.target is getattr:
        return len(node.args) > 1 and node.args[1] in SHAPE_ATTRS
    if node.target in _NUMBER_RESULTS:
        return True
    if node.target not in _NUMBER_OPS:
        return False
    nodes = [a for a in node.args if isinstance(a, fx.Node)]
    return bool(nodes) and all(_number_valued(a) for a in nodes)


def _boolean(value: Any) -> bool:
    """Whether a traced operand is boolean: a comparison, a logical op, a boolean tensor."""
    if isinstance(value, torch.Tensor):
        return value.dtype == torch.bool
    if not isinstance(value, fx.Proxy):
        return False
    node = value.node
    if node.op not in ("call_function", "call_method"):
        return False
    if node.target in ("to", "type"):
        return torch.bool in (*node.args[1:], *node.kwargs.values())
    return node.target in _BOOLEAN_RESULTS


def _elementwise_max(kind: str, target: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """The elementwise op a call of ``torch.max`` / ``x.max`` (or ``min``) while tracing stands for, if any.

    ``torch.maximum`` (``"maximum"``, ``torch.minimum``, ...) for the elementwise form of two tensors
    (``torch.max(scores, torch.tensor(m))``, OPT's eager attention); None for the forms over a dim, for every
    other call, and where the user registered a rule of their own for ``torch.max`` (it gets the call as
    written).

    The second operand is a tensor when it is one (a constant), or a traced value that is not an int computed
    from shapes (:func:`_number_valued`); ``dim=`` given by keyword is the reduction.
    """
    form = _rewritable(kind, target, _ELEMENTWISE_FORMS, (MaxDimRule,))
    if form is None or "dim" in kwargs:
        return None
    other = _other_arg(args, kwargs)
    if isinstance(other, torch.Tensor) or (isinstance(other, fx.Proxy) and not _number_valued(other.node)):
        return form
    return None


def _trace_graph_module(tracer: _Tracer, gm: fx.GraphModule) -> fx.Graph:
    """``tracer.trace(gm)`` with ``gm``'s graph replayed node by node instead of its generated code run.

    torch.fx gives each graph module a class of its own; its ``forward`` is swapped for the replay during the
    trace (the placeholders keep the names of the original ``forward``'s arguments) and put back after.
    """
    cls = type(gm)
    original = cls.forward

    def replay(self: fx.GraphModule, *args: Any, **kwargs: Any) -> Any:
        return tracer._replay(self, *args, **kwargs)

    replay.__wrapped__ = original  # type: ignore[attr-defined]  # torch.fx reads the arguments' names here
    cls.forward = replay
    try:
        return tracer.trace(gm)
    finally:
        cls.forward = original


def _calls(node: Any, functions: tuple[Any, ...], methods: tuple[str, ...]) -> bool:
    """Whether ``node`` is a call of one of ``functions`` or of a tensor method named in ``methods``."""
    return isinstance(node, fx.Node) and (
        (node.op == "call_function" and node.target in functions)
        or (node.op == "call_method" and node.target in methods))


def _same_value(a: Any, b: Any, depth: int = 8) -> bool:
    """Whether two arguments of a traced graph compute the same value.

    One node, or the same op of the same arguments (an expression written twice, ``(h - m).exp() / (h -
    m).exp().sum(...)``), up to ``depth`` ops deep.
    """
    if isinstance(a, fx.Node) and isinstance(b, fx.Node):
        if a is b:
            return True
        if depth == 0 or a.op != b.op or a.target != b.target or a.op not in (
                "call_function", "call_method", "call_module") or len(a.args) != len(b.args) \
                or a.kwargs.keys() != b.kwargs.keys():
            return False
        return all(_same_value(x, y, depth - 1) for x, y in zip(a.args, b.args, strict=True)) and all(
            _same_value(a.kwargs[k], b.kwargs[k], depth - 1) for k in a.kwargs)
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(_same_value(x, y, depth) for x, y in zip(a, b, strict=True))
    return not isinstance(a, fx.Node) and not isinstance(b, fx.Node) and type(a) is type(b) and a == b


#: the largest constant a softmax written by hand may add to its denominator, or clamp it to, and still be
#: folded: after the usual shift by the maximum the sum is at least 1, so the constant changes it by at most
#: this fraction (the fold drops it)
SOFTMAX_EPS = 1e-6


def _softmax_sum(den: Any) -> Any:
    """The ``sum`` node a denominator is, or None.

    Through ``+ eps``, ``.clamp_min(eps)`` or ``.clamp(min=eps)`` with a small constant (:data:`SOFTMAX_EPS`).
    """
    def small(c: Any) -> bool:
        return isinstance(c, (int, float)) and not isinstance(c, bool) and 0 <= c <= SOFTMAX_EPS

    if _calls(den, (operator.add, torch.add), ("add",)) and len(den.args) == 2 and not den.kwargs:
        a, b = den.args
        den = a if small(b) else b if small(a) else None
    elif _calls(den, (torch.clamp_min,), ("clamp_min",)) and len(den.args) == 2 and small(den.args[1]):
        den = den.args[0]
    elif (_calls(den, (torch.clamp,), ("clamp",)) and len(den.args) == 1 and set(den.kwargs) == {"min"}
          and small(den.kwargs["min"])):
        den = den.args[0]
    return den if _calls(den, (torch.sum,), ("sum",)) else None


def _fold_softmax_by_hand(graph: fx.Graph) -> bool:
    """``exp(a) / exp(a).sum(dim, keepdim=True)`` (a softmax written by hand) as one ``softmax(a, dim)``.

    Each part alone has a rule -- the exponential a gate, the division by data a tangent at theta0's sampled
    values -- and the sampled denominator, a sum of exponentials linearized with random slopes, can come close
    to zero: the estimate grew without bound with the number of samples (1e6 times the exact FSD at 4,096 on
    an audit's network). The softmax's rule treats the whole (its Jacobian at theta0's logits, its stored
    law). ``a`` is kept as written (``h - h.amax(dim, keepdim=True)``: a softmax is the same for every shift).
    Also ``exp(a) * exp(a).sum(...).reciprocal()``, and a denominator guarded by a small constant (``+ 1e-8``,
    ``.clamp_min(1e-8)``, up to :data:`SOFTMAX_EPS`; the fold drops it). Returns whether it folded one.
    """
    exps = (torch.exp,)
    divs = (operator.truediv, torch.div, torch.true_divide)
    muls = (operator.mul, torch.mul)
    folded = False
    for node in list(graph.nodes):
        if len(node.args) != 2 or node.kwargs:
            continue
        if _calls(node, divs, ("div", "true_divide")):
            num, den = node.args
        elif _calls(node, muls, ("mul",)):  # exp(a) * exp(a).sum(...).reciprocal(), in either order
            a, b = node.args
            if _calls(a, (torch.reciprocal,), ("reciprocal",)):
                a, b = b, a
            if not (_calls(b, (torch.reciprocal,), ("reciprocal",)) and len(b.args) == 1 and not b.kwargs):
                continue
            num, den = a, b.args[0]
        else:
            continue
        total = _softmax_sum(den)
        if not (_calls(num, exps, ("exp",)) and total is not None):
            continue
        assert isinstance(num, fx.Node) and isinstance(total, fx.Node)
        inner = total.args[0] if total.args else None
        if not (_calls(inner, exps, ("exp",)) and isinstance(inner, fx.Node) and len(num.args) == 1
                and _same_value(inner, num)):
            continue
        extra = dict(total.kwargs)
        dim = extra.pop("dim", total.args[1] if len(total.args) > 1 else None)
        keepdim = extra.pop("keepdim", total.args[2] if len(total.args) > 2 else False)
        if extra or len(total.args) > 3 or type(dim) is not int or keepdim is not True:
            continue
        with graph.inserting_before(node):
            whole = graph.call_function(torch.softmax, (num.args[0], dim))
        node.replace_all_uses_with(whole)
        graph.erase_node(node)
        folded = True
    if folded:
        graph.eliminate_dead_code()  # the parts nothing reads any more (the sum, a shift written twice)
    return folded


#: in-place tensor methods that change no value
_METADATA_INPLACE = frozenset({"requires_grad_", "share_memory_", "retain_grad"})


def _mutated(node: fx.Node, gm: Any) -> Any:
    """The value an op changes in place and the interpreter runs out of place (its first argument), or None.

    The ops :func:`laftr.rules.base.out_of_place_function` / ``out_of_place_method`` give a twin for, those
    called with ``inplace=True`` and modules with ``inplace`` set -- what :meth:`laftr.rules.Rule.call` and
    ``module_call`` turn into copies.
    """
    target = node.target
    first = node.args[0] if node.args else None
    if node.op == "call_method":
        name = str(target)
        in_place = out_of_place_method(name) != name and name not in _METADATA_INPLACE
    elif node.op == "call_function":
        in_place = out_of_place_function(target) is not target or node.kwargs.get("inplace") is True
    elif node.op == "call_module":
        in_place = getattr(gm.get_submodule(str(target)), "inplace", False) is True
    else:
        return None
    return first if in_place and isinstance(first, fx.Node) else None


#: ops whose result may share its input's memory (an in-place change of one is seen through the other)
_VIEWS = frozenset({"view", "view_as", "reshape", "reshape_as", "transpose", "permute", "expand", "expand_as",
                    "narrow", "select", "unsqueeze", "squeeze", "flatten", "unflatten", "t", "T", "mT",
                    "as_strided", "contiguous", "detach", "unbind", "chunk", "split", "movedim", "swapaxes",
                    "diagonal", "real", "imag", "view_as_real", "view_as_complex", "getitem"})


def _may_alias(node: fx.Node) -> bool:
    """Whether ``node``'s value may share memory with another node's, or outlive the call.

    A view (of another node's value), the network input, or a tensor of the module.
    """
    if node.op in ("placeholder", "get_attr"):
        return True
    name = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", "")
    return node.op in ("call_method", "call_function") and name in _VIEWS


def _follow_in_place_changes(graph: fx.Graph) -> bool:
    """Point the nodes that read a value after an in-place change of it at the change; refuse where unsafe.

    laftr runs every op out of place (``h.add_(1)`` as ``h + 1``): a node that reads ``h`` after the in-place
    op would see the value before it, where PyTorch sees the changed one -- a silently different network (a
    review: 0.2-0.5 off). Such a read is pointed at the in-place op's result, which is the changed value
    (Hugging Face's causal mask: ``full = torch.full(...); full.masked_fill_(cond, 0); full.to(dtype)``),
    where the changed value is no view of another (nor a view taken of it before the change) and not the
    input or a tensor of the module: there the change would be seen elsewhere too, and it is refused.
    ``h = h.add_(1)``, ``h += 1`` and ``nn.ReLU(inplace=True)`` whose input nothing else reads need nothing.
    Returns whether the graph was changed.
    """
    order = {n: i for i, n in enumerate(graph.nodes)}
    gm = graph.owning_module
    rewired = False
    for node in list(graph.nodes):
        changed = _mutated(node, gm)
        if changed is None:
            continue
        later = [u for u in changed.users if u is not node and order[u] > order[node]]
        # a view changed in place changes its base (g[:, 0].mul_(2) changes g): a base read after the change
        base = changed
        while (base.op in ("call_method", "call_function") and _may_alias(base) and base.args
               and isinstance(base.args[0], fx.Node)):
            base = base.args[0]
            later += [u for u in base.users if order[u] > order[node]]
        if not later:
            continue
        views_before = [u for u in changed.users
                        if u is not node and order[u] < order[node] and _may_alias(u)]
        if _may_alias(changed) or views_before:
            raise UnsupportedOpError(
                f"node {node.name!r} changes {changed.name!r} in place, and {later[0].name!r} reads it after "
                "that: laftr runs every op out of place, so it would read the value before the change; write "
                "the op out of place (h = h + 1), or without inplace=True")
        for u in later:
            u.replace_input_with(changed, node)
        rewired = True
    return rewired


def refuse_torchscript(model: nn.Module, who: str = "") -> None:
    """Refuse a TorchScript module, which torch.fx cannot trace nor torch.func run with other parameters.

    Also a ``forward`` set on the instance (``model.forward = f``): torch.fx traces the class's forward, so
    the graph would be another function than the model's.
    """
    if isinstance(model, torch.jit.ScriptModule):
        raise UnsupportedOpError(
            f"{who}{type(model).__name__} is a TorchScript module (torch.jit.script / torch.jit.trace), "
            "which laftr cannot trace or run with other parameters: pass the original nn.Module")
    if "forward" in model.__dict__:
        raise UnsupportedOpError(
            f"{who}{type(model).__name__} has a forward set on the instance (model.forward = ...), which "
            "torch.fx does not trace (it traces the class's forward): define the forward in a subclass, or "
            "wrap the module in one whose forward calls what you need")


def _refuse_weight_hooks(model: nn.Module) -> None:
    """Refuse a module that computes its weight in a forward pre-hook (the old weight_norm / spectral_norm).

    The traced network reads its parameters from each stream and would find no ``weight`` (a KeyError);
    ``torch.nn.utils.prune``'s masks, computed the same way, are supported (:func:`pruned_tensors`).
    """
    from torch.nn.utils.spectral_norm import SpectralNorm
    from torch.nn.utils.weight_norm import WeightNorm

    for name, m in model.named_modules():
        for hook in m._forward_pre_hooks.values():
            if isinstance(hook, (WeightNorm, SpectralNorm)):
                api = "weight_norm" if isinstance(hook, WeightNorm) else "spectral_norm"
                raise UnsupportedOpError(
                    f"module {name or type(m).__name__!r} computes its {hook.name!r} in a forward pre-hook "
                    f"(torch.nn.utils.{api}, the old API), which laftr does not run with each set of "
                    f"parameters; use torch.nn.utils.parametrizations.{api}, which it supports (subset, ntk, "
                    "weight and exact_fsd run the module itself, hook included)")


def trace(model: nn.Module, buffers_as_nodes: bool = True) -> fx.GraphModule:
    """Symbolically trace ``model`` in eval mode; raise :class:`UnsupportedOpError` if it cannot be.

    laftr always evaluates a network as in eval mode (dropout off, batch norm on its running statistics), so
    the graph is traced with every submodule in eval mode, whatever mode the model is in (a model in a
    training loop gives the same graph as at ``fit``); each submodule's own mode is put back afterwards.

    Buffers are read as graph nodes (``buffers_as_nodes``), so that what the forward computes from one
    (``self.s * 1.0``, ``self.mask[:T, :T]``) is computed from each stream's buffer: torch.fx's default
    computes it while tracing and keeps the result, theta0's, as a constant (laftr gave 0 for a theta that
    changed the buffer alone). A forward that reads a buffer in Python (``if self.initialized:``,
    ``range(self.shifts.shape[0])``) cannot be traced so: it is traced with buffers read as constants then,
    as it always was (and with ``buffers_as_nodes=False`` the other way round).
    """
    refuse_torchscript(model)
    with eval_mode(model):
        try:
            try:
                fixed = _specialized_defaults(model)
                first_tracer = _Tracer()
                first_tracer.proxy_buffer_attributes = buffers_as_nodes
                if isinstance(model, fx.GraphModule) and not is_registered_module(model):
                    graph = _trace_graph_module(first_tracer, model)
                else:
                    graph = first_tracer.trace(model, concrete_args=fixed)
            except UnsupportedOpError:
                raise
            except Exception as first:
                # the other way of reading buffers (see above); if that fails too, the failure that names the
                # obstacle is reported
                tracer = _Tracer()
                tracer.proxy_buffer_attributes = not buffers_as_nodes
                try:
                    graph = tracer.trace(model, concrete_args=fixed)
                except Exception as second:
                    # where the failure of buffers read as constants was a buffer sliced by a traced size
                    # (nanoGPT's bias[:, :, :T, :T]), the other's names the line that is really in the way
                    # (torch.ones(L, L), torch.finfo(x.dtype), *x.shape[:-1])
                    as_constants = second if buffers_as_nodes else first
                    as_nodes = first if buffers_as_nodes else second
                    raise (as_nodes if "slice indices" in str(as_constants) else as_constants) from None
            if fixed:
                _drop_specialization_asserts(graph)
            gm = fx.GraphModule(model, graph, type(model).__name__)
            if _fold_softmax_by_hand(gm.graph):
                gm.recompile()
            return gm
        except UnsupportedOpError:
            raise
        except Exception as e:
            raise UnsupportedOpError(
                f"could not trace {type(model).__name__} with torch.fx ({type(e).__name__}: {e}); "
                + _trace_hint(e)
            ) from e


def _specialized_defaults(model: nn.Module) -> dict[str, Any] | None:
    """The forward's arguments after the first whose default is None, a bool or a string, by name.

    laftr calls a network with its one input, so every other argument takes its default; traced as a
    symbol, ``if mask is not None:`` took the branch the default does not (the symbol is not None) and the
    graph then failed on ``h * None``, and ``if flag:`` or ``if mode == "x":`` was refused as control flow
    on data. They are traced as the constants they are. (Numbers keep being read as before.)
    """
    try:
        sig = inspect.signature(model.forward)
    except (TypeError, ValueError):
        return None
    named = [p for p in sig.parameters.values()
             if p.kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD,
                           inspect.Parameter.KEYWORD_ONLY)]
    fixed = {p.name: p.default for p in named[1:]
             if p.default is None or isinstance(p.default, (bool, str))}
    return fixed or None


def _drop_specialization_asserts(graph: fx.Graph) -> None:
    """Remove the checks torch.fx adds for arguments traced as constants (they are never passed).

    Those are ``_assert_is_none(arg, ...)`` and ``torch._assert(arg == value, ...)`` of a placeholder after
    the input; a check of the user's own stays.
    """
    extra = [n for n in graph.nodes if n.op == "placeholder"][1:]
    for node in list(graph.nodes):
        if node.op != "call_function" or not node.args:
            continue
        first = node.args[0]
        if node.target is fx._symbolic_trace._assert_is_none and first in extra:
            graph.erase_node(node)
        elif (node.target is torch._assert and isinstance(first, fx.Node) and first.target is operator.eq
              and first.args and first.args[0] in extra):
            graph.erase_node(node)
            if not first.users:
                graph.erase_node(first)


def _trace_hint(e: Exception) -> str:
    """What to change in a forward that torch.fx could not trace, from the error it raised."""
    text = str(e)
    if "cannot be iterated" in text:
        return ("a value read from the input (a tensor, or its shape) cannot be iterated while tracing: "
                "a loop over a tensor's entries is data-dependent control flow, and a shape unpacked with * "
                "can be written without it: h.view(h.shape[:-1] + (2, -1)) instead of "
                "h.view(*h.shape[:-1], 2, -1), or name the sizes (B, T, C = h.shape)")
    if isinstance(e, TypeError) and "positional argument" in text:
        return ("a function given sizes read from the input as separate arguments (torch.ones(L, L)) "
                "cannot be traced: pass them as one tuple, torch.ones((L, L)), or slice a constant buffer to "
                "size")
    if "finfo" in text or "iinfo" in text:
        return ("torch.finfo of a traced tensor's dtype (torch.finfo(x.dtype).min, as in Hugging Face's "
                "extended attention masks) cannot be traced: use a constant such as -1e9, or "
                "torch.finfo(torch.float32).min")
    if "__cuda_array_interface__" in text or "pack_padded_sequence" in text:
        return ("packed sequences (torch.nn.utils.rnn.pack_padded_sequence) cannot be traced: run the "
                "recurrent layer on the padded batch and read each sequence's last valid step with a gather "
                "(or its first, for a right-to-left direction)")
    if "cannot be interpreted as an integer" in text:
        return ("a size read from the input cannot be a Python loop's bound (for t in range(x.shape[1])): "
                "loop over a constant length, or use nn.RNN / nn.GRU / nn.LSTM over the sequence")
    return ("laftr needs a network whose forward torch.fx can trace: no control flow that depends on the "
            "data (an if or a loop over values of a tensor)")


def _get_attr(gm: fx.GraphModule, target: str) -> Any:
    obj: Any = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


# ---------------------------------------------------------------------------------------------- modes
class Mode:
    """What the interpreter is doing; rules read what they need from it.

    Attributes:
        method: the rule method called for data-dependent nodes.
        params: one parameter (and buffer) dict per stream, theta0's first.
    """

    method: ClassVar[str] = "forward"
    taps: Any = None
    laws: dict[str, Any] = {}  # noqa: RUF012 (read-only default; the modes that use laws set their own)
    #: ``exact(rule)``: whether the mode runs this data-dependent op exactly in each stream instead of by its
    #: ``method`` (``laftr``'s ``linearize="activations"``: only activation functions are linearized)
    exact: Callable[[Rule], bool] | None = None

    def __init__(self, params: Sequence[dict[str, torch.Tensor]]) -> None:
        """A mode over the streams of ``params`` (one parameter and buffer dict each, theta0's first)."""
        self.params = list(params)

    def law(self, rule: Rule) -> Any:
        """The stored law of a site (sampling and closed-form modes)."""
        law = self.laws.get(rule.name)
        if law is None:
            raise ValueError(f"the summary has no statistic for {rule.describe()}")
        return law

    @property
    def num_streams(self) -> int:
        """The number of streams (parameter dicts)."""
        return len(self.params)

    def input(self, inputs: tuple[Any, ...]) -> Pair:
        """The value of the network's input node."""
        return Pair(tuple(inputs), True)

    def concrete(self, v: Any, s: int) -> Any:
        """``v`` in stream ``s`` with every data value as a tensor (for shape queries)."""
        return stream_of(v, s)

    def begin_run(self) -> None:
        """Called when the interpreter starts a pass over the graph."""

    def draw(self, rule: Rule, law: Any, like: torch.Tensor) -> Any:
        """A site's draw (sampling modes only)."""
        raise RuntimeError(f"{rule.describe()} draws a linearization outside a sampling pass")

    def separable(self, net: TracedNet) -> bool:
        """Whether a pass of ``net`` over theta's stream alone gives that stream's values in a pass over both.

        False unless the mode says otherwise (:class:`SampleMode` on networks whose ops allow it).
        """
        return False

    def before(self, rule: Rule, args: Any, kwargs: Any) -> tuple[Any, Any]:
        """Called before a data-dependent node's rule with its arguments; returns the arguments to use.

        LIFTR's step-wise mode re-anchors some here, the fit mode records their moments.
        """
        return args, kwargs

    def inner(self, rule: Rule, key: str, value: Pair) -> Pair:
        """A rule hands over an intermediate data value that feeds one of its internal layers (``key``).

        For example the merged heads before nn.MultiheadAttention's output projection; LIFTR's modes anchor it
        like an op's input.
        """
        return value

    def after_node(self, env: dict[str, Any]) -> None:
        """Called after every node with the values still alive."""

    def output(self, out: Pair) -> Any:
        """What a pass returns from the output node: the tuple of every stream's value."""
        return out.vals


class ForwardMode(Mode):
    """Every stream runs the real network exactly.

    ``taps`` (optional) records the inputs and outputs of the layers it names (see
    :mod:`laftr.estimators.taps`).
    """

    method = "forward"

    def __init__(self, params: Sequence[dict[str, torch.Tensor]], taps: Any = None) -> None:
        """Exact forward passes of ``params``; ``taps``, if given, records the layers it names."""
        super().__init__(params)
        self.taps = taps

    def separable(self, net: TracedNet) -> bool:
        """True: each stream runs its own real network, whatever the ops (``laftr`` with ``gates="none"``)."""
        return True


class _RecordingForward(ForwardMode):
    """theta0's real network, keeping the value of every data-dependent node (to find its batch layout)."""

    def __init__(self, params: Sequence[dict[str, torch.Tensor]]) -> None:
        super().__init__(params)
        self.values: dict[str, torch.Tensor] = {}

    def after_node(self, env: dict[str, Any]) -> None:
        for name, v in env.items():
            if (name not in self.values and isinstance(v, Pair) and v.data
                    and isinstance(v.vals[0], torch.Tensor)):
                self.values[name] = v.vals[0]


#: A value's batch layout ``(axis, outer, inner)``: along ``axis`` its entries are ``(o, e, i)`` flattened,
#: ``e`` the example, ``o < outer``, ``i < inner``. ``LEADING``: one example per entry of the first axis.
Layout = tuple[int, int, int]
LEADING: Layout = (0, 1, 1)


def batch_layout(a: torch.Tensor, b: torch.Tensor, n: int, k: int) -> Layout | None:
    """Where the examples sit in ``a`` (a value for ``n`` examples), from ``b`` (the first ``k`` of them).

    None when no single axis holds them (or their values do not tell).
    """
    if a.ndim != b.ndim:
        return None
    varying = [d for d in range(a.ndim) if a.shape[d] != b.shape[d]]
    if len(varying) != 1:
        return None
    d = varying[0]
    whole, part = a.shape[d], b.shape[d]
    if whole % n or part % k or whole // n != part // k:
        return None
    m = whole // n
    for outer in (j for j in range(1, m + 1) if m % j == 0):
        inner = m // outer
        if _close(a.unflatten(d, (outer, n, inner)).narrow(d + 1, 0, k), b.unflatten(d, (outer, k, inner))):
            return (d, outer, inner)
    return None


def to_batch_first(v: torch.Tensor, layout: Layout) -> torch.Tensor:
    """``v`` with its examples along a new first axis.

    The other axes keep their order (and number, unless the examples had an axis of their own, which moves to
    the front).
    """
    d, outer, inner = layout
    if outer * inner == 1:
        return v.movedim(d, 0)
    return v.unflatten(d, (outer, -1, inner)).movedim(d + 1, 0).flatten(d + 1, d + 2)


def from_batch_first(u: torch.Tensor, layout: Layout) -> torch.Tensor:
    """The inverse of :func:`to_batch_first`."""
    d, outer, inner = layout
    if outer * inner == 1:
        return u.movedim(0, d)
    return u.unflatten(d + 1, (outer, inner)).movedim(0, d + 1).flatten(d, d + 2)


def row_examples(batch: int, layout: Layout) -> torch.Tensor:
    """The example of every entry along the batch axis of a value laid out as ``layout``.

    For merged rows (``outer * inner > 1``) there are ``outer * batch * inner`` entries; entry ``r`` belongs
    to example ``(r // inner) % batch``.
    """
    _, outer, inner = layout
    return (torch.arange(outer * batch * inner) // inner) % batch


class FitMode(Mode):
    """theta0 alone on real data; sites add float64 sums per group with :meth:`add`.

    Attributes:
        group: ``(B,)`` long tensor: the group (class, mixture component, or 0) of each example in the batch.
        num_groups: the number of groups so far.
        record_pools: whether max pools record how often each window position is theta0's argmax (needed
            only by ``maxpool="sample"``).
        record_inputs: called before every data-dependent node with its arguments (records more statistics).
        sums: ``{site: {key: (G, ...) float64 sums}}``.
    """

    method = "fit"

    def __init__(self, params: Sequence[dict[str, torch.Tensor]], record_pools: bool = True,
                 record_inputs: Callable[[FitMode, Rule, Any, Any], None] | None = None) -> None:
        """theta0's pass on real data; ``record_pools`` and ``record_inputs`` say what else to record."""
        super().__init__(params)
        self.record_inputs = record_inputs
        self.group: torch.Tensor | None = None
        self.num_groups = 1
        self.record_pools = record_pools
        self.sums: dict[str, dict[str, torch.Tensor]] = {}
        self.unit_shapes: dict[str, tuple[int, ...]] = {}
        self.row_weight = 1.0  # < 1 within per_row

    def begin_run(self) -> None:
        """Start a pass, telling ``record_inputs`` if it wants to know."""
        begin = getattr(self.record_inputs, "begin_run", None)
        if begin is not None:
            begin()

    def before(self, rule: Rule, args: Any, kwargs: Any) -> tuple[Any, Any]:
        """Hand a data-dependent node's arguments to ``record_inputs`` (if any); they are used as they are."""
        if self.record_inputs is not None:  # e.g. LIFTR's per-layer input moments
            self.record_inputs(self, rule, args, kwargs)
        return args, kwargs

    def inner(self, rule: Rule, key: str, value: Pair) -> Pair:
        """Hand a rule's internal layer input to ``record_inputs`` (if it records them); used as it is."""
        record = getattr(self.record_inputs, "inner", None)
        if record is not None:
            record(self, rule, key, value)
        return value

    @contextlib.contextmanager
    def per_row(self, layout: Layout) -> Iterator[None]:
        """Within: each row of a value with merged examples counts as an example of its example's group.

        (``layout``: rows of examples merged with other entries, the frames of a clip, the windows of an
        image.)
        """
        assert self.group is not None
        group, weight = self.group, self.row_weight
        self.group = group.index_select(0, row_examples(group.shape[0], layout).to(group.device))
        # each example brings outer * inner rows: weighted so that the sums over rows, divided by the number
        # of examples as every law does, are means over the rows
        self.row_weight = weight / (layout[1] * layout[2])
        try:
            yield
        finally:
            self.group, self.row_weight = group, weight

    def add(self, site: str, key: str, values: torch.Tensor) -> None:
        """Add ``values`` (``(B, ...)``, one row per example) to the sums of ``site``/``key`` by group."""
        self._check_rows(site, values)
        assert self.group is not None
        vals = values.to(torch.float64)
        acc = torch.zeros((self.num_groups, *vals.shape[1:]), dtype=torch.float64, device=vals.device)
        acc.index_add_(0, self.group, vals)
        self._accumulate(site, key, acc if self.row_weight == 1.0 else acc * self.row_weight)

    def add_outer(self, site: str, key: str, x: torch.Tensor) -> None:
        """Add the outer products over the last axis, ``x[b, ..., :, None] * x[b, ..., None, :]``, by group.

        No ``d x d`` matrix is formed per example.
        """
        self._check_rows(site, x)
        assert self.group is not None
        xf = x.to(torch.float64).reshape(x.shape[0], -1, x.shape[-1])
        onehot = torch.nn.functional.one_hot(self.group, self.num_groups).to(xf)
        acc = torch.einsum("bg,bpi,bpj->gpij", onehot, xf, xf).reshape(self.num_groups, *x.shape[1:],
                                                                       x.shape[-1])
        self._accumulate(site, key, acc if self.row_weight == 1.0 else acc * self.row_weight)

    def _check_rows(self, site: str, values: torch.Tensor) -> None:
        """Refuse a value that does not hold one row per example of the batch (a layout laftr missed)."""
        assert self.group is not None
        if values.ndim == 0 or values.shape[0] != self.group.shape[0]:
            raise UnsupportedOpError(
                f"site {site!r} sees a value of shape {tuple(values.shape)} for a batch of "
                f"{self.group.shape[0]} examples: laftr's stored statistics need the examples along one "
                "axis of it; keep the batch axis first up to this op")

    def _accumulate(self, site: str, key: str, acc: torch.Tensor) -> None:
        """Add per-group sums ``acc`` (``(G, ...)``) to the stored sums."""
        store = self.sums.setdefault(site, {})
        old = store.get(key)
        if old is None:
            store[key] = acc
            return
        if old.shape[1:] != acc.shape[1:]:
            raise ValueError(f"site {site!r}: unit shape changed between batches ({tuple(old.shape[1:])} vs "
                             f"{tuple(acc.shape[1:])}); inputs must all have the same shape")
        if old.shape[0] < acc.shape[0]:
            old = torch.cat([old, old.new_zeros((acc.shape[0] - old.shape[0], *old.shape[1:]))])
        old[: acc.shape[0]] += acc
        store[key] = old


class _Replaying:
    """The generator of a pass whose draws are all replayed: using it is an error."""

    def __getattr__(self, name: str) -> Any:
        raise RuntimeError("an op drew from the generator while a sample pool's draws were replayed; a rule "
                           "must draw through mode.draw for its draws to be recorded and replayed")


class SampleMode(Mode):
    """LAFTR's Monte Carlo: linearizations drawn from the stored laws.

    Attributes:
        laws: per site, the law object its rule built (:meth:`laftr.rules.Rule.law`), on the right device.
        groups: ``(n,)`` group of each sampled input (its class or mixture component; zeros otherwise).
        generator: the source of randomness (None when every draw is replayed).
        shared: one draw per call shared by the batch (the original code) instead of one per sample.
        pool_mode: ``argmax0``, ``separate`` or ``sample`` (max pooling).
        recorded: when a dict, every draw of the pass is kept in it under its site's name.
        replay: when given, the draws come from it (site name -> what :meth:`draw` returned for a batch of
            samples, leading axis the sample) at the rows ``index`` instead of from the laws.
    """

    method = "sample"

    def __init__(self, params: Sequence[dict[str, torch.Tensor]], laws: dict[str, Any], groups: torch.Tensor,
                 generator: torch.Generator | None, shared: bool = False, pool_mode: str = "argmax0",
                 recorded: dict[str, Any] | None = None, replay: dict[str, Any] | None = None,
                 index: torch.Tensor | None = None) -> None:
        """Monte Carlo passes with the given laws, groups and generator (see the attributes)."""
        super().__init__(params)
        self.laws = laws
        self.groups = groups
        self.generator = generator if replay is None or generator is not None else _Replaying()
        self.shared = shared
        self.pool_mode = pool_mode
        self.recorded = recorded
        self.replay = replay
        self.index = index

    @contextlib.contextmanager
    def per_row(self, layout: Layout) -> Iterator[None]:
        """Within: one draw per row of a value with merged examples, from its example's group.

        (See :meth:`FitMode.per_row`.)
        """
        groups = self.groups
        self.groups = groups.index_select(0, row_examples(groups.shape[0], layout).to(groups.device))
        self._row_layout = layout
        try:
            yield
        finally:
            self.groups, self._row_layout = groups, None

    _row_layout: Layout | None = None  # within per_row

    def _replay_index(self, got: Any) -> torch.Tensor | None:
        """The rows of the recorded draws ``got`` that this pass replays (those of its samples' rows)."""
        if self.index is None or self._row_layout is None:
            return self.index
        _, outer, inner = self._row_layout
        first = got if isinstance(got, torch.Tensor) else tree_flatten(got)[0][0]
        pool = first.shape[0] // (outer * inner)  # the recorded samples
        o = torch.arange(outer, device=self.index.device)[:, None, None]
        i = torch.arange(inner, device=self.index.device)[None, None, :]
        return ((o * pool + self.index[None, :, None]) * inner + i).reshape(-1)

    def draw(self, rule: Rule, law: Any, like: torch.Tensor) -> Any:
        """The linearization of ``rule``'s site for this pass's samples (a batch like ``like``).

        ``law.draw(groups, generator, shared, like)``, or the replayed draw; rules draw through here so that a
        pass can be recorded and replayed (``laftr``'s ``sample_pool``).
        """
        if self.replay is not None:
            if rule.name not in self.replay:
                raise RuntimeError(f"{rule.describe()} has no recorded draw to replay")
            got = self.replay[rule.name]
            index = self._replay_index(got)
            return got if index is None else tree_map(lambda t: t.index_select(0, index), got)
        out = law.draw(self.groups, self.generator, self.shared, like)
        if self.recorded is not None:
            if rule.name in self.recorded:
                raise RuntimeError(f"{rule.describe()} drew twice in one pass: its draws cannot be replayed")
            self.recorded[rule.name] = out
        return out

    def separable(self, net: TracedNet) -> bool:
        """With the same draws, when every op's Monte Carlo pass treats the streams separately."""
        return net.sample_separable(self)


class _Reanchoring:
    """Shared by LIFTR's modes: re-anchoring the data inputs of anchored ops.

    At an anchored op, each data input is re-anchored once per pass (:meth:`reanchor`, by the mode) and every
    later op reading the same value sees the same re-anchored value.
    """

    anchors: Callable[[Rule, Any, Any], list[Any] | None]
    # id(original) -> (original, re-anchored); the original is kept alive
    _drawn: dict[int, tuple[Pair, Pair]]

    def begin_run(self) -> None:
        self._drawn = {}

    def separable(self, net: TracedNet) -> bool:
        """False: theta's stream is re-anchored at theta0's values."""
        return False

    def reanchor(self, rule: Rule, value: Pair, law: Any, axis: int = 0) -> Pair:
        """``value`` re-anchored at a draw from ``law``; ``axis``: where its examples are (``law``: first)."""
        raise NotImplementedError

    def before(self, rule: Rule, args: Any, kwargs: Any) -> tuple[Any, Any]:
        laws = self.anchors(rule, args, kwargs)
        if laws is None:
            return args, kwargs
        for p, law in zip(anchorable_pairs((args, kwargs)), laws, strict=True):
            if id(p) not in self._drawn:
                self._drawn[id(p)] = (p, self.reanchor(rule, p, law, rule.native_batch_axis()))
        return tree_map(lambda v: self._drawn[id(v)][1] if isinstance(v, Pair) and id(v) in self._drawn
                        else v, (args, kwargs))


class StepMode(_Reanchoring, SampleMode):
    """LIFTR's step-wise linearization: LAFTR's sampled linearizations, re-anchored at anchored ops.

    At the input of every *anchored* op (one whose parameters multiply data) theta0's stream is re-drawn from
    that input's stored law while the change ``x - x0`` carried by the other stream is kept: ``(x0, x) -> (a,
    a + x - x0)``. Each value is re-drawn once per pass (the ops that read the same tensor, e.g. the q, k and
    v projections, see the same draw), independently of the change (METHOD.md section 6).

    Attributes:
        anchors: ``anchors(rule, args, kwargs)`` gives, for an anchored op, one entry per data input (in
            :func:`laftr.rules.base.anchorable_pairs` order): its law (with ``draw(groups, generator,
            like)``); None for other ops.
        inner_anchors: ``inner_anchors(rule, key)``: the law of a rule's internal layer input (see
            :meth:`inner`), or None.
    """

    def __init__(self, params: Sequence[dict[str, torch.Tensor]], laws: dict[str, Any], groups: torch.Tensor,
                 generator: torch.Generator, anchors: Callable[[Rule, Any, Any], list[Any] | None],
                 inner_anchors: Callable[[Rule, str], Any], shared: bool = False,
                 pool_mode: str = "argmax0") -> None:
        """As :class:`SampleMode`, plus the anchors' laws (see the attributes)."""
        super().__init__(params, laws, groups, generator, shared, pool_mode)
        self.anchors = anchors
        self.inner_anchors = inner_anchors
        self._drawn = {}

    def reanchor(self, rule: Rule, value: Pair, law: Any, axis: int = 0) -> Pair:
        """``(x0, x) -> (a, a + x - x0)`` with ``a`` drawn from the input's stored law (examples first)."""
        x0, *rest = value.vals
        a = law.draw(self.groups, self.generator, x0.movedim(axis, 0)).movedim(0, axis)
        return Pair((a, *(a + (v - x0) for v in rest)), True)

    def inner(self, rule: Rule, key: str, value: Pair) -> Pair:
        """Re-anchor a rule's internal layer input when it has a stored law, else keep it."""
        law = self.inner_anchors(rule, key)
        return value if law is None else self.reanchor(rule, value, law)


class OwnMode(Mode):
    """theta0's own linearization on each input.

    Every nonlinearity is replaced by its tangent at theta0's value (its slope and intercept there); max pools
    take theta0's argmax (or each stream its own).
    """

    method = "own"

    def __init__(self, params: Sequence[dict[str, torch.Tensor]], pool_mode: str = "argmax0") -> None:
        """theta0's own linearization of ``params``' streams; ``pool_mode`` decides max pooling."""
        super().__init__(params)
        self.pool_mode = pool_mode


class MomentMode(Mode):
    """The closed form: data values are :class:`laftr.moments.Ref` s into a :class:`JointMoments` state.

    Attributes:
        state: the joint second moment.
        laws: per site, the law object (the closed form uses group ``group``'s moments).
        group: the mixture component being propagated.
        mu_outer: the original code's biased variant (same-unit second moments of gates replaced by products
            of their means).
    """

    method = "moments"
    #: the network input is token ids, held as one-hot vectors (only an embedding may read them)
    tokens = False

    def __init__(self, params: Sequence[dict[str, torch.Tensor]], state: JointMoments, laws: dict[str, Any],
                 group: int = 0, mu_outer: bool = False) -> None:
        """The closed form on ``state`` with the sites' ``laws`` for mixture component ``group``."""
        super().__init__(params)
        self.state = state
        self.laws = laws
        self.group = group
        self.mu_outer = mu_outer

    def input(self, inputs: tuple[Any, ...]) -> Pair:
        """Both streams' input is the state's input block."""
        return Pair((self.state.input, self.state.input), True)

    def concrete(self, v: Any, s: int) -> Any:
        """``v`` in stream ``s``, a block reference replaced by a zero tensor of one example's shape."""
        def one(a: Any) -> Any:
            if isinstance(a, Pair):
                val = a.vals[s]
                return self.state.like.new_zeros((1, *val.shape)) if isinstance(val, Ref) else val
            return a

        return tree_map(one, v)

    def after_node(self, env: dict[str, Any]) -> None:
        """Drop the blocks of the state that no live value refers to."""
        self.state.keep_only(_blocks(self.live_pairs(env)))

    def live_pairs(self, env: dict[str, Any]) -> list[Pair]:
        """The data values still alive (their blocks are kept)."""
        leaves, _ = tree_flatten(list(env.values()))
        return [leaf for leaf in leaves if isinstance(leaf, Pair) and leaf.data]

    def output(self, out: Pair) -> Any:
        """The output's per-stream references into the moment state."""
        return out.vals

    # ------------------------------------------------------------------ helpers for rules
    def affine(self, rule: Rule, args: Any, kwargs: Any) -> Pair:
        """The generic closed form of an op affine in its data inputs: the op itself on M's columns."""
        data = data_pairs((args, kwargs))
        stream_specific = any(not p.data for p in pairs_in((args, kwargs))) or (
            rule.module is not None and (any(True for _ in rule.module.parameters())
                                         or any(True for _ in rule.module.buffers())))
        shared = not stream_specific and all(p.vals[0].block == p.vals[1].block for p in data)
        streams = [0] if shared else [0, 1]
        if len(data) == 1 and len(data[0].vals[0].shape) == 1:  # x -> W x + b when the rule says so
            mats = [rule.matrix(self.params[s], stream_of(args, s), stream_of(kwargs, s)) for s in streams]
            if all(m is not None for m in mats):
                given = [m for m in mats if m is not None]
                refs = self.state.linear(given, [data[0].vals[s] for s in streams])
                return Pair((refs[0], refs[-1]), True)

        def make_fn(s: int) -> Callable[..., torch.Tensor]:
            def fn(*tensors: torch.Tensor) -> torch.Tensor:
                lookup = {id(p): t for p, t in zip(data, tensors, strict=True)}
                a, k = tree_map(lambda v: lookup[id(v)] if isinstance(v, Pair) and v.data else v,
                                (args, kwargs))
                return rule.call(self.params[s], stream_of(a, s), stream_of(k, s))

            return fn

        return self.affine_fns([make_fn(s) for s in streams], [[p.vals[s] for p in data] for s in streams],
                               rule.name)

    def reshape(self, rule: Rule, args: Any, kwargs: Any) -> Pair:
        """An op that only reshapes its one data input, keeping the order of its entries: the same blocks.

        The op runs on one example of zeros for the new shape. An op that is not a per-example reshape there
        (it moves the batch axis, or changes the number of entries) takes the generic path of :meth:`affine`.
        """
        data = data_pairs((args, kwargs))
        if len(data) == 1 and not any(not p.data for p in pairs_in((args, kwargs))):
            a, k = self.concrete((args, kwargs), 0)
            out = rule.call(self.params[0], a, k)
            refs = data[0].vals
            if (isinstance(out, torch.Tensor) and out.ndim >= 1 and out.shape[0] == 1
                    and out.numel() == math.prod(refs[0].shape)):
                shape = tuple(out.shape[1:])
                return Pair((Ref(refs[0].block, shape), Ref(refs[1].block, shape)), True)
        return self.affine(rule, args, kwargs)

    def affine_fns(self, fns: Sequence[Callable[..., torch.Tensor]], inputs: Sequence[Sequence[Ref]],
                   name: str) -> Pair:
        """New blocks from per-stream functions (one entry: shared by both streams)."""
        refs = self.state.affine(fns, inputs, name)
        return Pair((refs[0], refs[-1]), True)

    def gate(self, pre: Pair, gm: GateMoments) -> Pair:
        """A random per-unit affine map of ``pre`` (see :meth:`laftr.moments.JointMoments.gate`)."""
        if self.mu_outer:
            gm = _mu_outer(gm)
        return Pair(self.state.gate(pre.vals, gm), True)


class StepMomentMode(_Reanchoring, MomentMode):
    """LIFTR's step-wise linearization in closed form.

    At every anchored op a block independent of the state, with the stored first and second moments of that
    op's input, replaces theta0's stream, and the other stream becomes that block plus the change (see
    :class:`StepMode`).

    Attributes:
        anchors: as for :class:`StepMode`, but each law gives ``moments(group)`` ->
            ``(mean (n,), second (n, n))``.
    """

    def __init__(self, params: Sequence[dict[str, torch.Tensor]], state: JointMoments, laws: dict[str, Any],
                 anchors: Callable[[Rule, Any, Any], list[Any] | None], group: int = 0,
                 mu_outer: bool = False) -> None:
        """As :class:`MomentMode`, plus the anchors' moment laws (see the attributes)."""
        super().__init__(params, state, laws, group, mu_outer)
        self.anchors = anchors
        self._drawn = {}

    def reanchor(self, rule: Rule, value: Pair, law: Any, axis: int = 0) -> Pair:
        """Replace theta0's stream by an independent block with the input's stored moments.

        The other stream becomes that block plus the change it carried.
        """
        r0, r1 = value.vals
        mean, second = law.moments(self.group)
        like = self.state.like
        a = self.state.independent(mean.reshape(-1).to(like), second.to(like), r0.shape)
        if r0.block == r1.block:  # no change yet: both streams are the draw
            return Pair((a, a), True)
        (moved,) = self.state.affine([lambda a_, x0, x: a_ + (x - x0)], [[a, r0, r1]], rule.name)
        return Pair((a, moved), True)

    def live_pairs(self, env: dict[str, Any]) -> list[Pair]:
        """The values in ``env`` and, while their original is alive, their re-anchored versions.

        A later op may read the same value.
        """
        live = super().live_pairs(env)
        ids = {id(p) for p in live}
        self._drawn = {k: v for k, v in self._drawn.items() if k in ids}
        return live + [new for _, new in self._drawn.values()]


def _blocks(pairs: Sequence[Pair]) -> set[int]:
    return {r.block for p in pairs for r in p.vals if isinstance(r, Ref)}


def _mu_outer(gm: GateMoments) -> GateMoments:
    """Second moments replaced by products of first moments (drops every variance term: biased)."""

    def prod(first: Sequence[torch.Tensor], other: Sequence[torch.Tensor],
             keys: Any) -> dict[tuple[int, int], torch.Tensor]:
        return {k: first[min(k[0], len(first) - 1)] * other[min(k[1], len(other) - 1)] for k in keys}

    keys = list(gm.c2)
    return GateMoments(
        c1=gm.c1, c2=prod(gm.c1, gm.c1, keys), r1=gm.r1,
        cr=None if gm.r1 is None else prod(gm.c1, gm.r1, keys),
        r2=None if gm.r1 is None else prod(gm.r1, gm.r1, keys), unit_groups=gm.unit_groups,
    )


def _data_rule(node: fx.Node, gm: fx.GraphModule, data_nodes: set[str], fixed: set[str],
               input_only: set[str]) -> Rule:
    """The rule of a data-dependent node: its registered rule, or a quotient's.

    A division whose divisor is data (not a value of the network input alone) is a
    :class:`laftr.rules.attention.QuotientRule`. Where the divisor is a function of the input alone
    (``h / (1 + x ** 2)``), which the Monte Carlo runs exactly and so the same in every stream, the quotient
    is exact in each stream and keeps no law of its divisor.
    """
    rule = make_rule(node, gm)
    if isinstance(rule, DivideRule):
        divisor = node.args[1] if len(node.args) > 1 else node.kwargs.get("other")
        if isinstance(divisor, fx.Node) and divisor.name in data_nodes and divisor.name not in fixed:
            quotient = QuotientRule(node, gm)
            if divisor.name in input_only:
                quotient.divisor_of_input_alone()
            return quotient
    return rule


# ---------------------------------------------------------------------------------------------- the network
class TracedNet:
    """A traced network: its graph, the rule of every node, and its sites (nodes that record statistics)."""

    def __init__(self, model: nn.Module, exact_unknown: bool = False) -> None:
        """Trace ``model`` (one input tensor) and make the rule of every node.

        ``exact_unknown``: for passes that run the real networks only (``laftr`` with ``gates="none"``, the
        layer taps of K-FAC and the diagonal Fisher), or whose mode runs every op but a few exactly (its
        ``exact`` predicate: ``laftr``'s ``linearize="activations"``). A data-dependent op that no rule
        covers, or whose rule refuses it (a division by data, a mask that depends on the parameters, a
        constant argument computed at run time), gets the plain :class:`Rule`: each stream runs it exactly,
        which in those passes is the answer, not an approximation; every mode that would linearize it still
        refuses it, naming it.
        """
        self.exact_unknown = exact_unknown
        #: nodes whose rule refused them in a pass of the real networks: evaluated exactly from then on
        self.exact_nodes: set[str] = set()
        #: per data-dependent node whose examples are not one per entry of its first axis, their layout (found
        #: at the first pass that records or draws statistics: :meth:`find_layouts`)
        self.layouts: dict[str, Layout] | None = None
        gm = trace(model)
        try:
            self._build(model, gm)
        except UnsupportedOpError as first:
            # an op of a buffer that a rule refuses as data (``.item()`` of a buffer as a slope, a float
            # buffer in a mask): read the buffers as constants, as they always were (theta0's there)
            buffers = {name for name, _ in model.named_buffers()}
            if not any(n.op == "get_attr" and str(n.target) in buffers for n in gm.graph.nodes):
                raise
            try:
                constants = trace(model, buffers_as_nodes=False)
                self.exact_nodes = set()
                self._build(model, constants)
            except UnsupportedOpError:
                raise first from None

    def _build(self, model: nn.Module, gm: fx.GraphModule) -> None:
        """The rules of every node of ``gm``, ``model``'s traced graph."""
        self.gm = gm
        if _follow_in_place_changes(self.gm.graph):
            self.gm.recompile()
        placeholders = [n for n in self.gm.graph.nodes if n.op == "placeholder"]
        if not placeholders:
            raise UnsupportedOpError(f"{type(model).__name__}.forward takes no input")
        for extra in placeholders[1:]:
            if not extra.args:  # no default value
                raise UnsupportedOpError(
                    f"{type(model).__name__}.forward takes more than one required input ({extra.name!r}); "
                    + SEVERAL_INPUTS_FIX
                )
        self.input_node = placeholders[0]
        self.param_names = {n for n, _ in model.named_parameters()} | {n for n, _ in model.named_buffers()}
        # a tensor registered under several names (tied weights: ``lm_head.weight = wte.weight``) is one
        # parameter, stored once under its first name; the modules read it under each of theirs
        first: dict[int, str] = {}
        for n, t in [*model.named_parameters(), *model.named_buffers()]:
            first.setdefault(id(t), n)
        self.aliases = {n: first[id(t)] for n, t in [*model.named_parameters(remove_duplicate=False),
                                                    *model.named_buffers(remove_duplicate=False)]
                        if n not in self.param_names and id(t) in first}
        self.param_names |= set(self.aliases)
        # a tensor computed by a parametrization (``weight_norm``, ``spectral_norm``) is no parameter: each
        # stream computes it from its own originals (``0.parametrizations.weight.original0``, ...), under the
        # name the module reads (``0.weight``)
        self.derived: dict[str, tuple[nn.Module, str]] = {}
        for mname, mod in model.named_modules():
            if parametrize.is_parametrized(mod):
                for tname, plist in mod.parametrizations.items():
                    prefix = f"{mname}.parametrizations.{tname}." if mname else f"parametrizations.{tname}."
                    self.derived[f"{mname}.{tname}" if mname else tname] = (plist, prefix)
        # a tensor pruned with torch.nn.utils.prune (a forward pre-hook sets ``weight = weight_orig *
        # weight_mask`` before each call): each stream multiplies its own original by the mask buffer
        _refuse_weight_hooks(model)
        self.pruned: dict[str, tuple[str, str]] = {}
        for mname, mod in model.named_modules():
            prefix = f"{mname}." if mname else ""
            for tname in pruned_tensors(mod):
                self.pruned[prefix + tname] = (f"{prefix}{tname}_orig", f"{prefix}{tname}_mask")
        self.param_names |= set(self.pruned)
        # which nodes depend on the input: those need a rule; the others are parameter arithmetic. Nodes
        # computed from the input alone (no parameter or buffer on the way) that have no rule -- comparisons,
        # masks -- are evaluated exactly on each stream's input (the same in every stream): ``exact_inputs``
        data_nodes = {self.input_node.name}
        input_only = {self.input_node.name}
        self.exact_inputs: set[str] = set()
        self._input_divisions: set[str] = set()  # (floating results of floating inputs, meaningful on draws)
        self.rules: dict[str, Rule] = {}
        #: queries of a data tensor's shape, dtype or device (``B, T, C = x.size()``): plain values, the same
        #: in every stream, so what is computed from them (``C // 2``, ``torch.arange(T)``) is not data either
        self.shape_nodes: set[str] = set()
        #: plain values computed from shapes alone (``T = x.size()[-1]``), which keep a function of the input
        #: a function of the input alone (``x.view(-1, T)``)
        self._from_shapes: set[str] = set()
        fixed: set[str] = set()  # evaluated exactly from the input alone, the same in every stream (no site)
        for node in self.gm.graph.nodes:
            if node.op not in ("call_module", "call_function", "call_method"):
                continue
            if any(a.name in data_nodes for a in node.all_input_nodes):
                query = _shape_query(node, self.gm, data_nodes)
                if query is not None:
                    self.rules[node.name] = query(node, self.gm)
                    self.shape_nodes.add(node.name)
                    continue
                data_nodes.add(node.name)
                if self._reads_input_only(node, input_only):
                    input_only.add(node.name)
                    # an op with no rule at all (a rule that refuses, refuses)
                    found = lookup(node, self.gm)
                    divisor = node.args[1] if len(node.args) > 1 else node.kwargs.get("other")
                    if (found is not None and issubclass(found, DivideRule)
                            and ((isinstance(divisor, fx.Node) and divisor.name in data_nodes)
                                 or node.kwargs.get("rounding_mode") is not None)):
                        # x / (1 + x ** 2): a division by a value of the input alone, evaluated exactly (the
                        # same in every stream), as masks are; its rule divides by constants only, and does
                        # not round (ids // 2 as torch.div(ids, 2, rounding_mode="floor") is exact here too)
                        self._input_divisions.add(node.name)
                        found = None
                    made = None
                    shaped_by = _shape_only_arg(node)  # (mask.expand_as(scores): the scores are data)
                    if (found is not None and not getattr(found, "exact_on_input", False)
                            and not (isinstance(shaped_by, fx.Node) and shaped_by.name not in input_only)):
                        try:
                            made = make_rule(node, self.gm)
                        except UnsupportedOpError:
                            # a cast to bool or an integer dtype, refused on data (not differentiable), runs
                            # exactly where it computes from the input alone, the same in every stream
                            # (Hugging Face's inv.masked_fill(inv.to(torch.bool), min))
                            if not issubclass(found, CastRule):
                                raise
                    if made is None:  # (no rule; a comparison: a mask)
                        self.rules[node.name] = Rule(node, self.gm)
                        self.exact_inputs.add(node.name)
                    else:
                        self.rules[node.name] = made
                    sources = [a.name for a in node.all_input_nodes if a.name in data_nodes]
                    if node.name in self.exact_inputs or all(a in fixed for a in sources):
                        fixed.add(node.name)
                elif self.exact_unknown:
                    try:
                        self.rules[node.name] = _data_rule(node, self.gm, data_nodes, fixed, input_only)
                    except UnsupportedOpError:  # no rule, or one that refuses the op's constant arguments
                        self.rules[node.name] = Rule(node, self.gm)
                        self.exact_nodes.add(node.name)
                else:
                    self.rules[node.name] = _data_rule(node, self.gm, data_nodes, fixed, input_only)
            else:
                self.rules[node.name] = _plain_rule(node, self.gm)
                # (constants made in the forward, torch.arange(T) or zeros_like(x) + c, are such values too)
                if (node.all_input_nodes or node.op == "call_function") and all(
                        a.name in self.shape_nodes or a.name in self._from_shapes or self._constant(a)
                        for a in node.all_input_nodes):
                    self._from_shapes.add(node.name)
        self.data_nodes = data_nodes
        self.input_only = input_only
        self._mark_learned_args(model)
        self._users = {n.name: len(n.users) for n in self.gm.graph.nodes}  # each run counts them down
        self.sites: dict[str, Rule] = {n: r for n, r in self.rules.items()
                                       if r.site and n in data_nodes and n not in fixed}

    def _mark_learned_args(self, model: nn.Module) -> None:
        """Tell each rule which of its arguments are computed from trainable parameters without the input.

        Such a value (a learned mask ``self.g > 0``, a learned attention bias) is each stream's own: the
        attention rules, which took theta0's mask for every stream, add each stream's own where it is learned
        (see :attr:`Rule.learned_args`). Buffers do not count: no change of the weights moves them (an
        attention mask of buffers stays theta0's, as it was).
        """
        buffers = {n for n, _ in model.named_buffers(remove_duplicate=False)}
        learned: set[str] = set()
        for node in self.gm.graph.nodes:
            if node.name in self.data_nodes:
                continue
            if node.op == "get_attr":
                target = str(node.target)
                if target in self.param_names and target not in buffers:
                    learned.add(node.name)
            elif node.op in ("call_module", "call_function", "call_method"):
                if any(a.name in learned for a in node.all_input_nodes) or (
                        node.op == "call_module"
                        and any(True for _ in self.gm.get_submodule(str(node.target)).parameters())):
                    learned.add(node.name)
        for rule in self.rules.values():
            found = frozenset(a.name for a in rule.node.all_input_nodes if a.name in learned)
            if found:
                rule.learned_args = found

    def _reads_input_only(self, node: fx.Node, input_only: set[str]) -> bool:
        """Whether ``node`` is a function of the network input alone.

        Its inputs are the input or such nodes (no parameter or floating buffer), and a module it calls holds
        none. A boolean or integer buffer (a fixed mask, ``self.hidden | (ids == pad)``) is no parameter: no
        change of the weights moves it smoothly, so an op of it and the input is evaluated exactly in each
        stream, with that stream's buffer, as an op of the input alone is. ``mask.expand_as(scores)`` reads
        only the shape of its second argument (and ``type_as`` its dtype): a mask of the input stays one.
        """
        shape_only = _shape_only_arg(node)
        for a in node.all_input_nodes:
            if a is shape_only:
                continue
            if a.name in input_only or a.name in self.shape_nodes or a.name in self._from_shapes:
                continue
            if self._constant(a):
                continue  # a constant tensor attribute, or a buffer of booleans or integers
            return False
        if node.op == "call_module":
            mod = self.gm.get_submodule(str(node.target))
            if any(True for _ in mod.parameters()) or any(True for _ in mod.buffers()):
                return False
        return True

    def _constant(self, node: fx.Node) -> bool:
        """Whether ``node`` reads a constant tensor attribute or a buffer of booleans or integers."""
        return node.op == "get_attr" and (str(node.target) not in self.param_names
                                          or self._discrete_buffer(node))

    def _discrete_buffer(self, node: fx.Node) -> bool:
        """Whether a ``get_attr`` node reads a buffer of booleans or integers."""
        try:
            t = self.gm.get_buffer(str(node.target))
        except AttributeError:
            return False
        return not (t.is_floating_point() or t.is_complex())

    def signature(self) -> list[list[Any]]:
        """``[[site name, family, params], ...]``: what a stored summary must match."""
        return [r.signature() for r in self.sites.values()]

    def sample_separable(self, mode: Mode) -> bool:
        """Whether every data-dependent node's Monte Carlo pass treats the streams separately.

        Then a :class:`SampleMode` pass over theta's stream alone gives, with the same draws, the values
        theta's stream has in a pass over both (see :meth:`laftr.rules.Rule.sample_separable`). Nodes
        evaluated exactly on each stream's input (masks) are separable.
        """
        return all(r.sample_separable(mode) or (mode.exact is not None and mode.exact(r))
                   for n, r in self.rules.items() if n in self.data_nodes and n not in self.exact_inputs)

    def nodes_with(self, predicate: Callable[[Rule], bool]) -> list[Rule]:
        """The rules of data-dependent nodes for which ``predicate`` holds, in graph order."""
        return [r for n, r in self.rules.items() if n in self.data_nodes and predicate(r)]

    def with_shared(self, params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``params`` with the tensors the modules read under names that are not parameters.

        Each tied parameter is also under the names of the modules that share it, and each tensor computed by
        a parametrization or a pruning mask is under the name its module reads (computed from ``params``'
        originals).
        """
        if all(a in params for a in self.aliases) and all(d in params for d in (*self.derived, *self.pruned)):
            return params
        out = {**params, **{a: params[n] for a, n in self.aliases.items() if n in params}}
        for name, (orig, mask) in self.pruned.items():
            if orig in params and mask in params:
                out[name] = params[orig] * params[mask]
        for name, (plist, prefix) in self.derived.items():
            own = {k[len(prefix):]: v for k, v in params.items() if k.startswith(prefix)}
            training = plist.training
            plist.eval()  # a spectral norm's power iteration would update the module's buffers in place
            try:
                out[name] = functional_call(plist, own, ())
            finally:
                plist.train(training)
        return out

    def run(self, inputs: tuple[Any, ...], mode: Mode) -> Any:
        """Run the graph; ``inputs`` holds the input of each stream.

        Returns the mode's output (a tuple with each stream's output, or refs into the moment state).
        """
        env: dict[str, Any] = {}
        users = dict(self._users)
        if self.aliases or self.derived or self.pruned:
            mode.params = [self.with_shared(p) for p in mode.params]
        if self.layouts is None and mode.method in _LAID_OUT and isinstance(inputs[0], torch.Tensor):
            self.layouts = self.find_layouts(inputs[0], mode.params[0])
        mode.begin_run()
        for node in self.gm.graph.nodes:
            if node.op == "placeholder":
                env[node.name] = mode.input(inputs) if node is self.input_node else node.args[0]
                continue
            if node.op == "get_attr":
                t = str(node.target)
                if t in self.param_names:
                    env[node.name] = Pair(tuple(p[t] for p in mode.params), False)
                else:
                    env[node.name] = _get_attr(self.gm, t)
                continue
            if node.op == "output":
                out = fx.node.map_arg(node.args[0], lambda m: env[m.name])
                if isinstance(out, (tuple, list, dict)):
                    # names what it returned (fx's immutable containers as Python's) and SelectOutput
                    check_network_output(dict(out) if isinstance(out, dict) else tuple(out))
                if not isinstance(out, Pair) or not out.data:
                    raise UnsupportedOpError("the network must return a single tensor that depends on its "
                                             "input")
                return mode.output(out)
            args = fx.node.map_arg(node.args, lambda m: env[m.name])
            kwargs = fx.node.map_arg(node.kwargs, lambda m: env[m.name])
            env[node.name] = self._eval(node, mode, args, kwargs)
            for inp in node.all_input_nodes:
                users[inp.name] -= 1
                if users[inp.name] == 0:
                    env.pop(inp.name, None)
            if users[node.name] == 0:
                env.pop(node.name, None)
            mode.after_node(env)
        raise AssertionError("graph has no output node")

    def finds_layouts(self, mode: Mode) -> bool:
        """Whether a pass in ``mode`` would find the layouts on its own input (not known yet, and needed)."""
        return self.layouts is None and mode.method in _LAID_OUT

    def find_layouts(self, x: torch.Tensor, params: dict[str, torch.Tensor]) -> dict[str, Layout] | None:
        """Where the examples sit in every data-dependent value.

        The real network on a few of ``x``'s examples and on one fewer, compared node by node; only the values
        whose examples do not lead are kept.

        None (not known: every value is taken to lead with its examples) for a batch of one example.
        """
        if x.ndim == 0:
            return None
        # distinct examples, so that how rows of merged examples are ordered shows in their values
        flat = x.reshape(x.shape[0], -1)
        picked: list[int] = []
        for i in range(int(x.shape[0])):
            if not any(torch.equal(flat[i], flat[j]) for j in picked):
                picked.append(i)
                if len(picked) == PROBE_EXAMPLES:
                    break
        n = len(picked)
        if n < 2:
            return None
        x = x[torch.as_tensor(picked, device=x.device)]
        runs = []
        try:
            with torch.no_grad():
                for batch in (x[:n], x[: n - 1]):
                    rec = _RecordingForward([params])
                    self.run((batch,), rec)
                    runs.append(rec.values)
        except Exception as e:  # noqa: BLE001 (the pass itself will say what is wrong with the network or data)
            log.debug("could not find the batch layouts of %s: %s: %s", type(self.gm).__name__,
                      type(e).__name__, e)
            return {}
        out: dict[str, Layout] = {}
        for name, a in runs[0].items():
            b = runs[1].get(name)
            lay = None if b is None else batch_layout(a, b, n, n - 1)
            if lay is not None and lay != LEADING:
                out[name] = lay
        return out

    def _layout(self, node: fx.Node, rule: Rule, mode: Mode, args: Any,
                kwargs: Any) -> tuple[Layout, bool] | None:
        """How ``node``'s rule must see its examples in a pass that keeps per-example statistics, or None.

        ``(layout, True)``: its data input's examples are moved to a first axis around it (a gate, a layer
        norm, a softmax or linear layer on a sequence-first tensor or on rows of ``(batch * positions)``).
        ``(layout, False)``: its input holds rows of examples merged with other entries (frames, windows)
        along the axis where the op expects its examples, and the op cannot take them first (a GroupNorm on
        ``(batch * frames)`` rows, attention on ``(batch * windows)``): each row counts as an example of its
        own, its statistics pooled with its example's group and drawn per row (``mode.per_row``). Refuses a
        site that can do neither.
        """
        if not self.layouts or mode.method not in _LAID_OUT or node.name in self.input_only:
            return None
        if mode.exact is not None and mode.exact(rule):  # run exactly in each stream: no statistic to keep
            return None
        source = next((a for a in node.all_input_nodes if a.name in self.data_nodes), None)
        layout = None if source is None else self.layouts.get(source.name)
        if layout is None or rule.batch_layout_ok(layout):
            return None
        first = next((p for p in data_pairs((args, kwargs)) if isinstance(p.vals[0], torch.Tensor)), None)
        if first is not None and rule.batch_movable(layout, first.vals[0].ndim):
            return layout, True
        if layout[0] == rule.native_batch_axis() and layout[1] * layout[2] > 1:
            return layout, False
        if rule.site:
            raise UnsupportedOpError(
                f"{rule.describe()} sees the examples of a batch along axis {layout[0]} of its input"
                + (f" (merged with {layout[1] * layout[2]} entries of their own)" if layout[1] * layout[2] > 1
                   else "")
                + ", and its statistics cannot be kept per example that way: keep one example per entry of "
                "the first axis up to this op (batch_first=True for torch.nn's sequence layers), or use "
                "gates='relu' (theta0's own linearization), which reads no stored statistic")
        return None

    def _eval(self, node: fx.Node, mode: Mode, args: Any, kwargs: Any) -> Any:
        how = self._layout(node, self.rules[node.name], mode, args, kwargs)
        if how is None:
            return self._eval_rule(node, mode, args, kwargs)
        layout, move = how
        if not move:  # rows of merged examples, each an example of its own (see _layout)
            with cast(Any, mode).per_row(layout):
                return self._eval_rule(node, mode, args, kwargs)
        # the rule sees its examples first (gates, layer norms, a softmax or linear layer on a sequence-first
        # tensor, or on rows of (batch * positions)); its output goes back to the network's layout
        def first(v: Any) -> Any:
            if isinstance(v, Pair) and v.data:
                return Pair(tuple(to_batch_first(t, layout) for t in v.vals), True, fixed=v.fixed)
            return v
        args, kwargs = tree_map(first, (args, kwargs), is_leaf=lambda v: isinstance(v, Pair))
        out = self._eval_rule(node, mode, args, kwargs)
        if not (isinstance(out, Pair) and out.data):
            raise AssertionError(f"{self.rules[node.name].describe()}: a rule run with its examples first "
                                 "must return one data value")
        return Pair(tuple(from_batch_first(t, layout) for t in out.vals), True, fixed=out.fixed)

    def _eval_rule(self, node: fx.Node, mode: Mode, args: Any, kwargs: Any) -> Any:
        rule = self.rules[node.name]
        pairs = pairs_in((args, kwargs))
        if not any(p.data for p in pairs):  # parameter arithmetic: exact in each stream, nothing linearized
            if not pairs and node.op != "call_module":  # constants only (a module reads its own parameters)
                return rule.call(mode.params[0], args, kwargs)
            return Pair(tuple(rule.call(mode.params[s], stream_of(args, s), stream_of(kwargs, s))
                              for s in range(mode.num_streams)), False)
        if node.name in self.input_only:
            sources = data_pairs((args, kwargs))
            if node.name in self.exact_inputs or all(p.fixed for p in sources):
                return self._exact_from_input(rule, mode, args, kwargs, sources)
            if mode.method == "sample" and rule.site and all(_floating(p.vals[0]) for p in sources):
                # a smooth op of the (drawn) network input alone, tanh(x) or x ** 2: the same in every stream,
                # so run exactly -- a slope drawn from its law would only add noise (and, under a division,
                # a denominator that a random slope can bring close to zero). (Not marked fixed: the fit,
                # which recorded its law, saw it as data, and LIFTR anchors what reads it alike in both.)
                return Pair(tuple(rule.call(mode.params[s], stream_of(args, s), stream_of(kwargs, s))
                                  for s in range(mode.num_streams)), True)
            if mode.method == "moments" and rule.site:
                raise UnsupportedOpError(
                    f"{rule.describe()} is applied to the network input alone: the Monte Carlo (laftr) runs "
                    "it exactly on the drawn inputs, the same in both streams, which the closed form, "
                    "working with the input's moments, cannot; use laftr (or apply the op to the data before "
                    "the network)")
            if (mode.method == "moments" and getattr(mode, "tokens", False)
                    and not isinstance(rule, (ReshapeRule, EmbeddingRule))):
                # the closed form holds token ids as one-hot vectors: an op on the ids themselves (ids + 3,
                # ids + self.offset) would be applied to the one-hot vectors (laftr-exact 2.33 for 0.045)
                raise UnsupportedOpError(
                    f"{rule.describe()} computes with the token ids before the embedding: the closed form "
                    "holds the ids as one-hot vectors and reads them only through an embedding (directly or "
                    "reshaped); use the Monte Carlo estimator, or do this to the ids before the network")
            if rule.site and mode.method != "forward" and all(not _floating(p.vals[0]) for p in sources):
                raise UnsupportedOpError(
                    f"{rule.describe()} is applied to the integer network input (token ids): its rule "
                    "linearizes it as an activation of data, which has no meaning for ids; do it to the data "
                    "before the network (e.g. ids.clamp(max=V - 1) when the batches are made)")
        args, kwargs = mode.before(rule, args, kwargs)
        exact = mode.exact is not None and mode.exact(rule)
        if exact and not self.exact_unknown:
            return rule.forward(mode, args, kwargs)
        if self.exact_unknown and (exact or mode.method == "forward"):
            if node.name in self.exact_nodes:
                return Rule.forward(rule, mode, args, kwargs)
            try:
                return rule.forward(mode, args, kwargs)
            except UnsupportedOpError as e:
                # the rule refuses what it could not linearize (a division by data, a mask that moves with the
                # parameters); the real networks need no linearization: each stream runs the op exactly --
                # unless the op itself has no one function (``final``: is_causal=True without a mask)
                if e.final:
                    raise
                self.exact_nodes.add(node.name)
                return Rule.forward(rule, mode, args, kwargs)
        return getattr(rule, mode.method)(mode, args, kwargs)

    def _exact_from_input(self, rule: Rule, mode: Mode, args: Any, kwargs: Any, sources: list[Pair]) -> Pair:
        """A value computed from the network input alone (a padding mask, or its reshaped view).

        It is evaluated exactly on each stream's input and is the same in every stream (``fixed``).
        """
        if mode.method == "moments":
            raise UnsupportedOpError(
                f"{rule.describe()} is computed from the network input alone (a mask, a comparison, a cast): "
                "the closed form works with the input's moments, not its values, and cannot evaluate it; use "
                "the Monte Carlo estimator (laftr, liftr)")
        out = tuple(rule.call(mode.params[s], stream_of(args, s), stream_of(kwargs, s))
                    for s in range(mode.num_streams))
        cast = rule.node.op == "call_method" and rule.node.target in _CASTS and _floating(out[0])
        # torch.maximum(x, c) and its kin of the input alone: a fixed elementwise function of it, kept whole
        # (laftr.composites.KEPT_WHOLE), meaningful on floating inputs drawn by an input model too
        kept = rule.node.op in ("call_function", "call_method") and rule.node.target in KEPT_WHOLE
        division = rule.node.name in self._input_divisions
        if not (all(p.fixed for p in sources) or _is_mask(out[0]) or cast or kept or division
                or all(not _floating(p.vals[0]) for p in sources)):
            raise UnsupportedOpError(
                f"{rule.describe()} turns the floating network input into a non-boolean value without a rule "
                "(e.g. ids cast from floats): an input model draws floating inputs, so its result would be "
                "meaningless; keep token ids integer, or compute only masks (comparisons) from the input")
        return Pair(out, True, fixed=True)

    def forward(self, x: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
        """The network's own output on ``x`` with ``params`` (one stream, plain forward pass)."""
        return self.run((x,), ForwardMode([params]))[0]


#: the passes whose rules record or draw per-example statistics (they need each value's batch layout)
_LAID_OUT = frozenset({"fit", "sample"})

#: dtype casts: of the (floating) network input to another floating type (``x = x.float() / 255``) they are
#: the input itself, the same in every stream
#: methods whose second argument gives only its shape or dtype
_SHAPE_ONLY_SECOND = frozenset({"expand_as", "view_as", "reshape_as", "type_as"})


def _shape_only_arg(node: fx.Node) -> Any:
    """The argument of ``node`` read for its shape or dtype alone (``mask.expand_as(scores)``: ``scores``)."""
    if node.op == "call_method" and node.target in _SHAPE_ONLY_SECOND and len(node.args) > 1:
        return node.args[1]
    return None
_CASTS = frozenset({"float", "double", "half", "bfloat16", "to", "type", "type_as"})


def _floating(v: Any) -> bool:
    return isinstance(v, torch.Tensor) and (v.is_floating_point() or v.is_complex())


def _is_mask(v: Any) -> bool:
    return isinstance(v, torch.Tensor) and v.dtype == torch.bool


#: ops that read only the shape, dtype and device of their data argument (``torch.zeros_like(x)``)
_SHAPE_ONLY = frozenset({torch.zeros_like, torch.ones_like, torch.full_like, torch.empty_like, "new_zeros",
                         "new_ones", "new_full", "new_empty"})

#: zeros made to another tensor's shape
_ZEROS_LIKE = frozenset({torch.zeros_like, "new_zeros"})


class _ShapedByData(Rule):
    """An op that reads only the shape, dtype or device of its data argument, and may read parameters.

    ``torch.zeros_like(x)``, ``self.pos.expand_as(x)``, ``torch.arange(T).expand_as(tokens)``. Its value is
    not data: each stream computes it with its own parameters (a non-data pair), the data argument standing in
    for its shape only.
    """

    def _each_stream(self, mode: Any, args: Any, kwargs: Any) -> Any:
        return Pair(tuple(self.call(mode.params[s], *mode.concrete((args, kwargs), s))
                          for s in range(mode.num_streams)), False)

    forward = fit = sample = own = moments = _each_stream

    def sample_separable(self, mode: Any) -> bool:
        """True: each stream's value is its own."""
        return True


def _shape_query(node: fx.Node, gm: fx.GraphModule, data_nodes: set[str]) -> type[Rule] | None:
    """The rule of a node that reads only the shape, dtype or device of the data it is given, or None.

    ``x.size()``, ``x.shape``, ``x.dtype`` give plain values, the same in every stream (:class:`ShapeRule`);
    ``torch.zeros_like(x)`` and ``c.expand_as(x)`` of a ``c`` that is not data give each stream its own value
    (``_ShapedByData``).
    """
    if node.op in ("call_function", "call_method") and node.target in _SHAPE_ONLY:
        return _ShapedByData
    rule = lookup(node, gm)
    if rule is ShapeRule or (rule is GetattrRule and len(node.args) > 1 and node.args[1] in SHAPE_ATTRS):
        return ShapeRule
    if rule is LikeRule and node.args:
        first = node.args[0]
        if not (isinstance(first, fx.Node) and first.name in data_nodes):
            return _ShapedByData
    return None


def _plain_rule(node: fx.Node, gm: fx.GraphModule) -> Rule:
    """A rule for a node that never sees data: its registered rule if any, else a plain exact call."""
    try:
        return make_rule(node, gm)
    except UnsupportedOpError:
        return Rule(node, gm)


# -------------------------------------------------------------------------------------- one example at a time
#: At most this many examples are read to check that a network maps each example on its own.
PROBE_EXAMPLES = 5


class _Recorder(fx.Interpreter):
    """Runs a traced graph on real tensors (the model's own modules) and keeps the value of every node."""

    def __init__(self, gm: fx.GraphModule) -> None:
        super().__init__(gm)
        self.values: dict[str, Any] = {}

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        self.values[n.name] = out
        return out


def _sub_batches(n: int) -> list[list[int]]:
    """Two disjoint sub-batches of a probe of ``n >= 2`` examples.

    Their order is neither the probe's nor its reverse, so that flipping, rolling or indexing the batch axis
    shows.
    """
    return [[1], [0]] if n == 2 else [[1, 0], list(range(n - 1, 1, -1))]


def _close(a: torch.Tensor, b: torch.Tensor, like: torch.dtype | None = None) -> bool:
    if a.shape != b.shape:
        return False
    if not (a.is_floating_point() or a.is_complex()):
        return torch.equal(a, b)
    rtol = max(1e-4, 10 * torch.finfo(a.real.dtype if a.is_complex() else a.dtype).eps,
               10 * torch.finfo(like).eps if like is not None else 0.0)
    wide = torch.complex128 if a.is_complex() else torch.float64
    a, b = a.detach().to(wide), b.detach().to(wide)
    finite = a[torch.isfinite(a)].abs()
    scale = max(1.0, float(finite.max())) if finite.numel() else 1.0
    return torch.allclose(a, b, rtol=rtol, atol=rtol * scale, equal_nan=True)


#: ops that order, cut or accumulate along a value's first axis
_ALONG_FIRST_AXIS = frozenset({torch.narrow, "narrow", torch.topk, "topk", torch.sort, "sort", torch.argsort,
                               "argsort", torch.cumsum, "cumsum", torch.split, "split", torch.chunk, "chunk"})


#: reductions (and a softmax) that combine the entries along the axis they are given (``dim``; every axis
#: without one)
_REDUCTIONS = frozenset({torch.sum, "sum", torch.mean, "mean", torch.amax, "amax", torch.amin, "amin",
                         torch.max, "max", torch.min, "min", torch.prod, "prod", torch.std, "std", torch.var,
                         "var", torch.logsumexp, "logsumexp", torch.norm, "norm", torch.softmax, "softmax",
                         nn.functional.softmax, torch.log_softmax, "log_softmax", nn.functional.log_softmax})


def _over_first_axis(node: fx.Node) -> bool:
    """Whether a reduction ``node`` combines the entries of its first axis (``dim`` 0, or every axis)."""
    dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else None)
    dims = dim if isinstance(dim, (tuple, list)) else (dim,)
    return any(d is None or (isinstance(d, int) and d == 0) for d in dims)


def _cuts_routed(node: fx.Node, routed: set[fx.Node]) -> bool:
    """Whether ``node`` cuts, orders, accumulates or reduces a routed value along its routed axis.

    ``torch.where(choice == e)[0][:C]`` (the first ``C`` tokens an expert takes: a capacity), a ``narrow``,
    ``topk``, ``sort`` or ``cumsum`` of routed entries: which entries are kept depends on the other examples;
    a mean of them over the routed axis (even scaled by a parameter that is zero at theta0, where the output
    does not show it) combines the tokens of all the examples.
    """
    if node.op not in ("call_function", "call_method") or not isinstance(node.args[0] if node.args else None,
                                                                          fx.Node):
        return False
    source = node.args[0]
    if source not in routed:
        return False
    if node.op == "call_function" and node.target is operator.getitem:
        index = node.args[1]
        first = index[0] if isinstance(index, tuple) and index else index
        return isinstance(first, slice) and first != slice(None)
    if node.target in _REDUCTIONS:
        return _over_first_axis(node)
    return node.target in _ALONG_FIRST_AXIS


#: ops that give the positions where a mask holds (``torch.where(mask)`` with the mask alone)
_MASK_POSITIONS = frozenset({torch.nonzero, "nonzero", torch.argwhere, "argwhere"})


def _positions_of_a_mask(node: fx.Node) -> bool:
    """Whether ``node`` gives the positions where a mask holds, or a part of them (``torch.where(mask)[0]``).

    Positions in the batch, whose values move with the other examples (a mixture-of-experts layer's routing).
    """
    if node.op == "call_function" and node.target is operator.getitem and isinstance(node.args[0], fx.Node):
        node = node.args[0]
    if node.op not in ("call_function", "call_method"):
        return False
    if node.target is torch.where:
        return len(node.args) + len(node.kwargs) == 1
    return node.target in _MASK_POSITIONS


class _Unattributed(str):
    """A reason of :func:`_tensor_mixing` that says only that a value's entries cannot be attributed.

    A number of entries per batch that is not a multiple of the examples' (the tokens a mixture-of-experts
    layer routes to one expert): not that any example's value changed.
    """


def _tensor_mixing(a: torch.Tensor, b: torch.Tensor, n: int, idx: list[int], leading: bool) -> str | None:
    """Why ``a`` (a batch of ``n``) and ``b`` (its examples ``idx``) show that the op mixes examples.

    None when they agree. The examples may sit along any one axis, possibly merged with other axes (``(B*T,
    d)``); with ``leading`` they must lead the first axis.
    """
    k = len(idx)
    shapes = f"{tuple(a.shape)} for {n} examples, {tuple(b.shape)} for {k}"
    if a.ndim != b.ndim:
        return f"the number of axes of its value depends on the batch size ({shapes})"
    varying = [d for d in range(a.ndim) if a.shape[d] != b.shape[d]]
    if not varying:
        if _close(a, b):
            return None
        return (f"its value (shape {tuple(a.shape)}) has no axis per example and changes with the other "
                "examples in the batch (a reduction over the batch axis, or an example read for all of them)")
    if len(varying) > 1:
        return f"several axes of its value grow with the batch ({shapes}): it pairs examples"
    d = varying[0]
    whole, part = a.shape[d], b.shape[d]
    if whole % n or part % k or whole // n != part // k:
        return _Unattributed(f"its axis {d} does not hold the same number of entries for every example "
                             f"({shapes})")
    if leading and d != 0:
        return f"the examples are along its axis {d}, not its first axis ({shapes})"
    m = whole // n
    if (d == 0 and a.numel() == n and b.numel() == k and not a.is_floating_point()
            and torch.equal(a.reshape(-1), torch.arange(n, device=a.device))
            and torch.equal(b.reshape(-1), torch.arange(k, device=b.device))):
        # the examples' own positions (torch.arange(B) of h[torch.arange(B), last], or arange(B)[:, None] of
        # h[torch.arange(B)[:, None], top]: each example picks its own rows); a use that does mix them (added
        # to the data) shows in the values that read it
        return None
    sel = torch.as_tensor(idx, device=a.device)
    for outer in [1] if leading else [j for j in range(1, m + 1) if m % j == 0]:
        inner = m // outer
        if _close(a.unflatten(d, (outer, n, inner)).index_select(d + 1, sel),
                  b.unflatten(d, (outer, k, inner))):
            return None
    return "the value it gives an example changes when the other examples of the batch change"


def _mixing(full: Any, sub: Any, n: int, idx: list[int], leading: bool = False) -> str | None:
    """:func:`_tensor_mixing` over every tensor of two values of the same structure.

    Non-tensors are skipped.
    """
    leaves_f, spec_f = tree_flatten(full)
    leaves_s, spec_s = tree_flatten(sub)
    if spec_f != spec_s:
        return "it splits the batch into a number of pieces that depends on the batch size"
    for a, b in zip(leaves_f, leaves_s, strict=True):
        if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
            why = _tensor_mixing(a, b, n, idx, leading)
            if why is not None:
                return why
    return None


_RANDOM = ("gives other values on a second run of the same batch in eval mode: it is random, so its "
           "distances (and the exact FSD) would be draws of noise. Dropout written as F.dropout(h, p, "
           "training=True) stays on in eval mode: pass training=self.training (or use nn.Dropout); laftr "
           "needs a deterministic network in eval mode")


def _differs(a: Any, b: Any, like: torch.dtype | None = None) -> bool:
    """Whether two runs' values differ in structure or in any tensor beyond rounding.

    ``like``: the rounding is at least that of this dtype (a bfloat16 network whose last op returns float32,
    ``log_softmax(h, -1, dtype=torch.float32)``, carries bfloat16's rounding in its float32 outputs).
    """
    leaves_a, spec_a = tree_flatten(a)
    leaves_b, spec_b = tree_flatten(b)
    if spec_a != spec_b:
        return True
    return any(isinstance(u, torch.Tensor) and isinstance(v, torch.Tensor)
               # (the mixing check's tolerance: GPU atomics)
               and (u.shape != v.shape or not _close(u, v, like))
               for u, v in zip(leaves_a, leaves_b, strict=True))


def _lowest_precision(model: nn.Module) -> torch.dtype | None:
    """The floating dtype of ``model``'s parameters and buffers with the largest rounding (None: none)."""
    dtypes = {t.dtype for t in (*model.parameters(), *model.buffers()) if t.is_floating_point()}
    return max(dtypes, key=lambda d: torch.finfo(d).eps) if dtypes else None


def pruned_tensors(module: nn.Module) -> list[str]:
    """The names of ``module``'s own tensors that ``torch.nn.utils.prune`` computes (``weight``).

    Each is its ``<name>_orig`` parameter times its ``<name>_mask`` buffer, set by a forward pre-hook.
    """
    return [str(cast(Any, h)._tensor_name) for h in module._forward_pre_hooks.values()
            if pruned_tensors_hook(h)]


def forward_hooks(model: nn.Module) -> list[str]:
    """The modules of ``model`` with forward hooks or pre-hooks (pruning's excepted).

    ``"every module (global hooks)"`` stands for hooks registered on every module. torch.fx's graph, which
    the traced estimators run, does not call them.
    """
    from torch.nn.modules import module as _module

    out = ["every module (global hooks)"] if (_module._global_forward_hooks
                                              or _module._global_forward_pre_hooks) else []
    for name, m in model.named_modules():
        pre = [h for h in m._forward_pre_hooks.values() if not pruned_tensors_hook(h)]
        if m._forward_hooks or pre:
            out.append(name or "(root)")
    return out


def pruned_tensors_hook(hook: Any) -> bool:
    """Whether a forward pre-hook is ``torch.nn.utils.prune``'s (handled: :func:`pruned_tensors`)."""
    from torch.nn.utils import prune

    return isinstance(hook, prune.BasePruningMethod)


@contextlib.contextmanager
def _hooks_removed(model: nn.Module) -> Iterator[None]:
    """Inside the block ``model``'s modules have no forward hooks or pre-hooks (but pruning's), nor globals.

    The traced graph's estimating modes run a ruled layer by its rule, which calls no hook, and its forward
    mode by the module itself, which would: so the comparison with the model runs the graph as the
    estimators do. Put back after.
    """
    from torch.nn.modules import module as _module

    kept: list[tuple[dict[Any, Any], dict[Any, Any]]] = []
    globals_ = [_module._global_forward_hooks, _module._global_forward_pre_hooks]
    for table in globals_:
        kept.append((table, dict(table)))
    for m in model.modules():
        for attr in ("_forward_hooks", "_forward_pre_hooks"):
            table = getattr(m, attr)
            kept.append((table, dict(table)))
    try:
        for table, old in kept:
            for key, hook in old.items():
                if not pruned_tensors_hook(hook):
                    del table[key]
        yield
    finally:
        for table, old in kept:
            table.clear()
            table.update(old)


class _GradOffSeen(torch.overrides.TorchFunctionMode):
    """Notes whether any torch op of a forward runs with gradients off (a ``torch.no_grad()`` block)."""

    def __init__(self) -> None:
        super().__init__()
        self.seen = False

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if not torch.is_grad_enabled():
            self.seen = True
        return func(*args, **(kwargs or {}))


def _reached(out: Any) -> set[int]:
    """The ids of the leaf tensors (parameters) that the autograd graph of ``out`` reaches."""
    seen: set[int] = set()
    found: set[int] = set()
    stack: list[Any] = [t.grad_fn for t in tree_flatten(out)[0]
                        if isinstance(t, torch.Tensor) and t.grad_fn is not None]
    while stack:
        fn = stack.pop()
        if fn is None or id(fn) in seen:
            continue
        seen.add(id(fn))
        var = getattr(fn, "variable", None)  # AccumulateGrad: a leaf
        if isinstance(var, torch.Tensor):
            found.add(id(var))
        stack.extend(f for f, _ in fn.next_functions)
    return found


def check_traced_graph(model: nn.Module, x: torch.Tensor, hooks: bool = True, trace: bool | None = None,
                       grad_off: bool = True) -> None:
    """Refuse a forward whose value depends on the gradient mode, or that its torch.fx graph does not compute.

    The estimators evaluate theta0's stream without gradients and theta's with them (a regularizer), and the
    traced ones run the network's graph with each stream's parameters. So the network's output on the first
    examples of ``x`` must be the same with gradients on and off: torch.nn's fused inference path of
    ``TransformerEncoder`` (taken without gradients, with ``enable_nested_tensor`` and a padding mask) returns
    zeros at padded positions where the standard path returns values, and an estimate then compared two
    networks (``subset`` gave 0.046 at theta0). For the traced estimators (``trace``), the graph's output must
    equal the model's: a forward hook or pre-hook is not part of the graph (a hook scaling a layer's output by
    3 gave 0.1 x the exact FSD, silently), nor is a Python branch that tracing resolves otherwise
    (``isinstance(h, torch.Tensor)`` is False for a traced value: one such branch gave 1/4 of the exact FSD).
    Where some op runs with gradients off (``torch.no_grad()`` inside ``forward``, ``grad_off``), the graph's
    output must reach no parameter the model's does not: the estimates' gradients would otherwise reach
    parameters the model's own forward gives none. A network that cannot be traced or run is left to the
    estimator's own pass. ``hooks=False`` (``trace`` then defaults to False): an estimator that runs the
    module itself (its hooks included) but differentiates it by forward mode, which ``torch.no_grad()`` does
    not stop (``ntk``): the gradient-mode checks only.

    Raises:
        UnsupportedOpError: naming what differs: the gradient mode, the modules with hooks, a Python branch,
            or the parameters gradients must not reach.
    """
    trace = hooks if trace is None else trace
    x = x[:PROBE_EXAMPLES]
    seen = _GradOffSeen()
    name = type(model).__name__
    try:
        with full_float32():
            with torch.no_grad():
                plain = model(x.clone())
            with torch.enable_grad(), seen:
                real = model(x.clone())
    except Exception as e:  # noqa: BLE001 (the estimator's own pass says why)
        log.debug("%s does not run on its data (%s: %s)", name, type(e).__name__, e)
        return

    def random() -> bool:  # a network that differs from itself: check_per_example names it
        with torch.no_grad(), full_float32():
            return _differs(plain, model(x.clone()))

    low = _lowest_precision(model)
    if _differs(plain, real, low) and not random():
        raise UnsupportedOpError(
            f"{name} computes other outputs with gradients on than with gradients off (torch.no_grad()): "
            "theta0's outputs are computed without gradients and theta's with them, so every estimate would "
            "compare two other functions. torch.nn's TransformerEncoder takes a fused inference path "
            "without gradients that returns zeros at the positions a src_key_padding_mask hides "
            "(enable_nested_tensor=True, its default): build it with enable_nested_tensor=False, or read no "
            "padded position in the output; a forward that branches on torch.is_grad_enabled() must compute "
            "the same value either way")
    hooked = forward_hooks(model) if hooks else []
    if not trace and not (grad_off and seen.seen):
        return
    try:
        with torch.enable_grad(), full_float32(), _hooks_removed(model):
            named = param_dict(model)
            net = TracedNet(model, exact_unknown=True)
            traced = net.forward(x.clone(), named)
    except Exception as e:  # noqa: BLE001 (the estimator's own pass says why)
        log.debug("could not compare %s with its traced graph (%s: %s)", name, type(e).__name__, e)
        return
    # (outputs that are not finite are refused by the estimator's fit, naming them: a graph that gives a
    # finite value where the model divides 0 by 0, a softmax of a row with no visible key, is not the branch)
    finite = all(bool(torch.isfinite(t).all()) for t in tree_flatten(real)[0]
                 if isinstance(t, torch.Tensor) and t.is_floating_point())
    if trace and finite and _differs(real, traced, low) and not random():
        if hooked:
            raise UnsupportedOpError(
                f"{name} has forward hooks that change what it computes (on {', '.join(hooked)}): laftr runs "
                "the network's traced graph with each set of parameters, which does not call hooks, so its "
                "estimates would be those of the network without them; compute what the hook does "
                "inside forward (a module of its own), or remove the hook (torch.nn.utils.prune's masks are "
                "supported)")
        raise UnsupportedOpError(
            f"{name}'s forward and its torch.fx graph, which laftr runs with each set of parameters, give "
            "other outputs on the first examples: the forward takes a Python branch that tracing resolves "
            "otherwise (isinstance(h, torch.Tensor) or isinstance(out, tuple) is False for a traced value; a "
            "value read with .item() or a Python attribute fixed while tracing); write the branch your model "
            "takes without the test (h, _ = lstm(x); out = out[0]), or use an estimator that runs the module "
            "itself (subset, ntk)")
    if grad_off and seen.seen:
        extra = _reached(traced) - _reached(real)
        names = [n for n, t in named.items() if id(t) in extra]
        if names:
            raise UnsupportedOpError(
                f"{name} turns gradients off inside its forward (torch.no_grad() or set_grad_enabled(False)) "
                f"for a part that reads {names[:5]}: laftr's traced graph does not record that, so the "
                "estimates' gradients would reach parameters the model's own forward gives none; detach the "
                "values instead (h.detach(), which laftr follows)")


def check_deterministic(model: nn.Module, x: torch.Tensor, what: str = "the model") -> None:
    """Refuse a network that gives other outputs on a second run of the same inputs (in its current mode).

    It runs twice, without gradients, on the first :data:`PROBE_EXAMPLES` examples of ``x``. A network that
    does not run on ``x`` is not checked (the caller's own pass reports that).

    Raises:
        UnsupportedOpError: the outputs differ beyond rounding (dropout forced on, noise drawn in forward).
    """
    x = x[:PROBE_EXAMPLES]
    try:
        with torch.no_grad(), full_float32():
            first, second = model(x.clone()), model(x.clone())  # a model may change its input in place
    except Exception as e:  # noqa: BLE001 (the caller's own pass says why)
        log.debug("%s does not run on its data (%s: %s)", type(model).__name__, type(e).__name__, e)
        return
    if _differs(first, second):
        raise UnsupportedOpError(f"{what} ({type(model).__name__}) {_RANDOM}")


_NEEDS = ("; laftr needs a network that maps each example on its own "
          "(its estimates would otherwise depend on the batch size or the number of samples)")


@contextlib.contextmanager
def full_float32() -> Iterator[None]:
    """Float32 products at full precision inside the block (TF32 off for cuDNN and CUDA matmuls).

    With TF32 the rounding of a convolution depends on the algorithm cuDNN picks, and that depends on the
    batch size: relative differences near 1e-3 that are no mixing of examples. The flags are restored after.
    """
    cudnn_tf32 = torch.backends.cudnn.allow_tf32
    precision = torch.get_float32_matmul_precision()
    try:
        torch.backends.cudnn.allow_tf32 = False
        torch.set_float32_matmul_precision("highest")
        yield
    finally:
        torch.backends.cudnn.allow_tf32 = cudnn_tf32
        torch.set_float32_matmul_precision(precision)


def check_per_example(model: nn.Module, x: torch.Tensor, gm: fx.GraphModule | None = None,
                      untraced: str = "", layouts: bool = True) -> None:
    """Refuse a network whose output for an example depends on the other examples of its batch.

    See :func:`_check_per_example`. In a float32 (or narrower) network a finding is confirmed on a float64
    copy, whose output must mix the examples too: the rounding of a product depends on the batch size, and
    with inputs of a large common offset (raw features around 1e4, centred by the first layer's bias) it
    exceeded the check's tolerance, relative to the outputs' size, and a network that maps each example on
    its own was refused.
    """
    try:
        _check_per_example(model, x, gm, untraced, layouts)
    except UnsupportedOpError as refused:
        floats = [t.dtype for t in (*model.parameters(), *model.buffers(), x) if t.is_floating_point()]
        if all(dt == torch.float64 for dt in floats):  # (no floats at all: nothing to widen)
            raise
        try:
            wide = copy.deepcopy(model).double()
            wide_gm = None
            # node by node, as the finding was made (a mixing branch scaled by 0 at theta0)
            if gm is not None:
                with contextlib.suppress(Exception):
                    wide_gm = trace(wide)
            _check_per_example(wide, x.double() if x.is_floating_point() else x, wide_gm, untraced, layouts)
        except Exception:  # noqa: BLE001 (mixing in float64 too, or no float64 copy: the finding stands)
            raise refused from None
        log.info("%s: the examples' outputs differed in a batch only by float32 rounding (%s)",
                 type(model).__name__, refused)


def _check_per_example(model: nn.Module, x: torch.Tensor, gm: fx.GraphModule | None = None,
                       untraced: str = "", layouts: bool = True) -> None:
    """Refuse a network whose output for an example depends on the other examples of its batch.

    The network runs (in eval mode, without gradients) on the first :data:`PROBE_EXAMPLES` examples of ``x``
    and on two disjoint sub-batches of them, in another order; every op must give each example of a sub-batch
    what it gave that example in the whole batch. This refuses reductions over the batch (``h.sum()``,
    ``h.mean(0)``, ``h.max(0)``), ops that read other examples (indexing, flipping, rolling or splitting the
    batch axis, a matrix product that contracts it, a softmax over it), batch norm on batch statistics (no
    running statistics, or ``F.batch_norm(..., training=True)``) and anything else that mixes the examples,
    wherever the batch axis is (``nn.MultiheadAttention`` with ``batch_first=False`` keeps it second). The
    network's output must also have its examples along its first axis.
    The probe runs with full float32 products (:func:`full_float32`), so TF32 rounding on a GPU is not
    taken for mixing.

    Args:
        model: the network.
        x: a batch of real inputs (at least two different examples; with fewer nothing is checked).
        gm: ``model`` traced by :func:`trace`, to name the op that mixes; None (a model torch.fx cannot
            trace): only the output is checked.
        untraced: why ``model`` could not be traced (for the message), when ``gm`` is None.
        layouts: whether every value of the graph must keep the examples apart where an estimator can see
            them (one that runs the graph with per-example statistics: ``laftr``, ``liftr``, the curvature
            taps). False (``subset``, ``ntk``, which run the network as a whole): a value whose entries
            cannot be attributed to the examples is passed over -- the tokens a mixture-of-experts layer
            routes to one expert (a number per batch that is no multiple of the examples'), integer
            positions in the batch (``torch.where`` of its routing mask), and what is computed from them
            until a value holds the examples again (the experts' outputs added back per token), which is
            checked as every value is, and so is the output.

    A network that cannot run on ``x`` is not checked here: the estimator's own pass over the data reports
    that.

    Raises:
        UnsupportedOpError: naming the node and the op (or, without a trace, the model) and why.
    """
    n = min(int(x.shape[0]), PROBE_EXAMPLES)
    if n < 2:
        log.info("one example only: cannot check that %s maps each example on its own", type(model).__name__)
        return
    x = x[:n]
    subs = _sub_batches(n)
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad(), full_float32():
            runs: list[dict[str, Any]] | None = None
            if gm is not None:
                try:
                    runs = []
                    # the whole batch twice (random ops), each run on its own copy (in-place ops on the input)
                    for batch in [x.clone(), x.clone(), *(x[idx] for idx in subs)]:
                        rec = _Recorder(gm)
                        rec.run(batch)
                        runs.append(rec.values)
                except Exception as e:  # noqa: BLE001 (the traced graph fails where the model runs: check its output)
                    log.debug("could not run the traced graph of %s on real data (%s: %s)",
                              type(model).__name__, type(e).__name__, e)
                    runs = None
            if runs is not None and gm is not None:
                out = next(node.name for node in gm.graph.nodes if node.op == "output")
                # a deterministic graph that is not the model's (a Python branch): the model's output only
                try:
                    if not _differs(runs[0][out], runs[1][out]) and _differs(model(x.clone()), runs[0][out]):
                        runs = None
                except Exception as e:  # noqa: BLE001 (the estimator's fit says why)
                    log.debug("%s does not run on its data (%s: %s)", type(model).__name__,
                              type(e).__name__, e)
                    return
            if runs is not None and gm is not None:
                unattributed: set[fx.Node] = set()
                for node in gm.graph.nodes:
                    if node.op in ("placeholder", "get_attr"):
                        continue
                    if _differs(runs[0][node.name], runs[1][node.name]):
                        raise UnsupportedOpError(f"node {node.name!r} ({describe(node, gm)}) {_RANDOM}")
                    leading = node.op == "output"
                    for idx, values in zip(subs, runs[2:], strict=True):
                        why = _mixing(runs[0][node.name], values[node.name], n, idx, leading)
                        if why is None:
                            continue
                        if not layouts and not leading and (
                                isinstance(why, _Unattributed) or _positions_of_a_mask(node)
                                or any(a in unattributed for a in node.all_input_nodes)):
                            if _cuts_routed(node, unattributed):
                                raise UnsupportedOpError(
                                    f"node {node.name!r} ({describe(node, gm)}) mixes the examples of a "
                                    "batch: it cuts, orders or reduces values routed by value along the "
                                    "routed tokens (a capacity of tokens per expert, a mean over them), so "
                                    f"an example's value depends on the other examples' tokens{_NEEDS}")
                            # routed entries, positions in the batch (torch.where of a routing mask), and
                            # what is computed from them until a value holds the examples again
                            unattributed.add(node)
                            break
                        if leading:
                            raise UnsupportedOpError(f"the output of {type(model).__name__} does not keep "
                                                     f"the examples of a batch apart: {why}{_NEEDS}")
                        routed = ("; the entries of a value routed by value (a mixture-of-experts layer's "
                                  "tokens per expert) cannot be attributed to the examples, which this "
                                  "estimator needs: subset, ntk and laftr with gates='none', which run the "
                                  "network as a whole, take it"
                                  if isinstance(why, _Unattributed) else "")
                        raise UnsupportedOpError(f"node {node.name!r} ({describe(node, gm)}) mixes the "
                                                 f"examples of a batch: {why}{_NEEDS}{routed}")
                return
            try:
                outs = [model(batch) for batch in [x.clone(), x.clone(), *(x[idx] for idx in subs)]]
            except Exception as e:  # noqa: BLE001 (the model does not run on its data: the estimator's fit says why)
                log.debug("%s does not run on its data (%s: %s)", type(model).__name__, type(e).__name__, e)
                return
            if _differs(outs[0], outs[1]):
                raise UnsupportedOpError(f"{type(model).__name__} {_RANDOM}")
            for idx, out in zip(subs, outs[2:], strict=True):
                why = _mixing(outs[0], out, n, idx, leading=True)
                if why is not None:
                    named = f"; the op that mixes them cannot be named: {untraced}" if untraced else ""
                    raise UnsupportedOpError(f"{type(model).__name__} mixes the examples of a batch, seen in "
                                             f"its output: {why}{_NEEDS}{named}")
    finally:
        for m, training in modes:
            m.training = training
