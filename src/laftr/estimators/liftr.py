"""LIFTR: a step-wise linearization at theta0 (METHOD.md section 6), by Monte Carlo.

From Dhawan et al., "Approximating Function Space Distance for Continual Learning in Transformers".

LAFTR runs the theta0 stream and the theta stream from one sampled input through the whole linearized network,
so theta0's values inside the network are those of the sampled input. LIFTR propagates only the change: at
every op with parameters (a Linear, an embedding, a normalization's affine part, attention's projections) and
at every product of two data tensors (attention scores and weighted sums), theta0's input ``x0`` is drawn
afresh from that op's own stored input moments (mean and diagonal or full covariance over the last axis, per
position, fitted at theta0), independently of the change ``dx`` arriving from below; the op then contributes
``f_theta(x0 + dx) - f_theta0(x0)`` (for a linear layer ``W dx + dW x0``). Elementwise activations,
normalizers and softmaxes pass the change through linearizations drawn from the same laws LAFTR stores
(Bernoulli or two-moment gates, normalizer laws, the Dirichlet law of the attention pattern). Ops that are
additive in their parameters (``x + pos``, a residual sum) and parameter-free linear ops need no anchor: the
change does not depend on ``x0`` there.

Memory: per anchored op and data input, the mean and variance (``input_cov="diag"``) or the mean and the
covariance over the last axis (``"full"``) per position — like K-FAC's input factors — plus LAFTR's site laws
and its input model (which supplies the inputs of the first layers). The estimator shares LAFTR's fitting,
persistence and Monte Carlo loop; only the interpreter mode differs (:class:`laftr.graph.StepMode`).
``liftr-exact`` is the closed form for ``l2`` (:class:`laftr.graph.StepMomentMode`): each anchor is a block
independent of the joint state with the stored first and second moments.
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Any, ClassVar

import torch
from torch import fx

from .._util import eigh_on_host
from ..errors import UsageError
from ..graph import FitMode, StepMode, StepMomentMode, TracedNet
from ..moments import JointMoments
from ..rules import IdentityRule, ShapeRule, SumRule
from ..rules.affine import LikeRule
from ..rules.attention import EmbeddingRule
from ..rules.base import Rule, anchorable_pairs, pairs_in
from .base import register
from .laftr import LaftrConfig, LaftrEstimator, LaftrExactConfig, LaftrExactEstimator


@dataclasses.dataclass
class LiftrConfig(LaftrConfig):
    """Options of ``liftr`` (those of ``laftr`` plus the anchors' covariance).

    Attributes:
        input_cov: ``diag`` (mean and variance of every anchored op's input, per entry) or ``full`` (mean and
            covariance over the input's last axis, per position).
        input_model: as for ``laftr``; it supplies the inputs of the ops that read the network input (default
            ``diag``; ``tokens`` for token inputs).
    """

    input_model: str = "diag"
    input_cov: str = "diag"

    def __post_init__(self) -> None:
        """Check the options; LIFTR draws every linearization (``gates="bernoulli"``)."""
        super().__post_init__()
        _check_input_cov(self.input_cov)
        if self.gates != "bernoulli":
            raise UsageError("liftr draws every linearization from its stored law (gates='bernoulli'); "
                             "theta0's own linearization needs theta0's values on one input, which "
                             "liftr does not propagate")
        if self.sample_pool:
            raise UsageError("liftr has no sample_pool: its re-anchored inputs are drawn during the pass, "
                             "which the pool does not record")
        if self.linearize != "all":
            # (it fitted, and every evaluation failed: the anchors of the layers run exactly were not kept)
            raise UsageError("liftr linearizes every layer step by step from its stored inputs: "
                             "linearize must be 'all'; laftr[linearize='activations'] is LAFTR's trick on "
                             "the activations alone")


def _check_input_cov(value: Any) -> None:
    if value not in ("diag", "full"):
        raise UsageError(f"input_cov must be 'diag' or 'full', got {value!r}")


def anchor_candidates(net: TracedNet) -> set[str]:
    """The data-dependent nodes that may be anchored.

    Every op except sums, shape-only ops and identities (for them the change does not depend on theta0's
    input), the parts of a ``(values, indices)`` result (``torch.max(x, dim).values``, ``torch.sort(x)[0]``:
    its indices are each stream's own, not parameters), and except those whose only data input is the network
    input (the input model supplies theta0's input there), or for an embedding a view of it (token ids
    reshaped first).
    """
    out = set()
    for name, rule in net.rules.items():
        if name not in net.data_nodes or isinstance(rule, (SumRule, LikeRule, IdentityRule, ShapeRule)):
            continue
        source = rule.node.args[0] if rule.node.args else None
        if isinstance(source, fx.Node) and getattr(net.rules.get(source.name), "with_indices", False):
            continue
        inputs = [a for a in rule.node.all_input_nodes if a.name in net.data_nodes]
        if all(a is net.input_node for a in inputs):
            continue
        if isinstance(rule, EmbeddingRule) and all(a.name in net.input_only for a in inputs):
            # token ids reshaped before the embedding (Hugging Face's input_ids.view(-1, T)): computed exactly
            # from the ids the input model draws, as the network input itself
            continue
        out.add(name)
    return out


def is_anchored(rule: Rule, args: Any, kwargs: Any) -> bool:
    """Whether the op's parameters (or buffers) multiply its data.

    Then its change depends on theta0's input; this is decided at run time, where parameters are non-data
    pairs. Products of two data tensors are not anchored: they are linearized at theta0's factors, which come
    from anchored ops upstream (so attention written by hand, with SDPA or with nn.MultiheadAttention gives
    one estimate).
    """
    mod = rule.module
    if mod is not None and any(True for _ in itertools.chain(mod.parameters(), mod.buffers())):
        return True
    return any(not p.data for p in pairs_in((args, kwargs)))


def anchor_site(node: str, i: int | str) -> str:
    """The summary entry of the law of the ``i``-th data input of anchored ``node``.

    A string ``i`` names an internal layer of the op instead.
    """
    return f"{node}.in{i}" if isinstance(i, int) else f"{node}.{i}"


class InputRecorder:
    """Records, at theta0 while a summary is fitted, the moments of the inputs of anchored ops.

    Each value is recorded once (the first op that reads it names the entry), per group.
    """

    def __init__(self, candidates: set[str], cov: str) -> None:
        """A recorder of the inputs of the ``candidates`` nodes, with a ``cov`` covariance."""
        self.candidates = candidates
        self.cov = cov
        self._seen: dict[int, Any] = {}

    def begin_run(self) -> None:
        """Forget the values seen in the previous pass."""
        self._seen = {}

    def __call__(self, mode: FitMode, rule: Rule, args: Any, kwargs: Any) -> None:
        """Record the moments of the changing data inputs of an anchored op, once per value."""
        if rule.name not in self.candidates or not is_anchored(rule, args, kwargs):
            return
        for i, p in enumerate(anchorable_pairs((args, kwargs))):
            if id(p) in self._seen:
                continue
            self._seen[id(p)] = p
            x = p.vals[0]
            if x.is_complex():
                raise UsageError(f"liftr: {rule.describe()} reads complex data ({x.dtype}) with a parameter "
                                 "or buffer (complex rotary embeddings): its input's stored law is real; "
                                 "write the rotation with real tensors (rotate_half), or use laftr")
            if not x.is_floating_point():
                raise UsageError(f"liftr: {rule.describe()} reads integer data ({x.dtype}) inside the "
                                 "network; only the network input may be token ids")
            xf = x.detach().to(torch.float64).movedim(rule.native_batch_axis(), 0)
            self._add(mode, anchor_site(rule.name, i), xf)

    def inner(self, mode: FitMode, rule: Rule, key: str, value: Any) -> None:
        """The input of a rule's internal layer (e.g. nn.MultiheadAttention's output projection).

        Always recorded: it lies behind the op's own nonlinearity (the attention), so it depends on theta0
        even when the op reads the network input directly (and is then no candidate for its own input).
        """
        self._add(mode, anchor_site(rule.name, key), value.vals[0].detach().to(torch.float64))

    def _add(self, mode: FitMode, site: str, xf: torch.Tensor) -> None:
        mode.add(site, "m", xf)
        if self.cov == "diag":
            mode.add(site, "s", xf * xf)
        else:
            mode.add_outer(site, "o", xf)


class InputLaw:
    """A Gaussian per position with the stored mean and (diagonal or last-axis) covariance, per group."""

    def __init__(self, sums: dict[str, torch.Tensor], counts: torch.Tensor, device: torch.device,
                 dtype: torch.dtype) -> None:
        """Turn the stored sums into means and standard deviations (diag) or covariance factors."""
        n = counts.clamp_min(1)
        m = sums["m"] / n.view(-1, *([1] * (sums["m"].ndim - 1)))
        self.mean = m.to(device, dtype)
        if "s" in sums:
            var = (sums["s"] / n.view(-1, *([1] * (sums["s"].ndim - 1))) - m * m).clamp_min(0)
            self.sd: torch.Tensor | None = var.sqrt().to(device, dtype)
            self.factor: torch.Tensor | None = None
        else:
            second = sums["o"] / n.view(-1, *([1] * (sums["o"].ndim - 1)))
            cov = second - m.unsqueeze(-1) * m.unsqueeze(-2)
            evals, evecs = eigh_on_host(0.5 * (cov + cov.transpose(-1, -2)))
            self.factor = (evecs * evals.clamp_min(0).sqrt().unsqueeze(-2)).to(device, dtype)
            self.sd = None

    def moments(self, group: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean ``(n,)`` and second moment ``(n, n)`` of one example's flattened input in group ``group``.

        The covariance is block-diagonal over positions.
        """
        mean = self.mean[group]
        d = mean.shape[-1] if mean.ndim else 1
        flat = mean.reshape(-1)
        if self.sd is not None:
            cov = torch.diag(self.sd[group].reshape(-1) ** 2)
        else:
            assert self.factor is not None
            f = self.factor[group].reshape(-1, d, d)
            cov = torch.block_diag(*(f @ f.transpose(-1, -2)))
        return flat, cov + flat[:, None] * flat[None, :]

    def draw(self, groups: torch.Tensor, gen: torch.Generator, like: torch.Tensor) -> torch.Tensor:
        """One draw per example of ``like`` (``(n, *shape)``), from each example's group."""
        n = like.shape[0]
        if tuple(self.mean.shape[1:]) != tuple(like.shape[1:]):
            raise ValueError(f"liftr: stored input moments of shape {tuple(self.mean.shape[1:])}, the "
                             f"network produces {tuple(like.shape[1:])} (inputs of another size?)")
        if self.mean.shape[0] == 1:
            mean = self.mean[0].expand(n, *self.mean.shape[1:])
            idx = None
        else:
            idx = groups.to(self.mean.device)[:n]
            mean = self.mean.index_select(0, idx)
        z = torch.randn(like.shape, generator=gen, device=gen.device, dtype=like.dtype).to(like.device)
        if self.sd is not None:
            sd = self.sd[0] if idx is None else self.sd.index_select(0, idx)
            return mean + sd * z
        assert self.factor is not None
        d = like.shape[-1]
        zf = z.reshape(n, -1, d)  # (n, positions, d)
        noise = torch.empty_like(zf)
        for g in ([0] if idx is None else idx.unique().tolist()):  # one batched product per group
            rows = slice(None) if idx is None else (idx == g).nonzero().squeeze(1)
            noise[rows] = torch.einsum("pij,npj->npi", self.factor[g].reshape(-1, d, d), zf[rows])
        return mean + noise.reshape(like.shape)


class _Missing:
    """The place of a law the summary lacks.

    It is fine when the value was drawn for an earlier op, an error otherwise.
    """

    def __init__(self, rule: Rule) -> None:
        self.rule = rule

    def draw(self, groups: torch.Tensor, gen: torch.Generator, like: torch.Tensor) -> torch.Tensor:
        raise ValueError(f"liftr: the summary has no input moments for {self.rule.describe()} "
                         "(fitted on another network?)")


class _Anchored:
    """What ``liftr`` and ``liftr-exact`` share: the input recorder and the anchors' laws from the summary."""

    summary: Any
    cfg: Any

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # (device, dtype) -> node / site -> laws
        self._anchor_laws: dict[tuple[str, torch.dtype], dict[str, Any]] = {}

    def _load_state(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        super()._load_state(tensors, meta)  # type: ignore[misc]  # a mixin, as above
        self._anchor_laws = {}

    def _forget_laws(self) -> None:
        super()._forget_laws()  # type: ignore[misc]  # a mixin, as above
        self._anchor_laws = {}

    def _input_recorder(self, net: TracedNet) -> InputRecorder:
        return InputRecorder(anchor_candidates(net), self.cfg.input_cov)

    def _anchors(self, net: TracedNet, device: torch.device, dtype: torch.dtype) -> Any:
        """``anchors(rule, args, kwargs)`` and ``inner(rule, key)`` for the step-wise modes.

        The laws are cached per device/dtype.
        """
        assert self.summary is not None
        key = (str(device), dtype)
        laws = self._anchor_laws.setdefault(key, {})
        candidates = anchor_candidates(net)
        summary = self.summary

        def anchors(rule: Rule, args: Any, kwargs: Any) -> list[Any] | None:
            if rule.name not in candidates or not is_anchored(rule, args, kwargs):
                return None
            if rule.name not in laws:
                found = []
                for i in range(len(anchorable_pairs((args, kwargs)))):
                    sums = summary.site_sums.get(anchor_site(rule.name, i))
                    found.append(None if sums is None else InputLaw(sums, summary.counts, device, dtype))
                laws[rule.name] = found
            return [_Missing(rule) if law is None else law for law in laws[rule.name]]

        def inner(rule: Rule, key: str) -> Any:
            site = anchor_site(rule.name, key)
            if site not in laws:
                sums = summary.site_sums.get(site)
                if sums is None:
                    raise ValueError(f"liftr: the summary has no moments for the input of {key} "
                                     f"in {rule.describe()}")
                laws[site] = InputLaw(sums, summary.counts, device, dtype)
            return laws[site]

        return anchors, inner


@register("liftr")
class LiftrEstimator(_Anchored, LaftrEstimator):
    """LIFTR by Monte Carlo: the change propagated op by op.

    theta0's input of every anchored op is drawn from its stored moments (see the module docstring). Any
    metric; ``liftr-exact`` is its closed form for ``l2``.
    """

    Config: ClassVar[Any] = LiftrConfig

    def _mode(self, net: TracedNet, params: list[dict[str, torch.Tensor]], groups: torch.Tensor,
              gen: torch.Generator, device: torch.device, dtype: torch.dtype) -> Any:
        anchors, inner = self._anchors(net, device, dtype)
        return StepMode(params, self._site_laws(net, device, dtype), groups, gen, anchors, inner,
                        self.cfg.shared_masks, self.pool_mode)


@dataclasses.dataclass
class LiftrExactConfig(LaftrExactConfig):
    """Options of ``liftr-exact`` (those of ``laftr-exact`` plus the anchors' covariance; ``l2``/``mse``).

    Attributes:
        input_cov: ``diag`` or ``full`` (see :class:`LiftrConfig`).
        input_model: as for ``laftr-exact`` (default ``diag``).
    """

    input_model: str = "diag"
    monte_carlo: ClassVar[str] = "liftr"
    input_cov: str = "diag"

    def __post_init__(self) -> None:
        """Check the options, including the anchors' covariance."""
        super().__post_init__()
        _check_input_cov(self.input_cov)


@register("liftr-exact")
class LiftrExactEstimator(_Anchored, LaftrExactEstimator):
    """LIFTR in closed form for ``l2``/``mse``.

    The joint second moment is propagated through the step-wise linearization, each anchor a block independent
    of the state with its input's stored moments (no sampling noise; the same networks as ``laftr-exact``).
    """

    Config: ClassVar[Any] = LiftrExactConfig

    def _moment_mode(self, net: TracedNet, params: list[dict[str, torch.Tensor]], state: JointMoments,
                     laws: dict[str, Any], group: int, device: torch.device,
                     dtype: torch.dtype) -> StepMomentMode:
        anchors, _ = self._anchors(net, device, dtype)
        mode = StepMomentMode(params, state, laws, anchors, group, self.cfg.mu_outer)
        mode.tokens = self._one_hot_inputs()
        return mode
