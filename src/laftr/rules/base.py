"""The rule registry and the base class every rule derives from.

A *rule* owns everything about one op family (DESIGN.md, "Rules are objects"): which module types,
functions and tensor methods it stands for; how each stream runs the op exactly; what it records at theta0
while a summary is fitted; how a Monte Carlo draw linearizes it (from the stored statistic, or theta0's own
linearization on each input); and its closed-form moment update, or a refusal that names the op. The
interpreter in :mod:`laftr.graph` never looks at what an op is: for every node it calls the rule's method
named by the current *mode* (``fit``, ``sample``, ``own``, ``moments`` or ``forward``).

Rules are registered with :func:`register`; one rule object is made per node of a traced network, so the
constructor is the place to read and check the op's constant arguments (a slope, a pool size).
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Iterable, Sequence
from typing import Any, ClassVar, Protocol

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx.immutable_collections import immutable_dict, immutable_list
from torch.utils._pytree import tree_flatten, tree_map

from ..errors import UnsupportedOpError

__all__ = [
    "Pair",
    "Rule",
    "RuleMode",
    "describe",
    "is_registered_function",
    "is_registered_method",
    "is_registered_module",
    "lookup",
    "make_rule",
    "module_call",
    "module_rule",
    "register",
    "registered_targets",
    "unregister",
]


class Pair:
    """One value per stream (theta0 first).

    ``data`` marks values that depend on the network input; ``fixed`` marks data values computed from the
    network input alone (no parameter on the way, e.g. a padding mask ``tokens == pad``): exact and the same
    in every stream.

    In the closed-form mode the values of data tensors are references into the joint moment state
    (``Ref`` objects of the private ``laftr.moments``) rather than tensors.
    """

    __slots__ = ("data", "fixed", "vals")

    def __init__(self, vals: tuple[Any, ...], data: bool, fixed: bool = False) -> None:
        """A pair of per-stream values; see the class for ``data`` and ``fixed``."""
        self.vals = vals
        self.data = data
        self.fixed = fixed

    def __repr__(self) -> str:  # pragma: no cover - debugging aid
        """The flags and the values, for debugging."""
        return f"Pair(data={self.data}, vals={self.vals!r})"


#: leaf types met in an op's arguments, handled without torch's pytree machinery (which costs a few
#: microseconds per call, and an evaluation makes a few dozen such calls)
_LEAVES = (torch.Tensor, int, float, bool, str, slice, type(None), type(Ellipsis), torch.dtype, torch.device)


#: the list and dict types of an fx node's arguments (handled like list and dict, without pytree)
_LISTS = (list, immutable_list)
_DICTS = (dict, immutable_dict)


def stream_of(v: Any, s: int) -> Any:
    """``v`` with every :class:`Pair` among its leaves replaced by its value in stream ``s``."""
    if isinstance(v, Pair):
        return v.vals[s]
    t = type(v)
    if t is tuple:
        return tuple(stream_of(a, s) for a in v)
    if t in _LISTS:
        return [stream_of(a, s) for a in v]
    if t in _DICTS:
        return {k: stream_of(a, s) for k, a in v.items()}
    if isinstance(v, _LEAVES):
        return v
    return tree_map(lambda a: a.vals[s] if isinstance(a, Pair) else a, v)  # other containers


def pairs_in(v: Any) -> list[Pair]:
    """Every :class:`Pair` among the leaves of ``v`` (in :func:`torch.utils._pytree.tree_flatten` order)."""
    out: list[Pair] = []
    _collect_pairs(v, out)
    return out


def _collect_pairs(v: Any, out: list[Pair]) -> None:
    if isinstance(v, Pair):
        out.append(v)
        return
    t = type(v)
    if t is tuple or t in _LISTS:
        for a in v:
            _collect_pairs(a, out)
    elif t in _DICTS:
        for a in v.values():
            _collect_pairs(a, out)
    elif not isinstance(v, _LEAVES):
        out.extend(a for a in tree_flatten(v)[0] if isinstance(a, Pair))  # other containers


def data_pairs(v: Any) -> list[Pair]:
    """The data-dependent pairs among the leaves of ``v``, each once (by identity), in order."""
    out: list[Pair] = []
    for p in pairs_in(v):
        if p.data and all(p is not q for q in out):
            out.append(p)
    return out


def changing_pairs(v: Any) -> list[Pair]:
    """The data pairs of ``v`` that can differ between streams.

    That is :func:`data_pairs` without the ``fixed`` ones (functions of the network input alone, such as
    padding masks).
    """
    return [p for p in data_pairs(v) if not p.fixed]


def anchorable_pairs(v: Any) -> list[Pair]:
    """The :func:`changing_pairs` of ``v`` holding one value per stream (a tensor, or a closed form's block).

    (LIFTR draws these from their stored moments; a pair of per-stream tuples, such as the ``(h, c)`` state an
    LSTM cell returned and the next call reads whole, is left to the op's own anchors.)
    """
    return [p for p in changing_pairs(v) if not isinstance(p.vals[0], (tuple, list))]


# ---------------------------------------------------------------------------------------------- registry
_MODULE_RULES: dict[type, type[Rule]] = {}
_FUNCTION_RULES: dict[Any, type[Rule]] = {}
_METHOD_RULES: dict[str, type[Rule]] = {}


def _table(target: Any) -> tuple[dict[Any, type[Rule]], Any]:
    if isinstance(target, str):
        if not target.isidentifier():
            raise ValueError(f"a tensor method name must be an identifier, got {target!r}")
        return _METHOD_RULES, target
    if isinstance(target, type):
        if not issubclass(target, nn.Module):
            raise TypeError(f"a module rule needs an nn.Module subclass, got {target.__name__}")
        return _MODULE_RULES, target
    if callable(target):
        return _FUNCTION_RULES, target
    raise TypeError(f"cannot register a rule for {target!r}: give a module class, a "
                    "function or a method name")


def register(*targets: Any, replace: bool = False) -> Callable[[type[Rule]], type[Rule]]:
    """Class decorator: make ``cls`` the rule of the given module types, functions and tensor method names.

    Example (a user's own activation; see :class:`laftr.rules.SmoothGate`)::

        @laftr.rules.register(MySwish)
        class SwishRule(laftr.rules.SmoothGate):
            family = "swish"   # stored with summaries of networks that use it; slope: from autograd

    Module types are matched through their class hierarchy (a subclass uses its nearest registered base
    class) and are kept as leaves when the network is traced, so a registered module is never traced into.

    Args:
        *targets: ``nn.Module`` subclasses, functions (as torch.fx records them, e.g. ``F.gelu``,
            ``torch.tanh``, ``operator.add``) and tensor method names (``"relu"``).
        replace: allow replacing an existing rule of a target (else that is an error).
    """
    if not targets:
        raise ValueError("register() needs at least one module type, function or method name")

    def deco(cls: type[Rule]) -> type[Rule]:
        if not (isinstance(cls, type) and issubclass(cls, Rule)):
            raise TypeError(f"@register decorates Rule subclasses, not {cls!r}")
        for t in targets:
            table, key = _table(t)
            old = table.get(key)
            if old is not None and old is not cls and not replace:
                raise ValueError(f"{_name_of(key)} already has the rule {old.__name__}; pass "
                                 "replace=True to replace it")
            table[key] = cls
        return cls

    return deco


def unregister(*targets: Any) -> None:
    """Remove the rules of ``targets`` (e.g. a test's custom rule); unknown targets are ignored."""
    for t in targets:
        table, key = _table(t)
        table.pop(key, None)


def registered_targets() -> dict[str, dict[Any, type[Rule]]]:
    """``{"modules": {...}, "functions": {...}, "methods": {...}}``: every registered target and its rule."""
    return {"modules": dict(_MODULE_RULES), "functions": dict(_FUNCTION_RULES),
            "methods": dict(_METHOD_RULES)}


def _module_rule(mod_type: type) -> type[Rule] | None:
    """The rule of the nearest registered base class of ``mod_type``, if any.

    None when ``mod_type`` overrides that class's ``forward``: the rule would not describe what the module
    computes.
    """
    for base in mod_type.__mro__:
        rule = _MODULE_RULES.get(base)
        if rule is not None:
            return rule if getattr(mod_type, "forward", None) is getattr(base, "forward", None) else None
    return None


def module_rule(mod: nn.Module) -> type[Rule] | None:
    """The rule class of a module (by its type or a base class whose ``forward`` it keeps), if any."""
    return _module_rule(type(mod))


def is_registered_function(target: Any) -> bool:
    """Whether the function ``target`` has a rule (the tracer then records it as one node)."""
    try:
        return target in _FUNCTION_RULES
    except TypeError:  # unhashable target
        return False


def is_registered_method(name: Any) -> bool:
    """Whether the tensor method ``name`` has a rule (the tracer then records it as one node)."""
    return isinstance(name, str) and name in _METHOD_RULES


def is_registered_module(mod: nn.Module) -> bool:
    """Whether ``mod`` (by its type or a base class) has a rule: the tracer keeps it as a leaf."""
    return _module_rule(type(mod)) is not None


def lookup(node: fx.Node, gm: fx.GraphModule) -> type[Rule] | None:
    """The rule class registered for a ``call_module`` / ``call_function`` / ``call_method`` node, if any."""
    if node.op == "call_module":
        return _module_rule(type(gm.get_submodule(str(node.target))))
    if node.op == "call_function":
        try:
            return _FUNCTION_RULES.get(node.target)
        except TypeError:  # unhashable target
            return None
    if node.op == "call_method":
        return _METHOD_RULES.get(str(node.target))
    return None


def make_rule(node: fx.Node, gm: fx.GraphModule) -> Rule:
    """The rule object of ``node``; raises :class:`UnsupportedOpError` naming the node when there is none."""
    cls = lookup(node, gm)
    if cls is None:
        what = {"call_module": "layer", "call_function": "function",
                "call_method": "tensor method"}.get(node.op, "op")
        raise UnsupportedOpError(
            f"node {node.name!r} ({describe(node, gm)}) is not supported: laftr has no rule for this {what} "
            "(supported ops are listed in docs/usage.md; a custom op can be added with laftr.rules.register; "
            "laftr with linearize='activations' or gates='none' runs it exactly as it is, as do diag-fisher "
            "and kfac with unsupported='diag')"
        )
    return cls(node, gm)


def _name_of(target: Any) -> str:
    if isinstance(target, str):
        return f"method Tensor.{target}"
    if isinstance(target, type):
        return f"module type {target.__name__}"
    return f"function {getattr(target, '__module__', None) or ''}.{getattr(target, '__name__', target)}"


def describe(node: fx.Node, gm: fx.GraphModule | None = None) -> str:
    """A short human description of a node's op, for error messages."""
    if node.op == "call_module" and gm is not None:
        return f"module {node.target!r} of type {type(gm.get_submodule(str(node.target))).__name__}"
    if node.op == "call_function":
        module = getattr(node.target, "__module__", "") or ""
        return f"function {module}.{getattr(node.target, '__name__', node.target)}"
    if node.op == "call_method":
        return f"method Tensor.{node.target}"
    return f"{node.op} {node.target}"


# ---------------------------------------------------------------------------------------------- exact calls
#: In-place functions and their out-of-place twins: the interpreter never writes into a stream's tensors.
_OUT_OF_PLACE: dict[Any, Any] = {
    operator.iadd: operator.add, operator.isub: operator.sub, operator.imul: operator.mul,
    operator.itruediv: operator.truediv, operator.imatmul: operator.matmul, operator.ipow: operator.pow,
}
#: smooth elementwise functions of the data with a gate rule (``laftr.rules.gates.ElementwiseGate``), each
#: also a tensor method and, with a trailing ``_``, an in-place one
ELEMENTWISE_FUNCTIONS = ("exp", "expm1", "log", "log1p", "log2", "log10", "sqrt", "rsqrt", "square",
                         "reciprocal", "sin", "cos", "erf", "erfc", "atan", "sinh", "cosh")
for _name in ("relu_", "clamp_", "clamp_min_", "clamp_max_", "clip_", "sigmoid_", "tanh_", "selu_", "celu_",
              "rrelu_", *(n + "_" for n in ELEMENTWISE_FUNCTIONS)):
    if hasattr(torch, _name) and hasattr(torch, _name[:-1]):
        _OUT_OF_PLACE[getattr(torch, _name)] = getattr(torch, _name[:-1])
for _name in ("relu_", "elu_", "leaky_relu_", "hardtanh_", "threshold_", "celu_", "selu_", "rrelu_"):
    if hasattr(F, _name) and hasattr(F, _name[:-1]):
        _OUT_OF_PLACE[getattr(F, _name)] = getattr(F, _name[:-1])


def out_of_place_function(fn: Any) -> Any:
    """The out-of-place twin of an in-place function (``F.relu_`` -> ``F.relu``), else ``fn`` itself."""
    try:
        return _OUT_OF_PLACE.get(fn, fn)
    except TypeError:
        return fn


def out_of_place_method(name: str) -> str:
    """``"add_"`` -> ``"add"``; other names unchanged (dunder methods keep their name)."""
    if name.endswith("_") and not name.endswith("__"):
        return name[:-1]
    return name


def module_call(mod: nn.Module, name: str, params: dict[str, torch.Tensor], args: tuple[Any, ...],
                kwargs: dict[str, Any]) -> Any:
    """Call a leaf module with its parameters and buffers taken from ``params`` by their qualified names.

    The module itself is never changed, and an ``inplace`` module writes into a copy of its input.
    """
    p = name + "." if name else ""
    if isinstance(mod, nn.Linear):
        return F.linear(args[0], params[p + "weight"], params.get(p + "bias"))
    if isinstance(mod, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return mod._conv_forward(args[0], params[p + "weight"], params.get(p + "bias"))
    if isinstance(mod, nn.modules.batchnorm._BatchNorm):
        return F.batch_norm(
            args[0], params[p + "running_mean"], params[p + "running_var"], params.get(p + "weight"),
            params.get(p + "bias"), False, 0.0, mod.eps,
        )
    if getattr(mod, "inplace", False) and args and isinstance(args[0], torch.Tensor):
        args = (args[0].clone(), *args[1:])
    own = list(mod.named_parameters()) + list(mod.named_buffers())
    if own:
        local = {k: params[p + k] for k, _ in own}
        return torch.func.functional_call(mod, local, args, kwargs)
    return mod(*args, **kwargs)


# ---------------------------------------------------------------------------------------------- the base rule
class RuleMode(Protocol):
    """What a rule's mode methods receive: the interpreter's current mode, as far as any rule may use it.

    The object is one of the interpreter's mode classes (private, in ``laftr.graph``), one per mode. They
    also carry what laftr's own rules need in one mode only (the sums a site adds to while fitting, the
    random generator while sampling, the joint moment state in the closed form); those members are private.

    Attributes:
        method: the rule method the mode calls: ``forward``, ``fit``, ``sample``, ``own`` or ``moments``.
    """

    method: ClassVar[str]

    @property
    def params(self) -> Sequence[dict[str, torch.Tensor]]:
        """One parameter (and buffer) dict per stream, theta0's first."""

    @property
    def num_streams(self) -> int:
        """The number of streams (parameter dicts)."""

    def law(self, rule: Rule) -> Any:
        """The stored law of the site ``rule`` (what its :meth:`Rule.law` built): sampling, closed form."""

    def draw(self, rule: Rule, law: Any, like: torch.Tensor) -> Any:
        """Sampling only: the site's linearization for this pass's samples (leading axis the sample).

        ``law.draw(groups, generator, shared, like)``: a tensor or a tuple of tensors. A site's
        :meth:`Rule.sample` draws through here, once per pass, so that ``laftr``'s ``sample_pool`` can record
        the draw and replay it.
        """


class Rule:
    """How one node of a traced network is run and linearized in every mode.

    Subclasses override the mode methods they need; the defaults are:

    - :meth:`forward`: every stream runs the op exactly with its own parameters (a plain forward pass);
    - :meth:`fit`: the same on theta0 alone (fitting runs the real network on real data), recording nothing;
    - :meth:`sample` / :meth:`own`: refuse (a rule must say how Monte Carlo linearizes its op);
    - :meth:`moments`: refuse (no closed form).

    Attributes:
        family: a short stable name of the op family, used in signatures and messages.
        affine: the op is affine in its data input(s) given the parameters (checked by the registry test).
        site: the rule records a statistic at theta0 (gates, normalizers, max pools).
        learned_args: the names of the op's argument nodes computed from trainable parameters without the
            network input (a learned mask or attention bias), which each stream has its own of; set by
            ``laftr.graph.TracedNet`` (empty for a rule made on its own).
    """

    family: ClassVar[str] = "op"
    affine: ClassVar[bool] = False
    site: ClassVar[bool] = False
    learned_args: frozenset[str] = frozenset()

    def __init__(self, node: fx.Node, gm: fx.GraphModule) -> None:
        """The rule of ``node`` of the traced module ``gm``; reads the op's constants (:meth:`setup`)."""
        self.node = node
        self.name = node.name
        self.gm = gm
        is_module = node.op == "call_module"
        self.module: nn.Module | None = gm.get_submodule(str(node.target)) if is_module else None
        self.prefix = str(node.target) if node.op == "call_module" else ""
        self.function = out_of_place_function(node.target) if node.op == "call_function" else None
        self.method = out_of_place_method(str(node.target)) if node.op == "call_method" else None
        self.setup()

    # ------------------------------------------------------------------ construction helpers
    def setup(self) -> None:
        """Read and check the op's constant arguments (override; raise with :meth:`refuse`)."""

    def refuse(self, why: str) -> UnsupportedOpError:
        """An :class:`UnsupportedOpError` naming this node, its op and ``why`` (to be raised)."""
        return UnsupportedOpError(f"node {self.name!r} ({describe(self.node, self.gm)}) is "
                                  f"not supported: {why}")

    def const_arg(self, index: int | None, name: str, default: Any = None) -> Any:
        """The op's argument at position ``index`` or keyword ``name``, a constant.

        Positions count the data input as 0; an argument computed at run time is refused.
        """
        node = self.node
        value = self.arg_node(index, name) if name in node.kwargs or (
            index is not None and index < len(node.args)) else default
        if isinstance(value, fx.Node):
            raise self.refuse(f"argument {name!r} is computed at run time; laftr needs it to be a constant")
        return value

    def arg_node(self, index: int | None, name: str) -> Any:
        """The op's argument at position ``index`` or keyword ``name`` as traced (None when not given)."""
        node = self.node
        if name in node.kwargs:
            return node.kwargs[name]
        return node.args[index] if index is not None and index < len(node.args) else None

    def runtime_args(self, *spec: tuple[int, str]) -> dict[str, int]:
        """Of the arguments ``(position, keyword)``, those computed at run time: keyword -> position.

        A size read from a shape (``h.shape[1:]``, ``x.size(2)``) is a plain value, the same in every stream
        (:class:`laftr.rules.affine.ShapeRule`), but known only when the op runs: the rule reads it then with
        :meth:`runtime_value`, and a stored summary records it as ``"runtime"``.
        """
        found: dict[str, int] = {}
        for index, name in spec:
            nodes: list[fx.Node] = []
            fx.node.map_arg(self.arg_node(index, name), nodes.append)
            if nodes:
                found[name] = index
        return found

    def runtime_value(self, args: Any, kwargs: Any, index: int, name: str, hint: str = "") -> Any:
        """The value in this call of an argument computed at run time; refuses one computed from data values.

        ``hint`` (how to give the argument) ends the refusal.
        """
        value = kwargs.get(name, args[index] if index < len(args) else None)
        if any(p.data for p in pairs_in(value)):
            raise self.refuse(f"its {name} is computed from the data's values (not from a shape)"
                              + (f"; {hint}" if hint else ""))
        return stream_of(value, 0)  # (a size read from a parameter's shape: the same in every stream)

    def data_input(self, args: Any, kwargs: Any, first: bool = True) -> Pair:
        """The op's one data-dependent input (its first argument when ``first``); refuses any other."""
        data = data_pairs((args, kwargs))
        if len(data) != 1 or (first and args[0] is not data[0]):
            raise self.refuse("only its first argument may depend on the input "
                              "(not a bound, slope, weight or bias)" if first
                              else "expected exactly one data-dependent input")
        return data[0]

    def params(self) -> dict[str, Any]:
        """JSON-able constants of the op that a stored summary must match (override for sites)."""
        return {}

    def signature(self) -> list[Any]:
        """``[node name, family, params]``."""
        return [self.name, self.family, self.params()]

    def describe(self) -> str:
        """The node and its op, for messages."""
        return f"node {self.name!r} ({describe(self.node, self.gm)})"

    # ------------------------------------------------------------------ exact evaluation of one stream
    def call(self, params: dict[str, torch.Tensor], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """Run the op exactly on one stream's values (``args``/``kwargs`` already hold plain tensors)."""
        if "inplace" in kwargs:
            kwargs = {**kwargs, "inplace": False}
        if self.module is not None:
            return module_call(self.module, self.prefix, params, args, kwargs)
        if self.function is not None:
            return self.function(*args, **kwargs)
        assert self.method is not None
        return getattr(args[0], self.method)(*args[1:], **kwargs)

    def call_streams(self, mode: RuleMode, args: Any, kwargs: Any,
                     streams: Iterable[int] | None = None) -> tuple[Any, ...]:
        """The op run exactly in each stream (all of the mode's streams unless ``streams`` is given)."""
        idx = range(mode.num_streams) if streams is None else streams
        return tuple(self.call(mode.params[s], stream_of(args, s), stream_of(kwargs, s)) for s in idx)

    # ------------------------------------------------------------------ modes
    def forward(self, mode: RuleMode, args: Any, kwargs: Any) -> Any:
        """Every stream runs the op exactly."""
        return Pair(self.call_streams(mode, args, kwargs), True)

    def fit(self, mode: RuleMode, args: Any, kwargs: Any) -> Any:
        """theta0 alone on real data (the real network): the exact op; sites also record their statistic."""
        return self.forward(mode, args, kwargs)

    def sample(self, mode: RuleMode, args: Any, kwargs: Any) -> Any:
        """LAFTR's Monte Carlo linearization from the stored statistic."""
        raise self.refuse(f"the rule {type(self).__name__} defines no Monte Carlo linearization")

    def own(self, mode: RuleMode, args: Any, kwargs: Any) -> Any:
        """theta0's own linearization on each input (``gates="relu"``)."""
        raise self.refuse(f"the rule {type(self).__name__} defines no linearization at theta0's input")

    def native_batch_axis(self) -> int:
        """The axis of its data input along which the op expects the examples, one per entry.

        0; 1 for ``nn.MultiheadAttention`` and recurrent layers without ``batch_first``.
        """
        return 0

    def batch_layout_ok(self, layout: tuple[int, int, int]) -> bool:
        """Whether the op takes its data input with the examples laid out as ``layout``.

        ``(axis, outer, inner)``, as ``laftr.graph.LEADING``; by default one example per entry of its
        :meth:`native_batch_axis`.
        """
        return layout == (self.native_batch_axis(), 1, 1)

    def batch_movable(self, layout: tuple[int, int, int], ndim: int) -> bool:
        """Whether the op gives the same values with its data input's examples moved to a first axis.

        (``laftr.graph.to_batch_first``; ``ndim``: the input's number of axes.) Then a pass that records
        or draws per-example statistics runs it that way. True for elementwise ops and ops on trailing axes
        after the batch axis (override).
        """
        return False

    def learned(self, arg: Any) -> bool:
        """Whether ``arg`` (an argument as traced) is computed from trainable parameters alone."""
        return isinstance(arg, fx.Node) and arg.name in self.learned_args

    def sample_separable(self, mode: RuleMode) -> bool:
        """Whether :meth:`sample` computes each stream from that stream's values and parameters alone.

        The mode's draws (shared by the streams) may be used; theta0's values may serve only for shapes,
        dtypes and devices. Then theta's stream can run without theta0's on a draw whose theta0 outputs are
        known (``laftr``'s ``sample_pool`` and ``fixed_noise``), and a pass over theta's stream alone,
        with the same draws, gives the values it has in a pass over both. False (the safe default) for ops
        linearized at theta0's values (products of data, softmax, theta0's max-pool selection).
        """
        return False

    def moments(self, mode: RuleMode, args: Any, kwargs: Any) -> Any:
        """The closed-form second-moment update (laftr-exact)."""
        raise self.refuse("laftr-exact has no closed form for this op; use the Monte Carlo 'laftr' estimator")

    def matrix(self, params: dict[str, torch.Tensor], args: tuple[Any, ...], kwargs: dict[str, Any],
               ) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        """The op as ``x -> W x + b`` on a one-dimensional data input, in one stream; None if it is not one.

        An affine op may give its matrix ``W`` ``(n_out, n_in)`` and offset ``b`` ``(n_out,)`` (or None for
        zero) when they are at hand (a linear layer's weight and bias): the closed form then multiplies by
        them directly instead of running the op on the columns of the moment state. The same numbers either
        way; it is faster. ``args``/``kwargs`` hold the stream's values (data inputs as they come).
        """
        return None

    # ------------------------------------------------------------------ statistics (sites only)
    def law(self, sums: dict[str, torch.Tensor], counts: torch.Tensor, device: torch.device,
            dtype: torch.dtype) -> Any:
        """The stored statistic turned into what :meth:`sample` and :meth:`moments` use, per group."""
        raise NotImplementedError(f"{type(self).__name__} records no statistic")
