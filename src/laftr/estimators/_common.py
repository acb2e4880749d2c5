"""Pieces shared by the baseline estimators: the metric's output-space curvature, per-example gradients,
streaming coreset selection and a temporary eval mode.

Curvature conventions (used by ``diag-fisher`` and ``kfac``). For a metric rho and reference outputs z0
(restricted to the selected output units), ``H = d^2/dz^2 rho(z0, z) at z = z0`` is

- ``l2`` / ``mse``: the identity;
- ``kl``: ``diag(p0) - p0 p0^T`` (p0 = softmax of the selected outputs);
- ``l2-probs``: ``S^2`` with ``S = diag(p0) - p0 p0^T`` (the Jacobian of softmax; the second term of the
  Hessian vanishes at z = z0 because it is multiplied by ``p - p0``).

The Gauss-Newton matrix of the FSD is then ``E_x[J^T H J]`` and ``1/2 dtheta^T (E J^T H J) dtheta`` is
the second-order Taylor expansion of the FSD around theta0. Every curvature estimator works with a set
of output-space vectors ``W`` (``(B, K, S)``, S vectors per example) whose outer products give ``H``:
``W W^T = H`` exactly (``exact``: the columns of a factor ``L``), or in expectation (``mc``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, jacrev, vmap
from tqdm.auto import tqdm

from .._util import Data, iter_batches, model_device_dtype
from ..inputs import hash_keys
from ..metrics import check_metric, select_outputs
from .base import EstimatorConfig, FSDEstimator

log = logging.getLogger(__name__)

#: How output-space vectors are drawn: Monte Carlo ("true Fisher"), all columns of the factor, or the
#: gradients of the loss at the true labels (``kl`` only).
FISHER_KINDS = ("mc", "exact", "empirical")

#: How the coreset estimators pick their stored inputs.
SELECTIONS = ("random", "balanced")


def check_fisher_kind(kind: str, metric: str, allowed: Sequence[str] = FISHER_KINDS) -> str:
    """Validate a ``fisher`` option against the metric; returns it."""
    if kind not in allowed:
        raise ValueError(f"unknown fisher {kind!r}; choose one of {list(allowed)}")
    if kind == "empirical" and metric != "kl":
        raise ValueError(
            f"the empirical Fisher uses the gradient of cross-entropy at the true labels, which matches only "
            f"metric 'kl' (got {metric!r}); use fisher='mc' or 'exact'"
        )
    return kind


def output_hessian_factor(z0: torch.Tensor, metric: str) -> torch.Tensor:
    """A factor ``L`` of the metric's output Hessian at ``z = z0``: ``L @ L^T = H`` for every example.

    Args:
        z0: reference outputs of shape ``(B, K)`` (already restricted to the selected output units).
        metric: ``l2``, ``mse``, ``l2-probs`` or ``kl``.

    Returns:
        ``(B, K, K)``: the identity (``l2``/``mse``), ``diag(sqrt p0) - p0 sqrt(p0)^T`` (``kl``; its column
        j is ``sqrt(p0_j) (e_j - p0)``) or the symmetric ``diag(p0) - p0 p0^T`` (``l2-probs``).
    """
    check_metric(metric)
    if z0.ndim != 2:
        raise ValueError(f"z0 must have shape (B, K), got {tuple(z0.shape)}")
    B, K = z0.shape
    if metric in ("l2", "mse"):
        return torch.eye(K, dtype=z0.dtype, device=z0.device).expand(B, K, K).clone()
    p = F.softmax(z0, dim=-1)
    if metric == "kl":
        r = p.sqrt()
        return torch.diag_embed(r) - p[:, :, None] * r[:, None, :]
    return torch.diag_embed(p) - p[:, :, None] * p[:, None, :]  # l2-probs


def labels_to_positions(y: torch.Tensor, outputs: Sequence[int] | None, num_outputs: int) -> torch.Tensor:
    """Map class labels (indices of the model's outputs) to positions among the selected outputs.

    Raises:
        ValueError: labels that are not integer class indices, or that name an output outside ``outputs``.
    """
    if y.dtype.is_floating_point or y.dtype == torch.bool or y.ndim != 1:
        raise ValueError(f"labels must be integer class indices of shape (B,), got {y.dtype} {tuple(y.shape)}")
    y = y.long()
    if outputs is None:
        if (y < 0).any() or (y >= num_outputs).any():
            raise ValueError(f"labels {sorted(set(y.tolist()))} out of range for a model with {num_outputs} outputs")
        return y
    table = torch.full((max(num_outputs, int(y.max()) + 1, max(outputs) + 1),), -1, dtype=torch.long,
                       device=y.device)
    table[torch.as_tensor(list(outputs), device=y.device) % num_outputs] = torch.arange(len(outputs), device=y.device)
    if (y < 0).any():
        raise ValueError("labels must be non-negative class indices")
    pos = table[y]
    if (pos < 0).any():
        bad = sorted(set(y[pos < 0].tolist()))
        raise ValueError(f"labels {bad} are not among the compared outputs {list(outputs)}; labels must index the "
                         "model's output units")
    return pos


def output_vectors(
    z0: torch.Tensor,
    metric: str,
    fisher: str,
    num_samples: int,
    generator: torch.Generator | None,
    labels: torch.Tensor | None = None,
) -> torch.Tensor:
    """Output-space vectors ``W`` (``(B, K, S)``) whose outer products ``W W^T`` give the metric's Hessian.

    - ``exact``: ``W = L`` (S = K), so ``W W^T = H`` exactly.
    - ``mc``: S = ``num_samples`` vectors scaled by ``1/sqrt(S)`` with ``E[W W^T] = H``: for ``kl``
      ``e_y - p0`` with labels ``y ~ Categorical(p0)`` drawn from the model (the true Fisher); for the
      other metrics ``L eps`` with ``eps ~ N(0, I)``.
    - ``empirical`` (``kl``): ``p0 - e_y`` at the true labels (positions among the selected outputs).
    """
    B, K = z0.shape
    if fisher == "exact":
        return output_hessian_factor(z0, metric)
    if fisher == "empirical":
        if labels is None:
            raise ValueError("the empirical Fisher needs labels: give (x, y) batches")
        p = F.softmax(z0, dim=-1)
        return (p - F.one_hot(labels, K).to(p.dtype))[:, :, None]
    if fisher != "mc":
        raise ValueError(f"unknown fisher {fisher!r}; choose one of {list(FISHER_KINDS)}")
    S = int(num_samples)
    if metric == "kl":
        p = F.softmax(z0, dim=-1)
        y = torch.multinomial(p, S, replacement=True, generator=generator)  # (B, S)
        onehot = F.one_hot(y, K).to(p.dtype).transpose(1, 2)  # (B, K, S)
        return (onehot - p[:, :, None]) / math.sqrt(S)
    L = output_hessian_factor(z0, metric)
    eps = torch.randn((B, K, S), generator=generator, device=z0.device, dtype=z0.dtype)
    return L @ eps / math.sqrt(S)


def per_example_square_grads(
    model: nn.Module,
    x: torch.Tensor,
    W: torch.Tensor,
    names: Sequence[str],
    outputs: Sequence[int] | None,
    chunk_size: int = 32,
) -> dict[str, torch.Tensor]:
    """``sum_b sum_s (d/dtheta  W[b, :, s] . z_sel(x_b; theta))^2`` for the parameters in ``names``.

    Each example's gradient is computed on its own (``torch.func.vmap`` of ``jacrev`` over
    ``functional_call``), so the result is a sum of per-example squares, never the square of a batch
    mean. The model must be in the mode wanted (eval) and is not changed.

    Args:
        model: the network (its current parameters and buffers are used).
        x: a batch of inputs ``(B, ...)``.
        W: ``(B, K, S)`` output-space vectors (see :func:`output_vectors`).
        names: the parameters to differentiate.
        outputs: the selected output units.
        chunk_size: examples per vectorized chunk (bounds memory at ``chunk_size * S * P`` floats).

    Returns:
        ``{name: tensor shaped like the parameter}``.
    """
    params = {n: p.detach() for n, p in model.named_parameters()}
    wrt = {n: params[n] for n in names}
    rest = {n: p for n, p in params.items() if n not in wrt}
    rest.update({n: b.detach() for n, b in model.named_buffers()})

    def one(tp: dict[str, torch.Tensor], xb: torch.Tensor, wb: torch.Tensor) -> torch.Tensor:
        z = functional_call(model, (tp, rest), (xb.unsqueeze(0),))
        return select_outputs(z, outputs)[0] @ wb  # (S,)

    jac = vmap(jacrev(one), in_dims=(None, 0, 0))
    acc = {n: torch.zeros_like(p) for n, p in wrt.items()}
    with torch.enable_grad():
        for i in range(0, x.shape[0], max(1, int(chunk_size))):
            J = jac(wrt, x[i : i + chunk_size], W[i : i + chunk_size])
            for n in acc:
                acc[n] += J[n].pow(2).sum(dim=(0, 1))
    return acc


# ---------------------------------------------------------------------- layer taps (Linear / Conv2d)
@dataclasses.dataclass
class Tap:
    """A ``Linear`` or ``Conv2d`` layer whose inputs and output gradients are recorded during a pass.

    ``d_in`` is ``in_features`` (Linear) or ``C_in * kh * kw`` (Conv2d); ``bias`` says whether its bias is
    trainable (then a ones column is appended to the inputs, the bias being the last column of the
    ``d_out x (d_in + 1)`` weight matrix).
    """

    name: str
    kind: str  # "linear" | "conv"
    bias: bool
    d_in: int
    d_out: int
    # filled during a forward pass, one entry per call of the module
    inp: list[torch.Tensor] = dataclasses.field(default_factory=list)
    out: list[torch.Tensor] = dataclasses.field(default_factory=list)


def find_taps(model: nn.Module, unsupported: str, who: str) -> tuple[list[Tap], dict[str, nn.Module], list[str]]:
    """Split the trainable parameters into tappable ``Linear``/``Conv2d`` layers and the rest.

    Args:
        model: the network.
        unsupported: ``error`` to raise on a module with trainable parameters that cannot be tapped, or
            ``fallback`` to return its parameter names instead.
        who: the estimator's name, for error messages.

    Returns:
        ``(taps, modules by name, fallback parameter names)``.
    """
    taps: list[Tap] = []
    modules: dict[str, nn.Module] = {}
    fallback: list[str] = []
    for mname, mod in model.named_modules():
        own = [(n, p) for n, p in mod.named_parameters(recurse=False) if p.requires_grad]
        if not own:
            continue
        prefix = f"{mname}." if mname else ""
        why = None
        if type(mod) in (nn.Linear, nn.Conv2d):
            extra = [n for n, _ in own if n not in ("weight", "bias")]
            if not mod.weight.requires_grad:
                why = "its weight is frozen but its bias is trainable"
            elif extra:
                why = f"it has extra parameters {extra}"
            elif isinstance(mod, nn.Conv2d) and mod.groups != 1:
                why = f"grouped convolution (groups={mod.groups})"
        else:
            why = f"{who} supports nn.Linear and nn.Conv2d, not {type(mod).__name__}"
        if why is None:
            bias = mod.bias is not None and mod.bias.requires_grad
            if isinstance(mod, nn.Conv2d):
                d_in = mod.in_channels * mod.kernel_size[0] * mod.kernel_size[1]
                kind, d_out = "conv", mod.out_channels
            else:
                kind, d_in, d_out = "linear", mod.in_features, mod.out_features
            taps.append(Tap(mname, kind, bias, d_in, d_out))
            modules[mname] = mod
        elif unsupported == "fallback":
            fallback += [prefix + n for n, _ in own]
        else:
            raise ValueError(f"{who} cannot handle layer {mname or '(root)'!r} ({type(mod).__name__}): {why}; "
                             "pass unsupported='diag' to give its parameters a diagonal Gauss-Newton term")
    if not taps and not fallback:
        raise ValueError("the model has no trainable parameters")
    return taps, modules, fallback


def _patches(module: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """Unfolded input patches ``(B, T, C_in*kh*kw)`` in the weight's ``(C_in, kh, kw)`` order."""
    pad = module._reversed_padding_repeated_twice
    if any(pad):
        mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
        x = F.pad(x, pad, mode=mode)
    cols = F.unfold(x, module.kernel_size, dilation=module.dilation, padding=0, stride=module.stride)
    return cols.transpose(1, 2)


def tap_positions(tap: Tap, t: torch.Tensor) -> torch.Tensor:
    """A layer output (or its gradient) as ``(B, T, d_out)``."""
    if tap.kind == "conv":
        return t.flatten(2).transpose(1, 2)
    return t.reshape(t.shape[0], -1, t.shape[-1])


def tap_inputs(tap: Tap, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The layer's input as ``(B, T, d_in [+ 1])`` (patches for convs; a ones column with a bias)."""
    a = _patches(module, x) if tap.kind == "conv" else x.reshape(x.shape[0], -1, x.shape[-1])  # type: ignore[arg-type]
    return torch.cat([a, a.new_ones((*a.shape[:-1], 1))], dim=-1) if tap.bias else a


class LayerTaps:
    """Forward hooks that record every tapped layer's input and output during :meth:`grads`.

    Use as a context manager (the hooks are removed on exit). The hook passes a copy of the output on, so an
    in-place op downstream (``ReLU(inplace=True)``) cannot overwrite the tensor whose gradient is taken.
    """

    def __init__(self, model: nn.Module, taps: list[Tap], modules: dict[str, nn.Module]) -> None:
        self.model, self.taps, self.modules = model, taps, modules
        self.recording = False
        self._handles: list[Any] = []

    def __enter__(self) -> LayerTaps:  # noqa: PYI034 (Self needs Python 3.11)
        for tap in self.taps:
            self._handles.append(self.modules[tap.name].register_forward_hook(self._hook(tap)))
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        for tap in self.taps:
            tap.inp, tap.out = [], []

    def _hook(self, tap: Tap):
        def hook(mod: nn.Module, inputs: tuple[Any, ...], out: torch.Tensor) -> torch.Tensor | None:
            if not self.recording:
                return None
            tap.inp.append(inputs[0].detach())
            if not out.requires_grad:  # nothing upstream needs grad: a leaf loses no path
                out = out.detach().requires_grad_(True)
            tap.out.append(out)
            return out.clone()

        return hook

    def grads(self, x: torch.Tensor, W: torch.Tensor, outputs: Sequence[int] | None,
              ) -> tuple[dict[str, list[torch.Tensor]], Iterator[dict[str, list[torch.Tensor]]]]:
        """One forward pass on ``x``; returns the layers' inputs and an iterator over the output vectors.

        Returns:
            ``(inputs, per_vector)``: ``inputs[name]`` lists, per call of the layer, its input as
            ``(B, T, d_in [+1])``; each item of ``per_vector`` (one per column s of ``W``) maps a layer name to
            the per-example gradients ``(B, T, d_out)`` of ``sum_b W[b, :, s] . z_sel(x_b)`` w.r.t. each
            call's output. Examples do not interact (eval mode), so these are per-example gradients.
        """
        for tap in self.taps:
            tap.inp, tap.out = [], []
        self.recording = True
        try:
            with torch.enable_grad():
                zs = select_outputs(self.model(x), outputs)
        finally:
            self.recording = False
        for tap in self.taps:
            if not tap.out:
                raise ValueError(
                    f"layer {tap.name!r} ({type(self.modules[tap.name]).__name__}) was not called in the forward "
                    "pass (is its weight used directly?)"
                )
        inputs = {tap.name: [tap_inputs(tap, self.modules[tap.name], t) for t in tap.inp] for tap in self.taps}
        owner = [tap for tap in self.taps for _ in tap.out]
        outs = [o for tap in self.taps for o in tap.out]

        def per_vector() -> Iterator[dict[str, list[torch.Tensor]]]:
            S = W.shape[2]
            for s in range(S):
                gs = torch.autograd.grad((zs * W[:, :, s]).sum(), outs, retain_graph=s < S - 1, allow_unused=True)
                res: dict[str, list[torch.Tensor]] = {tap.name: [] for tap in self.taps}
                for tap, g, o in zip(owner, gs, outs):
                    g = torch.zeros_like(o) if g is None else g.detach()
                    res[tap.name].append(tap_positions(tap, g))
                yield res
            for tap in self.taps:
                tap.inp, tap.out = [], []

        return inputs, per_vector()


def tapped_square_grads(inputs: list[torch.Tensor], grads: list[torch.Tensor]) -> torch.Tensor:
    """``sum_b (per-example gradient of the layer's [weight | bias] matrix)^2`` from one layer's taps.

    ``inputs``/``grads`` list the calls of the layer: ``(B, T, d_in [+1])`` and ``(B, T, d_out)``. With one
    call and one position per example the per-example gradient ``g_b a_b^T`` is never formed:
    ``sum_b (g_b a_b^T)^2 = (g^2)^T (a^2)``. Otherwise each example's gradient (summed over positions and
    calls) is formed and squared.

    Returns:
        ``(d_out, d_in [+1])``.
    """
    if len(inputs) == 1 and inputs[0].shape[1] == 1:
        a, g = inputs[0][:, 0], grads[0][:, 0]
        return (g * g).T @ (a * a)
    per = None
    for a, g in zip(inputs, grads):
        t = torch.einsum("bto,bti->boi", g, a)
        per = t if per is None else per + t
    assert per is not None
    return (per * per).sum(0)


def square_grads(
    model: nn.Module,
    x: torch.Tensor,
    W: torch.Tensor,
    names: Sequence[str],
    outputs: Sequence[int] | None,
    chunk_size: int = 32,
    taps: LayerTaps | None = None,
) -> dict[str, torch.Tensor]:
    """Like :func:`per_example_square_grads`, but ``Linear``/``Conv2d`` layers in ``taps`` get theirs from one
    batched backward pass per output vector (:func:`tapped_square_grads`); only the other parameters in
    ``names`` go through the per-example ``vmap``.
    """
    out: dict[str, torch.Tensor] = {}
    tapped: set[str] = set()
    if taps is not None and taps.taps:
        inputs, per_vector = taps.grads(x, W, outputs)
        acc: dict[str, torch.Tensor] = {}
        for grads in per_vector:
            for tap in taps.taps:
                sq = tapped_square_grads(inputs[tap.name], grads[tap.name])
                acc[tap.name] = sq if tap.name not in acc else acc[tap.name] + sq
        for tap in taps.taps:
            pre = f"{tap.name}." if tap.name else ""
            w = taps.modules[tap.name].weight
            out[pre + "weight"] = acc[tap.name][:, : tap.d_in].reshape(w.shape)
            tapped.add(pre + "weight")
            if tap.bias:
                out[pre + "bias"] = acc[tap.name][:, tap.d_in]
                tapped.add(pre + "bias")
    rest = [n for n in names if n not in tapped]
    if rest:
        out.update(per_example_square_grads(model, x, W, rest, outputs, chunk_size))
    return {n: out[n] for n in names}


def check_curvature_config(c: Any, allowed: Sequence[str]) -> None:
    """Validate the fields shared by the curvature estimators' configs (``fisher``, sample and chunk sizes)."""
    check_fisher_kind(c.fisher, c.metric, allowed)
    for name in ("num_label_samples", "chunk_size", "batch_size"):
        v = getattr(c, name)
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{name} must be a positive integer, got {v!r}")


def curvature_batches(
    model: nn.Module, data: Data, config: Any, outputs: Sequence[int] | None, desc: str
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield ``(x, W)`` for every batch of ``data``: inputs on the model's device/dtype and their output-space
    vectors (:func:`output_vectors`) for ``config.fisher``, drawn from a generator seeded by ``config.seed``.

    The model must already be in eval mode; it is run once per batch without gradients.
    """
    device, dtype = model_device_dtype(model)
    gen = torch.Generator(device=device).manual_seed(int(config.seed))
    for x, y in tqdm(iter_batches(data, config.batch_size, device, dtype), disable=not config.progress, desc=desc):
        with torch.no_grad():
            z = model(x)
        z = z.reshape(z.shape[0], -1)
        z0 = select_outputs(z, outputs)
        if not torch.isfinite(z0).all():
            raise ValueError("the model produces NaN or infinite outputs on the data")
        labels = None
        if config.fisher == "empirical":
            if y is None:
                raise ValueError("fisher='empirical' needs labels: give (x, y) batches")
            labels = labels_to_positions(y, outputs, z.shape[1])
        yield x, output_vectors(z0, config.metric, config.fisher, config.num_label_samples, gen, labels)


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Temporarily put ``model`` in eval mode (dropout off, batch norm on running statistics)."""
    was = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was)


def select_coreset(
    data: Data,
    k: int,
    selection: str,
    seed: int,
    batch_size: int = 256,
    device: torch.device | None = None,
    dtype: torch.dtype | None = None,
    progress: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Pick ``k`` training inputs in one streaming pass, independently of batch size and order.

    Every example gets a seeded hash of its bytes (the same hash as LAFTR's coreset,
    :func:`laftr.inputs.hash_keys`). ``random`` keeps the ``k`` smallest keys. ``balanced`` ranks each
    class's examples by key and takes them round-robin over classes (rank 0 of every class, then rank
    1, ...; ties between classes by key) until ``k`` are taken: equal counts per class when every class
    has enough examples and ``k`` is a multiple of the number of classes, counts differing by at most
    one otherwise, and a class with fewer examples than its share gives the rest to the others.

    Returns:
        ``(X, Y)``: the inputs ``(k', *input_shape)`` on ``device``/``dtype`` (``k' = min(k, number of
        examples)``) and, for ``balanced``, their labels (else None).
    """
    if selection not in SELECTIONS:
        raise ValueError(f"unknown selection {selection!r}; choose one of {list(SELECTIONS)}")
    if int(k) < 1:
        raise ValueError(f"coreset_size must be positive, got {k}")
    balanced = selection == "balanced"
    keys: list[torch.Tensor] = []
    xs: list[torch.Tensor] = []
    ys: list[torch.Tensor] = []
    shape: tuple[int, ...] | None = None
    # batches stay on the CPU (where the hash is computed); only the chosen k move to ``device``
    for x, y in tqdm(iter_batches(data, batch_size, None, dtype), disable=not progress, desc="coreset"):
        if shape is None:
            shape = tuple(x.shape[1:])
        elif tuple(x.shape[1:]) != shape:
            raise ValueError(f"inputs change shape between batches: {shape} then {tuple(x.shape[1:])}")
        if balanced:
            if y is None:
                raise ValueError("selection='balanced' needs labels: give (x, y) batches")
            if y.dtype.is_floating_point or y.dtype == torch.bool or y.ndim != 1:
                raise ValueError(f"selection='balanced' needs integer class labels of shape (B,), got {y.dtype} "
                                 f"{tuple(y.shape)}")
            ys.append(y.detach().cpu().long())
        keys.append(hash_keys(x, seed))
        xs.append(x.detach().cpu())
        allk = torch.cat(keys)
        if len(allk) > 4 * k:  # prune; the k smallest keys overall (random) or per class (balanced) survive
            keep = _bottom_k(allk, torch.cat(ys) if balanced else None, k)
            keys, xs = [allk[keep]], [torch.cat(xs)[keep]]
            if balanced:
                ys = [torch.cat(ys)[keep]]
    allk, X = torch.cat(keys), torch.cat(xs)
    if balanced:
        Y: torch.Tensor | None = torch.cat(ys)
        order = _round_robin(allk, Y, k)  # type: ignore[arg-type]
    else:
        Y = None
        order = torch.argsort(allk, stable=True)[:k]
    return X[order].to(device=device), (Y[order] if Y is not None else None)


def _bottom_k(keys: torch.Tensor, y: torch.Tensor | None, k: int) -> torch.Tensor:
    """Indices of the ``k`` smallest keys, overall (``y`` None) or within each class."""
    if y is None:
        return torch.argsort(keys, stable=True)[:k]
    keep = []
    for c in y.unique():
        idx = (y == c).nonzero().squeeze(1)
        keep.append(idx[torch.argsort(keys[idx], stable=True)[:k]])
    return torch.cat(keep)


def _round_robin(keys: torch.Tensor, y: torch.Tensor, k: int) -> torch.Tensor:
    """Order by (rank of the key within its class, key) and keep the first ``k``."""
    rank = torch.empty_like(keys)
    for c in y.unique():
        idx = (y == c).nonzero().squeeze(1)
        o = torch.argsort(keys[idx], stable=True)
        rank[idx[o]] = torch.arange(len(idx))
    # lexicographic sort: by key first, then stably by rank
    by_key = torch.argsort(keys, stable=True)
    by_rank = torch.argsort(rank[by_key], stable=True)
    return by_key[by_rank][:k]


@dataclasses.dataclass
class CoresetConfig(EstimatorConfig):
    """Options of the estimators that store a few training inputs (``ntk``, ``subset``).

    Attributes:
        coreset_size: number k of stored inputs (all of them if the data has fewer).
        selection: ``random`` (the k smallest seeded hashes: a uniform sample, independent of batch size
            and order) or ``balanced`` (equal counts per class, round-robin by hash; needs integer labels).
    """

    coreset_size: int = 200
    selection: str = "random"


class CoresetEstimator(FSDEstimator):
    """Base of the estimators that keep ``coreset_size`` training inputs and evaluate on them.

    Stores ``k * d`` floats (d = input size); labels are not kept.
    """

    Config = CoresetConfig

    def __init__(self, config: CoresetConfig | None = None, **kwargs: Any) -> None:
        super().__init__(config, **kwargs)
        c: CoresetConfig = self.config  # type: ignore[assignment]
        if c.selection not in SELECTIONS:
            raise ValueError(f"unknown selection {c.selection!r}; choose one of {list(SELECTIONS)}")
        if not isinstance(c.coreset_size, int) or isinstance(c.coreset_size, bool) or c.coreset_size < 1:
            raise ValueError(f"coreset_size must be a positive integer, got {c.coreset_size!r}")
        self.X: torch.Tensor | None = None

    def _fit(self, model: nn.Module, data: Data) -> None:
        c: CoresetConfig = self.config  # type: ignore[assignment]
        device, dtype = model_device_dtype(model)
        self.X, _ = select_coreset(data, c.coreset_size, c.selection, c.seed, c.batch_size, device, dtype, c.progress)
        with torch.no_grad():  # fail now, not at the first evaluation, on a model that cannot run on them
            select_outputs(model(self.X[:1]), self.outputs)
        log.info("%s: stored %d inputs of shape %s", self.name, self.X.shape[0], tuple(self.X.shape[1:]))

    def inputs_on(self, model: nn.Module) -> torch.Tensor:
        """The stored inputs on ``model``'s device and dtype."""
        assert self.X is not None
        device, dtype = model_device_dtype(model)
        return self.X.to(device=device, dtype=dtype if self.X.is_floating_point() else None)

    def stored_floats(self) -> int:
        return 0 if self.X is None else int(self.X.numel())

    def _state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        assert self.X is not None
        return {"x": self.X}, {"num_inputs": int(self.X.shape[0])}

    def _load_state(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        X = tensors["x"]
        if X.ndim < 2 or X.shape[0] != int(meta["num_inputs"]):
            raise ValueError("stored inputs do not match the metadata")
        if X.is_floating_point() and not torch.isfinite(X).all():
            raise ValueError("stored inputs contain NaN or infinite values")
        self.X = X
