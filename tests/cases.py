"""A shared zoo of tiny networks for the tests (float64 where exactness is checked)."""

from __future__ import annotations

import copy
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import torch
import torch.nn.functional as F
from torch import nn


def mlp(d_in: int = 5, hidden: tuple[int, ...] = (8, 6), d_out: int = 3, leaky: float | None = None) -> nn.Module:
    layers: list[nn.Module] = []
    d = d_in
    for h in hidden:
        layers += [nn.Linear(d, h), nn.LeakyReLU(leaky) if leaky is not None else nn.ReLU()]
        d = h
    layers.append(nn.Linear(d, d_out))
    return nn.Sequential(*layers)


class FunctionalNet(nn.Module):
    """ReLU spelled as F.relu, torch.relu, in-place and as a method, plus a residual add and a cat."""

    def __init__(self, d_in: int = 5, h: int = 6, d_out: int = 3) -> None:
        super().__init__()
        self.a = nn.Linear(d_in, h)
        self.b = nn.Linear(h, h)
        self.c = nn.Linear(h, h)
        self.head = nn.Linear(2 * h, d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.a(x))
        r = torch.relu(self.b(h))
        r = self.c(r).relu()
        h = h + r
        h2 = nn.functional.relu(self.b(h), inplace=True)
        return self.head(torch.cat([h, h2], dim=1))


class SmallCNN(nn.Module):
    """Conv, eval batch norm, avg pool, max pool, dropout, flatten via view."""

    def __init__(self, c_in: int = 1, n_out: int = 3, maxpool: bool = True) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)
        self.conv2 = nn.Conv2d(3, 4, 3)
        self.pool = nn.MaxPool2d(2) if maxpool else nn.AvgPool2d(2)
        self.drop = nn.Dropout(0.25)
        self.fc = nn.Linear(4 * 2 * 2, n_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn(self.conv1(x)))
        x = self.pool(F.relu(self.conv2(x)))
        x = self.drop(x)
        return self.fc(x.view(x.size(0), -1))


class BasicBlock(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.b1 = nn.BatchNorm2d(c)
        self.c2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.b2 = nn.BatchNorm2d(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.b1(self.c1(x)))
        out = self.b2(self.c2(out))
        return F.relu(out + x)


class TinyResNet(nn.Module):
    def __init__(self, c_in: int = 1, c: int = 3, n_out: int = 3) -> None:
        super().__init__()
        self.stem = nn.Conv2d(c_in, c, 3, padding=1)
        self.block = BasicBlock(c)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c, n_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.stem(x))
        x = self.block(x)
        return self.fc(torch.flatten(self.pool(x), 1))


class GeluNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.act = nn.GELU()
        self.b = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.act(self.a(x)))


class CumprodNet(nn.Module):
    """An op laftr has no rule for (a cumulative product over features)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.cumprod(self.a(x), 1))


def randomize_bn(model: nn.Module, gen: torch.Generator) -> None:
    """Give batch norms non-trivial running statistics and affine parameters."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.normal_(0, 0.3, generator=gen)
            m.running_var.uniform_(0.5, 2.0, generator=gen)
            m.weight.data.normal_(1, 0.2, generator=gen)
            m.bias.data.normal_(0, 0.2, generator=gen)


def perturbed(model: nn.Module, scale: float = 0.1, seed: int = 1, only: str | None = None) -> nn.Module:
    """A copy of ``model`` with Gaussian noise added to its parameters (all, or names starting with ``only``)."""
    other = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in other.named_parameters():
            if only is None or n.startswith(only):
                p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return other


class EstimateCall(nn.Module):
    """``forward() = est(inner)``: lets torch.func.functional_call substitute the parameters ``est`` reads (for
    gradcheck of an estimate as a function of the parameters)."""

    def __init__(self, inner: nn.Module, est) -> None:
        super().__init__()
        self.inner = inner
        self.est = est

    def forward(self) -> torch.Tensor:
        return self.est(self.inner)


def load_benchmark_script(name: str) -> ModuleType:
    """``benchmarks/<name>.py`` imported as a module (registered in ``sys.modules``, as dataclasses need)."""
    path = Path(__file__).parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"{name}_bench", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module
