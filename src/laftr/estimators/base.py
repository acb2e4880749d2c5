"""The one interface every function-space-distance estimator implements, and the registry.

Life cycle::

    est = make_estimator("laftr", metric="kl", num_samples=64)
    est.fit(model, train_loader)      # summarize at theta0 = the model's current parameters
    d = est(model)                    # 0-dim tensor, differentiable w.r.t. the model's parameters
    est.stored_floats()               # floats stored beyond theta0

What every estimator checks, here once for all of them:

- ``fit`` validates ``outputs`` (distinct non-negative integers below the model's number of outputs, found by
  one forward pass on the first example) and refuses a network whose output for an example depends on the
  other examples of its batch (:func:`laftr.graph.check_per_example`: ``h - h.mean(0)``, ``h + h.sum()``,
  batch norm on batch statistics, ...), naming the op: the function space distance is not defined for it.
- ``fit`` keeps a fingerprint of the traced forward graph (:mod:`laftr.fingerprint`; ``graph_fingerprint``,
  also saved in the file), and the estimator refuses a model (in ``distance``/``__call__`` and
  ``theta0_model``) whose graph differs, naming the first node that differs: an estimate takes the model to be
  theta0's network with other parameters. A model torch.fx cannot trace gets no fingerprint (logged) and is
  not checked; neither is a model loaded from a file written before fingerprints existed.
- The model is always evaluated as in eval mode (dropout off, batch norm on its running statistics), whatever
  mode it is in: a model in a training loop gets the same estimate in train and in eval mode, and the
  estimate never depends on the composition of a training batch.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import logging
import numbers
import warnings
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, ClassVar, TypeVar

import torch
from torch import nn
from torch.utils.data import DataLoader, IterableDataset

from .. import distributed as dist_
from .._util import (
    Data,
    allow_empty_data,
    arch_signature,
    autocast_dtype,
    check_integer,
    check_runnable,
    check_same_arch,
    data_hint,
    eval_mode,
    first_layer,
    is_batched,
    is_input_size_error,
    iter_batches,
    model_device_dtype,
    param_dict,
    registrar,
    values_digest,
)
from ..errors import DataError, OptionError, UnsupportedOpError, UsageError
from ..fingerprint import IGNORED_ATTRS, GraphFingerprint, describe_difference, model_fingerprint
from ..graph import PROBE_EXAMPLES, check_per_example, check_traced_graph, refuse_torchscript
from ..metrics import (
    check_metric,
    check_network_output,
    check_outputs,
    check_softmax_outputs,
    run_network,
    select_outputs,
)

log = logging.getLogger(__name__)

T = TypeVar("T")

REGISTRY: dict[str, type[FSDEstimator]] = {}


def register(name: str) -> Any:
    """Class decorator: make an estimator available to :func:`make_estimator` under ``name``."""
    return registrar(REGISTRY, "estimator", name)


def available_estimators() -> list[str]:
    """Names accepted by :func:`make_estimator`."""
    return sorted(REGISTRY)


def make_estimator(name: str, **kwargs: Any) -> FSDEstimator:
    """Build an estimator by registry name, e.g. ``make_estimator("laftr", metric="kl", num_samples=64)``.

    Keyword arguments are the fields of that estimator's config dataclass; an unknown one raises
    :class:`laftr.errors.OptionError` (a ``TypeError`` and a ``ValueError``) naming it.
    """
    if name not in REGISTRY:
        raise UsageError(f"unknown estimator {name!r}; choose one of {available_estimators()}"
                         + _alias_hint(name))
    return REGISTRY[name](**kwargs)


def _alias_hint(name: str) -> str:
    """For a name of the benchmarks' tables and methods (``ewc``, ``laftr-relu``), the estimator it means."""
    from ..bench.fsd import ROW_SPECS  # here only: the benchmarks build on the estimators
    from ..continual.methods import METHODS

    method = METHODS.get(name) if isinstance(name, str) else None
    if method is not None and method.estimator:
        options = ", ".join(f"{k}={v!r}" for k, v in method.config.items())
        return (f" ({name!r} is a continual-learning method: the estimator "
                f"make_estimator({method.estimator!r}{', ' + options if options else ''}))")
    for rows in ROW_SPECS.values():
        if isinstance(name, str) and name in rows:
            return f" ({name!r} is a row of the fsd-bench tables: the spec {rows[name]!r}, S the samples)"
    base, _, size = name.rpartition("-") if isinstance(name, str) else ("", "", "")
    if base in ("subset", "ntk") and size.isdigit():  # fsd-bench's method spelling
        return f" ({name!r} is fsd-bench's spelling of make_estimator({base!r}, coreset_size={size}))"
    return ""


def check_int(config: Any, name: str, minimum: int | None = None) -> None:
    """Raise :class:`UsageError` unless ``config.<name>`` is an integer (not a bool) >= ``minimum``."""
    check_integer(getattr(config, name), name, minimum)


def check_options(cls: type[EstimatorConfig], options: dict[str, Any], who: str) -> None:
    """Raise :class:`OptionError` naming the first option that ``cls`` does not have.

    The message also names the estimators that have it, if any.
    """
    fields = {f.name for f in dataclasses.fields(cls)}
    for key in options:
        if key in fields:
            continue
        owners = sorted(n for n, est in REGISTRY.items()
                        if key in {f.name for f in dataclasses.fields(est.Config)})
        hint = f"; {key!r} is an option of {', '.join(owners)}" if owners else ""
        raise OptionError(f"{who} has no option {key!r} (its options: {sorted(fields)}){hint}")


@dataclasses.dataclass
class EstimatorConfig:
    """Options shared by all estimators.

    Attributes:
        metric: output discrepancy: ``l2``, ``mse``, ``l2-probs`` or ``kl``.
        seed: seed of every random choice made by ``fit`` and by Monte Carlo evaluation.
        progress: show a progress bar while fitting.
        batch_size: batch size used when ``fit`` is given tensors rather than a loader.
    """

    metric: str = "l2"
    seed: int = 0
    progress: bool = False
    batch_size: int = 256

    def __post_init__(self) -> None:
        """Check the metric, the seed and the batch size."""
        check_metric(self.metric)
        check_int(self, "seed")
        if not -(2 ** 62) <= self.seed < 2 ** 62:  # (torch: 64 bits; ranks add stream offsets)
            raise UsageError(f"seed must be an integer of magnitude below 2**62, got {self.seed!r}")
        check_int(self, "batch_size", minimum=1)
        if not isinstance(self.progress, bool):
            raise UsageError(f"progress must be True or False, got {self.progress!r}")

    def unused(self, given: Iterable[str]) -> list[str]:
        """Why each option among ``given`` (set by the caller) has no effect here (empty: none): warned.

        Checked where an estimator is made from options (:func:`make_estimator`, method specs), not when a
        saved one is read: an option accepted and ignored (``rank`` with a full Gaussian) is a setting the
        user may believe in, but one set for a sweep over other choices (the same options for every input
        model) is fine, so it is a warning, not an error.
        """
        return []

    def conflicting(self, given: Iterable[str]) -> list[str]:
        """Why options among ``given`` contradict each other or the estimator (empty: none): refused."""
        return []


class FSDEstimator:
    """Base class: an estimate of ``E_x rho(f(x; theta0), f(x; theta))`` from a summary stored at theta0.

    Subclasses set ``Config`` (a dataclass deriving from :class:`EstimatorConfig`) and implement
    ``_fit``, ``_distance``, ``stored_floats`` and the ``_state``/``_load_state`` pair.

    Attributes:
        outputs: the compared output units (None: all).
        theta0: theta0's parameters and buffers.
        arch: ``[[name, shape], ...]`` of theta0's parameters and buffers.
        graph_fingerprint: the text form of theta0's forward-graph fingerprint (a ``GraphFingerprint`` of
            the private ``laftr.fingerprint``), or None (not traceable, or loaded from an older file).
    """

    name: ClassVar[str] = "base"
    Config: ClassVar[type[EstimatorConfig]] = EstimatorConfig
    #: Whether the estimator runs the network (on the data at ``fit``, or on stored inputs when evaluated).
    #: One that does not (``weight``) neither reads the data nor checks it: ``outputs`` is then validated only
    #: as a list of indices, and a network that mixes the examples of a batch is not refused.
    uses_network: ClassVar[bool] = True
    #: Whether it runs the network's torch.fx graph (with each stream's parameters) rather than the module
    #: itself; such an estimator refuses forward hooks that change the network's output
    #: (``laftr.graph.check_traced_graph``), which the graph does not call.
    traces: ClassVar[bool] = True
    #: Whether it differentiates the module itself by reverse mode (``subset``), which follows a
    #: ``torch.no_grad()`` block inside its forward; the others refuse such a block where it hides parameters.
    reverse_mode_module: ClassVar[bool] = False
    #: How it takes an ``nn.Embedding(max_norm=...)``, which renormalizes rows of its table in place at every
    #: forward: theta0's stored table is then renormalized while a copy of the weights taken before is not,
    #: the same function with other weights. ``"ok"``: ``subset`` (the module's own outputs) and ``laftr``
    #: (its rule refuses the node by name); ``"binding"``: refused at ``fit`` where a row is above the bound
    #: (``ntk``: 0.016 at a copy of theta0); ``"refused"``: always (K-FAC and the diagonal Fisher, whose taps
    #: failed in ``torch.cat``).
    renormalized_tables: ClassVar[str] = "ok"
    #: Whether the estimate is a fixed quadratic form of ``theta - theta0`` with a cheap damped inverse
    #: (:meth:`damped_solve`).
    quadratic: ClassVar[bool] = False

    def __init__(self, config: EstimatorConfig | None = None, **kwargs: Any) -> None:
        """An unfitted estimator from ``config`` and/or keyword fields of :attr:`Config` (which win)."""
        who = f"estimator {getattr(self, 'name', type(self).__name__)!r}"
        check_options(self.Config, kwargs, who)
        if config is None:
            config = self.Config(**kwargs)
        elif kwargs:
            config = dataclasses.replace(config, **kwargs)
        if isinstance(config, EstimatorConfig):
            conflicts = config.conflicting(kwargs)
            if conflicts:
                raise UsageError(f"{who}: " + "; ".join(conflicts))
            for why in config.unused(kwargs):
                warnings.warn(f"{who}: {why} (ignored)", UserWarning, stacklevel=3)
        if not isinstance(config, self.Config):
            raise TypeError(f"{type(self).__name__} needs a {self.Config.__name__}, got "
                            f"{type(config).__name__}")
        check_metric(config.metric)
        self.config = config
        self.outputs: list[int] | None = None
        self._output_width: int | None = None  # output units per example, seen by the last fit's probe
        self.theta0: dict[str, torch.Tensor] | None = None
        self.arch: list[list[Any]] | None = None
        self.graph_fingerprint: str | None = None
        self._fingerprint: GraphFingerprint | None = None  # with node descriptions (this session only)
        self._buffer_names: frozenset[str] | None = None  # theta0's buffers (known if fitted in this session)
        self._distributed = False  # within fit: whether this fit reduces over a process group
        self._stream = 0  # within distance: the sample stream (a rank; see laftr.distributed.stream_seed)
        # id(model) -> what passed the check
        self._graph_checked: dict[int, tuple[Any, str, _Structure]] = {}

    # ------------------------------------------------------------------ public API
    @property
    def metric(self) -> str:
        """The output discrepancy the estimate averages."""
        return self.config.metric

    @property
    def fitted(self) -> bool:
        """Whether :meth:`fit` has run (or the estimator was loaded from a file)."""
        return self.theta0 is not None

    def fit(self, model: nn.Module, data: Data, outputs: Sequence[int] | None = None,
            distributed: bool | None = None) -> FSDEstimator:
        """Summarize ``data`` at theta0 = ``model``'s current parameters (copied; the model is not changed).

        The model runs in eval mode (each submodule's mode is put back afterwards).

        In a ``torch.distributed`` process group (``distributed=None`` and a group is initialized, or
        ``distributed=True``) every rank calls ``fit`` with its own shard of the data: the statistics are
        float64 sums all-reduced over the ranks (coresets the global bottom-k of the seeded hash), so every
        rank ends with the same estimator, the one a single process fits on all the data (up to float64
        rounding; Monte Carlo output vectors of ``fisher="mc"`` are drawn per rank). A rank's shard may be
        empty. The ranks must fit the same network with the same options and ``outputs``: a difference raises
        :class:`~laftr.errors.UsageError` on every rank, as does a failure of one rank's pass over its data.
        ``distributed=False`` fits on the local data only.

        Args:
            model: the reference network (a ``DistributedDataParallel`` or ``DataParallel`` wrapper stands for
                the module inside it).
            data: a DataLoader of ``(x, y)`` or ``x`` batches, a tensor of inputs or an ``(X, Y)`` pair.
            outputs: optional output units that the distance compares (multi-head tasks): distinct
                non-negative integers below the model's number of outputs.
            distributed: reduce over the default ``torch.distributed`` group (None: when one is initialized).

        Raises:
            UsageError: bad ``outputs``; in a distributed fit, ranks that fit different things.
            UnsupportedOpError: a network that mixes the examples of a batch (naming the op), or one the
                estimator cannot handle.
        """
        model = dist_.unwrap(model)

        def checks() -> tuple[list[int] | None, bool]:
            if not isinstance(model, nn.Module):
                raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
            checked = check_outputs(outputs)
            check_runnable(model)
            if self.uses_network:
                refuse_torchscript(model, f"{self.name}: ")
            if self.renormalized_tables != "ok":
                # (where no row is above max_norm, nothing is renormalized: theta0 is stored as it is)
                renormed = [n for n, m in model.named_modules()
                            if isinstance(m, (nn.Embedding, nn.EmbeddingBag)) and m.max_norm is not None
                            and (self.renormalized_tables == "refused"
                                 or bool((m.weight.detach().norm(p=m.norm_type, dim=1) > m.max_norm).any()))]
                if renormed:
                    raise UnsupportedOpError(
                        f"{self.name}: the embeddings {renormed[:5]} have max_norm, which renormalizes rows "
                        "of their tables in place at every forward: the weights theta0 is stored with then "
                        "differ from a copy's of the same function; use subset, or an embedding without "
                        "max_norm (renormalize the table yourself after each step)")
            _refuse_inference_mode("fit")
            return checked, dist_.active(distributed)

        outputs, on = dist_.prechecked(distributed, checks, f"{self.name}.fit")
        self._output_width = None
        try:
            with eval_mode(model):  # every submodule's own mode is put back after
                fp, gm, why = model_fingerprint(model)
                if fp is None:
                    log.info("%s: no graph fingerprint, so later models are not checked to have "
                             "the same forward: %s",
                             self.name, why)
                if on:
                    config = {k: v for k, v in dataclasses.asdict(self.config).items() if k != "progress"}
                    dist_.check_consistent(f"{self.name}.fit", {
                        "the estimator": self.name, "the options": config, "outputs": outputs,
                        "the parameters": arch_signature(model),
                        "the dtype": str(model_device_dtype(model)[1]),
                        "the trainable parameters": [n for n, p in model.named_parameters()
                                                     if p.requires_grad],
                        "the parameter values (a hash; load or broadcast the same weights on every rank)":
                            values_digest(model),
                        "the forward graph": None if fp is None else fp.text})
                nonfinite: str | None = None  # why theta0's outputs are not finite (raised after the fit)
                with allow_empty_data(on):
                    if self.uses_network:

                        def probe() -> Data:
                            nonlocal nonfinite
                            device, dtype = model_device_dtype(model)
                            x, rest = _first_examples(data, PROBE_EXAMPLES, self.config.batch_size, device,
                                                      dtype)
                            if x is not None:  # None: this rank's shard is empty (the others check theirs)
                                _probe_dtype(model, x[:2])
                                self._output_width, nonfinite = _check_output(
                                    model, x, outputs, getattr(self.config, "metric", None))
                                # the graph first: the mixing check reads the graph, which must be the model's
                                check_traced_graph(model, x, hooks=self.traces,
                                                   grad_off=self.traces or not self.reverse_mode_module)
                                check_per_example(model, x, gm, why, layouts=self._per_example_values())
                            return rest

                        data = dist_.agree(probe, f"{self.name}.fit") if on else probe()
                    self._set_reference(model, outputs, fp)
                    self._distributed = on
                    with torch.enable_grad():  # the curvature fits differentiate (a fit under no_grad works)
                        self._fit(model, data)  # (its own checks name an op outside its domain first)

                        def finite() -> None:
                            if nonfinite is not None:
                                raise DataError(nonfinite)

                        # in a distributed fit, the refusal of one rank's data is every rank's
                        dist_.agree(finite, f"{self.name}.fit") if on else finite()
                        self._after_fit(model)
        finally:
            self._distributed = False
        return self

    def _after_fit(self, model: nn.Module) -> None:
        """Checks once the summary is fitted at ``model`` (nothing here)."""

    def _local(self, run: Callable[[], T], what: str) -> T:
        """``run()``, this rank's pass over its data; in a distributed fit, the ranks agree that none failed.

        See ``agree`` in the private ``laftr.distributed``: a failure on one rank raises on every rank instead
        of leaving the others waiting in the next collective.
        """
        return dist_.agree(run, f"{self.name}: {what}") if self._distributed else run()

    def __call__(self, model: nn.Module, distributed: bool | None = None) -> torch.Tensor:
        """The estimated distance from theta0 to ``model``'s current parameters (0-dim, differentiable).

        See :meth:`distance`.
        """
        return self.distance(model, distributed=distributed)

    def distance(self, model: nn.Module, distributed: bool | None = None) -> torch.Tensor:
        """The estimated distance from theta0 to ``model``'s current parameters (0-dim, differentiable).

        ``model`` may be a ``DistributedDataParallel`` (or ``DataParallel``) wrapper: the module inside it is
        evaluated (its parameters are the wrapper's), so ``est(ddp_model)`` and ``est(ddp_model.module)`` are
        the same.

        In a ``torch.distributed`` process group (``distributed=None`` and a group is initialized, or
        ``distributed=True``) a Monte Carlo estimator (``laftr``, ``liftr``) draws rank ``r``'s samples from
        the stream of ``seed + 1_000_003 * r`` (rank 0: the seed's own, what a single process draws), so the
        ranks' estimates are independent and their mean, what DistributedDataParallel's gradient averaging
        uses, is the estimate with ``num_samples * world_size`` samples. ``distributed=False``: the seed's
        own stream on every rank (identical estimates). The other estimators draw nothing and are the same
        either way. Nothing is communicated.
        """
        model = dist_.unwrap(model)
        _refuse_inference_mode("an evaluation")
        stream = dist_.sample_stream(distributed)
        self._check_ready(model)
        self._stream = stream
        try:
            d = self._distance(model)
        except RuntimeError as e:
            if "vmap" in str(e) and "random" in str(e):  # torch.func.vmap's default refuses random draws
                raise UsageError(
                    f"{self.name} draws random samples when evaluated, which torch.func.vmap refuses by "
                    "default: pass randomness='same' to vmap (every vmapped call then gets the same draws; "
                    "with fixed_noise=True, those of an ordinary call)") from e
            raise
        finally:
            self._stream = 0
        if not is_batched([d]) and bool(torch.isnan(d.detach()).any()):
            _refuse_nan(self.name, model)
        return d

    def stored_floats(self) -> int:
        """Number of floats this estimator stores beyond theta0 (the honest memory cost)."""
        raise NotImplementedError

    def damped_solve(self, vectors: dict[str, torch.Tensor], damping: float) -> dict[str, torch.Tensor]:
        """``(H + damping I)^{-1} v``, with ``H`` the Hessian of the estimate in the parameters.

        Only for estimators whose estimate is a fixed quadratic form of ``theta - theta0`` (``quadratic`` is
        True: ``weight``, ``diag-fisher``, ``kfac``), where ``H`` is constant and its damped inverse is cheap
        (diagonal, or Kronecker factors' eigendecompositions). The PBRF solver uses it as L-BFGS's initial
        inverse Hessian (:class:`laftr.influence.PBRFConfig`'s ``precondition``).

        Args:
            vectors: ``v``, one tensor per parameter name, shaped like it (the parameters solved for,
                typically the trainable ones; ``H`` is restricted to them). Parameters the estimate does not
                depend on have ``H = 0`` there; ``weight``'s ``H`` is ``scale * I`` on every named parameter
                (its estimate sums every parameter, frozen ones too; the solver names the trainable ones).
            damping: ``> 0``.

        Returns:
            The solution, by the same names, in ``v``'s device and dtype.

        Raises:
            NotImplementedError: the estimate is not a fixed quadratic form.
            RuntimeError: not fitted.
            ValueError: a name that is not a parameter of theta0 (a buffer is refused; an estimator
                loaded from a file of format 3 or older does not know its buffers), a shape that
                differs from it, a vector that is not a floating-point tensor, a damping that is not a finite
                positive number.
        """
        if not self.quadratic:
            raise NotImplementedError(f"the {self.name!r} estimate is not a fixed quadratic form of "
                                      "theta - theta0: it has no constant Hessian to invert")
        if self.theta0 is None or self.arch is None:
            raise RuntimeError(f"{type(self).__name__} is not fitted: call .fit(model, data) first")
        if (isinstance(damping, bool) or not isinstance(damping, numbers.Real)
                or not 0 < damping < float("inf")):
            raise UsageError(f"damping must be a finite number > 0, got {damping!r}")
        shapes = {n: list(s) for n, s in self.arch}
        buffers = getattr(self, "_buffer_names", None) or frozenset()
        for n, v in vectors.items():
            if n not in shapes:
                raise UsageError(f"{n!r} is not a parameter of the fitted network")
            if n in buffers:
                raise UsageError(f"{n!r} is a buffer of the fitted network, not a parameter: the estimate "
                                 "has no Hessian in it")
            if not (isinstance(v, torch.Tensor) and v.is_floating_point()):
                raise UsageError(f"vector {n!r} must be a floating-point tensor, got {type(v).__name__}")
            if list(v.shape) != shapes[n]:
                raise UsageError(f"vector {n!r} has shape {list(v.shape)}; the parameter has {shapes[n]}")
        return self._damped_solve(vectors, float(damping))

    def _damped_solve(self, vectors: dict[str, torch.Tensor], damping: float) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        """Name, config and memory, for reports."""
        return {"name": self.name, "config": dataclasses.asdict(self.config),
                "stored_floats": self.stored_floats()}

    def sample_state(self) -> dict[str, Any] | None:
        """Where the estimator's random samples stand: None for an estimator that draws nothing between calls.

        A Monte Carlo estimator (``laftr``, ``liftr``) draws fresh samples at every call from a stream that
        continues across calls; restoring this state (:meth:`load_sample_state`) makes the next call draw
        what it would have drawn. Used to checkpoint a training run (``FSDRegularizer.state_dict``) and to
        keep a logging call from moving the stream.
        """
        return None

    def load_sample_state(self, state: dict[str, Any] | None) -> None:
        """Restore a :meth:`sample_state` (None: nothing to restore)."""
        if state is not None:
            raise UsageError(f"{self.name} draws no samples between calls; got a sample state "
                             f"{sorted(state)}")

    # ------------------------------------------------------------------ subclass hooks
    def _fit(self, model: nn.Module, data: Data) -> None:
        raise NotImplementedError

    def _distance(self, model: nn.Module) -> torch.Tensor:
        raise NotImplementedError

    def _state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Tensors and JSON-able metadata (beyond config, outputs, theta0, arch) to persist."""
        return {}, {}

    def _load_state(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        """Inverse of :meth:`_state`."""

    # ------------------------------------------------------------------ helpers
    def _set_reference(self, model: nn.Module, outputs: Sequence[int] | None,
                       fingerprint: GraphFingerprint | None | bool = True) -> None:
        """Make ``model``'s current parameters theta0, for a subclass that fits without :meth:`fit`.

        Records the parameters, their architecture, the compared ``outputs`` (checked as a list of indices)
        and the fingerprint of the model's graph (``True``: computed here); used e.g. to fit from an existing
        summary.
        """
        if fingerprint is True:
            fingerprint = model_fingerprint(model)[0]
        self.outputs = check_outputs(outputs)
        self.theta0 = param_dict(model, detach=True)
        self.arch = arch_signature(model)
        self._buffer_names = frozenset(n for n, _ in model.named_buffers())
        self._fingerprint = fingerprint or None
        self.graph_fingerprint = None if not fingerprint else fingerprint.text
        self._graph_checked = {}
        if self.graph_fingerprint is not None:
            self._graph_checked[id(model)] = (weakref.ref(model), self.graph_fingerprint, _Structure(model))

    def _check_ready(self, model: nn.Module) -> None:
        if self.theta0 is None or self.arch is None:
            raise RuntimeError(f"{type(self).__name__} is not fitted: call .fit(model, data) first")
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        check_same_arch(self.arch, model)
        self._check_graph(model)
        covered = self._covered_params()
        if covered is not None:
            missed = [n for n, p in model.named_parameters() if p.requires_grad and n not in covered]
            if missed:
                more = f" (and {len(missed) - 1} more)" if len(missed) > 1 else ""
                raise UsageError(
                    f"{self.name}: parameter {missed[0]!r}{more} is trainable now but has no curvature in "
                    f"this estimator (it was frozen, requires_grad=False, when it was fitted): the estimate "
                    f"would not see it move. Fit the estimator with it trainable, or freeze it again")

    def _covered_params(self) -> frozenset[str] | None:
        """The parameters whose change the estimate sees (None: all of them; override where fit chooses)."""
        return None

    def _check_graph(self, model: nn.Module, what: str = "the fitted model") -> None:
        """Refuse ``model`` if its forward graph differs from theta0's (see :mod:`laftr.fingerprint`).

        Checked once per model object: a model that passed is remembered (by a weak reference, the identity
        of its submodules and their plain attributes: :class:`_Structure`), so calling the estimator on it at
        every training step costs a dictionary lookup and a walk over its submodules. Replacing a submodule
        (``model.act = nn.Tanh()``), changing a plain attribute (``model.temperature = 2.0``) or patching a
        ``forward`` on an instance redoes the check; changing a constant tensor attribute in place, or a
        global the forward reads, is not noticed.
        """
        text = self.graph_fingerprint
        if text is None:
            return
        cache = self.__dict__.setdefault("_graph_checked", {})
        hit = cache.get(id(model))
        ignore: frozenset[tuple[int, str]] = frozenset()
        if hit is not None and hit[0]() is model and hit[1] == text:
            changed = hit[2].changed(model)
            if changed == []:
                return
            if changed:  # checked again below; if the graph is the same, these are not watched any more
                ignore = hit[2].ignore | frozenset(changed)
        mine = getattr(self, "_fingerprint", None)
        fitted = mine if mine is not None and mine.text == text else GraphFingerprint.parse(text)
        if fitted is None:  # written by another version of laftr: nothing to compare with
            log.info("%s: graph fingerprint of an unknown format, not checked: %.40s", self.name, text)
        else:
            got, _, why = model_fingerprint(model)
            if got is None:
                raise UsageError(f"the model's forward cannot be traced with torch.fx ({why}), while "
                                 f"{what}'s could: its forward differs from the fitted one")
            diff = describe_difference(fitted, got)
            if diff is not None:
                raise UsageError(f"{diff} (compared with {what}); an estimator takes the model to be "
                                 "theta0's network with other parameters, so it must compute the "
                                 f"same function of them{self._unregistered_rules()}")
        for key in [k for k, v in cache.items() if v[0]() is None]:
            del cache[key]
        if len(cache) >= 16:
            del cache[next(iter(cache))]
        cache[id(model)] = (weakref.ref(model), text, _Structure(model, ignore))

    def _per_example_values(self) -> bool:
        """Whether the estimator reads the network's values example by example.

        Per-example statistics or draws need their layouts: every value must keep the examples apart. False
        for those that run the network as a whole (``subset``, ``ntk``), for which the output must.
        """
        return self.traces

    def _unregistered_rules(self) -> str:
        """Why a graph may differ from the fitted one: rules the fit used that this process lacks (``""``)."""
        return ""

    def __getstate__(self) -> dict[str, Any]:
        """The state to pickle, without the weak references of the graph check (it is redone)."""
        state = dict(self.__dict__)
        state["_graph_checked"] = {}  # weak references do not pickle; the check is redone
        for k in [k for k in state if k.endswith("_cache")]:  # derived state (traced functions): rebuilt
            del state[k]
        return state

    def theta0_model(self, like: nn.Module) -> nn.Module:
        """A copy of ``like`` (same architecture) carrying theta0's parameters and buffers, in eval mode.

        Useful after :func:`laftr.load`, e.g. to compute the exact FSD against the stored reference.
        """
        if self.theta0 is None or self.arch is None:
            raise RuntimeError(f"{type(self).__name__} is not fitted: call .fit(model, data) first")
        like = dist_.unwrap(like)
        check_same_arch(self.arch, like, "the stored theta0")
        self._check_graph(like, "the stored theta0")
        model = copy.deepcopy(like)
        with torch.no_grad():
            for n, t in [*model.named_parameters(), *model.named_buffers()]:
                t.copy_(self.theta0[n])
        return model.eval()

    def _fit_cache(self, name: str) -> dict[Any, Any]:
        """The dict ``self.<name>`` of values derived from the fitted state.

        Emptied when the estimator has been fitted or loaded again since (a new theta0); dropped when pickled.
        """
        cache: dict[Any, Any] = self.__dict__.setdefault(name, {})
        if cache.get("source") is not self.theta0:
            cache.clear()
            cache["source"] = self.theta0
        return cache

    def theta0_on(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """theta0 moved to ``model``'s device and floating dtype.

        Cached: do not modify the tensors in place.
        """
        assert self.theta0 is not None
        device, dtype = model_device_dtype(model)
        cache = self._fit_cache("_theta0_cache")
        # (with the dtypes of the model's own tensors: a float32 copy of a network with a bfloat16 layer is
        # another key than the network)
        key = (str(device), dtype, tuple(p.dtype for p in model.parameters()))
        if key not in cache:
            # each tensor in the dtype of the model's own (a bfloat16 layer in a float32 network stays
            # bfloat16: cast to one dtype, theta0 was not theta0 and weight gave 9e-6 at theta = theta0)
            own = {n: t.dtype for n, t in param_dict(model).items() if t.is_floating_point()}
            cache[key] = {n: t.to(device=device, dtype=own.get(n, dtype) if t.is_floating_point()
                                  else t.dtype) for n, t in self.theta0.items()}
        return cache[key]


# ---------------------------------------------------------------------------------------------- helpers
_PLAIN = (bool, int, float, str, type(None))


class _Structure:
    """What a model that passed the graph check was made of: each submodule and its attributes.

    An attribute that a forward reads (a number, a string, a flag, a tuple, a small list or dict of such
    values, a function) is a constant of the traced graph, so one changed in place (``model.temperature =
    2.0``, ``model.act_fn = torch.sigmoid``) calls for the check again; so do a replaced submodule, a
    ``forward`` patched on an instance and an attribute added or removed. An attribute that changed while
    the graph stayed the same (a call counter the forward updates) is not watched after that (``ignore``),
    so that it does not cost a new check at every call. Built by a walk over the modules that reads every
    attribute; :meth:`changed` walks them again and reads only those it found (microseconds per estimate).
    """

    def __init__(self, model: nn.Module, ignore: frozenset[tuple[int, str]] = frozenset()) -> None:
        """Record every submodule (walk order), its number of attributes and the ones it watches."""
        self.ignore = ignore
        self.plan: list[tuple[int, int, tuple[tuple[str, Any], ...]]] = []
        for m in _walk(model):
            d = m.__dict__
            kept = []
            for k, v in d.items():
                if k[0] == "_" or k in IGNORED_ATTRS or (id(m), k) in ignore:
                    continue
                snap = _snapshot(v)
                if snap is not _UNWATCHED:
                    kept.append((k, snap))
            self.plan.append((id(m), len(d), tuple(kept)))

    def changed(self, model: nn.Module) -> list[tuple[int, str]] | None:
        """The watched attributes that changed (``[]``: none); None if the modules or their counts did."""
        plan, i = self.plan, 0
        out: list[tuple[int, str]] = []
        for m in _walk(model):
            if i >= len(plan):
                return None
            ident, n, kept = plan[i]
            d = m.__dict__
            if id(m) != ident or len(d) != n:
                return None
            out.extend((ident, k) for k, v in kept if _snapshot(d.get(k)) != v)
            i += 1
        return out if i == len(plan) else None


#: a value :class:`_Structure` does not watch (tensors, modules and other objects)
_UNWATCHED = object()


def _snapshot(v: Any) -> Any:
    """A comparable copy of an attribute's value, or :data:`_UNWATCHED`.

    Plain values as they are; tuples, and lists / dicts of up to 32 plain values, copied; functions and
    other callables by identity.
    """
    if isinstance(v, _PLAIN):
        return (type(v), v)
    if isinstance(v, (tuple, list)) and len(v) <= 32 and all(isinstance(u, _PLAIN) for u in v):
        return (type(v), tuple(v))
    if isinstance(v, dict) and len(v) <= 32 and all(isinstance(u, _PLAIN) for u in (*v, *v.values())):
        return (dict, tuple(v.items()))
    if callable(v) and not isinstance(v, (nn.Module, torch.Tensor)):
        return ("callable", id(v))
    return _UNWATCHED


def _walk(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` and every submodule, depth first (cheap: no names are built)."""
    stack = [model]
    while stack:
        m = stack.pop()
        yield m
        stack.extend(c for c in m._modules.values() if c is not None)


def _probe_dtype(model: nn.Module, x: torch.Tensor) -> None:
    """Refuse integer inputs that the network's floating ops cannot read (:func:`laftr.metrics.run_network`).

    Any other failure is left to the estimator's own pass over the data, which says what it is.
    """
    if x.is_floating_point():
        return
    try:
        with torch.no_grad():
            run_network(model, x)
    except DataError:
        raise
    except Exception as e:  # noqa: BLE001
        log.debug("%s does not run on its data (%s: %s)", type(model).__name__, type(e).__name__, e)


def _refuse_inference_mode(what: str) -> None:
    """Raise :class:`UsageError` inside ``torch.inference_mode()``.

    What an estimator keeps from a fit or a first evaluation (statistics, caches of theta0's values) would be
    inference tensors, which every later evaluation with gradients refuses (or, cached as constants, silently
    reads as values without gradients).
    """
    if torch.is_inference_mode_enabled():
        raise UsageError(f"{what} inside torch.inference_mode(): what the estimator keeps would be "
                         "inference tensors that later evaluations with gradients cannot use; use "
                         "torch.no_grad() instead")


def _check_output(model: nn.Module, x: torch.Tensor, outputs: Sequence[int] | None,
                  metric: str | None) -> tuple[int | None, str | None]:
    """Check ``model``'s output on its first examples ``x`` against ``outputs`` and the metric (one run).

    ``outputs`` must index its output units (flattened); a softmax metric needs one distribution per example
    (:func:`laftr.metrics.check_softmax_outputs`). Data that does not fit the network (torch's shape or dtype
    error) is a :class:`DataError` naming the examples' shape and a fix; a model that fails here otherwise is
    left to the estimator's own pass over the data, which says why.

    Returns:
        The number of output units per example (flattened), or None when the model does not run here or does
        not return a tensor; and why the outputs are not finite (:func:`_nonfinite_outputs`), or None.
    """
    try:
        with torch.no_grad():
            z = model(x)
    except Exception as e:  # noqa: BLE001
        log.debug("%s does not run on its data (%s: %s)", type(model).__name__, type(e).__name__, e)
        if is_input_size_error(e):
            found = first_layer(model)
            raise DataError(
                f"{type(model).__name__} does not run on the data: {str(e).splitlines()[0]} (each example "
                f"has shape {tuple(x.shape[1:])}, dtype {x.dtype})."
                + ("" if found is None else data_hint(found[1], x, model))) from e
        return None, None
    if not isinstance(z, torch.Tensor):
        if outputs is not None:
            raise UsageError(f"outputs= needs a model that returns a tensor; {type(model).__name__} returns "
                             f"{type(z).__name__}")
        z = check_network_output(z)  # a tuple, dict, named tuple or dataclass: refused, naming the fix
    width = int(z.reshape(z.shape[0], -1).shape[1]) if z.ndim else 1
    if outputs is not None:
        check_outputs(outputs, width)
    if metric is not None:
        check_softmax_outputs(z, metric, outputs)
    return width, _nonfinite_outputs(model, select_outputs(z, outputs) if z.ndim else z, metric)


def _refuse_nan(name: str, model: nn.Module) -> None:
    """Raise for an estimate that is NaN although ``model``'s parameters and buffers are finite.

    Not where the NaN is a training loop's signal: a diverged theta (or NaN running statistics), a float16 /
    bfloat16 network or autocast (an overflow, whose step a GradScaler skips), or a process group (a raise on
    one rank would leave the others waiting in DDP's gradient all-reduce): NaN is returned there.

    The NaN then comes from an op evaluated outside its domain on the inputs the estimator runs: theta0's own
    linearization (``gates="relu"``) takes the slope of ``sqrt(h * 0)`` at 0 on every sampled input (infinite,
    times a change of 0), a drawn token sequence may have every attention key masked, a network may divide 0
    by 0 at theta. A NaN returned as a distance would pass for a value in a training loop.
    """
    tensors = [t for t in itertools.chain(model.parameters(), model.buffers()) if t.is_floating_point()]
    if (any(not bool(torch.isfinite(t).all()) for t in tensors)  # a diverged network (or its statistics)
            or any(t.dtype in (torch.float16, torch.bfloat16) for t in tensors)  # an overflow is its NaN
            or any(autocast_dtype(t.device) is not None for t in tensors[:1])  # GradScaler skips such a step
            or dist_.active(None)):  # one rank raising would leave the others in DDP's all-reduce
        return
    raise UnsupportedOpError(
        f"{name}: the estimate is NaN though the network's parameters are finite: an op is evaluated "
        "outside its domain on the inputs the estimator runs -- the slope of sqrt, log or a power at 0, a "
        "division by 0 or the standard deviation of a constant row (gates='relu' takes theta0's slope at "
        "every sampled input), a sampled token sequence whose every attention key is masked "
        "(input_model='tokens' draws each position on its own), or 0/0 in the network at these weights; "
        "keep such inputs inside the op's domain (an epsilon), or try gates='bernoulli' or "
        "input_model='coreset'")


def _nonfinite_outputs(model: nn.Module, z: torch.Tensor, metric: str | None) -> str | None:
    """Why a network whose outputs at theta0 are NaN or infinite on its first examples is refused (or None).

    Every distance from such a reference is NaN (an LPPool of odd ``norm_type`` on signed inputs gave NaN on
    every example, and every estimate was NaN at theta0 too). A logit of -inf (a class masked out) is a
    probability of 0 under a softmax metric, and is accepted there. ``fit`` raises it after the estimator's
    own pass, whose rules name an op outside its domain where they see one.
    """
    if not z.is_floating_point() or bool(torch.isfinite(z).all()):
        return None
    bad = torch.isnan(z) | (z == float("inf"))
    if metric not in ("kl", "l2-probs"):
        bad |= torch.isinf(z)
    if not bool(bad.any()):
        return None
    params = [n for n, p in model.named_parameters() if not bool(torch.isfinite(p).all())]
    why = (f"its parameters {params[:5]} hold NaN or infinite values" if params else
           "an op gives NaN or infinity there (a power of a negative number, log of 0, 0/0, an overflow)")
    return (f"{type(model).__name__} gives NaN or infinite outputs at theta0 on the first examples of the "
            f"data ({int(bad.sum())} of {bad.numel()} output values): {why}, so every distance from it would "
            "be NaN; fit at weights whose outputs on the data are finite")


def _reads_once(data: Any) -> bool:
    """Whether ``data`` is an iterable (not an iterator) whose passes continue one another.

    An ``IterableDataset`` (or a DataLoader over one) whose ``__iter__`` hands out the same generator every
    time (a file, socket or cursor reader): a second pass would start where the probe of the network stopped.
    """
    if isinstance(data, (torch.Tensor, tuple, list, dict, Iterator)) or not isinstance(data, Iterable):
        return False
    src = data.dataset if isinstance(data, DataLoader) else data
    if isinstance(data, DataLoader) and not isinstance(src, IterableDataset):
        return False
    try:
        first = iter(src)
        return first is iter(src)
    except Exception:  # noqa: BLE001 - not for us to judge here; the data's own pass reports it
        return False


def _first_examples(data: Data, n: int, batch_size: int, device: torch.device, dtype: torch.dtype,
                    ) -> tuple[torch.Tensor | None, Data]:
    """The first ``n`` inputs of ``data`` (fewer if it has fewer), and ``data`` to read from the start again.

    The inputs are None when ``data`` has no examples (only possible within ``allow_empty_data``).

    A one-shot iterator (or an iterable whose passes continue one another, :func:`_reads_once`) is given back
    with the batches read put in front; a loader is read without changing
    the global random state or its generators (a shuffled loader then shuffles as if it had not been read).
    """
    taken: list[Any] = []
    if _reads_once(data):  # an iterable whose every pass continues the last one: read as the iterator it is
        data = iter(data)
    if isinstance(data, Iterator):
        source: Any = data

        def remember() -> Iterator[Any]:
            for batch in source:
                taken.append(batch)
                yield batch

        data = remember()
    gens = [getattr(data, "generator", None), getattr(getattr(data, "sampler", None), "generator", None),
            getattr(getattr(getattr(data, "batch_sampler", None), "sampler", None), "generator", None)]
    states = [(g, g.get_state()) for g in gens if isinstance(g, torch.Generator)]
    xs: list[torch.Tensor] = []
    count = 0
    try:
        with torch.random.fork_rng(devices=[]):
            for x, _ in iter_batches(data, batch_size, device, dtype):
                xs.append(x[: n - count])
                count += xs[-1].shape[0]
                if count >= n:
                    break
    finally:
        for g, state in states:
            g.set_state(state)
    if taken:
        data = itertools.chain(taken, source)
    return (torch.cat(xs) if xs else None), data
