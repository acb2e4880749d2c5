"""K-FAC: a Kronecker-factored block-diagonal Gauss-Newton approximation of the FSD.

For every supported layer with weight ``W`` (``d_out x d_in``) and bias ``b``, let
``dW~ = [W - W0, b - b0]`` (``d_out x (d_in + 1)``, the bias as an extra column). The estimate is::

    D(theta) ~= 1/2 sum_layers vec(dW~)^T (A (x) G) vec(dW~) = 1/2 sum_layers tr(G dW~ A dW~^T)

with ``A = E[a~ a~^T]`` (``a~ = [layer input; 1]``) and ``G = E[g g^T]``, g the gradient w.r.t. the layer's
output of ``w . z_sel``, for output-space vectors ``w`` whose outer products give the metric's Hessian
(sampled for ``fisher="mc"``, all columns of its factor for ``"exact"``; see
:mod:`laftr.estimators.curvature`). A and G are averaged over examples separately (the K-FAC
independence approximation); for one example and ``exact`` the layer's term equals its dense
Gauss-Newton block.

Layers with several positions per example (``Conv2d``; a ``Linear`` applied to ``(B, T, d)`` inputs)
follow KFC (Grosse & Martens, 2016): with ``T`` positions,
``A = E_x[(1/T) sum_t a~_t a~_t^T]`` (unfolded patches ``C_in*kh*kw`` plus 1, averaged over positions)
and ``G = E_x[sum_t g_t g_t^T]`` (summed over positions). Only the product ``A (x) G`` matters, and it
equals KFC's ``Omega (x) Gamma`` with the sum on A and the average on G.

Supported: ``nn.Linear`` and ``nn.Conv2d`` (``groups=1``, any stride/padding/dilation/padding mode),
``nn.Embedding`` and the projections of ``nn.MultiheadAttention`` (see :mod:`laftr.estimators.taps`).

- An **embedding** (weight ``(V, d)``, no bias) is the linear map ``W^T onehot(t)`` of the one-hot token, so
  its input factor is ``A = E_x[(1/T) sum_t onehot(t) onehot(t)^T]``, which is exactly diagonal (one token per
  position): only its diagonal, the token frequencies, is stored (``V`` floats, never a ``V x V`` matrix);
  ``G`` is over the embedding dimension ``d`` as for any layer. With ``dW = W - W0`` in the weight's own
  ``(V, d)`` orientation (the transpose of a Linear weight's), the term is
  ``tr(G dW^T diag(A) dW) = sum_v A_v dW[v] G dW[v]^T``. The row ``padding_idx`` has ``A_v = 0`` (PyTorch
  gives it no gradient, so it is a constant of the network and its Gauss-Newton block is zero), and the
  positions holding it are left out of ``G`` too.
- A **self-attention** ``nn.MultiheadAttention`` with one joint input projection has two Linear-like layers:
  ``<prefix>.in_proj`` (``in_proj_weight`` ``(3E, E)`` with ``in_proj_bias``: one Kronecker block for q, k and
  v together, ``A`` over its input, ``G`` over ``q|k|v``) and ``<prefix>.out_proj`` (over the merged heads).
  With separate ``q/k/v`` weights, or cross-attention, the input projection is unsupported (``out_proj``
  keeps its block).

A module called several times in one forward pass (weight sharing) has the positions of all its calls pooled
by the same convention (A averaged over them, G summed), as in K-FAC for shared weights. Any other module with
trainable parameters (batch norm, layer norm, grouped convs, bare ``nn.Parameter`` s such as learned
positional embeddings, an embedding whose weight is also used directly) raises an
:class:`~laftr.errors.UnsupportedOpError` naming it, unless ``unsupported="diag"``: its parameters then get
the diagonal Gauss-Newton term of ``diag-fisher``, computed from the same output vectors. A layer without bias
has no ones column (``A`` is ``d_in x d_in``). Stored: ``sum (d_in + 1)^2 + d_out^2`` floats over Linear-like
layers, ``V + d^2`` per embedding (plus one per fallback parameter).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable
from typing import Any, cast

import torch
from torch import nn

from .. import distributed as dist_
from .._util import Data, model_device_dtype, narrowed, wide_dtype
from ..errors import DataError, UnsupportedOpError, UsageError
from .base import EstimatorConfig, FSDEstimator, register
from .curvature import (
    check_curvature_config,
    curvature_batches,
    per_example_square_grads,
    reduce_sums,
    unused_label_samples,
)
from .taps import TAP_KINDS, LayerTaps, Tap, find_taps, token_counts

log = logging.getLogger(__name__)


@dataclasses.dataclass
class KfacConfig(EstimatorConfig):
    """Options of the ``kfac`` estimator.

    Attributes:
        fisher: ``mc`` (sampled output vectors; for ``kl`` labels drawn from the model: the true Fisher),
            ``exact`` (all K columns of the metric's Hessian factor: one backward pass per output) or
            ``empirical`` (cross-entropy gradients at the true labels; ``kl`` only, needs labels).
        num_label_samples: output vectors sampled per example for ``mc``.
        unsupported: ``error`` (default) to refuse a model with trainable parameters outside the tapped layers
            (``Linear``/``Conv2d``/``Embedding``, self-attention projections; LayerNorm and bare parameters
            such as learned positional embeddings are not), or ``diag`` to give those parameters a diagonal
            Gauss-Newton term.
        chunk_size: examples per vectorized chunk of the ``diag`` fallback's per-example gradients.
    """

    fisher: str = "mc"
    num_label_samples: int = 1
    unsupported: str = "error"
    chunk_size: int = 32

    def unused(self, given: Iterable[str]) -> list[str]:
        """``num_label_samples`` with a Fisher that draws no labels."""
        return unused_label_samples(self.fisher, given)


@register("kfac")
class KfacEstimator(FSDEstimator):
    """K-FAC (Ritter et al. 2018 style): ``1/2 sum_layers tr(G dW~ A dW~^T)``. See the module docstring."""

    Config = KfacConfig
    quadratic = True  # Hessian: per layer A (x) G (an embedding's diag(A) (x) G), per fallback its diagonal
    renormalized_tables = "refused"

    def __init__(self, config: KfacConfig | None = None, **kwargs: Any) -> None:
        """An unfitted estimator (see :class:`FSDEstimator`); checks the curvature options."""
        super().__init__(config, **kwargs)
        check_curvature_config(self.config, ("mc", "exact", "empirical"))
        if self.cfg.unsupported not in ("error", "diag"):
            raise UsageError(f"unknown unsupported={self.cfg.unsupported!r}; choose 'error' or 'diag'")
        self.layers: list[Tap] = []
        self.A: dict[str, torch.Tensor] = {}
        self.G: dict[str, torch.Tensor] = {}
        self.diag: dict[str, torch.Tensor] = {}

    @property
    def cfg(self) -> KfacConfig:
        """The config, typed as a :class:`KfacConfig`."""
        return cast(KfacConfig, self.config)

    # ------------------------------------------------------------------ fitting
    def _fit(self, model: nn.Module, data: Data) -> None:
        c = self.cfg
        kinds = sorted({str(p.dtype) for p in model.parameters() if p.is_floating_point()})
        if len(kinds) > 1:  # (its factors are kept in one dtype: torch's dtype error at the first estimate)
            raise UnsupportedOpError(f"kfac: the network's parameters have several floating dtypes "
                                     f"({kinds}); K-FAC keeps its factors in one: cast the network to one "
                                     "dtype")
        found = find_taps(model, "fallback" if c.unsupported == "diag" else "error", "kfac")
        wide = wide_dtype(model_device_dtype(model)[1])  # (sums of float16 outer products overflow)
        layers, fallback = found.taps, found.fallback
        rank = dist_.rank_and_size()[0] if self._distributed else 0

        def local() -> tuple[dict[str, torch.Tensor], int]:
            sums: dict[str, torch.Tensor] = {}  # A/<layer>, G/<layer>, diag/<parameter>

            def add(key: str, v: torch.Tensor) -> None:
                sums[key] = v if key not in sums else sums[key] + v

            count = 0
            with LayerTaps(model, found) as taps:
                for x, W in curvature_batches(model, data, c, self.outputs, "K-FAC", stream=rank):
                    inputs, per_vector = taps.grads(x, W, self.outputs)
                    # an embedding's padding positions: PyTorch gives their row no gradient, so they are in
                    # neither factor (their output gradients, large behind a norm of a zero vector, would
                    # otherwise weigh on every other row through G)
                    keep = {layer.name: (torch.cat(inputs[layer.name], dim=1) != layer.padding_idx)[..., None]
                            for layer in layers
                            if layer.kind == "embedding" and layer.padding_idx is not None}
                    for grads in per_vector:
                        for layer in layers:
                            g = torch.cat(grads[layer.name], dim=1).to(wide)  # calls pooled as positions
                            if layer.name in keep:
                                g = g * keep[layer.name].to(g)
                            add(f"G/{layer.name}", torch.einsum("bti,btj->ij", g, g))
                    for layer in layers:
                        a = torch.cat(inputs[layer.name], dim=1)
                        # an embedding: the diagonal of the one-hot outer products, per position
                        if layer.kind == "embedding":
                            aa = token_counts(layer, a, wide) / a.shape[1]
                        else:
                            a = a.to(wide)
                            aa = torch.einsum("bti,btj->ij", a, a) / a.shape[1]
                        add(f"A/{layer.name}", aa)
                    if fallback:  # hooks are idle outside taps.grads
                        sq = per_example_square_grads(model, x, W, fallback, self.outputs, c.chunk_size)
                        for n, v in sq.items():
                            add(f"diag/{n}", v)
                    count += x.shape[0]
            return sums, count

        sums, count = self._local(local, "the K-FAC factors")
        if self._distributed:
            sums, count = reduce_sums(sums, count, model)
        A = {k[2:]: v for k, v in sums.items() if k.startswith("A/")}
        G = {k[2:]: v for k, v in sums.items() if k.startswith("G/")}
        diag = {k[5:]: v for k, v in sums.items() if k.startswith("diag/")}
        self.layers = layers
        # (in the layers' and parameters' order, as one process has them: a reduction sorts the names)
        self.A = {lay.name: A[lay.name] / count for lay in layers if lay.name in A}
        self.G = {lay.name: G[lay.name] / count for lay in layers if lay.name in G}
        self.diag = {n: diag[n] / count for n in fallback if n in diag}
        for kind, d in (("A", self.A), ("G", self.G), ("diagonal", self.diag)):
            for n, v in d.items():
                if not torch.isfinite(v).all():
                    raise DataError(f"kfac: the {kind} factor of {n!r} is not finite")
        log.info("kfac (%s): %d examples, %d layers, %d fallback parameters, %d floats", c.fisher, count,
                 len(layers), len(fallback), self.stored_floats())

    # ------------------------------------------------------------------ evaluation
    def _distance(self, model: nn.Module) -> torch.Tensor:
        device, dtype = model_device_dtype(model)
        wide = wide_dtype(dtype)  # (products of float16 changes underflow)
        p0 = self.theta0_on(model)
        params = dict(model.named_parameters())

        def change(name: str) -> torch.Tensor:
            return params[name].to(wide) - p0[name].to(wide)

        total = None
        for layer in self.layers:
            A = self.A[layer.name].to(device, wide)
            G = self.G[layer.name].to(device, wide)
            w = layer.weight_name
            if layer.kind == "embedding":  # dW is (V, d); A is the diagonal over the vocabulary
                dW = change(w)
                t = (A[:, None] * (dW @ G) * dW).sum()  # sum_v A_v dW[v] G dW[v]^T
            else:
                dW = change(w).reshape(layer.d_out, -1)
                if layer.bias:
                    dW = torch.cat([dW, change(layer.bias_name)[:, None]], dim=1)
                t = ((G @ dW) * (dW @ A)).sum()  # tr(G dW A dW^T), A and G symmetric
            total = t if total is None else total + t
        for n, f in self.diag.items():
            t = (f.to(device, wide) * change(n).pow(2)).sum()
            total = t if total is None else total + t
        assert total is not None
        return narrowed(0.5 * total, model)

    def _eigen(self, layer: Tap, weight: bool, bias: bool) -> tuple[torch.Tensor | None, torch.Tensor,
                                                                      torch.Tensor, torch.Tensor]:
        """Eigendecompositions of the layer's factors (float64, clamped at 0), restricted to the blocks.

        ``(Q_A, l_A, Q_G, l_G)``; for an embedding ``Q_A`` is None and ``l_A`` the diagonal A itself. Cached
        until the estimator is fitted or loaded again.
        """
        cache = self._fit_cache("_eigen_cache")
        key = (layer.name, weight, bias)
        if key not in cache:
            A = self.A[layer.name].double().cpu()
            lG, QG = torch.linalg.eigh(self.G[layer.name].double().cpu())
            if layer.kind == "embedding":
                cache[key] = (None, A, QG, lG.clamp_min(0))
            else:
                if layer.bias and not (weight and bias):  # one of the two blocks: A's sub-block
                    A = A[:-1, :-1] if weight else A[-1:, -1:]
                lA, QA = torch.linalg.eigh(A)
                cache[key] = (QA, lA.clamp_min(0), QG, lG.clamp_min(0))
        return cast(tuple[torch.Tensor | None, torch.Tensor, torch.Tensor, torch.Tensor], cache[key])

    def _covered_params(self) -> frozenset[str] | None:
        """The parameters with curvature: the layers' weights (biases trainable at fit) and the diagonal."""
        names = [n for lay in self.layers for n in (lay.weight_name, lay.bias_name if lay.bias else "") if n]
        return frozenset(names + list(self.diag))

    def _damped_solve(self, vectors: dict[str, torch.Tensor], damping: float) -> dict[str, torch.Tensor]:
        # each block's Hessian is V -> G V A (an embedding's: diag(A) V G, a fallback's: diag): solved in the
        # factors' eigenbases, X = Q_G [(Q_G^T V Q_A) / (l_G l_A^T + damping)] Q_A^T
        out: dict[str, torch.Tensor] = {}
        names = [n for layer in self.layers
                 for n in (layer.weight_name, layer.bias_name if layer.bias else "") if n and n in vectors]
        tied = sorted({n for n in names if names.count(n) > 1})
        if tied:
            raise NotImplementedError(f"kfac: parameters {tied} are shared by several layers (tied "
                                      "weights); the damped inverse of a sum of Kronecker-factored blocks "
                                      "has no closed form")
        for layer in self.layers:
            w = layer.weight_name
            b = layer.bias_name if layer.bias else None
            has_w, has_b = w in vectors, b is not None and b in vectors
            if not (has_w or has_b):
                continue
            like = vectors[w] if has_w else vectors[cast(str, b)]
            QA, lA, QG, lG = (None if t is None else t.to(like.device, like.dtype)
                              for t in self._eigen(layer, has_w, has_b))
            assert lA is not None and QG is not None and lG is not None
            if layer.kind == "embedding":  # (V, d) in the weight's own orientation
                out[w] = ((vectors[w] @ QG) / (lA[:, None] * lG[None, :] + damping)) @ QG.T
                continue
            assert QA is not None
            cols = ([vectors[w].reshape(layer.d_out, -1)] if has_w else []) + (
                [vectors[cast(str, b)][:, None]] if has_b else [])
            X = QG @ ((QG.T @ torch.cat(cols, 1) @ QA) / (lG[:, None] * lA[None, :] + damping)) @ QA.T
            if has_w:
                out[w] = X[:, :layer.d_in].reshape(vectors[w].shape)
            if has_b:
                out[cast(str, b)] = X[:, -1]
        for n, v in vectors.items():
            if n not in out:
                out[n] = v / (self.diag[n].to(v.device, v.dtype) + damping) if n in self.diag else v / damping
        return {n: out[n] for n in vectors}  # in the order given

    # ------------------------------------------------------------------ memory and persistence
    def stored_floats(self) -> int:
        """The Kronecker factors A and G of every layer plus the diagonal of the other parameters."""
        return (sum(v.numel() for v in self.A.values()) + sum(v.numel() for v in self.G.values())
                + sum(v.numel() for v in self.diag.values()))

    def _state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        t: dict[str, torch.Tensor] = {}
        for layer in self.layers:
            t[f"A/{layer.name}"] = self.A[layer.name]
            t[f"G/{layer.name}"] = self.G[layer.name]
        for n, v in self.diag.items():
            t[f"diag/{n}"] = v
        layers = [[lay.name, lay.kind, lay.bias, lay.d_in, lay.d_out, lay.weight_name, lay.bias_name]
                  for lay in self.layers]
        return t, {"layers": layers, "diag": list(self.diag)}

    def _load_state(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        shapes = {n: list(s) for n, s in self.arch or []}
        self.layers, self.A, self.G, self.diag = [], {}, {}, {}
        for entry in meta["layers"]:
            # 5 entries: files written before embeddings were tapped
            if not isinstance(entry, list) or len(entry) not in (5, 7) or entry[1] not in TAP_KINDS:
                raise ValueError(f"K-FAC layer entry {entry!r} is malformed")
            name, kind, bias, d_in, d_out = entry[:5]
            weight_name, bias_name = (str(entry[5]), str(entry[6])) if len(entry) == 7 else ("", "")
            layer = Tap(name, kind, bool(bias), int(d_in), int(d_out), weight_name, bias_name)
            A, G = tensors[f"A/{name}"], tensors[f"G/{name}"]
            k = [d_in] if kind == "embedding" else [d_in + int(bool(bias))] * 2
            if list(A.shape) != k or list(G.shape) != [d_out, d_out]:
                raise ValueError(f"K-FAC factors of layer {name!r} have the wrong shapes")
            w = shapes.get(layer.weight_name)
            if kind == "embedding":
                fits = w == [d_in, d_out] and not layer.bias
            else:
                fits = w is not None and w[0] == d_out and torch.Size(w[1:]).numel() == d_in
                fits = fits and (not layer.bias or shapes.get(layer.bias_name) == [d_out])
            if not fits:
                raise ValueError(f"K-FAC layer {name!r} does not match the stored architecture")
            if not (torch.isfinite(A).all() and torch.isfinite(G).all()):
                raise ValueError(f"K-FAC factors of layer {name!r} are not finite")
            self.layers.append(layer)
            self.A[name], self.G[name] = A, G
        for n in meta["diag"]:
            v = tensors[f"diag/{n}"]
            if shapes.get(n) != list(v.shape):
                raise ValueError(f"fallback diagonal of {n!r} does not match the stored architecture")
            self.diag[n] = v
