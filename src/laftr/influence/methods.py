"""Influence methods behind one interface, by name: ``pbrf``, ``pbrf-<estimator>``, ``influence``.

- ``pbrf``: the PBRF with the exact function space distance over the training set (the ground truth).
- ``pbrf-<name>``: the PBRF with any registered FSD estimator (``laftr``, ``laftr-exact``, ``weight``,
  ``diag-fisher``, ``kfac``, ``ntk``, ``subset``, ...), made with ``metric`` = the loss's Bregman divergence
  and fitted once at ``theta_s``; a query touches only the removed example. The estimator is a spec of the
  one grammar (``laftr.specs``): ``pbrf-laftr[num_samples=200,input_model=diag]`` overrides its options for
  this method only, and ``pbrf-<name>@<tag>`` names a variant configured by ``--est-opt <name>@<tag>.key=v``
  (both together: ``pbrf-laftr@mix[components=30]``).
- ``influence``: the classical influence function, ``(G + lam I)^{-1}`` by conjugate gradient;
  ``influence-exact`` forms ``G`` densely (tiny models).

Every method answers a query about training example ``m`` with the estimated change of the measurement
``M(theta_m) - M(theta_s)`` and/or of the example's own loss (self-influence).
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import torch
from torch import nn

from ..errors import LaftrError, UsageError
from ..estimators.base import REGISTRY, FSDEstimator, available_estimators, make_estimator
from ..specs import Spec, check_keys, config_keys, parse_spec
from .classical import ClassicalInfluence, InfluenceConfig
from .losses import BREGMAN_METRIC
from .measure import Measurement
from .pbrf import PBRF, PBRFConfig, check_deterministic


def method_names() -> list[str]:
    """Every method name accepted now (``pbrf-<name>`` for each registered estimator)."""
    return ["pbrf", "influence", "influence-exact"] + [f"pbrf-{n}" for n in available_estimators()]


def split_variant(name: str) -> tuple[str, str | None]:
    """``"pbrf-laftr@full"`` -> ``("pbrf-laftr", "full")``: a tag names a second configuration of a method.

    Overrides in brackets are dropped: ``"pbrf-laftr@full[num_samples=8]"`` -> ``("pbrf-laftr", "full")``.
    """
    base, at, tag = parse_spec(name, what="influence method").base.partition("@")
    return base, (tag if at else None)


def parse_method_name(name: str) -> tuple[str, str | None, Spec]:
    """``"pbrf-laftr@full[num_samples=8]"`` -> ``("pbrf-laftr", "full", Spec("laftr@full", ...))``.

    The method without tag and overrides, the tag (None without one), and the estimator's spec (its base is
    the key of ``estimator_options``: the estimator name, or ``<name>@<tag>``; an empty base for ``pbrf``
    and the classical methods).
    """
    parsed = parse_spec(name, what="influence method")
    base, at, tag = parsed.base.partition("@")
    est = parsed.base[len("pbrf-"):] if base.startswith("pbrf-") else ""
    return base, (tag if at else None), Spec(est, parsed.overrides)


_RESERVED = {"metric": "the estimator's metric is the loss's Bregman divergence"}


def check_method(name: str) -> str:
    """Return ``name`` if it is a known method, else raise ``ValueError`` listing the known ones.

    ``pbrf-<estimator>@<tag>`` is the same method with the options given for ``<estimator>@<tag>``;
    ``pbrf-<estimator>[key=value,...]`` overrides options of the estimator's config (an unknown key is
    refused, naming the valid ones).
    """
    if not isinstance(name, str):
        raise TypeError(f"a method name must be a string, got {type(name).__name__}")
    base, tag, spec = parse_method_name(name)
    if base not in method_names() or (tag is not None and (not tag or not base.startswith("pbrf-"))):
        raise UsageError(f"unknown influence method {name!r}; choose from {method_names()} "
                         "(optionally pbrf-<estimator>@<tag> and pbrf-<estimator>[key=value,...])")
    if spec.overrides:
        if not base.startswith("pbrf-"):
            raise UsageError(f"influence method {base!r} has no estimator; cannot set {spec.keys()} "
                             f"(in {name!r})")
        est = base[len("pbrf-"):]
        check_keys(spec, config_keys(REGISTRY[est].Config), who=f"estimator {est!r}", reserved=_RESERVED)
    return name


@dataclasses.dataclass
class QueryResult:
    """One query: estimated changes (None where not asked for) and the time it took (wall and CPU)."""

    influence: float | None
    self_influence: float | None
    seconds: float
    cpu_seconds: float
    stats: dict[str, Any] = dataclasses.field(default_factory=dict)


class InfluenceMethod:
    """Base class. ``setup`` once (timed separately), then ``query`` per removed training example."""

    name = "base"
    train: tuple[torch.Tensor, torch.Tensor]  # set by setup

    def setup(self, model: nn.Module, train: tuple[torch.Tensor, torch.Tensor], task: str,
              measurement: Measurement | None) -> None:
        """Prepare to answer queries about removing examples of ``train`` from ``model``'s training."""
        raise NotImplementedError

    def query(self, index: int, measure: bool = True, self_influence: bool = False) -> QueryResult:
        """Estimate the effect of removing training example ``index``."""
        raise NotImplementedError

    def stored_floats(self) -> int:
        """Floats the method keeps beyond ``theta_s`` to answer queries."""
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        """The method's name and options, for result files."""
        return {"name": self.name}

    def _example(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        X, Y = self.train
        if not 0 <= int(index) < X.shape[0]:
            raise IndexError(f"training index {index} out of range 0..{X.shape[0] - 1}")
        i = int(index)
        return X[i : i + 1], Y[i : i + 1]


class PBRFMethod(InfluenceMethod):
    """``pbrf`` (estimator None) or ``pbrf-<estimator>``.

    Args:
        estimator: registered estimator name, or None for the exact objective.
        estimator_options: fields of the estimator's config (``metric`` is set to the Bregman divergence).
        config: solver options.
    """

    def __init__(self, estimator: str | None = None, estimator_options: dict[str, Any] | None = None,
                 config: PBRFConfig | None = None) -> None:
        """A PBRF method (see the class for the arguments).

        Refuses an unknown estimator, a metric, and options under which a Monte Carlo estimator draws new
        samples at every evaluation (``fixed_noise`` False, the estimators' default, or a ``sample_pool``):
        :func:`~laftr.influence.pbrf.check_deterministic`.
        """
        if estimator is not None and estimator not in REGISTRY:
            raise UsageError(f"unknown estimator {estimator!r}; choose one of {available_estimators()}")
        self.estimator_name = estimator
        self.estimator_options = dict(estimator_options or {})
        if "metric" in self.estimator_options:
            raise UsageError("the estimator's metric is the loss's Bregman divergence; do not set it")
        if estimator is not None:  # refused now rather than after the estimator is fitted
            defaults = {f.name: f.default for f in dataclasses.fields(REGISTRY[estimator].Config)}
            if "fixed_noise" in defaults:
                opts = {**defaults, **self.estimator_options}
                check_deterministic(estimator, opts["fixed_noise"], opts.get("sample_pool", 0))
        self.config = config or PBRFConfig()
        self.name = "pbrf" if estimator is None else f"pbrf-{estimator}"
        self.est: FSDEstimator | None = None
        self.solver: PBRF | None = None

    def make_estimator(self, task: str) -> FSDEstimator:
        """The (unfitted) estimator of ``pbrf-<estimator>`` for ``task``; bad option values are refused."""
        assert self.estimator_name is not None
        try:
            return make_estimator(self.estimator_name, metric=BREGMAN_METRIC[task], **self.estimator_options)
        except (TypeError, LaftrError) as e:
            raise UsageError(f"bad options {self.estimator_options} for estimator "
                             f"{self.estimator_name!r}: {e}") from e

    def setup(self, model: nn.Module, train: tuple[torch.Tensor, torch.Tensor], task: str,
              measurement: Measurement | None) -> None:
        """Make the PBRF solver, fitting the estimator at ``model`` first for ``pbrf-<estimator>``."""
        self.train, self.task, self.measurement = train, task, measurement
        if self.estimator_name is None:
            self.solver = PBRF(model, train, task=task, config=self.config)
            return
        self.est = self.make_estimator(task)
        self.est.fit(model, train)
        self.solver = PBRF(model, fsd=self.est, num_train=int(train[0].shape[0]), task=task,
                           config=self.config)

    def query(self, index: int, measure: bool = True, self_influence: bool = False) -> QueryResult:
        """Solve the PBRF without example ``index``; its response and/or self-influence."""
        assert self.solver is not None, "call setup first"
        x, y = self._example(index)
        sol = self.solver.solve(x, y)
        t0, c0 = time.perf_counter(), time.process_time()
        infl = (self.solver.response(sol, self.measurement) if measure and self.measurement is not None
                else None)
        selfi = self.solver.example_loss_change(sol, x, y) if self_influence else None
        # the solve's time (its stationarity check excluded) plus the response evaluations
        return QueryResult(infl, selfi, sol.seconds + time.perf_counter() - t0,
                           sol.cpu_seconds + time.process_time() - c0, sol.stats())

    def stored_floats(self) -> int:
        """The estimator's stored floats, or the training set's for the exact PBRF."""
        if self.est is not None:
            return int(self.est.stored_floats())
        X, Y = self.train
        return int(X.numel() + Y.numel())

    def describe(self) -> dict[str, Any]:
        """The name, the PBRF options and the estimator's description."""
        d: dict[str, Any] = {"name": self.name, "pbrf": dataclasses.asdict(self.config)}
        if self.est is not None:
            d["estimator"] = self.est.describe()
        return d


class ClassicalMethod(InfluenceMethod):
    """``influence`` (conjugate gradient) or ``influence-exact`` (dense G)."""

    def __init__(self, config: InfluenceConfig | None = None) -> None:
        """The classical influence with ``config`` (its solver names the method)."""
        self.config = config or InfluenceConfig()
        self.name = "influence" if self.config.solver == "cg" else "influence-exact"
        self.ci: ClassicalInfluence | None = None

    def setup(self, model: nn.Module, train: tuple[torch.Tensor, torch.Tensor], task: str,
              measurement: Measurement | None) -> None:
        """Prepare the Gauss-Newton solves (and the measurement's gradient, if given)."""
        self.train, self.task = train, task
        self.ci = ClassicalInfluence(model, train, task=task, config=self.config)
        self.setup_info = None
        if measurement is not None:
            self.ci.set_measurement(measurement)
            self.setup_info = dataclasses.asdict(self.ci.last_info) if self.ci.last_info else None

    def query(self, index: int, measure: bool = True, self_influence: bool = False) -> QueryResult:
        """The classical influence of removing example ``index`` and/or its self-influence."""
        assert self.ci is not None, "call setup first"
        x, y = self._example(index)
        t0, c0 = time.perf_counter(), time.process_time()
        infl = self.ci.influence(x, y) if measure else None
        stats: dict[str, Any] = {}
        selfi = None
        if self_influence:
            selfi = self.ci.self_influence(x, y)
            if self.ci.last_info is not None:
                stats = {"cg_iterations": self.ci.last_info.iterations,
                         "cg_rel_residual": self.ci.last_info.rel_residual}
        return QueryResult(infl, selfi, time.perf_counter() - t0, time.process_time() - c0, stats)

    def stored_floats(self) -> int:
        """The training set's entries (the method keeps it)."""
        X, Y = self.train
        return int(X.numel() + Y.numel())

    def describe(self) -> dict[str, Any]:
        """The name, the options and the measurement's conjugate gradient statistics."""
        return {"name": self.name, "influence": dataclasses.asdict(self.config), "setup_cg": self.setup_info}


def make_method(name: str, *, pbrf: PBRFConfig | None = None, influence: InfluenceConfig | None = None,
                estimator_options: dict[str, dict[str, Any]] | None = None) -> InfluenceMethod:
    """Build a method by name.

    Args:
        name: ``pbrf``, ``influence``, ``influence-exact`` or ``pbrf-<registered estimator>``, optionally
            with a tag (``pbrf-laftr@full``) and overrides in brackets (``pbrf-laftr[num_samples=200]``).
        pbrf: solver options of the PBRF methods.
        influence: options of the classical influence (its ``solver`` is set by the name).
        estimator_options: per estimator name (or ``<name>@<tag>`` for a tagged variant), the fields of its
            config; the overrides in brackets replace them. A Monte Carlo estimator (``laftr``, ``liftr``)
            needs ``fixed_noise=True`` here (as in :data:`~laftr.influence.DEFAULT_ESTIMATOR_OPTIONS`): its
            default, fresh samples at every evaluation, is refused.
    """
    check_method(name)
    if name == "pbrf":
        return PBRFMethod(None, config=pbrf)
    if name in ("influence", "influence-exact"):
        cfg = dataclasses.replace(influence or InfluenceConfig(),
                                  solver="cg" if name == "influence" else "exact")
        return ClassicalMethod(cfg)
    base, _, spec = parse_method_name(name)
    est = base[len("pbrf-"):]
    options = {**(estimator_options or {}).get(spec.base, {}), **spec.options}
    meth = PBRFMethod(est, options, config=pbrf)
    meth.name = name
    return meth
