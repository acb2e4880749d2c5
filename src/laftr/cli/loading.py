"""Reading what a user names on the command line: a network, its weights, tensors of data.

Nothing here unpickles arbitrary objects unless asked to: model, weights and tensor files are read with
``torch.load(weights_only=True)`` (tensors and plain containers only) or as safetensors. A file holding a
whole pickled module (``torch.save(model, "net.pt")``) can run any code when it is loaded, so it is read only
with ``trust_pickle=True`` (``--trust-pickle``); the safe way to name a network is ``package.module:factory``
(a callable returning the module, imported from the current folder or the environment, i.e. your own code)
plus ``--weights`` (a state dict saved with ``torch.save(model.state_dict(), ...)`` or a safetensors file).

Every refusal is a :class:`laftr.LaftrError` that names the file and says what to do instead.
"""

from __future__ import annotations

import ast
import contextlib
import importlib
import importlib.util
import inspect
import logging
import os
import pickle
import re
import sys
import traceback
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .._util import data_hint, first_layer, is_shape_error, layer_expects
from ..errors import DataError, InputFileError, LaftrError, UntrustedPickleError, UsageError

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    from ..estimators import FSDEstimator

#: Suffixes taken as a file name even when no such file exists (so a typo reads "no model file at ...").
MODEL_FILE_SUFFIXES = (".pt", ".pth", ".pkl", ".bin", ".safetensors")

_SAFE_SAVE_HINT = ("save the weights instead (torch.save(model.state_dict(), 'weights.pt') or safetensors) "
                   "and pass --model package.module:factory --weights weights.pt")


# ---------------------------------------------------------------------------------------------- files
def _existing_file(path: str | Path, what: str) -> Path:
    p = Path(path)
    if p.is_dir():
        raise InputFileError(f"{p} is a folder, not a {what}")
    if not p.is_file():
        raise InputFileError(f"no {what} at {p}")
    if p.stat().st_size == 0:
        raise InputFileError(f"{p} is empty; a {what} is expected")
    return p


def _is_safetensors(path: Path) -> bool:
    """Whether ``path`` starts like a safetensors file: an 8-byte header length, then a JSON object."""
    try:
        with path.open("rb") as f:
            head = f.read(9)
            size = path.stat().st_size
    except OSError:
        return False
    if len(head) < 9:
        return False
    n = int.from_bytes(head[:8], "little")
    return 0 < n <= size - 8 and head[8:9] == b"{"


def _read_safetensors(path: Path, what: str) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as e:
        raise InputFileError(f"{path} is not a readable safetensors {what}: {e}") from e


def _torch_load_safe(path: Path, what: str, refused: str) -> Any:
    """``torch.load(path, weights_only=True)``; an unreadable file or a pickle of other objects is refused.

    Args:
        path: The user's file.
        what: What the file should be ("weights file"), for messages.
        refused: Said when the file is a pickle of objects other than tensors (what to do instead).
    """
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols of files it reads or refuses
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:  # the restricted unpickler met a global or opcode it does not allow
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        if not found and not _looks_pickled(path):  # torch says the same of any non-pickle bytes
            raise InputFileError(f"{path} is not a file written by torch.save; a {what} is expected") from e
        names = f" (it names {found.group(1)})" if found else ""
        raise UntrustedPickleError(
            f"{path} is a pickle of Python objects{names}, not only tensors: unpickling it can run code "
            f"stored in the file, so it is not loaded as a {what}. {refused}") from e
    except MemoryError:
        raise
    except Exception as e:  # whatever torch.load says of a user's file: it is not readable
        if _out_of_memory(e):
            raise
        detail = f"{type(e).__name__}: {str(e).strip()}" if str(e).strip() else type(e).__name__
        raise InputFileError(f"{path} is not a file written by torch.save ({detail.splitlines()[0]}); a "
                             f"{what} is expected") from e


def _looks_pickled(path: Path) -> bool:
    """Whether ``path`` starts like a torch.save archive (zip) or a pickle of protocol 2 or later."""
    try:
        with path.open("rb") as f:
            head = f.read(4)
    except OSError:
        return False
    return head.startswith((b"PK\x03\x04", b"\x80"))


def _out_of_memory(e: BaseException) -> bool:
    """Whether ``e`` is torch running out of memory (not a problem of the file: it keeps its traceback)."""
    text = str(e).lower()
    return isinstance(e, RuntimeError) and ("out of memory" in text or "can't allocate" in text)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, dict) and all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                         for k, v in obj.items())


def read_summary(path: str | Path, device: torch.device | None = None) -> FSDEstimator:
    """:func:`laftr.load` onto ``device`` (default: CPU); an unreadable file is an :class:`InputFileError`.

    Raises:
        InputFileError: no such file, or the operating system cannot read it.
        SummaryFileError: the file is not a readable laftr summary.
    """
    from ..io import load

    p = _existing_file(path, "summary file")
    try:
        return load(p, device)
    except OSError as e:  # permissions, a file that vanished meanwhile
        raise InputFileError(f"{p} could not be read: {e}") from e


# ---------------------------------------------------------------------------------------------- model
def names_a_model_file(spec: str) -> bool:
    """Whether ``--model spec`` names a file holding a whole module (else ``package.module:factory``)."""
    path = Path(spec)
    return path.is_file() or path.suffix.lower() in MODEL_FILE_SUFFIXES


def load_model(spec: str, weights: str | None = None, *, trust_pickle: bool = False) -> nn.Module:
    """The network named by ``spec``, in eval mode.

    Args:
        spec: ``package.module:factory`` (a callable returning the module, or a module object), or a file
            holding a whole pickled module (read only with ``trust_pickle``).
        weights: A state dict to load into the module: a ``torch.save(model.state_dict())`` file or a
            safetensors file.
        trust_pickle: Unpickle a module file (runs code from the file: only for files you trust).

    Raises:
        InputFileError: a missing or unreadable file, a state dict where a module was expected, weights that
            do not fit the module.
        UntrustedPickleError: ``spec`` is a pickled module and ``trust_pickle`` is False.
        UsageError: ``spec`` is neither a file nor an importable ``package.module:factory``.
    """
    path = Path(spec)
    if names_a_model_file(spec):
        model = _module_from_file(_existing_file(path, "model file"), trust_pickle)
    elif ":" in spec:
        model = _module_from_factory(spec)
    else:
        raise UsageError(f"--model {spec!r} is neither a file nor package.module:factory")
    if not isinstance(model, nn.Module):
        raise UsageError(f"--model {spec} gave a {type(model).__name__}, not a torch.nn.Module")
    if weights is not None:
        wpath = _existing_file(weights, "weights file")
        state = _unwrapped(load_weights(wpath), model, wpath)
        try:
            model.load_state_dict(state)
        except RuntimeError as e:  # missing / unexpected keys, shape mismatches
            raise InputFileError(f"the weights in {wpath} do not fit {spec}: {e}") from e
    return model.eval()


#: prefixes a wrapper puts before every parameter name of a state dict it saves
_WRAPPER_PREFIXES = {"module.": "nn.DataParallel / DistributedDataParallel", "_orig_mod.": "torch.compile"}


def _unwrapped(state: Any, model: nn.Module, path: Path) -> Any:
    """``state`` without the prefix a wrapper gave every name, where the network has none; else as it is.

    ``module.`` of ``nn.DataParallel`` / ``DistributedDataParallel``, ``_orig_mod.`` of ``torch.compile``:
    stripped where the network's own names are found after it.
    """
    if not isinstance(state, dict) or not state:
        return state
    own = set(model.state_dict())
    for prefix, wrapper in _WRAPPER_PREFIXES.items():
        if all(isinstance(k, str) and k.startswith(prefix) for k in state) and not any(
                k.startswith(prefix) for k in own):
            stripped = {k[len(prefix):]: v for k, v in state.items()}
            if set(stripped) == own:
                log.warning("%s: the weights were saved from a %s wrapper (every name starts with %r): read "
                            "without the prefix", path, wrapper, prefix)
                return stripped
    return state


def _module_from_file(path: Path, trust_pickle: bool) -> Any:
    if _is_safetensors(path):
        raise InputFileError(f"{path} is a safetensors file: it holds weights, not a network; name the "
                             "network with --model package.module:factory and pass this file with --weights")
    if not trust_pickle:
        obj = _torch_load_safe(
            path, "model file",
            f"If it is a whole module saved with torch.save(model, ...), {_SAFE_SAVE_HINT}; or, "
            "only if you made this file or trust where it comes from, pass --trust-pickle")
    else:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=False)
        except MemoryError:
            raise
        except Exception as e:  # a user's pickle that does not load (missing classes, corrupt)
            if _out_of_memory(e):
                raise
            raise InputFileError(f"could not unpickle a model from {path}: {type(e).__name__}: "
                                 f"{_first_line(e)} "
                                 "(a pickled module needs its classes importable, from the same folder or "
                                 "package as when it was saved)") from e
    if isinstance(obj, dict):
        raise InputFileError(f"{path} holds a state dict, not a module: name the architecture as "
                             "package.module:factory and pass this file with --weights")
    if not isinstance(obj, nn.Module):
        raise InputFileError(f"{path} holds a {type(obj).__name__}, not a torch.nn.Module")
    return obj


def _module_from_factory(spec: str) -> Any:
    mod_name, _, attr = spec.rpartition(":")
    if not mod_name or not attr:
        raise UsageError(f"--model {spec!r}: expected package.module:factory (or path/to/file.py:factory)")
    if mod_name.endswith(".py") or "/" in mod_name or os.sep in mod_name:
        module = _module_from_source(Path(mod_name), spec)
        return _call_factory(module, mod_name, attr, spec)
    # the working folder on the path for the user's module and its factory only: left there, a file in it
    # named like a package laftr imports later (safetensors.py) would be run in its place
    cwd = str(Path.cwd())
    added = cwd not in sys.path
    if added:
        sys.path.insert(0, cwd)
    try:
        try:
            with _user_code(spec, f"importing {mod_name}"):
                module = importlib.import_module(mod_name)
        except UsageError as e:
            if isinstance(e.__cause__, ImportError) and not isinstance(e.__cause__, SyntaxError):
                raise UsageError(f"cannot import {spec!r}: {e.__cause__}") from e.__cause__
            raise
        return _call_factory(module, mod_name, attr, spec)
    finally:
        if added and cwd in sys.path:
            sys.path.remove(cwd)


def _call_factory(module: Any, mod_name: str, attr: str, spec: str) -> Any:
    """``module.attr()``, or ``module.attr`` itself where it is a module (or not callable)."""
    try:
        factory = getattr(module, attr)
    except AttributeError as e:
        raise UsageError(f"cannot import {spec!r}: module {mod_name!r} has no attribute {attr!r}") from e
    if isinstance(factory, nn.Module) or not callable(factory):
        return factory
    try:
        needed = [p.name for p in inspect.signature(factory, follow_wrapped=False).parameters.values()
                  if p.default is p.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD,
                                                         p.KEYWORD_ONLY)]
    except (TypeError, ValueError):  # no signature to read (a builtin): called as it is
        needed = []
    if needed:
        raise UsageError(f"--model {spec}: the factory is called with no arguments, and {attr} needs "
                         f"{', '.join(needed)}; name a function that builds the network with your settings "
                         f"(def make(): return {attr}(...) in your module, or functools.partial)")
    with _user_code(spec, f"calling {attr}()"):
        return factory()


@contextlib.contextmanager
def _user_code(spec: str, doing: str) -> Iterator[None]:
    """Report an exception raised by the user's own ``--model`` code as a usage error naming where it arose.

    The user's module or factory failed (a syntax error, a missing file it reads, a bug): laftr did not, so
    the error names the file and line in the user's code instead of asking for an internal error report.
    """
    try:
        yield
    except (KeyboardInterrupt, MemoryError, LaftrError):
        raise
    except Exception as e:
        what, where = _first_line(e), ""
        if isinstance(e, SyntaxError):
            what, where = str(e.msg), f" ({e.filename}, line {e.lineno})"
        elif e.__traceback__ is not None:
            last = traceback.extract_tb(e.__traceback__)[-1]
            where = f" ({last.filename}, line {last.lineno}, in {last.name})"
        raise UsageError(f"--model {spec}: {doing} raised {type(e).__name__}: {what}{where}") from e


def _module_from_source(path: Path, spec: str) -> Any:
    """The Python file ``path`` named in ``--model path/to/file.py:factory``, run as a module.

    The user names the file to run, as with ``package.module:factory``; its folder goes on ``sys.path`` so
    that the file's own imports of its neighbours work.
    """
    if path.suffix != ".py":
        raise UsageError(f"--model {spec!r}: a path before ':' must be a Python file ending in .py")
    if not path.is_file():
        raise UsageError(f"--model {spec!r}: no Python file {path}")
    folder = str(path.resolve().parent)
    if folder not in sys.path:
        sys.path.insert(0, folder)
    name = f"_laftr_model_{path.stem}"
    loader_spec = importlib.util.spec_from_file_location(name, path)
    if loader_spec is None or loader_spec.loader is None:
        raise UsageError(f"--model {spec!r}: cannot load {path} as a Python module")
    module = importlib.util.module_from_spec(loader_spec)
    sys.modules[name] = module  # dataclasses and pickling look the module up by name
    try:
        with _user_code(spec, f"running {path}"):
            loader_spec.loader.exec_module(module)
    except UsageError:
        del sys.modules[name]
        raise
    return module


def load_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from a safetensors file or a ``torch.save(model.state_dict())`` file (never unpickled).

    Raises:
        InputFileError: missing or unreadable file, or not a ``{name: tensor}`` dict.
        UntrustedPickleError: the file pickles other objects (e.g. a whole module).
    """
    p = _existing_file(path, "weights file")
    if _is_safetensors(p):
        state: Any = _read_safetensors(p, "weights file")
    else:
        state = _torch_load_safe(
            p, "weights file", "--weights takes a state dict: save one with torch.save(model.state_dict(), "
            "'weights.pt') or as a safetensors file")
    if not _is_state_dict(state):
        kind = type(state).__name__
        raise InputFileError(f"{p} holds a {kind}, not a state dict ({{name: tensor}}, as model.state_dict() "
                             "gives): --weights takes a state dict")
    return state


# ---------------------------------------------------------------------------------------------- data
def load_tensors(path: str | Path) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Inputs, and labels when given, from a ``.pt`` file of tensors.

    The file holds a tensor, an ``(inputs, labels)`` pair or a dict naming them (``{"x": ..., "y": ...}``,
    ``{"inputs": ..., "labels": ...}``, ...: :data:`_DATA_KEYS`).

    Raises:
        InputFileError: missing, unreadable or of the wrong content.
        UntrustedPickleError: the file pickles objects other than tensors.
    """
    p = _existing_file(path, "tensor file")
    obj = _torch_load_safe(p, "tensor file", "--tensors takes a tensor of inputs or an (inputs, labels) pair "
                           "of tensors saved with torch.save")
    if isinstance(obj, torch.Tensor):
        return obj, None
    if isinstance(obj, (tuple, list)) and len(obj) == 2 and all(isinstance(t, torch.Tensor) for t in obj):
        return obj[0], obj[1]
    if isinstance(obj, dict):
        return _tensors_by_name(obj, p)
    raise InputFileError(f"{p} must hold a tensor of inputs or an (inputs, labels) pair, not a "
                         f"{type(obj).__name__}")


#: The key pairs a dict of tensors may use for its inputs and labels (labels optional).
_DATA_KEYS = (("x", "y"), ("X", "Y"), ("inputs", "labels"), ("inputs", "targets"), ("data", "targets"),
              ("input_ids", "labels"))


def _tensors_by_name(obj: dict[Any, Any], p: Path) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Inputs and labels from a dict under one of the :data:`_DATA_KEYS` pairs; anything else is refused."""
    for xk, yk in _DATA_KEYS:
        if xk in obj and set(obj) <= {xk, yk}:
            x, y = obj[xk], obj.get(yk)
            if not isinstance(x, torch.Tensor) or not (y is None or isinstance(y, torch.Tensor)):
                raise InputFileError(f"{p}: {xk!r} and {yk!r} must be tensors")
            return x, y
    pairs = ", ".join(f"{xk!r} (and {yk!r})" for xk, yk in _DATA_KEYS)
    raise InputFileError(f"{p} holds a dict with keys {sorted(map(str, obj))}: a dict of tensors must name "
                         f"its inputs and labels by one of {pairs}, and nothing else")


def load_data(dataset: str | None, data_dir: str | None, classes: list[int] | None, tensors: str | None,
              split: str = "train", limit: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Inputs (and labels when known) from a named data set or a ``.pt`` file of tensors.

    Inputs stored as bytes (``uint8``, e.g. images) become float; other integer inputs are token ids and stay
    integer (a transformer's embedding needs them so; use ``input_model=tokens``).

    Raises:
        UsageError: not exactly one of ``dataset`` and ``tensors``; ``classes`` without labels; ``limit`` < 1.
        DataError: an unknown or unreadable data set, no examples left, labels that do not match the inputs.
        InputFileError: an unreadable tensor file.
    """
    if (dataset is None) == (tensors is None):
        raise UsageError("give exactly one of --dataset and --tensors")
    if limit is not None and limit < 1:
        raise UsageError(f"--limit must be a positive integer, got {limit}")
    if tensors is not None:
        x, y = load_tensors(tensors)
        source = str(tensors)
    else:
        from ..data import load_dataset

        assert dataset is not None  # exactly one of dataset and tensors, checked above
        try:
            ds = load_dataset(dataset, data_dir)
        except LaftrError:
            raise
        except ValueError as e:  # an unknown name, or corrupt files (DatasetNotFoundError: missing ones)
            raise DataError(f"--dataset {dataset}: {e}") from e
        x, y = (ds.x_train, ds.y_train) if split == "train" else (ds.x_test, ds.y_test)
        source = f"--dataset {dataset}"
    if x.dim() == 0 or len(x) == 0:
        raise DataError(f"{source} holds no examples (inputs of shape {list(x.shape)})")
    if y is not None and len(y) != len(x):
        raise DataError(f"{source}: {len(x)} inputs but {len(y)} labels")
    if classes is not None:
        if y is None:
            raise UsageError("--classes needs labels: save an (inputs, labels) pair")
        keep = torch.isin(y, torch.tensor(classes, dtype=y.dtype))
        if not keep.any():
            raise DataError(f"{source} has no examples of classes {classes}")
        present = set(torch.unique(y[keep]).tolist())
        missing = [c for c in classes if c not in present]
        if missing:  # (--classes 0,1,22 for 0,1,2 fitted classes 0 and 1 alone, silently)
            raise DataError(f"{source} has no examples of class{'es' if len(missing) > 1 else ''} "
                            f"{', '.join(map(str, missing))} of --classes {','.join(map(str, classes))} (its "
                            f"labels run from {int(y.min())} to {int(y.max())})")
        x, y = x[keep], y[keep]
    if limit is not None:
        x, y = x[:limit], (None if y is None else y[:limit])
    if x.dtype == torch.uint8:
        x = x.float()
    return x, y


def parse_options(items: list[str] | None) -> dict[str, Any]:
    """``["num_samples=64", "input_model=diag"]`` -> ``{"num_samples": 64, "input_model": "diag"}``."""
    out: dict[str, Any] = {}
    for item in items or []:
        if "=" not in item:
            raise UsageError(f"--set {item!r} is not key=value")
        k, v = item.split("=", 1)
        try:
            out[k.strip()] = ast.literal_eval(v.strip())
        except (ValueError, SyntaxError):
            out[k.strip()] = v.strip()
    return out


# ---------------------------------------------------------------------------------------------- model vs data
def check_model_accepts(model: nn.Module, x: torch.Tensor, spec: str = "the model",
                        outputs: list[int] | None = None) -> None:
    """Run ``model`` on two examples of ``x``; a shape or dtype mismatch becomes a clear :class:`DataError`.

    The message names the data's per-example shape and dtype, the first layer and what it expects, and
    suggests ``nn.Flatten()`` for images fed to a ``Linear`` layer. Errors that are not about shapes or dtypes
    (a bug in the model's code) keep their traceback.

    Raises:
        DataError: the model cannot run on the data.
        UsageError: ``outputs`` names units the model does not have.
    """
    probe = x[:2]
    params = [p for p in model.parameters() if p.is_floating_point()]
    if probe.is_floating_point() and params:
        probe = probe.to(device=params[0].device, dtype=params[0].dtype)
    elif params:
        probe = probe.to(device=params[0].device)
    try:
        with torch.no_grad():
            out = model(probe)
    except IndexError as e:  # an embedding given ids beyond its vocabulary
        raise DataError(_mismatch(model, x, spec, e)) from e
    except (RuntimeError, ValueError, TypeError) as e:
        if _out_of_memory(e) or not is_shape_error(e):
            raise
        raise DataError(_mismatch(model, x, spec, e)) from e
    if outputs is not None:
        if not isinstance(out, torch.Tensor) or out.dim() < 1:
            raise DataError(f"{spec} returns a {type(out).__name__}, not a tensor of outputs")
        k = out.shape[-1]
        bad = [o for o in outputs if not 0 <= o < k]
        if bad:
            raise UsageError(f"--outputs {bad} out of range: {spec} has {k} outputs")


def _mismatch(model: nn.Module, x: torch.Tensor, spec: str, e: BaseException) -> str:
    ex = list(x.shape[1:])
    found = first_layer(model)
    if found is None:
        layer_text, hint = "", ""
    else:
        name, layer = found
        layer_text = f"; its first layer, {name} ({layer}), expects {layer_expects(layer)}"
        hint = data_hint(layer, x, model)
    dtype = str(x.dtype).removeprefix("torch.")
    return (f"{spec} does not accept the data: each example has shape {ex} ({dtype}){layer_text}.{hint} "
            f"(torch: {_first_line(e)})")
