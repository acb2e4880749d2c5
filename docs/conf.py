"""Sphinx configuration: the API reference (autodoc + napoleon) and the Markdown pages (MyST).

Build with ``scripts/build_docs.sh`` (warnings are errors). Nothing here needs the internet: there is no
intersphinx, so names from torch, numpy and the standard library are not linked (``nitpick_ignore_regex``).
"""

from __future__ import annotations

import importlib
import inspect
import os
import re
import sys
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from sphinx.util import logging

if TYPE_CHECKING:
    from docutils import nodes
    from sphinx.application import Sphinx
    from sphinx.environment import BuildEnvironment

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(ROOT, "src"))  # document the source tree, installed or not

import laftr  # noqa: E402

project = "laftr"
author = "laftr contributors"
copyright = "laftr contributors"
release = laftr.__version__
version = release

#: The public modules (docs/usage.md, "Public API"); each has a page in docs/api/.
PUBLIC_MODULES = ["laftr", "laftr.continual", "laftr.influence", "laftr.rules", "laftr.errors", "laftr.models",
                  "laftr.data", "laftr.specs", "laftr.report"]

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "myst_parser",
]

source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store"]

# Every cross-reference must resolve (a broken :class:/:func: is a warning, and warnings are errors).
nitpicky = True
# Without intersphinx (the build has no internet), names outside laftr cannot be resolved: ignore exactly
# those namespaces, nothing of laftr's own.
nitpick_ignore_regex = [
    (r"py:.*", r"(torch|numpy|safetensors|tqdm)(\..*)?"),  # third-party packages
    (r"py:.*", r"(collections\.abc|typing|pathlib|os|types)\.\w+"),  # the standard library
]

# -- autodoc / napoleon --------------------------------------------------------------------------------
autodoc_default_options = {
    "members": True,
    "member-order": "bysource",
    "show-inheritance": True,
    "no-value": True,  # values of data and class attributes: long reprs with memory addresses (METRICS)
}
autodoc_typehints = "signature"
autodoc_class_signature = "mixed"
autodoc_preserve_defaults = True  # show ``metric="l2"`` as written, not a repr of the evaluated default
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_ivar = True  # "Attributes:" as fields, so dataclass fields are not described twice
napoleon_use_rtype = False

# -- MyST ----------------------------------------------------------------------------------------------
myst_enable_extensions = ["colon_fence", "deflist"]
myst_heading_anchors = 4  # the pages link to sections by their GitHub-style slugs (#which-networks)

# -- HTML ----------------------------------------------------------------------------------------------
try:
    import furo  # noqa: F401

    html_theme = "furo"
except ImportError:  # the docs extra installs furo; fall back to Sphinx's built-in theme
    html_theme = "alabaster"
html_title = f"laftr {release}"

# -- laftr-specific hooks ------------------------------------------------------------------------------
# (1) a public name without a docstring, or missing from docs/api/, is a warning; (2) module-level data
# re-exported by a public module shows the ``#:`` comment written where it is defined; (3) a reference to a
# laftr object by a private path (``laftr.io.save``) or by a name imported into the docstring's module
# resolves to where that same object is documented (``laftr.save``); (4) README.md's repository-relative
# links work from docs/index.md; (5) two rendering fixes (signature locations, ``<factory>`` defaults).
logger = logging.getLogger("laftr.docs")
_MISSING = object()
_SCALARS = (str, bytes, int, float, bool, type(None), tuple, frozenset)


def _own_doc(obj: Any) -> str | None:
    """The docstring written for ``obj`` itself (not one that a dataclass or namedtuple generates)."""
    if inspect.isclass(obj):
        doc = obj.__dict__.get("__doc__")
        generated = getattr(obj, "__dataclass_fields__", None) is not None or hasattr(obj, "_fields")
        if doc and generated and doc.startswith(obj.__name__ + "("):
            return None
        return doc
    return inspect.getdoc(obj)


def _location(obj: Any) -> str | None:
    """``path:line`` of ``obj``'s definition (repository-relative), for warnings."""
    try:
        path, line = inspect.getsourcefile(obj), inspect.getsourcelines(obj)[1]
    except (TypeError, OSError):
        return None
    return f"{os.path.relpath(path, ROOT)}:{line}" if path else None


def _holding_modules(name: str, value: Any) -> Iterator[tuple[str, Any]]:
    """``(module name, module)`` of every imported laftr module whose global ``name`` is ``value``."""
    for modname in sorted(m for m in sys.modules if m == "laftr" or m.startswith("laftr.")):
        mod = sys.modules.get(modname)
        if mod is not None and vars(mod).get(name, _MISSING) is value:
            yield modname, mod


def _data_comment(name: str, value: Any) -> list[str] | None:
    """The ``#:`` comment of module-level ``name`` bound to ``value``, from the laftr module defining it."""
    from sphinx.pycode import ModuleAnalyzer

    for modname, _mod in _holding_modules(name, value):
        try:
            analyzer = ModuleAnalyzer.for_module(modname)
            analyzer.analyze()
        except Exception:  # noqa: BLE001  (a module without source)
            continue
        comment = analyzer.attr_docs.get(("", name))
        if comment:
            return list(comment)
    return None


def _data_location(name: str, value: Any) -> str | None:
    """``path:line`` of the module-level assignment of ``name`` (bound to ``value``) in laftr's source."""
    assignment = re.compile(rf"^{re.escape(name)}\s*(:[^=]*)?=", re.MULTILINE)
    for _modname, mod in _holding_modules(name, value):
        try:
            path = inspect.getsourcefile(mod)
            with open(path or "", encoding="utf-8") as f:
                text = f.read()
        except (TypeError, OSError):
            continue
        m = assignment.search(text)
        if m:
            return f"{os.path.relpath(path, ROOT)}:{text.count(chr(10), 0, m.start()) + 1}"
    return None


def check_docstrings(app: Sphinx) -> None:
    """Warn (an error under -W) for a public name without a docstring.

    Public: every name in a public module's ``__all__`` and the public methods and properties that the laftr
    classes among them define. Module-level data is documented by a ``#:`` comment where it is defined.
    """
    for modname in PUBLIC_MODULES:
        mod = importlib.import_module(modname)
        if not (mod.__doc__ or "").strip():
            logger.warning("public module %s has no docstring", modname, location=_location(mod))
        for name in mod.__all__:
            obj = getattr(mod, name)
            if inspect.ismodule(obj) or name == "__version__":
                continue
            if not (inspect.isclass(obj) or callable(obj)):
                if not _data_comment(name, obj):
                    logger.warning("public data %s.%s has no '#:' doc comment where it is defined",
                                   modname, name, location=_data_location(name, obj))
                continue
            if not (_own_doc(obj) or "").strip():
                logger.warning("public name %s.%s has no docstring", modname, name, location=_location(obj))
            if inspect.isclass(obj) and obj.__module__.startswith("laftr"):
                _check_members(modname, name, obj)


def _check_members(modname: str, name: str, cls: type) -> None:
    """Warn for a public method or property of ``cls`` without a docstring (an inherited one counts)."""
    for attr, member in vars(cls).items():
        if attr.startswith("_"):
            continue
        if isinstance(member, property):
            func, doc, kind = member.fget, member.__doc__, "property"
        else:
            func = member.__func__ if isinstance(member, (staticmethod, classmethod)) else member
            if not inspect.isfunction(func):
                continue
            doc, kind = inspect.getdoc(getattr(cls, attr)), "method"
        if not (doc or "").strip():
            logger.warning("public %s %s.%s.%s has no docstring", kind, modname, name, attr,
                           location=_location(func))


def data_docstring(app: Sphinx, what: str, name: str, obj: Any, options: Any, lines: list[str]) -> None:
    """Module-level data: the ``#:`` comment where it is defined, never the docstring of its type.

    A public module may re-export data defined elsewhere (``laftr.continual.METHODS``); autodoc looks for the
    comment only in the module it documents, and otherwise shows ``dict``'s docstring.
    """
    if what != "data" or isinstance(obj, _SCALARS):
        return
    comment = _data_comment(name.rpartition(".")[2], obj)
    if comment:
        lines[:] = comment
    elif type(obj).__doc__ and "\n".join(lines).strip() == inspect.cleandoc(type(obj).__doc__).strip():
        lines[:] = []


def _import(dotted: str) -> Any:
    """The object at a dotted path (a module, then attributes), or ``_MISSING``."""
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for attr in parts[i:]:
            obj = getattr(obj, attr, _MISSING)
            if obj is _MISSING:
                return _MISSING
        return obj
    return _MISSING


_DOCUMENTED: dict[int, str] = {}


def _documented(env: BuildEnvironment) -> dict[int, str]:
    """id(object) -> the full name under which the reference documents it (built once all pages are read)."""
    if not _DOCUMENTED:
        for fullname, entry in env.get_domain("py").objects.items():
            if getattr(entry, "aliased", False):
                continue
            obj = _import(fullname)
            if obj is not _MISSING and not isinstance(obj, _SCALARS):
                _DOCUMENTED.setdefault(id(obj), fullname)
    return _DOCUMENTED


def check_complete(app: Sphinx, env: BuildEnvironment) -> None:
    """Warn for a name in a public module's ``__all__`` that the reference does not document.

    A re-export of an object documented under another public name counts (``laftr.DataError``).
    """
    _DOCUMENTED.clear()
    documented = _documented(env)
    objects = env.get_domain("py").objects
    for modname in PUBLIC_MODULES:
        if modname not in objects:
            logger.warning("public module %s has no page in docs/api/", modname)
        mod = importlib.import_module(modname)
        for name in mod.__all__:
            obj = getattr(mod, name)
            if f"{modname}.{name}" in objects or (not isinstance(obj, _SCALARS) and id(obj) in documented):
                continue
            logger.warning("public name %s.%s is not in the API reference (docs/api/)", modname, name)


_DOCSTRING_OF = re.compile(r"docstring of (laftr(?:\.\w+)*)")


def resolve_by_identity(
    app: Sphinx, env: BuildEnvironment, node: nodes.Element, contnode: nodes.Element
) -> nodes.Element | None:
    """Resolve a Python reference to a laftr object documented under another (public) name."""
    if node.get("refdomain") != "py":
        return None
    target = node["reftarget"].lstrip(".~")
    modname, clsname = node.get("py:module"), node.get("py:class")
    candidates = [target]
    if modname and clsname:
        candidates.append(f"{modname}.{clsname}.{target}")
    if modname:
        candidates.append(f"{modname}.{target}")
    # the module the docstring was written in (autodoc names it in the node's source: "docstring of NAME")
    source = _DOCSTRING_OF.search(node.source or "")
    if source:
        owner = _import(source.group(1))
        home = owner.__name__ if inspect.ismodule(owner) else getattr(owner, "__module__", None)
        if home:
            candidates.append(f"{home}.{target}")
    for cand in candidates:
        if not cand.startswith("laftr."):
            continue
        obj = _import(cand)
        if obj is _MISSING or isinstance(obj, _SCALARS):
            continue
        fullname = _documented(env).get(id(obj))
        if fullname:
            return env.get_domain("py").resolve_xref(env, node["refdoc"], app.builder, "obj", fullname, node,
                                                     contnode)
    return None


def locate_signature_refs(app: Sphinx, doctree: nodes.document) -> None:
    """Give references in signatures (annotations) their object's location, instead of ``<unknown>``."""
    from sphinx import addnodes

    for ref in doctree.findall(addnodes.pending_xref):
        if ref.source:
            continue
        parent = ref.parent
        while parent is not None and not parent.source:
            parent = parent.parent
        if parent is not None:
            ref.source, ref.line = parent.source, parent.line


def factory_defaults(
    app: Sphinx, what: str, name: str, obj: Any, options: Any, signature: str | None,
    return_annotation: str | None,
) -> tuple[str, str | None] | None:
    """Show a dataclass field's ``default_factory`` default as ``...`` (computed at call time).

    Python writes it ``<factory>``, which does not parse, and Sphinx then splits the signature at every
    comma (``dict[str`` / ``Any]``).
    """
    if signature and "<factory>" in signature:
        return signature.replace("<factory>", "..."), return_annotation
    return None


_MD_LINK = re.compile(r"\]\((?!#|[a-z][a-z0-9+.-]*:)([^)\s]+)\)")


def readme_links(app: Sphinx, relative_path: Any, parent_docname: str, content: list[str]) -> None:
    """Make README.md's links, relative to the repository root, work where docs/index.md includes it.

    A link to a file outside docs/ (CHANGELOG.md) becomes a download.
    """
    if os.path.basename(str(relative_path)) != "README.md":
        return
    docdir = os.path.dirname(app.env.doc2path(parent_docname))

    def fix(m: re.Match) -> str:
        target = os.path.relpath(os.path.join(ROOT, m.group(1)), docdir)
        return "](" + ("path:" if target.startswith("..") else "") + target + ")"

    content[0] = _MD_LINK.sub(fix, content[0])


def setup(app: Sphinx) -> None:
    """Connect the hooks above."""
    app.connect("builder-inited", check_docstrings)
    app.connect("autodoc-process-docstring", data_docstring, priority=400)  # before napoleon's (500)
    app.connect("env-check-consistency", check_complete)
    app.connect("missing-reference", resolve_by_identity)
    app.connect("autodoc-process-signature", factory_defaults)
    app.connect("doctree-read", locate_signature_refs)
    app.connect("include-read", readme_links)
