"""LAFTR: the Linearized Activation Function TRick (Monte Carlo and exact closed form).

Both networks run with the same gates, decided by theta0: Bernoulli gates with the stored activation
probability mu of every unit (or theta0's own pattern, ``gates="relu"``), on inputs drawn from a stored
input model. See METHOD.md section 2.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
from torch import nn

from .._util import Data, model_device_dtype, param_dict
from ..graph import BernoulliGates, ReluGates, TracedNet
from ..metrics import QUADRATIC_METRICS, discrepancy
from ..moments import exact_l2
from ..summary import Summary, fit_summary
from .base import EstimatorConfig, FSDEstimator, register

INPUT_MODELS = ("gaussian", "diag", "lowrank", "classwise", "coreset")


@dataclasses.dataclass
class LaftrConfig(EstimatorConfig):
    """Options of the LAFTR estimators.

    Attributes:
        input_model: ``gaussian`` (full covariance), ``diag``, ``lowrank`` (rank ``rank`` + diagonal),
            ``classwise`` (one Gaussian and one set of mu per class, weighted by class frequency) or
            ``coreset`` (``coreset_size`` real inputs).
        rank: rank of the ``lowrank`` input model.
        classwise_cov: ``full`` or ``diag`` covariance of each class's Gaussian.
        coreset_size: number of stored inputs of the ``coreset`` input model.
        gates: ``bernoulli`` (stored mu, the LAFTR estimator) or ``relu`` (theta0's own activation
            pattern on each input; Monte Carlo only).
        num_samples: Monte Carlo samples per evaluation (inputs and gate masks).
        shared_masks: one gate mask per call shared by the batch (the original code) instead of one per
            sample (lower variance).
        maxpool: ``argmax0`` (both streams take the theta0 stream's argmax, as METHOD.md states; what
            ``auto`` means), ``sample`` (each window's position drawn from the stored frequency with which it
            was theta0's argmax on the data), or ``separate`` (each stream its own max, as the original code).
            On the fsd-bench conv net ``argmax0`` and ``separate`` are about twice as accurate as ``sample``
            (docs/results.md).
        fixed_noise: reuse the same samples on every call (common random numbers) instead of fresh ones.
        max_state: exact version only: the largest number of joint units it will track.
        mu_outer: exact version only: use ``E[m m^T] = mu mu^T`` for every pair of units, the original
            code's deterministic variant. It drops the ``mu_i - mu_i^2`` diagonal term and is biased;
            kept only so that the bias can be measured.
    """

    input_model: str = "gaussian"
    rank: int = 20
    classwise_cov: str = "full"
    coreset_size: int = 200
    gates: str = "bernoulli"
    num_samples: int = 64
    shared_masks: bool = False
    maxpool: str = "auto"
    fixed_noise: bool = False
    max_state: int = 12000
    mu_outer: bool = False


class _InputModel:
    """Sampling and moments of the stored input model, per group, on one device/dtype."""

    def __init__(self, summary: Summary, cfg: LaftrConfig, device: torch.device, dtype: torch.dtype) -> None:
        self.kind = cfg.input_model
        self.shape = summary.input_shape
        self.device, self.dtype = device, dtype
        kw = {"device": device, "dtype": dtype}
        if self.kind == "coreset":
            if summary.coreset_x.shape[0] == 0:
                raise ValueError("the summary has no coreset; fit with input_model='coreset'")
            self.X = summary.coreset_x.to(**kw)
            self.weights = torch.ones(1, dtype=torch.float64)
            return
        if self.kind == "classwise":
            mean, var, cov = summary.moments()
            self.weights = summary.weights()
            full = cfg.classwise_cov == "full"
        else:
            m, v, c = summary.pooled_moments()
            mean, var, cov = m[None], v[None], None if c is None else c[None]
            self.weights = torch.ones(1, dtype=torch.float64)
            full = self.kind == "gaussian"
        self.mean = mean
        _G, d = mean.shape
        if full or self.kind == "lowrank":
            if cov is None:
                raise ValueError("this summary kept only the diagonal of the input covariance")
            evals, evecs = torch.linalg.eigh(cov)
            evals = evals.clamp_min(0)
        if full:
            self.cov = cov
            self.factor = evecs * evals.sqrt()[:, None, :]  # (G, d, d): x = mean + factor @ eps
            self.second = cov + mean[:, :, None] * mean[:, None, :]
        elif self.kind == "lowrank":
            r = min(cfg.rank, d)
            U = evecs[:, :, -r:] * evals[:, -r:].sqrt()[:, None, :]
            resid = (torch.diagonal(cov, dim1=1, dim2=2) - (U * U).sum(-1)).clamp_min(0)
            self.factor, self.diag = U, resid
            self.second = U @ U.transpose(1, 2) + torch.diag_embed(resid) + mean[:, :, None] * mean[:, None, :]
        else:  # diag (or classwise with diagonal covariances)
            self.diag = var
            self.second = torch.diag_embed(var) + mean[:, :, None] * mean[:, None, :]
        self.full = full
        self._cast = {}

    def group_moments(self, g: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self.kind == "coreset":
            X = self.X
            return X.mean(0), X.T @ X / X.shape[0]
        return self.mean[g].to(self.device, self.dtype), self.second[g].to(self.device, self.dtype)

    def sample(self, n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """``n`` inputs and their group index."""
        if self.kind == "coreset":
            k = self.X.shape[0]
            # every stored point n // k times, plus a random subset for the remainder: unbiased, and
            # deterministic inputs when k divides n
            full = torch.arange(k).repeat(n // k)
            rest = torch.randperm(k, generator=gen, device=gen.device)[: n % k].cpu()
            idx = torch.cat([full, rest]).to(self.device)
            x = self.X[idx]
            return x.view(-1, *self.shape), torch.zeros(len(idx), dtype=torch.long, device=self.device)
        G, d = self.mean.shape
        if G == 1:
            groups = torch.zeros(n, dtype=torch.long)
        else:
            groups = torch.multinomial(self.weights.float(), n, replacement=True,
                                       generator=_cpu_generator(gen))
        x = torch.empty(n, d, device=self.device, dtype=self.dtype)
        for g in groups.unique().tolist():
            sel = (groups == g).nonzero().squeeze(1).to(self.device)
            m = len(sel)
            mean = self._get("mean", g)
            if self.full or self.kind == "lowrank":
                F_ = self._get("factor", g)
                eps = torch.randn(m, F_.shape[1], generator=gen, device=gen.device, dtype=self.dtype).to(self.device)
                xs = mean + eps @ F_.T
                if self.kind == "lowrank":
                    eps2 = torch.randn(m, d, generator=gen, device=gen.device, dtype=self.dtype).to(self.device)
                    xs = xs + eps2 * self._get("diag", g).sqrt()
            else:
                eps = torch.randn(m, d, generator=gen, device=gen.device, dtype=self.dtype).to(self.device)
                xs = mean + eps * self._get("diag", g).sqrt()
            x[sel] = xs
        return x.view(n, *self.shape), groups.to(self.device)

    def _get(self, name: str, g: int) -> torch.Tensor:
        key = (name, g)
        if key not in self._cast:
            self._cast[key] = getattr(self, name)[g].to(self.device, self.dtype)
        return self._cast[key]


def _cpu_generator(gen: torch.Generator) -> torch.Generator:
    if gen.device.type == "cpu":
        return gen
    seed = int(torch.randint(0, 2**62, (1,), generator=gen, device=gen.device).item())
    return torch.Generator().manual_seed(seed)


class _GroupedBernoulli(BernoulliGates):
    """Bernoulli gates whose mu depends on each sample's group (class), for classwise input models."""

    def __init__(self, mu_groups: dict[str, torch.Tensor], pool_pi: dict[str, torch.Tensor], groups: torch.Tensor,
                 generator: torch.Generator, shared: bool, pool_mode: str) -> None:
        super().__init__(pool_pi, generator, shared, pool_mode)
        self.mu_groups = mu_groups
        self.groups = groups

    def gate(self, site, pre):  # type: ignore[override]
        s0 = pre.vals[0]
        mu = self.mu_groups[site.name]
        if tuple(mu.shape[1:]) != tuple(s0.shape[1:]):
            raise ValueError(f"gate site {site.name!r}: summary has units of shape {tuple(mu.shape[1:])}, the "
                             f"network produces {tuple(s0.shape[1:])} (input of another size?)")
        mu = mu.index_select(0, self.groups).to(s0.dtype)
        n = 1 if self.shared else s0.shape[0]
        u = torch.rand((n, *mu.shape[1:]), generator=self.generator, device=self.generator.device, dtype=s0.dtype)
        m = (u.to(s0.device) < mu).to(s0.dtype)
        if site.slope != 0.0:
            m = m + site.slope * (1 - m)
        return type(pre)(tuple(v * m for v in pre.vals), True)


@register("laftr")
class LaftrEstimator(FSDEstimator):
    """LAFTR, evaluated by Monte Carlo: any metric, any input model, Bernoulli or relu gates."""

    Config = LaftrConfig
    exact = False

    def __init__(self, config: LaftrConfig | None = None, **kwargs: Any) -> None:
        super().__init__(config, **kwargs)
        c: LaftrConfig = self.config  # type: ignore[assignment]
        if c.input_model not in INPUT_MODELS:
            raise ValueError(f"unknown input_model {c.input_model!r}; choose one of {list(INPUT_MODELS)}")
        if c.gates not in ("bernoulli", "relu"):
            raise ValueError(f"unknown gates {c.gates!r}; choose 'bernoulli' or 'relu'")
        if c.maxpool not in ("auto", "sample", "argmax0", "separate"):
            raise ValueError(f"unknown maxpool mode {c.maxpool!r}; choose auto, sample, argmax0 or separate")
        if c.classwise_cov not in ("full", "diag"):
            raise ValueError("classwise_cov must be 'full' or 'diag'")
        if c.num_samples < 1 or c.coreset_size < 1 or c.rank < 1:
            raise ValueError("num_samples, coreset_size and rank must be positive")
        if c.gates == "relu" and c.maxpool == "sample":
            raise ValueError("relu gates use theta0's own max-pool selection: maxpool='argmax0' or 'separate'")
        if self.exact:
            if c.metric not in QUADRATIC_METRICS:
                raise ValueError(f"laftr-exact has a closed form only for metrics {sorted(QUADRATIC_METRICS)}; "
                                 f"use the Monte Carlo 'laftr' estimator for {c.metric!r}")
            if c.gates != "bernoulli":
                raise ValueError("laftr-exact needs Bernoulli gates (relu gates depend on the input)")
        elif c.mu_outer:
            raise ValueError("mu_outer is an option of the closed form only (laftr-exact)")
        self.summary: Summary | None = None
        self.site_signature: list[list[Any]] | None = None
        self._nets: dict[int, TracedNet] = {}
        self._inputs: dict[tuple, _InputModel] = {}
        self._mu_cache: dict[tuple, dict[str, torch.Tensor]] = {}
        self._gen: torch.Generator | None = None

    @property
    def pool_mode(self) -> str:
        """The max-pool rule in use (``auto`` resolved)."""
        return "argmax0" if self.cfg.maxpool == "auto" else self.cfg.maxpool

    @property
    def cfg(self) -> LaftrConfig:
        return self.config  # type: ignore[return-value]

    # ------------------------------------------------------------------ fitting
    def _fit(self, model: nn.Module, data: Data) -> None:
        net = TracedNet(model)
        c = self.cfg
        self.summary = fit_summary(
            net, param_dict(model, detach=True), data, classwise=c.input_model == "classwise",
            full_cov=c.input_model in ("gaussian", "lowrank") or (c.input_model == "classwise" and c.classwise_cov == "full"),
            coreset_size=c.coreset_size if c.input_model == "coreset" else 0, seed=c.seed,
            batch_size=c.batch_size, progress=c.progress,
        )
        self._after_summary(net)

    def fit_summary_only(self, summary: Summary, model: nn.Module, outputs: list[int] | None = None) -> LaftrEstimator:
        """Use an existing (e.g. merged) summary fitted at ``model``'s current parameters."""
        self.outputs = outputs
        self.theta0 = param_dict(model, detach=True)
        from .._util import arch_signature

        self.arch = arch_signature(model)
        self.summary = summary
        self._after_summary(TracedNet(model))
        return self

    def _after_summary(self, net: TracedNet) -> None:
        assert self.summary is not None
        self.site_signature = net.signature()
        missing = [s for s in net.sites if s not in self.summary.site_sums]
        if missing:
            raise ValueError(f"summary lacks statistics for sites {missing}")
        self._inputs.clear()
        self._nets.clear()
        self._mu_cache.clear()
        self._gen = None

    # ------------------------------------------------------------------ evaluation
    def _net(self, model: nn.Module) -> TracedNet:
        key = id(model)
        net = self._nets.get(key)
        if net is None or net.gm is None:
            net = TracedNet(model)
            if net.signature() != self.site_signature:
                raise ValueError(
                    "this model's gate sites differ from the ones the summary was fitted on "
                    f"({[s[0] for s in net.signature()]} vs {[s[0] for s in self.site_signature or []]})"
                )
            self._nets = {key: net}
        return net

    def _input_model(self, device: torch.device, dtype: torch.dtype) -> _InputModel:
        key = (str(device), dtype)
        if key not in self._inputs:
            assert self.summary is not None
            self._inputs[key] = _InputModel(self.summary, self.cfg, device, dtype)
        return self._inputs[key]

    def _generator(self, device: torch.device) -> torch.Generator:
        if self.cfg.fixed_noise or self._gen is None or self._gen.device != device:
            self._gen = torch.Generator(device).manual_seed(self.cfg.seed)
        return self._gen

    def _distance(self, model: nn.Module) -> torch.Tensor:
        assert self.summary is not None
        net = self._net(model)
        device, dtype = model_device_dtype(model)
        p0 = self.theta0_on(model)
        p = param_dict(model)
        inputs = self._input_model(device, dtype)
        if self.exact:
            return self._exact(net, p0, p, inputs, device, dtype)
        gen = self._generator(device)
        x, groups = inputs.sample(self.cfg.num_samples, gen)
        pool_mode = self.pool_mode
        if self.cfg.gates == "relu":
            policy: Any = ReluGates(pool_mode)
        elif self.cfg.input_model == "classwise":
            policy = _GroupedBernoulli(self._means(device, dtype, True), self._means(device, dtype, False), groups,
                                       gen, self.cfg.shared_masks, pool_mode)
        else:
            policy = BernoulliGates(self._means(device, dtype, False), gen, self.cfg.shared_masks, pool_mode)
        z0, z = net.run((x, x), [p0, p], policy)
        return discrepancy(z0.detach(), z, self.metric, self.outputs).mean()

    def _means(self, device: torch.device, dtype: torch.dtype, per_group: bool) -> dict[str, torch.Tensor]:
        """Stored activation probabilities (and max-pool frequencies), pooled or per class; cached."""
        assert self.summary is not None
        key = (str(device), dtype, per_group)
        if key not in self._mu_cache:
            means = self.summary.site_means(group=-1 if per_group else None)
            self._mu_cache[key] = {k: v.to(device, dtype) for k, v in means.items()}
        return self._mu_cache[key]

    def _exact(self, net: TracedNet, p0: dict, p: dict, inputs: _InputModel, device: torch.device,
               dtype: torch.dtype) -> torch.Tensor:
        assert self.summary is not None
        classwise = self.cfg.input_model == "classwise"
        means = self._means(device, dtype, classwise)
        total = None
        for g, w in enumerate(inputs.weights.tolist()):
            if w == 0:
                continue
            gates = {}
            for name, site in net.sites.items():
                if site.kind != "gate":
                    continue
                mu = means[name][g] if classwise else means[name]
                e1 = mu + site.slope * (1 - mu)
                e2 = e1 * e1 if self.cfg.mu_outer else mu + site.slope**2 * (1 - mu)
                gates[name] = (e1, e2)
            mean, second = inputs.group_moments(g)
            d = exact_l2(net, [p0, p], mean, second, self.summary.input_shape, gates, self.outputs,
                         self.cfg.max_state)
            total = w * d if total is None else total + w * d
        assert total is not None
        return total

    # ------------------------------------------------------------------ memory and persistence
    def stored_floats(self) -> int:
        if self.summary is None:
            return 0
        c = self.cfg
        s = self.summary
        d = s.dim
        # one mu per gate unit; the max-pool argmax frequencies only when the pool rule samples from them
        pools = {name for name, kind, _ in self.site_signature or [] if kind == "maxpool"}
        units = sum(math.prod(v.shape[1:]) for k, v in s.site_sums.items()
                    if k not in pools or self.pool_mode == "sample")
        if c.input_model == "coreset":
            return units + int(s.coreset_x.shape[0]) * d
        if c.input_model == "gaussian":
            return units + d + d * d
        if c.input_model == "diag":
            return units + 2 * d
        if c.input_model == "lowrank":
            return units + d + d * min(c.rank, d) + d
        G = int((s.counts > 0).sum())  # groups are indexed by label; classes absent from the data store nothing
        per = 1 + d + (d * d if c.classwise_cov == "full" else d)
        return G * units + G * per

    def _state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        assert self.summary is not None
        return self.summary.tensors(), {"summary": self.summary.meta(), "sites": self.site_signature}

    def _load_state(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        self.summary = Summary.from_tensors(tensors, meta["summary"])
        self._mu_cache.clear()
        self._inputs.clear()
        self.site_signature = meta["sites"]
        for name, kind, _ in self.site_signature or []:
            if name not in self.summary.site_sums:
                raise ValueError(f"summary lacks statistics for site {name!r} ({kind})")


@register("laftr-exact")
class LaftrExactEstimator(LaftrEstimator):
    """LAFTR in closed form for the ``l2``/``mse`` metric: second moments propagated exactly through the
    Bernoulli-gated network (no sampling noise). Supports every input model, classwise mixtures included."""

    exact = True
