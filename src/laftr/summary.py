"""What LAFTR stores at theta0: site statistics per group and one input model.

The statistics of every site (gates, normalizers, max pools) per group, and one input model
(:mod:`laftr.inputs`), fitted in one streaming pass (two for the mixture).

All statistics are float64 *sums* per group (one group; one per class for ``classwise``; one per component
for ``mixture``), so the summary of several data shards is the sum of their summaries (:meth:`Summary.merge`):
a distributed fit is a plain all-reduce.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
from collections.abc import Callable, Iterator
from typing import Any

import torch
from tqdm.auto import tqdm

from ._util import EMPTY_DATA, Data, allow_empty_data, iter_batches, merged_first_batches
from .errors import DataError, UsageError
from .graph import FitMode, TracedNet
from .inputs import INPUT_MODELS, SAMPLE_GATHER, Candidates, CoresetInputs, InputModel, pad_groups
from .rules.base import Rule

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Summary:
    """Mergeable sufficient statistics of the training data at theta0.

    Attributes:
        site_sums: per site, its named float64 sums, each ``(G, ...)`` (G groups).
        inputs: the fitted input model (which also owns the groups and their example counts).
    """

    site_sums: dict[str, dict[str, torch.Tensor]]
    inputs: InputModel
    #: a fingerprint of the parameters it was fitted at (:func:`theta0_fingerprint`; None: not known, as for a
    #: summary read back from a file, whose estimator keeps theta0 itself)
    theta0: dict[str, tuple[Any, ...]] | None = None
    #: the sites of the network it was fitted on, ``[[name, family, params], ...]``
    #: (``TracedNet.signature()``; None: not known): summaries of a ReLU and a LeakyReLU network of the same
    #: weights have the same sites' names and statistics, not the same families
    signature: list[list[Any]] | None = None

    @property
    def counts(self) -> torch.Tensor:
        """``(G,)`` examples per group."""
        assert self.inputs.counts is not None
        return self.inputs.counts

    @property
    def num_groups(self) -> int:
        """G: the number of groups."""
        return int(self.counts.shape[0])

    @property
    def input_shape(self) -> tuple[int, ...]:
        """The per-example input shape."""
        assert self.inputs.input_shape is not None
        return self.inputs.input_shape

    @property
    def dim(self) -> int:
        """d: the number of entries of one input."""
        return self.inputs.dim

    def merge(self, other: Summary) -> Summary:
        """The summary of the union of both data sets (exact up to float64 rounding of sums).

        Raises:
            UsageError: summaries of different networks (sites, statistics or their shapes differ), or fitted
                at different parameters (theta0) -- their sums describe different functions.
        """
        if sorted(self.site_sums) != sorted(other.site_sums) or not same_sites(self.recorded_sites(),
                                                                               other.recorded_sites()):
            raise UsageError("cannot merge summaries of different networks (their sites differ)")
        if (self.theta0 is not None and other.theta0 is not None
                and not same_theta0(self.theta0, other.theta0)):
            raise UsageError("cannot merge summaries fitted at different parameters (theta0): fit every "
                             "shard at the same network")
        inputs = self.inputs.merge(other.inputs)
        G = max(self.num_groups, other.num_groups)
        sums = {}
        for site, d in self.site_sums.items():
            o = other.site_sums[site]
            d, o = _with_optional(d, o), _with_optional(o, d)
            if sorted(d) != sorted(o) or any(v.shape[1:] != o[k].shape[1:] for k, v in d.items()):
                raise UsageError(f"cannot merge summaries: site {site!r} records different statistics "
                                 "(another network, or other layer widths)")
            sums[site] = {k: pad_groups(v, G) + pad_groups(o[k], G) for k, v in d.items()}
        return Summary(sums, inputs, self.theta0 if self.theta0 is not None else other.theta0,
                       self.signature if self.signature is not None else other.signature)

    def recorded_sites(self, signature: list[list[Any]] | None = None) -> list[list[Any]]:
        """The entries of ``signature`` of the sites the summary holds statistics of.

        ``signature``: by default the summary's own (none if not known). A summary that records no site
        (``gates="none"``) is of any network's data.
        """
        sig = self.signature if signature is None else signature
        return [s for s in sig or [] if s[0] in self.site_sums]

    # ------------------------------------------------------------------ derived quantities
    def weights(self) -> torch.Tensor:
        """Fraction of examples in each group."""
        return self.inputs.weights()

    def site_means(self, group: int | None = None) -> dict[str, torch.Tensor]:
        """Per site, the mean of its first statistic.

        That is the activation probability mu of a ReLU-like gate, the argmax frequency of a max-pool
        position, the mean slope of a smooth gate, the mean normalizer. Pooled over groups when ``group`` is
        None, else stacked per group (``(G, *units)``).
        """
        out = {}
        for k, d in self.site_sums.items():
            v = next(iter(d.values()))
            if group is None:
                out[k] = v.sum(0) / self.counts.sum()
            else:
                out[k] = v / self.counts.clamp_min(1).view(-1, *([1] * (v.ndim - 1)))
        return out

    # ------------------------------------------------------------------ persistence
    def tensors(self) -> dict[str, torch.Tensor]:
        """Every sum by file key: ``inputs/<name>`` and ``site/<site>/<name>``."""
        out = {f"inputs/{k}": v for k, v in self.inputs.tensors().items()}
        for site, d in self.site_sums.items():
            for key, v in d.items():
                out[f"site/{site}/{key}"] = v
        return out

    def meta(self) -> dict[str, Any]:
        """The input model's name and metadata, and the statistic names of every site."""
        return {"input_model": self.inputs.name, "inputs": self.inputs.meta(),
                "sites": {site: sorted(d) for site, d in self.site_sums.items()}}

    @classmethod
    def from_tensors(cls, t: dict[str, torch.Tensor], meta: dict[str, Any]) -> Summary:
        """Inverse of :meth:`tensors` / :meth:`meta`; raises ``ValueError`` when inconsistent."""
        name = meta["input_model"]
        if name not in INPUT_MODELS:
            raise ValueError(f"unknown input model {name!r}")
        inputs = INPUT_MODELS[name](**meta["inputs"]["options"])
        inputs.restore({k[len("inputs/"):]: v for k, v in t.items() if k.startswith("inputs/")},
                       meta["inputs"])
        assert inputs.counts is not None  # restore() sets them
        G = int(inputs.counts.shape[0])
        sums: dict[str, dict[str, torch.Tensor]] = {}
        for site, keys in meta["sites"].items():
            sums[site] = {}
            for key in keys:
                v = t.get(f"site/{site}/{key}")
                if v is None:
                    raise ValueError(f"statistic {key!r} of site {site!r} is missing")
                if v.ndim < 1 or v.shape[0] != G:
                    raise ValueError(f"statistic {key!r} of site {site!r} has {v.shape[0] if v.ndim else 0} "
                                     f"groups, the input model {G}")
                if not torch.isfinite(v).all():
                    raise ValueError(f"statistic {key!r} of site {site!r} contains NaN or infinite values")
                sums[site][key] = v
        return cls(sums, inputs)


def fit_summary(
    net: TracedNet,
    theta0: dict[str, torch.Tensor],
    data: Data,
    inputs: InputModel | str = "gaussian",
    batch_size: int = 256,
    progress: bool = False,
    record_pools: bool = True,
    record_inputs: Any = None,
    distributed: bool = False,
    record_sites: bool = True,
    exact: Callable[[Rule], bool] | None = None,
    **input_options: Any,
) -> Summary:
    """One streaming pass over ``data`` at theta0 (two for the mixture): site statistics and the input model.

    Args:
        net: the traced network.
        theta0: its parameters (and buffers).
        data: loader / tensors; labels are needed by ``classwise``.
        inputs: an input model (unfitted), or its name (then built with ``input_options``).
        batch_size: used when ``data`` is a tensor.
        progress: progress bar.
        record_pools: record max-pool argmax frequencies (needed only to sample the selection).
        record_inputs: an extra recorder called before every data-dependent node (see :class:`FitMode`).
        record_sites: run theta0 on the data and record every site's statistics; False: the input model
            alone (no pass of the network; for estimators that read no site statistics, ``laftr`` with
            ``gates="relu"`` or ``"none"``). Not with ``record_inputs``.
        distributed: ``data`` is this rank's shard of a data set spread over the ranks of the initialized
            ``torch.distributed`` group: the sums are all-reduced and the coreset / k-means sample is chosen
            from every rank's candidates, so every rank gets the summary of the whole data set (a shard may be
            empty). Every rank must call it.
        exact: ``exact(rule)``: whether the site's op runs exactly in the pass, recording nothing (``laftr``'s
            ``linearize="activations"``: evaluation reads the activations' laws only).
        **input_options: options of a named input model (``seed``, ``rank``, ``cov``, ``coreset_size``, ...).
    """
    if isinstance(inputs, str):
        if inputs not in INPUT_MODELS:
            raise UsageError(f"unknown input_model {inputs!r}; choose one of {sorted(INPUT_MODELS)}")
        inputs = INPUT_MODELS[inputs](**input_options)
    elif input_options:
        raise UsageError("give input-model options to the input model, not to fit_summary")
    else:
        if inputs.input_shape is not None or inputs.counts is not None:
            raise UsageError(f"the {inputs.name!r} input model has already seen data (a fit would add to its "
                             "sums): give fit_summary an unfitted input model")
        # a copy: the one given stays unfitted, so the same object (e.g. a mixture with its centres set) can
        # be given for every shard
        inputs = copy.deepcopy(inputs)
    if not record_sites and record_inputs is not None:
        raise UsageError("record_inputs needs the network's pass over the data: not with record_sites=False")
    first = next(iter(theta0.values()), None)
    device = first.device if first is not None else torch.device("cpu")
    dtype = first.dtype if first is not None and first.is_floating_point() else torch.get_default_dtype()

    def batches() -> Any:
        return merged_first_batches(iter_batches(data, batch_size, device, dtype))

    model_in = inputs

    def readable_twice() -> None:
        if model_in.needs_first_pass and isinstance(data, Iterator):  # used up by the first pass
            raise DataError(f"input model {model_in.name!r} reads the data twice (a k-means sample, then the "
                            "sums), and this data can be read only once (a generator, an iterator, or an "
                            "iterable whose __iter__ hands out the same generator every time): pass a list "
                            "of batches, or a DataLoader or IterableDataset whose __iter__ starts afresh")

    def local() -> FitMode:
        with torch.no_grad():
            if model_in.needs_first_pass:
                readable_twice()
                model_in.prepare(batches)
            mode = FitMode([theta0], record_pools=record_pools, record_inputs=record_inputs)
            mode.exact = exact
            for x, y in tqdm(batches(), disable=not progress, desc="LAFTR summary"):
                if model_in.input_shape is None:  # iter_batches checks that every batch has the first's shape
                    model_in.begin(x)
                group = model_in.assign(x, y)
                if record_sites:
                    mode.group, mode.num_groups = group, int(group.max()) + 1
                    net.run((x,), mode)
                model_in.accumulate(x, y, group)
        return mode

    if distributed:
        from . import distributed as dist_

        def gather(sample: Callable[[], Candidates]) -> Candidates:
            keys, rows = dist_.agree(sample, "drawing the k-means sample")
            k, r = dist_.gather_rows([keys if len(keys) else None, rows])
            return (k if k is not None else keys), r

        # (before the k-means sample's own collectives: a rank refusing its data inside them left the others
        # waiting until the group's timeout)
        dist_.agree(readable_twice, "fitting the summary")
        token = SAMPLE_GATHER.set(gather)
        try:
            with allow_empty_data():
                mode = dist_.agree(local, "fitting the summary")
        finally:
            SAMPLE_GATHER.reset(token)
        return _reduce_summary(net, inputs, mode, record_pools, record_sites, exact)
    mode = local()
    inputs.finish()
    G = inputs.num_groups
    for d in mode.sums.values():
        G = max(G, max(v.shape[0] for v in d.values()))
    if G > inputs.num_groups and hasattr(inputs, "pad"):
        inputs.pad(G)
    sums = {site: {k: pad_groups(v, G).cpu() for k, v in d.items()} for site, d in mode.sums.items()}
    if record_sites:
        _check_sites(net, sums, record_pools, exact)
    assert inputs.counts is not None  # the pass over the data set them
    log.info("LAFTR summary: %d examples, %d groups, %d sites", int(inputs.counts.sum()), G, len(sums))
    return Summary(sums, inputs, theta0_fingerprint(theta0), net.signature())


def theta0_fingerprint(params: dict[str, torch.Tensor]) -> dict[str, tuple[Any, ...]]:
    """Per parameter, its shape and the float64 sum, sum of squares and position-weighted sum of its values.

    Cheap (one pass, a transfer of three numbers per parameter), and enough to tell the parameters a summary
    was fitted at from others in practice: it guards merging shards and ``fit_summary_only`` against a summary
    of another theta0. The sum weighted by a fixed draw per position tells a permutation of the values (two
    rows of a weight swapped: a network that computes another function) from the values in place;
    fingerprints of an earlier version hold the first two sums alone, and are compared on those.
    """
    names = sorted(params)
    if not names:
        return {}

    def sums(v: torch.Tensor) -> torch.Tensor:
        # (weights drawn from a fixed seed, the same on every device: cos(position) took positions 0 and 710
        # for the same, 1e-10 apart)
        w = torch.rand(v.numel(), generator=torch.Generator().manual_seed(17), dtype=torch.float64)
        return torch.stack((v.sum(), v.pow(2).sum(), (v.reshape(-1) * w.to(v.device)).sum())).cpu()

    moments = torch.stack([sums(params[n].detach().to(torch.float64)) for n in names]).tolist()
    return {n: (tuple(params[n].shape), *m) for n, m in zip(names, moments, strict=True)}


#: Site statistics recorded only once something is seen (a normalization's input that is exactly zero):
#: a summary without one has zeros there.
OPTIONAL_STATS = frozenset({"nu_zero"})


def _with_optional(mine: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``mine`` with zeros for the :data:`OPTIONAL_STATS` that only ``theirs`` recorded.

    Put after its own statistics: the first one is the site's law.
    """
    extra = {k: torch.zeros_like(v) for k, v in theirs.items() if k in OPTIONAL_STATS and k not in mine}
    return {**mine, **extra}


def same_sites(a: list[list[Any]], b: list[list[Any]]) -> bool:
    """Whether two site signatures (``TracedNet.signature()``) are of the same network's sites.

    The same names and families, and the same parameters where both record them (files of format 1 did not).
    An empty signature (not known) is the same as any.
    """
    if not a or not b:
        return True
    if len(a) != len(b):
        return False
    for x, y in zip(a, b, strict=True):
        if x[0] != y[0] or x[1] != y[1]:
            return False
        if len(x) > 2 and len(y) > 2 and x[2] is not None and y[2] is not None and x[2] != y[2]:
            return False
    return True


def same_theta0(a: dict[str, tuple[Any, ...]], b: dict[str, tuple[Any, ...]]) -> bool:
    """Whether two :func:`theta0_fingerprint` s are of the same parameters.

    The same names and shapes, and sums equal up to the rounding of float64 reductions in another order (on
    another device); the sums both hold (a file of an earlier version holds two).
    """
    if a.keys() != b.keys():
        return False
    for n, (shape, *m) in a.items():
        other_shape, *o = b[n]
        if tuple(shape) != tuple(other_shape):
            return False
        # (sums of values of both signs cancel: their rounding is relative to sqrt(n * sum of squares))
        size = math.sqrt(math.prod(shape) * abs(m[1])) if len(m) > 1 else 0.0
        if any(not math.isclose(x, y, rel_tol=1e-9, abs_tol=max(1e-12 * size, 1e-300))
               for x, y in zip(m, o, strict=False)):
            return False
    return True


def _check_sites(net: TracedNet, sums: dict[str, Any], record_pools: bool,
                 exact: Callable[[Rule], bool] | None = None) -> None:
    """Refuse a summary in which a site recorded nothing (other than the sites run exactly).

    A max pool of unequal windows records nothing; an estimator that samples its positions refuses it.
    """
    missing = [s for s, rule in net.sites.items() if s not in sums
               and (record_pools and not getattr(rule, "unequal", None) or rule.family != "maxpool")
               and not (exact and exact(rule))]
    if missing:
        raise UsageError(f"sites {missing} recorded nothing (is their output unused?)")


#: Input-model tensors that are not sums: the coreset's candidates (gathered, the global bottom-k kept) and
#: the mixture's k-means centres (the same on every rank, from the global sample).
_NOT_SUMMED = ("x", "y", "keys", "centers")


def _reduce_summary(net: TracedNet, inputs: InputModel, mode: FitMode, record_pools: bool,
                    record_sites: bool = True, exact: Callable[[Rule], bool] | None = None) -> Summary:
    """The summary of every rank's shard from this rank's pass: sums all-reduced, coresets gathered.

    A rank that saw no examples contributes zeros (its input model is never begun); when no rank saw any, the
    usual :class:`DataError` for empty data is raised on every rank.
    """
    from . import distributed as dist_

    has_data = inputs.counts is not None
    local: dict[str, torch.Tensor] = {}
    if has_data:
        inputs.finish()
        for k, v in inputs.tensors().items():
            if k not in _NOT_SUMMED:
                local[f"inputs/{k}"] = v
        for site, d in mode.sums.items():
            for k, v in d.items():
                local[f"site/{site}/{k}"] = v
    meta: dict[str, Any] | None = None
    if has_data:
        meta = {"input_model": inputs.name, "inputs": inputs.meta(),
                "sites": {site: sorted(d) for site, d in mode.sums.items()}}
    metas = dist_.all_gather_objects(meta)
    given = [(r, m) for r, m in enumerate(metas) if m is not None]
    if not given:
        raise DataError(EMPTY_DATA)
    ref = given[0][1]
    for r, m in given[1:]:
        if m["input_model"] != ref["input_model"] or m["inputs"] != ref["inputs"]:
            raise UsageError(f"the ranks' input models differ: rank {given[0][0]} has {ref['inputs']}, "
                             f"rank {r} {m['inputs']} (same input shape and options needed)")
    sites = {site: sorted({k for _, m in given for k in m["sites"].get(site, [])})
             for site in sorted({s for _, m in given for s in m["sites"]})}
    summed = dist_.all_reduce_sums(local, pad=True)
    tensors = dict(summed)
    if isinstance(inputs, CoresetInputs):
        mine = inputs.tensors() if has_data else {}
        K, X, Y = dist_.gather_rows([mine.get("keys"), mine.get("x"), mine.get("y")])
        assert K is not None and X is not None and Y is not None
        order = torch.argsort(K, stable=True)[: inputs.k]
        tensors.update({"inputs/keys": K[order], "inputs/x": X[order], "inputs/y": Y[order]})
    centers = getattr(inputs, "centers", None)
    if centers is not None:
        tensors["inputs/centers"] = centers
    summary = Summary.from_tensors(tensors, {**ref, "sites": sites})
    if record_sites:
        _check_sites(net, summary.site_sums, record_pools, exact)
    log.info("LAFTR summary (all ranks): %d examples, %d groups, %d sites", int(summary.counts.sum()),
             summary.num_groups, len(summary.site_sums))
    return summary
