"""Continual-learning methods: one table mapping method names to estimators and their configurations.

A method is ``none`` (fine-tuning), ``joint`` (train on all data seen so far: the ceiling), or an FSD
regularizer: an estimator name from :func:`laftr.make_estimator` plus its config, a penalty weight
``lam``, and optionally the number of old tasks evaluated per step. A method may be given with
overrides in brackets, e.g. ``laftr[lam=10,num_samples=100]`` or ``subset[coreset_size=786]`` (the spec
grammar of ``laftr.specs``); keys ``lam``, ``tasks_per_step``, ``penalty_every``, ``penalty_refresh``,
``fit_examples`` and ``match_memory`` set the method (of a regularized method only: ``none`` and ``joint``
refuse them), every other key the estimator's config, and an unknown key is refused when the method is
parsed.

``subset-eqmem`` and ``ntk-eqmem`` store as many inputs as fit in the memory of the ``laftr`` method's
summary on the same network and data (``k = round(laftr_floats / input_dim)``), for comparisons at equal
stored memory.

A method adapts to what a benchmark is made of (its *traits*, :data:`laftr.continual.TRAITS`): on token
inputs the LAFTR and LIFTR methods use the token input models (``laftr`` -> ``input_model=tokens``,
``laftr-classwise`` -> ``tokens-classwise``, ...), and on networks with attention ``kfac`` gives LayerNorm
and bare parameters (positional embeddings, a class token) a diagonal term (``unsupported=diag``). These
trait settings come before a benchmark's tuned values and the overrides in brackets, so both can still
change them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from ..errors import UsageError
from ..specs import check_keys, config_keys, parse_spec, split_specs
from .regularizer import _check_count, _check_lam

__all__ = ["METHODS", "TRAITS", "MethodSpec", "parse_method", "parse_methods"]

KINDS = ("finetune", "joint", "fsd")
_METHOD_KEYS = ("lam", "tasks_per_step", "penalty_every", "penalty_refresh", "fit_examples", "match_memory")

#: What a benchmark can be made of, in the order their settings are applied: ``tokens`` (the inputs are
#: integer token ids, which no Gaussian input model describes) and ``transformer`` (the network has
#: attention, LayerNorm and parameters outside any layer K-FAC factors).
TRAITS: tuple[str, ...] = ("tokens", "transformer")


@dataclass(frozen=True)
class MethodSpec:
    """A continual-learning method.

    Attributes:
        name: method name as given (with overrides, e.g. ``laftr[lam=10]``).
        base: name in :data:`METHODS` (without overrides).
        kind: ``finetune``, ``joint`` or ``fsd``.
        estimator: registry name of the FSD estimator (``fsd`` methods).
        config: keyword arguments of the estimator's config.
        lam: penalty weight.
        tasks_per_step: old tasks averaged per step (None: all).
        penalty_every: the penalty on every this many-th step only, weighted by it (see
            :class:`laftr.continual.FSDRegularizer`'s ``every``).
        penalty_refresh: the penalty estimated afresh on every this many-th step, its first-order expansion
            (the gradient reused) on the steps in between (``FSDRegularizer``'s ``refresh``).
        fit_examples: fit each task's estimator on a random subset of this many of its training examples
            (None: all of them; the subset is drawn from its own seeded stream, so training is unchanged).
        match_memory: ``laftr``: choose ``coreset_size`` so the stored inputs match that method's memory.
        description: one line for tables and docs.
        adapt: per trait (see :data:`laftr.continual.TRAITS`), estimator config keys that replace ``config``
            on benchmarks with that trait (e.g. ``{"tokens": {"input_model": "tokens"}}``).
    """

    name: str
    base: str
    kind: str
    estimator: str | None = None
    config: dict[str, Any] = field(default_factory=dict)
    lam: float = 1.0
    tasks_per_step: int | None = None
    penalty_every: int = 1
    penalty_refresh: int = 1
    fit_examples: int | None = None
    match_memory: str | None = None
    description: str = ""
    adapt: dict[str, dict[str, Any]] = field(default_factory=dict)

    def with_overrides(self, overrides: dict[str, Any], name: str | None = None) -> MethodSpec:
        """A copy with method keys (``lam``, ``tasks_per_step``, ...) and estimator config keys replaced."""
        method = {k: v for k, v in overrides.items() if k in _METHOD_KEYS}
        cfg = {k: v for k, v in overrides.items() if k not in _METHOD_KEYS}
        if cfg and self.kind != "fsd":
            raise UsageError(f"method {self.base!r} has no estimator; cannot set {sorted(cfg)}")
        if method and self.kind != "fsd":
            raise UsageError(f"method {self.base!r} has no regularizer; cannot set {sorted(method)}")
        if "lam" in method:
            method["lam"] = _check_lam(method["lam"])
        for key, allow_none in (("tasks_per_step", True), ("penalty_every", False),
                                ("penalty_refresh", False), ("fit_examples", True)):
            if key in method:
                _check_count(key, method[key], allow_none)
        if method.get("match_memory") is not None and method["match_memory"] != "laftr":
            raise UsageError(f"match_memory must be 'laftr' or None, got {method['match_memory']!r}")
        if "coreset_size" in cfg and self.match_memory:
            method["match_memory"] = None  # an explicit k wins over memory matching
        out = dataclasses.replace(self, name=name or self.name, config={**self.config, **cfg}, **method)
        if out.penalty_every > 1 and out.penalty_refresh > 1:
            raise UsageError(f"method {out.name!r}: penalty_every and penalty_refresh are two ways of "
                             "estimating the penalty on fewer steps; set one of them")
        return out

    def adapted(self, traits: tuple[str, ...] | list[str] = ()) -> MethodSpec:
        """A copy whose config carries the settings of every trait in ``traits``.

        They are applied in the order of :data:`laftr.continual.TRAITS`.

        Raises:
            ValueError: an unknown trait.
        """
        unknown = sorted(set(traits) - set(TRAITS))
        if unknown:
            raise UsageError(f"unknown benchmark traits {unknown}; choose from {', '.join(TRAITS)}")
        cfg = dict(self.config)
        for trait in TRAITS:
            if trait in traits:
                cfg.update(self.adapt.get(trait, {}))
        return dataclasses.replace(self, config=cfg) if cfg != self.config else self

    def describe(self) -> dict[str, Any]:
        """The spec as a JSON-able dict (recorded in ``results.json``)."""
        return dataclasses.asdict(self)


def _fsd(base: str, estimator: str, description: str, adapt: dict[str, dict[str, Any]] | None = None,
         **config: Any) -> MethodSpec:
    return MethodSpec(name=base, base=base, kind="fsd", estimator=estimator, config=config,
                      description=description, adapt=adapt or {})


def _tokens(input_model: str) -> dict[str, dict[str, Any]]:
    """The trait settings of a method whose input model on token inputs is ``input_model``."""
    return {"tokens": {"input_model": input_model}}


#: Every method by name. Function-space methods that can use any metric use ``kl`` (the Bregman divergence
#: of the softmax cross-entropy, of which EWC/K-FAC are quadratic approximations); ``laftr-exact`` has a
#: closed form only for ``l2`` on logits (and none for attention). ``liftr`` (Dhawan et al.) uses the same
#: Monte Carlo loop as ``laftr`` with step-wise anchors; ``liftr-full`` stores full instead of diagonal
#: covariances of every anchored layer's input. Default ``lam`` values are the validation-selected ones of the
#: benchmarks (see ``laftr.continual.benchmarks``); 1.0 here is only the fallback. ``laftr-exact`` costs
#: about 25x a Monte Carlo evaluation on a 784-256-256 MLP (O(n^3) moment propagation), so it averages over
#: one old task drawn at random per step (an unbiased estimate of the mean over all old tasks).
METHODS: dict[str, MethodSpec] = {
    "none": MethodSpec("none", "none", "finetune", description="fine-tuning, no regularizer (the floor)"),
    "joint": MethodSpec("joint", "joint", "joint", description="all data of the tasks so far (the ceiling)"),
    "ewc": _fsd("ewc", "diag-fisher", "EWC: diagonal (true) Fisher from per-example gradients", metric="kl"),
    "kfac": _fsd("kfac", "kfac", "K-FAC (true) Fisher, Ritter et al. 2018", metric="kl",
                 adapt={"transformer": {"unsupported": "diag"}}),
    "ntk": _fsd("ntk", "ntk", "linearized network on k stored inputs", metric="kl", coreset_size=200,
                selection="random"),
    "subset": _fsd("subset", "subset", "exact FSD on k stored inputs (FROMP-like)", metric="kl",
                   coreset_size=200, selection="random"),
    "laftr": _fsd("laftr", "laftr", "LAFTR, Monte Carlo, full Gaussian input model", metric="kl",
                  input_model="gaussian", num_samples=40, adapt=_tokens("tokens")),
    "laftr-classwise": _fsd("laftr-classwise", "laftr", "LAFTR, Monte Carlo, one Gaussian (and mu) per class",
                            metric="kl", input_model="classwise", num_samples=40,
                            adapt=_tokens("tokens-classwise")),
    "laftr-exact": dataclasses.replace(
        _fsd("laftr-exact", "laftr-exact", "LAFTR in closed form (l2 on logits), Gaussian inputs; one old "
             "task per step", metric="l2", input_model="gaussian"), tasks_per_step=1),
    "laftr-coreset": _fsd("laftr-coreset", "laftr", "LAFTR, Monte Carlo, k stored inputs", metric="kl",
                          input_model="coreset", coreset_size=200, num_samples=40),
    "laftr-diag": _fsd("laftr-diag", "laftr", "LAFTR, Monte Carlo, diagonal Gaussian inputs (about 1/300 of "
                       "laftr's memory on 784-pixel images)", metric="kl", input_model="diag",
                       num_samples=40),
    "laftr-mixture": _fsd("laftr-mixture", "laftr", "LAFTR, Monte Carlo, 10-component mixture fitted without "
                          "labels (a Gaussian and gate laws per k-means cluster)", metric="kl",
                          input_model="mixture", components=10, num_samples=40,
                          adapt=_tokens("tokens-mixture")),
    "liftr": _fsd("liftr", "liftr", "LIFTR (Dhawan et al.), Monte Carlo, step-wise: diagonal input moments "
                  "of every layer; diagonal Gaussian network input (tokens: categorical laws)", metric="kl",
                  input_model="diag", num_samples=40, adapt=_tokens("tokens")),
    "liftr-full": _fsd("liftr-full", "liftr", "LIFTR with full covariances of every layer's input (per "
                       "position)", metric="kl", input_model="diag", input_cov="full", num_samples=40,
                       adapt=_tokens("tokens")),
}
METHODS["subset-eqmem"] = dataclasses.replace(
    METHODS["subset"], name="subset-eqmem", base="subset-eqmem", match_memory="laftr",
    description="subset with k chosen so k * input_dim matches the laftr summary's stored floats")
METHODS["ntk-eqmem"] = dataclasses.replace(
    METHODS["ntk"], name="ntk-eqmem", base="ntk-eqmem", match_memory="laftr",
    description="ntk with k chosen so k * input_dim matches the laftr summary's stored floats")


def _check_override_keys(spec: MethodSpec, parsed: Any) -> None:
    """Refuse an override key that neither the method nor its estimator's config has (when registered)."""
    from ..estimators.base import REGISTRY

    if spec.kind != "fsd":
        return  # with_overrides names any estimator key given to a method without one
    if spec.estimator not in REGISTRY:
        return  # an estimator registered later (or not at all): its make_estimator call checks the keys
    check_keys(parsed, [*_METHOD_KEYS, *config_keys(REGISTRY[spec.estimator].Config)],
               who=f"method {spec.base!r} (estimator {spec.estimator!r})")


def parse_method(text: str, defaults: dict[str, dict[str, Any]] | None = None,
                 traits: tuple[str, ...] | list[str] = ()) -> MethodSpec:
    """``"laftr"`` or ``"laftr[lam=10,num_samples=100]"`` -> :class:`MethodSpec`.

    Args:
        text: the method, optionally with ``key=value`` overrides in brackets (``laftr.specs`` grammar).
        defaults: per-method overrides applied before the ones in ``text`` (a benchmark's tuned values).
        traits: what the benchmark is made of (see :data:`laftr.continual.TRAITS`); their settings are
            applied first.

    Raises:
        ValueError: unknown method (the message lists the known ones), unknown trait, malformed overrides or
            an override key that neither the method nor its estimator has (the message lists the valid ones).
    """
    text = text.strip()
    parsed = parse_spec(text, what="method")
    base = parsed.base
    if base not in METHODS:
        raise UsageError(f"unknown method {base!r}; choose from {', '.join(METHODS)}")
    _check_override_keys(METHODS[base], parsed)
    spec = METHODS[base].adapted(traits)
    if defaults and base in defaults:
        spec = spec.with_overrides(defaults[base])
    return spec.with_overrides(parsed.options, name=text)


def parse_methods(text: str, defaults: dict[str, dict[str, Any]] | None = None,
                  traits: tuple[str, ...] | list[str] = ()) -> list[MethodSpec]:
    """A comma-separated list of methods (commas inside brackets belong to the overrides).

    ``defaults`` and ``traits`` are as in :func:`parse_method`.
    """
    parts = split_specs(text, what="methods")
    if not parts:
        raise UsageError("no methods given")
    specs = [parse_method(p, defaults, traits) for p in parts]
    names = [s.name for s in specs]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise UsageError(f"methods given twice: {dup}")
    return specs
