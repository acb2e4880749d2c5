"""Rounding in the ground truth: the KL metric in every dtype, the exact FSD's sums, its one-time checks.

The KL of two outputs is checked against references that cannot share its rounding: the textbook formula in
float64 on the very values of the low-precision outputs (exact where its own rounding, ~1e-16 |log p|, is far
below the KL), or mpmath at high precision where the KL is tiny or the logits huge.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from cases import mlp, perturbed
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import laftr
from laftr import exact as exact_mod
from laftr.graph import PROBE_EXAMPLES
from laftr.metrics import discrepancy
from laftr.rules import UnsupportedOpError

mpmath = pytest.importorskip("mpmath")  # (a dependency of torch's sympy)

LOW = [torch.bfloat16, torch.float16]


def _textbook_kl(z0: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """``sum p0 (log p0 - log p)``: the formula the metric used before, as written (here in float64)."""
    logp0 = F.log_softmax(z0, -1)
    return (logp0.exp() * (logp0 - F.log_softmax(z, -1))).sum(-1)


def _mp_kl(z0: torch.Tensor, z: torch.Tensor, dps: int = 60) -> torch.Tensor:
    """KL(softmax(z0) || softmax(z)) per row in mpmath at ``dps`` digits (``-inf`` logits: zero probability)."""
    out = []
    with mpmath.workdps(dps):
        for a, b in zip(z0.double().tolist(), z.double().tolist(), strict=True):
            la = mpmath.log(mpmath.fsum(mpmath.exp(v) for v in a if v != -math.inf))
            lb = mpmath.log(mpmath.fsum(mpmath.exp(v) for v in b if v != -math.inf))
            kl = mpmath.mpf(0)
            for x, y in zip(a, b, strict=True):
                if x == -math.inf:
                    continue
                if y == -math.inf:
                    kl = mpmath.inf
                    break
                kl += mpmath.exp(x - la) * ((x - la) - (y - lb))
            out.append(float(kl))
    return torch.tensor(out, dtype=torch.float64)


def _logits(n: int = 400, k: int = 10, scale: float = 3.0, eps: float = 1e-2, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    z0 = scale * torch.randn(n, k, generator=g, dtype=torch.float64)
    return z0, z0 + eps * torch.randn(n, k, generator=g, dtype=torch.float64)


# ---------------------------------------------------------------------------------------------------- KL


@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("eps", [1e-1, 1e-2, 1e-3])
def test_kl_low_precision_is_the_kl_of_those_outputs(dtype, eps):
    """bfloat16 / float16 outputs: the KL is that of the outputs' values, rounded once to their dtype.

    The textbook form in the outputs' dtype was off by its rounding: 0.27x the true mean in bfloat16 and 1.5x
    in float16 at eps=1e-2, negative at 1e-3.
    """
    z0, z = _logits(eps=eps)
    a, b = z0.to(dtype), z.to(dtype)
    kl = discrepancy(a, b, "kl")
    assert kl.dtype == dtype
    ref = _textbook_kl(a.double(), b.double())  # the KL of these very values (rounding ~1e-15 absolute)
    assert (kl >= 0).all()
    fin = torch.finfo(dtype)
    torch.testing.assert_close(kl.double(), ref, rtol=2 * fin.eps, atol=fin.smallest_normal * fin.eps)


@pytest.mark.parametrize("eps", [1e-3, 1e-4, 1e-5])
def test_kl_float32_small_distances_are_not_overestimated(eps):
    """float32 outputs a small step apart: the textbook form's cancellation gave 1.75x the KL at 1e-4."""
    z0, z = _logits(eps=eps)
    a, b = z0.float(), z.float()
    kl = discrepancy(a, b, "kl")
    assert kl.dtype == torch.float32
    ref = _mp_kl(a, b, dps=40)  # (the textbook float64 form would round to ~1e-7 of a KL of 1e-11)
    torch.testing.assert_close(kl.double(), ref, rtol=1e-5, atol=0.0)
    torch.testing.assert_close(kl.double().mean(), ref.mean(), rtol=1e-6, atol=0.0)


def test_exact_kl_of_low_precision_networks():
    """exact_fsd(metric='kl') of bfloat16 and float16 networks is the KL of their outputs (was 0.13x in bf16)."""
    torch.manual_seed(0)
    X = torch.randn(40, 5, dtype=torch.float64)
    m64 = mlp().double()
    t64 = perturbed(m64, 0.05)
    for dtype in LOW:
        m, t = copy.deepcopy(m64).to(dtype), copy.deepcopy(t64).to(dtype)
        with torch.no_grad():
            ref = _textbook_kl(m(X.to(dtype)).double(), t(X.to(dtype)).double()).mean()
        value = laftr.exact_fsd(m, t, X.to(dtype), metric="kl")
        assert value.dtype == dtype
        torch.testing.assert_close(value.double(), ref, rtol=2 * torch.finfo(dtype).eps, atol=0.0)


@pytest.mark.parametrize("eps", [3.0, 1.0, 0.3, 0.1])
def test_kl_float64_is_the_textbook_value_and_gradient(eps):
    """On ordinary float64 outputs the value and both gradients are the textbook formula's (to its rounding)."""
    z0, z = _logits(eps=eps)
    z0.requires_grad_(True)
    z.requires_grad_(True)
    new, old = discrepancy(z0, z, "kl"), _textbook_kl(z0, z)
    assert new.dtype == torch.float64
    # (atol: the textbook form's own rounding, ~eps |log p| absolute, is ~1e-15)
    torch.testing.assert_close(new, old, rtol=1e-11, atol=1e-15)
    torch.testing.assert_close(new.mean(), old.mean(), rtol=1e-13, atol=0.0)
    g_new = torch.autograd.grad(new.sum(), (z0, z))
    g_old = torch.autograd.grad(old.sum(), (z0, z))
    for a, b in zip(g_new, g_old, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-15)
    # and d KL / dz is p - p0
    p, p0 = F.softmax(z.detach(), -1), F.softmax(z0.detach(), -1)
    torch.testing.assert_close(g_new[1], p - p0, rtol=0.0, atol=1e-15)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize(("scale", "step"), [(1e3, 1e3), (3e3, 1e3), (1e4, 3e3)])
def test_kl_huge_logits(dtype, scale, step):
    """Logits of 1e3-1e4 (probabilities down to exp(-1e4)): finite, non-negative, right to rounding.

    Rows whose argmax moves have KLs of 10-10^4 (the logsumexp form); the others have KLs down to 1e-300
    and below (the cancellation-free form), right to a few roundings relative in float64.
    """
    g = torch.Generator().manual_seed(1)
    z0 = scale * torch.randn(30, 8, generator=g, dtype=torch.float64)
    z = z0 + step * torch.randn(30, 8, generator=g, dtype=torch.float64)
    a, b = z0.to(dtype), z.to(dtype)
    kl = discrepancy(a, b, "kl")
    assert torch.isfinite(kl).all() and (kl >= 0).all()
    ref = _mp_kl(a, b, dps=400)  # KLs down to 1e-308 (float64's normal range) against terms of 1e4
    assert (ref > 10).any() and (ref < 1e-30).any()
    eps = torch.finfo(dtype).eps
    # float64: KLs below the smallest normal number are subnormal (fewer digits); float32: the logits' own
    # rounding (eps |z|) bounds what any float32 computation can give
    atol = torch.finfo(dtype).smallest_normal if dtype == torch.float64 else 4 * eps * float(b.abs().max())
    torch.testing.assert_close(kl.double(), ref, rtol=16 * eps, atol=atol)


def test_kl_large_shift_on_a_tiny_probability():
    """A class of tiny p0 whose logit rises by more than 40 (a term exp(c) that would overflow in expm1)."""
    z0 = torch.tensor([[0.0, -60.0], [0.0, -200.0], [0.0, -80.0], [5.0, -50.0]], dtype=torch.float64)
    z = torch.tensor([[0.0, -20.0], [0.0, 60.0], [0.0, 10.0], [5.0, 30.0]], dtype=torch.float64)
    ref = _mp_kl(z0, z)
    for dtype, rtol in [(torch.float64, 1e-13), (torch.float32, 1e-5)]:
        kl = discrepancy(z0.to(dtype), z.to(dtype), "kl")
        torch.testing.assert_close(kl.double(), ref, rtol=rtol, atol=0.0)


def test_kl_masked_classes():
    """``-inf`` logits (masked classes) in z0 and/or z.

    A class z0 masks adds no term (the textbook form gave NaN, 0 * inf) but the mass z puts on it still lowers
    p on the others; a class z0 sees and z masks gives +inf. Gradients stay finite (and are p - p0).
    """
    ninf = -math.inf
    z0 = torch.tensor([[0.0, 1.0, ninf, 2.0], [0.0, 1.0, ninf, 2.0], [ninf, 1.0, ninf, 2.0], [0.0, 1.0, ninf, 2.0],
                       [0.0, 1.0, ninf, 2.0], [0.0, 1.0, 0.5, 2.0]], dtype=torch.float64)
    z = torch.tensor([[0.5, 1.0, 3.0, 2.0], [0.5, 1.0, ninf, 2.0], [ninf, 1.5, ninf, 2.0], [0.0, 1.0, 900.0, 2.0],
                      [0.0, 1.0, ninf, 2.0], [0.0, 1.0, ninf, 2.0]], dtype=torch.float64)
    ref = _mp_kl(z0, z)
    assert ref[-1] == math.inf and ref[-2] == 0 and ref[0] > ref[1] > 0
    for dtype, rtol in [(torch.float64, 1e-14), (torch.float32, 1e-6), (torch.bfloat16, 2**-7)]:
        a = z0.to(dtype).detach().clone().requires_grad_(True)
        b = z.to(dtype).detach().clone().requires_grad_(True)
        kl = discrepancy(a, b, "kl")
        torch.testing.assert_close(kl.double(), _mp_kl(a.detach(), b.detach()), rtol=rtol, atol=0.0)
        kl.sum().backward()
        assert torch.isfinite(a.grad).all() and torch.isfinite(b.grad).all()
        if dtype == torch.float64:  # the analytic gradients of the finite rows
            fin = torch.isfinite(kl)
            p, p0 = F.softmax(z, -1), F.softmax(z0, -1)
            torch.testing.assert_close(b.grad[fin], (p - p0)[fin], rtol=0.0, atol=1e-15)
            logp, logp0 = F.log_softmax(z, -1), F.log_softmax(z0, -1)
            dz0 = torch.where(p0 > 0, p0 * (logp0 - logp - kl.detach()[:, None]), 0.0)
            torch.testing.assert_close(a.grad[fin], dz0[fin], rtol=0.0, atol=1e-14)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
def test_kl_is_exactly_zero_with_zero_gradient_at_theta0(dtype):
    z0, _ = _logits(n=50, scale=5.0)
    a = z0.to(dtype).detach().clone().requires_grad_(True)
    b = z0.to(dtype).detach().clone().requires_grad_(True)
    kl = discrepancy(a, b, "kl")
    assert torch.equal(kl, torch.zeros_like(kl))
    kl.sum().backward()
    assert torch.equal(a.grad, torch.zeros_like(a)) and torch.equal(b.grad, torch.zeros_like(b))


def test_kl_under_vmap_grad_and_autocast():
    """No branching on values: torch.func.vmap(grad) per example, and autocast, give the plain results."""
    z0, z = _logits(n=12, eps=0.5)
    z0[0, 2] = -math.inf  # a masked class, a huge-logit row (the logsumexp form) and an identical row
    z[1] = z0[1] * 1e3
    z0[1] = z0[1] * 1e3 + 1e3 * torch.arange(10.0)
    z[2] = z0[2]
    per = torch.func.vmap(torch.func.grad(lambda b, a: discrepancy(a[None], b[None], "kl")[0]))(z, z0)
    p, p0 = F.softmax(z, -1), F.softmax(z0, -1)
    torch.testing.assert_close(per, p - p0, rtol=0.0, atol=1e-15)
    values = torch.func.vmap(lambda a, b: discrepancy(a[None], b[None], "kl")[0])(z0, z)
    torch.testing.assert_close(values, discrepancy(z0, z, "kl"), rtol=1e-15, atol=0.0)
    a, b = z0.float(), z.float()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under = discrepancy(a, b, "kl")
    assert under.dtype == torch.float32
    torch.testing.assert_close(under, discrepancy(a, b, "kl"), rtol=0.0, atol=0.0)


# ---------------------------------------------------------------------------------------------------- exact FSD


def _far_pair(dtype: torch.dtype, n: int = 8000):
    torch.manual_seed(0)
    X = torch.randn(n, 5, dtype=torch.float64)
    m64 = mlp(hidden=(8, 8)).double()
    t64 = perturbed(m64, 1.0)
    m, t = copy.deepcopy(m64).to(dtype), copy.deepcopy(t64).to(dtype)
    return m, t, X.to(dtype)


@pytest.mark.parametrize("dtype", LOW)
def test_exact_fsd_sums_in_float64(dtype):
    """8000 examples of l2 ~ 15: a float16 running sum overflowed (inf), a bfloat16 one drifted (+4%)."""
    m, t, X = _far_pair(dtype)
    with torch.no_grad():
        ref = (0.5 * (t(X).double() - m(X).double()).pow(2).sum(1)).mean()
    for batch_size in (512, 64):
        value = laftr.exact_fsd(m, t, X, batch_size=batch_size)
        assert value.dtype == dtype
        torch.testing.assert_close(value.double(), ref, rtol=torch.finfo(dtype).eps, atol=0.0)
    value = laftr.exact_fsd(m, t, X, grad=True)  # the float64 sum keeps the graph
    assert value.dtype == dtype and value.requires_grad
    value.backward()
    assert all(torch.isfinite(p.grad).all() for p in t.parameters())


@pytest.mark.parametrize("dtype", LOW)
def test_exact_discrepancy_of_each_example_is_wide(dtype):
    """One example whose float16 squared difference overflows (65504) among small ones: the mean is finite."""
    torch.manual_seed(0)
    m = nn.Linear(5, 3).to(dtype)
    t = perturbed(m, 1.0)
    X = torch.randn(200, 5, dtype=dtype)
    X[7] = 200.0
    with torch.no_grad():
        per = 0.5 * (t(X).double() - m(X).double()).pow(2).sum(1)
    assert per.max() > 70000 and per.mean() < 30000
    torch.testing.assert_close(laftr.exact_fsd(m, t, X).double(), per.mean(), rtol=torch.finfo(dtype).eps, atol=0.0)
    torch.testing.assert_close(laftr.exact_fsd_and_grad(m, t, X)[0].double(), per.mean(),
                               rtol=torch.finfo(dtype).eps, atol=0.0)


@pytest.mark.parametrize("dtype", LOW)
def test_exact_fsd_and_grad_sums_gradients_wide(dtype):
    """The gradient is the float64 sum of the batches' gradients, rounded once (was inf in float16)."""
    m, t, X = _far_pair(dtype)
    value, grads = laftr.exact_fsd_and_grad(m, t, X, batch_size=64)
    sums = {n: torch.zeros_like(p, dtype=torch.float64) for n, p in t.named_parameters()}
    for i in range(0, len(X), 64):
        x = X[i : i + 64]
        with torch.no_grad():
            z0 = m(x)
        d = discrepancy(z0.float(), t(x).float(), "l2").to(torch.float64).sum()  # (each example in float32)
        for (n, _), g in zip(t.named_parameters(), torch.autograd.grad(d, list(t.parameters())), strict=True):
            sums[n] += g.double()
    for n, p in t.named_parameters():
        assert grads[n].dtype == p.dtype
        ref = sums[n] / len(X)
        torch.testing.assert_close(grads[n].double(), ref, rtol=2 * torch.finfo(dtype).eps,
                                   atol=1e-3 * float(ref.abs().max()))


class _Centred(nn.Module):
    """Subtracts the batch mean of a hidden layer: each example's output depends on the others."""

    def __init__(self) -> None:
        super().__init__()
        self.l1 = nn.Linear(5, 8)
        self.l2 = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.l1(x))
        return self.l2(h - h.mean(0, keepdim=True))


@pytest.mark.usefixtures("float64")
def test_exact_refuses_mixing_networks_read_one_example_a_batch():
    """Batches of one example: the mixing check gathers the first examples of the first batches."""
    m = _Centred()
    t = perturbed(m, 0.05)
    X = torch.randn(20, 5)
    Y = torch.arange(20) % 3
    calls = [
        lambda: laftr.exact_fsd(m, t, DataLoader(TensorDataset(X, Y), batch_size=1)),
        lambda: laftr.exact_fsd(m, t, X, batch_size=1),
        lambda: laftr.exact_fsd(m, t, X[:2], batch_size=1),  # data of two examples: both are checked
        lambda: laftr.exact_fsd(m, t, (x[None] for x in X)),  # a one-shot stream
        lambda: laftr.exact_fsd_and_grad(m, t, X, batch_size=1),
        lambda: laftr.exact_fsd_and_grad(m, t, DataLoader(TensorDataset(X, Y), batch_size=3)),
    ]
    for call in calls:
        with pytest.raises(UnsupportedOpError, match="mixes the examples"):
            call()


@pytest.mark.usefixtures("float64")
def test_exact_checks_once_on_the_first_examples(monkeypatch):
    """One check per call, on the first PROBE_EXAMPLES examples wherever the batches split them; same value."""
    m = mlp()
    t = perturbed(m, 0.1)
    X = torch.randn(23, 5)
    seen: list[torch.Tensor] = []
    real = exact_mod._check_deterministic

    def spy(model_a, model_b, x, ref):
        seen.append(x.clone())
        real(model_a, model_b, x, ref)

    monkeypatch.setattr(exact_mod, "_check_deterministic", spy)
    whole = laftr.exact_fsd(m, t, X, batch_size=23)
    for batch_size in (1, 2, 4, 23):
        for fn in (laftr.exact_fsd, lambda *a, **k: laftr.exact_fsd_and_grad(*a, **k)[0]):
            seen.clear()
            value = fn(m, t, X, batch_size=batch_size)
            assert len(seen) == 1 and torch.equal(seen[0], X[:PROBE_EXAMPLES])
            torch.testing.assert_close(value, whole, rtol=1e-14, atol=0.0)
    seen.clear()
    laftr.exact_fsd(m, t, X[:3], batch_size=1)  # fewer examples than the probe: checked at the end
    assert len(seen) == 1 and torch.equal(seen[0], X[:3])


def test_kl_gradcheck():
    """First and second derivatives by finite differences (float64), with a masked class and a huge-logit row."""
    z0, z = _logits(n=4, k=5, eps=0.7)
    z0[0, 1] = -math.inf
    z0[1], z[1] = 300.0 * z0[1], 300.0 * z[1]
    a, b = z0.requires_grad_(True), z.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x, y: discrepancy(x, y, "kl"), (a, b))
    assert torch.autograd.gradgradcheck(lambda x, y: discrepancy(x, y, "kl"), (a, b))


def test_l2_of_float16_outputs_is_computed_wide():
    """Each example's ``l2`` (and ``l2-probs``) of float16 outputs summed squares in float16: a change of 300
    in one logit overflowed to inf though the example's value, 45,000, is a float16 number."""
    z0 = torch.zeros(2, 4, dtype=torch.float16)
    z = z0.clone()
    z[0, 0] = 300.0
    d = discrepancy(z0, z, "l2")
    assert d.dtype == torch.float16 and float(d[0]) == float(torch.tensor(45000.0).half()) and float(d[1]) == 0
    p = discrepancy(z0, z, "l2-probs")
    torch.testing.assert_close(p.double(), discrepancy(z0.double(), z.double(), "l2-probs"), rtol=1e-3, atol=0)


def test_exact_fsd_is_returned_in_the_outputs_dtype():
    """A float16 network returning float32 logits: the value came back in the parameters' float16 (82,472
    became inf), undoing the float64 sum; it is in the outputs' dtype, as before."""
    torch.manual_seed(0)

    class Head(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(5, 3)

        def forward(self, x):
            return self.lin(x).float() * 300.0

    m = Head().half()
    t = copy.deepcopy(m)
    with torch.no_grad():
        t.lin.weight.add_(1.0)
    X = torch.randn(40, 5).half()
    value = laftr.exact_fsd(m, t, X)
    assert value.dtype == torch.float32 and bool(torch.isfinite(value))
    want = discrepancy(m(X).double(), t(X).double(), "l2").mean()
    torch.testing.assert_close(value.double(), want, rtol=1e-6, atol=0)
    d, _ = laftr.exact_fsd_and_grad(m, t, X)
    assert d.dtype == torch.float32 and bool(torch.isfinite(d))


# ----------------------------------------------------------- float16 networks: the quadratic estimators' sums
class _Wide(nn.Module):
    """A ReLU MLP whose hidden values reach ~20 (its K-FAC input factor sums past float16's 65,504)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(16, 64), nn.Linear(64, 64), nn.Linear(64, 5)
        with torch.no_grad():
            self.a.weight.mul_(6.0)

    def forward(self, x):
        return self.c(torch.relu(self.b(torch.relu(self.a(x)))))


def test_the_quadratic_estimators_of_a_float16_network_square_and_sum_wide():
    """weight, diag-fisher and K-FAC squared a float16 parameter change in float16: every weight moved by 2^-14
    (a float16 number) squares to 2^-28, below float16's smallest, and the estimates were 0; K-FAC's sums of
    outer products overflowed (refused as not finite). Squares and sums are float32 now, the value back in
    float16: the float32 copy's estimates to float16's rounding."""
    torch.manual_seed(0)
    net = _Wide()
    X = torch.randn(256, 16)
    small = copy.deepcopy(net)
    with torch.no_grad():
        for p in small.parameters():
            p.add_(2.0 ** -14)
    half, small_half = copy.deepcopy(net).half(), copy.deepcopy(small).half()
    change = sum(float((q.double() - p.double()).pow(2).sum()) for p, q in zip(half.parameters(),
                                                                               small_half.parameters()))
    assert change > 0
    got = laftr.make_estimator("weight").fit(half, X.half())(small_half)
    assert got.dtype == torch.float16
    assert abs(float(got) / (0.5 * change) - 1) < 2e-3
    far = perturbed(net, 3e-2)
    for name, kw in (("diag-fisher", {}), ("kfac", {})):
        want = laftr.make_estimator(name, **kw).fit(net, X)
        have = laftr.make_estimator(name, **kw).fit(half, X.half())
        for other in (small, far):
            ratio = float(have(copy.deepcopy(other).half())) / float(want(other))
            assert abs(ratio - 1) < 2e-2, (name, ratio)


def test_laftr_exact_of_a_network_with_a_layer_of_another_dtype():
    """A float32 network with one bfloat16 layer between casts: the closed form's addmv of a bfloat16 weight and
    float32 moments failed inside torch; it runs in the model's dtype (the layer's rounded weights)."""

    class Cast(nn.Module):
        def __init__(self, dtype: torch.dtype) -> None:
            super().__init__()
            self.dtype = dtype

        def forward(self, x):
            return x.to(self.dtype)

    torch.manual_seed(0)
    a, b, c = nn.Linear(8, 16), nn.Linear(16, 16), nn.Linear(16, 3)
    mixed = nn.Sequential(a, nn.ReLU(), Cast(torch.bfloat16), copy.deepcopy(b).bfloat16(), Cast(torch.float32),
                          nn.ReLU(), c)
    plain = nn.Sequential(a, nn.ReLU(), nn.Identity(), copy.deepcopy(b).bfloat16().float(), nn.Identity(),
                          nn.ReLU(), c)
    X = torch.randn(128, 8)
    other_mixed = perturbed(mixed, 0.05)
    other_plain = copy.deepcopy(plain)
    other_plain.load_state_dict({k: v.float() for k, v in other_mixed.state_dict().items()})
    got = laftr.make_estimator("laftr-exact", metric="l2").fit(mixed, X)(other_mixed)
    want = laftr.make_estimator("laftr-exact", metric="l2").fit(plain, X)(other_plain)
    # (the gate laws are fitted on the real networks, whose bfloat16 layer rounds its outputs: 1e-4 apart)
    torch.testing.assert_close(got, want, rtol=1e-3, atol=0)


def test_estimates_of_a_network_of_several_floating_dtypes_keep_the_promoted_dtype():
    """A float16 first layer in a float32 network: laftr-exact ran its closed form in float16 (the first
    parameter's dtype) and rounded the float32 layers' distance to float16's smallest number (5.96e-8 for
    3.26e-8); weight returned bfloat16 where the first layer was. Both are float32 now, the all-float32
    twin's values (the layer's weights rounded)."""

    class Half(nn.Module):
        def __init__(self, dtype: torch.dtype) -> None:
            super().__init__()
            self.a, self.b, self.c = nn.Linear(8, 16).to(dtype), nn.Linear(16, 16), nn.Linear(16, 3)
            self.dtype = dtype

        def forward(self, x):
            return self.c(torch.relu(self.b(torch.relu(self.a(x.to(self.dtype))).float())))

    torch.manual_seed(0)
    X = torch.randn(128, 8)
    for dtype in (torch.float16, torch.bfloat16):
        mixed = Half(dtype)
        twin = copy.deepcopy(mixed).float()
        twin.dtype = torch.float32
        other, other_twin = copy.deepcopy(mixed), copy.deepcopy(twin)
        with torch.no_grad():  # theta moves the float32 layers only
            for m in (other, other_twin):
                m.b.weight.add_(1e-4)
        for name in ("laftr-exact", "weight"):
            got = laftr.make_estimator(name, metric="l2").fit(mixed, X)(other)
            want = laftr.make_estimator(name, metric="l2").fit(twin, X)(other_twin)
            assert got.dtype == torch.float32, (name, dtype)
            torch.testing.assert_close(got, want, rtol=2e-2 if name == "laftr-exact" else 1e-6, atol=0)
