"""Input models: what LAFTR stores about the training inputs (METHOD.md section 2, step 3), one class each.

Every input model accumulates float64 sums in one streaming pass (so summaries of data shards merge by
addition), says which *group* each example belongs to (gate statistics are kept per group), and turns its
sums into a sampler (Monte Carlo) and per-group first and second moments (closed form):

====================  =============================================  ========================================
name                  what is stored                                 stored floats (d = input size)
====================  =============================================  ========================================
``gaussian``          mean and full covariance                       ``d + d^2``
``diag``              mean and per-pixel variance                    ``2 d``
``lowrank``           mean, top-r eigenvectors of the covariance +   ``d + d r + d``
                      diagonal
``classwise``         one Gaussian per class (labels), weighted by   ``C (1 + d + d^2)`` (diag ``C (1 + 2d)``)
                      frequency
``mixture``           K Gaussians on k-means clusters (no labels)    ``K (1 + d + d^2)`` (diag ``K (1 + 2d)``)
``coreset``           k real inputs (bottom-k of a seeded hash)      ``k d``
``tokens``            per-position token frequencies (a product of   ``P V``
                      categorical laws; P positions, V token ids)
``tokens-classwise``  the same per class, weighted by frequency      ``C (1 + P V)``
``tokens-mixture``    the same on k-means clusters of the one-hot    ``K (1 + P V)``
                      sequences (no labels)
====================  =============================================  ========================================

``classwise``, ``mixture``, ``tokens-classwise`` and ``tokens-mixture`` are *grouped*: every group (class /
component) also has its own gate law, so the stored floats of the gates count once per group.

The Gaussian models need floating inputs: integer inputs (token ids of a transformer) raise a ``DataError``
that points to the token models. These take integer inputs ``(B, *shape)`` with ids in ``0..V-1`` (``V`` is
``vocab_size``, or the largest id seen + 1) and keep them integer: :meth:`InputModel.sample` draws ``int64``
ids, while :meth:`InputModel.moments` gives the mean and second moment of the *one-hot* encoding of a sequence
(index ``p V + v`` for id ``v`` at position ``p``), whose shape :attr:`InputModel.moment_shape` is
``(*shape, V)``. A ``coreset`` of integer inputs likewise stores ``int64`` ids and gives one-hot moments.

The mixture (ours; METHOD.md section 6) is fitted in two passes over the data: the first keeps a sample of
``mixture_sample`` inputs chosen by a seeded hash of their bytes (the same examples whatever the batch size,
order or sharding) and runs k-means on it (k-means++ seeding, Lloyd iterations, the best of 3 restarts, all
from ``seed``); the second assigns every example to its nearest centre and accumulates per-component
counts, sums and outer products, exactly like ``classwise`` with the cluster as the label. Hard assignment
keeps the summary a set of sums that merge exactly. ``tokens-mixture`` does the same on the one-hot encodings
of token sequences and keeps per-component token counts.
"""

from __future__ import annotations

import contextvars
import dataclasses
import hashlib
import logging
from collections.abc import Callable, Iterator
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from ._util import eigh_on_host, registrar
from .errors import DataError, UsageError

log = logging.getLogger(__name__)

#: Largest input dimension for which the full d x d second moment is accumulated.
MAX_FULL_DIM = 8192

INPUT_MODELS: dict[str, type[InputModel]] = {}

Batches = Callable[[], Iterator[tuple[torch.Tensor, torch.Tensor | None]]]


def register_input_model(name: str) -> Callable[[type[InputModel]], type[InputModel]]:
    """Class decorator: make an input model available by ``name`` (``input_model=name``)."""
    return registrar(INPUT_MODELS, "input model", name)


def make_input_model(name: str, **options: Any) -> InputModel:
    """The input model registered as ``name``, with its options (those it does not use are ignored)."""
    if name not in INPUT_MODELS:
        raise UsageError(f"unknown input_model {name!r}; choose one of {sorted(INPUT_MODELS)}")
    return INPUT_MODELS[name](**options)


def hash_keys(x: torch.Tensor, seed: int) -> torch.Tensor:
    """A seeded 63-bit hash of each example's bytes (``(B,)`` int64).

    Samples that keep the k smallest keys are the same whatever the batch size, order or sharding of the data.
    Floating inputs are hashed as float32, integer and bool inputs (token ids) as int64, whatever their own
    dtype.
    """
    as_dtype = torch.float32 if x.is_floating_point() else torch.int64
    arr = x.detach().to("cpu", as_dtype).reshape(x.shape[0], -1).contiguous().numpy()
    salt = int(seed).to_bytes(8, "little", signed=True)
    salt16 = salt[:8] + b"\0" * 8
    keys = [int.from_bytes(hashlib.blake2b(row.tobytes(), digest_size=8, salt=salt16).digest(), "little") >> 1
            for row in arr]
    return torch.tensor(keys, dtype=torch.int64)


def pad_groups(t: torch.Tensor, G: int) -> torch.Tensor:
    """``t`` with its first (group) axis padded with zeros to length ``G``."""
    if t.shape[0] >= G:
        return t
    return torch.cat([t, t.new_zeros((G - t.shape[0], *t.shape[1:]))])


def _cpu_generator(gen: torch.Generator) -> torch.Generator:
    if gen.device.type == "cpu":
        return gen
    seed = int(torch.randint(0, 2**62, (1,), generator=gen, device=gen.device).item())
    return torch.Generator().manual_seed(seed)


def refuse_tokens(x: torch.Tensor, name: str) -> None:
    """Raise :class:`DataError` when ``x`` holds integer (or bool) inputs.

    A Gaussian input model over token ids is meaningless.
    """
    if not x.is_floating_point():
        raise DataError(f"the {name!r} input model is a Gaussian and needs floating inputs, got {x.dtype} "
                        f"inputs that look like token ids; use input_model='tokens' (or 'tokens-classwise', "
                        f"'tokens-mixture') for integer token inputs, and convert images or features stored "
                        f"as integers (uint8 pixels) to floating point first, e.g. X.float() / 255")


def class_labels(x: torch.Tensor, y: torch.Tensor | None, limit: int | None = None) -> torch.Tensor:
    """The labels of a batch as groups (``(B,)`` long on ``x``'s device), checked: integer, ``(B,)``, >= 0.

    ``limit``: the network's number of output units, when known: a class label indexes them, so a label
    ``>= limit`` is refused (a classwise summary keeps one law per label value up to the largest, so labels
    such as 100002 would allocate, store and save 100003 groups).
    """
    if y is None:
        raise DataError("a classwise summary needs labels: give (x, y) batches")
    if y.dtype.is_floating_point or y.dtype == torch.bool or y.ndim != 1:
        raise DataError(f"classwise summaries need integer class labels of shape (B,), got {y.dtype} "
                        f"{tuple(y.shape)}")
    if (y < 0).any():
        raise DataError("class labels must be non-negative")
    if limit is not None and len(y) and int(y.max()) >= limit:
        raise DataError(f"class label {int(y.max())} but the network has {limit} output units: a classwise "
                        f"summary keeps one law per class, and class labels index the outputs "
                        f"(0..{limit - 1}); map your labels to them first, e.g. "
                        "torch.unique(y, return_inverse=True)[1]")
    return y.long().to(x.device)


Candidates = tuple[torch.Tensor, "torch.Tensor | None"]

#: While set (by a distributed fit), :func:`hashed_sample` hands its local pass (a function giving this rank's
#: candidates ``(keys, rows)``; rows None when it saw no examples) to this function, which runs it and gives
#: back every rank's candidates (all-gathered), so that the sample is the global bottom-m.
SAMPLE_GATHER: contextvars.ContextVar[Callable[[Callable[[], Candidates]], Candidates] | None] = \
    contextvars.ContextVar("laftr_sample_gather", default=None)


def hashed_sample(batches: Batches, m: int, seed: int, rows: Callable[[torch.Tensor], torch.Tensor],
                  ) -> torch.Tensor:
    """One pass over ``batches``: ``rows(x)`` of the ``m`` examples with the smallest :func:`hash_keys`.

    ``rows`` gives one row per example, on the CPU; the rows come in key order and are of the same examples
    whatever the batch size, order or sharding. In a distributed fit (:data:`SAMPLE_GATHER` set) the
    candidates of every rank are gathered first: the sample is the one of the union of the ranks' data.
    """

    def local() -> Candidates:
        keys: list[torch.Tensor] = []
        xs: list[torch.Tensor] = []
        for x, _ in batches():
            keys.append(hash_keys(x, seed))
            xs.append(rows(x))
            allk = torch.cat(keys)
            if len(allk) > 4 * m:  # prune to keep memory bounded
                order = torch.argsort(allk, stable=True)[:m]
                keys, xs = [allk[order]], [torch.cat(xs)[order]]
        if not keys:
            return torch.zeros(0, dtype=torch.int64), None
        allk = torch.cat(keys)
        order = torch.argsort(allk, stable=True)[:m]
        return allk[order], torch.cat(xs)[order]

    gather = SAMPLE_GATHER.get()
    allk, X = local() if gather is None else gather(local)
    if X is None:
        raise DataError("data is empty: no batches to read")
    return X[torch.argsort(allk, stable=True)[:m]]


def _merge_centres(a: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor:
    """The k-means centres of a merge of two mixtures: both must have used the same ones."""
    if a is None or b is None or a.shape != b.shape or not torch.equal(a, b):
        raise UsageError("cannot merge mixture summaries whose components differ "
                         "(fit the shards with the same k-means centres)")
    return a


# ---------------------------------------------------------------------------------------------- base
class InputModel:
    """Base class of the input models.

    Subclasses set ``name`` (by :func:`register_input_model`) and implement the fit-time methods
    (:meth:`assign`, :meth:`accumulate`, :meth:`merge`), the use-time ones (:meth:`sample`, :meth:`moments`,
    :meth:`stored_floats`) and persistence (:meth:`tensors`, :meth:`meta`, :meth:`restore`).

    Attributes:
        grouped: gate statistics are kept per group (class or mixture component) and the estimate is the
            group-weighted sum.
        needs_first_pass: :meth:`prepare` must see the data before the main pass (k-means).
        counts: ``(G,)`` float64 examples per group.
        input_shape: the per-example input shape.
    """

    name: ClassVar[str] = "base"
    grouped: ClassVar[bool] = False
    needs_first_pass: ClassVar[bool] = False

    def __init__(self, seed: int = 0, **_: Any) -> None:
        """An empty model; ``seed`` drives every random choice (sampling, hashing, k-means)."""
        self.seed = int(seed)
        self.counts: torch.Tensor | None = None
        self.input_shape: tuple[int, ...] | None = None
        self.label_limit: int | None = None  # the network's output units, when known (set by the fit)
        self._cache: dict[Any, Any] = {}

    # ------------------------------------------------------------------ fitting
    def prepare(self, batches: Batches) -> None:
        """A first pass over the data (only when ``needs_first_pass``)."""

    def assign(self, x: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        """The group of every example of a batch (``(B,)`` long); one group unless grouped."""
        return torch.zeros(x.shape[0], dtype=torch.long, device=x.device)

    def begin(self, x: torch.Tensor) -> None:
        """Called with the first batch: fixes the input shape."""
        self.input_shape = tuple(x.shape[1:])

    def accumulate(self, x: torch.Tensor, y: torch.Tensor | None, group: torch.Tensor) -> None:
        """Add one batch (``x`` on the model's device, any dtype; ``group`` from :meth:`assign`)."""
        raise NotImplementedError

    def finish(self) -> None:
        """Called after the last batch (move sums to the CPU, prune)."""

    def merge(self, other: InputModel) -> InputModel:
        """The input model of the union of both data sets."""
        raise NotImplementedError

    # ------------------------------------------------------------------ use
    @property
    def dim(self) -> int:
        """d: the number of entries of one input."""
        assert self.input_shape is not None
        n = 1
        for s in self.input_shape:
            n *= int(s)
        return n

    @property
    def moment_shape(self) -> tuple[int, ...]:
        """The shape of the state whose moments :meth:`moments` gives.

        The input shape, or ``(*shape, V)`` for one-hot encoded token ids.
        """
        assert self.input_shape is not None
        return self.input_shape

    @property
    def num_groups(self) -> int:
        """G: the number of groups the counts cover (indexed by label or component)."""
        assert self.counts is not None
        return int(self.counts.shape[0])

    def weights(self) -> torch.Tensor:
        """Fraction of examples in each group (float64)."""
        assert self.counts is not None
        return self.counts / self.counts.sum()

    def sample(self, n: int, gen: torch.Generator, device: torch.device, dtype: torch.dtype,
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """``n`` inputs ``(n, *input_shape)`` and their groups ``(n,)``."""
        raise NotImplementedError

    def moments(self, g: int, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """``E[u]`` ``(n,)`` and ``E[u u^T]`` ``(n, n)`` of group ``g`` (the closed form).

        ``u`` is the flattened state of shape :attr:`moment_shape`: the input ``x`` itself, or the one-hot
        encoding of token ids.
        """
        raise NotImplementedError

    def moment_factors(self, g: int, device: torch.device, dtype: torch.dtype,
                       ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(v, U)`` with ``E[u u^T] = diag(v) + U U^T`` (group ``g``) when ``U`` has few columns, else None.

        The closed form uses them to multiply by ``E[u u^T]`` cheaply (diagonal and low-rank models).
        """
        return None

    def stored_floats(self) -> int:
        """Floats the estimate needs from this input model."""
        raise NotImplementedError

    def check_mergeable(self, other: InputModel) -> None:
        """Raise :class:`UsageError` unless ``other`` can be merged with this model.

        It must be the same kind of input model, with the same options that shaped its sums
        (:meth:`sums_options`: the seed only where a random choice did), of inputs of the same shape. The
        merged model keeps this one's seed.
        """
        if type(other) is not type(self):
            raise UsageError(f"cannot merge a {self.name!r} input model with a {other.name!r} one")
        if self.sums_options() != other.sums_options():
            raise UsageError(f"cannot merge input models with different options: {self.sums_options()} vs "
                             f"{other.sums_options()}")
        if self.input_shape != other.input_shape:
            raise UsageError(f"cannot merge summaries of inputs {self.input_shape} and {other.input_shape}")

    def nonempty_groups(self) -> int:
        """Groups with examples (groups are indexed by label; absent classes store nothing)."""
        assert self.counts is not None
        return int((self.counts > 0).sum())

    def per_group_floats(self, per: int) -> int:
        """``per`` floats, or for a grouped model ``per`` plus its weight for every group with examples."""
        return self.nonempty_groups() * (1 + per) if self.grouped else per

    # ------------------------------------------------------------------ persistence
    def options(self) -> dict[str, Any]:
        """The options that shaped the stored sums (JSON-able)."""
        return {"seed": self.seed}

    def sums_options(self) -> dict[str, Any]:
        """:meth:`options` without the seed where no random choice shaped the sums.

        The seed stays for the mixtures' k-means sample and the coreset's hash. What a summary used as
        fitted (``fit_summary_only``) must match.
        """
        out = self.options()
        if not (self.needs_first_pass or isinstance(self, CoresetInputs)):
            out.pop("seed", None)
        return out

    def tensors(self) -> dict[str, torch.Tensor]:
        """The stored sums, by name, as written to a summary file."""
        raise NotImplementedError

    def meta(self) -> dict[str, Any]:
        """The JSON-able part of a summary file: the options and the input shape."""
        return {"options": self.options(), "input_shape": list(self.input_shape or [])}

    def restore(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        """Inverse of :meth:`tensors` / :meth:`meta` (options already set).

        Raises ``ValueError`` when the tensors are inconsistent.
        """
        raise NotImplementedError

    def _cached(self, key: Any, make: Callable[[], Any]) -> Any:
        if key not in self._cache:
            self._cache[key] = make()
        return self._cache[key]


# ---------------------------------------------------------------------------------------------- Gaussians
@dataclasses.dataclass
class _Derived:
    """A Gaussian family's sampler on one device/dtype: mean, factor, diagonal and second moment per group."""

    mean: torch.Tensor  # (G, d) float64
    second: torch.Tensor  # (G, d, d) float64
    factor: torch.Tensor | None  # (G, d, r): x = mean + factor eps (+ diag noise)
    diag: torch.Tensor | None  # (G, d) variance of independent noise
    cast: dict[Any, torch.Tensor]
    # (G, d, r + 1): second = diag(diag) + outer U U^T (diagonal and low-rank models)
    outer: torch.Tensor | None = None


def _varying(xf: torch.Tensor) -> torch.Tensor:
    """The features whose spread on the batch ``xf`` (two-pass) is above their mean's own rounding.

    Those are not constant: the sums must keep their variance (see :func:`_refuse_lost_variance`).
    """
    mean = xf.mean(0)
    spread = ((xf - mean) ** 2).mean(0)
    return spread > 1e4 * (torch.finfo(torch.float64).eps * mean.abs()) ** 2


def _refuse_lost_variance(x_sum: torch.Tensor, x_sq: torch.Tensor, n: torch.Tensor,
                          varying: torch.Tensor) -> None:
    """Refuse inputs whose float64 sums of ``x`` and ``x^2`` cannot hold their variance.

    The Gaussian input models keep sums that merge exactly across shards, and their variance is ``E x^2 -
    (E x)^2``: with a mean 1e8 times the spread that difference is rounding (the stored variances were 0-8
    for 1, the covariance had a negative eigenvalue, and ``laftr-exact`` returned -0.026 for 0.004). Its
    error is a few ``eps * E x^2``; a feature whose variance is below 400 times that (1 % or worse) is refused
    where it varies (on the first batch: a constant feature's variance is 0 by rounding, and harmless).
    Judged on the whole data's sums (a first batch of time-ordered records can have a small spread).
    """
    total = n.sum().clamp_min(1)
    second = x_sq.sum(0) / total
    var = second - (x_sum.sum(0) / total) ** 2
    lost = varying & (var < 400 * torch.finfo(torch.float64).eps * second)
    if bool(lost.any()):
        i = int(torch.nonzero(lost)[0])
        mean = float(x_sum.sum(0)[i] / total)
        raise DataError(
            f"{int(lost.sum())} input features have a mean so large next to their spread (feature {i}: mean "
            f"{mean:.4g}, variance {float(var[i]):.3g} after rounding) that the input model's float64 sums "
            "of x and x^2 lose their variance; subtract a typical value from the inputs first (a normalizing "
            "transform of the data, with the network reading the centred inputs)")


class GaussianFamily(InputModel):
    """Gaussian input models from float64 sums per group.

    The sums are the counts, the sums of x and of x^2 and (full/low rank) of x x^T.

    Options:
        cov: ``full``, ``diag`` or ``lowrank`` covariance.
        rank: rank of ``lowrank``.
    """

    covariance: ClassVar[str] = "full"

    def __init__(self, seed: int = 0, cov: str | None = None, rank: int = 20, **kw: Any) -> None:
        """An empty Gaussian model with covariance ``cov`` (the class's default when None)."""
        super().__init__(seed=seed, **kw)
        self.cov = cov or self.covariance
        if self.cov not in ("full", "diag", "lowrank"):
            raise UsageError(f"unknown covariance {self.cov!r}; choose 'full' or 'diag'")
        self.rank = int(rank)
        if self.rank < 1:
            raise UsageError(f"rank must be a positive integer, got {rank!r}")
        self.x_sum: torch.Tensor | None = None
        self.x_sq: torch.Tensor | None = None
        self.x_outer: torch.Tensor | None = None

    @property
    def full_sums(self) -> bool:
        """Whether the model accumulates the outer products ``x x^T`` (full and low-rank covariance)."""
        return self.cov in ("full", "lowrank")

    def options(self) -> dict[str, Any]:
        """The seed, the covariance and (low rank) the rank."""
        out = {**super().options(), "cov": self.cov}
        if self.cov == "lowrank":
            out["rank"] = self.rank
        return out

    def begin(self, x: torch.Tensor) -> None:
        """Fix the input shape; refuses token ids and a full covariance of too large inputs."""
        refuse_tokens(x, self.name)
        super().begin(x)
        d = x[0].numel()
        if self.full_sums and d > MAX_FULL_DIM:
            raise UsageError(f"input dimension {d} is too large for a full covariance (max {MAX_FULL_DIM}); "
                             "use input_model='diag' or a diagonal component covariance")

    def accumulate(self, x: torch.Tensor, y: torch.Tensor | None, group: torch.Tensor) -> None:
        """Add the batch's counts, sums, squares (and outer products) to its groups' sums."""
        refuse_tokens(x, self.name)
        xf = x.reshape(x.shape[0], -1).to(torch.float64)
        G = int(group.max()) + 1
        if self.counts is None:
            self._varying = _varying(xf) if xf.shape[0] > 1 else None
            kw: dict[str, Any] = {"dtype": torch.float64, "device": x.device}
            D = xf.shape[1]
            self.counts = torch.zeros(G, **kw)
            self.x_sum, self.x_sq = torch.zeros(G, D, **kw), torch.zeros(G, D, **kw)
            self.x_outer = torch.zeros(G, D, D, **kw) if self.full_sums else None
        elif self.counts.shape[0] < G:  # a new class: grow the group axis (rare)
            assert self.x_sum is not None and self.x_sq is not None
            self.counts = pad_groups(self.counts, G)
            self.x_sum, self.x_sq = pad_groups(self.x_sum, G), pad_groups(self.x_sq, G)
            self.x_outer = None if self.x_outer is None else pad_groups(self.x_outer, G)
        assert self.x_sum is not None and self.x_sq is not None
        self.counts.index_add_(0, group, torch.ones_like(xf[:, 0]))
        self.x_sum.index_add_(0, group, xf)
        self.x_sq.index_add_(0, group, xf * xf)
        if self.x_outer is not None:
            for g in (group.unique().tolist() if self.grouped else [0]):
                xg = xf[group == g] if self.grouped else xf
                self.x_outer[g].addmm_(xg.T, xg)

    def finish(self) -> None:
        """Check that the sums keep the inputs' variance; move them to the CPU."""
        varying = self.__dict__.pop("_varying", None)
        if varying is not None and self.counts is not None:
            assert self.x_sum is not None and self.x_sq is not None
            _refuse_lost_variance(self.x_sum, self.x_sq, self.counts, varying.to(self.x_sum.device))
        for name in ("counts", "x_sum", "x_sq", "x_outer"):
            t = getattr(self, name)
            if t is not None:
                setattr(self, name, t.cpu())
        self._cache.clear()

    def pad(self, G: int) -> None:
        """Grow the group axis to ``G`` (groups without examples; used when gate sums saw more groups)."""
        assert self.counts is not None and self.x_sum is not None and self.x_sq is not None
        self.counts, self.x_sum, self.x_sq = (pad_groups(t, G) for t in (self.counts, self.x_sum, self.x_sq))
        if self.x_outer is not None:
            self.x_outer = pad_groups(self.x_outer, G)

    def merge(self, other: InputModel) -> InputModel:
        """The model of both data sets: the sums added, group by group."""
        self.check_mergeable(other)
        assert isinstance(other, GaussianFamily)
        if (self.x_outer is None) != (other.x_outer is None):
            raise UsageError("cannot merge a full-covariance summary with a diagonal one")
        assert self.counts is not None and other.counts is not None
        G = max(self.num_groups, other.num_groups)
        out = type(self)(**self.init_options())
        out.input_shape = self.input_shape

        def add(a: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor | None:
            if a is None or b is None:
                return None
            return pad_groups(a, G) + pad_groups(b, G)

        out.counts = add(self.counts, other.counts)
        out.x_sum = add(self.x_sum, other.x_sum)
        out.x_sq = add(self.x_sq, other.x_sq)
        out.x_outer = add(self.x_outer, other.x_outer)
        self._merge_extra(other, out)
        return out

    def init_options(self) -> dict[str, Any]:
        """The constructor arguments of an empty model like this one."""
        return {"seed": self.seed, "cov": self.cov, "rank": self.rank}

    def _merge_extra(self, other: InputModel, out: InputModel) -> None:
        """Subclass hook (the mixture checks that both used the same components)."""

    # ------------------------------------------------------------------ statistics
    def group_moments(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Per group: mean ``(G, d)``, variance ``(G, d)``, covariance ``(G, d, d)`` (or None), float64."""
        assert self.counts is not None and self.x_sum is not None and self.x_sq is not None
        if not self.grouped:  # one group: the pooled sums (identical numbers)
            N = self.counts.sum()
            mean = self.x_sum.sum(0) / N
            var = (self.x_sq.sum(0) / N - mean**2).clamp_min(0)
            cov = None
            if self.x_outer is not None:
                cov = self.x_outer.sum(0) / N - mean[:, None] * mean[None, :]
                cov = 0.5 * (cov + cov.T)
            return mean[None], var[None], None if cov is None else cov[None]
        n = self.counts.clamp_min(1).view(-1, 1)
        mean = self.x_sum / n
        var = (self.x_sq / n - mean**2).clamp_min(0)
        cov = None
        if self.x_outer is not None:
            cov = self.x_outer / n.view(-1, 1, 1) - mean[:, :, None] * mean[:, None, :]
            cov = 0.5 * (cov + cov.transpose(1, 2))
        return mean, var, cov

    def _derived(self) -> _Derived:
        def make() -> _Derived:
            mean, var, cov = self.group_moments()
            factor = diag = None
            if self.cov in ("full", "lowrank"):
                if cov is None:
                    raise UsageError("this summary kept only the diagonal of the input covariance")
                evals, evecs = eigh_on_host(cov)
                evals = evals.clamp_min(0)
            if self.cov == "full":
                assert cov is not None
                factor = evecs * evals.sqrt()[:, None, :]  # (G, d, d): x = mean + factor @ eps
                second = cov + mean[:, :, None] * mean[:, None, :]
            elif self.cov == "lowrank":
                assert cov is not None
                r = min(self.rank, mean.shape[1])
                factor = evecs[:, :, -r:] * evals[:, -r:].sqrt()[:, None, :]
                diag = (torch.diagonal(cov, dim1=1, dim2=2) - (factor * factor).sum(-1)).clamp_min(0)
                second = (factor @ factor.transpose(1, 2) + torch.diag_embed(diag)
                          + mean[:, :, None] * mean[:, None, :])
            else:
                diag = var
                second = torch.diag_embed(var) + mean[:, :, None] * mean[:, None, :]
            outer = None
            if diag is not None:
                outer = mean[:, :, None] if factor is None else torch.cat([factor, mean[:, :, None]], 2)
            return _Derived(mean, second, factor, diag, {}, outer)

        return self._cached("derived", make)

    def _get(self, der: _Derived, name: str, g: int, device: torch.device,
             dtype: torch.dtype) -> torch.Tensor:
        key = (name, g, str(device), dtype)
        if key not in der.cast:
            der.cast[key] = getattr(der, name)[g].to(device, dtype)
        return der.cast[key]

    def sample(self, n: int, gen: torch.Generator, device: torch.device, dtype: torch.dtype,
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """``n`` Gaussian inputs ``(n, *input_shape)`` and their groups ``(n,)`` (drawn by weight)."""
        der = self._derived()
        G, d = der.mean.shape
        if G == 1:
            groups = torch.zeros(n, dtype=torch.long)
        else:
            groups = torch.multinomial(self.weights().float(), n, replacement=True,
                                       generator=_cpu_generator(gen))

        def draw(g: int, m: int) -> torch.Tensor:
            mean = self._get(der, "mean", g, device, dtype)
            if self.cov in ("full", "lowrank"):
                F_ = self._get(der, "factor", g, device, dtype)
                eps = torch.randn(m, F_.shape[1], generator=gen, device=gen.device, dtype=dtype).to(device)
                xs = mean + eps @ F_.T
                if self.cov == "lowrank":
                    eps2 = torch.randn(m, d, generator=gen, device=gen.device, dtype=dtype).to(device)
                    xs = xs + eps2 * self._get(der, "diag", g, device, dtype).sqrt()
                return xs
            eps = torch.randn(m, d, generator=gen, device=gen.device, dtype=dtype).to(device)
            return mean + eps * self._get(der, "diag", g, device, dtype).sqrt()

        if G == 1:  # one group: its draw is the batch
            x = draw(0, n)
        else:
            x = torch.empty(n, d, device=device, dtype=dtype)
            for g in groups.unique().tolist():
                sel = (groups == g).nonzero().squeeze(1).to(device)
                x[sel] = draw(g, len(sel))
        assert self.input_shape is not None
        return x.reshape(n, *self.input_shape), groups.to(device)

    def moments(self, g: int, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """``E[x]`` ``(d,)`` and ``E[x x^T]`` ``(d, d)`` of group ``g``."""
        der = self._derived()
        return self._get(der, "mean", g, device, dtype), self._get(der, "second", g, device, dtype)

    def moment_factors(self, g: int, device: torch.device, dtype: torch.dtype,
                       ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``E[x x^T] = diag(v) + U U^T``: ``v`` the variances (low rank: the diagonal), ``U = [F, mean]``.

        None for a full covariance.
        """
        der = self._derived()
        if der.diag is None or der.outer is None:
            return None
        return self._get(der, "diag", g, device, dtype), self._get(der, "outer", g, device, dtype)

    def stored_floats(self) -> int:
        """The mean and the covariance (full, low-rank or diagonal) of every group with examples."""
        d = self.dim
        if self.cov == "full":
            per = d + d * d
        elif self.cov == "lowrank":
            per = d + d * min(self.rank, d) + d
        else:
            per = 2 * d
        return self.per_group_floats(per)

    # ------------------------------------------------------------------ persistence
    def tensors(self) -> dict[str, torch.Tensor]:
        """``counts``, ``x_sum``, ``x_sq`` and (full and low rank) ``x_outer``."""
        assert self.counts is not None and self.x_sum is not None and self.x_sq is not None
        out = {"counts": self.counts, "x_sum": self.x_sum, "x_sq": self.x_sq}
        if self.x_outer is not None:
            out["x_outer"] = self.x_outer
        return out

    def restore(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        """Take the sums back from a file; raises ``ValueError`` when they are inconsistent."""
        self.input_shape = tuple(int(v) for v in meta["input_shape"])
        self.counts, self.x_sum, self.x_sq = tensors["counts"], tensors["x_sum"], tensors["x_sq"]
        self.x_outer = tensors.get("x_outer")
        G, d = self.x_sum.shape
        if (self.counts.shape != (G,) or self.x_sq.shape != (G, d)
                or (self.x_outer is not None and self.x_outer.shape != (G, d, d))):
            raise ValueError("input-model tensors have inconsistent shapes")
        if self.full_sums and self.x_outer is None:
            raise ValueError(f"a {self.cov!r} covariance needs the stored outer products")
        if d != self.dim:
            raise ValueError(f"input-model tensors have {d} features, the input shape "
                             f"{self.input_shape} has {self.dim}")
        for t in (self.counts, self.x_sum, self.x_sq, *([self.x_outer] if self.x_outer is not None else [])):
            if not torch.isfinite(t).all():
                raise ValueError("summary tensors contain NaN or infinite values")
        if (self.counts < 0).any() or self.counts.sum() <= 0:
            raise ValueError("example counts must be non-negative and not all zero")
        self._cache.clear()


@register_input_model("gaussian")
class GaussianInputs(GaussianFamily):
    """One Gaussian with the inputs' mean and full covariance."""

    covariance = "full"

    def __init__(self, seed: int = 0, **kw: Any) -> None:
        """An empty model; a ``cov`` option is ignored (always full)."""
        kw.pop("cov", None)
        super().__init__(seed=seed, cov="full", **kw)


@register_input_model("diag")
class DiagInputs(GaussianFamily):
    """One Gaussian with the inputs' mean and per-feature variance."""

    covariance = "diag"

    def __init__(self, seed: int = 0, **kw: Any) -> None:
        """An empty model; a ``cov`` option is ignored (always diagonal)."""
        kw.pop("cov", None)
        super().__init__(seed=seed, cov="diag", **kw)


@register_input_model("lowrank")
class LowRankInputs(GaussianFamily):
    """One Gaussian whose covariance is its top-``rank`` eigenvectors plus the residual diagonal."""

    covariance = "lowrank"

    def __init__(self, seed: int = 0, **kw: Any) -> None:
        """An empty model of covariance rank ``rank``; a ``cov`` option is ignored."""
        kw.pop("cov", None)
        super().__init__(seed=seed, cov="lowrank", **kw)


@register_input_model("classwise")
class ClasswiseInputs(GaussianFamily):
    """One Gaussian (and one set of gate laws) per class, weighted by the class frequency.

    Needs integer labels. Option ``cov``: ``full`` or ``diag`` covariance per class.
    """

    grouped = True

    def __init__(self, seed: int = 0, cov: str | None = "full", **kw: Any) -> None:
        """An empty model with a ``full`` or ``diag`` covariance per class."""
        super().__init__(seed=seed, cov=cov or "full", **kw)
        if self.cov == "lowrank":
            raise UsageError("a classwise input model has a 'full' or 'diag' covariance per class")

    def assign(self, x: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        """The class label of every example (refuses token ids and missing labels)."""
        refuse_tokens(x, self.name)
        return class_labels(x, y, self.label_limit)


class KMeansOptions:
    """The options of the mixture models' k-means (``components``, ``mixture_sample``, ``kmeans_iters``).

    They are added to :meth:`InputModel.options` and to the constructor options used when merging.
    """

    components: int
    mixture_sample: int
    kmeans_iters: int

    def options(self) -> dict[str, Any]:
        """The base options plus the k-means options."""
        return {**super().options(), **self._kmeans()}  # type: ignore[misc]  # a mixin: the model has it

    def init_options(self) -> dict[str, Any]:
        """The base constructor arguments plus the k-means options."""
        return {**super().init_options(), **self._kmeans()}  # type: ignore[misc]  # a mixin, as above

    def _kmeans(self) -> dict[str, Any]:
        return {"components": self.components, "mixture_sample": self.mixture_sample,
                "kmeans_iters": self.kmeans_iters}


@register_input_model("mixture")
class MixtureInputs(KMeansOptions, GaussianFamily):
    """K Gaussians (and K sets of gate laws) on k-means clusters of the inputs; no labels needed.

    Options:
        components: K.
        cov: ``full`` or ``diag`` covariance per component.
        mixture_sample: inputs (chosen by hash) on which k-means runs in the first pass.
        kmeans_iters: Lloyd iterations per restart.
    """

    grouped = True
    needs_first_pass = True

    def __init__(self, seed: int = 0, cov: str | None = "full", components: int = 10,
                 mixture_sample: int = 4096, kmeans_iters: int = 100, **kw: Any) -> None:
        """An empty mixture; its components are fitted by :meth:`prepare`."""
        super().__init__(seed=seed, cov=cov or "full", **kw)
        if self.cov == "lowrank":
            raise UsageError("a mixture input model has a 'full' or 'diag' covariance per component")
        self.components = int(components)
        self.mixture_sample = int(mixture_sample)
        self.kmeans_iters = int(kmeans_iters)
        for name, v in (("components", components), ("mixture_sample", mixture_sample),
                        ("kmeans_iters", kmeans_iters)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise UsageError(f"{name} must be a positive integer, got {v!r}")
        self.centers: torch.Tensor | None = None  # (K, d) float64, used while fitting and merging


    def prepare(self, batches: Batches) -> None:
        """Run k-means on a hashed sample of the inputs, unless the components are given."""
        if self.centers is not None:  # components given (e.g. the same ones for every shard of a data set)
            return

        def rows(x: torch.Tensor) -> torch.Tensor:
            refuse_tokens(x, self.name)
            return x.detach().reshape(x.shape[0], -1).to("cpu", torch.float64)

        X = hashed_sample(batches, self.mixture_sample, self.seed, rows)
        self.centers = kmeans(X, self.components, self.seed, self.kmeans_iters)
        log.info("mixture: k-means with %d components on %d inputs", self.centers.shape[0], X.shape[0])

    def assign(self, x: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        """The nearest component of every example."""
        if self.centers is None:
            raise UsageError("the mixture's components are not fitted (prepare() was not called)")
        refuse_tokens(x, self.name)
        xf = x.reshape(x.shape[0], -1).to(torch.float64)
        return nearest(xf, self.centers.to(xf.device))

    def _merge_extra(self, other: InputModel, out: InputModel) -> None:
        # out is a model of this class (the base class's signature says InputModel)
        out.centers = _merge_centres(self.centers, getattr(other, "centers", None))  # type: ignore[attr-defined]

    def stored_floats(self) -> int:
        """As for the Gaussian family: the centres are kept for merging, not for the estimate."""
        # the centres are kept in the file for merging and are not needed by the estimate
        return super().stored_floats()

    def tensors(self) -> dict[str, torch.Tensor]:
        """The Gaussian sums and the k-means centres."""
        out = super().tensors()
        if self.centers is not None:
            out["centers"] = self.centers
        return out

    def restore(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        """Take the sums and centres back from a file; raises ``ValueError`` when inconsistent."""
        super().restore(tensors, meta)
        self.centers = tensors.get("centers")
        if self.centers is not None and (self.centers.ndim != 2 or self.centers.shape[1] != self.dim
                                         or not torch.isfinite(self.centers).all()):
            raise ValueError("mixture centres are inconsistent with the input shape or not finite")


def nearest(x: torch.Tensor, centers: torch.Tensor) -> torch.Tensor:
    """Index of the nearest centre (Euclidean) of every row of ``x``."""
    d2 = (x * x).sum(1, keepdim=True) - 2 * x @ centers.T + (centers * centers).sum(1)[None, :]
    return d2.argmin(1)


def kmeans(X: torch.Tensor, k: int, seed: int, iters: int = 100, restarts: int = 3) -> torch.Tensor:
    """Centres of k-means on ``X`` (``(n, d)`` float64).

    k-means++ seeding and Lloyd iterations from a seeded generator; the lowest within-cluster sum of squares
    of ``restarts`` runs. ``k`` is capped at the number of distinct rows.
    """
    n = X.shape[0]
    k = min(int(k), int(torch.unique(X, dim=0).shape[0]))
    gen = torch.Generator().manual_seed(int(seed))
    best, best_cost = None, float("inf")
    sq = (X * X).sum(1)
    for _ in range(restarts):
        # k-means++
        first = int(torch.randint(n, (1,), generator=gen))
        C = X[first: first + 1].clone()
        d2 = (sq - 2 * X @ C[0] + C[0] @ C[0]).clamp_min(0)
        for _j in range(1, k):
            p = d2 / d2.sum() if d2.sum() > 0 else torch.full_like(d2, 1.0 / n)
            i = int(torch.multinomial(p, 1, generator=gen))
            C = torch.cat([C, X[i: i + 1]])
            d2 = torch.minimum(d2, (sq - 2 * X @ X[i] + X[i] @ X[i]).clamp_min(0))
        assign = None
        for _it in range(iters):
            new = nearest(X, C)
            if assign is not None and torch.equal(new, assign):
                break
            assign = new
            for j in range(k):
                members = X[assign == j]
                if len(members):
                    C[j] = members.mean(0)
                else:  # an empty cluster takes the point farthest from its centre
                    dist = ((X - C[assign]) ** 2).sum(1)
                    far = int(dist.argmax())
                    C[j] = X[far]
                    assign = assign.clone()
                    assign[far] = j
        assert assign is not None
        cost = float(((X - C[nearest(X, C)]) ** 2).sum())
        if cost < best_cost:
            best, best_cost = C.clone(), cost
    assert best is not None
    return best


# ---------------------------------------------------------------------------------------------- coreset
@register_input_model("coreset")
class CoresetInputs(InputModel):
    """``coreset_size`` real inputs: the bottom-k of a seeded hash of each example's bytes.

    The set is the same whatever the batch size, order or sharding. Monte Carlo uses every stored point ``S //
    k`` times plus a random subset for the remainder (unbiased; no input noise when k divides S); the closed
    form uses their empirical moments. Integer inputs (token ids) are stored as ``int64`` (bool ones as bool)
    and given back as such; their moments are those of the one-hot encoding (``V`` = the largest stored id +
    1).
    """

    def __init__(self, seed: int = 0, coreset_size: int = 200, **kw: Any) -> None:
        """An empty coreset of at most ``coreset_size`` inputs."""
        super().__init__(seed=seed, **kw)
        if not isinstance(coreset_size, int) or isinstance(coreset_size, bool) or coreset_size < 1:
            raise UsageError(f"coreset_size must be a positive integer, got {coreset_size!r}")
        self.k = int(coreset_size)
        self.keys: list[torch.Tensor] = []
        self.xs: list[torch.Tensor] = []
        self.ys: list[torch.Tensor] = []
        self.X: torch.Tensor | None = None  # (k', d) float64 (int64 / bool for integer / bool inputs)
        self.Y: torch.Tensor | None = None
        self.K: torch.Tensor | None = None

    def options(self) -> dict[str, Any]:
        """The seed and the coreset size."""
        return {**super().options(), "coreset_size": self.k}

    def accumulate(self, x: torch.Tensor, y: torch.Tensor | None, group: torch.Tensor) -> None:
        """Keep the batch's inputs, labels and hash keys (pruned to the bottom-k by :meth:`finish`)."""
        n = x.shape[0]
        self.counts = torch.tensor([n], dtype=torch.float64) if self.counts is None else self.counts + n
        self.keys.append(hash_keys(x, self.seed))
        self.xs.append(x.detach().reshape(n, -1).to("cpu", _storage_dtype(x)))
        self.ys.append((y if y is not None else torch.full((n,), -1)).detach().cpu().long().reshape(-1))
        allk = torch.cat(self.keys)
        if len(allk) > 4 * self.k:  # prune to keep memory bounded
            order = torch.argsort(allk, stable=True)[: self.k]
            self.keys = [allk[order]]
            self.xs, self.ys = [torch.cat(self.xs)[order]], [torch.cat(self.ys)[order]]

    def finish(self) -> None:
        """Keep the ``coreset_size`` inputs with the smallest hash keys."""
        allk, allx, ally = torch.cat(self.keys), torch.cat(self.xs), torch.cat(self.ys)
        order = torch.argsort(allk, stable=True)[: self.k]
        self.K, self.X, self.Y = allk[order], allx[order], ally[order]
        self.keys, self.xs, self.ys = [], [], []
        self._cache.clear()

    def merge(self, other: InputModel) -> InputModel:
        """The coreset of both data sets: the bottom-k of the union of their hash keys."""
        if not isinstance(other, CoresetInputs) or self.options() != other.options():
            raise UsageError("cannot merge coresets of different sizes or seeds")
        if self.input_shape != other.input_shape:
            raise UsageError(f"cannot merge summaries of inputs {self.input_shape} and {other.input_shape}")
        assert self.K is not None and other.K is not None and self.X is not None and other.X is not None
        assert self.Y is not None and other.Y is not None
        assert self.counts is not None and other.counts is not None
        out = CoresetInputs(seed=self.seed, coreset_size=self.k)
        out.input_shape = self.input_shape
        keys = torch.cat([self.K, other.K])
        order = torch.argsort(keys, stable=True)[: self.k]
        out.K = keys[order]
        out.X, out.Y = torch.cat([self.X, other.X])[order], torch.cat([self.Y, other.Y])[order]
        out.counts = self.counts + other.counts
        return out

    def sample(self, n: int, gen: torch.Generator, device: torch.device, dtype: torch.dtype,
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """``n`` inputs from the coreset (each ``n // k`` times, the remainder at random), all in group 0."""
        assert self.X is not None and self.input_shape is not None
        stored = self.X
        X = self._cached(("x", str(device), dtype),
                         lambda: stored.to(device, dtype if stored.is_floating_point() else None))
        k = X.shape[0]
        full = torch.arange(k).repeat(n // k)
        rest = torch.randperm(k, generator=gen, device=gen.device)[: n % k].cpu()
        idx = torch.cat([full, rest]).to(device)
        return X[idx].view(-1, *self.input_shape), torch.zeros(len(idx), dtype=torch.long, device=device)

    @property
    def moment_shape(self) -> tuple[int, ...]:
        """The input shape, or ``(*shape, V)`` for token ids (``V`` = the largest stored id + 1)."""
        assert self.X is not None and self.input_shape is not None
        if not _is_token_ids(self.X):
            return self.input_shape
        return (*self.input_shape, int(self.X.max()) + 1)

    def moments(self, g: int, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """The empirical ``E[u]`` and ``E[u u^T]`` of the stored inputs (one-hot for token ids)."""
        assert self.X is not None
        if not _is_token_ids(self.X):
            X = self.X.to(device, dtype)
        else:  # token ids: the moments of their one-hot encoding
            X = F.one_hot(self.X.long(), self.moment_shape[-1]).reshape(self.X.shape[0], -1).to(device, dtype)
        return X.mean(0), X.T @ X / X.shape[0]

    def stored_floats(self) -> int:
        """The stored inputs' entries."""
        return 0 if self.X is None else int(self.X.numel())

    def tensors(self) -> dict[str, torch.Tensor]:
        """``counts``, the inputs ``x``, labels ``y`` and hash ``keys``."""
        assert self.X is not None and self.Y is not None and self.K is not None and self.counts is not None
        return {"counts": self.counts, "x": self.X, "y": self.Y, "keys": self.K}

    def restore(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        """Take the coreset back from a file; raises ``ValueError`` when inconsistent."""
        self.input_shape = tuple(int(v) for v in meta["input_shape"])
        self.counts, self.X, self.Y, self.K = tensors["counts"], tensors["x"], tensors["y"], tensors["keys"]
        if self.X.ndim != 2 or self.X.shape[1] != self.dim or self.X.shape[0] == 0:
            raise ValueError("coreset inputs do not match the input shape (or the coreset is empty)")
        if self.Y.shape != (self.X.shape[0],) or self.K.shape != (self.X.shape[0],):
            raise ValueError("coreset labels or keys do not match its inputs")
        if self.X.is_floating_point() and not torch.isfinite(self.X).all():
            raise ValueError("coreset inputs contain NaN or infinite values")
        if _is_token_ids(self.X) and bool((self.X < 0).any()):
            raise ValueError("coreset token ids must be non-negative")
        self._cache.clear()


def _is_token_ids(x: torch.Tensor) -> bool:
    """Whether ``x`` holds integer ids (not floating, not bool)."""
    return not x.is_floating_point() and not x.is_complex() and x.dtype != torch.bool


def _storage_dtype(x: torch.Tensor) -> torch.dtype:
    """How stored inputs keep ``x``: float64 when floating, int64 when integer, bool when bool."""
    if x.is_floating_point():
        return torch.float64
    return torch.bool if x.dtype == torch.bool else torch.int64


# ---------------------------------------------------------------------------------------------- tokens
def _padded(counts: torch.Tensor, tokens: torch.Tensor, G: int, V: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Example counts ``(G',)`` and token counts ``(G', P, V')`` padded to ``G`` groups and ``V`` ids.

    The padding is zeros; a tensor already as large is unchanged.
    """
    tokens = pad_groups(tokens, G)
    if tokens.shape[2] < V:
        tokens = F.pad(tokens, (0, V - tokens.shape[2]))
    return pad_groups(counts, G), tokens


class TokenFamily(InputModel):
    """Token inputs ``(B, *shape)`` (ids in ``0..V-1``) as a product of per-position categorical laws.

    The laws come from float64 counts of every id at every position per group (``(G, P, V)``, P =
    prod(shape)).

    Sampling draws every position independently (``int64`` ids); the closed form gets the moments of the
    one-hot encoding ``u`` (index ``p V + v``): ``E[u]`` the stacked marginals, ``E[u u^T]`` their outer
    product across positions and ``diag`` of the marginal within a position (one id per position).

    Options:
        vocab_size: V; ``None``: the largest id seen + 1 (the counts grow as larger ids come; merging pads the
            smaller V). Ids outside ``0..V-1`` raise :class:`DataError`.
    """

    def __init__(self, seed: int = 0, vocab_size: int | None = None, **kw: Any) -> None:
        """An empty model; ``vocab_size`` fixes V (else the largest id seen + 1)."""
        super().__init__(seed=seed, **kw)
        if vocab_size is not None and (not isinstance(vocab_size, int) or isinstance(vocab_size, bool)
                                       or vocab_size < 1):
            raise UsageError(f"vocab_size must be a positive integer or None, got {vocab_size!r}")
        self.vocab_size = vocab_size
        self.token_counts: torch.Tensor | None = None  # (G, P, V) float64

    def options(self) -> dict[str, Any]:
        """The seed and ``vocab_size``."""
        return {**super().options(), "vocab_size": self.vocab_size}

    def init_options(self) -> dict[str, Any]:
        """The constructor arguments of an empty model like this one."""
        return {"seed": self.seed, "vocab_size": self.vocab_size}

    @property
    def vocab(self) -> int:
        """V: the number of token ids the counts cover."""
        assert self.token_counts is not None
        return int(self.token_counts.shape[2])

    @property
    def moment_shape(self) -> tuple[int, ...]:
        """``(*input_shape, V)``: the one-hot encoding of a sequence."""
        assert self.input_shape is not None
        return (*self.input_shape, self.vocab)

    # ------------------------------------------------------------------ fitting
    def check_tokens(self, x: torch.Tensor) -> None:
        """Raise :class:`DataError` unless ``x`` holds integer ids in range (naming the first bad one)."""
        if not _is_token_ids(x):
            raise DataError(f"the {self.name!r} input model needs integer inputs (token ids), got {x.dtype} "
                            "inputs; use a Gaussian input model (e.g. 'gaussian', 'diag') "
                            "for real-valued inputs")
        if x.numel() == 0:
            return
        lo, hi = int(x.min()), int(x.max())
        bad = None
        if lo < 0:
            bad, why = x < 0, "is negative"
        elif self.vocab_size is not None and hi >= self.vocab_size:
            bad, why = x >= self.vocab_size, f"is not below vocab_size={self.vocab_size}"
        if bad is not None:
            first = [int(i) for i in bad.nonzero()[0]]
            pos = first[1:]
            where = str(pos[0]) if len(pos) == 1 else str(tuple(pos))
            raise DataError(f"token id {int(x[tuple(first)])} at position {where} (example {first[0]} of the "
                            f"batch) {why}; token ids must be in 0..V-1")

    def begin(self, x: torch.Tensor) -> None:
        """Fix the input shape; refuses inputs that are not token ids in range."""
        self.check_tokens(x)
        super().begin(x)

    def assign(self, x: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        """The group of every example (refuses inputs that are not token ids in range)."""
        self.check_tokens(x)
        return self._groups(x, y)

    def _groups(self, x: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        """The group of every example (subclasses: class labels, nearest component)."""
        return super().assign(x, y)

    def accumulate(self, x: torch.Tensor, y: torch.Tensor | None, group: torch.Tensor) -> None:
        """Add the batch's per-position token counts to its groups' counts."""
        self.check_tokens(x)
        if self.input_shape is None:
            self.begin(x)
        ids = x.reshape(x.shape[0], -1).long()
        B, P = ids.shape
        G = int(group.max()) + 1
        V = self.vocab_size if self.vocab_size is not None else int(ids.max()) + 1
        if self.token_counts is None:
            self.counts = torch.zeros(G, dtype=torch.float64, device=x.device)
            self.token_counts = torch.zeros(G, P, V, dtype=torch.float64, device=x.device)
        else:
            assert self.counts is not None
            self.counts, self.token_counts = _padded(self.counts, self.token_counts, G, V)
        assert self.counts is not None
        V = self.vocab
        group = group.to(x.device)
        self.counts.index_add_(0, group, torch.ones(B, dtype=torch.float64, device=x.device))
        at = (group[:, None] * P + torch.arange(P, device=x.device)[None, :]) * V + ids
        self.token_counts.view(-1).index_add_(0, at.reshape(-1), torch.ones(B * P, dtype=torch.float64,
                                                                             device=x.device))

    def pad(self, G: int) -> None:
        """Grow the group axis to ``G`` (groups without examples; used when gate sums saw more groups)."""
        assert self.counts is not None and self.token_counts is not None
        self.counts, self.token_counts = _padded(self.counts, self.token_counts, G, 0)

    def finish(self) -> None:
        """Move the counts to the CPU."""
        if self.counts is not None and self.token_counts is not None:
            self.counts, self.token_counts = self.counts.cpu(), self.token_counts.cpu()
        self._cache.clear()

    def merge(self, other: InputModel) -> InputModel:
        """The model of both data sets: the counts added, padded to the larger groups and vocabulary."""
        self.check_mergeable(other)
        assert isinstance(other, TokenFamily)
        assert self.token_counts is not None and other.token_counts is not None
        assert self.counts is not None and other.counts is not None
        G, V = max(self.num_groups, other.num_groups), max(self.vocab, other.vocab)
        out = type(self)(**self.init_options())
        out.input_shape = self.input_shape
        a_counts, a_tokens = _padded(self.counts, self.token_counts, G, V)
        b_counts, b_tokens = _padded(other.counts, other.token_counts, G, V)
        out.counts, out.token_counts = a_counts + b_counts, a_tokens + b_tokens
        self._merge_extra(other, out)
        return out

    def _merge_extra(self, other: InputModel, out: InputModel) -> None:
        """Subclass hook (the mixture checks that both used the same components)."""

    # ------------------------------------------------------------------ use
    def probabilities(self) -> torch.Tensor:
        """``(G, P, V)`` float64: the probability of every id at every position, per group.

        A group without examples gets zeros.
        """
        counts, tokens = self.counts, self.token_counts
        assert counts is not None and tokens is not None
        return self._cached("probs", lambda: tokens / counts.clamp_min(1)[:, None, None])

    def sample(self, n: int, gen: torch.Generator, device: torch.device, dtype: torch.dtype,
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """``n`` int64 id sequences ``(n, *input_shape)`` and their groups ``(n,)``.

        ``dtype`` is not used.
        """
        probs = self.probabilities()
        G, P, _V = probs.shape
        cpu = _cpu_generator(gen)
        if G == 1:
            groups = torch.zeros(n, dtype=torch.long)
        else:
            groups = torch.multinomial(self.weights().float(), n, replacement=True, generator=cpu)
        x = torch.empty(n, P, dtype=torch.int64)
        for g in groups.unique().tolist():
            sel = (groups == g).nonzero().squeeze(1)
            x[sel] = torch.multinomial(probs[g], len(sel), replacement=True, generator=cpu).T
        assert self.input_shape is not None
        return x.view(n, *self.input_shape).to(device), groups.to(device)

    def moments(self, g: int, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """``E[u]`` and ``E[u u^T]`` of group ``g``, ``u`` the one-hot encoding of a sequence."""
        def make() -> tuple[torch.Tensor, torch.Tensor]:
            p = self.probabilities()[g]  # (P, V)
            P, V = p.shape
            mean = p.reshape(-1)
            second = mean[:, None] * mean[None, :]
            at = torch.arange(P)
            second.view(P, V, P, V)[at, :, at, :] = torch.diag_embed(p)  # one id per position
            return mean.to(device, dtype), second.to(device, dtype)

        return self._cached(("moments", g, str(device), dtype), make)

    def stored_floats(self) -> int:
        """The token frequencies ``P V`` of every group with examples (plus its weight if grouped)."""
        per = self.dim * self.vocab
        return self.per_group_floats(per)

    # ------------------------------------------------------------------ persistence
    def tensors(self) -> dict[str, torch.Tensor]:
        """``counts`` and ``token_counts``."""
        assert self.counts is not None and self.token_counts is not None
        return {"counts": self.counts, "token_counts": self.token_counts}

    def restore(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        """Take the counts back from a file; raises ``ValueError`` when inconsistent."""
        self.input_shape = tuple(int(v) for v in meta["input_shape"])
        counts, tokens = tensors["counts"], tensors["token_counts"]
        if not counts.is_floating_point() or not tokens.is_floating_point():
            raise ValueError("token counts must be stored as floats")
        if counts.ndim != 1 or tokens.ndim != 3 or tokens.shape[0] != counts.shape[0] or tokens.shape[2] < 1:
            raise ValueError(f"input-model tensors have inconsistent shapes: counts {tuple(counts.shape)}, "
                             f"token counts {tuple(tokens.shape)} (expected (G,) and (G, P, V))")
        if tokens.shape[1] != self.dim:
            raise ValueError(f"token counts cover {tokens.shape[1]} positions, the input shape "
                             f"{self.input_shape} has {self.dim}")
        if self.vocab_size is not None and tokens.shape[2] != self.vocab_size:
            raise ValueError(f"token counts cover {tokens.shape[2]} ids, vocab_size is {self.vocab_size}")
        for t in (counts, tokens):
            if not torch.isfinite(t).all():
                raise ValueError("summary tensors contain NaN or infinite values")
            if (t < 0).any():
                raise ValueError("token and example counts must be non-negative")
        if counts.sum() <= 0:
            raise ValueError("example counts must not be all zero")
        per_position = tokens.sum(2)
        if not torch.allclose(per_position, counts[:, None].expand_as(per_position), rtol=1e-9, atol=1e-9):
            raise ValueError("the token counts of every position must add up to the group's example count")
        self.counts, self.token_counts = counts, tokens
        self._cache.clear()


@register_input_model("tokens")
class TokenInputs(TokenFamily):
    """Token ids as a product of per-position categorical laws (each position independent)."""


@register_input_model("tokens-classwise")
class TokenClasswiseInputs(TokenFamily):
    """Per-position categorical laws (and one set of gate laws) per class, weighted by frequency.

    Needs integer labels.
    """

    grouped = True

    def _groups(self, x: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        return class_labels(x, y, self.label_limit)


@register_input_model("tokens-mixture")
class TokenMixtureInputs(KMeansOptions, TokenFamily):
    """Per-position categorical laws (and gate laws) on K k-means clusters of the one-hot sequences.

    No labels needed. Fitted like ``mixture``: k-means on a hashed sample of ``mixture_sample`` sequences in a
    first pass, then per-component counts of the nearest centre's examples.

    Options:
        components: K.
        mixture_sample: sequences (chosen by hash) on which k-means runs in the first pass.
        kmeans_iters: Lloyd iterations per restart.
        vocab_size: as for ``tokens``.
    """

    grouped = True
    needs_first_pass = True

    def __init__(self, seed: int = 0, vocab_size: int | None = None, components: int = 10,
                 mixture_sample: int = 4096, kmeans_iters: int = 100, **kw: Any) -> None:
        """An empty mixture; its components are fitted by :meth:`prepare`."""
        super().__init__(seed=seed, vocab_size=vocab_size, **kw)
        for name, v in (("components", components), ("mixture_sample", mixture_sample),
                        ("kmeans_iters", kmeans_iters)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise UsageError(f"{name} must be a positive integer, got {v!r}")
        self.components, self.mixture_sample, self.kmeans_iters = components, mixture_sample, kmeans_iters
        self.centers: torch.Tensor | None = None  # (K, P * V') float64 on one-hot sequences, V' <= V


    def prepare(self, batches: Batches) -> None:
        """Run k-means on a hashed sample of one-hot sequences, unless the components are given."""
        if self.centers is not None:  # components given (e.g. the same ones for every shard of a data set)
            return
        top = 0

        def rows(x: torch.Tensor) -> torch.Tensor:
            nonlocal top
            self.check_tokens(x)
            top = max(top, int(x.max()) + 1)
            return x.detach().reshape(x.shape[0], -1).to("cpu", torch.int64)

        ids = hashed_sample(batches, self.mixture_sample, self.seed, rows)
        if SAMPLE_GATHER.get() is not None:  # distributed: every rank's sample, every rank's vocabulary
            from .distributed import all_gather_objects

            top = max(all_gather_objects(top))
        V = self.vocab_size if self.vocab_size is not None else top
        X = F.one_hot(ids, V).reshape(ids.shape[0], -1).to(torch.float64)
        self.centers = kmeans(X, self.components, self.seed, self.kmeans_iters)
        log.info("tokens-mixture: k-means with %d components on %d sequences", self.centers.shape[0],
                 X.shape[0])

    def _groups(self, x: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        if self.centers is None:
            raise UsageError("the mixture's components are not fitted (prepare() was not called)")
        ids = x.reshape(x.shape[0], -1).long()
        P = ids.shape[1]
        C = self.centers.to(x.device).view(self.centers.shape[0], P, -1)  # (K, P, V')
        Vc = C.shape[2]
        # |onehot(x) - c|^2 = P - 2 c . onehot(x) + |c|^2; ids the centres never saw (>= V') meet zeros
        seen = ids < Vc
        picked = C[:, torch.arange(P, device=x.device)[None, :], ids.clamp_max(Vc - 1)] * seen  # (K, B, P)
        d2 = (C * C).sum((1, 2))[None, :] - 2 * picked.sum(2).T
        return d2.argmin(1)

    def _merge_extra(self, other: InputModel, out: InputModel) -> None:
        # out is a model of this class (the base class's signature says InputModel)
        out.centers = _merge_centres(self.centers, getattr(other, "centers", None))  # type: ignore[attr-defined]

    def tensors(self) -> dict[str, torch.Tensor]:
        """The token counts and the k-means centres."""
        out = super().tensors()
        if self.centers is not None:  # kept for merging; not needed by the estimate (not stored floats)
            out["centers"] = self.centers
        return out

    def restore(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        """Take the counts and centres back from a file; raises ``ValueError`` when inconsistent."""
        super().restore(tensors, meta)
        C = tensors.get("centers")
        if C is not None and (C.ndim != 2 or C.shape[1] % self.dim != 0 or C.shape[1] // self.dim > self.vocab
                              or not torch.isfinite(C).all()):
            raise ValueError("mixture centres are inconsistent with the input shape and "
                             "vocabulary or not finite")
        self.centers = C
