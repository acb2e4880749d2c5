"""One example call for every op that has a rule, keyed by its registered target (module type, function or
tensor method name). The registry tests fail when a registered op has no example here, so every rule gets
checked (affine ops for affinity, gates for their laws)."""

from __future__ import annotations

import operator
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

Example = tuple[Callable[[], nn.Module], tuple[int, ...]]  # (model factory, per-example input shape)


class Lambda(nn.Module):
    """``forward(x) = fn(x)``: torch.fx records the op(s) ``fn`` calls."""

    def __init__(self, fn: Callable[[torch.Tensor], Any]) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x)


class WithParam(nn.Module):
    """``fn(x, p)`` with a learned parameter ``p`` (for ops whose second operand is a parameter)."""

    def __init__(self, fn: Callable[[torch.Tensor, torch.Tensor], Any], shape: tuple[int, ...]) -> None:
        super().__init__()
        self.fn = fn
        self.p = nn.Parameter(torch.randn(shape) * 0.5 + 1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x, self.p)


class WithMask(nn.Module):
    """``fn(x, mask)`` with a fixed boolean buffer ``mask`` of the per-example shape (ops that select entries)."""

    def __init__(self, fn: Callable[[torch.Tensor, torch.Tensor], Any], shape: tuple[int, ...]) -> None:
        super().__init__()
        self.fn = fn
        self.register_buffer("mask", torch.rand(shape, generator=torch.Generator().manual_seed(5)) < 0.4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x, self.mask)


class WithIndex(nn.Module):
    """``fn(x, index)`` with a fixed long buffer ``index`` (ops that pick entries by index)."""

    def __init__(self, fn: Callable[[torch.Tensor, torch.Tensor], Any]) -> None:
        super().__init__()
        self.fn = fn
        self.register_buffer("index", torch.tensor([5, 0, 2, 2, 1]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x, self.index)


def lam(fn: Callable[[torch.Tensor], Any], shape: tuple[int, ...]) -> Example:
    return (lambda: Lambda(fn), shape)


def mod(factory: Callable[[], nn.Module], shape: tuple[int, ...]) -> Example:
    return (factory, shape)


def _eval_bn(factory: Callable[[], nn.Module]) -> Callable[[], nn.Module]:
    def make() -> nn.Module:
        m = factory()
        with torch.no_grad():
            m.running_mean.normal_(0, 0.3)
            m.running_var.uniform_(0.5, 2.0)
        return m.eval()

    return make


def _rotated(x: torch.Tensor) -> torch.Tensor:
    """The pairs of entries of each row of ``x`` (B, 4, 6) rotated by a constant angle per pair, as complex numbers."""
    turn = torch.polar(torch.ones(3, dtype=x.dtype), torch.arange(3, dtype=x.dtype))
    return torch.view_as_real(torch.view_as_complex(x.reshape(x.shape[0], 4, 3, 2)) * turn).flatten(2)


V = (4, 6)  # a small matrix per example
IMG = (2, 4, 4)
VOL = (2, 3, 4, 4)

AFFINE: dict[Any, Example] = {
    # layers
    nn.Linear: mod(lambda: nn.Linear(6, 3), V),
    F.linear: (lambda: WithParam(lambda x, p: F.linear(x, p), (3, 6)), V),
    nn.Conv1d: mod(lambda: nn.Conv1d(4, 3, 3, padding=1), V),
    nn.Conv2d: mod(lambda: nn.Conv2d(2, 3, 3, padding=1, padding_mode="reflect"), IMG),
    nn.Conv3d: mod(lambda: nn.Conv3d(2, 2, 3, padding=1), VOL),
    F.conv1d: (lambda: WithParam(lambda x, p: F.conv1d(x, p), (3, 4, 3)), V),
    F.conv2d: (lambda: WithParam(lambda x, p: F.conv2d(x, p, padding=1), (3, 2, 3, 3)), IMG),
    F.conv3d: (lambda: WithParam(lambda x, p: F.conv3d(x, p), (2, 2, 2, 2, 2)), VOL),
    nn.modules.batchnorm._BatchNorm: mod(_eval_bn(lambda: nn.BatchNorm1d(4)), V),
    F.batch_norm: (lambda: WithParam(lambda x, p: F.batch_norm(x, p.detach().abs(), p.detach().abs() + 1, p),
                                     (4,)), V),
    # plain modules
    nn.Flatten: mod(nn.Flatten, V),
    nn.Unflatten: mod(lambda: nn.Unflatten(2, (2, 3)), V),
    nn.Identity: mod(nn.Identity, V),
    nn.AvgPool1d: mod(lambda: nn.AvgPool1d(2), V),
    nn.AvgPool2d: mod(lambda: nn.AvgPool2d(2), IMG),
    nn.AvgPool3d: mod(lambda: nn.AvgPool3d(2), VOL),
    nn.AdaptiveAvgPool1d: mod(lambda: nn.AdaptiveAvgPool1d(2), V),
    nn.AdaptiveAvgPool2d: mod(lambda: nn.AdaptiveAvgPool2d(1), IMG),
    nn.AdaptiveAvgPool3d: mod(lambda: nn.AdaptiveAvgPool3d(1), VOL),
    nn.ZeroPad1d: mod(lambda: nn.ZeroPad1d(1), V),
    nn.ZeroPad2d: mod(lambda: nn.ZeroPad2d(1), IMG),
    nn.ZeroPad3d: mod(lambda: nn.ZeroPad3d(1), VOL),
    nn.ConstantPad1d: mod(lambda: nn.ConstantPad1d(1, 0.5), V),
    nn.ConstantPad2d: mod(lambda: nn.ConstantPad2d(1, 0.5), IMG),
    nn.ConstantPad3d: mod(lambda: nn.ConstantPad3d(1, 0.5), VOL),
    nn.ReflectionPad1d: mod(lambda: nn.ReflectionPad1d(1), V),
    nn.ReflectionPad2d: mod(lambda: nn.ReflectionPad2d(1), IMG),
    nn.ReplicationPad1d: mod(lambda: nn.ReplicationPad1d(1), V),
    nn.ReplicationPad2d: mod(lambda: nn.ReplicationPad2d(1), IMG),
    nn.ReflectionPad3d: mod(lambda: nn.ReflectionPad3d(1), VOL),
    nn.ReplicationPad3d: mod(lambda: nn.ReplicationPad3d(1), VOL),
    nn.CircularPad1d: mod(lambda: nn.CircularPad1d(1), V),
    nn.CircularPad2d: mod(lambda: nn.CircularPad2d(1), IMG),
    nn.CircularPad3d: mod(lambda: nn.CircularPad3d(1), VOL),
    nn.PixelShuffle: mod(lambda: nn.PixelShuffle(2), (4, 2, 2)),
    nn.PixelUnshuffle: mod(lambda: nn.PixelUnshuffle(2), IMG),
    nn.Upsample: mod(lambda: nn.Upsample(scale_factor=2, mode="bilinear"), IMG),
    nn.ConvTranspose1d: mod(lambda: nn.ConvTranspose1d(4, 3, 3, stride=2), V),
    nn.ConvTranspose2d: mod(lambda: nn.ConvTranspose2d(2, 3, 3, stride=2, padding=1, output_padding=1), IMG),
    nn.ConvTranspose3d: mod(lambda: nn.ConvTranspose3d(2, 2, 2, stride=2), VOL),
    nn.Unfold: mod(lambda: nn.Unfold(2, padding=1), IMG),
    nn.Fold: mod(lambda: nn.Fold((3, 3), 2), (8, 4)),
    nn.ChannelShuffle: mod(lambda: nn.ChannelShuffle(2), (4, 2, 2)),
    # functions
    F.conv_transpose1d: (lambda: WithParam(lambda x, p: F.conv_transpose1d(x, p, stride=2), (4, 3, 2)), V),
    F.conv_transpose2d: (lambda: WithParam(lambda x, p: F.conv_transpose2d(x, p, padding=1), (2, 3, 3, 3)), IMG),
    F.conv_transpose3d: (lambda: WithParam(lambda x, p: F.conv_transpose3d(x, p), (2, 2, 2, 2, 2)), VOL),
    F.unfold: lam(lambda x: F.unfold(x, 3, padding=1, stride=2), IMG),
    F.fold: lam(lambda x: F.fold(x, (3, 3), 2, stride=1), (8, 4)),
    torch.channel_shuffle: lam(lambda x: torch.channel_shuffle(x, 2), (4, 2, 2)),
    torch.roll: lam(lambda x: torch.roll(x, 2, -1), V),
    # a rotation of complex pairs by a constant (Meta LLaMA's rotary embeddings): linear over the reals
    torch.view_as_complex: lam(lambda x: _rotated(x), V),
    torch.view_as_real: lam(lambda x: _rotated(x), V),
    torch.flip: lam(lambda x: torch.flip(x, (1, 2)), V),
    torch.tile: lam(lambda x: torch.tile(x, (1, 2, 1)), V),
    torch.repeat_interleave: lam(lambda x: torch.repeat_interleave(x, 2, dim=2), V),
    torch.cumsum: lam(lambda x: torch.cumsum(x, -1), V),
    torch.tril: lam(lambda x: torch.tril(x, 1), V),
    torch.triu: lam(lambda x: torch.triu(x), V),
    torch.diagonal: lam(lambda x: torch.diagonal(x, 0, 1, 2), V),
    torch.index_select: (lambda: WithIndex(lambda x, i: torch.index_select(x, 2, i)), V),
    torch.gather: (lambda: WithIndex(lambda x, i: torch.gather(x, 2, i.view(1, 1, 5).expand(x.shape[0], 4, 5))),
                   V),
    torch.take_along_dim: (lambda: WithIndex(lambda x, i: torch.take_along_dim(x, i.view(1, 1, 5), 2)), V),
    torch.flatten: lam(lambda x: torch.flatten(x, 1), V),
    torch.reshape: lam(lambda x: torch.reshape(x, (-1, 24)), V),
    torch.squeeze: lam(lambda x: torch.squeeze(x.unsqueeze(1), 1), V),
    torch.unsqueeze: lam(lambda x: torch.unsqueeze(x, 1), V),
    torch.transpose: lam(lambda x: torch.transpose(x, 1, 2), V),
    torch.permute: lam(lambda x: torch.permute(x, (0, 2, 1)), V),
    torch.mean: lam(lambda x: torch.mean(x, 1), V),
    torch.sum: lam(lambda x: torch.sum(x, -1), V),
    F.avg_pool1d: lam(lambda x: F.avg_pool1d(x, 2), V),
    F.avg_pool2d: lam(lambda x: F.avg_pool2d(x, 2), IMG),
    F.avg_pool3d: lam(lambda x: F.avg_pool3d(x, 2), VOL),
    F.adaptive_avg_pool1d: lam(lambda x: F.adaptive_avg_pool1d(x, 3), V),
    F.adaptive_avg_pool2d: lam(lambda x: F.adaptive_avg_pool2d(x, 2), IMG),
    F.adaptive_avg_pool3d: lam(lambda x: F.adaptive_avg_pool3d(x, 1), VOL),
    operator.mul: (lambda: WithParam(lambda x, p: x * p, (6,)), V),
    torch.mul: lam(lambda x: torch.mul(x, 2.5), V),
    torch.matmul: (lambda: WithParam(lambda x, p: torch.matmul(x, p), (6, 2)), V),
    operator.matmul: (lambda: WithParam(lambda x, p: x @ p, (6, 2)), V),
    operator.getitem: lam(lambda x: x[:, 1:3, ::2], V),
    operator.neg: lam(lambda x: -x, V),
    operator.pos: lam(lambda x: +x, V),
    torch.neg: lam(lambda x: torch.neg(x), V),
    F.pad: lam(lambda x: F.pad(x, (1, 2), value=0.3), V),
    torch.narrow: lam(lambda x: torch.narrow(x, 2, 1, 3), V),
    torch.chunk: lam(lambda x: torch.chunk(x, 2, 2)[1], V),
    torch.split: lam(lambda x: torch.split(x, 2, 2)[0], V),
    torch.movedim: lam(lambda x: torch.movedim(x, 1, 2), V),
    torch.swapaxes: lam(lambda x: torch.swapaxes(x, 1, 2), V),
    torch.unbind: lam(lambda x: torch.unbind(x, 1)[2], V),
    torch.bmm: (lambda: WithParam(lambda x, p: torch.bmm(x, p.expand(x.shape[0], -1, -1)), (6, 2)), V),
    torch.einsum: (lambda: WithParam(lambda x, p: torch.einsum("bij,jk->bik", x, p), (6, 2)), V),
    torch.addmm: (lambda: WithParam(lambda x, p: torch.addmm(p[0], x[:, 1], p, beta=0.5, alpha=2.0), (6, 2)), V),
    torch.baddbmm: (lambda: WithParam(lambda x, p: torch.baddbmm(p[1], x, p.expand(x.shape[0], -1, -1)), (6, 2)),
                    V),
    torch.t: lam(lambda x: torch.t(x), (5,)),
    F.interpolate: lam(lambda x: F.interpolate(x, scale_factor=2, mode="nearest"), IMG),
    F.pixel_shuffle: lam(lambda x: F.pixel_shuffle(x, 2), (4, 2, 2)),
    F.pixel_unshuffle: lam(lambda x: F.pixel_unshuffle(x, 2), IMG),
    # methods
    "view": lam(lambda x: x.view(x.size(0), -1), V),
    "reshape": lam(lambda x: x.reshape(-1, 6, 4), V),
    "flatten": lam(lambda x: x.flatten(1), V),
    "squeeze": lam(lambda x: x.unsqueeze(2).squeeze(2), V),
    "unsqueeze": lam(lambda x: x.unsqueeze(-1), V),
    "permute": lam(lambda x: x.permute(0, 2, 1), V),
    "transpose": lam(lambda x: x.transpose(1, 2), V),
    "contiguous": lam(lambda x: x.transpose(1, 2).contiguous(), V),
    "mean": lam(lambda x: x.mean(dim=2, keepdim=True), V),
    "sum": lam(lambda x: x.sum(1), V),
    "mul": lam(lambda x: x.mul(0.5), V),
    "mul_": lam(lambda x: x.mul_(0.5), V),
    "neg": lam(lambda x: x.neg(), V),
    "t": lam(lambda x: x.t(), (5,)),
    "chunk": lam(lambda x: x.chunk(3, -1)[2], V),
    "split": lam(lambda x: x.split([2, 4], -1)[1], V),
    "expand": lam(lambda x: x.unsqueeze(1).expand(-1, 2, -1, -1), V),
    "expand_as": lam(lambda x: x[:, :1].expand_as(x), V),
    "view_as": lam(lambda x: x.flatten(1).view_as(x), V),
    "reshape_as": lam(lambda x: x.transpose(1, 2).reshape_as(x), V),
    "narrow": lam(lambda x: x.narrow(1, 0, 2), V),
    "clone": lam(lambda x: x.clone(), V),
    # casts (the model is float64): to float32 and back rounds within the check's tolerance; half and bfloat16
    # round more, so their examples cast an exact zero
    "to": lam(lambda x: x.to(torch.float64), V),
    "double": lam(lambda x: x.double(), V),
    "float": lam(lambda x: x.float().double(), V),
    "type_as": lam(lambda x: x.float().type_as(x), V),
    "type": lam(lambda x: x.float().type(x.dtype), V),
    "half": lam(lambda x: x + (0 * x).half().double(), V),
    "bfloat16": lam(lambda x: x + (0 * x).bfloat16().double(), V),
    "unflatten": lam(lambda x: x.unflatten(2, (3, 2)), V),
    "movedim": lam(lambda x: x.movedim(2, 1), V),
    "matmul": (lambda: WithParam(lambda x, p: x.matmul(p), (6, 3)), V),
    "swapaxes": lam(lambda x: x.swapaxes(1, 2), V),
    "unbind": lam(lambda x: x.unbind(2)[1], V),
    "bmm": (lambda: WithParam(lambda x, p: x.bmm(p.expand(x.shape[0], -1, -1)), (6, 2)), V),
    "addmm": (lambda: WithParam(lambda x, p: p[0].addmm(x[:, 2], p), (6, 2)), V),
    "baddbmm": (lambda: WithParam(lambda x, p: p[1].baddbmm(x, p.expand(x.shape[0], -1, -1), alpha=0.5), (6, 2)),
                V),
    "roll": lam(lambda x: x.roll((1, -1), (1, 2)), V),
    "flip": lam(lambda x: x.flip(-1), V),
    "repeat": lam(lambda x: x.repeat(1, 1, 2), V),
    "tile": lam(lambda x: x.tile((2,)), V),
    "repeat_interleave": lam(lambda x: x.repeat_interleave(3, dim=1), V),
    "cumsum": lam(lambda x: x.cumsum(1), V),
    "tril": lam(lambda x: x.tril(-1), V),
    "triu": lam(lambda x: x.triu(1), V),
    "diagonal": lam(lambda x: x.diagonal(1, 1, 2), V),
    "index_select": (lambda: WithIndex(lambda x, i: x.index_select(1, i[:3] % 4)), V),
    "gather": (lambda: WithIndex(lambda x, i: x.gather(1, (i[:4] % 4).view(1, 4, 1).expand(x.shape[0], 4, 6))), V),
    "take_along_dim": (lambda: WithIndex(lambda x, i: x.take_along_dim((i % 4).view(1, 5, 1), 1)), V),
    # sums
    operator.add: (lambda: WithParam(lambda x, p: x + p + x, (6,)), V),
    operator.sub: (lambda: WithParam(lambda x, p: x - p - 2 * x, (6,)), V),
    torch.add: lam(lambda x: torch.add(x, x, alpha=2), V),
    torch.sub: lam(lambda x: torch.sub(x, x[:, :1]), V),
    torch.cat: lam(lambda x: torch.cat([x, 2 * x], 1), V),
    torch.concat: lam(lambda x: torch.concat([x, -x], 2), V),
    torch.stack: lam(lambda x: torch.stack([x, x * 3]), V),
    "add": lam(lambda x: x.add(x[:, :, :1]), V),
    "sub": lam(lambda x: x.sub(1.0), V),
    "add_": lam(lambda x: x.add_(x * 2), V),
    "sub_": lam(lambda x: x.sub_(0.5), V),
    # division by a constant or a parameter
    operator.truediv: (lambda: WithParam(lambda x, p: x / p, (6,)), V),
    torch.div: lam(lambda x: torch.div(x, 4.0), V),
    "div": lam(lambda x: x.div(3.0), V),
    "div_": lam(lambda x: x.div_(3.0), V),
    # identity when estimating (dropout is off)
    nn.Dropout: mod(lambda: nn.Dropout(0.5).eval(), V),
    nn.Dropout1d: mod(lambda: nn.Dropout1d(0.5).eval(), V),
    nn.Dropout2d: mod(lambda: nn.Dropout2d(0.5).eval(), IMG),
    nn.Dropout3d: mod(lambda: nn.Dropout3d(0.5).eval(), VOL),
    nn.AlphaDropout: mod(lambda: nn.AlphaDropout(0.5).eval(), V),
    nn.FeatureAlphaDropout: mod(lambda: nn.FeatureAlphaDropout(0.5).eval(), IMG),
    F.dropout: lam(lambda x: F.dropout(x, 0.5, training=False), V),
    F.dropout1d: lam(lambda x: F.dropout1d(x, 0.5, training=False), V),
    F.dropout2d: lam(lambda x: F.dropout2d(x, 0.5, training=False), IMG),
    F.dropout3d: lam(lambda x: F.dropout3d(x, 0.5, training=False), VOL),
    F.alpha_dropout: lam(lambda x: F.alpha_dropout(x, 0.5, training=False), V),
    F.feature_alpha_dropout: lam(lambda x: F.feature_alpha_dropout(x, 0.5, training=False), IMG),
    torch.dropout: lam(lambda x: torch.dropout(x, 0.5, False), V),
    # selection by a mask that is the same in both streams (a buffer here)
    "masked_fill": (lambda: WithMask(lambda x, m: x.masked_fill(m, 0.75), V), V),
    "masked_fill_": (lambda: WithMask(lambda x, m: (2 * x).masked_fill_(m, -1.5), V), V),
    torch.masked_fill: (lambda: WithMask(lambda x, m: torch.masked_fill(x, m, 0.0), V), V),
    torch.where: (lambda: WithMask(lambda x, m: torch.where(m, x, 3 * x + 1), V), V),
    "where": (lambda: WithMask(lambda x, m: x.where(m, 2.0), V), V),
    # attributes
    getattr: lam(lambda x: x.mT, V),
}

#: Piecewise-linear gates: (model factory, per-example shape, one pre-activation value inside each piece).
PIECEWISE: dict[Any, tuple[Callable[[], nn.Module], list[float]]] = {
    nn.ReLU: (nn.ReLU, [-2.0, 2.0]),
    F.relu: (lambda: Lambda(F.relu), [-2.0, 2.0]),
    torch.relu: (lambda: Lambda(torch.relu), [-2.0, 2.0]),
    F.relu_: (lambda: Lambda(lambda x: F.relu_(x)), [-2.0, 2.0]),
    torch.relu_: (lambda: Lambda(lambda x: torch.relu_(x)), [-2.0, 2.0]),
    "relu": (lambda: Lambda(lambda x: x.relu()), [-2.0, 2.0]),
    "relu_": (lambda: Lambda(lambda x: x.relu_()), [-2.0, 2.0]),
    nn.LeakyReLU: (lambda: nn.LeakyReLU(0.2), [-2.0, 2.0]),
    F.leaky_relu: (lambda: Lambda(lambda x: F.leaky_relu(x, 0.3)), [-2.0, 2.0]),
    F.leaky_relu_: (lambda: Lambda(lambda x: F.leaky_relu_(x, 0.1)), [-2.0, 2.0]),
    nn.RReLU: (lambda: nn.RReLU(0.1, 0.3).eval(), [-2.0, 2.0]),
    F.rrelu: (lambda: Lambda(lambda x: F.rrelu(x, 0.1, 0.2, training=False)), [-2.0, 2.0]),
    F.rrelu_: (lambda: Lambda(lambda x: F.rrelu_(x, 0.1, 0.2, training=False)), [-2.0, 2.0]),
    nn.PReLU: (lambda: nn.PReLU(6, init=0.2), [-2.0, 2.0]),
    F.prelu: (lambda: WithParam(lambda x, p: F.prelu(x, p), (1,)), [-2.0, 2.0]),
    torch.prelu: (lambda: WithParam(lambda x, p: torch.prelu(x, p), (6,)), [-2.0, 2.0]),
    nn.ReLU6: (nn.ReLU6, [-2.0, 3.0, 8.0]),
    F.relu6: (lambda: Lambda(F.relu6), [-2.0, 3.0, 8.0]),
    nn.Hardtanh: (lambda: nn.Hardtanh(-0.5, 1.5), [-2.0, 0.5, 3.0]),
    F.hardtanh: (lambda: Lambda(lambda x: F.hardtanh(x, -1.0, 2.0)), [-3.0, 0.5, 3.0]),
    F.hardtanh_: (lambda: Lambda(lambda x: F.hardtanh_(x)), [-3.0, 0.2, 3.0]),
    torch.clamp: (lambda: Lambda(lambda x: torch.clamp(x, min=-0.5, max=0.7)), [-2.0, 0.1, 2.0]),
    torch.clip: (lambda: Lambda(lambda x: torch.clip(x, -0.5, 0.7)), [-2.0, 0.1, 2.0]),
    "clamp": (lambda: Lambda(lambda x: x.clamp(max=0.4)), [-2.0, 2.0]),
    "clip": (lambda: Lambda(lambda x: x.clip(min=0.1)), [-2.0, 2.0]),
    "clamp_": (lambda: Lambda(lambda x: x.clamp_(-1.0, 1.0)), [-2.0, 0.0, 2.0]),
    "clip_": (lambda: Lambda(lambda x: x.clip_(-1.0, 1.0)), [-2.0, 0.0, 2.0]),
    torch.clamp_: (lambda: Lambda(lambda x: torch.clamp_(x, min=0.3)), [-2.0, 2.0]),
    torch.clip_: (lambda: Lambda(lambda x: torch.clip_(x, max=0.3)), [-2.0, 2.0]),
    torch.clamp_min: (lambda: Lambda(lambda x: torch.clamp_min(x, 0.2)), [-2.0, 2.0]),
    "clamp_min": (lambda: Lambda(lambda x: x.clamp_min(-0.2)), [-2.0, 2.0]),
    torch.clamp_min_: (lambda: Lambda(lambda x: torch.clamp_min_(x, 0.2)), [-2.0, 2.0]),
    "clamp_min_": (lambda: Lambda(lambda x: x.clamp_min_(0.2)), [-2.0, 2.0]),
    torch.clamp_max: (lambda: Lambda(lambda x: torch.clamp_max(x, 0.3)), [-2.0, 2.0]),
    "clamp_max": (lambda: Lambda(lambda x: x.clamp_max(0.3)), [-2.0, 2.0]),
    torch.clamp_max_: (lambda: Lambda(lambda x: torch.clamp_max_(x, 0.3)), [-2.0, 2.0]),
    "clamp_max_": (lambda: Lambda(lambda x: x.clamp_max_(0.3)), [-2.0, 2.0]),
    nn.Threshold: (lambda: nn.Threshold(0.1, 5.0), [-2.0, 2.0]),
    F.threshold: (lambda: Lambda(lambda x: F.threshold(x, 0.2, -3.0)), [-2.0, 2.0]),
    F.threshold_: (lambda: Lambda(lambda x: F.threshold_(x, 0.2, -3.0)), [-2.0, 2.0]),
    nn.Hardsigmoid: (nn.Hardsigmoid, [-5.0, 0.5, 5.0]),
    F.hardsigmoid: (lambda: Lambda(F.hardsigmoid), [-5.0, 0.5, 5.0]),
    nn.Hardshrink: (lambda: nn.Hardshrink(0.5), [-2.0, 0.1, 2.0]),
    F.hardshrink: (lambda: Lambda(lambda x: F.hardshrink(x, 0.3)), [-2.0, 0.1, 2.0]),
    "hardshrink": (lambda: Lambda(lambda x: x.hardshrink(0.3)), [-2.0, 0.1, 2.0]),
    nn.Softshrink: (lambda: nn.Softshrink(0.5), [-2.0, 0.1, 2.0]),
    F.softshrink: (lambda: Lambda(lambda x: F.softshrink(x, 0.3)), [-2.0, 0.1, 2.0]),
    torch.abs: (lambda: Lambda(torch.abs), [-2.0, 2.0]),
    torch.absolute: (lambda: Lambda(torch.absolute), [-2.0, 2.0]),
    operator.abs: (lambda: Lambda(lambda x: abs(x)), [-2.0, 2.0]),
    torch.abs_: (lambda: Lambda(lambda x: torch.abs_(x)), [-2.0, 2.0]),
    "abs": (lambda: Lambda(lambda x: x.abs()), [-2.0, 2.0]),
    "abs_": (lambda: Lambda(lambda x: x.abs_()), [-2.0, 2.0]),
    "absolute": (lambda: Lambda(lambda x: x.absolute()), [-2.0, 2.0]),
    "absolute_": (lambda: Lambda(lambda x: x.absolute_()), [-2.0, 2.0]),
}
# torch.fx records some functions under another name
PIECEWISE[F._threshold if hasattr(F, "_threshold") else F.threshold] = PIECEWISE[F.threshold]
PIECEWISE[torch.hardshrink] = PIECEWISE[F.hardshrink]

SMOOTH: dict[Any, Callable[[], nn.Module]] = {
    nn.GELU: nn.GELU,
    F.gelu: lambda: Lambda(lambda x: F.gelu(x, approximate="tanh")),
    nn.SiLU: nn.SiLU,
    F.silu: lambda: Lambda(F.silu),
    nn.Tanh: nn.Tanh,
    torch.tanh: lambda: Lambda(torch.tanh),
    "tanh": lambda: Lambda(lambda x: x.tanh()),
    "tanh_": lambda: Lambda(lambda x: x.tanh_()),
    torch.tanh_: lambda: Lambda(lambda x: torch.tanh_(x)),
    nn.Sigmoid: nn.Sigmoid,
    torch.sigmoid: lambda: Lambda(torch.sigmoid),
    "sigmoid": lambda: Lambda(lambda x: x.sigmoid()),
    "sigmoid_": lambda: Lambda(lambda x: x.sigmoid_()),
    torch.sigmoid_: lambda: Lambda(lambda x: torch.sigmoid_(x)),
    nn.Softplus: lambda: nn.Softplus(beta=2.0, threshold=3.0),
    F.softplus: lambda: Lambda(lambda x: F.softplus(x, beta=0.5)),
    nn.ELU: lambda: nn.ELU(0.7),
    F.elu: lambda: Lambda(lambda x: F.elu(x, 1.3)),
    F.elu_: lambda: Lambda(lambda x: F.elu_(x)),
    nn.CELU: lambda: nn.CELU(0.8),
    F.celu: lambda: Lambda(lambda x: F.celu(x, 1.5)),
    F.celu_: lambda: Lambda(lambda x: F.celu_(x)),
    nn.SELU: nn.SELU,
    F.selu: lambda: Lambda(F.selu),
    F.selu_: lambda: Lambda(lambda x: F.selu_(x)),
    torch.selu: lambda: Lambda(torch.selu),
    nn.Mish: nn.Mish,
    F.mish: lambda: Lambda(F.mish),
    nn.Hardswish: nn.Hardswish,
    F.hardswish: lambda: Lambda(F.hardswish),
    nn.LogSigmoid: nn.LogSigmoid,
    F.logsigmoid: lambda: Lambda(F.logsigmoid),
    nn.Softsign: nn.Softsign,
    F.softsign: lambda: Lambda(F.softsign),
    nn.Tanhshrink: nn.Tanhshrink,
    F.tanhshrink: lambda: Lambda(F.tanhshrink),
}
#: smooth elementwise functions of the data (laftr.rules.gates.ElementwiseGate, PowGate): the torch function,
#: the method, and their in-place forms
ELEMENTWISE = ("sin", "exp", "expm1", "log", "log1p", "log2", "log10", "sqrt", "rsqrt", "square", "reciprocal",
               "cos", "erf", "erfc", "atan", "sinh", "cosh")
#: the targets defined on positive inputs only: their example networks feed them pre-activations near 10
POSITIVE: set[Any] = set()
for _n in ELEMENTWISE:
    _forms: dict[Any, Callable[[], nn.Module]] = {
        getattr(torch, _n): lambda n=_n: Lambda(getattr(torch, n)),
        _n: lambda n=_n: Lambda(lambda x: getattr(x, n)()),
        _n + "_": lambda n=_n: Lambda(lambda x: getattr(x, n + "_")()),
    }
    if hasattr(torch, _n + "_"):
        _forms[getattr(torch, _n + "_")] = lambda n=_n: Lambda(lambda x: getattr(torch, n + "_")(x))
    if hasattr(torch.special, _n):
        _forms[getattr(torch.special, _n)] = lambda n=_n: Lambda(getattr(torch.special, n))
    SMOOTH.update(_forms)
    if _n.startswith("log") or _n in ("sqrt", "rsqrt", "reciprocal"):
        POSITIVE.update(_forms)
SMOOTH[torch.pow] = lambda: Lambda(lambda x: torch.pow(x, 3))
SMOOTH[operator.pow] = lambda: Lambda(lambda x: x ** 2)
SMOOTH["pow"] = lambda: Lambda(lambda x: x.pow(0.5))
SMOOTH["pow_"] = lambda: Lambda(lambda x: x.pow_(-1.5))
POSITIVE.update(("pow", "pow_"))

if hasattr(torch, "selu_"):
    SMOOTH[torch.selu_] = lambda: Lambda(lambda x: torch.selu_(x))
if hasattr(torch, "celu_"):
    SMOOTH[torch.celu_] = lambda: Lambda(lambda x: torch.celu_(x))

#: Normalizations: (model factory, layout of its input: ``last`` = (B, 4, 6) normalized over the last axis,
#: ``channel`` = (B, 6, 4) with 6 channels).
NORMS: dict[Any, tuple[Callable[[], nn.Module], str]] = {
    nn.LayerNorm: (lambda: nn.LayerNorm(6), "last"),
    F.layer_norm: (lambda: WithParam(lambda x, p: F.layer_norm(x, (6,), p, 0.3 * p), (6,)), "last"),
    nn.GroupNorm: (lambda: nn.GroupNorm(2, 6), "channel"),
    F.group_norm: (lambda: WithParam(lambda x, p: F.group_norm(x, 3, p, None), (6,)), "channel"),
    nn.modules.instancenorm._InstanceNorm: (lambda: nn.InstanceNorm1d(6, affine=True), "channel"),
    F.normalize: (lambda: Lambda(lambda x: F.normalize(x, dim=-1)), "last"),
    # over the channels (not the last axis): the positions' units interleave
    "F.normalize(dim=1)": (lambda: Lambda(lambda x: F.normalize(x, dim=1)), "channel"),
}
if hasattr(nn, "RMSNorm"):
    NORMS[nn.RMSNorm] = (lambda: nn.RMSNorm(6), "last")
    NORMS[F.rms_norm] = (lambda: WithParam(lambda x, p: F.rms_norm(x, (6,), p, 1e-6), (6,)), "last")
