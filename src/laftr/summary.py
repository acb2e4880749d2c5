"""What LAFTR stores at theta0, fitted in one streaming pass: gate statistics and input moments.

All statistics are float64 *sums* per group (one group, or one per class for classwise summaries),
so the summary of several data shards is the sum of their summaries (:meth:`Summary.merge`): a
distributed fit is a plain all-reduce. The optional coreset is a bottom-k sample by a seeded hash of
each example's bytes, so it too is independent of batch size, order and sharding.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from typing import Any

import torch
from tqdm.auto import tqdm

from ._util import Data, iter_batches
from .graph import FitRecorder, TracedNet

log = logging.getLogger(__name__)

#: Largest input dimension for which the full d x d second moment is accumulated.
MAX_FULL_DIM = 8192


@dataclasses.dataclass
class Summary:
    """Mergeable sufficient statistics of the training data at theta0.

    Attributes:
        counts: ``(G,)`` examples per group.
        site_sums: per gate site, ``(G, *units)`` number of examples where the unit was active; per
            max-pool site, ``(G, C, K, L)`` how often each window position was the maximum.
        x_sum: ``(G, d)`` sum of inputs.
        x_outer: ``(G, d, d)`` sum of ``x x^T`` (None when only the diagonal is kept).
        x_sq: ``(G, d)`` sum of ``x**2``.
        input_shape: per-example input shape.
        coreset_x, coreset_y, coreset_keys: the bottom-k sample (k may be 0).
        coreset_size: k requested.
    """

    counts: torch.Tensor
    site_sums: dict[str, torch.Tensor]
    x_sum: torch.Tensor
    x_outer: torch.Tensor | None
    x_sq: torch.Tensor
    input_shape: tuple[int, ...]
    coreset_x: torch.Tensor
    coreset_y: torch.Tensor
    coreset_keys: torch.Tensor
    coreset_size: int = 0

    @property
    def num_groups(self) -> int:
        return int(self.counts.shape[0])

    @property
    def dim(self) -> int:
        return int(self.x_sum.shape[1])

    def merge(self, other: Summary) -> Summary:
        """The summary of the union of both datasets (exact up to float64 rounding of sums)."""
        if self.input_shape != other.input_shape:
            raise ValueError(f"cannot merge summaries of inputs {self.input_shape} and {other.input_shape}")
        if sorted(self.site_sums) != sorted(other.site_sums):
            raise ValueError("cannot merge summaries of different networks (gate sites differ)")
        if (self.x_outer is None) != (other.x_outer is None):
            raise ValueError("cannot merge a full-covariance summary with a diagonal one")
        G = max(self.num_groups, other.num_groups)

        def add(a: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor | None:
            if a is None or b is None:
                return None
            return _pad_groups(a, G) + _pad_groups(b, G)

        sums = {k: add(v, other.site_sums[k]) for k, v in self.site_sums.items()}
        k = max(self.coreset_size, other.coreset_size)
        keys = torch.cat([self.coreset_keys, other.coreset_keys])
        cx = torch.cat([self.coreset_x, other.coreset_x])
        cy = torch.cat([self.coreset_y, other.coreset_y])
        order = torch.argsort(keys, stable=True)[:k]
        return Summary(
            counts=add(self.counts, other.counts),  # type: ignore[arg-type]
            site_sums=sums,  # type: ignore[arg-type]
            x_sum=add(self.x_sum, other.x_sum),  # type: ignore[arg-type]
            x_outer=add(self.x_outer, other.x_outer),
            x_sq=add(self.x_sq, other.x_sq),  # type: ignore[arg-type]
            input_shape=self.input_shape,
            coreset_x=cx[order],
            coreset_y=cy[order],
            coreset_keys=keys[order],
            coreset_size=k,
        )

    # ------------------------------------------------------------------ derived quantities
    def weights(self) -> torch.Tensor:
        """Fraction of examples in each group."""
        return self.counts / self.counts.sum()

    def site_means(self, group: int | None = None) -> dict[str, torch.Tensor]:
        """Per site: activation probability mu (gates) or argmax frequency (max pools); pooled over groups
        when ``group`` is None, else ``(G, *units)`` stacked per group when ``group == -1``."""
        out = {}
        for k, v in self.site_sums.items():
            if group is None:
                out[k] = v.sum(0) / self.counts.sum()
            else:
                out[k] = v / self.counts.clamp_min(1).view(-1, *([1] * (v.ndim - 1)))
        return out

    def moments(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Per group: mean ``(G, d)``, variance ``(G, d)``, covariance ``(G, d, d)`` (or None)."""
        n = self.counts.clamp_min(1).view(-1, 1)
        mean = self.x_sum / n
        var = (self.x_sq / n - mean**2).clamp_min(0)
        cov = None
        if self.x_outer is not None:
            cov = self.x_outer / n.view(-1, 1, 1) - mean[:, :, None] * mean[:, None, :]
            cov = 0.5 * (cov + cov.transpose(1, 2))
        return mean, var, cov

    def pooled_moments(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Mean ``(d,)``, variance ``(d,)`` and covariance ``(d, d)`` over all groups."""
        N = self.counts.sum()
        mean = self.x_sum.sum(0) / N
        var = (self.x_sq.sum(0) / N - mean**2).clamp_min(0)
        cov = None
        if self.x_outer is not None:
            cov = self.x_outer.sum(0) / N - mean[:, None] * mean[None, :]
            cov = 0.5 * (cov + cov.T)
        return mean, var, cov

    # ------------------------------------------------------------------ persistence
    def tensors(self) -> dict[str, torch.Tensor]:
        out = {"counts": self.counts, "x_sum": self.x_sum, "x_sq": self.x_sq, "coreset_x": self.coreset_x,
               "coreset_y": self.coreset_y, "coreset_keys": self.coreset_keys}
        if self.x_outer is not None:
            out["x_outer"] = self.x_outer
        for k, v in self.site_sums.items():
            out[f"site/{k}"] = v
        return out

    def meta(self) -> dict[str, Any]:
        return {"input_shape": list(self.input_shape), "coreset_size": self.coreset_size,
                "sites": sorted(self.site_sums)}

    @classmethod
    def from_tensors(cls, t: dict[str, torch.Tensor], meta: dict[str, Any]) -> Summary:
        sites = {k[5:]: v for k, v in t.items() if k.startswith("site/")}
        if sorted(sites) != sorted(meta["sites"]):
            raise ValueError("gate-site tensors do not match the metadata")
        s = cls(
            counts=t["counts"], site_sums=sites, x_sum=t["x_sum"], x_outer=t.get("x_outer"), x_sq=t["x_sq"],
            input_shape=tuple(meta["input_shape"]), coreset_x=t["coreset_x"], coreset_y=t["coreset_y"],
            coreset_keys=t["coreset_keys"], coreset_size=int(meta["coreset_size"]),
        )
        G, d = s.x_sum.shape
        if s.counts.shape != (G,) or s.x_sq.shape != (G, d) or (s.x_outer is not None and s.x_outer.shape != (G, d, d)):
            raise ValueError("summary tensors have inconsistent shapes")
        if not all(torch.isfinite(v).all() for v in (s.counts, s.x_sum, s.x_sq)):
            raise ValueError("summary tensors contain NaN or infinite values")
        return s


def _pad_groups(t: torch.Tensor, G: int) -> torch.Tensor:
    if t.shape[0] == G:
        return t
    return torch.cat([t, t.new_zeros((G - t.shape[0], *t.shape[1:]))])


def _hash_keys(x: torch.Tensor, seed: int) -> torch.Tensor:
    """A seeded 63-bit hash of each example's bytes: the coreset keeps the k smallest."""
    arr = x.detach().to("cpu", torch.float32).contiguous().numpy()
    salt = seed.to_bytes(8, "little", signed=True)
    keys = [int.from_bytes(hashlib.blake2b(row.tobytes(), digest_size=8, salt=salt[:8] + b"\0" * 8).digest(), "little")
            >> 1 for row in arr]
    return torch.tensor(keys, dtype=torch.int64)


def fit_summary(
    net: TracedNet,
    theta0: dict[str, torch.Tensor],
    data: Data,
    classwise: bool = False,
    full_cov: bool = True,
    coreset_size: int = 0,
    seed: int = 0,
    batch_size: int = 256,
    progress: bool = False,
) -> Summary:
    """One streaming pass over ``data`` at theta0: gate/max-pool statistics, input moments, coreset.

    Args:
        net: the traced network.
        theta0: its parameters (and buffers).
        data: loader / tensors; labels are needed when ``classwise``.
        classwise: keep statistics per class (labels ``y`` must be integer class indices).
        full_cov: accumulate the full second moment (else only its diagonal).
        coreset_size: number of inputs to keep (bottom-k of a seeded hash).
        seed: seed of the coreset hash.
        batch_size: used when ``data`` is a tensor.
        progress: progress bar.
    """
    first = next(iter(theta0.values()), None)
    device = first.device if first is not None else torch.device("cpu")
    dtype = first.dtype if first is not None and first.is_floating_point() else torch.get_default_dtype()
    rec = FitRecorder(net.sites)
    counts = x_sum = x_sq = x_outer = None
    cx: list[torch.Tensor] = []
    cy: list[torch.Tensor] = []
    ck: list[torch.Tensor] = []
    input_shape: tuple[int, ...] | None = None
    with torch.no_grad():
        for x, y in tqdm(iter_batches(data, batch_size, device, dtype), disable=not progress, desc="LAFTR summary"):
            if input_shape is None:
                input_shape = tuple(x.shape[1:])
                d = x[0].numel()
                if full_cov and d > MAX_FULL_DIM:
                    raise ValueError(f"input dimension {d} is too large for a full covariance (max {MAX_FULL_DIM}); "
                                     "use input_model='diag' or 'lowrank'")
            elif tuple(x.shape[1:]) != input_shape:
                raise ValueError(f"inputs change shape between batches: {input_shape} then {tuple(x.shape[1:])}")
            if classwise:
                if y is None:
                    raise ValueError("a classwise summary needs labels: give (x, y) batches")
                if y.dtype.is_floating_point or y.ndim != 1:
                    raise ValueError("classwise summaries need integer class labels of shape (B,)")
                if (y < 0).any():
                    raise ValueError("class labels must be non-negative")
                group = y.long()
            else:
                group = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
            G = int(group.max()) + 1
            rec.group, rec.num_groups = group, G
            net.run((x,), [theta0], rec)
            xf = x.reshape(x.shape[0], -1).to(torch.float64)
            if counts is None:
                kw = {"dtype": torch.float64, "device": x.device}
                D = xf.shape[1]
                counts, x_sum, x_sq = torch.zeros(G, **kw), torch.zeros(G, D, **kw), torch.zeros(G, D, **kw)
                x_outer = torch.zeros(G, D, D, **kw) if full_cov else None
            elif counts.shape[0] < G:  # a new class: grow the group axis (rare; sums are updated in place)
                counts, x_sum, x_sq = (_pad_groups(t, G) for t in (counts, x_sum, x_sq))
                x_outer = None if x_outer is None else _pad_groups(x_outer, G)
            assert x_sum is not None and x_sq is not None
            counts.index_add_(0, group, torch.ones_like(xf[:, 0]))
            x_sum.index_add_(0, group, xf)
            x_sq.index_add_(0, group, xf * xf)
            if x_outer is not None:
                for g in (group.unique().tolist() if classwise else [0]):
                    xg = xf[group == g] if classwise else xf
                    x_outer[g].addmm_(xg.T, xg)
            if coreset_size > 0:
                keys = _hash_keys(x, seed)
                ck.append(keys)
                cx.append(x.detach().reshape(x.shape[0], -1).to("cpu", torch.float64))
                cy.append((y if y is not None else torch.full((x.shape[0],), -1)).detach().cpu().long().reshape(-1))
                allk = torch.cat(ck)
                if len(allk) > 4 * coreset_size:  # prune to keep memory bounded
                    order = torch.argsort(allk, stable=True)[:coreset_size]
                    ck, cx, cy = [allk[order]], [torch.cat(cx)[order]], [torch.cat(cy)[order]]
    assert counts is not None and x_sum is not None and x_sq is not None and input_shape is not None
    G = counts.shape[0]
    sums = {k: _pad_groups(v, G).cpu() for k, v in rec.sums.items()}
    if coreset_size > 0:
        allk, allx, ally = torch.cat(ck), torch.cat(cx), torch.cat(cy)
        order = torch.argsort(allk, stable=True)[:coreset_size]
        keys, corx, cory = allk[order], allx[order], ally[order]
    else:
        keys = torch.zeros(0, dtype=torch.int64)
        corx = torch.zeros(0, x_sum.shape[1], dtype=torch.float64)
        cory = torch.zeros(0, dtype=torch.int64)
    log.info("LAFTR summary: %d examples, %d groups, %d sites", int(counts.sum()), G, len(sums))
    return Summary(
        counts=counts.cpu(), site_sums=sums, x_sum=x_sum.cpu(), x_outer=None if x_outer is None else x_outer.cpu(),
        x_sq=x_sq.cpu(), input_shape=input_shape, coreset_x=corx, coreset_y=cory, coreset_keys=keys,
        coreset_size=coreset_size,
    )
