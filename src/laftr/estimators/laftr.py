"""LAFTR: the Linearized Activation Function TRick, by Monte Carlo and in closed form (``laftr-exact``).

Both networks run with the same linearization, decided by theta0: per-unit slopes and intercepts drawn from
the laws stored at theta0 (or theta0's own tangent on each input, ``gates="relu"``), normalizers likewise,
on inputs drawn from a stored input model. See METHOD.md sections 2 and 6.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterable, Iterator
from typing import Any, ClassVar

import torch
from torch import nn

from .. import distributed as dist_
from .._util import Data, autocast_dtype, is_batched, model_device_dtype, param_dict, promoted_dtype
from ..errors import UnsupportedOpError, UsageError
from ..graph import ForwardMode, MomentMode, OwnMode, SampleMode, TracedNet
from ..inputs import INPUT_MODELS, make_input_model
from ..metrics import QUADRATIC_METRICS, discrepancy
from ..moments import CacheMiss, JointMoments, Theta0Cache
from ..rules.base import Rule, registered_targets
from ..rules.gates import GateRule, gate_families
from ..summary import Summary, fit_summary, same_sites, same_theta0, theta0_fingerprint
from .base import EstimatorConfig, FSDEstimator, check_int, register

INPUT_MODEL_NAMES = tuple(sorted(INPUT_MODELS))


@dataclasses.dataclass
class LaftrBaseConfig(EstimatorConfig):
    """Options shared by ``laftr`` and ``laftr-exact``: the input model.

    Attributes:
        input_model: ``gaussian`` (full covariance), ``diag``, ``lowrank`` (rank ``rank`` + diagonal),
            ``classwise`` (one Gaussian and one set of gate laws per class, weighted by class frequency),
            ``mixture`` (the same on ``components`` k-means clusters, no labels needed), ``coreset``
            (``coreset_size`` real inputs), or for integer token inputs ``tokens`` (per-position categorical
            laws), ``tokens-classwise`` (per class) or ``tokens-mixture`` (on ``components`` k-means clusters
            of the one-hot sequences). See :mod:`laftr.inputs`.
        rank: rank of the ``lowrank`` input model.
        component_cov: ``full`` or ``diag`` covariance of each class's (``classwise``) or component's
            (``mixture``) Gaussian.
        classwise_cov: the former name of ``component_cov`` (kept so that old code and files work).
        coreset_size: number of stored inputs of the ``coreset`` input model.
        components: number of mixture components K.
        mixture_sample: inputs (chosen by a seeded hash) on which the mixture's k-means runs.
        vocab_size: number of token ids V of the token input models (ids ``0..V-1``); None: the largest id
            in the data + 1.
    """

    input_model: str = "gaussian"
    rank: int = 20
    component_cov: str = "full"
    classwise_cov: str | None = None
    coreset_size: int = 200
    components: int = 10
    mixture_sample: int = 4096
    vocab_size: int | None = None

    def __post_init__(self) -> None:
        """Check the input model options (``classwise_cov`` is the old name of ``component_cov``)."""
        super().__post_init__()
        if self.classwise_cov is not None:
            self.component_cov = self.classwise_cov
            self.classwise_cov = None
        if self.input_model not in INPUT_MODELS:
            raise UsageError(f"unknown input_model {self.input_model!r}; choose one of "
                             f"{sorted(INPUT_MODELS)}")
        if self.component_cov not in ("full", "diag"):
            raise UsageError(f"component_cov (classwise_cov) must be 'full' or 'diag', got "
                             f"{self.component_cov!r}")
        for name in ("rank", "coreset_size", "components", "mixture_sample"):
            check_int(self, name, minimum=1)
        if self.vocab_size is not None:
            check_int(self, "vocab_size", minimum=1)

    def unused(self, given: Iterable[str]) -> list[str]:
        """Input-model options given for an input model that does not read them (see the base class)."""
        reads = {"lowrank": {"rank"}, "coreset": {"coreset_size"},
                 "classwise": {"component_cov", "classwise_cov"},
                 "mixture": {"component_cov", "classwise_cov", "components", "mixture_sample"},
                 "tokens": {"vocab_size"}, "tokens-classwise": {"vocab_size"},
                 "tokens-mixture": {"vocab_size", "components", "mixture_sample"}}
        owners = {name: sorted(m for m, r in reads.items() if name in r)
                  for name in ("rank", "coreset_size", "component_cov", "classwise_cov", "components",
                               "mixture_sample", "vocab_size")}
        mine = reads.get(self.input_model, set())
        return [f"{name} applies to input_model {' / '.join(repr(m) for m in owners[name])}, not "
                f"{self.input_model!r}" for name in given if name in owners and name not in mine]

    def conflicting(self, given: Iterable[str]) -> list[str]:
        """``component_cov`` and its former name ``classwise_cov`` together (the old name won, silently)."""
        given = list(given)
        if "component_cov" in given and "classwise_cov" in given:
            return ["give component_cov or classwise_cov (its former name), not both"]
        return []

    def input_options(self) -> dict[str, Any]:
        """The options of the chosen input model."""
        opts: dict[str, Any] = {"seed": self.seed}
        if self.input_model == "lowrank":
            opts["rank"] = self.rank
        elif self.input_model == "coreset":
            opts["coreset_size"] = self.coreset_size
        elif self.input_model in ("classwise", "mixture"):
            opts["cov"] = self.component_cov
            if self.input_model == "mixture":
                opts.update(components=self.components, mixture_sample=self.mixture_sample)
        elif self.input_model.startswith("tokens"):
            opts["vocab_size"] = None if self.vocab_size is None else int(self.vocab_size)
            if self.input_model == "tokens-mixture":
                opts.update(components=self.components, mixture_sample=self.mixture_sample)
        return opts


@dataclasses.dataclass
class LaftrConfig(LaftrBaseConfig):
    """Options of the Monte Carlo estimator ``laftr``.

    Attributes:
        gates: ``bernoulli`` (the LAFTR estimator: every linearization drawn from its stored law; the name is
            historical, for ReLU gates the law is Bernoulli), ``relu`` (theta0's own linearization on each
            sampled input, for every op: its tangent at theta0's value; the name is historical too) or
            ``none`` (no linearization: each stream runs its real network on the sampled inputs, so the
            estimate is the exact FSD averaged over the input model -- LAFTR's input model without its
            linearization, the ablation that separates the two approximations; max pools take each stream's
            own maximum; ``None`` means the same). ``relu`` and ``none`` read no site law, so they neither fit
            nor keep one: their summary, files and stored floats are the input model's alone.
        num_samples: Monte Carlo samples per evaluation (inputs and linearizations).
        shared_masks: one draw of the linearization per call shared by the batch (the original code) instead
            of one per sample (lower variance).
        maxpool: ``argmax0`` (both streams take the theta0 stream's argmax, as METHOD.md states; what ``auto``
            means), ``sample`` (each window's position drawn from the stored frequency with which it was
            theta0's argmax on the data), or ``separate`` (each stream its own max, as the original code).
        linearize: ``all`` (the default: every op that is not affine is linearized -- activations, max
            pools, normalizations, softmax and attention, products of data) or ``activations`` (LAFTR's trick
            applied to activation functions only, the elementwise gates and max pools, as in the paper's
            networks; normalizations, softmax, attention, products and quotients of data run exactly in each
            stream on the sampled inputs, and their statistics are not kept). Not with
            ``gates="none"`` (nothing is linearized there).
        fixed_noise: reuse the same samples on every call (common random numbers) instead of fresh ones.
            theta0's outputs on the kept draw are computed once, so later calls run theta's stream alone
            on networks whose ops allow it (see ``sample_pool``).
        sample_pool: 0 (the default: every call draws its samples afresh) or P >= ``num_samples``: P samples
            -- inputs, their linearizations and theta0's outputs on them -- are drawn once (on the first
            evaluation on a device and dtype, from the seed) and kept in memory (not in files: a loaded
            estimator draws the same pool again); every call uses ``num_samples`` of them chosen at random
            without replacement. Each call is then an unbiased estimate of the average over the pool (itself
            a P-sample Monte Carlo estimate), at the cost of theta's stream alone on networks whose every op
            is linearized by a draw shared by the streams (gates, normalizers, affine ops:
            :meth:`laftr.rules.Rule.sample_separable`; both streams, with the pool's linearizations, through
            attention, products of data or theta0's max-pool selection). For training loops, where the same
            estimator is called every step. Not with ``fixed_noise``, ``shared_masks`` or ``gates="relu"``
            (theta0's own linearization draws nothing to keep).
    """

    gates: str = "bernoulli"
    num_samples: int = 64
    shared_masks: bool = False
    maxpool: str = "auto"
    fixed_noise: bool = False
    sample_pool: int = 0
    linearize: str = "all"

    def __post_init__(self) -> None:
        """Check the Monte Carlo options."""
        super().__post_init__()
        if self.gates is None:  # what a method spec's bare ``gates=none`` reads as
            self.gates = "none"
        if self.gates not in ("bernoulli", "relu", "none"):
            raise UsageError(f"unknown gates {self.gates!r}; choose 'bernoulli', 'relu' or 'none'")
        if self.maxpool not in ("auto", "sample", "argmax0", "separate"):
            raise UsageError(f"unknown maxpool mode {self.maxpool!r}; choose auto, "
                             "sample, argmax0 or separate")
        check_int(self, "num_samples", minimum=1)
        check_int(self, "sample_pool", minimum=0)
        if self.sample_pool:
            if self.sample_pool < self.num_samples:
                raise UsageError(f"sample_pool ({self.sample_pool}) must hold at least num_samples "
                                 f"({self.num_samples}) samples, or be 0 (no pool)")
            for name, bad in (("fixed_noise", self.fixed_noise), ("shared_masks", self.shared_masks),
                              (f"gates={self.gates!r}", self.gates != "bernoulli")):
                if bad:
                    raise UsageError(f"sample_pool cannot be combined with {name}")
        if self.linearize not in ("all", "activations"):
            raise UsageError(f"unknown linearize {self.linearize!r}; choose 'all' or 'activations'")
        if self.gates == "none" and self.linearize != "all":
            raise UsageError("gates='none' linearizes nothing: linearize must be 'all' (the default)")
        if self.gates == "none" and self.shared_masks:
            raise UsageError("gates='none' draws no linearization, so there is no mask to share: "
                             "shared_masks must be False")
        if self.gates == "none" and self.maxpool not in ("auto", "separate"):
            raise UsageError("gates='none' runs each stream's real network, max pools included: "
                             f"maxpool must be 'auto' or 'separate', got {self.maxpool!r}")
        if self.gates == "relu" and self.maxpool == "sample":
            raise UsageError("relu gates use theta0's own max-pool selection: "
                             "maxpool='argmax0' or 'separate'")
        for name in ("shared_masks", "fixed_noise"):
            if not isinstance(getattr(self, name), bool):
                raise UsageError(f"{name} must be True or False, got {getattr(self, name)!r}")

    def conflicting(self, given: Iterable[str]) -> list[str]:
        """As the base's, and ``shared_masks`` with theta0's own linearization, which draws none to share.

        (Refused as with ``gates="none"``.)
        """
        out = super().conflicting(given)
        if "shared_masks" in given and self.shared_masks and self.gates == "relu":
            out.append("gates='relu' takes theta0's own linearization on each input and draws none, so there "
                       "is no mask to share: shared_masks has no effect")
        return out

    @property
    def pool_mode(self) -> str:
        """The max-pool rule in use (``auto`` resolved: each stream's own max without linearization)."""
        if self.maxpool == "auto":
            return "separate" if self.gates == "none" else "argmax0"
        return self.maxpool


@dataclasses.dataclass
class LaftrExactConfig(LaftrBaseConfig):
    """Options of the closed form ``laftr-exact`` (metrics ``l2`` / ``mse``).

    Attributes:
        max_state: the largest number of joint units it will track (memory grows with its square).
        mu_outer: use ``E[c_i c_i] = E[c_i]^2`` for every unit (for ReLU: ``E[m m^T] = mu mu^T``), the
            original code's deterministic variant. It drops the variance terms and is biased; kept only so
            that the bias can be measured.
    """

    max_state: int = 12000
    mu_outer: bool = False
    #: the Monte Carlo estimator of the same method (named when a metric has no closed form)
    monte_carlo: ClassVar[str] = "laftr"

    def __post_init__(self) -> None:
        """Check the options; the closed form needs a quadratic metric."""
        super().__post_init__()
        if self.metric not in QUADRATIC_METRICS:
            mc = self.monte_carlo
            raise UsageError(f"{mc}-exact has a closed form only for metrics {sorted(QUADRATIC_METRICS)}; "
                             f"use the Monte Carlo {mc!r} estimator for {self.metric!r}")
        check_int(self, "max_state", minimum=1)
        if not isinstance(self.mu_outer, bool):
            raise UsageError(f"mu_outer must be True or False, got {self.mu_outer!r}")


class _LaftrBase(FSDEstimator):
    """Fitting, memory and persistence shared by ``laftr`` and ``laftr-exact``."""

    Config: ClassVar[type[EstimatorConfig]] = LaftrBaseConfig

    def __init__(self, config: LaftrBaseConfig | None = None, **kwargs: Any) -> None:
        super().__init__(config, **kwargs)
        self.summary: Summary | None = None
        self.site_signature: list[list[Any]] | None = None
        self._nets: dict[int, TracedNet] = {}
        self._laws: dict[tuple[str, torch.dtype], dict[str, Any]] = {}  # (device, dtype) -> site -> law
        self._gen: torch.Generator | None = None
        self._gen_seed: int | None = None
        #: fixed_noise and sample_pool: (device, dtype, stream seed) -> the draw kept for later calls (derived
        #: from the summary and the seed, not stored in files)
        self._draws: dict[tuple[str, torch.dtype, int], _Draw] = {}
        # laftr-exact: (device, dtype, group, mu_outer) -> theta0's moment pairs (derived, never saved)
        self._moment_caches: dict[tuple[Any, ...], Theta0Cache] = {}
        self._moment_cache_source: tuple[Any, ...] | None = None

    @property
    def cfg(self) -> Any:
        return self.config

    def _record_pools(self) -> bool:
        """Whether max-pool statistics are used (and so stored floats)."""
        return False

    def _reads_sites(self) -> bool:
        """Whether evaluation reads the sites' stored statistics; an estimator that does not keeps none."""
        return True

    def _reads_site(self, family: str) -> bool:
        """Whether evaluation reads the stored statistics of a site of ``family``.

        Those must be in the summary and count as stored floats; max pools' only with a sampled selection.
        """
        return self._reads_sites() and (family != "maxpool" or self._record_pools())

    # ------------------------------------------------------------------ fitting
    def _traced(self, model: nn.Module) -> TracedNet:
        """``model`` traced, with the ops the estimator's passes may run exactly without a rule."""
        return TracedNet(model, exact_unknown=self._runs_networks() or self._exact_ops() is not None)

    def _runs_networks(self) -> bool:
        """Whether evaluation runs the real networks (every op exactly: no rule needed)."""
        return False

    def _fit(self, model: nn.Module, data: Data) -> None:
        net = self._traced(model)
        c = self.cfg
        inputs = make_input_model(c.input_model, **c.input_options())
        inputs.label_limit = self._output_width  # class labels index the output units
        # max pools always record their argmax frequencies (cheap; stored floats only when sampled)
        self.summary = fit_summary(net, param_dict(model, detach=True), data, inputs, batch_size=c.batch_size,
                                   progress=c.progress, record_inputs=self._input_recorder(net),
                                   distributed=self._distributed, record_sites=self._reads_sites(),
                                   exact=self._exact_ops())
        self._after_summary(net)

    def _exact_ops(self) -> Callable[[Rule], bool] | None:
        """Which ops the estimator's passes run exactly instead of by their rule (None: none)."""
        return None

    def _input_recorder(self, net: TracedNet) -> Any:
        """An extra recorder for :func:`fit_summary` (LIFTR's per-op input moments); None here."""
        return None

    def _unregistered_rules(self) -> str:
        """The rule families of the fitted sites that no rule registered in this process has, named."""
        known = {cls.family for table in registered_targets().values() for cls in table.values()}
        missing = sorted({fam for _, fam, *_ in self.site_signature or []} - known)
        if not missing:
            return ""
        return (f"; the fit used rules of the families {missing}, which no rule registered in this process "
                "has: import the module that registers them (laftr.rules.register) before loading or using "
                "the estimator")

    def fit_summary_only(self, summary: Summary, model: nn.Module,
                         outputs: list[int] | None = None) -> _LaftrBase:
        """Use an existing (e.g. merged) summary fitted at ``model``'s current parameters."""
        if summary.inputs.name != self.cfg.input_model:
            raise UsageError(f"the summary has a {summary.inputs.name!r} input model, this estimator is "
                             f"configured for {self.cfg.input_model!r}")
        mine = make_input_model(self.cfg.input_model, **self.cfg.input_options()).sums_options()
        theirs = summary.inputs.sums_options()
        differ = sorted(k for k in {*mine, *theirs} if mine.get(k) != theirs.get(k))
        if differ:
            raise UsageError("the summary's input model was fitted with other options than this estimator's: "
                             + ", ".join(f"{k}={theirs.get(k)!r} (estimator: {mine.get(k)!r})"
                                         for k in differ))
        at = summary.theta0
        if at is not None and not same_theta0(at, theta0_fingerprint(param_dict(model, detach=True))):
            raise UsageError("the summary was fitted at other parameters than the model's current ones "
                             "(theta0): fit_summary_only takes the network the summary was fitted at")
        net = self._traced(model)
        fitted, model_sites = summary.recorded_sites(), summary.recorded_sites(net.signature())
        if fitted and not same_sites(fitted, model_sites):
            raise UsageError("the summary was fitted on another network than the model (their sites differ: "
                             f"{[s[:2] for s in fitted]} vs {[s[:2] for s in model_sites]}): "
                             "fit_summary_only takes the network the summary was fitted at")
        self._set_reference(model, outputs)
        self.summary = summary
        self._after_summary(net)
        self._after_fit(model)
        return self

    def _after_summary(self, net: TracedNet) -> None:
        assert self.summary is not None
        self.site_signature = net.signature()
        self._drop_unread_sites()
        needed = [s for s, r in net.sites.items() if self._reads_site(r.family)]
        missing = [s for s in needed if s not in self.summary.site_sums]
        for s in missing:
            unequal = getattr(net.sites[s], "unequal", None)  # (a max pool of unequal windows records none)
            if unequal:
                raise UnsupportedOpError(unequal)
        pools = [s for s in missing if net.sites[s].family == "maxpool"]
        if pools:  # (fit_summary_only: no pass has seen the pool's windows)
            raise UsageError(f"max-pool sites {pools} recorded no argmax frequencies, which maxpool='sample' "
                             "draws from (an adaptive pool of unequal windows records none); use "
                             "maxpool='argmax0' (the default) or 'separate'")
        if missing:
            raise ValueError(f"summary lacks statistics for sites {missing}")
        self._nets = {}
        # where the examples sit in each value, as found on the data (None: not found, e.g. batches of one
        # example, or no data seen): every traced copy of the network takes them instead of finding them on
        # its first draws, which may not tell (two drawn sequences of a small vocabulary that are equal)
        self._layouts = net.layouts
        self._forget_laws()
        self._draws.clear()
        self._moment_caches.clear()
        self._gen = None

    # ------------------------------------------------------------------ evaluation helpers
    def _net(self, model: nn.Module) -> TracedNet:
        key = id(model)
        net = self._nets.get(key)
        if net is None:
            net = self._traced(model)
            layouts = getattr(self, "_layouts", None)
            if layouts is not None:
                net.layouts = dict(layouts)
            if not same_sites(net.signature(), self.site_signature or []):
                raise ValueError(
                    "this model's sites (gates, normalizers, pools) differ from the ones the summary was "
                    f"fitted on ({[s[:2] for s in net.signature()]} vs "
                    f"{[s[:2] for s in self.site_signature or []]})"
                )
            self._nets = {key: net}
        return net

    def _forget_laws(self) -> None:
        """Drop the laws made from the summary (made again at the next use)."""
        self._laws.clear()

    def _site_laws(self, net: TracedNet, device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
        """Every site's law on ``device``/``dtype`` (cached)."""
        assert self.summary is not None
        key = (str(device), dtype)
        if key not in self._laws:
            counts = self.summary.counts
            self._laws[key] = {name: rule.law(self.summary.site_sums[name], counts, device, dtype)
                               for name, rule in net.sites.items() if name in self.summary.site_sums}
        return self._laws[key]

    def _generator(self, device: torch.device) -> torch.Generator:
        """The generator of this evaluation's samples: the seed's stream of this rank (see ``distance``).

        Kept between calls (fresh samples each call) unless ``fixed_noise``, and started afresh when the
        device or the stream changes.
        """
        seed = dist_.stream_seed(self.cfg.seed, getattr(self, "_stream", 0))
        if (self.cfg.fixed_noise or self._gen is None or self._gen.device != device
                or getattr(self, "_gen_seed", None) != seed):
            self._gen = torch.Generator(device).manual_seed(seed)
            self._gen_seed = seed
            self._gen_fresh = True  # nothing drawn from it yet (see _pool)
        return self._gen

    def sample_state(self) -> dict[str, Any] | None:
        """The sample stream's seed, device and generator state (None before the first evaluation)."""
        if self._gen is None or self.cfg.fixed_noise:  # (fixed_noise: every call starts from the seed)
            return None
        return {"seed": int(self._gen_seed or 0), "device": str(self._gen.device),
                "generator": self._gen.get_state()}

    def load_sample_state(self, state: dict[str, Any] | None) -> None:
        """Continue the sample stream where :meth:`sample_state` was taken (None: from the seed afresh)."""
        if state is None:
            self._gen, self._gen_seed = None, None
            return
        if (not isinstance(state, dict) or sorted(state) != ["device", "generator", "seed"]
                or not isinstance(state["generator"], torch.Tensor) or isinstance(state["seed"], bool)
                or not isinstance(state["seed"], int) or not isinstance(state["device"], str)):
            raise UsageError(f"{self.name}: not a sample state (a dict of seed, device and generator): "
                             f"{state!r:.80}")
        if self.cfg.fixed_noise:
            raise UsageError(f"{self.name} with fixed_noise draws the same samples at every call: it has no "
                             "sample state to restore")
        if (state["seed"] - self.cfg.seed) % dist_.STREAM_STRIDE:
            raise UsageError(f"{self.name}: a sample state of seed {state['seed']}, which is no stream of "
                             f"this estimator's seed {self.cfg.seed}")
        try:
            gen = torch.Generator(torch.device(state["device"]))
            gen.set_state(state["generator"].cpu())
        except (RuntimeError, TypeError) as e:
            raise UsageError(f"{self.name}: the sample state does not fit a generator on "
                             f"{state['device']} here: {e}") from None
        self._gen, self._gen_seed, self._gen_fresh = gen, state["seed"], False

    # ------------------------------------------------------------------ memory and persistence
    def stored_floats(self) -> int:
        """The floats of the summary: every site's statistics per group and the input model's.

        ``laftr-exact``'s cache of theta0's moments is not counted: it is derived from theta0 and the summary
        (on the first evaluation), not stored; a saved and loaded estimator rebuilds it.
        """
        if self.summary is None:
            return 0
        s = self.summary
        families = {name: fam for name, fam, *_ in self.site_signature or []}
        per_group = 0
        for name, d in s.site_sums.items():
            if self._reads_site(families.get(name, "")):
                per_group += sum(int(v[0].numel()) for v in d.values())
        groups = s.inputs.nonempty_groups() if s.inputs.grouped else 1
        return groups * per_group + s.inputs.stored_floats()

    def _state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        assert self.summary is not None
        return self.summary.tensors(), {"summary": self.summary.meta(), "sites": self.site_signature}

    def _load_state(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        if "input_model" not in meta.get("summary", {}):
            tensors, meta = _from_format_v1(tensors, meta, self.cfg)
        self.summary = Summary.from_tensors(tensors, meta["summary"])
        if self.theta0 is not None:  # (the file's theta0, read first): merges and fit_summary_only check it
            self.summary.theta0 = theta0_fingerprint(self.theta0)
        self._draws.clear()
        if self.summary.inputs.name != self.cfg.input_model:
            raise ValueError(f"the stored input model {self.summary.inputs.name!r} does not match the "
                             f"config's {self.cfg.input_model!r}")
        self._laws.clear()
        self._moment_caches.clear()
        self.site_signature = meta["sites"]
        self.summary.signature = self.site_signature  # (merges and fit_summary_only compare it)
        self._drop_unread_sites()
        for name, fam, *_ in self.site_signature or []:
            if name not in self.summary.site_sums and self._reads_site(fam):
                raise ValueError(f"summary lacks statistics for site {name!r} ({fam})")

    def _drop_unread_sites(self) -> None:
        """Keep no site statistics when evaluation reads none: what is stored is what is counted.

        For a summary given to ``fit_summary_only``, or a file written before such estimators stopped
        recording them.
        """
        if self.summary is None or not self.summary.site_sums:
            return
        if not self._reads_sites():
            self.summary = Summary({}, self.summary.inputs, self.summary.theta0, self.summary.signature)
            return
        # linearize="activations": the laws of the ops run exactly (max pools' are kept, as always)
        families = {name: fam for name, fam, *_ in self.site_signature or []}
        keep = {s: d for s, d in self.summary.site_sums.items()
                if families.get(s) == "maxpool" or self._reads_site(families.get(s, ""))}
        if len(keep) != len(self.summary.site_sums):
            self.summary = Summary(keep, self.summary.inputs, self.summary.theta0, self.summary.signature)


@register("laftr")
class LaftrEstimator(_LaftrBase):
    """LAFTR by Monte Carlo: any metric, any input model, sampled linearizations or theta0's own."""

    Config = LaftrConfig

    def _record_pools(self) -> bool:
        return self.cfg.pool_mode == "sample"

    def _reads_sites(self) -> bool:
        # theta0's own linearization (relu) and the real networks (none) read no stored site law
        return self.cfg.gates == "bernoulli"

    def _reads_site(self, family: str) -> bool:
        # with linearize="activations" only the activations' laws (and the max pools' when sampled) are read
        if self.cfg.linearize == "activations" and family != "maxpool" and family not in gate_families():
            return False
        return super()._reads_site(family)

    def _runs_networks(self) -> bool:
        return self.cfg.gates == "none"

    def _per_example_values(self) -> bool:
        # gates="none" records no site and draws no linearization: the real networks run on the sampled
        # inputs as wholes (a mixture-of-experts layer's routed tokens are no example's), as subset's do
        return not self._runs_networks()

    def _after_summary(self, net: TracedNet) -> None:
        super()._after_summary(net)
        self._fit_net = net  # (for the fit's probe, which takes it: :meth:`_after_fit`)

    def _after_fit(self, model: nn.Module) -> None:
        """One evaluation of two samples at theta0: an op its linearization refuses is refused now.

        (``gates="relu"`` reads no site law at fit, so an op whose linearization at theta0 refused its input
        passed the fit and failed at the first use.) The probe runs on the fit's own traced network, whose
        layouts were found on the data (a sampled pass where they were not is skipped: two samples may not
        tell them; theta0's own linearization and the real networks need none), and draws from a generator
        of its own: the evaluations' samples and networks are those without it. The
        laws it makes from the summary are the evaluations' (made at the fit instead of the first use).
        """
        net = self.__dict__.pop("_fit_net", None)

        def probe() -> None:
            assert self.summary is not None
            if net is None:
                return
            device, dtype = model_device_dtype(model)
            gen = torch.Generator(device).manual_seed(0)
            x, groups = self.summary.inputs.sample(2, gen, device, dtype)
            p0 = self.theta0_on(model)
            mode = self._mode(net, [p0, p0], groups, gen, device, dtype)
            if net.finds_layouts(mode):  # (not found on the data: two samples may not tell them)
                return
            with torch.no_grad():
                net.run((x, x), mode)

        dist_.agree(probe, f"{self.name}.fit") if self._distributed else probe()

    @property
    def pool_mode(self) -> str:
        """The max-pool rule in use (``auto`` resolved)."""
        return self.cfg.pool_mode

    def _mode(self, net: TracedNet, params: list[dict[str, torch.Tensor]], groups: torch.Tensor,
              gen: torch.Generator, device: torch.device, dtype: torch.dtype) -> Any:
        """The interpreter mode of one evaluation over the streams of ``params``.

        Sampled linearizations, theta0's own (``gates="relu"``) or none (``gates="none"``: the real networks).
        """
        if self.cfg.gates == "relu":
            return self._linearizing(OwnMode(params, self.pool_mode))
        if self.cfg.gates == "none":
            return ForwardMode(params)
        return self._linearizing(SampleMode(params, self._site_laws(net, device, dtype), groups, gen,
                                            self.cfg.shared_masks, self.pool_mode))

    def _exact_ops(self) -> Callable[[Rule], bool] | None:
        # linearize="activations": the fit records (and evaluation reads) the activations' laws only
        return _not_an_activation if self.cfg.linearize == "activations" else None

    def _linearizing(self, mode: Any) -> Any:
        """``mode``, running exactly the ops that ``linearize`` leaves alone."""
        mode.exact = self._exact_ops()
        return mode

    def _draw(self, gen: torch.Generator, device: torch.device, dtype: torch.dtype) -> _Draw:
        """This evaluation's input samples and their groups, drawn from ``gen`` or kept from a previous call.

        With ``fixed_noise`` every call would draw the same from the reseeded generator: the draw is kept with
        the generator's state after it, which later calls restore, so they draw the same linearizations next,
        bit for bit.
        """
        assert self.summary is not None
        key = self._draw_key(device, dtype)
        d = self._draws.get(key) if self.cfg.fixed_noise else None
        if d is not None:
            assert d.state is not None
            gen.set_state(d.state)
            return d
        x, groups = self.summary.inputs.sample(self.cfg.num_samples, gen, device, dtype)
        d = _Draw(x, groups, gen.get_state())
        if self.cfg.fixed_noise:
            self._draws[key] = d
        return d

    def _draw_key(self, device: torch.device, dtype: torch.dtype) -> tuple[Any, ...]:
        """Where a kept draw of ``device``/``dtype`` and the current sample stream lives in ``_draws``.

        Draws made under ``torch.autocast`` are kept apart: theta0's outputs on them hold its precision.
        """
        return (str(device), dtype, int(self._gen_seed or 0), autocast_dtype(device))

    def _pool(self, net: TracedNet, model: nn.Module, gen: torch.Generator, device: torch.device,
              dtype: torch.dtype) -> _Draw:
        """The sample pool on ``device``/``dtype``: drawn on first use (``sample_pool`` samples, recorded)."""
        assert self.summary is not None
        key = self._draw_key(device, dtype)
        source = (net, self.theta0)
        pool = self._draws.get(key)
        if pool is not None and pool.made_for(source):
            return pool
        # drawn from the seed's stream afresh, by a generator of its own; a fresh calls' stream starts where
        # the pool's ended (see _distance), and so does the stream when the pool is drawn again for another
        # network object (the same pool, the same next draws); a restored one goes on where it stands
        again = pool is not None
        gen, calls = torch.Generator(gen.device).manual_seed(int(self._gen_seed or 0)), gen
        P, chunk = self.cfg.sample_pool, max(self.cfg.num_samples, self.cfg.batch_size)
        x, groups = self.summary.inputs.sample(P, gen, device, dtype)
        p0, laws = self.theta0_on(model), self._site_laws(net, device, dtype)
        parts: list[dict[str, Any]] = []
        outs = []
        with torch.no_grad():
            for s in range(0, P, chunk):
                rec: dict[str, Any] = {}
                mode = self._linearizing(SampleMode([p0], laws, groups[s:s + chunk], gen, False,
                                                    self.pool_mode, recorded=rec))
                (z0,) = net.run((x[s:s + chunk],), mode)
                outs.append(z0)
                parts.append(rec)
        drawn = {site: _cat([r[site] for r in parts]) for site in parts[0]}
        pool = _Draw(x, groups, gen.get_state(), z0=torch.cat(outs), source=source, drawn=drawn,
                     separable=mode.separable(net))
        self._draws[key] = pool
        if again:
            calls.set_state(gen.get_state())
        return pool

    def _distance(self, model: nn.Module) -> torch.Tensor:
        assert self.summary is not None
        net = self._net(model)
        device, dtype = model_device_dtype(model)
        p = param_dict(model)
        gen = self._generator(device)
        if self.cfg.sample_pool:
            pool = self._pool(net, model, gen, device, dtype)
            assert pool.z0 is not None and pool.state is not None
            if getattr(self, "_gen_fresh", False):  # a fresh stream starts where the pool's drawing ended
                gen.set_state(pool.state)
            idx = torch.randperm(pool.x.shape[0], generator=gen, device=gen.device)[: self.cfg.num_samples]
            self._gen_fresh = False
            idx = idx.to(device)
            x, groups = pool.x.index_select(0, idx), pool.groups.index_select(0, idx)
            mode = self._linearizing(SampleMode([p], self._site_laws(net, device, dtype), groups, None, False,
                                                self.pool_mode, replay=pool.drawn, index=idx))
            if pool.separable:  # theta0's outputs are the pool's
                (z,) = net.run((x,), mode)
                return discrepancy(pool.z0.index_select(0, idx), z, self.metric, self.outputs).mean()
            mode.params = [self.theta0_on(model), p]
            z0, z = net.run((x, x), mode)
            return discrepancy(z0.detach(), z, self.metric, self.outputs).mean()
        draw = self._draw(gen, device, dtype)
        x, groups = draw.x, draw.groups
        source = (net, self.theta0)
        if draw.z0 is not None and draw.made_for(source):
            # fixed_noise: theta0's outputs on this draw are known; theta's stream alone, same linearizations
            if draw.drawn:  # the linearizations drawn by the first call, replayed
                laws = self._site_laws(net, device, dtype)
                mode = self._linearizing(SampleMode([p], laws, groups, None, self.cfg.shared_masks,
                                                    self.pool_mode, replay=draw.drawn))
            else:
                mode = self._mode(net, [p], groups, gen, device, dtype)
            (z,) = net.run((x,), mode)
            return discrepancy(draw.z0, z, self.metric, self.outputs).mean()
        mode = self._mode(net, [self.theta0_on(model), p], groups, gen, device, dtype)
        record = self.cfg.fixed_noise and isinstance(mode, SampleMode)
        if record:  # keep this call's linearizations: later calls replay them instead of drawing them again
            mode.recorded = {}
        z0, z = net.run((x, x), mode)
        z0 = z0.detach()
        if self.cfg.fixed_noise and mode.separable(net):
            draw.z0, draw.source = z0, source
            if record:
                draw.drawn = mode.recorded
        return discrepancy(z0, z, self.metric, self.outputs).mean()


def _not_an_activation(rule: Rule) -> bool:
    """Whether ``linearize="activations"`` runs the op exactly: all but the activations and max pools."""
    return not (isinstance(rule, GateRule) and rule.activation) and rule.family != "maxpool"


def _cat(parts: list[Any]) -> Any:
    """Recorded draws of consecutive chunks joined along the sample axis (tensors or tuples of them)."""
    if isinstance(parts[0], torch.Tensor):
        return torch.cat(parts)
    return type(parts[0])(_cat(list(col)) for col in zip(*parts, strict=True))


@dataclasses.dataclass(eq=False)
class _Draw:
    """Samples kept for later calls: ``fixed_noise``'s draw, or the ``sample_pool``.

    Attributes:
        x: the input samples; groups: their groups.
        state: ``fixed_noise``: the generator's state right after drawing ``x`` (before the linearizations);
            ``sample_pool``: the pool's generator's state after drawing it (where a fresh stream starts).
        z0: theta0's outputs on them (``fixed_noise``: once known, and only on networks whose streams are
            separable), with ``source``, the traced network and theta0 they were computed with.
        drawn: the linearizations, site name -> the draw (leading axis the sample): the pool's, or
            ``fixed_noise``'s (recorded by the call that computed ``z0``, replayed by the later ones).
        separable: the pool's network runs theta's stream alone (decided once, when the pool is drawn).
    """

    x: torch.Tensor
    groups: torch.Tensor
    state: torch.Tensor | None = None
    z0: torch.Tensor | None = None
    source: tuple[Any, ...] = ()
    drawn: dict[str, Any] = dataclasses.field(default_factory=dict)
    separable: bool = False

    def made_for(self, source: tuple[Any, ...]) -> bool:
        """Whether it was computed with exactly these objects (the traced network, theta0)."""
        return len(self.source) == len(source) and all(
            a is b for a, b in zip(self.source, source, strict=True))


#: laftr-exact below float64 is recomputed in float64 when its distance is not above this many units of the
#: dtype's precision times the outputs' second moments (what the rounding of a + b - 2c is relative to)
PRECISION_MARGIN = 100.0


@register("laftr-exact")
class LaftrExactEstimator(_LaftrBase):
    """LAFTR in closed form for the ``l2``/``mse`` metric.

    Second moments are propagated exactly through the linearized network with its stored laws (no sampling
    noise). Every input model; grouped ones (classwise, mixture) are weighted sums over their groups. No max
    pooling.

    The moments of theta0's stream alone do not depend on the parameters evaluated: the first evaluation on a
    device and dtype keeps the ones later evaluations read (a cache of :class:`laftr.moments.Theta0Cache`,
    one per group), so that those compute only what depends on theta. The cache is derived from theta0 and
    the summary: it is not written to files (a loaded estimator rebuilds it on its first evaluation), is not
    counted by :meth:`stored_floats`, and is dropped when the estimator is fitted or loaded again.
    """

    Config = LaftrExactConfig

    def _fit(self, model: nn.Module, data: Data) -> None:
        with self._named_as_mine():
            super()._fit(model, data)

    def _after_fit(self, model: nn.Module) -> None:
        with self._named_as_mine():
            self._first_pass(model)

    @contextlib.contextmanager
    def _named_as_mine(self) -> Iterator[None]:
        """Refusals that the rules word for ``laftr-exact`` name this estimator and its Monte Carlo one.

        (They told a ``liftr-exact`` user to use 'laftr'.)
        """
        mc = self.cfg.monte_carlo
        try:
            yield
        except (UnsupportedOpError, MemoryError) as e:
            if mc == "laftr" or "laftr-exact" not in str(e):
                raise
            text = str(e).replace("laftr-exact", f"{mc}-exact")
            text = text.replace("'laftr' estimator", f"{mc!r} estimator")
            raise type(e)(text) from e

    def _first_pass(self, model: nn.Module) -> None:
        """One closed-form pass at theta0: an op without a closed form is refused now, not at the first use.

        The pass fills the cache of theta0's moments that every evaluation on this device and dtype reads, so
        it is work the first evaluation would otherwise do.
        """
        with torch.no_grad():
            self._distance(model)

    def _moment_mode(self, net: TracedNet, params: list[dict[str, torch.Tensor]], state: JointMoments,
                     laws: dict[str, Any], group: int, device: torch.device,
                     dtype: torch.dtype) -> MomentMode:
        """The interpreter mode propagating the joint second moment of one group."""
        mode = MomentMode(params, state, laws, group, self.cfg.mu_outer)
        mode.tokens = self._one_hot_inputs()
        return mode

    def _one_hot_inputs(self) -> bool:
        """Whether the input model holds token ids, as one-hot vectors in the closed form."""
        assert self.summary is not None
        inputs = self.summary.inputs
        return tuple(inputs.moment_shape) != tuple(inputs.input_shape or ())

    def _moment_cache(self, net: TracedNet, device: torch.device, dtype: torch.dtype,
                      group: int) -> Theta0Cache:
        """The cache of theta0's moments of ``group`` on ``device``/``dtype`` for ``net``.

        Started afresh when theta0 or the summary changed. Models that passed the check of their forward graph
        against theta0's (:mod:`laftr.fingerprint`) share it; without a fingerprint (a file of format 1) it
        belongs to one network object.
        """
        source = (self.theta0, self.summary, None if self.graph_fingerprint is not None else net)
        old = self._moment_cache_source
        if old is None or any(a is not b for a, b in zip(old, source, strict=True)):
            self._moment_caches.clear()
            self._moment_cache_source = source
        key = (str(device), dtype, group, bool(self.cfg.mu_outer), autocast_dtype(device))
        cache = self._moment_caches.get(key)
        if cache is None:
            cache = self._moment_caches[key] = Theta0Cache()
        return cache

    def _distance(self, model: nn.Module) -> torch.Tensor:
        with self._named_as_mine():
            return self._closed_distance(model)

    def _closed_distance(self, model: nn.Module) -> torch.Tensor:
        assert self.summary is not None
        net = self._net(model)
        device, dtype = model_device_dtype(model)
        p0 = self.theta0_on(model)
        p = param_dict(model)
        work = promoted_dtype(model)
        if any(t.is_floating_point() and t.dtype != work for t in p.values()):
            # layers of several floating dtypes (one bfloat16 layer in a float32 network): the joint moment
            # state, and the value, in the one they promote to (torch's addmv of a bfloat16 weight and float32
            # moments failed; the first parameter's, float16, rounded the float32 layers' distance)
            def same(t: torch.Tensor) -> torch.Tensor:
                return t.to(work) if t.is_floating_point() else t

            p, p0 = {n: same(t) for n, t in p.items()}, {n: same(t) for n, t in p0.items()}
            return self._closed_value(net, p, p0, device, work)
        return self._closed_value(net, p, p0, device, dtype)

    def _closed_value(self, net: TracedNet, p: dict[str, torch.Tensor], p0: dict[str, torch.Tensor],
                      device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """The closed-form distance of ``p`` from ``p0`` in ``dtype`` (float64 where it rounds to nothing)."""
        batched = is_batched(p.values())
        if not batched and p.keys() == p0.keys() and all(torch.equal(p[n], p0[n]) for n in p0):
            # theta is theta0 (after the pass, which refuses what the closed form cannot handle): the distance
            # and its gradient are exactly zero, while the blocks give a + b - 2c with a and b rounded along
            # different paths (~1e-7 of the outputs' second moment in float32)
            self._closed_form(net, p, p0, device, dtype)
            return sum((0.0 * t.sum() for t in p.values() if t.requires_grad), torch.zeros((), device=device,
                                                                                         dtype=dtype))
        if batched and dtype != torch.float64:
            # under torch.func.vmap (one value per parameter set) the rounding check below cannot branch
            # per set: every set takes the float64 path
            total = None
        else:
            total, scale = self._closed_form(net, p, p0, device, dtype)
        if total is None or (dtype != torch.float64 and not float(total.detach())
                             > PRECISION_MARGIN * torch.finfo(dtype).eps * scale):
            # in float32 (or less) a + b - 2c lost the distance to rounding: the outputs' second moments are
            # too large next to it (inputs of scale 1e6 gave -131072 for 0.15). In float64, back in the dtype.
            def wide(t: torch.Tensor) -> torch.Tensor:
                return t.double() if t.is_floating_point() else t

            total, _ = self._closed_form(net, {n: wide(t) for n, t in p.items()},
                                         {n: wide(t) for n, t in p0.items()}, device, torch.float64)
            total = total.to(dtype)
        return total

    def _closed_form(self, net: TracedNet, p: dict[str, torch.Tensor], p0: dict[str, torch.Tensor],
                     device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, float]:
        """The closed-form distance in ``dtype``, and the size its rounding is relative to (see ``l2``)."""
        assert self.summary is not None
        laws = self._site_laws(net, device, dtype)
        inputs = self.summary.inputs
        total = None
        scale = 0.0
        for g, w in enumerate(inputs.weights().tolist()):
            if w == 0:
                continue
            mean, second = inputs.moments(g, device, dtype)
            cache = self._moment_cache(net, device, dtype, g)

            def run(cache: Theta0Cache, g: int = g, mean: torch.Tensor = mean,
                    second: torch.Tensor = second) -> tuple[torch.Tensor, float]:
                # one-hot for tokens
                state = JointMoments(mean, second, inputs.moment_shape, self.cfg.max_state, cache,
                                     inputs.moment_factors(g, device, dtype))
                out = net.run((None, None), self._moment_mode(net, [p0, p], state, laws, g, device, dtype))
                d = state.l2(out, self.outputs)
                return d, getattr(state, "last_scale", 0.0)

            try:
                d, size = run(cache)
            except CacheMiss:  # cannot happen for a fixed network; rebuild the cache rather than fail
                cache.values.clear()
                cache.complete = False
                d, size = run(cache)
            cache.complete = True
            total = w * d if total is None else total + w * d
            scale += w * size
        assert total is not None
        return total, scale


def _from_format_v1(tensors: dict[str, torch.Tensor], meta: dict[str, Any], cfg: Any,
                    ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """A summary saved by laftr 0.1 (format 1) in today's layout.

    Format 1 kept one sum tensor per site (gate: how often each unit was on; max pool: argmax counts), the
    Gaussian sums and the coreset side by side, and a site signature ``[name, "gate"|"maxpool", slope]``.
    """
    old = meta["summary"]
    shape = [int(v) for v in old["input_shape"]]
    name = cfg.input_model
    out: dict[str, torch.Tensor] = {}
    if name == "coreset":
        out.update({"inputs/counts": tensors["counts"].sum().reshape(1), "inputs/x": tensors["coreset_x"],
                    "inputs/y": tensors["coreset_y"], "inputs/keys": tensors["coreset_keys"]})
    else:
        for k in ("counts", "x_sum", "x_sq", "x_outer"):
            if k in tensors:
                out[f"inputs/{k}"] = tensors[k]
    inputs_meta = {"options": make_input_model(name, **cfg.input_options()).options(), "input_shape": shape}
    sites: dict[str, list[str]] = {}
    signature = []
    for site, kind, slope in meta.get("sites") or []:
        t = tensors.get(f"site/{site}")
        if t is None:
            raise ValueError(f"format-1 summary lacks site {site!r}")
        if kind == "gate":
            family = "relu" if float(slope) == 0.0 else "leaky_relu"
            params = {} if family == "relu" else {"negative_slope": float(slope)}
            out[f"site/{site}/p1"] = t
            sites[site] = ["p1"]
            signature.append([site, family, params])
        elif kind == "maxpool":
            out[f"site/{site}/argmax"] = t
            sites[site] = ["argmax"]
            signature.append([site, "maxpool", None])
        else:
            raise ValueError(f"format-1 summary has a site of unknown kind {kind!r}")
    new_meta = {"summary": {"input_model": name, "inputs": inputs_meta, "sites": sites}, "sites": signature}
    return out, new_meta
