"""Transformer ops: token embeddings, products of two data tensors, softmax over data, attention.

Linearized at theta0 (METHOD.md section 6), every op becomes affine in the change of its data inputs:

- **Embedding** ``W[t]`` of integer tokens is linear in the one-hot token: each stream looks its tokens up in
  its own table, in every mode (the tokens are the same in both streams). In the closed form the state holds
  the one-hot encoding and the embedding is the matrix product ``onehot @ W``.
- **Products of two data tensors** ``f(x, y)`` (``q @ k^T``, ``attn @ v``, ``bmm``, ``einsum``, ``x * y``) are
  bilinear; at theta0's values ``(x0, y0)`` stream s gets ``f(x0, y0) + f(x_s - x0, y0) + f(x0, y_s - y0)``
  (exact for stream 0, first order in the change for the others). With one data input they are affine.
- **Softmax** ``A = softmax(l)`` over data: ``A_s = A0 + J(A0) (l_s - l0)`` with
  ``J(A) u = A * (u - <A, u>)``, the Jacobian at theta0's pattern. theta0's own linearization
  (``gates="relu"``) takes ``A0 = softmax(l0)`` on each input; LAFTR draws ``A0`` from a law stored at theta0,
  independent of the input, shared by both streams (stream 0 is then ``A0`` itself, as a gated unit of stream
  0 is ``c s0 + r``): per row of the pattern we store the exact mean pattern ``E[A0]`` and the mean squared
  norm ``E[sum_j A0_j^2]`` and draw from the Dirichlet law with that mean whose expected squared norm is the
  stored one (LIFTR also moment-matches a Dirichlet). Rows that theta0 makes one-hot on every input are drawn
  as categorical one-hot rows (the Dirichlet's limit). Masked positions stay at zero: a key is hidden from a
  row where theta0's logit is ``-inf`` or so far below the row's largest that its softmax weight is exactly
  zero (:func:`hidden_keys`: a finite fill, ``-1e9`` or ``torch.finfo(dtype).min``, hides as ``-inf`` does).
  A row with no visible key (every logit ``-inf``: a sequence that is all padding, which an input model can
  draw) attends to nothing, in every mode: its pattern is zero, as in ``F.scaled_dot_product_attention``
  (:func:`softmax_or_zero`).
- **Attention** (``F.scaled_dot_product_attention``, ``nn.MultiheadAttention``) is these pieces composed:
  scores ``q k^T * scale (+ mask)`` (bilinear), softmax, ``A v`` (bilinear), all at theta0's values. Its site
  stores the attention pattern law of its heads.

There is no closed form (``laftr-exact``) for products of two data tensors: their second moments need fourth
moments of the state. Those rules refuse it with a message; the Monte Carlo estimator handles them.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Sequence
from typing import Any, ClassVar, cast

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.utils._pytree import tree_map

from .affine import AffineRule, TappedLayer
from .base import Pair, Rule, changing_pairs, data_pairs, make_rule, register, stream_of
from .gates import MomentLaw, _check_units, reads_reduction

Tensor = torch.Tensor


# ---------------------------------------------------------------------------------------------- pieces
def bilinear_streams(f: Callable[[Tensor, Tensor], Tensor], xs: tuple[Tensor, ...],
                     ys: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
    """``f`` bilinear, linearized at stream 0's values.

    Stream 0 gets ``f(x0, y0)``, the others ``f(x0, y0) + f(x_s - x0, y0) + f(x0, y_s - y0)``.
    """
    x0, y0 = xs[0], ys[0]
    base = f(x0, y0)
    return (base, *(base + f(x - x0, y0) + f(x0, y - y0) for x, y in zip(xs[1:], ys[1:], strict=True)))


def substitute(t: Any, pairs: Sequence[Pair], values: Sequence[Tensor], stream: int) -> Any:
    """``t`` with ``pairs`` replaced by ``values`` and every other pair by its value in ``stream``.

    The arguments of one stream's call of an op linearized in ``pairs`` (products, :class:`TangentRule`).
    """

    def one(v: Any) -> Any:
        for p, val in zip(pairs, values, strict=True):
            if v is p:
                return val
        return v.vals[stream] if isinstance(v, Pair) else v

    return tree_map(one, t)


def logit_change(l_s: Tensor, l0: Tensor) -> Tensor:
    """``l_s - l0``, zero where both are the same infinity (a masked position)."""
    d = l_s - l0
    if not torch.isfinite(l0).all():
        d = torch.where(torch.isinf(l0) & (l_s == l0), torch.zeros_like(d), d)
    return d


def softmax_tangent(a0: Tensor, dl: Tensor, dim: int) -> Tensor:
    """``J(a0) dl = a0 * (dl - <a0, dl>)`` along ``dim`` (the Jacobian of softmax at the pattern ``a0``)."""
    return a0 * (dl - (a0 * dl).sum(dim, keepdim=True))


def gamma_draw(shape_param: Tensor, gen: torch.Generator) -> Tensor:
    """Gamma(shape_param, 1) variates from ``gen``.

    Marsaglia and Tsang's squeeze method; shapes below 1 by the ``U^(1/a)`` boost; a zero shape gives 0.
    torch's own sampler takes no generator, hence this one.
    """
    a = shape_param
    pos = a > 0
    a1 = torch.where(a < 1, a + 1, a).clamp_min(1.0)
    d = a1 - 1.0 / 3.0
    c = 1.0 / torch.sqrt(9.0 * d)
    out = torch.ones_like(a)
    todo = pos.clone()
    for _ in range(64):
        z = torch.randn(a.shape, generator=gen, device=gen.device, dtype=a.dtype).to(a.device)
        u = torch.rand(a.shape, generator=gen, device=gen.device, dtype=a.dtype).to(a.device)
        v = (1 + c * z) ** 3
        ok = (v > 0) & (torch.log(u.clamp_min(1e-300)) < 0.5 * z * z + d - d * v + d
                        * torch.log(v.clamp_min(1e-300)))
        take = todo & ok
        out = torch.where(take, d * v, out)
        todo = todo & ~ok
        if not bool(todo.any()):
            break
    out = torch.where(todo, d, out)  # practically never: the acceptance rate is above 95 % per round
    u = torch.rand(a.shape, generator=gen, device=gen.device, dtype=a.dtype).to(a.device)
    boost = torch.where(a < 1, u.clamp_min(1e-300) ** (1.0 / a.clamp_min(1e-300)), torch.ones_like(a))
    return torch.where(pos, out * boost, torch.zeros_like(a))


class PatternLaw:
    """The law of theta0's attention pattern per group: a Dirichlet per row.

    The Dirichlet has the stored mean pattern and the stored mean squared norm (stored floats: the pattern,
    plus one per row).
    """

    #: below this concentration rows are drawn one-hot (the Dirichlet's limit; gamma variates underflow there)
    MIN_CONCENTRATION: ClassVar[float] = 1e-3

    def __init__(self, sums: dict[str, Tensor], counts: Tensor, dim: int, device: torch.device,
                 dtype: torch.dtype) -> None:
        """Turn the stored sums into each row's mean pattern and Dirichlet concentration.

        ``dim`` is the softmax axis counted on one example's pattern; a row whose patterns did not vary gets
        an infinite concentration (it is always drawn at its mean).
        """
        n = counts.clamp_min(1)
        mean = sums["a"] / n.view(-1, *([1] * (sums["a"].ndim - 1)))
        sq = sums["a2"] / n.view(-1, *([1] * (sums["a2"].ndim - 1)))
        self.dim = dim  # the softmax axis, counted on one example's pattern (non-negative)
        mean = mean / mean.sum(dim + 1, keepdim=True).clamp_min(1e-300)  # rows sum to 1 (float64 rounding)
        msq = (mean * mean).sum(dim + 1)
        spread = (sq - msq).clamp_min(0)
        free = (1 - msq).clamp_min(0)
        fixed = spread <= 1e-12 * free.clamp_min(1e-300)
        alpha = torch.where(fixed, torch.full_like(free, math.inf), free / spread.clamp_min(1e-300) - 1)
        self.mean = mean.to(device, dtype)
        self.second = sq.to(device, dtype)
        self.alpha = alpha.clamp_min(0).to(device, dtype)  # (G, *rows); inf: the row is fixed at its mean

    def draw(self, groups: Tensor, gen: torch.Generator, shared: bool, like: Tensor) -> Tensor:
        """Patterns ``(n, *pattern)`` (``n = 1`` when shared)."""
        n = 1 if shared else int(groups.shape[0])
        if self.mean.shape[0] == 1:
            m = self.mean[0].unsqueeze(0).expand(n, *self.mean.shape[1:])
            al = self.alpha[0].unsqueeze(0).expand(n, *self.alpha.shape[1:])
        else:
            g = groups.to(self.mean.device)[:n]
            m, al = self.mean.index_select(0, g), self.alpha.index_select(0, g)
        ax = self.dim + 1
        al_b = al.unsqueeze(ax)
        conc = (m * torch.where(torch.isinf(al_b), torch.ones_like(al_b), al_b))
        g_ = gamma_draw(conc.to(torch.float64), gen).to(m.dtype)
        total = g_.sum(ax, keepdim=True)
        dirichlet = g_ / total.clamp_min(1e-300)
        # one-hot rows where the concentration is tiny (or every gamma variate underflowed)
        u = torch.rand(al.shape, generator=gen, device=gen.device, dtype=m.dtype).to(m.device).unsqueeze(ax)
        cum = m.cumsum(ax)
        first = (cum > u * cum.narrow(ax, cum.shape[ax] - 1, 1)).to(m.dtype)
        onehot = first - torch.cat([torch.zeros_like(first.narrow(ax, 0, 1)),
                                    first.narrow(ax, 0, first.shape[ax] - 1)],
                                   ax)
        tiny = (al_b < self.MIN_CONCENTRATION) | (total <= 0)
        out = torch.where(torch.isinf(al_b), m, torch.where(tiny, onehot, dirichlet))
        return out.to(like.device, like.dtype)


class PatternSite(Rule):
    """A rule whose op applies a softmax over data: it records theta0's pattern and draws it for LAFTR."""

    site: ClassVar[bool] = True

    def record(self, mode: Any, a0: Tensor, dim: int) -> None:
        """Add theta0's patterns ``a0`` (``(B, *pattern)``, softmax over ``dim`` of the batch tensor)."""
        a = a0.detach().to(torch.float64)
        mode.add(self.name, "a", a)
        mode.add(self.name, "a2", (a * a).sum(dim))

    def draw(self, mode: Any, like: Tensor, dim: int) -> Tensor:
        """theta0's patterns drawn from the stored law for a batch like ``like`` (of the same shape)."""
        law: PatternLaw = mode.law(self)
        if tuple(law.mean.shape[1:]) != tuple(like.shape[1:]):
            raise ValueError(f"attention site {self.name!r}: the summary has patterns of shape "
                             f"{tuple(law.mean.shape[1:])}, the network produces {tuple(like.shape[1:])} "
                             "(inputs of another length?)")
        a = mode.draw(self, law, like)
        return a.expand_as(like) if a.shape[0] == 1 else a

    def pattern_axis(self, ndim: int) -> int:
        """The softmax axis within one example's pattern of ``ndim`` dimensions (attention: the last)."""
        return ndim - 1

    def law(self, sums: dict[str, Tensor], counts: Tensor, device: torch.device,
            dtype: torch.dtype) -> PatternLaw:
        """The stored pattern statistics turned into a :class:`PatternLaw` on ``device`` in ``dtype``."""
        return PatternLaw(sums, counts, self.pattern_axis(sums["a"].ndim - 1), device, dtype)

    def no_closed_form(self) -> Exception:
        """The error raised by the closed form: attention has none (it needs fourth moments)."""
        return self.refuse("laftr-exact has no closed form through attention (products of two data tensors "
                           "need fourth moments); use the Monte Carlo 'laftr' estimator")

    def moments(self, mode: Any, args: Any, kwargs: Any) -> Any:
        """Refuse: laftr-exact has no closed form through a softmax over data."""
        raise self.no_closed_form()


#: how far below its row's largest logit a key's logit must lie to count as hidden by a mask
#: (:func:`hidden_keys`): beyond it the key's softmax weight is exactly zero even in float64 (``exp(-746)``
#: underflows to 0)
HIDDEN_MARGIN: float = 746.0


def hidden_keys(l0: Tensor, dim: int) -> Tensor:
    """The keys a mask hides from each row of theta0's logits ``l0`` (softmax along ``dim``): True if hidden.

    A key is hidden where its logit is ``-inf`` or more than :data:`HIDDEN_MARGIN` below its row's largest,
    where its softmax weight is exactly zero: masks filled with ``-inf`` and with a finite value (``-1e4``,
    ``-1e9``, ``torch.finfo(dtype).min``, Hugging Face's idiom; a float ``key_padding_mask``) hide the same
    keys. A fixed margin rather than the underflow of the network's own dtype: in float16 a gap of about 17
    underflows, and a sharp but unmasked head must not be taken for a mask.
    """
    l0 = l0.detach()
    return torch.isneginf(l0) | (l0 - l0.amax(dim, keepdim=True) < -HIDDEN_MARGIN)


def softmax_or_zero(logits: Tensor, dim: int, none: Tensor | None = None) -> Tensor:
    """``softmax(logits)`` along ``dim``, with the zero pattern for a row whose every logit is ``-inf``.

    Such a row has no key to attend to (a sequence that is all padding): torch's softmax gives NaN there, and
    ``F.scaled_dot_product_attention`` gives zero (in both grad modes; so does ``nn.MultiheadAttention`` with
    ``need_weights=False`` and gradients on), the convention taken here in every mode.
    Where the network uses torch's softmax (by hand, or ``nn.MultiheadAttention`` with ``need_weights=True``),
    its data has no such row (the network would be NaN there), but an input model that draws positions
    independently (``input_model="tokens"``) draws them, and a NaN there would be every estimate. Elsewhere
    this is ``torch.softmax`` bit for bit, without a branch on values (vmap-safe); the hidden rows' logits
    are replaced before the softmax so that no NaN reaches the gradients. ``none``: those rows (keeping the
    axis), where the caller knows them.
    """
    if none is None:
        none = logits.detach().amax(dim, keepdim=True) == -math.inf
    return torch.softmax(logits.masked_fill(none, 0), dim).masked_fill(none, 0)


def _within_mask(a: Tensor, l0: Tensor, dim: int) -> Tensor:
    """A drawn pattern restricted to the keys this example may attend to, renormalized.

    The keys hidden are those of :func:`hidden_keys` (``-inf`` logits and finite fills alike: the same network
    written with either mask gets the same draws). The stored law puts no mass on keys a constant mask hides,
    so this changes nothing then; with a mask computed from each input (padding) the law mixes examples, and
    a draw must not attend to this one's padding (a row whose drawn mass is all on hidden keys gets the
    uniform pattern over its visible ones, and a row with no visible key the zero pattern, as
    :func:`softmax_or_zero` gives it).
    """
    hidden = hidden_keys(l0, dim)
    if not bool((a.masked_fill(~hidden, 0) != 0).any()):
        return a
    a = a.masked_fill(hidden, 0)
    total = a.sum(dim, keepdim=True)
    visible = (~hidden).to(a.dtype)
    uniform = visible / visible.sum(dim, keepdim=True).clamp_min(1)
    return torch.where(total > 0, a / total.clamp_min(torch.finfo(a.dtype).tiny), uniform)


def linearized_softmax(rule: PatternSite, mode: Any, logits: tuple[Tensor, ...],
                       dim: int) -> tuple[Tensor, ...]:
    """The softmax of each stream's logits, linearized at theta0's pattern.

    theta0's pattern ``A0`` is the exact softmax of stream 0 in the ``own`` mode and a draw from the stored
    law in the ``sample`` mode, zero in a row with no visible key in both; the other streams get
    ``A0 + J(A0)(l_s - l0)``.
    """
    l0 = logits[0]
    if len(logits) > 1:
        hidden = hidden_keys(l0, dim)
        if any(not torch.equal(hidden_keys(lg, dim), hidden) for lg in logits[1:]):
            # (a mask that moves with the parameters, self.g > 0 with -1e9 fills: each stream's own mask put
            # theta's fills into the tangent at theta0's logits, 5e14 x the exact FSD)
            raise rule.refuse("theta's logits hide other keys than theta0's (a mask that moves with the "
                              "parameters, or a logit more than 746 below its row's largest in one network "
                              "only): no linearization at theta0's pattern follows that jump; use "
                              "gates='none' or linearize='activations', which run each network's own softmax")
    if mode.method == "sample":
        a0 = _within_mask(rule.draw(mode, l0, dim), l0, dim)
    else:
        a0 = softmax_or_zero(l0, dim)
    return (a0, *(a0 + softmax_tangent(a0, logit_change(lg, l0), dim) for lg in logits[1:]))


# ---------------------------------------------------------------------------------------------- embedding
@register(nn.Embedding, F.embedding)
class EmbeddingRule(TappedLayer):
    """``nn.Embedding`` / ``F.embedding`` of integer tokens: linear in the one-hot token.

    Each stream uses its own table. K-FAC and diag-Fisher tap it as a linear layer of one-hot inputs.
    """

    family = "embedding"
    affine = False  # linear in the one-hot token, not in the token id

    def setup(self) -> None:
        """Refuse ``max_norm`` (it renormalizes the table on each call)."""
        max_norm = self.module.max_norm if self.module is not None else self.const_arg(3, "max_norm")
        if max_norm is not None:
            raise self.refuse("max_norm renormalizes the table on each call (not a fixed linear map)")

    def check(self, args: Any, kwargs: Any) -> None:
        """Refuse a data-dependent table and floating-point token ids."""
        data = data_pairs((args, kwargs))
        if len(data) != 1 or args[0] is not data[0]:
            raise self.refuse("only the token ids may depend on the input (not the embedding table)")
        t = data[0].vals[0]
        if isinstance(t, Tensor) and (t.is_floating_point() or t.is_complex()):
            raise self.refuse(f"the token ids are {t.dtype}, not integers "
                              "(an input model for tokens keeps them integer: input_model='tokens')")

    def table(self, params: dict[str, Tensor], args: Any, kwargs: Any) -> Tensor:
        """The stream's embedding table (the module's weight, or the function's ``weight`` argument)."""
        if self.module is not None:
            return params[self.prefix + ".weight"]
        return kwargs.get("weight", args[1] if len(args) > 1 else None)

    def moments(self, mode: Any, args: Any, kwargs: Any) -> Any:
        """The closed form: the one-hot tokens of the input model times each stream's table."""
        self.check(args, kwargs)
        (tok,) = data_pairs((args, kwargs))

        V = tok.vals[0].shape[-1]  # the one-hot width of the input model: tokens >= V never occur in the data
        rows = self.table(mode.params[0], stream_of(args, 0), stream_of(kwargs, 0)).shape[0]
        if V > rows:
            raise ValueError(f"{self.describe()}: the input model has token ids up to {V - 1}, the "
                             f"table has {rows} rows")

        def make(s: int) -> Callable[[Tensor], Tensor]:
            a, k = stream_of(args, s), stream_of(kwargs, s)
            return lambda onehot: self.reduce(onehot @ self.table(mode.params[s], a, k)[:V].to(onehot.dtype))

        return mode.affine_fns([make(0), make(1)], [[tok.vals[0]], [tok.vals[1]]], self.name)

    def reduce(self, embedded: Tensor) -> Tensor:
        """What the op does with the embedded tokens after the lookup (an embedding: nothing)."""
        return embedded


@register(nn.EmbeddingBag, F.embedding_bag)
class EmbeddingBagRule(EmbeddingRule):
    """``nn.EmbeddingBag`` / ``F.embedding_bag`` (``mode`` ``sum`` or ``mean``) of ``(B, T)`` token ids.

    The sum (mean) of the embeddings of each row: linear in the one-hot tokens, each stream its own table.
    ``offsets`` (1-d bags), ``per_sample_weights`` and ``mode="max"`` are refused; with a ``padding_idx`` the
    mean divides by a count of the tokens, which the Monte Carlo evaluates exactly and the closed form
    refuses.
    """

    family = "embedding_bag"

    def setup(self) -> None:
        """Read ``mode`` and ``padding_idx``; refuse ``max_norm`` and ``mode="max"``."""
        super().setup()
        if self.module is not None:
            mod = cast(nn.EmbeddingBag, self.module)
            self.mode, self.padding = mod.mode, mod.padding_idx
        else:
            self.mode, self.padding = self.const_arg(6, "mode", "mean"), self.const_arg(10, "padding_idx")
        if self.mode not in ("sum", "mean"):
            raise self.refuse(f"mode={self.mode!r} (a max over the bag); use 'sum' or 'mean'")

    def params(self) -> dict[str, Any]:
        """``mode`` and ``padding_idx``, which a stored summary must match."""
        return {"mode": self.mode, "padding_idx": self.padding}

    def check(self, args: Any, kwargs: Any) -> None:
        """As an embedding's, and no ``offsets`` or ``per_sample_weights`` at the call."""
        super().check(args, kwargs)
        at = 1 if self.module is not None else 2
        if kwargs.get("offsets", args[at] if len(args) > at else None) is not None:
            raise self.refuse("bags given by offsets (1-d input); give a (batch, length) tensor of token ids")
        if kwargs.get("per_sample_weights") is not None:
            raise self.refuse("per_sample_weights")

    def moments(self, mode: Any, args: Any, kwargs: Any) -> Any:
        """The closed form: each stream's table on the one-hot tokens, summed (averaged) over a row."""
        if self.padding is not None:
            raise self.refuse("laftr-exact: with a padding_idx the mean divides by a count of the tokens, "
                              "not a fixed linear map of them; use the Monte Carlo 'laftr' estimator")
        return super().moments(mode, args, kwargs)

    def reduce(self, embedded: Tensor) -> Tensor:
        """The sum or mean over the row's tokens."""
        return embedded.sum(-2) if self.mode == "sum" else embedded.mean(-2)


# ---------------------------------------------------------------------------------------------- products
class ProductRule(AffineRule):
    """A product that is affine in each factor.

    With one data factor it is affine (exact in every mode); with two it is bilinear and linearized at stream
    0's factors (no closed form).
    """

    family = "product"
    max_data_inputs = 2

    def two_factors(self, args: Any, kwargs: Any) -> tuple[Pair, Pair] | None:
        """The two data factors ``(x, y)`` in argument order, or None when only one is data.

        A factor computed from the network input alone (a mask) is the same in every stream: a constant here.
        """
        data = changing_pairs((args, kwargs))
        if len(data) < 2:
            return None
        if len(data) > 2:
            raise self.refuse("a product of more than two data-dependent tensors")
        return data[0], data[1]

    def bilinear(self, mode: Any, args: Any, kwargs: Any, x: Pair, y: Pair) -> Pair:
        """The op with ``x`` and ``y`` linearized at stream 0's values (other arguments: stream 0's)."""

        def f(xv: Tensor, yv: Tensor) -> Tensor:
            a, k = substitute((args, kwargs), (x, y), (xv, yv), 0)
            return self.call(mode.params[0], a, k)

        return Pair(bilinear_streams(f, x.vals, y.vals), True)

    def _linearized(self, mode: Any, args: Any, kwargs: Any) -> Any:
        factors = self.two_factors(args, kwargs)
        if factors is None:
            return self.forward(mode, args, kwargs)
        return self.bilinear(mode, args, kwargs, *factors)

    def sample_separable(self, mode: Any) -> bool:
        """False: a product of two data factors is linearized at theta0's."""
        return False

    def sample(self, mode: Any, args: Any, kwargs: Any) -> Any:
        """A product of two data factors linearized at stream 0's values; otherwise the exact op."""
        return self._linearized(mode, args, kwargs)

    def own(self, mode: Any, args: Any, kwargs: Any) -> Any:
        """As :meth:`sample`: the linearization of a product does not depend on a stored statistic."""
        return self._linearized(mode, args, kwargs)

    def moments(self, mode: Any, args: Any, kwargs: Any) -> Any:
        """The generic affine closed form; refuses a product of two data-dependent factors."""
        if self.two_factors(args, kwargs) is not None:
            raise self.refuse("laftr-exact has no closed form for a product of two data-dependent tensors "
                              "(it needs fourth moments); use the Monte Carlo 'laftr' estimator")
        return super().moments(mode, args, kwargs)


# ``addmm(b, x, W) = beta b + alpha x @ W`` and ``baddbmm`` (batched): one product plus an added tensor; with
# two data arguments the linearization at stream 0 is exact where the op is affine in both (``b`` and ``x``)
register(operator.mul, torch.mul, "mul", "mul_", operator.matmul, torch.matmul, "matmul", torch.bmm, "bmm",
         torch.einsum, torch.addmm, "addmm", torch.baddbmm, "baddbmm")(ProductRule)


# ------------------------------------------------------------------------------------- smooth ops of data
class TangentRule(Rule):
    """A smooth op of data that no stored statistic describes, linearized at stream 0's data values.

    As products of two data tensors are: stream 0 gets the op itself, ``f_0(x0)``, and stream ``s`` its
    tangent there, ``f_s(x0) + J f_s(x0) (x_s - x0)`` (``torch.func.jvp``), where ``f_s`` reads stream ``s``'s
    parameters and other non-data arguments. Under ``gates="relu"`` this is theta0's own linearization; in
    the Monte Carlo it is taken at the sampled stream of theta0, as products are. No closed form. A tangent
    that is not finite (a zero divisor, the norm of a zero vector) is refused, naming the op.

    Subclasses may refuse axes with :meth:`check_axes`.
    """

    family = "tangent"

    def check_axes(self, x: torch.Tensor) -> None:
        """Refuse what cannot be evaluated per example (override)."""

    def _checked(self, args: Any, kwargs: Any) -> list[Pair]:
        data = changing_pairs((args, kwargs))
        for p in data_pairs((args, kwargs)):
            self.check_axes(p.vals[0])
        return data

    def forward(self, mode: Any, args: Any, kwargs: Any) -> Any:
        """Every stream runs the op exactly."""
        self._checked(args, kwargs)
        return Pair(self.call_streams(mode, args, kwargs), True)

    def _linearized(self, mode: Any, args: Any, kwargs: Any) -> Any:
        data = self._checked(args, kwargs)
        if not data:
            return Pair(self.call_streams(mode, args, kwargs), True)

        def stream_fn(s: int) -> Callable[..., Tensor]:
            def f(*vals: Tensor) -> Tensor:
                a, k = substitute((args, kwargs), data, vals, s)
                return self.call(mode.params[s], a, k)
            return f

        x0 = tuple(p.vals[0] for p in data)
        outs = [stream_fn(0)(*x0)]
        for s in range(1, mode.num_streams):
            at_x0 = torch.func.jvp(stream_fn(s), x0, tuple(p.vals[s] - p.vals[0] for p in data))
            outs.append(at_x0[0] + at_x0[1])  # f_s(x0) + J f_s(x0) (x_s - x0)
        if not all(bool(torch.isfinite(o).all()) for o in outs):
            raise self.refuse("its tangent at theta0's values is not finite (a zero divisor, the norm or "
                              "standard deviation of a constant vector)")
        return Pair(tuple(outs), True)

    sample = own = _linearized

    def sample_separable(self, mode: Any) -> bool:
        """False: linearized at theta0's stream."""
        return False

    def moments(self, mode: Any, args: Any, kwargs: Any) -> Any:
        """Refused: no closed form."""
        raise self.refuse("laftr-exact has no closed form for it; use the Monte Carlo 'laftr' estimator")


class QuotientRule(TangentRule):
    """A division by data, ``a / d`` (``h / (1 + relu(h))``, ``h / (2 + torch.tanh(h))``).

    A division by a constant, a parameter or a value of the network input alone is affine
    (:class:`laftr.rules.affine.DivideRule`); the traced network picks this rule only where the divisor is
    data. ``gates="relu"`` takes the tangent at theta0's values on each input (:class:`TangentRule`).

    In the Monte Carlo the reciprocal ``1 / d`` is a gate of its own, as the smooth activations are: its
    tangent at theta0's divisor ``d0`` on the data, ``(c, r) = (-1 / d0**2, 2 / d0)``, has a stored law (the
    exact moments of ``(c, r)`` per unit of ``d``, 5 floats, sampled by the four-point law of
    :class:`laftr.rules.gates.SmoothGate`), drawn per unit and shared by the streams; the quotient is then the
    product ``a * (c d + r)``, linearized at stream 0 as products of two data tensors are. The tangent at the
    *sampled* stream 0's divisor (what a plain :class:`TangentRule` does) meets divisors near zero that theta0
    never has on the data -- ``1 + relu(h)`` with a drawn gate open on ``h < -1`` -- and blew estimates up by
    1e8-1e11 x the exact FSD; the drawn tangents keep theta0's range of ``1 / d``.

    Where the divisor is a normalizer's scale (``x / sqrt(var + eps)``: an elementwise rule that draws one
    scale, the same in every stream; :class:`laftr.rules.gates.ElementwiseGate`) the quotient is exact in
    each stream and stores nothing. Where it is a reduction over an axis (``(h - mu) / (h.std(-1,
    keepdim=True) + eps)``, ``h / (h.norm(dim=-1, keepdim=True) + eps)``: a normalization written by hand),
    the tangent at the sampled stream stays (:class:`TangentRule`, nothing stored): a statistic of many
    units keeps away from zero, and on such networks the tangent there measured closer to the exact FSD
    (1.1-1.4 x) than a drawn one (1.2-2.5 x). No closed form.
    """

    family = "quotient"
    site = True

    def setup(self) -> None:
        """No site where the divisor is a normalizer's drawn scale or a reduction over an axis.

        (A rounded division never gets here: its :class:`~laftr.rules.affine.DivideRule` refuses it first.)
        """
        divisor = self.node.args[1] if len(self.node.args) > 1 else self.node.kwargs.get("other")
        self.site = not (self._normalizer_scale(divisor) or reads_reduction(divisor))  # type: ignore[misc]

    def divisor_of_input_alone(self) -> None:
        """The divisor is a value of the network input alone, the same in every stream: exact, no law."""
        self.site = False  # type: ignore[misc]

    def _normalizer_scale(self, divisor: Any) -> bool:
        if not isinstance(divisor, fx.Node) or divisor.op not in ("call_function", "call_method"):
            return False
        try:
            rule = make_rule(divisor, self.gm)
        except Exception:  # noqa: BLE001 - no rule there (that node refuses later, naming itself)
            return False
        return bool(getattr(rule, "normalizer", False) and getattr(rule, "divisor", False))

    def _operands(self, args: Any, kwargs: Any) -> tuple[Any, Pair]:
        """The numerator (a data pair or a value of every stream) and the divisor's pair."""
        num = args[0] if args else kwargs.get("input")
        d = args[1] if len(args) > 1 else kwargs.get("other")
        if not (isinstance(d, Pair) and d.data):  # (the graph makes this rule for data divisors only)
            raise self.refuse("its divisor does not depend on the input")
        return num, d

    def batch_movable(self, layout: tuple[int, int, int], ndim: int) -> bool:
        """True: elementwise (both operands move together)."""
        return True

    def fit(self, mode: Any, args: Any, kwargs: Any) -> Any:
        """theta0's exact quotient, recording the moments of the tangent of ``1 / d`` at theta0's divisor."""
        self._checked(args, kwargs)
        out = self.call(mode.params[0], stream_of(args, 0), stream_of(kwargs, 0))
        if not self.site:
            return Pair((out,), True)
        _, d = self._operands(args, kwargs)
        d0 = d.vals[0].to(torch.float64)
        if not bool(torch.isfinite(d0).all()) or bool((d0 == 0).any()):
            raise ValueError(f"{self.describe()}: divides by a value that is zero or not finite on some "
                             "of the data at theta0; keep the divisor away from zero, e.g. with an epsilon")
        c, r = -(d0 * d0).reciprocal(), 2 * d0.reciprocal()
        for key, val in (("c", c), ("r", r), ("cc", c * c), ("cr", c * r), ("rr", r * r)):
            mode.add(self.name, key, val)
        return Pair((out,), True)

    def sample(self, mode: Any, args: Any, kwargs: Any) -> Any:
        """Monte Carlo: ``a * (c d + r)`` with ``(c, r)`` drawn per unit of ``d`` (see the class)."""
        if not self.site:
            return self._linearized(mode, args, kwargs)
        self._checked(args, kwargs)
        num, d = self._operands(args, kwargs)
        law: MomentLaw = mode.law(self)
        d0 = d.vals[0]
        _check_units("quotient", self.name, law.points_c.shape[2:], d0)
        c, r = mode.draw(self, law, d0)
        g = [v * c + r for v in d.vals]
        if isinstance(num, Pair) and num.data and not num.fixed:  # two data factors: linearized at stream 0
            a0, g0 = num.vals[0], g[0]
            outs = [a0 * g0, *(a * g0 + a0 * (gs - g0) for a, gs in zip(num.vals[1:], g[1:], strict=True))]
        else:
            outs = [stream_of(num, s) * g[s] for s in range(mode.num_streams)]
        return Pair(tuple(outs), True)

    def law(self, sums: dict[str, torch.Tensor], counts: torch.Tensor, device: torch.device,
            dtype: torch.dtype) -> Any:
        """The stored sums turned into a (private) four-point ``MomentLaw`` of the reciprocal's tangent."""
        return MomentLaw(sums, counts, device, dtype)


class _AxisReduction(TangentRule):
    """A smooth reduction over given axes of one data tensor (the batch axis refused)."""

    #: the position of ``dim`` among the op's arguments (the data input is 0)
    dim_position: ClassVar[int] = 1

    def setup(self) -> None:
        """Read ``dim`` (it must be given: over every axis the op would mix the examples of a batch)."""
        dim = self.const_arg(self.dim_position, "dim")
        if dim is None:
            raise self.refuse("it reduces over every axis, the batch's included; give dim")
        self.dims = tuple(dim) if isinstance(dim, (tuple, list)) else (int(dim),)

    def params(self) -> dict[str, Any]:
        """The reduced axes."""
        return {"dim": list(self.dims)}

    def check_axes(self, x: torch.Tensor) -> None:
        """Refuse the batch axis."""
        if any(d % x.ndim == 0 for d in self.dims):
            raise self.refuse("it reduces over the batch axis, which mixes the examples of a batch")


@register(torch.var, "var", torch.std, "std")
class VarianceRule(_AxisReduction):
    """``var`` / ``std`` over given axes of data (a normalization written by hand): :class:`TangentRule`."""

    family = "variance"


@register(torch.norm, "norm", torch.linalg.vector_norm)
class NormOfDataRule(_AxisReduction):
    """``norm`` / ``linalg.vector_norm`` over axes of data (cosine classifiers): :class:`TangentRule`."""

    family = "norm_of"
    dim_position = 2


@register(F.cosine_similarity, torch.cosine_similarity)
class CosineSimilarityRule(TangentRule):
    """``cosine_similarity(a, b, dim)`` of data: :class:`TangentRule` (``dim=0``, the batch, refused)."""

    family = "cosine"

    def setup(self) -> None:
        """Read ``dim`` (default 1)."""
        self.dim = int(self.const_arg(2, "dim", 1))

    def params(self) -> dict[str, Any]:
        """The compared axis."""
        return {"dim": self.dim}

    def check_axes(self, x: torch.Tensor) -> None:
        """Refuse the batch axis."""
        if self.dim % x.ndim == 0:
            raise self.refuse("it compares along the batch axis, which mixes the examples of a batch")


# ---------------------------------------------------------------------------------------------- softmax
@register(nn.Softmax, F.softmax, torch.softmax, "softmax")
class SoftmaxRule(PatternSite):
    """Softmax over data (attention weights), linearized at theta0's pattern.

    A row whose every logit is ``-inf`` gets the zero pattern in every mode (:func:`softmax_or_zero`).
    """

    family = "softmax"
    #: ``F.softmax(s, dim, dtype=torch.float32)`` (Hugging Face's upcast): the logits cast first (None: none)
    cast: Any = None

    def setup(self) -> None:
        """Read the softmax axis (it must be given)."""
        if self.module is not None:
            dim = cast(nn.Softmax, self.module).dim
        else:
            dim = self.const_arg(1, "dim")
        if dim is None:
            raise self.refuse("softmax needs an explicit dim")
        self.dim = int(dim)
        # (F.softmax(x, dim, _stacklevel, dtype); torch.softmax(x, dim, dtype) and the method)
        at = 3 if self.node.target in (F.softmax, F.log_softmax) else 2
        self.cast = None if self.module is not None else self.const_arg(at, "dtype", None)

    def logits(self, args: Any, kwargs: Any) -> Pair:
        """The data input, cast to the op's ``dtype`` where one is given (as torch casts it first)."""
        x = self.data_input(args, kwargs)
        if self.cast is None:
            return x
        return Pair(tuple(v.to(self.cast) for v in x.vals), x.data, x.fixed)

    def params(self) -> dict[str, Any]:
        """The softmax axis, which a stored summary must match."""
        return {"dim": self.dim}

    def batch_movable(self, layout: tuple[int, int, int], ndim: int) -> bool:
        """When the softmax axis comes after the batch axis (moving the examples first keeps its index)."""
        return self.dim % ndim > layout[0]

    def _dim(self, x: Tensor) -> int:
        d = self.dim % x.ndim
        if d == 0:
            raise self.refuse("a softmax over the batch axis mixes the examples of a batch")
        return d

    #: the op itself (``log_softmax`` for :class:`LogSoftmaxRule`); a row of ``-inf`` logits gets the zero
    #: pattern (:func:`softmax_or_zero`), where torch's softmax gives NaN
    exact: ClassVar[Callable[..., Tensor]] = staticmethod(softmax_or_zero)

    def forward(self, mode: Any, args: Any, kwargs: Any) -> Any:
        """Every stream's exact op."""
        x = self.logits(args, kwargs)
        self._dim(x.vals[0])
        return Pair(tuple(self.exact(v, self.dim) for v in x.vals), True)

    def fit(self, mode: Any, args: Any, kwargs: Any) -> Any:
        """theta0's exact op, recording its pattern (the softmax)."""
        x = self.logits(args, kwargs)
        d = self._dim(x.vals[0])
        a0 = softmax_or_zero(x.vals[0], d)
        self.record(mode, a0, d)
        return Pair((a0 if self.exact is softmax_or_zero else self.exact(x.vals[0], d),), True)

    def _linear(self, mode: Any, args: Any, kwargs: Any) -> Any:
        x = self.logits(args, kwargs)
        d = self._dim(x.vals[0])
        return Pair(linearized_softmax(self, mode, x.vals, d), True)

    sample = own = _linear

    def pattern_axis(self, ndim: int) -> int:
        """The softmax axis counted on one example's pattern (the batch axis dropped)."""
        return self.dim % (ndim + 1) - 1


@register(nn.LogSoftmax, F.log_softmax, torch.log_softmax, "log_softmax")
class LogSoftmaxRule(SoftmaxRule):
    """``log_softmax`` over data (a classifier's log-probabilities), linearized at theta0's pattern.

    ``log_softmax(l) = l - LSE(l)`` and the tangent of ``LSE`` at theta0's logits is ``<P0, l> + H(P0)``
    (``P0`` theta0's softmax, ``H`` its entropy), so stream ``s`` gets ``l_s - <P, l_s> - H(P)``: exact at
    theta0 with ``P = P0`` (``gates="relu"``), and with ``P`` drawn from the stored pattern law in the Monte
    Carlo. Each stream's output is its logits shifted by one number per row, so the metrics on probabilities
    (``kl``, ``l2-probs``) see exactly what they see without the op.
    """

    family = "log_softmax"
    exact = staticmethod(torch.log_softmax)

    def lse_tangents(self, mode: Any, args: Any, kwargs: Any) -> tuple[Pair, int, tuple[Tensor, ...]]:
        """``(logits, axis, <P, l_s> + H(P) per stream)``: each stream's log-sum-exp linearized at ``P``.

        ``P`` is theta0's softmax (``own``) or a draw from the stored pattern law (``sample``); the result
        keeps the axis (size 1).
        """
        x = self.logits(args, kwargs)
        d = self._dim(x.vals[0])
        l0 = x.vals[0]
        p = _within_mask(self.draw(mode, l0, d), l0, d) if mode.method == "sample" else torch.softmax(l0, d)

        def inner(a: Tensor, b: Tensor) -> Tensor:  # <a, b> over the axis, 0 * (-inf) taken as 0
            return torch.where(a > 0, a * b, torch.zeros_like(b)).sum(d, keepdim=True)

        entropy = -inner(p, torch.log(p))
        return x, d, tuple(inner(p, v) + entropy for v in x.vals)

    def _linear(self, mode: Any, args: Any, kwargs: Any) -> Any:
        x, _, lse = self.lse_tangents(mode, args, kwargs)
        return Pair(tuple(v - c for v, c in zip(x.vals, lse, strict=True)), True)

    sample = own = _linear


@register(torch.logsumexp, "logsumexp")
class LogSumExpRule(LogSoftmaxRule):
    """``logsumexp`` over one axis of data (log-sum-exp pooling, energies, a classifier's log-partition).

    Linearized at theta0's logits as ``log_softmax`` is: ``<P, l_s> + H(P)`` with ``P`` theta0's softmax
    (``gates="relu"``: exact at theta0) or a draw from the stored pattern law (Monte Carlo); no closed form.
    """

    family = "logsumexp"

    def batch_movable(self, layout: tuple[int, int, int], ndim: int) -> bool:
        """False: it drops an axis (the output would not have its input's layout)."""
        return False

    def setup(self) -> None:
        """Read the axis (one, given) and ``keepdim``."""
        dim = self.const_arg(1, "dim")
        if isinstance(dim, (tuple, list)):
            if len(dim) != 1:
                raise self.refuse(f"logsumexp over several axes ({tuple(dim)}); reshape them into one first")
            dim = dim[0]
        if dim is None:
            raise self.refuse("logsumexp needs an explicit dim")
        self.dim = int(dim)
        self.keepdim = bool(self.const_arg(2, "keepdim", False))

    def params(self) -> dict[str, Any]:
        """The axis and ``keepdim``, which a stored summary must match."""
        return {"dim": self.dim, "keepdim": self.keepdim}

    @staticmethod
    def exact(v: Tensor, dim: int) -> Tensor:  # type: ignore[override]  # the op, keeping the axis
        """``logsumexp`` keeping the axis (size 1)."""
        return torch.logsumexp(v, dim, keepdim=True)

    def _out(self, out: Pair) -> Pair:
        return out if self.keepdim else Pair(tuple(v.squeeze(self.dim) for v in out.vals), True)

    def forward(self, mode: Any, args: Any, kwargs: Any) -> Any:
        """Every stream's exact op."""
        return self._out(super().forward(mode, args, kwargs))

    def fit(self, mode: Any, args: Any, kwargs: Any) -> Any:
        """theta0's exact op, recording its pattern (the softmax)."""
        return self._out(super().fit(mode, args, kwargs))

    def _linear(self, mode: Any, args: Any, kwargs: Any) -> Any:
        return self._out(Pair(self.lse_tangents(mode, args, kwargs)[2], True))

    sample = own = _linear


# ---------------------------------------------------------------------------------------------- attention
def _causal_bias(L: int, S: int, like: Tensor) -> Tensor:
    keep = torch.ones(L, S, dtype=torch.bool, device=like.device).tril()
    return torch.zeros(L, S, dtype=like.dtype, device=like.device).masked_fill(~keep, -math.inf)


def _mask_bias(mask: Tensor | None, like: Tensor) -> Tensor | None:
    """An attention mask as an additive bias (bool: True takes part)."""
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=like.dtype, device=like.device).masked_fill(~mask, -math.inf)
    return mask.to(like.dtype)


def _is_causal_bias(bias: Tensor, L: int, S: int) -> bool:
    """Whether an additive mask (broadcastable to ``(..., L, S)``) is the causal one.

    It hides exactly the keys after each query (``-inf``, or a finite fill below ``-HIDDEN_MARGIN``, which
    hides as ``-inf`` does; :func:`hidden_keys`) and adds 0 to the others: the mask torch's ``is_causal``
    applies (:func:`_causal_bias`), whichever of the two torch uses.
    """
    after = torch.ones(L, S, dtype=torch.bool, device=bias.device).triu(1)
    hides = bias.detach() <= -HIDDEN_MARGIN
    return bool((hides == after).all()) and bool((bias.detach().masked_fill(after, 0) == 0).all())


def _allowed(mask: Tensor | None) -> Tensor | None:
    """A MultiheadAttention mask in SDPA's convention (bool: True takes part).

    Float masks are additive as they are.
    """
    return ~mask if mask is not None and mask.dtype == torch.bool else mask


def attention_core(rule: PatternSite, mode: Any, qs: tuple[Tensor, ...], ks: tuple[Tensor, ...],
                   vs: tuple[Tensor, ...], bias: Tensor | tuple[Tensor | None, ...] | None,
                   scale: float) -> tuple[Tensor, ...]:
    """``softmax(q k^T * scale + bias) v`` per stream, in the mode's linearization (see the module docstring).

    Shapes ``(B, ..., L, E)``, ``(B, ..., S, E)``, ``(B, ..., S, Ev)``; the pattern is ``(B, ..., L, S)``.
    ``bias``: one additive mask for every stream, or one per stream (:func:`stream_biases`).
    """
    def scores(q: Tensor, k: Tensor) -> Tensor:
        return (q @ k.transpose(-2, -1)) * scale

    biases = bias if isinstance(bias, tuple) else (bias,) * len(qs)
    # run exactly: in a pass of the real networks, on theta0's data (fitting), and where the mode runs this op
    # exactly (``linearize="activations"``: the attention is then no site, and records nothing)
    exact = getattr(mode, "exact", None) is not None and mode.exact(rule)
    if mode.method in ("forward", "fit") or exact:
        outs = []
        for s, (q, k, v, b) in enumerate(zip(qs, ks, vs, biases, strict=True)):
            # a row with no visible key attends to nothing, as in torch's SDPA (softmax_or_zero): the rows the
            # mask hides whole (the scores are finite), read off the mask, which no data moves (a branch on it
            # is vmap-safe); without such rows, torch's softmax as it is
            none = None if b is None else b.detach().amax(-1, keepdim=True) == -math.inf
            none = none if none is not None and bool(none.any()) else None
            lg = scores(q, k) if b is None else scores(q, k) + b
            a = torch.softmax(lg, -1) if none is None else softmax_or_zero(lg, -1, none)
            if s == 0 and mode.method == "fit" and not exact:
                rule.record(mode, a, -1)
            outs.append(a @ v)
        return tuple(outs)
    logits = bilinear_streams(scores, qs, ks)
    logits = tuple(lg if b is None else lg + b for lg, b in zip(logits, biases, strict=True))
    attn = linearized_softmax(rule, mode, logits, logits[0].ndim - 1)
    return bilinear_streams(torch.matmul, attn, vs)


def stream_biases(mode: Any, bias_of: Any, learned: bool) -> tuple[Tensor | None, ...]:
    """The additive attention mask of each stream; ``bias_of(s)`` builds stream ``s``'s from its masks.

    A mask of constants, buffers or the input alone (``learned`` False) is theta0's in every stream, as it
    always was. A mask computed from trainable parameters alone (``learned``: a T5 position bias, learned
    ALiBi slopes, a learned boolean pattern) is each stream's own: it is added to the logits, so its change
    is linearized with the scores' (theta0's mask in every stream froze a learned bias: every estimate 0
    where the exact FSD was 1.1e-3, and its parameters got no gradient). Where theta's mask hides other keys
    than theta0's, the linearized softmax refuses it (:func:`linearized_softmax`).
    """
    if not learned:
        first = bias_of(0)
        return (first,) * mode.num_streams
    return tuple(bias_of(s) for s in range(mode.num_streams))


@register(F.scaled_dot_product_attention)
class SdpaRule(PatternSite):
    """``F.scaled_dot_product_attention(q, k, v, attn_mask, dropout_p, is_causal, scale)``.

    Scores, softmax and weighted sum are linearized at theta0 (dropout is off when estimating, as everywhere).
    """

    family = "attention"

    def setup(self) -> None:
        """Read ``is_causal``, ``scale`` and ``enable_gqa``."""
        self.is_causal = bool(self.const_arg(5, "is_causal", False))
        scale = self.const_arg(6, "scale", None)
        self.scale = None if scale is None else float(scale)
        # grouped-query attention: each key/value head serves a group of query heads (as torch does, by
        # repeating them; exact and linear in each stream)
        self.gqa = bool(self.const_arg(None, "enable_gqa", False))

    def params(self) -> dict[str, Any]:
        """``is_causal``, ``scale`` (and ``enable_gqa`` when set), which a stored summary must match."""
        gqa = {"enable_gqa": True} if self.gqa else {}
        return {"is_causal": self.is_causal, "scale": self.scale, **gqa}

    def _parts(self, args: Any, kwargs: Any) -> tuple[Pair, Pair, Pair, Any]:
        names = ("query", "key", "value", "attn_mask")
        vals = [kwargs.get(n, args[i] if i < len(args) else None) for i, n in enumerate(names)]
        q, k, v, mask = vals
        for n, p in zip(names[:3], (q, k, v), strict=True):
            if not isinstance(p, Pair):
                raise self.refuse(f"its {n} is not a tensor")
        if isinstance(mask, Pair) and mask.data and not mask.fixed:
            raise self.refuse("an attention mask computed with parameters "
                              "(a mask may be a constant, a buffer or computed from the network input "
                              "alone, e.g. tokens == pad)")
        if not any(p.data for p in (q, k, v)):
            raise self.refuse("none of query, key, value depends on the input")
        return q, k, v, mask

    def run(self, mode: Any, args: Any, kwargs: Any) -> Any:
        """Scores, softmax and weighted sum of every stream, linearized at theta0 as the mode says.

        Used for every mode but the closed form, which attention does not have.
        """
        q, k, v, mask = self._parts(args, kwargs)
        n = mode.num_streams
        qs, ks, vs = (tuple(p.vals[s] for s in range(n)) for p in (q, k, v))
        if self.gqa:
            Hq, Hk = qs[0].shape[-3], ks[0].shape[-3]
            if Hq % Hk or vs[0].shape[-3] != Hk:
                raise self.refuse(f"grouped-query attention with {Hq} query heads and {Hk} key / "
                                  f"{vs[0].shape[-3]} value heads (the query heads must be a multiple of "
                                  "both, which must be equal)")
            ks, vs = (tuple(t.repeat_interleave(Hq // Hk, dim=-3) for t in ts) for ts in (ks, vs))
        like = qs[0]
        L, S = like.shape[-2], ks[0].shape[-2]
        scale = self.scale if self.scale is not None else 1.0 / math.sqrt(like.shape[-1])
        causal = _causal_bias(L, S, like) if self.is_causal else None

        def bias_of(s: int) -> Tensor | None:
            bias = _mask_bias(stream_of(mask, s), like)
            return causal if bias is None else bias if causal is None else bias + causal

        biases = stream_biases(mode, bias_of, self.learned(self.arg_node(3, "attn_mask")))
        return Pair(attention_core(self, mode, qs, ks, vs, biases, scale), True)

    forward = fit = sample = own = run


@register(nn.MultiheadAttention)
class MultiheadAttentionRule(PatternSite):
    """``nn.MultiheadAttention``: input projections, attention linearized at theta0, output projection.

    ``batch_first`` either way, ``attn_mask``, ``key_padding_mask``, ``is_causal`` with a causal mask, and
    ``need_weights=False`` (or the default ``True`` with the weights unused). Its projections are tapped as
    linear layers by K-FAC and diag-Fisher.

    ``is_causal=True`` is torch's hint that ``attn_mask`` is the causal mask, and torch acts on it only on
    some paths: without a mask it refuses the call with gradients on and applies no mask with them off; with
    a mask that is not causal it applies the mask on some paths and the causal mask on others
    (``need_weights=False`` without a ``key_padding_mask``, depending on the mask's type and the grad mode).
    Such a network has no one function, and both calls are refused, naming the flag and the fix; with the
    causal mask every path agrees and the mask is applied. The mask is checked on its values at every call (a
    constant, or one computed from the input, whose every batch is then checked). Where a pass runs refused
    ops through torch itself (``gates="none"``, ``linearize="activations"``), the call without a mask is
    refused all the same; with a mask torch's own call stands, the function of its grad mode, which the fit's
    check of both grad modes refuses where they differ.
    """

    family = "multihead_attention"

    def native_batch_axis(self) -> int:
        """0 with ``batch_first``, else 1."""
        return 0 if cast(nn.MultiheadAttention, self.module).batch_first else 1

    def setup(self) -> None:
        """Refuse attention weights that the network reads.

        With ``need_weights=True`` (the default) the call also returns the averaged attention weights; a
        network that drops them (``out, _ = attn(x, x, x)``, ``attn(x, x, x)[0]``) is fine, one that reads
        them is refused (they are not linearized).
        """
        need = self.const_arg(4, "need_weights", True)
        if need and self._weights_read():
            raise self.refuse("the network reads its attention weights (need_weights=True, the default), "
                              "which are not linearized; call it with need_weights=False or do not use them")

    def _weights_read(self) -> bool:
        """Whether the network uses the second output (the weights) or the output pair as a whole."""
        for user in self.node.users:
            if user.op != "call_function" or user.target is not operator.getitem or len(user.args) < 2:
                return True
            if user.args[1] != 0 and (user.args[1] != 1 or user.users):
                return True
        return False

    def params(self) -> dict[str, Any]:
        """The number of heads and the batch layout, which a stored summary must match."""
        m = self.module
        assert isinstance(m, nn.MultiheadAttention)
        return {"heads": m.num_heads, "batch_first": m.batch_first}

    def _check_causal(self, bias: Tensor | None, L: int, S: int) -> None:
        """Refuse ``is_causal=True`` with no ``attn_mask`` or with one that is not causal (see the class)."""
        via = ""
        if self.prefix.rpartition(".")[2] in ("self_attn", "multihead_attn"):  # torch.nn's layers' names
            via = (" (in a torch.nn transformer layer: the is_causal / tgt_is_causal / memory_is_causal "
                   "given to the layer, or to the nn.TransformerEncoder / TransformerDecoder / Transformer "
                   "around it)")
        if bias is None:
            err = self.refuse(
                f"is_causal=True without an attn_mask{via}: torch refuses this call with gradients on "
                "('Need attn_mask if specifying the is_causal hint') and applies no mask with them off, so "
                "the network has no one function; pass the causal mask itself (attn_mask= / mask= / "
                "src_mask= / tgt_mask=nn.Transformer.generate_square_subsequent_mask(L)), or leave is_causal "
                "at False if no causal mask is meant")
            err.final = True  # not for torch's own call either (gates="none"), which has no one function
            raise err
        if not _is_causal_bias(bias, L, S):
            raise self.refuse(
                f"is_causal=True with an attn_mask that is not the causal mask{via}: is_causal is a hint "
                "that the mask is causal, and torch applies the given mask on some paths and a causal mask "
                "in its place on others (need_weights=False without a key_padding_mask, depending on the "
                "mask's type and on whether gradients are on), so the network has no one function; pass "
                "is_causal=True only with the causal mask (nn.Transformer.generate_square_subsequent_mask(L))"
                ", or leave it at False to apply this mask")

    def projections(self, params: dict[str, Tensor]) -> tuple[tuple[Tensor, Tensor | None], ...]:
        """``((Wq, bq), (Wk, bk), (Wv, bv), (Wo, bo))`` of one stream."""
        m = self.module
        assert isinstance(m, nn.MultiheadAttention)
        p = self.prefix + "."
        E = m.embed_dim
        b = params.get(p + "in_proj_bias")
        if m._qkv_same_embed_dim:
            W = params[p + "in_proj_weight"]
            ws = (W[:E], W[E: 2 * E], W[2 * E:])
        else:
            ws = (params[p + "q_proj_weight"], params[p + "k_proj_weight"], params[p + "v_proj_weight"])
        bs = (None, None, None) if b is None else (b[:E], b[E: 2 * E], b[2 * E:])
        return (*zip(ws, bs, strict=True), (params[p + "out_proj.weight"], params.get(p + "out_proj.bias")))

    def _appended(self, params: dict[str, Tensor], q: Tensor, k: Tensor,
                  v: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """One stream's projected ``(q, k, v)`` (batch first) with the keys and values torch appends.

        ``add_bias_kv``: the stream's ``bias_k`` / ``bias_v``; ``add_zero_attn``: zeros (one per head, as
        torch appends them after splitting the heads).
        """
        m = self.module
        assert isinstance(m, nn.MultiheadAttention)
        B, E = k.shape[0], m.embed_dim
        if m.bias_k is not None:
            bk, bv = (params[f"{self.prefix}.{name}"].reshape(1, 1, E).expand(B, 1, E)
                      for name in ("bias_k", "bias_v"))
            k, v = torch.cat([k, bk], 1), torch.cat([v, bv], 1)
        if m.add_zero_attn:
            k, v = torch.cat([k, k.new_zeros(B, 1, E)], 1), torch.cat([v, v.new_zeros(B, 1, E)], 1)
        return q, k, v

    def _inputs(self, args: Any, kwargs: Any) -> tuple[Pair, Pair, Pair, Any, Any, bool]:
        names = ("query", "key", "value", "key_padding_mask", "need_weights", "attn_mask",
                 "average_attn_weights", "is_causal")
        vals = {n: kwargs.get(n, args[i] if i < len(args) else None) for i, n in enumerate(names)}
        q, k, v = vals["query"], vals["key"], vals["value"]
        for n in ("key_padding_mask", "attn_mask"):
            if isinstance(vals[n], Pair) and vals[n].data and not vals[n].fixed:
                raise self.refuse(f"a {n} computed with parameters "
                                  "(a mask may be a constant, a buffer or computed from the network input "
                                  "alone, e.g. tokens == pad)")
        return q, k, v, vals["key_padding_mask"], vals["attn_mask"], bool(vals["is_causal"] or False)

    def run(self, mode: Any, args: Any, kwargs: Any) -> Any:
        """Input projections, attention linearized at theta0 and output projection, in every stream.

        Used for every mode but the closed form, which attention does not have.
        """
        m = self.module
        assert isinstance(m, nn.MultiheadAttention)
        q, k, v, kpm, amask, is_causal = self._inputs(args, kwargs)
        n = mode.num_streams
        H, E = m.num_heads, m.embed_dim
        taps: Any = getattr(mode, "taps", None)
        tap_in = taps is not None and q is k and k is v and taps.wants(self.prefix + ".in_proj")
        tap_out = taps is not None and taps.wants(self.prefix + ".out_proj")
        outs_in = []
        for s in range(n):
            (wq, bq), (wk, bk), (wv, bv), _ = self.projections(mode.params[s])
            qi, ki, vi = (stream_of(t, s) for t in (q, k, v))
            if not m.batch_first:
                qi, ki, vi = (t.transpose(0, 1) for t in (qi, ki, vi))
            # self-attention: one linear map (in_proj_weight, in_proj_bias) of one input, tapped whole
            if tap_in:
                p = self.prefix + "."
                joint = taps.record(self.prefix + ".in_proj", qi,
                                    F.linear(qi, mode.params[s][p + "in_proj_weight"],
                                             mode.params[s].get(p + "in_proj_bias")))
                outs_in.append(tuple(joint.chunk(3, -1)))
            else:
                outs_in.append(tuple(F.linear(t, w, b)
                                     for t, w, b in ((qi, wq, bq), (ki, wk, bk), (vi, wv, bv))))

        def heads(t: Tensor) -> Tensor:
            B, T, _ = t.shape
            return t.view(B, T, H, E // H).transpose(1, 2)

        # the keys torch appends to every sequence: the learned bias_k / bias_v (add_bias_kv), then a zero key
        # and value (add_zero_attn); every mask lets every query see them
        extra = int(m.bias_k is not None) + int(m.add_zero_attn)
        if extra:
            outs_in = [self._appended(mode.params[s], *o) for s, o in enumerate(outs_in)]
        qs = tuple(heads(o[0]) for o in outs_in)
        ks = tuple(heads(o[1]) for o in outs_in)
        vs = tuple(heads(o[2]) for o in outs_in)
        like = qs[0]
        L, S = like.shape[-2], ks[0].shape[-2]
        S0 = S - extra  # (the sequence's own keys, which the masks cover)

        def bias_of(s: int) -> Tensor | None:
            # MultiheadAttention's boolean masks say True where a position may NOT take part (unlike SDPA's)
            bias = _mask_bias(_allowed(stream_of(amask, s)), like)
            if bias is not None and bias.ndim == 3:  # (B * H, L, S)
                bias = bias.view(-1, H, L, S0)
            if is_causal:
                self._check_causal(bias, L, S0)
            kb = _mask_bias(_allowed(stream_of(kpm, s)), like)
            if kb is not None:
                kb = kb.view(kb.shape[0], 1, 1, S0)
                bias = kb if bias is None else bias + kb
            return bias if bias is None or not extra else F.pad(bias, (0, extra))

        learned = any(self.learned(self.arg_node(i, name))
                      for i, name in ((5, "attn_mask"), (3, "key_padding_mask")))
        biases = stream_biases(mode, bias_of, learned)
        att = attention_core(self, mode, qs, ks, vs, biases, 1.0 / math.sqrt(E // H))
        concat = Pair(tuple(o.transpose(1, 2).reshape(o.shape[0], L, E) for o in att), True)
        merged_all = mode.inner(self, "out_proj", concat)
        outs = []
        for s, merged in enumerate(merged_all.vals):
            wo, bo = self.projections(mode.params[s])[3]
            y = F.linear(merged, wo, bo)
            if tap_out:
                y = taps.record(self.prefix + ".out_proj", merged, y)
            if not m.batch_first:
                y = y.transpose(0, 1)
            outs.append((y, None))
        return Pair(tuple(outs), True)

    forward = fit = sample = own = run
