"""Fingerprints of a network's forward graph: does this model compute what the fitted one computed?

An estimator stores theta0's parameters, not its code. When it is later called on a model, that model is taken
to be theta0's network with other weights; a model with the same parameter names and shapes but another
forward (``h + h`` instead of ``h``) would silently give a wrong distance. So at ``fit`` the estimator keeps a
fingerprint of the traced forward graph (:func:`laftr.graph.trace`, registered modules kept as leaves), and
refuses a model whose graph differs, naming the first node that differs.

The fingerprint is a canonical description of the node list, in graph order: each node's kind (input,
parameter, function, tensor method, leaf module, output), its target (a function's qualified name, a method's
name, a parameter's qualified name, a leaf module's qualified name, class and constant attributes such as a
slope, a stride or a number of heads), and the structure of its arguments with references to other nodes
replaced by their index and constants written out. It does not depend on parameter values, dtype or device
(floating dtypes and devices baked into a graph as constants are written generically), nor on module
identity: a ``copy.deepcopy``, a float64 copy, a ``.to()`` copy and a fresh model from the same constructor
have the same fingerprint. Constant tensors that are not parameters or buffers enter by their shape only.

Its text form (what a saved estimator keeps) is ``fx1:<sha256 of the description>:<8 hex digits per node>``:
the per-node digests locate the first differing node even against a fingerprint read from a file; the
human-readable node descriptions are kept in memory only.
"""

from __future__ import annotations

import enum
import hashlib
import logging
import numbers
import re
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn

from ._util import shorten
from .errors import UnsupportedOpError
from .graph import trace

log = logging.getLogger(__name__)

__all__ = ["GraphFingerprint", "describe_difference", "graph_fingerprint", "model_fingerprint"]

#: Version tag of the canonical description; a fingerprint with another tag is not compared (:func:`parse`).
TAG = "fx1"
_NODE_DIGITS = 8

#: Leaf-module attributes that do not change what the module computes in eval mode.
IGNORED_ATTRS = frozenset({"training", "inplace", "momentum"})


@dataclass(frozen=True)
class GraphFingerprint:
    """The fingerprint of a traced forward graph.

    Attributes:
        digest: SHA-256 (hex) of the canonical description of every node.
        node_digests: the first 8 hex digits of each node's own SHA-256, in graph order.
        nodes: a short human description of each node (e.g. ``relu(linear_1)``); None for a fingerprint read
            back from its text form.
    """

    digest: str
    node_digests: tuple[str, ...]
    nodes: tuple[str, ...] | None = None

    @property
    def text(self) -> str:
        """The form stored with an estimator (and in its file)."""
        return f"{TAG}:{self.digest}:{''.join(self.node_digests)}"

    @classmethod
    def parse(cls, text: Any) -> GraphFingerprint | None:
        """The fingerprint stored as ``text``; None when it is not a fingerprint of this format version."""
        if not isinstance(text, str):
            return None
        parts = text.split(":")
        if len(parts) != 3 or parts[0] != TAG or len(parts[1]) != 64 or len(parts[2]) % _NODE_DIGITS:
            return None
        nodes = parts[2]
        return cls(parts[1], tuple(nodes[i : i + _NODE_DIGITS] for i in range(0, len(nodes), _NODE_DIGITS)))


# --------------------------------------------------------------------------------------------- canonical form
def _function_name(f: Any) -> str:
    module = getattr(f, "__module__", None) or ""
    name = getattr(f, "__name__", None) or type(f).__name__
    return f"{module}.{name}" if module else name


def _dtype(d: torch.dtype) -> str:
    if d.is_floating_point:
        return "<float dtype>"
    if d.is_complex:
        return "<complex dtype>"
    return str(d)


_FOLDED = re.compile(r"_tensor_constant\d+")


def _const(v: Any, index: dict[fx.Node, int] | None) -> str:
    """A canonical text of an argument: nodes by index (or name, for messages), constants written out."""
    if isinstance(v, fx.Node):
        return f"%{index[v]}" if index is not None else v.name
    if v is None or isinstance(v, (bool, str)):
        return repr(v)
    if isinstance(v, numbers.Integral):
        return repr(int(v))
    if isinstance(v, numbers.Real):
        return repr(float(v))
    if isinstance(v, numbers.Complex):
        return repr(complex(v))
    if isinstance(v, torch.Size):
        return f"Size{tuple(int(s) for s in v)!r}"
    if isinstance(v, tuple):
        return "(" + ", ".join(_const(a, index) for a in v) + ("," if len(v) == 1 else "") + ")"
    if isinstance(v, list):
        return "[" + ", ".join(_const(a, index) for a in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{_const(k, index)}: {_const(a, index)}"
                               for k, a in sorted(v.items(), key=lambda kv: repr(kv[0]))) + "}"
    if isinstance(v, slice):
        return f"{_const(v.start, index)}:{_const(v.stop, index)}:{_const(v.step, index)}"
    if v is Ellipsis:
        return "..."
    if isinstance(v, torch.dtype):
        return _dtype(v)
    if isinstance(v, torch.device):
        return "<device>"
    if isinstance(v, (torch.memory_format, torch.layout, enum.Enum)):
        return str(v)
    if isinstance(v, torch.Tensor):
        return f"tensor{tuple(v.shape)!r}"
    if callable(v):
        return _function_name(v)
    return f"<{type(v).__module__}.{type(v).__qualname__}>"  # never a repr: it may hold an address


def _module_attrs(mod: nn.Module) -> str:
    """A leaf module's constant configuration.

    Its public attributes that are numbers, strings, tuples of them, or tensors (by shape); parameters,
    buffers and submodules are not attributes.
    """
    items = []
    for k, v in sorted(vars(mod).items()):
        if k.startswith("_") or k in IGNORED_ATTRS:
            continue
        if v is None or isinstance(v, (numbers.Number, str, tuple, list, torch.Size, torch.Tensor,
                                       enum.Enum)):
            items.append(f"{k}={_const(v, {})}")
    return ", ".join(items)


def _canonical(node: fx.Node, gm: fx.GraphModule, index: dict[fx.Node, int], params: set[str]) -> str:
    args = _const(tuple(node.args), index)
    kwargs = _const(dict(node.kwargs), index)
    target = node.target
    if node.op == "placeholder":
        what = "input"  # the argument's name does not matter, its default value does
    elif node.op == "get_attr":
        t = str(target)
        if t in params and not _FOLDED.fullmatch(t):
            what = f"param {t}"
        else:
            try:
                obj: Any = gm
                for part in t.split("."):
                    obj = getattr(obj, part)
            except AttributeError:
                obj = None
            # torch.fx numbers the tensors it folds at trace time (``_tensor_constant3``) across traces: the
            # number is not part of the function
            name = "<folded>" if _FOLDED.fullmatch(t) else t
            what = f"constant {name} {_const(obj, {})}"
    elif node.op == "call_function":
        what = f"function {_function_name(target)}"
    elif node.op == "call_method":
        what = f"method {target}"
    elif node.op == "call_module":
        mod = gm.get_submodule(str(target))
        cls = type(mod)
        what = f"module {target} {cls.__module__}.{cls.__qualname__}({_module_attrs(mod)})"
    else:
        what = node.op
    return f"{node.op}|{what}|{args}|{kwargs}"


def _short(v: str) -> str:
    return shorten(v, 60)


def _human(node: fx.Node, gm: fx.GraphModule) -> str:
    """A short description for messages: ``relu(linear_1)``, ``fc[Linear](relu)``, ``relu.sum(dim=0)``."""
    args = [_const(a, None) for a in node.args] + [f"{k}={_const(v, None)}" for k, v in node.kwargs.items()]
    if node.op == "call_function":
        return _short(f"{getattr(node.target, '__name__', node.target)}({', '.join(args)})")
    if node.op == "call_method":
        return _short(f"{args[0] if args else ''}.{node.target}({', '.join(args[1:])})")
    if node.op == "call_module":
        mod = gm.get_submodule(str(node.target))
        return _short(f"{node.target}[{type(mod).__name__}]({', '.join(args)})")
    if node.op == "get_attr":
        return f"self.{node.target}"
    if node.op == "placeholder":
        return f"input {node.name}"
    return _short(f"{node.op}({', '.join(args)})")


def graph_fingerprint(gm: fx.GraphModule) -> GraphFingerprint:
    """The fingerprint of a traced graph (see the module docstring)."""
    nodes = list(gm.graph.nodes)
    index = {n: i for i, n in enumerate(nodes)}
    params = {n for n, _ in gm.named_parameters()} | {n for n, _ in gm.named_buffers()}
    whole = hashlib.sha256()
    digests = []
    for n in nodes:
        text = _canonical(n, gm, index, params).encode()
        whole.update(len(text).to_bytes(8, "little") + text)
        digests.append(hashlib.sha256(text).hexdigest()[:_NODE_DIGITS])
    return GraphFingerprint(whole.hexdigest(), tuple(digests), tuple(_human(n, gm) for n in nodes))


def model_fingerprint(model: nn.Module) -> tuple[GraphFingerprint | None, fx.GraphModule | None, str]:
    """Trace ``model`` (in eval mode, as laftr evaluates it) and fingerprint its graph.

    Returns:
        ``(fingerprint, graph module, "")``, or ``(None, None, reason)`` when torch.fx cannot trace the model.
    """
    try:
        gm = trace(model)
    except UnsupportedOpError as e:
        return None, None, str(e)
    return graph_fingerprint(gm), gm, ""


def describe_difference(fitted: GraphFingerprint, got: GraphFingerprint) -> str | None:
    """None when both fingerprints are equal, else a sentence naming the first node that differs."""
    if fitted.digest == got.digest:
        return None
    a, b = fitted.node_digests, got.node_digests
    i = next((j for j in range(min(len(a), len(b))) if a[j] != b[j]), min(len(a), len(b)))

    def at(fp: GraphFingerprint, j: int, who: str) -> str:
        if j >= len(fp.node_digests):
            return f"{who} has no node {j} (it has {len(fp.node_digests)})"
        if fp.nodes is None:
            return f"{who} another op (the fitted graph's node descriptions are not stored in the file)"
        return f"{who} `{fp.nodes[j]}`"

    if i == len(a) == len(b):  # node digests agree, the whole does not (a node's hash collision): no name
        return "the model's forward differs from the fitted one"
    where = f"the model's forward differs from the fitted one at node {i}: {at(fitted, i, 'fitted')}, " \
            f"{at(got, i, 'this model')}"
    if fitted.nodes is not None and got.nodes is not None and i < min(len(a), len(b)) \
            and fitted.nodes[i] == got.nodes[i]:
        where += " (the same op with other constant settings: a module's slope, stride, number of heads, ...)"
    return where
