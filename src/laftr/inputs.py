"""Input models: what LAFTR stores about the training inputs (METHOD.md section 2, step 3), one class each.

Every input model accumulates float64 sums in one streaming pass (so summaries of data shards merge by
addition), says which *group* each example belongs to (gate statistics are kept per group), and turns its
sums into a sampler (Monte Carlo) and per-group first and second moments (closed form):

=============  =======================================================  ==========================================
name           what is stored                                           stored floats (d = input size)
=============  =======================================================  ==========================================
``gaussian``   mean and full covariance                                 ``d + d^2``
``diag``       mean and per-pixel variance                              ``2 d``
``lowrank``    mean, top-r eigenvectors of the covariance + diagonal    ``d + d r + d``
``classwise``  one Gaussian per class (labels), weighted by frequency   ``C (1 + d + d^2)`` (diag: ``C (1 + 2d)``)
``mixture``    K Gaussians on k-means clusters (no labels needed)       ``K (1 + d + d^2)`` (diag: ``K (1 + 2d)``)
``coreset``    k real inputs (bottom-k of a seeded hash of each one)    ``k d``
=============  =======================================================  ==========================================

``classwise`` and ``mixture`` are *grouped*: every group (class / component) also has its own gate law, so
the stored floats of the gates count once per group.

The mixture (ours; METHOD.md section 6) is fitted in two passes over the data: the first keeps a sample of
``mixture_sample`` inputs chosen by a seeded hash of their bytes (the same examples whatever the batch size,
order or sharding) and runs k-means on it (k-means++ seeding, Lloyd iterations, the best of 3 restarts, all
from ``seed``); the second assigns every example to its nearest centre and accumulates per-component
counts, sums and outer products, exactly like ``classwise`` with the cluster as the label. Hard assignment
keeps the summary a set of sums that merge exactly.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from collections.abc import Callable, Iterator
from typing import Any, ClassVar

import torch

from ._util import registrar
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
    """A seeded 63-bit hash of each example's bytes (``(B,)`` int64): samples that keep the k smallest keys
    are the same whatever the batch size, order or sharding of the data."""
    arr = x.detach().to("cpu", torch.float32).contiguous().numpy()
    salt = int(seed).to_bytes(8, "little", signed=True)
    keys = [int.from_bytes(hashlib.blake2b(row.tobytes(), digest_size=8, salt=salt[:8] + b"\0" * 8).digest(), "little")
            >> 1 for row in arr]
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


# ---------------------------------------------------------------------------------------------- base
class InputModel:
    """Base class. Subclasses set ``name`` (by :func:`register_input_model`) and implement the fit-time
    methods (:meth:`assign`, :meth:`accumulate`, :meth:`merge`), the use-time ones (:meth:`sample`,
    :meth:`moments`, :meth:`stored_floats`) and persistence (:meth:`tensors`, :meth:`meta`, :meth:`restore`).

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
        self.seed = int(seed)
        self.counts: torch.Tensor | None = None
        self.input_shape: tuple[int, ...] | None = None
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
        assert self.input_shape is not None
        n = 1
        for s in self.input_shape:
            n *= int(s)
        return n

    @property
    def num_groups(self) -> int:
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
        """``E[x]`` ``(d,)`` and ``E[x x^T]`` ``(d, d)`` of group ``g`` (the closed form)."""
        raise NotImplementedError

    def stored_floats(self) -> int:
        """Floats the estimate needs from this input model."""
        raise NotImplementedError

    # ------------------------------------------------------------------ persistence
    def options(self) -> dict[str, Any]:
        """The options that shaped the stored sums (JSON-able)."""
        return {"seed": self.seed}

    def tensors(self) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def meta(self) -> dict[str, Any]:
        return {"options": self.options(), "input_shape": list(self.input_shape or [])}

    def restore(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        """Inverse of :meth:`tensors` / :meth:`meta` (options already set); raises ``ValueError`` when
        inconsistent."""
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


class GaussianFamily(InputModel):
    """Gaussian input models from float64 sums per group: counts, sum of x, of x^2 and (full/low rank) of x x^T.

    Options:
        cov: ``full``, ``diag`` or ``lowrank`` covariance.
        rank: rank of ``lowrank``.
    """

    covariance: ClassVar[str] = "full"

    def __init__(self, seed: int = 0, cov: str | None = None, rank: int = 20, **kw: Any) -> None:
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
        return self.cov in ("full", "lowrank")

    def options(self) -> dict[str, Any]:
        out = {**super().options(), "cov": self.cov}
        if self.cov == "lowrank":
            out["rank"] = self.rank
        return out

    def begin(self, x: torch.Tensor) -> None:
        super().begin(x)
        d = x[0].numel()
        if self.full_sums and d > MAX_FULL_DIM:
            raise UsageError(f"input dimension {d} is too large for a full covariance (max {MAX_FULL_DIM}); use "
                             "input_model='diag' or a diagonal component covariance")

    def accumulate(self, x: torch.Tensor, y: torch.Tensor | None, group: torch.Tensor) -> None:
        xf = x.reshape(x.shape[0], -1).to(torch.float64)
        G = int(group.max()) + 1
        if self.counts is None:
            kw = {"dtype": torch.float64, "device": x.device}
            D = xf.shape[1]
            self.counts, self.x_sum, self.x_sq = torch.zeros(G, **kw), torch.zeros(G, D, **kw), torch.zeros(G, D, **kw)
            self.x_outer = torch.zeros(G, D, D, **kw) if self.full_sums else None
        elif self.counts.shape[0] < G:  # a new class: grow the group axis (rare)
            self.counts, self.x_sum, self.x_sq = (pad_groups(t, G) for t in (self.counts, self.x_sum, self.x_sq))
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
        if type(other) is not type(self) or not isinstance(other, GaussianFamily):
            raise UsageError(f"cannot merge a {self.name!r} input model with a {other.name!r} one")
        if self.options() != other.options():
            raise UsageError(f"cannot merge input models with different options: {self.options()} vs "
                             f"{other.options()}")
        if self.input_shape != other.input_shape:
            raise UsageError(f"cannot merge summaries of inputs {self.input_shape} and {other.input_shape}")
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
                evals, evecs = torch.linalg.eigh(cov)
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
                second = factor @ factor.transpose(1, 2) + torch.diag_embed(diag) + mean[:, :, None] * mean[:, None, :]
            else:
                diag = var
                second = torch.diag_embed(var) + mean[:, :, None] * mean[:, None, :]
            return _Derived(mean, second, factor, diag, {})

        return self._cached("derived", make)

    def _get(self, der: _Derived, name: str, g: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        key = (name, g, str(device), dtype)
        if key not in der.cast:
            der.cast[key] = getattr(der, name)[g].to(device, dtype)
        return der.cast[key]

    def sample(self, n: int, gen: torch.Generator, device: torch.device, dtype: torch.dtype,
               ) -> tuple[torch.Tensor, torch.Tensor]:
        der = self._derived()
        G, d = der.mean.shape
        if G == 1:
            groups = torch.zeros(n, dtype=torch.long)
        else:
            groups = torch.multinomial(self.weights().float(), n, replacement=True, generator=_cpu_generator(gen))
        x = torch.empty(n, d, device=device, dtype=dtype)
        for g in groups.unique().tolist():
            sel = (groups == g).nonzero().squeeze(1).to(device)
            m = len(sel)
            mean = self._get(der, "mean", g, device, dtype)
            if self.cov in ("full", "lowrank"):
                F_ = self._get(der, "factor", g, device, dtype)
                eps = torch.randn(m, F_.shape[1], generator=gen, device=gen.device, dtype=dtype).to(device)
                xs = mean + eps @ F_.T
                if self.cov == "lowrank":
                    eps2 = torch.randn(m, d, generator=gen, device=gen.device, dtype=dtype).to(device)
                    xs = xs + eps2 * self._get(der, "diag", g, device, dtype).sqrt()
            else:
                eps = torch.randn(m, d, generator=gen, device=gen.device, dtype=dtype).to(device)
                xs = mean + eps * self._get(der, "diag", g, device, dtype).sqrt()
            x[sel] = xs
        assert self.input_shape is not None
        return x.view(n, *self.input_shape), groups.to(device)

    def moments(self, g: int, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        der = self._derived()
        return self._get(der, "mean", g, device, dtype), self._get(der, "second", g, device, dtype)

    def stored_floats(self) -> int:
        d = self.dim
        if self.cov == "full":
            per = d + d * d
        elif self.cov == "lowrank":
            per = d + d * min(self.rank, d) + d
        else:
            per = 2 * d
        if not self.grouped:
            return per
        return self.nonempty_groups() * (1 + per)

    def nonempty_groups(self) -> int:
        """Groups with examples (groups are indexed by label; absent classes store nothing)."""
        assert self.counts is not None
        return int((self.counts > 0).sum())

    # ------------------------------------------------------------------ persistence
    def tensors(self) -> dict[str, torch.Tensor]:
        assert self.counts is not None and self.x_sum is not None and self.x_sq is not None
        out = {"counts": self.counts, "x_sum": self.x_sum, "x_sq": self.x_sq}
        if self.x_outer is not None:
            out["x_outer"] = self.x_outer
        return out

    def restore(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
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
            raise ValueError(f"input-model tensors have {d} features, the input shape {self.input_shape} has {self.dim}")
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
        kw.pop("cov", None)
        super().__init__(seed=seed, cov="full", **kw)


@register_input_model("diag")
class DiagInputs(GaussianFamily):
    """One Gaussian with the inputs' mean and per-feature variance."""

    covariance = "diag"

    def __init__(self, seed: int = 0, **kw: Any) -> None:
        kw.pop("cov", None)
        super().__init__(seed=seed, cov="diag", **kw)


@register_input_model("lowrank")
class LowRankInputs(GaussianFamily):
    """One Gaussian whose covariance is its top-``rank`` eigenvectors plus the residual diagonal."""

    covariance = "lowrank"

    def __init__(self, seed: int = 0, **kw: Any) -> None:
        kw.pop("cov", None)
        super().__init__(seed=seed, cov="lowrank", **kw)


@register_input_model("classwise")
class ClasswiseInputs(GaussianFamily):
    """One Gaussian (and one set of gate laws) per class, weighted by the class frequency; needs integer
    labels. Option ``cov``: ``full`` or ``diag`` covariance per class."""

    grouped = True

    def __init__(self, seed: int = 0, cov: str | None = "full", **kw: Any) -> None:
        super().__init__(seed=seed, cov=cov or "full", **kw)
        if self.cov == "lowrank":
            raise UsageError("a classwise input model has a 'full' or 'diag' covariance per class")

    def assign(self, x: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        if y is None:
            raise DataError("a classwise summary needs labels: give (x, y) batches")
        if y.dtype.is_floating_point or y.dtype == torch.bool or y.ndim != 1:
            raise DataError(f"classwise summaries need integer class labels of shape (B,), got {y.dtype} "
                            f"{tuple(y.shape)}")
        if (y < 0).any():
            raise DataError("class labels must be non-negative")
        return y.long().to(x.device)


@register_input_model("mixture")
class MixtureInputs(GaussianFamily):
    """K Gaussians (and K sets of gate laws) on k-means clusters of the inputs; no labels needed.

    Options:
        components: K.
        cov: ``full`` or ``diag`` covariance per component.
        mixture_sample: inputs (chosen by hash) on which k-means runs in the first pass.
        kmeans_iters: Lloyd iterations per restart.
    """

    grouped = True
    needs_first_pass = True

    def __init__(self, seed: int = 0, cov: str | None = "full", components: int = 10, mixture_sample: int = 4096,
                 kmeans_iters: int = 100, **kw: Any) -> None:
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

    def init_options(self) -> dict[str, Any]:
        return {**super().init_options(), "components": self.components, "mixture_sample": self.mixture_sample,
                "kmeans_iters": self.kmeans_iters}

    def options(self) -> dict[str, Any]:
        return {**super().options(), "components": self.components, "mixture_sample": self.mixture_sample,
                "kmeans_iters": self.kmeans_iters}

    def prepare(self, batches: Batches) -> None:
        if self.centers is not None:  # components given (e.g. the same ones for every shard of a data set)
            return
        keys: list[torch.Tensor] = []
        xs: list[torch.Tensor] = []
        m = self.mixture_sample
        for x, _ in batches():
            keys.append(hash_keys(x, self.seed))
            xs.append(x.detach().reshape(x.shape[0], -1).to("cpu", torch.float64))
            allk = torch.cat(keys)
            if len(allk) > 4 * m:
                order = torch.argsort(allk, stable=True)[:m]
                keys, xs = [allk[order]], [torch.cat(xs)[order]]
        allk, X = torch.cat(keys), torch.cat(xs)
        X = X[torch.argsort(allk, stable=True)[:m]]
        self.centers = kmeans(X, self.components, self.seed, self.kmeans_iters)
        log.info("mixture: k-means with %d components on %d inputs", self.centers.shape[0], X.shape[0])

    def assign(self, x: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        if self.centers is None:
            raise UsageError("the mixture's components are not fitted (prepare() was not called)")
        xf = x.reshape(x.shape[0], -1).to(torch.float64)
        return nearest(xf, self.centers.to(xf.device))

    def _merge_extra(self, other: InputModel, out: InputModel) -> None:
        a, b = self.centers, getattr(other, "centers", None)
        if a is None or b is None or a.shape != b.shape or not torch.equal(a, b):
            raise UsageError("cannot merge mixture summaries whose components differ (fit the shards with the same "
                             "k-means centres)")
        out.centers = a  # type: ignore[attr-defined]

    def stored_floats(self) -> int:
        # the centres are kept in the file for merging and are not needed by the estimate
        return super().stored_floats()

    def tensors(self) -> dict[str, torch.Tensor]:
        out = super().tensors()
        if self.centers is not None:
            out["centers"] = self.centers
        return out

    def restore(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
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
    """Centres of k-means on ``X`` (``(n, d)`` float64): k-means++ seeding and Lloyd iterations from a seeded
    generator, the lowest within-cluster sum of squares of ``restarts`` runs. ``k`` is capped at the number of
    distinct rows."""
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
    """``coreset_size`` real inputs: the bottom-k of a seeded hash of each example's bytes (the same set
    whatever the batch size, order or sharding). Monte Carlo uses every stored point ``S // k`` times plus a
    random subset for the remainder (unbiased; no input noise when k divides S); the closed form uses their
    empirical moments."""

    def __init__(self, seed: int = 0, coreset_size: int = 200, **kw: Any) -> None:
        super().__init__(seed=seed, **kw)
        if not isinstance(coreset_size, int) or isinstance(coreset_size, bool) or coreset_size < 1:
            raise UsageError(f"coreset_size must be a positive integer, got {coreset_size!r}")
        self.k = int(coreset_size)
        self.keys: list[torch.Tensor] = []
        self.xs: list[torch.Tensor] = []
        self.ys: list[torch.Tensor] = []
        self.X: torch.Tensor | None = None  # (k', d) float64
        self.Y: torch.Tensor | None = None
        self.K: torch.Tensor | None = None

    def options(self) -> dict[str, Any]:
        return {**super().options(), "coreset_size": self.k}

    def accumulate(self, x: torch.Tensor, y: torch.Tensor | None, group: torch.Tensor) -> None:
        n = x.shape[0]
        self.counts = torch.tensor([n], dtype=torch.float64) if self.counts is None else self.counts + n
        self.keys.append(hash_keys(x, self.seed))
        self.xs.append(x.detach().reshape(n, -1).to("cpu", torch.float64))
        self.ys.append((y if y is not None else torch.full((n,), -1)).detach().cpu().long().reshape(-1))
        allk = torch.cat(self.keys)
        if len(allk) > 4 * self.k:  # prune to keep memory bounded
            order = torch.argsort(allk, stable=True)[: self.k]
            self.keys, self.xs, self.ys = [allk[order]], [torch.cat(self.xs)[order]], [torch.cat(self.ys)[order]]

    def finish(self) -> None:
        allk, allx, ally = torch.cat(self.keys), torch.cat(self.xs), torch.cat(self.ys)
        order = torch.argsort(allk, stable=True)[: self.k]
        self.K, self.X, self.Y = allk[order], allx[order], ally[order]
        self.keys, self.xs, self.ys = [], [], []
        self._cache.clear()

    def merge(self, other: InputModel) -> InputModel:
        if not isinstance(other, CoresetInputs) or self.options() != other.options():
            raise UsageError("cannot merge coresets of different sizes or seeds")
        if self.input_shape != other.input_shape:
            raise UsageError(f"cannot merge summaries of inputs {self.input_shape} and {other.input_shape}")
        assert self.K is not None and other.K is not None and self.X is not None and other.X is not None
        assert self.Y is not None and other.Y is not None and self.counts is not None and other.counts is not None
        out = CoresetInputs(seed=self.seed, coreset_size=self.k)
        out.input_shape = self.input_shape
        keys = torch.cat([self.K, other.K])
        order = torch.argsort(keys, stable=True)[: self.k]
        out.K, out.X, out.Y = keys[order], torch.cat([self.X, other.X])[order], torch.cat([self.Y, other.Y])[order]
        out.counts = self.counts + other.counts
        return out

    def sample(self, n: int, gen: torch.Generator, device: torch.device, dtype: torch.dtype,
               ) -> tuple[torch.Tensor, torch.Tensor]:
        assert self.X is not None and self.input_shape is not None
        X = self._cached(("x", str(device), dtype), lambda: self.X.to(device, dtype))
        k = X.shape[0]
        full = torch.arange(k).repeat(n // k)
        rest = torch.randperm(k, generator=gen, device=gen.device)[: n % k].cpu()
        idx = torch.cat([full, rest]).to(device)
        return X[idx].view(-1, *self.input_shape), torch.zeros(len(idx), dtype=torch.long, device=device)

    def moments(self, g: int, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        assert self.X is not None
        X = self.X.to(device, dtype)
        return X.mean(0), X.T @ X / X.shape[0]

    def stored_floats(self) -> int:
        return 0 if self.X is None else int(self.X.numel())

    def tensors(self) -> dict[str, torch.Tensor]:
        assert self.X is not None and self.Y is not None and self.K is not None and self.counts is not None
        return {"counts": self.counts, "x": self.X, "y": self.Y, "keys": self.K}

    def restore(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        self.input_shape = tuple(int(v) for v in meta["input_shape"])
        self.counts, self.X, self.Y, self.K = tensors["counts"], tensors["x"], tensors["y"], tensors["keys"]
        if self.X.ndim != 2 or self.X.shape[1] != self.dim or self.X.shape[0] == 0:
            raise ValueError("coreset inputs do not match the input shape (or the coreset is empty)")
        if self.Y.shape != (self.X.shape[0],) or self.K.shape != (self.X.shape[0],):
            raise ValueError("coreset labels or keys do not match its inputs")
        if not torch.isfinite(self.X).all():
            raise ValueError("coreset inputs contain NaN or infinite values")
        self._cache.clear()
