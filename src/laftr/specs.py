"""The one estimator-spec grammar: ``name[key=value,...]``, shared by every command that names methods.

A *spec* is a name with optional overrides in brackets, e.g. ``laftr[num_samples=100,input_model=diag]``:

- ``laftr continual --methods``: a method of :data:`laftr.continual.METHODS` with overrides of its estimator's
  config and of the method keys (``lam``, ``tasks_per_step``, ``match_memory``);
- ``laftr influence --methods``: ``pbrf-<spec>``, e.g. ``pbrf-laftr[num_samples=200]``;
- ``laftr fsd-bench --methods``: a named row (``laftr-diag``) or any registered estimator's spec; every row of
  the benchmark is itself defined by a spec.

Values are read by :func:`parse_value`: ``None``/``null``, ``true``/``false`` (any case), Python literals
(numbers, quoted strings, lists, tuples) and otherwise the bare text as a string. Commas inside brackets or
parentheses belong to the value (``hidden=[50,50]``). Lists of specs are comma-separated; commas inside a
spec's brackets belong to its overrides (:func:`split_specs`). A key may appear once per spec.

Every malformed spec raises :class:`laftr.errors.UsageError` quoting the offending text, and
:func:`check_keys` raises :class:`laftr.errors.OptionError` naming an unknown key and listing the valid ones.
"""

from __future__ import annotations

import ast
import dataclasses
from collections.abc import Iterable, Mapping
from typing import Any

from .errors import OptionError, UsageError

__all__ = ["Spec", "check_keys", "config_keys", "format_spec", "format_value", "parse_spec", "parse_value",
           "split_specs"]

_OPEN = {"[": "]", "(": ")", "{": "}"}
_CLOSE = {v: k for k, v in _OPEN.items()}
_NAME_FORBIDDEN = set("[](){},=")

Overrides = tuple[tuple[str, Any], ...]


@dataclasses.dataclass(frozen=True)
class Spec:
    """A parsed spec: a base name and its overrides, in the order given.

    Attributes:
        base: the name before the brackets (``laftr`` in ``laftr[num_samples=100]``).
        overrides: ``(key, value)`` pairs, in the order given, each key once.
    """

    base: str
    overrides: Overrides = ()

    @property
    def text(self) -> str:
        """The canonical form ``base[k=v,...]`` (just ``base`` without overrides); keys in the given order."""
        return format_spec(self.base, self.overrides)

    @property
    def options(self) -> dict[str, Any]:
        """The overrides as a dict (insertion-ordered)."""
        return dict(self.overrides)

    def keys(self) -> list[str]:
        """The override keys, in order."""
        return [k for k, _ in self.overrides]

    def __str__(self) -> str:
        """The canonical text."""
        return self.text


def parse_value(text: str) -> Any:
    """One override value: ``None``/``null``, ``true``/``false``, a Python literal, else the text itself."""
    text = text.strip()
    if text.lower() in ("none", "null"):
        return None
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return text


def format_value(value: Any) -> str:
    """The text of a value that :func:`parse_value` reads back as ``value``.

    Strings are written bare when that reads back the same (``gaussian``), else quoted (``'None'``); None is
    written ``none``, as the docs write it (``laftr[gates=none]``).
    """
    if value is None:
        return "none"
    if isinstance(value, str):
        bare = value.strip() == value and value and not (set(value) & _NAME_FORBIDDEN)
        if bare and parse_value(value) == value:
            return value
        return repr(value)
    return repr(value)


def format_spec(base: str, overrides: Mapping[str, Any] | Iterable[tuple[str, Any]] = ()) -> str:
    """``format_spec("laftr", {"num_samples": 100})`` -> ``"laftr[num_samples=100]"`` (keys in order)."""
    items = list(overrides.items() if isinstance(overrides, Mapping) else overrides)
    if not items:
        return base
    return f"{base}[{','.join(f'{k}={format_value(v)}' for k, v in items)}]"


def _split_top(text: str) -> tuple[list[str], str | None]:
    """Split ``text`` on commas outside any bracket pair (and outside quotes).

    Returns the parts and None, or the parts so far and what is unbalanced (``"'[' is not closed"``).
    """
    parts: list[str] = []
    stack: list[str] = []
    cur: list[str] = []
    quote: str | None = None
    for ch in text:
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in _OPEN:
            stack.append(ch)
        elif ch in _CLOSE:
            if not stack or stack[-1] != _CLOSE[ch]:
                return parts, f"unexpected {ch!r}"
            stack.pop()
        elif ch == "," and not stack:
            parts.append("".join(cur))
            cur = []
            continue
        cur.append(ch)
    if quote:
        return parts, f"the quote {quote} is not closed"
    if stack:
        return parts, f"{stack[-1]!r} is not closed"
    parts.append("".join(cur))
    return parts, None


def split_specs(text: str, what: str = "spec list") -> list[str]:
    """``"none,laftr[lam=10,num_samples=100]"`` -> ``["none", "laftr[lam=10,num_samples=100]"]``.

    Commas inside brackets belong to the overrides; items are stripped and empty items dropped.

    Raises:
        UsageError: unbalanced brackets (the message quotes ``text``).
    """
    parts, problem = _split_top(text)
    if problem:
        raise UsageError(f"unbalanced brackets in {what} {text!r}: {problem}")
    return [p.strip() for p in parts if p.strip()]


def parse_spec(text: str, what: str = "spec") -> Spec:
    """``"laftr[lam=10,num_samples=100]"`` -> ``Spec("laftr", (("lam", 10), ("num_samples", 100)))``.

    Args:
        text: ``name`` or ``name[key=value,...]`` (whitespace around the parts is ignored).
        what: what the text is, for error messages (``method``, ``spec``, ...).

    Raises:
        UsageError: an empty name, unbalanced brackets, text after the closing bracket, an item without
            ``=``, an empty key or value, or a key given twice; the message quotes the offending part.
    """
    if not isinstance(text, str):
        raise UsageError(f"a {what} must be a string, got {type(text).__name__}")
    text = text.strip()
    base, bracket, rest = text.partition("[")
    base = base.strip()
    if not base:
        raise UsageError(f"malformed {what} {text!r}: expected name[key=value,...] (the name is empty)")
    bad = sorted(set(base) & _NAME_FORBIDDEN)
    if bad:
        raise UsageError(f"malformed {what} {text!r}: unbalanced brackets or a stray {bad[0]!r} in the name "
                         f"{base!r}; expected name[key=value,...]")
    if not bracket:
        return Spec(base)
    if not rest.rstrip().endswith("]"):
        _, problem = _split_top("[" + rest)  # say where: unbalanced brackets, or text after the closing one
        if problem:
            raise UsageError(f"malformed {what} {text!r}: unbalanced brackets ({problem}); "
                             "expected name[key=value,...]")
        raise UsageError(f"malformed {what} {text!r}: text after the closing bracket; "
                         "expected name[key=value,...]")
    inner = rest.rstrip()[:-1]
    items, problem = _split_top(inner)
    if problem:
        raise UsageError(f"malformed {what} {text!r}: unbalanced brackets ({problem}); "
                         "expected name[key=value,...]")
    overrides: list[tuple[str, Any]] = []
    for item in items:
        item = item.strip()
        if not item:
            continue
        key, eq, raw = item.partition("=")
        key = key.strip()
        if not eq:
            raise UsageError(f"malformed override {item!r} in {text!r}: expected key=value")
        if not key or set(key) & _NAME_FORBIDDEN or any(c.isspace() for c in key):
            raise UsageError(f"malformed override {item!r} in {text!r}: bad key {key!r}")
        if not raw.strip():
            raise UsageError(f"malformed override {item!r} in {text!r}: no value for {key!r}")
        if any(k == key for k, _ in overrides):
            raise UsageError(f"key {key!r} given twice in {text!r}")
        overrides.append((key, parse_value(raw)))
    return Spec(base, tuple(overrides))


def config_keys(config: type) -> list[str]:
    """The field names of a config dataclass (e.g. an estimator's ``Config``)."""
    return [f.name for f in dataclasses.fields(config)]


def check_keys(spec: Spec, valid: Iterable[str], who: str | None = None,
               reserved: Mapping[str, str] | None = None) -> None:
    """Raise :class:`laftr.errors.OptionError` naming the first override key not in ``valid``.

    Args:
        spec: the parsed spec.
        valid: the keys its target accepts (a config's fields, plus any method-level keys).
        who: the target in the message (default ``spec.base``).
        reserved: keys that ``valid`` has but the caller sets itself, with the reason
            (e.g. ``{"metric": "it is the loss's Bregman divergence"}``); they are refused too.
    """
    valid = list(valid)
    reserved = dict(reserved or {})
    who = who or repr(spec.base)
    for key in spec.keys():
        if key in reserved:
            raise OptionError(f"{who} in {spec.text!r}: do not set {key!r} ({reserved[key]})")
        if key not in valid:
            choices = ", ".join(k for k in valid if k not in reserved)
            raise OptionError(f"{who} has no option {key!r} (in {spec.text!r}); valid keys: {choices}")

